"""What DTLS costs the proxy per datagram in Python (issue 11 item 4, "where the bytes go").

Two measurements, both CPU time of this process (``time.process_time``), loopback only:

* ``bio``: the memory-BIO path alone, no socket. A server endpoint
  (`socks6fast.net.dtls.DTLSServerEndpoint`) and a client finish a handshake in memory;
  then, per datagram of 64 B and 1400 B: *decrypt* (``datagram_received``: framing check,
  ``bio_write``, ``recv``, the callback), *encrypt* (``send``: ``send`` + ``bio_read``) and
  *echo* (decrypt whose callback encrypts the answer: what the proxy does per DTLS echo on
  top of the plain-UDP work). ``raw`` rows are pyOpenSSL alone (``bio_write`` + ``recv``,
  ``send`` + ``bio_read``), the floor under the endpoint's Python.
* ``sockets``: the asyncio adapter on uvloop (`socks6fast.asyncio.dtls`) echoing over a
  real UDP socket to a client in a child process (ping-pong, one datagram in flight); the
  figure is this (the server's) process's CPU per echo (``getrusage``), which includes the
  loop, ``recvfrom`` and ``sendto``; ``plain echo`` is the same ping-pong without DTLS
  (a plain asyncio UDP echo), so the difference is what DTLS adds on the loop.
* ``--c``: the record layer alone in C (``benchmarks/dtls_record_c.c``, compiled with gcc
  against Debian's libssl): ``SSL_write`` + ``BIO_read`` and ``BIO_write`` + ``SSL_read``
  over memory BIOs, what a native data path would pay per datagram.
* handshakes, in memory: the server's CPU per HelloVerifyRequest (a ClientHello without a
  cookie from a new port each: the cost of a spoofed flood) and per full handshake (cookie
  exchange, ECDHE, ECDSA P-256 certificate), hence handshakes per second per core.

Run: ``.venv/bin/python benchmarks/dtls_cost.py [--count N] [--repeats R] [--c] [--json]``.
Bounded: N datagrams per size and repeat (default 20000 in memory, 5000 over sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from socks6fast.asyncio.dtls import DTLSServer, start_dtls_server
from socks6fast.net.dtls import (
    DTLSClientConnection,
    DTLSConnection,
    DTLSServerEndpoint,
    dtls_client_context,
    dtls_server_context,
)

SIZES = (64, 1400)
ADDRESS = ("127.0.0.1", 40000)


def make_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it as its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dtls bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(certfile), str(keyfile)


class MemoryPair:
    def __init__(self, certfile: str, keyfile: str) -> None:
        self.on_datagram: Callable[[DTLSConnection, bytes], None] = lambda conn, data: None
        self.server = DTLSServerEndpoint(
            dtls_server_context(certfile, keyfile), on_datagram=lambda c, d: self.on_datagram(c, d)
        )
        self.client = DTLSClientConnection(dtls_client_context(cafile=certfile), "127.0.0.1")
        self.client.start(0.0)
        for _ in range(10):
            for datagram in self.client.datagrams_to_send():
                self.server.datagram_received(datagram, ADDRESS, 0.0)
            for datagram, _ in self.server.datagrams_to_send():
                self.client.datagram_received(datagram, 0.0)
            if self.client.established and ADDRESS in self.server.connections:
                break
        self.conn = self.server.connections[ADDRESS]
        assert self.client.established and self.conn.established, self.client.error


def cpu_per(count: int, run: Callable[[], None]) -> float:
    """µs of CPU per item for ``run`` (which handles ``count`` items)."""
    start = time.process_time()
    run()
    return (time.process_time() - start) / count * 1e6


def bio_figures(pair: MemoryPair, size: int, count: int) -> dict[str, float]:
    payload = os.urandom(size)
    server, conn, client = pair.server, pair.conn, pair.client
    figures: dict[str, float] = {}

    records = [client.send(payload) for _ in range(count)]
    pair.on_datagram = lambda c, d: None

    def decrypt() -> None:
        received = server.datagram_received
        for record in records:
            received(record, ADDRESS, 1.0)

    figures["decrypt"] = cpu_per(count, decrypt)

    def encrypt() -> None:
        send = server.send
        for _ in range(count):
            send(conn, payload)

    figures["encrypt"] = cpu_per(count, encrypt)

    records = [client.send(payload) for _ in range(count)]
    send = server.send

    def echo(c: DTLSConnection, d: bytes) -> None:
        send(c, d)

    pair.on_datagram = echo
    figures["echo"] = cpu_per(count, decrypt)

    # The floor: pyOpenSSL alone on the same connection.
    records = [client.send(payload) for _ in range(count)]
    ssl = conn.ssl

    def raw_decrypt() -> None:
        for record in records:
            ssl.bio_write(record)
            ssl.recv(65536)

    figures["raw decrypt"] = cpu_per(count, raw_decrypt)

    def raw_encrypt() -> None:
        for _ in range(count):
            ssl.send(payload)
            ssl.bio_read(65536)

    figures["raw encrypt"] = cpu_per(count, raw_encrypt)
    return figures


def handshake_figures(certfile: str, keyfile: str, count: int) -> dict[str, float]:
    """Server-side CPU µs per stateless HelloVerifyRequest (a ClientHello without a cookie,
    from a new port each) and per full handshake (cookie exchange included), in memory."""
    server = DTLSServerEndpoint(dtls_server_context(certfile, keyfile), on_datagram=lambda c, d: None)
    client_context = dtls_client_context(cafile=certfile)
    hello_client = DTLSClientConnection(client_context, "127.0.0.1")
    hello_client.start(0.0)
    (hello,) = hello_client.datagrams_to_send()

    def verify_requests() -> None:
        for port in range(count):
            server.datagram_received(hello, ("127.0.0.1", port), 0.0)
        server.datagrams_to_send()

    figures = {"hello verify": cpu_per(count, verify_requests)}
    handshakes = max(count // 20, 10)
    spent = 0.0
    for port in range(handshakes):
        address = ("127.0.0.2", port)
        client = DTLSClientConnection(client_context, "127.0.0.1")
        client.start(0.0)
        while not (client.established and address in server.connections):
            datagrams = client.datagrams_to_send()
            start = time.process_time()
            for datagram in datagrams:
                server.datagram_received(datagram, address, 0.0)
            answers = server.datagrams_to_send()
            spent += time.process_time() - start
            for datagram, _ in answers:
                client.datagram_received(datagram, 0.0)
            assert client.error is None, client.error
        server.close(server.connections[address])
        server.datagrams_to_send()
    figures["handshake"] = spent / handshakes * 1e6
    return figures


def _socket_client(port: int, certfile: str, size: int, count: int, ready: Any) -> None:
    """Child process: ping-pong ``count`` datagrams over DTLS (blocking socket, sans-IO)."""
    conn = DTLSClientConnection(dtls_client_context(cafile=certfile), "127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)
    conn.start(time.monotonic())
    while not conn.established:
        for datagram in conn.datagrams_to_send():
            sock.send(datagram)
        try:
            conn.datagram_received(sock.recv(65536), time.monotonic())
        except TimeoutError:
            conn.handle_timer(time.monotonic() + 10)
        if conn.error is not None:
            raise conn.error
    for datagram in conn.datagrams_to_send():
        sock.send(datagram)
    payload = os.urandom(size)
    ready.send("go")
    ready.recv()
    for _ in range(count):
        sock.send(conn.send(payload))
        while not conn.received:
            conn.datagram_received(sock.recv(65536), 0.0)
        conn.received.clear()
    ready.send("done")
    sock.close()


def _plain_client(port: int, size: int, count: int, ready: Any) -> None:
    """Child process: the same ping-pong in plain UDP (the baseline of the socket figure)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payload = os.urandom(size)
    ready.send("go")
    ready.recv()
    for _ in range(count):
        sock.send(payload)
        sock.recv(65536)
    ready.send("done")
    sock.close()


class _PlainEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's UDPTransport is no asyncio.DatagramTransport subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(data, addr)


def plain_socket_figure(size: int, count: int) -> float:
    """µs of this process's CPU per plain UDP echo on the same loop (no DTLS)."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_PlainEcho, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.get_context("fork").Process(
            target=_plain_client, args=(port, size, count, child)
        )
        proc.start()
        await asyncio.wait_for(loop.run_in_executor(None, parent.recv), 30)
        start = resource.getrusage(resource.RUSAGE_SELF)
        parent.send("start")
        await asyncio.wait_for(loop.run_in_executor(None, parent.recv), 120)
        end = resource.getrusage(resource.RUSAGE_SELF)
        proc.join(10)
        transport.close()
        cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
        return cpu / count * 1e6

    return uvloop.run(main())


def socket_figures(certfile: str, keyfile: str, size: int, count: int) -> float:
    """µs of this process's CPU per DTLS echo over a real socket (uvloop)."""

    async def main() -> float:
        server: DTLSServer | None = None

        def echo(conn: DTLSConnection, data: bytes) -> None:
            assert server is not None
            server.send(conn, data)

        server = await start_dtls_server(
            "127.0.0.1", 0, dtls_server_context(certfile, keyfile), on_datagram=echo
        )
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.get_context("fork").Process(
            target=_socket_client, args=(server.sockname()[1], certfile, size, count, child)
        )
        proc.start()
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, parent.recv), 30)
        start = resource.getrusage(resource.RUSAGE_SELF)
        parent.send("start")
        await asyncio.wait_for(loop.run_in_executor(None, parent.recv), 120)
        end = resource.getrusage(resource.RUSAGE_SELF)
        proc.join(10)
        server.close()
        cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
        return cpu / count * 1e6

    return uvloop.run(main())


def c_figures(certfile: str, keyfile: str, count: int, directory: Path) -> dict[int, dict[str, float]]:
    """The record layer alone in C (benchmarks/dtls_record_c.c, Debian's libssl), per size:
    µs of CPU per decrypt and per encrypt."""
    source = Path(__file__).with_name("dtls_record_c.c")
    binary = directory / "dtls_record_c"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), "-lssl", "-lcrypto"], check=True)
    figures: dict[int, dict[str, float]] = {}
    for size in SIZES:
        out = subprocess.run(
            [str(binary), certfile, keyfile, str(size), str(count)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        figures[size] = {"decrypt": float(out[-2]), "encrypt": float(out[-1]), "openssl": " ".join(out[:-3])}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20000, help="datagrams per size and repeat (memory)")
    parser.add_argument("--socket-count", type=int, default=5000, help="echoes per size over sockets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-sockets", action="store_true", help="only the memory-BIO figures")
    parser.add_argument(
        "--c", action="store_true", help="also the record layer in C (needs gcc and libssl-dev)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "python": sys.version.split()[0],
        "bio": {},
        "sockets": {},
        "plain_sockets": {},
        "socket_ranges": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        certfile, keyfile = make_certificate(Path(tmp))
        pair = MemoryPair(certfile, keyfile)
        results["cipher"] = pair.conn.ssl.get_cipher_name()
        runs_h = [handshake_figures(certfile, keyfile, args.count // 4) for _ in range(args.repeats)]
        results["handshake"] = {key: statistics.median(r[key] for r in runs_h) for key in runs_h[0]}
        for size in SIZES:
            runs = [bio_figures(pair, size, args.count) for _ in range(args.repeats)]
            results["bio"][size] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        if args.c:
            results["c"] = c_figures(certfile, keyfile, args.count * 10, Path(tmp))
        if not args.no_sockets:
            for size in SIZES:
                runs_s: list[float] = []
                runs_p: list[float] = []
                for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
                    runs_s.append(socket_figures(certfile, keyfile, size, args.socket_count))
                    runs_p.append(plain_socket_figure(size, args.socket_count))
                results["sockets"][size] = statistics.median(runs_s)
                results["plain_sockets"][size] = statistics.median(runs_p)
                results["socket_ranges"][size] = [min(runs_s), max(runs_s), min(runs_p), max(runs_p)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{results['date']}  {results['openssl']}  Python {results['python']}  {results['cipher']}")
    print("µs of CPU per datagram (median of repeats)")
    keys = list(results["bio"][SIZES[0]])
    sockets = bool(results["sockets"])
    header = "".join(f"{k:>13}" for k in keys)
    if sockets:
        header += f"{'socket echo':>13}{'plain echo':>13}"
    print(f"{'':>12}" + header)
    for size in SIZES:
        row = "".join(f"{results['bio'][size][k]:>13.2f}" for k in keys)
        if sockets:
            row += f"{results['sockets'][size]:>13.2f}{results['plain_sockets'][size]:>13.2f}"
        print(f"{size:>10} B" + row)
    for size, c in results.get("c", {}).items():
        print(
            f"{size:>10} B  in C ({c['openssl']}): decrypt {c['decrypt']:.2f}, encrypt {c['encrypt']:.2f},"
            f" echo {c['decrypt'] + c['encrypt']:.2f}"
        )
    hs = results["handshake"]
    print(
        f"server CPU: {hs['hello verify']:.1f} µs per HelloVerifyRequest, {hs['handshake']:.0f} µs per"
        f" full handshake ({1e6 / hs['handshake']:.0f} handshakes/s per core)"
    )
    for size in SIZES if sockets else ():
        low_s, high_s, low_p, high_p = results["socket_ranges"][size]
        print(
            f"{size:>10} B  min-max: DTLS echo {low_s:.1f}-{high_s:.1f}, plain echo {low_p:.1f}-{high_p:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
