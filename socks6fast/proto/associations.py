"""The proxy's live UDP associations, sans I/O: their IDs, the per-client and per-user limits,
and the ports Port Parity reserved (draft-11 "UDP ASSOCIATE", "Port Parity options").

Strategy: one `AssociationTable` per server, in the `ServerContext` every connection
consults. A UDP ASSOCIATE takes a slot with `AssociationTable.open` before any socket is
opened (so a client over its limit costs no descriptor) and gives it back with
`AssociationTable.close` when its connection ends, whatever way it ends. The ID is 8 bytes
from ``secrets`` (D18: a cryptographic source), drawn again in the unlikely case it names a
live association (UDP-01: IDs are unique among live associations; the data plane keys its
table by them).

Worker steering (D32): the UDP engine houses an association in worker ``ID[7] % workers``,
and a DTLS channel lives in one worker, so the associations one DTLS connection carries
must share a worker. With ``workers`` above 1 the last ID byte is drawn among the values
whose residue is the client address's shard (a keyed hash of the address, IPv6 per /64),
so every association of one client address lands on one worker; the other 7 bytes and
the quotient stay uniformly random.

Port Parity (STK-08): an association that asked for a parity with "reserve" keeps the
counterpart port bound (the adapter's handle: a bound UDP socket) until it ends, or until a
later UDP ASSOCIATE names that port explicitly; when the original association is part of a
session, only a request from that session may claim it. The table keeps the handle and who
may claim it; the adapter owns the socket and closes it when the reservation is dropped.

Pure: standard library only; no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .sessions import Session

__all__ = ["AssociationTable", "Reservation"]


@dataclass(slots=True)
class Reservation:
    """A counterpart port held for Port Parity (STK-08)."""

    family: int
    """4 or 6."""
    port: int
    """The reserved port."""
    handle: object
    """The adapter's bound socket that holds the port."""
    owner: bytes
    """The association that reserved it."""
    session: Session | None
    """The owner's session: only a request of this session may claim the port; None: any."""


class AssociationTable:
    """Live association IDs, the limits, and the Port Parity reservations of one server.

    Args:
        max_per_client: live associations one client address may hold (0: no limit).
        max_per_user: live associations one authenticated user may hold (0: no limit).
    """

    __slots__ = (
        "_by_client",
        "_by_user",
        "_live",
        "_reservations",
        "_shard_key",
        "id_last_byte",
        "max_per_client",
        "max_per_user",
        "workers",
    )

    def __init__(self, max_per_client: int = 0, max_per_user: int = 0, workers: int = 1) -> None:
        self.max_per_client = max_per_client
        self.max_per_user = max_per_user
        self.workers = workers
        """The UDP engine's workers (``UdpEngine.workers``): IDs are steered among them (D32)."""
        self._shard_key = secrets.token_bytes(16)
        self._live: dict[bytes, tuple[str, str | None]] = {}
        self._by_client: Counter[str] = Counter()
        self._by_user: Counter[str] = Counter()
        self._reservations: dict[tuple[int, int], Reservation] = {}
        self.id_last_byte: Callable[[int], int] | None = None
        """With ``serve --workers N`` (D34): maps a random byte to the last byte of a new ID so
        that the UDP port's BPF steering brings its datagrams to this worker process."""

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, association_id: object) -> bool:
        return association_id in self._live

    def refusal(self, client_ip: str, user: str | None) -> str | None:
        """Why a new association for this client would be over a limit, or None."""
        if self.max_per_client and self._by_client[client_ip] >= self.max_per_client:
            limit = self.max_per_client
            return f"client {client_ip} holds {limit} UDP associations (udp.max_associations_per_client)"
        if user is not None and self.max_per_user and self._by_user[user] >= self.max_per_user:
            limit = self.max_per_user
            return f"user {user!r} holds {limit} UDP associations (udp.max_associations_per_user)"
        return None

    def shard(self, client_ip: str) -> int:
        """The engine worker (0..workers-1) that houses this client address's associations (D32)."""
        workers = self.workers
        if workers <= 1:
            return 0
        try:
            address = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            key = client_ip.encode()
        else:
            if isinstance(address, ipaddress.IPv6Address):
                mapped = address.ipv4_mapped
                # One host per /64 (a client's temporary addresses change inside it).
                key = mapped.packed if mapped is not None else address.packed[:8]
            else:
                key = address.packed
        # Keyed: which addresses share a worker is not predictable from outside.
        digest = hashlib.blake2b(key, digest_size=8, key=self._shard_key).digest()
        return int.from_bytes(digest, "big") % workers

    def new_id(self, client_ip: str) -> bytes:
        """A fresh ID from ``secrets`` (D18) whose last byte is the client's shard modulo
        ``workers`` (D32): uniform among the byte values with that residue."""
        workers = self.workers
        if workers <= 1:
            return secrets.token_bytes(8)
        shard = self.shard(client_ip)
        choices = (256 - shard + workers - 1) // workers  # shard, shard + workers, ... below 256
        return secrets.token_bytes(7) + bytes((shard + workers * secrets.randbelow(choices),))

    def open(self, client_ip: str, user: str | None) -> bytes:
        """Take a slot: a fresh random 8-byte ID, unique among live associations (D18),
        steered to the client's engine worker (D32) and, under ``serve --workers``, to this
        worker process's sockets (D34)."""
        association_id = self._new_id(client_ip)
        while association_id in self._live:  # pragma: no cover - at most 2**-58 per live association
            association_id = self._new_id(client_ip)
        self._live[association_id] = (client_ip, user)
        self._by_client[client_ip] += 1
        if user is not None:
            self._by_user[user] += 1
        return association_id

    def _new_id(self, client_ip: str) -> bytes:
        association_id = self.new_id(client_ip)
        if self.id_last_byte is not None:
            # 7 random bytes and one chosen among 256 / (workers * threads) values: still
            # unguessable (D18), the owner picks it only to route the datagrams (D34). It keeps
            # the byte's residue modulo the engine threads, so the D32 shard holds as well.
            association_id = association_id[:7] + bytes((self.id_last_byte(association_id[7]),))
        return association_id

    def close(self, association_id: bytes) -> list[Reservation]:
        """Give the slot back; returns the reservations it still held (the adapter closes
        their handles: STK-08, "until the original association ends")."""
        entry = self._live.pop(association_id, None)
        if entry is not None:
            client_ip, user = entry
            self._by_client[client_ip] -= 1
            if self._by_client[client_ip] <= 0:
                del self._by_client[client_ip]
            if user is not None:
                self._by_user[user] -= 1
                if self._by_user[user] <= 0:
                    del self._by_user[user]
        ended = [r for r in self._reservations.values() if r.owner == association_id]
        for reservation in ended:
            del self._reservations[(reservation.family, reservation.port)]
        return ended

    def reserve(self, reservation: Reservation) -> None:
        """Hold a counterpart port for its owner (STK-08)."""
        self._reservations[(reservation.family, reservation.port)] = reservation

    def reservation(self, family: int, port: int) -> Reservation | None:
        """The reservation of ``port`` in ``family`` (4 or 6), or None."""
        return self._reservations.get((family, port))

    def claim(self, reservation: Reservation) -> None:
        """An explicit request took the reserved port over: it is no longer reserved."""
        self._reservations.pop((reservation.family, reservation.port), None)

    def clear(self) -> list[Reservation]:
        """Drop every reservation (shutdown); returns them for their handles to be closed."""
        every = list(self._reservations.values())
        self._reservations.clear()
        return every
