"""A ClientHello flood against the DTLS server endpoint over real sockets, run by
tests/test_dtls.py inside a network namespace of its own (``unshare -n``, lo up): the flood
is generated traffic, so nothing of it can reach beyond that namespace's loopback.

``python tests/helpers_dtls.py CERT KEY CA`` prints one JSON object: the server's counters
and state after the flood, what the flooding sockets got back, the Python memory the flood
left behind, and whether a real client still completes a handshake afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import tracemalloc
from typing import Any

from socks6fast.asyncio.dtls import DTLSServer, open_dtls_client, start_dtls_server
from socks6fast.net.dtls import DTLSClientConnection, DTLSConnection, dtls_client_context, dtls_server_context

SOURCES = 400  # flooding sockets, each its own source port
HELLOS_PER_SOURCE = 3
DEADLINE = 20.0  # seconds for the whole flood


async def flood(cert: str, key: str, ca: str) -> dict[str, Any]:
    server: DTLSServer | None = None

    def echo(conn: DTLSConnection, data: bytes) -> None:
        assert server is not None
        server.send(conn, data)

    server = await start_dtls_server("127.0.0.1", 0, dtls_server_context(cert, key), on_datagram=echo)
    port = server.sockname()[1]
    hello_maker = DTLSClientConnection(dtls_client_context(cafile=ca), "127.0.0.1")
    hello_maker.start(0.0)
    (hello,) = hello_maker.datagrams_to_send()
    sockets = []
    for _ in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    tracemalloc.start()
    await asyncio.sleep(0)
    before = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    sent = 0
    max_connections = 0
    for _ in range(HELLOS_PER_SOURCE):
        for sock in sockets:
            if time.monotonic() - started > DEADLINE:
                break
            sock.send(hello)
            sent += 1
            if sent % 20 == 0:
                # Let the server read this burst (bounded wait) so the socket buffer does not
                # overflow: the point is what the server keeps, not what the kernel drops.
                for _ in range(100):
                    if server.counters.datagrams_received >= sent:
                        break
                    await asyncio.sleep(0.002)
                max_connections = max(max_connections, len(server.connections))
    for _ in range(200):  # until the server has read everything (bounded: 2 s)
        if server.counters.datagrams_received >= sent:
            break
        await asyncio.sleep(0.01)
    max_connections = max(max_connections, len(server.connections))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    answered = 0
    verify_requests = 0
    for sock in sockets:
        while True:
            try:
                reply = sock.recv(65536)
            except BlockingIOError:
                break
            answered += 1
            verify_requests += reply[0] == 22 and reply[13] == 3
        sock.close()
    # The server is still of use: a real client completes a handshake and echoes.
    async with await open_dtls_client("127.0.0.1", port, proxy_dtls=dtls_client_context(cafile=ca)) as client:
        client.send(b"after the flood")
        echoed = await asyncio.wait_for(client.recv(), 5) == b"after the flood"
    counters = server.counters
    result = {
        "sent": sent,
        "seconds": time.monotonic() - started,
        "received": counters.datagrams_received,
        "answered": answered,
        "hello_verify_requests": verify_requests,
        "cookies_sent": counters.cookies_sent,
        "max_connections": max_connections,
        "handshakes_done": counters.handshakes_done,
        "memory_growth": after - before,
        "echoed_after": echoed,
    }
    server.close()
    await server.wait_closed()
    return result


def main() -> None:
    cert, key, ca = sys.argv[1:4]
    print(json.dumps(asyncio.run(flood(cert, key, ca))))


if __name__ == "__main__":
    main()
