"""What the UDP data plane reports to the control plane, and the tables both engines share.

One definition for the native engine (``_udp_c``, compiled from
``src_pyx/socks6fast/dataplane/_udp_c.pyx``) and its pure-Python twin (``_udp_py``):
the events :meth:`UdpEngine.drain` returns, and the ICMP -> Datagram Error code table
(section "Reporting ICMP Errors"; shared/design/udp-and-dtls.md). This module imports
neither asyncio nor socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from ..constants import DatagramErrorCode, RelayEnd

__all__ = [
    "ICMP6_ERROR_CODES",
    "ICMP_ERROR_CODES",
    "DTLSLink",
    "UdpAsk",
    "UdpChannelEnded",
    "UdpChannelHello",
    "UdpConfirmed",
    "UdpEnded",
    "UdpEvent",
    "UdpResolve",
    "default_workers",
    "icmp_error_code",
]

#: The most worker threads ``workers=0`` starts (the native engine's limit, MAX_WORKERS).
MAX_WORKERS: Final = 64


def default_workers() -> int:
    """Worker threads of an engine made with ``workers=0``: half the cores this process may
    run on, at least one (D33).

    A relayed datagram costs about as much kernel work outside the worker as inside it
    (the softirq that delivers what a worker sends, the client and the remote host that
    receive it): one worker per core oversubscribed the 2-core bench machine, with 15-20 %
    more proxy CPU per echo; with every core busy with other work, one worker relays fewer
    echoes per second than two (benchmarks/RESULTS.md).
    """
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) // 2))


@dataclass(frozen=True, slots=True)
class UdpConfirmed:
    """The client's first datagram fixed the association's mapping (UDP-03, UDP-04).

    For a SOCKS 6 association the engine has written the Association Confirmation on the
    TCP connection itself, before any Datagram or Error message (so the order UDP-04
    asks for holds without a lock shared with Python).
    """

    association_id: bytes
    """The association (8 bytes)."""
    over_tcp: bool
    """True: the client sends its datagrams over the TCP connection; False: plain UDP."""
    client: tuple[str, int] | None
    """The client's UDP address and port (the mapped 5-tuple's far end); None over TCP."""
    server_mode: bool
    """The first datagram was the empty one to the all-zero address (UDP-06)."""
    channel: int = -1
    """The channel (``UdpEngine.add_channel``'s id: a DTLS connection) the association was
    mapped to; -1 when mapped to the TCP connection or the UDP port. ``client`` then names
    the channel's peer."""


@dataclass(frozen=True, slots=True)
class UdpAsk:
    """A client datagram named a destination the association has no verdict for.

    Only for associations added with ``ask=True``. The datagram is held (D24: with the
    later ones to the same destination, up to the engine's ``hold_datagrams`` /
    ``hold_bytes`` per association; beyond, ``UdpDrop.PENDING``); the control plane
    checks its rules and answers with ``UdpEngine.verdict(association_id, address,
    port, allow)``, which sends the held datagrams in order or drops them
    (``UdpDrop.DENIED``); later datagrams to it are relayed or dropped without asking.
    """

    association_id: bytes
    address: str
    """IPv4 or IPv6 address (text)."""
    port: int


@dataclass(frozen=True, slots=True)
class UdpResolve:
    """A client datagram named a domain name the association has not resolved yet (D20).

    The datagram is held as for :class:`UdpAsk` (D24); the control plane resolves the
    name and answers with ``UdpEngine.resolved(association_id, name, address)``. The
    answer is cached for the association's life; the destination (address, port) then
    goes through the verdicts like any other, and the held datagrams with it.
    """

    association_id: bytes
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class UdpEnded:
    """An association ended; the engine has closed every socket it was given for it."""

    association_id: bytes
    end: RelayEnd
    """EOF: the TCP connection ended (UDP-07); RESET: it was reset; IDLE_TIMEOUT: no
    first datagram in time (UDP-07); ERROR: unframeable bytes on the TCP connection or
    a socket error; SHUTDOWN: removed by the control plane or the engine closed."""
    cause: str
    """Why, in words, when ``end`` does not say everything; "" otherwise."""
    datagrams_to_remote: int
    bytes_to_remote: int
    """Payload bytes sent to remote hosts."""
    datagrams_to_client: int
    bytes_to_client: int
    """Payload bytes relayed to the client (headers not counted)."""
    drops: int
    """Datagrams of this association dropped (any UdpDrop reason)."""
    icmp_errors: int
    """ICMP errors read from the remote sockets' error queues."""
    icmp_reported: int
    """Of those, the ones sent to the client as Datagram Error messages (UDP-09)."""


@dataclass(frozen=True, slots=True)
class DTLSLink:
    """An established DTLS connection handed from the control plane to an engine (issue 11).

    The control plane runs the handshake (``net.dtls``) and then gives the connection to
    ``UdpEngine.add_channel`` together with a UDP socket connected to the client's 5-tuple.
    From then on the engine is the connection's only user: it decrypts each datagram read
    from the socket and encrypts each one it sends (the native engine through the record
    layer of the OpenSSL that pyOpenSSL uses, the Python twin through pyOpenSSL), and the
    control plane must not touch the connection until ``UdpChannelEnded`` names it.
    """

    connection: object
    """The established ``OpenSSL.SSL.Connection`` (memory BIOs); kept alive by this object."""
    mtu: int = 1400
    """Largest record the engine may send (bytes of ciphertext per datagram)."""


@dataclass(frozen=True, slots=True)
class UdpChannelEnded:
    """A channel added with ``UdpEngine.add_channel`` ended; the engine closed its socket.

    ``cause``: "association ended" (its association ended, UDP-07), "unmapped" (no
    association was mapped to it within the first-datagram timeout), "removed"
    (``remove_channel`` or engine close), "closed by peer" (DTLS close_notify or a fatal
    alert), or an error in words.
    """

    channel: int
    cause: str
    datagrams_in: int
    """Datagrams read from the channel (after decryption)."""
    datagrams_out: int
    """Datagrams written to the channel (before encryption)."""
    drops: int
    """Records or datagrams from the channel that were dropped (undecryptable, not a
    Datagram, another association than the mapped one...)."""


@dataclass(frozen=True, slots=True)
class UdpChannelHello:
    """A DTLS channel's client started a new handshake from the same address and port: a
    datagram whose first record is an epoch-0 handshake record holding a ClientHello
    (``net.dtls.is_client_hello``) arrived on the channel's socket. The engine passes it on
    instead of giving it to the established connection (which would discard it), so that the
    control plane can answer it with its cookie exchange (RFC 6347 section 4.2.8, D31);
    the channel itself goes on as before.
    """

    channel: int
    datagram: bytes


UdpEvent = UdpConfirmed | UdpAsk | UdpResolve | UdpEnded | UdpChannelEnded | UdpChannelHello

#: ICMPv4 (type, code) -> Datagram Error code (section "Reporting ICMP Errors"; the
#: design card's table). Destination Unreachable: net 0, net unknown 6, net for TOS 11;
#: host 1, host unknown 7, host for TOS 12. Time Exceeded (type 11): any code. Port
#: unreachable (3/3) and everything else are not reported.
ICMP_ERROR_CODES: Final[dict[tuple[int, int | None], DatagramErrorCode]] = {
    (3, 0): DatagramErrorCode.NETWORK_UNREACHABLE,
    (3, 6): DatagramErrorCode.NETWORK_UNREACHABLE,
    (3, 11): DatagramErrorCode.NETWORK_UNREACHABLE,
    (3, 1): DatagramErrorCode.HOST_UNREACHABLE,
    (3, 7): DatagramErrorCode.HOST_UNREACHABLE,
    (3, 12): DatagramErrorCode.HOST_UNREACHABLE,
    (11, None): DatagramErrorCode.TTL_EXPIRED,
}
#: ICMPv6: Destination Unreachable no route (1/0) -> net, address unreachable (1/3) ->
#: host; Time Exceeded (type 3) -> TTL; Packet Too Big (type 2) -> too big (IPv6 only).
ICMP6_ERROR_CODES: Final[dict[tuple[int, int | None], DatagramErrorCode]] = {
    (1, 0): DatagramErrorCode.NETWORK_UNREACHABLE,
    (1, 3): DatagramErrorCode.HOST_UNREACHABLE,
    (3, None): DatagramErrorCode.TTL_EXPIRED,
    (2, None): DatagramErrorCode.DATAGRAM_TOO_BIG,
}


def icmp_error_code(ipv6: bool, icmp_type: int, icmp_code: int) -> DatagramErrorCode | None:
    """The Datagram Error code for an ICMP (``ipv6`` False) or ICMPv6 error, or None."""
    table = ICMP6_ERROR_CODES if ipv6 else ICMP_ERROR_CODES
    return table.get((icmp_type, icmp_code)) or table.get((icmp_type, None))
