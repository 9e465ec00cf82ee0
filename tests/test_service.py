"""Running socks6fast as a service (issue 14 item 5): the systemd unit in examples/, the
start-up checks of the open-file limit and of TCP Fast Open, and the Dockerfile's default.

* ``examples/socks6fast.service`` passes ``systemd-analyze verify`` (skipped, with the reason,
  where systemd-analyze is not installed) and has the directives the issue names.
* ``serve`` under a low descriptor limit (``prlimit``) raises its soft limit to the hard one
  and warns once, in one sentence, that max_connections cannot fit.
* A start-up notice when ``net.ipv4.tcp_fastopen`` lacks the server bit, read from a file the
  test writes (the host's sysctl is never changed).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_server import make_config, running_server
from test_cli import COMMAND, ENV, ROOT

from socks6fast.asyncio.server import lifecycle
from socks6fast.net.tfo import server_tfo_notice

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "examples" / "socks6fast.service"


def _unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of every line of the unit (keys may repeat, as systemd allows)."""
    entries = []
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    return entries


def test_unit_has_what_an_operator_expects() -> None:
    """Issue 14 item 5: dedicated (dynamic) user, CAP_NET_BIND_SERVICE, LimitNOFILE,
    Restart=on-failure, reload with SIGHUP; and none of the hardening that would break the
    relay: AF_INET/AF_INET6 allowed, setrlimit not filtered out."""
    entries = _unit_entries()
    service = {key: value for section, key, value in entries if section == "Service"}
    assert service["DynamicUser"] == "yes" or "User" in service
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert int(service["LimitNOFILE"]) >= 4 * 10000 + 1024  # the default max_connections fits
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert " serve --config " in service["ExecStart"]
    families = service["RestrictAddressFamilies"].split()
    assert "AF_INET" in families and "AF_INET6" in families
    filters = [value for section, key, value in entries if key == "SystemCallFilter"]
    assert not any(
        "@resources" in value or "@network-io" in value for value in filters if value.startswith("~")
    )
    assert "MemoryDenyWriteExecute" not in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` reports nothing (exit 0 and no warning: an unknown key or a
    misspelt value is only a warning to it). ExecStart points at this venv's socks6fast,
    since verify checks that the program exists."""
    program = Path(sys.executable).parent / "socks6fast"
    if not program.exists():
        pytest.skip(f"{program} is not installed (the socks6fast script of this venv)")
    text = UNIT.read_text().replace("/opt/socks6fast/bin/socks6fast", str(program))
    unit = tmp_path / "socks6fast.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "socks6fast.service" in line]
    assert ours == [], done.stderr


# --- the open-file limit ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/limits")
def test_low_descriptor_limit_is_raised_and_max_connections_warned(tmp_path: Path) -> None:
    """Issue 14 item 5: under ``ulimit -n 256`` (hard 512) serve raises the soft limit to 512 and
    says once, in one sentence, that max_connections (10000 by default) cannot fit: how many
    descriptors a connection takes and what to raise."""
    log = tmp_path / "serve.log"
    command = ["prlimit", "--nofile=256:512", "--", *COMMAND, "serve", "--listen", "127.0.0.1:0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while "relay path" not in log.read_text() or "descriptors:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert re.search(r"Max open files\s+512\s+512", limits), limits
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "max_connections lowered" in line]
    assert len(warnings) == 1, text
    found = re.search(
        r"WARNING .*max_connections lowered from 10000 to (\d+): the descriptor limit is 512 "
        r"\(hard limit 512\); each relayed connection needs (\d) \(2 sockets(, 2 for a splice pipe)?\)"
        r" and (\d+) are kept .*; raise the hard limit \(ulimit -Hn, systemd LimitNOFILE=\) "
        r"to at least (\d+)",
        warnings[0],
    )
    assert found, warnings[0]
    lowered, per_connection, reserved, needed = (int(found.group(i)) for i in (1, 2, 4, 5))
    assert per_connection in (2, 4) and lowered * per_connection + reserved <= 512
    assert needed == 10000 * per_connection + reserved
    assert warnings[0].count(". ") == 0  # one sentence
    assert f"max_connections {lowered}" in text


# --- TCP Fast Open ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "noticed"), [("0", True), ("1", True), ("2", False), ("3", False), ("0x403", False)]
)
def test_tfo_notice_reads_the_server_bit(tmp_path: Path, value: str, noticed: bool) -> None:
    """The notice is given exactly when bit 2 (server) of net.ipv4.tcp_fastopen is unset."""
    sysctl = tmp_path / "tcp_fastopen"
    sysctl.write_text(f"{value}\n")
    notice = server_tfo_notice(str(sysctl))
    assert (notice is not None) == noticed, notice
    if notice is not None:
        assert f"net.ipv4.tcp_fastopen = {int(value, 0)}" in notice
        assert f"sysctl -w net.ipv4.tcp_fastopen={int(value, 0) | 3}" in notice
    assert server_tfo_notice(str(tmp_path / "missing")) is None
    sysctl.write_text("garbage\n")
    assert server_tfo_notice(str(sysctl)) is None


@pytest.mark.parametrize(("value", "noticed"), [("1", True), ("3", False)])
async def test_serve_gives_the_tfo_notice_at_start_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str,
    noticed: bool,
) -> None:
    """Issue 14 item 5: a proxy whose kernel does not accept data in the SYN says so,
    once, at start-up (the sysctl is read from a file of the test)."""
    sysctl = tmp_path / "tcp_fastopen"
    sysctl.write_text(f"{value}\n")
    monkeypatch.setattr(lifecycle, "TFO_SYSCTL_PATH", str(sysctl))
    with caplog.at_level(logging.INFO, logger="socks6fast.server"):
        async with running_server(make_config()):
            pass
    notices = [r.getMessage() for r in caplog.records if "TCP Fast Open is off" in r.getMessage()]
    assert len(notices) == (1 if noticed else 0), notices
