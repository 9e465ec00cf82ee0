"""The cost of sessions shared through Redis (issue 13 item 2): ``socks6fast bench --tests sessions``.

Strategy: two ``socks6fast serve`` processes, identical but for ``[sessions] store``: one keeps
sessions in memory, the other in a ``redis-server`` the bench starts itself on a free loopback
port (no persistence) and stops after. A closed-loop client (one request at a time, raw bytes
built here) sends NOOP requests, which the proxy answers right after the session work with no
destination to dial, in three kinds:

* ``none``: no session option (the base cost of a request; it never asks the store);
* ``lookup``: a Session ID (the session is looked up and renewed);
* ``spend``: a Session ID and an Idempotence Expenditure with the next token (lookup, renewal
  and spend).

For each store and kind: the median latency of a request (connect to EOF after the reply), the
proxy's CPU per request and, for Redis, redis-server's CPU per request (on-CPU time of every
thread, ``/proc/PID/task/*/schedstat``, nanoseconds), and the Redis commands per request
(``INFO commandstats``: the round trips). The added cost of a lookup and of a spend is the Redis
row minus the memory row. Rounds interleave the stores, so that load on the machine hits both.
Skipped, with the reason, where ``redis-server`` or the ``redis`` package is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._procs import BenchError, Child, Processes, free_port, wait_port
from ._systems import socks6fast_command
from ._ttfb import (
    OPT_IDEMPOTENCE_ACCEPTED,
    OPT_IDEMPOTENCE_WINDOW,
    OPT_SESSION_ID,
    OPT_SESSION_OK,
    OPT_SESSION_REQUEST,
    SOCKS6_VERSION,
    _walk_options,
    socks6_option,
    socks6_token_expenditure,
    socks6_token_request,
)

__all__ = ["KINDS", "run_sessions", "tables", "targets"]

KINDS = ("none", "lookup", "spend")
STORES = ("memory", "redis")
CMD_NOOP = 0x00
ATYP_IPV4 = 0x01
#: Window asked for: one token per spend request of the whole run, and more.
WINDOW = 2**20
#: Requests per kind, store and round, by profile.
REQUESTS = {"full": 2000, "quick": 800, "smoke": 60}


def _noop(options: bytes = b"") -> bytes:
    """SOCKS 6 Request, NOOP, address 0.0.0.0 port 0 (REQ-04)."""
    return (
        struct.pack("!BBHHBB", SOCKS6_VERSION, CMD_NOOP, len(options), 0, 0, ATYP_IPV4) + bytes(4) + options
    )


def _exchange(port: int, request: bytes) -> dict[int, bytes]:
    """One request on a new connection; the options of both replies (raises on a failure)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = bytearray()
        while chunk := sock.recv(4096):
            data += chunk
    if len(data) < 4 or data[0] != SOCKS6_VERSION or data[1] != 0:
        raise BenchError(f"authentication reply {bytes(data[:4]).hex()}")
    auth_len = struct.unpack_from("!H", data, 2)[0]
    options = _walk_options(bytes(data[4 : 4 + auth_len]))
    op = data[4 + auth_len :]
    if len(op) < 12 or op[1] != 0:
        raise BenchError(f"operation reply {bytes(op[:4]).hex()}")
    op_len = struct.unpack_from("!H", op, 2)[0]
    for kind, value in _walk_options(bytes(op[12 : 12 + op_len])).items():  # IPv4: 8 + 4 bytes
        options.setdefault(kind, value)
    return options


def _cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every thread of ``pid`` (schedstat: exact, unlike the ticks of stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _redis_command(port: int, *args: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)).encode())
        data = b""
        while True:
            data += sock.recv(65536)
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                return data
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    return data


#: Commands the store's Lua scripts run inside Redis, which ``INFO commandstats`` counts too; the
#: proxy never sends them itself, so they are no round trips. INFO is the bench's own.
_NOT_ROUND_TRIPS = frozenset(
    {
        *("hmget", "hget", "time", "pexpire", "zadd", "hset", "exists", "zremrangebyscore"),
        *("zcard", "zrange"),
        *("del", "unlink", "zrem", "get", "set", "info"),  # info: the bench's and the scripts' (D38 epoch)
    }
)


def _redis_calls(port: int) -> int:
    """Commands clients sent to Redis, the bench's INFO aside (each is one round trip: a proxy's
    script run is one EVALSHA; a SCRIPT LOAD or a connection's set-up commands count too)."""
    total = 0
    for line in _redis_command(port, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_") and "calls=" in line:
            name = line[len("cmdstat_") :].split(":")[0]
            if name not in _NOT_ROUND_TRIPS:
                total += int(line.split("calls=")[1].split(",")[0])
    return total


class _Proxy:
    """One socks6fast with its session and token state as the client keeps it."""

    def __init__(self, store: str, child: Child, port: int) -> None:
        self.store = store
        self.child = child
        self.port = port
        self.session_id = b""
        self.next_token = 0

    def open_session(self) -> None:
        options = _exchange(
            self.port, _noop(socks6_option(OPT_SESSION_REQUEST, b"") + socks6_token_request(WINDOW))
        )
        self.session_id = options.get(OPT_SESSION_ID, b"")
        window = options.get(OPT_IDEMPOTENCE_WINDOW, b"")
        if not self.session_id or len(window) < 8:
            raise BenchError(f"{self.store} store: no session or no token window granted")
        self.next_token = struct.unpack_from("!I", window)[0]

    def request(self, kind: str) -> None:
        if kind == "none":
            _exchange(self.port, _noop())
            return
        options = socks6_option(OPT_SESSION_ID, self.session_id)
        if kind == "spend":
            options += socks6_token_expenditure(self.next_token)
            self.next_token = (self.next_token + 1) % 2**32
        got = _exchange(self.port, _noop(options))
        if OPT_SESSION_OK not in got or (kind == "spend" and OPT_IDEMPOTENCE_ACCEPTED not in got):
            raise BenchError(f"{self.store} store: the proxy did not accept the {kind} request")


def _config(path: Path, port: int, store: str) -> Path:
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nlog_level = "warning"\n'
        f'[sessions]\nstore = "{store}"\nmax_token_window = {WINDOW}\n'
    )
    return path


def run_sessions(
    procs: Processes,
    workdir: Path,
    socks6fast_cmd: str | None,
    profile: str,
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Measure; the ``sessions`` results (``{"skipped": reason}`` when it cannot run)."""
    redis_server = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if redis_server is None:
        return {"skipped": "redis-server is not installed (apt-get install redis-server)"}
    if not socks6fast_cmd and importlib.util.find_spec("redis") is None:
        return {"skipped": "the redis package is not installed (pip install 'socks6fast[redis]')"}
    redis_port = free_port()
    argv = [
        redis_server,
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    redis = procs.start("redis-server", argv + ["--dir", str(workdir)], stdout=False)
    wait_port(redis_port, redis.proc, timeout=10.0)
    stores = {"memory": "memory", "redis": f"redis://127.0.0.1:{redis_port}/0"}
    proxies: dict[str, _Proxy] = {}
    for name, store in stores.items():
        port = free_port()
        config = _config(workdir / f"sessions-{name}.toml", port, store)
        if socks6fast_cmd:
            command, env = socks6fast_cmd.split() + ["serve", "--config", str(config)], None
        else:
            command, env = socks6fast_command(port, False)
            command = command[: command.index("serve") + 1] + ["--config", str(config)]
        child = procs.start(f"socks6fast-sessions-{name}", command, stdout=False, env=env)
        try:
            wait_port(port, child.proc, timeout=20.0)
        except BenchError as exc:
            why = f"{exc}{child.log_tail()}"
            raise BenchError(f"socks6fast with the {name} session store did not start: {why}") from None
        proxies[name] = _Proxy(name, child, port)
    count = REQUESTS.get(profile, REQUESTS["full"])
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {k: [] for k in KINDS} for s in STORES}
    for proxy in proxies.values():
        proxy.open_session()
        for kind in KINDS:  # warm-up: imports, the script cache, the connection pool
            for _ in range(20):
                proxy.request(kind)
    for r in range(rounds):
        for kind in KINDS:
            for name in STORES:
                proxy = proxies[name]
                latencies = []
                calls0 = _redis_calls(redis_port)
                cpu0, redis0 = _cpu_ns(proxy.child.pid), _cpu_ns(redis.pid)
                for _ in range(count):
                    t0 = time.perf_counter()
                    proxy.request(kind)
                    latencies.append(time.perf_counter() - t0)
                cpu1, redis1 = _cpu_ns(proxy.child.pid), _cpu_ns(redis.pid)
                calls = _redis_calls(redis_port) - calls0
                sample = {
                    "p50_us": statistics.median(latencies) * 1e6,
                    "mean_us": statistics.fmean(latencies) * 1e6,
                    "proxy_us": (cpu1 - cpu0) / count / 1e3,
                    "redis_us": (redis1 - redis0) / count / 1e3 if name == "redis" else 0.0,
                    "redis_calls": calls / count if name == "redis" else 0.0,
                }
                samples[name][kind].append(sample)
                progress(
                    f"[sessions] round {r + 1}/{rounds} {name:6} {kind:6} p50 {sample['p50_us']:.0f} us, "
                    f"proxy {sample['proxy_us']:.1f} us/request, redis {sample['redis_us']:.1f} us/request, "
                    f"{sample['redis_calls']:.2f} Redis commands/request"
                )
    for proxy in proxies.values():
        procs.stop(proxy.child)
    procs.stop(redis)
    out: dict[str, Any] = {"requests": count, "rounds": rounds, "redis_version": _version(redis_server)}
    for name in STORES:
        out[name] = {
            kind: {
                key: statistics.median(s[key] for s in samples[name][kind]) for key in samples[name][kind][0]
            }
            for kind in KINDS
        }
    out["added"] = {
        kind: {
            "latency_us": out["redis"][kind]["p50_us"] - out["memory"][kind]["p50_us"],
            "cpu_us": out["redis"][kind]["proxy_us"]
            + out["redis"][kind]["redis_us"]
            - out["memory"][kind]["proxy_us"],
            "proxy_cpu_us": out["redis"][kind]["proxy_us"] - out["memory"][kind]["proxy_us"],
        }
        for kind in KINDS
    }
    return out


def _version(redis_server: str) -> str:
    try:
        done = subprocess.run([redis_server, "--version"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode(errors="replace").strip()[:80]


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's target: a token spend adds at most one Redis round trip to a request."""
    sessions = res.get("sessions")
    if not sessions or "skipped" in sessions:
        return []
    value = sessions["redis"]["spend"]["redis_calls"]
    return [
        {
            "target": "Redis round trips per token-spending request (sessions in Redis)",
            "value": value,
            "op": "<=",
            "limit": 1.0,
            "unit": "",
            "ok": value <= 1.0,
            "issue": 13,
        }
    ]


def tables(res: dict[str, Any]) -> list[str]:
    """The sessions table (markdown lines; empty when the test did not run)."""
    sessions = res.get("sessions")
    if not sessions:
        return []
    if "skipped" in sessions:
        return [f"Sessions in Redis: skipped ({sessions['skipped']}).", ""]
    lines = [
        f"Sessions: memory against Redis ({sessions['redis_version']}), NOOP requests one at a time, "
        f"{sessions['requests']} per row and round, medians of {sessions['rounds']} rounds:",
        "",
        "| request | store | p50 latency us | proxy CPU us/request | redis-server CPU us/request "
        "| Redis commands/request |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for store in STORES:
            row = sessions[store][kind]
            redis_cells = f"{row['redis_us']:.1f} | {row['redis_calls']:.2f}" if store == "redis" else "- | -"
            lines.append(
                f"| {kind} | {store} | {row['p50_us']:.0f} | {row['proxy_us']:.1f} | {redis_cells} |"
            )
    lines.append("")
    added = sessions["added"]
    lines.append(
        "Added by Redis (Redis row minus memory row): "
        + "; ".join(
            f"{kind}: {added[kind]['latency_us']:+.0f} us latency, {added[kind]['cpu_us']:+.1f} us CPU "
            f"(proxy {added[kind]['proxy_cpu_us']:+.1f})"
            for kind in ("lookup", "spend")
        )
        + "."
    )
    lines.append("")
    return lines
