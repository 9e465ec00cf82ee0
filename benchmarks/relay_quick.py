"""Quick single-stream check of the splice relay engine against direct loopback.

Measures, for one TCP stream over 127.0.0.1 lasting ``--seconds``:

* throughput in Gbit/s, direct (client -> sink) and through the relay
  (client -> relay process -> sink);
* relay CPU seconds per GiB: getrusage(RUSAGE_SELF) of the relay process (its C
  worker threads included), user + system;
* endpoint CPU seconds per GiB (client and sink threads of this process), because on
  loopback each side's syscalls do part of the other side's TCP work
  (shared/peers/README.md).

The relay runs in a child process so its rusage holds nothing but the relay. Runs
alternate (direct, relay, direct, relay, ...) and medians are printed.

Usage: python benchmarks/relay_quick.py [--seconds 3] [--rounds 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection

from socks6fast.dataplane._relay_c import RelayEngine

GIB = 1 << 30
CHUNK = 1 << 20


def _relay_child(conn: Connection, workers: int, pipe_size: int) -> None:
    """Accept one client, connect to the sink, relay through RelayEngine, report rusage."""
    sink_addr = conn.recv()
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname())
    engine = RelayEngine(workers=workers, pipe_size=pipe_size)
    client, _ = listener.accept()
    listener.close()
    remote = socket.create_connection(sink_addr)
    before = resource.getrusage(resource.RUSAGE_SELF)
    engine.add(client.detach(), remote.detach(), 1)
    while engine.active:
        time.sleep(0.01)
    after = resource.getrusage(resource.RUSAGE_SELF)
    ((_, a_to_b, _, end),) = engine.drain()
    engine.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    conn.send((a_to_b, cpu, int(end)))


def _sink(listener: socket.socket, result: list[int]) -> None:
    sock, _ = listener.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(view):
        total += n
    sock.close()
    result.append(total)


def _send_for(sock: socket.socket, seconds: float) -> int:
    data = memoryview(bytes(CHUNK))
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendall(data)
        sent += CHUNK
    sock.shutdown(socket.SHUT_WR)
    return sent


def run_once(seconds: float, via_relay: bool, workers: int, pipe_size: int) -> tuple[float, float, float]:
    """One timed stream. Returns (Gbit/s, relay CPU s/GiB, endpoint CPU s/GiB)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[int] = []
    sink = threading.Thread(target=_sink, args=(listener, received))
    sink.start()
    proc = None
    parent_conn = None
    if via_relay:
        parent_conn, child_conn = mp.Pipe()
        proc = mp.get_context("fork").Process(target=_relay_child, args=(child_conn, workers, pipe_size))
        proc.start()
        parent_conn.send(listener.getsockname())
        target = parent_conn.recv()
    else:
        target = listener.getsockname()
    client = socket.create_connection(target)
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    sent = _send_for(client, seconds)
    sink.join()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    client.close()
    listener.close()
    assert received == [sent], (received, sent)
    gib = sent / GIB
    endpoint_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    relay_cpu = 0.0
    if proc is not None and parent_conn is not None:
        relayed, relay_cpu, _end = parent_conn.recv()
        proc.join()
        assert relayed == sent
    return sent * 8 / elapsed / 1e9, relay_cpu / gib, endpoint_cpu / gib


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pipe-size", type=int, default=1 << 20)
    args = parser.parse_args()
    direct: list[tuple[float, float, float]] = []
    relay: list[tuple[float, float, float]] = []
    for _ in range(args.rounds):
        direct.append(run_once(args.seconds, False, args.workers, args.pipe_size))
        relay.append(run_once(args.seconds, True, args.workers, args.pipe_size))
        print(
            f"direct {direct[-1][0]:6.2f} Gbit/s   relay {relay[-1][0]:6.2f} Gbit/s "
            f"relay CPU {relay[-1][1]:.3f} s/GiB  endpoints {relay[-1][2]:.3f} s/GiB",
            flush=True,
        )
    d = statistics.median(x[0] for x in direct)
    r = statistics.median(x[0] for x in relay)
    cpu = statistics.median(x[1] for x in relay)
    print(
        f"median: direct {d:.2f} Gbit/s, relay {r:.2f} Gbit/s ({r / d:.2f}x), "
        f"relay CPU {cpu:.3f} s/GiB (target >= 0.75x, <= 0.25 s/GiB)"
    )


if __name__ == "__main__":
    main()
