"""asyncio adapters: the only part of socks6fast that touches sockets and event loops."""
