"""The asyncio SOCKS 6 / SOCKS 5 proxy server: listeners, handshakes, CONNECT, BIND, hand-off.

Strategy (aioquic ``asyncio/protocol.py``): this module does I/O and nothing the draft
decides. Bytes from a client go into a sans-IO `ServerConnection` (or, when the first
byte is 5, a `Socks5ServerConnection`, D1); its events drive authentication
(`socks6fast.proto.auth.UserStore`, scrypt run in a thread), sessions and idempotence tokens
(`socks6fast.proto.sessions`), the ruleset (`socks6fast.proto.policy.Policy`) and the operation; every
reply is produced by ``conn.send()``. After a successful CONNECT or BIND the two sockets
go to the data plane in exactly one place, `_relay`, through
`socks6fast.dataplane.relayer.Relayer` (splice engine or asyncio fallback) with the bytes
the client already sent (initial data, false start: CMD-03, AUTH-06) in front.

Sockets: plain listeners are non-blocking sockets we accept from ourselves
(``loop.add_reader``, a batch of accepts per wake-up), so the client socket stays ours
until the relay takes it; the handshake uses ``loop.sock_recv`` / ``sock_sendall``.
Listeners accept TCP Fast Open (``TCP_FASTOPEN``, TRN-01): a Request that arrived in the
SYN is read by the first ``recv`` without another round trip. TLS listeners (TRN-03) wrap
the accepted socket with ``loop.connect_accepted_socket(ssl=...)`` and relay with
``relay_transports``.

CONNECT dials with the Stack options applied before ``connect`` (``socks6fast.net.stackopts``)
and echoes what the kernel really uses (D9). Happy Eyeballs (RFC 8305, only for domain
names and only when asked, STK-04) is done here: resolved addresses are interleaved by
family and attempts start 250 ms apart or as soon as the previous one failed, the first
connected socket wins and the others are closed. Without the option a name's addresses
are tried one after the other. TFO on the remote leg (``TCP_FASTOPEN_CONNECT``) only with
a TFO option and only with data to carry (CMD-02, STK-06).

Limits: ``max_connections`` (accepting pauses at the cap), the handshake timeout (REQ-08,
through the connection's timer), the connect timeout (0x09), the relay idle timeout, the
options cap (D6), failed password checks per client address (`FailedAuthLimiter`: past
the allowance an attempt fails without running scrypt). Every finished connection logs
one line: client, user, command, destination, reply code, bytes each way, duration and
relay path, and for a failure its cause (`describe_error`).

Where a connection may go (CMD-06): the rules are checked against the address the proxy
really connects to (`socks6fast.proto.policy`: 0.0.0.0 is this host, names are checked with each
resolved address, a BIND peer when it connects), and a CONNECT that would reach one of the
proxy's own listeners is refused whatever the rules say (`socks6fast.proto.policy.OwnListeners`).
The host's addresses behind both come from the kernel (`socks6fast.net.localaddr`), read at
start-up and on reload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from ..config import Config
from ..constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    ReplyCode,
    Socks5Command,
    UserPassStatus,
)
from ..dataplane.engine import ENGINE_AVAILABLE, NO_EXTENSIONS, PATH_SPLICE, RelayEnd, RelayResult
from ..dataplane.relayer import Relayer
from ..errors import LocalProtocolError, RemoteProtocolError
from ..net.localaddr import read_local_addresses
from ..net.stackopts import (
    apply_leg_options,
    enable_tfo_connect,
    enable_tfo_listener,
    mptcp_in_use,
    new_stream_socket,
    read_leg_options,
    tfo_syn_data_acked,
)
from ..proto import codec
from ..proto.auth import UserStore
from ..proto.messages import (
    AuthData,
    AuthMethodSelection,
    AuthReply,
    IdempotenceAccepted,
    IdempotenceRejected,
    IdempotenceWindow,
    OperationReply,
    Option,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    VersionMismatchReply,
)
from ..proto.policy import OwnListeners, Policy
from ..proto.server import (
    NEED_DATA,
    ConnectionClosed,
    InitialData,
    Protocol,
    RequestOptions,
    RequestReceived,
    ServerConnection,
    Socks5ServerConnection,
    State,
    VersionMismatch,
    detect_protocol,
    failure_reply,
    is_dns_request,
    noop_address_ok,
)
from ..proto.sessions import MemorySessionStore, Session
from ..proto.socks5 import (
    Socks5Greeting,
    Socks5MethodSelection,
    Socks5Reply,
    Socks5Request,
    UserPassReply,
    UserPassRequest,
    encode_userpass_reply,
)
from ..proto.stack import AppliedLeg, StackPlan, echo_stack_options

__all__ = ["ConnectionRecord", "FailedAuthLimiter", "Resolver", "Server", "describe_error", "serve"]

log = logging.getLogger("socks6fast.server")

#: RFC 8305 section 5: "a recommended value" of 250 ms between connection attempts.
HAPPY_EYEBALLS_DELAY = 0.25
#: Bytes read per recv during the handshake (a Request is at most ~16.6 KB, D6).
RECV_SIZE = 65536
#: Client connections accepted per listener wake-up before yielding to the loop.
ACCEPT_BATCH = 64
#: Pause before accepting again after EMFILE/ENFILE.
ACCEPT_RETRY_DELAY = 0.1
#: Listen backlog of the client listeners.
LISTEN_BACKLOG = 1024
#: Largest backlog granted to a BIND with a Listen Backlog option (CMD-05).
MAX_BIND_BACKLOG = 128
#: After a reply that ends the connection, read and drop what the client still sends
#: for at most this long before closing, so that close() does not turn into a reset
#: that destroys the reply in flight.
LINGER_TIMEOUT = 1.0
#: ... and at most this many bytes.
LINGER_BYTES = 65536
#: Finished-connection records kept for inspection (`Server.records`).
MAX_RECORDS = 1024

Resolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]
"""A name resolver for CONNECT destinations: (host, port) -> [(family, sockaddr), ...]."""

# connect() errno -> Operation Reply code (CMD-01).
_ERRNO_REPLY = {
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ReplyCode.CONNECTION_TIMED_OUT,
    errno.EACCES: ReplyCode.NOT_ALLOWED_BY_RULESET,  # a local firewall or route prohibits it
    errno.EPERM: ReplyCode.NOT_ALLOWED_BY_RULESET,
}


def reply_code_for(exc: BaseException) -> ReplyCode:
    """The Operation Reply code for a failed connection attempt (CMD-01)."""
    if isinstance(exc, TimeoutError):
        return ReplyCode.CONNECTION_TIMED_OUT
    if isinstance(exc, socket.gaierror):
        return ReplyCode.HOST_UNREACHABLE  # the name does not resolve
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_REPLY.get(exc.errno, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE


def describe_error(exc: BaseException) -> str:
    """Why an operation failed, in words, for the access log; never empty.

    asyncio's timeouts are a bare ``TimeoutError()`` whose text is empty, so the cause must
    come from the type; an errno is named too (``Connection refused (ECONNREFUSED)``).
    """
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc) or "name resolution failed"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _socks5_code(code: ReplyCode) -> ReplyCode:
    # RFC 1928 section 6 stops at 0x08: a timeout is reported as host unreachable.
    return ReplyCode.HOST_UNREACHABLE if code == ReplyCode.CONNECTION_TIMED_OUT else code


def _address_type_of(host: str) -> AddressType:
    return AddressType.IPV6 if ":" in host else AddressType.IPV4


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


@dataclass(slots=True)
class ConnectionRecord:
    """What the server knows about one client connection; logged once when it ends.

    Also what tests inspect (`Server.records`, `Server.on_connection_closed`): the remote
    leg's options as read back from the kernel, whether TFO or MPTCP were used.
    """

    client: tuple[str, int]
    """Client address and port."""
    listener: str
    """``"tcp"`` or ``"tls"``."""
    started: float
    """``time.monotonic()`` at accept."""
    protocol: str = "-"
    """``"socks6"``, ``"socks5"`` or ``"mismatch"``."""
    user: str | None = None
    """Authenticated user (or the session's user)."""
    command: str = "-"
    """Command name."""
    destination: str = "-"
    """Destination as requested."""
    reply_code: int | None = None
    """The last Operation Reply (or SOCKS 5 reply) code sent."""
    bytes_up: int = 0
    """Bytes relayed client -> remote."""
    bytes_down: int = 0
    """Bytes relayed remote -> client."""
    relay_path: str = "-"
    """``"splice"`` or ``"asyncio"`` once relayed."""
    relay_end: str = "-"
    """How the relay ended (``RelayEnd`` name, lower case)."""
    relay_close: str = "-"
    """How the proxy closed the relayed legs: ``"fin"`` (clean EOF both ways) or ``"rst"``
    (a cut, such as the idle timeout or the drain deadline, or a failure passed on)."""
    duration: float = 0.0
    """Seconds from accept to close."""
    remote_address: tuple[str, int] | None = None
    """The remote host the proxy connected to (CONNECT) or that connected (BIND)."""
    remote_options: AppliedLeg | None = None
    """The proxy-remote leg's IP options as read back with getsockopt (STK-03, STK-05)."""
    client_options: AppliedLeg | None = None
    """The client-proxy leg's IP options as read back with getsockopt."""
    happy_eyeballs: bool = False
    """Happy Eyeballs attempted (STK-04)."""
    tfo_attempted: bool = False
    """TCP_FASTOPEN_CONNECT was set on the remote socket (CMD-02, STK-06)."""
    tfo_syn_acked: bool = False
    """The remote host acknowledged data in our SYN."""
    mptcp: bool = False
    """The remote leg runs MPTCP (STK-07)."""
    error: str = ""
    """Why the connection ended early, if it did."""

    def log_line(self) -> str:
        """The one log line of a finished connection."""
        code = "-" if self.reply_code is None else f"{self.reply_code:#04x}"
        text = (
            f"client={_format(*self.client)} proto={self.protocol} user={self.user or '-'} "
            f"cmd={self.command} dst={self.destination} reply={code} up={self.bytes_up} "
            f"down={self.bytes_down} dur={self.duration:.3f}s relay={self.relay_path} end={self.relay_end} "
            f"close={self.relay_close}"
        )
        return f"{text} error={self.error!r}" if self.error else text


class FailedAuthLimiter:
    """Failed password checks per client address: a token bucket each, so that a client
    guessing passwords cannot make the proxy burn ~50 ms of scrypt per guess.

    Every check takes a token before scrypt runs (so parallel guesses cannot overdraw) and
    a successful one gives it back: only failures count. A bucket holds at most ``burst``
    tokens and regains one every ``interval`` seconds; with no token left the check fails
    at once. IPv6 clients share a bucket per /64, the block one host usually controls.

    Args:
        burst: failures in a row allowed per address; 0 disables the limiter.
        interval: seconds per token regained.
        max_clients: buckets kept at most; full buckets are forgotten first, then the
            oldest (memory stays bounded whatever the number of client addresses).
    """

    __slots__ = ("_buckets", "burst", "interval", "max_clients")

    def __init__(self, burst: int, interval: float, max_clients: int = 65536) -> None:
        self.burst = burst
        self.interval = interval
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, time of last update]

    def configure(self, burst: int, interval: float) -> None:
        """Change the limits (configuration reload); the buckets are kept."""
        self.burst, self.interval = burst, interval

    @staticmethod
    def _key(client_ip: str) -> str:
        if ":" not in client_ip:
            return client_ip
        try:
            address = ipaddress.IPv6Address(client_ip.split("%", 1)[0])
        except ValueError:
            return client_ip
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))

    def acquire(self, client_ip: str, now: float) -> bool:
        """Take a token for one password check; False when none is left (fail at once)."""
        if self.burst <= 0:
            return True
        key = self._key(client_ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            bucket = self._buckets[key] = [float(self.burst), now]
        else:
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) / self.interval)
            bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def refund(self, client_ip: str) -> None:
        """Give back the token of a check that succeeded."""
        if self.burst <= 0:
            return
        key = self._key(client_ip)
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket[0] += 1.0
            if bucket[0] >= self.burst:
                del self._buckets[key]  # full again: nothing to remember

    def _prune(self, now: float) -> None:
        burst, interval = float(self.burst), self.interval
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) / interval >= burst:
                del self._buckets[key]
        while len(self._buckets) >= self.max_clients:
            del self._buckets[next(iter(self._buckets))]  # the oldest entry

    def __len__(self) -> int:
        return len(self._buckets)


#: Our half's states in which no reply has gone out yet (D14: only General Failure may go).
_NOTHING_SENT = frozenset({State.IDLE, State.SEND_AUTH_REPLY})


class _Closed(Exception):
    """The handshake ended (reply sent or peer gone); the connection is to be closed."""


# --- Client streams -------------------------------------------------------------------


class _ClientStream:
    """The client leg during the handshake: plain socket or TLS transport."""

    sock: socket.socket | None
    _pending = b""  # replaced per instance by queue()

    async def recv(self) -> bytes:
        raise NotImplementedError

    def recv_now(self) -> bytes | None:
        """What `recv` would return without waiting, or None when it would have to wait."""
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        """Write ``data`` (after anything queued) and wait until it is handed to the kernel."""
        raise NotImplementedError

    def queue(self, data: bytes) -> None:
        """Hold ``data`` back; it leaves in front of the next `send`, in the same write."""
        self._pending += data

    def _take(self, data: bytes) -> bytes:
        if self._pending:
            data, self._pending = self._pending + data, b""
        return data

    def close(self) -> None:
        raise NotImplementedError

    async def linger_close(self) -> None:
        """Close after a final reply without resetting the connection."""
        self.close()

    async def relay(
        self, relayer: Relayer, remote: socket.socket, to_remote: bytes, client_eof: bool
    ) -> RelayResult:
        raise NotImplementedError


class _SocketStream(_ClientStream):
    __slots__ = ("_loop", "_owned", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self.sock = sock
        self._owned = True

    async def recv(self) -> bytes:
        assert self.sock is not None
        return await self._loop.sock_recv(self.sock, RECV_SIZE)

    def recv_now(self) -> bytes | None:
        # The bytes are usually there already (a client writes its request right after
        # connecting): one recv() instead of a reader registered and removed again.
        assert self.sock is not None
        try:
            return self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    async def send(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        data = self._take(data)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            await self._loop.sock_sendall(sock, data[sent:])

    def close(self) -> None:
        if self._owned and self.sock is not None:
            self._owned = False
            self.sock.close()

    async def linger_close(self) -> None:
        # Closing a socket with unread bytes makes the kernel send a reset, which can
        # destroy the reply we just wrote before the client reads it. Half-close, drop
        # what still arrives (bounded in time and size), then close.
        sock = self.sock
        if not self._owned or sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = self._loop.time() + LINGER_TIMEOUT
            left = LINGER_BYTES
            async with asyncio.timeout_at(deadline):
                while left > 0:
                    data = await self._loop.sock_recv(sock, min(left, RECV_SIZE))
                    if not data:
                        break
                    left -= len(data)
        except (OSError, TimeoutError):
            pass
        finally:
            self.close()

    async def relay(
        self, relayer: Relayer, remote: socket.socket, to_remote: bytes, client_eof: bool
    ) -> RelayResult:
        assert self.sock is not None
        self._owned = False  # the relayer owns and closes both sockets from here on
        # An EOF already read stays visible to the relay: recv() keeps returning 0.
        return await relayer.relay_sockets(self.sock, remote, to_remote=to_remote)


class _TLSProtocol(asyncio.Protocol):
    """Buffers a TLS client leg's bytes for the handshake; paused when the buffer fills."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= RECV_SIZE and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def drain(self) -> None:
        while self._write_paused and not self.lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter


class _TLSStream(_ClientStream):
    __slots__ = ("_loop", "_proto", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, proto: _TLSProtocol) -> None:
        self._loop = loop
        self._proto = proto
        assert proto.transport is not None
        extra = proto.transport.get_extra_info("socket")
        self.sock = extra if isinstance(extra, socket.socket) else None

    @property
    def _transport(self) -> asyncio.Transport:
        assert self._proto.transport is not None
        return self._proto.transport

    async def recv(self) -> bytes:
        proto = self._proto
        while not proto.buffer and not proto.eof:
            proto.waiter = self._loop.create_future()
            self._transport.resume_reading()
            await proto.waiter
        data = bytes(proto.buffer)
        proto.buffer.clear()
        return data

    def recv_now(self) -> bytes | None:
        proto = self._proto
        if not proto.buffer and not proto.eof:
            return None
        data = bytes(proto.buffer)
        proto.buffer.clear()
        if self._proto.transport is not None and not proto.lost:
            self._proto.transport.resume_reading()
        return data

    async def send(self, data: bytes) -> None:
        if self._proto.lost:
            raise ConnectionResetError("TLS client connection lost")
        self._transport.write(self._take(data))
        await self._proto.drain()

    def close(self) -> None:
        if self._proto.transport is not None and not self._proto.transport.is_closing():
            self._proto.transport.close()

    async def relay(
        self, relayer: Relayer, remote: socket.socket, to_remote: bytes, client_eof: bool
    ) -> RelayResult:
        transport = self._transport
        transport.pause_reading()
        to_remote += bytes(self._proto.buffer)  # read by our protocol, not yet consumed
        self._proto.buffer.clear()
        if client_eof or self._proto.eof:
            # Our protocol already consumed the client's EOF, which the relay's protocol will
            # never see: deliver the early bytes and the EOF to the remote host ourselves.
            try:
                if to_remote:
                    await self._loop.sock_sendall(remote, to_remote)
                    to_remote = b""
                remote.shutdown(socket.SHUT_WR)
            except BaseException:
                remote.close()
                transport.abort()
                raise
        # The remote socket goes to the relayer as it is: the relay's own protocol wraps it
        # and keeps whatever the remote host sent first (a banner). A placeholder protocol
        # would not do: uvloop starts reading right after connection_made().
        return await relayer.relay_transports(transport, remote, to_remote=to_remote)


# --- BIND listeners kept by sessions (CMD-05) ----------------------------------------


class _BacklogListener:
    """A BIND listening socket with a backlog, kept while its first connection is open.

    Accepted connections wait in a queue of at most ``backlog`` entries until a further
    BIND request of the same session claims one (draft-11 "Listen Backlog options").
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, backlog: int, tfo: bool, mptcp: bool
    ) -> None:
        self.sock = sock
        self.backlog = backlog
        self.tfo = tfo
        """The listener accepts TFO (the BIND that opened it carried a TFO option)."""
        self.mptcp = mptcp
        """The listener is an MPTCP socket (accepts MPTCP connections)."""
        self.queue: asyncio.Queue[tuple[socket.socket, tuple[str, int]]] = asyncio.Queue(backlog)
        self._loop = loop
        self._task = loop.create_task(self._accept_loop())
        self.closed = False
        self.ended: asyncio.Future[None] = loop.create_future()
        """Done once the listener is closed (its session ended, or its first connection did)."""

    async def _accept_loop(self) -> None:
        while True:
            conn, addr = await self._loop.sock_accept(self.sock)
            await self.queue.put((conn, (str(addr[0]), int(addr[1]))))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.ended.done():
            self.ended.set_result(None)
        self._task.cancel()
        self.sock.close()
        while not self.queue.empty():
            conn, _ = self.queue.get_nowait()
            conn.close()


def _close_session_listeners(session: Session) -> None:
    for listener in session.listeners.values():
        if isinstance(listener, _BacklogListener):
            listener.close()
    session.listeners.clear()


# --- Results of the phases -------------------------------------------------------------


@dataclass(slots=True)
class _Authenticated:
    user: str | None
    session: Session | None = None
    new_session: bool = False
    initial: bytes = b""
    """Initial data already read during the slow username/password exchange."""


@dataclass(slots=True)
class _Remote:
    sock: socket.socket
    address: tuple[str, int]
    """The address connected to (no getpeername needed)."""
    applied: AppliedLeg | None
    mptcp: bool
    happy_eyeballs: bool
    tfo_attempted: bool
    syn_sent: int
    """Bytes of the payload accepted by the socket during connect (TFO)."""


class _ConnectFailed(Exception):
    def __init__(self, code: ReplyCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- The server -------------------------------------------------------------------------


class Server:
    """A SOCKS 6 (and SOCKS 5) proxy bound to the configured listeners.

    Args:
        config: the validated configuration (`socks6fast.config`).
        relayer: the data plane; by default one is created on `start` with the config's
            idle timeout and worker count.
        use_relay_engine: passed to `Relayer` when the server creates it (None: the splice
            engine when available).
        resolver: resolves a destination domain name: ``await resolver(host, port)`` returns
            ``(family, sockaddr)`` pairs in preference order, or raises `socket.gaierror`.
            None (default): ``loop.getaddrinfo``. Tests pass a local fake here.

    Use::

        server = Server(config)
        await server.start()
        print(server.addresses)
        ...
        await server.close()
    """

    def __init__(
        self,
        config: Config,
        *,
        relayer: Relayer | None = None,
        use_relay_engine: bool | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._users: UserStore = config.user_store()
        # CMD-06: "@local" and the loop check need this host's addresses (read again on reload).
        self._local, self._local_problem = read_local_addresses()
        self._policy: Policy = config.policy(self._local)
        self._own = OwnListeners((), self._local)
        self._sessions: MemorySessionStore | None = config.session_store()
        self._tls: ssl.SSLContext | None = self._tls_context(config)
        self._auth_limiter = FailedAuthLimiter(
            config.server.auth_failure_burst, config.server.auth_failure_interval
        )
        self._relayer = relayer
        self._own_relayer = relayer is None
        self._use_engine = use_relay_engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._accepting = False
        self._paused_for_limit = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.records: collections.deque[ConnectionRecord] = collections.deque(maxlen=MAX_RECORDS)
        """The most recent finished connections."""
        self.on_connection_closed: list[Callable[[ConnectionRecord], None]] = []
        """Callbacks run with the record of every finished connection."""

    # -- life cycle ------------------------------------------------------------------

    @staticmethod
    def _tls_context(config: Config) -> ssl.SSLContext | None:
        server = config.server
        if server.tls_certificate is None or server.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(server.tls_certificate, server.tls_key)
        return context

    @property
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() costs a getpid() syscall on every call in Python 3.11
        # (its fork check); the server runs on the loop start() saw.
        loop = self._loop
        assert loop is not None, "start() the server first"
        return loop

    @property
    def config(self) -> Config:
        """The configuration in effect."""
        return self._config

    @property
    def relayer(self) -> Relayer:
        """The data plane (after `start`)."""
        assert self._relayer is not None, "start() the server first"
        return self._relayer

    @property
    def active_connections(self) -> int:
        """Client connections being handled or relayed."""
        return len(self._tasks)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of the plain listeners."""
        return [_sockname(sock) for sock, tls in self._listeners if not tls]

    @property
    def tls_addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of the TLS listeners."""
        return [_sockname(sock) for sock, tls in self._listeners if tls]

    async def start(self) -> None:
        """Bind every listener and start accepting.

        Raises:
            OSError: a listener could not be bound (everything bound so far is closed).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._relayer is None:
            server = self._config.server
            self._relayer = Relayer(
                loop,
                use_engine=self._use_engine,
                workers=server.relay_workers,
                idle_timeout=server.idle_timeout,
            )
        try:
            for host, port in self._config.server.listen:
                for sock in await self._bind_listeners(host, port):
                    self._listeners.append((sock, False))
            for host, port in self._config.server.tls_listen:
                for sock in await self._bind_listeners(host, port):
                    self._listeners.append((sock, True))
        except BaseException:
            for sock, _ in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        self._own = OwnListeners(self.addresses + self.tls_addresses, self._local)
        self._accepting = True
        self._resume_accepting()
        self._housekeeping = loop.create_task(self._expire_sessions())
        for host, port in self.addresses:
            log.info("listening on %s (SOCKS 6 and SOCKS 5)", _format(host, port))
        for host, port in self.tls_addresses:
            log.info("listening on %s (SOCKS over TLS)", _format(host, port))
        self._warn_about_exposure(self._config)
        log.info("relay path: %s", self._describe_relay())
        udp = self._config.udp
        if udp.port is not None or udp.dtls_port is not None:
            # The [udp] table is parsed and validated already so that configs written for
            # the UDP issue keep working; say plainly that nothing listens on it yet.
            log.warning(
                "[udp] is configured, but UDP ASSOCIATE is not implemented yet: no UDP socket is "
                "opened and UDP ASSOCIATE requests get Command Not Supported (0x07)"
            )

    def _warn_about_exposure(self, config: Config) -> None:
        """Start-up and reload warnings: an open proxy, a host whose addresses are unknown."""
        if self._local_problem is not None:
            log.warning('%s: "@local" and the loop check know only loopback', self._local_problem)
        hosts = [host for host, _ in self.addresses + self.tls_addresses]
        warning = config.open_proxy_warning(hosts)
        if warning is not None:
            log.warning("%s", warning)

    def _describe_relay(self) -> str:
        """One phrase for the startup log: which data plane relays connections and why."""
        assert self._relayer is not None
        if self._relayer.path == PATH_SPLICE:
            tls = " (TLS client legs: asyncio, the kernel cannot splice them)" if self.tls_addresses else ""
            return f"splice engine, {self._relayer.workers} worker thread(s){tls}"
        if ENGINE_AVAILABLE:
            return "asyncio (the splice engine is turned off)"
        if NO_EXTENSIONS:
            return "asyncio (SOCKS6FAST_NO_EXTENSIONS is set)"
        return "asyncio (the splice engine needs Linux and the compiled extension)"

    async def _bind_listeners(self, host: str, port: int) -> list[socket.socket]:
        try:
            return await self._bind_listeners_at(host, port)
        except OSError as exc:
            # Name the address: with several --listen entries "Address already in use"
            # alone does not say which one failed.
            raise OSError(exc.errno, f"{_format(host, port)}: {exc.strerror or exc}") from exc

    async def _bind_listeners_at(self, host: str, port: int) -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        socks: list[socket.socket] = []
        seen: set[tuple[Any, ...]] = set()
        try:
            for family, type_, proto, _, sockaddr in infos:
                if sockaddr in seen:
                    continue
                seen.add(sockaddr)
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # "::" and "0.0.0.0" can then be listened on side by side.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                # Accepted sockets inherit it: no setsockopt per connection.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                enable_tfo_listener(sock)  # TRN-01
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
                if port == 0:
                    break  # one port-0 listener per entry: each family would get another port
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _resume_accepting(self) -> None:
        if self._loop is None or not self._accepting:
            return
        for sock, tls in self._listeners:
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock, tls)

    def _pause_accepting(self) -> None:
        if self._loop is None:
            return
        for sock, _ in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _on_acceptable(self, lsock: socket.socket, tls: bool) -> None:
        loop = self._loop
        assert loop is not None
        limit = self._config.server.max_connections
        for _ in range(ACCEPT_BATCH):
            if len(self._tasks) >= limit:
                # At the cap: stop accepting; the kernel backlog holds newcomers (max_connections).
                self._paused_for_limit = True
                self._pause_accepting()
                return
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); pausing accepts for %.1fs", exc, ACCEPT_RETRY_DELAY)
                    self._pause_accepting()
                    loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                    return
                log.debug("accept failed: %s", exc)  # ECONNABORTED and the like
                continue
            sock.setblocking(False)  # TCP_NODELAY comes from the listener (inherited)
            task = loop.create_task(self._handle(sock, (str(addr[0]), int(addr[1])), tls))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._paused_for_limit and len(self._tasks) < self._config.server.max_connections:
            self._paused_for_limit = False
            self._resume_accepting()

    async def _expire_sessions(self) -> None:
        # draft-11 "Tearing down the session": sessions die after inactivity; their BIND
        # listeners (CMD-05) are closed with them.
        loop = asyncio.get_running_loop()
        while True:
            store = self._sessions
            deadline = store.next_deadline() if store is not None else None
            delay = 5.0 if deadline is None else min(5.0, max(0.05, deadline - loop.time()))
            await asyncio.sleep(delay)
            if store is not None:
                for session in store.expire(loop.time()):
                    _close_session_listeners(session)

    def reload(self, config: Config) -> None:
        """Apply a new configuration (SIGHUP): users, rules, limits and sessions settings.

        Established connections are kept. Listener addresses and the relay's idle timeout
        need a restart (a warning says so when they differ).
        """
        users = config.user_store()
        tls = self._tls_context(config) if self._tls is not None or config.server.tls_listen else None
        old = self._config
        if config.server.listen != old.server.listen or config.server.tls_listen != old.server.tls_listen:
            log.warning("reload: listener changes take effect after a restart")
        if config.server.idle_timeout != old.server.idle_timeout:
            log.warning("reload: the relay idle timeout takes effect after a restart")
        self._users = users
        self._local, self._local_problem = read_local_addresses()  # interfaces may have changed
        self._policy = config.policy(self._local)
        self._own = OwnListeners(self.addresses + self.tls_addresses, self._local)
        self._auth_limiter.configure(config.server.auth_failure_burst, config.server.auth_failure_interval)
        if tls is not None:
            self._tls = tls
        sessions = config.sessions
        if not sessions.enabled:
            if self._sessions is not None:
                for session in self._sessions.expire(float("inf")):
                    _close_session_listeners(session)
            self._sessions = None
        elif self._sessions is None:
            self._sessions = config.session_store()
        else:
            self._sessions.limits = sessions.limits()  # the live sessions stay
        self._config = config
        if self._paused_for_limit and len(self._tasks) < config.server.max_connections:
            self._paused_for_limit = False
            self._resume_accepting()
        log.info("configuration reloaded: %d users, %d rules", len(users), len(config.rules))
        self._warn_about_exposure(config)

    def stop_accepting(self) -> None:
        """Close the listeners; connections in progress continue."""
        self._accepting = False
        self._pause_accepting()
        for sock, _ in self._listeners:
            sock.close()

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, wait up to ``drain_timeout`` for connections to finish, then end
        the rest and the data plane."""
        if self._closed.is_set():
            return
        self.stop_accepting()
        if self._tasks and drain_timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        if self._relayer is not None and self._own_relayer:
            # Ends every relay with RelayEnd.SHUTDOWN and its exact byte counts; give the
            # connection tasks a moment to take those results and log their lines before
            # the rest (handshakes still in progress) is cancelled.
            await self._relayer.close()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=0.5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._sessions is not None:
            for session in self._sessions.expire(float("inf")):
                _close_session_listeners(session)
        self._listeners.clear()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Return once `close` finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(drain_timeout=0)

    # -- one client connection ---------------------------------------------------------

    async def _handle(self, sock: socket.socket, addr: tuple[str, int], tls: bool) -> None:
        loop = self._running_loop
        record = ConnectionRecord(client=addr, listener="tls" if tls else "tcp", started=time.monotonic())
        stream: _ClientStream | None = None
        try:
            if tls:
                stream = await self._tls_handshake(sock)
                if stream is None:
                    record.error = "TLS handshake failed"
                    return
            else:
                stream = _SocketStream(loop, sock)
            await self._serve(stream, record)
        except _Closed:
            pass
        except RemoteProtocolError as exc:
            record.error = str(exc)
        except (OSError, TimeoutError, EOFError) as exc:
            record.error = f"{type(exc).__name__}: {describe_error(exc)}"
        except asyncio.CancelledError:
            record.error = "server shutting down"
            raise
        except Exception as exc:  # a bug: keep serving; one line, the traceback only at DEBUG
            record.error = f"internal error: {exc!r}"
            log.warning("internal error while serving %s: %r", _format(*addr), exc)
            log.debug("traceback of the internal error", exc_info=True)
        finally:
            if stream is not None:
                stream.close()
            else:
                sock.close()
            record.duration = time.monotonic() - record.started
            self.records.append(record)
            if log.isEnabledFor(logging.INFO):
                log.info("%s", record.log_line())
            for callback in self.on_connection_closed:
                callback(record)

    async def _tls_handshake(self, sock: socket.socket) -> _ClientStream | None:
        loop = asyncio.get_running_loop()
        assert self._tls is not None
        proto = _TLSProtocol()
        timeout = self._config.server.handshake_timeout
        try:
            await loop.connect_accepted_socket(
                lambda: proto, sock, ssl=self._tls, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
            return None
        return _TLSStream(loop, proto)

    async def _serve(self, stream: _ClientStream, record: ConnectionRecord) -> None:
        loop = self._running_loop
        timeout = self._config.server.handshake_timeout
        started = loop.time()  # one handshake deadline from here on, whatever the protocol
        first = stream.recv_now()
        if first is None:
            try:
                async with asyncio.timeout(timeout):
                    first = await stream.recv()
            except TimeoutError:
                record.error = "handshake timed out"
                return
        if not first:
            return
        if detect_protocol(first[0]) is Protocol.SOCKS5:
            record.protocol = "socks5"
            conn5 = Socks5ServerConnection(handshake_timeout=timeout, now=started)
            conn5.receive_data(first)
            await self._serve_socks5(stream, conn5, record)
            return
        record.protocol = "socks6"
        conn = ServerConnection(
            max_options_length=self._config.server.max_options_length,
            handshake_timeout=timeout,
            now=started,
        )
        conn.receive_data(first)
        try:
            await self._serve_socks6(stream, conn, record)
        except RemoteProtocolError as exc:
            record.error = str(exc)
            if exc.reply_code is not None:
                # D14: the header was readable, answer, then close. Before the Authentication
                # Reply only General Failure works: a client reads the first 4 bytes of the
                # reply as an Authentication Reply, and 06 01 00 00 is Type 1 (failure).
                code = exc.reply_code if conn.our_state not in _NOTHING_SENT else ReplyCode.GENERAL_FAILURE
                with contextlib.suppress(LocalProtocolError, OSError):
                    await stream.send(conn.send(failure_reply(code)))
                    record.reply_code = code
            await stream.linger_close()
        except (_Closed, OSError, TimeoutError, EOFError):
            raise
        except Exception:
            # A bug: answer General Failure if nothing conclusive was sent, close, let _handle log.
            with contextlib.suppress(Exception):
                if conn.our_state in _NOTHING_SENT:
                    data = codec.encode_operation_reply(failure_reply(ReplyCode.GENERAL_FAILURE))  # D14 form
                else:
                    data = conn.send(failure_reply(ReplyCode.GENERAL_FAILURE))
                await stream.send(data)
                record.reply_code = ReplyCode.GENERAL_FAILURE
            raise

    async def _next_event(
        self, conn: ServerConnection | Socks5ServerConnection, stream: _ClientStream
    ) -> Any:
        loop = self._running_loop
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                return event
            data = stream.recv_now()
            if data is None and len(self._tasks) > 1:
                # The client is answering a reply we just sent (SOCKS 5 method selection, D7
                # slow authentication). With other connections in progress, give the loop
                # one turn (it has work) and look again before paying for a reader
                # registered and removed (several epoll_ctl calls on uvloop). Alone, the
                # turn would only add an empty poll.
                await asyncio.sleep(0)
                data = stream.recv_now()
            if data is not None:
                conn.receive_data(data)
                continue
            deadline = conn.get_timer()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await stream.recv()
            except TimeoutError:
                conn.handle_timer(max(loop.time(), deadline or 0.0))  # raises (REQ-08)
                raise
            conn.receive_data(data)

    # -- SOCKS 6 ---------------------------------------------------------------------

    async def _serve_socks6(
        self, stream: _ClientStream, conn: ServerConnection, record: ConnectionRecord
    ) -> None:
        event = await self._next_event(conn, stream)
        if isinstance(event, VersionMismatch):
            # REQ-01, D1: exactly one byte, 6, then close.
            record.protocol = "mismatch"
            await stream.send(conn.send(VersionMismatchReply()))
            await stream.linger_close()
            return
        if isinstance(event, ConnectionClosed):
            return
        assert isinstance(event, RequestReceived)
        request, options = event.request, event.options
        command = request.command
        record.command = command.name if isinstance(command, Command) else f"unknown ({command})"
        record.destination = _format(request.address, request.port)
        client_applied: AppliedLeg | None = None
        if not options.stack.client.empty and stream.sock is not None:
            client_applied = apply_leg_options(stream.sock, options.stack.client)
            record.client_options = client_applied
        auth = await self._authenticate(stream, conn, options, record)
        if auth is None:
            await stream.linger_close()
            return
        record.user = auth.user
        initial = auth.initial
        if conn.their_state is State.SEND_INITIAL_DATA:
            # AUTH-06: read after the Request; forwarded only once connected.
            event = await self._next_event(conn, stream)
            if isinstance(event, InitialData):
                initial = event.data
        try:
            await self._operate(stream, conn, request, options, auth, initial, client_applied, record)
        finally:
            if auth.new_session and auth.session is not None and record.reply_code != ReplyCode.SUCCESS:
                # The request that would have started the session failed: no session (D4).
                ended = self._sessions.teardown(auth.session.session_id) if self._sessions else None
                if ended is not None:
                    _close_session_listeners(ended)

    async def _verify(self, credentials: UserPassRequest | None, record: ConnectionRecord) -> str | None:
        if credentials is None:
            return None
        loop = self._running_loop
        users = self._users
        limiter = self._auth_limiter
        client_ip = record.client[0]
        if not limiter.acquire(client_ip, loop.time()):
            # Too many failures from this address: fail without paying for scrypt.
            record.error = "too many failed authentications from this address"
            return None
        # Credentials verified before: a keyed-hash lookup, answered on the loop.
        user = users.authenticate_cached(credentials.username, credentials.password)
        if user is None:
            # scrypt costs ~50 ms of CPU: keep it off the event loop.
            user = await loop.run_in_executor(
                None, users.authenticate, credentials.username, credentials.password
            )
        if user is not None:
            limiter.refund(client_ip)  # only failures count
        return user

    async def _authenticate(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        options: RequestOptions,
        record: ConnectionRecord,
    ) -> _Authenticated | None:
        """Send the Authentication Reply (or replies); None when the connection must close."""
        loop = self._running_loop
        now = loop.time()
        store = self._sessions
        reply_options: list[Option] = []
        session: Session | None = None
        in_session_context = store is not None
        if store is not None and options.session_id is not None:
            if options.session_teardown:
                # SES-05: end the session; this request is treated as outside any session.
                ended = store.teardown(options.session_id)
                if ended is not None:
                    _close_session_listeners(ended)
                in_session_context = False
            else:
                session = store.lookup(options.session_id, now)
                if session is None:
                    # SES-03: Type 1 + Session Invalid; no negotiation can follow.
                    await stream.send(conn.send(AuthReply(AuthReplyType.FAILURE, (SessionInvalid(),))))
                    record.error = "invalid session"
                    return None
        if session is not None:
            assert store is not None
            # SES-02: inside a session no authentication is required; attempts are ignored.
            reply_options.append(SessionOK())
            if options.token_request is not None:
                store.request_window(session, options.token_request)  # IDM-02: at most one
            if options.token is not None:
                # IDM-03: spent before the request is honoured; an ineligible token fails it.
                if not store.spend(session, options.token):
                    rejected = AuthReply(AuthReplyType.FAILURE, (IdempotenceRejected(),))
                    await stream.send(conn.send(rejected))
                    record.error = "idempotence token rejected"
                    return None
                reply_options.append(IdempotenceAccepted())
            if session.window is not None:
                reply_options.append(IdempotenceWindow(*session.window.current))
            await self._send_auth_success(stream, conn, options, tuple(reply_options))
            return _Authenticated(user=session.user, session=session)

        user: str | None = None
        initial = b""
        if self._users.required:
            if options.credentials is not None or options.malformed_credentials:
                # AUTH-01 / AUTH-05: 0-RTT username/password in an Authentication Data option;
                # the RFC 1929 reply goes into an Authentication Data option of the reply.
                user = await self._verify(options.credentials, record)
                status = UserPassStatus.SUCCESS if user is not None else UserPassStatus.FAILURE
                reply_options.append(
                    AuthData(AuthMethod.USERNAME_PASSWORD, encode_userpass_reply(UserPassReply(status)))
                )
                if user is None:
                    reply_options.append(AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS))
                    await stream.send(conn.send(AuthReply(AuthReplyType.FAILURE, tuple(reply_options))))
                    record.error = record.error or "authentication failed"
                    return None
            elif AuthMethod.USERNAME_PASSWORD in (options.advertised_methods or ()):
                # D7 slow exchange: Type 1 selecting method 2; the client answers with a bare
                # RFC 1929 request (after any initial data), we send the RFC 1929 reply and
                # then the second, final Authentication Reply (AUTH-04).
                selection = AuthReply(
                    AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),)
                )
                await stream.send(conn.send(selection))
                credentials: UserPassRequest | None = None
                while credentials is None:
                    event = await self._next_event(conn, stream)
                    if isinstance(event, UserPassRequest):
                        credentials = event
                    elif isinstance(event, InitialData):
                        initial = event.data  # sent before the RFC 1929 request
                    else:
                        raise _Closed()
                user = await self._verify(credentials, record)
                status = UserPassStatus.SUCCESS if user is not None else UserPassStatus.FAILURE
                await stream.send(conn.send(UserPassReply(status)))
                if user is None:
                    await stream.send(conn.send(AuthReply(AuthReplyType.FAILURE)))
                    record.error = record.error or "authentication failed"
                    return None
            else:
                # AUTH-02: nothing usable and nothing we can negotiate.
                refusal = AuthReply(
                    AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),)
                )
                await stream.send(conn.send(refusal))
                record.error = "authentication required"
                return None
        # AUTH-07: authentication not required (or done): the advertisement is ignored.
        result = _Authenticated(user=user, initial=initial)
        if in_session_context and options.session_request and store is not None:
            # SES-01: the session starts with this request; its ID goes into the successful
            # Operation Reply (D4). Hitting a cap declines silently (None).
            new = store.create(user, record.client[0], now)
            if new is not None:
                result = _Authenticated(user=user, session=new, new_session=True, initial=initial)
                if options.token_request is not None:
                    store.request_window(new, options.token_request)
                if new.window is not None:
                    reply_options.append(IdempotenceWindow(*new.window.current))
        await self._send_auth_success(stream, conn, options, tuple(reply_options))
        return result

    @staticmethod
    async def _send_auth_success(
        stream: _ClientStream,
        conn: ServerConnection,
        options: RequestOptions,
        reply_options: tuple[Option, ...],
    ) -> None:
        data = conn.send(AuthReply(AuthReplyType.SUCCESS, reply_options))
        if options.advertised_methods is None and conn.their_state is State.DATA:
            # Without an advertisement the client does not wait for this reply before sending
            # data (section "False Starts"): it leaves with the Operation Reply, in one write.
            stream.queue(data)
        else:
            await stream.send(data)

    # -- operations (SOCKS 6) ----------------------------------------------------------

    async def _fail6(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        code: ReplyCode,
        record: ConnectionRecord,
        plan: StackPlan | None = None,
        *,
        cause: str,
    ) -> None:
        # "Proxies ... MUST [include Stack options in their Operation Replies] for every
        # supported Stack option sent by the client" (draft-11, "Stack Options"; STK-01, D9)
        # says nothing to exempt failures. The client leg's options (``plan``) were applied
        # before the operation failed, so they are echoed with their read-back values; the
        # proxy-remote leg never came to be, so nothing is claimed for it.
        echo = echo_stack_options(plan, client=record.client_options) if plan is not None else ()
        record.error = cause  # the access log says why, whatever the code (issue 12)
        await stream.send(conn.send(failure_reply(code, echo)))
        record.reply_code = code
        await stream.linger_close()

    async def _operate(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        request: Request,
        options: RequestOptions,
        auth: _Authenticated,
        initial: bytes,
        client_applied: AppliedLeg | None,
        record: ConnectionRecord,
    ) -> None:
        command = request.command
        extra: tuple[Option, ...] = ()
        if auth.new_session and auth.session is not None:
            extra = (SessionID(auth.session.session_id),)  # SES-01, D4
        if not isinstance(command, Command):
            # A Command Code we do not know (the codec passes it as a plain int) is answered
            # after the normal authentication flow, like any unsupported command (CMD-06).
            await self._fail6(
                stream,
                conn,
                ReplyCode.COMMAND_NOT_SUPPORTED,
                record,
                options.stack,
                cause=f"unknown command {command:#04x}",
            )
            return
        if command == Command.NOOP and not noop_address_ok(request):
            # REQ-04, D11
            await self._fail6(
                stream,
                conn,
                ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
                record,
                options.stack,
                cause="NOOP needs address 0 and port 0 (IPv4 or IPv6)",
            )
            return
        allowed, rule = self._policy.decide(
            record.client[0],
            auth.user,
            command,
            request.address_type,
            request.address,
            request.port,
            dns_service=is_dns_request(request),  # D13: to the resolver, not to 0.0.0.0
        )
        if not allowed:  # CMD-06
            await self._fail6(
                stream, conn, ReplyCode.NOT_ALLOWED_BY_RULESET, record, options.stack, cause=_denied_by(rule)
            )
            return
        if command == Command.NOOP:
            echo = echo_stack_options(options.stack, client=client_applied)  # STK-01: client-leg options
            reply = OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", 0, echo + extra)
            await stream.send(conn.send(reply))
            record.reply_code = ReplyCode.SUCCESS
            await stream.linger_close()
        elif command == Command.CONNECT:
            await self._connect6(stream, conn, request, options, auth, initial, client_applied, extra, record)
        elif command == Command.BIND:
            await self._bind6(stream, conn, request, options, auth, client_applied, extra, record)
        else:
            # UDP ASSOCIATE is a later issue; the draft lets proxies support any subset (CMD-06).
            await self._fail6(
                stream,
                conn,
                ReplyCode.COMMAND_NOT_SUPPORTED,
                record,
                options.stack,
                cause="UDP ASSOCIATE is not implemented",
            )

    async def _connect6(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        request: Request,
        options: RequestOptions,
        auth: _Authenticated,
        initial: bytes,
        client_applied: AppliedLeg | None,
        extra: tuple[Option, ...],
        record: ConnectionRecord,
    ) -> None:
        plan = options.stack
        trailing, client_eof = conn.trailing_data
        # Initial data (AUTH-06) comes first on the wire, then what was sent after it.
        payload = initial + trailing
        if is_dns_request(request):
            # D13 / CMD-07: relay DNS over TCP (RFC 7766 framing passes through unchanged) to
            # the configured resolver; the reply carries the unspecified address and port 0.
            resolver = self._config.server.dns_resolver
            if resolver is None:
                cause = "DNS service: no server.dns_resolver configured"
                await self._fail6(stream, conn, ReplyCode.CONNECTION_REFUSED, record, plan, cause=cause)
                return
            try:
                remote = await self._dial(
                    _address_type_of(resolver[0]), *resolver, StackPlan(), b"", None, record
                )
            except _ConnectFailed as exc:
                await self._fail6(stream, conn, exc.code, record, plan, cause=f"DNS service: {exc}")
                return
            unspecified = "::" if request.address_type == AddressType.IPV6 else "0.0.0.0"
            # STK-01, D9: the client-leg options were applied; the resolver leg gets none.
            echo = echo_stack_options(plan, client=client_applied)
            reply = OperationReply(ReplyCode.SUCCESS, request.address_type, unspecified, 0, echo + extra)
        else:
            tfo_payload = b""
            if plan.tfo_payload_size is not None:
                # STK-06: "MUST NOT use a payload size larger than the one indicated" (0: any).
                tfo_payload = payload[: plan.tfo_payload_size] if plan.tfo_payload_size else payload
            try:
                remote = await self._dial(
                    request.address_type, request.address, request.port, plan, tfo_payload, auth.user, record
                )
            except _ConnectFailed as exc:
                await self._fail6(stream, conn, exc.code, record, plan, cause=str(exc))
                return
            happy: Availability | None = None
            if request.address_type == AddressType.DOMAIN_NAME:
                happy = Availability.DESIRED if remote.happy_eyeballs else Availability.NOT_DESIRED
            echo = echo_stack_options(
                plan,
                client=client_applied,
                remote=remote.applied,
                happy_eyeballs=happy,
                tfo_payload_size=remote.syn_sent if record.tfo_syn_acked else 0,
                multipath=Availability.DESIRED if remote.mptcp else Availability.NOT_DESIRED,
            )
            host, port = _sockname(remote.sock)
            reply = OperationReply(ReplyCode.SUCCESS, _address_type_of(host), host, port, echo + extra)
        try:
            await stream.send(conn.send(reply))
        except BaseException:
            remote.sock.close()
            raise
        record.reply_code = ReplyCode.SUCCESS
        await self._relay(stream, remote.sock, payload[remote.syn_sent :], client_eof, auth.session, record)

    async def _relay(
        self,
        stream: _ClientStream,
        remote: socket.socket,
        to_remote: bytes,
        client_eof: bool,
        session: Session | None,
        record: ConnectionRecord,
    ) -> None:
        """The one hand-off to the data plane: the reply is written, the bytes the client
        sent early go first, then the relay owns both sockets."""
        result = await stream.relay(self.relayer, remote, to_remote, client_eof)
        record.bytes_up = result.bytes_client_to_remote
        record.bytes_down = result.bytes_remote_to_client
        record.relay_path = result.path
        record.relay_end = result.end.name.lower()
        if result.cause:
            record.error = record.error or f"relay: {result.cause}"
        elif result.end == RelayEnd.ERROR:
            record.error = record.error or "relay: error (the data plane gave no cause)"
        record.relay_close = "rst" if result.reset else "fin"
        if session is not None and self._sessions is not None and self._loop is not None:
            self._sessions.touch(session, self._loop.time())

    # -- dialing -------------------------------------------------------------------------

    async def _resolve(
        self,
        address_type: AddressType,
        host: str,
        port: int,
        user: str | None,
        command: Command,
        client_ip: str,
    ) -> list[tuple[int, tuple[Any, ...]]]:
        loop = self._running_loop
        if address_type == AddressType.IPV4:
            return [(socket.AF_INET, (host, port))]
        if address_type == AddressType.IPV6:
            return [(socket.AF_INET6, (host, port))]
        targets: list[tuple[int, tuple[Any, ...]]] = []
        try:
            if self._resolver is not None:
                targets = list(await self._resolver(host, port))
            else:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
                for family, _, _, _, sockaddr in infos:
                    if (family, sockaddr) not in targets:
                        targets.append((family, sockaddr))
        except (socket.gaierror, UnicodeError) as exc:
            # UnicodeError: a name the idna codec rejects (a label over 63 bytes, an empty
            # label) fails in getaddrinfo before any lookup; it names no host either.
            raise _ConnectFailed(ReplyCode.HOST_UNREACHABLE, f"cannot resolve {host!r}: {exc}") from None
        policy = self._policy
        if policy.checks_resolved_addresses:
            # A CIDR rule must also stop names that resolve into the network (policy.py).
            targets = [
                t
                for t in targets
                if policy.check(
                    client_ip, user, command, address_type, host, port, resolved_address=str(t[1][0])
                )
            ]
            if not targets:
                raise _ConnectFailed(
                    ReplyCode.NOT_ALLOWED_BY_RULESET, f"{host!r} resolves only to denied addresses"
                )
        loops = [(t, self._own.find(str(t[1][0]), port)) for t in targets]
        if any(listener is not None for _, listener in loops):
            targets = [t for t, listener in loops if listener is None]
            if not targets:
                listener = next(listener for _, listener in loops if listener is not None)
                raise _ConnectFailed(
                    ReplyCode.NOT_ALLOWED_BY_RULESET,
                    f"loop refused: {host!r} resolves only to this proxy's own listener {listener}",
                )
        return targets

    async def _dial(
        self,
        address_type: AddressType,
        host: str,
        port: int,
        plan: StackPlan,
        tfo_payload: bytes,
        user: str | None,
        record: ConnectionRecord,
    ) -> _Remote:
        """Connect to the destination with the plan's proxy-remote options applied.

        Raises:
            _ConnectFailed: with the reply code for the failure (CMD-01).
        """
        loop = self._running_loop
        happy = address_type == AddressType.DOMAIN_NAME and plan.happy_eyeballs == Availability.DESIRED
        multipath = plan.multipath == Availability.DESIRED
        if address_type != AddressType.DOMAIN_NAME:
            # One address, nothing to resolve: the connect timeout is the wait for the
            # handshake itself (a timer on that wait, no timeout scope around the call).
            listener = self._own.find(host, port)
            if listener is not None:  # CMD-06: never a loop through ourselves, whatever the rules
                raise _ConnectFailed(
                    ReplyCode.NOT_ALLOWED_BY_RULESET,
                    f"loop refused: {_format(host, port)} is this proxy's own listener {listener}",
                )
            family = socket.AF_INET6 if address_type == AddressType.IPV6 else socket.AF_INET
            sockaddr: tuple[Any, ...] = (host, port)
            deadline = loop.time() + self._config.server.connect_timeout
            try:
                remote = await self._attempt(family, sockaddr, plan, multipath, tfo_payload, deadline)
            except (OSError, TimeoutError) as exc:
                raise _ConnectFailed(reply_code_for(exc), self._connect_error(host, port, exc)) from None
            self._note_remote(remote, False, record)
            return remote
        try:
            async with asyncio.timeout(self._config.server.connect_timeout):
                targets = await self._resolve(
                    address_type, host, port, user, Command.CONNECT, record.client[0]
                )
                attempts = [
                    _bind_attempt(self._attempt, family, sockaddr, plan, multipath, tfo_payload)
                    for family, sockaddr in (_interleave(targets) if happy else targets)
                ]
                if happy:
                    remote = await _happy_eyeballs(loop, attempts, HAPPY_EYEBALLS_DELAY)
                else:
                    remote = await _one_by_one(attempts)
        except _ConnectFailed:
            raise
        except (OSError, TimeoutError) as exc:
            raise _ConnectFailed(reply_code_for(exc), self._connect_error(host, port, exc)) from None
        self._note_remote(remote, happy, record)
        return remote

    def _connect_error(self, host: str, port: int, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and exc.errno is None:  # our own deadline, not ETIMEDOUT
            cause = f"no answer within {self._config.server.connect_timeout:g}s (server.connect_timeout)"
        else:
            cause = describe_error(exc)
        return f"connect to {_format(host, port)}: {cause}"

    @staticmethod
    def _note_remote(remote: _Remote, happy: bool, record: ConnectionRecord) -> None:
        remote.happy_eyeballs = happy
        record.remote_address = remote.address
        record.remote_options = remote.applied
        record.happy_eyeballs = happy
        record.tfo_attempted = remote.tfo_attempted
        record.tfo_syn_acked = remote.tfo_attempted and tfo_syn_data_acked(remote.sock)
        record.mptcp = remote.mptcp

    async def _attempt(
        self,
        family: int,
        sockaddr: tuple[Any, ...],
        plan: StackPlan,
        multipath: bool,
        tfo_payload: bytes,
        deadline: float | None = None,
    ) -> _Remote:
        loop = self._running_loop
        sock, is_mptcp = new_stream_socket(family, multipath)
        try:
            # Set before connect() so that the SYN already carries them (STK-03, STK-05).
            applied = None if plan.remote.empty else apply_leg_options(sock, plan.remote)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = 0
            tfo = bool(tfo_payload) and enable_tfo_connect(sock)
            # connect() by hand rather than loop.sock_connect(): the latter re-resolves the
            # address with the socket's protocol, which getaddrinfo refuses for MPTCP (262).
            with contextlib.suppress(BlockingIOError, InterruptedError):
                # With TCP_FASTOPEN_CONNECT and a cached cookie this sends nothing yet; without
                # a cookie it starts a normal handshake (EINPROGRESS).
                sock.connect(sockaddr)
            if tfo:
                # CMD-02 / STK-06: only with a TFO option: the first send() rides in the SYN.
                with contextlib.suppress(BlockingIOError):
                    sent = sock.send(tfo_payload)
            if not _ready_now(sock):
                await _wait_writable(loop, sock, deadline)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return _Remote(
                sock=sock,
                address=(str(sockaddr[0]), int(sockaddr[1])),
                applied=applied,
                mptcp=is_mptcp and mptcp_in_use(sock),
                happy_eyeballs=False,
                tfo_attempted=tfo,
                syn_sent=sent,
            )
        except BaseException:
            sock.close()
            raise

    # -- BIND --------------------------------------------------------------------------

    def _peer_refusal(
        self,
        record: ConnectionRecord,
        address_type: AddressType,
        address: str,
        port: int,
        peer: tuple[str, int],
    ) -> str | None:
        """Why the rules refuse the host that connected to a BIND listener, or None (CMD-06:
        a BIND's remote host is its peer, unknown until it connects; `socks6fast.proto.policy`)."""
        allowed, rule = self._policy.decide(
            record.client[0], record.user, Command.BIND, address_type, address, port, resolved_address=peer[0]
        )
        return None if allowed else f"BIND peer {_format(*peer)} {_denied_by(rule)}"

    def _bind_host(
        self, stream: _ClientStream, address_type: AddressType, address: str
    ) -> tuple[AddressType, str]:
        # draft-11 section "Requests" (BIND fields): "If the client does not require a certain
        # address, it can set the Address Type field to 0x01 (IPv4) or 0x04 (IPv6), and the
        # Address field to 0". So an unspecified address of either family means "no particular
        # address", not "every interface": bind where the client reached us (the address it
        # can tell the remote host, RFC 1928 BIND semantics), in that address's family, so a
        # proxy listening on loopback never opens a listener on other interfaces (CMD-04).
        if not ipaddress.ip_address(address).is_unspecified or stream.sock is None:
            return address_type, address
        with contextlib.suppress(OSError):
            local = ipaddress.ip_address(str(stream.sock.getsockname()[0]).split("%", 1)[0])
            if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
                local = local.ipv4_mapped  # a dual-stack listener reached over IPv4
            return _address_type_of(str(local)), str(local)
        return address_type, address

    def _open_listener(
        self, address_type: AddressType, host: str, port: int, plan: StackPlan, backlog: int
    ) -> tuple[socket.socket, AppliedLeg | None, bool]:
        family = socket.AF_INET6 if address_type == AddressType.IPV6 else socket.AF_INET
        sock, is_mptcp = new_stream_socket(family, plan.multipath == Availability.DESIRED)
        try:
            applied = None if plan.remote.empty else apply_leg_options(sock, plan.remote)
            sock.bind((host, port))
            if plan.tfo_payload_size is not None:
                enable_tfo_listener(sock)  # STK-06: BIND accepts TFO only when asked
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise _ConnectFailed(
                reply_code_for(exc), f"bind {_format(host, port)}: {describe_error(exc)}"
            ) from None
        return sock, applied, is_mptcp

    async def _wait_for_peer(
        self,
        stream: _ClientStream,
        conn: ServerConnection | Socks5ServerConnection,
        accept: Awaitable[tuple[socket.socket, tuple[str, int]]],
    ) -> tuple[socket.socket, tuple[str, int]]:
        """Wait for the remote host to connect, while noticing the client going away."""
        loop = self._running_loop
        accept_task = asyncio.ensure_future(accept)
        watch: asyncio.Future[bytes] | None = None
        idle = self._config.server.idle_timeout
        try:
            async with _timeout_saying(idle, f"no host connected within {idle:g}s (server.idle_timeout)"):
                while True:
                    if watch is None:
                        watch = loop.create_task(stream.recv())
                    waiting: set[asyncio.Future[Any]] = {accept_task, watch}
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if accept_task in done:
                        return accept_task.result()
                    data = watch.result()
                    watch = None
                    if not data:
                        raise _Closed()  # the client left before anyone connected
                    conn.receive_data(data)  # early application data: relayed later, in order
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    data = await watch
                    if data:
                        conn.receive_data(data)
            if not accept_task.done():
                accept_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    peer, _ = await accept_task
                    peer.close()

    async def _bind6(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        request: Request,
        options: RequestOptions,
        auth: _Authenticated,
        client_applied: AppliedLeg | None,
        extra: tuple[Option, ...],
        record: ConnectionRecord,
    ) -> None:
        loop = self._running_loop
        plan = options.stack
        session = auth.session
        if request.address_type == AddressType.DOMAIN_NAME:
            cause = "BIND to a domain name is not supported"
            await self._fail6(stream, conn, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, record, plan, cause=cause)
            return
        if session is not None:
            # CMD-05: a further BIND of the same session naming a backlog listener's address.
            listener = session.listeners.get((request.address, request.port))
            if isinstance(listener, _BacklogListener) and not listener.closed:
                await self._bind_claim(
                    stream, conn, request, listener, plan, client_applied, extra, session, record
                )
                return
        backlog = 0
        if plan.listen_backlog is not None and session is not None:
            # "The proxy SHOULD NOT use a backlog longer than requested" (CMD-05).
            backlog = min(plan.listen_backlog, MAX_BIND_BACKLOG)
        bind_type, host = self._bind_host(stream, request.address_type, request.address)
        try:
            lsock, applied, is_mptcp = self._open_listener(
                bind_type, host, request.port, plan, max(backlog, 1)
            )
        except _ConnectFailed as exc:
            await self._fail6(stream, conn, exc.code, record, plan, cause=str(exc))
            return
        bound_host, bound_port = _sockname(lsock)
        echo = echo_stack_options(
            plan,
            client=client_applied,
            remote=applied,
            tfo_payload_size=0,  # the payload size is "ignored in case of a BIND command"
            multipath=Availability.DESIRED if is_mptcp else Availability.NOT_DESIRED,
            listen_backlog=backlog,  # "If no backlog is issued, the proxy signals ... 0"
        )
        first = OperationReply(
            ReplyCode.SUCCESS, _address_type_of(bound_host), bound_host, bound_port, echo + extra
        )
        if backlog:
            assert session is not None
            backlog_listener = _BacklogListener(
                loop, lsock, backlog, tfo=plan.tfo_payload_size is not None, mptcp=is_mptcp
            )
            session.listeners[(bound_host, bound_port)] = backlog_listener
            try:
                await stream.send(conn.send(first))
                record.reply_code = ReplyCode.SUCCESS
                # "the proxy listens for incoming connections for as long as the initial
                # connection stays open. The initial connection is not used to relay data."
                # The other way round too: when the session ends (Session Teardown, idle
                # expiry) and closes the listener, the initial connection is closed ("the
                # proxy MAY close all connections associated with said session"), so an
                # open initial connection always means a listening proxy (CMD-05).
                await self._hold_backlog(stream, backlog_listener)
            finally:
                backlog_listener.close()
                if session.listeners.get((bound_host, bound_port)) is backlog_listener:
                    del session.listeners[(bound_host, bound_port)]
            return
        try:
            await stream.send(conn.send(first))
            record.reply_code = ReplyCode.SUCCESS
            peer, peer_addr = await self._wait_for_peer(stream, conn, loop.sock_accept(lsock))
        finally:
            lsock.close()
        await self._bind_second_reply(stream, conn, request, peer, peer_addr, plan, is_mptcp, session, record)

    async def _hold_backlog(self, stream: _ClientStream, listener: _BacklogListener) -> None:
        """Read and drop what the initial connection sends until it ends or the listener closes."""
        loop = self._running_loop
        while not listener.closed:
            watch = loop.create_task(stream.recv())
            try:
                await asyncio.wait((watch, listener.ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not watch.done():
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await watch
            if watch.cancelled():
                return  # the listener closed first
            if not watch.result():
                return  # EOF from the client (an OSError propagates as before)

    async def _bind_claim(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        request: Request,
        listener: _BacklogListener,
        plan: StackPlan,
        client_applied: AppliedLeg | None,
        extra: tuple[Option, ...],
        session: Session,
        record: ConnectionRecord,
    ) -> None:
        bound_host, bound_port = _sockname(listener.sock)
        # STK-01 / D9: "MUST do so for every supported Stack option sent by the client", the
        # claiming BIND too (draft-11 "Stack options"). The listener exists already, so its
        # proxy-remote options are what accepted connections get: read them back from it.
        # Multipath says "whether an MPTCP connection will be accepted, when first replying to
        # a BIND command". TFO is accepted only if the BIND that opened the listener asked; the
        # TFO option has no field to say "not accepted", so it is echoed only when it is.
        echo = echo_stack_options(
            plan,
            client=client_applied,
            remote=None if plan.remote.empty else read_leg_options(listener.sock, plan.remote),
            tfo_payload_size=0 if listener.tfo else None,
            multipath=Availability.DESIRED if listener.mptcp else Availability.NOT_DESIRED,
            listen_backlog=0,
        )
        first = OperationReply(
            ReplyCode.SUCCESS, _address_type_of(bound_host), bound_host, bound_port, echo + extra
        )
        await stream.send(conn.send(first))
        record.reply_code = ReplyCode.SUCCESS
        peer, peer_addr = await self._wait_for_peer(stream, conn, listener.queue.get())
        await self._bind_second_reply(
            stream, conn, request, peer, peer_addr, plan, listener.mptcp, session, record
        )

    async def _bind_second_reply(
        self,
        stream: _ClientStream,
        conn: ServerConnection,
        request: Request,
        peer: socket.socket,
        peer_addr: tuple[str, int],
        plan: StackPlan,
        is_mptcp: bool,
        session: Session | None,
        record: ConnectionRecord,
    ) -> None:
        # CMD-04: the second reply names the host that connected; then data flows.
        record.remote_address = (str(peer_addr[0]), int(peer_addr[1]))
        refusal = self._peer_refusal(record, request.address_type, request.address, request.port, peer_addr)
        if refusal is not None:
            peer.close()
            await self._fail6(stream, conn, ReplyCode.NOT_ALLOWED_BY_RULESET, record, cause=refusal)
            return
        record.mptcp = is_mptcp and mptcp_in_use(peer)
        options: tuple[Option, ...] = ()
        if plan.multipath is not None:
            # "whether or not the connection uses MPTCP ... in the second Operation reply"
            options = echo_stack_options(
                StackPlan(multipath=plan.multipath),
                multipath=Availability.DESIRED if record.mptcp else Availability.NOT_DESIRED,
            )
        host, port = record.remote_address
        second = OperationReply(ReplyCode.SUCCESS, _address_type_of(host), host, port, options)
        try:
            await stream.send(conn.send(second))
        except BaseException:
            peer.close()
            raise
        trailing, client_eof = conn.trailing_data
        await self._relay(stream, peer, trailing, client_eof, session, record)

    # -- SOCKS 5 -----------------------------------------------------------------------

    async def _serve_socks5(
        self, stream: _ClientStream, conn: Socks5ServerConnection, record: ConnectionRecord
    ) -> None:
        try:
            await self._socks5_handshake(stream, conn, record)
        except RemoteProtocolError as exc:
            record.error = str(exc)
            if exc.reply_code is not None:
                failure = Socks5Reply(_socks5_code(exc.reply_code), AddressType.IPV4, "0.0.0.0", 0)
                with contextlib.suppress(LocalProtocolError, OSError):
                    await stream.send(conn.send(failure))
                    record.reply_code = failure.reply_code
            await stream.linger_close()
        except (_Closed, OSError, TimeoutError, EOFError):
            raise
        except Exception:
            # A bug: RFC 1928 general failure (REP 0x01) if a reply is still due, then _handle logs.
            with contextlib.suppress(Exception):
                await stream.send(
                    conn.send(Socks5Reply(ReplyCode.GENERAL_FAILURE, AddressType.IPV4, "0.0.0.0", 0))
                )
                record.reply_code = ReplyCode.GENERAL_FAILURE
            raise

    async def _fail5(
        self,
        stream: _ClientStream,
        conn: Socks5ServerConnection,
        code: ReplyCode,
        record: ConnectionRecord,
        *,
        cause: str,
    ) -> None:
        record.error = cause  # the access log says why, whatever the code (issue 12)
        code = _socks5_code(code)
        await stream.send(conn.send(Socks5Reply(code, AddressType.IPV4, "0.0.0.0", 0)))
        record.reply_code = code
        await stream.linger_close()

    async def _socks5_handshake(
        self, stream: _ClientStream, conn: Socks5ServerConnection, record: ConnectionRecord
    ) -> None:
        loop = self._running_loop
        event = await self._next_event(conn, stream)
        if isinstance(event, ConnectionClosed):
            return
        assert isinstance(event, Socks5Greeting)
        methods = event.methods
        if self._users.required:
            method = AuthMethod.USERNAME_PASSWORD if AuthMethod.USERNAME_PASSWORD in methods else None
        elif AuthMethod.NONE in methods:
            method = AuthMethod.NONE
        else:
            # No users configured, but the client only offers username/password (e.g. curl
            # with --proxy-user): run the exchange and accept it, as nothing is required.
            method = AuthMethod.USERNAME_PASSWORD if AuthMethod.USERNAME_PASSWORD in methods else None
        if method is None:
            await stream.send(conn.send(Socks5MethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS)))
            record.error = "no acceptable authentication method"
            await stream.linger_close()
            return
        await stream.send(conn.send(Socks5MethodSelection(method)))
        user: str | None = None
        if method == AuthMethod.USERNAME_PASSWORD:
            event = await self._next_event(conn, stream)
            if isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, UserPassRequest)
            ok = True
            if self._users.required:
                user = await self._verify(event, record)
                ok = user is not None
            await stream.send(
                conn.send(UserPassReply(UserPassStatus.SUCCESS if ok else UserPassStatus.FAILURE))
            )
            if not ok:
                record.error = record.error or "authentication failed"
                await stream.linger_close()
                return
        record.user = user
        event = await self._next_event(conn, stream)
        if isinstance(event, ConnectionClosed):
            return
        assert isinstance(event, Socks5Request)
        command = Command(int(event.command))
        record.command = command.name
        record.destination = _format(event.address, event.port)
        allowed, rule = self._policy.decide(
            record.client[0], user, command, event.address_type, event.address, event.port
        )
        if not allowed:
            await self._fail5(stream, conn, ReplyCode.NOT_ALLOWED_BY_RULESET, record, cause=_denied_by(rule))
            return
        if event.command == Socks5Command.CONNECT:
            try:
                remote = await self._dial(
                    event.address_type, event.address, event.port, StackPlan(), b"", user, record
                )
            except _ConnectFailed as exc:
                await self._fail5(stream, conn, exc.code, record, cause=str(exc))
                return
            host, port = _sockname(remote.sock)
            try:
                await stream.send(
                    conn.send(Socks5Reply(ReplyCode.SUCCESS, _address_type_of(host), host, port))
                )
            except BaseException:
                remote.sock.close()
                raise
            record.reply_code = ReplyCode.SUCCESS
            trailing, client_eof = conn.trailing_data
            await self._relay(stream, remote.sock, trailing, client_eof, None, record)
        elif event.command == Socks5Command.BIND and event.address_type != AddressType.DOMAIN_NAME:
            # RFC 1928 BIND: DST.ADDR is the expected peer, not a bind address; we bind where
            # the client reached us.
            unspecified = "::" if event.address_type == AddressType.IPV6 else "0.0.0.0"
            bind_type, host = self._bind_host(stream, event.address_type, unspecified)
            try:
                lsock, _, _ = self._open_listener(bind_type, host, 0, StackPlan(), 1)
            except _ConnectFailed as exc:
                await self._fail5(stream, conn, exc.code, record, cause=str(exc))
                return
            try:
                bound_host, bound_port = _sockname(lsock)
                first = Socks5Reply(ReplyCode.SUCCESS, _address_type_of(bound_host), bound_host, bound_port)
                await stream.send(conn.send(first))
                record.reply_code = ReplyCode.SUCCESS
                peer, peer_addr = await self._wait_for_peer(stream, conn, loop.sock_accept(lsock))
            finally:
                lsock.close()
            record.remote_address = peer_addr
            refusal = self._peer_refusal(record, event.address_type, event.address, event.port, peer_addr)
            if refusal is not None:
                peer.close()
                await self._fail5(stream, conn, ReplyCode.NOT_ALLOWED_BY_RULESET, record, cause=refusal)
                return
            second = Socks5Reply(
                ReplyCode.SUCCESS, _address_type_of(peer_addr[0]), peer_addr[0], peer_addr[1]
            )
            try:
                await stream.send(conn.send(second))
            except BaseException:
                peer.close()
                raise
            trailing, client_eof = conn.trailing_data
            await self._relay(stream, peer, trailing, client_eof, None, record)
        elif event.command == Socks5Command.BIND:
            cause = "BIND to a domain name is not supported"
            await self._fail5(stream, conn, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, record, cause=cause)
        else:
            cause = f"{command.name} is not implemented"
            await self._fail5(stream, conn, ReplyCode.COMMAND_NOT_SUPPORTED, record, cause=cause)


# --- helpers ---------------------------------------------------------------------------


def _denied_by(rule: int | None) -> str:
    """The access log's reason for a refusal by the rules: which one decided (0-based, as
    ``[[rules]]`` entries are counted in config errors)."""
    return f"denied by rules[{rule}]" if rule is not None else "denied by default_action"


_Attempt = Callable[[], Coroutine[Any, Any, _Remote]]
"""One connection attempt to one resolved address, not started yet."""


def _bind_attempt(
    attempt: Callable[[int, tuple[Any, ...], StackPlan, bool, bytes], Coroutine[Any, Any, _Remote]],
    family: int,
    sockaddr: tuple[Any, ...],
    plan: StackPlan,
    multipath: bool,
    tfo_payload: bytes,
) -> _Attempt:
    return lambda: attempt(family, sockaddr, plan, multipath, tfo_payload)


def _interleave(targets: list[tuple[int, tuple[Any, ...]]]) -> list[tuple[int, tuple[Any, ...]]]:
    """RFC 8305 section 4: alternate address families, starting with the first one returned."""
    by_family: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
    for target in targets:
        by_family.setdefault(target[0], []).append(target)
    queues = list(by_family.values())
    out: list[tuple[int, tuple[Any, ...]]] = []
    while queues:
        for queue in list(queues):
            out.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return out


async def _one_by_one(attempts: list[_Attempt]) -> _Remote:
    last: BaseException | None = None
    for attempt in attempts:
        try:
            return await attempt()
        except OSError as exc:
            last = exc
    raise last if last is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")


async def _happy_eyeballs(loop: asyncio.AbstractEventLoop, attempts: list[_Attempt], delay: float) -> _Remote:
    """RFC 8305 section 5: start one attempt, then the next after ``delay`` or as soon as
    the previous one failed; the first connection wins and every other one is closed."""
    pending: set[asyncio.Task[_Remote]] = set()
    errors: list[BaseException] = []
    winner: _Remote | None = None
    index = 0
    try:
        while winner is None:
            if index < len(attempts):
                pending.add(loop.create_task(attempts[index]()))
                index += 1
            if not pending:
                break
            timeout = delay if index < len(attempts) else None
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result().sock.close()  # a simultaneous second winner
    finally:
        for task in pending:
            task.cancel()
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, _Remote):
                result.sock.close()
    if winner is not None:
        return winner
    raise errors[-1] if errors else OSError(errno.EHOSTUNREACH, "no address to connect to")


@contextlib.asynccontextmanager
async def _timeout_saying(delay: float, message: str) -> AsyncIterator[None]:
    """``asyncio.timeout(delay)`` whose TimeoutError says what timed out (the access log's cause)."""
    try:
        async with asyncio.timeout(delay):
            yield
    except TimeoutError:
        raise TimeoutError(message) from None


_POLL = select.poll()
_POLL_DONE = select.POLLOUT | select.POLLERR | select.POLLHUP


def _ready_now(sock: socket.socket) -> bool:
    """True when a connect in progress has already finished (or failed).

    On loopback and nearby hosts the handshake is often over by the time connect()
    returns: one poll() then replaces a writer registered with the event loop and
    removed again (several epoll_ctl calls on uvloop).
    """
    fd = sock.fileno()
    _POLL.register(fd, select.POLLOUT)
    try:
        return bool(_POLL.poll(0))
    finally:
        _POLL.unregister(fd)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


async def _wait_writable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float | None = None
) -> None:
    """Wait until ``sock`` is writable (a connect finished); TimeoutError at ``deadline``."""
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, future, None)
    timer = None
    if deadline is not None:
        timer = loop.call_at(deadline, _settle, future, TimeoutError())
    try:
        await future
    finally:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()


async def serve(config: Config, *, stop: asyncio.Event | None = None, drain_timeout: float = 10.0) -> None:
    """Run a `Server` until ``stop`` is set (or forever), then close it gracefully.

    Args:
        config: the configuration.
        stop: set it to stop accepting and drain.
        drain_timeout: seconds to wait for connections to finish when stopping.
    """
    server = Server(config)
    await server.start()
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await server.close(drain_timeout=drain_timeout)
