"""SO_REUSEPORT groups steered by classic BPF, for ``serve --workers N`` (issue 13 item 1, D34).

A listening port served by N worker processes is one SO_REUSEPORT group of N sockets, all
bound and put in listen state by the supervisor in worker order and kept open by it, so the
group's socket array (the kernel indexes it in the order the sockets joined: ``listen()``
for TCP, ``bind()`` for UDP; a socket that leaves is replaced by the last one) never changes
while the server runs, not even while a dead worker is being restarted (its socket stays in
the group and queues connections for the next worker).

``SO_ATTACH_REUSEPORT_CBPF`` (Linux 4.5) attaches one program to the whole group; its return
value is the index of the socket that gets the packet (an index past the end makes the kernel
fall back to its own hash). The program runs with the packet's data pointing past the
transport header, so the IP header is read at ``SKF_NET_OFF`` (negative offsets, Linux's
``bpf_internal_load_pointer_neg_helper``):

* `source_program`: TCP listeners. ``hash(source address) % workers``: every connection
  from one client address reaches the same worker, so its in-memory sessions and
  idempotence tokens (SES-*, IDM-*) are there. IPv4 reads the 4 address bytes at network
  offset 12, IPv6 the 16 at offset 8 (XOR of the four words); the hash is a multiplicative
  (Fibonacci) one so neighbouring addresses spread.
* `association_program`: the SOCKS 6 UDP port. ``payload[11] % (workers * threads)``: byte
  11 of a datagram is the last byte of its Association ID, and each worker makes its IDs'
  last byte select a socket of its own (`association_id_byte`), so a datagram reaches the
  worker (and the engine thread in it) that owns its association whatever address the
  client sends from (a NAT that changes the UDP source does not matter).

Everything here is Linux-only; `steering_available` says whether the kernel took a program.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass, field

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "WorkerSockets",
    "association_id_byte",
    "association_program",
    "attach",
    "source_program",
    "steering_available",
]

#: asm-generic/socket.h (not in the socket module).
SO_ATTACH_REUSEPORT_CBPF = 51

# linux/filter.h and linux/bpf_common.h
_BPF_LD, _BPF_ALU, _BPF_RET, _BPF_MISC = 0x00, 0x04, 0x06, 0x07
_BPF_W, _BPF_B, _BPF_ABS = 0x00, 0x10, 0x20
_BPF_MUL, _BPF_XOR, _BPF_RSH, _BPF_MOD = 0x20, 0xA0, 0x70, 0x90
_BPF_K, _BPF_X, _BPF_A = 0x00, 0x08, 0x10
_BPF_TAX = 0x00
_SKF_NET_OFF = -0x100000
#: Knuth's multiplicative hash constant (2**32 / golden ratio).
_FIB = 0x9E3779B1

Instruction = tuple[int, int, int, int]


def _ld_net_word(offset: int) -> Instruction:
    return (_BPF_LD | _BPF_W | _BPF_ABS, 0, 0, (_SKF_NET_OFF + offset) & 0xFFFFFFFF)


def source_program(family: int, workers: int) -> list[Instruction]:
    """The TCP listeners' program: ``fib_hash(source address) % workers``."""
    if not 1 <= workers <= 0xFFFF:
        raise ValueError(f"workers must be in 1..65535, got {workers}")
    code: list[Instruction]
    if family == socket.AF_INET:
        code = [_ld_net_word(12)]  # struct iphdr: saddr
    elif family == socket.AF_INET6:
        code = [_ld_net_word(8)]  # struct ipv6hdr: saddr, 4 words
        for offset in (12, 16, 20):
            code.append((_BPF_MISC | _BPF_TAX, 0, 0, 0))
            code.append(_ld_net_word(offset))
            code.append((_BPF_ALU | _BPF_XOR | _BPF_X, 0, 0, 0))
    else:
        raise ValueError(f"not an IP family: {family}")
    code += [
        (_BPF_ALU | _BPF_MUL | _BPF_K, 0, 0, _FIB),
        (_BPF_ALU | _BPF_RSH | _BPF_K, 0, 0, 16),  # the well-mixed high bits
        (_BPF_ALU | _BPF_MOD | _BPF_K, 0, 0, workers),
        (_BPF_RET | _BPF_A, 0, 0, 0),
    ]
    return code


def association_program(sockets: int) -> list[Instruction]:
    """The SOCKS 6 UDP port's program: ``payload[11] % sockets`` (the Association ID's last
    byte; the same program the UDP engine attaches for its threads, over the whole group)."""
    if not 1 <= sockets <= 256:
        raise ValueError(f"sockets must be in 1..256, got {sockets}")
    return [
        (_BPF_LD | _BPF_B | _BPF_ABS, 0, 0, 11),
        (_BPF_ALU | _BPF_MOD | _BPF_K, 0, 0, sockets),
        (_BPF_RET | _BPF_A, 0, 0, 0),
    ]


def association_id_byte(random_byte: int, worker: int, workers: int, threads: int) -> int:
    """The last byte of an Association ID made by ``worker`` (of ``workers``, each with
    ``threads`` UDP engine threads): ``random_byte`` moved to the nearest value whose
    ``% (workers * threads)`` is one of that worker's sockets (``worker * threads + t``),
    keeping ``% threads`` (the engine's thread choice) as it was."""
    group = workers * threads
    base = random_byte - random_byte % group
    value = base + worker * threads + random_byte % threads
    return value - group if value > 0xFF else value


@dataclass(slots=True)
class WorkerSockets:
    """What one worker process of ``serve --workers N`` gets from the supervisor: its
    socket of each listener group and its share of each SOCKS 6 UDP port group."""

    index: int
    """This worker's place in every group (0-based)."""
    count: int
    """Workers in all (the groups' size for TCP)."""
    udp_threads: int
    """UDP engine threads per worker (a UDP port group holds ``count * udp_threads`` sockets)."""
    tcp: dict[tuple[bool, str, int], list[list[socket.socket]]] = field(default_factory=dict)
    """(TLS, host, port) as configured -> per entry of that kind with that value, in order,
    this worker's listening sockets, one per address the host resolved to (a port-0 entry:
    the port the supervisor got)."""
    udp: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    """(bound host, port) of a SOCKS 6 UDP port -> this worker's fds of it, one per UDP
    engine thread, in the group's order."""

    def add_tcp(self, tls: bool, host: str, port: int, socks: list[socket.socket]) -> None:
        """The sockets of the next ``listen`` (``tls_listen``) entry ``host:port``."""
        self.tcp.setdefault((tls, host, port), []).append(socks)

    def take_tcp(self, tls: bool, host: str, port: int) -> list[socket.socket] | None:
        """The sockets of the first entry ``host:port`` not taken yet, or None."""
        entries = self.tcp.get((tls, host, port))
        return entries.pop(0) if entries else None

    def id_last_byte(self, random_byte: int) -> int:
        """`association_id_byte` for this worker (`AssociationTable.id_last_byte`)."""
        return association_id_byte(random_byte, self.index, self.count, self.udp_threads)

    def close(self) -> None:
        """Close what was not taken (a worker that failed to start)."""
        for entries in self.tcp.values():
            for socks in entries:
                for sock in socks:
                    sock.close()
        for fds in self.udp.values():
            for fd in fds:
                socket.close(fd)
        self.tcp.clear()
        self.udp.clear()


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


def attach(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach ``program`` to the SO_REUSEPORT group of ``sock`` (any member: one program per group).

    Raises:
        OSError: the kernel refused it (no CBPF reuseport support, a bad program).
    """
    filters = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: the kernel
    # copies the program during setsockopt, so the ctypes array need only live until then.
    fprog = struct.pack("HP", len(program), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def steering_available() -> str | None:
    """None when this kernel steers SO_REUSEPORT groups with classic BPF, else why not."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(("127.0.0.1", 0))
            probe.listen(1)
            attach(probe, source_program(socket.AF_INET, 2))
    except (OSError, AttributeError) as exc:
        return f"SO_ATTACH_REUSEPORT_CBPF refused: {getattr(exc, 'strerror', None) or exc}"
    return None
