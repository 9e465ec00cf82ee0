"""Child processes of the benchmark and what /proc says about them.

Strategy: every process the suite starts goes through one ``Processes``
registry, in its own session (so a process and the children it forks form one
process group whose id is the pid we started), and ``stop_all`` ends each group
by that id: SIGTERM, a bounded wait, then SIGKILL. ``bench.main`` calls it in a
``finally`` block, on SIGTERM/SIGHUP (turned into an exception) and on Ctrl-C.

CPU figures come from ``/proc/<pid>/stat``: utime + stime cover every thread of
a process; cutime + cstime add children it has already reaped; live children
(Dante forks one process per 32 sessions) are found by walking the parent links
of every ``/proc/<pid>/stat``. Memory comes from ``/proc/<pid>/status`` (VmRSS)
and ``/proc/<pid>/smaps_rollup`` (Pss, which splits shared pages fairly across a
forked process tree).
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A measurement could not be taken (a process died, a deadline passed)."""


def raise_nofile_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def free_port() -> int:
    """An ephemeral loopback TCP port that is free right now (for servers that need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; raise BenchError if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Child:
    """One started process: its Popen, a name for messages, and where its stderr goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None
    _buf: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_line(self, timeout: float) -> str:
        """Next stdout line (stripped); BenchError on EOF or when ``timeout`` passes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise BenchError(f"{self.name}: no output within {timeout:.1f} s{self.log_tail()}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise BenchError(f"{self.name}: exited ({self.proc.returncode}){self.log_tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def expect(self, prefix: str, timeout: float) -> list[str]:
        """Read lines until one starts with ``prefix``; return its fields after the prefix."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            fields = line.split()
            if fields and fields[0] == prefix:
                return fields[1:]
            if fields and fields[0] in ("timeout", "failed"):
                raise BenchError(f"{self.name}: {line}{self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        if self.log is None or not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return (": " + " | ".join(tail)) if tail else ""


@dataclass
class Processes:
    """Registry of every process the suite starts; ``stop_all`` ends them all by process group id."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: bool = True,
        stdin: bool = False,
        env: dict[str, str] | None = None,
        log: bool = True,
    ) -> Child:
        """Start ``argv`` in a new session; stdout is a pipe when ``stdout``, stderr goes to a log."""
        log_path = self.log_dir / f"{name}.{len(self.children)}.log" if log else None
        err = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            if log_path:
                err.close()  # type: ignore[union-attr]
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 3.0) -> None:
        """End ``child`` and the process group it leads: SIGTERM, wait, SIGKILL."""
        proc = child.proc
        pgid = proc.pid  # start_new_session: the group id is the pid we started
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            if proc.poll() is None or _group_alive(pgid):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:  # pragma: no cover - a reused id; kill our own child only
                    proc.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
                time.sleep(0.02)
            if proc.poll() is not None and not _group_alive(pgid):
                break
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        if proc.poll() is None:  # pragma: no cover
            proc.wait(timeout=1)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every process still registered, newest first."""
        for child in reversed(list(self.children)):
            try:
                self.stop(child)
            except Exception:  # pragma: no cover - keep stopping the others
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie leader still counts as a member until reaped; ignore groups of zombies only.
    return any(_state(pid) not in ("Z", "X", "") for pid in _group_members(pgid))


def _group_members(pgid: int) -> Iterator[int]:
    for pid, fields in _all_stats().items():
        if int(fields[2]) == pgid:
            yield pid


def _state(pid: int) -> str:
    stat = _read_stat(pid)
    return stat[0] if stat else ""


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _all_stats() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                out[int(entry)] = stat
    return out


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their live descendants."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    seen: list[int] = []
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads, reaped children included) of the trees at ``roots``."""
    ticks = 0
    for pid in process_tree(roots):
        fields = _read_stat(pid)
        if fields is None:
            continue
        # stat fields 14-17 (utime, stime, cutime, cstime) sit at 11-14 after the name.
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_cpu_snapshot(roots: Sequence[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """CPU ticks of each process of the trees at ``roots``: (its own user + system, that of the
    children it has waited for), keyed by (pid, start time) so that a reused pid is a new process."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for pid in process_tree(roots):
        fields = _read_stat(pid)
        if fields is not None:
            # stat fields 14-17 (utime, stime, cutime, cstime) and 22 (starttime) sit at 11-14
            # and 19 after the name.
            own, waited = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
            out[(pid, int(fields[19]))] = (own, waited)
    return out


def cpu_seconds_between(
    before: dict[tuple[int, int], tuple[int, int]], after: dict[tuple[int, int], tuple[int, int]]
) -> float:
    """CPU seconds a process tree spent between two ``tree_cpu_snapshot``s, never negative.

    A process that ended in between is charged through its parent's waited-for children time,
    which grows by the whole of its life: so the time it had at ``before`` comes off that growth.
    But a child nobody waits for (auto-reaped: Dante's I/O processes end with their sessions)
    adds nothing there, and a plain difference of sums would go negative; here that child adds
    nothing (its last moments are lost, a small undercount), processes that appeared add all
    their time and the others their growth.
    """
    own = waited = gone = 0
    for key, (o1, w1) in after.items():
        o0, w0 = before.get(key, (0, 0))
        own += o1 - o0
        waited += w1 - w0
    for key, (o0, w0) in before.items():
        if key not in after:
            gone += o0 + w0
    return (own + max(0, waited - gone)) / CLK_TCK


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine, all cores (from the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # already inside user/nice, so only the first eight columns are summed.
    busy = sum(parts[:8]) - parts[3] - parts[4]
    return busy / CLK_TCK


def tree_memory_kib(roots: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over the trees at ``roots``."""
    rss = pss = 0
    for pid in process_tree(roots):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def time_wait_count() -> int:
    """Sockets in TIME_WAIT on the machine (IPv4 and IPv6), from /proc/net/tcp*."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                n += sum(1 for line in f if line.split()[3] == "06")
        except OSError:
            continue
    return n


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt for the block, so ``finally`` clauses run.

    SIGINT is set explicitly too: a shell starts background jobs with it ignored,
    and Python then installs no handler of its own.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller's own cleanup applies
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
