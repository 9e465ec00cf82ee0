"""Wire constants of SOCKS 6 (draft-olteanu-intarea-socks-6-11) and the limits we enforce.

Every wire code is an IntEnum member; no bare integers appear outside this module.
"""

from __future__ import annotations

from enum import IntEnum

#: The version byte of every SOCKS 6 message (section "Requests").
VERSION = 6
#: The first byte of a SOCKS 5 greeting (RFC 1928); the same listener serves it (D1).
SOCKS5_VERSION = 5

#: Options Length "MUST NOT exceed 16KB" (section "Requests", docs/decisions.md D6).
MAX_OPTIONS_LENGTH = 16384
#: Initial Data Length "MUST NOT be larger than 2^14" (Authentication Method options, D12).
MAX_INITIAL_DATA_LENGTH = 2**14
#: Token window sizes "MUST be less than 2^31" (Idempotence options).
MAX_WINDOW_SIZE = 2**31 - 1
#: A domain name is at most 255 bytes: its length field is one byte (D2).
MAX_DOMAIN_LENGTH = 255
#: Length of an Association ID (section "Handling UDP ASSOCIATE").
ASSOCIATION_ID_LENGTH = 8
#: Message Length of Association Initialization and Confirmation messages.
ASSOCIATION_MESSAGE_LENGTH = 12
#: Fixed part of every option: Kind (2 bytes) and Length (2 bytes).
OPTION_HEADER_LENGTH = 4
#: Every Stack option defined by draft-11 is 8 bytes long.
STACK_OPTION_LENGTH = 8


class Command(IntEnum):
    """Command Code of a Request (section "Requests")."""

    NOOP = 0x00
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """Address Type of Requests, Operation Replies and Datagram Headers."""

    IPV4 = 0x01
    DOMAIN_NAME = 0x03
    IPV6 = 0x04


class AuthReplyType(IntEnum):
    """Type of an Authentication Reply (section "Authentication Replies")."""

    SUCCESS = 0x00
    FAILURE = 0x01


class ReplyCode(IntEnum):
    """Reply Code of an Operation Reply (section "Operation Replies")."""

    SUCCESS = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED_BY_RULESET = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08
    CONNECTION_TIMED_OUT = 0x09


class OptionKind(IntEnum):
    """Option kinds (section "IANA Considerations")."""

    STACK = 1
    AUTH_METHOD_ADVERTISEMENT = 2
    AUTH_METHOD_SELECTION = 3
    AUTH_DATA = 4
    SESSION_REQUEST = 5
    SESSION_ID = 6
    SESSION_OK = 8
    SESSION_INVALID = 9
    SESSION_TEARDOWN = 10
    IDEMPOTENCE_REQUEST = 11
    IDEMPOTENCE_WINDOW = 12
    IDEMPOTENCE_EXPENDITURE = 13
    IDEMPOTENCE_ACCEPTED = 14
    IDEMPOTENCE_REJECTED = 15


#: First option kind of the experimental range (section "IANA Considerations").
EXPERIMENTAL_OPTION_KIND_MIN = 64512


class AuthMethod(IntEnum):
    """Authentication method numbers (IANA SOCKS methods, RFC 1928 section 3)."""

    NONE = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class StackLeg(IntEnum):
    """Leg field of a Stack option (section "Stack options")."""

    CLIENT_PROXY = 1
    PROXY_REMOTE = 2
    BOTH = 3


class StackLevel(IntEnum):
    """Level field of a Stack option (section "Stack options")."""

    IP = 1
    IPV4 = 2
    IPV6 = 3
    TCP = 4
    UDP = 5


class StackCode(IntEnum):
    """(Level, Code) pairs of the Stack options draft-11 defines, packed as level << 8 | code."""

    IP_TOS = (StackLevel.IP << 8) | 1
    HAPPY_EYEBALLS = (StackLevel.IP << 8) | 2
    TTL = (StackLevel.IP << 8) | 3
    NO_FRAGMENTATION = (StackLevel.IP << 8) | 4
    TFO = (StackLevel.TCP << 8) | 1
    MULTIPATH = (StackLevel.TCP << 8) | 2
    LISTEN_BACKLOG = (StackLevel.TCP << 8) | 3
    UDP_ERROR = (StackLevel.UDP << 8) | 1
    PORT_PARITY = (StackLevel.UDP << 8) | 2


class Availability(IntEnum):
    """Availability byte of Happy Eyeballs, No Fragmentation, Multipath and UDP Error options."""

    NOT_DESIRED = 0x01
    DESIRED = 0x02


class Parity(IntEnum):
    """Parity byte of the Port Parity option."""

    NONE = 0x00
    EVEN = 0x01
    ODD = 0x02


class UDPMessageType(IntEnum):
    """Message Type of the UDP Association Header (section "Handling UDP ASSOCIATE")."""

    ASSOCIATION_INIT = 0x01
    ASSOCIATION_CONFIRMATION = 0x02
    DATAGRAM = 0x03
    ERROR = 0x04


class DatagramErrorCode(IntEnum):
    """Error Code of a Datagram Error message (section "Reporting ICMP Errors")."""

    NETWORK_UNREACHABLE = 0x01
    HOST_UNREACHABLE = 0x02
    TTL_EXPIRED = 0x03
    DATAGRAM_TOO_BIG = 0x04


class UserPassStatus(IntEnum):
    """STATUS of the RFC 1929 reply: 0 is success, anything else failure."""

    SUCCESS = 0x00
    FAILURE = 0x01


# --- SOCKS 5 (RFC 1928) and username/password (RFC 1929) -----------------------


class Socks5Command(IntEnum):
    """CMD of a SOCKS 5 request (RFC 1928 section 4); SOCKS 5 has no NOOP."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


#: VER of the RFC 1929 username/password request and reply (RFC 1929 section 2).
USERPASS_VERSION = 1
#: ULEN and PLEN are one byte each: a username or password is at most 255 bytes.
MAX_USERPASS_LENGTH = 255
#: NMETHODS is one byte: a SOCKS 5 greeting lists at most 255 methods.
MAX_SOCKS5_METHODS = 255


#: Most relay engine worker threads: ``server.relay_workers`` (config.py) and the engine
#: (``_relay_c.RelayEngine``) check this one limit, so what check-config accepts, serve runs.
MAX_RELAY_WORKERS = 256
#: Most worker processes of ``serve --workers`` / ``[server] workers`` (D34): the SOCKS 6 UDP
#: port's steering needs workers x UDP threads <= 256 (one Association ID byte chooses).
MAX_WORKER_PROCESSES = 256


class RelayEnd(IntEnum):
    """Why a relayed connection ended (the data plane's report, socks6fast.dataplane.engine).

    One rule for every end: only ``EOF`` (EOF forwarded both ways, nothing left in flight)
    closes the two legs with FIN. Every other end is a cut, and both legs are closed with
    a reset (SO_LINGER 0), so that no receiver takes a cut-off transfer for a complete one.
    """

    #: Both directions finished normally: EOF forwarded each way; legs closed with FIN.
    EOF = 0
    #: A leg failed with a reset (ECONNRESET / EPIPE). What it had received before is
    #: delivered to the other leg first, then the other leg is reset too.
    RESET = 1
    #: No byte moved either way for the idle timeout; both legs are reset.
    IDLE_TIMEOUT = 2
    #: Any other error (no pipe, a timed-out leg, a dead relay worker); both legs are reset.
    ERROR = 3
    #: Ended by the proxy (relayer closed, drain deadline passed, relay cancelled); both
    #: legs are reset.
    SHUTDOWN = 4


class UdpDrop(IntEnum):
    """Why the UDP data plane dropped a datagram (socks6fast.dataplane.udp; counted, never raised).

    Section "Handling UDP ASSOCIATE" has malformed or unmatched datagrams "silently
    dropped" (UDP-03, UDP-05, D18): the engines count each drop under one of these.
    """

    #: Not a SOCKS 6 Datagram (version, Message Type, a Message Length below the header, a
    #: malformed name), or a client message type other than Datagram on the TCP connection.
    MALFORMED = 0
    #: The datagram ends inside its header.
    TRUNCATED = 1
    #: Address Type other than IPv4, Domain Name, IPv6.
    ADDRESS_TYPE = 2
    #: Message Length larger than the datagram (UDP-05).
    LENGTH = 3
    #: The Association ID names no live association (D18).
    UNKNOWN_ASSOCIATION = 4
    #: The datagram does not match the association's mapping: another 5-tuple, or the
    #: other channel (UDP vs the TCP connection) (UDP-03).
    MAPPING = 5
    #: From an address the association does not accept (SOCKS 5: not the TCP client, D19).
    SOURCE = 6
    #: SOCKS 5 FRAG other than 0 (RFC 1928 section 7, D19: no reassembly).
    FRAGMENT = 7
    #: The control plane's verdict for the destination is "deny", the name did not resolve,
    #: or the destination cannot be sent to (port 0, the all-zero address with a payload).
    DENIED = 8
    #: The destination (or its name, D20) waits for the control plane's verdict and the
    #: association already holds as many waiting datagrams as it may (D24).
    PENDING = 9
    #: No remote-facing socket of the destination's address family.
    NO_SOCKET = 10
    #: The kernel refused to send it (sendmsg/sendmmsg error, a full socket buffer).
    SEND_FAILED = 11
    #: UDP over TCP: the TCP connection would block, so the datagram is dropped, not buffered.
    TCP_BLOCKED = 12
    #: A remote datagram before the client's first datagram fixed the mapping (UDP-04).
    UNCONFIRMED = 13
    #: A remote datagram from a source the client never sent to, outside server mode (UDP-06).
    FILTERED = 14
    #: Too large: cut by the receive buffer, or its header would not fit Message Length.
    TOO_BIG = 15
    #: The association's destination or name table is full.
    TABLE_FULL = 16
    #: A datagram from a DTLS channel that carried no valid application record: not whole
    #: DTLS records (garbage, truncated), or a record OpenSSL discarded (bad MAC, replay).
    RECORD = 17
    #: To the client of an association whose channel (``UdpEngine.add_channel``) ended
    #: before it (D28): the datagram has nowhere to go.
    NO_CHANNEL = 18
