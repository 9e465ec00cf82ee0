"""Sans-IO tests of the proxy side's message level (`socks6fast.proto.server_wire`): scripted
byte chunks in, events and bytes out. The decisions on top are tested in test_server_pair.py.

No sockets here (STYLE.md section 7): the peer is a list of byte chunks, and replies are
checked as bytes annotated field by field.
"""

from __future__ import annotations

import pytest

from socks6fast.constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    ReplyCode,
    Socks5Command,
    StackLeg,
    UserPassStatus,
)
from socks6fast.errors import LocalProtocolError, RemoteProtocolError
from socks6fast.proto import codec
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    HappyEyeballsOption,
    IdempotenceExpenditure,
    IdempotenceRequest,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    NoFragmentationOption,
    OperationReply,
    Option,
    Request,
    SessionID,
    SessionRequest,
    SessionTeardown,
    TFOOption,
    TTLOption,
    UnknownStackOption,
    VersionMismatchReply,
)
from socks6fast.proto.server import detect_protocol, is_dns_request, noop_address_ok
from socks6fast.proto.server_wire import (
    ConnectionClosed,
    InitialData,
    RequestReceived,
    ServerWire,
    Socks5ServerWire,
    VersionMismatch,
    failure_reply,
    parse_request_options,
)
from socks6fast.proto.socks5 import (
    Socks5Greeting,
    Socks5MethodSelection,
    Socks5Reply,
    Socks5Request,
    UserPassReply,
    UserPassRequest,
    encode_userpass_request,
)
from socks6fast.proto.stack import plan_stack_options
from socks6fast.proto.states import NEED_DATA, PAUSED, Protocol, State

SUCCESS = OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 4242)


def wire(
    command: Command = Command.CONNECT, *options: Option, host: str = "127.0.0.1", port: int = 80
) -> bytes:
    address_type = AddressType.IPV6 if ":" in host else AddressType.IPV4
    if not host.replace(".", "").replace(":", "").isdigit() and ":" not in host:
        address_type = AddressType.DOMAIN_NAME
    return codec.encode_request(Request(command, address_type, host, port, tuple(options)))


def events(conn: ServerWire | Socks5ServerWire) -> list[object]:
    """Every event available now, up to NEED_DATA or PAUSED (included)."""
    out: list[object] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
            return out


def feed(conn: ServerWire | Socks5ServerWire, data: bytes, chunk: int) -> list[object]:
    """Feed ``data`` in chunks of ``chunk`` bytes; return the events, NEED_DATA dropped."""
    out: list[object] = []
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        out += [e for e in events(conn) if e is not NEED_DATA]
    return out


# --- SOCKS 6 ---------------------------------------------------------------------------------


@pytest.mark.conformance("REQ-07")
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_request_incremental(chunk: int) -> None:
    """REQ-07: the same events whether the Request arrives byte by byte or whole."""
    data = wire(Command.CONNECT, TTLOption(StackLeg.PROXY_REMOTE, 9), host="example.com", port=443) + b"early"
    conn = ServerWire()
    got = feed(conn, data, chunk)
    assert isinstance(got[0], RequestReceived)
    assert got[0].request.address == "example.com" and got[0].request.port == 443
    assert got[0].options.stack.remote.ttl == 9
    assert got[-1] is PAUSED
    # No advertisement: whatever follows is application data (false start, CMD-03).
    assert conn.their_state is State.DATA
    assert conn.trailing_data == (b"early", False)


@pytest.mark.conformance("REQ-01")
def test_version_mismatch() -> None:
    """REQ-01, D1: a first byte other than 6 gives VersionMismatch; the reply is b"\\x06"."""
    conn = ServerWire()
    conn.receive_data(b"\x04\x01")
    event = conn.next_event()
    assert event == VersionMismatch(4)
    assert conn.send(VersionMismatchReply()) == b"\x06"
    assert conn.our_state is State.MUST_CLOSE
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_detect_protocol() -> None:
    """D1: 6 is SOCKS 6, 5 SOCKS 5, anything else a mismatch."""
    assert detect_protocol(6) is Protocol.SOCKS6
    assert detect_protocol(5) is Protocol.SOCKS5
    assert detect_protocol(4) is None and detect_protocol(0x47) is None


@pytest.mark.conformance("REQ-03")
def test_options_length_cap_from_header() -> None:
    """REQ-03 (D6): an Options Length over the cap fails as soon as bytes 2-3 arrive."""
    conn = ServerWire(max_options_length=1024)
    conn.receive_data(bytes([6, Command.CONNECT, 0x04, 0x04]))  # 1028 bytes of options announced
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply_code == ReplyCode.GENERAL_FAILURE
    # D14: the failure Operation Reply may still be sent, then the connection closes.
    data = conn.send(failure_reply(ReplyCode.GENERAL_FAILURE))
    #              ver  code  optlen  port  pad  atyp  0.0.0.0
    assert data == b"\x06\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00"
    assert conn.our_state is State.MUST_CLOSE


@pytest.mark.conformance("CMD-06")
def test_unknown_command_reply_code() -> None:
    """CMD-06: an unknown Command Code is a parseable Request (the command a plain int): the
    proxy authenticates as usual, then answers Command Not Supported in the Operation Reply."""
    conn = ServerWire()
    conn.receive_data(bytes.fromhex("0609000055f000017f000001"))
    event = conn.next_event()
    assert isinstance(event, RequestReceived)
    assert event.request.command == 9 and not isinstance(event.request.command, Command)
    assert conn.send(AuthReply(AuthReplyType.SUCCESS)) == b"\x06\x00\x00\x00"
    data = conn.send(failure_reply(ReplyCode.COMMAND_NOT_SUPPORTED))
    assert data[:2] == b"\x06\x07"


def test_eof_between_and_inside_messages() -> None:
    """EOF before any byte is a clean close; EOF inside a Request is an error without a reply."""
    conn = ServerWire()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    conn = ServerWire()
    conn.receive_data(wire()[:5])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply_code is None
    with pytest.raises(RuntimeError):
        conn.receive_data(b"more")


@pytest.mark.conformance("REQ-08")
def test_handshake_timer() -> None:
    """REQ-08: the handshake timer runs while client bytes are awaited and fires once due."""
    conn = ServerWire(handshake_timeout=10.0, now=100.0)
    assert conn.get_timer() == 110.0
    conn.handle_timer(109.0)  # not yet
    with pytest.raises(RemoteProtocolError) as info:
        conn.handle_timer(110.0)
    assert info.value.reply_code is None
    assert conn.their_state is State.ERROR
    conn = ServerWire(handshake_timeout=10.0, now=0.0)
    conn.receive_data(wire())
    assert isinstance(conn.next_event(), RequestReceived)
    assert conn.get_timer() is None  # nothing more is awaited from the client


@pytest.mark.conformance("AUTH-01")
def test_fast_path_sequence() -> None:
    """AUTH-01: Request -> Authentication Reply (Type 0) -> Operation Reply -> relay."""
    conn = ServerWire()
    conn.receive_data(wire())
    assert isinstance(conn.next_event(), RequestReceived)
    with pytest.raises(LocalProtocolError):
        conn.send(SUCCESS)  # the Authentication Reply comes first
    #                                             ver type optlen
    assert conn.send(AuthReply(AuthReplyType.SUCCESS)) == b"\x06\x00\x00\x00"
    assert conn.send(SUCCESS)[:2] == b"\x06\x00"
    assert conn.our_state is State.RELAY
    with pytest.raises(LocalProtocolError):
        conn.send(SUCCESS)


@pytest.mark.conformance("AUTH-04", "AUTH-05", "AUTH-06")
def test_slow_username_password_sequence() -> None:
    """AUTH-04, AUTH-06, D7: Request, initial data, Type 1 selecting method 2, the bare RFC 1929
    request, its reply, and one final Authentication Reply that may not select a method."""
    advert = AuthMethodAdvertisement(4, (AuthMethod.USERNAME_PASSWORD,))
    userpass = encode_userpass_request(UserPassRequest(b"alice", b"pw"))
    conn = ServerWire()
    conn.receive_data(wire(Command.CONNECT, advert) + b"init")
    received = conn.next_event()
    assert isinstance(received, RequestReceived) and received.options.initial_data_length == 4
    assert conn.send(AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),)))
    assert conn.next_event() == InitialData(b"init")
    assert conn.next_event() is NEED_DATA  # now the RFC 1929 request is expected
    for byte in userpass:
        conn.receive_data(bytes([byte]))
    assert conn.next_event() == UserPassRequest(b"alice", b"pw")
    assert conn.next_event() is PAUSED
    assert conn.send(UserPassReply(UserPassStatus.SUCCESS)) == b"\x01\x00"
    with pytest.raises(LocalProtocolError):
        conn.send(AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),)))
    conn.send(AuthReply(AuthReplyType.SUCCESS))
    assert conn.their_state is State.DATA
    conn.send(SUCCESS)
    assert conn.our_state is State.RELAY


@pytest.mark.conformance("AUTH-06", "AUTH-07")
def test_initial_data_read_after_success_reply() -> None:
    """AUTH-06, AUTH-07: when authentication succeeds at once, the initial data is still read
    (it follows the Request), and only then does the stream become application data."""
    conn = ServerWire()
    conn.receive_data(wire(Command.CONNECT, AuthMethodAdvertisement(3, (2,))) + b"abcdef")
    assert isinstance(conn.next_event(), RequestReceived)
    conn.send(AuthReply(AuthReplyType.SUCCESS))
    assert conn.next_event() == InitialData(b"abc")
    assert conn.next_event() is PAUSED
    assert conn.trailing_data == (b"def", False)


def test_failure_replies_end_the_connection() -> None:
    """The proxy's side of a dead end: Type 1 without a method that can continue ends the
    connection; so does a failed Operation Reply."""
    conn = ServerWire()
    conn.receive_data(wire())
    conn.next_event()
    conn.send(AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),)))
    assert conn.our_state is State.MUST_CLOSE
    conn = ServerWire()
    conn.receive_data(wire())
    conn.next_event()
    conn.send(AuthReply(AuthReplyType.SUCCESS))
    conn.send(failure_reply(ReplyCode.CONNECTION_REFUSED))
    assert conn.our_state is State.MUST_CLOSE


@pytest.mark.conformance("CMD-04")
def test_bind_needs_two_replies_noop_one() -> None:
    """CMD-04: BIND gets two Operation Replies before relaying; NOOP one, then close."""
    conn = ServerWire()
    conn.receive_data(wire(Command.BIND, host="0.0.0.0", port=0))
    conn.next_event()
    conn.send(AuthReply(AuthReplyType.SUCCESS))
    conn.send(SUCCESS)
    assert conn.our_state is State.SEND_BIND_REPLY
    conn.send(SUCCESS)
    assert conn.our_state in (State.RELAY,)  # (mypy narrowed the property above)
    conn = ServerWire()
    conn.receive_data(wire(Command.NOOP, host="0.0.0.0", port=0))
    conn.next_event()
    conn.send(AuthReply(AuthReplyType.SUCCESS))
    conn.send(SUCCESS)
    assert conn.our_state is State.MUST_CLOSE


@pytest.mark.conformance("CMD-07", "REQ-04")
def test_noop_address_and_dns_requests() -> None:
    """REQ-04 (D11) and CMD-07 (D13) classifications."""

    def request(command: Command, address_type: AddressType, address: str, port: int) -> Request:
        return Request(command, address_type, address, port)

    assert noop_address_ok(request(Command.NOOP, AddressType.IPV4, "0.0.0.0", 0))
    assert noop_address_ok(request(Command.NOOP, AddressType.IPV6, "::", 0))
    assert not noop_address_ok(request(Command.NOOP, AddressType.IPV4, "0.0.0.1", 0))
    assert not noop_address_ok(request(Command.NOOP, AddressType.IPV4, "0.0.0.0", 1))
    assert not noop_address_ok(request(Command.NOOP, AddressType.DOMAIN_NAME, "a", 0))
    assert is_dns_request(request(Command.CONNECT, AddressType.IPV4, "0.0.0.0", 53))
    assert is_dns_request(request(Command.CONNECT, AddressType.IPV6, "::", 53))
    assert not is_dns_request(request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 53))
    assert not is_dns_request(request(Command.CONNECT, AddressType.DOMAIN_NAME, "0.0.0.0", 53))
    assert not is_dns_request(request(Command.BIND, AddressType.IPV4, "0.0.0.0", 53))


# --- Options --------------------------------------------------------------------------------


@pytest.mark.conformance("STK-01", "STK-03")
def test_stack_plan_legs() -> None:
    """STK-01, STK-03: Leg 3 applies to both legs; proxy-remote-only options sent for the
    client leg and unknown Stack options are ignored."""
    plan = plan_stack_options(
        (
            IPTOSOption(StackLeg.BOTH, 0x10),
            TTLOption(StackLeg.CLIENT_PROXY, 7),
            NoFragmentationOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
            TFOOption(StackLeg.CLIENT_PROXY, 100),  # defined for the proxy-remote leg only
            HappyEyeballsOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
            MultipathOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED),
            ListenBacklogOption(StackLeg.PROXY_REMOTE, 4),
            UnknownStackOption(StackLeg.PROXY_REMOTE, 4, 99, b"\0\0"),
        )
    )
    assert (plan.client.tos, plan.client.ttl, plan.client.no_fragmentation) == (0x10, 7, None)
    assert (plan.remote.tos, plan.remote.ttl, plan.remote.no_fragmentation) == (
        0x10,
        None,
        Availability.DESIRED,
    )
    assert plan.both_legs == {"tos"}
    assert plan.tfo_payload_size is None
    assert plan.happy_eyeballs == Availability.DESIRED
    assert plan.multipath == Availability.NOT_DESIRED
    assert plan.listen_backlog == 4


@pytest.mark.conformance("STK-02")
@pytest.mark.parametrize(
    "options",
    [
        (TTLOption(StackLeg.PROXY_REMOTE, 1), TTLOption(StackLeg.PROXY_REMOTE, 2)),
        (IPTOSOption(StackLeg.BOTH, 1), IPTOSOption(StackLeg.PROXY_REMOTE, 1)),
        (MultipathOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),) * 2,
        (
            NoFragmentationOption(StackLeg.CLIENT_PROXY, Availability.DESIRED),
            NoFragmentationOption(StackLeg.BOTH, Availability.NOT_DESIRED),
        ),
    ],
)
def test_duplicate_stack_options(options: tuple[Option, ...]) -> None:
    """STK-02 (D10): duplicate or contradictory Stack options make the Request malformed."""
    with pytest.raises(RemoteProtocolError) as info:
        plan_stack_options(options)
    assert info.value.reply_code == ReplyCode.GENERAL_FAILURE
    conn = ServerWire()
    conn.receive_data(wire(Command.CONNECT, *options))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_request_options_sorted() -> None:
    """The first Authentication Data option per method counts; session and idempotence options
    are collected; initial data length only for CONNECT."""
    userpass = encode_userpass_request(UserPassRequest(b"u", b"p"))
    request = Request(
        Command.CONNECT,
        AddressType.IPV4,
        "127.0.0.1",
        1,
        (
            AuthData(AuthMethod.USERNAME_PASSWORD, userpass + b"\0"),
            AuthData(AuthMethod.USERNAME_PASSWORD, b"\x01\x01x\x01y"),
            AuthMethodAdvertisement(5, (2, 1)),
            SessionRequest(),
            SessionID(b"abcd"),
            SessionTeardown(),
            IdempotenceRequest(10),
            IdempotenceExpenditure(77),
        ),
    )
    options = parse_request_options(request)
    assert options.credentials == UserPassRequest(b"u", b"p")
    assert options.advertised_methods == (2, 1) and options.initial_data_length == 5
    assert options.session_request and options.session_id == b"abcd" and options.session_teardown
    assert options.token_request == 10 and options.token == 77
    bind = Request(Command.BIND, AddressType.IPV4, "0.0.0.0", 0, (AuthMethodAdvertisement(5, (2,)),))
    assert parse_request_options(bind).initial_data_length == 0
    garbled = Request(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 1, (AuthData(2, b"\x09\x00\x00\x00"),))
    parsed = parse_request_options(garbled)
    assert parsed.credentials is None and parsed.malformed_credentials


# --- SOCKS 5 ---------------------------------------------------------------------------------


def test_socks5_sequence_with_userpass() -> None:
    """RFC 1928 greeting, RFC 1929 exchange, request, reply; data after the request is kept."""
    conn = Socks5ServerWire()
    got = feed(conn, b"\x05\x02\x00\x02", 1)
    assert got == [Socks5Greeting((AuthMethod.NONE, AuthMethod.USERNAME_PASSWORD)), PAUSED]
    assert conn.send(Socks5MethodSelection(AuthMethod.USERNAME_PASSWORD)) == b"\x05\x02"
    got = feed(conn, b"\x01\x01u\x01p", 2)
    assert got[0] == UserPassRequest(b"u", b"p")
    assert conn.send(UserPassReply(UserPassStatus.SUCCESS)) == b"\x01\x00"
    #              ver cmd rsv atyp  127.0.0.1      port 80
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    got = feed(conn, request + b"GET", 3)
    assert got[0] == Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80)
    reply = Socks5Reply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 1)
    assert conn.send(reply) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x01"
    assert conn.our_state is State.RELAY
    assert conn.trailing_data == (b"GET", False)


def test_socks5_failures_close() -> None:
    """No acceptable method, a failed RFC 1929 check and a failure reply each end the connection;
    a malformed request can still be answered with its reply code."""
    conn = Socks5ServerWire()
    conn.receive_data(b"\x05\x01\x00")
    conn.next_event()
    conn.send(Socks5MethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS))
    assert conn.our_state is State.MUST_CLOSE
    conn = Socks5ServerWire()
    conn.receive_data(b"\x05\x01\x02")
    conn.next_event()
    conn.send(Socks5MethodSelection(AuthMethod.USERNAME_PASSWORD))
    conn.receive_data(b"\x01\x01u\x01x")
    conn.next_event()
    conn.send(UserPassReply(UserPassStatus.FAILURE))
    assert conn.our_state is State.MUST_CLOSE
    conn = Socks5ServerWire()
    conn.receive_data(b"\x05\x01\x00")
    conn.next_event()
    conn.send(Socks5MethodSelection(AuthMethod.NONE))
    conn.receive_data(b"\x05\x01\x00\x02")  # unknown address type
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    conn.send(Socks5Reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, AddressType.IPV4, "0.0.0.0", 0))
    assert conn.our_state is State.MUST_CLOSE


def test_socks5_bind_two_replies() -> None:
    """RFC 1928 BIND: two replies, then relay."""
    conn = Socks5ServerWire()
    conn.receive_data(b"\x05\x01\x00")
    conn.next_event()
    conn.send(Socks5MethodSelection(AuthMethod.NONE))
    conn.receive_data(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
    assert isinstance(conn.next_event(), Socks5Request)
    reply = Socks5Reply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 5)
    conn.send(reply)
    assert conn.our_state is State.SEND_BIND_REPLY
    conn.send(reply)
    assert conn.our_state in (State.RELAY,)  # (mypy narrowed the property above)
