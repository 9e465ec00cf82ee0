"""The proxy's configuration: one validated, frozen `Config`, loaded from TOML.

Strategy: `parse_config` checks every key of the parsed TOML document and builds frozen
dataclasses; anything wrong raises `ConfigError` with one sentence that names the key, such
as ``server.listen[1]: "localhost:99999" is not HOST:PORT with a port 0-65535``. Unknown keys
are errors too, so a typo never silently falls back to a default. Without a file the
embedded `DEFAULT_TOML` applies: listen on 127.0.0.1:1080 only, no authentication, every
destination allowed, sessions on. Plain-text passwords never appear in a file: ``[users]``
holds scrypt hashes (`socks6fast.proto.auth`), and the CLI's ``--user NAME:PASSWORD`` is hashed in
memory by `Config.with_overrides`.

Keys (every one optional; the defaults are in `DEFAULT_TOML`):

``default_action`` (top level, before any table)
    ``"allow"`` or ``"deny"``: the decision when no rule matches. Default ``"allow"``.

``[server]``
    ``listen``: array of ``"HOST:PORT"`` to accept plain SOCKS 6 / SOCKS 5 on; IPv6 as
    ``"[::1]:1080"``; HOST is an IP address or a host name; port 0 picks a free port.
    Default ``["127.0.0.1:1080"]`` (loopback only: secure by default).
    ``tls_listen``: array of ``"HOST:PORT"`` for SOCKS over TLS. Default ``[]``.
    An entry of either array may instead be a table, for a listener behind a load balancer
    that speaks the PROXY protocol (HAProxy ``send-proxy`` / ``send-proxy-v2``, v1 and v2):
    ``{ address = "HOST:PORT", proxy_protocol = true, proxy_protocol_from = ["CIDR", ...] }``
    (or ``[[server.listen]]`` tables). Such a listener serves only peers within
    ``proxy_protocol_from`` (the balancers), each connection must start with a PROXY header,
    and the client address it names is the one the rules, limits, sessions, UDP checks and
    the log see (`socks6fast.proto.proxy_header`; docs/decisions.md D27).
    ``tls_certificate``, ``tls_key``: PEM files (relative paths are relative to the config
    file); both required when ``tls_listen`` or ``udp.dtls_port`` is set; must exist.
    ``tls_client_ca``: a PEM CA file; when set, TLS listeners and DTLS ports require a client
    certificate that verifies against it (a handshake without one fails; TRN-03).
    ``max_connections``: concurrent client connections at most (integer >= 1; 10000).
    ``serve`` lowers it, with a warning, when the descriptor limit cannot hold that many
    (`socks6fast.dataplane.resources.plan_descriptors`); past it newcomers get General Failure.
    ``handshake_timeout``: seconds for a client to send a complete request (> 0; 10).
    ``connect_timeout``: seconds to connect to the destination (> 0; 10).
    ``idle_timeout``: seconds a relayed connection may stay silent both ways (> 0; 300).
    ``max_options_length``: largest Options Length accepted, 1024-16384 (16384, docs/decisions.md D6:
    the draft's cap; it can only be lowered).
    ``dns_resolver``: ``"HOST:PORT"`` of a DNS server for the draft's DNS service (CONNECT
    to 0.0.0.0:53, docs/decisions.md D13); absent: that service is refused.
    ``min_bind_port``: lowest port a client may ask for by number in a SOCKS 6 BIND or UDP
    ASSOCIATE (1-65535; 1024). Below it the request gets Connection Not Allowed by Ruleset
    (0x02): a proxy that may bind privileged ports (root, CAP_NET_BIND_SERVICE) must not
    let clients take a service port such as 22 or 53 (docs/decisions.md D25). Port 0
    ("any port") is always allowed; 1 turns the check off.
    ``relay_workers``: relay worker count, 0 = one per CPU core (0-256; 0). The limit is
    ``constants.MAX_RELAY_WORKERS``, the very one the relay engine enforces. With
    ``workers`` > 1 the count is per worker process, and 0 means cores / workers (at least 1).
    ``workers``: proxy processes sharing the listeners (issue 13 item 1, D34), 0 = one per
    CPU core (0-256; 1). 1 is a single process; more start a supervisor and N workers (the
    ``serve --workers`` flag overrides it).
    ``auth_failure_burst``: failed username/password checks a client address may make in a
    row (a token bucket refilled one token per ``auth_failure_interval``); past it the
    address's checks run only when a check slot is free at once, never queued
    (`FailedAuthLimiter`); 0 = no limit (integer >= 0; 10).
    ``auth_failure_interval``: seconds per token regained (> 0; 5).
    ``auth_user_failure_burst``: failed checks for one user name, from any address, before
    further logins for that name fail at once without a check (scrypt costs ~35-50 ms of
    CPU each); credentials verified before still work (cached); 0 = no limit (integer >= 0; 10).
    ``auth_user_failure_interval``: seconds per token regained per user name (> 0; 10).
    ``auth_checks_per_second``: password checks (scrypt runs) per second in all, a burst of
    one second's worth; a check waits up to 2 s for a slot, then fails; 0 = no limit
    (number >= 0; 10).
    ``log_level``: ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` or ``"critical"``.
    ``log_format``: ``"text"`` (one ``key=value`` line per finished connection) or ``"json"``
    (every log line one JSON object, with ``ts`` in RFC 3339 UTC; issue 14). Default ``"text"``.

``[admin]`` (issue 14: metrics)
    ``listen``: ``"HOST:PORT"`` of the HTTP listener serving ``/metrics`` (Prometheus text
    format) and ``/healthz``; a bare port (``9180`` or ``"9180"``) means ``127.0.0.1``. Absent
    (the default): no admin listener, and no metrics are counted.

``[users]``
    ``NAME = "scrypt$n=16384,r=8,p=1$<salt>$<hash>"``, one per user (name 1-255 UTF-8 bytes,
    not starting with ``@``). Authentication is required iff at least one user is
    configured (here or with ``--user``).

``[sessions]`` (draft-11 section "Session options")
    ``enabled``: honour Session Requests (true). ``idle_timeout``: seconds before an unused
    session expires (> 0; 600). ``max_sessions``, ``max_per_client_ip``, ``max_per_user``:
    caps on live sessions in total, per client address and per authenticated user
    (integers >= 1; 100000, 100, 1000). ``max_token_window``: largest idempotence token
    window issued, 0-2147483647, 0 = none (65536, docs/decisions.md D15). ``store``:
    ``"memory"`` (the default: this process's sessions) or a Redis URL that several workers
    and hosts share (issue 13 item 2): ``"redis://HOST:PORT/DB"``, ``"rediss://..."`` (TLS),
    ``"unix:///PATH?db=N"``; it needs the ``redis`` package (``socks6fast[redis]``).
    ``store_timeout``: seconds to connect to Redis and to wait for each answer (> 0; 1.0).

``[[rules]]`` (any number, first match wins; see `socks6fast.proto.policy`)
    ``action``: ``"allow"`` or ``"deny"`` (required). Conditions, each an array that is
    omitted (or ``["*"]``) to match anything: ``clients`` (CIDR networks or addresses),
    ``users`` (names, ``"@authenticated"``, ``"@anonymous"``), ``commands`` (``"noop"``,
    ``"connect"``, ``"bind"``, ``"udp_associate"``), ``destinations`` (CIDR networks,
    ``".example.com"`` for a domain and its subdomains, ``"example.com"`` for that name
    only, ``"@local"`` for every address of this host: loopback, its interface addresses
    and, for CONNECT, 0.0.0.0 and ::), ``ports`` (integers or ``"LOW-HIGH"`` strings).
    Destinations match the host the proxy really talks to: a CONNECT's address as the
    kernel will connect to it (0.0.0.0 is 127.0.0.1) or each address a name resolves to,
    and for BIND the host that connects (see `socks6fast.proto.policy`).

An open proxy: `Config.open_proxy_warning` says so when a listener is not on loopback, no
user is configured and the rules let a client from any address through (``serve`` logs it
at start-up and on reload, ``check-config`` prints it).

``[udp]`` (UDP ASSOCIATE, SOCKS 6 and SOCKS 5; on by default)
    ``enabled``: false turns UDP ASSOCIATE off (Command Not Supported, no UDP socket).
    ``port``: the SOCKS 6 UDP port for plain datagrams, opened on each listener's address
    (1-65535; absent = the same port number as each TCP listener, D16). ``dtls``: false
    turns the DTLS ports off (default true: SOCKS 6 datagrams over DTLS, issue 11, D16: a
    DTLS port beside each TLS listener, on its address and port number, with its
    certificate and key). ``dtls_port``: the DTLS port number instead (1-65535; on each TLS
    listener's address, or each listener's address when there is no TLS listener; needs
    ``server.tls_certificate`` and ``tls_key``). ``dtls_handshakes_per_source`` (1-65535; 16) and
    ``dtls_handshakes_total`` (1-1000000, at least the former; 1024): DTLS handshakes in
    progress after a valid cookie, from one source address (IPv6: per /64) and in all; the
    same caps count, separately, DTLS connections that finished their handshake but carry
    no association yet (probe 19 F4). ``dtls_unmapped_timeout``: seconds such a connection
    may wait for its first valid datagram before it is closed (> 0, at most 300; 5).
    ``dtls_cookie_interval``: seconds per DTLS cookie secret (> 0, at most 3600; 60); a
    cookie is good for one to two intervals.
    ``first_datagram_timeout``: seconds an association waits for its first datagram before
    its TCP connection is closed (UDP-07; default 30).
    ``max_associations_per_client`` / ``max_associations_per_user``: live associations one
    client address / one user may hold (0 = no limit; over it: General Failure).
    ``workers``: UDP engine threads (0 = half the usable cores, at least one: D33); ``batch``:
    datagrams per recvmmsg/sendmmsg (1-256); ``max_datagram``: largest datagram relayed, bytes (512-65535).

``[limits]`` (issue 14 item 4; every value 0 = no limit, the default; see `socks6fast.proto.limits`)
    ``user_connections``: concurrent connections per authenticated user (integer >= 0).
    ``user_connection_rate``: new connections per second per user (a token bucket; number
    >= 0); ``user_connection_burst``: how many may come at once (integer >= 0; 0 = the rate
    rounded up, at least 1). ``user_upload`` / ``user_download``: bytes per second client ->
    destination / destination -> client, shared by all of one user's connections (an
    integer, or a string such as ``"2MB"``, ``"512KiB"``, ``"10M"``: k/M/G = 1000^n, Ki/Mi/Gi =
    1024^n, the ``B`` optional). ``client_connections``, ``client_connection_rate``,
    ``client_connection_burst``, ``client_upload``, ``client_download``: the same per client
    address (anonymous clients too).
``[limits.users.NAME]``
    Per-user replacements of the ``user_*`` values for one user of ``[users]``:
    ``connections``, ``connection_rate``, ``connection_burst``, ``upload``, ``download``
    (keys left out keep the ``[limits]`` value). Over a connection limit a request is
    refused with Connection not allowed by ruleset (SOCKS 5: REP 0x02) and one log line;
    over a bandwidth limit the stream is slowed. Reloaded by SIGHUP.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import math
import os
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .constants import (
    MAX_OPTIONS_LENGTH,
    MAX_RELAY_WORKERS,
    MAX_USERPASS_LENGTH,
    MAX_WINDOW_SIZE,
    MAX_WORKER_PROCESSES,
    Command,
)
from .errors import ConfigError
from .proto.auth import ScryptHash, UserStore, new_hash, parse_hash
from .proto.limits import Limits
from .proto.policy import (
    ANONYMOUS,
    AUTHENTICATED,
    Destination,
    IPNetwork,
    LocalAddresses,
    Policy,
    Rule,
    parse_command,
    parse_destination,
    parse_network,
    parse_port_range,
)
from .proto.sessions import MemorySessionStore, SessionLimits

__all__ = [
    "DEFAULT_TOML",
    "AdminConfig",
    "Config",
    "ConfigError",
    "HostPort",
    "LimitsConfig",
    "ServerConfig",
    "SessionsConfig",
    "UDPConfig",
    "default_config",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_user_option",
]

#: (host, port); host is an IP address or name, without IPv6 brackets.
HostPort = tuple[str, int]

#: The configuration that applies without a file; every key at its default.
DEFAULT_TOML = """\
default_action = "allow"

[server]
listen = ["127.0.0.1:1080"]
tls_listen = []
max_connections = 10000
handshake_timeout = 10.0
connect_timeout = 10.0
idle_timeout = 300.0
max_options_length = 16384
min_bind_port = 1024
relay_workers = 0
workers = 1
auth_failure_burst = 10
auth_failure_interval = 5.0
auth_user_failure_burst = 10
auth_user_failure_interval = 10.0
auth_checks_per_second = 10.0
log_level = "info"
log_format = "text"

[users]

[sessions]
enabled = true
idle_timeout = 600.0
max_sessions = 100000
max_per_client_ip = 100
max_per_user = 1000
max_token_window = 65536
store = "memory"
store_timeout = 1.0

[udp]
enabled = true
first_datagram_timeout = 30.0
max_associations_per_client = 256
max_associations_per_user = 1024
workers = 0
batch = 16
max_datagram = 65535
"""

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_MIN_OPTIONS_LENGTH = 1024  # room for a username/password Authentication Data option
_ANY = "*"
_T = TypeVar("_T")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` table."""

    listen: tuple[HostPort, ...]
    """Plain listeners."""
    tls_listen: tuple[HostPort, ...]
    """TLS listeners."""
    tls_certificate: str | None
    """Absolute path of the PEM certificate chain, or None."""
    tls_key: str | None
    """Absolute path of the PEM private key, or None."""
    max_connections: int
    """Concurrent client connections at most."""
    handshake_timeout: float
    """Seconds for a complete request."""
    connect_timeout: float
    """Seconds to connect to a destination."""
    idle_timeout: float
    """Seconds of silence after which a relayed connection is closed."""
    max_options_length: int
    """Largest Options Length accepted (D6)."""
    dns_resolver: HostPort | None
    """DNS server for the DNS service (D13), or None."""
    min_bind_port: int
    """Lowest port a BIND / UDP ASSOCIATE may name (D25); 0 (any port) always allowed."""
    relay_workers: int
    """Relay worker count; 0 = one per CPU core."""
    auth_failure_burst: int
    """Failed password checks per client address before its checks lose priority; 0 = no limit."""
    auth_failure_interval: float
    """Seconds per failed attempt regained (token bucket refill)."""
    auth_user_failure_burst: int
    """Failed password checks per user name before logins for it fail unchecked; 0 = no limit."""
    auth_user_failure_interval: float
    """Seconds per failed attempt regained, per user name."""
    auth_checks_per_second: float
    """Password checks (scrypt runs) per second in all; 0 = no limit."""
    log_level: str
    """Lower-case logging level name."""
    log_format: str = "text"
    """``"text"`` or ``"json"`` (issue 14)."""
    workers: int = 1
    """Worker processes (issue 13 item 1, D34); 0 = one per CPU core; 1 = one process."""

    listen_proxy_protocol: tuple[tuple[IPNetwork, ...] | None, ...] = ()
    """Per ``listen`` entry, in the same order: the trusted load balancers' networks when the
    entry has ``proxy_protocol = true``, else None. Empty: no entry has it."""
    tls_listen_proxy_protocol: tuple[tuple[IPNetwork, ...] | None, ...] = ()
    """The same per ``tls_listen`` entry."""
    tls_client_ca: str | None = None
    """Absolute path of the PEM CA file client certificates must verify against (TLS
    listeners and DTLS ports), or None: no client certificate asked for."""

    def proxy_protocol_from(self, tls: bool, index: int) -> tuple[IPNetwork, ...] | None:
        """The trusted balancers of ``listen[index]`` (``tls_listen`` when ``tls``), or None
        when that listener does not speak the PROXY protocol."""
        entries = self.tls_listen_proxy_protocol if tls else self.listen_proxy_protocol
        return entries[index] if index < len(entries) else None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The ``[admin]`` table (issue 14: metrics)."""

    listen: HostPort | None = None
    """Where ``/metrics`` and ``/healthz`` are served; None: no admin listener."""

    @property
    def exposed(self) -> bool:
        """The admin listener is on an address other than loopback (the server warns)."""
        return self.listen is not None and not _is_loopback_host(self.listen[0])


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """The ``[sessions]`` table."""

    enabled: bool
    """Whether Session Requests are honoured."""
    idle_timeout: float
    """Seconds before an unused session expires."""
    max_sessions: int
    """Live sessions at most."""
    max_per_client_ip: int
    """Live sessions per client address at most."""
    max_per_user: int
    """Live sessions per authenticated user at most."""
    max_token_window: int
    """Largest token window issued; 0 = none."""
    store: str = "memory"
    """``"memory"`` or the URL of the Redis the sessions are shared through (issue 13 item 2)."""
    store_timeout: float = 1.0
    """Seconds to connect to that Redis and to wait for each answer."""

    def limits(self) -> SessionLimits:
        """The limits a session store enforces (built when the store is, and on reload)."""
        return SessionLimits(
            idle_timeout=self.idle_timeout,
            max_sessions=self.max_sessions,
            max_per_client_ip=self.max_per_client_ip,
            max_per_user=self.max_per_user,
            max_token_window=self.max_token_window,
        )


@dataclass(frozen=True, slots=True)
class UDPConfig:
    """The ``[udp]`` table."""

    port: int | None
    """The SOCKS 6 UDP port, or None: the same port number as each TCP listener (D16)."""
    dtls_port: int | None
    """The DTLS port number, or None: the port number of each TLS listener (D16)."""
    enabled: bool = True
    """False: UDP ASSOCIATE is answered Command Not Supported and no UDP socket is opened."""
    first_datagram_timeout: float = 30.0
    """Seconds to wait for an association's first datagram (UDP-07)."""
    max_associations_per_client: int = 256
    """Live associations per client address (0: no limit)."""
    max_associations_per_user: int = 1024
    """Live associations per authenticated user (0: no limit)."""
    workers: int = 0
    """UDP engine worker threads (0: half the usable cores, at least one: D33)."""
    batch: int = 16
    """Datagrams per recvmmsg/sendmmsg call."""
    max_datagram: int = 65535
    """Largest datagram payload relayed, in bytes."""
    dtls_handshakes_per_source: int = 16
    """DTLS handshakes in progress from one source address (socks6fast.net.dtls.DTLSLimits)."""
    dtls_handshakes_total: int = 1024
    """DTLS handshakes in progress in all."""
    dtls_cookie_interval: float = 60.0
    """Seconds per DTLS cookie secret; a cookie is good for one to two intervals."""
    dtls_unmapped_timeout: float = 5.0
    """Seconds a finished DTLS connection may carry no association before it is closed
    (probe 19 F4: such connections hold a descriptor each and cost a client nothing)."""
    dtls: bool = True
    """DTLS ports on (issue 11): beside each TLS listener, or on ``dtls_port``."""

    def dtls_served(self, server: ServerConfig) -> bool:
        """Whether ``serve`` opens DTLS ports: UDP and DTLS on, and a TLS listener or a
        ``dtls_port`` (with the certificate, which the config requires for both)."""
        return (
            self.enabled
            and self.dtls
            and server.tls_certificate is not None
            and (bool(server.tls_listen) or self.dtls_port is not None)
        )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The ``[limits]`` table and its ``[limits.users.NAME]`` tables."""

    user: Limits = Limits()
    """Every authenticated user's limits (the ``user_*`` keys)."""
    client: Limits = Limits()
    """Every client address's limits (the ``client_*`` keys)."""
    users: Mapping[str, Limits] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    """Per-user replacements of ``user``."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. Build it with `load_config`, `default_config` or
    `parse_config`, never directly (nothing is validated here)."""

    server: ServerConfig
    """The ``[server]`` table."""
    users: Mapping[str, str]
    """User name -> scrypt hash string (read-only mapping)."""
    user_hashes: Mapping[str, ScryptHash] = dataclasses.field(repr=False, compare=False)
    """The same users with their hashes parsed, once, when the configuration was read
    (`user_store` builds from these, so a reload does not parse them again)."""
    sessions: SessionsConfig
    """The ``[sessions]`` table."""
    rules: tuple[Rule, ...]
    """The ``[[rules]]``, in order."""
    default_allow: bool
    """``default_action == "allow"``."""
    udp: UDPConfig
    """The ``[udp]`` table."""
    admin: AdminConfig = AdminConfig()
    """The ``[admin]`` table."""
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    """The ``[limits]`` table (issue 14 item 4)."""

    @property
    def auth_required(self) -> bool:
        """True iff at least one user is configured."""
        return bool(self.users)

    def policy(self, local: LocalAddresses | None = None) -> Policy:
        """Build the `Policy` for these rules.

        Args:
            local: what ``@local`` matches (the server reads it from the kernel with
                `socks6fast.net.localaddr.read_local_addresses`); None: loopback only.
        """
        return Policy(self.rules, default_allow=self.default_allow, local=local)

    def open_proxy_warning(self, hosts: Iterable[str] | None = None) -> str | None:
        """A warning when anyone who can reach a listener may use the proxy, else None.

        That is the case when a listener is not on loopback, no user is configured (no
        authentication) and the rules let an anonymous client through from an address no
        ``clients`` condition names (a rule with ``clients`` is taken as a deliberate
        choice of who may connect).

        Args:
            hosts: the listeners' addresses (the bound ones, when known); default: the
                configured ``listen`` and ``tls_listen`` hosts. A host name other than
                ``localhost`` counts as not loopback (it is not looked up here).
        """
        if self.users or not _open_to_strangers(self.rules, self.default_allow):
            return None
        if hosts is None:
            hosts = [host for host, _ in self.server.listen + self.server.tls_listen]
        exposed = sorted({host for host in hosts if not _is_loopback_host(host)})
        if not exposed:
            return None
        within = " (within the [[rules]])" if self.rules else ""
        return (
            f"open proxy: listening on {', '.join(exposed)}, which is not loopback, with no [users]: "
            f"anyone who can reach it may relay through it{within}. Add [users], or [[rules]] with "
            "clients = [...] and a deny for everyone else, or listen on 127.0.0.1 only"
        )

    def user_store(self) -> UserStore:
        """Build the `UserStore` for these users."""
        return UserStore(self.user_hashes)

    def session_store(self) -> MemorySessionStore | None:
        """Build the in-memory session store; None when sessions are disabled or shared
        through Redis (``sessions.store``; the server builds that store)."""
        sessions = self.sessions
        return (
            MemorySessionStore(sessions.limits()) if sessions.enabled and sessions.store == "memory" else None
        )

    def with_overrides(
        self,
        *,
        listen: Sequence[str] | None = None,
        users: Mapping[str, str | ScryptHash] | None = None,
    ) -> Config:
        """Apply command-line flags.

        Args:
            listen: ``--listen HOST:PORT`` values; when given (and not empty) they replace
                ``server.listen``.
            users: ``--user NAME:PASSWORD`` values as name -> clear-text password; each is
                hashed here, in memory only (the clear text is never stored or written),
                and added to (or replaces the same name in) the configured users, which
                turns authentication on. A `ScryptHash` value is used as it is (a reload
                passes the hashes made at start: the same hash, so the users' sessions stay).

        Returns:
            A new Config.

        Raises:
            ConfigError: a value is invalid; the message names the flag.
        """
        server = self.server
        if listen:
            parsed = tuple(_check_listen(value, "--listen") for value in listen)
            _check_listen_overlap(parsed, server.tls_listen, "--listen", "server.tls_listen")
            # Command-line listeners are plain: no PROXY protocol on them.
            server = dataclasses.replace(server, listen=parsed, listen_proxy_protocol=())
        merged = dict(self.users)
        hashes = dict(self.user_hashes)
        for name, password in (users or {}).items():
            _check_user_name(name, "--user")
            if isinstance(password, ScryptHash):
                hashes[name] = password
            else:
                if not 1 <= len(password.encode("utf-8")) <= MAX_USERPASS_LENGTH:
                    raise ConfigError(
                        f"--user: the password of {name!r} must be 1-{MAX_USERPASS_LENGTH} bytes"
                    )
                hashes[name] = new_hash(password)
            merged[name] = hashes[name].encode()
        return dataclasses.replace(
            self,
            server=server,
            users=types.MappingProxyType(merged),
            user_hashes=types.MappingProxyType(hashes),
        )


# --- public helpers ---------------------------------------------------------------------


def parse_listen(text: str) -> HostPort:
    """Parse ``"HOST:PORT"`` or ``"[IPV6]:PORT"``; port 0-65535 (0: any free port).

    Raises:
        ValueError: malformed; the message is the part after the key in a `ConfigError`.
    """
    return _parse_host_port(text, min_port=0)


def parse_user_option(text: str) -> tuple[str, str]:
    """Split a ``--user NAME:PASSWORD`` value at its first colon.

    Raises:
        ConfigError: there is no colon, or name or password is empty.
    """
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise ConfigError("--user: the value is not NAME:PASSWORD with a non-empty name and password")
    return name, password


def default_config() -> Config:
    """The configuration that applies without a file (`DEFAULT_TOML`)."""
    return parse_config(tomllib.loads(DEFAULT_TOML))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML configuration file.

    Relative ``tls_certificate`` / ``tls_key`` paths are taken relative to the file's
    directory.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key is invalid; the message
            starts with the file name.
    """
    return load_toml(path, parse_config)


_Parsed = TypeVar("_Parsed")


def load_toml(path: str | os.PathLike[str], parse: Callable[..., _Parsed]) -> _Parsed:
    """``parse(data, base_dir=the file's directory)`` of a TOML file, every mistake one
    `ConfigError` starting with the file name (the serve and gateway files alike)."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: is not valid TOML ({exc})") from None
    try:
        return parse(data, base_dir=file.parent)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def parse_config(data: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate a parsed TOML document (missing keys take their defaults).

    Args:
        data: the document, as `tomllib` returns it.
        base_dir: directory relative paths are resolved against (default: the working
            directory).

    Raises:
        ConfigError: a key is invalid or unknown.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    _check_keys(
        data, "", {"default_action", "server", "users", "sessions", "rules", "udp", "admin", "limits"}
    )
    default_allow = _action(data.get("default_action", "allow"), "default_action")
    server = _server(_table(data, "server"), base)
    users, hashes = _users(_table(data, "users"))
    sessions = _sessions(_table(data, "sessions"))
    rules_value = data.get("rules", [])
    if not isinstance(rules_value, list):
        raise ConfigError("rules: must be an array of tables, written [[rules]]")
    rules = tuple(_rule(item, f"rules[{i}]") for i, item in enumerate(rules_value))
    udp = _udp(_table(data, "udp"), server)
    admin = _admin(_table(data, "admin"), server)
    limits = _limits(_table(data, "limits"), users)
    return Config(
        server=server,
        users=types.MappingProxyType(users),
        user_hashes=types.MappingProxyType(hashes),
        sessions=sessions,
        rules=rules,
        default_allow=default_allow,
        udp=udp,
        admin=admin,
        limits=limits,
    )


# --- tables -----------------------------------------------------------------------------

_SERVER_KEYS = {
    "listen",
    "tls_listen",
    "tls_certificate",
    "tls_key",
    "tls_client_ca",
    "max_connections",
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_options_length",
    "dns_resolver",
    "min_bind_port",
    "relay_workers",
    "workers",
    "auth_failure_burst",
    "auth_failure_interval",
    "auth_user_failure_burst",
    "auth_user_failure_interval",
    "auth_checks_per_second",
    "log_level",
    "log_format",
}

_LOG_FORMATS = ("text", "json")


def _server(table: Mapping[str, Any], base: Path) -> ServerConfig:
    _check_keys(table, "server", _SERVER_KEYS)
    listen, listen_proxy = _listeners(_array(table, "listen", "server", ["127.0.0.1:1080"]), "server.listen")
    tls_listen, tls_proxy = _listeners(_array(table, "tls_listen", "server", []), "server.tls_listen")
    _check_listen_overlap(listen, tls_listen, "server.listen", "server.tls_listen")
    certificate = _path(table, "tls_certificate", base)
    key = _path(table, "tls_key", base)
    if (certificate is None) != (key is None):
        raise ConfigError("server.tls_certificate and server.tls_key must be set together")
    if tls_listen and certificate is None:
        raise ConfigError("server.tls_listen: needs server.tls_certificate and server.tls_key")
    client_ca = _path(table, "tls_client_ca", base)
    if client_ca is not None and certificate is None:
        raise ConfigError("server.tls_client_ca: needs server.tls_certificate and server.tls_key")
    if not listen and not tls_listen:
        raise ConfigError("server.listen: must not be empty when server.tls_listen is empty")
    resolver_value = table.get("dns_resolver")
    resolver = None
    if resolver_value is not None:
        if not isinstance(resolver_value, str):
            raise ConfigError(f"server.dns_resolver: {_show(resolver_value)} is not a string HOST:PORT")
        try:
            resolver = _parse_host_port(resolver_value, min_port=1)
        except ValueError as exc:
            raise ConfigError(f"server.dns_resolver: {_show(resolver_value)} {exc}") from None
    level = table.get("log_level", "info")
    if not isinstance(level, str) or level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"server.log_level: {_show(level)} is not one of {', '.join(_LOG_LEVELS)}")
    log_format = table.get("log_format", "text")
    if log_format not in _LOG_FORMATS:
        raise ConfigError(f'server.log_format: {_show(log_format)} is not "text" or "json"')
    return ServerConfig(
        listen=listen,
        tls_listen=tls_listen,
        tls_certificate=certificate,
        tls_key=key,
        max_connections=_int(table, "max_connections", "server", 10000, low=1),
        handshake_timeout=_seconds(table, "handshake_timeout", "server", 10.0),
        connect_timeout=_seconds(table, "connect_timeout", "server", 10.0),
        idle_timeout=_seconds(table, "idle_timeout", "server", 300.0),
        max_options_length=_int(
            table,
            "max_options_length",
            "server",
            MAX_OPTIONS_LENGTH,
            low=_MIN_OPTIONS_LENGTH,
            high=MAX_OPTIONS_LENGTH,
        ),
        dns_resolver=resolver,
        min_bind_port=_int(table, "min_bind_port", "server", 1024, low=1, high=65535),
        relay_workers=_int(table, "relay_workers", "server", 0, low=0, high=MAX_RELAY_WORKERS),
        auth_failure_burst=_int(table, "auth_failure_burst", "server", 10, low=0),
        auth_failure_interval=_seconds(table, "auth_failure_interval", "server", 5.0),
        auth_user_failure_burst=_int(table, "auth_user_failure_burst", "server", 10, low=0),
        auth_user_failure_interval=_seconds(table, "auth_user_failure_interval", "server", 10.0),
        auth_checks_per_second=_rate(table, "auth_checks_per_second", "server", 10.0),
        log_level=level.lower(),
        log_format=log_format,
        workers=_int(table, "workers", "server", 1, low=0, high=MAX_WORKER_PROCESSES),
        listen_proxy_protocol=listen_proxy if any(p is not None for p in listen_proxy) else (),
        tls_listen_proxy_protocol=tls_proxy if any(p is not None for p in tls_proxy) else (),
        tls_client_ca=client_ca,
    )


def _admin(table: Mapping[str, Any], server: ServerConfig) -> AdminConfig:
    """``[admin]``: off unless ``listen`` is set; a bare port listens on loopback (issue 14)."""
    _check_keys(table, "admin", {"listen"})
    value = table.get("listen")
    if value is None:
        return AdminConfig()
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 65535:
            raise ConfigError(f"admin.listen: {_show(value)} is not a port 0-65535")
        listen: HostPort = ("127.0.0.1", value)
    else:
        listen = _check_listen(value, "admin.listen")
    if listen[1] != 0 and listen in server.listen + server.tls_listen:
        raise ConfigError(
            f"admin.listen: {_show(_format_host_port(listen))} is already used by server.listen "
            "or server.tls_listen"
        )
    return AdminConfig(listen=listen)


_LISTENER_KEYS = {"address", "proxy_protocol", "proxy_protocol_from"}


def _listeners(
    values: list[Any], key: str
) -> tuple[tuple[HostPort, ...], tuple[tuple[IPNetwork, ...] | None, ...]]:
    """A ``listen`` / ``tls_listen`` array: each entry ``"HOST:PORT"`` or a listener table
    (with the PROXY protocol settings); the addresses and, per entry, the trusted networks."""
    addresses: list[HostPort] = []
    proxies: list[tuple[IPNetwork, ...] | None] = []
    for i, value in enumerate(values):
        where = f"{key}[{i}]"
        if not isinstance(value, dict):
            addresses.append(_check_listen(value, where))
            proxies.append(None)
            continue
        _check_keys(value, where, _LISTENER_KEYS)
        if "address" not in value:
            raise ConfigError(f'{where}.address: is required ("HOST:PORT")')
        addresses.append(_check_listen(value["address"], f"{where}.address"))
        enabled = value.get("proxy_protocol", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.proxy_protocol: {_show(enabled)} is not true or false")
        if "proxy_protocol_from" not in value:
            if enabled:
                # Trusting nobody would refuse every connection; trusting everybody would let
                # any client pick the address the rules see (proxy-protocol.txt section 5).
                raise ConfigError(
                    f"{where}.proxy_protocol: needs proxy_protocol_from, the addresses or CIDR "
                    "networks of the load balancers allowed to send PROXY headers"
                )
            proxies.append(None)
            continue
        if not enabled:
            raise ConfigError(
                f"{where}.proxy_protocol_from: needs proxy_protocol = true in the same listener"
            )
        sources = value["proxy_protocol_from"]
        if not isinstance(sources, list):
            raise ConfigError(
                f'{where}.proxy_protocol_from: must be an array, e.g. ["10.0.0.5"], not {_kind(sources)}'
            )
        if not sources:
            raise ConfigError(f"{where}.proxy_protocol_from: must name at least one load balancer")
        networks = []
        for j, source in enumerate(sources):
            if not isinstance(source, str):
                raise ConfigError(f"{where}.proxy_protocol_from[{j}]: {_show(source)} is not a string")
            networks.append(_parsed(parse_network, source, f"{where}.proxy_protocol_from[{j}]"))
        proxies.append(tuple(networks))
    return tuple(addresses), tuple(proxies)


def _users(table: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, ScryptHash]]:
    users: dict[str, str] = {}
    hashes: dict[str, ScryptHash] = {}
    for name, stored in table.items():
        key = f"users.{_key_text(name)}"
        _check_user_name(name, key)
        if not isinstance(stored, str):
            raise ConfigError(f'{key}: must be a string "scrypt$...", not {_kind(stored)}')
        try:
            hashes[name] = parse_hash(stored)  # the only parse: UserStore takes these as they are
        except ValueError as exc:
            # The message describes the problem without echoing the secret.
            raise ConfigError(f"{key}: the secret {exc}") from None
        users[name] = stored
    return users, hashes


def _sessions(table: Mapping[str, Any]) -> SessionsConfig:
    _check_keys(
        table,
        "sessions",
        {
            "enabled",
            "idle_timeout",
            "max_sessions",
            "max_per_client_ip",
            "max_per_user",
            "max_token_window",
            "store",
            "store_timeout",
        },
    )
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"sessions.enabled: {_show(enabled)} is not true or false")
    return SessionsConfig(
        enabled=enabled,
        idle_timeout=_seconds(table, "idle_timeout", "sessions", 600.0),
        max_sessions=_int(table, "max_sessions", "sessions", 100_000, low=1),
        max_per_client_ip=_int(table, "max_per_client_ip", "sessions", 100, low=1),
        max_per_user=_int(table, "max_per_user", "sessions", 1000, low=1),
        max_token_window=_int(table, "max_token_window", "sessions", 2**16, low=0, high=MAX_WINDOW_SIZE),
        store=_session_store(table.get("store", "memory")),
        store_timeout=_seconds(table, "store_timeout", "sessions", 1.0),
    )


_STORE_FORMS = '"memory", "redis://HOST:PORT/DB", "rediss://HOST:PORT/DB" or "unix:///PATH?db=N"'


def _masked_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (probe R-2: check-config messages), also
    when the URL does not parse: everything between the scheme's ``//`` and the last ``@``
    before the path is credentials; only a user name before a ``:`` stays. A ``password=``
    query argument (redis-py reads one) is masked too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = len(rest)
    for mark in "/?#":
        found = rest.find(mark, rest.rfind("@") + 1 if "@" in rest else 0)
        if found != -1:
            netloc_end = min(netloc_end, found)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query_start = tail.find("?")
    if query_start != -1:
        head, query = tail[: query_start + 1], tail[query_start + 1 :]
        query = "&".join(
            f"{part.partition('=')[0]}=***" if part.partition("=")[0].lower() == "password" else part
            for part in query.split("&")
        )
        tail = head + query
    return f"{scheme}://{netloc}{tail}"


def _session_store(value: object) -> str:
    """Check ``sessions.store``: "memory" or a Redis URL in one of redis-py's forms, and the
    ``redis`` package for the latter (issue 13 item 2)."""
    if not isinstance(value, str):
        raise ConfigError(f"sessions.store: {_show(value)} is not a string ({_STORE_FORMS})")
    if value == "memory":
        return value
    where = f"sessions.store: {_show(_masked_url(value))}"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ConfigError(f"{where} is not a valid URL ({exc})") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(f"{where} names no host ({_STORE_FORMS})")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigError(f"{where}: the database {db!r} is not a number")
    elif parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where} names no socket path ({_STORE_FORMS})")
        for key, val in parse_qsl(parts.query):
            if key == "db" and not val.isdigit():
                raise ConfigError(f"{where}: the database {val!r} is not a number")
    else:
        raise ConfigError(f"{where} is not one of {_STORE_FORMS}")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError(
            f"{where} needs the redis package, which is not installed: pip install 'socks6fast[redis]'"
        )
    # redis-py's own reading of the URL (its query arguments too), without connecting.
    from redis.asyncio.connection import parse_url  # noqa: PLC0415 (an optional extra)

    try:
        parse_url(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


_LIMIT_KEYS = ("connections", "connection_rate", "connection_burst", "upload", "download")


def _limits(table: Mapping[str, Any], users: Mapping[str, str]) -> LimitsConfig:
    _check_keys(
        table, "limits", {f"{who}_{key}" for who in ("user", "client") for key in _LIMIT_KEYS} | {"users"}
    )
    user = _limit_values(table, "limits", "user_", Limits())
    client = _limit_values(table, "limits", "client_", Limits())
    per_user: dict[str, Limits] = {}
    overrides = table.get("users", {})
    if not isinstance(overrides, dict):
        raise ConfigError("limits.users: must be a table of [limits.users.NAME] tables")
    for name, values in overrides.items():
        where = f"limits.users.{_key_text(name)}"
        if name not in users:
            raise ConfigError(f"{where}: {name!r} is not a user of [users]")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: must be a table, written [{where}]")
        _check_keys(values, where, set(_LIMIT_KEYS))
        per_user[name] = _limit_values(values, where, "", user)
    return LimitsConfig(user=user, client=client, users=types.MappingProxyType(per_user))


def _limit_values(table: Mapping[str, Any], where: str, prefix: str, base: Limits) -> Limits:
    return Limits(
        connections=_int(table, prefix + "connections", where, base.connections, low=0),
        connection_rate=_rate(table, prefix + "connection_rate", where, base.connection_rate),
        connection_burst=_int(table, prefix + "connection_burst", where, base.connection_burst, low=0),
        upload=_bandwidth(table, prefix + "upload", where, base.upload),
        download=_bandwidth(table, prefix + "download", where, base.download),
    )


_BANDWIDTH_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


#: The largest bandwidth limit (100 TB/s): the engines' token buckets keep their rates in
#: doubles and refuse 1e15 bytes/s and more, so a larger value must fail here, in one
#: sentence, rather than at the first connection (an operator trial found "1000000G"
#: passing check-config and then failing every connection).
MAX_BANDWIDTH = 10**14


def _bandwidth(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """Bytes per second: an integer >= 0, or a string with a unit ("2MB", "512KiB", "10M")."""
    value = table.get(key, default)
    rate = _bandwidth_value(value)
    if rate is None:
        raise ConfigError(
            f"{where}.{key}: {_show(value)} is not a rate in bytes per second "
            '(an integer, or e.g. "2MB", "512KiB")'
        )
    if rate > MAX_BANDWIDTH:
        raise ConfigError(
            f"{where}.{key}: {_show(value)} is above the largest limit, 100 TB/s (0 = no limit)"
        )
    return rate


def _bandwidth_value(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("/s").removesuffix("b").strip()
        number = text.rstrip("kmgi")
        unit = text[len(number) :]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if unit in _BANDWIDTH_UNITS and math.isfinite(amount) and amount >= 0:
            total = amount * _BANDWIDTH_UNITS[unit]
            return round(total) if math.isfinite(total) else MAX_BANDWIDTH + 1
    return None


def _udp(table: Mapping[str, Any], server: ServerConfig) -> UDPConfig:
    _check_keys(
        table,
        "udp",
        {
            "enabled",
            "port",
            "dtls",
            "dtls_port",
            "dtls_handshakes_per_source",
            "dtls_handshakes_total",
            "dtls_cookie_interval",
            "dtls_unmapped_timeout",
            "first_datagram_timeout",
            "max_associations_per_client",
            "max_associations_per_user",
            "workers",
            "batch",
            "max_datagram",
        },
    )
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"udp.enabled: {_show(enabled)} is not true or false")
    port = _optional_int(table, "port", "udp", None, low=1, high=65535)
    dtls = table.get("dtls", True)
    if not isinstance(dtls, bool):
        raise ConfigError(f"udp.dtls: {_show(dtls)} is not true or false")
    dtls_port = _optional_int(table, "dtls_port", "udp", None, low=1, high=65535)
    if dtls_port is not None and server.tls_certificate is None:
        raise ConfigError("udp.dtls_port: needs server.tls_certificate and server.tls_key")
    if port is not None and port == dtls_port:
        raise ConfigError(f"udp.dtls_port: {dtls_port} is already udp.port")
    # Caps on DTLS handshakes in progress (after a valid cookie) and the cookie secret's
    # lifetime (issue 11; RFC 6347 section 4.2.1).
    per_source = _int(table, "dtls_handshakes_per_source", "udp", 16, low=1, high=65535)
    total = _int(table, "dtls_handshakes_total", "udp", 1024, low=1, high=1_000_000)
    if per_source > total:
        raise ConfigError(
            f"udp.dtls_handshakes_per_source: {per_source} is more than udp.dtls_handshakes_total ({total})"
        )
    interval = _seconds(table, "dtls_cookie_interval", "udp", 60.0)
    if interval > 3600:
        # A cookie lives up to two intervals: longer lets a recorded cookie be replayed longer.
        raise ConfigError(f"udp.dtls_cookie_interval: {_show(interval)} is more than 3600 seconds")
    unmapped = _seconds(table, "dtls_unmapped_timeout", "udp", 5.0)
    if unmapped > 300:
        # Each such connection holds a descriptor for this long, unauthenticated (F4).
        raise ConfigError(f"udp.dtls_unmapped_timeout: {_show(unmapped)} is more than 300 seconds")
    return UDPConfig(
        port=port,
        dtls_port=dtls_port,
        enabled=enabled,
        first_datagram_timeout=_seconds(table, "first_datagram_timeout", "udp", 30.0),
        max_associations_per_client=_int(table, "max_associations_per_client", "udp", 256, low=0),
        max_associations_per_user=_int(table, "max_associations_per_user", "udp", 1024, low=0),
        workers=_int(table, "workers", "udp", 0, low=0, high=64),
        batch=_int(table, "batch", "udp", 16, low=1, high=256),
        max_datagram=_int(table, "max_datagram", "udp", 65535, low=512, high=65535),
        dtls_handshakes_per_source=per_source,
        dtls_handshakes_total=total,
        dtls_cookie_interval=interval,
        dtls_unmapped_timeout=unmapped,
        dtls=dtls,
    )


def _rule(item: object, where: str) -> Rule:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table, written [[rules]]")
    _check_keys(item, where, {"action", "clients", "users", "commands", "destinations", "ports"})
    if "action" not in item:
        raise ConfigError(f'{where}.action: is required ("allow" or "deny")')
    allow = _action(item["action"], f"{where}.action")

    clients: tuple[IPNetwork, ...] | None = None
    values = _conditions(item, "clients", where, str)
    if values is not None:
        clients = tuple(_parsed(parse_network, v, f"{where}.clients[{i}]") for i, v in enumerate(values))

    users: frozenset[str] | None = None
    values = _conditions(item, "users", where, str)
    if values is not None:
        for i, v in enumerate(values):
            if v.startswith("@") and v not in (AUTHENTICATED, ANONYMOUS):
                raise ConfigError(
                    f'{where}.users[{i}]: {_show(v)} is not a user name, "{AUTHENTICATED}" or "{ANONYMOUS}"'
                )
        users = frozenset(values)

    commands: frozenset[Command] | None = None
    values = _conditions(item, "commands", where, str)
    if values is not None:
        commands = frozenset(
            _parsed(parse_command, v, f"{where}.commands[{i}]") for i, v in enumerate(values)
        )

    destinations: tuple[Destination, ...] | None = None
    values = _conditions(item, "destinations", where, str)
    if values is not None:
        destinations = tuple(
            _parsed(parse_destination, v, f"{where}.destinations[{i}]") for i, v in enumerate(values)
        )

    ports: tuple[tuple[int, int], ...] | None = None
    port_values = _conditions(item, "ports", where, (int, str))
    if port_values is not None:
        ports = tuple(_parsed(parse_port_range, v, f"{where}.ports[{i}]") for i, v in enumerate(port_values))

    return Rule(
        allow=allow, clients=clients, users=users, commands=commands, destinations=destinations, ports=ports
    )


# --- value checkers ---------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as the user wrote it in TOML (strings quoted), for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return str(value)
    return _kind(value)


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a date or time"


def _key_text(name: str) -> str:
    # Bare TOML keys are written as is; anything else quoted, as in the file.
    if name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        return name
    return json.dumps(name, ensure_ascii=False)


def _check_keys(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            full = f"{where}.{_key_text(key)}" if where else _key_text(key)
            raise ConfigError(f"{full}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table, written [{name}]")
    return value


def _array(table: Mapping[str, Any], key: str, where: str, default: list[Any]) -> list[Any]:
    value = table.get(key, default)
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: must be an array, not {_kind(value)}")
    return value


def _action(value: object, key: str) -> bool:
    if value == "allow":
        return True
    if value == "deny":
        return False
    raise ConfigError(f'{key}: {_show(value)} is not "allow" or "deny"')


def _int(
    table: Mapping[str, Any], key: str, where: str, default: int, *, low: int, high: int | None = None
) -> int:
    value = _optional_int(table, key, where, default, low=low, high=high)
    assert value is not None  # the default is an int
    return value


def _optional_int(
    table: Mapping[str, Any], key: str, where: str, default: int | None, *, low: int, high: int | None = None
) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    ):
        return value
    bound = f"{low}-{high}" if high is not None else f">= {low}"
    raise ConfigError(f"{where}.{key}: {_show(value)} is not an integer {bound}")


def _seconds(table: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = table.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{where}.{key}: {_show(value)} is not a number of seconds > 0")
    return float(value)


def _rate(table: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = table.get(key, default)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{where}.{key}: {_show(value)} is not a number >= 0 (per second; 0 = no limit)")
    return float(value)


def _path(table: Mapping[str, Any], key: str, base: Path) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"server.{key}: {_show(value)} is not a file path")
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"server.{key}: {_show(value)} does not exist or is not a file")
    return str(path)


def _parse_host_port(text: str, *, min_port: int) -> HostPort:
    message = f"is not HOST:PORT with a port {min_port}-65535"
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(message)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{message} (inside [] must be an IPv6 address)") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(message)
        if ":" in host:
            raise ValueError(f'{message} (write an IPv6 address as "[::1]:1080")')
        if not _valid_host(host):
            raise ValueError(f"{message} (the host is not an IPv4 address or host name)")
    if not port_text.isascii() or not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise ValueError(message)
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if host[0].isdigit() and all(c.isdigit() or c == "." for c in host):
        return False  # looks like a broken IPv4 address, e.g. 127.0.0.256
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def _check_listen(value: object, key: str) -> HostPort:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {_show(value)} is not a string HOST:PORT")
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {_show(value)} {exc}") from None


def _check_listen_overlap(
    listen: tuple[HostPort, ...], tls_listen: tuple[HostPort, ...], listen_key: str, tls_key: str
) -> None:
    seen: set[HostPort] = set()
    for i, address in enumerate(listen):
        if address in seen and address[1] != 0:
            raise ConfigError(f"{listen_key}[{i}]: {_show(_format_host_port(address))} is listed twice")
        seen.add(address)
    for i, address in enumerate(tls_listen):
        if address in seen and address[1] != 0:
            raise ConfigError(
                f"{tls_key}[{i}]: {_show(_format_host_port(address))} is already used by "
                f"{listen_key} or {tls_key}"
            )
        seen.add(address)


def _is_loopback_host(host: str) -> bool:
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a name: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _open_to_strangers(rules: Sequence[Rule], default_allow: bool) -> bool:
    """True when an anonymous client from an address no rule's ``clients`` names could get
    some request allowed: the first rule that applies to it and allows, or a catch-all deny
    before any such rule, decides; with neither, the default does."""
    for rule in rules:
        if rule.clients is not None:
            continue  # the stranger is not in it
        if rule.users is not None and ANONYMOUS not in rule.users:
            continue  # only authenticated users; there are none
        if rule.allow:
            return True
        if rule.commands is None and rule.destinations is None and rule.ports is None:
            return False  # denies the stranger everything
    return default_allow


def _format_host_port(address: HostPort) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_user_name(name: str, key: str) -> None:
    if not 1 <= len(name.encode("utf-8")) <= MAX_USERPASS_LENGTH:
        raise ConfigError(
            f"{key}: the user name {_show(name)} must be 1-{MAX_USERPASS_LENGTH} bytes of UTF-8"
        )
    if name.startswith("@") or name == _ANY:
        raise ConfigError(f'{key}: the user name {_show(name)} is reserved ("*" and names starting with "@")')


def _conditions(
    item: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]
) -> list[Any] | None:
    """A rule condition array; None when absent or ``["*"]`` (match anything)."""
    if key not in item:
        return None
    value = item[key]
    if not isinstance(value, list):
        raise ConfigError(f'{where}.{key}: must be an array, e.g. ["..."], not {_kind(value)}')
    if not value:
        raise ConfigError(f"{where}.{key}: must not be empty (omit the key to match anything)")
    for i, entry in enumerate(value):
        if not isinstance(entry, kind) or isinstance(entry, bool):
            expected = "an integer or a string" if kind is not str else "a string"
            raise ConfigError(f"{where}.{key}[{i}]: {_show(entry)} is not {expected}")
        if entry == _ANY:
            if len(value) != 1:
                raise ConfigError(f'{where}.{key}[{i}]: "*" must be the only entry')
            return None
    return value


def _parsed(parser: Callable[[_V], _T], value: _V, key: str) -> _T:
    try:
        return parser(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {_show(value)} {exc}") from None
