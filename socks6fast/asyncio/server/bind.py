"""BIND on real sockets: listening sockets, the listeners a session keeps, waiting for the peer.

Strategy: the core (`socks6fast.proto.server`) decides what to listen on and what the replies
say; this module opens the socket (`open_listener`), keeps a session's backlog listener
accepting into a bounded queue (`BacklogListener`), and waits for the remote host while
watching the client (`wait_for_peer`, `hold_backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from ...constants import AddressType
from ...net.stackopts import apply_leg_options, enable_tfo_listener, new_stream_socket
from ...proto.actions import Listen
from ...proto.server import ServerConnection, Socks5ServerConnection
from ...proto.sessions import Session
from ...proto.stack import AppliedLeg
from .streams import ClientStream

__all__ = [
    "BacklogListener",
    "ClientGone",
    "PeerListener",
    "close_session_listeners",
    "hold_backlog",
    "listen_address",
    "open_listener",
    "wait_for_peer",
]


class ClientGone(Exception):
    """The client closed the connection while we waited for the remote host."""


class PeerListener:
    """One BIND's own listening socket: it accepts one connection, then closes (CMD-04)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, *, mptcp: bool) -> None:
        self.sock = sock
        self.mptcp = mptcp
        """The listener is an MPTCP socket."""
        self._loop = loop

    def accept(self) -> Awaitable[tuple[socket.socket, Any]]:
        return self._loop.sock_accept(self.sock)

    def close(self) -> None:
        self.sock.close()


class BacklogListener:
    """A BIND listening socket with a backlog, kept in its session while the BIND that opened
    it stays connected (CMD-05).

    Accepted connections wait in a queue of at most ``backlog`` entries until a further BIND
    of the same session claims one. The listener is in ``session.listeners`` (under its bound
    address) exactly while it is open: `close` takes it out again.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        backlog: int,
        *,
        tfo: bool,
        mptcp: bool,
        session: Session,
    ) -> None:
        self.sock = sock
        self.backlog = backlog
        self.tfo = tfo
        """The listener accepts TFO (the BIND that opened it carried a TFO option)."""
        self.mptcp = mptcp
        """The listener is an MPTCP socket (accepts MPTCP connections)."""
        self.queue: asyncio.Queue[tuple[socket.socket, tuple[str, int]]] = asyncio.Queue(backlog)
        self.closed = False
        self.ended: asyncio.Future[None] = loop.create_future()
        """Done once the listener is closed (its session ended, or its first connection did)."""
        self._loop = loop
        self._session = session
        self._key = _sockname(sock)
        session.listeners[self._key] = self
        self._task = loop.create_task(self._accept_loop())

    def accept(self) -> Awaitable[tuple[socket.socket, tuple[str, int]]]:
        """The next accepted connection (a further BIND of the session claims it)."""
        return self.queue.get()

    async def _accept_loop(self) -> None:
        while True:
            conn, addr = await self._loop.sock_accept(self.sock)
            await self.queue.put((conn, (str(addr[0]), int(addr[1]))))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._session.listeners.get(self._key) is self:
            del self._session.listeners[self._key]
        if not self.ended.done():
            self.ended.set_result(None)
        self._task.cancel()
        self.sock.close()
        while not self.queue.empty():
            conn, _ = self.queue.get_nowait()
            conn.close()


def close_session_listeners(session: Session) -> None:
    """Close the BIND listeners an ended session kept (Session Teardown, expiry; CMD-05)."""
    for listener in list(session.listeners.values()):
        if isinstance(listener, BacklogListener):
            listener.close()
    session.listeners.clear()


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


def listen_address(stream: ClientStream, action: Listen) -> tuple[AddressType, str]:
    """Where to bind: the action's address, or with ``near_client`` the local address the
    client reached us at, in that address's family (when the client leg has a socket)."""
    address_type, host = action.address_type, action.host
    if not action.near_client or stream.sock is None:
        return address_type, host
    with contextlib.suppress(OSError):
        local = ipaddress.ip_address(str(stream.sock.getsockname()[0]).split("%", 1)[0])
        if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
            local = local.ipv4_mapped  # a dual-stack listener reached over IPv4
        return (AddressType.IPV6 if local.version == 6 else AddressType.IPV4), str(local)
    return address_type, host


def open_listener(
    address_type: AddressType, host: str, action: Listen
) -> tuple[socket.socket, AppliedLeg | None, bool]:
    """Bind ``host`` (see `listen_address`) and listen as ``action`` says.

    Returns:
        ``(sock, options read back or None, is an MPTCP socket)``.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if address_type == AddressType.IPV6 else socket.AF_INET
    sock, is_mptcp = new_stream_socket(family, action.multipath)
    try:
        applied = None if action.options.empty else apply_leg_options(sock, action.options)
        sock.bind((host, action.port))
        if action.tfo:
            enable_tfo_listener(sock)
        sock.listen(max(action.backlog, 1))
    except BaseException:
        sock.close()
        raise
    return sock, applied, is_mptcp


async def wait_for_peer(
    loop: asyncio.AbstractEventLoop,
    stream: ClientStream,
    conn: ServerConnection | Socks5ServerConnection,
    accept: Awaitable[tuple[socket.socket, Any]],
    timeout: float,
) -> tuple[socket.socket, tuple[str, int]]:
    """Wait for the remote host to connect, while noticing the client going away; what the
    client sends meanwhile goes to ``conn`` (relayed later, in order).

    Raises:
        ClientGone: the client closed the connection first.
        TimeoutError: nobody connected within ``timeout`` (``server.idle_timeout``; the
            message says so, for the log).
    """
    accept_task = asyncio.ensure_future(accept)
    watch: asyncio.Future[bytes] | None = None
    try:
        async with _timeout_saying(timeout, f"no host connected within {timeout:g}s (server.idle_timeout)"):
            while True:
                if watch is None:
                    watch = loop.create_task(stream.recv())
                waiting: set[asyncio.Future[Any]] = {accept_task, watch}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if accept_task in done:
                    peer, address = accept_task.result()
                    return peer, (str(address[0]), int(address[1]))
                data = watch.result()
                watch = None
                if not data:
                    raise ClientGone()  # the client left before anyone connected
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


@contextlib.asynccontextmanager
async def _timeout_saying(delay: float, message: str) -> AsyncIterator[None]:
    """``asyncio.timeout(delay)`` whose TimeoutError says what timed out (the access log's cause)."""
    try:
        async with asyncio.timeout(delay):
            yield
    except TimeoutError:
        raise TimeoutError(message) from None


async def hold_backlog(
    loop: asyncio.AbstractEventLoop, stream: ClientStream, listener: BacklogListener
) -> None:
    """Read and drop what the initial connection sends until it ends or the listener closes."""
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
