"""HTTP proxy requests, as the gateway's local side reads them (sans-IO; RFC 9110, RFC 9112).

Strategy: the gateway (``socks6fast.asyncio.gateway``) accepts two HTTP proxy requests
and nothing else:

* ``CONNECT host:port HTTP/1.1`` (RFC 9110 section 9.3.6): a tunnel; the gateway answers
  ``200 Connection established`` and relays bytes both ways.
* a request in absolute form, ``GET http://host[:port]/path HTTP/1.1`` (RFC 9112 section
  3.2.2), any method: forwarded to the origin in origin form (``GET /path``), with the
  hop-by-hop headers (``Proxy-*``, ``Connection``, ``Keep-Alive``, the headers that
  ``Connection`` names) dropped, the received ``Host`` replaced by the target's authority
  (RFC 9112 section 3.2.2 MUST) and ``Connection: close`` added. One request per client
  connection: the origin closes after its response, which the client then sees (it
  reads the origin's own ``Connection: close``, or the end of the stream). No
  pipelining: only the first request's body, framed by ``Content-Length`` or chunked
  (`BodyFramer`), goes to the origin; bytes after it (a pipelined second request, maybe
  for another host) are read and dropped, never passed into the first host's tunnel. A
  request with both ``Content-Length`` and ``Transfer-Encoding``, or a
  ``Transfer-Encoding`` whose last coding is not chunked, gets 400 (RFC 9112 section 6.3).
  No response parsing: the response bytes are relayed as they come.

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

__all__ = [
    "MAX_HEAD",
    "BodyFramer",
    "HTTPRequestError",
    "ProxyRequest",
    "parse_request_head",
    "status_line",
]

#: Largest request head (request line + headers) the gateway reads, in bytes.
MAX_HEAD: Final = 32 * 1024
#: Longest chunk-size line or trailer line of a chunked body, in bytes.
MAX_CHUNK_LINE: Final = 4096
#: Longest destination name: what a SOCKS address can carry (one length byte).
MAX_NAME: Final = 255

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
    """What goes to the destination first: the rewritten head and the part of the body
    read with it (absolute form), or the bytes the client sent after the CONNECT head."""
    body: BodyFramer | None = None
    """Absolute form: where the rest of the request body ends (the client's bytes after
    it are not forwarded); None for CONNECT."""


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class BodyFramer:
    """Where a request body ends (RFC 9112 section 6.3): ``length`` bytes, or chunked
    (section 7.1) when ``length`` is None. Feed it the client's bytes; it returns the part
    that belongs to the body, and `done` tells when the body is complete."""

    def __init__(self, length: int | None) -> None:
        self._left = length or 0
        self._chunked = length is None
        self._state = _SIZE
        self._line = bytearray()
        self.done = length == 0
        """The body is complete: nothing more of the client's goes to the origin."""

    def feed(self, data: bytes) -> bytes:
        """The prefix of ``data`` that belongs to the body.

        Raises:
            HTTPRequestError: malformed chunked framing (400).
        """
        if self.done:
            return b""
        if not self._chunked:
            take = data[: self._left]
            self._left -= len(take)
            self.done = self._left == 0
            return take
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._state == _DATA:
                count = min(self._left, end - pos)
                pos += count
                self._left -= count
                if not self._left:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise HTTPRequestError(400, "chunk line too long")
                pos = end
                break
            line = bytes(self._line + data[pos:newline])
            self._line.clear()
            pos = newline + 1
            if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\r"):
                raise HTTPRequestError(400, "malformed chunked body")
            line = line[:-1]
            if self._state == _SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")  # chunk-ext after ';'
                if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
                    raise HTTPRequestError(400, "bad chunk size")
                self._left = int(size, 16)
                self._state = _DATA if self._left else _TRAILER
            elif self._state == _DATA_END:
                if line:
                    raise HTTPRequestError(400, "chunk data longer than its size")
                self._state = _SIZE
            elif not line:  # the empty line after the trailer section ends the message
                self.done = True
        return data[:pos]


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
        if authority.count(":") > 1:  # host:80:90, or an IPv6 address without brackets
            raise HTTPRequestError(400, f"bad authority {authority!r}")
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
    # RFC 9112 section 3.2.3: authority-form is uri-host ":" port, no userinfo (RFC 9110
    # section 4.2.4: its presence is an error); a name a SOCKS address cannot carry, or
    # with control characters (they would end up in log lines), is refused before any answer.
    if "@" in host or len(host.encode()) > MAX_NAME or any(c <= " " or c == "\x7f" for c in host):
        raise HTTPRequestError(400, f"bad host in {authority!r}")
    return host, port


def _authority(host: str, port: int) -> bytes:
    """The Host field value for ``host``:``port`` (the port only when not http's 80)."""
    text = f"[{host}]" if ":" in host else host
    if port != 80:
        text += f":{port}"
    return text.encode("ascii")


def _framing(lines: list[bytes]) -> int | None:
    """The body length of a request (None: chunked), RFC 9112 section 6.3.

    Raises:
        HTTPRequestError: Content-Length with Transfer-Encoding, a Transfer-Encoding whose
            last coding is not chunked (items 3 and 4: 400), or a bad Content-Length.
    """
    codings: list[bytes] = []
    lengths: set[bytes] = set()
    for line in lines:
        name, _, value = line.partition(b":")
        key = name.lower()
        if key == b"transfer-encoding":
            codings += [c.strip(b" \t").lower() for c in value.split(b",")]
        elif key == b"content-length":
            lengths |= {v.strip(b" \t") for v in value.split(b",")}
    if codings and lengths:
        raise HTTPRequestError(400, "both Content-Length and Transfer-Encoding")
    if codings:
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise HTTPRequestError(400, "a Transfer-Encoding that does not end with chunked")
        return None
    if not lengths:
        return 0
    if len(lengths) != 1:
        raise HTTPRequestError(400, "differing Content-Length values")
    (length,) = lengths
    if not length.isdigit() or len(length) > 18:
        raise HTTPRequestError(400, "bad Content-Length")
    return int(length)


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
    # RFC 9112 section 3.2.2: the received Host is ignored; a new one names the target.
    head = [method + b" " + path.encode("ascii") + b" " + version, b"Host: " + _authority(host, port)]
    named: set[bytes] = set()
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HTTPRequestError(400, "malformed header line")
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in line.partition(b":")[2].split(b",")}
    for line in lines[1:]:
        key = line.partition(b":")[0].lower()
        if key in _HOP_BY_HOP or key in named or key == b"host":
            continue
        head.append(line)
    head.append(b"Connection: close")
    body = BodyFramer(_framing(lines[1:]))
    return ProxyRequest(False, host, port, b"\r\n".join(head) + b"\r\n\r\n" + body.feed(after), body)
