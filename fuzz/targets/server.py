"""Target server: the proxy's sans-IO state machines, driven as the asyncio adapter drives them.

Input: 4 control bytes, then the bytes a client sends. The first client byte picks the
protocol as the adapter does (D1: 5 is SOCKS 5, anything else goes to `ServerConnection`,
which answers Version Mismatch when it is not 6). The control bytes seed the choices a
real proxy makes from outside input: how the bytes are cut into reads, whether EOF or the
handshake timer ends them, the Options Length cap, and a plausible answer to every event
(authentication success, failure or the slow username/password exchange when it was
advertised, an Operation Reply with the echoed Stack options or a refusal, BIND's second
reply, a SOCKS 5 method from the greeting's list...).

Allowed: ``RemoteProtocolError`` from ``next_event`` / ``handle_timer`` (the client broke
the protocol). Crashes: any other exception; ``send`` refusing a reply that the state
allows (``LocalProtocolError``); a reply that does not decode to itself; after a
``RemoteProtocolError`` carrying a reply code, the failure reply the adapter then sends
being refused (D14: "the adapter may still send one failure OperationReply"); application
data (``trailing_data``) that is not the tail of what the client sent; a handshake timer
that does not fire once its deadline has passed (REQ-08).
"""

from __future__ import annotations

import random
from typing import Any

from fuzz import sut
from fuzz.targets._common import Finding

sc = sut.server_connection
m = sut.messages
s5 = sut.socks5
c = sut.constants
RemoteProtocolError = sut.errors.RemoteProtocolError
State = sc.State
codec = sut.codec  # the selector the connections use (py unless --codec c)

HEADER = 4
TIMEOUT = 10.0
MAX_STEPS = 64
SESSION_ID = b"\x5a" * 16
#: Plausible bound / peer addresses of Operation Replies.
ADDRESSES = (
    (c.AddressType.IPV4, "127.0.0.1"),
    (c.AddressType.IPV4, "0.0.0.0"),
    (c.AddressType.IPV6, "::1"),
    (c.AddressType.DOMAIN_NAME, "localhost"),
)
FAILURES = tuple(code for code in c.ReplyCode if code != c.ReplyCode.SUCCESS)
SOCKS5_FAILURES = tuple(code for code in FAILURES if code <= c.ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)


def setup() -> None:
    """Nothing to load."""


def _chunks(stream: bytes, rng: random.Random) -> list[bytes]:
    style = rng.randrange(4)
    if style == 0:
        return [stream]  # one read
    if style == 1:
        return [stream[i : i + 1] for i in range(len(stream))]  # byte by byte (REQ-07)
    out, i = [], 0
    while i < len(stream):
        n = rng.randint(1, 8 if style == 2 else 64)
        out.append(stream[i : i + n])
        i += n
    return out


def _check_reply(kind: str, wire: bytes, sent: Any) -> None:
    """What the proxy sends must decode, with the client's codec, to what it meant to send."""
    if kind == "auth":
        got: Any = codec.decode_auth_reply(wire)
    elif kind == "op":
        got = codec.decode_operation_reply(wire)
    elif kind == "userpass":
        got = s5.decode_userpass_reply(wire)
    elif kind == "s5method":
        got = s5.decode_method_selection(wire)
    elif kind == "s5reply":
        got = s5.decode_reply(wire)
    else:
        got = (sent, 1) if wire == b"\x06" else (None, 0)  # Version Mismatch Reply: the byte 6 (REQ-01)
    if got != (sent, len(wire)):
        raise Finding(f"sent {sent!r} as {wire.hex()}, which decodes to {got!r}")


def _send(conn: Any, kind: str, message: Any) -> None:
    try:
        wire = conn.send(message)
    except sut.errors.LocalProtocolError as exc:
        raise Finding(f"send({message!r}) refused in {conn.our_state}/{conn.their_state}: {exc}") from exc
    _check_reply(kind, wire, message)


def _echo(conn: Any) -> tuple[Any, ...]:
    """The Stack options a proxy that applied everything asked would echo (D9)."""
    plan = conn.options.stack if conn.options is not None else sc.StackPlan()
    legs = [
        sut.stackopts.AppliedLeg(leg.tos, leg.ttl, leg.no_fragmentation) if not leg.empty else None
        for leg in (plan.client, plan.remote)
    ]
    return sut.stackopts.echo_stack_options(
        plan,
        client=legs[0],
        remote=legs[1],
        happy_eyeballs=plan.happy_eyeballs,
        tfo_payload_size=0 if plan.tfo_payload_size is not None else None,
        multipath=c.Availability.NOT_DESIRED if plan.multipath is not None else None,
        listen_backlog=plan.listen_backlog,
    )


def _answer6(conn: Any, rng: random.Random) -> bool:
    """Send what a proxy sends in ``conn.our_state``; False when nothing is due."""
    state = conn.our_state
    if state is State.SEND_VERSION_MISMATCH:
        _send(conn, "mismatch", m.VersionMismatchReply())
    elif state is State.SEND_AUTH_REPLY:
        options = conn.options
        advertised = options.advertised_methods or () if options is not None else ()
        pick = rng.randrange(3)
        if pick == 0 and c.AuthMethod.USERNAME_PASSWORD in advertised:
            selection = m.AuthMethodSelection(c.AuthMethod.USERNAME_PASSWORD)
            _send(conn, "auth", m.AuthReply(c.AuthReplyType.FAILURE, (selection,)))
        elif pick == 1:
            failure: tuple[Any, ...] = rng.choice(((), (m.SessionInvalid(),), (m.IdempotenceRejected(),)))
            _send(conn, "auth", m.AuthReply(c.AuthReplyType.FAILURE, failure))
        else:
            success: list[Any] = []
            if options is not None and options.session_request:
                success += [m.SessionOK(), m.SessionID(SESSION_ID)]
                # As MemorySessionStore.request_window: size min(asked, the cap), none for 0 (D15).
                size = min(options.token_request or 0, c.MAX_WINDOW_SIZE)
                if size:
                    success.append(m.IdempotenceWindow(rng.getrandbits(32), size))
            if options is not None and options.token is not None:
                success.append(m.IdempotenceAccepted())
            _send(conn, "auth", m.AuthReply(c.AuthReplyType.SUCCESS, tuple(success)))
    elif state is State.SEND_USERPASS_REPLY:
        _send(conn, "userpass", s5.UserPassReply(rng.choice(tuple(c.UserPassStatus))))
    elif state is State.SEND_FINAL_AUTH_REPLY:
        _send(conn, "auth", m.AuthReply(rng.choice(tuple(c.AuthReplyType))))
    elif state in (State.SEND_OPERATION_REPLY, State.SEND_BIND_REPLY):
        request = conn.request
        # The adapter's own checks of a request (D11 NOOP address, D13 DNS service).
        if request is not None:
            sc.noop_address_ok(request)
            sc.is_dns_request(request)
        if rng.randrange(4) == 0:
            _send(conn, "op", sc.failure_reply(rng.choice(FAILURES)))
        else:
            address_type, address = rng.choice(ADDRESSES)
            reply = m.OperationReply(
                c.ReplyCode.SUCCESS, address_type, address, rng.getrandbits(16), _echo(conn)
            )
            _send(conn, "op", reply)
    else:
        return False
    return True


def _answer5(conn: Any, greeting: Any, rng: random.Random) -> bool:
    state = conn.our_state
    if state is State.SEND_METHOD_SELECTION:
        offered = [x for x in greeting.methods if x in (c.AuthMethod.NONE, c.AuthMethod.USERNAME_PASSWORD)]
        method = rng.choice(offered) if offered and rng.randrange(8) else c.AuthMethod.NO_ACCEPTABLE_METHODS
        _send(conn, "s5method", s5.Socks5MethodSelection(method))
    elif state is State.SEND_USERPASS_REPLY:
        _send(conn, "userpass", s5.UserPassReply(rng.choice(tuple(c.UserPassStatus))))
    elif state in (State.SEND_OPERATION_REPLY, State.SEND_BIND_REPLY):
        if rng.randrange(4) == 0:
            _send(
                conn, "s5reply", s5.Socks5Reply(rng.choice(SOCKS5_FAILURES), c.AddressType.IPV4, "0.0.0.0", 0)
            )
        else:
            address_type, address = rng.choice(ADDRESSES)
            _send(
                conn,
                "s5reply",
                s5.Socks5Reply(c.ReplyCode.SUCCESS, address_type, address, rng.getrandbits(16)),
            )
    else:
        return False
    return True


def _protocol_error(conn: Any, exc: Any, socks5: bool) -> None:
    """What the adapter does after a RemoteProtocolError: one failure reply when it has a code."""
    code = exc.reply_code
    if code is not None and not isinstance(code, c.ReplyCode):
        raise Finding(f"reply_code {code!r} is not a ReplyCode")
    if conn.their_state is not State.ERROR:
        raise Finding(f"after {exc!r} the client's state is {conn.their_state}, not ERROR")
    if code is None:
        return
    if socks5:
        code = c.ReplyCode.HOST_UNREACHABLE if code == c.ReplyCode.CONNECTION_TIMED_OUT else code
        _send(conn, "s5reply", s5.Socks5Reply(code, c.AddressType.IPV4, "0.0.0.0", 0))
    else:
        if conn.our_state in (State.IDLE, State.SEND_AUTH_REPLY):
            code = c.ReplyCode.GENERAL_FAILURE  # asyncio/server.py: before the Authentication Reply
        _send(conn, "op", sc.failure_reply(code))


def test_one_input(data: bytes) -> None:
    if len(data) <= HEADER:
        return
    rng = random.Random(data[:HEADER])
    stream = data[HEADER:]
    socks5 = sc.detect_protocol(stream[0]) is sc.Protocol.SOCKS5
    conn: Any
    if socks5:
        conn = sc.Socks5ServerConnection(handshake_timeout=TIMEOUT, now=0.0)
    else:
        cap = rng.choice((c.MAX_OPTIONS_LENGTH, 64))
        conn = sc.ServerConnection(max_options_length=cap, handshake_timeout=TIMEOUT, now=0.0)
    chunks = _chunks(stream, rng)
    end_with_eof = rng.randrange(2) == 0
    fed = bytearray()
    greeting = None
    for _ in range(len(chunks) + MAX_STEPS):
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            _protocol_error(conn, exc, socks5)
            return
        if event is sc.NEED_DATA:
            if chunks:
                chunk = chunks.pop(0)
                fed += chunk
                conn.receive_data(chunk)
            elif end_with_eof and not conn.client_closed:
                conn.receive_data(b"")
            else:
                _expire(conn)
                return
            continue
        if isinstance(event, sc.ConnectionClosed):
            return
        if isinstance(event, s5.Socks5Greeting):
            greeting = event
        answered = _answer5(conn, greeting, rng) if socks5 else _answer6(conn, rng)
        if not answered and event is sc.PAUSED:
            _finish(conn, fed)
            return
    raise Finding(f"no end after {MAX_STEPS} steps: {conn.our_state}/{conn.their_state}")


def _expire(conn: Any) -> None:
    """No more bytes: the handshake timer must be running and fire at its deadline (REQ-08)."""
    deadline = conn.get_timer()
    if deadline != TIMEOUT:
        raise Finding(f"waiting for bytes in {conn.their_state} with timer {deadline!r}")
    conn.handle_timer(TIMEOUT - 1)  # not yet
    try:
        conn.handle_timer(TIMEOUT)
    except RemoteProtocolError as exc:
        if exc.reply_code is not None:
            raise Finding(f"a timeout answers with {exc.reply_code!r}: it closes silently") from exc
        return
    raise Finding("the handshake timer did not fire at its deadline")


def _finish(conn: Any, fed: bytearray) -> None:
    """The handshake is over (or waits for us with nothing to say): check the hand-off."""
    trailing, _ = conn.trailing_data
    if not bytes(fed).endswith(trailing):
        raise Finding(f"trailing data {trailing.hex()} is not the tail of what the client sent")
    if conn.their_state is State.DATA and conn.get_timer() is not None:
        raise Finding("the handshake timer still runs once the client's bytes are application data")
