"""Byte cursor of the pure-Python codec (aioquic tests/test_buffer.py style).

A short read raises ``WireError`` and leaves the position unchanged, so a
caller may wait for more data and retry.
"""

from __future__ import annotations

import pytest

from socks6fast._wire_py import Reader, Writer
from socks6fast.errors import LocalProtocolError, WireError


def test_pull_integers_big_endian() -> None:
    r = Reader(bytes.fromhex("01 0203 04050607 0809"))
    assert r.pull_u8() == 0x01
    assert r.pull_u16() == 0x0203
    assert r.pull_u32() == 0x04050607
    assert r.position == 7
    assert r.remaining == 2
    assert r.pull_bytes(2) == b"\x08\x09"
    assert r.remaining == 0


@pytest.mark.parametrize(
    ("pull", "size"),
    [("pull_u8", 0), ("pull_u16", 1), ("pull_u32", 3)],
)
def test_short_read_raises_and_keeps_position(pull: str, size: int) -> None:
    r = Reader(b"\xaa" + bytes(size), offset=1)
    with pytest.raises(WireError) as info:
        getattr(r, pull)()
    assert info.value.reply_code is None
    assert r.position == 1
    assert r.remaining == size


def test_pull_bytes_and_skip_past_end() -> None:
    r = Reader(b"abcdef", offset=1, end=4)
    with pytest.raises(WireError, match="read of 4 bytes runs past the end"):
        r.pull_bytes(4)
    with pytest.raises(WireError):
        r.skip(4)
    with pytest.raises(WireError):
        r.pull_bytes(-1)
    assert r.position == 1
    r.skip(1)
    assert r.pull_bytes(2) == b"cd"
    with pytest.raises(WireError):
        r.pull_u8()


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_reader_accepts_any_buffer(buffer_type: type) -> None:
    r = Reader(buffer_type(b"\x00\x01\x00\x00\x00\x02"))
    assert r.pull_u16() == 1
    assert r.pull_u32() == 2


@pytest.mark.parametrize(("offset", "end"), [(-1, -1), (7, -1), (2, 1), (0, 7)])
def test_reader_bounds_checked(offset: int, end: int) -> None:
    with pytest.raises(WireError, match="reader bounds are out of range"):
        Reader(b"abcdef", offset=offset, end=end)


def test_writer_round_trip() -> None:
    w = Writer()
    w.push_u8(6)
    w.push_u16(0x1234)
    w.push_u32(0xDEADBEEF)
    w.push_bytes(b"xy")
    w.push_zeros(2)
    assert len(w) == 11
    data = w.getvalue()
    assert data == bytes.fromhex("06 1234 deadbeef 7879 0000")
    r = Reader(data)
    assert (r.pull_u8(), r.pull_u16(), r.pull_u32(), r.pull_bytes(4)) == (6, 0x1234, 0xDEADBEEF, b"xy\0\0")


@pytest.mark.parametrize(
    ("push", "value"),
    [
        ("push_u8", 256),
        ("push_u8", -1),
        ("push_u16", 65536),
        ("push_u16", -1),
        ("push_u32", 2**32),
        ("push_u32", -1),
    ],
)
def test_writer_range_checked(push: str, value: int) -> None:
    w = Writer()
    with pytest.raises(LocalProtocolError):
        getattr(w, push)(value)
    assert len(w) == 0
