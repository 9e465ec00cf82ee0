"""``socks6fast bench ceiling``: one stream through socks6fast beside the floor of any user-space relay.

Is the gap between one proxied stream and direct loopback the engine's, or what any
user-space relay pays on this machine? This interleaves, round by round (the order
rotates each round),

* ``direct``: the source straight into the sink (no relay);
* ``splice-floor``: ``loadgen splicerelay``, the least a relay can do (no SOCKS,
  one direction, blocking ``splice(2)`` through a 1 MiB pipe, no epoll);
* ``socks6fast-s6``: one ``socks6fast serve``, SOCKS 6 no-auth CONNECT, relayed by
  the splice engine (non-blocking, edge-triggered epoll, both directions watched).

Per round it prints the throughput at the sink, the relay's CPU seconds per GiB and
the whole machine's (``/proc/stat``), and the relay's voluntary and involuntary
context switches per GiB (every thread, ``/proc/<pid>/task/*/status``: a relay that
shares a core with the source or the sink sleeps more often and moves smaller
batches); then the medians and the ratios. The source and the sink are the compiled
load generator of ``socks6fast bench`` (``sendfile`` source, ``splice`` sink).
Loopback only; every round and every child process is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._measure import build_loadgen
from ._procs import BenchError, free_port, machine_cpu_seconds, terminate_on_signals, wait_port
from ._systems import relay_path_in_log, socks6fast_command

GIB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("direct", "splice-floor", "socks6fast-s6")


def _threads(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").glob("*"))


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid``."""
    vol = invol = 0
    for task in _threads(pid):
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread ended between listing and reading
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid``."""
    ticks = 0
    for task in _threads(pid):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


@contextlib.contextmanager
def socks6fast_serve(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run one ``socks6fast serve`` on a free 127.0.0.1 port until the block ends.

    The same socks6fast as ``socks6fast bench`` runs (the package this interpreter
    imports); its relay path is printed once it listens. Yields (process, port).
    """
    port = free_port()
    argv, env = socks6fast_command(port, user=False)
    log = workdir / "socks6fast.log"
    with log.open("wb") as stderr:
        proxy = subprocess.Popen(argv, env=env, stderr=stderr, start_new_session=True)
    try:
        wait_port(port, proxy, timeout=10.0)
        print(f"socks6fast relay path: {relay_path_in_log(log)}", flush=True)
        yield proxy, port
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        try:
            proxy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait(timeout=5)


def _read_field(proc: subprocess.Popen[str], prefix: str, deadline: float) -> list[str]:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        fields = line.split()
        if fields and fields[0] == prefix:
            return fields[1:]
    raise BenchError(f"loadgen printed no {prefix!r} line")


@dataclass
class Samples:
    gbit: list[float] = field(default_factory=list)
    relay_cpu: list[float] = field(default_factory=list)
    machine_cpu: list[float] = field(default_factory=list)
    vol: list[float] = field(default_factory=list)
    invol: list[float] = field(default_factory=list)


def one_round(
    loadgen: Path, system: str, proxy_pid: int, proxy_port: int, seconds: float
) -> tuple[float, float, float, float, float]:
    """One single-stream window.

    Returns (Gbit/s, relay CPU s/GiB, machine CPU s/GiB, relay voluntary and
    involuntary switches/GiB).
    """
    warmup = 1.0
    budget = warmup + seconds + 20.0
    deadline = time.monotonic() + budget
    children: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
    try:
        sink = subprocess.Popen(
            [str(loadgen), "sink", "--port", "0", "--conns", "1", "--warmup", str(warmup)]
            + ["--seconds", str(seconds), "--max-seconds", str(budget)],
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(sink)
        sink_port = _read_field(sink, "port", deadline)[0]
        relay_pid = 0
        if system == "direct":
            client_args = ["--proto", "none", "--target", sink_port]
        elif system == "splice-floor":
            relay = subprocess.Popen(
                [str(loadgen), "splicerelay", "--port", "0", "--target", sink_port]
                + ["--max-seconds", str(budget)],
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(relay)
            relay_pid = relay.pid
            client_args = ["--proto", "none", "--target", _read_field(relay, "port", deadline)[0]]
        else:
            relay_pid = proxy_pid
            client_args = ["--proxy", str(proxy_port), "--proto", "6", "--target", sink_port]
        children.append(
            subprocess.Popen(
                [str(loadgen), "bulk", *client_args, "--streams", "1", "--max-seconds", str(budget)],
                stdout=subprocess.DEVNULL,
            )
        )
        # The sink's "start" line is block-buffered into the pipe, so the window is taken
        # by the clock: the warm-up, then up to the "done" line.
        time.sleep(warmup + 0.05)
        m0, t0 = machine_cpu_seconds(), time.monotonic()
        c0 = cpu_seconds(relay_pid) if relay_pid else 0.0
        v0 = context_switches(relay_pid) if relay_pid else (0, 0)
        done = _read_field(sink, "done", deadline)
        m1, t1 = machine_cpu_seconds(), time.monotonic()
        c1 = cpu_seconds(relay_pid) if relay_pid else 0.0
        v1 = context_switches(relay_pid) if relay_pid else (0, 0)
    finally:
        for p in reversed(children):
            p.kill()
            p.wait()
    nbytes, ns = int(done[0]), int(done[1])
    if nbytes <= 0:
        raise BenchError(f"{system}: no bytes reached the sink")
    gib = nbytes / ns * 1e9 * (t1 - t0) / GIB
    return (
        nbytes * 8 / ns,
        (c1 - c0) / gib,
        (m1 - m0) / gib,
        (v1[0] - v0[0]) / gib,
        (v1[1] - v0[1]) / gib,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="socks6fast bench ceiling",
        description="One stream through socks6fast beside direct loopback and the simplest possible "
        "splice relay (loopback only).",
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds over the three systems (default 9)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each window (default 3)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100 or not 0.5 <= args.seconds <= 60:
        parser.error("--rounds takes 1-100 and --seconds 0.5-60")
    return args


def _measure(args: argparse.Namespace, workdir: Path) -> dict[str, Samples]:
    results = {name: Samples() for name in SYSTEMS}
    loadgen = build_loadgen(workdir)
    with socks6fast_serve(workdir) as (proxy, port):
        for i in range(args.rounds):
            # Rotate the order each round so no system always follows the same one.
            order = SYSTEMS[i % 3 :] + SYSTEMS[: i % 3]
            for name in order:
                gbit, relay_cpu, machine_cpu, vol, invol = one_round(
                    loadgen, name, proxy.pid, port, args.seconds
                )
                s = results[name]
                s.gbit.append(gbit)
                s.relay_cpu.append(relay_cpu)
                s.machine_cpu.append(machine_cpu)
                s.vol.append(vol)
                s.invol.append(invol)
                relay = (
                    f"relay {relay_cpu:.3f} CPU s/GiB, switches/GiB {vol:5.0f} voluntary "
                    f"{invol:5.0f} involuntary"
                    if name != "direct"
                    else ""
                )
                print(
                    f"round {i + 1}/{args.rounds} {name:14s} {gbit:6.1f} Gbit/s  "
                    f"machine {machine_cpu:.3f} CPU s/GiB  {relay}",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``socks6fast bench ceiling``; return the exit status."""
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="socks6fast-ceiling-") as tmp, terminate_on_signals():
            results = _measure(args, Path(tmp))
    except KeyboardInterrupt:
        print("[ceiling] interrupted: every process it started is stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"[ceiling] failed: {exc}", file=sys.stderr)
        return 1
    keys = ("gbit", "relay_cpu", "machine_cpu", "vol", "invol")
    med = {name: {k: statistics.median(getattr(s, k)) for k in keys} for name, s in results.items()}
    print()
    print(
        "| system | Gbit/s (median) | x direct | relay CPU s/GiB | machine CPU s/GiB "
        "| voluntary switches/GiB | involuntary switches/GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in SYSTEMS:
        m = med[name]
        relay = name != "direct"
        cpu = f"{m['relay_cpu']:.3f}" if relay else "-"
        vol = f"{m['vol']:.0f}" if relay else "-"
        invol = f"{m['invol']:.0f}" if relay else "-"
        ratio = m["gbit"] / med["direct"]["gbit"]
        print(
            f"| {name} | {m['gbit']:.1f} | {ratio:.3f} | {cpu} | {m['machine_cpu']:.3f} | {vol} | {invol} |"
        )
    print()
    print(f"socks6fast-s6 / splice-floor: {med['socks6fast-s6']['gbit'] / med['splice-floor']['gbit']:.3f} x")
    return 0
