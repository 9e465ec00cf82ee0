"""One UDP measurement of one system: closed-loop echo, one-way packets per second, idle memory.

The traffic comes from udpgen.c (package data of ``socks6fast.bench``, compiled at the
start of the run like loadgen.c): its ``client`` does each flow's SOCKS handshake once
(SOCKS 6 UDP ASSOCIATE with the datagrams over plain UDP or over the TCP connection, or
SOCKS 5 UDP ASSOCIATE; ``System.udp`` says which), proves the path with one echoed
datagram, then runs the timed loop. Its ``echo`` server sends every datagram back; its
``sink`` counts what arrives, asked over stdin at the window's two ends.

Each function samples the proxy's process tree (every thread and every forked process:
Dante runs many) and the whole machine from /proc around the window the client reports,
and returns a flat dict of figures. Only 127.0.0.1 is used; every process is bounded in
time (``--max-seconds``) and the client in count (``--flows``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ._procs import BenchError, Child, Processes, machine_cpu_seconds, tree_cpu_seconds, tree_memory_kib
from ._systems import System

#: Datagrams per sendmmsg(2) (frames per write over TCP) of the one-way sender.
PPS_BATCH = 32
#: Payload bytes of the one-way test's datagrams.
PPS_SIZE = 64


def _client_argv(gen: Path, system: System, mode: str, target: int, flows: int) -> list[str]:
    argv = [str(gen), "client", "--mode", mode, "--proto", system.udp, "--target", str(target)]
    if system.udp != "none":
        argv += ["--proxy", str(system.port)]
    return argv + ["--flows", str(flows)]


def _ready_timeout(flows: int) -> float:
    # Each handshake takes well under a millisecond here; a loaded shared machine gets room.
    return 15.0 + flows * 0.05


def echo(
    gen: Path,
    procs: Processes,
    system: System,
    echo_port: int,
    size: int,
    flows: int,
    inflight: int,
    warmup: float,
    seconds: float,
) -> dict[str, float | None]:
    """Closed-loop echo: ``flows`` associations, ``inflight`` datagrams of ``size`` payload bytes
    in flight on each, through ``system`` to a UDP echo server.

    Returns echoes_per_s, proxy_us_per_echo (the proxy's process tree, user + system),
    machine_us_per_echo (every core), loss (datagrams given up after 200 ms of silence, over
    those sent), p50_us and p99_us (round trips in the window), echoes.
    """
    argv = _client_argv(gen, system, "echo", echo_port, flows)
    argv += ["--inflight", str(inflight), "--size", str(size), "--warmup", str(warmup)]
    argv += ["--seconds", str(seconds), "--max-seconds", str(_ready_timeout(flows) + warmup + seconds + 10)]
    client = procs.start("udp-echo", argv)
    try:
        client.expect("ready", _ready_timeout(flows))
        client.expect("start", warmup + 10.0)
        c0, m0, t0 = tree_cpu_seconds(system.pids), machine_cpu_seconds(), time.monotonic()
        done = client.expect("done", seconds + 10.0)
        c1, m1, t1 = tree_cpu_seconds(system.pids), machine_cpu_seconds(), time.monotonic()
    finally:
        procs.stop(client)
    echoes, elapsed_ns, lost, p50, p99, sent = (int(x) for x in done)
    if echoes == 0:
        raise BenchError(f"no datagram came back in the window ({lost} lost){client.log_tail()}")
    rate = echoes / (elapsed_ns / 1e9)
    # CPU is sampled by this process around the client's window: scale the echoes to that window.
    in_window = rate * (t1 - t0)
    return {
        "echoes_per_s": rate,
        "proxy_us_per_echo": (c1 - c0) / in_window * 1e6 if system.pids else None,
        "machine_us_per_echo": (m1 - m0) / in_window * 1e6,
        "loss": lost / sent if sent else 0.0,
        "p50_us": p50 / 1e3,
        "p99_us": p99 / 1e3,
        "echoes": echoes,
    }


def _sink_count(sink: Child) -> tuple[int, int]:
    """(datagrams the sink has received so far, its CLOCK_MONOTONIC ns)."""
    assert sink.proc.stdin is not None
    try:
        sink.proc.stdin.write(b"count\n")
        sink.proc.stdin.flush()
    except OSError as exc:
        raise BenchError(f"the UDP sink is gone: {exc}{sink.log_tail()}") from None
    count, _bytes, ns = (int(x) for x in sink.expect("count", 5.0))
    return count, ns


def pps(
    gen: Path,
    procs: Processes,
    system: System,
    sink: Child,
    sink_port: int,
    flows: int,
    warmup: float,
    seconds: float,
) -> dict[str, float | None]:
    """One way, open loop: ``flows`` senders blast datagrams of ``PPS_SIZE`` payload bytes through
    ``system`` to the counting sink as fast as they can.

    Returns pps (datagrams that reached the sink per second), sent_per_s, loss (1 - arrived /
    sent over the window; the proxy or the kernel dropped the rest), proxy_us_per_packet and
    machine_us_per_packet (per datagram that arrived).
    """
    argv = _client_argv(gen, system, "pps", sink_port, flows)
    argv += ["--size", str(PPS_SIZE), "--batch", str(PPS_BATCH), "--warmup", str(warmup)]
    argv += ["--seconds", str(seconds), "--max-seconds", str(_ready_timeout(flows) + warmup + seconds + 10)]
    client = procs.start("udp-pps", argv)
    try:
        client.expect("ready", _ready_timeout(flows))
        client.expect("start", warmup + 10.0)
        n0, ns0 = _sink_count(sink)
        c0, m0 = tree_cpu_seconds(system.pids), machine_cpu_seconds()
        done = client.expect("done", seconds + 10.0)
        n1, ns1 = _sink_count(sink)
        c1, m1 = tree_cpu_seconds(system.pids), machine_cpu_seconds()
    finally:
        procs.stop(client)
    sent, elapsed_ns = (int(x) for x in done)
    arrived = n1 - n0
    if arrived <= 0:
        raise BenchError(f"no datagram reached the sink ({sent} sent){client.log_tail()}")
    sent_per_s = sent / (elapsed_ns / 1e9)
    rate = arrived / ((ns1 - ns0) / 1e9)
    return {
        "pps": rate,
        "sent_per_s": sent_per_s,
        "loss": max(0.0, 1.0 - rate / sent_per_s) if sent_per_s else 0.0,
        "proxy_us_per_packet": (c1 - c0) / arrived * 1e6 if system.pids else None,
        "machine_us_per_packet": (m1 - m0) / arrived * 1e6,
    }


def idle(
    gen: Path, procs: Processes, system: System, echo_port: int, associations: int, settle: float = 0.5
) -> dict[str, float | None]:
    """Memory the proxy holds per idle association, with ``associations`` open (each one's
    handshake done and a datagram echoed through it before the memory is read).

    Returns kib_rss and kib_pss per association (the proxy's process tree).
    """
    if not system.pids:
        return {"kib_rss": None, "kib_pss": None}
    rss0, pss0 = tree_memory_kib(system.pids)
    argv = _client_argv(gen, system, "hold", echo_port, associations)
    argv += ["--size", "64", "--max-seconds", str(_ready_timeout(associations) + 300)]
    client = procs.start("udp-hold", argv, stdin=True)
    try:
        client.expect("ready", _ready_timeout(associations))
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
        procs.stop(client)
    return {"kib_rss": (rss1 - rss0) / associations, "kib_pss": (pss1 - pss0) / associations}
