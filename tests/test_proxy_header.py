"""The PROXY protocol header parser (socks6fast.proto.proxy_header), without sockets.

Vectors follow HAProxy's proxy-protocol.txt (sections 2.1 and 2.2); the v2 ones are laid out
field by field. Every valid header is also fed one byte at a time: each proper prefix must
ask for more (None), never fail. The property tests give the parser random bytes and mutated
valid headers: it returns a header, None or raises ProxyHeaderError, nothing else.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socks6fast.errors import ProxyHeaderError
from socks6fast.proto.policy import parse_network
from socks6fast.proto.proxy_header import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyTrust,
    parse_proxy_header,
)

SOCKS5_GREETING = b"\x05\x01\x00"


def v2(command: int, family_protocol: int, block: bytes, *, version: int = 2) -> bytes:
    """signature | version<<4 | command | family<<4 | protocol | length (u16) | block"""
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family_protocol])
        + struct.pack("!H", len(block))
        + block
    )


def inet_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def assert_incremental(data: bytes, expected: ProxyHeader) -> None:
    """Every proper prefix of a header asks for more; the whole gives ``expected``."""
    for end in range(expected.length):
        assert parse_proxy_header(data[:end]) is None, end
    assert parse_proxy_header(data) == expected


# --- version 1 ----------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1080\r\n"
    expected = ProxyHeader(1, len(line), ("192.0.2.7", 56324), ("198.51.100.1", 1080))
    assert_incremental(line + SOCKS5_GREETING, expected)


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:db8::7 2001:DB8::1 65535 0\r\n"
    expected = ProxyHeader(1, len(line), ("2001:db8::7", 65535), ("2001:db8::1", 0))
    assert_incremental(line, expected)


def test_v1_tcp6_ipv4_mapped_source_is_written_as_ipv4() -> None:
    line = b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1000 1080\r\n"
    header = parse_proxy_header(line)
    assert header is not None and header.source == ("192.0.2.7", 1000)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n",
        b"PROXY UNKNOWN whatever the sender put here\r\n",
    ],
)
def test_v1_unknown_names_no_address(line: bytes) -> None:
    # Section 2.1: use the connection's own endpoints; ignore the rest of the line.
    assert_incremental(line + b"\x06", ProxyHeader(1, len(line), None, None))


def test_v1_longest_line_is_accepted() -> None:
    six = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1_LENGTH
    header = parse_proxy_header(line)
    assert header is not None and header.length == MAX_V1_LENGTH


def test_v1_without_crlf_in_107_bytes_is_oversized() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 14)
    assert len(line) == MAX_V1_LENGTH
    assert parse_proxy_header(line[:-1]) is None  # 106 bytes: the CRLF may still come
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107"):
        parse_proxy_header(line)
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line + b"\r\n")  # a CRLF past the bound does not count


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1080\n", "bare LF"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1080\rX\n", "CR not followed by LF"),
        (b"PROXY TCP4 192.0.2.07 198.51.100.1 56324 1080\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 1080\r\n", "leading zeros"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 1080\r\n", "not 0-65535"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 1080\r\n", "not 0-65535"),
        (b"PROXY TCP4  192.0.2.7 198.51.100.1 56324 1080\r\n", "is not 'PROXY"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "is not 'PROXY"),
        (b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 1080\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.7 2001:db8::1 56324 1080\r\n", "not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 56324 1080\r\n", "not an IPv6 address"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 56324 1080\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa1 1080\r\n", "not US-ASCII"),
        (b"PROXY\r\n", "no PROXY header"),
        (b"PROXY \r\n", "not TCP4"),
        (b"PROXX TCP4 1.2.3.4 1.2.3.4 1 1\r\n", "no PROXY header"),
    ],
)
def test_v1_malformed(line: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_proxy_header(line)


# --- version 2 ----------------------------------------------------------------------------


def test_v2_proxy_tcp4() -> None:
    block = inet_block("192.0.2.7", "198.51.100.1", 56324, 1080)
    data = v2(0x1, 0x11, block)  # PROXY, AF_INET | STREAM, 12-byte block
    assert len(data) == 16 + 12
    expected = ProxyHeader(2, 28, ("192.0.2.7", 56324), ("198.51.100.1", 1080))
    assert_incremental(data + SOCKS5_GREETING, expected)


def test_v2_proxy_tcp6_with_tlvs_skipped() -> None:
    block = inet_block("2001:db8::7", "2001:db8::1", 4242, 443)
    tlvs = tlv(0x01, b"h2") + tlv(0x05, b"unique-id-1234") + tlv(0x20, b"\x01" + b"\x00" * 4)
    data = v2(0x1, 0x21, block + tlvs)  # PROXY, AF_INET6 | STREAM
    expected = ProxyHeader(2, 16 + 36 + len(tlvs), ("2001:db8::7", 4242), ("2001:db8::1", 443))
    assert_incremental(data + b"\x16\x03\x01", expected)


def test_v2_udp4_names_the_addresses_too() -> None:
    data = v2(0x1, 0x12, inet_block("192.0.2.7", "198.51.100.1", 53, 1080))  # AF_INET | DGRAM
    header = parse_proxy_header(data)
    assert header is not None and header.source == ("192.0.2.7", 53)


def test_v2_local_ignores_the_address_block() -> None:
    # Section 2.2: LOCAL (a health check) uses the real endpoints; the length still counts.
    for block in (b"", inet_block("192.0.2.7", "198.51.100.1", 1, 2)):
        data = v2(0x0, 0x11 if block else 0x00, block)
        assert_incremental(data + b"\x05", ProxyHeader(2, 16 + len(block), None, None, local=True))


@pytest.mark.parametrize(
    ("family_protocol", "block"),
    [
        (0x00, b""),  # UNSPEC
        (0x10, inet_block("192.0.2.7", "198.51.100.1", 1, 2)),  # AF_INET, protocol UNSPEC
        (0x31, b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")),  # AF_UNIX
    ],
)
def test_v2_proxy_without_a_usable_address(family_protocol: int, block: bytes) -> None:
    data = v2(0x1, family_protocol, block)
    assert_incremental(data, ProxyHeader(2, len(data), None, None))


def test_v2_oversized() -> None:
    longest = v2(0x1, 0x11, inet_block("192.0.2.7", "198.51.100.1", 1, 2) + b"\x04" * (MAX_V2_LENGTH - 28))
    assert len(longest) == MAX_V2_LENGTH
    assert parse_proxy_header(longest) is not None
    too_long = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH - 15)
    # Refused from its 16 fixed bytes alone: nothing more is buffered.
    with pytest.raises(ProxyHeaderError, match="longer than 4096"):
        parse_proxy_header(too_long)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", "no PROXY header"),
        (b"\r\n\r\nGET", "no PROXY header"),
        (v2(0x1, 0x11, b"", version=1), "version 1, not 2"),
        (v2(0x1, 0x11, b"", version=3), "version 3, not 2"),
        (v2(0x2, 0x11, b""), "command 0x2"),
        (v2(0x1, 0x41, b""), "family 0x4"),
        (v2(0x1, 0x13, b""), "protocol 0x3"),
        (v2(0x1, 0x11, b"\x00" * 11), "shorter than 12"),
        (v2(0x1, 0x21, b"\x00" * 35), "shorter than 36"),
        (v2(0x1, 0x31, b"\x00" * 215), "shorter than 216"),
        (SOCKS5_GREETING, "SOCKS 5, not a PROXY header"),
        (b"\x06\x00\x00\x00", "SOCKS 6"),
        (b"\x16\x03\x01\x00", "TLS ClientHello"),
    ],
)
def test_v2_and_other_malformed(data: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse_proxy_header(data)


def test_v2_bad_version_fails_before_the_rest_arrives() -> None:
    # No wait for bytes that cannot make it valid.
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(V2_SIGNATURE + b"\x11")
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(V2_SIGNATURE + b"\x21\x51")


def test_empty_input_needs_more() -> None:
    assert parse_proxy_header(b"") is None


# --- the trusted balancers ----------------------------------------------------------------


def test_trust() -> None:
    trust = ProxyTrust([parse_network("127.0.0.1"), parse_network("10.0.0.0/8"), parse_network("fd00::/8")])
    assert trust.trusts("127.0.0.1")
    assert trust.trusts("10.9.8.7")
    assert trust.trusts("::ffff:10.1.1.1")  # mapped: the IPv4 peer
    assert trust.trusts("fd00::1")
    assert not trust.trusts("127.0.0.2")
    assert not trust.trusts("::1")
    assert not trust.trusts("not an address")
    trust.networks = (parse_network("127.0.0.2"),)  # a reload
    assert trust.trusts("127.0.0.2") and not trust.trusts("127.0.0.1")


# --- properties ---------------------------------------------------------------------------

VALID = [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1080\r\n",
    b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(0x1, 0x11, inet_block("192.0.2.7", "198.51.100.1", 56324, 1080)),
    v2(0x1, 0x21, inet_block("2001:db8::7", "2001:db8::1", 1, 2) + tlv(0x04, b"abc")),
    v2(0x0, 0x00, b""),
]


def check_any(data: bytes) -> None:
    """The parser's contract on arbitrary input: a header no longer than the input, None, or
    ProxyHeaderError; a header's proper prefixes ask for more."""
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if header is None:
        assert len(data) < MAX_V2_LENGTH
        return
    assert header.version in (1, 2)
    assert 0 < header.length <= len(data)
    assert header.length <= (MAX_V1_LENGTH if header.version == 1 else MAX_V2_LENGTH)
    for end in range(header.length):
        assert parse_proxy_header(data[:end]) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    check_any(data)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([V2_SIGNATURE, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
    st.binary(max_size=200),
)
def test_random_bytes_after_a_signature(start: bytes, rest: bytes) -> None:
    check_any(start + rest)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 200),
)
def test_mutated_valid_headers(data: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    check_any(bytes(mutated))
    check_any(bytes(mutated[: max(0, len(mutated) - cut)]))
