"""The two codec twins agree (yarl tests/test_quoting_hypothesis.py; STYLE.md 3.1 and 7).

``_codec_py`` is the truth. For every public function of the contract
(tests/codec_api.py) both twins get the same input and must give the same
outcome: equal results with equal ``repr`` (so an ``int`` where the reference
has an enum member, or ``bytearray`` for ``bytes``, is caught), or the same
exception class with the same ``reply_code`` and the same message text.

Inputs: random bytes (with and without a plausible header), valid messages
generated field by field and then mutated (byte flips, truncation, insertion,
deletion, rewritten length fields), valid messages for the encoders, and
messages whose fields are drawn from valid and invalid values (wrong types, out
of range, surrogates, NULs) to compare the encoders' refusals.

Budget: the raw-bytes fuzz of the decoders runs ``RAW_EXAMPLES`` (10,000)
examples, each fed to every decoder of both twins; the other properties run
fewer. ``SOCKS6FAST_HYPOTHESIS_SCALE`` multiplies every budget for a long local
run (e.g. 10).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
)
from socks6fast.errors import Socks6Error
from socks6fast.proto import _codec_py
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
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

pytestmark = [
    pytest.mark.c_extension,
    pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run"),
]

_codec_c: ModuleType = pytest.importorskip("socks6fast.proto._codec_c")
PY: ModuleType = importlib.import_module("socks6fast.proto._codec_py")
assert PY is _codec_py

_SCALE = int(os.environ.get("SOCKS6FAST_HYPOTHESIS_SCALE", "1"))
RAW_EXAMPLES = 10_000 * _SCALE
MESSAGE_EXAMPLES = 1_000 * _SCALE
SMALL_EXAMPLES = 300 * _SCALE


def _budget(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- Comparing outcomes ------------------------------------------------------------


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - every failure is part of the outcome
        if isinstance(exc, Socks6Error):
            return ("raise", type(exc), getattr(exc, "reply_code", None), str(exc))
        # Builtin errors from exotic inputs: same class is enough (texts come
        # from different CPython call sites).
        return ("raise", type(exc))
    return ("return", result, repr(result))


def same(name: str, *args: Any) -> tuple[Any, ...]:
    """Call ``name`` on both twins with the same arguments; assert the outcomes agree."""
    expected = _outcome(getattr(PY, name), *args)
    got = _outcome(getattr(_codec_c, name), *args)
    assert got == expected, f"{name}{args!r}: py={expected!r} c={got!r}"
    return expected


_DECODERS = (
    "decode_request",
    "decode_operation_reply",
    "decode_auth_reply",
    "decode_association_message",
    "decode_datagram_header",
    "decode_options",
)


def _buffer(data: bytes, kind: str) -> bytes | bytearray | memoryview:
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "wide":  # items of 4 bytes when the length allows: offsets stay in bytes
        return memoryview(data).cast("I") if len(data) % 4 == 0 else memoryview(data)
    if kind == "strided":  # not contiguous: WireError with reply_code None (review item 10)
        return memoryview(bytes(x for b in data for x in (b, 0)))[::2]
    return data


buffer_kinds = st.sampled_from(["bytes", "bytearray", "memoryview", "wide", "bytes", "strided"])


def decode_everything(data: bytes, offset: int = 0, cap: int | None = None, kind: str = "bytes") -> None:
    """Every decoder of both twins on the same data (as bytes, bytearray or memoryview)."""
    buf = _buffer(data, kind)
    for name in _DECODERS:
        if cap is not None and name in ("decode_request", "decode_operation_reply", "decode_auth_reply"):
            same(name, buf, offset, cap)
        else:
            same(name, buf, offset)
    # decode_options with an explicit length, in range or not.
    same("decode_options", buf, offset, len(data) - offset)
    same("decode_options", buf, offset, len(data) - offset + 4)
    # ... and in the context of each message (REQ-06: misplaced kinds are opaque).
    for context in (Request, AuthReply, OperationReply):
        same("decode_options", buf, offset, -1, context)


# --- Strategies: valid fields ----------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
legs = st.sampled_from(list(StackLeg))
# Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP Error, Port Parity: Leg 2 only (review item 3).
remote = st.just(StackLeg.PROXY_REMOTE)
availabilities = st.sampled_from(list(Availability))
ipv4_text = st.ip_addresses(v=4).map(str)
# Includes IPv4-mapped (::ffff:a.b.c.d) and other special ranges.
ipv6_text = st.one_of(
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["::", "::1", "::ffff:1.2.3.4", "1::", "1:0:0:1::", "2001:db8::1:0:0:1", "fe80::1"]),
)
names = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}\.){0,4}[a-z]{1,10}", fullmatch=True),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=80),
).filter(lambda s: 0 < len(s.encode("utf-8")) <= 255)


@st.composite
def addresses(draw: st.DrawFn) -> tuple[AddressType, str]:
    address_type = draw(st.sampled_from(list(AddressType)))
    if address_type == AddressType.IPV4:
        return address_type, draw(ipv4_text)
    if address_type == AddressType.IPV6:
        return address_type, draw(ipv6_text)
    return address_type, draw(names)


def _aligned(n: int) -> st.SearchStrategy[bytes]:
    """Bytes whose length is n modulo 4."""
    return st.integers(0, 12).flatmap(lambda k: st.binary(min_size=4 * k + n, max_size=4 * k + n))


valid_options: st.SearchStrategy[Option] = st.one_of(
    st.builds(IPTOSOption, legs, u8),
    st.builds(HappyEyeballsOption, remote, availabilities),
    st.builds(TTLOption, legs, u8),
    st.builds(NoFragmentationOption, legs, availabilities),
    st.builds(TFOOption, remote, u16),
    st.builds(MultipathOption, remote, availabilities),
    st.builds(ListenBacklogOption, remote, u16),
    st.builds(UDPErrorOption, remote, availabilities),
    st.builds(PortParityOption, remote, st.sampled_from(list(Parity)), st.booleans()),
    st.builds(UnknownStackOption, st.just(0), st.integers(0, 63), u8, _aligned(2)),
    st.builds(UnknownStackOption, st.integers(1, 3), st.sampled_from([0, 2, 3, 6, 63]), u8, _aligned(2)),
    # A known (Level, Code) with a value or length draft-11 does not define (review item 2).
    st.builds(
        UnknownStackOption,
        st.integers(1, 3),
        st.just(1),
        st.just(2),
        st.sampled_from([b"\x00\x00", b"\x03\x00"]),
    ),
    st.builds(
        UnknownStackOption,
        st.integers(1, 3),
        st.just(5),
        st.just(2),
        st.sampled_from([b"\x03\x00", b"\x01\x02"]),
    ),
    st.builds(
        UnknownStackOption,
        st.integers(1, 3),
        st.just(1),
        st.just(3),
        _aligned(2).filter(lambda d: len(d) > 2),
    ),
    st.builds(
        AuthMethodAdvertisement,
        st.integers(0, 2**14),
        st.lists(st.integers(1, 0xFF), max_size=9).map(tuple),
    ),
    st.builds(AuthMethodSelection, u8),
    st.builds(AuthData, u8, st.binary(max_size=40)),
    st.just(SessionRequest()),
    st.builds(SessionID, _aligned(0).filter(bool)),
    st.just(SessionOK()),
    st.just(SessionInvalid()),
    st.just(SessionTeardown()),
    st.builds(IdempotenceRequest, u32),
    st.builds(IdempotenceWindow, u32, st.integers(1, 2**31 - 1)),
    st.builds(IdempotenceExpenditure, u32),
    st.just(IdempotenceAccepted()),
    st.just(IdempotenceRejected()),
    st.builds(UnknownOption, st.sampled_from([0, 7, 16, 100, 64512, 0xFFFF]), _aligned(0)),
)
option_runs = st.lists(valid_options, max_size=6).map(tuple)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    command = draw(st.sampled_from(list(Command)))
    if command == Command.NOOP:  # REQ-04: only the zero address and port 0
        zero = draw(st.sampled_from([(AddressType.IPV4, "0.0.0.0"), (AddressType.IPV6, "::")]))
        return Request(command, zero[0], zero[1], 0, draw(option_runs))
    address_type, address = draw(addresses())
    return Request(command, address_type, address, draw(u16), draw(option_runs))


@st.composite
def operation_replies(draw: st.DrawFn) -> OperationReply:
    address_type, address = draw(addresses())
    code = draw(st.sampled_from(list(ReplyCode)))
    return OperationReply(code, address_type, address, draw(u16), draw(option_runs))


auth_replies = st.builds(AuthReply, st.sampled_from(list(AuthReplyType)), option_runs)
association_ids = st.binary(min_size=8, max_size=8)


@st.composite
def datagram_headers(draw: st.DrawFn, payload_length: int | None = None) -> DatagramHeader:
    address_type, address = draw(addresses())
    header_length = _codec_py.datagram_header_length(address_type, address)
    extra = draw(st.integers(0, 64)) if payload_length is None else payload_length
    return DatagramHeader(draw(association_ids), address_type, address, draw(u16), header_length + extra)


@st.composite
def datagrams(draw: st.DrawFn) -> Datagram:
    payload = draw(st.binary(max_size=40))
    return Datagram(draw(datagram_headers(len(payload))), payload)


@st.composite
def datagram_errors(draw: st.DrawFn) -> DatagramError:
    def ip() -> tuple[AddressType, str]:
        if draw(st.booleans()):
            return AddressType.IPV4, draw(ipv4_text)
        return AddressType.IPV6, draw(ipv6_text)

    (address_type, address), (reporter_type, reporter) = ip(), ip()
    codes = list(DatagramErrorCode)
    if not address_type == reporter_type == AddressType.IPV6:  # "Datagram too big (IPv6 only)"
        codes.remove(DatagramErrorCode.DATAGRAM_TOO_BIG)
    return DatagramError(
        draw(association_ids),
        address_type,
        address,
        draw(u16),
        reporter_type,
        reporter,
        draw(st.sampled_from(codes)),
    )


association_messages = st.one_of(
    st.builds(AssociationInit, association_ids),
    st.builds(AssociationConfirmation, association_ids),
    datagrams(),
    datagram_errors(),
)

# (encoder, decoder, message strategy) for every stream message.
_KINDS: list[tuple[str, str, st.SearchStrategy[Any]]] = [
    ("encode_request", "decode_request", requests()),
    ("encode_operation_reply", "decode_operation_reply", operation_replies()),
    ("encode_auth_reply", "decode_auth_reply", auth_replies),
    ("encode_association_message", "decode_association_message", association_messages),
    ("encode_options", "decode_options", option_runs),
]
encoded_messages = st.sampled_from(_KINDS).flatmap(
    lambda kind: st.tuples(st.just(kind[0]), st.just(kind[1]), kind[2])
)


# --- Strategies: wild field values for the encoders --------------------------------

junk = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.integers(250, 260),
    st.integers(65530, 65540),
    st.integers(2**31 - 2, 2**31 + 1),
    st.integers(2**32 - 1, 2**32),
    st.integers(2**63, 2**64 + 5),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.binary(max_size=9),
    st.just(bytearray(b"\x00\x01\x02\x03")),
    st.just(memoryview(b"abcdefgh")),
    st.just(()),
)


def wild(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values, sometimes junk, so that refusals are compared field by field."""
    return st.one_of(valid, valid, valid, junk)


wild_text = st.one_of(
    ipv4_text,
    ipv6_text,
    names,
    st.sampled_from(
        [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.256",
            "1.2.3.04",
            "0.0.0.0",
            "1..2.3",
            ".1.2.3",
            "1.2.3.",
            "١.٢.٣.٤",
            "1.2.3.4/32",
            " 1.2.3.4",
            "fe80::1%eth0",
            "::1%1",
            "a\x00b",
            "\ud800",
            "x" * 255,
            "x" * 256,
            "é" * 128,
            ":::",
            "1:2:3:4:5:6:7:8:9",
            "::ffff:1.2.3.256",
        ]
    ),
    st.text(max_size=12),
    st.text(alphabet="0123456789.:abcdef%", max_size=20),
)

wild_options: st.SearchStrategy[Any] = st.one_of(
    valid_options,
    st.builds(IPTOSOption, wild(legs), wild(u8)),
    st.builds(HappyEyeballsOption, wild(legs), wild(availabilities)),
    st.builds(TTLOption, wild(legs), wild(u8)),
    st.builds(NoFragmentationOption, wild(legs), wild(availabilities)),
    st.builds(TFOOption, wild(legs), wild(u16)),
    st.builds(MultipathOption, wild(legs), wild(availabilities)),
    st.builds(ListenBacklogOption, wild(legs), wild(u16)),
    st.builds(UDPErrorOption, wild(legs), wild(availabilities)),
    st.builds(PortParityOption, wild(legs), wild(st.sampled_from(list(Parity))), wild(st.booleans())),
    st.builds(
        UnknownStackOption, wild(st.integers(0, 3)), wild(st.integers(0, 63)), wild(u8), wild(_aligned(2))
    ),
    st.builds(AuthMethodAdvertisement, wild(st.integers(0, 2**14)), wild(st.lists(wild(u8), max_size=5))),
    st.builds(AuthMethodSelection, wild(u8)),
    st.builds(AuthData, wild(u8), wild(st.binary(max_size=20))),
    st.builds(SessionID, wild(_aligned(0))),
    st.builds(IdempotenceRequest, wild(u32)),
    st.builds(IdempotenceWindow, wild(u32), wild(st.integers(0, 2**31))),
    st.builds(IdempotenceExpenditure, wild(u32)),
    st.builds(UnknownOption, wild(st.sampled_from([0, 1, 7, 15, 16, 64512])), wild(_aligned(0))),
    st.builds(AuthData, st.just(2), st.binary(min_size=65528, max_size=65535)),
    junk,
)
wild_option_runs = wild(st.lists(wild_options, max_size=4).map(tuple))
wild_address_types = wild(st.sampled_from(list(AddressType)))


# =================================================================================
# Decoders: random bytes
# =================================================================================


def _option_bytes(kind: int, length: int, body: bytes = b"") -> bytes:
    return kind.to_bytes(2, "big") + length.to_bytes(2, "big") + body


def _plausible_prefixes() -> list[bytes]:
    """Starts of messages that get fuzzing past the first bytes; a random tail follows.

    Precomputed (generating them field by field costs hypothesis 3x more per example).
    """
    options = [b""]
    for kind in range(17):
        options += [_option_bytes(kind, length) for length in (0, 4, 8, 12)]
    for leg in range(4):
        for level, code in ((1, 1), (1, 2), (1, 3), (1, 4), (4, 1), (4, 2), (4, 3), (5, 1), (5, 2), (2, 1)):
            for length in (8, 12):
                options.append(_option_bytes(1, length, bytes([leg << 6 | level, code])))
    options += [_option_bytes(2, 8, b"\x40\x01"), _option_bytes(12, 12, bytes(4))]
    prefixes = [b"", b"\x06"] + [bytes([6, code]) for code in (0, 1, 2, 3, 4, 5, 9)]
    for code in (0, 1, 3, 9):
        for options_length in (0, 4, 8, 12, 13, 0x4004):
            for atyp in (1, 3, 4, 5):
                header = (
                    bytes([6, code]) + options_length.to_bytes(2, "big") + b"\x01\xbb\x00" + bytes([atyp])
                )
                prefixes.append(header)
                if atyp == 3:
                    prefixes += [header + bytes([n]) for n in (0, 1, 3, 7)]
        prefixes += [bytes([6, code & 1]) + n.to_bytes(2, "big") for n in (0, 4, 8, 12, 16)]
    for message_length in (12, 19, 20, 24, 28, 32, 40):
        for atyp in (1, 3, 4, 5):
            prefixes.append(
                bytes([6, 3]) + message_length.to_bytes(2, "big") + bytes(8) + bytes([atyp, 0, 0, 53])
            )
        prefixes += [bytes([6, t]) + message_length.to_bytes(2, "big") + bytes(8) for t in (1, 2, 4)]
    for atyp in (1, 3, 4):
        for reporter in (1, 3, 4, 5):
            for error_code in (0, 1, 4, 5):
                address = bytes(4 if atyp == 1 else 16)
                total = 16 + len(address) + 4 + (4 if reporter == 1 else 16)
                prefixes.append(
                    bytes([6, 4])
                    + total.to_bytes(2, "big")
                    + bytes(8)
                    + bytes([atyp, 0, 0, 53])
                    + address
                    + bytes([reporter, error_code, 0, 0])
                )
    return prefixes + options


plausible = st.tuples(st.sampled_from(_plausible_prefixes()), st.binary(max_size=40)).map(b"".join)


@pytest.mark.conformance("REQ-07")
@_budget(RAW_EXAMPLES)
@given(plausible, st.integers(0, 3), buffer_kinds)
def test_decoders_agree_on_random_bytes(data: bytes, prefix: int, kind: str) -> None:
    """REQ-07, D6, D8: every decoder, both twins, same outcome on arbitrary bytes."""
    # At offset 0, or behind a prefix at an offset.
    decode_everything(bytes(prefix) + data, prefix, kind=kind)


@_budget(SMALL_EXAMPLES)
@given(st.binary(max_size=40), st.integers(-(2**70), 2**70), st.integers(-5, 70000))
def test_decoders_agree_on_offsets_and_caps(data: bytes, offset: int, cap: int) -> None:
    """Offsets outside the data and any Options Length cap (D6) give the same outcome."""
    decode_everything(data, offset % (len(data) + 3) if offset % 2 else offset, cap)
    for name in ("decode_request", "decode_operation_reply", "decode_auth_reply"):
        same(name, b"\x06\x00" + (cap % 65536).to_bytes(2, "big") + bytes(8), 0, cap)
    same("decode_options", data, 0, offset)


# =================================================================================
# Valid messages: encoders agree byte for byte, decoders agree on the encoding,
# on every prefix of it (REQ-07) and on mutations of it
# =================================================================================


@pytest.mark.conformance("REQ-07")
@_budget(MESSAGE_EXAMPLES)
@given(encoded_messages)
def test_valid_messages_agree(item: tuple[str, str, Any]) -> None:
    """Encoding agrees byte for byte; decoding the bytes and every prefix agrees (REQ-07)."""
    encoder, decoder, message = item
    outcome = same(encoder, message)
    assert outcome[0] == "return", outcome
    wire = outcome[1]
    decoded = same(decoder, wire)
    if decoder != "decode_options":
        assert decoded[0] == "return" and decoded[1][1] == len(wire)
        for cut in range(len(wire)):
            same(decoder, wire[:cut])
        # Inside a larger buffer, at an offset, as bytearray and memoryview.
        for kind in ("bytearray", "memoryview"):
            same(decoder, _buffer(b"\xff" * 3 + wire + b"\x00" * 5, kind), 3)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    _, _, message = draw(encoded_messages)
    wire = bytearray(_codec_py_encode(message))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if not wire:
            break
        i = draw(st.integers(0, len(wire) - 1))
        if op == "flip":
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            wire[i] = draw(u8)
        elif op == "truncate":
            del wire[i:]
        elif op == "insert":
            wire[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del wire[i : i + draw(st.integers(1, 8))]
        elif len(wire) >= 4:  # rewrite a length field (Options/Message Length or an option's)
            j = draw(st.sampled_from([2] + list(range(2, len(wire) - 1, 4))))
            wire[j : j + 2] = draw(u16).to_bytes(2, "big")
    return bytes(wire)


def _codec_py_encode(message: Any) -> bytes:
    if isinstance(message, Request):
        return bytes(_codec_py.encode_request(message))
    if isinstance(message, OperationReply):
        return bytes(_codec_py.encode_operation_reply(message))
    if isinstance(message, AuthReply):
        return bytes(_codec_py.encode_auth_reply(message))
    if isinstance(message, tuple):
        return bytes(_codec_py.encode_options(message))
    return bytes(_codec_py.encode_association_message(message))


@pytest.mark.conformance("REQ-05")
@_budget(MESSAGE_EXAMPLES)
@given(mutated(), buffer_kinds)
def test_decoders_agree_on_mutated_messages(wire: bytes, kind: str) -> None:
    """Malformed variants of valid messages: same message or same WireError (REQ-05, D2, D8)."""
    decode_everything(wire, kind=kind)


# =================================================================================
# Datagram Header (per packet)
# =================================================================================


@pytest.mark.conformance("UDP-05")
@_budget(MESSAGE_EXAMPLES)
@given(datagram_headers(), st.integers(0, 8), st.sampled_from(["bytearray", "memoryview"]))
def test_datagram_header_agrees(header: DatagramHeader, offset: int, kind: str) -> None:
    """encode_datagram_header writes the same bytes and returns the same length; decoding agrees (UDP-05)."""
    size = offset + 300
    out_py, out_c = bytearray(size), bytearray(size)
    target_c: bytearray | memoryview = out_c if kind == "bytearray" else memoryview(out_c)
    expected = _outcome(_codec_py.encode_datagram_header, header, out_py, offset)
    got = _outcome(_codec_c.encode_datagram_header, header, target_c, offset)
    assert got == expected
    assert out_c == out_py
    n = expected[1]
    same("datagram_header_length", header.address_type, header.address)
    datagram = bytes(out_py[offset : offset + n]) + bytes(header.message_length - n) + b"pad"
    decoded = same("decode_datagram_header", datagram)
    assert decoded[1] == (header if header.address_type != AddressType.IPV6 else decoded[1][0], n)
    for cut in range(n):
        same("decode_datagram_header", datagram[:cut])


@st.composite
def wild_datagram_headers(draw: st.DrawFn) -> DatagramHeader:
    return DatagramHeader(
        draw(wild(association_ids)),
        draw(wild_address_types),
        draw(wild(wild_text)),
        draw(wild(u16)),
        draw(wild(st.integers(0, 300))),
    )


@_budget(MESSAGE_EXAMPLES)
@given(
    wild_datagram_headers(),
    st.integers(0, 300),
    st.integers(-2, 300),
    st.sampled_from(["bytearray", "memoryview", "bytes", "readonly"]),
)
def test_datagram_header_refusals_agree(header: DatagramHeader, size: int, offset: int, kind: str) -> None:
    """Illegal headers, small buffers, bad offsets and read-only buffers: same outcome."""
    outs = []
    for _ in range(2):
        buf = bytearray(size)
        target: Any = {
            "bytearray": buf,
            "memoryview": memoryview(buf),
            "bytes": bytes(size),
            "readonly": memoryview(bytes(size)),
        }[kind]
        outs.append((buf, target))
    expected = _outcome(_codec_py.encode_datagram_header, header, outs[0][1], offset)
    got = _outcome(_codec_c.encode_datagram_header, header, outs[1][1], offset)
    assert got == expected
    assert outs[0][0] == outs[1][0]
    same("datagram_header_length", header.address_type, header.address)


# =================================================================================
# Encoders: refusals of illegal field values
# =================================================================================


@st.composite
def wild_messages(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(
        st.sampled_from(["request", "reply", "auth", "options", "assoc", "datagram", "error", "junk"])
    )
    if kind == "request":
        return "encode_request", Request(
            draw(wild(st.sampled_from(list(Command)))),
            draw(wild_address_types),
            draw(wild(wild_text)),
            draw(wild(u16)),
            draw(wild_option_runs),
        )
    if kind == "reply":
        return "encode_operation_reply", OperationReply(
            draw(wild(st.sampled_from(list(ReplyCode)))),
            draw(wild_address_types),
            draw(wild(wild_text)),
            draw(wild(u16)),
            draw(wild_option_runs),
        )
    if kind == "auth":
        return "encode_auth_reply", AuthReply(
            draw(wild(st.sampled_from(list(AuthReplyType)))), draw(wild_option_runs)
        )
    if kind == "options":
        return "encode_options", draw(st.one_of(st.lists(wild_options, max_size=4), wild_option_runs))
    if kind == "assoc":
        cls = draw(st.sampled_from([AssociationInit, AssociationConfirmation]))
        return "encode_association_message", cls(draw(wild(association_ids)))
    if kind == "datagram":
        header = draw(st.one_of(wild_datagram_headers(), datagram_headers(), junk))
        return "encode_association_message", Datagram(header, draw(wild(st.binary(max_size=20))))
    if kind == "error":
        return "encode_association_message", DatagramError(
            draw(wild(association_ids)),
            draw(wild(st.sampled_from([AddressType.IPV4, AddressType.IPV6]))),
            draw(wild(wild_text)),
            draw(wild(u16)),
            draw(wild(st.sampled_from([AddressType.IPV4, AddressType.IPV6, 1.0, 4.0]))),
            draw(wild(wild_text)),
            draw(wild(st.sampled_from(list(DatagramErrorCode)))),
        )
    return draw(st.sampled_from(["encode_request", "encode_association_message", "encode_options"])), draw(
        junk
    )


@_budget(MESSAGE_EXAMPLES)
@given(wild_messages())
def test_encoder_refusals_agree(item: tuple[str, Any]) -> None:
    """Every encoder: same bytes, or the same LocalProtocolError text for the first illegal field."""
    name, message = item
    same(name, message)


@_budget(SMALL_EXAMPLES)
@given(wild_address_types, wild(wild_text))
def test_datagram_header_length_agrees(address_type: Any, address: Any) -> None:
    """datagram_header_length checks only the type and a name's UTF-8 length."""
    same("datagram_header_length", address_type, address)


@pytest.mark.conformance("REQ-01")
def test_version_mismatch_agrees() -> None:
    """REQ-01: the Version Mismatch Reply is the single byte 6 in both twins."""
    assert same("encode_version_mismatch") == ("return", b"\x06", repr(b"\x06"))


def test_decoded_enums_are_the_reference_members() -> None:
    """Enum fields hold the very IntEnum members (not ints) the reference returns."""
    wire = _codec_py.encode_request(
        Request(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 80, (TTLOption(StackLeg.BOTH, 5),))
    )
    request_py, _ = _codec_py.decode_request(wire)
    request_c, _ = _codec_c.decode_request(wire)
    assert request_py is not None and request_c is not None
    assert request_c.command is request_py.command is Command.CONNECT
    assert request_c.address_type is AddressType.IPV4
    option = request_c.options[0]
    assert isinstance(option, TTLOption) and option.leg is StackLeg.BOTH
    assert hash(request_c) == hash(request_py)


@pytest.mark.parametrize(
    "packed",
    [
        bytes(16),
        bytes(15) + b"\x01",
        bytes(10) + b"\xff\xff\x01\x02\x03\x04",  # IPv4-mapped: text differs across Python versions
        bytes(12) + b"\x01\x02\x03\x04",
        b"\x00\x01" + bytes(14),
        b"\x20\x01\x0d\xb8" + bytes(4) + b"\x00\x01" + bytes(6),
        bytes.fromhex("00010000000100000001000000010000"),
        bytes.fromhex("ffffffffffffffffffffffffffffffff"),
    ],
)
def test_ipv6_text_matches_ipaddress(packed: bytes) -> None:
    """IPv6 text equals str(ipaddress.IPv6Address(packed)) (glibc inet_ntop differs for ::ffff:0:0/96)."""
    header = b"\x06\x03\x00\x20" + bytes(8) + b"\x04\x00\x00\x35" + packed
    same("decode_datagram_header", header)


class _SubHeader(DatagramHeader):
    """A subclass: the C twin reads its fields by getattr, not from the slots."""


class _SubTTL(TTLOption):
    """An option subclass: matched by isinstance like the reference's match/case."""


class _DuckHeader:
    """Not a DatagramHeader; its association_id is a fresh object on every read."""

    address_type = AddressType.IPV4
    address = "192.0.2.1"
    port = 9
    message_length = 40

    @property
    def association_id(self) -> bytes:
        return bytes(bytearray(b"ABCDEFGH"))


def test_subclasses_and_duck_types_agree() -> None:
    """Encoders accept what the reference accepts beyond the exact message classes."""
    for header in (
        _SubHeader(b"12345678", AddressType.DOMAIN_NAME, "example.org", 53, 40),
        _DuckHeader(),
    ):
        outs = [bytearray(64), bytearray(64)]
        expected = _outcome(_codec_py.encode_datagram_header, header, outs[0])
        assert _outcome(_codec_c.encode_datagram_header, header, outs[1]) == expected
        assert outs[0] == outs[1]
    sub = _SubHeader(b"12345678", AddressType.IPV4, "192.0.2.1", 53, 20 + 3)
    same("encode_association_message", Datagram(sub, b"abc"))
    same("encode_association_message", Datagram(_DuckHeader(), b"abc"))  # type: ignore[arg-type]
    same("encode_options", (_SubTTL(StackLeg.BOTH, 7), TTLOption(StackLeg.BOTH, 7)))
    same("encode_options", [_SubTTL(StackLeg.BOTH, 300)])
