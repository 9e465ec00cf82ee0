"""Data plane selector: the C splice engine when available, else the asyncio path.

Strategy: once a CONNECT or BIND succeeded, the control plane hands both sockets to
the data plane (:class:`socks6fast.dataplane.relayer.Relayer`) and forgets them. On
Linux, the compiled :class:`RelayEngine` (``socks6fast.dataplane._relay_c``) relays them in C
worker threads with splice(2), outside the GIL; elsewhere, or with
``SOCKS6FAST_NO_EXTENSIONS=1``, the Relayer falls back to asyncio protocols.

The engine's Python API (documented in full in ``_relay_c.pyx``)::

    engine = RelayEngine(workers=0, idle_timeout=0.0, pipe_size=1 << 20, max_pipes=0, pipe_budget=0)
    engine.fileno() -> int          # readable while finished pairs wait in drain()
    engine.add(fd_a, fd_b, ident, up=(), down=())  # takes ownership of both fds;
                                    # up/down: TokenBucket bandwidth limits (dataplane/bandwidth.py)
    engine.cancel(ident)            # end one pair now (RelayEnd.SHUTDOWN, both legs reset)
    engine.drain() -> list[tuple[int, int, int, RelayEnd]]  # ident, a->b, b->a, why
    engine.active -> int
    engine.live_workers -> int      # workers still in the rotation
    engine.dead_count -> int        # workers whose epoll_wait failed...
    engine.dead_workers() -> list[tuple[int, int]]  # ...as (index, errno)
    engine.max_pipes = n            # pipes it may hold at once; past it relays copy
    engine.pipes, engine.pipe_bytes, engine.copied, engine.pipe_errors  # see PipeStats
    engine.relayed -> tuple[int, int]  # bytes a -> b, b -> a so far (workers' own counters)
    engine.close()                  # idempotent; ends every pair (SHUTDOWN)

This module imports neither asyncio nor socket.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .._extensions import NO_EXTENSIONS
from ..constants import RelayEnd

if TYPE_CHECKING:
    from ._relay_c import RelayEngine as _RelayEngineType


#: The splice engine class, or None where it cannot run (not Linux, no extensions).
RelayEngine: type[_RelayEngineType] | None = None

if not NO_EXTENSIONS and sys.platform.startswith("linux"):
    try:
        from ._relay_c import RelayEngine as _LoadedEngine
    except ImportError:  # pragma: no cover - a broken build; test_relay.py flags it
        pass
    else:
        RelayEngine = _LoadedEngine

#: True when relayed sockets go through the C splice engine.
ENGINE_AVAILABLE = RelayEngine is not None

#: Which data path relayed a connection: the C engine or asyncio protocols.
RelayPath = Literal["splice", "asyncio"]
PATH_SPLICE: RelayPath = "splice"
PATH_ASYNCIO: RelayPath = "asyncio"


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What happened to one relayed connection once both legs were closed."""

    #: Bytes delivered from the client leg to the remote leg.
    bytes_client_to_remote: int
    #: Bytes delivered from the remote leg to the client leg.
    bytes_remote_to_client: int
    #: Why the relay ended.
    end: RelayEnd
    #: "splice" (C engine) or "asyncio" (protocol fallback).
    path: RelayPath
    #: Why, in words, when the data plane knows more than ``end`` says (e.g. "pipe2: Too
    #: many open files (EMFILE)" for an ERROR end); "" otherwise. The access log prints it.
    cause: str = ""

    @property
    def reset(self) -> bool:
        """The legs were closed with a reset (SO_LINGER 0) rather than FIN.

        Both data paths follow one rule (see :class:`RelayEnd`): every end but ``EOF`` is
        a cut or a failure passed on, and is closed with a reset.
        """
        return self.end is not RelayEnd.EOF


@dataclass(frozen=True, slots=True)
class PipeStats:
    """The splice engine's pipes (hardening issue 12 defect 3, relay issue 16 defect 4)."""

    #: Pipes that exist now, in use or pooled.
    pipes: int
    #: Their total capacity in bytes.
    pipe_bytes: int
    #: Pipes the engine may hold at once (descriptor budget; 0 = no cap).
    max_pipes: int
    #: Bytes of pipe capacity it may hold (the user's pipe quota; 0 = no cap).
    pipe_budget: int
    #: Bytes relayed by copying through user space because no pipe was to be had.
    copied: int
    #: pipe2() failures (EMFILE, ENFILE, ENOMEM) since the engine started.
    pipe_errors: int


__all__ = [
    "ENGINE_AVAILABLE",
    "NO_EXTENSIONS",
    "PATH_ASYNCIO",
    "PATH_SPLICE",
    "PipeStats",
    "RelayEnd",
    "RelayEngine",
    "RelayPath",
    "RelayResult",
]
