"""Barriers over a real TCPStore on 127.0.0.1 (not mocked), and where the stores listen."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
from dist_util import free_port, tcp_listeners

from torchckpt.barriers import StoreBarrier, TCPStoreBarrier
from torchckpt.builder import start_store
from torchckpt.errors import BarrierTimeoutError

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


def _in_threads(fns: list[Callable[[], Any]], timeout_s: float = 30) -> list[Any]:
    """Run each function in its own thread; return results in order; re-raise the first error."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a barrier thread hung"
    for e in errors:
        if e is not None:
            raise e
    return results


def _tcp_barriers(world: int, prefix: str, timeout_s: float, port: int | None = None) -> list[TCPStoreBarrier]:
    port = port or free_port()

    def make(rank: int) -> Callable[[], TCPStoreBarrier]:
        return lambda: TCPStoreBarrier(
            global_rank=rank,
            global_world_size=world,
            barrier_prefix=prefix,
            timeout_barrier_init_secs=20,
            use_checkpoint_barrier_tcpstore_libuv=True,
            tcpstore_port=port,
            master_address=HOST,
            timeout_secs=timeout_s,
        )

    return _in_threads([make(r) for r in range(world)])


def _count(store: Any, key: str) -> int:
    """The value of a counter key, without changing it (0 when absent)."""
    return int(store.add(key, 0))


# -- TCPStoreBarrier: the reference behaviour, on a real store ---------------------------


def test_tcpstore_barrier_records_sequence_numbers_per_call() -> None:
    world, prefix = 2, "ckpt_barrier"
    barriers = _tcp_barriers(world, prefix, timeout_s=20)
    store = barriers[0].store
    for seq in range(3):
        _in_threads([b.execute_barrier for b in barriers])
        for rank in range(world):
            # Every rank records, under rank<N>, the sequence number of the barrier it reached.
            assert store.get(f"rank{rank}") == str(seq).encode()
        # The elastic barrier of call `seq` ran under the key prefix `<prefix><seq>`, with every rank.
        assert _count(store, f"{prefix}{seq}/num_members") == world
    assert not store.check([f"{prefix}3/num_members"])
    assert [b._tcp_store_barrier_seq[prefix] for b in barriers] == [3, 3]


def test_tcpstore_barrier_sequence_numbers_are_per_prefix() -> None:
    world = 2
    barriers = _tcp_barriers(world, "a", timeout_s=20)
    store = barriers[0].store
    _in_threads([b.execute_barrier for b in barriers])
    _in_threads([b.execute_barrier for b in barriers])
    for b in barriers:  # the same barriers, now under another prefix: it counts from 0
        b._barrier_prefix = "b"
    _in_threads([b.execute_barrier for b in barriers])
    assert store.get("rank0") == b"0" and store.get("rank1") == b"0"
    assert _count(store, "a0/num_members") == world and _count(store, "a1/num_members") == world
    assert _count(store, "b0/num_members") == world
    assert not store.check(["b1/num_members"])
    assert dict(barriers[0]._tcp_store_barrier_seq) == {"a": 2, "b": 1}


def test_tcpstore_barrier_timeout_is_enforced_and_names_the_missing_rank() -> None:
    timeout_s = 2
    barriers = _tcp_barriers(2, "t", timeout_s=timeout_s)  # rank 1 connects, then never arrives
    started = time.monotonic()
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[0].execute_barrier()
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert info.value.missing_ranks == [1]
    assert "[1]" in str(info.value) and "rank 0" in str(info.value)
    assert timeout_s * 0.9 <= elapsed < timeout_s + 3, elapsed


def test_tcpstore_barrier_an_earlier_arrival_does_not_open_a_later_barrier() -> None:
    barriers = _tcp_barriers(2, "s", timeout_s=1)
    _in_threads([b.execute_barrier for b in barriers])
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[0].execute_barrier()  # rank 1 came to the first barrier only
    assert info.value.missing_ranks == [1]


# -- StoreBarrier: joins a store someone else runs -----------------------------------------


def _store_barriers(world: int, timeout_s: float) -> tuple[Any, list[StoreBarrier]]:
    server = start_store(HOST, world)

    def make(rank: int) -> Callable[[], StoreBarrier]:
        return lambda: StoreBarrier(
            global_rank=rank, global_world_size=world, master_address=HOST, port=server.port, timeout_secs=timeout_s
        )

    return server, _in_threads([make(r) for r in range(world)])


def test_store_barrier_counts_every_rank_once_per_call() -> None:
    world = 3
    _server, barriers = _store_barriers(world, timeout_s=20)
    store = barriers[0].store  # the shared store, seen through the barrier's key prefix
    for seq in range(3):
        _in_threads([b.execute_barrier for b in barriers])
        # One generation of keys per call, every rank counted once.
        assert _count(store, f"barrier/{seq}/count") == world
        for rank in range(world):
            assert _count(store, f"barrier/{seq}/arrived/{rank}") == 1
    assert not store.check(["barrier/3/count"])


def test_store_barrier_timeout_is_enforced_and_names_the_missing_ranks() -> None:
    timeout_s = 2
    _server, barriers = _store_barriers(3, timeout_s=timeout_s)
    started = time.monotonic()
    with pytest.raises(BarrierTimeoutError) as info:
        _in_threads([barriers[0].execute_barrier, barriers[2].execute_barrier])  # rank 1 never arrives
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert info.value.missing_ranks == [1]
    assert timeout_s * 0.9 <= elapsed < timeout_s + 3, elapsed


def test_store_barrier_an_earlier_arrival_does_not_open_a_later_barrier() -> None:
    _server, barriers = _store_barriers(2, timeout_s=1)
    _in_threads([b.execute_barrier for b in barriers])
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[1].execute_barrier()
    assert info.value.missing_ranks == [0]


def test_store_barrier_to_a_store_nobody_runs_fails_in_bounded_time() -> None:
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - torch's connect error; what matters is that it ends
        StoreBarrier(global_rank=1, global_world_size=2, master_address=HOST, port=free_port(), timeout_secs=1)
    assert time.monotonic() - started < 1 + 5


# -- where the stores torchckpt starts listen ---------------------------------------------------


def test_start_store_listens_on_the_given_address_only() -> None:
    store = start_store(HOST, 1)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert tcp_listeners(store.port) == ["127.0.0.1"]


def test_tcpstore_barrier_host_listens_on_master_address_only() -> None:
    port = free_port()
    barriers = _tcp_barriers(2, "l", timeout_s=10, port=port)
    assert tcp_listeners(port) == ["127.0.0.1"]
    _in_threads([b.execute_barrier for b in barriers])


def test_tcp_listeners_sees_a_wildcard_listener() -> None:
    """The check above would see a store listening on every interface (how torch's own TCPStore listens)."""
    port = free_port()
    store = dist.TCPStore(HOST, port, world_size=1, is_master=True, timeout=timedelta(seconds=10))
    try:
        addresses = tcp_listeners(port)
        assert addresses and set(addresses) <= {"0.0.0.0", "::"}, addresses
    finally:
        del store
