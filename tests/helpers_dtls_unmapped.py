"""Full DTLS handshakes from one source address that never map an association (probe 19 F4),
run by tests/test_dtls_udp.py inside a network namespace of its own (``unshare -n``, lo up):
the loop is a flood of handshakes, so it stays on that namespace's loopback.

``python tests/helpers_dtls_unmapped.py CERT KEY CA`` runs the real `Server` (TLS listener,
DTLS port beside it, ``dtls_handshakes_per_source = 4``, ``dtls_handshakes_total = 8``,
``dtls_unmapped_timeout = 1``) and prints one JSON object: how many handshakes the clients
finished, the most channels the proxy held without an association, its descriptor growth,
what was left after the unmapped timeout, and whether a real association still works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import time
from typing import Any

from helpers_server import make_config, running_server

from socks6fast.asyncio import client as aclient
from socks6fast.asyncio.dtls import DTLSClient, open_dtls_client
from socks6fast.net.dtls import DTLSError, dtls_client_context

HANDSHAKES = 40  # bounded in count ...
DEADLINE = 30.0  # ... and in time


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, box: list[asyncio.DatagramTransport]) -> None:
        self._box = box

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._box[0].sendto(data, addr)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run(cert: str, key: str, ca: str) -> dict[str, Any]:
    tls = {"tls_listen": ["127.0.0.1:0"], "tls_certificate": cert, "tls_key": key}
    udp = {"dtls_handshakes_per_source": 4, "dtls_handshakes_total": 8, "dtls_unmapped_timeout": 1}
    async with running_server(make_config(server=tls, udp=udp)) as server:
        dtls = server.dtls
        assert dtls is not None
        (port,) = dtls.ports
        context = dtls_client_context(cafile=ca)
        before = fds()
        clients: list[DTLSClient] = []
        finished = failed = most_unmapped = most_channels = most_fds = 0
        started = time.monotonic()
        try:
            for _ in range(HANDSHAKES):
                if time.monotonic() - started > DEADLINE:
                    break
                try:
                    client = await open_dtls_client(port[0], port[1], proxy_dtls=context, timeout=5)
                except DTLSError:
                    failed += 1
                    continue
                finished += 1
                clients.append(client)  # kept open, silent: no association, no close_notify
                await asyncio.sleep(0.01)  # let a refusal's close_notify and the engine settle
                most_unmapped = max(most_unmapped, dtls.unmapped)
                most_channels = max(most_channels, len(dtls.channels))
                most_fds = max(most_fds, fds() - before - len(clients))
            seconds = time.monotonic() - started
            deadline = time.monotonic() + 5
            while (dtls.channels or dtls.unmapped) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left_channels, left_unmapped = len(dtls.channels), dtls.unmapped
            left_fds = fds() - before - len(clients)
        finally:
            for client in clients:
                client.close()
        # A real association still maps over DTLS (the caps count unmapped channels only).
        proxy_ssl = ssl.create_default_context(cafile=ca)
        url = f"socks6+tls://127.0.0.1:{server.tls_addresses[0][1]}"
        loop = asyncio.get_running_loop()
        box: list[asyncio.DatagramTransport] = []
        echo_transport, _ = await loop.create_datagram_endpoint(
            lambda: _Echo(box), local_addr=("127.0.0.1", 0)
        )
        box.append(echo_transport)
        echo = echo_transport.get_extra_info("sockname")[:2]
        try:
            async with await aclient.udp_associate(url, proxy_ssl=proxy_ssl, proxy_dtls=context) as assoc:
                await assoc.sendto(b"after the handshakes", echo)
                mapped_ok = await assoc.recvfrom(timeout=5) == (b"after the handshakes", echo)
                mapped_ok = mapped_ok and dtls.unmapped == 0 and len(dtls.channels) == 1
        finally:
            echo_transport.close()
        return {
            "handshakes": finished,
            "failed": failed,
            "seconds": seconds,
            "refused": dtls.refused,
            "most_unmapped": most_unmapped,
            "most_channels": most_channels,
            "most_server_fds": most_fds,
            "left_channels": left_channels,
            "left_unmapped": left_unmapped,
            "left_server_fds": left_fds,
            "association_after": mapped_ok,
        }


def main() -> None:
    cert, key, ca = sys.argv[1:4]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(asyncio.run(run(cert, key, ca))))


if __name__ == "__main__":
    main()
