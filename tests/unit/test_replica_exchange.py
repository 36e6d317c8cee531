"""The replica exchange of a deduplicating save: one small round when every rank holds the same state."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch.distributed as dist

from torchckpt.replicas import OtherRankFailed, ReplicaExchange

pytestmark = pytest.mark.timeout(60)


class RecordingStore:
    """A ``HashStore`` that records the keys set and the bytes of their values."""

    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.sets: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.sets.append((key, len(value)))
        self.store.set(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _run(lists: list[list[list[Any]] | None], errors: list[BaseException | None]) -> tuple[list[Any], RecordingStore]:
    store = RecordingStore()
    out: list[Any] = [None] * len(lists)

    def rank(r: int) -> None:
        ex = ReplicaExchange(store, prefix="t/0", rank=r, world_size=len(lists), timeout_s=20)
        try:
            out[r] = ex.agree(lists[r], errors[r])
        except OtherRankFailed as e:
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(lists))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out, store


def _digests(n: int, crc: int = 7) -> list[list[Any]]:
    return [[f"k{i}", "float32", [4], crc + i] for i in range(n)]


def test_identical_ranks_agree_in_one_round_of_small_values() -> None:
    out, store = _run([_digests(1000)] * 4, [None] * 4)
    assert out == [[f"k{i}" for i in range(1000)]] * 4
    published = [(k, n) for k, n in store.sets if not k.endswith("agreed")]
    assert all("/summary/" in k for k, _ in published) and len(published) == 4
    assert max(n for _, n in published) < 100  # a digest, not the list of 1,000 keys


def test_a_rank_that_differs_takes_a_second_round_and_its_keys_are_kept_apart() -> None:
    lists = [_digests(10) for _ in range(3)]
    lists[2] = [*lists[2][:4], ["k4", "float32", [4], 999], *lists[2][5:]]  # k4 differs on rank 2
    out, store = _run(lists, [None] * 3)
    expected = [f"k{i}" for i in range(10) if i != 4]
    assert out == [expected] * 3
    assert any("/full/" in k for k, _ in store.sets)


def test_a_failed_rank_is_heard_by_every_rank_without_waiting_for_a_timeout() -> None:
    out, _ = _run([_digests(5), None, _digests(5)], [None, RuntimeError("disk full"), None])
    assert all(isinstance(o, OtherRankFailed) and "[1]" in str(o) for o in out), out
