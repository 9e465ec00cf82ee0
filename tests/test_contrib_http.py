"""httpx and aiohttp through socks6fast's adapters (issue 15 item 2), all real parts.

A real socks6fast `Server` in-process (plain and TLS listeners, a user, a name table instead of
DNS), a real aiohttp.web HTTP server and HTTPS server (a throw-away CA) on 127.0.0.1, and the
real httpx (async and sync) and aiohttp clients on the adapters. What the proxy saw is read on
its side: its connection records (one per tunnel: keep-alive reuse), its session store's
counters (sessions created, tokens spent) and the live sessions (teardown on close).

These tests drive the client library and the server through the same code as the other e2e
tests (the codec, and the splice or asyncio relay), so they run in both codec runs (about 6 s
each); the two import checks, which touch neither, run in the compiled run only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from helpers_server import Certificates, fake_resolver, make_certificates, make_config, running_server

from socks6fast import ProxyError as Socks6ProxyError
from socks6fast import ReplyCode
from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.asyncio.server import Server
from socks6fast.contrib.aiohttp import ProxyConnector
from socks6fast.contrib.aiohttp import ProxyError as AiohttpProxyError
from socks6fast.contrib.httpx import AsyncProxyTransport, SyncProxyTransport
from socks6fast.contrib.httpx import ProxyError as HttpxProxyError
from socks6fast.proto.sessions import MemorySessionStore

ROOT = Path(__file__).resolve().parent.parent
#: Names the proxy resolves from its table (tests never ask DNS): "web.test" proves that the
#: adapters hand names to the proxy (a local lookup would hit conftest's guard).
NAMES = {"web.test": ["127.0.0.1"], "localhost": ["127.0.0.1"]}


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.path}")


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def _cut(request: web.Request) -> web.StreamResponse:
    # The web server dies mid-response: 10 of 100000 announced bytes, then a reset.
    response = web.StreamResponse(headers={"Content-Length": "100000"})
    await response.prepare(request)
    await response.write(b"0123456789")
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


@dataclass
class Env:
    server: Server
    certs: Certificates
    http_port: int
    https_port: int
    closed_port: int

    def url(self, scheme: str = "socks6", user: str = "alice:s3cret") -> str:
        host, port = self.server.tls_addresses[0] if scheme == "socks6+tls" else self.server.addresses[0]
        return f"{scheme}://{user}@{host}:{port}"

    def proxy_tls(self, scheme: str) -> dict[str, Any]:
        """The adapters' proxy TLS arguments for ``scheme`` (the test CA, the name in its certificate)."""
        if scheme != "socks6+tls":
            return {}
        return {"proxy_ssl": self.ca_context, "proxy_server_hostname": "localhost"}

    @property
    def ca_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs.ca))

    @property
    def store(self) -> MemorySessionStore:
        store = self.server.context.sessions
        assert isinstance(store, MemorySessionStore)
        return store

    def tunnels(self, port: int) -> list[Any]:
        """The proxy's records of finished CONNECTs to ``port`` (one per tunnel)."""
        return [
            r for r in self.server.records if r.command == "CONNECT" and r.destination.endswith(f":{port}")
        ]


def _free_port() -> int:
    import socket  # noqa: PLC0415 - a bound-then-closed port: nobody listens there

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, rules: list[dict[str, Any]] | None = None) -> AsyncIterator[Env]:
    certs = make_certificates(tmp_path)
    app = web.Application()
    app.router.add_get("/cut", _cut)
    app.router.add_get("/{tail:.*}", _hello)
    app.router.add_post("/echo", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(certs.cert), str(certs.key))
    plain_site = web.TCPSite(runner, "127.0.0.1", 0)
    tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await plain_site.start()
    await tls_site.start()
    ports = [s.getsockname()[1] for site in (plain_site, tls_site) for s in site._server.sockets]  # type: ignore[union-attr]
    config = make_config(
        users={"alice": "s3cret"},
        rules=rules,
        server={"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)},
        udp={"dtls": False},
    )
    try:
        async with running_server(config, resolver=fake_resolver(NAMES)) as server:
            yield Env(server, certs, ports[0], ports[1], _free_port())
    finally:
        await runner.cleanup()


def _open_sockets() -> int:
    """Sockets this process holds (the proxy's splice pipes are a cache, not counted)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


async def _settle(env: Env, tunnels: int, port: int) -> None:
    # The proxy writes a tunnel's record when both legs have closed.
    for _ in range(200):
        if len(env.tunnels(port)) >= tunnels:
            return
        await asyncio.sleep(0.01)


@pytest.mark.conformance("SES-01", "SES-02", "SES-05", "IDM-05")
@pytest.mark.parametrize("false_start", [True, False], ids=["false_start", "connect_first"])
@pytest.mark.parametrize("scheme", ["socks6", "socks6+tls"])
async def test_httpx_async_one_session_https(tmp_path: Path, scheme: str, false_start: bool) -> None:
    """httpx.AsyncClient on AsyncProxyTransport: HTTP and HTTPS (TLS with httpx's verify= inside
    the tunnel; over socks6+tls, TLS in TLS) through one SOCKS 6 session (SES-01/02: created
    once, later CONNECTs need no authentication), keep-alive reusing each tunnel (6 requests,
    2 tunnels), the second tunnel spending an idempotence token (IDM-05), and closing the
    transport tears the session down (SES-05). With false start (the request head or the
    ClientHello sent with the CONNECT, memory-BIO TLS) and without (asyncio's start_tls)."""
    async with environment(tmp_path) as env:
        transport = AsyncProxyTransport.from_url(
            env.url(scheme), **env.proxy_tls(scheme), verify=env.ca_context, false_start=false_start
        )
        async with httpx.AsyncClient(transport=transport) as client:
            for i in range(3):
                r = await client.get(f"http://web.test:{env.http_port}/a{i}")
                assert (r.status_code, r.text) == (200, f"hello /a{i}")
            for i in range(3):
                r = await client.post(f"https://localhost:{env.https_port}/echo", content=b"x" * (i * 70000))
                assert r.status_code == 200 and r.content == b"x" * (i * 70000)
            assert transport.session.session_id is not None
            assert len(env.store) == 1
        await _settle(env, 1, env.http_port)
        await _settle(env, 1, env.https_port)
        tunnels = env.tunnels(env.http_port) + env.tunnels(env.https_port)
        assert len(tunnels) == 2 and {t.user for t in tunnels} == {"alice"}
        assert {t.listener for t in tunnels} == {"tls" if scheme == "socks6+tls" else "tcp"}
        assert env.store.counters.created == 1
        assert env.store.counters.windows == 1 and env.store.counters.tokens_spent == 1
        assert len(env.store) == 0  # torn down on close (SES-05)


@pytest.mark.conformance("SES-02")
@pytest.mark.parametrize("false_start", [True, False], ids=["false_start", "connect_first"])
@pytest.mark.parametrize("scheme", ["socks6", "socks6+tls"])
async def test_httpx_sync_one_session_https(tmp_path: Path, scheme: str, false_start: bool) -> None:
    """httpx.Client on SyncProxyTransport (in a thread, the servers on the loop): HTTP and HTTPS
    through one session, the tunnels reused; over socks6+tls the destination's TLS runs inside
    the proxy's TLS (memory BIOs). With and without false start."""
    async with environment(tmp_path) as env:

        def run() -> list[tuple[int, bytes]]:
            transport = SyncProxyTransport.from_url(
                env.url(scheme), **env.proxy_tls(scheme), verify=env.ca_context, false_start=false_start
            )
            out = []
            with httpx.Client(transport=transport) as client:
                for i in range(3):
                    r = client.get(f"http://web.test:{env.http_port}/s{i}")
                    out.append((r.status_code, r.content))
                    r = client.post(f"https://localhost:{env.https_port}/echo", content=b"y" * (i * 70000))
                    out.append((r.status_code, r.content))
            return out

        out = await asyncio.to_thread(run)
        expected = [
            (200, f"hello /s{i}".encode()) if k == 0 else (200, b"y" * (i * 70000))
            for i in range(3)
            for k in (0, 1)
        ]
        assert out == expected
        await _settle(env, 1, env.http_port)
        await _settle(env, 1, env.https_port)
        assert len(env.tunnels(env.http_port)) == 1 and len(env.tunnels(env.https_port)) == 1
        assert env.store.counters.created == 1 and env.store.counters.tokens_spent == 1
        assert len(env.store) == 0


@pytest.mark.conformance("SES-01", "SES-02", "SES-05")
@pytest.mark.parametrize("scheme", ["socks6", "socks6+tls"])
async def test_aiohttp_connector_one_session_https(tmp_path: Path, scheme: str) -> None:
    """aiohttp.ClientSession on ProxyConnector: HTTP and HTTPS (aiohttp's ssl= context, checked
    inside the tunnel) through one SOCKS 6 session, aiohttp's pool reusing the tunnels; closing
    the connector tears the session down."""
    async with environment(tmp_path) as env:
        connector = ProxyConnector.from_url(env.url(scheme), **env.proxy_tls(scheme), ssl=env.ca_context)
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in range(3):
                async with http.get(f"http://web.test:{env.http_port}/g{i}") as r:
                    assert (r.status, await r.text()) == (200, f"hello /g{i}")
                async with http.post(
                    f"https://localhost:{env.https_port}/echo", data=b"z" * (i * 70000)
                ) as r:
                    assert (r.status, await r.read()) == (200, b"z" * (i * 70000))
            assert connector.session.session_id is not None
        await _settle(env, 1, env.http_port)
        await _settle(env, 1, env.https_port)
        assert len(env.tunnels(env.http_port)) == 1 and len(env.tunnels(env.https_port)) == 1
        assert env.store.counters.created == 1 and env.store.counters.tokens_spent == 1
        assert len(env.store) == 0


@pytest.mark.conformance("SES-03")
async def test_expired_session_is_replaced(tmp_path: Path) -> None:
    """The proxy forgets the session between two requests (as its idle timeout does): the next
    CONNECT gets Session Invalid (SES-03), the adapter starts a new session and the request
    succeeds, in httpx and in aiohttp."""
    async with environment(tmp_path) as env:
        limits = httpx.Limits(max_keepalive_connections=0)  # a new tunnel per request
        transport = AsyncProxyTransport.from_url(env.url(), limits=limits)
        connector = ProxyConnector.from_url(env.url(), force_close=True)
        async with (
            httpx.AsyncClient(transport=transport) as client,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            for adapter_session, get in (
                (transport.session, lambda: client.get(f"http://web.test:{env.http_port}/")),
                (connector.session, lambda: http.get(f"http://web.test:{env.http_port}/")),
            ):
                first = await get()
                first_id = adapter_session.session_id
                assert first_id is not None
                env.store.teardown(first_id)
                second = await get()
                for r in (first, second):
                    status = r.status_code if isinstance(r, httpx.Response) else r.status
                    assert status == 200
                    if isinstance(r, aiohttp.ClientResponse):
                        r.release()
                assert adapter_session.session_id not in (None, first_id)
        assert env.store.counters.created == 4


async def test_refused_by_rules_and_unreachable(tmp_path: Path) -> None:
    """Failures end in one clear exception each, and leave no descriptor behind: the proxy's
    rules refuse the destination (httpx.ProxyError / ProxyError naming NOT_ALLOWED_BY_RULESET,
    the reply code kept), the destination refuses the proxy (CONNECTION_REFUSED), the proxy
    itself is down (httpx.ConnectError / aiohttp.ClientProxyConnectionError), a wrong password
    (httpx.ProxyError), and the destination's certificate is not trusted (verify=)."""
    rules = [{"action": "deny", "commands": ["connect"], "ports": ["1-1023"]}]
    async with environment(tmp_path, rules=rules) as env:
        before = _open_sockets()
        down = f"socks6://alice:s3cret@127.0.0.1:{env.closed_port}"
        for _ in range(2):  # twice: a leak grows, a cache does not
            async with httpx.AsyncClient(transport=AsyncProxyTransport.from_url(env.url())) as client:
                with pytest.raises(httpx.ProxyError, match="NOT_ALLOWED_BY_RULESET") as refused:
                    await client.get("http://web.test:80/")
                cause = refused.value.__cause__
                assert isinstance(cause, HttpxProxyError) and isinstance(cause.error, Socks6ProxyError)
                assert cause.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
                with pytest.raises(httpx.ProxyError, match="CONNECTION_REFUSED"):
                    await client.get(f"http://127.0.0.1:{env.closed_port}/")
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.get(f"https://localhost:{env.https_port}/")  # system CAs only
            async with httpx.AsyncClient(transport=AsyncProxyTransport.from_url(down)) as client:
                with pytest.raises(httpx.ConnectError, match="cannot reach the proxy"):
                    await client.get(f"http://web.test:{env.http_port}/")
            bad = env.url(user="alice:wrong")
            with httpx.Client(transport=SyncProxyTransport.from_url(bad)) as sync_client:
                with pytest.raises(httpx.ProxyError, match="SOCKS 6 CONNECT to web.test"):
                    await asyncio.to_thread(sync_client.get, f"http://web.test:{env.http_port}/")
            async with aiohttp.ClientSession(connector=ProxyConnector.from_url(env.url())) as http:
                with pytest.raises(AiohttpProxyError, match="NOT_ALLOWED_BY_RULESET") as denied:
                    await http.get("http://web.test:80/")
                assert denied.value.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
                with pytest.raises(AiohttpProxyError) as refused_dest:
                    await http.get(f"http://127.0.0.1:{env.closed_port}/")
                assert refused_dest.value.reply_code == ReplyCode.CONNECTION_REFUSED
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await http.get(f"https://localhost:{env.https_port}/")
            async with aiohttp.ClientSession(connector=ProxyConnector.from_url(down)) as http:
                with pytest.raises(aiohttp.ClientProxyConnectionError):
                    await http.get(f"http://web.test:{env.http_port}/")
        await asyncio.sleep(0.05)
        assert _open_sockets() <= before


@pytest.mark.conformance("IDM-05")
async def test_more_concurrent_connections_than_tokens(tmp_path: Path) -> None:
    """Token window exhausted: 6 tunnels opened at once with a window of 2 tokens. The first two
    spend the window's tokens (smallest first, IDM-05), the other four go without one rather
    than fail or wait; every request succeeds and the proxy rejected no token."""
    async with environment(tmp_path) as env:
        transport = AsyncProxyTransport.from_url(env.url(), tokens=2)
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(f"http://web.test:{env.http_port}/warm")).status_code == 200
            replies = await asyncio.gather(
                *(client.get(f"http://web.test:{env.http_port}/c{i}") for i in range(6))
            )
            assert [r.text for r in replies] == [f"hello /c{i}" for i in range(6)]
            assert env.store.counters.tokens_spent == 2 and env.store.counters.tokens_rejected == 0
            assert env.store.counters.created == 1


async def test_server_reset_mid_transfer(tmp_path: Path) -> None:
    """The web server resets the connection in the middle of a response: httpx and aiohttp
    each raise their usual error for a truncated body, the next request through the same
    transport works, and no socket is left behind."""
    async with environment(tmp_path) as env:
        before = _open_sockets()
        async with httpx.AsyncClient(transport=AsyncProxyTransport.from_url(env.url())) as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await client.get(f"http://web.test:{env.http_port}/cut")
            assert (await client.get(f"http://web.test:{env.http_port}/after")).text == "hello /after"
        async with aiohttp.ClientSession(connector=ProxyConnector.from_url(env.url())) as http:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(f"http://web.test:{env.http_port}/cut") as r:
                    await r.read()
            async with http.get(f"http://web.test:{env.http_port}/after") as r:
                assert await r.text() == "hello /after"
        await asyncio.sleep(0.05)
        assert _open_sockets() <= before


class FlightRecorder:
    """A TCP forwarder in front of the proxy that keeps, per connection, the client's bytes
    that arrived before the proxy's first byte went back: the client's first flight."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.first_flights: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> FlightRecorder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        flight = bytearray()
        index = len(self.first_flights)
        self.first_flights.append(b"")
        answered = asyncio.Event()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if upstream and not answered.is_set():
                        flight.extend(data)
                        self.first_flights[index] = bytes(flight)
                    if not upstream:
                        answered.set()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        tasks = [
            asyncio.ensure_future(pump(reader, up_writer, True)),
            asyncio.ensure_future(pump(up_reader, writer, False)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            writer.close()
            up_writer.close()


@pytest.mark.conformance("CMD-03")
async def test_false_start_sends_the_request_with_the_connect(tmp_path: Path) -> None:
    """False start (CMD-03): the CONNECT's first flight already carries the HTTP request head
    (http://) or the TLS ClientHello (https://), so the first byte costs one round trip to
    the proxy, not two. Checked on the wire, by a forwarder that keeps what the client sent
    before the proxy answered: for httpx async and sync (false_start=True, the default);
    with false_start=False the flight holds the Request alone."""
    async with environment(tmp_path) as env, FlightRecorder(env.server.addresses[0]) as recorder:
        url = f"socks6://alice:s3cret@127.0.0.1:{recorder.port}"
        http_url, https_url = f"http://web.test:{env.http_port}/fs", f"https://localhost:{env.https_port}/fs"
        transport = AsyncProxyTransport.from_url(url, verify=env.ca_context)
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(http_url)).text == "hello /fs"
            assert (await client.get(https_url)).text == "hello /fs"

        def sync_requests(false_start: bool) -> list[str]:
            sync = SyncProxyTransport.from_url(url, verify=env.ca_context, false_start=false_start)
            with httpx.Client(transport=sync) as client:
                return [client.get(http_url).text, client.get(https_url).text]

        assert await asyncio.to_thread(sync_requests, True) == ["hello /fs"] * 2
        assert await asyncio.to_thread(sync_requests, False) == ["hello /fs"] * 2
        flights = [f for f in recorder.first_flights if f]
        assert len(flights) == 6 + 3  # 3 clients x 2 tunnels, and each client's session teardown NOOP
        tunnels = [f for f in flights if b"web.test" in f or b"localhost" in f]
        head, hello = b"GET /fs HTTP/1.1\r\n", b"\x16\x03\x01"  # a TLS handshake record
        assert [head in f for f in tunnels] == [True, False, True, False, False, False]
        assert [hello in f for f in tunnels] == [False, True, False, True, False, False]


#: The import checks below do not touch the codec: they run in the compiled run only.
only_compiled_run = pytest.mark.skipif(NO_EXTENSIONS, reason="codec-independent: the compiled run covers it")


@only_compiled_run
def test_import_without_the_extra_is_one_sentence() -> None:
    """Without httpx (or aiohttp) installed, importing the adapter raises one ImportError
    sentence naming the extra to install (checked in a fresh interpreter with the library
    blocked)."""
    for module, blocked in (("socks6fast.contrib.httpx", "httpx"), ("socks6fast.contrib.aiohttp", "aiohttp")):
        code = f"import sys; sys.modules[{blocked!r}] = None\nimport {module}\n"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last == (
            f"ImportError: {module} needs {blocked}: install it with pip install 'socks6fast[{blocked}]'"
        )


@only_compiled_run
def test_core_does_not_import_contrib() -> None:
    """The proxy and the client library never pull in httpx or aiohttp (fresh interpreter)."""
    code = (
        "import sys, socks6fast, socks6fast.client, socks6fast.asyncio, socks6fast.cli\n"
        "names = ('httpx', 'httpcore', 'aiohttp', 'socks6fast.contrib')\n"
        "print(sorted(m for m in names if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


async def test_readme_example_runs(tmp_path: Path) -> None:
    """examples/http_clients.py (quoted in the README) runs as written against the real proxy:
    httpx async and sync and aiohttp, three requests each, one tunnel and one session each."""
    example = ROOT / "examples" / "http_clients.py"
    async with environment(tmp_path) as env:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(example),
            env.url(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert lines[:4] == [f"httpx async: 200 hello /httpx-async/{i}" for i in range(3)] + [
            "httpx async: SOCKS 6 session True"
        ]
        assert lines[4:] == [f"httpx sync: 200 hello /httpx-sync/{i}" for i in range(3)] + [
            f"aiohttp: 200 hello /aiohttp/{i}" for i in range(3)
        ]
        for _ in range(200):  # records are written when both legs have closed
            if len([r for r in env.server.records if r.command == "CONNECT"]) >= 3:
                break
            await asyncio.sleep(0.01)
        assert env.store.counters.created == 3  # one session per client
        assert len([r for r in env.server.records if r.command == "CONNECT"]) == 3  # one tunnel each
