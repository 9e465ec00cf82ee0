"""One measurement of one system: bulk throughput, connection rate and latency, idle memory.

Each function starts the compiled load generator (loadgen.c) for one run,
samples the proxy's process tree and the whole machine from /proc around the
window the load generator reports, and returns a flat dict of figures.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from ._procs import (
    BenchError,
    Child,
    Processes,
    machine_cpu_seconds,
    tree_cpu_seconds,
    tree_memory_kib,
)
from ._systems import PEERS_HINT, System

GIB = 2**30


def build_loadgen(workdir: Path, name: str = "loadgen") -> Path:
    """Compile the package's ``name``.c (loadgen.c, udpgen.c) with the system C compiler into ``workdir``.

    The source ships as package data of ``socks6fast.bench``; it is copied into
    ``workdir`` first, so an installed package (even one imported from a zip) works.
    """
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise BenchError(f"no C compiler (cc) found to build {name}.c; {PEERS_HINT}")
    source = workdir / f"{name}.c"
    source.write_bytes(resources.files("socks6fast.bench").joinpath(f"{name}.c").read_bytes())
    out = workdir / name
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(out), str(source)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise BenchError(f"building {name}.c failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return out


def _client_args(system: System, target_port: int) -> list[str]:
    """Load generator options to reach 127.0.0.1:``target_port`` through ``system``."""
    return ["--proxy", str(system.port), "--proto", system.proto, "--target", str(target_port)]


def _finish(procs: Processes, *children: Child) -> None:
    for c in children:
        procs.stop(c)


def bulk(
    lg: Path, procs: Processes, system: System, streams: int, warmup: float, seconds: float
) -> dict[str, float | None]:
    """Bulk throughput of ``streams`` streams through ``system`` into a splice(2) sink.

    Returns gbps (at the sink), proxy_cpu_s_per_gib (the proxy's process tree),
    machine_cpu_s_per_gib (every core, everything running: the proxy, the
    source and the sink).
    """
    budget = warmup + seconds + 20.0
    sink = procs.start(
        "sink",
        [str(lg), "sink", "--port", "0", "--conns", str(streams), "--warmup", str(warmup)]
        + ["--seconds", str(seconds), "--max-seconds", str(budget)],
    )
    client: Child | None = None
    try:
        port = int(sink.expect("port", 5.0)[0])
        client = procs.start(
            "bulk",
            [
                str(lg),
                "bulk",
                *_client_args(system, port),
                "--streams",
                str(streams),
                "--max-seconds",
                str(budget),
            ],
        )
        _expect_watching(sink, "start", budget, client)
        c0, m0, t0 = tree_cpu_seconds(system.pids), machine_cpu_seconds(), time.monotonic()
        done = _expect_watching(sink, "done", seconds + 10.0, client)
        c1, m1, t1 = tree_cpu_seconds(system.pids), machine_cpu_seconds(), time.monotonic()
    finally:
        _finish(procs, *([client] if client else []), sink)
    nbytes, ns = int(done[0]), int(done[1])
    if nbytes <= 0:
        raise BenchError("no bytes reached the sink")
    # CPU is sampled by this process around the sink's window; scale bytes to the sampled window.
    gib = nbytes / ns * 1e9 * (t1 - t0) / GIB
    return {
        "gbps": nbytes * 8 / ns,
        "proxy_cpu_s_per_gib": (c1 - c0) / gib if system.pids else None,
        "machine_cpu_s_per_gib": (m1 - m0) / gib,
    }


def _expect_watching(sink: Child, prefix: str, timeout: float, client: Child) -> list[str]:
    """Wait for ``prefix`` from ``sink``; fail early (with the client's log) if the client fails."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sink.expect(prefix, min(0.25, max(0.01, deadline - time.monotonic())))
        except BenchError:
            if sink.proc.poll() is not None or time.monotonic() >= deadline:
                raise
            rc = client.proc.poll()
            if rc is not None and rc != 0:
                raise BenchError(f"load generator failed ({rc}){client.log_tail()}") from None


def connections(
    lg: Path,
    procs: Processes,
    system: System,
    rr_port: int,
    seconds: float,
    concurrency: int,
    max_count: int,
) -> dict[str, float | None]:
    """Connections through ``system``, ``concurrency`` at a time: handshake, 64 bytes each way,
    the target closes first. Bounded by ``max_count`` connections and ``seconds``.

    Returns conn_per_s, proxy_us_per_conn, machine_us_per_conn, p50_ms, p99_ms, failed.
    """
    argv = [str(lg), "rr", *_client_args(system, rr_port), "--concurrency", str(concurrency)]
    if system.sources > 1:
        argv += ["--sources", str(system.sources)]
    argv += ["--count", str(max_count), "--max-seconds", str(seconds)]
    c0, m0 = tree_cpu_seconds(system.pids), machine_cpu_seconds()
    client = procs.start("rr", argv)
    try:
        fields = client.expect("rr", seconds + 15.0)
    finally:
        _finish(procs, client)
    c1, m1 = tree_cpu_seconds(system.pids), machine_cpu_seconds()
    ok, failed, _cut_off, elapsed_ns, p50, p99, _mean = (int(x) for x in fields)
    if ok == 0:
        raise BenchError(f"no connection completed ({failed} failed){client.log_tail()}")
    return {
        "conn_per_s": ok / (elapsed_ns / 1e9),
        "proxy_us_per_conn": (c1 - c0) / ok * 1e6 if system.pids else None,
        "machine_us_per_conn": (m1 - m0) / ok * 1e6,
        "p50_ms": p50 / 1e6,
        "p99_ms": p99 / 1e6,
        "completed": ok,
        "failed": failed,
    }


def idle_memory(
    lg: Path, procs: Processes, system: System, echo_port: int, conns: int, settle: float = 0.5
) -> dict[str, float | None]:
    """Resident memory the proxy holds per idle relayed connection, with ``conns`` open.

    Every connection is confirmed end to end (one byte echoed through the proxy)
    before the memory is read. Returns kib_rss and kib_pss per connection (PSS
    shares pages across a forked tree fairly; RSS counts shared pages once per
    process).
    """
    if not system.pids:
        return {"kib_rss": None, "kib_pss": None}
    rss0, pss0 = tree_memory_kib(system.pids)
    argv = [str(lg), "hold", *_client_args(system, echo_port), "--conns", str(conns), "--max-seconds", "300"]
    client = procs.start("hold", argv, stdin=True)
    try:
        client.expect("ready", 60.0 + conns / 50)
        time.sleep(settle)
        rss1, pss1 = tree_memory_kib(system.pids)
    finally:
        if client.proc.stdin is not None:
            client.proc.stdin.close()
            client.proc.stdin = None
        try:
            client.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _finish(procs, client)
    return {"kib_rss": (rss1 - rss0) / conns, "kib_pss": (pss1 - pss0) / conns}
