"""Sessions and idempotence tokens shared through Redis (issue 13 item 2; SES-*, IDM-*, D37, D38).

Two in-process proxies on two loopback addresses (127.0.0.1 and 127.0.0.2) share one real
``redis-server`` (Debian's package; `.ci/run` installs it), started here on a free loopback port
with no persistence and stopped after. They stand for two hosts behind a balancer: a session
made on one is used on the other, a token spent on one is refused on the other, many clients
spending one token at once through both get exactly one success, a teardown on one is seen on
the other, Redis stopped or hung mid-test fails requests clearly and the proxies recover by
themselves.

The logic under test is the store's (Lua on the Redis server) and the core's, not the codec's:
the module runs once, in the default run, not again with SOCKS6FAST_NO_EXTENSIONS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_server import RawClient, Sink, make_certificates, make_config, running_server
from test_server_e2e import connect, credentials, echo_roundtrip, exchange, option, request

import socks6fast.asyncio as s6
from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.asyncio.client import Proxy
from socks6fast.asyncio.server import Server
from socks6fast.asyncio.server.redis_sessions import KEY_PREFIX, RedisSessionStore
from socks6fast.config import ConfigError, parse_config
from socks6fast.constants import AuthReplyType, Command, ReplyCode, StackLeg
from socks6fast.errors import AuthenticationError, SessionStoreError
from socks6fast.proto.messages import (
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    ListenBacklogOption,
    SessionID,
    SessionInvalid,
    SessionOK,
    SessionRequest,
    SessionTeardown,
)
from socks6fast.proto.sessions import SessionLimits, SessionOp, SessionQuery, TokenWindow

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)

pytestmark = [
    pytest.mark.skipif(
        REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"
    ),
    pytest.mark.skipif(NO_EXTENSIONS, reason="store logic, not the codec's: runs in the default run only"),
]

USERS = {"alice": "wonderland"}
HOST_B = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A redis-server of our own on 127.0.0.1:<free port>, no persistence (stopped after)."""

    def __init__(self, directory: Path, *, save: str = "", extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.directory = directory
        self.extra = extra
        """More redis-server arguments (e.g. ``--replicaof``)."""
        self.save = save
        """Redis's ``save`` points ("" = no snapshots; "3600 1" = snapshot persistence)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", self.save,
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--daemonize", "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.command("PING") == b"+PONG\r\n":
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # in case a test left it stopped
                process.terminate()
            process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL (a crash: no final snapshot), then wait for the process."""
        process, self.process = self.process, None
        assert process is not None
        process.kill()
        process.wait(timeout=10)

    def snapshot(self) -> None:
        """BGSAVE and wait for it to finish (a periodic ``save`` point)."""
        assert self.command("BGSAVE").startswith(b"+")
        deadline = time.monotonic() + 10
        while True:  # nothing else writes meanwhile: done when no change is left unsaved
            info = self.command("INFO", "persistence")
            if b"rdb_bgsave_in_progress:0" in info and b"rdb_changes_since_last_save:0\r" in info:
                break
            assert time.monotonic() < deadline, "BGSAVE did not finish"
            time.sleep(0.05)
        assert b"rdb_last_bgsave_status:ok" in info

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: Redis hangs (connections accepted, no answers), data kept."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP), the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(payload.encode())
            time.sleep(0.01)
            return sock.recv(65536)

    def evalsha_calls(self) -> int:
        info = self.command("INFO", "commandstats").decode()
        for line in info.splitlines():
            if line.startswith("cmdstat_evalsha:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0


@pytest.fixture(scope="module")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def redis(redis_process: RedisProcess) -> RedisProcess:
    if redis_process.process is None:
        redis_process.start()
    redis_process.command("FLUSHALL")
    return redis_process


@contextlib.asynccontextmanager
async def two_hosts(
    redis: RedisProcess, *, admin_b: bool = False, **sessions: Any
) -> AsyncIterator[tuple[Server, Server]]:
    """Two proxies, on 127.0.0.1 and 127.0.0.2, sharing ``redis`` (B with /metrics if asked)."""
    table = {"store": redis.url, "store_timeout": 0.5, **sessions}
    config_a = make_config(users=USERS, sessions=table)
    admin = {"listen": "127.0.0.1:0"} if admin_b else None
    config_b = make_config(users=USERS, sessions=table, server={"listen": [f"{HOST_B}:0"]}, admin=admin)
    async with running_server(config_a) as a, running_server(config_b) as b:
        assert a.addresses[0][0] == "127.0.0.1" and b.addresses[0][0] == HOST_B
        yield a, b


async def new_session(
    proxy: tuple[str, int], sink: Sink, window: int = 0
) -> tuple[SessionID, IdempotenceWindow | None]:
    extra = (IdempotenceRequest(window),) if window else ()
    client, auth, reply = await exchange(
        proxy, connect(sink.address, SessionRequest(), credentials(), *extra)
    )
    sid = option(reply, SessionID)
    assert sid is not None, reply
    await client.close()
    return sid, option(auth, IdempotenceWindow)


async def spend(proxy: tuple[str, int], sink: Sink, sid: SessionID, token: int) -> bool:
    """One CONNECT spending ``token``; True when accepted (and relayed)."""
    client = await RawClient.connect(proxy)
    try:
        await client.send(connect(sink.address, sid, IdempotenceExpenditure(token)))
        auth = await client.auth_reply()
        if auth.type != AuthReplyType.SUCCESS:
            assert option(auth, IdempotenceRejected) is not None, auth
            return False
        assert option(auth, IdempotenceAccepted) is not None
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        await echo_roundtrip(client)
        return True
    finally:
        await client.close()


async def first_bytes(proxy: tuple[str, int], data: bytes) -> bytes:
    client = await RawClient.connect(proxy)
    try:
        await client.send(data)
        return await asyncio.wait_for(client.read_until_eof(), 5)
    finally:
        await client.close()


# --- two hosts ---------------------------------------------------------------------------


@pytest.mark.conformance("SES-01", "SES-02", "SES-04", "IDM-02", "IDM-03")
async def test_session_made_on_one_host_is_used_on_the_other(redis: RedisProcess) -> None:
    """SES-01/02/04 across hosts, with socks6fast's own client: the session (alice's, with a
    token window) made through A serves requests through B without credentials, as alice, and
    a token spent through B is accepted once (IDM-02, IDM-03)."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        host_a, host_b = a.addresses[0], b.addresses[0]
        session = s6.Session(f"socks6://alice:wonderland@{host_a[0]}:{host_a[1]}", tokens=8)
        reader, writer = await session.open_connection(*sink.address)
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        writer.close()
        session_id = session.session_id
        assert session_id is not None and len(session_id) == 16
        # The next connection lands on the other host (a balancer's choice): no credentials.
        session.proxy = Proxy.from_url(f"socks6://{host_b[0]}:{host_b[1]}")
        reader, writer = await session.open_connection(*sink.address, idempotent=True)
        writer.write(b"two")
        assert await reader.readexactly(3) == b"two"
        writer.close()
        assert session.session_id == session_id  # not replaced: B knew it
        await asyncio.sleep(0.05)
        users_b = [r.user for r in b.records if r.reply_code == ReplyCode.SUCCESS]
        assert users_b == ["alice"]  # SES-04: the session's user, on the other host
        # In Redis: the user and the address, never the password.
        dump = redis.command("HGETALL", f"{KEY_PREFIX}s:{session_id.hex()}")
        assert b"alice" in dump and b"127.0.0.1" in dump and b"wonderland" not in dump
        await session.aclose()


@pytest.mark.conformance("IDM-03", "SES-02")
async def test_token_spent_on_one_host_is_refused_on_the_other(redis: RedisProcess) -> None:
    """IDM-03 across hosts: the token spent through A gets Idempotence Rejected through B and
    its request never runs; one request costs one Redis round trip (one EVALSHA)."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, window = await new_session(a.addresses[0], sink, window=16)
        assert window is not None and window.size == 16
        before = redis.evalsha_calls()
        assert await spend(a.addresses[0], sink, sid, window.base)
        assert redis.evalsha_calls() - before == 1  # lookup + touch + spend: one script run
        connections = len(sink.connections)
        assert not await spend(b.addresses[0], sink, sid, window.base)
        assert not await spend(a.addresses[0], sink, sid, window.base)
        await asyncio.sleep(0.05)
        assert len(sink.connections) == connections  # the replays never ran
        # The window moved past the spent token, as both hosts see it (IDM-04).
        client, auth, _ = await exchange(b.addresses[0], connect(sink.address, sid))
        assert option(auth, SessionOK) is not None
        assert option(auth, IdempotenceWindow) == IdempotenceWindow((window.base + 1) % 2**32, 16)
        await client.close()


@pytest.mark.conformance("IDM-03")
async def test_one_token_spent_at_once_through_both_hosts_succeeds_once(redis: RedisProcess) -> None:
    """IDM-03: 24 clients spend the same token at the same moment, half through each host:
    exactly one is accepted and exactly one request reaches the destination."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, window = await new_session(a.addresses[0], sink, window=8)
        assert window is not None
        connections = len(sink.connections)
        proxies = [a.addresses[0], b.addresses[0]] * 12
        results = await asyncio.gather(*(spend(p, sink, sid, window.base) for p in proxies))
        assert sum(results) == 1, results
        await asyncio.sleep(0.05)
        assert len(sink.connections) == connections + 1


@pytest.mark.conformance("SES-05", "SES-03")
async def test_teardown_on_one_host_is_seen_on_the_other(redis: RedisProcess) -> None:
    """SES-05: a Session Teardown through A ends the session everywhere at once: B answers the
    next request of it with Type 1 and Session Invalid (SES-03); the tearing-down request
    itself runs outside any session."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, _ = await new_session(a.addresses[0], sink)
        client, auth, reply = await exchange(b.addresses[0], connect(sink.address, sid))
        assert option(auth, SessionOK) is not None
        await client.close()
        client, auth, reply = await exchange(
            a.addresses[0], connect(sink.address, sid, SessionTeardown(), credentials())
        )
        assert option(auth, SessionOK) is None and reply.reply_code == ReplyCode.SUCCESS
        await client.close()
        client = await RawClient.connect(b.addresses[0])
        await client.send(connect(sink.address, sid))
        auth = await client.auth_reply()
        assert auth.type == AuthReplyType.FAILURE and option(auth, SessionInvalid) is not None
        await client.close()
        assert redis.command("DBSIZE") in (b":0\r\n", b":1\r\n")  # at most the 'all' set is left


@pytest.mark.conformance("SES-04")
async def test_sessions_expire_by_redis_ttl(redis: RedisProcess) -> None:
    """SES-04: a session unused for idle_timeout is gone on every host; the key carries the
    idle timeout as its TTL (Redis expires it, no sweep needed), renewed by every use."""
    async with Sink() as sink, two_hosts(redis, idle_timeout=0.4) as (a, b):
        sid, _ = await new_session(a.addresses[0], sink)
        key = f"{KEY_PREFIX}s:{sid.session_id.hex()}"
        ttl = int(redis.command("PTTL", key)[1:-2])
        assert 0 < ttl <= 400
        await asyncio.sleep(0.25)
        client, auth, _ = await exchange(b.addresses[0], connect(sink.address, sid))  # renews
        await client.close()
        await asyncio.sleep(0.25)  # 0.5 s after creation, 0.25 s after the last use: alive
        client, auth, _ = await exchange(a.addresses[0], connect(sink.address, sid))
        assert option(auth, SessionOK) is not None
        await client.close()
        await asyncio.sleep(0.6)
        assert redis.command("EXISTS", key) == b":0\r\n"
        client = await RawClient.connect(b.addresses[0])
        await client.send(connect(sink.address, sid))
        auth = await client.auth_reply()
        assert option(auth, SessionInvalid) is not None
        await client.close()


@pytest.mark.conformance("SES-04")
async def test_caps_count_sessions_of_every_host(redis: RedisProcess) -> None:
    """SES-04: max_per_user counts alice's sessions on both hosts: the third Session Request
    is declined silently (the request itself succeeds, without a Session ID)."""
    async with Sink() as sink, two_hosts(redis, max_per_user=2) as (a, b):
        await new_session(a.addresses[0], sink)
        await new_session(b.addresses[0], sink)
        client, _, reply = await exchange(
            a.addresses[0], connect(sink.address, SessionRequest(), credentials())
        )
        assert reply.reply_code == ReplyCode.SUCCESS and option(reply, SessionID) is None
        await client.close()


@pytest.mark.conformance("CMD-05", "SES-05")
async def test_bind_backlog_with_redis_sessions(redis: RedisProcess) -> None:
    """CMD-05 with sessions in Redis: the backlog listener stays on the host that opened it and
    a further BIND of the session through that host claims it (each lookup makes a new Session
    object, the listener is found by the session's ID); a teardown through the other host
    closes it within the sweep's second (D38)."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, _ = await new_session(a.addresses[0], sink)
        backlog = ListenBacklogOption(StackLeg.PROXY_REMOTE, 2)
        holder, _, first = await exchange(a.addresses[0], request(Command.BIND, "0.0.0.0", 0, sid, backlog))
        assert option(first, ListenBacklogOption).backlog == 2
        bound = (first.address, first.port)
        peer_reader, peer_writer = await asyncio.open_connection(*bound)
        claim, auth, reply1 = await exchange(a.addresses[0], request(Command.BIND, bound[0], bound[1], sid))
        assert option(auth, SessionOK) is not None and (reply1.address, reply1.port) == bound
        assert (await claim.operation_reply()).reply_code == ReplyCode.SUCCESS
        peer_writer.write(b"peer")
        assert await claim.read_exactly(4) == b"peer"
        peer_writer.close()
        await claim.close()
        client, _, _ = await exchange(
            b.addresses[0], connect(sink.address, sid, SessionTeardown(), credentials())
        )
        await client.close()
        assert await asyncio.wait_for(holder.read_until_eof(), 5) == b""  # closed with its session
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*bound)
        await holder.close()


async def test_reload_moves_new_sessions_to_redis_and_back(redis: RedisProcess) -> None:
    """SIGHUP's reload: memory -> Redis makes new sessions in Redis (the memory ones end);
    Redis -> memory makes them local again."""
    async with Sink() as sink, running_server(make_config(users=USERS)) as server:
        proxy = server.addresses[0]
        old, _ = await new_session(proxy, sink)
        server.reload(make_config(users=USERS, sessions={"store": redis.url}))
        assert server.context.sessions is None and isinstance(
            server.context.shared_sessions, RedisSessionStore
        )
        sid, _ = await new_session(proxy, sink)
        assert redis.command("EXISTS", f"{KEY_PREFIX}s:{sid.session_id.hex()}") == b":1\r\n"
        client = await RawClient.connect(proxy)
        await client.send(connect(sink.address, old))
        assert option(await client.auth_reply(), SessionInvalid) is not None
        await client.close()
        server.reload(make_config(users=USERS))
        assert server.context.shared_sessions is None and server.context.sessions is not None
        local, _ = await new_session(proxy, sink)
        assert redis.command("EXISTS", f"{KEY_PREFIX}s:{local.session_id.hex()}") == b":0\r\n"


async def test_metrics_with_the_redis_store(redis: RedisProcess) -> None:
    """Issue 14's session metrics with a shared store: the gauge is the live sessions of every
    host (refreshed by the sweep), the counters this process's requests."""
    from test_metrics import fetch, value  # noqa: PLC0415 (its scraper)

    async with Sink() as sink, two_hosts(redis, admin_b=True) as (a, b):
        sid, window = await new_session(a.addresses[0], sink, window=4)
        await new_session(a.addresses[0], sink)
        assert window is not None
        assert await spend(b.addresses[0], sink, sid, window.base)
        assert not await spend(b.addresses[0], sink, sid, window.base)
        shared = b.context.shared_sessions
        assert isinstance(shared, RedisSessionStore)
        await shared.sweep()
        samples = await fetch(b)
    assert value(samples, "socks6fast_sessions_active") == 2  # made on A, counted on B
    assert value(samples, "socks6fast_sessions_created_total") == 0
    assert value(samples, "socks6fast_tokens_spent_total") == 1
    assert value(samples, "socks6fast_tokens_rejected_total") == 1


@pytest.mark.conformance("SES-04")
async def test_a_session_of_a_user_this_host_no_longer_knows_is_invalid(redis: RedisProcess) -> None:
    """Probe S-1 with the Redis store (SES-04: requests in a session act as its user): bob is
    removed from B's [users] by a reload; his session (made on A) gets Session Invalid on B
    at once, alice's still works there; A, not reloaded yet, still serves bob (the session is
    not deleted: a rolling change), and after A's reload it refuses him too."""
    passwords = {"alice": "wonderland", "bob": "builder"}
    table = {"store": redis.url, "store_timeout": 0.5}
    config_a = make_config(users=passwords, sessions=table)
    server_b = dataclasses.replace(config_a.server, listen=((HOST_B, 0),))
    config_b = dataclasses.replace(config_a, server=server_b)
    only_alice = {"alice": config_a.users["alice"]}
    hashes = {"alice": config_a.user_hashes["alice"]}

    async def works(proxy: tuple[str, int], sid: SessionID) -> bool:
        client = await RawClient.connect(proxy)
        try:
            await client.send(connect(sink.address, sid))
            auth = await client.auth_reply()
            if auth.type == AuthReplyType.SUCCESS:
                assert option(auth, SessionOK) is not None
                return True
            assert option(auth, SessionInvalid) is not None, auth
            return False
        finally:
            await client.close()

    async with Sink() as sink, running_server(config_a) as a, running_server(config_b) as b:
        proxy_a, proxy_b = a.addresses[0], b.addresses[0]
        sids = {}
        for user, password in passwords.items():
            client, _, reply = await exchange(
                proxy_a, connect(sink.address, SessionRequest(), credentials(user, password))
            )
            sids[user] = option(reply, SessionID)
            await client.close()
        assert await works(proxy_b, sids["bob"])
        b.reload(dataclasses.replace(config_b, users=only_alice, user_hashes=hashes))
        assert not await works(proxy_b, sids["bob"])
        assert await works(proxy_b, sids["alice"])
        assert await works(proxy_a, sids["bob"])
        a.reload(dataclasses.replace(config_a, users=only_alice, user_hashes=hashes))
        assert not await works(proxy_a, sids["bob"])
        assert await works(proxy_a, sids["alice"])


# --- Redis down (D37) --------------------------------------------------------------------


@pytest.mark.conformance("IDM-03")
async def test_redis_stopped_mid_test_fails_clearly_and_recovers(
    redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """D37, IDM-03: Redis stopped: a request in a session and a token spend get General
    Failure (06 01 00 00: a failed Authentication Reply, no Session Invalid, no Idempotence
    Accepted), nothing runs; requests outside sessions keep working; a Session Request is
    declined silently; one warning for the whole outage. Redis back (empty: no persistence):
    the proxies answer from it again by themselves, with one line saying so."""
    caplog.set_level(logging.WARNING, logger="socks6fast.server")
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, window = await new_session(a.addresses[0], sink, window=8)
        assert window is not None
        own = s6.Session(f"socks6://alice:wonderland@{a.addresses[0][0]}:{a.addresses[0][1]}", tokens=4)
        (await own.open_connection(*sink.address))[1].close()
        own_id = own.session_id
        redis.stop()
        # socks6fast's own client: a clear error, and it keeps its session (no Session Invalid).
        with pytest.raises(AuthenticationError, match="authentication failed"):
            await own.open_connection(*sink.address, idempotent=True)
        assert own.session_id == own_id and own_id is not None
        connections = len(sink.connections)
        for proxy in (a.addresses[0], b.addresses[0], a.addresses[0]):
            data = await first_bytes(proxy, connect(sink.address, sid, IdempotenceExpenditure(window.base)))
            assert data[:4] == bytes([6, ReplyCode.GENERAL_FAILURE, 0, 0]), data
        await asyncio.sleep(0.05)
        assert len(sink.connections) == connections  # nothing accepted unchecked
        client, _, reply = await exchange(a.addresses[0], connect(sink.address, credentials()))
        assert reply.reply_code == ReplyCode.SUCCESS  # no session needed: served
        await echo_roundtrip(client)
        await client.close()
        client, _, reply = await exchange(
            b.addresses[0], connect(sink.address, SessionRequest(), credentials())
        )
        assert reply.reply_code == ReplyCode.SUCCESS and option(reply, SessionID) is None  # declined
        await client.close()
        outage = [r for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(outage) == 2, [r.getMessage() for r in outage]  # one per proxy, not per request
        records = [r for r in a.records if r.reply_code == ReplyCode.GENERAL_FAILURE]
        assert records and all("session store" in r.error for r in records)
        redis.start()
        # Back: the old session died with Redis's memory; new ones work across hosts at once.
        client = await RawClient.connect(b.addresses[0])
        await client.send(connect(sink.address, sid))
        assert option(await client.auth_reply(), SessionInvalid) is not None
        await client.close()
        sid2, window2 = await new_session(a.addresses[0], sink, window=8)
        assert window2 is not None
        assert await spend(b.addresses[0], sink, sid2, window2.base)
        back = [r for r in caplog.records if "answers again after" in r.getMessage()]
        assert len(back) == 2, [(r.name, r.getMessage()) for r in back]


@pytest.mark.conformance("SES-02")
async def test_many_concurrent_session_requests_with_redis_healthy_all_succeed(
    redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """SES-02 under load (probe R-1): 300 requests of one session at once (NOOPs, bounded,
    loopback) with Redis healthy all get Session OK: a full connection pool waits for a free
    connection (at most store_timeout) instead of failing as an outage; this process holds at
    most MAX_CONNECTIONS connections to Redis; no outage line."""
    caplog.set_level(logging.WARNING, logger="socks6fast.server")
    async with Sink() as sink, two_hosts(redis) as (a, _b):
        sid, _ = await new_session(a.addresses[0], sink)
        clients = redis.command("INFO", "clients")

        async def one() -> bool:
            client = await RawClient.connect(a.addresses[0])
            try:
                await client.send(request(Command.NOOP, "0.0.0.0", 0, sid))
                auth = await asyncio.wait_for(client.auth_reply(), 10)
                return auth.type == AuthReplyType.SUCCESS and option(auth, SessionOK) is not None
            finally:
                await client.close()

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(300))), 60)
        assert results.count(True) == 300, results.count(False)
        assert not [r for r in caplog.records if "does not answer" in r.getMessage()]
        connected = int(redis.command("INFO", "clients").split(b"connected_clients:")[1].split(b"\r")[0])
        assert connected <= RedisSessionStore.MAX_CONNECTIONS + 2, (connected, clients)  # + B's, ours


async def test_a_flapping_store_logs_one_outage_line(
    redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """D37 "one log line per outage" (probe R-1: 117-201 lines in 0.3 s): a store whose
    requests fail and succeed by turns logs one warning and one recovery line per
    OUTAGE_LOG_INTERVAL; the failures of the flaps in between are counted in the next line."""
    caplog.set_level(logging.WARNING, logger="socks6fast.server")
    store = RedisSessionStore(redis.url, SessionLimits())
    try:
        for _ in range(50):
            store._outage(ConnectionError("Connection reset by peer"))  # a request failed
            answer = await store.answer(SessionQuery(SessionOp.LOOKUP, bytes(16)))  # the next answered
            assert answer.session is None and not store.down
    finally:
        await store.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "does not answer" in m]) == 1, lines
    back = [m for m in lines if "answers again after" in m]
    assert len(back) == 1 and "1 requests failed" in back[0], lines
    assert store._failed == 49  # reported by the next outage's recovery line


@pytest.mark.conformance("IDM-03")
async def test_redis_hanging_times_out_and_keeps_every_token_once(redis: RedisProcess) -> None:
    """D37, IDM-03: Redis hanging (SIGSTOP): requests in the session fail with General Failure
    after store_timeout instead of waiting; once it answers again (SIGCONT, data kept) the same
    session and window serve at once, and the token that was never checked is accepted
    exactly once."""
    async with Sink() as sink, two_hosts(redis) as (a, b):
        sid, window = await new_session(a.addresses[0], sink, window=8)
        assert window is not None
        redis.pause(True)
        try:
            started = time.monotonic()
            data = await first_bytes(
                b.addresses[0], connect(sink.address, sid, IdempotenceExpenditure(window.base))
            )
            assert data[:4] == bytes([6, ReplyCode.GENERAL_FAILURE, 0, 0])
            assert time.monotonic() - started < 3.0
        finally:
            redis.pause(False)
        results = [await spend(p, sink, sid, window.base) for p in (a.addresses[0], b.addresses[0])]
        assert results == [True, False]


@pytest.mark.conformance("IDM-03", "SES-03")
async def test_redis_restarted_from_a_stale_snapshot_never_accepts_a_token_twice(tmp_path: Path) -> None:
    """IDM-03 whatever Redis's persistence (probe R-0, D38): Redis with snapshot persistence
    (its default ``save`` points, AOF off): session + window, a snapshot, the token spent,
    Redis killed (-9) and restarted from the snapshot, which still has the token unspent. The
    replay must not run: the session is of an older epoch (another run_id), Session Invalid
    on both hosts; a new session works at once (SES-03)."""
    redis = RedisProcess(tmp_path, save="3600 1 300 100 60 10000")
    redis.start()
    try:
        async with Sink() as sink, two_hosts(redis) as (a, b):
            sid, window = await new_session(a.addresses[0], sink, window=16)
            assert window is not None
            redis.snapshot()
            assert await spend(a.addresses[0], sink, sid, window.base)
            redis.kill()
            redis.start()  # loads dump.rdb: the window as it was before the spend
            assert b"socks6fast:s:" + sid.session_id.hex().encode() in redis.command("KEYS", "*")
            connections = len(sink.connections)
            for proxy in (a.addresses[0], b.addresses[0]):
                client = await RawClient.connect(proxy)
                await client.send(connect(sink.address, sid, IdempotenceExpenditure(window.base)))
                auth = await client.auth_reply()
                assert auth.type != AuthReplyType.SUCCESS and option(auth, SessionInvalid) is not None, auth
                assert option(auth, IdempotenceAccepted) is None
                await client.close()
            await asyncio.sleep(0.05)
            assert len(sink.connections) == connections  # the replay never ran
            assert b"socks6fast:s:" + sid.session_id.hex().encode() not in redis.command("KEYS", "*")
            sid2, window2 = await new_session(b.addresses[0], sink, window=4)
            assert window2 is not None
            assert await spend(a.addresses[0], sink, sid2, window2.base)
            assert not await spend(b.addresses[0], sink, sid2, window2.base)
    finally:
        redis.stop()


@pytest.mark.conformance("IDM-03", "SES-03")
async def test_a_promoted_lagging_replica_never_accepts_a_token_twice(tmp_path: Path) -> None:
    """IDM-03 across a failover (probe R-0, D38): host A uses the primary, host B its replica.
    The replica is promoted (REPLICAOF NO ONE, a partition) with the session replicated, then
    a token is spent on A, which never reaches it, and the old primary dies (-9). The replay
    through B must not run: the session is of an older epoch (another replication ID)."""
    primary = RedisProcess(tmp_path / "p")
    replica = RedisProcess(tmp_path / "r", extra=("--replicaof", "127.0.0.1", str(primary.port)))
    primary.directory.mkdir()
    replica.directory.mkdir()
    primary.start()
    replica.start()
    try:
        table = {"store_timeout": 0.5}
        config_a = make_config(users=USERS, sessions={**table, "store": primary.url})
        config_b = make_config(
            users=USERS, sessions={**table, "store": replica.url}, server={"listen": [f"{HOST_B}:0"]}
        )
        async with Sink() as sink, running_server(config_a) as a, running_server(config_b) as b:
            sid, window = await new_session(a.addresses[0], sink, window=16)
            assert window is not None
            key = f"{KEY_PREFIX}s:{sid.session_id.hex()}"
            deadline = time.monotonic() + 10
            while replica.command("HGET", key, "b").startswith(b"$-1"):  # not replicated yet
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # A partition: the replica is promoted (as Sentinel would) before the spend below
            # reaches it; then the old primary dies.
            assert replica.command("REPLICAOF", "NO", "ONE").startswith(b"+OK")
            assert await spend(a.addresses[0], sink, sid, window.base)
            primary.kill()
            connections = len(sink.connections)
            client = await RawClient.connect(b.addresses[0])
            await client.send(connect(sink.address, sid, IdempotenceExpenditure(window.base)))
            auth = await client.auth_reply()
            await client.close()
            assert auth.type != AuthReplyType.SUCCESS and option(auth, SessionInvalid) is not None, auth
            await asyncio.sleep(0.05)
            assert len(sink.connections) == connections  # the replay never ran
    finally:
        replica.stop()
        if primary.process is not None:
            primary.stop()


# --- the store itself ---------------------------------------------------------------------


@pytest.mark.conformance("IDM-04")
async def test_lua_window_matches_token_window(redis: RedisProcess) -> None:
    """IDM-04: the Lua spend (on the Redis server) and `TokenWindow.spend` agree on every
    answer and every window, for random spends in and around windows of several sizes,
    across the 2^32 wrap, out of order and past the tracked-tokens cap."""
    store = RedisSessionStore(redis.url, SessionLimits(max_token_window=2**20))
    rng = random.Random(13)
    try:
        for size in (1, 2, 8, 1000, 2**20):
            created = await store.answer(
                SessionQuery(SessionOp.CREATE, client_ip="127.0.0.1", token_request=size)
            )
            assert created.session is not None and created.window is not None
            base, got_size = created.window
            reference = TokenWindow(base, got_size)
            for step in range(300):
                if size == 2**20 and step < 270:
                    token = (
                        reference.base + 1 + rng.randrange(size // 4)
                    ) % 2**32  # out of order: > 256 kept
                else:
                    token = (reference.base + rng.randrange(-3, size + 3)) % 2**32
                answer = await store.answer(
                    SessionQuery(SessionOp.LOOKUP, created.session.session_id, token=token)
                )
                assert answer.spent == reference.spend(token), (size, step, token)
                assert answer.window == reference.current, (size, step)
        wrap = await store.answer(SessionQuery(SessionOp.CREATE, client_ip="127.0.0.1", token_request=4))
        assert wrap.session is not None
        key = f"{KEY_PREFIX}s:{wrap.session.session_id.hex()}"
        redis.command("HSET", key, "b", str(2**32 - 2))
        reference = TokenWindow(2**32 - 2, 4)
        for token in (0, 2**32 - 2, 2**32 - 1, 1, 0, 2):
            answer = await store.answer(SessionQuery(SessionOp.LOOKUP, wrap.session.session_id, token=token))
            assert answer.spent == reference.spend(token) and answer.window == reference.current
    finally:
        await store.close()


async def test_store_over_a_unix_socket(tmp_path: Path) -> None:
    """The ``unix:///PATH?db=N`` form: a redis-server on a Unix socket of its own (no TCP port),
    database 3; a session made and spent through it."""
    assert REDIS_SERVER is not None
    path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        store = RedisSessionStore(f"unix://{path}?db=3", SessionLimits())
        try:
            created = await store.answer(
                SessionQuery(SessionOp.CREATE, user="alice", client_ip="127.0.0.1", token_request=4)
            )
            assert created.session is not None and created.window is not None
            spent = await store.answer(
                SessionQuery(SessionOp.LOOKUP, created.session.session_id, token=created.window[0])
            )
            assert spent.spent and spent.session is not None and spent.session.user == "alice"
        finally:
            await store.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_store_over_tls(tmp_path: Path) -> None:
    """The ``rediss://`` form: redis-server on a TLS port only, with a throw-away CA that the
    URL names (redis-py's ``ssl_ca_certs`` query argument); the certificate is verified."""
    assert REDIS_SERVER is not None
    certs = make_certificates(tmp_path)
    port = _free_port()
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs.cert),
            "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            await asyncio.sleep(0.02)
        store = RedisSessionStore(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}", SessionLimits())
        try:
            created = await store.answer(SessionQuery(SessionOp.CREATE, client_ip="127.0.0.1"))
            assert created.session is not None
            found = await store.answer(SessionQuery(SessionOp.LOOKUP, created.session.session_id))
            assert found.session is not None
        finally:
            await store.close()
        untrusted = RedisSessionStore(f"rediss://127.0.0.1:{port}/0", SessionLimits(), timeout=2)
        try:
            with pytest.raises(SessionStoreError, match="does not answer"):
                await untrusted.answer(SessionQuery(SessionOp.CREATE, client_ip="127.0.0.1"))
        finally:
            await untrusted.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_store_unreachable_raises_one_sentence() -> None:
    """D37: nothing listening: `answer` raises SessionStoreError naming the store (with the
    password masked), after one warning."""
    store = RedisSessionStore(f"redis://:secret@127.0.0.1:{_free_port()}/0", SessionLimits(), timeout=0.3)
    try:
        with pytest.raises(SessionStoreError, match=r"redis://:\*\*\*@127\.0\.0\.1:\d+/0 does not answer"):
            await store.answer(SessionQuery(SessionOp.LOOKUP, b"\x00" * 16))
        assert store.down
    finally:
        await store.close()


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("redis://", "names no host"),
        ("redis://127.0.0.1:6379/x", "the database 'x' is not a number"),
        ("redis://127.0.0.1:99999/0", "is not a valid URL"),
        ("unix://", "names no socket path"),
        ("unix:///run/redis.sock?db=a", "the database 'a' is not a number"),
        ("mysql://127.0.0.1/0", 'is not one of "memory"'),
        ("redis://127.0.0.1/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        (6379, "is not a string"),
    ],
)
def test_config_rejects_bad_store(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match="^sessions.store: .*" + message.replace("(", r"\(")):
        parse_config({"sessions": {"store": value}})


def test_config_accepts_redis_urls() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://redis.internal:6380/2", "unix:///run/redis.sock?db=1"):
        assert parse_config({"sessions": {"store": url}}).sessions.store == url
    config = parse_config({"sessions": {"store": "redis://127.0.0.1/0"}})
    assert config.session_store() is None  # the server builds the shared store
    assert parse_config({}).sessions.store == "memory"


def test_check_config_without_the_redis_package(tmp_path: Path) -> None:
    """One sentence, exit 2, when the store is configured but redis-py is missing."""
    path = tmp_path / "socks6fast.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:1080"]\n[sessions]\nstore = "redis://127.0.0.1:6379/0"\n')
    code = (
        "import sys, importlib.util as u; real = u.find_spec;"
        " u.find_spec = lambda n, *a: None if n == 'redis' else real(n, *a);"
        " from socks6fast.cli import main; sys.exit(main(['check-config', sys.argv[1]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "needs the redis package" in done.stderr and "socks6fast[redis]" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:99999/0",
        "redis://alice:s3cret-pw@127.0.0.1/0?socket_timeout=abc",
        "rediss://alice:s3cret-pw@127.0.0.1:6380/x",
        "redis://alice:s3cret-pw@[::1:6379/0",
        "mysql://alice:s3cret-pw@127.0.0.1/0",
        "redis://s3cret-pw@127.0.0.1/0?socket_timeout=abc",
        "unix:///run/redis.sock?db=a&password=s3cret-pw",
    ],
)
def test_check_config_masks_the_store_password(tmp_path: Path, url: str) -> None:
    """Probe R-2: a wrong store URL is one sentence, exit 2, and the password in it is shown as
    ``***``, never in clear (check-config output ends up in terminals, CI logs, tickets)."""
    path = tmp_path / "socks6fast.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:1080"]\n[sessions]\nstore = "{url}"\n')
    code = "import sys; from socks6fast.cli import main; sys.exit(main(['check-config', sys.argv[1]]))"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "sessions.store" in done.stderr and "***" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr


# --- the bench ----------------------------------------------------------------------------


def test_bench_sessions_smoke(tmp_path: Path) -> None:
    """`socks6fast bench --smoke --tests sessions` (issue 13): its own redis-server and two
    proxies (memory, Redis), every row measured, a token spend costs exactly one Redis round
    trip (the issue's target), and everything it started is stopped."""
    from test_bench_smoke import _socks6fast  # noqa: PLC0415 (the bench tests' runner)

    status, log = _socks6fast(tmp_path, "bench", "--smoke", "--tests", "sessions", "--systems", "direct")
    assert status == 0, log
    results = json.loads((tmp_path / "run" / "socks6fast-bench.json").read_text())
    sessions = results["sessions"]
    for store in ("memory", "redis"):
        for kind in ("none", "lookup", "spend"):
            row = sessions[store][kind]
            assert row["p50_us"] > 0 and row["proxy_us"] > 0, (store, kind, row)
    assert sessions["redis"]["none"]["redis_calls"] == 0  # no session: Redis is never asked
    assert sessions["redis"]["lookup"]["redis_calls"] == 1.0
    assert sessions["redis"]["spend"]["redis_calls"] == 1.0
    target = [t for t in results["targets"] if t.get("issue") == 13]
    assert target and target[0]["ok"] is True
    assert "| spend | redis |" in log and "Added by Redis" in log
