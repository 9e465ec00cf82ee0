"""Tests for socks6fast.proto.sessions: sessions (SES-01..SES-05) and token windows (IDM-02..IDM-04)."""

from __future__ import annotations

import random
import sys

import pytest

from socks6fast.constants import MAX_WINDOW_SIZE
from socks6fast.proto import sessions
from socks6fast.proto.sessions import (
    SESSION_ID_LENGTH,
    MemorySessionStore,
    Session,
    SessionLimits,
    SessionStore,
    TokenWindow,
    token_lt,
)

MOD = 2**32


def make_store(**kwargs: float | int | None) -> MemorySessionStore:
    return MemorySessionStore(SessionLimits(**kwargs))  # type: ignore[arg-type]


def test_memory_store_satisfies_protocol() -> None:
    store: SessionStore = MemorySessionStore()
    assert len(store) == 0


# --- sessions ---------------------------------------------------------------------------


@pytest.mark.conformance("SES-01")
def test_session_id_is_random_multiple_of_four() -> None:
    store = MemorySessionStore()
    ids = set()
    for _ in range(50):
        session = store.create("alice", "192.0.2.1", 0.0)
        assert session is not None
        assert len(session.session_id) == SESSION_ID_LENGTH
        assert len(session.session_id) % 4 == 0 and session.session_id
        ids.add(session.session_id)
    assert len(ids) == 50


@pytest.mark.conformance("SES-04")
def test_lookup_finds_session_and_carries_user() -> None:
    store = MemorySessionStore()
    session = store.create("alice", "192.0.2.1", 10.0)
    assert session is not None
    found = store.lookup(session.session_id, 11.0)
    assert found is session
    assert found.user == "alice"
    assert found.created == 10.0 and found.last_used == 11.0
    anonymous = store.create(None, "192.0.2.1", 12.0)
    assert anonymous is not None and anonymous.user is None


@pytest.mark.conformance("SES-03")
def test_unknown_session_id_is_invalid() -> None:
    store = MemorySessionStore()
    assert store.lookup(b"\x00" * 16, 0.0) is None
    assert store.lookup(b"", 0.0) is None


@pytest.mark.conformance("SES-05")
def test_teardown_ends_session() -> None:
    store = MemorySessionStore()
    session = store.create("alice", "192.0.2.1", 0.0)
    assert session is not None
    session.listeners[("192.0.2.10", 4000)] = "handle"
    ended = store.teardown(session.session_id)
    assert ended is session and ended.listeners == {("192.0.2.10", 4000): "handle"}
    assert store.lookup(session.session_id, 1.0) is None
    assert store.teardown(session.session_id) is None
    assert len(store) == 0


@pytest.mark.conformance("SES-04")
def test_sessions_expire_after_inactivity() -> None:
    store = MemorySessionStore(SessionLimits(idle_timeout=30.0))
    assert store.next_deadline() is None
    a = store.create("alice", "192.0.2.1", 0.0)
    b = store.create("bob", "192.0.2.2", 5.0)
    assert a is not None and b is not None
    assert store.next_deadline() == 30.0
    assert store.lookup(a.session_id, 20.0) is a  # use moves a to the back
    assert store.next_deadline() == 35.0
    assert store.expire(34.9) == []
    assert store.expire(35.1) == [b]
    assert store.next_deadline() == 50.0
    assert store.lookup(b.session_id, 35.2) is None
    # Past its deadline but not yet collected: invalid, not revived, and handed to expire().
    assert store.lookup(a.session_id, 50.5) is None
    store.touch(a, 50.6)
    assert a.last_used == 20.0
    assert store.expire(50.7) == [a]
    assert store.next_deadline() is None and len(store) == 0


def test_touch_keeps_session_alive() -> None:
    store = MemorySessionStore(SessionLimits(idle_timeout=10.0))
    session = store.create(None, "192.0.2.1", 0.0)
    assert session is not None
    store.touch(session, 9.0)
    assert store.expire(15.0) == []
    assert store.next_deadline() == 19.0


@pytest.mark.conformance("SES-04")
def test_cap_per_client_ip() -> None:
    store = MemorySessionStore(SessionLimits(max_per_client_ip=2, max_per_user=None))
    first = store.create("alice", "192.0.2.1", 0.0)
    assert first is not None
    assert store.create("bob", "192.0.2.1", 0.0) is not None
    assert store.create(None, "192.0.2.1", 0.0) is None  # silently not honoured
    assert store.create("alice", "192.0.2.2", 0.0) is not None
    store.teardown(first.session_id)
    assert store.create(None, "192.0.2.1", 0.0) is not None


@pytest.mark.conformance("SES-04")
def test_cap_per_user() -> None:
    store = MemorySessionStore(SessionLimits(max_per_client_ip=None, max_per_user=2))
    assert store.create("alice", "192.0.2.1", 0.0) is not None
    assert store.create("alice", "192.0.2.2", 0.0) is not None
    assert store.create("alice", "192.0.2.3", 0.0) is None
    assert store.create("bob", "192.0.2.3", 0.0) is not None
    # Unauthenticated sessions are not a "user": only the per-IP cap applies to them.
    for _ in range(5):
        assert store.create(None, "192.0.2.9", 0.0) is not None


def test_total_cap_and_expiry_frees_slots() -> None:
    store = MemorySessionStore(SessionLimits(max_sessions=2, idle_timeout=1.0))
    assert store.create(None, "192.0.2.1", 0.0) is not None
    assert store.create(None, "192.0.2.2", 0.0) is not None
    assert store.create(None, "192.0.2.3", 0.5) is None
    assert len(store.expire(2.0)) == 2
    assert store.create(None, "192.0.2.3", 2.0) is not None


def test_counters_do_not_leak() -> None:
    store = MemorySessionStore()
    made = [store.create(f"user{i % 3}", f"192.0.2.{i % 5}", 0.0) for i in range(30)]
    for session in made:
        assert session is not None
        store.teardown(session.session_id)
    assert store._by_client_ip == {} and store._by_user == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idle_timeout": 0},
        {"max_token_window": -1},
        {"max_token_window": 2**31},
        {"max_per_client_ip": 0},
        {"max_sessions": 0},
    ],
)
def test_store_rejects_bad_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_store(**kwargs)


# --- token windows: issuing -------------------------------------------------------------


def _session(store: MemorySessionStore) -> Session:
    session = store.create("alice", "192.0.2.1", 0.0)
    assert session is not None
    return session


@pytest.mark.conformance("IDM-02")
def test_window_issued_once_per_session() -> None:
    store = MemorySessionStore(SessionLimits(max_token_window=100))
    session = _session(store)
    issued = store.request_window(session, 10)
    assert issued is not None
    base, size = issued
    assert size == 10 and 0 <= base < MOD
    assert session.window is not None and session.window.current == (base, size)
    assert store.request_window(session, 20) is None  # "MUST NOT issue a new window"
    assert session.window.current == (base, size)


@pytest.mark.conformance("IDM-02")
def test_window_size_is_min_of_requested_and_max() -> None:  # D15
    store = MemorySessionStore(SessionLimits(max_token_window=64))
    issued = store.request_window(_session(store), 2**32 - 1)
    assert issued is not None and issued[1] == 64
    big = MemorySessionStore(SessionLimits(max_token_window=MAX_WINDOW_SIZE))
    issued = big.request_window(_session(big), 2**32 - 1)
    assert issued is not None and issued[1] == MAX_WINDOW_SIZE < 2**31


def test_window_request_for_zero_is_ignored() -> None:  # D15
    store = MemorySessionStore()
    session = _session(store)
    assert store.request_window(session, 0) is None
    assert session.window is None
    assert store.request_window(session, 5) is not None  # a later real request still works


def test_windows_disabled() -> None:
    store = MemorySessionStore(SessionLimits(max_token_window=0))
    assert store.request_window(_session(store), 5) is None


def test_window_base_is_random() -> None:
    store = MemorySessionStore(SessionLimits(max_per_client_ip=None))
    bases = set()
    for _ in range(20):
        issued = store.request_window(_session(store), 4)
        assert issued is not None
        bases.add(issued[0])
    assert len(bases) > 1


@pytest.mark.conformance("IDM-03")
def test_spend_without_window_is_rejected() -> None:
    store = MemorySessionStore()
    assert not store.spend(_session(store), 0)


def test_window_size_bounds() -> None:
    with pytest.raises(ValueError):
        TokenWindow(0, 0)
    with pytest.raises(ValueError):
        TokenWindow(0, 2**31)
    assert TokenWindow(MOD + 5, 1).base == 5


# --- token windows: spending and shifting -----------------------------------------------


@pytest.mark.conformance("IDM-04")
def test_token_order_is_modular() -> None:
    assert token_lt(1, 2)
    assert not token_lt(2, 1)
    assert not token_lt(7, 7)
    assert token_lt(MOD - 1, 0)  # wraps
    assert token_lt(MOD - 10, 5)
    assert not token_lt(5, MOD - 10)
    assert token_lt(0, 2**31 - 1)
    assert not token_lt(0, 2**31)  # exactly half the space apart: neither is less
    assert not token_lt(2**31, 0)


@pytest.mark.conformance("IDM-03")
def test_spend_each_token_once() -> None:
    window = TokenWindow(1000, 8)
    assert window.spend(1000)
    assert not window.spend(1000)  # replay
    assert window.spend(1002)
    assert not window.spend(1002)  # replay above the base
    assert not window.spend(999)  # below the window
    assert not window.spend(1000 + 8 + 5)  # above the window


@pytest.mark.conformance("IDM-03")
def test_replayed_request_is_never_accepted_again() -> None:
    store = MemorySessionStore(SessionLimits(max_token_window=16))
    session = _session(store)
    issued = store.request_window(session, 16)
    assert issued is not None
    base = issued[0]
    seen: list[int] = []
    for i in range(40):
        token = (base + i) & (MOD - 1)
        if store.spend(session, token):
            seen.append(token)
    for token in seen:
        assert not store.spend(session, token)


@pytest.mark.conformance("IDM-04")
def test_lowest_token_spent_shifts_past_spent_run() -> None:
    window = TokenWindow(100, 10)
    assert window.spend(102)
    assert window.spend(101)
    assert window.current == (100, 10)  # lowest (100) still unspent: no shift
    assert window.spend(100)
    assert window.current == (103, 10)  # past 100 and the spent 101, 102; size kept
    assert window._spent == set()
    assert window.is_eligible(112) and not window.is_eligible(113)


def test_in_order_spending_keeps_state_empty() -> None:
    window = TokenWindow(0, 4)
    for token in range(1000):
        assert window.spend(token)
        assert window.current == (token + 1, 4)
        assert not window._spent


@pytest.mark.conformance("IDM-04")
def test_high_order_shift_skips_spent_run() -> None:
    window = TokenWindow(0, 10)
    assert window.spend(3)
    assert window.spend(8)
    assert window.current == (4, 10)  # 8 - 5 = 3 is spent: skipped
    assert not window.is_eligible(0) and not window.is_eligible(3)  # lagging tokens dropped
    assert window.is_eligible(4) and not window.is_eligible(8) and window.is_eligible(13)
    assert not window.is_eligible(14)


@pytest.mark.conformance("IDM-04")
def test_high_order_spends_walk_the_window() -> None:
    window = TokenWindow(0, 4)
    assert window.spend(3)  # upper half (offset 3 > 2): 3 moves to offset 2
    assert window.current == (1, 4)
    assert window.spend(4)  # offset 3 again
    assert window.current == (2, 4)
    assert window.is_eligible(2) and not window.is_eligible(3) and window.is_eligible(5)


@pytest.mark.conformance("IDM-04")
def test_shift_never_passes_highest_unspent_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety net: a forced shift is clamped at the highest unspent token, then refused."""
    monkeypatch.setattr(sessions, "MAX_SPENT_TRACKED", 2)
    window = TokenWindow(0, 8)
    window._spent.update({2, 3, 4, 5, 6, 7})  # state no client can build; tests the clamp
    assert window._highest_unspent_offset() == 1
    assert not window.spend(1)  # would move past 0, the highest unspent token: refused
    assert window.current == (0, 8) and 1 not in window._spent
    assert window._highest_unspent_offset() == 1


def test_full_window_spent_moves_past_it() -> None:
    window = TokenWindow(50, 1)
    assert window.spend(50)
    assert window.current == (51, 1)
    assert not window.spend(50)
    assert window.spend(51)


@pytest.mark.conformance("IDM-03", "IDM-04")
def test_wraparound_at_two_to_the_32() -> None:
    base = MOD - 3
    window = TokenWindow(base, 6)  # tokens 2^32-3, 2^32-2, 2^32-1, 0, 1, 2
    assert window.is_eligible(MOD - 1) and window.is_eligible(0) and window.is_eligible(2)
    assert not window.is_eligible(3) and not window.is_eligible(MOD - 4)
    assert window.spend(1)  # across the wrap, offset 4 > 3: shift to offset 1
    assert window.current == (MOD - 2, 6)
    assert window.spend(MOD - 2)
    assert window.spend(MOD - 1)
    assert window.spend(0)
    assert window.current == (2, 6)  # skipped 0 and the spent 1, wrapped to small numbers
    assert not window.spend(1) and not window.spend(0) and not window.spend(MOD - 1)  # IDM-03
    assert window.spend(2) and window.current == (3, 6)
    assert window.spend(MOD + 3)  # tokens are taken modulo 2^32
    assert window.current == (4, 6)


@pytest.mark.conformance("IDM-04")
def test_huge_window_is_compact() -> None:
    window = TokenWindow(7, MAX_WINDOW_SIZE)
    top = (7 + MAX_WINDOW_SIZE - 1) & (MOD - 1)
    assert window.spend(top)
    assert window.current == ((top - MAX_WINDOW_SIZE // 2) & (MOD - 1), MAX_WINDOW_SIZE)
    assert window.spend((7 + 5) & (MOD - 1)) is False  # dropped, lagging half a window
    assert window.spend(window.base + 10)
    assert sys.getsizeof(window._spent) < 4096


def test_out_of_order_spends_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_SPENT_TRACKED", 4)
    window = TokenWindow(0, 1000)
    for token in range(1, 20):  # token 0 never arrives
        assert window.spend(token)
        assert len(window._spent) <= 4
    assert not window.is_eligible(0)  # given up on: the base moved past it
    for token in range(1, 20):
        assert not window.spend(token)


@pytest.mark.conformance("IDM-03", "IDM-04")
def test_base_never_wraps_onto_spent_tokens() -> None:
    """Over its life a window moves at most 2^32 - size, so old tokens cannot come back."""
    size = 2**31 - 1
    window = TokenWindow(0, size)
    first = size - 1
    assert window.spend(first)
    total = (window.base - 0) & (MOD - 1)
    spent = [first]
    # Keep spending the top token: each spend shifts by about half a window.
    for _ in range(10):
        top = (window.base + size - 1) & (MOD - 1)
        if window.spend(top):
            spent.append(top)
        total = window._advance_left
    assert total >= 0
    assert window._advance_left == 0  # ran out of room
    for token in spent:
        assert not window.spend(token)


@pytest.mark.conformance("IDM-03", "IDM-04")
@pytest.mark.parametrize("size", [1, 2, 3, 8, 16, 17])
def test_half_window_spread_never_loses_tokens(size: int) -> None:
    """A client that stays within size // 2 of its oldest unanswered token, with its requests
    arriving in any order, gets every token accepted."""
    rng = random.Random(size)
    start = MOD - 20  # crosses the wrap as well
    window = TokenWindow(start, size)
    in_flight: list[int] = []
    next_token = start
    for _ in range(500):
        oldest = min(in_flight, default=next_token)
        while next_token - oldest <= size // 2:
            in_flight.append(next_token)
            next_token += 1
        token = in_flight.pop(rng.randrange(len(in_flight)))
        assert window.spend(token), (token & (MOD - 1), window.current)
        assert not window.spend(token)
