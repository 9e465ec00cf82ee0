"""What the proxy's sans-IO core asks its adapter to do, and what the adapter reports back.

Strategy (aioquic: ``QuicConnection`` decides, ``asyncio/protocol.py`` performs): a
`socks6fast.proto.server.ServerConnection` never touches a socket, a thread or a clock. It
returns *actions*, one at a time, from ``next_action(now)``; the adapter performs each one and
reports how it ended through the matching *completion* method, then asks for the next action:

* NEED_DATA: read from the client until ``get_timer()``; pass the bytes to
  ``receive_data(data)`` (b"": EOF), or nothing when the timer fired.
* `Send`: write ``data`` to the client.
* `Close`: close the client connection (``linger``: after a final reply, half-close and
  drain briefly first). The end.
* `ApplyClientOptions`: set IP options on the client socket;
  ``client_options_applied(applied)``.
* `CheckCredentials`: verify RFC 1929 credentials (scrypt, off the event loop);
  ``credentials_checked(user, reason)``.
* `EndSession`: close the BIND listeners an ended session kept.
* `AskSessionStore`: only with a shared session store (Redis, issue 13 item 2): await the
  store's answer to the query; ``session_answered(answer)`` or ``session_store_failed(message)``.
* `Resolve`: resolve a domain name; ``resolved(targets)`` or ``resolve_failed(message)``.
* `Dial`: connect to the first target that answers; ``dial_finished(Dialed)`` or
  ``dial_failed(code, message)``.
* `Listen`: open a BIND listening socket; ``listening(Listening)`` or
  ``listen_failed(code, message)``.
* `Claim`: take over a session's backlog listener (CMD-05); ``listening(Listening)``.
* `AwaitPeer`: wait for a connection on that listener, passing early client bytes to
  ``receive_data``; ``peer_accepted(host, port, mptcp)``.
* `HoldBacklog`: keep the listener open until the client leaves or its session ends.
* `Relay`: hand both connections to the data plane. The end.
* `OpenAssociation`: UDP ASSOCIATE: open the association's UDP sockets;
  ``association_opened(OpenedAssociation)`` or ``association_failed(exc, message)``.
* `Associate`: hand the client connection and those sockets to the UDP data plane, which
  writes the Operation Reply and the Association Initialization first. The end (if the data
  plane refuses it: ``association_refused(message)``, write ``refusal`` and close).

Whatever way the connection ends (even by an exception in the adapter), the adapter calls
``connection_ended(now)`` last.

Nothing here decides anything: the fields say exactly what to do. The deadlines are on the
clock the adapter passes as ``now``.

The classes are slotted but not frozen: they are built for every connection, and a frozen
dataclass's ``__init__`` (one ``object.__setattr__`` call per field) costs several times a
plain one. Treat them as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ..constants import AddressType
from .sessions import Session, SessionQuery
from .socks5 import UserPassRequest
from .stack import AppliedLeg, LegOptions

__all__ = [
    "AWAIT_PEER",
    "CLOSE",
    "HOLD_BACKLOG",
    "LINGER_CLOSE",
    "Action",
    "ApplyClientOptions",
    "AskSessionStore",
    "Associate",
    "AwaitPeer",
    "CheckCredentials",
    "Claim",
    "Close",
    "Dial",
    "Dialed",
    "EndSession",
    "HoldBacklog",
    "Listen",
    "Listening",
    "OpenAssociation",
    "OpenedAssociation",
    "Relay",
    "Resolve",
    "Send",
    "Target",
]

Target = tuple[int, tuple[Any, ...]]
"""One resolved destination as a resolver returns it: ``(address family, socket address)``.
The core reads only the address text (``target[1][0]``, for the rules) and passes the rest back
untouched."""


@dataclass(slots=True)
class Send:
    """Write ``data`` to the client (and wait until the kernel has it)."""

    data: bytes
    """The bytes: one or more replies, in order."""
    reply_code: int | None = None
    """The Operation Reply (or SOCKS 5 reply) code these bytes carry, if any; the core counts
    it as sent once it is asked for the next action."""


@dataclass(slots=True)
class Close:
    """Close the client connection; the handshake is over."""

    linger: bool
    """A reply that ends the connection was just written: half-close and read what the client
    still sends for a moment, so that closing with unread bytes does not reset the connection
    and destroy the reply in flight."""


#: `Close` after a final reply.
LINGER_CLOSE: Final = Close(linger=True)
#: `Close` at once (the client left, or there is nothing in flight).
CLOSE: Final = Close(linger=False)


@dataclass(slots=True)
class ApplyClientOptions:
    """Apply IP-level Stack options to the client's socket and read back what it uses (STK-03)."""

    options: LegOptions
    """What the client asked for the client-proxy leg."""


@dataclass(slots=True)
class CheckCredentials:
    """Verify RFC 1929 credentials against the user store (``UserStore.authenticate``; scrypt
    costs ~50 ms of CPU, so off the event loop) within the failed-attempt limits."""

    credentials: UserPassRequest
    """Username and password as received."""


@dataclass(slots=True)
class EndSession:
    """A session ended (Session Teardown, SES-05; or D4): close the BIND listeners it kept."""

    session: Session
    """The ended session; its ``listeners`` are the adapter's handles."""


@dataclass(slots=True)
class AskSessionStore:
    """Ask the shared session store (`socks6fast.proto.sessions.SharedSessionStore`): one round
    trip. Never emitted with the in-memory store, which the core consults itself."""

    query: SessionQuery
    """The question (lookup with window request and token spend, teardown, or create)."""


@dataclass(slots=True)
class Resolve:
    """Resolve a domain name; the answer comes back through ``resolved`` in preference order."""

    host: str
    """The name."""
    port: int
    """The port to put in the socket addresses."""
    deadline: float
    """Give up at this time (the connect timeout covers resolving and connecting)."""


@dataclass(slots=True)
class Dial:
    """Connect to the destination with the proxy-remote leg's options set before ``connect``."""

    address_type: AddressType
    """IPV4 or IPV6 for a literal; DOMAIN_NAME when ``targets`` holds the resolved addresses."""
    host: str
    """The address or name (for messages)."""
    port: int
    """The port."""
    deadline: float
    """Give up at this time (CONNECTION_TIMED_OUT)."""
    targets: tuple[Target, ...] = ()
    """Resolved addresses to try, in order (empty for a literal: connect to ``host`` itself)."""
    options: LegOptions = LegOptions()
    """IP options for the new socket (STK-03, STK-05)."""
    multipath: bool = False
    """Open an MPTCP socket if the kernel offers it (STK-07)."""
    happy_eyeballs: bool = False
    """Race the targets, alternating families, 250 ms apart (RFC 8305, STK-04); else one by one."""
    tfo_payload: bytes = b""
    """With TFO (CMD-02, STK-06): these bytes go out in the SYN; empty: no TFO."""


@dataclass(slots=True)
class Dialed:
    """How a `Dial` ended well (``ServerConnection.dial_finished``)."""

    local: tuple[str, int]
    """The proxy's address and port on the new connection (the reply names them)."""
    applied: AppliedLeg | None
    """The remote leg's options as read back (None when none were asked for)."""
    mptcp: bool
    """The connection runs MPTCP."""
    syn_sent: int
    """Bytes of ``tfo_payload`` already written during the connect."""
    syn_data_acked: bool
    """The remote host acknowledged data in our SYN (TFO used end to end)."""


@dataclass(slots=True)
class Listen:
    """Open a listening socket for BIND (CMD-04) with the proxy-remote leg's options."""

    address_type: AddressType
    """IPV4 or IPV6."""
    host: str
    """The address to bind."""
    port: int
    """The port to bind (0: any)."""
    near_client: bool = False
    """Bind instead on the local address the client reached us at, in that address's family,
    when the adapter can tell it (the request named no particular address)."""
    options: LegOptions = LegOptions()
    """IP options for the listening socket."""
    multipath: bool = False
    """Open an MPTCP socket if the kernel offers it."""
    tfo: bool = False
    """Accept TFO (STK-06: only when asked)."""
    backlog: int = 0
    """The listen backlog granted (CMD-05); 0 when none: then one connection is accepted."""
    session: Session | None = None
    """With a backlog: keep the listener in this session's ``listeners`` under its bound
    address, for further BIND requests to claim, until the session or this connection ends."""


@dataclass(slots=True)
class Claim:
    """A BIND of a session names one of its backlog listeners (CMD-05): wait on that one."""

    listener: object
    """The adapter's handle, from ``session.listeners``."""
    options: LegOptions
    """Read these options back from the listening socket, for the reply."""


@dataclass(slots=True)
class Listening:
    """A listener is ready (``ServerConnection.listening``), after `Listen` or `Claim`."""

    local: tuple[str, int]
    """Its bound address and port (the first BIND reply names them)."""
    applied: AppliedLeg | None
    """Its options as read back (None when none were asked for)."""
    mptcp: bool
    """It is an MPTCP socket."""
    tfo: bool
    """It accepts TFO."""


@dataclass(slots=True)
class AwaitPeer:
    """Wait for the remote host to connect to the listener; early client bytes go to
    ``receive_data`` (relayed later, in order); EOF from the client ends the connection."""


@dataclass(slots=True)
class HoldBacklog:
    """Keep the backlog listener while the client keeps this (initial) connection open: read
    and drop what it sends until EOF, or until the listener's session ends (CMD-05)."""


#: The one `AwaitPeer`.
AWAIT_PEER: Final = AwaitPeer()
#: The one `HoldBacklog`.
HOLD_BACKLOG: Final = HoldBacklog()


@dataclass(slots=True)
class Relay:
    """The handshake succeeded: relay between the client and the remote connection."""

    to_remote: bytes
    """Bytes the client already sent (initial data, false start: CMD-03, AUTH-06), to go to the
    remote host first."""
    client_eof: bool
    """The client already closed its sending side."""


@dataclass(slots=True)
class OpenAssociation:
    """UDP ASSOCIATE (SOCKS 6 or SOCKS 5): open the association's remote-facing UDP socket
    (and, for SOCKS 5, its client-facing one), with the UDP leg's options applied."""

    address_type: AddressType
    """IPV4 or IPV6: the family of the remote-facing socket."""
    host: str
    """The desired bind address (draft-11 "Requests": the request's address)."""
    port: int
    """The desired bind port (0: any)."""
    near_client: bool = False
    """Bind instead on the local address the client reached us at, in that address's family
    (the request named no particular address), as for BIND."""
    options: LegOptions = LegOptions()
    """TOS, TTL, Don't Fragment for the UDP leg ("the stack options refer to the UDP traffic
    relayed by the proxy")."""
    parity: int = 0
    """Port Parity (STK-08): 0 none, 1 even, 2 odd. Only with ``port`` 0."""
    reserve: bool = False
    """Port Parity: also bind and hold the counterpart port (STK-08)."""
    claim: object | None = None
    """A reserved socket (`Reservation.handle`) the request explicitly names: use it as the
    remote-facing socket instead of binding a new one (STK-08)."""
    socks5: bool = False
    """SOCKS 5 (D19): also open a client-facing UDP socket on the address the TCP connection
    arrived at."""


@dataclass(slots=True)
class OpenedAssociation:
    """How an `OpenAssociation` ended well (``association_opened``)."""

    local: tuple[str, int]
    """The remote-facing socket's bound address and port (the SOCKS 6 reply names them)."""
    applied: AppliedLeg | None
    """The UDP leg's options as read back (None when none were asked for)."""
    parity: bool = False
    """The requested parity was honoured."""
    reserved: object | None = None
    """The socket holding the counterpart port (``reserve`` honoured), else None."""
    reserved_port: int = 0
    """That port."""
    client_facing: tuple[str, int] | None = None
    """SOCKS 5: the client-facing socket's address and port (BND.ADDR, BND.PORT)."""


@dataclass(slots=True)
class Associate:
    """The association is set up: the UDP data plane takes the client connection and the
    sockets (``UdpEngine.add``), writes ``send`` first and parses ``pending`` as the first
    bytes received, and relays until the connection ends (UDP-07)."""

    association_id: bytes
    """The 8-byte ID (D18)."""
    send: bytes
    """Operation Reply and Association Initialization (SOCKS 6), or the RFC 1928 reply."""
    pending: bytes
    """Bytes the client sent after its request (datagrams over TCP, SOCKS 6)."""
    udp_error: bool
    """The client opted in to Datagram Error messages (UDP-09)."""
    socks5: bool
    """A SOCKS 5 association (D19)."""
    client_address: str | None = None
    """SOCKS 5: accept datagrams only from this IP (the TCP client's)."""
    client_port: int = 0
    """SOCKS 5: and only from this port (a non-zero DST.PORT); 0: any."""
    refusal: bytes = b""
    """What to write instead of ``send`` if the data plane cannot take the association
    (``association_refused``): the same replies with General Failure in place of success."""


Action = (
    Send
    | Close
    | ApplyClientOptions
    | CheckCredentials
    | EndSession
    | AskSessionStore
    | Resolve
    | Dial
    | Listen
    | Claim
    | AwaitPeer
    | HoldBacklog
    | Relay
    | OpenAssociation
    | Associate
)
"""What ``next_action`` returns besides NEED_DATA."""
