"""The surface both codec twins export (STYLE.md 3.3): ``_codec_py`` and ``_codec_c``.

This Protocol is the contract. Semantics shared by every function:

* ``data`` is any C-contiguous buffer-protocol object (bytes, bytearray, memoryview of
  any item size: offsets and lengths count bytes); decoding starts at ``offset`` and
  never copies more than the fields it returns. A non-contiguous buffer raises
  ``WireError("data is not a contiguous buffer", reply_code=None)``; an object that is
  not a buffer raises ``TypeError`` (a caller bug, not a wire error).
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
  unknown Address Type
  (ADDRESS_TYPE_NOT_SUPPORTED), a malformed domain name (D2: empty after stripping,
  NUL inside, a non-NUL padding byte, not UTF-8: GENERAL_FAILURE), malformed options
  (GENERAL_FAILURE).
  Decoders raise ``WireError`` and nothing else; both twins raise the same class with
  the same ``reply_code`` and the same message text.
* Encoders validate and raise ``LocalProtocolError`` for values the draft forbids.

Clarifications (made by the reference ``_codec_py``; the twin follows them):

* Public names: the 13 functions below plus ``encode_version_mismatch()`` (returns
  ``b"\\x06"``). A bad ``offset`` (outside ``0..len(data)``) raises
  ``WireError("offset N is out of range", reply_code=None)``.
* Check order is wire order, one check per byte as it arrives:
  Request/Operation Reply: byte 0 version; byte 1 reply code (unknown: GENERAL_FAILURE;
  an unknown Request Command Code is not an error: it is kept as a plain int so that the
  proxy can answer Command Not Supported in a real Operation Reply, CMD-06); bytes 2-3 Options Length: first
  "> max_options_length", then "not a multiple of 4" (every option is a multiple
  of 4, so such a total is malformed; raised early); byte 7 address type; for a
  domain name byte 8 (a length byte of 0 raises "domain name is empty" at once).
  The address is decoded (D2 name checks, in this order: empty after stripping the
  trailing NULs of the ``len`` bytes, NUL inside, padding up to the field's 4-byte
  boundary not all NUL, not UTF-8) once its whole field, padding included, is
  present; the options once all of them are present.
  Authentication Reply: byte 0, byte 1 Type (0/1, else malformed), bytes 2-3 as above.
* needed: Request/Operation Reply ``8 + (optlen if bytes 2-3 seen else 0) +
  (address field length if known else 4) - available``; Authentication Reply
  ``4 + optlen - available``; association messages ``4 - available`` until bytes 2-3
  are present, then ``message_length - available``.
* Association messages: Message Type outside 1..4 is malformed. Types 1/2 need
  Message Length == 12. Type 3 (Datagram): Message Length >= 20 at bytes 2-3, and
  >= the header length once the address type (and name length byte 16) is known.
  Type 4 (Datagram Error): Message Length >= 28 at bytes 2-3; address types must be
  1 or 4 (3: ADDRESS_TYPE_NOT_SUPPORTED "address type 3 is not allowed in a datagram
  error"; others: "address type N is not supported"); once the address type is
  known Message Length >= 16 + addr + 8, once the reporter type is known Message
  Length must equal the exact total; then the error code (1..4). Padding bytes are
  never inspected, except a domain name's padding (D2: it must be NULs, in
  Requests, Operation Replies and Datagram Headers alike).
* ``decode_datagram_header`` uses the same checks as a type 3 message, except a
  Message Type other than 3 is "message type N is not a datagram" and lack of bytes
  is "datagram header is truncated".
* Options are placed (REQ-06): a known kind in a message where draft-11 does not put
  it decodes as ``UnknownOption(kind, data)`` with no check beyond D8's Length rules.
  Request: Stack, Advertisement, Authentication Data, Session Request, Session ID,
  Session Teardown, Idempotence Request, Idempotence Expenditure. Authentication
  Reply: Method Selection, Authentication Data, Session OK, Session Invalid, Session
  ID (D4), Idempotence Window, Accepted, Rejected. Operation Reply: Stack, Session ID.
  ``decode_options`` decodes every known kind unless given ``context`` (``Request``,
  ``AuthReply`` or ``OperationReply``, the class itself; anything else raises
  ``WireError("options context is not Request, AuthReply or OperationReply",
  reply_code=None)``).
* Options: a Stack option shorter than 8 is malformed. Leg 0, an undefined (Level,
  Code), a defined one whose Length is not 8, or whose value draft-11 does not
  define (Availability not 1/2, Parity > 2, Reserve > 1) is unsupported and gives
  ``UnknownStackOption`` (data = bytes 6..Length). Padding is not inspected.
  ``AuthData.data`` and
  ``UnknownOption.data`` include padding. Advertisement: methods = bytes 6..Length
  with trailing NULs stripped. Idempotence Request accepts any 32-bit size (0 is
  D15's business); Window size 0 or > 2^31-1 is malformed.
* Encoders: ``AuthData`` and ``AuthMethodAdvertisement`` are padded minimally;
  ``UnknownOption.data`` must be a multiple of 4 and ``UnknownStackOption.data``
  2 modulo 4 (no padding added, so decode_options(encode_options(x)) == x), and neither
  may encode something that decodes as a known option: no known kind, and no Leg 1-3
  with a known Level/Code, 2 data bytes and a defined value. Byte fields (data,
  payload, Association ID, the ``out`` buffer) are counted in bytes, not items.
  Integer fields refuse ``bool`` (and anything that is not an ``int``); enum fields
  are looked up in the same tables everywhere (1.0 is not an address type).
  Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP Error and Port Parity must have
  Leg 2 (their figures fix it; decoders accept any leg). A NOOP Request must have
  address type IPv4/IPv6 (checked after the address type), the zero address and port
  0 (checked after the port). Message encoders refuse more than 16384 bytes of
  options. ``encode_association_message(Datagram)`` requires
  ``header.message_length == header length + len(payload)``; ``DatagramError``'s
  length is computed, and error code 4 (datagram too big) needs IPv6 for both
  addresses (checked after the error code). ``datagram_header_length`` checks only
  the address type and a name's UTF-8 length (1..255), not IP text.
  ``encode_datagram_header`` validates the header first, then ``out`` (a writable
  C-contiguous buffer, else "output buffer is not writable"), then its room.

Decoder error messages (``str(exc)``; N, M are decimal ints; reply_code GENERAL_FAILURE
unless stated):

  "version N is not 6" (None)            "offset N is out of range" (None)
  "reply code N is unknown"              "authentication reply type N is unknown"
  "options length N exceeds M"           "options length N is not a multiple of 4"
  "options length N runs past the end of the data"  (decode_options only)
  "address type N is not supported" (ADDRESS_TYPE_NOT_SUPPORTED)
  "address type 3 is not allowed in a datagram error" (ADDRESS_TYPE_NOT_SUPPORTED)
  "domain name is empty"  "domain name contains a nul byte"  "domain name is not valid utf-8"
  "option header runs past options length"   "option length N is less than 4"
  "option length N is not a multiple of 4"   "option length N runs past options length"
  "option kind K has length N, expected M"   "option kind K has length N, expected at least M"
  "domain name padding is not zero"          "data is not a contiguous buffer" (None)
  "options context is not Request, AuthReply or OperationReply" (None)
  "initial data length N exceeds 16384"      "idempotence window size N is out of range"
  "message type N is unknown"                "message type N is not a datagram"
  "message length N is less than M"          "message length N is not M"
  "datagram error code N is unknown"         "datagram header is truncated"

Encoder errors (``LocalProtocolError``, reply_code GENERAL_FAILURE, no values in the text).
Check order: message code/type/command first, then address type, address, port,
options (each option in order, its fields in wire order), then the 16384 cap.
Datagram Header: association id, address type, address, port, message length;
a Datagram: its header, then the payload type, then length == header + payload.
Datagram Error: association id, both address types, address, reporter address,
port, error code. ``X is out of range`` covers non-int values too, with X one of:
"port", "ip tos", "ttl", "tfo payload size", "listen backlog", "authentication
method", "initial data length", "idempotence window size", "idempotence window
base", "idempotence token", "stack leg", "stack level", "stack code", "option kind",
"message length". Others:

  "command is not supported"  "reply code is unknown"  "authentication reply type is unknown"
  "address type is not supported"  "address is not a string"  "address is not a valid ip address"
  "domain name is empty"  "domain name is longer than 255 bytes"  "domain name contains a nul byte"
  "domain name is not valid unicode"  "options is not a tuple or list"  "options length exceeds 16384"
  "not a socks 6 option"  "option is longer than 65535 bytes"  "stack option availability is out of range"
  "port parity is out of range"  "port parity reserve is not a bool"
  "authentication method 0 is never advertised"  "authentication data is not bytes"
  "session id is not bytes"  "session id length is not a positive multiple of 4"
  "unknown option uses a known kind"  "option data is not bytes"
  "option data length is not a multiple of 4"  "unknown stack option uses a known level and code"
  "stack option data is not bytes"  "stack option data length is not 2 modulo 4"
  "association id is not 8 bytes"  "datagram payload is not bytes"  "datagram header has the wrong type"
  "message length is less than the header length"
  "message length does not match header and payload"
  "datagram error address type is not ipv4 or ipv6"  "datagram error code is unknown"
  "not a udp association message"  "output buffer is too small"  "output buffer is not writable"
  "stack option leg is not proxy-remote"  "noop address type is not ipv4 or ipv6"
  "noop address or port is not zero"  "datagram too big is for ipv6 only"
"""

from __future__ import annotations

from typing import Protocol

from socks6fast.proto.messages import (
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

    def decode_options(
        self,
        data: Buffer,
        offset: int = 0,
        length: int = -1,
        context: type[Request] | type[AuthReply] | type[OperationReply] | None = None,
    ) -> tuple[Option, ...]:
        """Walk ``length`` bytes of options (-1: to the end of data), placed per ``context``."""
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

    def encode_version_mismatch(self) -> bytes:
        """The Version Mismatch Reply: always ``b"\\x06"`` (REQ-01)."""
        ...
