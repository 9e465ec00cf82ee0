"""Memory cost of idle relayed connections in the splice engine (1,000 pairs by default).

Measured in a child process that does nothing but relay:

* RSS growth per pair from handing the pairs to the engine until every pair has moved
  a few bytes each way and gone idle (the engine's own user-space cost: one Pair
  struct, a few hundred bytes).
* Pipes held: idle pairs hold none (pipes are borrowed from a per-worker pool only
  while bytes are in flight); the pool keeps at most 32 empty pipes per worker.
* Kernel slab growth (/proc/meminfo Slab) per pair over the same window, which
  includes every socket buffer the endpoints' traffic touched (machine-wide, so noisy).

The endpoints (1,000 clients and 1,000 remote hosts) live in this process, over
127.0.0.1. Usage: python benchmarks/relay_idle_memory.py [--pairs 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import stat
import time
from multiprocessing.connection import Connection

from socks6fast.dataplane._relay_c import RelayEngine

KIB = 1024


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _slab_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    raise RuntimeError("no Slab")


def _pipe_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISFIFO(os.stat(f"/proc/self/fd/{name}").st_mode):
                count += 1
        except OSError:
            pass
    return count


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _relay_child(conn: Connection, pairs: int, workers: int) -> None:
    _raise_fd_limit(2 * pairs + 200)
    sink_addr = conn.recv()
    listener = socket.create_server(("127.0.0.1", 0), backlog=pairs)
    conn.send(listener.getsockname())
    fds = []
    for _ in range(pairs):
        client, _ = listener.accept()
        remote = socket.create_connection(sink_addr)
        fds.append((client.detach(), remote.detach()))
    listener.close()
    engine = RelayEngine(workers=workers)
    time.sleep(0.2)  # let the worker threads' stacks settle before the baseline
    rss0, slab0 = _rss_kib(), _slab_kib()
    for i, (a, b) in enumerate(fds):
        engine.add(a, b, i)
    conn.send("added")
    conn.recv()  # the parent exchanged bytes on every pair; all are idle now
    time.sleep(0.3)
    rss1, slab1 = _rss_kib(), _slab_kib()
    pipes = _pipe_fds() // 2
    conn.send((rss1 - rss0, slab1 - slab0, pipes, engine.active))
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    pairs = args.pairs
    _raise_fd_limit(2 * pairs + 200)
    sink = socket.create_server(("127.0.0.1", 0), backlog=pairs)
    parent_conn, child_conn = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_relay_child, args=(child_conn, pairs, args.workers))
    proc.start()
    parent_conn.send(sink.getsockname())
    proxy_addr = parent_conn.recv()
    clients, remotes = [], []
    for _ in range(pairs):
        clients.append(socket.create_connection(proxy_addr))
        remotes.append(sink.accept()[0])
    assert parent_conn.recv() == "added"
    for c, r in zip(clients, remotes, strict=True):
        c.sendall(b"hello")
        r.sendall(b"world!")
    for c, r in zip(clients, remotes, strict=True):
        r.settimeout(5)
        c.settimeout(5)
        assert r.recv(5, socket.MSG_WAITALL) == b"hello"
        assert c.recv(6, socket.MSG_WAITALL) == b"world!"
    parent_conn.send("idle")
    rss_kib, slab_kib, pipes, active = parent_conn.recv()
    proc.join()
    for s in clients + remotes:
        s.close()
    sink.close()
    print(f"pairs: {pairs} (active {active}), workers: {args.workers}")
    print(f"relay RSS growth: {rss_kib} KiB total, {rss_kib * KIB / pairs:.0f} bytes per idle pair")
    print(f"pipes held while idle: {pipes} (pool only; {pipes / pairs:.3f} per pair)")
    print(f"kernel slab growth (machine-wide, noisy): {slab_kib * KIB / pairs / KIB:.2f} KiB per pair")


if __name__ == "__main__":
    main()
