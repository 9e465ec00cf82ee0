"""Time of one HTTP request through the httpx and aiohttp adapters behind an emulated round trip.

Strategy: everything in one process on 127.0.0.1: socks6fast's Server, an aiohttp.web HTTP
server, and an asyncio delay forwarder in front of the proxy that holds every chunk for
``--delay`` ms in each direction (one client-proxy round trip = 2 x delay; the loopback TCP
handshake itself is not charged). Each sample times one ``GET`` on a new tunnel, from the
call to the whole (small) response:

* ``new session``: a fresh transport/connector, so the CONNECT carries 0-RTT credentials and
  the Session Request;
* ``in session``: a warmed transport/connector that keeps no idle connection, so every
  request opens a new tunnel inside the session (Session ID, an idempotence token).

httpx runs with ``false_start`` on (the request head goes with the CONNECT: expected ~1 round
trip) and off (CONNECT, then the request: ~2); aiohttp's connector has no false start (~2).

Run from the checkout with the extras installed::

    .venv/bin/python benchmarks/contrib_ttfb.py --delay 25 --samples 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx
from aiohttp import web

from socks6fast.asyncio.server import Server
from socks6fast.config import parse_config
from socks6fast.contrib.aiohttp import ProxyConnector
from socks6fast.contrib.httpx import AsyncProxyTransport
from socks6fast.proto.auth import hash_password


class DelayForwarder:
    """Forwards TCP to ``target``, delivering each chunk ``delay`` seconds after it arrived."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                await asyncio.sleep(max(0.0, at - loop.time()))
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        task = asyncio.ensure_future(deliver())
        with contextlib.suppress(OSError):
            while True:
                data = await src.read(65536)
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
        await task


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


@contextlib.asynccontextmanager
async def setup(delay: float) -> AsyncIterator[tuple[str, str]]:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    web_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = parse_config(
        {
            "server": {"listen": ["127.0.0.1:0"]},
            "users": {"alice": hash_password("s3cret", n=2**10)},
            "udp": {"enabled": False},
        }
    )
    server = Server(config)
    await server.start()
    forwarder = DelayForwarder(server.addresses[0], delay)
    port = await forwarder.start()
    try:
        yield f"socks6://alice:s3cret@127.0.0.1:{port}", f"http://127.0.0.1:{web_port}/"
    finally:
        assert forwarder.server is not None
        forwarder.server.close()
        await server.close(drain_timeout=0)
        await runner.cleanup()


async def timed(request: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await request()
    return time.perf_counter() - start


async def httpx_row(
    proxy: str, url: str, samples: int, *, false_start: bool, in_session: bool
) -> list[float]:
    out = []
    warm = AsyncProxyTransport.from_url(
        proxy, false_start=false_start, limits=httpx.Limits(max_keepalive_connections=0)
    )
    async with httpx.AsyncClient(transport=warm) as warm_client:
        await warm_client.get(url)
        for _ in range(samples):
            if in_session:
                out.append(await timed(lambda: warm_client.get(url)))
                continue
            transport = AsyncProxyTransport.from_url(proxy, false_start=false_start)
            async with httpx.AsyncClient(transport=transport) as client:
                out.append(await timed(lambda c=client: c.get(url)))  # type: ignore[misc]
    return out


async def aiohttp_row(proxy: str, url: str, samples: int, *, in_session: bool) -> list[float]:
    out = []

    async def get(http: aiohttp.ClientSession) -> None:
        async with http.get(url) as response:
            await response.read()

    async with aiohttp.ClientSession(connector=ProxyConnector.from_url(proxy, force_close=True)) as warm:
        await get(warm)
        for _ in range(samples):
            if in_session:
                out.append(await timed(lambda: get(warm)))
                continue
            async with aiohttp.ClientSession(connector=ProxyConnector.from_url(proxy)) as http:
                out.append(await timed(lambda h=http: get(h)))  # type: ignore[misc]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=25.0, help="ms each way (default 25)")
    parser.add_argument("--samples", type=int, default=15, help="samples per row (default 15)")
    args = parser.parse_args()
    rtt = 2 * args.delay / 1000
    async with setup(args.delay / 1000) as (proxy, url):
        rows = {}
        for in_session in (False, True):
            where = "in session" if in_session else "new session"
            for false_start in (True, False):
                name = f"httpx async, false_start={false_start}, {where}"
                rows[name] = await httpx_row(
                    proxy, url, args.samples, false_start=false_start, in_session=in_session
                )
            rows[f"aiohttp, {where}"] = await aiohttp_row(proxy, url, args.samples, in_session=in_session)
    print(f"delay {args.delay:g} ms each way (round trip {rtt * 1000:g} ms), {args.samples} samples per row")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:48s} median {median * 1000:7.1f} ms = {median / rtt:4.2f} round trips")


if __name__ == "__main__":
    asyncio.run(main())
