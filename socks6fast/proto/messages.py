"""Typed, immutable SOCKS 6 messages and options (draft-11).

Each class mirrors one figure of the draft. Addresses are kept as text together
with their Address Type: dotted quad for IPv4, ``str(ipaddress.IPv6Address)``
(compressed) for IPv6, and the name for domain names, because a domain name may
look like an IP address and must keep its type.

Construction does not validate (it is on hot paths); the encoders do, and raise
``LocalProtocolError`` for values the draft forbids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from ..constants import (
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    Parity,
    ReplyCode,
    StackLeg,
)

__all__ = [
    "AssociationConfirmation",
    "AssociationInit",
    "AssociationMessage",
    "AuthData",
    "AuthMethodAdvertisement",
    "AuthMethodSelection",
    "AuthReply",
    "Datagram",
    "DatagramError",
    "DatagramHeader",
    "HappyEyeballsOption",
    "IPTOSOption",
    "IdempotenceAccepted",
    "IdempotenceExpenditure",
    "IdempotenceRejected",
    "IdempotenceRequest",
    "IdempotenceWindow",
    "ListenBacklogOption",
    "MultipathOption",
    "NoFragmentationOption",
    "OperationReply",
    "Option",
    "PortParityOption",
    "Request",
    "SessionID",
    "SessionInvalid",
    "SessionOK",
    "SessionRequest",
    "SessionTeardown",
    "StackOption",
    "TFOOption",
    "TTLOption",
    "UDPErrorOption",
    "UnknownOption",
    "UnknownStackOption",
    "VersionMismatchReply",
]


# --- Stack options (section "Stack options"): Kind 1, Length 8 -----------------


@dataclass(frozen=True, slots=True)
class IPTOSOption:
    """IP TOS option (Level 1, Code 1)."""

    leg: StackLeg
    """Which leg the option applies to."""
    tos: int
    """The IP TOS byte."""


@dataclass(frozen=True, slots=True)
class HappyEyeballsOption:
    """Happy Eyeballs option (Level 1, Code 2); meaningful on the proxy-remote leg."""

    leg: StackLeg
    """Leg as sent (the draft's figure fixes it at 2, proxy-remote)."""
    availability: Availability
    """DESIRED (client) / attempted (proxy), or NOT_DESIRED / not performed."""


@dataclass(frozen=True, slots=True)
class TTLOption:
    """TTL option (Level 1, Code 3): IP TTL or IPv6 hop limit."""

    leg: StackLeg
    """Which leg the option applies to."""
    ttl: int
    """The TTL / hop limit, 0-255."""


@dataclass(frozen=True, slots=True)
class NoFragmentationOption:
    """No Fragmentation option (Level 1, Code 4)."""

    leg: StackLeg
    """Which leg the option applies to."""
    availability: Availability
    """DESIRED: fragmentation not desired (client) / avoidance enforced (proxy)."""


@dataclass(frozen=True, slots=True)
class TFOOption:
    """TFO option (Level 4, Code 1); proxy-remote leg."""

    leg: StackLeg
    """Leg as sent (the figure fixes it at 2)."""
    payload_size: int
    """Largest SYN payload the proxy may use; 0 means any size."""


@dataclass(frozen=True, slots=True)
class MultipathOption:
    """Multipath option (Level 4, Code 2); proxy-remote leg."""

    leg: StackLeg
    """Leg as sent (the figure fixes it at 2)."""
    availability: Availability
    """DESIRED: MPTCP desired (client) / in use or accepted (proxy)."""


@dataclass(frozen=True, slots=True)
class ListenBacklogOption:
    """Listen Backlog option (Level 4, Code 3); BIND inside a session."""

    leg: StackLeg
    """Leg as sent (the figure fixes it at 2)."""
    backlog: int
    """Requested (client) or actually used (proxy) backlog, 0-65535."""


@dataclass(frozen=True, slots=True)
class UDPErrorOption:
    """UDP Error option (Level 5, Code 1): opt in to ICMP error reports."""

    leg: StackLeg
    """Leg as sent (the figure fixes it at 2)."""
    availability: Availability
    """DESIRED: reports desired (client) / will be performed (proxy)."""


@dataclass(frozen=True, slots=True)
class PortParityOption:
    """Port Parity option (Level 5, Code 2): UDP ASSOCIATE port parity and reservation."""

    leg: StackLeg
    """Leg as sent (the figure fixes it at 2)."""
    parity: Parity
    """Desired (client) or obtained (proxy) parity."""
    reserve: bool
    """Whether the port's counterpart is (to be) reserved."""


@dataclass(frozen=True, slots=True)
class UnknownStackOption:
    """A Stack option whose Leg, Level or Code draft-11 does not define; kept to be skipped."""

    leg: int
    """The 2-bit Leg field as sent (0 is not a defined leg)."""
    level: int
    """The 6-bit Level field."""
    code: int
    """The Code byte."""
    data: bytes
    """Option Data after the Code byte, padding included."""


StackOption: TypeAlias = (
    IPTOSOption
    | HappyEyeballsOption
    | TTLOption
    | NoFragmentationOption
    | TFOOption
    | MultipathOption
    | ListenBacklogOption
    | UDPErrorOption
    | PortParityOption
    | UnknownStackOption
)


# --- Authentication options -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthMethodAdvertisement:
    """Authentication Method Advertisement option (Kind 2)."""

    initial_data_length: int
    """Bytes of initial data following the Request (CONNECT), at most 2^14 (D12)."""
    methods: tuple[int, ...]
    """Advertised method numbers; trailing zero padding is not part of it."""


@dataclass(frozen=True, slots=True)
class AuthMethodSelection:
    """Authentication Method Selection option (Kind 3)."""

    method: int
    """The method that must proceed; 0xFF is No Acceptable Methods."""


@dataclass(frozen=True, slots=True)
class AuthData:
    """Authentication Data option (Kind 4).

    For method 2 the data is an RFC 1929 request (client) or reply (proxy);
    see ``socks5.decode_userpass_request``.
    """

    method: int
    """The authentication method number."""
    data: bytes
    """Method-specific data, including the zero padding that ends the option."""


# --- Session options (section "Session options") --------------------------------


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """Session Request option (Kind 5)."""


@dataclass(frozen=True, slots=True)
class SessionID:
    """Session ID option (Kind 6)."""

    session_id: bytes
    """Opaque, non-empty, a multiple of 4 bytes long."""


@dataclass(frozen=True, slots=True)
class SessionOK:
    """Session OK option (Kind 8)."""


@dataclass(frozen=True, slots=True)
class SessionInvalid:
    """Session Invalid option (Kind 9)."""


@dataclass(frozen=True, slots=True)
class SessionTeardown:
    """Session Teardown option (Kind 10)."""


# --- Idempotence options (section "Idempotence options") ------------------------


@dataclass(frozen=True, slots=True)
class IdempotenceRequest:
    """Token Request option (Kind 11)."""

    window_size: int
    """Requested window size (a request for 0 is ignored, D15)."""


@dataclass(frozen=True, slots=True)
class IdempotenceWindow:
    """Idempotence Window option (Kind 12, Length 12)."""

    base: int
    """First token of the window (mod 2^32)."""
    size: int
    """Window size, 1 to 2^31 - 1."""


@dataclass(frozen=True, slots=True)
class IdempotenceExpenditure:
    """Idempotence Expenditure option (Kind 13, Length 8 per D3)."""

    token: int
    """The token being spent (mod 2^32)."""


@dataclass(frozen=True, slots=True)
class IdempotenceAccepted:
    """Idempotence Accepted option (Kind 14)."""


@dataclass(frozen=True, slots=True)
class IdempotenceRejected:
    """Idempotence Rejected option (Kind 15)."""


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option of a kind draft-11 does not define (experimental range included).

    Kept opaque so that it can be skipped or passed on (REQ-06, D8).
    """

    kind: int
    """The option Kind."""
    data: bytes
    """Option Data (Length - 4 bytes)."""


Option: TypeAlias = (
    IPTOSOption
    | HappyEyeballsOption
    | TTLOption
    | NoFragmentationOption
    | TFOOption
    | MultipathOption
    | ListenBacklogOption
    | UDPErrorOption
    | PortParityOption
    | UnknownStackOption
    | AuthMethodAdvertisement
    | AuthMethodSelection
    | AuthData
    | SessionRequest
    | SessionID
    | SessionOK
    | SessionInvalid
    | SessionTeardown
    | IdempotenceRequest
    | IdempotenceWindow
    | IdempotenceExpenditure
    | IdempotenceAccepted
    | IdempotenceRejected
    | UnknownOption
)


# --- Messages --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """SOCKS 6 Request (figure "SOCKS 6 Request")."""

    command: Command | int
    """Command Code; a code draft-11 does not define is kept as a plain int (the proxy
    answers Command Not Supported, CMD-06)."""
    address_type: AddressType
    """Address Type of ``address``."""
    address: str
    """Destination (CONNECT) or desired bind address (BIND, UDP ASSOCIATE)."""
    port: int
    """Destination or desired bind port."""
    options: tuple[Option, ...] = ()
    """Options in wire order."""


@dataclass(frozen=True, slots=True)
class VersionMismatchReply:
    """Version Mismatch Reply: the single byte 6, then the proxy closes (REQ-01)."""


@dataclass(frozen=True, slots=True)
class AuthReply:
    """Authentication Reply (figure "SOCKS 6 Authentication Reply")."""

    type: AuthReplyType
    """SUCCESS or FAILURE."""
    options: tuple[Option, ...] = ()
    """Options in wire order."""


@dataclass(frozen=True, slots=True)
class OperationReply:
    """Operation Reply (figure "SOCKS 6 Operation Reply")."""

    reply_code: ReplyCode
    """Reply Code."""
    address_type: AddressType
    """Address Type of ``address``."""
    address: str
    """Bind address (or the connecting host in BIND's second reply)."""
    port: int
    """Bind port."""
    options: tuple[Option, ...] = ()
    """Options in wire order."""


@dataclass(frozen=True, slots=True)
class AssociationInit:
    """UDP Association Initialization (Message Type 1, Message Length 12)."""

    association_id: bytes
    """8 random bytes."""


@dataclass(frozen=True, slots=True)
class AssociationConfirmation:
    """UDP Association Confirmation (Message Type 2, Message Length 12)."""

    association_id: bytes
    """The confirmed association's ID."""


@dataclass(frozen=True, slots=True)
class DatagramHeader:
    """Datagram Header (Message Type 3), the per-packet header of UDP relay.

    Field order on the wire is Address Type, Padding, Port (D5).
    """

    association_id: bytes
    """8-byte Association ID."""
    address_type: AddressType
    """Address Type of ``address``."""
    address: str
    """Remote host (client to proxy: destination; proxy to client: source)."""
    port: int
    """Remote port."""
    message_length: int
    """Message Length field: header plus payload (padding after it is ignored)."""


@dataclass(frozen=True, slots=True)
class Datagram:
    """A whole Datagram message as read from a stream (UDP over the TCP connection)."""

    header: DatagramHeader
    """The Datagram Header."""
    payload: bytes
    """``message_length - header length`` bytes of payload."""


@dataclass(frozen=True, slots=True)
class DatagramError:
    """Datagram Error message (Message Type 4): an ICMP error relayed to the client."""

    association_id: bytes
    """8-byte Association ID."""
    address_type: AddressType
    """IPV4 or IPV6: type of ``address``."""
    address: str
    """Destination address of the IP header inside the ICMP payload."""
    port: int
    """Destination port of the UDP header inside the ICMP payload."""
    reporter_address_type: AddressType
    """IPV4 or IPV6: type of ``reporter_address``."""
    reporter_address: str
    """Address of the host that issued the ICMP error."""
    error_code: DatagramErrorCode
    """What went wrong."""


AssociationMessage: TypeAlias = AssociationInit | AssociationConfirmation | Datagram | DatagramError
