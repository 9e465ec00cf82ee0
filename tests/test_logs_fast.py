"""The access log's cheaper path (issue 13 item 3, a CONNECT at half the CPU): `TextFormatter`
writes exactly the line ``logging.Formatter(TEXT_FORMAT)`` writes, and `BatchingStreamHandler`
writes every line at once but flushes once per event loop turn (a write(2) per connection's
line before). Also the connect check that replaced poll() plus SO_ERROR (`_connected_now`).

None of this touches the codec: the SOCKS6FAST_NO_EXTENSIONS=1 run skips it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import sys

import pytest

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.asyncio.server.dial import _connected_now
from socks6fast.asyncio.server.logs import TEXT_FORMAT, BatchingStreamHandler, TextFormatter

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(NO_EXTENSIONS, reason="codec-independent: run once, in the compiled run"),
]


def _record(msg: str, args: tuple[object, ...] = (), created: float = 1_800_000_000.25) -> logging.LogRecord:
    record = logging.LogRecord("socks6fast.server", logging.INFO, "", 0, msg, args, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_text_formatter_writes_the_standard_line() -> None:
    fast, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    times = [1_800_000_000.25, 1_800_000_000.999, 1_800_000_001.0, 1_800_000_000.5, 1_700_000_123.007]
    for created in times:  # the per-second cache: same second, next second, back again
        args = ("127.0.0.1:5", 64)
        assert fast.format(_record("client=%s up=%d", args, created)) == standard.format(
            _record("client=%s up=%d", args, created)
        )
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    for formatter in (fast, standard):
        record = _record("failed")
        record.exc_info = exc
        lines = formatter.format(record).splitlines()
        assert lines[-1] == "ValueError: boom" and lines[0].endswith("INFO socks6fast.server: failed")


def test_batching_handler_flushes_once_per_loop_turn() -> None:
    """Lines logged in one loop turn reach the descriptor together, at the end of the turn;
    before the loop is attached, from another thread and after detaching: at once."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    handler = BatchingStreamHandler.for_fd(write_fd)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("socks6fast.test_logs_fast")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)

    def pending() -> bytes:
        try:
            return os.read(read_fd, 65536)
        except BlockingIOError:
            return b""

    try:
        logger.info("before %d", 1)
        assert pending().endswith(b"INFO socks6fast.test_logs_fast: before 1\n")

        async def main() -> None:
            handler.attach(asyncio.get_running_loop())
            logger.info("one")
            logger.info("two")
            assert pending() == b""  # written to the buffer, not flushed yet
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            got = pending().decode().splitlines()
            assert [line.rsplit(": ", 1)[1] for line in got] == ["one", "two"]
            await asyncio.to_thread(logger.info, "from a thread")
            assert pending().endswith(b": from a thread\n")
            handler.attach(None)

        asyncio.run(main())
        logger.info("after")
        assert pending().endswith(b": after\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(read_fd)
        os.close(write_fd)


def test_batching_handler_on_a_stream_without_descriptor() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.handle(_record("plain"))
    assert stream.getvalue().endswith("INFO socks6fast.server: plain\n")


def test_connected_now() -> None:
    """Established: True at once. Still in progress or refused: False, so the dial waits and
    reads SO_ERROR (the failure reply's code comes from there)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = listener.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
            try:
                sock.connect(address)
            except BlockingIOError:
                pass
            for _ in range(1000):  # loopback: established after a few microseconds at most
                if _connected_now(sock):
                    break
            assert _connected_now(sock)
        port = address[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.connect(("127.0.0.1", port))  # the listener is closed: refused
        except (BlockingIOError, ConnectionRefusedError):
            pass
        assert not _connected_now(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (0, 111)
