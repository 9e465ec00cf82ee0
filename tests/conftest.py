"""Shared fixtures: every codec test runs against both twins (STYLE.md section 7)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

NO_EXTENSIONS = bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS"))


def _impls() -> list[object]:
    return [
        pytest.param("py", id="py"),
        pytest.param(
            "c",
            id="c",
            marks=[
                pytest.mark.c_extension,
                pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run"),
            ],
        ),
    ]


@pytest.fixture(params=_impls())
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """The codec twin under test: ``socks6fast._codec_py`` or ``socks6fast._codec_c``."""
    return importlib.import_module(f"socks6fast._codec_{request.param}")
