"""SOCKS 6 sessions and idempotence tokens, sans-IO (draft-11 sections "Session options" and
"Idempotence options"; docs/conformance.md SES-01..SES-05, IDM-01..IDM-04;
docs/decisions.md D4, D15).

Strategy: this module keeps the proxy's bookkeeping only; which options go into which reply
is the connection's job. Time enters as ``now: float`` arguments (a monotonic clock such as
``loop.time()``) and leaves through `SessionStore.next_deadline`, like aioquic's
``handle_timer(now)`` / ``get_timer()``. The server drives it like this:

* Session Request on a request that succeeds: ``store.create(user, client_ip, now)``; put
  ``session.session_id`` in a Session ID option of the successful Operation Reply (D4). None
  means a cap was hit: the draft says the proxy then declines "silently" (no option at all).
* Session ID option: ``store.lookup(session_id, now)``; None -> Authentication Reply Type 1
  with Session Invalid (SES-03); otherwise skip authentication, send Session OK and act as
  ``session.user`` (SES-02, SES-04).
* Session Teardown: ``store.teardown(session_id)``, then handle the request as if it carried
  no session options at all (SES-05).
* Token Request inside a session: ``store.request_window(session, size)``; from then on every
  successful Authentication Reply carries ``session.window.current`` (IDM-02).
* Idempotence Expenditure inside a session: ``store.spend(session, token)`` *before* acting on
  the request; False -> Idempotence Rejected and Type 1 (IDM-03). Outside a session both
  idempotence options are ignored (IDM-01).
* A timer at ``store.next_deadline()`` calls ``store.expire(now)``; the returned sessions'
  ``listeners`` (BIND backlogs, CMD-05) are the server's to close.

The store is a `typing.Protocol`; `MemorySessionStore` is the one of a single process. A store
shared by several processes or hosts (``socks6fast.asyncio.server.redis_sessions``, issue 13
item 2) cannot answer without I/O, and the core does none: for such a `SharedSessionStore` the
connection asks with one `SessionQuery` per request (the ``AskSessionStore`` action), the
adapter awaits the store's `SessionAnswer` (one round trip: lookup, touch, window request and
token spend together, atomic on the store's side) and feeds it back. The memory store keeps its
synchronous path: no query objects, no awaits.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..constants import MAX_WINDOW_SIZE

__all__ = [
    "SESSION_ID_LENGTH",
    "MemorySessionStore",
    "Session",
    "SessionAnswer",
    "SessionCounters",
    "SessionLimits",
    "SessionOp",
    "SessionQuery",
    "SessionStore",
    "SharedSessionStore",
    "TokenWindow",
    "token_lt",
]

#: Bytes of a Session ID: "MUST be a multiple of 4. MUST NOT be empty" (section "Session
#: initiation"); 128 random bits make it unguessable.
SESSION_ID_LENGTH = 16
#: Tokens live in "a modular 4-byte space" (section "Idempotence options").
TOKEN_MODULUS = 2**32
_TOKEN_MASK = TOKEN_MODULUS - 1
_HALF_SPACE = 2**31
#: Spent tokens above the window's base that one window remembers at most. Clients spend
#: their smallest tokens first (section "Spending a token"), so the set is normally empty;
#: the cap bounds memory against a client that spends out of order on purpose.
MAX_SPENT_TRACKED = 256


def token_lt(x: int, y: int) -> bool:
    """Token order: x < y iff 0 < (y - x) mod 2^32 < 2^31 (section "Idempotence options", IDM-04)."""
    return 0 < ((y - x) & _TOKEN_MASK) < _HALF_SPACE


class TokenWindow:
    """One session's token window: base, size and the spent tokens inside it.

    Representation: ``base`` and ``size`` plus a set of the spent tokens inside the window.
    Spending the base shifts the window past it, so a fresh or in-order window holds an
    empty set, and even a window of
    2^31 - 1 tokens costs a few hundred bytes; `MAX_SPENT_TRACKED` bounds the worst case.

    Shifting (section "Shifting windows"; the base only grows, the size is kept):

    * when the lowest token is spent, the base moves past it and past every spent token
      right above it;
    * when a "sufficiently high-order" token is spent, here one in the upper half of the
      window (offset > size // 2), the base moves so that token sits at offset size // 2:
      tokens lagging more than half a window behind the newest spend are treated as lost
      and become ineligible (refusing a token is always safe; accepting one twice is not).
      A client that never uses a token more than size // 2 above its oldest unanswered one
      never loses a token this way, whatever order its requests arrive in;
    * if a client keeps more than `MAX_SPENT_TRACKED` spent tokens above an unspent base,
      the base moves past the lowest of them, for the same reason;
    * the base never moves past the highest unspent token of the window ("SHOULD NOT shift
      the window's base beyond the highest unspent token");
    * over the window's whole life the base moves at most 2^32 - size, so an old, spent
      token can never come back into the window by wrapping around the modular space (a
      replay stays rejected forever, IDM-03); a window that has used that up stops moving
      and runs dry.
    """

    __slots__ = ("_advance_left", "_spent", "base", "size")

    def __init__(self, base: int, size: int) -> None:
        """Create a window.

        Args:
            base: the first token, taken modulo 2^32.
            size: number of tokens, 1 to 2^31 - 1 ("MUST be less than 2^31", "MUST NOT be 0").

        Raises:
            ValueError: the size is out of range.
        """
        if not 1 <= size <= MAX_WINDOW_SIZE:
            raise ValueError(f"token window size {size} is not 1-{MAX_WINDOW_SIZE}")
        self.base = base & _TOKEN_MASK
        """The first token of the window (Window Base)."""
        self.size = size
        """The number of tokens in the window (Window Size)."""
        self._spent: set[int] = set()
        self._advance_left = TOKEN_MODULUS - size

    @property
    def current(self) -> tuple[int, int]:
        """``(base, size)`` as the Idempotence Window option carries them."""
        return self.base, self.size

    def _offset(self, token: int) -> int:
        return (token - self.base) & _TOKEN_MASK

    def is_eligible(self, token: int) -> bool:
        """True when ``token`` is inside the window and not yet spent."""
        token &= _TOKEN_MASK
        return self._offset(token) < self.size and token not in self._spent

    def spend(self, token: int) -> bool:
        """Spend one token (section "Spending a token"); call before honouring the request.

        Args:
            token: the Token of an Idempotence Expenditure option.

        Returns:
            True when the token was eligible and is now spent; False when it lies outside
            the window or was spent before (the request must then be rejected, IDM-03).
        """
        token &= _TOKEN_MASK
        offset = self._offset(token)
        if offset >= self.size or token in self._spent:
            return False
        half = self.size // 2
        shift = 0
        if offset > half:
            shift = offset - half
        if len(self._spent) >= MAX_SPENT_TRACKED:
            lowest = min(self._offset(t) for t in self._spent)
            shift = max(shift, min(lowest, offset) + 1)
        self._spent.add(token)
        if shift:
            shift = min(shift, self._highest_unspent_offset())
        # "as soon as the lowest-order token in the window is spent": skip the spent run.
        while shift < self.size and ((self.base + shift) & _TOKEN_MASK) in self._spent:
            shift += 1
        shift = min(shift, self._advance_left)
        if shift:
            self._shift(shift)
        if len(self._spent) > MAX_SPENT_TRACKED:
            # Could not make room (the window has no more room to move): refuse, which is safe.
            self._spent.discard(token)
            return False
        return True

    def _highest_unspent_offset(self) -> int:
        # Every spent token lies in the window, so this walks at most len(_spent) + 1 steps.
        # If the whole window is spent, the first token after it counts as the highest unspent.
        offset = self.size - 1
        while offset >= 0 and ((self.base + offset) & _TOKEN_MASK) in self._spent:
            offset -= 1
        return offset if offset >= 0 else self.size

    def _shift(self, shift: int) -> None:
        old_base = self.base
        self.base = (old_base + shift) & _TOKEN_MASK
        self._advance_left -= shift
        self._spent = {t for t in self._spent if ((t - old_base) & _TOKEN_MASK) >= shift}


@dataclass(slots=True, eq=False)
class Session:
    """One SOCKS 6 session as the proxy sees it (section "Session options")."""

    session_id: bytes
    """The opaque Session ID sent to the client (16 random bytes)."""
    user: str | None
    """The user that created the session, or None for a session created without
    authentication; requests inside the session act as this user (SES-04)."""
    client_ip: str
    """Address of the client that created the session (for the per-IP cap)."""
    created: float
    """``now`` at creation."""
    last_used: float
    """``now`` of the last lookup or touch; the session expires ``idle_timeout`` after it."""
    window: TokenWindow | None = None
    """The session's token window, once one was issued (at most one, IDM-02)."""
    listeners: dict[tuple[str, int], Any] = field(default_factory=dict)
    """BIND listeners kept open for this session (Listen Backlog, CMD-05), keyed by bound
    (address, port). The values are opaque handles owned by the server, which closes them
    when the session ends."""


class SessionStore(Protocol):
    """What the proxy needs from a session store; `MemorySessionStore` is the local one."""

    def create(self, user: str | None, client_ip: str, now: float) -> Session | None:
        """Start a session; None when a cap is hit (the Session Request is then not honoured)."""
        ...

    def lookup(self, session_id: bytes, now: float) -> Session | None:
        """Find a live session by ID and mark it used; None when unknown or expired."""
        ...

    def touch(self, session: Session, now: float) -> None:
        """Mark a session used (for example while one of its connections is still relaying)."""
        ...

    def teardown(self, session_id: bytes) -> Session | None:
        """End a session (Session Teardown); returns it so its listeners can be closed."""
        ...

    def expire(self, now: float) -> list[Session]:
        """End every session idle for longer than the timeout; returns them."""
        ...

    def next_deadline(self) -> float | None:
        """When `expire` has work to do next, or None when there are no sessions."""
        ...

    def request_window(self, session: Session, requested_size: int) -> tuple[int, int] | None:
        """Issue the session's token window; ``(base, size)`` or None when none is issued."""
        ...

    def spend(self, session: Session, token: int) -> bool:
        """Spend a token of the session's window; False when it is not eligible."""
        ...

    def __len__(self) -> int:
        """Number of live sessions."""
        ...


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """A session store's caps and timeouts (the ``[sessions]`` table), checked when built.

    Raises:
        ValueError: a limit is out of range.
    """

    idle_timeout: float = 600.0
    """Seconds without use after which a session expires (> 0)."""
    max_sessions: int | None = 100_000
    """Live sessions at most, in total (None: no cap)."""
    max_per_client_ip: int | None = 100
    """Live sessions per client address at most (None: no cap)."""
    max_per_user: int | None = 1000
    """Live sessions per authenticated user at most (None: no cap). Sessions created
    without authentication count against the per-IP cap only."""
    max_token_window: int = 2**16
    """Largest window size issued (D15), 0 to never issue one."""

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0")
        if not 0 <= self.max_token_window <= MAX_WINDOW_SIZE:
            raise ValueError(f"max_token_window must be 0-{MAX_WINDOW_SIZE}")
        for cap in (self.max_sessions, self.max_per_client_ip, self.max_per_user):
            if cap is not None and cap < 1:
                raise ValueError("session caps must be >= 1 or None")


@dataclass(slots=True)
class SessionCounters:
    """What a session store did since it was made (issue 14 metrics): plain integers bumped
    once per request, read at a metrics scrape."""

    created: int = 0
    """Sessions created (SES-01)."""
    declined: int = 0
    """Session Requests declined because a cap was hit."""
    windows: int = 0
    """Token windows issued (IDM-02)."""
    tokens_spent: int = 0
    """Tokens accepted (IDM-03)."""
    tokens_rejected: int = 0
    """Tokens refused: no window, outside it, or spent before (IDM-04)."""


class SessionOp(Enum):
    """What a `SessionQuery` asks of a shared store."""

    LOOKUP = "lookup"
    """A request with a Session ID: find the session, mark it used, issue a window if asked
    (IDM-02), spend the token if one came (IDM-03); all at once."""
    TEARDOWN = "teardown"
    """Session Teardown (SES-05): end the session everywhere, now."""
    CREATE = "create"
    """Session Request (SES-01): start a session within the caps, with a window if asked."""
    TOUCH = "touch"
    """A connection of the session relayed until now: mark it used (no answer awaited)."""


@dataclass(slots=True)
class SessionQuery:
    """One request's question to a shared session store (one round trip)."""

    op: SessionOp
    """What to do."""
    session_id: bytes = b""
    """The session (LOOKUP, TEARDOWN, TOUCH)."""
    user: str | None = None
    """CREATE: the authenticated user, None without authentication (SES-04)."""
    client_ip: str = ""
    """CREATE: the client's address (the per-address cap)."""
    token_request: int | None = None
    """LOOKUP, CREATE: the Token Request's window size, if the request carried one."""
    token: int | None = None
    """LOOKUP: the Idempotence Expenditure's token, if the request carried one."""


@dataclass(slots=True)
class SessionAnswer:
    """A shared store's answer to a `SessionQuery`."""

    session: Session | None
    """LOOKUP: the live session (None: unknown or expired, SES-03). CREATE: the new session
    (None: a cap was hit, the request is declined silently). TEARDOWN: the ended session, for
    its BIND listeners in this process (None: it was unknown)."""
    window: tuple[int, int] | None = None
    """``(base, size)`` of the session's token window after the query, if it has one (IDM-02)."""
    spent: bool = False
    """LOOKUP with a token: the token was eligible and is now spent (IDM-03)."""


class SharedSessionStore(Protocol):
    """A session store several processes or hosts share (issue 13 item 2), asked through the
    adapter: the core emits ``AskSessionStore(query)``, the adapter awaits `answer` and calls
    ``ServerConnection.session_answered`` (or ``session_store_failed`` when `answer` raised
    `socks6fast.errors.SessionStoreError`)."""

    limits: SessionLimits
    """The caps and timeouts (a reload assigns new ones)."""
    counters: SessionCounters
    """What this process's requests did with the store."""

    async def answer(self, query: SessionQuery) -> SessionAnswer:
        """Answer ``query`` in one round trip; raises SessionStoreError when it cannot."""
        ...

    def send(self, query: SessionQuery) -> None:
        """Send ``query`` (TOUCH, or TEARDOWN of a session whose first request failed, D4)
        without waiting for the answer; a failure is logged, never raised."""
        ...


class MemorySessionStore:
    """Sessions of one process, in memory.

    Sessions are kept in an ``OrderedDict`` in least-recently-used order: every lookup moves
    its session to the end, so the idle-expiry scan and `next_deadline` look at the front
    only, O(1) per expired session.
    """

    __slots__ = ("_by_client_ip", "_by_user", "_sessions", "counters", "limits")

    def __init__(self, limits: SessionLimits | None = None) -> None:
        """Create an empty store.

        Args:
            limits: the caps and timeouts; the defaults of `SessionLimits` when None.
        """
        self.limits = limits if limits is not None else SessionLimits()
        """In effect for every later call; a configuration reload assigns new ones and the
        live sessions stay."""
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._by_client_ip: dict[str, int] = {}
        self._by_user: dict[str, int] = {}
        self.counters = SessionCounters()
        """Sessions created and declined, windows issued, tokens spent and rejected."""

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user: str | None, client_ip: str, now: float) -> Session | None:
        """Start a session (section "Session initiation", SES-01).

        Args:
            user: the authenticated user, or None when no authentication took place.
            client_ip: the client's address as text.
            now: current time.

        Returns:
            The new session, or None when a cap is hit: the proxy then declines the Session
            Request silently, as the draft requires.
        """
        # Idle sessions count until `expire` collects them: only `expire` ends sessions on a
        # timeout, so that the server always gets their listeners back to close.
        if (
            (self.limits.max_sessions is not None and len(self._sessions) >= self.limits.max_sessions)
            or (
                self.limits.max_per_client_ip is not None
                and self._by_client_ip.get(client_ip, 0) >= self.limits.max_per_client_ip
            )
            or (
                user is not None
                and self.limits.max_per_user is not None
                and self._by_user.get(user, 0) >= self.limits.max_per_user
            )
        ):
            self.counters.declined += 1
            return None
        session_id = secrets.token_bytes(SESSION_ID_LENGTH)
        while session_id in self._sessions:  # pragma: no cover - 2^-128 per pair
            session_id = secrets.token_bytes(SESSION_ID_LENGTH)
        session = Session(session_id=session_id, user=user, client_ip=client_ip, created=now, last_used=now)
        self._sessions[session_id] = session
        self._by_client_ip[client_ip] = self._by_client_ip.get(client_ip, 0) + 1
        if user is not None:
            self._by_user[user] = self._by_user.get(user, 0) + 1
        self.counters.created += 1
        return session

    def lookup(self, session_id: bytes, now: float) -> Session | None:
        """Find a live session and mark it used (section "Further SOCKS Requests").

        Args:
            session_id: the Session ID option's bytes.
            now: current time.

        Returns:
            The session, or None when the ID is unknown or the session has expired (the
            proxy then answers Session Invalid, SES-03).
        """
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if now - session.last_used > self.limits.idle_timeout:
            return None  # dead; left for `expire` to collect and hand to the server
        self.touch(session, now)
        return session

    def touch(self, session: Session, now: float) -> None:
        """Mark a session used at ``now`` (no-op if it has ended or already timed out)."""
        if (
            self._sessions.get(session.session_id) is session
            and now - session.last_used <= self.limits.idle_timeout
        ):
            session.last_used = max(session.last_used, now)
            self._sessions.move_to_end(session.session_id)

    def teardown(self, session_id: bytes) -> Session | None:
        """End a session (section "Tearing down the session", SES-05).

        Returns:
            The ended session (its ``listeners`` are for the caller to close), or None
            when the ID is unknown.
        """
        session = self._sessions.get(session_id)
        if session is not None:
            self._remove(session)
        return session

    def end_users(self, users: Container[str]) -> list[Session]:
        """End every session of these users (a reload removed them or changed their password:
        their sessions must not outlive their credentials; probe S-1, SES-04).

        Returns:
            The ended sessions (their ``listeners`` are for the caller to close).
        """
        ended = [s for s in self._sessions.values() if s.user is not None and s.user in users]
        for session in ended:
            self._remove(session)
        return ended

    def expire(self, now: float) -> list[Session]:
        """End every session idle for more than ``idle_timeout`` ("SHOULD feature a timeout").

        Returns:
            The ended sessions, oldest first.
        """
        expired: list[Session] = []
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if now - session.last_used <= self.limits.idle_timeout:
                break
            self._remove(session)
            expired.append(session)
        return expired

    def next_deadline(self) -> float | None:
        """The time at which the least recently used session expires, or None."""
        if not self._sessions:
            return None
        oldest = next(iter(self._sessions.values()))
        return oldest.last_used + self.limits.idle_timeout

    def request_window(self, session: Session, requested_size: int) -> tuple[int, int] | None:
        """Handle a Token Request (section "Requesting a token window", IDM-02, D15).

        Args:
            session: the session the request belongs to.
            requested_size: the Window Size the client asked for.

        Returns:
            ``(base, size)`` of the newly issued window, with a random base and
            ``size = min(requested_size, max_token_window)``; None when no window is issued:
            the session already has one ("MUST NOT issue a new window"), the request asked
            for 0, or windows are disabled. The caller ignores the request then.
        """
        if session.window is not None or requested_size <= 0 or self.limits.max_token_window == 0:
            return None
        size = min(requested_size, self.limits.max_token_window)
        session.window = TokenWindow(secrets.randbits(32), size)
        self.counters.windows += 1
        return session.window.current

    def spend(self, session: Session, token: int) -> bool:
        """Spend a token (section "Spending a token", IDM-03).

        Returns:
            True when the token was eligible and is now spent; False when the session has no
            window, the token is outside it, or it was spent before.
        """
        window = session.window
        spent = window is not None and window.spend(token)
        if spent:
            self.counters.tokens_spent += 1
        else:
            self.counters.tokens_rejected += 1
        return spent

    def _remove(self, session: Session) -> None:
        del self._sessions[session.session_id]
        _decrement(self._by_client_ip, session.client_ip)
        if session.user is not None:
            _decrement(self._by_user, session.user)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
