"""Single-stream throughput: socks6fast's engine beside the floor of a user-space relay.

Issue #4 asks for one stream through the proxy at 0.75 x direct loopback. This
script asks how much of the gap to direct is the engine's and how much any
user-space relay pays on this machine: it interleaves, round by round,

* ``direct``: the source straight into the sink (no relay);
* ``splice-floor``: ``loadgen splicerelay``, the least a relay can do (no SOCKS,
  one direction, blocking ``splice(2)`` through a 1 MiB pipe, no epoll);
* ``socks6fast-s6``: one ``socks6fast serve``, SOCKS 6 no-auth CONNECT, relayed by
  the splice engine (non-blocking, edge-triggered epoll, both directions watched).

Per round it prints the throughput at the sink, the relay's CPU seconds per GiB and
the whole machine's (``/proc/stat``), the relay's voluntary context switches per GiB,
then the medians and the ratios. The source and sink are the compiled load generator
of ``socks6fast bench`` (``sendfile`` source, ``splice`` sink). Loopback only; every
round and every child is bounded in time.

Usage: python -m benchmarks.relay_ceiling [--rounds 9] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._measure import build_loadgen
from benchmarks.relay_ctxswitch import _read_field, context_switches, cpu_seconds, socks6fast_serve

GIB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("direct", "splice-floor", "socks6fast-s6")


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (every state of /proc/stat's cpu line but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


@dataclass
class Samples:
    gbit: list[float] = field(default_factory=list)
    relay_cpu: list[float] = field(default_factory=list)
    machine_cpu: list[float] = field(default_factory=list)
    vol: list[float] = field(default_factory=list)


def one_round(
    loadgen: Path, system: str, proxy_pid: int, proxy_port: int, seconds: float
) -> tuple[float, ...]:
    """One single-stream window.

    Returns (Gbit/s, relay CPU s/GiB, machine CPU s/GiB, relay voluntary switches/GiB).
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
                [
                    str(loadgen),
                    "splicerelay",
                    "--port",
                    "0",
                    "--target",
                    sink_port,
                    "--max-seconds",
                    str(budget),
                ],
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
        v0 = context_switches(relay_pid)[0] if relay_pid else 0
        done = _read_field(sink, "done", deadline)
        m1, t1 = machine_cpu_seconds(), time.monotonic()
        c1 = cpu_seconds(relay_pid) if relay_pid else 0.0
        v1 = context_switches(relay_pid)[0] if relay_pid else 0
    finally:
        for p in reversed(children):
            p.kill()
            p.wait()
    nbytes, ns = int(done[0]), int(done[1])
    gib = nbytes / ns * 1e9 * (t1 - t0) / GIB
    return nbytes * 8 / ns, (c1 - c0) / gib, (m1 - m0) / gib, (v1 - v0) / gib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 0.5 <= args.seconds <= 60:
        parser.error("--rounds 1-100 and --seconds 0.5-60")
    results = {name: Samples() for name in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        with socks6fast_serve(Path(tmp)) as (proxy, port):
            for i in range(args.rounds):
                # Rotate the order each round so no system always follows the same one.
                order = SYSTEMS[i % 3 :] + SYSTEMS[: i % 3]
                for name in order:
                    gbit, relay_cpu, machine_cpu, vol = one_round(
                        loadgen, name, proxy.pid, port, args.seconds
                    )
                    s = results[name]
                    s.gbit.append(gbit)
                    s.relay_cpu.append(relay_cpu)
                    s.machine_cpu.append(machine_cpu)
                    s.vol.append(vol)
                    relay = (
                        f"relay {relay_cpu:.3f} CPU s/GiB, {vol:5.0f} voluntary switches/GiB"
                        if name != "direct"
                        else ""
                    )
                    print(
                        f"round {i + 1}/{args.rounds} {name:14s} {gbit:6.1f} Gbit/s  "
                        f"machine {machine_cpu:.3f} CPU s/GiB  {relay}",
                        flush=True,
                    )
    med = {
        name: {k: statistics.median(getattr(s, k)) for k in ("gbit", "relay_cpu", "machine_cpu", "vol")}
        for name, s in results.items()
    }
    print()
    print(
        "| system | Gbit/s (median) | x direct | relay CPU s/GiB | machine CPU s/GiB "
        "| voluntary switches/GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in SYSTEMS:
        m = med[name]
        cpu_col = "-" if name == "direct" else f"{m['relay_cpu']:.3f}"
        relay_cols = f"{cpu_col} | {m['machine_cpu']:.3f}"
        vol_col = "-" if name == "direct" else f"{m['vol']:.0f}"
        ratio = m["gbit"] / med["direct"]["gbit"]
        print(f"| {name} | {m['gbit']:.1f} | {ratio:.3f} | {relay_cols} | {vol_col} |")
    print()
    print(f"socks6fast-s6 / splice-floor: {med['socks6fast-s6']['gbit'] / med['splice-floor']['gbit']:.3f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
