"""step_dirs: the names under a manager's root, the committed-step listing, leftovers and deleting a step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchckpt as tc
from torchckpt.errors import ConfigError
from torchckpt.step_dirs import (
    Leftover,
    committed_steps,
    discard_step,
    leftover_of,
    move_step_aside,
    remove_trash,
    step_dirs,
    step_name,
    step_of,
    step_path,
)


def _save(root: Path, *steps: int) -> None:
    with tc.CheckpointManager(root, async_save=False) as mgr:
        for s in steps:
            mgr.save(s, {"w": torch.full((4,), float(s))}, metrics={"loss": float(s), "bad": float("nan")})


@pytest.mark.parametrize(
    ("step", "name"), [(0, "step_0000000000"), (12, "step_0000000012"), (10**12, "step_1000000000000")]
)
def test_step_name_and_step_of_agree(step: int, name: str) -> None:
    assert step_name(step) == name
    assert step_of(name) == step
    assert step_path("/ckpt", step) == os.path.join("/ckpt", name)


@pytest.mark.parametrize(
    "name", ["step_12", "step_00000000012", "step_", "step_-000000001", "notastep", ".step_0000000001"]
)
def test_only_the_canonical_name_is_a_step(name: str) -> None:
    assert step_of(name) is None


@pytest.mark.parametrize("bad", [-1, 1.0, "3", True, None])
def test_a_step_that_is_not_a_non_negative_int_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=f"step must be a non-negative int, got {bad!r}") as info:
        step_path("/ckpt", bad)  # type: ignore[arg-type]
    assert info.value.field == "step"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (".step_0000000003.torchckpt-pending", Leftover("pending", "step_0000000003")),
        (".step_3.torchckpt-trash-0123abcd", Leftover("trash", "step_3")),
        (".step_0000000003.torchckpt-trash-89ab", Leftover("trash", "step_0000000003")),
        (".step_3.torchckpt-previous", None),  # the commit protocol's, restored by storage.local
        ("step_0000000003", None),
        (".step_3.torchckpt-trash-XYZ", None),
    ],
)
def test_leftover_of(name: str, expected: Leftover | None) -> None:
    assert leftover_of(name) == expected


def test_committed_steps_lists_only_committed_steps_with_their_metrics(tmp_path: Path) -> None:
    _save(tmp_path, 3, 1)
    os.makedirs(tmp_path / "step_0000000007")  # no manifest: not committed
    (tmp_path / "step_0000000008").write_text("a file")
    infos = committed_steps(str(tmp_path))
    assert [(c.step, c.path) for c in infos] == [(1, step_path(str(tmp_path), 1)), (3, step_path(str(tmp_path), 3))]
    assert infos[0].metrics["loss"] == 1.0 and infos[0].metrics["bad"] != infos[0].metrics["bad"]  # nan decoded
    assert [s for s, _ in step_dirs(str(tmp_path))] == [1, 3, 7, 8]  # every step name, committed or not


def test_committed_steps_of_a_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        committed_steps(str(tmp_path / "missing"))


def test_discard_step_leaves_neither_the_step_nor_its_trash(tmp_path: Path) -> None:
    _save(tmp_path, 1, 2)
    discard_step(committed_steps(str(tmp_path))[0])
    assert [c.step for c in committed_steps(str(tmp_path))] == [2]
    assert sorted(os.listdir(tmp_path)) == [".torchckpt-lock", "step_0000000002"]


def test_move_step_aside_names_the_trash_after_the_step_number(tmp_path: Path) -> None:
    _save(tmp_path, 12)
    trash = move_step_aside(committed_steps(str(tmp_path))[0])
    assert leftover_of(os.path.basename(trash)) == Leftover("trash", "step_12")
    assert committed_steps(str(tmp_path)) == []
    remove_trash(str(tmp_path))
    assert not os.path.lexists(trash)


def test_remove_trash_keeps_pending_directories(tmp_path: Path) -> None:
    trash, pending = tmp_path / ".step_2.torchckpt-trash-0123abcd", tmp_path / ".step_0000000003.torchckpt-pending"
    for d in (trash, pending):
        d.mkdir()
        (d / "manifest.json").write_text("{}")
    remove_trash(str(tmp_path))
    assert not trash.exists() and pending.exists()
