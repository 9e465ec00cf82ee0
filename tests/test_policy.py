"""Tests for socks6fast.proto.policy: the ruleset (CMD-06 decisions)."""

from __future__ import annotations

import ipaddress

import pytest

from socks6fast.constants import AddressType, Command
from socks6fast.proto.policy import (
    ANONYMOUS,
    AUTHENTICATED,
    DomainPattern,
    Policy,
    Rule,
    parse_command,
    parse_destination,
    parse_network,
    parse_port_range,
)

V4 = AddressType.IPV4
V6 = AddressType.IPV6
DN = AddressType.DOMAIN_NAME
CONNECT = Command.CONNECT


def dests(*entries: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | DomainPattern, ...]:
    return tuple(parse_destination(e) for e in entries)


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


def test_commands() -> None:  # CMD-06 (ruleset decision)
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
