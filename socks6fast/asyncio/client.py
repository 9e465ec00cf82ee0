"""asyncio SOCKS 6 client: `open_connection`, `open_bind`, `Proxy` and `Session`.

Quick start::

    import socks6fast.asyncio as s6

    reader, writer = await s6.open_connection(
        "socks6://alice:s3cret@proxy.example:1080", "example.com", 80,
        initial_data=b"GET / HTTP/1.0\\r\\nHost: example.com\\r\\n\\r\\n",
    )
    reply = writer.get_extra_info("socks6_reply")      # the Operation Reply
    print(await reader.read())

One flight: the Request, the 0-RTT credentials (an Authentication Data option carrying the
RFC 1929 request) and ``initial_data`` leave in a single write, before any reply (draft-11
section "False Starts", CMD-03). With ``tfo=True`` that write also rides in the TCP SYN
where the draft allows it (TRN-02, see `socks6fast.proto.client.tfo_syn_may_carry_data`).

TLS, two independent layers:

* ``socks6+tls://`` runs the SOCKS exchange over TLS to the proxy (TRN-03). Certificates
  are verified by default (``ssl.create_default_context()``: CERT_REQUIRED and host name
  check against the URL's host, or ``proxy_server_hostname``). Pass ``proxy_ssl=`` an
  ``ssl.SSLContext`` to trust a private CA or pin a certificate; verification is off only
  if *you* build a context with ``check_hostname = False`` and ``verify_mode =
  ssl.CERT_NONE``. ``proxy_ssl=False`` is refused: write ``socks6://`` for plaintext. TLS
  early data is never used (TRN-04; Python's ``ssl`` cannot send it).
* ``ssl=`` is TLS to the *destination*, inside the tunnel, with the meaning it has in
  ``asyncio.open_connection``: None/False plaintext, True a default verifying context,
  or your ``ssl.SSLContext``; ``server_hostname`` defaults to ``dest_host``.

Errors: `socks6fast.ProxyError` (``.reply_code`` is the `socks6fast.ReplyCode` the proxy
sent), `socks6fast.AuthenticationError`, `socks6fast.VersionMismatchError`,
`socks6fast.RemoteProtocolError` (the proxy broke the protocol), ``TimeoutError``
(``timeout`` covers connecting, TLS and the SOCKS handshake), and ``OSError`` subclasses
for the network (e.g. ``ConnectionRefusedError``, ``ssl.SSLCertVerificationError``). A
proxy that resets the connection in the middle of a reply is judged like one that closes
it: ``VersionMismatchError`` after a lone byte 6 (REQ-02), else ``RemoteProtocolError``,
with the ``ConnectionResetError`` as ``__cause__`` (`socks6fast.proto.client.raise_reset`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

from ..client import DEFAULT_TIMEOUT
from ..constants import Command
from ..errors import AuthenticationError, Socks6Error
from ..net.tfo import enable_tfo_connect
from ..net.url import ProxyURL, parse_proxy_url, proxy_ssl_context
from ..proto.client import (
    NEED_DATA,
    ClientConnection,
    ClientSession,
    ClientState,
    SessionState,
    build_request,
    raise_reset,
    tfo_syn_may_carry_data,
)
from ..proto.messages import OperationReply, Option, SessionRequest, StackOption

__all__ = [
    "DEFAULT_TIMEOUT",
    "Binding",
    "Proxy",
    "Session",
    "StreamBinding",
    "open_bind",
    "open_connection",
]

SSLArg = _ssl.SSLContext | bool | None


def _dest_context(ssl: SSLArg) -> _ssl.SSLContext | None:
    if ssl is None or ssl is False:
        return None
    if ssl is True:
        return _ssl.create_default_context()
    return ssl


async def _open_tcp_socket(
    host: str, port: int, *, tfo: bool = False, loop: asyncio.AbstractEventLoop | None = None
) -> socket.socket:
    """Connect a non-blocking TCP socket (TCP_NODELAY; TCP_FASTOPEN_CONNECT if ``tfo``).

    See `socks6fast.net.tfo.enable_tfo_connect` for what ``tfo`` does.
    """
    loop = loop or asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    last: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tfo:
                enable_tfo_connect(sock)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"cannot resolve {host!r}")


# --- Channels: the handshake reads exactly what the reply still needs -----------------


class _Channel(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Channel)


class _SocketChannel:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self._loop = loop

    async def write(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def read(self, n: int) -> bytes:
        return await self._loop.sock_recv(self.sock, n)

    def close(self) -> None:
        self.sock.close()


class _StreamChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: Socks6StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    def close(self) -> None:
        self.writer.close()


class Socks6StreamWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` whose ``get_extra_info`` also answers SOCKS 6 keys.

    Keys: ``"socks6_reply"`` (the `OperationReply`: bind address and port, echoed Stack
    options), ``"socks6_peer_reply"`` (BIND: the second Operation Reply),
    ``"socks6_auth_replies"`` (list of `AuthReply`) and ``"socks6_connection"`` (the
    sans-IO `ClientConnection`, with everything else).
    """

    _socks6_conn: ClientConnection | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport extra info, plus the SOCKS 6 keys listed on the class."""
        conn = self._socks6_conn
        if conn is not None:
            if name == "socks6_reply":
                return conn.operation_reply
            if name == "socks6_peer_reply":
                return conn.peer_reply
            if name == "socks6_auth_replies":
                return list(conn.auth_replies)
            if name == "socks6_connection":
                return conn
        return super().get_extra_info(name, default)


async def _drive(channel: _Channel, conn: ClientConnection, stop: frozenset[ClientState]) -> OperationReply:
    # The adapter loop of socks6fast.proto.client's module docstring.
    while True:
        event = conn.next_event()
        out = conn.data_to_send()
        if out:
            try:
                await channel.write(out)
            except (BrokenPipeError, ConnectionResetError):
                # The proxy is gone. What it sent before (a refusal) is still to be read,
                # and the read ends at once, in a typed error (raise_reset).
                pass
        if event is NEED_DATA:
            try:
                data = await channel.read(conn.bytes_needed)
            except ConnectionResetError as exc:
                raise_reset(conn, exc)
            conn.receive_data(data)
        elif isinstance(event, OperationReply) and conn.state in stop:
            return event


_FIRST_REPLY: Final = frozenset(
    {ClientState.ESTABLISHED, ClientState.MUST_CLOSE, ClientState.AWAIT_BIND_PEER}
)
_PEER_REPLY: Final = frozenset({ClientState.ESTABLISHED})


# --- Proxy -------------------------------------------------------------------------------


class Proxy:
    """A SOCKS 6 proxy, python-socks style (asyncio flavour).

    Example::

        proxy = Proxy.from_url("socks6://alice:s3cret@127.0.0.1:1080")
        sock = await proxy.connect("example.com", 80, initial_data=b"GET / HTTP/1.0\\r\\n\\r\\n")
        data = await asyncio.get_running_loop().sock_recv(sock, 65536)

    ``connect`` returns a connected non-blocking socket (for ``loop.sock_*`` or
    ``asyncio.open_connection(sock=...)``); it needs a plaintext ``socks6://`` proxy,
    since a TLS session cannot leave asyncio's transport. `open_connection` works with
    both schemes.

    Args:
        url: the parsed proxy URL.
        proxy_ssl: TLS context for ``socks6+tls`` (None: verifying default context).
        proxy_server_hostname: name to verify the proxy certificate against (default:
            the URL's host).
    """

    def __init__(
        self,
        url: ProxyURL,
        *,
        proxy_ssl: _ssl.SSLContext | bool | None = None,
        proxy_server_hostname: str | None = None,
    ) -> None:
        self.url = url
        """The parsed URL."""
        self.ssl_context = proxy_ssl_context(url, proxy_ssl)
        """The TLS context used towards the proxy (None for socks6://)."""
        self.server_hostname = proxy_server_hostname or url.host
        """Name the proxy certificate is checked against."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        proxy_ssl: _ssl.SSLContext | bool | None = None,
        proxy_server_hostname: str | None = None,
    ) -> Proxy:
        """Make a Proxy from ``socks6://[user[:pass]@]host[:port]`` or ``socks6+tls://...``.

        Raises:
            ValueError: bad URL (see `socks6fast.net.url.parse_proxy_url`) or TLS arguments.
        """
        return cls(parse_proxy_url(url), proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname)

    def __repr__(self) -> str:
        scheme = "socks6+tls" if self.url.tls else "socks6"
        return f"<Proxy {scheme}://{self.url.host}:{self.url.port}>"

    # -- plumbing

    async def _open_stream_channel(self, tfo: bool, limit: int) -> _StreamChannel:
        loop = asyncio.get_running_loop()
        sock = await _open_tcp_socket(self.url.host, self.url.port, tfo=tfo, loop=loop)
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol,
                sock=sock,
                ssl=self.ssl_context,
                server_hostname=self.server_hostname if self.ssl_context else None,
            )
        except BaseException:
            sock.close()
            raise
        return _StreamChannel(reader, Socks6StreamWriter(transport, protocol, reader, loop))

    async def _open_plain_stream_channel(self, tfo: bool) -> _StreamChannel:
        return await self._open_stream_channel(tfo, 2**16)

    async def _open_socket_channel(self, tfo: bool) -> _SocketChannel:
        if self.url.tls:
            raise ValueError("a socks6+tls:// proxy gives streams, not a socket: use open_connection()")
        loop = asyncio.get_running_loop()
        return _SocketChannel(await _open_tcp_socket(self.url.host, self.url.port, tfo=tfo, loop=loop), loop)

    async def _request(
        self,
        channel_factory: Callable[[bool], Awaitable[_C]],
        command: Command,
        host: str,
        port: int,
        *,
        initial_data: bytes,
        stack_options: Iterable[Option],
        session: Session | None,
        idempotent: bool,
        tfo: bool,
    ) -> tuple[_C, ClientConnection, OperationReply]:
        if session is not None and session.proxy.url != self.url:
            raise ValueError("the session belongs to another proxy")
        if idempotent and session is None:
            raise ValueError("idempotent=True needs a session (idempotence tokens live in sessions)")
        # Session Invalid means the proxy did not act on the request: retrying once in a
        # fresh session is safe.
        attempts = 2 if session is not None else 1
        for attempt in range(attempts):
            session_options = await session._begin(idempotent) if session is not None else ()
            initiator = any(isinstance(o, SessionRequest) for o in session_options)
            core = session.core if session is not None else None
            credentials = self.url.credentials if core is None or core.needs_credentials else None
            request = build_request(
                command,
                host,
                port,
                credentials=credentials,
                initial_data_length=len(initial_data),
                options=(*session_options, *stack_options),
            )
            conn = ClientConnection(session=core, credentials=credentials)
            channel: _C | None = None
            try:
                channel = await channel_factory(tfo)
                flight = conn.send(request, initial_data)
                spends = conn.spends_token
                split = tfo and not self.url.tls and not tfo_syn_may_carry_data(spends_token=spends)
                try:
                    if split:
                        # TRN-02: only the Request rides in the SYN; the data follows it.
                        await channel.write(flight[: conn.request_size])
                        flight = flight[conn.request_size :]
                    if flight:
                        await channel.write(flight)
                except (BrokenPipeError, ConnectionResetError):
                    # The proxy answered and closed while a long first flight (false-start
                    # data) was still going out, so its close became a reset: as in
                    # `_drive`, read what it sent (a Version Mismatch Reply, REQ-02, or a
                    # refusal) and let the core judge it; the end gives a typed error.
                    pass
                reply = await _drive(channel, conn, _FIRST_REPLY)
            except AuthenticationError:
                if channel is not None:
                    channel.close()
                if conn.session_invalid and attempt + 1 < attempts:
                    continue
                raise
            except BaseException:
                if channel is not None:
                    channel.close()
                raise
            finally:
                if session is not None:
                    session._end(initiator)
            if conn.state is ClientState.MUST_CLOSE:
                channel.close()  # REQ-10: NOOP answered
            return channel, conn, reply
        raise AssertionError("unreachable")  # pragma: no cover

    # -- public API

    async def connect(
        self,
        dest_host: str,
        dest_port: int,
        *,
        initial_data: bytes = b"",
        stack_options: Iterable[StackOption] = (),
        session: Session | None = None,
        idempotent: bool = False,
        tfo: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> socket.socket:
        """CONNECT through the proxy and return the connected non-blocking socket.

        Args:
            dest_host: IP literal or name (the proxy resolves names).
            dest_port: destination port.
            initial_data: first application bytes, sent in the same write as the Request.
            stack_options: Stack options from `socks6fast.proto.messages` (the echoed ones are in
                the reply; use `connect_tunnel` to see it).
            session: a `Session` of this proxy.
            idempotent: spend an idempotence token (needs ``session``, ``tokens > 0``).
            tfo: use TCP Fast Open to the proxy where TRN-02 allows it.
            timeout: seconds for connect + handshake (None: no limit).

        Raises:
            ProxyError: the proxy refused (``reply_code``); AuthenticationError,
            VersionMismatchError, RemoteProtocolError, TimeoutError, OSError.
        """
        sock, _ = await self.connect_tunnel(
            dest_host,
            dest_port,
            initial_data=initial_data,
            stack_options=stack_options,
            session=session,
            idempotent=idempotent,
            tfo=tfo,
            timeout=timeout,
        )
        return sock

    async def connect_tunnel(
        self,
        dest_host: str,
        dest_port: int,
        *,
        initial_data: bytes = b"",
        stack_options: Iterable[StackOption] = (),
        session: Session | None = None,
        idempotent: bool = False,
        tfo: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> tuple[socket.socket, ClientConnection]:
        """Like `connect`, but also return the `ClientConnection` (replies, options)."""
        async with asyncio.timeout(timeout):
            channel, conn, _ = await self._request(
                self._open_socket_channel,
                Command.CONNECT,
                dest_host,
                dest_port,
                initial_data=initial_data,
                stack_options=stack_options,
                session=session,
                idempotent=idempotent,
                tfo=tfo,
            )
        assert isinstance(channel, _SocketChannel)
        return channel.sock, conn

    async def open_connection(
        self,
        dest_host: str,
        dest_port: int,
        *,
        initial_data: bytes = b"",
        stack_options: Iterable[StackOption] = (),
        session: Session | None = None,
        idempotent: bool = False,
        tfo: bool = False,
        ssl: SSLArg = None,
        server_hostname: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        limit: int = 2**16,
    ) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """CONNECT through the proxy and return ``(reader, writer)``; see `open_connection`."""
        dest_ctx = _dest_context(ssl)

        async def factory(tfo: bool) -> _StreamChannel:
            return await self._open_stream_channel(tfo, limit)

        async with asyncio.timeout(timeout):
            channel, conn, _ = await self._request(
                factory,
                Command.CONNECT,
                dest_host,
                dest_port,
                initial_data=initial_data,
                stack_options=stack_options,
                session=session,
                idempotent=idempotent,
                tfo=tfo,
            )
            assert isinstance(channel, _StreamChannel)
            channel.writer._socks6_conn = conn
            if dest_ctx is not None:
                try:
                    await channel.writer.start_tls(dest_ctx, server_hostname=server_hostname or dest_host)
                except BaseException:
                    channel.close()
                    raise
        return channel.reader, channel.writer

    async def bind(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        stack_options: Iterable[StackOption] = (),
        session: Session | None = None,
        idempotent: bool = False,
        tfo: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Binding:
        """BIND: ask the proxy to listen; return once it says where (CMD-04).

        Example::

            binding = await proxy.bind()
            print("tell the peer to connect to", binding.address)
            sock = await binding.accept()          # second Operation Reply
            print("peer is", binding.peer_address)

        Args:
            address: desired bind address ("0.0.0.0" or "::": any).
            port: desired bind port (0: any).
            stack_options, session, idempotent, tfo, timeout: as for `connect`.

        Returns:
            A `Binding`; its socket becomes the data channel after `Binding.accept`.
        """
        async with asyncio.timeout(timeout):
            channel, conn, _ = await self._request(
                self._open_socket_channel,
                Command.BIND,
                address,
                port,
                initial_data=b"",
                stack_options=stack_options,
                session=session,
                idempotent=idempotent,
                tfo=tfo,
            )
        return Binding(channel, conn)

    async def open_bind(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        stack_options: Iterable[StackOption] = (),
        session: Session | None = None,
        idempotent: bool = False,
        tfo: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        limit: int = 2**16,
    ) -> StreamBinding:
        """BIND with streams (works over ``socks6+tls`` too); see `open_bind`."""

        async def factory(tfo: bool) -> _StreamChannel:
            return await self._open_stream_channel(tfo, limit)

        async with asyncio.timeout(timeout):
            channel, conn, _ = await self._request(
                factory,
                Command.BIND,
                address,
                port,
                initial_data=b"",
                stack_options=stack_options,
                session=session,
                idempotent=idempotent,
                tfo=tfo,
            )
        assert isinstance(channel, _StreamChannel)
        channel.writer._socks6_conn = conn
        return StreamBinding(channel, conn)

    async def noop(
        self,
        *,
        options: Iterable[Option] = (),
        session: Session | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ClientConnection:
        """Send a NOOP request (checks credentials; starts a session when given one).

        Returns:
            The finished `ClientConnection` (its ``operation_reply``, ``auth_replies``).
        """
        async with asyncio.timeout(timeout):
            _, conn, _ = await self._request(
                self._open_plain_stream_channel,
                Command.NOOP,
                "0.0.0.0",
                0,
                initial_data=b"",
                stack_options=options,
                session=session,
                idempotent=False,
                tfo=False,
            )
        return conn


# --- BIND ------------------------------------------------------------------------------


class _BindingBase:
    def __init__(self, channel: Any, conn: ClientConnection) -> None:
        self._channel = channel
        self.connection = conn
        """The sans-IO connection (all replies)."""

    @property
    def reply(self) -> OperationReply:
        """The first Operation Reply: where the proxy listens."""
        assert self.connection.operation_reply is not None
        return self.connection.operation_reply

    @property
    def address(self) -> tuple[str, int]:
        """``(bind address, bind port)`` the peer should connect to."""
        return self.reply.address, self.reply.port

    @property
    def peer_reply(self) -> OperationReply | None:
        """The second Operation Reply once a peer connected (else None)."""
        return self.connection.peer_reply

    @property
    def peer_address(self) -> tuple[str, int] | None:
        """``(address, port)`` of the connecting host, once known."""
        reply = self.connection.peer_reply
        return None if reply is None else (reply.address, reply.port)

    async def _wait_peer(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await _drive(self._channel, self.connection, _PEER_REPLY)
        except BaseException:
            self._channel.close()
            raise

    def close(self) -> None:
        """Stop waiting: close the connection to the proxy (the proxy stops listening)."""
        self._channel.close()


class Binding(_BindingBase):
    """A BIND in progress over a plain socket; see `Proxy.bind`."""

    async def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait for the second Operation Reply and return the socket, now the data channel.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        await self._wait_peer(timeout)
        assert isinstance(self._channel, _SocketChannel)
        return self._channel.sock


class StreamBinding(_BindingBase):
    """A BIND in progress over streams; see `open_bind`."""

    async def accept(self, timeout: float | None = None) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """Wait for the second Operation Reply and return ``(reader, writer)`` to the peer.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        await self._wait_peer(timeout)
        assert isinstance(self._channel, _StreamChannel)
        return self._channel.reader, self._channel.writer


# --- Sessions ----------------------------------------------------------------------------


class Session:
    """A SOCKS 6 session: authenticate once, then requests carry only the Session ID.

    The first request carries the Session Request (and the Token Request when
    ``tokens > 0``) together with the credentials; the Session ID comes back in either
    reply (D4) and later requests carry it instead of credentials. Requests issued while
    the first is in flight wait for it. ``idempotent=True`` spends the smallest unspent
    token (IDM-05); if no window is known yet, a NOOP establishes the session first. A
    Session Invalid answer (the proxy forgot the session) starts a new one and retries
    the request once, which is safe because the proxy did not act on it. Closing sends a
    NOOP with Session Teardown.

    Example::

        async with Session("socks6://alice:s3cret@127.0.0.1:1080", tokens=16) as session:
            r1, w1 = await session.open_connection("example.com", 80)
            r2, w2 = await session.open_connection("example.org", 80, idempotent=True)

    Args:
        proxy: proxy URL or `Proxy`.
        tokens: idempotence token window to request (0: none).
    """

    def __init__(self, proxy: str | Proxy, *, tokens: int = 0) -> None:
        self.proxy = Proxy.from_url(proxy) if isinstance(proxy, str) else proxy
        """The proxy this session lives on."""
        self.core = ClientSession(tokens=tokens)
        """The sans-IO bookkeeping (state, Session ID, token window)."""
        self._settled: asyncio.Event | None = None

    @property
    def session_id(self) -> bytes | None:
        """The Session ID, once granted."""
        return self.core.session_id

    async def _begin(self, idempotent: bool) -> tuple[Option, ...]:
        while True:
            state = self.core.state
            if state is SessionState.PENDING:
                assert self._settled is not None
                await self._settled.wait()
                continue
            if idempotent and state is SessionState.NEW:
                # A token needs a window, which needs an established session: NOOP first.
                await self.proxy.noop(session=self)
                if self.core.state is SessionState.DECLINED:
                    raise Socks6Error("the proxy declined the session: no idempotence tokens")
                continue
            if state is SessionState.NEW:
                self._settled = asyncio.Event()
            return self.core.request_options(idempotent=idempotent)

    def _end(self, initiator: bool) -> None:
        if initiator and self.core.state is SessionState.PENDING:
            # The initiating request ended before its Operation Reply (error, timeout).
            self.core.on_initiation_done(succeeded=False)
        if self.core.state is not SessionState.PENDING and self._settled is not None:
            self._settled.set()
            self._settled = None

    async def open_connection(
        self, dest_host: str, dest_port: int, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """`Proxy.open_connection` inside this session (same keyword arguments)."""
        return await self.proxy.open_connection(dest_host, dest_port, session=self, **kwargs)

    async def connect(self, dest_host: str, dest_port: int, **kwargs: Any) -> socket.socket:
        """`Proxy.connect` inside this session (same keyword arguments)."""
        return await self.proxy.connect(dest_host, dest_port, session=self, **kwargs)

    async def connect_tunnel(
        self, dest_host: str, dest_port: int, **kwargs: Any
    ) -> tuple[socket.socket, ClientConnection]:
        """`Proxy.connect_tunnel` inside this session (same keyword arguments)."""
        return await self.proxy.connect_tunnel(dest_host, dest_port, session=self, **kwargs)

    async def open_bind(self, address: str = "0.0.0.0", port: int = 0, **kwargs: Any) -> StreamBinding:
        """`Proxy.open_bind` inside this session (same keyword arguments)."""
        return await self.proxy.open_bind(address, port, session=self, **kwargs)

    async def bind(self, address: str = "0.0.0.0", port: int = 0, **kwargs: Any) -> Binding:
        """`Proxy.bind` inside this session (same keyword arguments)."""
        return await self.proxy.bind(address, port, session=self, **kwargs)

    async def aclose(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Tear the session down (NOOP + Session ID + Session Teardown) and forget it.

        The session is closed locally whatever happens; failures of the teardown
        exchange itself (the proxy may already have expired the session) are ignored.
        """
        options = self.core.teardown_options()
        if not options:
            return
        try:
            # SES-05: the teardown request is outside any session, so it carries the
            # credentials a proxy requiring authentication asks for.
            await self.proxy.noop(options=options, timeout=timeout)
        except (Socks6Error, OSError, TimeoutError):
            pass

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# --- Module-level helpers ------------------------------------------------------------------


def _proxy_for(
    proxy_url: str | None,
    session: Session | None,
    proxy_ssl: _ssl.SSLContext | bool | None,
    proxy_server_hostname: str | None,
) -> Proxy:
    if session is not None:
        if proxy_url is not None and parse_proxy_url(proxy_url) != session.proxy.url:
            raise ValueError("proxy_url and the session's proxy differ")
        return session.proxy
    if proxy_url is None:
        raise ValueError("give a proxy URL or a session")
    return Proxy.from_url(proxy_url, proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname)


async def open_connection(
    proxy_url: str | None,
    dest_host: str,
    dest_port: int,
    *,
    initial_data: bytes = b"",
    session: Session | None = None,
    ssl: SSLArg = None,
    server_hostname: str | None = None,
    proxy_ssl: _ssl.SSLContext | bool | None = None,
    proxy_server_hostname: str | None = None,
    stack_options: Iterable[StackOption] = (),
    idempotent: bool = False,
    tfo: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
    """Open a TCP connection to ``dest_host:dest_port`` through a SOCKS 6 proxy.

    Example::

        reader, writer = await open_connection(
            "socks6+tls://alice:s3cret@proxy.example:1080", "example.com", 443,
            ssl=True,                                    # TLS to example.com, verified
            initial_data=b"",                            # (TLS: nothing to send first)
        )
        reply = writer.get_extra_info("socks6_reply")   # OperationReply
        print(reply.address, reply.port, reply.options)

    Args:
        proxy_url: ``socks6://`` or ``socks6+tls://`` URL with optional ``user:pass@``;
            may be None when ``session`` is given.
        dest_host: IP literal or host name (the proxy resolves names; none are resolved
            locally).
        dest_port: destination port.
        initial_data: first application bytes; they go in the same write as the Request
            (false start). With credentials, up to 2^14 bytes are announced in the
            Authentication Method Advertisement; anything beyond follows the successful
            Authentication Reply.
        session: a `Session` (the request joins it).
        ssl: TLS to the destination, as in ``asyncio.open_connection``.
        server_hostname: name checked in the destination's certificate (default
            ``dest_host``).
        proxy_ssl: TLS context towards a ``socks6+tls`` proxy (default: verifying).
        proxy_server_hostname: name checked in the proxy's certificate (default: the
            URL's host).
        stack_options: Stack options (``socks6fast.proto.messages``); the proxy's answer is in
            ``writer.get_extra_info("socks6_reply").options``.
        idempotent: spend an idempotence token (needs ``session`` with ``tokens``).
        tfo: TCP Fast Open to the proxy where TRN-02 allows.
        timeout: seconds for connecting, TLS and the SOCKS handshake (None: no limit).
        limit: StreamReader buffer limit.

    Returns:
        ``(reader, writer)``; ``writer.get_extra_info`` knows ``"socks6_reply"``,
        ``"socks6_auth_replies"`` and ``"socks6_connection"``.

    Raises:
        ProxyError: the proxy refused; ``.reply_code`` says why (REQ-10).
        AuthenticationError: credentials rejected or no usable method (AUTH-03).
        VersionMismatchError: not a SOCKS 6 proxy (REQ-02).
        RemoteProtocolError: malformed replies.
        TimeoutError: ``timeout`` expired.
        OSError: network and TLS errors.
    """
    proxy = _proxy_for(proxy_url, session, proxy_ssl, proxy_server_hostname)
    return await proxy.open_connection(
        dest_host,
        dest_port,
        initial_data=initial_data,
        stack_options=stack_options,
        session=session,
        idempotent=idempotent,
        tfo=tfo,
        ssl=ssl,
        server_hostname=server_hostname,
        timeout=timeout,
        limit=limit,
    )


async def open_bind(
    proxy_url: str | None,
    address: str = "0.0.0.0",
    port: int = 0,
    *,
    session: Session | None = None,
    proxy_ssl: _ssl.SSLContext | bool | None = None,
    proxy_server_hostname: str | None = None,
    stack_options: Iterable[StackOption] = (),
    tfo: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> StreamBinding:
    """BIND through a SOCKS 6 proxy: the proxy listens, a peer connects to it.

    Example::

        binding = await open_bind("socks6://127.0.0.1:1080")
        host, port = binding.address                  # first Operation Reply
        reader, writer = await binding.accept()       # second one: a peer connected
        print("peer", binding.peer_address)

    Returns:
        A `StreamBinding` (``address``, ``reply``, ``accept()``, ``peer_address``).
    """
    proxy = _proxy_for(proxy_url, session, proxy_ssl, proxy_server_hostname)
    return await proxy.open_bind(
        address, port, stack_options=stack_options, session=session, tfo=tfo, timeout=timeout
    )
