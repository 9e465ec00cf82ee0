"""Channels of the UDP engines (issue 11): ``UdpEngine.add_channel`` / ``remove_channel``.

A channel is a UDP socket connected to one client 5-tuple: a DTLS connection's, handed over
by the control plane after the handshake, or (for tests of the mapping rules) a plaintext
one. Every test runs on both engines through the ``engine`` fixture ("mmsg": the native
worker threads, with 2 workers so that associations and channels meet on different
threads; "python": the twin on the event loop). Real sockets on 127.0.0.1, a real DTLS
handshake (``net.dtls``'s server endpoint and client over loopback sockets) and a real
ICMP error from a router inside a private network namespace.

    client socket --connected--> [channel] engine [remote socket] --> echo server
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_server import Certificates, make_certificates
from OpenSSL import SSL
from test_udp_engine import (
    ICMP_SETUP,
    Assoc,
    Harness,
    _netns_available,
    dgram,
    fd_count,
    make_engine,
    parse,
    read_message,
    recv,
    silent,
    tcp_pair,
    udp_socket,
    until,
)

import socks6fast
from socks6fast.constants import DatagramErrorCode, UdpDrop
from socks6fast.dataplane.udp import DTLSLink, UdpChannelEnded, UdpChannelHello, UdpConfirmed, UdpEnded
from socks6fast.net.dtls import (
    DTLSClientConnection,
    DTLSConnection,
    DTLSServerEndpoint,
    dtls_client_context,
    dtls_server_context,
)
from socks6fast.proto.codec import decode_association_message
from socks6fast.proto.messages import AssociationConfirmation

# -- helpers ---------------------------------------------------------------------------


def channel_pair(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    """(proxy side, client side): two UDP sockets connected to each other."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    proxy = socket.socket(family, socket.SOCK_DGRAM)
    client = socket.socket(family, socket.SOCK_DGRAM)
    proxy.bind((host, 0))
    client.bind((host, 0))
    proxy.connect(client.getsockname()[:2])
    client.connect(proxy.getsockname()[:2])
    client.setblocking(False)
    return proxy, client


@dataclass
class Channel:
    cid: int
    client: socket.socket  # the client's end, connected to the channel


class ChannelHarness(Harness):
    """The UDP engine test harness plus channels."""

    def __init__(self, engine: Any, host: str = "127.0.0.1") -> None:
        super().__init__(engine, host)
        self.channels: list[Channel] = []

    def add_channel(
        self, dtls: DTLSLink | None = None, *, sockets: tuple[socket.socket, socket.socket] | None = None
    ) -> Channel:
        proxy, client = sockets or channel_pair(self.host)
        cid = self.engine.add_channel(proxy.detach(), dtls)
        channel = Channel(cid, client)
        self.channels.append(channel)
        return channel

    async def channel_ended(self, cid: int) -> UdpChannelEnded:
        def find() -> UdpChannelEnded | None:
            return next(
                (e for e in self.drain() if isinstance(e, UdpChannelEnded) and e.channel == cid), None
            )

        await until(lambda: find() is not None, f"UdpChannelEnded of channel {cid}")
        found = find()
        assert found is not None
        return found

    async def echo_on(self, ch: Channel, a: Assoc, payload: bytes) -> bytes:
        """Send payload to the echo server through a plaintext channel; return the answer."""
        ch.client.send(dgram(a.aid, *self.echo.address, payload))
        data, _ = await recv(ch.client)
        header, body = parse(data)
        assert header.association_id == a.aid
        assert (header.address, header.port) == self.echo.address  # UDP-04: names the source
        return body

    def close(self) -> None:
        super().close()
        for ch in self.channels:
            ch.client.close()


@pytest.fixture
async def ch_harness(engine: str) -> AsyncIterator[ChannelHarness]:
    h = ChannelHarness(make_engine(engine))
    h.open_port()
    try:
        yield h
    finally:
        h.close()


# -- plaintext channels: the mapping rules ---------------------------------------------


@pytest.mark.conformance("UDP-03", "UDP-04")
async def test_channel_maps_on_first_datagram_and_relays_both_ways_udp03_udp04(
    ch_harness: ChannelHarness,
) -> None:
    """UDP-03: the first datagram on a channel maps its association to that channel
    (UdpConfirmed names the channel and its peer, the Confirmation goes out on TCP);
    UDP-04: answers come back on the channel with a Datagram Header naming the source.
    Several associations (IDs owned by both workers of the native engine), one channel each."""
    h = ch_harness
    for last in range(4):
        a = h.add(aid=os.urandom(7) + bytes([last]))
        ch = h.add_channel()
        assert await h.echo_on(ch, a, b"hello %d" % last) == b"hello %d" % last
        confirmed = await h.event(UdpConfirmed, a.aid)
        assert confirmed.channel == ch.cid
        assert confirmed.over_tcp is False
        assert confirmed.client == ch.client.getsockname()[:2]
        assert isinstance(await read_message(a.tcp), AssociationConfirmation)
        for size in (1, 64, 1400, 8000):
            assert await h.echo_on(ch, a, b"x" * size) == b"x" * size
        assert await silent(a.client, 0.05)  # nothing on the association's own UDP socket
    ids = [ch.cid for ch in h.channels]
    assert ids == sorted(set(ids)) and len(ids) == 4


async def test_channel_ids_count_up_and_are_never_reused(ch_harness: ChannelHarness) -> None:
    h = ch_harness
    first = h.add_channel()
    h.engine.remove_channel(first.cid)
    second = h.add_channel()
    h.engine.remove_channel(second.cid)
    third = h.add_channel()
    assert first.cid < second.cid < third.cid
    assert (await h.channel_ended(first.cid)).cause == "removed"
    assert (await h.channel_ended(second.cid)).cause == "removed"


def worker_id(worker: int, workers: int = 2) -> bytes:
    """A random Association ID the engines house in ``worker`` (``ID[7] % workers``, D32)."""
    return os.urandom(7) + bytes([worker + workers * (os.urandom(1)[0] % (256 // workers))])


@pytest.fixture
async def two_workers(engine: str) -> AsyncIterator[ChannelHarness]:
    """Both engines with 2 workers (the twin applies the native engine's worker rule, D32)."""
    h = ChannelHarness(make_engine(engine, workers=2))
    h.open_port()
    try:
        yield h
    finally:
        h.close()


@pytest.mark.conformance("UDP-03", "UDP-04")
async def test_channel_carries_several_associations_udp03(two_workers: ChannelHarness) -> None:
    """UDP-03 (probe 19 F2): the first datagram of each association maps that association to
    the channel it came on, also when the channel already carries others (the mapping is per
    Association ID); each relays both ways and gets its Confirmation. An ID of another engine
    worker cannot join a mapped channel (MAPPING, D32; the proxy draws one client's IDs for
    one worker) and maps on its own channel; an unknown ID is UNKNOWN_ASSOCIATION. The
    channel ends with the last association mapped to it, not the first (D28)."""
    h = two_workers
    trio = [h.add(aid=worker_id(0)) for _ in range(3)]
    other = h.add(aid=worker_id(1))
    ch = h.add_channel()
    for round_ in range(2):
        for i, a in enumerate(trio):
            payload = b"%d:%d" % (i, round_)
            assert await h.echo_on(ch, a, payload) == payload
    for a in trio:
        confirmed = await h.event(UdpConfirmed, a.aid)
        assert (confirmed.channel, confirmed.over_tcp) == (ch.cid, False)
        assert isinstance(await read_message(a.tcp), AssociationConfirmation)
    ch.client.send(dgram(other.aid, *h.echo.address, b"other worker"))
    await h.drops(UdpDrop.MAPPING, 1)
    ch.client.send(dgram(worker_id(0), *h.echo.address, b"nobody"))
    await h.drops(UdpDrop.UNKNOWN_ASSOCIATION, 1)
    own = h.add_channel()
    assert await h.echo_on(own, other, b"own channel") == b"own channel"
    trio[0].tcp.close()
    await h.event(UdpEnded, trio[0].aid)
    trio[1].tcp.close()
    await h.event(UdpEnded, trio[1].aid)
    assert not any(isinstance(e, UdpChannelEnded) and e.channel == ch.cid for e in h.drain())
    assert await h.echo_on(ch, trio[2], b"last one") == b"last one"
    ch.client.send(dgram(trio[0].aid, *h.echo.address, b"ended"))
    await h.drops(UdpDrop.UNKNOWN_ASSOCIATION, 2)
    trio[2].tcp.close()
    ended = await h.channel_ended(ch.cid)
    assert ended.cause == "association ended"
    assert (ended.datagrams_in, ended.datagrams_out, ended.drops) == (10, 7, 3)


@pytest.mark.conformance("UDP-03")
async def test_association_mapped_elsewhere_is_not_remapped_udp03(ch_harness: ChannelHarness) -> None:
    """UDP-03: an association mapped to the UDP port or to its TCP connection is not
    re-mapped by a channel, and one mapped to a channel is not re-mapped by the port or TCP."""
    h = ch_harness
    on_port = h.add()
    assert await h.echo_through(on_port, b"port") == b"port"
    on_tcp = h.add()
    on_tcp.tcp.send(dgram(on_tcp.aid, *h.echo.address, b"tcp"))
    assert (await h.event(UdpConfirmed, on_tcp.aid)).over_tcp
    on_channel = h.add()
    ch = h.add_channel()
    assert await h.echo_on(ch, on_channel, b"channel") == b"channel"
    other = h.add_channel()
    other.client.send(dgram(on_port.aid, *h.echo.address, b"x"))
    other.client.send(dgram(on_tcp.aid, *h.echo.address, b"x"))
    other.client.send(dgram(on_channel.aid, *h.echo.address, b"x"))
    await h.drops(UdpDrop.MAPPING, 3)
    on_channel.client.sendto(dgram(on_channel.aid, *h.echo.address, b"y"), h.port_address)
    await h.drops(UdpDrop.MAPPING, 4)
    await read_message(on_channel.tcp)  # its Confirmation
    on_channel.tcp.send(dgram(on_channel.aid, *h.echo.address, b"y"))
    await h.drops(UdpDrop.MAPPING, 5)
    assert await silent(other.client, 0.1)
    assert await silent(on_channel.client, 0.1)
    assert await h.echo_on(ch, on_channel, b"still") == b"still"


@pytest.mark.conformance("UDP-07")
async def test_channel_ends_with_its_association(ch_harness: ChannelHarness) -> None:
    """UDP-07: the association ends with its TCP connection, and its channel with it."""
    h = ch_harness
    a = h.add()
    ch = h.add_channel()
    assert await h.echo_on(ch, a, b"one") == b"one"
    assert await h.echo_on(ch, a, b"two") == b"two"
    a.tcp.close()
    ended = await h.channel_ended(ch.cid)
    assert ended.cause == "association ended"
    assert (ended.datagrams_in, ended.datagrams_out, ended.drops) == (2, 2, 0)
    assert (await h.event(UdpEnded, a.aid)).datagrams_to_client == 2


async def test_unmapped_channel_ends_after_first_datagram_timeout(engine: str) -> None:
    h = ChannelHarness(make_engine(engine, first_datagram_timeout=0.3))
    try:
        ch = h.add_channel()
        ch.client.send(b"not a SOCKS 6 message")
        ended = await h.channel_ended(ch.cid)
        assert ended.cause == "unmapped"
        assert (ended.datagrams_in, ended.drops) == (1, 1)
        assert h.engine.drops()[UdpDrop.MALFORMED] == 1
        # A mapped channel is not ended by the timer.
        a = h.add()
        mapped = h.add_channel()
        mapped.client.send(dgram(a.aid, *h.echo.address, b"m"))
        await recv(mapped.client)
        await asyncio.sleep(0.5)
        assert not any(isinstance(e, UdpChannelEnded) and e.channel == mapped.cid for e in h.drain())
    finally:
        h.close()


async def test_remove_channel_leaves_the_association_d28(ch_harness: ChannelHarness) -> None:
    """D28: remove_channel ends the channel ("removed"); its association lives on until its
    TCP connection ends, datagrams to the client are dropped (NO_CHANNEL) and counted, and
    the association is not re-mapped anywhere else. Unknown ids are ignored."""
    h = ch_harness
    a = h.add()
    ch = h.add_channel()
    assert await h.echo_on(ch, a, b"before") == b"before"
    h.engine.remove_channel(ch.cid)
    h.engine.remove_channel(ch.cid)
    h.engine.remove_channel(12345)
    ended = await h.channel_ended(ch.cid)
    assert ended.cause == "removed"
    a.client.sendto(dgram(a.aid, *h.echo.address, b"port"), h.port_address)
    await h.drops(UdpDrop.MAPPING, 1)
    a.tcp.close()
    over = await h.event(UdpEnded, a.aid)
    assert over.datagrams_to_client == 1
    assert sum(1 for e in h.drain() if isinstance(e, UdpChannelEnded) and e.channel == ch.cid) == 1


async def test_channel_gone_drops_answers_no_channel_d28(ch_harness: ChannelHarness) -> None:
    """D28: an answer from the remote for an association whose channel ended is dropped
    and counted as NO_CHANNEL."""
    h = ch_harness
    a = h.add()
    ch = h.add_channel()
    assert await h.echo_on(ch, a, b"x") == b"x"
    # The echo server answers later: hold its answers by sending from a slow remote.
    slow = udp_socket("127.0.0.1")
    try:
        ch.client.send(dgram(a.aid, *slow.getsockname()[:2], b"ask"))
        await until(lambda: _readable(slow), "the request at the slow remote")
        data, peer = slow.recvfrom(100)
        h.engine.remove_channel(ch.cid)
        await h.channel_ended(ch.cid)
        slow.sendto(b"answer", peer)
        await h.drops(UdpDrop.NO_CHANNEL, 1)
    finally:
        slow.close()


def _readable(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


async def test_engine_close_ends_channels_and_add_channel_refuses_bad_arguments(engine: str) -> None:
    h = ChannelHarness(make_engine(engine))
    try:
        before = fd_count()
        loose = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # not connected
        with pytest.raises(ValueError, match="connected"):
            h.engine.add_channel(loose.fileno())
        stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(ValueError, match="datagram"):
            h.engine.add_channel(stream.fileno())
        proxy, client = channel_pair()
        with pytest.raises((ValueError, TypeError)):
            h.engine.add_channel(proxy.fileno(), "not a link")
        with pytest.raises((ValueError, TypeError)):
            h.engine.add_channel(proxy.fileno(), DTLSLink(object()))
        # The caller still owns every fd of a refused call.
        for sock in (loose, stream, proxy, client):
            assert sock.fileno() >= 0
            os.fstat(sock.fileno())
            sock.close()
        assert fd_count() == before
        channels = [h.add_channel() for _ in range(3)]
        h.engine.close()
        ended = {e.channel: e.cause for e in h.engine.drain() if isinstance(e, UdpChannelEnded)}
        assert ended == {ch.cid: "removed" for ch in channels}
        with pytest.raises(ValueError, match="closed"):
            h.engine.add_channel(0)
    finally:
        h.close()


async def test_channels_leak_no_fds(engine: str) -> None:
    """Every way a channel ends closes its socket (counted in /proc/self/fd)."""
    h = ChannelHarness(make_engine(engine, first_datagram_timeout=0.2))
    h.open_port()
    before = fd_count()
    try:
        for _ in range(5):
            removed = h.add_channel()
            h.engine.remove_channel(removed.cid)
            await h.channel_ended(removed.cid)
            unmapped = h.add_channel()
            await h.channel_ended(unmapped.cid)
            a = h.add()
            ch = h.add_channel()
            assert await h.echo_on(ch, a, b"z") == b"z"
            await read_message(a.tcp)
            a.tcp.close()
            await h.channel_ended(ch.cid)
            await h.event(UdpEnded, a.aid)
            for sock in (removed.client, unmapped.client, ch.client, a.client):
                sock.close()
            h.channels.clear()
            h.assocs.clear()
        assert fd_count() == before
    finally:
        h.close()


# -- ICMP errors on a channel (D17, UDP-09) -----------------------------------------------


def run_icmp_on_channel(path: str) -> None:
    """Entry point inside the namespace: print what the channel's client got as JSON."""
    print(json.dumps(asyncio.run(_icmp_on_channel(path))))


async def _icmp_on_channel(path: str) -> dict[str, Any]:
    h = ChannelHarness(make_engine(path))
    try:
        remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        remote.bind(("10.77.0.1", 0))
        client_tcp, proxy_tcp = tcp_pair("127.0.0.1")
        client = udp_socket("127.0.0.1")
        aid = os.urandom(8)
        h.engine.add(aid, proxy_tcp.detach(), [remote.detach()], udp_error=True)
        h.assocs.append(Assoc(aid, client_tcp, client, ("", 0), [client_tcp, client]))
        ch = h.add_channel()
        ch.client.send(dgram(aid, "10.78.1.1", 4321, b"p" * 16))
        data, _ = await recv(ch.client, 3.0)
        message, _used = decode_association_message(data)
        return {
            "reported": [message.address, message.port, message.reporter_address, int(message.error_code)],
            "on_port": not await silent(client, 0.2),
        }
    finally:
        h.close()


@pytest.mark.conformance("UDP-09")
def test_icmp_error_goes_out_on_the_channel_udp09_d17(engine: str) -> None:
    """UDP-09 / D17: a real ICMP host unreachable (a router namespace) for an opted-in
    association mapped to a channel reaches the client as a Datagram Error on the channel."""
    if not _netns_available():
        pytest.skip("needs unshare -n with veth pairs (root or user namespaces), nsenter and iproute2")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(socks6fast.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
        ),
    )
    script = ICMP_SETUP + (
        f'"{sys.executable}" -P -c "import test_udp_channels as t; t.run_icmp_on_channel({engine!r})"\n'
        "rc=$?\nkill $ROUTER\nexit $rc\n"
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "reported": ["10.78.1.1", 4321, "10.77.0.2", DatagramErrorCode.HOST_UNREACHABLE],
        "on_port": False,
    }


# -- DTLS channels ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("dtls-channels"))


@dataclass
class Handed:
    """A DTLS connection after the handshake and the hand-off."""

    client: DTLSClientConnection
    sock: socket.socket  # the client's socket, connected to the proxy's DTLS port
    server: SSL.Connection
    proxy_sock: socket.socket  # the proxy's: SO_REUSEADDR on the DTLS port, connected to the client
    last_flight: list[bytes]  # the client's last handshake flight (its Finished)


def dtls_handshake(certs: Certificates, *, lose_final_flight: bool = False) -> Handed:
    """A real DTLS 1.2 handshake over loopback sockets (cookie exchange included), then the
    hand-off D2 does: a socket bound to the DTLS port with SO_REUSEADDR, connected to the
    client. ``lose_final_flight`` drops the server's last flight, so the client will
    retransmit its Finished to the channel."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(listener.getsockname())
    sock.settimeout(5)
    done: list[DTLSConnection] = []
    server = DTLSServerEndpoint(
        dtls_server_context(str(certs.cert), str(certs.key)),
        on_datagram=lambda c, d: None,
        on_established=done.append,
    )
    client = DTLSClientConnection(dtls_client_context(cafile=str(certs.ca)), "127.0.0.1")
    client.start(time.monotonic())
    to_server = client.datagrams_to_send()
    last_flight: list[bytes] = []
    deadline = time.monotonic() + 10
    while not done:
        assert to_server and time.monotonic() < deadline, "the handshake stalled"
        last_flight = to_server
        for datagram in to_server:
            sock.send(datagram)
        for _ in to_server:  # loopback loses nothing: one read per datagram sent
            data, peer = listener.recvfrom(65536)
            server.datagram_received(data, peer, time.monotonic())
        replies = server.datagrams_to_send()
        if done and lose_final_flight:
            break
        for datagram, _ in replies:
            listener.sendto(datagram, sock.getsockname())
            client.datagram_received(sock.recv(65536), time.monotonic())
        to_server = client.datagrams_to_send()
    proxy_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    proxy_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    proxy_sock.bind(listener.getsockname())
    proxy_sock.connect(sock.getsockname())
    listener.close()
    sock.setblocking(False)
    if not lose_final_flight:
        assert client.established
    return Handed(client, sock, done[0].ssl, proxy_sock, last_flight)


class DTLSPeer:
    """The client's side of a handed-over DTLS channel."""

    def __init__(self, handed: Handed) -> None:
        self.conn = handed.client
        self.sock = handed.sock

    def send(self, message: bytes) -> bytes:
        record = self.conn.send(message)
        self.sock.send(record)
        return record

    def flush(self) -> None:
        for datagram in self.conn.datagrams_to_send():
            self.sock.send(datagram)

    async def recv(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.conn.received:
            left = deadline - time.monotonic()
            if left <= 0 or self.conn.closed:
                raise TimeoutError("no DTLS datagram")
            data, _ = await recv(self.sock, left)
            self.conn.datagram_received(data, time.monotonic())
        return self.conn.received.popleft()


async def dtls_channel(
    h: ChannelHarness, certs: Certificates, *, mtu: int = 1500, **kw: Any
) -> tuple[int, DTLSPeer, int]:
    """(channel id, the client, the largest message the channel carries)."""
    handed = await asyncio.to_thread(dtls_handshake, certs, **kw)
    handed.server.set_ciphertext_mtu(mtu)
    limit = handed.server.get_cleartext_mtu()
    cid = h.engine.add_channel(handed.proxy_sock.detach(), DTLSLink(handed.server, mtu))
    peer = DTLSPeer(handed)
    h.channels.append(Channel(cid, handed.sock))
    return cid, peer, limit


async def dtls_echo(h: ChannelHarness, peer: DTLSPeer, a: Assoc, payload: bytes) -> bytes:
    peer.send(dgram(a.aid, *h.echo.address, payload))
    header, body = parse(await peer.recv())
    assert header.association_id == a.aid
    assert (header.address, header.port) == h.echo.address  # UDP-04
    return body


@pytest.mark.conformance("UDP-02", "UDP-03", "TRN-03")
async def test_dtls_channel_relays_many_datagrams_udp02_udp03_trn03(
    ch_harness: ChannelHarness, certs: Certificates
) -> None:
    """UDP-02 / TRN-03: datagrams carried in DTLS records (a real handshake, then the
    hand-off to the engine) map the association to the DTLS connection (UDP-03) and relay
    both ways, 64 B, 1400 B and up to the channel's MTU; one larger than the MTU allows
    is dropped (TOO_BIG) rather than sent as an oversized record."""
    h = ch_harness
    a = h.add()
    cid, peer, limit = await dtls_channel(h, certs, mtu=1500)
    assert limit > 1420
    assert await dtls_echo(h, peer, a, b"first") == b"first"
    confirmed = await h.event(UdpConfirmed, a.aid)
    assert (confirmed.channel, confirmed.over_tcp) == (cid, False)
    assert confirmed.client == peer.sock.getsockname()[:2]
    assert isinstance(await read_message(a.tcp), AssociationConfirmation)
    header_size = 20  # IPv4 source
    for size, count in ((64, 200), (1400, 50), (limit - header_size, 20)):
        for i in range(count):
            payload = bytes([i % 251]) * size
            assert await dtls_echo(h, peer, a, payload) == payload
    peer.send(dgram(a.aid, *h.echo.address, b"b" * (limit - header_size + 1)))
    await h.drops(UdpDrop.TOO_BIG, 1)
    assert await dtls_echo(h, peer, a, b"after") == b"after"
    h.engine.remove_channel(cid)
    ended = await h.channel_ended(cid)
    assert ended.cause == "removed"
    assert (ended.datagrams_in, ended.datagrams_out, ended.drops) == (273, 272, 1)
    # remove_channel told the client with a close_notify.
    with pytest.raises(TimeoutError):
        await peer.recv(2.0)
    assert peer.conn.closed and peer.conn.error is not None and "closed" in str(peer.conn.error)


@pytest.mark.conformance("UDP-02", "UDP-03", "TRN-03")
async def test_dtls_connection_carries_several_associations_udp02_udp03_trn03(
    two_workers: ChannelHarness, certs: Certificates
) -> None:
    """UDP-03 over DTLS (probe 19 F2): three associations map to one DTLS connection by
    their first datagrams and relay both ways through it (64 B and 1400 B); an ID mapped to
    that connection is dropped on a second one (MAPPING), where a fourth association maps;
    the first connection lives until its last association ends, then sends a close_notify."""
    h = two_workers
    trio = [h.add(aid=worker_id(0)) for _ in range(3)]
    fourth = h.add(aid=worker_id(0))
    cid, peer, _limit = await dtls_channel(h, certs)
    for size in (64, 1400):
        for i, a in enumerate(trio):
            payload = bytes([i]) * size
            assert await dtls_echo(h, peer, a, payload) == payload
    for a in trio:
        assert (await h.event(UdpConfirmed, a.aid)).channel == cid
    cid2, peer2, _limit = await dtls_channel(h, certs)
    peer2.send(dgram(trio[0].aid, *h.echo.address, b"mapped to the first connection"))
    await h.drops(UdpDrop.MAPPING, 1)
    assert await dtls_echo(h, peer2, fourth, b"fourth") == b"fourth"
    assert (await h.event(UdpConfirmed, fourth.aid)).channel == cid2
    for a in trio[:2]:
        a.tcp.close()
        await h.event(UdpEnded, a.aid)
    assert await dtls_echo(h, peer, trio[2], b"still carried") == b"still carried"
    assert not any(isinstance(e, UdpChannelEnded) and e.channel == cid for e in h.drain())
    trio[2].tcp.close()
    ended = await h.channel_ended(cid)
    assert ended.cause == "association ended"
    assert (ended.datagrams_in, ended.datagrams_out, ended.drops) == (7, 7, 0)
    with pytest.raises(TimeoutError):
        await peer.recv(1.0)
    assert peer.conn.closed  # the close_notify
    assert await dtls_echo(h, peer2, fourth, b"other connection") == b"other connection"


@pytest.mark.conformance("UDP-02")
async def test_dtls_bad_records_are_dropped_and_counted(
    ch_harness: ChannelHarness, certs: Certificates
) -> None:
    """Garbage, a truncated record, a record with a broken MAC and a replayed record are
    dropped (RECORD) and counted on the channel; nothing escapes the engine and the
    channel still works after them."""
    h = ch_harness
    a = h.add()
    cid, peer, _limit = await dtls_channel(h, certs)
    record = peer.send(dgram(a.aid, *h.echo.address, b"original"))
    header, body = parse(await peer.recv())
    assert body == b"original"
    peer.sock.send(record)  # replayed: the same sequence number again
    peer.sock.send(os.urandom(200))  # garbage
    peer.sock.send(bytes([23, 0xFE, 0xFD]) + os.urandom(30))  # an application record cut short
    good = peer.conn.send(dgram(a.aid, *h.echo.address, b"cut"))
    peer.sock.send(good[:-5])  # truncated
    forged = peer.conn.send(dgram(a.aid, *h.echo.address, b"forged"))
    peer.sock.send(forged[:-1] + bytes([forged[-1] ^ 1]))  # bad MAC
    peer.sock.send(b"")  # an empty datagram
    await h.drops(UdpDrop.RECORD, 6)
    assert await dtls_echo(h, peer, a, b"still works") == b"still works"
    assert h.engine.drops()[UdpDrop.RECORD] == 6
    h.engine.remove_channel(cid)
    ended = await h.channel_ended(cid)
    assert (ended.datagrams_in, ended.drops) == (2, 6)
    a.tcp.close()
    assert (await h.event(UdpEnded, a.aid)).drops == 6  # the mapped association's records


@pytest.mark.conformance("TRN-03")
async def test_dtls_close_notify_ends_the_channel_d28(
    ch_harness: ChannelHarness, certs: Certificates
) -> None:
    """The client's close_notify ends the channel ("closed by peer"); the association lives
    on until its TCP connection ends (D28)."""
    h = ch_harness
    a = h.add()
    cid, peer, _limit = await dtls_channel(h, certs)
    assert await dtls_echo(h, peer, a, b"bye soon") == b"bye soon"
    peer.conn.close()
    peer.flush()
    ended = await h.channel_ended(cid)
    assert ended.cause == "closed by peer"
    assert (ended.datagrams_in, ended.datagrams_out) == (1, 1)
    assert not any(isinstance(e, UdpEnded) for e in h.drain())
    a.tcp.close()
    await h.event(UdpEnded, a.aid)


@pytest.mark.conformance("TRN-03")
async def test_dtls_retransmitted_finished_is_answered(
    ch_harness: ChannelHarness, certs: Certificates
) -> None:
    """The server's last flight is lost: the client retransmits its Finished, which now
    reaches the engine's channel; the engine sends OpenSSL's answer (our CCS and Finished
    again, RFC 6347 section 4.2.4), the client completes its handshake and relays."""
    h = ch_harness
    a = h.add()
    cid, peer, _limit = await dtls_channel(h, certs, lose_final_flight=True)
    assert not peer.conn.established
    deadline = time.monotonic() + 10
    while not peer.conn.established:
        assert time.monotonic() < deadline, "the client never completed its handshake"
        at = peer.conn.retransmit_at
        assert at is not None
        await asyncio.sleep(max(0.0, at - time.monotonic()) + 0.01)
        peer.conn.handle_timer(time.monotonic())
        peer.flush()
        try:
            data, _ = await recv(peer.sock, 2.0)
        except TimeoutError:
            continue
        peer.conn.datagram_received(data, time.monotonic())
    assert await dtls_echo(h, peer, a, b"after the retransmit") == b"after the retransmit"
    assert h.engine.drops()[UdpDrop.RECORD] == 0
    h.engine.remove_channel(cid)


@pytest.mark.conformance("TRN-03")
async def test_client_hello_on_a_dtls_channel_is_passed_on(
    ch_harness: ChannelHarness, certs: Certificates
) -> None:
    """RFC 6347 section 4.2.8 (D31): a new ClientHello (epoch 0) from the channel's 5-tuple
    is not fed to the established connection (which would discard it) but reported as
    ``UdpChannelHello`` with its bytes, for the control plane's cookie exchange; the channel
    goes on relaying and nothing is dropped. At most 256 wait for the control plane."""
    h = ch_harness
    a = h.add()
    cid, peer, _limit = await dtls_channel(h, certs)
    assert await dtls_echo(h, peer, a, b"before") == b"before"
    fresh = DTLSClientConnection(dtls_client_context(cafile=str(certs.ca)), "127.0.0.1")
    fresh.start(time.monotonic())
    (hello,) = fresh.datagrams_to_send()
    peer.sock.send(hello)
    found = await h.event(UdpChannelHello, None)
    assert (found.channel, found.datagram) == (cid, hello)
    assert await dtls_echo(h, peer, a, b"after") == b"after"
    assert sum(h.engine.drops().values()) == 0
    # Bounded (a flood spoofing the client's 5-tuple): at most 256 wait for drain(), the
    # rest are dropped as RECORD; the channel still relays.
    h.drain()
    for i in range(300):
        peer.sock.send(hello)
        if i % 25 == 24:
            await asyncio.sleep(0.005)  # the twin reads on this loop: no socket buffer overflow
    await h.drops(UdpDrop.RECORD, 300 - 256)  # all 300 read (the drops come after the 256th)
    hellos: list[UdpChannelHello] = []

    def collected() -> bool:  # the native workers hand their events over at the end of a turn
        hellos.extend(e for e in h.engine.drain() if isinstance(e, UdpChannelHello))
        return len(hellos) >= 256

    await until(collected, "256 UdpChannelHello")
    await asyncio.sleep(0.05)
    assert collected() and len(hellos) == 256
    assert h.engine.drops()[UdpDrop.RECORD] == 300 - 256
    assert await dtls_echo(h, peer, a, b"after the flood") == b"after the flood"


async def test_remove_racing_the_hand_over_ends_each_channel_once(engine: str) -> None:
    """Channels removed while their first datagram hands them to another worker (the native
    engine moves an unmapped channel to its association's worker), and the rest by the
    engine's close: every channel ends exactly once, and every fd is closed."""
    before = fd_count()
    h = ChannelHarness(make_engine(engine, workers=4))
    h.open_port()
    try:
        pairs = []
        for i in range(40):
            a = h.add(aid=os.urandom(7) + bytes([i]))
            ch = h.add_channel()
            pairs.append((a, ch))
        for i, (a, ch) in enumerate(pairs):
            ch.client.send(dgram(a.aid, *h.echo.address, b"race"))
            if i % 2:
                h.engine.remove_channel(ch.cid)
        await asyncio.sleep(0.2)
        for _, ch in pairs[::4]:
            h.engine.remove_channel(ch.cid)
        h.engine.close()
        ended = [e.channel for e in h.engine.drain() if isinstance(e, UdpChannelEnded)]
        assert sorted(ended) == sorted(ch.cid for _, ch in pairs)
    finally:
        h.close()
    assert fd_count() == before
