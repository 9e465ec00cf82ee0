"""The proxy under descriptor and pipe limits (hardening issue 12 defect 3, relay issue 16
defect 4), with the proxy in a subprocess whose limits the test sets.

* Descriptor exhaustion: the proxy runs with ``RLIMIT_NOFILE`` 1024 and gets more clients
  than fit. Every relay that was established stays intact (every byte arrives, none is
  reset), and every client that does not fit gets a prompt General Failure reply or a
  close, never a hang in the listen backlog. Runs on the relay path of the suite run
  (splice engine, or asyncio with ``SOCKS6FAST_NO_EXTENSIONS=1``).
* The engine without a pipe: the same engine, in a process with no descriptor left for
  a pipe, relays by copying instead of resetting (splice engine only: the asyncio path
  has no pipes).
* Pipe quota: as an unprivileged user (``nobody``), the engine's pipes stay within
  ``/proc/sys/fs/pipe-user-pages-soft`` and their size grows back after a burst (splice
  engine only).

Everything listens on 127.0.0.1 only. Each scenario is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_server import Sink, make_config, running_server

from socks6fast.constants import AddressType, Command
from socks6fast.dataplane.engine import ENGINE_AVAILABLE, RelayEngine
from socks6fast.proto import codec
from socks6fast.proto.messages import Request

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux limits (/proc, RLIMIT_NOFILE)"),
]

F_GETPIPE_SZ = 1032
FIONREAD = 0x541B
#: The descriptor limit the proxy runs with in the exhaustion test.
PROXY_NOFILE = 1024


def _raise_own_nofile(want: int) -> None:
    """The test process holds both ends of every relay: make room for them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_LAUNCHER = """
import resource, sys
soft, hard = (int(n) for n in sys.argv[1].split(":"))
if hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from socks6fast.cli import main
sys.exit(main(sys.argv[2:]))
"""


@contextlib.contextmanager
def proxy_process(
    log_path: Path, *args: str, nofile: int = 0, soft: int = 0, user: str | None = None
) -> Iterator[tuple[tuple[str, int], int]]:
    """``socks6fast serve --listen 127.0.0.1:0`` in a subprocess with the given descriptor
    limit (hard ``nofile``, soft ``soft`` or the same) and user; yields the address it
    listens on and its pid. Logs go to log_path.

    Another user is switched to with setpriv(1), keeping one capability, CAP_DAC_READ_SEARCH
    (ambient): the interpreter may live under /root. The kernel's pipe quota only exempts
    CAP_SYS_RESOURCE and CAP_SYS_ADMIN, which the process does not have."""
    command = []
    if user is not None:
        entry = pwd.getpwnam(user)
        command = [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
        ]
    command += [sys.executable, "-c", _LAUNCHER, f"{soft or nofile}:{nofile}"]
    command += ["serve", "--listen", "127.0.0.1:0", "--drain-timeout", "0", "--log-level", "info", *args]
    with open(log_path, "wb") as log:
        # cwd "/": import the installed package, never the source tree (and a user such as
        # nobody can enter it).
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while True:
            found = re.search(rb"listening on 127\.0\.0\.1:(\d+)", log_path.read_bytes())
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        yield ("127.0.0.1", int(found.group(1))), proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- descriptor exhaustion -----------------------------------------------------------------

OK, REFUSED, CLOSED = "ok", "refused", "closed"


async def _open_relay(
    proxy: tuple[str, int], dest: tuple[str, int], socks5: bool
) -> tuple[str, float, asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """One CONNECT through the proxy. Returns (outcome, seconds to the outcome, streams):
    OK with the streams, REFUSED (General Failure reply) or CLOSED (EOF or reset); a
    client left without an answer for 5 s raises TimeoutError."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*proxy)
    ip = socket.inet_aton(dest[0])
    try:
        async with asyncio.timeout(5):
            if socks5:
                writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + ip + struct.pack("!H", dest[1]))
                selection = await reader.readexactly(2)
                if selection != b"\x05\x00":
                    raise AssertionError(f"method selection {selection!r}")
                reply = await reader.readexactly(10)
                code = reply[1]
            else:
                writer.write(codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, *dest, ())))
                head = await reader.readexactly(2)
                if head[1] != 0:
                    # D14 form of a refusal before the Authentication Reply: 06 01 ...
                    code = head[1]
                else:
                    buffer = bytearray(head)
                    while True:
                        auth, need = codec.decode_auth_reply(buffer)
                        if auth is not None:
                            del buffer[:need]
                            break
                        buffer += await reader.readexactly(need)
                    while True:
                        op, need = codec.decode_operation_reply(buffer)
                        if op is not None:
                            break
                        buffer += await reader.readexactly(need)
                    code = int(op.reply_code)
    except (asyncio.IncompleteReadError, ConnectionError):
        await _close(writer)
        return CLOSED, time.monotonic() - started, None, None
    if code == 0:
        return OK, time.monotonic() - started, reader, writer
    assert code == 1, f"reply code {code}: a refusal for lack of room is General Failure (0x01)"
    seconds = time.monotonic() - started
    await _close(writer)
    return REFUSED, seconds, None, None


async def _close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _echo_round(
    relays: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], size: int, tag: int, stall: int = 0
) -> list[str]:
    """Every relay sends ``size`` bytes and reads the echo back; returns the failures.

    The first ``stall`` relays send 4 MiB instead and read nothing for a second: their
    bytes back up through the proxy into both of its directions (the destination of each
    is blocked), so each of them holds its pipes while the others need pipes too."""

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        n = 4 << 20 if i < stall else size
        payload = (struct.pack("!II", tag, i) * (n // 8 + 1))[:n]
        try:
            writer.write(payload)
            if i < stall:
                await asyncio.sleep(1.0)
            echoed = await reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            return f"relay {i}: {exc!r}"
        return None if echoed == payload else f"relay {i}: corrupted echo"

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(relays)))
    return [r for r in results if r is not None]


async def _exhaustion_scenario(proxy: tuple[str, int]) -> dict[str, int]:
    handlers: set[asyncio.StreamWriter] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            await _close(writer)
            handlers.discard(writer)

    sink = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    dest = sink.sockets[0].getsockname()[:2]
    live: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    counts = {OK: 0, REFUSED: 0, CLOSED: 0}
    # Cap the clients in flight so that the proxy's listen backlog never overflows: a
    # refusal must come from the proxy, not from the kernel dropping SYNs.
    gate = asyncio.Semaphore(100)

    async def attempt(n: int) -> None:
        async def one(i: int) -> None:
            async with gate:
                outcome, seconds, reader, writer = await _open_relay(proxy, dest, socks5=i % 2 == 0)
            counts[outcome] += 1
            if outcome == OK:
                assert reader is not None and writer is not None
                live.append((reader, writer))
            else:
                assert seconds < 3.0, f"a client waited {seconds:.1f}s for its refusal"

        await asyncio.gather(*(one(i) for i in range(n)))

    try:
        # More clients than 1024 descriptors hold, before any byte moved (no pipe exists yet).
        await attempt(550)
        assert counts[OK] >= 100, counts
        assert counts[REFUSED] + counts[CLOSED] > 0, counts
        # Every relay moves bytes; 24 of them hold pipes meanwhile (blocked destinations).
        assert await _echo_round(live, 64 * 1024, 1, stall=24) == []
        # Full: every further client is answered promptly, the relays keep going.
        before = dict(counts)
        await attempt(100)
        assert counts[REFUSED] + counts[CLOSED] > before[REFUSED] + before[CLOSED], counts
        assert await _echo_round(live, 64 * 1024, 2, stall=24) == []
    finally:
        await _close(*(writer for _, writer in live))
        async with asyncio.timeout(10):
            while handlers:  # each ends on its client's EOF
                await asyncio.sleep(0.01)
        sink.close()
        await sink.wait_closed()
    return counts


async def test_full_proxy_answers_newcomers_promptly() -> None:
    """Issue 12 defect 3: at max_connections a newcomer is answered General Failure at once
    (SOCKS 6: 06 01, the D14 form; SOCKS 5: 05 00 then REP 0x01), or closed; it is never
    left waiting in the listen backlog until a slot frees. The established relays carry on,
    and once one of them ends a newcomer is served again."""
    config = make_config(server={"max_connections": 16})
    async with Sink() as sink, running_server(config) as server:
        proxy = server.addresses[0]
        live = []
        for i in range(16):
            outcome, _, reader, writer = await _open_relay(proxy, sink.address, socks5=i % 2 == 0)
            assert outcome == OK
            assert reader is not None and writer is not None
            live.append((reader, writer))
        results = await asyncio.gather(
            *(_open_relay(proxy, sink.address, socks5=i % 2 == 0) for i in range(24))
        )
        for outcome, seconds, _, _ in results:
            assert outcome in (REFUSED, CLOSED) and seconds < 2.0, (outcome, seconds)
        # REFUSAL_SLOTS (64) is more than 24: every one of them got its reply, both protocols.
        assert [outcome for outcome, _, _, _ in results] == [REFUSED] * 24
        assert await _echo_round(live, 64 * 1024, 1) == []
        await _close(live[0][1])
        async with asyncio.timeout(5):
            while server.active_connections >= 16:
                await asyncio.sleep(0.01)
        outcome, _, reader, writer = await _open_relay(proxy, sink.address, socks5=False)
        assert outcome == OK and writer is not None
        await _close(writer, *(writer for _, writer in live[1:]))


def test_descriptor_exhaustion_keeps_live_relays_and_answers_newcomers(tmp_path: Path) -> None:
    """Issue 12 defect 3: the proxy with RLIMIT_NOFILE 1024 and 550 clients. max_connections
    (default 10000) is lowered to what the limit holds, with a warning that says why; no
    established relay is reset for lack of a descriptor (every byte of three echo rounds
    comes back); every client that does not fit gets General Failure (SOCKS 6 and SOCKS 5)
    or a close within 3 s; the condition is logged once per interval, with counts."""
    _raise_own_nofile(4096)
    log = tmp_path / "proxy.log"
    with proxy_process(log, nofile=PROXY_NOFILE) as (proxy, _):
        counts = asyncio.run(_exhaustion_scenario(proxy))
    text = log.read_text(errors="replace")
    assert "max_connections lowered from 10000 to" in text, text[-3000:]
    assert not re.search(r"end=(reset|error)", text), [
        line for line in text.splitlines() if re.search(r"end=(reset|error)", line)
    ][:5]
    refusals = [line for line in text.splitlines() if "clients refused" in line]
    assert 1 <= len(refusals) <= 3, refusals  # once per 10 s interval, not per client
    assert re.search(r"\d+ clients refused", refusals[0]), refusals
    assert counts[REFUSED] + counts[CLOSED] > 0


def test_soft_descriptor_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Issue 12 defect 3: serve raises the soft RLIMIT_NOFILE to the hard limit (here 512 to
    2048) and says what it planned for; max_connections is sized against the raised limit."""
    log = tmp_path / "proxy.log"
    with proxy_process(log, nofile=2048, soft=512) as (_, pid):
        limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max open files\s+2048\s+2048", limits), limits
    assert re.search(r"descriptors: limit 2048 \(hard 2048\), max_connections \d+", log.read_text()), (
        log.read_text()
    )


#: A Server in a process whose descriptor table is filled (after start) until open() fails
#: with EMFILE: accept() fails the same way. Prints the port, then "full".
_SERVER_WITHOUT_DESCRIPTORS = """
import asyncio, logging, os, resource, sys
from socks6fast.asyncio.server import Server
from socks6fast.config import parse_config

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def main():
    server = Server(parse_config({"server": {"listen": ["127.0.0.1:0"]}}))
    await server.start()
    print(server.addresses[0][1], flush=True)
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    await asyncio.sleep(float(sys.argv[1]))
    for fd in hog:
        os.close(fd)
    await server.close(drain_timeout=0)


asyncio.run(main())
"""


def test_accept_without_descriptors_closes_the_client_at_once() -> None:
    """Issue 12 defect 3: when accept() itself fails with EMFILE, the server gives up its
    spare descriptor to accept the client and close it, so the client sees the close at
    once instead of waiting in the backlog (before: accepts paused and retried every
    0.1 s with a warning each time, and the client hung); the log says so at most once
    per interval, with the counts."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_WITHOUT_DESCRIPTORS, "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "full"
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"\x05\x01\x00")
                client.settimeout(2.0)
                try:
                    assert client.recv(16) == b""
                except ConnectionResetError:
                    pass
        _, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errors[-3000:]
    # The first occurrence at once, the rest in one summary (here: at shutdown, before the
    # 10 s interval is over); no pause-and-retry.
    lines = [line for line in errors.splitlines() if "short of room" in line]
    assert len(lines) <= 2, lines
    counts = [int(n) for n in re.findall(r"(\d+) clients closed at accept for lack of descriptors", errors)]
    assert sum(counts) == 5 and "paused" not in errors, lines


# --- the engine without a pipe ---------------------------------------------------------------


def _engine_pairs(count: int) -> tuple[list[tuple[socket.socket, socket.socket]], list[tuple[int, int]]]:
    """``count`` relays-to-be over loopback TCP: the outer ends (client, server) the test
    talks through, and the inner descriptors (client leg, remote leg) for the engine."""
    outer, inner = [], []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(count):
            ends = []
            for _ in range(2):
                near = socket.create_connection(listener.getsockname())
                far, _ = listener.accept()
                ends.append((near, far))
            (client, leg_a), (leg_b, server) = ends
            outer.append((client, server))
            inner.append((leg_a.detach(), leg_b.detach()))
    return outer, inner


def _exchange(
    engine: Any, outer: list[tuple[socket.socket, socket.socket]], size: int, seconds: float = 60.0
) -> dict[str, Any]:
    """Send ``size`` distinct bytes each way through every pair the engine relays, half-close,
    read to EOF; then collect the engine's reports. Opens no descriptor (selectors.poll),
    so it runs where the descriptor table is full. Returns what arrived intact, the ends
    and the byte counts the engine reported."""
    poller = select.poll()
    state: dict[int, dict[str, Any]] = {}
    for i, (client, server) in enumerate(outer):
        for j, sock in enumerate((client, server)):
            sock.setblocking(False)
            state[sock.fileno()] = {
                "sock": sock,
                "out": hashlib.sha256(b"%d-%d" % (i, j)).digest() * (size // 32),
                "sent": 0,
                "digest": hashlib.sha256(),
                "got": 0,
                "eof": False,
            }
            poller.register(sock, select.POLLIN | select.POLLOUT)
        state[client.fileno()]["peer"] = state[server.fileno()]
        state[server.fileno()]["peer"] = state[client.fileno()]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(st["eof"] for st in state.values()):
        for fd, events in poller.poll(1000):
            st = state[fd]
            sock = st["sock"]
            try:
                if events & select.POLLOUT and st["sent"] < len(st["out"]):
                    st["sent"] += sock.send(st["out"][st["sent"] : st["sent"] + 262144])
                    if st["sent"] == len(st["out"]):
                        sock.shutdown(socket.SHUT_WR)
                        poller.modify(sock, select.POLLIN)
                if not events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    continue
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:  # reset by the relay
                chunk = b""
            if chunk:
                st["digest"].update(chunk)
                st["got"] += len(chunk)
            else:
                st["eof"] = True
                poller.unregister(sock)
    intact = sum(
        1
        for st in state.values()
        if st["eof"]
        and st["got"] == size
        and st["digest"].digest() == hashlib.sha256(st["peer"]["out"]).digest()
    )
    ends: list[tuple[int, int, str]] = []
    while len(ends) < len(outer) and time.monotonic() < deadline:
        ends += [(int(a_b), int(b_a), end.name) for _, a_b, b_a, end in engine.drain()]
        time.sleep(0.01)
    for client, server in outer:
        client.close()
        server.close()
    return {
        "intact": intact,
        "ends": sorted({end for _, _, end in ends}),
        "counted": sum(a_b + b_a for a_b, b_a, _ in ends),
        "copied": getattr(engine, "copied", None),
        "pipe_errors": getattr(engine, "pipe_errors", None),
        "pipes": getattr(engine, "pipes", None),
    }


#: _exchange in a process whose descriptor table is full once the pairs are made:
#: every pipe2() fails with EMFILE. Prints the result as JSON.
_ENGINE_WITHOUT_DESCRIPTORS = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[3])
from test_fd_limits import _engine_pairs, _exchange
from socks6fast.dataplane._relay_c import RelayEngine

pairs, size = int(sys.argv[1]), int(sys.argv[2])
outer, inner = _engine_pairs(pairs)
engine = RelayEngine(workers=1)
top = max(int(name) for name in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    os.pipe()
    full = False
except OSError:
    full = True
for i, (fd_a, fd_b) in enumerate(inner):
    engine.add(fd_a, fd_b, i)
report = _exchange(engine, outer, size)
engine.close()
print(json.dumps(dict(report, full=full)))
"""


@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="the splice engine (the asyncio path has no pipes)")
def test_engine_copy_path_delivers_every_byte() -> None:
    """Issue 12 defect 3, the copy path on its own: a pipe budget too small for any pipe,
    so every byte is copied through user space. 8 pairs, 2 MiB each way, half-close: every
    byte arrives in order, each pair ends with EOF and exact counts, no pipe is created."""
    assert RelayEngine is not None
    pairs, size = 8, 2 << 20
    outer, inner = _engine_pairs(pairs)
    with RelayEngine(workers=2, pipe_budget=1) as engine:
        for i, (fd_a, fd_b) in enumerate(inner):
            engine.add(fd_a, fd_b, i)
        report = _exchange(engine, outer, size)
    assert report == {
        "intact": 2 * pairs,
        "ends": ["EOF"],
        "counted": 2 * pairs * size,
        "copied": 2 * pairs * size,
        "pipe_errors": 0,
        "pipes": 0,
    }


@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="the splice engine (the asyncio path has no pipes)")
def test_engine_without_descriptors_copies_instead_of_resetting() -> None:
    """Issue 12 defect 3: when pipe2() fails with EMFILE (no descriptor left), the engine
    relays through a user-space copy instead of resetting the pair. 32 pairs, 1 MiB each
    way, in a process whose descriptor table is full: every byte arrives, every pair ends
    with a clean EOF, and the engine counts the copied bytes and the pipe2() failures."""
    pairs, size = 32, 1 << 20
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _ENGINE_WITHOUT_DESCRIPTORS,
            str(pairs),
            str(size),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd="/",
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["full"], "the descriptor table was not full"
    assert report["ends"] == ["EOF"], report
    assert report["intact"] == 2 * pairs, report
    assert report["counted"] == 2 * pairs * size, report
    # Pairs that end free their descriptors, and later steps get pipes again: part of the
    # bytes is copied, part spliced.
    assert report["copied"] >= size, report
    assert report["pipe_errors"] > 0, report


# --- the pipe quota ----------------------------------------------------------------------------


def _read_proc_int(path: str) -> int:
    return int(Path(path).read_text().split()[0])


def _pipes_of(pid: int) -> list[tuple[int, int]]:
    """(capacity, bytes queued) of every pipe process pid holds, each pipe once: the test
    (root) opens the pipe through /proc/<pid>/fd, which reaches the same pipe."""
    seen: set[str] = set()
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if not target.startswith("pipe:") or target in seen:
                continue
            fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # closed meanwhile
            continue
        seen.add(target)
        try:
            capacity = fcntl.fcntl(fd, F_GETPIPE_SZ)
            queued = struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0"))[0]
        finally:
            os.close(fd)
        found.append((capacity, queued))
    return found


def _nobody_or_skip() -> pwd.struct_passwd:
    """The user nobody, whose pipe quota the test may fill: skip when it does not exist,
    setpriv is missing, or another process runs as nobody (it would share the quota)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid:
                pytest.skip("another process runs as nobody and shares its pipe quota")
    return nobody


def _socks5_connect(proxy: tuple[str, int], dest: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + struct.pack("!H", dest[1]))
    reply = b""
    while len(reply) < 12:
        chunk = sock.recv(12 - len(reply))
        assert chunk, f"the proxy closed after {reply!r}"
        reply += chunk
    assert reply[:2] == b"\x05\x00" and reply[3] == 0, reply
    sock.setblocking(False)
    return sock


def _push_until_blocked(socks: list[socket.socket], seconds: float) -> None:
    """Send on every socket until none of them takes a byte more (their relays are full),
    for at most ``seconds``: the proxy's buffers towards a reader that never reads keep
    growing slowly, but its pipes are full within the first second."""
    chunk = bytes(262144)
    deadline = time.monotonic() + seconds
    idle_rounds = 0
    while idle_rounds < 3 and time.monotonic() < deadline:
        moved = 0
        for sock in socks:
            with contextlib.suppress(BlockingIOError):
                while True:
                    moved += sock.send(chunk)
        idle_rounds = idle_rounds + 1 if moved == 0 else 0
        time.sleep(0.1)


@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="the splice engine (the asyncio path has no pipes)")
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the proxy as user nobody (needs root to switch)")
def test_pipes_stay_within_the_user_quota_and_grow_back(tmp_path: Path) -> None:
    """Issue 16 defect 4: the proxy as an unprivileged user (nobody: no CAP_SYS_RESOURCE, so
    /proc/sys/fs/pipe-user-pages-soft applies) with more relays holding full pipes than the
    quota holds. The engine's pipes stay within its share of the quota (75 %), so the kernel
    never falls back to 8 KiB pipes; the relays past the budget copy instead. After the
    burst, a new relay gets a full-size pipe again (pipe-max-size, 1 MiB by default): the
    size recovers instead of staying halved for good."""
    _nobody_or_skip()
    soft_pages = _read_proc_int("/proc/sys/fs/pipe-user-pages-soft")
    max_size = _read_proc_int("/proc/sys/fs/pipe-max-size")
    quota = soft_pages * os.sysconf("SC_PAGESIZE")
    if soft_pages == 0 or quota // max_size > 128:
        pytest.skip(f"pipe quota {quota} bytes: no quota, or too large to fill in a test")
    burst = quota // max_size + 16
    log = tmp_path / "proxy.log"
    problems = []
    with (
        proxy_process(log, user="nobody") as (proxy, pid),
        socket.create_server(("127.0.0.1", 0), backlog=256) as hold,
    ):
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: tiny windows
        clients, held = [], []
        try:
            for _ in range(burst):
                clients.append(_socks5_connect(proxy, hold.getsockname()))
                held.append(hold.accept()[0])  # never read: the relays fill up
            _push_until_blocked(clients, 3.0)
            pipes = sorted(_pipes_of(pid))
            total = sum(capacity for capacity, _ in pipes)
            # 75 % of the quota, plus the pipes two workers may size at the same moment.
            if total > quota * 3 // 4 + 2 * max_size:
                problems.append(f"the burst's pipes hold {total} bytes, the quota is {quota}")
            if pipes[0][0] < 65536:
                problems.append(f"the kernel gave {pipes[0][0]}-byte pipes: over the quota")
        finally:
            for sock in clients + held:
                sock.close()
        # The relays end (reset: the destination closed with bytes unread) and give their
        # pipes back.
        deadline = time.monotonic() + 10
        while log.read_text(errors="replace").count(" end=") < burst and time.monotonic() < deadline:
            time.sleep(0.05)
        client = _socks5_connect(proxy, hold.getsockname())
        server, _ = hold.accept()
        with client, server:
            _push_until_blocked([client], 2.0)
            # Relay pipes with bytes in them (libuv keeps a one-byte pipe of its own).
            in_use = [capacity for capacity, queued in _pipes_of(pid) if queued > 4096]
            if not in_use or max(in_use) != max_size:
                problems.append(f"after the burst a new relay got a pipe of {in_use} bytes, not {max_size}")
    assert not problems, problems


#: As another user: a burst of pairs whose destinations never read, with no pipe budget
#: (only the kernel's quota limits the pipes), then, once every pair ended and
#: PIPE_RETRY_MS passed, one more pair. Prints the pipe sizes seen as JSON.
_ENGINE_AFTER_REFUSALS = """
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
from test_fd_limits import _engine_pairs, _pipes_of, _push_until_blocked
from socks6fast.dataplane._relay_c import RelayEngine

burst = int(sys.argv[1])
engine = RelayEngine(workers=1, pipe_budget=0)
outer, inner = _engine_pairs(burst)
for i, (fd_a, fd_b) in enumerate(inner):
    engine.add(fd_a, fd_b, i)
for client, _ in outer:
    client.setblocking(False)
_push_until_blocked([client for client, _ in outer], 3.0)
during = sorted(capacity for capacity, queued in _pipes_of(os.getpid()) if queued > 4096)
for client, server in outer:
    client.close()
    server.close()
deadline = time.monotonic() + 10
ended = 0
while ended < burst and time.monotonic() < deadline:
    ended += len(engine.drain())
    time.sleep(0.01)
time.sleep(1.5)  # past PIPE_RETRY_MS
outer, inner = _engine_pairs(1)
engine.add(*inner[0], burst)
outer[0][0].setblocking(False)
_push_until_blocked([outer[0][0]], 2.0)
after = [capacity for capacity, queued in _pipes_of(os.getpid()) if queued > 4096]
engine.close()
print(json.dumps({"during": during, "after": after}))
"""


@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="the splice engine (the asyncio path has no pipes)")
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the engine as user nobody (needs root to switch)")
def test_pipe_size_recovers_after_the_kernel_refused_it() -> None:
    """Issue 16 defect 4, the kernel's side: with no pipe budget (as when other processes of
    the same user fill the quota), a burst past the quota makes the kernel refuse to grow
    pipes (and hand out 8 KiB ones). The engine asks for half while refused, but not for
    good: after PIPE_RETRY_MS (1 s) a new pair gets a full-size pipe again (before: every
    later pipe stayed at 64 KiB)."""
    nobody = _nobody_or_skip()
    soft_pages = _read_proc_int("/proc/sys/fs/pipe-user-pages-soft")
    max_size = _read_proc_int("/proc/sys/fs/pipe-max-size")
    quota = soft_pages * os.sysconf("SC_PAGESIZE")
    if soft_pages == 0 or quota // max_size > 128:
        pytest.skip(f"pipe quota {quota} bytes: no quota, or too large to fill in a test")
    command = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        sys.executable,
        "-c",
        _ENGINE_AFTER_REFUSALS,
        str(quota // max_size + 16),
        str(Path(__file__).parent),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd="/", check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert min(report["during"]) < max_size, report  # the kernel did refuse during the burst
    assert report["after"] == [max_size], report


def test_descriptor_plan_keeps_the_dtls_channels_out_of_the_connections_share() -> None:
    """Probe 19 F4: DTLS connections without an association yet hold a socket each; their cap
    (``DTLSPorts.unmapped_total``) is kept in the reserve, so max_connections is lowered by
    what they may hold instead of the two sharing the same descriptors."""
    from socks6fast.dataplane.resources import plan_descriptors  # noqa: PLC0415

    without = plan_descriptors(10_000, 1024, 1024, in_use=30, splice=False)
    with_dtls = plan_descriptors(10_000, 1024, 1024, in_use=30, splice=False, dtls_channels=200)
    assert with_dtls.reserved == without.reserved + 200
    assert with_dtls.max_connections == (1024 - with_dtls.reserved) // 2 < without.max_connections
    # What the plan hands out never exceeds the limit.
    assert with_dtls.reserved + 2 * with_dtls.max_connections <= 1024
