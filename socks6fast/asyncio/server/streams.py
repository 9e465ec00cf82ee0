"""The client leg during the handshake: a plain socket or a TLS transport, one interface.

Strategy: plain client sockets stay ours until the relay takes them (``loop.sock_recv`` /
``sock_sendall``, and a non-blocking ``recv`` first, since a client usually writes its request
right after connecting); a TLS client leg (TRN-03) is wrapped with
``loop.connect_accepted_socket(ssl=...)`` and read through a small buffering protocol, and is
relayed with ``Relayer.relay_transports``. Either way `ClientStream.relay` hands the leg and
the remote socket to the data plane with the bytes the client sent early in front.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, cast

from ...dataplane.engine import RelayResult
from ...dataplane.relayer import Relayer
from ...proto.proxy_header import MAX_V2_LENGTH, ProxyHeader, parse_proxy_header

if TYPE_CHECKING:
    from ...dataplane.relayer import Limits

__all__ = ["RECV_SIZE", "ClientStream", "ProxyHeaderReader", "SocketStream", "TLSStream", "tls_handshake"]

log = logging.getLogger("socks6fast.server")

#: Bytes read per recv during the handshake (a Request is at most ~16.6 KB, D6).
RECV_SIZE = 65536
#: After a reply that ends the connection, read and drop what the client still sends
#: for at most this long before closing, so that close() does not turn into a reset
#: that destroys the reply in flight.
LINGER_TIMEOUT = 1.0
#: ... and at most this many bytes.
LINGER_BYTES = 65536


class ClientStream:
    """The client leg during the handshake: plain socket or TLS transport."""

    sock: socket.socket | None
    """The client's socket, when there is one to set options on and read addresses from."""

    def local_host(self) -> str | None:
        """The proxy's address the client reached (text, no scope), or None if unknown."""
        if self.sock is None:
            return None
        try:
            return str(self.sock.getsockname()[0]).split("%", 1)[0]
        except OSError:
            return None

    async def recv(self) -> bytes:
        raise NotImplementedError

    def recv_now(self) -> bytes | None:
        """What `recv` would return without waiting, or None when it would have to wait."""
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        """Write ``data`` and wait until it is handed to the kernel."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def linger_close(self) -> None:
        """Close after a final reply without resetting the connection."""
        self.close()

    async def relay(
        self,
        relayer: Relayer,
        remote: socket.socket,
        to_remote: bytes,
        client_eof: bool,
        up: Limits = (),
        down: Limits = (),
    ) -> RelayResult:
        raise NotImplementedError


class SocketStream(ClientStream):
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

    def give_up(self) -> None:
        """The socket's descriptor was handed to a data plane (detached): never close it."""
        self._owned = False

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
        self,
        relayer: Relayer,
        remote: socket.socket,
        to_remote: bytes,
        client_eof: bool,
        up: Limits = (),
        down: Limits = (),
    ) -> RelayResult:
        assert self.sock is not None
        self._owned = False  # the relayer owns and closes both sockets from here on
        # An EOF already read stays visible to the relay: recv() keeps returning 0.
        if up or down:  # bandwidth limits (issue 14 item 4); none: the plain call
            return await relayer.relay_sockets(self.sock, remote, to_remote=to_remote, up=up, down=down)
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
        # TLS has no half-close: the transport closes after the client's EOF whatever this
        # returns, and True only makes asyncio log "returning true from eof_received() has
        # no effect when using ssl" (once per UDP association over TLS that the client ends).
        return False

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


class TLSStream(ClientStream):
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

    def local_host(self) -> str | None:
        # uvloop's TLS transports hand out no socket.socket, but they do know the sockname.
        sockname = self._transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and sockname:
            return str(sockname[0]).split("%", 1)[0]
        return None

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
        self._transport.write(data)
        await self._proto.drain()

    def close(self) -> None:
        if self._proto.transport is not None and not self._proto.transport.is_closing():
            self._proto.transport.close()

    async def relay(
        self,
        relayer: Relayer,
        remote: socket.socket,
        to_remote: bytes,
        client_eof: bool,
        up: Limits = (),
        down: Limits = (),
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
        if up or down:
            return await relayer.relay_transports(transport, remote, to_remote=to_remote, up=up, down=down)
        return await relayer.relay_transports(transport, remote, to_remote=to_remote)


async def tls_handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, timeout: float
) -> TLSStream | None:
    """Run the TLS handshake on an accepted socket; None (socket closed) when it fails."""
    proto = _TLSProtocol()
    try:
        await loop.connect_accepted_socket(lambda: proto, sock, ssl=context, ssl_handshake_timeout=timeout)
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        log.debug("TLS handshake failed: %s", exc)
        sock.close()
        return None
    return TLSStream(loop, proto)


class ProxyHeaderReader:
    """Reads the PROXY protocol header at the start of an accepted (non-blocking) socket.

    With ``peek`` (a TLS listener, whose handshake must find the ClientHello untouched in the
    socket) the bytes are looked at with MSG_PEEK and exactly the header is consumed, as in
    proxy-protocol.txt section 9; without it, one recv reads the header and whatever follows,
    which is handed on to the SOCKS handshake. While the header is incomplete, every byte
    received belongs to it and is consumed, so readiness always means new bytes (no busy
    loop). At most `MAX_V2_LENGTH` bytes are held.

    `read_now` tries without waiting (a balancer writes the header at once, so it is usually
    there): no timer or reader is set up then, which would cost syscalls per connection
    (Python 3.11's ``asyncio.timeout`` calls getpid()); `read` waits, bounded by the caller.
    Both return ``(header, the bytes after it already read)`` (empty with ``peek``) and
    raise ProxyHeaderError (not a valid header, `parse_proxy_header`), EOFError (the
    connection ended first) or OSError.
    """

    __slots__ = ("_buffer", "_flags", "_loop", "_sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, *, peek: bool) -> None:
        self._loop = loop
        self._sock = sock
        self._flags = socket.MSG_PEEK if peek else 0
        self._buffer = b""

    def read_now(self) -> tuple[ProxyHeader, bytes] | None:
        """The header, or None when the socket has no more bytes yet."""
        sock, peek = self._sock, self._flags != 0
        while True:
            try:
                # parse_proxy_header asked for more, so the header is longer than the buffer
                # and at most MAX_V2_LENGTH (v1 lines end within 107 bytes): never 0 bytes.
                chunk = sock.recv(MAX_V2_LENGTH - len(self._buffer), self._flags)
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise EOFError("the connection ended before a whole PROXY header")
            data = self._buffer + chunk
            header = parse_proxy_header(data)
            if header is None:
                if peek:
                    _consume(sock, len(chunk))  # all of it is header: peeking again would spin
                self._buffer = data
                continue
            if peek:
                _consume(sock, header.length - len(self._buffer))
                return header, b""
            return header, data[header.length :]

    async def read(self) -> tuple[ProxyHeader, bytes]:
        """The header, waiting for the bytes (bound it with ``asyncio.timeout``)."""
        while True:
            got = self.read_now()
            if got is not None:
                return got
            await _readable(self._loop, self._sock)


def _consume(sock: socket.socket, count: int) -> None:
    # The bytes were just peeked, so they are in the socket's buffer: recv returns them now.
    while count > 0:
        taken = sock.recv(count)
        if not taken:
            raise EOFError("the connection ended inside the PROXY header")
        count -= len(taken)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)
