"""The admin listener (issue 14 item 1): ``/metrics`` and ``/healthz`` over HTTP/1.1.

Strategy: a small HTTP responder on the server's own event loop (``asyncio.start_server``),
no thread per request and no web framework: it reads one request head (bounded in size and
time), answers ``GET``/``HEAD`` of ``/metrics`` with ``prometheus_client.generate_latest``
of the server's own registry (`ServerMetrics.registry`) and of ``/healthz`` with ``ok`` (503
``draining`` once the server stopped accepting), anything else with 404 or 405, and closes
the connection. At most `MAX_CLIENTS` scrapers at once; more are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["MAX_CLIENTS", "AdminServer"]

log = logging.getLogger("socks6fast.admin")

#: Admin connections served at once.
MAX_CLIENTS = 16
#: Seconds a client has to send its request head.
REQUEST_TIMEOUT = 5.0
#: Largest request head read.
MAX_HEAD = 8192


class MetricsRegistry(Protocol):
    """What the admin listener serves: a registry (`ServerMetrics`, or the gateway's metrics)."""

    registry: CollectorRegistry


class AdminServer:
    """Serves ``/metrics`` and ``/healthz`` for one `Server` (or one gateway, issue 15).

    Args:
        metrics: the server's metrics.
        healthy: returns True while the server accepts connections.
    """

    def __init__(self, metrics: MetricsRegistry, healthy: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._server: asyncio.Server | None = None
        self._clients = 0

    @property
    def address(self) -> tuple[str, int]:
        """Bound (host, port) of the first listening socket (after `start`)."""
        assert self._server is not None and self._server.sockets
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on (host, port).

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True, limit=MAX_HEAD)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, head_only = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
            )
            if not head_only:
                writer.write(body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away, stalled, or sent a head too large: just close
        finally:
            self._clients -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes, bool]:
        if len(head) > MAX_HEAD:
            return "431 Request Header Fields Too Large", "text/plain", b"request head too large\n", False
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz"):
            return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n", False
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n", False
        head_only = method == b"HEAD"
        if target == b"/healthz":
            if self._healthy():
                return "200 OK", "text/plain", b"ok\n", head_only
            return "503 Service Unavailable", "text/plain", b"draining\n", head_only
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry), head_only
