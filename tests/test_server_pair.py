"""The proxy's decisions, end to end in memory: `ClientConnection` against the sans-IO core.

Each test drives the project's client against `socks6fast.proto.server` through
tests/helpers_pair.py (aioquic's ``client_and_server()`` / ``transfer()``): no socket, no
loop, no thread. What the core asked the adapter to do is checked from
``io.performed`` (the actions), what went on the wire from ``io.sent`` and the client's events.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import struct

import pytest
from helpers_pair import ALICE, BIND_PEER, PROXY_LOCAL, ScriptedIO, client_and_server, make_context, transfer

from socks6fast.constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    Parity,
    ReplyCode,
    StackLeg,
    UserPassStatus,
)
from socks6fast.errors import AuthenticationError, LocalProtocolError, ProxyError, RemoteProtocolError
from socks6fast.proto import codec
from socks6fast.proto.actions import (
    ApplyClientOptions,
    Associate,
    AwaitPeer,
    CheckCredentials,
    Claim,
    Dial,
    HoldBacklog,
    Listen,
    Listening,
    OpenAssociation,
    Relay,
    Resolve,
    Send,
)
from socks6fast.proto.associations import Reservation
from socks6fast.proto.client import ClientSession, ClientState, build_request, noop_request
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    HappyEyeballsOption,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    OperationReply,
    PortParityOption,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    SessionRequest,
    TFOOption,
    TTLOption,
    UDPErrorOption,
)
from socks6fast.proto.policy import LocalAddresses, OwnListeners, Policy, Rule, parse_destination
from socks6fast.proto.server import ServerConnection, Socks5ServerConnection, reply_code_for
from socks6fast.proto.server_common import is_multicast
from socks6fast.proto.socks5 import UserPassReply, decode_userpass_reply
from socks6fast.proto.stack import AppliedLeg

#: The D14 reply: Operation Reply, General Failure, 0.0.0.0:0 (a client reads Type 1 first).
D14 = bytes.fromhex("060100000000000100000000")
USERS = {"alice": "wonderland"}


def actions(io: ScriptedIO, kind: type) -> list[object]:
    return [a for a in io.performed if isinstance(a, kind)]


def connect(host: str = "192.0.2.1", port: int = 80, **kwargs: object) -> Request:
    return build_request(Command.CONNECT, host, port, **kwargs)  # type: ignore[arg-type]


# --- CONNECT: the common path --------------------------------------------------------


@pytest.mark.conformance("CMD-01", "CMD-02", "CMD-03")
def test_connect_false_start_one_write() -> None:
    """CMD-03: data sent right after a Request without an advertisement is relayed first, in
    order; the held Authentication Reply leaves with the Operation Reply in one write."""
    client, io = client_and_server()
    io.receive(client.send(connect(), b"GET / HTTP/1.0\r\n\r\n"))
    events = transfer(client, io)
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial)
    assert (dial.address_type, dial.host, dial.port, dial.targets) == (AddressType.IPV4, "192.0.2.1", 80, ())
    assert dial.tfo_payload == b""  # CMD-02: no TFO without the option
    assert len(io.sent) == 1  # Authentication Reply + Operation Reply: one write
    assert [type(e) for e in events] == [AuthReply, OperationReply]
    reply = events[1]
    assert isinstance(reply, OperationReply)
    assert (reply.reply_code, reply.address, reply.port) == (ReplyCode.SUCCESS, *PROXY_LOCAL)
    assert io.relayed is not None and io.relayed.to_remote == b"GET / HTTP/1.0\r\n\r\n"
    assert client.state is ClientState.ESTABLISHED
    assert io.server is not None and io.server.reply_code == ReplyCode.SUCCESS


@pytest.mark.conformance("CMD-01")
@pytest.mark.parametrize("host", ["2001:db8::1", "example.test"])
def test_connect_ipv6_and_domain(host: str) -> None:
    """CMD-01: IPv6 literals are dialled directly; a name is resolved, then dialled."""
    client, io = client_and_server(io=ScriptedIO(names={"example.test": [(10, ("2001:db8::7", 80, 0, 0))]}))
    io.receive(client.send(connect(host)))
    transfer(client, io)
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial)
    if host == "example.test":
        assert [type(a) for a in io.performed[:2]] == [Resolve, Dial]
        assert dial.targets == ((10, ("2001:db8::7", 80, 0, 0)),)
    else:
        assert dial.address_type == AddressType.IPV6 and dial.targets == ()
    assert io.relayed is not None


@pytest.mark.conformance("CMD-01", "REQ-10")
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ReplyCode.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "network unreachable"), ReplyCode.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "host unreachable"), ReplyCode.HOST_UNREACHABLE),
        (TimeoutError(), ReplyCode.CONNECTION_TIMED_OUT),
        (OSError(errno.EACCES, "firewall"), ReplyCode.NOT_ALLOWED_BY_RULESET),
        (OSError(errno.EPIPE, "odd"), ReplyCode.GENERAL_FAILURE),
    ],
)
def test_connect_failure_reply_codes(error: BaseException, code: ReplyCode) -> None:
    """CMD-01: a failed connect is answered with the code for its cause, then a close that
    lingers (the reply is in flight); the client raises ProxyError with that code (REQ-10)."""
    client, io = client_and_server(io=ScriptedIO(dial_error=error))
    io.receive(client.send(connect()))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == code
    assert io.closed is not None and io.closed.linger and io.relayed is None
    assert io.server is not None and io.server.error.startswith("connect to 192.0.2.1:80")


@pytest.mark.conformance("CMD-01")
def test_unresolvable_name_is_host_unreachable() -> None:
    client, io = client_and_server()
    io.receive(client.send(connect("nowhere.test")))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == ReplyCode.HOST_UNREACHABLE
    assert not actions(io, Dial)


@pytest.mark.conformance("CMD-01")
def test_reply_code_for_negative_errno_is_host_unreachable() -> None:
    """getaddrinfo's EAI_* codes are negative: a DNS-service resolver given by a name that does
    not resolve is host unreachable (CMD-01), as a destination name would be."""
    assert reply_code_for(OSError(-2, "Name or service not known")) == ReplyCode.HOST_UNREACHABLE
    assert reply_code_for(ValueError("?")) == ReplyCode.GENERAL_FAILURE


# --- Messages and framing --------------------------------------------------------------


@pytest.mark.conformance("REQ-01")
@pytest.mark.parametrize("first", [b"\x04\x01\x00\x50", b"\x07", b"GET / HTTP/1.1\r\n"])
def test_version_mismatch_one_byte_then_close(first: bytes) -> None:
    io = ScriptedIO()
    io.receive(first)
    assert io.sent == [b"\x06"]
    assert io.closed is not None and io.closed.linger
    assert io.server is not None and io.server.protocol_name == "mismatch"


@pytest.mark.conformance("REQ-07")
def test_request_one_byte_at_a_time() -> None:
    """REQ-07: a request trickling in byte by byte gets exactly the same actions and bytes."""
    whole_client, whole = client_and_server()
    data = whole_client.send(connect("example.test", credentials=ALICE, initial_data_length=5), b"hello")
    names = {"example.test": [(2, ("192.0.2.5", 80))]}
    whole.names = names
    whole.receive(data)
    slow = ScriptedIO(names=names)
    for i in range(len(data)):
        assert slow.relayed is None
        slow.receive(data[i : i + 1])
    assert slow.performed == whole.performed
    assert slow.relayed is not None and slow.relayed.to_remote == b"hello"


@pytest.mark.conformance("REQ-08")
def test_handshake_timeout_closes_without_a_reply() -> None:
    client, io = client_and_server()
    data = client.send(connect())
    io.receive(data[:5])
    assert io.server is not None and io.server.get_timer() == 110.0
    io.expire()
    assert io.sent == [] and io.closed is not None
    assert io.server.error == "handshake timed out"


@pytest.mark.conformance("REQ-03", "REQ-08")
def test_options_over_the_cap_get_general_failure() -> None:
    """REQ-03 / D6: an Options Length over the cap is refused from the header, before any
    option byte arrives (D14 reply, then close)."""
    io = ScriptedIO(context=make_context(max_options_length=1024))
    io.receive(bytes.fromhex("0601040400500001c0000201"))  # 1028 bytes of options > 1024
    assert io.sent == [D14] and io.closed is not None


@pytest.mark.conformance("REQ-05")
def test_unparseable_request_gets_d14_general_failure() -> None:
    """D14: a malformed option (Length 3) is answered with General Failure as the very first
    bytes (a client reads it as Authentication Reply Type 1), then a close."""
    client, io = client_and_server()
    io.receive(bytes.fromhex("0601000400500001c000020100010003"))
    assert io.sent == [D14] and io.closed is not None and io.closed.linger
    assert io.server is not None and io.server.reply_code == ReplyCode.GENERAL_FAILURE


@pytest.mark.conformance("REQ-04", "REQ-10")
def test_noop() -> None:
    """REQ-04: NOOP to 0.0.0.0:0 succeeds and the connection ends; any other address is
    refused with Address Type Not Supported (D11)."""
    client, io = client_and_server()
    io.receive(client.send(noop_request()))
    transfer(client, io)
    assert client.state is ClientState.MUST_CLOSE
    assert io.closed is not None and not actions(io, Dial)
    io = ScriptedIO()  # our client refuses to send this one: raw bytes
    io.receive(bytes.fromhex("0600000000000001c0000201"))
    assert io.sent[0][:4] == b"\x06\x00\x00\x00"  # authentication first, then the refusal
    assert io.sent[0][4:6] == bytes([6, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED])


@pytest.mark.conformance("CMD-06")
def test_unsupported_commands() -> None:
    """CMD-06: UDP ASSOCIATE with UDP turned off (``[udp] enabled = false``) and an unknown
    Command Code are answered Command Not Supported after the normal Authentication Reply."""
    client, io = client_and_server(io=ScriptedIO(context=make_context(udp=False)))
    io.receive(client.send(build_request(Command.UDP_ASSOCIATE, "0.0.0.0", 0)))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == ReplyCode.COMMAND_NOT_SUPPORTED
    io = ScriptedIO()
    io.receive(bytes.fromhex("0609000000500001c0000201"))
    auth, reply = codec.decode_auth_reply(io.sent[0], 0)[0], io.sent[0][4:]
    assert auth is not None and auth.type == AuthReplyType.SUCCESS
    assert reply[1] == ReplyCode.COMMAND_NOT_SUPPORTED


@pytest.mark.conformance("CMD-06")
def test_ruleset_refusals() -> None:
    """CMD-06: a denying rule gets 0x02 and names itself in the log; with a CIDR rule, a name
    that resolves only into the network is refused too, without dialling."""
    deny = Policy([Rule(allow=False, destinations=(parse_destination("10.0.0.0/8"),))])
    io = ScriptedIO(context=make_context(policy=deny), names={"inside.test": [(2, ("10.0.0.1", 80))]})
    client, io = client_and_server(io=io)
    io.receive(client.send(connect("10.1.2.3")))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
    assert io.server is not None and io.server.error == "denied by rules[0]"
    client, io = client_and_server(io=ScriptedIO(context=io.context, names=io.names))
    io.receive(client.send(connect("inside.test")))
    with pytest.raises(ProxyError):
        transfer(client, io)
    assert actions(io, Resolve) and not actions(io, Dial)
    assert io.server is not None and "resolves only to denied addresses" in io.server.error


@pytest.mark.conformance("CMD-07")
def test_dns_service() -> None:
    """CMD-07 / D13: CONNECT to 0.0.0.0:53 goes to the configured resolver, with no Stack
    options on that leg, and the reply names 0.0.0.0:0; without one: Connection Refused."""
    io = ScriptedIO(context=make_context(dns_resolver=("127.0.0.53", 53)))
    client, io = client_and_server(io=io)
    io.receive(
        client.send(build_request(Command.CONNECT, "0.0.0.0", 53, options=(TTLOption(StackLeg.BOTH, 9),)))
    )
    events = transfer(client, io)
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial) and (dial.host, dial.port, dial.options.empty) == ("127.0.0.53", 53, True)
    reply = events[-1]
    assert isinstance(reply, OperationReply) and (reply.address, reply.port) == ("0.0.0.0", 0)
    assert reply.options == (TTLOption(StackLeg.CLIENT_PROXY, 9),)  # client leg only
    client, io = client_and_server()
    io.receive(client.send(build_request(Command.CONNECT, "0.0.0.0", 53)))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == ReplyCode.CONNECTION_REFUSED


# --- Authentication -------------------------------------------------------------------------


@pytest.mark.conformance("AUTH-01", "AUTH-05")
def test_zero_rtt_credentials() -> None:
    """AUTH-01: valid credentials in an Authentication Data option get one Type 0 reply
    carrying the RFC 1929 reply, then the Operation Reply: the client writes once."""
    client, io = client_and_server(io=ScriptedIO(context=make_context(users=USERS)))
    io.receive(client.send(connect(credentials=ALICE)))
    events = transfer(client, io)
    kinds = [type(a).__name__ for a in io.performed]
    assert kinds == ["CheckCredentials", "Send", "Dial", "Send", "Relay"]
    auth = events[0]
    assert isinstance(auth, AuthReply) and auth.type == AuthReplyType.SUCCESS
    [data] = [o for o in auth.options if isinstance(o, AuthData)]
    parsed, _ = decode_userpass_reply(data.data)
    assert parsed is not None and parsed.status == UserPassStatus.SUCCESS
    assert client.data_to_send() == b"" and client.state is ClientState.ESTABLISHED
    assert io.server is not None and io.server.user == "alice"


@pytest.mark.conformance("AUTH-05", "AUTH-03", "AUTH-06")
def test_zero_rtt_wrong_password() -> None:
    """AUTH-05: a wrong password gets Type 1 with the RFC 1929 failure and No Acceptable
    Methods; nothing is dialled and the initial data never leaves (AUTH-06)."""
    client, io = client_and_server(io=ScriptedIO(context=make_context(users=USERS)))
    bad = type(ALICE)(b"alice", b"wrong")
    io.receive(client.send(connect(credentials=bad, initial_data_length=5), b"hello"))
    with pytest.raises(AuthenticationError):
        transfer(client, io)
    auth = client.auth_replies[0]
    assert auth.type == AuthReplyType.FAILURE
    assert AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS) in auth.options
    assert not actions(io, Dial) and io.relayed is None
    assert io.server is not None and io.server.error == "authentication failed"


@pytest.mark.conformance("AUTH-02")
def test_authentication_required_without_credentials() -> None:
    client, io = client_and_server(io=ScriptedIO(context=make_context(users=USERS)))
    io.receive(client.send(connect()))
    with pytest.raises(AuthenticationError):
        transfer(client, io)
    assert client.auth_replies[0] == AuthReply(
        AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),)
    )
    assert not actions(io, CheckCredentials)


def _slow_request(initial: int = 0) -> Request:
    advert = AuthMethodAdvertisement(initial, (AuthMethod.USERNAME_PASSWORD,))
    return build_request(Command.CONNECT, "192.0.2.1", 80, options=(advert,))


@pytest.mark.conformance("AUTH-04", "AUTH-05", "AUTH-06")
def test_slow_username_password_exchange() -> None:
    """D7: Type 1 selecting method 2, the bare RFC 1929 request, its reply and exactly one
    more Authentication Reply (AUTH-04), which selects no method; the initial data read before
    the RFC 1929 request is forwarded first, once connected (AUTH-06)."""
    io = ScriptedIO(context=make_context(users=USERS))
    client, io = client_and_server(credentials=ALICE, io=io)
    io.receive(client.send(_slow_request(initial=4), b"init"))
    events = transfer(client, io)
    assert [type(e) for e in events] == [AuthReply, UserPassReply, AuthReply, OperationReply]
    first, second = events[0], events[2]
    assert isinstance(first, AuthReply) and first.options == (
        AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),
    )
    assert isinstance(second, AuthReply) and second == AuthReply(AuthReplyType.SUCCESS)
    assert io.relayed is not None and io.relayed.to_remote == b"init"


@pytest.mark.conformance("AUTH-04")
def test_slow_exchange_wrong_password() -> None:
    io = ScriptedIO(context=make_context(users=USERS))
    client, io = client_and_server(credentials=type(ALICE)(b"alice", b"nope"), io=io)
    io.receive(client.send(_slow_request()))
    with pytest.raises(AuthenticationError):
        transfer(client, io)
    # The RFC 1929 failure, then the final Type 1 without a method selection, in one write.
    assert io.sent[-1] == b"\x01\x01" + b"\x06\x01\x00\x00"
    assert io.closed is not None and not actions(io, Dial)


@pytest.mark.conformance("AUTH-07")
def test_advertisement_ignored_when_no_authentication_is_needed() -> None:
    client, io = client_and_server()
    io.receive(client.send(connect(credentials=ALICE)))
    events = transfer(client, io)
    assert not actions(io, CheckCredentials)
    assert events[0] == AuthReply(AuthReplyType.SUCCESS)


# --- BIND -----------------------------------------------------------------------------------


@pytest.mark.conformance("CMD-04")
def test_bind_two_replies_then_data() -> None:
    """CMD-04: an unspecified address binds where the client reached us; the first reply
    names the listener, the second the host that connected; then data flows."""
    client, io = client_and_server()
    io.receive(client.send(build_request(Command.BIND, "0.0.0.0", 0)))
    events = transfer(client, io)
    [listen] = actions(io, Listen)
    assert isinstance(listen, Listen) and listen.near_client and listen.backlog == 0
    kinds = [type(a).__name__ for a in io.performed]
    assert kinds == ["Listen", "Send", "AwaitPeer", "Send", "Relay"]  # the held Auth Reply goes first
    first, second = events[1], events[2]
    assert isinstance(first, OperationReply) and (first.address, first.port) == ("192.0.2.10", 5000)
    assert isinstance(second, OperationReply) and (second.address, second.port) == BIND_PEER
    assert client.state is ClientState.ESTABLISHED and io.relayed is not None


@pytest.mark.conformance("CMD-05", "SES-01")
def test_bind_backlog_held_and_claimed_in_the_session() -> None:
    """CMD-05: inside a session a Listen Backlog is granted (never longer than asked) and the
    listener stays while the first connection does; a further BIND of the session naming its
    address claims it (backlog 0 in that reply). Outside a session the reply says 0."""
    context = make_context(sessions=True)
    session = ClientSession()
    client, io = client_and_server(session=session, io=ScriptedIO(context=context))
    options = (*session.request_options(), ListenBacklogOption(StackLeg.PROXY_REMOTE, 500))
    io.receive(client.send(build_request(Command.BIND, "0.0.0.0", 0, options=options)))
    events = transfer(client, io)
    first = events[1]
    assert isinstance(first, OperationReply)
    assert ListenBacklogOption(StackLeg.PROXY_REMOTE, 128) in first.options
    assert actions(io, HoldBacklog) and io.holding and io.closed is None
    assert session.session_id is not None
    client2, io2 = client_and_server(session=session, io=ScriptedIO(context=context))
    io2.receive(
        client2.send(
            build_request(Command.BIND, first.address, first.port, options=session.request_options())
        )
    )
    events = transfer(client2, io2)
    assert actions(io2, Claim) and not actions(io2, Listen)
    claimed = events[1]
    assert isinstance(claimed, OperationReply) and claimed.options == ()
    assert io2.relayed is not None
    io.release()  # the first BIND's connection ends: so does its listener
    assert io.closed is not None and not io.closed.linger
    client3, io3 = client_and_server()
    backlog = (ListenBacklogOption(StackLeg.PROXY_REMOTE, 5),)
    io3.receive(client3.send(build_request(Command.BIND, "0.0.0.0", 0, options=backlog)))
    reply = transfer(client3, io3)[1]
    assert isinstance(reply, OperationReply)
    assert ListenBacklogOption(StackLeg.PROXY_REMOTE, 0) in reply.options


# --- Stack options ----------------------------------------------------------------------


@pytest.mark.conformance("STK-01", "STK-03")
def test_stack_options_applied_and_echoed() -> None:
    """STK-03: client-leg options are applied first, remote-leg ones with the dial; STK-01:
    the reply echoes what was applied (Leg 3 stays Leg 3 when both legs agree), and a failure
    reply echoes the client leg only."""
    options = (TTLOption(StackLeg.BOTH, 33), IPTOSOption(StackLeg.PROXY_REMOTE, 0x20))
    client, io = client_and_server()
    io.receive(client.send(connect(options=options)))
    events = transfer(client, io)
    assert isinstance(io.performed[0], ApplyClientOptions) and io.performed[0].options.ttl == 33
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial) and (dial.options.ttl, dial.options.tos) == (33, 0x20)
    reply = events[-1]
    assert isinstance(reply, OperationReply)
    assert set(reply.options) == {TTLOption(StackLeg.BOTH, 33), IPTOSOption(StackLeg.PROXY_REMOTE, 0x20)}
    client, io = client_and_server(io=ScriptedIO(dial_error=ConnectionRefusedError(errno.ECONNREFUSED, "no")))
    io.receive(client.send(connect(options=options)))
    with pytest.raises(ProxyError):
        transfer(client, io)
    assert client.operation_reply is not None
    assert client.operation_reply.options == (TTLOption(StackLeg.CLIENT_PROXY, 33),)


@pytest.mark.conformance("STK-02")
def test_duplicate_stack_options_are_refused() -> None:
    options = (TTLOption(StackLeg.BOTH, 33), TTLOption(StackLeg.PROXY_REMOTE, 9))
    client, io = client_and_server()
    io.receive(client.send(connect(options=options)))
    assert io.sent == [D14] and not actions(io, Dial)


@pytest.mark.conformance("STK-04")
@pytest.mark.parametrize("host", ["example.test", "192.0.2.1"])
def test_happy_eyeballs_only_for_names(host: str) -> None:
    happy = HappyEyeballsOption(StackLeg.PROXY_REMOTE, Availability.DESIRED)
    io = ScriptedIO(names={"example.test": [(2, ("192.0.2.5", 80)), (10, ("2001:db8::5", 80, 0, 0))]})
    client, io = client_and_server(io=io)
    io.receive(client.send(connect(host, options=(happy,))))
    reply = transfer(client, io)[-1]
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial) and isinstance(reply, OperationReply)
    if host == "example.test":
        assert dial.happy_eyeballs and happy in reply.options
    else:
        assert not dial.happy_eyeballs and not any(isinstance(o, HappyEyeballsOption) for o in reply.options)


@pytest.mark.conformance("CMD-02", "STK-06")
def test_tfo_payload_only_with_the_option() -> None:
    """CMD-02 / STK-06: with a TFO option the SYN carries at most the payload size asked for;
    the reply says how much the remote host took; the rest is relayed after."""
    client, io = client_and_server()
    io.receive(client.send(connect(options=(TFOOption(StackLeg.PROXY_REMOTE, 3),)), b"hello"))
    reply = transfer(client, io)[-1]
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial) and dial.tfo_payload == b"hel"
    assert isinstance(reply, OperationReply) and TFOOption(StackLeg.PROXY_REMOTE, 3) in reply.options
    assert io.relayed is not None and io.relayed.to_remote == b"lo"


@pytest.mark.conformance("STK-07")
@pytest.mark.parametrize("in_use", [False, True])
def test_multipath_says_whether_it_is_used(in_use: bool) -> None:
    multipath = MultipathOption(StackLeg.PROXY_REMOTE, Availability.DESIRED)
    client, io = client_and_server(io=ScriptedIO(mptcp=in_use))
    io.receive(client.send(connect(options=(multipath,))))
    reply = transfer(client, io)[-1]
    [dial] = actions(io, Dial)
    assert isinstance(dial, Dial) and dial.multipath
    expected = Availability.DESIRED if in_use else Availability.NOT_DESIRED
    assert (
        isinstance(reply, OperationReply)
        and MultipathOption(StackLeg.PROXY_REMOTE, expected) in reply.options
    )


# --- Sessions and idempotence -----------------------------------------------------------------


@pytest.mark.conformance("SES-01", "SES-02", "SES-04")
def test_session_carries_the_user_and_skips_authentication() -> None:
    """SES-01: the Session ID comes in the successful Operation Reply (D4); SES-02: inside the
    session no authentication happens and Session OK is in the Authentication Reply; SES-04:
    the session acts as the user that created it."""
    context = make_context(users=USERS, sessions=True)
    session = ClientSession()
    client, io = client_and_server(session=session, io=ScriptedIO(context=context))
    io.receive(client.send(connect(credentials=ALICE, options=session.request_options())))
    transfer(client, io)
    assert client.operation_reply is not None
    assert any(isinstance(o, SessionID) for o in client.operation_reply.options)
    client2, io2 = client_and_server(session=session, io=ScriptedIO(context=context))
    io2.receive(client2.send(connect(options=session.request_options())))
    events = transfer(client2, io2)
    assert not actions(io2, CheckCredentials)
    assert events[0] == AuthReply(AuthReplyType.SUCCESS, (SessionOK(),))
    assert io2.server is not None and io2.server.user == "alice"


@pytest.mark.conformance("SES-03")
def test_invalid_session() -> None:
    session = ClientSession()
    session.request_options()
    session.on_session_id(b"X" * 16)
    client, io = client_and_server(session=session, io=ScriptedIO(context=make_context(sessions=True)))
    io.receive(client.send(connect(options=session.request_options())))
    with pytest.raises(AuthenticationError):
        transfer(client, io)
    assert client.auth_replies == [AuthReply(AuthReplyType.FAILURE, (SessionInvalid(),))]
    assert client.session_invalid and not actions(io, Dial)


@pytest.mark.conformance("SES-05")
def test_session_teardown_then_outside_the_session() -> None:
    """SES-05: a teardown ends the session (its listeners are closed) and the request itself
    is handled outside any session: with users configured it needs credentials again."""
    context = make_context(users=USERS, sessions=True)
    session = ClientSession()
    client, io = client_and_server(session=session, io=ScriptedIO(context=context))
    io.receive(client.send(connect(credentials=ALICE, options=session.request_options())))
    transfer(client, io)
    assert context.sessions is not None and len(context.sessions) == 1
    client2, io2 = client_and_server(session=session, io=ScriptedIO(context=context))
    io2.receive(client2.send(noop_request(session.teardown_options())))
    with pytest.raises(AuthenticationError):
        transfer(client2, io2)
    assert len(context.sessions) == 0 and len(io2.ended_sessions) == 1


@pytest.mark.conformance("SES-01")
def test_failed_first_request_starts_no_session() -> None:
    """D4: the session starts with a request that succeeds; when it fails the new session is
    torn down again (and no Session ID was sent)."""
    context = make_context(sessions=True)
    session = ClientSession()
    io = ScriptedIO(context=context, dial_error=ConnectionRefusedError(errno.ECONNREFUSED, "no"))
    client, io = client_and_server(session=session, io=io)
    io.receive(client.send(connect(options=session.request_options())))
    with pytest.raises(ProxyError):
        transfer(client, io)
    assert context.sessions is not None and len(context.sessions) == 0
    assert len(io.ended_sessions) == 1 and session.session_id is None


@pytest.mark.conformance("IDM-02", "IDM-03")
def test_tokens_spent_once_before_the_request() -> None:
    """IDM-02: a window is issued once and every successful Authentication Reply of the session
    carries it; IDM-03: a token is spent before the request runs, and a replay is rejected
    (Type 1 + Idempotence Rejected) and never executed."""
    context = make_context(sessions=True)
    session = ClientSession(tokens=8)
    client, io = client_and_server(session=session, io=ScriptedIO(context=context))
    io.receive(client.send(connect(options=session.request_options())))
    events = transfer(client, io)
    auth = events[0]
    assert isinstance(auth, AuthReply) and any(isinstance(o, IdempotenceWindow) for o in auth.options)
    options = session.request_options(idempotent=True)
    client2, io2 = client_and_server(session=session, io=ScriptedIO(context=context))
    io2.receive(client2.send(connect(options=options)))
    auth2 = transfer(client2, io2)[0]
    assert isinstance(auth2, AuthReply) and IdempotenceAccepted() in auth2.options
    assert any(isinstance(o, IdempotenceWindow) for o in auth2.options)
    client3, io3 = client_and_server(session=session, io=ScriptedIO(context=context))
    io3.receive(client3.send(connect(options=options)))  # the same token again
    with pytest.raises(AuthenticationError):
        transfer(client3, io3)
    assert client3.auth_replies == [AuthReply(AuthReplyType.FAILURE, (IdempotenceRejected(),))]
    assert not actions(io3, Dial)


@pytest.mark.conformance("IDM-01")
def test_idempotence_options_outside_a_session_are_ignored() -> None:
    client, io = client_and_server(io=ScriptedIO(context=make_context(sessions=True)))
    options = (IdempotenceRequest(8), IdempotenceExpenditure(5))
    io.receive(client.send(connect(options=options)))
    events = transfer(client, io)
    assert events[0] == AuthReply(AuthReplyType.SUCCESS)
    assert io.relayed is not None


# --- SOCKS 5 on the same port (D1) ----------------------------------------------------------


def test_socks5_connect_and_timeout_code() -> None:
    """D1: a first byte of 5 is RFC 1928; a connect timeout is reported as host unreachable
    (REP stops at 0x08)."""
    io = ScriptedIO()
    io.receive(b"\x05\x01\x00" + b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50" + b"early")
    assert isinstance(io.server, Socks5ServerConnection)
    assert io.sent[0] == b"\x05\x00"
    assert io.sent[1][:2] == b"\x05\x00" and io.relayed is not None and io.relayed.to_remote == b"early"
    io = ScriptedIO(dial_error=TimeoutError())
    io.receive(b"\x05\x01\x00" + b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50")
    assert io.sent[1][1] == ReplyCode.HOST_UNREACHABLE and io.closed is not None


def test_socks5_username_password() -> None:
    io = ScriptedIO(context=make_context(users=USERS))
    io.receive(b"\x05\x01\x02")
    assert io.sent == [b"\x05\x02"]
    io.receive(b"\x01\x05alice\x05wrong")
    assert io.sent[-1] == b"\x01\x01" and io.closed is not None
    assert io.server is not None and io.server.error == "authentication failed"
    io = ScriptedIO(context=make_context(users=USERS))
    io.receive(b"\x05\x01\x00")  # no method we accept
    assert io.sent == [b"\x05\xff"] and io.closed is not None


# --- The adapter contract ---------------------------------------------------------------------


def test_completions_out_of_turn_are_refused() -> None:
    """An adapter that skips a completion, or reports one nobody asked for, is told at once."""
    io = ScriptedIO()
    conn = ServerConnection(io.context, "192.0.2.1", 0.0)
    conn.receive_data(codec.encode_request(connect()))
    assert isinstance(conn.next_action(0.0), Dial)
    with pytest.raises(LocalProtocolError):
        conn.next_action(0.0)
    with pytest.raises(LocalProtocolError):
        conn.listening(None)  # type: ignore[arg-type]


def test_client_leg_options_read_back_values_are_echoed() -> None:
    """D9: the echo carries what the kernel reports, not what was asked."""
    conn = ServerConnection(make_context(), "192.0.2.1", 0.0)
    conn.receive_data(codec.encode_request(connect(options=(TTLOption(StackLeg.CLIENT_PROXY, 200),))))
    assert isinstance(conn.next_action(0.0), ApplyClientOptions)
    conn.client_options_applied(AppliedLeg(ttl=64))
    dial = conn.next_action(0.0)
    assert isinstance(dial, Dial)
    conn.dial_failed(ConnectionRefusedError(errno.ECONNREFUSED, "no"), "refused")
    send = conn.next_action(0.0)
    reply = codec.decode_operation_reply(send.data[4:], 0)[0]  # type: ignore[union-attr]
    assert reply is not None and reply.options == (TTLOption(StackLeg.CLIENT_PROXY, 64),)


def test_a_bug_in_the_core_gets_general_failure() -> None:
    """D14 on an internal error: before any reply the D14 form, after the held Authentication
    Reply the Operation Reply (both in one write), then a close."""
    conn = ServerConnection(make_context(), "192.0.2.1", 0.0)
    conn.receive_data(codec.encode_request(connect()))
    conn.abort()
    send = conn.next_action(0.0)
    assert send.data == D14  # type: ignore[union-attr]
    conn = ServerConnection(make_context(), "192.0.2.1", 0.0)
    conn.receive_data(codec.encode_request(connect()))
    assert isinstance(conn.next_action(0.0), Dial)  # the Authentication Reply is held
    conn.abort()
    send = conn.next_action(0.0)
    assert send.data[:4] == b"\x06\x00\x00\x00" and send.data[4:] == D14  # type: ignore[union-attr]


def test_remote_protocol_error_is_not_raised_to_the_adapter() -> None:
    """The core answers protocol errors itself (D14) instead of raising them."""
    conn = ServerConnection(make_context(), "192.0.2.1", 0.0)
    conn.receive_data(b"\x06\x01\x00\x04\x00\x50\x00\x01\xc0\x00\x02\x01\x00\x01\x00\x03")
    try:
        conn.next_action(0.0)
    except RemoteProtocolError:  # pragma: no cover - the failure this test guards against
        pytest.fail("the core raised instead of answering")


@pytest.mark.conformance("CMD-04", "CMD-03")
def test_bind_early_data_waits_for_the_peer() -> None:
    """What the client sends while the proxy waits for the BIND peer is relayed to the peer
    once it connected, first and in order."""
    conn = ServerConnection(make_context(), "192.0.2.1", 0.0)
    conn.receive_data(codec.encode_request(build_request(Command.BIND, "0.0.0.0", 0)))
    assert isinstance(conn.next_action(0.0), Listen)
    conn.listening(Listening(("192.0.2.10", 5000), None, False, False))
    assert isinstance(conn.next_action(0.0), Send)
    assert isinstance(conn.next_action(0.0), AwaitPeer)
    conn.receive_data(b"ear")
    conn.receive_data(b"ly")
    conn.peer_accepted(*BIND_PEER, False)
    assert isinstance(conn.next_action(0.0), Send)
    relay = conn.next_action(0.0)
    assert isinstance(relay, Relay) and relay.to_remote == b"early"


# --- Where a connection may go (CMD-06, issue 12) --------------------------------------------


@pytest.mark.conformance("CMD-06")
def test_connect_into_our_own_listener_is_refused() -> None:
    """A CONNECT that would loop back into one of the proxy's listeners is refused whatever the
    rules say, as a literal and as a name resolving only there; other addresses of the name
    are still dialled."""
    own = OwnListeners([("127.0.0.1", 1080)], LocalAddresses())
    context = make_context()
    context.own_listeners = own
    names = {
        "self.test": [(2, ("127.0.0.1", 1080))],
        "both.test": [(2, ("127.0.0.1", 1080)), (2, ("192.0.2.9", 1080))],
    }
    for host, dialled in (
        ("127.0.0.1", None),
        ("0.0.0.0", None),
        ("self.test", None),
        ("both.test", ("192.0.2.9", 1080)),
    ):
        client, io = client_and_server(io=ScriptedIO(context=context, names=names))
        io.receive(client.send(connect(host, 1080)))
        if dialled is None:
            with pytest.raises(ProxyError) as info:
                transfer(client, io)
            assert info.value.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
            assert io.server is not None and io.server.error.startswith("loop refused: ")
            assert not actions(io, Dial)
        else:
            transfer(client, io)
            [dial] = actions(io, Dial)
            assert isinstance(dial, Dial) and dial.targets == ((2, dialled),)


@pytest.mark.conformance("CMD-06", "CMD-04")
def test_bind_peer_checked_by_the_rules() -> None:
    """A BIND's peer is known only when it connects: the rules see it then, and a refused peer
    gets a failure as the second reply (no Stack-option echo), never data."""
    deny = Policy(
        [
            Rule(
                allow=False,
                commands=frozenset({Command.BIND}),
                destinations=(parse_destination("198.51.100.0/24"),),
            )
        ]
    )
    client, io = client_and_server(io=ScriptedIO(context=make_context(policy=deny)))
    io.receive(client.send(build_request(Command.BIND, "0.0.0.0", 0)))
    with pytest.raises(ProxyError) as info:
        transfer(client, io)
    assert info.value.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
    assert io.relayed is None and io.closed is not None
    assert (
        io.server is not None
        and io.server.error == f"BIND peer {BIND_PEER[0]}:{BIND_PEER[1]} denied by rules[0]"
    )


@pytest.mark.conformance("CMD-07", "CMD-06")
def test_dns_service_is_checked_as_written() -> None:
    """D13: the DNS service request (0.0.0.0:53) is matched by the rules as written, not as a
    connection to this host (which a rule denying @local would otherwise refuse)."""
    deny_local = Policy([Rule(allow=False, destinations=(parse_destination("127.0.0.0/8"),))])
    io = ScriptedIO(context=make_context(policy=deny_local, dns_resolver=("192.0.2.53", 53)))
    client, io = client_and_server(io=io)
    io.receive(client.send(build_request(Command.CONNECT, "0.0.0.0", 53)))
    transfer(client, io)
    assert io.relayed is not None
    client, io = client_and_server(io=ScriptedIO(context=io.context))
    io.receive(client.send(connect("0.0.0.0", 80)))  # 0.0.0.0 is this host: refused
    with pytest.raises(ProxyError):
        transfer(client, io)


def test_every_failure_names_its_cause() -> None:
    """The log line of a refused or failed request says why (issue 12)."""
    cases = [
        (build_request(Command.UDP_ASSOCIATE, "x.test", 0), "UDP ASSOCIATE to a domain name"),
        (build_request(Command.CONNECT, "0.0.0.0", 53), "DNS service: no server.dns_resolver configured"),
        (build_request(Command.BIND, "x.test", 0), "BIND to a domain name is not supported"),
        (connect("nowhere.test"), "cannot resolve 'nowhere.test'"),
    ]
    for request, cause in cases:
        client, io = client_and_server()
        io.receive(client.send(request))
        with pytest.raises(ProxyError):
            transfer(client, io)
        assert io.server is not None and cause in io.server.error, (cause, io.server.error)
    io = ScriptedIO(context=make_context(dns_resolver=("192.0.2.53", 53)), dial_error=TimeoutError())
    client, io = client_and_server(io=io)
    io.receive(client.send(build_request(Command.CONNECT, "0.0.0.0", 53)))
    with pytest.raises(ProxyError):
        transfer(client, io)
    assert io.server is not None and io.server.error.startswith("DNS service: connect to 192.0.2.53:53")


# --- UDP ASSOCIATE (section "Handling UDP ASSOCIATE") ------------------------------------


def udp_request(host: str = "0.0.0.0", port: int = 0, *options: object) -> bytes:
    kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
    return codec.encode_request(Request(Command.UDP_ASSOCIATE, kind, host, port, tuple(options)))  # type: ignore[arg-type]


def associated(io: ScriptedIO) -> tuple[Associate, AuthReply, OperationReply]:
    """The hand-off to the UDP data plane and the replies it writes first (UDP-01)."""
    association = io.associated
    assert association is not None and io.sent == [], "the data plane writes the replies"
    data = association.send
    auth, n = codec.decode_auth_reply(data)
    reply, m = codec.decode_operation_reply(data, n)
    assert auth is not None and reply is not None
    assert data[n + m :] == bytes.fromhex("0601000c") + association.association_id  # UDP-01
    return association, auth, reply


@pytest.mark.conformance("UDP-01", "STK-01", "UDP-09")
def test_udp_associate_hands_over_with_reply_and_initialization() -> None:
    """UDP-01: the core opens the sockets near the client (the request named no address),
    then hands the connection to the UDP data plane with the Operation Reply naming the
    remote-facing socket and the Association Initialization (random 8-byte ID) to write, and
    the bytes the client sent after its request; the UDP leg's options are echoed as
    applied and the UDP Error option as "will be performed" (STK-01, D9, UDP-09)."""
    io = ScriptedIO()
    options = (
        TTLOption(StackLeg.PROXY_REMOTE, 7),
        UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    )
    io.receive(udp_request("0.0.0.0", 0, *options) + b"\x06\x03\x00")
    [opened] = actions(io, OpenAssociation)
    assert isinstance(opened, OpenAssociation) and opened.near_client and opened.options.ttl == 7
    association, auth, reply = associated(io)
    assert auth.type == AuthReplyType.SUCCESS
    assert (reply.reply_code, reply.address, reply.port) == (ReplyCode.SUCCESS, "192.0.2.10", 6000)
    assert set(reply.options) == set(options)
    assert association.pending == b"\x06\x03\x00" and association.udp_error and not association.socks5
    assert len(association.association_id) == 8
    other = ScriptedIO(context=io.context)
    other.receive(udp_request())
    assert associated(other)[0].association_id != association.association_id
    table = io.context.associations
    assert table is not None and len(table) == 2 and association.association_id in table
    assert io.server is not None
    io.server.connection_ended(io.now)  # UDP-07: the association ends with its connection
    assert len(table) == 1 and association.association_id not in table


@pytest.mark.conformance("UDP-09")
def test_udp_error_not_asked_is_not_performed() -> None:
    """UDP-09: without the option the data plane is told not to report ICMP errors; with
    "not desired" the echo says "will not be performed"."""
    io = ScriptedIO()
    io.receive(udp_request())
    association, _, reply = associated(io)
    assert not association.udp_error and reply.options == ()
    io = ScriptedIO()
    io.receive(udp_request("0.0.0.0", 0, UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED)))
    association, _, reply = associated(io)
    assert not association.udp_error
    assert reply.options == (UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED),)


def test_udp_associate_limits_and_refusals() -> None:
    """Over ``udp.max_associations_per_client`` a request gets General Failure naming the
    setting; a domain name as bind address is Address Type Not Supported; with UDP turned off,
    Command Not Supported."""
    context = make_context(max_associations_per_client=1)
    first = ScriptedIO(context=context)
    first.receive(udp_request())
    associated(first)
    second = ScriptedIO(context=context)
    second.receive(udp_request())
    assert second.server is not None and second.server.reply_code == ReplyCode.GENERAL_FAILURE
    assert "udp.max_associations_per_client" in second.server.error
    assert first.server is not None
    first.server.connection_ended(first.now)
    third = ScriptedIO(context=context)
    third.receive(udp_request())
    associated(third)
    io = ScriptedIO()
    io.receive(codec.encode_request(Request(Command.UDP_ASSOCIATE, AddressType.DOMAIN_NAME, "x.test", 0)))
    assert io.server is not None and io.server.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


def _session_id(reply: OperationReply) -> bytes:
    [found] = [o for o in reply.options if isinstance(o, SessionID)]
    return found.session_id


@pytest.mark.conformance("STK-08")
def test_port_parity_reservation_and_claims() -> None:
    """STK-08: with port 0 the parity is asked for and echoed as obtained, the counterpart is
    reserved (the adapter's handle kept in the table); a request naming another port
    ignores the parity (echo: no parity, no reservation). The reserved port is claimed only
    by an explicit request from the same session; one from outside the session is refused;
    the reservation ends with the original association."""
    context = make_context(sessions=True)
    parity = PortParityOption(StackLeg.PROXY_REMOTE, Parity.ODD, True)
    first = ScriptedIO(context=context)
    first.receive(udp_request("0.0.0.0", 0, parity, SessionRequest()))
    [opened] = actions(first, OpenAssociation)
    assert isinstance(opened, OpenAssociation) and (opened.parity, opened.reserve) == (Parity.ODD, True)
    _, _, reply = associated(first)
    assert reply.port % 2 == 1
    assert PortParityOption(StackLeg.PROXY_REMOTE, Parity.ODD, True) in reply.options
    table = context.associations
    assert table is not None
    reservation = table.reservation(4, reply.port - 1)
    assert reservation is not None
    session = _session_id(reply)
    # From outside the session: refused.
    outsider = ScriptedIO(context=context)
    outsider.receive(udp_request("0.0.0.0", reply.port - 1))
    assert outsider.server is not None and outsider.server.reply_code == ReplyCode.GENERAL_FAILURE
    assert "reserved" in outsider.server.error
    # Parity with a named port: ignored.
    ignored = ScriptedIO(context=context)
    ignored.receive(udp_request("0.0.0.0", 7001, parity))
    [plain] = actions(ignored, OpenAssociation)
    assert isinstance(plain, OpenAssociation) and (plain.parity, plain.reserve) == (0, False)
    assert PortParityOption(StackLeg.PROXY_REMOTE, Parity.NONE, False) in associated(ignored)[2].options
    # From the same session, naming the port: the reserved socket is handed over.
    member = ScriptedIO(context=context)
    member.receive(udp_request("0.0.0.0", reply.port - 1, SessionID(session)))
    [claim] = actions(member, OpenAssociation)
    assert isinstance(claim, OpenAssociation) and claim.claim is reservation.handle
    associated(member)
    assert table.reservation(4, reply.port - 1) is None
    # A second reservation ends with its association (UDP-07, STK-08).
    again = ScriptedIO(context=context)
    again.receive(udp_request("0.0.0.0", 0, parity))
    _, _, reply2 = associated(again)
    assert table.reservation(4, reply2.port - 1) is not None
    assert again.server is not None
    again.server.connection_ended(again.now)
    assert table.reservation(4, reply2.port - 1) is None
    assert [r.port for r in again.server.released] == [reply2.port - 1]


def test_socks5_udp_associate() -> None:
    """D19: SOCKS 5 UDP ASSOCIATE opens a client-facing socket near the client; BND names it;
    the data plane accepts datagrams only from the TCP client's address and DST.PORT."""
    io = ScriptedIO()
    io.receive(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(4) + struct.pack(">H", 5353))
    [opened] = actions(io, OpenAssociation)
    assert isinstance(opened, OpenAssociation) and opened.socks5 and opened.near_client
    association = io.associated
    assert association is not None and association.socks5
    assert io.sent == [b"\x05\x00"]  # the method selection; the reply goes with the data plane
    assert association.send == b"\x05\x00\x00\x01" + bytes([192, 0, 2, 10]) + struct.pack(">H", 7000)
    assert (association.client_address, association.client_port) == (io.client_ip, 5353)


@pytest.mark.conformance("UDP-08")
@pytest.mark.parametrize("command", [Command.CONNECT, Command.BIND])
def test_multicast_only_for_udp(command: Command) -> None:
    """UDP-08: "The use of multicast addresses is permitted for UDP traffic only": a CONNECT
    or BIND naming a multicast address, or a name resolving only to one, is refused."""
    for host in ("224.0.0.251", "ff02::fb"):
        io = ScriptedIO()
        io.receive(
            codec.encode_request(
                Request(command, AddressType.IPV6 if ":" in host else AddressType.IPV4, host, 5353)
            )
        )
        assert io.server is not None and io.server.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        assert "UDP-08" in io.server.error and not actions(io, Dial)
    io = ScriptedIO(names={"mdns.test": [(2, ("224.0.0.251", 5353))]})
    io.receive(codec.encode_request(Request(Command.CONNECT, AddressType.DOMAIN_NAME, "mdns.test", 5353)))
    assert io.server is not None and io.server.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
    assert not actions(io, Dial)


@pytest.mark.conformance("STK-01")
def test_udp_associate_claims_no_client_leg_options() -> None:
    """STK-01 / D22: "In case of UDP ASSOCIATE, the stack options refer to the UDP traffic
    relayed by the proxy". Client-proxy leg TOS/TTL reach the TCP connection only, not the
    shared UDP port that sends the client its datagrams, so the reply does not claim them;
    the proxy-remote leg of a Leg 3 option is echoed as applied there (Leg 2)."""
    options = (IPTOSOption(StackLeg.CLIENT_PROXY, 0x28), TTLOption(StackLeg.BOTH, 33))
    io = ScriptedIO()
    io.receive(udp_request("0.0.0.0", 0, *options))
    [opened] = actions(io, OpenAssociation)
    assert isinstance(opened, OpenAssociation) and opened.options.ttl == 33
    _, _, reply = associated(io)
    assert reply.reply_code == ReplyCode.SUCCESS
    assert reply.options == (TTLOption(StackLeg.PROXY_REMOTE, 33),)


@pytest.mark.conformance("UDP-08")
def test_udp_associate_multicast_bind_address_refused() -> None:
    """UDP-08 / D23: multicast is for UDP traffic, but a multicast *bind* address would need
    the proxy to join the group; it is refused (0x02) instead of a Success for an association
    that could never receive. SOCKS 5 BIND naming a multicast peer is refused as in SOCKS 6."""
    for host in ("239.1.2.4", "ff05::1:3"):
        io = ScriptedIO()
        io.receive(udp_request(host, 0))
        assert io.server is not None and io.server.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
        assert "multicast" in io.server.error and not actions(io, OpenAssociation)
    io = ScriptedIO()
    io.receive(b"\x05\x01\x00" + b"\x05\x02\x00\x01" + bytes([239, 1, 2, 3]) + struct.pack(">H", 5353))
    assert io.server is not None and io.server.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
    assert "UDP-08" in io.server.error and not actions(io, Listen)


def test_udp_associate_per_user_limit() -> None:
    """``udp.max_associations_per_user``: counted per authenticated user across client
    addresses; over it, General Failure naming the setting."""
    context = make_context(users=USERS)
    assert context.associations is not None
    context.associations.max_per_user = 1
    credentials = AuthData(AuthMethod.USERNAME_PASSWORD, b"\x01\x05alice\x0awonderland")
    first = ScriptedIO(context=context, client_ip="192.0.2.1")
    first.receive(udp_request("0.0.0.0", 0, credentials))
    associated(first)
    second = ScriptedIO(context=context, client_ip="192.0.2.2")
    second.receive(udp_request("0.0.0.0", 0, credentials))
    assert second.server is not None and second.server.reply_code == ReplyCode.GENERAL_FAILURE
    assert "udp.max_associations_per_user" in second.server.error


@pytest.mark.conformance("STK-08")
def test_reserved_port_claimed_across_families_when_no_address_is_named() -> None:
    """STK-08: the original association was bound near the client (IPv6 here); a claim that
    names port P with the unspecified IPv4 address (no particular address) still finds the
    reservation of P, and the reservation's socket is handed over."""
    context = make_context()
    table = context.associations
    assert table is not None
    handle = object()
    table.reserve(Reservation(6, 6001, handle, b"\x00" * 8, None))
    io = ScriptedIO(context=context)
    io.receive(udp_request("0.0.0.0", 6001))
    [claim] = actions(io, OpenAssociation)
    assert isinstance(claim, OpenAssociation) and claim.claim is handle
    assert table.reservation(6, 6001) is None


@pytest.mark.conformance("UDP-08")
def test_is_multicast_matches_ipaddress() -> None:
    """`is_multicast` reads the text (it runs on every CONNECT); it agrees with ``ipaddress``
    on every kind of address, IPv4-mapped IPv6 included (UDP-08)."""
    rng = random.Random(10)
    samples = [
        "224.0.0.0",
        "239.255.255.255",
        "223.255.255.255",
        "240.0.0.0",
        "ff00::",
        "feff::1",
        "::ffff:230.1.2.3",
    ]
    samples += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2000)]
    samples += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(1000)]
    samples += [str(ipaddress.IPv6Address((0xFF << 120) | rng.getrandbits(120))) for _ in range(100)]
    samples += [f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}" for _ in range(500)]
    for text in samples:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        kind = AddressType.IPV6 if ":" in text else AddressType.IPV4
        assert is_multicast(kind, text) == address.is_multicast, text
    assert not is_multicast(AddressType.DOMAIN_NAME, "224.0.0.1")


@pytest.mark.parametrize("command", [Command.BIND, Command.UDP_ASSOCIATE])
def test_low_bind_port_refused(command: Command) -> None:
    """D25: a SOCKS 6 BIND or UDP ASSOCIATE naming a port below ``min_bind_port`` (1024 by
    default) is refused with 0x02 before anything is bound; port 0 and ports at the floor
    are allowed, and lowering the floor to 1 allows every port."""
    for port, floor, refused in (
        (22, 1024, True),
        (1023, 1024, True),
        (1024, 1024, False),
        (0, 1024, False),
        (22, 1, False),
    ):
        context = make_context()
        context.min_bind_port = floor
        io = ScriptedIO(context=context)
        io.receive(codec.encode_request(Request(command, AddressType.IPV4, "0.0.0.0", port)))
        opened = actions(io, OpenAssociation if command == Command.UDP_ASSOCIATE else Listen)
        assert io.server is not None
        if refused:
            assert io.server.reply_code == ReplyCode.NOT_ALLOWED_BY_RULESET
            assert "min_bind_port" in io.server.error and not opened
        else:
            assert opened, (port, floor)
