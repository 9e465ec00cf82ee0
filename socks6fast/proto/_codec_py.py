"""Pure-Python REFERENCE codec for SOCKS 6 (draft-olteanu-intarea-socks-6-11).

Strategy: this module is the truth. The Cython twin ``_codec_c`` must return
equal objects and raise the same exception class, ``reply_code`` and message
text for every input; tests/codec_api.py is the written contract and
tests/test_codec.py checks both twins against the same vectors.

Stream decoders are stateless and incremental (h11 ``_readers``): each call
re-reads the message from ``offset`` and either returns ``(message, consumed)``
or ``(None, needed)``. Checks run in wire order, each as soon as the byte it
needs is available, so a peer sending garbage one byte at a time is rejected
at the same byte as a peer sending it whole (REQ-07), and an oversized Options
Length is rejected before a single option byte is buffered (REQ-03, D6).

Addresses follow docs/decisions.md D2 everywhere (the Datagram Header included): a
domain name is sent with its unpadded length and padded with NULs so the whole
field is a multiple of 4; on receipt the trailing NULs of the ``len`` bytes are
stripped and the padding up to the next 4-byte boundary of the field must be
NULs ("skip NULs"), so a peer that does not pad gets an error instead of
silently losing the first payload bytes.

Options are checked against the message that carries them (REQ-06): a known
kind in a message where draft-11 does not place it is kept opaque as an
``UnknownOption``, without any check, so the caller ignores it. Stack options
with a value draft-11 does not define are unsupported, not malformed: they
decode as ``UnknownStackOption``.

Encoders validate every field and raise ``LocalProtocolError`` for anything
draft-11 forbids; decoders raise ``WireError`` and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Mapping, Sequence

from ..constants import (
    ASSOCIATION_ID_LENGTH,
    ASSOCIATION_MESSAGE_LENGTH,
    MAX_DOMAIN_LENGTH,
    MAX_INITIAL_DATA_LENGTH,
    MAX_OPTIONS_LENGTH,
    MAX_WINDOW_SIZE,
    OPTION_HEADER_LENGTH,
    STACK_OPTION_LENGTH,
    VERSION,
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    OptionKind,
    Parity,
    ReplyCode,
    StackCode,
    StackLeg,
    UDPMessageType,
)
from ..errors import LocalProtocolError, WireError
from ._wire_py import Writer
from .messages import (
    AssociationConfirmation,
    AssociationInit,
    AssociationMessage,
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    Datagram,
    DatagramError,
    DatagramHeader,
    HappyEyeballsOption,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    NoFragmentationOption,
    OperationReply,
    Option,
    PortParityOption,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    SessionRequest,
    SessionTeardown,
    TFOOption,
    TTLOption,
    UDPErrorOption,
    UnknownOption,
    UnknownStackOption,
)

__all__ = [
    "datagram_header_length",
    "decode_association_message",
    "decode_auth_reply",
    "decode_datagram_header",
    "decode_operation_reply",
    "decode_options",
    "decode_request",
    "encode_association_message",
    "encode_auth_reply",
    "encode_datagram_header",
    "encode_operation_reply",
    "encode_options",
    "encode_request",
    "encode_version_mismatch",
]

Buffer = bytes | bytearray | memoryview

# --- Fixed sizes of the draft's figures ----------------------------------------
# Request / Operation Reply: Version, Code, Options Length, Port, Padding, ATYP.
_ADDRESSED_HEADER_LENGTH = 8
# Authentication Reply: Version, Type, Options Length.
_AUTH_REPLY_HEADER_LENGTH = 4
# UDP Association Header prefix: Version, Message Type, Message Length.
_ASSOC_PREFIX_LENGTH = 4
# Association Header (prefix + Association ID) and the Datagram Header's
# ATYP, Padding, Port that follow it; the address starts at offset 16.
_ASSOC_HEADER_LENGTH = _ASSOC_PREFIX_LENGTH + ASSOCIATION_ID_LENGTH
_DGRAM_ADDRESS_OFFSET = _ASSOC_HEADER_LENGTH + 4
# Datagram Error: Reporter ATYP, Error Code, Padding before the reporter address.
_REPORTER_PREFIX_LENGTH = 4
# The smallest address field: an IPv4 address, or a 1-byte name with D2 padding.
_MIN_ADDRESS_FIELD_LENGTH = 4
_IPV4_LENGTH = 4
_IPV6_LENGTH = 16
_MIN_DGRAM_HEADER_LENGTH = _DGRAM_ADDRESS_OFFSET + _MIN_ADDRESS_FIELD_LENGTH
_MIN_DGRAM_ERROR_LENGTH = _DGRAM_ADDRESS_OFFSET + _IPV4_LENGTH + _REPORTER_PREFIX_LENGTH + _IPV4_LENGTH

# Fixed or minimum option lengths (section "SOCKS Options" and its subsections).
_EMPTY_OPTION_LENGTH = OPTION_HEADER_LENGTH  # Session Request/OK/Invalid/Teardown, Accepted/Rejected
_U32_OPTION_LENGTH = 8  # Token Request, Idempotence Expenditure (D3)
_WINDOW_OPTION_LENGTH = 12
_METHOD_SELECTION_LENGTH = 8
# Advertisement (2-byte Initial Data Length), Authentication Data (1-byte Method)
# and Session ID (non-empty) all need at least one 4-byte word of data.
_MIN_DATA_OPTION_LENGTH = 8
_MAX_OPTION_LENGTH = 0xFFFF
_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_STACK_LEVEL_MASK = 0x3F
_STACK_LEG_SHIFT = 6
_STACK_LEVEL_MAX = _STACK_LEVEL_MASK
_STACK_LEG_MAX = 3

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">HH")
_ADDRESSED_HEADER = struct.Struct(">BBHHBB")
_AUTH_REPLY_HEADER = struct.Struct(">BBH")
_ASSOC_PREFIX = struct.Struct(">BBH")

# Lookup tables: wire byte -> enum member (faster than calling the enum).
_COMMANDS = {c.value: c for c in Command}
_REPLY_CODES = {c.value: c for c in ReplyCode}
_AUTH_REPLY_TYPES = {t.value: t for t in AuthReplyType}
_ADDRESS_TYPES = {a.value: a for a in AddressType}
_STACK_LEGS = {leg.value: leg for leg in StackLeg}
_AVAILABILITY = {a.value: a for a in Availability}
_PARITIES = {p.value: p for p in Parity}
_DGRAM_ERROR_CODES = {c.value: c for c in DatagramErrorCode}
_KNOWN_STACK_CODES = frozenset(c.value for c in StackCode)
_KNOWN_KINDS = frozenset(k.value for k in OptionKind)
# Datagram Error addresses: "Either 0x01 (IPv4) or 0x04 (IPv6)".
_IP_ADDRESS_TYPES = {a.value: a for a in (AddressType.IPV4, AddressType.IPV6)}
# Stack options whose figures fix Leg = 2 (proxy-remote): Happy Eyeballs, TFO,
# Multipath, Listen Backlog, UDP Error, Port Parity.
_AVAILABILITY_CODES = frozenset(
    (StackCode.HAPPY_EYEBALLS, StackCode.NO_FRAGMENTATION, StackCode.MULTIPATH, StackCode.UDP_ERROR)
)

# Where draft-11 places each known option (REQ-06): anything else in that message
# is ignored, i.e. decoded as an opaque UnknownOption. Stack: "Clients can only
# place Stack options inside SOCKS Requests", proxies in Operation Replies.
# Authentication: advertisement and data from the client, selection and data
# from the proxy (section "Authentication"). Session options: "placed in
# Requests and Authentication Replies", plus the Session ID in the Operation
# Reply (D4; clients accept it in the Authentication Reply too). Idempotence:
# request and expenditure from the client, window/accepted/rejected in
# Authentication Replies.
_REQUEST_KINDS = frozenset(
    (
        OptionKind.STACK,
        OptionKind.AUTH_METHOD_ADVERTISEMENT,
        OptionKind.AUTH_DATA,
        OptionKind.SESSION_REQUEST,
        OptionKind.SESSION_ID,
        OptionKind.SESSION_TEARDOWN,
        OptionKind.IDEMPOTENCE_REQUEST,
        OptionKind.IDEMPOTENCE_EXPENDITURE,
    )
)
_AUTH_REPLY_KINDS = frozenset(
    (
        OptionKind.AUTH_METHOD_SELECTION,
        OptionKind.AUTH_DATA,
        OptionKind.SESSION_OK,
        OptionKind.SESSION_INVALID,
        OptionKind.SESSION_ID,
        OptionKind.IDEMPOTENCE_WINDOW,
        OptionKind.IDEMPOTENCE_ACCEPTED,
        OptionKind.IDEMPOTENCE_REJECTED,
    )
)
_OPERATION_REPLY_KINDS = frozenset((OptionKind.STACK, OptionKind.SESSION_ID))

_NUL = b"\x00"
_VERSION_MISMATCH = bytes([VERSION])


def _pad4(n: int) -> int:
    """Round ``n`` up to a multiple of 4 (every SOCKS 6 field is 4-byte aligned)."""
    return (n + 3) & ~3


def _view(data: Buffer, offset: int) -> memoryview:
    # A non-buffer raises TypeError here (a caller bug, as in the twin).
    view = memoryview(data)
    if not view.c_contiguous:
        raise WireError("data is not a contiguous buffer", None)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if not 0 <= offset <= len(view):
        raise WireError(f"offset {offset} is out of range", None)
    return view


# =================================================================================
# Decoding
# =================================================================================


def _check_version(version: int) -> None:
    # Section "Version Mismatch Replies": anything but 6 gets no Operation Reply.
    if version != VERSION:
        raise WireError(f"version {version} is not 6", None)


def _check_options_length(options_length: int, max_options_length: int) -> None:
    # D6 / REQ-03: refuse before buffering the options. Every option is a
    # multiple of 4 long (section "SOCKS Options"), so their sum must be too.
    if options_length > max_options_length:
        raise WireError(f"options length {options_length} exceeds {max_options_length}")
    if options_length & 3:
        raise WireError(f"options length {options_length} is not a multiple of 4")


def _address_type(atyp: int) -> AddressType:
    address_type = _ADDRESS_TYPES.get(atyp)
    if address_type is None:
        raise WireError(f"address type {atyp} is not supported", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
    return address_type


def _decode_name(view: memoryview, pos: int) -> str:
    """Decode the whole name field at ``pos`` (length byte, name, padding; already present)."""
    # D2: strip trailing NULs (draft-12 counts padding in the length byte);
    # anything left that is empty or holds a NUL is malformed. Then "skip NULs
    # up to the next 4-byte boundary": a non-NUL there is malformed too (a peer
    # that does not pad would otherwise lose its first payload bytes unnoticed).
    name_length = view[pos]
    end = pos + 1 + name_length
    raw = bytes(view[pos + 1 : end]).rstrip(_NUL)
    if not raw:
        raise WireError("domain name is empty")
    if _NUL in raw:
        raise WireError("domain name contains a nul byte")
    if any(view[end : pos + _pad4(1 + name_length)]):
        raise WireError("domain name padding is not zero")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("domain name is not valid utf-8") from None


def _decode_ip(view: memoryview, pos: int, atyp: int) -> str:
    if atyp == AddressType.IPV4:
        return ".".join(map(str, view[pos : pos + _IPV4_LENGTH]))
    return str(ipaddress.IPv6Address(bytes(view[pos : pos + _IPV6_LENGTH])))


def _decode_address(view: memoryview, pos: int, atyp: int) -> str:
    """Decode a complete address field starting at ``pos`` (its length already checked)."""
    if atyp == AddressType.DOMAIN_NAME:
        return _decode_name(view, pos)
    return _decode_ip(view, pos, atyp)


# --- Options (section "SOCKS Options") -----------------------------------------


def _expect_length(kind: int, length: int, expected: int) -> None:
    if length != expected:
        raise WireError(f"option kind {kind} has length {length}, expected {expected}")


def _expect_min_length(kind: int, length: int, minimum: int) -> None:
    if length < minimum:
        raise WireError(f"option kind {kind} has length {length}, expected at least {minimum}")


def _stack_value_defined(key: int, b6: int, b7: int) -> bool:
    """Whether draft-11 defines the 2 value bytes of the Stack option ``key`` (Level << 8 | Code)."""
    if key in _AVAILABILITY_CODES:
        return b6 in _AVAILABILITY
    if key == StackCode.PORT_PARITY:
        return b6 in _PARITIES and b7 <= 1
    # IP TOS, TTL (a byte), TFO payload size, listen backlog (16 bits): any value.
    return True


def _decode_stack(view: memoryview, pos: int, length: int) -> Option:
    # Section "Stack options": byte 4 is Leg (top 2 bits) | Level (low 6 bits),
    # byte 5 the Code. Leg 0, a (Level, Code) draft-11 does not define, a length
    # other than its figure's 8, or a value it does not define (availability not
    # 1/2, parity > 2, reserve > 1) make an unsupported option, which "MUST be
    # silently ignored": kept opaque so the caller can ignore it (REQ-06). Only a
    # Stack option too short to hold Leg/Level/Code and its figure's value is malformed.
    _expect_min_length(OptionKind.STACK, length, STACK_OPTION_LENGTH)
    leg_level = view[pos + 4]
    leg_value = leg_level >> _STACK_LEG_SHIFT
    level = leg_level & _STACK_LEVEL_MASK
    code = view[pos + 5]
    key = (level << 8) | code
    leg = _STACK_LEGS.get(leg_value)
    b6 = view[pos + 6]
    b7 = view[pos + 7]
    if (
        leg is None
        or key not in _KNOWN_STACK_CODES
        or length != STACK_OPTION_LENGTH
        or not _stack_value_defined(key, b6, b7)
    ):
        return UnknownStackOption(leg_value, level, code, bytes(view[pos + 6 : pos + length]))
    if key == StackCode.IP_TOS:
        return IPTOSOption(leg, b6)
    if key == StackCode.HAPPY_EYEBALLS:
        return HappyEyeballsOption(leg, _AVAILABILITY[b6])
    if key == StackCode.TTL:
        return TTLOption(leg, b6)
    if key == StackCode.NO_FRAGMENTATION:
        return NoFragmentationOption(leg, _AVAILABILITY[b6])
    if key == StackCode.TFO:
        return TFOOption(leg, _U16.unpack_from(view, pos + 6)[0])
    if key == StackCode.MULTIPATH:
        return MultipathOption(leg, _AVAILABILITY[b6])
    if key == StackCode.LISTEN_BACKLOG:
        return ListenBacklogOption(leg, _U16.unpack_from(view, pos + 6)[0])
    if key == StackCode.UDP_ERROR:
        return UDPErrorOption(leg, _AVAILABILITY[b6])
    # StackCode.PORT_PARITY
    return PortParityOption(leg, _PARITIES[b6], b7 == 1)


def _decode_auth_method_advertisement(view: memoryview, pos: int, length: int) -> Option:
    _expect_min_length(OptionKind.AUTH_METHOD_ADVERTISEMENT, length, _MIN_DATA_OPTION_LENGTH)
    initial_data_length = _U16.unpack_from(view, pos + 4)[0]
    if initial_data_length > MAX_INITIAL_DATA_LENGTH:  # D12
        raise WireError(f"initial data length {initial_data_length} exceeds {MAX_INITIAL_DATA_LENGTH}")
    # The padding is zeroes, the same byte as method 0; a client never
    # advertises method 0 (AUTH-08), so every trailing zero is padding.
    methods = tuple(bytes(view[pos + 6 : pos + length]).rstrip(_NUL))
    return AuthMethodAdvertisement(initial_data_length, methods)


def _decode_auth_method_selection(view: memoryview, pos: int, length: int) -> Option:
    _expect_length(OptionKind.AUTH_METHOD_SELECTION, length, _METHOD_SELECTION_LENGTH)
    return AuthMethodSelection(view[pos + 4])


def _decode_auth_data(view: memoryview, pos: int, length: int) -> Option:
    _expect_min_length(OptionKind.AUTH_DATA, length, _MIN_DATA_OPTION_LENGTH)
    # The method's data keeps its padding: only the method knows its own length.
    return AuthData(view[pos + 4], bytes(view[pos + 5 : pos + length]))


def _decode_session_id(view: memoryview, pos: int, length: int) -> Option:
    # Section "Session initiation": the ID MUST NOT be empty; the option
    # length check already makes it a multiple of 4.
    _expect_min_length(OptionKind.SESSION_ID, length, _MIN_DATA_OPTION_LENGTH)
    return SessionID(bytes(view[pos + 4 : pos + length]))


def _empty_option_decoder(kind: OptionKind, option: Option) -> Callable[[memoryview, int, int], Option]:
    def decode(view: memoryview, pos: int, length: int) -> Option:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return option

    return decode


def _decode_idempotence_request(view: memoryview, pos: int, length: int) -> Option:
    # A request for 0 is valid data; the proxy ignores it (D15).
    _expect_length(OptionKind.IDEMPOTENCE_REQUEST, length, _U32_OPTION_LENGTH)
    return IdempotenceRequest(_U32.unpack_from(view, pos + 4)[0])


def _decode_idempotence_window(view: memoryview, pos: int, length: int) -> Option:
    _expect_length(OptionKind.IDEMPOTENCE_WINDOW, length, _WINDOW_OPTION_LENGTH)
    base = _U32.unpack_from(view, pos + 4)[0]
    size = _U32.unpack_from(view, pos + 8)[0]
    # "Window sizes MUST be less than 2^31. Window sizes MUST NOT be 0."
    if size == 0 or size > MAX_WINDOW_SIZE:
        raise WireError(f"idempotence window size {size} is out of range")
    return IdempotenceWindow(base, size)


def _decode_idempotence_expenditure(view: memoryview, pos: int, length: int) -> Option:
    # D3: the figure says 4, the text says 8; only 8 carries the token.
    _expect_length(OptionKind.IDEMPOTENCE_EXPENDITURE, length, _U32_OPTION_LENGTH)
    return IdempotenceExpenditure(_U32.unpack_from(view, pos + 4)[0])


_OPTION_DECODERS: dict[int, Callable[[memoryview, int, int], Option]] = {
    OptionKind.STACK: _decode_stack,
    OptionKind.AUTH_METHOD_ADVERTISEMENT: _decode_auth_method_advertisement,
    OptionKind.AUTH_METHOD_SELECTION: _decode_auth_method_selection,
    OptionKind.AUTH_DATA: _decode_auth_data,
    OptionKind.SESSION_REQUEST: _empty_option_decoder(OptionKind.SESSION_REQUEST, SessionRequest()),
    OptionKind.SESSION_ID: _decode_session_id,
    OptionKind.SESSION_OK: _empty_option_decoder(OptionKind.SESSION_OK, SessionOK()),
    OptionKind.SESSION_INVALID: _empty_option_decoder(OptionKind.SESSION_INVALID, SessionInvalid()),
    OptionKind.SESSION_TEARDOWN: _empty_option_decoder(OptionKind.SESSION_TEARDOWN, SessionTeardown()),
    OptionKind.IDEMPOTENCE_REQUEST: _decode_idempotence_request,
    OptionKind.IDEMPOTENCE_WINDOW: _decode_idempotence_window,
    OptionKind.IDEMPOTENCE_EXPENDITURE: _decode_idempotence_expenditure,
    OptionKind.IDEMPOTENCE_ACCEPTED: _empty_option_decoder(
        OptionKind.IDEMPOTENCE_ACCEPTED, IdempotenceAccepted()
    ),
    OptionKind.IDEMPOTENCE_REJECTED: _empty_option_decoder(
        OptionKind.IDEMPOTENCE_REJECTED, IdempotenceRejected()
    ),
}


def _walk_options(
    view: memoryview, pos: int, end: int, placed: frozenset[int] = _KNOWN_KINDS
) -> tuple[Option, ...]:
    # D8 / REQ-05: every Length is >= 4, a multiple of 4, and stays inside
    # Options Length; unknown kinds, and known kinds outside ``placed`` (the
    # kinds this message may carry), are skipped by Length, kept opaque (REQ-06).
    options: list[Option] = []
    while pos < end:
        if end - pos < OPTION_HEADER_LENGTH:
            raise WireError("option header runs past options length")
        kind, length = _OPTION_HEADER.unpack_from(view, pos)
        if length < OPTION_HEADER_LENGTH:
            raise WireError(f"option length {length} is less than 4")
        if length & 3:
            raise WireError(f"option length {length} is not a multiple of 4")
        if length > end - pos:
            raise WireError(f"option length {length} runs past options length")
        decoder = _OPTION_DECODERS.get(kind) if kind in placed else None
        if decoder is None:
            options.append(UnknownOption(kind, bytes(view[pos + 4 : pos + length])))
        else:
            options.append(decoder(view, pos, length))
        pos += length
    return tuple(options)


def _placed_kinds(context: object) -> frozenset[int]:
    if context is None:
        return _KNOWN_KINDS
    if context is Request:
        return _REQUEST_KINDS
    if context is AuthReply:
        return _AUTH_REPLY_KINDS
    if context is OperationReply:
        return _OPERATION_REPLY_KINDS
    raise WireError("options context is not Request, AuthReply or OperationReply", None)


def decode_options(
    data: Buffer,
    offset: int = 0,
    length: int = -1,
    context: type[Request] | type[AuthReply] | type[OperationReply] | None = None,
) -> tuple[Option, ...]:
    """Decode a run of options.

    Args:
        data: the bytes holding the options.
        offset: where the first option starts.
        length: the Options Length; -1 means every byte up to the end of ``data``.
        context: the message class carrying the options (``Request``,
            ``AuthReply`` or ``OperationReply``): known kinds draft-11 does not
            place in it decode as ``UnknownOption``, unchecked (REQ-06). None
            (the default) decodes every known kind.

    Returns:
        The options in wire order; unknown kinds as ``UnknownOption`` and
        unsupported Stack options as ``UnknownStackOption`` (REQ-06).

    Raises:
        WireError: a malformed option (GENERAL_FAILURE), ``length`` running
            past the end of ``data``, or a bad ``context`` (reply_code None).
    """
    placed = _placed_kinds(context)
    view = _view(data, offset)
    available = len(view) - offset
    if length == -1:
        length = available
    elif length < 0 or length > available:
        raise WireError(f"options length {length} runs past the end of the data")
    return _walk_options(view, offset, offset + length, placed)


# --- Request / Operation Reply (same layout, section "Requests") ------------------


def _decode_addressed(
    data: Buffer, offset: int, max_options_length: int, is_request: bool
) -> tuple[Request | OperationReply | None, int]:
    view = _view(data, offset)
    available = len(view) - offset
    # Smallest total length so far: header + unknown address (4) + no options.
    smallest = _ADDRESSED_HEADER_LENGTH + _MIN_ADDRESS_FIELD_LENGTH
    if available < 1:
        return None, smallest - available
    _check_version(view[offset])
    if available < 2:
        return None, smallest - available
    code = view[offset + 1]
    command: Command | int | None = None
    reply_code: ReplyCode | None = None
    if is_request:
        # An unknown Command Code is kept as a plain int: the request is still
        # well-formed, so the proxy can authenticate it and answer Command Not
        # Supported (0x07) in a real Operation Reply (CMD-06, section "Operation
        # Replies": proxies MAY support any subset of the commands).
        command = _COMMANDS.get(code, code)
    else:
        reply_code = _REPLY_CODES.get(code)
        if reply_code is None:
            raise WireError(f"reply code {code} is unknown")
    if available < 4:
        return None, smallest - available
    options_length = _U16.unpack_from(view, offset + 2)[0]
    _check_options_length(options_length, max_options_length)
    smallest += options_length
    if available < _ADDRESSED_HEADER_LENGTH:
        return None, smallest - available
    atyp = view[offset + 7]
    address_type = _address_type(atyp)
    if atyp == AddressType.IPV4:
        field_length = _IPV4_LENGTH
    elif atyp == AddressType.IPV6:
        field_length = _IPV6_LENGTH
    else:
        if available < _ADDRESSED_HEADER_LENGTH + 1:
            return None, smallest - available
        name_length = view[offset + _ADDRESSED_HEADER_LENGTH]
        if name_length == 0:
            raise WireError("domain name is empty")
        field_length = _pad4(1 + name_length)
    total = _ADDRESSED_HEADER_LENGTH + field_length + options_length
    options_start = _ADDRESSED_HEADER_LENGTH + field_length
    if available < options_start:
        return None, total - available
    # The address is decoded once its whole field (D2 padding included) is here.
    address = _decode_address(view, offset + _ADDRESSED_HEADER_LENGTH, atyp)
    if available < total:
        return None, total - available
    port = _U16.unpack_from(view, offset + 4)[0]
    placed = _REQUEST_KINDS if is_request else _OPERATION_REPLY_KINDS
    options = _walk_options(view, offset + options_start, offset + total, placed)
    if command is not None:
        return Request(command, address_type, address, port, options), total
    assert reply_code is not None
    return OperationReply(reply_code, address_type, address, port, options), total


def decode_request(
    data: Buffer, offset: int = 0, max_options_length: int = MAX_OPTIONS_LENGTH
) -> tuple[Request | None, int]:
    """Decode a Request (figure "SOCKS 6 Request") incrementally.

    Args:
        data: received bytes.
        offset: where the Request starts.
        max_options_length: cap on Options Length (D6, default 16384).

    Returns:
        ``(request, consumed)`` or ``(None, needed)``; see tests/codec_api.py. An
        unknown Command Code is not an error: ``Request.command`` is then the plain
        int, so the proxy can still authenticate the request and answer Command Not
        Supported (0x07) in an Operation Reply (CMD-06).

    Raises:
        WireError: reply_code None for a version other than 6,
            ADDRESS_TYPE_NOT_SUPPORTED for an unknown address type, GENERAL_FAILURE
            for anything else malformed.
    """
    message, n = _decode_addressed(data, offset, max_options_length, True)
    assert message is None or isinstance(message, Request)
    return message, n


def decode_operation_reply(
    data: Buffer, offset: int = 0, max_options_length: int = MAX_OPTIONS_LENGTH
) -> tuple[OperationReply | None, int]:
    """Decode an Operation Reply (figure "SOCKS 6 Operation Reply") incrementally.

    Args:
        data: received bytes.
        offset: where the reply starts.
        max_options_length: cap on Options Length (D6, default 16384).

    Returns:
        ``(reply, consumed)`` or ``(None, needed)``; see tests/codec_api.py.

    Raises:
        WireError: reply_code None for a version other than 6; an unknown reply
            code, address or option is malformed.
    """
    message, n = _decode_addressed(data, offset, max_options_length, False)
    assert message is None or isinstance(message, OperationReply)
    return message, n


def decode_auth_reply(
    data: Buffer, offset: int = 0, max_options_length: int = MAX_OPTIONS_LENGTH
) -> tuple[AuthReply | None, int]:
    """Decode an Authentication Reply (figure "SOCKS 6 Authentication Reply") incrementally.

    Args:
        data: received bytes.
        offset: where the reply starts.
        max_options_length: cap on Options Length (D6, default 16384).

    Returns:
        ``(reply, consumed)`` or ``(None, needed)``; see tests/codec_api.py.

    Raises:
        WireError: reply_code None for a version other than 6; an unknown Type or
            a malformed option is GENERAL_FAILURE.
    """
    view = _view(data, offset)
    available = len(view) - offset
    smallest = _AUTH_REPLY_HEADER_LENGTH
    if available < 1:
        return None, smallest - available
    _check_version(view[offset])
    if available < 2:
        return None, smallest - available
    code = view[offset + 1]
    reply_type = _AUTH_REPLY_TYPES.get(code)
    if reply_type is None:
        raise WireError(f"authentication reply type {code} is unknown")
    if available < 4:
        return None, smallest - available
    options_length = _U16.unpack_from(view, offset + 2)[0]
    _check_options_length(options_length, max_options_length)
    total = _AUTH_REPLY_HEADER_LENGTH + options_length
    if available < total:
        return None, total - available
    options = _walk_options(view, offset + _AUTH_REPLY_HEADER_LENGTH, offset + total, _AUTH_REPLY_KINDS)
    return AuthReply(reply_type, options), total


# --- UDP association messages (section "Handling UDP ASSOCIATE") ----------------


def _check_message_length_at_least(message_length: int, minimum: int) -> None:
    if message_length < minimum:
        raise WireError(f"message length {message_length} is less than {minimum}")


def _parse_datagram_header(
    view: memoryview, offset: int, available: int, message_length: int
) -> tuple[DatagramHeader | None, int]:
    """Parse a Datagram Header whose first 4 bytes were checked.

    Returns ``(header, header_length)``, or ``(None, 0)`` if more bytes are needed.
    """
    # D5: the Datagram Header's order is ATYP, Padding, Port, then the address.
    if available < _ASSOC_HEADER_LENGTH + 1:
        return None, 0
    atyp = view[offset + _ASSOC_HEADER_LENGTH]
    address_type = _address_type(atyp)
    if atyp == AddressType.IPV4:
        header_length = _DGRAM_ADDRESS_OFFSET + _IPV4_LENGTH
    elif atyp == AddressType.IPV6:
        header_length = _DGRAM_ADDRESS_OFFSET + _IPV6_LENGTH
    else:
        if available < _DGRAM_ADDRESS_OFFSET + 1:
            return None, 0
        name_length = view[offset + _DGRAM_ADDRESS_OFFSET]
        if name_length == 0:
            raise WireError("domain name is empty")
        header_length = _DGRAM_ADDRESS_OFFSET + _pad4(1 + name_length)
    _check_message_length_at_least(message_length, header_length)
    if available < header_length:
        return None, 0
    address = _decode_address(view, offset + _DGRAM_ADDRESS_OFFSET, atyp)
    header = DatagramHeader(
        bytes(view[offset + _ASSOC_PREFIX_LENGTH : offset + _ASSOC_HEADER_LENGTH]),
        address_type,
        address,
        _U16.unpack_from(view, offset + _ASSOC_HEADER_LENGTH + 2)[0],
        message_length,
    )
    return header, header_length


def _error_address_type(atyp: int) -> AddressType:
    # Section "Reporting ICMP Errors": both address types are IPv4 or IPv6.
    address_type = _address_type(atyp)
    if address_type == AddressType.DOMAIN_NAME:
        raise WireError(
            "address type 3 is not allowed in a datagram error", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    return address_type


def _ip_length(atyp: int) -> int:
    return _IPV4_LENGTH if atyp == AddressType.IPV4 else _IPV6_LENGTH


def _parse_datagram_error(
    view: memoryview, offset: int, available: int, message_length: int
) -> DatagramError | None:
    """Parse a Datagram Error whose first 4 bytes were checked; None if more bytes are needed."""
    pos = offset + _ASSOC_HEADER_LENGTH
    if available < _ASSOC_HEADER_LENGTH + 1:
        return None
    address_type = _error_address_type(view[pos])
    reporter_pos = _DGRAM_ADDRESS_OFFSET + _ip_length(address_type)
    _check_message_length_at_least(message_length, reporter_pos + _REPORTER_PREFIX_LENGTH + _IPV4_LENGTH)
    if available < reporter_pos + 1:
        return None
    reporter_type = _error_address_type(view[offset + reporter_pos])
    total = reporter_pos + _REPORTER_PREFIX_LENGTH + _ip_length(reporter_type)
    # Over a stream the Message Length frames the message: it must be exact.
    if message_length != total:
        raise WireError(f"message length {message_length} is not {total}")
    if available < reporter_pos + 2:
        return None
    code = view[offset + reporter_pos + 1]
    error_code = _DGRAM_ERROR_CODES.get(code)
    if error_code is None:
        raise WireError(f"datagram error code {code} is unknown")
    if available < total:
        return None
    return DatagramError(
        bytes(view[offset + _ASSOC_PREFIX_LENGTH : pos]),
        address_type,
        _decode_ip(view, offset + _DGRAM_ADDRESS_OFFSET, address_type),
        _U16.unpack_from(view, pos + 2)[0],
        reporter_type,
        _decode_ip(view, offset + reporter_pos + _REPORTER_PREFIX_LENGTH, reporter_type),
        error_code,
    )


def decode_association_message(data: Buffer, offset: int = 0) -> tuple[AssociationMessage | None, int]:
    """Decode one UDP association message from the TCP stream, incrementally.

    Args:
        data: received bytes.
        offset: where the message starts.

    Returns:
        ``(message, consumed)`` or ``(None, needed)``; the message is an
        ``AssociationInit``, ``AssociationConfirmation``, ``Datagram`` or
        ``DatagramError``. Once Message Length is known, ``consumed`` is exactly it.

    Raises:
        WireError: reply_code None for a version other than 6; unknown Message
            Type, a Message Length that does not fit the fields, an unknown
            address type (ADDRESS_TYPE_NOT_SUPPORTED) or error code.
    """
    view = _view(data, offset)
    available = len(view) - offset
    if available < 1:
        return None, _ASSOC_PREFIX_LENGTH - available
    _check_version(view[offset])
    if available < 2:
        return None, _ASSOC_PREFIX_LENGTH - available
    message_type = view[offset + 1]
    if not UDPMessageType.ASSOCIATION_INIT <= message_type <= UDPMessageType.ERROR:
        raise WireError(f"message type {message_type} is unknown")
    if available < _ASSOC_PREFIX_LENGTH:
        return None, _ASSOC_PREFIX_LENGTH - available
    message_length = _U16.unpack_from(view, offset + 2)[0]
    if message_type == UDPMessageType.DATAGRAM:
        _check_message_length_at_least(message_length, _MIN_DGRAM_HEADER_LENGTH)
        header, header_length = _parse_datagram_header(view, offset, available, message_length)
        if header is None or available < message_length:
            return None, message_length - available
        payload = bytes(view[offset + header_length : offset + message_length])
        return Datagram(header, payload), message_length
    if message_type == UDPMessageType.ERROR:
        _check_message_length_at_least(message_length, _MIN_DGRAM_ERROR_LENGTH)
        error = _parse_datagram_error(view, offset, available, message_length)
        if error is None:
            return None, message_length - available
        return error, message_length
    # Association Initialization / Confirmation: "Message Length = 12".
    if message_length != ASSOCIATION_MESSAGE_LENGTH:
        raise WireError(f"message length {message_length} is not 12")
    if available < ASSOCIATION_MESSAGE_LENGTH:
        return None, ASSOCIATION_MESSAGE_LENGTH - available
    association_id = bytes(view[offset + _ASSOC_PREFIX_LENGTH : offset + _ASSOC_HEADER_LENGTH])
    if message_type == UDPMessageType.ASSOCIATION_INIT:
        return AssociationInit(association_id), ASSOCIATION_MESSAGE_LENGTH
    return AssociationConfirmation(association_id), ASSOCIATION_MESSAGE_LENGTH


def decode_datagram_header(data: Buffer, offset: int = 0) -> tuple[DatagramHeader, int]:
    """Decode the Datagram Header at the start of a whole UDP/DTLS datagram.

    Args:
        data: the datagram.
        offset: where the header starts.

    Returns:
        ``(header, header_length)``; the payload is
        ``data[offset + header_length : offset + header.message_length]``.
        A Message Length larger than the datagram is not checked here: the
        caller drops such datagrams silently (UDP-05).

    Raises:
        WireError: a truncated header, a version other than 6 (reply_code
            None), a Message Type other than Datagram, a Message Length smaller
            than the header, an unknown address type or a malformed name.
    """
    view = _view(data, offset)
    available = len(view) - offset
    if available < 1:
        raise WireError("datagram header is truncated")
    _check_version(view[offset])
    if available < 2:
        raise WireError("datagram header is truncated")
    message_type = view[offset + 1]
    if message_type != UDPMessageType.DATAGRAM:
        raise WireError(f"message type {message_type} is not a datagram")
    if available < _ASSOC_PREFIX_LENGTH:
        raise WireError("datagram header is truncated")
    message_length = _U16.unpack_from(view, offset + 2)[0]
    _check_message_length_at_least(message_length, _MIN_DGRAM_HEADER_LENGTH)
    header, header_length = _parse_datagram_header(view, offset, available, message_length)
    if header is None:
        raise WireError("datagram header is truncated")
    return header, header_length


# =================================================================================
# Encoding
# =================================================================================


def _check_int(value: object, maximum: int, what: str) -> int:
    # An int (IntEnum members included) in 0..maximum. bool is an int subclass
    # but never a wire value: True is refused, not sent as 1 (as socks5 does).
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{what} is out of range")
    return value


def _in_table(value: object, table: Mapping[int, object]) -> bool:
    # Membership by int value (enum members and plain ints alike); an
    # unhashable or non-int value, 1.0 or True, is simply not a member.
    return isinstance(value, int) and not isinstance(value, bool) and value in table


def _check_bytes(value: object, what: str) -> bytes:
    # bytes() of a memoryview copies all its bytes (nbytes), not len() items.
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"{what} is not bytes")
    return bytes(value)


def _encode_name(address: str) -> bytes:
    """Encode a domain name field per D2: length without padding, then NULs."""
    try:
        raw = address.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("domain name is not valid unicode") from None
    if not raw:
        raise LocalProtocolError("domain name is empty")
    if len(raw) > MAX_DOMAIN_LENGTH:
        raise LocalProtocolError("domain name is longer than 255 bytes")
    if _NUL in raw:
        raise LocalProtocolError("domain name contains a nul byte")
    field_length = _pad4(1 + len(raw))
    return bytes([len(raw)]) + raw + bytes(field_length - 1 - len(raw))


def _encode_ip(address_type: int, address: object) -> bytes:
    if not isinstance(address, str):
        raise LocalProtocolError("address is not a string")
    try:
        if address_type == AddressType.IPV4:
            return ipaddress.IPv4Address(address).packed
        # A scope ("fe80::1%eth0") has no place on the wire.
        if "%" in address:
            raise ValueError(address)
        return ipaddress.IPv6Address(address).packed
    except ValueError:
        raise LocalProtocolError("address is not a valid ip address") from None


def _encode_address(address_type: int, address: object) -> bytes:
    """Encode an address field (IPv4, IPv6 or a D2-padded domain name)."""
    if address_type == AddressType.DOMAIN_NAME:
        if not isinstance(address, str):
            raise LocalProtocolError("address is not a string")
        return _encode_name(address)
    if address_type == AddressType.IPV4 or address_type == AddressType.IPV6:
        return _encode_ip(address_type, address)
    raise LocalProtocolError("address type is not supported")


def _encode_stack_leg(leg: object) -> int:
    if not _in_table(leg, _STACK_LEGS):
        raise LocalProtocolError("stack leg is out of range")
    assert isinstance(leg, int)
    return leg


def _encode_remote_leg(leg: object) -> int:
    # Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP Error and Port Parity:
    # their figures fix Leg = 2 (proxy-remote).
    value = _encode_stack_leg(leg)
    if value != StackLeg.PROXY_REMOTE:
        raise LocalProtocolError("stack option leg is not proxy-remote")
    return value


def _encode_availability(value: object) -> int:
    if not _in_table(value, _AVAILABILITY):
        raise LocalProtocolError("stack option availability is out of range")
    assert isinstance(value, int)
    return value


def _stack(w: Writer, leg: int, code: StackCode, value: bytes) -> None:
    # Every Stack option draft-11 defines: Kind 1, Length 8, Leg|Level, Code, 2 bytes.
    w.push_u16(OptionKind.STACK)
    w.push_u16(STACK_OPTION_LENGTH)
    w.push_u8((leg << _STACK_LEG_SHIFT) | (code >> 8))
    w.push_u8(code & _U8_MAX)
    w.push_bytes(value)


def _encode_option(w: Writer, option: Option) -> None:
    match option:
        case IPTOSOption():
            leg = _encode_stack_leg(option.leg)
            _stack(w, leg, StackCode.IP_TOS, bytes([_check_int(option.tos, _U8_MAX, "ip tos"), 0]))
        case HappyEyeballsOption():
            leg = _encode_remote_leg(option.leg)
            value = bytes([_encode_availability(option.availability), 0])
            _stack(w, leg, StackCode.HAPPY_EYEBALLS, value)
        case TTLOption():
            leg = _encode_stack_leg(option.leg)
            _stack(w, leg, StackCode.TTL, bytes([_check_int(option.ttl, _U8_MAX, "ttl"), 0]))
        case NoFragmentationOption():
            leg = _encode_stack_leg(option.leg)
            value = bytes([_encode_availability(option.availability), 0])
            _stack(w, leg, StackCode.NO_FRAGMENTATION, value)
        case TFOOption():
            leg = _encode_remote_leg(option.leg)
            value = _U16.pack(_check_int(option.payload_size, _U16_MAX, "tfo payload size"))
            _stack(w, leg, StackCode.TFO, value)
        case MultipathOption():
            leg = _encode_remote_leg(option.leg)
            value = bytes([_encode_availability(option.availability), 0])
            _stack(w, leg, StackCode.MULTIPATH, value)
        case ListenBacklogOption():
            leg = _encode_remote_leg(option.leg)
            value = _U16.pack(_check_int(option.backlog, _U16_MAX, "listen backlog"))
            _stack(w, leg, StackCode.LISTEN_BACKLOG, value)
        case UDPErrorOption():
            leg = _encode_remote_leg(option.leg)
            value = bytes([_encode_availability(option.availability), 0])
            _stack(w, leg, StackCode.UDP_ERROR, value)
        case PortParityOption():
            leg = _encode_remote_leg(option.leg)
            if not _in_table(option.parity, _PARITIES):
                raise LocalProtocolError("port parity is out of range")
            if not isinstance(option.reserve, bool):
                raise LocalProtocolError("port parity reserve is not a bool")
            _stack(w, leg, StackCode.PORT_PARITY, bytes([option.parity, int(option.reserve)]))
        case UnknownStackOption():
            _encode_unknown_stack(w, option)
        case AuthMethodAdvertisement():
            _encode_advertisement(w, option)
        case AuthMethodSelection():
            method = _check_int(option.method, _U8_MAX, "authentication method")
            _push_option(w, OptionKind.AUTH_METHOD_SELECTION, bytes([method, 0, 0, 0]))
        case AuthData():
            _encode_auth_data(w, option)
        case SessionID():
            sid = _check_bytes(option.session_id, "session id")
            # Section "Session initiation": a multiple of 4, MUST NOT be empty.
            if not sid or len(sid) & 3:
                raise LocalProtocolError("session id length is not a positive multiple of 4")
            _push_option(w, OptionKind.SESSION_ID, sid)
        case IdempotenceRequest():
            size = _check_int(option.window_size, _U32_MAX, "idempotence window size")
            _push_option(w, OptionKind.IDEMPOTENCE_REQUEST, _U32.pack(size))
        case IdempotenceWindow():
            base = _check_int(option.base, _U32_MAX, "idempotence window base")
            size = _check_int(option.size, MAX_WINDOW_SIZE, "idempotence window size")
            if size == 0:
                raise LocalProtocolError("idempotence window size is out of range")
            _push_option(w, OptionKind.IDEMPOTENCE_WINDOW, _U32.pack(base) + _U32.pack(size))
        case IdempotenceExpenditure():
            token = _check_int(option.token, _U32_MAX, "idempotence token")
            _push_option(w, OptionKind.IDEMPOTENCE_EXPENDITURE, _U32.pack(token))
        case UnknownOption():
            _encode_unknown(w, option)
        case SessionRequest():
            _push_option(w, OptionKind.SESSION_REQUEST, b"")
        case SessionOK():
            _push_option(w, OptionKind.SESSION_OK, b"")
        case SessionInvalid():
            _push_option(w, OptionKind.SESSION_INVALID, b"")
        case SessionTeardown():
            _push_option(w, OptionKind.SESSION_TEARDOWN, b"")
        case IdempotenceAccepted():
            _push_option(w, OptionKind.IDEMPOTENCE_ACCEPTED, b"")
        case IdempotenceRejected():
            _push_option(w, OptionKind.IDEMPOTENCE_REJECTED, b"")
        case _:
            raise LocalProtocolError("not a socks 6 option")


def _push_option(w: Writer, kind: int, data: bytes) -> None:
    """Write Kind, Length and ``data`` (whose length is already a multiple of 4)."""
    length = OPTION_HEADER_LENGTH + len(data)
    if length > _MAX_OPTION_LENGTH:
        raise LocalProtocolError("option is longer than 65535 bytes")
    w.push_u16(kind)
    w.push_u16(length)
    w.push_bytes(data)


def _encode_unknown_stack(w: Writer, option: UnknownStackOption) -> None:
    leg = _check_int(option.leg, _STACK_LEG_MAX, "stack leg")
    level = _check_int(option.level, _STACK_LEVEL_MAX, "stack level")
    code = _check_int(option.code, _U8_MAX, "stack code")
    data = _check_bytes(option.data, "stack option data")
    # It must decode back as unknown, or the round trip would change its type:
    # a known (Leg, Level, Code) is unknown only with a length or value
    # draft-11 does not define.
    key = (level << 8) | code
    if leg != 0 and key in _KNOWN_STACK_CODES and len(data) == 2 and _stack_value_defined(key, *data):
        raise LocalProtocolError("unknown stack option uses a known level and code")
    # Leg/Level and Code take 2 bytes; the data (padding included) ends the option.
    if (2 + len(data)) & 3:
        raise LocalProtocolError("stack option data length is not 2 modulo 4")
    _push_option(w, OptionKind.STACK, bytes([(leg << _STACK_LEG_SHIFT) | level, code]) + data)


def _encode_advertisement(w: Writer, option: AuthMethodAdvertisement) -> None:
    initial = _check_int(option.initial_data_length, MAX_INITIAL_DATA_LENGTH, "initial data length")
    methods = bytearray()
    for method in option.methods:
        _check_int(method, _U8_MAX, "authentication method")
        # AUTH-08: clients do not advertise "no authentication"; it would also
        # be indistinguishable from the zero padding.
        if method == AuthMethod.NONE:
            raise LocalProtocolError("authentication method 0 is never advertised")
        methods.append(method)
    # Padding: "a minimally-sized sequence of zeroes".
    body = _U16.pack(initial) + bytes(methods)
    _push_option(w, OptionKind.AUTH_METHOD_ADVERTISEMENT, body + bytes(_pad4(len(body)) - len(body)))


def _encode_auth_data(w: Writer, option: AuthData) -> None:
    method = _check_int(option.method, _U8_MAX, "authentication method")
    body = bytes([method]) + _check_bytes(option.data, "authentication data")
    _push_option(w, OptionKind.AUTH_DATA, body + bytes(_pad4(len(body)) - len(body)))


def _encode_unknown(w: Writer, option: UnknownOption) -> None:
    kind = _check_int(option.kind, _U16_MAX, "option kind")
    # It must decode back as unknown, or the round trip would change its type.
    if kind in _KNOWN_KINDS:
        raise LocalProtocolError("unknown option uses a known kind")
    data = _check_bytes(option.data, "option data")
    if len(data) & 3:
        raise LocalProtocolError("option data length is not a multiple of 4")
    _push_option(w, kind, data)


def encode_options(options: tuple[Option, ...] | list[Option]) -> bytes:
    """Encode options in order.

    Args:
        options: option objects from ``socks6fast.proto.messages``.

    Returns:
        The concatenated options (no cap on the total: the message encoders apply D6).

    Raises:
        LocalProtocolError: a field out of range, a value the draft forbids
            (method 0 advertised, window size 0, empty Session ID...), or an
            unknown option reusing a known kind / Stack (Level, Code).
    """
    w = Writer()
    for option in options:
        _encode_option(w, option)
    return w.getvalue()


def _encode_message_options(options: Sequence[Option]) -> bytes:
    if not isinstance(options, tuple | list):
        raise LocalProtocolError("options is not a tuple or list")
    encoded = encode_options(options)
    # D6 / REQ-03: we never send more than 16 KB of options.
    if len(encoded) > MAX_OPTIONS_LENGTH:
        raise LocalProtocolError("options length exceeds 16384")
    return encoded


def _encode_addressed(
    code: int,
    address_type: object,
    address: object,
    port: object,
    options: Sequence[Option],
    noop: bool = False,
) -> bytes:
    # Checked in this order: address type, address, port, options.
    if not _in_table(address_type, _ADDRESS_TYPES):
        raise LocalProtocolError("address type is not supported")
    assert isinstance(address_type, int)
    # Section "Requests", NOOP: "The Address Type field MUST be either 0x01
    # (IPv4) or 0x04 (IPv6). The Address and Port fields MUST be 0."
    if noop and address_type == AddressType.DOMAIN_NAME:
        raise LocalProtocolError("noop address type is not ipv4 or ipv6")
    field = _encode_address(address_type, address)
    port_value = _check_int(port, _U16_MAX, "port")
    if noop and (port_value != 0 or any(field)):
        raise LocalProtocolError("noop address or port is not zero")
    encoded = _encode_message_options(options)
    header = _ADDRESSED_HEADER.pack(VERSION, code, len(encoded), port_value, 0, address_type)
    return header + field + encoded


def encode_request(request: Request) -> bytes:
    """Encode a Request (figure "SOCKS 6 Request").

    Raises:
        LocalProtocolError: an unknown command or address type, a bad address
            (invalid IP text, name empty/over 255 bytes/with a NUL), a port out of
            range, a NOOP whose address is not the zero IPv4/IPv6 address or whose
            port is not 0, an illegal option, or more than 16384 bytes of options.
    """
    if not _in_table(request.command, _COMMANDS):
        raise LocalProtocolError("command is not supported")
    return _encode_addressed(
        request.command,
        request.address_type,
        request.address,
        request.port,
        request.options,
        request.command == Command.NOOP,
    )


def encode_operation_reply(reply: OperationReply) -> bytes:
    """Encode an Operation Reply (figure "SOCKS 6 Operation Reply").

    Raises:
        LocalProtocolError: an unknown reply code or address type, a bad address,
            a port out of range, an illegal option, or options over 16384 bytes.
    """
    if not _in_table(reply.reply_code, _REPLY_CODES):
        raise LocalProtocolError("reply code is unknown")
    return _encode_addressed(reply.reply_code, reply.address_type, reply.address, reply.port, reply.options)


def encode_auth_reply(reply: AuthReply) -> bytes:
    """Encode an Authentication Reply (figure "SOCKS 6 Authentication Reply").

    Raises:
        LocalProtocolError: an unknown Type, an illegal option, or options over
            16384 bytes.
    """
    if not _in_table(reply.type, _AUTH_REPLY_TYPES):
        raise LocalProtocolError("authentication reply type is unknown")
    options = _encode_message_options(reply.options)
    return _AUTH_REPLY_HEADER.pack(VERSION, reply.type, len(options)) + options


def encode_version_mismatch() -> bytes:
    """The Version Mismatch Reply: the single byte 6 (section "Version Mismatch Replies")."""
    return _VERSION_MISMATCH


def _check_association_id(association_id: object) -> bytes:
    # Counted in bytes, not items: a memoryview of 8 wider items is not 8 bytes.
    if not isinstance(association_id, bytes | bytearray | memoryview):
        raise LocalProtocolError("association id is not 8 bytes")
    raw = bytes(association_id)
    if len(raw) != ASSOCIATION_ID_LENGTH:
        raise LocalProtocolError("association id is not 8 bytes")
    return raw


def _address_field_length(address_type: object, address: object) -> int:
    if not _in_table(address_type, _ADDRESS_TYPES):
        raise LocalProtocolError("address type is not supported")
    if address_type == AddressType.IPV4:
        return _IPV4_LENGTH
    if address_type == AddressType.IPV6:
        return _IPV6_LENGTH
    if address_type == AddressType.DOMAIN_NAME:
        if not isinstance(address, str):
            raise LocalProtocolError("address is not a string")
        try:
            name_length = len(address.encode("utf-8"))
        except UnicodeEncodeError:
            raise LocalProtocolError("domain name is not valid unicode") from None
        if name_length == 0:
            raise LocalProtocolError("domain name is empty")
        if name_length > MAX_DOMAIN_LENGTH:
            raise LocalProtocolError("domain name is longer than 255 bytes")
        return _pad4(1 + name_length)
    raise LocalProtocolError("address type is not supported")


def datagram_header_length(address_type: int, address: str) -> int:
    """Length of the Datagram Header for this address, to compute Message Length.

    Only the address type and, for a domain name, its UTF-8 length are checked;
    IP address text is not parsed here (``encode_datagram_header`` does).

    Raises:
        LocalProtocolError: an unknown address type, or a name that is empty or
            over 255 bytes.
    """
    return _DGRAM_ADDRESS_OFFSET + _address_field_length(address_type, address)


def _encode_datagram_header(header: DatagramHeader) -> bytes:
    association_id = _check_association_id(header.association_id)
    address_type = header.address_type
    if not _in_table(address_type, _ADDRESS_TYPES):
        raise LocalProtocolError("address type is not supported")
    assert isinstance(address_type, int)
    field = _encode_address(address_type, header.address)
    port = _check_int(header.port, _U16_MAX, "port")
    header_length = _DGRAM_ADDRESS_OFFSET + len(field)
    message_length = _check_int(header.message_length, _U16_MAX, "message length")
    if message_length < header_length:
        raise LocalProtocolError("message length is less than the header length")
    # D5: Address Type, Padding, Port (not the Request's Port, Padding, ATYP).
    return (
        _ASSOC_PREFIX.pack(VERSION, UDPMessageType.DATAGRAM, message_length)
        + association_id
        + bytes([address_type, 0])
        + _U16.pack(port)
        + field
    )


def encode_datagram_header(header: DatagramHeader, out: bytearray | memoryview, offset: int = 0) -> int:
    """Write a Datagram Header into a preallocated buffer.

    Args:
        header: the header; ``message_length`` is written as given and must be
            at least the header length.
        out: a writable buffer.
        offset: where to write.

    Returns:
        The number of bytes written (the header length).

    Raises:
        LocalProtocolError: an illegal field (see ``encode_request``), a bad
            Association ID or Message Length, ``out`` not a writable contiguous
            buffer, or too small.
    """
    encoded = _encode_datagram_header(header)
    n = len(encoded)
    try:
        view = memoryview(out)
    except TypeError:
        raise LocalProtocolError("output buffer is not writable") from None
    if view.readonly or not view.c_contiguous:
        raise LocalProtocolError("output buffer is not writable")
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    # Counted in bytes (nbytes), whatever the item size of ``out``.
    if offset < 0 or len(view) - offset < n:
        raise LocalProtocolError("output buffer is too small")
    view[offset : offset + n] = encoded
    return n


def _encode_datagram_error(message: DatagramError) -> bytes:
    association_id = _check_association_id(message.association_id)
    for address_type in (message.address_type, message.reporter_address_type):
        if not _in_table(address_type, _IP_ADDRESS_TYPES):
            raise LocalProtocolError("datagram error address type is not ipv4 or ipv6")
    address = _encode_ip(message.address_type, message.address)
    reporter = _encode_ip(message.reporter_address_type, message.reporter_address)
    port = _check_int(message.port, _U16_MAX, "port")
    if not _in_table(message.error_code, _DGRAM_ERROR_CODES):
        raise LocalProtocolError("datagram error code is unknown")
    # Section "Reporting ICMP Errors": "0x04: Datagram too big (IPv6 only)".
    if message.error_code == DatagramErrorCode.DATAGRAM_TOO_BIG and (
        message.address_type != AddressType.IPV6 or message.reporter_address_type != AddressType.IPV6
    ):
        raise LocalProtocolError("datagram too big is for ipv6 only")
    total = _DGRAM_ADDRESS_OFFSET + len(address) + _REPORTER_PREFIX_LENGTH + len(reporter)
    return (
        _ASSOC_PREFIX.pack(VERSION, UDPMessageType.ERROR, total)
        + association_id
        + bytes([message.address_type, 0])
        + _U16.pack(port)
        + address
        + bytes([message.reporter_address_type, message.error_code, 0, 0])
        + reporter
    )


def encode_association_message(message: AssociationMessage) -> bytes:
    """Encode a UDP association message for the TCP stream.

    A ``Datagram``'s ``header.message_length`` must equal the header length plus
    the payload length (no padding on a stream); a ``DatagramError``'s Message
    Length is computed.

    Raises:
        LocalProtocolError: a bad Association ID, Message Length, address, port
            or error code, or an object that is not an association message.
    """
    cls = type(message)
    if cls is AssociationInit or cls is AssociationConfirmation:
        assert isinstance(message, AssociationInit | AssociationConfirmation)
        association_id = _check_association_id(message.association_id)
        message_type = (
            UDPMessageType.ASSOCIATION_INIT
            if cls is AssociationInit
            else UDPMessageType.ASSOCIATION_CONFIRMATION
        )
        return _ASSOC_PREFIX.pack(VERSION, message_type, ASSOCIATION_MESSAGE_LENGTH) + association_id
    if cls is Datagram:
        assert isinstance(message, Datagram)
        if not isinstance(message.header, DatagramHeader):
            raise LocalProtocolError("datagram header has the wrong type")
        header = _encode_datagram_header(message.header)
        payload = _check_bytes(message.payload, "datagram payload")
        if message.header.message_length != len(header) + len(payload):
            raise LocalProtocolError("message length does not match header and payload")
        return header + payload
    if cls is DatagramError:
        assert isinstance(message, DatagramError)
        return _encode_datagram_error(message)
    raise LocalProtocolError("not a udp association message")
