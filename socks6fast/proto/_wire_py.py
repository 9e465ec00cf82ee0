"""Byte writer for the pure-Python codec: ``Writer`` (push_*), after aioquic ``_buffer``.

The decoders read with ``struct`` and slicing at offsets they have bounds-checked
themselves (partial input is normal: they ask for more bytes, never raise on a short
buffer), so there is no reader cursor; a Writer appends big-endian integers and byte
strings to a bytearray and range-checks each value.
"""

from __future__ import annotations

import struct

from ..errors import LocalProtocolError

__all__ = ["Writer"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


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
