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
returned socket is in blocking mode without a timeout.

This module mirrors ``socks6fast.asyncio.client`` line by line (sync vs async, as
httpcore keeps ``_sync`` beside ``_async``); the protocol itself lives once, in
``socks6fast.proto.client``.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final

from .constants import Command
from .errors import AuthenticationError, Socks6Error
from .net.tfo import TCP_FASTOPEN_CONNECT, enable_tfo_connect
from .net.url import ProxyURL, parse_proxy_url, proxy_ssl_context
from .proto.client import (
    NEED_DATA,
    ClientConnection,
    ClientSession,
    ClientState,
    SessionState,
    build_request,
    raise_reset,
    tfo_syn_may_carry_data,
)
from .proto.messages import OperationReply, Option, SessionRequest, StackOption

__all__ = ["DEFAULT_TIMEOUT", "TCP_FASTOPEN_CONNECT", "Binding", "Proxy", "Session", "enable_tfo_connect"]

#: Seconds allowed for connecting to the proxy, TLS and the SOCKS handshake.
DEFAULT_TIMEOUT: Final = 30.0
_FIRST_REPLY: Final = frozenset(
    {ClientState.ESTABLISHED, ClientState.MUST_CLOSE, ClientState.AWAIT_BIND_PEER}
)
_PEER_REPLY: Final = frozenset({ClientState.ESTABLISHED})


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


def _drive(
    channel: _Channel,
    conn: ClientConnection,
    stop: frozenset[ClientState],
    lock: threading.Condition | None = None,
) -> OperationReply:
    # The adapter loop of socks6fast.proto.client's module docstring. ``lock``: the Session's,
    # held while the core reads a reply, because reading one updates the shared
    # ClientSession (Session ID, token window, Session Invalid) that other threads spend
    # tokens from under the same lock ("A token can only be spent on a single SOCKS
    # request", section "Idempotence options"; unguarded, a window advertisement rebuilt
    # the spent-token set while another thread added to it).
    guard: contextlib.AbstractContextManager[object] = contextlib.nullcontext() if lock is None else lock
    while True:
        with guard:
            event = conn.next_event()
        out = conn.data_to_send()
        if out:
            try:
                channel.write(out)
            except (BrokenPipeError, ConnectionResetError):
                # The proxy is gone. What it sent before (a refusal) is still to be read,
                # and the read ends at once, in a typed error (raise_reset).
                pass
        if event is NEED_DATA:
            try:
                data = channel.read(conn.bytes_needed)
            except ConnectionResetError as exc:
                with guard:
                    raise_reset(conn, exc)
            conn.receive_data(data)
        elif isinstance(event, OperationReply) and conn.state in stop:
            return event


class Proxy:
    """A SOCKS 6 proxy (blocking flavour), python-socks style.

    Args:
        url: the parsed proxy URL.
        proxy_ssl: TLS context for ``socks6+tls`` (None: verifying default context).
        proxy_server_hostname: name the proxy certificate is checked against (default:
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
        """The TLS context towards the proxy (None for socks6://)."""
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

    def _request(
        self,
        command: Command,
        host: str,
        port: int,
        *,
        initial_data: bytes,
        options: Iterable[Option],
        session: Session | None,
        idempotent: bool,
        tfo: bool,
        timeout: float | None,
    ) -> tuple[_Channel, ClientConnection]:
        if session is not None and session.proxy.url != self.url:
            raise ValueError("the session belongs to another proxy")
        if idempotent and session is None:
            raise ValueError("idempotent=True needs a session (idempotence tokens live in sessions)")
        deadline = _Deadline(timeout)
        # Session Invalid means the proxy did not act on the request: retrying once in a
        # fresh session is safe.
        attempts = 2 if session is not None else 1
        for attempt in range(attempts):
            session_options = session._begin(idempotent, timeout) if session is not None else ()
            initiator = any(isinstance(o, SessionRequest) for o in session_options)
            core = session.core if session is not None else None
            credentials = self.url.credentials if core is None or core.needs_credentials else None
            request = build_request(
                command,
                host,
                port,
                credentials=credentials,
                initial_data_length=len(initial_data),
                options=(*session_options, *options),
            )
            conn = ClientConnection(session=core, credentials=credentials)
            channel: _Channel | None = None
            try:
                channel = self._open_channel(tfo, deadline)
                flight = conn.send(request, initial_data)
                spends = conn.spends_token
                split = tfo and not self.url.tls and not tfo_syn_may_carry_data(spends_token=spends)
                try:
                    if split:
                        # TRN-02: only the Request rides in the SYN; the data follows it.
                        channel.write(flight[: conn.request_size])
                        flight = flight[conn.request_size :]
                    if flight:
                        channel.write(flight)
                except (BrokenPipeError, ConnectionResetError):
                    # The proxy answered and closed while a long first flight (false-start
                    # data) was still going out, so its close became a reset: as in
                    # `_drive`, read what it sent (a Version Mismatch Reply, REQ-02, or a
                    # refusal) and let the core judge it; the end gives a typed error.
                    pass
                _drive(channel, conn, _FIRST_REPLY, None if session is None else session._cond)
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
            else:
                channel.sock.settimeout(None)
            return channel, conn
        raise AssertionError("unreachable")  # pragma: no cover

    def connect(
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
        """CONNECT through the proxy and return the connected socket.

        Args:
            dest_host: IP literal or name (the proxy resolves names).
            dest_port: destination port.
            initial_data: first application bytes, sent in the same write as the Request.
            stack_options: Stack options from `socks6fast.proto.messages`; see `connect_tunnel`
                for the proxy's answer.
            session: a `Session` of this proxy.
            idempotent: spend an idempotence token (needs ``session`` with ``tokens``).
            tfo: TCP Fast Open to the proxy where TRN-02 allows (ignored for ``socks6+tls``:
                ``ssl.SSLSocket`` needs a connected socket before its handshake).
            timeout: seconds for connecting, TLS and the handshake (None: no limit).

        Raises:
            ProxyError: the proxy refused (``reply_code``); AuthenticationError,
            VersionMismatchError, RemoteProtocolError, TimeoutError, OSError.
        """
        sock, _ = self.connect_tunnel(
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

    def connect_tunnel(
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
        """Like `connect`, but also return the `ClientConnection`.

        Example::

            sock, conn = proxy.connect_tunnel("example.com", 80, stack_options=[
                TTLOption(StackLeg.PROXY_REMOTE, 16)])
            print(conn.operation_reply.options)        # what the proxy applied (D9)
        """
        channel, conn = self._request(
            Command.CONNECT,
            dest_host,
            dest_port,
            initial_data=initial_data,
            options=stack_options,
            session=session,
            idempotent=idempotent,
            tfo=tfo,
            timeout=timeout,
        )
        return channel.sock, conn

    def bind(
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

            binding = proxy.bind()
            print("tell the peer to connect to", binding.address)
            sock = binding.accept(timeout=60)      # second Operation Reply
            print("peer is", binding.peer_address)
        """
        channel, conn = self._request(
            Command.BIND,
            address,
            port,
            initial_data=b"",
            options=stack_options,
            session=session,
            idempotent=idempotent,
            tfo=tfo,
            timeout=timeout,
        )
        return Binding(channel, conn)

    def noop(
        self,
        *,
        options: Iterable[Option] = (),
        session: Session | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ClientConnection:
        """Send a NOOP request (checks credentials; starts a session when given one)."""
        _, conn = self._request(
            Command.NOOP,
            "0.0.0.0",
            0,
            initial_data=b"",
            options=options,
            session=session,
            idempotent=False,
            tfo=False,
            timeout=timeout,
        )
        return conn


class Binding:
    """A BIND in progress; see `Proxy.bind`."""

    def __init__(self, channel: _Channel, conn: ClientConnection) -> None:
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
    def peer_address(self) -> tuple[str, int] | None:
        """``(address, port)`` of the connecting host, once known."""
        reply = self.connection.peer_reply
        return None if reply is None else (reply.address, reply.port)

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait for the second Operation Reply; return the socket, now the data channel.

        Raises:
            ProxyError: the proxy reported a failure instead of a peer; TimeoutError.
        """
        self._channel.deadline = _Deadline(timeout)
        try:
            _drive(self._channel, self.connection, _PEER_REPLY)
        except BaseException:
            self._channel.close()
            raise
        self._channel.sock.settimeout(None)
        return self._channel.sock

    def close(self) -> None:
        """Stop waiting: close the connection to the proxy."""
        self._channel.close()

    def __enter__(self) -> Binding:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.connection.state is not ClientState.ESTABLISHED:
            self.close()


class Session:
    """A SOCKS 6 session (blocking flavour), thread-safe; see the asyncio `Session`.

    Example::

        with Session("socks6://alice:s3cret@127.0.0.1:1080", tokens=16) as session:
            a = session.connect("example.com", 80)
            b = session.connect("example.org", 80, idempotent=True)

    Args:
        proxy: proxy URL or `Proxy`.
        tokens: idempotence token window to request (0: none).
    """

    def __init__(self, proxy: str | Proxy, *, tokens: int = 0) -> None:
        self.proxy = Proxy.from_url(proxy) if isinstance(proxy, str) else proxy
        """The proxy this session lives on."""
        self.core = ClientSession(tokens=tokens)
        """The sans-IO bookkeeping (state, Session ID, token window)."""
        self._cond = threading.Condition()

    @property
    def session_id(self) -> bytes | None:
        """The Session ID, once granted."""
        return self.core.session_id

    def _begin(self, idempotent: bool, timeout: float | None) -> tuple[Option, ...]:
        deadline = _Deadline(timeout)
        while True:
            with self._cond:
                state = self.core.state
                if state is SessionState.PENDING:
                    self._cond.wait(deadline.remaining())
                    continue
                if not (idempotent and state is SessionState.NEW):
                    return self.core.request_options(idempotent=idempotent)
            # A token needs a window, which needs an established session: NOOP first.
            self.proxy.noop(session=self, timeout=deadline.remaining())
            if self.core.state is SessionState.DECLINED:
                raise Socks6Error("the proxy declined the session: no idempotence tokens")

    def _end(self, initiator: bool) -> None:
        with self._cond:
            if initiator and self.core.state is SessionState.PENDING:
                # The initiating request ended before its Operation Reply.
                self.core.on_initiation_done(succeeded=False)
            self._cond.notify_all()

    def connect(self, dest_host: str, dest_port: int, **kwargs: Any) -> socket.socket:
        """`Proxy.connect` inside this session (same keyword arguments)."""
        return self.proxy.connect(dest_host, dest_port, session=self, **kwargs)

    def connect_tunnel(
        self, dest_host: str, dest_port: int, **kwargs: Any
    ) -> tuple[socket.socket, ClientConnection]:
        """`Proxy.connect_tunnel` inside this session (same keyword arguments)."""
        return self.proxy.connect_tunnel(dest_host, dest_port, session=self, **kwargs)

    def bind(self, address: str = "0.0.0.0", port: int = 0, **kwargs: Any) -> Binding:
        """`Proxy.bind` inside this session (same keyword arguments)."""
        return self.proxy.bind(address, port, session=self, **kwargs)

    def close(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Tear the session down (NOOP + Session ID + Session Teardown) and forget it.

        Failures of the teardown exchange are ignored: the session is closed locally
        whatever the proxy answers.
        """
        with self._cond:
            options = self.core.teardown_options()
        if not options:
            return
        try:
            # SES-05: the teardown request is outside any session: it carries credentials.
            self.proxy.noop(options=options, timeout=timeout)
        except (Socks6Error, OSError):
            pass

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
