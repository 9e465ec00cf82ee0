"""UDP ASSOCIATE end to end: the server (`socks6fast.asyncio.server`) with its UDP data plane.

Every test runs on both UDP engines ("mmsg": the native recvmmsg/sendmmsg engine; "python":
its twin, the one ``SOCKS6FAST_NO_EXTENSIONS=1`` uses), chosen per test by the ``engine``
fixture. The peers are real sockets on 127.0.0.1 and ::1: a raw SOCKS 6 client (its bytes
built with ``socks6fast.proto.codec``, since the client library is not what is tested here),
a UDP echo server as the remote host, and for SOCKS 5 the third-party PySocks client.
ICMP errors are produced for real inside a network namespace the test creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import socks  # PySocks: a third-party SOCKS 5 UDP client
import uvloop
from helpers_server import (
    RawClient,
    fake_resolver,
    make_certificates,
    make_config,
    record_for,
    running_server,
)
from helpers_udp import LOOPBACK_HOSTS, has_ipv6_loopback
from test_udp_engine import ICMP_SETUP, _netns_available

import socks6fast
from socks6fast.asyncio.server import ConnectionRecord, Server
from socks6fast.asyncio.server import udp as server_udp
from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
    UdpDrop,
)
from socks6fast.dataplane.udp import UdpEnginePy
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    Datagram,
    DatagramError,
    DatagramHeader,
    IPTOSOption,
    NoFragmentationOption,
    OperationReply,
    Option,
    PortParityOption,
    Request,
    SessionID,
    SessionRequest,
    TTLOption,
    UDPErrorOption,
)

TIMEOUT = 5.0
QUIET = 0.3  # seconds of silence that stand for "nothing arrives"


HOSTS = LOOPBACK_HOSTS


# --- peers ---------------------------------------------------------------------------


class Echo:
    """A UDP echo server (the remote host); records who sent what."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.seen: list[tuple[bytes, tuple[Any, ...]]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    async def __aenter__(self) -> Echo:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, address = await loop.sock_recvfrom(self.sock, 65535)
            self.seen.append((data, address))
            await loop.sock_sendto(self.sock, data, address)


def atyp(host: str) -> AddressType:
    return AddressType.IPV6 if ":" in host else AddressType.IPV4


def datagram(
    aid: bytes, host: str, port: int, payload: bytes, *, padding: bytes = b"", length: int = 0
) -> bytes:
    """A client's Datagram message: header, payload, then padding (UDP-05)."""
    try:
        kind = AddressType.IPV6 if ipaddress.ip_address(host).version == 6 else AddressType.IPV4
    except ValueError:
        kind = AddressType.DOMAIN_NAME
    probe = bytearray(300)
    hlen = codec.encode_datagram_header(DatagramHeader(aid, kind, host, port, len(probe)), probe)
    header = DatagramHeader(aid, kind, host, port, length or hlen + len(payload))
    buf = bytearray(hlen)
    codec.encode_datagram_header(header, buf)
    return bytes(buf) + payload + padding


def parse(data: bytes) -> tuple[DatagramHeader, bytes]:
    header, hlen = codec.decode_datagram_header(data)
    return header, data[hlen : header.message_length]


class Association:
    """One raw SOCKS 6 UDP association: the TCP connection and a plain UDP socket."""

    def __init__(
        self, client: RawClient, reply: OperationReply, aid: bytes, udp_port: tuple[str, int]
    ) -> None:
        self.client = client
        self.reply = reply
        self.aid = aid
        self.udp_port = udp_port
        family = socket.AF_INET6 if ":" in udp_port[0] else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.setblocking(False)

    async def send_udp(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendto(self.udp, data, self.udp_port)

    async def recv_udp(self, timeout: float = TIMEOUT) -> bytes:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.udp, 65535), timeout)

    async def nothing_on_udp(self) -> bool:
        try:
            await self.recv_udp(QUIET)
        except TimeoutError:
            return True
        return False

    async def message(self, timeout: float = TIMEOUT) -> Any:
        """The next association message on the TCP connection."""
        async with asyncio.timeout(timeout):
            while True:
                message, n = codec.decode_association_message(self.client.buffer)
                if message is not None:
                    del self.client.buffer[:n]
                    return message
                await self.client._fill(len(self.client.buffer) + max(n, 1))

    async def nothing_on_tcp(self) -> bool:
        try:
            await self.message(QUIET)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        self.udp.close()
        await self.client.close()


async def associate(
    server: Server,
    *options: Option,
    host: str = "0.0.0.0",
    port: int = 0,
    proxy: tuple[str, int] | None = None,
    expect: ReplyCode = ReplyCode.SUCCESS,
    **connect: Any,
) -> Association:
    """UDP ASSOCIATE over a raw connection; the reply and the Association Initialization."""
    proxy = proxy or server.addresses[0]
    client = await RawClient.connect(proxy, **connect)
    await client.send(codec.encode_request(Request(Command.UDP_ASSOCIATE, atyp(host), host, port, options)))
    assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
    reply = await client.operation_reply()
    assert reply.reply_code == expect, reply
    assert server.udp is not None
    udp_port = next(p for p in server.udp.ports if (":" in p[0]) == (":" in proxy[0]))
    association = Association(client, reply, b"", udp_port)
    if expect == ReplyCode.SUCCESS:
        init = await association.message()
        assert isinstance(init, AssociationInit)
        association.aid = init.association_id
    return association


@contextlib.asynccontextmanager
async def udp_server(**kwargs: Any) -> AsyncIterator[Server]:
    resolver = kwargs.pop("resolver", None)
    config = make_config(ipv6=has_ipv6_loopback(), **kwargs)
    async with running_server(config, resolver=resolver) as server:
        yield server


async def record_of(server: Server, association: Association) -> ConnectionRecord:
    return await record_for(server, association.client)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- UDP-01 .. UDP-04: the association, over UDP and over TCP --------------------------


@pytest.mark.conformance("UDP-01")
async def test_reply_then_initialization_with_random_ids(engine: str) -> None:
    """UDP-01: a successful Operation Reply naming the remote-facing socket (bound where the
    client reached us: the request's address was unspecified), then the Association
    Initialization (06 01 000c + 8-byte ID); two associations get different IDs."""
    async with udp_server() as server:
        first = await associate(server)
        raw = codec.encode_association_message(AssociationInit(first.aid))
        assert raw[:4] == bytes.fromhex("0601000c") and len(raw) == 12
        second = await associate(server)
        assert first.aid != second.aid and len(first.aid) == len(second.aid) == 8
        for association in (first, second):
            reply = association.reply
            assert (reply.address_type, reply.address) == (AddressType.IPV4, "127.0.0.1")
            assert reply.port != 0
        assert first.reply.port != second.reply.port
        await first.close()
        await second.close()


@pytest.mark.conformance("UDP-02", "UDP-04")
@pytest.mark.parametrize("host", HOSTS)
async def test_datagrams_over_udp(engine: str, host: str) -> None:
    """UDP-02 over plain UDP to the proxy's UDP port (the TCP listener's port number, D16),
    UDP-04: the Confirmation comes over TCP before any datagram, then the echo comes back
    with a Datagram Header naming its source."""
    async with udp_server() as server, Echo(host) as echo:
        proxy = next(a for a in server.addresses if (":" in a[0]) == (":" in host))
        assert server.udp is not None
        assert (proxy[0], proxy[1]) in server.udp.ports  # D16: same address and port number
        association = await associate(server, host="::" if ":" in host else "0.0.0.0", proxy=proxy)
        assert association.reply.address == host
        await association.send_udp(datagram(association.aid, *echo.address, b"hello"))
        confirmation = await association.message()
        assert confirmation == AssociationConfirmation(association.aid)
        header, payload = parse(await association.recv_udp())
        assert payload == b"hello"
        assert (header.association_id, header.address, header.port) == (association.aid, *echo.address)
        assert header.address_type == atyp(host)
        # The remote host sees the proxy's remote-facing socket, the one the reply named.
        assert echo.seen[0][1][:2] == (host, association.reply.port)
        for n in range(5):
            await association.send_udp(datagram(association.aid, *echo.address, b"x" * n))
            assert parse(await association.recv_udp())[1] == b"x" * n
        await association.close()
        record = await record_of(server, association)
        assert (record.datagrams_up, record.datagrams_down) == (6, 6)
        assert record.relay_path == engine and record.relay_end == "eof" and record.udp_channel == "udp"
        assert "via=udp dgrams_up=6 dgrams_down=6 drops=0 icmp=0" in record.log_line()


@pytest.mark.conformance("UDP-02", "UDP-04")
@pytest.mark.parametrize("host", HOSTS)
async def test_datagrams_over_tcp(engine: str, host: str) -> None:
    """UDP-02 over the TCP connection: Datagram messages framed by Message Length both ways,
    the Confirmation first (UDP-04), datagrams sent right behind the request included."""
    async with udp_server() as server, Echo(host) as echo:
        proxy = next(a for a in server.addresses if (":" in a[0]) == (":" in host))
        association = await associate(server, host="::" if ":" in host else "0.0.0.0", proxy=proxy)
        await association.client.send(datagram(association.aid, *echo.address, b"one") * 2)
        assert await association.message() == AssociationConfirmation(association.aid)
        for _ in range(2):
            message = await association.message()
            assert isinstance(message, Datagram)
            assert message.payload == b"one"
            assert (message.header.address, message.header.port) == echo.address
        await association.close()


@pytest.mark.conformance("UDP-02")
async def test_datagrams_right_behind_the_request(engine: str) -> None:
    """Datagrams the client pipelines after its request (before the Initialization came
    back, it cannot know the ID, so this is a client that guessed nothing: the bytes are a
    whole Datagram for a wrong ID) are parsed by the engine as the first TCP bytes and
    dropped, and the association still works."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        client = await RawClient.connect(server.addresses[0])
        request = codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0))
        await client.send(request + datagram(b"\x00" * 8, *echo.address, b"early"))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        assert server.udp is not None
        association = Association(
            client,
            OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", 0),
            b"",
            server.udp.ports[0],
        )
        init = await association.message()
        assert isinstance(init, AssociationInit)
        await client.send(datagram(init.association_id, *echo.address, b"late"))
        assert await association.message() == AssociationConfirmation(init.association_id)
        message = await association.message()
        assert isinstance(message, Datagram) and message.payload == b"late"
        assert [data for data, _ in echo.seen] == [b"late"]
        await association.close()
        assert (await record_of(server, association)).udp_drops == 1


@pytest.mark.conformance("UDP-03")
async def test_mapping_drops_strangers(engine: str) -> None:
    """UDP-03: the first datagram fixes the mapping to its 5-tuple; a datagram with the same
    ID from another socket, one over the TCP connection, and one with an unknown ID are
    dropped silently; the association keeps working."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        association = await associate(server)
        await association.send_udp(datagram(association.aid, *echo.address, b"first"))
        assert await association.message() == AssociationConfirmation(association.aid)
        assert parse(await association.recv_udp())[1] == b"first"
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.setblocking(False)
            await loop.sock_sendto(
                stranger, datagram(association.aid, *echo.address, b"stranger"), association.udp_port
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_recv(stranger, 65535), QUIET)
        await association.client.send(datagram(association.aid, *echo.address, b"over tcp"))
        wrong_id = bytes(b ^ 0xFF for b in association.aid)
        await association.send_udp(datagram(wrong_id, *echo.address, b"wrong id"))
        assert await association.nothing_on_udp()
        assert await association.nothing_on_tcp()
        await association.send_udp(datagram(association.aid, *echo.address, b"still"))
        assert parse(await association.recv_udp())[1] == b"still"
        assert [data for data, _ in echo.seen] == [b"first", b"still"]
        assert server.udp is not None
        drops = server.udp.engine.drops()
        assert drops[UdpDrop.MAPPING] >= 2 and drops[UdpDrop.UNKNOWN_ASSOCIATION] >= 1
        await association.close()
        assert (await record_of(server, association)).udp_drops == 2  # wrong ID: no association


@pytest.mark.conformance("UDP-05")
async def test_padding_ignored_and_long_length_dropped(engine: str) -> None:
    """UDP-05: bytes after Message Length are padding, ignored; a Message Length larger than
    the UDP payload drops the datagram silently; truncated headers and an unknown address
    type are dropped and counted; the association keeps working."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        association = await associate(server)
        await association.send_udp(datagram(association.aid, *echo.address, b"pad", padding=b"\xaa" * 7))
        assert await association.message() == AssociationConfirmation(association.aid)
        assert parse(await association.recv_udp())[1] == b"pad"
        good = datagram(association.aid, *echo.address, b"long")
        await association.send_udp(good[:2] + struct.pack(">H", len(good) + 1) + good[4:])
        await association.send_udp(good[:15])  # truncated header
        await association.send_udp(good[:12] + b"\x09" + good[13:])  # unknown address type
        assert await association.nothing_on_udp()
        await association.send_udp(good)
        assert parse(await association.recv_udp())[1] == b"long"
        assert [data for data, _ in echo.seen] == [b"pad", b"long"]
        assert server.udp is not None
        drops = server.udp.engine.drops()
        assert (
            drops[UdpDrop.LENGTH] >= 1 and drops[UdpDrop.TRUNCATED] >= 1 and drops[UdpDrop.ADDRESS_TYPE] >= 1
        )
        await association.close()


@pytest.mark.conformance("UDP-06")
@pytest.mark.parametrize("over", ["udp", "tcp"])
async def test_server_mode(engine: str, over: str) -> None:
    """UDP-06: an empty datagram to the all-zero address and port confirms the association
    without relaying anything; then a remote host that sends to the address and port the
    Operation Reply named reaches the client, though the client never sent to it."""
    async with udp_server() as server:
        association = await associate(server)
        probe = datagram(association.aid, "0.0.0.0", 0, b"")
        if over == "udp":
            await association.send_udp(probe)
        else:
            await association.client.send(probe)
        assert await association.message() == AssociationConfirmation(association.aid)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
            remote.bind(("127.0.0.1", 0))
            remote.sendto(b"from afar", (association.reply.address, association.reply.port))
            if over == "udp":
                header, payload = parse(await association.recv_udp())
            else:
                message = await association.message()
                assert isinstance(message, Datagram)
                header, payload = message.header, message.payload
            assert payload == b"from afar"
            assert (header.address, header.port) == remote.getsockname()
        await association.close()
        record = await record_of(server, association)
        assert (record.datagrams_up, record.datagrams_down) == (0, 1)
        assert (record.udp_channel, record.udp_server_mode) == (over, True)


@pytest.mark.conformance("UDP-07")
async def test_first_datagram_timeout_closes_tcp(engine: str) -> None:
    """UDP-07: no first datagram within ``[udp] first_datagram_timeout``: the proxy closes
    the TCP connection, and the remote-facing port is free again."""
    async with udp_server(udp={"first_datagram_timeout": 0.3}) as server:
        association = await associate(server)
        started = time.monotonic()
        assert await association.client.read_until_eof(timeout=TIMEOUT) == b""
        assert 0.2 < time.monotonic() - started < 3
        record = await record_of(server, association)
        assert record.relay_end == "idle_timeout" and "first-datagram timeout" in record.error
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((association.reply.address, association.reply.port))
        await association.close()


@pytest.mark.conformance("UDP-07")
async def test_closing_tcp_ends_the_association(engine: str) -> None:
    """UDP-07: closing the TCP connection ends the association: its remote-facing port can be
    bound again, its ID is unknown from then on, and no descriptor is left behind."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        warm = await associate(server)  # the engine's first association allocates what it keeps
        await warm.close()
        await record_of(server, warm)
        before = open_fds()
        association = await associate(server)
        await association.send_udp(datagram(association.aid, *echo.address, b"x"))
        assert parse(await association.recv_udp())[1] == b"x"
        await association.client.close()
        record = await record_of(server, association)
        assert record.relay_end == "eof"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((association.reply.address, association.reply.port))
        assert server.udp is not None and server.udp.active == 0
        await association.send_udp(datagram(association.aid, *echo.address, b"late"))
        assert await association.nothing_on_udp()
        association.udp.close()
        assert open_fds() == before


@pytest.mark.conformance("UDP-02", "UDP-07")
@pytest.mark.parametrize("over", ["udp", "tcp"])
async def test_over_a_tls_control_connection(engine: str, over: str, tmp_path: Path) -> None:
    """UDP-02 with the control connection over TLS: the engine gets one end of a socket
    pair and the server pumps the TLS plaintext through it, so datagrams over the TLS
    connection and over plain UDP both work, and closing the TLS connection ends the
    association (UDP-07)."""
    certs = make_certificates(tmp_path)
    server_table = {
        "tls_listen": ["127.0.0.1:0"],
        "tls_certificate": str(certs.cert),
        "tls_key": str(certs.key),
    }
    async with udp_server(server=server_table) as server, Echo("127.0.0.1") as echo:
        context = ssl.create_default_context(cafile=str(certs.ca))
        association = await associate(
            server, proxy=server.tls_addresses[0], ssl=context, server_hostname="localhost"
        )
        for n in range(3):
            payload = b"tls%d" % n
            if over == "udp":
                await association.send_udp(datagram(association.aid, *echo.address, payload))
            else:
                await association.client.send(datagram(association.aid, *echo.address, payload))
            if n == 0:
                assert await association.message() == AssociationConfirmation(association.aid)
            if over == "udp":
                assert parse(await association.recv_udp())[1] == payload
            else:
                message = await association.message()
                assert isinstance(message, Datagram) and message.payload == payload
        await association.close()
        record = await record_of(server, association)
        assert record.listener == "tls" and record.relay_end == "eof"
        assert (record.datagrams_up, record.datagrams_down) == (3, 3)
        assert server.udp is not None and server.udp.active == 0


# --- SOCKS 5 UDP ASSOCIATE (RFC 1928 section 7, D19) ----------------------------------


def _pysocks_exchange(proxy: tuple[str, int], echo: tuple[str, int], payloads: list[bytes]) -> list[Any]:
    """PySocks, a third-party client: sendto/recvfrom through the proxy (blocking)."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, proxy[0], proxy[1])
    sock.settimeout(TIMEOUT)
    out = []
    try:
        for payload in payloads:
            sock.sendto(payload, echo)
            out.append(sock.recvfrom(65535))
    finally:
        sock.close()
    return out


async def test_socks5_udp_with_pysocks(engine: str) -> None:
    """D19: PySocks' ``socksocket(SOCK_DGRAM)`` does UDP ASSOCIATE on our port, sends to the
    relay port the reply named with the RFC 1928 header, and gets the echo back with its
    source; the association ends with PySocks' TCP connection."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        payloads = [b"one", b"two" * 100, b""]
        results = await asyncio.to_thread(_pysocks_exchange, server.addresses[0], echo.address, payloads)
        assert results == [(payload, echo.address) for payload in payloads]
        async with asyncio.timeout(TIMEOUT):
            while not any(r.protocol == "socks5" and r.command == "UDP_ASSOCIATE" for r in server.records):
                await asyncio.sleep(0.01)
        record = next(r for r in server.records if r.command == "UDP_ASSOCIATE")
        assert (record.reply_code, record.datagrams_up, record.datagrams_down) == (0, 3, 3)
        assert record.relay_path == engine


class Socks5Udp:
    """A raw SOCKS 5 UDP client: the TCP control connection and a UDP socket."""

    def __init__(self, client: RawClient, relay: tuple[str, int], udp: socket.socket) -> None:
        self.client, self.relay, self.udp = client, relay, udp

    @classmethod
    async def open(cls, proxy: tuple[str, int], udp: socket.socket, port: int) -> Socks5Udp:
        client = await RawClient.connect(proxy)
        await client.send(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(4) + struct.pack(">H", port))
        assert await client.read_exactly(2) == b"\x05\x00"
        reply = await client.read_exactly(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0])
        udp.setblocking(False)
        return cls(client, relay, udp)

    @staticmethod
    def header(host: str, port: int, frag: int = 0) -> bytes:
        return b"\x00\x00" + bytes([frag, 1]) + socket.inet_aton(host) + struct.pack(">H", port)

    async def send(
        self, payload: bytes, dest: tuple[str, int], *, frag: int = 0, sock: socket.socket | None = None
    ) -> None:
        data = self.header(*dest, frag=frag) + payload
        await asyncio.get_running_loop().sock_sendto(sock or self.udp, data, self.relay)

    async def recv(self, timeout: float = TIMEOUT, sock: socket.socket | None = None) -> bytes:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock or self.udp, 65535), timeout)


async def test_socks5_drops_fragments_and_strangers(engine: str) -> None:
    """D19: FRAG other than 0 is dropped; with DST.PORT named, a datagram from another port of
    the client's address is dropped, and so is one from another address (127.0.0.2); the
    client's own datagrams keep working."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_port,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_ip,
        ):
            mine.bind(("127.0.0.1", 0))
            other_port.bind(("127.0.0.1", 0))
            other_ip.bind(("127.0.0.2", 0))
            other_port.setblocking(False)
            other_ip.setblocking(False)
            client = await Socks5Udp.open(server.addresses[0], mine, mine.getsockname()[1])
            await client.send(b"fragment", echo.address, frag=1)
            await client.send(b"stranger", echo.address, sock=other_port)
            await client.send(b"far away", echo.address, sock=other_ip)
            with pytest.raises(TimeoutError):
                await client.recv(QUIET)
            await client.send(b"mine", echo.address)
            reply = await client.recv()
            assert reply == client.header(*echo.address) + b"mine"
            assert [data for data, _ in echo.seen] == [b"mine"]
            assert server.udp is not None
            drops = server.udp.engine.drops()
            assert drops[UdpDrop.FRAGMENT] >= 1 and drops[UdpDrop.SOURCE] >= 2
            await client.client.close()
            record = await record_for(server, client.client)
            assert record.udp_drops == 3 and record.datagrams_up == 1
            # The association ended with the TCP connection: its relay port is free again.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                again.bind(client.relay)


async def test_socks5_other_address_dropped_without_port(engine: str) -> None:
    """D19: with DST.PORT 0 any port of the TCP client's address may send first, but another
    address may not."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_ip,
        ):
            other_ip.bind(("127.0.0.2", 0))
            other_ip.setblocking(False)
            client = await Socks5Udp.open(server.addresses[0], mine, 0)
            await client.send(b"far away", echo.address, sock=other_ip)
            with pytest.raises(TimeoutError):
                await client.recv(QUIET, sock=other_ip)
            await client.send(b"mine", echo.address)
            assert (await client.recv()).endswith(b"mine")
            await client.client.close()


# --- rules, names, limits, bad input ---------------------------------------------------


@pytest.mark.conformance("CMD-06")
async def test_rules_on_the_request_and_on_each_destination(engine: str) -> None:
    """CMD-06 for UDP: ``udp_associate`` denied -> Not Allowed (0x02); with a destination
    rule, each datagram's destination is checked: the first datagram to a new destination
    is held until the verdict and then relayed, without a resend (D24; probe F3); a denied
    destination's datagrams are dropped and counted, an allowed one is relayed."""
    rules = [
        {
            "action": "deny",
            "commands": ["udp_associate"],
            "users": ["@anonymous"],
            "clients": ["127.0.0.2/32"],
        },
        {"action": "deny", "commands": ["udp_associate"], "ports": [9]},
    ]
    async with udp_server(rules=rules) as server, Echo("127.0.0.1") as echo:
        client = await RawClient.connect(server.addresses[0], local_addr=("127.0.0.2", 0))
        await client.send(
            codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0))
        )
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        assert await client.read_until_eof() == b""
        await client.close()
        association = await associate(server)
        await association.send_udp(datagram(association.aid, "127.0.0.1", 9, b"denied"))
        await association.send_udp(datagram(association.aid, *echo.address, b"first"))
        assert await association.message() == AssociationConfirmation(association.aid)
        # One try: the datagram waited for the verdict and was not lost (D24).
        assert parse(await association.recv_udp())[1] == b"first"
        await association.send_udp(datagram(association.aid, *echo.address, b"again"))
        assert parse(await association.recv_udp())[1] == b"again"
        for _ in range(3):
            await association.send_udp(datagram(association.aid, "127.0.0.1", 9, b"denied"))
        assert await association.nothing_on_udp()
        assert all(data != b"denied" for data, _ in echo.seen)
        assert server.udp is not None
        assert server.udp.engine.drops()[UdpDrop.DENIED] >= 4
        assert server.udp.engine.drops()[UdpDrop.PENDING] == 0
        await association.close()
        record = await record_of(server, association)
        assert record.udp_drops == 4  # the 4 denied ones; the first ones waited


@pytest.mark.parametrize("over", ["udp", "tcp"])
async def test_datagrams_waiting_for_a_verdict_arrive_in_order(engine: str, over: str) -> None:
    """D24 (probe F3): under a destination rule, a burst of datagrams to a new destination
    sent before the verdict is back is held, not dropped: all arrive, in order."""
    rules = [{"action": "deny", "commands": ["udp_associate"], "ports": [9]}]
    async with udp_server(rules=rules) as server, Echo("127.0.0.1") as echo:
        association = await associate(server)
        burst = [b"burst %d" % i for i in range(6)]
        data = b"".join(datagram(association.aid, *echo.address, payload) for payload in burst)
        if over == "tcp":
            await association.client.send(data)
        else:
            for payload in burst:
                await association.send_udp(datagram(association.aid, *echo.address, payload))
        assert await association.message() == AssociationConfirmation(association.aid)
        got = []
        for _ in burst:
            if over == "udp":
                got.append(parse(await association.recv_udp())[1])
            else:
                message = await association.message()
                assert isinstance(message, Datagram)
                got.append(message.payload)
        assert got == burst
        assert [data for data, _ in echo.seen] == burst
        assert server.udp is not None
        assert server.udp.engine.drops()[UdpDrop.PENDING] == 0
        await association.close()


async def test_no_rule_on_destinations_never_waits(engine: str) -> None:
    """Without a destination rule that applies, no datagram waits for a verdict: the first
    datagram to each destination is relayed (the engine is not asked)."""
    rules = [{"action": "deny", "commands": ["connect"], "destinations": ["127.0.0.0/8"]}]
    async with udp_server(rules=rules) as server, Echo("127.0.0.1") as echo:
        association = await associate(server)
        await association.send_udp(datagram(association.aid, *echo.address, b"at once"))
        assert parse(await association.recv_udp())[1] == b"at once"
        await association.close()


@pytest.mark.parametrize("over", ["udp", "tcp"])
async def test_domain_name_destinations(engine: str, over: str) -> None:
    """D20: a domain name in a Datagram Header is resolved by the server's resolver (a local
    fake here), once per association, and checked by the rules with the address it resolved
    to: a name resolving into a denied network is dropped; the reply names the IP source.
    The first datagram waits for the name and the verdict and arrives without a resend
    (D24; probe F3)."""
    resolver = fake_resolver({"echo.test": ["127.0.0.1"], "blocked.test": ["127.0.0.9"]})
    rules = [{"action": "deny", "commands": ["udp_associate"], "destinations": ["127.0.0.9/32"]}]
    async with udp_server(rules=rules, resolver=resolver) as server, Echo("127.0.0.1") as echo:
        association = await associate(server)

        async def send(payload: bytes, host: str) -> None:
            data = datagram(association.aid, host, echo.address[1], payload)
            if over == "udp":
                await association.send_udp(data)
            else:
                await association.client.send(data)

        async def receive(timeout: float) -> tuple[DatagramHeader, bytes]:
            if over == "udp":
                return parse(await association.recv_udp(timeout))
            message = await association.message(timeout)
            assert isinstance(message, Datagram)
            return message.header, message.payload

        await send(b"resolve me", "echo.test")
        assert await association.message() == AssociationConfirmation(association.aid)
        header, payload = await receive(TIMEOUT)  # one try: it waited (D24)
        assert payload == b"resolve me"
        assert [data for data, _ in echo.seen] == [b"resolve me"]
        assert (header.address_type, header.address, header.port) == (AddressType.IPV4, *echo.address)
        for _ in range(3):
            await send(b"blocked", "blocked.test")
        await asyncio.sleep(QUIET)
        assert all(data != b"blocked" for data, _ in echo.seen)
        await association.close()


async def test_per_client_limit(engine: str) -> None:
    """``[udp] max_associations_per_client``: one more association gets General Failure; a
    slot is free again once an association ended."""
    async with udp_server(udp={"max_associations_per_client": 2}) as server:
        first = await associate(server)
        second = await associate(server)
        refused = await associate(server, expect=ReplyCode.GENERAL_FAILURE)
        await refused.close()
        assert "max_associations_per_client" in (await record_of(server, refused)).error
        await first.close()
        await record_of(server, first)
        third = await associate(server)
        await second.close()
        await third.close()


async def test_flood_for_dead_associations_is_dropped_and_bounded(engine: str) -> None:
    """A flood of datagrams naming no live association (random IDs, then the ID of an ended
    association) is dropped and counted within a bounded time; a live association keeps
    working throughout (bounded: 5000 datagrams, 30 seconds)."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        dead = await associate(server)
        await dead.close()
        await record_of(server, dead)
        live = await associate(server)
        await live.send_udp(datagram(live.aid, *echo.address, b"before"))
        assert parse(await live.recv_udp())[1] == b"before"
        assert server.udp is not None
        before = server.udp.engine.drops()[UdpDrop.UNKNOWN_ASSOCIATION]
        sent = 0
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            for i in range(5000):
                aid = dead.aid if i % 2 else os.urandom(8)
                with contextlib.suppress(BlockingIOError):
                    flood.sendto(datagram(aid, *echo.address, b"x" * 32), live.udp_port)
                    sent += 1
                if i % 20 == 0:
                    await asyncio.sleep(0)  # the Python engine shares this loop
                assert time.monotonic() - started < 30
        await live.send_udp(datagram(live.aid, *echo.address, b"after"))
        assert parse(await live.recv_udp())[1] == b"after"
        # Counted by the engine: most of them (the kernel may drop some before it reads them,
        # on a loaded machine; those it never sees).
        async with asyncio.timeout(2 * TIMEOUT):
            while server.udp.engine.drops()[UdpDrop.UNKNOWN_ASSOCIATION] - before < sent // 4:
                await asyncio.sleep(0.05)
        assert [data for data, _ in echo.seen] == [b"before", b"after"]
        await live.close()


@pytest.mark.conformance("UDP-07")
async def test_no_descriptor_leaks(engine: str, tmp_path: Path) -> None:
    """Nothing leaks (UDP-07): after associations over UDP, TCP and TLS, SOCKS 5, refusals,
    timeouts and a server shutdown with associations still live, the process has as many
    descriptors open as before the server started."""
    certs = make_certificates(tmp_path)
    server_table = {
        "tls_listen": ["127.0.0.1:0"],
        "tls_certificate": str(certs.cert),
        "tls_key": str(certs.key),
    }
    context = ssl.create_default_context(cafile=str(certs.ca))
    async with Echo("127.0.0.1") as echo:
        before = open_fds()
        async with udp_server(server=server_table, udp={"first_datagram_timeout": 0.5}) as server:
            for _ in range(3):
                association = await associate(server)
                await association.send_udp(datagram(association.aid, *echo.address, b"u"))
                assert parse(await association.recv_udp())[1] == b"u"
                await association.close()
                tls = await associate(
                    server, proxy=server.tls_addresses[0], ssl=context, server_hostname="localhost"
                )
                await tls.client.send(datagram(tls.aid, *echo.address, b"t"))
                await tls.message()
                await tls.message()
                await tls.close()
                parity = PortParityOption(StackLeg.PROXY_REMOTE, Parity.EVEN, True)
                reserved = await associate(server, parity)
                await reserved.close()
                timed_out = await associate(server)
                assert await timed_out.client.read_until_eof() == b""
                await timed_out.close()
                await asyncio.to_thread(_pysocks_exchange, server.addresses[0], echo.address, [b"5"])
            still_live = [await associate(server), await associate(server, parity)]
            await asyncio.sleep(0.1)
        for association in still_live:
            assert await association.client.read_until_eof() == b""  # ended by the shutdown
            await association.close()
        assert open_fds() == before


# --- Stack options on the UDP leg, Port Parity ----------------------------------------


# Linux values (include/uapi/linux/in.h); Python 3.11's socket module lacks the first two.
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IP_RECVTOS = getattr(socket, "IP_RECVTOS", 13)


def _receive_with_ttl_tos(sock: socket.socket) -> tuple[bytes, int | None, int | None]:
    """One datagram and the TTL / hop limit and TOS / traffic class it arrived with."""
    data, ancdata, _flags, _address = sock.recvmsg(65535, 256)
    ttl = tos = None
    for level, kind, cdata in ancdata:
        value = int.from_bytes(cdata[:4], sys.byteorder) if len(cdata) >= 4 else cdata[0]
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TTL), (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)):
            ttl = value
        elif (level, kind) in ((socket.IPPROTO_IP, socket.IP_TOS), (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)):
            tos = cdata[0] if level == socket.IPPROTO_IP else value
    return data, ttl, tos


@pytest.mark.conformance("STK-01", "STK-03")
@pytest.mark.parametrize("host", HOSTS)
async def test_udp_leg_stack_options_applied_and_echoed(engine: str, host: str) -> None:
    """The Stack options of a UDP ASSOCIATE "refer to the UDP traffic relayed by the proxy":
    TTL / hop limit, TOS / traffic class and Don't Fragment are set on the remote-facing
    socket, the remote host sees them on the datagrams, and the reply echoes the values the
    kernel reports (STK-01, D9)."""
    v6 = ":" in host
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as remote:
        remote.bind((host, 0))
        if v6:
            remote.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            remote.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
        else:
            remote.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            remote.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
        remote.settimeout(TIMEOUT)
        options = (
            TTLOption(StackLeg.PROXY_REMOTE, 9),
            IPTOSOption(StackLeg.PROXY_REMOTE, 0x20),
            NoFragmentationOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
        )
        async with udp_server() as server:
            proxy = next(a for a in server.addresses if (":" in a[0]) == v6)
            association = await associate(server, *options, host="::" if v6 else "0.0.0.0", proxy=proxy)
            assert set(association.reply.options) == set(options)
            await association.send_udp(datagram(association.aid, *remote.getsockname()[:2], b"marked"))
            data, ttl, tos = await asyncio.to_thread(_receive_with_ttl_tos, remote)
            assert (data, ttl, tos) == (b"marked", 9, 0x20)
            await association.close()


@pytest.mark.conformance("STK-08")
async def test_port_parity_and_reservation(engine: str) -> None:
    """STK-08: Port Parity with port 0: the bound port has the parity asked for and its
    counterpart is reserved (held: nobody else can bind it) until the association ends; a
    request naming the reserved port from the same session takes it over; from outside the
    session it is refused; with a named port the parity is ignored and echoed as none."""
    async with udp_server() as server:
        for parity in (Parity.EVEN, Parity.ODD):
            option = PortParityOption(StackLeg.PROXY_REMOTE, parity, True)
            association = await associate(server, option, SessionRequest())
            port = association.reply.port
            assert port % 2 == (0 if parity == Parity.EVEN else 1)
            assert PortParityOption(StackLeg.PROXY_REMOTE, parity, True) in association.reply.options
            counterpart = port + 1 if parity == Parity.EVEN else port - 1
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, pytest.raises(OSError):
                probe.bind(("127.0.0.1", counterpart))
            [session] = [o.session_id for o in association.reply.options if isinstance(o, SessionID)]
            outsider = await associate(server, port=counterpart, expect=ReplyCode.GENERAL_FAILURE)
            await outsider.close()
            assert "reserved" in (await record_of(server, outsider)).error
            member = await associate(server, SessionID(session), port=counterpart)
            assert member.reply.port == counterpart
            await member.close()
            await record_of(server, member)
            # Taken over and ended: free now.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", counterpart))
            await association.close()
        # A reservation nobody claimed ends with its association.
        association = await associate(server, PortParityOption(StackLeg.PROXY_REMOTE, Parity.EVEN, True))
        counterpart = association.reply.port + 1
        await association.close()
        await record_of(server, association)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", counterpart))
        # A named port: the parity is ignored.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        if free % 2:
            option = PortParityOption(StackLeg.PROXY_REMOTE, Parity.EVEN, True)
        else:
            option = PortParityOption(StackLeg.PROXY_REMOTE, Parity.ODD, True)
        named = await associate(server, option, host="127.0.0.1", port=free)
        assert named.reply.port == free
        assert PortParityOption(StackLeg.PROXY_REMOTE, Parity.NONE, False) in named.reply.options
        await named.close()


# --- ICMP errors (UDP-09) and multicast (UDP-08), for real, in a network namespace ---------


def run_icmp_scenarios(engine: str) -> None:
    """Entry point inside the namespace (tests/test_udp_engine.py's ICMP_SETUP topology)."""
    if engine == "python":
        server_udp.UdpEngine = UdpEnginePy  # type: ignore[misc]
        server_udp.UDP_PATH = "python"  # type: ignore[misc]
    print(json.dumps(asyncio.run(asyncio.wait_for(_icmp_scenarios(), 60))))


async def _icmp_scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    config = make_config(server={"listen": ["10.77.0.1:0", "[fd77::1]:0", "127.0.0.1:0"]})
    async with running_server(config) as server:
        for name, dest, ttl, size, opt_in, over in (
            ("tcp4", "10.78.1.1", 64, 16, True, "tcp"),
            ("host4", "10.78.1.1", 64, 16, True, "udp"),
            ("net4", "10.78.2.1", 64, 16, True, "udp"),
            ("ttl4", "10.78.3.1", 1, 16, True, "udp"),
            ("net6", "fd78:1::1", 64, 16, True, "udp"),
            ("ttl6", "fd78:3::1", 1, 16, True, "udp"),
            ("big6", "fd78:4::1", 64, 1400, True, "udp"),
            ("quiet4", "10.78.1.1", 64, 16, False, "udp"),
            # The client reached 127.0.0.1: its datagrams still leave through the veth, in
            # either family (the remote socket is the dual-stack wildcard, not 127.0.0.1).
            ("loop4", "10.78.1.1", 64, 16, True, "udp-loopback"),
            ("loop6", "fd78:1::1", 64, 16, True, "udp-loopback"),
        ):
            v6 = ":" in dest
            if over == "udp-loopback":
                over, proxy = "udp", next(a for a in server.addresses if a[0] == "127.0.0.1")
            else:
                proxy = next(a for a in server.addresses if (":" in a[0]) == v6 and a[0] != "127.0.0.1")
            options: list[Option] = [TTLOption(StackLeg.PROXY_REMOTE, ttl)]
            if opt_in:
                options.append(UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED))
            host = "::" if ":" in proxy[0] else "0.0.0.0"
            association = await associate(server, *options, host=host, proxy=proxy)
            got: dict[str, Any] = {"echo": sorted(type(o).__name__ for o in association.reply.options)}
            got["bound"] = association.reply.address
            message = datagram(association.aid, dest, 4321, b"p" * size)
            if over == "udp":
                await association.send_udp(message)
            else:
                await association.client.send(message)
            assert await association.message() == AssociationConfirmation(association.aid)
            got["reported"] = None
            # An ICMP error is a datagram too: one in a full-suite CI run never arrived (or was
            # rate-limited by the kernel) although 20 runs alone all passed; an opted-in
            # client gets up to three sends, each answered within 2 s. Without the opt-in one
            # send and a 1 s wait: nothing may come.
            for attempt in range(3 if opt_in else 1):
                if attempt:
                    if over == "udp":
                        await association.send_udp(message)
                    else:
                        await association.client.send(message)
                try:
                    if over == "udp":
                        error, _ = codec.decode_association_message(
                            await association.recv_udp(2.0 if opt_in else 1.0)
                        )
                    else:
                        error = await association.message(2.0)
                except TimeoutError:
                    continue
                assert isinstance(error, DatagramError)
                got["reported"] = [error.address, error.port, error.reporter_address, int(error.error_code)]
                break
            await association.close()
            record = await record_of(server, association)
            got["icmp"] = record.icmp_errors
            out[name] = got
    return out


def _in_namespace(setup: str, call: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(socks6fast.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
        ),
    )
    script = setup + f'"{sys.executable}" -P -c "import test_udp_server as t; t.{call}"\nrc=$?\n'
    script += 'test -n "$ROUTER" && kill $ROUTER\nexit $rc\n'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.conformance("UDP-09")
def test_icmp_errors_reach_opted_in_clients(engine: str) -> None:
    """UDP-09, D17 through the server: a client that sent the UDP Error option (echoed as
    "will be performed") gets real ICMP errors from a router namespace as Datagram Error
    messages on its mapped channel (plain UDP, or the TCP connection): host and net
    unreachable, TTL expired (the TTL of 1 is the client's own TTL option on the UDP leg),
    IPv6 too big, naming the destination and the reporter. Without the option nothing."""
    if not _netns_available():
        pytest.skip("needs unshare -n with veth pairs (root or user namespaces), nsenter and iproute2")
    seen = _in_namespace(ICMP_SETUP, f"run_icmp_scenarios({engine!r})")
    assert seen["host4"]["reported"] == ["10.78.1.1", 4321, "10.77.0.2", DatagramErrorCode.HOST_UNREACHABLE]
    assert seen["tcp4"]["reported"] == ["10.78.1.1", 4321, "10.77.0.2", DatagramErrorCode.HOST_UNREACHABLE]
    assert seen["net4"]["reported"] == ["10.78.2.1", 4321, "10.77.0.2", DatagramErrorCode.NETWORK_UNREACHABLE]
    assert seen["ttl4"]["reported"] == ["10.78.3.1", 4321, "10.77.0.2", DatagramErrorCode.TTL_EXPIRED]
    assert seen["net6"]["reported"] == ["fd78:1::1", 4321, "fd77::2", DatagramErrorCode.NETWORK_UNREACHABLE]
    assert seen["ttl6"]["reported"] == ["fd78:3::1", 4321, "fd77::2", DatagramErrorCode.TTL_EXPIRED]
    assert seen["big6"]["reported"] == ["fd78:4::1", 4321, "fd77::2", DatagramErrorCode.DATAGRAM_TOO_BIG]
    for name in ("host4", "tcp4", "net4", "ttl4", "net6", "ttl6", "big6"):
        assert seen[name]["icmp"] == 1, name
        assert seen[name]["echo"] == ["TTLOption", "UDPErrorOption"], name
    assert seen["quiet4"] == {"echo": ["TTLOption"], "reported": None, "icmp": 0, "bound": "10.77.0.1"}
    # The request named no address and the client reached 127.0.0.1: the reply names that
    # address, yet the datagrams left through the veth to either family (they drew ICMP
    # errors from the router), which a socket bound to 127.0.0.1 could never send.
    assert seen["loop4"]["reported"] == ["10.78.1.1", 4321, "10.77.0.2", DatagramErrorCode.HOST_UNREACHABLE]
    assert seen["loop6"]["reported"] == ["fd78:1::1", 4321, "fd77::2", DatagramErrorCode.NETWORK_UNREACHABLE]
    assert seen["loop4"]["bound"] == seen["loop6"]["bound"] == "127.0.0.1"


MULTICAST_SETUP = """
set -e
ip link set lo up
ip link set lo multicast on
ip route add 224.0.0.0/4 dev lo
ROUTER=
"""
MULTICAST_GROUP = "239.1.2.3"


def run_multicast_scenarios(engine: str) -> None:
    """Entry point inside a namespace whose loopback carries multicast (MULTICAST_SETUP)."""
    if engine == "python":
        server_udp.UdpEngine = UdpEnginePy  # type: ignore[misc]
        server_udp.UDP_PATH = "python"  # type: ignore[misc]
    print(json.dumps(asyncio.run(asyncio.wait_for(_multicast_scenarios(), 60))))


async def _multicast_scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as member:
        member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        member.bind(("0.0.0.0", 0))
        group = socket.inet_aton(MULTICAST_GROUP) + socket.inet_aton("127.0.0.1")
        member.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
        member.setblocking(False)
        port = member.getsockname()[1]
        async with running_server(make_config()) as server:
            association = await associate(server)
            await association.send_udp(datagram(association.aid, MULTICAST_GROUP, port, b"to the group"))
            data, source = await asyncio.wait_for(loop.sock_recvfrom(member, 65535), TIMEOUT)
            out["member_got"] = [data.decode(), source[1] == association.reply.port]
            await association.close()
            out["datagrams_up"] = (await record_of(server, association)).datagrams_up
            client = await RawClient.connect(server.addresses[0])
            request = Request(Command.CONNECT, AddressType.IPV4, MULTICAST_GROUP, port)
            await client.send(codec.encode_request(request))
            assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
            out["connect_reply"] = int((await client.operation_reply()).reply_code)
            await client.close()
    return out


@pytest.mark.conformance("UDP-08")
def test_multicast_for_udp_only(engine: str) -> None:
    """UDP-08: "The use of multicast addresses is permitted for UDP traffic only": inside a
    namespace whose loopback carries multicast, a datagram to a group reaches a member (from
    the association's remote-facing socket), while a CONNECT to the same group is refused."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare -n and iproute2")
    probe = subprocess.run(["unshare", "-n", "sh", "-c", MULTICAST_SETUP], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(
            f"this kernel will not route multicast on loopback in a namespace: {probe.stderr[-200:]!r}"
        )
    seen = _in_namespace(MULTICAST_SETUP, f"run_multicast_scenarios({engine!r})")
    assert seen == {
        "member_got": ["to the group", True],
        "datagrams_up": 1,
        "connect_reply": ReplyCode.NOT_ALLOWED_BY_RULESET,
    }


async def test_readme_raw_client_example(engine: str) -> None:
    """examples/udp_associate_raw.py (the README's raw-client example) works against the
    server: over plain UDP and over the TCP connection."""
    script = Path(__file__).resolve().parent.parent / "examples" / "udp_associate_raw.py"
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        proxy = server.addresses[0]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            proxy[0],
            str(proxy[1]),
            *map(str, echo.address),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        assert f"over UDP from 127.0.0.1 {echo.address[1]} b'hello over UDP'" in out.decode()
        assert f"over TCP from 127.0.0.1 {echo.address[1]} b'hello over TCP'" in out.decode()


async def test_reload_keeps_associations_and_applies_limits(engine: str) -> None:
    """SIGHUP (``Server.reload``): live associations keep relaying, the new per-client limit
    applies at once, and nothing is opened or left behind by the reload."""
    async with udp_server() as server, Echo("127.0.0.1") as echo:
        live = await associate(server)
        await live.send_udp(datagram(live.aid, *echo.address, b"before"))
        assert parse(await live.recv_udp())[1] == b"before"
        before = open_fds()
        server.reload(make_config(ipv6=has_ipv6_loopback(), udp={"max_associations_per_client": 1}))
        assert open_fds() == before
        await live.send_udp(datagram(live.aid, *echo.address, b"after"))
        assert parse(await live.recv_udp())[1] == b"after"
        refused = await associate(server, expect=ReplyCode.GENERAL_FAILURE)
        await refused.close()
        await live.close()


async def test_udp_port_taken_by_a_reuseport_group_is_refused(engine: str) -> None:
    """D16: a configured ``[udp] port`` already bound by another SO_REUSEPORT group (another
    proxy of the same user) is not joined silently: start-up fails naming it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"UDP 127.0.0.1:{port}"):
            async with udp_server(udp={"port": port}):
                pass


def test_on_uvloop_plain_and_tls(engine: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``socks6fast serve`` runs on uvloop: UDP ASSOCIATE over plain TCP (with plain UDP
    datagrams) and over TLS (the socket-pair bridge) work there too, and ending a TLS
    association logs no asyncio warning."""
    certs = make_certificates(tmp_path)
    server_table = {
        "tls_listen": ["127.0.0.1:0"],
        "tls_certificate": str(certs.cert),
        "tls_key": str(certs.key),
    }
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(TIMEOUT)

    def serve_echo() -> None:
        with contextlib.suppress(OSError):
            for _ in range(20):
                data, address = echo.recvfrom(65535)
                echo.sendto(data, address)

    async def scenario() -> list[ConnectionRecord]:
        async with udp_server(server=server_table) as server:
            target = echo.getsockname()
            plain = await associate(server)
            for n in range(3):
                plain.udp.sendto(datagram(plain.aid, *target, b"u%d" % n), plain.udp_port)
                data = await asyncio.get_running_loop().sock_recv(plain.udp, 65535)
                assert parse(data)[1] == b"u%d" % n
            context = ssl.create_default_context(cafile=str(certs.ca))
            tls = await associate(
                server, proxy=server.tls_addresses[0], ssl=context, server_hostname="localhost"
            )
            await tls.client.send(datagram(tls.aid, *target, b"t"))
            assert await tls.message() == AssociationConfirmation(tls.aid)
            message = await tls.message()
            assert isinstance(message, Datagram) and message.payload == b"t"
            await plain.close()
            await tls.close()
            return [await record_of(server, plain), await record_of(server, tls)]

    thread = threading.Thread(target=serve_echo, daemon=True)
    thread.start()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            records = runner.run(asyncio.wait_for(scenario(), 30))
    finally:
        echo.close()
    assert [(r.listener, r.udp_channel, r.relay_path) for r in records] == [
        ("tcp", "udp", engine),
        ("tls", "tcp", engine),
    ]
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]


def test_association_families() -> None:
    """D20: a name is resolved to an address the association's remote socket can reach: an
    IPv6 socket bound to ::1 cannot send IPv4, a dual-stack wildcard one can."""
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as loopback6,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as wildcard6,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four,
    ):
        loopback6.bind(("::1", 0))
        wildcard6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        wildcard6.bind(("::", 0))
        four.bind(("127.0.0.1", 0))
        assert server_udp.AssociationSockets([loopback6]).families == {6}
        assert server_udp.AssociationSockets([wildcard6]).families == {4, 6}
        assert server_udp.AssociationSockets([four]).families == {4}


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_name_resolved_to_the_family_the_association_can_reach(engine: str) -> None:
    """D20: an association whose request named ::1 as its bind address (so its socket speaks
    IPv6 only) sends to a name that resolves to 127.0.0.1 first and ::1 second: the proxy
    picks ::1, the address its socket can reach."""
    resolver = fake_resolver({"both.test": ["127.0.0.1", "::1"]})
    async with udp_server(resolver=resolver) as server, Echo("::1") as echo:
        proxy = next(a for a in server.addresses if ":" in a[0])
        association = await associate(server, host="::1", proxy=proxy)
        assert association.reply.address == "::1"
        header = None
        for _ in range(20):  # the first datagram waits for the name (held, D24); a resend is harmless
            await association.send_udp(datagram(association.aid, "both.test", echo.address[1], b"six"))
            with contextlib.suppress(TimeoutError):
                header, payload = parse(await association.recv_udp(0.2))
                break
        assert header is not None and payload == b"six"
        assert (header.address_type, header.address) == (AddressType.IPV6, "::1")
        await association.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_socks5_udp_over_ipv6(engine: str) -> None:
    """D19 over IPv6: the client-facing socket is on the address the TCP connection arrived
    at (::1), BND names it with ATYP 4, and the RFC 1928 header carries IPv6 addresses."""
    async with udp_server() as server, Echo("::1") as echo:
        proxy = next(a for a in server.addresses if ":" in a[0])
        client = await RawClient.connect(proxy)
        await client.send(b"\x05\x01\x00" + b"\x05\x03\x00\x04" + bytes(16) + b"\x00\x00")
        assert await client.read_exactly(2) == b"\x05\x00"
        reply = await client.read_exactly(22)
        assert reply[:4] == b"\x05\x00\x00\x04", reply
        relay = (socket.inet_ntop(socket.AF_INET6, reply[4:20]), struct.unpack(">H", reply[20:22])[0])
        assert relay[0] == "::1"
        header = (
            b"\x00\x00\x00\x04"
            + socket.inet_pton(socket.AF_INET6, "::1")
            + struct.pack(">H", echo.address[1])
        )
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            await loop.sock_sendto(udp, header + b"v6", relay)
            data = await asyncio.wait_for(loop.sock_recv(udp, 65535), TIMEOUT)
        assert data == header + b"v6"
        await client.close()


class _RefusingEngine:
    """Wraps the server's engine; ``add`` fails as a refused socket option would."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def add(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(1, "Operation not permitted")


async def test_data_plane_refusal_gets_general_failure(engine: str) -> None:
    """When the UDP data plane cannot take an association after all, the client gets General
    Failure (SOCKS 6: after the Authentication Reply; SOCKS 5: RFC 1928 REP 0x01) instead of
    the success reply, the log says why, and nothing is left open."""
    async with udp_server() as server:
        assert server.udp is not None
        real = server.udp.engine
        server.udp.engine = _RefusingEngine(real)
        before = open_fds()
        try:
            refused = await associate(server, expect=ReplyCode.GENERAL_FAILURE)
            assert await refused.client.read_until_eof() == b""
            await refused.close()
            record = await record_of(server, refused)
            assert record.reply_code == ReplyCode.GENERAL_FAILURE
            assert "the UDP data plane refused the association" in record.error
            client = await RawClient.connect(server.addresses[0])
            await client.send(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(6))
            assert await client.read_exactly(2) == b"\x05\x00"
            assert (await client.read_exactly(10))[:2] == b"\x05\x01"
            assert await client.read_until_eof() == b""
            await client.close()
            await record_for(server, client)
        finally:
            server.udp.engine = real
        assert open_fds() == before


@pytest.mark.conformance("CMD-06")
async def test_socks5_same_users_and_rules(engine: str) -> None:
    """D19: SOCKS 5 UDP ASSOCIATE goes through the same users and rules: RFC 1929 login
    first; a user the ``udp_associate`` rules deny gets REP 0x02; for an allowed user, a
    destination rule drops that destination's datagrams and relays the others."""
    rules = [
        {"action": "deny", "commands": ["udp_associate"], "users": ["bob"]},
        {"action": "deny", "commands": ["udp_associate"], "ports": [9]},
    ]
    users = {"alice": "wonderland", "bob": "builder"}
    async with udp_server(rules=rules, users=users) as server, Echo("127.0.0.1") as echo:

        async def login(name: str, password: str) -> RawClient:
            client = await RawClient.connect(server.addresses[0])
            await client.send(b"\x05\x01\x02")
            assert await client.read_exactly(2) == b"\x05\x02"
            await client.send(
                b"\x01" + bytes([len(name)]) + name.encode() + bytes([len(password)]) + password.encode()
            )
            assert await client.read_exactly(2) == b"\x01\x00"
            return client

        bob = await login("bob", "builder")
        await bob.send(b"\x05\x03\x00\x01" + bytes(6))
        assert (await bob.read_exactly(10))[:2] == b"\x05\x02"
        await bob.close()
        alice = await login("alice", "wonderland")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            udp.setblocking(False)
            await alice.send(b"\x05\x03\x00\x01" + bytes(4) + struct.pack(">H", udp.getsockname()[1]))
            reply = await alice.read_exactly(10)
            assert reply[:2] == b"\x05\x00"
            relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0])
            loop = asyncio.get_running_loop()
            received = b""
            for _ in range(20):  # the first datagram waits for the rules (held, D24)
                await loop.sock_sendto(udp, Socks5Udp.header("127.0.0.1", 9) + b"denied", relay)
                await loop.sock_sendto(udp, Socks5Udp.header(*echo.address) + b"allowed", relay)
                with contextlib.suppress(TimeoutError):
                    received = await asyncio.wait_for(loop.sock_recv(udp, 65535), 0.2)
                    break
            assert received == Socks5Udp.header(*echo.address) + b"allowed"
        await alice.close()
        record = await record_for(server, alice)
        assert (record.user, record.protocol) == ("alice", "socks5") and record.udp_drops >= 1
        assert all(data != b"denied" for data, _ in echo.seen)
