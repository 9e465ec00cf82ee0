"""Prometheus metrics of a `Server` (issue 14 item 1), served by ``admin``.

Strategy: nothing is counted per byte or per chunk in Python. Per finished connection the
server hands its `ConnectionRecord` to `ServerMetrics.connection_finished`, which bumps a few
plain integers (a dict keyed by bounded labels, a histogram bucket); everything else is read
at scrape time from the state that exists anyway: the relay engine's own per-worker byte
counters and pipe counters (`Relayer.bytes_relayed`, `Relayer.pipe_stats`), the session
store's counters (`SessionCounters`), the UDP engine's drop counts, the active connections.
A custom collector (``prometheus_client.registry.Collector``) turns those into metric
families on each scrape, in the server's own `CollectorRegistry` (never the global one).
Label values are bounded: listener kind, protocol, command name, reply code, direction,
drop reason, detected protocol; never a client address or a user name.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ...constants import Command, UdpDrop
from ...dataplane import resources
from ...dataplane.relayer import Relayer
from ...proto.server_common import ServerContext
from ...proto.sessions import MemorySessionStore, SessionCounters
from .record import ConnectionRecord
from .redis_sessions import RedisSessionStore
from .udp import UdpService

__all__ = ["HANDSHAKE_BUCKETS", "MetricsSource", "ServerMetrics"]

#: Upper bounds (seconds) of the handshake latency histogram's buckets.
HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Command names a label may take (anything else, e.g. an unknown code, is "other").
_COMMANDS = frozenset(command.name for command in Command) | {"-"}
_DETECTED = ("http", "tls", "socks4", "other")


class MetricsSource(Protocol):
    """What the collector reads of the `Server` at scrape time."""

    @property
    def active_connections(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def relayer(self) -> Relayer: ...

    context: ServerContext
    udp: UdpService | None


class ServerMetrics(Collector):
    """The server's counters and the collector that exports them (one per `Server`).

    Args:
        source: the server whose live state is read at scrape time.
    """

    def __init__(self, source: MetricsSource) -> None:
        self._source = source
        self.registry = CollectorRegistry(auto_describe=False)
        """The server's own registry; ``generate_latest(registry)`` is the ``/metrics`` body."""
        # (listener, protocol, command, reply) -> finished connections.
        self._connections: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self._mismatch: collections.Counter[str] = collections.Counter()
        self._auth_failures = 0
        self._handshake_counts = [0] * (len(HANDSHAKE_BUCKETS) + 1)  # the last: +Inf only
        self._handshake_sum = 0.0
        self._udp_associations = 0
        self._udp_datagrams = [0, 0]  # to remote, to client (ended associations)
        self._udp_bytes = [0, 0]
        self.registry.register(self)

    def connection_finished(self, record: ConnectionRecord) -> None:
        """Count one finished connection (once per connection, never per byte)."""
        command = record.command if record.command in _COMMANDS else "other"
        reply = "none" if record.reply_code is None else f"{record.reply_code:#04x}"
        self._connections[(record.listener, record.protocol, command, reply)] += 1
        if record.protocol == "mismatch":
            self._mismatch[record.detected or "other"] += 1
        if record.failed_user is not None:
            self._auth_failures += 1
        handshake = record.handshake
        if handshake is not None:
            self._handshake_counts[bisect.bisect_left(HANDSHAKE_BUCKETS, handshake)] += 1
            self._handshake_sum += handshake
        if command == "UDP_ASSOCIATE" and record.relay_end != "-":
            self._udp_associations += 1
            self._udp_datagrams[0] += record.datagrams_up
            self._udp_datagrams[1] += record.datagrams_down
            self._udp_bytes[0] += record.bytes_up
            self._udp_bytes[1] += record.bytes_down

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (prometheus_client calls it on each scrape)."""
        source = self._source
        yield from self._connection_metrics(source)
        yield from self._relay_metrics(source.relayer)
        yield from self._session_metrics(source.context)
        yield from self._udp_metrics(source.udp)

    def _connection_metrics(self, source: MetricsSource) -> Iterator[Metric]:
        connections = CounterMetricFamily(
            "socks6fast_connections",
            "Finished client connections, by listener (tcp, tls), protocol (socks6, socks5, mismatch), "
            "command and the last reply code sent",
            labels=["listener", "protocol", "command", "reply"],
        )
        for labels, count in sorted(self._connections.items()):
            connections.add_metric(list(labels), count)
        yield connections
        yield GaugeMetricFamily(
            "socks6fast_connections_active",
            "Client connections being handled or relayed",
            value=source.active_connections,
        )
        yield GaugeMetricFamily(
            "socks6fast_connections_max", "max_connections in effect", value=source.max_connections
        )
        mismatch = CounterMetricFamily(
            "socks6fast_version_mismatch",
            "Clients answered with the Version Mismatch Reply, by the protocol they spoke (http, tls, "
            "socks4, other)",
            labels=["detected"],
        )
        for detected in _DETECTED:
            mismatch.add_metric([detected], self._mismatch.get(detected, 0))
        yield mismatch
        yield CounterMetricFamily(
            "socks6fast_auth_failures",
            "Failed username/password logins (wrong password, unknown user, or refused by the limiter)",
            value=self._auth_failures,
        )
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(HANDSHAKE_BUCKETS, self._handshake_counts, strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        cumulative += self._handshake_counts[-1]
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(
            "socks6fast_handshake_seconds",
            "Seconds from accept to the hand-off to the data plane (requests that were relayed)",
            buckets=buckets,
            sum_value=self._handshake_sum,
        )
        yield GaugeMetricFamily(
            "socks6fast_open_descriptors",
            "Descriptors the process has open",
            value=resources.open_descriptors(),
        )

    def _relay_metrics(self, relayer: Relayer) -> Iterator[Metric]:
        up, down = relayer.bytes_relayed()
        relayed = CounterMetricFamily(
            "socks6fast_relayed_bytes",
            "TCP bytes relayed (CONNECT, BIND), live connections included: the splice engine's own "
            "counters and the asyncio path's",
            labels=["direction"],
        )
        relayed.add_metric(["client_to_remote"], up)
        relayed.add_metric(["remote_to_client"], down)
        yield relayed
        yield GaugeMetricFamily(
            "socks6fast_relays_active", "TCP connections being relayed", value=relayer.active
        )
        yield GaugeMetricFamily(
            "socks6fast_relay_workers",
            "Splice engine worker threads (0 on the asyncio path)",
            value=relayer.workers,
        )
        stats = relayer.pipe_stats()
        pipes = GaugeMetricFamily("socks6fast_relay_pipes", "Splice pipes that exist (in use or pooled)")
        pipe_bytes = GaugeMetricFamily("socks6fast_relay_pipe_bytes", "Capacity of those pipes in bytes")
        max_pipes = GaugeMetricFamily("socks6fast_relay_max_pipes", "Pipes the engine may hold (0: no cap)")
        copied = CounterMetricFamily(
            "socks6fast_relay_copied_bytes", "Bytes relayed through user space for lack of a pipe"
        )
        errors = CounterMetricFamily("socks6fast_relay_pipe_errors", "pipe2() failures")
        if stats is not None:
            pipes.add_metric([], stats.pipes)
            pipe_bytes.add_metric([], stats.pipe_bytes)
            max_pipes.add_metric([], stats.max_pipes)
            copied.add_metric([], stats.copied)
            errors.add_metric([], stats.pipe_errors)
        yield from (pipes, pipe_bytes, max_pipes, copied, errors)

    def _session_metrics(self, context: ServerContext) -> Iterator[Metric]:
        store = context.sessions
        shared = context.shared_sessions
        counters: SessionCounters | None
        if isinstance(shared, RedisSessionStore):
            # Shared: the live sessions of every host (as of the last sweep, within 5 s); the
            # counters are this process's requests.
            active, counters = len(shared), shared.counters
        else:
            active = len(store) if store is not None else 0
            counters = store.counters if isinstance(store, MemorySessionStore) else None
        yield GaugeMetricFamily("socks6fast_sessions_active", "Live SOCKS 6 sessions", value=active)
        names = (
            ("socks6fast_sessions_created", "Sessions created", "created"),
            ("socks6fast_sessions_declined", "Session Requests declined at a cap", "declined"),
            ("socks6fast_token_windows", "Idempotence token windows issued", "windows"),
            ("socks6fast_tokens_spent", "Idempotence tokens spent", "tokens_spent"),
            ("socks6fast_tokens_rejected", "Idempotence tokens rejected", "tokens_rejected"),
        )
        for name, text, attribute in names:
            value = getattr(counters, attribute) if counters is not None else 0
            yield CounterMetricFamily(
                name, f"{text} (since the store was made: start or re-enable)", value=value
            )

    def _udp_metrics(self, udp: UdpService | None) -> Iterator[Metric]:
        active = 0 if udp is None else udp.engine.active
        yield GaugeMetricFamily("socks6fast_udp_associations_active", "Live UDP associations", value=active)
        yield CounterMetricFamily(
            "socks6fast_udp_associations", "UDP associations ended", value=self._udp_associations
        )
        datagrams = CounterMetricFamily(
            "socks6fast_udp_datagrams", "Datagrams relayed by ended UDP associations", labels=["direction"]
        )
        payload = CounterMetricFamily(
            "socks6fast_udp_bytes", "Payload bytes relayed by ended UDP associations", labels=["direction"]
        )
        for i, direction in enumerate(("client_to_remote", "remote_to_client")):
            datagrams.add_metric([direction], self._udp_datagrams[i])
            payload.add_metric([direction], self._udp_bytes[i])
        yield datagrams
        yield payload
        drops = CounterMetricFamily(
            "socks6fast_udp_drops", "Datagrams dropped by the UDP engine, by reason", labels=["reason"]
        )
        counted = {} if udp is None else udp.engine.drops()
        for reason in UdpDrop:
            drops.add_metric([reason.name.lower()], counted.get(reason, 0))
        yield drops
