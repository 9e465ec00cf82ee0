"""httpx and aiohttp through a SOCKS 6 proxy with socks6fast's adapters (socks6fast.contrib).

Needs both extras (in the checkout: ``.venv/bin/pip install '.[httpx,aiohttp]'``). Run a
proxy first (``.venv/bin/socks6fast serve``: 127.0.0.1:1080, no authentication), then::

    .venv/bin/python examples/http_clients.py           # socks6://127.0.0.1:1080
    .venv/bin/python examples/http_clients.py socks6://alice:s3cret@127.0.0.1:1080

A small HTTP/1.1 server is started here, on 127.0.0.1; nothing leaves the machine. Each
client sends three requests: they share one SOCKS 6 session and one keep-alive tunnel.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import httpx

from socks6fast.contrib.aiohttp import ProxyConnector
from socks6fast.contrib.httpx import AsyncProxyTransport, SyncProxyTransport


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one tunnel carries every request

    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_http_server() -> str:
    """An HTTP server on 127.0.0.1 in a daemon thread; returns its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


async def with_httpx(proxy_url: str, base: str) -> None:
    transport = AsyncProxyTransport.from_url(proxy_url)
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(3):
            response = await client.get(f"{base}/httpx-async/{i}")
            print("httpx async:", response.status_code, response.text)
        print("httpx async: SOCKS 6 session", transport.session.session_id is not None)


def with_httpx_sync(proxy_url: str, base: str) -> None:
    transport = SyncProxyTransport.from_url(proxy_url)
    with httpx.Client(transport=transport) as client:
        for i in range(3):
            response = client.get(f"{base}/httpx-sync/{i}")
            print("httpx sync:", response.status_code, response.text)


async def with_aiohttp(proxy_url: str, base: str) -> None:
    connector = ProxyConnector.from_url(proxy_url)
    async with aiohttp.ClientSession(connector=connector) as http:
        for i in range(3):
            async with http.get(f"{base}/aiohttp/{i}") as response:
                print("aiohttp:", response.status, await response.text())


def main() -> None:
    proxy_url = sys.argv[1] if len(sys.argv) > 1 else "socks6://127.0.0.1:1080"
    base = start_http_server()
    asyncio.run(with_httpx(proxy_url, base))
    with_httpx_sync(proxy_url, base)
    asyncio.run(with_aiohttp(proxy_url, base))


if __name__ == "__main__":
    main()
