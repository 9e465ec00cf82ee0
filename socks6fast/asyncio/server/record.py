"""The one log line of a finished client connection (`ConnectionRecord`), and the words for
a failure's cause in it (`describe_error`).

Built once, when the connection ends, from what its core connection decided and what the
handler did; `Server.records` keeps the latest ones and `Server.on_connection_closed`
callbacks receive each (tests read the remote leg's options there).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from ...proto.stack import AppliedLeg

__all__ = ["ConnectionRecord", "describe_error", "format_address"]


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_safe(text: str) -> str:
    """``text`` with control characters, backslashes and non-ASCII escaped (``\\n``,
    ``\\x1b``, ``\\u2028``): a destination name comes from the client, and a newline in it
    would forge a log line of its own (CWE-117; the strict probe's L-1)."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # every name a resolver accepts
    return text.encode("unicode_escape").decode("ascii")


def describe_error(exc: BaseException) -> str:
    """Why an operation failed, in words, for the access log; never empty.

    asyncio's timeouts are a bare ``TimeoutError()`` whose text is empty, so the cause must
    come from the type; an errno is named too (``Connection refused (ECONNREFUSED)``).
    """
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc) or "name resolution failed"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True)
class ConnectionRecord:
    """What the server knows about one finished client connection; logged once.

    Also what tests inspect (`Server.records`, `Server.on_connection_closed`): the remote
    leg's options as read back from the kernel, whether TFO or MPTCP were used.
    """

    client: tuple[str, int]
    """Client address and port (behind a load balancer: the one its PROXY header named)."""
    listener: str
    """``"tcp"`` or ``"tls"``."""
    started: float
    """``time.monotonic()`` at accept."""
    protocol: str = "-"
    """``"socks6"``, ``"socks5"`` or ``"mismatch"``."""
    user: str | None = None
    """Authenticated user (or the session's user)."""
    command: str = "-"
    """Command name."""
    destination: str = "-"
    """Destination as requested."""
    reply_code: int | None = None
    """The last Operation Reply (or SOCKS 5 reply) code sent."""
    bytes_up: int = 0
    """Bytes relayed client -> remote."""
    bytes_down: int = 0
    """Bytes relayed remote -> client."""
    relay_path: str = "-"
    """``"splice"`` or ``"asyncio"`` once relayed."""
    relay_end: str = "-"
    """How the relay ended (``RelayEnd`` name, lower case)."""
    relay_close: str = "-"
    """How the proxy closed the relayed legs: ``"fin"`` (clean EOF both ways) or ``"rst"``
    (a cut, such as the idle timeout or the drain deadline, or a failure passed on)."""
    duration: float = 0.0
    """Seconds from accept to close."""
    remote_address: tuple[str, int] | None = None
    """The remote host the proxy connected to (CONNECT) or that connected (BIND)."""
    remote_options: AppliedLeg | None = None
    """The proxy-remote leg's IP options as read back with getsockopt (STK-03, STK-05)."""
    client_options: AppliedLeg | None = None
    """The client-proxy leg's IP options as read back with getsockopt."""
    happy_eyeballs: bool = False
    """Happy Eyeballs attempted (STK-04)."""
    tfo_attempted: bool = False
    """TCP_FASTOPEN_CONNECT was set on the remote socket (CMD-02, STK-06)."""
    tfo_syn_acked: bool = False
    """The remote host acknowledged data in our SYN."""
    mptcp: bool = False
    """The remote leg runs MPTCP (STK-07)."""
    datagrams_up: int = 0
    """UDP ASSOCIATE: datagrams relayed client -> remote (``bytes_up`` counts their payload)."""
    datagrams_down: int = 0
    """UDP ASSOCIATE: datagrams relayed remote -> client."""
    udp_drops: int = 0
    """UDP ASSOCIATE: datagrams of the association dropped (any ``UdpDrop`` reason)."""
    icmp_errors: int = 0
    """UDP ASSOCIATE: Datagram Error messages sent to the client (UDP-09)."""
    udp_channel: str = "-"
    """UDP ASSOCIATE: what the first datagram fixed (UDP-03): ``"udp"`` (a 5-tuple, or SOCKS
    5) or ``"tcp"`` (the TCP connection); ``"-"`` when none came."""
    udp_server_mode: bool = False
    """UDP ASSOCIATE: the client asked for server mode (UDP-06)."""
    error: str = ""
    """Why the connection ended early, if it did."""
    failed_user: str | None = None
    """The user name of a failed login, as the client sent it (issue 14: what fail2ban needs)."""
    detected: str = ""
    """A client that spoke another protocol to the plain port (Version Mismatch Reply sent):
    ``"http"``, ``"tls"`` or ``"socks4"`` (`socks6fast.proto.server_common.foreign_protocol`)."""
    handshake: float | None = None
    """Seconds from accept to the hand-off to the data plane (relay or UDP association), for
    requests that got that far; None otherwise."""

    proxied_by: tuple[str, int] | None = None
    """The load balancer whose PROXY header named ``client`` (D27), or None."""

    def fields(self) -> dict[str, object]:
        """The log line's fields (the same keys), for the JSON log format (issue 14)."""
        out: dict[str, object] = {
            "client": format_address(*self.client),
            "listener": self.listener,
            "proto": self.protocol,
            "user": self.user,
            "cmd": self.command,
            "dst": self.destination,
            "reply": self.reply_code,
            "up": self.bytes_up,
            "down": self.bytes_down,
            "dur": round(self.duration, 6),
            "relay": self.relay_path,
            "end": self.relay_end,
            "close": self.relay_close,
        }
        if self.command == "UDP_ASSOCIATE":
            out["via"] = self.udp_channel
            out["server_mode"] = self.udp_server_mode
            out["dgrams_up"] = self.datagrams_up
            out["dgrams_down"] = self.datagrams_down
            out["drops"] = self.udp_drops
            out["icmp"] = self.icmp_errors
        if self.proxied_by is not None:
            out["proxied_by"] = format_address(*self.proxied_by)  # D27: the load balancer
        if self.failed_user is not None:
            out["failed_user"] = self.failed_user
        if self.detected:
            out["detected"] = self.detected
        if self.error:
            out["error"] = self.error
        return out

    def log_line(self) -> str:
        """The one log line of a finished connection."""
        code = "-" if self.reply_code is None else f"{self.reply_code:#04x}"
        text = (
            f"client={format_address(*self.client)}{self._proxied_by()} proto={self.protocol} "
            f"user={self.user or '-'} "
            f"cmd={self.command} dst={log_safe(self.destination)} reply={code} up={self.bytes_up} "
            f"down={self.bytes_down} dur={self.duration:.3f}s relay={self.relay_path} end={self.relay_end} "
            f"close={self.relay_close}"
        )
        if self.command == "UDP_ASSOCIATE":
            text += (
                f" via={self.udp_channel}{'+server_mode' if self.udp_server_mode else ''} "
                f"dgrams_up={self.datagrams_up} dgrams_down={self.datagrams_down} "
                f"drops={self.udp_drops} icmp={self.icmp_errors}"
            )
        if self.failed_user is not None:
            text += f" failed_user={self.failed_user!r}"
        if self.detected:
            text += f" detected={self.detected}"
        return f"{text} error={self.error!r}" if self.error else text

    def _proxied_by(self) -> str:
        return "" if self.proxied_by is None else f" proxied_by={format_address(*self.proxied_by)}"
