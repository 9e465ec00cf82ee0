"""Target codec_c: the Cython twin (``_codec_c``), with the checks of ``_codec6``.

libFuzzer sees the Python-visible side of the twin (the message classes it builds, the
checks here); with ``SOCKS6FAST_FUZZ_NATIVE`` (``python -m fuzz build-native``) it also
sees the edges of the C code.
"""

from __future__ import annotations

from types import ModuleType

from fuzz import sut
from fuzz.targets import _codec6

_codec: ModuleType | None = None


def setup() -> None:
    """Load the twin; a build without extensions cannot run this target."""
    global _codec
    if not sut.NATIVE:  # a native copy is loaded by the first input, once libFuzzer is loaded
        _codec = sut.load_codec_c()


def test_one_input(data: bytes) -> None:
    global _codec
    if _codec is None:
        _codec = sut.load_codec_c()
    _codec6.check(_codec, data)
