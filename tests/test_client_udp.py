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
* Both flavours against the real server (``socks6fast.asyncio.server``) on both of its UDP
  engines (the native recvmmsg/sendmmsg one and its Python twin): IPv4 and IPv6, both
  transports, server mode, the empty datagram lost on a real lossy UDP path, names, TLS,
  sessions, Stack options, and real ICMP errors from a router inside a network namespace the
  test creates (tests/test_udp_engine.py's ICMP_SETUP).

Loopback (or the test's own namespace) only; remote hosts are in-process UDP echo servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers_server import fake_resolver, make_certificates, make_config, running_server
from helpers_udp import LOOPBACK_HOSTS, has_ipv6_loopback
from hypothesis import given, settings
from hypothesis import strategies as st
from test_udp_engine import ICMP_SETUP, _netns_available

import socks6fast
from socks6fast import client as bclient
from socks6fast._client_base import new_association, udp_request_options
from socks6fast.asyncio import client as aclient
from socks6fast.asyncio.server import Server
from socks6fast.asyncio.server import udp as server_udp
from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
    UDPMessageType,
)
from socks6fast.dataplane.udp import UdpEnginePy
from socks6fast.errors import (
    AssociationClosedError,
    DatagramTooBigError,
    HostUnreachableError,
    ICMPError,
    LocalProtocolError,
    NetworkUnreachableError,
    ProxyError,
    RemoteProtocolError,
    TTLExpiredError,
)
from socks6fast.net.dtls import dtls_client_context
from socks6fast.proto import client_udp as client_udp_module
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
    Option,
    PortParityOption,
    Request,
    TTLOption,
    UDPErrorOption,
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


# --- Both clients against a scripted proxy on loopback -------------------------------------------

#: The scripted proxy's name table (D20: the proxy resolves; nothing is ever asked of a DNS server).
NAMES = {"echo.test": "127.0.0.1", "echo6.test": "::1"}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not a DatagramTransport subclass (3.11).
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)


@dataclass
class _Assoc:
    id: bytes
    writer: asyncio.StreamWriter
    remote: asyncio.DatagramTransport | None = None
    mapped: tuple[str, Any] | None = None  # ("tcp", None) or ("udp", client address)


@dataclass
class UDPProxy:
    """A scripted SOCKS 6 proxy for UDP ASSOCIATE: TCP listener and UDP port on the same address
    and port number (D16), one remote-side UDP socket per association (its bound address)."""

    host: str = "127.0.0.1"
    drop_udp: int = 0
    """Drop this many datagrams arriving on the UDP port before listening to any."""
    icmp_after_first: bytes | None = None
    """An Error message (its ID overwritten) sent after the Confirmation (UDP-09 opt-in tests)."""
    junk_after_first: list[bytes] = field(default_factory=list)
    """Raw datagrams (ID overwritten where 8 bytes of 0xee stand) sent to a UDP client first."""
    pad: bytes = b""
    """Padding after every Datagram message sent over UDP (UDP-05)."""
    refuse: ReplyCode | None = None
    close_after_confirm: bool = False
    port: int = 0
    received_types: list[int] = field(default_factory=list)
    """The Message Type of every message the client sent (TCP stream and UDP port)."""
    empty_datagrams: int = 0
    """Server-mode empty datagrams that arrived on the UDP port (dropped ones included)."""
    requests: list[Request] = field(default_factory=list)
    associations: dict[bytes, _Assoc] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _udp: asyncio.DatagramTransport | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> UDPProxy:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_udp_port), local_addr=(self.host, self.port)
        )
        self._udp = transport  # type: ignore[assignment]
        return self

    def url(self, scheme: str = "socks6") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        assert self._server is not None and self._udp is not None
        self._server.close()
        self._udp.close()
        for assoc in self.associations.values():
            assoc.writer.close()
            if assoc.remote is not None:
                assoc.remote.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            for assoc in self.associations.values():
                if assoc.writer is writer and assoc.remote is not None:
                    assoc.remote.close()  # UDP-07 on the proxy's side: the association ends with TCP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while True:
            request, _ = codec.decode_request(buffer)
            if request is not None:
                break
            data = await reader.read(4096)
            if not data:
                return
            buffer += data
        self.requests.append(request)
        assert request.command is Command.UDP_ASSOCIATE
        writer.write(codec.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS)))
        if self.refuse is not None:
            writer.write(
                codec.encode_operation_reply(OperationReply(self.refuse, AddressType.IPV4, "0.0.0.0", 0))
            )
            return
        loop = asyncio.get_running_loop()
        assoc = _Assoc(os.urandom(8), writer)
        remote, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(lambda data, addr: self._from_remote(assoc, data, addr)),
            local_addr=(self.host, 0),
        )
        assoc.remote = remote  # type: ignore[assignment]
        self.associations[assoc.id] = assoc
        bound = remote.get_extra_info("sockname")
        echo: list[Option] = []
        for option in request.options:
            if isinstance(option, UDPErrorOption):
                echo.append(option)  # reports will be performed (D9: what is applied)
            elif isinstance(option, PortParityOption):
                echo.append(PortParityOption(option.leg, Parity.NONE, False))  # not honoured
        atyp = AddressType.IPV6 if ":" in self.host else AddressType.IPV4
        reply = OperationReply(ReplyCode.SUCCESS, atyp, bound[0], bound[1], tuple(echo))
        writer.write(
            codec.encode_operation_reply(reply) + codec.encode_association_message(AssociationInit(assoc.id))
        )
        stream = b""
        while data := await reader.read(65536):
            stream += data
            while True:
                message, n = codec.decode_association_message(stream)
                if message is None:
                    break
                stream = stream[n:]
                self.received_types.append(stream_type(message))
                assert isinstance(message, Datagram)
                self._from_client(assoc, message.header, message.payload, ("tcp", None))

    def _from_udp_port(self, data: bytes, addr: Any) -> None:
        if len(data) > 1:
            self.received_types.append(data[1])
        if data[:2] == b"\x06\x03" and data[16:] == bytes(4) and data[14:16] == b"\x00\x00":
            self.empty_datagrams += 1
        if self.drop_udp:
            self.drop_udp -= 1
            return
        header, length = codec.decode_datagram_header(data)
        assoc = self.associations[header.association_id]
        self._from_client(assoc, header, data[length : header.message_length], ("udp", addr))

    def _from_client(
        self, assoc: _Assoc, header: DatagramHeader, payload: bytes, via: tuple[str, Any]
    ) -> None:
        if assoc.mapped is None:
            assoc.mapped = via
            assoc.writer.write(codec.encode_association_message(AssociationConfirmation(assoc.id)))
            if self.close_after_confirm:
                assoc.writer.close()
                return
            for junk in self.junk_after_first:
                self._to_client(assoc, junk.replace(b"\xee" * 8, assoc.id), padded=False)
            if self.icmp_after_first is not None:
                self._to_client(assoc, self.icmp_after_first.replace(ID, assoc.id), padded=False)
        elif assoc.mapped != via:
            return  # UDP-03 on the proxy's side: not the mapped channel
        if header.address == "0.0.0.0" and header.port == 0:
            return  # server mode: confirm, relay nothing
        host = NAMES.get(header.address, header.address)
        assert assoc.remote is not None
        assoc.remote.sendto(payload, (host, header.port))

    def _from_remote(self, assoc: _Assoc, data: bytes, addr: Any) -> None:
        if assoc.mapped is None:
            return
        atyp = AddressType.IPV6 if ":" in addr[0] else AddressType.IPV4
        length = codec.datagram_header_length(atyp, addr[0]) + len(data)
        message = codec.encode_association_message(
            Datagram(DatagramHeader(assoc.id, atyp, addr[0], addr[1], length), data)
        )
        self._to_client(assoc, message, padded=True)

    def _to_client(self, assoc: _Assoc, message: bytes, *, padded: bool) -> None:
        assert assoc.mapped is not None and self._udp is not None
        if assoc.mapped[0] == "tcp":
            assoc.writer.write(message)
        else:
            self._udp.sendto(message + (self.pad if padded else b""), assoc.mapped[1])


def stream_type(message: object) -> int:
    return {
        AssociationInit: UDPMessageType.ASSOCIATION_INIT,
        AssociationConfirmation: UDPMessageType.ASSOCIATION_CONFIRMATION,
        Datagram: UDPMessageType.DATAGRAM,
        DatagramError: UDPMessageType.ERROR,
    }[type(message)]


@contextlib.asynccontextmanager
async def udp_echo(host: str) -> AsyncIterator[tuple[str, int]]:
    """A UDP echo server on ``host`` (a remote host for the association)."""
    loop = asyncio.get_running_loop()
    box: list[asyncio.DatagramTransport] = []
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(lambda data, addr: box[0].sendto(data, addr)), local_addr=(host, 0)
    )
    box.append(transport)  # type: ignore[arg-type]
    try:
        yield transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def scripted(host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[UDPProxy]:
    proxy = await UDPProxy(host=host, **kwargs).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def exchange(
    flavour: str, url: str, dest: tuple[str, int], payload: bytes, **kwargs: Any
) -> tuple[tuple[bytes, tuple[str, int]], dict[str, Any]]:
    """One association: send ``payload`` to ``dest``, read one datagram back; with either client."""

    def facts(assoc: Any) -> dict[str, Any]:
        return {
            "bound": assoc.bound,
            "id": assoc.id,
            "confirmed": assoc.confirmed,
            "udp_error": assoc.udp_error,
            "dropped": assoc.dropped,
        }

    if flavour == "asyncio":
        async with await aclient.udp_associate(url, **kwargs) as assoc:
            await assoc.sendto(payload, dest)
            got = await assoc.recvfrom(timeout=5)
            return got, facts(assoc)

    def blocking() -> tuple[tuple[bytes, tuple[str, int]], dict[str, Any]]:
        with bclient.Proxy.from_url(url).udp_associate(**kwargs) as assoc:
            assoc.sendto(payload, dest)
            return assoc.recvfrom(timeout=5), facts(assoc)

    return await asyncio.to_thread(blocking)


FLAVOURS = ["asyncio", "blocking"]
TRANSPORTS = ["udp", "tcp"]


@pytest.mark.conformance("UDP-10")
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("host", "name"), [("127.0.0.1", "echo.test"), ("::1", "echo6.test")], ids=["v4", "v6"]
)
async def test_scripted_round_trip(flavour: str, transport: str, host: str, name: str) -> None:
    """A datagram to a loopback echo server and back, by IP literal and by name (D20), over UDP
    and over TCP, with both clients; the proxy learns the ID and bound address it sent, and
    every message the client sent is a Datagram (UDP-10: never an Error message)."""
    async with scripted(host) as proxy, udp_echo(host) as (echo_host, echo_port):
        before = fd_count()
        for dest in [(echo_host, echo_port), (name, echo_port)]:
            (data, source), facts = await exchange(
                flavour, proxy.url(), dest, b"ping " + name.encode(), transport=transport
            )
            assert data == b"ping " + name.encode()
            assert source == (echo_host, echo_port)  # the proxy names the remote's IP (D20)
            assoc = list(proxy.associations.values())[-1]
            assert facts["id"] == assoc.id and facts["confirmed"]
            assert assoc.mapped is not None and assoc.mapped[0] == transport
            assert assoc.remote is not None and facts["bound"] == assoc.remote.get_extra_info("sockname")[:2]
        assert proxy.received_types == [UDPMessageType.DATAGRAM] * 2
        await asyncio.sleep(0.05)
        assert fd_count() == before


async def in_flavour(flavour: str, url: str, body: Callable[[Any], Any], **kwargs: Any) -> Any:
    """Run ``body(assoc)`` inside an association of either client (blocking: in a thread, with
    the association's methods wrapped so that ``body`` can await them alike)."""
    if flavour == "asyncio":
        async with await aclient.udp_associate(url, **kwargs) as assoc:
            return await body(assoc)

    class Awaitable:
        def __init__(self, assoc: bclient.UDPAssociation) -> None:
            self._assoc = assoc

        def __getattr__(self, name: str) -> Any:
            value = getattr(self._assoc, name)
            if callable(value):

                async def call(*args: Any, **kw: Any) -> Any:
                    return await asyncio.to_thread(value, *args, **kw)

                return call
            return value

    assoc = await asyncio.to_thread(bclient.Proxy.from_url(url).udp_associate, **kwargs)
    try:
        return await body(Awaitable(assoc))
    finally:
        assoc.close()


async def nothing(assoc: Any) -> None:
    pytest.fail("udp_associate should have raised")


@pytest.mark.conformance("UDP-10")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_server_mode_resends_until_confirmed(flavour: str) -> None:
    """UDP-10 with both clients: the proxy loses the first two empty datagrams; the client sends
    it again until the Confirmation, and ``udp_associate`` returns confirmed. Then a remote host
    sends first, to the bound address, and its datagram arrives with its source."""
    async with scripted(drop_udp=2) as proxy:

        async def body(assoc: Any) -> None:
            assert assoc.confirmed
            assert proxy.empty_datagrams == 3 and assoc.core.resends == 2
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
                remote.bind(("127.0.0.1", 0))
                remote.sendto(b"first", assoc.bound)
                assert await assoc.recvfrom(timeout=5) == (b"first", remote.getsockname())

        await in_flavour(flavour, proxy.url(), body, server_mode=True, resend_interval=0.05)
        assert proxy.received_types == [UDPMessageType.DATAGRAM] * 3


@pytest.mark.conformance("UDP-10")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_server_mode_gives_up_after_the_last_try(flavour: str) -> None:
    """UDP-10, bounded: a proxy that never gets the empty datagram makes ``udp_associate`` raise
    TimeoutError after ``resend_tries`` datagrams, and nothing is left open."""
    async with scripted(drop_udp=1000) as proxy:
        before = fd_count()
        with pytest.raises(TimeoutError):
            await in_flavour(
                flavour, proxy.url(), lambda a: a, server_mode=True, resend_interval=0.02, resend_tries=3
            )
        assert proxy.empty_datagrams == 3
        await asyncio.sleep(0.05)
        assert fd_count() == before


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_server_mode_over_tcp(flavour: str) -> None:
    """Server mode over TCP: one empty datagram on the stream, confirmed; nothing resent."""
    async with scripted() as proxy:

        async def body(assoc: Any) -> None:
            assert assoc.confirmed and assoc.core.resends == 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
                remote.sendto(b"first", assoc.bound)
                data, _ = await assoc.recvfrom(timeout=5)
                assert data == b"first"

        await in_flavour(flavour, proxy.url(), body, server_mode=True, transport="tcp")
        assert proxy.received_types == [UDPMessageType.DATAGRAM]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_scripted_icmp_errors_are_typed_exceptions(flavour: str, transport: str) -> None:
    """With ``udp_error=True`` the proxy's Error message comes out of ``recvfrom`` as the
    ICMPError subclass for its code, naming destination and reporter; the association goes
    on (the echo still arrives), and ``recv_message`` gives the message itself."""
    async with scripted(icmp_after_first=HOST_UNREACHABLE) as proxy, udp_echo("127.0.0.1") as echo:

        async def body(assoc: Any) -> None:
            assert assoc.udp_error  # the proxy's echo of the option: reports will come
            await assoc.sendto(b"one", echo)
            with pytest.raises(HostUnreachableError) as caught:
                await assoc.recvfrom(timeout=5)
            assert caught.value.destination == ("192.0.2.1", 53) and caught.value.reporter == "10.0.0.1"
            assert await assoc.recvfrom(timeout=5) == (b"one", echo)
            await assoc.sendto(b"two", echo)
            message = await assoc.recv_message(timeout=5)
            assert isinstance(message, Datagram) and message.payload == b"two"

        await in_flavour(flavour, proxy.url(), body, udp_error=True, transport=transport)
        assert UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED) in proxy.requests[0].options


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_error_messages_without_opt_in_are_dropped(flavour: str) -> None:
    """Without the UDP Error option an Error message is dropped and counted, never raised."""
    async with scripted(icmp_after_first=HOST_UNREACHABLE) as proxy, udp_echo("127.0.0.1") as echo:
        (data, _), facts = await exchange(flavour, proxy.url(), echo, b"quiet")
        assert data == b"quiet" and not facts["udp_error"] and facts["dropped"] == 1


@pytest.mark.conformance("UDP-05")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_padding_and_bad_datagrams_over_udp(flavour: str) -> None:
    """UDP-05 through both clients: padded datagrams arrive without their padding; a Message
    Length beyond the datagram, another association's ID and a truncated header are dropped
    and counted, and the association keeps working."""
    junk = [
        hx("06 03 0019", "eeeeeeeeeeeeeeee", "01 00 1f90", "7f000001", "706f6e67"),  # Length 25 of 24
        PONG.replace(ID, OTHER_ID),
        hx("06 03 000a", "eeeeeeeeeeeeeeee"),
    ]
    async with scripted(junk_after_first=junk, pad=b"\x00padding") as proxy, udp_echo("127.0.0.1") as echo:
        (data, source), facts = await exchange(flavour, proxy.url(), echo, b"padded")
        assert (data, source) == (b"padded", echo)
        assert facts["dropped"] == 3


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_scripted_association_ends_with_the_tcp_connection(flavour: str, transport: str) -> None:
    """The proxy closes the TCP connection: ``recvfrom`` and ``sendto`` raise
    AssociationClosedError (a ConnectionError), and the client's sockets are closed."""
    async with scripted(close_after_confirm=True) as proxy, udp_echo("127.0.0.1") as echo:
        before = fd_count()

        async def body(assoc: Any) -> None:
            await assoc.sendto(b"x", echo)
            with pytest.raises(AssociationClosedError):
                await assoc.recvfrom(timeout=5)
            with pytest.raises(ConnectionError):
                await assoc.sendto(b"y", echo)

        await in_flavour(flavour, proxy.url(), body, transport=transport)
        await asyncio.sleep(0.05)
        assert fd_count() == before


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_refusal_is_a_proxy_error(flavour: str) -> None:
    async with scripted(refuse=ReplyCode.COMMAND_NOT_SUPPORTED) as proxy:
        with pytest.raises(ProxyError) as caught:
            await in_flavour(flavour, proxy.url(), nothing)
        assert caught.value.reply_code is ReplyCode.COMMAND_NOT_SUPPORTED


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_recvfrom_times_out(flavour: str) -> None:
    async with scripted() as proxy:

        async def body(assoc: Any) -> None:
            with pytest.raises(TimeoutError):
                await assoc.recvfrom(timeout=0.05)
            assert not assoc.confirmed  # nothing sent yet: nothing to confirm

        await in_flavour(flavour, proxy.url(), body)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_scripted_datagrams_over_tls(flavour: str, tmp_path: Path) -> None:
    """``transport="tcp"`` through a ``socks6+tls://`` proxy: the datagrams ride the TLS connection."""
    certs = make_certificates(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca))
    proxy = await UDPProxy().start(ssl_context=server_ctx)
    try:
        async with udp_echo("127.0.0.1") as echo:
            url = proxy.url("socks6+tls")
            if flavour == "asyncio":
                async with await aclient.udp_associate(url, proxy_ssl=client_ctx, transport="tcp") as assoc:
                    assert assoc.transport == "tcp"  # asked for (the socks6+tls default is dtls, D30)
                    for n in range(3):
                        await assoc.sendto(b"tls %d" % n, echo)
                        assert await assoc.recvfrom(timeout=5) == (b"tls %d" % n, echo)
            else:

                def blocking() -> None:
                    proxy_obj = bclient.Proxy.from_url(url, proxy_ssl=client_ctx)
                    with proxy_obj.udp_associate(transport="tcp") as assoc:
                        for n in range(3):
                            assoc.sendto(b"tls %d" % n, echo)
                            assert assoc.recvfrom(timeout=5) == (b"tls %d" % n, echo)

                await asyncio.to_thread(blocking)
        assert list(proxy.associations.values())[0].mapped == ("tcp", None)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_no_udp_port_at_the_proxy_is_an_os_error(flavour: str) -> None:
    """``udp_port`` names the proxy's UDP port; a closed one answers with ICMP port unreachable,
    which the next ``recvfrom`` raises as ConnectionRefusedError; the association stays open."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    async with scripted() as proxy, udp_echo("127.0.0.1") as echo:

        async def body(assoc: Any) -> None:
            await assoc.sendto(b"lost", echo)
            with pytest.raises(ConnectionRefusedError):
                await assoc.recvfrom(timeout=5)
            with pytest.raises(TimeoutError):
                await assoc.recvfrom(timeout=0.05)

        await in_flavour(flavour, proxy.url(), body, udp_port=closed_port)
        assert proxy.received_types == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_scripted_receive_queue_bound(transport: str) -> None:
    """asyncio flavour, ``max_queue=2``: over UDP the datagrams beyond the queue are dropped and
    counted (as a full socket buffer would), over TCP reading pauses and none is lost."""
    async with scripted() as proxy:
        async with await aclient.udp_associate(
            proxy.url(), server_mode=True, transport=transport, max_queue=2
        ) as assoc:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
                for n in range(5):
                    remote.sendto(b"%d" % n, assoc.bound)
                await asyncio.sleep(0.2)  # everything has arrived (or was dropped)
                if transport == "udp":
                    got = [await assoc.recvfrom(timeout=1) for _ in range(2)]
                    assert [data for data, _ in got] == [b"0", b"1"]
                    assert assoc.core.dropped == {"receive queue full": 3}
                    with pytest.raises(TimeoutError):
                        await assoc.recvfrom(timeout=0.05)
                else:
                    got = [await assoc.recvfrom(timeout=1) for _ in range(5)]
                    assert [data for data, _ in got] == [b"%d" % n for n in range(5)]
                    assert assoc.dropped == 0


def test_docstring_examples() -> None:
    """The example in ClientAssociation's docstring runs as written."""
    result = doctest.testmod(client_udp_module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# --- Both clients against the real server (socks6fast.asyncio.server) ----------------------------


REAL_HOSTS = LOOPBACK_HOSTS


@contextlib.asynccontextmanager
async def real_server(**kwargs: Any) -> AsyncIterator[Server]:
    resolver = kwargs.pop("resolver", None)
    async with running_server(make_config(ipv6=has_ipv6_loopback(), **kwargs), resolver=resolver) as server:
        yield server


def real_url(server: Server, host: str, scheme: str = "socks6") -> str:
    """The URL of the server's listener (plain or TLS) in the family of ``host``."""
    listeners = server.tls_addresses if scheme == "socks6+tls" else server.addresses
    address, port = next(a for a in listeners if (":" in a[0]) == (":" in host))[:2]
    return f"{scheme}://[{address}]:{port}" if ":" in address else f"{scheme}://{address}:{port}"


def any_address(host: str) -> str:
    return "::" if ":" in host else "0.0.0.0"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("host", REAL_HOSTS)
async def test_real_server_round_trip(engine: str, flavour: str, transport: str, host: str) -> None:
    """Both clients, both transports, IPv4 and IPv6, through the real server and its UDP engine:
    datagrams to a loopback echo server come back naming it; the reply names where the proxy
    relays from (the remote host sees that address)."""
    async with real_server() as server, udp_echo(host) as echo:
        before = fd_count()

        async def body(assoc: Any) -> None:
            assert assoc.bound[0] == host and assoc.bound[1] != 0 and len(assoc.id) == 8
            for n in range(5):
                await assoc.sendto(b"real %d" % n, echo)
                assert await assoc.recvfrom(timeout=5) == (b"real %d" % n, echo)
            assert assoc.confirmed and assoc.dropped == 0

        await in_flavour(
            flavour, real_url(server, host), body, address=any_address(host), transport=transport
        )
        await asyncio.sleep(0.1)
        assert fd_count() == before


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_server_server_mode(engine: str, flavour: str, transport: str) -> None:
    """Server mode through the real server: ``udp_associate`` returns confirmed, then a remote
    host sends first to the bound address and its datagram arrives naming it; the answer goes
    back to it."""
    async with real_server() as server:

        async def body(assoc: Any) -> None:
            assert assoc.confirmed
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
                remote.bind(("127.0.0.1", 0))
                remote.settimeout(5)
                remote.sendto(b"knock", assoc.bound)
                data, source = await assoc.recvfrom(timeout=5)
                assert (data, source) == (b"knock", remote.getsockname())
                await assoc.sendto(b"who's there", source)
                assert await asyncio.to_thread(remote.recvfrom, 100) == (b"who's there", assoc.bound)

        await in_flavour(flavour, real_url(server, "127.0.0.1"), body, server_mode=True, transport=transport)


class LossyForwarder:
    """A UDP forwarder on 127.0.0.1 between the client and the proxy's UDP port that drops the
    first ``drop`` datagrams from the client (a real lossy path for UDP-10)."""

    def __init__(self, target: tuple[str, int], drop: int) -> None:
        self.target, self.drop = target, drop
        self.from_client: list[bytes] = []
        self.client: Any = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> LossyForwarder:
        loop = asyncio.get_running_loop()
        front, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_client), local_addr=("127.0.0.1", 0)
        )
        back, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_proxy), remote_addr=self.target
        )
        self.front, self.back = front, back  # type: ignore[assignment]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.front is not None and self.back is not None
        self.front.close()
        self.back.close()

    @property
    def port(self) -> int:
        assert self.front is not None
        return int(self.front.get_extra_info("sockname")[1])

    def _from_client(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self.from_client.append(data)
        if len(self.from_client) <= self.drop:
            return
        assert self.back is not None
        self.back.sendto(data)

    def _from_proxy(self, data: bytes, addr: Any) -> None:
        assert self.front is not None
        self.front.sendto(data, self.client)


@pytest.mark.conformance("UDP-10")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_real_server_mode_resend_through_a_lossy_path(engine: str, flavour: str) -> None:
    """UDP-10 against the real server: the path to its UDP port loses the first empty datagram;
    the client sends it again and the real server confirms; then datagrams flow both ways
    through the same path."""
    async with real_server() as server, udp_echo("127.0.0.1") as echo:
        proxy = next(a for a in server.addresses if ":" not in a[0])
        async with LossyForwarder(proxy, drop=1) as path:

            async def body(assoc: Any) -> None:
                assert assoc.confirmed and assoc.core.resends >= 1
                await assoc.sendto(b"after the loss", echo)
                assert await assoc.recvfrom(timeout=5) == (b"after the loss", echo)

            await in_flavour(
                flavour,
                real_url(server, "127.0.0.1"),
                body,
                server_mode=True,
                udp_port=path.port,
                resend_interval=0.05,
            )
            assert path.from_client[0] == path.from_client[1]  # the same empty datagram, twice
            assert path.from_client[0][1] == UDPMessageType.DATAGRAM and len(path.from_client[0]) == 20


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_server_resolves_names(engine: str, flavour: str, transport: str) -> None:
    """D20 through the real server: a destination name goes in the Datagram Header, the server
    resolves it (a fake resolver here) and the answer names the address. The client sends
    again while no answer came, as a UDP application does (a proxy may drop datagrams to a
    name it is resolving; this one holds them, D24)."""
    async with real_server(resolver=fake_resolver({"echo.test": ["127.0.0.1"]})) as server:
        async with udp_echo("127.0.0.1") as echo:

            async def body(assoc: Any) -> None:
                for _ in range(50):
                    await assoc.sendto(b"named", ("echo.test", echo[1]))
                    with contextlib.suppress(TimeoutError):
                        assert await assoc.recvfrom(timeout=0.1) == (b"named", echo)
                        return
                pytest.fail("no answer through a name")

            await in_flavour(flavour, real_url(server, "127.0.0.1"), body, transport=transport)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", [None, "tcp", "udp"], ids=["default", "tcp", "udp"])
async def test_real_server_over_tls(engine: str, flavour: str, transport: str | None, tmp_path: Path) -> None:
    """Through the real server's TLS listener: by default the datagrams go over DTLS to the
    DTLS port beside it (D16, D30; verified with ``proxy_dtls``); ``transport="tcp"`` puts
    them on the TLS connection; with ``transport="udp"`` and ``udp_port`` naming the plain
    listener's UDP port, the control connection is TLS and the datagrams plain UDP."""
    certs = make_certificates(tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca))
    tls = {"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    async with real_server(server=tls) as server, udp_echo("127.0.0.1") as echo:
        url = real_url(server, "127.0.0.1", "socks6+tls")
        kwargs: dict[str, Any] = {}
        if transport is None:
            kwargs = {"proxy_dtls": dtls_client_context(cafile=str(certs.ca))}
        elif transport == "tcp":
            kwargs = {"transport": "tcp"}
        else:
            kwargs = {"transport": "udp", "udp_port": next(a for a in server.addresses if ":" not in a[0])[1]}
        expected = transport or "dtls"
        if flavour == "asyncio":
            async with await aclient.udp_associate(url, proxy_ssl=client_ctx, **kwargs) as assoc:
                assert assoc.transport == expected
                for n in range(3):
                    await assoc.sendto(b"tls %d" % n, echo)
                    assert await assoc.recvfrom(timeout=5) == (b"tls %d" % n, echo)
        else:

            def blocking() -> None:
                proxy = bclient.Proxy.from_url(url, proxy_ssl=client_ctx)
                with proxy.udp_associate(**kwargs) as assoc:
                    assert assoc.transport == expected
                    for n in range(3):
                        assoc.sendto(b"tls %d" % n, echo)
                        assert assoc.recvfrom(timeout=5) == (b"tls %d" % n, echo)

            await asyncio.to_thread(blocking)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_real_server_options_and_sessions(engine: str, flavour: str) -> None:
    """Inside a session, with credentials: the UDP Error option and an even port with its pair
    reserved, as the real server answers them (D9: the reply says what was applied)."""
    async with real_server(users={"alice": "s3cret"}) as server, udp_echo("127.0.0.1") as echo:
        url = real_url(server, "127.0.0.1").replace("//", "//alice:s3cret@")
        kwargs: dict[str, Any] = {"udp_error": True, "port_parity": Parity.EVEN, "reserve_port": True}

        def check(assoc: Any) -> None:
            assert assoc.udp_error
            assert assoc.port_parity is not None and assoc.port_parity.parity == Parity.EVEN
            assert assoc.bound[1] % 2 == 0

        if flavour == "asyncio":
            async with aclient.Session(url) as session:
                for _ in range(2):
                    async with await session.udp_associate(**kwargs) as assoc:
                        check(assoc)
                        await assoc.sendto(b"in a session", echo)
                        assert await assoc.recvfrom(timeout=5) == (b"in a session", echo)
                assert session.session_id is not None
        else:

            def blocking() -> None:
                with bclient.Session(url) as session:
                    for _ in range(2):
                        with session.udp_associate(**kwargs) as assoc:
                            check(assoc)
                            assoc.sendto(b"in a session", echo)
                            assert assoc.recvfrom(timeout=5) == (b"in a session", echo)
                    assert session.session_id is not None

            await asyncio.to_thread(blocking)


# --- ICMP errors for real: the real server and both clients in a network namespace ------------------


def run_client_icmp_scenarios(engine: str) -> None:
    """Entry point inside the namespace (tests/test_udp_engine.py's ICMP_SETUP topology: a
    router namespace answers for 10.78.0.0/16 and fd78::/16 with real ICMP errors)."""
    if engine == "python":
        server_udp.UdpEngine = UdpEnginePy  # type: ignore[misc]
        server_udp.UDP_PATH = "python"  # type: ignore[misc]
    print(json.dumps(asyncio.run(asyncio.wait_for(_client_icmp_scenarios(), 90))))


async def _client_icmp_scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    config = make_config(server={"listen": ["10.77.0.1:0", "[fd77::1]:0"]})
    async with running_server(config) as server:
        for name, dest, ttl, size, opt_in in ICMP_SCENARIOS:
            for run, (flavour, transport) in enumerate(ICMP_RUNS):
                if name == "big6":
                    # After one Packet Too Big the kernel caches the path MTU for that
                    # destination and fragments at the source: a new destination each run.
                    dest = f"fd78:4::{run + 1}"

                async def body(assoc: Any, dest: str = dest, size: int = size) -> Any:
                    # The router limits the ICMP errors it sends for routing failures (about
                    # one a second after a burst of five, per source: the kernel's
                    # route.error_cost), so a lost report is sent for again, as an
                    # application would; each try waits longer than that.
                    for _ in range(4 if assoc.udp_error else 1):
                        await assoc.sendto(b"p" * size, (dest, 4321))
                        try:
                            await assoc.recvfrom(timeout=1.2)
                        except ICMPError as exc:
                            return [type(exc).__name__, *exc.destination, exc.reporter, assoc.udp_error]
                        except TimeoutError:
                            continue
                        return ["datagram"]
                    return ["timeout", assoc.udp_error]

                out[f"{name} {flavour} {transport}"] = await in_flavour(
                    flavour,
                    real_url(server, dest),
                    body,
                    address=any_address(dest),
                    udp_error=opt_in,
                    transport=transport,
                    stack_options=[TTLOption(StackLeg.PROXY_REMOTE, ttl)],
                )
    return out


#: name, destination, TTL on the UDP leg, payload size, UDP Error option.
ICMP_SCENARIOS = (
    ("host4", "10.78.1.1", 64, 16, True),
    ("net4", "10.78.2.1", 64, 16, True),
    ("ttl4", "10.78.3.1", 1, 16, True),
    ("net6", "fd78:1::1", 64, 16, True),
    ("ttl6", "fd78:3::1", 1, 16, True),
    ("big6", "fd78:4::1", 64, 1400, True),
    ("quiet4", "10.78.1.1", 64, 16, False),
)
ICMP_RUNS = [(flavour, transport) for flavour in FLAVOURS for transport in TRANSPORTS]


def test_real_icmp_errors_are_typed_exceptions(engine: str) -> None:
    """Real ICMP errors through the real server, with both clients and both transports: the
    client that opted in (``udp_error=True``, echoed by the server) gets HostUnreachableError,
    NetworkUnreachableError, TTLExpiredError (its own TTL of 1 on the UDP leg) and, on the IPv6
    path whose MTU is 1280, DatagramTooBigError, each naming the destination and the router
    that reported it; without the option, nothing (recvfrom times out)."""
    if not _netns_available():
        pytest.skip("needs unshare -n with veth pairs (root or user namespaces), nsenter and iproute2")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(socks6fast.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
        ),
    )
    call = f"run_client_icmp_scenarios({engine!r})"
    script = ICMP_SETUP + f'"{sys.executable}" -P -c "import test_client_udp as t; t.{call}"\nrc=$?\n'
    script += 'test -n "$ROUTER" && kill $ROUTER\nexit $rc\n'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=150
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {
        "host4": ["HostUnreachableError", "10.78.1.1", 4321, "10.77.0.2", True],
        "net4": ["NetworkUnreachableError", "10.78.2.1", 4321, "10.77.0.2", True],
        "ttl4": ["TTLExpiredError", "10.78.3.1", 4321, "10.77.0.2", True],
        "net6": ["NetworkUnreachableError", "fd78:1::1", 4321, "fd77::2", True],
        "ttl6": ["TTLExpiredError", "fd78:3::1", 4321, "fd77::2", True],
        "quiet4": ["timeout", False],
    }
    for run, (flavour, transport) in enumerate(ICMP_RUNS):
        expected_here = {
            **expected,
            "big6": ["DatagramTooBigError", f"fd78:4::{run + 1}", 4321, "fd77::2", True],
        }
        for name, result in expected_here.items():
            assert seen[f"{name} {flavour} {transport}"] == result, (name, flavour, transport, seen)


async def test_readme_example_runs(engine: str) -> None:
    """examples/udp_client.py (quoted in the README) runs as written against the real server:
    both clients, both transports."""
    example = Path(__file__).resolve().parent.parent / "examples" / "udp_client.py"
    async with real_server() as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(example),
            real_url(server, "127.0.0.1"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert [line.split(":")[0] for line in lines] == ["asyncio, udp", "asyncio, tcp", "blocking, udp"]
    assert "b'hello over UDP'" in lines[0] and "b'hello over TCP'" in lines[1]


@given(st.binary(max_size=80))
@settings(max_examples=500, deadline=None)
def test_any_datagram_is_judged_without_an_exception(data: bytes) -> None:
    """Whatever arrives on the UDP port, ``receive_datagram`` returns a message or None (dropped
    and counted); it never raises, and the association stays open."""
    assoc = opened("udp", udp_error=True)
    for candidate in (data, ID.join([data[:4], data[4:]]) if len(data) > 4 else data):
        message = assoc.receive_datagram(candidate)
        assert message is None or isinstance(message, Datagram | DatagramError)
    assert assoc.state is AssociationState.OPEN
    assert assoc.receive_datagram(PONG) is not None


@given(st.binary(max_size=80))
@settings(max_examples=500, deadline=None)
def test_any_stream_fails_only_with_a_protocol_error(data: bytes) -> None:
    """Whatever follows the Initialization on the TCP stream, ``next_event`` gives events or a
    RemoteProtocolError, never another exception."""
    assoc = opened("tcp", udp_error=True)
    assoc.datagram(b"", "127.0.0.1", 9)
    assoc.receive_data(data)
    assoc.receive_data(b"")
    try:
        while (event := assoc.next_event()) is not NEED_DATA and not isinstance(event, AssociationEnded):
            pass
    except RemoteProtocolError:
        assert assoc.state is AssociationState.ERROR


async def test_real_server_blocking_send_and_receive_threads(engine: str) -> None:
    """The blocking association with one thread sending while another receives (over UDP and
    over TCP): every datagram comes back once, none is mangled."""
    async with real_server() as server, udp_echo("127.0.0.1") as echo:
        url = real_url(server, "127.0.0.1")

        def run(transport: str) -> list[bytes]:
            got: list[bytes] = []
            with bclient.Proxy.from_url(url).udp_associate(transport=transport) as assoc:

                def receive() -> None:
                    for _ in range(100):
                        got.append(assoc.recvfrom(timeout=5)[0])

                receiver = threading.Thread(target=receive)
                receiver.start()
                for n in range(100):
                    assoc.sendto(b"%03d" % n, echo)
                    if n % 10 == 9:
                        time.sleep(0.01)  # loopback UDP buffers are finite: pace the sender
                receiver.join(10)
            return got

        for transport in TRANSPORTS:
            got = await asyncio.to_thread(run, transport)
            assert sorted(got) == [b"%03d" % n for n in range(100)], transport


def test_datagram_headers_per_destination_stay_exact() -> None:
    """The per-destination header cache of ``datagram``: alternating destinations, payload
    sizes, and more destinations than it keeps, each message is what the codec encodes."""
    assoc = opened("udp")
    for n in range(600):
        host, port, payload = f"127.0.{n % 300 // 256}.{n % 256}", 1000 + n % 300, b"p" * (n % 7)
        length = 20 + len(payload)
        expected = codec.encode_association_message(
            Datagram(DatagramHeader(ID, AddressType.IPV4, host, port, length), payload)
        )
        assert assoc.datagram(payload, host, port) == expected
    with pytest.raises(LocalProtocolError):
        assoc.datagram(b"", "127.0.0.1", 70000)  # not cached, still refused


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_real_server_recvfrom_timeout_says_what_timed_out(
    engine: str, flavour: str, transport: str
) -> None:
    """A ``recvfrom`` that waits in vain raises TimeoutError saying no datagram came in time,
    not that the (long finished) handshake timed out; the association stays usable."""
    async with real_server() as server, udp_echo("127.0.0.1") as echo:

        async def body(assoc: Any) -> None:
            with pytest.raises(TimeoutError, match=r"no datagram within 0\.3 s"):
                await assoc.recvfrom(timeout=0.3)
            await assoc.sendto(b"still here", echo)
            assert await assoc.recvfrom(timeout=5) == (b"still here", echo)

        await in_flavour(flavour, real_url(server, "127.0.0.1"), body, transport=transport)


@pytest.mark.parametrize("udp_port", [0, 70000, -1, True])
def test_udp_port_out_of_range_is_one_sentence(udp_port: object) -> None:
    """``udp_port`` outside 1-65535 is a ValueError naming it, before any socket is opened."""
    with pytest.raises(ValueError, match="udp_port must be a port 1-65535"):
        new_association({"udp_port": udp_port}, tls=False)  # type: ignore[typeddict-item]
