"""Limits per user and per client address (issue 14 item 4), measured on real sockets.

Concurrent connections, new connections per second, and bandwidth (bytes/s each way) per
user and per client address. Bandwidth runs on both data paths: the C splice engine (its
worker threads draw from the C token bucket before each splice) and the asyncio path
(``take`` after each chunk; with ``SOCKS6FAST_NO_EXTENSIONS=1`` the pure-Python bucket).
Everything is on 127.0.0.0/8; 127.0.0.2 is the second client address. Refusals are
Connection not allowed by ruleset (0x02, CMD-06; SOCKS 5 REP 0x02, D26).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_server import RawClient, Sink, cheap_hash, record_for, running_server

from socks6fast.asyncio.server import Server
from socks6fast.config import parse_config
from socks6fast.constants import AddressType, AuthMethod, AuthReplyType, Command, ReplyCode
from socks6fast.dataplane.bandwidth import PyTokenBucket, TokenBucket, default_burst
from socks6fast.dataplane.engine import ENGINE_AVAILABLE
from socks6fast.errors import ConfigError
from socks6fast.proto import codec
from socks6fast.proto.limits import NO_LIMITS, Admission, ConnectionLimiter, Limits
from socks6fast.proto.messages import AuthData, Request
from socks6fast.proto.socks5 import UserPassRequest, encode_userpass_request

RATE = 2_000_000  # bytes per second
DURATION = 3.0  # seconds of a bandwidth run
WINDOW = (0.5, DURATION)  # measured after the first burst (the bucket starts full)
TOLERANCE = 0.10

RELAY_PATHS = [
    pytest.param(
        "splice",
        marks=[
            pytest.mark.c_extension,
            pytest.mark.skipif(not ENGINE_AVAILABLE, reason="splice engine not available"),
        ],
    ),
    pytest.param("asyncio"),
]


def config(limits: dict[str, Any], users: dict[str, str] | None = None, **server: Any) -> Any:
    data: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "handshake_timeout": 5.0, "connect_timeout": 5.0, **server},
        "users": {name: cheap_hash(password) for name, password in (users or {}).items()},
        "limits": limits,
    }
    return parse_config(data)


def start(cfg: Any, path: str) -> Any:
    return running_server(cfg, use_relay_engine=path == "splice")


# --- blocking SOCKS 5 client and bulk peers (threads: the server runs on the test's loop) --


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def socks5_connect(
    proxy: tuple[str, int],
    dest: tuple[str, int],
    user: str | None = None,
    source: str = "127.0.0.1",
) -> tuple[socket.socket, int]:
    """RFC 1928 CONNECT (RFC 1929 password "pw-" + user): the socket and the REP code."""
    sock = socket.create_connection(proxy, timeout=5, source_address=(source, 0))
    if user is None:
        sock.sendall(b"\x05\x01\x00")
        assert _exactly(sock, 2) == b"\x05\x00"
    else:
        sock.sendall(b"\x05\x01\x02")
        assert _exactly(sock, 2) == b"\x05\x02"
        name, password = user.encode(), f"pw-{user}".encode()
        sock.sendall(b"\x01" + bytes([len(name)]) + name + bytes([len(password)]) + password)
        assert _exactly(sock, 2) == b"\x01\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + struct.pack("!H", dest[1]))
    reply = _exactly(sock, 10)
    return sock, reply[1]


class Meter:
    """Bytes received over time, by one receiving end."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[float, int]] = [(0.0, 0)]

    def at(self, t: float) -> int:
        return max(total for when, total in self.marks if when <= t)

    def rate(self) -> float:
        return (self.at(WINDOW[1]) - self.at(WINDOW[0])) / (WINDOW[1] - WINDOW[0])


def send_for(sock: socket.socket, until: float) -> None:
    chunk = b"\0" * 65536
    sock.settimeout(0.1)
    while time.monotonic() < until:
        try:
            sock.send(chunk)
        except (TimeoutError, BlockingIOError):
            continue
        except OSError:
            return


def count_for(sock: socket.socket, meter: Meter, until: float) -> None:
    sock.settimeout(0.1)
    total = 0
    while time.monotonic() < until:
        try:
            data = sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            continue
        except OSError:
            return
        if not data:
            return
        total += len(data)
        meter.marks.append((time.monotonic() - meter.start, total))


class BulkPeer:
    """The destination: for every accepted connection, sends (``send``) and/or counts what
    arrives (``count``) until the run's end; meters by accept order."""

    def __init__(self, *, send: bool, count: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self.send, self.count = send, count
        self.until = 0.0
        self.meters: list[Meter] = []
        self.threads: list[threading.Thread] = []
        self.accepted: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        deadline = time.monotonic() + 9.0  # bounded: no test runs longer
        while time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)
            meter = Meter()
            self.meters.append(meter)
            if self.send:
                self._spawn(send_for, conn, self.until)
            if self.count:
                self._spawn(count_for, conn, meter, self.until)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        self.listener.close()
        # The acceptor may be between accept() and the append: join it first, or a connection
        # it accepts then is never closed (a ResourceWarning in a later test).
        self._acceptor.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()


def run_clients(
    proxy: tuple[str, int],
    peer: BulkPeer,
    users: list[str | None],
    *,
    send: bool,
    count: bool,
    sources: list[str] | None = None,
) -> list[Meter]:
    """Open one connection per entry of ``users`` (from ``sources``, default 127.0.0.1)
    through the proxy, then send and/or count for DURATION seconds on every one at once;
    the client-side meters."""
    until = time.monotonic() + DURATION + 0.3
    peer.until = until
    socks: list[socket.socket] = []
    for user, source in zip(users, sources or ["127.0.0.1"] * len(users), strict=True):
        sock, rep = socks5_connect(proxy, peer.address, user, source)
        assert rep == 0
        socks.append(sock)
    meters = [Meter() for _ in socks]
    threads = []
    for sock, meter in zip(socks, meters, strict=True):
        if send:
            threads.append(threading.Thread(target=send_for, args=(sock, until)))
        if count:
            threads.append(threading.Thread(target=count_for, args=(sock, meter, until)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DURATION + 5)
    for sock in socks:
        sock.close()
    return meters


def within(rate: float, expected: float = RATE) -> bool:
    return abs(rate - expected) <= TOLERANCE * expected


@pytest.fixture
def peers() -> Iterator[list[BulkPeer]]:
    made: list[BulkPeer] = []
    yield made
    for peer in made:
        peer.close()


# --- bandwidth, measured --------------------------------------------------------------------


@pytest.mark.parametrize("path", RELAY_PATHS)
async def test_bandwidth_limit_holds_both_directions(path: str, peers: list[BulkPeer]) -> None:
    """user_upload = user_download = 2 MB/s: 2 MB/s +- 10 % each way over 2.5 s, at the
    receiving end, with both directions busy at once."""
    cfg = config({"user_upload": RATE, "user_download": RATE}, {"alice": "pw-alice"})
    peer = BulkPeer(send=True, count=True)
    peers.append(peer)
    async with start(cfg, path) as server:
        down = await asyncio.to_thread(
            run_clients, server.addresses[0], peer, ["alice"], send=True, count=True
        )
        # "A slowed stream, and a log line": the server logs what `throttled` says every
        # few seconds (the housekeeping loop); the buckets counted the waits.
        limiter = server.context.limits
        assert limiter is not None
        await asyncio.sleep(0.2)  # the relay's end reaches the limiter
        lines = limiter.throttled()
        assert f"limit: user 'alice' upload held to {RATE} bytes/s" in " ".join(lines), lines
        assert f"limit: user 'alice' download held to {RATE} bytes/s" in " ".join(lines), lines
        assert limiter.throttled() == []  # reported once
    up_rate, down_rate = peer.meters[0].rate(), down[0].rate()
    assert within(up_rate), f"upload {up_rate:.0f} B/s, limit {RATE}"
    assert within(down_rate), f"download {down_rate:.0f} B/s, limit {RATE}"


@pytest.mark.parametrize("path", RELAY_PATHS)
async def test_connections_of_one_user_share_the_budget_and_another_user_is_not_slowed(
    path: str, peers: list[BulkPeer]
) -> None:
    """alice's two downloads together get 2 MB/s; bob, with his own 2 MB/s, gets all of it."""
    cfg = config({"user_download": RATE}, {"alice": "pw-alice", "bob": "pw-bob"})
    peer = BulkPeer(send=True, count=False)
    peers.append(peer)
    async with start(cfg, path) as server:
        meters = await asyncio.to_thread(
            run_clients, server.addresses[0], peer, ["alice", "alice", "bob"], send=False, count=True
        )
    alice = meters[0].rate() + meters[1].rate()
    bob = meters[2].rate()
    assert within(alice), f"alice's two connections: {alice:.0f} B/s together, limit {RATE}"
    assert min(meters[0].rate(), meters[1].rate()) > 0.2 * RATE  # both get a share
    assert within(bob), f"bob: {bob:.0f} B/s, his own limit {RATE}"


@pytest.mark.parametrize("path", RELAY_PATHS)
async def test_unlimited_user_is_not_slowed(path: str, peers: list[BulkPeer]) -> None:
    """A user without a limit (carol) next to a limited one relays far above the limit."""
    cfg = config({"users": {"alice": {"download": RATE}}}, {"alice": "pw-alice", "carol": "pw-carol"})
    peer = BulkPeer(send=True, count=False)
    peers.append(peer)
    async with start(cfg, path) as server:
        meters = await asyncio.to_thread(
            run_clients, server.addresses[0], peer, ["alice", "carol"], send=False, count=True
        )
    assert within(meters[0].rate())
    assert meters[1].rate() > 3 * RATE, f"carol: {meters[1].rate():.0f} B/s"


@pytest.mark.parametrize("path", RELAY_PATHS)
async def test_client_address_bandwidth_is_per_address(path: str, peers: list[BulkPeer]) -> None:
    """client_download = 2 MB/s, anonymous: two connections from 127.0.0.1 share 2 MB/s, one
    from 127.0.0.2 (another address) gets its own 2 MB/s."""
    cfg = config({"client_download": RATE})
    peer = BulkPeer(send=True, count=False)
    peers.append(peer)
    async with start(cfg, path) as server:
        meters = await asyncio.to_thread(
            run_clients,
            server.addresses[0],
            peer,
            [None, None, None],
            send=False,
            count=True,
            sources=["127.0.0.1", "127.0.0.1", "127.0.0.2"],
        )
    first = meters[0].rate() + meters[1].rate()
    assert within(first), f"127.0.0.1's two connections: {first:.0f} B/s together, limit {RATE}"
    assert within(meters[2].rate()), f"127.0.0.2: {meters[2].rate():.0f} B/s, its own limit {RATE}"


# --- connection limits ----------------------------------------------------------------------


async def socks6_connect(server: Server, sink: Sink, user: str, source: str = "127.0.0.1") -> RawClient:
    client = await RawClient.connect(server.addresses[0], local_addr=(source, 0))
    auth = AuthData(
        AuthMethod.USERNAME_PASSWORD,
        encode_userpass_request(UserPassRequest(user.encode(), f"pw-{user}".encode())),
    )
    await client.send(
        codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, *sink.address, (auth,)))
    )
    assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
    return client


async def logged(server: Server, text: str) -> None:
    """Wait (bounded) for the one log line of a refused connection: its record's error."""
    async with asyncio.timeout(5):
        while not any(text in record.error for record in server.records):
            await asyncio.sleep(0.01)


@pytest.mark.conformance("CMD-06")
async def test_connection_limit_refuses_the_n_plus_first_and_accepts_after_one_closes() -> None:
    """user_connections = 2 (CMD-06): the third gets 0x02 in SOCKS 6 and REP 0x02 in SOCKS 5,
    with a log line naming the limit; once one closes, the next is let through."""
    cfg = config({"user_connections": 2}, {"alice": "pw-alice"})
    async with Sink() as sink, running_server(cfg) as server:
        first = await socks6_connect(server, sink, "alice")
        assert (await first.operation_reply()).reply_code == ReplyCode.SUCCESS
        second, rep = await asyncio.to_thread(socks5_connect, server.addresses[0], sink.address, "alice")
        assert rep == 0
        third = await socks6_connect(server, sink, "alice")
        assert (await third.operation_reply()).reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        record = await record_for(server, third)
        assert record.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        assert "limit: user 'alice' has 2 connections" in record.error
        refused, rep = await asyncio.to_thread(socks5_connect, server.addresses[0], sink.address, "alice")
        assert rep == 0x02  # RFC 1928: connection not allowed by ruleset
        refused.close()
        await first.close()
        await record_for(server, first)  # the slot is free once the connection ended
        again = await socks6_connect(server, sink, "alice")
        assert (await again.operation_reply()).reply_code == ReplyCode.SUCCESS
        await again.close()
        second.close()
        await third.close()


async def test_connection_rate_refuses_the_burst_beyond() -> None:
    """user_connection_rate = 1, burst 3: three at once pass, the fourth is refused, and one
    second later one more passes."""
    cfg = config({"user_connection_rate": 1, "user_connection_burst": 3}, {"alice": "pw-alice"})
    async with Sink() as sink, running_server(cfg) as server:
        codes = []
        for _ in range(4):
            sock, rep = await asyncio.to_thread(socks5_connect, server.addresses[0], sink.address, "alice")
            codes.append(rep)
            sock.close()
        assert codes == [0, 0, 0, 0x02]
        await logged(server, "limit: user 'alice' opens more than 1 connections per second")
        await asyncio.sleep(1.1)
        sock, rep = await asyncio.to_thread(socks5_connect, server.addresses[0], sink.address, "alice")
        sock.close()
        assert rep == 0


async def test_client_address_limits_count_each_address() -> None:
    """client_connections = 1, anonymous: a second connection from 127.0.0.1 is refused, one
    from 127.0.0.2 (another client address) is not."""
    cfg = config({"client_connections": 1})
    async with Sink() as sink, running_server(cfg) as server:
        proxy = server.addresses[0]
        held, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address)
        assert rep == 0
        refused, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address)
        assert rep == 0x02
        refused.close()
        await logged(server, "limit: client 127.0.0.1 has 1 connection, the most allowed")
        other, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, None, "127.0.0.2")
        assert rep == 0
        other.close()
        held.close()


async def test_per_user_override_replaces_the_default() -> None:
    """[limits.users.bob] connections = 2 beside user_connections = 1."""
    cfg = config(
        {"user_connections": 1, "users": {"bob": {"connections": 2}}},
        {"alice": "pw-alice", "bob": "pw-bob"},
    )
    async with Sink() as sink, running_server(cfg) as server:
        proxy = server.addresses[0]
        opened = []
        for user, expected in (("alice", 0), ("alice", 2), ("bob", 0), ("bob", 0), ("bob", 2)):
            sock, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, user)
            assert rep == expected, (user, rep)
            opened.append(sock)
        for sock in opened:
            sock.close()


async def test_reload_changes_limits_for_new_connections_and_live_bandwidth() -> None:
    """Server.reload (what SIGHUP calls): a raised connection limit lets the next one in, and
    the live connections' bandwidth bucket takes the new rate in place."""
    users = {"alice": "pw-alice"}
    cfg = config({"user_connections": 1, "user_download": RATE}, users)
    async with Sink() as sink, running_server(cfg) as server:
        proxy = server.addresses[0]
        held, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        assert rep == 0
        refused, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        refused.close()
        assert rep == 0x02
        limiter = server.context.limits
        assert limiter is not None and limiter.live("user", "alice") == 1
        bucket = limiter._entries[("user", "alice")].down
        assert bucket is not None and bucket.rate == RATE  # type: ignore[attr-defined]
        server.reload(config({"user_connections": 2, "user_download": 2 * RATE}, users))
        assert bucket.rate == 2 * RATE  # type: ignore[attr-defined]
        second, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        assert rep == 0
        second.close()
        held.close()


@pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc")
async def test_sighup_reload_changes_a_limit(tmp_path: Path) -> None:
    """The real CLI: user_connections = 1 refuses a second connection; the file says 2, a
    SIGHUP, and the second is let through."""
    async with Sink() as sink:
        await _sighup_scenario(sink, tmp_path)


async def _sighup_scenario(sink: Sink, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "proxy.toml"

    def write(connections: int) -> None:
        path.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
            f'[users]\nalice = "{cheap_hash("pw-alice")}"\n'
            f"[limits]\nuser_connections = {connections}\n"
        )

    write(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "socks6fast", "serve", "--config", str(path), "--drain-timeout", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []

        async def wait_for(text: str) -> None:
            async with asyncio.timeout(8):
                while not any(text in line for line in lines):
                    line = await asyncio.to_thread(proc.stderr.readline)  # type: ignore[union-attr]
                    assert line, f"the proxy exited: {lines}"
                    lines.append(line.decode())

        await wait_for("listening")
        proxy = ("127.0.0.1", port)
        held, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        assert rep == 0
        refused, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        refused.close()
        assert rep == 0x02
        write(2)
        proc.send_signal(signal.SIGHUP)
        await wait_for("configuration reloaded")
        second, rep = await asyncio.to_thread(socks5_connect, proxy, sink.address, "alice")
        second.close()
        held.close()
        assert rep == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


# --- configuration ---------------------------------------------------------------------------


def test_config_limits_parse_units_and_overrides() -> None:
    cfg = config(
        {
            "user_upload": "2MB",
            "user_download": "512KiB",
            "user_connections": 10,
            "client_connection_rate": 2.5,
            "users": {"bob": {"download": "1M", "connections": 3}},
        },
        {"bob": "pw-bob"},
    )
    assert cfg.limits.user == Limits(connections=10, upload=2_000_000, download=524_288)
    assert cfg.limits.client == Limits(connection_rate=2.5)
    # Keys left out of [limits.users.bob] keep the [limits] user_* values.
    assert cfg.limits.users["bob"] == Limits(connections=3, upload=2_000_000, download=1_000_000)
    assert config({}).limits.user == Limits() and not Limits().any
    assert config({"user_upload": "100000G"}).limits.user.upload == 10**14  # the largest limit


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"user_upload": "fast"}, 'limits.user_upload: "fast" is not a rate in bytes per second'),
        ({"user_upload": -1}, "limits.user_upload: -1 is not a rate in bytes per second"),
        # Operator trial: the engines' buckets refuse 1e15 bytes/s and more, which passed
        # check-config and then failed every connection with 0x01.
        ({"client_download": "1000000G"}, 'limits.client_download: "1000000G" is above the largest limit'),
        ({"user_upload": 2**63 - 1}, "limits.user_upload: 9223372036854775807 is above the largest limit"),
        ({"user_upload": "1e20k"}, 'limits.user_upload: "1e20k" is above the largest limit'),
        ({"client_connections": -1}, "limits.client_connections: -1 is not an integer >= 0"),
        ({"user_connection_rate": "x"}, "limits.user_connection_rate"),
        (
            {"users": {"mallory": {"connections": 1}}},
            "limits.users.mallory: 'mallory' is not a user of [users]",
        ),
        ({"users": {"bob": {"bandwidth": 1}}}, "limits.users.bob"),
        ({"user_bandwidth": 1}, "limits"),
    ],
)
def test_config_limit_mistakes_are_one_sentence(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(limits, {"bob": "pw-bob"})
    assert message in str(info.value)


def test_check_config_reports_a_bad_limit(tmp_path: Path) -> None:
    """check-config: one sentence, exit 2, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text('[limits]\nuser_download = "lots"\n')
    done = subprocess.run(
        [sys.executable, "-m", "socks6fast", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "limits.user_download" in done.stderr and "Traceback" not in done.stderr
    path.write_text('[limits]\nuser_download = "2MB"\nclient_connections = 4\n')
    done = subprocess.run(
        [sys.executable, "-m", "socks6fast", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


# --- the pieces --------------------------------------------------------------------------------


def test_limiter_counts_releases_and_refuses_nothing_without_limits() -> None:
    limiter = ConnectionLimiter()
    assert limiter.admit("127.0.0.1", "alice", 0.0) is NO_LIMITS
    limiter.configure(Limits(connections=1), Limits(connections=2))
    first = limiter.admit("127.0.0.1", "alice", 0.0)
    assert isinstance(first, Admission)
    # alice is full; the address still has room, and nothing was counted for the refusal.
    assert isinstance(limiter.admit("127.0.0.1", "alice", 0.0), str)
    assert limiter.live("client", "127.0.0.1") == 1
    anonymous = limiter.admit("127.0.0.1", None, 0.0)
    assert isinstance(anonymous, Admission)
    assert "client 127.0.0.1" in str(limiter.admit("127.0.0.1", None, 0.0))
    limiter.release(first)
    limiter.release(anonymous)
    assert limiter.live("user", "alice") == 0 and limiter.live("client", "127.0.0.1") == 0


def test_limiter_shares_bandwidth_buckets_per_key_and_reconfigures_them() -> None:
    limiter = ConnectionLimiter(PyTokenBucket)
    limiter.configure(Limits(upload=1000, download=2000), Limits(download=5000))
    a = limiter.admit("127.0.0.1", "alice", 0.0)
    b = limiter.admit("127.0.0.2", "alice", 0.0)
    assert isinstance(a, Admission) and isinstance(b, Admission)
    assert a.up[0] is b.up[0] and a.down[0] is b.down[0]  # one bucket per user
    assert a.down[1] is not b.down[1]  # one per client address
    user_down = a.down[0]
    limiter.configure(Limits(upload=1000, download=4000), Limits())
    assert user_down.rate == 4000  # type: ignore[attr-defined]
    client_down = a.down[1]
    assert client_down.rate >= 1e14  # type: ignore[attr-defined]  # limit removed: wide open
    c = limiter.admit("127.0.0.1", "alice", 0.0)
    assert isinstance(c, Admission) and len(c.down) == 1


@pytest.mark.parametrize(
    "bucket_class",
    [
        pytest.param(PyTokenBucket, id="python"),
        pytest.param(
            TokenBucket,
            id="c",
            marks=[pytest.mark.c_extension, pytest.mark.skipif(not ENGINE_AVAILABLE, reason="no engine")],
        ),
    ],
)
def test_token_bucket_twins(bucket_class: Any) -> None:
    bucket = bucket_class(1_000_000.0)
    assert bucket.burst == default_burst(1_000_000.0) == 50_000.0
    assert bucket_class(1000.0).burst == 1000.0 and bucket_class(100_000.0).burst == 16384.0
    assert bucket.take(50_000) == 0.0
    delay = bucket.take(100_000)
    assert 0.09 < delay <= 0.1
    bucket.configure(2_000_000.0, 1000.0)
    assert bucket.rate == 2_000_000.0 and bucket.burst == 1000.0
    with pytest.raises(ValueError):
        bucket_class(0.0)


@pytest.mark.parametrize("bucket_class", [PyTokenBucket, TokenBucket])
def test_throttled_reports_each_waiting_bucket_once(bucket_class: Any) -> None:
    """Issue 14 item 4, "a slowed stream, and a log line": `throttled` names each user or
    client address whose bucket made a relay wait since the last call, once, also when its
    last connection ended before the report; a bucket that never ran dry is not named."""
    limiter = ConnectionLimiter(bucket_class)
    limiter.configure(Limits(download=1_000_000), Limits(upload=2_000_000))
    alice = limiter.admit("127.0.0.1", "alice", 0.0)
    bob = limiter.admit("127.0.0.2", "bob", 0.0)
    assert isinstance(alice, Admission) and isinstance(bob, Admission)
    assert limiter.throttled() == []
    alice.down[0].take(5_000_000)  # far beyond the burst: the relay must wait
    assert limiter.throttled() == [
        "limit: user 'alice' download held to 1000000 bytes/s (1 waits for tokens)"
    ]
    assert limiter.throttled() == []
    bob.up[0].take(5_000_000)  # bob's client address bucket runs dry, then bob leaves
    limiter.release(bob)
    assert limiter.throttled() == [
        "limit: client 127.0.0.2 upload held to 2000000 bytes/s (1 waits for tokens)"
    ]
    assert limiter.throttled() == []
