"""Tests for socks6fast.config: defaults, a full file, and one error per mistake naming the key."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest

from socks6fast.config import (
    DEFAULT_TOML,
    Config,
    ConfigError,
    UDPConfig,
    default_config,
    load_config,
    parse_config,
    parse_listen,
    parse_user_option,
)
from socks6fast.constants import AddressType, Command
from socks6fast.errors import Socks6Error
from socks6fast.proto import auth
from socks6fast.proto.auth import hash_password
from socks6fast.proto.policy import LOCAL_HOST, DomainPattern, LocalAddresses
from socks6fast.proto.sessions import MemorySessionStore, SessionLimits

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "socks6fast.toml"
HASH = hash_password("pw", n=2**8)


def test_config_error_is_a_socks6_error() -> None:
    assert issubclass(ConfigError, Socks6Error)


# --- defaults: secure by default --------------------------------------------------------


def test_defaults_listen_on_loopback_only() -> None:
    config = default_config()
    assert config.server.listen == (("127.0.0.1", 1080),)
    assert config.server.tls_listen == ()
    for host, _ in config.server.listen:
        assert ipaddress.ip_address(host).is_loopback


def test_defaults_no_auth_everything_allowed() -> None:
    config = default_config()
    assert not config.auth_required
    assert not config.user_store().required
    assert config.rules == () and config.default_allow
    assert config.policy().check(
        "127.0.0.1", None, Command.CONNECT, AddressType.DOMAIN_NAME, "example.com", 443
    )


def test_defaults_values() -> None:
    server = default_config().server
    assert server.max_options_length == 16384  # D6
    assert server.dns_resolver is None  # D13: DNS service off
    assert server.tls_certificate is None and server.tls_key is None
    assert server.log_level == "info" and server.relay_workers == 0
    assert (server.auth_failure_burst, server.auth_failure_interval) == (10, 5.0)
    assert (server.auth_user_failure_burst, server.auth_user_failure_interval) == (10, 10.0)
    assert server.auth_checks_per_second == 10.0
    config = default_config()
    assert config.sessions.enabled and config.sessions.max_token_window == 65536
    assert config.udp.port is None and config.udp.dtls_port is None
    assert (config.udp.dtls_handshakes_per_source, config.udp.dtls_handshakes_total) == (16, 1024)
    assert config.udp.dtls_cookie_interval == 60.0
    assert config.udp.dtls_unmapped_timeout == 5.0


def test_empty_document_equals_embedded_default() -> None:
    assert parse_config({}) == default_config()
    assert parse_config(tomllib.loads(DEFAULT_TOML)) == default_config()


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(AttributeError):
        config.default_allow = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users["x"] = "y"  # type: ignore[index]


def test_session_store_from_config() -> None:
    store = default_config().session_store()
    assert isinstance(store, MemorySessionStore)
    assert store.limits.idle_timeout == 600.0 and store.limits.max_per_client_ip == 100
    assert parse_config({"sessions": {"enabled": False}}).session_store() is None


# --- files ------------------------------------------------------------------------------


@pytest.mark.conformance("CMD-06")
def test_example_file_loads() -> None:
    """CMD-06: the example denies this host ("@local") and the private ranges for CONNECT,
    BIND (checked against the peer that connects) and UDP ASSOCIATE, and anonymous BIND."""
    config = load_config(EXAMPLE)
    assert config.server.listen == (("127.0.0.1", 1080), ("::1", 1080))
    assert len(config.rules) == 2
    assert config.rules[0].destinations is not None and LOCAL_HOST in config.rules[0].destinations
    host = LocalAddresses(addresses=frozenset({ipaddress.ip_address("192.0.2.2")}))
    policy = config.policy(host)
    v4, v6, dn = AddressType.IPV4, AddressType.IPV6, AddressType.DOMAIN_NAME
    denied = (
        (v4, "127.0.0.1"),
        (v4, "0.0.0.0"),
        (v6, "::"),
        (v6, "::ffff:0.0.0.0"),
        (v4, "192.0.2.2"),  # the host's own non-loopback address
        (v4, "10.1.2.3"),
        (v4, "172.31.0.1"),
        (v4, "192.168.1.1"),
        (v4, "100.64.0.1"),  # CGNAT
        (v4, "169.254.169.254"),  # cloud metadata
        (v6, "fe80::1"),
        (v6, "fd12:3456::1"),  # RFC 4193
    )
    for address_type, address in denied:
        assert policy.decide("127.0.0.1", "alice", Command.CONNECT, address_type, address, 80) == (False, 0)
    assert policy.check("127.0.0.1", None, Command.CONNECT, v4, "198.51.100.1", 80)
    assert not policy.check(
        "127.0.0.1", None, Command.CONNECT, dn, "LocalHost", 22, resolved_address="127.0.0.1"
    )
    assert policy.check("127.0.0.1", None, Command.CONNECT, v4, "0.0.0.0", 53, dns_service=True)  # D13
    assert not policy.check("127.0.0.1", None, Command.BIND, v4, "0.0.0.0", 0)  # anonymous
    assert policy.check("127.0.0.1", "alice", Command.BIND, v4, "0.0.0.0", 0)
    assert not policy.check(
        "127.0.0.1", "alice", Command.BIND, v4, "0.0.0.0", 0, resolved_address="127.0.0.1"
    )
    assert not policy.check("127.0.0.1", "alice", Command.BIND, v4, "0.0.0.0", 0, resolved_address="10.0.0.9")
    assert policy.check("127.0.0.1", "alice", Command.BIND, v4, "0.0.0.0", 0, resolved_address="198.51.100.1")
    assert policy.checks_resolved_addresses
    assert config.open_proxy_warning() is None  # loopback listeners
    assert config.open_proxy_warning(["0.0.0.0"]) is not None  # no users: open within the rules


@pytest.mark.parametrize(
    ("toml", "hosts", "warned"),
    [
        ("", ["127.0.0.1", "::1", "127.0.0.5", "localhost"], False),
        ("", ["0.0.0.0"], True),
        ("", ["::"], True),
        ("", ["192.0.2.2", "127.0.0.1"], True),
        ("", ["proxy.example"], True),  # a name is not looked up: it may be any address
        (f'[users]\nalice = "{HASH}"', ["0.0.0.0"], False),
        ('default_action = "deny"', ["0.0.0.0"], False),
        (
            '[[rules]]\naction = "allow"\nclients = ["10.0.0.0/8"]\n[[rules]]\naction = "deny"',
            ["0.0.0.0"],
            False,
        ),
        (
            'default_action = "deny"\n[[rules]]\naction = "allow"\nclients = ["10.0.0.0/8"]',
            ["0.0.0.0"],
            False,
        ),
        ('[[rules]]\naction = "deny"\nclients = ["10.0.0.0/8"]', ["0.0.0.0"], True),
        ('default_action = "deny"\n[[rules]]\naction = "allow"\nports = [443]', ["0.0.0.0"], True),
        ('default_action = "deny"\n[[rules]]\naction = "allow"\nusers = ["@authenticated"]', ["::"], False),
        ('[[rules]]\naction = "deny"\ncommands = ["connect"]', ["0.0.0.0"], True),  # BIND still open
        ('[[rules]]\naction = "deny"', ["0.0.0.0"], False),
    ],
)
def test_open_proxy_warning(toml: str, hosts: list[str], warned: bool) -> None:
    """Issue 12, defect 6: a listener off loopback, no users and rules that let a client
    from any address through make an open proxy, which serve and check-config warn about."""
    warning = parse_config(tomllib.loads(toml)).open_proxy_warning(hosts)
    assert (warning is not None) == warned
    if warning is not None:
        assert warning.startswith("open proxy: listening on ") and "anyone who can reach it" in warning
        assert "127.0.0.1," not in warning  # names only the exposed listeners


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "proxy.pem").write_text("cert")
    (tmp_path / "proxy.key").write_text("key")
    path = tmp_path / "full.toml"
    path.write_text(
        f"""
default_action = "deny"

[server]
listen = ["0.0.0.0:1080", "[::]:1080", "proxy.example:1081"]
tls_listen = ["127.0.0.1:1443"]
tls_certificate = "certs/proxy.pem"
tls_key = "{tmp_path / "proxy.key"}"
max_connections = 50
handshake_timeout = 2
connect_timeout = 3.5
idle_timeout = 60
max_options_length = 4096
dns_resolver = "[::1]:5353"
relay_workers = 4
log_level = "DEBUG"

[users]
alice = "{HASH}"
"bob smith" = "{HASH}"

[sessions]
enabled = true
idle_timeout = 30
max_sessions = 10
max_per_client_ip = 2
max_per_user = 3
max_token_window = 0

[[rules]]
action = "allow"
clients = ["10.0.0.0/8", "::1"]
users = ["alice", "@authenticated"]
commands = ["connect", "UDP_ASSOCIATE"]
destinations = [".example.com", "192.0.2.0/24"]
ports = [443, "8000-8999"]

[[rules]]
action = "deny"
users = ["*"]

[udp]
port = 1080
dtls_port = 1081
dtls_handshakes_per_source = 4
dtls_handshakes_total = 100
dtls_cookie_interval = 30
dtls_unmapped_timeout = 2.5
"""
    )
    config = load_config(path)
    server = config.server
    assert server.listen == (("0.0.0.0", 1080), ("::", 1080), ("proxy.example", 1081))
    assert server.tls_listen == (("127.0.0.1", 1443),)
    assert server.tls_certificate == str((tmp_path / "certs" / "proxy.pem").resolve())
    assert server.tls_key == str((tmp_path / "proxy.key").resolve())
    assert (server.max_connections, server.handshake_timeout, server.connect_timeout) == (50, 2.0, 3.5)
    assert isinstance(server.handshake_timeout, float)
    assert (server.idle_timeout, server.max_options_length, server.relay_workers) == (60.0, 4096, 4)
    assert server.dns_resolver == ("::1", 5353)
    assert server.log_level == "debug"
    assert dict(config.users) == {"alice": HASH, "bob smith": HASH}
    assert config.auth_required
    assert config.user_store().authenticate(b"bob smith", b"pw") == "bob smith"
    sessions = config.sessions
    assert (sessions.idle_timeout, sessions.max_sessions, sessions.max_per_client_ip) == (30.0, 10, 2)
    assert (sessions.max_per_user, sessions.max_token_window) == (3, 0)
    assert not config.default_allow
    first, second = config.rules
    assert first.allow and not second.allow
    assert first.clients == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert first.users == frozenset({"alice", "@authenticated"})
    assert first.commands == frozenset({Command.CONNECT, Command.UDP_ASSOCIATE})
    assert first.destinations == (DomainPattern("example.com", True), ipaddress.ip_network("192.0.2.0/24"))
    assert first.ports == ((443, 443), (8000, 8999))
    assert second.users is None and second.clients is None
    assert config.udp.port == 1080 and config.udp.dtls_port == 1081
    udp = config.udp
    assert (udp.dtls_handshakes_per_source, udp.dtls_handshakes_total, udp.dtls_cookie_interval) == (
        4,
        100,
        30.0,
    )
    assert udp.dtls_unmapped_timeout == 2.5
    policy = config.policy()
    assert policy.check("10.1.1.1", "bob", Command.CONNECT, AddressType.DOMAIN_NAME, "www.example.com", 8080)
    assert not policy.check(
        "10.1.1.1", None, Command.CONNECT, AddressType.DOMAIN_NAME, "www.example.com", 8080
    )


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot be read"):
        load_config(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: is not valid TOML"):
        load_config(broken)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary\.toml: is not UTF-8"):
        load_config(binary)
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:99999"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert (
        str(info.value) == f'{bad}: server.listen[0]: "127.0.0.1:99999" is not HOST:PORT with a port 0-65535'
    )


# --- every mistake names its key --------------------------------------------------------

CASES: list[tuple[str, str]] = [
    # (TOML text, exact error message)
    (
        "typo = 1",
        "typo: unknown key (allowed: admin, default_action, limits, rules, server, sessions, udp, users)",
    ),
    ('default_action = "maybe"', 'default_action: "maybe" is not "allow" or "deny"'),
    ("server = 5", "server: must be a table, written [server]"),
    (
        "[server]\nlisen = []",
        "server.lisen: unknown key (allowed: auth_checks_per_second, auth_failure_burst, "
        "auth_failure_interval, auth_user_failure_burst, auth_user_failure_interval, "
        "connect_timeout, dns_resolver, "
        "handshake_timeout, idle_timeout, listen, log_format, log_level, max_connections, "
        "max_options_length, min_bind_port, relay_workers, tls_certificate, tls_client_ca, tls_key, "
        "tls_listen, workers)",
    ),
    ('[server]\nlisten = "127.0.0.1:1080"', "server.listen: must be an array, not a string"),
    (
        '[server]\nlisten = ["127.0.0.1:1080", "localhost:99999"]',
        'server.listen[1]: "localhost:99999" is not HOST:PORT with a port 0-65535',
    ),
    ("[server]\nlisten = [1080]", "server.listen[0]: 1080 is not a string HOST:PORT"),
    ('[server]\nlisten = ["1080"]', 'server.listen[0]: "1080" is not HOST:PORT with a port 0-65535'),
    (
        '[server]\nlisten = ["::1:1080"]',
        'server.listen[0]: "::1:1080" is not HOST:PORT with a port 0-65535 '
        '(write an IPv6 address as "[::1]:1080")',
    ),
    (
        '[server]\nlisten = ["[nope]:1080"]',
        'server.listen[0]: "[nope]:1080" is not HOST:PORT with a port 0-65535 '
        "(inside [] must be an IPv6 address)",
    ),
    (
        '[server]\nlisten = ["127.0.0.256:1080"]',
        'server.listen[0]: "127.0.0.256:1080" is not HOST:PORT with a port 0-65535 '
        "(the host is not an IPv4 address or host name)",
    ),
    (
        '[server]\nlisten = ["127.0.0.1:-1"]',
        'server.listen[0]: "127.0.0.1:-1" is not HOST:PORT with a port 0-65535',
    ),
    (
        '[server]\nlisten = ["127.0.0.1:1080", "127.0.0.1:1080"]',
        'server.listen[1]: "127.0.0.1:1080" is listed twice',
    ),
    ("[server]\nlisten = []", "server.listen: must not be empty when server.tls_listen is empty"),
    (
        '[server]\ntls_listen = ["127.0.0.1:1443"]',
        "server.tls_listen: needs server.tls_certificate and server.tls_key",
    ),
    ('[server]\ntls_listen = ["x:"]', 'server.tls_listen[0]: "x:" is not HOST:PORT with a port 0-65535'),
    (
        '[server]\ntls_certificate = "/nonexistent/cert.pem"',
        'server.tls_certificate: "/nonexistent/cert.pem" does not exist or is not a file',
    ),
    ("[server]\ntls_key = 5", "server.tls_key: 5 is not a file path"),
    ("[server]\nmax_connections = 0", "server.max_connections: 0 is not an integer >= 1"),
    ('[server]\nmax_connections = "10"', 'server.max_connections: "10" is not an integer >= 1'),
    ("[server]\nmax_connections = true", "server.max_connections: true is not an integer >= 1"),
    ("[server]\nmax_connections = 1.5", "server.max_connections: 1.5 is not an integer >= 1"),
    ("[server]\nhandshake_timeout = 0", "server.handshake_timeout: 0 is not a number of seconds > 0"),
    ("[server]\nconnect_timeout = -1.0", "server.connect_timeout: -1.0 is not a number of seconds > 0"),
    ("[server]\nidle_timeout = inf", "server.idle_timeout: inf is not a number of seconds > 0"),
    ("[server]\nidle_timeout = nan", "server.idle_timeout: nan is not a number of seconds > 0"),
    ("[server]\nidle_timeout = [1]", "server.idle_timeout: an array is not a number of seconds > 0"),
    ("[server]\nmax_options_length = 16388", "server.max_options_length: 16388 is not an integer 1024-16384"),
    ("[server]\nmax_options_length = 100", "server.max_options_length: 100 is not an integer 1024-16384"),
    (
        '[server]\ndns_resolver = "8.8.8.8"',
        'server.dns_resolver: "8.8.8.8" is not HOST:PORT with a port 1-65535',
    ),
    (
        '[server]\ndns_resolver = "127.0.0.1:0"',
        'server.dns_resolver: "127.0.0.1:0" is not HOST:PORT with a port 1-65535',
    ),
    ("[server]\ndns_resolver = 53", "server.dns_resolver: 53 is not a string HOST:PORT"),
    ("[server]\nrelay_workers = -1", "server.relay_workers: -1 is not an integer 0-256"),
    ("[server]\nrelay_workers = 257", "server.relay_workers: 257 is not an integer 0-256"),
    ("[server]\nauth_failure_burst = -1", "server.auth_failure_burst: -1 is not an integer >= 0"),
    ("[server]\nauth_failure_interval = 0", "server.auth_failure_interval: 0 is not a number of seconds > 0"),
    ("[server]\nauth_user_failure_burst = 1.5", "server.auth_user_failure_burst: 1.5 is not an integer >= 0"),
    (
        "[server]\nauth_user_failure_interval = -1",
        "server.auth_user_failure_interval: -1 is not a number of seconds > 0",
    ),
    (
        "[server]\nauth_checks_per_second = -2",
        "server.auth_checks_per_second: -2 is not a number >= 0 (per second; 0 = no limit)",
    ),
    (
        '[server]\nauth_checks_per_second = "fast"',
        'server.auth_checks_per_second: "fast" is not a number >= 0 (per second; 0 = no limit)',
    ),
    (
        '[server]\nlog_level = "verbose"',
        'server.log_level: "verbose" is not one of debug, info, warning, error, critical',
    ),
    ("[users]\nalice = 5", 'users.alice: must be a string "scrypt$...", not a number'),
    (
        '[users]\nalice = "hunter2"',
        'users.alice: the secret is not of the form "scrypt$n=N,r=R,p=P$<salt>$<hash>"',
    ),
    (
        '[users]\nalice = "scrypt$n=100,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"',
        "users.alice: the secret has scrypt n=100, which is not a power of 2 between 2 and 1048576",
    ),
    (
        '[users]\n"@admin" = "x"',
        'users."@admin": the user name "@admin" is reserved ("*" and names starting with "@")',
    ),
    ('[users]\n"*" = "x"', 'users."*": the user name "*" is reserved ("*" and names starting with "@")'),
    ('[users]\n"" = "x"', 'users."": the user name "" must be 1-255 bytes of UTF-8'),
    ("[sessions]\nenabled = 1", "sessions.enabled: 1 is not true or false"),
    ("[sessions]\nidle_timeout = 0", "sessions.idle_timeout: 0 is not a number of seconds > 0"),
    ("[sessions]\nmax_sessions = 0", "sessions.max_sessions: 0 is not an integer >= 1"),
    ("[sessions]\nmax_per_client_ip = 0", "sessions.max_per_client_ip: 0 is not an integer >= 1"),
    ("[sessions]\nmax_per_user = -5", "sessions.max_per_user: -5 is not an integer >= 1"),
    (
        "[sessions]\nmax_token_window = 2147483648",
        "sessions.max_token_window: 2147483648 is not an integer 0-2147483647",
    ),
    (
        "[sessions]\ntoken_window = 1",
        "sessions.token_window: unknown key (allowed: enabled, idle_timeout, "
        "max_per_client_ip, max_per_user, max_sessions, max_token_window, store, store_timeout)",
    ),
    ("rules = 5", "rules: must be an array of tables, written [[rules]]"),
    ("rules = [5]", "rules[0]: must be a table, written [[rules]]"),
    ("[[rules]]\nclients = []", 'rules[0].action: is required ("allow" or "deny")'),
    ('[[rules]]\naction = "permit"', 'rules[0].action: "permit" is not "allow" or "deny"'),
    (
        '[[rules]]\naction = "deny"\nclient = []',
        "rules[0].client: unknown key (allowed: action, clients, commands, destinations, ports, users)",
    ),
    (
        '[[rules]]\naction = "deny"\n[[rules]]\naction = "deny"\nclients = "10.0.0.0/8"',
        'rules[1].clients: must be an array, e.g. ["..."], not a string',
    ),
    (
        '[[rules]]\naction = "deny"\nclients = []',
        "rules[0].clients: must not be empty (omit the key to match anything)",
    ),
    (
        '[[rules]]\naction = "deny"\nclients = ["10.0.0.1/8"]',
        'rules[0].clients[0]: "10.0.0.1/8" has host bits set (write the network address, e.g. 10.0.0.0/8)',
    ),
    (
        '[[rules]]\naction = "deny"\nclients = ["example.com"]',
        'rules[0].clients[0]: "example.com" is not an IP address or CIDR network',
    ),
    ('[[rules]]\naction = "deny"\nclients = [10]', "rules[0].clients[0]: 10 is not a string"),
    (
        '[[rules]]\naction = "deny"\nusers = ["@admins"]',
        'rules[0].users[0]: "@admins" is not a user name, "@authenticated" or "@anonymous"',
    ),
    ('[[rules]]\naction = "deny"\nusers = ["alice", "*"]', 'rules[0].users[1]: "*" must be the only entry'),
    (
        '[[rules]]\naction = "deny"\ncommands = ["associate"]',
        'rules[0].commands[0]: "associate" is not a command (noop, connect, bind, udp_associate)',
    ),
    (
        '[[rules]]\naction = "deny"\ndestinations = ["*.example.com"]',
        'rules[0].destinations[0]: "*.example.com" is not a destination; write ".example.com" for a domain '
        "and its subdomains",
    ),
    (
        '[[rules]]\naction = "deny"\ndestinations = ["bad name"]',
        'rules[0].destinations[0]: "bad name" is not a CIDR network, ".domain" suffix or domain name',
    ),
    (
        '[[rules]]\naction = "deny"\ndestinations = ["@locals"]',
        'rules[0].destinations[0]: "@locals" is not a destination (the only "@" destination is "@local")',
    ),
    (
        '[[rules]]\naction = "deny"\nports = [70000]',
        'rules[0].ports[0]: 70000 is not a port 0-65535 or a range like "8000-8999" with low <= high',
    ),
    (
        '[[rules]]\naction = "deny"\nports = ["http"]',
        'rules[0].ports[0]: "http" is not a port 0-65535 or a range like "8000-8999"',
    ),
    ('[[rules]]\naction = "deny"\nports = [1.5]', "rules[0].ports[0]: 1.5 is not an integer or a string"),
    ("[udp]\nport = 0", "udp.port: 0 is not an integer 1-65535"),
    ("[udp]\ndtls_port = 70000", "udp.dtls_port: 70000 is not an integer 1-65535"),
    ("[udp]\ndtls_port = 1081", "udp.dtls_port: needs server.tls_certificate and server.tls_key"),
    ('[udp]\nenabled = "yes"', 'udp.enabled: "yes" is not true or false'),
    ("[udp]\nfirst_datagram_timeout = 0", "udp.first_datagram_timeout: 0 is not a number of seconds > 0"),
    ("[udp]\nmax_associations_per_client = -1", "udp.max_associations_per_client: -1 is not an integer >= 0"),
    ("[udp]\nmax_associations_per_user = 1.5", "udp.max_associations_per_user: 1.5 is not an integer >= 0"),
    ("[udp]\nworkers = 65", "udp.workers: 65 is not an integer 0-64"),
    ("[udp]\nbatch = 0", "udp.batch: 0 is not an integer 1-256"),
    ("[udp]\nmax_datagram = 100", "udp.max_datagram: 100 is not an integer 512-65535"),
    (
        "[udp]\nports = 1",
        "udp.ports: unknown key (allowed: batch, dtls, dtls_cookie_interval, dtls_handshakes_per_source, "
        "dtls_handshakes_total, dtls_port, dtls_unmapped_timeout, enabled, first_datagram_timeout, "
        "max_associations_per_client, max_associations_per_user, max_datagram, port, workers)",
    ),
    ("[udp]\ndtls_handshakes_per_source = 0", "udp.dtls_handshakes_per_source: 0 is not an integer 1-65535"),
    ("[udp]\ndtls_handshakes_total = true", "udp.dtls_handshakes_total: true is not an integer 1-1000000"),
    (
        "[udp]\ndtls_handshakes_per_source = 20\ndtls_handshakes_total = 10",
        "udp.dtls_handshakes_per_source: 20 is more than udp.dtls_handshakes_total (10)",
    ),
    ("[udp]\ndtls_cookie_interval = 0", "udp.dtls_cookie_interval: 0 is not a number of seconds > 0"),
    ("[udp]\ndtls_cookie_interval = 7200", "udp.dtls_cookie_interval: 7200.0 is more than 3600 seconds"),
    ("[server]\nworkers = -1", "server.workers: -1 is not an integer 0-256"),
    ("[server]\nworkers = 257", "server.workers: 257 is not an integer 0-256"),
    # Probe 19 F4: how long a finished DTLS connection may stay without an association.
    ("[udp]\ndtls_unmapped_timeout = 0", "udp.dtls_unmapped_timeout: 0 is not a number of seconds > 0"),
    ("[udp]\ndtls_unmapped_timeout = 301", "udp.dtls_unmapped_timeout: 301.0 is more than 300 seconds"),
]


@pytest.mark.parametrize(("text", "message"), CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_error_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    assert str(info.value) == message


def test_certificate_and_key_must_come_together(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match="^server.tls_certificate and server.tls_key must be set together$"):
        parse_config({"server": {"tls_certificate": "cert.pem"}}, base_dir=tmp_path)


def test_tls_listen_overlap(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("x")
    data: dict[str, Any] = {
        "server": {
            "listen": ["127.0.0.1:1080"],
            "tls_listen": ["127.0.0.1:1080"],
            "tls_certificate": "c",
            "tls_key": "c",
        }
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path)
    assert (
        str(info.value)
        == 'server.tls_listen[0]: "127.0.0.1:1080" is already used by server.listen or server.tls_listen'
    )


def test_same_udp_ports(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("x")
    data: dict[str, Any] = {
        "server": {"tls_certificate": "c", "tls_key": "c"},
        "udp": {"port": 5000, "dtls_port": 5000},
    }
    with pytest.raises(ConfigError, match="^udp.dtls_port: 5000 is already udp.port$"):
        parse_config(data, base_dir=tmp_path)


def test_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"users": {"alice": "scrypt$n=256,r=8,p=1$!!secret!!$AAAAAAAAAAAAAAAAAAAAAA"}})
    assert "secret!!" not in str(info.value)


# --- helpers and CLI overrides ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1080", ("127.0.0.1", 1080)),
        ("[::1]:1080", ("::1", 1080)),
        ("[::]:0", ("::", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("proxy-1.example.:8080", ("proxy-1.example.", 8080)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", ":1080", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "[::1]1080", "a b:1", "-x:1", "host:１２"],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen(text)


def test_parse_user_option() -> None:
    assert parse_user_option("alice:pa:ss") == ("alice", "pa:ss")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(ConfigError, match="^--user: "):
            parse_user_option(bad)


def test_override_listen_replaces_list() -> None:
    config = default_config().with_overrides(listen=["[::1]:1081", "127.0.0.1:0"])
    assert config.server.listen == (("::1", 1081), ("127.0.0.1", 0))
    assert default_config().with_overrides(listen=[]).server.listen == (("127.0.0.1", 1080),)


def test_override_listen_error_names_flag() -> None:
    with pytest.raises(ConfigError) as info:
        default_config().with_overrides(listen=["127.0.0.1:1080", "nope"])
    assert str(info.value) == '--listen: "nope" is not HOST:PORT with a port 0-65535'


def test_override_users_turns_auth_on_and_hashes() -> None:
    base = parse_config({"users": {"bob": HASH}})
    config = base.with_overrides(users={"alice": "wonderland", "bob": "new"})
    assert config.auth_required
    assert config.users["alice"].startswith("scrypt$n=16384,r=8,p=1$")
    assert "wonderland" not in "".join(config.users.values())
    store = config.user_store()
    assert store.authenticate(b"alice", b"wonderland") == "alice"
    assert store.authenticate(b"bob", b"new") == "bob"
    assert base.users["bob"] == HASH  # the original is untouched


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ({"@x": "pw"}, '--user: the user name "@x" is reserved ("*" and names starting with "@")'),
        ({"x" * 256: "pw"}, "must be 1-255 bytes of UTF-8"),
        ({"alice": ""}, "--user: the password of 'alice' must be 1-255 bytes"),
        ({"alice": "p" * 256}, "--user: the password of 'alice' must be 1-255 bytes"),
    ],
)
def test_override_users_errors(users: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        default_config().with_overrides(users=users)
    assert message in str(info.value)


def test_config_type_is_exported() -> None:
    assert isinstance(default_config(), Config)


def test_user_hashes_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret is parsed when the file is read and never again: building the UserStore (at
    start and at every reload) takes the parsed hashes, so a parse there is a bug."""
    config = parse_config({"users": {"alice": HASH}}).with_overrides(users={"bob": "pw"})
    assert set(config.user_hashes) == {"alice", "bob"}

    def no_parse(stored: str) -> None:
        raise AssertionError("parsed again")

    monkeypatch.setattr(auth, "parse_hash", no_parse)
    store = config.user_store()
    assert len(store) == 2 and "alice" in store and "bob" in store


def test_session_limits_from_config() -> None:
    """The [sessions] table's five limits reach the store through one mapping, also used on reload."""
    config = parse_config({"sessions": {"idle_timeout": 30, "max_per_user": 7, "max_token_window": 9}})
    store = config.session_store()
    assert store is not None
    assert store.limits == SessionLimits(
        idle_timeout=30.0, max_sessions=100_000, max_per_client_ip=100, max_per_user=7, max_token_window=9
    )


def test_udp_table() -> None:
    """[udp]: on by default (the SOCKS 6 UDP port on each listener's port, D16); every key
    read as written."""
    default = default_config().udp
    assert (default.enabled, default.port, default.dtls_port) == (True, None, None)
    assert (default.first_datagram_timeout, default.max_associations_per_client) == (30.0, 256)
    text = (
        "[udp]\nenabled = false\nport = 2000\nfirst_datagram_timeout = 2.5\n"
        "max_associations_per_client = 3\nmax_associations_per_user = 0\nworkers = 2\nbatch = 32\n"
        "max_datagram = 1500\n"
    )
    udp = parse_config(tomllib.loads(text)).udp
    assert udp == UDPConfig(
        port=2000,
        dtls_port=None,
        enabled=False,
        first_datagram_timeout=2.5,
        max_associations_per_client=3,
        max_associations_per_user=0,
        workers=2,
        batch=32,
        max_datagram=1500,
    )


# --- PROXY protocol listeners (issue 14 item 3, D27) --------------------------------------


def test_proxy_protocol_listener_tables() -> None:
    text = """
[server]
listen = [
  "127.0.0.1:1080",
  { address = "127.0.0.1:1081", proxy_protocol = true, proxy_protocol_from = ["127.0.0.1", "10.0.0.0/8"] },
]
tls_listen = []
"""
    server = parse_config(tomllib.loads(text)).server
    assert server.listen == (("127.0.0.1", 1080), ("127.0.0.1", 1081))
    assert server.proxy_protocol_from(False, 0) is None
    assert server.proxy_protocol_from(False, 1) == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert server.proxy_protocol_from(True, 0) is None
    # The same as an array of tables; a table without proxy_protocol is a plain listener.
    text = """
[[server.listen]]
address = "127.0.0.1:1080"

[[server.listen]]
address = "[::1]:1081"
proxy_protocol = true
proxy_protocol_from = ["::1"]
"""
    server = parse_config(tomllib.loads(text)).server
    assert server.listen == (("127.0.0.1", 1080), ("::1", 1081))
    assert server.listen_proxy_protocol == (None, (ipaddress.ip_network("::1/128"),))


def test_proxy_protocol_off_by_default_and_dropped_by_listen_override() -> None:
    assert default_config().server.listen_proxy_protocol == ()
    text = (
        '[server]\nlisten = [{ address = "127.0.0.1:1081", proxy_protocol = true, '
        'proxy_protocol_from = ["127.0.0.1"] }]\n'
    )
    config = parse_config(tomllib.loads(text))
    assert config.server.proxy_protocol_from(False, 0) is not None
    # --listen replaces the listeners with plain ones.
    assert config.with_overrides(listen=["127.0.0.1:1081"]).server.proxy_protocol_from(False, 0) is None


#: The start of a one-listener [server] table with a listener table.
PP = '[server]\nlisten = [{ address = "127.0.0.1:1", '

PROXY_CASES = [
    (
        PP + "proxy_protocol = true }]",
        "server.listen[0].proxy_protocol: needs proxy_protocol_from, the addresses or CIDR networks of "
        "the load balancers allowed to send PROXY headers",
    ),
    (
        PP + 'proxy_protocol_from = ["127.0.0.1"] }]',
        "server.listen[0].proxy_protocol_from: needs proxy_protocol = true in the same listener",
    ),
    (
        PP + 'proxy_protocol = false, proxy_protocol_from = ["10.0.0.1"] }]',
        "server.listen[0].proxy_protocol_from: needs proxy_protocol = true in the same listener",
    ),
    (
        '[server]\nlisten = ["127.0.0.1:2", { address = "127.0.0.1:1", proxy_protocol = true, '
        'proxy_protocol_from = ["10.0.0.1/8"] }]',
        'server.listen[1].proxy_protocol_from[0]: "10.0.0.1/8" has host bits set (write the network '
        "address, e.g. 10.0.0.0/8)",
    ),
    (
        PP + 'proxy_protocol = true, proxy_protocol_from = ["lb.example"] }]',
        'server.listen[0].proxy_protocol_from[0]: "lb.example" is not an IP address or CIDR network',
    ),
    (
        PP + "proxy_protocol = true, proxy_protocol_from = [] }]",
        "server.listen[0].proxy_protocol_from: must name at least one load balancer",
    ),
    (
        PP + 'proxy_protocol = true, proxy_protocol_from = "10.0.0.1" }]',
        'server.listen[0].proxy_protocol_from: must be an array, e.g. ["10.0.0.5"], not a string',
    ),
    (
        PP + "proxy_protocol = true, proxy_protocol_from = [1] }]",
        "server.listen[0].proxy_protocol_from[0]: 1 is not a string",
    ),
    (
        PP + 'proxy_protocol = "yes", proxy_protocol_from = ["::1"] }]',
        'server.listen[0].proxy_protocol: "yes" is not true or false',
    ),
    ("[server]\nlisten = [{ proxy_protocol = true }]", 'server.listen[0].address: is required ("HOST:PORT")'),
    (
        '[server]\nlisten = [{ address = "127.0.0.1:99999" }]',
        'server.listen[0].address: "127.0.0.1:99999" is not HOST:PORT with a port 0-65535',
    ),
    (
        PP + "proxy = true }]",
        "server.listen[0].proxy: unknown key (allowed: address, proxy_protocol, proxy_protocol_from)",
    ),
    (
        '[server]\ntls_listen = [{ address = "127.0.0.1:1", proxy_protocol_from = ["::1"] }]',
        "server.tls_listen[0].proxy_protocol_from: needs proxy_protocol = true in the same listener",
    ),
]


@pytest.mark.parametrize(("text", "message"), PROXY_CASES, ids=[c[1].split(":")[0] for c in PROXY_CASES])
def test_proxy_protocol_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    assert str(info.value) == message
