"""load_fallback: which step a manager's load takes, with fake loaders (no checkpoint is read)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from torchckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, StateDictMismatchError
from torchckpt.load_fallback import load_newest, load_step
from torchckpt.step_dirs import step_path


def _root(tmp_path: Path, *steps: int) -> str:
    for s in steps:
        os.makedirs(step_path(str(tmp_path), s))
    return str(tmp_path)


def _loader(root: str, damaged: set[int], log: list[int]) -> Any:
    def load(step: int) -> str:
        log.append(step)
        if step in damaged:
            raise CorruptCheckpointError(f"checksum mismatch in step {step}", path=step_path(root, step))
        return f"state {step}"

    return load


def test_the_newest_loadable_step_is_taken_and_damaged_ones_are_named(tmp_path: Path) -> None:
    root, log = _root(tmp_path, 1, 2, 3), []
    with pytest.warns(UserWarning, match=f"skipping step 3 at {step_path(root, 3)}: checksum mismatch"):
        assert load_newest(root, lambda: [1, 2, 3], _loader(root, {3}, log), fallback=True) == (2, "state 2")
    assert log == [3, 2]


def test_without_fallback_the_damage_is_raised(tmp_path: Path) -> None:
    root = _root(tmp_path, 1, 2)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in step 2"):
        load_newest(root, lambda: [1, 2], _loader(root, {2}, []), fallback=False)


def test_every_step_damaged_is_corrupt_not_missing(tmp_path: Path) -> None:
    root = _root(tmp_path, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        damaged = r"no loadable checkpoint under .*: steps \[2, 1\] are damaged"
        with pytest.raises(CorruptCheckpointError, match=damaged):
            load_newest(root, lambda: [1, 2], _loader(root, {1, 2}, []), fallback=True)


def test_no_step_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=f"no committed checkpoint under {tmp_path}"):
        load_newest(str(tmp_path), list, _loader(str(tmp_path), set(), []), fallback=True)


def test_a_step_that_vanished_is_skipped_silently_and_the_steps_listed_again(tmp_path: Path) -> None:
    root = _root(tmp_path, 2)  # step 1 was deleted by another process's retention; it committed step 2
    listings = iter([[1], [1, 2]])
    log: list[int] = []

    def load(step: int) -> str:
        log.append(step)
        if step == 1:
            raise CorruptCheckpointError("a rank file is missing", path=step_path(root, 1))
        return "state 2"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deleted step is not reported as damaged
        assert load_newest(root, lambda: next(listings), load, fallback=True) == (2, "state 2")
    assert log == [1, 2]


def test_a_template_that_does_not_fit_is_raised_at_once(tmp_path: Path) -> None:
    root, log = _root(tmp_path, 1, 2), []

    def load(step: int) -> str:
        log.append(step)
        raise StateDictMismatchError("'w': shape (3,) does not fit (4,)", key="w")

    with pytest.raises(StateDictMismatchError):
        load_newest(root, lambda: [1, 2], load, fallback=True)
    assert log == [2]


def test_a_step_asked_for_that_vanished_while_loading_is_not_found(tmp_path: Path) -> None:
    root = str(tmp_path)

    def load(step: int) -> str:
        raise CorruptCheckpointError("a rank file is missing", path=step_path(root, step))

    deleted = r"step 4 at .*step_0000000004 was deleted while it was being loaded"
    with pytest.raises(CheckpointNotFoundError, match=deleted):
        load_step(root, 4, load)
    os.makedirs(step_path(root, 4))
    with pytest.raises(CorruptCheckpointError, match="a rank file is missing"):
        load_step(root, 4, load)  # still there: damaged, raised as it is
