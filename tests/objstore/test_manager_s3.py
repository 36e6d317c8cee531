"""CheckpointManager on an object store root (s3:// on moto's server, memory://): steps, retention, resume, ls."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import obstore
import pytest
import torch
from ckpt_testutil import NATIVE_FILE, assert_state_equal

import torchckpt as tc
from torchckpt import cli
from torchckpt.errors import CheckpointExistsError, ConfigError, CorruptCheckpointError
from torchckpt.storage.object_client import parse_object_url, store_for
from torchckpt.storage.object_storage import ObjectStorage

pytestmark = pytest.mark.timeout(120)


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(256, dtype=torch.float32) + 1000.0 * step, "b": torch.full((3, 4), step), "step": step}


def _keys_under(url: str) -> list[str]:
    loc = parse_object_url(url)
    return sorted(m["path"] for batch in obstore.list(store_for(loc), loc.key + "/") for m in batch)


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: where a URL taken for a path would create ``s3:``."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_with_retention_and_resume(s3_bucket: str, cwd: Path, async_save: bool) -> None:
    root = f"{s3_bucket}/run"
    with tc.CheckpointManager(root, keep=tc.KeepLast(2), async_save=async_save) as mgr:
        assert mgr.root == root and mgr.path(3) == f"{root}/step_0000000003"
        assert mgr.steps() == [] and mgr.latest_step() is None
        for s in (1, 2, 3):
            mgr.save(s, _state(s), metrics={"loss": 1.0 / s}).result(timeout=60)
        assert mgr.steps() == [2, 3]
    assert _keys_under(f"{root}/step_0000000001") == []  # marker and generation both deleted
    assert any(k.endswith(f"/{NATIVE_FILE}") for k in _keys_under(f"{root}/step_0000000003"))

    with tc.CheckpointManager(root, keep=tc.KeepLast(2), async_save=False) as again:  # resume in a new manager
        target = {"w": torch.zeros(256), "b": torch.zeros(3, 4, dtype=torch.int64)}
        step, loaded = again.load(target)
        assert step == 3
        assert_state_equal(loaded, {"w": _state(3)["w"], "b": _state(3)["b"]})
        assert_state_equal(again.load()[1], _state(3))
        _, older = again.load(step=2)
        assert_state_equal(older, _state(2))
    assert os.listdir(cwd) == []


def test_an_existing_step_is_refused_unless_overwrite(s3_bucket: str) -> None:
    root = f"{s3_bucket}/run"
    with tc.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, _state(1))
        with pytest.raises(CheckpointExistsError, match=f"step 1 already exists under {root}"):
            mgr.save(1, _state(5))
        mgr.save(1, _state(7), overwrite=True)
        assert mgr.steps() == [1]
        assert_state_equal(mgr.load()[1], _state(7))


def test_objects_without_a_marker_are_no_step(s3_bucket: str) -> None:
    """A crashed save of step 4 left a generation but no manifest: neither listed nor loaded nor in the way."""
    root = f"{s3_bucket}/run"
    with tc.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(3, _state(3))
        loc = parse_object_url(f"{root}/step_0000000004/gen-crashed/{NATIVE_FILE}")
        obstore.put(store_for(loc), loc.key, b"half a rank file")
        assert mgr.steps() == [3]
        assert mgr.load()[0] == 3
        mgr.save(4, _state(4))  # not refused: nothing is committed there
        assert mgr.steps() == [3, 4]
        assert_state_equal(mgr.load()[1], _state(4))
    assert ObjectStorage(f"{root}/step_0000000004").generations() != ["gen-crashed"]  # the save cleaned it


def test_a_damaged_newest_step_falls_back_to_the_previous(s3_bucket: str) -> None:
    root = f"{s3_bucket}/run"
    with tc.CheckpointManager(root, async_save=False) as mgr:
        for s in (1, 2):
            mgr.save(s, _state(s))
        key = next(k for k in _keys_under(mgr.path(2)) if k.endswith(NATIVE_FILE))
        store = store_for(parse_object_url(root))
        data = bytearray(obstore.get(store, key).bytes())
        needle = _state(2)["w"].numpy().tobytes()
        at = bytes(data).find(needle)
        assert at >= 0
        data[at + 100] ^= 0x10
        obstore.put(store, key, bytes(data))
        with pytest.warns(UserWarning, match=f"skipping step 2 at {mgr.path(2)}"):
            step, loaded = mgr.load()
        assert step == 1
        assert_state_equal(loaded, _state(1))
        with pytest.raises(CorruptCheckpointError):
            mgr.load(step=2)


def test_memory_root_sync_and_async_refused(tmp_path: Path, cwd: Path) -> None:
    root = f"memory://mgr-{os.getpid()}-{tmp_path.name}/run"
    with tc.CheckpointManager(root, async_save=False, keep=tc.KeepLast(1)) as mgr:
        for s in (1, 2):
            mgr.save(s, _state(s))
        assert mgr.steps() == [2]
        assert_state_equal(mgr.load()[1], _state(2))
    with pytest.raises(ConfigError, match="memory:// store is held by this process.*async_save=False"):
        tc.CheckpointManager(root, async_save=True)
    assert os.listdir(cwd) == []


def test_ls_on_an_object_store_root(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = f"{s3_bucket}/run"
    with tc.CheckpointManager(root, async_save=False) as mgr:
        for s in (1, 2):
            mgr.save(s, _state(s), metrics={"loss": 0.5 * s})
    assert cli.main(["ls", root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["committed"], r["path"], r["metrics"]) for r in rows] == [
        (1, True, f"{root}/step_0000000001", {"loss": 0.5}),
        (2, True, f"{root}/step_0000000002", {"loss": 1.0}),
    ]
    assert cli.main(["ls", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["step", "time"] and [line.split()[0] for line in lines[1:]] == ["1", "2"]
    assert "loss=0.5" in lines[1] and lines[1].split()[-1] == "committed"

    assert cli.main(["ls", f"{root}/step_0000000001"]) == 2  # one checkpoint, not a root
    assert "is a checkpoint, not a root of steps" in capsys.readouterr().err
    assert cli.main(["ls", "s3://no-such-bucket-torchckpt/run"]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err
    assert cli.main(["ls", "ftp://host/run"]) == 2  # no object store: refused by name
    assert "ftp://host/run: ftp:// URLs are not supported here" in capsys.readouterr().err


def test_storage_options_reach_every_part_of_the_manager(s3_bucket, moto_server, tmp_path, monkeypatch) -> None:
    # the endpoint only in storage_options: saves, listing, retention, loads and the remote tier all use them
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    options = {"endpoint": moto_server.endpoint, "allow_http": "true"}
    state = {"w": torch.arange(10.0)}
    with tc.CheckpointManager(f"{s3_bucket}/run", async_save=False, keep=tc.KeepLast(1), storage_options=options) as mgr:
        mgr.save(1, state)
        mgr.save(2, {"w": state["w"] + 1})
        assert mgr.steps() == [2]
        step, loaded = mgr.load()
    assert step == 2 and torch.equal(loaded["w"], state["w"] + 1)
    with tc.CheckpointManager(tmp_path / "local", remote=f"{s3_bucket}/tier", async_save=False,
                              storage_options=options) as mgr:  # fmt: skip
        mgr.save(5, state)
        mgr.wait_for_uploads(timeout_s=60)
        assert mgr.step_locations() == {5: ("local", "remote")}
