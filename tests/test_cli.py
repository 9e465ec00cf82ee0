"""The ``socks6fast`` command line, run as a real subprocess (``python -m socks6fast``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers_server import RawClient, Sink, cheap_hash

import socks6fast
from socks6fast.constants import MAX_RELAY_WORKERS, AddressType, AuthMethod, AuthReplyType, Command, ReplyCode
from socks6fast.dataplane.engine import ENGINE_AVAILABLE
from socks6fast.proto import codec
from socks6fast.proto.auth import verify_password
from socks6fast.proto.messages import AuthData, Option, Request
from socks6fast.proto.socks5 import UserPassRequest, encode_userpass_request

pytestmark = pytest.mark.timeout(60)

# The subprocess runs the very package these tests import (the installed one, with its
# compiled modules, under scripts/test.sh), not the source tree beside them; its working
# directory is that package's parent too, because ``python -m`` puts the cwd first on sys.path.
ROOT = Path(socks6fast.__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
COMMAND = [sys.executable, "-m", "socks6fast"]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], input=stdin, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30
    )


def test_check_config_ok(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1080", "[::1]:1080"]\n')
    done = run("check-config", str(config))
    assert done.returncode == 0
    assert "OK" in done.stdout and "2 plain" in done.stdout
    assert done.stderr == ""  # loopback only: no open-proxy warning


def test_check_config_counts_proxy_protocol_listeners(tmp_path: Path) -> None:
    """Issue 14 item 3 (D27): a listener table with the PROXY protocol passes check-config,
    which says how many listeners are behind a load balancer."""
    config = tmp_path / "pp.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:1080", { address = "127.0.0.1:1081", proxy_protocol = true, '
        'proxy_protocol_from = ["127.0.0.1"] }]\n'
    )
    done = run("check-config", str(config))
    assert done.returncode == 0, done
    assert "OK (2 plain and 0 TLS listeners, 1 behind a load balancer (PROXY protocol)," in done.stdout


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ('[server]\nlisten = ["0.0.0.0:1080"]\n', True),
        ('[server]\nlisten = ["127.0.0.1:1080", "[::]:1080"]\n', True),
        (f'[server]\nlisten = ["0.0.0.0:1080"]\n[users]\nalice = "{cheap_hash("x")}"\n', False),
        ('default_action = "deny"\n[server]\nlisten = ["0.0.0.0:1080"]\n', False),
        (
            '[server]\nlisten = ["0.0.0.0:1080"]\n[[rules]]\naction = "allow"\nclients = ["10.0.0.0/8"]\n'
            '[[rules]]\naction = "deny"\n',
            False,
        ),
    ],
)
def test_check_config_warns_about_an_open_proxy(tmp_path: Path, text: str, warned: bool) -> None:
    """Issue 12, defect 6: a listener off loopback with no users and no rule keeping
    strangers out is an open proxy; check-config says so on stderr (and exits 0: the file
    is valid). (check-config only binds port 0 to check the address; nothing listens.)"""
    config = tmp_path / "open.toml"
    config.write_text(text)
    done = run("check-config", str(config))
    assert done.returncode == 0, done
    if warned:
        assert done.stderr.startswith(f"socks6fast: warning: {config}: open proxy: listening on "), (
            done.stderr
        )
        assert "anyone who can reach it may relay through it" in done.stderr
    else:
        assert done.stderr == ""


@pytest.mark.parametrize(
    "text, key",
    [
        ('[server]\nlisten = ["127.0.0.1:99999"]\n', "server.listen[0]"),
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[server]\nlisen = []\n", "server.lisen"),
        ('[[rules]]\naction = "maybe"\n', "rules[0].action"),
        ('[users]\nbob = "plaintext"\n', "users.bob"),
        ("not toml [", "is not valid TOML"),
        (
            '[server]\nlisten = [{ address = "127.0.0.1:0", proxy_protocol = true, '
            'proxy_protocol_from = ["10.0.0.1/8"] }]\n',
            "server.listen[0].proxy_protocol_from[0]",
        ),
        (
            '[server]\nlisten = [{ address = "127.0.0.1:0", proxy_protocol_from = ["10.0.0.1"] }]\n',
            "server.listen[0].proxy_protocol_from: needs proxy_protocol = true",
        ),
    ],
)
def test_config_errors_are_one_sentence(tmp_path: Path, text: str, key: str) -> None:
    """Every mistake: one line naming the key, exit code 2, no traceback (check-config and serve)."""
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for args in (("check-config", str(config)), ("serve", "--config", str(config))):
        done = run(*args)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], done.stderr
        assert "Traceback" not in done.stderr and "plaintext" not in done.stderr


async def test_relay_workers_one_limit(tmp_path: Path) -> None:
    """Issue 16 defect 5: server.relay_workers has one limit, MAX_RELAY_WORKERS, which the
    relay engine enforces too. Above it, check-config and serve both refuse the file with
    one sentence (257-1024 passed check-config, then serve died with a ValueError from the
    engine); at it, check-config says OK and serve starts that many relay workers."""
    over = tmp_path / "over.toml"
    over.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nrelay_workers = {MAX_RELAY_WORKERS + 1}\n')
    for args in (("check-config", str(over)), ("serve", "--config", str(over))):
        done = run(*args)
        assert done.returncode == 2, done
        assert done.stderr.strip().splitlines() == [
            f"socks6fast: error: {over}: server.relay_workers: {MAX_RELAY_WORKERS + 1} "
            f"is not an integer 0-{MAX_RELAY_WORKERS}"
        ], done.stderr
    limit = tmp_path / "limit.toml"
    limit.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nrelay_workers = {MAX_RELAY_WORKERS}\n')
    assert run("check-config", str(limit)).returncode == 0
    async with serve("--config", str(limit)) as proc:
        await proc.address()
        line = (await proc.wait_for(r"relay path: .*")).group(0)
    expected = f"{MAX_RELAY_WORKERS} worker thread(s)" if ENGINE_AVAILABLE else "asyncio"
    assert expected in line, line


def test_check_config_catches_an_address_not_of_this_host(tmp_path: Path) -> None:
    """check-config binds port 0 on each listen address (only binds: 192.0.2.1 is TEST-NET,
    never assigned here), so a foreign address fails before serve, naming the key."""
    config = tmp_path / "foreign.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1080", "192.0.2.1:1080"]\n')
    done = run("check-config", str(config))
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        f"socks6fast: error: {config}: server.listen[1]: 192.0.2.1 cannot be listened on here "
        "(Cannot assign requested address)"
    ]


def test_unknown_option_shows_the_command_usage() -> None:
    """A mistake in a command's options gets that command's usage, not the top-level one."""
    done = run("serve", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: socks6fast serve"), done.stderr
    assert done.stderr.strip().endswith("socks6fast serve: error: unrecognized arguments: --bogus")


def test_bad_flags_exit_2() -> None:
    for args in (
        ("serve", "--listen", "nowhere"),
        ("serve", "--user", "bob"),
        ("serve", "--drain-timeout", "-1"),
        ("serve", "--drain-timeout", "nan"),
        ("check-config", "/nonexistent"),
    ):
        done = run(*args)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_listen_failure_names_the_address() -> None:
    """A port already taken: one sentence naming the address that failed, exit code 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.strip().splitlines() if "error" in line]
    expected = f"socks6fast: error: cannot listen: 127.0.0.1:{port}: Address already in use"
    assert lines == [expected], done.stderr
    assert "Traceback" not in done.stderr


def test_hash_password_from_stdin() -> None:
    done = run("hash-password", stdin="s3cret pass\n")
    assert done.returncode == 0
    stored = done.stdout.strip()
    assert stored.startswith("scrypt$") and verify_password(stored, b"s3cret pass")
    assert not verify_password(stored, b"s3cret pass\n")
    assert run("hash-password", stdin="\n").returncode == 2


def _at_a_terminal(*args: str, keys: list[bytes], timeout: float = 20.0) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its controlling tty (getpass reads /dev/tty);
    each time it prints a prompt ending in ": ", type the next of ``keys``. Returns
    (exit status, everything it printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the CLI
        os.chdir(ROOT)
        os.execve(sys.executable, [*COMMAND, *args], ENV)
    out = b""
    pending = list(keys)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if pending and out.rstrip(b" ").endswith(b":"):
                os.write(fd, pending.pop(0))
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_hash_password_at_a_terminal() -> None:
    """At a terminal: prompt twice; a mismatch, or Ctrl-D at the prompt, is one sentence
    and exit code 2 (Ctrl-D raised EOFError with a traceback before)."""
    code, out = _at_a_terminal("hash-password", keys=[b"s3cret\n", b"s3cret\n"])
    assert code == 0 and "scrypt$" in out, out
    code, out = _at_a_terminal("hash-password", keys=[b"s3cret\n", b"other\n"])
    assert code == 2 and "the passwords do not match" in out, out
    code, out = _at_a_terminal("hash-password", keys=[b"\x04"])
    assert code == 2 and "no password given" in out and "Traceback" not in out, out


class ServeProcess:
    """A ``socks6fast serve`` subprocess whose stderr is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._new.set()

    async def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                self._new.clear()
                await self._new.wait()

    async def address(self) -> tuple[str, int]:
        match = await self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        return "127.0.0.1", int(match.group(1))


#: Runs the command after it in a network namespace of its own with only loopback up: a
#: listener on 0.0.0.0 there is reachable from nowhere.
IN_NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@contextlib.asynccontextmanager
async def serve(
    *args: str, netns: bool = False, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    prefix = IN_NETNS if netns else []
    process = await asyncio.create_subprocess_exec(
        *prefix, *COMMAND, "serve", *args, env=env or ENV, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    proc = ServeProcess(process)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        proc._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await proc._reader


def connect_request(dest: tuple[str, int], user: str | None = None) -> bytes:
    options: tuple[Option, ...] = ()
    if user is not None:
        data = encode_userpass_request(UserPassRequest(user.encode(), b"wonderland"))
        options = (AuthData(AuthMethod.USERNAME_PASSWORD, data),)
    return codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, dest[0], dest[1], options))


async def open_relay(proxy: tuple[str, int], dest: tuple[str, int], user: str | None = None) -> RawClient:
    client = await RawClient.connect(proxy)
    await client.send(connect_request(dest, user))
    assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
    assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
    return client


async def echo(client: RawClient, data: bytes = b"ping") -> None:
    await client.send(data)
    assert await client.read_exactly(len(data)) == data


async def test_serve_reload_and_drain(tmp_path: Path) -> None:
    """serve: one log line per finished connection; SIGHUP reloads users and rules without
    dropping established connections; SIGTERM stops accepting, drains, exits 0."""
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    async with Sink() as sink, serve("--config", str(config), "--drain-timeout", "5") as proc:
        proxy = await proc.address()
        # The startup log says which data plane relays (issue 4: "say at startup").
        startup = (await proc.wait_for(r"relay path: (.*)")).group(1)
        assert startup.startswith("splice engine" if ENGINE_AVAILABLE else "asyncio ("), startup
        first = await open_relay(proxy, sink.address)
        await echo(first)
        short = await open_relay(proxy, sink.address)
        await echo(short, b"12345")
        await short.close()
        line = (await proc.wait_for(rf"client=127\.0\.0\.1:{short.local[1]} ")).string
        for field in (
            "proto=socks6",
            "user=-",
            "cmd=CONNECT",
            f"dst=127.0.0.1:{sink.address[1]}",
            "reply=0x00",
        ):
            assert field in line
        relay = "splice" if ENGINE_AVAILABLE else "asyncio"
        assert re.search(rf"up=5 down=5 dur=\d+\.\d+s relay={relay} ", line), line

        # SIGHUP: authentication on from now on; the established connection stays.
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:0"]\n[users]\nalice = "{cheap_hash("wonderland")}"\n'
        )
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_for("configuration reloaded: 1 users")
        await echo(first, b"still here")
        refused = await RawClient.connect(proxy)
        await refused.send(connect_request(sink.address))
        assert (await refused.auth_reply()).type == AuthReplyType.FAILURE
        await refused.close()
        second = await open_relay(proxy, sink.address, user="alice")
        await echo(second)
        await second.close()
        # A broken file on SIGHUP: reported, and the running configuration stays.
        config.write_text("[server]\nmax_connections = -1\n")
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_for("not reloaded.*server.max_connections")
        await echo(first, b"still")

        # SIGTERM: no new connections, the open one drains, then exit 0.
        proc.process.send_signal(signal.SIGTERM)
        await proc.wait_for("stopping")
        with pytest.raises(OSError):
            await asyncio.open_connection(*proxy)
        await echo(first, b"draining")
        await first.close()
        assert await asyncio.wait_for(proc.process.wait(), 5) == 0


async def test_serve_drain_is_bounded() -> None:
    """SIGTERM with a connection that never ends: exit 0 once the drain timeout has passed.

    The connection still running at the deadline is cut with a reset, not a clean FIN (a
    client whose protocol ends at close would take the cut-off transfer for a complete
    one; issue 12 defect 4), and its log line says so: ``end=shutdown close=rst``."""
    async with Sink() as sink, serve("--listen", "127.0.0.1:0", "--drain-timeout", "0.5") as proc:
        proxy = await proc.address()
        client = await open_relay(proxy, sink.address)
        await echo(client, b"x" * 1000)
        loop = asyncio.get_running_loop()
        start = loop.time()
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
        assert loop.time() - start < 5
        with pytest.raises(ConnectionResetError):
            await client.read_until_eof()  # cut by the proxy: a reset, never a clean EOF
        await client.close()
        # The connection cut at the deadline still gets its exact line (issue 4: the engine
        # reports bytes per direction when a pair ends, shutdown included).
        path = "splice" if ENGINE_AVAILABLE else "asyncio"
        line = (await proc.wait_for(r"cmd=CONNECT .*")).group(0)
        assert "reply=0x00 up=1000 down=1000" in line, line
        assert f"relay={path} end=shutdown close=rst" in line, line


async def test_serve_opens_the_udp_port(tmp_path: Path) -> None:
    """D16: serve opens the SOCKS 6 UDP port on each listener address, at ``[udp] port`` when
    set, and says so; ``enabled = false`` opens none and says UDP ASSOCIATE is off."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "udp.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[udp]\nport = {port}\n')
    async with serve("--config", str(config)) as proc:
        await proc.address()
        line = (await proc.wait_for(r"INFO .*SOCKS 6 UDP port.*")).group(0)
        assert f"127.0.0.1:{port}" in line, line
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n[udp]\nenabled = false\n')
    async with serve("--config", str(config)) as proc:
        await proc.address()
        await proc.wait_for(r"INFO .*UDP ASSOCIATE is turned off.*")


async def test_serve_user_flag_turns_auth_on() -> None:
    """--user NAME:PASSWORD turns authentication on (the password is hashed in memory)."""
    async with Sink() as sink, serve("--listen", "127.0.0.1:0", "--user", "alice:wonderland") as proc:
        proxy = await proc.address()
        client = await RawClient.connect(proxy)
        await client.send(connect_request(sink.address))
        assert (await client.auth_reply()).type == AuthReplyType.FAILURE
        await client.close()
        client = await open_relay(proxy, sink.address, user="alice")
        await echo(client)
        await client.close()
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs unshare -n")
async def test_serve_warns_about_an_open_proxy() -> None:
    """Issue 12, defect 6: ``serve --listen 0.0.0.0:PORT`` with no users and no rules started
    without a word. It now logs a warning at start-up (run in a private network namespace:
    the wildcard listener is reachable from nowhere). On loopback there is none."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    async with serve("--listen", "0.0.0.0:0", netns=True) as proc:
        line = (await proc.wait_for(r"WARNING .*open proxy.*")).group(0)
        assert "listening on 0.0.0.0, which is not loopback, with no [users]" in line, line
    async with serve("--listen", "127.0.0.1:0") as proc:
        await proc.wait_for("relay path")  # logged after the warning would have been
        assert not any("open proxy" in line for line in proc.lines), proc.lines


def test_reload_keeps_the_hash_of_a_user_flag(tmp_path: Path) -> None:
    """S-1: a reload ends the sessions of users whose hash changed; a ``--user`` given at
    start is hashed once, so a SIGHUP (which loads the configuration again) keeps its hash
    and its sessions, while the configuration file's users are read again."""
    from socks6fast.cli import _load  # noqa: PLC0415 (the CLI's own loader, as SIGHUP calls it)

    path = tmp_path / "socks6fast.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:1080"]\n')
    args = argparse.Namespace(config=str(path), listen=[], users={"alice": "wonderland"})
    first, again = _load(args), _load(args)
    assert first.users["alice"] == again.users["alice"]


def test_check_config_and_serve_refuse_unusable_tls_files_in_one_sentence(tmp_path: Path) -> None:
    """A certificate, key or client CA file that exists but cannot be used (the trial: a key
    given as `tls_client_ca`, a certificate that is not PEM) is one sentence from check-config
    and from serve, exit 2, no traceback (before: check-config said OK, serve raised
    ssl.SSLError). workers = 2 with a DTLS port is check-config's sentence too, as serve's."""
    from helpers_server import make_certificates  # noqa: PLC0415

    certs = make_certificates(tmp_path)
    base = f'[server]\nlisten = ["127.0.0.1:0"]\ntls_listen = ["127.0.0.1:0"]\ntls_key = "{certs.key}"\n'
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    cases = [
        (f'tls_certificate = "{certs.cert}"\ntls_client_ca = "{certs.key}"\n', "server.tls_client_ca: "),
        (f'tls_certificate = "{not_pem}"\n', "server.tls_certificate / server.tls_key: "),
    ]
    for extra, sentence in cases:
        config = tmp_path / "tls.toml"
        config.write_text(base + extra)
        for argv in (("check-config", str(config)), ("serve", "--config", str(config))):
            done = run(*argv)
            assert done.returncode == 2, (argv, done)
            assert sentence in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    config = tmp_path / "workers.toml"
    config.write_text(base + f'tls_certificate = "{certs.cert}"\nworkers = 2\n')
    done = run("check-config", str(config))
    assert (
        done.returncode == 2 and "DTLS ports" in done.stderr and "served by one process only" in done.stderr
    )
