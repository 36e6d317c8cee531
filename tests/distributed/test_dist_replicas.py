"""Replicated plain tensors (data parallel) written once; ranks that differ keep their own copies."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from dist_util import launch, rank_entries, values

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import StateDictMismatchError


def replicated() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "s": torch.tensor(2.0)},
        "optim": {"step": torch.tensor(7), "lr": 0.1},
        "empty": torch.zeros(0, 3),
    }


def _writer(dedup: bool, timeout: int = 60) -> Any:
    cfg = tc.CheckpointWriterConfig(format="safetensors", dedup_replicated=dedup, write_barrier_timeout_secs=timeout)
    return tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=cfg))


def save_replicated(rank: int, world: int, root: str, differ: bool) -> None:
    state = replicated()
    if differ:
        state["rng"] = torch.full((4,), float(rank))  # differs between ranks: each rank keeps its own
    if differ and rank == 2:
        state["model"]["b"][0] += 1  # a "replica" that is not one
    ck = _writer(True)
    ck.save(os.path.join(root, "ckpt"), state)
    loaded = ck.load(os.path.join(root, "ckpt"))
    ck.close()
    if differ:
        assert torch.equal(loaded["rng"], torch.full((4,), float(rank)))
    assert torch.equal(loaded["model"]["b"], state["model"]["b"])
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["optim"] == {"step": torch.tensor(7), "lr": 0.1} or torch.equal(loaded["optim"]["step"], torch.tensor(7))


def _state_bytes(state: dict[str, Any]) -> int:
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += _state_bytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.nbytes
    return total


@pytest.mark.timeout(240)
def test_ddp_state_on_four_ranks_is_written_once(tmp_path) -> None:
    launch(save_replicated, 4, str(tmp_path), False)
    entries = rank_entries(str(tmp_path / "ckpt"))
    written = sum(t.nbytes for r in entries for t in r.tensors)
    replicated_bytes = _state_bytes(replicated())
    assert written == replicated_bytes  # 1.0x the state's bytes
    writers = {r.rank for r in entries for s in r.sharded if s.chunks}
    # Each deduplicated tensor is one line of the manifest's global table: its writer, one chunk.
    table = read_manifest(str(tmp_path / "ckpt")).sharded
    assert {g.chunks[0].rank for g in table.values()} == writers and all(len(g.chunks) == 1 for g in table.values())
    assert len(writers) >= 2  # the writes are spread over the ranks
    # The checkpoint loads in one process as it was saved (rank 0's own values).
    # The checkpoint loads on another world size (one process), as any replicated one does.
    loaded = tc.make_sync_checkpointer().load(str(tmp_path / "ckpt"))
    assert torch.equal(loaded["model"]["w"], replicated()["model"]["w"])
    assert torch.equal(loaded["model"]["s"], torch.tensor(2.0))
    assert torch.equal(loaded["optim"]["step"], torch.tensor(7)) and loaded["optim"]["lr"] == 0.1
    assert loaded["empty"].shape == (0, 3)


@pytest.mark.timeout(240)
def test_a_rank_whose_replica_differs_keeps_its_own_copy(tmp_path) -> None:
    launch(save_replicated, 4, str(tmp_path), True)
    entries = rank_entries(str(tmp_path / "ckpt"))
    deduplicated = {s.name for s in entries[0].sharded}
    assert "model.w" in deduplicated and "model.b" not in deduplicated
    for r in range(4):
        names = {t.name for t in entries[r].tensors}
        assert "model.b" in names and "rng" in names
    with pytest.raises(StateDictMismatchError, match="keys that differ: \\['model.b', 'rng'\\]"):
        tc.make_sync_checkpointer().load(str(tmp_path / "ckpt"))
    loaded = tc.make_sync_checkpointer().load(str(tmp_path / "ckpt"), rank=2)
    assert torch.equal(loaded["rng"], torch.full((4,), 2.0))
    assert loaded["model"]["b"][0] == replicated()["model"]["b"][0] + 1


def fail_before_exchange(rank: int, world: int, root: str) -> str:
    state = replicated()
    if rank == 1:
        state["bad"] = object()
    ck = _writer(True, timeout=30)
    try:
        ck.save(os.path.join(root, "ckpt"), state)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return f"{type(e).__name__}: {e}"
    finally:
        ck.close()
    return "saved"


@pytest.mark.timeout(240)
def test_a_rank_failing_before_the_exchange_fails_every_rank_quickly(tmp_path) -> None:
    import time

    started = time.monotonic()
    out = values(launch(fail_before_exchange, 3, str(tmp_path)))
    assert time.monotonic() - started < 25  # nobody waited for the 30 s timeout
    for r in range(3):
        assert "failed on 1 of 3 ranks, nothing was committed: rank 1: UnsafeObjectError" in out[r], out[r]
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def without_dedup(rank: int, world: int, root: str) -> None:
    ck = _writer(False)
    ck.save(os.path.join(root, "ckpt"), replicated())
    ck.close()


@pytest.mark.timeout(240)
def test_the_reference_api_keeps_per_rank_copies_by_default(tmp_path) -> None:
    launch(without_dedup, 2, str(tmp_path))
    assert sum(t.nbytes for r in rank_entries(str(tmp_path / "ckpt")) for t in r.tensors) == 2 * _state_bytes(replicated())
    assert tc.CheckpointWriterConfig().dedup_replicated is False


def manager_ddp(rank: int, world: int, root: str) -> int:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    with tc.CheckpointManager(root) as mgr:  # async by default; dedup by default on several ranks
        mgr.save(1, {"model": model, "optim": opt})
        mgr.wait()
        step, _ = mgr.load({"model": model, "optim": opt})
    return step


@pytest.mark.timeout(240)
def test_the_manager_deduplicates_a_ddp_state_by_default(tmp_path) -> None:
    root = str(tmp_path / "run")
    assert set(values(launch(manager_ddp, 2, root)).values()) == {1}
    written = sum(t.nbytes for r in rank_entries(os.path.join(root, "step_0000000001")) for t in r.tensors)
    expected = (16 * 8 + 8) * 4 * 2  # weights and biases, and their momentum buffers, once
    assert written == expected, written
