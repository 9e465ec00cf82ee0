"""SOCKS 6 datagrams over DTLS end to end (issue 11): the proxy's DTLS ports
(``socks6fast.asyncio.server.dtls``, the hand-off to the UDP engine) and both clients'
``transport="dtls"``.

Real parts only: the real `Server` with a TLS listener and the DTLS port beside it (D16), the
UDP engine (both: the ``engine`` fixture), real DTLS 1.2 handshakes over loopback sockets, a
UDP echo server on loopback as the remote host, and ``openssl s_client -dtls1_2`` as an
independent DTLS peer. The ClientHello flood is loopback only (sent to the proxy's own
127.0.0.1 port, bounded in count and time).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_server import Certificates, make_certificates, make_config, running_server
from helpers_udp import has_ipv6_loopback
from test_udp_engine import recv

from socks6fast import client as bclient
from socks6fast._client_base import new_association
from socks6fast.asyncio import client as aclient
from socks6fast.asyncio.server import Server
from socks6fast.asyncio.server.dtls import DTLSPorts
from socks6fast.config import ConfigError, parse_config
from socks6fast.errors import RemoteProtocolError
from socks6fast.net.dtls import DTLSClientConnection, DTLSError, dtls_client_context
from socks6fast.proto.client_udp import ClientAssociation
from socks6fast.proto.codec import decode_datagram_header

FLAVOURS = ["asyncio", "blocking"]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("dtls-udp"))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on: Callable[[bytes, Any], None]) -> None:
        self._on = on

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on(data, addr)


@contextlib.asynccontextmanager
async def udp_echo(host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    """A UDP echo server on loopback: the association's remote host."""
    loop = asyncio.get_running_loop()
    box: list[asyncio.DatagramTransport] = []
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(lambda data, addr: box[0].sendto(data, addr)), local_addr=(host, 0)
    )
    box.append(transport)
    try:
        yield transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def dtls_server(certs: Certificates, ipv6: bool = False, **udp: Any) -> AsyncIterator[Server]:
    """The real server with one TLS listener per family and, by default, a DTLS port beside
    each (D16)."""
    tls_listen = ["127.0.0.1:0"] + (["[::1]:0"] if ipv6 else [])
    tls = {"tls_listen": tls_listen, "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    async with running_server(make_config(server=tls, udp=udp, ipv6=ipv6)) as server:
        yield server


def tls_url(server: Server, host: str = "127.0.0.1") -> str:
    address, port = next(a for a in server.tls_addresses if (":" in a[0]) == (":" in host))[:2]
    return f"socks6+tls://[{address}]:{port}" if ":" in address else f"socks6+tls://{address}:{port}"


def ports(server: Server) -> DTLSPorts:
    assert server.dtls is not None
    return server.dtls


async def in_flavour(
    flavour: str, url: str, certs: Certificates, body: Callable[[Any], Awaitable[Any]], **kwargs: Any
) -> Any:
    """``body(assoc)`` inside an association of either client over DTLS, both verifying the
    proxy with the test CA (blocking: in a thread, its methods awaitable alike)."""
    kwargs.setdefault("proxy_dtls", dtls_client_context(cafile=str(certs.ca)))
    proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
    if flavour == "asyncio":
        async with await aclient.udp_associate(url, proxy_ssl=proxy_ssl, **kwargs) as assoc:
            return await body(assoc)

    class Awaitable_:
        def __init__(self, assoc: bclient.UDPAssociation) -> None:
            self._assoc = assoc

        def __getattr__(self, name: str) -> Any:
            value = getattr(self._assoc, name)
            if callable(value):

                async def call(*args: Any, **kw: Any) -> Any:
                    return await asyncio.to_thread(value, *args, **kw)

                return call
            return value

    proxy = bclient.Proxy.from_url(url, proxy_ssl=proxy_ssl)
    assoc = await asyncio.to_thread(proxy.udp_associate, **kwargs)
    try:
        return await body(Awaitable_(assoc))
    finally:
        assoc.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


HOSTS = [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1")),
]


@pytest.mark.conformance("UDP-02", "UDP-03", "TRN-03")
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("host", HOSTS)
async def test_echo_over_dtls(
    engine: str, flavour: str, host: str, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """UDP-02, UDP-03, TRN-03: both clients, ``socks6+tls://`` (whose datagrams default to
    DTLS, D30), through the real server's DTLS port beside its TLS listener (D16): a
    verified DTLS 1.2 handshake, the connection handed to the engine, the association
    mapped to it by its first datagram; 64-byte and 1400-byte datagrams to a loopback echo
    server come back naming it. The log says via=dtls; the channel ends with the
    association and nothing leaks."""
    caplog.set_level("INFO", logger="socks6fast.server")
    async with dtls_server(certs, ipv6=host == "::1") as server, udp_echo(host) as echo:
        before = fd_count()
        dtls = ports(server)
        assert [p for p in dtls.ports if (":" in p[0]) == (":" in host)][0][1] == next(
            a for a in server.tls_addresses if (":" in a[0]) == (":" in host)
        )[1]  # D16: the TLS listener's port number

        async def body(assoc: Any) -> None:
            assert assoc.transport == "dtls"
            for size in (64, 1400, 64, 1400):
                payload = os.urandom(size)
                await assoc.sendto(payload, echo)
                assert await assoc.recvfrom(timeout=5) == (payload, echo)
            assert assoc.confirmed and assoc.dropped == 0
            assert dtls.handoffs == 1 and len(dtls.channels) == 1

        await in_flavour(
            flavour, tls_url(server, host), certs, body, address="::" if ":" in host else "0.0.0.0"
        )
        await wait_for(lambda: not dtls.channels)  # UdpChannelEnded: the association ended
        await wait_for(lambda: "cmd=UDP_ASSOCIATE" in caplog.text)
        assert " via=dtls " in caplog.text and "DTLS connection from" in caplog.text
        await asyncio.sleep(0.1)
        assert fd_count() == before
        (server_port,) = [s for s in dtls.servers if (":" in s.sockname()[0]) == (":" in host)]
        assert server_port.connections == {} and server_port.counters.released == 1


@pytest.mark.conformance("UDP-06", "UDP-10")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_server_mode_over_dtls(engine: str, flavour: str, certs: Certificates) -> None:
    """UDP-06 / UDP-10 over DTLS: the empty datagram confirms the association through the DTLS
    channel; then a remote host sends first to the bound address and reaches the client."""
    async with dtls_server(certs) as server:

        async def body(assoc: Any) -> None:
            assert assoc.confirmed and assoc.transport == "dtls"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as remote:
                remote.bind(("127.0.0.1", 0))
                remote.sendto(b"knock", assoc.bound)
                assert await assoc.recvfrom(timeout=5) == (b"knock", remote.getsockname())

        await in_flavour(flavour, tls_url(server), certs, body, server_mode=True)


@pytest.mark.conformance("UDP-03")
async def test_association_id_on_another_dtls_connection_is_dropped(engine: str, certs: Certificates) -> None:
    """UDP-03: two associations, each mapped to its own DTLS connection. A datagram naming B's
    Association ID sent on A's DTLS connection is dropped (nothing reaches the remote host,
    B gets nothing); both associations go on working on their own connections."""
    proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
    proxy_dtls = dtls_client_context(cafile=str(certs.ca))
    async with dtls_server(certs) as server, udp_echo() as echo:
        url = tls_url(server)
        seen: list[bytes] = []
        loop = asyncio.get_running_loop()
        sink, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(lambda data, addr: seen.append(data)), local_addr=("127.0.0.1", 0)
        )
        try:
            target = sink.get_extra_info("sockname")[:2]
            async with (
                await aclient.udp_associate(url, proxy_ssl=proxy_ssl, proxy_dtls=proxy_dtls) as a,
                await aclient.udp_associate(url, proxy_ssl=proxy_ssl, proxy_dtls=proxy_dtls) as b,
            ):
                for assoc in (a, b):
                    await assoc.sendto(b"map me", echo)
                    assert await assoc.recvfrom(timeout=5) == (b"map me", echo)
                assert a.id != b.id and len(ports(server).channels) == 2
                assert a._dtls is not None
                a._dtls.send(b.core.datagram(b"smuggled", *target))  # B's ID on A's connection
                await assoc_roundtrip(a, echo)
                await assoc_roundtrip(b, echo)
                await asyncio.sleep(0.2)
                assert seen == []
                with pytest.raises(TimeoutError):
                    await b.recvfrom(timeout=0.2)
        finally:
            sink.close()


@pytest.mark.conformance("UDP-02", "UDP-03", "TRN-03")
async def test_several_associations_over_one_dtls_connection(engine: str, certs: Certificates) -> None:
    """UDP-03 (probe 19 F2, issue 11 "same mapping rules"): three UDP ASSOCIATE of one
    client (socks6fast's client, datagrams not sent on TLS so nothing is mapped yet) and one
    DTLS connection to the proxy's DTLS port carrying the datagrams of all three: each
    association maps to it by its first datagram and relays both ways. The proxy's two UDP
    engine workers house all three (their IDs share ``ID[7] % 2``, D32). The connection
    ends only with the last association (a close_notify)."""
    proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
    context = dtls_client_context(cafile=str(certs.ca))
    async with dtls_server(certs, workers=2) as server, udp_echo() as echo:
        url = tls_url(server)
        assert server.udp is not None and server.udp.engine.workers == 2
        assocs = [await aclient.udp_associate(url, proxy_ssl=proxy_ssl, transport="tcp") for _ in range(3)]
        try:
            assert len({assoc.id[7] % 2 for assoc in assocs}) == 1  # D32
            (port,) = ports(server).ports
            dtls = await aclient_open_dtls(port, context)
            for round_ in range(2):
                for i, assoc in enumerate(assocs):
                    payload = b"%d/%d" % (i, round_) * (1 + 100 * round_)
                    dtls.send(assoc.core.datagram(payload, *echo))
                    reply = await asyncio.wait_for(dtls.recv(), 5)
                    header, hlen = decode_datagram_header(reply)
                    assert header.association_id == assoc.id
                    assert reply[hlen : header.message_length] == payload
            assert len(ports(server).channels) == 1
            for assoc in assocs[:2]:
                await assoc.aclose()
            await asyncio.sleep(0.1)
            assert len(ports(server).channels) == 1
            dtls.send(assocs[2].core.datagram(b"last", *echo))
            reply = await asyncio.wait_for(dtls.recv(), 5)
            assert reply.endswith(b"last")
            await assocs[2].aclose()
            with pytest.raises(DTLSError):
                await asyncio.wait_for(dtls.recv(), 5)  # the close_notify
            await wait_for(lambda: not ports(server).channels)
            dtls.close()
        finally:
            for assoc in assocs:
                await assoc.aclose()


async def handshake_on(
    sock: socket.socket, context: Any, timeout: float = 5.0, sent: list[bytes] | None = None
) -> DTLSClientConnection:
    """A DTLS handshake with the proxy over ``sock`` (non-blocking, connected to the port);
    ``sent`` collects the client's datagrams."""
    conn = DTLSClientConnection(context, "127.0.0.1")
    conn.start(time.monotonic())
    deadline = time.monotonic() + timeout
    while not conn.established:
        for datagram in conn.datagrams_to_send():
            sock.send(datagram)
            if sent is not None:
                sent.append(datagram)
        if conn.error is not None:
            raise conn.error
        now = time.monotonic()
        assert now < deadline, "the DTLS handshake got no answer"
        wait = min(deadline, conn.retransmit_at or deadline) - now
        try:
            data, _ = await recv(sock, max(0.01, wait))
        except TimeoutError:
            conn.handle_timer(time.monotonic())
            continue
        conn.datagram_received(data, time.monotonic())
    return conn


async def dtls_roundtrip(
    sock: socket.socket, conn: DTLSClientConnection, message: bytes, timeout: float = 5.0
) -> bytes:
    """Send one SOCKS 6 message on ``conn``; the next datagram it decrypts."""
    sock.send(conn.send(message))
    deadline = time.monotonic() + timeout
    while not conn.received:
        if conn.closed:
            raise DTLSError("closed")
        data, _ = await recv(sock, max(0.01, deadline - time.monotonic()))
        conn.datagram_received(data, time.monotonic())
    return conn.received.popleft()


@pytest.mark.conformance("TRN-03", "UDP-03")
async def test_client_restarting_dtls_from_the_same_port_gets_a_new_connection(
    engine: str, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6347 section 4.2.8 (probe 19 F6, D31): a client that loses its DTLS state while its
    channel lives and starts a new handshake from the same address and port gets the cookie
    exchange and a new connection, which replaces the old channel only once the cookie came
    back (a bare ClientHello gets a HelloVerifyRequest and changes nothing); an association mapped to
    the old connection is not re-mapped to the new one (D28, UDP-03), a new association maps
    there and relays."""
    proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
    context = dtls_client_context(cafile=str(certs.ca))
    async with dtls_server(certs) as server, udp_echo() as echo:
        url = tls_url(server)
        dtls = ports(server)
        (port,) = dtls.ports
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(port)
        sock.setblocking(False)
        first = await aclient.udp_associate(url, proxy_ssl=proxy_ssl, transport="tcp")
        second = await aclient.udp_associate(url, proxy_ssl=proxy_ssl, transport="tcp")
        try:
            flights: list[bytes] = []
            old = await handshake_on(sock, context, sent=flights)
            assert (await dtls_roundtrip(sock, old, first.core.datagram(b"one", *echo))).endswith(b"one")
            (old_channel,) = dtls.channels
            # A ClientHello alone proves nothing (it could be spoofed): a HelloVerifyRequest
            # from the same address and port, and the old connection stays (the RFC's MUST NOT).
            probe = DTLSClientConnection(context, "127.0.0.1")
            probe.start(time.monotonic())
            (hello,) = probe.datagrams_to_send()
            sock.send(hello)
            answer, _ = await recv(sock, 5.0)
            assert answer[0] == 22 and answer[13] == 3  # handshake record: HelloVerifyRequest
            assert (await dtls_roundtrip(sock, old, first.core.datagram(b"kept", *echo))).endswith(b"kept")
            assert dtls.restarts == 0 and list(dtls.channels) == [old_channel]
            # A late copy of the ClientHello (with its cookie) that made the old connection is
            # no restart (same client random).
            sock.send(flights[1])
            assert (await dtls_roundtrip(sock, old, first.core.datagram(b"late", *echo))).endswith(b"late")
            assert dtls.restarts == 0 and list(dtls.channels) == [old_channel]
            with caplog.at_level("INFO", logger="socks6fast.server"):
                new = await handshake_on(sock, context)  # same socket: same 5-tuple, old state lost
                await wait_for(lambda: list(dtls.channels) not in ([], [old_channel]))
            assert dtls.restarts == 1
            assert any(
                "started a new connection from the same port" in r.getMessage() for r in caplog.records
            )
            with pytest.raises(TimeoutError):  # D28: mapped to the old connection, not re-mapped
                await dtls_roundtrip(sock, new, first.core.datagram(b"stale", *echo), timeout=0.3)
            assert (await dtls_roundtrip(sock, new, second.core.datagram(b"two", *echo))).endswith(b"two")
            assert len(dtls.channels) == 1
        finally:
            sock.close()
            await first.aclose()
            await second.aclose()


async def assoc_roundtrip(assoc: Any, echo: tuple[str, int]) -> None:
    await assoc.sendto(b"still here", echo)
    assert await assoc.recvfrom(timeout=5) == (b"still here", echo)


@pytest.mark.conformance("UDP-02")
async def test_garbage_and_truncated_records_are_dropped(engine: str, certs: Certificates) -> None:
    """Garbage and truncated records, on the DTLS port (no connection: dropped before
    OpenSSL) and on an established connection (the engine's channel drops them), change
    nothing: the association goes on, and the drops are counted."""
    proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
    proxy_dtls = dtls_client_context(cafile=str(certs.ca))
    async with dtls_server(certs) as server, udp_echo() as echo:
        dtls = ports(server)
        (port,) = dtls.ports
        endpoint = dtls.servers[0].endpoint
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            for junk in (b"", b"\x00" * 40, os.urandom(200), bytes.fromhex("16fefd") + b"\x00" * 5):
                stranger.sendto(junk, port)
        await wait_for(lambda: endpoint.counters.records_dropped >= 3)
        assert endpoint.connections == {}
        async with await aclient.udp_associate(
            tls_url(server), proxy_ssl=proxy_ssl, proxy_dtls=proxy_dtls
        ) as a:
            await assoc_roundtrip(a, echo)
            assert a._dtls is not None and a._dtls._transport is not None
            record = a._dtls.conn.send(a.core.datagram(b"x" * 64, *echo))
            for junk in (os.urandom(100), record[:20], record[:-3], record[:11] + b"\xff\xff" + record[13:]):
                a._dtls._transport.sendto(junk)
            await assoc_roundtrip(a, echo)


@pytest.mark.conformance("UDP-02")
async def test_bad_cookie_is_refused_by_the_dtls_port(certs: Certificates) -> None:
    """A ClientHello whose cookie is wrong gets a fresh HelloVerifyRequest and no state (the
    server's DTLS port, over loopback)."""
    async with dtls_server(certs) as server:
        dtls = ports(server)
        (port,) = dtls.ports
        endpoint = dtls.servers[0].endpoint
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect(port)
            client = DTLSClientConnection(dtls_client_context(cafile=str(certs.ca)), "127.0.0.1")
            client.start(0.0)
            (hello,) = client.datagrams_to_send()
            sock.send(hello)
            verify = await asyncio.to_thread(sock.recv, 2048)
            assert verify[13] == 3  # HelloVerifyRequest
            client.datagram_received(verify, 0.0)
            (hello2,) = client.datagrams_to_send()
            at = 13 + 12 + 2 + 32
            at += 1 + hello2[at]
            start = at + 1
            forged = hello2[:start] + bytes([hello2[start] ^ 0x55]) + hello2[start + 1 :]
            sock.send(forged)
            again = await asyncio.to_thread(sock.recv, 2048)
            assert again[13] == 3  # refused: a new HelloVerifyRequest, no ServerHello
        assert endpoint.counters.cookies_bad == 1 and endpoint.connections == {}


async def test_client_hello_flood_keeps_no_state(engine: str, certs: Certificates) -> None:
    """A ClientHello flood from many source ports on loopback (bounded: 300 sockets x 2 hellos,
    10 s) gets HelloVerifyRequests and leaves no connection and no handshake behind; a real
    client then still gets through."""
    async with dtls_server(certs) as server, udp_echo() as echo:
        dtls = ports(server)
        (port,) = dtls.ports
        endpoint = dtls.servers[0].endpoint
        maker = DTLSClientConnection(dtls_client_context(cafile=str(certs.ca)), "127.0.0.1")
        maker.start(0.0)
        (hello,) = maker.datagrams_to_send()
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(300)]
        try:
            started = time.monotonic()
            for _round in range(2):
                for n, sock in enumerate(socks):
                    sock.sendto(hello, port)
                    if n % 25 == 24:
                        await asyncio.sleep(0.002)  # let the proxy read: its socket buffer is finite
            # Most are answered (the kernel may drop some when the socket buffer is full).
            await wait_for(lambda: endpoint.counters.cookies_sent >= 300, timeout=10)
            assert time.monotonic() - started < 10
        finally:
            for sock in socks:
                sock.close()
        assert endpoint.connections == {} and endpoint._handshaking == {} and endpoint._per_source == {}
        proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
        proxy_dtls = dtls_client_context(cafile=str(certs.ca))
        async with await aclient.udp_associate(
            tls_url(server), proxy_ssl=proxy_ssl, proxy_dtls=proxy_dtls
        ) as a:
            await assoc_roundtrip(a, echo)


@pytest.mark.conformance("TRN-03")
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", ["unknown CA", "wrong name"])
async def test_proxy_certificate_that_does_not_verify_fails_cleanly(
    flavour: str, case: str, certs: Certificates, tmp_path: Path
) -> None:
    """TRN-03: verification is on by default: a DTLS proxy certificate from a CA the client
    does not trust (the default context: the system's CAs), or naming another host, fails
    the association with one DTLSError (an OSError) saying why; nothing leaks and the proxy
    keeps no connection."""
    kwargs: dict[str, Any] = {}
    if case == "unknown CA":
        kwargs["proxy_dtls"] = None
        match = "certificate verify failed"
    else:
        kwargs["proxy_dtls"] = dtls_client_context(cafile=str(certs.ca))
        match = "does not name"
    async with dtls_server(certs) as server:
        before = fd_count()
        proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
        url = tls_url(server)
        if flavour == "asyncio":
            proxy = aclient.Proxy.from_url(
                url, proxy_ssl=proxy_ssl, proxy_server_hostname="127.0.0.1" if case == "unknown CA" else None
            )
            if case == "wrong name":
                proxy.server_hostname = "other.test"
                proxy.ssl_context.check_hostname = False  # type: ignore[union-attr]
            with pytest.raises(DTLSError, match=match):
                await proxy.udp_associate(**kwargs)
        else:
            bproxy = bclient.Proxy.from_url(url, proxy_ssl=proxy_ssl)
            if case == "wrong name":
                bproxy.server_hostname = "other.test"
                assert bproxy.ssl_context is not None
                bproxy.ssl_context.check_hostname = False
            with pytest.raises(DTLSError, match=match):
                await asyncio.to_thread(bproxy.udp_associate, **kwargs)
        await asyncio.sleep(0.2)
        assert fd_count() == before
        assert ports(server).channels == {} and ports(server).servers[0].connections == {}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_no_dtls_port_is_one_clear_error(flavour: str, certs: Certificates) -> None:
    """A proxy that serves no DTLS (``[udp] dtls = false``): the association fails with one
    DTLSError naming the DTLS port (the kernel's port unreachable), not a hang."""
    async with dtls_server(certs, dtls=False) as server:
        assert server.dtls is None
        proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
        proxy_dtls = dtls_client_context(cafile=str(certs.ca))
        started = time.monotonic()
        with pytest.raises(DTLSError, match="DTLS"):
            if flavour == "asyncio":
                await aclient.udp_associate(
                    tls_url(server), proxy_ssl=proxy_ssl, proxy_dtls=proxy_dtls, timeout=3
                )
            else:
                proxy = bclient.Proxy.from_url(tls_url(server), proxy_ssl=proxy_ssl)
                await asyncio.to_thread(proxy.udp_associate, proxy_dtls=proxy_dtls, timeout=3)
        assert time.monotonic() - started < 5


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs Debian's openssl (.ci/run installs it)")
@pytest.mark.conformance("TRN-03", "UDP-02")
async def test_openssl_s_client_against_the_proxy_dtls_port(engine: str, certs: Certificates) -> None:
    """An independent DTLS peer, ``openssl s_client -dtls1_2``, against the real server's DTLS
    port: through the cookie exchange and the handshake (verifying the proxy's certificate),
    and the connection is handed to the UDP engine; the line it sends is no SOCKS 6
    datagram, so the channel drops it, and the channel ends when no association maps to it."""
    async with dtls_server(certs, first_datagram_timeout=1.0) as server:
        dtls = ports(server)
        (port,) = dtls.ports
        proc = await asyncio.create_subprocess_exec(
            "openssl",
            "s_client",
            "-dtls1_2",
            "-connect",
            f"127.0.0.1:{port[1]}",
            "-CAfile",
            str(certs.ca),
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            await wait_for(lambda: dtls.handoffs == 1, timeout=10)
            proc.stdin.write(b"not a socks 6 datagram\n")
            await proc.stdin.drain()
            await wait_for(lambda: not dtls.channels, timeout=10)  # unmapped: ended
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            out = await proc.stdout.read()
            await proc.wait()
        assert b"Verify return code: 0 (ok)" in out
        endpoint = dtls.servers[0].endpoint
        assert endpoint.counters.cookies_sent >= 1 and endpoint.counters.handshakes_done == 1


def test_config_dtls_keys() -> None:
    """``[udp] dtls`` is a boolean (one sentence otherwise); DTLS is served beside TLS
    listeners by default, on ``dtls_port`` without one, and not at all with ``dtls = false``
    or without a certificate."""
    with pytest.raises(ConfigError, match='udp.dtls: "yes" is not true or false'):
        parse_config({"udp": {"dtls": "yes"}})
    plain = parse_config({})
    assert plain.udp.dtls and not plain.udp.dtls_served(plain.server)


def test_socks6_tls_datagrams_default_to_dtls() -> None:
    """D30: ``socks6+tls://`` associations default to ``transport="dtls"``; ``socks6://`` ones
    to plain UDP; the sans-IO association takes "dtls" and refuses other names."""
    assert new_association({}, tls=True).transport == "dtls"
    assert new_association({}, tls=False).transport == "udp"
    with pytest.raises(ValueError, match="'tcp', 'udp' or 'dtls'"):
        ClientAssociation(transport="quic")  # type: ignore[arg-type]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.conformance("UDP-02")
async def test_dtls_port_without_a_tls_listener(engine: str, certs: Certificates) -> None:
    """``[udp] dtls_port`` with no TLS listener opens the DTLS port on the plain listener's
    address; a ``socks6://`` client reaches it with ``transport="dtls"`` and ``udp_port``."""
    port = _free_udp_port()
    tls = {"tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    config = make_config(server=tls, udp={"dtls_port": port})
    async with running_server(config) as server, udp_echo() as echo:
        assert ports(server).ports == [("127.0.0.1", port)] and server.tls_addresses == []
        host, tcp_port = server.addresses[0][:2]
        proxy_dtls = dtls_client_context(cafile=str(certs.ca))
        url = f"socks6://{host}:{tcp_port}"
        async with await aclient.udp_associate(
            url, transport="dtls", udp_port=port, proxy_dtls=proxy_dtls
        ) as a:
            assert a.transport == "dtls"
            await assoc_roundtrip(a, echo)


async def test_a_taken_dtls_port_stops_start_up(certs: Certificates) -> None:
    """A DTLS port that cannot be bound stops the server with one sentence naming it and the
    keys to change; nothing stays open."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        tls = {"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
        before = fd_count()
        server = Server(make_config(server=tls, udp={"dtls_port": port}))
        with pytest.raises(
            OSError, match=rf"DTLS 127\.0\.0\.1:{port}: .*set \[udp\] dtls_port, or dtls = false"
        ):
            await server.start()
        await server.close(drain_timeout=0)
        assert fd_count() <= before


IN_NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.mark.conformance("UDP-02", "UDP-07")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs unshare -n")
def test_finished_handshakes_without_an_association_are_capped(certs: Certificates) -> None:
    """Probe 19 F4: 40 full DTLS handshakes from one source address that never send a
    datagram (bounded: 40, 30 s; inside a network namespace of its own) hold at most
    ``dtls_handshakes_per_source`` (4) channels and descriptors; the rest get a close_notify
    at the hand-off; the channels end after ``dtls_unmapped_timeout`` (1 s), not after the
    first-datagram timeout (30 s); a real association maps afterwards."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    helper = Path(__file__).with_name("helpers_dtls_unmapped.py")
    result = subprocess.run(
        [*IN_NETNS, sys.executable, str(helper), str(certs.cert), str(certs.key), str(certs.ca)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["handshakes"] + report["failed"] == 40 and report["seconds"] < 30, report
    assert report["most_unmapped"] <= 4 and report["most_channels"] <= 4, report
    # Each finished handshake was admitted or refused; at most 4 are admitted per unmapped
    # timeout (1 s) that passed during the loop.
    assert report["refused"] >= 40 - 4 * (1 + math.ceil(report["seconds"])), report
    assert report["most_server_fds"] <= 4 + 4, report  # one socket per channel, a little slack
    assert report["left_channels"] == 0 and report["left_unmapped"] == 0, report
    assert report["left_server_fds"] <= 2, report
    assert report["association_after"], report
    assert "refused: too many DTLS connections without an association yet" in result.stderr
    assert result.stderr.count("refused: too many DTLS") == 1  # rate-limited: one line per 10 s


async def test_no_descriptor_at_the_hand_off_closes_the_connection_cleanly(
    certs: Certificates, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe 19 F5: when the connection's socket cannot be created at the hand-off (EMFILE),
    the proxy logs one warning and closes the DTLS connection (close_notify); nothing raises
    into the event loop, nothing is left in the endpoint, and the next client gets through."""
    real_socket = socket.socket

    class NoDescriptor(real_socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if sys._getframe(1).f_code.co_name == "_hand_off":  # only the hand-off's socket
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            super().__init__(*args, **kwargs)

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        async with dtls_server(certs) as server, udp_echo() as echo:
            dtls = ports(server)
            (port,) = dtls.ports
            endpoint = dtls.servers[0].endpoint
            context = dtls_client_context(cafile=str(certs.ca))
            monkeypatch.setattr(socket, "socket", NoDescriptor)
            with caplog.at_level("WARNING", logger="socks6fast.server"):
                for _ in range(3):
                    with contextlib.suppress(DTLSError):
                        client = await aclient_open_dtls(port, context)
                        await asyncio.sleep(0.05)
                        client.close()
                await asyncio.sleep(0.1)
            monkeypatch.undo()
            assert unhandled == []
            assert endpoint.connections == {} and dtls.channels == {} and dtls.refused == 3
            lines = [r.getMessage() for r in caplog.records if "cannot open a socket" in r.getMessage()]
            assert len(lines) == 1 and "Too many open files" in lines[0]  # rate-limited
            proxy_ssl = ssl.create_default_context(cafile=str(certs.ca))
            async with await aclient.udp_associate(
                tls_url(server), proxy_ssl=proxy_ssl, proxy_dtls=context
            ) as assoc:
                await assoc_roundtrip(assoc, echo)
    finally:
        loop.set_exception_handler(None)


async def aclient_open_dtls(port: tuple[str, int], context: Any) -> Any:
    from socks6fast.asyncio.dtls import open_dtls_client  # noqa: PLC0415

    return await open_dtls_client(port[0], port[1], proxy_dtls=context, timeout=5)


@pytest.mark.conformance("TRN-03")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_own_dtls_context_without_verification_is_refused_by_the_clients(
    flavour: str, certs: Certificates
) -> None:
    """Probe 19 F3: ``proxy_dtls=`` an own OpenSSL context without VERIFY_PEER (the CA loaded,
    set_verify forgotten) is a ValueError in both clients, not a silent unverified session;
    ``dtls_client_context(verify=False)``, the explicit opt-out, connects without a CA."""
    from OpenSSL import SSL  # noqa: PLC0415

    forgotten = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    forgotten.load_verify_locations(str(certs.ca))
    async with dtls_server(certs) as server, udp_echo() as echo:

        async def body(assoc: Any) -> None:
            await assoc_roundtrip(assoc, echo)

        with pytest.raises(ValueError, match="does not verify the proxy's certificate"):
            await in_flavour(flavour, tls_url(server), certs, body, proxy_dtls=forgotten)
        await in_flavour(flavour, tls_url(server), certs, body, proxy_dtls=dtls_client_context(verify=False))


@pytest.mark.conformance("UDP-07")
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_dtls_handshake_ends_when_the_proxy_closes_the_association(flavour: str) -> None:
    """Probe 19 F7: ``transport="dtls"`` towards a port that does not speak DTLS (the plain
    SOCKS 6 UDP port here): the proxy closes the association's TCP connection after its
    first-datagram timeout (UDP-07, 1 s), and the client's handshake ends then with a DTLSError
    saying so, not after its own 30 s; on a ``socks6://`` URL the hint names the TCP
    connection, not TLS."""
    async with running_server(make_config(udp={"first_datagram_timeout": 1})) as server:
        host, port = server.addresses[0][:2]
        udp_port = server.udp.ports[0][1] if server.udp is not None else 0
        url = f"socks6://{host}:{port}"
        kwargs: dict[str, Any] = {"transport": "dtls", "udp_port": udp_port, "timeout": 30}
        started = time.monotonic()
        with pytest.raises(DTLSError) as info:
            if flavour == "asyncio":
                await aclient.udp_associate(url, **kwargs)
            else:
                await asyncio.to_thread(bclient.Proxy.from_url(url).udp_associate, **kwargs)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert "closed the association's TCP connection first" in message, message
        assert "TLS connection" not in message, message


@pytest.mark.conformance("TRN-03")
async def test_client_certificates_on_the_tls_listener_and_the_dtls_port(
    engine: str, certs: Certificates, tmp_path: Path
) -> None:
    """`[server] tls_client_ca`: the TLS listener and the DTLS port beside it both require a
    client certificate from that CA. socks6fast's client presenting one relays over DTLS;
    without one the TLS handshake fails, and over DTLS a certificate from another CA or none
    fails the association with one DTLSError; the proxy keeps no DTLS connection and leaks no
    descriptor."""
    from test_dtls import _make_client_cert  # noqa: PLC0415 - the client CA builder lives there

    (tmp_path / "good").mkdir()
    (tmp_path / "other").mkdir()
    good, other = _make_client_cert(tmp_path / "good"), _make_client_cert(tmp_path / "other")
    tls = {
        "tls_listen": ["127.0.0.1:0"],
        "tls_certificate": str(certs.cert),
        "tls_key": str(certs.key),
        "tls_client_ca": str(good.ca),
    }
    async with udp_echo() as echo, running_server(make_config(server=tls)) as server:
        url = tls_url(server)
        before = fd_count()
        with_cert = ssl.create_default_context(cafile=str(certs.ca))
        with_cert.load_cert_chain(str(good.cert), str(good.key))
        dtls_with_cert = dtls_client_context(
            cafile=str(certs.ca), certfile=str(good.cert), keyfile=str(good.key)
        )
        async with await aclient.udp_associate(url, proxy_ssl=with_cert, proxy_dtls=dtls_with_cert) as assoc:
            await assoc_roundtrip(assoc, echo)
        # TLS 1.3: the server's refusal of a missing certificate reaches the client at its
        # first read: an SSL alert, a reset, or the connection closed before any reply.
        with pytest.raises((ssl.SSLError, ConnectionError, RemoteProtocolError)):
            await aclient.udp_associate(url, proxy_ssl=ssl.create_default_context(cafile=str(certs.ca)))
        for dtls in (
            dtls_client_context(cafile=str(certs.ca), certfile=str(other.cert), keyfile=str(other.key)),
            dtls_client_context(cafile=str(certs.ca)),
        ):
            with pytest.raises(DTLSError):
                await aclient.udp_associate(url, proxy_ssl=with_cert, proxy_dtls=dtls)
        await wait_for(lambda: ports(server).channels == {} and ports(server).servers[0].connections == {})
        await asyncio.sleep(0.2)
        assert fd_count() == before
        # A reload that trusts another client CA (SIGHUP): the DTLS port follows the TLS
        # listener for new handshakes (the trial: before, DTLS kept the old CA).
        server.reload(make_config(server={**tls, "tls_client_ca": str(other.ca)}))
        with_other = ssl.create_default_context(cafile=str(certs.ca))
        with_other.load_cert_chain(str(other.cert), str(other.key))
        with pytest.raises(DTLSError):
            await aclient.udp_associate(url, proxy_ssl=with_other, proxy_dtls=dtls_with_cert)
        dtls_with_other = dtls_client_context(
            cafile=str(certs.ca), certfile=str(other.cert), keyfile=str(other.key)
        )
        async with await aclient.udp_associate(
            url, proxy_ssl=with_other, proxy_dtls=dtls_with_other
        ) as assoc:
            await assoc_roundtrip(assoc, echo)


def test_config_tls_client_ca(tmp_path: Path) -> None:
    """`tls_client_ca` must name a file and needs the proxy's own certificate."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    with pytest.raises(ConfigError, match="server.tls_client_ca: needs server.tls_certificate"):
        parse_config({"server": {"tls_client_ca": str(ca)}})
    with pytest.raises(ConfigError, match="server.tls_client_ca: .* does not exist"):
        parse_config({"server": {"tls_client_ca": str(tmp_path / "missing.pem")}})
