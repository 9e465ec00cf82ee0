"""End-to-end checks over raw sockets for what a strict external prober found: replies that
must come (and in which form) for requests the proxy cannot parse or cannot serve, the DNS
service's Stack option echo, BIND's address choice, and duplicate idempotence options.

Every test talks to the in-process server over loopback; names are resolved by the server's
default resolver only when Python's idna codec rejects them before any lookup, otherwise by
an injected local resolver (tests/conftest.py refuses any other name)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import pytest
from helpers_server import FakeDNS, RawClient, Sink, make_config, record_for, running_server

from socks6fast.asyncio.server import Server
from socks6fast.constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    ReplyCode,
    StackLeg,
)
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodSelection,
    HappyEyeballsOption,
    IdempotenceExpenditure,
    IdempotenceRequest,
    IdempotenceWindow,
    ListenBacklogOption,
    MultipathOption,
    Option,
    Request,
    SessionID,
    SessionRequest,
    SessionTeardown,
    TFOOption,
    TTLOption,
)
from socks6fast.proto.server import ServerConnection

pytestmark = pytest.mark.timeout(30)

#: D14: the Operation Reply with General Failure (0x01), unspecified IPv4 address, port 0.
#: Its first 4 bytes read as an Authentication Reply of Type 1 (failure) to a client.
D14_GENERAL_FAILURE = bytes.fromhex("060100000000000100000000")


def raw_connect(name: bytes, port: int = 0x55F0) -> bytes:
    """A CONNECT Request to domain ``name``, built by hand (the encoder refuses bad names)."""
    field = bytes([len(name)]) + name
    field += b"\0" * (-len(field) % 4)  # D2: the address field is padded to 4 bytes
    return struct.pack(">BBHHBB", 6, Command.CONNECT, 0, port, 0, AddressType.DOMAIN_NAME) + field


def socks5_connect(name: bytes, port: int) -> bytes:
    return b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port)


def request(command: Command, host: str, port: int, *options: Option) -> bytes:
    address_type = AddressType.IPV6 if ":" in host else AddressType.IPV4
    return codec.encode_request(Request(command, address_type, host, port, tuple(options)))


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- names the idna codec rejects (CMD-01) ---------------------------------------------


@pytest.mark.conformance("CMD-01")
@pytest.mark.parametrize("name", [b"a" * 64 + b".x", b"a..b"], ids=["64-byte-label", "empty-label"])
async def test_idna_rejected_name_is_host_unreachable(name: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """CMD-01: a domain name Python's idna codec rejects (getaddrinfo raises UnicodeError
    before any lookup) gets the normal Authentication Reply, then Host Unreachable (0x04),
    then a close; SOCKS 5 gets REP 0x04. The server's default resolver runs here: the name
    never reaches a DNS server because the codec refuses it first."""
    caplog.set_level(logging.INFO, logger="socks6fast")
    async with running_server(make_config()) as server:
        client = await RawClient.connect(server.addresses[0])
        await client.send(raw_connect(name))
        auth = await client.auth_reply()
        assert auth.type == AuthReplyType.SUCCESS
        reply = await client.operation_reply()
        assert reply.reply_code == ReplyCode.HOST_UNREACHABLE
        assert await client.read_until_eof() == b""
        await client.close()

        client = await RawClient.connect(server.addresses[0])
        await client.send(socks5_connect(name, 80))
        assert await client.read_exactly(2) == b"\x05\x00"
        head = await client.read_exactly(4)
        assert head[1] == ReplyCode.HOST_UNREACHABLE
        await client.read_exactly(6)  # BND.ADDR (IPv4), BND.PORT
        assert await client.read_until_eof() == b""
        await client.close()
    assert errors_logged(caplog) == []


# --- unexpected exceptions: General Failure, one WARNING line, clean close ---------------


async def test_internal_error_after_auth_reply_general_failure(caplog: pytest.LogCaptureFixture) -> None:
    """D14: an unexpected exception while serving (here a resolver with a bug) gives
    the normal Authentication Reply and an Operation Reply with General Failure (0x01), a
    one-line WARNING (the traceback only at DEBUG) and a close, never a hang."""

    async def broken(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        raise RuntimeError("resolver bug")

    caplog.set_level(logging.DEBUG, logger="socks6fast")
    async with running_server(make_config(), resolver=broken) as server:
        client = await RawClient.connect(server.addresses[0])
        await client.send(raw_connect(b"example.test"))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.GENERAL_FAILURE
        assert await client.read_until_eof() == b""
        await client.close()
    assert errors_logged(caplog) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "internal error" in r.message]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert "\n" not in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


async def test_internal_error_before_any_reply_d14(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D14: an unexpected exception before anything was sent gets exactly the D14 General
    Failure reply (read by a client as Authentication Reply Type 1), then a close."""

    def broken(*args: Any) -> None:
        raise RuntimeError("authentication bug")

    caplog.set_level(logging.INFO, logger="socks6fast")
    async with running_server(make_config()) as server:
        # The bug sits in the sans-IO core's authentication step, before any reply.
        monkeypatch.setattr(ServerConnection, "_auth_succeeded", broken)
        client = await RawClient.connect(server.addresses[0])
        await client.send(request(Command.CONNECT, "127.0.0.1", 9))
        assert await client.read_until_eof() == D14_GENERAL_FAILURE
        await client.close()
    assert errors_logged(caplog) == []


# --- requests that cannot be parsed (D14) ----------------------------------------------


@pytest.mark.conformance("REQ-03", "REQ-05", "REQ-09")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(bytes.fromhex("0601000055f000027f000001"), id="unknown-address-type"),
        pytest.param(bytes.fromhex("0601000455f000017f000001") + b"\x00\x01\x00\x03", id="option-length-3"),
        pytest.param(
            bytes.fromhex("0601000855f000017f000001") + b"\x00\x01\x00\x10" + bytes(4), id="option-past-end"
        ),
        pytest.param(bytes.fromhex("0601ffff55f000017f000001"), id="options-over-cap"),
        pytest.param(raw_connect(b""), id="empty-name"),
        pytest.param(raw_connect(b"a\0b"), id="nul-in-name"),
    ],
)
async def test_unparseable_request_gets_d14_general_failure(data: bytes) -> None:
    """D14 (REQ-05, REQ-09, D6): a request that cannot be parsed gets exactly the Operation
    Reply with General Failure as the very first bytes (never Type 0x07/0x08 where a client
    expects an Authentication Reply), then a close."""
    async with running_server(make_config()) as server:
        client = await RawClient.connect(server.addresses[0])
        await client.send(data)
        assert await client.read_until_eof() == D14_GENERAL_FAILURE
        await client.close()


@pytest.mark.conformance("CMD-06")
async def test_unknown_command_after_authentication() -> None:
    """CMD-06: a Command Code the proxy does not know (the codec passes it as a plain int)
    goes through the normal authentication flow, then gets Command Not Supported (0x07) in
    the Operation Reply (never as the first bytes, where a client expects the
    Authentication Reply), then a close."""
    async with running_server(make_config()) as server:
        client = await RawClient.connect(server.addresses[0])
        await client.send(bytes.fromhex("0604000055f000017f000001"))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        assert (await client.operation_reply()).reply_code == ReplyCode.COMMAND_NOT_SUPPORTED
        assert await client.read_until_eof() == b""
        await client.close()
        record = await record_for(server, client)
        assert record.command == "unknown (4)"


# --- DNS service echoes Stack options (STK-01, D9, CMD-07) -------------------------------


@pytest.mark.conformance("CMD-07", "STK-01")
async def test_dns_service_echoes_client_leg_stack_options() -> None:
    """STK-01 / D9 on the DNS service path (CMD-07): a client-leg TTL option is applied to
    the client connection and echoed in the Operation Reply, as on the normal CONNECT path."""
    async with FakeDNS() as dns:
        resolver = "{}:{}".format(*dns.address)
        async with running_server(make_config(server={"dns_resolver": resolver})) as server:
            client = await RawClient.connect(server.addresses[0])
            await client.send(request(Command.CONNECT, "0.0.0.0", 53, TTLOption(StackLeg.CLIENT_PROXY, 23)))
            assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
            reply = await client.operation_reply()
            assert reply.reply_code == ReplyCode.SUCCESS
            assert [o for o in reply.options if isinstance(o, TTLOption)] == [
                TTLOption(StackLeg.CLIENT_PROXY, 23)
            ]
            assert client.sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) != 23  # ours untouched
            await client.close()


# --- BIND with an unspecified address of the other family (CMD-04) ----------------------


async def _bind_and_connect(server: Server, proxy: tuple[str, int], data: bytes, expect: str) -> None:
    client = await RawClient.connect(proxy)
    await client.send(data)
    assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
    first = await client.operation_reply()
    assert first.reply_code == ReplyCode.SUCCESS
    assert first.address == expect, first  # never the wildcard of the other family
    _, writer = await asyncio.open_connection(first.address, first.port)
    second = await client.operation_reply()
    assert second.reply_code == ReplyCode.SUCCESS
    writer.close()
    await client.close()


@pytest.mark.conformance("CMD-04")
async def test_bind_unspecified_other_family_binds_client_local_address() -> None:
    """CMD-04: BIND naming the unspecified address of the other family than the client's
    connection binds the local address of that connection (its family), not ``*:port``,
    and the first Operation Reply names it; SOCKS 5 BIND likewise."""
    async with running_server(make_config(ipv6=True)) as server:
        v4 = next(a for a in server.addresses if ":" not in a[0])
        v6 = next(a for a in server.addresses if ":" in a[0])
        await _bind_and_connect(server, v4, request(Command.BIND, "::", 0), "127.0.0.1")
        await _bind_and_connect(server, v6, request(Command.BIND, "0.0.0.0", 0), "::1")
        # SOCKS 5 (RFC 1928 BIND with an IPv6 DST.ADDR) over an IPv4 connection.
        client = await RawClient.connect(v4)
        await client.send(b"\x05\x01\x00\x05\x02\x00\x04" + bytes(16) + b"\x00\x00")
        assert await client.read_exactly(2) == b"\x05\x00"
        head = await client.read_exactly(4)
        assert head[1] == 0 and head[3] == AddressType.IPV4
        address = socket.inet_ntoa(await client.read_exactly(4))
        (port,) = struct.unpack(">H", await client.read_exactly(2))
        assert address == "127.0.0.1"
        _, writer = await asyncio.open_connection(address, port)
        assert (await client.read_exactly(10))[1] == 0
        writer.close()
        await client.close()


# --- duplicate idempotence options (IDM-03, D10 spirit) -----------------------------------


@pytest.mark.conformance("IDM-03")
async def test_duplicate_idempotence_options_are_malformed() -> None:
    """IDM-03 (D10's rule applied to idempotence options): a request with two Idempotence
    Expenditure options, or two Token Requests, is malformed: exactly the D14 General
    Failure reply and a close; no token is spent, so the first one still spends afterwards."""
    async with running_server(make_config(sessions={"max_token_window": 8})) as server:
        proxy = server.addresses[0]
        client = await RawClient.connect(proxy)
        await client.send(request(Command.NOOP, "0.0.0.0", 0, SessionRequest(), IdempotenceRequest(4)))
        auth = await client.auth_reply()
        window = next(o for o in auth.options if isinstance(o, IdempotenceWindow))
        reply = await client.operation_reply()
        sid = next(o for o in reply.options if isinstance(o, SessionID))
        await client.close()
        base = window.base
        for options in (
            (sid, IdempotenceExpenditure(base), IdempotenceExpenditure((base + 1) % 2**32)),
            (sid, IdempotenceRequest(4), IdempotenceRequest(8)),
            (IdempotenceExpenditure(1), IdempotenceExpenditure(2)),
        ):
            client = await RawClient.connect(proxy)
            await client.send(request(Command.NOOP, "0.0.0.0", 0, *options))
            assert await client.read_until_eof() == D14_GENERAL_FAILURE, options
            await client.close()
        client = await RawClient.connect(proxy)
        await client.send(request(Command.NOOP, "0.0.0.0", 0, sid, IdempotenceExpenditure(base)))
        auth = await client.auth_reply()
        assert auth.type == AuthReplyType.SUCCESS  # the token was not spent by the rejected request
        await client.close()


# --- BIND claiming a backlog listener echoes its Stack options (STK-01, CMD-05) ------------


@pytest.mark.conformance("CMD-05", "STK-01")
async def test_bind_claim_echoes_supported_stack_options() -> None:
    """STK-01 / D9 (CMD-05): a further BIND of the session that claims a connection from a
    Listen Backlog listener gets, in its first Operation Reply, every supported Stack option
    it sent: the proxy-remote TTL the listener really uses (read back from it), Multipath
    ("whether an MPTCP connection will be accepted, when first replying to a BIND"), the
    client-leg TTL and a backlog of 0; TFO only if the listener accepts it (here it was
    opened without a TFO option, so the claim's TFO option is not echoed)."""
    async with running_server(make_config()) as server:
        proxy = server.addresses[0]
        client = await RawClient.connect(proxy)
        await client.send(request(Command.NOOP, "0.0.0.0", 0, SessionRequest()))
        await client.auth_reply()
        sid = next(o for o in (await client.operation_reply()).options if isinstance(o, SessionID))
        await client.close()
        holder = await RawClient.connect(proxy)
        remote_ttl = TTLOption(StackLeg.PROXY_REMOTE, 33)
        backlog = ListenBacklogOption(StackLeg.PROXY_REMOTE, 2)
        await holder.send(request(Command.BIND, "0.0.0.0", 0, sid, backlog, remote_ttl))
        await holder.auth_reply()
        first = await holder.operation_reply()
        assert first.reply_code == ReplyCode.SUCCESS and remote_ttl in first.options
        _, peer_writer = await asyncio.open_connection(first.address, first.port)
        claim = await RawClient.connect(proxy)
        multipath = MultipathOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED)
        client_ttl = TTLOption(StackLeg.CLIENT_PROXY, 44)
        tfo = TFOOption(StackLeg.PROXY_REMOTE, 0)
        await claim.send(
            request(Command.BIND, first.address, first.port, sid, remote_ttl, multipath, client_ttl, tfo)
        )
        assert (await claim.auth_reply()).type == AuthReplyType.SUCCESS
        reply = await claim.operation_reply()
        assert (reply.reply_code, reply.address, reply.port) == (ReplyCode.SUCCESS, first.address, first.port)
        assert sorted(map(repr, reply.options)) == sorted(map(repr, (remote_ttl, multipath, client_ttl)))
        second = await claim.operation_reply()
        assert second.reply_code == ReplyCode.SUCCESS and second.options == (multipath,)
        peer_writer.close()
        await claim.close()
        await holder.close()


@pytest.mark.conformance("CMD-05", "SES-05")
async def test_backlog_initial_connection_closed_when_session_ends() -> None:
    """CMD-05 ("the proxy listens for incoming connections for as long as the initial
    connection stays open"): when the session ends (here a Session Teardown, SES-05) and its
    backlog listener is closed, the initial BIND connection is closed too, instead of staying
    open while nothing listens any more."""
    async with running_server(make_config()) as server:
        proxy = server.addresses[0]
        client = await RawClient.connect(proxy)
        await client.send(request(Command.NOOP, "0.0.0.0", 0, SessionRequest()))
        await client.auth_reply()
        sid = next(o for o in (await client.operation_reply()).options if isinstance(o, SessionID))
        await client.close()
        holder = await RawClient.connect(proxy)
        await holder.send(
            request(Command.BIND, "0.0.0.0", 0, sid, ListenBacklogOption(StackLeg.PROXY_REMOTE, 2))
        )
        await holder.auth_reply()
        first = await holder.operation_reply()
        assert first.reply_code == ReplyCode.SUCCESS
        client = await RawClient.connect(proxy)
        await client.send(request(Command.NOOP, "0.0.0.0", 0, sid, SessionTeardown()))
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        await client.close()
        assert await holder.read_until_eof(timeout=5.0) == b""
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(first.address, first.port)
        await holder.close()


# --- proxy-remote-only Stack options sent with Leg 3 (STK-01, D9) ------------------------


def leg3_stack(level: int, code: int, value: bytes) -> bytes:
    """A Stack option with Leg 3 (both legs), built by hand: the encoder only sends Leg 2
    for the options whose figures fix it."""
    return struct.pack(">HHBB", 1, 8, (StackLeg.BOTH << 6) | level, code) + value


@pytest.mark.conformance("STK-01")
@pytest.mark.parametrize(
    ("command", "atyp_name", "option", "echoed"),
    [
        (Command.CONNECT, False, leg3_stack(4, 2, b"\x02\x00"), MultipathOption),
        (Command.CONNECT, False, leg3_stack(4, 1, b"\x00\x00"), TFOOption),
        (Command.CONNECT, True, leg3_stack(1, 2, b"\x02\x00"), HappyEyeballsOption),
        (Command.CONNECT, False, leg3_stack(5, 1, b"\x02\x00"), None),  # UDP Error: UDP only
        (Command.BIND, False, leg3_stack(4, 3, b"\x00\x05"), ListenBacklogOption),
    ],
    ids=["multipath", "tfo", "happy-eyeballs", "udp-error", "listen-backlog"],
)
async def test_remote_only_stack_option_with_leg_both(
    command: Command, atyp_name: bool, option: bytes, echoed: type[Option] | None
) -> None:
    """STK-01 / D9: a Stack option that only exists for the proxy-remote leg (Multipath,
    TFO, Happy Eyeballs, Listen Backlog, UDP Error) but arrives with Leg 3 (both legs) is
    applied to the proxy-remote leg and echoed there with Leg 2 (or ignored where it does
    not belong); it used to raise KeyError inside the proxy, which answered General Failure."""
    async with Sink() as sink, running_server(make_config()) as server:
        if command == Command.BIND:
            head = struct.pack(">BBHHBB", 6, command, len(option), 0, 0, AddressType.IPV4) + bytes(4)
        elif atyp_name:
            name = b"\x09localhost\x00\x00"  # D2: the address field padded to 12 bytes
            head = (
                struct.pack(">BBHHBB", 6, command, len(option), sink.address[1], 0, AddressType.DOMAIN_NAME)
                + name
            )
        else:
            addr = socket.inet_aton(sink.address[0])
            head = (
                struct.pack(">BBHHBB", 6, command, len(option), sink.address[1], 0, AddressType.IPV4) + addr
            )
        client = await RawClient.connect(server.addresses[0])
        await client.send(head + option)
        assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
        reply = await client.operation_reply()
        assert reply.reply_code == ReplyCode.SUCCESS
        stack = [o for o in reply.options if not isinstance(o, SessionID)]
        if echoed is None:
            assert stack == []
        else:
            assert [type(o) for o in stack] == [echoed]
            assert stack[0].leg == StackLeg.PROXY_REMOTE  # type: ignore[attr-defined]
        await client.close()


# --- 0-RTT username/password: only NUL padding after the RFC 1929 request (AUTH-05) -----


@pytest.mark.conformance("AUTH-01", "AUTH-05")
@pytest.mark.parametrize(
    ("tail", "accepted"),
    [(b"", True), (b"\0\0\0\0\0", True), (b"\x01\x02\x03\x04\x05", False), (b"\0\0x", False)],
    ids=["minimal-padding", "extra-nul-padding", "junk", "junk-after-nul"],
)
async def test_auth_data_only_nul_padding_after_userpass_request(tail: bytes, accepted: bool) -> None:
    """AUTH-05 / AUTH-01: in the Authentication Data option (method 2) the RFC 1929 request
    may only be followed by NUL padding (figure "Password authentication via a SOCKS
    Option"). Valid credentials followed by other bytes make the option malformed: the
    Authentication Reply is Type 1 with the RFC 1929 failure status and No Acceptable
    Methods, then a close, instead of authenticating as before."""
    data = b"\x02" + b"\x01\x05alice\x06secret" + tail
    data += b"\0" * (-len(data) % 4)
    option = struct.pack(">HH", 4, 4 + len(data)) + data
    async with running_server(make_config(users={"alice": "secret"})) as server:
        client = await RawClient.connect(server.addresses[0])
        head = struct.pack(">BBHHBB", 6, Command.NOOP, len(option), 0, 0, AddressType.IPV4) + bytes(4)
        await client.send(head + option)
        auth = await client.auth_reply()
        if accepted:
            assert auth.type == AuthReplyType.SUCCESS
            assert (await client.operation_reply()).reply_code == ReplyCode.SUCCESS
        else:
            assert auth.type == AuthReplyType.FAILURE
            assert auth.options == (
                AuthData(AuthMethod.USERNAME_PASSWORD, b"\x01\x01\x00"),  # status 1, NUL padding
                AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),
            )
        assert await client.read_until_eof() == b""
        await client.close()


# --- Failed operations still echo the client leg's Stack options (STK-01, D9) -------------


@pytest.mark.conformance("STK-01")
@pytest.mark.parametrize("failure", ["refused", "not-allowed", "command-not-supported"])
async def test_failure_reply_echoes_client_leg_stack_options(failure: str) -> None:
    """STK-01 / D9: "MUST do so for every supported Stack option sent by the client" has no
    exception for failures. A CONNECT refused by the destination (0x05), one refused by the
    rules (0x02) and an unsupported command (0x07: UDP ASSOCIATE with ``[udp] enabled = false``) are
    answered after the client-proxy
    leg's options were applied, so the failure reply echoes them with the values applied
    (read back from the socket); the proxy-remote leg was never set up and is not echoed."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
        port = closed.getsockname()[1]
        rules: dict[str, Any] = {}
        command = Command.UDP_ASSOCIATE if failure == "command-not-supported" else Command.CONNECT
        expected = {
            "refused": ReplyCode.CONNECTION_REFUSED,
            "not-allowed": ReplyCode.NOT_ALLOWED_BY_RULESET,
            "command-not-supported": ReplyCode.COMMAND_NOT_SUPPORTED,
        }[failure]
        if failure == "not-allowed":
            rules = {"rules": [{"action": "deny", "destinations": ["127.0.0.0/8"]}]}
        if failure == "command-not-supported":
            rules = {"udp": {"enabled": False}}
        options = (TTLOption(StackLeg.CLIENT_PROXY, 41), TTLOption(StackLeg.PROXY_REMOTE, 33))
        data = codec.encode_request(Request(command, AddressType.IPV4, "127.0.0.1", port, options))
        async with running_server(make_config(**rules)) as server:
            client = await RawClient.connect(server.addresses[0])
            await client.send(data)
            assert (await client.auth_reply()).type == AuthReplyType.SUCCESS
            reply = await client.operation_reply()
            assert reply.reply_code == expected
            assert (reply.address_type, reply.address, reply.port) == (AddressType.IPV4, "0.0.0.0", 0)
            assert reply.options == (TTLOption(StackLeg.CLIENT_PROXY, 41),)
            await client.close()
