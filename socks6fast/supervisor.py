"""``serve --workers N``: a supervisor process and N worker processes (issue 13 item 1, D34).

The ``serve`` process becomes the supervisor. Before any event loop or thread exists it binds
every listener as an SO_REUSEPORT group of N sockets (and each SOCKS 6 UDP port as a group of
N x UDP-threads sockets), in worker order, attaches the steering programs
(`socks6fast.net.reuseport`), and forks the workers; worker i keeps socket i of each group
and closes the rest. The supervisor keeps its copies for its whole life, so a group's order
never changes and a dead worker's socket stays in the group: its clients wait in the listen
backlog (or its datagrams in the receive buffer) until the replacement accepts them.

Signals (the supervisor blocks them and takes them with ``sigtimedwait``, so nothing runs in
a signal handler):

* SIGCHLD: a worker that died is logged and started again after a back-off
  (`RESTART_DELAY` doubling per quick death up to `RESTART_DELAY_MAX`; a worker that ran for
  `RESTART_STABLE` seconds resets it), so a crash loop does not spin.
* SIGHUP: the configuration is loaded once here first; a broken file is one log line and
  nothing reloads; else every worker gets SIGHUP and reloads it (each reads the file again;
  listener addresses, [udp] and [admin] need a restart, as with one process). A worker
  started later gets the reloaded configuration.
* SIGTERM, SIGINT: the supervisor closes its listener copies, sends SIGTERM to every worker
  (each stops accepting and drains for at most --drain-timeout), waits for all of them
  (SIGKILL after `KILL_GRACE` more seconds) and exits 0.

Per worker: ``max_connections`` is the server's divided by N (rounded up); the relay
engine threads (``relay_workers``) and UDP engine threads (``[udp] workers``), when 0 (one
per core), become cores / N (at least 1), so N workers together run about one thread per
core of each kind, not N per core. The admin listener
(``[admin] listen``, port P) is served by every worker on port P + i (port 0: each its own),
each with its own metrics: Prometheus scrapes them all and ``sum()`` aggregates.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config
from .dataplane.udp import open_udp_port
from .dataplane.udp_types import default_workers
from .net.reuseport import (
    WorkerSockets,
    association_program,
    attach,
    source_program,
    steering_available,
)
from .net.stackopts import enable_tfo_listener

__all__ = ["KILL_GRACE", "RESTART_DELAY", "Supervisor", "per_worker_config", "resolve_workers"]

log = logging.getLogger("socks6fast.supervisor")

#: First restart delay of a worker that died (seconds); doubles per quick death.
RESTART_DELAY = 0.25
#: Longest restart delay.
RESTART_DELAY_MAX = 30.0
#: A worker that ran this long before dying is restarted after `RESTART_DELAY` again.
RESTART_STABLE = 30.0
#: Seconds past --drain-timeout before a worker that has not exited gets SIGKILL.
KILL_GRACE = 10.0
#: Listen backlog of each worker's socket (as lifecycle.LISTEN_BACKLOG).
LISTEN_BACKLOG = 1024
#: Port-0 listeners tried until the same UDP port number is free too (D16).
UDP_PAIR_ATTEMPTS = 16

_SIGNALS = {signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
#: linux/prctl.h
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM (and drains) when the supervisor dies, even by SIGKILL: no
    worker is left serving alone, holding the ports."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def resolve_workers(configured: int) -> int:
    """``workers`` in effect: 0 = one per usable CPU core."""
    return configured if configured > 0 else _cores()


def per_worker_config(config: Config, workers: int, index: int) -> Config:
    """``config`` as worker ``index`` of ``workers`` runs it: thread counts shared out, the
    admin port offset by ``index``, and ``workers`` itself recorded."""
    share = max(1, _cores() // workers)
    server = dataclasses.replace(
        config.server,
        workers=workers,
        relay_workers=config.server.relay_workers or share,
        # max_connections stays the whole server's: each worker takes its part.
        max_connections=-(-config.server.max_connections // workers),
    )
    # The UDP engine's own default is half the cores (D33): shared out the same way.
    udp_share = max(1, default_workers() // workers)
    udp = dataclasses.replace(config.udp, workers=config.udp.workers or udp_share)
    admin = config.admin
    if admin.listen is not None:
        host, port = admin.listen
        admin = dataclasses.replace(admin, listen=(host, port + index if port else 0))
    return dataclasses.replace(config, server=server, udp=udp, admin=admin)


def _probe_free(host: str, port: int) -> None:
    """EADDRINUSE when UDP (host, port) is bound already, by anyone: a bind without
    SO_REUSEPORT fails where joining the group would silently share another's port."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port))


def _probe_free_tcp(family: int, sockaddr: Any) -> None:
    """EADDRINUSE when a TCP listener holds ``sockaddr`` already: a socket with SO_REUSEPORT
    would otherwise join another process's group of the same user and share its clients."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(sockaddr)


@dataclass(slots=True)
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None


class Supervisor:
    """Binds the groups, runs the workers, restarts them, fans signals out (module docstring).

    Args:
        config: the checked configuration (``server.workers`` > 1 after `resolve_workers`).
        workers: N.
        run_worker: runs one worker in the forked child: ``run_worker(config, sockets,
            ready)`` returns its exit status; it calls ``ready()`` once it accepts.
        reload: loads the configuration again for SIGHUP; raises ``ValueError`` with the
            one-sentence reason when it is broken.
        drain_timeout: the workers' --drain-timeout (for the SIGKILL deadline).
    """

    def __init__(
        self,
        config: Config,
        workers: int,
        run_worker: Callable[[Config, WorkerSockets, Callable[[], None]], int],
        reload: Callable[[], Config],
        drain_timeout: float,
    ) -> None:
        self._config = config
        self._workers = workers
        self._run_worker = run_worker
        self._reload = reload
        self._drain_timeout = drain_timeout
        udp = per_worker_config(config, workers, 0).udp
        self._udp_threads = udp.workers if udp.enabled else 1
        self._held: list[socket.socket] = []  # every group member, kept for the server's life
        self._held_fds: list[int] = []
        self._shares: list[WorkerSockets] = [
            WorkerSockets(index, workers, self._udp_threads) for index in range(workers)
        ]
        self._slots = [_Slot(index) for index in range(workers)]
        self._stopping = False

    # -- binding ---------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every group and attach its program.

        Raises:
            OSError: a listener could not be bound (naming it); everything is closed.
        """
        problem = steering_available()
        if problem is not None:
            log.warning(
                "%s: connections are spread by the kernel's hash of the whole 4-tuple, so a "
                "client's next connection may reach another worker, where its session and "
                "tokens are unknown (use workers = 1 for sessions, or a shared session store)",
                problem,
            )
        self._steer = problem is None
        try:
            server, udp = self._config.server, self._config.udp
            for host, port in server.listen:
                self._bind_entry(False, host, port, udp_port=udp.port if udp.enabled else -1)
            for host, port in server.tls_listen:
                self._bind_entry(True, host, port, udp_port=-1)
        except BaseException:
            self.close_held()
            for share in self._shares:
                share.tcp.clear()
                share.udp.clear()
            raise

    def _bind_entry(self, tls: bool, host: str, port: int, udp_port: int | None) -> None:
        """One ``listen`` entry: a TCP group per address it resolves to, and the SOCKS 6
        UDP port group on each (``udp_port``: None = the TCP port number, -1 = none)."""
        attempts = UDP_PAIR_ATTEMPTS if port == 0 and udp_port is None else 1
        for attempt in range(attempts):
            groups = self._bind_tcp(host, port)
            try:
                if udp_port != -1:
                    for group in groups:
                        bound = group[0].getsockname()
                        self._bind_udp(str(bound[0]), udp_port if udp_port is not None else int(bound[1]))
            except OSError as exc:
                for group in groups:
                    for sock in group:
                        sock.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            for share in self._shares:
                share.add_tcp(tls, host, port, [group[share.index] for group in groups])
            for group in groups:
                self._held.extend(group)
            return

    def _bind_tcp(self, host: str, port: int) -> list[list[socket.socket]]:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        groups: list[list[socket.socket]] = []
        seen: set[object] = set()
        try:
            for family, type_, proto, _, sockaddr in infos:
                if sockaddr in seen:
                    continue
                seen.add(sockaddr)
                if port != 0:
                    _probe_free_tcp(family, sockaddr)
                group: list[socket.socket] = []
                groups.append(group)
                address = sockaddr
                for _ in range(self._workers):
                    sock = socket.socket(family, type_, proto)
                    group.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    enable_tfo_listener(sock)  # TRN-01
                    # The group's order is the order of listen() (TCP joins it there).
                    sock.listen(LISTEN_BACKLOG)
                    address = sock.getsockname()  # port 0: the others join the same port
                if self._steer:
                    attach(group[0], source_program(family, self._workers))
                if port == 0:
                    break  # as lifecycle: one port-0 listener per entry
        except OSError as exc:
            for group in groups:
                for sock in group:
                    sock.close()
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, f"{where}: {exc.strerror or exc}") from exc
        return groups

    def _bind_udp(self, host: str, port: int) -> None:
        if any((host, port) in share.udp for share in self._shares[:1]):
            return  # [udp] port shared by several listeners on one address
        threads = self._udp_threads
        try:
            _probe_free(host, port)
            fds = open_udp_port(host, port, self._workers * threads)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            hint = " (the SOCKS 6 UDP port: set [udp] port, or enabled = false)"
            raise OSError(exc.errno, f"UDP {where}: {exc.strerror or exc}{hint}") from exc
        try:
            first = socket.socket(fileno=fds[0])
            try:
                bound_port = int(first.getsockname()[1])
                # D34: the Association ID's last byte picks worker and engine thread (NAT-proof).
                attach(first, association_program(self._workers * threads))
            finally:
                first.detach()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._held_fds.extend(fds)
        for share in self._shares:
            share.udp[(host, bound_port)] = fds[share.index * threads : (share.index + 1) * threads]

    def close_held(self) -> None:
        """Close the supervisor's copies of every group member."""
        for sock in self._held:
            sock.close()
        for fd in self._held_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
        self._held_fds.clear()

    # -- running ---------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; returns the exit status
        (0 after a drain; 2 when a worker failed to start the first time)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        # SIGCHLD's default action discards it; a blocked one is kept for sigtimedwait either
        # way, but a handler makes that explicit (and it never runs: the signal stays blocked).
        old_chld = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        try:
            for slot in self._slots:
                if not self._spawn(slot, old_mask, wait_ready=True):
                    self._stop_all()
                    return 2
            log.info(
                "%d workers (pids %s); connections from one client address go to one worker: %s",
                self._workers,
                ", ".join(str(slot.pid) for slot in self._slots),
                "yes (SO_ATTACH_REUSEPORT_CBPF)" if self._steer else "no (kernel hash)",
            )
            while not self._stopping:
                self._reap(old_mask)
                info = signal.sigtimedwait(_SIGNALS, self._timeout())
                if info is None:
                    continue
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: draining the workers", signal.Signals(info.si_signo).name)
                    self._stop_all()
                elif info.si_signo == signal.SIGHUP:
                    self._fan_out_reload()
            log.info("stopped")
            return 0
        finally:
            signal.signal(signal.SIGCHLD, old_chld)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _timeout(self) -> float:
        pending = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        if not pending:
            return 1.0  # reap now and then even if a SIGCHLD was merged with another
        return max(0.0, min(1.0, min(pending) - time.monotonic()))

    def _spawn(self, slot: _Slot, old_mask: set[int], *, wait_ready: bool) -> bool:
        """Fork worker ``slot``; with ``wait_ready``, True once it accepts (False: it failed)."""
        config = per_worker_config(self._config, self._workers, slot.index)
        share = self._shares[slot.index]
        read_fd, write_fd = os.pipe() if wait_ready else (-1, -1)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                if read_fd >= 0:
                    os.close(read_fd)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent(parent)  # SIGTERM stays blocked until the mask is restored
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                status = self._child(config, share, write_fd)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None
        if not wait_ready:
            return True
        os.close(write_fd)
        try:
            answer = os.read(read_fd, 1)  # b"" when the worker ended before it was ready
        finally:
            os.close(read_fd)
        if answer == b"1":
            return True
        _, status = os.waitpid(pid, 0)  # it printed why; reaped here, not signalled later
        slot.pid = 0
        log.error(
            "worker %d (pid %d) did not start (exit status %d)",
            slot.index,
            pid,
            os.waitstatus_to_exitcode(status),
        )
        return False

    def _child(self, config: Config, share: WorkerSockets, ready_fd: int) -> int:
        # Keep this worker's members only: a copy of another's socket here would keep it
        # open (and in its group) after that worker and the supervisor closed theirs.
        mine = {id(sock) for entries in share.tcp.values() for socks in entries for sock in socks}
        mine_fds = {fd for fds in share.udp.values() for fd in fds}
        for sock in self._held:
            if id(sock) not in mine:
                sock.close()
        for fd in self._held_fds:
            if fd not in mine_fds:
                os.close(fd)
        # A restarted worker must get its sockets again: give it copies of the lists.
        share = WorkerSockets(
            share.index,
            share.count,
            share.udp_threads,
            {key: [list(socks) for socks in entries] for key, entries in share.tcp.items()},
            {key: list(fds) for key, fds in share.udp.items()},
        )

        def ready() -> None:
            nonlocal ready_fd
            if ready_fd >= 0:
                os.write(ready_fd, b"1")
                os.close(ready_fd)
                ready_fd = -1

        try:
            return self._run_worker(config, share, ready)
        finally:
            if ready_fd >= 0:
                os.close(ready_fd)

    def _reap(self, old_mask: set[int]) -> None:
        """Collect dead workers, schedule their restarts, start those that are due."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for slot in self._slots:
                if slot.pid == pid:
                    self._died(slot, status)
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                self._spawn(slot, old_mask, wait_ready=False)
                log.info("worker %d started again (pid %d)", slot.index, slot.pid)

    def _died(self, slot: _Slot, status: int) -> None:
        pid, slot.pid = slot.pid, 0
        how = (
            f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exited with status {os.waitstatus_to_exitcode(status)}"
        )
        if self._stopping:
            log.info("worker %d (pid %d) %s", slot.index, pid, how)
            return
        now = time.monotonic()
        slot.quick_deaths = 0 if now - slot.started >= RESTART_STABLE else slot.quick_deaths + 1
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** max(0, slot.quick_deaths - 1))
        slot.restart_at = now + delay
        log.error("worker %d (pid %d) %s; starting it again in %.2fs", slot.index, pid, how, delay)

    def _fan_out_reload(self) -> None:
        try:
            config = self._reload()
        except ValueError as exc:
            log.error("SIGHUP: configuration not reloaded (no worker was told): %s", exc)
            return
        # Listener addresses, [udp] and [admin] need a restart (as with one process): a
        # worker started later still gets the sockets bound at start-up.
        server = dataclasses.replace(
            config.server,
            listen=self._config.server.listen,
            tls_listen=self._config.server.tls_listen,
            listen_proxy_protocol=self._config.server.listen_proxy_protocol,
            tls_listen_proxy_protocol=self._config.server.tls_listen_proxy_protocol,
            relay_workers=self._config.server.relay_workers,
        )
        self._config = dataclasses.replace(
            config, server=server, udp=self._config.udp, admin=self._config.admin
        )
        live = [slot for slot in self._slots if slot.pid]
        for slot in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGHUP)
        log.info("SIGHUP: configuration checked, sent to %d workers", len(live))

    def _stop_all(self) -> None:
        """Close the listeners' supervisor copies, SIGTERM every worker, wait for them all."""
        self._stopping = True
        self.close_held()  # new clients are refused once the workers close theirs too
        for slot in self._slots:
            slot.restart_at = None
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._drain_timeout + KILL_GRACE
        killed = False
        while any(slot.pid for slot in self._slots):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                for slot in self._slots:
                    if slot.pid == pid:
                        self._died(slot, status)
                continue
            if time.monotonic() > deadline and not killed:
                for slot in self._slots:
                    if slot.pid:
                        log.error("worker %d (pid %d) did not drain: SIGKILL", slot.index, slot.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(slot.pid, signal.SIGKILL)
                killed = True
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
