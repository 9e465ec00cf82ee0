"""The steps of a client request (socks6fast.proto.client_flow), with no sockets.

A `ScriptedProxy` performs the flow's actions: each channel it opens answers with scripted
bytes (STYLE.md section 7: the peer as byte chunks), and it records every action. Both
client flavours perform these same flows (tests/test_client_e2e.py runs them over real
sockets); here each rule is checked once, in memory. A test that proves a requirement of
docs/conformance.md carries its ID in a conformance marker.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest

import socks6fast.asyncio.client as aclient
import socks6fast.client as bclient
from socks6fast.constants import Command, ReplyCode, StackLeg
from socks6fast.errors import AuthenticationError, ProxyError, Socks6Error, VersionMismatchError
from socks6fast.proto import codec
from socks6fast.proto.client import ClientConnection, ClientSession, ClientState, SessionState
from socks6fast.proto.client_flow import (
    Action,
    AwaitSession,
    Close,
    Flow,
    Open,
    Read,
    SessionSettled,
    Steps,
    Write,
    accept,
    request,
)
from socks6fast.proto.messages import (
    AuthData,
    AuthMethodAdvertisement,
    IdempotenceExpenditure,
    IdempotenceRequest,
    Request,
    SessionID,
    SessionRequest,
    TTLOption,
)
from socks6fast.proto.socks5 import UserPassRequest


def hx(*fields: str) -> bytes:
    """Join annotated hex fields (spaces allowed) into bytes."""
    return bytes.fromhex("".join(fields).replace(" ", ""))


ALICE = UserPassRequest(b"alice", b"s3cret")
AUTH_OK = hx("06", "00", "0000")  # Authentication Reply: version 6, Type 0 (success), no options
OP_OK = hx("06 00 0000", "04d2", "00", "01", "7f000001")  # Operation Reply: Success, 127.0.0.1:1234
OP_REFUSED = hx("06 05 0000", "0000", "00", "01", "00000000")  # Reply Code 5: connection refused
SESSION_INVALID = hx("06 01 0004", "0009 0004")  # Type 1 + Session Invalid (Kind 9, Length 4)
AUTH_OK_SESSION_WINDOW = hx(
    "06 00 0014",  # Authentication Reply, Type 0, Options Length 20
    "0006 0008 4e455731",  # Session ID "NEW1"
    "000c 000c 0000000a 00000004",  # Idempotence Window: base 10, size 4
)


@dataclass
class ScriptedProxy:
    """Performs a flow's actions against scripted channels: the n-th `Open` gets the n-th
    answer (bytes, then EOF; an exception instead of a read or write raises it)."""

    answers: list[list[bytes | BaseException]]
    write_errors: dict[int, BaseException] = field(default_factory=dict)
    actions: list[Action[int]] = field(default_factory=list)
    written: dict[int, list[bytes]] = field(default_factory=dict)
    on_await_session: list[ClientSession] = field(default_factory=list)

    def run(
        self, flow: Flow[int, object], guard: contextlib.AbstractContextManager[object] | None = None
    ) -> object:
        steps = Steps(flow, guard)
        for action in steps:
            self.actions.append(action)
            try:
                steps.result = self._perform(action)
            except BaseException as exc:
                steps.error = exc
        return steps.value

    def _perform(self, action: Action[int]) -> object:
        match action:
            case Open():
                channel = len(self.written)
                self.written[channel] = []
                return channel
            case Write(channel, data):
                if channel in self.write_errors:
                    raise self.write_errors.pop(channel)
                self.written[channel].append(data)
            case Read(channel, size):
                script = self.answers[channel]
                if not script:
                    return b""
                if isinstance(script[0], BaseException):
                    raise script.pop(0)
                chunk, script[0] = script[0][:size], script[0][size:]
                if not script[0]:
                    script.pop(0)
                return chunk
            case AwaitSession():
                # Another request's initiation settles while this one waits.
                session = self.on_await_session.pop(0)
                session.on_session_id(b"SEEN")
        return None

    def requests(self, channel: int) -> Request:
        """The Request the client wrote on a channel."""
        request, _ = codec.decode_request(b"".join(self.written[channel]), 0)
        assert request is not None
        return request

    def kinds(self) -> list[str]:
        return [type(a).__name__ for a in self.actions]


def run(
    proxy: ScriptedProxy,
    command: Command = Command.CONNECT,
    *,
    credentials: UserPassRequest | None = None,
    tls: bool = False,
    **kwargs: Any,
) -> tuple[int, ClientConnection]:
    """`request` (to 192.0.2.1:80) through the scripted proxy."""
    host, port = ("0.0.0.0", 0) if command is Command.NOOP else ("192.0.2.1", 80)
    flow: Flow[int, tuple[int, ClientConnection]] = request(
        command, host, port, credentials=credentials, tls=tls, **kwargs
    )
    result = proxy.run(flow)
    assert isinstance(result, tuple)
    return result


def active_session(window: tuple[int, int] | None = (10, 4)) -> ClientSession:
    session = ClientSession(tokens=4)
    session.request_options()
    session.on_session_id(b"ABCD")
    if window is not None:
        session.on_window(*window)
    return session


# --- The first flight and TCP Fast Open (CMD-03, TRN-02) ------------------------------------------


@pytest.mark.conformance("TRN-02", "CMD-03")
@pytest.mark.parametrize(
    ("tfo", "tls", "token", "split"),
    [
        (False, False, False, False),  # no TFO: one write, Request + data (CMD-03)
        (True, False, False, True),  # TFO, no token: the SYN carries the Request alone
        (True, False, True, False),  # TFO, token spent: the data may ride in the SYN too
        (True, True, False, False),  # TFO over TLS: the SYN carries the ClientHello
    ],
    ids=["no-tfo", "tfo", "tfo-token", "tfo-tls"],
)
def test_first_flight_is_split_only_where_trn02_needs_it(
    tfo: bool, tls: bool, token: bool, split: bool
) -> None:
    """TRN-02: with TFO and no token spent, the initial data is a second write, so that the
    SYN carries no application data; otherwise Request and data are one write (CMD-03)."""
    session = active_session() if token else None
    proxy = ScriptedProxy([[AUTH_OK + OP_OK]])
    channel, conn = run(proxy, initial_data=b"DATA", tfo=tfo, tls=tls, session=session, idempotent=token)
    assert proxy.actions[0] == Open(tfo)
    writes = proxy.written[channel]
    if split:
        assert writes == [writes[0], b"DATA"] and len(writes[0]) == conn.request_size
    else:
        assert len(writes) == 1 and writes[0].endswith(b"DATA")
    assert conn.spends_token is token
    assert conn.state is ClientState.ESTABLISHED and Close(channel) not in proxy.actions


# --- Closing (REQ-10, REQ-02) ----------------------------------------------------------------------


@pytest.mark.conformance("REQ-10")
def test_noop_channel_is_closed_after_its_reply() -> None:
    """REQ-10: after the Operation Reply to NOOP the client closes the connection."""
    proxy = ScriptedProxy([[AUTH_OK + OP_OK]])
    channel, conn = run(proxy, Command.NOOP)
    assert conn.state is ClientState.MUST_CLOSE
    assert proxy.actions[-1] == Close(channel)


@pytest.mark.conformance("REQ-10")
def test_refusal_closes_the_channel() -> None:
    """REQ-10: a non-Success Operation Reply raises ProxyError, and the channel is closed."""
    proxy = ScriptedProxy([[AUTH_OK + OP_REFUSED]])
    with pytest.raises(ProxyError) as info:
        run(proxy)
    assert info.value.reply_code is ReplyCode.CONNECTION_REFUSED
    assert proxy.actions[-1] == Close(0)


@pytest.mark.conformance("REQ-02")
def test_reset_after_a_version_mismatch_reply_is_a_version_mismatch() -> None:
    """REQ-02: a proxy that sends the byte 6 and resets (our Request unread) gave a Version
    Mismatch Reply: VersionMismatchError chained to the reset, and the channel is closed."""
    proxy = ScriptedProxy([[b"\x06", ConnectionResetError()]])
    with pytest.raises(VersionMismatchError) as info:
        run(proxy, initial_data=b"x" * 64)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert proxy.actions[-1] == Close(0)


@pytest.mark.conformance("REQ-10")
def test_reset_while_writing_still_reads_the_refusal() -> None:
    """REQ-10: the proxy refused and closed while the first flight was still going out; the
    write's reset is not the error the caller sees: the refusal it sent first is."""
    proxy = ScriptedProxy([[AUTH_OK + OP_REFUSED]], write_errors={0: BrokenPipeError()})
    with pytest.raises(ProxyError):
        run(proxy, initial_data=b"x" * 64)
    assert proxy.kinds()[:3] == ["Open", "Write", "Read"]


def test_an_interrupt_closes_the_channel_and_goes_on() -> None:
    """A timeout (asyncio's CancelledError) or KeyboardInterrupt in the middle of a read
    reaches the flow, which closes its channel and lets it through."""
    proxy = ScriptedProxy([[KeyboardInterrupt()]])
    with pytest.raises(KeyboardInterrupt):
        run(proxy)
    assert proxy.kinds() == ["Open", "Write", "Read", "Close"]


# --- Sessions (SES-06, IDM-05) ---------------------------------------------------------------------


@pytest.mark.conformance("SES-06")
def test_a_request_waits_while_another_initiates_the_session() -> None:
    """SES-06: while the session is PENDING a request sends no second Session Request: it
    waits (AwaitSession), then joins the session the first request got."""
    session = ClientSession()
    session.request_options()  # another request carries the Session Request
    proxy = ScriptedProxy([[AUTH_OK + OP_OK]], on_await_session=[session])
    channel, _ = run(proxy, session=session, credentials=ALICE)
    assert proxy.kinds()[:2] == ["AwaitSession", "Open"]
    options = proxy.requests(channel).options
    assert SessionID(b"SEEN") in options
    assert not any(isinstance(o, SessionRequest | AuthData) for o in options)  # no credentials either


@pytest.mark.conformance("IDM-05", "REQ-10", "SES-06")
def test_a_token_without_a_window_starts_the_session_with_a_noop() -> None:
    """IDM-05: the first idempotent request of a new session needs a window: a NOOP starts
    the session (Session Request + Token Request, with the credentials) and is closed
    (REQ-10); then the request spends the smallest token of the window it got."""
    session = ClientSession(tokens=4)
    noop_answer = AUTH_OK_SESSION_WINDOW + OP_OK
    proxy = ScriptedProxy([[noop_answer], [AUTH_OK + OP_OK]])
    channel, conn = run(proxy, session=session, credentials=ALICE, idempotent=True)
    noop = proxy.requests(0)
    assert noop.command is Command.NOOP
    assert SessionRequest() in noop.options and IdempotenceRequest(4) in noop.options
    assert any(isinstance(o, AuthMethodAdvertisement) for o in noop.options)
    assert Close(0) in proxy.actions and channel == 1
    assert proxy.requests(1).options == (SessionID(b"NEW1"), IdempotenceExpenditure(10))
    assert conn.spends_token and SessionSettled() in proxy.actions


def test_a_declined_session_gives_no_token() -> None:
    """Section "Session initiation": a NOOP answered without a Session ID means the proxy
    declined the session, so there is no window: an idempotent request fails clearly."""
    proxy = ScriptedProxy([[AUTH_OK + OP_OK]])
    with pytest.raises(Socks6Error, match="declined"):
        run(proxy, session=ClientSession(tokens=4), idempotent=True)


def test_session_invalid_retries_once_in_a_new_session() -> None:
    """Session Invalid, client side: it comes before the proxy acts on the request
    (section "Further SOCKS Requests"), so it is retried once in a new session
    (credentials again), with the same options even when they were given as a one-shot
    iterator."""
    session = active_session(window=None)
    ttl = TTLOption(StackLeg.PROXY_REMOTE, 7)
    proxy = ScriptedProxy([[SESSION_INVALID], [AUTH_OK_SESSION_WINDOW + OP_OK]])
    channel, conn = run(proxy, session=session, credentials=ALICE, options=iter([ttl]))
    assert channel == 1 and Close(0) in proxy.actions
    assert proxy.requests(0).options == (SessionID(b"ABCD"), ttl)
    retry = proxy.requests(1).options
    assert SessionRequest() in retry and ttl in retry
    assert any(isinstance(o, AuthData) for o in retry)
    assert session.state is SessionState.ACTIVE and session.session_id == b"NEW1"


def test_session_invalid_twice_is_an_error() -> None:
    proxy = ScriptedProxy([[SESSION_INVALID], [SESSION_INVALID]])
    with pytest.raises(AuthenticationError, match="Session Invalid"):
        run(proxy, session=active_session(window=None))
    assert proxy.kinds().count("Open") == 2 and proxy.kinds().count("Close") == 2


def test_idempotent_needs_a_session() -> None:
    with pytest.raises(ValueError, match="session"):
        run(ScriptedProxy([]), idempotent=True)


# --- BIND (CMD-04) -----------------------------------------------------------------------------------


@pytest.mark.conformance("REQ-10")
def test_bind_accept_reads_the_second_reply_and_closes_on_failure() -> None:
    """BIND, client side: the first reply ends `request` (the proxy listens); `accept` reads the
    second. A failed second reply (REQ-10) closes the channel."""
    peer = hx("06 00 0000", "c350", "00", "01", "c6336401")  # peer 198.51.100.1:50000
    proxy = ScriptedProxy([[AUTH_OK + OP_OK, peer]])
    channel, conn = run(proxy, Command.BIND)
    assert conn.state is ClientState.AWAIT_BIND_PEER
    proxy.run(accept(channel, conn))
    assert conn.peer_reply is not None and conn.peer_reply.port == 50000
    assert conn.state is ClientState.ESTABLISHED and Close(channel) not in proxy.actions
    failing = ScriptedProxy([[AUTH_OK + OP_OK, OP_REFUSED]])
    channel, conn = run(failing, Command.BIND)
    with pytest.raises(ProxyError):
        failing.run(accept(channel, conn))
    assert failing.actions[-1] == Close(channel)


# --- Steps ----------------------------------------------------------------------------------------


def test_steps_hold_the_guard_while_the_flow_runs_not_while_acting() -> None:
    """The blocking Session's lock: held while the flow reads or changes the shared
    session (here: adopting a token window), released while an action is performed."""
    held: list[bool] = []

    class Guard:
        def __enter__(self) -> None:
            held.append(True)

        def __exit__(self, *exc: object) -> None:
            held.append(False)

    class Spy(ScriptedProxy):
        def _perform(self, action: Action[int]) -> object:
            assert held[-1] is False, action
            return super()._perform(action)

    session = active_session(window=None)
    windows_seen_under_guard: list[bool] = []
    real_on_window = session.on_window

    def on_window(base: int, size: int) -> None:
        windows_seen_under_guard.append(held[-1])
        real_on_window(base, size)

    session.on_window = on_window  # type: ignore[method-assign]
    proxy = Spy([[AUTH_OK_SESSION_WINDOW + OP_OK]])
    flow: Flow[int, object] = request(
        Command.CONNECT, "192.0.2.1", 80, credentials=None, tls=False, session=session
    )
    proxy.run(flow, Guard())
    assert windows_seen_under_guard == [True] and session.window == (10, 4)
    assert held == [True, False] * (len(proxy.actions) + 1)  # once per step, the last one ends


def test_steps_value_before_the_end() -> None:
    steps = Steps(accept(0, ClientConnection()))
    with pytest.raises(RuntimeError, match="not ended"):
        steps.value  # noqa: B018


# --- One API, two flavours ----------------------------------------------------------------------


def _public(cls: type) -> dict[str, inspect.Signature | str]:
    out: dict[str, inspect.Signature | str] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__", "__aenter__", "__aexit__"):
            continue
        if isinstance(member, property):
            out[name] = "property"
        elif callable(member):
            out[name] = inspect.signature(member)
    return out


#: asyncio names of the blocking API's names, by the flavours' conventions.
ASYNC_NAMES = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


@pytest.mark.parametrize(
    ("blocking", "asyncio_"),
    [
        (bclient.Proxy, aclient.Proxy),
        (bclient.Session, aclient.Session),
        (bclient.Binding, aclient.Binding),
        (bclient.Binding, aclient.StreamBinding),
    ],
    ids=["Proxy", "Session", "Binding", "StreamBinding"],
)
def test_both_flavours_have_the_same_names_and_options(blocking: type, asyncio_: type) -> None:
    """Issue 9 item 3: the blocking and the asyncio classes have the same methods and
    properties, with the same parameters and return annotations (the stream methods are
    asyncio's own; ``aclose`` / ``async with`` are asyncio's spelling of ``close`` / ``with``)."""
    sync_api = _public(blocking)
    async_api = {
        ASYNC_NAMES.get(name, name): member
        for name, member in _public(asyncio_).items()
        if name not in ("open_connection", "open_bind")
    }
    assert sorted(sync_api) == sorted(async_api)
    for name, signature in sync_api.items():
        if name in ("accept", "__enter__"):  # a socket, or streams; the object itself
            continue
        assert str(signature) == str(async_api[name]), name
