"""What the kernel lets this process hold: descriptors and pipe buffers (hardening issue 12
defect 3, relay issue 16 defect 4).

Strategy: plan for the limits at start-up instead of meeting them under load.

* Descriptors. `raise_nofile_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit
  (the soft one is often 1024 while the hard one is far higher). `plan_descriptors`
  then sizes ``max_connections`` against it: a relayed connection needs its two sockets,
  and on the splice path a pipe (two descriptors) while its bytes wait for a slower
  destination; one pipe per connection is budgeted (a connection whose destinations are
  both slow holds two, and copies through user space when none is left, see
  ``_relay_c.pyx``). A reserve stays out of the connections' share: what is open at
  start-up (listeners, the loop, the engine's epoll sets and eventfds), `REFUSAL_SLOTS`
  for answering clients that arrive when the proxy is full, and `DESCRIPTOR_MARGIN` for
  what the proxy opens now and then (resolver and BIND sockets, a reloaded config file,
  the spare descriptor that lets it accept and close a client at the limit). When the
  configured ``max_connections`` does not fit, it is lowered, and `DescriptorPlan.warning`
  says why and what to raise.
* Pipe buffers. Without CAP_SYS_RESOURCE or CAP_SYS_ADMIN, every pipe of the user counts
  against ``/proc/sys/fs/pipe-user-pages-soft`` (64 MiB by default): above it the kernel
  refuses to grow pipes (F_SETPIPE_SZ fails with EPERM) and gives new ones 8 KiB. `pipe_quota`
  reads the quota so that the relay engine keeps its pipes within `PIPE_QUOTA_SHARE` of it
  (the rest is left to the user's other processes), and caps the requested pipe size at
  ``/proc/sys/fs/pipe-max-size``, above which an unprivileged process may not grow a pipe.

Linux paths are read where they exist; elsewhere the functions answer "no limit known".
Pure: no sockets, no event loop.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

__all__ = [
    "DESCRIPTOR_MARGIN",
    "PIPE_QUOTA_SHARE",
    "REFUSAL_SLOTS",
    "DescriptorPlan",
    "PipeQuota",
    "open_descriptors",
    "pipe_quota",
    "plan_descriptors",
    "raise_nofile_limit",
]

#: Clients refused with a reply at once while the proxy is full (each holds a descriptor
#: for at most about two seconds); more are closed without a reply.
REFUSAL_SLOTS = 64
#: Descriptors kept for what the proxy opens now and then, outside the connections' share.
DESCRIPTOR_MARGIN = 64
#: Sockets of one relayed connection (client leg, remote leg).
SOCKETS_PER_CONNECTION = 2
#: Pipe descriptors budgeted per connection on the splice path (one pipe).
PIPE_FDS_PER_CONNECTION = 2
#: Share of the user's pipe quota the relay engine keeps its pipes within.
PIPE_QUOTA_SHARE = 0.75

_CAP_SYS_ADMIN = 21
_CAP_SYS_RESOURCE = 24
_PROC_FS = "/proc/sys/fs"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (or to fs.nr_open when the hard limit
    is unlimited). Returns the (soft, hard) limits in effect afterwards; a refusal leaves
    them as they were."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _read_int(f"{_PROC_FS}/nr_open") or 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_descriptors() -> int:
    """Descriptors this process has open now (0 where /proc/self/fd is not available)."""
    try:
        # The listing holds one descriptor of its own while it runs.
        return max(0, len(os.listdir("/proc/self/fd")) - 1)
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    """How the descriptor limit is shared out (see the module docstring)."""

    limit: int
    """The soft RLIMIT_NOFILE in effect."""
    hard: int
    """The hard limit (what an administrator must raise for more)."""
    reserved: int
    """Descriptors kept outside the connections' share."""
    per_connection: int
    """Descriptors budgeted per connection: 2 sockets, plus 2 for a pipe on the splice path."""
    requested: int
    """``max_connections`` as configured."""
    max_connections: int
    """``max_connections`` in effect: the configured value, or less when it does not fit."""
    max_pipes: int
    """Pipes the splice engine may hold at once (0 on the asyncio path)."""

    @property
    def lowered(self) -> bool:
        """True when the configured ``max_connections`` did not fit."""
        return self.max_connections < self.requested

    def warning(self) -> str:
        """One sentence for the log when `lowered`: the numbers, and what to raise."""
        pipes = ", 2 for a splice pipe" if self.per_connection > SOCKETS_PER_CONNECTION else ""
        return (
            f"max_connections lowered from {self.requested} to {self.max_connections}: the descriptor "
            f"limit is {self.limit} (hard limit {self.hard}); each relayed connection needs "
            f"{self.per_connection} (2 sockets{pipes}) and {self.reserved} are kept for listeners, "
            f"relay workers and refusals; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) "
            f"to at least {self.requested * self.per_connection + self.reserved} for {self.requested}"
        )


def plan_descriptors(
    requested: int, limit: int, hard: int, *, in_use: int, splice: bool, dtls_channels: int = 0
) -> DescriptorPlan:
    """Share out ``limit`` descriptors (see the module docstring).

    Args:
        requested: the configured ``max_connections``.
        limit: the soft RLIMIT_NOFILE in effect (after `raise_nofile_limit`).
        hard: the hard limit.
        in_use: descriptors open at start-up (listeners, loop, relay engine included).
        splice: True when the splice engine relays (pipes are budgeted).
        dtls_channels: DTLS connections that may hold a socket each before an association is
            mapped to them (probe 19 F4: ``DTLSPorts.unmapped_total``); kept in the reserve.

    Returns:
        The plan; ``max_connections`` is at least 1.
    """
    if limit == resource.RLIM_INFINITY:
        limit = 1 << 30
    reserved = in_use + REFUSAL_SLOTS + DESCRIPTOR_MARGIN + dtls_channels
    per_connection = SOCKETS_PER_CONNECTION + (PIPE_FDS_PER_CONNECTION if splice else 0)
    fits = max(1, (limit - reserved) // per_connection)
    max_connections = min(requested, fits)
    max_pipes = 0
    if splice:
        # Whatever the connections' sockets leave, at least one pipe per connection.
        max_pipes = max(max_connections, (limit - reserved - SOCKETS_PER_CONNECTION * max_connections) // 2)
    return DescriptorPlan(
        limit=limit,
        hard=hard,
        reserved=reserved,
        per_connection=per_connection,
        requested=requested,
        max_connections=max_connections,
        max_pipes=max_pipes,
    )


@dataclass(frozen=True, slots=True)
class PipeQuota:
    """The pipe buffers this process may use without the kernel shrinking its pipes."""

    budget: int
    """Bytes of pipe capacity the relay engine may hold; 0 = no limit (privileged, or no
    quota configured)."""
    max_size: int
    """The largest pipe this process may ask for (pipe-max-size); 0 = no limit."""
    quota: int
    """The user's whole soft quota in bytes (0 = none); `budget` is `PIPE_QUOTA_SHARE` of it."""


def _privileged() -> bool:
    """CAP_SYS_RESOURCE or CAP_SYS_ADMIN in the effective set: the kernel exempts the
    process from the pipe quota and pipe-max-size (fs/pipe.c, pipe_is_unprivileged_user)."""
    try:
        with open("/proc/self/status", encoding="ascii") as file:
            for line in file:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << _CAP_SYS_RESOURCE | 1 << _CAP_SYS_ADMIN))
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def pipe_quota() -> PipeQuota:
    """Read the user's pipe quota (see the module docstring)."""
    if _privileged():
        return PipeQuota(budget=0, max_size=0, quota=0)
    soft = _read_int(f"{_PROC_FS}/pipe-user-pages-soft") or 0
    hard = _read_int(f"{_PROC_FS}/pipe-user-pages-hard") or 0
    pages = min((p for p in (soft, hard) if p > 0), default=0)
    quota = pages * os.sysconf("SC_PAGESIZE")
    max_size = _read_int(f"{_PROC_FS}/pipe-max-size") or 0
    return PipeQuota(budget=int(quota * PIPE_QUOTA_SHARE), max_size=max_size, quota=quota)
