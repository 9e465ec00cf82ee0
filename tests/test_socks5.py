"""SOCKS 5 (RFC 1928) and username/password (RFC 1929) codec: socks6fast.proto.socks5.

Golden vectors are annotated field by field; every stream vector is also fed one
byte at a time (REQ-07 style: a split input decodes exactly like a whole one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from socks6fast.constants import (
    AddressType,
    AuthMethod,
    ReplyCode,
    Socks5Command,
    UserPassStatus,
)
from socks6fast.errors import LocalProtocolError, WireError
from socks6fast.proto import socks5
from socks6fast.proto.socks5 import (
    Socks5Greeting,
    Socks5MethodSelection,
    Socks5Reply,
    Socks5Request,
    Socks5UDPHeader,
    UserPassReply,
    UserPassRequest,
)

Decoder = Callable[..., tuple[Any, int]]
Encoder = Callable[[Any], bytes]

# (name, decoder, encoder, wire, message); all stream messages (the UDP header is separate).
STREAM_VECTORS: list[tuple[str, Decoder, Encoder, bytes, object]] = [
    (
        "curl greeting",
        socks5.decode_greeting,
        socks5.encode_greeting,
        bytes.fromhex(
            "05"  # VER 5
            "02"  # NMETHODS 2
            "00"  # METHOD 0: no authentication required
            "02"  # METHOD 2: username/password
        ),
        Socks5Greeting((AuthMethod.NONE, AuthMethod.USERNAME_PASSWORD)),
    ),
    (
        "greeting with an unassigned method",
        socks5.decode_greeting,
        socks5.encode_greeting,
        bytes.fromhex(
            "05"  # VER 5
            "01"  # NMETHODS 1
            "80"  # METHOD 0x80: private range, kept as a plain int
        ),
        Socks5Greeting((0x80,)),
    ),
    (
        "method selection: username/password",
        socks5.decode_method_selection,
        socks5.encode_method_selection,
        bytes.fromhex(
            "05"  # VER 5
            "02"  # METHOD 2
        ),
        Socks5MethodSelection(AuthMethod.USERNAME_PASSWORD),
    ),
    (
        "method selection: no acceptable methods",
        socks5.decode_method_selection,
        socks5.encode_method_selection,
        bytes.fromhex("05ff"),  # VER 5, METHOD 0xFF
        Socks5MethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),
    ),
    (
        "curl CONNECT example.com:80 (socks5h)",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "01"  # CMD CONNECT
            "00"  # RSV
            "03"  # ATYP domain name
            "0b"  # name length 11, no padding
            "6578616d706c652e636f6d"  # "example.com"
            "0050"  # DST.PORT 80
        ),
        Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "example.com", 80),
    ),
    (
        "CONNECT 127.0.0.1:8080",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "01"  # CMD CONNECT
            "00"  # RSV
            "01"  # ATYP IPv4
            "7f000001"  # 127.0.0.1
            "1f90"  # DST.PORT 8080
        ),
        Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "127.0.0.1", 8080),
    ),
    (
        "BIND [::1]:0",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "02"  # CMD BIND
            "00"  # RSV
            "04"  # ATYP IPv6
            "00000000000000000000000000000001"  # ::1
            "0000"  # DST.PORT 0
        ),
        Socks5Request(Socks5Command.BIND, AddressType.IPV6, "::1", 0),
    ),
    (
        "UDP ASSOCIATE 0.0.0.0:0",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "03"  # CMD UDP ASSOCIATE
            "00"  # RSV
            "01"  # ATYP IPv4
            "00000000"  # 0.0.0.0: client does not know its address yet
            "0000"  # DST.PORT 0
        ),
        Socks5Request(Socks5Command.UDP_ASSOCIATE, AddressType.IPV4, "0.0.0.0", 0),
    ),
    (
        "CONNECT to a name that looks like an IPv4 address (type kept)",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "01"  # CMD CONNECT
            "00"  # RSV
            "03"  # ATYP domain name
            "07"  # length 7
            "312e322e332e34"  # "1.2.3.4" as a name
            "01bb"  # DST.PORT 443
        ),
        Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "1.2.3.4", 443),
    ),
    (
        "CONNECT to a UTF-8 name",
        socks5.decode_request,
        socks5.encode_request,
        bytes.fromhex(
            "05"  # VER 5
            "01"  # CMD CONNECT
            "00"  # RSV
            "03"  # ATYP domain name
            "0a"  # length 10: bytes, not characters
            "62c3bc636865722e6465"  # "bücher.de" in UTF-8
            "01bb"  # DST.PORT 443
        ),
        Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "bücher.de", 443),
    ),
    (
        "reply: success, bound to 127.0.0.1:40000",
        socks5.decode_reply,
        socks5.encode_reply,
        bytes.fromhex(
            "05"  # VER 5
            "00"  # REP succeeded
            "00"  # RSV
            "01"  # ATYP IPv4
            "7f000001"  # BND.ADDR 127.0.0.1
            "9c40"  # BND.PORT 40000
        ),
        Socks5Reply(ReplyCode.SUCCESS, AddressType.IPV4, "127.0.0.1", 40000),
    ),
    (
        "reply: connection refused, IPv6 BND",
        socks5.decode_reply,
        socks5.encode_reply,
        bytes.fromhex(
            "05"  # VER 5
            "05"  # REP connection refused
            "00"  # RSV
            "04"  # ATYP IPv6
            "20010db8000000000000000000000001"  # 2001:db8::1
            "0000"  # BND.PORT 0
        ),
        Socks5Reply(ReplyCode.CONNECTION_REFUSED, AddressType.IPV6, "2001:db8::1", 0),
    ),
    (
        "reply: address type not supported, domain BND",
        socks5.decode_reply,
        socks5.encode_reply,
        bytes.fromhex(
            "05"  # VER 5
            "08"  # REP address type not supported
            "00"  # RSV
            "03"  # ATYP domain name
            "09"  # length 9
            "6c6f63616c686f7374"  # "localhost"
            "0438"  # BND.PORT 1080
        ),
        Socks5Reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, AddressType.DOMAIN_NAME, "localhost", 1080),
    ),
    (
        "curl username/password request",
        socks5.decode_userpass_request,
        socks5.encode_userpass_request,
        bytes.fromhex(
            "01"  # VER 1 (RFC 1929)
            "04"  # ULEN 4
            "75736572"  # UNAME "user"
            "04"  # PLEN 4
            "70617373"  # PASSWD "pass"
        ),
        UserPassRequest(b"user", b"pass"),
    ),
    (
        "username/password request with an empty password (PLEN 0, as curl sends)",
        socks5.decode_userpass_request,
        socks5.encode_userpass_request,
        bytes.fromhex(
            "01"  # VER 1
            "05"  # ULEN 5
            "616c696365"  # UNAME "alice"
            "00"  # PLEN 0: outside RFC 1929's 1-255, accepted
        ),
        UserPassRequest(b"alice", b""),
    ),
    (
        "username/password request with empty username and password",
        socks5.decode_userpass_request,
        socks5.encode_userpass_request,
        bytes.fromhex("010000"),  # VER 1, ULEN 0, PLEN 0
        UserPassRequest(b"", b""),
    ),
    (
        "username/password reply: success",
        socks5.decode_userpass_reply,
        socks5.encode_userpass_reply,
        bytes.fromhex("0100"),  # VER 1, STATUS 0
        UserPassReply(UserPassStatus.SUCCESS),
    ),
    (
        "username/password reply: failure",
        socks5.decode_userpass_reply,
        socks5.encode_userpass_reply,
        bytes.fromhex("0101"),  # VER 1, STATUS 1
        UserPassReply(UserPassStatus.FAILURE),
    ),
]
_IDS = [v[0] for v in STREAM_VECTORS]
# Accepted on input, never sent: RFC 1929 says ULEN and PLEN are 1 to 255 (review item 7).
_ACCEPTED_NOT_SENT = {
    "username/password request with an empty password (PLEN 0, as curl sends)",
    "username/password request with empty username and password",
}


@pytest.mark.parametrize(("name", "decode", "encode", "wire", "message"), STREAM_VECTORS, ids=_IDS)
def test_golden_vector(name: str, decode: Decoder, encode: Encoder, wire: bytes, message: object) -> None:
    if name in _ACCEPTED_NOT_SENT:
        with pytest.raises(LocalProtocolError):
            encode(message)
    else:
        assert encode(message) == wire
    # Whole, with the next message behind it, at an offset, and from each buffer type.
    n = len(wire)
    assert decode(wire) == (message, n)
    assert decode(wire + wire) == (message, n)
    assert decode(wire + wire, n) == (message, n)
    assert decode(b"\xaa\xbb" + wire + b"\x05", 2) == (message, n)
    assert decode(bytearray(wire)) == (message, n)
    assert decode(memoryview(b"z" + wire)[1:]) == (message, n)


@pytest.mark.conformance("REQ-07")
@pytest.mark.parametrize(("name", "decode", "encode", "wire", "message"), STREAM_VECTORS, ids=_IDS)
def test_golden_vector_byte_by_byte(
    name: str, decode: Decoder, encode: Encoder, wire: bytes, message: object
) -> None:
    """Every prefix asks for more, never past the end of the message (REQ-07)."""
    buffer = bytearray()
    for byte in wire[:-1]:
        buffer.append(byte)
        result, needed = decode(buffer)
        assert result is None
        assert 0 < needed <= len(wire) - len(buffer)
    buffer.append(wire[-1])
    assert decode(buffer) == (message, len(wire))


@pytest.mark.parametrize(
    ("decode", "prefix", "needed"),
    [
        (socks5.decode_greeting, "", 2),
        (socks5.decode_greeting, "05", 1),
        (socks5.decode_greeting, "0503", 3),
        (socks5.decode_greeting, "050300", 2),
        (socks5.decode_method_selection, "", 2),
        # Request/reply: 3 header bytes, shortest address (ATYP, len, 1 char), port.
        (socks5.decode_request, "", 8),
        (socks5.decode_request, "050100", 5),
        (socks5.decode_request, "05010001", 6),  # IPv4: 4 + 2
        (socks5.decode_request, "05010004", 18),  # IPv6: 16 + 2
        (socks5.decode_request, "05010003", 4),  # length byte, 1 char, port
        (socks5.decode_request, "050100030b", 13),  # 11 chars + port
        (socks5.decode_reply, "0500", 6),
        (socks5.decode_userpass_request, "", 3),
        (socks5.decode_userpass_request, "01", 2),
        (socks5.decode_userpass_request, "0104", 5),  # 4 bytes UNAME + PLEN
        (socks5.decode_userpass_request, "010475736572", 1),  # PLEN
        (socks5.decode_userpass_request, "01047573657203", 3),  # PASSWD
        (socks5.decode_userpass_reply, "01", 1),
    ],
)
def test_needed_is_smallest_completion(decode: Decoder, prefix: str, needed: int) -> None:
    assert decode(bytes.fromhex(prefix)) == (None, needed)


# (decoder, bytes, reply code, length of the shortest prefix that raises)
ERROR_VECTORS: list[tuple[Decoder, bytes, ReplyCode | None, int]] = [
    # A SOCKS 4 client talking to the SOCKS 5 path: no reply applies.
    (socks5.decode_greeting, bytes.fromhex("04010050"), None, 1),
    (socks5.decode_method_selection, bytes.fromhex("0400"), None, 1),
    (socks5.decode_request, bytes.fromhex("06010001"), None, 1),
    (socks5.decode_reply, bytes.fromhex("00"), None, 1),
    (socks5.decode_userpass_request, bytes.fromhex("05010061"), None, 1),
    (socks5.decode_userpass_reply, bytes.fromhex("0500"), None, 1),
    # CMD 0 (SOCKS 6 NOOP) and 9 are not SOCKS 5 commands: raised at byte 2.
    (socks5.decode_request, bytes.fromhex("05000001"), ReplyCode.COMMAND_NOT_SUPPORTED, 2),
    (socks5.decode_request, bytes.fromhex("0509"), ReplyCode.COMMAND_NOT_SUPPORTED, 2),
    # ATYP 2 is unassigned: raised at byte 4.
    (socks5.decode_request, bytes.fromhex("0501000200"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, 4),
    (socks5.decode_reply, bytes.fromhex("05000005"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, 4),
    # Domain names: empty (at the length byte), NUL inside, not UTF-8 (when whole).
    (socks5.decode_request, bytes.fromhex("0501000300"), ReplyCode.GENERAL_FAILURE, 5),
    (socks5.decode_request, bytes.fromhex("05010003 02 6100 0050"), ReplyCode.GENERAL_FAILURE, 9),
    (socks5.decode_reply, bytes.fromhex("05000003 02 c328 0050"), ReplyCode.GENERAL_FAILURE, 9),
]


@pytest.mark.parametrize(("decode", "wire", "code", "at"), ERROR_VECTORS)
def test_malformed_raises_as_soon_as_byte_present(
    decode: Decoder, wire: bytes, code: ReplyCode | None, at: int
) -> None:
    """Prefixes before the offending byte ask for more; from it on, the same WireError."""
    for k in range(at):
        assert decode(wire[:k])[0] is None
    for k in range(at, len(wire) + 1):
        with pytest.raises(WireError) as info:
            decode(wire[:k])
        assert info.value.reply_code == code


def test_unassigned_reply_code_and_status_kept_as_int() -> None:
    # SOCKS 6's 0x09 (Connection timed out) is unassigned in SOCKS 5; Tor sends 0xF0-0xF6.
    reply, _ = socks5.decode_reply(bytes.fromhex("05 09 00 01 00000000 0000"))
    assert reply is not None
    assert reply.reply_code == 9 and not isinstance(reply.reply_code, ReplyCode)
    reply, _ = socks5.decode_reply(bytes.fromhex("05 f4 00 01 00000000 0000"))
    assert reply is not None and reply.reply_code == 0xF4
    status, _ = socks5.decode_userpass_reply(bytes.fromhex("01 7f"))
    assert status == UserPassReply(0x7F)


def test_rsv_ignored_on_input() -> None:
    request, consumed = socks5.decode_request(bytes.fromhex("05 01 ff 01 7f000001 0050"))
    assert request == Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80)
    assert consumed == 10


def test_greeting_without_methods_decodes_empty() -> None:
    """NMETHODS 0: decoded (the proxy answers 0xFF) but never sent."""
    assert socks5.decode_greeting(bytes.fromhex("0500")) == (Socks5Greeting(()), 2)
    with pytest.raises(LocalProtocolError):
        socks5.encode_greeting(Socks5Greeting(()))


# --- UDP request header (RFC 1928 section 7) ----------------------------------------

UDP_VECTORS: list[tuple[bytes, Socks5UDPHeader]] = [
    (
        bytes.fromhex(
            "0000"  # RSV
            "00"  # FRAG 0: standalone
            "01"  # ATYP IPv4
            "7f000001"  # DST.ADDR 127.0.0.1
            "0035"  # DST.PORT 53
        ),
        Socks5UDPHeader(AddressType.IPV4, "127.0.0.1", 53),
    ),
    (
        bytes.fromhex(
            "0000"  # RSV
            "00"  # FRAG 0
            "04"  # ATYP IPv6
            "00000000000000000000000000000001"  # ::1
            "1389"  # DST.PORT 5001
        ),
        Socks5UDPHeader(AddressType.IPV6, "::1", 5001),
    ),
    (
        bytes.fromhex(
            "0000"  # RSV
            "03"  # FRAG 3: fragmented, the caller drops it
            "03"  # ATYP domain name
            "09"  # length 9
            "6c6f63616c686f7374"  # "localhost"
            "0007"  # DST.PORT 7
        ),
        Socks5UDPHeader(AddressType.DOMAIN_NAME, "localhost", 7, fragment=3),
    ),
]


@pytest.mark.parametrize(("wire", "header"), UDP_VECTORS)
def test_udp_header(wire: bytes, header: Socks5UDPHeader) -> None:
    assert socks5.encode_udp_header(header) == wire
    payload = b"\x00\x01payload"
    assert socks5.decode_udp_header(wire + payload) == (header, len(wire))
    assert socks5.decode_udp_header(b"xx" + wire, 2) == (header, len(wire))
    # An empty payload is legal; a truncated header is not.
    assert socks5.decode_udp_header(wire) == (header, len(wire))
    for k in range(len(wire)):
        with pytest.raises(WireError):
            socks5.decode_udp_header(wire[:k])


def test_udp_header_unknown_address_type() -> None:
    with pytest.raises(WireError) as info:
        socks5.decode_udp_header(bytes.fromhex("0000 00 07 7f000001 0035"))
    assert info.value.reply_code == ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


# --- RFC 1929 inside SOCKS 6 Authentication Data (draft-11 "Username/Password
# Authentication") --------------------------------------------------------------------


@pytest.mark.conformance("AUTH-05")
def test_userpass_request_inside_auth_data_option() -> None:
    """AUTH-05: the proxy reads the RFC 1929 request of a method-2 option, ignoring padding."""
    option = bytes.fromhex(
        "0004"  # Kind 4: Authentication Data
        "0014"  # Length 20
        "02"  # Method 2: username/password
        "01"  # RFC 1929 VER 1
        "05"  # ULEN 5
        "616c696365"  # "alice"
        "06"  # PLEN 6
        "736563726574"  # "secret"
        "00"  # Padding to a multiple of 4
    )
    assert len(option) == 20
    data = option[5:]
    assert socks5.decode_userpass_request(data) == (UserPassRequest(b"alice", b"secret"), 14)
    assert socks5.encode_userpass_request(UserPassRequest(b"alice", b"secret")) == data[:14]


@pytest.mark.conformance("AUTH-05")
def test_userpass_reply_inside_auth_data_option() -> None:
    """AUTH-05: the client reads the RFC 1929 reply of the proxy's method-2 option."""
    option = bytes.fromhex(
        "0004"  # Kind 4: Authentication Data
        "0008"  # Length 8
        "02"  # Method 2
        "01"  # RFC 1929 VER 1
        "00"  # STATUS success
        "00"  # Padding
    )
    assert socks5.decode_userpass_reply(option, 5) == (UserPassReply(UserPassStatus.SUCCESS), 2)


# --- Encoders validate ------------------------------------------------------------


@pytest.mark.parametrize(
    ("encode", "message"),
    [
        (socks5.encode_greeting, Socks5Greeting(tuple([0] * 256))),
        (socks5.encode_greeting, Socks5Greeting((256,))),
        (socks5.encode_greeting, Socks5Greeting((-1,))),
        (socks5.encode_method_selection, Socks5MethodSelection(0x100)),
        (socks5.encode_request, Socks5Request(0, AddressType.IPV4, "0.0.0.0", 0)),  # type: ignore[arg-type]
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "1.2.3.256", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "::1", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV6, "1.2.3.4", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV6, "fe80::1%eth0", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "a" * 256, 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "a\0b", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.DOMAIN_NAME, "\udc80", 1)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, 2, "x", 1)),  # type: ignore[arg-type]
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "127.0.0.1", 65536)),
        (socks5.encode_request, Socks5Request(Socks5Command.CONNECT, AddressType.IPV4, "127.0.0.1", -1)),
        (socks5.encode_reply, Socks5Reply(ReplyCode.CONNECTION_TIMED_OUT, AddressType.IPV4, "0.0.0.0", 0)),
        (socks5.encode_reply, Socks5Reply(0xF0, AddressType.IPV4, "0.0.0.0", 0)),
        (socks5.encode_udp_header, Socks5UDPHeader(AddressType.IPV4, "127.0.0.1", 1, fragment=256)),
        (socks5.encode_userpass_request, UserPassRequest(b"u" * 256, b"p")),
        (socks5.encode_userpass_request, UserPassRequest(b"u", b"p" * 256)),
        (socks5.encode_userpass_request, UserPassRequest(b"u", "p")),  # type: ignore[arg-type]
        (socks5.encode_userpass_reply, UserPassReply(256)),
    ],
)
def test_encoder_rejects_illegal_values(encode: Encoder, message: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode(message)


# --- Properties -------------------------------------------------------------------

STREAM_DECODERS: list[Decoder] = [
    socks5.decode_greeting,
    socks5.decode_method_selection,
    socks5.decode_request,
    socks5.decode_reply,
    socks5.decode_userpass_request,
    socks5.decode_userpass_reply,
]
ENCODER_OF: dict[Decoder, Encoder] = {
    socks5.decode_greeting: socks5.encode_greeting,
    socks5.decode_method_selection: socks5.encode_method_selection,
    socks5.decode_request: socks5.encode_request,
    socks5.decode_reply: socks5.encode_reply,
    socks5.decode_userpass_request: socks5.encode_userpass_request,
    socks5.decode_userpass_reply: socks5.encode_userpass_reply,
}


# Random tails behind plausible headers reach past the version, command and ATYP checks.
_HEADS = [b"\x05", b"\x01", b"\x01\x02", b"\x05\x01\x00\x01", b"\x05\x00\x00\x03\x03", b"\x05\x03\x00\x04"]
_random_wire = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.sampled_from(_HEADS), st.binary(max_size=40)).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(decode=st.sampled_from(STREAM_DECODERS), data=_random_wire)
@example(decode=socks5.decode_userpass_request, data=b"\x01\x00\x00")  # ULEN 0, PLEN 0: found by hypothesis
def test_random_bytes_only_wire_error(decode: Decoder, data: bytes) -> None:
    """Only WireError escapes; a decoded message re-encodes and decodes to itself; splits agree."""
    try:
        message, count = decode(data)
    except WireError:
        # The same error from every prefix that holds the offending byte.
        return
    assert count > 0
    if message is None:
        assert all(decode(data[:k])[0] is None for k in range(len(data)))
        return
    assert count <= len(data)
    assert decode(data[:count]) == (message, count)
    for k in range(count):
        assert decode(data[:k])[0] is None
    if (
        message in (Socks5Greeting(()),)
        or (isinstance(message, Socks5Reply) and not isinstance(message.reply_code, ReplyCode))
        or (isinstance(message, UserPassRequest) and not (message.username and message.password))
    ):
        # Accepted on input, never sent: NMETHODS 0, unassigned REP, an RFC 1929 ULEN or PLEN of
        # 0 (the check then fails as any wrong password does; the encoder keeps RFC 1929's 1-255).
        with pytest.raises(LocalProtocolError):
            ENCODER_OF[decode](message)
        return
    wire = ENCODER_OF[decode](message)
    assert decode(wire) == (message, len(wire))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40), offset=st.integers(0, 3))
def test_random_datagrams_only_wire_error(data: bytes, offset: int) -> None:
    data = bytes(offset) + data
    try:
        header, length = socks5.decode_udp_header(data, offset)
    except WireError:
        return
    assert offset + length <= len(data)
    wire = socks5.encode_udp_header(header)
    assert socks5.decode_udp_header(wire) == (header, len(wire))


_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=80
).filter(lambda s: len(s.encode()) <= 255)
_addresses = st.one_of(
    st.tuples(st.just(AddressType.IPV4), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just(AddressType.IPV6), st.ip_addresses(v=6).map(str)),
    st.tuples(st.just(AddressType.DOMAIN_NAME), _names),
)
_ports = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(
    command=st.sampled_from(Socks5Command),
    code=st.sampled_from([c for c in ReplyCode if c != ReplyCode.CONNECTION_TIMED_OUT]),
    address=_addresses,
    port=_ports,
    username=st.binary(min_size=1, max_size=255),
    password=st.binary(min_size=1, max_size=255),
)
def test_round_trip(
    command: Socks5Command,
    code: ReplyCode,
    address: tuple[AddressType, str],
    port: int,
    username: bytes,
    password: bytes,
) -> None:
    request = Socks5Request(command, address[0], address[1], port)
    wire = socks5.encode_request(request)
    assert socks5.decode_request(wire) == (request, len(wire))
    reply = Socks5Reply(code, address[0], address[1], port)
    wire = socks5.encode_reply(reply)
    assert socks5.decode_reply(wire) == (reply, len(wire))
    header = Socks5UDPHeader(address[0], address[1], port)
    wire = socks5.encode_udp_header(header)
    assert socks5.decode_udp_header(wire + b"data") == (header, len(wire))
    creds = UserPassRequest(username, password)
    wire = socks5.encode_userpass_request(creds)
    assert socks5.decode_userpass_request(wire + bytes(3)) == (creds, len(wire))


def test_offset_outside_buffer_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        socks5.decode_request(b"\x05", 2)


@pytest.mark.parametrize("decode", [v[1] for v in STREAM_VECTORS] + [socks5.decode_udp_header])
@pytest.mark.parametrize("offset", [-1, 3])
def test_bad_offset_is_wire_error_like_socks6(decode: Decoder, offset: int) -> None:
    """Review item 8: a bad offset is WireError(reply_code=None), as in the SOCKS 6 codec."""
    with pytest.raises(WireError) as info:
        decode(b"\x05\x01", offset)
    assert type(info.value) is WireError
    assert (str(info.value), info.value.reply_code) == (f"offset {offset} is out of range", None)


@pytest.mark.conformance("AUTH-05")
@pytest.mark.parametrize(
    ("username", "password", "what"),
    [(b"", b"pw", "username"), (b"alice", b"", "password"), (b"", b"", "username")],
)
def test_userpass_encoder_refuses_empty_credentials(username: bytes, password: bytes, what: str) -> None:
    """Review item 7 (AUTH-05): RFC 1929 ULEN/PLEN are 1-255 on send; 0 is still accepted on input."""
    with pytest.raises(LocalProtocolError, match=f"^{what} must be bytes of length 1-255$"):
        socks5.encode_userpass_request(UserPassRequest(username, password))
    wire = b"\x01" + bytes([len(username)]) + username + bytes([len(password)]) + password
    assert socks5.decode_userpass_request(wire) == (UserPassRequest(username, password), len(wire))
