"""What a client does around its `ClientConnection`, written once for both flavours (sans-IO).

Strategy: `ClientConnection` judges the bytes of one request; a client also has to act
around it: wait while another request is initiating the session, NOOP first when a token
is wanted and no window is known yet, build the Request (credentials only outside a
session), open a channel to the proxy, write the first flight (split for TCP Fast Open,
TRN-02), read until the reply that ends the handshake, retry once in a new session after
Session Invalid, close after a NOOP (REQ-10). Those steps are the same for the blocking
and the asyncio client, so they live here once, as generators that *yield actions*
(`Open`, `Write`, `Read`, `Close`, `AwaitSession`, `SessionSettled`) and are sent each
action's result. Nothing here blocks, reads a clock or opens a socket (h11, aioquic:
``QuicConnection`` decides, ``asyncio/protocol.py`` only performs; websockets' sans-IO
``Protocol`` parses with generators for the same reason).

An adapter drives a flow with `Steps`, performing each action its own way::

    steps = Steps(request(...), guard=session_lock)
    for action in steps:
        try:
            steps.result = perform(action)      # asyncio: await perform(action)
        except BaseException as exc:            # thrown into the flow: it closes what it
            steps.error = exc                   # opened, may retry, else re-raises
    channel, conn = steps.value

A channel is whatever the adapter's `Open` returns (a socket, a pair of streams); flows
only hand it back in later actions. The adapter must drive a flow to its end: errors are
thrown in, never dropped, so that the flow closes its channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeAlias, TypeVar

from ..constants import Command
from ..errors import AuthenticationError, RemoteProtocolError, Socks6Error
from .client import (
    NEED_DATA,
    ClientConnection,
    ClientSession,
    ClientState,
    SessionState,
    build_request,
    raise_reset,
    tfo_syn_may_carry_data,
)
from .client_udp import AssociationEnded, ClientAssociation
from .messages import AssociationInit, OperationReply, Option, SessionRequest
from .socks5 import UserPassRequest

__all__ = [
    "Action",
    "AwaitSession",
    "Close",
    "Flow",
    "Open",
    "Read",
    "SessionSettled",
    "Steps",
    "Write",
    "accept",
    "association_init",
    "read_replies",
    "request",
]

C = TypeVar("C")
"""The adapter's channel type."""
T = TypeVar("T")

#: States in which the first Operation Reply ends a request's handshake.
_FIRST_REPLY: Final = frozenset(
    {ClientState.ESTABLISHED, ClientState.MUST_CLOSE, ClientState.AWAIT_BIND_PEER}
)
#: BIND: the second Operation Reply (the peer connected).
_PEER_REPLY: Final = frozenset({ClientState.ESTABLISHED})


# --- Actions ------------------------------------------------------------------------------
# Slotted, not frozen: one is built on every step of every request, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs about 4 times as much.


@dataclass(slots=True)
class Open:
    """Open a channel to the proxy (TCP, and TLS for ``socks6+tls``); result: the channel."""

    tfo: bool
    """Connect with TCP Fast Open (the first `Write` may ride in the SYN)."""


@dataclass(slots=True)
class Write(Generic[C]):
    """Write all of ``data`` to the channel; result: None."""

    channel: C
    """The channel."""
    data: bytes
    """The bytes (never empty)."""


@dataclass(slots=True)
class Read(Generic[C]):
    """Read up to ``size`` bytes; result: the bytes, ``b""`` at EOF."""

    channel: C
    """The channel."""
    size: int
    """At most this many bytes: no more than the current reply still needs, so the
    bytes that follow the last reply stay in the channel for the application."""


@dataclass(slots=True)
class Close(Generic[C]):
    """Close the channel; result: None."""

    channel: C
    """The channel."""


@dataclass(slots=True)
class AwaitSession:
    """Wait until `SessionSettled` (or a timeout); result: None.

    The flow saw its session PENDING: another request carries the Session Request, and
    requests must wait for its outcome (SES-06: no second Session Request). The flow
    looks at the state again afterwards, so a spurious wake-up is harmless.
    """


@dataclass(slots=True)
class SessionSettled:
    """Wake every request waiting in `AwaitSession`; result: None."""


Action: TypeAlias = Open | Write[C] | Read[C] | Close[C] | AwaitSession | SessionSettled
"""What a flow yields."""
Flow: TypeAlias = Generator[Action[C], Any, T]
"""A flow over channels of type C that ends with a T."""


class Steps(Generic[C, T]):
    """Drive a flow: iterate for its actions, and report each one's outcome in between.

    Before the next iteration set `result` (what the action gave) or `error` (what
    performing it raised: it is thrown into the flow). Once the iteration stops, `value`
    is what the flow returned; an exception the flow raises leaves the loop.

    Args:
        flow: the generator, not started yet.
        guard: a context manager held while the flow runs (not while actions are
            performed): the blocking client's Session lock, so that everything the flow
            reads and changes in a shared `ClientSession` happens under it.
    """

    def __init__(
        self, flow: Flow[C, T], guard: contextlib.AbstractContextManager[object] | None = None
    ) -> None:
        self._flow = flow
        self._guard = guard
        self._done = False
        self._value: T  # set when the flow returns
        self.result: Any = None
        """What the last action gave (sent into the flow)."""
        self.error: BaseException | None = None
        """What performing the last action raised (thrown into the flow)."""

    def __iter__(self) -> Iterator[Action[C]]:
        return self

    def __next__(self) -> Action[C]:
        try:
            if self._guard is None:
                return self._resume()
            with self._guard:
                return self._resume()
        except StopIteration as stop:
            self._done, self._value = True, stop.value
            raise StopIteration from None

    def _resume(self) -> Action[C]:
        result, error = self.result, self.error
        self.result = self.error = None
        return self._flow.send(result) if error is None else self._flow.throw(error)

    @property
    def value(self) -> T:
        """What the flow returned."""
        if not self._done:
            raise RuntimeError("the flow has not ended")
        return self._value


# --- Flows --------------------------------------------------------------------------------


def request(
    command: Command,
    host: str,
    port: int,
    *,
    credentials: UserPassRequest | None,
    tls: bool,
    session: ClientSession | None = None,
    initial_data: bytes = b"",
    options: Iterable[Option] = (),
    idempotent: bool = False,
    tfo: bool = False,
) -> Flow[C, tuple[C, ClientConnection]]:
    """One request through the proxy, until the reply that ends its handshake.

    Args:
        command: the Command Code.
        host: destination (CONNECT) or desired bind address (BIND); see
            `socks6fast.proto.client.address_of`.
        port: destination or desired bind port.
        credentials: the proxy URL's username and password, or None. Sent (0-RTT, AUTH-01)
            only when the request does not belong to an active session.
        tls: the channel is TLS (``socks6+tls``): the TFO SYN carries the ClientHello, so
            the first flight is not split.
        session: the session the request joins (its options, its wait, its retry).
        initial_data: application data sent with the Request (CONNECT; CMD-03).
        options: further options (Stack options; for a NOOP, Session Teardown).
        idempotent: spend an idempotence token (IDM-05); needs ``session``.
        tfo: open the channel with TCP Fast Open.

    Returns:
        ``(channel, conn)`` when the flow ends: the open channel (closed after a NOOP,
        REQ-10) and the `ClientConnection` with every reply.

    Raises:
        ValueError: ``idempotent`` without a session.
        Socks6Error: the proxy declined the session that a token needs.
        ProxyError, AuthenticationError, VersionMismatchError, RemoteProtocolError: from
            `ClientConnection`; and whatever performing an action raised.
    """
    if idempotent and session is None:
        raise ValueError("idempotent=True needs a session (idempotence tokens live in sessions)")
    options = tuple(options)
    # Session Invalid comes in the first Authentication Reply, before the proxy acts on
    # the request (section "Further SOCKS Requests"): retrying once in a fresh session
    # is safe.
    attempts = 2 if session is not None else 1
    for attempt in range(attempts):
        session_options: tuple[Option, ...] = ()
        if session is not None:
            session_options = yield from _join(session, idempotent, credentials, tls)
        initiator = any(isinstance(o, SessionRequest) for o in session_options)
        # Inside an active session the Session ID stands for the credentials (SES-02).
        own_credentials = credentials if session is None or session.needs_credentials else None
        conn = ClientConnection(session=session, credentials=own_credentials)
        message = build_request(
            command,
            host,
            port,
            credentials=own_credentials,
            initial_data_length=len(initial_data),
            options=(*session_options, *options),
        )
        channel: C | None = None
        try:
            channel = yield Open(tfo)
            flight = conn.send(message, initial_data)
            if tfo and not tls and not tfo_syn_may_carry_data(spends_token=conn.spends_token):
                # TRN-02: only the Request rides in the SYN; the initial data follows it.
                yield from _write(channel, flight[: conn.request_size], flight[conn.request_size :])
            else:
                yield from _write(channel, flight)
            yield from read_replies(channel, conn)
        except AuthenticationError:
            if channel is not None:
                yield Close(channel)
            if conn.session_invalid and attempt + 1 < attempts:
                continue
            raise
        except BaseException:
            if channel is not None:
                yield Close(channel)
            raise
        finally:
            if session is not None:
                yield from _leave(session, initiator)
        if conn.state is ClientState.MUST_CLOSE:
            yield Close(channel)  # REQ-10: a NOOP was answered
        return channel, conn
    raise AssertionError("unreachable")  # pragma: no cover


def accept(channel: C, conn: ClientConnection) -> Flow[C, None]:
    """BIND: read the second Operation Reply (CMD-04); the channel then carries the peer's data.

    Raises:
        ProxyError: the proxy reported a failure instead of a peer (the channel is closed).
    """
    try:
        yield from read_replies(channel, conn, peer=True)
    except BaseException:
        yield Close(channel)
        raise


def association_init(channel: C, conn: ClientConnection, assoc: ClientAssociation) -> Flow[C, None]:
    """UDP ASSOCIATE: read the Association Initialization that follows the Operation Reply.

    Reads exactly what the message needs, so the TCP connection holds nothing of the
    association's later messages for the adapter to lose. The bytes the reply reading
    took past the Operation Reply (``conn.trailing_data``) go into ``assoc`` first. The
    channel is closed if this fails.

    Raises:
        RemoteProtocolError: the proxy sent something else, or closed the connection
            (UDP-01: the Initialization must follow a successful Operation Reply).
    """
    try:
        trailing, eof = conn.trailing_data
        if trailing:
            assoc.receive_data(trailing)
        if eof:
            assoc.receive_data(b"")
        while True:
            event = assoc.next_event()
            if isinstance(event, AssociationInit):
                return
            if isinstance(event, AssociationEnded):
                raise RemoteProtocolError(
                    "the proxy closed the connection instead of initializing the association (UDP-01)", None
                )
            try:
                data = yield Read(channel, assoc.bytes_needed)
            except ConnectionResetError as exc:
                raise RemoteProtocolError(
                    "the proxy reset the connection before the association began", None
                ) from exc
            assoc.receive_data(data)
    except BaseException:
        yield Close(channel)
        raise


def read_replies(channel: C, conn: ClientConnection, *, peer: bool = False) -> Flow[C, None]:
    """Read replies (and write what the core answers, D7) until the handshake is over.

    The loop of `socks6fast.proto.client`'s module docstring. A reset while reading is
    judged like EOF (`raise_reset`).

    Args:
        peer: wait for BIND's second Operation Reply instead of the first one.
    """
    stop = _PEER_REPLY if peer else _FIRST_REPLY
    while True:
        event = conn.next_event()
        out = conn.data_to_send()
        if out:
            yield from _write(channel, out)
        if event is NEED_DATA:
            try:
                data = yield Read(channel, conn.bytes_needed)
            except ConnectionResetError as exc:
                raise_reset(conn, exc)
            conn.receive_data(data)
        elif isinstance(event, OperationReply) and conn.state in stop:
            return


def _write(channel: C, *chunks: bytes) -> Flow[C, None]:
    try:
        for chunk in chunks:
            if chunk:
                yield Write(channel, chunk)
    except (BrokenPipeError, ConnectionResetError):
        # The proxy answered and closed while we were still writing (a long first flight
        # of false-start data, or a late RFC 1929 request), so its close became a reset.
        # What it sent first (a Version Mismatch Reply, REQ-02, or a refusal) is still to
        # be read, and that read ends at once, in a typed error (raise_reset).
        pass


def _join(
    session: ClientSession, idempotent: bool, credentials: UserPassRequest | None, tls: bool
) -> Flow[C, tuple[Option, ...]]:
    # The session and token options of the next request, once the session allows one.
    while True:
        state = session.state
        if state is SessionState.PENDING:
            yield AwaitSession()
        elif idempotent and state is SessionState.NEW:
            # A token needs a window, which needs an established session: NOOP first.
            yield from request(Command.NOOP, "0.0.0.0", 0, credentials=credentials, tls=tls, session=session)
            if session.state is SessionState.DECLINED:
                raise Socks6Error("the proxy declined the session: no idempotence tokens")
        else:
            return session.request_options(idempotent=idempotent)


def _leave(session: ClientSession, initiator: bool) -> Flow[C, None]:
    if initiator and session.state is SessionState.PENDING:
        # The initiating request ended before its Operation Reply (error, timeout).
        session.on_initiation_done(succeeded=False)
    if session.state is not SessionState.PENDING:
        yield SessionSettled()
