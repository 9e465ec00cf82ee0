"""asyncio adapters: the only part of socks6fast that touches sockets and event loops."""

from .client import Binding, Proxy, Session, StreamBinding, open_bind, open_connection

__all__ = ["Binding", "Proxy", "Session", "StreamBinding", "open_bind", "open_connection"]
