"""HTTP proxy requests, as the gateway's local side reads them (sans-IO; RFC 9110, RFC 9112).

Strategy: the gateway (``socks6fast.asyncio.gateway``) accepts two HTTP proxy requests
and nothing else:

* ``CONNECT host:port HTTP/1.1`` (RFC 9110 section 9.3.6): a tunnel; the gateway answers
  ``200 Connection established`` and relays bytes both ways.
* a request in absolute form, ``GET http://host[:port]/path HTTP/1.1`` (RFC 9112 section
  3.2.2), any method: forwarded to the origin in origin form (``GET /path``), with the
  hop-by-hop headers (``Proxy-*``, ``Connection``, ``Keep-Alive``, the headers that
  ``Connection`` names) dropped and ``Connection: close`` added. One request per client
  connection: the origin closes after its response, which the client then sees (it
  reads the origin's own ``Connection: close``, or the end of the stream). No pipelining,
  no response parsing: the response bytes are relayed as they come.

`parse_request_head` takes the bytes read so far and returns ``None`` until the head is
complete (``\\r\\n\\r\\n``); a head over `MAX_HEAD` bytes, a malformed request line, an
``https://`` absolute form or another scheme raise `HTTPRequestError` with the status the
gateway answers (400, 405, 501, 431). Bytes after the head (a request body, or a
tunnelled client's first bytes) are returned untouched.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["MAX_HEAD", "HTTPRequestError", "ProxyRequest", "parse_request_head", "status_line"]

#: Largest request head (request line + headers) the gateway reads, in bytes.
MAX_HEAD: Final = 32 * 1024

_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

_REASONS: Final = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


class HTTPRequestError(Exception):
    """A request the gateway answers with ``status`` and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A complete proxy request head."""

    connect: bool
    """True for CONNECT (a tunnel), False for an absolute-form request to forward."""
    host: str
    """Destination host (IPv6 without brackets)."""
    port: int
    """Destination port."""
    forward: bytes
    """What goes to the destination first: the rewritten head and the bytes after it
    (absolute form), or the bytes the client sent after the CONNECT head."""


def status_line(status: int, extra: str = "") -> bytes:
    """An HTTP/1.1 response head with no body (``Content-Length: 0``, closing unless 200)."""
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    if status != 200:
        head += "Content-Length: 0\r\nConnection: close\r\n"
    return (head + extra + "\r\n").encode("latin-1")


def _split_host_port(authority: str, default: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HTTPRequestError(400, f"bad IPv6 authority {authority!r}")
        host, rest = authority[1:end], authority[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HTTPRequestError(400, f"bad IPv6 address {host!r}") from None
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, rest = authority, ""
        else:
            rest = ":" + port_text
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise HTTPRequestError(400, f"bad port in {authority!r}")
        port = int(rest[1:])
    elif default is None:
        raise HTTPRequestError(400, f"CONNECT needs host:port, got {authority!r}")
    else:
        port = default
    if not host or not 1 <= port <= 65535:
        raise HTTPRequestError(400, f"bad authority {authority!r}")
    return host, port


def parse_request_head(data: bytes) -> ProxyRequest | None:
    """Parse the proxy request head at the start of ``data``.

    Returns:
        The request once the head is complete, else None: read more.

    Raises:
        HTTPRequestError: a request the gateway refuses (``.status`` to answer).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise HTTPRequestError(431, f"request head over {MAX_HEAD} bytes")
        return None
    if end > MAX_HEAD:
        raise HTTPRequestError(431, f"request head over {MAX_HEAD} bytes")
    lines = data[:end].split(b"\r\n")
    after = data[end + 4 :]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HTTPRequestError(400, "malformed request line")
    method, target, version = parts
    try:
        text_target = target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPRequestError(400, "non-ASCII request target") from None
    if method == b"CONNECT":
        host, port = _split_host_port(text_target, None)
        return ProxyRequest(True, host, port, after)
    if not method.isalpha() or not method.isupper():
        raise HTTPRequestError(400, "malformed method")
    split = urlsplit(text_target)
    if split.scheme.lower() != "http":
        if split.scheme:
            raise HTTPRequestError(501, f"the gateway forwards http:// only, not {split.scheme}://")
        raise HTTPRequestError(400, "a proxy request needs an absolute http:// URL or CONNECT")
    if not split.netloc or "@" in split.netloc:
        raise HTTPRequestError(400, "bad authority in the request URL")
    host, port = _split_host_port(split.netloc, 80)
    path = split.path or "/"
    if split.query:
        path += "?" + split.query
    head = [method + b" " + path.encode("ascii") + b" " + version]
    named: set[bytes] = set()
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HTTPRequestError(400, "malformed header line")
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in line.partition(b":")[2].split(b",")}
    for line in lines[1:]:
        key = line.partition(b":")[0].lower()
        if key in _HOP_BY_HOP or key in named:
            continue
        head.append(line)
    head.append(b"Connection: close")
    return ProxyRequest(False, host, port, b"\r\n".join(head) + b"\r\n\r\n" + after)
