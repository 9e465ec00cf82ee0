"""One client connection, from accept to close: the loop that performs what the core decides.

Strategy (aioquic ``asyncio/protocol.py``): `ConnectionHandler.run` reads the first bytes,
lets `socks6fast.proto.server.server_connection` pick the protocol (D1), then asks the core
connection for its next action and performs it (read, write, check credentials, resolve,
dial, listen, wait for the peer, relay, close) until the connection is handed to the relay or
closed. It decides nothing the draft decides; its own choices are about I/O: how to read
without a wasted wake-up, where scrypt runs, how long to wait for a BIND peer. Each finished
connection logs one `ConnectionRecord` line. On a PROXY protocol listener (D27) the handler
first checks the peer is a trusted balancer and reads its header (`ProxyHeaderReader`), so
that ``client`` is the real client's address before anything else uses it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Protocol

from ...config import Config
from ...constants import AddressType, AuthMethod, Command, ReplyCode
from ...dataplane.engine import RelayEnd, RelayResult
from ...dataplane.relayer import Relayer
from ...dataplane.udp import UdpConfirmed, UdpEnded
from ...errors import LocalProtocolError, ProxyHeaderError, RemoteProtocolError, SessionStoreError
from ...net.stackopts import apply_leg_options, mptcp_in_use, read_leg_options
from ...proto import codec
from ...proto.actions import (
    ApplyClientOptions,
    AskSessionStore,
    Associate,
    AwaitPeer,
    CheckCredentials,
    Claim,
    Close,
    Dial,
    EndSession,
    HoldBacklog,
    Listen,
    Listening,
    OpenAssociation,
    Relay,
    Resolve,
    Send,
)
from ...proto.auth import FailedAuthLimiter
from ...proto.proxy_header import ProxyTrust
from ...proto.server import (
    NEED_DATA,
    ServerConnection,
    ServerContext,
    Socks5ServerConnection,
    server_connection,
)
from ...proto.server_common import detect_protocol, foreign_protocol
from ...proto.server_wire import Socks5ServerWire, failure_reply
from ...proto.socks5 import Socks5Greeting, Socks5MethodSelection, Socks5Reply, Socks5Request, UserPassRequest
from ...proto.stack import AppliedLeg
from ...proto.states import NEED_DATA as WIRE_NEED_DATA
from ...proto.states import Protocol as WireProtocol
from .bind import (
    BacklogListener,
    ClientGone,
    PeerListener,
    close_session_listeners,
    hold_backlog,
    listen_address,
    open_listener,
    wait_for_peer,
)
from .dial import Remote, Resolver, dial, resolve
from .record import ConnectionRecord, describe_error, format_address
from .streams import ClientStream, ProxyHeaderReader, SocketStream, tls_handshake
from .udp import AssociationSockets, TLSBridge, UdpService, open_association

__all__ = ["REFUSAL_TIMEOUT", "ConnectionHandler", "ServerView", "refuse_client"]

log = logging.getLogger("socks6fast.server")

#: The log's words for a client that spoke another protocol to the plain port (issue 14).
_FOREIGN = {
    "http": "HTTP request on the SOCKS port",
    "tls": "TLS ClientHello on the plain SOCKS port",
    "socks4": "SOCKS 4 request on the SOCKS port",
}

_Conn = ServerConnection | Socks5ServerConnection

#: Seconds a client refused at max_connections has to send the bytes its refusal answers.
REFUSAL_TIMEOUT = 1.0


async def refuse_client(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, *, proxy_header: bool = False
) -> bool:
    """Answer a client the full proxy cannot serve (past ``max_connections``; hardening issue
    12 defect 3) with General Failure as soon as its first bytes arrive, instead of leaving it
    in the listen backlog. SOCKS 6: nothing was sent yet, so the General Failure Operation
    Reply reads as a failed Authentication Reply too (D14: ``06 01 ...``). SOCKS 5: RFC 1928
    REP 0x01 needs a request to answer (`_refuse_socks5`). With ``proxy_header`` (a trusted
    balancer on a PROXY protocol listener, D27) the header is read past first, so the client
    behind the balancer gets the same answer. Closes the socket; True when the client got its
    answer."""
    stream = SocketStream(loop, sock)
    answered = False
    try:
        async with asyncio.timeout(REFUSAL_TIMEOUT):
            first: bytes | None = None
            if proxy_header:
                # Past the header, the client's own bytes (a TLS listener's ClientHello is closed).
                _, first = await ProxyHeaderReader(loop, sock, peek=False).read()
            if not first:
                first = stream.recv_now()
            if first is None:
                first = await stream.recv()
            protocol = detect_protocol(first[0]) if first else None
            if protocol is WireProtocol.SOCKS6:
                await stream.send(codec.encode_operation_reply(failure_reply(ReplyCode.GENERAL_FAILURE)))
                answered = True
            elif protocol is WireProtocol.SOCKS5:
                answered = await _refuse_socks5(loop, stream, first)
        await stream.linger_close()
    except (OSError, TimeoutError, EOFError, RemoteProtocolError, LocalProtocolError, ProxyHeaderError):
        pass
    finally:
        stream.close()
    return answered


async def _refuse_socks5(loop: asyncio.AbstractEventLoop, stream: SocketStream, first: bytes) -> bool:
    """RFC 1928 General Failure (REP 0x01) needs a request to answer: select "no
    authentication" when the client offers it, then answer its request. A client that offers
    only methods needing credentials is closed (saying its password was wrong would be a lie,
    and asking for it pointless)."""
    wire = Socks5ServerWire(handshake_timeout=REFUSAL_TIMEOUT, now=loop.time())
    wire.receive_data(first)

    async def next_event() -> object:
        while True:
            event = wire.next_event()
            if event is not WIRE_NEED_DATA:
                return event
            data = await stream.recv()
            if not data:
                raise EOFError
            wire.receive_data(data)

    event = await next_event()
    if not isinstance(event, Socks5Greeting) or AuthMethod.NONE not in event.methods:
        return False
    await stream.send(wire.send(Socks5MethodSelection(AuthMethod.NONE)))
    event = await next_event()
    if not isinstance(event, Socks5Request):
        return False
    await stream.send(wire.send(Socks5Reply(ReplyCode.GENERAL_FAILURE, AddressType.IPV4, "0.0.0.0", 0)))
    return True


class ServerView(Protocol):
    """What a handler uses of the `Server` that accepted its connection."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def config(self) -> Config: ...
    @property
    def relayer(self) -> Relayer: ...
    @property
    def active_connections(self) -> int: ...

    context: ServerContext
    limiter: FailedAuthLimiter
    checks_in_flight: dict[bytes, asyncio.Future[str | None]]
    resolver: Resolver | None
    tls_context: ssl.SSLContext | None
    udp: UdpService | None

    def connection_finished(self, record: ConnectionRecord) -> None: ...


class ConnectionHandler:
    """Serves one accepted client connection for `Server` (one task each).

    Args:
        server: the server that accepted it (its context, limiter, relayer, resolver).
        sock: the accepted socket (non-blocking).
        client: the client's address and port (the peer of ``sock``).
        tls: it came in on a TLS listener.
        proxy: the listener speaks the PROXY protocol and trusts these balancers (D27);
            None (most listeners): it does not, and nothing is read before the SOCKS bytes.
    """

    __slots__ = (
        "_loop",
        "_server",
        "client",
        "client_options",
        "detected",
        "error",
        "failed_user",
        "handshake",
        "listener",
        "owns_listener",
        "proxied_by",
        "proxy",
        "relay_result",
        "remote",
        "remote_owned",
        "sock",
        "started",
        "tls",
        "udp_confirmed",
        "udp_result",
        "udp_sockets",
    )

    def __init__(
        self,
        server: ServerView,
        sock: socket.socket,
        client: tuple[str, int],
        tls: bool,
        proxy: ProxyTrust | None = None,
    ) -> None:
        self._server = server
        self._loop = server.loop
        self.sock = sock
        self.client = client
        """The client's address: the socket's peer, or the one a PROXY header named."""
        self.tls = tls
        self.proxy = proxy
        self.proxied_by: tuple[str, int] | None = None
        """The load balancer that sent a PROXY header (the socket's peer), if one did."""
        self.started = time.monotonic()
        self.error = ""
        """Why the connection ended early, when the I/O says so (else the core's reason)."""
        self.client_options: AppliedLeg | None = None
        self.failed_user: str | None = None
        """The user name of a failed login (issue 14: logged for fail2ban)."""
        self.detected = ""
        """Another protocol spoken to the plain port (`foreign_protocol`), for the log."""
        self.handshake: float | None = None
        """Seconds from accept to the hand-off to the data plane."""
        self.remote: Remote | None = None
        """The remote leg once connected (CONNECT) or accepted (BIND)."""
        self.remote_owned = False
        """``remote.sock`` is still ours to close (the relay takes it over)."""
        self.listener: PeerListener | BacklogListener | None = None
        """The BIND listener to accept from or to hold (CMD-04, CMD-05)."""
        self.owns_listener = False
        """``listener`` is ours to close (a claimed one belongs to its first BIND)."""
        self.relay_result: RelayResult | None = None
        self.udp_sockets: AssociationSockets | None = None
        """UDP ASSOCIATE: the sockets opened, until the UDP data plane takes them."""
        self.udp_result: UdpEnded | None = None
        """UDP ASSOCIATE: how the association ended, with its counts."""
        self.udp_confirmed: UdpConfirmed | None = None
        """UDP ASSOCIATE: how its first datagram came (None: none came)."""

    async def run(self) -> None:
        """Serve the connection and log its line; never raises but CancelledError."""
        stream: ClientStream | None = None
        conn: _Conn | None = None
        try:
            early = b""
            if self.proxy is not None:
                received = await self._receive_proxy_header()
                if received is None:
                    return
                early = received
            if self.tls:
                server = self._server
                assert server.tls_context is not None
                timeout = server.config.server.handshake_timeout
                stream = await tls_handshake(self._loop, self.sock, server.tls_context, timeout)
                if stream is None:
                    self.error = "TLS handshake failed"
                    return
            else:
                stream = SocketStream(self._loop, self.sock)
            # The first bytes: one handshake deadline from here on, whatever the protocol.
            context = self._server.context
            started = self._loop.time()
            first = early or stream.recv_now()
            if first is None:
                try:
                    async with asyncio.timeout(context.handshake_timeout):
                        first = await stream.recv()
                except TimeoutError:
                    self.error = "handshake timed out"
                    return
            if first:
                if detect_protocol(first[0]) is None:
                    # Answered with the Version Mismatch Reply as always (REQ-01); the log
                    # says what the client spoke (issue 14).
                    self.detected = foreign_protocol(first) or ""
                conn = server_connection(context, self.client[0], first, started)
                await self._drive(stream, conn)
        except ClientGone:
            pass
        except RemoteProtocolError as exc:
            self.error = str(exc)
        except (OSError, TimeoutError, EOFError) as exc:
            self.error = f"{type(exc).__name__}: {describe_error(exc)}"
        except asyncio.CancelledError:
            self.error = "server shutting down"
            raise
        except Exception as exc:  # a bug: keep serving; one line, the traceback only at DEBUG
            if stream is not None and conn is not None:
                await self._abort(stream, conn)
            self.error = f"internal error: {exc!r}"
            log.warning("internal error while serving %s: %r", format_address(*self.client), exc)
            log.debug("traceback of the internal error", exc_info=True)
        finally:
            self._finish(stream, conn)

    async def _receive_proxy_header(self) -> bytes | None:
        """A PROXY protocol listener: only a trusted balancer may connect, and it must start
        with a header (proxy-protocol.txt sections 2 and 5; D27). Take the client's address
        from it and return the SOCKS bytes read after it (on a plain listener), or None when
        the connection is refused (``error`` says why; the caller closes it)."""
        proxy = self.proxy
        assert proxy is not None
        peer = self.client
        if not proxy.trusts(peer[0]):
            # Closed before reading anything: a header from here would let the client choose
            # the address the rules see, and without one it is not a balancer of this listener.
            self.error = "PROXY protocol listener: the peer is not in proxy_protocol_from; closed"
            return None
        timeout = self._server.context.handshake_timeout
        reader = ProxyHeaderReader(self._loop, self.sock, peek=self.tls)
        try:
            got = reader.read_now()
            if got is None:
                async with asyncio.timeout(timeout):
                    got = await reader.read()
            header, early = got
        except TimeoutError:
            self.error = f"PROXY header: none within {timeout:g}s (server.handshake_timeout)"
            return None
        except ProxyHeaderError as exc:
            self.error = f"PROXY header: {exc}"
            return None
        except EOFError as exc:
            self.error = str(exc)
            return None
        self.proxied_by = peer
        if header.source is not None:
            self.client = header.source
        return early

    async def _drive(self, stream: ClientStream, conn: _Conn) -> None:
        """Perform the core's actions until the connection is relayed or closed."""
        loop = self._loop
        now = loop.time()
        while True:
            action = conn.next_action(now)
            if isinstance(action, Send):
                await stream.send(action.data)
            elif action is NEED_DATA:
                timed_out = await self._receive(stream, conn)
                if timed_out is not None:
                    now = timed_out
                    continue
            elif isinstance(action, Dial):
                try:
                    remote = await dial(loop, action)
                except (OSError, TimeoutError) as exc:
                    conn.dial_failed(exc, self._connect_error(action.host, action.port, exc))
                else:
                    self.remote, self.remote_owned = remote, True
                    conn.dial_finished(remote.dialed())
            elif isinstance(action, Relay):
                self.handshake = time.monotonic() - self.started
                await self._relay(stream, action, conn)
                return
            elif isinstance(action, Close):
                if self.remote is not None and self.remote_owned:
                    self.remote.sock.close()  # a refused BIND peer: gone before the linger
                    self.remote_owned = False
                if action.linger:
                    await stream.linger_close()
                return
            elif isinstance(action, CheckCredentials):
                await self._check_credentials(conn, action.credentials)
            elif isinstance(action, AskSessionStore):
                await self._ask_session_store(conn, action)
            elif isinstance(action, ApplyClientOptions):
                # STK-03 on the client leg (a TLS leg without a socket object: not applied).
                applied = None if stream.sock is None else apply_leg_options(stream.sock, action.options)
                self.client_options = applied
                assert isinstance(conn, ServerConnection)
                conn.client_options_applied(applied)
            elif isinstance(action, Resolve):
                await self._resolve(conn, action)
            elif isinstance(action, Listen):
                self._listen(stream, conn, action)
            elif isinstance(action, Claim):
                self._claim(conn, action)
            elif isinstance(action, AwaitPeer):
                await self._await_peer(stream, conn)
            elif isinstance(action, OpenAssociation):
                self._open_association(stream, conn, action)
            elif isinstance(action, Associate):
                self.handshake = time.monotonic() - self.started
                await self._associate(stream, action, conn)
                return
            elif isinstance(action, HoldBacklog):
                assert isinstance(self.listener, BacklogListener)
                await hold_backlog(loop, stream, self.listener)
            else:
                assert isinstance(action, EndSession)
                close_session_listeners(action.session)
            now = loop.time()

    async def _receive(self, stream: ClientStream, conn: _Conn) -> float | None:
        """Read client bytes into ``conn``; on the handshake deadline return the time to pass
        to ``next_action`` (at or after the deadline: the loop's timer may fire a little early)."""
        data = stream.recv_now()
        if data is None and self._server.active_connections > 1:
            # The client is answering a reply we just sent (SOCKS 5 method selection, D7 slow
            # authentication). With other connections in progress, give the loop one turn (it
            # has work) and look again before paying for a reader registered and removed
            # (several epoll_ctl calls on uvloop). Alone, the turn would only add an empty poll.
            await asyncio.sleep(0)
            data = stream.recv_now()
        if data is None:
            deadline = conn.get_timer()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await stream.recv()
            except TimeoutError:
                return max(self._loop.time(), deadline or 0.0)  # REQ-08: the core closes
        conn.receive_data(data)
        return None

    async def _check_credentials(self, conn: _Conn, credentials: UserPassRequest) -> None:
        server = self._server
        users = server.context.users
        # Credentials verified before: a keyed-hash lookup, answered on the loop; it costs no
        # scrypt run, so the limiter does not apply (a user who logged in before keeps
        # working while a guesser has spent the budgets of their name or address).
        user = users.authenticate_cached(credentials.username, credentials.password)
        if user is not None:
            conn.credentials_checked(user)
            return
        loop = self._loop
        name = credentials.username.decode("utf-8", "replace")
        username, password = credentials.username, credentials.password
        key = users.check_key(username, password)
        running = server.checks_in_flight.get(key)
        if running is not None:
            # The same credentials are being checked for another connection: share that
            # check's answer (one scrypt run, no limiter tokens: a burst of correct logins
            # after a start is not taken for a burst of failures).
            user = await asyncio.shield(running)
        else:
            # AUTH-05, hardening issue 12 defect 5: the core's limiter decides whether scrypt runs.
            admission = server.limiter.admit(self.client[0], name, loop.time())
            if admission.refused is not None:
                self.failed_user = name
                conn.credentials_checked(None, admission.refused)  # failed without paying for scrypt
                return
            check: asyncio.Future[str | None] = loop.create_future()
            server.checks_in_flight[key] = check
            user = None
            try:
                if admission.delay > 0:
                    await asyncio.sleep(admission.delay)  # a check slot (auth_checks_per_second)
                # scrypt costs ~35-50 ms of CPU: keep it off the event loop.
                user = await loop.run_in_executor(None, users.authenticate, username, password)
            finally:
                del server.checks_in_flight[key]
                check.set_result(user)  # waiters get a failure if this check was cut short
            if user is not None:
                server.limiter.refund(admission)  # only failures count
        if user is None:
            self.failed_user = name  # issue 14: the attempted name goes to the log
        conn.credentials_checked(user)

    async def _ask_session_store(self, conn: _Conn, action: AskSessionStore) -> None:
        # Issue 13 item 2: one round trip to the shared store (Redis); the store logs an
        # outage once, the core answers the request that needed it (D37).
        store = self._server.context.shared_sessions
        assert isinstance(conn, ServerConnection)
        if store is None:  # turned off by a reload while this request waited
            conn.session_store_failed("the shared session store was turned off by a reload")
            return
        try:
            answer = await store.answer(action.query)
        except SessionStoreError as exc:
            conn.session_store_failed(str(exc))
        else:
            conn.session_answered(answer)

    async def _resolve(self, conn: _Conn, action: Resolve) -> None:
        try:
            async with asyncio.timeout_at(action.deadline):
                targets = await resolve(self._loop, self._server.resolver, action.host, action.port)
        except TimeoutError as exc:
            conn.resolve_failed(exc, self._connect_error(action.host, action.port, exc))
        except (socket.gaierror, UnicodeError) as exc:
            # UnicodeError: a name the idna codec rejects fails before any lookup.
            conn.resolve_failed(exc, f"cannot resolve {action.host!r}: {exc}")
        else:
            conn.resolved(targets)

    def _listen(self, stream: ClientStream, conn: _Conn, action: Listen) -> None:
        address_type, host = listen_address(stream, action)
        try:
            sock, applied, is_mptcp = open_listener(address_type, host, action)
        except OSError as exc:
            conn.listen_failed(exc, f"bind {format_address(host, action.port)}: {describe_error(exc)}")
            return
        name = sock.getsockname()
        if action.session is not None:
            # CMD-05: kept in the session for further BINDs to claim, while this one stays.
            self.listener = BacklogListener(
                self._loop, sock, action.backlog, tfo=action.tfo, mptcp=is_mptcp, session=action.session
            )
        else:
            self.listener = PeerListener(self._loop, sock, mptcp=is_mptcp)
        self.owns_listener = True
        conn.listening(Listening((str(name[0]), int(name[1])), applied, is_mptcp, action.tfo))

    def _claim(self, conn: _Conn, action: Claim) -> None:
        listener = action.listener
        assert isinstance(listener, BacklogListener)
        self.listener, self.owns_listener = listener, False
        applied = None if action.options.empty else read_leg_options(listener.sock, action.options)
        name = listener.sock.getsockname()
        conn.listening(Listening((str(name[0]), int(name[1])), applied, listener.mptcp, listener.tfo))

    async def _await_peer(self, stream: ClientStream, conn: _Conn) -> None:
        listener = self.listener
        assert listener is not None
        timeout = self._server.config.server.idle_timeout
        try:
            peer, address = await wait_for_peer(self._loop, stream, conn, listener.accept(), timeout)
        finally:
            if self.owns_listener:
                listener.close()  # its one connection came (or never will)
                self.listener = None
        host, port = str(address[0]), int(address[1])
        mptcp = listener.mptcp and mptcp_in_use(peer)
        self.remote, self.remote_owned = Remote(peer, (host, port), mptcp=mptcp), True
        conn.peer_accepted(host, port, mptcp)

    def _connect_error(self, host: str, port: int, exc: BaseException) -> str:
        """The log's cause of a failed connect: our own deadline names the setting."""
        if isinstance(exc, TimeoutError) and exc.errno is None:  # our deadline, not ETIMEDOUT
            timeout = self._server.config.server.connect_timeout
            cause = f"no answer within {timeout:g}s (server.connect_timeout)"
        else:
            cause = describe_error(exc)
        return f"connect to {format_address(host, port)}: {cause}"

    async def _relay(self, stream: ClientStream, action: Relay, conn: _Conn) -> None:
        """The one hand-off to the data plane: the reply is written, the bytes the client sent
        early go first, then the relay owns both sockets."""
        remote = self.remote
        assert remote is not None
        self.remote_owned = False
        # Bandwidth limits of the user and the client address (issue 14 item 4): the
        # buckets the relay draws from, in the engine's C workers or on the asyncio path.
        admission = conn.admission
        up, down = (admission.up, admission.down) if admission is not None else ((), ())
        self.relay_result = await stream.relay(
            self._server.relayer, remote.sock, action.to_remote, action.client_eof, up, down
        )

    def _open_association(self, stream: ClientStream, conn: _Conn, action: OpenAssociation) -> None:
        try:
            self.udp_sockets, opened = open_association(stream, action)
        except OSError as exc:
            if isinstance(action.claim, socket.socket):
                action.claim.close()  # a claimed reservation that could not be used
            where = format_address(action.host, action.port)
            conn.association_failed(exc, f"UDP bind {where}: {describe_error(exc)}")
            return
        conn.association_opened(opened)

    async def _associate(self, stream: ClientStream, action: Associate, conn: _Conn) -> None:
        """The one hand-off to the UDP data plane: it writes the replies, relays the
        association's datagrams and ends it with the client connection (UDP-07)."""
        udp, sockets = self._server.udp, self.udp_sockets
        assert udp is not None and sockets is not None
        bridge: TLSBridge | None = None
        if isinstance(stream, SocketStream) and stream.sock is not None:
            tcp = stream.sock
        else:
            # TLS: the engine gets one end of a socket pair, the bridge pumps the other.
            ours, tcp = TLSBridge.pair()
            bridge = TLSBridge(self._loop, stream, ours)
        try:
            done = udp.add(action, tcp.fileno(), sockets, self.client[0], conn.user)
        except (OSError, ValueError) as exc:
            conn.association_refused(f"the UDP data plane refused the association: {exc}")
            if bridge is not None:
                tcp.close()
                await bridge.close()
            await stream.send(action.refusal)
            await stream.linger_close()
            return
        tcp.detach()  # the engine's now (a plain client socket: the stream no longer owns it)
        self.udp_sockets = None
        if bridge is not None:
            bridge.start()
        else:
            assert isinstance(stream, SocketStream)
            stream.give_up()
        try:
            self.udp_result, self.udp_confirmed = await done
        except asyncio.CancelledError:
            udp.remove(action.association_id)  # shutdown: the engine closes its sockets
            raise
        finally:
            if bridge is not None:
                await bridge.close()

    async def _abort(self, stream: ClientStream, conn: _Conn) -> None:
        """After a bug: a General Failure reply if nothing conclusive was sent, then close."""
        try:
            conn.abort()
            await self._drive(stream, conn)
        except Exception:
            pass

    def _finish(self, stream: ClientStream | None, conn: _Conn | None) -> None:
        if stream is not None:
            stream.close()
        else:
            self.sock.close()
        remote = self.remote
        if remote is not None and self.remote_owned:
            remote.sock.close()
        if self.listener is not None and self.owns_listener:
            self.listener.close()
        if self.udp_sockets is not None:
            self.udp_sockets.close()
            self.udp_sockets = None
        record = ConnectionRecord(
            self.client,
            "tls" if self.tls else "tcp",
            self.started,
            client_options=self.client_options,
            proxied_by=self.proxied_by,
        )
        if conn is not None:
            ended = conn.connection_ended(self._loop.time())
            if ended is not None:
                close_session_listeners(ended)
            if isinstance(conn, ServerConnection) and conn.store_followup is not None:
                shared = self._server.context.shared_sessions
                if shared is not None:
                    shared.send(conn.store_followup)  # touch or D4 teardown, not awaited
            for reservation in conn.released:
                # STK-08: a port reserved "until the original association ends".
                if isinstance(reservation.handle, socket.socket):
                    reservation.handle.close()
            record.protocol = conn.protocol_name
            record.user = conn.user
            record.reply_code = conn.reply_code
            record.error = self.error or conn.error
            request = conn.request
            if request is not None:
                code = int(request.command)
                record.command = _COMMAND_NAMES.get(code) or f"unknown ({code})"
                record.destination = format_address(request.address, request.port)
        else:
            record.error = self.error
        record.failed_user = self.failed_user
        record.handshake = self.handshake
        if self.detected:
            record.detected = self.detected
            record.error = record.error or _FOREIGN[self.detected]
        if remote is not None:
            record.remote_address = remote.address
            record.remote_options = remote.applied
            record.happy_eyeballs = remote.happy_eyeballs
            record.tfo_attempted = remote.tfo_attempted
            record.tfo_syn_acked = remote.tfo_syn_acked
            record.mptcp = remote.mptcp
        result = self.relay_result
        if result is not None:
            record.bytes_up = result.bytes_client_to_remote
            record.bytes_down = result.bytes_remote_to_client
            record.relay_path = result.path
            record.relay_end = result.end.name.lower()
            if result.cause:
                record.error = record.error or f"relay: {result.cause}"
            elif result.end == RelayEnd.ERROR:
                record.error = record.error or "relay: error (the data plane gave no cause)"
            record.relay_close = "rst" if result.reset else "fin"
        udp = self.udp_result
        if udp is not None:
            record.bytes_up, record.bytes_down = udp.bytes_to_remote, udp.bytes_to_client
            record.datagrams_up, record.datagrams_down = udp.datagrams_to_remote, udp.datagrams_to_client
            record.udp_drops, record.icmp_errors = udp.drops, udp.icmp_reported
            confirmed = self.udp_confirmed
            if confirmed is not None:
                # D17: the channel the association was mapped to (a channel id: DTLS).
                record.udp_channel = (
                    "tcp" if confirmed.over_tcp else "dtls" if confirmed.channel >= 0 else "udp"
                )
                record.udp_server_mode = confirmed.server_mode
            server_udp = self._server.udp
            record.relay_path = server_udp.path if server_udp is not None else "-"
            record.relay_end = udp.end.name.lower()
            if udp.cause:
                record.error = record.error or f"udp: {udp.cause}"
        record.duration = time.monotonic() - self.started
        self._server.connection_finished(record)


#: Command Code -> name for the log (a dict: an Enum call per connection costs more).
_COMMAND_NAMES: dict[int, str] = {command.value: command.name for command in Command}
