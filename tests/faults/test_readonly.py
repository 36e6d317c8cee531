"""EROFS and EACCES are found before staging, not after.

A save into a read-only file system (a tmpfs remounted ``ro``, or a read-only
bind mount) or into a directory the process may not write (uid 65534 in a
root-owned directory) fails in ``save()`` itself — for the async checkpointer
too, not later through its write future — with a ``CheckpointIOError``
naming rank 0, the operation ``"prepare"``, the directory and the errno;
nothing was staged (no staging memory, nothing sent to the writer), the old
checkpoint loads byte-identical, no file descriptor or ``/dev/shm`` entry is
left, and the same checkpointer saves once the location is writable again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import textwrap

import async_testutil as at
import ckpt_testutil as cu
import pytest
from fault_util import manifests_under, remount, require_root, run_python, state, tmpfs, unmount

import torchckpt as tc
from torchckpt.errors import CheckpointIOError

WAIT_S = 60


@contextlib.contextmanager
def _read_only_location(root: str, how: str):  # type: ignore[no-untyped-def]
    """A committed checkpoint's parent directory that can be made read-only and writable again.

    Yields ``(parent, make_read_only, make_writable)``.
    """
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(os.path.join(root, "disk"), "16m"))
        parent = os.path.join(disk, "ckpts")
        os.makedirs(parent)
        if how == "remount":
            yield parent, lambda: remount(disk, "ro"), lambda: remount(disk, "rw")
            return
        view = os.path.join(root, "view")
        os.makedirs(view)
        done = subprocess.run(["mount", "--bind", parent, view], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount {parent}: {done.stderr.strip()}")
        stack.callback(unmount, view)
        yield view, lambda: remount(view, "bind,ro"), lambda: remount(view, "bind,rw")


def _check_error(error: CheckpointIOError, code: int, directory: str, path: str) -> None:
    assert isinstance(error, OSError)
    assert error.errno == code
    assert (error.rank, error.operation, error.path) == (0, "prepare", directory)
    message = str(error)
    assert message.startswith(f"[Errno {code}] rank 0: prepare failed for {directory}: {os.strerror(code)}"), message
    assert path in message


def _own_shared_mappings() -> int:
    """Shared-memory segments mapped by this process (``/dev/shm`` as a whole is shared with other jobs)."""
    with open("/proc/self/maps") as f:
        return sum("/dev/shm/" in line or "memfd:" in line for line in f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["remount", "bind"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_read_only_file_system_fails_in_save_before_staging(tmp_path, mode: str, how: str) -> None:
    require_root("a read-only mount")
    children_before = set(at.writer_children())
    with _read_only_location(str(tmp_path), how) as (parent, make_read_only, make_writable):
        path = os.path.join(parent, "ckpt")
        old = state(1, 1)
        cu.checkpointer("safetensors").save(path, old)
        before = at.dir_bytes(path)
        config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors"))
        if mode == "sync":
            ck: tc.Checkpointer = tc.make_sync_checkpointer(config, rank_info=tc.RankInfo(0, 1))
        else:
            ck = tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))
            ck._checkpoint_process.process_creation_future.result(timeout=WAIT_S)
        try:
            make_read_only()
            fds, shm = at.fd_count(), _own_shared_mappings()
            with pytest.raises(CheckpointIOError) as info:
                ck.save(path, state(2, 4))  # async: save() itself raises, not its write future
            _check_error(info.value, errno.EROFS, parent, path)
            if mode == "async":
                assert ck._checkpoint_stager._state_dict_stager._buffers is None, "the state was staged"
                assert ck._checkpoint_process._writes == 0, "the write was sent to the writer"
            assert at.fd_count() == fds
            assert _own_shared_mappings() == shm  # nothing staged into shared memory
            assert at.dir_bytes(path) == before
            cu.assert_state_equal(ck.load(path), old)

            # Writable again: the same checkpointer saves.
            make_writable()
            new = state(3, 4)
            futures = ck.save(path, new)
            if futures is not None:
                futures[1].result(timeout=WAIT_S)
            cu.assert_state_equal(ck.load(path), new)
            assert cu.hidden_leftovers(parent) == []  # waits for the old generation to be deleted
            assert manifests_under(parent) == ["ckpt/manifest.json"]
        finally:
            ck.close()
    assert {p: s for p, s in at.writer_children().items() if p not in children_before} == {}


_EACCES_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torchckpt as tc
    from fault_util import describe, state

    if __name__ == "__main__":
        path = sys.argv[1]
        os.setgid(65534)
        os.setuid(65534)
        report = {}
        sync = tc.make_sync_checkpointer(rank_info=tc.RankInfo(0, 1))
        try:
            sync.save(path, state(2, 1))
        except Exception as e:
            report["sync"] = describe(e)
        ck = tc.make_async_checkpointer(rank_info=tc.RankInfo(0, 1))
        try:
            ck.save(path, state(2, 1))
        except Exception as e:
            report["async"] = describe(e)
        report["staged"] = ck._checkpoint_stager._state_dict_stager._buffers is not None
        report["sent"] = ck._checkpoint_process._writes
        ck.close()
        print(json.dumps(report))
    """
)


@pytest.mark.timeout(120)
def test_directory_without_write_permission_fails_in_save_before_staging() -> None:
    require_root("dropping to uid 65534 (EACCES needs a user without the permission)")
    base = tempfile.mkdtemp(prefix="torchckpt-eacces-")
    try:
        os.chmod(base, 0o755)
        parent = os.path.join(base, "ckpts")  # root's, 0755: others may read and search, not write
        path = os.path.join(parent, "ckpt")
        old = state(1, 1)
        cu.checkpointer("torch_save").save(path, old)
        before = at.dir_bytes(path)
        script = os.path.join(base, "eacces_child.py")
        with open(script, "w") as f:
            f.write(_EACCES_CHILD)
        done = run_python(script, path, timeout_s=100)
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        for mode in ("sync", "async"):
            error = report.get(mode)
            assert error is not None, f"{mode}: save() did not raise"
            assert error["type"] == "CheckpointIOError", error
            assert error["errno"] == errno.EACCES, error
            assert (error["rank"], error["operation"], error["path"]) == (0, "prepare", parent), error
            assert error["message"].startswith(f"[Errno 13] rank 0: prepare failed for {parent}: Permission denied")
        assert report["staged"] is False
        assert report["sent"] == 0
        assert at.dir_bytes(path) == before
        cu.assert_state_equal(cu.reader().read(path)[0], old)
        assert sorted(os.listdir(parent)) == [".torchckpt-lock", "ckpt"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
