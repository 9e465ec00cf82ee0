"""The proxy's DTLS ports (issue 11): SOCKS 6 datagrams over DTLS, the draft's third UDP
transport (section "UDP ASSOCIATE": "over an established DTLS session"; UDP-02, UDP-03,
TRN-03; D16, D17, D29).

Strategy: the handshake runs here, in the control plane (``socks6fast.net.dtls``: stateless
cookies before any state, caps on handshakes in progress, retransmission timers), on one
UDP socket per DTLS port. When a handshake completes, the connection is handed to the UDP
engine and the control plane never touches it again:

1. ``on_established`` runs while the server's last flight (ChangeCipherSpec, Finished) is
   still queued, not sent. A new UDP socket is bound to the DTLS port's address and port
   (SO_REUSEADDR: the listening socket sets it too) and connected to the client's address.
   The kernel delivers a datagram to the socket whose binding matches it best, so from now
   on the client's datagrams reach the connected socket, not the listening one. Under DTLS
   1.2 (what ``net.dtls`` negotiates, D29) the client sends no application record before
   it has our Finished, so none can reach the listening socket first (DTLS 1.3 would
   change that: D29 keeps the ports at 1.2).
2. ``engine.add_channel(fd, DTLSLink(connection, mtu))`` gives the socket and the
   connection to the engine, and ``DTLSServerEndpoint.release`` forgets the connection here
   (no close_notify); then the last flight is sent from the listening socket (same address
   and port: the client cannot tell). If the engine refuses, the socket is closed and the
   client gets a close_notify.
3. The engine maps the association named by the first valid datagram (UDP-03) and relays
   exactly as on the plain UDP port (same rules, same limits, Error messages on the mapped
   channel, D17). A retransmitted client Finished reaches the engine's socket, which answers
   it. ``UdpChannelEnded`` (association over, unmapped within the first-datagram timeout,
   close_notify, a fatal alert) drops the connection here and logs it.

Unmapped connections (probe 19 F4): a finished handshake costs a client with a real address
nothing but holds a descriptor and ~90 kB here until an association is mapped to it. From
the hand-off until ``UdpConfirmed(channel=...)`` (``UdpService.on_channel_mapped``) or
``UdpChannelEnded`` such a connection is counted per source (IPv6 per /64,
``net.dtls.source_key``) and in all, against ``[udp] dtls_handshakes_per_source`` and
``unmapped_total`` (``dtls_handshakes_total``, at most the descriptors the start-up plan
leaves it, ``dataplane.resources.plan_descriptors``); beyond them the connection gets a
close_notify at the hand-off. One that stays unmapped for ``[udp] dtls_unmapped_timeout``
is removed from the engine (``remove_channel``).

A client that restarts DTLS from the same address and port (RFC 6347 section 4.2.8, D31):
its ClientHello reaches the channel's connected socket, and the engine passes it back
(``UdpChannelHello``) instead of giving it to the established connection. It goes to the
port's cookie endpoint as if the listening socket had read it, and the answers leave from
the listening socket (same address and port). Only once a ClientHello carries a valid
cookie (the client has shown it owns the address: the RFC's "MUST NOT destroy the existing
association until ...") is the old channel removed, before the ServerHello flight is sent,
so that the client's next flight reaches the listening socket; the new handshake then
completes and is handed off like any other. The old channel's associations stay mapped to
it (D28: never re-mapped) until their TCP connections end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...config import UDPConfig
from ...dataplane.udp import DTLSLink, UdpChannelEnded, UdpChannelHello
from ...net.dtls import (
    DTLS1_2_VERSION,
    MAX_PLAINTEXT,
    DTLSConnection,
    DTLSError,
    DTLSLimits,
    dtls_server_context,
    source_key,
)
from ..dtls import DTLSServer, start_dtls_server
from .record import format_address
from .udp import UdpService

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = ["CHANNEL_MTU", "DTLSPorts", "open_dtls_socket"]

log = logging.getLogger("socks6fast.server")

#: Where a ClientHello's random starts in its datagram: the record header (13 bytes), the
#: DTLS handshake header (12) and client_version (2) (RFC 6347 sections 4.1, 4.2.2).
_HELLO_RANDOM = 13 + 12 + 2

#: ``DTLSLink.mtu`` of the channels: large enough that one record carries 2^14 bytes of
#: plaintext, the most a DTLS record may (RFC 6347 section 4.1.1) (D29).
CHANNEL_MTU = MAX_PLAINTEXT + 256

#: Seconds between two "refused at the hand-off" log lines (a flood logs once per interval).
REFUSAL_LOG_INTERVAL = 10.0


def open_dtls_socket(host: str, port: int) -> socket.socket:
    """A UDP socket for a DTLS port on ``host``:``port``, with SO_REUSEADDR so that each
    established connection's socket can be bound to the same address and port.

    The port must be free of other sockets first: SO_REUSEADDR would let this socket share
    a port another process (or another of our ports) holds, and the datagrams would go to
    whichever bound last. A probe bind without the option fails instead (as for the SOCKS 6
    UDP ports, D16).

    Raises:
        OSError: the port is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port != 0:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Channel:
    """A DTLS connection the engine holds (kept alive here for the log line)."""

    peer: tuple[str, int]
    port: tuple[str, int]
    link: DTLSLink
    unmapped: asyncio.TimerHandle | None = None
    """Until an association is mapped to it: the ``dtls_unmapped_timeout`` timer (F4)."""
    replaced: bool = False
    """Its client started a new connection from the same 5-tuple (D31): being removed."""
    client_random: bytes = b""
    """The ClientHello random of its handshake: a late copy of that ClientHello is no restart."""


class DTLSPorts:
    """The DTLS ports of one `Server`, handing each established connection to ``udp``'s
    engine.

    Args:
        loop: the server's loop.
        udp: the server's UDP data plane (its engine relays the datagrams).
        config: the ``[udp]`` table (handshake caps, cookie interval).
        certfile, keyfile: the TLS listener's certificate chain and key (D16).

    Raises:
        DTLSError: the certificate or key cannot be used (one sentence).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        udp: UdpService,
        config: UDPConfig,
        certfile: str,
        keyfile: str,
        client_cafile: str | None = None,
    ) -> None:
        self._loop = loop
        self._udp = udp
        self._certfile = certfile
        self._keyfile = keyfile
        self._client_cafile = client_cafile  # [server] tls_client_ca: as on the TLS listener
        self._limits = DTLSLimits.from_config(config)
        # D29: a datagram is relayed in one record whatever its size, as on the plain UDP port
        # (the kernel fragments what the path cannot carry): the only bound is a record's,
        # 2^14 bytes of plaintext (RFC 6347 section 4.1.1). Handshake flights keep the
        # endpoint's 1400-byte MTU.
        self.mtu = CHANNEL_MTU
        """Largest DTLS datagram the engine sends on a channel (ciphertext)."""
        self.servers: list[DTLSServer] = []
        self.ports: list[tuple[str, int]] = []
        """The DTLS ports, (host, port) each."""
        self.channels: dict[int, _Channel] = {}
        """Connections the engine holds, by channel id."""
        self.handoffs = 0
        """Connections handed to the engine."""
        self.unmapped_timeout = config.dtls_unmapped_timeout
        self.unmapped_per_source = config.dtls_handshakes_per_source
        self.unmapped_total = config.dtls_handshakes_total
        """Caps on channels no association is mapped to yet (F4); the server lowers the total
        to what its descriptor plan leaves (`budget_descriptors`)."""
        self.unmapped = 0
        """Channels no association is mapped to yet."""
        self._unmapped_by_source: dict[str, int] = {}
        self.refused = 0
        """Finished handshakes refused at the hand-off (unmapped caps, no descriptor, engine)."""
        self._refusal_logged_at: float | None = None
        self._refusals_unlogged = 0
        dtls_server_context(
            certfile, keyfile, client_cafile=client_cafile
        )  # fail now, in one sentence, not per port
        udp.on_channel_ended = self._channel_ended
        udp.on_channel_mapped = self._channel_mapped
        udp.on_channel_hello = self._channel_hello
        self.restarts = 0
        """Channels replaced by a new handshake from the same 5-tuple (RFC 6347 4.2.8, D31)."""

    async def open_port(self, host: str, port: int) -> tuple[str, int]:
        """Open a DTLS port on ``host``:``port`` (0: any free port).

        Raises:
            OSError: the port cannot be bound (naming it, with a hint).
        """
        try:
            sock = open_dtls_socket(host, port)
        except OSError as exc:
            where = f"DTLS {format_address(host, port)}: {exc.strerror or exc}"
            hint = " (the DTLS port: set [udp] dtls_port, or dtls = false)"
            raise OSError(exc.errno, where + hint) from exc
        bound = sock.getsockname()
        name = (str(bound[0]), int(bound[1]))
        holder: list[DTLSServer] = []

        def established(conn: DTLSConnection) -> None:
            self._hand_off(holder[0], sock, conn)

        context = self._context()
        try:
            server = await start_dtls_server(
                name[0],
                name[1],
                context,
                on_datagram=self._stray,
                on_established=established,
                on_closed=self._failed,
                limits=self._limits,
                sock=sock,
            )
        except BaseException:
            sock.close()
            raise
        holder.append(server)
        self.servers.append(server)
        self.ports.append(name)
        return name

    def _context(self) -> SSL.Context:
        context = dtls_server_context(self._certfile, self._keyfile, client_cafile=self._client_cafile)
        # D29: DTLS 1.2 only. The hand-off relies on the client sending no application record
        # before it has the server's Finished; DTLS 1.3 lets it send right after its own
        # Finished, which the listening socket could read before the connected socket exists.
        # (The OpenSSL 4.0 under pyOpenSSL 26 offers no DTLS 1.3 anyway.)
        context.set_max_proto_version(DTLS1_2_VERSION)
        return context

    def reload(self, certfile: str, keyfile: str, client_cafile: str | None) -> None:
        """A configuration reload: new handshakes use this certificate, key and client CA
        (as the TLS listeners do); established DTLS connections keep theirs.

        Raises:
            DTLSError: the files cannot be read (the ports keep the old ones).
        """
        files = (self._certfile, self._keyfile, self._client_cafile)
        self._certfile, self._keyfile, self._client_cafile = certfile, keyfile, client_cafile
        try:
            contexts = [self._context() for _ in self.servers]
        except DTLSError:
            self._certfile, self._keyfile, self._client_cafile = files
            raise
        for server, context in zip(self.servers, contexts, strict=True):
            server.endpoint.replace_context(context)

    # -- the hand-off ------------------------------------------------------------------

    def _hand_off(self, server: DTLSServer, listening: socket.socket, conn: DTLSConnection) -> None:
        # Runs inside the endpoint, before the server's last flight is sent (module docstring).
        peer = conn.address
        port = listening.getsockname()
        source = source_key(peer[0])
        if self.unmapped >= self.unmapped_total or (
            self._unmapped_by_source.get(source, 0) >= self.unmapped_per_source
        ):
            # F4: a close_notify after our Finished (the client knows), no descriptor spent.
            self._refuse(server, conn, "too many DTLS connections without an association yet")
            return
        sock: socket.socket | None = None
        try:
            # F5: socket() inside the try: EMFILE is one warning and a closed connection, not
            # an exception through the endpoint into the event loop.
            sock = socket.socket(listening.family, socket.SOCK_DGRAM)
            if listening.family == socket.AF_INET6:
                sock.setsockopt(
                    socket.IPPROTO_IPV6,
                    socket.IPV6_V6ONLY,
                    listening.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
                )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(port)
            sock.connect(peer)
            sock.setblocking(False)
        except OSError as exc:
            if sock is not None:
                sock.close()
            where = format_address(str(port[0]), int(port[1]))
            self._refuse(server, conn, f"DTLS {where}: cannot open a socket: {exc.strerror or exc}")
            return
        link = DTLSLink(conn.ssl, self.mtu)
        client_random = conn.ssl.client_random() or b""  # read before the engine owns it
        try:
            channel = self._udp.engine.add_channel(sock.fileno(), link)
        except Exception as exc:  # whatever the engine says, the socket must not leak
            sock.close()
            self._refuse(server, conn, f"the UDP engine refused it: {exc}")
            return
        sock.detach()  # the engine owns it now
        # Forget it here before anything else can touch it: from now on the engine (one of its
        # threads) is the connection's only user.
        server.endpoint.release(conn)
        self.handoffs += 1
        timer = self._loop.call_later(self.unmapped_timeout, self._unmapped_expired, channel)
        self.channels[channel] = _Channel(
            peer, (str(port[0]), int(port[1])), link, timer, False, client_random
        )
        self.unmapped += 1
        self._unmapped_by_source[source] = self._unmapped_by_source.get(source, 0) + 1
        log.debug("DTLS connection from %s: channel %d (via=dtls)", format_address(*peer), channel)

    def _refuse(self, server: DTLSServer, conn: DTLSConnection, why: str) -> None:
        """Close a finished connection at the hand-off (close_notify) and log it, at most once
        per `REFUSAL_LOG_INTERVAL` (a flood must not flood the log)."""
        server.endpoint.close(conn)
        self.refused += 1
        now = self._loop.time()
        if self._refusal_logged_at is not None and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        more = ""
        if self._refusals_unlogged:
            more = f" ({self._refusals_unlogged} more refused since the last such line)"
        log.warning("DTLS connection from %s refused: %s; closed%s", format_address(*conn.address), why, more)
        self._refusal_logged_at = now
        self._refusals_unlogged = 0

    def _mapped(self, channel: _Channel) -> None:
        """Stop counting ``channel`` as unmapped (an association was mapped, or it ended)."""
        if channel.unmapped is None:
            return
        channel.unmapped.cancel()
        channel.unmapped = None
        self._uncount(channel)

    def _channel_mapped(self, channel_id: int) -> None:
        channel = self.channels.get(channel_id)
        if channel is not None:
            self._mapped(channel)

    def _unmapped_expired(self, channel_id: int) -> None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.unmapped is None:
            return
        channel.unmapped = None  # fired; `_mapped` must not cancel it again
        self._uncount(channel)
        # Its UdpChannelEnded ("removed") comes back through the engine's events and logs it.
        with contextlib.suppress(Exception):
            self._udp.engine.remove_channel(channel_id)

    def _channel_hello(self, event: UdpChannelHello) -> None:
        """A ClientHello on a channel's 5-tuple (RFC 6347 section 4.2.8, D31; module docstring)."""
        channel = self.channels.get(event.channel)
        if channel is None or channel.replaced:
            return
        server = next(
            (s for s, name in zip(self.servers, self.ports, strict=True) if name == channel.port), None
        )
        if server is None:
            return
        if event.datagram[_HELLO_RANDOM : _HELLO_RANDOM + 32] == channel.client_random:
            # A duplicated or late ClientHello of the handshake that made this connection (the
            # client sends the same random again with the cookie): not a restart.
            return
        endpoint = server.endpoint
        endpoint.datagram_received(event.datagram, channel.peer, self._loop.time())
        if channel.peer in endpoint.connections:
            # The cookie verified and a handshake began: the old channel ends now, before the
            # ServerHello flight leaves, so the client's next flight finds no connected socket
            # for its 5-tuple and reaches the listening one.
            channel.replaced = True
            self.restarts += 1
            self._mapped(channel)  # no longer counted against the unmapped caps (F4)
            log.info(
                "DTLS client %s started a new connection from the same port: channel %d ends",
                format_address(*channel.peer),
                event.channel,
            )
            with contextlib.suppress(Exception):
                self._udp.engine.remove_channel(event.channel)
        server.flush()  # the HelloVerifyRequest, or the ServerHello flight

    def _uncount(self, channel: _Channel) -> None:
        self.unmapped -= 1
        source = source_key(channel.peer[0])
        left = self._unmapped_by_source[source] - 1
        if left:
            self._unmapped_by_source[source] = left
        else:
            del self._unmapped_by_source[source]

    def _stray(self, conn: DTLSConnection, payload: bytes) -> None:
        # A datagram decrypted on the listening socket: only possible before the hand-off,
        # which happens as the handshake completes; nothing to relay it with.
        log.debug("DTLS: datagram from %s before its hand-off dropped", format_address(*conn.address))

    def _failed(self, conn: DTLSConnection, reason: str) -> None:
        log.debug("DTLS handshake with %s: %s", format_address(*conn.address), reason)

    def _channel_ended(self, event: UdpChannelEnded) -> None:
        channel = self.channels.pop(event.channel, None)
        if channel is None:
            return
        self._mapped(channel)
        log.info(
            "DTLS connection from %s via=dtls ended: %s (datagrams in %d, out %d, dropped %d)",
            format_address(*channel.peer),
            event.cause,
            event.datagrams_in,
            event.datagrams_out,
            event.drops,
        )

    # -- life cycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close the DTLS ports (handshakes in progress get a close_notify, if established);
        the channels end with the engine (``UdpService.close``)."""
        for channel in self.channels.values():
            self._mapped(channel)  # the engine ends them; no unmapped timer may outlive the ports
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        """Wait until the ports' sockets are closed (after `close`)."""
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()
