"""States and transition tables of both roles: the proxy side of a SOCKS 6 or SOCKS 5
connection, and the client side of a SOCKS 6 request and of a client session.

Strategy (h11 ``_state.py``): every change of state lives here, in tables, and
nowhere else. A connection has two halves, as in h11: what the *peer* (the
client) is expected to send next, and what *we* (the proxy) may send next.
Each half moves on its own events, looked up in one table per protocol; a few
moves of the peer's half depend on ours (for example, after a Request with an
Authentication Method Advertisement the client waits for our Authentication
Reply, and what it sends after that depends on which reply we sent). Those are
"triggered" transitions, applied after every event until nothing changes.

This module does not parse or encode anything and does not know what a socket
is; `proto/server.py` feeds it events and reads states back.

Draft-11 message sequence this encodes (section "Mode of operation"):

    client: Request [Initial data]            [RFC 1929 request]       [data...]
    proxy:          Auth Reply (Type 0 or 1)  [RFC 1929 reply, Auth Reply]
                    Operation Reply [second Operation Reply (BIND)]  [data...]
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AssociationState",
    "AssociationStep",
    "ClientStep",
    "ClientState",
    "Event",
    "NeedData",
    "Paused",
    "Protocol",
    "ProxyStateMachine",
    "SessionStep",
    "SessionState",
    "State",
    "association_transition",
    "client_transition",
    "session_transition",
]


class NeedData:
    """Sentinel type: ``next_event`` needs more bytes (h11 ``NEED_DATA``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class Paused:
    """Sentinel type: the peer waits for us, or the handshake is over (h11 ``PAUSED``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PAUSED"


#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA: Final = NeedData()
#: Returned by ``next_event`` when nothing more can be read until we send something, or
#: when the bytes that follow belong to the relay.
PAUSED: Final = Paused()


class State(Enum):
    """Where one half of a connection is."""

    # Members are singletons compared by identity, so the identity hash is exact, and
    # a C slot instead of Enum.__hash__ (a Python call on hash(name)): every transition
    # hashes (state, event) pairs (benchmarks/RESULTS.md, "Per-connection CPU").
    __hash__ = object.__hash__

    # --- What the client may send next (the peer's half) -----------------------
    SEND_GREETING = "SEND_GREETING"
    """SOCKS 5: the version identifier / method selection message (RFC 1928 section 3)."""
    SEND_REQUEST = "SEND_REQUEST"
    """The Request (SOCKS 6) or the RFC 1928 request (SOCKS 5)."""
    SEND_INITIAL_DATA = "SEND_INITIAL_DATA"
    """The initial data announced in the Authentication Method Advertisement (AUTH-06)."""
    SEND_USERPASS = "SEND_USERPASS"
    """The bare RFC 1929 request of the slow username/password exchange (D7)."""
    WAITING = "WAITING"
    """Nothing: the client waits for our reply; bytes that arrive are only buffered."""
    DATA = "DATA"
    """Every further byte is application data, for the relay (false start, CMD-03)."""

    # --- What the proxy may send next (our half) -------------------------------
    IDLE = "IDLE"
    """Nothing yet: no complete message has been read."""
    SEND_VERSION_MISMATCH = "SEND_VERSION_MISMATCH"
    """The first byte was neither 6 nor 5: the one-byte Version Mismatch Reply (REQ-01)."""
    SEND_METHOD_SELECTION = "SEND_METHOD_SELECTION"
    """SOCKS 5: the METHOD selection message."""
    SEND_AUTH_REPLY = "SEND_AUTH_REPLY"
    """SOCKS 6: the first Authentication Reply."""
    NEGOTIATING = "NEGOTIATING"
    """We selected username/password and wait for the client's RFC 1929 request."""
    SEND_USERPASS_REPLY = "SEND_USERPASS_REPLY"
    """The RFC 1929 reply."""
    SEND_FINAL_AUTH_REPLY = "SEND_FINAL_AUTH_REPLY"
    """SOCKS 6: the second Authentication Reply, which allows no more negotiation (AUTH-04)."""
    AWAIT_REQUEST = "AWAIT_REQUEST"
    """SOCKS 5: authenticated, the client's request is still to come."""
    SEND_OPERATION_REPLY = "SEND_OPERATION_REPLY"
    """The (first) Operation Reply, or the SOCKS 5 reply."""
    SEND_BIND_REPLY = "SEND_BIND_REPLY"
    """BIND: the second reply, naming the host that connected (CMD-04)."""
    RELAY = "RELAY"
    """Success: the connection now belongs to the data plane."""
    MUST_CLOSE = "MUST_CLOSE"
    """A reply that ends the connection was sent; close once it is written."""

    # --- Either half -------------------------------------------------------------
    CLOSED = "CLOSED"
    """The client closed its side (EOF) before the handshake finished."""
    ERROR = "ERROR"
    """A protocol error happened; the connection is unusable."""


class Protocol(Enum):
    """Which protocol a connection speaks (chosen by the first byte, D1)."""

    # Members are singletons compared by identity, so the identity hash is exact, and
    # a C slot instead of Enum.__hash__ (a Python call on hash(name)): every transition
    # hashes (state, event) pairs (benchmarks/RESULTS.md, "Per-connection CPU").
    __hash__ = object.__hash__

    SOCKS6 = 6
    SOCKS5 = 5


class Event(Enum):
    """What moves a half from one state to the next."""

    # Members are singletons compared by identity, so the identity hash is exact, and
    # a C slot instead of Enum.__hash__ (a Python call on hash(name)): every transition
    # hashes (state, event) pairs (benchmarks/RESULTS.md, "Per-connection CPU").
    __hash__ = object.__hash__

    # From the client.
    GREETING = "GREETING"
    REQUEST = "REQUEST"
    """A Request without an Authentication Method Advertisement: data may follow at once."""
    REQUEST_ADVERTISING = "REQUEST_ADVERTISING"
    """A Request with an advertisement and no initial data."""
    REQUEST_WITH_INITIAL_DATA = "REQUEST_WITH_INITIAL_DATA"
    """A CONNECT Request with an advertisement announcing initial data."""
    INITIAL_DATA = "INITIAL_DATA"
    USERPASS = "USERPASS"
    BAD_VERSION = "BAD_VERSION"
    # From us.
    VERSION_MISMATCH_REPLY = "VERSION_MISMATCH_REPLY"
    METHOD_NONE = "METHOD_NONE"
    METHOD_USERPASS = "METHOD_USERPASS"
    METHOD_REJECTED = "METHOD_REJECTED"
    AUTH_SUCCESS = "AUTH_SUCCESS"
    AUTH_FAILURE = "AUTH_FAILURE"
    AUTH_SELECT_USERPASS = "AUTH_SELECT_USERPASS"
    USERPASS_SUCCESS = "USERPASS_SUCCESS"
    USERPASS_FAILURE = "USERPASS_FAILURE"
    OP_SUCCESS = "OP_SUCCESS"
    """Success reply to CONNECT (or UDP ASSOCIATE, later): the relay takes over."""
    OP_SUCCESS_FIRST_BIND = "OP_SUCCESS_FIRST_BIND"
    """First success reply to BIND: the second reply is still due."""
    OP_SUCCESS_FINAL = "OP_SUCCESS_FINAL"
    """Success reply after which the connection ends (NOOP)."""
    OP_FAILURE = "OP_FAILURE"


S = State
E = Event

# (our state, event we send) -> our next state.
_OURS_SOCKS6: dict[tuple[State, Event], State] = {
    (S.SEND_VERSION_MISMATCH, E.VERSION_MISMATCH_REPLY): S.MUST_CLOSE,
    (S.SEND_AUTH_REPLY, E.AUTH_SUCCESS): S.SEND_OPERATION_REPLY,
    (S.SEND_AUTH_REPLY, E.AUTH_FAILURE): S.MUST_CLOSE,
    # section "Authentication Replies": Type 1 naming a method that can proceed.
    (S.SEND_AUTH_REPLY, E.AUTH_SELECT_USERPASS): S.NEGOTIATING,
    (S.SEND_USERPASS_REPLY, E.USERPASS_SUCCESS): S.SEND_FINAL_AUTH_REPLY,
    (S.SEND_USERPASS_REPLY, E.USERPASS_FAILURE): S.SEND_FINAL_AUTH_REPLY,
    # "The second Authentication Reply MUST NOT allow for further negotiations": no
    # AUTH_SELECT_USERPASS row here.
    (S.SEND_FINAL_AUTH_REPLY, E.AUTH_SUCCESS): S.SEND_OPERATION_REPLY,
    (S.SEND_FINAL_AUTH_REPLY, E.AUTH_FAILURE): S.MUST_CLOSE,
    (S.SEND_OPERATION_REPLY, E.OP_SUCCESS): S.RELAY,
    (S.SEND_OPERATION_REPLY, E.OP_SUCCESS_FIRST_BIND): S.SEND_BIND_REPLY,
    (S.SEND_OPERATION_REPLY, E.OP_SUCCESS_FINAL): S.MUST_CLOSE,
    (S.SEND_OPERATION_REPLY, E.OP_FAILURE): S.MUST_CLOSE,
    (S.SEND_BIND_REPLY, E.OP_SUCCESS): S.RELAY,
    (S.SEND_BIND_REPLY, E.OP_FAILURE): S.MUST_CLOSE,
}

# (peer state, event the client sent) -> peer's next state.
_THEIRS_SOCKS6: dict[tuple[State, Event], State] = {
    (S.SEND_REQUEST, E.BAD_VERSION): S.ERROR,
    # section "False Starts": without an advertisement "the authentication phase is
    # guaranteed not to happen", so whatever follows the Request is application data.
    (S.SEND_REQUEST, E.REQUEST): S.DATA,
    (S.SEND_REQUEST, E.REQUEST_ADVERTISING): S.WAITING,
    (S.SEND_REQUEST, E.REQUEST_WITH_INITIAL_DATA): S.SEND_INITIAL_DATA,
    (S.SEND_INITIAL_DATA, E.INITIAL_DATA): S.WAITING,
    (S.SEND_USERPASS, E.USERPASS): S.WAITING,
}

# Our state after the client's event (only where the client's event moves us).
_OURS_ON_THEIRS_SOCKS6: dict[tuple[State, Event], State] = {
    (S.IDLE, E.BAD_VERSION): S.SEND_VERSION_MISMATCH,
    (S.IDLE, E.REQUEST): S.SEND_AUTH_REPLY,
    (S.IDLE, E.REQUEST_ADVERTISING): S.SEND_AUTH_REPLY,
    (S.IDLE, E.REQUEST_WITH_INITIAL_DATA): S.SEND_AUTH_REPLY,
    (S.NEGOTIATING, E.USERPASS): S.SEND_USERPASS_REPLY,
}

_OURS_SOCKS5: dict[tuple[State, Event], State] = {
    (S.SEND_METHOD_SELECTION, E.METHOD_NONE): S.AWAIT_REQUEST,
    (S.SEND_METHOD_SELECTION, E.METHOD_USERPASS): S.NEGOTIATING,
    (S.SEND_METHOD_SELECTION, E.METHOD_REJECTED): S.MUST_CLOSE,
    (S.SEND_USERPASS_REPLY, E.USERPASS_SUCCESS): S.AWAIT_REQUEST,
    # RFC 1929 section 2: on failure the server "MUST close the connection".
    (S.SEND_USERPASS_REPLY, E.USERPASS_FAILURE): S.MUST_CLOSE,
    (S.SEND_OPERATION_REPLY, E.OP_SUCCESS): S.RELAY,
    (S.SEND_OPERATION_REPLY, E.OP_SUCCESS_FIRST_BIND): S.SEND_BIND_REPLY,
    (S.SEND_OPERATION_REPLY, E.OP_FAILURE): S.MUST_CLOSE,
    (S.SEND_BIND_REPLY, E.OP_SUCCESS): S.RELAY,
    (S.SEND_BIND_REPLY, E.OP_FAILURE): S.MUST_CLOSE,
}

_THEIRS_SOCKS5: dict[tuple[State, Event], State] = {
    (S.SEND_GREETING, E.GREETING): S.WAITING,
    (S.SEND_USERPASS, E.USERPASS): S.WAITING,
    # RFC 1928 has no rule against pipelining: bytes after the request are data.
    (S.SEND_REQUEST, E.REQUEST): S.DATA,
}

_OURS_ON_THEIRS_SOCKS5: dict[tuple[State, Event], State] = {
    (S.IDLE, E.GREETING): S.SEND_METHOD_SELECTION,
    (S.NEGOTIATING, E.USERPASS): S.SEND_USERPASS_REPLY,
    (S.AWAIT_REQUEST, E.REQUEST): S.SEND_OPERATION_REPLY,
}

# Triggered transitions: (peer state, our state) -> peer's next state. They let the
# client's half follow ours while it is WAITING (or, for SOCKS 5, before the request).
_TRIGGERED_SOCKS6: dict[tuple[State, State], State] = {
    # Type 1 naming username/password: the bare RFC 1929 request comes next (D7).
    (S.WAITING, S.NEGOTIATING): S.SEND_USERPASS,
    # section "False Starts": data may follow a successful Authentication Reply.
    (S.WAITING, S.SEND_OPERATION_REPLY): S.DATA,
    (S.WAITING, S.SEND_BIND_REPLY): S.DATA,
    (S.WAITING, S.RELAY): S.DATA,
}

_TRIGGERED_SOCKS5: dict[tuple[State, State], State] = {
    (S.WAITING, S.NEGOTIATING): S.SEND_USERPASS,
    (S.WAITING, S.AWAIT_REQUEST): S.SEND_REQUEST,
}

_TABLES = {
    Protocol.SOCKS6: (_OURS_SOCKS6, _THEIRS_SOCKS6, _OURS_ON_THEIRS_SOCKS6, _TRIGGERED_SOCKS6),
    Protocol.SOCKS5: (_OURS_SOCKS5, _THEIRS_SOCKS5, _OURS_ON_THEIRS_SOCKS5, _TRIGGERED_SOCKS5),
}

_FIRST_STATES = {
    Protocol.SOCKS6: (S.SEND_REQUEST, S.IDLE),
    Protocol.SOCKS5: (S.SEND_GREETING, S.IDLE),
}

# States in which the proxy may still answer a broken request with a failure reply (D14):
# nothing conclusive has been sent yet.
_CAN_SEND_ERROR_REPLY = frozenset({S.IDLE, S.SEND_AUTH_REPLY, S.SEND_OPERATION_REPLY, S.AWAIT_REQUEST})


class ProxyStateMachine:
    """The two halves of one proxy-side connection and the tables that move them.

    Args:
        protocol: SOCKS6 or SOCKS5.
    """

    __slots__ = ("_ours", "_ours_on_theirs", "_theirs", "_triggered", "our_state", "protocol", "their_state")

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self._ours, self._theirs, self._ours_on_theirs, self._triggered = _TABLES[protocol]
        self.their_state, self.our_state = _FIRST_STATES[protocol]

    def process_their_event(self, event: Event) -> None:
        """Move on something the client sent.

        Raises:
            RemoteProtocolError: the event is not allowed in the client's current state.
        """
        new = self._theirs.get((self.their_state, event))
        if new is None:
            raise RemoteProtocolError(f"client sent {event.value} in state {self.their_state.value}")
        self.their_state = new
        self.our_state = self._ours_on_theirs.get((self.our_state, event), self.our_state)
        self._fire_triggered()

    def process_our_event(self, event: Event) -> None:
        """Move on something we are about to send.

        Raises:
            LocalProtocolError: the event is not allowed in our current state.
        """
        if event is E.OP_FAILURE and self.their_state is S.ERROR and self.our_state in _CAN_SEND_ERROR_REPLY:
            # D14: a failure Operation Reply answers a request that could not be parsed.
            self.our_state = S.MUST_CLOSE
            return
        new = self._ours.get((self.our_state, event))
        if new is None:
            raise LocalProtocolError(f"cannot send {event.value} in state {self.our_state.value}")
        self.our_state = new
        self._fire_triggered()

    def process_error(self) -> None:
        """The client broke the protocol: its half is unusable from now on."""
        self.their_state = S.ERROR

    def process_client_eof(self) -> None:
        """The client closed its sending side before the handshake finished."""
        if self.their_state is not S.ERROR:
            self.their_state = S.CLOSED

    def _fire_triggered(self) -> None:
        new = self._triggered.get((self.their_state, self.our_state))
        while new is not None:
            self.their_state = new
            new = self._triggered.get((self.their_state, self.our_state))


# =====================================================================================
# The client side: one request (ClientConnection) and one session (ClientSession)
# =====================================================================================
#
# Same idiom as the proxy's: states and what moves them are enums, every move is a row of a
# (state, event) -> state table, and nothing outside this module assigns a state.
# The client has one half (it reads the proxy's replies in order), so one table each.


class ClientState(Enum):
    """States of one client request (draft-11 section "Mode of operation")."""

    __hash__ = object.__hash__  # see State

    IDLE = "idle"
    """Nothing sent yet."""
    AWAIT_AUTH_REPLY = "await_auth_reply"
    """Request sent; the first Authentication Reply is due."""
    AWAIT_USERPASS_REPLY = "await_userpass_reply"
    """Slow exchange (D7): bare RFC 1929 request sent; its reply is due."""
    AWAIT_SECOND_AUTH_REPLY = "await_second_auth_reply"
    """Method-specific negotiation over; the final Authentication Reply is due."""
    AWAIT_OPERATION_REPLY = "await_operation_reply"
    """Authenticated; the Operation Reply is due."""
    AWAIT_BIND_PEER = "await_bind_peer"
    """BIND: bound; the second Operation Reply (the connecting host) is due."""
    ESTABLISHED = "established"
    """Data may flow (CONNECT, BIND, UDP ASSOCIATE)."""
    MUST_CLOSE = "must_close"
    """NOOP answered: the client must close (REQ-10)."""
    ERROR = "error"
    """A rule was broken, the proxy refused or the deadline passed: close the connection."""


class ClientStep(Enum):
    """What moves a client request on."""

    __hash__ = object.__hash__

    REQUEST_SENT = "request sent"
    USERPASS_SENT = "RFC 1929 request sent (Authentication Reply Type 1, D7)"
    USERPASS_ACCEPTED = "RFC 1929 reply accepted"
    AUTHENTICATED = "Authentication Reply Type 0"
    OPERATION_DONE = "Operation Reply Success (CONNECT, UDP ASSOCIATE, BIND's second)"
    BIND_BOUND = "BIND's first Operation Reply"
    NOOP_DONE = "NOOP's Operation Reply (REQ-10)"
    FAILED = "an error, a refusal or the deadline"


_C = ClientState
_CE = ClientStep
_CLIENT: Final[dict[tuple[ClientState, ClientStep], ClientState]] = {
    (_C.IDLE, _CE.REQUEST_SENT): _C.AWAIT_AUTH_REPLY,
    (_C.AWAIT_AUTH_REPLY, _CE.USERPASS_SENT): _C.AWAIT_USERPASS_REPLY,
    (_C.AWAIT_AUTH_REPLY, _CE.AUTHENTICATED): _C.AWAIT_OPERATION_REPLY,
    (_C.AWAIT_USERPASS_REPLY, _CE.USERPASS_ACCEPTED): _C.AWAIT_SECOND_AUTH_REPLY,
    (_C.AWAIT_SECOND_AUTH_REPLY, _CE.AUTHENTICATED): _C.AWAIT_OPERATION_REPLY,
    (_C.AWAIT_OPERATION_REPLY, _CE.OPERATION_DONE): _C.ESTABLISHED,
    (_C.AWAIT_OPERATION_REPLY, _CE.BIND_BOUND): _C.AWAIT_BIND_PEER,
    (_C.AWAIT_OPERATION_REPLY, _CE.NOOP_DONE): _C.MUST_CLOSE,
    (_C.AWAIT_BIND_PEER, _CE.OPERATION_DONE): _C.ESTABLISHED,
}
# Any state but the final ones can fail.
_CLIENT.update(
    {(state, _CE.FAILED): _C.ERROR for state in ClientState if state not in (_C.ESTABLISHED, _C.MUST_CLOSE)}
)


def client_transition(state: ClientState, step: ClientStep) -> ClientState:
    """The state a client request moves to on ``step``.

    Raises:
        LocalProtocolError: ``step`` is not allowed in ``state`` (a bug of the caller).
    """
    new = _CLIENT.get((state, step))
    if new is None:
        raise LocalProtocolError(f"client request: {step.value} in state {state.value}", None)
    return new


class SessionState(Enum):
    """Life of a client-side session (draft-11 section "Session options")."""

    __hash__ = object.__hash__

    NEW = "new"
    """No session yet: the next request initiates one (with credentials)."""
    PENDING = "pending"
    """A Session Request is in flight; other requests must wait for it."""
    ACTIVE = "active"
    """We hold a Session ID; requests carry it and no credentials."""
    DECLINED = "declined"
    """The proxy silently did not honour the Session Request: requests stand alone."""
    CLOSED = "closed"
    """Torn down (or closed locally); no more requests."""


class SessionStep(Enum):
    """What moves a client session on. Replies may arrive late or out of order, so a
    step that does not apply to the current state leaves it as it is (no row: no move),
    as h11's "ours on theirs" table does."""

    __hash__ = object.__hash__

    INITIATED = "a request carries the Session Request"
    GRANTED = "a reply carries the Session ID (D4)"
    DECLINED = "the initiating request succeeded without a Session ID"
    INITIATION_FAILED = "the initiating request failed"
    INVALID = "Session Invalid"
    CLOSED = "torn down or closed locally"


_SS = SessionState
_SE = SessionStep
_SESSION: Final[dict[tuple[SessionState, SessionStep], SessionState]] = {
    (_SS.NEW, _SE.INITIATED): _SS.PENDING,
    (_SS.PENDING, _SE.GRANTED): _SS.ACTIVE,
    (_SS.PENDING, _SE.DECLINED): _SS.DECLINED,
    (_SS.PENDING, _SE.INITIATION_FAILED): _SS.NEW,
    **{(state, _SE.INVALID): _SS.NEW for state in SessionState if state is not _SS.CLOSED},
    **{(state, _SE.CLOSED): _SS.CLOSED for state in SessionState},
}


def session_transition(state: SessionState, step: SessionStep) -> SessionState:
    """The state a client session moves to on ``step`` (unchanged where no row applies)."""
    return _SESSION.get((state, step), state)


# =====================================================================================
# The client side of a UDP association (ClientAssociation, proto/client_udp.py)
# =====================================================================================
#
# Draft-11 section "Handling UDP ASSOCIATE", after the successful Operation Reply:
#
#     proxy (TCP):  Association Initialization            Association Confirmation
#     client:                                 Datagram ...                           Datagram ...
#     proxy:                                                                         Datagram / Error ...
#
# The client's first datagram (or the empty one to the all-zero address, server mode,
# UDP-06) makes the proxy map the association and confirm it.


class AssociationState(Enum):
    """States of the client side of one UDP association."""

    __hash__ = object.__hash__  # see State

    AWAIT_INIT = "await_init"
    """Operation Reply received; the Association Initialization (the ID) is due."""
    OPEN = "open"
    """The ID is known: datagrams may be sent; the Association Confirmation is due once
    the first one went out."""
    CONFIRMED = "confirmed"
    """The proxy confirmed the association: remote datagrams come back."""
    CLOSED = "closed"
    """The TCP connection ended (or was closed locally): the association is over."""
    ERROR = "error"
    """The proxy broke the protocol, or the confirmation never came: close."""


class AssociationStep(Enum):
    """What moves a client association on."""

    __hash__ = object.__hash__

    INITIALIZED = "Association Initialization"
    CONFIRMED = "Association Confirmation"
    ENDED = "the TCP connection ended or was closed"
    FAILED = "a protocol error, or no confirmation after the last try (UDP-10)"


_AS = AssociationState
_AE = AssociationStep
_ASSOCIATION: Final[dict[tuple[AssociationState, AssociationStep], AssociationState]] = {
    (_AS.AWAIT_INIT, _AE.INITIALIZED): _AS.OPEN,
    (_AS.OPEN, _AE.CONFIRMED): _AS.CONFIRMED,
    **{(state, _AE.ENDED): _AS.CLOSED for state in AssociationState if state is not _AS.ERROR},
    (_AS.ERROR, _AE.ENDED): _AS.ERROR,
    **{(state, _AE.FAILED): _AS.ERROR for state in (_AS.AWAIT_INIT, _AS.OPEN, _AS.CONFIRMED)},
}


def association_transition(state: AssociationState, step: AssociationStep) -> AssociationState:
    """The state a client association moves to on ``step``.

    Raises:
        LocalProtocolError: ``step`` is not allowed in ``state`` (a bug of the caller).
    """
    new = _ASSOCIATION.get((state, step))
    if new is None:
        raise LocalProtocolError(f"client association: {step.value} in state {state.value}", None)
    return new
