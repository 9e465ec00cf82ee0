"""Byte cursor for the pure-Python codec: ``Reader`` (pull_*) and ``Writer`` (push_*).

Strategy (aioquic ``_buffer``): a Reader walks a buffer between ``offset`` and
``end`` and raises ``WireError`` on a short read *without moving*, so a caller
can catch it, wait for more bytes and retry. A Writer appends to a bytearray.
Both are deliberately tiny: the codec checks lengths itself before it pulls, so
a Reader error is a bug guard, not a control-flow mechanism.
"""

from __future__ import annotations

import struct

from .errors import LocalProtocolError, WireError

__all__ = ["Reader", "Writer"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


class Reader:
    """Read big-endian integers and byte strings from a buffer.

    Args:
        data: any buffer-protocol object (bytes, bytearray, memoryview).
        offset: where reading starts.
        end: where reading stops (exclusive); -1 means the end of ``data``.

    Raises:
        WireError: when ``offset``/``end`` lie outside ``data``.
    """

    __slots__ = ("_view", "_pos", "_end")

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0, end: int = -1) -> None:
        view = memoryview(data)
        size = len(view)
        if end == -1:
            end = size
        if not 0 <= offset <= end <= size:
            raise WireError("reader bounds are out of range", None)
        self._view = view
        self._pos = offset
        self._end = end

    @property
    def position(self) -> int:
        """Absolute index of the next byte to read."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bytes left before ``end``."""
        return self._end - self._pos

    def _take(self, n: int) -> int:
        # Check before moving: a failed pull leaves the position unchanged.
        pos = self._pos
        if n < 0 or self._end - pos < n:
            raise WireError(f"read of {n} bytes runs past the end", None)
        self._pos = pos + n
        return pos

    def pull_u8(self) -> int:
        """Read one byte."""
        pos = self._take(1)
        return self._view[pos]

    def pull_u16(self) -> int:
        """Read a big-endian 16-bit unsigned integer."""
        pos = self._take(2)
        return int(_U16.unpack_from(self._view, pos)[0])

    def pull_u32(self) -> int:
        """Read a big-endian 32-bit unsigned integer."""
        pos = self._take(4)
        return int(_U32.unpack_from(self._view, pos)[0])

    def pull_bytes(self, n: int) -> bytes:
        """Read ``n`` bytes (a copy)."""
        pos = self._take(n)
        return bytes(self._view[pos : pos + n])

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes without reading them."""
        self._take(n)


class Writer:
    """Append big-endian integers and byte strings to a growing buffer.

    Raises ``LocalProtocolError`` when a value does not fit its field.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def push_u8(self, value: int) -> None:
        """Append one byte."""
        if not 0 <= value <= _U8_MAX:
            raise LocalProtocolError("value does not fit in 8 bits")
        self._buf.append(value)

    def push_u16(self, value: int) -> None:
        """Append a big-endian 16-bit unsigned integer."""
        if not 0 <= value <= _U16_MAX:
            raise LocalProtocolError("value does not fit in 16 bits")
        self._buf += _U16.pack(value)

    def push_u32(self, value: int) -> None:
        """Append a big-endian 32-bit unsigned integer."""
        if not 0 <= value <= _U32_MAX:
            raise LocalProtocolError("value does not fit in 32 bits")
        self._buf += _U32.pack(value)

    def push_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw bytes."""
        self._buf += data

    def push_zeros(self, n: int) -> None:
        """Append ``n`` NUL bytes (padding)."""
        self._buf += bytes(n)

    def getvalue(self) -> bytes:
        """The bytes written so far."""
        return bytes(self._buf)
