"""httpx transports through a SOCKS 6 proxy, in the shape of httpx-socks (issue 15 item 2).

Example::

    import httpx
    from socks6fast.contrib.httpx import AsyncProxyTransport, SyncProxyTransport

    transport = AsyncProxyTransport.from_url("socks6://alice:s3cret@127.0.0.1:1080")
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.get("https://example.com/")

    with httpx.Client(transport=SyncProxyTransport.from_url("socks6+tls://alice:s3cret@proxy:1443")) as c:
        r = c.get("http://example.com/")

How: each transport is an ``httpx.AsyncHTTPTransport`` / ``httpx.HTTPTransport`` (so
``verify=``, ``cert=``, ``trust_env=``, ``http1=``, ``http2=``, ``limits=``, ``retries=``
mean what they mean there, and httpcore's errors become httpx's) whose httpcore connection
pool dials through a network backend of ours: its ``connect_tcp`` opens a SOCKS 6 CONNECT
(the proxy resolves the destination's name; nothing is resolved locally), and httpcore then
speaks HTTP/1.1 (keep-alive: one tunnel carries many requests) or, for ``https://``, TLS
with httpx's verification *inside* the tunnel (``start_tls``; over ``socks6+tls://`` that
is TLS in TLS).

False start (``false_start=True``, the default): a new tunnel's CONNECT waits for its first
bytes, the request head or the TLS ClientHello (a memory-BIO TLS client), and carries them as
initial data in the Request's flight (CMD-03): the first byte costs one round trip to the
proxy, not two. A refusal then surfaces at that first write, with the same exceptions.

What is reused across requests: the pool's keep-alive connections (each a SOCKS 6 tunnel),
and one `socks6fast.asyncio.Session` (`socks6fast.client.Session` for the sync transport)
per transport. The first CONNECT carries the 0-RTT credentials and the Session Request
(with ``tokens``: the Token Request); later CONNECTs carry only the Session ID (SES-02: no
authentication per connection) and, once the proxy advertised a window, spend the smallest
unspent idempotence token (IDM-05: the proxy executes each CONNECT at most once, IDM-03).
A session the proxy forgot (expiry: Session Invalid) is replaced by a new one and the
CONNECT retried once (the proxy did not act on it). Closing the transport tears the
session down (SES-05).

Errors: a refusal by the proxy (its rules, an unreachable destination, bad credentials)
raises ``httpx.ProxyError`` naming the reply code; its ``__cause__`` is this module's
`ProxyError` (``.reply_code``: the `socks6fast.ReplyCode`; ``.error``: the socks6fast
exception); a proxy that cannot be reached raises ``httpx.ConnectError``, a handshake
past httpx's connect timeout ``httpx.ConnectTimeout``.

Needs the ``httpx`` extra (``pip install 'socks6fast[httpx]'``). The async transport runs
on asyncio (not trio).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import socket
import ssl
import time
import typing
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

try:
    import httpcore
    import httpx
except ImportError as exc:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError(
        "socks6fast.contrib.httpx needs httpx: install it with pip install 'socks6fast[httpx]'"
    ) from exc

from ..asyncio.client import Proxy as AsyncProxy
from ..asyncio.client import Session as AsyncSession
from ..asyncio.client import Socks6StreamWriter
from ..client import Proxy as SyncProxy
from ..client import Session as SyncSession
from ..constants import ReplyCode
from ..errors import LocalProtocolError, Socks6Error
from ..errors import ProxyError as Socks6ProxyError
from ..proto.client import SessionState

__all__ = ["AsyncProxyTransport", "ProxyError", "SyncProxyTransport"]

#: Default idempotence token window per transport (IDM-02; 0: no tokens).
DEFAULT_TOKENS = 16

T = TypeVar("T")

SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class ProxyError(httpcore.ProxyError):
    """httpcore's ProxyError with the SOCKS 6 reply code; httpx raises ``httpx.ProxyError``
    from it (its ``__cause__``).

    httpcore's pool re-raises with ``from None``, which drops the `socks6fast.ProxyError`
    from the chain; ``reply_code`` and ``error`` keep what it said.

    Attributes:
        reply_code: the proxy's `socks6fast.ReplyCode`, or None (authentication failure,
            version mismatch, protocol error).
        error: the `socks6fast.Socks6Error` itself.
    """

    def __init__(self, message: str, error: Socks6Error) -> None:
        super().__init__(message)
        self.error = error
        self.reply_code: ReplyCode | None = error.reply_code if isinstance(error, Socks6ProxyError) else None


def _connect_error(exc: BaseException, host: str, port: int) -> Exception:
    """The httpcore exception (httpx maps it to its own) for a failed SOCKS 6 CONNECT."""
    where = f"{host}:{port}"
    if isinstance(exc, Socks6Error):
        # ProxyError (.reply_code), AuthenticationError, VersionMismatchError, protocol errors.
        return ProxyError(f"SOCKS 6 CONNECT to {where} failed: {exc}", exc)
    if isinstance(exc, TimeoutError):
        return httpcore.ConnectTimeout(f"SOCKS 6 CONNECT to {where} timed out: {exc}")
    return httpcore.ConnectError(f"SOCKS 6 CONNECT to {where}: cannot reach the proxy: {exc}")


def _spend_token(core_state: SessionState, available: int | None) -> bool:
    # IDM-05: spend a token only where one is known to be there. Asking for one before the
    # proxy advertised a window would cost a NOOP round trip first (client_flow._join).
    return core_state is SessionState.ACTIVE and available is not None


# --- async --------------------------------------------------------------------------------


class _AsyncStream(httpcore.AsyncNetworkStream):
    """An httpcore stream over the asyncio streams of one SOCKS 6 tunnel."""

    def __init__(self, reader: asyncio.StreamReader, writer: Socks6StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()
        # Bounded: over TLS closing waits for the peer's close_notify.
        try:
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            pass

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        # TLS to the destination inside the tunnel, with httpx's context (its verify=).
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # httpcore asks before reusing an idle keep-alive connection: readable means the
            # server closed it (or sent something unasked), so it must not be reused.
            return self.is_readable()
        return self._writer.get_extra_info(info)

    def is_readable(self) -> bool:
        """EOF, an error or bytes waiting: an idle connection that must not be reused."""
        reader = self._reader
        return reader.at_eof() or reader.exception() is not None or self.closing()

    def closing(self) -> bool:
        """The transport is closed or closing."""
        return self._writer.transport.is_closing()


def _client_hello(
    ssl_context: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client over memory BIOs, started: (its object, incoming, outgoing, the ClientHello)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl_context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return tls, incoming, outgoing, outgoing.read()


class _AsyncBIOTLSStream(httpcore.AsyncNetworkStream):
    """TLS to the destination over memory BIOs on a tunnel whose ClientHello went already
    (false start: as the CONNECT's initial data). Call `handshake` before use."""

    _CHUNK = 65536

    def __init__(
        self, inner: _AsyncStream, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self._inner = inner
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing

    async def _run(self, step: typing.Callable[[], T], timeout: float | None) -> T:
        while True:
            want_read = False
            try:
                result = step()
            except ssl.SSLWantReadError:
                want_read = True
            pending = self._outgoing.read()
            if pending:
                await self._inner.write(pending, timeout)
            if not want_read:
                return result
            data = await self._inner.read(self._CHUNK, timeout)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    async def handshake(self, timeout: float | None) -> None:
        try:
            await self._run(self._tls.do_handshake, timeout)
        except httpcore.ReadTimeout as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (httpcore.NetworkError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._run(functools.partial(self._tls.read, max_bytes), timeout)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # close_notify, or a server that closed without one: HTTP's framing judges
        except ssl.SSLError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        try:
            while view:
                written = await self._run(functools.partial(self._tls.write, view), timeout)
                view = view[written:]
        except ssl.SSLError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()  # queues close_notify
        pending = self._outgoing.read()
        if pending and not self._inner.closing():
            with contextlib.suppress(httpcore.NetworkError, httpcore.TimeoutException):
                await self._inner.write(pending, 1.0)
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS inside TLS to the destination: not needed by httpx")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls
        if info == "is_readable":
            return self._tls.pending() > 0 or self._inner.is_readable()
        return self._inner.get_extra_info(info)


class _LazyAsyncStream(httpcore.AsyncNetworkStream):
    """A tunnel whose SOCKS 6 CONNECT waits for the first bytes, to carry them (false start).

    httpcore writes the request only after ``connect_tcp`` returned; sending the CONNECT at
    once would cost a round trip to the proxy before the request leaves. Deferred to the
    first ``write`` (the request head), or to ``start_tls`` (the ClientHello, from a memory-BIO
    TLS client), those bytes go as the CONNECT's initial data in the Request's flight
    (section "False Starts", CMD-03). A ``read`` first (nothing to send) connects bare.
    """

    def __init__(self, backend: AsyncSocks6Backend, host: str, port: int, timeout: float | None) -> None:
        self._backend = backend
        self._host = host
        self._port = port
        self._timeout = timeout
        self._stream: httpcore.AsyncNetworkStream | None = None
        self._closed = False

    async def _open(self, initial_data: bytes) -> _AsyncStream:
        if self._closed:
            raise httpcore.ConnectError("the connection was closed before it was used")
        return await self._backend.open_tunnel(self._host, self._port, self._timeout, initial_data)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._stream is None:
            self._stream = await self._open(b"")
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._stream is None:
            self._stream = await self._open(bytes(buffer))
            return
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        self._closed = True
        if self._stream is not None:
            await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        if self._stream is not None:
            return await self._stream.start_tls(ssl_context, server_hostname, timeout)
        tls, incoming, outgoing, hello = _client_hello(ssl_context, server_hostname)
        stream = _AsyncBIOTLSStream(await self._open(hello), tls, incoming, outgoing)
        await stream.handshake(timeout)
        self._stream = stream
        return stream

    def get_extra_info(self, info: str) -> Any:
        if self._stream is None:
            return False if info == "is_readable" else None
        return self._stream.get_extra_info(info)


class AsyncSocks6Backend(httpcore.AsyncNetworkBackend):
    """httpcore network backend whose ``connect_tcp`` is a SOCKS 6 CONNECT inside ``session``.

    Args:
        session: the `socks6fast.asyncio.Session` every CONNECT joins.
        tfo: TCP Fast Open to the proxy where TRN-02 allows it.
        false_start: defer each CONNECT to the first bytes and send them with it
            (`_LazyAsyncStream`); False: CONNECT inside ``connect_tcp``.
    """

    def __init__(self, session: AsyncSession, *, tfo: bool = False, false_start: bool = True) -> None:
        self.session = session
        self.tfo = tfo
        self.false_start = false_start

    async def open_tunnel(
        self, host: str, port: int, timeout: float | None, initial_data: bytes
    ) -> _AsyncStream:
        """The SOCKS 6 CONNECT; its failures as the httpcore exceptions httpx maps."""
        core = self.session.core
        idempotent = _spend_token(core.state, core.available_token())
        try:
            reader, writer = await self.session.open_connection(
                host, port, initial_data=initial_data, idempotent=idempotent, tfo=self.tfo, timeout=timeout
            )
        except (Socks6Error, OSError) as exc:
            raise _connect_error(exc, host, port) from exc
        return _AsyncStream(reader, writer)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # local_address and socket_options concern the proxy's socket towards the destination,
        # which the client does not control: not supported (ignored).
        if self.false_start:
            return _LazyAsyncStream(self, host, port, timeout)
        return await self.open_tunnel(host, port, timeout, b"")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SocketOption] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a SOCKS 6 proxy cannot reach a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncProxyTransport(httpx.AsyncHTTPTransport):
    """An ``httpx.AsyncHTTPTransport`` that connects through a SOCKS 6 proxy.

    Example::

        transport = AsyncProxyTransport.from_url("socks6://alice:s3cret@127.0.0.1:1080")
        async with httpx.AsyncClient(transport=transport, verify=...) as client:
            print((await client.get("https://example.com/")).status_code)

    Args:
        proxy: the proxy URL (``socks6://`` or ``socks6+tls://``, with ``user:pass@``) or an
            `socks6fast.asyncio.Proxy`.
        proxy_ssl: TLS context towards a ``socks6+tls`` proxy (None: verifying default).
        proxy_server_hostname: name the proxy certificate is checked against.
        tokens: idempotence token window to ask the proxy for (0: none).
        tfo: TCP Fast Open to the proxy (TRN-02).
        false_start: send each connection's first bytes (the request head, or the TLS
            ClientHello) with its CONNECT, in one flight (CMD-03); False: CONNECT first.
        verify, cert, trust_env, http1, http2, limits, retries: as for
            ``httpx.AsyncHTTPTransport`` (``verify`` concerns the destination's certificate).
    """

    def __init__(
        self,
        proxy: str | AsyncProxy,
        *,
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_server_hostname: str | None = None,
        tokens: int = DEFAULT_TOKENS,
        tfo: bool = False,
        false_start: bool = True,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),  # noqa: B008
        retries: int = 0,
    ) -> None:
        if isinstance(proxy, str):
            proxy = AsyncProxy.from_url(
                proxy, proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname
            )
        super().__init__(http1=http1, http2=http2, limits=limits)
        self.session = AsyncSession(proxy, tokens=tokens)
        """The SOCKS 6 session every connection of this transport joins."""
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        # httpx.AsyncHTTPTransport keeps its httpcore pool in ``_pool`` and takes no network
        # backend: the same pool as httpx builds it, on our backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            network_backend=AsyncSocks6Backend(self.session, tfo=tfo, false_start=false_start),
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """The transport for ``socks6://[user[:pass]@]host[:port]`` or ``socks6+tls://...``.

        Raises:
            ValueError: a bad URL (one sentence, `socks6fast.net.url.parse_proxy_url`).
        """
        return cls(url, **kwargs)

    async def aclose(self) -> None:
        """Close the pool's connections, then tear the SOCKS 6 session down (SES-05)."""
        try:
            await super().aclose()
        finally:
            await self.session.aclose(timeout=5.0)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


# --- sync ---------------------------------------------------------------------------------


class _SyncStream(httpcore.NetworkStream):
    """An httpcore stream over a blocking socket: the tunnel, or TLS on it (`ssl.SSLSocket`)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        if isinstance(self._sock, ssl.SSLSocket):
            # socks6+tls: the tunnel is TLS to the proxy already; the destination's TLS runs
            # inside it, over memory BIOs.
            tls, incoming, outgoing, hello = _client_hello(ssl_context, server_hostname)
            return _SyncBIOTLSStream(self._sock, tls, incoming, outgoing, hello, timeout)
        try:
            self._sock.settimeout(timeout)
            wrapped = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except OSError as exc:  # ssl.SSLError is an OSError
            self._sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return _SyncStream(wrapped)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj  # type: ignore[attr-defined]  # what httpcore's SyncStream gives
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _readable(self._sock)
        return None


def _readable(sock: socket.socket) -> bool:
    """True when ``sock`` has something to read (or EOF): an idle connection the server closed."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        if sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except OSError:
        return True


class _SyncBIOTLSStream(httpcore.NetworkStream):
    """TLS to the destination over memory BIOs on a blocking socket: inside the TLS connection
    to a ``socks6+tls`` proxy, or on a tunnel whose CONNECT carried the ClientHello (false
    start). The handshake completes in the constructor; ``hello`` is sent first unless it
    went already (b"")."""

    _CHUNK = 65536

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        hello: bytes,
        timeout: float | None,
    ) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        try:
            self._sock.settimeout(timeout)
            if hello:
                self._sock.sendall(hello)
            self._run(self._tls.do_handshake)
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except OSError as exc:  # ssl.SSLError is an OSError
            self._sock.close()
            raise httpcore.ConnectError(str(exc)) from exc

    def _run(self, step: typing.Callable[[], T]) -> T:
        while True:
            want_read = False
            try:
                result = step()
            except ssl.SSLWantReadError:
                want_read = True
            pending = self._outgoing.read()
            if pending:
                self._sock.sendall(pending)
            if not want_read:
                return result
            data = self._sock.recv(self._CHUNK)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._run(functools.partial(self._tls.read, max_bytes))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # close_notify, or a server that closed without one: HTTP's framing judges
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            view = memoryview(buffer)
            while view:
                written = self._run(functools.partial(self._tls.write, view))
                view = view[written:]
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("TLS inside TLS to the destination: not needed by httpx")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return self._tls.pending() > 0 or _readable(self._sock)
        return None


class _LazySyncStream(httpcore.NetworkStream):
    """The blocking twin of `_LazyAsyncStream`: the CONNECT waits for the first bytes (the
    request head, or the ClientHello) and carries them as initial data (CMD-03)."""

    def __init__(self, backend: SyncSocks6Backend, host: str, port: int, timeout: float | None) -> None:
        self._backend = backend
        self._host = host
        self._port = port
        self._timeout = timeout
        self._stream: httpcore.NetworkStream | None = None
        self._closed = False

    def _open(self, initial_data: bytes) -> socket.socket:
        if self._closed:
            raise httpcore.ConnectError("the connection was closed before it was used")
        return self._backend.open_tunnel(self._host, self._port, self._timeout, initial_data)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._stream is None:
            self._stream = _SyncStream(self._open(b""))
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._stream is None:
            self._stream = _SyncStream(self._open(bytes(buffer)))
            return
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        if self._stream is not None:
            return self._stream.start_tls(ssl_context, server_hostname, timeout)
        tls, incoming, outgoing, hello = _client_hello(ssl_context, server_hostname)
        self._stream = _SyncBIOTLSStream(self._open(hello), tls, incoming, outgoing, b"", timeout)
        return self._stream

    def get_extra_info(self, info: str) -> Any:
        if self._stream is None:
            return False if info == "is_readable" else None
        return self._stream.get_extra_info(info)


class SyncSocks6Backend(httpcore.NetworkBackend):
    """httpcore network backend (blocking) whose ``connect_tcp`` is a SOCKS 6 CONNECT in ``session``;
    arguments as for `AsyncSocks6Backend`."""

    def __init__(self, session: SyncSession, *, tfo: bool = False, false_start: bool = True) -> None:
        self.session = session
        self.tfo = tfo
        self.false_start = false_start

    def open_tunnel(self, host: str, port: int, timeout: float | None, initial_data: bytes) -> socket.socket:
        """The SOCKS 6 CONNECT; its failures as the httpcore exceptions httpx maps."""
        core = self.session.core
        idempotent = _spend_token(core.state, core.available_token())
        options: dict[str, Any] = {"initial_data": initial_data, "tfo": self.tfo, "timeout": timeout}
        try:
            try:
                return self.session.connect(host, port, idempotent=idempotent, **options)
            except LocalProtocolError:
                if not idempotent:
                    raise
                # Another thread spent the last known token between the look and the
                # request: go without one.
                return self.session.connect(host, port, **options)
        except (Socks6Error, OSError) as exc:
            raise _connect_error(exc, host, port) from exc

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        if self.false_start:
            return _LazySyncStream(self, host, port, timeout)
        return _SyncStream(self.open_tunnel(host, port, timeout, b""))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[SocketOption] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("a SOCKS 6 proxy cannot reach a Unix socket")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SyncProxyTransport(httpx.HTTPTransport):
    """An ``httpx.HTTPTransport`` (blocking) that connects through a SOCKS 6 proxy.

    Example::

        with httpx.Client(transport=SyncProxyTransport.from_url("socks6://127.0.0.1:1080")) as client:
            print(client.get("http://example.com/").text)

    Arguments: those of `AsyncProxyTransport` (``proxy`` may be a `socks6fast.client.Proxy`).
    The transport may be shared between threads (its `socks6fast.client.Session` is).
    """

    def __init__(
        self,
        proxy: str | SyncProxy,
        *,
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_server_hostname: str | None = None,
        tokens: int = DEFAULT_TOKENS,
        tfo: bool = False,
        false_start: bool = True,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),  # noqa: B008
        retries: int = 0,
    ) -> None:
        if isinstance(proxy, str):
            proxy = SyncProxy.from_url(
                proxy, proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname
            )
        super().__init__(http1=http1, http2=http2, limits=limits)
        self.session = SyncSession(proxy, tokens=tokens)
        """The SOCKS 6 session every connection of this transport joins."""
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            network_backend=SyncSocks6Backend(self.session, tfo=tfo, false_start=false_start),
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """The transport for ``socks6://[user[:pass]@]host[:port]`` or ``socks6+tls://...``."""
        return cls(url, **kwargs)

    def close(self) -> None:
        """Close the pool's connections, then tear the SOCKS 6 session down (SES-05)."""
        try:
            super().close()
        finally:
            self.session.close(timeout=5.0)

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()
