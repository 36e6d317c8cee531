"""One rank fails its part of a save: every rank raises the same DistributedCheckpointError, nothing commits."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ckpt_testutil import assert_state_equal
from dist_hooks import make_checkpointer, save
from dist_util import error_summary, launch, tree_bytes, values

import torchckpt as tc
from torchckpt.errors import CheckpointNotFoundError, DistributedCheckpointError

TIMEOUT_S = 30


def _state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"w": torch.randn(257, 3, generator=g), "step": step, "rank": rank}


def _expect_failure(ck: Any, path: str, sd: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a save that must fail; return what the error says."""
    try:
        save(ck, path, sd, **kwargs)
    except DistributedCheckpointError as e:
        return error_summary(e)
    raise AssertionError(f"the save of {path} with {kwargs} succeeded on rank {dist.get_rank()}")


def _failing_saves(rank: int, world: int, mode: str, fmt: str, root: str) -> dict[str, Any]:
    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=TIMEOUT_S)
    )
    ck = make_checkpointer(mode, config)
    path = os.path.join(root, "ckpt")
    fresh = os.path.join(root, "fresh")
    report: dict[str, Any] = {}
    try:
        good = _state(rank, 0)
        save(ck, path, good)
        dist.barrier()
        before = tree_bytes(path) if rank == 0 else None

        # An object with no safe form, on rank 1 only (overwriting a committed checkpoint).
        bad = dict(_state(rank, 1))
        if rank == 1:
            bad["obj"] = object()
        report["unsafe"] = _expect_failure(ck, path, bad)
        # The same, to a path where nothing was committed yet.
        report["unsafe_fresh"] = _expect_failure(ck, fresh, bad)
        # A pre_commit hook raising on rank 1, then on rank 0 (the coordinator), then on both.
        report["hook1"] = _expect_failure(ck, path, _state(rank, 2), fail_ranks=[1])
        report["hook0"] = _expect_failure(ck, path, _state(rank, 3), fail_ranks=[0])
        report["hook_all"] = _expect_failure(ck, path, _state(rank, 4), fail_ranks=list(range(world)))

        dist.barrier()
        assert not os.path.exists(os.path.join(fresh, "manifest.json"))
        with pytest.raises(CheckpointNotFoundError):
            ck.load(fresh)
        # The committed checkpoint is untouched, byte for byte, and loads on every rank.
        if rank == 0:
            assert tree_bytes(path) == before
        assert_state_equal(ck.load(path), good)
        if mode == "sync":
            report["post_commits"] = list(ck._writer._commit_hook.post_commits)

        # The next save works again.
        dist.barrier()
        again = _state(rank, 5)
        save(ck, path, again)
        assert_state_equal(ck.load(path), again)
    finally:
        ck.close()
    return report


def _check_error(err: dict[str, Any], failed: set[int], world: int, cause: str) -> None:
    assert err["type"] == "DistributedCheckpointError", err["traceback"]
    assert set(err["failures"]) == failed, err["failures"]
    for r in failed:
        assert f"rank {r}" in err["message"], err["message"]
        assert cause in err["failures"][r], err["failures"]
    assert f"{len(failed)} of {world} ranks" in err["message"], err["message"]


#: Each mode with one format (the formats do not differ in how a save fails).
MODES = {"sync": "safetensors", "async": "torch_save"}


def failing_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    return {mode: _failing_saves(rank, world, mode, fmt, os.path.join(root, mode)) for mode, fmt in MODES.items()}


@pytest.fixture(scope="module")
def failure_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, Any]]:
    root = str(tmp_path_factory.mktemp("failures"))
    for mode in MODES:
        os.makedirs(os.path.join(root, mode))
    return root, values(launch(failing_rank, 2, root))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(MODES))
def test_one_rank_failing_fails_the_save_on_every_rank(failure_reports: tuple[str, dict[int, Any]], mode: str) -> None:
    world = 2
    root, all_reports = failure_reports
    reports = {rank: r[mode] for rank, r in all_reports.items()}
    for report in reports.values():
        _check_error(report["unsafe"], {1}, world, "UnsafeObjectError")
        assert "'obj'" in report["unsafe"]["failures"][1]
        _check_error(report["unsafe_fresh"], {1}, world, "UnsafeObjectError")
        _check_error(report["hook1"], {1}, world, "pre_commit hook refused")
        _check_error(report["hook0"], {0}, world, "pre_commit hook refused")
        _check_error(report["hook_all"], {0, 1}, world, "pre_commit hook refused")
        if mode == "sync":
            # post_commit ran for the one successful save before the failures only.
            ckpt = os.path.join(root, mode, "ckpt")
            assert report["post_commits"] == [ckpt], report["post_commits"]
    # Every rank raised the same error.
    for key in ("unsafe", "unsafe_fresh", "hook1", "hook0", "hook_all"):
        assert reports[0][key]["failures"] == reports[1][key]["failures"], key
        assert reports[0][key]["message"] == reports[1][key]["message"], key
    assert not os.path.exists(os.path.join(root, mode, "fresh", "manifest.json"))
