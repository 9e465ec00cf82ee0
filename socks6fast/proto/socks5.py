"""SOCKS 5 codec (RFC 1928) and the username/password sub-negotiation (RFC 1929).

Strategy: the same shape as the SOCKS 6 codec (tests/codec_api.py). Stream decoders
are stateless and incremental: ``decode_x(data, offset=0)`` returns
``(message, consumed)`` once the whole message is in ``data[offset:]``, else
``(None, needed)`` where ``needed > 0`` is the smallest number of extra bytes that
could complete the message given the fields seen so far. An address not yet seen
counts 2 bytes (a one-character domain name: SOCKS 5 has no padding). The caller
buffers, so any split of the input gives the same result. Bytes after the message
are not looked at: they are the next message, pipelined data, or (for RFC 1929
inside a SOCKS 6 Authentication Data option) the NUL padding.

Errors are ``WireError`` only (a bad ``offset`` too: reply_code None, as in the
SOCKS 6 codec), raised as soon as the offending byte is present:
a wrong version byte (reply_code None: there is nobody to answer in SOCKS 5 terms),
an unknown CMD (COMMAND_NOT_SUPPORTED), an unknown ATYP (ADDRESS_TYPE_NOT_SUPPORTED),
and a malformed domain name (GENERAL_FAILURE) once all of it is present. SOCKS 5
reply codes 0x00-0x08 (RFC 1928 section 6) are SOCKS 6 ``ReplyCode`` 0x00-0x08.

We send the strict form and accept what real peers send:

* RSV bytes are sent as zero and ignored on input (RFC 1928 only says "reserved").
* A greeting with NMETHODS 0 decodes to an empty method list; the proxy then
  answers NO_ACCEPTABLE_METHODS instead of dropping the connection.
* ULEN and PLEN 0 are accepted on input: RFC 1929 says 1 to 255, but curl and
  others send PLEN 0 for an empty password (and ULEN 0 for an empty user). We
  never send them: the encoder refuses an empty username or password.
* Unassigned METHOD, REP and STATUS values decode to plain ints (known values to
  their enum member), so a client can still report them (e.g. Tor's 0xF0-0xF6).

Addresses use the conventions of ``socks6fast.proto.messages``: dotted quad for IPv4,
``str(ipaddress.IPv6Address)`` for IPv6, the name for domain names, and the
address type is kept. Credentials are bytes: RFC 1929 names no encoding.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from ..constants import (
    MAX_DOMAIN_LENGTH,
    MAX_SOCKS5_METHODS,
    MAX_USERPASS_LENGTH,
    SOCKS5_VERSION,
    USERPASS_VERSION,
    AddressType,
    AuthMethod,
    ReplyCode,
    Socks5Command,
    UserPassStatus,
)
from ..errors import LocalProtocolError, WireError

__all__ = [
    "Buffer",
    "Socks5Greeting",
    "Socks5MethodSelection",
    "Socks5Reply",
    "Socks5Request",
    "Socks5UDPHeader",
    "UserPassReply",
    "UserPassRequest",
    "decode_greeting",
    "decode_method_selection",
    "decode_reply",
    "decode_request",
    "decode_udp_header",
    "decode_userpass_reply",
    "decode_userpass_request",
    "encode_greeting",
    "encode_method_selection",
    "encode_reply",
    "encode_request",
    "encode_udp_header",
    "encode_userpass_reply",
    "encode_userpass_request",
]

Buffer = bytes | bytearray | memoryview


# --- Messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Socks5Greeting:
    """Version identifier / method selection message, client to proxy (RFC 1928 section 3)."""

    methods: tuple[AuthMethod | int, ...]
    """METHODS in wire order (``AuthMethod`` members where known)."""


@dataclass(frozen=True, slots=True)
class Socks5MethodSelection:
    """METHOD selection message, proxy to client (RFC 1928 section 3)."""

    method: AuthMethod | int
    """The selected method; ``AuthMethod.NO_ACCEPTABLE_METHODS`` (0xFF) means none."""


@dataclass(frozen=True, slots=True)
class Socks5Request:
    """SOCKS 5 request (RFC 1928 section 4)."""

    command: Socks5Command
    """CMD."""
    address_type: AddressType
    """ATYP of ``address``."""
    address: str
    """DST.ADDR: destination (CONNECT) or expected peer / client address (BIND, UDP ASSOCIATE)."""
    port: int
    """DST.PORT."""


@dataclass(frozen=True, slots=True)
class Socks5Reply:
    """SOCKS 5 reply (RFC 1928 section 6)."""

    reply_code: ReplyCode | int
    """REP: a ``ReplyCode`` for 0x00-0x08, a plain int for unassigned values."""
    address_type: AddressType
    """ATYP of ``address``."""
    address: str
    """BND.ADDR: bound address (or the connecting host in BIND's second reply)."""
    port: int
    """BND.PORT."""


@dataclass(frozen=True, slots=True)
class Socks5UDPHeader:
    """UDP request header in front of every relayed datagram (RFC 1928 section 7)."""

    address_type: AddressType
    """ATYP of ``address``."""
    address: str
    """DST.ADDR (client to proxy) or the source of the datagram (proxy to client)."""
    port: int
    """DST.PORT."""
    fragment: int = 0
    """FRAG: 0 is a standalone datagram; we do not reassemble, the caller drops others."""


@dataclass(frozen=True, slots=True)
class UserPassRequest:
    """RFC 1929 username/password request (also the data of a SOCKS 6 method 2 option)."""

    username: bytes
    """UNAME, 1-255 bytes (0 accepted on input although RFC 1929 says 1-255; never sent)."""
    password: bytes
    """PASSWD, 1-255 bytes (0 accepted on input: clients send it for an empty password; never sent)."""


@dataclass(frozen=True, slots=True)
class UserPassReply:
    """RFC 1929 username/password reply."""

    status: UserPassStatus | int
    """STATUS: ``UserPassStatus.SUCCESS`` (0) is success, any other value failure."""


# --- Wire layout -------------------------------------------------------------------

# Request, reply and UDP header all put ATYP at byte 3: VER CMD RSV / VER REP RSV /
# RSV RSV FRAG (RFC 1928 sections 4, 6, 7).
_ATYP_OFFSET = 3
_FRAG_OFFSET = 2
_PORT_LENGTH = 2
_IPV4_LENGTH = 4
_IPV6_LENGTH = 16
# ATYP + length byte + one character: the shortest address field.
_MIN_ADDRESS_FIELD = 3
_MIN_REQUEST_LENGTH = _ATYP_OFFSET + _MIN_ADDRESS_FIELD + _PORT_LENGTH
_GREETING_HEADER_LENGTH = 2  # VER NMETHODS
_METHOD_SELECTION_LENGTH = 2  # VER METHOD
_USERPASS_MIN_LENGTH = 3  # VER ULEN(0) PLEN(0)
_USERPASS_REPLY_LENGTH = 2  # VER STATUS
_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_RESERVED = 0

_ADDRESS_TYPES = {t.value: t for t in AddressType}
_COMMANDS = {c.value: c for c in Socks5Command}
_METHODS = {m.value: m for m in AuthMethod}
_STATUSES = {s.value: s for s in UserPassStatus}
# RFC 1928 section 6 assigns 0x00-0x08; SOCKS 6's 0x09 (Connection timed out) is
# unassigned in SOCKS 5, so it decodes to a plain int and is never sent.
_REPLY_CODES = {c.value: c for c in ReplyCode if c <= ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED}


# --- Decoding helpers --------------------------------------------------------------


def _available(data: Buffer, offset: int) -> int:
    # A caller bug, reported like the SOCKS 6 codec does (tests/codec_api.py).
    if not 0 <= offset <= len(data):
        raise WireError(f"offset {offset} is out of range", reply_code=None)
    return len(data) - offset


def _check_version(version: int, expected: int, what: str) -> None:
    if version != expected:
        # No reply applies: the peer does not speak this protocol (D14).
        raise WireError(f"{what}: version {version:#04x}, expected {expected:#04x}", reply_code=None)


def _address_end(data: Buffer, pos: int, end: int) -> int:
    """End of the ATYP + ADDR field starting at ``pos``; a lower bound while unknown."""
    if pos >= end:
        return pos + _MIN_ADDRESS_FIELD
    atyp = data[pos]
    if atyp == AddressType.IPV4:
        return pos + 1 + _IPV4_LENGTH
    if atyp == AddressType.IPV6:
        return pos + 1 + _IPV6_LENGTH
    if atyp == AddressType.DOMAIN_NAME:
        if pos + 1 >= end:
            return pos + _MIN_ADDRESS_FIELD
        length = data[pos + 1]
        if length == 0:
            raise WireError("empty domain name")
        return pos + 2 + length
    raise WireError(f"unknown address type {atyp:#04x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)


def _pull_address(data: Buffer, pos: int, end: int) -> tuple[AddressType, str]:
    """Decode the whole ATYP + ADDR field ``data[pos:end]`` checked by ``_address_end``."""
    atyp = _ADDRESS_TYPES[data[pos]]
    raw = bytes(data[pos + 1 : end])
    if atyp == AddressType.IPV4:
        return atyp, ".".join(map(str, raw))
    if atyp == AddressType.IPV6:
        return atyp, str(ipaddress.IPv6Address(raw))
    name = raw[1:]
    # RFC 1928 has no padding, so a NUL can only be garbage or an injection attempt.
    if b"\0" in name:
        raise WireError("NUL inside a domain name")
    try:
        return atyp, name.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("domain name is not UTF-8") from None


def _pull_port(data: Buffer, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _decode_addressed(data: Buffer, offset: int) -> tuple[AddressType, str, int, int] | int:
    """Address and port at ``offset + 3``: (type, address, port, consumed) or bytes needed."""
    end = len(data)
    addr_end = _address_end(data, offset + _ATYP_OFFSET, end)
    total = addr_end + _PORT_LENGTH - offset
    if total > end - offset:
        return total - (end - offset)
    atyp, address = _pull_address(data, offset + _ATYP_OFFSET, addr_end)
    return atyp, address, _pull_port(data, addr_end), total


# --- Encoding helpers --------------------------------------------------------------


def _check_int(value: object, maximum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{what} must be an int in 0..{maximum}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1024)
def _pack_ip(address_type: AddressType, address: str) -> bytes:
    """The 4 or 16 bytes of an IP literal, strictly parsed.

    Cached: a proxy answers every CONNECT with one of a handful of local addresses, and
    ``ipaddress`` parsing (about 2.4 us) was a visible share of a SOCKS 5 connection's
    CPU (benchmarks/RESULTS.md, "Per-connection CPU"). Errors are raised, never cached.
    """
    if address_type == AddressType.IPV4:
        return ipaddress.IPv4Address(address).packed
    ip6 = ipaddress.IPv6Address(address)
    if ip6.scope_id is not None:
        raise LocalProtocolError(f"a scope id cannot be sent: {address!r}")
    return ip6.packed


def _encode_address(address_type: AddressType, address: str, port: int) -> bytes:
    """ATYP + ADDR + PORT, validated."""
    _check_int(port, _U16_MAX, "port")
    if not isinstance(address, str):
        raise LocalProtocolError(f"address must be text, got {address!r}")
    try:
        if address_type == AddressType.IPV4 or address_type == AddressType.IPV6:
            packed = _pack_ip(address_type, address)
        elif address_type == AddressType.DOMAIN_NAME:
            name = address.encode("utf-8")
            if not 1 <= len(name) <= MAX_DOMAIN_LENGTH or b"\0" in name:
                raise LocalProtocolError(f"domain name must be 1-255 bytes without NUL: {address!r}")
            packed = bytes((len(name),)) + name
        else:
            raise LocalProtocolError(f"unknown address type {address_type!r}")
    except (ValueError, UnicodeEncodeError) as exc:  # ipaddress, lone surrogates
        raise LocalProtocolError(f"bad {address_type!r} address {address!r}: {exc}") from None
    return bytes((address_type,)) + packed + port.to_bytes(_PORT_LENGTH, "big")


# --- Greeting and method selection (RFC 1928 section 3) ----------------------------


def decode_greeting(data: Buffer, offset: int = 0) -> tuple[Socks5Greeting | None, int]:
    """Decode a greeting (VER NMETHODS METHODS) sent by a client.

    Args:
        data: received bytes; decoding starts at ``offset``.
        offset: where the greeting starts.

    Returns:
        ``(greeting, consumed)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 5 (reply_code None).
    """
    available = _available(data, offset)
    if available >= 1:
        _check_version(data[offset], SOCKS5_VERSION, "greeting")
    if available < _GREETING_HEADER_LENGTH:
        return None, _GREETING_HEADER_LENGTH - available
    total = _GREETING_HEADER_LENGTH + data[offset + 1]
    if available < total:
        return None, total - available
    methods = tuple(_METHODS.get(m, m) for m in data[offset + _GREETING_HEADER_LENGTH : offset + total])
    return Socks5Greeting(methods), total


def encode_greeting(greeting: Socks5Greeting) -> bytes:
    """Encode a greeting; 1 to 255 methods, each 0-255.

    Raises:
        LocalProtocolError: no methods, too many, or a value out of range.
    """
    methods = greeting.methods
    if not 1 <= len(methods) <= MAX_SOCKS5_METHODS:
        raise LocalProtocolError(f"a greeting lists 1-255 methods, got {len(methods)}")
    return bytes((SOCKS5_VERSION, len(methods), *(_check_int(m, _U8_MAX, "method") for m in methods)))


def decode_method_selection(data: Buffer, offset: int = 0) -> tuple[Socks5MethodSelection | None, int]:
    """Decode the proxy's METHOD selection (VER METHOD).

    Returns:
        ``(selection, 2)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 5 (reply_code None).
    """
    available = _available(data, offset)
    if available >= 1:
        _check_version(data[offset], SOCKS5_VERSION, "method selection")
    if available < _METHOD_SELECTION_LENGTH:
        return None, _METHOD_SELECTION_LENGTH - available
    method = data[offset + 1]
    return Socks5MethodSelection(_METHODS.get(method, method)), _METHOD_SELECTION_LENGTH


def encode_method_selection(selection: Socks5MethodSelection) -> bytes:
    """Encode a METHOD selection.

    Raises:
        LocalProtocolError: the method is not 0-255.
    """
    return bytes((SOCKS5_VERSION, _check_int(selection.method, _U8_MAX, "method")))


# --- Requests and replies (RFC 1928 sections 4-6) ----------------------------------


def decode_request(data: Buffer, offset: int = 0) -> tuple[Socks5Request | None, int]:
    """Decode a request (VER CMD RSV ATYP DST.ADDR DST.PORT); RSV is ignored.

    Returns:
        ``(request, consumed)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 5 (reply_code None), unknown CMD
            (COMMAND_NOT_SUPPORTED), unknown ATYP (ADDRESS_TYPE_NOT_SUPPORTED),
            malformed domain name (GENERAL_FAILURE).
    """
    available = _available(data, offset)
    if available == 0:
        return None, _MIN_REQUEST_LENGTH
    _check_version(data[offset], SOCKS5_VERSION, "request")
    command = None
    if available >= 2:
        command = _COMMANDS.get(data[offset + 1])
        if command is None:
            raise WireError(f"unknown command {data[offset + 1]:#04x}", ReplyCode.COMMAND_NOT_SUPPORTED)
    result = _decode_addressed(data, offset)
    if isinstance(result, int):
        return None, result
    assert command is not None  # the whole request is present
    atyp, address, port, consumed = result
    return Socks5Request(command, atyp, address, port), consumed


def encode_request(request: Socks5Request) -> bytes:
    """Encode a request.

    Raises:
        LocalProtocolError: unknown command, bad address for its type, bad port.
    """
    if _check_int(request.command, _U8_MAX, "command") not in _COMMANDS:
        raise LocalProtocolError(f"not a SOCKS 5 command: {request.command!r}")
    tail = _encode_address(request.address_type, request.address, request.port)
    return bytes((SOCKS5_VERSION, request.command, _RESERVED)) + tail


def decode_reply(data: Buffer, offset: int = 0) -> tuple[Socks5Reply | None, int]:
    """Decode a reply (VER REP RSV ATYP BND.ADDR BND.PORT); RSV is ignored.

    Returns:
        ``(reply, consumed)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 5 (reply_code None), unknown ATYP
            (ADDRESS_TYPE_NOT_SUPPORTED), malformed domain name (GENERAL_FAILURE).
    """
    available = _available(data, offset)
    if available == 0:
        return None, _MIN_REQUEST_LENGTH
    _check_version(data[offset], SOCKS5_VERSION, "reply")
    result = _decode_addressed(data, offset)
    if isinstance(result, int):
        return None, result
    atyp, address, port, consumed = result
    code = data[offset + 1]
    return Socks5Reply(_REPLY_CODES.get(code, code), atyp, address, port), consumed


def encode_reply(reply: Socks5Reply) -> bytes:
    """Encode a reply; REP must be one RFC 1928 defines (0x00-0x08).

    Raises:
        LocalProtocolError: REP outside 0x00-0x08 (map SOCKS 6's CONNECTION_TIMED_OUT
            first), bad address for its type, bad port.
    """
    if _check_int(reply.reply_code, _U8_MAX, "reply code") not in _REPLY_CODES:
        raise LocalProtocolError(f"not a SOCKS 5 reply code: {reply.reply_code!r}")
    tail = _encode_address(reply.address_type, reply.address, reply.port)
    return bytes((SOCKS5_VERSION, reply.reply_code, _RESERVED)) + tail


# --- UDP request header (RFC 1928 section 7) ---------------------------------------


def decode_udp_header(data: Buffer, offset: int = 0) -> tuple[Socks5UDPHeader, int]:
    """Decode the header of a whole datagram (RSV RSV FRAG ATYP DST.ADDR DST.PORT).

    RSV is ignored; FRAG is returned as is (the caller drops FRAG != 0: we do not
    reassemble, which RFC 1928 section 7 allows).

    Returns:
        ``(header, header_length)``; the payload starts at ``offset + header_length``.

    Raises:
        WireError: truncated header, unknown ATYP (ADDRESS_TYPE_NOT_SUPPORTED),
            malformed domain name. The caller drops the datagram.
    """
    available = _available(data, offset)
    result = _decode_addressed(data, offset)
    if isinstance(result, int):
        raise WireError(f"truncated UDP header: {available} bytes")
    atyp, address, port, consumed = result
    return Socks5UDPHeader(atyp, address, port, data[offset + _FRAG_OFFSET]), consumed


def encode_udp_header(header: Socks5UDPHeader) -> bytes:
    """Encode a UDP request header; the caller appends the payload.

    Raises:
        LocalProtocolError: FRAG outside 0-255, bad address for its type, bad port.
    """
    fragment = _check_int(header.fragment, _U8_MAX, "fragment")
    tail = _encode_address(header.address_type, header.address, header.port)
    return bytes((_RESERVED, _RESERVED, fragment)) + tail


# --- Username/password (RFC 1929; draft-11 "Username/Password Authentication") -----


def decode_userpass_request(data: Buffer, offset: int = 0) -> tuple[UserPassRequest | None, int]:
    """Decode an RFC 1929 request (VER ULEN UNAME PLEN PASSWD).

    Bytes after the request are left alone: inside a SOCKS 6 Authentication Data
    option (method 2) it is followed by NUL padding, which the proxy ignores.

    Returns:
        ``(request, consumed)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 1 (reply_code None).
    """
    available = _available(data, offset)
    if available == 0:
        return None, _USERPASS_MIN_LENGTH
    _check_version(data[offset], USERPASS_VERSION, "username/password request")
    if available < 2:
        return None, _USERPASS_MIN_LENGTH - available
    plen_pos = offset + 2 + data[offset + 1]
    if plen_pos >= len(data):
        return None, plen_pos + 1 - len(data)
    end = plen_pos + 1 + data[plen_pos]
    if end > len(data):
        return None, end - len(data)
    username = bytes(data[offset + 2 : plen_pos])
    password = bytes(data[plen_pos + 1 : end])
    return UserPassRequest(username, password), end - offset


def encode_userpass_request(request: UserPassRequest) -> bytes:
    """Encode an RFC 1929 request (no padding: the SOCKS 6 option encoder adds it).

    Raises:
        LocalProtocolError: username or password not bytes, empty, or over 255
            bytes (RFC 1929: ULEN and PLEN are 1 to 255).
    """
    out = bytearray((USERPASS_VERSION,))
    for what, value in (("username", request.username), ("password", request.password)):
        if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_USERPASS_LENGTH:
            raise LocalProtocolError(f"{what} must be bytes of length 1-255")
        out.append(len(value))
        out += value
    return bytes(out)


def decode_userpass_reply(data: Buffer, offset: int = 0) -> tuple[UserPassReply | None, int]:
    """Decode an RFC 1929 reply (VER STATUS); trailing bytes (padding) are left alone.

    Returns:
        ``(reply, 2)``, or ``(None, needed)`` while incomplete.

    Raises:
        WireError: VER is not 1 (reply_code None).
    """
    available = _available(data, offset)
    if available >= 1:
        _check_version(data[offset], USERPASS_VERSION, "username/password reply")
    if available < _USERPASS_REPLY_LENGTH:
        return None, _USERPASS_REPLY_LENGTH - available
    status = data[offset + 1]
    return UserPassReply(_STATUSES.get(status, status)), _USERPASS_REPLY_LENGTH


def encode_userpass_reply(reply: UserPassReply) -> bytes:
    """Encode an RFC 1929 reply.

    Raises:
        LocalProtocolError: STATUS outside 0-255.
    """
    return bytes((USERPASS_VERSION, _check_int(reply.status, _U8_MAX, "status")))
