"""The UDP load generator for SOCKS 6 over DTLS, in Python (issue 11's bench row).

``python -m socks6fast.bench._dtlsgen client --mode echo|hold|pps|handshakes ...`` speaks
the line protocol of udpgen.c's ``client`` (``ready N``, ``start``, ``done ...``, ``failed
...``), so ``_udp`` drives it the same way. udpgen.c has no DTLS (it would need OpenSSL's
DTLS API, cookie exchange and retransmission timers in C); this driver uses socks6fast's own
client (``udp_associate(transport="dtls")``), which verifies the proxy's certificate
against ``--ca``. ``--proto s6udp`` runs the same driver over plain UDP, the fair
reference for the DTLS rows: a Python client offers far fewer datagrams per second than
udpgen.c, and the proxy's CPU per datagram depends on the rate (fewer datagrams per
system call at lower rates).

Modes: ``echo`` (closed loop, ``--inflight`` datagrams in flight per association; ``done
echoes elapsed_ns lost p50_ns p99_ns sent``), ``hold`` (associations open, one datagram
echoed each, until stdin closes), ``pps`` (one way to a sink; ``done sent elapsed_ns``),
``handshakes`` (DTLS handshakes with the proxy's DTLS port, one after another on
``--flows`` tasks, each closed at once; ``done handshakes elapsed_ns``). Loopback only;
bounded by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import time
from typing import Any

from ..asyncio.client import UDPAssociation, udp_associate
from ..asyncio.dtls import open_dtls_client
from ..net.dtls import dtls_client_context

__all__ = ["main"]

LOSS_AFTER = 0.2
"""Seconds of silence after which a flow's datagrams in flight count as lost (as udpgen.c)."""


def _say(*fields: object) -> None:
    print(*fields, flush=True)


class _Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hard = time.monotonic() + args.max_seconds
        self.url = f"socks6+tls://127.0.0.1:{args.proxy}" if args.proto == "s6dtls" else ""
        if args.proto == "s6udp":
            self.url = f"socks6://127.0.0.1:{args.proxy}"
        self.proxy_ssl = ssl.create_default_context(cafile=args.ca) if args.ca else None
        self.proxy_dtls = dtls_client_context(cafile=args.ca) if args.ca else None
        self.started = False
        self.echoes = self.lost = self.sent = 0
        self.latencies: list[int] = []

    async def associate(self) -> UDPAssociation:
        kwargs: dict[str, Any] = {"timeout": 15.0}
        if self.args.proto == "s6dtls":
            kwargs.update(proxy_ssl=self.proxy_ssl, proxy_dtls=self.proxy_dtls, transport="dtls")
        else:
            kwargs.update(transport="udp")
        return await udp_associate(self.url, **kwargs)

    async def prove(self, assoc: UDPAssociation, target: tuple[str, int]) -> None:
        # One datagram echoed end to end before the timed loop (resent: UDP may drop).
        for _ in range(5):
            await assoc.sendto(b"probe---", target)
            with contextlib.suppress(TimeoutError):
                await assoc.recvfrom(timeout=0.4)
                return
        raise RuntimeError("no datagram came back through the proxy")

    def payload(self) -> bytes:
        size: int = self.args.size
        return time.monotonic_ns().to_bytes(8, "big") + b"e" * (size - 8)

    async def echo_flow(self, assoc: UDPAssociation, target: tuple[str, int], stop: float) -> None:
        inflight = 0
        while time.monotonic() < stop:
            while inflight < self.args.inflight:
                await assoc.sendto(self.payload(), target)
                inflight += 1
                self.sent += 1
            try:
                data, _ = await assoc.recvfrom(timeout=LOSS_AFTER)
            except TimeoutError:
                self.lost += inflight
                inflight = 0
                continue
            inflight -= 1
            self.echoes += 1
            if self.started and len(self.latencies) < 1_000_000 and len(data) >= 8:
                self.latencies.append(time.monotonic_ns() - int.from_bytes(data[:8], "big"))

    async def pps_flow(self, assoc: UDPAssociation, target: tuple[str, int], stop: float) -> None:
        message = b"e" * self.args.size
        while time.monotonic() < stop:
            for _ in range(self.args.batch):
                await assoc.sendto(message, target)
                self.sent += 1
            await asyncio.sleep(0)

    async def clock(self, stop: float) -> int:
        """``start`` after the warm-up (counts reset), then the window's length in ns."""
        await asyncio.sleep(self.args.warmup)
        self.echoes = self.lost = self.sent = 0
        self.latencies.clear()
        self.started = True
        t0 = time.monotonic_ns()
        _say("start")
        await asyncio.sleep(max(0.0, stop - time.monotonic()))
        return time.monotonic_ns() - t0

    async def flows_mode(self) -> None:
        args = self.args
        target = ("127.0.0.1", args.target)
        assocs: list[UDPAssociation] = []
        try:
            for _ in range(args.flows):
                assoc = await self.associate()
                assocs.append(assoc)
                if args.mode != "pps":
                    await self.prove(assoc, target)
            _say("ready", len(assocs))
            if args.mode == "hold":
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
                return
            stop = min(self.hard, time.monotonic() + args.warmup + args.seconds)
            flow = self.echo_flow if args.mode == "echo" else self.pps_flow
            tasks = [asyncio.create_task(flow(a, target, stop)) for a in assocs]
            elapsed = await self.clock(stop)
            await asyncio.gather(*tasks)
            if args.mode == "echo":
                lat = sorted(self.latencies)
                p50 = lat[len(lat) // 2] if lat else 0
                p99 = lat[len(lat) * 99 // 100] if lat else 0
                _say("done", self.echoes, elapsed, self.lost, p50, p99, self.sent)
            else:
                _say("done", self.sent, elapsed)
            # Keep the associations until the harness closes stdin (as udpgen.c does).
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        finally:
            for assoc in assocs:
                await assoc.aclose()

    async def handshakes_mode(self) -> None:
        args = self.args
        stop = min(self.hard, time.monotonic() + args.warmup + args.seconds)
        count = 0

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < stop:
                client = await open_dtls_client(
                    "127.0.0.1", args.proxy, proxy_dtls=self.proxy_dtls, timeout=5.0
                )
                client.close()
                await client.wait_closed()
                if self.started:
                    count += 1

        _say("ready", args.flows)
        tasks = [asyncio.create_task(worker()) for _ in range(args.flows)]
        await asyncio.sleep(args.warmup)
        self.started = True
        t0 = time.monotonic_ns()
        _say("start")
        await asyncio.gather(*tasks)
        _say("done", count, time.monotonic_ns() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="socks6fast.bench._dtlsgen")
    p.add_argument("command", choices=["client"])
    p.add_argument("--mode", choices=["echo", "hold", "pps", "handshakes"], required=True)
    p.add_argument("--proto", choices=["s6dtls", "s6udp"], default="s6dtls")
    p.add_argument("--proxy", type=int, required=True, help="the proxy's TLS (s6dtls) or plain port")
    p.add_argument("--target", type=int, default=0, help="the echo server's or sink's UDP port")
    p.add_argument("--ca", default="", help="CA file the proxy's certificate verifies against")
    p.add_argument("--flows", type=int, default=1)
    p.add_argument("--inflight", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--source", default="", help="ignored (udpgen.c's source address option)")
    args = p.parse_args(argv)
    if not 8 <= args.size <= 16000 or not 1 <= args.flows <= 1024 or not 1 <= args.inflight <= 256:
        print("failed bad arguments", flush=True)
        return 2
    run = _Run(args)
    try:
        asyncio.run(run.handshakes_mode() if args.mode == "handshakes" else run.flows_mode())
    except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
        print(f"failed {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
