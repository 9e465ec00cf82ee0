"""What every target shares: outcomes of a decoder call, and the failure exception."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Finding(AssertionError):
    """A check failed: libFuzzer reports it as a crash and saves the input."""


@dataclass(frozen=True)
class Outcome:
    """What a decoder did with one input, in a form two calls can be compared by."""

    kind: str
    """"ok" (a message), "need" (more bytes) or "error" (a typed error)."""
    value: Any = None
    """ok: the message; need: the bytes needed; error: the exception."""
    n: int = 0
    """ok: bytes consumed."""

    def key(self) -> tuple[object, ...]:
        """Equality key: repr() too, so an IntEnum and a plain int of the same value differ."""
        if self.kind == "ok":
            return ("ok", self.value, repr(self.value), self.n)
        if self.kind == "need":
            return ("need", self.value)
        exc = self.value
        return ("error", type(exc).__name__, getattr(exc, "reply_code", None), str(exc))


def call(decoder: Callable[..., Any], typed: type[BaseException], *args: Any) -> Outcome:
    """Call a stream decoder; only ``typed`` errors are an outcome, anything else propagates."""
    try:
        message, n = decoder(*args)
    except typed as exc:
        return Outcome("error", exc)
    if message is None:
        if not (isinstance(n, int) and n > 0):
            raise Finding(f"need-more answer with needed={n!r}")
        return Outcome("need", n)
    return Outcome("ok", message, n)


def check_prefix(whole: Outcome, prefix: Outcome, available: int, shown: int) -> None:
    """REQ-07: ``shown`` of ``available`` bytes must give an answer consistent with all of them.

    A prefix of a whole message needs more and never asks past its end; a prefix of an
    input that needs more never asks past the whole input's answer; a prefix of an input
    that is rejected needs more or is rejected at once with the same error.
    """
    if prefix.kind == "error":
        if whole.kind != "error" or prefix.key() != whole.key():
            raise Finding(f"prefix of {shown}/{available} bytes: {prefix.key()} but whole: {whole.key()}")
        return
    if prefix.kind == "ok":
        if whole.kind != "ok" or prefix.key() != whole.key():
            raise Finding(f"prefix of {shown}/{available} bytes: {prefix.key()} but whole: {whole.key()}")
        return
    needed = prefix.value
    if whole.kind == "ok" and shown + needed > whole.n:
        raise Finding(f"prefix of {shown} bytes asks for {needed} more, past the message end {whole.n}")
    if whole.kind == "need" and shown + needed > available + whole.value:
        raise Finding(
            f"prefix of {shown} bytes asks for {needed} more; the whole {available} asks for {whole.value}"
        )
