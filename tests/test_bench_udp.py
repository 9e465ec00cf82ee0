"""The UDP rows of ``socks6fast bench`` (issue 10, "Speed"): the smoke run, the report, the chart.

The smoke run is the installed console script (as in test_bench_smoke.py: an empty directory
outside the checkout, no PYTHONPATH, every process it started stopped at the end) with
``--tests udp``: closed-loop echo at 64 and 1400 bytes, the round trip at one in flight,
one-way packets per second and memory per idle association, through a local ``socks6fast
serve`` (SOCKS 6 over plain UDP and over TCP, SOCKS 5) and Dante where it is installed,
beside direct loopback. The traffic is udpgen.c's (compiled by the run): each flow does its
real UDP ASSOCIATE handshake, so a row only has figures when the proxy relayed them.
Loopback only; every process is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from test_bench_smoke import _socks6fast

from socks6fast.bench import _chart, _measure, _procs, _report
from socks6fast.constants import AddressType, AuthMethod, AuthReplyType, Command, ReplyCode, Socks5Command
from socks6fast.proto import _codec_py, socks5
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    AuthReply,
    Datagram,
    DatagramHeader,
    OperationReply,
    Request,
)

DANTE = shutil.which("danted") or (Path("/usr/sbin/danted").exists() and "/usr/sbin/danted")
PROXIES = ("socks6fast-s6", "socks6fast-s6tcp", "socks6fast-s5") + (("dante",) if DANTE else ())
UDP_TARGETS = (
    "UDP socks6fast-s6 proxy CPU per 64-B echo",
    "UDP socks6fast-s6 echoes/s / Dante (64 B)",
    "UDP socks6fast-s6 echoes/s / direct (64 B)",
    "UDP socks6fast-s6 proxy CPU per echo, 1400 B / 64 B",
)


#: The bench's harness does not depend on the codec: in the SOCKS6FAST_NO_EXTENSIONS=1 run the
#: smoke runs below would spend ~50 s measuring nothing new (the pure-Python UDP engine and DTLS
#: path are proven by tests/test_udp_*.py and tests/test_dtls*.py in that run, and
#: tests/test_bench_smoke.py runs the suite once on the pure-Python relay).
ONCE = pytest.mark.skipif(
    bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS")),
    reason="bench harness: run in the compiled run only (CI time); the engines are tested in both",
)


@ONCE
@pytest.mark.timeout(150)
def test_bench_udp_smoke(tmp_path: Path) -> None:
    """`socks6fast bench --smoke --tests udp`: every UDP row has figures for direct, the three
    socks6fast transports (SOCKS 6 datagrams over plain UDP and over TCP, SOCKS 5 UDP) and
    Dante (when installed; otherwise the run says it is not); microsocks is skipped with the
    reason printed; the table and the issue's four targets are in the output and the JSON."""
    systems = "direct,s6udp,s6tcp,s5,dante,microsocks"
    status, log = _socks6fast(
        tmp_path, "bench", "--smoke", "--systems", systems, "--tests", "udp", timeout=140
    )
    assert status == 0, log
    res = json.loads((tmp_path / "run" / "socks6fast-bench.json").read_text())
    udp = res["udp"]
    assert res["options"]["tests"] == ["udp"] and res["options"]["udp_sizes"] == [64, 1400], log
    assert "microsocks" in udp["skipped"] and "no UDP ASSOCIATE" in udp["skipped"]["microsocks"], log
    assert "[udp] microsocks     skipped: microsocks has no UDP ASSOCIATE" in log, log
    if not DANTE:
        assert "danted not installed" in res["systems"]["dante"]["reason"], log
    for system in ("direct", *PROXIES):
        for size in ("64", "1400"):
            row = udp["echo"][size][system]
            assert row["echoes_per_s"] > 0 and 0 <= row["loss"] < 1, (system, size, log)
            assert row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"], (system, size, log)
        assert udp["latency"][system]["p50_us"] > 0, (system, log)
        assert udp["pps"][system]["pps"] > 0 and udp["pps"][system]["sent_per_s"] > 0, (system, log)
    for system in PROXIES:
        # The proxy's own CPU is measured (its process tree) and memory per association is read.
        assert udp["echo"]["64"][system]["proxy_us_per_echo"] > 0, (system, log)
        assert udp["pps"][system]["proxy_us_per_packet"] > 0, (system, log)
        assert udp["idle"][system]["kib_rss"] is not None, (system, log)
    assert udp["echo"]["64"]["direct"]["proxy_us_per_echo"] is None, log
    # The echo server's own CPU per echo: the floor a relay is compared with.
    assert udp["echo"]["64"]["direct"]["server_us_per_echo"] > 0, log
    assert "The echo server (recvmmsg/sendmmsg, 64 at a time) spent " in log, log
    targets = {t["target"]: t for t in res["targets"]}
    for name in UDP_TARGETS:
        assert targets[name]["issue"] == 10, log
        if DANTE or "Dante" not in name:
            assert targets[name]["value"] is not None, (name, log)
    assert "UDP echo through UDP ASSOCIATE (closed loop, 8 flows x 4 in flight" in log, log
    assert "| socks6fast-s6tcp | SOCKS 6, datagrams on TCP |" in log, log
    assert "UDP one way, open loop" in log, log


def _udp_results(cpu_small: float, cpu_large: float, rate: float) -> dict[str, Any]:
    systems = ["direct", "socks6fast-s6", "socks6fast-s6tcp", "dante"]
    kinds = {"direct": "none", "socks6fast-s6": "s6udp", "socks6fast-s6tcp": "s6tcp", "dante": "s5"}

    def echo(s: str, cpu: float) -> dict[str, Any]:
        figures = {
            "direct": (100_000.0, None),
            "dante": (10_000.0, 30.0),
            "socks6fast-s6": (rate, cpu),
            "socks6fast-s6tcp": (40_000.0, 9.0),
        }
        eps, proxy = figures[s]
        return {"echoes_per_s": eps, "proxy_us_per_echo": proxy, "machine_us_per_echo": 20.0, "loss": 0.0}

    return {
        "meta": {"date": "2026-01-02 03:04 UTC", "machine": {"summary": "2 cores, a test"}},
        "options": {
            "udp_flows": 8,
            "udp_inflight": 4,
            "udp_idle": 200,
            "udp_pps_size": 64,
            "udp_pps_batch": 32,
        },
        "measured_systems": systems,
        "systems": {s: {"available": True, "reason": "", "udp": kinds[s]} for s in systems},
        "udp": {
            "echo": {
                "64": {s: echo(s, cpu_small) for s in systems},
                "1400": {s: echo(s, cpu_large) for s in systems},
            },
            "latency": {s: {"p50_us": 30.0, "p99_us": 90.0} for s in systems},
            "pps": {s: {"pps": 200_000.0, "sent_per_s": 250_000.0, "loss": 0.2} for s in systems},
            "idle": {"socks6fast-s6": {"kib_rss": 3.5, "kib_pss": 3.4}},
            "skipped": {"microsocks": "microsocks has no UDP ASSOCIATE (it relays TCP only)"},
        },
    }


def test_udp_targets_are_the_issues() -> None:
    """Issue 10's targets, each on the right side of its limit: proxy CPU <= 6 us per 64-B echo
    through SOCKS 6 over UDP, >= 3 x Dante's and >= 0.5 x direct echoes/s, 1400-B echoes at most
    15 % more proxy CPU than 64-B ones."""
    met = {t["target"]: t for t in _report.targets(_udp_results(5.0, 5.5, 60_000.0))}
    assert [met[n]["ok"] for n in UDP_TARGETS] == [True, True, True, True]
    assert [met[n]["value"] for n in UDP_TARGETS] == [5.0, 6.0, 0.6, pytest.approx(1.1)]
    missed = {t["target"]: t for t in _report.targets(_udp_results(6.5, 7.8, 25_000.0))}
    assert [missed[n]["ok"] for n in UDP_TARGETS] == [False, False, False, False]
    assert [missed[n]["value"] for n in UDP_TARGETS] == [6.5, 2.5, 0.25, pytest.approx(1.2)]


def test_udp_table_and_chart() -> None:
    """The UDP table names each row's transport and says why a system was skipped; the chart has
    the 64-B echo rate and its proxy CPU (target line at 6 us) with the UDP-only row in it, and
    the TCP panels leave that row out."""
    res = _udp_results(5.0, 5.5, 60_000.0)
    res["bulk"] = {"1": {s: {"gbps": 1.0} for s in ("direct", "socks6fast-s6", "dante")}}
    res["targets"] = _report.targets(res)
    text = "\n".join(_report.udp_tables(res))
    assert "| socks6fast-s6tcp | SOCKS 6, datagrams on TCP | 40,000" in text
    assert "| dante            | SOCKS 5 UDP               | 10,000          | 30.00" in text
    assert "UDP: microsocks skipped: microsocks has no UDP ASSOCIATE (it relays TCP only)." in text
    panels = {p.title: p for p in _chart.panels(res)}
    assert [b.label for b in panels["Bulk, 1 stream"].bars] == ["direct", "socks6fast-s6", "dante"]
    assert [b.label for b in panels["UDP echo, 64 B"].bars] == [
        "direct",
        "socks6fast-s6",
        "socks6fast-s6tcp",
        "dante",
    ]
    cpu = panels["UDP proxy CPU per 64-B echo"]
    assert cpu.target == 6.0 and [(b.label, b.value) for b in cpu.bars] == [
        ("socks6fast-s6", 5.0),
        ("socks6fast-s6tcp", 9.0),
        ("dante", 30.0),
    ]


def test_udp_usage_errors(tmp_path: Path) -> None:
    """UDP options out of range: exit 2 and one sentence, no traceback."""
    status, out = _socks6fast(tmp_path, "bench", "--udp-sizes", "4,64")
    assert (
        status == 2 and out.splitlines()[-1] == "socks6fast bench: error: --udp-sizes: 8 to 60000 bytes each"
    )
    status, out = _socks6fast(tmp_path, "bench", "--udp-idle", "0")
    assert status == 2 and out.splitlines()[-1].endswith(
        "--udp-flows takes 1-1024, --udp-inflight 1-256 and --udp-idle 1-4096"
    )
    assert "Traceback" not in out


# ---------------------------------------------------------------- udpgen's bytes and the codec


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "udpgen closed the connection"
        data += chunk
    return data


def _codec_peer(proto: str, target: int, seen: dict[str, Any], ready: threading.Event) -> None:
    """The proxy side of one association, every message decoded and encoded by the reference
    codecs (``_codec_py``, ``proto.socks5``): what udpgen sends must decode to the intended
    messages, and udpgen must take what the codecs encode (with UDP padding, UDP-05)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.bind(("127.0.0.1", lsock.getsockname()[1] if proto == "s6udp" else 0))
    for s in (lsock, usock):
        s.settimeout(10)
    seen["port"] = lsock.getsockname()[1]
    ready.set()
    aid = bytes(range(1, 9))
    conn, _ = lsock.accept()
    conn.settimeout(10)
    with lsock, usock, conn:
        if proto == "s5":
            seen["greeting"] = socks5.decode_greeting(_read_exactly(conn, 3))[0]
            conn.sendall(socks5.encode_method_selection(socks5.Socks5MethodSelection(AuthMethod.NONE)))
            seen["request"] = socks5.decode_request(_read_exactly(conn, 10))[0]
            bnd = usock.getsockname()[1]
            conn.sendall(
                socks5.encode_reply(socks5.Socks5Reply(ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", bnd))
            )
            data, src = usock.recvfrom(65536)
            header, length = socks5.decode_udp_header(data)
            seen["datagram"] = (header, len(data) - length)
            back = socks5.Socks5UDPHeader(AddressType.IPV4, "127.0.0.1", target)
            usock.sendto(socks5.encode_udp_header(back) + data[length:], src)
            conn.recv(1)  # until udpgen closes
            return
        seen["request"] = _codec_py.decode_request(_read_exactly(conn, 12))[0]
        conn.sendall(
            _codec_py.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS))
            + _codec_py.encode_operation_reply(
                OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 4000)
            )
            + _codec_py.encode_association_message(AssociationInit(aid))
        )
        if proto == "s6udp":
            data, src = usock.recvfrom(65536)
            header, length = _codec_py.decode_datagram_header(data)
            payload = data[length : header.message_length]
            assert header.message_length == len(data)
        else:
            buf = b""
            while True:
                message, used = _codec_py.decode_association_message(buf)
                if message is not None:
                    break
                buf += conn.recv(65536)
            assert isinstance(message, Datagram) and used == len(buf)
            header, payload = message.header, message.payload
        seen["datagram"] = (header, len(payload))
        conn.sendall(_codec_py.encode_association_message(AssociationConfirmation(aid)))
        back = DatagramHeader(aid, AddressType.IPV4, "127.0.0.1", target, 20 + len(payload))
        if proto == "s6udp":
            out = bytearray(20)
            _codec_py.encode_datagram_header(back, out)
            usock.sendto(bytes(out) + payload + b"padding", src)
        else:
            conn.sendall(_codec_py.encode_association_message(Datagram(back, payload)))
        conn.recv(1)  # until udpgen closes


@pytest.mark.parametrize("proto", ["s6udp", "s6tcp", "s5"])
def test_udpgen_bytes_match_the_codec(tmp_path: Path, proto: str) -> None:
    """udpgen's handshake and datagrams are what socks6fast's reference codecs decode (a SOCKS 6
    UDP ASSOCIATE Request for any address, Datagram Headers carrying the Association ID of the
    Initialization and naming the target; RFC 1928's UDP ASSOCIATE and UDP header), and it takes
    the replies they encode, through to one datagram echoed back."""
    gen = _measure.build_loadgen(tmp_path, "udpgen")
    seen: dict[str, Any] = {}
    ready = threading.Event()
    peer = threading.Thread(target=_codec_peer, args=(proto, 4242, seen, ready), daemon=True)
    peer.start()
    assert ready.wait(10)
    argv = [str(gen), "client", "--mode", "hold", "--proto", proto, "--proxy", str(seen["port"])]
    argv += ["--target", "4242", "--flows", "1", "--size", "100", "--max-seconds", "20"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as client:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline().strip()
        client.stdin.close()
        assert client.wait(timeout=10) == 0
    peer.join(10)
    assert line == "ready 1", (line, seen)
    header, payload_length = seen["datagram"]
    assert payload_length == 100
    if proto == "s5":
        assert seen["greeting"] == socks5.Socks5Greeting((AuthMethod.NONE,))
        request = seen["request"]
        assert (request.command, request.address_type, request.address) == (
            Socks5Command.UDP_ASSOCIATE,
            AddressType.IPV4,
            "127.0.0.1",
        )
        assert request.port != 0  # the UDP port udpgen sends from (RFC 1928 section 7)
        assert header == socks5.Socks5UDPHeader(AddressType.IPV4, "127.0.0.1", 4242)
        return
    assert seen["request"] == Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0, ())
    assert header == DatagramHeader(bytes(range(1, 9)), AddressType.IPV4, "127.0.0.1", 4242, 120)


def test_readme_udp_block_leaves_the_tcp_tables(tmp_path: Path) -> None:
    """`--readme` with a UDP-only run rewrites the UDP block (its own markers) and leaves the TCP
    tables as they were; a run with both writes both, each with its own targets."""
    res = _udp_results(5.0, 5.5, 60_000.0)
    res["meta"].update(command="socks6fast bench --tests udp", loadavg_start="0.1 0.2 0.3", elapsed_s=12.0)
    res["targets"] = _report.targets(res)
    readme = tmp_path / "README.md"
    tcp_block = f"{_report.README_BEGIN}\nthe TCP tables of an earlier run\n{_report.README_END}"
    old_udp = f"{_report.README_UDP_BEGIN}\nold\n{_report.README_UDP_END}"
    readme.write_text(f"# B\n\n{tcp_block}\n\ntext\n\n{old_udp}\n\nend\n")
    assert _report.update_readme(readme, res) == ["udp"]
    text = readme.read_text()
    assert tcp_block in text and "\nold\n" not in text and text.endswith("\n\nend\n")
    udp = text.split(_report.README_UDP_BEGIN)[1].split(_report.README_UDP_END)[0]
    assert "Produced by `socks6fast bench --tests udp`" in udp and "| socks6fast-s6tcp |" in udp
    assert "Targets (issue #10, UDP):" in udp and "UDP socks6fast-s6 proxy CPU per 64-B echo" in udp
    # Both parts: the TCP block gets the TCP tables and only the TCP targets.
    res["connections"] = {"direct": {"conn_per_s": 1000.0}}
    res["options"]["concurrency"] = 32
    res["targets"].append(
        {"target": "a TCP one", "value": 1.0, "op": "<=", "limit": 2, "unit": "", "ok": True}
    )
    assert _report.update_readme(readme, res) == ["tcp", "udp"]
    tcp = readme.read_text().split(_report.README_BEGIN)[1].split(_report.README_END)[0]
    assert "Connections: CONNECT" in tcp and "Targets (issue #4):" in tcp and "a TCP one" in tcp
    assert "UDP echo" not in tcp and "UDP socks6fast-s6" not in tcp


def test_cpu_between_snapshots_is_never_negative() -> None:
    """The proxy CPU of a window from two snapshots of its process tree: the growth of each
    process, all of a new one's, and an ended child through its parent's waited-for time; a
    child that ended unwaited (auto-reaped, as Dante's I/O processes are) cannot make the
    window negative (a plain difference of sums gave -6 us per echo for Dante once)."""
    tick = 1 / _procs.CLK_TCK
    parent, child, newer = (10, 1), (11, 2), (12, 3)
    before = {parent: (100, 0), child: (500, 0)}
    # Both alive: their growth.
    assert _procs.cpu_seconds_between(before, {parent: (110, 0), child: (530, 0)}) == pytest.approx(40 * tick)
    # The child ended and was waited for (600 ticks in its life, 100 of them in the window).
    assert _procs.cpu_seconds_between(before, {parent: (110, 600)}) == pytest.approx(110 * tick)
    # The child ended unwaited: only the parent's growth, not -490 ticks; a new process counts whole.
    assert _procs.cpu_seconds_between(before, {parent: (110, 0), newer: (7, 0)}) == pytest.approx(17 * tick)


DTLS_TARGET = "UDP socks6fast-s6dtls proxy CPU per 64-B echo / socks6fast-s6py"


@ONCE
def test_bench_dtls_rows_smoke(tmp_path: Path) -> None:
    """Issue 11's bench row: `socks6fast bench --smoke --tests udp --systems s6dtls` starts a
    socks6fast with a TLS listener and the DTLS port beside it (a throw-away CA), and the
    Python generator's associations over DTLS (``socks6fast-s6dtls``) and over plain UDP
    (``socks6fast-s6py``, the reference at a like rate) echo 64 and 1400 bytes with the proxy's
    CPU measured; the DTLS handshake rate and its proxy CPU; the 3 x target is evaluated."""
    status, log = _socks6fast(
        tmp_path, "bench", "--smoke", "--systems", "s6dtls", "--tests", "udp", timeout=140
    )
    assert status == 0, log
    res = json.loads((tmp_path / "run" / "socks6fast-bench.json").read_text())
    udp = res["udp"]
    for system in ("socks6fast-s6dtls", "socks6fast-s6py"):
        for size in ("64", "1400"):
            row = udp["echo"][size][system]
            assert row["echoes_per_s"] > 0 and row["proxy_us_per_echo"] > 0, (system, size, log)
        assert udp["pps"][system]["pps"] > 0, (system, log)
    hs = udp["dtls_handshakes"]["socks6fast-s6dtls"]
    assert hs["handshakes_per_s"] > 0 and hs["proxy_us_per_handshake"] > 0, log
    targets = {t["target"]: t for t in res["targets"]}
    assert targets[DTLS_TARGET]["issue"] == 11 and targets[DTLS_TARGET]["value"] is not None, log
    assert "| socks6fast-s6dtls | SOCKS 6, DTLS (Python client)" in log, log
    assert "DTLS handshakes with the proxy's DTLS port" in log, log


def test_dtls_target_and_handshake_table() -> None:
    """Issue 11's target: proxy CPU per 64-B DTLS echo at most 3 x the plain-UDP figure of the
    same Python client (met at 2.5 x, missed at 3.5 x); the handshake table shows its rows."""
    res = _udp_results(5.0, 5.5, 60_000.0)
    for name, kind in (("socks6fast-s6py", "s6py"), ("socks6fast-s6dtls", "s6dtls")):
        res["measured_systems"].append(name)
        res["systems"][name] = {"available": True, "reason": "", "udp": kind}
    for dtls_cpu, ok in ((25.0, True), (35.0, False)):
        for size in ("64", "1400"):
            res["udp"]["echo"][size]["socks6fast-s6py"] = {"echoes_per_s": 9000.0, "proxy_us_per_echo": 10.0}
            res["udp"]["echo"][size]["socks6fast-s6dtls"] = {
                "echoes_per_s": 8000.0,
                "proxy_us_per_echo": dtls_cpu,
            }
        target = {t["target"]: t for t in _report.targets(res)}[DTLS_TARGET]
        assert (target["value"], target["ok"], target["issue"]) == (pytest.approx(dtls_cpu / 10), ok, 11)
    res["udp"]["dtls_handshakes"] = {
        "socks6fast-s6dtls": {"handshakes_per_s": 600.0, "proxy_us_per_handshake": 700.0}
    }
    text = "\n".join(_report.udp_tables(res))
    assert "| socks6fast-s6dtls | 600          | 700                |" in text
    assert "| socks6fast-s6dtls | SOCKS 6, DTLS (Python client)" in text
