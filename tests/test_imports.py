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

from socks6fast.proto import client as client_connection
from socks6fast.proto import server as server_connection
from socks6fast.proto import states

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


#: Every module of the sans-IO core, read from the folder so that a new one is checked too.
PROTO_MODULES = sorted(
    f"socks6fast.proto.{p.stem}" if p.stem != "__init__" else "socks6fast.proto"
    for p in (ROOT / "socks6fast" / "proto").glob("*.py")
)


@pytest.mark.parametrize("module", PROTO_MODULES)
def test_sans_io_modules_import_no_io(module: str) -> None:
    """Importing any module of socks6fast/proto/ leaves asyncio, socket and ssl out of sys.modules."""
    imported = _imported_after(module)
    assert not any(imported.values()), imported


def test_both_roles_share_the_sentinels() -> None:
    """The proxy and client connections return the one NEED_DATA/PAUSED of proto/states.py."""
    assert states.NEED_DATA is server_connection.NEED_DATA is client_connection.NEED_DATA
    assert states.PAUSED is server_connection.PAUSED is client_connection.PAUSED
