"""Helpers of the pipelined-save tests: small staging groups, a state of a few MiB, a hook on staging's copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchckpt as tc
from torchckpt import pipeline, staging

WAIT_S = 60
RANK = tc.RankInfo(global_rank=0, global_world_size=1)
#: Tensors of the end-to-end tests: large enough to be written from their own memory (not gathered).
TENSOR_BYTES = 512 * 1024
TENSORS = 6


def use_small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipeline states of a few MiB, one tensor per group (in this, the training, process)."""
    monkeypatch.setattr(pipeline, "GROUP_BYTES", TENSOR_BYTES)
    monkeypatch.setattr(pipeline, "PIPELINE_MIN_BYTES", 0)


def big_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(TENSOR_BYTES // 4, generator=g) for i in range(TENSORS)}
    sd.update({"bias": torch.randn(5, generator=g), "step": seed, "name": f"s{seed}"})
    return sd


def make(fmt: str = "safetensors", pipelined: bool = True) -> tc.AsyncCheckpointer:
    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt),
        staging_config=tc.CheckpointStagerConfig(pipelined_writes=pipelined),
    )
    return tc.make_async_checkpointer(config, rank_info=RANK)


def load(path: Path, like: dict) -> dict:
    template = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in like.items()}
    return tc.make_sync_checkpointer(rank_info=RANK).load(str(path), state_dict=template)


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


class CopyHook:
    """Wraps staging's copy of one group: ``on_group(n)`` runs before the n-th copy (from 1)."""

    def __init__(self, monkeypatch, on_group) -> None:
        self.calls = 0
        self.on_group = on_group
        real = staging._copy_all

        def copy_all(copies, non_blocking=False):
            self.calls += 1
            self.on_group(self.calls)
            real(copies, non_blocking)

        monkeypatch.setattr(staging, "_copy_all", copy_all)


def rank_file_size(root: Path) -> int:
    sizes = [p.stat().st_size for p in root.rglob("rank_00000.safetensors")]
    return max(sizes, default=0)


def next_save_loads(ckpt: tc.AsyncCheckpointer, hook: CopyHook, path: Path) -> None:
    """With the copy hook disarmed, ``ckpt`` saves another state to ``path``, which loads back exactly."""
    hook.on_group = lambda n: None
    sd = big_state(2)
    ckpt.save(str(path), sd)[1].result(timeout=WAIT_S)
    assert_same(load(path, sd), sd)
