"""Property tests for the codec twins (hypothesis), run against each twin via the ``codec`` fixture.

* Round trip: decode(encode(m)) == m for generated messages of every type, and
  encoding the decoded message gives the same bytes.
* Decoders raise ``WireError`` and nothing else on random bytes and on mutated
  valid messages (never IndexError, struct.error, UnicodeDecodeError...).
* REQ-07: any prefix of an input gives a result consistent with the whole: "need
  more" with a ``needed`` that never overshoots, or the same error as the whole.

(The py-vs-c differential comparison belongs to test_codec_hypothesis.py.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
from codec_api import CodecAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    OptionKind,
    Parity,
    ReplyCode,
    StackCode,
    StackLeg,
)
from socks6fast.errors import WireError
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

# SOCKS6FAST_FUZZ_EXAMPLES raises the budget for a long local run.
FUZZ = settings(
    max_examples=int(os.environ.get("SOCKS6FAST_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KNOWN_KINDS = {int(k) for k in OptionKind}
KNOWN_STACK = {int(c) for c in StackCode}

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
legs = st.sampled_from(list(StackLeg))
# Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP Error, Port Parity: Leg 2 only (review item 3).
remote = st.just(StackLeg.PROXY_REMOTE)
availability = st.sampled_from(list(Availability))


def words(max_words: int, extra: int = 0, min_words: int = 0) -> st.SearchStrategy[bytes]:
    """Byte strings of ``4 * n + extra`` bytes."""
    return st.integers(min_words, max_words).flatmap(
        lambda n: st.binary(min_size=4 * n + extra, max_size=4 * n + extra)
    )


unknown_stack = st.builds(
    lambda t, data: UnknownStackOption(t[0], t[1], t[2], data),
    st.tuples(st.integers(0, 3), st.integers(0, 63), u8).filter(
        lambda t: t[0] == 0 or ((t[1] << 8) | t[2]) not in KNOWN_STACK
    ),
    words(3, extra=2),
)

options: st.SearchStrategy[Option] = st.one_of(
    st.builds(IPTOSOption, legs, u8),
    st.builds(HappyEyeballsOption, remote, availability),
    st.builds(TTLOption, legs, u8),
    st.builds(NoFragmentationOption, legs, availability),
    st.builds(TFOOption, remote, u16),
    st.builds(MultipathOption, remote, availability),
    st.builds(ListenBacklogOption, remote, u16),
    st.builds(UDPErrorOption, remote, availability),
    st.builds(PortParityOption, remote, st.sampled_from(list(Parity)), st.booleans()),
    unknown_stack,
    st.builds(
        AuthMethodAdvertisement,
        st.integers(0, 2**14),
        st.lists(st.integers(1, 255), max_size=10).map(tuple),
    ),
    st.builds(AuthMethodSelection, u8),
    st.builds(AuthData, u8, st.binary(max_size=30)),
    st.sampled_from(
        [
            SessionRequest(),
            SessionOK(),
            SessionInvalid(),
            SessionTeardown(),
            IdempotenceAccepted(),
            IdempotenceRejected(),
        ]
    ),
    st.builds(SessionID, words(4, min_words=1)),
    st.builds(IdempotenceRequest, u32),
    st.builds(IdempotenceWindow, u32, st.integers(1, 2**31 - 1)),
    st.builds(IdempotenceExpenditure, u32),
    st.builds(UnknownOption, u16.filter(lambda k: k not in KNOWN_KINDS), words(4)),
)

ip_addresses = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (AddressType.IPV4, str(a))),
    st.ip_addresses(v=6).map(lambda a: (AddressType.IPV6, str(a))),
)
addresses = st.one_of(
    ip_addresses,
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=70)
    .filter(lambda s: len(s.encode("utf-8")) <= 255)
    .map(lambda s: (AddressType.DOMAIN_NAME, s)),
)
option_lists = st.lists(options, max_size=6).map(tuple)


def _kind(option: Option) -> int:
    return int.from_bytes(_codec_py.encode_options((option,))[:2], "big")


def placed_lists(*kinds: OptionKind) -> st.SearchStrategy[tuple[Option, ...]]:
    """Option runs of the kinds a message may carry (REQ-06: others decode as UnknownOption)."""
    allowed = {int(k) for k in kinds}
    return st.lists(
        options.filter(lambda o: _kind(o) in allowed or _kind(o) not in KNOWN_KINDS), max_size=6
    ).map(tuple)


request_options = placed_lists(
    OptionKind.STACK,
    OptionKind.AUTH_METHOD_ADVERTISEMENT,
    OptionKind.AUTH_DATA,
    OptionKind.SESSION_REQUEST,
    OptionKind.SESSION_ID,
    OptionKind.SESSION_TEARDOWN,
    OptionKind.IDEMPOTENCE_REQUEST,
    OptionKind.IDEMPOTENCE_EXPENDITURE,
)
auth_reply_options = placed_lists(
    OptionKind.AUTH_METHOD_SELECTION,
    OptionKind.AUTH_DATA,
    OptionKind.SESSION_OK,
    OptionKind.SESSION_INVALID,
    OptionKind.SESSION_ID,
    OptionKind.IDEMPOTENCE_WINDOW,
    OptionKind.IDEMPOTENCE_ACCEPTED,
    OptionKind.IDEMPOTENCE_REJECTED,
)
operation_reply_options = placed_lists(OptionKind.STACK, OptionKind.SESSION_ID)


def _request(
    command: Command, address: tuple[AddressType, str], port: int, opts: tuple[Option, ...]
) -> Request:
    if command == Command.NOOP:  # REQ-04: a NOOP is sent to the zero address and port 0
        return Request(command, AddressType.IPV4, "0.0.0.0", 0, opts)
    return Request(command, address[0], address[1], port, opts)


requests = st.builds(_request, st.sampled_from(list(Command)), addresses, u16, request_options)
operation_replies = st.builds(
    lambda c, a, p, o: OperationReply(c, a[0], a[1], p, o),
    st.sampled_from(list(ReplyCode)),
    addresses,
    u16,
    operation_reply_options,
)
auth_replies = st.builds(AuthReply, st.sampled_from(list(AuthReplyType)), auth_reply_options)
association_ids = st.binary(min_size=8, max_size=8)


def _datagram(aid: bytes, address: tuple[AddressType, str], port: int, payload: bytes) -> Datagram:
    length = _codec_py.datagram_header_length(address[0], address[1]) + len(payload)
    return Datagram(DatagramHeader(aid, address[0], address[1], port, length), payload)


association_messages = st.one_of(
    st.builds(AssociationInit, association_ids),
    st.builds(AssociationConfirmation, association_ids),
    st.builds(_datagram, association_ids, addresses, u16, st.binary(max_size=40)),
    st.builds(
        lambda aid, a, p, r, code: DatagramError(aid, a[0], a[1], p, r[0], r[1], code),
        association_ids,
        ip_addresses,
        u16,
        ip_addresses,
        st.sampled_from(list(DatagramErrorCode)),
    ).filter(  # "Datagram too big (IPv6 only)" (review item 5)
        lambda e: (
            e.error_code != DatagramErrorCode.DATAGRAM_TOO_BIG
            or e.address_type == e.reporter_address_type == AddressType.IPV6
        )
    ),
)


def normalize(message: Any) -> Any:
    """What a message decodes back to: Authentication Data keeps the encoder's padding."""
    if isinstance(message, AuthData):
        pad = -(1 + len(message.data)) % 4
        return AuthData(message.method, message.data + bytes(pad))
    if isinstance(message, Request | OperationReply | AuthReply):
        return dataclasses.replace(message, options=tuple(map(normalize, message.options)))
    return message


KINDS: dict[str, tuple[st.SearchStrategy[Any], str, str]] = {
    "request": (requests, "encode_request", "decode_request"),
    "operation_reply": (operation_replies, "encode_operation_reply", "decode_operation_reply"),
    "auth_reply": (auth_replies, "encode_auth_reply", "decode_auth_reply"),
    "association": (association_messages, "encode_association_message", "decode_association_message"),
}
STREAM_DECODERS = [k[2] for k in KINDS.values()]
ALL_DECODERS = [*STREAM_DECODERS, "decode_datagram_header", "decode_options"]

any_message = st.sampled_from(sorted(KINDS)).flatmap(lambda k: KINDS[k][0].map(lambda m: (k, m)))


@FUZZ
@given(item=any_message)
def test_round_trip(codec: CodecAPI, item: tuple[str, Any]) -> None:
    kind, message = item
    _, encode_name, decode_name = KINDS[kind]
    encode: Callable[[Any], bytes] = getattr(codec, encode_name)
    decode: Callable[..., tuple[Any, int]] = getattr(codec, decode_name)
    wire = encode(message)
    decoded, used = decode(wire)
    assert used == len(wire)
    assert decoded == normalize(message)
    assert encode(decoded) == wire


@FUZZ
@given(option_run=option_lists)
def test_options_round_trip(codec: CodecAPI, option_run: tuple[Option, ...]) -> None:
    wire = codec.encode_options(option_run)
    assert codec.decode_options(wire) == tuple(map(normalize, option_run))


datagrams = st.builds(_datagram, association_ids, addresses, u16, st.binary(max_size=40))


@FUZZ
@given(datagram=datagrams)
def test_datagram_header_matches_stream(codec: CodecAPI, datagram: Datagram) -> None:
    header = datagram.header
    out = bytearray(header.message_length + 3)
    written = codec.encode_datagram_header(header, out, 3)
    assert written == codec.datagram_header_length(header.address_type, header.address)
    assert codec.decode_datagram_header(out, 3) == (header, written)


def _call(decode: Callable[..., Any], data: bytes) -> tuple[str, Any]:
    try:
        return "ok", decode(data)
    except WireError as exc:
        return "error", (type(exc), str(exc), exc.reply_code)


def _check_only_wire_errors(codec: CodecAPI, data: bytes) -> None:
    for name in ALL_DECODERS:
        _call(getattr(codec, name), data)  # anything but WireError propagates and fails


def _check_prefixes_consistent(decode: Callable[..., tuple[Any, int]], data: bytes) -> None:
    """REQ-07: every prefix agrees with the whole input."""
    status, whole = _call(decode, data)
    if len(data) <= 96:
        cuts = range(len(data))
    else:
        cuts = range(0, len(data), max(1, len(data) // 64))
    for k in cuts:
        pstatus, part = _call(decode, data[:k])
        if status == "ok" and whole[0] is not None:
            used = whole[1]
            if k >= used:
                assert (pstatus, part) == (status, whole)
            else:
                assert pstatus == "ok" and part[0] is None and 0 < part[1] <= used - k
        elif status == "ok":
            assert pstatus == "ok" and part[0] is None and 0 < part[1] <= len(data) + whole[1] - k
        else:
            # an error is raised at its offending byte: earlier prefixes need more, later ones agree
            assert (pstatus == "ok" and part[0] is None and part[1] > 0) or (pstatus, part) == (status, whole)


@FUZZ
@given(data=st.binary(max_size=80))
def test_random_bytes_raise_only_wire_error(codec: CodecAPI, data: bytes) -> None:
    _check_only_wire_errors(codec, data)


@pytest.mark.conformance("REQ-07")
@FUZZ
@given(
    prefix=st.sampled_from([b"\x06\x00", b"\x06\x01", b"\x06\x02", b"\x06\x03", b"\x06\x04"]),
    length=st.sampled_from([b"\x00\x00", b"\x00\x04", b"\x00\x08", b"\x00\x0c", b"\x00\x14", b"\x00\x1c"]),
    rest=st.binary(max_size=60),
)
def test_plausible_headers_raise_only_wire_error(
    codec: CodecAPI, prefix: bytes, length: bytes, rest: bytes
) -> None:
    data = prefix + length + rest
    _check_only_wire_errors(codec, data)
    for name in STREAM_DECODERS:
        _check_prefixes_consistent(getattr(codec, name), data)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "insert", "delete", "truncate"]))
        if not buf:
            buf.append(draw(u8))
            continue
        i = draw(st.integers(0, len(buf) - 1))
        if op == "set":
            buf[i] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x3F, 0x40, 0x80, 0xC0, 0xFF]) | u8)
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 4))]
        else:
            del buf[i:]
    return bytes(buf)


@pytest.mark.conformance("REQ-07")
@FUZZ
@given(item=any_message, data=st.data())
def test_mutated_messages_raise_only_wire_error(
    codec: CodecAPI, item: tuple[str, Any], data: st.DataObject
) -> None:
    kind, message = item
    wire = getattr(_codec_py, KINDS[kind][1])(message)
    mutated = mutate(wire, data.draw)
    _check_only_wire_errors(codec, mutated)
    _check_prefixes_consistent(getattr(codec, KINDS[kind][2]), mutated)
    # options alone, the way the connection layer may walk them
    if kind != "association":
        options_wire = _codec_py.encode_options(message.options)
        _call(codec.decode_options, mutate(options_wire, data.draw) if options_wire else b"")


@pytest.mark.conformance("REQ-07")
@FUZZ
@given(option_run=option_lists, data=st.data())
def test_mutated_options_raise_only_wire_error(
    codec: CodecAPI, option_run: tuple[Option, ...], data: st.DataObject
) -> None:
    wire = _codec_py.encode_options(option_run)
    mutated = mutate(wire, data.draw)
    _call(codec.decode_options, mutated)
    header = b"\x06\x00" + (len(mutated) & ~3).to_bytes(2, "big")
    _check_prefixes_consistent(codec.decode_auth_reply, header + mutated)
