"""The error tree, what the errors carry and say, and loading what is not a committed checkpoint."""

from __future__ import annotations

import errno
import os
import pickle
import warnings

import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, checkpointer, reader

import torchckpt
from torchckpt import errors
from torchckpt.checkpoint_reader import LegacyCheckpointWarning
from torchckpt.errors import (
    BarrierTimeoutError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    MissingKeysError,
    StateDictMismatchError,
    UnsafeObjectError,
    UnsupportedURLError,
    UploadError,
    WriterProcessError,
)

# As drawn in the docstring of torchckpt.errors.
TREE = {
    CheckpointNotFoundError: (FileNotFoundError,),
    CheckpointExistsError: (FileExistsError,),
    CorruptCheckpointError: (ValueError,),
    UnsafeObjectError: (TypeError,),
    ConfigError: (ValueError, AssertionError),
    UnsupportedURLError: (ValueError,),
    StateDictMismatchError: (RuntimeError,),
    MissingKeysError: (StateDictMismatchError, RuntimeError),
    CheckpointIOError: (OSError,),
    UploadError: (CheckpointIOError, OSError),
    BarrierTimeoutError: (TimeoutError,),
    WriterProcessError: (RuntimeError,),
    DistributedCheckpointError: (),
}


@pytest.mark.parametrize("cls", list(TREE), ids=lambda c: c.__name__)
def test_each_error_subclasses_its_builtin(cls: type) -> None:
    assert issubclass(cls, CheckpointError)
    assert issubclass(cls, Exception)
    for base in TREE[cls]:
        assert issubclass(cls, base), f"{cls.__name__} must subclass {base.__name__}"
    # caught by the builtin a user would write
    with pytest.raises(TREE[cls] or (CheckpointError,)):
        if cls is UploadError:
            raise cls("boom", step=1, url="s3://b/run/step_0000000001", errno=errno.EIO)
        raise cls("boom") if cls is not CheckpointIOError else cls("boom", errno=errno.EIO)


def test_error_module_lists_the_whole_tree() -> None:
    assert set(errors.__all__) == {c.__name__ for c in TREE} | {"CheckpointError"}
    assert issubclass(CheckpointError, Exception) and not issubclass(CheckpointError, (ValueError, OSError))
    for name in errors.__all__:
        assert name in errors.__doc__, f"{name} is not drawn in the docstring"


def test_errors_carry_their_attributes_and_survive_pickle() -> None:
    samples = [
        (CheckpointNotFoundError("m", path="/p"), {"path": "/p"}),
        (CheckpointExistsError("m", path="/p"), {"path": "/p"}),
        (CorruptCheckpointError("m", path="/p", file="f", key="k"), {"path": "/p", "file": "f", "key": "k"}),
        (UnsafeObjectError("m", path="/p", key="k", type_name="T"), {"path": "/p", "key": "k", "type_name": "T"}),
        (ConfigError("m", field="fld"), {"field": "fld"}),
        (UnsupportedURLError("m", path="s3://b/x", scheme="s3"), {"path": "s3://b/x", "scheme": "s3"}),
        (StateDictMismatchError("m", path="/p", key="k"), {"path": "/p", "key": "k"}),
        (MissingKeysError("m", path="/p", missing_keys=["a", "b"]), {"path": "/p", "missing_keys": ["a", "b"]}),
        (
            CheckpointIOError("disk full", errno=errno.ENOSPC, path="/p", rank=3, operation="write"),
            {"errno": errno.ENOSPC, "path": "/p", "rank": 3, "operation": "write"},
        ),
        (
            UploadError("m", step=4, url="s3://b/r/step_4", errno=errno.EIO, failures={4: "m", 5: "n"}),
            {"step": 4, "url": "s3://b/r/step_4", "path": "s3://b/r/step_4", "errno": errno.EIO,
             "operation": "upload", "failures": {4: "m", 5: "n"}},
        ),  # fmt: skip
        (BarrierTimeoutError("m", path="/p", missing_ranks=[1, 2]), {"missing_ranks": [1, 2]}),
        (WriterProcessError("m", path="/p", pid=12, exitcode=-9), {"pid": 12, "exitcode": -9}),
        (DistributedCheckpointError("m", path="/p", failures={1: "EIO"}), {"failures": {1: "EIO"}}),
    ]
    for err, attrs in samples:
        for copy in (err, pickle.loads(pickle.dumps(err))):
            assert type(copy) is type(err)
            for name, value in attrs.items():
                assert getattr(copy, name) == value, f"{type(err).__name__}.{name}"
    io = CheckpointIOError("disk full", errno=errno.ENOSPC, path="/p", rank=3, operation="write")
    assert str(io).startswith(f"[Errno {errno.ENOSPC}]") and "disk full" in str(io)
    assert str(pickle.loads(pickle.dumps(io))) == str(io)


def test_missing_directory(tmp_path) -> None:
    path = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError) as info:
        reader().read(path)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == path
    assert path in str(info.value)
    assert "does not exist" in info.value.args[0]
    with pytest.raises(FileNotFoundError):
        checkpointer("torch_save").load(path)


def _dir_without_manifest(tmp_path) -> str:
    path = tmp_path / "empty"
    path.mkdir()
    (path / "notes.txt").write_text("not a checkpoint")
    (path / "rank_00000.safetensors").write_bytes(b"\0" * 64)  # data without a commit marker
    return str(path)


def test_directory_without_manifest(tmp_path) -> None:
    path = _dir_without_manifest(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        reader().read(path)
    assert path in str(info.value)
    assert "manifest.json" in info.value.args[0] and path in info.value.args[0]
    assert info.value.path == path


def test_path_that_is_a_file(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError) as info:
        reader().read(str(path))
    assert str(path) in str(info.value)
    assert "not a directory" in info.value.args[0]


@pytest.mark.parametrize("case", ["missing", "no_manifest", "file"])
def test_not_found_message_says_why(case: str, tmp_path) -> None:
    if case == "missing":
        path, why = str(tmp_path / "nowhere"), "does not exist"
    elif case == "no_manifest":
        path, why = _dir_without_manifest(tmp_path), "manifest.json"
    else:
        (tmp_path / "file").write_bytes(b"x")
        path, why = str(tmp_path / "file"), "not a directory"
    with pytest.raises(CheckpointNotFoundError) as info:
        reader().read(path)
    # str() is the message itself, not OSError's "[Errno None] None: '<path>'"
    assert why in str(info.value) and path in str(info.value)
    assert "Errno" not in str(info.value) and "None" not in str(info.value)


def test_error_messages_survive_pickle() -> None:
    for err in (
        CheckpointNotFoundError("no checkpoint at /p: manifest.json is missing", path="/p"),
        CorruptCheckpointError("corrupt checkpoint /p: bad", path="/p", file="f", key="k"),
        CheckpointIOError(
            "rank 0: write failed for /p: No space", errno=errno.ENOSPC, path="/p", rank=0, operation="write"
        ),
    ):
        copy = pickle.loads(pickle.dumps(err))
        assert str(copy) == str(err) and copy.path == "/p"


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_onto_a_file_names_rank_operation_and_path(fmt: str, tmp_path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"keep me")
    with pytest.raises(CheckpointIOError) as info:
        checkpointer(fmt).save(str(path), {"a": torch.ones(1)})
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOTDIR
    assert err.rank == 0 and err.operation and str(path) in str(err)
    assert path.read_bytes() == b"keep me"


def test_legacy_checkpoint_loads_with_a_warning(tmp_path) -> None:
    path = tmp_path / "legacy"
    path.mkdir()
    state = {"model": {"w": torch.randn(3, 3)}, "step": 10}
    torch.save(state, path / "checkpoint_0.pt")
    with pytest.warns(LegacyCheckpointWarning, match="manifest.json") as record:
        loaded = checkpointer("torch_save").load(str(path))
    assert str(path) in str(record[0].message)
    assert_state_equal(loaded, state)
    # with a template, in place
    w = torch.empty(3, 3)
    with pytest.warns(LegacyCheckpointWarning):
        out, missing = reader().read(str(path), {"model": {"w": w}, "other": None})
    assert out["model"]["w"] is w and torch.equal(w, state["model"]["w"])
    assert missing == ["other"]


def test_legacy_checkpoint_in_the_old_torch_save_format(tmp_path) -> None:
    path = tmp_path / "legacy"
    path.mkdir()
    state = {"w": torch.arange(6.0), "n": 1}
    torch.save(state, path / "checkpoint_0.pt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyCheckpointWarning)
        assert_state_equal(reader().read(str(path))[0], state)
        w = torch.empty(6)
        reader().read(str(path), {"w": w})
    assert torch.equal(w, torch.arange(6.0))


def test_legacy_corrupt_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "legacy"
    path.mkdir()
    (path / "checkpoint_0.pt").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(CorruptCheckpointError) as info:
        reader().read(str(path))
    assert info.value.file == "checkpoint_0.pt" and "checkpoint_0.pt" in str(info.value)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="format") as info:
        torchckpt.CheckpointWriterConfig(format="pickle-me")
    assert info.value.field == "format"
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError) as info:
        torchckpt.CheckpointWriterConfig(io_threads=0)
    assert info.value.field == "io_threads"
    with pytest.raises(ConfigError) as info:
        torchckpt.RankInfo(2, 2)
    assert info.value.field == "global_rank"


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_that_is_not_json_is_refused_before_commit(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="metadata"):
        checkpointer(fmt).save(path, {"a": torch.ones(1)}, metadata={"x": {1, 2}})
    assert not os.path.exists(os.path.join(path, "manifest.json"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_rank_out_of_range(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    checkpointer(fmt).save(path, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="rank 3"):
        reader().read(path, rank=3)
