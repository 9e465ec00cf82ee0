"""Target socks5: the SOCKS 5 / RFC 1929 codec (``socks5.py``).

Input: byte 0 picks the decoder and whether the message sits at offset 0 or 3 of a bytes,
bytearray or memoryview; the rest is the wire. Checks, as for the SOCKS 6 codec: only
``WireError`` escapes a decoder; a decoded message re-encodes (or the encoder refuses it
with ``LocalProtocolError``: ULEN/PLEN 0 is accepted on input and never sent, RFC 1929)
to bytes that decode to the same message; two prefixes answer consistently with the whole
(REQ-07's rule, which this codec follows too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fuzz import sut
from fuzz.targets._common import Finding, Outcome, call, check_prefix

WireError = sut.errors.WireError
LocalProtocolError = sut.errors.LocalProtocolError
s5 = sut.socks5

#: (name, decoder, encoder, incremental)
CODECS: tuple[tuple[str, Callable[..., Any], Callable[[Any], bytes], bool], ...] = (
    ("greeting", s5.decode_greeting, s5.encode_greeting, True),
    ("method_selection", s5.decode_method_selection, s5.encode_method_selection, True),
    ("request", s5.decode_request, s5.encode_request, True),
    ("reply", s5.decode_reply, s5.encode_reply, True),
    ("udp_header", s5.decode_udp_header, s5.encode_udp_header, False),
    ("userpass_request", s5.decode_userpass_request, s5.encode_userpass_request, True),
    ("userpass_reply", s5.decode_userpass_reply, s5.encode_userpass_reply, True),
)
FILLER = b"\x05\x01\x00"


def setup() -> None:
    """Nothing to load."""


def test_one_input(data: bytes) -> None:
    if not data:
        return
    ctl, body = data[0], data[1:]
    name, decoder, encoder, incremental = CODECS[ctl % len(CODECS)]
    variant = ctl // len(CODECS)
    buf: Any = FILLER + body if variant & 1 else body
    offset = len(FILLER) if variant & 1 else 0
    if variant & 2:
        buf = bytearray(buf)
    elif variant & 4:
        buf = memoryview(buf)
    whole = call(decoder, WireError, buf, offset)
    if whole.kind == "ok":
        if not 0 < whole.n <= len(body):
            raise Finding(f"{name}: consumed {whole.n} of {len(body)} bytes")
        try:
            wire = encoder(whole.value)
        except LocalProtocolError:
            wire = None
        if wire is not None:
            again = call(decoder, WireError, wire, 0)
            if again.key() != Outcome("ok", whole.value, len(wire)).key():
                raise Finding(f"{name} round trip of {whole.value!r}: {wire.hex()} gives {again.key()}")
    if incremental:
        for shown in {len(body) // 2, len(body) - 1}:
            if 0 <= shown < len(body):
                check_prefix(whole, call(decoder, WireError, buf[: offset + shown], offset), len(body), shown)
