"""Proxy URLs: ``socks6://[user[:password]@]host[:port]`` and ``socks6+tls://...``.

User and password are percent-decoded and kept as UTF-8 bytes (RFC 1929 names no
encoding). An IPv6 host is written in brackets: ``socks6://[::1]:1080``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

from ..constants import MAX_USERPASS_LENGTH
from ..proto.socks5 import UserPassRequest

__all__ = ["DEFAULT_PORT", "SCHEMES", "ProxyURL", "parse_proxy_url", "proxy_ssl_context"]

#: Port used when the URL names none: the SOCKS port of RFC 1928 (the draft asks IANA for a
#: SOCKS-over-TLS port but none is assigned, so socks6+tls uses it too).
DEFAULT_PORT: Final = 1080
#: Accepted schemes and whether they mean TLS to the proxy (section "SOCKS over TLS", TRN-03).
SCHEMES: Final = {"socks6": False, "socks6+tls": True}


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A parsed proxy URL."""

    host: str
    """Proxy host name or IP literal (IPv6 without brackets)."""
    port: int
    """Proxy port."""
    tls: bool
    """True for ``socks6+tls``: the SOCKS exchange runs over TLS."""
    username: bytes | None = None
    """Username, or None when the URL has no userinfo."""
    password: bytes = field(default=b"", repr=False)
    """Password (empty when the URL gives none); hidden from repr."""

    @property
    def credentials(self) -> UserPassRequest | None:
        """The RFC 1929 request, or None without a username."""
        if self.username is None:
            return None
        return UserPassRequest(self.username, self.password)


def parse_proxy_url(url: str) -> ProxyURL:
    """Parse a proxy URL.

    Args:
        url: ``socks6://`` or ``socks6+tls://``, optional ``user:password@``, a host and an
            optional port (default `DEFAULT_PORT`). No path, query or fragment.

    Returns:
        The parsed URL.

    Raises:
        ValueError: another scheme, no host, a bad port, a path, query or fragment, or a
            username or password that is empty or over 255 bytes (RFC 1929).

    Example:
        >>> u = parse_proxy_url("socks6+tls://alice:p%40ss@[::1]:1081")
        >>> u.host, u.port, u.tls, u.username, u.password
        ('::1', 1081, True, b'alice', b'p@ss')
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported proxy scheme {parts.scheme!r}: use socks6:// or socks6+tls://")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError("the proxy URL names no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad proxy port in {url!r}") from exc
    if port == 0:
        raise ValueError("proxy port 0 cannot be connected to")
    username = None if parts.username is None else unquote_to_bytes(parts.username)
    password = b"" if parts.password is None else unquote_to_bytes(parts.password)
    if username is not None:
        # RFC 1929: ULEN and PLEN are both 1-255; say so here rather than fail later in
        # the encoder, when the first connection is already being made.
        for what, value in (("username", username), ("password", password)):
            if not value:
                raise ValueError(f"the proxy URL has an empty {what}: RFC 1929 needs user:password@")
            if len(value) > MAX_USERPASS_LENGTH:
                raise ValueError(f"the proxy {what} is over {MAX_USERPASS_LENGTH} bytes (RFC 1929)")
    return ProxyURL(host, DEFAULT_PORT if port is None else port, SCHEMES[scheme], username, password)


def proxy_ssl_context(url: ProxyURL, proxy_ssl: ssl.SSLContext | bool | None) -> ssl.SSLContext | None:
    """The TLS context towards the proxy: verifying by default (TRN-03).

    Raises:
        ValueError: ``proxy_ssl`` given for a plaintext URL, or False for socks6+tls.
    """
    if not url.tls:
        if proxy_ssl not in (None, False):
            raise ValueError("proxy_ssl needs a socks6+tls:// proxy URL")
        return None
    if proxy_ssl is False:
        raise ValueError("socks6+tls:// with proxy_ssl=False: use socks6:// for a plaintext proxy")
    if proxy_ssl is None or proxy_ssl is True:
        return ssl.create_default_context()
    return proxy_ssl
