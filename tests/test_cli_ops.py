"""The operator's command line (issue 14 item 6), run as real subprocesses: ``--version``,
``--help`` of every command, passwords kept off the command line (``--user NAME`` with
``--password-file``, ``$SOCKS6FAST_PASSWORD`` or a prompt), the example config's sample hash,
and ``--listen localhost:PORT`` on every address the system resolver gives for the name.

Everything listens on loopback; the ``localhost`` test runs in network and mount namespaces
of its own, with its own /etc/hosts (the system resolver reads that file, never DNS).
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers_server import RawClient, Sink
from test_cli import COMMAND, ENV, ROOT, _at_a_terminal, connect_request, echo, open_relay, run, serve

import socks6fast
from socks6fast.constants import AuthReplyType
from socks6fast.proto.auth import verify_password

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: The environment variable README.md and --help name for the password of --user NAME.
PASSWORD_ENV = "SOCKS6FAST_PASSWORD"
#: The password test_cli.open_relay logs in with.
PASSWORD = "wonderland"


def _one_sentence_error(done: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("socks6fast: error: "), done.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"socks6fast {socks6fast.__version__}"


def test_help_of_every_command() -> None:
    """Every command's --help names its options with their defaults; serve's explains the
    signals, the config format and where passwords come from."""
    top = run("--help")
    assert top.returncode == 0
    for command in ("serve", "check-config", "hash-password", "bench", "--version"):
        assert command in top.stdout, top.stdout
    serve_help = run("serve", "--help").stdout
    for text in (
        "--config FILE",
        "--listen HOST:PORT",
        "--user NAME",
        "--password-file FILE",
        "--drain-timeout SECONDS",
        "(default 10)",
        "--log-level",
        "127.0.0.1:1080",
        "SIGTERM",
        "SIGHUP",
        "[users]",
        "[[rules]]",
        "[udp]",
        PASSWORD_ENV,
        "docs/tuning.md",
    ):
        assert text in serve_help, text
    assert "FILE" in run("check-config", "--help").stdout
    assert "scrypt" in run("hash-password", "--help").stdout
    bench = run("bench", "--help")
    assert bench.returncode == 0 and "--quick" in bench.stdout, bench


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def _check_login(proc_args: tuple[str, ...], env: dict[str, str] | None = None) -> list[str]:
    """serve with these arguments; alice logs in with PASSWORD, nobody without. Returns the
    lines serve printed; the password must not be on its command line."""
    async with Sink() as sink, serve("--listen", "127.0.0.1:0", *proc_args, env=env) as proc:
        proxy = await proc.address()
        if sys.platform.startswith("linux"):
            assert PASSWORD not in _cmdline(proc.process.pid)
        client = await open_relay(proxy, sink.address, user="alice")
        await echo(client)
        await client.close()
        stranger = await RawClient.connect(proxy)
        await stranger.send(connect_request(sink.address))
        assert (await stranger.auth_reply()).type == AuthReplyType.FAILURE
        await stranger.close()
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
        return list(proc.lines)


async def test_password_from_a_file(tmp_path: Path) -> None:
    """--user NAME --password-file FILE: the first line of FILE is the password; ps shows none."""
    secret = tmp_path / "password"
    secret.write_text(f"{PASSWORD}\nignored second line\n")
    lines = await _check_login(("--user", "alice", "--password-file", str(secret)))
    assert not any("warning" in line.lower() and "--user" in line for line in lines), lines


async def test_password_from_the_environment() -> None:
    """--user NAME with $SOCKS6FAST_PASSWORD (the environment is not what ps shows)."""
    await _check_login(("--user", "alice"), env={**ENV, PASSWORD_ENV: PASSWORD})


async def test_name_colon_password_still_works_with_a_warning() -> None:
    """--user NAME:PASSWORD keeps working, with one warning sentence before the log starts."""
    async with Sink() as sink, serve("--listen", "127.0.0.1:0", "--user", f"alice:{PASSWORD}") as proc:
        proxy = await proc.address()
        client = await open_relay(proxy, sink.address, user="alice")
        await echo(client)
        await client.close()
    warnings = [line for line in proc.lines if line.startswith("socks6fast: warning:")]
    assert warnings == [
        "socks6fast: warning: --user NAME:PASSWORD shows the password to every user of this host (ps); "
        f"use --user NAME with --password-file FILE, ${PASSWORD_ENV} or the prompt"
    ], proc.lines


def test_password_at_a_prompt() -> None:
    """--user NAME at a terminal asks for the password (twice); a mismatch is one sentence."""
    code, out = _at_a_terminal(
        "serve", "--listen", "127.0.0.1:0", "--user", "alice", "--drain-timeout", "nan", keys=[b"x\n", b"x\n"]
    )
    # --drain-timeout is checked first: nothing is asked when the command cannot run.
    assert code == 2 and "Password" not in out, out
    code, out = _at_a_terminal(
        "serve", "--listen", "127.0.0.1:0", "--user", "alice", "--user", "bob", keys=[b"one\n", b"two\n"]
    )
    assert code == 2 and "Password for alice: " in out and "the passwords do not match" in out, out
    assert "Traceback" not in out


async def test_password_at_a_prompt_logs_in(tmp_path: Path) -> None:
    """The password typed at the prompt is the one the proxy then checks."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [*COMMAND, "serve", "--listen", "127.0.0.1:0", "--user", "alice"], ENV)
    out = b""
    typed = 0
    loop = asyncio.get_running_loop()
    listening = re.compile(rb"listening on 127\.0\.0\.1:(\d+) \(")
    try:
        async with asyncio.timeout(30):
            while not listening.search(out):
                chunk = await loop.run_in_executor(None, os.read, fd, 4096)
                assert chunk, out
                out += chunk
                if typed < 2 and out.rstrip(b" ").endswith(b":"):
                    os.write(fd, f"{PASSWORD}\n".encode())
                    typed += 1
        found = listening.search(out)
        assert found is not None
        async with Sink() as sink:
            client = await open_relay(("127.0.0.1", int(found.group(1))), sink.address, user="alice")
            await echo(client)
            await client.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        await loop.run_in_executor(None, os.waitpid, pid, 0)
        os.close(fd)
    assert PASSWORD.encode() not in out  # getpass does not echo it


@pytest.mark.parametrize(
    ("args", "env", "parts"),
    [
        (("--user", "alice"), {}, ("--user alice: no password", "--password-file FILE", PASSWORD_ENV)),
        (("--user", "alice", "--user", "bob", "--password-file", "{file}"), {}, ("one password",)),
        (("--user", "alice", "--user", "bob"), {PASSWORD_ENV: "x"}, (f"${PASSWORD_ENV} holds one password",)),
        (("--password-file", "{file}"), {}, ("no --user NAME is given",)),
        (("--user", "alice", "--password-file", "{empty}"), {}, ("the first line of", "is empty")),
        (("--user", "alice", "--password-file", "/nonexistent/pw"), {}, ("cannot read /nonexistent/pw",)),
        (("--user", "alice"), {PASSWORD_ENV: ""}, (f"${PASSWORD_ENV} is empty",)),
        (("--user", ""), {}, ("the user name is empty",)),
        (("--user", "alice", "--password-file", "{long}"), {}, ("must be 1-255 bytes",)),
    ],
)
def test_password_mistakes_are_one_sentence(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], parts: tuple[str, ...]
) -> None:
    """Without a terminal (stdin is a pipe) and with an unusable source: exit 2, one sentence."""
    files = {"file": tmp_path / "pw", "empty": tmp_path / "empty", "long": tmp_path / "long"}
    files["file"].write_text("secret\n")
    files["empty"].write_text("\nsecret\n")
    files["long"].write_text("x" * 256 + "\n")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    done = subprocess.run(
        [*COMMAND, "serve", "--listen", "127.0.0.1:0", *argv],
        input="",
        capture_output=True,
        text=True,
        env={**{k: v for k, v in ENV.items() if k != PASSWORD_ENV}, **env},
        cwd=ROOT,
        timeout=30,
    )
    _one_sentence_error(done, *parts)


def test_example_config_sample_hash_password_is_stated() -> None:
    """The example config's sample hash is the hash of the password its comment states."""
    text = (EXAMPLES / "socks6fast.toml").read_text()
    stated = re.search(r'hash of the password "([^"]+)"', text)
    sample = re.search(r'^# alice = "(scrypt\$[^"]+)"$', text, re.MULTILINE)
    assert stated and sample, "the sample hash or its password is missing"
    assert verify_password(sample.group(1), stated.group(1).encode())
    # Uncommented, the file is still valid (check-config) and alice is a user.
    uncommented = text.replace(sample.group(0), sample.group(0).removeprefix("# "))
    assert tomllib.loads(uncommented)["users"]["alice"] == sample.group(1)


NETNS_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"
#: Network and mount namespaces of their own: only loopback, and an /etc/hosts (bind-mounted
#: from $0) on which `localhost` has both loopback addresses, whatever the host's file says.
IN_NETNS_WITH_HOSTS = [
    "unshare",
    "-n",
    "-m",
    "sh",
    "-c",
    'ip link set lo up && mount --bind "$0" /etc/hosts && exec "$@"',
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs unshare -n -m")
def test_listen_localhost_binds_every_address_of_the_name(tmp_path: Path) -> None:
    """``--listen localhost:1080`` listens on every address the system resolver gives for
    localhost (here 127.0.0.1 and ::1), each a working SOCKS 5 listener."""
    if subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -n -m is not permitted here")
    hosts = tmp_path / "hosts"
    hosts.write_text(NETNS_HOSTS)
    probe = (
        "import socket, subprocess, sys, time\n"
        "proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
        "lines = []\n"
        "for line in proc.stderr:\n"
        "    lines.append(line)\n"
        "    if 'relay path' in line: break\n"
        "for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n"
        "    with socket.socket(family) as s:\n"
        "        s.settimeout(5)\n"
        "        s.connect((host, 1080))\n"
        "        s.sendall(b'\\x05\\x01\\x00')\n"
        "        lines.append(f'{host} answers {s.recv(2).hex()}\\n')\n"
        "proc.terminate()\n"
        "proc.wait(10)\n"
        "print(''.join(lines))\n"
    )
    done = subprocess.run(
        [
            *IN_NETNS_WITH_HOSTS,
            str(hosts),
            sys.executable,
            "-c",
            probe,
            *COMMAND,
            "serve",
            "--listen",
            "localhost:1080",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "listening on 127.0.0.1:1080 (SOCKS 6 and SOCKS 5)" in done.stdout, done.stdout
    assert "listening on [::1]:1080 (SOCKS 6 and SOCKS 5)" in done.stdout, done.stdout
    assert "127.0.0.1 answers 0500" in done.stdout and "::1 answers 0500" in done.stdout, done.stdout
