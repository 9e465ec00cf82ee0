"""Association IDs steered to UDP engine workers (D32, probe 19 F2): `AssociationTable`.

The UDP engines house an association in worker ``ID[7] % workers`` and a DTLS connection in
one worker, so the proxy draws the IDs of one client address for one worker: then one DTLS
connection can carry all of that client's associations (UDP-03). Pure Python, no codec:
runs once (skipped in the ``SOCKS6FAST_NO_EXTENSIONS=1`` run).
"""

from __future__ import annotations

from collections import Counter

import pytest

from socks6fast._extensions import NO_EXTENSIONS
from socks6fast.proto.associations import AssociationTable

pytestmark = pytest.mark.skipif(NO_EXTENSIONS, reason="codec-independent: runs in the compiled run only")


@pytest.mark.conformance("UDP-01", "UDP-03")
@pytest.mark.parametrize("workers", [2, 3, 64])
def test_one_client_address_gets_ids_of_one_worker(workers: int) -> None:
    """Every ID of one client address (IPv4, IPv6 per /64, IPv4-mapped as IPv4) has the
    same ``ID[7] % workers``; IDs stay unique among live associations (UDP-01)."""
    table = AssociationTable(workers=workers)
    for client, same in (
        ("192.0.2.7", "::ffff:192.0.2.7"),
        ("2001:db8:1:2::10", "2001:db8:1:2:aaaa::99"),
    ):
        ids = [table.open(client, None) for _ in range(50)] + [table.open(same, None) for _ in range(50)]
        assert len({i[7] % workers for i in ids}) == 1
        assert len(set(ids)) == 100 and all(len(i) == 8 for i in ids)
    # Addresses spread over the workers (a keyed hash: which ones share is not fixed).
    shards = {table.shard(f"198.51.{n // 256}.{n % 256}") for n in range(2000)}
    assert shards == set(range(workers))


def test_steered_ids_keep_their_randomness() -> None:
    """The last byte is uniform among the values of the client's residue and the other 7
    bytes are untouched (D18/D32): with 3 workers a residue has 85 or 86 values, each
    drawn about equally often; one worker changes nothing."""
    table = AssociationTable(workers=3)
    shard = table.shard("203.0.113.5")
    counts = Counter(table.new_id("203.0.113.5")[7] for _ in range(20000))
    allowed = {b for b in range(256) if b % 3 == shard}
    assert set(counts) == allowed
    expected = 20000 / len(allowed)
    assert all(0.6 * expected < n < 1.4 * expected for n in counts.values())
    firsts = Counter(table.new_id("203.0.113.5")[0] for _ in range(20000))
    assert len(firsts) == 256
    single = AssociationTable()
    assert len({single.new_id("203.0.113.5")[7] for _ in range(4000)}) == 256


@pytest.mark.conformance("UDP-03")
@pytest.mark.parametrize(("processes", "threads"), [(2, 1), (2, 2), (3, 2), (4, 4)])
def test_worker_process_steering_keeps_the_client_shard(processes: int, threads: int) -> None:
    """`serve --workers N` (D34) and the per-client shard (D32) both live in ID[7]: worker
    process w's IDs land on one of its own sockets of the UDP port's group
    (``ID[7] % (N * threads) == w * threads + t``) and ``t`` is still the client's shard, so a
    DTLS connection carries all of a client's associations inside one worker (UDP-03)."""
    from socks6fast.net.reuseport import WorkerSockets  # noqa: PLC0415 - Linux-only module

    for index in range(processes):
        table = AssociationTable(workers=threads)
        table.id_last_byte = WorkerSockets(index, processes, threads).id_last_byte
        for client in ("127.0.0.1", "127.0.0.9", "::1", "10.1.2.3"):
            shard = table.shard(client)
            for _ in range(64):
                last = table.open(client, None)[7]
                assert last % (processes * threads) == index * threads + shard, (client, last)
