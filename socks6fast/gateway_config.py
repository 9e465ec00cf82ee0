"""The gateway's configuration: a TOML file with one ``[gateway]`` table (issue 15 item 1).

Every key is optional except ``upstream`` (which ``--upstream`` may give instead); the
command line's flags override the file's keys. Each mistake is one `ConfigError` sentence
naming the key, as for the proxy's own file (`socks6fast.config`). ``socks6fast
check-config FILE`` checks a gateway file when its top-level table is ``[gateway]``.

Example::

    [gateway]
    listen = ["127.0.0.1:1080"]                    # SOCKS 5 and HTTP proxy, one port
    upstream = "socks6+tls://alice@proxy.example:1443"
    upstream_ca = "/etc/socks6fast/proxy-ca.pem"   # trust this CA (default: the system's)
    upstream_verify = true                          # false: no certificate check (say so)
    password_file = "/etc/socks6fast/gateway.pass"  # else $SOCKS6FAST_PASSWORD or a prompt
    mode = "optimistic"                             # or "strict"
    first_data_wait_ms = 5                          # wait for the app's first bytes
    tokens = 64                                     # idempotence token window asked for
    keepalive = 20                                  # seconds between session NOOPs
    tfo = true                                      # TCP Fast Open to the upstream
    connect_timeout = 10
    log_level = "info"
    admin_listen = "127.0.0.1:9181"                 # Prometheus /metrics, /healthz (off unless set)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

from .config import (
    ConfigError,
    HostPort,
    _check_keys,
    _check_listen,
    _int,
    _seconds,
    _show,
    load_toml,
)
from .constants import MAX_USERPASS_LENGTH
from .net.url import ProxyURL, parse_proxy_url

__all__ = [
    "DEFAULT_FIRST_DATA_WAIT",
    "GatewayConfig",
    "Mode",
    "load_gateway_config",
    "parse_gateway_config",
    "parse_upstream",
]

Mode = Literal["optimistic", "strict"]
#: Seconds the gateway waits for the app's first bytes before it sends the Request
#: without initial data (a server-speaks-first protocol must not stall).
DEFAULT_FIRST_DATA_WAIT: Final = 0.005
_KEYS: Final = {
    "listen",
    "upstream",
    "upstream_ca",
    "upstream_verify",
    "upstream_server_name",
    "password_file",
    "mode",
    "first_data_wait_ms",
    "tokens",
    "keepalive",
    "tfo",
    "connect_timeout",
    "log_level",
    "admin_listen",
}
_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The ``[gateway]`` table, validated."""

    upstream: ProxyURL | None = None
    """The upstream socks6fast (``socks6://`` or ``socks6+tls://``); the password may be
    missing here (it comes from a file, the environment or a prompt)."""
    listen: tuple[HostPort, ...] = (("127.0.0.1", 1080),)
    """Local addresses (SOCKS 5 and HTTP proxy on each)."""
    upstream_ca: str | None = None
    """CA file trusted for the upstream's certificate (default: the system's CAs)."""
    upstream_verify: bool = True
    """False: do not verify the upstream's certificate (an explicit opt-out, logged)."""
    upstream_server_name: str | None = None
    """Name checked in the upstream's certificate (default: the URL's host)."""
    password_file: str | None = None
    """File whose first line is the upstream password."""
    mode: Mode = "optimistic"
    """``optimistic``: answer the app before the upstream replies; ``strict``: wait."""
    first_data_wait: float = DEFAULT_FIRST_DATA_WAIT
    """Seconds to wait for the app's first bytes (optimistic mode)."""
    tokens: int = 64
    """Idempotence token window asked for with the session (0: no tokens)."""
    keepalive: float = 20.0
    """Seconds between the NOOPs that keep the session warm."""
    tfo: bool = True
    """TCP Fast Open to the upstream where the draft allows (TRN-02)."""
    connect_timeout: float = 10.0
    """Seconds for connecting, TLS and the SOCKS 6 handshake to the upstream."""
    log_level: str = "info"
    """Log level."""
    admin_listen: HostPort | None = None
    """Where ``/metrics`` and ``/healthz`` are served (None: nowhere)."""

    def replace(self, **changes: Any) -> GatewayConfig:
        """A copy with ``changes`` (the command line's overrides)."""
        return dataclasses.replace(self, **changes)


def parse_upstream(text: str) -> ProxyURL:
    """An upstream URL; unlike a client URL, ``user@`` without a password is allowed.

    Raises:
        ConfigError: the URL is not usable, in one sentence.
    """
    try:
        parts = urlsplit(text)
        bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        url = parse_proxy_url(bare)
    except ValueError as exc:
        raise ConfigError(f"upstream: {exc}") from None
    if parts.username is None:
        return url
    username = unquote_to_bytes(parts.username)
    password = b"" if parts.password is None else unquote_to_bytes(parts.password)
    if not username or len(username) > MAX_USERPASS_LENGTH:
        raise ConfigError(f"upstream: the user name must be 1-{MAX_USERPASS_LENGTH} bytes (RFC 1929)")
    if len(password) > MAX_USERPASS_LENGTH:
        raise ConfigError(f"upstream: the password is over {MAX_USERPASS_LENGTH} bytes (RFC 1929)")
    return dataclasses.replace(url, username=username, password=password)


def _bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"gateway.{key}: {_show(value)} is not true or false")
    return value


def _file(table: Mapping[str, Any], key: str, base: Path) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"gateway.{key}: {_show(value)} is not a file path")
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"gateway.{key}: {_show(value)} does not exist or is not a file")
    return str(path)


def parse_gateway_config(
    data: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> GatewayConfig:
    """Validate a parsed TOML document holding a ``[gateway]`` table.

    Raises:
        ConfigError: a key is invalid or unknown.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    _check_keys(data, "", {"gateway"})
    table = data.get("gateway", {})
    if not isinstance(table, dict):
        raise ConfigError("gateway: must be a table, written [gateway]")
    _check_keys(table, "gateway", _KEYS)
    listen_value = table.get("listen", ["127.0.0.1:1080"])
    if not isinstance(listen_value, list) or not listen_value:
        raise ConfigError(f"gateway.listen: {_show(listen_value)} is not a non-empty array of HOST:PORT")
    listen = tuple(_check_listen(v, f"gateway.listen[{i}]") for i, v in enumerate(listen_value))
    upstream_value = table.get("upstream")
    upstream = None
    if upstream_value is not None:
        if not isinstance(upstream_value, str):
            raise ConfigError(f"gateway.upstream: {_show(upstream_value)} is not a socks6:// URL")
        try:
            upstream = parse_upstream(upstream_value)
        except ConfigError as exc:
            raise ConfigError(f"gateway.{exc}") from None
    mode = table.get("mode", "optimistic")
    if mode not in ("optimistic", "strict"):
        raise ConfigError(f'gateway.mode: {_show(mode)} is not "optimistic" or "strict"')
    wait_ms = table.get("first_data_wait_ms", DEFAULT_FIRST_DATA_WAIT * 1000)
    ok = isinstance(wait_ms, int | float) and not isinstance(wait_ms, bool) and 0 <= wait_ms <= 10_000
    if not ok:
        raise ConfigError(f"gateway.first_data_wait_ms: {_show(wait_ms)} is not a number of ms 0-10000")
    level = table.get("log_level", "info")
    if level not in _LOG_LEVELS:
        raise ConfigError(f"gateway.log_level: {_show(level)} is not one of {', '.join(_LOG_LEVELS)}")
    admin = table.get("admin_listen")
    server_name = table.get("upstream_server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise ConfigError(f"gateway.upstream_server_name: {_show(server_name)} is not a host name")
    return GatewayConfig(
        upstream=upstream,
        listen=listen,
        upstream_ca=_file(table, "upstream_ca", base),
        upstream_verify=_bool(table, "upstream_verify", True),
        upstream_server_name=server_name,
        password_file=_file(table, "password_file", base),
        mode=mode,
        first_data_wait=float(wait_ms) / 1000,
        tokens=_int(table, "tokens", "gateway", 64, low=0, high=2**31 - 1),
        keepalive=_seconds(table, "keepalive", "gateway", 20.0),
        tfo=_bool(table, "tfo", True),
        connect_timeout=_seconds(table, "connect_timeout", "gateway", 10.0),
        log_level=level,
        admin_listen=None if admin is None else _check_listen(admin, "gateway.admin_listen"),
    )


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway TOML file (relative paths are taken from its directory).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key is invalid; the message
            starts with the file name.
    """
    return load_toml(path, parse_gateway_config)
