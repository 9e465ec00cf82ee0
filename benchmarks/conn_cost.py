"""Where a CONNECT's proxy CPU goes (issue 13 item 3): user and system CPU per connection of
one `socks6fast serve`, and, with ``--cachegrind``, the user-space instructions per connection
(which do not depend on the machine's load, unlike every time-based figure on a shared host).

The load is the suite's own generator (``socks6fast/bench/loadgen.c``, compiled here with
``cc``): ``loadgen rr``, CONNECT through the proxy to ``loadgen rrserver``, 64 bytes each way,
the target closes first; all on 127.0.0.1. Every process is bounded in time and ended here.

    python benchmarks/conn_cost.py --proto 6 --concurrency 32 --count 5000
    python benchmarks/conn_cost.py --proto 5 --cachegrind            # needs valgrind
    python benchmarks/conn_cost.py --python "env PYTHONPATH=/tmp/old python"   # another build

``--cachegrind`` runs the proxy under ``valgrind --tool=cachegrind`` twice, serving ``--small``
and then ``--large`` connections one at a time, and divides the difference in instructions
by the difference in connections (start-up and shutdown cancel out).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the proxy did not listen within {seconds:g}s")


def _rr(lg: Path, port: int, proto: str, target: int, concurrency: int, count: int) -> int:
    argv = [str(lg), "rr", "--proxy", str(port), "--proto", proto, "--target", str(target)]
    argv += ["--concurrency", str(concurrency), "--count", str(count), "--max-seconds", "120"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True).stdout.split()
    ok, failed = int(out[1]), int(out[2])
    if failed:
        print(f"  ({failed} connections failed)", file=sys.stderr)
    return ok


def _serve(python: list[str], port: int, prefix: list[str]) -> subprocess.Popen[bytes]:
    argv = [*prefix, *python, "-P", "-m", "socks6fast", "serve", "--listen", f"127.0.0.1:{port}"]
    quiet = subprocess.DEVNULL
    return subprocess.Popen(argv, stdout=quiet, stderr=quiet, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _instructions(python: list[str], lg: Path, proto: str, target: int, count: int, out: Path) -> int:
    port = _free_port()
    prefix = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    proc = _serve(python, port, prefix)
    try:
        _wait_listening(port, proc, 60)
        _rr(lg, port, proto, target, 1, count)
        time.sleep(0.5)
    finally:
        _stop(proc)
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no summary in {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proto", choices=("5", "6"), default="6")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--python", default=sys.executable, help="command that runs Python with socks6fast")
    p.add_argument("--cachegrind", action="store_true", help="count instructions per connection instead")
    p.add_argument("--small", type=int, default=50)
    p.add_argument("--large", type=int, default=250)
    a = p.parse_args()
    python = shlex.split(a.python)
    cc = shutil.which("cc")
    if cc is None:
        raise SystemExit("no C compiler (cc) to build loadgen.c")
    with tempfile.TemporaryDirectory() as tmp:
        src, lg = Path(tmp) / "loadgen.c", Path(tmp) / "loadgen"
        src.write_bytes(resources.files("socks6fast.bench").joinpath("loadgen.c").read_bytes())
        subprocess.run([cc, "-O2", "-o", str(lg), str(src)], check=True, timeout=120)
        target = subprocess.Popen(
            [str(lg), "rrserver", "--port", "0", "--max-seconds", "900"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert target.stdout is not None
            target_port = int(target.stdout.readline().split()[1])
            if a.cachegrind:
                small = _instructions(python, lg, a.proto, target_port, a.small, Path(tmp) / "small.out")
                large = _instructions(python, lg, a.proto, target_port, a.large, Path(tmp) / "large.out")
                per = (large - small) / (a.large - a.small)
                print(f"SOCKS {a.proto}: {per:,.0f} user-space instructions per connection (c=1)")
                return 0
            port = _free_port()
            proc = _serve(python, port, [])
            try:
                _wait_listening(port, proc, 30)
                _rr(lg, port, a.proto, target_port, a.concurrency, 500)  # warm-up
                u0, s0 = _cpu(proc.pid)
                ok = _rr(lg, port, a.proto, target_port, a.concurrency, a.count)
                u1, s1 = _cpu(proc.pid)
            finally:
                _stop(proc)
            load = os.getloadavg()[0]
            user, system = (u1 - u0) / ok * 1e6, (s1 - s0) / ok * 1e6
            print(
                f"SOCKS {a.proto}, c={a.concurrency}: {ok} connections, "
                f"proxy CPU {user + system:.0f} us each (user {user:.0f}, system {system:.0f}); "
                f"load average {load:.1f}"
            )
        finally:
            target.terminate()
            target.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
