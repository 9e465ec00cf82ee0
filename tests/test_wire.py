"""Byte writer of the pure-Python codec (aioquic tests/test_buffer.py style)."""

from __future__ import annotations

import pytest

from socks6fast.errors import LocalProtocolError
from socks6fast.proto._wire_py import Writer


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
