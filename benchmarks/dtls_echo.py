"""Engine-only echo through DTLS channels vs the plain UDP port (issue 11), loopback only.

What the UDP engine (``socks6fast.dataplane.udp``) spends per echo when the client's
datagrams arrive in DTLS records on a channel (``UdpEngine.add_channel(fd, DTLSLink)``,
the records decrypted and encrypted by the engine) against plain SOCKS 6 datagrams on
its UDP port, for the native engine (``mmsg``: C workers calling OpenSSL's record layer
directly) and the Python twin (``python``: pyOpenSSL per datagram), at 64 B and 1400 B.

The proxy runs alone in a child process (``serve``): an engine with one worker, one UDP
port, and per flow an association (a socket pair stands for its TCP connection) and, in
``dtls`` mode, a DTLS listener that runs the handshake with ``net.dtls``'s server
endpoint and hands each connection to the engine as D2's server does (a socket bound to
the DTLS port with SO_REUSEADDR, connected to the client). This process is the client
(``net.dtls``'s DTLS client) and the echo server, so their CPU is not the proxy's. The
figure is **proxy CPU µs per echo**: user + system CPU of the proxy process (all
threads, /proc) over the window divided by the echoes; each flow keeps ``--inflight``
datagrams in flight. Rounds are interleaved (plain, dtls, plain, ...) and medians printed.

Bounded: ``--count`` echoes per run, ``--seconds`` per run at most, the proxy process
ends after ``--max-seconds``; only 127.0.0.1 is used.

Usage::

    python benchmarks/dtls_echo.py                       # about a minute
    python benchmarks/dtls_echo.py --paths mmsg,python --sizes 64,1400 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from socks6fast.bench._procs import tree_cpu_seconds
from socks6fast.constants import AddressType
from socks6fast.net.dtls import DTLSClientConnection, dtls_client_context
from socks6fast.proto.codec import encode_datagram_header
from socks6fast.proto.messages import DatagramHeader

MTU = 1500  # the channels' DTLSLink.mtu: a 1400-B payload plus headers fits one record


def make_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it as its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dtls echo bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


# -- the proxy process -------------------------------------------------------------------


async def _serve(path: str, mode: str, flows: int, max_seconds: float, cert: str, key: str) -> None:
    from socks6fast.dataplane import udp  # noqa: PLC0415 (the child process only)
    from socks6fast.net.dtls import DTLSConnection, DTLSServerEndpoint, dtls_server_context  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    if path == "mmsg":
        if udp.UdpEngineC is None:
            raise SystemExit("the native UDP engine is not built (SOCKS6FAST_NO_EXTENSIONS or no compiler)")
        engine: Any = udp.UdpEngineC(workers=1)
    else:
        engine = udp.UdpEnginePy(loop=loop)
    fds = udp.open_udp_port("127.0.0.1", 0, engine.workers)
    with socket.socket(fileno=os.dup(fds[0])) as probe:
        port = probe.getsockname()[1]
    engine.add_port(fds)
    keep: list[socket.socket] = []
    aids: list[str] = []
    for _ in range(flows):
        ours, theirs = socket.socketpair()
        remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        remote.bind(("127.0.0.1", 0))
        aid = os.urandom(8)
        engine.add(aid, theirs.detach(), [remote.detach()])
        keep.append(ours)
        aids.append(aid.hex())
    loop.add_reader(engine.fileno(), engine.drain)
    dtls_port = 0
    if mode == "channel":
        # Plaintext channels: the same socket per client as DTLS, without the records (what
        # the channel path costs apart from OpenSSL). A client's "hello" makes its channel.
        hello = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hello.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hello.bind(("127.0.0.1", 0))
        hello.setblocking(False)
        dtls_port = hello.getsockname()[1]

        def greeted() -> None:
            while True:
                try:
                    _data, peer = hello.recvfrom(64)
                except BlockingIOError:
                    break
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", dtls_port))
                sock.connect(peer)
                sock.send(b"ok")
                engine.add_channel(sock.detach())

        loop.add_reader(hello.fileno(), greeted)
    elif mode == "dtls":
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.setblocking(False)
        dtls_port = listener.getsockname()[1]
        handed: list[DTLSConnection] = []

        def established(conn: DTLSConnection) -> None:
            handed.append(conn)

        endpoint = DTLSServerEndpoint(
            dtls_server_context(cert, key), on_datagram=lambda c, d: None, on_established=established
        )

        def readable() -> None:
            while True:
                try:
                    data, peer = listener.recvfrom(65536)
                except BlockingIOError:
                    break
                endpoint.datagram_received(data, peer, loop.time())
            for datagram, address in endpoint.datagrams_to_send():
                listener.sendto(datagram, address)
            while handed:
                # The hand-off: the engine owns the connection from here on.
                conn = handed.pop()
                endpoint.connections.pop(conn.address, None)
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", dtls_port))
                sock.connect(conn.address)
                engine.add_channel(sock.detach(), udp.DTLSLink(conn.ssl, MTU))

        loop.add_reader(listener.fileno(), readable)
    print(json.dumps({"port": port, "dtls_port": dtls_port, "aids": aids}), flush=True)
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), max_seconds)
    except TimeoutError:
        pass
    drops = {reason.name: n for reason, n in engine.drops().items() if n}
    print(f"drops {json.dumps(drops)}", file=sys.stderr, flush=True)
    engine.close()
    for sock in keep:
        sock.close()


# -- the client (and echo server) --------------------------------------------------------


def _message(aid: bytes, target: tuple[str, int], payload: bytes) -> bytes:
    header = DatagramHeader(aid, AddressType.IPV4, target[0], target[1], 20 + len(payload))
    buf = bytearray(20 + len(payload))
    encode_datagram_header(header, buf)
    buf[20:] = payload
    return bytes(buf)


class Flow:
    def __init__(self, sock: socket.socket, message: bytes, conn: DTLSClientConnection | None) -> None:
        self.sock = sock
        self.message = message
        self.conn = conn

    def send(self) -> None:
        self.sock.send(self.message if self.conn is None else self.conn.send(self.message))

    def received(self, data: bytes) -> int:
        if self.conn is None:
            return 1
        self.conn.datagram_received(data, time.monotonic())
        n = len(self.conn.received)
        self.conn.received.clear()
        return n


def _handshake(sock: socket.socket, ca: str) -> DTLSClientConnection:
    conn = DTLSClientConnection(dtls_client_context(cafile=ca), "127.0.0.1", mtu=MTU)
    conn.start(time.monotonic())
    deadline = time.monotonic() + 10
    while not conn.established:
        if time.monotonic() > deadline or conn.closed:
            raise SystemExit(f"DTLS handshake with the bench proxy failed: {conn.error}")
        for datagram in conn.datagrams_to_send():
            sock.send(datagram)
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            conn.datagram_received(sock.recv(65536), time.monotonic())
        elif conn.retransmit_at is not None and time.monotonic() >= conn.retransmit_at:
            conn.handle_timer(time.monotonic())
    return conn


def run(path: str, mode: str, size: int, args: argparse.Namespace, cert: str, key: str) -> dict[str, float]:
    command = [sys.executable, "-P", __file__, "serve", "--path", path, "--mode", mode]
    command += ["--flows", str(args.flows), "--max-seconds", str(args.seconds * 4 + 20)]
    command += ["--cert", cert, "--key", key]
    # -P: the installed socks6fast (with its compiled engines), not this checkout's sources.
    proxy = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proxy.stdin is not None and proxy.stdout is not None
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flows: list[Flow] = []
    try:
        info = json.loads(proxy.stdout.readline())
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        target = echo.getsockname()
        for aid in info["aids"]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", info["dtls_port"] if mode != "plain" else info["port"]))
            conn = _handshake(sock, cert) if mode == "dtls" else None
            if mode == "channel":
                sock.send(b"hello")
                sock.settimeout(5)
                if sock.recv(64) != b"ok":
                    raise SystemExit("the bench proxy did not open a channel")
            sock.setblocking(False)
            flows.append(Flow(sock, _message(bytes.fromhex(aid), target, b"x" * size), conn))
        by_fd = {flow.sock.fileno(): flow for flow in flows}
        poller = select.epoll()
        poller.register(echo.fileno(), select.EPOLLIN)
        for flow in flows:
            poller.register(flow.sock.fileno(), select.EPOLLIN)

        def pump(echoes: int, seconds: float) -> int:
            done = 0
            start = time.monotonic()
            deadline = start + seconds
            waiting: list[Flow] = []  # --rate: replies whose next datagram waits for its turn
            while done < echoes and time.monotonic() < deadline:
                timeout = 0.1
                if waiting:
                    # The schedule: at most args.rate echoes per second since the start.
                    due = start + (done - len(waiting)) / args.rate
                    while waiting and due <= time.monotonic():
                        waiting.pop(0).send()
                        due = start + (done - len(waiting)) / args.rate
                    if waiting:
                        timeout = max(0.0, due - time.monotonic())
                events = poller.poll(timeout)
                if not events and timeout == 0.1:
                    for flow in flows:  # a lost datagram: keep the window full
                        flow.send()
                for fd, _ in events:
                    if fd == echo.fileno():
                        for _ in range(64):
                            try:
                                data, peer = echo.recvfrom(65536)
                            except BlockingIOError:
                                break
                            echo.sendto(data, peer)
                        continue
                    flow = by_fd[fd]
                    for _ in range(64):
                        try:
                            data = flow.sock.recv(65536)
                        except BlockingIOError:
                            break
                        for _ in range(flow.received(data)):
                            done += 1
                            if args.rate:
                                waiting.append(flow)
                            else:
                                flow.send()
            return done

        for flow in flows:
            for _ in range(args.inflight):
                flow.send()
        pump(args.count // 10, args.seconds)  # warm-up (and the first datagrams map, UDP-03)
        cpu0 = tree_cpu_seconds([proxy.pid])
        t0 = time.monotonic()
        echoes = pump(args.count, args.seconds)
        cpu1 = tree_cpu_seconds([proxy.pid])
        elapsed = time.monotonic() - t0
    finally:
        for flow in flows:
            flow.sock.close()
        echo.close()
        proxy.stdin.close()
        try:
            proxy.wait(20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
    if echoes == 0:
        raise SystemExit(f"no echo came back ({path}, {mode}, {size} B)")
    return {"echoes": echoes, "rate": echoes / elapsed, "proxy_us": (cpu1 - cpu0) / echoes * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--path", default="mmsg")
    serve.add_argument("--mode", default="plain")
    serve.add_argument("--flows", type=int, default=4)
    serve.add_argument("--max-seconds", type=float, default=60)
    serve.add_argument("--cert")
    serve.add_argument("--key")
    parser.add_argument("--paths", default="mmsg,python")
    parser.add_argument(
        "--modes",
        default="plain,channel,dtls",
        help="plain: the UDP port; channel: plaintext channels; dtls: DTLS channels",
    )
    parser.add_argument("--sizes", default="64,1400")
    parser.add_argument("--flows", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--count", type=int, default=20000, help="echoes per run")
    parser.add_argument("--seconds", type=float, default=8.0, help="time bound per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="cap the echoes/s of every run (0: as fast as the client goes); the same rate for "
        "every mode makes the proxy wake up about as often for each, so the difference is the "
        "work per datagram",
    )
    parser.add_argument("--json", help="write the medians here")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args.path, args.mode, args.flows, args.max_seconds, args.cert, args.key))
        return 0
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_certificate(Path(tmp))
        for rnd in range(args.rounds):
            for path in args.paths.split(","):
                for size in (int(s) for s in args.sizes.split(",")):
                    for mode in args.modes.split(","):
                        got = run(path, mode, size, args, cert, key)
                        results.setdefault(f"{path} {mode} {size}", []).append(got)
                        print(
                            f"round {rnd + 1} {path:6} {mode:5} {size:5} B: {got['proxy_us']:6.2f} us/echo "
                            f"proxy CPU, {got['rate']:8.0f} echoes/s",
                            file=sys.stderr,
                        )
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("proxy_us", "rate")}
        for name, runs in results.items()
    }
    modes = args.modes.split(",")
    print(
        f"{'path':6} {'size':>5}  " + " ".join(f"{m + ' us':>10}" for m in modes) + "  dtls/plain  echoes/s"
    )
    for path in args.paths.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            row = [medians[f"{path} {m} {size}"] for m in modes]
            ratio = ""
            if "dtls" in modes and "plain" in modes:
                plain = medians[f"{path} plain {size}"]["proxy_us"]
                ratio = f"{medians[f'{path} dtls {size}']['proxy_us'] / plain:10.2f}"
            print(
                f"{path:6} {size:5}  "
                + " ".join(f"{r['proxy_us']:10.2f}" for r in row)
                + f"  {ratio:>10}  "
                + "/".join(f"{r['rate']:.0f}" for r in row)
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
