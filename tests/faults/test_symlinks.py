"""Symbolic links on a checkpoint's path: followed once and safely, or refused — never half-followed.

The rule (docs/format.md, "Paths"): the directories *above* a checkpoint are
resolved once when a save starts (a link there is followed, and the whole
save happens in the directory it pointed to then); the checkpoint's own name
is never followed: a save to it, or a load from it, is refused, naming the
link and its target. Names torchckpt creates beside a checkpoint (pending,
previous, trash) and files in its pending directory are never followed
either, even when someone planted a link there.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any

import ckpt_testutil as cu
import pytest
import torch
from fault_util import manifests_under

import torchckpt as tc
from torchckpt.errors import CheckpointIOError, CheckpointNotFoundError

WAIT_S = 60


def _state(tag: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(len(tag))
    return {"w": torch.randn(64, 8, generator=g), "tag": tag}


def _tree_bytes(path: str) -> dict[str, bytes]:
    """Every regular file under ``path`` with its bytes (links are not followed)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            full = os.path.join(d, f)
            if not os.path.islink(full):
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, path)] = fh.read()
    return out


@pytest.fixture
def victim(tmp_path, fmt: str) -> tuple[str, dict[str, bytes]]:
    """A committed checkpoint of state "victim" and its files' bytes."""
    path = str(tmp_path / "real" / "victim")
    cu.checkpointer(fmt).save(path, _state("victim"))
    return path, _tree_bytes(path)


def _assert_intact(path: str, files: dict[str, bytes]) -> None:
    assert os.path.isdir(path) and not os.path.islink(path)
    assert _tree_bytes(path) == files, f"{path} changed: {sorted(_tree_bytes(path))} vs {sorted(files)}"
    loaded, missing = cu.reader().read(path)
    assert missing == [] and loaded["tag"] == "victim"


def _check_refusal(e: CheckpointIOError, link: str, target: str) -> None:
    assert isinstance(e, OSError) and e.errno == errno.ELOOP
    assert (e.rank, e.operation, e.path) == (0, "prepare", link)
    assert f"{link} is a symbolic link (to {target})" in str(e)
    assert "save to the target" in str(e)


@pytest.mark.parametrize("how", ["sync", "async", "writer"])
def test_a_save_to_a_link_at_the_checkpoints_name_is_refused_and_the_target_kept(
    victim: tuple[str, dict[str, bytes]], tmp_path, fmt: str, how: str
) -> None:
    """The reported bug: a save to ``link -> committed checkpoint`` took the target's files and manifest."""
    target, files = victim
    link = str(tmp_path / "link")
    os.symlink(target, link)
    if how == "sync":
        with pytest.raises(CheckpointIOError) as info:
            cu.checkpointer(fmt).save(link, _state("new"))
    elif how == "writer":  # the writer alone (what the async subprocess runs): the same refusal
        writer = tc.CheckpointWriter(tc.CheckpointWriterConfig(format=fmt), tc.RankInfo(0, 1))
        with pytest.raises(CheckpointIOError) as info:
            writer.write(link, _state("new"))
    else:
        ckpt = tc.make_async_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
        )
        try:
            with pytest.raises(CheckpointIOError) as info:  # from save() itself, before staging
                ckpt.save(link, _state("new"))
        finally:
            ckpt.close()
    _check_refusal(info.value, link, target)
    assert os.readlink(link) == target
    _assert_intact(target, files)
    assert cu.hidden_leftovers(str(tmp_path)) == []
    assert cu.hidden_leftovers(os.path.dirname(target)) == []


def test_a_dangling_link_at_the_checkpoints_name_is_refused(tmp_path, fmt: str) -> None:
    link = str(tmp_path / "ckpt")
    target = str(tmp_path / "nowhere")
    os.symlink(target, link)
    with pytest.raises(CheckpointIOError) as info:
        cu.checkpointer(fmt).save(link, _state("new"))
    _check_refusal(info.value, link, target)
    assert os.readlink(link) == target and not os.path.exists(target)


def test_a_load_through_a_link_at_the_checkpoints_name_is_refused_naming_it(
    victim: tuple[str, dict[str, bytes]], tmp_path
) -> None:
    target, files = victim
    link = str(tmp_path / "link")
    os.symlink(target, link)
    with pytest.raises(CheckpointNotFoundError) as info:
        cu.reader().read(link)
    assert info.value.path == link
    assert f"{link} is a symbolic link (to {target})" in str(info.value)
    assert f"load {target}" in str(info.value)
    _assert_intact(target, files)


class _RepointParent(tc.WriterHook):
    """Re-points the parent link to another directory after the data is written, before the commit."""

    def __init__(self, link: str, other: str) -> None:
        self.link, self.other = link, other

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        os.unlink(self.link)
        os.symlink(self.other, self.link)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def test_a_linked_parent_is_resolved_once_for_the_whole_save(tmp_path, fmt: str) -> None:
    """A link above the checkpoint is followed, once: re-pointing it mid-save does not split the save."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    os.makedirs(first)
    os.makedirs(second)
    link = str(tmp_path / "ckpts")
    os.symlink(first, link)
    path = os.path.join(link, "ckpt")
    cu.checkpointer(fmt).save(path, _state("old"))  # through the link: into first/
    assert sorted(os.listdir(first)) == [".torchckpt-lock", "ckpt"]
    assert cu.reader().read(path)[0]["tag"] == "old"

    writer = tc.CheckpointWriter(
        tc.CheckpointWriterConfig(format=fmt), tc.RankInfo(0, 1), commit_hook=_RepointParent(link, second)
    )
    writer.write(path, _state("new"))  # resolved when it started: the whole save happens in first/
    loaded, _ = cu.reader().read(os.path.join(first, "ckpt"))
    assert loaded["tag"] == "new"
    assert cu.hidden_leftovers(first) == []
    assert os.listdir(second) == []


def test_a_manager_root_behind_a_link_and_a_step_that_is_a_link(
    victim: tuple[str, dict[str, bytes]], tmp_path, fmt: str
) -> None:
    """The manager's root may be a link (followed); a step directory that is a link is neither listed nor saved through."""
    target, files = victim
    real_root = str(tmp_path / "root")
    os.makedirs(real_root)
    root = str(tmp_path / "root_link")
    os.symlink(real_root, root)
    with tc.CheckpointManager(root, async_save=False, format=fmt, keep=tc.KeepLast(1)) as mgr:
        mgr.save(1, _state("one"))
        mgr.save(2, _state("two"))
        assert mgr.steps() == [2]
        assert sorted(n for n in os.listdir(real_root) if not n.startswith(".")) == ["step_0000000002"]
        os.symlink(target, os.path.join(real_root, "step_0000000003"))
        assert mgr.steps() == [2]
        with pytest.raises(CheckpointIOError) as info:
            mgr.save(3, _state("three"))
        assert info.value.errno == errno.ELOOP and "symbolic link" in str(info.value)
        assert mgr.steps() == [2]
        step, loaded = mgr.load()
        assert step == 2 and loaded["tag"] == "two"
    _assert_intact(target, files)


@pytest.mark.parametrize("kind", ["pending", "previous", "trash"])
def test_a_link_planted_at_a_name_torchckpt_uses_is_never_followed(
    victim: tuple[str, dict[str, bytes]], tmp_path, fmt: str, kind: str
) -> None:
    """``.ckpt.torchckpt-{pending,previous,trash-*}`` made a link to another checkpoint: that one is untouched."""
    target, files = victim
    parent = str(tmp_path / "ckpts")
    path = os.path.join(parent, "ckpt")
    cu.checkpointer(fmt).save(path, _state("old"))
    planted = os.path.join(parent, {"pending": ".ckpt.torchckpt-pending", "previous": ".ckpt.torchckpt-previous",
                                    "trash": ".ckpt.torchckpt-trash-0123abcd"}[kind])  # fmt: skip
    os.symlink(target, planted)
    cu.checkpointer(fmt).save(path, _state("new"))
    assert cu.reader().read(path)[0]["tag"] == "new"
    _assert_intact(target, files)
    assert not os.path.lexists(planted), f"{planted} is still there"
    assert cu.hidden_leftovers(parent) == []


def test_a_previous_generation_name_that_is_a_link_is_not_loaded(
    victim: tuple[str, dict[str, bytes]], tmp_path
) -> None:
    """A load of a missing checkpoint does not follow a planted ``.ckpt.torchckpt-previous`` link."""
    target, files = victim
    os.symlink(target, str(tmp_path / ".ckpt.torchckpt-previous"))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        cu.reader().read(str(tmp_path / "ckpt"))
    _assert_intact(target, files)


def test_a_link_planted_inside_the_pending_directory_is_not_written_through(tmp_path, fmt: str) -> None:
    """A stale pending directory holding ``<rank file> -> outside file``: the outside file keeps its bytes."""
    parent = str(tmp_path / "ckpts")
    path = os.path.join(parent, "ckpt")
    outside = str(tmp_path / "precious.bin")
    with open(outside, "wb") as f:
        f.write(b"precious")
    pending = os.path.join(parent, ".ckpt.torchckpt-pending")
    os.makedirs(pending)
    for name in (cu.file_name(fmt), "manifest.json.tmp"):
        os.symlink(outside, os.path.join(pending, name))
    with pytest.raises(CheckpointIOError) as info:
        cu.checkpointer(fmt).save(path, _state("new"))
    assert info.value.errno == errno.ELOOP
    assert info.value.path == os.path.join(pending, cu.file_name(fmt))
    with open(outside, "rb") as f:
        assert f.read() == b"precious"
    assert manifests_under(parent) == []
    cu.checkpointer(fmt).save(path, _state("new"))  # the failed save removed its pending directory
    assert cu.reader().read(path)[0]["tag"] == "new"
    with open(outside, "rb") as f:
        assert f.read() == b"precious"
    shutil.rmtree(parent)
