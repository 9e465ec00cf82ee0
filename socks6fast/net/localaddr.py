"""The host's own addresses, read from the kernel: what the ``@local`` rule destination and
the loop check match (`socks6fast.proto.policy.LocalAddresses`, ``OwnListeners``).

Strategy: Python has no ``getifaddrs()``. On Linux we do what glibc's ``getifaddrs`` does
inside: two rtnetlink dumps on an ``AF_NETLINK`` socket (rtnetlink(7)), ``RTM_GETLINK`` for
the interface flags and ``RTM_GETADDR`` for every address of every interface, IPv4 and IPv6,
primary and secondary. That is one socket, two request/reply exchanges, no parsing of text
files, and it works in any network namespace without /proc or /sys; it costs well under a
millisecond and runs at start-up and on every reload (SIGHUP), never per connection.
``SIOCGIFCONF`` was not chosen (IPv4 only, and labels hide secondary addresses on old
kernels), nor ``/proc/net/if_inet6`` (IPv6 only, needs /proc).

What counts as local, as the kernel routes it (``ip route show table local``):

* every address of every interface, IPv6 link-local ones too (without scope), also on an
  interface that is down (counting it is the safe side for a deny rule);
* for an IPv4 address on a loopback interface, its whole prefix: ``ip addr add
  10.9.0.1/16 dev lo`` makes the kernel deliver all of 10.9.0.0/16 locally (``fib_add_ifaddr``
  adds a ``local`` route for the prefix of loopback devices); IPv6 does not do that;
* 127.0.0.0/8 and ::1 always (`LocalAddresses` adds them whatever the dump says).

Where netlink is not available (not Linux, a seccomp filter), `read_local_addresses` falls
back to loopback only and says so in its ``error`` result, which the server logs as a
warning: ``@local`` then misses the host's other addresses.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from ..proto.policy import IPAddress, IPNetwork, LocalAddresses

__all__ = ["read_local_addresses"]

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h, linux/if.h
_NETLINK_ROUTE = 0
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFF_LOOPBACK = 0x8

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
_RECV_SIZE = 65536
_TIMEOUT = 2.0  # seconds for the kernel to answer a dump (it answers at once)


def read_local_addresses() -> tuple[LocalAddresses, str | None]:
    """The addresses of this host, from the kernel.

    Returns:
        (the addresses, None) or, when they cannot be read, (loopback only, why not): the
        caller logs the reason, since ``@local`` then misses the host's other addresses.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE) as sock:
            sock.settimeout(_TIMEOUT)
            loopbacks = {
                index
                for index, flags in _dump_links(sock)
                if flags & _IFF_LOOPBACK  # the device flag, not the name "lo"
            }
            addresses: set[IPAddress] = set()
            networks: set[IPNetwork] = set()
            for index, address, prefixlen in _dump_addresses(sock):
                addresses.add(address)
                if index in loopbacks and address.version == 4 and not address.is_loopback:
                    networks.add(ipaddress.ip_network((address, prefixlen), strict=False))
    except (OSError, AttributeError, ValueError, struct.error) as exc:
        # AttributeError: no socket.AF_NETLINK (not Linux). ValueError / struct.error: a reply
        # we cannot parse; better loopback only and a warning than a proxy that does not start.
        why = str(exc) or type(exc).__name__
        return LocalAddresses(), f"cannot read this host's addresses from the kernel ({why})"
    return LocalAddresses(addresses=frozenset(addresses), networks=tuple(sorted(networks, key=str))), None


def _request(sock: socket.socket, msg_type: int, body: bytes, seq: int) -> Iterator[tuple[int, bytes]]:
    """Send one dump request; yield (type, payload) of each reply message up to NLMSG_DONE."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
    sock.sendto(header + body, (0, 0))  # (pid 0 = the kernel, no multicast groups)
    while True:
        data = sock.recv(_RECV_SIZE)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, reply_seq, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                raise ValueError("malformed netlink message")
            payload = data[offset + _NLMSGHDR.size : offset + length]
            offset += (length + 3) & ~3  # NLMSG_ALIGN
            if reply_seq != seq:
                continue
            if kind == _NLMSG_DONE:
                return
            if kind == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise OSError(code, os.strerror(code))
                continue
            yield kind, payload


def _attributes(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3  # RTA_ALIGN


def _dump_links(sock: socket.socket) -> Iterator[tuple[int, int]]:
    """(interface index, IFF_* flags) of every interface."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, payload in _request(sock, _RTM_GETLINK, body, 1):
        if kind == _RTM_NEWLINK and len(payload) >= _IFINFOMSG.size:
            _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
            yield index, flags


def _dump_addresses(sock: socket.socket) -> Iterator[tuple[int, IPAddress, int]]:
    """(interface index, address, prefix length) of every address, IPv4 and IPv6."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, payload in _request(sock, _RTM_GETADDR, body, 2):
        if kind != _RTM_NEWADDR or len(payload) < _IFADDRMSG.size:
            continue
        family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(payload)
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
        if size is None:
            continue
        attrs = dict(_attributes(payload, _IFADDRMSG.size))
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on a
        # point-to-point link (IPv4) and the address itself otherwise (IPv6 has no IFA_LOCAL
        # unless point-to-point).
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if raw is None or len(raw) != size:
            continue
        address: IPAddress = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        yield index, address, prefixlen
