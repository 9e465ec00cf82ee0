"""Imports point one way (STYLE.md section 1), read from the source with ``ast``.

``errors, constants -> messages -> _wire_* -> _codec_* -> codec -> _state -> connection
-> asyncio/*`` and ``relay -> asyncio/*``: the wire and protocol layers never reach up
into the adapters (asyncio/, the blocking client, the CLI), and the package's import
graph has no cycle. The check reads ``import`` statements, including those inside
functions, so a lazy import cannot hide an upward edge; test_imports.py checks the
run-time side (what importing the sans-IO layer drags into ``sys.modules``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "socks6fast"

#: The layers, lowest first. A module may import modules of its own layer or a lower one.
LAYERS: list[set[str]] = [
    {"constants"},
    {"errors", "messages", "_wire_py", "_state", "policy", "sessions", "auth"},
    {"socks5", "_codec_py", "_codec_c"},
    {"codec", "url", "config"},
    {"server_connection", "client_connection", "relay", "_relay_c"},
    {"connection", "stackopts", "client"},
    {"asyncio.relay", "asyncio.client"},
    {"asyncio.server", "asyncio"},
    {"cli", "__main__", ""},  # "" is the package's __init__ (public names only)
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package-relative names of the socks6fast modules ``path`` imports."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.add(".".join([*base, node.module]))
                else:  # "from . import x": x is a module of the package
                    found.update(".".join([*base, alias.name]) for alias in node.names)
            elif node.module and (node.module == "socks6fast" or node.module.startswith("socks6fast.")):
                found.add(node.module.removeprefix("socks6fast").removeprefix("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "socks6fast" or alias.name.startswith("socks6fast."):
                    found.add(alias.name.removeprefix("socks6fast").removeprefix("."))
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


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
