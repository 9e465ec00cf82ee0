"""Sans-IO SOCKS 6 client: one `ClientConnection` per request, one `ClientSession` per session.

Strategy (h11 ``Connection``, aioquic ``QuicConnection``): nothing here blocks, reads a
clock or opens a socket. The adapter (``socks6fast.asyncio.client``, ``socks6fast.client``)
does this, and nothing else::

    conn = ClientConnection(session=session, credentials=credentials)
    write(conn.send(request, initial_data, now=clock()))      # one flight (CMD-03)
    while True:
        event = conn.next_event()
        if out := conn.data_to_send():                         # RFC 1929 request, late data
            write(out)
        if event is NEED_DATA:
            conn.receive_data(read(conn.bytes_needed))         # b"" is EOF (a reset: raise_reset)
        elif conn.state in (ClientState.ESTABLISHED, ClientState.MUST_CLOSE):
            break                                              # event is the last OperationReply

``bytes_needed`` never asks for more than the current message can still hold, so an
adapter that reads exactly that many bytes never swallows application data that follows
the last reply; a caller that feeds larger chunks finds the excess in `trailing_data`.

The draft's client rules are enforced here, not in the adapters, so every flavour obeys
them (IDs of docs/conformance.md):

* REQ-02: a Version Mismatch Reply (the byte 6, then EOF), or a first reply byte other
  than 6, raises `VersionMismatchError`.
* REQ-03: replies whose Options Length exceeds the cap are rejected from their header,
  before the options are buffered.
* REQ-10: a non-Success Operation Reply raises `ProxyError` carrying the code; the reply
  to NOOP leaves the connection in MUST_CLOSE. Either way the adapter closes.
* AUTH-03: Type 1 without a method we can continue with (or with 0xFF) raises
  `AuthenticationError`; AUTH-04: the second Authentication Reply is final.
* AUTH-08 / AUTH-09 / SES-06: `send` refuses requests that advertise method 0, carry two
  Authentication Data options for one method, or start a session from inside one.
* D4: the Session ID is taken from whichever reply carries it. IDM-05 lives in
  `ClientSession`. A reply updates the session only while its request belongs to the
  session held now: a late reply to a request of a session since replaced (after Session
  Invalid) neither sets the new session's token window nor invalidates it.
* D7: when the proxy selects username/password (Type 1 + Method Selection 2) after we
  advertised it, the bare RFC 1929 request goes out through `data_to_send`, then the
  RFC 1929 reply and the second Authentication Reply are read.

Every error leaves the connection in ERROR; the adapter must close the socket. The
client's states and transitions, those of a request and those of a session, are tables
in `proto/states.py`, beside the proxy's (one idiom for every state machine).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, NoReturn

from ..constants import (
    MAX_INITIAL_DATA_LENGTH,
    MAX_OPTIONS_LENGTH,
    MAX_WINDOW_SIZE,
    OPTION_HEADER_LENGTH,
    VERSION,
    AddressType,
    AuthMethod,
    AuthReplyType,
    Command,
    ReplyCode,
    UserPassStatus,
)
from ..errors import (
    AuthenticationError,
    LocalProtocolError,
    ProxyError,
    RemoteProtocolError,
    Socks6Error,
    VersionMismatchError,
    WireError,
)
from . import codec
from .messages import (
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    OperationReply,
    Option,
    Request,
    SessionID,
    SessionInvalid,
    SessionRequest,
    SessionTeardown,
)
from .sessions import token_lt
from .socks5 import (
    UserPassReply,
    UserPassRequest,
    decode_userpass_reply,
    decode_userpass_request,
    encode_userpass_request,
)
from .states import (
    NEED_DATA,
    PAUSED,
    ClientState,
    ClientStep,
    NeedData,
    Paused,
    SessionState,
    SessionStep,
    client_transition,
    session_transition,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ClientConnection",
    "ClientEvent",
    "ClientSession",
    "ClientState",
    "NeedData",
    "Paused",
    "SessionState",
    "address_of",
    "build_request",
    "noop_request",
    "raise_reset",
    "tfo_syn_may_carry_data",
    "tls_early_data_allowed",
]

_TOKEN_MASK: Final = 2**32 - 1
#: Authentication Data option header: Kind (2), Length (2), Method (1).
_AUTH_DATA_HEADER_LENGTH: Final = OPTION_HEADER_LENGTH + 1
#: Methods this connection can carry out when the proxy asks for a negotiation.
_NEGOTIABLE_METHODS: Final = frozenset({AuthMethod.USERNAME_PASSWORD})


ClientEvent = AuthReply | UserPassReply | OperationReply | NeedData | Paused
"""What `ClientConnection.next_event` returns."""


# --- Building requests ---------------------------------------------------------------


def address_of(host: str) -> tuple[AddressType, str]:
    """Classify a destination the way a Request carries it.

    IP literals (``[::1]`` brackets allowed) keep their type, in the text form of
    ``socks6fast.proto.messages``; anything else is a domain name the proxy resolves.

    Example:
        >>> address_of("192.0.2.1")
        (<AddressType.IPV4: 1>, '192.0.2.1')
        >>> address_of("[2001:db8::1]")
        (<AddressType.IPV6: 4>, '2001:db8::1')
        >>> address_of("example.com")
        (<AddressType.DOMAIN_NAME: 3>, 'example.com')
    """
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        return AddressType.DOMAIN_NAME, host
    if ip.version == 4:
        return AddressType.IPV4, str(ip)
    return AddressType.IPV6, str(ip)


def _pad_auth_data(data: bytes) -> bytes:
    # Authentication Data: the option's total length must be a multiple of 4
    # (section "SOCKS Options"); the message keeps its padding (messages.AuthData).
    return data + bytes(-(len(data) + _AUTH_DATA_HEADER_LENGTH) % 4)


def build_request(
    command: Command,
    host: str,
    port: int,
    *,
    credentials: UserPassRequest | None = None,
    initial_data_length: int = 0,
    options: Iterable[Option] = (),
) -> Request:
    """Build a Request with 0-RTT username/password credentials when given.

    With credentials the Request carries both an Authentication Data option (the RFC
    1929 request, method 2: the proxy can accept it without a round trip, AUTH-01) and an
    Authentication Method Advertisement for method 2 (so a proxy that wants the slow
    RFC 1929 exchange can still ask for it, D7). The advertisement declares how much
    initial data follows the Request (at most 2^14 bytes; `ClientConnection` sends the
    rest once authentication succeeded). "No authentication" is never advertised
    (AUTH-08).

    Args:
        command: the Command Code.
        host: destination (CONNECT) or desired bind address; see `address_of`.
        port: destination or desired bind port.
        credentials: username and password, or None.
        initial_data_length: bytes of application data the caller sends with the Request
            (CONNECT only); only the first 2^14 are declared.
        options: further options (Stack, Session, Idempotence), in wire order.

    Returns:
        The Request, ready for `ClientConnection.send`.

    Example:
        >>> from socks6fast.proto.socks5 import UserPassRequest
        >>> r = build_request(Command.CONNECT, "example.com", 443,
        ...                   credentials=UserPassRequest(b"alice", b"s3cret"))
        >>> [type(o).__name__ for o in r.options]
        ['AuthMethodAdvertisement', 'AuthData']
    """
    address_type, address = address_of(host)
    all_options: list[Option] = []
    if credentials is not None:
        declared = min(initial_data_length, MAX_INITIAL_DATA_LENGTH) if command is Command.CONNECT else 0
        all_options.append(AuthMethodAdvertisement(declared, (AuthMethod.USERNAME_PASSWORD,)))
        all_options.append(
            AuthData(AuthMethod.USERNAME_PASSWORD, _pad_auth_data(encode_userpass_request(credentials)))
        )
    all_options.extend(options)
    return Request(command, address_type, address, port, tuple(all_options))


def noop_request(options: Iterable[Option] = ()) -> Request:
    """A NOOP Request: address 0.0.0.0, port 0 (section "Requests"); used for sessions."""
    return Request(Command.NOOP, AddressType.IPV4, "0.0.0.0", 0, tuple(options))


# --- Transport rules (sections "TCP Fast Open on the Client-Proxy Leg", "Replay attacks")


def tfo_syn_may_carry_data(*, spends_token: bool) -> bool:
    """TRN-02: may the TFO SYN to the proxy carry application data (initial data)?

    The draft lets a client use TFO on the client-proxy leg when the SYN carries no
    application data, when the request spends an idempotence token, or over TLS without
    early data. The adapters therefore always put only the Request in the SYN, and add
    the initial data to it only when this returns True. (Over TLS the SYN carries the
    ClientHello, never application data.)
    """
    return spends_token


def tls_early_data_allowed(*, spends_token: bool) -> bool:
    """TRN-04: TLS 1.3 early data is allowed only when the Request spends a token.

    Python's ``ssl`` module cannot send early data at all, so the adapters never do; this
    function states the rule for other drivers of the sans-IO core.
    """
    return spends_token


# --- Sessions and tokens (section "Session options", "Idempotence options") ----------


class ClientSession:
    """Client bookkeeping of one SOCKS 6 session and its token window (sans-IO).

    ``ClientConnection`` feeds it the options of every reply; the adapter asks it which
    options the next request carries (`request_options`).

    Rules kept here: SES-06 (a request carrying the Session ID never carries a Session
    Request), D4 (the Session ID is accepted from the Authentication Reply or the
    Operation Reply), IDM-05 (smallest unspent token first; a window advertisement whose
    base is older than the newest seen, in mod-2^32 order, is ignored).

    Args:
        tokens: size of the token window to request with the Session Request (0: none).

    Example:
        >>> s = ClientSession(tokens=4)
        >>> s.request_options()
        (SessionRequest(), IdempotenceRequest(window_size=4))
        >>> s.on_session_id(b"ABCD"); s.on_window(10, 4)
        >>> s.request_options(idempotent=True)
        (SessionID(session_id=b'ABCD'), IdempotenceExpenditure(token=10))
    """

    def __init__(self, *, tokens: int = 0) -> None:
        if not 0 <= tokens <= MAX_WINDOW_SIZE:
            raise ValueError(f"tokens must be 0-{MAX_WINDOW_SIZE}")
        self.tokens = tokens
        """Requested window size (0: no Token Request)."""
        self.state = SessionState.NEW
        """Where the session stands."""
        self.session_id: bytes | None = None
        """The Session ID once the proxy granted one."""
        self.window: tuple[int, int] | None = None
        """The newest ``(base, size)`` token window seen, or None."""
        self._spent: set[int] = set()

    # -- what the next request carries

    @property
    def needs_credentials(self) -> bool:
        """True when the next request must authenticate itself (no active session)."""
        return self.state is not SessionState.ACTIVE

    def request_options(self, *, idempotent: bool = False) -> tuple[Option, ...]:
        """Session and idempotence options for the next request; marks a token spent.

        Args:
            idempotent: spend the smallest unspent token (needs an ACTIVE session with a
                window).

        Returns:
            NEW: Session Request (+ Token Request); the state becomes PENDING.
            ACTIVE: Session ID (+ Idempotence Expenditure). DECLINED: nothing.

        Raises:
            LocalProtocolError: the session is PENDING or CLOSED, or ``idempotent`` and no
                token is available.
        """
        if self.state is SessionState.PENDING:
            raise LocalProtocolError("the session is being established; wait for it", None)
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError("the session is closed", None)
        if idempotent and self.state is SessionState.DECLINED:
            raise LocalProtocolError("the proxy declined the session: no idempotence tokens", None)
        if idempotent and self.state is not SessionState.ACTIVE:
            raise LocalProtocolError("idempotence tokens need an established session", None)
        if self.state is SessionState.NEW:
            self.state = session_transition(self.state, SessionStep.INITIATED)
            options: tuple[Option, ...] = (SessionRequest(),)
            if self.tokens:
                options += (IdempotenceRequest(self.tokens),)
            return options
        if self.state is SessionState.DECLINED:
            return ()
        assert self.session_id is not None
        # SES-06: inside a session, never a Session Request.
        options = (SessionID(self.session_id),)
        if idempotent:
            options += (IdempotenceExpenditure(self.spend_token()),)
        return options

    def teardown_options(self) -> tuple[Option, ...]:
        """Session ID + Session Teardown for a NOOP; the session is CLOSED from now on.

        "After sending such an option, the client MUST assume that the session is no
        longer valid" (section "Tearing down the session").

        Returns:
            The two options, or () when there is no session to tear down.
        """
        session_id = self.session_id
        self._forget()
        self.state = session_transition(self.state, SessionStep.CLOSED)
        if session_id is None:
            return ()
        return (SessionID(session_id), SessionTeardown())

    # -- tokens (IDM-05)

    def available_token(self) -> int | None:
        """The smallest unspent token of the known window, or None."""
        if self.window is None:
            return None
        base, size = self.window
        # Clients spend the smallest tokens first (section "Spending a token"), so the
        # spent set holds only tokens at the bottom of the window: this loop is short.
        for offset in range(size):
            token = (base + offset) & _TOKEN_MASK
            if token not in self._spent:
                return token
        return None

    @property
    def tokens_left(self) -> int:
        """Unspent tokens of the known window (0 without one): how soon a refill is due."""
        if self.window is None:
            return 0
        base, size = self.window
        spent = sum(1 for t in self._spent if (t - base) & _TOKEN_MASK < size)
        return size - spent

    def spend_token(self) -> int:
        """Take the smallest unspent token and remember it as spent.

        Raises:
            LocalProtocolError: no window, or every token of it is spent.
        """
        token = self.available_token()
        if token is None:
            raise LocalProtocolError("no unspent idempotence token in the known window", None)
        self._spent.add(token)
        return token

    def on_window(self, base: int, size: int) -> None:
        """An Idempotence Window advertisement arrived (section "Out-of-order Window
        Advertisements"): keep it unless its base is older than the newest seen."""
        base &= _TOKEN_MASK
        if not 0 < size <= MAX_WINDOW_SIZE:
            return  # the proxy broke "MUST be less than 2^31 / MUST NOT be 0": ignore it
        if self.window is not None and token_lt(base, self.window[0]):
            return
        self.window = (base, size)
        # Forget spent tokens that fell below the new base.
        self._spent = {t for t in self._spent if not token_lt(t, base)}

    # -- session life

    def on_session_id(self, session_id: bytes) -> None:
        """A Session ID option arrived in a reply to our Session Request (D4)."""
        if self.state is SessionState.PENDING:
            self.session_id = session_id
            self.state = session_transition(self.state, SessionStep.GRANTED)

    def on_initiation_done(self, *, succeeded: bool) -> None:
        """The request that carried the Session Request finished (either way)."""
        if self.state is SessionState.PENDING:
            # Success without a Session ID: the proxy declined silently (section "Session
            # initiation"); failure: try again with the next request. Either way no
            # session came of it, so the Idempotence Window its Authentication Reply may
            # have carried belongs to no session we hold ("Token windows are tracked by
            # the proxy on a per-session basis", section "Idempotence options"): kept, it
            # would shadow the next session's window whenever that base compares older
            # (IDM-05) and its tokens would be spent there.
            self._forget()
            step = SessionStep.DECLINED if succeeded else SessionStep.INITIATION_FAILED
            self.state = session_transition(self.state, step)

    def on_session_invalid(self) -> None:
        """The proxy answered Session Invalid: start over with a new session."""
        if self.state is not SessionState.CLOSED:
            self._forget()
            self.state = session_transition(self.state, SessionStep.INVALID)

    def _forget(self) -> None:
        self.session_id = None
        self.window = None
        self._spent.clear()


def _refusal(value: int) -> ProxyError:
    try:
        code = ReplyCode(value)
    except ValueError:
        # A code draft-11 does not define: still a refusal; report the raw value.
        return ProxyError(f"the proxy refused the request with unknown reply code {value:#04x}", None)
    return ProxyError(f"the proxy refused the request: {code.name} ({int(code):#04x})", code)


def raise_reset(conn: ClientConnection, exc: ConnectionResetError) -> NoReturn:
    """Judge a connection reset in the middle of a reply like EOF, for adapters.

    A proxy that closes with part of our Request unread makes the kernel send a reset
    instead of a FIN, right behind its last bytes: a Version Mismatch Reply (the byte 6)
    or a truncated reply. The core judges what arrived before the reset as it judges an
    EOF, so the caller gets the typed error (REQ-02 `VersionMismatchError`, or
    `RemoteProtocolError` for a truncated reply), chained to ``exc``. Call it only when
    `ClientConnection.next_event` returned NEED_DATA: EOF then always ends in an error.

    Raises:
        Socks6Error: the typed error, ``from exc``.
        ConnectionResetError: ``exc`` itself, if the core did not object (a bug).
    """
    conn.receive_data(b"")
    try:
        conn.next_event()
    except Socks6Error as error:
        raise error from exc
    raise exc


# --- The connection ------------------------------------------------------------------


_DONE: Final = frozenset({ClientState.ESTABLISHED, ClientState.MUST_CLOSE})


class ClientConnection:
    """The client side of one SOCKS 6 request, sans-IO (h11 ``Connection`` shape).

    Args:
        session: the session this request belongs to, if any; it is updated from the
            replies (Session ID, token windows, Session Invalid).
        credentials: username and password for the slow RFC 1929 exchange (D7). When
            None, the RFC 1929 request of the Request's method-2 Authentication Data
            option is reused.
        max_options_length: cap on the Options Length of replies (REQ-03, D6).
        handshake_timeout: seconds from `send` until the handshake must be over; see
            `get_timer` / `handle_timer`. None: no deadline.

    Example (the proxy's bytes scripted; hex annotated field by field)::

        >>> conn = ClientConnection()
        >>> conn.send(build_request(Command.CONNECT, "192.0.2.1", 80), b"GET /").hex()
        '0601000000500001c0000201474554202f'
        >>> conn.receive_data(bytes.fromhex(
        ...     "06000000"                          # Auth Reply: ver 6, Type 0, no options
        ...     "06000000" "04d2" "00" "01" "7f000001"))  # Operation Reply: Success, 127.0.0.1:1234
        >>> conn.next_event()
        AuthReply(type=<AuthReplyType.SUCCESS: 0>, options=())
        >>> conn.next_event().port, conn.state
        (1234, <ClientState.ESTABLISHED: 'established'>)
    """

    def __init__(
        self,
        *,
        session: ClientSession | None = None,
        credentials: UserPassRequest | None = None,
        max_options_length: int = MAX_OPTIONS_LENGTH,
        handshake_timeout: float | None = None,
    ) -> None:
        self.session = session
        """The session updated from the replies, or None."""
        self.state = ClientState.IDLE
        """Where the handshake stands."""
        self.request: Request | None = None
        """The Request sent."""
        self.request_size = 0
        """Bytes of the encoded Request at the start of what `send` returned (so a TFO
        adapter can keep initial data out of the SYN, TRN-02)."""
        self.auth_replies: list[AuthReply] = []
        """Authentication Replies received (one, or two after a negotiation)."""
        self.operation_reply: OperationReply | None = None
        """The (first) Operation Reply: bind address, echoed Stack options."""
        self.peer_reply: OperationReply | None = None
        """BIND only: the second Operation Reply, naming the connecting host."""
        self.token_accepted: bool | None = None
        """Idempotence Accepted (True) / Rejected (False) when a token was spent."""
        self.session_invalid = False
        """True when the proxy answered Session Invalid."""
        self._credentials = credentials
        self._max_options_length = max_options_length
        self._handshake_timeout = handshake_timeout
        self._deadline: float | None = None
        self._buffer = bytearray()
        self._eof = False
        self._outgoing = bytearray()
        self._late_data = b""
        self._needed = 0
        self._initiates_session = False
        self._session_id: bytes | None = None
        self._advertised: tuple[int, ...] = ()

    # -- public properties

    @property
    def spends_token(self) -> bool:
        """True when the Request carries an Idempotence Expenditure option (TRN-02/04)."""
        return self.request is not None and any(
            isinstance(o, IdempotenceExpenditure) for o in self.request.options
        )

    @property
    def bytes_needed(self) -> int:
        """Bytes the current message still needs at least (valid after NEED_DATA).

        An adapter that reads at most this many bytes never reads past the last reply,
        so the socket can be handed to the application afterwards.
        """
        return max(self._needed, 1)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes after the last reply, EOF seen)`` once the handshake is over (h11)."""
        return bytes(self._buffer), self._eof

    # -- sending

    def send(self, request: Request, initial_data: bytes = b"", *, now: float | None = None) -> bytes:
        """Encode the Request and the initial data that may go with it (one flight).

        Without an Authentication Method Advertisement, all ``initial_data`` follows the
        Request at once (false start, section "False Starts", CMD-03). With one, the
        advertised Initial Data Length goes at once and the rest waits for the successful
        Authentication Reply (it then comes out of `data_to_send`).

        Args:
            request: the Request (see `build_request`).
            initial_data: application data (CONNECT only).
            now: the current time, to start the handshake timer.

        Returns:
            Bytes to write to the proxy.

        Raises:
            LocalProtocolError: a second request on this connection, method 0 advertised
                (AUTH-08), two Authentication Data options for one method (AUTH-09), a
                Session Request together with a Session ID (SES-06), initial data on a
                command other than CONNECT or shorter than advertised, or a value the
                encoder refuses.
        """
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError("a ClientConnection carries one request", None)
        self._check_request(request)
        advertisement = next((o for o in request.options if isinstance(o, AuthMethodAdvertisement)), None)
        if initial_data and request.command is not Command.CONNECT:
            raise LocalProtocolError("initial data goes with CONNECT only", None)
        first = initial_data
        if advertisement is not None:
            declared = advertisement.initial_data_length
            if declared > MAX_INITIAL_DATA_LENGTH or declared > len(initial_data):
                raise LocalProtocolError(
                    f"Initial Data Length {declared} does not match {len(initial_data)} bytes given", None
                )
            first, self._late_data = initial_data[:declared], initial_data[declared:]
            self._advertised = tuple(advertisement.methods)
        encoded = codec.encode_request(request)
        self.request = request
        self.request_size = len(encoded)
        self._initiates_session = any(isinstance(o, SessionRequest) for o in request.options)
        self._session_id = next((o.session_id for o in request.options if isinstance(o, SessionID)), None)
        if self._credentials is None:
            self._credentials = self._credentials_from(request)
        self._move(ClientStep.REQUEST_SENT)
        if self._handshake_timeout is not None and now is not None:
            self._deadline = now + self._handshake_timeout
        return encoded + first

    @staticmethod
    def _check_request(request: Request) -> None:
        auth_methods: set[int] = set()
        has_session_id = has_session_request = False
        advertisements = 0
        for option in request.options:
            if isinstance(option, AuthMethodAdvertisement):
                advertisements += 1
                # AUTH-08: "Clients SHOULD omit advertising the 'No authentication
                # required' option" (section "Authentication Method options").
                if AuthMethod.NONE in option.methods:
                    raise LocalProtocolError("never advertise method 0 (no authentication)", None)
            elif isinstance(option, AuthData):
                # AUTH-09: "Clients MUST only place one Authentication Data option per
                # authentication method."
                if option.method in auth_methods:
                    raise LocalProtocolError(
                        f"two Authentication Data options for method {option.method}", None
                    )
                auth_methods.add(option.method)
            elif isinstance(option, SessionID):
                has_session_id = True
            elif isinstance(option, SessionRequest):
                has_session_request = True
        if advertisements > 1:
            raise LocalProtocolError("at most one Authentication Method Advertisement", None)
        # SES-06: "A client MUST NOT attempt to initiate a session from within a
        # different session."
        if has_session_id and has_session_request:
            raise LocalProtocolError("a Session Request cannot go with a Session ID", None)

    @staticmethod
    def _credentials_from(request: Request) -> UserPassRequest | None:
        for option in request.options:
            if isinstance(option, AuthData) and option.method == AuthMethod.USERNAME_PASSWORD:
                try:
                    parsed, _ = decode_userpass_request(option.data)
                except WireError:
                    return None
                return parsed
        return None

    def data_to_send(self) -> bytes:
        """Bytes produced by processing replies: the bare RFC 1929 request (D7), and the
        initial data beyond the advertised length once authentication succeeded."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    # -- receiving

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the proxy; ``b""`` means EOF.

        Raises:
            RemoteProtocolError: data after EOF.
        """
        if data:
            if self._eof:
                raise RemoteProtocolError("data after EOF", None)
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> ClientEvent:
        """Parse the next reply.

        Returns:
            `AuthReply`, `socks6fast.proto.socks5.UserPassReply` (slow exchange),
            `OperationReply` (twice for BIND), `NEED_DATA`, or `PAUSED` once the state
            is ESTABLISHED or MUST_CLOSE.

        Raises:
            VersionMismatchError: REQ-02.
            AuthenticationError: AUTH-03, a rejected password, Session Invalid, a
                rejected idempotence token.
            ProxyError: a non-Success Operation Reply (``reply_code`` set, REQ-10).
            RemoteProtocolError: malformed or oversized reply (REQ-03), EOF mid-handshake.
            LocalProtocolError: called before `send` or after an error.
        """
        state = self.state
        if state in _DONE:
            return PAUSED
        if state is ClientState.ERROR:
            raise LocalProtocolError("the connection failed; close it", None)
        if state is ClientState.IDLE:
            raise LocalProtocolError("send a Request first", None)
        try:
            if state is ClientState.AWAIT_AUTH_REPLY:
                return self._read_first_auth_reply()
            if state is ClientState.AWAIT_USERPASS_REPLY:
                return self._read_userpass_reply()
            if state is ClientState.AWAIT_SECOND_AUTH_REPLY:
                return self._read_second_auth_reply()
            return self._read_operation_reply()
        except Exception:
            self._move(ClientStep.FAILED)
            raise

    # -- timer (aioquic get_timer / handle_timer)

    def get_timer(self) -> float | None:
        """When the handshake times out (same clock as ``now``), or None."""
        return None if self.state in _DONE or self.state is ClientState.ERROR else self._deadline

    def handle_timer(self, now: float) -> None:
        """Check the handshake deadline.

        Raises:
            TimeoutError: the deadline passed before the handshake ended.
        """
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            self._move(ClientStep.FAILED)
            raise TimeoutError("SOCKS 6 handshake timed out")

    # -- internals

    def _move(self, step: ClientStep) -> None:
        # Every change of state is a row of the table in proto/states.py.
        self.state = client_transition(self.state, step)

    def _consume(self, n: int) -> None:
        del self._buffer[:n]
        self._needed = 0

    def _truncated(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"the proxy closed the connection before the {what} was complete", None)

    def _decode_auth_reply(self) -> AuthReply | None:
        try:
            reply, n = codec.decode_auth_reply(self._buffer, 0, self._max_options_length)
        except WireError as exc:
            raise RemoteProtocolError(f"malformed Authentication Reply: {exc}", None) from exc
        if reply is None:
            if self._eof:
                raise self._truncated("Authentication Reply")
            self._needed = n
            return None
        self._consume(n)
        self.auth_replies.append(reply)
        self._note_session_options(reply.options, success=reply.type == AuthReplyType.SUCCESS)
        return reply

    def _read_first_auth_reply(self) -> ClientEvent:
        buffer = self._buffer
        if buffer and buffer[0] != VERSION:
            raise VersionMismatchError(
                f"the proxy does not speak SOCKS 6 (first reply byte {buffer[0]:#04x})"
            )
        if self._eof and bytes(buffer) == bytes((VERSION,)):
            # REQ-02: the single byte 6 followed by EOF is a Version Mismatch Reply
            # ("A client MUST close the connection after receiving such a reply").
            raise VersionMismatchError("the proxy sent a Version Mismatch Reply")
        if self._eof and not buffer:
            raise RemoteProtocolError("the proxy closed the connection without replying", None)
        reply = self._decode_auth_reply()
        if reply is None:
            return NEED_DATA
        if reply.type == AuthReplyType.SUCCESS:
            self._authenticated()
            return reply
        self._check_failure(reply)
        # section "Authentication Replies": failed, but "negotiation can continue" only
        # via an Authentication Method Selection option naming a method we can do.
        selection = next((o for o in reply.options if isinstance(o, AuthMethodSelection)), None)
        if selection is None:
            raise AuthenticationError("authentication failed and the proxy offers no method to continue")
        method = selection.method
        if method == AuthMethod.NO_ACCEPTABLE_METHODS:
            # AUTH-03: "If the proxy selects 'No Acceptable Methods', the client MUST close"
            raise AuthenticationError("the proxy accepts none of our authentication methods (0xFF)")
        if method not in self._advertised or method not in _NEGOTIABLE_METHODS or self._credentials is None:
            # Without an advertisement the proxy cannot tell initial data from the
            # negotiation (section "False Starts"), so we never continue then either.
            raise AuthenticationError(
                f"the proxy selected authentication method {method}, which we cannot do"
            )
        # D7 slow form: the bare RFC 1929 request (RFC 1929 section 2).
        self._outgoing += encode_userpass_request(self._credentials)
        self._move(ClientStep.USERPASS_SENT)
        return reply

    def _read_userpass_reply(self) -> ClientEvent:
        try:
            reply, n = decode_userpass_reply(self._buffer)
        except WireError as exc:
            raise RemoteProtocolError(f"malformed RFC 1929 reply: {exc}", None) from exc
        if reply is None:
            if self._eof:
                raise self._truncated("RFC 1929 reply")
            self._needed = n
            return NEED_DATA
        self._consume(n)
        if reply.status != UserPassStatus.SUCCESS:
            raise AuthenticationError("the proxy rejected the username/password")
        self._move(ClientStep.USERPASS_ACCEPTED)
        return reply

    def _read_second_auth_reply(self) -> ClientEvent:
        reply = self._decode_auth_reply()
        if reply is None:
            return NEED_DATA
        if reply.type != AuthReplyType.SUCCESS:
            self._check_failure(reply)
            # AUTH-04: "The second Authentication Reply MUST NOT allow for further
            # negotiations": a failure here is final, whatever it selects.
            raise AuthenticationError("authentication failed")
        self._authenticated()
        return reply

    def _check_failure(self, reply: AuthReply) -> None:
        for option in reply.options:
            if isinstance(option, SessionInvalid):
                self.session_invalid = True
                if self.session is not None and self._speaks_for_session():
                    self.session.on_session_invalid()
                raise AuthenticationError("the proxy no longer knows our session (Session Invalid)")
            if isinstance(option, IdempotenceRejected):
                self.token_accepted = False
                raise AuthenticationError("the proxy rejected the idempotence token")
            if isinstance(option, AuthData) and option.method == AuthMethod.USERNAME_PASSWORD:
                # 0-RTT form: the RFC 1929 reply inside the option (section
                # "Username/Password Authentication").
                try:
                    status, _ = decode_userpass_reply(option.data)
                except WireError:
                    status = None
                if status is not None and status.status != UserPassStatus.SUCCESS:
                    raise AuthenticationError("the proxy rejected the username/password")

    def _authenticated(self) -> None:
        self._move(ClientStep.AUTHENTICATED)
        if self._late_data:
            # section "False Starts": "Application data MAY be sent immediately after
            # receiving an Authentication Reply indicating success."
            self._outgoing += self._late_data
            self._late_data = b""

    def _speaks_for_session(self) -> bool:
        # Does a reply on this connection speak for the session `self.session` holds now?
        # "Token windows are tracked by the proxy on a per-session basis ... its tokens
        # can only be spent from within said session" (section "Idempotence options"):
        # a reply to a request of an earlier session (one the proxy has since declared
        # invalid, and the client replaced) must neither plant that session's window in
        # the new one nor invalidate the new one. The request that initiates the
        # session speaks for it while it is pending.
        session = self.session
        if session is None:
            return False
        if session.state is SessionState.PENDING:
            return self._initiates_session
        return (
            session.state is SessionState.ACTIVE
            and self._session_id is not None
            and session.session_id == self._session_id
        )

    def _note_session_options(self, options: tuple[Option, ...], *, success: bool) -> None:
        session = self.session
        for option in options:
            if isinstance(option, SessionID):
                # D4: either reply may carry the Session ID; only a reply to our own
                # Session Request may start a session (SES-06).
                if session is not None and self._initiates_session:
                    session.on_session_id(option.session_id)
                    if session.session_id == option.session_id:
                        self._session_id = option.session_id
            elif isinstance(option, IdempotenceWindow):
                # Windows come in successful Authentication Replies (section
                # "Requesting a token window"); IDM-05 filters stale ones, and only a
                # reply within the current session may set its window.
                if session is not None and success and self._speaks_for_session():
                    session.on_window(option.base, option.size)
            elif isinstance(option, IdempotenceAccepted):
                self.token_accepted = True

    def _read_operation_reply(self) -> ClientEvent:
        try:
            reply, n = codec.decode_operation_reply(self._buffer, 0, self._max_options_length)
        except WireError as exc:
            raise RemoteProtocolError(f"malformed Operation Reply: {exc}", None) from exc
        if reply is None:
            if self._eof:
                raise self._truncated("Operation Reply")
            self._needed = n
            return NEED_DATA
        self._consume(n)
        assert self.request is not None
        first = self.state is ClientState.AWAIT_OPERATION_REPLY
        success = reply.reply_code == ReplyCode.SUCCESS
        if first:
            self.operation_reply = reply
            self._note_session_options(reply.options, success=success)
            if self.session is not None and self._initiates_session:
                self.session.on_initiation_done(succeeded=success)
        else:
            self.peer_reply = reply
        if not success:
            # REQ-10: "If the proxy returns a reply code other than 'Success', the
            # client MUST close the connection."
            raise _refusal(reply.reply_code)
        command = self.request.command
        if not first or command in (Command.CONNECT, Command.UDP_ASSOCIATE):
            self._move(ClientStep.OPERATION_DONE)
        elif command is Command.BIND:
            self._move(ClientStep.BIND_BOUND)
        else:
            # REQ-10: "If the client issued an NOOP command, the client MUST close the
            # connection after receiving the Operation Reply."
            self._move(ClientStep.NOOP_DONE)
        return reply
