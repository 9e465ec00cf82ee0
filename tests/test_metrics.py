"""Issue 14 items 1 and 2: the admin listener's ``/metrics`` and ``/healthz``, the JSON log
format, failed-login user names, and the log of clients speaking HTTP, TLS or SOCKS 4 to the
plain port.

Everything runs on real sockets: ``/metrics`` is fetched over HTTP with urllib and parsed with
``prometheus_client.parser.text_string_to_metric_families``; the counters are checked to move
by the right amounts after real SOCKS 5, SOCKS 6 and TLS connections, a refused rule, failed
logins, a bulk transfer and a UDP association. JSON log lines come from a real ``socks6fast
serve`` process and are parsed with ``json.loads``. With ``SOCKS6FAST_NO_EXTENSIONS=1`` the
same tests run on the asyncio relay and the Python UDP engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers_server import (
    RawClient,
    Sink,
    cheap_hash,
    make_certificates,
    make_config,
    record_for,
    running_server,
)
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from socks6fast.asyncio.server import Server
from socks6fast.asyncio.server.logs import JsonFormatter, rfc3339
from socks6fast.config import ConfigError, parse_config
from socks6fast.constants import AddressType, AuthMethod, AuthReplyType, Command, ReplyCode
from socks6fast.dataplane.engine import ENGINE_AVAILABLE
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AuthData,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    Request,
    SessionID,
    SessionRequest,
)
from socks6fast.proto.server_common import foreign_protocol
from socks6fast.proto.sessions import MemorySessionStore, SessionLimits
from socks6fast.proto.socks5 import UserPassRequest, encode_userpass_request

pytestmark = pytest.mark.timeout(60)

USERS = {"alice": "wonderland"}
ADMIN = {"listen": "127.0.0.1:0"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server) -> Samples:
    """GET /metrics over HTTP (urllib, blocking: call through asyncio.to_thread) and parse it."""
    assert server.admin is not None
    host, port = server.admin.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def fetch(server: Server) -> Samples:
    return await asyncio.to_thread(scrape, server)


def s6_connect(dest: tuple[str, int], *options: Any) -> bytes:
    atyp = AddressType.IPV6 if ":" in dest[0] else AddressType.IPV4
    return codec.encode_request(Request(Command.CONNECT, atyp, dest[0], dest[1], tuple(options)))


def s6_credentials(user: str, password: str) -> AuthData:
    return AuthData(
        AuthMethod.USERNAME_PASSWORD,
        encode_userpass_request(UserPassRequest(user.encode(), password.encode())),
    )


def s5_connect(dest: tuple[str, int]) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + struct.pack(">H", dest[1])


async def wait_records(server: Server, count: int) -> None:
    async with asyncio.timeout(5):
        while len(server.records) < count:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "relay_engine",
    [pytest.param(None, id="default"), pytest.param(False, id="asyncio")],
)
async def test_metrics_count_connections_bytes_and_handshakes(
    relay_engine: bool | None, tmp_path: Path
) -> None:
    """Issue 14 item 1: after a SOCKS 6 CONNECT with a bulk transfer, a SOCKS 5 CONNECT and a
    SOCKS 6 CONNECT over TLS, /metrics counts one connection each by listener, protocol,
    command and reply; the bytes relayed per direction are visible while the connection is
    still open (the engine's own counters, read at scrape time) and equal the records' sums
    once closed; the handshake histogram counts three; the active gauge drops back."""
    certs = make_certificates(tmp_path)
    config = make_config(
        admin=ADMIN,
        server={"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)},
    )
    context = ssl.create_default_context(cafile=str(certs.ca))
    bulk = os.urandom(1 << 20)
    async with Sink() as sink, running_server(config, use_relay_engine=relay_engine) as server:
        before = await fetch(server)
        assert value(before, "socks6fast_connections_active") == 0
        # SOCKS 6, plain listener, 1 MiB each way, scraped while still open.
        client = await RawClient.connect(server.addresses[0])
        await client.send(s6_connect(sink.address))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        await client.send(bulk)
        assert await client.read_exactly(len(bulk)) == bulk
        live = await fetch(server)
        for _ in range(20):
            # A worker bumps its counter right after its splice() returned: the reader may be
            # a hair faster than that store on a loaded machine.
            if delta(before, live, "socks6fast_relayed_bytes_total", direction="remote_to_client") >= len(
                bulk
            ):
                break
            await asyncio.sleep(0.05)
            live = await fetch(server)
        assert value(live, "socks6fast_connections_active") == 1
        assert delta(before, live, "socks6fast_relayed_bytes_total", direction="client_to_remote") == len(
            bulk
        )
        assert delta(before, live, "socks6fast_relayed_bytes_total", direction="remote_to_client") == len(
            bulk
        )
        await client.close()
        # SOCKS 5, plain listener.
        client = await RawClient.connect(server.addresses[0])
        await client.send(b"\x05\x01\x00" + s5_connect(sink.address))
        assert await client.read_exactly(2) == b"\x05\x00"
        assert (await client.read_exactly(10))[:2] == b"\x05\x00"
        await client.send(b"ping")
        assert await client.read_exactly(4) == b"ping"
        await client.close()
        # SOCKS 6 over TLS.
        client = await RawClient.connect(server.tls_addresses[0], ssl=context, server_hostname="localhost")
        await client.send(s6_connect(sink.address) + b"tls!")
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        assert await client.read_exactly(4) == b"tls!"
        await client.close()
        await wait_records(server, 3)
        after = await fetch(server)
        workers = server.relayer.workers
    name = "socks6fast_connections_total"
    for listener, protocol in (("tcp", "socks6"), ("tcp", "socks5"), ("tls", "socks6")):
        labels = {"listener": listener, "protocol": protocol, "command": "CONNECT", "reply": "0x00"}
        assert delta(before, after, name, **labels) == 1, (listener, protocol)
    records = list(server.records)
    up = sum(r.bytes_up for r in records)
    down = sum(r.bytes_down for r in records)
    assert up == down == len(bulk) + 4 + 4
    assert delta(before, after, "socks6fast_relayed_bytes_total", direction="client_to_remote") == up
    assert delta(before, after, "socks6fast_relayed_bytes_total", direction="remote_to_client") == down
    assert server.relayer.bytes_relayed() == (up, down)  # kept once the engine is closed
    assert delta(before, after, "socks6fast_handshake_seconds_count") == 3
    assert value(after, "socks6fast_handshake_seconds_bucket", le="+Inf") == 3
    assert 0 < value(after, "socks6fast_handshake_seconds_sum") < 15
    assert value(after, "socks6fast_connections_active") == 0
    assert value(after, "socks6fast_connections_max") == server.max_connections
    engine = relay_engine is not False and ENGINE_AVAILABLE
    assert value(after, "socks6fast_relay_workers") == (workers if engine else 0)
    assert (("socks6fast_relay_pipes", frozenset()) in after) == engine


async def test_metrics_refused_rule_and_failed_logins() -> None:
    """Issue 14 items 1 and 2: a CONNECT the rules refuse counts under reply 0x02; failed
    logins (SOCKS 6 0-RTT and SOCKS 5 RFC 1929) count as authentication failures and their
    records (and text log lines) name the user name tried; a good login names none."""
    config = make_config(admin=ADMIN, users=USERS, rules=[{"action": "deny", "destinations": ["127.0.0.9"]}])
    async with Sink() as sink, running_server(config) as server:
        before = await fetch(server)
        # A refused rule (authenticated).
        client = await RawClient.connect(server.addresses[0])
        await client.send(s6_connect(("127.0.0.9", 80), s6_credentials("alice", "wonderland")))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        await client.close()
        refused = await record_for(server, client)
        assert refused.failed_user is None and refused.user == "alice"
        # SOCKS 6: a wrong password.
        client = await RawClient.connect(server.addresses[0])
        await client.send(s6_connect(sink.address, s6_credentials("mallory", "guess")))
        assert (await client.auth_reply()).type == AuthReplyType.FAILURE
        await client.close()
        s6_failed = await record_for(server, client)
        # SOCKS 5: RFC 1929 with a wrong password.
        client = await RawClient.connect(server.addresses[0])
        await client.send(b"\x05\x01\x02")
        assert await client.read_exactly(2) == b"\x05\x02"
        await client.send(encode_userpass_request(UserPassRequest(b"eve o'hara", b"nope")))
        assert (await client.read_exactly(2))[1] != 0
        await client.close()
        s5_failed = await record_for(server, client)
        after = await fetch(server)
    assert (
        delta(
            before,
            after,
            "socks6fast_connections_total",
            listener="tcp",
            protocol="socks6",
            command="CONNECT",
            reply=f"{ReplyCode.NOT_ALLOWED_BY_RULESET:#04x}",
        )
        == 1
    )
    assert delta(before, after, "socks6fast_auth_failures_total") == 2
    assert s6_failed.failed_user == "mallory" and s6_failed.user is None
    assert "failed_user='mallory'" in s6_failed.log_line()
    assert s5_failed.failed_user == "eve o'hara"
    assert 'failed_user="eve o\'hara"' in s5_failed.log_line()
    assert "failed_user" not in refused.log_line()
    assert s6_failed.fields()["failed_user"] == "mallory"


async def test_metrics_udp_association(engine: str) -> None:
    """Issue 14 item 1: a SOCKS 5 UDP association that relays one datagram each way and has
    one dropped (FRAG 1, D19): the live gauge shows it while open; once it ended the
    association, datagram and payload counters moved by exactly that, and the drop is
    counted under its reason. Both UDP engines (the ``engine`` fixture)."""
    async with running_server(make_config(admin=ADMIN)) as server:
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        target = echo.getsockname()
        loop = asyncio.get_running_loop()
        before = await fetch(server)
        with echo, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            udp.setblocking(False)
            client = await RawClient.connect(server.addresses[0])
            port = udp.getsockname()[1]
            await client.send(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(4) + struct.pack(">H", port))
            assert await client.read_exactly(2) == b"\x05\x00"
            reply = await client.read_exactly(10)
            assert reply[:2] == b"\x05\x00"
            relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0])
            header = b"\x00\x00\x00\x01" + socket.inet_aton(target[0]) + struct.pack(">H", target[1])
            await loop.sock_sendto(udp, b"\x00\x00\x01" + header[3:] + b"fragment", relay)
            await loop.sock_sendto(udp, header + b"hello", relay)
            data, source = await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 5)
            assert data == b"hello"
            await loop.sock_sendto(echo, b"world!", source)
            assert await asyncio.wait_for(loop.sock_recv(udp, 100), 5) == header + b"world!"
            live = await fetch(server)
            assert value(live, "socks6fast_udp_associations_active") == 1
            assert delta(before, live, "socks6fast_udp_drops_total", reason="fragment") == 1
            await client.close()
            record = await record_for(server, client)
            assert record.command == "UDP_ASSOCIATE"
        after = await fetch(server)
    assert value(after, "socks6fast_udp_associations_active") == 0
    assert delta(before, after, "socks6fast_udp_associations_total") == 1
    assert delta(before, after, "socks6fast_udp_datagrams_total", direction="client_to_remote") == 1
    assert delta(before, after, "socks6fast_udp_datagrams_total", direction="remote_to_client") == 1
    assert delta(before, after, "socks6fast_udp_bytes_total", direction="client_to_remote") == 5
    assert delta(before, after, "socks6fast_udp_bytes_total", direction="remote_to_client") == 6
    assert delta(before, after, "socks6fast_udp_drops_total", reason="fragment") == 1
    labels = {"listener": "tcp", "protocol": "socks5", "command": "UDP_ASSOCIATE", "reply": "0x00"}
    assert delta(before, after, "socks6fast_connections_total", **labels) == 1


@pytest.mark.conformance("IDM-02", "IDM-03")
async def test_metrics_sessions_and_tokens() -> None:
    """Issue 14 item 1: real SOCKS 6 requests move the session metrics: a Session Request
    with a Token Request (one session, one window, IDM-02), a token spent (IDM-03), the same
    token replayed and rejected; the live-sessions gauge shows the session."""
    async with Sink() as sink, running_server(make_config(admin=ADMIN)) as server:
        proxy = server.addresses[0]
        before = await fetch(server)

        async def request(*options: Any) -> tuple[RawClient, Any, Any]:
            client = await RawClient.connect(proxy)
            await client.send(s6_connect(sink.address, *options))
            auth = await client.auth_reply()
            reply = await client.operation_reply() if auth.type == AuthReplyType.SUCCESS else None
            return client, auth, reply

        client, auth, reply = await request(SessionRequest(), IdempotenceRequest(8))
        assert reply is not None and reply.reply_code == ReplyCode.SUCCESS
        options = auth.options + reply.options
        sid = next(o for o in options if isinstance(o, SessionID))
        window = next(o for o in options if isinstance(o, IdempotenceWindow))
        await client.close()
        client, auth, reply = await request(sid, IdempotenceExpenditure(window.base))
        assert reply is not None and any(isinstance(o, IdempotenceAccepted) for o in auth.options)
        await client.close()
        client, auth, reply = await request(sid, IdempotenceExpenditure(window.base))
        assert reply is None and any(isinstance(o, IdempotenceRejected) for o in auth.options)
        await client.close()
        after = await fetch(server)
    assert value(after, "socks6fast_sessions_active") == 1
    for name, moved in (
        ("socks6fast_sessions_created_total", 1),
        ("socks6fast_token_windows_total", 1),
        ("socks6fast_tokens_spent_total", 1),
        ("socks6fast_tokens_rejected_total", 1),
        ("socks6fast_sessions_declined_total", 0),
    ):
        assert delta(before, after, name) == moved, name


def test_session_counters_count_declines() -> None:
    """Issue 14: a Session Request past a cap counts as declined, not created."""
    store = MemorySessionStore(SessionLimits(max_sessions=1))
    assert store.create(None, "192.0.2.1", 0.0) is not None
    assert store.create(None, "192.0.2.1", 0.0) is None
    assert (store.counters.created, store.counters.declined) == (1, 1)


async def test_healthz_and_other_paths() -> None:
    """Issue 14 item 1: /healthz answers 200 "ok" while accepting and 503 while draining;
    other paths 404, other methods 405, HEAD no body; the metrics registry is the server's
    own (the global one holds none of our metrics)."""
    async with running_server(make_config(admin=ADMIN)) as server:
        assert server.admin is not None
        base = "http://{}:{}".format(*server.admin.address)

        def get(path: str, method: str = "GET") -> tuple[int, bytes]:
            request = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert await asyncio.to_thread(get, "/healthz") == (200, b"ok\n")
        assert await asyncio.to_thread(get, "/healthz", "HEAD") == (200, b"")
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
        assert (await asyncio.to_thread(get, "/metrics", "POST"))[0] == 405
        assert b"socks6fast_" not in generate_latest(REGISTRY)
        server.stop_accepting()
        assert await asyncio.to_thread(get, "/healthz") == (503, b"draining\n")


async def test_no_admin_listener_by_default() -> None:
    """Issue 14: without [admin] nothing listens and nothing is counted."""
    async with running_server(make_config()) as server:
        assert server.admin is None and server.metrics is None


def _client_hello() -> bytes:
    """A real TLS ClientHello, from the ssl module through memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.conformance("REQ-01")
@pytest.mark.parametrize(
    ("first", "detected", "words"),
    [
        (b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n", "http", "HTTP request on the SOCKS port"),
        (b"CONNECT example.test:443 HTTP/1.1\r\n\r\n", "http", "HTTP request on the SOCKS port"),
        (None, "tls", "TLS ClientHello on the plain SOCKS port"),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00", "socks4", "SOCKS 4 request on the SOCKS port"),
        (b"\x00\x01\x02", "", ""),
    ],
    ids=["http-get", "http-connect", "tls", "socks4", "other"],
)
async def test_foreign_protocols_logged_and_answered_version_mismatch(
    first: bytes | None, detected: str, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    """REQ-01, issue 14 item 2: a client speaking HTTP, TLS (a real ClientHello) or SOCKS 4
    to the plain port still gets exactly the Version Mismatch Reply (b"\\x06", then EOF);
    its log line says what it spoke, and /metrics counts it by that name."""
    data = _client_hello() if first is None else first
    assert foreign_protocol(data) == (detected or None)
    async with running_server(make_config(admin=ADMIN)) as server:
        before = await fetch(server)
        with caplog.at_level(logging.INFO, logger="socks6fast.server"):
            client = await RawClient.connect(server.addresses[0])
            await client.send(data)
            assert await client.read_until_eof() == b"\x06"
            await client.close()
            record = await record_for(server, client)
        after = await fetch(server)
    assert record.protocol == "mismatch" and record.detected == detected
    if words:
        assert record.error == words
        assert any(
            words in r.getMessage() and f"detected={detected}" in r.getMessage() for r in caplog.records
        )
    assert delta(before, after, "socks6fast_version_mismatch_total", detected=detected or "other") == 1


def test_json_formatter_fields() -> None:
    """Issue 14 item 2: a JSON line is one object with ts in RFC 3339 UTC ("Z"), level,
    logger and msg; a connection line carries the record's fields instead of msg."""
    record = logging.LogRecord("socks6fast.server", logging.INFO, "", 0, "hello %s", ("world",), None)
    record.created = 1_800_000_000.25
    line = json.loads(JsonFormatter().format(record))
    assert line == {
        "ts": "2027-01-15T08:00:00.250Z",
        "level": "info",
        "logger": "socks6fast.server",
        "msg": "hello world",
    }
    assert datetime.datetime.fromisoformat(line["ts"]).utcoffset() == datetime.timedelta(0)
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def _serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "socks6fast", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_json_log_of_a_real_server(tmp_path: Path) -> None:
    """Issue 14 item 2: ``socks6fast serve`` with ``log_format = "json"``: every stderr line
    is one JSON object (json.loads) with a UTC ts; each finished connection is one object
    with the text line's fields (client, proto, user, cmd, dst, reply, up, down, dur, relay,
    end, close) and, for a failed login, failed_user; the admin listener serves /metrics."""
    port, admin = _free_port(), _free_port()
    config = tmp_path / "json.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nlog_format = "json"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[users]\nalice = "{cheap_hash("wonderland")}"\n'
    )
    process = _serve(config)
    try:
        async with Sink() as sink:
            destination = "{}:{}".format(*sink.address)
            for _ in range(200):
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1).close()
                    break
                await asyncio.sleep(0.05)
            for user, password in (("alice", "wonderland"), ("mallory", "guess")):
                client = await RawClient.connect(("127.0.0.1", port))
                await client.send(s6_connect(sink.address, s6_credentials(user, password)) + b"data")
                await client.auth_reply()
                if user == "alice":
                    assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
                    assert await client.read_exactly(4) == b"data"
                await client.close()
            text = (await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/metrics")).decode()
            assert "socks6fast_auth_failures_total 1.0" in text
            await asyncio.sleep(0.3)
    finally:
        process.terminate()
        _, stderr = await asyncio.to_thread(process.communicate, timeout=15)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert lines, stderr
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line
        assert datetime.datetime.fromisoformat(line["ts"]).tzinfo is not None
    connections = [line for line in lines if line.get("event") == "connection"]
    assert len(connections) == 2, lines
    good, bad = connections
    expected = {
        "client",
        "listener",
        "proto",
        "user",
        "cmd",
        "dst",
        "reply",
        "up",
        "down",
        "dur",
        "relay",
        "end",
        "close",
    }
    assert expected <= good.keys()
    assert (good["user"], good["cmd"], good["reply"], good["up"], good["down"]) == (
        "alice",
        "CONNECT",
        0,
        4,
        4,
    )
    assert good["dst"] == destination and "failed_user" not in good
    assert bad["failed_user"] == "mallory" and bad["user"] is None
    assert any("admin listener on" in line.get("msg", "") for line in lines)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"listen": "nowhere"}, 'admin.listen: "nowhere" is not HOST:PORT'),
        ({"listen": 70000}, "admin.listen: 70000 is not a port 0-65535"),
        ({"listen": True}, "admin.listen: true is not a string HOST:PORT"),
        ({"listen": "127.0.0.1:1080"}, 'admin.listen: "127.0.0.1:1080" is already used by server.listen'),
        ({"port": 9180}, "admin.port"),
    ],
)
def test_admin_config_mistakes(admin: dict[str, Any], message: str) -> None:
    """Issue 14: [admin] mistakes are one sentence naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"listen": ["127.0.0.1:1080"]}, "admin": admin})
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_admin_config_forms() -> None:
    """Issue 14: off by default; a bare port (number or text) is loopback; a named address
    stands, and one that is not loopback is flagged as exposed."""
    assert parse_config({}).admin.listen is None
    assert parse_config({"admin": {"listen": 9180}}).admin.listen == ("127.0.0.1", 9180)
    assert parse_config({"admin": {"listen": "9180"}}).admin.listen == ("127.0.0.1", 9180)
    named = parse_config({"admin": {"listen": "[::1]:9180"}}).admin
    assert named.listen == ("::1", 9180) and not named.exposed
    assert parse_config({"admin": {"listen": "0.0.0.0:9180"}}).admin.exposed
    assert parse_config({"server": {"log_format": "json"}}).server.log_format == "json"
    with pytest.raises(ConfigError, match=r'^server.log_format: "xml" is not "text" or "json"$'):
        parse_config({"server": {"log_format": "xml"}})


def test_check_config_admin(tmp_path: Path) -> None:
    """Issue 14: check-config validates [admin] (one sentence, exit 2) and warns about an
    admin listener that is not loopback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[admin]\nlisten = "127.0.0.1:99999"\n')
    out = subprocess.run(
        [sys.executable, "-P", "-m", "socks6fast", "check-config", str(bad)], capture_output=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.decode().count("\n") == 1 and "admin.listen" in out.stderr.decode()
    assert b"Traceback" not in out.stderr
    exposed = tmp_path / "exposed.toml"
    exposed.write_text('[admin]\nlisten = "0.0.0.0:9180"\n')
    out = subprocess.run(
        [sys.executable, "-P", "-m", "socks6fast", "check-config", str(exposed)],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert b"admin.listen 0.0.0.0 is not loopback" in out.stderr


async def test_admin_port_taken_is_one_sentence(tmp_path: Path) -> None:
    """Issue 14: an admin address that cannot be bound stops the start with an OSError
    naming admin.listen, and nothing stays bound."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(make_config(admin={"listen": f"127.0.0.1:{port}"}))
        with pytest.raises(OSError, match=rf"admin.listen 127.0.0.1:{port}: "):
            await server.start()
        assert server.addresses == []
        await server.close(drain_timeout=0)
