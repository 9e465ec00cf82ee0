"""Time to first byte behind an emulated client-proxy round trip.

Strategy: a userspace delay shim (``loadgen shim``, in loadgen.c: a timerfd
wakes it on each deadline, so deliveries are late by microseconds, not by the
millisecond of an event-loop timer) sits between the client and the proxy on
loopback and holds every chunk for ``delay`` in each direction, so one
client-proxy round trip costs ``2 * delay``. A real client also pays one round
trip for the TCP handshake before it may send (no TCP Fast Open: draft-11
section "TCP Fast Open on the Client-Proxy Leg" allows TFO only when the SYN
carries no application data, which does not shorten the exchange here), and a
loopback connect() completes at once; so the shim delivers the first client
bytes no earlier than ``3 * delay`` after the connection was accepted (SYN,
SYN-ACK, then the data), which adds that round trip back. The proxy-target leg
stays plain loopback.

The clients speak raw bytes built here with ``struct`` (independently of the
socks6fast codec, so a codec bug cannot hide in both ends): SOCKS5 no-auth and
username/password (RFC 1928/1929); SOCKS6 (draft-11) no-auth with the payload
sent right behind the Request (false start, conformance CMD-03), 0-RTT
username/password (Authentication Data option, method 2, with the payload as
announced initial data), and inside a session (Session ID option). TTFB is
measured from the start of connect() to the first byte of the target's answer.

Expected round trips with the handshake counted: direct 2, SOCKS5 no-auth 4,
SOCKS5 username/password 5, SOCKS6 (any of the three) 2.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

PAYLOAD = b"q" * 64
LOOPBACK = "127.0.0.1"

# Wire values used below, named once (RFC 1928/1929 and draft-11 "IANA Considerations").
SOCKS5_VERSION = 5
SOCKS6_VERSION = 6
USERPASS_VERSION = 1
METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
OPT_AUTH_METHOD_ADVERTISEMENT = 2
OPT_AUTH_DATA = 4
OPT_SESSION_REQUEST = 5
OPT_SESSION_ID = 6

#: TTFB modes: (key, human label).
MODES = (
    ("direct", "direct (no proxy)"),
    ("socks5", "SOCKS5 no-auth"),
    ("socks5-userpass", "SOCKS5 username/password"),
    ("socks6", "SOCKS6 no-auth"),
    ("socks6-userpass", "SOCKS6 0-RTT username/password"),
    ("socks6-session", "SOCKS6 inside a session"),
)


class HandshakeError(Exception):
    """The proxy answered something other than success."""


# ----------------------------------------------------------------- wire bytes


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def socks6_option(kind: int, data: bytes) -> bytes:
    """One option: Kind, Length (4 + data, a multiple of 4), data (section "Options")."""
    return struct.pack("!HH", kind, 4 + len(data)) + data


def socks6_connect_request(port: int, options: bytes = b"") -> bytes:
    """SOCKS 6 Request, CONNECT to 127.0.0.1:``port`` (figure "SOCKS 6 Request")."""
    return (
        struct.pack("!BBHHBB", SOCKS6_VERSION, CMD_CONNECT, len(options), port, 0, ATYP_IPV4)
        + socket.inet_aton(LOOPBACK)
        + options
    )


def rfc1929_request(user: str, password: str) -> bytes:
    u, p = user.encode(), password.encode()
    return bytes([USERPASS_VERSION, len(u)]) + u + bytes([len(p)]) + p


def socks6_userpass_options(user: str, password: str, initial_data: int) -> bytes:
    """Authentication Method Advertisement (method 2, ``initial_data`` bytes follow the Request)
    and an Authentication Data option carrying the RFC 1929 request (draft-11 "Password
    Authentication" via a SOCKS option: 0-RTT)."""
    advert = socks6_option(
        OPT_AUTH_METHOD_ADVERTISEMENT, _pad4(struct.pack("!H", initial_data) + bytes([METHOD_USERPASS]))
    )
    data = socks6_option(OPT_AUTH_DATA, _pad4(bytes([METHOD_USERPASS]) + rfc1929_request(user, password)))
    return advert + data


def socks5_connect_request(port: int) -> bytes:
    return (
        struct.pack("!BBBB", SOCKS5_VERSION, CMD_CONNECT, 0, ATYP_IPV4)
        + socket.inet_aton(LOOPBACK)
        + (struct.pack("!H", port))
    )


async def read_socks5_reply(r: asyncio.StreamReader) -> None:
    head = await r.readexactly(4)
    if head[0] != SOCKS5_VERSION or head[1] != 0:
        raise HandshakeError(f"SOCKS5 reply {head.hex()}")
    atyp = head[3]
    n = 4 if atyp == ATYP_IPV4 else 16 if atyp == ATYP_IPV6 else (await r.readexactly(1))[0]
    await r.readexactly(n + 2)


def _walk_options(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + 4 <= len(data):
        kind, length = struct.unpack_from("!HH", data, i)
        if length < 4:
            break
        out.setdefault(kind, data[i + 4 : i + length])
        i += length
    return out


async def read_socks6_replies(r: asyncio.StreamReader) -> dict[int, bytes]:
    """Read the Authentication Reply and the Operation Reply; return their options by kind."""
    head = await r.readexactly(4)
    if head[0] != SOCKS6_VERSION or head[1] != 0:
        raise HandshakeError(f"SOCKS6 authentication reply {head.hex()}")
    options = _walk_options(await r.readexactly(struct.unpack_from("!H", head, 2)[0]))
    head = await r.readexactly(8)
    if head[0] != SOCKS6_VERSION or head[1] != 0:
        raise HandshakeError(f"SOCKS6 operation reply {head.hex()}")
    optlen, atyp = struct.unpack_from("!H", head, 2)[0], head[7]
    if atyp == ATYP_IPV4:
        await r.readexactly(4)
    elif atyp == ATYP_IPV6:
        await r.readexactly(16)
    else:
        n = (await r.readexactly(1))[0]
        await r.readexactly(-(1 + n) % 4 + n)
    for kind, data in _walk_options(await r.readexactly(optlen)).items():
        options.setdefault(kind, data)
    return options


# ----------------------------------------------------------------- clients


@dataclass
class Target:
    """Where one TTFB row goes: a shim port in front of a proxy (or the target)."""

    system: str
    mode: str
    port: int
    target_port: int
    user: str = ""
    password: str = ""
    session_id: bytes = b""
    samples: list[float] = field(default_factory=list)
    error: str = ""


async def _sample(t: Target) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r, w = await asyncio.open_connection(LOOPBACK, t.port)
    try:
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if t.mode == "direct":
            w.write(PAYLOAD)
        elif t.mode in ("socks5", "socks5-userpass"):
            method = METHOD_USERPASS if t.mode == "socks5-userpass" else METHOD_NONE
            w.write(bytes([SOCKS5_VERSION, 1, method]))
            choice = await r.readexactly(2)
            if choice != bytes([SOCKS5_VERSION, method]):
                raise HandshakeError(f"SOCKS5 method reply {choice.hex()}")
            if method == METHOD_USERPASS:
                w.write(rfc1929_request(t.user, t.password))
                status = await r.readexactly(2)
                if status[1] != 0:
                    raise HandshakeError(f"RFC 1929 status {status.hex()}")
            w.write(socks5_connect_request(t.target_port))
            await read_socks5_reply(r)
            w.write(PAYLOAD)
        elif t.mode == "socks6":
            w.write(socks6_connect_request(t.target_port) + PAYLOAD)
            await read_socks6_replies(r)
        elif t.mode == "socks6-userpass":
            opts = socks6_userpass_options(t.user, t.password, len(PAYLOAD))
            w.write(socks6_connect_request(t.target_port, opts) + PAYLOAD)
            await read_socks6_replies(r)
        elif t.mode == "socks6-session":
            opts = socks6_option(OPT_SESSION_ID, t.session_id)
            w.write(socks6_connect_request(t.target_port, opts) + PAYLOAD)
            await read_socks6_replies(r)
        else:  # pragma: no cover
            raise ValueError(t.mode)
        await r.readexactly(1)
        elapsed = loop.time() - t0
        await r.read(65536)
        return elapsed
    finally:
        w.close()


async def open_session(
    proxy_port: int, target_port: int, user: str, password: str
) -> tuple[bytes, asyncio.StreamWriter]:
    """Start a SOCKS6 session with 0-RTT username/password (directly, no shim).

    Returns (Session ID, the writer to close afterwards): the session's first
    connection stays open while the session is used.
    """
    r, w = await asyncio.open_connection(LOOPBACK, proxy_port)
    opts = socks6_option(OPT_SESSION_REQUEST, b"") + socks6_userpass_options(user, password, len(PAYLOAD))
    w.write(socks6_connect_request(target_port, opts) + PAYLOAD)
    options = await read_socks6_replies(r)
    session_id = options.get(OPT_SESSION_ID, b"")
    if not session_id:
        w.close()
        raise HandshakeError("no Session ID option in the replies to a Session Request")
    await r.readexactly(len(PAYLOAD))
    return session_id, w


async def run_ttfb(
    targets: list[Target], shim_ports: dict[int, int], samples: int, progress: Callable[[str], None]
) -> None:
    """Fill ``targets[i].samples`` (seconds), interleaving the targets sample by sample.

    Each target's ``port`` is its upstream (proxy or target) port; ``shim_ports`` maps
    it to the port of the delay shim in front of it. One untimed sample per target
    comes first (connection caches, lazy imports, first-connection costs).
    """
    keep: list[asyncio.StreamWriter] = []
    try:
        for t in targets:
            if t.mode == "socks6-session":
                try:
                    t.session_id, writer = await asyncio.wait_for(
                        open_session(t.port, t.target_port, t.user, t.password), 10
                    )
                    keep.append(writer)
                except (OSError, HandshakeError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    t.error = f"session setup failed: {exc!r}"
            t.port = shim_ports[t.port]
        for i in range(-1, samples):
            for t in targets:
                if t.error:
                    continue
                try:
                    elapsed = await asyncio.wait_for(_sample(t), 30)
                except (OSError, HandshakeError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    t.error = f"{type(exc).__name__}: {exc}"
                    progress(f"[ttfb] {t.system:14} {t.mode:16} FAILED: {t.error}")
                    continue
                if i >= 0:
                    t.samples.append(elapsed)
            if i < 0:
                continue
            line = "  ".join(
                f"{t.system}/{t.mode} {statistics.median(t.samples) * 1e3:.1f}" for t in targets if t.samples
            )
            progress(f"[ttfb] sample {i + 1}/{samples}, median ms so far: {line}")
    finally:
        for w in keep:
            w.close()
