"""Sans-IO purity (STYLE.md section 2): the protocol core imports no I/O machinery.

Checked in a fresh interpreter (``python -I``), as multidict's
tests/test_circular_imports.py does: an import made by another test in this process
would hide a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from socks6fast import client_connection, connection, server_connection

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = ("asyncio", "socket", "ssl", "selectors", "_socket")


def _imported_after(module: str) -> dict[str, bool]:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"import {module}\n"
        f"print(json.dumps({{name: name in sys.modules for name in {IO_MODULES!r}}}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "module",
    [
        "socks6fast.connection",
        "socks6fast.server_connection",
        "socks6fast._state",
        "socks6fast.sessions",
        "socks6fast.policy",
    ],
)
def test_sans_io_modules_import_no_io(module: str) -> None:
    """Importing the sans-IO layer leaves asyncio, socket and ssl out of sys.modules."""
    imported = _imported_after(module)
    assert not any(imported.values()), imported


def test_connection_exports_both_roles() -> None:
    """connection.py re-exports the proxy and client connections and one NEED_DATA/PAUSED."""
    assert connection.ServerConnection is server_connection.ServerConnection
    assert connection.ClientConnection is client_connection.ClientConnection
    assert connection.NEED_DATA is server_connection.NEED_DATA is client_connection.NEED_DATA
    assert connection.PAUSED is server_connection.PAUSED is client_connection.PAUSED
