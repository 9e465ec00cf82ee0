"""The compiled codec is the one in use, and both twins have the same surface.

yarl tests/test_quoting.py ``test_quoting_c_loaded`` / aiohttp ``test_c_parser_loaded``:
unless ``SOCKS6FAST_NO_EXTENSIONS`` is set, a normal install must run the Cython
twin; ``codec.py`` silently falls back to the reference on ImportError, so this
is the test that fails when the extension was not built or does not import.
STYLE.md 3.3: both twins export the same public names, those of the contract.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest
from codec_api import CodecAPI

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.proto import _codec_py, codec
from socks6fast.proto.messages import Request

# The contract's functions, from the Protocol in tests/codec_api.py.
CONTRACT = sorted(name for name in vars(CodecAPI) if not name.startswith("_"))


def _public_functions(module: ModuleType) -> list[str]:
    """Public callables defined by the module itself (not imported names)."""
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and not isinstance(value, type)
        and getattr(value, "__module__", None) == module.__name__
    )


def test_reference_exports_the_contract() -> None:
    assert sorted(_codec_py.__all__) == CONTRACT
    assert _public_functions(_codec_py) == CONTRACT


def test_selector_exports_the_contract() -> None:
    assert set(CONTRACT) <= set(codec.__all__)
    for name in CONTRACT:
        assert callable(getattr(codec, name))


@pytest.mark.c_extension
@pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_c_twin_exports_the_same_names() -> None:
    codec_c = importlib.import_module("socks6fast.proto._codec_c")
    assert sorted(codec_c.__all__) == sorted(_codec_py.__all__)
    assert _public_functions(codec_c) == _public_functions(_codec_py)


@pytest.mark.c_extension
@pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_codec_c_loaded() -> None:
    """Every public codec function is the compiled one."""
    codec_c = importlib.import_module("socks6fast.proto._codec_c")
    # A compiled module, not a stray .py of the same name.
    assert codec_c.__file__ is not None
    assert not codec_c.__file__.endswith(".py")
    assert codec.IMPLEMENTATION == "c"
    for name in CONTRACT:
        assert getattr(codec, name) is getattr(codec_c, name), name
        assert type(getattr(codec, name)).__name__ != "function", name  # not a Python def


@dataclasses.dataclass(frozen=True, slots=True)
class _Checked:
    """A message class with its own check, which the twin's slot writes would skip."""

    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError("port out of range")


@dataclasses.dataclass(frozen=True, slots=True)
class _HandInit:
    port: int

    def __init__(self, port: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError("port out of range")
        object.__setattr__(self, "port", port)


@pytest.mark.c_extension
@pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_c_twin_refuses_message_classes_with_their_own_checks() -> None:
    """The Cython twin builds messages without __init__ (slot writes): it refuses to load
    for a class whose __post_init__ or hand-written __init__ checks something, so no
    decoder path can skip a message's own checks (issue 9 item 5)."""
    codec_c = importlib.import_module("socks6fast.proto._codec_c")
    codec_c._check_layout(Request)  # today's messages: generated __init__, no checks
    for cls in (_Checked, _HandInit):
        with pytest.raises(ImportError, match="would skip"):
            codec_c._check_layout(cls)


@pytest.mark.skipif(not NO_EXTENSIONS, reason="only in a SOCKS6FAST_NO_EXTENSIONS=1 run")
def test_codec_py_selected_without_extensions() -> None:
    assert codec.IMPLEMENTATION == "py"
    for name in CONTRACT:
        assert getattr(codec, name) is getattr(_codec_py, name), name


def test_no_extensions_switch_selects_the_reference() -> None:
    """SOCKS6FAST_NO_EXTENSIONS=1 selects the reference even where the extension exists."""
    program = (
        "from socks6fast.proto import codec, _codec_py\n"
        f"names = {CONTRACT!r}\n"
        "assert codec.IMPLEMENTATION == 'py', codec.IMPLEMENTATION\n"
        "assert all(getattr(codec, n) is getattr(_codec_py, n) for n in names)\n"
    )
    env = {**os.environ, "SOCKS6FAST_NO_EXTENSIONS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
