"""The local directory as a Storage: a save session's objects, its commit, and what it leaves behind."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from torchckpt.errors import CheckpointIOError
from torchckpt.format.manifest import MANIFEST_NAME, is_format_file
from torchckpt.storage import fs
from torchckpt.storage.locate import storage_for

MARKER = "done.marker"  # storage takes any marker name: it knows none of the format's


def _owned(name: str) -> bool:
    return name == MARKER or name.startswith("data_")


def _save(path: str, files: dict[str, bytes], *, marker: bytes = b"complete") -> None:
    session = storage_for(path).begin_save(rank=0, world_size=1, coordinator=True, timeout_s=5, marker=MARKER)
    try:
        for name, data in files.items():
            out = session.create(name)
            try:
                view = memoryview(data)
                assert out.write_at([view[:1], view[1:]], 0) == len(data)
                out.start_writeback(0, len(data))
                out.sync()
            finally:
                out.close()
                out.close()  # idempotent
        session.commit(marker, owned=_owned)
    finally:
        session.close(discard=True)


def test_a_session_commits_its_objects_and_marker_and_leaves_nothing_beside(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    _save(path, {"data_0": b"abc", "data_1": b"defg"})
    assert sorted(os.listdir(path)) == ["data_0", "data_1", MARKER]
    assert (tmp_path / "ckpt" / MARKER).read_bytes() == b"complete"
    assert sorted(os.listdir(tmp_path)) == [".torchckpt-lock", "ckpt"]


def test_an_overwrite_carries_foreign_files_and_drops_the_old_owned_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    _save(path, {"data_0": b"old", "data_9": b"old"})
    (tmp_path / "ckpt" / "notes.txt").write_bytes(b"the user's")
    _save(path, {"data_0": b"new"}, marker=b"second")
    assert sorted(os.listdir(path)) == ["data_0", MARKER, "notes.txt"]
    assert (tmp_path / "ckpt" / "data_0").read_bytes() == b"new"
    assert (tmp_path / "ckpt" / "notes.txt").read_bytes() == b"the user's"
    assert (tmp_path / "ckpt" / MARKER).read_bytes() == b"second"


def test_small_objects_put_get_delete(tmp_path: Path) -> None:
    session = storage_for(str(tmp_path / "ckpt")).begin_save(
        rank=0, world_size=2, coordinator=True, timeout_s=5, marker=MARKER
    )
    try:
        session.put("record", b"r0")
        assert session.get("record") == b"r0"
        session.delete("record")
        session.delete("record")  # absent: nothing to do
        with pytest.raises(FileNotFoundError):
            session.get("record")
        assert os.listdir(session.location) == []
    finally:
        session.close(discard=False)
    assert os.path.isdir(session.location)  # several ranks: the pending generation is left for the next save


def test_begin_save_removes_a_stale_marker_from_the_pending_generation(tmp_path: Path) -> None:
    pending = tmp_path / ".ckpt.torchckpt-pending"
    pending.mkdir()
    (pending / MARKER).write_bytes(b"stale")
    (pending / (MARKER + ".tmp")).write_bytes(b"stale")
    session = storage_for(str(tmp_path / "ckpt")).begin_save(
        rank=0, world_size=1, coordinator=True, timeout_s=5, marker=MARKER
    )
    try:
        assert session.location == str(pending)
        assert os.listdir(pending) == []
    finally:
        session.close(discard=True)
    assert not pending.exists()


def test_a_failed_begin_save_releases_the_lock_and_names_the_failure(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_bytes(b"a file, not a checkpoint directory")
    storage = storage_for(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointIOError) as info:
        storage.begin_save(rank=3, world_size=1, coordinator=True, timeout_s=5, marker=MARKER)
    assert (info.value.errno, info.value.rank, info.value.operation) == (errno.ENOTDIR, 3, "prepare")
    assert str(info.value).endswith(f"rank 3: checkpoint path {tmp_path / 'ckpt'} exists and is not a directory")

    class FailUnlink(fs.LocalFS):
        def unlink(self, path: str) -> None:
            raise OSError(errno.EIO, "injected", path)

    os.unlink(tmp_path / "ckpt")
    with fs.install(FailUnlink()), pytest.raises(CheckpointIOError) as info:
        storage.begin_save(rank=0, world_size=1, coordinator=True, timeout_s=5, marker=MARKER)
    assert (info.value.errno, info.value.operation) == (errno.EIO, "unlink")
    assert info.value.path == str(tmp_path / ".ckpt.torchckpt-pending" / MARKER)
    assert sorted(os.listdir(tmp_path)) == [".torchckpt-lock"]  # one rank: what it began is removed
    fd = os.open(tmp_path / ".torchckpt-lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


def test_the_format_owns_the_manifest_and_rank_files_only() -> None:
    assert MANIFEST_NAME == "manifest.json"
    owned = ["manifest.json", "checkpoint_0.pt", "checkpoint_12.pt", "rank_00000.safetensors", "rank_7.safetensors"]
    foreign = ["manifest.json.tmp", "rank_00000.entry.json", "notes.txt", "checkpoint_x.pt", "rank_0.safetensors.bak"]
    assert [is_format_file(n) for n in owned] == [True] * len(owned)
    assert [is_format_file(n) for n in foreign] == [False] * len(foreign)
