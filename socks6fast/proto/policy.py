"""Access rules: who may ask the proxy for what (the "ruleset" of draft-11 section "Operation
Replies": a refusal is answered with NOT_ALLOWED_BY_RULESET, CMD-06).

Strategy: a `Policy` is an ordered list of `Rule` objects and a default action. `Policy.check`
walks the rules and the first rule whose every condition holds decides; when none matches,
the default decides. A rule condition left as None matches everything. With no rules at all
`check` returns the default at once (the proxy's common case costs one attribute test).

Conditions:

* ``clients``: CIDR networks the client's address must lie in. IPv4-mapped IPv6 addresses
  (``::ffff:192.0.2.1``, what a dual-stack listener reports) are matched as the IPv4 address.
* ``users``: user names; ``"@authenticated"`` matches any authenticated user and
  ``"@anonymous"`` a client that did not authenticate (user None).
* ``commands``: a set of `Command` members.
* ``destinations``: CIDR networks for IP destinations, `DomainPattern` objects for
  domain-name destinations (``.example.com`` matches ``example.com`` and every name below
  it, ``example.com`` matches that name only, both case-insensitively and ignoring one
  trailing dot), and `LOCAL_HOST` (``"@local"``): every address that reaches this host,
  i.e. the loopback networks, the host's own interface addresses (`LocalAddresses`, read
  from the kernel by `socks6fast.net.localaddr`) and, for CONNECT, the unspecified addresses.
  A CIDR or ``@local`` entry never matches a domain name, and a name entry never matches
  an IP address.
* ``ports``: inclusive ranges of destination ports.

What the destinations are matched against: the remote host the proxy will really exchange
bytes with, as the kernel will see it, not the text of the request.

* CONNECT to an IP address: that address, unmapped (``::ffff:10.0.0.1`` is 10.0.0.1: a
  dual-stack socket connecting to it reaches 10.0.0.1) and with the kernel's meaning of the
  unspecified address: Linux connects ``0.0.0.0`` (also ``::ffff:0.0.0.0``) to 127.0.0.1 and
  ``::`` to ::1 (``ip_route_output_key_hash_rcu``, ``tcp_v6_connect``), so a rule that keeps
  clients away from 127.0.0.0/8 keeps them away from ``0.0.0.0`` as well (`connect_target`).
* CONNECT to a domain name: a rule such as ``deny 10.0.0.0/8`` would not stop ``CONNECT
  internal.corp`` (or ``CONNECT`` to the *name* ``"0"``, which resolves to 0.0.0.0) on its
  own. When `Policy.checks_resolved_addresses` is True, the server checks a domain-name
  request twice: once as received (to refuse early without resolving), and again for each
  address the name resolved to, passing ``resolved_address``; CIDR and ``@local`` entries
  then match that address (as for an IP destination, unspecified means this host) while
  name entries still match the name. It connects only to addresses that pass.
* The DNS service (``dns_service=True``, docs/decisions.md D13: CONNECT to 0.0.0.0:53 or [::]:53
  in SOCKS 6): the proxy connects to its configured resolver, not to the unspecified
  address, so the request is matched as written (``0.0.0.0/32`` matches it, ``@local`` and
  127.0.0.0/8 do not).
* BIND (and UDP ASSOCIATE): the request's address is where the proxy should listen (SOCKS
  6) or a hint naming the expected peer (SOCKS 5, RFC 1928), not a host the proxy talks
  to; the remote host is the peer that connects. At request time that peer is unknown, so
  a rule with a destination condition cannot be decided yet: a deny rule is passed over and
  an allow rule allows provisionally. When a peer connects the server checks again with
  ``resolved_address`` set to the peer's address, and refuses the BIND (second reply Not
  Allowed) when the rules deny that peer. So ``deny @local`` for BIND stops processes on the
  proxy host from connecting in, without refusing every BIND (whose bind address is always
  local).

Pure: standard library only; no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..constants import AddressType, Command

__all__ = [
    "ANONYMOUS",
    "AUTHENTICATED",
    "COMMAND_NAMES",
    "LOCAL",
    "LOCAL_HOST",
    "Destination",
    "DomainPattern",
    "IPAddress",
    "IPNetwork",
    "LocalAddresses",
    "LocalHost",
    "OwnListeners",
    "Policy",
    "Rule",
    "connect_target",
    "parse_command",
    "parse_destination",
    "parse_network",
    "parse_port_range",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: User pattern matching every authenticated user.
AUTHENTICATED = "@authenticated"
#: User pattern matching clients that did not authenticate.
ANONYMOUS = "@anonymous"
#: Destination matching every address that reaches this host (see `LocalAddresses`).
LOCAL = "@local"
#: Command names as written in rules (lower case).
COMMAND_NAMES: dict[str, Command] = {
    "noop": Command.NOOP,
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp_associate": Command.UDP_ASSOCIATE,
}
_MAX_NAME_LENGTH = 253  # a DNS name in text form, without the trailing dot
_MAX_PORT = 65535
_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """A domain-name destination pattern."""

    name: str
    """Lower-case name without leading or trailing dot."""
    subdomains: bool
    """True for a ``.example.com`` pattern: the name itself and every name below it."""

    def matches(self, name: str) -> bool:
        """True when ``name`` (already lower-case, no trailing dot) matches the pattern."""
        if name == self.name:
            return True
        return self.subdomains and name.endswith(self.name) and name[-len(self.name) - 1] == "."

    def __str__(self) -> str:
        return f".{self.name}" if self.subdomains else self.name


@dataclass(frozen=True, slots=True)
class LocalHost:
    """The ``@local`` destination: every address that reaches this host (`LocalAddresses`)."""

    def __str__(self) -> str:
        return LOCAL


#: The one `LocalHost` entry.
LOCAL_HOST = LocalHost()

#: One entry of a rule's ``destinations``.
Destination = IPNetwork | DomainPattern | LocalHost


@dataclass(frozen=True, slots=True)
class LocalAddresses:
    """The addresses at which a connection reaches this host itself: what ``@local`` matches.

    The loopback networks (127.0.0.0/8, RFC 1122 section 3.2.1.3, and ::1) always count. The
    rest is a snapshot of the host's interface addresses, which
    `socks6fast.net.localaddr.read_local_addresses` takes from the kernel (at start-up and on
    reload); this class only holds and matches them. Pass addresses through `connect_target`
    first: an unspecified address is not in the set, the loopback address it stands for is.
    """

    addresses: frozenset[IPAddress] = frozenset()
    """The host's interface addresses (IPv4-mapped ones unmapped, no IPv6 scope)."""
    networks: tuple[IPNetwork, ...] = ()
    """Whole networks the kernel delivers locally besides loopback: on Linux the prefix of
    every IPv4 address on a loopback interface (``local 10.9.0.0/16 dev lo``)."""

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        if address.is_loopback or address in self.addresses:
            return True
        return any(address in net for net in self.networks)


def connect_target(address: IPAddress) -> IPAddress:
    """The address the kernel really connects to when asked to connect to ``address``.

    IPv4-mapped IPv6 addresses are the IPv4 host; the unspecified addresses are this host's
    loopback: Linux rewrites a connect() to 0.0.0.0 (and to ::ffff:0.0.0.0) as one to
    127.0.0.1 (``ip_route_output_key_hash_rcu``: "if (!fl4->daddr) ... INADDR_LOOPBACK")
    and one to :: as one to ::1 (``tcp_v6_connect``), so a service listening on 127.0.0.1
    answers a CONNECT to 0.0.0.0. The proxy's own sockets are never bound before connect(),
    which is the case those kernel paths assume.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(int(address))  # the scope does not change the host
        mapped = address.ipv4_mapped
        if mapped is not None:
            address = mapped
    if address.is_unspecified:
        return _LOOPBACK_V4 if address.version == 4 else _LOOPBACK_V6
    return address


@dataclass(frozen=True, slots=True)
class Rule:
    """One access rule; every condition that is not None must hold for the rule to match."""

    allow: bool
    """True to allow matching requests, False to deny them."""
    clients: tuple[IPNetwork, ...] | None = None
    """Networks the client address must lie in; None for any client."""
    users: frozenset[str] | None = None
    """User names, `AUTHENTICATED` or `ANONYMOUS`; None for anyone."""
    commands: frozenset[Command] | None = None
    """Commands; None for every command."""
    destinations: tuple[Destination, ...] | None = None
    """Destination networks, domain patterns and `LOCAL_HOST`; None for any destination."""
    ports: tuple[tuple[int, int], ...] | None = None
    """Inclusive destination port ranges; None for any port."""


def parse_network(text: str) -> IPNetwork:
    """Parse ``"192.0.2.0/24"``, ``"2001:db8::/32"`` or a single address (a /32 or /128).

    Raises:
        ValueError: not an address or network, or host bits are set (``10.0.0.1/8``).
    """
    try:
        return _unmap_network(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError("has host bits set (write the network address, e.g. 10.0.0.0/8)") from None
        raise ValueError("is not an IP address or CIDR network") from None


def parse_destination(text: str) -> Destination:
    """Parse one destination entry: a CIDR network or address, ``.example.com``,
    ``example.com`` or ``@local``.

    ``"*"`` (any destination) is handled by the caller: it means the condition is None.

    Raises:
        ValueError: the entry is neither a network, ``@local`` nor a valid domain name.
    """
    if text.startswith("@"):
        if text.lower() == LOCAL:
            return LOCAL_HOST
        raise ValueError(f'is not a destination (the only "@" destination is "{LOCAL}")')
    try:
        return parse_network(text)
    except ValueError as exc:
        if "host bits" in str(exc):
            raise
    if text.startswith("*."):
        raise ValueError(f'is not a destination; write "{text[1:]}" for a domain and its subdomains')
    subdomains = text.startswith(".")
    name = (text[1:] if subdomains else text).lower()
    name = name.removesuffix(".")
    if (
        not name
        or len(name) > _MAX_NAME_LENGTH
        or name.startswith(".")
        or ".." in name
        or any(c.isspace() or c in "/*:[]" for c in name)
    ):
        raise ValueError('is not a CIDR network, ".domain" suffix or domain name')
    return DomainPattern(name=name, subdomains=subdomains)


def parse_port_range(value: int | str) -> tuple[int, int]:
    """Parse a port (``443``) or an inclusive range (``"8000-8999"``), ports 0-65535.

    Raises:
        ValueError: not a port or a low-high range.
    """
    if isinstance(value, bool):
        raise ValueError('is not a port 0-65535 or a range like "8000-8999"')
    if isinstance(value, int):
        low = high = value
    else:
        low_text, sep, high_text = value.partition("-")
        if not low_text.strip().isdigit() or (sep and not high_text.strip().isdigit()):
            raise ValueError('is not a port 0-65535 or a range like "8000-8999"')
        low = int(low_text)
        high = int(high_text) if sep else low
    if not 0 <= low <= high <= _MAX_PORT:
        raise ValueError('is not a port 0-65535 or a range like "8000-8999" with low <= high')
    return low, high


def parse_command(text: str) -> Command:
    """Parse a command name: ``noop``, ``connect``, ``bind`` or ``udp_associate``.

    Raises:
        ValueError: unknown name.
    """
    try:
        return COMMAND_NAMES[text.lower()]
    except KeyError:
        raise ValueError(f"is not a command ({', '.join(COMMAND_NAMES)})") from None


def _unmap_network(net: IPNetwork) -> IPNetwork:
    # ::ffff:0:0/96 entries are rewritten to IPv4 so they match the unmapped client address.
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def _parse_address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # no IPv6 scope: "fe80::1%eth0"
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_networks(address: IPAddress, networks: Iterable[Destination], local: LocalAddresses) -> bool:
    # `address in net` is False (not an error) across IP versions; DomainPattern entries are
    # filtered out by type first.
    for net in networks:
        if isinstance(net, DomainPattern):
            continue
        if isinstance(net, LocalHost):
            if address in local:
                return True
        elif address in net:
            return True
    return False


class Policy:
    """An ordered ruleset with a default action; first match wins."""

    __slots__ = ("_any_clients", "checks_resolved_addresses", "default_allow", "local", "rules")

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        default_allow: bool = True,
        local: LocalAddresses | None = None,
    ) -> None:
        """Create a policy.

        Args:
            rules: the rules, in order; the first that matches decides.
            default_allow: the decision when no rule matches (and when there are no rules).
            local: what ``@local`` matches; None: the loopback networks only (the server
                passes the host's addresses, `socks6fast.net.localaddr.read_local_addresses`).
        """
        self.rules = tuple(rules)
        """The rules in order."""
        self.default_allow = default_allow
        """The decision when no rule matches."""
        self.local = local if local is not None else LocalAddresses()
        """The addresses ``@local`` matches."""
        self.checks_resolved_addresses = any(
            rule.destinations is not None and any(not isinstance(d, DomainPattern) for d in rule.destinations)
            for rule in self.rules
        )
        """True when some rule has a CIDR or ``@local`` destination: domain-name requests must
        then be checked again with each resolved address (see the module docstring)."""
        self._any_clients = any(rule.clients is not None for rule in self.rules)

    def check(
        self,
        client_ip: str,
        user: str | None,
        command: Command,
        dest_address_type: AddressType,
        dest_address: str,
        dest_port: int,
        resolved_address: str | None = None,
        *,
        dns_service: bool = False,
    ) -> bool:
        """Decide whether a request is allowed: ``decide(...)[0]``."""
        return self.decide(
            client_ip,
            user,
            command,
            dest_address_type,
            dest_address,
            dest_port,
            resolved_address,
            dns_service=dns_service,
        )[0]

    def decide(
        self,
        client_ip: str,
        user: str | None,
        command: Command,
        dest_address_type: AddressType,
        dest_address: str,
        dest_port: int,
        resolved_address: str | None = None,
        *,
        dns_service: bool = False,
    ) -> tuple[bool, int | None]:
        """Decide whether a request is allowed, and say which rule decided.

        Args:
            client_ip: the client's address as text (IPv4-mapped IPv6 is unmapped).
            user: the authenticated user (or the session's user), None when anonymous.
            command: the request's command.
            dest_address_type: the request's address type.
            dest_address: the request's address as text (see `socks6fast.proto.messages`).
            dest_port: the request's port.
            resolved_address: the remote host's address once the server knows it: for a
                CONNECT to a domain name, one address the name resolved to; for a BIND, the
                host that connected. CIDR and ``@local`` entries are matched against it.
            dns_service: the request is the DNS service (D13): matched as written.

        Returns:
            (True to allow or False to refuse with NOT_ALLOWED_BY_RULESET, the index in
            ``rules`` of the first rule that matched, or None when ``default_action``
            decided). The index goes into the access log, so an operator can tell which
            rule refused a request.
        """
        if not self.rules:
            return self.default_allow, None
        client = _parse_address(client_ip) if self._any_clients else None
        name: str | None = None
        dest_ip: IPAddress | None = None
        # A BIND's (UDP ASSOCIATE's) remote host is unknown until one connects (module docstring).
        peer_unknown = command in _LISTENING_COMMANDS and resolved_address is None
        if dest_address_type == AddressType.DOMAIN_NAME:
            name = dest_address.lower().removesuffix(".")
            if resolved_address is not None:
                dest_ip = _parse_address(resolved_address)
        elif not peer_unknown:
            dest_ip = _parse_address(resolved_address if resolved_address is not None else dest_address)
        if dest_ip is not None and command == Command.CONNECT and not dns_service:
            dest_ip = connect_target(dest_ip)  # what the kernel connects to (0.0.0.0 is 127.0.0.1)
        local = self.local
        for index, rule in enumerate(self.rules):
            if rule.commands is not None and command not in rule.commands:
                continue
            if rule.users is not None:
                if user is None:
                    if ANONYMOUS not in rule.users:
                        continue
                elif user not in rule.users and AUTHENTICATED not in rule.users:
                    continue
            if rule.ports is not None and not any(low <= dest_port <= high for low, high in rule.ports):
                continue
            if rule.clients is not None and (client is None or not _in_networks(client, rule.clients, local)):
                continue
            if rule.destinations is not None:
                if peer_unknown:
                    if rule.allow:
                        return True, index  # provisionally: the peer is checked when it connects
                    continue
                matched = False
                if name is not None:
                    matched = any(isinstance(d, DomainPattern) and d.matches(name) for d in rule.destinations)
                if not matched and dest_ip is not None:
                    matched = _in_networks(dest_ip, rule.destinations, local)
                if not matched:
                    continue
            return rule.allow, index
        return self.default_allow, None

    def destination_matters(self, client_ip: str, user: str | None, command: Command) -> bool:
        """Whether the destination (address or port) can change the decision for this client
        and user: the first rule that applies to them whatever the destination has a
        destination or port condition. UDP ASSOCIATE asks the rules about each datagram's
        destination only then (the data plane drops the datagrams to a destination until
        the rules answered, so an association that needs no answer never waits)."""
        client = _parse_address(client_ip) if self._any_clients else None
        for rule in self.rules:
            if rule.commands is not None and command not in rule.commands:
                continue
            if rule.users is not None:
                if user is None:
                    if ANONYMOUS not in rule.users:
                        continue
                elif user not in rule.users and AUTHENTICATED not in rule.users:
                    continue
            if rule.clients is not None and (
                client is None or not _in_networks(client, rule.clients, self.local)
            ):
                continue
            return rule.destinations is not None or rule.ports is not None
        return False


#: Commands whose request names where the proxy listens, not a host it connects to.
_LISTENING_COMMANDS = frozenset({Command.BIND, Command.UDP_ASSOCIATE})


class OwnListeners:
    """The proxy's own listening sockets, to refuse a CONNECT that would loop back into them.

    One client could otherwise CONNECT to the proxy's port, then through that connection
    again, and so on: every hop costs two descriptors and a connection slot, so a single
    client exhausts ``max_connections``. A destination reaches a listener when its port is
    the listener's and, after `connect_target` (0.0.0.0 is 127.0.0.1, mapped addresses are
    IPv4), its address is the listener's, or the listener is a wildcard (0.0.0.0 or ::) and
    the address is local to this host (`LocalAddresses`) in the listener's family. The
    server binds IPv6 wildcards with IPV6_V6ONLY, so [::]:1080 does not take IPv4.

    Args:
        listeners: (address, port) of every bound listener, plain and TLS.
        local: the host's local addresses.
    """

    __slots__ = ("_exact", "_local", "_ports", "_wildcards")

    def __init__(self, listeners: Iterable[tuple[str, int]], local: LocalAddresses) -> None:
        self._local = local
        self._exact: set[tuple[IPAddress, int]] = set()
        self._wildcards: set[tuple[int, int]] = set()  # (IP version, port)
        for host, port in listeners:
            address = _parse_address(host)
            if address is None:
                continue
            if address.is_unspecified:
                self._wildcards.add((address.version, port))
            else:
                self._exact.add((address, port))
        self._ports = frozenset(port for _, port in self._exact) | {port for _, port in self._wildcards}

    def find(self, address: str, port: int) -> str | None:
        """The listener (``"host:port"``) a connection to ``address``:``port`` would reach, or None."""
        if port not in self._ports:  # the common case: one set lookup
            return None
        parsed = _parse_address(address)
        if parsed is None:
            return None
        target = connect_target(parsed)
        if (target, port) in self._exact:
            return _format(target, port)
        if (target.version, port) in self._wildcards and target in self._local:
            return _format(ipaddress.ip_address("0.0.0.0" if target.version == 4 else "::"), port)
        return None


def _format(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
