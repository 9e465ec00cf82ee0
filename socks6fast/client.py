"""Blocking SOCKS 6 client (plain sockets, no asyncio): `Proxy`, `Binding`, `Session`, `UDPAssociation`.

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
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar, Unpack

from ._client_base import (
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
from .errors import AssociationClosedError, Socks6Error
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
    association_init,
)
from .proto.client_udp import AssociationEnded, ClientAssociation, icmp_error
from .proto.messages import Datagram, DatagramError, Option
from .proto.states import NEED_DATA

if TYPE_CHECKING:
    from .net.dtls import DTLSClientConnection

__all__ = [
    "DEFAULT_TIMEOUT",
    "TCP_FASTOPEN_CONNECT",
    "Binding",
    "ConnectOptions",
    "Proxy",
    "RequestOptions",
    "Session",
    "UDPAssociateOptions",
    "UDPAssociation",
    "enable_tfo_connect",
]

T = TypeVar("T")


class _Deadline:
    def __init__(self, timeout: float | None, message: str = "SOCKS 6 handshake timed out") -> None:
        self._at = None if timeout is None else time.monotonic() + timeout
        self.message = message

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError(self.message)
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
            raise TimeoutError(self.deadline.message)

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

    def udp_associate(
        self,
        address: str = "0.0.0.0",
        port: int = 0,
        *,
        session: Session | None = None,
        **kwargs: Unpack[UDPAssociateOptions],
    ) -> UDPAssociation:
        """UDP ASSOCIATE: relay UDP datagrams through the proxy.

        Arguments, return value and errors: those of the asyncio flavour's
        ``socks6fast.asyncio.client.udp_associate`` (``address``/``port``: the desired
        bind address and port of the proxy's socket towards remote hosts).

        Example::

            with proxy.udp_associate(transport="udp") as assoc:
                assoc.sendto(b"ping", ("127.0.0.1", 9999))
                data, (host, port) = assoc.recvfrom(timeout=5)
        """
        timeout = kwargs.get("timeout", DEFAULT_TIMEOUT)
        core = new_association(kwargs, tls=self.url.tls)
        deadline = _Deadline(timeout)
        performer = _Performer(deadline, self._open_channel, session)
        channel, conn = performer.run(self._udp_flow(address, port, session, kwargs))
        _Performer(deadline).run(association_init(channel, conn, core))
        association = UDPAssociation(channel, conn, core, kwargs.get("udp_port"))
        try:
            if core.transport == "dtls":
                association._start_dtls(kwargs.get("proxy_dtls"), self.server_hostname, deadline)
            if kwargs.get("server_mode", False):
                association._confirm(deadline)
        except BaseException:
            association.close()
            raise
        return association


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


class UDPAssociation(AssociationBase[_Channel]):
    """A UDP association through the proxy (blocking flavour); see `Proxy.udp_associate`.

    The TCP connection (TLS for ``socks6+tls``) carries the control messages, and with
    ``transport="tcp"`` the datagrams; with ``transport="udp"`` a connected UDP socket
    talks to the proxy's UDP port, with ``transport="dtls"`` (the ``socks6+tls`` default,
    D30) the same socket carries a DTLS connection to the proxy's DTLS port. Nothing runs
    in the background: `recvfrom` reads both and sends the server-mode resends when due.
    One thread may send while another receives; TCP writes are serialised, and every use
    of the TLS (DTLS) object is, since one OpenSSL connection must not be used by two
    threads at once.
    """

    def __init__(
        self, channel: _Channel, conn: ClientConnection, core: ClientAssociation, udp_port: int | None
    ) -> None:
        super().__init__(channel, conn, core)
        self._inbox: deque[Datagram | DatagramError | OSError] = deque()
        self._end: BaseException | None = None
        self._lock = threading.Lock()  # the core, the inbox and the TCP socket
        self._recv_lock = threading.Lock()  # one receiver at a time
        self._tcp = channel.sock
        self._tcp.settimeout(None)
        self._udp: socket.socket | None = None
        self._dtls: DTLSClientConnection | None = None
        """``transport="dtls"``: the DTLS connection over ``_udp`` (used under ``_lock`` only)."""
        self._dtls_failed = False
        if core.transport in ("udp", "dtls"):
            # D16: the proxy's UDP (DTLS) port has the TCP (TLS) listener's address and port.
            peer = self._tcp.getpeername()
            target = (peer[0], peer[1] if udp_port is None else udp_port, *peer[2:])
            udp = socket.socket(self._tcp.family, socket.SOCK_DGRAM)
            try:
                udp.connect(target)
            except BaseException:
                udp.close()
                self._channel.close()
                raise
            self._udp = udp

    def _start_dtls(self, proxy_dtls: object, server_hostname: str | None, deadline: _Deadline) -> None:
        # The DTLS handshake with the proxy's DTLS port over the connected UDP socket, with
        # OpenSSL's retransmissions (UDP-02, TRN-03). Imported here: pyOpenSSL is loaded only
        # by a client that speaks DTLS.
        from .net.dtls import DTLSClientConnection, DTLSError, proxy_dtls_context  # noqa: PLC0415

        udp = self._udp
        assert udp is not None
        peer = udp.getpeername()
        conn = DTLSClientConnection(proxy_dtls_context(proxy_dtls), server_hostname)  # type: ignore[arg-type]
        conn.start(time.monotonic())
        with self._lock:
            self._dtls = conn
        tls = isinstance(self._tcp, _ssl.SSLSocket)
        hint = f"transport='tcp' carries the datagrams on the {'TLS' if tls else 'TCP'} connection instead"
        try:
            while True:
                for datagram in conn.datagrams_to_send():
                    udp.send(datagram)
                if conn.error is not None:
                    raise conn.error
                if conn.established:
                    return
                try:
                    remaining = deadline.remaining()
                except TimeoutError:
                    raise DTLSError(
                        f"DTLS handshake with the proxy's DTLS port {peer[0]}:{peer[1]}: no answer in time "
                        f"({hint})"
                    ) from None
                wait = remaining
                if conn.retransmit_at is not None:
                    until = max(0.0, conn.retransmit_at - time.monotonic())
                    wait = until if wait is None else min(wait, until)
                ready = select.select([udp, self._tcp], [], [], wait)[0]
                if self._tcp in ready:
                    # Probe 19 F7: the association's TCP connection ended (the proxy closes
                    # it when no datagram comes, UDP-07): the handshake has no purpose left.
                    try:
                        self._read_tcp()
                    except (Socks6Error, OSError):
                        raise DTLSError(
                            f"DTLS handshake with the proxy's DTLS port {peer[0]}:{peer[1]}: the proxy "
                            f"closed the association's {'TLS' if tls else 'TCP'} connection first ({hint})"
                        ) from None
                if udp in ready:
                    try:
                        data = udp.recv(2**16)
                    except OSError as exc:  # ICMP: nothing listens on the DTLS port
                        raise DTLSError(f"DTLS proxy {peer[0]}:{peer[1]}: {exc.strerror or exc}") from None
                    conn.datagram_received(data, time.monotonic())
                elif conn.retransmit_at is not None and time.monotonic() >= conn.retransmit_at:
                    conn.handle_timer(time.monotonic())
        except BaseException:
            self._finish(AssociationClosedError("the DTLS handshake failed"))
            raise

    def _send_datagram(self, message: bytes) -> None:
        # Plain UDP, or one DTLS record (encrypted under the lock: one thread at a time uses
        # an OpenSSL connection).
        assert self._udp is not None
        if self._dtls is not None:
            with self._lock:
                message = self._dtls.send(message)
        self._udp.send(message)

    # -- sending

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        """Send ``data`` to ``address`` (an IP literal or a name the proxy resolves, D20).

        Raises:
            AssociationClosedError: the association is over (or the reason it ended).
            LocalProtocolError: too long for one Datagram message (65535 bytes with the header).
        """
        host, port = address
        with self._lock:
            if self._end is not None:
                raise self._end
            message = self.core.datagram(bytes(data), host, port)
            if self._udp is None:
                self._tcp.sendall(message)  # under the lock: messages never interleave
                return
        self._send_datagram(message)

    def _confirm(self, deadline: _Deadline) -> None:
        # Server mode (UDP-06): the empty datagram, resent over UDP until confirmed (UDP-10).
        with self._lock:
            message = self.core.confirm_datagram(time.monotonic())
            if self._udp is None:
                self._tcp.sendall(message)
        if self._udp is not None:
            self._send_datagram(message)
        while not self.confirmed:
            if self._end is not None:
                raise self._end
            self._wait(deadline)

    # -- receiving

    def recv_message(self, timeout: float | None = None) -> Datagram | DatagramError:
        """The next `Datagram` or `DatagramError` message as it came (for events, not exceptions).

        Raises:
            AssociationClosedError: the association is over and nothing is left.
            RemoteProtocolError: the proxy broke the protocol (the association is over).
            TimeoutError: nothing arrived within ``timeout`` seconds.
            OSError: the proxy's UDP port reported an error (e.g. ConnectionRefusedError).
        """
        # Not a handshake: the association is up and nothing arrived in time.
        deadline = _Deadline(timeout, f"no datagram within {timeout} s")
        with self._recv_lock:
            while True:
                with self._lock:
                    item = self._inbox.popleft() if self._inbox else None
                    if item is None and self._end is not None:
                        raise self._end
                if isinstance(item, OSError):
                    raise item
                if item is not None:
                    return item
                self._wait(deadline)

    def recvfrom(self, timeout: float | None = None) -> tuple[bytes, tuple[str, int]]:
        """The next datagram: ``(payload, (source address, source port))``.

        Raises:
            ICMPError: an ICMP error report (with ``udp_error=True``); a subclass per code.
            AssociationClosedError, RemoteProtocolError, TimeoutError, OSError: see
                `recv_message`.
        """
        message = self.recv_message(timeout)
        if isinstance(message, DatagramError):
            raise icmp_error(message)
        return message.payload, (message.header.address, message.header.port)

    def _wait(self, deadline: _Deadline) -> None:
        # Wait for the TCP connection, the UDP socket or the resend timer, and handle
        # what is ready. TimeoutError when ``deadline`` passes.
        if self._end is not None:
            return  # closed meanwhile (another thread): the caller sees ``_end``
        remaining = deadline.remaining()
        timer = self.core.get_timer()
        if timer is not None:
            until_timer = max(0.0, timer - time.monotonic())
            remaining = until_timer if remaining is None else min(remaining, until_timer)
        tcp_pending = isinstance(self._tcp, _ssl.SSLSocket) and self._tcp.pending() > 0
        poller = select.poll()
        poller.register(self._tcp, select.POLLIN)
        if self._udp is not None:
            poller.register(self._udp, select.POLLIN)
        ready = {
            fd for fd, _ in poller.poll(0 if tcp_pending else None if remaining is None else remaining * 1000)
        }
        try:
            if tcp_pending or self._tcp.fileno() in ready:
                self._read_tcp()
            if self._udp is not None and self._udp.fileno() in ready:
                self._read_udp()
            self._run_timer()
        except (Socks6Error, OSError) as exc:
            # A protocol error, the end of the TCP connection, the last resend unanswered
            # (TimeoutError), a network error: the association is over; recv raises it.
            self._finish(exc)

    def _read_tcp(self) -> None:
        with self._lock:
            if self._end is not None:
                return
            try:
                data = self._tcp.recv(2**16)
            except (ConnectionResetError, _ssl.SSLEOFError):
                data = b""  # the end of the TCP connection: the end of the association
            self.core.receive_data(data)
            while (event := self.core.next_event()) is not NEED_DATA:
                if isinstance(event, AssociationEnded):
                    raise AssociationClosedError("the proxy closed the association's TCP connection")
                if isinstance(event, Datagram | DatagramError):
                    self._inbox.append(event)
                # AssociationConfirmation: the core's state says it (``confirmed``).

    def _read_udp(self) -> None:
        assert self._udp is not None
        while True:
            try:
                data = self._udp.recv(2**16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                # An ICMP error about the proxy's UDP port itself (the socket is connected):
                # typically ConnectionRefusedError, no UDP port there. Raised by the next
                # recvfrom, as the asyncio flavour does; the association goes on.
                with self._lock:
                    self._inbox.append(exc)
                return
            answer: list[bytes] = []
            with self._lock:
                if self._dtls is None:
                    payloads: Iterable[bytes] = (data,)
                else:
                    # Decrypted datagrams (none for a handshake retransmission, which may
                    # ask for an answer: sent below).
                    self._dtls.datagram_received(data, time.monotonic())
                    payloads = list(self._dtls.received)
                    self._dtls.received.clear()
                    answer = self._dtls.datagrams_to_send()
                    if self._dtls.error is not None and not self._dtls_failed:
                        self._dtls_failed = True
                        # The proxy closed the DTLS connection, or it failed: the next
                        # recvfrom says so; the association lives on with its TCP connection.
                        self._inbox.append(self._dtls.error)
                for payload in payloads:
                    message = self.core.receive_datagram(payload)
                    if message is not None:
                        self._inbox.append(message)
            for datagram in answer:
                self._udp.send(datagram)

    def _run_timer(self) -> None:
        with self._lock:
            again = self.core.handle_timer(time.monotonic())
        if again is not None and self._udp is not None:
            self._send_datagram(again)

    def _finish(self, exc: BaseException) -> None:
        with self._lock:
            if self._end is None:
                self._end = exc
            self.core.close()
            dtls, self._dtls = self._dtls, None
            goodbye: list[bytes] = []
            if dtls is not None and not dtls.closed:
                dtls.close()
                goodbye = dtls.datagrams_to_send()
        self._channel.close()
        if self._udp is not None:
            for datagram in goodbye:  # close_notify: the proxy ends the channel at once
                with contextlib.suppress(OSError):
                    self._udp.send(datagram)
            self._udp.close()

    # -- the end

    def close(self) -> None:
        """End the association: close the TCP connection (and the UDP socket)."""
        self._finish(AssociationClosedError("the association was closed"))

    def __enter__(self) -> UDPAssociation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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

    def udp_associate(
        self, address: str = "0.0.0.0", port: int = 0, **kwargs: Unpack[UDPAssociateOptions]
    ) -> UDPAssociation:
        """`Proxy.udp_associate` inside this session (same keyword arguments)."""
        return self.proxy.udp_associate(address, port, session=self, **kwargs)

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
