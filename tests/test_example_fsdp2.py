"""examples/fsdp2_train.py: saved on 2 ranks, resumed on 3 (the README's commands)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import torchckpt as tc

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "fsdp2_train.py")


def _torchrun(ranks: int, root: str, steps: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone", EXAMPLE]
    done = subprocess.run(
        [*cmd, "--root", root, "--steps", str(steps)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(600)
def test_the_fsdp2_example_resumes_on_another_number_of_ranks(tmp_path) -> None:
    root = str(tmp_path / "run")
    first = _torchrun(2, root, 10)
    assert "step 10: loss" in first and "resumed" not in first
    second = _torchrun(3, root, 15)
    assert "resumed from step 10 on 3 ranks" in second
    assert "step 15: loss" in second
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.steps() == [10, 15]
        step, state = mgr.load()
    assert step == 15
    assert state["model"]["0.weight"].shape == (64, 32)
