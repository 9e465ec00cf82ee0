"""A client-chosen destination name cannot forge a log line (CWE-117; the strict probe's L-1):
the text log line escapes control characters, backslashes and non-ASCII in ``dst=``; the JSON
line needs nothing (``json.dumps`` escapes them)."""

from __future__ import annotations

import json
import struct

from helpers_server import RawClient, fake_resolver, make_config, record_for, running_server

from socks6fast.asyncio.server.record import log_safe

FORGED = "evil.test\n2026-12-02 00:00:00,000 INFO socks6fast.server: FORGED\x1b[2J\\"


def test_log_safe_leaves_names_alone_and_escapes_the_rest() -> None:
    assert log_safe("www.example.test:443") == "www.example.test:443"
    assert log_safe("[::1]:80") == "[::1]:80"
    escaped = log_safe(FORGED)
    assert "\n" not in escaped and "\x1b" not in escaped
    assert escaped.startswith("evil.test\\n2026") and escaped.endswith("\\x1b[2J\\\\")
    assert log_safe("b\u00fccher.test\u2028x") == "b\\xfccher.test\\u2028x"


async def test_a_forged_name_stays_on_its_own_line() -> None:
    """A SOCKS 5 CONNECT to a domain holding a newline, ESC and a backslash (RFC 1928 lets a
    name be any bytes): the connection's text line is one line, the name escaped in it, and the
    JSON fields carry the name as sent."""
    config = make_config()
    async with running_server(config, resolver=fake_resolver({})) as server:
        client = await RawClient.connect(server.addresses[0])
        name = FORGED.encode()
        await client.send(
            b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack("!H", 80)
        )
        assert await client.read_exactly(2) == b"\x05\x00"
        reply = await client.read_exactly(2)
        assert reply[0] == 5 and reply[1] != 0  # the name does not resolve: refused, not relayed
        client.writer.close()
        record = await record_for(server, client)
    line = record.log_line()
    assert "\n" not in line and "\x1b" not in line, line
    # The name holds colons, so it is written in brackets like an IPv6 host.
    assert "dst=[evil.test\\n2026-12-02 00:00:00,000 INFO socks6fast.server: FORGED\\x1b[2J\\\\]:80 " in line
    assert json.loads(json.dumps(record.fields()))["dst"] == f"[{FORGED}]:80"
