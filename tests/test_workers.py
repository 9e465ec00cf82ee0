"""``serve --workers 2`` (issue 13 item 1, D34), as real ``socks6fast serve`` subprocesses.

A supervisor and two worker processes share each listener (SO_REUSEPORT). Clients come from
several loopback source addresses (127.0.0.1 .. 127.0.0.8: all of 127/8 is local on Linux),
which the supervisor's BPF program spreads over both workers; the tests read which worker
served a connection from its log line (``[worker N] ... client=ADDR:PORT``).

Most of these test the process tree, not the codec: they run once, in the compiled-extensions
run (``once``: the SOCKS6FAST_NO_EXTENSIONS=1 run skips them). The UDP and BIND test runs in
both: a worker hands its share of the UDP port to the native engine or to its Python twin.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import ssl
import tomllib
from pathlib import Path

import pytest
from helpers_server import RawClient, Sink, make_certificates
from test_cli import ServeProcess, serve
from test_server_e2e import connect, echo_roundtrip, option, request
from test_udp_server import Association, Echo, datagram, parse

from socks6fast.config import parse_config
from socks6fast.constants import AddressType, AuthReplyType, Command, ReplyCode
from socks6fast.dataplane.engine import NO_EXTENSIONS
from socks6fast.net import reuseport
from socks6fast.net.reuseport import (
    association_id_byte,
    attach,
    source_program,
    steering_available,
)
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRequest,
    IdempotenceWindow,
    Request,
    SessionID,
    SessionInvalid,
    SessionRequest,
)
from socks6fast.supervisor import per_worker_config

pytestmark = pytest.mark.timeout(90)
#: For the tests of the process tree only (module docstring).
once = pytest.mark.skipif(NO_EXTENSIONS, reason="process tree, not codec: runs once")

#: Client source addresses; the steering program sends some to each of the two workers.
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nworkers = 2\n{extra}')
    return path


async def _started(proc: ServeProcess) -> tuple[tuple[str, int], list[int]]:
    """The proxy address and the two workers' pids, once the supervisor says they run."""
    match = await proc.wait_for(r"2 workers \(pids (\d+), (\d+)\)", timeout=30)
    return await proc.address(), [int(match.group(1)), int(match.group(2))]


async def _worker_of(proc: ServeProcess, client: RawClient) -> int:
    """Which worker logged the finished connection of ``client`` (closed by the caller)."""
    host, port = client.local
    match = await proc.wait_for(rf"\[worker (\d)\] .*client={re.escape(host)}:{port} ")
    return int(match.group(1))


async def _owners(proc: ServeProcess, proxy: tuple[str, int], sink: Sink) -> dict[str, int]:
    """Source address -> the worker its connections reach (one relayed connection each)."""
    owners = {}
    for source in SOURCES:
        client, _, reply = await exchange_from(proxy, source, connect(sink.address))
        assert reply.reply_code == ReplyCode.SUCCESS
        await echo_roundtrip(client)
        await client.close()
        owners[source] = await _worker_of(proc, client)
    assert set(owners.values()) == {0, 1}, owners  # both workers serve
    return owners


async def exchange_from(proxy: tuple[str, int], source: str, data: bytes) -> tuple[RawClient, object, object]:
    client = await RawClient.connect(proxy, local_addr=(source, 0))
    await client.send(data)
    auth = await client.auth_reply()
    assert auth.type == AuthReplyType.SUCCESS, auth
    return client, auth, await client.operation_reply()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@once
async def test_restart_reload_and_drain(tmp_path: Path) -> None:
    """A killed worker is started again (logged) while the other serves on; SIGHUP reaches
    both workers (a new rule refuses in both, and in the restarted one); the supervisor's
    descriptors stay as they were; SIGTERM drains both (a live relay finishes) and exits 0."""
    config = _config(tmp_path)
    async with Sink() as sink, serve("--config", str(config), "--drain-timeout", "10") as proc:
        proxy, pids = await _started(proc)
        supervisor = proc.process.pid
        owners = await _owners(proc, proxy, sink)
        fds_before = _fds(supervisor)
        by_worker = {worker: next(s for s, w in owners.items() if w == worker) for worker in (0, 1)}

        # SIGHUP: a rule denying the sink, seen by both workers.
        config.write_text(
            config.read_text()
            + f'\n[[rules]]\naction = "deny"\ndestinations = ["127.0.0.1"]\nports = [{sink.address[1]}]\n'
        )
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_for(r"\[worker 0\] configuration reloaded: 0 users, 1 rules")
        await proc.wait_for(r"\[worker 1\] configuration reloaded: 0 users, 1 rules")
        for source in by_worker.values():
            client, _, reply = await exchange_from(proxy, source, connect(sink.address))
            assert reply.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
            await client.close()

        # A broken file: one line in the supervisor, no worker reloads.
        config.write_text("[server\n")
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_for(r"SIGHUP: configuration not reloaded \(no worker was told\)")
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:0"]\nworkers = 2\n[[rules]]\naction = "deny"\n'
            f'destinations = ["127.0.0.1"]\nports = [{sink.address[1]}]\n'
        )

        # Kill worker 0: logged, started again; worker 1 serves meanwhile.
        os.kill(pids[0], signal.SIGKILL)
        await proc.wait_for(rf"worker 0 \(pid {pids[0]}\) killed by SIGKILL; starting it again in")
        client, _, reply = await exchange_from(proxy, by_worker[1], request(Command.NOOP, "0.0.0.0", 0))
        assert reply.reply_code == ReplyCode.SUCCESS
        await client.close()
        restarted = await proc.wait_for(r"worker 0 started again \(pid (\d+)\)")
        assert int(restarted.group(1)) not in pids
        # The restarted worker serves worker 0's clients, with the reloaded rules.
        client, _, reply = await exchange_from(proxy, by_worker[0], connect(sink.address))
        assert reply.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        await client.close()
        assert await _worker_of(proc, client) == 0
        assert _fds(supervisor) == fds_before  # no descriptor left by the restart or reloads

        # SIGTERM with a live relay in each worker: both finish, then exit 0.
        config.write_text('[server]\nlisten = ["127.0.0.1:0"]\nworkers = 2\n')
        proc.process.send_signal(signal.SIGHUP)
        await proc.wait_for(r"\[worker 0\] configuration reloaded: 0 users, 0 rules")
        await proc.wait_for(r"\[worker 1\] configuration reloaded: 0 users, 0 rules")
        live = []
        for source in by_worker.values():
            client, _, reply = await exchange_from(proxy, source, connect(sink.address))
            assert reply.reply_code == ReplyCode.SUCCESS
            live.append(client)
        proc.process.send_signal(signal.SIGTERM)
        await proc.wait_for(r"\[worker 1\] stopping: no new connections")
        await proc.wait_for(r"\[worker 0\] stopping: no new connections")
        for client in live:
            await echo_roundtrip(client, b"still relayed while draining")
            await client.close()
        assert await asyncio.wait_for(proc.process.wait(), 15) == 0
        await proc.wait_for(r"socks6fast.supervisor: stopped")


@once
@pytest.mark.conformance("SES-02", "IDM-03")
async def test_steering_keeps_sessions_and_tokens(tmp_path: Path) -> None:
    """SES-02, IDM-03 with two workers: a session made on one connection is used on the next
    ones from the same client address (many addresses, both workers, every request succeeds),
    and its tokens are spent once each (a replay is refused, by the worker that knows it)."""
    async with Sink() as sink, serve("--config", str(_config(tmp_path))) as proc:
        proxy, _ = await _started(proc)
        owners = await _owners(proc, proxy, sink)
        for source in SOURCES:
            opener, _, reply = await exchange_from(
                proxy, source, connect(sink.address, SessionRequest(), IdempotenceRequest(8))
            )
            sid = option(reply, SessionID)
            assert sid is not None
            await opener.close()
            for _ in range(4):
                client, auth, reply = await exchange_from(proxy, source, connect(sink.address, sid))
                assert reply.reply_code == ReplyCode.SUCCESS
                assert option(auth, SessionInvalid) is None
                await echo_roundtrip(client)
                await client.close()
                assert await _worker_of(proc, client) == owners[source]
            window = option(auth, IdempotenceWindow)
            assert window is not None
            spend = connect(sink.address, sid, IdempotenceExpenditure(window.base))
            client, auth, reply = await exchange_from(proxy, source, spend)
            assert option(auth, IdempotenceAccepted) is not None and reply.reply_code == ReplyCode.SUCCESS
            await client.close()
            replay = await RawClient.connect(proxy, local_addr=(source, 0))
            await replay.send(spend)
            assert (await replay.auth_reply()).type == AuthReplyType.FAILURE  # IDM-03: spent once
            await replay.close()


@pytest.mark.conformance("UDP-02", "CMD-04")
async def test_udp_associate_and_bind(tmp_path: Path) -> None:
    """UDP-02 through two workers: associations made by clients of both workers get their
    datagrams relayed, even when the datagrams come from another address than the TCP
    connection (the Association ID steers them, not the source). CMD-04: BIND works in both."""
    async with Echo("127.0.0.1") as remote, serve("--config", str(_config(tmp_path))) as proc:
        proxy, _ = await _started(proc)
        served = set()
        for source in SOURCES:
            client = await RawClient.connect(proxy, local_addr=(source, 0))
            await client.send(
                codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0))
            )
            assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
            assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
            association = Association(client, None, b"", proxy)  # type: ignore[arg-type]
            init = await association.message()
            assert isinstance(init, AssociationInit)
            association.aid = init.association_id
            # From 127.0.0.1 whatever the TCP source: a NAT that changes it does not matter.
            association.udp.bind(("127.0.0.1", 0))
            for n in range(3):
                await association.send_udp(datagram(association.aid, *remote.address, b"d%d" % n))
                if n == 0:
                    assert await association.message() == AssociationConfirmation(association.aid)
                header, payload = parse(await association.recv_udp())
                assert (header.association_id, payload) == (association.aid, b"d%d" % n)
            await association.close()
            served.add(await _worker_of(proc, client))
        assert served == {0, 1}

        for source in SOURCES[:4]:
            client, _, first = await exchange_from(proxy, source, request(Command.BIND, "0.0.0.0", 0))
            assert first.reply_code == ReplyCode.SUCCESS and first.port > 0  # type: ignore[attr-defined]
            peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", first.port)  # type: ignore[attr-defined]
            second = await client.operation_reply()
            assert second.reply_code == ReplyCode.SUCCESS
            peer_writer.write(b"from peer")
            assert await client.read_exactly(9) == b"from peer"
            await client.send(b"from client")
            assert await peer_reader.readexactly(11) == b"from client"
            peer_writer.close()
            await client.close()


@once
@pytest.mark.conformance("TRN-03")
async def test_tls_listener_with_workers(tmp_path: Path) -> None:
    """TRN-03 through two workers: the TLS listener is a steered group too (both workers
    answer TLS clients); a DTLS port with workers is refused in one sentence (not served yet)."""
    certs = make_certificates(tmp_path)
    tls = f'tls_listen = ["127.0.0.1:0"]\ntls_certificate = "{certs.cert}"\ntls_key = "{certs.key}"\n'
    config = _config(tmp_path, tls + "[udp]\ndtls = false\n")
    context = ssl.create_default_context(cafile=str(certs.ca))
    async with Sink() as sink, serve("--config", str(config)) as proc:
        await _started(proc)
        port = int((await proc.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(SOCKS over TLS")).group(1))
        served = set()
        for source in SOURCES:
            client = await RawClient.connect(
                ("127.0.0.1", port), ssl=context, server_hostname="127.0.0.1", local_addr=(source, 0)
            )
            await client.send(connect(sink.address))
            assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
            assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
            await echo_roundtrip(client)
            await client.close()
            served.add(await _worker_of(proc, client))
        assert served == {0, 1}
    config = _config(tmp_path, tls)  # DTLS on by default with a TLS listener
    async with serve("--config", str(config)) as proc:
        assert await asyncio.wait_for(proc.process.wait(), 10) == 2
        await proc.wait_for(r"socks6fast: error: --workers 2: DTLS ports .* are served by one process only")


@once
async def test_workers_one_is_one_process(tmp_path: Path) -> None:
    """workers = 1 (the default) is today's single process: no supervisor, no child."""
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    async with serve("--config", str(config), "--workers", "1") as proc:
        await proc.address()
        children = Path(f"/proc/{proc.process.pid}/task/{proc.process.pid}/children").read_text()
        assert children.strip() == ""
        assert not any("[worker" in line or "supervisor" in line for line in proc.lines), proc.lines
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0


@once
async def test_bad_worker_counts_are_one_sentence(tmp_path: Path) -> None:
    """--workers that is not a count, and a port taken (even by a group it could join): one
    sentence, exit 2."""
    for flag, words in (("x", "is not a whole number"), ("999", "is not in 0..256")):
        async with serve("--workers", flag, "--listen", "127.0.0.1:0") as proc:
            assert await asyncio.wait_for(proc.process.wait(), 10) == 2
            await proc.wait_for(rf"socks6fast: error: --workers: .*{words}")
    # Taken by a listener with SO_REUSEPORT too (another `serve --workers` of this user): the
    # supervisor must not join its group and share its clients.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with serve("--workers", "2", "--listen", f"127.0.0.1:{port}") as proc:
            assert await asyncio.wait_for(proc.process.wait(), 10) == 2
            await proc.wait_for(
                rf"socks6fast: error: cannot listen: 127\.0\.0\.1:{port}: Address already in use"
            )


# --- the pieces, without processes ------------------------------------------------------------


@pytest.mark.parametrize(("workers", "threads"), [(2, 1), (2, 2), (3, 4), (4, 16), (16, 16)])
def test_association_id_byte_selects_the_workers_sockets(workers: int, threads: int) -> None:
    """D34: an ID made by worker w is steered (``byte % (workers * threads)``, the UDP port's
    program) to one of w's sockets, the engine thread ``byte % threads`` unchanged, for every
    random byte; and each worker still has several values to choose from (the byte stays random)."""
    group = workers * threads
    for worker in range(workers):
        values = set()
        for random_byte in range(256):
            value = association_id_byte(random_byte, worker, workers, threads)
            assert 0 <= value <= 255
            assert (value % group) // threads == worker
            assert value % threads == random_byte % threads
            values.add(value)
        assert len(values) >= 256 // group


def test_steering_spreads_source_addresses() -> None:
    """The TCP program sends every connection from one address to one socket, and spreads
    addresses over both sockets of a 2-socket group (IPv4 here; the same program for IPv6
    reads the 16 address bytes)."""
    assert steering_available() is None
    socks = []
    try:
        port = 0
        for _ in range(2):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            port = sock.getsockname()[1]
            sock.listen(16)
            sock.setblocking(False)
        attach(socks[0], source_program(socket.AF_INET, 2))
        owner: dict[str, set[int]] = {}
        for source in SOURCES:
            for _ in range(3):
                with socket.socket() as client:
                    client.bind((source, 0))
                    client.connect(("127.0.0.1", port))
                    for index, sock in enumerate(socks):
                        try:
                            accepted, _ = sock.accept()
                        except BlockingIOError:
                            continue
                        accepted.close()
                        owner.setdefault(source, set()).add(index)
        assert all(len(indexes) == 1 for indexes in owner.values()), owner
        assert set().union(*owner.values()) == {0, 1}, owner
    finally:
        for sock in socks:
            sock.close()
    with pytest.raises(ValueError, match="not an IP family"):
        source_program(socket.AF_UNIX, 2)


def test_per_worker_config_shares_threads_and_connections() -> None:
    """Thread counts left at 0 (one per core) become cores / N per worker, explicit ones stay;
    max_connections is the server's total; the admin port is offset by the worker index."""
    config = parse_config(
        tomllib.loads(
            '[server]\nmax_connections = 101\n[admin]\nlisten = "127.0.0.1:9180"\n[udp]\nworkers = 3\n'
        )
    )
    cores = len(os.sched_getaffinity(0))
    second = per_worker_config(config, 2, 1)
    assert second.server.relay_workers == max(1, cores // 2)
    assert second.udp.workers == 3  # explicit: per worker
    default_udp = per_worker_config(parse_config({}), 2, 0).udp.workers
    assert default_udp == max(1, max(1, cores // 2) // 2)  # the engine's half the cores (D33), shared
    assert second.server.max_connections == 51
    assert second.admin.listen == ("127.0.0.1", 9181)
    assert per_worker_config(config, 2, 0).admin.listen == ("127.0.0.1", 9180)


def test_steering_unavailable_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses the program (before 4.5, a seccomp filter) is detected with the
    reason, which the supervisor logs at start (README: what holds without steering)."""

    def refuse(sock: socket.socket, program: object) -> None:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(reuseport, "attach", refuse)
    assert reuseport.steering_available() == "SO_ATTACH_REUSEPORT_CBPF refused: Protocol not available"
