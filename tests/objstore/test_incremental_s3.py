"""Incremental saves with an object store: an s3:// root, and a remote tier that uploads the steps referred to."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
from ckpt_testutil import assert_state_equal

import torchckpt as tc
from torchckpt.reading import read_manifest
from torchckpt.retention import KeepLast
from torchckpt.step_store import ObjectSteps
from torchckpt.step_upload import UploadConfig
from torchckpt.verify import verify_checkpoint

pytestmark = pytest.mark.timeout(120)

FAST = UploadConfig(attempts=2, backoff_s=0.05, close_timeout_s=60, room_timeout_s=60)


def _state(step: int, frozen: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"frozen": frozen, "lora": torch.randn(2048, generator=g), "step": step}


def _frozen() -> torch.Tensor:
    return torch.randn(1 << 18, generator=torch.Generator().manual_seed(3))


def test_object_store_root(s3_bucket: str) -> None:
    root = f"{s3_bucket}/run"
    frozen = _frozen()
    with tc.CheckpointManager(root, async_save=False, incremental=True, keep=[KeepLast(1)]) as m:
        for step in range(3):
            m.save(step, _state(step, frozen))
        assert m.steps() == [0, 2]  # 0 holds the frozen bytes 2 refers to
        entry = read_manifest(m.path(2)).ranks[0]
        assert entry.size_bytes == 4096 + 2048 * 4
        assert [r.checkpoint for r in entry.refs] == ["../step_0000000000"]
        assert_state_equal(m.load()[1], _state(2, frozen))
        _, problems = verify_checkpoint(m.path(2))
        assert problems == []


def test_remote_tier_uploads_the_steps_referred_to(tmp_path, s3_bucket: str) -> None:
    local = str(tmp_path / "local")
    remote = f"{s3_bucket}/run"
    frozen = _frozen()
    with tc.CheckpointManager(
        local, remote=remote, upload=FAST, async_save=False, incremental=True, keep=[KeepLast(1)]
    ) as m:
        for step in range(3):
            m.save(step, _state(step, frozen))
        m.wait_for_uploads()
        assert m.steps() == [0, 2]
    # Remote retention followed the references too: 0 stays while 2 refers to it.
    assert [c.step for c in ObjectSteps(remote).committed()] == [0, 2]
    shutil.rmtree(local)  # the remote copy loads on its own
    os.makedirs(local)
    with tc.CheckpointManager(local, remote=remote, upload=FAST, async_save=False) as m:
        step, state = m.load()
        assert step == 2
        assert_state_equal(state, _state(2, frozen))
