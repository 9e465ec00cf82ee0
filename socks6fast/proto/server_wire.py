"""The message level of the proxy side, sans I/O: bytes in, messages out, replies in, bytes out.

Strategy (h11 ``Connection``): `ServerWire` (SOCKS 6, draft-11) and `Socks5ServerWire`
(RFC 1928/1929) buffer what the client sent and parse it incrementally (the codec is
stateless and tells how many bytes it still needs), so a request that trickles in one byte at
a time yields the same events as one that arrives whole (REQ-07)::

    wire = ServerWire(handshake_timeout=10.0, now=now)
    wire.receive_data(first_bytes)               # b"" means EOF
    event = wire.next_event()                    # an event, NEED_DATA or PAUSED
    out = wire.send(AuthReply(...))              # every reply goes through send()

Which message may follow which lives in ``states.py``; this module maps messages onto those
tables, converts ``WireError`` into ``RemoteProtocolError`` carrying the reply code (STYLE.md
section 4), and sorts a Request's options into a `RequestOptions` summary.

It decides nothing: `socks6fast.proto.server.ServerConnection` owns one of these and decides
which reply to send (authentication, sessions, rules, the operation).

Errors: after ``RemoteProtocolError`` the client's half is in ERROR. If ``exc.reply_code``
is not None one failure `OperationReply` may still be sent (D14), then the connection
closes. A first byte other than 6 makes `ServerWire.next_event` return `VersionMismatch`,
answered with `VersionMismatchReply` (the single byte 6, REQ-01).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ..constants import (
    MAX_OPTIONS_LENGTH,
    VERSION,
    AddressType,
    AuthMethod,
    AuthReplyType,
    Command,
    ReplyCode,
    Socks5Command,
    UserPassStatus,
)
from ..errors import LocalProtocolError, RemoteProtocolError, WireError
from . import codec, socks5
from .messages import (
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    IdempotenceExpenditure,
    IdempotenceRequest,
    OperationReply,
    Option,
    Request,
    SessionID,
    SessionRequest,
    SessionTeardown,
    VersionMismatchReply,
)
from .socks5 import (
    Socks5Greeting,
    Socks5MethodSelection,
    Socks5Reply,
    Socks5Request,
    UserPassReply,
    UserPassRequest,
)
from .stack import StackPlan, plan_stack_options
from .states import NEED_DATA, PAUSED, NeedData, Paused, Protocol, ProxyStateMachine, State
from .states import Event as T

__all__ = [
    "NO_OPTIONS",
    "ConnectionClosed",
    "InitialData",
    "RequestOptions",
    "RequestReceived",
    "ServerEvent",
    "ServerWire",
    "Socks5ServerEvent",
    "Socks5ServerWire",
    "VersionMismatch",
    "failure_reply",
    "parse_request_options",
]


# --- Events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A whole SOCKS 6 Request was read."""

    request: Request
    """The Request as decoded."""
    options: RequestOptions
    """Its options, sorted by purpose (see `parse_request_options`)."""


@dataclass(frozen=True, slots=True)
class InitialData:
    """The initial data announced in the Authentication Method Advertisement (AUTH-06)."""

    data: bytes
    """Exactly ``initial_data_length`` bytes; to be forwarded once connected, never before
    authentication succeeded."""


@dataclass(frozen=True, slots=True)
class VersionMismatch:
    """The first byte was neither 6 nor 5: send `VersionMismatchReply`, then close (REQ-01)."""

    version: int
    """The byte received."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed the connection (EOF) before sending anything of the next message."""


ServerEvent = RequestReceived | InitialData | UserPassRequest | VersionMismatch | ConnectionClosed
"""What `ServerWire.next_event` returns besides NEED_DATA and PAUSED."""

Socks5ServerEvent = Socks5Greeting | UserPassRequest | Socks5Request | ConnectionClosed
"""What `Socks5ServerWire.next_event` returns besides NEED_DATA and PAUSED."""


# --- Sorting a Request's options -------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """A Request's options sorted by purpose; unknown and misplaced ones are dropped (REQ-06)."""

    stack: StackPlan = StackPlan()
    """Stack options (D9, D10)."""
    advertised_methods: tuple[int, ...] | None = None
    """Methods of the Authentication Method Advertisement, or None when there was none."""
    initial_data_length: int = 0
    """Bytes of initial data after the Request (CONNECT with an advertisement only)."""
    credentials: UserPassRequest | None = None
    """The RFC 1929 request of the first method-2 Authentication Data option (0-RTT)."""
    malformed_credentials: bool = False
    """A method-2 Authentication Data option was present but did not hold an RFC 1929 request."""
    session_request: bool = False
    """Session Request option present."""
    session_id: bytes | None = None
    """Session ID option, or None."""
    session_teardown: bool = False
    """Session Teardown option present."""
    token_request: int | None = None
    """Requested token window size (Token Request), or None."""
    token: int | None = None
    """Token being spent (Idempotence Expenditure), or None."""
    auth_data: Mapping[int, bytes] = field(default_factory=dict)
    """Authentication Data by method (first option per method; "MUST only place one")."""


def parse_request_options(request: Request) -> RequestOptions:
    """Sort a Request's options into a `RequestOptions`.

    Raises:
        RemoteProtocolError: contradictory or duplicate Stack options (D10), or more than one
            Token Request or Idempotence Expenditure option.
    """
    options = request.options
    if not options:
        return NO_OPTIONS  # the common case; RequestOptions is frozen, so one can be shared
    advert: AuthMethodAdvertisement | None = None
    auth_data: dict[int, bytes] = {}
    session_request = teardown = False
    session_id: bytes | None = None
    token_request: int | None = None
    token: int | None = None
    for option in options:
        if isinstance(option, AuthMethodAdvertisement):
            advert = advert or option
        elif isinstance(option, AuthData):
            auth_data.setdefault(option.method, option.data)
        elif isinstance(option, SessionRequest):
            session_request = True
        elif isinstance(option, SessionID):
            session_id = session_id if session_id is not None else option.session_id
        elif isinstance(option, SessionTeardown):
            teardown = True
        elif isinstance(option, IdempotenceRequest):
            if token_request is not None:
                # draft-11 section "Requesting a token window": one window per request; two requests are
                # contradictory, treated like duplicate Stack options (D10): malformed.
                raise RemoteProtocolError("more than one Token Request option", ReplyCode.GENERAL_FAILURE)
            token_request = option.window_size
        elif isinstance(option, IdempotenceExpenditure):
            if token is not None:
                # draft-11 section "Spending a token": a request spends one token; spending only the first
                # of several would silently honour a request the client meant differently (D10).
                raise RemoteProtocolError(
                    "more than one Idempotence Expenditure option", ReplyCode.GENERAL_FAILURE
                )
            token = option.token
    credentials: UserPassRequest | None = None
    malformed = False
    data = auth_data.get(AuthMethod.USERNAME_PASSWORD)
    if data is not None:
        try:
            credentials, end = socks5.decode_userpass_request(data)
        except WireError:
            credentials, end = None, 0
        # Section "Username/Password Authentication" (figure "Password authentication via a
        # SOCKS Option"): only NUL padding may follow the RFC 1929 request inside the option;
        # anything else makes the option malformed, so the credentials are not used.
        if credentials is not None and any(data[end:]):
            credentials = None
        malformed = credentials is None
    initial = 0
    if advert is not None and request.command == Command.CONNECT:
        # section "Authentication Method options": the length only means something for CONNECT.
        initial = advert.initial_data_length
    return RequestOptions(
        stack=plan_stack_options(options),
        advertised_methods=advert.methods if advert is not None else None,
        initial_data_length=initial,
        credentials=credentials,
        malformed_credentials=malformed,
        session_request=session_request,
        session_id=session_id,
        session_teardown=teardown,
        token_request=token_request,
        token=token,
        auth_data=auth_data,
    )


#: The options of a Request that has none: one shared (frozen) object, so the decisions can
#: tell the common request apart with one identity test.
NO_OPTIONS: Final = RequestOptions()


def failure_reply(code: ReplyCode, options: tuple[Option, ...] = ()) -> OperationReply:
    """An Operation Reply for a failure: unspecified IPv4 address, port 0."""
    return OperationReply(code, AddressType.IPV4, "0.0.0.0", 0, options)


# --- The connections ----------------------------------------------------------------


class _ProxyWire:
    """Buffering, EOF, the handshake timer and error conversion shared by both protocols."""

    __slots__ = ("_buf", "_deadline", "_eof", "_state")

    def __init__(self, protocol: Protocol, handshake_timeout: float | None, now: float) -> None:
        self._state = ProxyStateMachine(protocol)
        self._buf = bytearray()
        self._eof = False
        self._deadline = None if handshake_timeout is None else now + handshake_timeout

    @property
    def their_state(self) -> State:
        """What the client may send next (see `State`)."""
        return self._state.their_state

    @property
    def our_state(self) -> State:
        """What we may send next (see `State`)."""
        return self._state.our_state

    @property
    def client_closed(self) -> bool:
        """True once EOF was received from the client."""
        return self._eof

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes, closed)``: bytes received after the handshake, not yet consumed, and
        whether the client already sent EOF. Meant for the relay hand-off, when the
        client's state is DATA: these bytes are application data (false start, CMD-03)
        and must reach the remote host before anything read later."""
        return bytes(self._buf), self._eof

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the client.

        Args:
            data: the bytes; ``b""`` means the client closed its sending side (EOF).

        Raises:
            RuntimeError: data after EOF.
        """
        if data:
            if self._eof:
                raise RuntimeError("received data after EOF")
            self._buf += data
        else:
            self._eof = True

    def get_timer(self) -> float | None:
        """When the handshake times out, while we are still waiting for client bytes.

        Returns:
            The deadline (same clock as ``now``) or None when no timer is running.
        """
        if self._deadline is None or self.their_state not in _READING:
            return None
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Check the handshake deadline ("the request is not fully received after a
        certain timeout", section "Large requests"; REQ-08).

        Raises:
            RemoteProtocolError: the deadline has passed (reply_code None: close without
                a reply); the client's half is then in ERROR.
        """
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            self._state.process_error()
            raise RemoteProtocolError("handshake timed out", None)

    def _check_readable(self) -> None:
        if self.their_state is State.ERROR:
            raise RemoteProtocolError("cannot read after a protocol error", None)

    def _fail(self, exc: WireError | RemoteProtocolError) -> RemoteProtocolError:
        self._state.process_error()
        if isinstance(exc, RemoteProtocolError):
            return exc
        return RemoteProtocolError(str(exc), exc.reply_code)

    def _eof_or_need(self, what: str) -> ConnectionClosed | NeedData:
        # EOF with nothing buffered between messages is a clean close; inside one it is an
        # error with no reply to give (D14: nothing readable to answer).
        if not self._eof:
            return NEED_DATA
        if self._buf:
            self._state.process_error()
            raise RemoteProtocolError(f"connection closed in the middle of {what}", None)
        self._state.process_client_eof()
        return ConnectionClosed()


# Client states in which we wait for client bytes, so the handshake timer runs.
_READING = frozenset({State.SEND_GREETING, State.SEND_REQUEST, State.SEND_INITIAL_DATA, State.SEND_USERPASS})


class ServerWire(_ProxyWire):
    """The messages of one SOCKS 6 connection, proxy side, sans I/O.

    Args:
        max_options_length: cap on a Request's Options Length (D6, REQ-03); larger
            values are rejected from the header, before any option byte is buffered.
        handshake_timeout: seconds the client has to send its handshake messages
            (REQ-08), or None for no limit. Read it with `get_timer`.
        now: the current time on the clock the caller uses for `handle_timer`.
    """

    __slots__ = ("_command", "_max_options_length", "options", "request")

    def __init__(
        self,
        *,
        max_options_length: int = MAX_OPTIONS_LENGTH,
        handshake_timeout: float | None = None,
        now: float = 0.0,
    ) -> None:
        super().__init__(Protocol.SOCKS6, handshake_timeout, now)
        self._max_options_length = max_options_length
        self._command: Command | int | None = None  # an unknown Command Code is a plain int
        self.request: Request | None = None
        """The Request, once read."""
        self.options: RequestOptions | None = None
        """The Request's sorted options, once read."""

    def next_event(self) -> ServerEvent | NeedData | Paused:
        """Parse the next message the client sent.

        Returns:
            `RequestReceived`, `InitialData`, ``UserPassRequest`` (slow username/password
            exchange, D7), `VersionMismatch`, `ConnectionClosed`; NEED_DATA when more bytes
            are needed; PAUSED when the client waits for us or the rest is application
            data (then see `trailing_data`).

        Raises:
            RemoteProtocolError: the client broke the protocol. ``reply_code`` is the code
                of the failure Operation Reply to send (D14), or None to close silently.
        """
        self._check_readable()
        state = self.their_state
        try:
            if state is State.SEND_REQUEST:
                return self._read_request()
            if state is State.SEND_INITIAL_DATA:
                return self._read_initial_data()
            if state is State.SEND_USERPASS:
                return self._read_userpass()
        except (WireError, RemoteProtocolError) as exc:
            raise self._fail(exc) from exc
        if state is State.CLOSED:
            return ConnectionClosed()
        return PAUSED

    def _read_request(self) -> RequestReceived | VersionMismatch | ConnectionClosed | NeedData:
        buf = self._buf
        if not buf:
            return self._eof_or_need("a request")
        if buf[0] != VERSION:
            self._state.process_their_event(T.BAD_VERSION)
            return VersionMismatch(buf[0])
        request, n = codec.decode_request(buf, 0, self._max_options_length)
        if request is None:
            return self._eof_or_need("a request")
        options = parse_request_options(request)
        del buf[:n]
        self.request, self.options, self._command = request, options, request.command
        if options.initial_data_length:
            event = T.REQUEST_WITH_INITIAL_DATA
        elif options.advertised_methods is not None:
            event = T.REQUEST_ADVERTISING
        else:
            event = T.REQUEST
        self._state.process_their_event(event)
        return RequestReceived(request, options)

    def _read_initial_data(self) -> InitialData | NeedData | ConnectionClosed:
        assert self.options is not None
        n = self.options.initial_data_length
        if len(self._buf) < n:
            if self._eof:
                raise RemoteProtocolError("connection closed in the middle of the initial data", None)
            return NEED_DATA
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._state.process_their_event(T.INITIAL_DATA)
        return InitialData(data)

    def _read_userpass(self) -> UserPassRequest | NeedData | ConnectionClosed:
        request, n = socks5.decode_userpass_request(self._buf)
        if request is None:
            return self._eof_or_need("a username/password request")
        del self._buf[:n]
        self._state.process_their_event(T.USERPASS)
        return request

    def send(self, event: AuthReply | UserPassReply | OperationReply | VersionMismatchReply) -> bytes:
        """Encode a reply and move the state machine.

        Args:
            event: `AuthReply` (Type 1 with an Authentication Method Selection naming
                username/password starts the slow exchange, D7; the second Authentication
                Reply may not), ``UserPassReply`` (slow exchange), `OperationReply` (twice
                for BIND), or `VersionMismatchReply` after a `VersionMismatch` event.

        Returns:
            The bytes to write.

        Raises:
            LocalProtocolError: the message is not allowed now, or is malformed.
        """
        if isinstance(event, AuthReply):
            transition = _auth_transition(event)
            if transition is T.AUTH_SELECT_USERPASS and self.our_state is State.SEND_FINAL_AUTH_REPLY:
                # AUTH-04: "The second Authentication Reply MUST NOT allow for further negotiations".
                raise LocalProtocolError("the second Authentication Reply cannot select a method")
            data = codec.encode_auth_reply(event)
        elif isinstance(event, UserPassReply):
            ok = event.status == UserPassStatus.SUCCESS
            transition = T.USERPASS_SUCCESS if ok else T.USERPASS_FAILURE
            data = socks5.encode_userpass_reply(event)
        elif isinstance(event, OperationReply):
            transition = self._operation_transition(event.reply_code)
            data = codec.encode_operation_reply(event)
        elif isinstance(event, VersionMismatchReply):
            transition = T.VERSION_MISMATCH_REPLY
            data = codec.encode_version_mismatch()
        else:
            raise LocalProtocolError(f"cannot send {event!r}")
        self._state.process_our_event(transition)
        return data

    def _operation_transition(self, code: ReplyCode) -> T:
        if code != ReplyCode.SUCCESS:
            return T.OP_FAILURE
        if self.our_state is State.SEND_BIND_REPLY:
            return T.OP_SUCCESS
        if self._command == Command.NOOP:
            # section "Operation Replies": the client closes after the reply to NOOP.
            return T.OP_SUCCESS_FINAL
        if self._command == Command.BIND:
            return T.OP_SUCCESS_FIRST_BIND
        return T.OP_SUCCESS


def _auth_transition(reply: AuthReply) -> T:
    if reply.type == AuthReplyType.SUCCESS:
        return T.AUTH_SUCCESS
    for option in reply.options:
        if isinstance(option, AuthMethodSelection) and option.method == AuthMethod.USERNAME_PASSWORD:
            return T.AUTH_SELECT_USERPASS
    return T.AUTH_FAILURE


class Socks5ServerWire(_ProxyWire):
    """The messages of one SOCKS 5 connection (RFC 1928, RFC 1929 authentication), proxy side.

    Same shape as `ServerWire`: greeting, optional RFC 1929 exchange, request,
    reply (two for BIND), then the bytes belong to the relay.

    Args:
        handshake_timeout: seconds the client has for its handshake messages, or None.
        now: the current time on the caller's clock.
    """

    __slots__ = ("request",)

    def __init__(self, *, handshake_timeout: float | None = None, now: float = 0.0) -> None:
        super().__init__(Protocol.SOCKS5, handshake_timeout, now)
        self.request: Socks5Request | None = None
        """The request, once read."""

    def next_event(self) -> Socks5ServerEvent | NeedData | Paused:
        """Parse the next message the client sent.

        Returns:
            ``Socks5Greeting``, ``UserPassRequest``, ``Socks5Request``, `ConnectionClosed`,
            NEED_DATA or PAUSED (see `ServerWire.next_event`).

        Raises:
            RemoteProtocolError: malformed input. ``reply_code`` is set when a SOCKS 5
                reply with that code can still be sent (a bad request); None otherwise.
        """
        self._check_readable()
        state = self.their_state
        try:
            if state is State.SEND_GREETING:
                greeting, n = socks5.decode_greeting(self._buf)
                if greeting is None:
                    return self._eof_or_need("a greeting")
                del self._buf[:n]
                self._state.process_their_event(T.GREETING)
                return greeting
            if state is State.SEND_USERPASS:
                userpass, n = socks5.decode_userpass_request(self._buf)
                if userpass is None:
                    return self._eof_or_need("a username/password request")
                del self._buf[:n]
                self._state.process_their_event(T.USERPASS)
                return userpass
            if state is State.SEND_REQUEST:
                request, n = socks5.decode_request(self._buf)
                if request is None:
                    return self._eof_or_need("a request")
                del self._buf[:n]
                self.request = request
                self._state.process_their_event(T.REQUEST)
                return request
        except (WireError, RemoteProtocolError) as exc:
            raise self._fail(exc) from exc
        if state is State.CLOSED:
            return ConnectionClosed()
        return PAUSED

    def send(self, event: Socks5MethodSelection | UserPassReply | Socks5Reply) -> bytes:
        """Encode a SOCKS 5 message and move the state machine.

        Returns:
            The bytes to write.

        Raises:
            LocalProtocolError: the message is not allowed now, or is malformed.
        """
        if isinstance(event, Socks5MethodSelection):
            if event.method == AuthMethod.NONE:
                transition = T.METHOD_NONE
            elif event.method == AuthMethod.USERNAME_PASSWORD:
                transition = T.METHOD_USERPASS
            elif event.method == AuthMethod.NO_ACCEPTABLE_METHODS:
                transition = T.METHOD_REJECTED
            else:
                raise LocalProtocolError(f"method {event.method} is not implemented")
            data = socks5.encode_method_selection(event)
        elif isinstance(event, UserPassReply):
            ok = event.status == UserPassStatus.SUCCESS
            transition = T.USERPASS_SUCCESS if ok else T.USERPASS_FAILURE
            data = socks5.encode_userpass_reply(event)
        elif isinstance(event, Socks5Reply):
            if event.reply_code != ReplyCode.SUCCESS:
                transition = T.OP_FAILURE
            elif self.our_state is State.SEND_OPERATION_REPLY and self._is_bind():
                transition = T.OP_SUCCESS_FIRST_BIND
            else:
                transition = T.OP_SUCCESS
            data = socks5.encode_reply(event)
        else:
            raise LocalProtocolError(f"cannot send {event!r}")
        self._state.process_our_event(transition)
        return data

    def _is_bind(self) -> bool:
        return self.request is not None and self.request.command == Socks5Command.BIND
