"""The UDP data plane (socks6fast.dataplane.udp): the native engine and its Python twin.

Every test runs on both paths ("mmsg" = ``_udp_c.UdpEngine``, C worker threads with
recvmmsg/sendmmsg; "python" = ``_udp_py.UdpEngine`` on the event loop). The endpoints
are real sockets on 127.0.0.1 and ::1: a client with a raw UDP socket and a TCP
connection (its datagrams built with the codec), a UDP echo server as the remote
host, and the engine in between with its client-facing port and remote socket::

    client UDP/TCP --> [port | TCP] engine [remote socket] --> echo server

ICMP errors are produced for real inside a private network namespace (``unshare -n``,
a veth pair to a router namespace with unreachable routes and a small MTU).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers_udp import LOOPBACK_HOSTS, has_ipv6_loopback

import socks6fast
from socks6fast.constants import AddressType, DatagramErrorCode, RelayEnd, UdpDrop
from socks6fast.dataplane import udp
from socks6fast.dataplane.udp import (
    UDP_ENGINE_AVAILABLE,
    UdpAsk,
    UdpConfirmed,
    UdpEnded,
    UdpEnginePy,
    UdpEvent,
    UdpResolve,
    open_udp_port,
)
from socks6fast.dataplane.udp_types import icmp_error_code
from socks6fast.proto.codec import (
    decode_association_message,
    decode_datagram_header,
    encode_association_message,
    encode_datagram_header,
)
from socks6fast.proto.messages import AssociationConfirmation, AssociationInit, DatagramError, DatagramHeader
from socks6fast.proto.socks5 import Socks5UDPHeader, decode_udp_header, encode_udp_header

TIMEOUT = 5.0
T = TypeVar("T")
QUIET = 0.3  # seconds of silence that stand for "nothing arrives"

native_only = [
    pytest.mark.linux_only,
    pytest.mark.c_extension,
    pytest.mark.skipif(not UDP_ENGINE_AVAILABLE, reason="native UDP engine not available"),
]


HOSTS = LOOPBACK_HOSTS


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(params=[pytest.param("mmsg", marks=native_only), pytest.param("python")])
def path(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def make_engine(path: str, **kwargs: Any) -> Any:
    if path == "mmsg":
        assert udp.UdpEngineC is not None
        return udp.UdpEngineC(workers=kwargs.pop("workers", 2), **kwargs)
    return UdpEnginePy(loop=asyncio.get_running_loop(), **kwargs)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def atyp_of(host: str) -> AddressType:
    return AddressType.IPV6 if ":" in host else AddressType.IPV4


def udp_socket(host: str) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def tcp_pair(host: str) -> tuple[socket.socket, socket.socket]:
    with socket.create_server((host, 0), family=family_of(host)) as listener:
        a = socket.create_connection(listener.getsockname()[:2])
        b, _ = listener.accept()
    a.setblocking(False)
    return a, b


def dgram(
    aid: bytes,
    host: str,
    port: int,
    payload: bytes,
    *,
    atyp: AddressType | None = None,
    message_length: int | None = None,
    padding: bytes = b"",
) -> bytes:
    """A SOCKS 6 Datagram message built with the codec (the client's side)."""
    atyp = atyp or atyp_of(host)
    probe = DatagramHeader(aid, atyp, host, port, 0xFFFF)
    buf = bytearray(300)
    hlen = encode_datagram_header(probe, buf)
    length = hlen + len(payload) if message_length is None else message_length
    encode_datagram_header(DatagramHeader(aid, atyp, host, port, length), buf)
    return bytes(buf[:hlen]) + payload + padding


def parse(data: bytes) -> tuple[DatagramHeader, bytes]:
    header, hlen = decode_datagram_header(data)
    return header, data[hlen : header.message_length]


def port_of(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        port: int = sock.getsockname()[1]
    return port


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def recv(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, Any]:
    """One datagram from a non-blocking socket (add_reader: uvloop has no sock_recvfrom)."""
    return (await read_until(sock, lambda: sock.recvfrom(70000), lambda out: len(out) >= 1, timeout))[0]


async def silent(sock: socket.socket, quiet: float = QUIET) -> bool:
    """True when nothing arrives on sock for ``quiet`` seconds."""
    try:
        await recv(sock, quiet)
    except TimeoutError:
        return True
    return False


async def recv_exactly(sock: socket.socket, n: int, timeout: float = TIMEOUT) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), timeout)
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


async def read_message(sock: socket.socket) -> Any:
    """One UDP association message from the TCP connection (the client's side)."""
    head = await recv_exactly(sock, 4)
    length = struct.unpack("!H", head[2:])[0]
    data = head + await recv_exactly(sock, length - 4)
    message, used = decode_association_message(data)
    assert used == len(data)
    return message


class Echo:
    """A UDP echo server on the event loop; remembers who sent what."""

    def __init__(self, host: str, prefix: bytes = b"") -> None:
        self.sock = udp_socket(host)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.prefix = prefix
        self.seen: list[tuple[bytes, Any]] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(70000)
            except (BlockingIOError, InterruptedError):
                return
            self.seen.append((data, peer))
            try:
                self.sock.sendto(self.prefix + data, peer)
            except OSError:
                pass

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass
class Assoc:
    """One association as the client sees it."""

    aid: bytes
    tcp: socket.socket  # the client's end of the TCP connection
    client: socket.socket  # the client's UDP socket
    remote_address: tuple[str, int]  # the proxy's remote-facing socket
    closing: list[socket.socket] = field(default_factory=list)


class Harness:
    """An engine with one client-facing port, echo servers, and associations."""

    def __init__(self, engine: Any, host: str) -> None:
        self.engine = engine
        self.host = host
        self.events: list[UdpEvent] = []
        self.echo = Echo(host)
        self.port_address = ("", 0)
        self.assocs: list[Assoc] = []

    def open_port(self, host: str | None = None) -> None:
        fds = open_udp_port(host or self.host, 0, self.engine.workers)
        port = port_of(fds[0])
        try:
            self.engine.add_port(fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.port_address = (self.host, port)

    def add(
        self,
        *,
        socks5: bool = False,
        aid: bytes | None = None,
        sndbuf: int = 0,
        remote: socket.socket | None = None,
        **kwargs: Any,
    ) -> Assoc:
        aid = aid or os.urandom(8)
        client_tcp, proxy_tcp = tcp_pair(self.host)
        if sndbuf:
            proxy_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            client_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        remote = remote or udp_socket(self.host)
        remote_address = remote.getsockname()[:2]
        client = udp_socket(self.host)
        extra: dict[str, Any] = {}
        closing = [client_tcp, client]
        if socks5:
            s5 = udp_socket(self.host)
            self.s5_address = s5.getsockname()[:2]
            extra["socks5_fd"] = s5.detach()
        self.engine.add(aid, proxy_tcp.detach(), [remote.detach()], **extra, **kwargs)
        assoc = Assoc(aid, client_tcp, client, remote_address, closing)
        self.assocs.append(assoc)
        return assoc

    def drain(self) -> list[UdpEvent]:
        self.events += self.engine.drain()
        return self.events

    async def event(self, kind: type[Any], aid: bytes | None = None) -> Any:
        def find() -> Any:
            return next(
                (e for e in self.drain() if isinstance(e, kind) and (aid is None or e.association_id == aid)),
                None,
            )

        await until(lambda: find() is not None, f"a {kind.__name__} event")
        return find()

    async def drops(self, reason: UdpDrop, at_least: int) -> None:
        await until(lambda: self.engine.drops()[reason] >= at_least, f"{at_least} {reason.name} drop(s)")

    async def echo_through(self, a: Assoc, payload: bytes, *, target: tuple[str, int] | None = None) -> bytes:
        """Send payload to the echo server through the port; return what came back."""
        host, port = target or self.echo.address
        a.client.sendto(dgram(a.aid, host, port, payload), self.port_address)
        data, peer = await recv(a.client)
        assert peer[:2] == self.port_address
        header, body = parse(data)
        assert header.association_id == a.aid
        assert (header.address, header.port) == (host, port)  # UDP-04: names the source
        return body

    def close(self) -> None:
        self.engine.close()
        for a in self.assocs:
            for sock in a.closing:
                sock.close()
        self.echo.close()


@pytest.fixture
async def harness(path: str, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    host = getattr(request, "param", "127.0.0.1")
    h = Harness(make_engine(path), host)
    h.open_port()
    try:
        yield h
    finally:
        h.close()


# -- the shared definitions ------------------------------------------------------------


@pytest.mark.parametrize("module", [pytest.param("_udp_c", marks=native_only)])
def test_native_constants_match(module: str) -> None:
    """The engine's C enums agree with constants.UdpDrop and RelayEnd (one definition)."""
    from socks6fast.dataplane import _udp_c  # noqa: PLC0415 (only where it is built)

    assert _udp_c._DROP_MEMBERS == tuple(UdpDrop)  # type: ignore[attr-defined]
    assert _udp_c._END_MEMBERS == tuple(RelayEnd)  # type: ignore[attr-defined]


def test_selector_picks_the_native_engine_when_built() -> None:
    assert udp.UDP_PATH == ("mmsg" if UDP_ENGINE_AVAILABLE else "python")
    if UDP_ENGINE_AVAILABLE:
        assert udp.UdpEngine is udp.UdpEngineC
    else:
        assert udp.UdpEngine is UdpEnginePy


def test_icmp_table() -> None:
    """The design card's ICMP -> Datagram Error code table; port unreachable is not reported."""
    assert icmp_error_code(False, 3, 0) is DatagramErrorCode.NETWORK_UNREACHABLE
    assert icmp_error_code(False, 3, 1) is DatagramErrorCode.HOST_UNREACHABLE
    assert icmp_error_code(False, 3, 3) is None  # port unreachable
    assert icmp_error_code(False, 3, 13) is None  # administratively prohibited
    assert icmp_error_code(False, 11, 0) is DatagramErrorCode.TTL_EXPIRED
    assert icmp_error_code(True, 1, 0) is DatagramErrorCode.NETWORK_UNREACHABLE
    assert icmp_error_code(True, 1, 3) is DatagramErrorCode.HOST_UNREACHABLE
    assert icmp_error_code(True, 1, 4) is None  # port unreachable
    assert icmp_error_code(True, 3, 0) is DatagramErrorCode.TTL_EXPIRED
    assert icmp_error_code(True, 2, 0) is DatagramErrorCode.DATAGRAM_TOO_BIG


async def test_default_workers_are_half_the_cores(path: str) -> None:
    """D33: ``workers=0`` means half the cores the process may run on, at least one (one per
    core oversubscribed a 2-core machine: more proxy CPU per echo, no more echoes/s)."""
    cpus = sorted(os.sched_getaffinity(0))
    expected = {1: 1, 2: 1, 3: 1, 4: 2}
    saved = set(cpus)
    try:
        for count in sorted(n for n in expected if n <= len(cpus)):
            # Only this thread's mask changes (the engine's threads inherit it); restored below.
            os.sched_setaffinity(0, cpus[:count])
            engine = udp.UdpEngineC() if path == "mmsg" and udp.UdpEngineC is not None else UdpEnginePy()
            try:
                assert engine.workers == expected[count], f"{count} usable cores"
            finally:
                engine.close()
    finally:
        os.sched_setaffinity(0, saved)


# -- relaying and the mapping ------------------------------------------------------------


@pytest.mark.conformance("UDP-04")
@pytest.mark.parametrize("harness", HOSTS, indirect=True)
async def test_relay_both_ways_and_confirmation(harness: Harness) -> None:
    """UDP-04: the first datagram makes the engine send the Association Confirmation on TCP
    (after the bytes of tcp_send, here the Association Initialization); the echo comes back
    with a Datagram Header naming its source; payloads of 0, 64 and 1400 bytes."""
    aid = os.urandom(8)
    init = encode_association_message(AssociationInit(aid))
    a = harness.add(aid=aid, tcp_send=init)
    assert await read_message(a.tcp) == AssociationInit(aid)
    assert await harness.echo_through(a, b"x" * 64) == b"x" * 64
    assert await read_message(a.tcp) == AssociationConfirmation(aid)
    confirmed = await harness.event(UdpConfirmed, aid)
    assert confirmed == UdpConfirmed(aid, False, a.client.getsockname()[:2], False)
    for size in (0, 1, 1400, 8000):
        assert await harness.echo_through(a, bytes(range(256)) * (size // 256) + b"y" * (size % 256)) == (
            bytes(range(256)) * (size // 256) + b"y" * (size % 256)
        )
    # The echo server saw the proxy's remote-facing socket as the source.
    assert {peer[:2] for _data, peer in harness.echo.seen} == {a.remote_address}
    assert await silent(a.tcp)  # one Confirmation only


@pytest.mark.parametrize("harness", HOSTS, indirect=True)
async def test_many_associations_on_every_worker(harness: Harness) -> None:
    """Associations spread over the workers by their ID (the port's BPF steering) all relay."""
    assocs = [harness.add() for _ in range(12)]
    for i, a in enumerate(assocs):
        assert await harness.echo_through(a, b"n%d" % i) == b"n%d" % i


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_dual_stack_remote_socket(harness: Harness) -> None:
    """One AF_INET6 remote socket without IPV6_V6ONLY serves IPv4 and IPv6 destinations;
    IPv4 sources come back as IPv4 addresses (not IPv4-mapped) in the Datagram Header."""
    dual = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 0))
    a = harness.add(remote=dual)
    echo6 = Echo("::1")
    try:
        assert await harness.echo_through(a, b"to v4") == b"to v4"
        assert await harness.echo_through(a, b"to v6", target=echo6.address) == b"to v6"
    finally:
        echo6.close()


@pytest.mark.conformance("UDP-03")
async def test_first_datagram_fixes_the_mapping(harness: Harness) -> None:
    """UDP-03: after the first datagram, the same ID from another 5-tuple or over the TCP
    connection is dropped silently (counted); the association keeps working."""
    a = harness.add()
    assert await harness.echo_through(a, b"first") == b"first"
    intruder = udp_socket(harness.host)
    try:
        intruder.sendto(dgram(a.aid, *harness.echo.address, b"intruder"), harness.port_address)
        await harness.drops(UdpDrop.MAPPING, 1)
        a.tcp.sendall(dgram(a.aid, *harness.echo.address, b"over tcp"))
        await harness.drops(UdpDrop.MAPPING, 2)
        assert await silent(intruder)
        assert [d for d, _ in harness.echo.seen] == [b"first"]
        assert await harness.echo_through(a, b"still") == b"still"
    finally:
        intruder.close()


async def test_wrong_association_id(harness: Harness) -> None:
    """D18: an ID that names no live association is dropped and counted."""
    a = harness.add()
    a.client.sendto(dgram(os.urandom(8), *harness.echo.address, b"nobody"), harness.port_address)
    await harness.drops(UdpDrop.UNKNOWN_ASSOCIATION, 1)
    assert await silent(a.client)
    assert await harness.echo_through(a, b"ok") == b"ok"
    assert harness.echo.seen[0][0] == b"ok"


@pytest.mark.conformance("UDP-05")
async def test_message_length_rules(harness: Harness) -> None:
    """UDP-05: a Message Length larger than the datagram drops it; a smaller one makes the
    rest padding, which is ignored."""
    a = harness.add()
    host, port = harness.echo.address
    too_long = dgram(a.aid, host, port, b"payload", message_length=20 + 7 + 1)
    a.client.sendto(too_long, harness.port_address)
    await harness.drops(UdpDrop.LENGTH, 1)
    assert harness.echo.seen == []
    padded = dgram(a.aid, host, port, b"kept", padding=b"PADDING-IGNORED")
    a.client.sendto(padded, harness.port_address)
    data, _ = await recv(a.client)
    assert parse(data)[1] == b"kept"
    assert [d for d, _ in harness.echo.seen] == [b"kept"]


async def test_truncated_and_malformed_headers(harness: Harness) -> None:
    """Truncated headers, a wrong version or message type, a Message Length below the
    header: each dropped and counted by reason; the association keeps working."""
    a = harness.add()
    good = dgram(a.aid, *harness.echo.address, b"data")
    for cut in (1, 3, 11, 16, 19):
        a.client.sendto(good[:cut], harness.port_address)
    await harness.drops(UdpDrop.TRUNCATED, 5)
    a.client.sendto(b"\x05" + good[1:], harness.port_address)  # version 5
    a.client.sendto(good[:1] + b"\x04" + good[2:], harness.port_address)  # an Error message
    a.client.sendto(good[:2] + struct.pack("!H", 12) + good[4:], harness.port_address)  # ML < header
    await harness.drops(UdpDrop.MALFORMED, 3)
    assert harness.echo.seen == []
    assert await harness.echo_through(a, b"fine") == b"fine"


async def test_unknown_address_type(harness: Harness) -> None:
    a = harness.add()
    bad = bytearray(dgram(a.aid, *harness.echo.address, b"data"))
    bad[12] = 2  # Address Type 2 does not exist
    a.client.sendto(bytes(bad), harness.port_address)
    await harness.drops(UdpDrop.ADDRESS_TYPE, 1)
    assert await harness.echo_through(a, b"fine") == b"fine"


@pytest.mark.conformance("UDP-06")
async def test_server_mode(harness: Harness) -> None:
    """UDP-06: the empty datagram to the all-zero address confirms without relaying; from
    then on any remote source reaches the client. Before it, a remote datagram waits for
    the mapping (dropped, UNCONFIRMED); without it, unknown sources are FILTERED."""
    a = harness.add()
    stranger = udp_socket(harness.host)
    plain = harness.add()
    try:
        stranger.sendto(b"too early", a.remote_address)
        await harness.drops(UdpDrop.UNCONFIRMED, 1)
        a.client.sendto(dgram(a.aid, "0.0.0.0", 0, b"", atyp=AddressType.IPV4), harness.port_address)
        assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
        confirmed = await harness.event(UdpConfirmed, a.aid)
        assert confirmed.server_mode is True
        stranger.sendto(b"hello server", a.remote_address)
        data, _ = await recv(a.client)
        header, body = parse(data)
        assert body == b"hello server"
        assert (header.address, header.port) == stranger.getsockname()[:2]
        assert harness.echo.seen == []  # nothing was relayed for the empty datagram
        # An association not in server mode only hears from where its client sent to.
        assert await harness.echo_through(plain, b"x") == b"x"
        stranger.sendto(b"unsolicited", plain.remote_address)
        await harness.drops(UdpDrop.FILTERED, 1)
        assert await silent(plain.client)
    finally:
        stranger.close()


# -- UDP over TCP ----------------------------------------------------------------------------


@pytest.mark.conformance("UDP-02", "UDP-03")
@pytest.mark.parametrize("harness", HOSTS, indirect=True)
async def test_udp_over_tcp(harness: Harness) -> None:
    """Datagram messages over the TCP connection: split anywhere and packed several per
    write, framed by Message Length; the Confirmation first, then the echoes framed too;
    a plain-UDP datagram for the same ID is then dropped (UDP-03)."""
    loop = asyncio.get_running_loop()
    a = harness.add()
    host, port = harness.echo.address
    one = dgram(a.aid, host, port, b"first")
    for i in range(len(one)):  # one byte at a time
        await loop.sock_sendall(a.tcp, one[i : i + 1])
        await asyncio.sleep(0)
    assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
    confirmed = await harness.event(UdpConfirmed, a.aid)
    assert confirmed.over_tcp is True and confirmed.client is None
    message = await read_message(a.tcp)
    assert message.payload == b"first" and (message.header.address, message.header.port) == (host, port)
    many = b"".join(dgram(a.aid, host, port, b"m%d" % i + bytes(i * 100)) for i in range(10))
    await loop.sock_sendall(a.tcp, many)
    got = [(await read_message(a.tcp)).payload for _ in range(10)]
    assert got == [b"m%d" % i + bytes(i * 100) for i in range(10)]
    a.client.sendto(dgram(a.aid, host, port, b"udp"), harness.port_address)
    await harness.drops(UdpDrop.MAPPING, 1)


async def test_udp_over_tcp_bad_stream_ends_the_association(harness: Harness) -> None:
    """Bytes that cannot be framed (version 5) end the association with ERROR; a client
    Error message (MUST NOT be sent) is skipped by its length and counted."""
    loop = asyncio.get_running_loop()
    a = harness.add()
    error = encode_association_message(
        DatagramError(
            a.aid, AddressType.IPV4, "1.2.3.4", 5, AddressType.IPV4, "5.6.7.8", DatagramErrorCode.TTL_EXPIRED
        )
    )
    await loop.sock_sendall(a.tcp, error + dgram(a.aid, *harness.echo.address, b"after"))
    assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
    assert (await read_message(a.tcp)).payload == b"after"
    await harness.drops(UdpDrop.MALFORMED, 1)
    await loop.sock_sendall(a.tcp, b"\x05\x01\x00\x00")
    ended = await harness.event(UdpEnded, a.aid)
    assert ended.end is RelayEnd.ERROR and "version 6" in ended.cause
    assert await loop.sock_recv(a.tcp, 10) == b""  # the engine closed the connection


async def test_udp_over_tcp_drops_rather_than_buffers(harness: Harness) -> None:
    """When the client does not read its TCP connection, remote datagrams are dropped
    (TCP_BLOCKED) instead of buffered; what does arrive is still whole, framed messages."""
    loop = asyncio.get_running_loop()
    a = harness.add(sndbuf=4096)
    await loop.sock_sendall(a.tcp, dgram(a.aid, "0.0.0.0", 0, b"", atyp=AddressType.IPV4))  # server mode
    await harness.event(UdpConfirmed, a.aid)
    flood = udp_socket(harness.host)
    try:
        payload = b"z" * 1200
        for _ in range(2000):
            flood.sendto(payload, a.remote_address)
            if _ % 100 == 0:
                await asyncio.sleep(0)
        await harness.drops(UdpDrop.TCP_BLOCKED, 1)
        assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
        count = 0
        while True:
            try:
                message = await asyncio.wait_for(read_message(a.tcp), QUIET)
            except TimeoutError:
                break
            assert message.payload == payload
            count += 1
        assert 0 < count < 2000
    finally:
        flood.close()


# -- lifetime ------------------------------------------------------------------------------


@pytest.mark.conformance("UDP-07")
async def test_tcp_close_ends_the_association(harness: Harness) -> None:
    """UDP-07: closing the TCP connection ends the association: its sockets are closed
    (the remote-facing port is free again) and UdpEnded reports the counters."""
    a = harness.add()
    assert await harness.echo_through(a, b"abc") == b"abc"
    assert await read_message(a.tcp) == AssociationConfirmation(a.aid)  # unread, close() would reset
    a.tcp.close()
    ended = await harness.event(UdpEnded, a.aid)
    assert ended.end is RelayEnd.EOF
    assert (ended.datagrams_to_remote, ended.bytes_to_remote) == (1, 3)
    assert (ended.datagrams_to_client, ended.bytes_to_client) == (1, 3)
    rebind = socket.socket(family_of(harness.host), socket.SOCK_DGRAM)
    try:
        rebind.bind(a.remote_address)  # freed
    finally:
        rebind.close()
    a.client.sendto(dgram(a.aid, *harness.echo.address, b"late"), harness.port_address)
    await harness.drops(UdpDrop.UNKNOWN_ASSOCIATION, 1)


@pytest.mark.conformance("UDP-07")
async def test_first_datagram_timeout(path: str) -> None:
    """UDP-07: without a first datagram in time the association ends and the engine closes
    the TCP connection; one that got its datagram stays."""
    loop = asyncio.get_running_loop()
    h = Harness(make_engine(path, first_datagram_timeout=0.3), "127.0.0.1")
    h.open_port()
    try:
        idle = h.add()
        busy = h.add()
        assert await h.echo_through(busy, b"here") == b"here"
        ended = await h.event(UdpEnded, idle.aid)
        assert ended.end is RelayEnd.IDLE_TIMEOUT and "UDP-07" in ended.cause
        assert await asyncio.wait_for(loop.sock_recv(idle.tcp, 10), TIMEOUT) == b""
        await asyncio.sleep(0.4)
        assert await h.echo_through(busy, b"still") == b"still"
        assert not any(isinstance(e, UdpEnded) and e.association_id == busy.aid for e in h.drain())
    finally:
        h.close()


async def test_remove_and_close_end_everything(harness: Harness) -> None:
    a = harness.add()
    b = harness.add()
    harness.engine.remove(a.aid)
    ended = await harness.event(UdpEnded, a.aid)
    assert ended.end is RelayEnd.SHUTDOWN
    harness.engine.remove(os.urandom(8))  # unknown: ignored
    harness.engine.close()
    harness.drain()
    assert any(isinstance(e, UdpEnded) and e.association_id == b.aid for e in harness.events)
    assert harness.engine.active == 0
    with pytest.raises(ValueError, match="closed"):
        harness.engine.add(os.urandom(8), 0, [1])


async def test_teardown_closes_every_fd(path: str) -> None:
    """The engine closes every socket it was given (ports, TCP, remote) and its own fds."""
    before = fd_count()
    h = Harness(make_engine(path), "127.0.0.1")
    h.open_port()
    assocs = [h.add() for _ in range(5)]
    assert await h.echo_through(assocs[0], b"x") == b"x"
    h.engine.remove(assocs[1].aid)
    await h.event(UdpEnded, assocs[1].aid)
    assocs[2].tcp.close()
    await h.event(UdpEnded, assocs[2].aid)
    h.close()
    h.drain()
    assert sum(isinstance(e, UdpEnded) for e in h.events) == 5
    assert fd_count() == before


async def test_add_refuses_bad_arguments(harness: Harness) -> None:
    """Bad arguments raise ValueError and leave the fds with the caller."""
    tcp_a, tcp_b = tcp_pair("127.0.0.1")
    remote = udp_socket("127.0.0.1")
    try:
        with pytest.raises(ValueError, match="8 bytes"):
            harness.engine.add(b"short", tcp_b.fileno(), [remote.fileno()])
        with pytest.raises(ValueError, match="datagram"):
            harness.engine.add(os.urandom(8), tcp_b.fileno(), [tcp_a.fileno()])
        with pytest.raises(ValueError, match="distinct"):
            harness.engine.add(os.urandom(8), tcp_b.fileno(), [tcp_b.fileno()])
        a = harness.add()
        with pytest.raises(ValueError, match="already live"):
            harness.engine.add(a.aid, tcp_b.fileno(), [remote.fileno()])
        remote.getsockname()  # still open: ours
        tcp_b.getpeername()
    finally:
        for sock in (tcp_a, tcp_b, remote):
            sock.close()


# -- verdicts and names -----------------------------------------------------------------------


async def test_ask_and_verdicts(harness: Harness) -> None:
    """ask=True: an unknown destination is reported once (UdpAsk) and its datagrams are
    held until the verdict (D24); allow relays them and the later ones, deny drops (DENIED)."""
    a = harness.add(ask=True)
    host, port = harness.echo.address
    a.client.sendto(dgram(a.aid, host, port, b"one"), harness.port_address)
    ask = await harness.event(UdpAsk, a.aid)
    assert (ask.address, ask.port) == (host, port)
    a.client.sendto(dgram(a.aid, host, port, b"two"), harness.port_address)
    await until(lambda: harness.engine.held() == (2, 6), "two held datagrams")
    assert sum(isinstance(e, UdpAsk) for e in harness.drain()) == 1
    assert harness.echo.seen == []
    harness.engine.verdict(a.aid, host, port, True)
    for expected in (b"one", b"two"):
        data, _ = await recv(a.client)
        assert parse(data)[1] == expected
    assert await harness.echo_through(a, b"three") == b"three"
    assert harness.engine.drops()[UdpDrop.PENDING] == 0
    other = Echo(harness.host)
    try:
        harness.engine.verdict(a.aid, *other.address, False)
        await asyncio.sleep(0.05)
        a.client.sendto(dgram(a.aid, *other.address, b"denied"), harness.port_address)
        await harness.drops(UdpDrop.DENIED, 1)
        assert other.seen == []
    finally:
        other.close()


async def test_domain_names_resolved_by_the_control_plane(harness: Harness) -> None:
    """D20: a name is reported once (UdpResolve), its datagrams wait (held, D24) and leave
    when it resolves; the answer is cached per association; a name that did not resolve
    drops them (DENIED)."""
    a = harness.add()
    host, port = harness.echo.address
    a.client.sendto(
        dgram(a.aid, "echo.test", port, b"q1", atyp=AddressType.DOMAIN_NAME), harness.port_address
    )
    resolve = await harness.event(UdpResolve, a.aid)
    assert (resolve.name, resolve.port) == ("echo.test", port)
    await until(lambda: harness.engine.held() == (1, 2), "a held datagram")
    harness.engine.resolved(a.aid, "echo.test", host)
    data, _ = await recv(a.client)
    header, body = parse(data)
    assert body == b"q1" and (header.address, header.port) == (host, port)  # the source is an IP
    a.client.sendto(
        dgram(a.aid, "echo.test", port, b"q2", atyp=AddressType.DOMAIN_NAME), harness.port_address
    )
    data, _ = await recv(a.client)
    assert parse(data)[1] == b"q2"
    a.client.sendto(
        dgram(a.aid, "nowhere.test", port, b"q3", atyp=AddressType.DOMAIN_NAME), harness.port_address
    )
    await until(lambda: harness.engine.held() == (1, 2), "a held datagram")
    harness.engine.resolved(a.aid, "nowhere.test", None)
    await harness.drops(UdpDrop.DENIED, 1)
    assert harness.engine.held() == (0, 0)
    assert sum(isinstance(e, UdpResolve) for e in harness.drain()) == 2
    assert harness.engine.drops()[UdpDrop.PENDING] == 0


# -- datagrams waiting for a verdict or a name (D24) ----------------------------------------


async def _held_then(h: Harness, a: Assoc, payloads: list[bytes], *, over_tcp: bool = False) -> None:
    """Send payloads to the echo server while its verdict is pending; wait for the UdpAsk."""
    host, port = h.echo.address
    for payload in payloads:
        message = dgram(a.aid, host, port, payload)
        if over_tcp:
            a.tcp.sendall(message)
        else:
            a.client.sendto(message, h.port_address)
    await h.event(UdpAsk, a.aid)


@pytest.mark.parametrize("over_tcp", [False, True], ids=["udp", "tcp"])
async def test_held_datagrams_leave_in_order_after_the_verdict(harness: Harness, over_tcp: bool) -> None:
    """D24: the first datagrams to a destination under a rule are not lost: held (copied,
    over UDP and over TCP alike), then sent in arrival order once the verdict allows."""
    a = harness.add(ask=True)
    payloads = [b"%d" % i * (i + 1) for i in range(8)]
    await _held_then(harness, a, payloads, over_tcp=over_tcp)
    total = sum(map(len, payloads))
    await until(lambda: harness.engine.held() == (8, total), "eight held datagrams")
    await asyncio.sleep(0.05)
    assert harness.echo.seen == []
    harness.engine.verdict(a.aid, *harness.echo.address, True)
    await until(lambda: len(harness.echo.seen) == 8, "the held datagrams at the echo server")
    assert [data for data, _ in harness.echo.seen] == payloads
    if over_tcp:
        assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
        got = [(await read_message(a.tcp)).payload for _ in payloads]
        assert got == payloads
    else:
        got_udp = [parse((await recv(a.client))[0])[1] for _ in payloads]
        assert got_udp == payloads
    assert harness.engine.held() == (0, 0)
    drops = harness.engine.drops()
    assert drops[UdpDrop.PENDING] == drops[UdpDrop.DENIED] == 0


async def test_hold_bound_drops_the_rest_as_pending(path: str) -> None:
    """D24: at most hold_datagrams datagrams and hold_bytes payload bytes per association
    wait; the next one is dropped and counted as PENDING; the held ones still leave."""
    h = Harness(make_engine(path, hold_datagrams=3, hold_bytes=100), "127.0.0.1")
    h.open_port()
    try:
        a = h.add(ask=True)
        await _held_then(h, a, [b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10])
        await h.drops(UdpDrop.PENDING, 1)  # the 4th: over hold_datagrams
        assert h.engine.held() == (3, 30)
        b = h.add(ask=True)
        await _held_then(h, b, [b"e" * 60, b"f" * 50, b"g" * 40])
        await h.drops(UdpDrop.PENDING, 2)  # "f": 60 + 50 > hold_bytes
        assert h.engine.held() == (5, 130)
        assert h.engine.drops()[UdpDrop.PENDING] == 2
        h.engine.verdict(a.aid, *h.echo.address, True)
        await until(lambda: len(h.echo.seen) == 3, "a's held datagrams")
        h.engine.verdict(b.aid, *h.echo.address, True)
        await until(lambda: len(h.echo.seen) == 5, "b's held datagrams")
        assert [data for data, _ in h.echo.seen] == [b"a" * 10, b"b" * 10, b"c" * 10, b"e" * 60, b"g" * 40]
        assert h.engine.held() == (0, 0)
    finally:
        h.close()


async def test_hold_nothing_when_disabled(path: str) -> None:
    """hold_datagrams=0: every datagram to a pending destination is dropped (PENDING)."""
    h = Harness(make_engine(path, hold_datagrams=0), "127.0.0.1")
    h.open_port()
    try:
        a = h.add(ask=True)
        await _held_then(h, a, [b"x", b"y"])
        await h.drops(UdpDrop.PENDING, 2)
        h.engine.verdict(a.aid, *h.echo.address, True)
        await asyncio.sleep(0.1)
        assert h.echo.seen == [] and h.engine.held() == (0, 0)
    finally:
        h.close()


@pytest.mark.parametrize("arg", ["hold_datagrams", "hold_bytes"])
async def test_hold_bounds_are_checked(path: str, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        make_engine(path, **{arg: -1})
    with pytest.raises(ValueError, match=arg):
        make_engine(path, **{arg: 10**7})


async def test_denied_destination_drops_the_held_datagrams(harness: Harness) -> None:
    """D24: a deny verdict drops every held datagram, counted as DENIED (not PENDING)."""
    a = harness.add(ask=True)
    await _held_then(harness, a, [b"1", b"2", b"3"])
    await until(lambda: harness.engine.held() == (3, 3), "three held datagrams")
    harness.engine.verdict(a.aid, *harness.echo.address, False)
    await harness.drops(UdpDrop.DENIED, 3)
    await asyncio.sleep(0.05)
    assert harness.echo.seen == [] and harness.engine.held() == (0, 0)
    assert harness.engine.drops()[UdpDrop.PENDING] == 0


async def test_name_then_verdict_keeps_the_datagram(harness: Harness) -> None:
    """D20 + D24: a name under a destination rule waits twice (the name, then the verdict
    on its address) and still arrives, first."""
    a = harness.add(ask=True)
    host, port = harness.echo.address
    a.client.sendto(
        dgram(a.aid, "echo.test", port, b"n1", atyp=AddressType.DOMAIN_NAME), harness.port_address
    )
    await harness.event(UdpResolve, a.aid)
    harness.engine.resolved(a.aid, "echo.test", host)
    ask = await harness.event(UdpAsk, a.aid)
    assert (ask.address, ask.port) == (host, port)
    assert harness.engine.held() == (1, 2)
    harness.engine.verdict(a.aid, host, port, True)
    data, _ = await recv(a.client)
    assert parse(data)[1] == b"n1"
    assert harness.engine.held() == (0, 0)


async def test_held_datagrams_end_with_the_association(path: str) -> None:
    """D24: datagrams still held when the association ends (TCP closed, removed, engine
    closed) are freed: the held count returns to 0 and no fd is left."""
    before = fd_count()
    h = Harness(make_engine(path), "127.0.0.1")
    h.open_port()
    try:
        assocs = [h.add(ask=True) for _ in range(3)]
        for a in assocs:
            await _held_then(h, a, [b"z" * 1000] * 8)
        await until(lambda: h.engine.held() == (24, 24000), "24 held datagrams")
        assocs[0].tcp.close()
        await h.event(UdpEnded, assocs[0].aid)
        assert h.engine.held() == (16, 16000)
        h.engine.remove(assocs[1].aid)
        await h.event(UdpEnded, assocs[1].aid)
        assert h.engine.held() == (8, 8000)
        h.engine.verdict(assocs[1].aid, *h.echo.address, True)  # ended: nothing to release
        await asyncio.sleep(0.05)
        assert h.echo.seen == []
    finally:
        h.close()
    h.drain()
    assert sum(isinstance(e, UdpEnded) for e in h.events) == 3
    assert h.engine.held() == (0, 0)
    assert fd_count() == before


# -- SOCKS 5 ----------------------------------------------------------------------------------


async def test_socks5_mode(harness: Harness) -> None:
    """RFC 1928 section 7 / D19: the SOCKS 5 UDP header both ways, FRAG other than 0
    dropped, only the TCP client's address accepted, the end with the TCP connection."""
    a = harness.add(socks5=True, client_address="127.0.0.1")
    host, port = harness.echo.address
    s5 = harness.s5_address

    def s5_dgram(payload: bytes, fragment: int = 0) -> bytes:
        return encode_udp_header(Socks5UDPHeader(AddressType.IPV4, host, port, fragment)) + payload

    a.client.sendto(s5_dgram(b"frag", 1), s5)
    await harness.drops(UdpDrop.FRAGMENT, 1)
    a.client.sendto(s5_dgram(b"hello"), s5)
    data, peer = await recv(a.client)
    assert peer[:2] == s5
    header, hlen = decode_udp_header(data)
    assert (header.address, header.port, header.fragment, data[hlen:]) == (host, port, 0, b"hello")
    confirmed = await harness.event(UdpConfirmed, a.aid)
    assert confirmed.client == a.client.getsockname()[:2]
    assert await silent(a.tcp)  # SOCKS 5 has no Confirmation message
    # A SOCKS 6 datagram naming this association's ID on the SOCKS 6 port finds nothing.
    a.client.sendto(dgram(a.aid, host, port, b"s6"), harness.port_address)
    await harness.drops(UdpDrop.UNKNOWN_ASSOCIATION, 1)
    # Only the TCP client's address: another address is refused before the mapping.
    b = harness.add(socks5=True, client_address="127.0.0.2")
    b.client.sendto(s5_dgram(b"wrong source"), harness.s5_address)
    await harness.drops(UdpDrop.SOURCE, 1)
    a.tcp.close()
    assert (await harness.event(UdpEnded, a.aid)).end is RelayEnd.EOF


# -- bad input at rate ----------------------------------------------------------------------


async def test_flood_to_dead_associations(harness: Harness) -> None:
    """A bounded flood of datagrams naming dead associations is dropped and counted; a live
    association keeps working meanwhile and after."""
    a = harness.add()
    dead = harness.add()
    harness.engine.remove(dead.aid)
    await harness.event(UdpEnded, dead.aid)
    flood = udp_socket(harness.host)
    try:
        junk = [
            dgram(os.urandom(8), *harness.echo.address, b"j" * 32),
            dgram(dead.aid, *harness.echo.address, b"d"),
        ]
        sent = 0
        deadline = time.monotonic() + 2.0
        while sent < 20000 and time.monotonic() < deadline:
            for _ in range(200):
                try:
                    flood.sendto(junk[sent % 2], harness.port_address)
                except BlockingIOError:
                    break
                sent += 1
            await asyncio.sleep(0)
        # The kernel may drop "alive" itself while the port's receive queue is still full
        # of junk (UDP: a full queue drops, before the engine sees anything), so it is
        # resent like any UDP client would, a bounded number of times.
        sends = 0
        echoed = b""
        while not echoed and sends < 5:
            a.client.sendto(dgram(a.aid, *harness.echo.address, b"alive"), harness.port_address)
            sends += 1
            with contextlib.suppress(TimeoutError):
                echoed = parse((await recv(a.client, 1.0))[0])[1]
        assert echoed == b"alive"
        await harness.drops(UdpDrop.UNKNOWN_ASSOCIATION, 100)
        assert harness.engine.drops()[UdpDrop.UNKNOWN_ASSOCIATION] <= sent
        assert {d for d, _ in harness.echo.seen} == {b"alive"}
        assert len(harness.echo.seen) <= sends
    finally:
        flood.close()


# -- the wildcard port ------------------------------------------------------------------------


async def test_wildcard_port_answers_from_the_address_the_client_used(path: str) -> None:
    """A port bound to 0.0.0.0: the mapping includes the proxy's address the client sent to
    (IP_PKTINFO), and replies leave from it (else the client's 5-tuple would not match)."""
    h = Harness(make_engine(path), "127.0.0.1")
    try:
        fds = open_udp_port("0.0.0.0", 0, h.engine.workers)
        port = port_of(fds[0])
        h.engine.add_port(fds)
        h.port_address = ("127.0.0.2", port)
        a = h.add()
        a.client.sendto(dgram(a.aid, *h.echo.address, b"via .2"), ("127.0.0.2", port))
        data, peer = await recv(a.client)
        assert peer[:2] == ("127.0.0.2", port)
        assert parse(data)[1] == b"via .2"
        # The same client through another local address is another 5-tuple (UDP-03).
        a.client.sendto(dgram(a.aid, *h.echo.address, b"via .3"), ("127.0.0.3", port))
        await h.drops(UdpDrop.MAPPING, 1)
    finally:
        h.close()


async def test_pending_tcp_bytes_are_the_first_received(harness: Harness) -> None:
    """tcp_pending: bytes the control plane read past the request are parsed first."""
    aid = os.urandom(8)
    first = dgram(aid, *harness.echo.address, b"early")
    a = harness.add(aid=aid, tcp_pending=first + first[:5])
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(a.tcp, first[5:])
    assert await read_message(a.tcp) == AssociationConfirmation(aid)
    assert [(await read_message(a.tcp)).payload for _ in range(2)] == [b"early", b"early"]


# -- bursts: UDP GSO in the native engine -----------------------------------------------------

# <netinet/udp.h> and <asm-generic/socket.h> (the socket module names none of them in 3.11).
SOL_UDP = 17
UDP_SEGMENT = 103  # Linux 4.18: send one buffer as datagrams of this size (GSO)
UDP_GRO = 104  # Linux 5.0: receive a run of them as one buffer, with the size in a control message
SO_NO_CHECK = 11  # IPv4 UDP without checksums: the kernel refuses GSO sends (EINVAL)


def _kernel_gso() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(SOL_UDP, UDP_SEGMENT, 1200)
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


needs_gso = pytest.mark.skipif(
    not _kernel_gso(), reason="the kernel has no UDP GSO/GRO (UDP_SEGMENT, UDP_GRO)"
)


def burst(sock: socket.socket, messages: list[bytes], to: tuple[str, int]) -> None:
    """Send messages as one GSO send (all one size but the last): they reach the receiving
    socket's queue together, so the engine reads them in one recvmmsg."""
    sock.sendmsg([b"".join(messages)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(messages[0])))], 0, to)


async def read_until(
    sock: socket.socket,
    read_one: Callable[[], T],
    enough: Callable[[list[T]], bool],
    timeout: float = TIMEOUT,
) -> list[T]:
    """Everything read_one() returns from a non-blocking socket until enough(results): one
    reader stays registered throughout (recv() reads one datagram per call and may lose
    the others of a burst, as its reader can fire again before it is removed)."""
    loop = asyncio.get_running_loop()
    out: list[T] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        while not enough(out):
            try:
                out.append(read_one())
            except (BlockingIOError, InterruptedError):
                return
        if not done.done():
            done.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(sock.fileno())
    return out


async def recv_many(sock: socket.socket, n: int) -> list[bytes]:
    """n datagrams, in order."""
    return await read_until(sock, lambda: sock.recv(70000), lambda out: len(out) >= n)


async def recv_gro(sock: socket.socket, total: int) -> list[tuple[bytes, int]]:
    """Reads from a socket with UDP_GRO until ``total`` bytes came: each read's bytes and
    segment size (0: a single datagram)."""

    def read_one() -> tuple[bytes, int]:
        data, ancillary, _flags, _peer = sock.recvmsg(70000, socket.CMSG_SPACE(4))
        gro = [struct.unpack("=i", d[:4])[0] for lv, t, d in ancillary if (lv, t) == (SOL_UDP, UDP_GRO)]
        return data, gro[0] if gro else 0

    return await read_until(sock, read_one, lambda out: sum(len(data) for data, _size in out) >= total)


def _payloads(n: int, size: int, last: int) -> list[bytes]:
    body = [(b"%04d" % i) * (size // 4) for i in range(n - 1)]
    return body + [b"LAST" * (last // 4)]


@needs_gso
@pytest.mark.conformance("UDP-04")
@pytest.mark.parametrize("harness", HOSTS, indirect=True)
async def test_bursts_keep_every_datagram(harness: Harness) -> None:
    """UDP-04: a burst of equal-sized datagrams (and a shorter last one) that the engine
    reads at once (on the native engine, sent on with UDP GSO) reaches the remote host as
    the same datagrams in order, and the echoes come back one by one, each with its header."""
    a = harness.add()
    assert await harness.echo_through(a, b"first") == b"first"
    payloads = _payloads(24, 300, 100)
    burst(a.client, [dgram(a.aid, *harness.echo.address, p) for p in payloads], harness.port_address)
    got = [parse(data) for data in await recv_many(a.client, len(payloads))]
    assert [body for _header, body in got] == payloads
    assert {(h.address, h.port) for h, _body in got} == {harness.echo.address}
    assert [d for d, _ in harness.echo.seen] == [b"first", *payloads]
    assert sum(harness.engine.drops().values()) == 0


@needs_gso
@pytest.mark.parametrize(
    ("wildcard", "local"),
    [
        pytest.param("0.0.0.0", "127.0.0.2", id="v4"),
        pytest.param(
            "::", "::1", id="v6", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
        ),
    ],
)
async def test_bursts_through_a_wildcard_port_answer_from_the_address_used(
    path: str, wildcard: str, local: str
) -> None:
    """A burst of replies through a port bound to a wildcard address leaves from the
    address the client used (IP_PKTINFO / IPV6_PKTINFO), each datagram with its header
    (the native engine sends the run with the source address and UDP GSO together)."""
    h = Harness(make_engine(path), local)
    try:
        fds = open_udp_port(wildcard, 0, h.engine.workers)
        port = port_of(fds[0])
        h.engine.add_port(fds)
        h.port_address = (local, port)
        a = h.add()
        assert await h.echo_through(a, b"first") == b"first"
        payloads = _payloads(12, 240, 80)
        burst(a.client, [dgram(a.aid, *h.echo.address, p) for p in payloads], h.port_address)
        replies = await read_until(
            a.client, lambda: a.client.recvfrom(70000), lambda out: len(out) >= len(payloads)
        )
        got = [parse(data)[1] for data, _peer in replies]
        peers = [peer[:2] for _data, peer in replies]
        assert got == payloads
        assert set(peers) == {(local, port)}
        assert sum(h.engine.drops().values()) == 0
    finally:
        h.close()


@needs_gso
@pytest.mark.parametrize("engine_path", [pytest.param("mmsg", marks=native_only)])
@pytest.mark.parametrize(
    ("host", "dual_stack"),
    [
        pytest.param("127.0.0.1", False, id="v4"),
        pytest.param(
            "::1",
            False,
            id="v6",
            marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback"),
        ),
        # The server's remote socket when the request names no address: AF_INET6 on ::
        # without IPV6_V6ONLY, so IPv4 destinations are IPv4-mapped.
        pytest.param(
            "127.0.0.1", True, id="v4-via-dual-stack",
            marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6"),
        ),
    ],
)  # fmt: skip
async def test_native_engine_sends_runs_with_gso(engine_path: str, host: str, dual_stack: bool) -> None:
    """The native engine turns a run of equal-sized datagrams of one association to one
    address into one GSO send, both ways: a receiver with UDP_GRO on loopback gets such a
    send whole, with its segment size. (Retried: a worker may catch a burst half-queued.)"""
    h = Harness(make_engine(engine_path, workers=1), host)
    remote_host = udp_socket(host)
    remote_host.setsockopt(SOL_UDP, UDP_GRO, 1)
    target = remote_host.getsockname()[:2]
    try:
        h.open_port()
        remote: socket.socket | None = None
        if dual_stack:
            remote = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            remote.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            remote.bind(("::", 0))
        a = h.add(remote=remote)
        if dual_stack:
            a.remote_address = ("127.0.0.1", a.remote_address[1])
        a.client.setsockopt(SOL_UDP, UDP_GRO, 1)
        a.client.sendto(dgram(a.aid, *target, b"first"), h.port_address)
        assert await recv_gro(remote_host, 5) == [(b"first", 0)]
        payloads = _payloads(8, 200, 120)
        messages = [dgram(a.aid, *target, p) for p in payloads]
        coalesced_out = coalesced_back = False
        for _attempt in range(10):
            burst(a.client, messages, h.port_address)
            reads = await recv_gro(remote_host, len(b"".join(payloads)))
            coalesced_out |= any(size == 200 and len(data) > size for data, size in reads)
            assert b"".join(data for data, _size in reads) == b"".join(payloads)
            # The remote host answers with a burst of its own: the engine writes a header in
            # front of each datagram and sends the run to the client in one GSO send.
            burst(remote_host, payloads, a.remote_address)
            step = len(messages[0])  # a header and 200 bytes
            reads = await recv_gro(a.client, len(b"".join(messages)))
            coalesced_back |= any(size == step and len(data) > size for data, size in reads)
            back = b"".join(data for data, _size in reads)
            replies = [parse(back[i : i + step]) for i in range(0, len(back), step)]
            assert [body for _header, body in replies] == payloads
            assert {(hd.address, hd.port) for hd, _body in replies} == {target}
            if coalesced_out and coalesced_back:
                break
        assert coalesced_out and coalesced_back
        assert sum(h.engine.drops().values()) == 0
    finally:
        remote_host.close()
        h.close()


@needs_gso
async def test_refused_gso_send_falls_back_to_single_datagrams(harness: Harness) -> None:
    """When the kernel refuses a GSO send (here EINVAL: a remote socket without UDP
    checksums, SO_NO_CHECK), the engine sends that run datagram by datagram: all arrive,
    in order, nothing counted as dropped."""
    if harness.host != "127.0.0.1":
        pytest.skip("SO_NO_CHECK is IPv4 only")
    remote = udp_socket(harness.host)
    remote.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    a = harness.add(remote=remote)
    assert await harness.echo_through(a, b"first") == b"first"
    for round_ in range(3):
        payloads = _payloads(16, 256, 64)
        burst(a.client, [dgram(a.aid, *harness.echo.address, p) for p in payloads], harness.port_address)
        got = [parse(data)[1] for data in await recv_many(a.client, len(payloads))]
        assert got == payloads, f"round {round_}"
    assert len(harness.echo.seen) == 1 + 3 * 16
    assert sum(harness.engine.drops().values()) == 0


# -- the Python twin on uvloop (the server's default loop) ---------------------------------------


def test_python_twin_on_uvloop() -> None:
    """The Python twin runs on uvloop too: relay over UDP and over TCP, then the end."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        h = Harness(make_engine("python"), "127.0.0.1")
        h.open_port()
        try:
            a = h.add()
            assert await h.echo_through(a, b"uv") == b"uv"
            b = h.add()
            await asyncio.get_running_loop().sock_sendall(b.tcp, dgram(b.aid, *h.echo.address, b"uv tcp"))
            assert await read_message(b.tcp) == AssociationConfirmation(b.aid)
            assert (await read_message(b.tcp)).payload == b"uv tcp"
            assert await read_message(a.tcp) == AssociationConfirmation(a.aid)
            a.tcp.close()
            assert (await h.event(UdpEnded, a.aid)).end is RelayEnd.EOF
        finally:
            h.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


# -- ICMP errors, for real, in a private network namespace ------------------------------------------
#
# Topology, built by the script below inside `unshare -n` (namespace A) plus a second
# namespace B (a `sleep` started with `unshare -n`) joined by a veth pair:
#
#   A: engine, remote socket 10.77.0.1 / fd77::1  --veth-->  B: router 10.77.0.2 / fd77::2
#
# B forwards and answers: 10.78.1.0/24 and fd78:1::/64 "unreachable" routes (ICMP host
# unreachable 3/1; ICMPv6 no route 1/0), nothing for 10.78.2.0/24 (ICMP net unreachable
# 3/0), TTL/hop limit 1 for 10.78.3.1 / fd78:3::1 (time exceeded), and a 1280-byte MTU
# towards fd78:4::/64 (ICMPv6 packet too big).

ICMP_SETUP = r"""
set -e
ip link set lo up
unshare -n sleep 60 &
ROUTER=$!
sleep 0.2
ip link add v0 type veth peer name v1
ip link set v1 netns $ROUTER
ip addr add 10.77.0.1/24 dev v0
ip -6 addr add fd77::1/64 dev v0 nodad
ip link set v0 up
ip route add 10.78.0.0/16 via 10.77.0.2
ip -6 route add fd78::/16 via fd77::2
R="nsenter -t $ROUTER -n"
$R ip link set lo up
$R ip addr add 10.77.0.2/24 dev v1
$R ip -6 addr add fd77::2/64 dev v1 nodad
$R ip link set v1 up
# /proc/sys/net is the namespace's own (no sysctl(8) needed: procps may be absent).
$R sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv6/conf/all/forwarding'
$R ip route add unreachable 10.78.1.0/24
$R ip -6 route add unreachable fd78:1::/64
$R ip link add v2 type veth peer name v3
$R ip link set v2 mtu 1280 up
$R ip link set v3 up
$R ip -6 addr add fd79::1/64 dev v2 nodad
$R ip -6 route add fd78:4::/64 via fd79::2 dev v2
$R ip -6 neigh add fd79::2 lladdr 02:00:00:00:00:02 dev v2 nud permanent
$R sh -c 'echo 0 > /proc/sys/net/ipv4/icmp_ratelimit; echo 0 > /proc/sys/net/ipv6/icmp/ratelimit'
$R ip addr add 10.79.0.1/24 dev v2
$R ip neigh add 10.79.0.2 lladdr 02:00:00:00:00:02 dev v2 nud permanent
$R ip route add 10.78.3.0/24 via 10.79.0.2 dev v2
$R ip -6 route add fd78:3::/64 via fd79::2 dev v2
sleep 0.5
"""


def run_icmp_scenarios(path: str) -> None:
    """Entry point inside the namespace: print the observations as JSON."""
    print(json.dumps(asyncio.run(_icmp_scenarios(path))))


async def _icmp_scenarios(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    h = Harness(make_engine(path), "127.0.0.1")
    h.open_port()
    try:
        for name, host, dest, ttl, size in (
            ("host4", "10.77.0.1", "10.78.1.1", 64, 16),
            ("net4", "10.77.0.1", "10.78.2.1", 64, 16),
            ("ttl4", "10.77.0.1", "10.78.3.1", 1, 16),
            ("net6", "fd77::1", "fd78:1::1", 64, 16),
            ("ttl6", "fd77::1", "fd78:3::1", 1, 16),
            ("big6", "fd77::1", "fd78:4::1", 64, 1400),
            ("port4", "10.77.0.1", "10.77.0.2", 64, 16),  # the router's closed port: 3/3
            ("quiet4", "10.77.0.1", "10.78.1.1", 64, 16),  # no opt-in: never reported
        ):
            opted_in = name != "quiet4"
            remote = socket.socket(family_of(host), socket.SOCK_DGRAM)
            remote.bind((host, 0))
            if ":" in host:
                remote.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                remote.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            client_tcp, proxy_tcp = tcp_pair("127.0.0.1")
            client = udp_socket("127.0.0.1")
            aid = os.urandom(8)
            h.engine.add(aid, proxy_tcp.detach(), [remote.detach()], udp_error=opted_in)
            h.assocs.append(Assoc(aid, client_tcp, client, ("", 0), [client_tcp, client]))
            client.sendto(dgram(aid, dest, 4321, b"p" * size), h.port_address)
            got: dict[str, Any] = {"reported": None}
            try:
                data, _ = await recv(client, 3.0 if opted_in and name != "port4" else 1.0)
                message, _used = decode_association_message(data)
                got["reported"] = [
                    message.address,
                    message.port,
                    message.reporter_address,
                    int(message.error_code),
                ]
            except TimeoutError:
                pass
            client_tcp.close()
            ended = await h.event(UdpEnded, aid)
            got["icmp_errors"] = ended.icmp_errors
            got["icmp_reported"] = ended.icmp_reported
            out[name] = got
    finally:
        h.close()
    return out


def _netns_available() -> bool:
    if not sys.platform.startswith("linux") or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        return False
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link add v0 type veth peer name v1"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.conformance("UDP-09")
@pytest.mark.parametrize("engine_path", [pytest.param("mmsg", marks=native_only), pytest.param("python")])
def test_icmp_errors_reported_to_opted_in_clients(engine_path: str) -> None:
    """UDP-09 (engine side) / D17: real ICMP errors (host and net unreachable, TTL expired,
    IPv6 too big) from a router namespace reach the client as Datagram Error messages
    naming the destination and the reporter, on the mapped channel; port unreachable is
    read but not reported; without the opt-in nothing is read or sent."""
    if not _netns_available():
        pytest.skip("needs unshare -n with veth pairs (root or user namespaces), nsenter and iproute2")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(socks6fast.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
        ),
    )
    script = ICMP_SETUP + (
        f'"{sys.executable}" -P -c "import test_udp_engine as t; t.run_icmp_scenarios({engine_path!r})"\n'
        "rc=$?\nkill $ROUTER\nexit $rc\n"
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=90
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["host4"]["reported"] == ["10.78.1.1", 4321, "10.77.0.2", DatagramErrorCode.HOST_UNREACHABLE]
    assert seen["net4"]["reported"] == ["10.78.2.1", 4321, "10.77.0.2", DatagramErrorCode.NETWORK_UNREACHABLE]
    assert seen["ttl4"]["reported"] == ["10.78.3.1", 4321, "10.77.0.2", DatagramErrorCode.TTL_EXPIRED]
    assert seen["net6"]["reported"] == ["fd78:1::1", 4321, "fd77::2", DatagramErrorCode.NETWORK_UNREACHABLE]
    assert seen["ttl6"]["reported"] == ["fd78:3::1", 4321, "fd77::2", DatagramErrorCode.TTL_EXPIRED]
    assert seen["big6"]["reported"] == ["fd78:4::1", 4321, "fd77::2", DatagramErrorCode.DATAGRAM_TOO_BIG]
    for name in ("host4", "net4", "ttl4", "net6", "ttl6", "big6"):
        assert seen[name]["icmp_reported"] == 1, name
    # Port unreachable is read from the error queue but not reported (not in the table).
    assert seen["port4"] == {"reported": None, "icmp_errors": 1, "icmp_reported": 0}
    assert seen["quiet4"] == {"reported": None, "icmp_errors": 0, "icmp_reported": 0}
