"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO.

A load balancer in TCP mode (HAProxy ``send-proxy`` / ``send-proxy-v2``) opens its own
connection to the proxy, so the proxy sees the balancer's address. The balancer writes one
header in front of the client's bytes naming the real client; a listener configured for it
reads that header before anything else (before the SOCKS version byte, and before the TLS
ClientHello on a TLS listener) and uses the address it names as the client's, for the rules,
the limits, the UDP ASSOCIATE source checks, the sessions and the log.

Strategy: `parse_proxy_header` takes the bytes received so far and returns a `ProxyHeader`
(with the header's length, so the caller knows exactly how many bytes to consume), None while
the bytes are a valid beginning of a header, or raises `ProxyHeaderError`. It never needs more
than `MAX_V1_LENGTH` (version 1) or `MAX_V2_LENGTH` (version 2) bytes, so a caller that reads
at most that much is bounded. `ProxyTrust` says which peers may send a header at all (section
5, "Security considerations": accept the header only from known sources). Nothing here reads
a socket or a clock.

Section numbers below are those of proxy-protocol.txt (HAProxy 2.6, Debian's
/usr/share/doc/haproxy/proxy-protocol.txt.gz).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ProxyHeaderError
from .policy import IPNetwork

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyTrust",
    "parse_proxy_header",
]

#: Section 2.1: a version 1 header starts with these six bytes ("PROXY" and one space).
V1_PREFIX = b"PROXY "
#: Section 2.1: the longest version 1 line, CRLF included ("PROXY UNKNOWN" with two full
#: IPv6 addresses and ports); no CRLF within it makes the line invalid.
MAX_V1_LENGTH = 107
#: Section 2.2: the 12-byte signature of version 2 (it contains a NUL at the 5th byte).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Section 2.2: signature, version/command, family/protocol, 16-bit length.
V2_FIXED_LENGTH = 16
#: Our cap on a whole version 2 header (the 16 bytes and the address block with its TLVs).
#: The draft allows 16 + 65535; what HAProxy sends (addresses, and TLVs such as SSL, ALPN,
#: AUTHORITY or UNIQUE_ID of at most a few hundred bytes) fits well within 4 KiB, and section
#: 2 designs headers to fit in 536 bytes. Larger is refused rather than buffered.
MAX_V2_LENGTH = 4096

_V2_VERSION = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
#: Address block sizes of section 2.2 (two addresses and two ports).
_INET_BLOCK = 12
_INET6_BLOCK = 36
_UNIX_BLOCK = 216


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY protocol header."""

    version: int
    """1 (text) or 2 (binary)."""
    length: int
    """Bytes the header occupies at the start of the connection (consume exactly these)."""
    source: tuple[str, int] | None
    """The real client's address and port; None when the header names none the proxy can use
    (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC or AF_UNIX): the connection's own peer applies then."""
    destination: tuple[str, int] | None
    """The address and port the client connected to (the balancer's frontend), when named."""
    local: bool = False
    """v2 LOCAL command: the balancer's own connection, such as a health check (section 2.2)."""


class ProxyTrust:
    """The peers a PROXY protocol listener accepts connections from (its load balancers).

    Section 2: the receiver "MUST not try to guess whether the protocol header is present",
    and section 5: accept it "only from a number of known sources". A listener with the
    PROXY protocol therefore serves only these peers, each of which must send a header.
    ``networks`` may be replaced on reload (the listener keeps this object).

    Args:
        networks: the trusted networks (IPv4-mapped IPv6 ones already unmapped, as
            `socks6fast.proto.policy.parse_network` returns them).
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(networks)

    def trusts(self, host: str) -> bool:
        """Whether the peer ``host`` (an IP address as text) may send a PROXY header."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        # `address in net` is False (not an error) across IP versions.
        return any(address in net for net in self.networks)


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY protocol header at the start of ``data`` (the bytes received so far).

    Both versions are recognised by their first bytes (section 2.2: v2's signature, v1's
    "PROXY"); bytes after the header are not looked at.

    Args:
        data: the connection's first bytes, at least the bytes of a previous call.

    Returns:
        The header, or None when ``data`` is a valid beginning of one and more bytes are
        needed.

    Raises:
        ProxyHeaderError: ``data`` does not start with a valid header (another protocol, a
            malformed or unsupported one), or the header is longer than `MAX_V1_LENGTH` /
            `MAX_V2_LENGTH`.
    """
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderError(f"no PROXY header: the connection starts with {_show_start(data)}")


def _show_start(data: bytes) -> str:
    # A misconfigured balancer (no send-proxy) passes the client's own bytes: name them.
    first = data[:8].hex(" ")
    if data[0] == 0x05:
        return f"{first} (SOCKS 5, not a PROXY header)"
    if data[0] == 0x06:
        return f"{first} (SOCKS 6, not a PROXY header)"
    if data[0] == 0x16:
        return f"{first} (a TLS ClientHello, not a PROXY header)"
    return first


# --- version 1 (section 2.1) ------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyHeaderError(f"no PROXY header: the connection starts with {_show_start(data)}")
    window = data[:MAX_V1_LENGTH]
    end = window.find(b"\r\n")
    # "The receiver must not tolerate a single CR or LF character to end the line": a bare
    # LF, or a CR followed by anything but LF, is malformed at once (no waiting for more).
    cr = window.find(b"\r")
    if cr != -1 and cr + 1 < len(window) and cr != end:
        raise ProxyHeaderError("PROXY v1 line contains a CR not followed by LF")
    lf = window.find(b"\n")
    if lf != -1 and (end == -1 or lf < end + 1):
        raise ProxyHeaderError("PROXY v1 line ends with a bare LF, not CRLF")
    if end == -1:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line has no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    line = window[:end]
    if not line.isascii():
        raise ProxyHeaderError("PROXY v1 line is not US-ASCII")
    fields = line.decode("ascii").split(" ")
    length = end + 2
    if len(fields) < 2:
        raise ProxyHeaderError("PROXY v1 line names no protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found", and use the
        # connection's own endpoints.
        return ProxyHeader(1, length, None, None)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol {protocol[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        # Exactly one space between the six fields: an extra one yields an empty field.
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    version = 4 if protocol == "TCP4" else 6
    source = _v1_address(fields[2], version, "source")
    destination = _v1_address(fields[3], version, "destination")
    return ProxyHeader(
        1,
        length,
        (source, _v1_port(fields[4], "source")),
        (destination, _v1_port(fields[5], "destination")),
    )


def _v1_address(text: str, version: int, which: str) -> str:
    # ipaddress rejects IPv4 numbers with leading zeros, as section 2.1 requires ("Heading
    # zeroes are not permitted"); a scope ("%eth0") is no part of the canonical format.
    try:
        if "%" in text:
            raise ValueError
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 {which} {text[:45]!r} is not an IPv{version} address") from None
    return _client_text(address)


def _v1_port(text: str, which: str) -> int:
    # Decimal 0-65535, "Heading zeroes are not permitted".
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 {which} port {text[:8]!r} is not 0-65535 without leading zeros")
    return int(text)


# --- version 2 (section 2.2) ------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyHeaderError(f"no PROXY header: the connection starts with {_show_start(data)}")
    if len(data) > 12:
        # Checked as soon as the byte is there: a wrong version need not wait for more.
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != _V2_VERSION:
            raise ProxyHeaderError(f"PROXY v2 header has version {version}, not 2")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyHeaderError(f"PROXY v2 command {command:#x} is not LOCAL or PROXY")
    if len(data) > 13:
        family, protocol = data[13] >> 4, data[13] & 0x0F
        # "other values are unspecified ... and must be rejected as invalid by receivers"
        if family > _AF_UNIX:
            raise ProxyHeaderError(f"PROXY v2 address family {family:#x} is unknown")
        if protocol > _PROTO_DGRAM:
            raise ProxyHeaderError(f"PROXY v2 transport protocol {protocol:#x} is unknown")
    if len(data) < V2_FIXED_LENGTH:
        return None
    length = V2_FIXED_LENGTH + int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes is longer than {MAX_V2_LENGTH}")
    if len(data) < length:
        return None  # "The receiver must not start to parse an address before the whole
        # address block is received."
    command, family, protocol = data[12] & 0x0F, data[13] >> 4, data[13] & 0x0F
    block = data[V2_FIXED_LENGTH:length]
    if command == _CMD_LOCAL:
        # "The receiver must accept this connection as valid and must use the real connection
        # endpoints and discard the protocol block including the family" (the length still
        # counts: "must not assume zero is presented for LOCAL connections").
        return ProxyHeader(2, length, None, None, local=True)
    needed = {_AF_INET: _INET_BLOCK, _AF_INET6: _INET6_BLOCK, _AF_UNIX: _UNIX_BLOCK}.get(family, 0)
    if len(block) < needed:
        raise ProxyHeaderError(
            f"PROXY v2 address block of {len(block)} bytes is shorter than {needed} for its family"
        )
    if family in (_AF_UNSPEC, _AF_UNIX) or protocol == _PROTO_UNSPEC:
        # UNSPEC: "The receiver should ignore address information"; a UNIX path is no client
        # address the rules could match. The connection's own peer applies.
        return ProxyHeader(2, length, None, None)
    # TCP or UDP over IPv4/IPv6; what follows the addresses (TLVs, section 2.2) is skipped.
    size = 4 if family == _AF_INET else 16
    cls = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    source = _client_text(cls(block[:size]))
    destination = _client_text(cls(block[size : 2 * size]))
    ports = block[2 * size : 2 * size + 4]
    return ProxyHeader(
        2,
        length,
        (source, int.from_bytes(ports[:2], "big")),
        (destination, int.from_bytes(ports[2:], "big")),
    )


def _client_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4-mapped IPv6 source is the IPv4 client a dual-stack balancer accepted: written
    # as IPv4, so that limits and sessions keyed on the address text count it once, the way
    # a direct IPv4 client is counted (the proxy's own listeners are IPV6_V6ONLY).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
