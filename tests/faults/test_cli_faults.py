"""The ``torchckpt`` command on a full disk and on a read-only root.

``export`` onto a full disk fails with one line naming the user's OUT path
and the errno, removes its temporary file and frees the space; ``gc`` on a
read-only root reports every directory it could not delete (path and errno)
and exits 1, never "nothing to delete".
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fault_util import child_env, free_bytes, remount, tmpfs

import torchckpt as tc
from ckpt_testutil import checkpointer

pytestmark = pytest.mark.timeout(180)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True, timeout=90, env=child_env()
    )


@pytest.mark.parametrize("layout", ["safetensors", "torch_save"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_onto_a_full_disk_names_out_and_leaves_nothing(tmp_path, layout: str, fmt: str) -> None:
    src = str(tmp_path / "ckpt")
    checkpointer(layout).save(src, {"w": torch.rand(600_000), "meta": {"step": 3}})  # 2.3 MiB
    with tmpfs(str(tmp_path / "disk"), "1m") as disk:
        free = free_bytes(disk)
        for out in (os.path.join(disk, "model.out"), disk):  # a file, and a folder to write into
            r = _cli("export", src, out, "--format", fmt)
            assert r.returncode == 2, r
            inside = "ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt"
            named = out if out != disk else os.path.join(disk, inside)
            assert r.stderr == f"torchckpt: cannot export to {named}: [Errno 28] No space left on device\n", r
            assert r.stdout == "", r
            assert os.listdir(disk) == [], "the temporary file was left behind"
            assert free_bytes(disk) == free


def test_gc_on_a_read_only_root_reports_every_failure(tmp_path) -> None:
    with tmpfs(str(tmp_path / "disk"), "16m") as disk:
        root = os.path.join(disk, "root")
        with tc.CheckpointManager(root, async_save=False) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, {"w": torch.full((10,), float(step))})
        trash = os.path.join(root, ".step_0000000003.torchckpt-trash-0abc")
        os.makedirs(trash)
        before = sorted(os.listdir(root))
        remount(disk, "ro")
        try:
            dry = _cli("gc", root, "--keep-last", "1", "--dry-run")
            real = _cli("gc", root, "--keep-last", "1")
        finally:
            remount(disk, "rw")
        assert sorted(os.listdir(root)) == before

    assert dry.returncode == 0, dry
    assert dry.stdout.splitlines()[0] == "would delete 2 step(s): [1, 2]", dry

    assert real.returncode == 1, real
    assert "nothing to delete" not in real.stdout, real
    assert real.stdout.splitlines() == ["deleted 0 step(s): []; could not delete 2: [1, 2]"], real
    failed = sorted(real.stderr.splitlines())
    assert failed == sorted(
        f"torchckpt: could not delete {p}: [Errno 30] Read-only file system"
        for p in (os.path.join(root, "step_0000000001"), os.path.join(root, "step_0000000002"), trash)
    ), real
