"""Type stub of the compiled UDP engine (src_pyx/socks6fast/dataplane/_udp_c.pyx).

Its Python twin is ``socks6fast.dataplane._udp_py.UdpEngine`` (same API).
"""

import asyncio
from collections.abc import Sequence
from types import TracebackType

from ..constants import UdpDrop
from .udp_types import DTLSLink, UdpEvent

class UdpEngine:
    def __init__(
        self,
        workers: int = 0,
        *,
        batch: int = 16,
        max_datagram: int = 65535,
        first_datagram_timeout: float = 0.0,
        hold_datagrams: int = 8,
        hold_bytes: int = 16384,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None: ...
    @property
    def workers(self) -> int: ...
    @property
    def active(self) -> int: ...
    def fileno(self) -> int: ...
    def add_port(self, fds: Sequence[int], *, steer: bool = True) -> None: ...
    def add(
        self,
        association_id: bytes,
        tcp_fd: int,
        remote_fds: Sequence[int],
        *,
        socks5_fd: int = -1,
        client_address: str | None = None,
        client_port: int = 0,
        udp_error: bool = False,
        ask: bool = False,
        tcp_send: bytes = b"",
        tcp_pending: bytes = b"",
    ) -> None: ...
    def verdict(self, association_id: bytes, address: str, port: int, allow: bool) -> None: ...
    def resolved(self, association_id: bytes, name: str, address: str | None) -> None: ...
    def remove(self, association_id: bytes) -> None: ...
    def add_channel(self, fd: int, dtls: DTLSLink | None = None) -> int: ...
    def remove_channel(self, channel: int) -> None: ...
    def drain(self) -> list[UdpEvent]: ...
    def drops(self) -> dict[UdpDrop, int]: ...
    def held(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> UdpEngine: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
