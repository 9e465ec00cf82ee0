"""``socks6fast gateway``: SOCKS 5 and HTTP proxy apps in front, SOCKS 6 behind (issue 15 item 1).

Strategy: apps that speak only SOCKS 5 (RFC 1928/1929) or HTTP proxy (CONNECT, and
``GET http://...`` in absolute form) connect to a local listener; each request is carried
over SOCKS 6 to one upstream socks6fast with everything draft-11 offers for round trips:

* one `Session` kept warm (a NOOP every ``keepalive`` seconds inside it, SES-02), so a
  request carries the Session ID instead of credentials; the first request (or the start-up
  NOOP) carries the credentials 0-RTT (AUTH-01) with the Session Request;
* an idempotence token window (IDM-02/IDM-05) asked for with the session and refreshed in
  the background (a NOOP when fewer than a quarter of the tokens are left; a new session
  when a refresh brings no unspent token: one window per session, IDM-02);
* TCP Fast Open to the upstream (TRN-02: the Request with the app's first bytes in the SYN
  when the request spends a token, the Request alone otherwise; over TLS the ClientHello);
* the app's first bytes as initial data in the same flight as the Request (CMD-03).

Modes. To have the app's first bytes at hand when the Request leaves, the gateway must
answer the app's SOCKS 5 request (or its CONNECT with ``200 Connection established``)
before the upstream answers: ``optimistic`` mode (the default). It then waits at most
``first_data_wait`` (5 ms) for the app's first bytes and sends the Request with whatever
came (a server-speaks-first protocol, e.g. SMTP, costs that wait and no more). When the
upstream then refuses, the app sees its connection closed (a clean FIN, no data), and one
log line names the reply code. ``strict`` mode waits for the upstream's Operation Reply
before answering, and maps a refusal to a SOCKS 5 reply code (the same values 0x01-0x08;
0x09 timed out becomes 0x04 host unreachable) or an HTTP status (403 for
NOT_ALLOWED_BY_RULESET, 504 for timeouts, 502 otherwise). An absolute-form HTTP request
needs no early answer: its request head is the initial data, and a refusal is an HTTP
status in both modes.

Recovery. Session Invalid: the client library starts a new session and retries the
request once (the proxy did not act on it, section "Further SOCKS Requests"). A rejected
token (IDM-03: rejected before the request is honoured): retried once without a token,
and a window refresh is due. Upstream refused the TCP connection: retried once after
50 ms (nothing reached the proxy). Nothing else is retried: once the Request may have
reached the proxy, only a token could make a second try safe, and a new token is a new
request.

Data plane: once both legs are up, plain-TCP upstream pairs go to the relay engine
(`Relayer.relay_sockets`: splice(2) worker threads when compiled), TLS upstream pairs are
copied on the event loop.

Local credentials: a SOCKS 5 app may offer no authentication or username/password; a
username/password is accepted without being checked (the listener is loopback by default;
the upstream credentials are the gateway's own). UDP ASSOCIATE is carried over an upstream
SOCKS 6 UDP association (`Gateway._udp_associate`); BIND is answered COMMAND_NOT_SUPPORTED
(0x07).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..constants import AddressType, AuthMethod, ReplyCode, Socks5Command, UserPassStatus
from ..dataplane import resources
from ..dataplane.relayer import Relayer
from ..errors import AuthenticationError, ProxyError, Socks6Error, WireError
from ..gateway_config import GatewayConfig
from ..proto.client import SessionState
from ..proto.http_proxy import BodyFramer, HTTPRequestError, parse_request_head, status_line
from ..proto.socks5 import (
    Socks5MethodSelection,
    Socks5Reply,
    Socks5UDPHeader,
    UserPassReply,
    decode_greeting,
    decode_request,
    decode_udp_header,
    decode_userpass_request,
    encode_method_selection,
    encode_reply,
    encode_udp_header,
    encode_userpass_reply,
)
from .client import Proxy, Session
from .server.admin import AdminServer
from .server.record import log_safe

__all__ = ["Gateway", "GatewayStats", "upstream_ssl_context"]

log = logging.getLogger("socks6fast.gateway")

#: Bytes read per recv from the app during its handshake.
_RECV: Final = 65536
#: Largest initial data sent with a Request (the Authentication Method Advertisement's
#: field is 16 bits; the proxy reads 2^14 at most, D6); the rest follows in the relay.
MAX_INITIAL_DATA: Final = 16384
#: Seconds an app has for its SOCKS 5 / HTTP handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds before the one retry after the upstream refused the TCP connection.
RETRY_DELAY: Final = 0.05


@dataclass
class GatewayStats:
    """Counters (read by tests and the bench; logged on shutdown)."""

    connections: int = 0
    established: int = 0
    refused: int = 0
    failed: int = 0
    tokens_spent: int = 0
    token_retries: int = 0
    sessions_started: int = 0
    refreshes: int = 0
    replies: dict[str, int] = field(default_factory=dict)


class GatewayMetrics(Collector):
    """The gateway's Prometheus metrics, read from its counters at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        """What ``/metrics`` serves."""
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        gw = self._gateway
        stats = gw.stats
        ended = CounterMetricFamily(
            "socks6fast_gateway_requests",
            "App requests by outcome: established (relayed), refused (the proxy's reply code), failed",
            labels=["outcome"],
        )
        ended.add_metric(["established"], stats.established)
        ended.add_metric(["refused"], stats.refused)
        ended.add_metric(["failed"], stats.failed)
        yield ended
        yield CounterMetricFamily(
            "socks6fast_gateway_connections", "App connections accepted", value=stats.connections
        )
        refusals = CounterMetricFamily(
            "socks6fast_gateway_refusals", "Upstream refusals by reply code", labels=["reply"]
        )
        for name, count in sorted(stats.replies.items()):
            refusals.add_metric([name], count)
        yield refusals
        yield CounterMetricFamily(
            "socks6fast_gateway_tokens_spent",
            "Requests that spent an idempotence token",
            value=stats.tokens_spent,
        )
        yield CounterMetricFamily(
            "socks6fast_gateway_token_retries",
            "Requests resent without a token after Idempotence Rejected",
            value=stats.token_retries,
        )
        yield CounterMetricFamily(
            "socks6fast_gateway_sessions_started",
            "Upstream sessions established",
            value=stats.sessions_started,
        )
        core = gw.session.core
        yield GaugeMetricFamily(
            "socks6fast_gateway_session_active",
            "1 while the upstream session is established",
            value=int(core.state is SessionState.ACTIVE),
        )
        yield GaugeMetricFamily(
            "socks6fast_gateway_tokens_left", "Unspent tokens of the known window", value=core.tokens_left
        )
        relayer = gw._relayer
        if relayer is not None:
            up, down = relayer.bytes_relayed()
            relayed = CounterMetricFamily(
                "socks6fast_gateway_relayed_bytes",
                "Bytes relayed on plain upstream pairs",
                labels=["direction"],
            )
            relayed.add_metric(["app_to_upstream"], up)
            relayed.add_metric(["upstream_to_app"], down)
            yield relayed
        yield GaugeMetricFamily(
            "socks6fast_open_fds", "Descriptors the process has open", value=resources.open_descriptors()
        )


def upstream_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The TLS context towards a ``socks6+tls`` upstream: verifying unless opted out (TRN-03)."""
    if config.upstream is None or not config.upstream.tls:
        return None
    context = ssl.create_default_context(cafile=config.upstream_ca)
    if not config.upstream_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _socks5_code(code: ReplyCode | None) -> int:
    if code is None:
        return ReplyCode.GENERAL_FAILURE
    if code == ReplyCode.CONNECTION_TIMED_OUT:
        return ReplyCode.HOST_UNREACHABLE  # 0x09 is unassigned in SOCKS 5 (RFC 1928 section 6)
    return int(code)


def _http_status(exc: BaseException) -> int:
    if isinstance(exc, TimeoutError):
        return 504
    code = getattr(exc, "reply_code", None)
    if code == ReplyCode.NOT_ALLOWED_BY_RULESET:
        return 403
    if code in (ReplyCode.CONNECTION_TIMED_OUT, ReplyCode.TTL_EXPIRED):
        return 504
    return 502


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "reply_code", None)
    if code is not None:
        return f"refused: {code.name} ({int(code):#04x})"
    return f"failed: {type(exc).__name__}: {exc}"


class _Upstream:
    """An established upstream leg: a plain socket, or TLS streams."""

    def __init__(
        self,
        sock: socket.socket | None = None,
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
    ) -> None:
        self.sock = sock
        self.streams = streams

    def close(self) -> None:
        """Close the leg (the app went away before the relay could take it)."""
        if self.sock is not None:
            self.sock.close()
        if self.streams is not None:
            self.streams[1].close()


class Gateway:
    """The gateway: listeners, the upstream session, and one task per app connection.

    Args:
        config: the validated configuration; ``config.upstream`` holds the password.
        relayer: the data plane (default: a new `Relayer`, closed with the gateway).
    """

    def __init__(self, config: GatewayConfig, *, relayer: Relayer | None = None) -> None:
        if config.upstream is None:
            raise ValueError("the gateway needs an upstream URL")
        self.config = config
        self.proxy = Proxy(
            config.upstream,
            proxy_ssl=upstream_ssl_context(config),
            proxy_server_hostname=config.upstream_server_name,
        )
        self.session = self._new_session()
        self.stats = GatewayStats()
        self._relayer = relayer
        self._own_relayer = relayer is None
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []
        """Where the listeners listen (the real port when 0 was asked for)."""
        self.metrics = GatewayMetrics(self)
        """Prometheus metrics (served when ``admin_listen`` is set)."""
        self.admin: AdminServer | None = None
        """The ``/metrics`` listener, once started."""
        self._dtls: Any = None

    def _new_session(self) -> Session:
        return Session(self.proxy, tokens=self.config.tokens)

    # -- life

    async def start(self) -> None:
        """Listen, and start the session (a failed first NOOP is logged and retried)."""
        loop = asyncio.get_running_loop()
        if self._relayer is None:
            self._relayer = Relayer(loop)
        try:
            for host, port in self.config.listen:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                family, type_, proto, _, address = infos[0]
                sock = socket.socket(family, type_, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
                bound = sock.getsockname()
                self.addresses.append((bound[0], bound[1]))
        except BaseException:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        if self.config.admin_listen is not None:
            self.admin = AdminServer(self.metrics, lambda: bool(self._listeners))
            try:
                await self.admin.start(*self.config.admin_listen)
            except BaseException:
                for sock in self._listeners:
                    sock.close()
                self._listeners.clear()
                raise
            log.info("gateway metrics on http://%s:%d/metrics", *self.admin.address)
        for sock in self._listeners:
            self._spawn(self._accept_loop(sock))
        self._spawn(self._keep_warm())
        if any(not _loopback(host) for host, _ in self.addresses):
            log.warning(
                "gateway: listening beyond loopback without local authentication: anyone who can "
                "reach it uses the upstream with %s's credentials",
                (self.proxy.url.username or b"-").decode("utf-8", "replace"),
            )
        relayer = self._relayer
        log.info(
            "gateway relay path: %s",
            f"splice engine, {relayer.workers} worker thread(s)" if relayer.path == "splice" else "asyncio",
        )
        for host, port in self.addresses:
            log.info(
                "gateway listening on %s:%d (SOCKS 5, HTTP proxy), upstream %r, mode %s",
                host,
                port,
                self.proxy,
                self.config.mode,
            )

    async def close(self) -> None:
        """Stop listening, cut every connection, tear the session down."""
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self.admin is not None:
            await self.admin.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Socks6Error, OSError, TimeoutError):
            await self.session.aclose(timeout=2.0)
        if self._own_relayer and self._relayer is not None:
            await self._relayer.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: say so, do not spin
                log.warning("gateway: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._handle(sock, peer))

    # -- the session and its tokens

    async def _keep_warm(self) -> None:
        """Keep one session established with unspent tokens (SES-04 expiry, IDM-02 window)."""
        delay = 0.0
        while True:
            try:
                await self._refresh_session()
                delay = 0.0
            except (Socks6Error, OSError, TimeoutError) as exc:
                # Proxy down or refusing: logged, retried with a growing pause (at most
                # keepalive); requests meanwhile start the session themselves.
                delay = min(max(delay * 2, 0.5), self.config.keepalive)
                log.warning("gateway: upstream session: %s (retry in %.1fs)", _describe(exc), delay)
            self._refresh.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), delay or self.config.keepalive)

    async def _refresh_session(self) -> None:
        session = self.session
        before = session.core.state
        await self.proxy.noop(session=session, timeout=self.config.connect_timeout)
        self.stats.refreshes += 1
        core = session.core
        if before is not SessionState.ACTIVE and core.state is SessionState.ACTIVE:
            self.stats.sessions_started += 1
            log.info("gateway: upstream session established (window %s)", core.window)
        if self.config.tokens and core.state is SessionState.ACTIVE and core.tokens_left == 0:
            # One window per session (IDM-02): a window with nothing left needs a new session.
            log.info("gateway: token window used up (%s): starting a new session", core.window)
            self.session = self._new_session()
            self._spawn(self._teardown(session))
            await self.proxy.noop(session=self.session, timeout=self.config.connect_timeout)
            self.stats.sessions_started += 1

    async def _teardown(self, session: Session) -> None:
        with contextlib.suppress(Socks6Error, OSError, TimeoutError):
            await session.aclose(timeout=self.config.connect_timeout)

    def _want_token(self) -> bool:
        core = self.session.core
        if not self.config.tokens or core.state is not SessionState.ACTIVE:
            return False
        left = core.tokens_left
        # The window the proxy granted (it may cap what was asked for, IDM-02).
        size = core.window[1] if core.window is not None else self.config.tokens
        if left * 4 < size:
            self._refresh.set()  # refill in the background before the window runs dry
        return left > 0

    async def _connect_upstream(self, host: str, port: int, initial: bytes) -> tuple[_Upstream, bool]:
        """One CONNECT upstream with the recoveries of the module docstring; (leg, token spent)."""
        idempotent = self._want_token()
        refused_once = False
        while True:
            session = self.session
            timeout = self.config.connect_timeout
            try:
                if self.proxy.url.tls:
                    streams = await session.open_connection(
                        host,
                        port,
                        initial_data=initial,
                        idempotent=idempotent,
                        tfo=self.config.tfo,
                        timeout=timeout,
                    )
                    leg = _Upstream(streams=streams)
                else:
                    sock = await session.connect(
                        host,
                        port,
                        initial_data=initial,
                        idempotent=idempotent,
                        tfo=self.config.tfo,
                        timeout=timeout,
                    )
                    leg = _Upstream(sock=sock)
            except AuthenticationError as exc:
                if idempotent and "idempotence token" in str(exc):
                    # IDM-03: rejected before the request was honoured; safe to resend untokened.
                    self.stats.token_retries += 1
                    self._refresh.set()
                    idempotent = False
                    continue
                raise
            except ConnectionRefusedError:
                if refused_once:
                    raise
                refused_once = True  # nothing reached the proxy: one more try
                await asyncio.sleep(RETRY_DELAY)
                continue
            if session.core.state is SessionState.NEW or session.core.state is SessionState.PENDING:
                self._refresh.set()
            return leg, idempotent

    # -- app connections

    async def _handle(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.stats.connections += 1
        started = time.monotonic()
        what = "?"
        outcome = "closed"
        up = down = 0
        # One deadline for the whole request head (SOCKS 5 negotiation or HTTP head), not
        # one per read: a head trickled a byte at a time ends too (REQ-08's spirit).
        deadline = asyncio.get_running_loop().time() + HANDSHAKE_TIMEOUT
        try:
            buf = bytearray()
            await self._recv_more(sock, buf, deadline)
            if buf[0] == 5:
                what, outcome, up, down = await self._socks5(sock, buf, deadline)
            else:
                what, outcome, up, down = await self._http(sock, buf, deadline)
        except TimeoutError:
            outcome = "handshake timed out"
        except _ClosedEarly as exc:
            outcome = str(exc)
        except asyncio.CancelledError:
            outcome = "cut: the gateway is closing"
            raise
        except (OSError, WireError) as exc:
            outcome = f"app connection error: {exc}"
        except Exception as exc:  # a bug: logged with its traceback, the gateway lives on
            log.exception("gateway: connection from %s:%d failed", peer[0], peer[1])
            outcome = f"internal error: {type(exc).__name__}"
        finally:
            with contextlib.suppress(OSError):
                sock.close()  # a no-op when the relay took it (detached)
            log.info(
                "gateway %s:%d %s %s up=%d down=%d %.3fs",
                peer[0],
                peer[1],
                what,
                outcome,
                up,
                down,
                time.monotonic() - started,
            )

    async def _recv_more(self, sock: socket.socket, buf: bytearray, deadline: float) -> None:
        async with asyncio.timeout_at(deadline):
            data = await asyncio.get_running_loop().sock_recv(sock, _RECV)
        if not data:
            raise _ClosedEarly(
                "closed before a request" if not buf else "the app closed during its handshake"
            )
        buf += data

    async def _first_bytes(self, sock: socket.socket, have: bytes) -> bytes:
        """The app's first bytes, waiting at most ``first_data_wait`` when none came yet."""
        if have:
            return have
        loop = asyncio.get_running_loop()
        try:
            return sock.recv(MAX_INITIAL_DATA)
        except (BlockingIOError, InterruptedError):
            pass
        wait = self.config.first_data_wait
        if wait <= 0:
            return b""
        # Wait for readability, then recv: a sock_recv cancelled by a timeout can lose the
        # bytes it had already read (its result set, the task not yet resumed).
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(sock.fileno(), ready)
        try:
            await asyncio.wait({readable}, timeout=wait)
        finally:
            loop.remove_reader(sock.fileno())
            readable.cancel()
        try:
            return sock.recv(MAX_INITIAL_DATA)
        except (BlockingIOError, InterruptedError):
            return b""

    async def _socks5(
        self, sock: socket.socket, buf: bytearray, deadline: float
    ) -> tuple[str, str, int, int]:
        loop = asyncio.get_running_loop()
        while True:
            greeting, n = decode_greeting(buf)
            if greeting is not None:
                break
            await self._recv_more(sock, buf, deadline)
        del buf[:n]
        if AuthMethod.NONE in greeting.methods:
            method = AuthMethod.NONE
        elif AuthMethod.USERNAME_PASSWORD in greeting.methods:
            method = AuthMethod.USERNAME_PASSWORD
        else:
            await loop.sock_sendall(
                sock, encode_method_selection(Socks5MethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS))
            )
            return "socks5", "no acceptable method", 0, 0
        await loop.sock_sendall(sock, encode_method_selection(Socks5MethodSelection(method)))
        if method == AuthMethod.USERNAME_PASSWORD:
            while True:
                userpass, n = decode_userpass_request(buf)
                if userpass is not None:
                    break
                await self._recv_more(sock, buf, deadline)
            del buf[:n]
            # Not checked: see the module docstring (local credentials).
            await loop.sock_sendall(sock, encode_userpass_reply(UserPassReply(UserPassStatus.SUCCESS)))
        while True:
            try:
                request, n = decode_request(buf)
            except WireError as exc:
                if exc.reply_code in (ReplyCode.COMMAND_NOT_SUPPORTED, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED):
                    # RFC 1928 section 6: X'07' / X'08', then close (as the proxy's SOCKS 5 does).
                    await loop.sock_sendall(sock, _socks5_reply(exc.reply_code))
                    self.stats.refused += 1
                    return "socks5", f"refused locally: {exc} ({int(exc.reply_code):#04x})", 0, 0
                raise
            if request is not None:
                break
            await self._recv_more(sock, buf, deadline)
        early = bytes(buf[n:])
        what = f"socks5 {request.command.name} {log_safe(request.address)}:{request.port}"
        if request.command == Socks5Command.UDP_ASSOCIATE:
            return await self._udp_associate(sock, what)
        if request.command != Socks5Command.CONNECT:
            await loop.sock_sendall(sock, _socks5_reply(ReplyCode.COMMAND_NOT_SUPPORTED))
            self.stats.refused += 1
            return what, "refused locally: COMMAND_NOT_SUPPORTED (0x07) (BIND is not relayed)", 0, 0

        if self.config.mode == "optimistic":
            await loop.sock_sendall(sock, _socks5_reply(ReplyCode.SUCCESS))
            initial = await self._first_bytes(sock, early)
            try:
                leg, token = await self._connect_upstream(
                    request.address, request.port, initial[:MAX_INITIAL_DATA]
                )
            except (Socks6Error, OSError, TimeoutError) as exc:
                self._count_failure(exc)
                return what, f"{_describe(exc)}; optimistic: the app's connection was closed", 0, 0
            return await self._relay(sock, leg, initial[MAX_INITIAL_DATA:], what, token, len(initial))
        try:
            leg, token = await self._connect_upstream(request.address, request.port, early[:MAX_INITIAL_DATA])
        except (Socks6Error, OSError, TimeoutError) as exc:
            self._count_failure(exc)
            code = _socks5_code(getattr(exc, "reply_code", None))
            if isinstance(exc, TimeoutError):
                code = ReplyCode.TTL_EXPIRED  # RFC 1928's nearest to "no answer in time"
            await loop.sock_sendall(sock, _socks5_reply(code))
            return what, f"{_describe(exc)}; strict: SOCKS 5 reply {code:#04x}", 0, 0
        await _answer_or_close(sock, _socks5_reply(ReplyCode.SUCCESS), leg)
        return await self._relay(sock, leg, early[MAX_INITIAL_DATA:], what, token, len(early))

    async def _http(self, sock: socket.socket, buf: bytearray, deadline: float) -> tuple[str, str, int, int]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                request = parse_request_head(bytes(buf))
                if request is not None:
                    break
                await self._recv_more(sock, buf, deadline)
        except HTTPRequestError as exc:
            await loop.sock_sendall(sock, status_line(exc.status))
            return "http", f"bad request: {exc.status} {exc}", 0, 0
        kind = "CONNECT" if request.connect else "forward"
        what = f"http {kind} {log_safe(request.host)}:{request.port}"
        if request.connect and self.config.mode == "optimistic":
            await loop.sock_sendall(sock, status_line(200))
            initial = await self._first_bytes(sock, request.forward)
            try:
                leg, token = await self._connect_upstream(
                    request.host, request.port, initial[:MAX_INITIAL_DATA]
                )
            except (Socks6Error, OSError, TimeoutError) as exc:
                self._count_failure(exc)
                return what, f"{_describe(exc)}; optimistic: the app's connection was closed", 0, 0
            return await self._relay(sock, leg, initial[MAX_INITIAL_DATA:], what, token, len(initial))
        initial = request.forward
        try:
            leg, token = await self._connect_upstream(request.host, request.port, initial[:MAX_INITIAL_DATA])
        except (Socks6Error, OSError, TimeoutError) as exc:
            self._count_failure(exc)
            status = _http_status(exc)
            await loop.sock_sendall(sock, status_line(status))
            return what, f"{_describe(exc)}; HTTP {status}", 0, 0
        if request.connect:
            await _answer_or_close(sock, status_line(200), leg)
            return await self._relay(sock, leg, initial[MAX_INITIAL_DATA:], what, token, len(initial))
        assert request.body is not None
        return await self._forward(
            sock, leg, initial[MAX_INITIAL_DATA:], request.body, what, token, len(initial)
        )

    async def _udp_associate(self, sock: socket.socket, what: str) -> tuple[str, str, int, int]:
        """SOCKS 5 UDP ASSOCIATE (RFC 1928 section 7) over an upstream SOCKS 6 association.

        The app's datagrams (SOCKS 5 UDP header + payload) arrive on a local UDP socket
        beside the TCP listener's address; each goes upstream as a SOCKS 6 Datagram (over
        UDP, or DTLS for socks6+tls, D30), and each datagram from the upstream comes back
        with a SOCKS 5 header naming its source. Only the app's own IP may send; FRAG != 0
        is dropped (no reassembly, as RFC 1928 allows). The association lives as long as
        the app's TCP connection. Strict in both modes: the app's reply has to carry the
        local UDP port, and nothing of the app's rides with the upstream Request anyway.
        """
        loop = asyncio.get_running_loop()
        local_ip = sock.getsockname()[0]
        app_ip = sock.getpeername()[0]
        try:
            assoc = await self.session.udp_associate(
                timeout=self.config.connect_timeout, proxy_dtls=self._dtls_context()
            )
        except (Socks6Error, OSError, TimeoutError) as exc:
            self._count_failure(exc)
            code = _socks5_code(getattr(exc, "reply_code", None))
            await loop.sock_sendall(sock, _socks5_reply(code))
            return what, f"{_describe(exc)}; SOCKS 5 reply {code:#04x}", 0, 0
        counts = [0, 0]
        app_address: list[Any] = []
        queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue(maxsize=1024)

        class _Local(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if addr[0] == app_ip and not queue.full():
                    queue.put_nowait((data, addr))

        why = "ended"
        try:
            transport, _ = await loop.create_datagram_endpoint(_Local, local_addr=(local_ip, 0))
        except BaseException:
            await assoc.aclose()
            raise
        try:
            bound = transport.get_extra_info("sockname")
            family = AddressType.IPV6 if ":" in bound[0] else AddressType.IPV4
            await loop.sock_sendall(
                sock, encode_reply(Socks5Reply(ReplyCode.SUCCESS, family, bound[0], bound[1]))
            )
            self.stats.established += 1

            async def app_to_upstream() -> None:
                while True:
                    data, addr = await queue.get()
                    try:
                        header, n = decode_udp_header(data)
                    except WireError:
                        continue  # RFC 1928 section 7: a datagram we cannot use is dropped
                    if header.fragment:
                        continue
                    app_address[:] = [addr]
                    await assoc.sendto(data[n:], (header.address, header.port))
                    counts[0] += len(data) - n

            async def upstream_to_app() -> None:
                while True:
                    payload, (host, port) = await assoc.recvfrom()
                    if not app_address:
                        continue
                    kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
                    header = encode_udp_header(Socks5UDPHeader(kind, host, port))
                    transport.sendto(header + payload, app_address[0])
                    counts[1] += len(payload)

            async def control() -> None:
                while await loop.sock_recv(sock, _RECV):
                    pass  # RFC 1928: the association ends with the TCP connection

            tasks = [asyncio.ensure_future(c) for c in (app_to_upstream(), upstream_to_app(), control())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                ended = next(iter(done))
                error = None if ended.cancelled() else ended.exception()
                if error is not None:
                    why = f"ended: {type(error).__name__}: {error}"
                elif ended is tasks[2]:
                    why = "ok (the app closed its TCP connection)"
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
        finally:
            transport.close()
            await assoc.aclose()
        return what, why, counts[0], counts[1]

    def _dtls_context(self) -> Any:
        """The DTLS context of the UDP leg over ``socks6+tls``: the same trust as the TLS leg
        (``--upstream-ca``, ``--insecure-upstream``; TRN-03); None over plain ``socks6``."""
        if self._dtls is None and self.proxy.url.tls:
            # pyOpenSSL only when a DTLS leg is used (tests/test_dtls.py: the CLI does not load it).
            from ..net.dtls import dtls_client_context  # noqa: PLC0415

            self._dtls = dtls_client_context(
                cafile=self.config.upstream_ca, verify=self.config.upstream_verify
            )
        return self._dtls

    def _count_failure(self, exc: BaseException) -> None:
        if isinstance(exc, ProxyError) and exc.reply_code is not None:
            self.stats.refused += 1
            name = exc.reply_code.name
            self.stats.replies[name] = self.stats.replies.get(name, 0) + 1
        else:
            self.stats.failed += 1

    async def _relay(
        self, sock: socket.socket, leg: _Upstream, rest: bytes, what: str, token: bool, sent: int
    ) -> tuple[str, str, int, int]:
        self.stats.established += 1
        self.stats.tokens_spent += token
        tag = " token" if token else ""
        if leg.sock is not None:
            assert self._relayer is not None
            result = await self._relayer.relay_sockets(sock, leg.sock, to_remote=rest)
            return (
                what,
                f"ok{tag} ({result.end.name.lower()})",
                result.bytes_client_to_remote + sent,
                result.bytes_remote_to_client,
            )
        assert leg.streams is not None
        up, down = await _copy_tls(sock, *leg.streams, rest)
        return what, f"ok{tag}", up + sent, down

    async def _forward(
        self,
        sock: socket.socket,
        leg: _Upstream,
        rest: bytes,
        body: BodyFramer,
        what: str,
        token: bool,
        sent: int,
    ) -> tuple[str, str, int, int]:
        """An absolute-form request: the rest of its framed body goes upstream, then nothing
        more of the app's (G-4: a pipelined next request, maybe for another host, must not
        reach this origin; it is read and dropped); the response comes back until the
        origin closes. On the event loop, not the splice relay: the relay has no way to stop
        one direction at a byte count."""
        self.stats.established += 1
        self.stats.tokens_spent += token
        loop = asyncio.get_running_loop()
        counts = [sent, 0]
        if leg.sock is not None:
            leg.sock.setblocking(False)
            up_sock = leg.sock

            async def send(data: bytes) -> None:
                await loop.sock_sendall(up_sock, data)

            async def receive() -> bytes:
                return await loop.sock_recv(up_sock, _RECV)
        else:
            assert leg.streams is not None
            reader, writer = leg.streams

            async def send(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            async def receive() -> bytes:
                return await reader.read(_RECV)

        async def app_to_upstream() -> None:
            if rest:
                await send(rest)
                counts[0] += len(rest)
            while data := await loop.sock_recv(sock, _RECV):
                part = body.feed(data)
                if part:
                    await send(part)
                    counts[0] += len(part)
                # after the body: dropped (read, not left unread: closing with unread bytes
                # would reset the app's connection and could cut the response)

        async def upstream_to_app() -> None:
            while data := await receive():
                await loop.sock_sendall(sock, data)
                counts[1] += len(data)

        reading = asyncio.ensure_future(app_to_upstream())
        answering = asyncio.ensure_future(upstream_to_app())
        outcome = f"ok{' token' if token else ''}"
        try:
            # The exchange ends when the origin has answered (and closed), or on an error.
            await asyncio.wait({answering, reading}, return_when=asyncio.FIRST_COMPLETED)
            if not answering.done() and reading.exception() is None:
                await asyncio.wait({answering})  # the app's EOF: its answer may still be on the way
            for task in (reading, answering):
                error = task.exception() if task.done() and not task.cancelled() else None
                if isinstance(error, HTTPRequestError):
                    outcome = f"bad request body: {error.status} {error}"
                    break
                if error is not None:
                    outcome = f"ended: {type(error).__name__}: {error}"
                    break
        finally:
            for task in (reading, answering):
                task.cancel()
            for task in (reading, answering):
                with contextlib.suppress(BaseException):
                    await task
            leg.close()
        return what, outcome, counts[0], counts[1]


class _ClosedEarly(Exception):
    """The app closed before its request was complete (logged as the outcome)."""


async def _answer_or_close(sock: socket.socket, answer: bytes, leg: _Upstream) -> None:
    """Send the app its answer (strict mode); if the app is gone, close the upstream leg."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, answer)
    except BaseException:
        leg.close()
        raise


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _socks5_reply(code: int) -> bytes:
    return encode_reply(Socks5Reply(code, AddressType.IPV4, "0.0.0.0", 0))


async def _copy_tls(
    sock: socket.socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes
) -> tuple[int, int]:
    """Relay between the app's socket and a TLS upstream on the event loop."""
    loop = asyncio.get_running_loop()
    counts = [0, 0]

    async def app_to_upstream() -> None:
        if rest:
            writer.write(rest)
            counts[0] += len(rest)
        while True:
            data = await loop.sock_recv(sock, _RECV)
            if not data:
                break
            writer.write(data)
            counts[0] += len(data)
            await writer.drain()
        # TLS has no half-close: the app's EOF closes the upstream once what it sent is
        # flushed, the proxy's own rule for a TLS leg (socks6fast.dataplane.relayer);
        # the other direction then ends too.
        await writer.drain()
        writer.close()

    async def upstream_to_app() -> None:
        while True:
            data = await reader.read(_RECV)
            if not data:
                break
            await loop.sock_sendall(sock, data)
            counts[1] += len(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    tasks = [asyncio.ensure_future(app_to_upstream()), asyncio.ensure_future(upstream_to_app())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if any(not t.cancelled() and t.exception() is not None for t in done):
            # A reset on either leg: the app's connection is reset too, so that a cut
            # transfer does not look complete.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        writer.close()
    return counts[0], counts[1]
