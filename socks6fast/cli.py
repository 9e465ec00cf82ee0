"""The ``socks6fast`` command: ``serve``, ``gateway``, ``check-config``, ``hash-password``, ``bench``.

``socks6fast serve`` runs the proxy. Without flags it uses the embedded default
(`socks6fast.config.DEFAULT_TOML`: 127.0.0.1:1080, no authentication, every destination
allowed). ``--config FILE`` loads a TOML file, ``--listen HOST:PORT`` (repeatable) replaces
the listeners (a host name is bound on every address the system resolver gives for it),
``--user NAME`` (repeatable) adds users and so turns authentication on. The event loop is
uvloop's when it is installed.

Passwords stay off the command line, which ``ps`` shows to every user of the host (issue 14
item 6): the password of ``--user NAME`` comes from ``--password-file FILE`` (its first
line), else from the environment variable `PASSWORD_ENV` (``SOCKS6FAST_PASSWORD``), else
from a prompt at a terminal. ``--user NAME:PASSWORD`` still works, with a warning.

Signals: SIGTERM (and SIGINT) stop accepting, let relayed connections finish for at most
``--drain-timeout`` seconds, then exit 0. SIGHUP re-reads the configuration file (users,
rules, limits, sessions settings) and keeps every established connection; a broken file
is reported and the running configuration stays.

``--workers N`` (or ``[server] workers``; 0 = one per core) with N > 1 makes this process
the supervisor of N forked workers sharing the ports (``socks6fast.supervisor``, D34): it
checks a reloaded file once and passes SIGHUP on, drains every worker on SIGTERM, and starts
a worker that died again. N = 1 is the single process above.

``socks6fast gateway`` runs the local SOCKS 5 / HTTP proxy gateway to an upstream socks6fast
(`socks6fast.asyncio.gateway`); its configuration is `socks6fast.gateway_config`.

``socks6fast bench ...`` is the benchmark suite of ``socks6fast.bench``, which parses its
own options (``socks6fast bench --help``).

``socks6fast --version`` prints the version. Every configuration mistake is one sentence
naming the key, on stderr, with exit code 2 and no traceback. A valid configuration that
makes an open proxy (a listener not on loopback, no users, rules that let anyone through)
is started, with a warning in the log; ``check-config`` prints the same warning and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

# Absolute: the package's __init__ ("" in tests/test_layers.py), not a module named __version__.
from socks6fast import __version__

from .asyncio.gateway import Gateway, upstream_ssl_context
from .asyncio.server import Server
from .asyncio.server.logs import WORKER, BatchingStreamHandler, JsonFormatter, TextFormatter
from .config import Config, ConfigError, default_config, load_config, parse_listen, parse_user_option
from .constants import MAX_USERPASS_LENGTH, MAX_WORKER_PROCESSES
from .gateway_config import GatewayConfig, load_gateway_config, parse_upstream
from .net.reuseport import WorkerSockets
from .proto.auth import ScryptHash, hash_password
from .supervisor import Supervisor, per_worker_config, resolve_workers

try:  # uvloop is a dependency on POSIX; the proxy still runs without it
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

__all__ = ["EXIT_CONFIG", "PASSWORD_ENV", "build_parser", "main"]

#: Exit status for a configuration or usage error (the argparse convention).
EXIT_CONFIG = 2
#: Default seconds SIGTERM waits for relayed connections to finish.
DEFAULT_DRAIN_TIMEOUT = 10.0
#: Environment variable holding the password of ``serve --user NAME`` (issue 14 item 6).
PASSWORD_ENV = "SOCKS6FAST_PASSWORD"

log = logging.getLogger("socks6fast")


class _Fail(Exception):
    """A one-sentence error for the user; main() prints it and exits 2."""


def _load(args: argparse.Namespace) -> Config:
    """The configuration from --config (or the default) with --listen/--user applied.

    The --user passwords were gathered once by `_gather_users` (a reload on SIGHUP must not
    prompt again or see a changed environment)."""
    try:
        config = load_config(args.config) if args.config else default_config()
        users: dict[str, str] = args.users
        # The --user hashes are made once: a reload reuses them, so an unchanged --user keeps
        # the same hash and its sessions (a changed hash ends them, S-1).
        hashed: dict[str, ScryptHash] | None = getattr(args, "user_hashes", None)
        config = config.with_overrides(listen=args.listen or None, users=hashed or users or None)
        if hashed is None:
            args.user_hashes = {name: config.user_hashes[name] for name in users}
        return config
    except ConfigError as exc:
        raise _Fail(str(exc)) from None


def _gather_users(args: argparse.Namespace) -> dict[str, str]:
    """``--user`` values as name -> password, each password from where the module docstring says."""
    users: dict[str, str] = {}
    bare: list[str] = []
    for value in args.user or ():
        if ":" in value:
            try:
                name, password = parse_user_option(value)
            except ConfigError as exc:
                raise _Fail(str(exc)) from None
            users[name] = password
        elif value:
            bare.append(value)
        else:
            raise _Fail("--user: the user name is empty")
    if users:
        # Printed before logging starts, once (not per reload).
        print(
            "socks6fast: warning: --user NAME:PASSWORD shows the password to every user of this host "
            f"(ps); use --user NAME with --password-file FILE, ${PASSWORD_ENV} or the prompt",
            file=sys.stderr,
        )
    if args.password_file is not None and not bare:
        raise _Fail("--password-file: it gives the password of --user NAME, and no --user NAME is given")
    if not bare:
        return users
    if args.password_file is not None or PASSWORD_ENV in os.environ:
        if len(bare) > 1:
            source = "--password-file" if args.password_file is not None else f"${PASSWORD_ENV}"
            raise _Fail(
                f"{source} holds one password, for one --user NAME; put several users in [users] "
                "of a --config file (socks6fast hash-password)"
            )
        if args.password_file is not None:
            users[bare[0]] = _password_from_file(args.password_file)
        elif os.environ[PASSWORD_ENV]:
            users[bare[0]] = os.environ[PASSWORD_ENV]
        else:
            raise _Fail(f"--user {bare[0]}: ${PASSWORD_ENV} is empty")
        return users
    if not sys.stdin.isatty():
        raise _Fail(
            f"--user {bare[0]}: no password: give --password-file FILE, set ${PASSWORD_ENV}, "
            "or run at a terminal to be asked"
        )
    for name in bare:
        users[name] = _read_password(f"Password for {name}: ")
    return users


def _password_from_file(path: str) -> str:
    """The first line of ``path`` without its line end; one sentence when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline()
    except OSError as exc:
        raise _Fail(f"--password-file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Fail(f"--password-file: {path} is not UTF-8 text") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise _Fail(f"--password-file: the first line of {path} is empty")
    return password


def _setup_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    # The one log line per finished connection is on the per-connection hot path: skip the
    # record attributes our format does not use, above all the caller lookup that walks
    # the stack (logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # To stderr's descriptor, flushed once per event loop turn once `_serve` attaches the loop
    # (issue 13 item 3: a write(2) per connection's line before).
    try:
        handler = BatchingStreamHandler.for_fd(sys.stderr.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation: a stderr without a descriptor
        handler = BatchingStreamHandler(sys.stderr)
    tag = ""
    if worker is not None:
        # D34: every line of a worker process says which one (JSON: "worker": N).
        def tag_record(record: logging.LogRecord) -> bool:
            setattr(record, WORKER, worker)
            return True

        handler.addFilter(tag_record)
        tag = f"[worker {worker}] "
    if log_format == "json":
        handler.setFormatter(JsonFormatter())  # issue 14: one JSON object per line
    else:
        handler.setFormatter(TextFormatter(tag))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


async def _serve(
    args: argparse.Namespace,
    config: Config,
    worker: WorkerSockets | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    batching = [h for h in logging.getLogger().handlers if isinstance(h, BatchingStreamHandler)]
    for h in batching:
        h.attach(loop)  # one flush per loop turn from here on
    problem = _tls_problem(config)
    if problem is not None:
        raise _Fail(problem)
    server = Server(config, worker=worker)
    stop = asyncio.Event()
    started = False

    def reload() -> None:
        if not started:
            log.info("SIGHUP during start-up: ignored")
            return
        if not args.config:
            log.info("SIGHUP: no --config file to reload")
            return
        try:
            new = _load(args)
            if worker is not None:  # the same per-worker shares as at start (D34)
                new = per_worker_config(new, worker.count, worker.index)
            server.reload(new)
        except _Fail as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
        except (ConfigError, OSError, ssl.SSLError, ValueError) as exc:  # e.g. an unusable new certificate
            log.error("SIGHUP: configuration not reloaded: %s", exc)

    handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (signal.SIGHUP, reload),
    ]
    # Installed before start(): "listening on" is logged inside it, and a SIGTERM that a
    # supervisor (or a test) sends on seeing that line must drain, not kill the process.
    for signum, handler in handlers:
        loop.add_signal_handler(signum, handler)
    try:
        try:
            await server.start()
        except OSError as exc:
            raise _Fail(f"cannot listen: {exc.strerror or exc}") from None
        started = True
        if ready is not None:
            ready()
        await stop.wait()
        server.stop_accepting()
        log.info("stopping: no new connections; draining for at most %.1fs", args.drain_timeout)
        await server.close(drain_timeout=args.drain_timeout)
    finally:
        for signum, _ in handlers:
            loop.remove_signal_handler(signum)
        for h in batching:
            h.attach(None)  # flushes; every line from here on is written at once
    log.info("stopped")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    args.drain_timeout = _seconds("--drain-timeout", args.drain_timeout)
    args.users = _gather_users(args)
    config = _load(args)
    workers = config.server.workers
    if args.workers is not None:
        workers = _count("--workers", args.workers, 0, MAX_WORKER_PROCESSES)
    workers = resolve_workers(workers)
    _setup_logging(args.log_level or config.server.log_level, config.server.log_format)
    if workers == 1:
        # Today's single process: no supervisor, nothing forked (D34).
        return _run_loop(_serve(args, config))
    return _supervise(args, config, workers)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _workers_problem(config: Config, workers: int) -> str | None:
    """Why ``config`` cannot be served by ``workers`` processes (D34), or None."""
    if workers <= 1:
        return None
    if config.udp.dtls_served(config.server):
        return (
            f"--workers {workers}: DTLS ports ([udp] dtls with a TLS listener or dtls_port) are "
            "served by one process only; set workers = 1 or [udp] dtls = false"
        )
    per_worker = per_worker_config(config, workers, 0)
    if per_worker.udp.enabled and workers * per_worker.udp.workers > 256:
        return (
            f"--workers {workers} x [udp] workers {per_worker.udp.workers} is over 256 UDP sockets "
            "per port (one Association ID byte steers them); lower one of them"
        )
    return None


def _tls_problem(config: Config) -> str | None:
    """Why the TLS certificate, key or client CA cannot be used (a file that exists but is
    not PEM, a key that does not match), or None: the sentence check-config and serve print
    instead of a traceback."""
    server = config.server
    try:
        if Server.make_tls_context(config) is None:
            return None
    except ConfigError as exc:
        return str(exc)
    assert server.tls_certificate is not None and server.tls_key is not None
    if config.udp.dtls_served(server):
        from .net.dtls import dtls_server_context  # noqa: PLC0415 - pyOpenSSL only when DTLS is served

        try:
            dtls_server_context(server.tls_certificate, server.tls_key, client_cafile=server.tls_client_ca)
        except OSError as exc:  # DTLSError: one sentence already
            return str(exc)
    return None


def _supervise(args: argparse.Namespace, config: Config, workers: int) -> int:
    """``serve --workers N`` with N > 1: this process supervises N forked workers (D34)."""
    problem = _workers_problem(config, workers)
    if problem is not None:
        raise _Fail(problem)

    def reload() -> Config:
        try:
            return _load(args)
        except _Fail as exc:
            raise ValueError(str(exc)) from None

    def run_worker(worker_config: Config, sockets: WorkerSockets, ready: Callable[[], None]) -> int:
        level = args.log_level or worker_config.server.log_level
        _setup_logging(level, worker_config.server.log_format, worker=sockets.index)
        try:
            return _run_loop(_serve(args, worker_config, sockets, ready))
        except _Fail as exc:
            print(f"socks6fast: error: [worker {sockets.index}] {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except KeyboardInterrupt:
            return 130
        finally:
            sockets.close()

    supervisor = Supervisor(config, workers, run_worker, reload, args.drain_timeout)
    try:
        supervisor.bind()
    except OSError as exc:
        raise _Fail(f"cannot listen: {exc.strerror or exc}") from None
    status = supervisor.run()
    if status != 0:
        raise _Fail(f"a worker could not start (its error is above); {workers} workers not started")
    return status


def _count(flag: str, text: str, low: int, high: int) -> int:
    """An integer in low..high; one sentence otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise _Fail(f"{flag}: {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise _Fail(f"{flag}: {value} is not in {low}..{high}")
    return value


def _is_gateway_file(path: str) -> bool:
    """Whether ``path`` is a gateway configuration (its top-level table is ``[gateway]``)."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False  # load_config reports it in its own words
    return "gateway" in data


def _check_gateway_config(path: str) -> int:
    try:
        config = load_gateway_config(path)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None
    for i, (host, _) in enumerate(config.listen):
        problem = _unassignable(host)
        if problem:
            raise _Fail(f"{path}: gateway.listen[{i}]: {host} {problem}")
    if config.admin_listen is not None:
        problem = _unassignable(config.admin_listen[0])
        if problem:
            raise _Fail(f"{path}: gateway.admin_listen: {config.admin_listen[0]} {problem}")
    upstream = config.upstream
    where = (
        "no upstream (give --upstream)" if upstream is None else f"upstream {upstream.host}:{upstream.port}"
    )
    print(f"{path}: OK (gateway: {len(config.listen)} listeners, {where}, mode {config.mode})")
    if any(not _is_loopback(host) for host, _ in config.listen):
        print(
            f"socks6fast: warning: {path}: gateway.listen reaches beyond loopback and the gateway does "
            "not authenticate apps: anyone who can reach it uses the upstream with its credentials",
            file=sys.stderr,
        )
    if upstream is not None and upstream.tls and not config.upstream_verify:
        print(
            f"socks6fast: warning: {path}: gateway.upstream_verify = false: the upstream's certificate "
            "is not checked, so anyone on the path can pose as the proxy",
            file=sys.stderr,
        )
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_check_config(args: argparse.Namespace) -> int:
    if _is_gateway_file(args.file):
        return _check_gateway_config(args.file)
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None
    server = config.server
    for key, entries in (("server.listen", server.listen), ("server.tls_listen", server.tls_listen)):
        for i, (host, _) in enumerate(entries):
            problem = _unassignable(host)
            if problem:
                raise _Fail(f"{args.file}: {key}[{i}]: {host} {problem}")
    admin = config.admin.listen
    if admin is not None:
        problem = _unassignable(admin[0])
        if problem:
            raise _Fail(f"{args.file}: admin.listen: {admin[0]} {problem}")
    mistake = _tls_problem(config) or _workers_problem(config, resolve_workers(server.workers))
    if mistake is not None:
        raise _Fail(f"{args.file}: {mistake}")
    behind = sum(p is not None for p in server.listen_proxy_protocol + server.tls_listen_proxy_protocol)
    proxied = f", {behind} behind a load balancer (PROXY protocol)" if behind else ""
    print(
        f"{args.file}: OK ({len(server.listen)} plain and {len(server.tls_listen)} TLS listeners{proxied}, "
        f"{len(config.users)} users, {len(config.rules)} rules)"
    )
    if config.admin.exposed and admin is not None:
        print(
            f"socks6fast: warning: {args.file}: admin.listen {admin[0]} is not loopback: anyone who can "
            "reach it can read the metrics",
            file=sys.stderr,
        )
    warning = config.open_proxy_warning()
    if warning is not None:
        # Valid, so exit 0; but say it as serve will (issue 12: no silent open proxy).
        print(f"socks6fast: warning: {args.file}: {warning}", file=sys.stderr)
    return 0


def _unassignable(host: str) -> str:
    """Why ``serve`` could not listen on IP literal ``host`` (empty when it can, or for names).

    check-config binds port 0 on the address, not the configured port: the proxy the
    file is meant for may be running on that port already (a check before SIGHUP).
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return ""  # a name: resolved by serve; check-config does not look names up
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        return f"cannot be listened on here ({exc.strerror or exc})"
    return ""


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's configuration: --config, then the flags, then the upstream password."""
    try:
        config = load_gateway_config(args.config) if args.config else GatewayConfig()
        changes: dict[str, object] = {}
        if args.listen:
            try:
                changes["listen"] = tuple(parse_listen(v) for v in args.listen)
            except ValueError as exc:
                raise ConfigError(f"--listen: {exc}") from None
        if args.upstream:
            try:
                changes["upstream"] = parse_upstream(args.upstream)
            except ConfigError as exc:
                raise ConfigError(f"--{exc}") from None
            if changes["upstream"].password:  # type: ignore[attr-defined]
                print(
                    "socks6fast: warning: a password in --upstream shows it to every user of this host "
                    f"(ps); use --password-file FILE, ${PASSWORD_ENV} or the prompt",
                    file=sys.stderr,
                )
        if args.upstream_ca:
            changes["upstream_ca"] = args.upstream_ca
        if args.insecure_upstream:
            changes["upstream_verify"] = False
        if args.mode:
            changes["mode"] = args.mode
        if args.first_data_wait_ms is not None:
            try:
                wait = float(args.first_data_wait_ms)
            except ValueError:
                wait = -1.0
            if not 0 <= wait <= 10_000:
                raise _Fail(
                    f"--first-data-wait-ms: {args.first_data_wait_ms!r} is not a number of ms 0-10000"
                )
            changes["first_data_wait"] = wait / 1000
        if args.tokens is not None:
            if not 0 <= args.tokens < 2**31:
                raise _Fail("--tokens: must be 0 to 2^31-1")
            changes["tokens"] = args.tokens
        if args.no_tfo:
            changes["tfo"] = False
        if args.admin_listen:
            try:
                changes["admin_listen"] = parse_listen(args.admin_listen)
            except ValueError as exc:
                raise ConfigError(f"--admin-listen: {exc}") from None
        if args.password_file:
            changes["password_file"] = args.password_file
        config = config.replace(**changes)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None
    upstream = config.upstream
    if upstream is None:
        raise _Fail("gateway: no upstream: give --upstream socks6://[user@]host:port or [gateway] upstream")
    if upstream.username is not None and not upstream.password:
        name = upstream.username.decode("utf-8", "replace")
        if config.password_file is not None:
            password = _password_from_file(config.password_file)
        elif os.environ.get(PASSWORD_ENV):
            password = os.environ[PASSWORD_ENV]
        elif sys.stdin.isatty():
            try:
                password = getpass.getpass(f"Password for {name} at {upstream.host}: ")
            except EOFError:
                raise _Fail("no password given (end of input at the prompt)") from None
        else:
            raise _Fail(
                f"--upstream {name}@...: no password: give --password-file FILE, set ${PASSWORD_ENV}, "
                "or run at a terminal to be asked"
            )
        if not 1 <= len(password.encode("utf-8")) <= MAX_USERPASS_LENGTH:
            raise _Fail(f"the upstream password must be 1-{MAX_USERPASS_LENGTH} bytes (RFC 1929)")
        config = config.replace(upstream=dataclasses.replace(upstream, password=password.encode("utf-8")))
    if upstream.tls:
        try:
            upstream_ssl_context(config)
        except (OSError, ssl.SSLError) as exc:
            raise _Fail(f"--upstream-ca: cannot load {config.upstream_ca}: {exc}") from None
    elif args.upstream_ca or args.insecure_upstream:
        raise _Fail("--upstream-ca and --insecure-upstream need a socks6+tls:// upstream")
    return config


async def _run_gateway(config: GatewayConfig) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(config)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if not config.upstream_verify:
            log.warning("gateway: the upstream's certificate is NOT verified (--insecure-upstream)")
        try:
            await gateway.start()
        except OSError as exc:
            raise _Fail(f"cannot listen: {exc.strerror or exc}") from None
        await stop.wait()
        log.info("gateway stopping")
        await gateway.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("gateway stopped: %s", gateway.stats)
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    config = _gateway_config(args)
    _setup_logging(args.log_level or config.log_level)
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run_gateway(config))


def _read_password(prompt: str = "Password: ") -> str:
    if sys.stdin.isatty():
        try:
            first = getpass.getpass(prompt)
            again = getpass.getpass("Repeat: ")
        except EOFError:  # Ctrl-D at the prompt
            raise _Fail("no password given (end of input at the prompt)") from None
        if again != first:
            raise _Fail("the passwords do not match")
        return first
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def _cmd_hash_password(args: argparse.Namespace) -> int:
    password = _read_password()
    if not 1 <= len(password.encode("utf-8")) <= MAX_USERPASS_LENGTH:
        raise _Fail(f"the password must be 1-{MAX_USERPASS_LENGTH} bytes (RFC 1929)")
    print(hash_password(password))
    return 0


def _seconds(flag: str, text: str) -> float:
    """A finite number of seconds, 0 or more; one sentence otherwise (like ``--listen``)."""
    try:
        value = float(text)
    except ValueError:
        raise _Fail(f"{flag}: {text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise _Fail(f"{flag}: {text!r} is not 0 or more seconds")
    return value


_MAIN_EPILOG = """\
exit status: 0 success; 2 a configuration or usage mistake (one sentence on stderr).
Configuration: a TOML file (socks6fast serve --help; every key is explained in
examples/socks6fast.toml of the source and in README.md).
"""

_SERVE_EPILOG = f"""\
configuration file (TOML; every key optional; examples/socks6fast.toml explains each one):
  default_action = "allow" | "deny"       decision when no [[rules]] entry matches
  [server]   listen, tls_listen, tls_certificate, tls_key, tls_client_ca, max_connections, timeouts,
             workers, relay_workers, log_level, log_format ("text" or "json"), limits on password
             checks, min_bind_port
  [admin]    listen = "127.0.0.1:9180": Prometheus /metrics and /healthz (off unless set)
  [users]    NAME = "scrypt$..."          (socks6fast hash-password makes the hash)
  [sessions] SOCKS 6 sessions and idempotence tokens
  [[rules]]  action, users, clients, commands, destinations (first match decides)
  [udp]      UDP ASSOCIATE settings
  [limits]   connections, connection rate and bandwidth per user and per client address
  Without --config the built-in default applies: listen on 127.0.0.1:1080, no users,
  every destination allowed.

passwords (--user NAME): from --password-file FILE (its first line), else the environment
  variable {PASSWORD_ENV}, else a prompt at a terminal. --user NAME:PASSWORD also works but
  puts the password where ps shows it to every user of the host (a warning says so).

signals:
  SIGTERM, SIGINT  stop accepting, let relayed connections finish for at most
                   --drain-timeout seconds, then exit 0
  SIGHUP           re-read --config (users, rules, limits, sessions); established
                   connections stay; a broken file is logged and the old one stays
  With --workers N > 1 the serve process is a supervisor: it sends SIGHUP (after checking
  the file once) and SIGTERM to every worker and starts a worker that dies again.

start-up: the soft open-file limit is raised to the hard limit; max_connections is lowered,
  with a warning, when it cannot fit (each connection: 2 sockets + 2 pipe descriptors on the
  splice path). See docs/tuning.md.
"""


_GATEWAY_EPILOG = f"""\
modes:
  optimistic  (default) the app's SOCKS 5 reply / "200 Connection established" comes at once, so
              its first bytes ride with the SOCKS 6 Request; if the upstream then refuses, the
              app's connection is closed and the log line names the reply code
  strict      wait for the upstream's reply; a refusal becomes a SOCKS 5 reply code or an HTTP
              status (403 not allowed by the rules, 504 timed out, 502 otherwise)

password (when the upstream URL has user@ and no password): --password-file FILE (its first
  line), else the environment variable {PASSWORD_ENV}, else a prompt at a terminal.

configuration file: [gateway] with listen, upstream, upstream_ca, upstream_verify,
  upstream_server_name, password_file, mode, first_data_wait_ms, tokens, keepalive, tfo,
  connect_timeout, log_level, admin_listen (flags override it); socks6fast check-config FILE
  checks it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; other commands (``bench``) register with ``add_subparsers``."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="socks6fast",
        description="SOCKS 6 (draft-olteanu-intarea-socks-6-11) and SOCKS 5 proxy.",
        epilog=_MAIN_EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"socks6fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy: SOCKS 6 and SOCKS 5 on each plain listener, SOCKS over TLS on\n"
        "tls_listen, UDP ASSOCIATE on the listeners' port numbers. Logs go to stderr.",
        epilog=_SERVE_EPILOG,
        formatter_class=raw,
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration file (default: the built-in one, 127.0.0.1:1080, no users)",
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="listen here instead of the configured listeners (repeatable; IPv6 as [::1]:1080; a "
        "host name is bound on every address it resolves to, e.g. localhost)",
    )
    serve.add_argument(
        "--user",
        metavar="NAME",
        action="append",
        help="add a user, which turns authentication on (repeatable); its password comes from "
        f"--password-file, ${PASSWORD_ENV} or a prompt (NAME:PASSWORD works, with a warning)",
    )
    serve.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password of --user NAME from the first line of FILE",
    )
    serve.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        default=str(DEFAULT_DRAIN_TIMEOUT),
        help=f"on SIGTERM/SIGINT, wait this long for relayed connections (default {DEFAULT_DRAIN_TIMEOUT:g})",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="worker processes sharing the listeners (default: [server] workers, 1; 0 = one per "
        "core); N > 1 runs a supervisor that restarts a worker that dies (README: Worker processes)",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default: [server] log_level of the config, info)",
    )
    serve.set_defaults(handler=_cmd_serve, command_parser=serve)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file as serve would load it, and check that its "
        "listen addresses exist on this host. Exit 0 when valid (an open-proxy warning may "
        "be printed), 2 with one sentence naming the key otherwise.",
    )
    check.add_argument("file", metavar="FILE", help="the TOML configuration file")
    check.set_defaults(handler=_cmd_check_config, command_parser=check)

    gateway = commands.add_parser(
        "gateway",
        help="SOCKS 5 / HTTP proxy in front, SOCKS 6 to an upstream socks6fast behind",
        description="Accept SOCKS 5 (CONNECT) and HTTP proxy requests (CONNECT, GET http://...) on a "
        "local\naddress and carry each over SOCKS 6 to the upstream: one warm session, 0-RTT, "
        "idempotence\ntokens, TCP Fast Open, the app's first bytes with the Request. Logs go to stderr.",
        epilog=_GATEWAY_EPILOG,
        formatter_class=raw,
    )
    gateway.add_argument("--config", metavar="FILE", help="TOML file with a [gateway] table")
    gateway.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="listen here (repeatable; default 127.0.0.1:1080)",
    )
    gateway.add_argument(
        "--upstream",
        metavar="URL",
        help="socks6://[user@]host:port or socks6+tls://[user@]host:port (the password: see below)",
    )
    gateway.add_argument("--password-file", metavar="FILE", help="the upstream password: first line of FILE")
    gateway.add_argument(
        "--upstream-ca", metavar="FILE", help="CA file trusted for the upstream's certificate"
    )
    gateway.add_argument(
        "--insecure-upstream",
        action="store_true",
        help="do not verify the upstream's TLS certificate (anyone on the path can pose as it)",
    )
    gateway.add_argument("--mode", choices=["optimistic", "strict"], help="when the app gets its answer")
    gateway.add_argument(
        "--first-data-wait-ms", metavar="MS", help="wait this long for the app's first bytes (default 5)"
    )
    gateway.add_argument(
        "--tokens", type=int, metavar="N", help="idempotence token window (default 64; 0: none)"
    )
    gateway.add_argument("--no-tfo", action="store_true", help="no TCP Fast Open to the upstream")
    gateway.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /healthz here (default: off)",
    )
    gateway.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level (default info)",
    )
    gateway.set_defaults(handler=_cmd_gateway, command_parser=gateway)

    hashing = commands.add_parser(
        "hash-password",
        help="print the scrypt hash of a password, for [users]",
        description='Print the scrypt hash of a password (for NAME = "scrypt$..." in [users]). '
        "At a terminal it asks twice; otherwise it reads the first line of stdin.",
    )
    hashing.set_defaults(handler=_cmd_hash_password, command_parser=hashing)

    # Listed for --help only: main() hands `bench ...` to socks6fast.bench, which parses its own options.
    bench = commands.add_parser(
        "bench",
        add_help=False,
        help="benchmark against direct loopback, Dante and microsocks (socks6fast bench --help)",
    )
    bench.set_defaults(handler=lambda args: run_bench([]), command_parser=bench)
    return parser


def run_bench(argv: Sequence[str]) -> int:
    """``socks6fast bench ...``: the benchmark suite of ``socks6fast.bench`` (``argv`` follows ``bench``)."""
    # Imported here, not at the top: `serve` and the other commands should not load the bench
    # (its modules and their imports add about a fifth to this module's import time).
    from .bench import main as bench_main  # noqa: PLC0415

    return bench_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:
        return run_bench(raw[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse would blame the top-level parser and print its usage; the mistake is
        # in the command's options, so show that command's usage with the sentence.
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _Fail as exc:
        print(f"socks6fast: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
