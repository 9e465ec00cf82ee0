"""DTLS endpoints on the asyncio loop (issue 11): the I/O half of `socks6fast.net.dtls`.

- `start_dtls_server`: one UDP socket, every datagram into a `DTLSServerEndpoint`, its
  output sent with ``sendto``, its timer armed with ``loop.call_at``. Decrypted datagrams
  go to ``on_datagram(connection, payload)``; `DTLSServer.send` answers on a connection.
- `open_dtls_client`: a connected UDP socket to the proxy's DTLS port, the handshake with
  retransmissions and a timeout, then `DTLSClient.send` / `DTLSClient.recv`.

The proxy's DTLS ports (``socks6fast.asyncio.server.dtls``) and the SOCKS 6 client's
``transport="dtls"`` (UDP-02, UDP-03) are built on this layer.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import deque
from typing import Any

from OpenSSL import SSL

from ..net.dtls import (
    DEFAULT_MTU,
    DTLSClientConnection,
    DTLSConnection,
    DTLSCounters,
    DTLSError,
    DTLSLimits,
    DTLSServerEndpoint,
    OnClosed,
    OnConnection,
    OnDatagram,
    proxy_dtls_context,
)

__all__ = ["DTLSClient", "DTLSServer", "open_dtls_client", "start_dtls_server"]


class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DTLSServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._server._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket name no peer reliably; DTLS retransmits.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._closed.set()


class DTLSServer:
    """A DTLS port: the socket, the endpoint and its timer. Make it with `start_dtls_server`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: DTLSServerEndpoint) -> None:
        self._loop = loop
        self.endpoint = endpoint
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = asyncio.Event()

    @property
    def counters(self) -> DTLSCounters:
        return self.endpoint.counters

    @property
    def connections(self) -> dict[tuple[str, int], DTLSConnection]:
        return self.endpoint.connections

    def sockname(self) -> tuple[Any, ...]:
        assert self._transport is not None
        sockname: tuple[Any, ...] = self._transport.get_extra_info("sockname")
        return sockname

    def _received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        endpoint = self.endpoint
        endpoint.datagram_received(data, addr, self._loop.time())
        # The usual datagram (an application record) queues nothing and moves no timer.
        if endpoint.outgoing or endpoint.timer_changed:
            self._flush()

    def flush(self) -> None:
        """Send what the endpoint queued and re-arm its timer (after feeding
        ``endpoint.datagram_received`` a datagram another socket read: ``server.dtls``)."""
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        out = self.endpoint.datagrams_to_send()
        if out and transport is not None:
            for datagram, address in out:
                transport.sendto(datagram, address)
        self._arm()

    def _arm(self) -> None:
        if not self.endpoint.timer_changed and self._timer is not None:
            return
        at = self.endpoint.next_timer()
        if at is None or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.endpoint.handle_timer(self._loop.time())
        self._flush()

    def send(self, conn: DTLSConnection, payload: bytes) -> None:
        """Send one datagram on ``conn`` (raises as `DTLSServerEndpoint.send`)."""
        datagram = self.endpoint.send(conn, payload)
        if self._transport is not None:
            self._transport.sendto(datagram, conn.address)

    def close_connection(self, conn: DTLSConnection) -> None:
        """Close one connection with a close_notify."""
        self.endpoint.close(conn)
        self._flush()

    def close(self) -> None:
        """Close every connection (close_notify each) and the socket."""
        for conn in list(self.endpoint.connections.values()):
            self.endpoint.close(conn)
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()  # connection_lost sets _closed once the socket is closed
            self._transport = None
        else:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after `close`)."""
        await self._closed.wait()


async def start_dtls_server(
    host: str,
    port: int,
    context: SSL.Context,
    *,
    on_datagram: OnDatagram,
    on_established: OnConnection | None = None,
    on_closed: OnClosed | None = None,
    limits: DTLSLimits | None = None,
    sock: socket.socket | None = None,
) -> DTLSServer:
    """Open a DTLS port on ``host``:``port`` (0: any free port) with ``context`` (from
    `socks6fast.net.dtls.dtls_server_context`, unused). ``on_datagram(connection, payload)``
    gets each decrypted datagram; answer with `DTLSServer.send`. ``sock``: a UDP socket
    bound already (``host`` and ``port`` are then ignored), e.g. with SO_REUSEADDR so that
    connected sockets can share its port (the proxy's hand-off to the UDP engine)."""
    loop = asyncio.get_running_loop()
    server = DTLSServer(
        loop,
        DTLSServerEndpoint(
            context,
            on_datagram=on_datagram,
            on_established=on_established,
            on_closed=on_closed,
            limits=limits,
        ),
    )
    if sock is not None:
        transport, _ = await loop.create_datagram_endpoint(lambda: _ServerProtocol(server), sock=sock)
    else:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ServerProtocol(server), local_addr=(host, port)
        )
    server._transport = transport
    return server


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: DTLSClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._client._received(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected socket this is the proxy's ICMP answer (port unreachable: refused).
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self._client._failed(DTLSError(f"DTLS proxy {self._client.peer}: {reason}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._closed.set()
        self._client._failed(DTLSError("the DTLS socket was closed"))


class DTLSClient:
    """A DTLS connection to the proxy over a connected UDP socket. Make it with
    `open_dtls_client`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: DTLSClientConnection, peer: str) -> None:
        self._loop = loop
        self.conn = conn
        self.peer = peer
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self.received: deque[bytes] = conn.received
        self._closed = asyncio.Event()

    def _received(self, data: bytes) -> None:
        conn = self.conn
        was_established = conn.established
        conn.datagram_received(data, self._loop.time())
        self._flush()
        if conn.error is not None:
            self._failed(conn.error)
            return
        if conn.established and not was_established and not self._ready.done():
            self._ready.set_result(None)
        if conn.received and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _failed(self, error: DTLSError) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: the handshake await raises it
        if self.conn.error is None:
            self.conn.error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _flush(self) -> None:
        if self._transport is not None:
            for datagram in self.conn.datagrams_to_send():
                self._transport.sendto(datagram)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.conn.retransmit_at
        if at is not None:
            self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.conn.handle_timer(self._loop.time())
        self._flush()
        if self.conn.error is not None:
            self._failed(self.conn.error)

    def send(self, payload: bytes) -> None:
        """Send one datagram (raises as `DTLSClientConnection.send`)."""
        datagram = self.conn.send(payload)
        if self._transport is not None:
            self._transport.sendto(datagram)

    async def recv(self) -> bytes:
        """The next datagram from the proxy.

        Raises:
            DTLSError: the connection failed or the proxy closed it.
        """
        while not self.received:
            if self.conn.error is not None:
                raise self.conn.error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.received.popleft()

    def close(self) -> None:
        """Send a close_notify and close the socket."""
        self.conn.close()
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()  # connection_lost sets _closed once the socket is closed
            self._transport = None
        else:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after `close`)."""
        await self._closed.wait()

    async def __aenter__(self) -> DTLSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def open_dtls_client(
    host: str,
    port: int,
    *,
    proxy_dtls: SSL.Context | bool | None = None,
    proxy_server_hostname: str | None = None,
    timeout: float | None = 10.0,
    mtu: int = DEFAULT_MTU,
) -> DTLSClient:
    """Connect to a DTLS port and finish the handshake.

    ``proxy_dtls`` is the DTLS counterpart of the TLS client's ``proxy_ssl``: None (or True)
    is a verifying context with the system's CAs (TRN-03); pass
    `socks6fast.net.dtls.dtls_client_context` (``cafile=`` a private CA, a client
    certificate) or your own ``OpenSSL.SSL.Context``; False is refused. The certificate must
    name ``proxy_server_hostname`` (default ``host``).

    Raises:
        DTLSError: the handshake failed (the message says why, e.g. the certificate).
        TimeoutError: no handshake within ``timeout`` seconds.
        ValueError: ``proxy_dtls=False``.
    """
    context = proxy_dtls_context(proxy_dtls)
    loop = asyncio.get_running_loop()
    conn = DTLSClientConnection(context, proxy_server_hostname or host, mtu=mtu)
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    client = DTLSClient(loop, conn, peer)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _ClientProtocol(client), remote_addr=(host, port)
    )
    client._transport = transport
    try:
        async with asyncio.timeout(timeout):
            conn.start(loop.time())
            client._flush()
            await client._ready
    except TimeoutError:
        client.close()
        await client.wait_closed()
        raise TimeoutError(f"DTLS handshake with {peer}: no answer within {timeout} s") from None
    except BaseException:
        client.close()
        await asyncio.shield(client.wait_closed())
        raise
    return client
