"""The client library end to end on loopback: real sockets, real TLS, asyncio and blocking.

Two proxies: the real one (``socks6fast.asyncio.server``, through tests/helpers_server.py;
the ``test_real_server_*`` tests) and ``ScriptedProxy``, a small asyncio proxy built on the
project's sans-IO ``ServerWire`` (and ``sessions.TokenWindow``) with switches for
behaviours the real server never shows but the client must handle (slow authentication
only, the Session ID in the Authentication Reply (D4), a token window across the 2^32
wrap, declined sessions, SYN inspection). Destinations are in-process echo / banner
servers on 127.0.0.1. Loopback only.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import select
import shlex
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from helpers_server import make_certificates, make_config, running_server
from helpers_server import syn_data as syn_data_acked

import socks6fast.asyncio as s6
import socks6fast.asyncio.client as aclient
from socks6fast import client as bclient
from socks6fast.asyncio.server import Server
from socks6fast.constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Command,
    ReplyCode,
    StackLeg,
    UserPassStatus,
)
from socks6fast.errors import (
    AuthenticationError,
    ProxyError,
    RemoteProtocolError,
    Socks6Error,
    VersionMismatchError,
)
from socks6fast.proto.client import ClientConnection
from socks6fast.proto.client_flow import read_replies
from socks6fast.proto.messages import (
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceWindow,
    OperationReply,
    Option,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    TTLOption,
)
from socks6fast.proto.server_wire import InitialData, RequestOptions, RequestReceived, ServerWire
from socks6fast.proto.sessions import TokenWindow
from socks6fast.proto.socks5 import UserPassReply, UserPassRequest
from socks6fast.proto.states import NEED_DATA

LOCALHOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
#: Linux TCP_SAVE_SYN / TCP_SAVED_SYN (include/uapi/linux/tcp.h): keep the SYN's headers.
TCP_SAVE_SYN = 27
TCP_SAVED_SYN = 28


def syn_payload_length(sock: Any) -> int:
    """Bytes of payload the SYN of an accepted connection carried (from its saved IPv4 and
    TCP headers: IP Total Length - IHL * 4 - TCP Data Offset * 4)."""
    headers = sock.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 512)
    ip_header = (headers[0] & 0x0F) * 4
    total = int.from_bytes(headers[2:4], "big")
    tcp_header = (headers[ip_header + 12] >> 4) * 4
    return int(total - ip_header - tcp_header)


# --- TLS material (helpers_server: a private CA and a certificate for localhost / 127.0.0.1) ---


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    certs = make_certificates(tmp_path_factory.mktemp("tls"))
    return TLSFiles(certs.ca, certs.cert, certs.key)


# --- Destinations ---------------------------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _pump(reader, writer)
    writer.close()


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"BANNER\r\n")  # the destination speaks first
    await _pump(reader, writer)
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, LOCALHOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def banner_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_banner, LOCALHOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


# --- The scripted proxy ------------------------------------------------------------------------------


@dataclass
class ScriptedProxy:
    """A minimal SOCKS 6 proxy on ServerWire, for driving the client end to end."""

    users: dict[bytes, bytes] | None = None
    """None: no authentication required."""
    slow: bool = False
    """Ignore 0-RTT credentials; always ask for the RFC 1929 exchange (D7)."""
    session_id_in_auth_reply: bool = False
    """D4: put the Session ID in the Authentication Reply instead of the Operation Reply."""
    grant_sessions: bool = True
    echo_stack: bool = True
    save_syn: bool = False
    """Listen with TFO and TCP_SAVE_SYN; record each connection's SYN payload length."""
    syn_payloads: list[int] = field(default_factory=list)
    first_chunks: list[bytes] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    sessions: dict[bytes, TokenWindow | None] = field(default_factory=dict)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> ScriptedProxy:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0, ssl=ssl_context)
        listener = self._server.sockets[0]
        self.port = listener.getsockname()[1]
        if self.save_syn:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
            listener.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
        return self

    def url(self, userinfo: str = "", scheme: str = "socks6") -> str:
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{LOCALHOST}:{self.port}"

    async def stop(self) -> None:
        """Close the listener and every connection, then wait for the handlers to end."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._closing.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        if self.save_syn:
            self.syn_payloads.append(syn_payload_length(writer.get_extra_info("socket")))
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError, Socks6Error, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _next(self, conn: ServerWire, reader: asyncio.StreamReader) -> Any:
        while (event := conn.next_event()) is NEED_DATA:
            data = await reader.read(65536)
            if not self.first_chunks or len(self.first_chunks) < len(self.requests) + 1:
                self.first_chunks.append(data)
            conn.receive_data(data)
        return event

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerWire()
        received = await self._next(conn, reader)
        assert isinstance(received, RequestReceived)
        request, opts = received.request, received.options
        self.requests.append(request)
        initial = b""
        if opts.initial_data_length:
            event = await self._next(conn, reader)
            assert isinstance(event, InitialData)
            initial = event.data
        auth_options: list[Option] = []
        session_id = opts.session_id if not opts.session_teardown else None
        if opts.session_teardown and opts.session_id is not None:
            self.sessions.pop(opts.session_id, None)
        in_session = session_id is not None and session_id in self.sessions
        if session_id is not None and not in_session:
            writer.write(conn.send(AuthReply(AuthReplyType.FAILURE, (SessionInvalid(),))))
            return
        if not in_session and not await self._authenticate(conn, opts, reader, writer):
            return
        new_session: bytes | None = None
        if in_session:
            auth_options.append(SessionOK())
        elif opts.session_request and self.grant_sessions:
            new_session = secrets.token_bytes(16)
            window = None
            if opts.token_request:
                window = TokenWindow(0xFFFFFFFE, min(opts.token_request, 8))  # base near the wrap
            self.sessions[new_session] = window
            if self.session_id_in_auth_reply:
                auth_options.append(SessionID(new_session))
        session_key = session_id if in_session else new_session
        window = self.sessions.get(session_key) if session_key is not None else None
        if in_session and opts.token is not None:
            if window is None or not window.spend(opts.token):
                writer.write(conn.send(AuthReply(AuthReplyType.FAILURE, (IdempotenceRejected(),))))
                return
            auth_options.append(IdempotenceAccepted())
        if window is not None:
            auth_options.append(IdempotenceWindow(*window.current))
        writer.write(conn.send(AuthReply(AuthReplyType.SUCCESS, tuple(auth_options))))
        op_options: list[Option] = []
        if new_session is not None and not self.session_id_in_auth_reply:
            op_options.append(SessionID(new_session))  # D4: our choice is the Operation Reply
        if self.echo_stack:
            op_options += [o for o in request.options if isinstance(o, TTLOption)]
        await self._operate(conn, request, initial, tuple(op_options), reader, writer)

    async def _authenticate(
        self,
        conn: ServerWire,
        opts: RequestOptions,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if self.users is None:
            return True
        creds = opts.credentials
        if not self.slow and creds is not None:
            if self.users.get(creds.username) == creds.password:
                return True
            writer.write(conn.send(AuthReply(AuthReplyType.FAILURE)))
            return False
        if opts.advertised_methods is None or AuthMethod.USERNAME_PASSWORD not in opts.advertised_methods:
            selection = AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS)
            writer.write(conn.send(AuthReply(AuthReplyType.FAILURE, (selection,))))
            return False
        select = AuthMethodSelection(AuthMethod.USERNAME_PASSWORD)
        writer.write(conn.send(AuthReply(AuthReplyType.FAILURE, (select,))))
        userpass = await self._next(conn, reader)
        assert isinstance(userpass, UserPassRequest)
        ok = self.users.get(userpass.username) == userpass.password
        writer.write(conn.send(UserPassReply(UserPassStatus.SUCCESS if ok else UserPassStatus.FAILURE)))
        if not ok:
            return False
        return True

    async def _operate(
        self,
        conn: ServerWire,
        request: Request,
        initial: bytes,
        options: tuple[Option, ...],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if request.command is Command.NOOP:
            writer.write(
                conn.send(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", 0, options))
            )
            return
        if request.command is Command.BIND:
            await self._bind(conn, options, reader, writer)
            return
        assert request.address == LOCALHOST, "loopback only"
        try:
            up_reader, up_writer = await asyncio.open_connection(request.address, request.port)
            self._writers.add(up_writer)
        except ConnectionRefusedError:
            failure = OperationReply(ReplyCode.CONNECTION_REFUSED, AddressType.IPV4, "0.0.0.0", 0)
            writer.write(conn.send(failure))
            return
        host, port = up_writer.get_extra_info("sockname")[:2]
        writer.write(conn.send(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, host, port, options)))
        trailing, _ = conn.trailing_data
        up_writer.write(initial + trailing)
        await self._relay(reader, writer, up_reader, up_writer)

    async def _bind(
        self,
        conn: ServerWire,
        options: tuple[Option, ...],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if accepted.done():
                w.close()
            else:
                self._writers.add(w)
                accepted.set_result((r, w))

        listener = await asyncio.start_server(on_peer, LOCALHOST, 0)
        port = listener.sockets[0].getsockname()[1]
        writer.write(conn.send(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, LOCALHOST, port, options)))
        # Wait for a peer, or for the client to give up (EOF: it closed the connection).
        client_gone: asyncio.Future[Any] = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait([accepted, client_gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.close()
        if not accepted.done():
            return
        client_gone.cancel()
        peer_reader, peer_writer = accepted.result()
        host, peer_port = peer_writer.get_extra_info("peername")[:2]
        writer.write(conn.send(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, host, peer_port)))
        await self._relay(reader, writer, peer_reader, peer_writer)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[ScriptedProxy]]]:
    proxies: list[ScriptedProxy] = []

    async def make(ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> ScriptedProxy:
        proxy = await ScriptedProxy(**kwargs).start(ssl_context)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.stop()


MakeProxy = Callable[..., Awaitable[ScriptedProxy]]
USERS = {b"alice": b"s3cret"}


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


# --- open_connection ---------------------------------------------------------------------------------


@pytest.mark.conformance("CMD-03")
async def test_open_connection_zero_rtt_credentials_in_one_flight(
    make_proxy: MakeProxy, echo_port: int
) -> None:
    """CMD-03, and 0-RTT on the client side: the Request, the 0-RTT credentials and the initial
    data arrive at the proxy in one segment, and the initial data reaches the destination
    first, in order."""
    proxy = await make_proxy(users=USERS)
    reader, writer = await s6.open_connection(
        proxy.url("alice:s3cret"), LOCALHOST, echo_port, initial_data=b"hello "
    )
    writer.write(b"world")
    assert await reader.readexactly(11) == b"hello world"
    reply = writer.get_extra_info("socks6_reply")
    assert isinstance(reply, OperationReply) and reply.reply_code is ReplyCode.SUCCESS
    assert len(writer.get_extra_info("socks6_auth_replies")) == 1  # no extra round trip
    assert proxy.first_chunks[0].endswith(b"hello ")  # one write: request + initial data
    await close(writer)


@pytest.mark.conformance("CMD-03")
async def test_initial_data_then_stream_in_order(make_proxy: MakeProxy, echo_port: int) -> None:
    """CMD-03: initial data and later writes arrive at the destination in order."""
    proxy = await make_proxy()
    reader, writer = await s6.open_connection(proxy.url(), LOCALHOST, echo_port, initial_data=b"one,")
    writer.write(b"two,")
    writer.write(b"three")
    assert await reader.readexactly(13) == b"one,two,three"
    await close(writer)


async def test_slow_username_password_exchange(make_proxy: MakeProxy, echo_port: int) -> None:
    """D7, client side: a proxy that insists on the RFC 1929 exchange."""
    proxy = await make_proxy(users=USERS, slow=True)
    reader, writer = await s6.open_connection(
        proxy.url("alice:s3cret"), LOCALHOST, echo_port, initial_data=b"abc"
    )
    assert await reader.readexactly(3) == b"abc"
    assert [r.type for r in writer.get_extra_info("socks6_auth_replies")] == [
        AuthReplyType.FAILURE,
        AuthReplyType.SUCCESS,
    ]
    await close(writer)


@pytest.mark.conformance("AUTH-03")
@pytest.mark.parametrize("slow", [False, True], ids=["0-rtt", "slow"])
async def test_wrong_password(make_proxy: MakeProxy, echo_port: int, slow: bool) -> None:
    """AUTH-03: rejected credentials raise AuthenticationError (reply_code None)."""
    proxy = await make_proxy(users=USERS, slow=slow)
    with pytest.raises(AuthenticationError) as info:
        await s6.open_connection(proxy.url("alice:wrong"), LOCALHOST, echo_port)
    assert info.value.reply_code is None


@pytest.mark.conformance("AUTH-03")
async def test_no_credentials_but_required(make_proxy: MakeProxy, echo_port: int) -> None:
    """AUTH-03: Method Selection 0xFF: AuthenticationError, connection closed."""
    proxy = await make_proxy(users=USERS)
    with pytest.raises(AuthenticationError, match="0xFF"):
        await s6.open_connection(proxy.url(), LOCALHOST, echo_port)


@pytest.mark.conformance("REQ-10")
async def test_refusal_carries_reply_code(make_proxy: MakeProxy) -> None:
    """REQ-10: CONNECT to a closed port: ProxyError with CONNECTION_REFUSED; closed."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        closed_port = probe.getsockname()[1]
    proxy = await make_proxy()
    with pytest.raises(ProxyError) as info:
        await s6.open_connection(proxy.url(), LOCALHOST, closed_port)
    assert info.value.reply_code is ReplyCode.CONNECTION_REFUSED


@pytest.mark.conformance("REQ-02")
async def test_version_mismatch_reply() -> None:
    """REQ-02: a peer answering the single byte 6 and closing gives VersionMismatchError."""

    async def mismatch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"\x06")
        writer.close()

    server = await asyncio.start_server(mismatch, LOCALHOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(VersionMismatchError):
            await s6.open_connection(f"socks6://{LOCALHOST}:{port}", LOCALHOST, 9)
        with pytest.raises(VersionMismatchError):
            await asyncio.to_thread(
                bclient.Proxy.from_url(f"socks6://{LOCALHOST}:{port}").connect, LOCALHOST, 9
            )
    finally:
        server.close()


class ResettingProxy:
    """A raw-socket proxy on 127.0.0.1 (a thread, bytes by hand) that sends ``replies`` and
    then ends the connection with a reset (RST), the way a proxy does that closes with part
    of the Request still unread. ``read`` is how many Request bytes it reads first. With a
    small ``rcvbuf`` a client writing a long first flight is still blocked in that write
    when the reset comes."""

    def __init__(self, replies: bytes, *, read: int, userinfo: str = "", rcvbuf: int | None = None) -> None:
        self.replies = replies
        self.read = read
        self.listener = socket.socket()
        if rcvbuf is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before listen
        self.listener.bind((LOCALHOST, 0))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.url = f"socks6://{userinfo}{LOCALHOST}:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        for _ in range(100):  # bounded: 100 x 0.2 s
            if self._stop.is_set():
                return
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(self.read)
                conn.sendall(self.replies)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


async def _all_flavours_raise(
    url: str, expected: type[Socks6Error], *, bind: bool = False, chained: bool = True
) -> None:
    """The error of a request through ``url`` in the three flavours: ``expected`` (chained to
    the ConnectionResetError if ``chained``), and the client's socket closed (no descriptor
    left behind)."""
    before = len(os.listdir("/proc/self/fd"))

    async def blocking() -> object:
        proxy = bclient.Proxy.from_url(url)
        if bind:
            return await asyncio.to_thread(lambda: proxy.bind(timeout=5).accept(timeout=5))
        return await asyncio.to_thread(proxy.connect, LOCALHOST, 9, initial_data=b"x" * 64, timeout=5)

    async def streams() -> object:
        if bind:
            return await (await s6.open_bind(url, timeout=5)).accept(timeout=5)
        return await s6.open_connection(url, LOCALHOST, 9, initial_data=b"x" * 64, timeout=5)

    async def sockets() -> object:
        proxy = s6.Proxy.from_url(url)
        if bind:
            return await (await proxy.bind(timeout=5)).accept(timeout=5)
        return await proxy.connect(LOCALHOST, 9, initial_data=b"x" * 64, timeout=5)

    for flavour in (blocking, streams, sockets):
        with pytest.raises(expected) as info:
            await flavour()
        if chained:
            assert isinstance(info.value.__cause__, ConnectionResetError), flavour.__name__
    await asyncio.sleep(0.05)  # the stream flavour's transport closes on the next loop turn
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.conformance("REQ-02")
async def test_version_mismatch_reply_followed_by_a_reset() -> None:
    """REQ-02: a proxy that reads only the version byte, answers 6 and closes leaves the
    rest of the Request unread, so its kernel sends RST right behind the 6. The client
    still reports VersionMismatchError (it used to let ConnectionResetError out)."""
    proxy = ResettingProxy(b"\x06", read=1)
    try:
        await _all_flavours_raise(proxy.url, VersionMismatchError)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "replies",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(bytes.fromhex("060000"), id="auth-reply-cut"),
        pytest.param(bytes.fromhex("06000000 06000000 04d20001 7f00"), id="operation-reply-cut"),
    ],
)
async def test_reset_in_the_middle_of_a_reply_is_a_remote_protocol_error(replies: bytes) -> None:
    """A proxy that resets the connection before its reply is complete
    gives RemoteProtocolError (chained to the reset) in every flavour, and no socket left."""
    proxy = ResettingProxy(replies, read=65536)
    try:
        await _all_flavours_raise(proxy.url, RemoteProtocolError)
    finally:
        proxy.close()


async def test_reset_when_the_slow_exchange_starts_is_a_remote_protocol_error() -> None:
    """D7: the proxy selects username/password and resets the connection; the
    client's RFC 1929 request then meets the reset (EPIPE / ECONNRESET on the write). The
    client reads on and reports RemoteProtocolError, not a bare ConnectionResetError."""
    select_userpass = bytes.fromhex("06010008 00030008 02000000")  # Type 1, Method Selection 2
    proxy = ResettingProxy(select_userpass, read=65536, userinfo="alice:s3cret@")
    try:
        await _all_flavours_raise(proxy.url, RemoteProtocolError, chained=False)
    finally:
        proxy.close()


async def test_reset_before_the_second_bind_reply_is_a_remote_protocol_error() -> None:
    """BIND: a reset where the second Operation Reply should be gives
    RemoteProtocolError from accept(), in every flavour."""
    first = bytes.fromhex("06000000 06000000 04d20001 7f000001")  # Auth OK, bound 127.0.0.1:1234
    proxy = ResettingProxy(first + bytes.fromhex("060000"), read=65536)
    try:
        await _all_flavours_raise(proxy.url, RemoteProtocolError, bind=True)
    finally:
        proxy.close()


@pytest.mark.conformance("REQ-02", "REQ-10")
@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        pytest.param(b"\x06", VersionMismatchError, id="version-mismatch"),
        pytest.param(bytes.fromhex("06000000 06010000 00000001 00000000"), ProxyError, id="refusal"),
    ],
)
async def test_reset_while_the_first_flight_is_written_gives_the_typed_error(
    replies: bytes, expected: type[Socks6Error]
) -> None:
    """REQ-02 / REQ-10: a CONNECT with 2 MB of false-start data; the proxy answers
    after the Request header and closes, so the client's first write meets ECONNRESET. The
    client reads on, as for its later handshake writes, instead of letting
    ConnectionResetError out: the blocking and socket flavours read the reply the proxy
    sent (the kernel keeps it readable), and the stream flavour, whose StreamReader reports
    the reset before its buffered bytes, gives RemoteProtocolError chained to the reset."""
    data = b"x" * 2_000_000
    proxy = ResettingProxy(replies, read=4, rcvbuf=1024)
    try:
        with pytest.raises(expected):
            await asyncio.to_thread(
                bclient.Proxy.from_url(proxy.url).connect, LOCALHOST, 9, initial_data=data, timeout=5
            )
        with pytest.raises(expected):
            await s6.Proxy.from_url(proxy.url).connect(LOCALHOST, 9, initial_data=data, timeout=5)
        with pytest.raises((expected, RemoteProtocolError)) as info:
            await s6.open_connection(proxy.url, LOCALHOST, 9, initial_data=data, timeout=5)
        if info.type is RemoteProtocolError:
            assert isinstance(info.value.__cause__, ConnectionResetError)
    finally:
        proxy.close()


async def test_timeout_is_timeouterror() -> None:
    """A proxy that never answers: TimeoutError after ``timeout``, in both flavours."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, LOCALHOST, 0)
    url = f"socks6://{LOCALHOST}:{server.sockets[0].getsockname()[1]}"
    try:
        with pytest.raises(TimeoutError):
            await s6.open_connection(url, LOCALHOST, 9, timeout=0.2)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(bclient.Proxy.from_url(url).connect, LOCALHOST, 9, timeout=0.2)
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_stack_options_pass_through(make_proxy: MakeProxy, echo_port: int) -> None:
    """Stack options reach the proxy as given; its echo is in get_extra_info (D9)."""
    proxy = await make_proxy()
    ttl = TTLOption(StackLeg.PROXY_REMOTE, 33)
    reader, writer = await s6.open_connection(proxy.url(), LOCALHOST, echo_port, stack_options=[ttl])
    assert ttl in proxy.requests[0].options
    assert writer.get_extra_info("socks6_reply").options == (ttl,)
    assert isinstance(writer.get_extra_info("socks6_connection"), ClientConnection)
    assert writer.get_extra_info("peername") is not None  # transport keys still work
    await close(writer)


async def test_destination_speaks_first_nothing_is_lost(make_proxy: MakeProxy, banner_port: int) -> None:
    """The handshake reads exactly the replies: the destination's first bytes, sent right
    behind the Operation Reply, reach the application (socket and stream flavours)."""
    proxy = await make_proxy()
    reader, writer = await s6.open_connection(proxy.url(), LOCALHOST, banner_port)
    assert await reader.readexactly(8) == b"BANNER\r\n"
    await close(writer)
    loop = asyncio.get_running_loop()
    with await s6.Proxy.from_url(proxy.url()).connect(LOCALHOST, banner_port) as sock:
        data = b""
        while len(data) < 8:
            data += await loop.sock_recv(sock, 64)
    assert data == b"BANNER\r\n"


# --- TLS (TRN-03) ------------------------------------------------------------------------------------


@pytest.mark.conformance("TRN-03")
async def test_tls_proxy_verifies_certificates_by_default(
    make_proxy: MakeProxy, echo_port: int, tls_files: TLSFiles
) -> None:
    """TRN-03: socks6+tls checks the proxy certificate by default; a private CA must be
    trusted explicitly through proxy_ssl."""
    proxy = await make_proxy(tls_files.server_context())
    url = proxy.url(scheme="socks6+tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        await s6.open_connection(url, LOCALHOST, echo_port)
    reader, writer = await s6.open_connection(
        url, LOCALHOST, echo_port, proxy_ssl=tls_files.client_context(), initial_data=b"tls!"
    )
    assert await reader.readexactly(4) == b"tls!"
    assert writer.get_extra_info("ssl_object") is not None
    await close(writer)


@pytest.mark.conformance("TRN-03")
async def test_tls_proxy_hostname_is_checked(
    make_proxy: MakeProxy, echo_port: int, tls_files: TLSFiles
) -> None:
    """TRN-03: the certificate must name the host we connect to."""
    proxy = await make_proxy(tls_files.server_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        await s6.open_connection(
            proxy.url(scheme="socks6+tls"),
            LOCALHOST,
            echo_port,
            proxy_ssl=tls_files.client_context(),
            proxy_server_hostname="not-localhost.test",
        )


def test_tls_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="socks6://"):
        s6.Proxy.from_url("socks6+tls://127.0.0.1", proxy_ssl=False)
    with pytest.raises(ValueError, match="socks6\\+tls"):
        s6.Proxy.from_url("socks6://127.0.0.1", proxy_ssl=ssl.create_default_context())
    assert bclient.Proxy.from_url("socks6+tls://127.0.0.1").ssl_context is not None


async def test_tls_to_destination_inside_tunnel(
    make_proxy: MakeProxy, tls_files: TLSFiles, echo_port: int
) -> None:
    """ssl= is TLS to the destination through the tunnel, verified, also inside socks6+tls."""
    tls_echo = await asyncio.start_server(_echo, LOCALHOST, 0, ssl=tls_files.server_context())
    port = tls_echo.sockets[0].getsockname()[1]
    try:
        for scheme, proxy_ctx in (("socks6", None), ("socks6+tls", tls_files.client_context())):
            proxy = await make_proxy(tls_files.server_context() if proxy_ctx else None)
            reader, writer = await s6.open_connection(
                proxy.url(scheme=scheme), LOCALHOST, port, ssl=tls_files.client_context(), proxy_ssl=proxy_ctx
            )
            assert await roundtrip(reader, writer, b"inner tls") == b"inner tls"
            assert writer.get_extra_info("socks6_reply").reply_code is ReplyCode.SUCCESS
            await close(writer)
        proxy = await make_proxy()
        with pytest.raises(ssl.SSLCertVerificationError):
            await s6.open_connection(proxy.url(), LOCALHOST, port, ssl=True)
    finally:
        tls_echo.close()


async def test_asyncio_socket_flavour_refuses_tls_proxy() -> None:
    with pytest.raises(ValueError, match="open_connection"):
        await s6.Proxy.from_url("socks6+tls://127.0.0.1:1").connect(LOCALHOST, 9)


# --- TFO (TRN-02) ------------------------------------------------------------------------------------


@pytest.mark.conformance("TRN-02")
@pytest.mark.parametrize("token", [False, True], ids=["no-token", "token"])
async def test_tfo_keeps_initial_data_out_of_the_syn_without_a_token(
    make_proxy: MakeProxy, echo_port: int, monkeypatch: pytest.MonkeyPatch, token: bool
) -> None:
    """TRN-02: with tfo=True the first write (the one the kernel may put in the SYN) is the
    Request alone unless the Request spends an idempotence token."""
    proxy = await make_proxy()
    writes: list[bytes] = []
    real_write = aclient._StreamChannel.write

    async def spy(self: aclient._StreamChannel, data: bytes) -> None:
        writes.append(data)
        await real_write(self, data)

    monkeypatch.setattr(aclient._StreamChannel, "write", spy)
    async with s6.Session(proxy.url(), tokens=4) as session:
        if token:
            await session.proxy.noop(session=session)
        writes.clear()
        reader, writer = await session.open_connection(
            LOCALHOST, echo_port, initial_data=b"DATA", tfo=True, idempotent=token
        )
        assert await reader.readexactly(4) == b"DATA"
        first = list(writes)
        await close(writer)
    writes = first
    if token:
        assert len(writes) == 1 and writes[0].endswith(b"DATA")  # request + data in one (SYN) write
    else:
        assert len(writes) == 2 and writes[1] == b"DATA" and not writes[0].endswith(b"DATA")


@pytest.mark.conformance("TRN-02")
async def test_tfo_connect_works_and_uses_syn_data_when_the_kernel_allows(
    make_proxy: MakeProxy, echo_port: int
) -> None:
    """TRN-02 with a real TCP_FASTOPEN_CONNECT socket. SYN data needs server-side TFO in
    net.ipv4.tcp_fastopen (bit 2) and a cached cookie, so it is asserted only then."""
    proxy = await make_proxy()
    assert proxy._server is not None
    listener = proxy._server.sockets[0]
    try:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    except OSError:
        pass
    server_tfo = int(Path("/proc/sys/net/ipv4/tcp_fastopen").read_text()) & 0x2
    syn_data = []
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the first connection fetches the cookie
        with await s6.Proxy.from_url(proxy.url()).connect(LOCALHOST, echo_port, tfo=True) as sock:
            syn_data.append(syn_data_acked(sock))
            await loop.sock_sendall(sock, b"ping")
            assert await loop.sock_recv(sock, 4) == b"ping"
    if server_tfo:
        assert syn_data[-1]


# --- Sessions and idempotence -----------------------------------------------------------------------


@pytest.mark.conformance("SES-06")
@pytest.mark.parametrize("in_auth_reply", [False, True], ids=["id-in-op-reply", "id-in-auth-reply"])
async def test_session_lifecycle(make_proxy: MakeProxy, echo_port: int, in_auth_reply: bool) -> None:
    """D4, SES-06 and the teardown (client side): the first request initiates the session with
    credentials; the next ones carry only the Session ID; closing sends a NOOP with
    Session ID + Session Teardown."""
    proxy = await make_proxy(users=USERS, session_id_in_auth_reply=in_auth_reply)
    async with s6.Session(proxy.url("alice:s3cret")) as session:
        r1, w1 = await session.open_connection(LOCALHOST, echo_port)
        assert session.session_id is not None and session.session_id in proxy.sessions
        r2, w2 = await session.open_connection(LOCALHOST, echo_port, initial_data=b"x")
        assert await r2.readexactly(1) == b"x"
        await close(w1)
        await close(w2)
    first, second, teardown = proxy.requests
    kinds = [[type(o).__name__ for o in r.options] for r in proxy.requests]
    assert kinds[0] == ["AuthMethodAdvertisement", "AuthData", "SessionRequest"]
    assert kinds[1] == ["SessionID"]  # no credentials, no Session Request (SES-06)
    assert teardown.command is Command.NOOP
    assert kinds[2][-2:] == ["SessionID", "SessionTeardown"]
    assert proxy.sessions == {}


@pytest.mark.conformance("SES-06")
async def test_concurrent_requests_wait_for_the_session(make_proxy: MakeProxy, echo_port: int) -> None:
    """SES-06: requests issued while the session is being set up join it; only one
    Session Request is ever sent."""
    proxy = await make_proxy(users=USERS)
    session = s6.Session(proxy.url("alice:s3cret"))
    streams = await asyncio.gather(*(session.open_connection(LOCALHOST, echo_port) for _ in range(4)))
    requests_with_session_request = [
        r for r in proxy.requests if any(type(o).__name__ == "SessionRequest" for o in r.options)
    ]
    assert len(requests_with_session_request) == 1
    assert len(proxy.sessions) == 1
    for _, writer in streams:
        await close(writer)
    await session.aclose()


@pytest.mark.conformance("IDM-05")
async def test_idempotent_requests_spend_tokens_in_order(make_proxy: MakeProxy, echo_port: int) -> None:
    """IDM-05: tokens requested with the session, smallest spent first (across the 2^32
    wrap the scripted proxy starts its window at)."""
    proxy = await make_proxy()
    async with s6.Session(proxy.url(), tokens=4) as session:
        for _ in range(3):
            reader, writer = await session.open_connection(LOCALHOST, echo_port, idempotent=True)
            assert writer.get_extra_info("socks6_connection").token_accepted is True
            await close(writer)
    spent = [o.token for r in proxy.requests for o in r.options if isinstance(o, IdempotenceExpenditure)]
    assert spent == [0xFFFFFFFE, 0xFFFFFFFF, 0]
    assert proxy.requests[0].command is Command.NOOP  # the session came first, to get a window


async def test_session_invalid_starts_a_new_session_and_retries(
    make_proxy: MakeProxy, echo_port: int
) -> None:
    """Session Invalid, client side: the proxy forgot the session; the request is retried once in a
    new session (safe: the proxy did not act on it)."""
    proxy = await make_proxy(users=USERS)
    session = s6.Session(proxy.url("alice:s3cret"))
    _, w1 = await session.open_connection(LOCALHOST, echo_port)
    old = session.session_id
    proxy.sessions.clear()  # proxy restart / expiry
    r2, w2 = await session.open_connection(LOCALHOST, echo_port, initial_data=b"again")
    assert await r2.readexactly(5) == b"again"
    assert session.session_id not in (None, old)
    for writer in (w1, w2):
        await close(writer)
    await session.aclose()


async def test_session_declined(make_proxy: MakeProxy, echo_port: int) -> None:
    """A proxy that silently declines sessions: requests keep sending credentials."""
    proxy = await make_proxy(users=USERS, grant_sessions=False)
    async with s6.Session(proxy.url("alice:s3cret")) as session:
        for _ in range(2):
            _, writer = await session.open_connection(LOCALHOST, echo_port)
            await close(writer)
        with pytest.raises(Socks6Error, match="declined"):
            await session.open_connection(LOCALHOST, echo_port, idempotent=True)
    assert all(any(type(o).__name__ == "AuthData" for o in r.options) for r in proxy.requests)


async def test_session_arguments(make_proxy: MakeProxy, echo_port: int) -> None:
    proxy = await make_proxy()
    other = await make_proxy()
    session = s6.Session(proxy.url())
    with pytest.raises(ValueError, match="differ"):
        await s6.open_connection(other.url(), LOCALHOST, echo_port, session=session)
    with pytest.raises(ValueError, match="session"):
        await s6.open_connection(proxy.url(), LOCALHOST, echo_port, idempotent=True)
    reader, writer = await s6.open_connection(None, LOCALHOST, echo_port, session=session)
    await close(writer)
    await session.aclose()


# --- BIND (CMD-04 client side) ------------------------------------------------------------------------


async def test_open_bind_streams(make_proxy: MakeProxy) -> None:
    """BIND, client side: the first reply gives the bound address, accept() the peer; data flows."""
    proxy = await make_proxy()
    binding = await s6.open_bind(proxy.url())
    host, port = binding.address
    assert binding.peer_address is None
    peer_reader, peer_writer = await asyncio.open_connection(host, port)
    reader, writer = await binding.accept(timeout=5)
    assert binding.peer_address == peer_writer.get_extra_info("sockname")[:2]
    assert writer.get_extra_info("socks6_peer_reply") == binding.peer_reply
    peer_writer.write(b"from peer")
    assert await reader.readexactly(9) == b"from peer"
    writer.write(b"to peer")
    assert await peer_reader.readexactly(7) == b"to peer"
    await close(writer)
    await close(peer_writer)


async def test_bind_socket_flavour(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    binding = await s6.Proxy.from_url(proxy.url()).bind()
    _, peer_writer = await asyncio.open_connection(*binding.address)
    try:
        with await binding.accept(timeout=5) as sock:
            peer_writer.write(b"hi")
            assert await asyncio.get_running_loop().sock_recv(sock, 2) == b"hi"
    finally:
        await close(peer_writer)


async def test_bind_accept_timeout(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    binding = await s6.open_bind(proxy.url())
    with pytest.raises(TimeoutError):
        await binding.accept(timeout=0.1)


# --- Blocking flavour -----------------------------------------------------------------------------------


async def test_blocking_connect_and_session(make_proxy: MakeProxy, echo_port: int, banner_port: int) -> None:
    """socks6fast.client: connect() returns a blocking socket; sessions work the same."""
    proxy = await make_proxy(users=USERS, slow=False)

    def work() -> list[bytes]:
        out = []
        p = bclient.Proxy.from_url(proxy.url("alice:s3cret"))
        with p.connect(LOCALHOST, echo_port, initial_data=b"blocking") as sock:
            assert sock.gettimeout() is None
            out.append(sock.recv(8))
        with p.connect(LOCALHOST, banner_port) as sock:
            out.append(sock.recv(8))
        with bclient.Session(p, tokens=2) as session:
            with session.connect(LOCALHOST, echo_port, initial_data=b"s1") as a:
                out.append(a.recv(2))
            sock, conn = session.connect_tunnel(LOCALHOST, echo_port, idempotent=True, initial_data=b"s2")
            with sock:
                out.append(sock.recv(2))
            assert conn.token_accepted is True
        return out

    assert await asyncio.to_thread(work) == [b"blocking", b"BANNER\r\n", b"s1", b"s2"]
    assert proxy.sessions == {}  # torn down


@pytest.mark.conformance("IDM-05")
async def test_blocking_session_replies_update_the_session_under_its_lock(
    make_proxy: MakeProxy, echo_port: int
) -> None:
    """IDM-05 (client side): the blocking Session is shared between threads, which
    spend tokens from it under its lock; the replies that update it (window advertisements
    rebuild the spent-token set) are read under the same lock. Unguarded, a thread reading
    an advertisement while another spent a token could lose the spend (the token then goes
    out twice) or fail with 'Set changed size during iteration'."""
    proxy = await make_proxy()
    session = bclient.Session(proxy.url(), tokens=4)
    free_while_updating: list[bool] = []
    real_on_window = session.core.on_window

    def spy(base: int, size: int) -> None:
        def try_lock() -> None:
            got = session._cond.acquire(blocking=False)
            free_while_updating.append(got)
            if got:
                session._cond.release()

        helper = threading.Thread(target=try_lock)
        helper.start()
        helper.join(5)
        real_on_window(base, size)

    session.core.on_window = spy  # type: ignore[method-assign]

    def work() -> None:
        with session:
            session.connect(LOCALHOST, echo_port, timeout=5).close()  # initiates, gets the window
            session.connect(LOCALHOST, echo_port, idempotent=True, timeout=5).close()

    await asyncio.to_thread(work)
    assert free_while_updating and not any(free_while_updating)


@pytest.mark.conformance("TRN-03")
async def test_blocking_tls_and_errors(make_proxy: MakeProxy, echo_port: int, tls_files: TLSFiles) -> None:
    """TRN-03 and refusals in the blocking flavour."""
    proxy = await make_proxy(tls_files.server_context())
    url = proxy.url(scheme="socks6+tls")

    def work() -> bytes:
        with pytest.raises(ssl.SSLCertVerificationError):
            bclient.Proxy.from_url(url).connect(LOCALHOST, echo_port)
        p = bclient.Proxy.from_url(url, proxy_ssl=tls_files.client_context())
        with p.connect(LOCALHOST, echo_port, initial_data=b"tls", tfo=True) as sock:
            assert isinstance(sock, ssl.SSLSocket)
            return sock.recv(3)

    assert await asyncio.to_thread(work) == b"tls"
    plain = await make_proxy(users=USERS, slow=True)

    def refused() -> None:
        with pytest.raises(AuthenticationError):
            bclient.Proxy.from_url(plain.url("alice:nope")).connect(LOCALHOST, echo_port)

    await asyncio.to_thread(refused)


async def test_blocking_bind(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()

    def work() -> bytes:
        with bclient.Proxy.from_url(proxy.url()).bind() as binding:
            with socket.create_connection(binding.address) as peer:
                with binding.accept(timeout=5) as sock:
                    assert binding.peer_address == peer.getsockname()[:2]
                    peer.sendall(b"bound")
                    return sock.recv(5)

    assert await asyncio.to_thread(work) == b"bound"


def _tfo_connect_is_deferred() -> bool:
    """Have the kernel cache a TFO cookie for 127.0.0.1 (cookies are per address, not per
    port) and tell whether a TCP_FASTOPEN_CONNECT connect() is now deferred to the first
    write. Needs client and server TFO in net.ipv4.tcp_fastopen (bits 0x1 and 0x2)."""
    with socket.socket() as listener:
        listener.settimeout(5)
        listener.bind((LOCALHOST, 0))
        try:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
        except OSError:
            return False
        listener.listen()
        deferred = False
        for _ in range(2):  # the first connection fetches the cookie
            with socket.socket() as client:
                client.settimeout(5)
                if not bclient.enable_tfo_connect(client):
                    return False
                client.connect(listener.getsockname())
                try:
                    client.getpeername()
                    deferred = False
                except OSError:  # ENOTCONN: no SYN yet
                    deferred = True
                client.sendall(b"x")
                peer, _ = listener.accept()
                peer.close()
        return deferred


@pytest.mark.conformance("TRN-02", "TRN-03")
async def test_blocking_tfo_when_the_kernel_defers_connect(
    make_proxy: MakeProxy, echo_port: int, tls_files: TLSFiles
) -> None:
    """TRN-02, TRN-03 (regression): with a TFO cookie cached for the proxy's address,
    TCP_FASTOPEN_CONNECT makes connect() return before any SYN. ssl.SSLSocket refused such
    a socket (BlockingIOError from wrap_socket, plus a leaked SSLSocket), so the TLS proxy
    is reached without TFO; plain sockets start the connection with the Request."""
    tls_proxy = await make_proxy(tls_files.server_context())
    plain_proxy = await make_proxy()
    tfo_sysctl = int(Path("/proc/sys/net/ipv4/tcp_fastopen").read_text())

    def work() -> tuple[bool, list[bytes]]:
        deferred = _tfo_connect_is_deferred()
        tls = bclient.Proxy.from_url(tls_proxy.url(scheme="socks6+tls"), proxy_ssl=tls_files.client_context())
        plain = bclient.Proxy.from_url(plain_proxy.url())
        out = []
        for proxy in (tls, plain, tls, plain):
            with proxy.connect(LOCALHOST, echo_port, initial_data=b"tfo", tfo=True) as sock:
                assert sock.gettimeout() is None
                out.append(sock.recv(3))
        return deferred, out

    deferred, out = await asyncio.to_thread(work)
    assert out == [b"tfo"] * 4
    if tfo_sysctl & 0x3 == 0x3:
        assert deferred  # the scenario really ran


def _fd_still_open(sock: socket.socket) -> Callable[[], bool]:
    """Whether ``sock``'s descriptor (as it is now) stays open, even once detached (fd and
    inode, so a reused descriptor number does not count)."""
    fd = sock.fileno()
    inode = os.fstat(fd).st_ino

    def still_open() -> bool:
        try:
            return os.fstat(fd).st_ino == inode
        except OSError:
            return False

    return still_open


def _reset_connection(listener: socket.socket) -> socket.socket:
    """Connect to ``listener`` and have it reset (RST) the connection at once."""
    client = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        select.select([client], [], [], 5)  # the RST has arrived
    except BaseException:
        client.close()
        raise
    return client


@pytest.mark.conformance("TRN-03")
def test_blocking_tls_failures_close_every_socket(tls_files: TLSFiles) -> None:
    """TRN-03: a proxy that resets or closes before the TLS handshake ends gives OSError and
    leaves no descriptor open, including the SSLSocket that ssl.SSLContext.wrap_socket
    itself leaves unclosed when the connection is gone before it wraps."""
    ctx = tls_files.client_context()
    deadline = bclient._Deadline(5)
    with socket.socket() as listener:
        listener.settimeout(5)
        listener.bind((LOCALHOST, 0))
        listener.listen()
        # What the stdlib does: the orphaned SSLSocket lives on in the traceback only.
        raw = _reset_connection(listener)
        still_open = _fd_still_open(raw)
        with pytest.raises(OSError) as info:
            ctx.wrap_socket(raw, server_hostname="localhost")
        assert raw.fileno() == -1 and still_open()
        bclient._close_orphaned_ssl_socket(info.value)
        assert not still_open()
        # _wrap_tls on a reset connection, and on one closed during the handshake.
        raw = _reset_connection(listener)
        still_open = _fd_still_open(raw)
        with pytest.raises(OSError):
            bclient._wrap_tls(raw, ctx, "localhost", deadline)
        assert not still_open()
        raw = socket.create_connection(listener.getsockname(), timeout=5)
        still_open = _fd_still_open(raw)
        listener.accept()[0].close()
        with pytest.raises(OSError):
            bclient._wrap_tls(raw, ctx, "localhost", deadline)
        assert not still_open()


@pytest.mark.conformance("TRN-02")
def test_blocking_write_waits_out_einprogress() -> None:
    """TRN-02: a TFO first write that the kernel could not put into the SYN fails with
    EINPROGRESS having queued nothing; the channel waits for the connection, sends it all."""
    a, b = socket.socketpair()

    class BareSYN(socket.socket):
        attempts = 0

        def sendall(self, data: Any, flags: int = 0) -> None:
            self.attempts += 1
            if self.attempts == 1:
                raise BlockingIOError(errno.EINPROGRESS, os.strerror(errno.EINPROGRESS))
            super().sendall(data, flags)

    sock = BareSYN(a.family, a.type, fileno=a.detach())
    with sock, b:
        bclient._Channel(sock, bclient._Deadline(5)).write(b"request")
        assert b.recv(7) == b"request"
        assert sock.attempts == 2


# --- uvloop --------------------------------------------------------------------------------


def test_open_connection_under_uvloop() -> None:
    """The asyncio flavour runs unchanged on uvloop (session, BIND, TFO)."""

    async def main() -> list[bytes]:
        echo = await asyncio.start_server(_echo, LOCALHOST, 0)
        echo_port = echo.sockets[0].getsockname()[1]
        proxy = await ScriptedProxy(users=USERS).start()
        try:
            out = []
            async with s6.Session(proxy.url("alice:s3cret"), tokens=2) as session:
                for idem in (False, True):
                    reader, writer = await session.open_connection(
                        LOCALHOST, echo_port, initial_data=b"uv", tfo=True, idempotent=idem
                    )
                    out.append(await reader.readexactly(2))
                    await close(writer)
            binding = await s6.open_bind(proxy.url("alice:s3cret"))
            _, peer = await asyncio.open_connection(*binding.address)
            reader, writer = await binding.accept(timeout=5)
            peer.write(b"bd")
            out.append(await reader.readexactly(2))
            await close(writer)
            await close(peer)
            return out
        finally:
            await proxy.stop()
            echo.close()

    assert uvloop.run(main()) == [b"uv", b"uv", b"bd"]


# --- Against the real socks6fast server (socks6fast.asyncio.server) -------------------------------------


@dataclass
class RealProxy:
    server: Server
    port: int
    tls_port: int

    def url(self, userinfo: str = "alice:s3cret", scheme: str = "socks6") -> str:
        port = self.tls_port if scheme == "socks6+tls" else self.port
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{LOCALHOST}:{port}"


@pytest.fixture
async def real_proxy(tls_files: TLSFiles) -> AsyncIterator[RealProxy]:
    """The project's proxy in-process on 127.0.0.1:0 (plain and TLS), user alice."""
    config = make_config(
        users={"alice": "s3cret"},
        server={
            "tls_listen": [f"{LOCALHOST}:0"],
            "tls_certificate": str(tls_files.cert),
            "tls_key": str(tls_files.key),
        },
    )
    async with running_server(config) as server:
        yield RealProxy(server, server.addresses[0][1], server.tls_addresses[0][1])


@pytest.mark.conformance("AUTH-01", "CMD-03")
async def test_real_server_one_flight_zero_rtt(real_proxy: RealProxy, echo_port: int) -> None:
    """AUTH-01, CMD-03 against the real proxy: one Authentication Reply (Type 0) carrying
    the RFC 1929 reply, then the Operation Reply; initial data delivered first."""
    reader, writer = await s6.open_connection(real_proxy.url(), LOCALHOST, echo_port, initial_data=b"first,")
    writer.write(b"second")
    assert await reader.readexactly(12) == b"first,second"
    (auth,) = writer.get_extra_info("socks6_auth_replies")
    assert auth.type is AuthReplyType.SUCCESS
    assert writer.get_extra_info("socks6_reply").reply_code is ReplyCode.SUCCESS
    await close(writer)


@pytest.mark.conformance("AUTH-03", "REQ-10")
async def test_real_server_refusals(real_proxy: RealProxy, echo_port: int) -> None:
    """REQ-10 / AUTH-03 against the real proxy: refused CONNECT carries its code; wrong or
    missing credentials raise AuthenticationError."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(ProxyError) as info:
        await s6.open_connection(real_proxy.url(), LOCALHOST, closed_port)
    assert info.value.reply_code is ReplyCode.CONNECTION_REFUSED
    with pytest.raises(AuthenticationError):
        await s6.open_connection(real_proxy.url("alice:wrong"), LOCALHOST, echo_port)
    with pytest.raises(AuthenticationError):
        await s6.open_connection(real_proxy.url(""), LOCALHOST, echo_port)


@pytest.mark.conformance("AUTH-05")
async def test_real_server_slow_exchange_with_the_sans_io_core(real_proxy: RealProxy, echo_port: int) -> None:
    """D7 against the real proxy: a Request that only advertises method 2 (no 0-RTT data)
    goes through the RFC 1929 exchange driven by ClientConnection over a real socket."""
    loop = asyncio.get_running_loop()
    sock = await aclient._open_tcp_socket(LOCALHOST, real_proxy.port)
    try:
        conn = ClientConnection(credentials=UserPassRequest(b"alice", b"s3cret"))
        request = Request(
            Command.CONNECT,
            AddressType.IPV4,
            LOCALHOST,
            echo_port,
            (AuthMethodAdvertisement(4, (AuthMethod.USERNAME_PASSWORD,)),),
        )
        await loop.sock_sendall(sock, conn.send(request, b"slow"))
        await aclient._Performer().run(read_replies(aclient._SocketChannel(sock, loop), conn))
        assert [r.type for r in conn.auth_replies] == [AuthReplyType.FAILURE, AuthReplyType.SUCCESS]
        assert await loop.sock_recv(sock, 4) == b"slow"
    finally:
        sock.close()


@pytest.mark.conformance("IDM-05", "SES-06")
async def test_real_server_session_tokens_and_teardown(real_proxy: RealProxy, echo_port: int) -> None:
    """D4, SES-06, IDM-05 and the teardown against the real proxy: after aclose(), the old
    Session ID is answered with Session Invalid."""
    async with s6.Session(real_proxy.url(), tokens=4) as session:
        for idempotent in (False, True, True):
            reader, writer = await session.open_connection(
                LOCALHOST, echo_port, initial_data=b"s", idempotent=idempotent
            )
            assert await reader.readexactly(1) == b"s"
            conn = writer.get_extra_info("socks6_connection")
            if idempotent:
                assert conn.token_accepted is True
            await close(writer)
        old_id = session.session_id
        assert old_id is not None and session.core.window is not None
    # Reuse the torn-down ID: the proxy answers Session Invalid, the client starts a new
    # session (with the credentials) and retries; a kept ID would mean no teardown.
    stale = s6.Session(real_proxy.url())
    stale.core.request_options()
    stale.core.on_session_id(old_id)
    reader, writer = await stale.open_connection(LOCALHOST, echo_port, initial_data=b"z")
    assert await reader.readexactly(1) == b"z"
    assert stale.session_id not in (None, old_id)
    await close(writer)
    await stale.aclose()


@pytest.mark.conformance("SES-03")
async def test_session_invalid_retry_keeps_the_stack_options(real_proxy: RealProxy, echo_port: int) -> None:
    """SES-03 (client side), both flavours: after Session Invalid the request is retried in
    a new session with the caller's Stack options, also when they were given as a one-shot
    iterator (regression: the first attempt used it up and the retry went out without
    them). The real proxy echoes the TTL it applied (D9)."""
    ttl = TTLOption(StackLeg.PROXY_REMOTE, 7)

    def forgotten(session: s6.Session | bclient.Session) -> None:
        session.core.request_options()
        session.core.on_session_id(b"GONE")  # a Session ID the proxy does not know

    stale = s6.Session(real_proxy.url())
    forgotten(stale)
    reader, writer = await stale.open_connection(LOCALHOST, echo_port, stack_options=iter([ttl]))
    assert stale.session_id not in (None, b"GONE")  # retried in a new session
    assert ttl in writer.get_extra_info("socks6_reply").options
    await close(writer)
    await stale.aclose()

    def blocking() -> None:
        with bclient.Session(real_proxy.url()) as session:
            forgotten(session)
            sock, conn = session.connect_tunnel(LOCALHOST, echo_port, stack_options=iter([ttl]))
            sock.close()
            assert session.session_id not in (None, b"GONE")
            assert conn.operation_reply is not None and ttl in conn.operation_reply.options

    await asyncio.to_thread(blocking)


@pytest.mark.conformance("CMD-04")
async def test_real_server_bind(real_proxy: RealProxy) -> None:
    """CMD-04 against the real proxy, streams and blocking flavours."""
    binding = await s6.open_bind(real_proxy.url())
    _, peer_writer = await asyncio.open_connection(*binding.address)
    reader, writer = await binding.accept(timeout=5)
    peer_writer.write(b"real bind")
    assert await reader.readexactly(9) == b"real bind"
    assert binding.peer_address == peer_writer.get_extra_info("sockname")[:2]
    await close(writer)
    await close(peer_writer)

    def blocking() -> bytes:
        with bclient.Proxy.from_url(real_proxy.url()).bind() as b:
            with socket.create_connection(b.address) as peer, b.accept(timeout=5) as sock:
                peer.sendall(b"blk")
                return sock.recv(3)

    assert await asyncio.to_thread(blocking) == b"blk"


@pytest.mark.conformance("TRN-03")
async def test_real_server_tls(real_proxy: RealProxy, echo_port: int, tls_files: TLSFiles) -> None:
    """TRN-03 against the real proxy's TLS listener: verification on by default."""
    url = real_proxy.url(scheme="socks6+tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        await s6.open_connection(url, LOCALHOST, echo_port)
    reader, writer = await s6.open_connection(
        url, LOCALHOST, echo_port, proxy_ssl=tls_files.client_context(), initial_data=b"over tls", tfo=True
    )
    assert await reader.readexactly(8) == b"over tls"
    await close(writer)

    def blocking() -> bytes:
        proxy = bclient.Proxy.from_url(url, proxy_ssl=tls_files.client_context())
        with proxy.connect(LOCALHOST, echo_port, initial_data=b"blk") as sock:
            return sock.recv(3)

    assert await asyncio.to_thread(blocking) == b"blk"


@pytest.mark.conformance("TRN-01", "TRN-02")
async def test_real_server_tfo(real_proxy: RealProxy, echo_port: int) -> None:
    """TRN-02 with the real TFO listener (TRN-01): tfo=True connects; when the kernel's
    net.ipv4.tcp_fastopen enables server TFO, the second connection's SYN carries data."""
    server_tfo = int(Path("/proc/sys/net/ipv4/tcp_fastopen").read_text()) & 0x2
    syn_data = []
    loop = asyncio.get_running_loop()
    for _ in range(2):
        with await s6.Proxy.from_url(real_proxy.url()).connect(LOCALHOST, echo_port, tfo=True) as sock:
            syn_data.append(syn_data_acked(sock))
            await loop.sock_sendall(sock, b"tfo")
            assert await loop.sock_recv(sock, 3) == b"tfo"
    if server_tfo:
        assert syn_data[-1]


# --- TRN-02 with real SYN payloads, in a private network namespace ----------------------------------------
#
# Server-side TFO needs net.ipv4.tcp_fastopen bit 0x2, which only a private network
# namespace may set without changing the host (`unshare -n`, as tests/helpers_server.py
# does). There the scripted proxy saves each SYN's headers (TCP_SAVE_SYN), which tell
# exactly how many bytes the SYN carried.


async def _tfo_syn_scenario() -> dict[str, Any]:
    echo = await asyncio.start_server(_echo, LOCALHOST, 0)
    echo_port = echo.sockets[0].getsockname()[1]
    proxy = await ScriptedProxy(save_syn=True).start()
    out: dict[str, Any] = {}
    try:
        warm = await s6.Proxy.from_url(proxy.url()).connect(LOCALHOST, echo_port, tfo=True)  # TFO cookie
        warm.close()
        async with s6.Session(proxy.url(), tokens=4) as session:
            await session.proxy.noop(session=session)  # the session and its token window
            for name, idempotent in (("plain", False), ("token", True)):
                reader, writer = await session.open_connection(
                    LOCALHOST, echo_port, initial_data=b"DATA", tfo=True, idempotent=idempotent
                )
                assert await reader.readexactly(4) == b"DATA"
                out[name] = {
                    "syn": proxy.syn_payloads[-1],
                    "request": writer.get_extra_info("socks6_connection").request_size,
                    "acked": syn_data_acked(writer.get_extra_info("socket")),
                }
                await close(writer)
        reader, writer = await s6.open_connection(proxy.url(), LOCALHOST, echo_port, initial_data=b"DATA")
        out["no_tfo"] = {"syn": proxy.syn_payloads[-1]}
        await close(writer)
    finally:
        await proxy.stop()
        echo.close()
    return out


def run_tfo_syn_scenario() -> None:
    """Entry point inside the namespace: print the observations as JSON."""
    print(json.dumps(asyncio.run(_tfo_syn_scenario())))


@pytest.mark.conformance("TRN-02")
def test_tfo_syn_payload_follows_trn02() -> None:
    """TRN-02: in a real TFO SYN the client sends the Request alone when it spends no
    token, the Request and the initial data when it does, and nothing without tfo=True."""
    script = (
        "ip link set lo up && echo 3 > /proc/sys/net/ipv4/tcp_fastopen && "
        f"{shlex.quote(sys.executable)} -c "
        + shlex.quote(
            f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
            "import test_client_e2e; test_client_e2e.run_tfo_syn_scenario()"
        )
    )
    try:
        result = subprocess.run(
            ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        pytest.skip("unshare(1) is not available")
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"no private network namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["plain"]["syn"] == seen["plain"]["request"]  # Request only: no application data
    assert seen["token"]["syn"] == seen["token"]["request"] + len(b"DATA")  # token spent: data too
    assert seen["plain"]["acked"] and seen["token"]["acked"]
    assert seen["no_tfo"]["syn"] == 0
