"""Stack options applied to real sockets (draft-11 section "Stack options"; D9, STK-01..07).

Strategy: `socks6fast.proto.stack` plans (a Request's options -> `StackPlan`, duplicates
rejected per D10) and builds the echo; this module is the socket half. It sets what the plan
asks for with ``setsockopt`` on the socket of the leg the option names and then *reads the
value back* with ``getsockopt`` into an `AppliedLeg`, so the Operation Reply echoes what the
kernel actually uses, not what was asked (D9: "the behaviour actually applied").

* IP TOS: ``IP_TOS`` / ``IPV6_TCLASS``; TTL: ``IP_TTL`` / ``IPV6_UNICAST_HOPS`` (STK-03).
  Both are set before ``connect`` on the proxy-remote leg, so the SYN already carries them.
* No Fragmentation: ``IP_MTU_DISCOVER = IP_PMTUDISC_DO`` (the DF bit, no local
  fragmentation) / ``IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO`` plus ``IPV6_DONTFRAG`` (STK-05).
  NOT_DESIRED leaves the kernel default and is echoed as NOT_DESIRED ("the lack thereof
  is not enforced").
* TFO on the proxy-remote leg: ``TCP_FASTOPEN_CONNECT`` so that the first ``send`` carries
  the initial data in the SYN, and only when the request has a TFO option (CMD-02,
  STK-06); `tfo_syn_data_acked` tells whether the remote host accepted data in the SYN.
  These TFO helpers live in `socks6fast.net.tfo` (shared with the client) and are
  re-exported here for the server.
* Multipath: a socket of protocol ``IPPROTO_MPTCP`` (262) when asked and the kernel offers
  it; `mptcp_in_use` asks ``MPTCP_INFO``, which fails once the connection fell back to
  plain TCP (STK-07).
* Listening sockets accept TFO with ``TCP_FASTOPEN`` (queue length), TRN-01 (`socks6fast.net.tfo`).

Linux constants the ``socket`` module of Python 3.11 lacks are defined here with their
values from the kernel's uapi headers. Elsewhere every function degrades to "not applied"
(and the reply says so) instead of failing.
"""

from __future__ import annotations

import socket

from ..constants import Availability
from ..proto.stack import AppliedLeg, LegOptions
from .tfo import enable_tfo_connect, enable_tfo_listener, tfo_syn_data_acked

__all__ = [
    "apply_leg_options",
    "enable_tfo_connect",
    "enable_tfo_listener",
    "mptcp_in_use",
    "new_stream_socket",
    "read_leg_options",
    "tfo_syn_data_acked",
]

# <linux/tcp.h>, <linux/in.h>, <linux/in6.h>, <linux/mptcp.h>
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
SOL_MPTCP = 284
MPTCP_INFO = 1
_MPTCP_INFO_LENGTH = 256


def _is_ipv6(sock: socket.socket) -> bool:
    return sock.family == socket.AF_INET6


def _set(sock: socket.socket, level: int, name: int, value: int) -> None:
    try:
        sock.setsockopt(level, name, value)
    except OSError:
        pass  # reported through the read-back value


def _get(sock: socket.socket, level: int, name: int) -> int | None:
    try:
        return sock.getsockopt(level, name)
    except OSError:
        return None


def apply_leg_options(sock: socket.socket, leg: LegOptions, *, dual_stack: bool = False) -> AppliedLeg:
    """Apply one leg's IP options to ``sock`` and return what the kernel now uses.

    Args:
        sock: an AF_INET or AF_INET6 socket (before ``connect`` for the remote leg).
        leg: what the client asked for this leg.
        dual_stack: ``sock`` is an AF_INET6 socket that also sends IPv4 (IPV6_V6ONLY off):
            set the IPv4-level options too, which Linux uses for its IPv4-mapped traffic.

    Returns:
        The values read back; fields the client did not ask for are None.
    """
    v6 = _is_ipv6(sock)
    if leg.tos is not None:
        if v6:
            _set(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, leg.tos)
        else:
            _set(sock, socket.IPPROTO_IP, socket.IP_TOS, leg.tos)
    if leg.ttl is not None:
        if v6:
            _set(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, leg.ttl)
        else:
            _set(sock, socket.IPPROTO_IP, socket.IP_TTL, leg.ttl)
    if leg.no_fragmentation == Availability.DESIRED:
        if v6:
            _set(sock, socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            _set(sock, socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        else:
            _set(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    if dual_stack and v6:
        if leg.tos is not None:
            _set(sock, socket.IPPROTO_IP, socket.IP_TOS, leg.tos)
        if leg.ttl is not None:
            _set(sock, socket.IPPROTO_IP, socket.IP_TTL, leg.ttl)
        if leg.no_fragmentation == Availability.DESIRED:
            _set(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    return read_leg_options(sock, leg)


def read_leg_options(sock: socket.socket, leg: LegOptions) -> AppliedLeg:
    """Read back the IP options ``leg`` asks about (None for the others)."""
    v6 = _is_ipv6(sock)
    tos = ttl = None
    no_frag = None
    if leg.tos is not None:
        if v6:
            tos = _get(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
        else:
            tos = _get(sock, socket.IPPROTO_IP, socket.IP_TOS)
    if leg.ttl is not None:
        if v6:
            ttl = _get(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
        else:
            ttl = _get(sock, socket.IPPROTO_IP, socket.IP_TTL)
    if leg.no_fragmentation is not None:
        if v6:
            enforced = _get(sock, socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) == IPV6_PMTUDISC_DO
        else:
            enforced = _get(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER) == IP_PMTUDISC_DO
        no_frag = Availability.DESIRED if enforced else Availability.NOT_DESIRED
    return AppliedLeg(tos=tos, ttl=ttl, no_fragmentation=no_frag)


_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


def new_stream_socket(family: int, multipath: bool) -> tuple[socket.socket, bool]:
    """Create a non-blocking TCP socket, MPTCP when asked and available.

    Returns:
        ``(sock, is_mptcp_socket)``; the flag is False when MPTCP was not asked for or the
        kernel refused the protocol (then the socket is plain TCP).
    """
    # SOCK_NONBLOCK: created non-blocking by socket() itself, no ioctl afterwards (Linux).
    kind = socket.SOCK_STREAM | _SOCK_NONBLOCK
    if multipath:
        try:
            sock = socket.socket(family, kind, IPPROTO_MPTCP)
        except OSError:
            pass  # EPROTONOSUPPORT / ENOPROTOOPT: no MPTCP in this kernel or netns
        else:
            if not _SOCK_NONBLOCK:
                sock.setblocking(False)
            return sock, True
    sock = socket.socket(family, kind)
    if not _SOCK_NONBLOCK:
        sock.setblocking(False)
    return sock, False


def mptcp_in_use(sock: socket.socket) -> bool:
    """True when a connected socket really runs MPTCP (not a fallback to plain TCP)."""
    try:
        sock.getsockopt(SOL_MPTCP, MPTCP_INFO, _MPTCP_INFO_LENGTH)
    except OSError:
        return False  # EOPNOTSUPP after fallback, or not an MPTCP socket
    return True
