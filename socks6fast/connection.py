"""Sans-IO SOCKS 6 connections: the proxy side and the client side (h11 ``Connection``).

Importing this module never imports ``asyncio`` or ``socket`` (tests/test_imports.py).
"""

from __future__ import annotations

from ._state import NEED_DATA, PAUSED, NeedData, Paused
from .client_connection import ClientConnection
from .server_connection import ServerConnection, Socks5ServerConnection

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ClientConnection",
    "NeedData",
    "Paused",
    "ServerConnection",
    "Socks5ServerConnection",
]
