"""Where the proxy may connect, end to end (issue 12: defects 1, 2, 6 and 7), CMD-06.

Real sockets, real curl (``--socks5`` / ``--socks5-hostname``) and the project's own SOCKS 6
client against local HTTP servers. Names are resolved by the server's injected fake
resolver (`helpers_server.fake_resolver`), never by the system resolver. Everything here
reaches 127.0.0.0/8 and ::1 only; the host's non-loopback addresses and wildcard
listeners are exercised inside a network namespace the test creates (`unshare -n`, a veth
pair with nothing behind it: NETNS_LOCAL_SETUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_server import (
    NETNS_HOST_V4,
    NETNS_HOST_V6,
    NETNS_LOCAL_SETUP,
    RawClient,
    Sink,
    curl,
    fake_resolver,
    make_certificates,
    make_config,
    record_for,
    running_server,
)

import socks6fast
from socks6fast.asyncio import client as s6client
from socks6fast.asyncio.server import describe_error
from socks6fast.config import Config
from socks6fast.constants import AddressType, AuthReplyType, Command, RelayEnd, ReplyCode
from socks6fast.dataplane.engine import PATH_ASYNCIO, RelayResult
from socks6fast.dataplane.relayer import Relayer
from socks6fast.errors import ProxyError
from socks6fast.net.localaddr import read_local_addresses
from socks6fast.proto import codec
from socks6fast.proto.messages import Request

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "socks6fast.toml"
CURL = Path("/usr/bin/curl")
needs_curl = pytest.mark.skipif(not CURL.exists(), reason="needs /usr/bin/curl")
#: curl's exit status when the SOCKS proxy refuses (CURLE_PROXY).
CURL_PROXY_REFUSED = 97
#: Names as the fake resolver answers them; "0" and "0.0.0.0" are what getaddrinfo makes of
#: them (inet_aton), "zero.test" stands for any name whose DNS answer is 0.0.0.0.
NAMES = {
    "0": ["0.0.0.0"],
    "0.0.0.0": ["0.0.0.0"],
    "zero.test": ["0.0.0.0"],
    "any6.test": ["::"],
    "localhost": ["127.0.0.1", "::1"],
    "self.test": ["127.0.0.1"],
}

V4, V6, DN = AddressType.IPV4, AddressType.IPV6, AddressType.DOMAIN_NAME


def socks6_request(command: Command, address_type: AddressType, host: str, port: int) -> bytes:
    return codec.encode_request(Request(command, address_type, host, port))


def noop_request(host: str, port: int) -> bytes:
    """A NOOP with a non-zero address, which the encoder refuses (REQ-04): a CONNECT with the
    command byte changed."""
    raw = bytearray(socks6_request(Command.CONNECT, V4, host, port))
    raw[1] = Command.NOOP
    return bytes(raw)


def socks5_request(command: int, address_type: AddressType, host: str, port: int) -> bytes:
    if address_type == V4:
        address = socket.inet_pton(socket.AF_INET, host)
    elif address_type == V6:
        address = socket.inet_pton(socket.AF_INET6, host)
    else:
        address = bytes([len(host)]) + host.encode()
    return bytes([5, command, 0, address_type]) + address + struct.pack(">H", port)


async def socks6_reply(proxy: tuple[str, int], data: bytes) -> tuple[RawClient, int]:
    """Send a SOCKS 6 request; the client and the Operation Reply code."""
    client = await RawClient.connect(proxy)
    await client.send(data)
    assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
    return client, int((await client.operation_reply()).reply_code)


async def socks5_reply(proxy: tuple[str, int], data: bytes) -> tuple[RawClient, int]:
    """Send a SOCKS 5 greeting (no authentication) and request; the client and REP."""
    client = await RawClient.connect(proxy)
    await client.send(b"\x05\x01\x00" + data)
    assert await client.read_exactly(2) == b"\x05\x00"
    head = await client.read_exactly(4)
    await client.read_exactly(18 if head[3] == V6 else 6)  # BND.ADDR, BND.PORT
    return client, head[1]


async def socks6_client_code(proxy: tuple[str, int], host: str, port: int) -> int:
    """The reply code the project's client gets for a CONNECT (0 when it connects)."""
    try:
        _, writer = await s6client.open_connection(f"socks6://{proxy[0]}:{proxy[1]}", host, port, timeout=10)
    except ProxyError as exc:
        assert exc.reply_code is not None
        return int(exc.reply_code)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return 0


def old_example_rules() -> Config:
    """The rule of examples/socks6fast.toml before issue 12 (deny 127.0.0.0/8, ::1 and the
    name localhost for CONNECT), which 0.0.0.0 and friends walked around."""
    rules = [{"action": "deny", "commands": ["connect"], "destinations": ["127.0.0.0/8", "::1", "localhost"]}]
    return make_config(rules=rules, ipv6=True)


# --- defect 1: no way around the rules to the proxy host itself -------------------------


@needs_curl
@pytest.mark.conformance("CMD-06")
async def test_unspecified_destinations_do_not_bypass_a_loopback_rule() -> None:
    """CMD-06 (issue 12, defect 1): with a rule refusing 127.0.0.0/8, ::1 and localhost,
    ``curl --socks5 http://0.0.0.0:PORT/`` got 200 from a service on 127.0.0.1 where
    ``http://127.0.0.1:PORT/`` was refused; so did ::, ::ffff:0.0.0.0 and the names "0",
    "0.0.0.0" and any name resolving to 0.0.0.0, over SOCKS 5 and SOCKS 6. The rules now
    see the address the kernel really connects to: all are refused with 0x02 and the
    services see no connection. Without the rule the same requests do reach them."""
    async with contextlib.AsyncExitStack() as stack:
        http4 = await stack.enter_async_context(Sink("127.0.0.1", mode="http", body=b"secret\n"))
        port = http4.address[1]
        http6 = await stack.enter_async_context(Sink("::1", mode="http", body=b"secret\n", port=port))
        denied = await stack.enter_async_context(
            running_server(old_example_rules(), resolver=fake_resolver(NAMES))
        )
        open_ = await stack.enter_async_context(running_server(make_config(), resolver=fake_resolver(NAMES)))

        urls = [f"http://0.0.0.0:{port}/", f"http://[::]:{port}/", f"http://[::ffff:0.0.0.0]:{port}/"]
        for server, expected in ((open_, 0), (denied, CURL_PROXY_REFUSED)):
            proxy = "{}:{}".format(*server.addresses[0])
            for flag in ("--socks5", "--socks5-hostname"):
                for url in urls + [f"http://zero.test:{port}/"] * (flag == "--socks5-hostname"):
                    code, body, err = await curl(flag, proxy, url)
                    assert code == expected, (flag, url, err)
                    assert body == (b"secret\n" if expected == 0 else b"")
        seen = len(http4.connections) + len(http6.connections)
        assert seen == 7  # the 7 requests through the open proxy; none through the other

        proxy = denied.addresses[0]
        targets = [(V4, "0.0.0.0"), (V6, "::"), (V6, "::ffff:0.0.0.0"), (V6, "::ffff:127.0.0.1")]
        targets += [(DN, name) for name in ("0", "0.0.0.0", "zero.test", "any6.test", "localhost")]
        for address_type, host in targets:
            client, code = await socks6_reply(
                proxy, socks6_request(Command.CONNECT, address_type, host, port)
            )
            assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, host
            await client.close()
            error = (await record_for(denied, client)).error
            assert error in ("denied by rules[0]", f"{host!r} resolves only to denied addresses"), error
            client, code = await socks5_reply(proxy, socks5_request(1, address_type, host, port))
            assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, host
            await client.close()
            if address_type != DN:  # the project's client sends names as names, IPs as IPs
                assert await socks6_client_code(proxy, host, port) == ReplyCode.NOT_ALLOWED_BY_RULESET
        for name in ("0", "zero.test", "any6.test"):
            assert await socks6_client_code(proxy, name, port) == ReplyCode.NOT_ALLOWED_BY_RULESET
        assert len(http4.connections) + len(http6.connections) == seen
        # The DNS service (D13) is not a CONNECT to this host: the rule does not apply to it.
        client, code = await socks6_reply(proxy, socks6_request(Command.CONNECT, V4, "0.0.0.0", 53))
        assert code == ReplyCode.CONNECTION_REFUSED  # no resolver configured, as before
        await client.close()
        assert (await record_for(denied, client)).error == "DNS service: no server.dns_resolver configured"


def _netns_available() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def netns_local() -> dict[str, Any]:
    """Observations of helpers_server's "local" scenarios in a namespace whose host has
    10.99.0.1/24 and fd99::1/64 on a veth and 10.98.0.1/16 on its loopback device, plus
    what `read_local_addresses` reads there."""
    if not _netns_available():
        pytest.skip("needs unshare -n (root or user namespaces) and iproute2")
    veth = subprocess.run(
        ["unshare", "-n", "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        capture_output=True,
        check=False,
    )
    if veth.returncode != 0:
        pytest.skip(f"needs veth interfaces in a namespace: {veth.stderr.decode().strip()}")
    # The installed package (compiled), also for ``python -c``, whose path starts at the cwd.
    root = str(Path(socks6fast.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    helpers = Path(__file__).resolve().parent / "helpers_server.py"
    read = (
        "import json; from socks6fast.net.localaddr import read_local_addresses as r; l, p = r(); "
        "print(json.dumps({'problem': p, 'addresses': sorted(map(str, l.addresses)), "
        "'networks': list(map(str, l.networks))}))"
    )
    script = NETNS_LOCAL_SETUP + f'\n"{sys.executable}" "{helpers}" local\n"{sys.executable}" -c "{read}"\n'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=60
    )
    assert done.returncode == 0, done.stderr
    scenarios, addresses = done.stdout.strip().splitlines()[-2:]
    return {**json.loads(scenarios), "read": json.loads(addresses)}


def test_read_local_addresses_in_a_namespace(netns_local: dict[str, Any]) -> None:
    """The addresses "@local" stands for come from the kernel (rtnetlink dump): every interface
    address, IPv4 and IPv6, link-local included, and the whole prefix of an IPv4 address on
    the loopback device (the kernel delivers all of 10.98.0.0/16 locally)."""
    read = netns_local["read"]
    assert read["problem"] is None
    assert {"127.0.0.1", "::1", NETNS_HOST_V4, NETNS_HOST_V6, "10.98.0.1"} <= set(read["addresses"])
    assert any(ipaddress.ip_address(a).is_link_local for a in read["addresses"])
    assert read["networks"] == ["10.98.0.0/16"]


@pytest.mark.conformance("CMD-06")
def test_host_addresses_are_local(netns_local: dict[str, Any]) -> None:
    """CMD-06 (issue 12, defect 1): "the host's own non-loopback addresses" reached a
    service listening on every address of the proxy host. With the example configuration
    ("@local" denied) a CONNECT to the host's veth address, its IPv6 address, an address in
    the loopback device's /16, or a name resolving to one of them is refused (SOCKS 6, and
    SOCKS 5 with curl); without rules the same requests reach the service."""
    for target, (code, error) in netns_local["allow_all"].items():
        assert code == ReplyCode.SUCCESS, (target, error)
    assert netns_local["allow_all_curl"] == [0, "local service\n"]
    for target, (code, error) in netns_local["example"].items():
        assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, target
        assert error in ("denied by rules[0]", f"{target!r} resolves only to denied addresses"), error
    assert netns_local["example_curl"] == [CURL_PROXY_REFUSED, ""]
    assert netns_local["sink_connections"] == 5 + 1  # the allow-all requests only


@pytest.mark.conformance("CMD-06")
def test_wildcard_listener_is_reached_by_every_local_address(netns_local: dict[str, Any]) -> None:
    """CMD-06 (issue 12, defect 2): a proxy listening on 0.0.0.0 and [::] is reached by every
    address of its host: the veth address, any 127/8 address, 0.0.0.0, an address in the
    loopback device's /16, a name resolving to one of them, the IPv6 address and ::1. A
    CONNECT to any of them on a listener's port is refused as a loop (allow-all default);
    the same address on another port (a local service) is not."""
    for code, error in netns_local["wildcard_loops"]:
        assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, error
        assert error.startswith("loop refused: ") and "this proxy's own listener" in error, error
    assert netns_local["wildcard_sink"] == [ReplyCode.SUCCESS, ""]


def test_read_local_addresses_matches_ip_addr() -> None:
    """The rtnetlink dump lists what ``ip -j addr`` lists (read only: nothing is reached)."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    local, problem = read_local_addresses()
    assert problem is None
    listed = json.loads(
        subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    )
    expected = {
        ipaddress.ip_address(info["local"])
        for link in listed
        for info in link.get("addr_info", [])
        if "local" in info
    }
    assert local.addresses == expected


# --- defect 2: no loops through the proxy itself ----------------------------------------


@needs_curl
@pytest.mark.conformance("CMD-06")
async def test_connect_to_own_listener_is_refused(tmp_path: Path) -> None:
    """CMD-06 (issue 12, defect 2): one client chained the proxy through itself (500 hops,
    1006 descriptors) under the allow-everything default. A CONNECT whose destination is one
    of the proxy's own listeners, plain or TLS, by any address that reaches it (its own,
    0.0.0.0 / ::, a mapped form, a name), gets Not Allowed (0x02) over SOCKS 6 and SOCKS 5,
    and the access log says why; other local destinations still work."""
    certs = make_certificates(tmp_path)
    tls = {"tls_listen": ["127.0.0.1:0"], "tls_certificate": str(certs.cert), "tls_key": str(certs.key)}
    config = make_config(ipv6=True, server=tls)
    async with Sink() as sink, running_server(config, resolver=fake_resolver(NAMES)) as server:
        (v4, port4), (v6, port6) = server.addresses
        tls_port = server.tls_addresses[0][1]
        loops = [
            (V4, "127.0.0.1", port4),
            (V4, "0.0.0.0", port4),
            (V6, "::ffff:127.0.0.1", port4),
            (V6, "::ffff:0.0.0.0", port4),
            (V6, "::1", port6),
            (V6, "::", port6),
            (DN, "self.test", port4),
            (DN, "zero.test", port4),
            (V4, "127.0.0.1", tls_port),
        ]
        for address_type, host, port in loops:
            client, code = await socks6_reply(
                (v4, port4), socks6_request(Command.CONNECT, address_type, host, port)
            )
            assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, (host, port)
            await client.close()
            error = (await record_for(server, client)).error
            assert error.startswith("loop refused: ") and "this proxy's own listener" in error, error
            client, code = await socks5_reply((v6, port6), socks5_request(1, address_type, host, port))
            assert code == ReplyCode.NOT_ALLOWED_BY_RULESET, (host, port)
            await client.close()
        assert await socks6_client_code((v4, port4), "127.0.0.1", port4) == ReplyCode.NOT_ALLOWED_BY_RULESET
        for flag in ("--socks5", "--socks5-hostname"):
            code, _, err = await curl(flag, f"127.0.0.1:{port4}", f"http://127.0.0.1:{port4}/")
            assert code == CURL_PROXY_REFUSED, err
        # The proxy's host on another port is no loop: allowed (the default allows everything).
        client, code = await socks6_reply((v4, port4), socks6_request(Command.CONNECT, V4, *sink.address))
        assert code == ReplyCode.SUCCESS
        await client.close()


# --- BIND: the peer is checked when it connects --------------------------------------------


@pytest.mark.conformance("CMD-06", "CMD-04")
async def test_bind_peer_is_checked_against_the_rules() -> None:
    """CMD-06, CMD-04: a BIND's remote host is the peer that connects; with "deny @local"
    for BIND a process on the proxy host (here: the test, from 127.0.0.1) that connects to
    the BIND listener is closed, and the client gets a second reply Not Allowed (0x02),
    SOCKS 6 and SOCKS 5. The BIND request itself (0.0.0.0: no particular address) passes:
    its first reply is a success."""
    rules: list[dict[str, Any]] = [{"action": "deny", "commands": ["bind"], "destinations": ["@local"]}]
    async with running_server(make_config(rules=rules)) as server:
        proxy = server.addresses[0]
        for socks5 in (False, True):
            client = await RawClient.connect(proxy)
            if socks5:
                await client.send(b"\x05\x01\x00" + socks5_request(2, V4, "0.0.0.0", 0))
                assert await client.read_exactly(2) == b"\x05\x00"
                head = await client.read_exactly(4)
                assert head[1] == ReplyCode.SUCCESS and head[3] == V4
                tail = await client.read_exactly(6)
                bound = (socket.inet_ntoa(tail[:4]), struct.unpack(">H", tail[4:])[0])
            else:
                await client.send(socks6_request(Command.BIND, V4, "0.0.0.0", 0))
                assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
                first = await client.operation_reply()
                assert first.reply_code == ReplyCode.SUCCESS
                bound = (first.address, first.port)
            peer = socket.create_connection(bound, timeout=5)
            try:
                if socks5:
                    second = (await client.read_exactly(10))[1]
                else:
                    second = int((await client.operation_reply()).reply_code)
                assert second == ReplyCode.NOT_ALLOWED_BY_RULESET, socks5
                assert await client.read_until_eof() == b""
                assert peer.recv(100) == b""  # the peer was closed, nothing relayed
                peer_name = "{}:{}".format(*peer.getsockname())
            finally:
                peer.close()
                await client.close()
            assert (await record_for(server, client)).error == f"BIND peer {peer_name} denied by rules[0]"


# --- defect 7: every failure names its cause ---------------------------------------------


def test_describe_error_is_never_empty() -> None:
    """Issue 12, defect 7: asyncio's TimeoutError() has an empty text; errno is named."""
    assert describe_error(TimeoutError()) == "timed out"
    assert (
        describe_error(ConnectionRefusedError(111, "Connection refused"))
        == "Connection refused (ECONNREFUSED)"
    )
    assert describe_error(OSError(24, "Too many open files")) == "Too many open files (EMFILE)"
    assert describe_error(EOFError()) == "EOFError"
    assert describe_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == (
        "Name or service not known"
    )


async def test_every_failure_names_its_cause() -> None:
    """Issue 12, defect 7: each refused or failed request's log line says why, SOCKS 6 and
    SOCKS 5 (several said nothing: the reply code alone)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    async with running_server(make_config(), resolver=fake_resolver({})) as server:
        proxy = server.addresses[0]
        cases6 = [
            (
                socks6_request(Command.CONNECT, V4, "127.0.0.1", closed_port),
                "Connection refused (ECONNREFUSED)",
            ),
            (socks6_request(Command.CONNECT, DN, "nowhere.test", 80), "cannot resolve 'nowhere.test'"),
            (socks6_request(Command.CONNECT, V4, "0.0.0.0", 53), "no server.dns_resolver configured"),
            (socks6_request(Command.UDP_ASSOCIATE, DN, "x.test", 0), "UDP ASSOCIATE to a domain name"),
            (noop_request("192.0.2.1", 0), "NOOP needs address 0 and port 0"),
            (socks6_request(Command.BIND, DN, "x.test", 0), "BIND to a domain name is not supported"),
        ]
        for data, cause in cases6:
            client, code = await socks6_reply(proxy, data)
            assert code != ReplyCode.SUCCESS
            await client.close()
            assert cause in (await record_for(server, client)).error, cause
        cases5 = [
            (socks5_request(1, V4, "127.0.0.1", closed_port), "Connection refused (ECONNREFUSED)"),
            (socks5_request(4, V4, "0.0.0.0", 0), "unknown command 0x04"),
            (socks5_request(2, DN, "x.test", 0), "BIND to a domain name is not supported"),
        ]
        for data, cause in cases5:
            client, code = await socks5_reply(proxy, data)
            assert code != ReplyCode.SUCCESS
            await client.close()
            assert cause in (await record_for(server, client)).error, cause


class _FailingRelayer(Relayer):
    """A data plane that ends every relay at once, as one out of descriptors would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cause: str) -> None:
        super().__init__(loop, use_engine=False)
        self.cause = cause

    async def relay_sockets(
        self, client: socket.socket, remote: socket.socket, *, to_remote: bytes = b"", to_client: bytes = b""
    ) -> RelayResult:
        client.close()
        remote.close()
        return RelayResult(0, 0, RelayEnd.ERROR, PATH_ASYNCIO, cause=self.cause)


@pytest.mark.parametrize(
    ("cause", "logged"),
    [
        ("pipe2: Too many open files (EMFILE)", "relay: pipe2: Too many open files (EMFILE)"),
        ("", "relay: error (the data plane gave no cause)"),
    ],
)
async def test_relay_end_cause_is_logged(cause: str, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12, defect 7: a relay ended for lack of descriptors said only ``end=error``. The
    data plane's cause (`RelayResult.cause`) goes into the access log line."""
    caplog.set_level(logging.INFO, logger="socks6fast.server")
    relayer = _FailingRelayer(asyncio.get_running_loop(), cause)
    async with Sink() as sink, running_server(make_config(), relayer=relayer) as server:
        client, code = await socks6_reply(
            server.addresses[0], socks6_request(Command.CONNECT, V4, *sink.address)
        )
        assert code == ReplyCode.SUCCESS
        await client.close()
        record = await record_for(server, client)
    assert record.relay_end == "error" and record.error == logged
    # close=rst: an error end resets both legs (issue 16 defect 3), and the line says so.
    assert any(f"end=error close=rst error={logged!r}" in r.getMessage() for r in caplog.records)
