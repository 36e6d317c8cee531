"""Concurrency: two processes saving to one path, retention racing loads and in-flight saves, mutation after an
async save returns.

Standard outcome: saves to one path take turns (every one commits, none mixes with another), every load gives
exactly one committed state, the latest committed step is never deleted, and an async checkpoint holds the
values at the time of the save. Fifty async saves in a row are in ``test_writer_process.py``
(``test_fifty_async_saves_do_not_leak``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any

import async_testutil as at
import concurrent_child
import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, hidden_leftovers, iter_tensors, map_tensors, reader

import torchckpt as tc
from torchckpt.errors import CheckpointNotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
#: Longest wait for a child to start (imports torch) or finish its saves.
WAIT_S = 90.0


class Child:
    """A ``concurrent_child.py`` process; its JSON lines are collected by a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "concurrent_child.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines: list[Any] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait_ready(self, deadline: float) -> None:
        while "ready" not in self.lines:
            assert self.proc.poll() is None, f"child died before it was ready: {self.stderr()}"
            assert time.monotonic() < deadline, "child not ready in time"
            time.sleep(0.01)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout_s: float = WAIT_S) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"child still running after {timeout_s}s: {self.stderr()}") from None
        self._reader.join(10)
        return code

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _start_together(children: list[Child], go: str) -> None:
    deadline = time.monotonic() + WAIT_S
    for child in children:
        child.wait_ready(deadline)
    open(go, "w").close()


# ---------------------------------------------------------------------------- two saves to one path


def _race_two_savers(tmp_path, fmts: list[str], rounds: int) -> None:
    parent = tmp_path / "ckpts"
    parent.mkdir()
    targets = {fmt: str(parent / f"ckpt_{fmt}") for fmt in fmts}
    states = {tag: concurrent_child.make_state(tag) for tag in ("A", "B")}
    for fmt, path in targets.items():  # the path always holds a committed checkpoint
        tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
        ).save(path, states["A"])
    go = str(tmp_path / "go")
    args = [f"{path}:{fmt}" for fmt, path in targets.items()]
    children = [Child("save", go, tag, str(rounds), *args) for tag in ("A", "B")]
    seen: Counter[tuple[str, str]] = Counter()
    try:
        _start_together(children, go)
        deadline = time.monotonic() + WAIT_S
        while any(c.running() for c in children):
            assert time.monotonic() < deadline, "the savers did not finish in time"
            for fmt, path in targets.items():
                loaded, missing = reader().read(path)  # never an error: a committed checkpoint is always there
                assert missing == []
                tag = loaded["tag"]
                assert_state_equal(loaded, states[tag])  # exactly A or exactly B, never a mix
                seen[fmt, tag] += 1
        for child in children:
            assert child.finish() == 0, child.stderr()
    finally:
        for child in children:
            child.kill()
    # every save of both processes committed, in turn
    for child in children:
        done = Counter(line["path"] for line in child.lines if isinstance(line, dict))
        assert done == {path: rounds for path in targets.values()}, done
    for fmt, path in targets.items():
        loaded = reader().read(path)[0]
        assert_state_equal(loaded, states[loaded["tag"]])
        assert seen[fmt, "A"] + seen[fmt, "B"] > 0
    # A saver that exits right after a commit may leave the old generation's trash (hidden, without a
    # manifest); the next save to the path removes it.
    for name in os.listdir(parent):
        if "trash" in name:
            assert not os.path.exists(parent / name / "manifest.json"), name
    for fmt, path in targets.items():
        tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
        ).save(path, states["B"])
        assert_state_equal(reader().read(path)[0], states["B"])
    assert hidden_leftovers(str(parent)) == []
    assert sorted(n for n in os.listdir(parent) if n.startswith(".")) == [".torchckpt-lock"]
    print(f"loads seen during the race: {dict(seen)}")


@pytest.mark.timeout(180)
def test_two_processes_saving_to_one_path_take_turns(tmp_path) -> None:
    """Both layouts, 8 rounds each: every load is exactly A or B; every save of both processes commits."""
    _race_two_savers(tmp_path, list(FORMATS), rounds=8)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_saving_to_one_path_many_rounds(tmp_path) -> None:
    _race_two_savers(tmp_path, list(FORMATS), rounds=60)


# ---------------------------------------------------------------------------- retention racing loads and saves


def _race_retention(tmp_path, fmt: str, async_save: bool, steps: int) -> None:
    root = str(tmp_path / "root")
    go = str(tmp_path / "go")
    saver = Child("manage", go, root, str(steps), fmt, "1" if async_save else "0")
    loads: list[int] = []
    try:
        _start_together([saver], go)
        loader = tc.CheckpointManager(root, async_save=False, format=fmt)
        deadline = time.monotonic() + WAIT_S
        latest_listed = 0
        while saver.running():
            assert time.monotonic() < deadline, "the saver did not finish in time"
            listed = loader.steps()
            if latest_listed:
                # once a step is committed, some step is always listed, and the newest never goes back
                assert listed, "every committed step vanished from the listing"
                assert listed[-1] >= latest_listed, (listed, latest_listed)
            if listed:
                latest_listed = listed[-1]
                step, state = loader.load()  # never a half-deleted step, never an error
                assert_state_equal(state, concurrent_child.step_state(step))
                assert not loads or step >= loads[-1], (loads[-5:], step)
                loads.append(step)
        assert saver.finish() == 0, saver.stderr()
        loader.close()
    finally:
        saver.kill()
    assert saver.lines[-1] == {"steps": steps}
    final = tc.CheckpointManager(root, async_save=False, format=fmt)
    assert final.steps() == [steps]  # KeepLast(1) kept the newest, and only it
    step, state = final.load()
    assert step == steps
    assert_state_equal(state, concurrent_child.step_state(steps))
    final.close()
    assert [n for n in os.listdir(root) if "trash" in n or "pending" in n] == []
    assert len(loads) >= 3 and len(set(loads)) >= 2, f"the loads did not overlap the saves: {loads}"
    print(f"{len(loads)} loads of {len(set(loads))} steps")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("fmt", "async_save"), [("safetensors", True), ("torch_save", False)], ids=["async", "sync"])
def test_retention_racing_loads_never_loses_the_latest(tmp_path, fmt: str, async_save: bool) -> None:
    """KeepLast(1) in one process, loads of the latest in another: every load is a whole step, the newest or newer."""
    _race_retention(tmp_path, fmt, async_save, steps=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_retention_racing_loads_many_steps(tmp_path, fmt: str, async_save: bool) -> None:
    _race_retention(tmp_path, fmt, async_save, steps=200)


# ---------------------------------------------------------------------------- mutation after an async save returns


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(256, 64, generator=g),
            "b": torch.randn(64, generator=g, dtype=torch.float64),
            "emb": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "t": torch.randn(6, 4, generator=g).t(),  # non-contiguous
        },
        "opt": {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(256, 64, generator=g)}}},
        "mask": torch.rand(33, generator=g) > 0.5,
        "ids": torch.randint(-1000, 1000, (7, 3), generator=g, dtype=torch.int64),
        "step": seed,
    }


def _mutate_all(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for t in iter_tensors(state):
            if t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(1)


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return map_tensors(state, lambda t: t.clone())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutation_after_staging_does_not_reach_the_checkpoint(tmp_path, fmt: str) -> None:
    """The writer is held back until the source has been mutated: the checkpoint must hold the staged values."""
    path = str(tmp_path / "ckpt")
    arm, reached = str(tmp_path / "arm"), str(tmp_path / "reached")
    config = tc.CheckpointWriterConfig(format=fmt)
    ckpt = tc.make_async_checkpointer(
        rank_info=tc.RankInfo(0, 1),
        checkpoint_writer_init_fn=at.slow_writer_init,
        checkpoint_writer_init_args={"arm_file": arm, "reached_file": reached, "config": config},
    )
    try:
        state = _state(6)
        expected = _clone(state)
        open(arm, "w").close()
        stage_future, write_future = ckpt.save(path, state)
        assert stage_future.result(timeout=WAIT_S) is None
        _mutate_all(state)
        at.wait_for_file(reached, WAIT_S)  # the writer holds the staged dict and waits
        assert not write_future.done()
        os.unlink(arm)
        assert write_future.result(timeout=WAIT_S) is None
        loaded = ckpt.load(path)
        assert_state_equal(loaded, expected)
        assert not torch.equal(loaded["model"]["w"], state["model"]["w"])
    finally:
        if os.path.exists(arm):
            os.unlink(arm)
        ckpt.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_training_on_right_after_each_async_save(tmp_path, fmt: str) -> None:
    """Ten saves, each followed at once by an optimizer-like update of every tensor while the write is in flight."""
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    state = _state(1)
    expected: dict[str, Any] = {}
    futures = []
    with tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1)) as ckpt:
        for i in range(10):
            path = str(tmp_path / f"ckpt{i}")
            state["step"] = i
            expected[path] = _clone(state)
            stage_future, write_future = ckpt.save(path, state)
            stage_future.result(timeout=WAIT_S)
            _mutate_all(state)  # the next training step, in place, with the write still going
            futures.append(write_future)
        for f in futures:
            assert f.result(timeout=WAIT_S) is None
        for path, snapshot in expected.items():
            assert_state_equal(ckpt.load(path), snapshot)


# ---------------------------------------------------------------------------- the races, made deterministic


@pytest.mark.parametrize("moment", ["before_manifest", "before_rank_file"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_load_racing_an_overwrite_reads_the_new_generation(tmp_path, monkeypatch, fmt: str, moment: str) -> None:
    """The path is overwritten (and the old generation deleted) between the reader's open of the directory and
    its open of a file in it: the read starts again and returns the new state, never a "missing file" error."""
    from torchckpt.storage.local_read import LocalGeneration

    path = str(tmp_path / "ckpt")
    ck = tc.make_sync_checkpointer(
        tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
    )
    old, new = concurrent_child.make_state("A"), concurrent_child.make_state("B")
    ck.save(path, old)
    target = (
        "manifest.json"
        if moment == "before_manifest"
        else ("checkpoint_0.pt" if fmt == "torch_save" else "rank_00000.safetensors")
    )
    real_open = LocalGeneration.open
    raced: list[str] = []

    def racing_open(generation: LocalGeneration, name: str) -> Any:
        if name == target and not raced:
            raced.append(name)
            ck.save(path, new)  # swaps the new generation in; the old one is deleted in the background
            assert hidden_leftovers(str(tmp_path)) == []  # ... and is gone now
        return real_open(generation, name)

    monkeypatch.setattr(LocalGeneration, "open", racing_open)
    loaded, missing = reader().read(path)
    assert raced == [target] and missing == []
    assert_state_equal(loaded, new)


def test_a_manager_load_racing_retention_loads_the_newer_step(tmp_path, monkeypatch) -> None:
    """Another process commits step 2 and its retention deletes step 1 while this one lists or loads step 1."""
    from torchckpt import step_dirs
    from torchckpt.storage.local_read import LocalGeneration

    root = str(tmp_path / "root")
    saver = tc.CheckpointManager(root, keep=tc.KeepLast(1), async_save=False)
    loader = tc.CheckpointManager(root, async_save=False)  # another process, as far as retention knows
    saver.save(1, concurrent_child.step_state(1))
    for module, name, at_rank_file in [
        (step_dirs, "read_manifest", False),  # the step is deleted between the listing and its manifest
        (LocalGeneration, "open", True),  # ... after its manifest was read, before its rank file
    ]:
        step = saver.steps()[-1]
        real = getattr(module, name)
        raced: list[int] = []

        def racing(*args: Any, real: Any = real, step: int = step, raced: list = raced, at: bool = at_rank_file) -> Any:
            if not raced and (not at or args[1] != "manifest.json"):
                raced.append(step + 1)
                saver.save(step + 1, concurrent_child.step_state(step + 1))  # commits, then deletes `step`
                assert saver.steps() == [step + 1]
            return real(*args)

        monkeypatch.setattr(module, name, racing)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "skipping step ... corrupt" for a step that was deleted
            got, state = loader.load()
        monkeypatch.setattr(module, name, real)
        assert raced == [step + 1], name
        assert got == step + 1, name
        assert_state_equal(state, concurrent_child.step_state(step + 1))
    with pytest.raises(CheckpointNotFoundError):
        loader.load(step=1)
    saver.close()
    loader.close()
