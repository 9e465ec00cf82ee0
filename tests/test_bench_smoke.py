"""The benchmark suite runs from the installed package: ``socks6fast bench --smoke``, ``bench ceiling``,
``bench chart``, with the current directory outside the checkout.

The smoke profile runs every test of the suite (idle memory, time to first
byte, connections, one-stream bulk) for a fraction of a second each, against
direct loopback and a local ``socks6fast serve`` (SOCKS5 and SOCKS6 paths, and
the username/password instance). It needs a C compiler for the package's
loadgen.c, which building the package's extensions needs anyway. Loopback only.

Every run here is the installed console script in a subprocess, started in an
empty temporary directory with no PYTHONPATH, so nothing of the source checkout
can be imported: what a user who ran ``pip install socks6fast`` gets. Every
process a run starts inherits that directory as its working directory, which is
how the tests check that none is left behind.

The TCP Fast Open rows of the TTFB test (TRN-01, TRN-02, IDM-03) need
net.ipv4.tcp_fastopen bits 1 and 2: CI runs as root and sets it to 3 (.ci/run),
and the suite itself sets it when run as root; elsewhere they are skipped with a note.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import socks6fast
from socks6fast.bench import _chart, _ttfb
from socks6fast.constants import AddressType, Command
from socks6fast.proto import _codec_py
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodAdvertisement,
    IdempotenceExpenditure,
    IdempotenceRequest,
    Request,
    SessionID,
    SessionRequest,
)

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(socks6fast.__file__).resolve().parent
NO_EXT = bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS"))
RELAY = "asyncio (SOCKS6FAST_NO_EXTENSIONS is set)" if NO_EXT else "splice engine"
#: Runs the command line with matplotlib unimportable (a None entry in sys.modules makes
#: ``import matplotlib`` raise ImportError), as on a host without the [bench] extra.
WITHOUT_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; from socks6fast.cli import main; sys.exit(main())"
)


def _installed() -> None:
    """These tests are about the installed package: skip when the checkout itself is imported."""
    if PACKAGE == REPO / "socks6fast":
        # CI installs the package (scripts/test.sh: pip install '.[test]'), so it must not skip there.
        assert not os.environ.get("CI"), f"socks6fast is imported from the checkout ({PACKAGE})"
        pytest.skip(f"socks6fast is imported from the checkout ({PACKAGE}), not installed")


def _socks6fast(
    tmp_path: Path, *args: str, python: tuple[str, ...] = (), timeout: float = 80
) -> tuple[int, str]:
    """Run the installed ``socks6fast`` console script (or ``python -P`` with ``python``'s
    arguments) with ``args`` in ``tmp_path/run``; return its exit status and its output.

    TMPDIR points into ``tmp_path`` too, so the run's scratch directory is cleaned with it.
    """
    _installed()
    script = Path(sys.executable).parent / "socks6fast"
    assert script.exists(), f"no console script at {script}: install the package (pip install .)"
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    run.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(tmp)
    argv = [sys.executable, "-P", *python, *args] if python else [str(script), *args]
    before = _processes_in(tmp_path)
    res = subprocess.run(argv, cwd=run, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = res.stdout + res.stderr
    # Every process the run started has been stopped (they all inherited its working directory).
    deadline = time.monotonic() + 5
    while _processes_in(tmp_path) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_in(tmp_path) - before
    assert not left, f"processes left running: {sorted(left)}\n{out}"
    return res.returncode, out


def _processes_in(directory: Path) -> set[int]:
    """Live processes whose working directory is ``directory`` or below it."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and cwd.is_relative_to(directory):
            found.add(int(entry))
    return found


def _one_sentence(text: str) -> bool:
    """One line holding one sentence: ends with a full stop, none inside, no traceback."""
    return (
        "\n" not in text
        and text.endswith(".")
        and not re.search(r"[.!?]\s", text)
        and "Traceback" not in text
    )


@pytest.mark.timeout(120)
def test_bench_smoke_runs_installed_outside_the_checkout(tmp_path: Path) -> None:
    """`socks6fast bench --smoke` from an installed package, in a directory outside the checkout:
    every test of the suite gives figures for direct and both socks6fast paths, the JSON and the
    chart land in the current directory, and every process it started is stopped."""
    status, log = _socks6fast(tmp_path, "bench", "--smoke", "--systems", "direct,s5,s6")
    assert status == 0, log
    res = json.loads((tmp_path / "run" / "socks6fast-bench.json").read_text())
    assert res["measured_systems"] == ["direct", "socks6fast-s5", "socks6fast-s6"], log
    # The run says which data plane it measured (issue #4: "say at startup which path is used").
    assert res["systems"]["socks6fast-s6"]["relay"].startswith(RELAY), log
    assert f"relay path: {RELAY}" in log, log
    assert ("WARNING: socks6fast relays with its asyncio fallback" in log) == NO_EXT, log
    # The proxy measured is the installed one, not a checkout's.
    assert res["systems"]["socks6fast-s6"]["version"] == f"socks6fast from {PACKAGE.parent}", log
    for system in res["measured_systems"]:
        assert res["bulk"]["1"][system]["gbps"] > 0, log
        conn = res["connections"][system]
        assert conn["conn_per_s"] > 0 and conn["failed"] == 0, log
        assert res["latency"][system]["p99_ms"] > 0, log
    for system in ("socks6fast-s5", "socks6fast-s6"):
        assert res["bulk"]["1"][system]["proxy_cpu_s_per_gib"] is not None, log
        assert res["connections"][system]["proxy_us_per_conn"] is not None, log
        assert res["idle"][system]["kib_rss"] is not None, log
    ttfb = res["ttfb"]
    assert ttfb["direct"]["direct"]["ms"] > 0, log
    for mode in ("socks5", "socks5-userpass"):
        assert ttfb[mode]["socks6fast-s5"]["ms"] > 0, log
    for mode in ("socks6", "socks6-userpass", "socks6-session", *_ttfb.GATEWAY_MODES):
        assert ttfb[mode]["socks6fast-s6"]["ms"] > 0, log
    _check_tfo_rows(res, log)
    # Every target has a measured value in this configuration except those against Dante.
    missing = [t["target"] for t in res["targets"] if t["value"] is None and "Dante" not in t["target"]]
    assert not missing, log
    # The [bench] extra is part of the test extra, so the chart is drawn.
    assert _chart.unavailable() is None, "matplotlib is missing: pip install '.[test]'"
    width, height = _png_size(tmp_path / "run" / "socks6fast-bench.png")
    assert width == 1100 and height > 1000, log  # 11 inches at 100 dpi; 8 panels one under another
    assert "[bench] wrote socks6fast-bench.json and socks6fast-bench.png" in log, log


def _check_tfo_rows(res: dict[str, Any], log: str) -> None:
    """TRN-01/TRN-02/IDM-03: the TFO rows carried their bytes in the SYN, the proxy accepted every
    SYN's data, each request reached the target once and every token was accepted."""
    t = _ttfb
    tfo = res["ttfb_tfo"]
    if not tfo["enabled"]:
        # CI runs as root with net.ipv4.tcp_fastopen=3: there the rows must run.
        assert not os.environ.get("CI"), log
        assert "skipped" in tfo["note"], log
        return
    syn_lengths = {
        # The Request alone: 8 fixed bytes and the IPv4 address.
        "socks6-tfo": len(t.socks6_connect_request(1)),
        # Request, Session ID (16 bytes), Idempotence Expenditure and the payload.
        "socks6-tfo-token": len(t.socks6_connect_request(1, bytes(20 + 8))) + len(t.PAYLOAD),
        "socks6-tfo-token-userpass": len(t.socks6_connect_request(1, bytes(20 + 8))) + len(t.PAYLOAD),
    }
    for mode, syn_length in syn_lengths.items():
        row = res["ttfb"][mode]["socks6fast-s6"]
        check = row["tfo"]
        assert row["ms"] > 0 and check["verified"], log
        assert check["timed_in_syn"] == check["timed_samples"] == len(row["samples_ms"]), log
        # The shim read each SYN's length back from the kernel: exactly what the client put in it.
        assert check["syn_bytes"] == check["syn_data"] * syn_length and check["syn_data"] >= 1, log
        assert check["proxy_syn_data"] == check["proxy_tfo"] == check["syn_data"], log
        setup = 1 if "token" in mode else 0
        assert check["target_connections"] == check["requests"] + setup, log
        if setup:
            assert check["tokens_accepted"] == check["requests"], log
    best = [x for x in res["targets"] if x["target"].startswith("TTFB best SOCKS6")]
    assert len(best) == 2 and all(x["value"] is not None for x in best), log


@pytest.mark.skipif(NO_EXT, reason="bench harness: run in the compiled run only (CI time)")
@pytest.mark.timeout(90)
def test_bench_ceiling_runs(tmp_path: Path) -> None:
    """`socks6fast bench ceiling` (the engine beside loadgen's minimal splice relay; the README's
    single-stream claim) runs a round from the installed package: with extensions the proxy relays
    with the splice engine and says so, and the floor relay (``loadgen splicerelay``) moves bytes."""
    status, out = _socks6fast(tmp_path, "bench", "ceiling", "--rounds", "1", "--seconds", "0.5")
    assert status == 0, out
    assert f"socks6fast relay path: {RELAY}" in out, out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")
    }
    for name in ("direct", "splice-floor", "socks6fast-s6"):
        assert float(rows[name][0]) > 0, out
    for name in ("splice-floor", "socks6fast-s6"):
        assert float(rows[name][2]) > 0, out  # relay CPU s/GiB
    assert "socks6fast-s6 / splice-floor:" in out, out


def test_bench_usage_errors_are_one_sentence(tmp_path: Path) -> None:
    """Mistakes on the bench command line: exit 2 and one sentence, no traceback."""
    status, out = _socks6fast(tmp_path, "bench", "ceiling", "--rounds", "0")
    assert status == 2 and out.splitlines()[-1].endswith("--rounds takes 1-100 and --seconds 0.5-60"), out
    status, out = _socks6fast(tmp_path, "bench", "chart", "missing.json")
    assert (status, out) == (2, "socks6fast bench: error: missing.json: No such file or directory\n")
    (tmp_path / "run" / "other.json").write_text('{"a": 1}')
    status, out = _socks6fast(tmp_path, "bench", "chart", "other.json")
    assert (status, out) == (2, "socks6fast bench: error: other.json: not the results of socks6fast bench\n")


def _results() -> dict[str, Any]:
    """A run's results, as the JSON holds them, with one figure of each panel (not measured)."""
    systems = ["direct", "socks6fast-s5", "socks6fast-s6", "dante"]
    return {
        "meta": {"date": "2026-01-02 03:04 UTC", "machine": {"summary": "2 cores, a test"}},
        "options": {"delay_ms": 20.0},
        "measured_systems": systems,
        "systems": {s: {"available": True, "reason": ""} for s in systems},
        "bulk": {
            "1": {
                s: {"gbps": 10.0 + i, "proxy_cpu_s_per_gib": 0.1 * i or None} for i, s in enumerate(systems)
            },
            "8": {s: {"gbps": 20.0 + i} for i, s in enumerate(systems)},
        },
        "connections": {
            s: {"conn_per_s": 1000.0 * (i + 1), "proxy_us_per_conn": 150.0} for i, s in enumerate(systems)
        },
        "latency": {s: {"p99_ms": 0.5} for s in systems},
        "idle": {"socks6fast-s5": {"kib_rss": 4.5}, "socks6fast-s6": {"kib_rss": 1.3}},
        "ttfb": {
            "socks5": {"socks6fast-s5": {"ms": 160.0}, "dante": {"ms": 161.0}},
            "socks6": {"socks6fast-s6": {"ms": 80.0}},
        },
    }


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack_from("!II", data, 16)
    return width, height


def test_chart_panels() -> None:
    """Each figure gets its panel, targets where the issue sets one, and a bar per measured system."""
    panels = {p.title: p for p in _chart.panels(_results())}
    assert list(panels) == [
        "Bulk, 1 stream",
        "Bulk, 8 streams",
        "Proxy CPU per GiB relayed, 1 stream",
        "Proxy CPU per connection",
        "Connection rate",
        "Latency p99, one at a time",
        "Resident memory per idle connection",
        "Time to first byte, 20 ms one way",
    ]
    assert [(b.label, b.value) for b in panels["Bulk, 8 streams"].bars] == [
        ("direct", 20.0),
        ("socks6fast-s5", 21.0),
        ("socks6fast-s6", 22.0),
        ("dante", 23.0),
    ]
    cpu = panels["Proxy CPU per GiB relayed, 1 stream"]
    assert cpu.target == 0.25 and [b.label for b in cpu.bars] == ["socks6fast-s5", "socks6fast-s6", "dante"]
    idle = panels["Resident memory per idle connection"]
    assert idle.target == 12 and [(b.label, b.value, b.note) for b in idle.bars][-1] == ("dante", None, "n/a")
    assert [b.label for b in panels["Time to first byte, 20 ms one way"].bars] == [
        "socks6fast-s5: SOCKS5 no-auth",
        "dante: SOCKS5 no-auth",
        "socks6fast-s6: SOCKS6 no-auth",
    ]


def test_bench_chart_draws_a_saved_run(tmp_path: Path) -> None:
    """`socks6fast bench chart FILE.json` draws the chart of a saved run with matplotlib."""
    assert _chart.unavailable() is None, "matplotlib is missing: pip install '.[test]'"
    run = tmp_path / "run"
    run.mkdir()
    (run / "saved.json").write_text(json.dumps(_results()))
    status, out = _socks6fast(tmp_path, "bench", "chart", "saved.json", "--png", "c.png")
    assert (status, out) == (0, "wrote c.png\n")
    width, height = _png_size(run / "c.png")
    assert width == 1100 and height > 1000


@pytest.mark.timeout(90)
def test_without_matplotlib_one_sentence(tmp_path: Path) -> None:
    """Without the [bench] extra: `bench chart` and `bench --png` fail with one sentence and exit 2
    (no traceback); a plain run says so in one sentence and still writes its table and JSON."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "saved.json").write_text(json.dumps(_results()))
    status, out = _socks6fast(tmp_path, "bench", "chart", "saved.json", python=("-c", WITHOUT_MATPLOTLIB))
    assert status == 2, out
    message = out.removesuffix("\n").removeprefix("socks6fast bench: error: ")
    assert message == _chart.NO_MATPLOTLIB and _one_sentence(message), out
    assert "pip install matplotlib" in message and "[bench] extra" in message
    assert not (run / "saved.png").exists()

    status, out = _socks6fast(tmp_path, "bench", "--png", "x.png", python=("-c", WITHOUT_MATPLOTLIB))
    assert (
        status == 2 and out.splitlines()[-1] == f"socks6fast bench: error: --png: {_chart.NO_MATPLOTLIB}"
    ), out

    status, out = _socks6fast(
        tmp_path,
        "bench",
        "--smoke",
        "--systems",
        "direct",
        "--tests",
        "conn",
        python=("-c", WITHOUT_MATPLOTLIB),
    )
    assert status == 0, out
    assert f"[setup] {_chart.NO_MATPLOTLIB}" in out.splitlines(), out
    assert f"[bench] {_chart.NO_MATPLOTLIB}" in out.splitlines(), out
    assert "[bench] wrote socks6fast-bench.json in" in out, out
    assert json.loads((run / "socks6fast-bench.json").read_text())["connections"]["direct"]["conn_per_s"] > 0
    assert not (run / "socks6fast-bench.png").exists()


def test_installed_package_ships_every_file() -> None:
    """`pip install .` installs every module of the source tree, py.typed, the .pyi stubs and the
    bench's loadgen.c (the package list is found, not hand-kept: a new subpackage cannot be left
    out), and no module the source tree no longer has."""
    _installed()
    files = importlib.metadata.files("socks6fast")
    assert files is not None
    shipped = {f.as_posix() for f in files}
    source = REPO / "socks6fast"
    wanted = {
        f"socks6fast/{p.relative_to(source).as_posix()}"
        for pattern in ("*.py", "*.pyi", "py.typed", "loadgen.c")
        for p in source.rglob(pattern)
    }
    assert "socks6fast/bench/loadgen.c" in wanted and "socks6fast/py.typed" in wanted
    assert not wanted - shipped, f"not installed: {sorted(wanted - shipped)}"
    # Nor anything that is no longer in the source tree (pip reuses an in-tree build/ directory,
    # whose stale copies of moved modules would be installed beside the new ones).
    stale = {f for f in shipped if f.startswith("socks6fast/") and f.endswith((".py", ".pyi"))} - wanted
    assert not stale, f"installed but not in the source tree (rm -rf build, then reinstall): {sorted(stale)}"
    assert (PACKAGE / "bench" / "loadgen.c").read_bytes() == (source / "bench" / "loadgen.c").read_bytes()


def test_bench_socks6_bytes_match_the_codec() -> None:
    """The suite's hand-built SOCKS 6 requests are what socks6fast's reference codec encodes."""
    t = _ttfb
    # Authentication Data (method 2): the RFC 1929 request, then zero padding to a 4-byte multiple.
    auth = AuthData(2, t._pad4(bytes([2]) + t.rfc1929_request("bench", "pw"))[1:])
    cases = [
        (t.socks6_connect_request(4242), ()),
        (
            t.socks6_connect_request(4242, t.socks6_userpass_options("bench", "pw", 64)),
            (AuthMethodAdvertisement(64, (2,)), auth),
        ),
        (
            t.socks6_connect_request(4242, t.socks6_option(t.OPT_SESSION_REQUEST, b"")),
            (SessionRequest(),),
        ),
        (
            t.socks6_connect_request(4242, t.socks6_option(t.OPT_SESSION_ID, b"abcdefgh")),
            (SessionID(b"abcdefgh"),),
        ),
        (
            t.socks6_connect_request(
                4242,
                t.socks6_option(t.OPT_SESSION_REQUEST, b"")
                + t.socks6_token_request(1024)
                + t.socks6_userpass_options("bench", "pw", 64),
            ),
            (SessionRequest(), IdempotenceRequest(1024), AuthMethodAdvertisement(64, (2,)), auth),
        ),
        (
            t.socks6_connect_request(
                4242, t.socks6_option(t.OPT_SESSION_ID, b"abcdefgh") + t.socks6_token_expenditure(2**32 - 1)
            ),
            (SessionID(b"abcdefgh"), IdempotenceExpenditure(2**32 - 1)),
        ),
    ]
    for wire, options in cases:
        request = Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 4242, options)
        assert _codec_py.encode_request(request) == wire
        assert _codec_py.decode_request(wire) == (request, len(wire))
