"""Connecting to a destination: resolving, Happy Eyeballs, one attempt per address.

Strategy: the core says what to dial (`socks6fast.proto.actions.Dial`: the addresses, the
options, TFO, Happy Eyeballs or not, the deadline); this module only does it. An attempt
creates the socket with the proxy-remote leg's options set before ``connect`` (so the SYN
carries them), optionally with ``TCP_FASTOPEN_CONNECT`` and the payload in the SYN, and reads
back what the kernel really uses. With Happy Eyeballs (RFC 8305) the addresses are
interleaved by family and attempts start 250 ms apart or as soon as the previous one failed;
the first connected socket wins and the others are closed. Without it they are tried one after
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ...constants import AddressType
from ...net.stackopts import (
    apply_leg_options,
    enable_tfo_connect,
    mptcp_in_use,
    new_stream_socket,
    tfo_syn_data_acked,
)
from ...proto.actions import Dial, Dialed, Target
from ...proto.stack import AppliedLeg

__all__ = ["HAPPY_EYEBALLS_DELAY", "Remote", "Resolver", "dial", "resolve"]

#: RFC 8305 section 5: "a recommended value" of 250 ms between connection attempts.
HAPPY_EYEBALLS_DELAY = 0.25

Resolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]
"""A name resolver for CONNECT destinations: (host, port) -> [(family, sockaddr), ...]."""


@dataclass(slots=True)
class Remote:
    """A connected remote leg (CONNECT) or an accepted one (BIND)."""

    sock: socket.socket
    address: tuple[str, int]
    """The address connected to (no getpeername needed)."""
    applied: AppliedLeg | None = None
    """Its IP options as read back, when some were asked for."""
    mptcp: bool = False
    """It runs MPTCP."""
    happy_eyeballs: bool = False
    """Happy Eyeballs was attempted (STK-04)."""
    tfo_attempted: bool = False
    """``TCP_FASTOPEN_CONNECT`` was set (CMD-02, STK-06)."""
    syn_sent: int = 0
    """Bytes of the payload the socket took during connect (TFO)."""
    tfo_syn_acked: bool = False
    """The remote host acknowledged data in our SYN."""

    def dialed(self) -> Dialed:
        """What the core needs to know about it (`ServerConnection.dial_finished`)."""
        name = self.sock.getsockname()
        return Dialed(
            local=(str(name[0]), int(name[1])),
            applied=self.applied,
            mptcp=self.mptcp,
            syn_sent=self.syn_sent,
            syn_data_acked=self.tfo_syn_acked,
        )


async def resolve(
    loop: asyncio.AbstractEventLoop, resolver: Resolver | None, host: str, port: int
) -> list[Target]:
    """Resolve a destination name: ``resolver`` when given, else ``loop.getaddrinfo``.

    Raises:
        socket.gaierror: the name does not resolve.
        UnicodeError: the idna codec rejects the name (a label over 63 bytes, an empty label),
            before any lookup.
    """
    if resolver is not None:
        return list(await resolver(host, port))
    targets: list[Target] = []
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in targets:
            targets.append((family, sockaddr))
    return targets


async def dial(loop: asyncio.AbstractEventLoop, action: Dial) -> Remote:
    """Connect as ``action`` says.

    Raises:
        OSError: every attempt failed (the last error).
        TimeoutError: the deadline passed.
    """
    if not action.targets:
        # One address, nothing resolved: the deadline is a timer on the wait for the
        # handshake itself (no timeout scope around the call).
        family = socket.AF_INET6 if action.address_type == AddressType.IPV6 else socket.AF_INET
        remote = await _attempt(loop, family, (action.host, action.port), action, action.deadline)
    else:
        async with asyncio.timeout_at(action.deadline):
            targets = _interleave(action.targets) if action.happy_eyeballs else action.targets
            attempts = [_bind_attempt(loop, family, sockaddr, action) for family, sockaddr in targets]
            if action.happy_eyeballs:
                remote = await _happy_eyeballs(loop, attempts, HAPPY_EYEBALLS_DELAY)
            else:
                remote = await _one_by_one(attempts)
    remote.happy_eyeballs = action.happy_eyeballs
    remote.tfo_syn_acked = remote.tfo_attempted and tfo_syn_data_acked(remote.sock)
    return remote


async def _attempt(
    loop: asyncio.AbstractEventLoop,
    family: int,
    sockaddr: tuple[Any, ...],
    action: Dial,
    deadline: float | None = None,
) -> Remote:
    sock, is_mptcp = new_stream_socket(family, action.multipath)
    try:
        # Set before connect() so that the SYN already carries them (STK-03, STK-05).
        applied = None if action.options.empty else apply_leg_options(sock, action.options)
        # try/except rather than contextlib.suppress here: this runs on every CONNECT, and a
        # suppress() scope is three Python calls (issue 13 item 3).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sent = 0
        tfo = bool(action.tfo_payload) and enable_tfo_connect(sock)
        # connect() by hand rather than loop.sock_connect(): the latter re-resolves the
        # address with the socket's protocol, which getaddrinfo refuses for MPTCP (262).
        try:
            # With TCP_FASTOPEN_CONNECT and a cached cookie this sends nothing yet; without
            # a cookie it starts a normal handshake (EINPROGRESS).
            sock.connect(sockaddr)
        except (BlockingIOError, InterruptedError):
            pass
        if tfo:
            # CMD-02 / STK-06: only with a TFO option: the first send() rides in the SYN.
            with contextlib.suppress(BlockingIOError):
                sent = sock.send(action.tfo_payload)
        if not _connected_now(sock):
            await _wait_writable(loop, sock, deadline)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        return Remote(
            sock=sock,
            address=(str(sockaddr[0]), int(sockaddr[1])),
            applied=applied,
            mptcp=is_mptcp and mptcp_in_use(sock),
            tfo_attempted=tfo,
            syn_sent=sent,
        )
    except BaseException:
        sock.close()
        raise


_Attempt = Callable[[], Coroutine[Any, Any, Remote]]
"""One connection attempt to one resolved address, not started yet."""


def _bind_attempt(
    loop: asyncio.AbstractEventLoop, family: int, sockaddr: tuple[Any, ...], action: Dial
) -> _Attempt:
    return lambda: _attempt(loop, family, sockaddr, action)


def _interleave(targets: tuple[Target, ...]) -> list[Target]:
    """RFC 8305 section 4: alternate address families, starting with the first one returned."""
    by_family: dict[int, list[Target]] = {}
    for target in targets:
        by_family.setdefault(target[0], []).append(target)
    queues = list(by_family.values())
    out: list[Target] = []
    while queues:
        for queue in list(queues):
            out.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return out


async def _one_by_one(attempts: list[_Attempt]) -> Remote:
    last: BaseException | None = None
    for attempt in attempts:
        try:
            return await attempt()
        except OSError as exc:
            last = exc
    raise last if last is not None else OSError(errno.EHOSTUNREACH, "no address to connect to")


async def _happy_eyeballs(loop: asyncio.AbstractEventLoop, attempts: list[_Attempt], delay: float) -> Remote:
    """RFC 8305 section 5: start one attempt, then the next after ``delay`` or as soon as
    the previous one failed; the first connection wins and every other one is closed."""
    pending: set[asyncio.Task[Remote]] = set()
    errors: list[BaseException] = []
    winner: Remote | None = None
    index = 0
    try:
        while winner is None:
            if index < len(attempts):
                pending.add(loop.create_task(attempts[index]()))
                index += 1
            if not pending:
                break
            timeout = delay if index < len(attempts) else None
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result().sock.close()  # a simultaneous second winner
    finally:
        for task in pending:
            task.cancel()
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, Remote):
                result.sock.close()
    if winner is not None:
        return winner
    raise errors[-1] if errors else OSError(errno.EHOSTUNREACH, "no address to connect to")


def _connected_now(sock: socket.socket) -> bool:
    """True when a connect in progress has already succeeded.

    On loopback and nearby hosts the handshake is often over by the time connect()
    returns: one getpeername() then replaces a writer registered with the event loop and
    removed again (several epoll_ctl calls on uvloop), and the poll() plus SO_ERROR read
    that told the same before (issue 13 item 3: one syscall instead of two). Linux answers
    getpeername() with ENOTCONN while the SYN is out (SYN_SENT) and after a failed connect
    (CLOSE), so success means established, with no error pending; False sends the caller
    to the wait and the SO_ERROR check, which report a failure (CMD-01) as before.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


async def _wait_writable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float | None = None
) -> None:
    """Wait until ``sock`` is writable (a connect finished); TimeoutError at ``deadline``."""
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, future, None)
    timer = None
    if deadline is not None:
        timer = loop.call_at(deadline, _settle, future, TimeoutError())
    try:
        await future
    finally:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
