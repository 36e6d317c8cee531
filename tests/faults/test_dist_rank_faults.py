"""A rank killed (SIGKILL) or stopped (SIGSTOP) before the commit: the others fail in bounded time, naming it."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ckpt_testutil import assert_state_equal
from dist_hooks import make_checkpointer, save
from dist_util import error_summary, launch, tree_bytes

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest

#: The configured barrier timeout; survivors must give up within a small multiple of it.
TIMEOUT_S = 5


def _state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"w": torch.randn(1000, generator=g), "step": step}


def faulty_rank(rank: int, world: int, mode: str, fmt: str, victim: int, how: str, root: str) -> dict[str, Any]:
    """Commit a checkpoint, then save over it while ``victim`` dies or stops ``how``."""
    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=TIMEOUT_S)
    )
    ck = make_checkpointer(mode, config)
    path = os.path.join(root, "ckpt")
    good = _state(rank, 0)
    save(ck, path, good)
    dist.barrier()
    checker = 1 if victim == 0 else 0  # a survivor compares the committed checkpoint's bytes
    before = tree_bytes(path) if rank == checker else None
    dist.barrier()

    kwargs: dict[str, Any] = {}
    if rank == victim and how == "kill_before_save":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == victim and how == "stop_before_save":
        os.kill(os.getpid(), signal.SIGSTOP)
    if how == "kill_in_pre_commit":  # after this rank's data is durable; async: kills the writer subprocess
        kwargs["kill_ranks"] = [victim]
    started = time.monotonic()
    try:
        save(ck, path, _state(rank, 1), timeout_s=10 * TIMEOUT_S, **kwargs)
    except Exception as e:  # noqa: BLE001 - checked by the parent
        report = error_summary(e, started)
    else:
        report = {"type": None, "elapsed": time.monotonic() - started}
    # The checkpoint committed before is still there, byte for byte, and loads.
    assert read_manifest(path).world_size == world
    if rank == checker:
        report["unchanged"] = tree_bytes(path) == before
    assert_state_equal(ck.load(path), good)
    # No close(): a collective teardown with a dead or stopped peer is not what is tested here;
    # the launcher exits the process and its writer subprocess follows.
    return report


SCENARIOS = [
    # (mode, format, world, victim, how)
    # 3 ranks: rank 2, like the coordinator, must blame rank 1 alone, with the same error.
    ("sync", "torch_save", 3, 1, "kill_before_save"),
    ("sync", "safetensors", 2, 0, "kill_in_pre_commit"),  # the coordinator dies after writing its data
    ("async", "safetensors", 2, 1, "kill_before_save"),
    ("async", "torch_save", 2, 1, "kill_in_pre_commit"),  # the writer subprocess of rank 1 dies
    ("sync", "safetensors", 2, 1, "stop_before_save"),
    # The coordinator stopped: the store it serves hangs; every store call must give up in time.
    ("sync", "torch_save", 2, 0, "stop_before_save"),
    # (An async rank stopped before its save looks, to the others' writers, like one killed before it.)
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("mode", "fmt", "world", "victim", "how"), SCENARIOS, ids=["-".join(map(str, s)) for s in SCENARIOS]
)
def test_survivors_fail_in_bounded_time_naming_the_lost_rank(
    tmp_path, mode: str, fmt: str, world: int, victim: int, how: str
) -> None:
    # The victim's own writer subprocess dies, not the victim: the victim reports too.
    may_die = set() if (mode == "async" and how == "kill_in_pre_commit") else {victim}
    outcomes = launch(faulty_rank, world, mode, fmt, victim, how, str(tmp_path), may_die=may_die)
    if may_die:
        assert outcomes[victim].exitcode in (-signal.SIGKILL, None), outcomes[victim]
    survivors = [r for r in range(world) if r not in may_die]
    for rank in survivors:
        report = outcomes[rank].value
        if rank == victim:  # its writer subprocess was killed: it hears of that death
            assert report["type"] == "WriterProcessError", report
            assert "SIGKILL" in report["message"], report["message"]
            continue
        assert report["type"] == "DistributedCheckpointError", report
        # The lost rank, and only it, is blamed.
        assert set(report["failures"]) == {victim}, report["failures"]
        assert f"rank {victim}" in report["message"], report["message"]
        assert report["elapsed"] < 3 * TIMEOUT_S, report
        if victim == 0:  # nobody but the coordinator can know whether it committed
            assert "whether it was committed is unknown" in report["message"], report["message"]
        else:
            assert "nothing was committed" in report["message"], report["message"]
        if "unchanged" in report:
            assert report["unchanged"], "the committed checkpoint changed"
    assert any("unchanged" in outcomes[r].value for r in survivors), "no survivor compared the bytes"
    # Every survivor raised the same error.
    messages = {outcomes[r].value["message"] for r in survivors if r != victim}
    assert len(messages) == 1, messages
    ckpt = tmp_path / "ckpt"
    manifest = read_manifest(str(ckpt))
    assert manifest.world_size == world
    # Nothing of the failed save became visible: the manifest is still the first one.
    assert sorted(os.listdir(ckpt)) == sorted(
        ["manifest.json"]
        + [f"checkpoint_{r}.pt" for r in range(world) if fmt == "torch_save"]
        + [f"rank_{r:05d}{x}" for r in range(world) if fmt != "torch_save" for x in (".safetensors", ".index.json")]
    )
