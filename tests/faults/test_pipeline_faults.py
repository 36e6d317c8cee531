"""Faults of a pipelined background save: staging failing after the writer started, the writer killed mid-staging."""

from __future__ import annotations

import os
import signal

import async_testutil as at
import pytest
from pipeline_testutil import WAIT_S, CopyHook, big_state, make, next_save_loads, use_small_groups

from torchckpt.errors import WriterProcessError
from torchckpt.pipeline import StagingFailedError


def test_staging_that_fails_after_the_plan_commits_nothing(tmp_path, monkeypatch) -> None:
    use_small_groups(monkeypatch)

    def before(n: int) -> None:
        if n == 3:
            raise RuntimeError("copy failed")

    hook = CopyHook(monkeypatch, before)
    ckpt = make()
    try:
        stage, write = ckpt.save(str(tmp_path / "bad"), big_state(1))
        with pytest.raises(RuntimeError, match="^copy failed$"):
            stage.result(timeout=WAIT_S)
        with pytest.raises(StagingFailedError, match=r"failed in the training process: RuntimeError: copy failed"):
            write.result(timeout=WAIT_S)
        assert not (tmp_path / "bad").exists()
        next_save_loads(ckpt, hook, tmp_path / "good")  # the same writer goes on
    finally:
        ckpt.close()
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["good"]


def test_a_writer_killed_mid_pipeline_fails_the_write_not_staging(tmp_path, monkeypatch) -> None:
    use_small_groups(monkeypatch)
    ckpt = make()

    def before(n: int) -> None:
        if n == 2:
            proc = at.writer_process(ckpt)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(WAIT_S)

    hook = CopyHook(monkeypatch, before)
    try:
        stage, write = ckpt.save(str(tmp_path / "lost"), big_state(1))
        stage.result(timeout=WAIT_S)  # staging itself succeeded
        with pytest.raises(WriterProcessError, match="killed by SIGKILL"):
            write.result(timeout=WAIT_S)
        next_save_loads(ckpt, hook, tmp_path / "next")  # a new writer takes over
    finally:
        ckpt.close()
    assert not (tmp_path / "lost" / "manifest.json").exists()
