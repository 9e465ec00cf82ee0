"""Listening and life cycle: bind the listeners, accept, reload, drain, expire sessions.

Strategy: plain listeners are non-blocking sockets accepted from directly (``loop.add_reader``,
a batch of accepts per wake-up), so a client socket stays ours until the relay takes it, and
they accept TCP Fast Open (TRN-01): a Request that arrived in the SYN is read by the first
``recv`` without another round trip. Each accepted connection gets a `ConnectionHandler` task.
Each plain listener also gets the SOCKS 6 UDP port (D16) of the server's UDP data plane
(``udp.UdpService``), unless ``[udp] enabled = false``. A listener with the PROXY protocol
(D27) hands its `ProxyTrust` to each handler through the accept callback's arguments, so the
other listeners pay nothing for it. A reload (SIGHUP) points the shared
`ServerContext` at the new users, rules and limits; `close` stops accepting, waits for the
connections to drain, then ends the rest and the data planes (the UDP associations end with
RelayEnd.SHUTDOWN, their reserved ports closed).

Descriptors (hardening issue 12 defect 3): `Server.start` raises the soft RLIMIT_NOFILE to the
hard limit and sizes ``max_connections`` and the engine's pipes against it
(`socks6fast.dataplane.resources.plan_descriptors`; a lowered limit is logged with the
reason). A full proxy never leaves a client in the listen backlog: past ``max_connections``
a newcomer is accepted and answered General Failure (`handler.refuse_client`: SOCKS 6, the
D14 form before any reply; SOCKS 5 after the method selection) as soon as its first bytes
arrive, or closed at once when `REFUSAL_SLOTS` refusals are already in progress; if accept()
itself fails for lack of descriptors, a spare descriptor is given up to accept and close the
client at once. These conditions are counted and logged at most once per
`PRESSURE_LOG_INTERVAL`, with the counts (`_Pressure`).

TCP Fast Open (issue 14 item 5): every listener asks for TFO (TRN-01), which the kernel
ignores without bit 2 of ``net.ipv4.tcp_fastopen``; `Server.start` then logs one notice
saying so and what to set (`socks6fast.net.tfo.server_tfo_notice`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...config import Config, ConfigError
from ...dataplane import resources
from ...dataplane.bandwidth import TokenBucket
from ...dataplane.engine import ENGINE_AVAILABLE, NO_EXTENSIONS, PATH_SPLICE
from ...dataplane.relayer import Relayer
from ...dataplane.resources import DescriptorPlan
from ...net.localaddr import read_local_addresses
from ...net.reuseport import WorkerSockets
from ...net.stackopts import enable_tfo_listener
from ...net.tfo import TFO_SYSCTL, server_tfo_notice
from ...proto.associations import AssociationTable
from ...proto.auth import FailedAuthLimiter, UserStore
from ...proto.limits import ConnectionLimiter
from ...proto.policy import OwnListeners
from ...proto.proxy_header import ProxyTrust
from ...proto.server import ServerContext
from ...proto.sessions import MemorySessionStore
from .admin import AdminServer
from .bind import close_session_listeners
from .dial import Resolver
from .handler import REFUSAL_TIMEOUT, ConnectionHandler, refuse_client
from .logs import CONNECTION
from .metrics import ServerMetrics
from .record import ConnectionRecord, format_address
from .redis_sessions import RedisSessionStore
from .udp import UdpService

if TYPE_CHECKING:
    from .dtls import DTLSPorts

__all__ = ["Server", "serve"]

log = logging.getLogger("socks6fast.server")

#: Client connections accepted per listener wake-up before yielding to the loop.
ACCEPT_BATCH = 64
#: Pause before accepting again after ENOBUFS/ENOMEM, or EMFILE without a spare descriptor.
ACCEPT_RETRY_DELAY = 0.1
#: Clients past max_connections answered at once; more are closed without a reply.
REFUSAL_SLOTS = resources.REFUSAL_SLOTS
#: At most one log line per this many seconds about refused clients, descriptors and pipes.
PRESSURE_LOG_INTERVAL = 10.0
#: Listen backlog of the client listeners.
LISTEN_BACKLOG = 1024
#: Port-0 listeners tried until the same UDP port number is free too (D16).
UDP_PAIR_ATTEMPTS = 16
#: Finished-connection records kept for inspection (`Server.records`).
MAX_RECORDS = 1024
#: The ``net.ipv4.tcp_fastopen`` file read for the start-up TFO notice (a test points it at
#: a file of its own rather than change the host's sysctl).
TFO_SYSCTL_PATH = TFO_SYSCTL


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


class _Pressure:
    """The times the proxy was short of room (clients refused at max_connections, clients
    closed at accept for lack of descriptors, bytes relayed without a pipe), logged at most
    once per interval with the counts: the first occurrence at once, then a summary per
    interval while it lasts (issue 12 defect 3: not a line per event)."""

    __slots__ = ("_counts", "_interval", "_last", "_loop", "_max_connections", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self._interval = interval
        self._counts: collections.Counter[str] = collections.Counter()
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._max_connections = 0

    def note(self, key: str, count: int, max_connections: int) -> None:
        self._counts[key] += count
        self._max_connections = max_connections
        if self._timer is None:
            delay = max(0.0, self._last + self._interval - self._loop.time())
            self._timer = self._loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (if anything)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts = self._counts
        if not counts:
            return
        self._last = self._loop.time()
        parts = []
        refused = counts["refused_answered"] + counts["refused_busy"] + counts["refused_silent"]
        if refused:
            parts.append(
                f"{refused} clients refused at max_connections={self._max_connections} "
                f"({counts['refused_answered']} answered General Failure, {counts['refused_busy']} "
                f"closed at once with {REFUSAL_SLOTS} refusals in progress, {counts['refused_silent']} "
                f"closed without a reply: no request within {REFUSAL_TIMEOUT:.0f}s, or SOCKS 5 "
                "offering only methods that need credentials)"
            )
        if counts["shed"]:
            parts.append(f"{counts['shed']} clients closed at accept for lack of descriptors")
        if counts["accept_paused"]:
            parts.append(
                f"accepting paused {counts['accept_paused']} times for {ACCEPT_RETRY_DELAY}s "
                "(no descriptor or memory)"
            )
        if counts["copied"] or counts["pipe_errors"]:
            parts.append(
                f"relays copied {counts['copied']} bytes without a pipe (pipe or descriptor budget "
                f"spent, {counts['pipe_errors']} pipe2() failures)"
            )
        counts.clear()
        log.warning("short of room since the last report: %s", "; ".join(parts))


class Server:
    """A SOCKS 6 (and SOCKS 5) proxy bound to the configured listeners.

    Args:
        config: the validated configuration (`socks6fast.config`).
        relayer: the data plane; by default one is created on `start` with the config's
            idle timeout and worker count.
        use_relay_engine: passed to `Relayer` when the server creates it (None: the splice
            engine when available).
        resolver: resolves a destination domain name: ``await resolver(host, port)`` returns
            ``(family, sockaddr)`` pairs in preference order, or raises `socket.gaierror`.
            None (default): ``loop.getaddrinfo``. Tests pass a local fake here.
        worker: in a worker process of ``serve --workers N`` (D34): the listening sockets
            and UDP port sockets the supervisor bound, used instead of binding.

    Use::

        server = Server(config)
        await server.start()
        print(server.addresses)
        ...
        await server.close()
    """

    def __init__(
        self,
        config: Config,
        *,
        relayer: Relayer | None = None,
        use_relay_engine: bool | None = None,
        resolver: Resolver | None = None,
        worker: WorkerSockets | None = None,
    ) -> None:
        self._config = config
        self._worker = worker
        self.resolver = resolver
        """Resolves CONNECT destination names (None: ``loop.getaddrinfo``)."""
        self.context = ServerContext(sessions=config.session_store(), shared_sessions=_shared_store(config))
        """What the core connections consult: users, rules, sessions, limits (reload updates it)."""
        # Issue 14 item 4: per-user and per-address limits; the bandwidth buckets are the
        # ones the relay engine's C workers read (dataplane/bandwidth.py).
        self.context.limits = ConnectionLimiter(TokenBucket)
        server = config.server
        self.limiter = FailedAuthLimiter(
            server.auth_failure_burst,
            server.auth_failure_interval,
            user_burst=server.auth_user_failure_burst,
            user_interval=server.auth_user_failure_interval,
            checks_per_second=server.auth_checks_per_second,
        )
        """Password checks: failures per client address and per user name, checks per second
        in all (AUTH-05, hardening issue 12 defect 5)."""
        self.checks_in_flight: dict[bytes, asyncio.Future[str | None]] = {}
        """Password checks running, by `UserStore.check_key`: a login with the same
        credentials waits for that check instead of taking the limiter's tokens for another
        (300 correct logins at once after a start were refused as 'too many failed logins')."""
        self.tls_context: ssl.SSLContext | None = self.make_tls_context(config)
        """The TLS listeners' context, or None without TLS listeners."""
        self.udp: UdpService | None = None
        """The UDP data plane (UDP ASSOCIATE), after `start` unless ``[udp] enabled = false``."""
        self.dtls: DTLSPorts | None = None
        """The DTLS ports (issue 11, D16), after `start` when `UDPConfig.dtls_served`."""
        self._relayer = relayer
        self._own_relayer = relayer is None
        self._use_engine = use_relay_engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[tuple[socket.socket, bool]] = []
        # PROXY protocol listeners (D27): the trusted balancers per listener socket, and per
        # config entry (tls, index) the same objects, which a reload updates in place.
        self._listener_proxy: dict[socket.socket, ProxyTrust] = {}
        self._proxy_trusts: dict[tuple[bool, int], ProxyTrust] = {}
        self._accepting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing_stores: set[asyncio.Task[None]] = set()
        self._refusals: set[asyncio.Task[None]] = set()
        self._spare_fd = -1  # given up to accept (and close) a client when out of descriptors
        self._fd_plan: DescriptorPlan | None = None
        self._max_connections = config.server.max_connections
        self._pressure: _Pressure | None = None
        self._copied_seen = 0
        self._pipe_errors_seen = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.records: collections.deque[ConnectionRecord] = collections.deque(maxlen=MAX_RECORDS)
        """The most recent finished connections."""
        self.on_connection_closed: list[Callable[[ConnectionRecord], None]] = []
        """Callbacks run with the record of every finished connection."""
        self.metrics: ServerMetrics | None = None
        """The Prometheus metrics, counted only with an ``[admin] listen`` (issue 14)."""
        self.admin: AdminServer | None = None
        """The admin listener (``/metrics``, ``/healthz``), after `start` when configured."""
        self._json_log = config.server.log_format == "json"
        self._configure(config, config.user_store())

    # -- life cycle ------------------------------------------------------------------

    def _reload_dtls(self, config: Config) -> None:
        """The DTLS ports take the reloaded certificate, key and client CA for new handshakes,
        as the TLS listeners do (a client CA removed on reload must stop DTLS logins too)."""
        server, old = config.server, self._config.server
        if self.dtls is None or server.tls_certificate is None or server.tls_key is None:
            return
        files = (server.tls_certificate, server.tls_key, server.tls_client_ca)
        if files == (old.tls_certificate, old.tls_key, old.tls_client_ca):
            return
        self.dtls.reload(*files)

    @staticmethod
    def make_tls_context(config: Config) -> ssl.SSLContext | None:
        """The TLS listeners' context, or None without a certificate.

        Raises:
            ConfigError: a certificate, key or client CA file that exists but cannot be used
                (not PEM, a key that does not match): one sentence naming the key.
        """
        server = config.server
        if server.tls_certificate is None or server.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(server.tls_certificate, server.tls_key)
        except (OSError, ssl.SSLError) as exc:
            where = f"{server.tls_certificate}, {server.tls_key}"
            raise ConfigError(f"server.tls_certificate / server.tls_key: {where}: {exc}") from None
        if server.tls_client_ca is not None:
            # Client certificates: the draft lets the TLS layer authenticate the client ("SOCKS over TLS").
            try:
                context.load_verify_locations(server.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"server.tls_client_ca: {server.tls_client_ca}: {exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _configure(self, config: Config, users: UserStore) -> None:
        """Point the core's context at ``config`` (at start and on reload)."""
        context, server = self.context, config.server
        context.users = users
        if isinstance(context.shared_sessions, RedisSessionStore):
            context.shared_sessions.users = users  # S-1: sessions of unknown users are invalid
        # CMD-06: "@local" and the loop check need this host's addresses, read from the kernel
        # each time (interfaces may have changed since start-up).
        self._local, self._local_problem = read_local_addresses()
        context.policy = config.policy(self._local)
        context.own_listeners = OwnListeners(self.addresses + self.tls_addresses, self._local)
        context.max_options_length = server.max_options_length
        context.handshake_timeout = server.handshake_timeout
        context.connect_timeout = server.connect_timeout
        context.dns_resolver = server.dns_resolver
        context.min_bind_port = server.min_bind_port
        udp = config.udp
        if context.associations is None and udp.enabled and self._loop is None:
            context.associations = AssociationTable()  # before start: UDP goes with the server
        if context.associations is not None:
            context.associations.max_per_client = udp.max_associations_per_client
            context.associations.max_per_user = udp.max_associations_per_user
        assert context.limits is not None
        # New values for new connections; live relays' bandwidth buckets follow (D26).
        context.limits.configure(config.limits.user, config.limits.client, config.limits.users)
        self.limiter.configure(
            server.auth_failure_burst,
            server.auth_failure_interval,
            server.auth_user_failure_burst,
            server.auth_user_failure_interval,
            server.auth_checks_per_second,
        )
        self._config = config

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (after `start`)."""
        # asyncio.get_running_loop() costs a getpid() syscall on every call in Python 3.11
        # (its fork check); the server runs on the loop start() saw.
        loop = self._loop
        assert loop is not None, "start() the server first"
        return loop

    @property
    def config(self) -> Config:
        """The configuration in effect."""
        return self._config

    @property
    def relayer(self) -> Relayer:
        """The data plane (after `start`)."""
        assert self._relayer is not None, "start() the server first"
        return self._relayer

    @property
    def active_connections(self) -> int:
        """Client connections being handled or relayed."""
        return len(self._tasks)

    @property
    def max_connections(self) -> int:
        """``max_connections`` in effect: the configured value, lowered at `start` when the
        descriptor limit cannot hold it (see `descriptor_plan`)."""
        return self._max_connections

    @property
    def descriptor_plan(self) -> DescriptorPlan | None:
        """How the descriptor limit is shared out (after `start`)."""
        return self._fd_plan

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of the plain listeners."""
        return [_sockname(sock) for sock, tls in self._listeners if not tls]

    @property
    def tls_addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of the TLS listeners."""
        return [_sockname(sock) for sock, tls in self._listeners if tls]

    async def start(self) -> None:
        """Bind every listener and start accepting.

        Raises:
            OSError: a listener could not be bound (everything bound so far is closed).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._pressure = _Pressure(loop, PRESSURE_LOG_INTERVAL)
        limit, hard = resources.raise_nofile_limit()
        if self._relayer is None:
            server = self._config.server
            self._relayer = Relayer(
                loop,
                use_engine=self._use_engine,
                workers=server.relay_workers,
                idle_timeout=server.idle_timeout,
            )
        udp = self._config.udp
        if udp.enabled:
            self.udp = UdpService(loop, udp, self.context, self.resolver)
            if self.context.associations is not None:
                # D32: one client address's associations share an engine worker, so one DTLS
                # connection can carry several of them.
                self.context.associations.workers = max(1, self.udp.engine.workers)
            if self._worker is not None and self.context.associations is not None:
                # D34: this worker's Association IDs steer their datagrams to its sockets.
                self.context.associations.id_last_byte = self._worker.id_last_byte
        try:
            for index, (host, port) in enumerate(self._config.server.listen):
                for sock in await self._bind_with_udp(host, port):
                    self._add_listener(sock, False, index)
            if self.udp is not None and udp.dtls_served(self._config.server):
                self.dtls = self._dtls_ports(loop, self.udp)
            for index, (host, port) in enumerate(self._config.server.tls_listen):
                for sock in await self._bind_with_dtls(host, port):
                    self._add_listener(sock, True, index)
            if self.dtls is not None and not self._config.server.tls_listen:
                # [udp] dtls_port without a TLS listener: on each listener's address.
                assert udp.dtls_port is not None
                for host, _ in self.addresses:
                    await self.dtls.open_port(host, udp.dtls_port)
        except BaseException:
            await self._undo_start()
            raise
        self.context.own_listeners = OwnListeners(self.addresses + self.tls_addresses, self._local)
        await self._start_admin()
        with contextlib.suppress(OSError):
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        in_use = resources.open_descriptors()
        dtls_channels = 0
        if self.dtls is not None:
            # F4: finished-but-unmapped DTLS connections hold a socket each; they get at most
            # a quarter of what the limit leaves, and that share stays out of the connections'.
            room = limit if limit != resource.RLIM_INFINITY else 1 << 30
            dtls_channels = min(self.dtls.unmapped_total, max(1, (room - in_use) // 4))
            self.dtls.unmapped_total = dtls_channels
        self._fd_plan = resources.plan_descriptors(
            self._config.server.max_connections,
            limit,
            hard,
            in_use=in_use,
            splice=self._relayer.path == PATH_SPLICE,
            dtls_channels=dtls_channels,
        )
        self._apply_fd_plan(self._fd_plan)
        self._accepting = True
        self._resume_accepting()
        self._housekeeping = loop.create_task(self._expire_sessions())
        for sock, tls in self._listeners:
            kind = "SOCKS over TLS" if tls else "SOCKS 6 and SOCKS 5"
            trust = self._listener_proxy.get(sock)
            if trust is not None:
                sources = ", ".join(str(net) for net in trust.networks)
                kind += f", PROXY protocol v1/v2 required, from {sources} only"
            log.info("listening on %s (%s)", format_address(*_sockname(sock)), kind)
        self._warn_about_exposure(self._config)
        log.info("relay path: %s", self._describe_relay())
        shared = self.context.shared_sessions
        if isinstance(shared, RedisSessionStore):
            log.info("sessions and idempotence tokens shared through %s", shared.name)
        plan = self._fd_plan
        log.info(
            "descriptors: limit %d (hard %d), max_connections %d, %s",
            plan.limit,
            plan.hard,
            plan.max_connections,
            f"up to {plan.max_pipes} splice pipes" if plan.max_pipes else "no pipes (asyncio relay)",
        )
        if self.udp is not None:
            for host, port in self.udp.ports:
                log.info(
                    "SOCKS 6 UDP port %s (UDP ASSOCIATE, %s engine)",
                    format_address(host, port),
                    self.udp.path,
                )
        else:
            log.info("UDP ASSOCIATE is turned off ([udp] enabled = false)")
        if self.dtls is not None:
            for host, port in self.dtls.ports:
                log.info("DTLS port %s (SOCKS 6 datagrams over DTLS 1.2)", format_address(host, port))
        notice = server_tfo_notice(TFO_SYSCTL_PATH)  # every listener asks for TFO (TRN-01)
        if notice is not None:
            log.info("%s", notice)

    def _add_listener(self, sock: socket.socket, tls: bool, index: int) -> None:
        self._listeners.append((sock, tls))
        networks = self._config.server.proxy_protocol_from(tls, index)
        if networks is not None:
            trust = self._proxy_trusts.setdefault((tls, index), ProxyTrust(networks))
            self._listener_proxy[sock] = trust

    async def _bind_with_udp(self, host: str, port: int) -> list[socket.socket]:
        """Bind one ``listen`` entry and its SOCKS 6 UDP ports (D16): by default the address
        and port number of each TCP listener, else ``[udp] port`` on each listener address.
        A port-0 entry whose number is taken for UDP is bound again elsewhere (a few times)."""
        udp, service = self._config.udp, self.udp
        attempts = UDP_PAIR_ATTEMPTS if port == 0 and udp.port is None else 1
        for attempt in range(attempts):
            socks = await self._bind_listeners(host, port)
            if service is None:
                return socks
            try:
                for sock in socks:
                    bound_host, bound_port = _sockname(sock)
                    where = (bound_host, udp.port if udp.port is not None else bound_port)
                    fds = self._worker.udp.pop(where, None) if self._worker is not None else None
                    if fds is not None:
                        service.adopt_port(fds)  # D34: the supervisor's group, steered already
                    else:
                        service.open_ports([where])
            except OSError as exc:
                for sock in socks:
                    sock.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            return socks
        raise AssertionError("unreachable")  # pragma: no cover

    async def _undo_start(self) -> None:
        """A start that failed part-way: close what it opened (listeners, DTLS ports, UDP)."""
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        self._listener_proxy.clear()
        if self.dtls is not None:
            self.dtls.close()
            await self.dtls.wait_closed()
            self.dtls = None
        if self.udp is not None:
            self.udp.close()
            self.udp = None

    async def _start_admin(self) -> None:
        """The admin listener and the metrics it serves (issue 14), when configured."""
        listen = self._config.admin.listen
        if listen is None:
            return
        self.metrics = ServerMetrics(self)
        self.admin = AdminServer(self.metrics, lambda: self._accepting)
        try:
            await self.admin.start(*listen)
        except OSError as exc:
            self.admin = None
            self.stop_accepting()
            await self._undo_start()
            where = format_address(*listen)
            raise OSError(exc.errno, f"admin.listen {where}: {exc.strerror or exc}") from exc
        log.info("admin listener on %s: /metrics, /healthz", format_address(*self.admin.address))
        if self._config.admin.exposed:
            log.warning(
                "admin.listen %s is not loopback: anyone who can reach it can read the metrics",
                format_address(*self.admin.address),
            )

    def _dtls_ports(self, loop: asyncio.AbstractEventLoop, udp: UdpService) -> DTLSPorts:
        # Imported here: pyOpenSSL is loaded only by a server that serves DTLS.
        from ...net.dtls import DTLSError  # noqa: PLC0415
        from .dtls import DTLSPorts  # noqa: PLC0415

        server = self._config.server
        assert server.tls_certificate is not None and server.tls_key is not None
        try:
            return DTLSPorts(
                loop, udp, self._config.udp, server.tls_certificate, server.tls_key, server.tls_client_ca
            )
        except DTLSError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None

    async def _bind_with_dtls(self, host: str, port: int) -> list[socket.socket]:
        """Bind one ``tls_listen`` entry and its DTLS ports (D16): by default the address
        and port number of each TLS listener, else ``[udp] dtls_port`` on each listener
        address. A port-0 entry whose number is taken for UDP is bound again elsewhere."""
        dtls, dtls_port = self.dtls, self._config.udp.dtls_port
        attempts = UDP_PAIR_ATTEMPTS if port == 0 and dtls_port is None else 1
        for attempt in range(attempts):
            socks = await self._bind_listeners(host, port, tls=True)
            if dtls is None:
                return socks
            try:
                for sock in socks:
                    bound_host, bound_port = _sockname(sock)
                    if (bound_host, dtls_port or bound_port) not in dtls.ports:
                        await dtls.open_port(bound_host, dtls_port or bound_port)
            except OSError as exc:
                for sock in socks:
                    sock.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            return socks
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply_fd_plan(self, plan: DescriptorPlan) -> None:
        self._max_connections = plan.max_connections
        if plan.lowered:
            log.warning("%s", plan.warning())
        if self._relayer is not None and self._own_relayer:
            self._relayer.set_max_pipes(plan.max_pipes)

    def _describe_relay(self) -> str:
        """One phrase for the startup log: which data plane relays connections and why."""
        assert self._relayer is not None
        if self._relayer.path == PATH_SPLICE:
            tls = " (TLS client legs: asyncio, the kernel cannot splice them)" if self.tls_addresses else ""
            return f"splice engine, {self._relayer.workers} worker thread(s){tls}"
        if ENGINE_AVAILABLE:
            return "asyncio (the splice engine is turned off)"
        if NO_EXTENSIONS:
            return "asyncio (SOCKS6FAST_NO_EXTENSIONS is set)"
        return "asyncio (the splice engine needs Linux and the compiled extension)"

    async def _bind_listeners(self, host: str, port: int, *, tls: bool = False) -> list[socket.socket]:
        inherited = self._worker.take_tcp(tls, host, port) if self._worker is not None else None
        if inherited is not None:
            # D34: this worker's member of the supervisor's SO_REUSEPORT groups, listening.
            for sock in inherited:
                sock.setblocking(False)
            return inherited
        try:
            return await self._bind_listeners_at(host, port)
        except OSError as exc:
            # Name the address: with several --listen entries "Address already in use"
            # alone does not say which one failed.
            raise OSError(exc.errno, f"{format_address(host, port)}: {exc.strerror or exc}") from exc

    async def _bind_listeners_at(self, host: str, port: int) -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        socks: list[socket.socket] = []
        seen: set[tuple[Any, ...]] = set()
        try:
            for family, type_, proto, _, sockaddr in infos:
                if sockaddr in seen:
                    continue
                seen.add(sockaddr)
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # "::" and "0.0.0.0" can then be listened on side by side.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                # Accepted sockets inherit it: no setsockopt per connection.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                enable_tfo_listener(sock)  # TRN-01
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
                if port == 0:
                    break  # one port-0 listener per entry: each family would get another port
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _resume_accepting(self) -> None:
        if self._loop is None or not self._accepting:
            return
        for sock, tls in self._listeners:
            # The PROXY protocol trust travels with the reader: nothing to look up per accept.
            self._loop.add_reader(
                sock.fileno(), self._on_acceptable, sock, tls, self._listener_proxy.get(sock)
            )

    def _pause_accepting(self) -> None:
        if self._loop is None:
            return
        for sock, _ in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _on_acceptable(self, lsock: socket.socket, tls: bool, proxy: ProxyTrust | None) -> None:
        loop = self._loop
        assert loop is not None
        # The listener's family as a plain int, read once per wake-up: socket.accept() reads
        # .family and .type through IntEnum conversions and runs a timeout check on every
        # client (issue 13 item 3); _accept() plus the constructor is the same minus those.
        family = int(lsock.family)
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = lsock._accept()  # type: ignore[attr-defined]  # CPython's, 3.x
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare_fd >= 0:
                    if self._shed(lsock):
                        continue
                    return  # the backlog is empty (accept() checks descriptors first)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # No spare descriptor either (or no memory): wait a moment, counted.
                    self._note_pressure("accept_paused")
                    self._pause_accepting()
                    loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                    return
                log.debug("accept failed: %s", exc)  # ECONNABORTED and the like
                continue
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                continue
            sock.setblocking(False)  # TCP_NODELAY comes from the listener (inherited)
            if len(self._tasks) >= self._max_connections:
                self._refuse(sock, str(addr[0]), proxy)
                continue
            handler = ConnectionHandler(self, sock, (str(addr[0]), int(addr[1])), tls, proxy)
            task = loop.create_task(handler.run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _shed(self, lsock: socket.socket) -> bool:
        """accept() failed with EMFILE/ENFILE: give up the spare descriptor, accept one
        client and close it at once (it sees the close now rather than waiting in the
        backlog), take the spare back. False when no client was waiting."""
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            sock, _ = lsock.accept()
        except OSError:
            sock = None
        if sock is not None:
            sock.close()
            self._note_pressure("shed")
        with contextlib.suppress(OSError):
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        return sock is not None

    def _refuse(self, sock: socket.socket, peer: str, proxy: ProxyTrust | None) -> None:
        """A client past max_connections: answer General Failure, or close it at once when
        REFUSAL_SLOTS refusals are in progress already. Either way it is not left waiting."""
        loop = self._loop
        assert loop is not None
        if len(self._refusals) >= REFUSAL_SLOTS:
            sock.close()
            self._note_pressure("refused_busy")
            return
        if proxy is not None and not proxy.trusts(peer):
            sock.close()  # D27: not a balancer of this listener; nothing to answer
            self._note_pressure("refused_silent")
            return
        task = loop.create_task(self._refusal(sock, proxy is not None))
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)

    async def _refusal(self, sock: socket.socket, proxy_header: bool) -> None:
        answered = False
        try:
            answered = await refuse_client(self.loop, sock, proxy_header=proxy_header)
        finally:
            self._note_pressure("refused_answered" if answered else "refused_silent")

    def _note_pressure(self, key: str, count: int = 1) -> None:
        if self._pressure is not None:
            self._pressure.note(key, count, self._max_connections)

    def _poll_pipe_stats(self) -> None:
        """Count the bytes the engine copied without a pipe since the last look."""
        stats = self._relayer.pipe_stats() if self._relayer is not None else None
        if stats is None:
            return
        if stats.copied > self._copied_seen:
            self._note_pressure("copied", stats.copied - self._copied_seen)
        if stats.pipe_errors > self._pipe_errors_seen:
            self._note_pressure("pipe_errors", stats.pipe_errors - self._pipe_errors_seen)
        self._copied_seen, self._pipe_errors_seen = stats.copied, stats.pipe_errors

    def connection_finished(self, record: ConnectionRecord) -> None:
        """A connection handler is done: keep, log and announce its record."""
        self.records.append(record)
        if self.metrics is not None:
            self.metrics.connection_finished(record)
        if log.isEnabledFor(logging.INFO):
            if self._json_log:
                log.info("%s", record.log_line(), extra={CONNECTION: record.fields()})
            else:
                log.info("%s", record.log_line())
        for callback in self.on_connection_closed:
            callback(record)

    async def _expire_sessions(self) -> None:
        # draft-11 "Tearing down the session": sessions die after inactivity; their BIND
        # listeners (CMD-05) are closed with them.
        loop = asyncio.get_running_loop()
        while True:
            store = self.context.sessions
            shared = self.context.shared_sessions
            deadline = store.next_deadline() if store is not None else None
            if isinstance(shared, RedisSessionStore):
                # Redis expires the sessions itself (TTL); this process only refreshes the
                # gauge and closes BIND listeners of sessions that ended elsewhere.
                swept = shared.next_deadline(loop.time(), gauge=self.metrics is not None)
                if swept is not None:
                    deadline = swept if deadline is None else min(deadline, swept)
            delay = 5.0 if deadline is None else min(5.0, max(0.05, deadline - loop.time()))
            if isinstance(shared, RedisSessionStore):
                delay = min(delay, 1.0)  # a BIND backlog listener may appear any time (D38)
            await asyncio.sleep(delay)
            if store is not None:
                for session in store.expire(loop.time()):
                    close_session_listeners(session)
            if (
                isinstance(shared, RedisSessionStore)
                and shared is self.context.shared_sessions
                and shared.next_deadline(loop.time(), gauge=self.metrics is not None) is not None
            ):
                for session in await shared.sweep():
                    close_session_listeners(session)
            self._poll_pipe_stats()
            limits = self.context.limits
            if limits is not None:
                for line in limits.throttled():  # bandwidth limits that slowed a relay
                    log.info("%s", line)

    def _reload_shared_store(self, config: Config, old: Config) -> None:
        """A reload of ``[sessions] store``: a new URL or timeout makes a new client (the
        sessions stay in Redis); new caps apply to the store in place."""
        shared = self.context.shared_sessions
        sessions = config.sessions
        wanted = sessions.enabled and sessions.store != "memory"
        if isinstance(shared, RedisSessionStore) and (
            not wanted
            or sessions.store != old.sessions.store
            or sessions.store_timeout != old.sessions.store_timeout
        ):
            for session in shared.held_sessions():
                close_session_listeners(session)
            task = asyncio.get_running_loop().create_task(shared.close())
            self._closing_stores.add(task)
            task.add_done_callback(self._closing_stores.discard)
            self.context.shared_sessions = shared = None
        if not wanted:
            self.context.shared_sessions = None
        elif shared is None:
            self.context.shared_sessions = _shared_store(config)
            log.info("reload: sessions and idempotence tokens shared through %s", sessions.store)
        else:
            shared.limits = sessions.limits()
        if isinstance(self.context.shared_sessions, RedisSessionStore):
            self.context.shared_sessions.users = self.context.users  # S-1 (a new store too)

    def reload(self, config: Config) -> None:
        """Apply a new configuration (SIGHUP): users, rules, limits and sessions settings.

        Established connections are kept. Listener addresses and the relay's idle timeout
        need a restart (a warning says so when they differ).
        """
        users = config.user_store()
        tls_wanted = self.tls_context is not None or config.server.tls_listen
        tls = self.make_tls_context(config) if tls_wanted else None
        self._reload_dtls(config)  # before any change: a bad file leaves everything as it was
        old = self._config
        if config.server.listen != old.server.listen or config.server.tls_listen != old.server.tls_listen:
            log.warning("reload: listener changes take effect after a restart")
        else:
            self._reload_proxy_trust(config)
        if config.admin != old.admin or config.server.log_format != old.server.log_format:
            log.warning("reload: [admin] and server.log_format take effect after a restart")
        if config.server.idle_timeout != old.server.idle_timeout:
            log.warning("reload: the relay idle timeout takes effect after a restart")
        udp_keys = (
            "enabled",
            "port",
            "workers",
            "batch",
            "max_datagram",
            "first_datagram_timeout",
            "dtls",
            "dtls_port",
            "dtls_handshakes_per_source",
            "dtls_handshakes_total",
            "dtls_cookie_interval",
        )
        if any(getattr(config.udp, key) != getattr(old.udp, key) for key in udp_keys):
            log.warning("reload: [udp] %s take effect after a restart", ", ".join(udp_keys))
        self._configure(config, users)
        if tls is not None:
            self.tls_context = tls
        store = self.context.sessions
        if not config.sessions.enabled or config.sessions.store != "memory":
            if store is not None:
                for session in store.expire(float("inf")):
                    close_session_listeners(session)
            self.context.sessions = None
        elif store is None:
            self.context.sessions = config.session_store()
        elif isinstance(store, MemorySessionStore):
            store.limits = config.sessions.limits()  # the live sessions stay
            # S-1: but not those of a user removed from [users] or whose password changed: a
            # session must not outlive its credentials (SES-04: requests in it act as the user).
            gone = {name for name, hashed in old.users.items() if config.users.get(name) != hashed}
            ended = store.end_users(gone) if gone else []
            for session in ended:
                close_session_listeners(session)
            if ended:
                log.info("reload: %d sessions of removed or changed users ended", len(ended))
        self._reload_shared_store(config, old)
        if self._fd_plan is not None and config.server.max_connections != old.server.max_connections:
            plan = self._fd_plan
            self._fd_plan = resources.plan_descriptors(
                config.server.max_connections,
                plan.limit,
                plan.hard,
                in_use=plan.reserved - resources.REFUSAL_SLOTS - resources.DESCRIPTOR_MARGIN,
                splice=plan.max_pipes > 0,
            )
            self._apply_fd_plan(self._fd_plan)
        log.info("configuration reloaded: %d users, %d rules", len(users), len(config.rules))
        self._warn_about_exposure(config)

    def _reload_proxy_trust(self, config: Config) -> None:
        """New ``proxy_protocol_from`` networks apply to the running listeners at once; turning
        the PROXY protocol on or off for a listener needs a restart (its sockets stay as they
        are, so a client is never half-way between the two)."""
        server, changed = config.server, False
        for tls, count in ((False, len(server.listen)), (True, len(server.tls_listen))):
            for index in range(count):
                networks = server.proxy_protocol_from(tls, index)
                trust = self._proxy_trusts.get((tls, index))
                if (networks is None) != (trust is None):
                    changed = True
                elif trust is not None and networks is not None:
                    trust.networks = networks
        if changed:
            log.warning(
                "reload: turning proxy_protocol on or off for a listener takes effect after a restart"
            )

    def _warn_about_exposure(self, config: Config) -> None:
        """Start-up and reload warnings: an open proxy, a host whose addresses are unknown."""
        if self._local_problem is not None:
            log.warning('%s: "@local" and the loop check know only loopback', self._local_problem)
        hosts = [host for host, _ in self.addresses + self.tls_addresses]
        warning = config.open_proxy_warning(hosts)
        if warning is not None:
            log.warning("%s", warning)

    def stop_accepting(self) -> None:
        """Close the listeners; connections in progress continue."""
        self._accepting = False
        self._pause_accepting()
        for sock, _ in self._listeners:
            sock.close()

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, wait up to ``drain_timeout`` for connections to finish, then end
        the rest and the data plane."""
        if self._closed.is_set():
            return
        self.stop_accepting()
        if self._tasks and drain_timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        if self._relayer is not None and self._own_relayer:
            # Ends every relay with RelayEnd.SHUTDOWN and its exact byte counts; give the
            # connection tasks a moment to take those results and log their lines before
            # the rest (handshakes still in progress) is cancelled.
            await self._relayer.close()
        if self.dtls is not None:
            self.dtls.close()  # handshakes in progress; the channels end with the engine
            await self.dtls.wait_closed()
        if self.udp is not None:
            # Ends every association (RelayEnd.SHUTDOWN, counts kept for their log lines).
            self.udp.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=0.5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.context.sessions is not None:
            for session in self.context.sessions.expire(float("inf")):
                close_session_listeners(session)
        shared = self.context.shared_sessions
        if isinstance(shared, RedisSessionStore):
            for session in shared.held_sessions():
                close_session_listeners(session)  # the sessions themselves live on in Redis
            await shared.close()
        if self._closing_stores:
            await asyncio.wait(set(self._closing_stores), timeout=2.0)
        if self.context.associations is not None:
            for reservation in self.context.associations.clear():
                if isinstance(reservation.handle, socket.socket):
                    reservation.handle.close()  # STK-08: nothing outlives the server
        for task in list(self._refusals):
            task.cancel()
        if self._refusals:
            await asyncio.wait(set(self._refusals), timeout=1.0)
        if self._pressure is not None:
            self._pressure.flush()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        if self.admin is not None:
            await self.admin.close()  # after the drain: /healthz said 503 meanwhile
            self.admin = None
        self._listeners.clear()
        self._listener_proxy.clear()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Return once `close` finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(drain_timeout=0)


async def serve(config: Config, *, stop: asyncio.Event | None = None, drain_timeout: float = 10.0) -> None:
    """Run a `Server` until ``stop`` is set (or forever), then close it gracefully.

    Args:
        config: the configuration.
        stop: set it to stop accepting and drain.
        drain_timeout: seconds to wait for connections to finish when stopping.
    """
    server = Server(config)
    await server.start()
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await server.close(drain_timeout=drain_timeout)


def _shared_store(config: Config) -> RedisSessionStore | None:
    """The Redis session store ``[sessions] store`` names, or None (memory, or disabled)."""
    sessions = config.sessions
    if not sessions.enabled or sessions.store == "memory":
        return None
    return RedisSessionStore(sessions.store, sessions.limits(), timeout=sessions.store_timeout)
