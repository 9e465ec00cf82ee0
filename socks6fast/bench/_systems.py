"""The systems under test and how to start them, each on its own free loopback port.

``direct`` is the reference without a proxy. ``socks6fast-s5`` and
``socks6fast-s6`` are the two paths of one ``socks6fast serve`` process (SOCKS5
and SOCKS6 share its port); in the UDP test ``socks6fast-s6`` sends its datagrams
over plain UDP and ``socks6fast-s6tcp`` (that test only) over the association's TCP
connection, both through the same process. Dante and microsocks are the SOCKS5 peers
(``PEERS_HINT`` says how to install them). A system that cannot start is
reported as skipped, with the reason, and the rest of the suite goes on.

For the time-to-first-byte rows that need username/password, a second instance
of socks6fast and of microsocks runs with a benchmark-only user. Dante has none:
its username method checks system accounts through PAM, which the suite does not
create.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._procs import BenchError, Child, Processes, free_port, wait_port

ALL_SYSTEMS = ("direct", "socks6fast-s5", "socks6fast-s6", "socks6fast-s6tcp", "dante", "microsocks")
#: Systems that only the UDP test measures: SOCKS 6 with the datagrams framed on the TCP
#: connection is a transport of UDP ASSOCIATE, not a way to relay TCP.
UDP_ONLY = frozenset({"socks6fast-s6tcp"})
ALIASES = {
    "s5": "socks6fast-s5",
    "s6": "socks6fast-s6",
    "s6udp": "socks6fast-s6",
    "s6tcp": "socks6fast-s6tcp",
    "socks6fast": "socks6fast-s5,socks6fast-s6,socks6fast-s6tcp",
    "danted": "dante",
    "all": ",".join(ALL_SYSTEMS),
}
#: How to get the peers and the C compiler, for messages (Debian and Ubuntu package names;
#: benchmarks/install-peers.sh of a source checkout installs the same).
PEERS_HINT = "Debian/Ubuntu: apt-get install dante-server microsocks gcc libc6-dev"
#: Credentials of the benchmark-only user of the username/password instances.
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password"


@dataclass
class System:
    """One system under test."""

    name: str
    """Key in results: one of ALL_SYSTEMS."""
    proto: str
    """What the client speaks to it: "none" (direct), "5" or "6"."""
    port: int = 0
    """The proxy's no-auth port (0 for direct)."""
    auth_port: int = 0
    """Port of the username/password instance (0: none)."""
    pids: list[int] = field(default_factory=list)
    """Root processes whose trees are measured (the no-auth instance)."""
    available: bool = True
    reason: str = ""
    """Why it is skipped, when it is."""
    version: str = ""
    relay: str = ""
    """socks6fast only: the relay path its startup log names (splice engine or asyncio, and why)."""
    udp: str = ""
    """How the UDP test's client speaks to it (udpgen.c --proto: none, s6udp, s6tcp, s5), or ""."""
    udp_reason: str = ""
    """Why the UDP test skips it, when ``udp`` is ""."""

    def summary(self) -> dict[str, object]:
        """What the JSON results keep of this system."""
        return {
            "available": self.available,
            "reason": self.reason,
            "version": self.version,
            "proto": self.proto,
            "relay": self.relay,
            "udp": self.udp,
            "udp_reason": self.udp_reason,
        }


def parse_systems(spec: str) -> list[str]:
    """``"direct,s6,dante"`` -> canonical names in the suite's order; ValueError on unknown names."""
    wanted: set[str] = set()
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        for n in ALIASES.get(name, name).split(","):
            if n not in ALL_SYSTEMS:
                raise ValueError(f"unknown system {raw!r} (known: {', '.join(ALL_SYSTEMS)}, s5, s6)")
            wanted.add(n)
    return [n for n in ALL_SYSTEMS if n in wanted]


def socks6fast_location() -> Path | None:
    """Directory that holds the ``socks6fast`` package this interpreter imports, without importing it."""
    spec = importlib.util.find_spec("socks6fast")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent.parent


def socks6fast_command(listen_port: int, user: bool) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``socks6fast serve`` from the package this harness imports."""
    env = dict(os.environ)
    root = socks6fast_location()
    if root is not None:
        # Run exactly the package the harness would import (dev tree or installed), first on the path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    # -P (Python 3.11+): do not put the working directory first on sys.path. Run from a
    # source checkout, `python -m socks6fast` would otherwise import the checkout's
    # socks6fast/ (no compiled modules unless built in place) instead of the installed
    # package, and the suite would measure the asyncio fallback, not the splice engine.
    argv = [sys.executable, "-P", "-m", "socks6fast", "serve", "--listen", f"127.0.0.1:{listen_port}"]
    if user:
        argv += ["--user", f"{BENCH_USER}:{BENCH_PASSWORD}"]
    return argv, env


DANTE_CONF = """\
# Generated by socks6fast bench: Dante as a no-auth SOCKS5 server on loopback only
# (see benchmarks/README.md, "Peers").
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: {user}
user.unprivileged: {unpriv}
timeout.io: 0
timeout.negotiate: 30
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect udpassociate
    log: error
}}
# the UDP test's replies (target -> client direction)
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: udpreply
    log: error
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}
"""


def _start_and_wait(
    procs: Processes, name: str, argv: list[str], port: int, env: dict[str, str] | None
) -> Child:
    child = procs.start(name, argv, stdout=False, env=env)
    try:
        wait_port(port, child.proc, timeout=20.0)
    except BenchError as exc:
        tail = child.log_tail()
        procs.stop(child)
        raise BenchError(f"{name} {exc}{tail}") from None
    return child


def relay_path_in_log(log: Path | None) -> str:
    """The ``relay path: ...`` phrase of socks6fast's startup log (bounded wait: the port
    accepts as soon as listen() ran, a moment before the line is logged)."""
    for _ in range(50):
        if log is not None and log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if "relay path:" in line:
                    return line.split("relay path:", 1)[1].strip()
        time.sleep(0.1)
    return "unknown (no 'relay path' line in its log)"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return text[0][:80] if text else ""


def start_systems(
    names: list[str], procs: Processes, workdir: Path, want_auth: bool, socks6fast_cmd: str | None
) -> dict[str, System]:
    """Start what ``names`` needs; every entry comes back, unavailable ones with a reason."""
    out: dict[str, System] = {}
    if "direct" in names:
        out["direct"] = System("direct", "none", version="kernel loopback", udp="none")
    fast = [n for n in names if n.startswith("socks6fast")]
    if fast:
        out.update(_start_socks6fast(fast, procs, want_auth, socks6fast_cmd))
    if "dante" in names:
        out["dante"] = _start_dante(procs, workdir)
    if "microsocks" in names:
        out["microsocks"] = _start_microsocks(procs, want_auth)
    return out


def _start_socks6fast(
    names: list[str], procs: Processes, want_auth: bool, socks6fast_cmd: str | None
) -> dict[str, System]:
    udp = {"socks6fast-s5": "s5", "socks6fast-s6": "s6udp", "socks6fast-s6tcp": "s6tcp"}
    systems = {n: System(n, "5" if n.endswith("s5") else "6", udp=udp[n]) for n in names}
    root = socks6fast_location()
    version = f"socks6fast from {root}" if root else "socks6fast"

    def command(port: int, user: bool) -> tuple[list[str], dict[str, str]]:
        if socks6fast_cmd:
            argv = socks6fast_cmd.split() + ["serve", "--listen", f"127.0.0.1:{port}"]
            if user:
                argv += ["--user", f"{BENCH_USER}:{BENCH_PASSWORD}"]
            return argv, dict(os.environ)
        return socks6fast_command(port, user)

    if root is None and not socks6fast_cmd:
        for s in systems.values():
            s.available, s.reason = False, "the socks6fast package is not importable"
        return systems
    port = free_port()
    argv, env = command(port, False)
    try:
        child = _start_and_wait(procs, "socks6fast", argv, port, env)
    except BenchError as exc:
        for s in systems.values():
            s.available, s.reason = False, f"`socks6fast serve` did not start: {exc}"
        return systems
    auth_port = 0
    auth_reason = ""
    if want_auth:
        auth_port = free_port()
        argv, env = command(auth_port, True)
        try:
            _start_and_wait(procs, "socks6fast-auth", argv, auth_port, env)
        except BenchError as exc:
            auth_port, auth_reason = 0, f"`socks6fast serve --user` did not start: {exc}"
    relay = relay_path_in_log(child.log)
    for s in systems.values():
        s.port, s.pids, s.auth_port, s.version, s.relay = port, [child.pid], auth_port, version, relay
        if auth_reason:
            s.reason = auth_reason
    return systems


def _start_dante(procs: Processes, workdir: Path) -> System:
    s = System("dante", "5", udp="s5")
    exe = shutil.which("danted") or ("/usr/sbin/danted" if Path("/usr/sbin/danted").exists() else None)
    if exe is None:
        s.available, s.reason = False, f"danted not installed; {PEERS_HINT}"
        return s
    s.version = _version([exe, "-v"])
    port = free_port()
    conf = workdir / "danted.conf"
    # Dante drops privileges to these users; as non-root it keeps the current one.
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    unpriv = "nobody" if os.geteuid() == 0 else user
    conf.write_text(DANTE_CONF.format(port=port, user=user, unpriv=unpriv))
    try:
        child = _start_and_wait(procs, "dante", [exe, "-f", str(conf)], port, None)
    except BenchError as exc:
        s.available, s.reason = False, str(exc)
        return s
    s.port, s.pids = port, [child.pid]
    return s


def _start_microsocks(procs: Processes, want_auth: bool) -> System:
    s = System("microsocks", "5", udp_reason="microsocks has no UDP ASSOCIATE (it relays TCP only)")
    exe = shutil.which("microsocks")
    if exe is None:
        s.available, s.reason = False, f"microsocks not installed; {PEERS_HINT}"
        return s
    s.version = "microsocks " + (_debian_version("microsocks") or "")
    port = free_port()
    try:
        # microsocks logs one line per connection to stderr; the log file keeps that cost in.
        child = _start_and_wait(procs, "microsocks", [exe, "-i", "127.0.0.1", "-p", str(port)], port, None)
    except BenchError as exc:
        s.available, s.reason = False, str(exc)
        return s
    s.port, s.pids = port, [child.pid]
    if want_auth:
        auth_port = free_port()
        argv = [exe, "-i", "127.0.0.1", "-p", str(auth_port), "-u", BENCH_USER, "-P", BENCH_PASSWORD]
        try:
            _start_and_wait(procs, "microsocks-auth", argv, auth_port, None)
            s.auth_port = auth_port
        except BenchError as exc:
            s.reason = f"auth instance: {exc}"
    return s


def _debian_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.decode(errors="replace").strip()
