"""Single-stream rounds through ``socks6fast serve``, with the proxy's context switches.

Why single-stream throughput through the proxy swings between rounds on a 2-core
machine (benchmarks/README.md, "Single-stream throughput"): for each round this prints
the throughput at the sink, the proxy's CPU seconds per GiB and its voluntary and
involuntary context switches per GiB (all threads, from ``/proc/<pid>/task/*/status``),
so that slow rounds can be told apart from fast ones by what the relay did.

The source and the sink are the compiled load generator of ``socks6fast bench``
(``loadgen.c``: ``sendfile`` source, ``splice`` sink), the proxy is one
``socks6fast serve`` on 127.0.0.1, SOCKS 6 no-auth CONNECT. Loopback only; every round
is bounded in time.

Usage: python -m benchmarks.relay_ctxswitch [--rounds 12] [--seconds 3] [--proto 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks._measure import build_loadgen
from benchmarks._procs import free_port, wait_port
from benchmarks._systems import relay_path_in_log, socks6fast_command

GIB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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

    The same socks6fast as `socks6fast bench` runs (the package this interpreter
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
        proxy.wait(timeout=15)


def _read_field(proc: subprocess.Popen[str], prefix: str, deadline: float) -> list[str]:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        fields = line.split()
        if fields and fields[0] == prefix:
            return fields[1:]
    raise RuntimeError(f"loadgen sink printed no {prefix!r} line")


def one_round(loadgen: Path, proxy_pid: int, proxy_port: int, proto: str, seconds: float) -> str:
    """One single-stream round; the proxy's counters are read over the sink's window."""
    warmup = 1.0
    budget = warmup + seconds + 20.0
    deadline = time.monotonic() + budget
    sink = subprocess.Popen(
        [str(loadgen), "sink", "--port", "0", "--conns", "1", "--warmup", str(warmup)]
        + ["--seconds", str(seconds), "--max-seconds", str(budget)],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = None
    try:
        target = _read_field(sink, "port", deadline)[0]
        client = subprocess.Popen(
            [str(loadgen), "bulk", "--proxy", str(proxy_port), "--proto", proto, "--target", target]
            + ["--streams", "1", "--max-seconds", str(budget)],
            stdout=subprocess.DEVNULL,
        )
        # The sink's "start" line is block-buffered into the pipe, so the window is taken
        # by the clock: the warm-up, then up to the "done" line.
        time.sleep(warmup + 0.05)
        ctx0, cpu0, t0 = context_switches(proxy_pid), cpu_seconds(proxy_pid), time.monotonic()
        done = _read_field(sink, "done", deadline)
        ctx1, cpu1, t1 = context_switches(proxy_pid), cpu_seconds(proxy_pid), time.monotonic()
    finally:
        for p in (client, sink):
            if p is not None:
                p.kill()
                p.wait()
    nbytes, ns = int(done[0]), int(done[1])
    gib = nbytes / ns * 1e9 * (t1 - t0) / GIB
    return (
        f"{nbytes * 8 / ns:6.1f} Gbit/s  proxy {(cpu1 - cpu0) / gib:.3f} CPU s/GiB  "
        f"voluntary {(ctx1[0] - ctx0[0]) / gib:6.0f}/GiB  involuntary {(ctx1[1] - ctx0[1]) / gib:6.0f}/GiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--proto", choices=("5", "6"), default="6")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 0.5 <= args.seconds <= 60:
        parser.error("--rounds 1-100 and --seconds 0.5-60")
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        with socks6fast_serve(Path(tmp)) as (proxy, port):
            for i in range(args.rounds):
                result = one_round(loadgen, proxy.pid, port, args.proto, args.seconds)
                print(f"round {i + 1}/{args.rounds}: {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
