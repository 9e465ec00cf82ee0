"""Run inside a network namespace of our own, with only ``lo`` (up): fuzzed bytes include
destination addresses, and the rule (BRIEF "Network safety") is that nothing fuzzed can
ever leave the machine. Every target runs so, even those that open no socket."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import sys
from typing import NoReturn

#: Set in the environment of the process re-executed under ``unshare``, to stop a loop.
MARKER = "SOCKS6FAST_FUZZ_NETNS"
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def interfaces() -> list[str]:
    """Names of the network interfaces of this process's namespace."""
    return sorted(name for _, name in socket.if_nameindex())


def isolated() -> bool:
    """True when the only interface is the loopback: no route can leave the machine."""
    return interfaces() == ["lo"]


def loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))


def ensure(argv: list[str]) -> None:
    """Return only inside an isolated namespace with ``lo`` up; else re-exec ``argv`` in one.

    Root gets ``unshare -n``; another user ``unshare -rn`` (a user namespace maps them to
    root inside). Exits 2 with one sentence when no namespace can be made.
    """
    if isolated():
        loopback_up()
        return
    if os.environ.get(MARKER):
        die(f"still not isolated inside unshare (interfaces: {', '.join(interfaces())}); refusing to run")
    unshare = shutil.which("unshare")
    if unshare is None:
        die("`unshare` (util-linux) is needed to run a target inside its own network namespace")
    flags = "-n" if os.geteuid() == 0 else "-rn"
    env = dict(os.environ, **{MARKER: "1"})
    try:
        os.execve(unshare, [unshare, flags, "--", sys.executable, *argv], env)
    except OSError as exc:  # pragma: no cover - exec itself failed
        die(f"cannot run unshare: {exc}")


def die(sentence: str) -> NoReturn:
    """One sentence on stderr, exit status 2 (a usage or set-up problem, not a finding)."""
    print(f"fuzz: {sentence}", file=sys.stderr)
    sys.exit(2)
