"""Data plane tests: the C splice engine and the asyncio path, on asyncio and uvloop loops.

Every Relayer test runs on each path ("splice" = socks6fast.dataplane._relay_c.RelayEngine;
"copy" = the same engine with no pipe to be had, copying through user space; "asyncio" =
protocol fallback) and both event loops. The endpoints are real TCP
sockets over 127.0.0.1 driven by blocking calls in threads; the relay in between is
the code under test. Topology of every pair::

    client_end <-TCP-> proxy_client ==relay== proxy_remote <-TCP-> remote_end
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import fcntl
import gc
import hashlib
import importlib
import logging
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from socks6fast.constants import RelayEnd
from socks6fast.dataplane import engine as relay_mod
from socks6fast.dataplane.engine import ENGINE_AVAILABLE, RelayResult
from socks6fast.dataplane.relayer import Relayer

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

IS_LINUX = sys.platform.startswith("linux")
LINGER_RESET = struct.pack("ii", 1, 0)
TIMEOUT = 10.0  # seconds: bound on every blocking endpoint call

engine_only = [
    pytest.mark.linux_only,
    pytest.mark.c_extension,
    pytest.mark.skipif(not ENGINE_AVAILABLE, reason="splice engine not available"),
]


# -- fixtures --------------------------------------------------------------------


def _loop_params() -> list[Any]:
    params: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    params.append(
        pytest.param(
            uvloop.new_event_loop if uvloop is not None else None,
            id="uvloop",
            marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed"),
        )
    )
    return params


@pytest.fixture(params=_loop_params())
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    """Event loop implementation under test."""
    factory: LoopFactory = request.param
    return factory


@pytest.fixture(
    params=[pytest.param("splice", marks=engine_only), pytest.param("copy", marks=engine_only), "asyncio"]
)
def path(request: pytest.FixtureRequest) -> str:
    """Data path under test: "splice" (C engine), "copy" (the C engine with no pipe to be
    had, so it copies through user space: issue 12 defect 3; it reports "splice") or
    "asyncio"."""
    value: str = request.param
    return value


def reported(path: str) -> str:
    """The relay path a RelayResult names for a path under test."""
    return "splice" if path == "copy" else path


def run(loop_factory: LoopFactory, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, 30.0))


def new_relayer(path: str, **kwargs: Any) -> Relayer:
    if path == "copy":
        kwargs["pipe_budget"] = 1  # no pipe fits: every byte is copied
    relayer = Relayer(asyncio.get_running_loop(), use_engine=(path != "asyncio"), workers=2, **kwargs)
    assert relayer.path == reported(path)
    return relayer


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return a, b


def make_legs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(client_end, proxy_client, proxy_remote, remote_end)."""
    client_end, proxy_client = tcp_pair()
    proxy_remote, remote_end = tcp_pair()
    return client_end, proxy_client, proxy_remote, remote_end


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def sees_close(sock: socket.socket) -> str:
    """Wait for the peer to go away: "eof" or "reset"."""
    try:
        rest = recv_all(sock)
    except ConnectionResetError:
        return "reset"
    assert rest == b""
    return "eof"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_fds(expected: int, patience: float = 3.0) -> int:
    """uvloop closes handles a loop turn or two later: poll (bounded) for the count."""
    deadline = time.monotonic() + patience
    while True:
        gc.collect()
        count = fd_count()
        if count <= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.01)


# -- module surface --------------------------------------------------------------


def test_relay_module_surface() -> None:
    assert relay_mod.ENGINE_AVAILABLE is (relay_mod.RelayEngine is not None)
    assert [int(e) for e in RelayEnd] == [0, 1, 2, 3, 4]
    result = RelayResult(1, 2, RelayEnd.EOF, "splice")
    with pytest.raises(AttributeError):
        result.end = RelayEnd.RESET  # type: ignore[misc]


def test_relay_module_imports_no_asyncio() -> None:
    root = str(Path(__file__).parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import socks6fast.dataplane.engine; "
        "assert 'asyncio' not in sys.modules and 'socket' not in sys.modules"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd="/")


@pytest.mark.skipif(not IS_LINUX or bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS")), reason="Linux build")
@pytest.mark.c_extension
def test_engine_loaded_on_linux() -> None:
    assert ENGINE_AVAILABLE
    relay_c = importlib.import_module("socks6fast.dataplane._relay_c")
    # The C enum values mirror this IntEnum: check the mapping drain() reports with.
    assert relay_c._END_MEMBERS == tuple(RelayEnd)


# -- RelayEngine directly --------------------------------------------------------


def _wait_drain(engine: Any, n: int) -> list[tuple[int, int, int, RelayEnd]]:
    out: list[tuple[int, int, int, RelayEnd]] = []
    deadline = time.monotonic() + TIMEOUT
    while len(out) < n and time.monotonic() < deadline:
        select.select([engine.fileno()], [], [], 0.5)
        out += engine.drain()
    return out


@pytest.mark.parametrize("_", [0], ids=["engine"])
@pytest.mark.linux_only
@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="splice engine not available")
def test_engine_api(_: int) -> None:
    assert relay_mod.RelayEngine is not None
    before = fd_count()
    engine = relay_mod.RelayEngine(workers=2, idle_timeout=0.0)
    assert engine.workers == 2 and engine.active == 0
    with pytest.raises(ValueError):
        relay_mod.RelayEngine(workers=-1)
    with pytest.raises(ValueError):
        relay_mod.RelayEngine(idle_timeout=-1.0)
    with pytest.raises(ValueError):
        relay_mod.RelayEngine(pipe_size=100)

    c, pc, pr, r = make_legs()
    with pytest.raises(ValueError):
        engine.add(pc.fileno(), pc.fileno(), 1)
    # An fd that is not open: OSError, and the caller keeps its other fd.
    spare, spare_peer = tcp_pair()
    dead = spare.detach()
    os.close(dead)
    with pytest.raises(OSError):
        engine.add(pc.fileno(), dead, 1)
    spare_peer.close()

    engine.add(pc.detach(), pr.detach(), 1)
    with pytest.raises(ValueError):
        engine.add(c.fileno(), r.fileno(), 1)  # ident 1 is in use
    assert engine.active == 1
    c.sendall(b"ping")
    assert recv_exact(r, 4) == b"ping"
    r.sendall(b"pong!")
    assert recv_exact(c, 5) == b"pong!"
    engine.cancel(12345)  # unknown ident: ignored
    engine.cancel(1)
    assert sees_close(c) == "reset" and sees_close(r) == "reset"  # a cut: never a clean FIN
    assert _wait_drain(engine, 1) == [(1, 4, 5, RelayEnd.SHUTDOWN)]
    assert engine.active == 0
    engine.cancel(1)  # already drained: ignored
    c.close()
    r.close()

    c, pc, pr, r = make_legs()
    engine.add(pc.detach(), pr.detach(), 2)
    engine.close()
    engine.close()  # idempotent
    assert engine.drain() == [(2, 0, 0, RelayEnd.SHUTDOWN)]
    assert engine.active == 0 and engine.workers == 0
    with pytest.raises(ValueError):
        engine.fileno()
    with pytest.raises(ValueError):
        engine.add(c.fileno(), r.fileno(), 3)
    assert sees_close(c) == "reset" and sees_close(r) == "reset"
    c.close()
    r.close()
    del engine
    assert fd_count() == before


@pytest.mark.linux_only
@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="splice engine not available")
def test_engine_many_pairs_small_pipes() -> None:
    """64 KiB pipes (request below the minimum), 40 concurrent pairs over 2 workers."""
    assert relay_mod.RelayEngine is not None
    before = fd_count()
    with relay_mod.RelayEngine(workers=2, pipe_size=4096) as engine:
        legs = [make_legs() for _ in range(40)]
        for i, (_, pc, pr, _) in enumerate(legs):
            engine.add(pc.detach(), pr.detach(), i)
        payload = os.urandom(300_000)

        def talk(c: socket.socket, r: socket.socket, i: int) -> None:
            c.sendall(payload[:i] + payload)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(r) == payload[:i] + payload
            r.sendall(payload[: 1000 + i])
            r.close()
            assert recv_all(c) == payload[: 1000 + i]
            c.close()

        threads = [threading.Thread(target=talk, args=(c, r, i)) for i, (c, _, _, r) in enumerate(legs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        results = sorted(_wait_drain(engine, len(legs)))
        assert results == [(i, 300_000 + i, 1000 + i, RelayEnd.EOF) for i in range(len(legs))]
    assert fd_count() == before


# -- Relayer, both paths ---------------------------------------------------------

BLOCK = os.urandom((1 << 20) + 4099)  # odd length: tiles never line up with send chunks
BIG = 64 << 20


@pytest.fixture(scope="module")
def big_payloads() -> tuple[bytes, bytes, str, str]:
    up = (BLOCK * (BIG // len(BLOCK) + 1))[:BIG]
    down = up[::-1]
    return up, down, hashlib.sha1(up).hexdigest(), hashlib.sha1(down).hexdigest()


def _send_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _recv_digest(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha1()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(view):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def test_integrity_64mib_each_way(
    path: str, loop_factory: LoopFactory, big_payloads: tuple[bytes, bytes, str, str]
) -> None:
    """64 MiB client->remote and 64 MiB remote->client at the same time; hashes match."""
    up, down, up_digest, down_digest = big_payloads

    async def main() -> RelayResult:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        got = await asyncio.gather(
            asyncio.to_thread(_send_and_shut, c, up),
            asyncio.to_thread(_send_and_shut, r, down),
            asyncio.to_thread(_recv_digest, r),
            asyncio.to_thread(_recv_digest, c),
        )
        assert got[2] == (BIG, up_digest)
        assert got[3] == (BIG, down_digest)
        result = await task
        c.close()
        r.close()
        await relayer.close()
        return result

    assert run(loop_factory, main()) == RelayResult(BIG, BIG, RelayEnd.EOF, reported(path))  # type: ignore[arg-type]


@pytest.mark.parametrize("first", ["client", "remote"])
def test_half_close(path: str, loop_factory: LoopFactory, first: str) -> None:
    """One side shuts down writing; the other still answers, then closes. Exact counts."""

    async def main() -> RelayResult:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        asker, answerer = (c, r) if first == "client" else (r, c)

        def exchange() -> None:
            asker.sendall(b"request")
            asker.shutdown(socket.SHUT_WR)
            assert recv_all(answerer) == b"request"  # EOF arrived after the request
            answerer.sendall(b"answer!!")
            answerer.close()
            assert recv_all(asker) == b"answer!!"
            asker.close()

        await asyncio.to_thread(exchange)
        result = await task
        await relayer.close()
        return result

    result = run(loop_factory, main())
    counts = (7, 8) if first == "client" else (8, 7)
    assert result == RelayResult(*counts, RelayEnd.EOF, reported(path))  # type: ignore[arg-type]


@pytest.mark.parametrize("culprit", ["client", "remote"])
def test_reset_ends_pair(path: str, loop_factory: LoopFactory, culprit: str) -> None:
    """SO_LINGER 0 close on one side: the relay ends (RESET) and resets the other side."""

    async def main() -> tuple[RelayResult, str]:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        bad, other = (c, r) if culprit == "client" else (r, c)

        def scenario() -> str:
            c.sendall(b"abc")
            assert recv_exact(r, 3) == b"abc"
            reset_close(bad)
            seen = sees_close(other)
            other.close()
            return seen

        seen = await asyncio.to_thread(scenario)
        result = await task
        await relayer.close()
        return result, seen

    result, seen = run(loop_factory, main())
    assert result.end is RelayEnd.RESET
    assert result.bytes_client_to_remote == 3
    assert seen == "reset"


def test_idle_timeout(path: str, loop_factory: LoopFactory) -> None:
    """Silent both ways for the idle timeout: both legs are reset (a cut, issue 16 defect 3)."""

    async def main() -> tuple[RelayResult, float]:
        relayer = new_relayer(path, idle_timeout=0.3)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))

        def scenario() -> float:
            c.sendall(b"x")
            assert recv_exact(r, 1) == b"x"
            start = time.monotonic()
            assert sees_close(c) == "reset"  # the proxy cut us
            assert sees_close(r) == "reset"
            c.close()
            r.close()
            return time.monotonic() - start

        waited = await asyncio.to_thread(scenario)
        result = await task
        await relayer.close()
        return result, waited

    result, waited = run(loop_factory, main())
    assert result == RelayResult(1, 0, RelayEnd.IDLE_TIMEOUT, reported(path))  # type: ignore[arg-type]
    assert 0.2 < waited < 3.0


@pytest.mark.conformance("CMD-03")
def test_initial_data_is_relayed_first(path: str, loop_factory: LoopFactory) -> None:
    """Bytes the control plane already read (CMD-03 false start) go first and are counted."""

    async def main() -> RelayResult:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr, to_remote=b"early ", to_client=b"hi "))

        def scenario() -> None:
            c.sendall(b"late")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(r) == b"early late"
            r.sendall(b"there")
            r.close()
            assert recv_all(c) == b"hi there"
            c.close()

        await asyncio.to_thread(scenario)
        result = await task
        await relayer.close()
        return result

    assert run(loop_factory, main()) == RelayResult(10, 8, RelayEnd.EOF, reported(path))  # type: ignore[arg-type]


# -- integrity in kernel edge cases (issue 16) -------------------------------------

SIOCATMARK = 0x8905  # <asm-generic/sockios.h>; the socket module does not export it


def at_urgent_mark(sock: socket.socket) -> bool:
    """sockatmark(3): the next byte to read is the urgent mark."""
    return bool(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCATMARK, b"\0" * 4))[0])


def unacknowledged(sock: socket.socket) -> int:
    """SIOCOUTQ (= TIOCOUTQ): bytes queued on a TCP socket and not yet acknowledged."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Every byte the peer delivered, and how the stream ended: "eof" or "reset"."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


@pytest.mark.skipif(not IS_LINUX, reason="Linux urgent-data semantics (SIOCATMARK)")
@pytest.mark.parametrize("fin", [True, False], ids=["fin", "no-fin"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_urgent_data_keeps_every_in_band_byte(
    path: str, loop_factory: LoopFactory, direction: str, fin: bool
) -> None:
    """Issue 16 defect 1: 1000 bytes, one urgent byte (MSG_OOB), 1000 more, then a FIN (or
    not yet). Direct TCP delivers the 2000 in-band bytes, and the urgent byte at its mark.

    splice path: the same; the urgent byte is forwarded as urgent (send(MSG_OOB)) right
    after the first 1000 bytes, so the receiver finds it at SIOCATMARK with recv(MSG_OOB).
    asyncio path: the 2000 in-band bytes; the urgent byte is dropped, as documented (the
    transports' recv() steps over it unseen). splice() stops at an urgent mark: before the
    fix the engine delivered 1000 bytes and a clean EOF, or stalled without the FIN.
    """
    head, tail = os.urandom(1000), os.urandom(1000)

    async def main() -> RelayResult:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        sender, receiver = (c, r) if direction == "up" else (r, c)

        def scenario() -> None:
            sender.sendall(head)
            sender.send(b"!", socket.MSG_OOB)
            sender.sendall(tail)
            if fin:
                sender.shutdown(socket.SHUT_WR)
            assert recv_exact(receiver, len(head)) == head
            if path != "asyncio":
                _, _, urgent = select.select([], [], [receiver], TIMEOUT)
                assert urgent, "the urgent byte did not arrive"
                assert at_urgent_mark(receiver)  # right after the first 1000 bytes, as sent
                assert receiver.recv(1, socket.MSG_OOB) == b"!"
            assert recv_exact(receiver, len(tail)) == tail
            if not fin:
                sender.shutdown(socket.SHUT_WR)
            assert recv_all(receiver) == b""  # nothing else in-band: not the urgent byte either
            receiver.close()
            assert recv_all(sender) == b""
            sender.close()

        await asyncio.to_thread(scenario)
        result = await task
        await relayer.close()
        return result

    result = run(loop_factory, main())
    moved = 2001 if path != "asyncio" else 2000  # the urgent byte counts where it is forwarded
    counts = (moved, 0) if direction == "up" else (0, moved)
    assert result == RelayResult(*counts, RelayEnd.EOF, reported(path))  # type: ignore[arg-type]


def test_reset_after_data_delivers_the_data_first(path: str, loop_factory: LoopFactory) -> None:
    """Issue 16 defect 2: a server answers early (4-16 KiB) and resets, its request body
    unread. Direct TCP and the asyncio path delivered 50 of 50 answers whole, the engine
    19-27 (it reset the client before splicing what was in the receive queue). Now 50 of 50
    on both paths: the whole answer, then the reset passed on (never a clean EOF)."""
    rounds = 50
    request = b"POST /upload HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 4000

    async def main() -> list[tuple[bool, str, RelayEnd, int, int]]:
        relayer = new_relayer(path)
        outcomes = []
        for i in range(rounds):
            answer = os.urandom(4096 + (i * 7919) % 12289)  # 4-16 KiB
            c, pc, pr, r = make_legs()
            task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))

            def scenario(
                answer: bytes = answer, c: socket.socket = c, r: socket.socket = r
            ) -> tuple[bytes, str]:
                c.sendall(request)
                recv_exact(r, 100)  # the request line; the body stays unread
                r.sendall(answer)
                reset_close(r)  # what closing with unread bytes does: a reset
                got = read_to_end(c)
                c.close()
                return got

            data, end = await asyncio.to_thread(scenario)
            result = await task
            outcomes.append(
                (data == answer, end, result.end, result.bytes_remote_to_client - len(answer), len(data))
            )
        await relayer.close()
        return outcomes

    outcomes = run(loop_factory, main())
    complete = sum(whole for whole, *_ in outcomes)
    assert complete == rounds, f"{complete} of {rounds} answers complete; first ones: {outcomes[:5]}"
    assert {(end, reason, extra) for _, end, reason, extra, _ in outcomes} == {("reset", RelayEnd.RESET, 0)}


def test_reset_after_data_waits_for_a_slow_reader(path: str, loop_factory: LoopFactory) -> None:
    """Issue 16 defect 2 under back-pressure: the remote sends 256 KiB, the proxy takes all
    of it (acknowledged: it sits in the relay's pipe or buffers and the client's socket
    queues), the remote resets, and only then does the client start reading. Every byte the
    proxy acknowledged reaches the client, and then the reset: the relay holds the reset
    back until the client has acknowledged the bytes queued to it."""
    answer = os.urandom(256 << 10)

    async def main() -> tuple[bytes, str, RelayResult]:
        relayer = new_relayer(path)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))

        def scenario() -> tuple[bytes, str]:
            r.sendall(answer)
            deadline = time.monotonic() + TIMEOUT
            while unacknowledged(r) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert unacknowledged(r) == 0, "the proxy did not take the whole answer"
            reset_close(r)
            time.sleep(0.3)  # the relay meets the reset before the client reads a byte
            got = read_to_end(c)
            c.close()
            return got

        data, end = await asyncio.to_thread(scenario)
        result = await task
        await relayer.close()
        return data, end, result

    data, end, result = run(loop_factory, main())
    assert (len(data), end) == (len(answer), "reset") and data == answer
    assert result == RelayResult(0, len(answer), RelayEnd.RESET, reported(path))  # type: ignore[arg-type]


def _push_until_cut(sock: socket.socket, size: int) -> str:
    """Send ``size`` bytes (more than the path holds); how the proxy's cut showed here."""
    try:
        sock.sendall(bytes(size))
    except OSError as exc:
        return type(exc).__name__
    return "sent"


@pytest.mark.parametrize("cut", ["idle", "cancel", "close"])
def test_cut_resets_both_legs(path: str, loop_factory: LoopFactory, cut: str) -> None:
    """Issue 16 defect 3 and issue 12 defect 4: a relay the proxy cuts (idle timeout,
    cancellation, the relayer closed as at the drain deadline) while a transfer is
    unfinished, bytes in flight, ends with a reset on both legs. It ended with FIN, so the
    remote took the cut-off transfer for a complete one (clean EOF)."""
    size = 64 << 20

    async def main() -> tuple[str, int, str, RelayEnd | None]:
        relayer = new_relayer(path, idle_timeout=0.5 if cut == "idle" else 0.0)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        # The client pushes more than the path holds; the remote reads nothing yet.
        push = asyncio.ensure_future(asyncio.to_thread(_push_until_cut, c, size))
        await asyncio.sleep(0.3)
        end: RelayEnd | None = None
        if cut == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            if cut == "close":
                await relayer.close()
            end = (await task).end  # idle: ~0.5 s after the buffers filled up
        remote_got, remote_end = await asyncio.to_thread(read_to_end, r)
        pushed = await push
        c.close()
        r.close()
        await relayer.close()
        return remote_end, len(remote_got), pushed, end

    remote_end, received, pushed, end = run(loop_factory, main())
    assert remote_end == "reset", f"the remote saw a clean EOF after {received} of {size} bytes"
    assert 0 < received < size
    assert pushed in ("ConnectionResetError", "BrokenPipeError")
    assert end is {"idle": RelayEnd.IDLE_TIMEOUT, "close": RelayEnd.SHUTDOWN, "cancel": None}[cut]


@pytest.mark.linux_only
@pytest.mark.c_extension
@pytest.mark.skipif(
    not ENGINE_AVAILABLE, reason="splice engine not available (the asyncio path has no workers)"
)
def test_dead_worker_leaves_the_rotation(loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16 defect 6: worker 0's epoll_wait fails for good (the engine's test hook points
    its epoll fd at an eventfd). Its pair ends (ERROR, reset), the failure is logged once,
    and every new connection goes to the other worker. Before, add() kept picking the dead
    worker (least loaded, it had no pair left) and each new connection failed."""

    async def main() -> tuple[list[RelayResult], list[RelayResult], list[tuple[int, int]], int]:
        relayer = new_relayer("splice")  # two workers
        engine = relayer._engine
        assert engine is not None
        legs = [make_legs() for _ in range(2)]  # one pair per worker (least loaded, then round robin)
        first = [asyncio.ensure_future(relayer.relay_sockets(pc, pr)) for _, pc, pr, _ in legs]

        def echo(c: socket.socket, r: socket.socket) -> None:
            c.sendall(b"ping")
            assert recv_exact(r, 4) == b"ping"

        for c, _, _, r in legs:
            await asyncio.to_thread(echo, c, r)
        engine._break_worker_epoll(0)
        done, _ = await asyncio.wait(first, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ended = [task.result() for task in done]
        # The survivor relays on; 20 new connections all go to worker 1.
        await asyncio.to_thread(echo, *legs[1][0::3])
        later = []
        for _ in range(20):
            c, pc, pr, r = make_legs()
            task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
            await asyncio.to_thread(echo, c, r)
            c.close()
            r.close()
            later.append(await task)
        for c, _, _, r in legs:
            c.close()
            r.close()
        ended += await asyncio.gather(*(t for t in first if t not in done))
        dead = engine.dead_workers()
        live = engine.live_workers
        await relayer.close()
        return ended, later, dead, live

    with caplog.at_level(logging.WARNING, logger="socks6fast.relay"):
        ended, later, dead, live = run(loop_factory, main())
    assert [r.end for r in ended] == [RelayEnd.ERROR, RelayEnd.EOF]
    assert [r.end for r in later] == [RelayEnd.EOF] * 20
    assert (dead, live) == ([(0, errno.EINVAL)], 1)
    lines = [rec.getMessage() for rec in caplog.records if "relay worker 0" in rec.getMessage()]
    assert len(lines) == 1 and "1 of 2 workers" in lines[0], caplog.text


@pytest.mark.linux_only
@pytest.mark.c_extension
@pytest.mark.skipif(not ENGINE_AVAILABLE, reason="splice engine not available")
def test_no_worker_left_falls_back_to_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16 defect 6, the last worker: with every engine worker dead, add() refuses
    (OSError EIO) and the Relayer relays new connections on the asyncio path instead."""

    async def main() -> tuple[RelayResult, str, list[tuple[int, int]]]:
        relayer = new_relayer("splice")
        engine = relayer._engine
        assert engine is not None
        for index in range(engine.workers):
            engine._break_worker_epoll(index)
        c, pc, pr, r = make_legs()
        deadline = time.monotonic() + TIMEOUT
        while relayer.path == "splice" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the loop learns of the deaths from the engine's eventfd
        c2, pc2, pr2, r2 = make_legs()
        with pytest.raises(OSError):
            engine.add(pc2.fileno(), pr2.fileno(), 999)  # no worker left: the fds stay ours
        for sock in (c2, pc2, pr2, r2):
            sock.close()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))

        def exchange() -> None:
            c.sendall(b"still relayed")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(r) == b"still relayed"
            r.close()
            assert recv_all(c) == b""
            c.close()

        await asyncio.to_thread(exchange)
        result = await task
        path = relayer.path
        dead = engine.dead_workers()
        await relayer.close()
        return result, path, dead

    with caplog.at_level(logging.WARNING, logger="socks6fast.relay"):
        result, path, dead = run(asyncio.new_event_loop, main())
    assert result == RelayResult(13, 0, RelayEnd.EOF, "asyncio")
    assert path == "asyncio" and [index for index, _ in dead] == [0, 1]
    assert "0 of 2 workers keep relaying, new connections use the asyncio path" in caplog.text


SCENARIOS = ["normal", "reset", "idle", "close", "cancel"]


@pytest.mark.skipif(not IS_LINUX, reason="counts /proc/self/fd")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_fd_leak(path: str, loop_factory: LoopFactory, scenario: str) -> None:
    """20 pairs per scenario; every fd the relay took is closed afterwards."""
    pairs = 20

    async def main() -> tuple[int, int, list[RelayEnd]]:
        # Warm-up pair: uvloop (libuv) opens a per-loop /dev/null reserve fd with its
        # first stream, and the default executor starts its threads; neither is a leak.
        warm = new_relayer(path)
        c, pc, pr, r = make_legs()
        warm_task = asyncio.ensure_future(warm.relay_sockets(pc, pr))
        c.close()
        r.close()
        await warm_task
        await warm.close()
        before = await wait_fds(0, patience=0.05)
        relayer = new_relayer(path, idle_timeout=0.2 if scenario == "idle" else 0.0)
        legs = [make_legs() for _ in range(pairs)]
        tasks = [asyncio.ensure_future(relayer.relay_sockets(pc, pr)) for _, pc, pr, _ in legs]

        def drive() -> None:
            for c, _, _, r in legs:
                c.sendall(b"ping")
                assert recv_exact(r, 4) == b"ping"
                if scenario == "normal":
                    c.close()
                    r.close()
                elif scenario == "reset":
                    reset_close(r)
                    sees_close(c)
                    c.close()

        await asyncio.to_thread(drive)
        ends: list[RelayEnd] = []
        if scenario == "close":
            await relayer.close()
        if scenario == "cancel":
            for task in tasks:
                task.cancel()
            for task in tasks:
                with pytest.raises(asyncio.CancelledError):
                    await task
        else:
            ends = [(await task).end for task in tasks]
        if scenario in ("idle", "close", "cancel"):

            def closed_by_proxy() -> None:
                for c, _, _, r in legs:
                    assert sees_close(c) == "reset"  # cuts reset both legs
                    assert sees_close(r) == "reset"
                    c.close()
                    r.close()

            await asyncio.to_thread(closed_by_proxy)
        await relayer.close()
        return before, await wait_fds(before), ends

    before, after, ends = run(loop_factory, main())
    assert after == before
    expected = {
        "normal": RelayEnd.EOF,
        "reset": RelayEnd.RESET,
        "idle": RelayEnd.IDLE_TIMEOUT,
        "close": RelayEnd.SHUTDOWN,
    }
    if scenario != "cancel":
        assert ends == [expected[scenario]] * pairs


def test_closed_relayer_refuses(path: str, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        relayer = new_relayer(path)
        await relayer.close()
        await relayer.close()
        c, pc, pr, r = make_legs()
        with pytest.raises(RuntimeError):
            await relayer.relay_sockets(pc, pr)
        assert pc.fileno() == -1 and pr.fileno() == -1  # ownership was taken: closed
        c.close()
        r.close()

    run(loop_factory, main())


# -- asyncio path specifics ------------------------------------------------------


def test_asyncio_backpressure(loop_factory: LoopFactory) -> None:
    """A remote that does not read: the relay's user-space buffer stays near buffer_size."""
    size = 16 << 20
    buffer_size = 64 * 1024

    async def main() -> RelayResult:
        relayer = Relayer(asyncio.get_running_loop(), use_engine=False, buffer_size=buffer_size)
        c, pc, pr, r = make_legs()
        task = asyncio.ensure_future(relayer.relay_sockets(pc, pr))
        sender = asyncio.ensure_future(asyncio.to_thread(_send_and_shut, c, b"z" * size))
        peak = 0
        for _ in range(30):  # the remote reads nothing for ~0.3 s
            await asyncio.sleep(0.01)
            for relay in relayer._relays:
                transport = relay.remote.transport
                if transport is not None:
                    peak = max(peak, transport.get_write_buffer_size())
        assert not sender.done()  # the sender is blocked: backpressure reached it
        received, _ = await asyncio.to_thread(_recv_digest, r)
        await sender
        assert received == size
        # One read chunk may land on top of a full buffer before pause_writing() acts.
        assert peak <= buffer_size + 512 * 1024
        r.close()
        c.close()
        result = await task
        await relayer.close()
        return result

    assert run(loop_factory, main()) == RelayResult(size, 0, RelayEnd.EOF, "asyncio")


def _make_tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = tmp / "cert.pem"
    key_file = tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return _make_tls(tmp_path_factory.mktemp("tls"))


class _Holder(asyncio.Protocol):
    """Stands in for the server's control-plane protocol until the relay takes over."""

    def __init__(self) -> None:
        self.made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()
        self.buffered = b""  # read before the hand-off: the relay's to_remote / to_client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.made.set_result(self.transport)

    def data_received(self, data: bytes) -> None:
        # uvloop starts reading right after connection_made(), so pausing there is not
        # enough: keep what arrives and stop reading until the relay takes over.
        self.buffered += data
        self.transport.pause_reading()


@pytest.mark.parametrize("remote_as", ["socket", "transport"])
def test_relay_transports_tls_client_leg(
    loop_factory: LoopFactory, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], remote_as: str
) -> None:
    """TLS client leg, server-speaks-first remote (banner waiting before the hand-off).

    The remote's banner must reach the client; the remote then answers and closes, and
    the TLS leg (which cannot half-close) is closed after the answer is flushed.
    """
    server_ctx, client_ctx = tls_contexts

    async def main() -> RelayResult:
        loop = asyncio.get_running_loop()
        relayer = Relayer(loop, use_engine=False)
        holder = _Holder()
        server = await loop.create_server(lambda: holder, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port))
        tls_client_fut = asyncio.ensure_future(
            asyncio.to_thread(client_ctx.wrap_socket, raw, server_hostname="localhost")
        )
        client_transport = await holder.made
        tls_client = await tls_client_fut
        tls_client.settimeout(TIMEOUT)
        proxy_remote, remote_end = tcp_pair()
        remote_end.sendall(b"220 hi\r\n")
        await asyncio.sleep(0.05)  # the banner is waiting in proxy_remote before the hand-off
        if remote_as == "socket":
            task = asyncio.ensure_future(relayer.relay_transports(client_transport, proxy_remote))
        else:
            remote_transport, remote_holder = await loop.connect_accepted_socket(_Holder, proxy_remote)
            await asyncio.sleep(0.05)
            task = asyncio.ensure_future(
                relayer.relay_transports(
                    client_transport,
                    remote_transport,
                    to_remote=holder.buffered,
                    to_client=remote_holder.buffered,
                )
            )

        def scenario() -> bytes:
            assert recv_exact(tls_client, 8) == b"220 hi\r\n"
            tls_client.sendall(b"GET /")
            assert recv_exact(remote_end, 5) == b"GET /"
            remote_end.sendall(b"200 OK")
            remote_end.close()
            data = b""
            while chunk := tls_client.recv(100):
                data += chunk
            tls_client.close()
            return data

        assert await asyncio.to_thread(scenario) == b"200 OK"
        result = await task
        server.close()
        await server.wait_closed()
        await relayer.close()
        return result

    assert run(loop_factory, main()) == RelayResult(5, 14, RelayEnd.EOF, "asyncio")


def test_relay_transports_cancel_closes_legs(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        relayer = Relayer(loop, use_engine=False)
        c, pc, pr, r = make_legs()
        t1, h1 = await loop.connect_accepted_socket(_Holder, pc)
        t2, h2 = await loop.connect_accepted_socket(_Holder, pr)
        await asyncio.to_thread(c.sendall, b"hel")
        await asyncio.sleep(0.05)  # let the holder read it: it must become to_remote
        task = asyncio.ensure_future(
            relayer.relay_transports(t1, t2, to_remote=h1.buffered, to_client=h2.buffered)
        )
        await asyncio.to_thread(c.sendall, b"lo")
        assert await asyncio.to_thread(recv_exact, r, 5) == b"hello"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(sees_close, c) == "reset"
        assert await asyncio.to_thread(sees_close, r) == "reset"
        c.close()
        r.close()
        await relayer.close()

    run(loop_factory, main())


def test_relayer_rejects_bad_arguments() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError):
            Relayer(loop, idle_timeout=-1)
        with pytest.raises(ValueError):
            Relayer(loop, buffer_size=10)
        if not ENGINE_AVAILABLE:
            with pytest.raises(RuntimeError):
                Relayer(loop, use_engine=True)

    asyncio.run(main())
