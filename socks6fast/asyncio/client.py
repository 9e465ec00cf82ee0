"""asyncio SOCKS 6 client: `open_connection`, `open_bind`, `udp_associate`, `Proxy` and `Session`.

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

UDP ASSOCIATE: `udp_associate` returns a `UDPAssociation` (``sendto``, ``recvfrom``); the
datagrams travel as plain UDP to the proxy's UDP port, over DTLS to its DTLS port (the
``socks6+tls`` default, D30) or framed on the TCP (TLS) connection;
ICMP error reports (``udp_error=True``) are raised as `socks6fast.errors.ICMPError`
subclasses; ``server_mode=True`` lets remote hosts send first (see `udp_associate`).

`Proxy`, `Session` and `Binding` have the blocking flavour's (``socks6fast.client``) names,
keyword arguments (`ConnectOptions`, `RequestOptions`, the same in both flavours) and
return shapes, plus the stream methods. What a request does is decided once, in
``socks6fast.proto.client_flow``; this module only performs its actions on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar, Unpack

from .._client_base import (
    DEFAULT_TIMEOUT,
    AssociationBase,
    BindingBase,
    ConnectOptions,
    ProxyBase,
    RequestOptions,
    SessionBase,
    UDPAssociateOptions,
    new_association,
)
from ..errors import AssociationClosedError, Socks6Error
from ..net.tfo import enable_tfo_connect
from ..net.url import parse_proxy_url
from ..proto.client import ClientConnection
from ..proto.client_flow import (
    Action,
    AwaitSession,
    Close,
    Flow,
    Open,
    Read,
    SessionSettled,
    Steps,
    Write,
    accept,
    association_init,
)
from ..proto.client_udp import AssociationEnded, ClientAssociation, icmp_error
from ..proto.messages import AssociationConfirmation, Datagram, DatagramError, Option, StackOption
from ..proto.states import NEED_DATA

if TYPE_CHECKING:
    from .dtls import DTLSClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "Binding",
    "ConnectOptions",
    "Proxy",
    "RequestOptions",
    "Session",
    "StreamBinding",
    "UDPAssociateOptions",
    "UDPAssociation",
    "open_bind",
    "open_connection",
    "udp_associate",
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


CH = TypeVar("CH", bound=_Channel)
T = TypeVar("T")


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


class _Performer(Generic[CH]):
    """Performs a flow's actions (socks6fast.proto.client_flow) on the event loop.

    A timeout cancels the await in progress: the CancelledError goes into the flow, which
    closes its channel and re-raises it.
    """

    def __init__(
        self, open_channel: Callable[[bool], Awaitable[CH]] | None = None, session: Session | None = None
    ) -> None:
        self._open_channel = open_channel
        self._session = session

    async def run(self, flow: Flow[CH, T]) -> T:
        steps = Steps(flow)
        for action in steps:
            try:
                steps.result = await self._perform(action)
            except BaseException as exc:
                steps.error = exc
        return steps.value

    async def _perform(self, action: Action[CH]) -> object:
        match action:
            case Read(channel, size):
                return await channel.read(size)
            case Write(channel, data):
                await channel.write(data)
            case Open(tfo):
                assert self._open_channel is not None
                return await self._open_channel(tfo)
            case Close(channel):
                channel.close()
            case AwaitSession():
                assert self._session is not None
                await self._session._wait_settled()
            case SessionSettled():
                assert self._session is not None
                self._session._notify_settled()
        return None


# --- Proxy -------------------------------------------------------------------------------


class Proxy(ProxyBase):
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

    # -- channels

    async def _open_stream_channel(self, tfo: bool, limit: int = 2**16) -> _StreamChannel:
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

    async def _open_socket_channel(self, tfo: bool) -> _SocketChannel:
        if self.url.tls:
            raise ValueError("a socks6+tls:// proxy gives streams, not a socket: use open_connection()")
        loop = asyncio.get_running_loop()
        return _SocketChannel(await _open_tcp_socket(self.url.host, self.url.port, tfo=tfo, loop=loop), loop)

    # -- public API

    async def connect(
        self,
        dest_host: str,
        dest_port: int,
        *,
        session: Session | None = None,
        **kwargs: Unpack[ConnectOptions],
    ) -> socket.socket:
        """CONNECT through the proxy; return the connected non-blocking socket.

        Arguments and errors: see `ProxyBase`. A ``socks6+tls`` proxy raises ValueError
        (use `open_connection`); the proxy's answer to ``stack_options`` is in the reply
        `connect_tunnel` returns.
        """
        return (await self.connect_tunnel(dest_host, dest_port, session=session, **kwargs))[0]

    async def connect_tunnel(
        self,
        dest_host: str,
        dest_port: int,
        *,
        session: Session | None = None,
        **kwargs: Unpack[ConnectOptions],
    ) -> tuple[socket.socket, ClientConnection]:
        """Like `connect`, but also return the `ClientConnection` (replies, echoed options)."""
        async with asyncio.timeout(kwargs.get("timeout", DEFAULT_TIMEOUT)):
            performer = _Performer(self._open_socket_channel, session)
            channel, conn = await performer.run(self._connect_flow(dest_host, dest_port, session, kwargs))
        return channel.sock, conn

    async def open_connection(
        self,
        dest_host: str,
        dest_port: int,
        *,
        session: Session | None = None,
        ssl: SSLArg = None,
        server_hostname: str | None = None,
        limit: int = 2**16,
        **kwargs: Unpack[ConnectOptions],
    ) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """CONNECT through the proxy and return ``(reader, writer)``; see `open_connection`."""
        dest_ctx = _dest_context(ssl)
        async with asyncio.timeout(kwargs.get("timeout", DEFAULT_TIMEOUT)):
            performer = _Performer(lambda tfo: self._open_stream_channel(tfo, limit), session)
            channel, conn = await performer.run(self._connect_flow(dest_host, dest_port, session, kwargs))
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
        session: Session | None = None,
        **kwargs: Unpack[RequestOptions],
    ) -> Binding:
        """BIND: ask the proxy to listen; return once it says where (CMD-04).

        Example::

            binding = await proxy.bind()
            print("tell the peer to connect to", binding.address)
            sock = await binding.accept()          # second Operation Reply
            print("peer is", binding.peer_address)

        Returns:
            A `Binding`; its socket becomes the data channel after `Binding.accept`.
        """
        async with asyncio.timeout(kwargs.get("timeout", DEFAULT_TIMEOUT)):
            performer = _Performer(self._open_socket_channel, session)
            return Binding(*await performer.run(self._bind_flow(address, port, session, kwargs)))

    async def open_bind(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        session: Session | None = None,
        limit: int = 2**16,
        **kwargs: Unpack[RequestOptions],
    ) -> StreamBinding:
        """BIND with streams (works over ``socks6+tls`` too); see `open_bind`."""
        async with asyncio.timeout(kwargs.get("timeout", DEFAULT_TIMEOUT)):
            performer = _Performer(lambda tfo: self._open_stream_channel(tfo, limit), session)
            channel, conn = await performer.run(self._bind_flow(address, port, session, kwargs))
        channel.writer._socks6_conn = conn
        return StreamBinding(channel, conn)

    async def noop(
        self,
        *,
        options: Iterable[Option] = (),
        session: Session | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ClientConnection:
        """NOOP: check the credentials, or start ``session``; return the finished connection."""
        async with asyncio.timeout(timeout):
            performer = _Performer(self._open_stream_channel, session)
            _, conn = await performer.run(self._noop_flow(options, session))
        return conn

    async def udp_associate(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        session: Session | None = None,
        **kwargs: Unpack[UDPAssociateOptions],
    ) -> UDPAssociation:
        """UDP ASSOCIATE: relay UDP datagrams through the proxy; see `udp_associate`.

        ``address`` and ``port`` are the desired bind address and port of the proxy's
        socket towards remote hosts ("0.0.0.0" or "::" and 0: any).
        """
        core = new_association(kwargs, tls=self.url.tls)
        async with asyncio.timeout(kwargs.get("timeout", DEFAULT_TIMEOUT)):
            performer = _Performer(self._open_stream_channel, session)
            channel, conn = await performer.run(self._udp_flow(address, port, session, kwargs))
            await _Performer[_StreamChannel]().run(association_init(channel, conn, core))
            association = UDPAssociation(channel, conn, core, max_queue=kwargs.get("max_queue", 1024))
            try:
                await association._start(
                    kwargs.get("udp_port"),
                    proxy_dtls=kwargs.get("proxy_dtls"),
                    server_hostname=self.server_hostname,
                    timeout=kwargs.get("timeout", DEFAULT_TIMEOUT),
                )
                if kwargs.get("server_mode", False):
                    await association._confirm()
            except BaseException:
                await association.aclose()
                raise
        return association


# --- BIND ------------------------------------------------------------------------------


class _AsyncBinding(BindingBase[CH]):
    async def _wait_peer(self, timeout: float | None) -> None:
        async with asyncio.timeout(timeout):
            await _Performer[CH]().run(accept(self._channel, self.connection))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close_unless_accepted()


class Binding(_AsyncBinding[_SocketChannel]):
    """A BIND in progress over a plain socket; see `Proxy.bind`."""

    async def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait for the second Operation Reply and return the socket, now the data channel.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        await self._wait_peer(timeout)
        return self._channel.sock


class StreamBinding(_AsyncBinding[_StreamChannel]):
    """A BIND in progress over streams; see `open_bind`."""

    async def accept(self, timeout: float | None = None) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """Wait for the second Operation Reply and return ``(reader, writer)`` to the peer.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        await self._wait_peer(timeout)
        return self._channel.reader, self._channel.writer


# --- UDP ASSOCIATE -----------------------------------------------------------------------


class _UDPEndpoint(asyncio.DatagramProtocol):
    """The plain-UDP side of an association: datagrams from the proxy's UDP port."""

    def __init__(self, association: UDPAssociation) -> None:
        self._association = association

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._association._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error about the proxy's UDP port itself (connected socket): typically
        # ConnectionRefusedError, no UDP port there. The next recvfrom raises it.
        self._association._push(exc)


class UDPAssociation(AssociationBase[_StreamChannel]):
    """A UDP association through the proxy (asyncio flavour); see `Proxy.udp_associate`.

    Example::

        async with await proxy.udp_associate(transport="udp") as assoc:
            await assoc.sendto(b"ping", ("127.0.0.1", 9999))
            data, (host, port) = await assoc.recvfrom(timeout=5)

    One task reads the TCP connection (Association Confirmation, and with
    ``transport="tcp"`` the datagrams and Error messages); with ``transport="udp"`` a
    connected UDP socket talks to the proxy's UDP port; with ``transport="dtls"`` a DTLS
    connection (``socks6fast.asyncio.dtls``) to its DTLS port, and a second task reads it.
    Received datagrams wait in a queue of ``max_queue``. The association ends when the TCP
    connection does.
    """

    def __init__(
        self,
        channel: _StreamChannel,
        conn: ClientConnection,
        core: ClientAssociation,
        *,
        max_queue: int = 1024,
    ) -> None:
        super().__init__(channel, conn, core)
        self._loop = asyncio.get_running_loop()
        self._inbox: deque[Datagram | DatagramError | Exception] = deque()
        self._max_queue = max(1, max_queue)
        self._wakeup = asyncio.Event()  # something arrived, or the association ended
        self._room = asyncio.Event()  # the inbox has room again (TCP reading paused)
        self._confirmed_event = asyncio.Event()
        self._end: BaseException | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._dtls: DTLSClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- set-up

    async def _start(
        self,
        udp_port: int | None,
        *,
        proxy_dtls: object = None,
        server_hostname: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._tasks.append(self._loop.create_task(self._read_tcp()))
        if self.core.transport == "dtls":
            await self._start_dtls(udp_port, proxy_dtls, server_hostname, timeout)
        if self.core.transport == "udp":
            # D16: the proxy's UDP port has the TCP listener's address and port number.
            peer = self._channel.writer.get_extra_info("peername")
            sock = self._channel.writer.get_extra_info("socket")
            target = (peer[0], peer[1] if udp_port is None else udp_port, *peer[2:])
            udp = socket.socket(sock.family, socket.SOCK_DGRAM)
            try:
                udp.setblocking(False)
                udp.connect(target)
                self._udp, _ = await self._loop.create_datagram_endpoint(lambda: _UDPEndpoint(self), sock=udp)
            except BaseException:
                udp.close()
                raise

    async def _start_dtls(
        self, udp_port: int | None, proxy_dtls: object, server_hostname: str | None, timeout: float | None
    ) -> None:
        # Imported here: pyOpenSSL is loaded only by a client that speaks DTLS.
        from ..net.dtls import DTLSError  # noqa: PLC0415
        from .dtls import open_dtls_client  # noqa: PLC0415

        # D16: the proxy's DTLS port has the TLS listener's address and port number.
        peer = self._channel.writer.get_extra_info("peername")
        port = peer[1] if udp_port is None else udp_port
        # The handshake gets a little less than the request's whole timeout, so that its
        # own error (which names DTLS) comes before the request's TimeoutError.
        budget = None if timeout is None else max(0.05, timeout * 0.9)
        tls = self._channel.writer.get_extra_info("ssl_object") is not None
        hint = f"transport='tcp' carries the datagrams on the {'TLS' if tls else 'TCP'} connection instead"
        handshake = self._loop.create_task(
            open_dtls_client(
                peer[0],
                port,
                proxy_dtls=proxy_dtls,  # type: ignore[arg-type]  # checked by proxy_dtls_context
                proxy_server_hostname=server_hostname,
                timeout=budget,
            )
        )
        # Probe 19 F7: the association's TCP connection may end first (the proxy closes it
        # when no datagram comes, UDP-07, e.g. when nothing speaks DTLS on that port): then
        # the handshake has no purpose left and must not run on to its own timeout.
        tcp_reader = self._tasks[0]
        try:
            await asyncio.wait((handshake, tcp_reader), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handshake.done():
                handshake.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await handshake
        if handshake.cancelled():
            raise DTLSError(
                f"DTLS handshake with the proxy's DTLS port {peer[0]}:{port}: the proxy closed the "
                f"association's {'TLS' if tls else 'TCP'} connection first ({hint})"
            )
        try:
            self._dtls = handshake.result()
        except TimeoutError:
            raise DTLSError(
                f"DTLS handshake with the proxy's DTLS port {peer[0]}:{port}: no answer within "
                f"{budget} s ({hint})"
            ) from None
        self._tasks.append(self._loop.create_task(self._read_dtls()))

    async def _read_dtls(self) -> None:
        from ..net.dtls import DTLSError  # noqa: PLC0415

        assert self._dtls is not None
        try:
            while True:
                self._on_datagram(await self._dtls.recv())
        except DTLSError as exc:
            # The proxy closed the DTLS connection, or it failed: the next recvfrom says so;
            # the association itself lives as long as its TCP connection (UDP-07).
            self._push(exc)

    async def _confirm(self) -> None:
        # Server mode (UDP-06): the empty datagram, resent over UDP until confirmed (UDP-10).
        await self._send(self.core.confirm_datagram(self._loop.time()))
        if self.core.get_timer() is not None:
            self._tasks.append(self._loop.create_task(self._resend()))
        await self._confirmed_event.wait()
        if not self.confirmed:
            raise self._ended()

    async def _resend(self) -> None:
        try:
            while (deadline := self.core.get_timer()) is not None:
                await asyncio.sleep(max(0.0, deadline - self._loop.time()))
                again = self.core.handle_timer(self._loop.time())
                if again is not None:
                    if self._udp is not None:
                        self._udp.sendto(again)
                    elif self._dtls is not None:
                        self._dtls.send(again)
        except (TimeoutError, OSError) as exc:  # the last try unanswered; DTLS closed (DTLSError)
            self._finish(exc)

    # -- receiving

    async def _read_tcp(self) -> None:
        core, reader = self.core, self._channel.reader
        try:
            while True:
                while core.transport == "tcp" and len(self._inbox) >= self._max_queue:
                    # Over TCP nothing is lost: stop reading until recvfrom makes room.
                    self._room.clear()
                    await self._room.wait()
                try:
                    data = await reader.read(2**16)
                except (ConnectionResetError, _ssl.SSLEOFError):
                    data = b""  # the end of the TCP connection: the end of the association
                core.receive_data(data)
                while (event := core.next_event()) is not NEED_DATA:
                    if isinstance(event, AssociationEnded):
                        self._finish(
                            AssociationClosedError("the proxy closed the association's TCP connection")
                        )
                        return
                    if isinstance(event, AssociationConfirmation):
                        self._confirmed_event.set()
                    elif isinstance(event, Datagram | DatagramError):
                        self._push(event)
        except Exception as exc:
            self._finish(exc)

    def _on_datagram(self, data: bytes) -> None:
        message = self.core.receive_datagram(data)
        if message is None:
            return
        if len(self._inbox) >= self._max_queue:
            self.core.dropped["receive queue full"] += 1  # UDP: drop, as a socket buffer would
            return
        self._push(message)

    def _push(self, item: Datagram | DatagramError | Exception) -> None:
        self._inbox.append(item)
        self._wakeup.set()

    def _finish(self, exc: BaseException) -> None:
        # The association is over (EOF, protocol error, confirmation timeout): recvfrom
        # drains what arrived, then raises ``exc``.
        if self._end is None:
            self._end = exc
        self.core.close()
        self._wakeup.set()
        self._confirmed_event.set()
        self._channel.close()
        if self._udp is not None:
            self._udp.close()
        if self._dtls is not None:
            self._dtls.close()  # a close_notify: the proxy ends the channel at once

    def _ended(self) -> BaseException:
        assert self._end is not None
        return self._end

    async def recv_message(self, timeout: float | None = None) -> Datagram | DatagramError:
        """The next `Datagram` or `DatagramError` message as it came (for events, not exceptions).

        Raises:
            AssociationClosedError: the association is over and nothing is left.
            RemoteProtocolError: the proxy broke the protocol (the association is over).
            TimeoutError: nothing arrived within ``timeout`` seconds.
            OSError: the proxy's UDP port reported an error (e.g. ConnectionRefusedError).
        """
        if not self._inbox:
            try:
                async with asyncio.timeout(timeout):
                    while not self._inbox:
                        if self._end is not None:
                            raise self._end
                        self._wakeup.clear()
                        await self._wakeup.wait()
            except TimeoutError:
                raise TimeoutError(f"no datagram within {timeout} s") from None
        item = self._inbox.popleft()
        self._room.set()
        if isinstance(item, Exception):
            raise item
        return item

    async def recvfrom(self, timeout: float | None = None) -> tuple[bytes, tuple[str, int]]:
        """The next datagram: ``(payload, (source address, source port))``.

        Raises:
            ICMPError: an ICMP error report (with ``udp_error=True``); a subclass per code.
            AssociationClosedError, RemoteProtocolError, TimeoutError, OSError: see
                `recv_message`.
        """
        message = await self.recv_message(timeout)
        if isinstance(message, DatagramError):
            raise icmp_error(message)
        return message.payload, (message.header.address, message.header.port)

    # -- sending

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        """Send ``data`` to ``address`` (an IP literal or a name the proxy resolves, D20).

        Raises:
            AssociationClosedError: the association is over (or the reason it ended).
            LocalProtocolError: too long for one Datagram message (65535 bytes with the header).
        """
        if self._end is not None:
            raise self._end
        host, port = address
        await self._send(self.core.datagram(bytes(data), host, port))

    async def _send(self, message: bytes) -> None:
        if self._udp is not None:
            self._udp.sendto(message)
        elif self._dtls is not None:
            self._dtls.send(message)
        else:
            await self._channel.write(message)

    # -- the end

    def close(self) -> None:
        """End the association: close the TCP connection (and the UDP socket)."""
        self._finish(AssociationClosedError("the association was closed"))
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """`close`, and wait until the tasks and the connection are gone."""
        self.close()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        # Bounded: over TLS, closing waits for the proxy's close_notify.
        with contextlib.suppress(OSError, _ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self._channel.writer.wait_closed(), 1.0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# --- Sessions ----------------------------------------------------------------------------


class Session(SessionBase[Proxy]):
    """A SOCKS 6 session (asyncio flavour); see `SessionBase` for what it does.

    Example::

        async with Session("socks6://alice:s3cret@127.0.0.1:1080", tokens=16) as session:
            r1, w1 = await session.open_connection("example.com", 80)
            r2, w2 = await session.open_connection("example.org", 80, idempotent=True)

    Args:
        proxy: proxy URL or `Proxy`.
        tokens: idempotence token window to request (0: none).
    """

    def __init__(self, proxy: str | Proxy, *, tokens: int = 0) -> None:
        super().__init__(Proxy.from_url(proxy) if isinstance(proxy, str) else proxy, tokens=tokens)
        # Set when the pending initiation settles (AwaitSession / SessionSettled); made
        # on first use, inside the running loop.
        self._settled: asyncio.Event | None = None

    async def _wait_settled(self) -> None:
        if self._settled is None:
            self._settled = asyncio.Event()
        await self._settled.wait()

    def _notify_settled(self) -> None:
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    async def open_connection(
        self, dest_host: str, dest_port: int, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, Socks6StreamWriter]:
        """`Proxy.open_connection` inside this session (same keyword arguments)."""
        return await self.proxy.open_connection(dest_host, dest_port, session=self, **kwargs)

    async def connect(
        self, dest_host: str, dest_port: int, **kwargs: Unpack[ConnectOptions]
    ) -> socket.socket:
        """`Proxy.connect` inside this session (same keyword arguments)."""
        return await self.proxy.connect(dest_host, dest_port, session=self, **kwargs)

    async def connect_tunnel(
        self, dest_host: str, dest_port: int, **kwargs: Unpack[ConnectOptions]
    ) -> tuple[socket.socket, ClientConnection]:
        """`Proxy.connect_tunnel` inside this session (same keyword arguments)."""
        return await self.proxy.connect_tunnel(dest_host, dest_port, session=self, **kwargs)

    async def open_bind(self, address: str = "0.0.0.0", port: int = 0, **kwargs: Any) -> StreamBinding:
        """`Proxy.open_bind` inside this session (same keyword arguments)."""
        return await self.proxy.open_bind(address, port, session=self, **kwargs)

    async def bind(
        self, address: str = "0.0.0.0", port: int = 0, **kwargs: Unpack[RequestOptions]
    ) -> Binding:
        """`Proxy.bind` inside this session (same keyword arguments)."""
        return await self.proxy.bind(address, port, session=self, **kwargs)

    async def udp_associate(
        self, address: str = "0.0.0.0", port: int = 0, **kwargs: Unpack[UDPAssociateOptions]
    ) -> UDPAssociation:
        """`Proxy.udp_associate` inside this session (same keyword arguments)."""
        return await self.proxy.udp_associate(address, port, session=self, **kwargs)

    async def aclose(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Tear the session down (NOOP + Session ID + Session Teardown) and forget it.

        The session is closed locally whatever happens; failures of the teardown
        exchange itself (the proxy may already have expired the session) are ignored.
        """
        options = self.core.teardown_options()
        if options:
            # SES-05: the teardown request is outside any session, so it carries the
            # credentials a proxy requiring authentication asks for.
            with contextlib.suppress(Socks6Error, OSError):
                await self.proxy.noop(options=options, timeout=timeout)

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


async def udp_associate(
    proxy_url: str | None,
    address: str = "0.0.0.0",
    port: int = 0,
    *,
    session: Session | None = None,
    proxy_ssl: _ssl.SSLContext | bool | None = None,
    proxy_server_hostname: str | None = None,
    **kwargs: Unpack[UDPAssociateOptions],
) -> UDPAssociation:
    """UDP ASSOCIATE through a SOCKS 6 proxy: send datagrams to, and receive them from, remote hosts.

    Example::

        async with await udp_associate("socks6://127.0.0.1:1080", transport="udp") as assoc:
            await assoc.sendto(b"ping", ("127.0.0.1", 9999))
            data, (host, port) = await assoc.recvfrom(timeout=5)
            print(assoc.bound, assoc.id.hex())

    Args:
        proxy_url: ``socks6://`` or ``socks6+tls://`` URL (its default transport is "tcp":
            the datagrams ride the TLS connection); may be None when ``session`` is given.
        address: desired bind address of the proxy's socket towards remote hosts.
        port: desired bind port (0: any; Port Parity needs 0, STK-08).
        session: a `Session` (the request joins it).
        proxy_ssl: TLS context towards a ``socks6+tls`` proxy (default: verifying).
        proxy_server_hostname: name checked in the proxy's certificate.
        **kwargs: `UDPAssociateOptions` (``transport``, ``udp_error``, ``port_parity``,
            ``reserve_port``, ``server_mode``, ``udp_port``, ...) and `RequestOptions`
            (``stack_options`` for TOS, TTL, No Fragmentation; ``timeout``).

    Returns:
        A `UDPAssociation`: ``sendto``, ``recvfrom``, ``recv_message``, ``bound``, ``id``,
        ``reply``, ``udp_error``, ``port_parity``, ``dropped``, ``aclose()``.

    Raises:
        ProxyError: the proxy refused (``.reply_code``; e.g. COMMAND_NOT_SUPPORTED).
        RemoteProtocolError: no Association Initialization after the Operation Reply.
        TimeoutError: ``timeout`` expired (server mode: no confirmation after the last try).
    """
    proxy = _proxy_for(proxy_url, session, proxy_ssl, proxy_server_hostname)
    return await proxy.udp_associate(address, port, session=session, **kwargs)
