"""UDP through a SOCKS 6 proxy with both clients: a datagram to a local echo server and back.

Run a proxy first (``socks6fast serve``: 127.0.0.1:1080, no authentication), then::

    python examples/udp_client.py                       # socks6://127.0.0.1:1080
    python examples/udp_client.py socks6://127.0.0.1:1080

The echo server is started here, on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading

import socks6fast.asyncio as s6
import socks6fast.errors
from socks6fast.client import Proxy


def start_echo_server() -> tuple[str, int]:
    """A UDP echo server on 127.0.0.1 in a daemon thread; returns its address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()


async def with_asyncio(proxy_url: str, echo: tuple[str, int]) -> None:
    # Datagrams as plain UDP to the proxy's UDP port (its TCP port number, D16).
    async with await s6.udp_associate(proxy_url, transport="udp") as assoc:
        await assoc.sendto(b"hello over UDP", echo)
        data, source = await assoc.recvfrom(timeout=5)
        print("asyncio, udp:", data, "from", source, "| proxy relays from", assoc.bound)
    # The same, framed on the TCP connection (works over socks6+tls:// too).
    async with await s6.udp_associate(proxy_url, transport="tcp") as assoc:
        await assoc.sendto(b"hello over TCP", echo)
        print("asyncio, tcp:", *await assoc.recvfrom(timeout=5))


def with_blocking(proxy_url: str, echo: tuple[str, int]) -> None:
    with Proxy.from_url(proxy_url).udp_associate(transport="udp") as assoc:
        assoc.sendto(b"hello, blocking", echo)
        data, source = assoc.recvfrom(timeout=5)
        print("blocking, udp:", data, "from", source, "| association", assoc.id.hex())


def main() -> None:
    proxy_url = sys.argv[1] if len(sys.argv) > 1 else "socks6://127.0.0.1:1080"
    echo = start_echo_server()
    asyncio.run(with_asyncio(proxy_url, echo))
    with_blocking(proxy_url, echo)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, socks6fast.errors.ProxyError) as exc:
        # One sentence, not a traceback: no proxy there, a URL it cannot use, or a refusal.
        raise SystemExit(f"udp_client: {exc}") from None
