"""Imports point one way, and the layers are what the folder names say (STYLE.md section 1).

Read from the source with ``ast`` (``.py``) and from ``cimport``/``import`` lines (Cython
``.pyx``/``.pxd`` under ``src_pyx/``), including imports inside functions, so a lazy
import or a wrong ``cimport`` cannot hide an upward edge. test_imports.py checks the
run-time side (what importing the sans-IO core drags into ``sys.modules``).

The layers, lowest first:

- leaves: ``constants``, ``errors``, ``_extensions`` (and the C declarations in
  ``src_pyx/socks6fast/includes``);
- ``proto/``: the sans-IO protocol core, which touches no socket, loop or clock;
- ``net/`` (socket helpers) and ``config``;
- ``dataplane/``: the relay engine selector, the native engines (TCP splice, UDP
  recvmmsg/sendmmsg) with the UDP engine's Python twin, the Relayer and the UDP selector;
- the I/O adapters: ``_client_base`` (what both clients share), the blocking ``client``
  and ``asyncio/``;
- the command line, and beside it ``bench/`` (``socks6fast bench``).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "socks6fast"
PYX_PACKAGE = ROOT / "src_pyx" / "socks6fast"

#: The layers, lowest first. A module may import modules of its own layer or a lower one.
LAYERS: list[set[str]] = [
    {"constants", "_extensions", "includes", "includes.linux"},
    {"errors"},
    {
        "proto.messages",
        "proto.states",
        "proto.sessions",
        "proto.auth",
        "proto.policy",
        "proto.associations",
        "proto.limits",
    },
    {"proto.proxy_header"},
    {"proto._wire_py"},
    {"proto.socks5", "proto.stack", "proto._codec_py", "proto._codec_c", "proto.http_proxy"},
    {"proto.codec"},
    {"proto.server_wire", "proto.actions"},
    {"proto.server_common"},
    {"proto.server_socks5"},
    {"proto.server", "proto.client", "proto.client_udp", "proto"},
    {"proto.client_flow"},
    {"net.tfo"},
    {"net.url", "net.stackopts", "net.localaddr", "net.reuseport", "net", "config"},
    {"gateway_config"},
    # inline helpers both native engines cimport, and the OpenSSL function types of DTLS
    # channels (each a .pxd only)
    {"dataplane._engine", "dataplane._openssl"},
    # DTLS over memory BIOs (pyOpenSSL): sans-IO in shape, in net/ so that proto/ never imports
    # OpenSSL; above config (its limits come from the [udp] table).
    {"net.dtls"},
    {"dataplane.engine", "dataplane._relay_c", "dataplane.resources", "dataplane", "dataplane.udp_types"},
    {"dataplane.bandwidth"},
    {"dataplane._udp_py", "dataplane._udp_c"},
    {"dataplane.relayer", "dataplane.udp"},
    {"_client_base"},
    {"client"},
    # The DTLS endpoints on the loop: under both asyncio adapters, which will use them (issue 11).
    {"asyncio.dtls"},
    {"asyncio.client"},
    {
        "asyncio.server.record",
        "asyncio.server.streams",
        "asyncio.server.dial",
        "asyncio.server.logs",
        # issue 13 item 2: the shared session store (redis-py), asked by the handler
        "asyncio.server.redis_sessions",
    },
    {"asyncio.server.bind", "asyncio.server.udp"},
    # The proxy's DTLS ports: the DTLS endpoint on the loop, handing connections to the UDP engine.
    {"asyncio.server.dtls"},
    # Issue 14: the Prometheus collector (reads the relayer, the UDP service, the sessions) and
    # the admin HTTP listener serving it.
    {"asyncio.server.metrics"},
    {"asyncio.server.admin"},
    # issue 15: the gateway drives the asyncio client, hands pairs to the relayer and serves
    # its metrics with the admin listener.
    {"asyncio.gateway"},
    {"asyncio.server.handler"},
    {"asyncio.server.lifecycle"},
    {"asyncio.server", "asyncio"},
    # "" is the package's __init__ (public names only). The bench (socks6fast bench) sits beside
    # the CLI: it runs the proxy as a child process and imports nothing of the layers below.
    # serve --workers N (D34): binds the groups and forks the workers; the CLI runs it.
    {"supervisor"},
    {"cli", "__main__", ""}
    | {f"bench{m}" for m in ("", ".__main__", ".cli", ".suite", ".ceiling")}
    | {f"bench._{m}" for m in ("chart", "measure", "procs", "report", "sessions", "systems", "ttfb", "udp")}
    # The Python UDP load generator for the DTLS rows runs as a child process; it drives
    # socks6fast's own client (issue 11).
    | {"bench._dtlsgen"},
    # Issue 15: the httpx and aiohttp adapters (optional extras), on top of everything: they use
    # the clients, and no module below may import them (the core never pulls in httpx/aiohttp).
    {"contrib", "contrib.httpx", "contrib.aiohttp"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

#: Standard modules that mean "touches sockets or an event loop".
IO_MODULES = frozenset({"socket", "_socket", "ssl", "asyncio", "select", "selectors", "uvloop"})
#: Cython declarations that mean the same for a .pyx.
IO_CIMPORTS = ("posix.socket", "socks6fast.includes.linux", "libc.sys.socket")
#: The only places allowed to touch sockets (a top-level folder or module name).
#: bench/ (socks6fast bench) is a load harness: it dials the proxies under test itself.
#: contrib/ (the httpx and aiohttp adapters) performs the clients' I/O for those libraries.
SOCKET_HOMES = frozenset(
    {"net", "dataplane", "asyncio", "_client_base", "client", "cli", "supervisor", "bench", "contrib"}
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(package: list[str], level: int, module: str | None, names: list[str]) -> set[str]:
    base = package[: len(package) - (level - 1)] if level > 1 else package
    if module:
        return {".".join([*base, module])}
    return {".".join([*base, name]) for name in names}  # "from . import x": x is a module


def _py_imports(path: Path) -> tuple[set[str], set[str]]:
    """(package-relative socks6fast modules, top-level other modules) that ``path`` imports."""
    name = _module_name(path, PACKAGE)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found: set[str] = set()
    other: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found |= _resolve(package, node.level, node.module, [a.name for a in node.names])
            elif node.module and (node.module == "socks6fast" or node.module.startswith("socks6fast.")):
                found.add(node.module.removeprefix("socks6fast").removeprefix("."))
            elif node.module:
                other.add(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "socks6fast" or alias.name.startswith("socks6fast."):
                    found.add(alias.name.removeprefix("socks6fast").removeprefix("."))
                else:
                    other.add(alias.name)
    return found, other


_CY_FROM = re.compile(r"^\s*from\s+(\.*)([\w.]*)\s+c?import\s+(.+)$", re.M)
_CY_IMPORT = re.compile(r"^\s*c?import\s+([\w.]+)", re.M)


def _pyx_imports(path: Path) -> tuple[set[str], set[str]]:
    """The same for a Cython file: ``import``, ``cimport`` and ``from ... (c)import`` lines."""
    name = _module_name(path, PYX_PACKAGE)
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    text = path.read_text()
    found: set[str] = set()
    other: set[str] = set()
    for dots, module, names in _CY_FROM.findall(text):
        if dots:
            found |= _resolve(package, len(dots), module or None, [n.strip() for n in names.split(",")])
        elif module == "socks6fast" or module.startswith("socks6fast."):
            found.add(module.removeprefix("socks6fast").removeprefix("."))
        else:
            other.add(module)
    for module in _CY_IMPORT.findall(text):
        if module.startswith("socks6fast."):
            found.add(module.removeprefix("socks6fast."))
        else:
            other.add(module)
    return found, other


@functools.cache
def _sources() -> dict[str, tuple[set[str], set[str]]]:
    """Every module of the package, Python and Cython, with what it imports."""
    graph: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path, PACKAGE)] = _py_imports(path)
    for path in sorted([*PYX_PACKAGE.rglob("*.pyx"), *PYX_PACKAGE.rglob("*.pxd")]):
        name = _module_name(path, PYX_PACKAGE)
        mine, other = _pyx_imports(path)
        if name == "" or path.stem == "__init__":
            continue  # the empty __init__.pxd files that let cimport resolve
        known = graph.setdefault(name, (set(), set()))
        known[0].update(mine)
        known[1].update(other)
    return graph


def _graph() -> dict[str, set[str]]:
    return {name: mine for name, (mine, _other) in _sources().items()}


def test_cython_sources_are_read() -> None:
    """The check sees the .pyx/.pxd files: their cimports are part of the graph."""
    graph = _graph()
    assert "proto._codec_c" in graph
    assert "includes.linux" in graph.get("dataplane._relay_c", set())


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in LAYERS (and so in the dependency order) explicitly."""
    graph = _graph()
    missing = sorted(m for m in graph if m not in RANK)
    assert not missing, f"add these modules to LAYERS: {missing}"
    unknown = sorted({d for deps in graph.values() for d in deps if d not in RANK})
    assert not unknown, f"imports of modules not in LAYERS: {unknown}"


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_point_down(module: str) -> None:
    """No module imports one from a higher layer (e.g. the codec never imports asyncio/)."""
    upward = sorted(d for d in _graph()[module] if RANK.get(d, -1) > RANK.get(module, -1))
    assert not upward, f"{module or 'socks6fast'} (layer {RANK.get(module)}) imports upward: {upward}"


@pytest.mark.parametrize("module", sorted(_sources()))
def test_sockets_only_in_their_layers(module: str) -> None:
    """Only net/, dataplane/, asyncio/, the clients, the CLI and bench/ touch sockets or loops;
    the protocol core, config and the leaves never do (Python imports and Cython cimports)."""
    _mine, other = _sources()[module]
    touches = sorted(m for m in other if m.split(".")[0] in IO_MODULES or m.startswith(IO_CIMPORTS))
    home = module.split(".")[0]
    if home in SOCKET_HOMES:
        return
    assert not touches, f"{module} touches sockets ({touches}) but is not in {sorted(SOCKET_HOMES)}"


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep == node or dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [*path, dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
