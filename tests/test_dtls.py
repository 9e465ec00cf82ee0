"""The DTLS layer for SOCKS 6 datagrams (issue 11, first half): socks6fast.net.dtls and
socks6fast.asyncio.dtls, on their own, so no test here claims a CONFORMANCE ID: the proxy's
DTLS ports and the SOCKS client's DTLS transport (UDP-02, UDP-03, the DTLS half of TRN-03) are
tested end to end in tests/test_dtls_udp.py.

Real handshakes on 127.0.0.1 and ::1 with the test CA of helpers_server: our client against
our server endpoint, and ``openssl s_client -dtls1_2`` (an independent DTLS peer) against
the server's cookie exchange and handshake. The bad-input cases drive the sans-IO server
endpoint in memory (no socket, nothing sent anywhere): a ClientHello flood from many source
ports keeps no state before the cookie, caps on handshakes in progress, garbage and
truncated records, wrong, expired and other-address cookies, replayed and forged records.
Certificates that do not verify (server's, client's) fail with one clear error.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers_server import Certificates, make_certificates
from helpers_udp import has_ipv6_loopback
from OpenSSL import SSL

from socks6fast.asyncio.dtls import DTLSServer, open_dtls_client, start_dtls_server
from socks6fast.config import parse_config
from socks6fast.net.dtls import (
    CT_APPLICATION_DATA,
    CookieJar,
    DTLSClientConnection,
    DTLSConnection,
    DTLSError,
    DTLSLimits,
    DTLSServerEndpoint,
    dtls_client_context,
    dtls_server_context,
    is_client_hello,
    pack_records,
    proxy_dtls_context,
    source_key,
    split_records,
)

HOSTS = ["127.0.0.1", "::1"]


def host_param(host: str) -> object:
    return pytest.param(
        host, marks=pytest.mark.skipif(host == "::1" and not has_ipv6_loopback(), reason="no ::1")
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("dtls"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """Another CA and certificate: trusted by nobody here."""
    return make_certificates(tmp_path_factory.mktemp("dtls-other"))


@dataclass
class ClientCert:
    ca: Path
    cert: Path
    key: Path


def _make_client_cert(directory: Path) -> ClientCert:
    """A CA and a client certificate (clientAuth) signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "socks6fast client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = ClientCert(directory / "client-ca.pem", directory / "client.pem", directory / "client.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def client_certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClientCert, ClientCert]:
    """(a client certificate the server trusts, one from a CA it does not know)."""
    return (
        _make_client_cert(tmp_path_factory.mktemp("dtls-client")),
        _make_client_cert(tmp_path_factory.mktemp("dtls-client-other")),
    )


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the sans-IO endpoints in memory ---


class Pair:
    """A server endpoint and a client connection exchanging datagrams in memory."""

    def __init__(
        self,
        certs: Certificates,
        *,
        limits: DTLSLimits | None = None,
        server_context: SSL.Context | None = None,
    ) -> None:
        self.received: list[tuple[DTLSConnection, bytes]] = []
        self.closed: list[tuple[DTLSConnection, str]] = []
        self.server = DTLSServerEndpoint(
            server_context or dtls_server_context(str(certs.cert), str(certs.key)),
            on_datagram=lambda conn, data: self.received.append((conn, data)),
            on_closed=lambda conn, reason: self.closed.append((conn, reason)),
            limits=limits,
        )
        self.client_context = dtls_client_context(cafile=str(certs.ca))

    def client(self) -> DTLSClientConnection:
        return DTLSClientConnection(self.client_context, "127.0.0.1")

    def to_server(self, client: DTLSClientConnection, address: tuple[str, int], now: float) -> None:
        for datagram in client.datagrams_to_send():
            self.server.datagram_received(datagram, address, now)

    def to_client(self, client: DTLSClientConnection, address: tuple[str, int], now: float) -> list[bytes]:
        out = [d for d, a in self.server.datagrams_to_send() if a == address]
        for datagram in out:
            client.datagram_received(datagram, now)
        return out

    def handshake(self, client: DTLSClientConnection, address: tuple[str, int], now: float = 0.0) -> None:
        client.start(now)
        for _ in range(10):
            self.to_server(client, address, now)
            self.to_client(client, address, now)
            if client.established and address in self.server.connections:
                if self.server.connections[address].established:
                    return
        raise AssertionError(f"no handshake: {client.error}, {self.server.counters}")


def _client_hello(context: SSL.Context) -> bytes:
    client = DTLSClientConnection(context, "127.0.0.1")
    client.start(0.0)
    (hello,) = client.datagrams_to_send()
    return hello


def test_cookie_jar_buckets_secrets_and_addresses() -> None:
    """The cookie binds address, port and time bucket; the previous bucket's is still good,
    older ones and other addresses are refused; each bucket has its own secret."""
    jar = CookieJar(10.0)
    cookie = jar.make(("127.0.0.1", 5000), 5.0)
    assert len(cookie) == 16
    assert jar.check(("127.0.0.1", 5000), cookie, 9.9)
    assert jar.check(("127.0.0.1", 5000), cookie, 19.9)  # the previous bucket
    assert not jar.check(("127.0.0.1", 5000), cookie, 20.0)  # expired
    assert not jar.check(("127.0.0.1", 5001), cookie, 5.0)
    assert not jar.check(("127.0.0.2", 5000), cookie, 5.0)
    assert not jar.check(("127.0.0.1", 5000), bytes([cookie[0] ^ 1]) + cookie[1:], 5.0)
    assert jar.make(("127.0.0.1", 5000), 15.0) != cookie  # rotated secret
    other = CookieJar(10.0)
    assert not other.check(("127.0.0.1", 5000), cookie, 5.0)  # a secret per jar, from secrets
    with pytest.raises(ValueError):
        CookieJar(0)


def test_record_framing_helpers() -> None:
    """split_records accepts whole records only; pack_records cuts at record boundaries."""
    record = bytes([23, 0xFE, 0xFD]) + bytes(8) + (5).to_bytes(2, "big") + b"hello"
    assert split_records(record) == [23]
    assert split_records(record * 3) == [23, 23, 23]
    assert split_records(record[:-1]) is None  # truncated
    assert split_records(record[:10]) is None
    assert split_records(b"") is None
    assert split_records(bytes([99]) + record[1:]) is None  # content type
    assert split_records(bytes([23, 3, 3]) + record[3:]) is None  # TLS, not DTLS
    assert pack_records(record * 3, 2 * len(record)) == [record * 2, record]
    big = bytes([22, 0xFE, 0xFD]) + bytes(8) + (100).to_bytes(2, "big") + bytes(100)
    assert pack_records(big + record, 50) == [big, record]  # never cut a record
    assert not is_client_hello(record)


def test_handshake_and_datagrams_in_memory(certs: Certificates) -> None:
    """A full handshake through the stateless cookie exchange, datagrams both ways, and a
    clean close with close_notify."""
    pair = Pair(certs)
    client = pair.client()
    address = ("127.0.0.1", 40000)
    pair.handshake(client, address)
    counters = pair.server.counters
    assert (counters.cookies_sent, counters.cookies_bad, counters.handshakes_done) == (1, 0, 1)
    assert client.ssl.get_protocol_version_name() == "DTLSv1.2"
    assert client.ssl.get_cipher_name() in {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
    conn = pair.server.connections[address]
    for size in (1, 64, 1400, 2**14):
        payload = os.urandom(size)
        pair.server.datagram_received(client.send(payload), address, 1.0)
        assert pair.received[-1] == (conn, payload)
        client.datagram_received(pair.server.send(conn, payload[::-1]), 1.0)
        assert client.received.pop() == payload[::-1]
    for size in (0, 2**14 + 1):
        with pytest.raises(ValueError, match="1 to 16384 bytes"):
            client.send(bytes(size))
        with pytest.raises(ValueError, match="1 to 16384 bytes"):
            pair.server.send(conn, bytes(size))
    client.close()
    pair.to_server(client, address, 2.0)
    assert pair.server.connections == {}
    assert pair.closed == [(conn, "closed by the peer")]
    with pytest.raises(DTLSError, match="not open"):
        pair.server.send(conn, b"late")


def test_client_hello_flood_keeps_no_state_before_the_cookie(certs: Certificates) -> None:
    """5000 ClientHellos from 5000 source ports (bounded: in memory, no socket): each gets a
    HelloVerifyRequest and nothing is kept: no connection, no handshake in progress."""
    pair = Pair(certs)
    hello = _client_hello(pair.client_context)
    assert is_client_hello(hello)
    for port in range(10000, 15000):
        pair.server.datagram_received(hello, ("127.0.0.1", port), 0.0)
        assert not pair.server.connections
    answers = pair.server.datagrams_to_send()
    assert len(answers) == 5000
    assert {a for _, a in answers} == {("127.0.0.1", p) for p in range(10000, 15000)}
    # A HelloVerifyRequest is one small handshake record (type 3), not a server flight.
    assert all(d[0] == 22 and d[13] == 3 and len(d) < 100 for d, _ in answers)
    counters = pair.server.counters
    assert (counters.cookies_sent, counters.handshakes_done, counters.handshakes_refused) == (5000, 0, 0)
    assert pair.server._handshaking == {} and pair.server._per_source == {}
    assert pair.server.next_timer() is None


def test_handshake_caps_per_source_and_total(certs: Certificates) -> None:
    """Handshakes in progress are capped per source address and in total: a ClientHello with
    a valid cookie over a cap is refused (no state, no answer); a finished or timed-out
    handshake frees its place."""
    limits = DTLSLimits(handshakes_per_source=2, handshakes_total=3, handshake_timeout=5.0)
    pair = Pair(certs, limits=limits)

    def stalled(address: tuple[str, int]) -> DTLSClientConnection:
        """A client that sends its ClientHello with the cookie, then goes quiet."""
        client = pair.client()
        client.start(0.0)
        pair.to_server(client, address, 0.0)
        pair.to_client(client, address, 0.0)  # the HelloVerifyRequest
        pair.to_server(client, address, 0.0)  # ClientHello + cookie
        pair.server.datagrams_to_send()
        return client

    stalled(("127.0.0.1", 1))
    stalled(("127.0.0.1", 2))
    stalled(("127.0.0.1", 3))  # third from 127.0.0.1: over the per-source cap
    assert pair.server.counters.handshakes_refused == 1
    assert set(pair.server.connections) == {("127.0.0.1", 1), ("127.0.0.1", 2)}
    stalled(("127.0.0.2", 1))
    stalled(("127.0.0.3", 1))  # fourth in all: over the total cap
    assert pair.server.counters.handshakes_refused == 2
    assert len(pair.server.connections) == 3 and len(pair.server._handshaking) == 3
    # The stalled handshakes time out and free their places.
    deadline = pair.server.next_timer()
    assert deadline is not None and deadline <= 5.0
    pair.server.handle_timer(5.0)
    assert pair.server.connections == {} and pair.server._per_source == {}
    assert pair.server.counters.handshakes_failed == 3
    assert {reason for _, reason in pair.closed} == {"handshake timed out"}
    pair.handshake(pair.client(), ("127.0.0.1", 3), now=6.0)  # room again
    assert pair.server.counters.handshakes_done == 1


def test_handshake_cap_per_source_counts_an_ipv6_64_as_one_source(certs: Certificates) -> None:
    """Probe 19 F8: the per-source cap counts an IPv6 source per /64 (one host or LAN holds a
    whole /64 and can give itself as many addresses as it likes), IPv4 per address, and an
    IPv4-mapped IPv6 source as its IPv4 address."""
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("fe80::1%lo") == "fe80::/64"
    assert source_key("192.0.2.7") == source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("192.0.2.8") != source_key("192.0.2.7")
    limits = DTLSLimits(handshakes_per_source=2, handshakes_total=100, handshake_timeout=5.0)
    pair = Pair(certs, limits=limits)

    def stalled(address: tuple[str, int]) -> None:
        client = pair.client()
        client.start(0.0)
        pair.to_server(client, address, 0.0)
        pair.to_client(client, address, 0.0)  # the HelloVerifyRequest
        pair.to_server(client, address, 0.0)  # ClientHello + cookie
        pair.server.datagrams_to_send()

    for n in range(1, 5):  # four addresses of one /64
        stalled((f"2001:db8:1:2::{n}", 1000))
    assert pair.server.counters.handshakes_refused == 2
    stalled(("2001:db8:1:3::1", 1000))  # another /64: its own count
    assert pair.server.counters.handshakes_refused == 2 and len(pair.server._handshaking) == 3
    pair.server.handle_timer(5.0)
    assert pair.server._per_source == {} and pair.server._handshaking == {}


def test_connection_cap_and_limits_from_config(certs: Certificates) -> None:
    """max_connections bounds what is kept in all (established or not); the [udp] keys map
    onto DTLSLimits."""
    pair = Pair(certs, limits=DTLSLimits(max_connections=2))
    pair.handshake(pair.client(), ("127.0.0.1", 1))
    pair.handshake(pair.client(), ("127.0.0.1", 2))
    with pytest.raises(AssertionError, match="no handshake"):
        pair.handshake(pair.client(), ("127.0.0.1", 3))
    assert pair.server.counters.handshakes_refused >= 1 and len(pair.server.connections) == 2
    udp = parse_config(
        {"udp": {"dtls_handshakes_per_source": 3, "dtls_handshakes_total": 9, "dtls_cookie_interval": 5}}
    ).udp
    limits = DTLSLimits.from_config(udp, idle_timeout=42.0)
    assert (limits.handshakes_per_source, limits.handshakes_total, limits.cookie_interval) == (3, 9, 5.0)
    assert limits.idle_timeout == 42.0 and DTLSLimits.from_config(udp).idle_timeout == 300.0


def _cookie_span(hello: bytes) -> tuple[int, int]:
    """Where the cookie sits in a DTLS 1.2 ClientHello datagram (RFC 6347 section 4.2.1)."""
    at = 13 + 12 + 2 + 32  # record header, handshake header, client_version, random
    at += 1 + hello[at]  # session_id
    return at + 1, at + 1 + hello[at]


def _hello_with_cookie(pair: Pair, address: tuple[str, int], now: float) -> bytes:
    client = pair.client()
    client.start(now)
    pair.to_server(client, address, now)
    pair.to_client(client, address, now)
    (hello,) = client.datagrams_to_send()
    start, end = _cookie_span(hello)
    assert end - start == 16
    return hello


@pytest.mark.parametrize("case", ["wrong", "expired", "other port", "other address"])
def test_bad_cookie_is_refused(certs: Certificates, case: str) -> None:
    """A ClientHello whose cookie is wrong, expired (two buckets later) or made for another
    address or port gets a new HelloVerifyRequest, and no state."""
    pair = Pair(certs, limits=DTLSLimits(cookie_interval=10.0))
    address = ("127.0.0.1", 4000)
    hello = _hello_with_cookie(pair, address, 1.0)
    now, source = 1.0, address
    if case == "wrong":
        start, _ = _cookie_span(hello)
        hello = hello[:start] + bytes([hello[start] ^ 0x55]) + hello[start + 1 :]
    elif case == "expired":
        now = 20.0
    elif case == "other port":
        source = ("127.0.0.1", 4001)
    else:
        source = ("127.0.0.2", 4000)
    pair.server.datagram_received(hello, source, now)
    assert pair.server.counters.cookies_bad == 1
    assert pair.server.connections == {}
    (answer,) = pair.server.datagrams_to_send()
    assert answer[1] == source and answer[0][13] == 3  # a fresh HelloVerifyRequest
    # The same hello, unchanged and in time, from its own address, is accepted (control).
    if case != "wrong":
        pair.server.datagram_received(_hello_with_cookie(pair, address, 1.0), address, 1.0)
        assert address in pair.server.connections


def test_garbage_truncated_forged_and_replayed_records_are_dropped(certs: Certificates) -> None:
    """Garbage and truncated datagrams are dropped before OpenSSL and counted, from unknown
    peers and on a connection; a forged (bad MAC) or replayed application record is dropped
    by OpenSSL and counted; the connection goes on."""
    pair = Pair(certs)
    hello = _client_hello(pair.client_context)
    unknown = ("127.0.0.1", 7000)
    for bad in (b"", b"\x00", os.urandom(200), hello[:40], hello[:-1], bytes([23]) + hello[1:]):
        pair.server.datagram_received(bad, unknown, 0.0)
    assert pair.server.counters.records_dropped == 6
    assert pair.server.datagrams_to_send() == [] and pair.server.connections == {}

    client = pair.client()
    address = ("127.0.0.1", 7001)
    pair.handshake(client, address)
    dropped = pair.server.counters.records_dropped
    record = client.send(b"genuine")
    assert split_records(record) == [CT_APPLICATION_DATA]
    forged = record[:-1] + bytes([record[-1] ^ 1])
    for bad in (os.urandom(100), record[:-3], record[:12], forged):
        pair.server.datagram_received(bad, address, 1.0)
    assert pair.received == []
    pair.server.datagram_received(record, address, 1.0)
    pair.server.datagram_received(record, address, 1.0)  # replayed
    assert [data for _, data in pair.received] == [b"genuine"]
    assert pair.server.counters.records_dropped == dropped + 5
    assert address in pair.server.connections
    pair.server.datagram_received(client.send(b"still here"), address, 1.0)
    assert pair.received[-1][1] == b"still here"


def test_handshake_retransmission_and_idle_expiry(certs: Certificates) -> None:
    """A lost server flight is sent again on OpenSSL's timer (DTLSv1_get_timeout /
    DTLSv1_handle_timeout); an established connection idle for idle_timeout is closed."""
    pair = Pair(certs, limits=DTLSLimits(idle_timeout=30.0))
    client = pair.client()
    address = ("127.0.0.1", 8000)
    client.start(0.0)
    pair.to_server(client, address, 0.0)
    pair.to_client(client, address, 0.0)
    pair.to_server(client, address, 0.0)  # ClientHello + cookie: the server sends its flight...
    flight = pair.server.datagrams_to_send()  # ...which is lost
    assert flight
    at = pair.server.next_timer()
    assert at is not None and 0 < at <= 2.0  # OpenSSL's first timer is 1 s
    time.sleep(at + 0.05)  # OpenSSL's timer runs on the real clock
    pair.server.handle_timer(at + 0.05)
    again = pair.server.datagrams_to_send()
    assert [d for d, _ in again] and len(again) == len(flight)
    for datagram, _ in again:
        client.datagram_received(datagram, at)
    for _ in range(5):
        pair.to_server(client, address, at)
        pair.to_client(client, address, at)
    assert client.established and pair.server.connections[address].established
    pair.server.handle_timer(at + 30.0)
    assert pair.server.connections == {} and pair.server.counters.expired == 1
    (close_notify,) = pair.server.datagrams_to_send()
    assert close_notify[0][0] == 21  # an alert: close_notify
    client.datagram_received(close_notify[0], at + 30.0)
    assert isinstance(client.error, DTLSError) and "closed" in str(client.error)


def test_peer_restarting_from_the_same_port_gets_a_new_connection(certs: Certificates) -> None:
    """RFC 6347 section 4.2.8: a new ClientHello (epoch 0) with a valid cookie from the
    address of an established connection replaces it."""
    pair = Pair(certs)
    address = ("127.0.0.1", 9000)
    pair.handshake(pair.client(), address)
    old = pair.server.connections[address]
    pair.handshake(pair.client(), address, now=1.0)
    assert pair.server.connections[address] is not old
    assert (old, "the peer started a new connection") in pair.closed


def test_proxy_dtls_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="plain UDP"):
        proxy_dtls_context(False)
    context = proxy_dtls_context(None)
    assert context.get_verify_mode() & SSL.VERIFY_PEER  # verification on by default


@pytest.mark.conformance("TRN-03")
def test_own_context_that_does_not_verify_is_refused(certs: Certificates) -> None:
    """Probe 19 F3 (TRN-03): pyOpenSSL contexts start with VERIFY_NONE, so an own context that
    loaded a CA but never called set_verify would check neither certificate nor name: it is
    refused with a ValueError that says so; one that verifies is used as it is, and
    ``dtls_client_context(verify=False)`` is the explicit opt-out."""
    bare = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    with pytest.raises(ValueError, match=r"does not verify .*set_verify\(SSL.VERIFY_PEER\)"):
        proxy_dtls_context(bare)
    loaded = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    loaded.load_verify_locations(str(certs.ca))  # the CA loaded, set_verify forgotten
    with pytest.raises(ValueError, match="verify=False"):
        proxy_dtls_context(loaded)
    loaded.set_verify(SSL.VERIFY_PEER)
    assert proxy_dtls_context(loaded) is loaded
    opted_out = dtls_client_context(verify=False)
    assert proxy_dtls_context(opted_out) is opted_out
    assert not opted_out.get_verify_mode() & SSL.VERIFY_PEER


# --- real sockets ---


async def _echo_server(certs: Certificates, host: str, **kwargs: object) -> DTLSServer:
    server: DTLSServer | None = None

    def echo(conn: DTLSConnection, data: bytes) -> None:
        assert server is not None
        server.send(conn, data)

    context = kwargs.pop("context", None) or dtls_server_context(str(certs.cert), str(certs.key))
    assert isinstance(context, SSL.Context)
    server = await start_dtls_server(host, 0, context, on_datagram=echo, **kwargs)  # type: ignore[arg-type]
    return server


@pytest.mark.parametrize("host", [host_param(h) for h in HOSTS])
async def test_our_client_and_server_echo(certs: Certificates, host: str) -> None:
    """Our client verifies the proxy certificate (private CA, name
    checked: 127.0.0.1 / ::1 IP entries) and datagrams of 64 B, 1400 B and 16 KiB echo."""
    before = fd_count()
    server = await _echo_server(certs, host)
    port = server.sockname()[1]
    client = await open_dtls_client(host, port, proxy_dtls=dtls_client_context(cafile=str(certs.ca)))
    for size in (64, 1400, 2**14):
        payload = os.urandom(size)
        client.send(payload)
        assert await asyncio.wait_for(client.recv(), 5) == payload
    counters = server.counters
    assert (counters.handshakes_done, counters.cookies_sent, counters.records_dropped) == (1, 1, 0)
    client.close()
    await client.wait_closed()
    for _ in range(50):
        if not server.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.connections  # the close_notify arrived
    server.close()
    await server.wait_closed()
    assert fd_count() == before


async def test_many_clients_concurrently(certs: Certificates) -> None:
    """20 clients at once from their own ports, each echoing its own datagrams."""
    server = await _echo_server(certs, "127.0.0.1")
    port = server.sockname()[1]
    context = dtls_client_context(cafile=str(certs.ca))

    async def one(i: int) -> None:
        async with await open_dtls_client("127.0.0.1", port, proxy_dtls=context) as client:
            for j in range(5):
                client.send(b"%d-%d" % (i, j))
                assert await asyncio.wait_for(client.recv(), 5) == b"%d-%d" % (i, j)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert server.counters.handshakes_done == 20
    server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs Debian's openssl (.ci/run installs it)")
async def test_openssl_s_client_completes_cookie_exchange_and_handshake(certs: Certificates) -> None:
    """An independent DTLS peer: ``openssl s_client -dtls1_2`` goes through our
    HelloVerifyRequest and handshake, verifies our certificate, and gets its line echoed."""
    server = await _echo_server(certs, "127.0.0.1")
    port = server.sockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-dtls1_2",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(certs.ca),
        "-verify_return_error",
        "-verify_ip",
        "127.0.0.1",
        "-quiet",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b"hello over dtls\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
    finally:
        proc.terminate()
        stderr = await proc.stderr.read()
        await proc.wait()
    assert line == b"hello over dtls\n", stderr.decode(errors="replace")
    counters = server.counters
    assert counters.cookies_sent >= 1 and counters.cookies_bad == 0
    assert counters.handshakes_done == 1
    server.close()


async def _expect_failure(
    certs: Certificates, client_context: SSL.Context, match: str, *, hostname: str | None = None, **kw: object
) -> DTLSServer:
    before = fd_count()
    server = await _echo_server(certs, "127.0.0.1", **kw)
    port = server.sockname()[1]
    with pytest.raises(DTLSError, match=match):
        await open_dtls_client("127.0.0.1", port, proxy_dtls=client_context, proxy_server_hostname=hostname)
    for _ in range(50):  # the client's fatal alert reaches the server
        if server.counters.handshakes_failed:
            break
        await asyncio.sleep(0.01)
    assert server.connections == {}
    server.close()
    await server.wait_closed()
    assert fd_count() == before
    return server


async def test_server_certificate_from_an_unknown_ca_fails_cleanly(
    certs: Certificates, other_certs: Certificates
) -> None:
    """A proxy certificate that does not verify ends the handshake with one clear
    error on the client and a clean failure on the server (the client's alert)."""
    server = await _expect_failure(
        certs,
        dtls_client_context(cafile=str(other_certs.ca)),
        # The other CA has the same name as ours: OpenSSL finds "its" issuer, and the
        # signature does not check.
        "certificate verify failed: (certificate signature failure|unable to get local issuer)",
    )
    assert server.counters.handshakes_failed == 1


async def test_default_client_context_does_not_trust_a_private_ca(certs: Certificates) -> None:
    """proxy_dtls=None verifies against the system's CAs, which do not include the
    test CA: verification is on by default."""
    await _expect_failure(certs, proxy_dtls_context(None), "certificate verify failed")


async def test_server_certificate_for_another_name_fails(certs: Certificates) -> None:
    """The certificate must name proxy_server_hostname."""
    await _expect_failure(
        certs,
        dtls_client_context(cafile=str(certs.ca)),
        "certificate verify failed: the certificate does not name proxy.invalid",
        hostname="proxy.invalid",
    )


async def test_client_certificates(certs: Certificates, client_certs: tuple[ClientCert, ClientCert]) -> None:
    """With client_cafile the server asks for a client certificate: one from that CA is let
    in; one from another CA, or none, fails cleanly on both sides."""
    good, bad = client_certs

    def server_context() -> SSL.Context:
        return dtls_server_context(str(certs.cert), str(certs.key), client_cafile=str(good.ca))

    server = await _echo_server(certs, "127.0.0.1", context=server_context())
    context = dtls_client_context(cafile=str(certs.ca), certfile=str(good.cert), keyfile=str(good.key))
    async with await open_dtls_client("127.0.0.1", server.sockname()[1], proxy_dtls=context) as client:
        client.send(b"with a certificate")
        assert await asyncio.wait_for(client.recv(), 5) == b"with a certificate"
    server.close()
    await server.wait_closed()
    for certfile, keyfile in ((str(bad.cert), str(bad.key)), (None, None)):
        failed = await _expect_failure(
            certs,
            dtls_client_context(cafile=str(certs.ca), certfile=certfile, keyfile=keyfile),
            "DTLS handshake failed: the proxy refused it \\(.*alert",
            context=server_context(),
        )
        assert failed.counters.handshakes_failed == 1 and failed.counters.handshakes_done == 0


async def test_handshake_timeout_and_refused_port() -> None:
    """No DTLS server there: ICMP port unreachable gives a clear error; a silent peer a
    TimeoutError that names the time (the handshake was retransmitted meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(DTLSError, match="refused"):
        await open_dtls_client("127.0.0.1", port, proxy_dtls=dtls_client_context(), timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with pytest.raises(TimeoutError, match="no answer within 1.5 s"):
            await open_dtls_client(
                "127.0.0.1", silent.getsockname()[1], proxy_dtls=dtls_client_context(), timeout=1.5
            )
        hellos = 0
        silent.setblocking(False)
        while True:
            try:
                silent.recv(65536)
            except BlockingIOError:
                break
            hellos += 1
        assert hellos >= 2  # the first ClientHello and its retransmission after 1 s


IN_NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs unshare -n")
def test_client_hello_flood_over_sockets_in_a_namespace(certs: Certificates) -> None:
    """The flood over real sockets: 1200 ClientHellos from 400 source ports (bounded in
    count and by a 20 s deadline), inside a network namespace of its own (generated traffic).
    Each gets a HelloVerifyRequest; no connection is ever kept and the flood leaves almost
    no Python memory behind; a real client still gets through afterwards."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    helper = Path(__file__).with_name("helpers_dtls.py")
    result = subprocess.run(
        [*IN_NETNS, sys.executable, str(helper), str(certs.cert), str(certs.key), str(certs.ca)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sent"] == 1200 and report["seconds"] < 20
    assert report["answered"] >= 1100  # a few may be lost in the kernel; none are kept
    assert report["hello_verify_requests"] == report["answered"]
    assert report["max_connections"] == 0
    assert report["handshakes_done"] == 1 and report["echoed_after"]
    assert report["memory_growth"] < 64 * 1024


def test_openssl_is_imported_only_by_the_dtls_modules() -> None:
    """pyOpenSSL is loaded by socks6fast.net.dtls (and what imports it) only: the package,
    the asyncio client and server, the config and the CLI do not pull it in."""
    code = (
        "import sys, socks6fast, socks6fast.asyncio, socks6fast.asyncio.server, socks6fast.config, "
        "socks6fast.cli, socks6fast.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('OpenSSL', 'service_identity')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
    code = "import sys, socks6fast.asyncio.dtls; print('OpenSSL.SSL' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "True"  # the check above can see OpenSSL when it is there


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs Debian's openssl (.ci/run installs it)")
async def test_our_client_against_openssl_s_server(certs: Certificates) -> None:
    """The client side against an independent DTLS server, ``openssl s_server -dtls1_2``:
    our client verifies its certificate and datagrams cross both ways."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_server",
        "-dtls1_2",
        "-accept",
        f"127.0.0.1:{port}",
        "-cert",
        str(certs.cert),
        "-key",
        str(certs.key),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            while b"ACCEPT" not in await proc.stdout.readline():
                pass
            async with await open_dtls_client(
                "127.0.0.1", port, proxy_dtls=dtls_client_context(cafile=str(certs.ca))
            ) as client:
                client.send(b"to s_server\n")
                while b"to s_server" not in await proc.stdout.readline():
                    pass
                proc.stdin.write(b"from s_server\n")
                await proc.stdin.drain()
                assert await client.recv() == b"from s_server\n"
    finally:
        proc.kill()
        await proc.wait()
