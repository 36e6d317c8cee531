"""Barriers over a real TCPStore on 127.0.0.1 (not mocked): what they record, call after call.

A peer that never arrives, a store nobody runs and where the stores listen are
fault tests: ``tests/faults/test_barrier_faults.py``.
"""

from __future__ import annotations

import pytest
from dist_util import in_threads, store_barriers, store_count, tcp_barriers

pytestmark = pytest.mark.timeout(60)


# -- TCPStoreBarrier: the reference behaviour, on a real store ---------------------------


def test_tcpstore_barrier_records_sequence_numbers_per_call() -> None:
    world, prefix = 2, "ckpt_barrier"
    barriers = tcp_barriers(world, prefix, timeout_s=20)
    store = barriers[0].store
    for seq in range(3):
        in_threads([b.execute_barrier for b in barriers])
        for rank in range(world):
            # Every rank records, under rank<N>, the sequence number of the barrier it reached.
            assert store.get(f"rank{rank}") == str(seq).encode()
        # The elastic barrier of call `seq` ran under the key prefix `<prefix><seq>`, with every rank.
        assert store_count(store, f"{prefix}{seq}/num_members") == world
    assert not store.check([f"{prefix}3/num_members"])
    assert [b._tcp_store_barrier_seq[prefix] for b in barriers] == [3, 3]


def test_tcpstore_barrier_sequence_numbers_are_per_prefix() -> None:
    world = 2
    barriers = tcp_barriers(world, "a", timeout_s=20)
    store = barriers[0].store
    in_threads([b.execute_barrier for b in barriers])
    in_threads([b.execute_barrier for b in barriers])
    for b in barriers:  # the same barriers, now under another prefix: it counts from 0
        b._barrier_prefix = "b"
    in_threads([b.execute_barrier for b in barriers])
    assert store.get("rank0") == b"0" and store.get("rank1") == b"0"
    assert store_count(store, "a0/num_members") == world and store_count(store, "a1/num_members") == world
    assert store_count(store, "b0/num_members") == world
    assert not store.check(["b1/num_members"])
    assert dict(barriers[0]._tcp_store_barrier_seq) == {"a": 2, "b": 1}


@pytest.mark.parametrize("libuv", [True, False])
def test_tcpstore_barrier_serves_its_store_with_the_backend_asked_for(libuv: bool) -> None:
    barriers = tcp_barriers(2, "uv", timeout_s=20, libuv=libuv)
    assert barriers[0].store.libuvBackend is libuv  # rank 0 hosts the store
    for _ in range(2):
        in_threads([b.execute_barrier for b in barriers])
    assert store_count(barriers[0].store, "uv1/num_members") == 2

# -- StoreBarrier: joins a store someone else runs -----------------------------------------


def test_store_barrier_counts_every_rank_once_per_call() -> None:
    world = 3
    _server, barriers = store_barriers(world, timeout_s=20)
    store = barriers[0].store  # the shared store, seen through the barrier's key prefix
    for seq in range(3):
        in_threads([b.execute_barrier for b in barriers])
        # One generation of keys per call, every rank counted once.
        assert store_count(store, f"barrier/{seq}/count") == world
        for rank in range(world):
            assert store_count(store, f"barrier/{seq}/arrived/{rank}") == 1
    assert not store.check(["barrier/3/count"])
