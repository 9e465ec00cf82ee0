"""Checks of one SOCKS 6 codec twin (``codec_py`` and ``codec_c`` share them).

Input: byte 0 picks the decoder and how the bytes are presented, the rest is the wire.
For each input the target checks:

* the decoder raises ``WireError`` and nothing else (codec_api.py, "Decoders raise
  WireError and nothing else");
* a need-more answer asks for at least one byte;
* round trip: a decoded message re-encodes, and decoding that gives the same message
  (the encoder may refuse a message the decoder accepts with ``LocalProtocolError``:
  D11/REQ-04 NOOP addresses, draft-12 name padding; it may not fail otherwise);
* REQ-07: two prefixes of the input (half, all but one byte) answer consistently with
  the whole (``_common.check_prefix``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fuzz import sut
from fuzz.targets._common import Finding, Outcome, call, check_prefix

WireError = sut.errors.WireError
LocalProtocolError = sut.errors.LocalProtocolError
MAX_OPTIONS_LENGTH = sut.constants.MAX_OPTIONS_LENGTH
#: A small Options Length cap, so the "over the cap" branch is reached by short inputs (D6).
SMALL_CAP = 64
#: Bytes put in front of the message when the input asks for a non-zero offset.
FILLER = b"\xaa\x06\x05"

STREAM = ("request", "operation_reply", "auth_reply", "association")
KINDS = (*STREAM, "datagram_header", "options")
CONTEXTS: tuple[Any, ...] = (None, sut.messages.Request, sut.messages.AuthReply, sut.messages.OperationReply)


def present(ctl: int, body: bytes) -> tuple[Any, int]:
    """The buffer type and offset byte 0 asks for: bytes, bytearray or memoryview; 0 or 3."""
    variant = ctl // len(KINDS)
    data = FILLER + body if variant & 2 else body
    offset = len(FILLER) if variant & 2 else 0
    if variant & 4:
        return bytearray(data), offset
    if variant & 8:
        return memoryview(data), offset
    return data, offset


def decode(codec: ModuleType, kind: str, ctl: int, data: Any, offset: int) -> Outcome:
    """One decoder call as the input asks; only WireError is an outcome."""
    variant = ctl // len(KINDS)
    cap = SMALL_CAP if variant & 1 else MAX_OPTIONS_LENGTH
    if kind == "request":
        return call(codec.decode_request, WireError, data, offset, cap)
    if kind == "operation_reply":
        return call(codec.decode_operation_reply, WireError, data, offset, cap)
    if kind == "auth_reply":
        return call(codec.decode_auth_reply, WireError, data, offset, cap)
    if kind == "association":
        return call(codec.decode_association_message, WireError, data, offset)
    if kind == "datagram_header":
        return call(codec.decode_datagram_header, WireError, data, offset)
    context = CONTEXTS[(variant >> 4) & 3]
    try:
        options = codec.decode_options(data, offset, -1, context)
    except WireError as exc:
        return Outcome("error", exc)
    return Outcome("ok", options, len(data) - offset)


def encode(codec: ModuleType, kind: str, message: Any) -> bytes:
    """The encoder matching ``kind`` (LocalProtocolError passes through)."""
    if kind == "request":
        return bytes(codec.encode_request(message))
    if kind == "operation_reply":
        return bytes(codec.encode_operation_reply(message))
    if kind == "auth_reply":
        return bytes(codec.encode_auth_reply(message))
    if kind == "association":
        return bytes(codec.encode_association_message(message))
    if kind == "datagram_header":
        out = bytearray(codec.datagram_header_length(message.address_type, message.address))
        written = codec.encode_datagram_header(message, out, 0)
        if written != len(out):
            raise Finding(f"encode_datagram_header wrote {written} of {len(out)} bytes")
        return bytes(out)
    return bytes(codec.encode_options(message))


def round_trip(codec: ModuleType, kind: str, ctl: int, message: Any) -> None:
    """A decoded message re-encodes to bytes that decode to the same message."""
    try:
        wire = encode(codec, kind, message)
    except LocalProtocolError:
        return  # accepted on input, refused on output (documented asymmetries, see above)
    if kind == "datagram_header":
        # The header alone: Message Length counts a payload that is not there (UDP-05).
        again = call(codec.decode_datagram_header, WireError, wire, 0)
        expected = Outcome("ok", message, len(wire))
    elif kind == "options":
        again = decode(codec, kind, ctl, wire, 0)
        expected = Outcome("ok", message, len(wire))
    else:
        # At offset 0, from bytes, with the cap the input was decoded with.
        again = decode(codec, kind, ctl % len(KINDS) + len(KINDS) * (ctl // len(KINDS) & 1), wire, 0)
        expected = Outcome("ok", message, len(wire))
    if again.key() != expected.key():
        raise Finding(f"round trip of {message!r}: {wire.hex()} decodes to {again.key()}")


def check(codec: ModuleType, data: bytes) -> Outcome | None:
    """Run every check on one input; returns the whole input's outcome (for codec_diff)."""
    if not data:
        return None
    ctl, body = data[0], data[1:]
    kind = KINDS[ctl % len(KINDS)]
    buf, offset = present(ctl, body)
    whole = decode(codec, kind, ctl, buf, offset)
    if whole.kind == "ok":
        if not 0 < whole.n <= len(body) and not (kind == "options" and whole.n == 0):
            raise Finding(f"{kind}: consumed {whole.n} of {len(body)} bytes")
        round_trip(codec, kind, ctl, whole.value)
    if kind in STREAM:
        for shown in {len(body) // 2, len(body) - 1}:
            if 0 <= shown < len(body):
                prefix = decode(codec, kind, ctl, buf[: offset + shown], offset)
                check_prefix(whole, prefix, len(body), shown)
    return whole
