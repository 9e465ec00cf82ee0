"""TCP Fast Open (RFC 7413) on real sockets, for the client and the server alike.

Strategy: one home for the kernel interface of TFO, so that every leg uses the same
platform logic. The protocol decides *when* TFO may carry data (draft-11 section "TCP Fast
Open on the Client-Proxy Leg", TRN-02: `socks6fast.proto.client.tfo_syn_may_carry_data`;
the TFO Stack option on the proxy-remote leg, CMD-02 / STK-06: the server's plan); this
module only sets and reads the socket options:

* connecting: ``TCP_FASTOPEN_CONNECT`` defers the SYN to the first write, which then
  rides in it when the kernel holds a TFO cookie for the peer (`enable_tfo_connect`);
* listening: ``TCP_FASTOPEN`` with a queue length accepts data in the SYN (TRN-01,
  `enable_tfo_listener`);
* afterwards: ``TCP_INFO`` says whether the SYN carried data the peer acknowledged
  (`tfo_syn_data_acked`).

The kernel also needs TFO enabled in ``net.ipv4.tcp_fastopen`` (0x1 client, 0x2 server);
without it every function here still succeeds and connections use the normal handshake.
Where the platform has no such option the functions return False instead of failing.
"""

from __future__ import annotations

import socket
import sys
from typing import Final

__all__ = [
    "DEFAULT_TFO_QUEUE",
    "TCPI_OPT_SYN_DATA",
    "TCP_FASTOPEN_CONNECT",
    "TFO_CLIENT",
    "TFO_SERVER",
    "TFO_SYSCTL",
    "enable_tfo_connect",
    "enable_tfo_listener",
    "server_tfo_notice",
    "tfo_syn_data_acked",
]

#: Linux ``TCP_FASTOPEN_CONNECT`` (include/uapi/linux/tcp.h, since 4.11; the ``socket``
#: module of Python 3.11 does not export it). None where there is no such option: the
#: number 30 means something else to other kernels, so it is never set blindly there.
TCP_FASTOPEN_CONNECT: Final[int | None] = getattr(
    socket, "TCP_FASTOPEN_CONNECT", 30 if sys.platform.startswith("linux") else None
)
#: ``tcp_info.tcpi_options`` bit: "SYN-ACK acked data in SYN" (and, on the accepting
#: side, data arrived in the SYN).
TCPI_OPT_SYN_DATA: Final = 0x20
#: Listen queue length for pending TFO requests on a listening socket.
DEFAULT_TFO_QUEUE: Final = 256
#: Where Linux shows ``net.ipv4.tcp_fastopen`` (Documentation/networking/ip-sysctl.rst).
#: `server_tfo_notice` reads the path it is given, so a test can point it at a file of its own.
TFO_SYSCTL: Final = "/proc/sys/net/ipv4/tcp_fastopen"
#: ``net.ipv4.tcp_fastopen`` bit 0x1: TFO as a client; 0x2: TFO as a server (accept SYN data).
TFO_CLIENT: Final = 0x1
TFO_SERVER: Final = 0x2
_TCP_INFO_OPTIONS_OFFSET: Final = 5  # u8 tcpi_state, ca_state, retransmits, probes, backoff, options
_TCP_INFO_MIN_LENGTH: Final = 8


def enable_tfo_connect(sock: socket.socket) -> bool:
    """Ask the kernel to put the first write into the SYN (``TCP_FASTOPEN_CONNECT``).

    Call it before ``connect``. With a TFO cookie cached for the peer, ``connect`` then
    returns at once and the SYN leaves with the first write, carrying it (the socket is
    not connected until then: ``getpeername`` fails with ENOTCONN); without a cookie the
    kernel connects normally and fetches one for next time.

    Returns:
        True when the kernel accepted the option; False where the platform has none or
        the kernel is older than 4.11 (a normal connect follows).
    """
    if TCP_FASTOPEN_CONNECT is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    except OSError:
        return False
    return True


def enable_tfo_listener(sock: socket.socket, queue: int = DEFAULT_TFO_QUEUE) -> bool:
    """Let a listening socket accept data in the SYN (TRN-01).

    The kernel also needs server-side TFO enabled (``net.ipv4.tcp_fastopen`` bit 0x2);
    without it connections simply complete the normal handshake.

    Returns:
        True when the option was set.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, queue)
    except (OSError, AttributeError):
        return False
    return True


def server_tfo_notice(path: str = TFO_SYSCTL) -> str | None:
    """One sentence for the start-up log when the kernel accepts no data in the SYN.

    The listeners always ask for TFO (TRN-01), but without bit 0x2 of ``net.ipv4.tcp_fastopen``
    the kernel ignores it and a client's Request waits one round trip (issue 14 item 5).

    Args:
        path: the sysctl file (`TFO_SYSCTL`); where it cannot be read (not Linux, no /proc)
            nothing is said.

    Returns:
        The notice, or None when the server side is on or the value is unknown.
    """
    try:
        with open(path, encoding="ascii") as file:
            value = int(file.read().split()[0], 0)
    except (OSError, ValueError, IndexError):
        return None
    if value & TFO_SERVER:
        return None
    return (
        f"TCP Fast Open is off on the server side (net.ipv4.tcp_fastopen = {value}, bit 2 unset): "
        f"clients' SOCKS requests sent in the SYN wait one round trip; turn it on with "
        f"sysctl -w net.ipv4.tcp_fastopen={value | TFO_CLIENT | TFO_SERVER} (docs/tuning.md)"
    )


def tfo_syn_data_acked(sock: socket.socket) -> bool:
    """True when the SYN of this connection carried data the peer acknowledged.

    On the connecting side this means TFO was used end to end; on an accepted socket it
    means the client's data arrived in the SYN.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_MIN_LENGTH)
    except (OSError, AttributeError):
        return False
    return len(info) > _TCP_INFO_OPTIONS_OFFSET and bool(info[_TCP_INFO_OPTIONS_OFFSET] & TCPI_OPT_SYN_DATA)
