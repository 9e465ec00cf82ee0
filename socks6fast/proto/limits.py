"""Limits per user and per client address (issue 14 item 4): concurrent connections, new
connections per second, and the bandwidth buckets their relays share.

Strategy: sans-IO like the rest of the core (the time is passed in). `ConnectionLimiter`
keeps one `_Entry` per key (``("user", name)`` or ``("client", address)``) with the live
connection count, a token bucket of new connections (``connection_rate`` tokens a second, at
most ``connection_burst``) and, while connections of that key live, the key's two bandwidth
buckets (client -> remote "upload", remote -> client "download"). The buckets themselves
come from the factory the adapter passes in (``socks6fast.dataplane.bandwidth.TokenBucket``:
the native engine reads them without Python), so this module never imports the data plane.

`ConnectionLimiter.admit` runs after the rules allowed a request (server.py, server_socks5.py):
it checks every key first and counts nothing when one refuses, so a refused client costs no
slot. The refusal text is the connection's ``error`` (its one log line), and the reply is
Connection not allowed by ruleset (0x02; SOCKS 5 REP 0x02; docs/decisions.md D26).
`ConnectionLimiter.release` runs when the connection ends (``connection_ended``).

Reload (SIGHUP): `ConnectionLimiter.configure` applies new values to new connections; the
bandwidth buckets of live keys are reconfigured in place, so live relays follow a changed
rate at once (a removed limit: their bucket is opened wide; a limit added to a key whose
connections are live applies to its new connections only).

Anonymous connections (no user) have only the client address limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["NO_LIMITS", "Admission", "BandwidthBucket", "ConnectionLimiter", "Limits"]

#: The rate a bucket of a removed bandwidth limit gets (bytes/s): live relays that still
#: hold it are, in effect, unlimited.
_WIDE_OPEN = 1e14
#: Idle entries (no live connection) kept at most before full ones are forgotten.
_MAX_IDLE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one user or one client address; 0 means no limit."""

    #: Concurrent connections.
    connections: int = 0
    #: New connections per second (token bucket).
    connection_rate: float = 0.0
    #: New connections in a burst; 0 = max(1, ceil(connection_rate)).
    connection_burst: int = 0
    #: Bytes per second client -> remote, shared by all the key's connections.
    upload: int = 0
    #: Bytes per second remote -> client, likewise.
    download: int = 0

    @property
    def any(self) -> bool:
        return bool(self.connections or self.connection_rate or self.upload or self.download)

    @property
    def burst(self) -> float:
        return float(self.connection_burst or max(1, math.ceil(self.connection_rate)))


class BandwidthBucket(Protocol):
    """What the limiter needs of a bandwidth bucket (`socks6fast.dataplane.bandwidth`)."""

    def configure(self, rate: float, burst: float = 0.0) -> None: ...

    def take(self, n: int) -> float: ...

    @property
    def rate(self) -> float: ...

    @property
    def waits(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """A connection let through: the keys it counts against and the buckets its relay draws
    from (``up``: client -> remote, ``down``: remote -> client)."""

    keys: tuple[tuple[str, str], ...] = ()
    up: tuple[BandwidthBucket, ...] = ()
    down: tuple[BandwidthBucket, ...] = ()


#: The admission of a connection no limit applies to (nothing to release).
NO_LIMITS = Admission()


class _Entry:
    __slots__ = ("count", "down", "seen_down", "seen_up", "stamp", "tokens", "up")

    def __init__(self, burst: float, now: float) -> None:
        self.count = 0
        self.tokens = burst
        self.stamp = now
        self.up: BandwidthBucket | None = None
        self.down: BandwidthBucket | None = None
        self.seen_up = 0  # the buckets' waits already reported (`throttled`)
        self.seen_down = 0

    def refill(self, limits: Limits, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(limits.burst, self.tokens + (now - self.stamp) * limits.connection_rate)
            self.stamp = now


class ConnectionLimiter:
    """Counts connections per user and per client address and refuses those over a limit.

    Args:
        bandwidth: makes a bandwidth bucket from a rate in bytes/s; None: bandwidth limits
            are not enforced (the sans-IO tests).
    """

    __slots__ = ("_bandwidth", "_client", "_entries", "_unreported", "_user", "_users")

    def __init__(self, bandwidth: Callable[[float], BandwidthBucket] | None = None) -> None:
        self._bandwidth = bandwidth
        self._user = Limits()
        self._client = Limits()
        self._users: Mapping[str, Limits] = {}
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Waits of buckets dropped (their last connection ended) before `throttled` saw
        # them: (kind, name, direction) -> (waits, rate). Bounded by the entries dropped
        # between two reports.
        self._unreported: dict[tuple[str, str, str], tuple[int, float]] = {}

    def throttled(self) -> list[str]:
        """One sentence per user or client address whose bandwidth limit made a relay wait
        since the last call (issue 14: "a slowed stream, and a log line"); the server logs
        them every few seconds, so a throttled user costs a line per interval, not per wait.
        """
        found = dict(self._unreported)
        self._unreported.clear()
        for (kind, name), entry in self._entries.items():
            for direction in ("up", "down"):
                bucket = entry.up if direction == "up" else entry.down
                if bucket is None:
                    continue
                waits = bucket.waits
                seen = entry.seen_up if direction == "up" else entry.seen_down
                if waits > seen:
                    before, _ = found.get((kind, name, direction), (0, 0.0))
                    found[(kind, name, direction)] = (before + waits - seen, bucket.rate)
                    if direction == "up":
                        entry.seen_up = waits
                    else:
                        entry.seen_down = waits
        lines = []
        for (kind, name, direction), (waits, rate) in sorted(found.items()):
            who = f"user {name!r}" if kind == "user" else f"client {name}"
            way = "upload" if direction == "up" else "download"
            lines.append(f"limit: {who} {way} held to {rate:.0f} bytes/s ({waits} waits for tokens)")
        return lines

    @property
    def enabled(self) -> bool:
        """Some limit is configured."""
        return self._user.any or self._client.any or any(lim.any for lim in self._users.values())

    def configure(self, user: Limits, client: Limits, users: Mapping[str, Limits] | None = None) -> None:
        """Set the limits: ``user`` for every authenticated user, ``users`` per-user
        replacements, ``client`` per client address. Live bandwidth buckets follow."""
        self._user, self._client, self._users = user, client, dict(users or {})
        for (kind, name), entry in self._entries.items():
            limits = self._limits(kind, name)
            for attribute, rate in (("up", limits.upload), ("down", limits.download)):
                bucket = getattr(entry, attribute)
                if bucket is None:
                    continue
                if rate:
                    bucket.configure(float(rate))
                else:
                    bucket.configure(_WIDE_OPEN)
                    setattr(entry, attribute, None)

    def _limits(self, kind: str, name: str) -> Limits:
        if kind == "client":
            return self._client
        return self._users.get(name, self._user)

    def admit(self, client_ip: str, user: str | None, now: float) -> Admission | str:
        """Count a new connection, or say why it is refused (a sentence for the log)."""
        checks: list[tuple[tuple[str, str], Limits, str]] = []
        if user is not None:
            limits = self._users.get(user, self._user)
            if limits.any:
                checks.append((("user", user), limits, f"user {user!r}"))
        if self._client.any:
            checks.append((("client", client_ip), self._client, f"client {client_ip}"))
        if not checks:
            return NO_LIMITS
        entries = self._entries
        found: list[tuple[_Entry, Limits]] = []
        for key, limits, who in checks:
            entry = entries.get(key)
            if entry is None:
                entry = _Entry(limits.burst, now)
            if limits.connections and entry.count >= limits.connections:
                plural = "" if entry.count == 1 else "s"
                return f"limit: {who} has {entry.count} connection{plural}, the most allowed"
            if limits.connection_rate:
                entry.refill(limits, now)
                if entry.tokens < 1.0:
                    return f"limit: {who} opens more than {limits.connection_rate:g} connections per second"
            found.append((entry, limits))
        up: list[BandwidthBucket] = []
        down: list[BandwidthBucket] = []
        if len(entries) > _MAX_IDLE_ENTRIES:
            self._forget_idle(now)
        for (key, _, _), (entry, limits) in zip(checks, found, strict=True):
            entries[key] = entry
            entry.count += 1
            if limits.connection_rate:
                entry.tokens -= 1.0
            if self._bandwidth is not None:
                if limits.upload:
                    if entry.up is None:
                        entry.up = self._bandwidth(float(limits.upload))
                    up.append(entry.up)
                if limits.download:
                    if entry.down is None:
                        entry.down = self._bandwidth(float(limits.download))
                    down.append(entry.down)
        return Admission(tuple(key for key, _, _ in checks), tuple(up), tuple(down))

    def release(self, admission: Admission) -> None:
        """The connection ended: free its slots (its relay keeps its buckets till it ends)."""
        for key in admission.keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.count -= 1
            if entry.count <= 0:
                entry.count = 0
                for direction, bucket, seen in (
                    ("up", entry.up, entry.seen_up),
                    ("down", entry.down, entry.seen_down),
                ):
                    if bucket is not None and bucket.waits > seen:
                        before, _ = self._unreported.get((*key, direction), (0, 0.0))
                        self._unreported[(*key, direction)] = (before + bucket.waits - seen, bucket.rate)
                entry.seen_up = entry.seen_down = 0
                # A later connection starts a fresh bucket (full): no live relay shares it.
                entry.up = entry.down = None
                limits = self._limits(*key)
                if not limits.connection_rate:
                    del self._entries[key]

    def _forget_idle(self, now: float) -> None:
        """Drop entries with no live connection whose connection bucket is full again."""
        for key in [key for key, entry in self._entries.items() if entry.count == 0]:
            entry = self._entries[key]
            limits = self._limits(*key)
            entry.refill(limits, now)
            if not limits.connection_rate or entry.tokens >= limits.burst:
                del self._entries[key]

    def live(self, kind: str, name: str) -> int:
        """Live connections counted for ``("user", name)`` or ``("client", address)``."""
        entry = self._entries.get((kind, name))
        return 0 if entry is None else entry.count
