"""SOCKS 6 sessions and idempotence tokens shared by processes and hosts through Redis.

Issue 13 item 2; draft-11 sections "Session options" and "Idempotence options"; docs/conformance.md
SES-01..SES-05, IDM-01..IDM-04; docs/decisions.md D37, D38.

Strategy: every request that needs the store costs exactly one Redis round trip: one Lua script
(EVALSHA; redis-py loads it again after a Redis restart) does the lookup, the touch, the window
request and the token spend together, atomically on the Redis server, so that a token is accepted
at most once across every host sharing the Redis (IDM-03). The window logic is the one of
`socks6fast.proto.sessions.TokenWindow`, in Lua (tests/test_redis_sessions.py runs both side by
side). Keys, under the prefix ``socks6fast:``:

* ``s:<session id, hex>``: a hash with the client address ``ip``, the user ``u`` (absent for a
  session made without authentication) and the window ``b`` (base), ``s`` (size), ``a`` (how far
  the base may still move, see `TokenWindow`) and ``t`` (spent tokens above the base, normally
  none). Its TTL is the idle timeout, renewed by every use: expiry is Redis's job. Nothing else
  crosses the wire: no password, no hash of one.
* ``all``, ``ip:<address>``, ``u:<user>``: sorted sets of session ids scored by their expiry
  time (Redis's own clock, ``TIME``), for the caps ``max_sessions``, ``max_per_client_ip``,
  ``max_per_user``; expired members are dropped when a session is created.

Each session also records the store's epoch (field ``e``; key ``epoch``: Redis's run_id and
replication ID): after a Redis restart or failover every older session is Session Invalid, so a
window restored from a snapshot is never spent again (D38, probe R-0).

Session IDs are 16 bytes from `secrets` (128 bits), made here; the create script refuses one
that exists. BIND backlog listeners (CMD-05) are sockets of one process: they stay in this
process's table (``session.listeners``); a session ended elsewhere (teardown on another host,
expiry) closes them at the next `sweep`, within a second.

Failures (D37): an unreachable or hanging Redis (``socket_timeout``) raises
`socks6fast.errors.SessionStoreError`; the core answers the request with General Failure and
accepts no token. The first failure of an outage is logged (one warning), the first answer after
it too (one line, with how many requests failed); redis-py reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Container
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ...errors import SessionStoreError
from ...proto.sessions import (
    SESSION_ID_LENGTH,
    Session,
    SessionAnswer,
    SessionCounters,
    SessionLimits,
    SessionOp,
    SessionQuery,
)

__all__ = ["KEY_PREFIX", "RedisSessionStore", "redacted_url"]

log = logging.getLogger("socks6fast.server")

#: Prefix of every key the store writes (one Redis database can serve other programs too).
KEY_PREFIX = "socks6fast:"

# The window arithmetic of TokenWindow.spend, in Lua 5.1 (numbers are doubles: exact far
# beyond 2^32). Returns ok (1/0) and the base after the spend; writes the window back.
_SPEND = """
local M = 4294967296
local MAX_TRACKED = 256
local function spend(key, base, size, adv, spentstr, token)
  local spent, n = {}, 0
  for tok in string.gmatch(spentstr, '%d+') do spent[tonumber(tok)] = true; n = n + 1 end
  local offset = (token - base) % M
  if offset >= size or spent[token] then return 0, base end
  local half = math.floor(size / 2)
  local shift = 0
  if offset > half then shift = offset - half end
  if n >= MAX_TRACKED then
    local lowest = nil
    for tok, _ in pairs(spent) do
      local o = (tok - base) % M
      if lowest == nil or o < lowest then lowest = o end
    end
    shift = math.max(shift, math.min(lowest, offset) + 1)
  end
  spent[token] = true
  n = n + 1
  if shift > 0 then
    local o = size - 1
    while o >= 0 and spent[(base + o) % M] do o = o - 1 end
    if o < 0 then o = size end
    shift = math.min(shift, o)
  end
  while shift < size and spent[(base + shift) % M] do shift = shift + 1 end
  shift = math.min(shift, adv)
  if shift > 0 then
    local kept, m = {}, 0
    for tok, _ in pairs(spent) do
      if (tok - base) % M >= shift then kept[tok] = true; m = m + 1 end
    end
    spent, n = kept, m
    base = (base + shift) % M
    adv = adv - shift
  end
  local ok = 1
  if n > MAX_TRACKED then
    spent[token] = nil
    ok = 0
  end
  local out = {}
  for tok, _ in pairs(spent) do out[#out + 1] = string.format('%.0f', tok) end
  redis.call('HSET', key, 'b', string.format('%.0f', base), 'a', string.format('%.0f', adv),
             't', table.concat(out, ' '))
  return ok, base
end
"""

_COMMON = (
    """
if redis.replicate_commands then redis.replicate_commands() end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- D38 (probe R-0): the store's epoch is this Redis process's run_id and replication ID. Both
-- change whenever the data may have gone back in time: a restart (from a snapshot or an AOF
-- that missed the last writes) gives a new run_id, a replica promoted (or a primary made a
-- replica and promoted back) a new master_replid. A session records the epoch it was made in;
-- one from another epoch is Session Invalid, so no window restored from older data is spent
-- again (IDM-03), whatever Redis's persistence or replication settings.
local function epoch(P)
  local info = redis.call('INFO', 'server', 'replication')
  local now = string.match(info, 'run_id:(%x+)') .. ':' .. string.match(info, 'master_replid:(%x+)')
  local key = P .. 'epoch'
  if redis.call('GET', key) ~= now then
    redis.call('SET', key, now)
    redis.call('UNLINK', P .. 'all')  -- the sessions it counts are of the old epoch
  end
  return now
end
local function forget(P, key, id, ip, user)
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'all', id)
  if ip then redis.call('ZREM', P .. 'ip:' .. ip, id) end
  if user then redis.call('ZREM', P .. 'u:' .. user, id) end
end
local function touch(P, id, ip, user, expires, idle)
  redis.call('ZADD', P .. 'all', expires, id)
  redis.call('ZADD', P .. 'ip:' .. ip, expires, id)
  redis.call('PEXPIRE', P .. 'ip:' .. ip, idle)
  if user then
    redis.call('ZADD', P .. 'u:' .. user, expires, id)
    redis.call('PEXPIRE', P .. 'u:' .. user, idle)
  end
end
"""
    + _SPEND
)

# KEYS[1] session key; ARGV: prefix, id, idle ms, token request (-1: none), max window,
# a random base, token (-1: none). Returns {0} when unknown, else
# {1, ip, user, base, size, spent (1/0, -1: no token), window issued (1/0)}.
_LOOKUP = (
    _COMMON
    + """
local key, P, id = KEYS[1], ARGV[1], ARGV[2]
local idle = tonumber(ARGV[3])
local h = redis.call('HMGET', key, 'ip', 'u', 'b', 's', 'a', 't', 'e')
if not h[1] then return {0} end
if h[7] ~= epoch(P) then
  forget(P, key, id, h[1], h[2])
  return {0}
end
redis.call('PEXPIRE', key, idle)
touch(P, id, h[1], h[2], clock_ms() + idle, idle)
local base, size, adv, spentstr = tonumber(h[3]), tonumber(h[4]), tonumber(h[5]), h[6] or ''
local request, max_window = tonumber(ARGV[4]), tonumber(ARGV[5])
local issued = 0
if not base and request > 0 and max_window > 0 then
  size = math.min(request, max_window)
  base = tonumber(ARGV[6])
  adv = 4294967296 - size
  redis.call('HSET', key, 'b', string.format('%.0f', base), 's', size,
             'a', string.format('%.0f', adv), 't', '')
  issued = 1
end
local spent = -1
local token = tonumber(ARGV[7])
if token >= 0 then
  if base then spent, base = spend(key, base, size, adv, spentstr, token) else spent = 0 end
end
return {1, h[1], h[2] or false, base or false, size or false, spent, issued}
"""
)

# KEYS[1] session key; ARGV: prefix, id, idle ms, client address, user ('' none), caps
# (-1: none) for all / per address / per user, token request (-1: none), max window, a random
# base. Returns {-1} when the id exists, {0} when a cap is hit, else {1, base, size}.
_CREATE = (
    _COMMON
    + """
local key, P, id = KEYS[1], ARGV[1], ARGV[2]
local idle, ip, user = tonumber(ARGV[3]), ARGV[4], ARGV[5]
if redis.call('EXISTS', key) == 1 then return {-1} end
if user == '' then user = false end
local ep = epoch(P)
local now = clock_ms()
local sets = {{P .. 'all', tonumber(ARGV[6])}, {P .. 'ip:' .. ip, tonumber(ARGV[7])}}
if user then sets[3] = {P .. 'u:' .. user, tonumber(ARGV[8])} end
for _, set in ipairs(sets) do
  redis.call('ZREMRANGEBYSCORE', set[1], '-inf', now)
  if set[2] >= 0 and redis.call('ZCARD', set[1]) >= set[2] then
    -- At the cap: drop the members of an older epoch (D38) before refusing; only here, so
    -- the common case stays O(log n). ``all`` never holds any (emptied at the epoch change).
    for _, member in ipairs(redis.call('ZRANGE', set[1], 0, -1)) do
      local e = redis.call('HGET', P .. 's:' .. member, 'e')
      if e ~= ep then
        redis.call('ZREM', set[1], member)
        if e then redis.call('DEL', P .. 's:' .. member) end
      end
    end
    if redis.call('ZCARD', set[1]) >= set[2] then return {0} end
  end
end
redis.call('HSET', key, 'ip', ip, 'e', ep)
if user then redis.call('HSET', key, 'u', user) end
redis.call('PEXPIRE', key, idle)
touch(P, id, ip, user, now + idle, idle)
local request, max_window = tonumber(ARGV[9]), tonumber(ARGV[10])
if request > 0 and max_window > 0 then
  local size = math.min(request, max_window)
  local base = tonumber(ARGV[11])
  redis.call('HSET', key, 'b', string.format('%.0f', base), 's', size,
             'a', string.format('%.0f', 4294967296 - size), 't', '')
  return {1, base, size}
end
return {1, false, false}
"""
)

# KEYS[1] session key; ARGV: prefix, id. Returns 1 when the session existed (now ended).
_TEARDOWN = """
local key, P, id = KEYS[1], ARGV[1], ARGV[2]
local h = redis.call('HMGET', key, 'ip', 'u')
if not h[1] then return 0 end
redis.call('DEL', key)
redis.call('ZREM', P .. 'all', id)
redis.call('ZREM', P .. 'ip:' .. h[1], id)
if h[2] then redis.call('ZREM', P .. 'u:' .. h[2], id) end
return 1
"""

# KEYS: session keys whose BIND listeners this process holds; ARGV: prefix. Returns the live
# session count, then 1/0 per key (it still exists, in the current epoch).
_SWEEP = (
    _COMMON
    + """
local P = ARGV[1]
local ep = epoch(P)
local all = P .. 'all'
redis.call('ZREMRANGEBYSCORE', all, '-inf', clock_ms())
local out = {redis.call('ZCARD', all)}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'e') == ep then out[i + 1] = 1 else out[i + 1] = 0 end
end
return out
"""
)


class _Listeners(dict[tuple[str, int], Any]):
    """``session.listeners`` of a session from Redis: put in the store's table of this process's
    BIND listeners (CMD-05) when the first listener is added, so that a lookup, which makes a
    new `Session`, finds them, and sessions without listeners cost no table entry."""

    __slots__ = ("_session_id", "_table")

    def __init__(self, table: dict[bytes, _Listeners], session_id: bytes) -> None:
        super().__init__()
        self._table = table
        self._session_id = session_id

    def __setitem__(self, key: tuple[str, int], value: Any) -> None:
        super().__setitem__(key, value)
        held = self._table.setdefault(self._session_id, self)
        if held is not self:  # two requests of the session raced to their first listener
            held[key] = value

    def __delitem__(self, key: tuple[str, int]) -> None:
        super().__delitem__(key)
        held = self._table.get(self._session_id)
        if held is not None and held is not self and held.get(key) is not None:
            del held[key]


def redacted_url(url: str) -> str:
    """``url`` without a password (for log lines and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


class RedisSessionStore:
    """A `socks6fast.proto.sessions.SharedSessionStore` on Redis (redis-py's asyncio API).

    Args:
        url: ``redis://host:port/db``, ``rediss://...`` (TLS) or ``unix:///path?db=N``.
        limits: the caps and timeouts (the ``[sessions]`` table).
        timeout: seconds to connect and to wait for each answer before the request fails.

    Raises:
        ImportError: the ``redis`` package is not installed (``socks6fast[redis]``).
        ValueError: redis-py does not accept the URL.
    """

    MAX_CONNECTIONS = 32
    """Connections to Redis per process at most; more concurrent requests wait for one."""

    OUTAGE_LOG_INTERVAL = 10.0
    """Seconds between two "does not answer" warnings: a store that fails and answers by turns
    logs one line per interval, not one per flap (probe R-1)."""

    def __init__(self, url: str, limits: SessionLimits, *, timeout: float = 1.0) -> None:
        # redis is an optional extra (socks6fast[redis]): imported only when a store is made.
        import redis.asyncio  # noqa: PLC0415
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415
        from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: PLC0415
        from redis.exceptions import RedisError  # noqa: PLC0415

        self.url = url
        self.name = redacted_url(url)
        """The URL for the log (no password)."""
        self.limits = limits
        self.counters = SessionCounters()
        self.active = 0
        """Live sessions in the whole Redis, as of the last `sweep` (the metrics gauge)."""
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        # One retry on a broken connection (a Redis restart leaves the pooled connection dead:
        # redis-py reconnects on the retry); none on a timeout, which would double the wait. A
        # retried spend is safe: if the first attempt ran, the token is spent and the retry
        # sees it rejected, so nothing is ever accepted twice (IDM-03).
        # A blocking pool (probe R-1): when all MAX_CONNECTIONS are busy a request waits for one
        # (at most ``timeout``, then it fails like a Redis that does not answer) instead of
        # failing at once with MaxConnectionsError while Redis is healthy. Redis runs the
        # scripts one at a time anyway: more connections would not answer sooner.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=self.MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._client: Any = redis.asyncio.Redis.from_pool(pool)
        self._lookup = self._client.register_script(_LOOKUP)
        self._create = self._client.register_script(_CREATE)
        self._teardown = self._client.register_script(_TEARDOWN)
        self._sweep = self._client.register_script(_SWEEP)
        self.users: Container[str] | None = None
        """This host's current users (the server sets it at start and on reload): a session
        of a user not among them is Session Invalid here (probe S-1); None: not checked."""
        self._local: dict[bytes, _Listeners] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_since: float | None = None
        self._failed = 0
        self._warned_at: float | None = None
        """When the last "does not answer" warning was logged (None: none since its recovery
        line)."""
        self._last_warning = -self.OUTAGE_LOG_INTERVAL

    def __len__(self) -> int:
        return self.active

    # -- the request path ----------------------------------------------------------------

    async def answer(self, query: SessionQuery) -> SessionAnswer:
        """Answer one request's query in one round trip (the `AskSessionStore` action).

        Raises:
            SessionStoreError: Redis did not answer (D37).
        """
        op = query.op
        try:
            if op is SessionOp.LOOKUP or op is SessionOp.TOUCH:
                answer = await self._answer_lookup(query)
            elif op is SessionOp.CREATE:
                answer = await self._answer_create(query)
            else:
                answer = await self._answer_teardown(query)
        except self._errors as exc:
            raise self._outage(exc) from exc
        if self._down_since is not None:
            self._recovered()
        return answer

    def send(self, query: SessionQuery) -> None:
        """Send a TOUCH or a D4 TEARDOWN without waiting; a failure counts in the outage log."""
        task = asyncio.get_running_loop().create_task(self._send(query))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, query: SessionQuery) -> None:
        try:
            await self.answer(query)
        except SessionStoreError:
            pass  # logged once per outage by `answer`

    def _key(self, session_id: bytes) -> str:
        return f"{KEY_PREFIX}s:{session_id.hex()}"

    def _idle_ms(self) -> int:
        return max(1, int(self.limits.idle_timeout * 1000))

    def _listeners(self, session_id: bytes) -> _Listeners:
        listeners = self._local.get(session_id)
        return listeners if listeners is not None else _Listeners(self._local, session_id)

    def _session(self, session_id: bytes, user: str | None, client_ip: str) -> Session:
        now = time.monotonic()
        return Session(session_id, user, client_ip, now, now, listeners=self._listeners(session_id))

    async def _answer_lookup(self, query: SessionQuery) -> SessionAnswer:
        session_id = query.session_id
        touch = query.op is SessionOp.TOUCH
        request = query.token_request if query.token_request is not None and not touch else -1
        token = query.token if query.token is not None and not touch else -1
        result = await self._lookup(
            keys=[self._key(session_id)],
            args=[
                KEY_PREFIX,
                session_id.hex(),
                self._idle_ms(),
                request,
                self.limits.max_token_window,
                secrets.randbits(32),
                token,
            ],
        )
        if int(result[0]) == 0:
            return SessionAnswer(None)
        _, ip, user, base, size, spent, issued = result
        name = _text(user)
        if name is not None and self.users is not None and name not in self.users:
            # S-1, SES-04: requests in a session act as its user, whom this host no longer
            # knows (removed from [users]): Session Invalid. Not deleted from Redis: during a
            # rolling change another host may still (or already) know the user. A token the
            # script spent is lost to the client, never accepted (IDM-03).
            return SessionAnswer(None)
        counters = self.counters
        if int(issued):
            counters.windows += 1
        if token >= 0:
            if int(spent) == 1:
                counters.tokens_spent += 1
            else:
                counters.tokens_rejected += 1
        window = (int(base), int(size)) if base is not None else None
        session = self._session(session_id, name, _text(ip) or "")
        return SessionAnswer(session, window, int(spent) == 1)

    async def _answer_create(self, query: SessionQuery) -> SessionAnswer:
        limits = self.limits
        caps = [
            -1 if cap is None else cap
            for cap in (limits.max_sessions, limits.max_per_client_ip, limits.max_per_user)
        ]
        request = query.token_request if query.token_request is not None else -1
        for _ in range(3):  # a taken ID: 2^-128 per pair, but never reuse one
            session_id = secrets.token_bytes(SESSION_ID_LENGTH)
            result = await self._create(
                keys=[self._key(session_id)],
                args=[
                    KEY_PREFIX,
                    session_id.hex(),
                    self._idle_ms(),
                    query.client_ip,
                    query.user or "",
                    *caps,
                    request,
                    limits.max_token_window,
                    secrets.randbits(32),
                ],
            )
            status = int(result[0])
            if status == -1:  # pragma: no cover - 2^-128
                continue
            if status == 0:
                self.counters.declined += 1
                return SessionAnswer(None)
            self.counters.created += 1
            base, size = result[1], result[2]
            window = None
            if base is not None:
                self.counters.windows += 1
                window = (int(base), int(size))
            return SessionAnswer(self._session(session_id, query.user, query.client_ip), window)
        raise SessionStoreError("no free session ID in three tries")  # pragma: no cover

    async def _answer_teardown(self, query: SessionQuery) -> SessionAnswer:
        session_id = query.session_id
        existed = await self._teardown(keys=[self._key(session_id)], args=[KEY_PREFIX, session_id.hex()])
        listeners = self._local.pop(session_id, None)
        if not int(existed):
            if listeners:
                # Gone from Redis already (expired, or ended elsewhere): close ours anyway.
                return SessionAnswer(Session(session_id, None, "", 0.0, 0.0, listeners=listeners))
            return SessionAnswer(None)
        return SessionAnswer(Session(session_id, None, "", 0.0, 0.0, listeners=listeners or {}))

    # -- outages (D37) -------------------------------------------------------------------

    def _outage(self, exc: BaseException) -> SessionStoreError:
        self._failed += 1
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._down_since is None:
            now = time.monotonic()
            self._down_since = now
            if self._warned_at is None and now - self._last_warning >= self.OUTAGE_LOG_INTERVAL:
                self._warned_at = self._last_warning = now
                log.warning(
                    "session store %s does not answer (%s): requests that need a session fail "
                    "with General Failure, new sessions are declined, until it answers again (D37)",
                    self.name,
                    cause,
                )
        return SessionStoreError(f"{self.name} does not answer ({cause})")

    def _recovered(self) -> None:
        """An answer after failures. Logged once per warning: a store that flaps within
        OUTAGE_LOG_INTERVAL keeps counting failures silently, reported by the next line."""
        self._down_since = None
        warned_at = self._warned_at
        if warned_at is None:
            return
        log.warning(
            "session store %s answers again after %.1fs; %d requests failed meanwhile",
            self.name,
            time.monotonic() - warned_at,
            self._failed,
        )
        self._warned_at = None
        self._failed = 0

    @property
    def down(self) -> bool:
        """The last request to Redis failed (an outage is in progress)."""
        return self._down_since is not None

    # -- housekeeping --------------------------------------------------------------------

    def next_deadline(self, now: float, gauge: bool) -> float | None:
        """When `sweep` should run next: within a second while this process holds BIND
        listeners of sessions (another host may end them), else every 5 s when ``gauge`` (the
        metrics are scraped), else never (no Redis traffic but the requests' own)."""
        for session_id in [sid for sid, listeners in self._local.items() if not listeners]:
            del self._local[session_id]  # their listeners were closed
        if self._local:
            return now + 1.0
        return now + 5.0 if gauge else None

    async def sweep(self) -> list[Session]:
        """Refresh the live-session count; return the sessions whose BIND listeners this
        process holds and which ended (expired, or torn down on another host), to close them.
        Never raises: an outage is logged once (D37)."""
        held = [sid for sid, listeners in self._local.items() if listeners]
        try:
            result = await self._sweep(keys=[self._key(sid) for sid in held], args=[KEY_PREFIX])
        except self._errors as exc:
            self._outage(exc)
            return []
        if self._down_since is not None:
            self._recovered()
        self.active = int(result[0])
        ended: list[Session] = []
        for session_id, exists in zip(held, result[1:], strict=True):
            if not int(exists):
                listeners = self._local.pop(session_id, None)
                if listeners:
                    ended.append(Session(session_id, None, "", 0.0, 0.0, listeners=listeners))
        return ended

    def held_sessions(self) -> list[Session]:
        """Every session this process holds BIND listeners for (closed at shutdown)."""
        sessions = [Session(sid, None, "", 0.0, 0.0, listeners=ls) for sid, ls in self._local.items() if ls]
        self._local.clear()
        return sessions

    async def close(self) -> None:
        """Wait briefly for the queries sent without waiting, then close the connections."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        await self._client.aclose()
