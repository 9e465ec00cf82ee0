"""The proxy's decisions, sans I/O: one `ServerConnection` (SOCKS 6) or `Socks5ServerConnection`
(RFC 1928/1929, in ``server_socks5``) per client connection; `server_connection` picks (D1).

Strategy (aioquic ``QuicConnection``): everything the draft decides happens here: which
authentication method, whether a session is valid, spending an idempotence token, whether the
rules allow the request, which Stack options to apply and echo, and every byte of every
reply. The adapter (``socks6fast.asyncio.server``) performs *actions* and reports
*completions* (`socks6fast.proto.actions` lists both), and nothing else::

    conn = server_connection(context, client_ip, first_bytes, now)    # the first byte picks (D1)
    action = conn.next_action(now)
    while True:
        if action is NEED_DATA:        conn.receive_data(read_until(conn.get_timer()))
        elif isinstance(action, Send): write(action.data)
        elif isinstance(action, Dial): conn.dial_finished(dial(...))    # or dial_failed(code, why)
        ...                                                              # Relay and Close end it
        action = conn.next_action(now)
    conn.connection_ended(now)                                           # always, last

Time enters only as ``now`` (the handshake deadline, session lookups and expiry, the connect
deadline); nothing here reads a clock, opens a socket or waits.

Layers inside the core: `socks6fast.proto.server_wire` turns bytes into messages and replies
into bytes and keeps the order of messages (``states.py``); this module decides which reply to
send (`socks6fast.proto.server_common` holds what SOCKS 6 and SOCKS 5 share: the context,
the action queue, the completions); `socks6fast.proto.stack` plans and echoes Stack options;
`socks6fast.proto.sessions` keeps sessions and token windows; `socks6fast.proto.policy` holds
the rules and `socks6fast.proto.auth` the users.

The SOCKS 6 decision tree (draft-11 section numbers in the methods):

1. Request read (`ServerWire`): a first byte that is not 6 gets the Version Mismatch Reply
   (REQ-01); an unparseable request gets a failure reply per D14.
2. Client-leg Stack options: `ApplyClientOptions` (STK-03), before anything is decided.
3. Authentication (`_authenticate`): a Session ID skips it (SES-02) or ends the connection
   (SES-03); Session Teardown ends the session first (SES-05); a token is spent before the
   request is honoured (IDM-03); otherwise credentials are checked (0-RTT, AUTH-01/AUTH-05,
   or the slow exchange, D7/AUTH-04), or refused (AUTH-02). The successful Authentication
   Reply is held back when the client did not wait for it (false start) and leaves with the
   Operation Reply, in one write.
4. Initial data (AUTH-06), then the operation (`_operate`): NOOP (REQ-04), the rules (CMD-06),
   CONNECT (resolve, the rules again on the resolved addresses, dial: CMD-01, CMD-02, STK-04,
   STK-06, STK-07; the DNS service, CMD-07/D13), BIND (CMD-04, CMD-05).
5. Success hands both connections to the relay with the bytes the client sent early (CMD-03);
   failures are answered with the client-leg echo (STK-01) and close. A session whose first
   request fails is torn down again (D4).
"""

from __future__ import annotations

import ipaddress
from typing import Final

from ..constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Availability,
    Command,
    Parity,
    ReplyCode,
    StackLeg,
    UserPassStatus,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from . import codec
from .actions import (
    AWAIT_PEER,
    CLOSE,
    HOLD_BACKLOG,
    LINGER_CLOSE,
    ApplyClientOptions,
    AskSessionStore,
    Associate,
    Claim,
    Dial,
    Dialed,
    EndSession,
    Listen,
    Listening,
    OpenAssociation,
    OpenedAssociation,
)
from .associations import Reservation
from .messages import (
    AssociationInit,
    AuthData,
    AuthMethodSelection,
    AuthReply,
    IdempotenceAccepted,
    IdempotenceRejected,
    IdempotenceWindow,
    OperationReply,
    Option,
    PortParityOption,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    VersionMismatchReply,
)
from .server_common import (
    _UNSPECIFIED,
    DNS_PORT,
    MAX_BIND_BACKLOG,
    ServerContext,
    _address_type_of,
    _ConnectionBase,
    _denied_by,
    _multipath,
    _Step,
    detect_protocol,
    is_dns_request,
    is_multicast,
    noop_address_ok,
    reply_code_for,
)
from .server_socks5 import Socks5ServerConnection
from .server_wire import (
    NO_OPTIONS,
    ConnectionClosed,
    InitialData,
    RequestReceived,
    ServerWire,
    VersionMismatch,
    failure_reply,
)
from .sessions import Session, SessionAnswer, SessionOp, SessionQuery, SessionStore
from .socks5 import (
    UserPassReply,
    UserPassRequest,
    encode_userpass_reply,
)
from .stack import AppliedLeg, StackPlan, echo_stack_options
from .states import NEED_DATA, PAUSED, Protocol, State

__all__ = [
    "DNS_PORT",
    "NEED_DATA",
    "PAUSED",
    "MAX_BIND_BACKLOG",
    "ServerConnection",
    "ServerContext",
    "Socks5ServerConnection",
    "detect_protocol",
    "is_dns_request",
    "noop_address_ok",
    "reply_code_for",
    "server_connection",
]

_AUTH_SUCCESS: Final = AuthReply(AuthReplyType.SUCCESS)

#: A shared session store is touched again when a connection of the session ends at least this
#: many seconds after the store was asked (the answer touched it already): a short request
#: costs one round trip, and a session may expire up to this much earlier than in memory.
SHARED_TOUCH_AFTER: Final = 1.0

#: Our half's states in which no reply has gone out yet (D14: only General Failure may go).
_NOTHING_SENT: Final = frozenset({State.IDLE, State.SEND_AUTH_REPLY})


class ServerConnection(_ConnectionBase):
    """The proxy's side of one SOCKS 6 connection: every decision, no I/O.

    Args:
        context: the server's users, rules, sessions and limits.
        client_ip: the client's address as text.
        now: the current time (the handshake deadline starts here).
    """

    __slots__ = (
        "_client_applied",
        "_client_eof",
        "_dns",
        "_held",
        "_listen_backlog",
        "_new_session",
        "_options",
        "_payload",
        "_pending_auth",
        "_query",
        "_session",
        "_socks6",
        "_store_answer",
        "_store_time",
        "request",
        "store_followup",
    )

    def __init__(self, context: ServerContext, client_ip: str, now: float) -> None:
        self._socks6 = ServerWire(
            max_options_length=context.max_options_length,
            handshake_timeout=context.handshake_timeout,
            now=now,
        )
        _ConnectionBase.__init__(self, context, client_ip, self._socks6)
        self.request: Request | None = None
        """The Request, once read."""
        self._options = NO_OPTIONS
        self._client_applied: AppliedLeg | None = None
        self._session: Session | None = None
        self._new_session = False
        self._held = b""
        self._payload = b""
        self._client_eof = False
        self._dns = False
        self._listen_backlog = 0
        self._query: SessionQuery | None = None
        self._store_answer: SessionAnswer | str | None = None
        self._pending_auth: tuple[str | None, tuple[Option, ...]] = (None, ())
        self._store_time = 0.0
        self.store_followup: SessionQuery | None = None
        """After ``connection_ended``, with a shared session store: a query for the adapter to
        send without waiting (`SharedSessionStore.send`): TOUCH after a relay of the session,
        or TEARDOWN of a session whose first request failed (D4)."""

    @property
    def session(self) -> Session | None:
        """The session this request runs in (looked up or started by it), if any."""
        return self._session

    def dial_failed(self, exc: BaseException, message: str) -> None:  # noqa: D102 (the base's)
        super().dial_failed(exc, f"DNS service: {message}" if self._dns else message)

    def client_options_applied(self, applied: AppliedLeg | None) -> None:
        """The outcome of `ApplyClientOptions`: the values read back, or None when the adapter
        cannot set options on the client leg (then none are echoed for it)."""
        self._expect(_Step.CLIENT_OPTIONS)
        self._client_applied = applied
        self._resume = self._authenticate

    def abort(self) -> None:
        """An unexpected error (a bug) ends the connection: queue a General Failure reply if
        one can still go (the D14 form when nothing was sent yet), then a close."""
        self._actions.clear()
        self._resume = None
        wire = self._socks6
        failure = failure_reply(ReplyCode.GENERAL_FAILURE)
        if wire.our_state in _NOTHING_SENT:
            self._push_send(codec.encode_operation_reply(failure), ReplyCode.GENERAL_FAILURE)
        else:
            try:
                self._push_send(self._held + wire.send(failure), ReplyCode.GENERAL_FAILURE)
            except LocalProtocolError:
                pass
        self._close(CLOSE)

    def _end_session(self, now: float) -> Session | None:
        self._step = _Step.DONE
        session, store = self._session, self._ctx.sessions
        if session is None:
            return None
        if store is None:
            if self._ctx.shared_sessions is None:
                return None
            # A shared store: the same two cases, sent by the adapter without waiting.
            if self._new_session and self.reply_code != ReplyCode.SUCCESS:
                self.store_followup = SessionQuery(SessionOp.TEARDOWN, session.session_id)  # D4
                return session
            if self._relayed and now - self._store_time >= SHARED_TOUCH_AFTER:
                self.store_followup = SessionQuery(SessionOp.TOUCH, session.session_id)
            return None
        if self._new_session and self.reply_code != ReplyCode.SUCCESS:
            # The request that would have started the session failed: no session (D4).
            return store.teardown(session.session_id)
        if self._relayed:
            store.touch(session, now)
        return None

    def connection_ended(self, now: float) -> Session | None:  # noqa: D102 (documented in the base)
        self._end_association()
        self._end_limits()
        return self._end_session(now)

    # -- reading -------------------------------------------------------------------------

    def _on_event(self, event: object, now: float) -> None:
        if type(event) is RequestReceived:
            self._on_request(event, now)
        elif type(event) is InitialData:
            self._payload = event.data
            if self._socks6.our_state is State.SEND_OPERATION_REPLY:
                self._operate(now)  # AUTH-06: read after the successful Authentication Reply
            # else: sent before the RFC 1929 request of the slow exchange (D7); read on
        elif type(event) is UserPassRequest:
            self._check(event)  # D7 slow exchange
        elif type(event) is VersionMismatch:
            # REQ-01, D1: exactly one byte, 6, then close.
            self.protocol_name = "mismatch"
            self._push_send(self._socks6.send(VersionMismatchReply()))
            self._close(LINGER_CLOSE)
        else:
            assert type(event) is ConnectionClosed
            self._close(CLOSE)

    def _on_request(self, event: RequestReceived, now: float) -> None:
        self.request = event.request
        self._options = options = event.options
        if options is NO_OPTIONS and not self._ctx.users.required:
            # The common request: no options, no users (AUTH-07, nothing else to decide).
            self._auth_succeeded(None, (), now)
        elif not options.stack.client.empty:
            # STK-03: the client leg's options are set before anything else happens.
            self._push_step(ApplyClientOptions(options.stack.client), _Step.CLIENT_OPTIONS)
        else:
            self._authenticate(now)

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        self.error = str(exc)
        code = exc.reply_code
        if code is not None:
            # D14: the header was readable, answer, then close. Before the Authentication Reply
            # only General Failure works: a client reads the first 4 bytes of the reply as an
            # Authentication Reply, and 06 01 00 00 is Type 1 (failure).
            wire = self._socks6
            if wire.our_state in _NOTHING_SENT:
                code = ReplyCode.GENERAL_FAILURE
            try:
                self._push_send(wire.send(failure_reply(code)), code)
            except LocalProtocolError:
                pass
        self._close(LINGER_CLOSE)

    # -- authentication (section "Authentication") ---------------------------------------

    def _authenticate(self, now: float) -> None:
        options = self._options
        session_id = options.session_id
        if session_id is not None:
            store = self._ctx.sessions
            if store is not None:
                if options.session_teardown:
                    # SES-05: end the session; this request is treated as outside any session.
                    ended = store.teardown(session_id)
                    if ended is not None:
                        self._actions.append(EndSession(ended))
                else:
                    session = store.lookup(session_id, now)
                    if session is None:
                        self._session_invalid()
                        return
                    self._in_session(session, store, now)
                    return
            elif self._ctx.shared_sessions is not None:
                # A shared store answers through the adapter, in one round trip: the lookup,
                # the window request and the token spend in one query (issue 13 item 2).
                if options.session_teardown:
                    query = SessionQuery(SessionOp.TEARDOWN, session_id)
                else:
                    query = SessionQuery(
                        SessionOp.LOOKUP, session_id, token_request=options.token_request, token=options.token
                    )
                self._ask(query)
                return
        self._credentials(now)

    def _credentials(self, now: float) -> None:
        """Authentication outside any session (AUTH-*)."""
        options = self._options
        if not self._ctx.users.required:
            # AUTH-07: authentication is not required: the advertisement is ignored.
            self._authenticated(None, (), now)
        elif options.credentials is not None:
            # AUTH-01 / AUTH-05: 0-RTT username/password in an Authentication Data option.
            self._check(options.credentials)
        elif options.malformed_credentials:
            self._checked = (None, "")
            self._after_credentials(now)
        elif AuthMethod.USERNAME_PASSWORD in (options.advertised_methods or ()):
            # D7 slow exchange: Type 1 selecting method 2; the client answers with a bare RFC
            # 1929 request (after any initial data), we send the RFC 1929 reply and then the
            # second, final Authentication Reply (AUTH-04).
            selection = AuthReply(AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.USERNAME_PASSWORD),))
            self._push_send(self._socks6.send(selection))
        else:
            # AUTH-02: nothing usable and nothing we can negotiate.
            refusal = AuthReply(
                AuthReplyType.FAILURE, (AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),)
            )
            self._refuse(refusal, "authentication required")

    def _session_invalid(self) -> None:
        # SES-03: Type 1 + Session Invalid; no negotiation can follow.
        self._refuse(AuthReply(AuthReplyType.FAILURE, (SessionInvalid(),)), "invalid session")

    def _token_rejected(self) -> None:
        # IDM-03: an ineligible token fails the request.
        self._refuse(AuthReply(AuthReplyType.FAILURE, (IdempotenceRejected(),)), "idempotence token rejected")

    def _in_session(self, session: Session, store: SessionStore, now: float) -> None:
        # SES-02: inside a session no authentication is required; attempts are ignored.
        options = self._options
        if options.token_request is not None:
            store.request_window(session, options.token_request)  # IDM-02: at most one
        if options.token is not None and not store.spend(session, options.token):
            # IDM-03: spent before the request is honoured; an ineligible token fails it.
            self._token_rejected()
            return
        window = session.window.current if session.window is not None else None
        self._session_ok(session, window, now)

    def _session_ok(self, session: Session, window: tuple[int, int] | None, now: float) -> None:
        reply_options: tuple[Option, ...] = (SessionOK(),)
        if self._options.token is not None:
            reply_options += (IdempotenceAccepted(),)
        if window is not None:
            reply_options += (IdempotenceWindow(*window),)  # IDM-02
        self._session = session
        self._auth_succeeded(session.user, reply_options, now)

    # -- a shared session store (issue 13 item 2) -----------------------------------------

    def _ask(self, query: SessionQuery) -> None:
        self._query = query
        self._push_step(AskSessionStore(query), _Step.SESSION)

    def session_answered(self, answer: SessionAnswer) -> None:
        """The outcome of `AskSessionStore`: the store's answer."""
        self._expect(_Step.SESSION)
        self._store_answer = answer
        self._resume = self._after_store

    def session_store_failed(self, message: str) -> None:
        """`AskSessionStore` got no answer (``message`` for the log: unreachable, timed out)."""
        self._expect(_Step.SESSION)
        self._store_answer = message
        self._resume = self._after_store

    def _after_store(self, now: float) -> None:
        query, answer = self._query, self._store_answer
        assert query is not None
        self._store_answer = None
        self._store_time = now
        if query.op is SessionOp.CREATE:
            user, reply_options = self._pending_auth
            if isinstance(answer, SessionAnswer) and answer.session is not None:
                self._session, self._new_session = answer.session, True
                if answer.window is not None:
                    reply_options += (IdempotenceWindow(*answer.window),)
            # else: a cap, or the store did not answer: the Session Request is declined
            # silently (section "Session initiation"); the request itself needs no session.
            self._auth_succeeded(user, reply_options, now)
            return
        if not isinstance(answer, SessionAnswer):
            # D37: the request needs the store and got no answer. Nothing is known about the
            # session or the token, so neither Session Invalid (the session may be fine) nor
            # Idempotence Rejected: General Failure, in the D14 form (its first 4 bytes read as
            # an Authentication Reply of Type 1 without options: failed, no further negotiation).
            self.error = f"session store: {answer}"
            failure = codec.encode_operation_reply(failure_reply(ReplyCode.GENERAL_FAILURE))
            self._push_send(failure, ReplyCode.GENERAL_FAILURE)
            self._close(LINGER_CLOSE)
            return
        session = answer.session
        if query.op is SessionOp.TEARDOWN:
            # SES-05: ended everywhere; this request is treated as outside any session.
            if session is not None:
                self._actions.append(EndSession(session))
            self._credentials(now)
        elif session is None:
            self._session_invalid()
        elif query.token is not None and not answer.spent:
            self._token_rejected()
        else:
            self._session_ok(session, answer.window, now)

    def _after_credentials(self, now: float) -> None:
        user, reason = self._checked
        status = UserPassStatus.SUCCESS if user is not None else UserPassStatus.FAILURE
        wire = self._socks6
        if wire.our_state is State.SEND_USERPASS_REPLY:
            # D7: the RFC 1929 reply, then the second Authentication Reply (AUTH-04).
            self._push_send(wire.send(UserPassReply(status)))
            if user is None:
                self._refuse(AuthReply(AuthReplyType.FAILURE), reason or "authentication failed")
            else:
                self._authenticated(user, (), now)
            return
        # AUTH-05: the RFC 1929 reply goes into an Authentication Data option of the reply.
        reply_options: tuple[Option, ...] = (
            AuthData(AuthMethod.USERNAME_PASSWORD, encode_userpass_reply(UserPassReply(status))),
        )
        if user is None:
            reply_options += (AuthMethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS),)
            self._refuse(AuthReply(AuthReplyType.FAILURE, reply_options), reason or "authentication failed")
        else:
            self._authenticated(user, reply_options, now)

    def _authenticated(self, user: str | None, reply_options: tuple[Option, ...], now: float) -> None:
        """Authentication is done (or not needed): start a session if one was asked for."""
        options = self._options
        store = self._ctx.sessions
        if options.session_request and options.session_id is None and self._ctx.shared_sessions is not None:
            # SES-01 with a shared store: asked through the adapter (one round trip).
            self._pending_auth = (user, reply_options)
            self._ask(
                SessionQuery(
                    SessionOp.CREATE, user=user, client_ip=self.client_ip, token_request=options.token_request
                )
            )
            return
        if options.session_request and options.session_id is None and store is not None:
            # SES-01: the session starts with this request; its ID goes into the successful
            # Operation Reply (D4). Hitting a cap declines silently (None).
            new = store.create(user, self.client_ip, now)
            if new is not None:
                self._session, self._new_session = new, True
                if options.token_request is not None:
                    store.request_window(new, options.token_request)
                if new.window is not None:
                    reply_options += (IdempotenceWindow(*new.window.current),)
        self._auth_succeeded(user, reply_options, now)

    def _auth_succeeded(self, user: str | None, reply_options: tuple[Option, ...], now: float) -> None:
        self.user = user
        wire = self._socks6
        data = wire.send(AuthReply(AuthReplyType.SUCCESS, reply_options) if reply_options else _AUTH_SUCCESS)
        if self._options.advertised_methods is None and wire.their_state is State.DATA:
            # Without an advertisement the client does not wait for this reply before sending
            # data (section "False Starts"): it leaves with the Operation Reply, in one write.
            self._held = data
        else:
            self._push_send(data)
        if wire.their_state is State.SEND_INITIAL_DATA:
            return  # AUTH-06: the initial data is read now, and forwarded only once connected
        self._operate(now)

    def _refuse(self, reply: AuthReply, why: str) -> None:
        self.error = why
        self._push_send(self._socks6.send(reply))
        self._close(LINGER_CLOSE)

    # -- the operation (section "Requests", "Operation Replies") --------------------------

    def _operate(self, now: float) -> None:
        request = self.request
        assert request is not None
        command = request.command
        if not isinstance(command, Command):
            # A Command Code we do not know (the codec passes it as a plain int) is answered
            # after the normal authentication flow, like any unsupported command (CMD-06).
            self._fail(ReplyCode.COMMAND_NOT_SUPPORTED, f"unknown command {command:#04x}")
            return
        if command == Command.NOOP and not noop_address_ok(request):
            # REQ-04, D11
            self._fail(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, "NOOP needs address 0 and port 0 (IPv4 or IPv6)")
            return
        allowed, rule = self._ctx.policy.decide(
            self.client_ip,
            self.user,
            command,
            request.address_type,
            request.address,
            request.port,
            dns_service=is_dns_request(request),  # D13: to the resolver, not to 0.0.0.0
        )
        if not allowed:
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, _denied_by(rule))  # CMD-06
        elif not self._admit(now):
            pass  # over a limit of its user or its address: refused (issue 14 item 4)
        elif command == Command.NOOP:
            # STK-01: the client-leg options were applied and are echoed.
            echo = echo_stack_options(self._options.stack, client=self._client_applied)
            reply = OperationReply(
                ReplyCode.SUCCESS, AddressType.IPV4, "0.0.0.0", 0, echo + self._session_id()
            )
            self._reply(reply)
            self._close(LINGER_CLOSE)
        elif command == Command.CONNECT:
            self._connect6(request, now)
        elif command == Command.BIND:
            self._bind6(request)
        else:
            self._associate6(request)

    def _session_id(self) -> tuple[Option, ...]:
        session = self._session
        if self._new_session and session is not None:
            return (SessionID(session.session_id),)  # SES-01, D4
        return ()

    def _reply(self, reply: OperationReply) -> None:
        data = self._socks6.send(reply)
        if self._held:
            data, self._held = self._held + data, b""
        self._push_send(data, reply.reply_code)

    def _fail(self, code: ReplyCode, cause: str, *, echo: bool = True) -> None:
        self.error = cause
        # "Proxies ... MUST [include Stack options in their Operation Replies] for every
        # supported Stack option sent by the client" (draft-11, "Stack Options"; STK-01, D9)
        # says nothing to exempt failures. The client leg's options were applied before the
        # operation failed, so they are echoed with their read-back values; the proxy-remote
        # leg never came to be, so nothing is claimed for it.
        options = echo_stack_options(self._options.stack, client=self._client_applied) if echo else ()
        self._reply(failure_reply(code, options))
        self._close(LINGER_CLOSE)

    def _connect6(self, request: Request, now: float) -> None:
        plan = self._options.stack
        trailing, client_eof = self._socks6.trailing_data
        # Initial data (AUTH-06) comes first on the wire, then what was sent after it.
        payload = self._payload = self._payload + trailing
        self._client_eof = client_eof
        if is_dns_request(request):
            self._dns = True
            # D13 / CMD-07: relay DNS over TCP (RFC 7766 framing passes through unchanged) to
            # the configured resolver, with no Stack options on that leg.
            resolver = self._ctx.dns_resolver
            if resolver is None:
                self._fail(ReplyCode.CONNECTION_REFUSED, "DNS service: no server.dns_resolver configured")
                return
            host, port = resolver
            self._connect(Dial(_address_type_of(host), host, port, now + self._ctx.connect_timeout))
            return
        deadline = now + self._ctx.connect_timeout
        if self._options is NO_OPTIONS:  # the common request: nothing but the destination
            self._connect(Dial(request.address_type, request.address, request.port, deadline))
            return
        tfo_payload = b""
        if plan.tfo_payload_size is not None:
            # STK-06: "MUST NOT use a payload size larger than the one indicated" (0: any).
            tfo_payload = payload[: plan.tfo_payload_size] if plan.tfo_payload_size else payload
        dial = Dial(
            request.address_type,
            request.address,
            request.port,
            deadline,
            options=plan.remote,
            multipath=plan.multipath == Availability.DESIRED,
            # STK-04: Happy Eyeballs only for a domain name, and only when asked.
            happy_eyeballs=(
                request.address_type == AddressType.DOMAIN_NAME
                and plan.happy_eyeballs == Availability.DESIRED
            ),
            tfo_payload=tfo_payload,
        )
        self._connect(dial)

    def _on_dialed(self, dialed: Dialed) -> None:
        request, options = self.request, self._options
        assert request is not None
        plan = options.stack
        if options is NO_OPTIONS and not self._dns:
            # The common request: no Stack option to echo (STK-01), no session to name (D4).
            host, port = dialed.local
            address_type = AddressType.IPV6 if ":" in host else AddressType.IPV4
            reply = OperationReply(ReplyCode.SUCCESS, address_type, host, port)
        elif self._dns:
            # D13: the reply carries the unspecified address and port 0; STK-01, D9: the
            # client-leg options were applied, the resolver leg gets none.
            echo = echo_stack_options(plan, client=self._client_applied)
            unspecified = _UNSPECIFIED.get(request.address_type, "0.0.0.0")
            reply = OperationReply(
                ReplyCode.SUCCESS, request.address_type, unspecified, 0, echo + self._session_id()
            )
        else:
            happy: Availability | None = None
            if request.address_type == AddressType.DOMAIN_NAME:
                dial = self._dial
                assert dial is not None
                happy = Availability.DESIRED if dial.happy_eyeballs else Availability.NOT_DESIRED
            echo = echo_stack_options(
                plan,
                client=self._client_applied,
                remote=dialed.applied,
                happy_eyeballs=happy,
                tfo_payload_size=dialed.syn_sent if dialed.syn_data_acked else 0,
                multipath=_multipath(dialed.mptcp),
            )
            host, port = dialed.local
            reply = OperationReply(
                ReplyCode.SUCCESS, _address_type_of(host), host, port, echo + self._session_id()
            )
        self._reply(reply)
        self._relay_bytes(self._payload[dialed.syn_sent :], self._client_eof)

    def _low_port(self, request: Request) -> bool:
        """Refuse a BIND / UDP ASSOCIATE naming a port below ``min_bind_port`` (D25).

        The Request's port is the port the proxy binds for these commands (section
        "Requests"). Run as root or with CAP_NET_BIND_SERVICE (the systemd unit grants it
        for a listener below 1024), the proxy could otherwise bind 22 or 53 on a client's
        word and receive what was meant for that service. Port 0 asks for no particular
        port and is always allowed. True when refused (the reply is queued).
        """
        floor = self._ctx.min_bind_port
        if 0 < request.port < floor:
            self._fail(
                ReplyCode.NOT_ALLOWED_BY_RULESET,
                f"port {request.port} is below min_bind_port {floor} (D25)",
            )
            return True
        return False

    def _bind6(self, request: Request) -> None:
        if request.address_type == AddressType.DOMAIN_NAME:
            self._fail(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, "BIND to a domain name is not supported")
            return
        if is_multicast(request.address_type, request.address):
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, f"{request.address} is multicast: UDP only (UDP-08)")
            return
        if self._low_port(request):
            return
        plan = self._options.stack
        session = self._session
        if session is not None:
            # CMD-05: a further BIND of the same session naming a backlog listener's address.
            listener = session.listeners.get((request.address, request.port))
            if listener is not None:
                self._push_step(Claim(listener, plan.remote), _Step.LISTEN)
                return
        backlog = 0
        if plan.listen_backlog is not None and session is not None:
            # "The proxy SHOULD NOT use a backlog longer than requested" (CMD-05).
            backlog = min(plan.listen_backlog, MAX_BIND_BACKLOG)
        self._listen_backlog = backlog
        listen = Listen(
            request.address_type,
            request.address,
            request.port,
            # draft-11 section "Requests" (BIND fields): "If the client does not require a
            # certain address, it can set the Address Type field to 0x01 (IPv4) or 0x04
            # (IPv6), and the Address field to 0". So an unspecified address means "no
            # particular address", not "every interface": bind where the client reached us
            # (the address it can tell the remote host, RFC 1928 BIND semantics), so a proxy
            # listening on loopback never opens a listener on other interfaces (CMD-04).
            near_client=ipaddress.ip_address(request.address).is_unspecified,
            options=plan.remote,
            multipath=plan.multipath == Availability.DESIRED,
            tfo=plan.tfo_payload_size is not None,  # STK-06: BIND accepts TFO only when asked
            backlog=backlog,
            session=session if backlog else None,
        )
        self._push_step(listen, _Step.LISTEN)

    def _on_listening(self, listening: Listening) -> None:
        # STK-01 / D9: every supported Stack option, read back from the listening socket (a
        # claimed listener too: its options are what accepted connections get). Multipath says
        # "whether an MPTCP connection will be accepted, when first replying to a BIND
        # command"; the TFO option has no field for "not accepted", so it is echoed only when
        # the listener accepts TFO (the payload size is "ignored in case of a BIND command").
        # The backlog is the one granted, 0 without one (CMD-05) or for a claim.
        echo = echo_stack_options(
            self._options.stack,
            client=self._client_applied,
            remote=listening.applied,
            tfo_payload_size=0 if listening.tfo else None,
            multipath=_multipath(listening.mptcp),
            listen_backlog=self._listen_backlog,
        )
        host, port = listening.local
        self._reply(
            OperationReply(ReplyCode.SUCCESS, _address_type_of(host), host, port, echo + self._session_id())
        )
        if self._listen_backlog:
            # "the proxy listens for incoming connections for as long as the initial connection
            # stays open. The initial connection is not used to relay data." The other way
            # round too: when the session ends (Session Teardown, idle expiry) and closes the
            # listener, the initial connection is closed ("the proxy MAY close all connections
            # associated with said session"), so an open initial connection always means a
            # listening proxy (CMD-05).
            self._actions.append(HOLD_BACKLOG)
            self._close(CLOSE)
        else:
            self._push_step(AWAIT_PEER, _Step.PEER)

    def _on_peer(self, host: str, port: int, mptcp: bool) -> None:
        # CMD-04: the second reply names the host that connected; then data flows.
        multipath = self._options.stack.multipath
        options: tuple[Option, ...] = ()
        if multipath is not None:
            # "whether or not the connection uses MPTCP ... in the second Operation reply"
            options = echo_stack_options(StackPlan(multipath=multipath), multipath=_multipath(mptcp))
        self._reply(OperationReply(ReplyCode.SUCCESS, _address_type_of(host), host, port, options))
        self._relay()

    # -- UDP ASSOCIATE (section "Handling UDP ASSOCIATE") --------------------------------

    def _associate6(self, request: Request) -> None:
        if request.address_type == AddressType.DOMAIN_NAME:
            self._fail(
                ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, "UDP ASSOCIATE to a domain name is not supported"
            )
            return
        if is_multicast(request.address_type, request.address):
            # "The use of multicast addresses is permitted for UDP traffic only": as
            # destinations, yes (UDP-08). A multicast *bind* address would ask the proxy to
            # join the group for the client, which we do not do; granting it would report
            # Success for an association that can never receive (see docs/decisions.md D23).
            self._fail(
                ReplyCode.NOT_ALLOWED_BY_RULESET,
                f"{request.address} is multicast: the proxy does not join groups for UDP ASSOCIATE",
            )
            return
        if self._low_port(request):
            return
        plan = self._options.stack
        family = 6 if request.address_type == AddressType.IPV6 else 4
        parity = plan.port_parity
        claim: object | None = None
        table = self._ctx.associations
        if request.port != 0 and table is not None:
            # STK-08: "An association involving a reserved port can only be made if a client
            # explicitly requests said port", and from the same session when the original
            # association is part of one.
            reservation = table.reservation(family, request.port)
            if reservation is None and ipaddress.ip_address(request.address).is_unspecified:
                # "No particular address": the socket is bound near the client, whose family
                # the request's address type need not match.
                reservation = table.reservation(6 if family == 4 else 4, request.port)
            if reservation is not None:
                owner, own = reservation.session, self._session
                if owner is not None and (own is None or owner.session_id != own.session_id):
                    self._fail(
                        ReplyCode.GENERAL_FAILURE,
                        f"port {request.port} is reserved for an association of another session (STK-08)",
                    )
                    return
                table.claim(reservation)
                claim = reservation.handle
        # STK-08: "If the UDP ASSOCIATE request does not have the Port field set to 0 ..., the
        # proxy MUST ignore the suggested parity."
        wanted = parity.parity if parity is not None and request.port == 0 else Parity.NONE
        action = OpenAssociation(
            request.address_type,
            request.address,
            request.port,
            # As for BIND: an unspecified address asks for no particular address, so bind
            # where the client reached us (draft-11 "Requests"; never every interface).
            near_client=ipaddress.ip_address(request.address).is_unspecified,
            options=plan.remote,
            parity=int(wanted),
            reserve=bool(parity is not None and parity.reserve and wanted != Parity.NONE),
            claim=claim,
        )
        self._open_association(action)

    def _on_association(self, opened: OpenedAssociation) -> None:
        association_id = self._association
        assert association_id is not None
        plan = self._options.stack
        table = self._ctx.associations
        if opened.reserved is not None and table is not None:
            family = 6 if ":" in opened.local[0] else 4
            table.reserve(
                Reservation(family, opened.reserved_port, opened.reserved, association_id, self._session)
            )
        # UDP-09 / D9: the UDP Error option is echoed with what will be done; Error messages
        # are sent exactly when the client asked for them.
        udp_error = plan.udp_error == Availability.DESIRED
        parity: PortParityOption | None = None
        if plan.port_parity is not None:
            # STK-08 / D9: the parity obtained; "If the proxy can not or will not comply with
            # the requested parity, it also does not reserve the allocated port's counterpart."
            obtained = plan.port_parity.parity if opened.parity else Parity.NONE
            parity = PortParityOption(StackLeg.PROXY_REMOTE, obtained, opened.reserved is not None)
        echo = echo_stack_options(
            plan,
            # "In case of UDP ASSOCIATE, the stack options refer to the UDP traffic relayed by
            # the proxy" (draft-11 "Stack Options"). Client-proxy leg IP options were applied
            # to the TCP connection only, not to the datagrams the shared UDP port sends the
            # client, so none is claimed (D9: echo what is actually applied; STK-01).
            client=None,
            remote=opened.applied,
            udp_error=Availability.DESIRED if udp_error else Availability.NOT_DESIRED,
            port_parity=parity,
        )
        host, port = opened.local
        reply = OperationReply(
            ReplyCode.SUCCESS, _address_type_of(host), host, port, echo + self._session_id()
        )
        # UDP-01: the Association Initialization follows the successful Operation Reply. The
        # data plane writes both, once the association is in its table, so a datagram the
        # client sends as soon as it reads the ID is never "unknown".
        held, self._held = self._held, b""
        data = (
            held
            + self._socks6.send(reply)
            + codec.encode_association_message(AssociationInit(association_id))
        )
        # If the data plane cannot take it after all, a General Failure goes instead, echoing
        # the client leg's options as every failure does (STK-01, see `_fail`).
        failure = failure_reply(
            ReplyCode.GENERAL_FAILURE, echo_stack_options(plan, client=self._client_applied)
        )
        self.reply_code = ReplyCode.SUCCESS
        pending, _eof = self._socks6.trailing_data
        self._actions.append(
            Associate(
                association_id,
                data,
                pending,
                udp_error,
                socks5=False,
                refusal=held + codec.encode_operation_reply(failure),
            )
        )
        self._step = _Step.DONE
        self._relayed = True


def server_connection(
    context: ServerContext, client_ip: str, data: bytes, now: float
) -> ServerConnection | Socks5ServerConnection:
    """The connection for a client whose first bytes are ``data``: the first byte decides (D1).

    A 5 starts a `Socks5ServerConnection`; anything else a `ServerConnection` (which answers a
    byte other than 6 with the Version Mismatch Reply, REQ-01).
    """
    conn: ServerConnection | Socks5ServerConnection
    if detect_protocol(data[0]) is Protocol.SOCKS5:
        conn = Socks5ServerConnection(context, client_ip, now)
    else:
        conn = ServerConnection(context, client_ip, now)
    conn.receive_data(data)
    return conn
