"""UDP ASSOCIATE from the client: the sans-IO association with exact bytes, then both clients on loopback.

Three parts:

* `ClientAssociation` and the `association_init` flow, fed the proxy's bytes as annotated hex
  (STYLE.md section 7): what the client sends (Datagram Headers, the server-mode empty
  datagram and its resends) and how it judges what comes back (order on the TCP stream,
  padding and Message Length on UDP, Error messages with and without opt-in).
* Both client flavours (asyncio and blocking) against `UDPProxy`, a small scripted proxy on
  127.0.0.1 / ::1 with a real TCP listener, a real UDP port and a real remote-side UDP
  socket, with switches for what a client must survive (the first empty datagram lost,
  ICMP error reports, padding, a Message Length beyond the datagram, another association's
  ID).
* Both flavours against the real server (``socks6fast.asyncio.server``), where it relays UDP.

Loopback only; remote hosts are in-process UDP echo servers.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from socks6fast._client_base import udp_request_options
from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
)
from socks6fast.errors import (
    DatagramTooBigError,
    HostUnreachableError,
    ICMPError,
    LocalProtocolError,
    NetworkUnreachableError,
    RemoteProtocolError,
    TTLExpiredError,
)
from socks6fast.proto import codec
from socks6fast.proto.client import ClientConnection, build_request
from socks6fast.proto.client_flow import Close, Read, Steps, Write, association_init
from socks6fast.proto.client_udp import AssociationEnded, ClientAssociation, icmp_error
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    AuthReply,
    Datagram,
    DatagramError,
    DatagramHeader,
    OperationReply,
    Request,
    TTLOption,
)
from socks6fast.proto.states import NEED_DATA, AssociationState


def hx(*fields: str) -> bytes:
    """Join annotated hex fields (spaces allowed) into bytes."""
    return bytes.fromhex("".join(fields).replace(" ", ""))


ID = hx("0102030405060708")
OTHER_ID = hx("ffffffffffffffff")
INIT = hx("06 01 000c", "0102030405060708")  # Association Initialization, Length 12
CONFIRM = hx("06 02 000c", "0102030405060708")  # Association Confirmation, Length 12
#: Datagram from 127.0.0.1:8080 (ATYP 1, padding, port 0x1f90), payload "pong", Length 24.
PONG = hx("06 03 0018", "0102030405060708", "01 00 1f90", "7f000001", "706f6e67")
#: Error message: Host Unreachable (2) for 192.0.2.1:53, reported by 10.0.0.1, Length 28.
HOST_UNREACHABLE = hx("06 04 001c", "0102030405060708", "01 00 0035", "c0000201", "01 02 0000", "0a000001")
#: The server-mode empty datagram: to 0.0.0.0 port 0, no payload, Length 20.
EMPTY = hx("06 03 0014", "0102030405060708", "01 00 0000", "00000000")


def opened(transport: str = "tcp", **kwargs: Any) -> ClientAssociation:
    """An association that has its ID (the Initialization read)."""
    assoc = ClientAssociation(transport=transport, **kwargs)  # type: ignore[arg-type]
    assoc.receive_data(INIT)
    assert assoc.next_event() == AssociationInit(ID)
    return assoc


def drain(assoc: ClientAssociation) -> list[object]:
    events: list[object] = []
    while (event := assoc.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, AssociationEnded):
            break
    return events


# --- What the client sends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "payload", "wire"),
    [
        ("127.0.0.1", 7, b"hi", hx("06 03 0016", "0102030405060708", "01 00 0007", "7f000001", "6869")),
        (
            "[::1]",
            53,
            b"x",
            hx("06 03 0021", "0102030405060708", "04 00 0035", "00000000000000000000000000000001", "78"),
        ),
        # D20: a name goes as ATYP 3 (length byte, name, padding to 4) for the proxy to resolve.
        (
            "echo.test",
            9,
            b"",
            hx("06 03 001c", "0102030405060708", "03 00 0009", "09 6563686f2e74657374 0000"),
        ),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_datagram_header_bytes(host: str, port: int, payload: bytes, wire: bytes) -> None:
    """A Datagram message: Version 6, Type 3, Message Length = header + payload, the ID, then
    ATYP, Padding, Port and the address (D5 order), then the payload; the same bytes for TCP and UDP."""
    for transport in ("tcp", "udp"):
        assert opened(transport).datagram(payload, host, port) == wire


def test_no_datagram_before_the_id_nor_beyond_message_length() -> None:
    """The ID comes with the Initialization; a header plus payload over 65535 bytes has no
    Message Length to carry it."""
    assoc = ClientAssociation(transport="udp")
    with pytest.raises(LocalProtocolError, match="await_init"):
        assoc.datagram(b"x", "127.0.0.1", 7)
    assoc = opened("udp")
    assoc.datagram(bytes(65535 - 20), "127.0.0.1", 7)
    with pytest.raises(LocalProtocolError, match="at most 65515"):
        assoc.datagram(bytes(65535 - 19), "127.0.0.1", 7)


def test_udp_associate_request_carries_udp_error_and_port_parity() -> None:
    """The Request: Command 3, the desired bind address and port, the UDP Error option (Leg 2,
    Level 5, Code 1, Availability 2 "desired") and the Port Parity option (Code 2, Parity 1
    "even", Reserve 1), and any other Stack option (TTL) as given."""
    options = udp_request_options(
        {
            "udp_error": True,
            "port_parity": Parity.EVEN,
            "reserve_port": True,
            "stack_options": [TTLOption(StackLeg.PROXY_REMOTE, 16)],
        }
    )
    request = build_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0, options=options)
    assert codec.encode_request(request) == hx(
        "06 03 0018",  # Version 6, UDP ASSOCIATE, Options Length 24
        "0000 00 01 00000000",  # Port 0, Padding, ATYP 1, 0.0.0.0
        "0001 0008 81 03 10 00",  # TTL: Leg 2 | Level 1 (0x81), Code 3, TTL 16
        "0001 0008 85 01 02 00",  # UDP Error: Leg 2 | Level 5, Code 1, Availability 2
        "0001 0008 85 02 01 01",  # Port Parity: Code 2, even, reserve
    )
    assert udp_request_options({}) == ()
    with pytest.raises(ValueError, match="reserve_port needs port_parity"):
        udp_request_options({"reserve_port": True})


# --- What the client reads on the TCP stream -----------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_stream_messages_in_any_chunking(chunk: int) -> None:
    """Initialization, Confirmation, a Datagram and an Error message on the TCP stream, read in
    chunks of any size; EOF between messages ends the association."""
    assoc = ClientAssociation(transport="tcp", udp_error=True)
    stream = INIT + CONFIRM + PONG + HOST_UNREACHABLE
    events: list[object] = []
    fed = 0
    while True:
        event = assoc.next_event()
        if event is NEED_DATA:
            if fed >= len(stream):
                break
            assoc.receive_data(stream[fed : fed + chunk])
            fed += chunk
            continue
        events.append(event)
        if isinstance(event, AssociationInit):
            assoc.datagram(b"ping", "127.0.0.1", 8080)  # the first datagram, before the Confirmation
    assoc.receive_data(b"")
    events += drain(assoc)
    header = DatagramHeader(ID, AddressType.IPV4, "127.0.0.1", 8080, 24)
    error = DatagramError(
        ID,
        AddressType.IPV4,
        "192.0.2.1",
        53,
        AddressType.IPV4,
        "10.0.0.1",
        DatagramErrorCode.HOST_UNREACHABLE,
    )
    assert events == [
        AssociationInit(ID),
        AssociationConfirmation(ID),
        Datagram(header, b"pong"),
        error,
        AssociationEnded(),
    ]
    assert assoc.state is AssociationState.CLOSED
    assert assoc.next_event() == AssociationEnded()


def test_init_is_read_without_reading_past_it() -> None:
    """bytes_needed never asks beyond the Initialization (4 bytes, then the 8 that remain)."""
    assoc = ClientAssociation(transport="tcp")
    assert assoc.next_event() is NEED_DATA and assoc.bytes_needed == 4
    assoc.receive_data(INIT[:4])
    assert assoc.next_event() is NEED_DATA and assoc.bytes_needed == 8
    assoc.receive_data(INIT[4:])
    assert assoc.next_event() == AssociationInit(ID)


@pytest.mark.parametrize(
    ("first_datagram", "stream", "match"),
    [
        (False, PONG, "before the Association Initialization"),
        (False, INIT + INIT, "a second Association Initialization"),
        (False, INIT + CONFIRM, "before our first datagram"),
        (True, INIT + PONG, "Datagram before the Association Confirmation"),
        (True, INIT + CONFIRM + CONFIRM, "a second Association Confirmation"),
        (True, INIT + hx("06 02 000c", "ffffffffffffffff"), "another association ID"),
        (False, hx("05 01 000c", "0102030405060708"), "malformed"),
        (False, hx("06 09 000c", "0102030405060708"), "malformed"),
    ],
    ids=[
        "datagram-first",
        "two-inits",
        "early-confirm",
        "early-datagram",
        "two-confirms",
        "wrong-id",
        "v5",
        "type9",
    ],
)
def test_stream_out_of_order_is_a_protocol_error(first_datagram: bool, stream: bytes, match: str) -> None:
    """On the ordered TCP stream (D17): the Initialization first and once, the Confirmation after
    our first datagram and once, relayed messages after it; anything else fails the association."""
    assoc = ClientAssociation(transport="tcp")
    assoc.receive_data(stream)
    with pytest.raises(RemoteProtocolError, match=match):
        while (event := assoc.next_event()) is not NEED_DATA:
            if isinstance(event, AssociationInit) and first_datagram:
                assoc.datagram(b"", "127.0.0.1", 9)
    assert assoc.state is AssociationState.ERROR
    with pytest.raises(LocalProtocolError, match="failed"):
        assoc.next_event()


def test_eof_inside_a_message_is_a_protocol_error() -> None:
    assoc = opened("tcp")
    assoc.receive_data(CONFIRM[:5])
    assoc.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside an association message"):
        assoc.next_event()


def test_stream_message_for_another_id_is_dropped() -> None:
    """A Datagram on the stream naming another association is dropped and counted (D18 read
    from the client's side), and the next one is delivered."""
    assoc = opened("tcp")
    assoc.datagram(b"", "127.0.0.1", 9)
    assoc.receive_data(CONFIRM + PONG.replace(ID, OTHER_ID) + PONG)
    events = drain(assoc)
    assert [type(e) for e in events] == [AssociationConfirmation, Datagram]
    assert assoc.dropped == {"unknown association id": 1}


# --- What the client reads over UDP ---------------------------------------------------------------


@pytest.mark.conformance("UDP-05")
def test_udp_padding_is_ignored() -> None:
    """UDP-05: bytes after Message Length are padding; the payload stops at Message Length."""
    assoc = opened("udp")
    padded = hx("06 03 0017", "0102030405060708", "01 00 1f90", "7f000001", "706f6e") + b"g-and-padding"
    message = assoc.receive_datagram(padded)
    assert message == Datagram(DatagramHeader(ID, AddressType.IPV4, "127.0.0.1", 8080, 23), b"pon")
    assert not assoc.dropped


@pytest.mark.conformance("UDP-05")
def test_udp_message_length_beyond_the_datagram_is_dropped() -> None:
    """UDP-05: a Message Length larger than the UDP payload drops the datagram silently (counted);
    the next datagram is delivered."""
    assoc = opened("udp", udp_error=True)
    too_long = hx("06 03 0019") + PONG[4:]  # says 25 bytes, carries 24
    assert assoc.receive_datagram(too_long) is None
    error_too_long = hx("06 04 001d") + HOST_UNREACHABLE[4:]  # 29 of 28 (an Error message)
    assert assoc.receive_datagram(error_too_long) is None
    assert assoc.dropped == {"message length beyond the datagram": 2}
    message = assoc.receive_datagram(PONG)
    assert isinstance(message, Datagram) and message.payload == b"pong"


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (PONG.replace(ID, OTHER_ID), "unknown association id"),
        (hx("06 03 000a") + PONG[4:10], "malformed"),  # a header cut short (Length 10)
        (PONG[:10], "message length beyond the datagram"),
        (hx("06 03 0018", "0102030405060708", "07 00 1f90", "7f000001", "706f6e67"), "malformed"),  # ATYP 7
        (hx("05") + PONG[1:], "malformed"),  # version 5
        (CONFIRM, "not a datagram"),  # control messages travel over TCP only
        (b"", "not a datagram"),
    ],
    ids=["other-id", "truncated", "cut", "atyp7", "v5", "confirm", "empty"],
)
def test_udp_bad_datagrams_are_dropped(datagram: bytes, reason: str) -> None:
    assoc = opened("udp")
    assert assoc.receive_datagram(datagram) is None
    assert assoc.dropped == {reason: 1}
    assert assoc.receive_datagram(PONG) is not None  # the association keeps working


def test_udp_datagram_before_the_id_is_dropped() -> None:
    assoc = ClientAssociation(transport="udp")
    assert assoc.receive_datagram(PONG) is None
    assert assoc.dropped == {"association not open": 1}


def test_error_messages_only_after_opting_in() -> None:
    """Section "Reporting ICMP Errors": Error messages are for clients that opted in; one that
    arrives anyway is dropped and counted, over UDP and over TCP."""
    silent = opened("udp")
    assert silent.receive_datagram(HOST_UNREACHABLE) is None
    assert silent.dropped == {"error message without opt-in": 1}
    over_tcp = opened("tcp")
    over_tcp.datagram(b"", "127.0.0.1", 9)
    over_tcp.receive_data(CONFIRM + HOST_UNREACHABLE + PONG)
    assert [type(e) for e in drain(over_tcp)] == [AssociationConfirmation, Datagram]
    assert over_tcp.dropped == {"error message without opt-in": 1}
    wanted = opened("udp", udp_error=True)
    report = wanted.receive_datagram(HOST_UNREACHABLE + b"pad")  # padding ignored here too
    assert isinstance(report, DatagramError) and report.reporter_address == "10.0.0.1"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (DatagramErrorCode.NETWORK_UNREACHABLE, NetworkUnreachableError),
        (DatagramErrorCode.HOST_UNREACHABLE, HostUnreachableError),
        (DatagramErrorCode.TTL_EXPIRED, TTLExpiredError),
        (DatagramErrorCode.DATAGRAM_TOO_BIG, DatagramTooBigError),
    ],
)
def test_icmp_error_types(code: DatagramErrorCode, cls: type[ICMPError]) -> None:
    """Each Error Code becomes its own ICMPError subclass carrying destination and reporter."""
    error = icmp_error(
        DatagramError(ID, AddressType.IPV6, "2001:db8::1", 5, AddressType.IPV6, "2001:db8::ff", code)
    )
    assert type(error) is cls and error.code is code
    assert error.destination == ("2001:db8::1", 5) and error.reporter == "2001:db8::ff"
    assert "2001:db8::ff" in str(error)


# --- Server mode and its resends (section "Proxying UDP servers") ----------------------------------


@pytest.mark.conformance("UDP-10")
def test_server_mode_resends_the_empty_datagram_over_udp_until_the_last_try() -> None:
    """UDP-10: over plain UDP the empty datagram to the all-zero address goes again while no
    confirmation arrives, the waits doubling (0.25, 0.5, 1, 2 s), 5 tries in all, then TimeoutError."""
    assoc = opened("udp")
    assert assoc.confirm_datagram(now=100.0) == EMPTY
    sent_at = [100.0]
    now = 100.0
    with pytest.raises(TimeoutError, match="after 5 empty datagrams"):
        while True:
            timer = assoc.get_timer()
            assert timer is not None
            assert assoc.handle_timer(timer - 0.001) is None  # not due yet
            now = timer
            again = assoc.handle_timer(now)
            assert again == EMPTY
            sent_at.append(now)
    assert sent_at == [100.0, 100.25, 100.75, 101.75, 103.75]
    assert now == 103.75 + 4.0  # the last try had its own wait before giving up
    assert assoc.resends == 4 and assoc.state is AssociationState.ERROR


@pytest.mark.conformance("UDP-10")
@pytest.mark.parametrize("how", ["confirmation", "datagram over udp"])
def test_server_mode_stops_resending_once_mapped(how: str) -> None:
    """UDP-10: the resends stop at the Confirmation, or at a datagram of the association over UDP
    (which the proxy relays only once it mapped us; it can overtake the Confirmation)."""
    assoc = opened("udp")
    assoc.confirm_datagram(now=0.0)
    assert assoc.handle_timer(0.25) == EMPTY
    if how == "confirmation":
        assoc.receive_data(CONFIRM)
        assert assoc.next_event() == AssociationConfirmation(ID)
    else:
        assert assoc.receive_datagram(PONG) is not None
    assert assoc.get_timer() is None and assoc.handle_timer(1000.0) is None


def test_server_mode_over_tcp_sends_once() -> None:
    """Over TCP nothing is lost: one empty datagram, no timer."""
    assoc = opened("tcp")
    assert assoc.confirm_datagram(now=0.0) == EMPTY
    assert assoc.get_timer() is None


def test_resend_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="resend_tries"):
        ClientAssociation(resend_tries=0)
    with pytest.raises(ValueError, match="transport"):
        ClientAssociation(transport="sctp")  # type: ignore[arg-type]


# --- The association_init flow (socks6fast.proto.client_flow) ---------------------------------------


def run_flow(flow: Generator[Any, Any, Any], script: bytes) -> tuple[list[object], bytes]:
    """Perform a flow's actions against one scripted channel: reads take from ``script``
    (exactly the size asked, then EOF); returns the actions and what was left unread."""
    steps: Steps[int, Any] = Steps(flow)
    actions: list[object] = []
    rest = script
    for action in steps:
        actions.append(action)
        if isinstance(action, Read):
            steps.result, rest = rest[: action.size], rest[action.size :]
        elif isinstance(action, Write | Close):
            steps.result = None
    return actions, rest


def established(trailing: bytes = b"") -> ClientConnection:
    conn = ClientConnection()
    conn.send(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0))
    conn.receive_data(
        codec.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS))
        + codec.encode_operation_reply(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 4000))
        + trailing
    )
    while conn.next_event() is not NEED_DATA and conn.operation_reply is None:
        pass
    return conn


def test_association_init_flow_reads_exactly_the_initialization() -> None:
    """After the Operation Reply the flow reads the Initialization (4 bytes, then 8) and nothing
    after it: the Confirmation stays in the channel for the association's reader."""
    conn = established()
    assoc = ClientAssociation(transport="tcp")
    actions, rest = run_flow(association_init(1, conn, assoc), INIT + CONFIRM)
    assert actions == [Read(1, 4), Read(1, 8)]
    assert rest == CONFIRM and assoc.association_id == ID


def test_association_init_flow_uses_bytes_read_with_the_reply() -> None:
    """Bytes that came in the same read as the Operation Reply (``trailing_data``) count."""
    conn = established(trailing=INIT[:6])
    assoc = ClientAssociation(transport="tcp")
    actions, _ = run_flow(association_init(1, conn, assoc), INIT[6:])
    assert actions == [Read(1, 6)] and assoc.association_id == ID


@pytest.mark.parametrize(
    ("script", "match"), [(b"", "instead of initializing"), (CONFIRM, "before the Association")]
)
def test_association_init_flow_closes_on_failure(script: bytes, match: str) -> None:
    """No Initialization after the Operation Reply fails the request, and the channel is closed."""
    conn = established()
    assoc = ClientAssociation(transport="tcp")
    steps: Steps[int, Any] = Steps(association_init(1, conn, assoc))
    actions: list[object] = []
    with pytest.raises(RemoteProtocolError, match=match):
        for action in steps:
            actions.append(action)
            if isinstance(action, Read):
                steps.result, script = script[: action.size], script[action.size :]
    assert actions[-1] == Close(1)
