"""PROXY protocol listeners end to end (issue 14 item 3, docs/decisions.md D27).

Behind a real HAProxy (Debian's ``haproxy``, started here with a generated configuration:
``mode tcp``, ``send-proxy-v2`` and ``send-proxy``, listening on 127.0.0.1 only, in the
foreground, killed at teardown): curl and raw SOCKS 6 / SOCKS 5 clients reach the proxy
through it from 127.0.0.2 and 127.0.0.3, and a rule that allows one and denies the other
proves that the address in the header, not HAProxy's 127.0.0.1, reached the rules; the log
line names the real client and the balancer. Without HAProxy, a raw socket plays the
balancer (or a stranger) to reach what HAProxy never sends: LOCAL, malformed, truncated,
oversized and slow headers, and a header from an untrusted peer. Generated (mutated) headers
are sent only inside a private network namespace (``unshare -n``, loopback up).

HAProxy missing: the HAProxy tests skip and say so (CI installs it, .ci/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers_server import (
    RawClient,
    Sink,
    curl,
    make_certificates,
    make_config,
    running_server,
)
from helpers_udp import has_ipv6_loopback

import socks6fast
from socks6fast.asyncio.server import ConnectionRecord, Server
from socks6fast.config import Config
from socks6fast.constants import AddressType, Command, ReplyCode
from socks6fast.proto import codec
from socks6fast.proto.messages import Request
from socks6fast.proto.proxy_header import MAX_V2_LENGTH, V2_SIGNATURE

HAPROXY = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; CI installs it)"
)

#: The load balancer's address (HAProxy, or the raw socket standing in for it).
BALANCER = "127.0.0.1"
#: Clients the rules tell apart: ALLOWED may do anything, DENIED nothing; anyone else (and
#: so the balancer itself, had its address been taken for the client's) is denied too.
ALLOWED = "127.0.0.2"
DENIED = "127.0.0.3"
#: Where the fixture's readiness probes of HAProxy come from.
PROBE = "127.0.0.4"
RULES: list[dict[str, Any]] = [
    {"action": "deny", "clients": [DENIED]},
    {"action": "allow", "clients": [ALLOWED]},
]
#: Handshake deadline of the servers here (the PROXY header's too).
HANDSHAKE_TIMEOUT = 1.0


def proxy_listener(trusted: str = BALANCER) -> dict[str, Any]:
    return {"address": "127.0.0.1:0", "proxy_protocol": True, "proxy_protocol_from": [trusted]}


def pp_config(default_action: str = "deny", **server: Any) -> Config:
    table: dict[str, Any] = {"listen": [proxy_listener()], "handshake_timeout": HANDSHAKE_TIMEOUT}
    table.update(server)
    return make_config(rules=RULES, default_action=default_action, server=table)


def v2_header(source: tuple[str, int], destination: tuple[str, int], *, command: int = 0x1) -> bytes:
    """signature | 0x21 (v2, PROXY) | 0x11 or 0x21 (TCP over IPv4 / IPv6) | length | block"""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def connect_request(host: str, port: int) -> bytes:
    return codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, host, port, ()))


async def records_of(
    server: Server, host: str, count: int = 1, timeout: float = 5.0
) -> list[ConnectionRecord]:
    """The first ``count`` finished connections whose client address is ``host``."""
    async with asyncio.timeout(timeout):
        while True:
            found = [record for record in server.records if record.client[0] == host]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.01)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- HAProxy ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HAProxy:
    """A real HAProxy in TCP mode in front of the proxy: one frontend per backend address
    given, each with its own ``server`` options (``send-proxy-v2`` or ``send-proxy``).

    Args:
        directory: where its configuration and output go.
        backends: name -> (the proxy's address, server options).
    """

    def __init__(self, directory: Path, backends: dict[str, tuple[tuple[str, int], str]]) -> None:
        self.directory = directory
        self.backends = backends
        self.ports: dict[str, int] = {name: free_port() for name in backends}
        self.process: asyncio.subprocess.Process | None = None

    def address(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[name])

    def configuration(self) -> str:
        lines = [
            "global",
            "    maxconn 256",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
        ]
        for name, ((host, port), options) in self.backends.items():
            lines += [
                f"listen {name}",
                f"    bind 127.0.0.1:{self.ports[name]}",
                f"    server s {host}:{port} {options}",
            ]
        return "\n".join(lines) + "\n"

    async def __aenter__(self) -> HAProxy:
        assert HAPROXY is not None
        path = self.directory / "haproxy.cfg"
        path.write_text(self.configuration())
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stdout + check.stderr
        log = (self.directory / "haproxy.out").open("wb")
        # -db: stay in the foreground (no daemon), so the process we kill is HAProxy itself.
        self.process = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(path), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            async with asyncio.timeout(10):
                for name in self.backends:
                    while True:
                        assert self.process.returncode is None, (self.directory / "haproxy.out").read_text()
                        with contextlib.suppress(OSError):
                            # From PROBE: its records are not mistaken for a client's.
                            _, writer = await asyncio.open_connection(
                                *self.address(name), local_addr=(PROBE, 0)
                            )
                            writer.close()
                            break
                        await asyncio.sleep(0.05)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def haproxy_in_front(
    tmp_path: Path, server: Server, tls_server: Server | None = None
) -> AsyncIterator[HAProxy]:
    backends = {
        "v2": (server.addresses[0], "send-proxy-v2"),
        "v1": (server.addresses[0], "send-proxy"),
    }
    if tls_server is not None:
        backends["tls"] = (tls_server.tls_addresses[0], "send-proxy-v2")
    async with HAProxy(tmp_path, backends) as haproxy:
        yield haproxy


# --- behind HAProxy -----------------------------------------------------------------------


@needs_haproxy
async def test_haproxy_curl_real_client_reaches_rules_and_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """curl (SOCKS 5) through HAProxy, send-proxy-v2 and send-proxy: from 127.0.0.2 the rules
    allow it and the page comes back; from 127.0.0.3 the rule denying that address answers
    0x02 (curl: exit 97). HAProxy's own 127.0.0.1 is denied by default, so the allowed
    request proves the header's address was used. The log line names the real client and
    HAProxy (proxied_by=)."""
    caplog.set_level(logging.INFO, logger="socks6fast.server")
    async with (
        Sink(mode="http", body=b"through haproxy\n") as sink,
        running_server(pp_config()) as server,
        haproxy_in_front(tmp_path, server) as haproxy,
    ):
        url = f"http://{sink.address[0]}:{sink.address[1]}/"
        for name in ("v2", "v1"):
            front = haproxy.address(name)
            proxy = f"socks5h://{front[0]}:{front[1]}"
            code, out, err = await curl("--interface", ALLOWED, "--proxy", proxy, url)
            assert (code, out) == (0, b"through haproxy\n"), (name, err)
            code, out, err = await curl("--interface", DENIED, "--proxy", proxy, url)
            assert code == 97, (name, code, err)  # CURLE_PROXY: the SOCKS reply was not success
        allowed = await records_of(server, ALLOWED, 2)
        denied = await records_of(server, DENIED, 2)
    for record in allowed:
        assert record.protocol == "socks5" and record.reply_code == 0
        assert record.proxied_by is not None and record.proxied_by[0] == BALANCER
        assert record.client[1] != record.proxied_by[1]  # curl's port, not HAProxy's
    for record in denied:
        assert record.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET and record.bytes_up == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "socks6fast.server"]
    for record in allowed + denied:
        line = record.log_line()
        assert line in lines
        assert line.startswith(f"client={record.client[0]}:{record.client[1]} proxied_by={BALANCER}:")
        fields = record.fields()  # the JSON log's (log_format = "json")
        assert fields["client"] == f"{record.client[0]}:{record.client[1]}"
        assert fields["proxied_by"] == f"{BALANCER}:{record.proxied_by[1]}"
    assert not any(record.client[0] == BALANCER for record in server.records)


@needs_haproxy
async def test_haproxy_socks6_over_tls_with_send_proxy_v2(tmp_path: Path) -> None:
    """A TLS listener behind HAProxy: the header comes before the ClientHello, is consumed
    exactly (MSG_PEEK), the TLS handshake and a SOCKS 6 CONNECT follow; the rules see the
    client's 127.0.0.2 (allowed, echo) and 127.0.0.3 (Connection not allowed by ruleset)."""
    certs = make_certificates(tmp_path)
    tls = {"tls_listen": [proxy_listener()], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    context = ssl.create_default_context(cafile=str(certs.ca))
    async with (
        Sink() as sink,
        running_server(pp_config()) as server,
        running_server(pp_config(listen=["127.0.0.1:0"], **tls)) as tls_server,
        haproxy_in_front(tmp_path, server, tls_server) as haproxy,
    ):
        results = {}
        for source in (ALLOWED, DENIED):
            client = await RawClient.connect(
                haproxy.address("tls"), ssl=context, server_hostname="localhost", local_addr=(source, 0)
            )
            await client.send(connect_request(*sink.address) + b"tls payload")
            await client.auth_reply()
            reply = await client.operation_reply()
            if reply.reply_code == ReplyCode.SUCCESS:
                assert await client.read_exactly(11) == b"tls payload"
            results[source] = reply.reply_code
            await client.close()
        assert results == {ALLOWED: ReplyCode.SUCCESS, DENIED: ReplyCode.NOT_ALLOWED_BY_RULESET}
        records = await records_of(tls_server, ALLOWED) + await records_of(tls_server, DENIED)
    for record in records:
        assert record.listener == "tls" and record.protocol == "socks6"
        assert record.proxied_by is not None and record.proxied_by[0] == BALANCER


@needs_haproxy
async def test_haproxy_socks5_udp_associate_takes_datagrams_from_the_real_client(tmp_path: Path) -> None:
    """D27 with D19: SOCKS 5 UDP ASSOCIATE through a TCP-only balancer. The datagrams come
    straight from the client (127.0.0.2), not through HAProxy; the association accepts
    them because its client is the header's address. Were it HAProxy's 127.0.0.1, D19
    would drop them (the rules allow everyone else here, so only that check decides)."""
    loop = asyncio.get_running_loop()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mine.bind((ALLOWED, 0))
    mine.setblocking(False)
    try:
        config = pp_config(default_action="allow")
        async with running_server(config) as server, haproxy_in_front(tmp_path, server) as haproxy:
            client = await RawClient.connect(haproxy.address("v2"), local_addr=(ALLOWED, 0))
            await client.send(b"\x05\x01\x00")
            assert await client.read_exactly(2) == b"\x05\x00"
            port = mine.getsockname()[1]
            await client.send(b"\x05\x03\x00\x01" + socket.inet_aton(ALLOWED) + struct.pack("!H", port))
            reply = await client.read_exactly(10)
            assert reply[:4] == b"\x05\x00\x00\x01", reply.hex()
            relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
            target = echo.getsockname()
            header = b"\x00\x00\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1])
            await loop.sock_sendto(mine, header + b"ping", relay)
            async with asyncio.timeout(5):
                data, source = await loop.sock_recvfrom(echo, 2048)
            assert data == b"ping"
            await loop.sock_sendto(echo, b"pong", source)
            async with asyncio.timeout(5):
                back, _ = await loop.sock_recvfrom(mine, 2048)
            assert back == header + b"pong"
            await client.close()
            (record,) = await records_of(server, ALLOWED)
    finally:
        echo.close()
        mine.close()
    assert record.command == "UDP_ASSOCIATE" and record.datagrams_up == 1 and record.datagrams_down == 1
    assert record.proxied_by is not None and record.proxied_by[0] == BALANCER


# --- a raw socket as the balancer (what HAProxy never sends) -------------------------------


async def test_untrusted_peer_is_refused_with_or_without_a_header() -> None:
    """proxy-protocol.txt section 5: a header is taken only from the trusted balancers. A
    peer outside proxy_protocol_from is closed without a byte read or sent, whether it sends
    a header (which would let it pick the address the rules see) or plain SOCKS (D27: a
    PROXY protocol listener serves its balancers only); the log names the peer."""
    async with running_server(pp_config()) as server:
        address = server.addresses[0]
        spoof = v2_header((ALLOWED, 1234), address) + b"\x05\x01\x00"
        for payload in (spoof, b"\x05\x01\x00", b""):
            client = await RawClient.connect(address, local_addr=(DENIED, 0))
            if payload:
                with contextlib.suppress(ConnectionError):
                    await client.send(payload)
            with contextlib.suppress(ConnectionError):
                assert await client.read_until_eof() == b""
            await client.close()
        records = await records_of(server, DENIED, 3)
    for record in records:
        assert record.proxied_by is None and record.protocol == "-"
        assert "not in proxy_protocol_from" in record.error
        assert "proxied_by" not in record.log_line()


async def test_trusted_balancer_header_forms() -> None:
    """A trusted balancer's v1 header sent one byte at a time, v2 with the SOCKS 6 request
    in the same write, and v2 LOCAL (a health check: the balancer's own address applies,
    which the rules deny here) all work; the surplus after the header is the request."""
    async with Sink() as sink, running_server(pp_config()) as server:
        address = server.addresses[0]
        request = connect_request(*sink.address)

        async def through(header: bytes, *, bytewise: bool = False) -> int:
            client = await RawClient.connect(address, local_addr=(BALANCER, 0))
            if bytewise:
                for i in range(len(header)):
                    await client.send(header[i : i + 1])
                    await asyncio.sleep(0.002)
                header = b""
            await client.send(header + request + b"x")
            await client.auth_reply()
            code = (await client.operation_reply()).reply_code
            if code == ReplyCode.SUCCESS:
                assert await client.read_exactly(1) == b"x"
            await client.close()
            return int(code)

        v1 = f"PROXY TCP4 {ALLOWED} {address[0]} 40001 {address[1]}\r\n".encode()
        assert await through(v1, bytewise=True) == ReplyCode.SUCCESS
        assert await through(v2_header((ALLOWED, 40002), address)) == ReplyCode.SUCCESS
        assert await through(v2_header((DENIED, 40003), address)) == ReplyCode.NOT_ALLOWED_BY_RULESET
        local = v2_header((ALLOWED, 40004), address, command=0x0)  # LOCAL: addresses ignored
        assert await through(local) == ReplyCode.NOT_ALLOWED_BY_RULESET
        records = await records_of(server, ALLOWED, 2)
        assert sorted(r.client[1] for r in records) == [40001, 40002]
        (health,) = await records_of(server, BALANCER)
        assert health.proxied_by is not None and health.client == health.proxied_by


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_tcp6_header_and_ipv6_balancer() -> None:
    """TCP6 in the header, and a balancer reaching an IPv6 listener (trusted as ::1)."""
    config = pp_config(
        listen=[{"address": "[::1]:0", "proxy_protocol": True, "proxy_protocol_from": ["::1"]}]
    )
    async with Sink() as sink, running_server(config) as server:
        address = server.addresses[0]
        client = await RawClient.connect(address)
        header = f"PROXY TCP6 ::ffff:{ALLOWED} ::1 40005 {address[1]}\r\n".encode()
        await client.send(header + connect_request(*sink.address))
        await client.auth_reply()
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        await client.close()
        (record,) = await records_of(server, ALLOWED)  # the mapped address, written as IPv4
        assert record.client == (ALLOWED, 40005) and record.proxied_by is not None
        assert record.proxied_by[0] == "::1"


async def test_bad_headers_close_cleanly_with_a_log_line() -> None:
    """From the trusted balancer: a malformed, an oversized (refused from its first 16
    bytes, without waiting), a truncated-then-silent and a missing header each end in a
    close without a reply and a record saying why; nothing hangs past the handshake
    timeout, and no descriptor is left behind."""
    async with running_server(pp_config()) as server:
        address = server.addresses[0]
        loop = asyncio.get_running_loop()
        before = open_descriptors()
        oversized = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH)
        cases = {
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n": ("bare LF", False),
            b"\x05\x01\x00": ("SOCKS 5, not a PROXY header", False),
            oversized: ("longer than 4096", False),
            v2_header((ALLOWED, 1), address)[:20]: ("none within 1s", True),
            b"": ("none within 1s", True),
        }
        for payload, (why, slow) in cases.items():
            client = await RawClient.connect(address, local_addr=(BALANCER, 0))
            started = loop.time()
            if payload:
                await client.send(payload)
            with contextlib.suppress(ConnectionError):
                assert await client.read_until_eof(timeout=HANDSHAKE_TIMEOUT + 3) == b""
            took = loop.time() - started
            await client.close()
            assert took < HANDSHAKE_TIMEOUT + 2
            if not slow:
                assert took < HANDSHAKE_TIMEOUT / 2, (why, took)
        records = await records_of(server, BALANCER, len(cases))
        errors = [record.error for record in records]
        for why, _ in cases.values():
            assert any(why in error for error in errors), (why, errors)
        assert all(error.startswith("PROXY header: ") for error in errors)
        async with asyncio.timeout(5):
            while server.active_connections or open_descriptors() > before:
                await asyncio.sleep(0.02)


async def test_full_proxy_answers_the_client_behind_the_balancer() -> None:
    """At max_connections (issue 12 defect 3) the refusal reads past a trusted balancer's
    header and answers the client's SOCKS 5 request REP 0x01 (General Failure), as it would
    a direct client; a stranger is closed without a byte."""
    async with running_server(pp_config(max_connections=1)) as server:
        address = server.addresses[0]
        holder = await RawClient.connect(address, local_addr=(BALANCER, 0))
        await holder.send(v2_header((ALLOWED, 40010), address))  # and nothing more: holds the slot
        async with asyncio.timeout(5):
            while server.active_connections < 1:
                await asyncio.sleep(0.01)
        client = await RawClient.connect(address, local_addr=(BALANCER, 0))
        await client.send(v2_header((ALLOWED, 40011), address) + b"\x05\x01\x00")
        assert await client.read_exactly(2) == b"\x05\x00"
        await client.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
        reply = await client.read_exactly(10)
        assert reply[:2] == b"\x05\x01", reply.hex()
        await client.close()
        stranger = await RawClient.connect(address, local_addr=(DENIED, 0))
        with contextlib.suppress(ConnectionError):
            await stranger.send(b"\x05\x01\x00")
            assert await stranger.read_until_eof() == b""
        await stranger.close()
        await holder.close()


async def test_reload_replaces_the_trusted_balancers() -> None:
    """SIGHUP (Server.reload): new proxy_protocol_from networks apply to the listener at once."""
    async with Sink() as sink, running_server(pp_config()) as server:
        address = server.addresses[0]
        header = v2_header((ALLOWED, 40006), address) + connect_request(*sink.address)
        server.reload(pp_config(listen=[proxy_listener(trusted="127.0.0.9")]))
        client = await RawClient.connect(address, local_addr=(BALANCER, 0))
        with contextlib.suppress(ConnectionError):
            await client.send(header)
            assert await client.read_until_eof() == b""
        await client.close()
        (refused,) = await records_of(server, BALANCER)
        assert "not in proxy_protocol_from" in refused.error
        server.reload(pp_config())
        client = await RawClient.connect(address, local_addr=(BALANCER, 0))
        await client.send(header)
        await client.auth_reply()
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        await client.close()
        (record,) = await records_of(server, ALLOWED)
        assert record.client == (ALLOWED, 40006)


# --- generated headers, in a private network namespace -------------------------------------

#: Connections the fuzz run makes (bounded) and its overall time limit.
FUZZ_CONNECTIONS = 400
FUZZ_SECONDS = 40.0


def _mutations(seed: int, address: tuple[str, int]) -> list[bytes]:
    rng = random.Random(seed)
    request = connect_request("127.0.0.1", 9)
    valid = [
        f"PROXY TCP4 {ALLOWED} 127.0.0.1 40000 {address[1]}\r\n".encode(),
        b"PROXY TCP6 ::1 ::1 1 2\r\n",
        b"PROXY UNKNOWN\r\n",
        v2_header((ALLOWED, 40000), address),
        v2_header((ALLOWED, 40000), address, command=0x0),
        v2_header(("::1", 1), ("::1", 2)) + b"\x04\x00\x03abc",
    ]
    out = []
    for _ in range(FUZZ_CONNECTIONS):
        data = bytearray(rng.choice(valid) + request)
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            kind = rng.random()
            position = rng.randrange(len(data))
            if kind < 0.5:
                data[position] = rng.randrange(256)
            elif kind < 0.7:
                del data[position:]
            elif kind < 0.85:
                data[position:position] = rng.randbytes(rng.randint(1, 64))
            else:
                data[14:16] = struct.pack("!H", rng.randrange(65536)) if len(data) > 16 else data[14:16]
        out.append(bytes(data))
    return out


async def _fuzz_scenario() -> dict[str, Any]:
    """Inside the namespace: mutated headers from the trusted balancer, 50 connections at a
    time, half of them closing their side after sending; then one valid connection."""
    out: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    async with Sink() as sink, running_server(pp_config()) as server:
        address = server.addresses[0]
        before = open_descriptors()
        limit = asyncio.Semaphore(50)
        outcomes = {"closed": 0, "answered": 0, "stuck": 0}

        async def one(index: int, payload: bytes) -> None:
            async with limit:
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    sock.bind((BALANCER, 0))
                    await loop.sock_connect(sock, address)
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(sock, payload)
                        if index % 2:
                            sock.shutdown(socket.SHUT_WR)
                    async with asyncio.timeout(HANDSHAKE_TIMEOUT + 4):
                        answered = False
                        while True:
                            try:
                                data = await loop.sock_recv(sock, 65536)
                            except OSError:
                                break
                            if not data:
                                break
                            if not answered and index % 2 == 0:
                                with contextlib.suppress(OSError):
                                    sock.shutdown(socket.SHUT_WR)  # relayed somewhere: end it
                            answered = True
                    outcomes["answered" if answered else "closed"] += 1
                except TimeoutError:
                    outcomes["stuck"] += 1
                finally:
                    sock.close()

        async with asyncio.timeout(FUZZ_SECONDS):
            await asyncio.gather(*(one(i, p) for i, p in enumerate(_mutations(14, address))))
        out["outcomes"] = outcomes
        out["internal_errors"] = [r.error for r in server.records if "internal error" in r.error]
        async with asyncio.timeout(5):
            while server.active_connections:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        out["descriptors_left"] = open_descriptors() - before
        client = await RawClient.connect(address, local_addr=(BALANCER, 0))
        await client.send(v2_header((ALLOWED, 40009), address) + connect_request(*sink.address) + b"ok")
        await client.auth_reply()
        out["after"] = int((await client.operation_reply()).reply_code)
        out["echo"] = (await client.read_exactly(2)).decode()
        await client.close()
    return out


def test_generated_headers_in_a_private_namespace() -> None:
    """400 mutated headers (flipped bytes, cuts, insertions, wild v2 lengths) from a trusted
    balancer, in a network namespace of their own: every connection ends (none outlives the
    handshake timeout), no internal error, no descriptor left behind, and the listener
    still serves a valid connection afterwards."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare -n and iproute2")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(socks6fast.__file__).resolve().parent.parent)])
    )
    tests = Path(__file__).resolve().parent
    script = f'ip link set lo up && cd "{tests}" && exec "{sys.executable}" "{Path(__file__).name}" fuzz'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["outcomes"]["stuck"] == 0, out
    assert sum(out["outcomes"].values()) == FUZZ_CONNECTIONS, out
    assert out["internal_errors"] == [], out
    assert out["descriptors_left"] <= 0, out
    assert (out["after"], out["echo"]) == (ReplyCode.SUCCESS, "ok"), out


if __name__ == "__main__" and sys.argv[1:] == ["fuzz"]:
    print(json.dumps(asyncio.run(_fuzz_scenario())))
