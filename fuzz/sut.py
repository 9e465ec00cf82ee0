"""The system under test: the one place that names socks6fast's module paths.

The package is being reorganised by layer (``socks6fast/proto/`` for the sans-IO core);
every fuzz target imports the codec twins, the SOCKS 5 codec and the connection state
machines through this module only, so a move is fixed here and nowhere else.

The INSTALLED package is imported (as the test suite does), not the source tree beside
``fuzz/``: the source tree has no compiled ``_codec_c``. The repository root, which
``python -m fuzz`` puts first on ``sys.path``, is dropped before the import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

_ROOT = Path(__file__).resolve().parent.parent


def _drop_source_tree() -> None:
    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == _ROOT
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path if not is_root(entry)]


_drop_source_tree()

# ruff: noqa: E402 (the imports must follow the sys.path fix above)
from socks6fast import constants, errors
from socks6fast.proto import _codec_py as codec_py
from socks6fast.proto import client as client_connection
from socks6fast.proto import codec, messages, server_common, server_wire, socks5, states
from socks6fast.proto import stack as stackopts

#: The proxy's wire-level state machines (bytes in, events out, replies checked against the
#: states of ``proto/states.py``) and the helpers the server target needs, under the names
#: the target uses. The decision core above them (``proto.server.ServerConnection``: actions
#: out, completions in) is not driven by a target yet.
server_connection = SimpleNamespace(
    ServerConnection=server_wire.ServerWire,
    Socks5ServerConnection=server_wire.Socks5ServerWire,
    ConnectionClosed=server_wire.ConnectionClosed,
    failure_reply=server_wire.failure_reply,
    NEED_DATA=states.NEED_DATA,
    PAUSED=states.PAUSED,
    Protocol=states.Protocol,
    State=states.State,
    StackPlan=stackopts.StackPlan,
    detect_protocol=server_common.detect_protocol,
    noop_address_ok=server_common.noop_address_ok,
    is_dns_request=server_common.is_dns_request,
)

#: The twin's module name (``load_codec_c``).
CODEC_C = "socks6fast.proto._codec_c"

if Path(codec_py.__file__).resolve().is_relative_to(_ROOT / "socks6fast"):  # a broken set-up
    raise ImportError(f"socks6fast was imported from the source tree {_ROOT}, not from the installed package")


#: Path of a native (``-fsanitize=fuzzer-no-link``) build of ``_codec_c`` to load, or "".
NATIVE = os.environ.get("SOCKS6FAST_FUZZ_NATIVE", "")


def load_codec_c() -> ModuleType:
    """The Cython twin ``_codec_c`` (ImportError when the package was built without extensions).

    With ``SOCKS6FAST_FUZZ_NATIVE=<path of a .so>`` that build is loaded instead: a copy
    compiled with ``-fsanitize=fuzzer-no-link`` whose edges libFuzzer sees (``python -m fuzz
    build-native``).
    """
    if not NATIVE:
        return importlib.import_module(CODEC_C)
    spec = importlib.util.spec_from_file_location(CODEC_C, NATIVE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {NATIVE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[CODEC_C] = module
    spec.loader.exec_module(module)
    return module


__all__ = [
    "client_connection",
    "codec",
    "codec_py",
    "constants",
    "errors",
    "load_codec_c",
    "messages",
    "server_connection",
    "socks5",
    "stackopts",
]
