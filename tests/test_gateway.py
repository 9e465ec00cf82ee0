"""`socks6fast gateway` (issue 15 item 1): real curl through a real gateway to a real proxy.

The gateway and the proxy run in this process (their counters and logs are read
directly); curl is the real /usr/bin/curl. Every scenario also checks that the process
holds no more descriptors afterwards than before (no leaked fd).

These tests do not depend on the SOCKS 6 codec twin beyond what the server tests cover,
so the ``SOCKS6FAST_NO_EXTENSIONS=1`` run skips them (``pytestmark``), except the sans-IO
HTTP parsing and the configuration checks, which are cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers_server import Sink, curl, make_certificates, make_config, running_server

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.asyncio import gateway as gateway_module
from socks6fast.asyncio.gateway import Gateway
from socks6fast.config import ConfigError
from socks6fast.gateway_config import GatewayConfig, parse_gateway_config, parse_upstream
from socks6fast.proto.client import SessionState
from socks6fast.proto.http_proxy import BodyFramer, HTTPRequestError, parse_request_head

CURL = Path("/usr/bin/curl").exists()
needs_curl = pytest.mark.skipif(not CURL, reason="needs /usr/bin/curl")
#: End-to-end scenarios: once per CI run (the codec twin does not change them).
e2e = pytest.mark.skipif(NO_EXTENSIONS, reason="gateway e2e runs once, in the extensions run")
USERS = {"alice": "wonderland"}
BODY = b"<h1>through the gateway</h1>\n"
#: Method selection (no authentication) and a SOCKS 5 success reply with BND 0.0.0.0:0.
SOCKS5_OK = b"\x05\x00\x05\x00\x00\x01" + bytes(6)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _url(address: tuple[str, int], *, tls: bool = False, user: bool = True) -> str:
    scheme = "socks6+tls" if tls else "socks6"
    cred = "alice:wonderland@" if user else ""
    return f"{scheme}://{cred}{address[0]}:{address[1]}"


@contextlib.asynccontextmanager
async def gateway(upstream: str, **changes: Any) -> AsyncIterator[Gateway]:
    """A Gateway on 127.0.0.1:0 towards ``upstream``."""
    config = GatewayConfig(upstream=parse_upstream(upstream), listen=(("127.0.0.1", 0),)).replace(**changes)
    gw = Gateway(config)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


async def _settle(gw: Gateway, timeout: float = 5.0) -> None:
    """Wait until the warm session is established (with its token window)."""
    async with asyncio.timeout(timeout):
        while gw.session.core.state is not SessionState.ACTIVE:
            await asyncio.sleep(0.01)


async def _idle(gw: Gateway, timeout: float = 5.0) -> None:
    """Wait until every app connection's handler has ended (its log line is written)."""
    async with asyncio.timeout(timeout):
        while len(gw._tasks) > len(gw._listeners) + 1:  # the accept loops and the keep-warm task
            await asyncio.sleep(0.01)


def _proxy(gw: Gateway) -> str:
    return "{}:{}".format(*gw.addresses[0])


async def _fd_settle(before: int) -> int:
    for _ in range(100):
        if _fds() <= before:
            break
        await asyncio.sleep(0.02)
    return _fds()


# --- sans-IO: HTTP proxy requests ----------------------------------------------------------


def test_http_absolute_form_is_rewritten() -> None:
    """Absolute form becomes origin form; hop-by-hop headers go, Connection: close is added."""
    head = (
        b"PUT http://example.test:8080/a?b=1 HTTP/1.1\r\nHost: example.test:8080\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n"
        b"Content-Length: 4\r\n\r\nBODY"
    )
    request = parse_request_head(head)
    assert request is not None and not request.connect
    assert (request.host, request.port) == ("example.test", 8080)
    assert request.forward == (
        b"PUT /a?b=1 HTTP/1.1\r\nHost: example.test:8080\r\nAccept: */*\r\nContent-Length: 4\r\n"
        b"Connection: close\r\n\r\nBODY"
    )
    connect = parse_request_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\nhello")
    assert connect is not None and connect.connect
    assert (connect.host, connect.port, connect.forward) == ("::1", 443, b"hello")
    assert parse_request_head(b"GET http://x/ HTTP/1.1\r\n") is None


def test_http_absolute_form_host_is_the_target() -> None:
    """RFC 9112 section 3.2.2 (probe G-1): a proxy MUST ignore the received Host of an
    absolute-form request and write the target's authority (port only when not 80)."""
    cases = [
        (b"GET http://origin.test:8080/p?q=1 HTTP/1.1\r\nHost: evil.test\r\nX-Keep: yes\r\n\r\n",
         b"GET /p?q=1 HTTP/1.1\r\nHost: origin.test:8080\r\nX-Keep: yes\r\nConnection: close\r\n\r\n"),
        (b"GET http://origin.test HTTP/1.1\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"),
        (b"GET http://[::1]:80/ HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"),
    ]  # fmt: skip
    for head, forward in cases:
        request = parse_request_head(head)
        assert request is not None and request.forward == forward


def test_http_body_framing_stops_at_the_first_request() -> None:
    """Probe G-4: only the first request's body goes to its origin, framed by Content-Length
    or chunked (RFC 9112 sections 6.3, 7.1); a pipelined request after it is not forwarded."""
    second = b"GET http://two.test/ HTTP/1.1\r\nHost: two.test\r\n\r\n"
    request = parse_request_head(b"GET http://one.test/ HTTP/1.1\r\nHost: one.test\r\n\r\n" + second)
    assert request is not None and request.body is not None and request.body.done
    assert request.forward.endswith(b"Connection: close\r\n\r\n")
    assert request.body.feed(second) == b""
    request = parse_request_head(b"POST http://one.test/ HTTP/1.1\r\nContent-Length: 6\r\n\r\nab")
    assert request is not None and request.body is not None and not request.body.done
    assert request.forward.endswith(b"\r\n\r\nab")
    assert request.body.feed(b"cdef" + second) == b"cdef" and request.body.done
    chunked = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
    for step in (1, 3, len(chunked) + len(second)):  # byte by byte, and in one piece
        framer = BodyFramer(None)
        data = chunked + second
        taken = b"".join(framer.feed(data[i : i + step]) for i in range(0, len(data), step))
        assert taken == chunked and framer.done
    for bad in (b"zz\r\n", b"4\r\nWikiX\r\n", b"4\nWiki\r\n", b"1" * 20 + b"\r\n"):
        with pytest.raises(HTTPRequestError) as info:
            BodyFramer(None).feed(bad)
        assert info.value.status == 400


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # Probe G-3, RFC 9112 section 6.3 items 3 and 4.
        (b"POST http://x/ HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST http://x/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST http://x/ HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST http://x/ HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", 400),
        (b"POST http://x/ HTTP/1.1\r\nContent-Length: -4\r\n\r\n", 400),
        # Probe G-5, RFC 9112 section 3.2.3, RFC 9110 section 4.2.4.
        (b"CONNECT a.test:80:90 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT u:p@a.test:80 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT ::1:7 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT " + b"a" * 256 + b":80 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a\x1bb.test:80 HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a\x7fb.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET https://x/ HTTP/1.1\r\n\r\n", 501),
        (b"GET /relative HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT x HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT x:99999 HTTP/1.1\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n" + b"A: b\r\n" * 6000, 431),
    ],
)
def test_http_bad_requests(head: bytes, status: int) -> None:
    with pytest.raises(HTTPRequestError) as info:
        parse_request_head(head)
    assert info.value.status == status


def test_gateway_config_checks() -> None:
    """[gateway]: defaults, and one sentence naming the key for each mistake."""
    config = parse_gateway_config({"gateway": {"upstream": "socks6+tls://alice@proxy.test:1443"}})
    assert config.upstream is not None and config.upstream.username == b"alice"
    assert config.upstream.password == b"" and config.upstream.tls
    assert (config.mode, config.first_data_wait, config.tfo, config.upstream_verify) == (
        "optimistic",
        0.005,
        True,
        True,
    )
    for table, key in (
        ({"mode": "eager"}, "gateway.mode"),
        ({"upstream": "http://x"}, "gateway.upstream"),
        ({"listen": ["nowhere"]}, "gateway.listen[0]"),
        ({"first_data_wait_ms": -1}, "gateway.first_data_wait_ms"),
        ({"tokens": -1}, "gateway.tokens"),
        ({"upstream_ca": "/nonexistent.pem"}, "gateway.upstream_ca"),
        ({"colour": 1}, "gateway.colour"),
    ):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_gateway_config({"gateway": table})


# --- curl through the gateway ----------------------------------------------------------


@e2e
@needs_curl
@pytest.mark.conformance("SES-02", "IDM-04", "IDM-05", "CMD-03")
async def test_curl_socks5_and_http_through_gateway(caplog: pytest.LogCaptureFixture) -> None:
    """curl --socks5-hostname (with and without a local username/password) and curl -x http://
    (absolute-form GET) fetch a page through the gateway and a password-protected proxy: the
    first request starts the session with 0-RTT credentials, the others carry its Session ID
    (SES-02) and spend idempotence tokens smallest first (IDM-05), with the app's bytes as
    initial data (CMD-03). One log line per connection."""
    caplog.set_level(logging.INFO, "socks6fast.gateway")
    before = _fds()
    config = make_config(users=USERS, sessions={"max_token_window": 16})
    async with Sink(mode="http", body=BODY) as http, running_server(config) as server:
        async with gateway(_url(server.addresses[0]), tokens=16, admin_listen=("127.0.0.1", 0)) as gw:
            await _settle(gw)
            window = gw.session.core.window
            assert window is not None
            url = f"http://localhost:{http.address[1]}/page"
            for args in (
                ["--socks5-hostname", _proxy(gw)],
                ["--socks5-hostname", _proxy(gw), "--proxy-user", "bob:anything"],
                ["-x", f"http://{_proxy(gw)}"],
            ):
                code, out, err = await curl(*args, url)
                assert code == 0, err
                assert out == BODY
            assert gw.stats.established == 3 and gw.stats.tokens_spent == 3
            assert gw.stats.sessions_started == 1
            # The proxy moved the window past the three spent tokens (IDM-04).
            new = gw.session.core.window
            assert new is not None and new[0] == (window[0] + 3) % 2**32
            assert gw.admin is not None
            code, metrics, err = await curl("http://{}:{}/metrics".format(*gw.admin.address))
            assert code == 0, err
            for line in (
                b'socks6fast_gateway_requests_total{outcome="established"} 3.0',
                b"socks6fast_gateway_tokens_spent_total 3.0",
                b"socks6fast_gateway_session_active 1.0",
            ):
                assert line in metrics, metrics
            await _idle(gw)
            # The origin saw the rewritten request: origin form, Connection: close.
            forwarded = http.connections[-1].received
            assert forwarded.startswith(b"GET /page HTTP/1.1\r\n") and b"Connection: close" in forwarded
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gateway 127.0.0.1")]
    assert len(lines) == 3 and all(" ok token" in line for line in lines), lines
    assert await _fd_settle(before) <= before


@e2e
@needs_curl
@pytest.mark.conformance("TRN-03")
async def test_curl_https_connect_over_tls_upstream(tmp_path: Path) -> None:
    """curl -x http:// to an https:// URL: CONNECT through the gateway, over SOCKS 6 over TLS
    (verified against a throw-away CA, TRN-03) to a local TLS server curl verifies; the
    gateway refuses an upstream whose certificate it cannot verify."""
    certs = make_certificates(tmp_path)
    before = _fds()
    server_tls = {
        "tls_listen": ["127.0.0.1:0"],
        "tls_certificate": str(certs.cert),
        "tls_key": str(certs.key),
    }
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)

    async def https(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY)
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(https, "127.0.0.1", 0, ssl=context)
    port = origin.sockets[0].getsockname()[1]
    try:
        async with running_server(make_config(users=USERS, server=server_tls)) as server:
            upstream = _url(server.tls_addresses[0], tls=True)
            async with gateway(upstream, upstream_ca=str(certs.ca)) as gw:
                code, out, err = await curl(
                    "--cacert", str(certs.ca), "-x", f"http://{_proxy(gw)}", f"https://localhost:{port}/"
                )
                assert code == 0, err
                assert out == BODY
                assert gw.stats.established == 1
                # The app closing its side ends the TLS pair (no half-close over TLS), even
                # though the destination (an echo server) would stay open.
                async with Sink(mode="echo") as echo:
                    idle = len(gw._tasks)
                    reader, writer = await asyncio.open_connection(*gw.addresses[0])
                    port_bytes = echo.address[1].to_bytes(2, "big")
                    writer.write(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port_bytes + b"ping")
                    assert await asyncio.wait_for(reader.readexactly(12 + 4), 5) == SOCKS5_OK + b"ping"
                    writer.close()
                    await writer.wait_closed()
                    async with asyncio.timeout(5):
                        while len(gw._tasks) > idle:
                            await asyncio.sleep(0.02)
            async with gateway(upstream) as gw:  # the system CAs do not know the test CA
                code, out, _ = await curl(
                    "--cacert", str(certs.ca), "-x", f"http://{_proxy(gw)}", f"https://localhost:{port}/"
                )
                assert code != 0 and out == b""
                assert gw.stats.failed >= 1 and gw.stats.established == 0
    finally:
        origin.close()
        await origin.wait_closed()
    assert await _fd_settle(before) <= before


# --- failures --------------------------------------------------------------------------------


@e2e
@needs_curl
async def test_upstream_down(unused_tcp_port: int) -> None:
    """Proxy down: optimistic SOCKS 5 gets its connection closed (curl: empty reply), strict
    SOCKS 5 gets reply 0x01, an HTTP request gets 502; nothing leaks, the gateway lives on."""
    before = _fds()
    async with Sink(mode="http", body=BODY) as http:
        url = f"http://localhost:{http.address[1]}/"
        upstream = f"socks6://127.0.0.1:{unused_tcp_port}"
        async with gateway(upstream, connect_timeout=2.0) as gw:
            code, out, _ = await curl("--socks5-hostname", _proxy(gw), url)
            assert code in (52, 56) and out == b""  # empty reply / connection closed
            code, out, _ = await curl(
                "-x", f"http://{_proxy(gw)}", "-w", "%{http_code}", "-o", "/dev/null", url
            )
            assert out == b"502"
        async with gateway(upstream, mode="strict") as gw:
            code, _, err = await curl("--socks5-hostname", _proxy(gw), url)
            assert code == 97 and b"connection to localhost. (1)" in err, err  # REP 0x01
    assert await _fd_settle(before) <= before


@e2e
@needs_curl
async def test_refused_by_rules_optimistic_and_strict(caplog: pytest.LogCaptureFixture) -> None:
    """A destination the proxy's rules deny: optimistic closes the app's connection and the log
    line names NOT_ALLOWED_BY_RULESET (0x02); strict answers SOCKS 5 reply 0x02 and HTTP 403."""
    caplog.set_level(logging.INFO, "socks6fast.gateway")
    before = _fds()
    async with Sink(mode="http", body=BODY) as http:
        rules = [{"action": "deny", "destinations": ["127.0.0.1/32"], "ports": [http.address[1]]}]
        async with running_server(make_config(rules=rules)) as server:
            url = f"http://127.0.0.1:{http.address[1]}/"
            async with gateway(_url(server.addresses[0], user=False)) as gw:
                code, out, _ = await curl("--socks5-hostname", _proxy(gw), url)
                assert code in (52, 56) and out == b""
                assert gw.stats.replies == {"NOT_ALLOWED_BY_RULESET": 1}
            assert any(
                "refused: NOT_ALLOWED_BY_RULESET (0x02); optimistic" in r.getMessage() for r in caplog.records
            )
            async with gateway(_url(server.addresses[0], user=False), mode="strict") as gw:
                code, _, err = await curl("--socks5-hostname", _proxy(gw), url)
                assert code == 97 and b"(2)" in err, err  # REP 0x02
                code, out, _ = await curl(
                    "-x", f"http://{_proxy(gw)}", "-p", "-w", "%{http_connect}", "-o", "/dev/null", url
                )
                assert out == b"403"
    assert await _fd_settle(before) <= before


@e2e
@needs_curl
@pytest.mark.conformance("SES-03", "IDM-03")
async def test_session_expired_and_tokens_exhausted() -> None:
    """The proxy forgets the session (idle timeout shorter than the keep-alive): the next
    request gets Session Invalid (SES-03), and the gateway starts a new session and succeeds.
    A window of 2 tokens with 4 concurrent requests: 2 spend tokens, 2 go without; a token
    the proxy no longer accepts (IDM-03) is retried without one."""
    before = _fds()
    config = make_config(users=USERS, sessions={"idle_timeout": 0.3, "max_token_window": 2})
    async with Sink(mode="http", body=BODY) as http, running_server(config) as server:
        url = f"http://localhost:{http.address[1]}/"
        async with gateway(_url(server.addresses[0]), tokens=2, keepalive=60.0) as gw:
            await _settle(gw)
            first_id = gw.session.session_id
            await asyncio.sleep(0.6)  # the proxy expires the session
            code, out, err = await curl("--socks5-hostname", _proxy(gw), url)
            assert code == 0 and out == BODY, err
            assert gw.session.session_id not in (None, first_id)
            await _settle(gw)
            results = await asyncio.gather(*(curl("--socks5-hostname", _proxy(gw), url) for _ in range(4)))
            assert [r[0] for r in results] == [0] * 4 and all(r[1] == BODY for r in results)
            assert gw.stats.established == 5
            # A stale window: its smallest token was already spent, so the proxy rejects it.
            core = gw.session.core
            assert core.window is not None
            core.window, core._spent = ((core.window[0] - 1) % 2**32, core.window[1]), set()
            retries = gw.stats.token_retries
            code, out, err = await curl("--socks5-hostname", _proxy(gw), url)
            assert code == 0 and out == BODY, err
            assert gw.stats.token_retries == retries + 1
    assert await _fd_settle(before) <= before


@e2e
async def test_upstream_reset_mid_transfer_and_server_first() -> None:
    """The proxy dies in the middle of a transfer: the app sees its connection end (no hang).
    A destination that speaks first (a banner) is not stalled by the wait for the app's
    first bytes (optimistic mode waits first_data_wait, then sends the Request alone)."""
    before = _fds()
    async with Sink(mode="banner", body=b"220 hello\r\n") as banner, Sink(mode="echo") as echo:
        async with running_server(make_config()) as server:
            async with gateway(_url(server.addresses[0], user=False)) as gw:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(
                    b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + banner.address[1].to_bytes(2, "big")
                )
                assert await reader.readexactly(2 + 10) == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
                assert await asyncio.wait_for(reader.readexactly(11), 2) == b"220 hello\r\n"
                assert loop.time() - t0 < 1.0
                writer.close()
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(
                    b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.address[1].to_bytes(2, "big")
                )
                writer.write(b"x" * 1000)
                await reader.readexactly(12)
                assert await reader.readexactly(1000) == b"x" * 1000
                await server.close(drain_timeout=0)  # cuts the relayed connection with a reset
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
    assert await _fd_settle(before) <= before


# --- the command line -------------------------------------------------------------------


@e2e
@needs_curl
async def test_cli_gateway_and_check_config(tmp_path: Path) -> None:
    """`socks6fast gateway --upstream socks6://alice@... --password-file F` serves curl and stops
    on SIGTERM with exit 0; `check-config` checks a [gateway] file (exit 0, exit 2 with one
    sentence); a user name with no password anywhere is one sentence, exit 2."""
    exe = str(Path(sys.executable).with_name("socks6fast"))
    good = tmp_path / "gw.toml"
    good.write_text('[gateway]\nupstream = "socks6://alice@127.0.0.1:1080"\nmode = "strict"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nmode = "eager"\n')
    for path, status, text in ((good, 0, b"OK (gateway"), (bad, 2, b"gateway.mode")):
        proc = await asyncio.create_subprocess_exec(
            exe, "check-config", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == status and text in out + err and b"Traceback" not in err
    env = {k: v for k, v in os.environ.items() if k != "SOCKS6FAST_PASSWORD"}
    proc = await asyncio.create_subprocess_exec(
        exe,
        "gateway",
        "--upstream",
        "socks6://alice@127.0.0.1:1080",
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"no password" in err and b"Traceback" not in err
    password = tmp_path / "pass"
    password.write_text("wonderland\n")
    async with Sink(mode="http", body=BODY) as http, running_server(make_config(users=USERS)) as server:
        upstream = "socks6://alice@{}:{}".format(*server.addresses[0])
        proc = await asyncio.create_subprocess_exec(
            exe,
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--password-file",
            str(password),
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stderr is not None
            async with asyncio.timeout(10):
                while True:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "the gateway exited"
                    if "gateway listening on" in line:
                        break
            where = line.split("gateway listening on ")[1].split(" ")[0]
            code, out, err = await curl("--socks5-hostname", where, f"http://localhost:{http.address[1]}/")
            assert code == 0 and out == BODY, err
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await proc.wait()
        assert proc.returncode == 0


@e2e
@needs_curl
async def test_strict_success_local_refusals_and_no_first_data_wait() -> None:
    """Strict mode relays once the upstream said yes (curl SOCKS 5 and HTTP CONNECT); BIND is
    refused locally with 0x07; a malformed HTTP request gets 400; with
    first_data_wait_ms = 0 the Request leaves without initial data and the app's bytes follow
    through the relay."""
    before = _fds()
    async with Sink(mode="http", body=BODY) as http, Sink(mode="echo") as echo:
        async with running_server(make_config(users=USERS)) as server:
            url = f"http://localhost:{http.address[1]}/"
            async with gateway(_url(server.addresses[0]), mode="strict") as gw:
                code, out, err = await curl("--socks5-hostname", _proxy(gw), url)
                assert code == 0 and out == BODY, err
                code, out, err = await curl("-p", "-x", f"http://{_proxy(gw)}", url)
                assert code == 0 and out == BODY, err
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6))  # BIND
                assert await reader.readexactly(2 + 10) == b"\x05\x00\x05\x07\x00\x01" + bytes(6)
                assert await reader.read() == b""
                writer.close()
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(b"BREW coffee HTCPCP/1.0\r\n\r\n")
                assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
                writer.close()
            async with gateway(_url(server.addresses[0]), first_data_wait=0.0) as gw:
                await _settle(gw)
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(
                    b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.address[1].to_bytes(2, "big")
                )
                await reader.readexactly(12)
                await asyncio.sleep(0.05)  # the Request has left without initial data
                writer.write(b"late bytes")
                assert await asyncio.wait_for(reader.readexactly(10), 5) == b"late bytes"
                writer.close()
                await writer.wait_closed()
    assert await _fd_settle(before) <= before


@e2e
@pytest.mark.conformance("UDP-01")
async def test_socks5_udp_associate_over_socks6_association() -> None:
    """A SOCKS 5 UDP ASSOCIATE (RFC 1928 section 7) through the gateway: the app's datagrams
    go out in an upstream SOCKS 6 association (UDP-01: its Association ID), the echo comes
    back with a SOCKS 5 header naming its source; the association ends with the app's TCP
    connection, and nothing leaks."""
    before = _fds()
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    echo_port = echo_transport.get_extra_info("sockname")[1]
    try:
        async with running_server(make_config(users=USERS)) as server:
            async with gateway(_url(server.addresses[0])) as gw:
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
                head = await asyncio.wait_for(reader.readexactly(2 + 10), 5)
                assert head[:4] == b"\x05\x00\x05\x00" and head[5] == 1
                bound = (".".join(str(b) for b in head[6:10]), int.from_bytes(head[10:12], "big"))
                app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                app.setblocking(False)
                try:
                    header = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
                    for i in range(3):
                        await loop.sock_sendto(app, header + b"ping%d" % i, bound)
                        data = await asyncio.wait_for(loop.sock_recv(app, 65535), 5)
                        assert data == header + b"echo:ping%d" % i
                finally:
                    app.close()
                writer.close()
                await writer.wait_closed()
                await _idle(gw)
                assert gw.stats.established == 1
    finally:
        echo_transport.close()
    assert await _fd_settle(before) <= before


# --- probe s20 findings (G-4, G-6, G-7, G-8, L-1) --------------------------------------------


@e2e
async def test_pipelined_second_request_does_not_reach_the_first_origin() -> None:
    """Probe G-4: a second request pipelined behind an absolute-form request (for another
    host) is not passed into the first host's tunnel: the origin reads the first request,
    its Content-Length body and nothing more (RFC 9112 sections 3.2.2 and 6.3)."""
    before = _fds()
    received: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):  # a lax origin reads on after the first request
                while chunk := await reader.read(65536):
                    data += chunk
        received.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    second = b"GET http://two.test/ HTTP/1.1\r\nHost: two.test\r\n\r\n"
    try:
        async with running_server(make_config(users=USERS)) as proxy:
            async with gateway(_url(proxy.addresses[0])) as gw:
                await _settle(gw)
                for first, body in (
                    (f"GET http://127.0.0.1:{port}/one HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode(), b""),
                    (
                        f"POST http://127.0.0.1:{port}/one HTTP/1.1\r\nContent-Length: 5\r\n\r\n".encode(),
                        b"hello",
                    ),
                    (
                        b"POST http://127.0.0.1:%d/one HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % port,
                        b"5\r\nhello\r\n0\r\n\r\n",
                    ),
                ):
                    reader, writer = await asyncio.open_connection(*gw.addresses[0])
                    writer.write(first + body + second)
                    answer = await asyncio.wait_for(reader.read(), 5)
                    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok")
                    writer.close()
                    await writer.wait_closed()
                    got = received.pop()
                    assert got.startswith(
                        first.split(b" ")[0] + b" /one HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port
                    )
                    assert got.endswith(b"Connection: close\r\n\r\n" + body), got
                    assert b"two.test" not in got and b"evil.test" not in got
                await _idle(gw)
    finally:
        server.close()
        await server.wait_closed()
    assert await _fd_settle(before) <= before


@e2e
async def test_socks5_unknown_command_and_address_type_get_rfc1928_replies(unused_tcp_port: int) -> None:
    """Probe G-6: RFC 1928 section 6: an unknown command gets X'07', an unknown address
    type X'08', then the connection closes (the proxy's own SOCKS 5 does the same)."""
    async with gateway(f"socks6://127.0.0.1:{unused_tcp_port}") as gw:
        for request, code in ((b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", 7), (b"\x05\x01\x00\x05", 8)):
            reader, writer = await asyncio.open_connection(*gw.addresses[0])
            writer.write(b"\x05\x01\x00" + request)
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer == b"\x05\x00\x05" + bytes([code]) + b"\x00\x01" + bytes(6)
            writer.close()
        await _idle(gw)


@e2e
async def test_request_head_has_one_deadline(monkeypatch: pytest.MonkeyPatch, unused_tcp_port: int) -> None:
    """Probe G-7: a request head trickled a byte at a time is closed at one deadline from the
    accept (HANDSHAKE_TIMEOUT), not kept open while every read comes in time."""
    monkeypatch.setattr(gateway_module, "HANDSHAKE_TIMEOUT", 0.6)
    async with gateway(f"socks6://127.0.0.1:{unused_tcp_port}") as gw:
        for head in (
            b"GET http://origin.test/ HTTP/1.1\r\nX-Slow: " + b"y" * 100,
            b"\x05\x01\x00\x05\x01\x00\x03\x40",
        ):
            reader, writer = await asyncio.open_connection(*gw.addresses[0])
            loop = asyncio.get_running_loop()
            started = loop.time()
            closed = False
            for byte in head:
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(100), 0.1)
                    if data in (b"", b"\x05\x00"):
                        closed = data == b""
                if closed or loop.time() - started > 3:
                    break
            assert closed, "still open"
            assert loop.time() - started < 1.5
            writer.close()
        await _idle(gw)


@e2e
async def test_log_line_escapes_control_characters(
    caplog: pytest.LogCaptureFixture, unused_tcp_port: int
) -> None:
    """Probe L-1 (CWE-117): a destination name with a newline or ESC does not forge a log line."""
    name = b"evil.test\n2026-12-02 00:00:00,000 INFO socks6fast.gateway: FORGED\x1b[31m"
    caplog.set_level(logging.INFO, logger="socks6fast")
    async with gateway(f"socks6://127.0.0.1:{unused_tcp_port}", mode="strict") as gw:
        reader, writer = await asyncio.open_connection(*gw.addresses[0])
        writer.write(b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
        assert (await asyncio.wait_for(reader.read(), 5))[:3] == b"\x05\x00\x05"
        writer.close()
        await _idle(gw)
    lines = [r.getMessage() for r in caplog.records if "evil.test" in r.getMessage()]
    assert lines
    assert not any("\n" in line or "\x1b" in line for line in lines)
    assert any("evil.test\\n2026" in line and "FORGED\\x1b[31m" in line for line in lines)


@e2e
@pytest.mark.conformance("TRN-03")
@pytest.mark.parametrize("trust", ["upstream_ca", "insecure"])
async def test_socks5_udp_over_tls_upstream_uses_the_upstream_trust(trust: str, tmp_path: Path) -> None:
    """Probe G-8: UDP ASSOCIATE over a ``socks6+tls`` upstream runs DTLS with the TLS leg's
    trust: ``--upstream-ca`` (a throw-away CA) or ``--insecure-upstream`` (TRN-03)."""
    certs = make_certificates(tmp_path)
    before = _fds()
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    echo_port = echo_transport.get_extra_info("sockname")[1]
    tls = {"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    changes: dict[str, Any] = (
        {"upstream_ca": str(certs.ca)} if trust == "upstream_ca" else {"upstream_verify": False}
    )
    try:
        async with running_server(make_config(users=USERS, server=tls)) as server:
            async with gateway(_url(server.tls_addresses[0], tls=True), **changes) as gw:
                reader, writer = await asyncio.open_connection(*gw.addresses[0])
                writer.write(b"\x05\x01\x00\x05\x03\x00\x01" + bytes(6))
                head = await asyncio.wait_for(reader.readexactly(2 + 10), 10)
                assert head[:4] == b"\x05\x00\x05\x00", head
                bound = (".".join(str(b) for b in head[6:10]), int.from_bytes(head[10:12], "big"))
                app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                app.setblocking(False)
                try:
                    header = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
                    await loop.sock_sendto(app, header + b"ping", bound)
                    data = await asyncio.wait_for(loop.sock_recv(app, 65535), 5)
                    assert data == header + b"echo:ping"
                finally:
                    app.close()
                writer.close()
                await writer.wait_closed()
                await _idle(gw)
    finally:
        echo_transport.close()
    assert await _fd_settle(before) <= before
