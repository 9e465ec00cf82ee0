"""Time to first byte behind an emulated client-proxy round trip.

Strategy: a userspace delay shim (``loadgen shim``, in loadgen.c: a timerfd
wakes it on each deadline, so deliveries are late by microseconds, not by the
millisecond of an event-loop timer) sits between the client and the proxy on
loopback and holds every chunk for ``delay`` in each direction, so one
client-proxy round trip costs ``2 * delay``. A loopback connect() completes at
once, so the shim also charges the TCP handshake: client bytes that came after
the handshake are delivered no earlier than ``3 * delay`` after the accept
(SYN, SYN-ACK, then the data). Bytes that rode in the SYN (TCP Fast Open: the
shim's listener sets TCP_FASTOPEN and reads the SYN's length back from the
kernel) are delivered one ``delay`` after the accept, as the SYN would be. The
proxy-target leg stays plain loopback.

The clients speak raw bytes built here with ``struct`` (independently of the
socks6fast codec, so a codec bug cannot hide in both ends): SOCKS5 no-auth and
username/password (RFC 1928/1929); SOCKS6 (draft-11) no-auth with the payload
sent right behind the Request (false start, conformance CMD-03), 0-RTT
username/password (Authentication Data option, method 2, with the payload as
announced initial data), and inside a session (Session ID option). TTFB is
measured from the start of connect() to the first byte of the target's answer.

Three more SOCKS6 rows use TCP Fast Open to the proxy (draft-11 section "TCP
Fast Open on the Client-Proxy Leg", conformance TRN-01/TRN-02): with the
Request alone in the SYN (no application data in it, so TFO is allowed without
a token; the payload follows the handshake), and with the Request, a Session ID,
an Idempotence Expenditure and the payload in the SYN (allowed because the
request spends a token; section "Idempotence options"). The session and its
token window are set up beforehand over a normal connection (untimed); every
sample spends a fresh token, and each sample checks that the kernel's SYN carried
its bytes (TCP_INFO ``TCPI_OPT_SYN_DATA``).

Two gateway rows (issue 15 item 1): the same SOCKS5 client (no auth, and username/password)
talks to a local ``socks6fast gateway`` without delay; the shim sits between the gateway and
the proxy (the second row's proxy requires a password, which the gateway sends 0-RTT once
and then its session stands for). The gateway answers the SOCKS 5 request at once
(optimistic mode) and sends the Request, Session ID, an Idempotence Expenditure and the
payload in the SYN (TFO), so the expected figure is 1 round trip of the delayed leg.

Expected round trips with the handshake counted: direct 2, SOCKS5 no-auth 4,
SOCKS5 username/password 5, SOCKS6 (no TFO, any of the three) 2, SOCKS6 TFO with
the Request alone in the SYN 2, SOCKS6 TFO with a token and the payload in the
SYN 1.
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
OPT_SESSION_OK = 8
OPT_IDEMPOTENCE_REQUEST = 11
OPT_IDEMPOTENCE_WINDOW = 12
OPT_IDEMPOTENCE_EXPENDITURE = 13
OPT_IDEMPOTENCE_ACCEPTED = 14
OPT_IDEMPOTENCE_REJECTED = 15
#: Tokens asked for when a TFO row sets up its session: one per sample, and more to spare.
TOKEN_WINDOW = 1024
TOKEN_MODULUS = 2**32
#: Linux TCP_INFO: ``tcpi_options`` is the sixth byte; TCPI_OPT_SYN_DATA (include/uapi/linux/tcp.h)
#: says the SYN's data was acknowledged (client side) or accepted (listener side).
TCPI_OPTIONS_OFFSET = 5
TCPI_OPT_SYN_DATA = 0x20

#: TTFB modes: (key, human label).
MODES = (
    ("direct", "direct (no proxy)"),
    ("socks5", "SOCKS5 no-auth"),
    ("socks5-userpass", "SOCKS5 username/password"),
    ("socks6", "SOCKS6 no-auth"),
    ("socks6-userpass", "SOCKS6 0-RTT username/password"),
    ("socks6-session", "SOCKS6 inside a session"),
    ("socks6-tfo", "SOCKS6 TFO, request in SYN (no auth)"),
    ("socks6-tfo-token", "SOCKS6 TFO + idempotence token in a session (no auth)"),
    ("socks6-tfo-token-userpass", "SOCKS6 TFO + idempotence token in a session (username/password)"),
    ("gateway-socks5", "SOCKS5 app via socks6fast gateway (delay on the gateway-proxy leg)"),
    ("gateway-socks5-userpass", "SOCKS5 app, username/password, via gateway to a password proxy"),
)
#: Rows that speak SOCKS 5 to a local ``socks6fast gateway`` (no delay on that leg) whose
#: upstream leg, gateway to proxy, goes through the delay shim (issue 15 item 1).
GATEWAY_MODES = ("gateway-socks5", "gateway-socks5-userpass")
#: The modes that connect with TCP Fast Open (they need net.ipv4.tcp_fastopen bits 1 and 2).
TFO_MODES = ("socks6-tfo", "socks6-tfo-token", "socks6-tfo-token-userpass")
#: The TFO modes that spend an idempotence token inside a session.
TOKEN_MODES = ("socks6-tfo-token", "socks6-tfo-token-userpass")


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


def socks6_token_request(window_size: int) -> bytes:
    """Token Request option: ask for a window of ``window_size`` tokens (section "Requesting a
    token window")."""
    return socks6_option(OPT_IDEMPOTENCE_REQUEST, struct.pack("!I", window_size))


def socks6_token_expenditure(token: int) -> bytes:
    """Idempotence Expenditure option (section "Spending a token"; Length 8 per docs/decisions.md D3)."""
    return socks6_option(OPT_IDEMPOTENCE_EXPENDITURE, struct.pack("!I", token))


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
    shim_port: int = 0
    """Port of the delay shim in front of ``port``, which the timed samples connect to."""
    next_token: int = 0
    """Smallest token not yet spent (token modes; modulo 2^32)."""
    tokens_left: int = 0
    """Tokens of the known window from ``next_token`` on (token modes)."""
    window_known: bool = False
    """An Idempotence Window has been seen (token modes)."""
    requests: int = 0
    """SOCKS requests this row sent through its shim (warm-up included)."""
    syn_data: int = 0
    """Requests whose SYN data the shim's kernel acknowledged (TFO modes; TCP_INFO)."""
    last_in_syn: bool = False
    """Whether the latest request's first bytes rode in the SYN (TFO modes)."""
    timed_in_syn: int = 0
    """Timed samples whose first bytes rode in the SYN (TFO modes)."""
    tokens_accepted: int = 0
    """Requests whose token the proxy accepted (Idempotence Accepted; token modes)."""

    @property
    def tfo(self) -> bool:
        return self.mode in TFO_MODES


def syn_data_acked(sock: socket.socket) -> bool:
    """Did the peer acknowledge the data this socket sent in its SYN (TCP_INFO, Linux)?"""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return bool(info[TCPI_OPTIONS_OFFSET] & TCPI_OPT_SYN_DATA)


async def _tfo_connect(
    port: int, in_syn: bytes, after: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket]:
    """Connect with TCP Fast Open: ``in_syn`` rides in the SYN (sendto with MSG_FASTOPEN; the
    kernel needs a TFO cookie for 127.0.0.1, which the first, untimed, sample fetches), ``after``
    follows the handshake."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sent = sock.sendto(in_syn, socket.MSG_FASTOPEN, (LOOPBACK, port))
        except BlockingIOError:
            sent = 0  # no cookie yet: the SYN asked for one and carried nothing
        # In SYN_SENT a send() waits for the handshake (EAGAIN, then writable): what is left
        # leaves after the SYN-ACK, which the shim charges as such.
        rest = in_syn[sent:] + after
        if rest:
            await loop.sock_sendall(sock, rest)
        r, w = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    return r, w, sock


async def _sample(t: Target) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if t.tfo:
        return await _tfo_sample(t, t0)
    r, w = await asyncio.open_connection(LOOPBACK, t.shim_port)
    try:
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if t.mode == "direct":
            w.write(PAYLOAD)
        elif t.mode in ("socks5", "socks5-userpass", *GATEWAY_MODES):
            method = METHOD_USERPASS if t.mode.endswith("socks5-userpass") else METHOD_NONE
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


async def _tfo_sample(t: Target, t0: float) -> float:
    """One TFO request. TRN-02: application data rides in the SYN only when a token is spent."""
    loop = asyncio.get_running_loop()
    if t.mode == "socks6-tfo":
        # The SYN carries the Request alone; the payload follows the handshake.
        in_syn, after = socks6_connect_request(t.target_port), PAYLOAD
    else:
        token = t.next_token
        if t.tokens_left <= 0:
            raise HandshakeError("token window used up")
        # Spent whatever the answer: a token is never offered twice.
        t.next_token, t.tokens_left = (token + 1) % TOKEN_MODULUS, t.tokens_left - 1
        opts = socks6_option(OPT_SESSION_ID, t.session_id) + socks6_token_expenditure(token)
        in_syn, after = socks6_connect_request(t.target_port, opts) + PAYLOAD, b""
    t.requests += 1
    r, w, sock = await _tfo_connect(t.shim_port, in_syn, after)
    try:
        options = await read_socks6_replies(r)
        await r.readexactly(1)
        elapsed = loop.time() - t0
        t.last_in_syn = syn_data_acked(sock)
        t.syn_data += t.last_in_syn
        if t.mode in TOKEN_MODES:
            if OPT_IDEMPOTENCE_ACCEPTED not in options:
                raise HandshakeError(f"token {token} not accepted (reply options {sorted(options)})")
            t.tokens_accepted += 1
            _note_window(t, options)
        await r.read(65536)
        return elapsed
    finally:
        w.close()


def _note_window(t: Target, options: dict[int, bytes]) -> None:
    """Track the Idempotence Window; older advertisements are ignored (IDM-05)."""
    window = options.get(OPT_IDEMPOTENCE_WINDOW, b"")
    if len(window) < 8:
        return
    base, size = struct.unpack_from("!II", window)
    if not t.window_known:  # the first window this row hears of
        t.next_token, t.tokens_left, t.window_known = base, size, True
        return
    # Token order is modular (section "Idempotence options"): x < y iff 0 < y - x < 2^31.
    ahead = (base - t.next_token) % TOKEN_MODULUS
    if 0 < ahead < 2**31:  # the proxy shifted past tokens we have not spent: skip them
        t.next_token = base
    t.tokens_left = (base + size - t.next_token) % TOKEN_MODULUS
    if t.tokens_left >= 2**31:  # the advertisement is older than what we spent
        t.tokens_left = 0


async def open_session(
    proxy_port: int, target_port: int, user: str, password: str, token_window: int = 0
) -> tuple[bytes, dict[int, bytes], asyncio.StreamWriter]:
    """Start a SOCKS6 session (directly, no shim): 0-RTT username/password when ``user`` is set,
    and a Token Request for ``token_window`` tokens when it is not 0.

    Returns (Session ID, the options of the replies, the writer to close afterwards): the
    session's first connection stays open while the session is used.
    """
    r, w = await asyncio.open_connection(LOOPBACK, proxy_port)
    opts = socks6_option(OPT_SESSION_REQUEST, b"")
    if token_window:
        opts += socks6_token_request(token_window)
    if user:
        opts += socks6_userpass_options(user, password, len(PAYLOAD))
    w.write(socks6_connect_request(target_port, opts) + PAYLOAD)
    options = await read_socks6_replies(r)
    session_id = options.get(OPT_SESSION_ID, b"")
    if not session_id:
        w.close()
        raise HandshakeError("no Session ID option in the replies to a Session Request")
    await r.readexactly(len(PAYLOAD))
    return session_id, options, w


async def run_ttfb(targets: list[Target], samples: int, progress: Callable[[str], None]) -> None:
    """Fill ``targets[i].samples`` (seconds), interleaving the targets sample by sample.

    Each target's ``port`` is its upstream (proxy or target) port, used directly to set up
    sessions; ``shim_port`` is the delay shim in front of it, used by the samples. One
    untimed sample per target comes first (connection caches, lazy imports, first-connection
    costs, and the TFO cookie for 127.0.0.1).
    """
    keep: list[asyncio.StreamWriter] = []
    try:
        for t in targets:
            if t.mode == "socks6-session" or t.mode in TOKEN_MODES:
                window = TOKEN_WINDOW if t.mode in TOKEN_MODES else 0
                try:
                    t.session_id, options, writer = await asyncio.wait_for(
                        open_session(t.port, t.target_port, t.user, t.password, window), 10
                    )
                    keep.append(writer)
                    if window:
                        _note_window(t, options)
                        if t.tokens_left <= 0:
                            raise HandshakeError("no Idempotence Window in the replies to a Token Request")
                except (OSError, HandshakeError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    t.error = f"session setup failed: {exc!r}"
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
                    t.timed_in_syn += t.tfo and t.last_in_syn
            if i < 0:
                continue
            line = "  ".join(
                f"{t.system}/{t.mode} {statistics.median(t.samples) * 1e3:.1f}" for t in targets if t.samples
            )
            progress(f"[ttfb] sample {i + 1}/{samples}, median ms so far: {line}")
    finally:
        for w in keep:
            w.close()
