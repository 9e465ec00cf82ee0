"""The JSON log format (issue 14 item 2): every log line one JSON object.

``log_format = "json"`` (``[server]``) makes ``socks6fast serve`` format every record with
`JsonFormatter`: ``{"ts": "2026-12-02T05:40:01.123Z", "level": "info", "logger": ...,
"msg": ...}``. The line of a finished connection carries the fields of the text line instead
of ``msg`` (`ConnectionRecord.fields`, passed as ``extra={CONNECTION: fields}``) and
``"event": "connection"``. ``ts`` is the record's time in UTC with its zone (RFC 3339).

The text format is `TextFormatter` (the line logging's default formatter would write, built
with less work), and `BatchingStreamHandler` writes each line at once but flushes once per
event loop turn: a busy proxy ends several connections per turn, and each line used to cost
a write(2) of its own (issue 13 item 3).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
import time
from typing import TextIO

__all__ = [
    "CONNECTION",
    "TEXT_FORMAT",
    "WORKER",
    "BatchingStreamHandler",
    "JsonFormatter",
    "TextFormatter",
    "rfc3339",
]

#: The text log line: ``2026-12-02 08:26:51,401 INFO socks6fast.server: client=...``.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The ``extra`` key under which `Server` passes a finished connection's fields.
CONNECTION = "socks6fast_connection"
#: The record attribute naming the worker process of ``serve --workers N`` (D34): ``"worker"``
#: in a JSON line, ``[worker N]`` in a text one (``cli._setup_logging``).
WORKER = "socks6fast_worker"


def rfc3339(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as RFC 3339 UTC with milliseconds, ``...Z``."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newline inside: `json.dumps` escapes them)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        worker = getattr(record, WORKER, None)
        if worker is not None:
            out["worker"] = worker
        fields = getattr(record, CONNECTION, None)
        if isinstance(fields, dict):
            out["event"] = "connection"
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, as ``logging.Formatter(TEXT_FORMAT)`` writes it, with less work per line:
    the local time text is made once per second, not per record (``localtime`` and
    ``strftime`` on every connection's line before), and the line is one f-string."""

    def __init__(self, tag: str = "") -> None:
        # tag: put before every message (``[worker 1] `` in a worker process, D34).
        super().__init__(TEXT_FORMAT.replace("%(message)s", tag.replace("%", "%%") + "%(message)s"))
        self._tag = tag
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)  # the traceback layout is logging's
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {self._tag}{record.message}"


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes every line when it is logged but flushes the stream once
    per event loop turn, when `attach` gave it the loop (before, from other threads, and once
    the loop is closed: at once, like `logging.StreamHandler`).

    ``stream`` should be block-buffered (stderr is line-buffered since Python 3.9, which
    would flush each line anyway): `for_fd` opens one on a descriptor. A process killed with
    SIGKILL loses at most the lines of its last loop turn; every other exit flushes
    (`logging.shutdown`)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._pending = False

    @classmethod
    def for_fd(cls, fd: int) -> BatchingStreamHandler:
        """A handler writing to descriptor ``fd`` (not closed with the handler), 64 KiB buffer."""
        return cls(open(fd, "w", buffering=65536, encoding="utf-8", errors="backslashreplace", closefd=False))

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Flush once per turn of ``loop`` (the thread calling this runs it); None: every line."""
        self.flush()
        self._loop = loop
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() != self._thread:
            super().emit(record)  # writes and flushes
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
            if not self._pending:
                self._pending = True
                loop.call_soon(self._flush_pending)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _flush_pending(self) -> None:
        self._pending = False
        self.flush()
