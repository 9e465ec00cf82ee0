"""UDP echo micro-benchmark of the UDP data plane (socks6fast.dataplane.udp), loopback only.

Measures closed-loop UDP echo through the UDP association engine against direct
loopback, at 64-byte and 1400-byte payloads:

* ``direct``: client -> echo server, no proxy (the reference);
* ``mmsg``: SOCKS 6 over plain UDP through the native engine (``_udp_c``, C worker
  threads, recvmmsg/sendmmsg);
* ``python``: the same through the Python twin (``_udp_py``, one asyncio loop).

For each: echoes per second over the window, **proxy CPU µs per echo** (user + system
CPU of the proxy process, all threads, from /proc/<pid>/stat, over the window), the
echo server's CPU µs per echo (it receives and sends each datagram once, batched with
recvmmsg/sendmmsg; a relay does both twice per echo, so twice this figure is about the
floor of any relay built on these system calls here),
machine CPU µs per echo (/proc/stat, all cores: on a shared machine other load shows
here), loss, and p50/p99 round trip at one datagram in flight (``--latency``).

The proxy runs in its own process (``python -P -m benchmarks.udp_echo serve``): an
engine with one client-facing port and one association per flow (a socket pair stands
for each association's TCP connection; every destination allowed). The echo server and
the client are ``benchmarks/udpecho.c``, built with the system C compiler at the start
(a Python client would cap the rate near 20,000 datagrams/s). Runs are interleaved
(direct, mmsg, python, direct, ...) and medians over ``--rounds`` are printed.

Every process is bounded in time (``--max-seconds``); only 127.0.0.1 is used. This is
not ``socks6fast bench --tests udp`` (the whole proxy, SOCKS handshake included, beside
Dante): it measures the engine alone, without the server.

Usage::

    python -m benchmarks.udp_echo                      # about 1 minute
    python -m benchmarks.udp_echo --seconds 2 --rounds 3 --flows 8 --inflight 4 \\
        --sizes 64,1400 --paths direct,mmsg,python --workers 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from socks6fast.bench._procs import BenchError, machine_cpu_seconds, tree_cpu_seconds

HERE = Path(__file__).resolve().parent


# -- the proxy process -------------------------------------------------------------------


async def _serve(path: str, flows: int, workers: int, max_seconds: float) -> None:
    from socks6fast.dataplane import udp  # noqa: PLC0415 (the child process only)

    loop = asyncio.get_running_loop()
    if path == "mmsg":
        if udp.UdpEngineC is None:
            raise SystemExit("the native UDP engine is not built (SOCKS6FAST_NO_EXTENSIONS or no compiler)")
        engine: Any = udp.UdpEngineC(workers=workers)
    else:
        engine = udp.UdpEnginePy(workers=workers, loop=loop)
    fds = udp.open_udp_port("127.0.0.1", 0, engine.workers)
    with socket.socket(fileno=os.dup(fds[0])) as probe:
        port = probe.getsockname()[1]
    engine.add_port(fds)
    keep: list[socket.socket] = []
    aids: list[bytes] = []
    deadline = loop.time() + max_seconds
    # One command per line on stdin: "new" replaces the associations (a client run's
    # fresh sockets are new 5-tuples, and the first datagram fixes the mapping, UDP-03)
    # and answers "ready PORT ID,ID,..."; EOF (or the time bound) stops.
    while loop.time() < deadline:
        try:
            line = await asyncio.wait_for(
                loop.run_in_executor(None, sys.stdin.readline), deadline - loop.time()
            )
        except TimeoutError:
            break
        if line.strip() != "new":
            break
        for aid in aids:
            engine.remove(aid)
        for sock in keep:
            sock.close()
        keep, aids = [], []
        for _ in range(flows):
            ours, theirs = socket.socketpair()
            remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            remote.bind(("127.0.0.1", 0))
            aid = os.urandom(8)
            engine.add(aid, theirs.detach(), [remote.detach()])
            keep.append(ours)
            aids.append(aid)
        print(f"ready {port} {','.join(aid.hex() for aid in aids)}", flush=True)
        engine.drain()
    drops = {reason.name: n for reason, n in engine.drops().items() if n}
    print(f"drops {json.dumps(drops)}", file=sys.stderr, flush=True)
    engine.close()
    for sock in keep:
        sock.close()


# -- the harness ---------------------------------------------------------------------------


def _build(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise BenchError("no C compiler (cc) found")
    out = workdir / "udpecho"
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(out), str(HERE / "udpecho.c")],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise BenchError(f"building udpecho.c failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return out


def _line(stream: IO[str], what: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if line:
            return line.strip()
        time.sleep(0.01)
    raise BenchError(f"timed out waiting for {what}")


class Proxy:
    """One proxy process (``serve``) for a path."""

    def __init__(
        self, path: str, flows: int, workers: int, max_seconds: float, python: str | None = None
    ) -> None:
        self.path = path
        # -P and the tree appended last: the benchmarks package is found, and socks6fast is
        # the installed (compiled) package, not the source tree's. ``base`` is the native
        # engine of another installation (``--base-python``: an A/B against older code).
        boot = (
            f"import sys; sys.path.append({str(HERE.parent)!r}); from benchmarks.udp_echo import main; main()"
        )
        serve = "mmsg" if path == "base" else path
        command = [python or sys.executable, "-P", "-c", boot, "serve", "--path", serve]
        command += ["--flows", str(flows), "--workers", str(workers), "--max-seconds", str(max_seconds)]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0
        self.aids = ""

    def fresh(self) -> None:
        """New associations for the next client run."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("new\n")
        self.proc.stdin.flush()
        ready = self.proc.stdout.readline().split()
        if len(ready) != 3 or ready[0] != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise BenchError(f"the {self.path} proxy failed: {' '.join(ready)} {err[-2000:]}")
        self.port = int(ready[1])
        self.aids = ready[2]

    def close(self) -> str:
        try:
            # communicate() closes stdin: the proxy's signal to stop.
            _out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err.strip()


def _run(
    exe: Path,
    echo: subprocess.Popen[str],
    echo_port: int,
    proxy: Proxy | None,
    size: int,
    flows: int,
    inflight: int,
    seconds: float,
) -> dict[str, float]:
    args = [str(exe), "client", "--flows", str(flows), "--inflight", str(inflight), "--size", str(size),
            "--seconds", str(seconds), "--warmup", "0.5", "--max-seconds", str(seconds + 10),
            "--echo-port", str(echo_port)]  # fmt: skip
    if proxy is None:
        args += ["--target", str(echo_port), "--proto", "none"]
    else:
        proxy.fresh()
        args += ["--target", str(proxy.port), "--proto", "s6", "--aids", proxy.aids]
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    try:
        if client.stdout.readline().strip() != "start":
            raise BenchError("the client did not start")
        cpu0 = tree_cpu_seconds([proxy.proc.pid]) if proxy else 0.0
        echo0 = tree_cpu_seconds([echo.pid])
        machine0 = machine_cpu_seconds()
        done = client.stdout.readline().split()
        cpu1 = tree_cpu_seconds([proxy.proc.pid]) if proxy else 0.0
        echo1 = tree_cpu_seconds([echo.pid])
        machine1 = machine_cpu_seconds()
    finally:
        client.wait(timeout=seconds + 20)
    if len(done) != 6 or done[0] != "done":
        raise BenchError(f"the client failed: {done}")
    echoes, elapsed_ns, lost, p50, p99 = (int(x) for x in done[1:])
    echoes = max(echoes, 1)
    return {
        "echoes_per_s": echoes / (elapsed_ns / 1e9),
        "proxy_us_per_echo": (cpu1 - cpu0) * 1e6 / echoes if proxy else 0.0,
        # The echo server receives and sends each datagram once (recvmmsg/sendmmsg); a relay
        # does both twice per echo: twice this is the floor of a syscall-based relay here.
        "echo_server_us_per_echo": (echo1 - echo0) * 1e6 / echoes,
        "machine_us_per_echo": (machine1 - machine0) * 1e6 / echoes,
        "loss": lost / (echoes + lost),
        "p50_us": p50 / 1000,
        "p99_us": p99 / 1000,
    }


def _progress(rnd: int, path: str, size: int, result: dict[str, float]) -> None:
    print(
        f"[round {rnd + 1}] {path:7} {size:5} B: {result['echoes_per_s']:9.0f} echoes/s  "
        f"proxy {result['proxy_us_per_echo']:6.2f} us/echo  "
        f"machine {result['machine_us_per_echo']:6.2f} us/echo  loss {result['loss']:.4f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="(internal) the proxy process")
    serve.add_argument("--path", choices=("mmsg", "python"), required=True)
    serve.add_argument("--flows", type=int, default=8)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured window per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=8, help="associations (client sockets)")
    parser.add_argument("--inflight", type=int, default=4, help="datagrams in flight per flow")
    parser.add_argument("--sizes", default="64,1400")
    parser.add_argument("--paths", default="direct,mmsg,python")
    parser.add_argument("--workers", type=int, default=1, help="engine worker threads")
    parser.add_argument(
        "--base-python",
        help="the interpreter of another installation (e.g. an old venv's bin/python): path 'base' "
        "runs its native engine, interleaved with the others (A/B)",
    )
    parser.add_argument("--latency", action="store_true", help="also p50/p99 at one datagram in flight")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        asyncio.run(_serve(args.path, args.flows, args.workers, args.max_seconds))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    if "base" in paths and not args.base_python:
        parser.error("path 'base' needs --base-python")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    budget = (args.seconds + 2) * args.rounds * len(sizes) * len(paths) * 2 + 60
    with tempfile.TemporaryDirectory(prefix="udpecho-") as tmp:
        exe = _build(Path(tmp))
        echo = subprocess.Popen(
            [str(exe), "echo", "--max-seconds", str(budget)], stdout=subprocess.PIPE, text=True
        )
        proxies: dict[str, Proxy] = {}
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            assert echo.stdout is not None
            echo_port = int(echo.stdout.readline().split()[1])
            for path in paths:
                if path != "direct":
                    python = args.base_python if path == "base" else None
                    proxies[path] = Proxy(path, args.flows, args.workers, budget, python)
            for rnd in range(args.rounds):
                for size in sizes:
                    for path in paths:
                        result = _run(
                            exe,
                            echo,
                            echo_port,
                            proxies.get(path),
                            size,
                            args.flows,
                            args.inflight,
                            args.seconds,
                        )
                        samples.setdefault((path, size), []).append(result)
                        _progress(rnd, path, size, result)
            latency: dict[str, dict[str, float]] = {}
            if args.latency:
                for path in paths:
                    latency[path] = _run(exe, echo, echo_port, proxies.get(path), 64, 1, 1, args.seconds)
        finally:
            notes = {path: proxy.close() for path, proxy in proxies.items()}
            echo.terminate()
            echo.wait(timeout=10)
    print()
    print(f"UDP echo, {args.flows} flows x {args.inflight} in flight, medians of {args.rounds} rounds "
          f"(engine workers: {args.workers}; machine: {os.cpu_count()} CPUs)")  # fmt: skip
    print(
        f"{'path':8} {'size':>5} {'echoes/s':>10} {'proxy us/echo':>14} {'echo server us/echo':>20} "
        f"{'machine us/echo':>16} {'loss':>7}"
    )
    table: dict[str, Any] = {}
    for (path, size), runs in samples.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        table[f"{path}/{size}"] = med
        proxy_cpu = f"{med['proxy_us_per_echo']:.2f}" if path != "direct" else "-"
        print(
            f"{path:8} {size:>5} {med['echoes_per_s']:>10.0f} {proxy_cpu:>14} "
            f"{med['echo_server_us_per_echo']:>20.2f} {med['machine_us_per_echo']:>16.2f} {med['loss']:>7.4f}"
        )
    for path, lat in latency.items():
        print(f"{path:8} one in flight, 64 B: p50 {lat['p50_us']:.1f} us, p99 {lat['p99_us']:.1f} us")
    for path, note in notes.items():
        if note:
            print(f"{path} proxy: {note.splitlines()[-1]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "medians": table,
                    "latency": latency,
                    "samples": {f"{p}/{s}": r for (p, s), r in samples.items()},
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
