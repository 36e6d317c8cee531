"""A full disk (ENOSPC) and a file-size limit (EFBIG) in the middle of a save over a committed checkpoint.

The disk is a small tmpfs the test mounts: the old, small checkpoint fits and
the new, bigger one does not. Standard outcome (shared/RELIABILITY.md): the
error is a ``CheckpointIOError`` with errno 28 (27) naming the rank, the
operation and the path; the old checkpoint loads byte-identical; no pending
directory carries a manifest; the space is free again; no file descriptor,
child process or ``/dev/shm`` entry is left; a later smaller save succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import textwrap

import async_testutil as at
import ckpt_testutil as cu
import pytest
from fault_util import free_bytes, manifests_under, run_python, state, tmpfs

import torchckpt as tc
from torchckpt.errors import CheckpointIOError

#: The small disk, and the states: the old one fits, the new one (more than one 16 MiB write batch,
#: so several writer threads share it) does not, the later one fits beside the old.
DISK = "24m"
OLD_MIB, NEW_MIB, LATER_MIB = 1, 40, 6
WAIT_S = 60

CASES = [
    # (format, io_threads, mode)
    ("torch_save", 1, "sync"),
    ("safetensors", 1, "sync"),
    ("safetensors", 4, "sync"),
    ("torch_save", 1, "async"),
    ("safetensors", 4, "async"),
]


def _checkpointer(fmt: str, threads: int, mode: str) -> tc.Checkpointer:
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, io_threads=threads))
    if mode == "sync":
        return tc.make_sync_checkpointer(config, rank_info=tc.RankInfo(0, 1))
    return tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))


def _save(ck: tc.Checkpointer, path: str, sd: dict) -> None:
    futures = ck.save(path, sd)
    if futures is not None:
        futures[0].result(timeout=WAIT_S)
        futures[1].result(timeout=WAIT_S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("fmt", "threads", "mode"), CASES, ids=[f"{f}-{t}threads-{m}" for f, t, m in CASES])
def test_disk_full_fails_the_save_and_keeps_the_old_checkpoint(tmp_path, fmt: str, threads: int, mode: str) -> None:
    children_before = set(at.writer_children())
    with tmpfs(str(tmp_path / "disk"), DISK) as disk:
        parent = os.path.join(disk, "ckpts")
        path = os.path.join(parent, "ckpt")
        ck = _checkpointer(fmt, threads, mode)
        try:
            old = state(1, OLD_MIB)
            _save(ck, path, old)
            before = at.dir_bytes(path)
            assert cu.hidden_leftovers(parent) == []
            free = free_bytes(disk)
            fds, shm = at.fd_count(), at.shm_count()

            with pytest.raises(CheckpointIOError) as info:
                _save(ck, path, state(2, NEW_MIB))
            error = info.value
            data_file = os.path.join(parent, ".ckpt.torchckpt-pending", cu.file_name(fmt))
            assert isinstance(error, OSError)
            assert error.errno == errno.ENOSPC
            assert error.rank == 0
            assert error.operation == "write"
            assert error.path == data_file
            assert str(error).startswith("[Errno 28] rank 0: write failed for " + data_file), str(error)
            assert "No space left on device" in str(error)

            # The old checkpoint is untouched; nothing incomplete is left, let alone with a manifest.
            assert at.dir_bytes(path) == before
            cu.assert_state_equal(ck.load(path), old)
            assert cu.hidden_leftovers(parent) == []  # waits for the old generation to be deleted
            assert manifests_under(parent) == ["ckpt/manifest.json"]
            assert free_bytes(disk) == free, "the failed save's bytes were not freed"
            assert at.fd_count() == fds
            assert at.shm_count() <= shm

            # A smaller save fits and commits; the old generation is removed.
            later = state(3, LATER_MIB)
            _save(ck, path, later)
            cu.assert_state_equal(ck.load(path), later)
            assert cu.hidden_leftovers(parent) == []
            assert manifests_under(parent) == ["ckpt/manifest.json"]
        finally:
            ck.close()
    assert {p: s for p, s in at.writer_children().items() if p not in children_before} == {}


_EFBIG_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torchckpt as tc
    from fault_util import describe, state

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    report = {}
    for fmt, path in json.loads(sys.argv[1]).items():
        ck = tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, io_threads=2)),
            rank_info=tc.RankInfo(0, 1),
        )
        try:
            ck.save(path, state(2, 8))
            report[fmt] = None
        except Exception as e:
            report[fmt] = describe(e)
    print(json.dumps(report))
    """
)


@pytest.mark.timeout(120)
def test_file_size_limit_fails_the_save_with_efbig(tmp_path) -> None:
    """``ulimit -f`` (RLIMIT_FSIZE) below the new rank file's size, SIGXFSZ ignored: EFBIG, old checkpoint intact."""
    paths = {fmt: str(tmp_path / fmt / "ckpt") for fmt in cu.FORMATS}
    old = state(1, OLD_MIB)
    before = {}
    for fmt, path in paths.items():
        cu.checkpointer(fmt).save(path, old)
        before[fmt] = at.dir_bytes(path)
    script = tmp_path / "efbig_child.py"
    script.write_text(_EFBIG_CHILD)
    done = run_python(str(script), json.dumps(paths), str(4 << 20))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for fmt, path in paths.items():
        error = report[fmt]
        assert error is not None, f"{fmt}: the save succeeded past the file size limit"
        data_file = os.path.join(os.path.dirname(path), ".ckpt.torchckpt-pending", cu.file_name(fmt))
        assert error["type"] == "CheckpointIOError", error
        assert error["errno"] == errno.EFBIG, error
        assert (error["rank"], error["operation"], error["path"]) == (0, "write", data_file), error
        assert error["message"].startswith("[Errno 27] rank 0: write failed for " + data_file), error
        assert at.dir_bytes(path) == before[fmt]
        cu.assert_state_equal(cu.checkpointer(fmt).load(path), old)
        assert cu.hidden_leftovers(os.path.dirname(path)) == []  # waits for the old generation to be deleted
        assert manifests_under(os.path.dirname(path)) == ["ckpt/manifest.json"]
