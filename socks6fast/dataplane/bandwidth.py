"""Bandwidth limits: one token bucket per user or client address, shared by its relays.

Strategy (issue 14 item 4): a `TokenBucket` holds up to ``burst`` bytes of tokens and
regains ``rate`` per second. Every relay of one user (or one client address) draws from
the same bucket, so two connections share the budget. With the splice engine the bucket is
the compiled ``_relay_c.TokenBucket``: the C workers consult it before each splice (no
Python call per chunk) and park a direction that ran out until it refills. The asyncio path
(TLS legs, ``SOCKS6FAST_NO_EXTENSIONS=1``) calls `TokenBucket.take` after each chunk it
forwards and pauses reading for the seconds it answers. Both flavours have one interface,
so a user's TLS and plain connections share one bucket too.

The pure-Python `PyTokenBucket` is the twin used where the engine is not built; its
burst default and arithmetic match the C one (``bucket_set`` in ``_relay_c.pyx``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .engine import ENGINE_AVAILABLE

__all__ = ["PyTokenBucket", "TokenBucket", "default_burst"]


def default_burst(rate: float) -> float:
    """1/20 s of the rate, at least 16 KiB, at most one second's worth (the C default)."""
    burst = rate / 20.0
    if burst < 16384.0:
        burst = 16384.0 if rate > 16384.0 else rate
    return burst


class PyTokenBucket:
    """The pure-Python twin of ``_relay_c.TokenBucket`` (same arguments and answers)."""

    __slots__ = ("_burst", "_last", "_lock", "_rate", "_tokens", "_waits")

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self._lock = threading.Lock()  # the asyncio loop is one thread; kept for parity with C
        self._rate = 0.0
        self._burst = 0.0
        self._set(rate, burst)
        self._tokens = self._burst
        self._last = time.monotonic()
        self._waits = 0

    def _set(self, rate: float, burst: float) -> None:
        if not 0.0 < rate < 1e15:
            raise ValueError(f"rate must be above 0 and below 1e15 bytes/s, got {rate}")
        if not 0.0 <= burst < 1e15:
            raise ValueError(f"burst must be at least 0 and below 1e15 bytes, got {burst}")
        self._rate = float(rate)
        self._burst = float(burst) if burst > 0 else default_burst(rate)

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now

    def configure(self, rate: float, burst: float = 0.0) -> None:
        """New rate and burst, for every relay drawing from this bucket from now on."""
        with self._lock:
            self._refill(time.monotonic())
            self._set(rate, burst)
            self._tokens = min(self._tokens, self._burst)

    def take(self, n: int) -> float:
        """Spend ``n`` bytes now; the seconds to wait before reading more (0.0 if none)."""
        with self._lock:
            self._refill(time.monotonic())
            self._tokens -= n
            debt = -self._tokens
            if debt > 0:
                self._waits += 1
        return debt / self._rate if debt > 0 else 0.0

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def waits(self) -> int:
        """Times a relay had to wait for this bucket's tokens since it was made."""
        return self._waits

    @property
    def tokens(self) -> float:
        """Tokens now (bytes; below 0 while in debt)."""
        with self._lock:
            self._refill(time.monotonic())
            return self._tokens


if TYPE_CHECKING:
    from ._relay_c import TokenBucket as _CTokenBucket

#: The bucket class relays take: the compiled one where the splice engine runs (its
#: workers can only read C buckets), else the Python twin.
TokenBucket: type[_CTokenBucket] | type[PyTokenBucket] = PyTokenBucket
if ENGINE_AVAILABLE:
    from ._relay_c import TokenBucket as _Loaded

    TokenBucket = _Loaded
