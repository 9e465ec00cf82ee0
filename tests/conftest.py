"""Shared fixtures: every codec test runs against both twins (STYLE.md section 7)."""

from __future__ import annotations

import importlib
import ipaddress
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from conformance_report import write_collection

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.asyncio.server import udp as server_udp
from socks6fast.dataplane.udp import UDP_ENGINE_AVAILABLE, UdpEngineC, UdpEnginePy

#: Names the guard lets through: /etc/hosts answers them, no DNS packet leaves the machine.
_LOCAL_NAMES = frozenset({"localhost", "localhost."})


def _is_local_host(host: object) -> bool:
    """True for None, "", "localhost" and IP literals (with or without an IPv6 scope)."""
    if host is None:
        return True
    if isinstance(host, bytes | bytearray):
        try:
            host = bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str):
        return False
    if host == "" or host.lower() in _LOCAL_NAMES:
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


@pytest.fixture(autouse=True, scope="session")
def _no_system_dns() -> Iterator[None]:
    """Network safety: no test may resolve a name through the system resolver,
    which would send DNS packets off the machine. ``socket.getaddrinfo`` (which asyncio's
    default loop and ``socket.create_connection`` use too) refuses any host that is not an
    IP literal or "localhost"; tests that need names pass a local fake resolver (e.g. the
    server's ``resolver=``). uvloop resolves through libuv and bypasses this guard: tests on
    uvloop pass only IP literals and "localhost"."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str):
            host.encode("idna")  # the real function starts so: names it rejects raise UnicodeError
        if not _is_local_host(host):
            raise socket.gaierror(
                socket.EAI_NONAME,
                f"test tried to resolve {host!r} through the system resolver: "
                "tests must use a local fake resolver (network safety rule)",
            )
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    try:
        yield
    finally:
        socket.getaddrinfo = real


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-json",
        metavar="PATH",
        default=None,
        help="after collection, write each test's conformance marker IDs, name and docstring to "
        "PATH as JSON (for tests/conformance_report.py; use with --collect-only)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Conformance you can count: hand the collected tests to tests/conformance_report.py."""
    path = session.config.getoption("conformance_json")
    if path:
        write_collection(session.items, path)


def _impls() -> list[object]:
    return [
        pytest.param("py", id="py"),
        pytest.param(
            "c",
            id="c",
            marks=[
                pytest.mark.c_extension,
                pytest.mark.skipif(NO_EXTENSIONS, reason="SOCKS6FAST_NO_EXTENSIONS=1 run"),
            ],
        ),
    ]


@pytest.fixture(params=_impls())
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """The codec twin under test: ``socks6fast.proto._codec_py`` or ``socks6fast.proto._codec_c``."""
    return importlib.import_module(f"socks6fast.proto._codec_{request.param}")


@pytest.fixture(
    params=[
        pytest.param(
            "mmsg",
            marks=[
                pytest.mark.c_extension,
                pytest.mark.skipif(not UDP_ENGINE_AVAILABLE, reason="native UDP engine not available"),
            ],
        ),
        pytest.param("python"),
    ]
)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server's UDP engine: the native recvmmsg/sendmmsg one, or its Python twin."""
    if request.param == "python":
        monkeypatch.setattr(server_udp, "UdpEngine", UdpEnginePy)
        monkeypatch.setattr(server_udp, "UDP_PATH", "python")
    else:
        assert UdpEngineC is not None
        monkeypatch.setattr(server_udp, "UdpEngine", UdpEngineC)
        monkeypatch.setattr(server_udp, "UDP_PATH", "mmsg")
    return str(request.param)
