"""CheckpointManager: numbered steps, restore in place, listing, retention guards, fallback, lifetime."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import torchckpt as tc
from ckpt_testutil import assert_state_equal, file_name
from manager_testutil import gated_checkpointer, wait_for
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from torchckpt.retention import CheckpointInfo

pytestmark = pytest.mark.timeout(120)


def _training_objects(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> None:
    for i in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()


def _state(step: int, n: int = 1000) -> dict[str, Any]:
    """A small state whose tensor bytes are unique to ``step`` (so they can be found in the files)."""
    return {"w": torch.arange(n, dtype=torch.float32) + 1000.0 * step, "step": step}


def _sync(root: Any, fmt: str = "safetensors", **kw: Any) -> tc.CheckpointManager:
    return tc.CheckpointManager(root, async_save=False, format=fmt, **kw)


class KeepNothing:
    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        return [False] * len(checkpoints)


def _flip_byte_of(path: str, needle: bytes) -> None:
    """Flip a bit in the middle of the first occurrence of ``needle`` in the file ``path``."""
    data = Path(path).read_bytes()
    at = data.find(needle)
    assert at >= 0, f"tensor bytes not found in {path}"
    with open(path, "r+b") as f:
        f.seek(at + len(needle) // 2)
        b = f.read(1)
        f.seek(at + len(needle) // 2)
        f.write(bytes([b[0] ^ 0x10]))


# -- save and load -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "async_save"),
    [("safetensors", False), ("torch_save", False), ("safetensors", True)],
    ids=["safetensors-sync", "torch_save-sync", "safetensors-async"],
)
def test_save_and_restore_training_state(tmp_path: Path, fmt: str, async_save: bool) -> None:
    model, opt, sched = _training_objects()
    _train(model, opt, sched, 3)
    with tc.CheckpointManager(tmp_path, async_save=async_save, format=fmt) as mgr:
        h1 = mgr.save(10, {"model": model, "optim": opt, "sched": sched, "epoch": 1}, metrics={"loss": 0.5})
        _train(model, opt, sched, 2)
        h2 = mgr.save(
            20,
            {"model": model, "optim": opt, "sched": sched, "epoch": 2},
            metrics={"loss": 0.25, "acc": 0.9},
            metadata={"run": "abc", "tags": ["x", 1]},
        )
        mgr.wait()
        assert h1.done() and h2.done()
        h2.result(timeout=1)
        assert (h1.step, h2.step) == (10, 20)
        assert h2.path == mgr.path(20) == os.path.join(str(tmp_path), "step_0000000020")
        assert mgr.steps() == [10, 20]
        assert mgr.latest_step() == 20

        manifest = read_manifest(mgr.path(20))
        assert manifest.layout == fmt
        assert manifest.metadata["step"] == 20
        assert manifest.metadata["metrics"] == {"loss": 0.25, "acc": 0.9}
        assert manifest.metadata["user"] == {"run": "abc", "tags": ["x", 1]}
        assert read_manifest(mgr.path(10)).metadata["metrics"] == {"loss": 0.5}
        assert read_manifest(mgr.path(10)).metadata["user"] == {}

        model2, opt2, sched2 = _training_objects(seed=1)
        params_before = {k: v for k, v in model2.state_dict().items()}
        ptrs_before = {k: v.data_ptr() for k, v in params_before.items()}
        step, loaded = mgr.load({"model": model2, "optim": opt2, "sched": sched2, "epoch": None})

    assert step == 20
    # The module is filled in place: the very same tensors, holding the saved values.
    after = model2.state_dict()
    for k, v in model.state_dict().items():
        assert after[k] is params_before[k] or after[k].data_ptr() == ptrs_before[k], k
        assert torch.equal(after[k], v), k
    assert model2[0].weight.data_ptr() == ptrs_before["0.weight"]
    assert_state_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert loaded["epoch"] == 2 and type(loaded["epoch"]) is int


def test_load_without_state_returns_what_was_saved(tmp_path: Path, fmt: str) -> None:
    with _sync(tmp_path, fmt) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        step, loaded = mgr.load()
        assert step == 2
        assert_state_equal(loaded, _state(2))
        step, loaded = mgr.load(step=1)
        assert step == 1
        assert_state_equal(loaded, _state(1))


def test_plain_values_in_state_are_saved_as_is(tmp_path: Path) -> None:
    with _sync(tmp_path) as mgr:
        mgr.save(3, {"n": 7, "name": "run", "nested": {"t": torch.ones(2), "lst": [1, 2.5]}})
        _, loaded = mgr.load()
        _, part = mgr.load({"n": None, "nested": None})  # only the keys asked for
    assert loaded["n"] == 7 and type(loaded["n"]) is int
    assert loaded["name"] == "run"
    assert torch.equal(loaded["nested"]["t"], torch.ones(2))
    assert loaded["nested"]["lst"] == [1, 2.5]
    assert set(part) == {"n", "nested"}
    assert part["n"] == 7 and torch.equal(part["nested"]["t"], torch.ones(2))


def test_path_rejects_bad_steps(tmp_path: Path) -> None:
    with _sync(tmp_path) as mgr:
        assert mgr.path(0) == os.path.join(str(tmp_path), "step_0000000000")
        for bad in (-1, True, 1.0, "3", None):
            with pytest.raises(ConfigError):
                mgr.path(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            mgr.save(-5, _state(1))


def test_empty_root(tmp_path: Path) -> None:
    with _sync(tmp_path / "fresh") as mgr:
        assert os.path.isdir(tmp_path / "fresh")
        assert mgr.steps() == []
        assert mgr.latest_step() is None
        with pytest.raises(CheckpointNotFoundError):
            mgr.load()
        assert mgr.apply_retention() == []


def test_load_of_a_missing_step_raises(tmp_path: Path) -> None:
    with _sync(tmp_path) as mgr:
        mgr.save(1, _state(1))
        with pytest.raises(CheckpointNotFoundError) as info:
            mgr.load(step=2)
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(CheckpointNotFoundError):
            mgr.load(step=2, fallback=True)


# -- listing ---------------------------------------------------------------


def test_steps_lists_committed_steps_only(tmp_path: Path) -> None:
    root = str(tmp_path)
    with _sync(root) as mgr:
        for s in (5, 1, 3, 100):
            mgr.save(s, _state(s))
        assert mgr.steps() == [1, 3, 5, 100]  # ascending by number, not by save order

        # Leftovers of crashed saves and other debris, with higher step numbers than any committed one.
        os.makedirs(os.path.join(root, "step_0000000007"))  # crashed before the commit: no manifest
        Path(root, "step_0000000007", "rank_00000.safetensors").write_bytes(b"\0" * 64)
        shutil.copytree(mgr.path(5), os.path.join(root, ".step_0000000008.torchckpt-pending"))  # hidden, complete
        shutil.copytree(mgr.path(5), os.path.join(root, "step_0000000009"))
        manifest9 = os.path.join(root, "step_0000000009", "manifest.json")
        Path(manifest9).write_bytes(Path(manifest9).read_bytes()[:-20])  # truncated JSON
        shutil.copytree(mgr.path(5), os.path.join(root, "step_0000000010"))
        Path(root, "step_0000000010", "manifest.json").write_text('{"torchckpt_format": 1, "ranks": [')  # corrupt
        shutil.copytree(mgr.path(5), os.path.join(root, "step_0000000011"))  # its manifest says step 5
        shutil.copytree(mgr.path(5), os.path.join(root, "step_5000"))  # not the name of a step directory
        Path(root, "step_0000000012").write_text("a file")
        os.makedirs(os.path.join(root, "step_0000000013", "manifest.json"))  # a directory where the manifest goes
        os.makedirs(os.path.join(root, "notastep"))

        assert mgr.steps() == [1, 3, 5, 100]
        assert mgr.latest_step() == 100
        step, loaded = mgr.load()
        assert step == 100
        assert_state_equal(loaded, _state(100))


def test_a_manifest_step_differing_from_the_name_is_not_listed(tmp_path: Path) -> None:
    with _sync(tmp_path) as mgr:
        mgr.save(3, _state(3))
        mgr.save(4, _state(4))
        shutil.copytree(mgr.path(3), mgr.path(6))  # says step 3
        os.rename(mgr.path(4), mgr.path(2))  # says step 4
        assert mgr.steps() == [3]
        assert mgr.latest_step() == 3


def test_non_canonical_step_names_are_not_listed(tmp_path: Path) -> None:
    """``step_12`` (or ``step_00000000012``) is not where ``path(12)`` points: it is not a step."""
    with _sync(tmp_path) as mgr:
        mgr.save(12, _state(12))
        mgr.save(13, _state(13))
        os.rename(mgr.path(12), os.path.join(str(tmp_path), "step_12"))
        os.rename(mgr.path(13), os.path.join(str(tmp_path), "step_00000000013"))
        mgr.save(1, _state(1))
        assert mgr.steps() == [1]
        step, _ = mgr.load()
        assert step == 1


def test_leftovers_are_cleaned_on_start_but_pending_saves_are_kept(tmp_path: Path) -> None:
    root = str(tmp_path)
    with _sync(root) as mgr:
        mgr.save(1, _state(1))
    trash = os.path.join(root, ".step_2.torchckpt-trash-0123abcd")
    pending = os.path.join(root, ".step_0000000003.torchckpt-pending")
    for d in (trash, pending):
        os.makedirs(d)
        Path(d, "rank_00000.safetensors").write_bytes(b"x")
    with _sync(root) as mgr:
        assert not os.path.exists(trash)
        assert os.path.exists(pending)  # possibly another process's save in progress: not ours to remove
        assert mgr.steps() == [1]


# -- retention -------------------------------------------------------------


def test_retention_policies_run_after_each_commit(tmp_path: Path) -> None:
    with _sync(tmp_path, keep=[tc.KeepLast(2), tc.KeepEvery(10)]) as mgr:
        for s in (5, 10, 15, 20, 25):
            mgr.save(s, _state(s))
        assert mgr.steps() == [10, 20, 25]
        mgr.save(30, _state(30))
        assert mgr.steps() == [10, 20, 25, 30]
        mgr.save(35, _state(35))
        assert mgr.steps() == [10, 20, 30, 35]


def test_a_single_policy_is_accepted(tmp_path: Path) -> None:
    with _sync(tmp_path, keep=tc.KeepLast(1)) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s))
        assert mgr.steps() == [3]


def test_retention_uses_the_metrics(tmp_path: Path) -> None:
    with _sync(tmp_path, keep=[tc.KeepBest(2, "loss")]) as mgr:
        for s, loss in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.3), (5, 0.8)]:
            mgr.save(s, _state(s), metrics={"loss": loss})
        # The two best (2, 4) and the newest (5), which is never deleted.
        assert mgr.steps() == [2, 4, 5]


def test_retention_never_deletes_the_newest_committed_step(tmp_path: Path) -> None:
    with _sync(tmp_path, keep=[KeepNothing()]) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s))
            assert mgr.steps() == [s]
        assert mgr.apply_retention() == []
        assert mgr.apply_retention(dry_run=True) == []
        assert mgr.steps() == [3]


def test_retention_runs_only_after_a_commit(tmp_path: Path) -> None:
    root = str(tmp_path)
    with _sync(root) as keep_all:
        for s in (1, 2, 3):
            keep_all.save(s, _state(s))
    with _sync(root, keep=[tc.KeepLast(1)]) as mgr:
        assert mgr.steps() == [1, 2, 3]  # opening a manager deletes nothing
        with pytest.raises(CheckpointError):
            mgr.save(4, {"bad": object()})  # refused: not committed
        assert mgr.steps() == [1, 2, 3]  # so no retention ran
        mgr.save(4, _state(4))
        assert mgr.steps() == [4]


def test_apply_retention_dry_run_and_protect(tmp_path: Path) -> None:
    root = str(tmp_path)
    with _sync(root) as keep_all:
        for s in (1, 2, 3, 4):
            keep_all.save(s, _state(s))
    with _sync(root, keep=[tc.KeepLast(1)]) as mgr:
        assert mgr.apply_retention(dry_run=True) == [1, 2, 3]
        assert mgr.steps() == [1, 2, 3, 4]
        assert mgr.apply_retention(protect={2}) == [1, 3]
        assert mgr.steps() == [2, 4]
        assert sorted(n for n in os.listdir(root) if "trash" in n) == []


def test_a_step_being_loaded_is_not_deleted(tmp_path: Path) -> None:
    root = str(tmp_path)
    with _sync(root) as keep_all:
        for s in (1, 2, 3):
            keep_all.save(s, _state(s))
    with _sync(root, keep=[tc.KeepLast(1)]) as mgr:
        deleted_during_load: list[int] = []

        class Probe:
            """Runs retention while the manager is loading step 1 (load_state_dict is called mid-load)."""

            def state_dict(self) -> dict[str, Any]:
                return {}

            def load_state_dict(self, sd: Any) -> None:
                deleted_during_load.extend(mgr.apply_retention())

        step, _ = mgr.load({"w": Probe()}, step=1)
        assert step == 1
        assert deleted_during_load == [2]
        assert mgr.steps() == [1, 3]
        assert mgr.apply_retention() == [1]  # no longer being loaded
        assert mgr.steps() == [3]


def test_a_step_in_flight_is_not_deleted(tmp_path: Path) -> None:
    """An async overwrite of step 2 is in flight (held at a gate): retention must not remove step 2."""
    root = str(tmp_path / "root")
    with _sync(root) as keep_all:
        for s in (1, 2, 3):
            keep_all.save(s, _state(s))
    gate, reached = str(tmp_path / "gate"), str(tmp_path / "reached")
    mgr = tc.CheckpointManager(root, keep=[tc.KeepLast(1)], checkpointer=gated_checkpointer(gate, reached))
    try:
        Path(gate).touch()
        handle = mgr.save(2, _state(22), overwrite=True)
        wait_for(lambda: os.path.exists(reached), 60, "the writer to reach the gate")
        assert not handle.done()
        assert mgr.apply_retention(dry_run=True) == [1]
        assert mgr.apply_retention() == [1]
        assert mgr.steps() == [2, 3]
        Path(gate).unlink()
        handle.result(timeout=60)
        assert mgr.steps() == [2, 3]  # the step just committed is protected too
        _, loaded = mgr.load(step=2)
        assert_state_equal(loaded, _state(22))
        assert mgr.apply_retention() == [2]
        assert mgr.steps() == [3]
    finally:
        Path(gate).unlink(missing_ok=True)
        mgr.close()


def test_a_failed_delete_is_logged_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path)
    with _sync(root) as keep_all:
        for s in (1, 2, 3):
            keep_all.save(s, _state(s))
    real_rename = os.rename
    failures = []

    def flaky_rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if "torchckpt-trash" in os.fspath(dst) and os.fspath(src).endswith("step_0000000001") and not failures:
            failures.append(src)
            raise PermissionError(13, "Permission denied", os.fspath(src))
        real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with _sync(root, keep=[tc.KeepLast(1)]) as mgr:
        with caplog.at_level(logging.WARNING, logger="torchckpt.manager"):
            assert mgr.apply_retention() == [2]
        assert failures, "the patched rename was not used"
        messages = [r.getMessage() for r in caplog.records if r.name == "torchckpt.manager"]
        assert any("could not delete step 1" in m and "retry" in m for m in messages), messages
        assert mgr.steps() == [1, 3]  # intact, still listed
        _, loaded = mgr.load(step=1)
        assert_state_equal(loaded, _state(1))
        assert mgr.apply_retention() == [1]  # retried
        assert mgr.steps() == [3]
        mgr.save(4, _state(4))
        assert mgr.steps() == [4]


# -- fallback ----------------------------------------------------------------


def _corrupt_step(mgr: tc.CheckpointManager, step: int, fmt: str) -> None:
    _flip_byte_of(os.path.join(mgr.path(step), file_name(fmt)), _state(step)["w"].numpy().tobytes())


def test_load_falls_back_to_the_newest_good_step(tmp_path: Path, fmt: str) -> None:
    with _sync(tmp_path, fmt) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s))
        _corrupt_step(mgr, 3, fmt)
        assert mgr.steps() == [1, 2, 3]  # still committed: listing reads manifests only

        with pytest.warns(UserWarning) as record:
            step, loaded = mgr.load()
        assert step == 2
        assert_state_equal(loaded, _state(2))
        messages = [str(w.message) for w in record]
        assert any("step 3" in m and mgr.path(3) in m and "corrupt" in m.lower() for m in messages), messages

        with pytest.raises(CorruptCheckpointError) as info:
            mgr.load(fallback=False)
        assert mgr.path(3) in str(info.value)
        with pytest.raises(CorruptCheckpointError):
            mgr.load(step=3)  # an explicit step never falls back

        _corrupt_step(mgr, 2, fmt)
        _corrupt_step(mgr, 1, fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            damaged = r"no loadable checkpoint .*: steps \[3, 2, 1\] are damaged"
            with pytest.raises(CorruptCheckpointError, match=damaged):
                mgr.load()


def test_fallback_restores_objects_from_the_good_step(tmp_path: Path) -> None:
    model, opt, sched = _training_objects()
    with _sync(tmp_path) as mgr:
        mgr.save(1, {"model": model, "optim": opt})
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        _train(model, opt, sched, 1)
        mgr.save(2, {"model": model, "optim": opt})
        weight = read_manifest(mgr.path(2)).ranks[0].tensors[0]
        rank_file = os.path.join(mgr.path(2), file_name("safetensors"))
        with open(rank_file, "r+b") as f:
            f.seek(weight.offset)
            b = f.read(1)
            f.seek(weight.offset)
            f.write(bytes([b[0] ^ 1]))
        model2, opt2, _ = _training_objects(seed=3)
        with pytest.warns(UserWarning, match="skipping step 2"):
            step, _ = mgr.load({"model": model2, "optim": opt2})
    assert step == 1
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


# -- lifetime ---------------------------------------------------------------


def test_close_and_context_manager(tmp_path: Path) -> None:
    mgr = _sync(tmp_path)
    mgr.save(1, _state(1))
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(2, _state(2))
    assert mgr.steps() == [1]  # listing and loading need no checkpointer process
    with _sync(tmp_path) as mgr2:
        assert mgr2.latest_step() == 1
    with pytest.raises(CheckpointError, match="closed"):
        mgr2.save(2, _state(2))


def test_async_saves_go_one_at_a_time_and_exit_waits(tmp_path: Path) -> None:
    gate, reached = str(tmp_path / "gate"), str(tmp_path / "reached")
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, keep=[tc.KeepLast(2)], checkpointer=gated_checkpointer(gate, reached)) as mgr:
        Path(gate).touch()
        first = mgr.save(1, _state(1))
        wait_for(lambda: os.path.exists(reached), 60, "the writer to reach the gate")
        assert mgr.steps() == []
        Path(gate).unlink()
        second = mgr.save(2, _state(2))  # waits for the first
        assert first.done()
        assert 1 in mgr.steps()
        third = mgr.save(3, {"w": torch.arange(8 << 20, dtype=torch.float32)})  # 32 MiB
    # Leaving the context waited for the last save.
    assert second.done() and third.done()
    third.result(timeout=0)
    with _sync(root) as check:
        assert check.steps() == [2, 3]
        _, loaded = check.load()
    assert torch.equal(loaded["w"], torch.arange(8 << 20, dtype=torch.float32))
