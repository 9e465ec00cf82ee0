"""The surface both codec twins export (STYLE.md 3.3): ``_codec_py`` and ``_codec_c``.

This Protocol is the contract. Semantics shared by every function:

* ``data`` is any buffer-protocol object (bytes, bytearray, memoryview); decoding
  starts at ``offset`` and never copies more than the fields it returns.
* Stream decoders (``decode_request``, ``decode_auth_reply``,
  ``decode_operation_reply``, ``decode_association_message``) are incremental and
  stateless: they return ``(message, consumed)`` when a whole message is present,
  or ``(None, needed)`` where ``needed > 0`` is
  ``(smallest total length the message can have given the bytes seen so far) - available``.
  The smallest total is computed from the fixed header (Request/Operation Reply: 8
  bytes, Auth Reply: 4, association messages: 4), the Options Length (or Message
  Length) once bytes 2-3 are present, and the address length once the Address Type
  (and for a domain name, its length byte) is present; an address not yet known counts
  4 bytes (the smallest address field: IPv4, or a 1-byte name with D2 padding).
  Options are parsed only once all their bytes are present.
* Errors are raised as soon as the offending byte is available: a version byte other
  than 6 (``WireError``, reply_code None), an Options Length over
  ``max_options_length`` (``WireError``, GENERAL_FAILURE; D6, REQ-03), an
  unknown Command Code in a Request (COMMAND_NOT_SUPPORTED), an unknown Address Type
  (ADDRESS_TYPE_NOT_SUPPORTED), a malformed domain name (D2: empty after stripping,
  NUL inside, not UTF-8: GENERAL_FAILURE), malformed options (GENERAL_FAILURE).
  Decoders raise ``WireError`` and nothing else; both twins raise the same class with
  the same ``reply_code`` and the same message text.
* Encoders validate and raise ``LocalProtocolError`` for values the draft forbids.
"""

from __future__ import annotations

from typing import Protocol

from socks6fast.messages import (
    AssociationMessage,
    AuthReply,
    DatagramHeader,
    OperationReply,
    Option,
    Request,
)

Buffer = bytes | bytearray | memoryview


class CodecAPI(Protocol):
    def decode_request(
        self, data: Buffer, offset: int = 0, max_options_length: int = 16384
    ) -> tuple[Request | None, int]: ...

    def encode_request(self, request: Request) -> bytes: ...

    def decode_auth_reply(
        self, data: Buffer, offset: int = 0, max_options_length: int = 16384
    ) -> tuple[AuthReply | None, int]: ...

    def encode_auth_reply(self, reply: AuthReply) -> bytes: ...

    def decode_operation_reply(
        self, data: Buffer, offset: int = 0, max_options_length: int = 16384
    ) -> tuple[OperationReply | None, int]: ...

    def encode_operation_reply(self, reply: OperationReply) -> bytes: ...

    def decode_options(self, data: Buffer, offset: int = 0, length: int = -1) -> tuple[Option, ...]:
        """Walk ``length`` bytes of options (-1: to the end of data)."""
        ...

    def encode_options(self, options: tuple[Option, ...] | list[Option]) -> bytes: ...

    def decode_association_message(
        self, data: Buffer, offset: int = 0
    ) -> tuple[AssociationMessage | None, int]:
        """Incremental decoder for the UDP association messages on the TCP stream."""
        ...

    def encode_association_message(self, message: AssociationMessage) -> bytes: ...

    def decode_datagram_header(self, data: Buffer, offset: int = 0) -> tuple[DatagramHeader, int]:
        """Decode a Datagram Header from a whole datagram; returns (header, header length).

        Raises WireError when the header is truncated, when Message Length is smaller
        than the header, or on a bad version/type/address. A Message Length larger
        than the datagram is NOT checked here (the caller drops it, UDP-05).
        """
        ...

    def encode_datagram_header(
        self, header: DatagramHeader, out: bytearray | memoryview, offset: int = 0
    ) -> int:
        """Write ``header`` into ``out`` at ``offset``; return the bytes written."""
        ...

    def datagram_header_length(self, address_type: int, address: str) -> int:
        """Length of the Datagram Header for this address (for Message Length)."""
        ...
