"""asyncio adapters: the server and the client on an event loop; they perform what proto/ decides."""

from .client import (
    Binding,
    Proxy,
    Session,
    StreamBinding,
    UDPAssociation,
    open_bind,
    open_connection,
    udp_associate,
)

__all__ = [
    "Binding",
    "Proxy",
    "Session",
    "StreamBinding",
    "UDPAssociation",
    "open_bind",
    "open_connection",
    "udp_associate",
]
