"""The UDP data plane in pure Python: the twin of the native engine ``_udp_c``.

Used where the compiled module is absent (``SOCKS6FAST_NO_EXTENSIONS=1``, not Linux).
Same API, same rules, same events and drop reasons as ``_udp_c`` (whose module
docstring describes them); the differences are only how the work is done:

* Everything runs on one asyncio event loop (asyncio or uvloop): every socket is
  non-blocking and watched with ``loop.add_reader``; one ``recvfrom``/``sendto`` per
  datagram (Python has no recvmmsg), at most 64 datagrams per socket per callback.
* Headers are parsed and written by the codec (``proto.codec``, ``proto.socks5``), so
  the payload is copied into a new message towards the client.
* ``workers``/``batch`` are accepted and ignored; ``add_port`` takes the same list of
  sockets (one per worker of the native engine) and reads them all.
* The "wake" fd is an eventfd (Linux) or a socket pair, written when events are
  queued, so the control plane watches :meth:`UdpEngine.fileno` the same way.
* DTLS channels (``add_channel(fd, DTLSLink)``) go through pyOpenSSL per datagram
  (``bio_write`` + ``recv``, ``send`` + ``bio_read``); pyOpenSSL is imported at the
  first one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..constants import AddressType, RelayEnd, ReplyCode, UdpDrop
from ..errors import WireError
from ..proto.codec import decode_datagram_header, encode_datagram_header
from ..proto.messages import DatagramHeader
from ..proto.socks5 import Socks5UDPHeader, decode_udp_header, encode_udp_header
from .udp_types import (
    DTLSLink,
    UdpAsk,
    UdpChannelEnded,
    UdpChannelHello,
    UdpConfirmed,
    UdpEnded,
    UdpEvent,
    UdpResolve,
    default_workers,
    icmp_error_code,
)

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = ["UdpEngine"]

# Linux values (include/uapi/linux/in.h, in6.h, errqueue.h, socket.h); the socket module
# lacks some of them on some versions.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
# struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data.
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_IN_PKTINFO = struct.Struct("=i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("=16sI")  # ipi6_addr, ipi6_ifindex
_U16 = struct.Struct("!H")

_MAX_MESSAGE = 65535
_MAX_DESTS = 4096
_MAX_NAMES = 64
#: D24: datagrams (and payload bytes) held per association while their destination
#: waits for a verdict or a name; the defaults and limits of the native engine.
HOLD_DATAGRAMS = 8
HOLD_BYTES = 16384
_MAX_HOLD_DATAGRAMS = 256
_MAX_HOLD_BYTES = 1048576
_READS_PER_CALLBACK = 64
_CONTROL_SPACE = 128
_V4_MAPPED = bytes(10) + b"\xff\xff"

_ALLOW, _DENY, _PENDING = 1, 2, 3
_UNMAPPED, _MAPPED_UDP, _MAPPED_TCP, _MAPPED_CHANNEL = 0, 1, 2, 3
#: Largest DTLS datagram read from a channel: one record of 13 header bytes and at most
#: 2^14 + 2048 body bytes (RFC 6347 section 4.1).
_MAX_RECORD = 13 + 2**14 + 2048
#: Largest ClientHello datagram on a channel passed on as ``UdpChannelHello`` (D31; the
#: native engine's MAX_HELLO); a larger one goes to the connection, which discards it.
_MAX_HELLO = 4096
#: At most this many ``UdpChannelHello`` wait for ``drain()``; beyond, dropped as RECORD.
_MAX_HELLOS = 256
#: socks6fast.net.dtls and OpenSSL.SSL, imported at the first DTLS channel: pyOpenSSL is
#: loaded only where DTLS is used (tests/test_dtls.py checks the server does not import it).
_dtls: Any = None
_SSL: Any = None


def _load_dtls() -> None:
    global _dtls, _SSL
    if _dtls is None:
        from OpenSSL import SSL as ssl_module  # noqa: PLC0415 (see above)

        from ..net import dtls as dtls_module  # noqa: PLC0415

        _SSL, _dtls = ssl_module, dtls_module


Key = tuple[int, bytes, int]  # (4 or 6, 4 or 16 address bytes, port)
Held = tuple[int, str, int, bytes]  # (address type, address, port, payload) as the client named it


def _pack(address: str) -> tuple[int, bytes]:
    """(4 or 6, address bytes) of an IP address text; IPv4-mapped IPv6 -> IPv4."""
    try:
        return 4, socket.inet_pton(socket.AF_INET, address)
    except OSError:
        pass
    try:
        raw = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        raise ValueError(f"not an IP address: {address!r}") from None
    if raw[:12] == _V4_MAPPED:
        return 4, raw[12:]
    return 6, raw


def _text(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)


def _key_of(address: tuple[object, ...]) -> Key | None:
    """The normalised key of a socket address tuple (host, port, ...)."""
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        family, raw = _pack(host)
    except ValueError:
        return None
    return family, raw, port


def _sockaddr(sock_family: int, family: int, raw: bytes, port: int) -> tuple[str, int]:
    """A sendto address for a socket of sock_family (IPv4 on AF_INET6 becomes IPv4-mapped)."""
    if sock_family == socket.AF_INET6 and family == 4:
        return "::ffff:" + _text(4, raw), port
    return _text(family, raw), port


class _Remote:
    __slots__ = ("sock", "family", "v6only")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.family = sock.family
        self.v6only = sock.family == socket.AF_INET6 and bool(
            sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        )


class _Port:
    __slots__ = ("sock", "name", "wildcard")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: The bound address: the sockets of one SO_REUSEPORT group are one port (the
        #: kernel spreads a group's datagrams over them by a hash of the 4-tuple).
        self.name = _key_of(sock.getsockname())
        self.wildcard = self.name is not None and self.name[1] == bytes(len(self.name[1]))


class _Channel:
    """A connected UDP socket towards one client 5-tuple (``add_channel``; issue 11)."""

    __slots__ = (
        "cid",
        "sock",
        "ssl",
        "link",
        "limit",
        "peer",
        "peer_key",
        "assocs",
        "datagrams_in",
        "datagrams_out",
        "drops",
        "timer",
        "live",
    )

    def __init__(self, cid: int, sock: socket.socket, link: DTLSLink | None, limit: int) -> None:
        self.cid = cid
        self.sock = sock
        self.link = link  # keeps the Connection alive until the channel ends
        self.ssl: SSL.Connection | None = None if link is None else link.connection  # type: ignore[assignment]
        self.limit = limit  # largest message sent on it (DTLS: plaintext that fits the MTU)
        peer = sock.getpeername()
        self.peer: tuple[str, int] = (peer[0], peer[1])
        self.peer_key = _key_of(peer)
        #: The associations mapped to it, first mapped first (UDP-03 maps IDs to the
        #: connection; all of one engine worker, D32).
        self.assocs: list[_Assoc] = []
        self.datagrams_in = self.datagrams_out = self.drops = 0
        self.timer: asyncio.TimerHandle | None = None
        self.live = True


class _Assoc:
    """One association (the fields of the native engine's Assoc struct)."""

    def __init__(self, aid: bytes, tcp: socket.socket, remotes: list[_Remote], s5: _Port | None) -> None:
        self.aid = aid
        self.tcp: socket.socket | None = tcp
        self.remotes = remotes
        self.s5 = s5
        self.socks5 = s5 is not None
        self.udp_error = False
        self.ask = False
        self.state = _UNMAPPED
        self.server_mode = False
        self.map_port: _Port | None = None
        self.client: tuple[object, ...] = ()
        self.client_key: Key | None = None
        self.local: bytes | None = None  # the proxy's address of the mapping (wildcard ports)
        self.channel: _Channel | None = None  # _MAPPED_CHANNEL: the channel (it may have ended, D28)
        self.local_ifindex = 0
        self.want: tuple[int, bytes] | None = None
        self.want_port = 0
        self.rx = bytearray()
        self.tx = bytearray()
        self.out_armed = False
        self.dests: dict[Key, list[int]] = {}  # key -> [verdict, contacted]
        self.names: dict[str, tuple[int, bytes] | int] = {}  # name -> (family, raw) | _PENDING | _DENY
        self.held: deque[Held] = deque()  # D24: datagrams waiting for a verdict or a name
        self.held_bytes = 0
        self.c2r_dgrams = self.c2r_bytes = self.r2c_dgrams = self.r2c_bytes = 0
        self.drops = self.icmp_errors = self.icmp_reported = 0
        self.timer: asyncio.TimerHandle | None = None
        self.live = True


class UdpEngine:
    """Pure-Python twin of ``socks6fast.dataplane._udp_c.UdpEngine`` (same arguments).

    Must be created, used and closed on its event loop's thread (``loop``, or the
    running loop).
    """

    def __init__(
        self,
        workers: int = 0,
        *,
        batch: int = 16,
        max_datagram: int = 65535,
        first_datagram_timeout: float = 0.0,
        hold_datagrams: int = HOLD_DATAGRAMS,
        hold_bytes: int = HOLD_BYTES,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not 0 <= workers <= 64:
            raise ValueError(f"workers must be in 0..64, got {workers}")
        if not 1 <= batch <= 256:
            raise ValueError(f"batch must be in 1..256, got {batch}")
        if not 512 <= max_datagram <= _MAX_MESSAGE:
            raise ValueError(f"max_datagram must be in 512..{_MAX_MESSAGE}, got {max_datagram}")
        if not 0.0 <= first_datagram_timeout < 1e9:
            raise ValueError(f"first_datagram_timeout must be >= 0 seconds, got {first_datagram_timeout}")
        if not 0 <= hold_datagrams <= _MAX_HOLD_DATAGRAMS:
            raise ValueError(f"hold_datagrams must be in 0..{_MAX_HOLD_DATAGRAMS}, got {hold_datagrams}")
        if not 0 <= hold_bytes <= _MAX_HOLD_BYTES:
            raise ValueError(f"hold_bytes must be in 0..{_MAX_HOLD_BYTES}, got {hold_bytes}")
        self._hold_datagrams = hold_datagrams
        self._hold_bytes = hold_bytes
        self._held = self._held_bytes = 0
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._workers = workers or default_workers()  # D33: as the native engine
        self._max = max_datagram
        self._first = first_datagram_timeout
        self._events: list[UdpEvent] = []
        self._hellos = 0  # UdpChannelHello in _events
        self._drops = dict.fromkeys(sorted(UdpDrop, key=int), 0)
        self._assocs: dict[bytes, _Assoc] = {}
        self._ports: list[_Port] = []
        self._channels: dict[int, _Channel] = {}
        self._last_channel = 0  # channel ids count up and are never reused
        self._closed = False
        self._signalled = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        if hasattr(os, "eventfd"):
            self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._wakefd = self._wake_r.fileno()

    # -- the control plane's side ------------------------------------------------------

    @property
    def workers(self) -> int:
        return 0 if self._closed else self._workers

    @property
    def active(self) -> int:
        return len(self._assocs)

    def fileno(self) -> int:
        if self._closed:
            raise ValueError("UdpEngine is closed")
        return self._wakefd

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("UdpEngine is closed")

    @staticmethod
    def _dgram(fd: int) -> socket.socket:
        if fd < 0:
            raise ValueError(f"not an open fd: {fd}")
        probe = socket.socket(fileno=fd)
        try:
            if probe.type != socket.SOCK_DGRAM:
                raise ValueError(f"fd {fd} is not a datagram socket")
            if probe.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(f"fd {fd} is not an IPv4 or IPv6 socket")
        except BaseException:
            probe.detach()
            raise
        return probe

    def add_port(self, fds: Sequence[int], *, steer: bool = True) -> None:
        # ``steer`` is for the native engine's BPF program; this one reads every socket itself.
        self._check_open()
        fds = [int(fd) for fd in fds]
        if len(fds) != self._workers:
            raise ValueError(f"need one socket per worker ({self._workers}), got {len(fds)}")
        ports: list[_Port] = []
        try:
            for fd in fds:
                port = _Port(self._dgram(fd))
                ports.append(port)
                if port.wildcard:
                    # The 5-tuple includes the proxy's address (UDP-03): read it per datagram.
                    if port.sock.family == socket.AF_INET:
                        port.sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                    else:
                        port.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
                port.sock.setblocking(False)
        except BaseException:
            for port in ports:
                port.sock.detach()  # the caller still owns the fds
            raise
        for port in ports:
            self._ports.append(port)
            self._loop.add_reader(port.sock.fileno(), self._on_client, port, None)

    def add_channel(self, fd: int, dtls: DTLSLink | None = None) -> int:
        """A client's own channel (a DTLS connection's 5-tuple; the contract in
        ``dataplane/udp.py``): the engine owns ``fd`` from the call on and returns the
        channel's id (a counter, never reused)."""
        self._check_open()
        fd = int(fd)
        limit = _MAX_MESSAGE
        if dtls is not None:
            if not isinstance(dtls, DTLSLink):
                raise ValueError("dtls must be a DTLSLink or None")
            _load_dtls()
            limit = _dtls.channel_limit(dtls.connection, dtls.mtu)
        sock = self._dgram(fd)
        try:
            sock.setblocking(False)
            channel = _Channel(self._last_channel + 1, sock, dtls, limit)
        except OSError as exc:
            sock.detach()  # the caller still owns it
            raise ValueError(f"fd {fd} is not a connected UDP socket ({exc.strerror or exc})") from None
        except BaseException:
            sock.detach()
            raise
        self._last_channel = channel.cid
        self._channels[channel.cid] = channel
        self._loop.add_reader(sock.fileno(), self._on_channel, channel)
        if self._first > 0:
            channel.timer = self._loop.call_later(self._first, self._channel_expire, channel)
        return channel.cid

    def remove_channel(self, channel: int) -> None:
        """End a channel now (``UdpChannelEnded`` "removed"); unknown or ended ids are ignored."""
        ch = self._channels.get(int(channel))
        if ch is not None and not self._closed:
            self._end_channel(ch, "removed", notify=True)

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
    ) -> None:
        self._check_open()
        aid = _check_id(association_id)
        if aid in self._assocs:
            raise ValueError(f"association {aid.hex()} is already live")
        remote_fds = [int(fd) for fd in remote_fds]
        if not 1 <= len(remote_fds) <= 4:
            raise ValueError(f"need 1..4 remote sockets, got {len(remote_fds)}")
        if tcp_fd < 0:
            raise ValueError(f"not an open fd: {tcp_fd}")
        if not 0 <= client_port <= 0xFFFF:
            raise ValueError(f"client_port out of range: {client_port}")
        if len(tcp_pending) > 65535:
            raise ValueError("tcp_pending is longer than one message")
        every = [tcp_fd, *remote_fds, *([socks5_fd] if socks5_fd >= 0 else [])]
        if len(set(every)) != len(every):
            raise ValueError("the fds must be distinct")
        want = _pack(client_address) if client_address is not None else None
        owned: list[socket.socket] = []
        try:
            remotes = []
            for fd in remote_fds:
                remote = _Remote(self._dgram(fd))
                owned.append(remote.sock)
                remotes.append(remote)
            s5 = None
            if socks5_fd >= 0:
                s5 = _Port(self._dgram(socks5_fd))
                owned.append(s5.sock)
                if s5.wildcard:
                    if s5.sock.family == socket.AF_INET:
                        s5.sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                    else:
                        s5.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            tcp = socket.socket(fileno=tcp_fd)
            owned.append(tcp)
            if udp_error:
                # UDP-09: ICMP errors for these sockets go to their error queues.
                for remote in remotes:
                    remote.sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                    if remote.family == socket.AF_INET6:
                        remote.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            for sock in owned:
                sock.setblocking(False)
        except BaseException:
            for sock in owned:
                sock.detach()
            raise
        a = _Assoc(aid, tcp, remotes, s5)
        a.udp_error = udp_error
        a.ask = ask
        a.want = want
        a.want_port = client_port
        a.rx = bytearray(tcp_pending)
        self._assocs[aid] = a
        self._loop.add_reader(tcp.fileno(), self._on_tcp, a)
        for remote in remotes:
            self._loop.add_reader(remote.sock.fileno(), self._on_remote, a, remote)
        if s5 is not None:
            self._loop.add_reader(s5.sock.fileno(), self._on_client, s5, a)
        if self._first > 0:
            a.timer = self._loop.call_later(self._first, self._expire, a)
        if tcp_send:
            self._send_control(a, bytes(tcp_send))
        if a.live and a.rx and not a.socks5:
            self._tcp_messages(a)

    def verdict(self, association_id: bytes, address: str, port: int, allow: bool) -> None:
        self._check_open()
        aid = _check_id(association_id)
        family, raw = _pack(address)
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        a = self._assocs.get(aid)
        if a is None:
            return
        entry = a.dests.get((family, raw, port))
        if entry is None:
            if len(a.dests) < _MAX_DESTS:
                a.dests[(family, raw, port)] = [_ALLOW if allow else _DENY, 0]
        else:
            entry[0] = _ALLOW if allow else _DENY
        self._release(a)

    def resolved(self, association_id: bytes, name: str, address: str | None) -> None:
        self._check_open()
        aid = _check_id(association_id)
        if not 1 <= len(name.encode("utf-8")) <= 255:
            raise ValueError("name must be 1..255 bytes")
        packed = _pack(address) if address is not None else None
        a = self._assocs.get(aid)
        if a is None or (name not in a.names and len(a.names) >= _MAX_NAMES):
            return
        a.names[name] = packed if packed is not None else _DENY
        self._release(a)

    def remove(self, association_id: bytes) -> None:
        aid = _check_id(association_id)
        a = self._assocs.get(aid)
        if a is not None and not self._closed:
            self._end(a, RelayEnd.SHUTDOWN, "")

    def drain(self) -> list[UdpEvent]:
        if not self._closed:
            try:
                os.read(self._wakefd, 8) if self._wake_r is None else self._wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                pass
        self._signalled = False
        self._hellos = 0
        events, self._events = self._events, []
        return events

    def drops(self) -> dict[UdpDrop, int]:
        return dict(self._drops)

    def held(self) -> tuple[int, int]:
        return self._held, self._held_bytes

    def close(self) -> None:
        if self._closed:
            return
        for ch in list(self._channels.values()):
            self._end_channel(ch, "removed", notify=True)
        for a in list(self._assocs.values()):
            self._end(a, RelayEnd.SHUTDOWN, "")
        for port in self._ports:
            self._loop.remove_reader(port.sock.fileno())
            port.sock.close()
        self._ports.clear()
        self._closed = True
        if self._wake_r is not None and self._wake_w is not None:  # pragma: no cover - not Linux
            self._wake_r.close()
            self._wake_w.close()
        else:
            os.close(self._wakefd)

    def __enter__(self) -> UdpEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- events, drops, ending -----------------------------------------------------------

    def _event(self, event: UdpEvent) -> None:
        self._events.append(event)
        if not self._signalled and not self._closed:
            self._signalled = True
            if self._wake_w is not None:  # pragma: no cover - not Linux
                self._wake_w.send(b"\x01")
            else:
                os.eventfd_write(self._wakefd, 1)

    def _drop(self, a: _Assoc | None, reason: UdpDrop) -> None:
        self._drops[reason] += 1
        if a is not None:
            a.drops += 1

    def _end(self, a: _Assoc, end: RelayEnd, cause: str) -> None:
        if not a.live:
            return
        a.live = False
        self._assocs.pop(a.aid, None)
        self._take_held(a)  # D24: held datagrams end with the association
        if a.timer is not None:
            a.timer.cancel()
        socks: list[socket.socket] = [r.sock for r in a.remotes]
        if a.s5 is not None:
            socks.append(a.s5.sock)
        if a.tcp is not None:
            socks.append(a.tcp)
        for sock in socks:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                if sock is a.tcp and a.out_armed:
                    self._loop.remove_writer(sock.fileno())
            sock.close()
        a.tcp = None
        ch = a.channel
        if ch is not None and ch.live:
            # D28 "the reverse holds": the channel ends with the last association it carries (D32).
            ch.assocs.remove(a)
            if not ch.assocs:
                self._end_channel(ch, "association ended", notify=True)
        self._event(
            UdpEnded(
                a.aid,
                end,
                cause,
                a.c2r_dgrams,
                a.c2r_bytes,
                a.r2c_dgrams,
                a.r2c_bytes,
                a.drops,
                a.icmp_errors,
                a.icmp_reported,
            )
        )

    def _end_channel(self, ch: _Channel, cause: str, *, notify: bool) -> None:
        """Close a channel and report it; ``notify``: tell a DTLS peer with a close_notify."""
        if not ch.live:
            return
        ch.live = False
        self._channels.pop(ch.cid, None)
        if ch.timer is not None:
            ch.timer.cancel()
            ch.timer = None
        if notify and ch.ssl is not None:
            try:
                ch.ssl.shutdown()
            except _SSL.Error:
                pass
            self._flush_records(ch)
        if ch.sock.fileno() >= 0:
            self._loop.remove_reader(ch.sock.fileno())
        ch.sock.close()
        self._event(UdpChannelEnded(ch.cid, cause, ch.datagrams_in, ch.datagrams_out, ch.drops))

    def _channel_expire(self, ch: _Channel) -> None:
        ch.timer = None
        if ch.live and not ch.assocs:
            self._end_channel(ch, "unmapped", notify=True)

    def _expire(self, a: _Assoc) -> None:
        if a.live and a.state == _UNMAPPED:
            self._end(a, RelayEnd.IDLE_TIMEOUT, "no datagram within the first-datagram timeout (UDP-07)")

    # -- the TCP connection --------------------------------------------------------------

    def _tcp_failed(self, a: _Assoc, exc: OSError) -> None:
        reset = isinstance(exc, ConnectionResetError | BrokenPipeError)
        self._end(a, RelayEnd.RESET if reset else RelayEnd.ERROR, "write to the TCP connection failed")

    def _arm(self, a: _Assoc, want: bool) -> None:
        if a.out_armed == want or a.tcp is None:
            return
        if want:
            self._loop.add_writer(a.tcp.fileno(), self._flush, a)
        else:
            self._loop.remove_writer(a.tcp.fileno())
        a.out_armed = want

    def _flush(self, a: _Assoc) -> None:
        while a.tx and a.tcp is not None:
            try:
                n = a.tcp.send(a.tx)
            except (BlockingIOError, InterruptedError):
                self._arm(a, True)
                return
            except OSError as exc:
                self._tcp_failed(a, exc)
                return
            del a.tx[:n]
        self._arm(a, False)

    def _send_control(self, a: _Assoc, data: bytes) -> None:
        """Bytes that are never dropped (the Confirmation, tcp_send): kept until written."""
        a.tx += data
        self._flush(a)

    def _send_message(self, a: _Assoc, message: bytes | bytearray) -> bool:
        """A whole message to the client over TCP, or dropped if the socket would block."""
        if a.tx or a.tcp is None:
            self._drop(a, UdpDrop.TCP_BLOCKED)
            return False
        try:
            n = a.tcp.send(message)
        except (BlockingIOError, InterruptedError):
            self._drop(a, UdpDrop.TCP_BLOCKED)
            self._arm(a, True)
            return False
        except OSError as exc:
            self._tcp_failed(a, exc)
            return False
        if n < len(message):
            a.tx += message[n:]  # the tail of a message the kernel took in part
            self._arm(a, True)
        return True

    def _on_tcp(self, a: _Assoc) -> None:
        if not a.live or a.tcp is None:
            return
        try:
            data = a.tcp.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reset = isinstance(exc, ConnectionResetError)
            self._end(a, RelayEnd.RESET if reset else RelayEnd.ERROR, "TCP connection failed")
            return
        if not data:
            # UDP-07: the association lives as long as the TCP connection.
            self._end(a, RelayEnd.EOF, "")
            return
        if a.socks5:
            return  # RFC 1928: nothing is expected on the control connection; discard
        a.rx += data
        self._tcp_messages(a)

    def _tcp_messages(self, a: _Assoc) -> None:
        buf = a.rx
        pos = 0
        while a.live and len(buf) - pos >= 4:
            if buf[pos] != 6:
                self._end(a, RelayEnd.ERROR, "a message on the TCP connection is not version 6")
                return
            mlen = _U16.unpack_from(buf, pos + 2)[0]
            if mlen < 12:
                self._end(a, RelayEnd.ERROR, "a message on the TCP connection is shorter than 12 bytes")
                return
            if len(buf) - pos < mlen:
                break
            self._tcp_message(a, bytes(buf[pos : pos + mlen]))
            pos += mlen
        del buf[:pos]

    def _tcp_message(self, a: _Assoc, message: bytes) -> None:
        if message[1] != 3:
            self._drop(a, UdpDrop.MALFORMED)  # clients send only Datagrams
            return
        parsed = self._parse(a, message)
        if parsed is None:
            return
        header, hlen = parsed
        if header.association_id != a.aid:
            self._drop(a, UdpDrop.UNKNOWN_ASSOCIATION)
            return
        if a.state in (_MAPPED_UDP, _MAPPED_CHANNEL):
            self._drop(a, UdpDrop.MAPPING)
            return
        payload = message[hlen:]
        probe = _is_probe(header, payload)
        if probe:
            a.server_mode = True
        if a.state == _UNMAPPED:
            a.state = _MAPPED_TCP
            self._confirm(a, True, probe)
            if not a.live:
                return
        if not probe:
            self._to_remote(a, header.address_type, header.address, header.port, payload)

    def _parse(self, a: _Assoc | None, data: bytes) -> tuple[DatagramHeader, int] | None:
        try:
            return decode_datagram_header(data)
        except WireError as exc:
            if exc.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED:
                reason = UdpDrop.ADDRESS_TYPE
            elif "truncated" in str(exc):
                reason = UdpDrop.TRUNCATED
            else:
                reason = UdpDrop.MALFORMED
            self._drop(a, reason)
            return None

    def _confirm(self, a: _Assoc, over_tcp: bool, server_mode: bool) -> None:
        """The first datagram fixed the mapping: Association Confirmation on TCP (UDP-04)."""
        if a.timer is not None:
            a.timer.cancel()
            a.timer = None
        client = None
        if not over_tcp and a.client_key is not None:
            client = (_text(a.client_key[0], a.client_key[1]), a.client_key[2])
        channel = a.channel.cid if a.channel is not None else -1
        self._event(UdpConfirmed(a.aid, over_tcp, client, server_mode, channel))
        if not a.socks5:
            self._send_control(a, bytes((6, 2, 0, 12)) + a.aid)

    # -- client -> remote ----------------------------------------------------------------

    def _on_client(self, port: _Port, s5: _Assoc | None) -> None:
        for _ in range(_READS_PER_CALLBACK):
            if s5 is not None and not s5.live:
                return
            try:
                if port.wildcard:
                    data, ancdata, flags, address = port.sock.recvmsg(self._max, _CONTROL_SPACE)
                else:
                    data, address = port.sock.recvfrom(self._max + 1)
                    ancdata, flags = [], 0
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # a stale pending error, returned once
            if flags & socket.MSG_TRUNC or len(data) > self._max:
                self._drop(s5, UdpDrop.TOO_BIG)
                continue
            local = _local_address(ancdata) if port.wildcard else None
            if s5 is None:
                self._socks6_datagram(port, data, address, local)
            else:
                self._socks5_datagram(s5, port, data, address, local)

    def _check_client(
        self, a: _Assoc, port: _Port, address: tuple[object, ...], local: tuple[bytes, int] | None
    ) -> UdpDrop | None:
        """UDP-03 / D19: fix the mapping on the first datagram, else match it."""
        key = _key_of(address)
        if key is None:
            return UdpDrop.SOURCE
        if a.state == _UNMAPPED:
            if a.want is not None and (key[0], key[1]) != a.want:
                return UdpDrop.SOURCE
            if a.want_port and key[2] != a.want_port:
                return UdpDrop.SOURCE
            a.state = _MAPPED_UDP
            a.map_port = port
            a.client = address
            a.client_key = key
            if local is not None:
                a.local, a.local_ifindex = local
            return None
        if (
            a.state != _MAPPED_UDP
            or a.map_port is None
            or a.map_port.name != port.name
            or key != a.client_key
        ):
            return UdpDrop.MAPPING
        if a.local is not None and (local is None or local[0] != a.local):
            return UdpDrop.MAPPING
        return None

    def _socks6_datagram(
        self, port: _Port, data: bytes, address: tuple[object, ...], local: tuple[bytes, int] | None
    ) -> None:
        parsed = self._parse(None, data)
        if parsed is None:
            return
        header, hlen = parsed
        if header.message_length > len(data):
            # UDP-05: "If the Message Length is larger than the size of the UDP payload,
            # the message MUST be silently ignored."
            self._drop(None, UdpDrop.LENGTH)
            return
        a = self._assocs.get(header.association_id)
        if a is None or a.socks5:
            self._drop(None, UdpDrop.UNKNOWN_ASSOCIATION)
            return
        # UDP-05: bytes after Message Length are padding, ignored.
        payload = data[hlen : header.message_length]
        first = a.state == _UNMAPPED
        reason = self._check_client(a, port, address, local)
        if reason is not None:
            self._drop(a, reason)
            return
        probe = _is_probe(header, payload)
        if probe:
            a.server_mode = True
        if first:
            self._confirm(a, False, probe)
            if not a.live:
                return
        if not probe:
            self._to_remote(a, header.address_type, header.address, header.port, payload)

    def _socks5_datagram(
        self,
        a: _Assoc,
        port: _Port,
        data: bytes,
        address: tuple[object, ...],
        local: tuple[bytes, int] | None,
    ) -> None:
        try:
            header, hlen = decode_udp_header(data)
        except WireError as exc:
            if exc.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED:
                self._drop(a, UdpDrop.ADDRESS_TYPE)
            elif "truncated" in str(exc):
                self._drop(a, UdpDrop.TRUNCATED)
            else:
                self._drop(a, UdpDrop.MALFORMED)
            return
        if header.fragment != 0:
            # FRAG other than 0: no reassembly (RFC 1928 section 7 allows it; D19).
            self._drop(a, UdpDrop.FRAGMENT)
            return
        first = a.state == _UNMAPPED
        reason = self._check_client(a, port, address, local)
        if reason is not None:
            self._drop(a, reason)
            return
        if first:
            self._confirm(a, False, False)
        self._to_remote(a, header.address_type, header.address, header.port, data[hlen:])

    def _to_remote(self, a: _Assoc, atyp: int, address: str, port: int, payload: bytes) -> None:
        """Check the destination and send the payload there (or count why not)."""
        if atyp == AddressType.DOMAIN_NAME:
            # D20: a name is resolved by the control plane once, then cached here.
            cached = a.names.get(address)
            if cached is None:
                if len(a.names) >= _MAX_NAMES:
                    self._drop(a, UdpDrop.TABLE_FULL)
                    return
                a.names[address] = _PENDING
                self._event(UdpResolve(a.aid, address, port))
                self._hold(a, (atyp, address, port, payload))
                return
            if cached == _PENDING:
                self._hold(a, (atyp, address, port, payload))
                return
            if not isinstance(cached, tuple):
                self._drop(a, UdpDrop.DENIED)
                return
            family, raw = cached
        else:
            family, raw = _pack(address)
        if port == 0 or raw == bytes(len(raw)):
            self._drop(a, UdpDrop.DENIED)
            return
        key = (family, raw, port)
        entry = a.dests.get(key)
        if entry is None:
            if len(a.dests) >= _MAX_DESTS:
                self._drop(a, UdpDrop.TABLE_FULL)
                return
            entry = a.dests[key] = [_PENDING if a.ask else _ALLOW, 0]
            if a.ask:
                self._event(UdpAsk(a.aid, _text(family, raw), port))
        if entry[0] == _PENDING:
            self._hold(a, (atyp, address, port, payload))
            return
        if entry[0] == _DENY:
            self._drop(a, UdpDrop.DENIED)
            return
        remote = _remote_for(a, family)
        if remote is None:
            self._drop(a, UdpDrop.NO_SOCKET)
            return
        if len(payload) > self._max:
            self._drop(a, UdpDrop.TOO_BIG)
            return
        entry[1] = 1
        target = _sockaddr(remote.family, family, raw, port)
        for attempt in range(2):
            try:
                remote.sock.sendto(payload, target)
            except (BlockingIOError, InterruptedError):
                self._drop(a, UdpDrop.SEND_FAILED)
                return
            except OSError:
                # With IP_RECVERR an ICMP error is also kept as the socket's pending error,
                # which the next send returns once: try this one again, once.
                if attempt:
                    self._drop(a, UdpDrop.SEND_FAILED)
                    return
                continue
            a.c2r_dgrams += 1
            a.c2r_bytes += len(payload)
            return

    # -- datagrams waiting for a verdict or a name (D24) ----------------------------------

    def _hold(self, a: _Assoc, item: Held) -> None:
        """Keep a datagram until its destination is decided, within the bound (else PENDING)."""
        size = len(item[3])
        if len(a.held) >= self._hold_datagrams or a.held_bytes + size > self._hold_bytes:
            self._drop(a, UdpDrop.PENDING)
            return
        a.held.append(item)
        a.held_bytes += size
        self._held += 1
        self._held_bytes += size

    def _take_held(self, a: _Assoc) -> deque[Held]:
        items, a.held = a.held, deque()
        self._held -= len(items)
        self._held_bytes -= a.held_bytes
        a.held_bytes = 0
        return items

    def _release(self, a: _Assoc) -> None:
        """A verdict or a name arrived: every held datagram goes through _to_remote again,
        in arrival order (sent, dropped as DENIED, or held again if still waiting)."""
        if a.live and a.held:
            for atyp, address, port, payload in self._take_held(a):
                self._to_remote(a, atyp, address, port, payload)

    # -- channels (add_channel: a DTLS connection's 5-tuple, issue 11) -------------------

    def _on_channel(self, ch: _Channel) -> None:
        for _ in range(_READS_PER_CALLBACK):
            if not ch.live:
                return
            try:
                data = ch.sock.recv(_MAX_RECORD if ch.ssl is not None else self._max + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ECONNREFUSED of an earlier send (the client's port closed), once
            if ch.ssl is None:
                if len(data) > self._max:
                    self._channel_drop(ch, None, UdpDrop.TOO_BIG)
                    continue
                ch.datagrams_in += 1
                self._channel_datagram(ch, data)
            else:
                self._channel_records(ch, ch.ssl, data)

    def _channel_records(self, ch: _Channel, ssl: SSL.Connection, data: bytes) -> None:
        """One datagram of DTLS records: decrypt it, relay each plaintext, answer the rest.

        Only whole records go to OpenSSL (a memory BIO is a byte stream: a cut record would
        be joined to the next datagram's bytes). OpenSSL itself discards records that fail
        their MAC or replay check (RFC 6347 section 4.1.2.7), which shows as fewer plaintexts
        than application records: those are counted as ``RECORD`` drops.
        """
        types = _dtls.split_records(data)
        if types is None:
            self._channel_drop(ch, _sole(ch), UdpDrop.RECORD)
            return
        if len(data) <= _MAX_HELLO and _dtls.is_client_hello(data):
            # The client starts a new handshake from the same 5-tuple (RFC 6347 section
            # 4.2.8, D31): the control plane's cookie exchange answers it, not this connection
            # (OpenSSL would discard a record of epoch 0). Bounded, as the native engine.
            if self._hellos >= _MAX_HELLOS:
                self._channel_drop(ch, None, UdpDrop.RECORD)
                return
            self._hellos += 1
            self._event(UdpChannelHello(ch.cid, data))
            return
        ssl.bio_write(data)
        application = types.count(_dtls.CT_APPLICATION_DATA)
        delivered = 0
        for _ in types:
            try:
                plaintext = ssl.recv(_MAX_MESSAGE)
            except _SSL.WantReadError:
                break
            except _SSL.ZeroReturnError:
                self._flush_records(ch)
                self._end_channel(ch, "closed by peer", notify=False)
                return
            except _SSL.Error:
                # A fatal alert (or a record OpenSSL cannot go on after): the contract's
                # "closed by peer", in the same words as the native engine.
                self._flush_records(ch)  # our alert, if OpenSSL wrote one
                self._end_channel(ch, "closed by peer", notify=False)
                return
            delivered += 1
            ch.datagrams_in += 1
            self._channel_datagram(ch, plaintext)
            if not ch.live:
                return
        if delivered < application:
            for _ in range(application - delivered):
                self._channel_drop(ch, _sole(ch), UdpDrop.RECORD)
        if len(types) != application:
            # A retransmitted final flight of the client (its Finished) makes OpenSSL write
            # ours again: send what the read wrote (RFC 6347 section 4.2.4).
            self._flush_records(ch)

    def _flush_records(self, ch: _Channel) -> None:
        """Send what OpenSSL wrote to the channel's outgoing BIO (records cut at the MTU)."""
        if ch.ssl is None or ch.link is None:
            return
        stream = _dtls._drain(ch.ssl)
        if not stream:
            return
        for datagram in _dtls.pack_records(stream, ch.link.mtu):
            try:
                ch.sock.send(datagram)
            except OSError:
                return

    def _channel_drop(self, ch: _Channel, a: _Assoc | None, reason: UdpDrop) -> None:
        ch.drops += 1
        self._drop(a, reason)

    def _channel_datagram(self, ch: _Channel, data: bytes) -> None:
        """One SOCKS 6 UDP message from a channel: the UDP port's rules (UDP-03, UDP-05),
        with the channel as the 5-tuple."""
        try:
            header, hlen = decode_datagram_header(data)
        except WireError as exc:
            if exc.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED:
                reason = UdpDrop.ADDRESS_TYPE
            elif "truncated" in str(exc):
                reason = UdpDrop.TRUNCATED
            else:
                reason = UdpDrop.MALFORMED
            self._channel_drop(ch, None, reason)
            return
        if header.message_length > len(data):
            self._channel_drop(ch, None, UdpDrop.LENGTH)  # UDP-05
            return
        if ch.assocs and header.association_id[7] % self._workers != ch.assocs[0].aid[7] % self._workers:
            # D32, as the native engine: a mapped channel lives in the worker of its
            # associations (ID[7] % workers); another worker's association cannot share it.
            self._channel_drop(ch, None, UdpDrop.MAPPING)
            return
        a = self._assocs.get(header.association_id)
        if a is None or a.socks5:
            self._channel_drop(ch, None, UdpDrop.UNKNOWN_ASSOCIATION)
            return
        first = a.state == _UNMAPPED
        if first:
            key = ch.peer_key
            if key is None or (a.want is not None and (key[0], key[1]) != a.want):
                self._channel_drop(ch, a, UdpDrop.SOURCE)
                return
            if a.want_port and key[2] != a.want_port:
                self._channel_drop(ch, a, UdpDrop.SOURCE)
                return
            a.state = _MAPPED_CHANNEL
            a.channel = ch
            a.client = ch.peer
            a.client_key = key
            ch.assocs.append(a)  # UDP-03: one more ID mapped to this connection (D32)
            if ch.timer is not None:
                ch.timer.cancel()
                ch.timer = None
        elif a.channel is not ch:
            self._channel_drop(ch, a, UdpDrop.MAPPING)
            return
        payload = data[hlen : header.message_length]
        probe = _is_probe(header, payload)
        if probe:
            a.server_mode = True
        if first:
            self._confirm(a, False, probe)
            if not a.live:
                return
        if not probe:
            self._to_remote(a, header.address_type, header.address, header.port, payload)

    def _channel_send(self, a: _Assoc, ch: _Channel, message: bytes) -> bool:
        if len(message) > ch.limit:
            self._channel_drop(ch, a, UdpDrop.TOO_BIG)  # would not fit the channel's MTU
            return False
        ssl = ch.ssl
        if ssl is None:
            try:
                ch.sock.send(message)
            except OSError:
                self._channel_drop(ch, a, UdpDrop.SEND_FAILED)
                return False
            ch.datagrams_out += 1
            return True
        try:
            ssl.send(message)
        except _SSL.Error:
            self._channel_drop(ch, a, UdpDrop.SEND_FAILED)
            self._flush_records(ch)
            self._end_channel(ch, "DTLS write failed", notify=False)
            return False
        record = _dtls._drain(ssl)
        try:
            ch.sock.send(record)
        except OSError:
            self._channel_drop(ch, a, UdpDrop.SEND_FAILED)
            return False
        ch.datagrams_out += 1
        return True

    # -- remote -> client ----------------------------------------------------------------

    def _on_remote(self, a: _Assoc, remote: _Remote) -> None:
        if a.live and a.udp_error:
            self._read_errqueue(a, remote)
        for _ in range(_READS_PER_CALLBACK):
            if not a.live:
                return
            try:
                data, address = remote.sock.recvfrom(self._max + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # a pending ICMP error returned once (IP_RECVERR): read on
            if a.state == _UNMAPPED or (a.state != _MAPPED_TCP and a.tx):
                # UDP-04: nothing goes to the client before the Confirmation is out.
                self._drop(a, UdpDrop.UNCONFIRMED)
                continue
            if len(data) > self._max:
                self._drop(a, UdpDrop.TOO_BIG)
                continue
            key = _key_of(address)
            if key is None:
                self._drop(a, UdpDrop.SOURCE)
                continue
            entry = a.dests.get(key)
            if entry is not None and entry[0] == _DENY:
                self._drop(a, UdpDrop.DENIED)
                continue
            if not a.server_mode and (entry is None or not entry[1]):
                # Only destinations the client sent to answer, until server mode (UDP-06).
                self._drop(a, UdpDrop.FILTERED)
                continue
            family, raw, port = key
            atyp = AddressType.IPV4 if family == 4 else AddressType.IPV6
            if a.socks5:
                message = encode_udp_header(Socks5UDPHeader(atyp, _text(family, raw), port)) + data
            else:
                hlen = 16 + len(raw)
                if hlen + len(data) > _MAX_MESSAGE:
                    self._drop(a, UdpDrop.TOO_BIG)
                    continue
                header = DatagramHeader(a.aid, atyp, _text(family, raw), port, hlen + len(data))
                buf = bytearray(hlen + len(data))
                encode_datagram_header(header, buf)
                buf[hlen:] = data
                message = bytes(buf)
            if self._to_client(a, message):
                a.r2c_dgrams += 1
                a.r2c_bytes += len(data)

    def _to_client(self, a: _Assoc, message: bytes) -> bool:
        if a.state == _MAPPED_TCP:
            return self._send_message(a, message)
        if a.state == _MAPPED_CHANNEL:
            ch = a.channel
            if ch is None or not ch.live:
                self._drop(a, UdpDrop.NO_CHANNEL)  # D28: the channel ended before the association
                return False
            return self._channel_send(a, ch, message)
        port = a.map_port
        if port is None:
            return False
        try:
            if a.local is not None:
                port.sock.sendmsg([message], [_pktinfo(port, a.local, a.local_ifindex)], 0, a.client)
            else:
                port.sock.sendto(message, a.client)
        except OSError:
            self._drop(a, UdpDrop.SEND_FAILED)
            return False
        return True

    # -- ICMP errors (UDP-09, D17) -------------------------------------------------------

    def _read_errqueue(self, a: _Assoc, remote: _Remote) -> None:
        for _ in range(64):
            try:
                _data, ancdata, _flags, original = remote.sock.recvmsg(64, 512, _MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for level, kind, cdata in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ):
                    continue
                if len(cdata) < _EXTENDED_ERR.size:
                    continue
                _errno, origin, icmp_type, icmp_code, _pad, _info, _d = _EXTENDED_ERR.unpack_from(cdata)
                if origin not in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
                    continue
                a.icmp_errors += 1
                code = icmp_error_code(origin == _SO_EE_ORIGIN_ICMP6, icmp_type, icmp_code)
                # D17: only on the mapped channel; UDP-09: only after the opt-in.
                if code is None or a.state == _UNMAPPED:
                    continue
                message = _error_message(a.aid, original, cdata[_EXTENDED_ERR.size :], int(code))
                if message is None:
                    continue
                if a.state == _MAPPED_TCP:
                    sent = self._send_message(a, message)
                else:
                    sent = self._to_client(a, message)
                if sent:
                    a.icmp_reported += 1


def _check_id(association_id: object) -> bytes:
    if not isinstance(association_id, bytes) or len(association_id) != 8:
        raise ValueError("association_id must be 8 bytes")
    return association_id


def _sole(ch: _Channel) -> _Assoc | None:
    """The association a channel's record drops are counted against: its only one, else none."""
    return ch.assocs[0] if len(ch.assocs) == 1 else None


def _is_probe(header: DatagramHeader, payload: bytes) -> bool:
    """UDP-06: an empty datagram to the all-zero address and port."""
    if payload or header.port != 0 or header.address_type == AddressType.DOMAIN_NAME:
        return False
    return _pack(header.address)[1] == bytes(4 if header.address_type == AddressType.IPV4 else 16)


def _remote_for(a: _Assoc, family: int) -> _Remote | None:
    if family == 4:
        for remote in a.remotes:
            if remote.family == socket.AF_INET:
                return remote
    for remote in a.remotes:
        if remote.family == socket.AF_INET6 and (family == 6 or not remote.v6only):
            return remote
    return None


def _local_address(ancdata: list[tuple[int, int, bytes]]) -> tuple[bytes, int] | None:
    """The destination address of a received datagram (IP_PKTINFO / IPV6_PKTINFO)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            ifindex, _spec, addr = _IN_PKTINFO.unpack_from(data)
            return addr, ifindex
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
            addr6, ifindex6 = _IN6_PKTINFO.unpack_from(data)
            return (addr6[12:] if addr6[:12] == _V4_MAPPED else addr6), ifindex6
    return None


def _pktinfo(port: _Port, local: bytes, ifindex: int) -> tuple[int, int, bytes]:
    """A control message naming the mapped local address as the source."""
    if port.sock.family == socket.AF_INET:
        return socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, local, bytes(4))
    if len(local) == 4:
        return socket.IPPROTO_IPV6, _IPV6_PKTINFO, _IN6_PKTINFO.pack(_V4_MAPPED + local, 0)
    return socket.IPPROTO_IPV6, _IPV6_PKTINFO, _IN6_PKTINFO.pack(local, ifindex)


def _raw_sockaddr(data: bytes) -> tuple[int, bytes] | None:
    """(4 or 6, address) of a raw struct sockaddr_in / sockaddr_in6 (the ICMP offender)."""
    if len(data) < 2:
        return None
    family = struct.unpack_from("=H", data)[0]
    if family == socket.AF_INET and len(data) >= 8:
        return 4, data[4:8]
    if family == socket.AF_INET6 and len(data) >= 24:
        raw = data[8:24]
        return (4, raw[12:]) if raw[:12] == _V4_MAPPED else (6, raw)
    return None


def _error_message(aid: bytes, original: object, offender: bytes, code: int) -> bytes | None:
    """A Datagram Error message (section "Reporting ICMP Errors")."""
    if not isinstance(original, tuple):
        return None
    key = _key_of(original)
    reporter = _raw_sockaddr(offender)
    if key is None or reporter is None:
        return None
    family, raw, port = key
    if code == 4 and (family != 6 or reporter[0] != 6):
        return None  # "Datagram too big (IPv6 only)"
    atyp = AddressType.IPV4 if family == 4 else AddressType.IPV6
    ratyp = AddressType.IPV4 if reporter[0] == 4 else AddressType.IPV6
    total = 16 + len(raw) + 4 + len(reporter[1])
    return (
        bytes((6, 4))
        + _U16.pack(total)
        + aid
        + bytes((atyp, 0))
        + _U16.pack(port)
        + raw
        + bytes((ratyp, code, 0, 0))
        + reporter[1]
    )
