"""The fuzz targets (fuzz/, README "Fuzzing") run in CI: each one briefly over its corpus.

Every target replays its committed seed corpus (fuzz/corpus/TARGET, written from this
suite's vectors by ``python -m fuzz seeds``) and runs a fixed number of mutations with a
fixed seed, through the one command a developer uses, which runs it inside a network
namespace of its own (``unshare -n``, lo up): the target's process checks that it sees no
interface but ``lo`` and says so. Then the checks of the targets themselves: a target that
is handed a decoder which crashes, answers inconsistently, or disagrees with its twin must
report it (a harness that cannot fail finds nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("atheris", reason="atheris is in the test extra (Linux)")

ROOT = Path(__file__).resolve().parent.parent
NO_EXTENSIONS = bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS"))
TARGETS = ["codec_py", "socks5", "server", "client", "codec_c", "codec_diff"]
NEEDS_C = {"codec_c", "codec_diff"}
SUMMARY = re.compile(r"fuzz: target=(\w+) execs=(\d+) cov=(\d+) ft=(\d+) .* crashes=(\d+) exit=(-?\d+)")


def _fuzz(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "fuzz", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _params() -> list[Any]:
    out = []
    for name in TARGETS:
        marks = []
        if name in NEEDS_C:
            marks = [
                pytest.mark.c_extension,
                pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run"),
            ]
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", _params())
def test_target_runs_clean_on_its_corpus(target: str, tmp_path: Path) -> None:
    """Corpus replay + 1000 seeded mutations: no crash, coverage reported, inside its own netns."""
    corpus = ROOT / "fuzz" / "corpus" / target
    seeds = len(list(corpus.iterdir()))
    assert seeds > 10, f"{corpus} lost its seeds: run python -m fuzz seeds"
    result = _fuzz("run", target, "--runs", "1000", "--seed", "1", "--nice", "0", "--workdir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"fuzz: {target}: network interfaces: lo\n" in output, output[-4000:]
    summary = SUMMARY.search(output)
    assert summary is not None, output[-4000:]
    execs, cov, crashes = int(summary.group(2)), int(summary.group(3)), int(summary.group(5))
    assert execs >= 1000
    assert crashes == 0
    # The corpus really ran: coverage well past what an empty input reaches (codec_c without
    # the native build sees only its Python side).
    assert cov >= (1 if target == "codec_c" else 50)
    assert not list(tmp_path.glob("crash-*"))


def test_a_failure_fails_the_command_and_keeps_the_input(tmp_path: Path) -> None:
    """libFuzzer's verdict reaches the caller: non-zero exit, counted, reproducer kept.

    The failure is forced with a memory limit below what Python needs (flags after ``--``
    go to libFuzzer), since the targets themselves find nothing to crash on.
    """
    result = _fuzz(
        "run",
        "codec_py",
        "--seconds",
        "20",
        "--nice",
        "0",
        "--workdir",
        str(tmp_path),
        "--",
        "-rss_limit_mb=1",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    summary = SUMMARY.search(output)
    assert summary is not None and summary.group(5) == "1", output[-4000:]
    assert len(list(tmp_path.glob("oom-*"))) == 1


def test_unknown_target_is_one_sentence() -> None:
    result = _fuzz("run", "nope", "--seconds", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fuzz: unknown target 'nope'; the targets are: codec_py, codec_c, socks5, codec_diff, server, client"
    ]


# --- The checks of the targets, handed broken codecs ---------------------------------


@pytest.fixture
def harness() -> Any:
    """The fuzz package, imported from the repository (it is not installed)."""
    sys.path.insert(0, str(ROOT))
    try:
        from fuzz import sut  # noqa: PLC0415
        from fuzz.targets import _codec6, _common, codec_diff  # noqa: PLC0415

        return SimpleNamespace(sut=sut, codec6=_codec6, common=_common, diff=codec_diff)
    finally:
        # fuzz.sut drops the repository from sys.path itself (socks6fast is the installed one).
        if str(ROOT) in sys.path:
            sys.path.remove(str(ROOT))


REQUEST = bytes.fromhex("06 01 0000 0050 00 01 7f000001")


def _fake(codec: Any, **overrides: Any) -> SimpleNamespace:
    names = {name: getattr(codec, name) for name in dir(codec) if not name.startswith("_")}
    return SimpleNamespace(**{**names, **overrides})


def test_harness_reports_an_untyped_error(harness: Any) -> None:
    _codec_py = harness.sut.codec_py

    def broken(*args: Any) -> Any:
        raise IndexError("index out of range")

    with pytest.raises(IndexError):
        harness.codec6.check(_fake(_codec_py, decode_request=broken), b"\x00" + REQUEST)


def test_harness_reports_need_more_for_zero_bytes(harness: Any) -> None:
    _codec_py = harness.sut.codec_py
    with pytest.raises(harness.common.Finding, match="needed=0"):
        harness.codec6.check(_fake(_codec_py, decode_request=lambda *a: (None, 0)), b"\x00" + REQUEST)


def test_harness_reports_a_prefix_that_asks_too_much(harness: Any) -> None:
    """The harness's prefix check (tests/codec_api.py: ``needed`` never overshoots) catches a
    decoder that asks for more bytes than the whole message has. It tests the fuzz target,
    not the codec: the codec's own rule is proven in tests/test_codec.py."""
    _codec_py = harness.sut.codec_py
    real = _codec_py.decode_request

    def overshoots(data: Any, offset: int = 0, cap: int = 16384) -> Any:
        message, n = real(data, offset, cap)
        return (message, n) if message is not None else (None, n + 1)

    with pytest.raises(harness.common.Finding, match="past the message end"):
        harness.codec6.check(_fake(_codec_py, decode_request=overshoots), b"\x00" + REQUEST)


def test_harness_reports_a_broken_round_trip(harness: Any) -> None:
    _codec_py = harness.sut.codec_py

    def lossy(request: Any) -> bytes:
        return bytes(_codec_py.encode_request(request)).replace(b"\x00\x50", b"\x00\x51")

    with pytest.raises(harness.common.Finding, match="round trip"):
        harness.codec6.check(_fake(_codec_py, encode_request=lossy), b"\x00" + REQUEST)


@pytest.mark.c_extension
@pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_differential_reports_a_disagreement(harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    errors, _codec_c = harness.sut.errors, harness.sut.load_codec_c()

    harness.diff.test_one_input(b"\x00" + REQUEST[:5])  # the real twins agree

    def other_text(*args: Any) -> Any:
        raise errors.WireError("version 5 is not six", None)

    monkeypatch.setattr(harness.diff, "_c", _fake(_codec_c, decode_request=other_text))
    with pytest.raises(harness.common.Finding, match="py .* != c"):
        harness.diff.test_one_input(b"\x00\x05")


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    shutil.which("clang") is None, reason="the native build needs clang (.ci/run installs it)"
)
@pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_native_build_gives_libfuzzer_the_c_edges(tmp_path: Path) -> None:
    """build-native + --native: libFuzzer loads _codec_c's inline counters and sees far more edges."""
    args = (
        "run",
        "codec_c",
        "--native",
        "--runs",
        "300",
        "--seed",
        "1",
        "--nice",
        "0",
        "--workdir",
        str(tmp_path),
    )
    result = _fuzz(*args, timeout=280)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    summary = SUMMARY.search(output)
    assert summary is not None, output[-4000:]
    assert int(summary.group(3)) > 500, output[-2000:]  # the Python side alone gives about 1
