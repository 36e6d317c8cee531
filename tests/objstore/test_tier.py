"""CheckpointManager(local_root, remote=URL): background uploads, retention per tier, loads from either, failures."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_testutil import NATIVE_FILE, assert_state_equal, checkpointer, reader, truncate
from manager_testutil import wait_for
from s3_testutil import MotoServer, s3_env

import torchckpt as tc
import torchckpt.step_upload as step_upload
from torchckpt import cli
from torchckpt.errors import (
    CheckpointExistsError, CheckpointIOError, ConfigError, CorruptCheckpointError, UnsupportedURLError, UploadError,
)  # fmt: skip
from torchckpt.format.manifest import MANIFEST_NAME
from torchckpt.reading import open_checkpoint
from torchckpt.step_copy import copy_checkpoint
from torchckpt.step_store import ObjectSteps
from torchckpt.step_upload import UploadConfig
from torchckpt.storage.object_storage import ObjectStorage

pytestmark = pytest.mark.timeout(120)

FAST = UploadConfig(attempts=2, backoff_s=0.05, close_timeout_s=60, room_timeout_s=60)


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(4096, dtype=torch.float32) + 1000.0 * step, "ids": torch.arange(7) * step, "step": step}


def _dirs(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if not n.startswith("."))


def _remote_steps(url: str) -> list[int]:
    return [c.step for c in ObjectSteps(url).committed()]


def _manifest_bytes(path: str) -> bytes:
    with open_checkpoint(path) as snapshot:
        src = snapshot.generation.open(MANIFEST_NAME)
        return src.read(0, src.size)


class Gate:
    """Holds every upload (``copy_checkpoint``) until opened; counts the uploads that reached it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.reached: list[str] = []
        self.committed_first: list[bool] = []  # whether the local step was committed when its upload started
        real = step_upload.copy_checkpoint

        def gated(src: str, dst: str, **kw: Any) -> int:
            self.committed_first.append(os.path.exists(os.path.join(src, MANIFEST_NAME)))
            self.reached.append(dst)
            assert self.open.wait(60), "the gate was never opened"
            return real(src, dst, **kw)

        monkeypatch.setattr(step_upload, "copy_checkpoint", gated)


@pytest.fixture
def remote(s3_bucket: str) -> str:
    return f"{s3_bucket}/run"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saves_upload_in_the_background_and_load_from_either_tier(
    tmp_path: Path, remote: str, async_save: bool
) -> None:
    local = str(tmp_path / "local")
    with tc.CheckpointManager(local, remote=remote, keep=tc.KeepLast(2), async_save=async_save, upload=FAST) as mgr:
        assert mgr.remote == remote
        for s in (1, 2, 3):
            mgr.save(s, _state(s), metrics={"loss": 1.0 / s}).result(timeout=60)
        mgr.wait_for_uploads(timeout_s=60)
        assert mgr.pending_uploads() == [] and mgr.upload_errors == {}
        assert _dirs(local) == ["step_0000000002", "step_0000000003"]
        assert _remote_steps(remote) == [2, 3]  # retention of the remote, on its own
        assert mgr.step_locations() == {2: ("local", "remote"), 3: ("local", "remote")}
        for s in (2, 3):
            assert _manifest_bytes(f"{remote}/step_{s:010d}") == _manifest_bytes(mgr.path(s))
            loaded, _ = reader().read(f"{remote}/step_{s:010d}")
            assert_state_equal(loaded, _state(s))

        shutil.rmtree(mgr.path(3))  # the newest step lost locally: loaded from the remote
        assert mgr.step_locations() == {2: ("local", "remote"), 3: ("remote",)}
        assert mgr.steps() == [2, 3] and mgr.latest_step() == 3
        step, loaded = mgr.load()
        assert step == 3
        assert_state_equal(loaded, _state(3))
        _, two = mgr.load(step=2)
        assert_state_equal(two, _state(2))

    shutil.rmtree(local)  # a fresh machine: resume from the remote
    with tc.CheckpointManager(local, remote=remote, async_save=False) as fresh:
        assert fresh.steps() == [2, 3]
        step, loaded = fresh.load()
        assert step == 3
        assert_state_equal(loaded, _state(3))


def test_a_damaged_local_copy_loads_from_the_remote(tmp_path: Path, remote: str) -> None:
    with tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False, upload=FAST) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        mgr.wait_for_uploads(timeout_s=60)
        truncate(os.path.join(mgr.path(2), NATIVE_FILE), 100)
        with pytest.warns(UserWarning, match=f"step 2 at {mgr.path(2)} cannot be loaded .*; loading it from {remote}/"):
            step, loaded = mgr.load()
        assert step == 2
        assert_state_equal(loaded, _state(2))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_local_step_is_kept_until_its_upload_is_done(
    tmp_path: Path, remote: str, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    gate = Gate(monkeypatch)
    config = UploadConfig(attempts=1, max_pending=5)
    local = tmp_path / "local"
    with tc.CheckpointManager(local, remote=remote, keep=tc.KeepLast(1), async_save=async_save, upload=config) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s)).result(timeout=60)  # returns at local speed: the upload of step 1 is held
        wait_for(lambda: len(gate.reached) == 1, 30, "the first upload to start")
        assert mgr.pending_uploads() == [1, 2, 3]
        assert mgr.step_locations() == {1: ("local",), 2: ("local",), 3: ("local",)}  # none deleted: not uploaded
        assert _remote_steps(remote) == []
        gate.open.set()
        mgr.wait_for_uploads(timeout_s=60)
        assert mgr.step_locations() == {3: ("local", "remote")}
        assert gate.reached == [f"{remote}/step_{s:010d}" for s in (1, 2, 3)]  # one at a time, in order
        assert gate.committed_first == [True, True, True]  # each upload started after its local commit


def test_a_save_waits_for_room_bounded(tmp_path: Path, remote: str, monkeypatch) -> None:
    gate = Gate(monkeypatch)
    config = UploadConfig(max_pending=1, room_timeout_s=0.3)
    mgr = tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False, upload=config)
    try:
        mgr.save(1, _state(1))
        with pytest.raises(CheckpointIOError) as info:
            mgr.save(2, _state(2))
        assert info.value.errno == errno.ETIMEDOUT
        message = f"cannot save step 2: the uploads of steps [1] to {remote} are still pending after 0.3s"
        assert message in str(info.value)
        assert mgr.step_locations() == {1: ("local",)}
        with pytest.raises(UploadError) as waited:
            mgr.wait_for_uploads(timeout_s=0.2)
        assert waited.value.errno == errno.ETIMEDOUT and waited.value.step == 1
        assert f"the uploads of steps [1] to {remote} are still pending after 0.2s" in str(waited.value)
        gate.open.set()
        mgr.save(2, _state(2))
        mgr.wait_for_uploads(timeout_s=60)
        assert _remote_steps(remote) == [1, 2]
    finally:
        gate.open.set()
        mgr.close()


def test_close_waits_for_the_pending_uploads(tmp_path: Path, remote: str) -> None:
    with tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=True) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    assert _remote_steps(remote) == [1, 2]


def test_an_upload_abandoned_by_the_last_run_is_done_when_the_manager_opens(tmp_path: Path, remote: str) -> None:
    with tc.CheckpointManager(tmp_path / "local", async_save=False) as mgr:  # a run that never uploaded
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    assert _remote_steps(remote) == []
    with tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False) as mgr:
        mgr.wait_for_uploads(timeout_s=60)
        assert _remote_steps(remote) == [2]  # the newest local step; older ones are not resumed
        assert mgr.step_locations() == {1: ("local",), 2: ("local", "remote")}
    with tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False) as mgr:
        assert mgr.pending_uploads() == []  # the remote is as new: nothing to resume
    shutil.rmtree(tmp_path / "local")
    with tc.CheckpointManager(tmp_path / "fresh", remote=remote, async_save=False) as mgr:
        step, loaded = mgr.load()
    assert step == 2
    assert_state_equal(loaded, _state(2))


def test_a_failed_attempt_is_retried_with_backoff(tmp_path: Path, remote: str, monkeypatch, caplog) -> None:
    real = step_upload.copy_checkpoint
    calls: list[str] = []

    def flaky(src: str, dst: str, **kw: Any) -> int:
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.ECONNRESET, f"put {dst}: connection reset")
        return real(src, dst, **kw)

    monkeypatch.setattr(step_upload, "copy_checkpoint", flaky)
    with caplog.at_level(logging.WARNING, logger="torchckpt.step_upload"):
        with tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False, upload=FAST) as mgr:
            mgr.save(1, _state(1))
            mgr.wait_for_uploads(timeout_s=60)
            assert mgr.upload_errors == {}
    assert len(calls) == 2
    assert _remote_steps(remote) == [1]
    assert any("upload of step 1" in r.getMessage() and "attempt 1 of 2" in r.getMessage() for r in caplog.records)


@pytest.fixture
def stopped_remote(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MotoServer, str]]:
    """A second S3 server with a bucket, stopped: ``(server, bucket)``; the environment points at it."""
    server = MotoServer().start()
    try:
        bucket = server.bucket()
        for k, v in s3_env(server.endpoint).items():
            monkeypatch.setenv(k, v)
        server.stop()
        yield server, bucket
    finally:
        server.stop()


def test_a_failed_upload_is_reported_keeps_the_local_copy_and_is_retried(tmp_path: Path, stopped_remote) -> None:
    server, bucket = stopped_remote
    remote = f"s3://{bucket}/run"
    url = f"{remote}/step_0000000001"
    mgr = tc.CheckpointManager(tmp_path / "local", remote=remote, async_save=False, upload=FAST)
    try:
        mgr.save(1, _state(1))
        with pytest.raises(UploadError) as info:
            mgr.wait_for_uploads(timeout_s=60)
        e = info.value
        assert (e.step, e.url, e.operation) == (1, url, "upload")
        assert isinstance(e, OSError)
        assert f"upload of step 1 to {url} failed after 2 attempts:" in str(e)
        assert "(the local copy is intact)" in str(e)
        assert list(mgr.upload_errors) == [1]
        mgr.wait_for_uploads(timeout_s=60)  # raised once
        assert mgr.step_locations() == {1: ("local",)}  # the remote cannot be listed: the local steps
        step, loaded = mgr.load()
        assert step == 1
        assert_state_equal(loaded, _state(1))

        back = MotoServer(port=server.port).start()  # the server is back (empty: the bucket made again)
        try:
            back.bucket(bucket)
            assert mgr.retry_uploads() == [1]
            mgr.wait_for_uploads(timeout_s=60)
            assert mgr.upload_errors == {}
            assert _remote_steps(remote) == [1]
            assert_state_equal(reader().read(url)[0], _state(1))
        finally:
            mgr.close()
            back.stop()
    finally:
        mgr.close()


def test_close_raises_an_upload_failure_not_raised_before(tmp_path: Path, stopped_remote) -> None:
    _, bucket = stopped_remote
    mgr = tc.CheckpointManager(tmp_path / "local", remote=f"s3://{bucket}/run", async_save=False, upload=FAST)
    mgr.save(1, _state(1))
    with pytest.raises(UploadError, match=f"upload of step 1 to s3://{bucket}/run/step_0000000001 failed"):
        mgr.close()
    assert os.listdir(mgr.path(1))  # intact


def test_another_checkpoint_at_the_remote_step_is_replaced_only_with_overwrite(tmp_path: Path, remote: str) -> None:
    with tc.CheckpointManager(tmp_path / "a", remote=remote, async_save=False, upload=FAST) as first:
        first.save(1, _state(1))
    with tc.CheckpointManager(tmp_path / "b", remote=remote, async_save=False, upload=FAST) as second:
        second.save(1, _state(9))
        with pytest.raises(UploadError) as info:
            second.wait_for_uploads(timeout_s=60)
        assert "failed after 1 attempt: " in str(info.value)  # not retried: no retry can mend it
        assert f"{remote}/step_0000000001 holds another checkpoint" in str(info.value)
        assert isinstance(info.value.__cause__, CheckpointExistsError)
        assert_state_equal(reader().read(f"{remote}/step_0000000001")[0], _state(1))  # untouched
        second.save(1, _state(9), overwrite=True)
        second.wait_for_uploads(timeout_s=60)
        assert_state_equal(reader().read(f"{remote}/step_0000000001")[0], _state(9))


def test_a_copy_never_commits_incomplete_objects(tmp_path: Path, remote: str) -> None:
    src = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(src, _state(1))
    dst = f"{remote}/copy"
    assert copy_checkpoint(src, dst, replace=False) == os.path.getsize(os.path.join(src, NATIVE_FILE))
    assert copy_checkpoint(src, dst, replace=False) == 0  # the same checkpoint is there: nothing to do

    size = os.path.getsize(os.path.join(src, NATIVE_FILE))
    truncate(os.path.join(src, NATIVE_FILE), size // 2)
    other = f"{remote}/other"
    with pytest.raises(CorruptCheckpointError, match=f"{NATIVE_FILE} is {size // 2} bytes, the manifest says {size}"):
        copy_checkpoint(src, other, replace=False)
    assert ObjectStorage(other).read_marker(MANIFEST_NAME) is None
    assert ObjectStorage(other).generations() == []  # the unfinished copy removed


def test_ls_shows_where_each_step_is(tmp_path: Path, remote: str, capsys: pytest.CaptureFixture[str]) -> None:
    local = str(tmp_path / "local")
    with tc.CheckpointManager(local, remote=remote, async_save=False, upload=FAST) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(s))
        mgr.wait_for_uploads(timeout_s=60)
    shutil.rmtree(os.path.join(local, "step_0000000001"))
    ObjectSteps(remote).delete(ObjectSteps(remote).committed()[-1])  # step 3 gone from the remote
    os.makedirs(os.path.join(local, "step_0000000004"))  # a crashed local save

    assert cli.main(["ls", local, "--remote", remote, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["location"], r["locations"], r["committed"]) for r in rows] == [
        (1, "remote", ["remote"], True),
        (2, "both", ["local", "remote"], True),
        (3, "local", ["local"], True),
        (4, "-", [], False),
    ]
    assert rows[0]["path"] == f"{remote}/step_0000000001" and rows[1]["path"] == os.path.join(local, "step_0000000002")
    assert cli.main(["ls", local, "--remote", remote]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["step", "location", "time"]
    assert [line.split()[:2] for line in lines[1:]] == [["1", "remote"], ["2", "both"], ["3", "local"], ["4", "-"]]
    assert cli.main(["ls", local]) == 0  # without --remote: as before, no location column
    assert "location" not in capsys.readouterr().out.splitlines()[0]


def test_a_local_directory_as_the_remote(tmp_path: Path) -> None:
    remote = str(tmp_path / "remote")
    with tc.CheckpointManager(tmp_path / "local", remote=remote, keep=tc.KeepLast(1), async_save=False) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        mgr.wait_for_uploads(timeout_s=60)
        assert _dirs(remote) == ["step_0000000002"]
        shutil.rmtree(mgr.path(2))
        assert mgr.load()[0] == 2


def test_bad_tier_arguments_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote must be another root than the local one"):
        tc.CheckpointManager(tmp_path, remote=str(tmp_path), async_save=False)
    with pytest.raises(ConfigError, match="pass remote= too"):
        tc.CheckpointManager(tmp_path, upload=UploadConfig(), async_save=False)
    with pytest.raises(ConfigError, match="UploadConfig.attempts must be an int >= 1, got 0"):
        UploadConfig(attempts=0)
    with pytest.raises(ConfigError, match="UploadConfig.backoff_s must be a number >= 0"):
        UploadConfig(backoff_s=-1)
    with pytest.raises(UnsupportedURLError, match="ftp://host/x: ftp:// URLs are not supported"):
        tc.CheckpointManager(tmp_path, remote="ftp://host/x", async_save=False)
