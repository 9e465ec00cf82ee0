"""What the UDP tests share: whether IPv6 loopback works, and the loopback hosts. (The
``engine`` fixture, the server's native UDP engine or its Python twin, is in conftest.py.)"""

from __future__ import annotations

import functools
import socket

import pytest


@functools.cache
def has_ipv6_loopback() -> bool:
    """True when a UDP socket can bind ::1 here (some CI containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


#: 127.0.0.1 and ::1 as test parameters; ::1 skips where IPv6 loopback is missing.
LOOPBACK_HOSTS = [
    pytest.param("127.0.0.1", id="v4"),
    pytest.param(
        "::1", id="v6", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
    ),
]
