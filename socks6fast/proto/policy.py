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
* ``destinations``: CIDR networks for IP destinations, and `DomainPattern` objects for
  domain-name destinations: ``.example.com`` matches ``example.com`` and every name below it,
  ``example.com`` matches that name only, both case-insensitively and ignoring one trailing
  dot. A CIDR entry never matches a domain name, and a name entry never matches an IP
  address: the proxy has not resolved the name when it first checks the request.
* ``ports``: inclusive ranges of destination ports.

Resolved names: a rule such as ``deny 10.0.0.0/8`` would not stop ``CONNECT internal.corp``
(or ``CONNECT`` to the *name* ``"10.0.0.1"``) on its own, because CIDR entries do not match
names. When `Policy.checks_resolved_addresses` is True, the server therefore checks a
domain-name request twice: once as received (to refuse early without resolving), and again
for each address the name resolved to, passing ``resolved_address``; then CIDR entries match
that address while name entries still match the name. It connects only to addresses that
pass. IPv4-mapped IPv6 destinations are matched as IPv4 for the same reason (a dual-stack
socket connecting to ``::ffff:10.0.0.1`` reaches ``10.0.0.1``).

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
    "DomainPattern",
    "IPNetwork",
    "Policy",
    "Rule",
    "parse_command",
    "parse_destination",
    "parse_network",
    "parse_port_range",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: User pattern matching every authenticated user.
AUTHENTICATED = "@authenticated"
#: User pattern matching clients that did not authenticate.
ANONYMOUS = "@anonymous"
#: Command names as written in rules (lower case).
COMMAND_NAMES: dict[str, Command] = {
    "noop": Command.NOOP,
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp_associate": Command.UDP_ASSOCIATE,
}
_MAX_NAME_LENGTH = 253  # a DNS name in text form, without the trailing dot
_MAX_PORT = 65535


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
    destinations: tuple[IPNetwork | DomainPattern, ...] | None = None
    """Destination networks and domain patterns; None for any destination."""
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


def parse_destination(text: str) -> IPNetwork | DomainPattern:
    """Parse one destination entry: a CIDR network or address, ``.example.com`` or ``example.com``.

    ``"*"`` (any destination) is handled by the caller: it means the condition is None.

    Raises:
        ValueError: the entry is neither a network nor a valid domain name.
    """
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


def _parse_address(text: str) -> _IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_networks(address: _IPAddress, networks: Iterable[IPNetwork | DomainPattern]) -> bool:
    # `address in net` is False (not an error) across IP versions and for DomainPattern entries
    # we filter by type first.
    for net in networks:
        if not isinstance(net, DomainPattern) and address in net:
            return True
    return False


class Policy:
    """An ordered ruleset with a default action; first match wins."""

    __slots__ = ("_any_clients", "checks_resolved_addresses", "default_allow", "rules")

    def __init__(self, rules: Sequence[Rule] = (), *, default_allow: bool = True) -> None:
        """Create a policy.

        Args:
            rules: the rules, in order; the first that matches decides.
            default_allow: the decision when no rule matches (and when there are no rules).
        """
        self.rules = tuple(rules)
        """The rules in order."""
        self.default_allow = default_allow
        """The decision when no rule matches."""
        self.checks_resolved_addresses = any(
            rule.destinations is not None and any(not isinstance(d, DomainPattern) for d in rule.destinations)
            for rule in self.rules
        )
        """True when some rule has a CIDR destination: domain-name requests must then be
        checked again with each resolved address (see the module docstring)."""
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
    ) -> bool:
        """Decide whether a request is allowed: ``decide(...)[0]``."""
        return self.decide(
            client_ip, user, command, dest_address_type, dest_address, dest_port, resolved_address
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
    ) -> tuple[bool, int | None]:
        """Decide whether a request is allowed, and say which rule decided.

        Args:
            client_ip: the client's address as text (IPv4-mapped IPv6 is unmapped).
            user: the authenticated user (or the session's user), None when anonymous.
            command: the request's command.
            dest_address_type: the request's address type.
            dest_address: the request's address as text (see `socks6fast.proto.messages`).
            dest_port: the request's port.
            resolved_address: for a domain-name destination, one address the name resolved
                to; CIDR destination entries are then matched against it.

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
        dest_ip: _IPAddress | None = None
        if dest_address_type == AddressType.DOMAIN_NAME:
            name = dest_address.lower().removesuffix(".")
            if resolved_address is not None:
                dest_ip = _parse_address(resolved_address)
        else:
            dest_ip = _parse_address(dest_address)
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
            if rule.clients is not None and (client is None or not _in_networks(client, rule.clients)):
                continue
            if rule.destinations is not None:
                matched = False
                if name is not None:
                    matched = any(isinstance(d, DomainPattern) and d.matches(name) for d in rule.destinations)
                if not matched and dest_ip is not None:
                    matched = _in_networks(dest_ip, rule.destinations)
                if not matched:
                    continue
            return rule.allow, index
        return self.default_allow, None
