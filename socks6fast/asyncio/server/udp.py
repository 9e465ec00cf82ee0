"""UDP ASSOCIATE in the asyncio adapter: the association's sockets, and the UDP data plane.

Strategy: the core (`socks6fast.proto.server`) decides everything about an association (the
rules, the limits, the ID, every byte of the replies) and asks for two things through its
actions: `OpenAssociation` (the UDP sockets: bound, with the UDP leg's Stack options, Port
Parity and its reservation; for SOCKS 5 a client-facing socket too) and `Associate` (hand
the client connection and those sockets to the data plane). `UdpService` is that data
plane for one `Server`: one `socks6fast.dataplane.udp.UdpEngine` (the native
recvmmsg/sendmmsg engine, or its Python twin), the SOCKS 6 UDP ports (D16: by default the
address and port number of each TCP listener, else ``[udp] port``), and the answers to what
the engine asks while it relays: ``UdpAsk`` (the rules on a destination, only for an
association whose rules depend on it) and ``UdpResolve`` (a domain name, D20: resolved by
the server's resolver and checked by the address it resolved to). ``UdpEnded`` ends the
connection's task, which logs its line with the association's counts.

The engine reads and writes the client's TCP connection itself (datagrams over TCP, the
Confirmation, UDP-07's "the association lives as long as the TCP connection"), so it needs a
plain socket. A TLS client connection has none the engine could use: `TLSBridge` pumps the
decrypted bytes between the TLS stream and one end of a socket pair whose other end the
engine gets (a copy per message, on the event loop; the engine sees a clean byte stream and
its EOF either way). A DTLS port (issue 11, ``asyncio.server.dtls``) hands each established
DTLS connection to the engine as a channel (``UdpEngine.add_channel``); its end comes back
here as ``UdpChannelEnded`` and goes to `UdpService.on_channel_ended`.

Nothing leaks: the sockets of an association belong to the handler until ``UdpEngine.add``
succeeds and to the engine after; reserved counterpart ports belong to the core's
`AssociationTable` and are closed by the handler when the table releases them (the
association ended) or by `UdpService.close` (shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ...config import UDPConfig
from ...constants import AddressType, Command, Parity
from ...dataplane.udp import (
    UDP_PATH,
    UdpAsk,
    UdpChannelEnded,
    UdpChannelHello,
    UdpConfirmed,
    UdpEnded,
    UdpEngine,
    UdpResolve,
    open_udp_port,
)
from ...net.stackopts import apply_leg_options
from ...proto.actions import Associate, OpenAssociation, OpenedAssociation
from ...proto.server import ServerContext
from ...proto.server_common import udp_destination_allowed
from ...proto.stack import AppliedLeg
from .dial import Resolver, resolve
from .record import format_address
from .streams import ClientStream

__all__ = [
    "PARITY_ATTEMPTS",
    "AssociationSockets",
    "TLSBridge",
    "UdpService",
    "open_association",
]

log = logging.getLogger("socks6fast.server")

#: Ports tried for a requested parity (and its free counterpart) before giving up (STK-08).
PARITY_ATTEMPTS = 64


@dataclass(slots=True)
class AssociationSockets:
    """What `open_association` opened; the handler's until the engine takes them."""

    remote: list[socket.socket] = field(default_factory=list)
    """The remote-facing socket(s)."""
    client_facing: socket.socket | None = None
    """SOCKS 5: the client-facing socket (D19)."""

    @property
    def families(self) -> frozenset[int]:
        """4 and/or 6: the destination families the remote sockets can reach."""
        out: set[int] = set()
        for sock in self.remote:
            if sock.family == socket.AF_INET:
                out.add(4)
                continue
            host = str(sock.getsockname()[0])
            if host.startswith("::ffff:") and "." in host:
                out.add(4)  # bound to an IPv4-mapped address: it can only speak IPv4
                continue
            out.add(6)
            # A dual-stack socket reaches IPv4 too, but only when bound to the wildcard:
            # from ::1 or any other IPv6 address there is no IPv4 source to send from.
            if host == "::" and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                out.add(4)
        return frozenset(out)

    def close(self) -> None:
        for sock in self.remote:
            sock.close()
        self.remote.clear()
        if self.client_facing is not None:
            self.client_facing.close()
            self.client_facing = None


def _near_client(stream: ClientStream, action: OpenAssociation) -> tuple[int, str]:
    """(address family, host) where the client reached us (``near_client``), or the request's
    address and its family."""
    family = socket.AF_INET6 if action.address_type == AddressType.IPV6 else socket.AF_INET
    local_host = stream.local_host() if action.near_client else None
    if local_host is None:
        return family, action.host
    with contextlib.suppress(ValueError):
        local = ipaddress.ip_address(local_host)
        if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
            local = local.ipv4_mapped  # a dual-stack listener reached over IPv4
        return (socket.AF_INET6 if local.version == 6 else socket.AF_INET), str(local)
    return family, action.host


def _has_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


#: Whether this host can open IPv6 sockets (read once: the answer does not change at run time).
HAS_IPV6 = _has_ipv6()


def _remote_bind(stream: ClientStream, action: OpenAssociation) -> tuple[int, str, str]:
    """(family, host to bind, host to name in the reply) for the remote-facing socket.

    A request that names no particular address (draft-11 "Requests": "If the client does not
    require a certain address, it can set ... the Address field to 0") gets the wildcard, in
    both families when the host has IPv6 (one dual-stack socket): the kernel then picks the
    source address per destination, so a client that reached a loopback or LAN address can
    send to hosts behind any interface and in either family. Binding where the client reached
    us (as BIND does) would make every datagram to a host off that network fail (EINVAL from
    127.0.0.1). Which hosts may answer is still the data plane's filter (D21). The reply
    names the address the client reached, the one address of ours it is known to reach.
    """
    family, host = _near_client(stream, action)
    if not action.near_client:
        return family, host, host
    if HAS_IPV6:
        return socket.AF_INET6, "::", host
    return socket.AF_INET, "0.0.0.0", host


def _udp_socket(
    family: int, host: str, port: int, action: OpenAssociation
) -> tuple[socket.socket, AppliedLeg | None]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        dual = family == socket.AF_INET6 and host == "::"
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families
        # The UDP leg's options ("the stack options refer to the UDP traffic relayed by the
        # proxy"), read back for the echo (STK-01, D9); on a dual-stack socket for IPv4 too.
        applied = None if action.options.empty else apply_leg_options(sock, action.options, dual_stack=dual)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock, applied


def _counterpart(port: int) -> int:
    """draft-11 "Port Parity options": even -> the next higher port, odd -> the next lower."""
    return port + 1 if port % 2 == 0 else port - 1


def _bind_with_parity(
    family: int, host: str, action: OpenAssociation
) -> tuple[socket.socket, AppliedLeg | None, bool, socket.socket | None]:
    """STK-08: a port of the requested parity, and with ``reserve`` its counterpart bound
    too; (socket, applied, parity honoured, counterpart socket or None)."""
    want_even = action.parity == Parity.EVEN
    for reserve in (True, False) if action.reserve else (False,):
        for _ in range(PARITY_ATTEMPTS):
            sock, applied = _udp_socket(family, host, 0, action)
            port = int(sock.getsockname()[1])
            if (port % 2 == 0) != want_even or (not want_even and port == 1):
                sock.close()
                continue
            if not reserve:
                return sock, applied, True, None
            held = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6 and host == "::":
                    held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                held.bind((host, _counterpart(port)))
            except OSError:
                held.close()
                sock.close()
                continue
            return sock, applied, True, held
    # "If the proxy can not or will not comply with the requested parity, it also does not
    # reserve the allocated port's counterpart."
    sock, applied = _udp_socket(family, host, 0, action)
    return sock, applied, False, None


def open_association(
    stream: ClientStream, action: OpenAssociation
) -> tuple[AssociationSockets, OpenedAssociation]:
    """Open what `OpenAssociation` asks for.

    Raises:
        OSError: a socket could not be bound (everything opened so far is closed).
    """
    sockets = AssociationSockets()
    try:
        family, host, reply_host = _remote_bind(stream, action)
        parity_ok = False
        reserved: socket.socket | None = None
        if isinstance(action.claim, socket.socket):
            # STK-08: the request named a port this client's association reserved.
            remote = action.claim
            dual = remote.family == socket.AF_INET6 and not remote.getsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
            )
            applied = (
                None if action.options.empty else apply_leg_options(remote, action.options, dual_stack=dual)
            )
        elif action.parity != Parity.NONE and action.port == 0:
            remote, applied, parity_ok, reserved = _bind_with_parity(family, host, action)
        else:
            remote, applied = _udp_socket(family, host, action.port, action)
        sockets.remote.append(remote)
        if action.socks5:
            # D19: the client-facing socket, on the address the TCP connection arrived at.
            facing_family, facing_host = _near_client(stream, action)
            facing = socket.socket(facing_family, socket.SOCK_DGRAM)
            sockets.client_facing = facing
            facing.bind((facing_host, 0))
    except BaseException:
        sockets.close()
        raise
    local = remote.getsockname()
    bound = str(local[0]).split("%", 1)[0]
    if bound in ("::", "0.0.0.0"):
        bound = reply_host
    opened = OpenedAssociation(
        (bound, int(local[1])),
        applied,
        parity=parity_ok,
        reserved=reserved,
        reserved_port=int(reserved.getsockname()[1]) if reserved is not None else 0,
    )
    if sockets.client_facing is not None:
        name = sockets.client_facing.getsockname()
        opened.client_facing = (str(name[0]), int(name[1]))
    return sockets, opened


def _check_free(host: str, port: int) -> None:
    """Raise EADDRINUSE when (host, port) is bound already. The SOCKS 6 port is an
    SO_REUSEPORT group (one socket per engine worker), and a group silently takes in any
    socket of the same user that sets the option too: another proxy's port would be shared,
    its datagrams split between two processes. A bind without the option fails instead."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port))


class TLSBridge:
    """Pumps a TLS client connection's plaintext to and from the engine's end of a socket
    pair, so UDP over a TLS control connection works like over plain TCP (UDP-02)."""

    __slots__ = ("_loop", "_ours", "_stream", "_tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: ClientStream, ours: socket.socket) -> None:
        self._loop = loop
        self._stream = stream
        self._ours = ours
        self._tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        """(ours, the engine's)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        return ours, theirs

    def start(self) -> None:
        self._tasks = [
            self._loop.create_task(self._client_to_engine()),
            self._loop.create_task(self._engine_to_client()),
        ]

    async def _client_to_engine(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                data = await self._stream.recv()
                if not data:
                    break
                await self._loop.sock_sendall(self._ours, data)
        # The client's EOF (or a failure) reaches the engine as EOF: the association ends.
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_WR)

    async def _engine_to_client(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                data = await self._loop.sock_recv(self._ours, 65536)
                if not data:
                    break
                await self._stream.send(data)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._ours.close()


@dataclass(slots=True)
class _Live:
    """One association in the engine, as the service knows it."""

    done: asyncio.Future[tuple[UdpEnded, UdpConfirmed | None]]
    client_ip: str
    user: str | None
    families: frozenset[int]
    ask: bool
    confirmed: UdpConfirmed | None = None
    by_name: set[tuple[str, int]] = field(default_factory=set)
    """Destinations a domain name resolved to, allowed by the rules with the name (D20)."""


class UdpService:
    """The UDP data plane of one `Server`: the engine, the SOCKS 6 UDP ports, and the
    answers to the engine's questions.

    Args:
        loop: the server's loop.
        config: the ``[udp]`` table.
        context: the core's context (the rules in effect, reloaded in place).
        resolver: resolves domain-name destinations (None: ``loop.getaddrinfo``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: UDPConfig,
        context: ServerContext,
        resolver: Resolver | None,
    ) -> None:
        self._loop = loop
        self._context = context
        self._resolver = resolver
        self.engine = UdpEngine(
            config.workers,
            batch=config.batch,
            max_datagram=config.max_datagram,
            first_datagram_timeout=config.first_datagram_timeout,
            loop=loop,
        )
        self._live: dict[bytes, _Live] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ports: list[tuple[str, int]] = []
        """The SOCKS 6 UDP ports, (host, port) each."""
        self.path = UDP_PATH
        """``"mmsg"`` (the native engine) or ``"python"``."""
        self._closed = False
        self.on_channel_ended: Callable[[UdpChannelEnded], None] | None = None
        """Told of each ``UdpChannelEnded`` (the DTLS ports, ``asyncio.server.dtls``)."""
        self.on_channel_hello: Callable[[UdpChannelHello], None] | None = None
        """Told of each ``UdpChannelHello`` (a new DTLS handshake on a channel's 5-tuple)."""
        self.on_channel_mapped: Callable[[int], None] | None = None
        """Told of each channel an association was mapped to (``UdpConfirmed.channel``): the
        DTLS ports stop counting it as unmapped (probe 19 F4)."""
        loop.add_reader(self.engine.fileno(), self._on_events)

    def open_ports(self, addresses: list[tuple[str, int]]) -> None:
        """Bind the SOCKS 6 UDP port on each (host, port) (D16) and give it to the engine.

        Raises:
            OSError: a port cannot be bound (naming it).
        """
        for host, port in addresses:
            if (host, port) in self.ports:
                continue
            try:
                _check_free(host, port)
                fds = open_udp_port(host, port, self.engine.workers)
            except OSError as exc:
                where = f"UDP {format_address(host, port)}: {exc.strerror or exc}"
                hint = " (the SOCKS 6 UDP port: set [udp] port, or enabled = false)"
                raise OSError(exc.errno, where + hint) from exc
            try:
                self.engine.add_port(fds)
            except BaseException:
                for fd in fds:
                    socket.close(fd)
                raise
            name = socket.socket(fileno=fds[0])
            try:
                bound = name.getsockname()
            finally:
                name.detach()
            self.ports.append((str(bound[0]), int(bound[1])))

    def adopt_port(self, fds: list[int]) -> None:
        """Serve a SOCKS 6 UDP port bound by the supervisor of ``serve --workers N`` (D34):
        this worker's share of the port's SO_REUSEPORT group, one socket per engine thread.
        The supervisor attached the group's BPF program; the engine must not replace it.
        The engine owns ``fds`` from here on (closed here when it refuses them)."""
        try:
            self.engine.add_port(fds, steer=False)
        except BaseException:
            for fd in fds:
                socket.close(fd)
            raise
        name = socket.socket(fileno=fds[0])
        try:
            bound = name.getsockname()
        finally:
            name.detach()
        self.ports.append((str(bound[0]), int(bound[1])))

    def add(
        self,
        action: Associate,
        tcp_fd: int,
        sockets: AssociationSockets,
        client_ip: str,
        user: str | None,
    ) -> asyncio.Future[tuple[UdpEnded, UdpConfirmed | None]]:
        """Hand an association to the engine; the future ends with its ``UdpEnded`` and its
        ``UdpConfirmed`` (None when no first datagram came).

        On success the engine owns ``tcp_fd`` and the sockets (they are detached from
        ``sockets``).

        Raises:
            ValueError, OSError: the engine refused it (the caller still owns everything).
        """
        # Only ask about destinations when the rules can tell them apart: a datagram to a
        # destination waiting for its verdict is held until it comes (D24).
        ask = self._context.policy.destination_matters(client_ip, user, Command.UDP_ASSOCIATE)
        families = sockets.families
        remote_fds = [sock.fileno() for sock in sockets.remote]
        facing = sockets.client_facing
        self.engine.add(
            action.association_id,
            tcp_fd,
            remote_fds,
            socks5_fd=facing.fileno() if facing is not None else -1,
            client_address=action.client_address,
            client_port=action.client_port,
            udp_error=action.udp_error,
            ask=ask,
            tcp_send=action.send,
            tcp_pending=action.pending,
        )
        for sock in sockets.remote:
            sock.detach()
        sockets.remote.clear()
        if facing is not None:
            facing.detach()
            sockets.client_facing = None
        done: asyncio.Future[tuple[UdpEnded, UdpConfirmed | None]] = self._loop.create_future()
        self._live[action.association_id] = _Live(done, client_ip, user, families, ask)
        return done

    def remove(self, association_id: bytes) -> None:
        """End an association now (its connection's task was cancelled)."""
        if not self._closed:
            self.engine.remove(association_id)

    # -- the engine's events -------------------------------------------------------------

    def _on_events(self) -> None:
        for event in self.engine.drain():
            if isinstance(event, UdpChannelEnded):
                # A DTLS connection's channel (issue 11): the DTLS ports drop the connection.
                if self.on_channel_ended is not None:
                    self.on_channel_ended(event)
                continue
            if isinstance(event, UdpChannelHello):
                # Its client restarts DTLS from the same 5-tuple (D31, RFC 6347 4.2.8).
                if self.on_channel_hello is not None:
                    self.on_channel_hello(event)
                continue
            if isinstance(event, UdpConfirmed) and event.channel >= 0 and self.on_channel_mapped is not None:
                self.on_channel_mapped(event.channel)
            live = self._live.get(event.association_id)
            if live is None:
                continue
            if isinstance(event, UdpEnded):
                del self._live[event.association_id]
                if not live.done.done():
                    live.done.set_result((event, live.confirmed))
            elif isinstance(event, UdpConfirmed):
                live.confirmed = event
            elif isinstance(event, UdpAsk):
                self._verdict(event, live)
            else:
                assert isinstance(event, UdpResolve)
                task = self._loop.create_task(self._resolve(event, live))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _verdict(self, event: UdpAsk, live: _Live) -> None:
        # CMD-06 for each destination; D20: an address a name resolved to was checked with
        # the name already.
        allow = (event.address, event.port) in live.by_name or udp_destination_allowed(
            self._context.policy, live.client_ip, live.user, event.address, event.port
        )
        if not allow:
            log.debug(
                "UDP association %s: datagrams to %s denied by the rules",
                event.association_id.hex(),
                format_address(event.address, event.port),
            )
        with contextlib.suppress(ValueError):
            self.engine.verdict(event.association_id, event.address, event.port, allow)

    async def _resolve(self, event: UdpResolve, live: _Live) -> None:
        """D20: resolve once per association; the first address the association can reach
        and the rules allow (checked with the name and the address) is cached."""
        address: str | None = None
        try:
            async with asyncio.timeout(self._context.connect_timeout):
                targets = await resolve(self._loop, self._resolver, event.name, event.port)
        except (OSError, TimeoutError, UnicodeError) as exc:
            log.debug(
                "UDP association %s: cannot resolve %r: %s", event.association_id.hex(), event.name, exc
            )
        else:
            for _family, sockaddr in targets:
                host = str(sockaddr[0]).split("%", 1)[0]
                version = 6 if ":" in host else 4
                if version not in live.families:
                    continue
                if udp_destination_allowed(
                    self._context.policy, live.client_ip, live.user, host, event.port, name=event.name
                ):
                    address = host
                    live.by_name.add((host, event.port))
                    break
        if self._closed or event.association_id not in self._live:
            return
        with contextlib.suppress(ValueError):
            self.engine.resolved(event.association_id, event.name, address)

    # -- life cycle ----------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Live associations."""
        return len(self._live)

    def close(self) -> None:
        """End every association (``RelayEnd.SHUTDOWN``), close the ports and the engine."""
        if self._closed:
            return
        with contextlib.suppress(ValueError):
            self._loop.remove_reader(self.engine.fileno())
        self.engine.close()
        self._closed = True
        self._on_events()  # the ends close() reported
        for task in self._tasks:
            task.cancel()
        for live in self._live.values():
            if not live.done.done():
                live.done.cancel()
        self._live.clear()
