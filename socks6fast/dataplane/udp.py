"""UDP data plane selector: the native recvmmsg/sendmmsg engine when available, else Python.

Strategy: the control plane sets a UDP association up (SOCKS 6 or SOCKS 5 UDP
ASSOCIATE: authentication, rules, Stack options, the remote-facing sockets, the
Association ID) and hands it to a :data:`UdpEngine` with ``add()``; the engine relays
its datagrams until the TCP connection ends, and reports through ``drain()``
(watch ``fileno()`` with ``loop.add_reader``). On Linux with the compiled extension
that is ``socks6fast.dataplane._udp_c.UdpEngine`` (C worker threads, no GIL, no
Python per datagram); elsewhere, or with ``SOCKS6FAST_NO_EXTENSIONS=1``, the
pure-Python twin ``_udp_py.UdpEngine`` on the event loop. Both take the same
arguments, apply the same rules and report the same events
(``socks6fast.dataplane.udp_types``) and drop reasons (``constants.UdpDrop``).

The API (documented in full in ``src_pyx/socks6fast/dataplane/_udp_c.pyx``)::

    engine = UdpEngine(workers=0, batch=16, max_datagram=65535,
                       first_datagram_timeout=0.0, hold_datagrams=8,
                       hold_bytes=16384, loop=None)
    engine.add_port(open_udp_port(host, port, engine.workers))  # SOCKS 6 UDP port (D16)
    engine.add(association_id, tcp_fd, remote_fds, socks5_fd=-1, client_address=None,
               client_port=0, udp_error=False, ask=False, tcp_send=b"", tcp_pending=b"")
    engine.verdict(association_id, address, port, allow)      # answers UdpAsk
    engine.resolved(association_id, name, address_or_None)    # answers UdpResolve (D20)
    engine.remove(association_id)
    engine.add_channel(fd, dtls=None) -> int   # a DTLS connection's client leg (issue 11)
    engine.remove_channel(channel)
    engine.drain() -> list[UdpEvent]
    engine.drops() -> dict[UdpDrop, int]
    engine.held() -> tuple[int, int]   # datagrams, bytes waiting for a verdict/name (D24)
    engine.close()

``add_channel(fd, dtls)`` (issue 11; the contract both engines implement): ``fd`` is a
UDP socket connected to one client 5-tuple (the DTLS connection's), owned by the engine
from the call on; ``dtls`` a :class:`DTLSLink` (established connection, whose records the
engine decrypts and encrypts) or None (plaintext SOCKS 6 datagrams, for tests). Each
datagram read from it is one SOCKS 6 UDP message as on the UDP port; the first valid one
naming a live association that is not mapped yet maps that association to this channel
(UDP-03, ``UdpConfirmed(channel=...)``, Confirmation on the TCP connection as usual),
also when the channel already carries others (D31). A channel carries the associations
of one worker (``association_id[7] % workers``, the worker of the first one mapped to
it; the control plane draws one client's IDs for one worker, D32): a datagram naming an
association of another worker on a mapped channel, or an association mapped elsewhere,
is dropped (``UdpDrop.MAPPING``). Datagrams and Error messages to the client of an
association mapped to a channel go out on it (D17). A channel ends (``UdpChannelEnded``,
socket closed) with the last association mapped to it, on ``remove_channel``, when
nothing is mapped to it within ``first_datagram_timeout``, or on the peer's
close_notify / a fatal alert. A datagram on a DTLS channel that starts with an epoch-0
ClientHello (its client restarting DTLS from the same 5-tuple, RFC 6347 section 4.2.8) is
not given to the connection but reported as ``UdpChannelHello(channel, datagram)`` for the
control plane's cookie exchange (D31).
An association whose channel ended first lives on until its TCP connection ends; datagrams
to its client are dropped (``UdpDrop.NO_CHANNEL``) and it is never re-mapped (D28). DTLS
records that do not decrypt (garbage, truncated, bad MAC, replayed) are dropped as
``UdpDrop.RECORD``; a retransmitted client Finished is answered (the engine sends what
OpenSSL writes after each read). A message larger than one record can carry within
``DTLSLink.mtu`` is dropped (``UdpDrop.TOO_BIG``).

The server runs one engine (``socks6fast.asyncio.server.udp.UdpService``): it sets each
UDP ASSOCIATE up and answers the engine's ``UdpAsk`` / ``UdpResolve`` events.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Literal

from .._extensions import NO_EXTENSIONS
from ._udp_py import UdpEngine as UdpEnginePy
from .udp_types import (
    DTLSLink,
    UdpAsk,
    UdpChannelEnded,
    UdpChannelHello,
    UdpConfirmed,
    UdpEnded,
    UdpEvent,
    UdpResolve,
)

if TYPE_CHECKING:
    from ._udp_c import UdpEngine as _UdpEngineC

#: Which UDP data path is in use: the native engine or the Python twin.
UdpPath = Literal["mmsg", "python"]
PATH_MMSG: UdpPath = "mmsg"
PATH_PYTHON: UdpPath = "python"

#: The native engine class, or None where it cannot run (not Linux, no extensions).
UdpEngineC: type[_UdpEngineC] | None = None
if not NO_EXTENSIONS and sys.platform.startswith("linux"):
    try:
        from ._udp_c import UdpEngine as _Loaded
    except ImportError:  # pragma: no cover - a broken build; test_udp_engine.py flags it
        pass
    else:
        UdpEngineC = _Loaded

#: True when UDP associations go through the native engine.
UDP_ENGINE_AVAILABLE = UdpEngineC is not None
#: The engine the control plane should use.
UdpEngine: type[_UdpEngineC] | type[UdpEnginePy] = UdpEngineC if UdpEngineC is not None else UdpEnginePy
#: Its path name, for logs and benchmark reports.
UDP_PATH: UdpPath = PATH_MMSG if UdpEngineC is not None else PATH_PYTHON


def open_udp_port(host: str, port: int, count: int) -> list[int]:
    """Bind ``count`` UDP sockets to (host, port) as one SO_REUSEPORT group, for ``add_port``.

    Port 0 picks a free port for the first socket and binds the others to the same one.
    Returns their fds in bind order (the group's order, which the native engine's BPF
    steering relies on); the caller hands them to ``UdpEngine.add_port`` (which then
    owns them) or closes them.

    Raises:
        OSError: the address cannot be bound.
        ValueError: ``count`` is not positive.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return [sock.detach() for sock in socks]


__all__ = [
    "PATH_MMSG",
    "PATH_PYTHON",
    "UDP_ENGINE_AVAILABLE",
    "UDP_PATH",
    "DTLSLink",
    "UdpAsk",
    "UdpChannelEnded",
    "UdpChannelHello",
    "UdpConfirmed",
    "UdpEnded",
    "UdpEngine",
    "UdpEngineC",
    "UdpEnginePy",
    "UdpEvent",
    "UdpPath",
    "UdpResolve",
    "open_udp_port",
]
