"""Overwriting where the file system cannot exchange two directories, and a crash between the two renames.

Without ``renameat2(RENAME_EXCHANGE)`` (NFS, several FUSE and network file
systems, older kernels) an overwrite takes two renames: the old checkpoint to
``.<name>.torchckpt-previous``, then the new one to ``<name>``. A process
killed between them leaves nothing at ``<name>``. The promise still holds: a
load of ``<name>`` reads the previous generation, the next save to that
directory (and a manager opening it) first puts it back, and no clean-up ever
deletes it while it is the only committed copy.

The crash is real: a child process saves through a file-system layer whose
``exchange`` reports "not supported" and which SIGKILLs the process at the
second rename.
"""

from __future__ import annotations

import os
import shutil
import signal
import textwrap

import ckpt_testutil as cu
import pytest
from fault_util import manifests_under, run_python, state
from faultfs import FaultFS

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CheckpointIOError
from torchckpt.storage import fs
from torchckpt.storage.fs import LocalFS
from torchckpt.verify import verify_checkpoint

OLD, NEW = state(1, 0.25), state(2, 0.25)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torchckpt as tc
    from fault_util import state
    from torchckpt.storage import fs
    from torchckpt.storage.fs import LocalFS

    path, fmt = os.path.realpath(sys.argv[1]), sys.argv[2]

    class CrashBetweenTheRenames(LocalFS):
        def exchange(self, a, b):
            return False

        def rename(self, src, dst):
            if dst == path and src.endswith(".torchckpt-pending"):
                os.kill(os.getpid(), signal.SIGKILL)  # the old one is aside, the new one not yet in place
            super().rename(src, dst)

    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    with fs.install(CrashBetweenTheRenames()):
        tc.make_sync_checkpointer(config, rank_info=tc.RankInfo(0, 1)).save(path, state(2, 0.25))
    print("the save was not interrupted")
    """
)


class NoExchangeFS(LocalFS):
    """The local file system as it is on NFS: no RENAME_EXCHANGE."""

    def exchange(self, a: str, b: str) -> bool:
        return False


def _crash_between_the_renames(path: str, fmt: str, tmp_path) -> None:
    script = str(tmp_path / "crash_between_renames.py")
    with open(script, "w") as f:
        f.write(CHILD)
    done = run_python(script, path, fmt)
    assert done.returncode == -signal.SIGKILL, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict[str, str]:
    """Per format: a directory where an overwrite of ``ckpt`` (OLD by NEW) was killed between its renames."""
    out = {}
    for fmt in cu.FORMATS:
        parent = str(tmp_path_factory.mktemp(f"crashed-{fmt}"))
        path = os.path.join(parent, "ckpt")
        cu.checkpointer(fmt).save(path, OLD)
        _crash_between_the_renames(path, fmt, tmp_path_factory.mktemp(f"script-{fmt}"))
        out[fmt] = parent
    return out


def _copy(crashed: dict[str, str], fmt: str, dest: str) -> str:
    shutil.copytree(crashed[fmt], dest, symlinks=True)
    return os.path.join(dest, "ckpt")


def test_after_a_crash_between_the_renames_the_old_checkpoint_loads_at_its_path(
    crashed: dict[str, str], tmp_path, fmt: str
) -> None:
    path = _copy(crashed, fmt, str(tmp_path / "run"))
    parent = os.path.dirname(path)
    previous = os.path.join(parent, ".ckpt.torchckpt-previous")
    assert not os.path.lexists(path) and os.path.isdir(previous), sorted(os.listdir(parent))
    loaded, missing = cu.reader().read(path)  # checksums verified
    assert missing == []
    cu.assert_state_equal(loaded, OLD)
    assert read_manifest(path).layout == fmt
    manifest, problems = verify_checkpoint(path)
    assert manifest is not None and problems == []
    cu.assert_state_equal(cu.checkpointer(fmt).load(path), OLD)
    assert os.path.isdir(previous) and not os.path.lexists(path), "a load changed the directory"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
def test_the_next_save_puts_the_old_checkpoint_back_first(
    crashed: dict[str, str], tmp_path, fmt: str, exchange: bool
) -> None:
    """The next save restores the old checkpoint before it writes; failing, it leaves it at the path."""
    path = _copy(crashed, fmt, str(tmp_path / "run"))
    parent = os.path.dirname(path)
    layer = FaultFS(parent, fail_at=0, fail_ops=["pwritev", "write", "pwrite"])
    if not exchange:
        layer.exchange = NoExchangeFS().exchange  # type: ignore[method-assign]
    with fs.install(layer), pytest.raises(CheckpointIOError) as info:
        cu.checkpointer(fmt).save(path, NEW)
    assert info.value.operation == "write"
    assert os.path.isdir(path) and not os.path.islink(path)
    cu.assert_state_equal(cu.reader().read(path)[0], OLD)
    assert cu.hidden_leftovers(parent) == [], sorted(os.listdir(parent))

    with fs.install(NoExchangeFS() if not exchange else LocalFS()):
        cu.checkpointer(fmt).save(path, NEW)
    cu.assert_state_equal(cu.reader().read(path)[0], NEW)
    assert cu.hidden_leftovers(parent) == []
    assert manifests_under(parent) == ["ckpt/manifest.json"]


def test_a_manager_lists_and_loads_a_step_caught_between_the_renames(tmp_path, fmt: str) -> None:
    root = str(tmp_path / "root")
    with tc.CheckpointManager(root, async_save=False, format=fmt) as mgr:
        mgr.save(1, state(0, 0.25))
        mgr.save(2, OLD)
        step_2 = mgr.path(2)
    _crash_between_the_renames(step_2, fmt, tmp_path)
    assert not os.path.lexists(step_2)
    with tc.CheckpointManager(root, async_save=False, format=fmt, keep=tc.KeepLast(1)) as mgr:
        assert mgr.steps() == [1, 2]
        step, loaded = mgr.load()
        assert step == 2
        cu.assert_state_equal(loaded, OLD)
        mgr.save(3, NEW)
        assert mgr.steps() == [3]
    # Only the interrupted save's pending directory is left (as after any crash, until step 2 is saved again).
    assert cu.hidden_leftovers(root) == [".step_0000000002.torchckpt-pending"]


def test_a_save_without_exchange_keeps_foreign_files_and_leaves_nothing_behind(tmp_path, fmt: str) -> None:
    path = str(tmp_path / "ckpt")
    cu.checkpointer(fmt).save(path, OLD)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("mine")
    with fs.install(NoExchangeFS()):
        for s in (NEW, OLD, NEW):
            cu.checkpointer(fmt).save(path, s)
    cu.assert_state_equal(cu.reader().read(path)[0], NEW)
    with open(os.path.join(path, "notes.txt")) as f:
        assert f.read() == "mine"
    assert cu.hidden_leftovers(str(tmp_path)) == []
