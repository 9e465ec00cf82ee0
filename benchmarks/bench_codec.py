"""Codec micro-benchmarks: the Cython twin, the Python reference and a plain ``struct`` baseline.

What is measured: wall time per call (pytest-benchmark reports seconds; the
README table gives the median in ns per call and the speedups) of

* ``decode_request``: a typical CONNECT to a domain name carrying an
  Authentication Data option (RFC 1929 username/password), a Session ID and two
  Stack options (TTL, Multipath): 80 bytes;
* ``encode_operation_reply``: a successful reply with an IPv4 bind address, a
  Session ID and the two Stack options echoed (D9);
* ``decode_datagram_header`` / ``encode_datagram_header``, IPv4 and domain name
  (the per-packet work of UDP relay; encoding writes into a preallocated
  bytearray).

Implementations, on the same inputs in one run (multidict benchmarks/benchmark.py):
``c`` = socks6fast.proto._codec_c, ``py`` = socks6fast.proto._codec_py, and ``struct`` = the
same wire work with ``struct``/``bytes`` only, without validation and without
message objects (tuples in, tuples out): the floor for pure Python.

Run (see benchmarks/README.md for the table and the exact command)::

    python -m pytest benchmarks/bench_codec.py --benchmark-json=benchmarks/results/codec.json
    python benchmarks/bench_codec.py --table benchmarks/results/codec.json

``python benchmarks/bench_codec.py`` alone runs a quick timeit loop and prints
ns per call (h11 bench/benchmarks.py style), handy under a profiler.
"""

from __future__ import annotations

import importlib
import json
import socket
import struct
import sys
import timeit
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from socks6fast.constants import AddressType, Availability, Command, ReplyCode, StackLeg
from socks6fast.proto import _codec_py
from socks6fast.proto.messages import (
    AuthData,
    DatagramHeader,
    MultipathOption,
    OperationReply,
    Request,
    SessionID,
    TTLOption,
)

try:
    _codec_c: ModuleType | None = importlib.import_module("socks6fast.proto._codec_c")
except ImportError:  # pragma: no cover - pure build
    _codec_c = None

# --- Inputs (module level, built once) ------------------------------------------

SESSION_ID = bytes(range(16))
USERPASS = b"\x01\x05alice\x0ecorrect-horse!"  # RFC 1929 request inside Authentication Data (D7)
REQUEST = Request(
    Command.CONNECT,
    AddressType.DOMAIN_NAME,
    "www.example.com",
    443,
    (
        AuthData(2, USERPASS),
        SessionID(SESSION_ID),
        TTLOption(StackLeg.PROXY_REMOTE, 64),
        MultipathOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    ),
)
REQUEST_WIRE = _codec_py.encode_request(REQUEST)
REPLY = OperationReply(
    ReplyCode.SUCCESS,
    AddressType.IPV4,
    "192.0.2.10",
    40123,
    (
        SessionID(SESSION_ID),
        TTLOption(StackLeg.PROXY_REMOTE, 64),
        MultipathOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    ),
)
ASSOCIATION_ID = b"\x8a\x11\x02\xfe\x00\x42\x13\x37"
PAYLOAD_LENGTH = 100
HEADER_IPV4 = DatagramHeader(ASSOCIATION_ID, AddressType.IPV4, "198.51.100.7", 5353, 20 + PAYLOAD_LENGTH)
HEADER_DOMAIN = DatagramHeader(
    ASSOCIATION_ID,
    AddressType.DOMAIN_NAME,
    "ntp.example.org",
    123,
    _codec_py.datagram_header_length(AddressType.DOMAIN_NAME, "ntp.example.org") + PAYLOAD_LENGTH,
)
OUT = bytearray(2048)


def _datagram(header: DatagramHeader) -> bytes:
    n = _codec_py.encode_datagram_header(header, OUT)
    return bytes(OUT[:n]) + bytes(PAYLOAD_LENGTH)


DATAGRAM_IPV4 = _datagram(HEADER_IPV4)
DATAGRAM_DOMAIN = _datagram(HEADER_DOMAIN)

# --- The struct baseline: same wire work, no validation, tuples ------------------

_ADDRESSED = struct.Struct(">BBHHBB")
_OPTION = struct.Struct(">HH")
_DGRAM = struct.Struct(">BBH8sBxH")


def struct_decode_request(data: bytes) -> tuple[tuple[Any, ...], int]:
    """Header, address and an option walk (kind, data) with struct; no checks."""
    _, command, options_length, port, _, atyp = _ADDRESSED.unpack_from(data, 0)
    if atyp == AddressType.DOMAIN_NAME:
        n = data[8]
        address = data[9 : 9 + n].decode()
        pos = 8 + ((n + 4) & ~3)
    elif atyp == AddressType.IPV4:
        address = socket.inet_ntop(socket.AF_INET, data[8:12])
        pos = 12
    else:
        address = socket.inet_ntop(socket.AF_INET6, data[8:24])
        pos = 24
    end = pos + options_length
    options = []
    while pos < end:
        kind, length = _OPTION.unpack_from(data, pos)
        options.append((kind, data[pos + 4 : pos + length]))
        pos += length
    return (command, atyp, address, port, options), end


STRUCT_REPLY = (
    ReplyCode.SUCCESS,
    "192.0.2.10",
    40123,
    ((6, SESSION_ID), (1, b"\x81\x03\x40\x00"), (1, b"\x84\x02\x02\x00")),
)


def struct_encode_operation_reply(reply: tuple[Any, ...]) -> bytes:
    """Header, packed IPv4 address and (kind, data) options with struct; no checks."""
    code, address, port, options = reply
    encoded = b"".join([_OPTION.pack(kind, 4 + len(body)) + body for kind, body in options])
    header = _ADDRESSED.pack(6, code, len(encoded), port, 0, AddressType.IPV4)
    return header + socket.inet_aton(address) + encoded


def struct_decode_datagram_header(data: bytes) -> tuple[tuple[Any, ...], int]:
    """Fixed fields with one unpack_from, then the address; no checks."""
    _, _, message_length, association_id, atyp, port = _DGRAM.unpack_from(data, 0)
    if atyp == AddressType.IPV4:
        return (association_id, atyp, socket.inet_ntoa(data[16:20]), port, message_length), 20
    n = data[16]
    address = data[17 : 17 + n].decode()
    return (association_id, atyp, address, port, message_length), 16 + ((n + 4) & ~3)


def struct_encode_datagram_header(header: tuple[Any, ...], out: bytearray) -> int:
    """pack_into the fixed fields, then the address; no checks."""
    association_id, atyp, address, port, message_length = header
    _DGRAM.pack_into(out, 0, 6, 3, message_length, association_id, atyp, port)
    if atyp == AddressType.IPV4:
        out[16:20] = socket.inet_aton(address)
        return 20
    name = address.encode()
    field = (len(name) + 4) & ~3
    out[16 : 16 + field] = bytes([len(name)]) + name + bytes(field - 1 - len(name))
    return 16 + field


def _as_tuple(header: DatagramHeader) -> tuple[Any, ...]:
    return (header.association_id, header.address_type, header.address, header.port, header.message_length)


# --- Cases: name -> {implementation: (function, args)} ----------------------------

Call = tuple[Callable[..., Any], tuple[Any, ...]]


def _cases() -> dict[str, dict[str, Call]]:
    twins = {"py": _codec_py}
    if _codec_c is not None:
        twins["c"] = _codec_c
    cases: dict[str, dict[str, Call]] = {
        "decode_request": {"struct": (struct_decode_request, (REQUEST_WIRE,))},
        "encode_operation_reply": {"struct": (struct_encode_operation_reply, (STRUCT_REPLY,))},
        "decode_datagram_header_ipv4": {"struct": (struct_decode_datagram_header, (DATAGRAM_IPV4,))},
        "decode_datagram_header_domain": {"struct": (struct_decode_datagram_header, (DATAGRAM_DOMAIN,))},
        "encode_datagram_header_ipv4": {
            "struct": (struct_encode_datagram_header, (_as_tuple(HEADER_IPV4), OUT))
        },
        "encode_datagram_header_domain": {
            "struct": (struct_encode_datagram_header, (_as_tuple(HEADER_DOMAIN), OUT))
        },
    }
    for impl, module in twins.items():
        cases["decode_request"][impl] = (module.decode_request, (REQUEST_WIRE,))
        cases["encode_operation_reply"][impl] = (module.encode_operation_reply, (REPLY,))
        cases["decode_datagram_header_ipv4"][impl] = (module.decode_datagram_header, (DATAGRAM_IPV4,))
        cases["decode_datagram_header_domain"][impl] = (module.decode_datagram_header, (DATAGRAM_DOMAIN,))
        cases["encode_datagram_header_ipv4"][impl] = (module.encode_datagram_header, (HEADER_IPV4, OUT))
        cases["encode_datagram_header_domain"][impl] = (module.encode_datagram_header, (HEADER_DOMAIN, OUT))
    return cases


CASES = _cases()
IMPLEMENTATIONS = ("c", "py", "struct")


def _check_agreement() -> None:
    # Benchmarks of wrong answers are worthless: both twins and the baseline
    # must produce the same bytes / fields on these inputs.
    for case, impls in CASES.items():
        results = {impl: fn(*args) for impl, (fn, args) in impls.items()}
        if case.startswith("encode_datagram"):
            continue  # compared through OUT below
        if "c" in results:
            assert results["c"] == results["py"], case
    for header in (HEADER_IPV4, HEADER_DOMAIN):
        written = []
        for fn, args in (
            (_codec_py.encode_datagram_header, (header, OUT)),
            (struct_encode_datagram_header, (_as_tuple(header), OUT)),
        ):
            n = fn(*args)
            written.append(bytes(OUT[:n]))
        assert written[0] == written[1]
    assert struct_encode_operation_reply(STRUCT_REPLY) == _codec_py.encode_operation_reply(REPLY)


_check_agreement()


# Rounds of at least 200 us: pytest-benchmark's default (5 us) lets the timer's own
# cost leak into sub-microsecond medians.
@pytest.mark.benchmark(min_time=0.0002, max_time=1.0, min_rounds=50, warmup=True)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_codec(benchmark: Any, case: str, impl: str) -> None:
    """One case, one implementation; grouped by case so the table compares c/py/struct."""
    if impl not in CASES[case]:
        pytest.skip(f"{impl} is not available (pure build)")
    function, args = CASES[case][impl]
    benchmark.group = case
    benchmark.extra_info["impl"] = impl
    benchmark(function, *args)


# --- Command line: quick timeit loop, or the README table from a JSON run ------------


def _table_from_json(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    median: dict[str, dict[str, float]] = {}
    minimum: dict[str, float] = {}
    for bench in report["benchmarks"]:
        impl = bench["extra_info"]["impl"]
        median.setdefault(bench["group"], {})[impl] = bench["stats"]["median"] * 1e9
        if impl == "c":
            minimum[bench["group"]] = bench["stats"]["min"] * 1e9
    machine = report.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('cpu', {}).get('count', '?')} cores; Python {machine.get('python_version', '?')}; "
        f"{report.get('datetime', '?')}",
        "",
        "Median ns per call (the c column also gives the minimum, in brackets).",
        "",
        "| case | c (ns) | py (ns) | struct (ns) | c vs py | c vs struct |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in CASES:
        row = median.get(case, {})
        c, py, st = row.get("c"), row.get("py"), row.get("struct")
        lines.append(
            f"| {case} | {c or float('nan'):.0f} ({minimum.get(case, float('nan')):.0f}) | "
            f"{py or float('nan'):.0f} | {st or float('nan'):.0f} | "
            + (f"{py / c:.1f}x | {st / c:.1f}x |" if c and py and st else "- | - |")
        )
    return "\n".join(lines)


def _quick(number: int = 20000) -> None:
    for case, impls in CASES.items():
        cells = []
        for impl in IMPLEMENTATIONS:
            if impl in impls:
                fn, args = impls[impl]
                timer = timeit.Timer("fn(*args)", globals={"fn": fn, "args": args})
                best = min(timer.repeat(number=number, repeat=5))
                cells.append(f"{impl} {best / number * 1e9:8.0f} ns")
        print(f"{case:32s} " + "  ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(_table_from_json(sys.argv[2]))
    else:
        _quick()
