"""Sync and async saves on 2 and 4 gloo ranks, both formats: every rank gets its own state back."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ckpt_testutil import FORMATS, assert_state_equal, random_tensor
from dist_util import launch, tcp_listeners, values

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest

TIMEOUT_S = 60


def rank_state(rank: int, step: int = 0) -> dict[str, Any]:
    """A state that differs on every rank (and every step): tensors of several dtypes, containers, plain values."""
    seed = 1000 * step + rank
    base = random_tensor(torch.float32, (8, 6), seed)
    return {
        "model": OrderedDict(
            weight=random_tensor(torch.float32, (64, 33), seed + 1),
            bias=random_tensor(torch.bfloat16, (33,), seed + 2),
            ids=torch.arange(rank, rank + 17, dtype=torch.int64),
            mask=random_tensor(torch.bool, (5, 3), seed + 3),
            half=random_tensor(torch.float16, (2, 3, 4), seed + 4),
        ),
        "transposed": base.t(),  # non-contiguous
        "scalar": torch.tensor(float(rank) + 0.5),
        "empty": torch.empty(0, 4, dtype=torch.int32),
        "optim": {"state": {0: {"step": step + rank, "exp_avg": random_tensor(torch.float64, (7,), seed + 5)}}},
        "rank": rank,
        "name": f"rank-{rank}",
        "lr": 1e-3 * (rank + 1),
        "history": [rank, None, True, ("a", rank)],
        "blob": bytes([rank]) * 3,
    }


def _config(fmt: str) -> tc.CheckpointerConfig:
    return tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=TIMEOUT_S)
    )


def _make(mode: str, fmt: str) -> tc.Checkpointer:
    """A checkpointer with no barrier configured (the torch_save one with no arguments at all)."""
    if mode == "sync":
        return tc.make_sync_checkpointer() if fmt == "torch_save" else tc.make_sync_checkpointer(_config(fmt))
    return tc.make_async_checkpointer() if fmt == "torch_save" else tc.make_async_checkpointer(_config(fmt))


def _chosen_barrier(mode: str, ck: Any) -> str | None:
    """The barrier type the builder chose (the async one is built in the writer subprocess from this config)."""
    if mode == "sync":
        barrier = ck._writer._barrier
        return None if barrier is None else type(barrier).barrier_type
    bc = ck._checkpoint_process._checkpoint_writer_init_args["barrier_config"]
    return bc.barrier_type


def _save(ck: tc.Checkpointer, path: str, sd: Any, **kw: Any) -> None:
    futures = ck.save(path, sd, **kw)
    if futures is not None:
        stage, write = futures
        stage.result(timeout=TIMEOUT_S)
        write.result(timeout=TIMEOUT_S)


def _file_bytes(path: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def _round_trip(rank: int, world: int, mode: str, fmt: str, ck: tc.Checkpointer, path: str) -> dict[str, Any]:
    report: dict[str, Any] = {"barrier": _chosen_barrier(mode, ck)}
    assert ck._reader._rank_info == tc.RankInfo(rank, world)
    sd = rank_state(rank)
    _save(ck, path, sd, metadata={"step": 0})
    # A save returns (or its write future completes) only once committed, on every rank.
    manifest = read_manifest(path)
    assert manifest.world_size == world, manifest
    assert [e.rank for e in manifest.ranks] == list(range(world))
    assert manifest.layout == fmt
    assert manifest.metadata == {"step": 0}
    assert_state_equal(ck.load(path), sd)

    # In place, into a template whose tensors hold other bytes.
    template = rank_state(rank + 97)
    template["model"]["ids"] = torch.zeros(17, dtype=torch.int64)
    loaded = ck.load(path, template)
    assert loaded["model"]["weight"] is template["model"]["weight"]  # filled in place
    assert_state_equal(loaded, sd)

    # Overwrite the same path with the next step: the new state replaces the old one.
    dist.barrier()
    sd1 = rank_state(rank, step=1)
    _save(ck, path, sd1, metadata={"step": 1})
    assert read_manifest(path).metadata == {"step": 1}
    assert_state_equal(ck.load(path), sd1)
    dist.barrier()
    if rank == 0:
        report["files"] = sorted(os.listdir(path))
    return report


def save_load_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    # Async checkpointers first: their writer subprocesses start while the sync saves run.
    checkpointers = {("async", fmt): _make("async", fmt) for fmt in FORMATS}
    checkpointers.update({("sync", fmt): _make("sync", fmt) for fmt in FORMATS})
    report: dict[str, Any] = {}
    try:
        for mode in ("sync", "async"):
            for fmt in FORMATS:
                path = os.path.join(root, f"{mode}-{fmt}")
                report[(mode, fmt)] = _round_trip(rank, world, mode, fmt, checkpointers[(mode, fmt)], path)
        if rank == 0:
            report["siblings"] = sorted(os.listdir(root))
            # Where the store that the writer subprocesses agree through listens.
            args = checkpointers[("async", "torch_save")]._checkpoint_process._checkpoint_writer_init_args
            report["store_listeners"] = tcp_listeners(args["barrier_config"].barrier_args["port"])
    finally:
        for ck in checkpointers.values():
            ck.close()
    return report


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("world", "init"), [(2, "file"), (4, "tcp")])
def test_every_rank_saves_and_loads_its_own_state(tmp_path, world: int, init: str) -> None:
    """Sync and async, both formats, builders with no barrier configured.

    With a file store (no TCPStore in the job), rank 0 starts the store the
    writer subprocesses agree through; with env:// they join torch's.
    """
    reports = values(launch(save_load_rank, world, str(tmp_path), init=init))
    for rank, report in reports.items():
        for fmt in FORMATS:
            assert report[("sync", fmt)]["barrier"] == "dist_barrier", (rank, fmt)
            assert report[("async", fmt)]["barrier"] == "store", (rank, fmt)
    r0 = reports[0]
    for mode in ("sync", "async"):
        assert r0[(mode, "torch_save")]["files"] == sorted(
            ["manifest.json"] + [f"checkpoint_{r}.pt" for r in range(world)]
        )
        assert r0[(mode, "safetensors")]["files"] == sorted(
            ["manifest.json"] + [f"rank_{r:05d}{x}" for r in range(world) for x in (".safetensors", ".index.json")]
        )
    # Nothing but the checkpoints is visible beside them; no pending directory is left
    # (old generations may still be being deleted in the background).
    visible = [n for n in r0["siblings"] if not n.startswith(".")]
    assert visible == sorted(f"{m}-{f}" for m in ("sync", "async") for f in FORMATS), r0["siblings"]
    assert not [n for n in r0["siblings"] if "pending" in n], r0["siblings"]
    if init == "file":  # the store torchckpt started listens on MASTER_ADDR only
        assert r0["store_listeners"] == ["127.0.0.1"], r0["store_listeners"]
