"""Tests for socks6fast.proto.policy: the ruleset (CMD-06 decisions)."""

from __future__ import annotations

import ipaddress

import pytest

from socks6fast.constants import AddressType, Command
from socks6fast.proto.policy import (
    ANONYMOUS,
    AUTHENTICATED,
    LOCAL_HOST,
    Destination,
    DomainPattern,
    LocalAddresses,
    OwnListeners,
    Policy,
    Rule,
    connect_target,
    parse_command,
    parse_destination,
    parse_network,
    parse_port_range,
)

V4 = AddressType.IPV4
V6 = AddressType.IPV6
DN = AddressType.DOMAIN_NAME
CONNECT = Command.CONNECT


def dests(*entries: str) -> tuple[Destination, ...]:
    return tuple(parse_destination(e) for e in entries)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


#: A host with 192.0.2.2 and fd00::2 on an interface and 10.98.0.1/16 on its loopback device.
HOST = LocalAddresses(
    addresses=frozenset({ip("192.0.2.2"), ip("fd00::2"), ip("fe80::2"), ip("10.98.0.1")}),
    networks=(ipaddress.IPv4Network("10.98.0.0/16"),),
)


def test_no_rules_uses_default() -> None:
    assert Policy().check("192.0.2.1", None, CONNECT, V4, "198.51.100.1", 80)
    assert not Policy(default_allow=False).check("192.0.2.1", None, CONNECT, V4, "198.51.100.1", 80)


def test_first_match_wins() -> None:
    policy = Policy(
        [
            Rule(allow=True, destinations=dests("10.1.0.0/16")),
            Rule(allow=False, destinations=dests("10.0.0.0/8")),
        ]
    )
    assert policy.check("192.0.2.1", None, CONNECT, V4, "10.1.2.3", 80)
    assert not policy.check("192.0.2.1", None, CONNECT, V4, "10.2.2.3", 80)
    assert policy.check("192.0.2.1", None, CONNECT, V4, "11.0.0.1", 80)  # default allow


def test_client_networks() -> None:
    policy = Policy(
        [Rule(allow=True, clients=(parse_network("127.0.0.0/8"), parse_network("::1")))], default_allow=False
    )
    assert policy.check("127.0.0.5", None, CONNECT, V4, "192.0.2.1", 80)
    assert policy.check("::1", None, CONNECT, V4, "192.0.2.1", 80)
    assert policy.check("::ffff:127.0.0.1", None, CONNECT, V4, "192.0.2.1", 80)  # mapped
    assert not policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.1", 80)
    assert not policy.check("not-an-ip", None, CONNECT, V4, "192.0.2.1", 80)


def test_mapped_network_entry_matches_ipv4_client() -> None:
    policy = Policy([Rule(allow=False, clients=(parse_network("::ffff:192.0.2.0/120"),))])
    assert not policy.check("192.0.2.9", None, CONNECT, V4, "198.51.100.1", 80)


def test_users() -> None:
    policy = Policy(
        [
            Rule(allow=True, users=frozenset({"alice"}), commands=frozenset({Command.BIND})),
            Rule(allow=True, users=frozenset({AUTHENTICATED}), commands=frozenset({CONNECT})),
            Rule(allow=True, users=frozenset({ANONYMOUS}), commands=frozenset({Command.NOOP})),
        ],
        default_allow=False,
    )
    assert policy.check("192.0.2.1", "alice", Command.BIND, V4, "0.0.0.0", 0)
    assert not policy.check("192.0.2.1", "bob", Command.BIND, V4, "0.0.0.0", 0)
    assert policy.check("192.0.2.1", "bob", CONNECT, V4, "192.0.2.2", 80)
    assert not policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 80)
    assert policy.check("192.0.2.1", None, Command.NOOP, V4, "0.0.0.0", 0)
    assert not policy.check("192.0.2.1", "alice", Command.NOOP, V4, "0.0.0.0", 0)


@pytest.mark.conformance("CMD-06")
def test_commands() -> None:
    policy = Policy([Rule(allow=False, commands=frozenset({Command.BIND, Command.UDP_ASSOCIATE}))])
    assert not policy.check("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0)
    assert not policy.check("192.0.2.1", None, Command.UDP_ASSOCIATE, V4, "0.0.0.0", 0)
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 80)


def test_ports() -> None:
    policy = Policy(
        [Rule(allow=True, ports=(parse_port_range(443), parse_port_range("8000-8999")))], default_allow=False
    )
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 443)
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 8000)
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 8999)
    assert not policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 9000)
    assert not policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 80)


def test_ipv6_destinations() -> None:
    policy = Policy([Rule(allow=False, destinations=dests("2001:db8::/32", "10.0.0.0/8"))])
    assert not policy.check("::1", None, CONNECT, V6, "2001:db8::1", 80)
    assert policy.check("::1", None, CONNECT, V6, "2001:db9::1", 80)
    # A dual-stack socket connecting to ::ffff:10.0.0.1 reaches 10.0.0.1.
    assert not policy.check("::1", None, CONNECT, V6, "::ffff:10.0.0.1", 80)


def test_domain_suffix_and_exact() -> None:
    policy = Policy(
        [
            Rule(allow=True, destinations=dests(".example.com", "exact.org")),
        ],
        default_allow=False,
    )
    ok = ("example.com", "www.example.com", "a.b.EXAMPLE.com", "example.com.", "exact.org", "EXACT.ORG")
    for name in ok:
        assert policy.check("192.0.2.1", None, CONNECT, DN, name, 443), name
    bad = ("badexample.com", "example.com.evil", "www.exact.org", "com", "xample.com")
    for name in bad:
        assert not policy.check("192.0.2.1", None, CONNECT, DN, name, 443), name


def test_cidr_does_not_match_a_name_and_name_does_not_match_ip() -> None:
    policy = Policy([Rule(allow=False, destinations=dests("10.0.0.0/8", ".corp"))])
    assert policy.check("192.0.2.1", None, CONNECT, DN, "10.0.0.1", 80)  # a name, not an address
    assert policy.check("192.0.2.1", None, CONNECT, DN, "internal.example", 80)
    assert not policy.check("192.0.2.1", None, CONNECT, DN, "host.corp", 80)
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.9", 80)
    assert policy.checks_resolved_addresses


def test_resolved_address_matches_cidr_entries() -> None:
    policy = Policy(
        [
            Rule(allow=False, destinations=dests("10.0.0.0/8")),
            Rule(allow=True, destinations=dests(".example.com")),
        ]
    )
    assert policy.check("192.0.2.1", None, CONNECT, DN, "internal.example", 80)
    assert not policy.check(
        "192.0.2.1", None, CONNECT, DN, "internal.example", 80, resolved_address="10.1.1.1"
    )
    assert not policy.check("192.0.2.1", None, CONNECT, DN, "10.0.0.1", 80, resolved_address="10.0.0.1")
    assert not policy.check(
        "192.0.2.1", None, CONNECT, DN, "x.example", 80, resolved_address="::ffff:10.0.0.1"
    )
    assert policy.check("192.0.2.1", None, CONNECT, DN, "www.example.com", 80, resolved_address="192.0.2.5")


def test_checks_resolved_addresses_only_with_cidr_destinations() -> None:
    assert not Policy().checks_resolved_addresses
    assert Policy([Rule(allow=False, destinations=dests("@local"))]).checks_resolved_addresses
    assert not Policy([Rule(allow=False, destinations=dests(".example.com"))]).checks_resolved_addresses
    assert not Policy([Rule(allow=False, clients=(parse_network("10.0.0.0/8"),))]).checks_resolved_addresses


def test_all_conditions_must_hold() -> None:
    rule = Rule(
        allow=False,
        clients=(parse_network("192.0.2.0/24"),),
        users=frozenset({"alice"}),
        commands=frozenset({CONNECT}),
        destinations=dests(".example.com"),
        ports=(parse_port_range(25),),
    )
    policy = Policy([rule])
    assert not policy.check("192.0.2.1", "alice", CONNECT, DN, "mail.example.com", 25)
    assert policy.check("198.51.100.1", "alice", CONNECT, DN, "mail.example.com", 25)
    assert policy.check("192.0.2.1", "bob", CONNECT, DN, "mail.example.com", 25)
    assert policy.check("192.0.2.1", "alice", Command.BIND, DN, "mail.example.com", 25)
    assert policy.check("192.0.2.1", "alice", CONNECT, DN, "mail.example.org", 25)
    assert policy.check("192.0.2.1", "alice", CONNECT, DN, "mail.example.com", 587)


# --- the host the proxy really connects to (issue 12, defect 1) -------------------------


def test_connect_target_is_what_the_kernel_connects_to() -> None:
    """Linux connects 0.0.0.0 (and ::ffff:0.0.0.0) to 127.0.0.1 and :: to ::1."""
    assert connect_target(ip("0.0.0.0")) == ip("127.0.0.1")
    assert connect_target(ip("::")) == ip("::1")
    assert connect_target(ip("::ffff:0.0.0.0")) == ip("127.0.0.1")
    assert connect_target(ip("::ffff:10.0.0.1")) == ip("10.0.0.1")
    assert connect_target(ip("fe80::1%eth0")) == ip("fe80::1")
    assert connect_target(ip("192.0.2.1")) == ip("192.0.2.1")


@pytest.mark.conformance("CMD-06")
def test_unspecified_destination_cannot_bypass_a_loopback_rule() -> None:
    """CMD-06: with the old example rule (deny 127.0.0.0/8, ::1 and localhost) a CONNECT to
    0.0.0.0, ::, ::ffff:0.0.0.0, or to a name that resolves to one of them ("0" does, by
    inet_aton), reached services on 127.0.0.1 of the proxy host. The policy now checks
    the address the kernel really connects to."""
    policy = Policy(
        [
            Rule(
                allow=False,
                commands=frozenset({CONNECT}),
                destinations=dests("127.0.0.0/8", "::1", "localhost"),
            )
        ]
    )
    for address_type, address in (
        (V4, "0.0.0.0"),
        (V6, "::"),
        (V6, "::ffff:0.0.0.0"),
        (V6, "::ffff:127.0.0.9"),
    ):
        assert not policy.check("192.0.2.1", None, CONNECT, address_type, address, 8000), address
    for name, resolved in (
        ("0", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("zero.test", "::"),
        ("x.test", "::ffff:0:0"),
    ):
        assert not policy.check("192.0.2.1", None, CONNECT, DN, name, 8000, resolved_address=resolved), name
    assert policy.check("192.0.2.1", None, CONNECT, DN, "0", 8000, resolved_address="192.0.2.7")
    assert policy.check("192.0.2.1", None, CONNECT, V4, "192.0.2.7", 8000)
    # D13: the DNS service connects to the configured resolver, not to 0.0.0.0: as written.
    assert policy.check("192.0.2.1", None, CONNECT, V4, "0.0.0.0", 53, dns_service=True)
    assert not Policy([Rule(allow=False, destinations=dests("0.0.0.0/32"))]).check(
        "192.0.2.1", None, CONNECT, V4, "0.0.0.0", 53, dns_service=True
    )


@pytest.mark.conformance("CMD-06")
def test_local_destination() -> None:
    """CMD-06: "@local" is every address that reaches this host: loopback, the host's
    interface addresses (any form: mapped, scoped), the prefix of an IPv4 address on a
    loopback device, and 0.0.0.0 / :: as a CONNECT target."""
    assert parse_destination("@local") is LOCAL_HOST
    assert parse_destination("@LOCAL") is LOCAL_HOST
    assert str(LOCAL_HOST) == "@local"
    with pytest.raises(ValueError, match='the only "@" destination is "@local"'):
        parse_destination("@localhost")
    policy = Policy([Rule(allow=False, destinations=dests("@local"))], local=HOST)
    local = (
        (V4, "127.0.0.1"),
        (V4, "127.1.2.3"),
        (V6, "::1"),
        (V4, "0.0.0.0"),
        (V6, "::"),
        (V6, "::ffff:0.0.0.0"),
        (V4, "192.0.2.2"),
        (V6, "::ffff:192.0.2.2"),
        (V6, "fd00::2"),
        (V6, "fe80::2"),
        (V4, "10.98.200.1"),
    )
    for address_type, address in local:
        assert not policy.check("192.0.2.1", None, CONNECT, address_type, address, 80), address
    for address_type, address in ((V4, "192.0.2.3"), (V6, "fd00::3"), (V4, "10.99.0.1")):
        assert policy.check("192.0.2.1", None, CONNECT, address_type, address, 80), address
    assert not policy.check("192.0.2.1", None, CONNECT, DN, "me.test", 80, resolved_address="fe80::2%eth0")
    assert not policy.check("192.0.2.1", None, CONNECT, DN, "me.test", 80, resolved_address="192.0.2.2")
    assert policy.check("192.0.2.1", None, CONNECT, DN, "me.test", 80)  # not resolved yet
    assert policy.checks_resolved_addresses
    # Without the host's addresses (Policy used alone), "@local" is loopback only.
    alone = Policy([Rule(allow=False, destinations=dests("@local"))])
    assert not alone.check("192.0.2.1", None, CONNECT, V4, "0.0.0.0", 80)
    assert alone.check("192.0.2.1", None, CONNECT, V4, "192.0.2.2", 80)


@pytest.mark.conformance("CMD-06")
def test_bind_is_checked_against_the_peer() -> None:
    """CMD-06: a BIND's request names where to listen (SOCKS 6) or a mere hint (SOCKS 5);
    the host it exchanges data with is the peer that connects. A rule with destinations
    cannot be decided at request time (a deny is passed over, an allow allows
    provisionally) and decides when the server checks again with the peer's address."""
    deny = Policy([Rule(allow=False, destinations=dests("@local", "10.0.0.0/8"))], local=HOST)
    for address in ("0.0.0.0", "127.0.0.1", "192.0.2.2"):
        assert deny.decide("192.0.2.1", None, Command.BIND, V4, address, 0) == (True, None), address
    for peer in ("127.0.0.1", "192.0.2.2", "10.1.2.3", "::ffff:10.1.2.3"):
        assert deny.decide("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0, resolved_address=peer) == (
            False,
            0,
        ), peer
    assert deny.check("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0, resolved_address="198.51.100.7")
    only = Policy([Rule(allow=True, destinations=dests("203.0.113.0/24"))], default_allow=False)
    assert only.decide("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0) == (True, 0)
    assert only.check("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0, resolved_address="203.0.113.5")
    assert not only.check("192.0.2.1", None, Command.BIND, V4, "0.0.0.0", 0, resolved_address="198.51.100.7")
    # The same goes for UDP ASSOCIATE, whose request also names a bind address.
    assert deny.check("192.0.2.1", None, Command.UDP_ASSOCIATE, V4, "127.0.0.1", 0)


@pytest.mark.conformance("CMD-06")
def test_own_listeners() -> None:
    """CMD-06 (issue 12, defect 2): a CONNECT that reaches one of the proxy's own listeners,
    by any address: the listener's own, 0.0.0.0 / :: for a loopback listener, a mapped
    form, and every local address of the family for a wildcard listener."""
    own = OwnListeners(
        [("127.0.0.1", 1080), ("::1", 1080), ("0.0.0.0", 2080), ("::", 3080), ("192.0.2.2", 4080)], HOST
    )
    reach = {
        ("127.0.0.1", 1080): "127.0.0.1:1080",
        ("0.0.0.0", 1080): "127.0.0.1:1080",
        ("::ffff:127.0.0.1", 1080): "127.0.0.1:1080",
        ("::ffff:0.0.0.0", 1080): "127.0.0.1:1080",
        ("::1", 1080): "[::1]:1080",
        ("::", 1080): "[::1]:1080",
        ("127.0.0.9", 2080): "0.0.0.0:2080",
        ("0.0.0.0", 2080): "0.0.0.0:2080",
        ("192.0.2.2", 2080): "0.0.0.0:2080",
        ("::ffff:192.0.2.2", 2080): "0.0.0.0:2080",
        ("10.98.7.7", 2080): "0.0.0.0:2080",
        ("fd00::2", 3080): "[::]:3080",
        ("fe80::2%eth0", 3080): "[::]:3080",
        ("::", 3080): "[::]:3080",
        ("192.0.2.2", 4080): "192.0.2.2:4080",
    }
    for (address, port), listener in reach.items():
        assert own.find(address, port) == listener, (address, port)
    for address, port in (
        ("127.0.0.2", 1080),  # 127.0.0.1:1080 is bound, not 127.0.0.2
        ("127.0.0.1", 1081),
        ("192.0.2.3", 2080),  # not this host
        ("::1", 2080),  # the IPv4 wildcard does not take IPv6 (the server sets IPV6_V6ONLY)
        ("127.0.0.1", 3080),
        ("0.0.0.0", 4080),  # is 127.0.0.1, where nothing listens on 4080
        ("not-an-address", 1080),
    ):
        assert own.find(address, port) is None, (address, port)


# --- parsers ----------------------------------------------------------------------------


def test_parse_network() -> None:
    assert parse_network("10.0.0.0/8") == ipaddress.IPv4Network("10.0.0.0/8")
    assert parse_network("192.0.2.1") == ipaddress.IPv4Network("192.0.2.1/32")
    assert parse_network("::1") == ipaddress.IPv6Network("::1/128")
    assert parse_network("::ffff:0:0/96") == ipaddress.IPv4Network("0.0.0.0/0")
    with pytest.raises(ValueError, match="host bits"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="is not an IP address or CIDR network"):
        parse_network("example.com")


def test_parse_destination() -> None:
    assert parse_destination(".Example.COM") == DomainPattern("example.com", subdomains=True)
    assert parse_destination("example.com.") == DomainPattern("example.com", subdomains=False)
    assert str(parse_destination(".example.com")) == ".example.com"
    assert str(parse_destination("example.com")) == "example.com"
    assert parse_destination("10.0.0.0/8") == ipaddress.IPv4Network("10.0.0.0/8")
    with pytest.raises(ValueError, match='write ".example.com"'):
        parse_destination("*.example.com")
    for bad in ("", ".", "..example.com", "a..b", "has space.com", "10.0.0.1/8", "a/b", "x" * 254):
        with pytest.raises(ValueError):
            parse_destination(bad)


def test_parse_port_range() -> None:
    assert parse_port_range(80) == (80, 80)
    assert parse_port_range("80") == (80, 80)
    assert parse_port_range("1-1023") == (1, 1023)
    for bad in (-1, 65536, "x", "10-5", "1-", "-5", "1-2-3", True):
        with pytest.raises(ValueError):
            parse_port_range(bad)


def test_parse_command() -> None:
    assert parse_command("connect") is Command.CONNECT
    assert parse_command("UDP_ASSOCIATE") is Command.UDP_ASSOCIATE
    with pytest.raises(ValueError, match="noop, connect, bind, udp_associate"):
        parse_command("associate")
