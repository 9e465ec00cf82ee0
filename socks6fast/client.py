"""Blocking SOCKS 6 client (plain sockets, no asyncio): `Proxy`, `Binding`, `Session`.

The python-socks shape::

    from socks6fast.client import Proxy

    proxy = Proxy.from_url("socks6://alice:s3cret@127.0.0.1:1080")
    sock = proxy.connect("example.com", 80, initial_data=b"GET / HTTP/1.0\\r\\n\\r\\n")
    print(sock.recv(65536))
    sock.close()

``connect`` returns a connected blocking socket (an ``ssl.SSLSocket`` for
``socks6+tls://``, which stays TLS to the proxy). The Request, the 0-RTT credentials and
``initial_data`` leave in one write (CMD-03); ``tfo=True`` puts that write into the TCP
SYN where TRN-02 allows it (plain ``socks6://`` only: see `Proxy.connect`). The handshake
reads exactly what each reply needs, so bytes the destination sends right away are still
in the socket for you.

TLS to the proxy (``socks6+tls://``) verifies the certificate by default
(``ssl.create_default_context()``); pass ``proxy_ssl=`` your own ``ssl.SSLContext`` to
change that, explicitly. For TLS to the destination, wrap the returned socket yourself
(``ctx.wrap_socket(sock, server_hostname=dest_host)``).

Errors are those of the asyncio flavour (see ``socks6fast.asyncio.client``); ``timeout``
covers connecting, TLS and the SOCKS handshake and raises ``TimeoutError``. The
returned socket is in blocking mode without a timeout. A `Session` may be shared between
threads.

The classes have the asyncio flavour's names, keyword arguments (`ConnectOptions`,
`RequestOptions`, the same in both flavours) and return shapes. What a request does
is decided once, in ``socks6fast.proto.client_flow``; this module only performs its
actions with blocking sockets (``TCP_FASTOPEN_CONNECT`` and `enable_tfo_connect` are
re-exported from `socks6fast.net.tfo`).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar, Unpack

from ._client_base import (
    DEFAULT_TIMEOUT,
    BindingBase,
    ConnectOptions,
    ProxyBase,
    RequestOptions,
    SessionBase,
)
from .errors import Socks6Error
from .net.tfo import TCP_FASTOPEN_CONNECT, enable_tfo_connect
from .proto.client import ClientConnection, SessionState
from .proto.client_flow import (
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
)
from .proto.messages import Option

__all__ = [
    "DEFAULT_TIMEOUT",
    "TCP_FASTOPEN_CONNECT",
    "Binding",
    "ConnectOptions",
    "Proxy",
    "RequestOptions",
    "Session",
    "enable_tfo_connect",
]

T = TypeVar("T")


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("SOCKS 6 handshake timed out")
        return left


def _open_tcp_socket(host: str, port: int, *, tfo: bool, deadline: _Deadline) -> socket.socket:
    # With tfo and a cached TFO cookie, connect() returns at once and the kernel defers
    # the SYN to the first write: the socket is not connected yet (getpeername() says
    # ENOTCONN) until then. `_Channel.write` copes; `ssl` cannot (see `_wrap_tls`).
    last: OSError | None = None
    for family, type_, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    ):
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tfo:
                enable_tfo_connect(sock)
            sock.settimeout(deadline.remaining())
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"cannot resolve {host!r}")


def _close_orphaned_ssl_socket(exc: BaseException) -> None:
    # SSLContext.wrap_socket detaches the plain socket's descriptor into a new SSLSocket
    # first, and some of its later failures (the peer reset the connection before the
    # handshake: "not connected" checks in ssl.SSLSocket._create) propagate without
    # closing that SSLSocket. Nothing else refers to it but the traceback's frames, so
    # close it from there rather than leave the descriptor to the garbage collector
    # (a ResourceWarning, and an fd held until then).
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, _ssl.SSLSocket):
            candidate.close()
        tb = tb.tb_next


def _wrap_tls(
    sock: socket.socket, context: _ssl.SSLContext, server_hostname: str, deadline: _Deadline
) -> _ssl.SSLSocket:
    """TLS client handshake on a connected socket, within ``deadline``; closes on failure."""
    try:
        # ssl.SSLSocket needs a socket the kernel calls connected; a TFO-deferred one is
        # not (its wrap raises BlockingIOError), hence `_open_tcp_socket(tfo=False)` for TLS.
        sock.getpeername()
        sock.settimeout(deadline.remaining())
        tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    except BaseException as exc:
        _close_orphaned_ssl_socket(exc)
        sock.close()  # a no-op once wrap_socket has detached it
        raise
    try:
        # The handshake runs in timeout mode (Python's ssl polls for the socket), so a
        # partial read cannot surface as SSLWantReadError; timing out raises TimeoutError.
        tls.settimeout(deadline.remaining())
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


class _Channel:
    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self.sock = sock
        self.deadline = deadline

    def write(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.remaining())
        try:
            self.sock.sendall(data)
        except BlockingIOError as exc:
            # TCP_FASTOPEN_CONNECT with a cached cookie: the first write starts the
            # connection. When the kernel cannot put the data into the SYN it sends a
            # bare SYN and a non-blocking send fails with EINPROGRESS having queued
            # nothing (tcp_sendmsg_fastopen): wait for the connection, then send it all.
            if exc.errno != errno.EINPROGRESS:
                raise
            self._wait_writable()
            self.sock.sendall(data)

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        remaining = self.deadline.remaining()
        if not poller.poll(None if remaining is None else remaining * 1000):  # ms
            raise TimeoutError("SOCKS 6 handshake timed out")

    def read(self, n: int) -> bytes:
        self.sock.settimeout(self.deadline.remaining())
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()

    def release(self) -> socket.socket:
        """The socket, handed to the caller: blocking mode, no timeout."""
        self.sock.settimeout(None)
        return self.sock


class _Performer:
    """Performs a flow's actions (socks6fast.proto.client_flow) with blocking sockets.

    The flow runs under the Session's lock: reading a reply updates the shared
    ClientSession (Session ID, token window, Session Invalid), which other threads spend
    tokens from ("A token can only be spent on a single SOCKS request", section
    "Idempotence options"; unguarded, a window advertisement rebuilt the spent-token set
    while another thread added to it).
    """

    def __init__(
        self,
        deadline: _Deadline,
        open_channel: Callable[[bool, _Deadline], _Channel] | None = None,
        session: Session | None = None,
    ) -> None:
        self._deadline = deadline
        self._open_channel = open_channel
        self._session = session

    def run(self, flow: Flow[_Channel, T]) -> T:
        steps = Steps(flow, None if self._session is None else self._session._cond)
        for action in steps:
            try:
                steps.result = self._perform(action)
            except BaseException as exc:
                steps.error = exc
        return steps.value

    def _perform(self, action: Action[_Channel]) -> object:
        match action:
            case Read(channel, size):
                return channel.read(size)
            case Write(channel, data):
                channel.write(data)
            case Open(tfo):
                assert self._open_channel is not None
                return self._open_channel(tfo, self._deadline)
            case Close(channel):
                channel.close()
            case AwaitSession():
                assert self._session is not None
                self._session._wait_settled(self._deadline)
            case SessionSettled():
                assert self._session is not None
                self._session._notify_settled()
        return None


class Proxy(ProxyBase):
    """A SOCKS 6 proxy (blocking flavour), python-socks style.

    Args:
        url: the parsed proxy URL.
        proxy_ssl: TLS context for ``socks6+tls`` (None: verifying default context).
        proxy_server_hostname: name the proxy certificate is checked against (default:
            the URL's host).
    """

    def _open_channel(self, tfo: bool, deadline: _Deadline) -> _Channel:
        if self.ssl_context is None:
            return _Channel(
                _open_tcp_socket(self.url.host, self.url.port, tfo=tfo, deadline=deadline), deadline
            )
        # TLS: no TFO. A TFO connect is only completed by the first write, and ssl.SSLSocket
        # refuses a socket that is not connected yet (BlockingIOError from wrap_socket
        # whenever the kernel holds a TFO cookie for the proxy); the blocking flavour cannot
        # hand the ClientHello to the SYN itself. TRN-02 allows TFO here; it is an
        # optimisation the asyncio flavour (memory-BIO TLS) keeps.
        sock = _open_tcp_socket(self.url.host, self.url.port, tfo=False, deadline=deadline)
        return _Channel(_wrap_tls(sock, self.ssl_context, self.server_hostname, deadline), deadline)

    def _run(self, flow: Flow[_Channel, T], session: Session | None, timeout: float | None) -> T:
        return _Performer(_Deadline(timeout), self._open_channel, session).run(flow)

    def connect(
        self,
        dest_host: str,
        dest_port: int,
        *,
        session: Session | None = None,
        **kwargs: Unpack[ConnectOptions],
    ) -> socket.socket:
        """CONNECT through the proxy; return the connected socket (blocking, no timeout).

        Arguments and errors: see `ProxyBase`. ``tfo`` is ignored for ``socks6+tls``
        (``ssl.SSLSocket`` needs a connected socket before its handshake); the proxy's
        answer to ``stack_options`` is in the reply `connect_tunnel` returns.
        """
        return self.connect_tunnel(dest_host, dest_port, session=session, **kwargs)[0]

    def connect_tunnel(
        self,
        dest_host: str,
        dest_port: int,
        *,
        session: Session | None = None,
        **kwargs: Unpack[ConnectOptions],
    ) -> tuple[socket.socket, ClientConnection]:
        """Like `connect`, but also return the `ClientConnection` (replies, echoed options).

        Example::

            sock, conn = proxy.connect_tunnel("example.com", 80, stack_options=[
                TTLOption(StackLeg.PROXY_REMOTE, 16)])
            print(conn.operation_reply.options)        # what the proxy applied (D9)
        """
        channel, conn = self._run(
            self._connect_flow(dest_host, dest_port, session, kwargs),
            session,
            kwargs.get("timeout", DEFAULT_TIMEOUT),
        )
        return channel.release(), conn

    def bind(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        session: Session | None = None,
        **kwargs: Unpack[RequestOptions],
    ) -> Binding:
        """BIND: ask the proxy to listen; return once it says where (CMD-04).

        Example::

            binding = proxy.bind()
            print("tell the peer to connect to", binding.address)
            sock = binding.accept(timeout=60)      # second Operation Reply
            print("peer is", binding.peer_address)

        Returns:
            A `Binding`; its socket becomes the data channel after `Binding.accept`.
        """
        timeout = kwargs.get("timeout", DEFAULT_TIMEOUT)
        return Binding(*self._run(self._bind_flow(address, port, session, kwargs), session, timeout))

    def noop(
        self,
        *,
        options: Iterable[Option] = (),
        session: Session | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ClientConnection:
        """NOOP: check the credentials, or start ``session``; return the finished connection."""
        return self._run(self._noop_flow(options, session), session, timeout)[1]


class Binding(BindingBase[_Channel]):
    """A BIND in progress; see `Proxy.bind`."""

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait for the second Operation Reply; return the socket, now the data channel.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        self._channel.deadline = deadline = _Deadline(timeout)
        _Performer(deadline).run(accept(self._channel, self.connection))
        return self._channel.release()

    def __enter__(self) -> Binding:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close_unless_accepted()


class Session(SessionBase[Proxy]):
    """A SOCKS 6 session (blocking flavour), safe to share between threads.

    Authenticate once; then requests carry only the Session ID (see `SessionBase`).

    Example::

        with Session("socks6://alice:s3cret@127.0.0.1:1080", tokens=16) as session:
            a = session.connect("example.com", 80)
            b = session.connect("example.org", 80, idempotent=True)

    Args:
        proxy: proxy URL or `Proxy`.
        tokens: idempotence token window to request (0: none).
    """

    def __init__(self, proxy: str | Proxy, *, tokens: int = 0) -> None:
        super().__init__(Proxy.from_url(proxy) if isinstance(proxy, str) else proxy, tokens=tokens)
        # Held while a request's flow reads or changes `core`, and to wait for a pending
        # initiation (AwaitSession / SessionSettled).
        self._cond = threading.Condition()

    def _wait_settled(self, deadline: _Deadline) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.core.state is not SessionState.PENDING, deadline.remaining())

    def _notify_settled(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def connect(self, dest_host: str, dest_port: int, **kwargs: Unpack[ConnectOptions]) -> socket.socket:
        """`Proxy.connect` inside this session (same keyword arguments)."""
        return self.proxy.connect(dest_host, dest_port, session=self, **kwargs)

    def connect_tunnel(
        self, dest_host: str, dest_port: int, **kwargs: Unpack[ConnectOptions]
    ) -> tuple[socket.socket, ClientConnection]:
        """`Proxy.connect_tunnel` inside this session (same keyword arguments)."""
        return self.proxy.connect_tunnel(dest_host, dest_port, session=self, **kwargs)

    def bind(self, address: str = "0.0.0.0", port: int = 0, **kwargs: Unpack[RequestOptions]) -> Binding:
        """`Proxy.bind` inside this session (same keyword arguments)."""
        return self.proxy.bind(address, port, session=self, **kwargs)

    def close(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Tear the session down (NOOP + Session ID + Session Teardown) and forget it.

        Failures of the teardown exchange are ignored: the session is closed locally
        whatever the proxy answers.
        """
        with self._cond:
            options = self.core.teardown_options()
        if options:
            # SES-05: the teardown request is outside any session: it carries credentials.
            with contextlib.suppress(Socks6Error, OSError):
                self.proxy.noop(options=options, timeout=timeout)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
