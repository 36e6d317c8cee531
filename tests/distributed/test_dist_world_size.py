"""A checkpoint saved by 4 ranks, loaded by 2 ranks and by 1 process."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ckpt_testutil import FORMATS, assert_state_equal, random_tensor, truncate
from dist_util import launch, values

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError, StateDictMismatchError

SAVED_WORLD = 4


def replicated_state() -> dict[str, Any]:
    """The same on every rank (what data-parallel training saves)."""
    return {
        "model": {"w": random_tensor(torch.float32, (40, 7), 1), "b": random_tensor(torch.bfloat16, (7,), 2)},
        "step": 123,
        "schedule": [0.1, 0.01],
    }


def sharded_state(rank: int) -> dict[str, Any]:
    """Partly replicated ("shared", "step"), partly rank-specific ("w", "rank")."""
    return {
        "shared": random_tensor(torch.float32, (16,), 7),
        "w": random_tensor(torch.float32, (16,), 100 + rank),
        "rank": rank,
        "step": 5,
    }


def _fmt_config(fmt: str) -> tc.CheckpointerConfig:
    return tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=60))


def save_four(rank: int, world: int, root: str) -> None:
    for fmt in FORMATS:
        ck = tc.make_sync_checkpointer(_fmt_config(fmt))
        ck.save(os.path.join(root, f"replicated-{fmt}"), replicated_state())
        ck.save(os.path.join(root, f"sharded-{fmt}"), sharded_state(rank))
        ck.close()


@pytest.fixture(scope="module")
def four_rank_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("four_ranks"))
    launch(save_four, SAVED_WORLD, root)
    for fmt in FORMATS:
        for kind in ("replicated", "sharded"):
            assert read_manifest(os.path.join(root, f"{kind}-{fmt}")).world_size == SAVED_WORLD
    return root


def load_on_two(rank: int, world: int, root: str) -> list[int]:
    for fmt in FORMATS:
        ck = tc.make_sync_checkpointer()
        path = os.path.join(root, f"replicated-{fmt}")
        assert_state_equal(ck.load(path), replicated_state())
        template = {"model": {"w": torch.zeros(40, 7), "b": torch.zeros(7, dtype=torch.bfloat16)}}
        loaded = ck.load(path, template)
        assert loaded["model"]["w"] is template["model"]["w"]
        assert_state_equal(loaded["model"], replicated_state()["model"])
        # A state that differs between ranks does not load on another world size by default...
        with pytest.raises(StateDictMismatchError):
            ck.load(os.path.join(root, f"sharded-{fmt}"))
        # ...but a rank can pick whose part it reads.
        out, _ = ck._reader.read(os.path.join(root, f"sharded-{fmt}"), rank=rank + 2)
        assert_state_equal(out, sharded_state(rank + 2))
        ck.close()
    return [dist.get_rank(), dist.get_world_size()]


@pytest.mark.timeout(180)
def test_replicated_checkpoint_loads_on_two_ranks(four_rank_root: str) -> None:
    assert values(launch(load_on_two, 2, four_rank_root)) == {0: [0, 2], 1: [1, 2]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_replicated_checkpoint_loads_in_one_process(four_rank_root: str, fmt: str) -> None:
    path = os.path.join(four_rank_root, f"replicated-{fmt}")
    reader = tc.CheckpointReader(tc.RankInfo(0, 1))
    state, missing = reader.read(path)
    assert missing == []
    assert_state_equal(state, replicated_state())
    state3, _ = reader.read(path, rank=3)
    assert_state_equal(state3, replicated_state())
    ck = tc.make_sync_checkpointer(rank_info=tc.RankInfo(0, 1))
    assert_state_equal(ck.load(path), replicated_state())


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_r_reads_rank_r_mod_world_by_default(four_rank_root: str, tmp_path, fmt: str) -> None:
    """Damage rank 1's file: exactly the readers that map to rank 1 notice."""
    path = str(tmp_path / "copy")
    shutil.copytree(os.path.join(four_rank_root, f"replicated-{fmt}"), path)
    victim = read_manifest(path).ranks[1].file
    truncate(os.path.join(path, victim), 10)
    for rank, world in [(1, 2), (5, 8), (1, 1 + SAVED_WORLD)]:
        with pytest.raises(CorruptCheckpointError) as info:
            tc.CheckpointReader(tc.RankInfo(rank, world)).read(path)
        assert victim in str(info.value), (rank, world)
    for rank, world in [(0, 1), (0, 2), (2, 8), (3, 8), (4, 8), (6, 8)]:
        state, _ = tc.CheckpointReader(tc.RankInfo(rank, world)).read(path)
        assert_state_equal(state, replicated_state())
    with pytest.raises(CorruptCheckpointError):
        tc.CheckpointReader(tc.RankInfo(0, 1)).read(path, rank=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_explicit_rank_picks_whose_part_is_read(four_rank_root: str, fmt: str) -> None:
    path = os.path.join(four_rank_root, f"sharded-{fmt}")
    reader = tc.CheckpointReader(tc.RankInfo(0, 1))
    for r in range(SAVED_WORLD):
        state, _ = reader.read(path, rank=r)
        assert_state_equal(state, sharded_state(r))
    with pytest.raises(ValueError):
        reader.read(path, rank=SAVED_WORLD)
    # On the world size it was saved with, each rank reads its own part.
    for r in range(SAVED_WORLD):
        state, _ = tc.CheckpointReader(tc.RankInfo(r, SAVED_WORLD)).read(path)
        assert_state_equal(state, sharded_state(r))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world", [1, 2, 8])
def test_rank_specific_checkpoint_refuses_another_world_size(four_rank_root: str, fmt: str, world: int) -> None:
    path = os.path.join(four_rank_root, f"sharded-{fmt}")
    with pytest.raises(StateDictMismatchError) as info:
        tc.CheckpointReader(tc.RankInfo(0, world)).read(path)
    message = str(info.value)
    assert path in message and "4 ranks" in message, message
    if fmt == "safetensors":
        # The per-tensor checksums tell which keys differ: "w" does, "shared" does not.
        assert "'w'" in message and "'shared'" not in message, message
    else:
        # A torch.save rank file is one opaque digest: the error names the ranks that differ.
        assert "[1, 2, 3]" in message, message
