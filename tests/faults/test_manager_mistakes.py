"""CheckpointManager: a caller's mistake is an error at once, never a fallback; what was refused wrote nothing.

A template that does not fit the newest step, a step saved twice, a metric or
metadata that cannot be stored: each is refused with an error naming it.
Damage (a corrupt step) alone makes a load fall back to an older step. An
error handed to the caller once (by the save's handle) is not raised again.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, file_name
from manager_testutil import InjectedWriteError, failing_checkpointer, gated_checkpointer, save_ranks, wait_for

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import (
    CheckpointExistsError,
    ConfigError,
    CorruptCheckpointError,
    MissingKeysError,
    StateDictMismatchError,
)

pytestmark = pytest.mark.timeout(120)


def _state(step: int, n: int = 1000) -> dict[str, Any]:
    return {"w": torch.arange(n, dtype=torch.float32) + 1000.0 * step, "step": step}


def _sync(root: Any, fmt: str = "safetensors", **kw: Any) -> tc.CheckpointManager:
    return tc.CheckpointManager(root, async_save=False, format=fmt, **kw)


class _Probe:
    """A value whose ``state_dict()`` counts its calls: a refused save must not even ask for the state."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        return {"v": torch.ones(3)}


def _tree(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


# -- a template that does not fit is the caller's mistake --------------------------------------------------


def _linear(n_in: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Linear(n_in, 2).to(dtype)


MISTAKES = {
    # template, error type, key named, what the message must also say
    "shape fits an older step": ({"model": _linear(3)}, StateDictMismatchError, "model.weight", ["[2, 3]", "[2, 4]"]),
    "shape fits no step": ({"model": _linear(5)}, StateDictMismatchError, "model.weight", ["[2, 5]", "[2, 4]"]),
    "dtype": ({"model": _linear(4, torch.float64)}, StateDictMismatchError, "model.weight", ["float64", "float32"]),
    "missing key": ({"model": _linear(4), "head": _linear(2)}, MissingKeysError, None, ["missing keys", "'head'"]),
    "wrong type": ({"model": _linear(4), "step": _linear(1)}, StateDictMismatchError, "step", ["OrderedDict", "a int"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_template_that_does_not_fit_the_newest_step_is_an_error_at_once(
    tmp_path: Path, fmt: str, mistake: str
) -> None:
    template, error_type, key, words = MISTAKES[mistake]
    with _sync(tmp_path, fmt) as mgr:
        mgr.save(1, {"model": _linear(3), "step": 1})
        mgr.save(2, {"model": _linear(4), "step": 2})
        for kw in ({}, {"fallback": False}):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "skipping step 2": it is not damaged
                with pytest.raises(error_type) as info:
                    mgr.load(template, strict=True, **kw)
            err = info.value
            assert not isinstance(err, (FileNotFoundError, CorruptCheckpointError)), repr(err)
            message = str(err)
            assert err.path == mgr.path(2) and mgr.path(2) in message, message
            if key is not None:
                assert err.key == key and f"key {key!r}" in message, message
            for word in words:
                assert word in message, message
        assert mgr.steps() == [1, 2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_newest_step_falls_back_but_a_mismatch_behind_it_is_raised(tmp_path: Path, fmt: str) -> None:
    with _sync(tmp_path, fmt) as mgr:
        mgr.save(1, {"model": _linear(3)})
        mgr.save(2, {"model": _linear(4)})
        mgr.save(3, {"model": _linear(4)})
        rank_file = os.path.join(mgr.path(3), file_name(fmt))
        with open(rank_file, "r+b") as f:
            f.truncate(os.path.getsize(rank_file) - 1)
        with pytest.warns(UserWarning, match="skipping step 3"):
            step, _ = mgr.load({"model": _linear(4)})
        assert step == 2  # damage: the next older step
        with pytest.warns(UserWarning, match="skipping step 3"):
            with pytest.raises(StateDictMismatchError, match=r"\[2, 3\].*\[2, 4\]") as info:
                mgr.load({"model": _linear(3)})  # step 2 is whole: the template is wrong; step 1 is not tried
        assert info.value.path == mgr.path(2)


def test_when_every_step_is_damaged_the_error_is_corruption_not_absence(tmp_path: Path) -> None:
    with _sync(tmp_path) as mgr:
        for s in (1, 2):
            mgr.save(s, _state(s))
            rank_file = os.path.join(mgr.path(s), file_name("safetensors"))
            with open(rank_file, "r+b") as f:
                f.truncate(100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CorruptCheckpointError) as info:
                mgr.load()
    err = info.value
    assert not isinstance(err, FileNotFoundError)  # "start from scratch" is not the answer to damage
    message = str(err)
    assert message.startswith(f"no loadable checkpoint under {tmp_path}: steps [2, 1] are damaged; "), message
    assert mgr.path(1) in message and err.path == str(tmp_path), message


# -- rank= -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_reads_the_part_of_the_rank_it_is_given(tmp_path: Path, fmt: str) -> None:
    states = [{"w": torch.full((4,), float(r)), "rank": r} for r in range(2)]
    save_ranks(str(tmp_path / "step_0000000007"), fmt, states, metadata={"step": 7, "metrics": {}, "user": {}})
    with _sync(tmp_path, fmt) as mgr:  # one process: world size 1, the checkpoint has 2 ranks that differ
        assert mgr.steps() == [7]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(StateDictMismatchError, match="pass rank= to choose whose state to load"):
                mgr.load()
        for r in range(2):
            step, loaded = mgr.load(rank=r)
            assert step == 7
            assert_state_equal(loaded, states[r])
        with pytest.raises(ValueError, match="rank 2 out of range"):
            mgr.load(rank=2)


# -- a step saved twice ------------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saving_a_committed_step_again_is_refused_unless_overwrite(tmp_path: Path, async_save: bool) -> None:
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, async_save=async_save) as mgr:
        mgr.save(5, _state(5)).result(timeout=60)
        before = _tree(root)
        probe = _Probe()
        with pytest.raises(CheckpointExistsError) as info:
            mgr.save(5, {"p": probe})
        err = info.value
        assert isinstance(err, FileExistsError)
        assert str(err) == f"step 5 already exists under {root} ({mgr.path(5)}); pass overwrite=True to replace it"
        assert err.path == mgr.path(5)
        assert probe.calls == 0  # refused before the state was even asked for
        assert _tree(root) == before
        mgr.save(5, _state(6), overwrite=True).result(timeout=60)
        step, loaded = mgr.load()
    assert step == 5
    assert_state_equal(loaded, _state(6))


def test_a_step_still_being_saved_is_refused_without_waiting(tmp_path: Path) -> None:
    gate, reached = str(tmp_path / "gate"), str(tmp_path / "reached")
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, checkpointer=gated_checkpointer(gate, reached)) as mgr:
        Path(gate).touch()
        first = mgr.save(1, _state(1))
        wait_for(lambda: os.path.exists(reached), 60, "the writer to reach the gate")
        started = time.monotonic()
        with pytest.raises(CheckpointExistsError) as info:
            mgr.save(1, _state(2))
        assert time.monotonic() - started < 5 and not first.done()  # did not wait for the write
        assert str(info.value) == (
            f"step 1 is already being saved under {root} ({mgr.path(1)}); "
            "pass overwrite=True to replace it once that save is done"
        )
        # overwrite=True waits for the save in flight, then replaces its step.
        opener = threading.Timer(0.5, lambda: Path(gate).unlink())
        opener.start()
        try:
            mgr.save(1, _state(3), overwrite=True).result(timeout=60)
        finally:
            opener.join(10)
        first.result(timeout=0)
        _, loaded = mgr.load(step=1)
    assert_state_equal(loaded, _state(3))


# -- metrics and metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_non_finite_metrics_are_stored_and_nan_is_never_best(tmp_path: Path, async_save: bool) -> None:
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, keep=[tc.KeepBest(1, "loss")], async_save=async_save) as mgr:
        mgr.save(1, _state(1), metrics={"loss": 0.5, "n": 3}).result(timeout=60)
        mgr.save(2, _state(2), metrics={"loss": -math.inf, "gnorm": math.inf}).result(timeout=60)
        mgr.save(3, _state(3), metrics={"loss": math.nan}).result(timeout=60)
        # -inf is the best loss; NaN is never best, step 3 survives as the newest only.
        assert mgr.steps() == [2, 3]
    assert read_manifest(mgr.path(2)).metadata["metrics"] == {"loss": {"float": "-inf"}, "gnorm": {"float": "inf"}}
    assert read_manifest(mgr.path(3)).metadata["metrics"] == {"loss": {"float": "nan"}}


BAD_METRICS = {
    "tensor": ({"loss": torch.tensor(0.5)}, "metric 'loss' must be an int or a float (nan and inf are allowed), "
               "got a Tensor; pass float(value)"),
    "string": ({"loss": "low"}, "metric 'loss' must be an int or a float (nan and inf are allowed), got a str"),
    "none": ({"acc": 0.5, "loss": None}, "metric 'loss' must be an int or a float (nan and inf are allowed), "
             "got a NoneType"),
    "bool": ({"done": True}, "metric 'done' must be an int or a float (nan and inf are allowed), got a bool"),
    "name": ({3: 0.5}, "metric names must be strings, got 3 (int)"),
    "not a dict": ([("loss", 0.5)], "metrics must be a dict of name to number, got a list"),
}  # fmt: skip


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("case", list(BAD_METRICS))
def test_a_metric_that_cannot_be_stored_is_refused_before_anything_is_written(
    tmp_path: Path, async_save: bool, case: str
) -> None:
    metrics, message = BAD_METRICS[case]
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, async_save=async_save) as mgr:
        before = _tree(root)
        probe = _Probe()
        with pytest.raises(ConfigError) as info:
            mgr.save(1, {"p": probe}, metrics=metrics)
        assert str(info.value) == f"cannot save step 1 under {root}: {message}"
        assert info.value.field == "metrics"
        assert probe.calls == 0 and _tree(root) == before and mgr.steps() == []
        mgr.save(1, _state(1), metrics={"loss": 0.5}).result(timeout=60)  # the manager goes on
        assert mgr.steps() == [1]


_LOOP: list[Any] = []
_LOOP.append(_LOOP)

BAD_METADATA = {
    "object": ({"note": object()}, "metadata key 'note' holds a value of type object, which is not plain JSON"),
    "nan": ({"cfg": {"lr": math.nan}}, "metadata key 'cfg.lr' holds nan, which is not plain JSON"),
    "tuple key": ({"cfg": {(1, 2): 3}}, "metadata key 'cfg' has a key (1, 2) that is not a string"),
    "root": (torch.ones(2), "metadata holds a value of type Tensor, which is not plain JSON"),
    "cycle": ({"loop": _LOOP}, f"metadata key {'loop' + '[0]' * 63!r} is nested deeper than 64 levels"),
}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_metadata_that_cannot_be_stored_is_refused_before_anything_is_written(
    tmp_path: Path, async_save: bool, case: str
) -> None:
    metadata, message = BAD_METADATA[case]
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, async_save=async_save) as mgr:
        before = _tree(root)
        probe = _Probe()
        with pytest.raises(ConfigError) as info:
            mgr.save(1, {"p": probe}, metadata=metadata)
        assert str(info.value) == f"cannot save step 1 under {root}: {message}"
        assert info.value.field == "metadata"
        assert probe.calls == 0 and _tree(root) == before


# -- an error is delivered once --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["result", "exception"])
def test_an_error_received_from_the_handle_is_not_raised_again(tmp_path: Path, how: str) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    root = str(tmp_path / "root")
    mgr = tc.CheckpointManager(root, checkpointer=failing_checkpointer(str(fail)))
    handle = mgr.save(1, _state(1))
    if how == "result":
        with pytest.raises(InjectedWriteError, match="injected failure writing .*step_0000000001"):
            handle.result(timeout=60)
    else:
        assert isinstance(handle.exception(timeout=60), InjectedWriteError)
    fail.unlink()
    mgr.wait()  # handled: not raised by wait, the next save or close
    mgr.save(2, _state(2)).result(timeout=60)
    mgr.close()
    assert mgr.steps() == [2]


def test_an_error_nobody_received_is_raised_once(tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    root = str(tmp_path / "root")
    mgr = tc.CheckpointManager(root, checkpointer=failing_checkpointer(str(fail)))
    first = mgr.save(1, _state(1))
    wait_for(first.done, 60, "the failed write")
    fail.unlink()
    with pytest.raises(InjectedWriteError, match="step_0000000001"):
        mgr.save(2, _state(2))  # the next save delivers it...
    mgr.save(2, _state(2)).result(timeout=60)
    mgr.close()  # ...and close does not again
    fail.touch()
    mgr = tc.CheckpointManager(root, checkpointer=failing_checkpointer(str(fail)))
    wait_for(mgr.save(3, _state(3)).done, 60, "the failed write")
    with pytest.raises(InjectedWriteError, match="step_0000000003"):
        mgr.close()  # never lost
    mgr.close()
    assert mgr.steps() == [2]


# -- the checkpointers' own metadata keyword -------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_checkpointer_metadata_that_cannot_be_stored_is_refused_before_anything_is_written(tmp_path, mode) -> None:
    import torchckpt as tc
    from torchckpt.errors import ConfigError

    path = tmp_path / "ckpt"
    ckpt = tc.make_sync_checkpointer() if mode == "sync" else tc.make_async_checkpointer()
    try:
        with pytest.raises(ConfigError, match=f"metadata of the checkpoint {path} must be JSON-serialisable"):
            ckpt.save(str(path), {"w": torch.ones(2)}, metadata={"loss": float("nan")})
        assert not path.exists()
        assert not [n for n in os.listdir(tmp_path) if "pending" in n]
    finally:
        ckpt.close()
