"""Golden vectors and contract tests for both codec twins (tests/codec_api.py).

Every vector is hand-written hex annotated field by field (httpcore
tests/_async/test_socks_proxy.py style), decoded whole, re-encoded, and fed
one byte at a time (h11 tests/test_io.py "incrementally growing buffer").

Coverage of docs/decisions.md. In scope for the codec, each with a test named after it:
  D2 (domain name padding, REQ-09), D3 (Expenditure length 8), D5 (Datagram
  Header field order), D6 (options cap, REQ-03), D8 (option lengths, unknown
  kinds, REQ-05/REQ-06), D11 as data (NOOP addresses decode; the check is the
  proxy's, while our encoder sends only the zero address, REQ-04), D12 (initial
  data length), D15 as data (a Token Request for 0 decodes).
The decisions of the codec review (option placement, unsupported Stack values,
Leg 2, NOOP, datagram too big, D2 padding, bool, byte counts) have a section of
their own, each test naming its review item (and carrying its conformance marker).
Out of scope here (connection/server behaviour, tested by their owners):
  D1 (SOCKS 5 on the same listener), D4 (which reply carries the Session ID),
  D7 (username/password exchange), D9 (echoing Stack options), D10 (contradictory
  Stack options), D11 (the NOOP address rule itself), D13 (DNS service),
  D14 (what the proxy replies to an unparsable request).
"""

# Encoder refusal tables pass ill-typed values on purpose.
# mypy: disable-error-code="arg-type"

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from codec_api import CodecAPI

from socks6fast.constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
)
from socks6fast.errors import LocalProtocolError, WireError
from socks6fast.proto.messages import (
    AssociationConfirmation,
    AssociationInit,
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    Datagram,
    DatagramError,
    DatagramHeader,
    HappyEyeballsOption,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    NoFragmentationOption,
    OperationReply,
    Option,
    PortParityOption,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    SessionRequest,
    SessionTeardown,
    TFOOption,
    TTLOption,
    UDPErrorOption,
    UnknownOption,
    UnknownStackOption,
)

GF = ReplyCode.GENERAL_FAILURE
ATNS = ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
AID = b"\x11\x22\x33\x44\x55\x66\x77\x88"


def h(annotated: str) -> bytes:
    """Hex with ``#`` comments and any whitespace or ``|`` separators."""
    return bytes.fromhex(re.sub(r"[\s|]", "", re.sub(r"#[^\n]*", "", annotated)))


# =================================================================================
# Option vectors (section "SOCKS Options" and every subsection)
# =================================================================================

OPTION_VECTORS: list[tuple[str, str, Option]] = [
    (
        "ip-tos",
        """0001 0008   # Kind = 1 (Stack), Length = 8
           c1          # Leg = 3 (both) << 6 | Level = 1 (IP)
           01          # Code = 1 (IP TOS)
           b8 00       # TOS = 0xb8 (EF), Padding""",
        IPTOSOption(StackLeg.BOTH, 0xB8),
    ),
    (
        "happy-eyeballs",
        """0001 0008 | 81 02 | 02 00   # Leg 2 | Level 1, Code 2, Availability = desired""",
        HappyEyeballsOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    ),
    (
        "ttl",
        """0001 0008 | 41 03 | 40 00   # Leg 1 (client-proxy) | Level 1, Code 3, TTL = 64""",
        TTLOption(StackLeg.CLIENT_PROXY, 64),
    ),
    (
        "no-fragmentation",
        """0001 0008 | c1 04 | 01 00   # Leg 3 | Level 1, Code 4, Availability = not desired""",
        NoFragmentationOption(StackLeg.BOTH, Availability.NOT_DESIRED),
    ),
    (
        "tfo",
        """0001 0008 | 84 01 | 05b4    # Leg 2 | Level 4 (TCP), Code 1, Payload Size = 1460""",
        TFOOption(StackLeg.PROXY_REMOTE, 1460),
    ),
    (
        "multipath",
        """0001 0008 | 84 02 | 02 00   # Leg 2 | Level 4, Code 2, Availability = desired""",
        MultipathOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    ),
    (
        "listen-backlog",
        """0001 0008 | 84 03 | 0080    # Leg 2 | Level 4, Code 3, Backlog = 128""",
        ListenBacklogOption(StackLeg.PROXY_REMOTE, 128),
    ),
    (
        "udp-error",
        """0001 0008 | 85 01 | 02 00   # Leg 2 | Level 5 (UDP), Code 1, Availability = desired""",
        UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
    ),
    (
        "port-parity",
        """0001 0008 | 85 02 | 01 01   # Leg 2 | Level 5, Code 2, Parity = even, Reserve = 1""",
        PortParityOption(StackLeg.PROXY_REMOTE, Parity.EVEN, True),
    ),
    (
        "port-parity-none",
        """0001 0008 | 85 02 | 00 00   # Parity = none, Reserve = 0""",
        PortParityOption(StackLeg.PROXY_REMOTE, Parity.NONE, False),
    ),
    (
        "unknown-stack-level",
        """0001 000c   # Kind 1, Length 12
           82          # Leg 2 | Level 2 (IPv4): no IPv4-level option is defined
           07          # Code 7
           aabb ccdd eeff   # data kept opaque, padding included""",
        UnknownStackOption(2, 2, 7, bytes.fromhex("aabbccddeeff")),
    ),
    (
        "unknown-stack-leg-0",
        """0001 0008 | 01 01 | 2e 00   # Leg 0 (undefined) | Level 1, Code 1 (would be IP TOS)""",
        UnknownStackOption(0, 1, 1, b"\x2e\x00"),
    ),
    (
        "auth-method-advertisement",
        """0002 0008   # Kind = 2, Length = 8
           0400        # Initial Data Length = 1024
           02          # Method 2 (username/password)
           00          # Padding (minimal)""",
        AuthMethodAdvertisement(1024, (2,)),
    ),
    (
        "auth-method-advertisement-3",
        """0002 000c | 0000 | 01 02 80 | 00 00 00   # IDL 0, methods 1, 2, 0x80, 3 bytes padding""",
        AuthMethodAdvertisement(0, (1, 2, 0x80)),
    ),
    (
        "auth-method-advertisement-empty",
        """0002 0008 | 4000 | 0000   # IDL = 2^14 (the maximum, D12), no methods""",
        AuthMethodAdvertisement(16384, ()),
    ),
    (
        "auth-method-selection",
        """0003 0008 | 02 | 000000   # Kind = 3, Method = 2, Padding""",
        AuthMethodSelection(2),
    ),
    (
        "auth-method-selection-none-acceptable",
        """0003 0008 | ff | 000000   # Method = 0xff (no acceptable methods)""",
        AuthMethodSelection(0xFF),
    ),
    (
        "auth-data-userpass-request",
        """0004 0010   # Kind = 4, Length = 16 (4 + 1 + 9 + 2 padding)
           02          # Method = 2
           01          # RFC 1929 VER = 1
           04 75736572 # ULEN = 4, "user"
           02 7077     # PLEN = 2, "pw"
           0000        # Padding (kept in data: only the method knows its length)""",
        AuthData(2, h("01 04 75736572 02 7077 0000")),
    ),
    (
        "auth-data-userpass-reply",  # figure "Reply to password authentication via a SOCKS Option"
        """0004 0008 | 02 | 01 00 | 00   # Method 2, RFC 1929 reply VER 1 STATUS 0, Padding""",
        AuthData(2, b"\x01\x00\x00"),
    ),
    ("session-request", "0005 0004   # Kind = 5, Length = 4", SessionRequest()),
    (
        "session-id",
        """0006 000c | 0123456789abcdef   # Kind = 6, Length = 12, 8-byte Session ID""",
        SessionID(bytes.fromhex("0123456789abcdef")),
    ),
    ("session-ok", "0008 0004   # Kind = 8", SessionOK()),
    ("session-invalid", "0009 0004   # Kind = 9", SessionInvalid()),
    ("session-teardown", "000a 0004   # Kind = 10", SessionTeardown()),
    (
        "idempotence-request",
        """000b 0008 | 00000100   # Kind = 11, Window Size = 256""",
        IdempotenceRequest(256),
    ),
    (
        "idempotence-window",
        """000c 000c | fffffff0 | 7fffffff   # Kind 12, Base = 2^32 - 16, Size = 2^31 - 1 (max)""",
        IdempotenceWindow(0xFFFFFFF0, 0x7FFFFFFF),
    ),
    (
        "idempotence-expenditure",
        """000d 0008 | deadbeef   # Kind = 13, Length = 8 (D3), Token""",
        IdempotenceExpenditure(0xDEADBEEF),
    ),
    ("idempotence-accepted", "000e 0004   # Kind = 14", IdempotenceAccepted()),
    ("idempotence-rejected", "000f 0004   # Kind = 15", IdempotenceRejected()),
    (
        "unknown-kind-0",
        """0000 0004   # Kind 0 (unassigned), no data""",
        UnknownOption(0, b""),
    ),
    (
        "unknown-kind-resolution",
        """0010 0008 | 01020304   # Kind 16 (listed in IANA, not defined by draft-11)""",
        UnknownOption(16, b"\x01\x02\x03\x04"),
    ),
    (
        "unknown-kind-experimental",
        """fc00 000c | 0001020304050607   # Kind 64512 (experimental range)""",
        UnknownOption(64512, bytes(range(8))),
    ),
    (
        "unknown-kind-ffff",
        """ffff 0008 | ffffffff   # Kind 65535""",
        UnknownOption(65535, b"\xff" * 4),
    ),
]


@pytest.mark.parametrize(("name", "wire", "option"), OPTION_VECTORS, ids=[v[0] for v in OPTION_VECTORS])
def test_option_vector(codec: CodecAPI, name: str, wire: str, option: Option) -> None:
    data = h(wire)
    assert codec.decode_options(data) == (option,)
    assert codec.encode_options((option,)) == data
    assert codec.encode_options([option]) == data


def test_all_options_in_one_run(codec: CodecAPI) -> None:
    data = b"".join(h(v[1]) for v in OPTION_VECTORS)
    options = tuple(v[2] for v in OPTION_VECTORS)
    assert codec.decode_options(data) == options
    assert codec.encode_options(options) == data
    # offset and length select a slice of a bigger buffer
    framed = b"\xee" * 3 + data + b"\xee" * 5
    assert codec.decode_options(framed, 3, len(data)) == options
    assert codec.decode_options(memoryview(framed), 3, len(data)) == options
    assert codec.decode_options(bytearray(framed), 3 + len(data), 0) == ()


def test_options_tolerate_nonzero_padding(codec: CodecAPI) -> None:
    """Padding bytes are never inspected: nonzero padding decodes like zeros."""
    data = h("""0001 0008 | c1 01 | b8 ff     # IP TOS, padding 0xff
                0003 0008 | 02 | ffffff      # Method Selection, padding 0xffffff""")
    assert codec.decode_options(data) == (IPTOSOption(StackLeg.BOTH, 0xB8), AuthMethodSelection(2))


def test_auth_data_encoder_pads_to_4(codec: CodecAPI) -> None:
    for size in range(9):
        data = bytes(range(1, size + 1))
        wire = codec.encode_options((AuthData(7, data),))
        assert len(wire) % 4 == 0
        assert len(wire) == 4 + ((1 + size + 3) // 4) * 4
        (decoded,) = codec.decode_options(wire)
        assert isinstance(decoded, AuthData)
        assert decoded.method == 7
        assert decoded.data == data + bytes(len(wire) - 5 - size)


def test_advertisement_extra_padding_and_inner_zero(codec: CodecAPI) -> None:
    """Trailing NULs are padding however many; a zero between methods is kept."""
    assert codec.decode_options(h("0002 000c | 0000 | 02 00000000 00")) == (AuthMethodAdvertisement(0, (2,)),)
    assert codec.decode_options(h("0002 0008 | 0000 | 00 02")) == (AuthMethodAdvertisement(0, (0, 2)),)


# =================================================================================
# Message vectors
# =================================================================================


@dataclass(frozen=True)
class Vector:
    name: str
    kind: str  # "request" | "auth_reply" | "operation_reply" | "association"
    wire: str
    message: Any
    encodes: bool = True  # False: accepted form that we do not send (D2 draft-12 form)
    encodable: bool = True  # False: accepted, but our encoder refuses to send it (D11 / REQ-04)


MESSAGE_VECTORS = [
    Vector(
        "request-connect-ipv4",
        "request",
        """06          # Version
           01          # Command = CONNECT
           0000        # Options Length = 0
           0050        # Port = 80
           00          # Padding
           01          # Address Type = IPv4
           7f000001    # 127.0.0.1""",
        Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80),
    ),
    Vector(
        "request-connect-domain-no-padding",
        "request",
        """06 01 0000 01bb 00 03   # CONNECT, port 443, Domain Name
           0b                      # length 11: 1 + 11 = 12, no padding needed
           6578616d706c652e636f6d  # "example.com" """,
        Request(Command.CONNECT, AddressType.DOMAIN_NAME, "example.com", 443),
    ),
    Vector(
        "request-connect-domain-d2-padding",
        "request",
        """06 01 0000 0016 00 03   # CONNECT, port 22, Domain Name
           04 612e696f             # length 4 (without padding, D2), "a.io"
           000000                  # 3 NULs: the field is 8 bytes""",
        Request(Command.CONNECT, AddressType.DOMAIN_NAME, "a.io", 22),
    ),
    Vector(
        "request-connect-domain-draft12-form",
        "request",
        """06 01 0000 0016 00 03
           07 612e696f 000000      # length 7 counts the padding (draft-12): accepted (D2)""",
        Request(Command.CONNECT, AddressType.DOMAIN_NAME, "a.io", 22),
        encodes=False,
    ),
    Vector(
        "request-connect-utf8-name",
        "request",
        """06 01 0000 0050 00 03
           06 c3a9 2e 636f 6d      # 6 bytes: "\u00e9.com" in UTF-8
           00                      # padding to 8""",
        Request(Command.CONNECT, AddressType.DOMAIN_NAME, "\u00e9.com", 80),
    ),
    Vector(
        "request-connect-ipv4-looking-name",
        "request",
        """06 01 0000 0050 00 03
           07 312e322e332e34       # "1.2.3.4" stays a Domain Name""",
        Request(Command.CONNECT, AddressType.DOMAIN_NAME, "1.2.3.4", 80),
    ),
    Vector(
        "request-bind-ipv6-session-backlog",
        "request",
        """06 02 000c 0000 00 04   # BIND, Options Length 12, port 0, IPv6
           00000000000000000000000000000000   # ::
           0005 0004               # Session Request
           0001 0008 84 03 0010    # Listen Backlog 16""",
        Request(
            Command.BIND,
            AddressType.IPV6,
            "::",
            0,
            (SessionRequest(), ListenBacklogOption(StackLeg.PROXY_REMOTE, 16)),
        ),
    ),
    Vector(
        "request-udp-associate-parity",
        "request",
        """06 03 0010 0000 00 01 00000000      # UDP ASSOCIATE 0.0.0.0:0, Options Length 16
           0001 0008 85 02 02 00               # Port Parity odd, no reserve
           0001 0008 85 01 02 00               # UDP Error desired""",
        Request(
            Command.UDP_ASSOCIATE,
            AddressType.IPV4,
            "0.0.0.0",
            0,
            (
                PortParityOption(StackLeg.PROXY_REMOTE, Parity.ODD, False),
                UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED),
            ),
        ),
    ),
    Vector(
        "request-noop-auth-0rtt",
        "request",
        """06 00 0018 0000 00 01 00000000      # NOOP 0.0.0.0:0 (D11), Options Length 24
           0002 0008 0000 02 00                # Advertisement: IDL 0, method 2
           0004 0010 02 01 04 75736572 02 7077 0000   # Auth Data: user / pw, 2 NULs""",
        Request(
            Command.NOOP,
            AddressType.IPV4,
            "0.0.0.0",
            0,
            (AuthMethodAdvertisement(0, (2,)), AuthData(2, h("01 04 75736572 02 7077 0000"))),
        ),
    ),
    Vector(
        "request-noop-any-address-is-data",  # D11 as data: the codec decodes, the proxy checks
        "request",
        """06 00 0000 0035 00 03 03 646e73   # NOOP to domain "dns", port 53""",
        Request(Command.NOOP, AddressType.DOMAIN_NAME, "dns", 53),
        encodes=False,
        encodable=False,
    ),
    Vector(
        "request-connect-session-spend-token",
        "request",
        """06 01 0014 0050 00 04 20010db8000000000000000000000001   # [2001:db8::1]:80
           0006 000c 0011223344556677   # Session ID
           000d 0008 0000002a           # Idempotence Expenditure, token 42""",
        Request(
            Command.CONNECT,
            AddressType.IPV6,
            "2001:db8::1",
            80,
            (SessionID(bytes.fromhex("0011223344556677")), IdempotenceExpenditure(42)),
        ),
    ),
    Vector(
        "request-unknown-options-skipped",
        "request",
        """06 01 0014 0050 00 01 0a000001   # 10.0.0.1:80, Options Length 20
           fc00 0008 cafebabe               # experimental kind 64512
           0001 000c 03 09 0102030405 06    # Stack option, Leg 0, Level 3, Code 9""",
        Request(
            Command.CONNECT,
            AddressType.IPV4,
            "10.0.0.1",
            80,
            (UnknownOption(64512, h("cafebabe")), UnknownStackOption(0, 3, 9, h("0102030405 06"))),
        ),
    ),
    Vector(
        "auth-reply-success",
        "auth_reply",
        """06 00 0000   # Version, Type = success, Options Length 0""",
        AuthReply(AuthReplyType.SUCCESS),
    ),
    Vector(
        "auth-reply-select-userpass",
        "auth_reply",
        """06 01 0008               # Type = failure, Options Length 8
           0003 0008 02 000000      # Method Selection: 2 must proceed""",
        AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(2),)),
    ),
    Vector(
        "auth-reply-session-window",
        "auth_reply",
        """06 00 0024                       # success, Options Length 36
           0008 0004                        # Session OK
           000c 000c 00000064 00000010      # Idempotence Window base 100 size 16
           000e 0004                        # Idempotence Accepted
           0004 0008 02 0100 00             # Auth Data: RFC 1929 reply, success
           0010 0008 00000000               # unknown kind 16""",
        AuthReply(
            AuthReplyType.SUCCESS,
            (
                SessionOK(),
                IdempotenceWindow(100, 16),
                IdempotenceAccepted(),
                AuthData(2, b"\x01\x00\x00"),
                UnknownOption(16, bytes(4)),
            ),
        ),
    ),
    Vector(
        "auth-reply-session-invalid",
        "auth_reply",
        """06 01 0008 | 0009 0004 | 000f 0004   # failure: Session Invalid, Idempotence Rejected""",
        AuthReply(AuthReplyType.FAILURE, (SessionInvalid(), IdempotenceRejected())),
    ),
    Vector(
        "operation-reply-success-ipv4-session",
        "operation_reply",
        """06 00 000c 0438 00 01 c0000201   # success, Options Length 12, 192.0.2.1:1080
           0006 000c 0102030405060708       # Session ID (D4: in the Operation Reply)""",
        OperationReply(
            ReplyCode.SUCCESS, AddressType.IPV4, "192.0.2.1", 1080, (SessionID(bytes(range(1, 9))),)
        ),
    ),
    Vector(
        "operation-reply-host-unreachable-ipv6",
        "operation_reply",
        """06 04 0000 0000 00 04 00000000000000000000ffff01020304   # host unreachable, ::ffff:1.2.3.4""",
        OperationReply(ReplyCode.HOST_UNREACHABLE, AddressType.IPV6, "::ffff:102:304", 0),
    ),
    Vector(
        "operation-reply-stack-echo-domain",
        "operation_reply",
        """06 00 0030 9c40 00 03            # success, Options Length 48, port 40000, Domain Name
           0d 70726f78792e6578616d706c65 00 00   # 13, "proxy.example", 2 NULs (16-byte field)
           0001 0008 84 01 0000             # TFO, any payload size
           0001 0008 84 02 01 00            # Multipath not in use
           0001 0008 41 03 ff 00            # TTL 255 client-proxy
           0001 0008 81 01 10 00            # IP TOS 0x10 proxy-remote
           0001 0008 c1 04 02 00            # No Fragmentation enforced
           0001 0008 81 02 01 00            # Happy Eyeballs not performed""",
        OperationReply(
            ReplyCode.SUCCESS,
            AddressType.DOMAIN_NAME,
            "proxy.example",
            40000,
            (
                TFOOption(StackLeg.PROXY_REMOTE, 0),
                MultipathOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED),
                TTLOption(StackLeg.CLIENT_PROXY, 255),
                IPTOSOption(StackLeg.PROXY_REMOTE, 0x10),
                NoFragmentationOption(StackLeg.BOTH, Availability.DESIRED),
                HappyEyeballsOption(StackLeg.PROXY_REMOTE, Availability.NOT_DESIRED),
            ),
        ),
    ),
    Vector(
        "operation-reply-timeout",
        "operation_reply",
        """06 09 0000 0000 00 01 00000000   # Connection attempt timed out""",
        OperationReply(ReplyCode.CONNECTION_TIMED_OUT, AddressType.IPV4, "0.0.0.0", 0),
    ),
    Vector(
        "association-init",
        "association",
        """06 01 000c              # Version, Association Initialization, Message Length 12
           1122334455667788        # Association ID""",
        AssociationInit(AID),
    ),
    Vector(
        "association-confirmation",
        "association",
        """06 02 000c 1122334455667788   # Association Confirmation""",
        AssociationConfirmation(AID),
    ),
    Vector(
        "datagram-ipv4",
        "association",
        """06 03 0019              # Datagram, Message Length 25 = 20 + 5
           1122334455667788        # Association ID
           01 00 0035              # Address Type IPv4, Padding, Port 53 (D5 order)
           7f000001                # 127.0.0.1
           68656c6c6f              # payload "hello" """,
        Datagram(DatagramHeader(AID, AddressType.IPV4, "127.0.0.1", 53, 25), b"hello"),
    ),
    Vector(
        "datagram-domain",
        "association",
        """06 03 001f 1122334455667788   # Message Length 31 = 28 + 3
           03 00 1f90                    # Domain Name, Padding, Port 8080
           0b 6578616d706c652e636f6d     # "example.com" (12-byte field)
           616263                        # payload""",
        Datagram(DatagramHeader(AID, AddressType.DOMAIN_NAME, "example.com", 8080, 31), b"abc"),
    ),
    Vector(
        "datagram-empty-to-zero-address",  # UDP-06: confirms a server-mode association
        "association",
        """06 03 0020 1122334455667788 04 00 0000 00000000000000000000000000000000""",
        Datagram(DatagramHeader(AID, AddressType.IPV6, "::", 0, 32), b""),
    ),
    Vector(
        "datagram-error-ipv4",
        "association",
        """06 04 001c 1122334455667788   # Error, Message Length 28
           01 00 0035 08080808           # IPv4, Padding, Port 53, 8.8.8.8
           01 01 0000 0a000001           # Reporter IPv4, Network unreachable, Padding, 10.0.0.1""",
        DatagramError(
            AID,
            AddressType.IPV4,
            "8.8.8.8",
            53,
            AddressType.IPV4,
            "10.0.0.1",
            DatagramErrorCode.NETWORK_UNREACHABLE,
        ),
    ),
    Vector(
        "datagram-error-ipv6-too-big",
        "association",
        """06 04 0034 1122334455667788   # Message Length 52 = 16 + 16 + 4 + 16
           04 00 1389 20010db8000000000000000000000002   # [2001:db8::2]:5001
           04 04 0000 fe800000000000000000000000000001   # Reporter fe80::1, Datagram too big""",
        DatagramError(
            AID,
            AddressType.IPV6,
            "2001:db8::2",
            5001,
            AddressType.IPV6,
            "fe80::1",
            DatagramErrorCode.DATAGRAM_TOO_BIG,
        ),
    ),
]


def _decoder(codec: CodecAPI, kind: str) -> Callable[..., tuple[Any, int]]:
    table: dict[str, Callable[..., tuple[Any, int]]] = {
        "request": codec.decode_request,
        "auth_reply": codec.decode_auth_reply,
        "operation_reply": codec.decode_operation_reply,
        "association": codec.decode_association_message,
    }
    return table[kind]


def _encoder(codec: CodecAPI, kind: str) -> Callable[[Any], bytes]:
    table: dict[str, Callable[[Any], bytes]] = {
        "request": codec.encode_request,
        "auth_reply": codec.encode_auth_reply,
        "operation_reply": codec.encode_operation_reply,
        "association": codec.encode_association_message,
    }
    return table[kind]


def expected_needed(kind: str, wire: bytes, n: int) -> int:
    """The contract's ``needed`` for a prefix of ``n`` bytes of a valid message."""
    if kind == "association":
        return (4 if n < 4 else int.from_bytes(wire[2:4], "big")) - n
    if kind == "auth_reply":
        return 4 + (int.from_bytes(wire[2:4], "big") if n >= 4 else 0) - n
    smallest = 8 + (int.from_bytes(wire[2:4], "big") if n >= 4 else 0)
    address = 4
    if n >= 8:
        if wire[7] == AddressType.IPV6:
            address = 16
        elif wire[7] == AddressType.DOMAIN_NAME and n >= 9:
            address = (1 + wire[8] + 3) // 4 * 4
    return smallest + address - n


@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=[v.name for v in MESSAGE_VECTORS])
def test_message_vector(codec: CodecAPI, vector: Vector) -> None:
    data = h(vector.wire)
    decode = _decoder(codec, vector.kind)
    assert decode(data) == (vector.message, len(data))
    if not vector.encodable:
        with pytest.raises(LocalProtocolError):
            _encoder(codec, vector.kind)(vector.message)
    elif vector.encodes:
        assert _encoder(codec, vector.kind)(vector.message) == data
    else:
        reencoded = _encoder(codec, vector.kind)(vector.message)
        assert decode(reencoded) == (vector.message, len(reencoded))


@pytest.mark.conformance("REQ-07")
@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=[v.name for v in MESSAGE_VECTORS])
def test_message_vector_byte_by_byte_req07(codec: CodecAPI, vector: Vector) -> None:
    """REQ-07: every prefix yields (None, needed) per the formula; the whole yields the message."""
    data = h(vector.wire)
    decode = _decoder(codec, vector.kind)
    buf = bytearray()
    for n in range(len(data)):
        assert decode(buf) == (None, expected_needed(vector.kind, data, n)), n
        assert decode(memoryview(buf)) == (None, expected_needed(vector.kind, data, n))
        buf.append(data[n])
    assert decode(buf) == (vector.message, len(data))


@pytest.mark.conformance("REQ-07")
@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=[v.name for v in MESSAGE_VECTORS])
def test_message_vector_needed_never_overshoots_req07(codec: CodecAPI, vector: Vector) -> None:
    """REQ-07: reading exactly ``needed`` more bytes each time lands on the end, never past it."""
    data = h(vector.wire)
    decode = _decoder(codec, vector.kind)
    n = 0
    steps = 0
    while True:
        message, k = decode(data[:n])
        if message is not None:
            assert (message, k) == (vector.message, len(data))
            break
        assert k > 0
        n += k
        steps += 1
        assert n <= len(data)
    assert steps <= 4  # header, options length/address, address/name, rest


@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=[v.name for v in MESSAGE_VECTORS])
def test_message_vector_at_offset_with_trailing_data(codec: CodecAPI, vector: Vector) -> None:
    data = h(vector.wire)
    decode = _decoder(codec, vector.kind)
    framed = b"\xff\x00\x07" + data + b"\x06\x01\x02"
    assert decode(framed, 3) == (vector.message, len(data))
    assert decode(memoryview(framed), 3) == (vector.message, len(data))
    # The prefix before offset is never looked at, however short the rest.
    assert decode(framed[: 3 + 1], 3)[0] is None


def test_two_messages_back_to_back(codec: CodecAPI) -> None:
    first = codec.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS, (SessionOK(),)))
    second_msg = OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "192.0.2.7", 9)
    stream = first + codec.encode_operation_reply(second_msg)
    reply, used = codec.decode_auth_reply(stream)
    assert reply == AuthReply(AuthReplyType.SUCCESS, (SessionOK(),))
    assert codec.decode_operation_reply(stream, used) == (second_msg, len(stream) - used)


@pytest.mark.conformance("REQ-01")
def test_version_mismatch_reply_req01(codec: CodecAPI) -> None:
    """REQ-01: the Version Mismatch Reply is exactly one byte, 6."""
    assert codec.encode_version_mismatch() == b"\x06"


# =================================================================================
# Malformed input: error class, reply code, message, and the byte that triggers it
# =================================================================================


@dataclass(frozen=True)
class Bad:
    name: str
    kind: str
    wire: str
    raise_at: int  # the shortest prefix that raises; shorter prefixes need more data
    reply_code: ReplyCode | None
    message: str


REQ_V4 = "06 01 {ol} 0050 00 01 7f000001"  # CONNECT 127.0.0.1:80 with Options Length {ol}

BAD_VECTORS = [
    Bad("version-5", "request", "05 01 0000 0050 00 01 7f000001", 1, None, "version 5 is not 6"),
    Bad("version-0", "auth_reply", "00 00 0000", 1, None, "version 0 is not 6"),
    Bad("version-op", "operation_reply", "ff", 1, None, "version 255 is not 6"),
    Bad("version-assoc", "association", "07 01 000c", 1, None, "version 7 is not 6"),
    Bad("unknown-reply-code", "operation_reply", "06 0a 0000", 2, GF, "reply code 10 is unknown"),
    Bad("unknown-auth-type", "auth_reply", "06 02 0000", 2, GF, "authentication reply type 2 is unknown"),
    Bad(
        "d6-options-over-cap-req03",
        "request",
        REQ_V4.format(ol="4004"),
        4,
        GF,
        "options length 16388 exceeds 16384",
    ),
    Bad(
        "d6-auth-reply-over-cap-req03",
        "auth_reply",
        "06 00 ffff",
        4,
        GF,
        "options length 65535 exceeds 16384",
    ),
    Bad(
        "d6-op-reply-over-cap-req03",
        "operation_reply",
        "06 00 4004",
        4,
        GF,
        "options length 16388 exceeds 16384",
    ),
    Bad(
        "options-length-not-multiple-of-4",
        "request",
        REQ_V4.format(ol="0006"),
        4,
        GF,
        "options length 6 is not a multiple of 4",
    ),
    Bad(
        "auth-options-length-odd",
        "auth_reply",
        "06 00 0001 00",
        4,
        GF,
        "options length 1 is not a multiple of 4",
    ),
    Bad(
        "address-type-2",
        "request",
        "06 01 0000 0050 00 02 7f000001",
        8,
        ATNS,
        "address type 2 is not supported",
    ),
    Bad(
        "address-type-0-op",
        "operation_reply",
        "06 00 0000 0050 00 00",
        8,
        ATNS,
        "address type 0 is not supported",
    ),
    Bad(
        "d2-name-length-0-req09", "request", "06 01 0000 0050 00 03 00 000000", 9, GF, "domain name is empty"
    ),
    Bad(
        "d2-name-all-nul-req09", "request", "06 01 0000 0050 00 03 03 000000", 12, GF, "domain name is empty"
    ),
    Bad(
        "d2-name-nul-inside-req09",
        "request",
        "06 01 0000 0050 00 03 03 610062",
        12,
        GF,
        "domain name contains a nul byte",
    ),
    Bad(
        "d2-name-nul-inside-padded-req09",
        "operation_reply",
        "06 00 0000 0050 00 03 05 61006200 00 000000",
        16,
        GF,
        "domain name contains a nul byte",
    ),
    Bad(
        "d2-name-not-utf8-req09",
        "request",
        "06 01 0000 0050 00 03 03 fffefd",
        12,
        GF,
        "domain name is not valid utf-8",
    ),
    Bad(
        "d2-name-surrogate-req09",
        "request",
        "06 01 0000 0050 00 03 03 eda080",
        12,
        GF,
        "domain name is not valid utf-8",
    ),
    Bad(
        "d2-dirty-padding-req09",
        "request",
        """06 01 0000 0016 00 03
           04 612e696f 0000ff      # a non-NUL padding byte: D2 says "skip NULs" """,
        16,
        GF,
        "domain name padding is not zero",
    ),
    Bad(
        "d2-unpadded-name-req09",
        "operation_reply",
        """06 00 0004 0016 00 03
           02 6162                 # "ab" sent without its NUL padding byte...
           fc00 0004               # ...so the field swallows the next option's first byte""",
        12,
        GF,
        "domain name padding is not zero",
    ),
    Bad(
        "d2-datagram-dirty-padding-req09",
        "association",
        "06 03 001c " + AID.hex() + " 03 00 0035 05 612e622e63 0078 78787878",  # 'x' in the padding
        24,
        GF,
        "domain name padding is not zero",
    ),
    Bad(
        "d8-option-length-2-req05",
        "request",
        REQ_V4.format(ol="0004") + "0005 0002",
        16,
        GF,
        "option length 2 is less than 4",
    ),
    Bad(
        "d8-option-length-0-req05",
        "auth_reply",
        "06 00 0004 0005 0000",
        8,
        GF,
        "option length 0 is less than 4",
    ),
    Bad(
        "d8-option-length-6-req05",
        "request",
        REQ_V4.format(ol="0008") + "fc00 0006 0000 0000",
        20,
        GF,
        "option length 6 is not a multiple of 4",
    ),
    Bad(
        "d8-option-past-options-length-req05",
        "request",
        REQ_V4.format(ol="0004") + "fc00 0008",
        16,
        GF,
        "option length 8 runs past options length",
    ),
    Bad(
        "d8-option-past-options-length-2-req05",
        "auth_reply",
        "06 00 0008 0008 0004 fc00 0008",
        12,
        GF,
        "option length 8 runs past options length",
    ),
    Bad(
        "session-request-length-8",
        "request",
        REQ_V4.format(ol="0008") + "0005 0008 00000000",
        20,
        GF,
        "option kind 5 has length 8, expected 4",
    ),
    Bad(
        "session-ok-length-8",
        "auth_reply",
        "06 00 0008 0008 0008 00000000",
        12,
        GF,
        "option kind 8 has length 8, expected 4",
    ),
    Bad(
        "d3-expenditure-figure-length-4",
        "request",
        REQ_V4.format(ol="0004") + "000d 0004",
        16,
        GF,
        "option kind 13 has length 4, expected 8",
    ),
    Bad(
        "d3-expenditure-length-12",
        "request",
        REQ_V4.format(ol="000c") + "000d 000c 00000001 00000000",
        24,
        GF,
        "option kind 13 has length 12, expected 8",
    ),
    Bad(
        "stack-option-length-4",
        "request",
        REQ_V4.format(ol="0004") + "0001 0004",
        16,
        GF,
        "option kind 1 has length 4, expected at least 8",
    ),
    Bad(
        "d12-initial-data-length-over-2-14",
        "request",
        REQ_V4.format(ol="0008") + "0002 0008 4001 0200",
        20,
        GF,
        "initial data length 16385 exceeds 16384",
    ),
    Bad(
        "advertisement-length-4",
        "request",
        REQ_V4.format(ol="0004") + "0002 0004",
        16,
        GF,
        "option kind 2 has length 4, expected at least 8",
    ),
    Bad(
        "method-selection-length-12",
        "auth_reply",
        "06 01 000c 0003 000c 02000000 00000000",
        16,
        GF,
        "option kind 3 has length 12, expected 8",
    ),
    Bad(
        "auth-data-length-4",
        "auth_reply",
        "06 00 0004 0004 0004",
        8,
        GF,
        "option kind 4 has length 4, expected at least 8",
    ),
    Bad(
        "session-id-empty",
        "request",
        REQ_V4.format(ol="0004") + "0006 0004",
        16,
        GF,
        "option kind 6 has length 4, expected at least 8",
    ),
    Bad(
        "token-request-length-12",
        "request",
        REQ_V4.format(ol="000c") + "000b 000c 00000001 00000000",
        24,
        GF,
        "option kind 11 has length 12, expected 8",
    ),
    Bad(
        "d15-window-size-0",
        "auth_reply",
        "06 00 000c 000c 000c 00000001 00000000",
        16,
        GF,
        "idempotence window size 0 is out of range",
    ),
    Bad(
        "d15-window-size-2-31",
        "auth_reply",
        "06 00 000c 000c 000c 00000001 80000000",
        16,
        GF,
        "idempotence window size 2147483648 is out of range",
    ),
    Bad(
        "window-length-8",
        "auth_reply",
        "06 00 0008 000c 0008 00000001",
        12,
        GF,
        "option kind 12 has length 8, expected 12",
    ),
    Bad(
        "accepted-length-8",
        "auth_reply",
        "06 00 0008 000e 0008 00000000",
        12,
        GF,
        "option kind 14 has length 8, expected 4",
    ),
    Bad("assoc-type-0", "association", "06 00 000c", 2, GF, "message type 0 is unknown"),
    Bad("assoc-type-5", "association", "06 05 000c", 2, GF, "message type 5 is unknown"),
    Bad(
        "assoc-init-length-16", "association", "06 01 0010 " + AID.hex(), 4, GF, "message length 16 is not 12"
    ),
    Bad("assoc-confirm-length-8", "association", "06 02 0008", 4, GF, "message length 8 is not 12"),
    Bad("datagram-length-19", "association", "06 03 0013", 4, GF, "message length 19 is less than 20"),
    Bad(
        "datagram-ipv6-length-24",
        "association",
        "06 03 0018 " + AID.hex() + " 04 00 0035 00000000",
        13,
        GF,
        "message length 24 is less than 32",
    ),
    Bad(
        "datagram-address-type-2",
        "association",
        "06 03 0014 " + AID.hex() + " 02 00 0035 00000000",
        13,
        ATNS,
        "address type 2 is not supported",
    ),
    Bad(
        "datagram-name-length-0",
        "association",
        "06 03 0014 " + AID.hex() + " 03 00 0035 00000000",
        17,
        GF,
        "domain name is empty",
    ),
    Bad(
        "datagram-name-longer-than-message",
        "association",
        "06 03 001c " + AID.hex() + " 03 00 0035 14",
        17,
        GF,
        "message length 28 is less than 40",
    ),
    Bad(
        "datagram-name-nul",
        "association",
        "06 03 0014 " + AID.hex() + " 03 00 0035 02 0061 00",
        20,
        GF,
        "domain name contains a nul byte",
    ),
    Bad("error-length-27", "association", "06 04 001b", 4, GF, "message length 27 is less than 28"),
    Bad(
        "error-domain-address",
        "association",
        "06 04 0020 " + AID.hex() + " 03 00 0035",
        13,
        ATNS,
        "address type 3 is not allowed in a datagram error",
    ),
    Bad(
        "error-address-type-9",
        "association",
        "06 04 0020 " + AID.hex() + " 09",
        13,
        ATNS,
        "address type 9 is not supported",
    ),
    Bad(
        "error-ipv6-length-28",
        "association",
        "06 04 001c " + AID.hex() + " 04",
        13,
        GF,
        "message length 28 is less than 40",
    ),
    Bad(
        "error-reporter-domain",
        "association",
        "06 04 001c " + AID.hex() + " 01 00 0035 08080808 03",
        21,
        ATNS,
        "address type 3 is not allowed in a datagram error",
    ),
    Bad(
        "error-length-not-exact",
        "association",
        "06 04 0020 " + AID.hex() + " 01 00 0035 08080808 01 01 0000 0a000001 00000000",
        21,
        GF,
        "message length 32 is not 28",
    ),
    Bad(
        "error-ipv6-reporter-too-long",
        "association",
        "06 04 001c " + AID.hex() + " 01 00 0035 08080808 04",
        21,
        GF,
        "message length 28 is not 40",
    ),
    Bad(
        "error-code-5",
        "association",
        "06 04 001c " + AID.hex() + " 01 00 0035 08080808 01 05 0000 0a000001",
        22,
        GF,
        "datagram error code 5 is unknown",
    ),
    Bad(
        "error-code-0",
        "association",
        "06 04 001c " + AID.hex() + " 01 00 0035 08080808 01 00 0000 0a000001",
        22,
        GF,
        "datagram error code 0 is unknown",
    ),
]


@pytest.mark.conformance("REQ-03", "REQ-05", "REQ-09")
@pytest.mark.parametrize("bad", BAD_VECTORS, ids=[b.name for b in BAD_VECTORS])
def test_malformed_vector(codec: CodecAPI, bad: Bad) -> None:
    """Malformed input: D2/REQ-09, D3, D6/REQ-03, D8/REQ-05, D12, D15 vectors among others."""
    data = h(bad.wire)
    assert len(data) >= bad.raise_at
    decode = _decoder(codec, bad.kind)
    with pytest.raises(WireError) as info:
        decode(data)
    assert type(info.value) is WireError
    assert str(info.value) == bad.message
    assert info.value.reply_code == bad.reply_code


@pytest.mark.conformance("REQ-07")
@pytest.mark.parametrize("bad", BAD_VECTORS, ids=[b.name for b in BAD_VECTORS])
def test_malformed_vector_raises_at_offending_byte_req07(codec: CodecAPI, bad: Bad) -> None:
    """Shorter prefixes ask for more data; the error comes with the offending byte, not later."""
    data = h(bad.wire)
    decode = _decoder(codec, bad.kind)
    for n in range(bad.raise_at):
        message, needed = decode(data[:n])
        assert message is None and needed > 0, n
    with pytest.raises(WireError) as info:
        decode(data[: bad.raise_at])
    assert str(info.value) == bad.message
    assert info.value.reply_code == bad.reply_code


@pytest.mark.conformance("REQ-03")
def test_d6_options_cap_before_any_option_byte_req03(codec: CodecAPI) -> None:
    """D6/REQ-03: the cap is checked on the 4 header bytes, before options are buffered."""
    for decode in (codec.decode_request, codec.decode_operation_reply, codec.decode_auth_reply):
        with pytest.raises(WireError, match="^options length 16388 exceeds 16384$"):
            decode(b"\x06\x00\x40\x04")
    # exactly 16384 is allowed: the decoder just asks for the bytes
    assert codec.decode_auth_reply(b"\x06\x00\x40\x00") == (None, 16384)
    assert codec.decode_request(b"\x06\x01\x40\x00") == (None, 16384 + 8 + 4 - 4)


@pytest.mark.conformance("REQ-03")
def test_d6_options_cap_is_configurable_req03(codec: CodecAPI) -> None:
    wire = h("06 00 0008 0008 0004 000e 0004")  # success, Session OK, Accepted
    with pytest.raises(WireError, match="^options length 8 exceeds 4$") as info:
        codec.decode_auth_reply(wire, 0, 4)
    assert info.value.reply_code == GF
    assert codec.decode_auth_reply(wire, 0, 8)[0] == AuthReply(
        AuthReplyType.SUCCESS, (SessionOK(), IdempotenceAccepted())
    )
    req = codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 5, (SessionRequest(),)))
    with pytest.raises(WireError, match="^options length 4 exceeds 0$"):
        codec.decode_request(req, 0, 0)
    with pytest.raises(WireError, match="^options length 4 exceeds 0$"):
        codec.decode_operation_reply(b"\x06\x00\x00\x04", max_options_length=0)
    # a larger cap (draft-12's 20 KB) admits more
    big = h("06 00 4400") + h("fc00 0008 00000000") * (0x4400 // 8)
    reply, used = codec.decode_auth_reply(big, 0, 20480)
    assert reply is not None and used == len(big) and len(reply.options) == 0x4400 // 8


def test_d3_expenditure_length_8_only(codec: CodecAPI) -> None:
    """D3: the text's Length 8 is the only accepted form; the figure's 4 is malformed."""
    assert codec.decode_options(h("000d 0008 00000007")) == (IdempotenceExpenditure(7),)
    assert codec.encode_options((IdempotenceExpenditure(7),)) == h("000d 0008 00000007")
    for wire in ("000d 0004", "000d 000c 00000007 00000000"):
        with pytest.raises(WireError, match="^option kind 13 has length"):
            codec.decode_options(h(wire))


@pytest.mark.conformance("REQ-09")
def test_d2_domain_padding_forms_req09(codec: CodecAPI) -> None:
    """D2/REQ-09: send the unpadded length; accept it and draft-12's padded length."""
    for name in ("a", "ab", "abc", "abcd", "x" * 255):
        wire = codec.encode_request(Request(Command.CONNECT, AddressType.DOMAIN_NAME, name, 1))
        field = wire[8:]
        assert field[0] == len(name)
        assert len(field) % 4 == 0 and len(field) == (1 + len(name) + 3) // 4 * 4
        assert field[1 + len(name) :] == bytes(len(field) - 1 - len(name))
        # draft-12 form: the length byte counts the padding
        if len(field) - 1 <= 255:
            draft12 = wire[:8] + bytes([len(field) - 1]) + field[1:]
            assert codec.decode_request(draft12)[0] == Request(
                Command.CONNECT, AddressType.DOMAIN_NAME, name, 1
            )


@pytest.mark.conformance("REQ-09")
def test_d2_name_over_255_bytes_cannot_be_sent_req09(codec: CodecAPI) -> None:
    with pytest.raises(LocalProtocolError, match="longer than 255"):
        codec.encode_request(Request(Command.CONNECT, AddressType.DOMAIN_NAME, "x" * 256, 1))
    # 128 two-byte characters: 256 bytes
    with pytest.raises(LocalProtocolError, match="longer than 255"):
        codec.encode_request(Request(Command.CONNECT, AddressType.DOMAIN_NAME, "\u00e9" * 128, 1))


def test_d5_datagram_header_field_order(codec: CodecAPI) -> None:
    """D5: Datagram Header is ATYP, Padding, Port (the Request has Port, Padding, ATYP)."""
    header = DatagramHeader(AID, AddressType.IPV4, "10.1.2.3", 0x1234, 20)
    out = bytearray(20)
    assert codec.encode_datagram_header(header, out) == 20
    assert out[12:16] == h("01 00 1234")
    req = codec.encode_request(Request(Command.CONNECT, AddressType.IPV4, "10.1.2.3", 0x1234))
    assert req[4:8] == h("1234 00 01")


@pytest.mark.conformance("REQ-06")
def test_d8_unknown_kinds_are_opaque_req06(codec: CodecAPI) -> None:
    """D8/REQ-06: every kind draft-11 does not define decodes as UnknownOption."""
    for kind in (0, 7, 16, 17, 18, 1000, 64511, 64512, 65000, 65535):
        wire = kind.to_bytes(2, "big") + h("000c 0102030405060708")
        assert codec.decode_options(wire) == (UnknownOption(kind, bytes(range(1, 9))),)
        assert codec.encode_options((UnknownOption(kind, bytes(range(1, 9))),)) == wire


@pytest.mark.conformance("REQ-06")
def test_d8_unsupported_stack_options_are_opaque_req06(codec: CodecAPI) -> None:
    """D8/REQ-06: Leg 0 or an undefined (Level, Code) decodes as UnknownStackOption."""
    # Level 2/3 (IPv4/IPv6) define no codes; Level 1 code 5, Level 4 code 4, Level 63
    for leg_level, code in ((0x82, 1), (0xC3, 1), (0x41, 5), (0x84, 4), (0xFF, 0xFF), (0x05, 2)):
        wire = h("0001 000c") + bytes([leg_level, code]) + b"\xaa" * 6
        assert codec.decode_options(wire) == (
            UnknownStackOption(leg_level >> 6, leg_level & 0x3F, code, b"\xaa" * 6),
        )
        assert codec.encode_options(codec.decode_options(wire)) == wire


def test_d11_noop_address_is_data(codec: CodecAPI) -> None:
    """D11 is the proxy's rule; the codec decodes NOOP with any address so the proxy can reply 0x08."""
    wire = h("06 00 0000 0007 00 01 01020304")  # NOOP to 1.2.3.4:7
    assert codec.decode_request(wire) == (Request(Command.NOOP, AddressType.IPV4, "1.2.3.4", 7), len(wire))


# =================================================================================
# Review decisions: the codec review of commit 77a2b79. The items the tests cite:
#   1  option placement: a known kind where draft-11 does not put it is ignored
#   2  undefined Stack option values or lengths are unsupported, not malformed
#   3  Leg 2 (proxy-remote) only, for the Stack options whose figures fix it
#   4  NOOP is sent only to the zero address and port 0
#   5  Datagram Error "datagram too big" is IPv6 only
#   6  D2 NUL padding is checked everywhere, the Datagram Header included
#   7, 8  RFC 1929 lengths on send, bad offsets: in tests/test_socks5.py
#   9  True/False are not wire integers
#   10 lengths are counted in bytes; inputs must be contiguous, outputs writable
# =================================================================================


def _connect(address_type: int, address: Any, port: Any = 80, options: Any = ()) -> Request:
    return Request(Command.CONNECT, address_type, address, port, options)


# Where draft-11 places each known option kind (item 1): Request, AuthReply, OperationReply.
PLACEMENT: dict[int, tuple[bool, bool, bool]] = {
    1: (True, False, True),  # Stack: client in Requests, proxy in Operation Replies
    2: (True, False, False),  # Authentication Method Advertisement
    3: (False, True, False),  # Authentication Method Selection
    4: (True, True, False),  # Authentication Data
    5: (True, False, False),  # Session Request
    6: (True, True, True),  # Session ID (D4: clients accept it in the Authentication Reply)
    8: (False, True, False),  # Session OK
    9: (False, True, False),  # Session Invalid
    10: (True, False, False),  # Session Teardown
    11: (True, False, False),  # Idempotence Request
    12: (False, True, False),  # Idempotence Window
    13: (True, False, False),  # Idempotence Expenditure
    14: (False, True, False),  # Idempotence Accepted
    15: (False, True, False),  # Idempotence Rejected
}


@pytest.mark.conformance("REQ-06")
def test_req06_misplaced_session_ok_in_request_is_ignored(codec: CodecAPI) -> None:
    """REQ-06 (item 1): the reviewer's repro, a Session OK with a bad length inside a Request."""
    wire = h("""06 01 0008 0050 00 01 7f000001   # CONNECT 127.0.0.1:80, Options Length 8
                0008 0008 00000000               # Session OK (an Authentication Reply option), Length 8""")
    assert codec.decode_request(wire) == (
        Request(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80, (UnknownOption(8, b"\0\0\0\0"),)),
        len(wire),
    )


@pytest.mark.conformance("REQ-06")
@pytest.mark.parametrize("kind", sorted(PLACEMENT))
def test_req06_misplaced_known_options_decode_as_unknown(codec: CodecAPI, kind: int) -> None:
    """REQ-06 (item 1): a known kind where draft-11 does not place it is opaque and unchecked."""
    # A length that is malformed for this kind, so a placed kind must raise: 12 for
    # the empty options, 4 for the others (each needs at least 8, or exactly 12).
    data = b"\xff" * 8 if kind in (5, 8, 9, 10, 14, 15) else b""
    option = kind.to_bytes(2, "big") + (4 + len(data)).to_bytes(2, "big") + data
    length = len(option).to_bytes(2, "big")
    request_wire = b"\x06\x01" + length + h("0050 00 01 7f000001") + option
    op_reply_wire = b"\x06\x00" + length + h("0050 00 01 7f000001") + option
    auth_wire = b"\x06\x00" + length + option
    unknown = (UnknownOption(kind, data),)
    decoders: list[tuple[Callable[..., tuple[Any, int]], bytes, type]] = [
        (codec.decode_request, request_wire, Request),
        (codec.decode_auth_reply, auth_wire, AuthReply),
        (codec.decode_operation_reply, op_reply_wire, OperationReply),
    ]
    for placed, (decode, wire, context) in zip(PLACEMENT[kind], decoders, strict=True):
        if placed:
            with pytest.raises(WireError):
                decode(wire)
            with pytest.raises(WireError):
                codec.decode_options(option, 0, -1, context)
        else:
            message, used = decode(wire)
            assert used == len(wire) and message.options == unknown
            assert codec.decode_options(option, 0, -1, context) == unknown
    # Without a context every known kind is decoded (and checked).
    with pytest.raises(WireError):
        codec.decode_options(option)


@pytest.mark.conformance("REQ-05", "REQ-06")
def test_req06_misplaced_options_keep_d8_framing(codec: CodecAPI) -> None:
    """REQ-06 / D8 (item 1): an ignored option still needs a sane Length; the rest still decodes."""
    with pytest.raises(WireError, match="^option length 6 is not a multiple of 4$"):
        codec.decode_operation_reply(h("06 00 0008 0050 00 01 7f000001 0005 0006 0000 0000"))
    wire = h("06 00 0010 0050 00 01 7f000001 0005 0004 0006 000c 0102030405060708")
    reply, _ = codec.decode_operation_reply(wire)
    assert reply is not None
    assert reply.options == (UnknownOption(5, b""), SessionID(bytes(range(1, 9))))
    # Stack options in an Authentication Reply are ignored as a whole (not UnknownStackOption).
    assert codec.decode_auth_reply(h("06 00 0008 0001 0008 4103 4000")) == (
        AuthReply(AuthReplyType.SUCCESS, (UnknownOption(1, h("4103 4000")),)),
        12,
    )


def test_decode_options_context_is_checked(codec: CodecAPI) -> None:
    """Item 1: decode_options accepts only the three message classes as context."""
    for context in (Datagram, "request", 1):
        with pytest.raises(
            WireError, match="^options context is not Request, AuthReply or OperationReply$"
        ) as info:
            codec.decode_options(b"", 0, -1, context)
        assert info.value.reply_code is None


@pytest.mark.conformance("REQ-06")
@pytest.mark.parametrize(
    ("wire", "option"),
    [
        ("0001 000c 4103 4000 00000000", UnknownStackOption(1, 1, 3, h("4000 00000000"))),  # TTL, Length 12
        ("0001 0008 8102 0300", UnknownStackOption(2, 1, 2, h("0300"))),  # Happy Eyeballs availability 3
        ("0001 0008 c104 0000", UnknownStackOption(3, 1, 4, h("0000"))),  # No Fragmentation availability 0
        ("0001 0008 8402 ff00", UnknownStackOption(2, 4, 2, h("ff00"))),  # Multipath availability 255
        ("0001 0008 8501 0000", UnknownStackOption(2, 5, 1, h("0000"))),  # UDP Error availability 0
        ("0001 0008 8502 0300", UnknownStackOption(2, 5, 2, h("0300"))),  # Port Parity parity 3
        ("0001 0008 8502 0102", UnknownStackOption(2, 5, 2, h("0102"))),  # Port Parity reserve 2
        ("0001 0010 8401 0000 0000 0000 0000 0000", UnknownStackOption(2, 4, 1, bytes(10))),  # TFO, Length 16
    ],
)
def test_req06_unsupported_stack_values_are_ignored(codec: CodecAPI, wire: str, option: Option) -> None:
    """REQ-06 (item 2): undefined Stack values or lengths are unsupported, not malformed; they round-trip."""
    data = h(wire)
    assert codec.decode_options(data) == (option,)
    request = h(f"06 01 {len(data):04x} 0050 00 01 7f000001") + data
    assert codec.decode_request(request)[0] == Request(
        Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80, (option,)
    )
    assert codec.encode_options((option,)) == data


@pytest.mark.conformance("REQ-05")
def test_req05_stack_option_too_short_stays_malformed(codec: CodecAPI) -> None:
    """REQ-05 / D8 (item 2): Length < 4 or not a multiple of 4 is malformed; so is a Stack option of 4."""
    for wire, message in (
        ("0001 0002", "option length 2 is less than 4"),
        ("0001 0006 4103", "option length 6 is not a multiple of 4"),
        ("0001 0004", "option kind 1 has length 4, expected at least 8"),
        ("0001 000c 4103 4000", "option length 12 runs past options length"),
    ):
        with pytest.raises(WireError) as info:
            codec.decode_options(h(wire))
        assert (str(info.value), info.value.reply_code) == (message, GF)


REMOTE_ONLY_OPTIONS: list[Callable[[int], Option]] = [
    lambda leg: HappyEyeballsOption(leg, Availability.DESIRED),
    lambda leg: TFOOption(leg, 0),
    lambda leg: MultipathOption(leg, Availability.DESIRED),
    lambda leg: ListenBacklogOption(leg, 5),
    lambda leg: UDPErrorOption(leg, Availability.DESIRED),
    lambda leg: PortParityOption(leg, Parity.EVEN, False),
]


@pytest.mark.parametrize("make", REMOTE_ONLY_OPTIONS)
def test_stk_remote_only_options_must_use_leg_2(codec: CodecAPI, make: Callable[[int], Option]) -> None:
    """Item 3: the figures fix Leg = 2 for these; encoders refuse Leg 1 and 3, decoders accept any leg."""
    wire = codec.encode_options((make(StackLeg.PROXY_REMOTE),))
    for leg in (StackLeg.CLIENT_PROXY, StackLeg.BOTH):
        with pytest.raises(LocalProtocolError, match="^stack option leg is not proxy-remote$"):
            codec.encode_options((make(leg),))
        other_leg = wire[:4] + bytes([leg << 6 | wire[4] & 0x3F]) + wire[5:]
        assert codec.decode_options(other_leg) == (make(leg),)
    with pytest.raises(LocalProtocolError, match="^stack leg is out of range$"):
        codec.encode_options((make(0),))


@pytest.mark.conformance("REQ-04")
@pytest.mark.parametrize(
    ("address_type", "address", "port", "error"),
    [
        (AddressType.DOMAIN_NAME, "x", 0, "noop address type is not ipv4 or ipv6"),
        (AddressType.IPV4, "1.2.3.4", 0, "noop address or port is not zero"),
        (AddressType.IPV4, "0.0.0.0", 1, "noop address or port is not zero"),
        (AddressType.IPV6, "::1", 0, "noop address or port is not zero"),
        (AddressType.IPV6, "::", 53, "noop address or port is not zero"),
        (AddressType.IPV4, "0.0.0.256", 0, "address is not a valid ip address"),  # checked before
    ],
)
def test_req04_noop_encoder_refuses_nonzero_address(
    codec: CodecAPI, address_type: AddressType, address: str, port: int, error: str
) -> None:
    """REQ-04 / D11 (item 4): a NOOP is sent only to 0.0.0.0:0 or [::]:0 (section "Requests")."""
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_request(Request(Command.NOOP, address_type, address, port))
    assert str(info.value) == error


@pytest.mark.conformance("REQ-04")
def test_req04_noop_encoder_accepts_zero_addresses(codec: CodecAPI) -> None:
    """REQ-04 (item 4): the zero IPv4 and IPv6 addresses (any spelling) with port 0 are sent."""
    for address_type, address, expected in (
        (AddressType.IPV4, "0.0.0.0", "0.0.0.0"),
        (AddressType.IPV6, "::", "::"),
        (AddressType.IPV6, "0:0:0:0:0:0:0:0", "::"),
    ):
        wire = codec.encode_request(Request(Command.NOOP, address_type, address, 0))
        assert codec.decode_request(wire)[0] == Request(Command.NOOP, address_type, expected, 0)
    # CONNECT to a nonzero address is not affected, nor an Operation Reply's code 0 (success).
    codec.encode_request(Request(Command.CONNECT, AddressType.DOMAIN_NAME, "x", 1))
    codec.encode_operation_reply(OperationReply(ReplyCode.SUCCESS, AddressType.IPV4, "1.2.3.4", 1))


@pytest.mark.conformance("UDP-09")
@pytest.mark.parametrize(
    ("address_type", "reporter_type"),
    [
        (AddressType.IPV4, AddressType.IPV4),
        (AddressType.IPV4, AddressType.IPV6),
        (AddressType.IPV6, AddressType.IPV4),
    ],
)
def test_udp09_datagram_too_big_is_ipv6_only(
    codec: CodecAPI, address_type: AddressType, reporter_type: AddressType
) -> None:
    """UDP-09 (item 5): error code 4 ("Datagram too big (IPv6 only)") needs IPv6 on both addresses."""
    address = {AddressType.IPV4: "192.0.2.1", AddressType.IPV6: "2001:db8::1"}
    message = DatagramError(
        AID,
        address_type,
        address[address_type],
        53,
        reporter_type,
        address[reporter_type],
        DatagramErrorCode.DATAGRAM_TOO_BIG,
    )
    with pytest.raises(LocalProtocolError, match="^datagram too big is for ipv6 only$"):
        codec.encode_association_message(message)
    # The decoder stays lenient: an IPv4 "too big" from a peer decodes.
    wire = h("06 04 001c " + AID.hex() + " 01 00 0035 c0000201 01 04 0000 c0000201")
    assert codec.decode_association_message(wire)[0] == DatagramError(
        AID,
        AddressType.IPV4,
        "192.0.2.1",
        53,
        AddressType.IPV4,
        "192.0.2.1",
        DatagramErrorCode.DATAGRAM_TOO_BIG,
    )


@pytest.mark.conformance("REQ-09")
def test_req09_d2_padding_must_be_nul_everywhere(codec: CodecAPI) -> None:
    """REQ-09 / D2 (item 6): the Datagram Header checks the padding too; an unpadded peer errors."""
    # "ab" without padding followed by payload "xyz": the 'x' would be skipped as padding.
    unpadded = h("06 03 0018 1122334455667788 03 00 0035 02 6162 78797a")
    with pytest.raises(WireError, match="^domain name padding is not zero$") as info:
        codec.decode_datagram_header(unpadded)
    assert info.value.reply_code == GF
    with pytest.raises(WireError, match="^domain name padding is not zero$"):
        codec.decode_association_message(unpadded)
    # NUL padding, in either D2 form, still decodes.
    padded = h("06 03 0018 1122334455667788 03 00 0035 02 6162 00 78797a00")
    assert codec.decode_datagram_header(padded)[0].address == "ab"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (_connect(AddressType.IPV4, "1.2.3.4", True), "port is out of range"),
        (Request(True, AddressType.IPV4, "1.2.3.4", 1), "command is not supported"),
        (_connect(True, "1.2.3.4"), "address type is not supported"),
        (_connect(AddressType.IPV4, "1.2.3.4", 1, (TTLOption(StackLeg.BOTH, True),)), "ttl is out of range"),
        (_connect(AddressType.IPV4, "1.2.3.4", 1, (TTLOption(True, 1),)), "stack leg is out of range"),
        (
            _connect(AddressType.IPV4, "1.2.3.4", 1, (MultipathOption(StackLeg.PROXY_REMOTE, True),)),
            "stack option availability is out of range",
        ),
        (
            _connect(AddressType.IPV4, "1.2.3.4", 1, (AuthMethodAdvertisement(0, (True,)),)),
            "authentication method is out of range",
        ),
        (
            _connect(AddressType.IPV4, "1.2.3.4", 1, (UnknownOption(False, b""),)),
            "option kind is out of range",
        ),
    ],
)
def test_encoders_refuse_bool_integers(codec: CodecAPI, message: Request, error: str) -> None:
    """Item 9: True/False are not wire integers (socks5 already refuses them)."""
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_request(message)
    assert str(info.value) == error


def test_encoders_count_bytes_not_items(codec: CodecAPI) -> None:
    """Item 10: lengths of buffer fields are in bytes, whatever the memoryview's item size."""
    wide_id = memoryview(bytes(16)).cast("I")  # 4 items, 16 bytes
    assert len(wide_id) == 4
    with pytest.raises(LocalProtocolError, match="^association id is not 8 bytes$"):
        codec.encode_association_message(AssociationInit(wide_id))
    two_words = memoryview(AID).cast("I")  # 2 items, 8 bytes
    assert codec.encode_association_message(AssociationInit(two_words)) == h("06 01 000c") + AID
    one_word = memoryview(b"abcd").cast("I")  # 1 item, 4 bytes: a valid option data length
    assert codec.encode_options((UnknownOption(64512, one_word),)) == h("fc00 0008") + b"abcd"
    stack_data = memoryview(b"abcdef").cast("H")  # 3 items, 6 bytes: 2 modulo 4
    assert codec.encode_options((UnknownStackOption(0, 1, 1, stack_data),)) == h("0001 000c 0101") + b"abcdef"
    payload = memoryview(b"wxyz").cast("H")  # 2 items, 4 bytes
    header = DatagramHeader(AID, AddressType.IPV4, "192.0.2.1", 9, 24)
    assert codec.encode_association_message(Datagram(header, payload))[-4:] == b"wxyz"
    # A wide writable out buffer: the room is counted in bytes.
    out = memoryview(bytearray(20)).cast("I")  # 5 items, 20 bytes
    assert codec.encode_datagram_header(DatagramHeader(AID, AddressType.IPV4, "192.0.2.1", 9, 20), out) == 20
    assert bytes(out)[12:16] == h("01 00 0009")


def test_address_types_use_the_table_everywhere(codec: CodecAPI) -> None:
    """Item 10: 1.0 or True is not an address type, in datagram_header_length and Datagram Error too."""
    for address_type in (1.0, 4.0, True):
        with pytest.raises(LocalProtocolError, match="^address type is not supported$"):
            codec.datagram_header_length(address_type, "192.0.2.1")
        with pytest.raises(LocalProtocolError, match="^datagram error address type is not ipv4 or ipv6$"):
            codec.encode_association_message(
                DatagramError(AID, address_type, "192.0.2.1", 1, AddressType.IPV4, "192.0.2.1", 1)
            )


def test_non_contiguous_and_read_only_buffers(codec: CodecAPI) -> None:
    """Item 10: a non-contiguous input is WireError (reply_code None); out must be writable."""
    strided = memoryview(h("06 00 0000") * 2)[::2]
    decoders: list[Callable[..., object]] = [
        codec.decode_request,
        codec.decode_auth_reply,
        codec.decode_operation_reply,
        codec.decode_association_message,
        codec.decode_datagram_header,
        codec.decode_options,
    ]
    for decode in decoders:
        with pytest.raises(WireError, match="^data is not a contiguous buffer$") as info:
            decode(strided)
        assert info.value.reply_code is None
        with pytest.raises(TypeError):
            decode("06 00 0000")
    header = DatagramHeader(AID, AddressType.IPV4, "192.0.2.1", 9, 20)
    for out in (bytes(20), memoryview(bytes(20)), memoryview(bytearray(40))[::2], [0] * 20, None):
        with pytest.raises(LocalProtocolError, match="^output buffer is not writable$"):
            codec.encode_datagram_header(header, out)


def test_d12_initial_data_length(codec: CodecAPI) -> None:
    ok = AuthMethodAdvertisement(16384, (2,))
    assert codec.decode_options(codec.encode_options((ok,))) == (ok,)
    with pytest.raises(WireError, match="^initial data length 16385 exceeds 16384$"):
        codec.decode_options(h("0002 0008 4001 0200"))
    with pytest.raises(LocalProtocolError):
        codec.encode_options((AuthMethodAdvertisement(16385, (2,)),))


def test_d15_window_size_limits(codec: CodecAPI) -> None:
    """D15: a Token Request for 0 is data (the proxy ignores it); an advertised window is 1..2^31-1."""
    assert codec.decode_options(h("000b 0008 00000000")) == (IdempotenceRequest(0),)
    assert codec.decode_options(h("000b 0008 ffffffff")) == (IdempotenceRequest(0xFFFFFFFF),)
    assert codec.decode_options(h("000c 000c 00000000 00000001")) == (IdempotenceWindow(0, 1),)
    for size in (0, 2**31):
        with pytest.raises(LocalProtocolError):
            codec.encode_options((IdempotenceWindow(0, size),))


def test_decode_options_bounds(codec: CodecAPI) -> None:
    data = h("0005 0004 0008 0004")
    assert codec.decode_options(data, 4) == (SessionOK(),)
    assert codec.decode_options(data, 0, 4) == (SessionRequest(),)
    with pytest.raises(WireError, match="^options length 12 runs past the end of the data$"):
        codec.decode_options(data, 0, 12)
    with pytest.raises(WireError, match="^options length 8 runs past the end of the data$"):
        codec.decode_options(data, 4, 8)
    with pytest.raises(WireError, match="^option header runs past options length$"):
        codec.decode_options(data, 0, 6)
    with pytest.raises(WireError, match="^offset 9 is out of range$") as info:
        codec.decode_options(data, 9)
    assert info.value.reply_code is None


@pytest.mark.parametrize("offset", [-1, 5])
def test_bad_offset(codec: CodecAPI, offset: int) -> None:
    data = b"\x06\x00\x00\x00"
    decoders: list[Callable[..., object]] = [
        codec.decode_request,
        codec.decode_auth_reply,
        codec.decode_operation_reply,
        codec.decode_association_message,
        codec.decode_datagram_header,
        codec.decode_options,
    ]
    for decode in decoders:
        with pytest.raises(WireError, match=f"^offset {offset} is out of range$") as info:
            decode(data, offset)
        assert info.value.reply_code is None


# =================================================================================
# Datagram Header on whole datagrams (UDP / DTLS)
# =================================================================================


def test_datagram_header_roundtrip_in_place(codec: CodecAPI) -> None:
    for address_type, address, length in (
        (AddressType.IPV4, "198.51.100.9", 20),
        (AddressType.IPV6, "2001:db8::9", 32),
        (AddressType.DOMAIN_NAME, "a", 20),
        (AddressType.DOMAIN_NAME, "abc", 20),
        (AddressType.DOMAIN_NAME, "abcd", 24),
        (AddressType.DOMAIN_NAME, "y" * 255, 272),
    ):
        assert codec.datagram_header_length(address_type, address) == length
        header = DatagramHeader(AID, address_type, address, 4242, length + 3)
        out = bytearray(b"\xee" * (length + 10))
        assert codec.encode_datagram_header(header, out, 2) == length
        assert out[:2] == b"\xee\xee" and out[2 + length :] == b"\xee" * 8
        out[2 + length : 2 + length + 3] = b"xyz"
        assert codec.decode_datagram_header(out, 2) == (header, length)
        assert codec.decode_datagram_header(bytes(out[2 : 2 + length])) == (header, length)
        view = memoryview(bytearray(length))
        assert codec.encode_datagram_header(header, view) == length
        assert codec.decode_datagram_header(view) == (header, length)


@pytest.mark.conformance("UDP-05")
def test_datagram_header_udp05_padding_and_long_message_length(codec: CodecAPI) -> None:
    """UDP-05: padding after Message Length is the caller's to ignore; a too-large length is not checked."""
    wire = h("06 03 0016 1122334455667788 01 00 0035 7f000001 6869 ffffffff")  # 22 + 4 padding
    header, used = codec.decode_datagram_header(wire)
    assert used == 20 and header.message_length == 22
    assert wire[used : header.message_length] == b"hi"
    long = h("06 03 ffff 1122334455667788 01 00 0035 7f000001")
    assert codec.decode_datagram_header(long)[0].message_length == 0xFFFF


def test_datagram_header_d2_accepts_draft12_padding(codec: CodecAPI) -> None:
    wire = h("06 03 0018 1122334455667788 03 00 0035 07 612e696f 000000")
    assert codec.decode_datagram_header(wire) == (
        DatagramHeader(AID, AddressType.DOMAIN_NAME, "a.io", 53, 24),
        24,
    )


@pytest.mark.conformance("REQ-09")
@pytest.mark.parametrize(
    ("wire", "reply_code", "message"),
    [
        ("", GF, "datagram header is truncated"),
        ("06", GF, "datagram header is truncated"),
        ("06 03 00", GF, "datagram header is truncated"),
        ("06 03 0014 1122334455667788", GF, "datagram header is truncated"),
        ("06 03 0014 1122334455667788 01 00 0035 7f0000", GF, "datagram header is truncated"),
        ("06 03 0018 1122334455667788 03 00 0035", GF, "datagram header is truncated"),
        ("06 03 0018 1122334455667788 03 00 0035 04 61", GF, "datagram header is truncated"),
        ("05 03 0014", None, "version 5 is not 6"),
        ("06 01 000c 1122334455667788", GF, "message type 1 is not a datagram"),
        ("06 04 0020", GF, "message type 4 is not a datagram"),
        ("06 03 0013 1122334455667788 01 00 0035 7f000001", GF, "message length 19 is less than 20"),
        ("06 03 0014 1122334455667788 04 00 0035 7f000001", GF, "message length 20 is less than 32"),
        ("06 03 0014 1122334455667788 05 00 0035 7f000001", ATNS, "address type 5 is not supported"),
        ("06 03 0014 1122334455667788 03 00 0035 00 000000", GF, "domain name is empty"),
        ("06 03 0014 1122334455667788 03 00 0035 03 ff0000", GF, "domain name is not valid utf-8"),
        # D2 / REQ-09: an unpadded name ("ab" then payload "xyz") is refused, not truncated
        ("06 03 0018 1122334455667788 03 00 0035 02 6162 78797a", GF, "domain name padding is not zero"),
    ],
)
def test_datagram_header_errors(
    codec: CodecAPI, wire: str, reply_code: ReplyCode | None, message: str
) -> None:
    with pytest.raises(WireError) as info:
        codec.decode_datagram_header(h(wire))
    assert (str(info.value), info.value.reply_code) == (message, reply_code)


# =================================================================================
# Encoders refuse what the draft forbids (LocalProtocolError)
# =================================================================================


def _req(address_type: int, address: Any, port: Any = 80, options: Any = ()) -> Request:
    return Request(Command.CONNECT, address_type, address, port, options)


BAD_ENCODES: list[tuple[str, str, Any, str]] = [
    ("ipv4-short", "request", _req(AddressType.IPV4, "1.2.3"), "address is not a valid ip address"),
    ("ipv4-leading-zero", "request", _req(AddressType.IPV4, "01.2.3.4"), "address is not a valid ip address"),
    ("ipv4-as-ipv6", "request", _req(AddressType.IPV6, "1.2.3.4"), "address is not a valid ip address"),
    ("ipv6-scope", "request", _req(AddressType.IPV6, "fe80::1%eth0"), "address is not a valid ip address"),
    ("ipv6-as-ipv4", "request", _req(AddressType.IPV4, "::1"), "address is not a valid ip address"),
    ("ip-not-str", "request", _req(AddressType.IPV4, 16909060), "address is not a string"),
    ("name-not-str", "request", _req(AddressType.DOMAIN_NAME, b"x"), "address is not a string"),
    ("name-empty", "request", _req(AddressType.DOMAIN_NAME, ""), "domain name is empty"),
    ("name-256", "request", _req(AddressType.DOMAIN_NAME, "a" * 256), "domain name is longer than 255 bytes"),
    ("name-nul", "request", _req(AddressType.DOMAIN_NAME, "a\0b"), "domain name contains a nul byte"),
    ("name-trailing-nul", "request", _req(AddressType.DOMAIN_NAME, "a\0"), "domain name contains a nul byte"),
    (
        "name-surrogate",
        "request",
        _req(AddressType.DOMAIN_NAME, "a\udc80"),
        "domain name is not valid unicode",
    ),
    ("address-type-2", "request", _req(2, "x"), "address type is not supported"),
    ("port-65536", "request", _req(AddressType.IPV4, "1.2.3.4", 65536), "port is out of range"),
    ("port-negative", "request", _req(AddressType.IPV4, "1.2.3.4", -1), "port is out of range"),
    ("port-str", "request", _req(AddressType.IPV4, "1.2.3.4", "80"), "port is out of range"),
    (
        "command-4",
        "request",
        Request(4, AddressType.IPV4, "1.2.3.4", 1),
        "command is not supported",
    ),
    (
        "options-over-16384",
        "request",
        _req(AddressType.IPV4, "1.2.3.4", 1, (UnknownOption(64512, bytes(16380)), SessionOK())),
        "options length exceeds 16384",
    ),
    (
        "options-not-sequence",
        "request",
        _req(AddressType.IPV4, "1.2.3.4", 1, None),
        "options is not a tuple or list",
    ),
    (
        "reply-code-10",
        "operation_reply",
        OperationReply(10, AddressType.IPV4, "1.2.3.4", 1),
        "reply code is unknown",
    ),
    ("auth-type-2", "auth_reply", AuthReply(2), "authentication reply type is unknown"),
]

BAD_OPTIONS: list[tuple[str, Any, str]] = [
    ("advertise-method-0", AuthMethodAdvertisement(0, (2, 0)), "authentication method 0 is never advertised"),
    (
        "advertise-method-0-only",
        AuthMethodAdvertisement(0, (0,)),
        "authentication method 0 is never advertised",
    ),
    ("advertise-method-256", AuthMethodAdvertisement(0, (256,)), "authentication method is out of range"),
    ("initial-data-16385", AuthMethodAdvertisement(16385, ()), "initial data length is out of range"),
    ("selection-256", AuthMethodSelection(256), "authentication method is out of range"),
    ("auth-data-method-256", AuthData(256, b""), "authentication method is out of range"),
    ("auth-data-not-bytes", AuthData(2, "x"), "authentication data is not bytes"),
    ("session-id-empty", SessionID(b""), "session id length is not a positive multiple of 4"),
    ("session-id-5", SessionID(b"12345"), "session id length is not a positive multiple of 4"),
    ("session-id-str", SessionID("1234"), "session id is not bytes"),
    ("window-size-0", IdempotenceWindow(1, 0), "idempotence window size is out of range"),
    ("window-size-2-31", IdempotenceWindow(1, 2**31), "idempotence window size is out of range"),
    ("window-base-2-32", IdempotenceWindow(2**32, 1), "idempotence window base is out of range"),
    ("token-negative", IdempotenceExpenditure(-1), "idempotence token is out of range"),
    ("token-request-2-32", IdempotenceRequest(2**32), "idempotence window size is out of range"),
    ("stack-leg-0", IPTOSOption(0, 1), "stack leg is out of range"),
    ("stack-leg-4", TTLOption(4, 1), "stack leg is out of range"),
    ("tos-256", IPTOSOption(StackLeg.BOTH, 256), "ip tos is out of range"),
    ("ttl-256", TTLOption(StackLeg.BOTH, 256), "ttl is out of range"),
    ("tfo-65536", TFOOption(StackLeg.PROXY_REMOTE, 65536), "tfo payload size is out of range"),
    ("backlog-negative", ListenBacklogOption(StackLeg.PROXY_REMOTE, -1), "listen backlog is out of range"),
    (
        "availability-0",
        MultipathOption(StackLeg.PROXY_REMOTE, 0),
        "stack option availability is out of range",
    ),
    ("availability-3", UDPErrorOption(StackLeg.PROXY_REMOTE, 3), "stack option availability is out of range"),
    (
        "he-availability",
        HappyEyeballsOption(StackLeg.PROXY_REMOTE, 9),
        "stack option availability is out of range",
    ),
    (
        "nofrag-availability",
        NoFragmentationOption(StackLeg.BOTH, 0),
        "stack option availability is out of range",
    ),
    ("parity-3", PortParityOption(StackLeg.PROXY_REMOTE, 3, False), "port parity is out of range"),
    (
        "reserve-int",
        PortParityOption(StackLeg.PROXY_REMOTE, Parity.EVEN, 1),
        "port parity reserve is not a bool",
    ),
    ("unknown-known-kind", UnknownOption(5, b""), "unknown option uses a known kind"),
    ("unknown-kind-65536", UnknownOption(65536, b""), "option kind is out of range"),
    ("unknown-data-3", UnknownOption(64512, b"abc"), "option data length is not a multiple of 4"),
    ("unknown-data-str", UnknownOption(64512, "abcd"), "option data is not bytes"),
    ("unknown-too-long", UnknownOption(64512, bytes(65532)), "option is longer than 65535 bytes"),
    (
        "unknown-stack-known-code",
        UnknownStackOption(2, 1, 1, b"\0\0"),
        "unknown stack option uses a known level and code",
    ),
    (
        "unknown-stack-data-4",
        UnknownStackOption(0, 1, 1, b"\0\0\0\0"),
        "stack option data length is not 2 modulo 4",
    ),
    ("unknown-stack-level-64", UnknownStackOption(0, 64, 1, b"\0\0"), "stack level is out of range"),
    ("unknown-stack-leg-4", UnknownStackOption(4, 1, 1, b"\0\0"), "stack leg is out of range"),
    ("unknown-stack-code-256", UnknownStackOption(0, 1, 256, b"\0\0"), "stack code is out of range"),
    ("unknown-stack-data-str", UnknownStackOption(0, 1, 1, "ab"), "stack option data is not bytes"),
    ("not-an-option", object(), "not a socks 6 option"),
]


@pytest.mark.parametrize(("name", "kind", "message", "error"), BAD_ENCODES, ids=[b[0] for b in BAD_ENCODES])
def test_encoder_refuses(codec: CodecAPI, name: str, kind: str, message: Any, error: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        _encoder(codec, kind)(message)
    assert str(info.value) == error


@pytest.mark.parametrize(("name", "option", "error"), BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_encoder_refuses_option(codec: CodecAPI, name: str, option: Any, error: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_options((option,))
    assert str(info.value) == error
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS, (SessionOK(), option)))
    assert str(info.value) == error


@pytest.mark.conformance("AUTH-08")
def test_auth08_method_0_cannot_be_advertised(codec: CodecAPI) -> None:
    """AUTH-08: 'no authentication' is never advertised (and would look like padding)."""
    with pytest.raises(LocalProtocolError, match="method 0"):
        codec.encode_options((AuthMethodAdvertisement(0, (0, 2)),))


def test_options_exactly_16384_can_be_sent(codec: CodecAPI) -> None:
    options = (UnknownOption(64512, bytes(16380)),)
    wire = codec.encode_auth_reply(AuthReply(AuthReplyType.SUCCESS, options))
    assert len(wire) == 4 + 16384
    assert codec.decode_auth_reply(wire) == (AuthReply(AuthReplyType.SUCCESS, options), len(wire))


BAD_ASSOCIATION: list[tuple[str, Any, str]] = [
    ("init-id-7", AssociationInit(b"1234567"), "association id is not 8 bytes"),
    ("confirm-id-str", AssociationConfirmation("12345678"), "association id is not 8 bytes"),
    (
        "datagram-length-mismatch",
        Datagram(DatagramHeader(AID, AddressType.IPV4, "1.2.3.4", 1, 21), b"ab"),
        "message length does not match header and payload",
    ),
    (
        "datagram-length-below-header",
        Datagram(DatagramHeader(AID, AddressType.IPV4, "1.2.3.4", 1, 19), b""),
        "message length is less than the header length",
    ),
    (
        "datagram-length-65536",
        Datagram(DatagramHeader(AID, AddressType.IPV4, "1.2.3.4", 1, 65536), b""),
        "message length is out of range",
    ),
    (
        "datagram-payload-str",
        Datagram(DatagramHeader(AID, AddressType.IPV4, "1.2.3.4", 1, 21), "a"),
        "datagram payload is not bytes",
    ),
    (
        "datagram-bad-address",
        Datagram(DatagramHeader(AID, AddressType.IPV4, "1.2.3.400", 1, 20), b""),
        "address is not a valid ip address",
    ),
    (
        "error-domain",
        DatagramError(AID, AddressType.DOMAIN_NAME, "x", 1, AddressType.IPV4, "1.2.3.4", 1),
        "datagram error address type is not ipv4 or ipv6",
    ),
    (
        "error-reporter-domain",
        DatagramError(AID, AddressType.IPV4, "1.2.3.4", 1, AddressType.DOMAIN_NAME, "x", 1),
        "datagram error address type is not ipv4 or ipv6",
    ),
    (
        "error-code-5",
        DatagramError(AID, AddressType.IPV4, "1.2.3.4", 1, AddressType.IPV4, "1.2.3.4", 5),
        "datagram error code is unknown",
    ),
    (
        "error-port",
        DatagramError(AID, AddressType.IPV4, "1.2.3.4", 70000, AddressType.IPV4, "1.2.3.4", 1),
        "port is out of range",
    ),
    ("not-a-message", object(), "not a udp association message"),
]


@pytest.mark.parametrize(("name", "message", "error"), BAD_ASSOCIATION, ids=[b[0] for b in BAD_ASSOCIATION])
def test_association_encoder_refuses(codec: CodecAPI, name: str, message: Any, error: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        codec.encode_association_message(message)
    assert str(info.value) == error


def test_encode_datagram_header_refuses(codec: CodecAPI) -> None:
    header = DatagramHeader(AID, AddressType.IPV6, "::1", 1, 32)
    for out, offset in ((bytearray(31), 0), (bytearray(40), 9), (bytearray(40), -1)):
        with pytest.raises(LocalProtocolError, match="^output buffer is too small$"):
            codec.encode_datagram_header(header, out, offset)
    with pytest.raises(LocalProtocolError, match="^association id is not 8 bytes$"):
        codec.encode_datagram_header(DatagramHeader(b"", AddressType.IPV6, "::1", 1, 32), bytearray(40))


@pytest.mark.parametrize(
    ("address_type", "address", "error"),
    [
        (2, "x", "address type is not supported"),
        (AddressType.DOMAIN_NAME, "", "domain name is empty"),
        (AddressType.DOMAIN_NAME, "a" * 256, "domain name is longer than 255 bytes"),
        (AddressType.DOMAIN_NAME, 5, "address is not a string"),
        (AddressType.DOMAIN_NAME, "\ud800", "domain name is not valid unicode"),
    ],
)
def test_datagram_header_length_refuses(codec: CodecAPI, address_type: int, address: Any, error: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        codec.datagram_header_length(address_type, address)
    assert str(info.value) == error


# =================================================================================
# Surface
# =================================================================================


def test_codec_exports_the_contract(codec: ModuleType) -> None:
    names = {n for n in vars(CodecAPI) if not n.startswith("_")}
    assert names <= set(dir(codec))
    assert set(codec.__all__) == names


def test_selector_exports_the_contract() -> None:
    import socks6fast.proto.codec as selected  # noqa: PLC0415 - the import under test

    names = {n for n in vars(CodecAPI) if not n.startswith("_")}
    assert names <= set(selected.__all__)


@pytest.mark.conformance("CMD-06", "REQ-07")
@pytest.mark.parametrize("code", [4, 0x80, 0xFF])
def test_unknown_command_decodes_as_int(codec: CodecAPI, code: int) -> None:
    """CMD-06: an unknown Command Code is not a malformed request; it is kept as a plain
    int so that the proxy can authenticate the request and answer Command Not Supported
    (0x07) in a real Operation Reply, instead of sending an Operation Reply where the
    client expects the Authentication Reply. Checked whole and one byte at a time (REQ-07)."""
    data = bytes.fromhex(f"06 {code:02x} 0000 0050 00 01 7f000001")
    request, consumed = codec.decode_request(data)
    assert consumed == len(data)
    assert request is not None
    assert request.command == code and not isinstance(request.command, Command)
    assert (request.address, request.port) == ("127.0.0.1", 80)
    for end in range(len(data)):
        partial, needed = codec.decode_request(data[:end])
        assert partial is None and needed > 0
