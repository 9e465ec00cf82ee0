"""The one place the proxy hands a relayed connection to the data plane.

Strategy: once a CONNECT or BIND succeeded, the server calls
:meth:`Relayer.relay_sockets` (plain sockets) or :meth:`Relayer.relay_transports`
(e.g. a TLS client leg the kernel cannot splice) and awaits a
:class:`~socks6fast.dataplane.engine.RelayResult`.

* "splice" path: on Linux with the compiled extension, sockets go to the C
  :class:`~socks6fast.dataplane.engine.RelayEngine` (worker threads, splice(2), no GIL). The
  engine's eventfd is watched with ``loop.add_reader``; each finished pair resolves
  the future its ``relay_sockets`` call awaits.
* "asyncio" path: elsewhere, and always for ``relay_transports``, two
  :class:`asyncio.Protocol` legs forward ``data_received`` chunks to the other
  transport. Backpressure is real: when a destination's write buffer passes the
  high-water mark (``buffer_size``) its ``pause_writing`` pauses reading on the
  source, and ``resume_writing`` resumes it. Works on plain asyncio and uvloop.

Half-close on the asyncio path: EOF from one leg becomes ``write_eof()`` on the
other, and the relay ends once both directions saw EOF. TLS transports cannot
half-close (``can_write_eof()`` is False and an SSL transport closes itself after
EOF), so when either leg of a pair is TLS, an EOF from either side closes both legs
once the data already forwarded is flushed (``transport.close()`` flushes first);
bytes the other side sends after that point are not relayed.

Resets: a leg lost with ConnectionResetError / BrokenPipeError ends the pair with
``RelayEnd.RESET``; other errors end it with ``RelayEnd.ERROR``. Either way the bytes
the failed leg delivered before its failure still reach the other leg: that leg stops
reading, its transport's buffer drains, and its kernel send queue is acknowledged by
its peer (SIOCOUTQ 0, polled every few ms, bounded by the idle timeout); only then is
it aborted with SO_LINGER 0, so its peer gets the whole data and then a reset (a clean
FIN would make a truncated transfer look complete, and an earlier reset would discard
the tail). Byte counts are the bytes handed to the destination transport minus what was
still in its write buffer when it was aborted.

Cuts: whatever ends a relay other than EOF both ways (idle timeout, cancellation,
:meth:`Relayer.close` at the drain deadline) aborts both legs with a reset: one rule
for every cut (``RelayEnd``). Cancelling a ``relay_*`` call re-raises CancelledError;
:meth:`Relayer.close` makes the pending calls return with ``RelayEnd.SHUTDOWN``.

Urgent data (TCP MSG_OOB): the transports read with recv(), which steps over the urgent
byte; every in-band byte is relayed, the urgent byte itself is dropped (asyncio does
not report urgent data). The splice engine forwards it as urgent (see ``_relay_c.pyx``).

Dead engine workers: when a worker's epoll_wait fails for good, the engine takes it out
of its rotation and wakes the loop; the Relayer logs it once and, should no worker be
left, relays new connections on the asyncio path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, cast

from ..constants import RelayEnd
from .engine import (
    ENGINE_AVAILABLE,
    PATH_ASYNCIO,
    PATH_SPLICE,
    PipeStats,
    RelayEngine,
    RelayPath,
    RelayResult,
)
from .resources import pipe_quota

if TYPE_CHECKING:
    from ..proto.limits import BandwidthBucket
    from ._relay_c import RelayEngine as _RelayEngineType
    from ._relay_c import TokenBucket as _CBucket

    #: Bandwidth limits of one direction (`socks6fast.dataplane.bandwidth.TokenBucket`).
    Limits = tuple[BandwidthBucket, ...]

#: Default seconds without a byte either way before a relayed connection is closed.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Default write high-water mark of the asyncio path (bytes per leg).
DEFAULT_BUFFER_SIZE = 256 * 1024
#: Default splice pipe capacity of the engine (bytes).
DEFAULT_PIPE_SIZE = 1 << 20

# Exceptions that mean "the peer reset the connection" rather than a local error.
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# struct linger {l_onoff=1, l_linger=0}: close() sends RST.
_LINGER_RESET = struct.pack("ii", 1, 0)
#: Seconds between two checks of a leg that must be flushed before it is reset.
_FLUSH_POLL = 0.005

log = logging.getLogger("socks6fast.relay")

if sys.platform.startswith("linux"):
    import fcntl
    import termios

    def _unacknowledged(transport: asyncio.BaseTransport) -> int:
        """SIOCOUTQ (= TIOCOUTQ on Linux): bytes of the socket's send queue not yet
        acknowledged by its peer; 0 when unknown (the socket is gone)."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, ValueError):
            return 0
        return value

else:  # pragma: no cover - the asyncio path elsewhere: flush the transport's buffer only

    def _unacknowledged(transport: asyncio.BaseTransport) -> int:
        return 0


def _set_reset_on_close(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:  # already dead: nothing to reset
        pass


class _Leg(asyncio.Protocol):
    """One transport of an asyncio-path relay; forwards what it reads to the other leg."""

    def __init__(self, relay: _PairRelay) -> None:
        self.relay = relay
        self.peer: _Leg = self
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # read before the relay started
        self.eof = False  # our transport's reader saw EOF
        self.lost = False
        self.throttled = False  # reading paused: the other leg's write buffer is full
        self.forwarded = 0  # bytes handed to the other leg's transport
        self.flushing = False  # the peer failed: deliver what we hold, then reset
        self.limits: Limits = ()  # bandwidth buckets what this leg reads draws from
        self.limited = False  # reading paused: a bucket is in debt (issue 14 item 4)

    def as_factory(self) -> _Leg:
        """Protocol factory for ``loop.connect_accepted_socket`` that returns this leg."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.attach(self, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.relay.on_data(self, data)

    def eof_received(self) -> bool:
        return self.relay.on_eof(self)

    def pause_writing(self) -> None:
        # Our write buffer passed the high-water mark: stop reading the source feeding it.
        self.peer.throttled = True
        self.relay.pause(self.peer)

    def resume_writing(self) -> None:
        self.peer.throttled = False
        self.relay.maybe_resume(self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.on_lost(self, exc)


class _PairRelay:
    """State of one asyncio-path relay: two legs, flow control, idle timer, result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, buffer_size: int) -> None:
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._buffer_size = buffer_size
        self.client = _Leg(self)
        self.remote = _Leg(self)
        self.client.peer = self.remote
        self.remote.peer = self.client
        self.started = False
        self.end: RelayEnd | None = None
        self.done: asyncio.Future[RelayResult] = loop.create_future()
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = None

    # -- leg callbacks -------------------------------------------------------------

    def attach(self, leg: _Leg, transport: asyncio.Transport) -> None:
        leg.transport = transport
        transport.set_write_buffer_limits(high=self._buffer_size, low=self._buffer_size // 4)

    def on_data(self, leg: _Leg, data: bytes) -> None:
        if not self.started:
            # The other leg is not there yet (relay_sockets builds them one by one).
            leg.pending.append(data)
            self.pause(leg)
            return
        self._last = self._loop.time()
        self._send(leg, data)
        if leg.limits:
            self._charge(leg, len(data))

    def _charge(self, leg: _Leg, n: int) -> None:
        """Bandwidth limits: spend what was read; a bucket in debt pauses reading for as
        long as the debt takes to repay (the asyncio twin of the engine's parking)."""
        delay = max(bucket.take(n) for bucket in leg.limits)
        if delay > 0.0 and not leg.limited:
            leg.limited = True
            self.pause(leg)
            self._loop.call_later(delay, self._unlimit, leg)

    def _unlimit(self, leg: _Leg) -> None:
        leg.limited = False
        self.maybe_resume(leg)

    def on_eof(self, leg: _Leg) -> bool:
        leg.eof = True
        if leg.flushing:
            # Its peer failed: _poll_flush() resets it once flushed; closing it now would
            # send a FIN, and the cut would look like a clean end.
            return leg.transport is not None and leg.transport.can_write_eof()
        if not self.started:
            # start() forwards it. Keep the transport open where it can half-close; an
            # SSL transport closes itself whatever we answer (True only draws a warning).
            return leg.transport is not None and leg.transport.can_write_eof()
        return self._forward_eof(leg)

    def on_lost(self, leg: _Leg, exc: Exception | None) -> None:
        leg.lost = True
        if exc is not None and self.end is None:
            self.end = RelayEnd.RESET if isinstance(exc, _RESET_ERRORS) else RelayEnd.ERROR
        if self.started:
            self._after_lost(leg, exc is not None)
        self._maybe_finish()

    # -- relay logic ---------------------------------------------------------------

    def start(self, to_remote: bytes, to_client: bytes) -> None:
        """Wire the legs together once both transports exist."""
        self.started = True
        self._last = self._loop.time()
        if self._idle_timeout > 0:
            self._timer = self._loop.call_at(self._last + self._idle_timeout, self._check_idle)
        # Control-plane leftovers first, then anything read before start, in order.
        if to_remote:
            self._send(self.client, to_remote)
        if to_client:
            self._send(self.remote, to_client)
        for leg in (self.client, self.remote):
            for chunk in leg.pending:
                self._send(leg, chunk)
                if leg.limits:
                    self._charge(leg, len(chunk))
            leg.pending.clear()
        for leg in (self.client, self.remote):
            if leg.lost:
                self._after_lost(leg, self.end is not None)
        for leg in (self.client, self.remote):
            if leg.eof and not leg.lost and not self._forward_eof(leg) and leg.transport is not None:
                # eof_received() already returned True for it: closing is ours now.
                leg.transport.close()
        for leg in (self.client, self.remote):
            self.maybe_resume(leg)
        self._maybe_finish()

    def _send(self, leg: _Leg, data: bytes) -> None:
        dst = leg.peer.transport
        if dst is None or leg.peer.lost or dst.is_closing():
            return  # the relay is ending; nothing can be delivered any more
        dst.write(data)
        leg.forwarded += len(data)

    def _forward_eof(self, leg: _Leg) -> bool:
        """Direction leg -> peer got EOF. Returns eof_received()'s keep-open answer."""
        src = leg.transport
        dst = leg.peer.transport
        if src is None or dst is None:
            return False
        half_close = src.can_write_eof() and dst.can_write_eof()
        if leg.peer.eof or leg.peer.lost or not half_close:
            # Both directions finished, or a TLS leg that cannot half-close: close both;
            # close() sends what is buffered first.
            self._close_leg(leg.peer)
            if not src.can_write_eof():
                return False  # an SSL transport closes itself (True only draws a warning)
            self._close_leg(leg)
            return True
        if not dst.is_closing():
            dst.write_eof()  # sent once the write buffer is flushed
        return True

    def _after_lost(self, leg: _Leg, by_error: bool) -> None:
        peer = leg.peer
        if peer.lost or peer.transport is None:
            return
        if by_error:
            self._flush_then_reset(peer)
        else:
            # Closed cleanly (e.g. a TLS leg after EOF): deliver what we forwarded, then close.
            self._close_leg(peer)

    def _flush_then_reset(self, leg: _Leg) -> None:
        """leg's peer failed: pass the failure on to leg with a reset, but only once the
        bytes the peer sent before failing have reached leg's peer (see module doc)."""
        if leg.flushing:
            return
        leg.flushing = True
        self.pause(leg)  # nothing it reads could be delivered any more
        self._poll_flush(leg, -1)

    def _poll_flush(self, leg: _Leg, last: int) -> None:
        transport = leg.transport
        if transport is None or leg.lost or transport.is_closing():
            return  # aborted meanwhile (idle timeout, shutdown) or gone
        pending = transport.get_write_buffer_size() + _unacknowledged(transport)
        if pending <= 0:
            self._abort_leg(leg, reset=True)
            return
        if 0 <= pending < last:
            self._last = self._loop.time()  # the peer is reading: not idle
        self._loop.call_later(_FLUSH_POLL, self._poll_flush, leg, pending)

    def _close_leg(self, leg: _Leg) -> None:
        if leg.transport is not None and not leg.lost and not leg.transport.is_closing():
            leg.transport.close()

    def _abort_leg(self, leg: _Leg, *, reset: bool) -> None:
        transport = leg.transport
        if transport is None or leg.lost:
            return
        # Bytes still in our write buffer will never reach the peer: don't count them.
        leg.peer.forwarded -= transport.get_write_buffer_size()
        if reset:
            _set_reset_on_close(transport)
        transport.abort()

    def pause(self, leg: _Leg) -> None:
        if leg.transport is not None and not leg.lost and not leg.transport.is_closing():
            leg.transport.pause_reading()

    def maybe_resume(self, leg: _Leg) -> None:
        transport = leg.transport
        if (
            self.started
            and transport is not None
            and not (leg.eof or leg.lost or leg.throttled or leg.flushing or leg.limited)
            and not transport.is_closing()
        ):
            transport.resume_reading()

    def _check_idle(self) -> None:
        self._timer = None
        deadline = self._last + self._idle_timeout
        if self._loop.time() >= deadline:
            self.abort(RelayEnd.IDLE_TIMEOUT)
        else:
            self._timer = self._loop.call_at(deadline, self._check_idle)

    def abort(self, reason: RelayEnd) -> None:
        """End the relay now (a cut): both legs reset, without flushing."""
        if self.end is None:
            self.end = reason
        for leg in (self.client, self.remote):
            self._abort_leg(leg, reset=True)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.done.done():
            return
        if not (self.client.lost and self.remote.lost):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.done.set_result(
            RelayResult(
                bytes_client_to_remote=self.client.forwarded,
                bytes_remote_to_client=self.remote.forwarded,
                end=self.end if self.end is not None else RelayEnd.EOF,
                path=PATH_ASYNCIO,
            )
        )


class Relayer:
    """Hands relayed connections to the data plane and reports how each one ended.

    Args:
        loop: the event loop the server runs on (asyncio or uvloop).
        use_engine: True requires the C splice engine, False forces the asyncio path,
            None (default) uses the engine when :data:`socks6fast.dataplane.engine.ENGINE_AVAILABLE`.
        workers: engine worker threads; 0 = one per usable CPU.
        idle_timeout: seconds without a byte either way before a connection is closed
            (``RelayEnd.IDLE_TIMEOUT``); 0 disables it.
        buffer_size: write high-water mark per leg on the asyncio path.
        pipe_size: splice pipe capacity requested by the engine; capped at
            /proc/sys/fs/pipe-max-size for an unprivileged process, which may not ask for more.
        max_pipes: pipes the engine may hold at once (each is two descriptors), 0 = no cap;
            past it relays copy through user space (`set_max_pipes` changes it later).
        pipe_budget: bytes of pipe capacity the engine may hold; None (default) = the
            share of the user's pipe quota `socks6fast.dataplane.resources.pipe_quota`
            allows (no cap for a privileged process); 0 = no cap.

    Raises:
        RuntimeError: ``use_engine=True`` but the engine is not available.
        OSError: the engine could not start its threads.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        use_engine: bool | None = None,
        workers: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        max_pipes: int = 0,
        pipe_budget: int | None = None,
    ) -> None:
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0, got {idle_timeout}")
        if buffer_size < 1024:
            raise ValueError(f"buffer_size must be >= 1024, got {buffer_size}")
        if use_engine is None:
            use_engine = ENGINE_AVAILABLE
        if use_engine and RelayEngine is None:
            raise RuntimeError("the splice relay engine is not available (not Linux, or no extensions)")
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._buffer_size = buffer_size
        self._closed = False
        self._idents = itertools.count(1)
        # ident -> (future, bytes sent to remote before the engine took over, ... to client)
        self._waiters: dict[int, tuple[asyncio.Future[RelayResult], int, int]] = {}
        self._relays: set[_PairRelay] = set()
        # Bytes relayed (client -> remote, remote -> client) that the engine's counters do not
        # hold: the early bytes sent before the engine took a pair, and the asyncio path's
        # ended relays (its live ones are summed at read time). Issue 14 metrics.
        self._extra_up = 0
        self._extra_down = 0
        self._dead_logged: set[int] = set()  # engine workers whose failure was logged
        self._engine_dead = False  # no engine worker left: relay on the asyncio path
        self._engine: _RelayEngineType | None = None
        if use_engine and RelayEngine is not None:
            if pipe_budget is None:
                # Issue 16 defect 4: pipes within the user's quota, no larger than allowed.
                quota = pipe_quota()
                pipe_budget = quota.budget
                if quota.max_size:
                    pipe_size = max(4096, min(pipe_size, quota.max_size))
            self._engine = RelayEngine(
                workers=workers,
                idle_timeout=idle_timeout,
                pipe_size=pipe_size,
                max_pipes=max_pipes,
                pipe_budget=pipe_budget,
            )
        if self._engine is not None:
            loop.add_reader(self._engine.fileno(), self._on_engine_done)

    @property
    def path(self) -> RelayPath:
        """Where ``relay_sockets`` sends connections: "splice" (C engine) or "asyncio"."""
        return PATH_SPLICE if self._engine is not None and not self._engine_dead else PATH_ASYNCIO

    @property
    def workers(self) -> int:
        """Engine worker threads (0 on the asyncio path)."""
        return self._engine.workers if self._engine is not None else 0

    @property
    def active(self) -> int:
        """Connections currently relayed, both paths together."""
        return len(self._waiters) + len(self._relays)

    def set_max_pipes(self, max_pipes: int) -> None:
        """Change how many pipes the engine may hold at once (0 = no cap); no-op on the
        asyncio path, which has no pipes."""
        if self._engine is not None:
            self._engine.max_pipes = max_pipes

    def pipe_stats(self) -> PipeStats | None:
        """The engine's pipe counters, or None on the asyncio path (or once closed)."""
        engine = self._engine
        if engine is None or self._closed:
            return None
        return PipeStats(
            pipes=engine.pipes,
            pipe_bytes=engine.pipe_bytes,
            max_pipes=engine.max_pipes,
            pipe_budget=engine.pipe_budget,
            copied=engine.copied,
            pipe_errors=engine.pipe_errors,
        )

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes relayed so far, ``(client -> remote, remote -> client)``, both paths, live
        connections included: the engine's own per-worker counters plus the asyncio path's
        per-leg counts, read now (for a metrics scrape; no per-chunk bookkeeping is added)."""
        up, down = self._extra_up, self._extra_down
        engine = self._engine
        if engine is not None:
            a_to_b, b_to_a = engine.relayed  # add(fd_client, fd_remote): a is the client
            up += a_to_b
            down += b_to_a
        for relay in self._relays:
            up += relay.client.forwarded
            down += relay.remote.forwarded
        return up, down

    async def relay_sockets(
        self,
        client: socket.socket,
        remote: socket.socket,
        *,
        to_remote: bytes = b"",
        to_client: bytes = b"",
        up: Limits = (),
        down: Limits = (),
    ) -> RelayResult:
        """Relay between two connected stream sockets until the connection ends.

        Takes ownership of both sockets: they are closed when this returns or raises.

        Args:
            client: the client leg.
            remote: the remote (destination or BIND peer) leg.
            to_remote: bytes the control plane already read from the client (e.g. data
                sent right after the Request, draft-11 section "Requests"); sent to the
                remote before anything else and counted in ``bytes_client_to_remote``.
            to_client: likewise, bytes already read from the remote.
            up: bandwidth buckets (`socks6fast.dataplane.bandwidth.TokenBucket`) the
                client -> remote direction draws from; () = unlimited.
            down: likewise for remote -> client.

        Returns:
            The byte counts and the reason the relay ended.

        Raises:
            RuntimeError: the relayer is closed.
            asyncio.CancelledError: cancelled; both legs are closed.
        """
        if self._closed:
            client.close()
            remote.close()
            raise RuntimeError("Relayer is closed")
        if self._engine is None or self._engine_dead:
            return await self._relay_sockets_asyncio(client, remote, to_remote, to_client, up, down)
        try:
            # Usually non-blocking already (the server's sockets are): skip the ioctl then.
            if client.gettimeout() != 0.0:
                client.setblocking(False)
            if remote.gettimeout() != 0.0:
                remote.setblocking(False)
            if to_remote:
                await self._loop.sock_sendall(remote, to_remote)
                self._extra_up += len(to_remote)
            if to_client:
                await self._loop.sock_sendall(client, to_client)
                self._extra_down += len(to_client)
            if self._closed:
                raise RuntimeError("Relayer is closed")
        except BaseException:
            client.close()
            remote.close()
            raise
        ident = next(self._idents)
        fd_client = client.detach()
        fd_remote = remote.detach()
        try:
            if up or down:
                # The engine's workers read only the compiled buckets (add() checks).
                c_up, c_down = cast("tuple[_CBucket, ...]", up), cast("tuple[_CBucket, ...]", down)
                self._engine.add(fd_client, fd_remote, ident, c_up, c_down)
            else:
                self._engine.add(fd_client, fd_remote, ident)
        except BaseException:
            # add() failed: the fds are still ours.
            socket.close(fd_client)
            socket.close(fd_remote)
            raise
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        self._waiters[ident] = (future, len(to_remote), len(to_client))
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiters.pop(ident, None) is not None and self._engine is not None:
                self._engine.cancel(ident)  # the worker closes both sockets
            raise

    async def _relay_sockets_asyncio(
        self,
        client: socket.socket,
        remote: socket.socket,
        to_remote: bytes,
        to_client: bytes,
        up: Limits = (),
        down: Limits = (),
    ) -> RelayResult:
        relay = _PairRelay(self._loop, self._idle_timeout, self._buffer_size)
        relay.client.limits, relay.remote.limits = up, down
        try:
            await self._loop.connect_accepted_socket(relay.client.as_factory, client)
        except BaseException:
            client.close()
            remote.close()
            raise
        try:
            await self._loop.connect_accepted_socket(relay.remote.as_factory, remote)
        except BaseException:
            remote.close()
            relay.abort(RelayEnd.SHUTDOWN)
            raise
        return await self._run(relay, to_remote, to_client)

    async def relay_transports(
        self,
        client_transport: asyncio.Transport | socket.socket,
        remote_transport: asyncio.Transport | socket.socket,
        *,
        to_remote: bytes = b"",
        to_client: bytes = b"",
        up: Limits = (),
        down: Limits = (),
    ) -> RelayResult:
        """Relay between two open asyncio transports (always the asyncio path).

        Use it for legs the kernel cannot splice, such as a TLS client leg. Takes the
        transports over with ``transport.set_protocol()``; they are closed when this
        returns or raises. Bytes the previous protocols already read are the caller's
        to pass as ``to_remote`` / ``to_client``.

        Either leg may also be a connected socket (e.g. the remote leg next to a TLS
        client leg): the relayer wraps it itself with its own protocol, which keeps
        whatever arrives before the relay starts. Prefer that over wrapping it with a
        placeholder protocol first: uvloop starts reading right after
        ``connection_made()``, so a placeholder may see (and drop) early bytes.

        Args:
            client_transport: the client leg (may be TLS), or its socket.
            remote_transport: the remote leg (may be TLS), or its socket.
            to_remote: bytes already read from the client, sent to the remote first.
            to_client: bytes already read from the remote, sent to the client first.
            up, down: bandwidth buckets, as for `relay_sockets`.

        Returns:
            The byte counts and the reason the relay ended (``path == "asyncio"``).

        Raises:
            RuntimeError: the relayer is closed.
            asyncio.CancelledError: cancelled; both legs are closed.
        """
        legs_in = (client_transport, remote_transport)
        if self._closed:
            for item in legs_in:
                if isinstance(item, socket.socket):
                    item.close()
                else:
                    item.abort()
            raise RuntimeError("Relayer is closed")
        relay = _PairRelay(self._loop, self._idle_timeout, self._buffer_size)
        relay.client.limits, relay.remote.limits = up, down
        pairs = ((relay.client, client_transport), (relay.remote, remote_transport))
        # Sockets first: their legs buffer anything read before start(). The transports
        # are switched over afterwards, with no await before start().
        for i, (leg, item) in enumerate(pairs):
            if not isinstance(item, socket.socket):
                continue
            try:
                await self._loop.connect_accepted_socket(leg.as_factory, item)
            except BaseException:
                item.close()
                relay.abort(RelayEnd.SHUTDOWN)
                for _, other in pairs[i + 1 :]:
                    if isinstance(other, socket.socket):
                        other.close()
                for _, other in pairs:
                    if not isinstance(other, socket.socket):
                        other.abort()
                raise
        for leg, item in pairs:
            if not isinstance(item, socket.socket):
                relay.attach(leg, item)
                item.set_protocol(leg)
        return await self._run(relay, to_remote, to_client)

    async def _run(self, relay: _PairRelay, to_remote: bytes, to_client: bytes) -> RelayResult:
        self._relays.add(relay)
        try:
            if self._closed:
                relay.abort(RelayEnd.SHUTDOWN)
            else:
                relay.start(to_remote, to_client)
            return await asyncio.shield(relay.done)
        except asyncio.CancelledError:
            relay.abort(RelayEnd.SHUTDOWN)
            raise
        finally:
            self._relays.discard(relay)
            self._extra_up += relay.client.forwarded
            self._extra_down += relay.remote.forwarded

    def _on_engine_done(self) -> None:
        if self._engine is None:
            return
        for ident, a_to_b, b_to_a, end in self._engine.drain():
            self._resolve(ident, a_to_b, b_to_a, end)
        if self._engine.dead_count != len(self._dead_logged):
            self._note_dead_workers(self._engine)

    def _note_dead_workers(self, engine: _RelayEngineType) -> None:
        """Log each engine worker whose epoll_wait failed, once; the engine took it out of
        its rotation. With none left, new connections go to the asyncio path."""
        live = engine.live_workers
        for index, err in engine.dead_workers():
            if index in self._dead_logged:
                continue
            self._dead_logged.add(index)
            log.error(
                "relay worker %d stopped: epoll_wait failed (%s); its connections were reset; "
                "%d of %d workers keep relaying%s",
                index,
                os.strerror(err),
                live,
                engine.workers,
                "" if live else ", new connections use the asyncio path",
            )
        self._engine_dead = live == 0

    def _resolve(self, ident: int, a_to_b: int, b_to_a: int, end: RelayEnd) -> None:
        entry = self._waiters.pop(ident, None)
        if entry is None:
            return  # cancelled meanwhile
        future, extra_to_remote, extra_to_client = entry
        if not future.done():
            future.set_result(
                RelayResult(
                    bytes_client_to_remote=a_to_b + extra_to_remote,
                    bytes_remote_to_client=b_to_a + extra_to_client,
                    end=end,
                    path=PATH_SPLICE,
                )
            )

    async def close(self) -> None:
        """End every relay (``RelayEnd.SHUTDOWN``), stop the engine, release its fds.

        Pending ``relay_*`` calls return their results. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        relays = list(self._relays)
        for relay in relays:
            relay.abort(RelayEnd.SHUTDOWN)
        engine = self._engine
        if engine is not None:
            # The engine's counters go with its workers: keep what they hold (bytes_relayed
            # never goes back; the last milliseconds of the teardown are not counted).
            a_to_b, b_to_a = engine.relayed
            self._extra_up += a_to_b
            self._extra_down += b_to_a
            self._loop.remove_reader(engine.fileno())
            # Joins the worker threads (milliseconds); they close every pair first.
            engine.close()
            for ident, a_to_b, b_to_a, end in engine.drain():
                self._resolve(ident, a_to_b, b_to_a, end)
        if relays:
            # Aborted transports report connection_lost on the next loop iterations.
            await asyncio.wait([r.done for r in relays], timeout=5.0)
