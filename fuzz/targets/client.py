"""Target client: the client's sans-IO state machine (`ClientConnection`, `ClientSession`).

Input: 4 control bytes, then the bytes "the proxy" sends. The control bytes seed what a
client application does: one to three requests in turn over one `ClientSession` (CONNECT,
BIND, UDP ASSOCIATE, NOOP, a teardown), with or without 0-RTT credentials, initial data,
Stack options, session and idempotence options; how the proxy's bytes are read (all at
once, byte by byte, in random pieces, or exactly ``bytes_needed`` at a time as the
adapters read); and whether the proxy's bytes end in EOF or the handshake timer fires.
Each request's connection reads the proxy's bytes from where the previous one stopped.

Allowed: `ProxyError` (and its `AuthenticationError` / `VersionMismatchError`) and
`RemoteProtocolError` from ``next_event``; ``TimeoutError`` from ``handle_timer``. Crashes:
anything else (``LocalProtocolError`` from ``next_event`` included: the harness only calls
it as the adapters do); a failed connection not in ERROR; a finished one whose bytes out
are not the Request, the RFC 1929 request (D7) and the whole initial data; an adapter that
reads ``bytes_needed`` at a time reading past the last reply; a session in an impossible
state (ACTIVE without an ID, a token window of size 0 or over 2^31, IDM-05/D15).
"""

from __future__ import annotations

import random
from typing import Any

from fuzz import sut
from fuzz.targets._common import Finding

cc = sut.client_connection
m = sut.messages
s5 = sut.socks5
c = sut.constants
errors = sut.errors

HEADER = 4
TIMEOUT = 5.0
MAX_STEPS = 64
HOSTS = ("127.0.0.1", "::1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0")
CREDENTIALS = s5.UserPassRequest(b"alice", b"s3cret")
INITIAL_DATA = b"GET / HTTP/1.0\r\n\r\n"
STACK = (
    m.IPTOSOption(c.StackLeg.BOTH, 0x10),
    m.TTLOption(c.StackLeg.PROXY_REMOTE, 64),
    m.TFOOption(c.StackLeg.PROXY_REMOTE, 0),
    m.HappyEyeballsOption(c.StackLeg.PROXY_REMOTE, c.Availability.DESIRED),
)
#: What the proxy may answer: typed errors of the client's side.
ALLOWED = (errors.ProxyError, errors.RemoteProtocolError)


def setup() -> None:
    """Nothing to load."""


def _request(session: Any, rng: random.Random) -> tuple[Any, bytes, Any, bool] | None:
    """A request a client application would send now, or None when the session allows none."""
    state = session.state
    if state in (cc.SessionState.PENDING, cc.SessionState.CLOSED):
        return None
    if state is cc.SessionState.ACTIVE and rng.randrange(6) == 0:
        return cc.noop_request(session.teardown_options()), b"", None, False
    idempotent = (
        state is cc.SessionState.ACTIVE and session.available_token() is not None and rng.randrange(2)
    )
    use_session = rng.randrange(3) != 0
    options: tuple[Any, ...] = session.request_options(idempotent=bool(idempotent)) if use_session else ()
    initiates = any(isinstance(o, m.SessionRequest) for o in options)
    command = rng.choice(
        (c.Command.CONNECT, c.Command.CONNECT, c.Command.BIND, c.Command.UDP_ASSOCIATE, c.Command.NOOP)
    )
    if command is c.Command.NOOP:
        return cc.noop_request(options), b"", None, initiates
    stack = tuple(o for o in STACK if rng.randrange(4) == 0)
    credentials = CREDENTIALS if session.needs_credentials and rng.randrange(3) else None
    initial = INITIAL_DATA[: rng.randrange(len(INITIAL_DATA) + 1)] if command is c.Command.CONNECT else b""
    request = cc.build_request(
        command,
        rng.choice(HOSTS),
        rng.choice((80, 443, 0, 65535)),
        credentials=credentials,
        initial_data_length=len(initial),
        options=(*stack, *options),
    )
    slow = CREDENTIALS if credentials is None and rng.randrange(4) == 0 else None
    return request, initial, slow, initiates


def _check_session(session: Any) -> None:
    if session.state is cc.SessionState.ACTIVE and session.session_id is None:
        raise Finding("session ACTIVE without a Session ID")
    if session.window is not None:
        base, size = session.window
        if not (0 <= base <= 0xFFFFFFFF and 0 < size <= c.MAX_WINDOW_SIZE):
            raise Finding(f"session holds an impossible token window {session.window!r}")


def _connection(session: Any, stream: bytearray, rng: random.Random, end_with_eof: bool) -> bool:
    """One request over one connection; False when the session allows no more requests."""
    made = _request(session, rng)
    if made is None:
        return False
    request, initial, slow, initiates = made
    conn = cc.ClientConnection(session=session, credentials=slow, handshake_timeout=TIMEOUT)
    try:
        out = bytearray(conn.send(request, initial, now=0.0))
    except errors.LocalProtocolError as exc:
        raise Finding(f"send() refused the request a client builds: {request!r}: {exc}") from exc
    wire = sut.codec.encode_request(request)
    style = rng.randrange(4)
    fed = bytearray()
    try:
        for _ in range(len(stream) + MAX_STEPS):
            try:
                event = conn.next_event()
            except errors.LocalProtocolError as exc:
                raise Finding(f"next_event raised {exc!r} in {conn.state}") from exc
            out += conn.data_to_send()
            if event is cc.NEED_DATA:
                if stream:
                    n = {0: len(stream), 1: 1, 2: rng.randint(1, 32), 3: conn.bytes_needed}[style]
                    chunk = bytes(stream[:n])
                    del stream[:n]
                    fed += chunk
                    conn.receive_data(chunk)
                elif end_with_eof:
                    conn.receive_data(b"")
                else:
                    try:
                        conn.handle_timer(TIMEOUT)
                    except TimeoutError:
                        if conn.state is not cc.ClientState.ERROR:
                            raise Finding(f"timed out but in {conn.state}") from None
                        return True
                    raise Finding("the handshake timer did not fire at its deadline")
                continue
            if conn.state in (cc.ClientState.ESTABLISHED, cc.ClientState.MUST_CLOSE):
                _finished(conn, out, wire, initial, fed, style, stream)
                return True
        raise Finding(f"no end after {MAX_STEPS} steps in {conn.state}")
    except ALLOWED:
        if conn.state is not cc.ClientState.ERROR:
            raise Finding(f"a failed connection is left in {conn.state}") from None
        return True
    finally:
        if initiates and session.state is cc.SessionState.PENDING:
            session.on_initiation_done(succeeded=False)  # as the adapters do (client.py _end)
        _check_session(session)


def _finished(
    conn: Any, out: bytearray, wire: bytes, initial: bytes, fed: bytearray, style: int, stream: bytearray
) -> None:
    trailing, _ = conn.trailing_data
    if not bytes(fed).endswith(trailing):
        raise Finding("trailing data is not the tail of the proxy's bytes")
    if style == 3 and trailing:
        raise Finding(f"reading bytes_needed at a time read {len(trailing)} bytes past the last reply")
    # The next request's connection reads what this one did not use.
    stream[:0] = trailing
    sent = bytes(out)
    if len(conn.auth_replies) == 2:
        # D7: the bare RFC 1929 request went out between the two Authentication Replies
        # (every request here carries the one set of credentials).
        sent = sent.replace(s5.encode_userpass_request(CREDENTIALS), b"", 1)
    if conn.state is cc.ClientState.ESTABLISHED and sent != wire + initial:
        raise Finding(f"bytes out {sent.hex()} are not the request {wire.hex()} and the initial data")


def test_one_input(data: bytes) -> None:
    if len(data) < HEADER:
        return
    rng = random.Random(data[:HEADER])
    stream = bytearray(data[HEADER:])
    session = cc.ClientSession(tokens=rng.choice((0, 0, 4, c.MAX_WINDOW_SIZE)))
    end_with_eof = rng.randrange(2) == 0
    for _ in range(rng.randint(1, 3)):
        if not _connection(session, stream, rng, end_with_eof):
            break
