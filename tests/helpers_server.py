"""Fixtures for the proxy's end-to-end tests: the server in-process, loopback peers, TLS certs.

Everything here listens on 127.0.0.1 or ::1 only (network safety: no test traffic leaves the machine):

* `running_server`: a `socks6fast.asyncio.server.Server` on 127.0.0.1:0 (and [::1]:0).
* `Sink`: a loopback TCP server standing in for the remote host. It echoes (or answers
  HTTP), and records per connection what only the remote end can see: the TTL / hop
  limit and TOS / traffic class of the proxy's packets (``IP_PKTOPTIONS`` /
  ``IPV6_2292PKTOPTIONS``), whether the connection is MPTCP (``MPTCP_INFO``) and whether
  data arrived in the SYN (``TCP_INFO``).
* `FakeDNS`: a DNS-over-TCP responder (RFC 7766 framing) answering every query with one
  fixed A record; no real resolver is ever asked anything.
* `make_certificates`: a throw-away CA and a server certificate for 127.0.0.1/localhost,
  made with ``cryptography``.
* `packet_options`: parses the cmsg list of ``IP_PKTOPTIONS``.
* `fake_resolver`: a name table for the server's ``resolver=`` (no DNS query ever leaves).
* `curl`: the real /usr/bin/curl, bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from socks6fast.asyncio.server import ConnectionRecord, Server
from socks6fast.config import Config, load_config, parse_config
from socks6fast.constants import AddressType, Command, StackLeg
from socks6fast.net.tfo import TCPI_OPT_SYN_DATA, enable_tfo_connect
from socks6fast.proto import codec
from socks6fast.proto.auth import hash_password
from socks6fast.proto.messages import AuthReply, OperationReply, Request, TFOOption

IP_PKTOPTIONS = 9
IP_RECVTTL = 12
IP_RECVTOS = 13
IPV6_2292PKTOPTIONS = 6
SOL_MPTCP = 284
MPTCP_INFO = 1
IPPROTO_MPTCP = 262
#: Cheap scrypt parameters for test users (the server verifies with what the hash says).
TEST_SCRYPT_N = 2**10


def cheap_hash(password: str) -> str:
    """An scrypt hash that is fast to verify (tests only)."""
    return hash_password(password, n=TEST_SCRYPT_N)


def make_config(
    *,
    users: Mapping[str, str] | None = None,
    ipv6: bool = False,
    rules: list[dict[str, Any]] | None = None,
    server: Mapping[str, Any] | None = None,
    sessions: Mapping[str, Any] | None = None,
    default_action: str = "allow",
    udp: Mapping[str, Any] | None = None,
    admin: Mapping[str, Any] | None = None,
) -> Config:
    """A Config listening on 127.0.0.1:0 (and [::1]:0 with ``ipv6``); ``users`` maps names to
    clear passwords (hashed here with cheap parameters)."""
    listen = ["127.0.0.1:0"] + (["[::1]:0"] if ipv6 else [])
    server_table: dict[str, Any] = {"listen": listen, "handshake_timeout": 5.0, "connect_timeout": 5.0}
    server_table.update(server or {})
    data: dict[str, Any] = {
        "default_action": default_action,
        "server": server_table,
        "users": {name: cheap_hash(pw) for name, pw in (users or {}).items()},
        "sessions": dict(sessions or {}),
        "rules": rules or [],
        "udp": dict(udp or {}),
        "admin": dict(admin or {}),
    }
    return parse_config(data)


@contextlib.asynccontextmanager
async def running_server(config: Config, **kwargs: Any) -> AsyncIterator[Server]:
    """Start a Server in the running loop; close it on exit."""
    server = Server(config, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close(drain_timeout=0)


FakeResolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]


def fake_resolver(names: Mapping[str, list[str]]) -> FakeResolver:
    """A resolver for `Server` (``resolver=``) answering from ``names`` (name -> addresses, in
    order); any other name fails as getaddrinfo would (EAI_NONAME). Tests never ask the
    system resolver (conftest.py), so a name that getaddrinfo would turn into an address
    itself ("0" -> 0.0.0.0, inet_aton) is listed here with that address."""

    async def resolve(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        found = names.get(host)
        if found is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        v6, v4 = socket.AF_INET6, socket.AF_INET
        return [(v6, (a, port, 0, 0)) if ":" in a else (v4, (a, port)) for a in found]

    return resolve


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """Run /usr/bin/curl (at most 10 s); (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/curl",
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def packet_options(raw: bytes) -> dict[tuple[int, int], int]:
    """Parse a ``struct cmsghdr`` list (as IP_PKTOPTIONS returns it) into {(level, type): int}."""
    header = struct.Struct("@Nii")
    out: dict[tuple[int, int], int] = {}
    offset = 0
    while offset + header.size <= len(raw):
        length, level, type_ = header.unpack_from(raw, offset)
        if length < header.size:
            break
        data = raw[offset + header.size : offset + length]
        out[(level, type_)] = int.from_bytes(data[:4], "little")
        offset += (length + 7) & ~7
    return out


def observed_ttl_tos(sock: socket.socket) -> tuple[int | None, int | None]:
    """TTL / hop limit and TOS / traffic class of packets received on ``sock``.

    IPv4: values of the SYN (accepted sockets only). IPv6: of the last data packet, or
    of the SYN. Needs IP_RECVTTL/IP_RECVTOS (IPV6_RECVHOPLIMIT/RECVTCLASS) set beforehand.
    """
    if sock.family == socket.AF_INET6:
        opts = packet_options(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_2292PKTOPTIONS, 256))
        return opts.get((socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)), opts.get(
            (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
        )
    opts = packet_options(sock.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, 256))
    return opts.get((socket.IPPROTO_IP, socket.IP_TTL)), opts.get((socket.IPPROTO_IP, socket.IP_TOS))


def enable_packet_options(sock: socket.socket) -> None:
    """Ask the kernel to keep TTL/TOS (hop limit/traffic class) of received packets."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)


def syn_data(sock: socket.socket) -> bool:
    """True when data travelled in this connection's SYN (TCP_INFO tcpi_options)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return bool(info[5] & TCPI_OPT_SYN_DATA)


def is_mptcp(sock: socket.socket) -> bool:
    """True when the connection runs MPTCP (MPTCP_INFO answers)."""
    try:
        sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
    except OSError:
        return False
    return True


@dataclass
class SinkConnection:
    """What the remote host saw of one connection."""

    peer: tuple[str, int]
    ttl: int | None = None
    tos: int | None = None
    mptcp: bool = False
    syn_data: bool = False
    received: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)


def _close_accepted(accept: asyncio.Future[tuple[socket.socket, Any]]) -> None:
    if not accept.cancelled() and accept.exception() is None:
        accept.result()[0].close()


class Sink:
    """A loopback server standing in for the remote host.

    Args:
        host: "127.0.0.1" or "::1".
        mode: "echo" (send back what arrives, half-close on EOF), "banner" (send ``body``
            as soon as the connection is accepted, before reading anything, then echo, as an
            SMTP or SSH server greets first), "http" (answer one HTTP/1.0 request with
            ``body``), or "hold" (read only).
        mptcp: listen with IPPROTO_MPTCP.
        tfo: accept TCP Fast Open.
        body: the HTTP body in "http" mode, the greeting in "banner" mode.
        port: the port to listen on (0: any free port).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        mode: str = "echo",
        mptcp: bool = False,
        tfo: bool = False,
        body: bytes = b"hello from the sink\n",
        port: int = 0,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        if tfo:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
        if not mptcp:  # MPTCP sockets do not support these options
            enable_packet_options(self.sock)  # inherited by accepted sockets
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.mode = mode
        self.body = body
        self.connections: list[SinkConnection] = []
        self.accepted: asyncio.Queue[SinkConnection] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> Sink:
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._accept_task] if t), return_exceptions=True)
        self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Cancelled between the accept and this task resuming, the accepted socket would
            # be dropped unclosed (a ResourceWarning in some later test): the accept runs as
            # its own future, and one cancelled too late closes what it accepted.
            accept = asyncio.ensure_future(loop.sock_accept(self.sock))
            try:
                conn, addr = await asyncio.shield(accept)
            except asyncio.CancelledError:
                accept.add_done_callback(_close_accepted)
                accept.cancel()
                raise
            task = loop.create_task(self._serve(conn, (str(addr[0]), int(addr[1]))))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        record = SinkConnection(peer=peer, mptcp=is_mptcp(conn), syn_data=syn_data(conn))
        self.connections.append(record)
        try:
            if self.mode == "banner":
                await loop.sock_sendall(conn, self.body)
            echo = self.mode in ("echo", "banner")
            first = True
            while True:
                try:
                    data = await loop.sock_recv(conn, 65536)
                except OSError:
                    break
                if first:
                    with contextlib.suppress(OSError):
                        record.ttl, record.tos = observed_ttl_tos(conn)
                    self.accepted.put_nowait(record)
                    first = False
                if not data:
                    record.eof.set()
                    if echo:
                        with contextlib.suppress(OSError):
                            conn.shutdown(socket.SHUT_WR)
                    break
                record.received += data
                if echo:
                    await loop.sock_sendall(conn, data)
                elif self.mode == "http" and b"\r\n\r\n" in record.received:
                    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(self.body)}\r\n\r\n".encode()
                    await loop.sock_sendall(conn, head + self.body)
                    conn.shutdown(socket.SHUT_WR)
            if first:
                self.accepted.put_nowait(record)
            # Keep the socket open until the peer is done (echo mode half-closed already).
            with contextlib.suppress(OSError):
                while await loop.sock_recv(conn, 65536):
                    pass
        finally:
            conn.close()


class FakeDNS:
    """A DNS-over-TCP server on loopback (RFC 7766: two-byte length, then the message).

    Answers every query with an A record for ``answer`` so tests can check the bytes
    went through the proxy's DNS service (D13) unchanged.
    """

    def __init__(self, answer: str = "127.0.0.7") -> None:
        self.answer = ipaddress.IPv4Address(answer).packed
        self.queries: list[bytes] = []
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> FakeDNS:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    (length,) = struct.unpack(">H", await reader.readexactly(2))
                    query = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    break
                self.queries.append(query)
                response = self.respond(query)
                writer.write(struct.pack(">H", len(response)) + response)
                await writer.drain()
        finally:
            writer.close()

    def respond(self, query: bytes) -> bytes:
        """Echo the question with one A answer (RFC 1035 section 4.1)."""
        ident = query[:2]
        question = query[12:]
        header = ident + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
        answer = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + self.answer
        return header + question + answer


def dns_query(name: str, ident: int = 0x1234) -> bytes:
    """A minimal RFC 1035 A query for ``name``."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)


@dataclass
class Certificates:
    """Paths of a throw-away CA and server certificate."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path) -> Certificates:
    """Write a self-signed CA and a server certificate for 127.0.0.1, ::1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "socks6fast test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.IPAddress(ipaddress.IPv6Address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


async def record_for(server: Server, client: RawClient, timeout: float = 5.0) -> ConnectionRecord:
    """The server's record of ``client``'s connection, once that connection has ended."""
    local = client.local
    async with asyncio.timeout(timeout):
        while True:
            for record in reversed(server.records):
                if record.client[:2] == local:
                    return record
            await asyncio.sleep(0.01)


class RawClient:
    """Raw bytes over a real socket to the proxy, with SOCKS 6 reply decoding helpers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        name = writer.get_extra_info("sockname")
        self.local: tuple[str, int] = (str(name[0]), int(name[1]))
        """The client's own address and port (what the server records as ``client``)."""

    @classmethod
    async def connect(cls, address: tuple[str, int], **kwargs: Any) -> RawClient:
        reader, writer = await asyncio.open_connection(address[0], address[1], **kwargs)
        return cls(reader, writer)

    @property
    def sock(self) -> socket.socket:
        sock = self.writer.get_extra_info("socket")
        assert sock is not None
        return sock  # type: ignore[no-any-return]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise EOFError(f"EOF with {len(self.buffer)} bytes buffered, wanted {n}")
            self.buffer += data

    async def read_exactly(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def auth_reply(self) -> AuthReply:
        while True:
            reply, n = codec.decode_auth_reply(self.buffer)
            if reply is not None:
                del self.buffer[:n]
                return reply
            await self._fill(len(self.buffer) + n)

    async def operation_reply(self) -> OperationReply:
        while True:
            reply, n = codec.decode_operation_reply(self.buffer)
            if reply is not None:
                del self.buffer[:n]
                return reply
            await self._fill(len(self.buffer) + n)

    async def read_until_eof(self, timeout: float = 5.0) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        while True:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                return data
            data += chunk

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --- Scenarios that need a private network namespace ------------------------------------
#
# Server-side TCP Fast Open (net.ipv4.tcp_fastopen bit 0x2) and unreachable routes cannot be
# set up on the host without changing it for everyone. `unshare -n` gives a process its own
# network namespace with only a loopback interface: there the sysctl and routing rules are
# private, and nothing can leave the machine. `run_netns_scenarios` is run by
# tests/test_server_e2e.py in such a namespace; it prints one JSON object of observations.

NETNS_SETUP = """
set -e
ip link set lo up
echo 3 > /proc/sys/net/ipv4/tcp_fastopen
ip rule del pref 0
ip rule add from all lookup local pref 100
ip rule add to 127.66.0.1 unreachable pref 10
ip route add unreachable 127.77.0.1 table 200
ip rule add to 127.77.0.1 lookup 200 pref 20
"""
#: Destinations that give ENETUNREACH / EHOSTUNREACH inside the namespace.
NETNS_NET_UNREACHABLE = "127.66.0.1"
NETNS_HOST_UNREACHABLE = "127.77.0.1"


def tfo_connect(address: tuple[str, int], payload: bytes) -> socket.socket:
    """Blocking TCP Fast Open connect that puts ``payload`` in the SYN when a cookie is cached."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    enable_tfo_connect(sock)
    sock.settimeout(5)
    sock.connect(address)
    sock.sendall(payload)
    return sock


async def _netns_scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    loop = asyncio.get_running_loop()

    def request(host: str, port: int, *options: Any, command: Command = Command.CONNECT) -> bytes:
        return codec.encode_request(Request(command, AddressType.IPV4, host, port, tuple(options)))

    async with Sink(tfo=True) as sink, running_server(make_config()) as server:
        proxy = server.addresses[0]
        # Warm the TFO cookie caches: client -> sink and client -> proxy listener.
        for target in (sink.address, proxy):
            for _ in range(2):
                warm = await loop.run_in_executor(None, tfo_connect, target, b"\x00")
                warm.close()
        await asyncio.sleep(0.1)
        while not sink.accepted.empty():
            sink.accepted.get_nowait()

        async def connect_through(
            options: tuple[Any, ...], data: bytes
        ) -> tuple[OperationReply, SinkConnection, ConnectionRecord]:
            client = await RawClient.connect(proxy)
            await client.send(request(*sink.address, *options) + data)
            await client.auth_reply()
            reply = await client.operation_reply()
            echoed = await client.read_exactly(len(data))
            assert echoed == data
            seen = await asyncio.wait_for(sink.accepted.get(), 5)
            await client.close()
            return reply, seen, await record_for(server, client)

        # STK-06: TFO option -> data in the SYN to the remote host.
        reply, seen, record = await connect_through(
            (TFOOption(StackLeg.PROXY_REMOTE, 0),), b"tfo-initial-data"
        )
        out["tfo_option_syn_data"] = seen.syn_data
        out["tfo_option_echo"] = [o.payload_size for o in reply.options if isinstance(o, TFOOption)]
        out["tfo_option_attempted"] = record.tfo_attempted
        # STK-06: the payload size bound.
        reply, seen, record = await connect_through((TFOOption(StackLeg.PROXY_REMOTE, 4),), b"0123456789")
        out["tfo_limited_echo"] = [o.payload_size for o in reply.options if isinstance(o, TFOOption)]
        out["tfo_limited_syn_data"] = seen.syn_data
        # CMD-02: no option -> no TFO, even with a cookie cached and data at hand.
        reply, seen, record = await connect_through((), b"no-tfo-data")
        out["no_option_syn_data"] = seen.syn_data
        out["no_option_attempted"] = record.tfo_attempted

        # TRN-01: Request + data in the SYN to the proxy; processed without another round trip.
        payload = request(*sink.address) + b"in-the-syn"

        def client_side() -> tuple[bool, bytes]:
            sock = tfo_connect(proxy, payload)
            try:
                data = b""
                expected = 4 + 12 + len(b"in-the-syn")  # auth reply, operation reply (IPv4), echo
                while len(data) < expected:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return syn_data(sock), data
            finally:
                sock.close()

        acked, data = await loop.run_in_executor(None, client_side)
        out["trn01_syn_data"] = acked
        out["trn01_tail"] = data[-len(b"in-the-syn") :].decode()

        # STK-06: BIND accepts TFO only when asked (the cached cookie for 127.0.0.1 is valid
        # for every TFO listener of this namespace).
        for name, options in (("bind_tfo", (TFOOption(StackLeg.PROXY_REMOTE, 0),)), ("bind_plain", ())):
            client = await RawClient.connect(proxy)
            await client.send(request("0.0.0.0", 0, *options, command=Command.BIND))
            await client.auth_reply()
            first = await client.operation_reply()
            peer = await loop.run_in_executor(None, tfo_connect, (first.address, first.port), b"x")
            await client.operation_reply()
            out[name] = syn_data(peer)
            out[name + "_data"] = (await client.read_exactly(1)).decode()
            peer.close()
            await client.close()

        # CMD-01: network / host unreachable from real routing decisions.
        for name, host in (
            ("net_unreachable", NETNS_NET_UNREACHABLE),
            ("host_unreachable", NETNS_HOST_UNREACHABLE),
        ):
            client = await RawClient.connect(proxy)
            await client.send(request(host, 80))
            await client.auth_reply()
            out[name] = int((await client.operation_reply()).reply_code)
            await client.close()
            out[name + "_error"] = (await record_for(server, client)).error
    return out


# --- The host's own addresses (issue 12: "@local", loops through wildcard listeners) -----
#
# The host's non-loopback addresses can only be used inside a namespace of the test's own:
# a veth pair (nothing behind it) carries 10.99.0.1/24 and fd99::1/64, and the loopback
# device gets 10.98.0.1/16, which makes the kernel deliver all of 10.98.0.0/16 locally.

NETNS_LOCAL_SETUP = """
set -e
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.99.0.1/24 dev v0
ip -6 addr add fd99::1/64 dev v0 nodad
ip addr add 10.98.0.1/16 dev lo
ip link set v0 up
ip link set v1 up
"""
#: The namespace's own addresses: on the veth, and inside the loopback device's /16.
NETNS_HOST_V4 = "10.99.0.1"
NETNS_HOST_V6 = "fd99::1"
NETNS_LO_PREFIX_ADDRESS = "10.98.5.5"


async def _netns_local_scenarios() -> dict[str, Any]:
    out: dict[str, Any] = {}
    example = Path(__file__).resolve().parent.parent / "examples" / "socks6fast.toml"
    rules_only = load_config(example).with_overrides(listen=["127.0.0.1:0"])
    names = {"me.test": [NETNS_HOST_V4], "me6.test": [NETNS_HOST_V6]}

    def socks6(host: str, port: int) -> bytes:
        kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
        if host.endswith(".test"):
            kind = AddressType.DOMAIN_NAME
        return codec.encode_request(Request(Command.CONNECT, kind, host, port))

    async def reply_code(server: Server, host: str, port: int) -> tuple[int, str]:
        client = await RawClient.connect(server.addresses[0])
        await client.send(socks6(host, port))
        await client.auth_reply()
        code = int((await client.operation_reply()).reply_code)
        await client.close()
        return code, (await record_for(server, client)).error

    # A service listening on every address of the host (dual-stack).
    async with Sink("::", mode="http", body=b"local service\n") as sink:
        port = sink.address[1]
        targets = [NETNS_HOST_V4, NETNS_HOST_V6, NETNS_LO_PREFIX_ADDRESS, "me.test", "me6.test"]
        for label, config in (("allow_all", make_config()), ("example", rules_only)):
            async with running_server(config, resolver=fake_resolver(names)) as server:
                out[label] = {t: await reply_code(server, t, port) for t in targets}
                proxy = "{}:{}".format(*server.addresses[0])
                code, body, _ = await curl("--socks5", proxy, f"http://{NETNS_HOST_V4}:{port}/")
                out[label + "_curl"] = [code, body.decode()]
        out["sink_connections"] = len(sink.connections)

        # Loops through wildcard listeners: every local address reaches them.
        wildcard = make_config(server={"listen": ["0.0.0.0:0", "[::]:0"]})
        async with running_server(wildcard, resolver=fake_resolver(names)) as server:
            v4_port = server.addresses[0][1]
            v6_port = server.addresses[1][1]
            loops = [
                (NETNS_HOST_V4, v4_port),
                ("127.0.0.7", v4_port),
                ("0.0.0.0", v4_port),
                (NETNS_LO_PREFIX_ADDRESS, v4_port),
                ("me.test", v4_port),
                (NETNS_HOST_V6, v6_port),
                ("::1", v6_port),
            ]
            out["wildcard_loops"] = [await reply_code(server, host, p) for host, p in loops]
            out["wildcard_sink"] = await reply_code(server, NETNS_HOST_V4, port)
    return out


def run_netns_scenarios() -> None:
    """Entry point inside the namespace: print the observations as JSON (``local``: the
    scenarios of the host's own addresses, in a namespace set up with NETNS_LOCAL_SETUP)."""
    scenarios = _netns_local_scenarios if sys.argv[1:] == ["local"] else _netns_scenarios
    print(json.dumps(asyncio.run(scenarios())))


if __name__ == "__main__":
    run_netns_scenarios()
