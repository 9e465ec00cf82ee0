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
import sys
import time
from pathlib import Path

from ._procs import (
    BenchError,
    Child,
    Processes,
    cpu_seconds_between,
    machine_cpu_seconds,
    tree_cpu_seconds,
    tree_cpu_snapshot,
    tree_memory_kib,
)
from ._systems import System

#: Datagrams per sendmmsg(2) (frames per write over TCP) of the one-way sender.
PPS_BATCH = 32
#: Payload bytes of the one-way test's datagrams.
PPS_SIZE = 64


def _client_argv(gen: Path, system: System, mode: str, target: int, flows: int) -> list[str]:
    if system.udp in ("s6dtls", "s6py"):
        # The Python generator (udpgen.c has no DTLS), same options and output lines.
        proto = "s6dtls" if system.udp == "s6dtls" else "s6udp"
        argv = [sys.executable, "-P", "-m", "socks6fast.bench._dtlsgen", "client", "--mode", mode]
        argv += ["--proto", proto, "--target", str(target), "--proxy", str(system.port), "--ca", system.ca]
        return argv + ["--flows", str(flows)]
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
    server_pid: int = 0,
) -> dict[str, float | None]:
    """Closed-loop echo: ``flows`` associations, ``inflight`` datagrams of ``size`` payload bytes
    in flight on each, through ``system`` to a UDP echo server.

    Returns echoes_per_s, proxy_us_per_echo (the proxy's process tree, user + system),
    machine_us_per_echo (every core), loss (datagrams given up after 200 ms of silence, over
    those sent), p50_us and p99_us (round trips in the window), echoes, and with ``server_pid``
    (the echo server) server_us_per_echo: it receives and sends each datagram once, batched, so
    twice that is about the floor of any relay built on the same system calls on this machine.
    """
    argv = _client_argv(gen, system, "echo", echo_port, flows)
    argv += ["--inflight", str(inflight), "--size", str(size), "--warmup", str(warmup)]
    argv += ["--seconds", str(seconds), "--max-seconds", str(_ready_timeout(flows) + warmup + seconds + 10)]
    client = procs.start("udp-echo", argv)
    try:
        client.expect("ready", _ready_timeout(flows))
        client.expect("start", warmup + 10.0)
        e0 = tree_cpu_seconds([server_pid]) if server_pid else 0.0
        c0, m0, t0 = tree_cpu_snapshot(system.pids), machine_cpu_seconds(), time.monotonic()
        done = client.expect("done", seconds + 10.0)
        c1, m1, t1 = tree_cpu_snapshot(system.pids), machine_cpu_seconds(), time.monotonic()
        e1 = tree_cpu_seconds([server_pid]) if server_pid else 0.0
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
        "proxy_us_per_echo": cpu_seconds_between(c0, c1) / in_window * 1e6 if system.pids else None,
        "machine_us_per_echo": (m1 - m0) / in_window * 1e6,
        "server_us_per_echo": (e1 - e0) / in_window * 1e6 if server_pid else None,
        "loss": lost / sent if sent else 0.0,
        "p50_us": p50 / 1e3,
        "p99_us": p99 / 1e3,
        "echoes": echoes,
    }


def handshakes(
    procs: Processes, system: System, tasks: int, warmup: float, seconds: float
) -> dict[str, float | None]:
    """DTLS handshakes with ``system``'s DTLS port (the ``s6dtls`` systems), ``tasks`` at a time,
    each connection closed at once: handshakes_per_s and proxy_us_per_handshake (the proxy's
    process tree: the cookie exchange, the handshake, the hand-off to the engine, the close)."""
    argv = _client_argv(Path(), system, "handshakes", 0, tasks)
    argv += ["--warmup", str(warmup), "--seconds", str(seconds), "--max-seconds", str(warmup + seconds + 30)]
    client = procs.start("dtls-handshakes", argv)
    try:
        client.expect("ready", 15.0)
        client.expect("start", warmup + 10.0)
        c0 = tree_cpu_snapshot(system.pids)
        t0 = time.monotonic()
        done = client.expect("done", seconds + 20.0)
        c1 = tree_cpu_snapshot(system.pids)
        t1 = time.monotonic()
    finally:
        procs.stop(client)
    count, elapsed_ns = (int(x) for x in done)
    if count == 0:
        raise BenchError(f"no DTLS handshake completed{client.log_tail()}")
    in_window = count / (elapsed_ns / 1e9) * (t1 - t0)
    return {
        "handshakes_per_s": count / (elapsed_ns / 1e9),
        "proxy_us_per_handshake": cpu_seconds_between(c0, c1) / in_window * 1e6,
        "handshakes": count,
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


def settle(system: System, quiet: float = 0.05, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy's process tree stops burning CPU: after an open-loop run it
    still relays what its sockets hold (a TCP connection can hold megabytes of frames), and that
    tail must not be charged to the next row, which may be the same process."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(system.pids)
    while system.pids and time.monotonic() < deadline:
        time.sleep(0.1)
        now = tree_cpu_seconds(system.pids)
        if now - last <= quiet * 0.1:
            return
        last = now


def pps(
    gen: Path,
    procs: Processes,
    system: System,
    flows: int,
    warmup: float,
    seconds: float,
) -> dict[str, float | None]:
    """One way, open loop: ``flows`` senders blast datagrams of ``PPS_SIZE`` payload bytes through
    ``system`` to a counting sink as fast as they can.

    Each run has a sink of its own: what a proxy still relays after the previous run (its
    sockets' backlog) goes to a closed port, not into this run's count. Returns pps (datagrams
    that reached the sink per second), sent_per_s, loss (1 - arrived / sent over the window; the
    proxy or the kernel dropped the rest), proxy_us_per_packet and machine_us_per_packet (per
    datagram that arrived).
    """
    sink = procs.start(
        "udp-sink", [str(gen), "sink", "--max-seconds", str(seconds + warmup + 120)], stdin=True
    )
    try:
        sink_port = int(sink.expect("port", 5)[0])
        return _pps(gen, procs, system, sink, sink_port, flows, warmup, seconds)
    finally:
        procs.stop(sink)
        settle(system)


def _pps(
    gen: Path,
    procs: Processes,
    system: System,
    sink: Child,
    sink_port: int,
    flows: int,
    warmup: float,
    seconds: float,
) -> dict[str, float | None]:
    argv = _client_argv(gen, system, "pps", sink_port, flows)
    argv += ["--size", str(PPS_SIZE), "--batch", str(PPS_BATCH), "--warmup", str(warmup)]
    argv += ["--seconds", str(seconds), "--max-seconds", str(_ready_timeout(flows) + warmup + seconds + 10)]
    client = procs.start("udp-pps", argv)
    try:
        client.expect("ready", _ready_timeout(flows))
        client.expect("start", warmup + 10.0)
        n0, ns0 = _sink_count(sink)
        c0, m0 = tree_cpu_snapshot(system.pids), machine_cpu_seconds()
        done = client.expect("done", seconds + 10.0)
        n1, ns1 = _sink_count(sink)
        c1, m1 = tree_cpu_snapshot(system.pids), machine_cpu_seconds()
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
        "proxy_us_per_packet": cpu_seconds_between(c0, c1) / arrived * 1e6 if system.pids else None,
        "machine_us_per_packet": (m1 - m0) / arrived * 1e6,
    }


def idle(
    gen: Path,
    procs: Processes,
    system: System,
    echo_port: int,
    associations: int,
    settle: float = 0.5,
    source: str = "",
    keep: list[Child] | None = None,
) -> dict[str, float | None]:
    """Memory the proxy holds per idle association, with ``associations`` open (each one's
    handshake done and a datagram echoed through it before the memory is read), from
    ``source`` (an address of 127.0.0.0/8; default 127.0.0.1).

    With ``keep``, the holding client is appended to it and left running (``release`` ends it):
    socks6fast's SOCKS 5 and SOCKS 6 rows are one process, and memory freed by one row's
    associations would be reused by the next row's, which would then look free.

    Returns kib_rss and kib_pss per association (the proxy's process tree).
    """
    if not system.pids:
        return {"kib_rss": None, "kib_pss": None}
    rss0, pss0 = tree_memory_kib(system.pids)
    argv = _client_argv(gen, system, "hold", echo_port, associations)
    argv += ["--size", "64", "--max-seconds", str(_ready_timeout(associations) + 600)]
    argv += ["--source", source] if source else []
    client = procs.start("udp-hold", argv, stdin=True)
    try:
        client.expect("ready", _ready_timeout(associations))
        time.sleep(settle)
        rss1, pss1 = tree_memory_kib(system.pids)
    except BaseException:
        release(procs, [client])
        raise
    if keep is None:
        release(procs, [client])
    else:
        keep.append(client)
    return {"kib_rss": (rss1 - rss0) / associations, "kib_pss": (pss1 - pss0) / associations}


def release(procs: Processes, holders: list[Child]) -> None:
    """End idle-holding clients: stdin closed (their signal to close every association), then stopped."""
    for client in holders:
        if client.proc.stdin is not None:
            client.proc.stdin.close()
            client.proc.stdin = None
    for client in holders:
        try:
            client.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        procs.stop(client)
