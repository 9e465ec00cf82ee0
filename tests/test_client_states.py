"""The client's state machines use the proxy's idiom (issue 9 item 4): every move is a
row of a (state, step) table in proto/states.py, and no other module assigns a state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from socks6fast.errors import LocalProtocolError
from socks6fast.proto.states import (
    ClientState,
    ClientStep,
    SessionState,
    SessionStep,
    client_transition,
    session_transition,
)

PACKAGE = Path(__file__).resolve().parent.parent / "socks6fast"


def test_a_request_fails_from_any_unfinished_state() -> None:
    for state in ClientState:
        if state in (ClientState.ESTABLISHED, ClientState.MUST_CLOSE):
            with pytest.raises(LocalProtocolError):
                client_transition(state, ClientStep.FAILED)
        else:
            assert client_transition(state, ClientStep.FAILED) is ClientState.ERROR


def test_a_step_out_of_order_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="in state idle"):
        client_transition(ClientState.IDLE, ClientStep.AUTHENTICATED)
    with pytest.raises(LocalProtocolError):
        client_transition(ClientState.AWAIT_BIND_PEER, ClientStep.BIND_BOUND)


def test_the_slow_exchange_and_bind_paths() -> None:
    state = ClientState.IDLE
    for step in (
        ClientStep.REQUEST_SENT,
        ClientStep.USERPASS_SENT,
        ClientStep.USERPASS_ACCEPTED,
        ClientStep.AUTHENTICATED,
        ClientStep.BIND_BOUND,
        ClientStep.OPERATION_DONE,
    ):
        state = client_transition(state, step)
    assert state is ClientState.ESTABLISHED


def test_late_session_replies_do_not_move_a_session() -> None:
    """A reply to a replaced session (after Session Invalid) arrives when no row applies: no
    move."""
    assert session_transition(SessionState.ACTIVE, SessionStep.GRANTED) is SessionState.ACTIVE
    assert session_transition(SessionState.NEW, SessionStep.DECLINED) is SessionState.NEW
    assert session_transition(SessionState.CLOSED, SessionStep.INVALID) is SessionState.CLOSED
    assert session_transition(SessionState.PENDING, SessionStep.GRANTED) is SessionState.ACTIVE
    assert session_transition(SessionState.ACTIVE, SessionStep.INVALID) is SessionState.NEW


def _state_assignments(path: Path) -> list[str]:
    """``x.state = ClientState.X`` / ``SessionState.X`` outside ``__init__``."""
    found = []
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, ast.FunctionDef) or func.name == "__init__":
            continue
        for node in ast.walk(func):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id in ("ClientState", "SessionState")
            ):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_state_is_assigned_outside_the_tables() -> None:
    offenders = [hit for path in PACKAGE.rglob("*.py") for hit in _state_assignments(path)]
    assert not offenders, f"states assigned outside proto/states.py's tables: {offenders}"
