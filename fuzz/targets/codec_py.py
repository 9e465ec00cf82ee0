"""Target codec_py: the SOCKS 6 reference codec (``_codec_py``), see ``_codec6``."""

from __future__ import annotations

from types import ModuleType

from fuzz import sut
from fuzz.targets import _codec6

_codec: ModuleType = sut.codec_py


def setup() -> None:
    """Nothing to load: the reference is imported with ``fuzz.sut``."""


def test_one_input(data: bytes) -> None:
    _codec6.check(_codec, data)
