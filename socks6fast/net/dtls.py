"""DTLS endpoints over memory BIOs, for SOCKS 6 datagrams over DTLS (issue 11).

The draft's third UDP transport (section "UDP ASSOCIATE": datagrams "over an established
DTLS session"; UDP-02, TRN-03; D16). This module is sans-IO in aioquic's style: datagrams
and the time go in, datagrams to send, decrypted datagrams and a next timer come out; it
never touches a socket or a loop (``socks6fast.asyncio.dtls`` does). It lives in ``net/``
rather than ``proto/`` because it drives OpenSSL through pyOpenSSL, which the sans-IO core
must not import (tests/test_imports.py).

Server (`DTLSServerEndpoint`), one UDP socket and a map from the client's 5-tuple (the local
half is the socket's, so the peer address is the key) to a `DTLSConnection`:

- From an unknown peer only a ClientHello is looked at. It goes through a throw-away
  ``Connection`` and ``DTLSv1_listen``: without a valid cookie the answer is a
  HelloVerifyRequest and nothing is kept (RFC 6347 section 4.2.1). The cookie is an HMAC
  over the peer's address and port and a time bucket (`CookieJar`); the secret comes from
  ``secrets`` and is replaced every bucket, the previous one being accepted for one more.
- A ClientHello with a valid cookie becomes a connection only within the caps on
  handshakes in progress (per source address, and in total); otherwise it is refused.
- Handshake flights are retransmitted on OpenSSL's timer (``DTLSv1_get_timeout`` /
  ``DTLSv1_handle_timeout``); a handshake that does not finish in time is dropped;
  established connections expire when idle.
- DTLS 1.2 at least (1.3 where the OpenSSL under pyOpenSSL offers it), ECDHE with AEAD
  suites only, no compression, no renegotiation, no tickets.

Client (`DTLSClientConnection`): certificate and host name verification on by default
(TRN-03), with the same override style as the TLS client's ``proxy_ssl`` (see
`dtls_client_context`).

Datagrams are written to OpenSSL one at a time and drained before the next, since a memory
BIO is a byte stream: fed two datagrams at once, OpenSSL would read them as one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

from ..config import UDPConfig

Address = tuple[str, int]
"""A peer: (host, port); IPv6 flow info and scope are dropped (the socket is bound to one)."""

#: DTLS 1.2's version number (RFC 6347 section 4.1); pyOpenSSL has no constant for it.
DTLS1_2_VERSION = 0xFEFD
#: ECDHE key exchange with AEAD ciphers only (OpenSSL cipher string; DTLS 1.2's list, TLS 1.3
#: style suites are all AEAD).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
#: SSL_OP_NO_RENEGOTIATION (OpenSSL 1.1.0h+); pyOpenSSL has no constant for it.
_OP_NO_RENEGOTIATION = 1 << 30

#: Record content types (RFC 6347 section 4.1, RFC 9147 for 25 = ack).
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
_CT_MAX = 25
RECORD_HEADER = 13
#: Largest record body: 2^14 plaintext plus 2048 of expansion (RFC 6347 section 4.1.1).
MAX_RECORD_BODY = 2**14 + 2048
#: Largest datagram one `send` takes (one record's plaintext, RFC 6347 section 4.1.1).
MAX_PLAINTEXT = 2**14
#: Handshake message type of a ClientHello.
_HS_CLIENT_HELLO = 1
#: Ciphertext MTU for handshake flights: fits a 1500-byte link under IPv6 and UDP headers.
DEFAULT_MTU = 1400
_COOKIE_LENGTH = 16
_BIO_CHUNK = 65536


class DTLSError(OSError):
    """A DTLS handshake or connection failed; the message says why in one sentence.

    An OSError, as ``ssl.SSLError`` is: code that handles network and TLS failures of the
    SOCKS client (``except OSError``) handles the DTLS transport's too."""


def peer_key(address: tuple[Any, ...]) -> Address:
    """The map key of a peer: host and port (an IPv6 address's flow info and scope dropped)."""
    return (address[0], address[1])


def source_key(host: str) -> str:
    """The key the per-source caps count under (F8 of probe 19): an IPv4 address itself, an
    IPv6 address's /64 (one host or one LAN holds a whole /64, so counting per /128 would let
    one IPv6 host open the per-source cap once per address it assigns itself); an
    IPv4-mapped IPv6 address (a dual-stack port) counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def split_records(datagram: bytes) -> list[int] | None:
    """The content type of each DTLS record in ``datagram``, or None when it is not a
    sequence of whole, well-formed record headers (garbage or a truncated record)."""
    types: list[int] = []
    end = len(datagram)
    at = 0
    while at < end:
        if end - at < RECORD_HEADER:
            return None
        content_type = datagram[at]
        length = (datagram[at + 11] << 8) | datagram[at + 12]
        if not CT_CHANGE_CIPHER_SPEC <= content_type <= _CT_MAX or datagram[at + 1] != 0xFE:
            return None
        if length > MAX_RECORD_BODY or at + RECORD_HEADER + length > end:
            return None
        types.append(content_type)
        at += RECORD_HEADER + length
    return types or None


def is_client_hello(datagram: bytes) -> bool:
    """A datagram that starts with an epoch-0 handshake record holding a ClientHello: the
    only thing the server looks at from a peer it has no connection with."""
    return (
        len(datagram) > RECORD_HEADER + 12
        and datagram[0] == CT_HANDSHAKE
        and datagram[1] == 0xFE
        and datagram[3] == 0
        and datagram[4] == 0  # epoch 0
        and datagram[RECORD_HEADER] == _HS_CLIENT_HELLO
    )


class CookieJar:
    """Stateless HelloVerifyRequest cookies (RFC 6347 section 4.2.1).

    cookie = HMAC-SHA256(secret of the bucket, host | port | bucket)[:16], bucket =
    floor(now / interval). Each bucket has its own random secret; the previous bucket's
    secret is still accepted, so a cookie lives between one and two intervals. Secrets older
    than that are forgotten: rotation needs no timer, only the time passed in.
    """

    __slots__ = ("_secrets", "interval")

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError("cookie interval must be positive")
        self.interval = interval
        self._secrets: dict[int, bytes] = {}

    def _secret(self, bucket: int) -> bytes:
        secret = self._secrets.get(bucket)
        if secret is None:
            secret = secrets.token_bytes(32)
            self._secrets[bucket] = secret
            for old in [b for b in self._secrets if b < bucket - 1]:
                del self._secrets[old]
        return secret

    def _mac(self, address: Address, bucket: int, secret: bytes) -> bytes:
        message = b"%s|%d|%d" % (address[0].encode(), address[1], bucket)
        return hmac.digest(secret, message, hashlib.sha256)[:_COOKIE_LENGTH]

    def make(self, address: Address, now: float) -> bytes:
        bucket = int(now // self.interval)
        return self._mac(address, bucket, self._secret(bucket))

    def check(self, address: Address, cookie: bytes, now: float) -> bool:
        bucket = int(now // self.interval)
        self._secret(bucket)  # rotates: drops the secrets older than the previous bucket
        for candidate in (bucket, bucket - 1):
            secret = self._secrets.get(candidate)
            if secret is not None and hmac.compare_digest(self._mac(address, candidate, secret), cookie):
                return True
        return False


@dataclass(frozen=True, slots=True)
class DTLSLimits:
    """Caps and timers of a `DTLSServerEndpoint` (config ``[udp]`` keys in parentheses)."""

    handshakes_per_source: int = 16
    """Handshakes in progress from one source address, IPv6 per /64 (`source_key`)
    (``dtls_handshakes_per_source``)."""
    handshakes_total: int = 1024
    """Handshakes in progress in all (``dtls_handshakes_total``)."""
    cookie_interval: float = 60.0
    """Seconds per cookie secret (``dtls_cookie_interval``)."""
    handshake_timeout: float = 15.0
    """Seconds a handshake may take once its cookie verified."""
    idle_timeout: float = 300.0
    """Seconds without a datagram before an established connection is dropped."""
    mtu: int = DEFAULT_MTU
    """Ciphertext MTU for handshake flights (``set_ciphertext_mtu``)."""
    max_connections: int = 65536
    """Connections kept in all, established or handshaking: a bound on memory, since a
    client with a real address can finish handshakes from as many ports as it likes."""

    @classmethod
    def from_config(cls, udp: UDPConfig, *, idle_timeout: float | None = None) -> DTLSLimits:
        """The limits the ``[udp]`` table sets (the rest at their defaults)."""
        limits = cls(
            handshakes_per_source=udp.dtls_handshakes_per_source,
            handshakes_total=udp.dtls_handshakes_total,
            cookie_interval=udp.dtls_cookie_interval,
        )
        return limits if idle_timeout is None else dataclasses.replace(limits, idle_timeout=idle_timeout)


@dataclass(slots=True)
class DTLSCounters:
    """What a `DTLSServerEndpoint` has done, for logs and tests."""

    handshakes_done: int = 0
    handshakes_refused: int = 0
    """A valid cookie, but over a handshake cap: no state kept, no answer."""
    handshakes_failed: int = 0
    """A handshake that OpenSSL aborted (bad certificate, bad message) or that timed out."""
    cookies_sent: int = 0
    cookies_bad: int = 0
    """A ClientHello with a cookie that is wrong, expired or for another address."""
    records_dropped: int = 0
    """Datagrams dropped before OpenSSL (not whole records, not a ClientHello from an unknown
    peer) and application records OpenSSL discarded (bad MAC, replay)."""
    datagrams_received: int = 0
    datagrams_sent: int = 0
    closed: int = 0
    expired: int = 0
    released: int = 0
    """Established connections handed off with `DTLSServerEndpoint.release`."""


def _harden(context: SSL.Context) -> None:
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(CIPHERS)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_QUERY_MTU
        | SSL.OP_SINGLE_ECDH_USE
        | _OP_NO_RENEGOTIATION
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)


def dtls_server_context(certfile: str, keyfile: str, *, client_cafile: str | None = None) -> SSL.Context:
    """A fresh DTLS server context with the proxy's certificate chain and key (the TLS
    listener's, D16). With ``client_cafile`` clients must present a certificate that
    verifies against it. Hand it to one `DTLSServerEndpoint` unused: it sets the cookie
    callbacks, which pyOpenSSL allows only before the first connection.

    Raises:
        DTLSError: the files cannot be read or the key does not match the certificate.
    """
    context = SSL.Context(SSL.DTLS_SERVER_METHOD)
    _harden(context)
    context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    try:
        context.use_certificate_chain_file(certfile)
        context.use_privatekey_file(keyfile)
        context.check_privatekey()
        if client_cafile is not None:
            context.load_verify_locations(client_cafile)
    except (OSError, SSL.Error) as exc:
        raise DTLSError(f"DTLS certificate {certfile!r} / key {keyfile!r}: {_ssl_reason(exc)}") from None
    if client_cafile is not None:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


#: Client contexts made with ``dtls_client_context(verify=False)``: the explicit opt-out
#: `proxy_dtls_context` accepts (probe 19 F3; a weak set, the contexts are the caller's).
_UNVERIFIED: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def dtls_client_context(
    *,
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    verify: bool = True,
) -> SSL.Context:
    """A verifying DTLS client context, what ``proxy_dtls=None`` uses (TRN-03): the system's
    CAs, or ``cafile``'s (a private CA), and optionally a client certificate. The DTLS
    counterpart of ``ssl.create_default_context(cafile=...)`` for the TLS ``proxy_ssl``.

    ``verify=False`` checks neither the proxy's certificate nor its name: the counterpart of
    ``ssl.CERT_NONE`` with ``check_hostname = False``, and the only way to give the clients
    a context that does not verify (`proxy_dtls_context` refuses one otherwise).

    Raises:
        DTLSError: a file cannot be read.
    """
    context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    _harden(context)
    try:
        if cafile is None:
            context.set_default_verify_paths()
        else:
            context.load_verify_locations(cafile)
        if certfile is not None:
            context.use_certificate_chain_file(certfile)
            context.use_privatekey_file(keyfile if keyfile is not None else certfile)
    except (OSError, SSL.Error) as exc:
        raise DTLSError(f"DTLS client context: {_ssl_reason(exc)}") from None
    if verify:
        context.set_verify(SSL.VERIFY_PEER)
    else:
        context.set_verify(SSL.VERIFY_NONE)
        _UNVERIFIED.add(context)
    return context


def _ssl_reason(exc: BaseException) -> str:
    """The last OpenSSL reason string of an error (one clause, for one sentence)."""
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        entry = exc.args[0][-1]
        if isinstance(entry, tuple) and entry:
            return str(entry[-1])
    return str(exc) or type(exc).__name__


#: X509_V_ERR_* codes a user meets, in OpenSSL's own words.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


class DTLSConnection:
    """One DTLS association with a peer, server or client side."""

    __slots__ = (
        "address",
        "established",
        "handshake_deadline",
        "last_active",
        "retransmit_at",
        "ssl",
        "user",
    )

    def __init__(self, ssl: SSL.Connection, address: Address, now: float, handshake_timeout: float) -> None:
        self.ssl = ssl
        self.address = address
        self.established = False
        self.last_active = now
        self.handshake_deadline = now + handshake_timeout
        self.retransmit_at: float | None = None
        self.user: object = None
        """Free for the caller (the UDP association this connection is mapped to, UDP-03)."""

    def __repr__(self) -> str:
        state = "established" if self.established else "handshaking"
        return f"<DTLSConnection {self.address[0]}:{self.address[1]} {state}>"


def _drain(ssl: SSL.Connection) -> bytes:
    """Everything OpenSSL has written to the outgoing memory BIO."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = ssl.bio_read(_BIO_CHUNK)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def pack_records(stream: bytes, mtu: int) -> list[bytes]:
    """Cut what OpenSSL wrote into datagrams at record boundaries, each at most ``mtu``
    bytes where the records allow (a memory BIO keeps no datagram boundaries, and a record
    cut in two would be dropped by the peer)."""
    datagrams: list[bytes] = []
    start = at = 0
    end = len(stream)
    while at + RECORD_HEADER <= end:
        record_end = at + RECORD_HEADER + ((stream[at + 11] << 8) | stream[at + 12])
        if record_end - start > mtu and at > start:
            datagrams.append(stream[start:at])
            start = at
        at = record_end
    if start < end:
        datagrams.append(stream[start:end])
    return datagrams


OnDatagram = Callable[[DTLSConnection, bytes], None]
OnConnection = Callable[[DTLSConnection], None]
OnClosed = Callable[[DTLSConnection, str], None]


class DTLSServerEndpoint:
    """The server side of one DTLS port (sans-IO; see the module docstring).

    Feed `datagram_received` every datagram of the socket with ``now`` (a monotonic clock),
    send what `datagrams_to_send` returns, call `handle_timer` at `next_timer`. Each
    decrypted datagram goes to ``on_datagram(connection, payload)``; `send` encrypts one
    for a connection and returns the datagram to send to ``connection.address``.
    """

    def __init__(
        self,
        context: SSL.Context,
        *,
        on_datagram: OnDatagram,
        on_established: OnConnection | None = None,
        on_closed: OnClosed | None = None,
        limits: DTLSLimits | None = None,
    ) -> None:
        self.limits = limits if limits is not None else DTLSLimits()
        self.counters = DTLSCounters()
        self.connections: dict[Address, DTLSConnection] = {}
        self._handshaking: dict[Address, DTLSConnection] = {}
        self._per_source: dict[str, int] = {}
        self._jar = CookieJar(self.limits.cookie_interval)
        self._now = 0.0
        self.outgoing: list[tuple[bytes, Address]] = []
        """What `datagrams_to_send` returns next (non-empty: something to send)."""
        self._on_datagram = on_datagram
        self._on_established = on_established
        self._on_closed = on_closed
        self._next_sweep: float | None = None
        self.timer_changed = False
        """Set when `next_timer` may have moved since it was last called (cheap to test per
        datagram; `next_timer` walks the handshakes in progress)."""
        self._context = context
        self.replace_context(context)

    def replace_context(self, context: SSL.Context) -> None:
        """Use ``context`` (unused, from `dtls_server_context`) for the handshakes that start
        from now on (a configuration reload: a new certificate or client CA); established
        connections and handshakes in progress keep theirs."""
        context.set_cookie_generate_callback(self._make_cookie)
        context.set_cookie_verify_callback(self._check_cookie)
        self._context = context

    # --- cookies (called by OpenSSL inside DTLSv1_listen) ---

    def _make_cookie(self, ssl: SSL.Connection) -> bytes:
        self.counters.cookies_sent += 1
        address: Address = ssl.get_app_data()
        return self._jar.make(address, self._now)

    def _check_cookie(self, ssl: SSL.Connection, cookie: bytes) -> bool:
        address: Address = ssl.get_app_data()
        if self._jar.check(address, cookie, self._now):
            return True
        self.counters.cookies_bad += 1
        return False

    # --- input ---

    def datagram_received(self, data: bytes, address: tuple[Any, ...], now: float) -> None:
        """Handle one datagram from ``address``."""
        self._now = now
        self.counters.datagrams_received += 1
        key = (address[0], address[1])
        conn = self.connections.get(key)
        if conn is None:
            self._from_unknown(data, key, now)
            return
        conn.last_active = now
        # Fast path: one application record, the usual datagram once established.
        if (
            len(data) > RECORD_HEADER
            and data[0] == CT_APPLICATION_DATA
            and RECORD_HEADER + ((data[11] << 8) | data[12]) == len(data)
            and conn.established
        ):
            types: list[int] = [CT_APPLICATION_DATA]
        else:
            if conn.established and is_client_hello(data):
                # The peer lost its state and starts again from the same port: a new
                # connection after a new cookie exchange (RFC 6347 section 4.2.8).
                self._from_unknown(data, key, now, replacing=conn)
                return
            found = split_records(data)
            if found is None:
                self.counters.records_dropped += 1
                return
            types = found
        ssl = conn.ssl
        ssl.bio_write(data)
        if not conn.established:
            self._step_handshake(conn, now)
            if not conn.established or self.connections.get(key) is not conn:
                # Still handshaking, or ``on_established`` handed the connection off
                # (`release`): its new owner (an engine thread) is then its only user.
                return
        self._read(conn, types)

    def _from_unknown(
        self, data: bytes, key: Address, now: float, replacing: DTLSConnection | None = None
    ) -> None:
        if not is_client_hello(data) or split_records(data) is None:
            self.counters.records_dropped += 1
            return
        # A throw-away Connection: without a valid cookie it is dropped after the
        # HelloVerifyRequest, so a spoofed source costs no memory (RFC 6347 section 4.2.1).
        ssl = SSL.Connection(self._context, None)
        ssl.set_app_data(key)
        ssl.set_accept_state()
        ssl.set_ciphertext_mtu(self.limits.mtu)
        ssl.bio_write(data)
        try:
            ssl.DTLSv1_listen()
        except SSL.WantReadError:
            self._queue(ssl, key)  # the HelloVerifyRequest, or nothing for a bad hello
            return
        except SSL.Error:
            self.counters.records_dropped += 1
            return
        # The cookie verified: the client owns its address. Keep state only within the caps.
        if replacing is not None:
            self._forget(replacing, "the peer started a new connection")
        host = source_key(key[0])  # F8: IPv6 per /64
        per_source = self._per_source.get(host, 0)
        if (
            len(self._handshaking) >= self.limits.handshakes_total
            or per_source >= self.limits.handshakes_per_source
            or len(self.connections) >= self.limits.max_connections
        ):
            self.counters.handshakes_refused += 1
            return
        conn = DTLSConnection(ssl, key, now, self.limits.handshake_timeout)
        self.connections[key] = conn
        self._handshaking[key] = conn
        self._per_source[host] = per_source + 1
        self._step_handshake(conn, now)

    def _step_handshake(self, conn: DTLSConnection, now: float) -> None:
        ssl = conn.ssl
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            self._queue(ssl, conn.address)
            timeout = ssl.DTLSv1_get_timeout()
            conn.retransmit_at = None if timeout is None else now + timeout
            self.timer_changed = True
            return
        except SSL.Error as exc:
            self._queue(ssl, conn.address)  # the fatal alert, if OpenSSL wrote one
            self.counters.handshakes_failed += 1
            self._forget(conn, f"handshake failed: {_ssl_reason(exc)}")
            return
        self._queue(ssl, conn.address)
        conn.established = True
        conn.retransmit_at = None
        self._end_handshake(conn)
        self.counters.handshakes_done += 1
        if self._next_sweep is None:
            self._next_sweep = now + self.limits.idle_timeout
            self.timer_changed = True
        if self._on_established is not None:
            self._on_established(conn)

    def _read(self, conn: DTLSConnection, types: list[int]) -> None:
        ssl = conn.ssl
        delivered = 0
        for _ in types:
            try:
                payload = ssl.recv(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._queue(ssl, conn.address)
                self._forget(conn, "closed by the peer")
                return
            except SSL.Error as exc:
                self._queue(ssl, conn.address)
                self._forget(conn, f"connection failed: {_ssl_reason(exc)}")
                return
            delivered += 1
            self._on_datagram(conn, payload)
            if conn.address not in self.connections:  # the callback closed it
                return
        application = types.count(CT_APPLICATION_DATA)
        if delivered < application:
            self.counters.records_dropped += application - delivered  # bad MAC or a replay
        if len(types) != application:
            # A retransmitted final flight from the client asks for ours again; alerts.
            self._queue(ssl, conn.address)

    # --- output ---

    def _queue(self, ssl: SSL.Connection, address: Address) -> None:
        stream = _drain(ssl)
        if stream:
            for datagram in pack_records(stream, self.limits.mtu):
                self.outgoing.append((datagram, address))

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """The datagrams to send since the last call, each with its destination."""
        out = self.outgoing
        if out:
            self.outgoing = []
            self.counters.datagrams_sent += len(out)
        return out

    def send(self, conn: DTLSConnection, payload: bytes) -> bytes:
        """Encrypt one datagram for ``conn``: the DTLS datagram to send to ``conn.address``.

        Raises:
            ValueError: ``payload`` is empty or longer than one record can carry (2^14 bytes).
            DTLSError: the connection is not established or is closed.
        """
        if not 0 < len(payload) <= MAX_PLAINTEXT:
            # OpenSSL writes no record for zero bytes; a SOCKS 6 message is never empty.
            raise ValueError(f"a DTLS datagram carries 1 to {MAX_PLAINTEXT} bytes, not {len(payload)}")
        if not conn.established or self.connections.get(conn.address) is not conn:
            raise DTLSError(f"DTLS connection with {conn.address[0]}:{conn.address[1]} is not open")
        ssl = conn.ssl
        try:
            ssl.send(payload)
        except SSL.Error as exc:
            self._queue(ssl, conn.address)
            self._forget(conn, f"connection failed: {_ssl_reason(exc)}")
            raise DTLSError(f"DTLS connection with {conn.address[0]}:{conn.address[1]} failed") from exc
        self.counters.datagrams_sent += 1
        return ssl.bio_read(_BIO_CHUNK)

    def close(self, conn: DTLSConnection) -> None:
        """Close ``conn`` cleanly: a close_notify alert is queued, and its state is dropped."""
        if self.connections.get(conn.address) is not conn:
            return
        try:
            conn.ssl.shutdown()
        except SSL.Error:
            pass
        self._queue(conn.ssl, conn.address)
        self._forget(conn, None)

    def release(self, conn: DTLSConnection) -> SSL.Connection:
        """Hand an established connection off: it is forgotten here (no close_notify, no
        ``on_closed``) and its ``SSL.Connection`` returned for its new owner (the UDP engine's
        DTLS channel, ``UdpEngine.add_channel``). Call it from ``on_established``: what the
        handshake queued (the server's last flight) is still sent by `datagrams_to_send`,
        and nothing here touches the connection after.

        Raises:
            DTLSError: ``conn`` is not an established connection of this endpoint.
        """
        if not conn.established or self.connections.get(conn.address) is not conn:
            raise DTLSError(f"DTLS connection with {conn.address[0]}:{conn.address[1]} is not open")
        self._end_handshake(conn)
        del self.connections[conn.address]
        self.counters.released += 1
        return conn.ssl

    def _end_handshake(self, conn: DTLSConnection) -> None:
        if self._handshaking.pop(conn.address, None) is not None:
            host = source_key(conn.address[0])
            left = self._per_source[host] - 1
            if left:
                self._per_source[host] = left
            else:
                del self._per_source[host]

    def _forget(self, conn: DTLSConnection, reason: str | None) -> None:
        self._end_handshake(conn)
        if self.connections.get(conn.address) is conn:
            del self.connections[conn.address]
        self.counters.closed += 1
        if reason is not None and self._on_closed is not None:
            self._on_closed(conn, reason)

    # --- time ---

    def next_timer(self) -> float | None:
        """When `handle_timer` must be called next (same clock as ``now``), or None."""
        self.timer_changed = False
        deadline = self._next_sweep
        for conn in self._handshaking.values():
            at = conn.handshake_deadline
            if conn.retransmit_at is not None and conn.retransmit_at < at:
                at = conn.retransmit_at
            if deadline is None or at < deadline:
                deadline = at
        return deadline

    def handle_timer(self, now: float) -> None:
        """Retransmit handshake flights whose timer ran out, drop handshakes that took too
        long and connections idle for longer than the idle timeout."""
        self._now = now
        for conn in list(self._handshaking.values()):
            if now >= conn.handshake_deadline:
                self.counters.handshakes_failed += 1
                self._forget(conn, "handshake timed out")
            elif conn.retransmit_at is not None and now >= conn.retransmit_at:
                ssl = conn.ssl
                try:
                    ssl.DTLSv1_handle_timeout()
                except SSL.Error as exc:
                    self.counters.handshakes_failed += 1
                    self._forget(conn, f"handshake failed: {_ssl_reason(exc)}")
                    continue
                self._queue(ssl, conn.address)
                timeout = ssl.DTLSv1_get_timeout()
                conn.retransmit_at = None if timeout is None else now + timeout
        if self._next_sweep is not None and now >= self._next_sweep:
            idle = self.limits.idle_timeout
            for conn in list(self.connections.values()):
                if conn.established and now - conn.last_active >= idle:
                    self.counters.expired += 1
                    self.close(conn)
            self._next_sweep = now + idle / 4 if self.connections else None


class DTLSClientConnection:
    """The client side of a DTLS connection to the proxy (sans-IO).

    Verification is what ``context`` says (`dtls_client_context`: on); with
    ``server_hostname`` set and verification on, the proxy's certificate must also name it
    (an IP address is matched against the certificate's IP entries, TRN-03).
    """

    def __init__(self, context: SSL.Context, server_hostname: str | None, *, mtu: int = DEFAULT_MTU) -> None:
        self.mtu = mtu
        self.established = False
        self.closed = False
        self.error: DTLSError | None = None
        self.received: deque[bytes] = deque()
        self.retransmit_at: float | None = None
        self._out: list[bytes] = []
        self._hostname = server_hostname
        self._verify_problem: str | None = None
        ssl = SSL.Connection(context, None)
        ssl.set_connect_state()
        ssl.set_ciphertext_mtu(mtu)
        if server_hostname is not None:
            if not _is_ip(server_hostname):
                ssl.set_tlsext_host_name(server_hostname.encode("idna"))
            if context.get_verify_mode() & SSL.VERIFY_PEER:
                ssl.set_verify(context.get_verify_mode(), self._verify)
        self.ssl = ssl

    def _verify(self, _conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self._verify_problem = _X509_ERRORS.get(errno, f"X509 error {errno}")
            return False
        if depth == 0 and self._hostname is not None:
            try:
                if _is_ip(self._hostname):
                    verify_certificate_ip_address(cert.to_cryptography(), self._hostname)
                else:
                    verify_certificate_hostname(cert.to_cryptography(), self._hostname)
            except VerificationError:
                self._verify_problem = f"the certificate does not name {self._hostname}"
                return False
        return True

    def start(self, now: float) -> None:
        """Send the first ClientHello."""
        self._step(now)

    def datagram_received(self, data: bytes, now: float) -> None:
        """Handle one datagram from the proxy (garbage is ignored, as DTLS does)."""
        if self.closed:
            return
        types = split_records(data)
        if types is None:
            return
        ssl = self.ssl
        ssl.bio_write(data)
        if not self.established:
            self._step(now)
            if not self.established:
                return
        for _ in types:
            try:
                self.received.append(ssl.recv(_BIO_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._fail(DTLSError("the DTLS proxy closed the connection"))
                return
            except SSL.Error as exc:
                self._fail(DTLSError(f"DTLS connection failed: {_ssl_reason(exc)}"))
                return
        if any(t != CT_APPLICATION_DATA for t in types):
            self._queue()

    def _step(self, now: float) -> None:
        ssl = self.ssl
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            self._queue()
            timeout = ssl.DTLSv1_get_timeout()
            self.retransmit_at = None if timeout is None else now + timeout
            return
        except SSL.Error as exc:
            self._queue()  # our fatal alert tells the proxy why
            if self._verify_problem is not None:
                reason = f"certificate verify failed: {self._verify_problem}"
            else:
                reason = _ssl_reason(exc)
                if "alert" in reason:  # the proxy's alert, e.g. our certificate did not verify
                    reason = f"the proxy refused it ({reason})"
            self._fail(DTLSError(f"DTLS handshake failed: {reason}"))
            return
        self._queue()
        self.established = True
        self.retransmit_at = None

    def _fail(self, error: DTLSError) -> None:
        self.error = error
        self.closed = True
        self.retransmit_at = None

    def handle_timer(self, now: float) -> None:
        """Retransmit the last flight if its timer ran out."""
        if self.closed or self.established:
            return
        ssl = self.ssl
        try:
            ssl.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(DTLSError(f"DTLS handshake failed: {_ssl_reason(exc)}"))
            return
        self._queue()
        timeout = ssl.DTLSv1_get_timeout()
        self.retransmit_at = None if timeout is None else now + timeout

    def send(self, payload: bytes) -> bytes:
        """Encrypt one datagram: the DTLS datagram to send.

        Raises:
            ValueError: ``payload`` is empty or longer than one record can carry.
            DTLSError: not established, or closed.
        """
        if not 0 < len(payload) <= MAX_PLAINTEXT:
            # OpenSSL writes no record for zero bytes; a SOCKS 6 message is never empty.
            raise ValueError(f"a DTLS datagram carries 1 to {MAX_PLAINTEXT} bytes, not {len(payload)}")
        if self.closed or not self.established:
            raise self.error or DTLSError("the DTLS connection is not open")
        try:
            self.ssl.send(payload)
        except SSL.Error as exc:
            error = DTLSError(f"DTLS connection failed: {_ssl_reason(exc)}")
            self._fail(error)
            raise error from exc
        return self.ssl.bio_read(_BIO_CHUNK)

    def close(self) -> None:
        """Queue a close_notify and stop."""
        if self.closed:
            return
        if self.established:
            try:
                self.ssl.shutdown()
            except SSL.Error:
                pass
            self._queue()
        self.closed = True
        self.retransmit_at = None

    def _queue(self) -> None:
        stream = _drain(self.ssl)
        if stream:
            self._out.extend(pack_records(stream, self.mtu))

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        if out:
            self._out = []
        return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def proxy_dtls_context(proxy_dtls: SSL.Context | bool | None) -> SSL.Context:
    """The DTLS context towards the proxy, as `socks6fast.net.url.proxy_ssl_context` is for
    TLS: verifying by default (TRN-03); a context you built is used as it is, if it verifies.

    pyOpenSSL contexts start with ``VERIFY_NONE`` (unlike ``ssl.create_default_context``), so
    a context that loaded a CA but never called ``set_verify(SSL.VERIFY_PEER)`` would check
    neither the certificate nor the host name, silently (probe 19 F3): refused, unless it
    came from ``dtls_client_context(verify=False)``, the explicit opt-out.

    Raises:
        ValueError: ``proxy_dtls=False`` (DTLS without a context is not a choice; plain UDP is
            the plaintext transport), or a context of your own that does not verify.
    """
    if proxy_dtls is False:
        raise ValueError("proxy_dtls=False: use the plain UDP transport for datagrams without DTLS")
    if proxy_dtls is None or proxy_dtls is True:
        return dtls_client_context()
    if not proxy_dtls.get_verify_mode() & SSL.VERIFY_PEER and proxy_dtls not in _UNVERIFIED:
        raise ValueError(
            "proxy_dtls: this OpenSSL.SSL.Context does not verify the proxy's certificate (its "
            "verify mode lacks SSL.VERIFY_PEER): call context.set_verify(SSL.VERIFY_PEER), or pass "
            "dtls_client_context(verify=False) to turn verification off on purpose"
        )
    return proxy_dtls


def channel_limit(connection: object, mtu: int) -> int:
    """The largest SOCKS 6 message one record of the established DTLS ``connection`` carries
    in a datagram of at most ``mtu`` bytes (OpenSSL subtracts the record header, explicit
    nonce and tag of the negotiated suite); sets the connection's ciphertext MTU. Both UDP
    engines call it in ``add_channel`` (issue 11).

    Raises:
        ValueError: not a pyOpenSSL Connection, not established, or ``mtu`` outside
            256..65535.
    """
    if not isinstance(connection, SSL.Connection):
        raise ValueError("DTLSLink.connection must be an OpenSSL.SSL.Connection")
    if not 256 <= mtu <= 65535:
        raise ValueError(f"DTLSLink.mtu must be in 256..65535, got {mtu}")
    connection.set_ciphertext_mtu(mtu)
    limit = connection.get_cleartext_mtu()
    if limit <= 0 or connection.get_cipher_name() is None:
        raise ValueError("the DTLS connection is not established (no cipher suite yet)")
    return min(limit, MAX_PLAINTEXT)
