"""The JSON log format (issue 14 item 2): every log line one JSON object.

``log_format = "json"`` (``[server]``) makes ``socks6fast serve`` format every record with
`JsonFormatter`: ``{"ts": "2026-12-02T05:40:01.123Z", "level": "info", "logger": ...,
"msg": ...}``. The line of a finished connection carries the fields of the text line instead
of ``msg`` (`ConnectionRecord.fields`, passed as ``extra={CONNECTION: fields}``) and
``"event": "connection"``. ``ts`` is the record's time in UTC with its zone (RFC 3339).
"""

from __future__ import annotations

import datetime
import json
import logging

__all__ = ["CONNECTION", "WORKER", "JsonFormatter", "rfc3339"]

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
