"""Target codec_diff: the same bytes to ``_codec_py`` and ``_codec_c`` must give the same answer.

Same input format as ``_codec6``. The twins must return equal messages (and equal
``repr``: an IntEnum is not a plain int) consuming the same bytes, ask for the same number
of bytes, or raise the same error class with the same ``reply_code`` and message text
(the contract in tests/codec_api.py). A decoded message must also encode to the same bytes
in both twins, or be refused by both with the same error.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fuzz import sut
from fuzz.targets import _codec6
from fuzz.targets._common import Finding

_py: ModuleType = sut.codec_py
_c: ModuleType | None = None


def setup() -> None:
    global _c
    if not sut.NATIVE:  # a native copy is loaded by the first input, once libFuzzer is loaded
        _c = sut.load_codec_c()


def _encoded(codec: ModuleType, kind: str, message: Any) -> tuple[object, ...]:
    try:
        return ("bytes", _codec6.encode(codec, kind, message))
    except sut.errors.LocalProtocolError as exc:
        return ("error", type(exc).__name__, exc.reply_code, str(exc))


def test_one_input(data: bytes) -> None:
    global _c
    if _c is None:
        _c = sut.load_codec_c()
    if not data:
        return
    ctl, body = data[0], data[1:]
    kind = _codec6.KINDS[ctl % len(_codec6.KINDS)]
    buf, offset = _codec6.present(ctl, body)
    py = _codec6.decode(_py, kind, ctl, buf, offset)
    c = _codec6.decode(_c, kind, ctl, buf, offset)
    if py.key() != c.key():
        raise Finding(f"{kind} of {body.hex()}: py {py.key()} != c {c.key()}")
    if py.kind == "ok":
        py_wire, c_wire = _encoded(_py, kind, py.value), _encoded(_c, kind, py.value)
        if py_wire != c_wire:
            raise Finding(f"encoding {py.value!r}: py {py_wire} != c {c_wire}")
