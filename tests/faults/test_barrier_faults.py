"""A barrier whose peer never comes, a store nobody runs, and where the stores torchckpt starts listen.

Standard outcome: the wait ends at the configured timeout (not later, not much
earlier) with a ``BarrierTimeoutError`` naming the ranks that did not arrive;
stores listen on the address they were given, never on every interface.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
from dist_util import free_port, in_threads, launch, store_barriers, tcp_barriers, tcp_listeners, values

from torchckpt.barriers import DistBarrier, StoreBarrier
from torchckpt.stores import start_store
from torchckpt.errors import BarrierTimeoutError

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


# -- a peer that never comes ------------------------------------------------------------------


def test_tcpstore_barrier_timeout_is_enforced_and_names_the_missing_rank() -> None:
    timeout_s = 2
    barriers = tcp_barriers(2, "t", timeout_s=timeout_s)  # rank 1 connects, then never arrives
    started = time.monotonic()
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[0].execute_barrier()
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert info.value.missing_ranks == [1]
    assert "[1]" in str(info.value) and "rank 0" in str(info.value)
    assert timeout_s * 0.9 <= elapsed < timeout_s + 3, elapsed


def test_tcpstore_barrier_an_earlier_arrival_does_not_open_a_later_barrier() -> None:
    barriers = tcp_barriers(2, "s", timeout_s=1)
    in_threads([b.execute_barrier for b in barriers])
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[0].execute_barrier()  # rank 1 came to the first barrier only
    assert info.value.missing_ranks == [1]


def test_store_barrier_timeout_is_enforced_and_names_the_missing_ranks() -> None:
    timeout_s = 2
    _server, barriers = store_barriers(3, timeout_s=timeout_s)
    started = time.monotonic()
    with pytest.raises(BarrierTimeoutError) as info:
        in_threads([barriers[0].execute_barrier, barriers[2].execute_barrier])  # rank 1 never arrives
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert info.value.missing_ranks == [1]
    assert timeout_s * 0.9 <= elapsed < timeout_s + 3, elapsed


def test_store_barrier_an_earlier_arrival_does_not_open_a_later_barrier() -> None:
    _server, barriers = store_barriers(2, timeout_s=1)
    in_threads([b.execute_barrier for b in barriers])
    with pytest.raises(BarrierTimeoutError) as info:
        barriers[1].execute_barrier()
    assert info.value.missing_ranks == [0]


def test_store_barrier_to_a_store_nobody_runs_fails_in_bounded_time() -> None:
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - torch's connect error; what matters is that it ends
        StoreBarrier(global_rank=1, global_world_size=2, master_address=HOST, port=free_port(), timeout_secs=1)
    assert time.monotonic() - started < 1 + 5


#: DistBarrier's timeout in the gloo test below.
DIST_TIMEOUT_S = 3


def _dist_barrier_without_rank_1(rank: int, world: int, done_file: str) -> dict[str, Any]:
    """Rank 0 waits at a DistBarrier that rank 1 never reaches (rank 1 stays alive until rank 0 is done)."""
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(done_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {}
    barrier = DistBarrier(timeout_secs=DIST_TIMEOUT_S)
    started = time.monotonic()
    try:
        barrier.execute_barrier()
    except BarrierTimeoutError as e:
        report = {"type": type(e).__name__, "missing": list(e.missing_ranks), "message": str(e)}
    else:
        report = {"type": None}
    report["elapsed"] = time.monotonic() - started
    open(done_file, "w").close()
    return report


@pytest.mark.timeout(180)
def test_dist_barrier_peer_never_comes(tmp_path) -> None:
    """DistBarrier over a gloo process group: rank 0 gives up at the timeout, naming rank 1."""
    reports = values(launch(_dist_barrier_without_rank_1, 2, str(tmp_path / "done")))
    r0 = reports[0]
    assert r0["type"] == "BarrierTimeoutError", r0
    assert r0["missing"] == [1], r0
    assert "1" in r0["message"], r0["message"]
    assert DIST_TIMEOUT_S * 0.9 <= r0["elapsed"] < DIST_TIMEOUT_S + 5, r0


# -- where the stores torchckpt starts listen ---------------------------------------------------


def test_start_store_listens_on_the_given_address_only() -> None:
    store = start_store(HOST, 1)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert tcp_listeners(store.port) == ["127.0.0.1"]


def test_tcpstore_barrier_host_listens_on_master_address_only() -> None:
    port = free_port()
    barriers = tcp_barriers(2, "l", timeout_s=10, port=port)
    assert tcp_listeners(port) == ["127.0.0.1"]
    in_threads([b.execute_barrier for b in barriers])


def test_tcp_listeners_sees_a_wildcard_listener() -> None:
    """The check above would see a store listening on every interface (how torch's own TCPStore listens)."""
    port = free_port()
    store = dist.TCPStore(HOST, port, world_size=1, is_master=True, timeout=timedelta(seconds=10))
    try:
        addresses = tcp_listeners(port)
        assert addresses and set(addresses) <= {"0.0.0.0", "::"}, addresses
    finally:
        del store
