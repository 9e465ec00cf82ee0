"""Sans-IO client tests: the proxy is scripted as byte chunks (STYLE.md section 7), no sockets.

Hex vectors are annotated field by field. A test that proves a requirement of
docs/conformance.md (client and both rows) carries its ID in a conformance marker; D-numbers
are the decisions of docs/decisions.md.
"""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import socks6fast.net.url as url_module
import socks6fast.proto.client as client_connection_module
from socks6fast.constants import (
    MAX_INITIAL_DATA_LENGTH,
    AddressType,
    AuthMethod,
    AuthReplyType,
    Command,
    ReplyCode,
    StackLeg,
    UserPassStatus,
)
from socks6fast.errors import (
    AuthenticationError,
    LocalProtocolError,
    ProxyError,
    RemoteProtocolError,
    VersionMismatchError,
)
from socks6fast.net.url import parse_proxy_url
from socks6fast.proto import codec
from socks6fast.proto.client import (
    NEED_DATA,
    PAUSED,
    ClientConnection,
    ClientEvent,
    ClientSession,
    ClientState,
    SessionState,
    address_of,
    build_request,
    noop_request,
    tfo_syn_may_carry_data,
    tls_early_data_allowed,
)
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    IdempotenceExpenditure,
    IdempotenceRequest,
    OperationReply,
    Request,
    SessionID,
    SessionOK,
    SessionRequest,
    SessionTeardown,
    TTLOption,
    UnknownOption,
)
from socks6fast.proto.server_wire import InitialData, RequestReceived, ServerWire
from socks6fast.proto.socks5 import UserPassReply, UserPassRequest
from socks6fast.proto.states import NEED_DATA as SHARED_NEED_DATA


def hx(*fields: str) -> bytes:
    """Join annotated hex fields (spaces allowed) into bytes."""
    return bytes.fromhex("".join(fields))


ALICE = UserPassRequest(b"alice", b"s3cret")

# Authentication Reply, Type 0 (success), no options.
AUTH_OK = hx(
    "06",  # Version 6
    "00",  # Type: success
    "0000",  # Options Length 0
)
# Operation Reply, Success, bound 127.0.0.1:1234, no options.
OP_OK = hx(
    "06",  # Version
    "00",  # Reply Code: Success
    "0000",  # Options Length
    "04d2",  # Bind Port 1234
    "00",  # Padding
    "01",  # Address Type: IPv4
    "7f000001",  # 127.0.0.1
)


def op_reply(code: int) -> bytes:
    return hx("06", f"{code:02x}", "0000", "0000", "00", "01", "00000000")


def state(obj: ClientConnection | ClientSession) -> ClientState | SessionState:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return obj.state


def drain(conn: ClientConnection) -> list[ClientEvent]:
    """next_event() until NEED_DATA or PAUSED (included)."""
    events: list[ClientEvent] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event is NEED_DATA or event is PAUSED:
            return events


def connect(initial: bytes = b"", **kwargs: object) -> ClientConnection:
    conn = ClientConnection(**kwargs)  # type: ignore[arg-type]
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80), initial)
    return conn


# --- One flight: request, 0-RTT credentials and initial data (CMD-03, AUTH-08) -----------


@pytest.mark.conformance("AUTH-08", "CMD-03")
def test_one_flight_request_credentials_and_initial_data() -> None:
    """CMD-03 (client side), AUTH-08: one write carries the Request with 0-RTT credentials
    (Authentication Data, method 2), an advertisement of method 2 only (never 0), and the
    initial data it announces."""
    conn = ClientConnection()
    request = build_request(
        Command.CONNECT, "example.com", 80, credentials=ALICE, initial_data_length=len(b"GET /")
    )
    flight = conn.send(request, b"GET /")
    assert flight == hx(
        "06",  # Version 6
        "01",  # Command: CONNECT
        "001c",  # Options Length 28
        "0050",  # Port 80
        "00",  # Padding
        "03",  # Address Type: domain name
        "0b",
        "6578616d706c652e636f6d",  # len 11, "example.com" (field is 12 bytes: no NULs, D2)
        # Authentication Method Advertisement
        "0002",  # Kind 2
        "0008",  # Length 8
        "0005",  # Initial Data Length 5
        "02",  # Methods: 2 (username/password); 0 never advertised (AUTH-08)
        "00",  # Padding
        # Authentication Data
        "0004",  # Kind 4
        "0014",  # Length 20
        "02",  # Method 2
        "01",  # RFC 1929 VER 1
        "05",
        "616c696365",  # ULEN 5, "alice"
        "06",
        "733363726574",  # PLEN 6, "s3cret"
        "00",  # Padding
        "474554202f",  # initial data "GET /" in the same flight
    )
    assert conn.request_size == len(flight) - 5
    assert state(conn) is ClientState.AWAIT_AUTH_REPLY


@pytest.mark.conformance("CMD-03")
def test_false_start_without_advertisement_sends_everything() -> None:
    """CMD-03: without an advertisement, application data of any size follows the Request
    at once (section "False Starts")."""
    conn = ClientConnection()
    data = b"x" * (MAX_INITIAL_DATA_LENGTH + 10)
    flight = conn.send(build_request(Command.CONNECT, "192.0.2.1", 80), data)
    assert flight == hx("06 01 0000 0050 00 01 c0000201") + data


@pytest.mark.conformance("CMD-03")
def test_initial_data_beyond_advertised_waits_for_auth_success() -> None:
    """CMD-03: with credentials, 2^14 bytes are announced and sent with the Request; the
    rest leaves only after the successful Authentication Reply."""
    data = bytes(range(256)) * 65  # 16640 bytes > 2^14
    conn = ClientConnection()
    request = build_request(
        Command.CONNECT, "192.0.2.1", 80, credentials=ALICE, initial_data_length=len(data)
    )
    flight = conn.send(request, data)
    assert flight[conn.request_size :] == data[:MAX_INITIAL_DATA_LENGTH]
    assert conn.data_to_send() == b""
    conn.receive_data(AUTH_OK)
    assert isinstance(conn.next_event(), AuthReply)
    assert conn.data_to_send() == data[MAX_INITIAL_DATA_LENGTH:]


def test_connect_established_then_paused_with_trailing_data() -> None:
    """Replies then application data in one chunk: the data is left in trailing_data."""
    conn = connect(b"GET /")
    conn.receive_data(AUTH_OK + OP_OK + b"HTTP/1.0 200")
    events = drain(conn)
    assert events[0] == AuthReply(AuthReplyType.SUCCESS)
    assert events[1] == OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 1234)
    assert events[2] is PAUSED
    assert state(conn) is ClientState.ESTABLISHED
    assert conn.trailing_data == (b"HTTP/1.0 200", False)


def test_byte_by_byte_reading_exactly_bytes_needed_never_over_reads() -> None:
    """The adapters read exactly ``bytes_needed``: fed that way, the client stops right
    after the last reply and the application bytes stay unread (in the socket)."""
    stream = AUTH_OK + OP_OK + b"APPDATA"
    conn = connect()
    pos = 0
    while state(conn) is not ClientState.ESTABLISHED:
        event = conn.next_event()
        if event is NEED_DATA:
            n = conn.bytes_needed
            conn.receive_data(stream[pos : pos + n])
            pos += n
    assert stream[pos:] == b"APPDATA"
    assert conn.trailing_data == (b"", False)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_replies_split_anywhere_give_the_same_events(chunk: int) -> None:
    """Partial input is normal (STYLE.md section 2): any split yields the same events."""
    stream = AUTH_OK + OP_OK
    conn = connect()
    events = []
    for i in range(0, len(stream), chunk):
        conn.receive_data(stream[i : i + chunk])
        events += [e for e in drain(conn) if e is not NEED_DATA and e is not PAUSED]
    assert [type(e) for e in events] == [AuthReply, OperationReply]
    assert state(conn) is ClientState.ESTABLISHED


def test_sentinels_are_the_shared_ones() -> None:
    """socks6fast.proto.states.NEED_DATA is what ClientConnection returns."""
    conn = connect()
    assert conn.next_event() is SHARED_NEED_DATA


# --- REQ-02: Version Mismatch Reply --------------------------------------------------------


@pytest.mark.conformance("REQ-02")
def test_version_mismatch_reply_raises_and_closes() -> None:
    """REQ-02: the single byte 6 followed by EOF is a Version Mismatch Reply."""
    conn = connect()
    conn.receive_data(hx("06"))  # Version Mismatch Reply: just Version = 6
    assert conn.next_event() is NEED_DATA  # could still be the start of an Auth Reply
    conn.receive_data(b"")  # EOF
    with pytest.raises(VersionMismatchError) as info:
        conn.next_event()
    assert info.value.reply_code is None
    assert state(conn) is ClientState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.conformance("REQ-02")
def test_socks5_answer_is_a_version_mismatch() -> None:
    """REQ-02: a SOCKS 5 proxy answering our request (05 FF) is reported, not parsed."""
    conn = connect()
    conn.receive_data(hx("05", "ff"))  # SOCKS 5: VER 5, METHOD no acceptable
    with pytest.raises(VersionMismatchError):
        conn.next_event()


def test_eof_without_any_reply() -> None:
    """A proxy that closes without a byte gives a clear RemoteProtocolError."""
    conn = connect()
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="without replying"):
        conn.next_event()


def test_eof_in_the_middle_of_a_reply() -> None:
    conn = connect()
    conn.receive_data(AUTH_OK + OP_OK[:6])
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), AuthReply)
    with pytest.raises(RemoteProtocolError, match="Operation Reply"):
        conn.next_event()


# --- REQ-03 / REQ-05 / REQ-06 / REQ-09 in replies ------------------------------------------


@pytest.mark.conformance("REQ-03")
def test_auth_reply_options_length_over_cap_rejected_from_header() -> None:
    """REQ-03 (client side): Options Length 16385 fails on the 4-byte header, before any
    option byte is buffered."""
    conn = connect()
    conn.receive_data(hx("06", "00", "4001"))  # Version, Type 0, Options Length 16385
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert state(conn) is ClientState.ERROR


@pytest.mark.conformance("REQ-03")
def test_operation_reply_options_length_over_cap_rejected_from_header() -> None:
    """REQ-03: the same for the Operation Reply, and a lower configured cap is honoured."""
    conn = connect(max_options_length=1024)
    conn.receive_data(AUTH_OK + hx("06", "00", "0404"))  # Options Length 1028 > 1024
    assert isinstance(conn.next_event(), AuthReply)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.conformance("REQ-03")
def test_options_length_at_cap_is_buffered_and_needs_are_exact() -> None:
    """REQ-03: a reply announcing 16384 bytes of options asks for exactly those bytes."""
    conn = connect()
    conn.receive_data(hx("06", "00", "4000"))
    assert conn.next_event() is NEED_DATA
    assert conn.bytes_needed == 16384


@pytest.mark.conformance("REQ-05")
def test_malformed_option_length_in_reply() -> None:
    """REQ-05: an option whose Length is not a multiple of 4 makes the reply malformed."""
    conn = connect()
    conn.receive_data(hx("06", "00", "0008", "fc00", "0006", "0000", "0000"))  # Length 6
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.conformance("REQ-06")
def test_unknown_and_misplaced_options_in_replies_are_ignored() -> None:
    """REQ-06: an experimental option kind, and a Session OK the client did not ask for,
    do not disturb the handshake."""
    conn = connect()
    conn.receive_data(
        hx(
            "06",
            "00",
            "000c",  # Auth Reply, Type 0, Options Length 12
            "fc00",
            "0008",
            "61626364",  # Kind 64512 (experimental), Length 8, data
            "0008",
            "0004",  # Session OK (no session here)
        )
        + OP_OK
    )
    events = drain(conn)
    assert [type(e) for e in events[:2]] == [AuthReply, OperationReply]
    assert state(conn) is ClientState.ESTABLISHED


@pytest.mark.conformance("REQ-09")
@pytest.mark.parametrize(
    "address_field",
    [
        "0d 70726f78792e6578616d706c65 0000",  # draft-11: len 13 without padding, 2 NULs (D2)
        "0f 70726f78792e6578616d706c65 0000",  # draft-12: len 15 counts the 2 NULs
    ],
)
def test_domain_bind_address_both_padding_forms(address_field: str) -> None:
    """REQ-09 (client side): a domain bind address is read in both padding forms (D2)."""
    conn = connect()
    conn.receive_data(AUTH_OK + hx("06 00 0000", "0438", "00", "03", address_field))
    reply = drain(conn)[1]
    assert isinstance(reply, OperationReply)
    assert (reply.address_type, reply.address, reply.port) == (AddressType.DOMAIN_NAME, "proxy.example", 1080)


@pytest.mark.conformance("REQ-09")
def test_domain_destination_sent_without_padding_in_length() -> None:
    """REQ-09: the length byte counts the name only; NULs pad the field to 4 bytes (D2)."""
    flight = ClientConnection().send(build_request(Command.CONNECT, "ab.example", 443))
    assert flight == hx("06 01 0000", "01bb", "00", "03", "0a", b"ab.example".hex(), "00")


# --- REQ-10: close after failure / after NOOP ---------------------------------------------


@pytest.mark.conformance("REQ-10")
@pytest.mark.parametrize("code", [c for c in ReplyCode if c is not ReplyCode.SUCCESS])
def test_non_success_operation_reply_raises_proxy_error_with_code(code: ReplyCode) -> None:
    """REQ-10: every non-Success code raises ProxyError carrying that code; ERROR state."""
    conn = connect()
    conn.receive_data(AUTH_OK + op_reply(code))
    assert isinstance(conn.next_event(), AuthReply)
    with pytest.raises(ProxyError) as info:
        conn.next_event()
    assert info.value.reply_code is code
    assert state(conn) is ClientState.ERROR
    assert conn.operation_reply is not None and conn.operation_reply.reply_code == code


@pytest.mark.conformance("REQ-10")
def test_noop_reply_means_must_close() -> None:
    """REQ-10: after the Operation Reply to NOOP the client closes (MUST_CLOSE)."""
    conn = ClientConnection()
    flight = conn.send(noop_request())
    assert flight == hx("06", "00", "0000", "0000", "00", "01", "00000000")  # NOOP to 0.0.0.0:0
    conn.receive_data(AUTH_OK + op_reply(ReplyCode.SUCCESS))
    events = drain(conn)
    assert isinstance(events[1], OperationReply)
    assert events[2] is PAUSED
    assert state(conn) is ClientState.MUST_CLOSE


def test_bind_two_operation_replies() -> None:
    """BIND, client side: it waits for a second Operation Reply naming the peer."""
    conn = ClientConnection()
    conn.send(build_request(Command.BIND, "0.0.0.0", 0))
    conn.receive_data(AUTH_OK + OP_OK)
    events = drain(conn)
    assert [type(e) for e in events] == [AuthReply, OperationReply, type(NEED_DATA)]
    assert state(conn) is ClientState.AWAIT_BIND_PEER
    conn.receive_data(hx("06 00 0000", "c350", "00", "01", "c6336401"))  # peer 198.51.100.1:50000
    reply = conn.next_event()
    assert isinstance(reply, OperationReply)
    assert conn.peer_reply == reply and (reply.address, reply.port) == ("198.51.100.1", 50000)
    assert state(conn) is ClientState.ESTABLISHED


@pytest.mark.conformance("REQ-10")
def test_bind_second_reply_failure() -> None:
    """REQ-10: a failed second BIND reply is a refusal too."""
    conn = ClientConnection()
    conn.send(build_request(Command.BIND, "0.0.0.0", 0))
    conn.receive_data(AUTH_OK + OP_OK + op_reply(ReplyCode.CONNECTION_TIMED_OUT))
    with pytest.raises(ProxyError) as info:
        drain(conn)
    assert info.value.reply_code is ReplyCode.CONNECTION_TIMED_OUT


# --- AUTH-03 / AUTH-04 / D7 -------------------------------------------------------------------


def auth_failure(*option_hex: str) -> bytes:
    body = "".join(option_hex).replace(" ", "")
    return hx("06", "01", f"{len(body) // 2:04x}", body)


SELECT_USERPASS = "0003 0008 02 000000"  # Method Selection: Kind 3, Length 8, Method 2, padding
SELECT_NONE_ACCEPTABLE = "0003 0008 ff 000000"  # Method 0xFF: No Acceptable Methods
SELECT_GSSAPI = "0003 0008 01 000000"  # Method 1


@pytest.mark.conformance("AUTH-03")
@pytest.mark.parametrize(
    ("reply", "credentials", "message"),
    [
        (auth_failure(), ALICE, "no method to continue"),  # Type 1, no selection
        (auth_failure(SELECT_NONE_ACCEPTABLE), ALICE, "0xFF"),
        (auth_failure(SELECT_GSSAPI), ALICE, "method 1"),  # not advertised, not doable
        (auth_failure(SELECT_USERPASS), None, "method 2"),  # nothing advertised (false start)
    ],
    ids=["no-selection", "0xff", "gssapi", "userpass-not-advertised"],
)
def test_type1_without_a_method_that_can_continue_closes(
    reply: bytes, credentials: UserPassRequest | None, message: str
) -> None:
    """AUTH-03: Type 1 with no usable selection, or 0xFF, raises AuthenticationError."""
    conn = ClientConnection()
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=credentials))
    conn.receive_data(reply)
    with pytest.raises(AuthenticationError, match=message):
        conn.next_event()
    assert state(conn) is ClientState.ERROR
    assert conn.data_to_send() == b""


def test_slow_username_password_exchange() -> None:
    """D7, client side: Type 1 + Method Selection 2 -> bare RFC 1929 request,
    RFC 1929 reply, second Authentication Reply, Operation Reply."""
    conn = ClientConnection()
    request = build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE, initial_data_length=3)
    conn.send(request, b"abc")
    conn.receive_data(auth_failure(SELECT_USERPASS))
    first = conn.next_event()
    assert isinstance(first, AuthReply) and first.type == AuthReplyType.FAILURE
    assert conn.data_to_send() == hx(
        "01",  # RFC 1929 VER
        "05",
        "616c696365",  # ULEN, "alice"
        "06",
        "733363726574",  # PLEN, "s3cret" (no SOCKS 6 padding: bare request)
    )
    assert state(conn) is ClientState.AWAIT_USERPASS_REPLY
    conn.receive_data(hx("01", "00"))  # RFC 1929 reply: VER 1, STATUS success
    assert conn.next_event() == UserPassReply(UserPassStatus.SUCCESS)
    conn.receive_data(AUTH_OK + OP_OK)
    events = drain(conn)
    assert [type(e) for e in events] == [AuthReply, OperationReply, type(PAUSED)]
    assert len(conn.auth_replies) == 2
    assert state(conn) is ClientState.ESTABLISHED


def test_slow_exchange_password_rejected() -> None:
    """D7: an RFC 1929 failure status raises AuthenticationError."""
    conn = ClientConnection(credentials=ALICE)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE))
    conn.receive_data(auth_failure(SELECT_USERPASS) + hx("01", "01"))
    assert isinstance(conn.next_event(), AuthReply)
    with pytest.raises(AuthenticationError, match="username/password"):
        conn.next_event()


def test_second_auth_reply_cannot_start_another_negotiation() -> None:
    """Client side of the final Authentication Reply: a failing second one is final, even if it
    selects a method again."""
    conn = ClientConnection()
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE))
    conn.receive_data(auth_failure(SELECT_USERPASS) + hx("01 00") + auth_failure(SELECT_USERPASS))
    assert isinstance(conn.next_event(), AuthReply)
    assert isinstance(conn.next_event(), UserPassReply)
    with pytest.raises(AuthenticationError):
        conn.next_event()
    assert conn.data_to_send() == hx("01 05 616c696365 06 733363726574")  # sent once only


def test_zero_rtt_password_rejected_in_auth_data_reply() -> None:
    """D7 0-RTT form: Type 1 carrying Authentication Data (method 2) with RFC 1929 status 1."""
    conn = ClientConnection()
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE))
    conn.receive_data(auth_failure("0004 0008 02 01 01 00"))  # Auth Data: method 2, VER 1, STATUS 1
    with pytest.raises(AuthenticationError, match="rejected the username/password"):
        conn.next_event()


def test_zero_rtt_password_accepted() -> None:
    """0-RTT, client side: one Authentication Reply, Type 0, then the Operation Reply."""
    conn = ClientConnection()
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE))
    conn.receive_data(hx("06 00 0008", "0004 0008 02 01 00 00") + OP_OK)  # Auth Data: STATUS 0
    assert [type(e) for e in drain(conn)] == [AuthReply, OperationReply, type(PAUSED)]


# --- AUTH-08 / AUTH-09 / SES-06: what send() refuses ------------------------------------------


@pytest.mark.conformance("AUTH-08")
def test_never_advertises_method_zero() -> None:
    """AUTH-08: build_request never advertises method 0; send() refuses a Request that does."""
    request = build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE)
    advertised = [o for o in request.options if isinstance(o, AuthMethodAdvertisement)]
    assert advertised == [AuthMethodAdvertisement(0, (AuthMethod.USERNAME_PASSWORD,))]
    assert build_request(Command.CONNECT, "192.0.2.1", 80).options == ()  # no creds: no advertisement
    bad = Request(Command.CONNECT, AddressType.IPV4, "192.0.2.1", 80, (AuthMethodAdvertisement(0, (0, 2)),))
    with pytest.raises(LocalProtocolError, match="method 0"):
        ClientConnection().send(bad)


@pytest.mark.conformance("AUTH-09")
def test_at_most_one_auth_data_option_per_method() -> None:
    """AUTH-09: two Authentication Data options for method 2 are refused."""
    option = AuthData(AuthMethod.USERNAME_PASSWORD, b"\x01\x01a\x01b\x00\x00")
    bad = Request(Command.CONNECT, AddressType.IPV4, "192.0.2.1", 80, (option, option))
    with pytest.raises(LocalProtocolError, match="two Authentication Data"):
        ClientConnection().send(bad)
    ok = Request(Command.CONNECT, AddressType.IPV4, "192.0.2.1", 80, (option, AuthData(0x80, b"xyz")))
    ClientConnection().send(ok)  # one per method is fine


@pytest.mark.conformance("SES-06")
def test_session_request_inside_a_session_is_refused() -> None:
    """SES-06: a Request carrying a Session ID cannot carry a Session Request."""
    bad = Request(Command.CONNECT, AddressType.IPV4, "192.0.2.1", 80, (SessionID(b"ABCD"), SessionRequest()))
    with pytest.raises(LocalProtocolError, match="Session Request"):
        ClientConnection().send(bad)


@pytest.mark.conformance("SES-06")
def test_client_session_never_initiates_from_inside_a_session() -> None:
    """SES-06: once ACTIVE, ClientSession sends the Session ID and never a Session Request;
    a Session ID in the reply to an in-session request does not replace it."""
    session = ClientSession()
    assert session.request_options() == (SessionRequest(),)
    session.on_session_id(b"ABCD")
    for _ in range(3):
        assert session.request_options() == (SessionID(b"ABCD"),)
    conn = ClientConnection(session=session)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    conn.receive_data(hx("06 00 0010", "0006 000c 5757575757575757", "0008 0004") + OP_OK)
    drain(conn)
    assert session.session_id == b"ABCD"


def test_second_request_and_initial_data_rules() -> None:
    conn = connect()
    with pytest.raises(LocalProtocolError):
        conn.send(build_request(Command.CONNECT, "192.0.2.1", 80))
    with pytest.raises(LocalProtocolError, match="CONNECT only"):
        ClientConnection().send(build_request(Command.BIND, "0.0.0.0", 0), b"data")
    with pytest.raises(LocalProtocolError, match="first"):
        ClientConnection().next_event()


# --- Sessions: D4, teardown, Session Invalid ---------------------------------------------------


@pytest.mark.parametrize("where", ["auth-reply", "operation-reply"])
def test_session_id_accepted_from_either_reply(where: str) -> None:
    """D4: the Session ID is taken from the Authentication Reply or the Operation Reply."""
    session = ClientSession(tokens=8)
    options = session.request_options()
    assert options == (SessionRequest(), IdempotenceRequest(8))
    conn = ClientConnection(session=session)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE, options=options))
    session_id = "0006 000c 53455353494f4e31"  # Session ID: Kind 6, Length 12, "SESSION1"
    window = "000c 000c 00000064 00000008"  # Idempotence Window: base 100, size 8
    if where == "auth-reply":
        conn.receive_data(hx("06 00 0018", session_id, window) + OP_OK)
    else:
        conn.receive_data(hx("06 00 000c", window) + hx("06 00 000c 04d2 00 01 7f000001", session_id))
    drain(conn)
    assert state(session) is SessionState.ACTIVE
    assert session.session_id == b"SESSION1"
    assert session.window == (100, 8)
    assert not session.needs_credentials


def test_session_declined_silently() -> None:
    """Section "Session initiation": no Session ID in a successful exchange: DECLINED, and
    later requests stand alone (with credentials)."""
    session = ClientSession()
    conn = ClientConnection(session=session)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    conn.receive_data(AUTH_OK + OP_OK)
    drain(conn)
    assert state(session) is SessionState.DECLINED
    assert session.request_options() == ()
    assert session.needs_credentials


def test_failed_initiation_lets_the_next_request_try_again() -> None:
    session = ClientSession()
    conn = ClientConnection(session=session)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    assert state(session) is SessionState.PENDING
    with pytest.raises(LocalProtocolError, match="being established"):
        session.request_options()
    conn.receive_data(AUTH_OK + op_reply(ReplyCode.HOST_UNREACHABLE))
    with pytest.raises(ProxyError):
        drain(conn)
    assert state(session) is SessionState.NEW
    assert session.request_options() == (SessionRequest(),)


@pytest.mark.conformance("IDM-05")
def test_window_of_a_failed_initiation_does_not_shadow_the_next_session() -> None:
    """IDM-05 and section "Idempotence options" (windows are per session): the initiating
    request's Authentication Reply carries a window (base 1000), then its CONNECT fails, so
    no session exists. The next initiation gets a session with a window whose base (5)
    compares older than 1000; it must still be the window the client spends from."""
    session = ClientSession(tokens=4)
    failed = ClientConnection(session=session)
    failed.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    failed.receive_data(
        hx("06 00 000c", "000c 000c 000003e8 00000004")  # Auth Reply: window base 1000, size 4
        + op_reply(ReplyCode.CONNECTION_REFUSED)  # no Session ID: no session
    )
    with pytest.raises(ProxyError):
        drain(failed)
    assert state(session) is SessionState.NEW and session.window is None
    initiator = ClientConnection(session=session)
    initiator.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    initiator.receive_data(
        hx("06 00 000c", "000c 000c 00000005 00000004")  # Auth Reply: window base 5, size 4
        + hx("06 00 0008 04d2 00 01 7f000001", "0006 0008 4e455732")  # Session ID "NEW2"
    )
    drain(initiator)
    assert session.window == (5, 4)
    assert session.request_options(idempotent=True) == (SessionID(b"NEW2"), IdempotenceExpenditure(5))


def test_session_invalid_resets_the_session() -> None:
    """Session Invalid, client side: Type 1 + Session Invalid raises AuthenticationError and the
    session starts over."""
    session = ClientSession()
    session.request_options()
    session.on_session_id(b"OLD!")
    conn = ClientConnection(session=session)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    conn.receive_data(auth_failure("0009 0004"))  # Session Invalid: Kind 9, Length 4
    with pytest.raises(AuthenticationError, match="Session Invalid"):
        conn.next_event()
    assert conn.session_invalid
    assert state(session) is SessionState.NEW and session.session_id is None


def _request_in(session: ClientSession, *, idempotent: bool = False) -> ClientConnection:
    conn = ClientConnection(session=session)
    options = session.request_options(idempotent=idempotent)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=options))
    return conn


def _replace_session(session: ClientSession, session_id: str, window: str) -> None:
    """Session Invalid on one request, then a new session with its own window."""
    invalid = _request_in(session)
    invalid.receive_data(auth_failure("0009 0004"))  # Session Invalid
    with pytest.raises(AuthenticationError):
        invalid.next_event()
    initiator = _request_in(session)  # carries a Session Request again
    initiator.receive_data(
        hx("06 00 000c", window)  # Auth Reply: Idempotence Window
        + hx("06 00 0008 04d2 00 01 7f000001", session_id)  # Operation Reply: Session ID
    )
    drain(initiator)
    assert state(initiator) is ClientState.ESTABLISHED


@pytest.mark.conformance("IDM-05")
def test_late_window_of_a_replaced_session_is_not_adopted() -> None:
    """IDM-05 and section "Idempotence options" ("Token windows are tracked by the proxy
    on a per-session basis ... its tokens can only be spent from within said session"):
    a request of session ABCD still in flight when ABCD was declared invalid and NEW2
    replaced it must not plant ABCD's window (base 1002, "newer" than NEW2's base 5) in
    NEW2; the next token spent in NEW2 is NEW2's."""
    session = active_session()  # Session ID "ABCD"
    session.on_window(1000, 4)
    late = _request_in(session, idempotent=True)  # spends 1000 in session ABCD
    _replace_session(session, "0006 0008 4e455732", "000c 000c 00000005 00000004")  # NEW2, base 5
    assert session.session_id == b"NEW2" and session.window == (5, 4)
    late.receive_data(
        hx("06 00 0014", "0008 0004", "000c 000c 000003ea 00000004", "000e 0004")  # ABCD: window 1002
        + OP_OK
    )
    drain(late)
    assert late.token_accepted is True
    assert session.window == (5, 4)
    assert session.request_options(idempotent=True) == (SessionID(b"NEW2"), IdempotenceExpenditure(5))


def test_late_session_invalid_of_a_replaced_session_keeps_the_new_one() -> None:
    """Session Invalid, client side: for a request of an old session (answered
    after the client already replaced that session) reports the error, so the request is
    retried, but leaves the new session and its window alone."""
    session = active_session()  # Session ID "ABCD"
    session.on_window(1000, 4)
    late = _request_in(session)
    _replace_session(session, "0006 0008 4e455732", "000c 000c 00000005 00000004")
    late.receive_data(auth_failure("0009 0004"))  # Session Invalid for ABCD
    with pytest.raises(AuthenticationError, match="Session Invalid"):
        late.next_event()
    assert late.session_invalid
    assert state(session) is SessionState.ACTIVE
    assert session.session_id == b"NEW2" and session.window == (5, 4)


def test_teardown_options_and_closed_session() -> None:
    """Section "Tearing down the session": Session ID + Session Teardown, then the client
    assumes the session is gone."""
    session = ClientSession()
    session.request_options()
    session.on_session_id(b"ABCD")
    options = session.teardown_options()
    assert options == (SessionID(b"ABCD"), SessionTeardown())
    assert codec.encode_request(noop_request(options)) == hx(
        "06 00",
        "000c",  # NOOP, Options Length 12
        "0000 00 01 00000000",  # port 0, padding, IPv4 0.0.0.0
        "0006 0008 41424344",  # Session ID "ABCD"
        "000a 0004",  # Session Teardown
    )
    assert state(session) is SessionState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        session.request_options()


# --- IDM-05: token bookkeeping ---------------------------------------------------------------


def active_session(tokens: int = 4) -> ClientSession:
    session = ClientSession(tokens=tokens)
    session.request_options()
    session.on_session_id(b"ABCD")
    return session


@pytest.mark.conformance("IDM-05")
def test_spends_smallest_tokens_first() -> None:
    """IDM-05: tokens are spent in increasing order, across the 2^32 wrap."""
    session = active_session()
    session.on_window(0xFFFFFFFE, 4)  # tokens 0xfffffffe, 0xffffffff, 0, 1
    spent = [session.request_options(idempotent=True)[1] for _ in range(4)]
    assert spent == [IdempotenceExpenditure(t) for t in (0xFFFFFFFE, 0xFFFFFFFF, 0, 1)]
    with pytest.raises(LocalProtocolError, match="no unspent"):
        session.request_options(idempotent=True)
    assert codec.encode_options([IdempotenceExpenditure(0xFFFFFFFE)]) == hx(
        "000d",
        "0008",
        "fffffffe",  # Kind 13, Length 8 (D3), Token
    )


@pytest.mark.conformance("IDM-05")
def test_ignores_window_advertisements_older_than_the_newest() -> None:
    """IDM-05: a window base lower (mod 2^32) than the newest seen is ignored."""
    session = active_session()
    session.on_window(0xFFFFFFF0, 8)
    session.on_window(5, 8)  # 5 is after 0xfffffff0 in mod-2^32 order: newer
    assert session.window == (5, 8)
    session.on_window(0xFFFFFFF8, 8)  # older than 5: ignored
    assert session.window == (5, 8)
    session.on_window(5, 16)  # same base: size update accepted
    assert session.window == (5, 16)


@pytest.mark.conformance("IDM-05")
def test_window_shift_forgets_spent_tokens_and_keeps_order() -> None:
    """IDM-05: after the proxy shifts the window, spending continues from the new base."""
    session = active_session()
    session.on_window(10, 4)
    assert session.spend_token() == 10
    assert session.spend_token() == 11
    session.on_window(11, 4)  # the proxy shifted past 10; 11 is still spent locally
    assert session.spend_token() == 12


@pytest.mark.conformance("IDM-05")
def test_stale_window_in_a_later_auth_reply_is_ignored_through_the_connection() -> None:
    """IDM-05 via ClientConnection: only successful Authentication Replies update the
    window, and an older base is dropped."""
    session = active_session()
    session.on_window(200, 8)
    conn = ClientConnection(session=session)
    conn.send(
        build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options(idempotent=True))
    )
    assert conn.spends_token
    conn.receive_data(hx("06 00 0010", "000c 000c 00000064 00000008", "000e 0004") + OP_OK)  # base 100
    drain(conn)
    assert session.window == (200, 8)
    assert conn.token_accepted is True


def test_token_rejected() -> None:
    """Idempotence Rejected, client side: with Type 1 it raises AuthenticationError."""
    session = active_session()
    session.on_window(1, 2)
    conn = ClientConnection(session=session)
    conn.send(
        build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options(idempotent=True))
    )
    conn.receive_data(auth_failure("000f 0004"))  # Idempotence Rejected
    with pytest.raises(AuthenticationError, match="token"):
        conn.next_event()
    assert conn.token_accepted is False


def test_idempotent_needs_an_active_session() -> None:
    with pytest.raises(LocalProtocolError, match="established session"):
        ClientSession(tokens=4).request_options(idempotent=True)
    with pytest.raises(ValueError):
        ClientSession(tokens=2**31)


# --- TRN-02 / TRN-04 ---------------------------------------------------------------------------


@pytest.mark.conformance("TRN-02")
def test_tfo_syn_carries_application_data_only_with_a_token() -> None:
    """TRN-02: initial data may ride in the TFO SYN only when the request spends a token;
    the Request alone always may (no application data)."""
    assert tfo_syn_may_carry_data(spends_token=True)
    assert not tfo_syn_may_carry_data(spends_token=False)
    conn = connect(b"GET /")
    assert not conn.spends_token
    assert conn.request_size == 12  # the SYN payload is flight[:request_size]


@pytest.mark.conformance("TRN-04")
def test_tls_early_data_only_with_a_token() -> None:
    """TRN-04: TLS early data only when the request spends a token."""
    assert tls_early_data_allowed(spends_token=True)
    assert not tls_early_data_allowed(spends_token=False)


# --- Timer ----------------------------------------------------------------------------------------


def test_handshake_timer() -> None:
    conn = ClientConnection(handshake_timeout=5.0)
    conn.send(build_request(Command.CONNECT, "192.0.2.1", 80), now=100.0)
    assert conn.get_timer() == 105.0
    conn.handle_timer(104.9)
    with pytest.raises(TimeoutError):
        conn.handle_timer(105.0)
    assert state(conn) is ClientState.ERROR
    done = connect()
    done.receive_data(AUTH_OK + OP_OK)
    drain(done)
    assert done.get_timer() is None


# --- Stack options pass-through ------------------------------------------------------------------


def test_stack_options_pass_through_and_echo() -> None:
    """Stack options go into the Request as given; the echo (D9) is in operation_reply."""
    ttl = TTLOption(StackLeg.PROXY_REMOTE, 16)
    conn = ClientConnection()
    flight = conn.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=[ttl]))
    assert flight == hx(
        "06 01 0008 0050 00 01 c0000201",
        "0001",  # Kind 1: Stack
        "0008",  # Length 8
        "81",  # Leg 2 (proxy-remote) << 6 | Level 1 (IP)
        "03",  # Code 3: TTL
        "10",  # TTL 16
        "00",  # padding
    )
    conn.receive_data(AUTH_OK + hx("06 00 0008 04d2 00 01 7f000001", "0001 0008 81 03 10 00"))
    drain(conn)
    assert conn.operation_reply is not None and conn.operation_reply.options == (ttl,)


# --- Interop with the sans-IO proxy (ServerWire) --------------------------------------------


def test_pair_with_server_connection_slow_exchange() -> None:
    """D7 both ways: our client and the project's ServerWire, wired in memory."""
    client = ClientConnection()
    server = ServerWire()
    request = build_request(Command.CONNECT, "192.0.2.1", 80, credentials=ALICE, initial_data_length=2)
    server.receive_data(client.send(request, b"hi"))
    received = server.next_event()
    assert isinstance(received, RequestReceived) and received.request == request
    assert server.next_event() == InitialData(b"hi")
    client.receive_data(
        server.send(AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),)))
    )
    assert isinstance(client.next_event(), AuthReply)
    server.receive_data(client.data_to_send())
    assert server.next_event() == ALICE
    client.receive_data(server.send(UserPassReply(UserPassStatus.SUCCESS)))
    client.receive_data(server.send(AuthReply(AuthReplyType.SUCCESS)))
    client.receive_data(server.send(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 9)))
    assert [type(e) for e in drain(client)] == [UserPassReply, AuthReply, OperationReply, type(PAUSED)]


def test_pair_with_server_connection_session() -> None:
    """D4 and Session OK wiring: the Session ID in the server's Operation Reply, Session OK next time."""
    session = ClientSession()
    client = ClientConnection(session=session)
    server = ServerWire()
    server.receive_data(client.send(noop_request(session.request_options())))
    assert isinstance(server.next_event(), RequestReceived)
    client.receive_data(server.send(AuthReply(AuthReplyType.SUCCESS)))
    client.receive_data(
        server.send(
            OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", 0, (SessionID(b"S" * 16),))
        )
    )
    drain(client)
    assert state(client) is ClientState.MUST_CLOSE
    assert session.session_id == b"S" * 16
    second = ClientConnection(session=session)
    server2 = ServerWire()
    server2.receive_data(
        second.send(build_request(Command.CONNECT, "192.0.2.1", 80, options=session.request_options()))
    )
    event = server2.next_event()
    assert isinstance(event, RequestReceived)
    assert event.request.options == (SessionID(b"S" * 16),)
    second.receive_data(server2.send(AuthReply(AuthReplyType.SUCCESS, (SessionOK(),))))
    assert isinstance(second.next_event(), AuthReply)


# --- Helpers: addresses, URLs, docstrings, purity ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.1", (AddressType.IPV4, "192.0.2.1")),
        ("2001:DB8:0:0::1", (AddressType.IPV6, "2001:db8::1")),
        ("[::1]", (AddressType.IPV6, "::1")),
        ("example.com", (AddressType.DOMAIN_NAME, "example.com")),
        ("1.2.3", (AddressType.DOMAIN_NAME, "1.2.3")),
    ],
)
def test_address_of(host: str, expected: tuple[AddressType, str]) -> None:
    assert address_of(host) == expected


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("socks6://127.0.0.1", ("127.0.0.1", 1080, False, None, b"")),
        ("socks6://u:p@127.0.0.1:1081", ("127.0.0.1", 1081, False, b"u", b"p")),
        ("SOCKS6+TLS://[::1]:443", ("::1", 443, True, None, b"")),
        ("socks6://us%3Aer:p%40ss%C3%A9@localhost/", ("localhost", 1080, False, b"us:er", "p@ssé".encode())),
    ],
)
def test_parse_proxy_url(url: str, fields: tuple[object, ...]) -> None:
    parsed = parse_proxy_url(url)
    assert (parsed.host, parsed.port, parsed.tls, parsed.username, parsed.password) == fields
    assert "p@ss" not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "socks5://127.0.0.1",
        "http://127.0.0.1",
        "socks6://",
        "socks6://h:99999",
        "socks6://h:0",
        "socks6://h/path",
        "socks6://h?x=1",
        "socks6://" + "u" * 256 + ":p@h",
        "socks6://u:" + "p" * 256 + "@h",
        # RFC 1929: username and password are both 1-255 bytes.
        "socks6://user@h",
        "socks6://user:@h",
        "socks6://:pass@h",
    ],
)
def test_parse_proxy_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="proxy"):
        parse_proxy_url(url)


@pytest.mark.parametrize("module", [client_connection_module, url_module], ids=lambda m: m.__name__)
def test_docstring_examples(module: object) -> None:
    """The examples the README quotes run as written."""
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_client_connection_is_sans_io() -> None:
    """STYLE.md section 2: importing the client core pulls in neither asyncio nor socket."""
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); import socks6fast.proto.client; "
        "print('asyncio' in sys.modules, 'socket' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.conformance("REQ-03")
def test_request_options_over_the_cap_are_never_sent() -> None:
    """REQ-03 (client side of B): a Request whose options exceed 16 KB is refused locally."""
    big = UnknownOption(0xFC00, bytes(16384))  # 4 + 16384 bytes of options
    with pytest.raises(LocalProtocolError):
        ClientConnection().send(build_request(Command.CONNECT, "192.0.2.1", 80, options=[big]))
    fits = UnknownOption(0xFC00, bytes(16380))  # exactly 16384 bytes of options
    flight = ClientConnection().send(build_request(Command.CONNECT, "192.0.2.1", 80, options=[fits]))
    assert flight[2:4] == hx("4000")  # Options Length 16384
