"""The reference API's call forms work: config classes' positional arguments, keywords of save and load."""

from __future__ import annotations

import dataclasses
import fractions
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint._experimental.barriers as ref_barriers
import torch.distributed.checkpoint._experimental.checkpoint_process as ref_process
import torch.distributed.checkpoint._experimental.checkpoint_writer as ref_writer
import torch.distributed.checkpoint._experimental.config as ref_config
import torch.distributed.checkpoint._experimental.staging as ref_staging
from ckpt_testutil import FORMATS, assert_state_equal

import torchckpt as tc
import torchckpt.config as tc_config
from torchckpt.errors import ConfigError, UnsafeObjectError
from torchckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig
from torchckpt.types import RankInfo


def _checkpointer_config_values() -> tuple[Any, ...]:
    return (
        tc.CheckpointWriterConfig(write_barrier_timeout_secs=7),
        tc.BarrierConfig(barrier_type="dist_barrier"),
        tc.CheckpointStagerConfig(use_pinned_memory=False, use_async_staging=False),
        tc.CheckpointProcessConfig(subprocess_init_timeout_secs=3),
    )


# (ours, the reference's, positional values in the reference's field order, none of them a default)
_CONFIGS: dict[str, tuple[type, type, Callable[[], tuple[Any, ...]]]] = {
    "CheckpointWriterConfig": (tc.CheckpointWriterConfig, ref_writer.CheckpointWriterConfig, lambda: (123,)),
    "CheckpointProcessConfig": (tc.CheckpointProcessConfig, ref_process.CheckpointProcessConfig, lambda: (11, 22)),
    "CheckpointStagerConfig": (
        tc.CheckpointStagerConfig,
        ref_staging.CheckpointStagerConfig,
        lambda: (False, False, False, False),
    ),
    "BarrierConfig": (tc.BarrierConfig, ref_barriers.BarrierConfig, lambda: ("tcp_store", {"timeout_secs": 5})),
    "CheckpointerConfig": (tc.CheckpointerConfig, ref_config.CheckpointerConfig, _checkpointer_config_values),
}


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_config_takes_the_reference_positional_arguments_in_its_order(name: str) -> None:
    ours, ref, make_values = _CONFIGS[name]
    values = make_values()
    ref_names = [f.name for f in dataclasses.fields(ref) if f.init and not f.kw_only]
    our_positional = [f.name for f in dataclasses.fields(ours) if f.init and not f.kw_only]
    # The reference's fields first, in its order; our own extras only by keyword after them.
    assert our_positional == ref_names
    assert len(values) == len(ref_names)
    ref(*values)  # the same call is valid for the reference
    config = ours(*values)
    for field_name, value in zip(ref_names, values):
        assert getattr(config, field_name) == value, field_name
    with pytest.raises(TypeError):
        ours(*values, None)  # one more positional argument than the reference takes


def test_writer_config_extras_stay_keyword_only() -> None:
    config = tc.CheckpointWriterConfig(600, format="safetensors", allow_pickle=True, io_threads=3)
    assert (config.write_barrier_timeout_secs, config.format, config.allow_pickle, config.io_threads) == (
        600,
        "safetensors",
        True,
        3,
    )
    with pytest.raises(ConfigError, match="write_barrier_timeout_secs must be > 0, got 0"):
        tc.CheckpointWriterConfig(0)
    process = tc.CheckpointProcessConfig(5, 6, write_timeout_secs=7.0)
    assert (process.subprocess_init_timeout_secs, process.subprocess_shutdown_timeout_secs) == (5, 6)
    assert process.write_timeout_secs == 7.0


# (module of the reference that defines the config, name)
_CONFIG_HOMES = [
    ("torchckpt.checkpoint_writer", "CheckpointWriterConfig"),
    ("torchckpt.checkpoint_writer", "CheckpointFormat"),
    ("torchckpt.barriers", "BarrierConfig"),
    ("torchckpt.checkpoint_process", "CheckpointProcessConfig"),
    ("torchckpt.staging", "CheckpointStagerConfig"),
    ("torchckpt.config", "CheckpointerConfig"),
]


@pytest.mark.parametrize(("module", "name"), _CONFIG_HOMES)
def test_each_config_is_one_class_importable_from_the_reference_module(module: str, name: str) -> None:
    import importlib

    home = importlib.import_module(module)
    assert getattr(home, name) is getattr(tc_config, name) is getattr(tc, name)
    assert name in home.__all__
    assert name in tc_config.__all__


@pytest.mark.parametrize("name", [n for _, n in _CONFIG_HOMES if n not in ("CheckpointFormat", "CheckpointerConfig")])
def test_component_configs_are_frozen(name: str) -> None:
    cls = getattr(tc_config, name)
    config = cls()
    field_name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field_name, getattr(config, field_name))


def test_checkpointer_config_stays_assignable() -> None:
    config = tc.CheckpointerConfig()
    staging = tc.CheckpointStagerConfig(use_async_staging=False)
    config.staging_config = staging  # what the reference's own tests do
    assert config.staging_config is staging


def test_barrier_config_keeps_its_values() -> None:
    args = {"timeout_secs": 5}
    config = tc.BarrierConfig("tcp_store", args)
    assert (config.barrier_type, config.barrier_args) == ("tcp_store", args)
    assert config.barrier_args is args  # validated, never rewritten
    assert tc.BarrierConfig() == tc.BarrierConfig(None, {})


_BAD_TYPE = "BarrierConfig.barrier_type must be a barrier's registered name or None"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"barrier_type": 3}, "barrier_type", f"{_BAD_TYPE}, got 3"),
        ({"barrier_type": ""}, "barrier_type", f"{_BAD_TYPE}, got ''"),
        (
            {"barrier_type": "tcp_store", "barrier_args": [("timeout_secs", 5)]},
            "barrier_args",
            "BarrierConfig.barrier_args must be a dict of the barrier's keyword arguments, "
            "got list [('timeout_secs', 5)]",
        ),
        (
            {"barrier_type": "tcp_store", "barrier_args": {1: 5}},
            "barrier_args",
            "BarrierConfig.barrier_args must have keyword names (str) as keys, got 1",
        ),
    ],
)
def test_barrier_config_refuses_bad_values_naming_the_field(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tc.BarrierConfig(**kwargs)
    assert str(info.value) == message
    assert info.value.field == field
    assert isinstance(info.value, (ValueError, AssertionError))


def test_an_unregistered_barrier_type_is_refused_when_the_barrier_is_built() -> None:
    config = tc.BarrierConfig("no_such_barrier")  # a name may be registered after the config is made
    with pytest.raises(ConfigError, match="Unknown barrier type: no_such_barrier. Available types: "):
        tc.create_barrier_from_config(config)


# -- keywords of save and load ---------------------------------------------------------------------------------


class RecordingHook(tc.WriterHook):
    """Records the keywords each method received; takes ``step`` by name only."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def pre_commit(self, path: str, step: int = -1) -> None:  # type: ignore[override]
        self.calls.append(("pre", path, {"step": step}))

    def post_commit(self, path: str, *, step: int = -1, metadata: Any = None) -> None:  # type: ignore[override]
        self.calls.append(("post", path, {"step": step, "metadata": metadata}))


class AnyKeywordHook(tc.WriterHook):
    """Takes every keyword (``**kwargs``), as the reference's hooks do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self.calls.append(("pre", kwargs))

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self.calls.append(("post", kwargs))


def _sync(fmt: str, hook: tc.WriterHook | None = None, **writer_kw: Any) -> tc.SyncCheckpointer:
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, **writer_kw))
    return tc.make_sync_checkpointer(config, rank_info=tc.RankInfo(0, 1), commit_hook=hook)


def _async(fmt: str, **kw: Any) -> tc.AsyncCheckpointer:
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    return tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1), **kw)


def _pickled_state() -> dict[str, Any]:
    return {"w": torch.arange(4.0), "tags": {"a", "b"}, "frac": fractions.Fraction(1, 3)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_allow_pickle_on_save_is_honoured(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    ckpt = _sync(fmt)
    with pytest.raises(UnsafeObjectError, match="allow_pickle"):
        ckpt.save(path, _pickled_state())
    assert not os.path.exists(path)
    ckpt.save(path, _pickled_state(), allow_pickle=True)
    with pytest.raises(UnsafeObjectError):
        ckpt.load(path)  # loading needs the opt-in too
    assert_state_equal(ckpt.load(path, allow_pickle=True), _pickled_state())
    # per save both ways: False overrides a config that allows pickle
    with pytest.raises(UnsafeObjectError):
        _sync(fmt, allow_pickle=True).save(str(tmp_path / "other"), _pickled_state(), allow_pickle=False)
    with pytest.raises(TypeError, match="allow_pickle must be True or False, got 'yes'"):
        ckpt.save(path, _pickled_state(), allow_pickle="yes")


@pytest.mark.parametrize("fmt", FORMATS)
def test_allow_pickle_on_async_save_is_honoured(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    ckpt = _async(fmt)
    try:
        futures = ckpt.save(path, _pickled_state(), allow_pickle=True)
        assert futures is not None
        futures[1].result(timeout=120)
        assert_state_equal(ckpt.load(path, allow_pickle=True), _pickled_state())
        futures = ckpt.save(str(tmp_path / "refused"), _pickled_state())
        assert futures is not None
        with pytest.raises(UnsafeObjectError):
            futures[1].result(timeout=120)
    finally:
        ckpt.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_misspelled_keyword_is_refused_naming_it(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    with pytest.raises(TypeError) as info:
        _sync(fmt).save(path, {"w": torch.ones(2)}, alow_pickle=True)
    message = str(info.value)
    assert "unexpected keyword argument 'alow_pickle'" in message
    assert "did you mean 'allow_pickle'?" in message
    assert path in message
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == [] or all(n.endswith(".lock") for n in os.listdir(tmp_path))


def test_a_misspelled_keyword_is_refused_before_async_staging(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "ckpt")
    staged = []
    stage_flattened = tc.DefaultStager.stage_flattened
    monkeypatch.setattr(
        tc.DefaultStager, "stage_flattened", lambda self, sd, *rest: staged.append(sd) or stage_flattened(self, sd, *rest)
    )
    ckpt = _async("torch_save")
    try:
        with pytest.raises(TypeError, match="unexpected keyword argument 'metdata'.*did you mean 'metadata'"):
            ckpt.save(path, {"w": torch.ones(2)}, metdata={"a": 1})
        assert staged == []  # nothing was staged
        futures = ckpt.save(path, {"w": torch.ones(2)}, metadata={"a": 1})
        assert futures is not None
        futures[1].result(timeout=120)
    finally:
        ckpt.close()


def test_a_custom_async_writer_warns_of_unknown_keywords_in_the_subprocess(tmp_path) -> None:
    from async_testutil import step_hook_writer_init

    ckpt = _async("torch_save", checkpoint_writer_init_fn=step_hook_writer_init)
    try:
        futures = ckpt.save(str(tmp_path / "a"), {"w": torch.ones(2)}, step=3)  # the hook takes it
        assert futures is not None
        futures[1].result(timeout=120)
        # Only the subprocess knows that writer's hook: as CheckpointWriter.write (the reference's
        # low-level API, which takes any keyword) it warns there and saves.
        futures = ckpt.save(str(tmp_path / "b"), {"w": torch.ones(2)}, stpe=3)
        assert futures is not None
        futures[1].result(timeout=120)
        assert os.path.exists(tmp_path / "b" / "manifest.json")
    finally:
        ckpt.close()


def test_keywords_reach_the_hooks_that_take_them(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    named = RecordingHook()
    _sync("safetensors", named).save(path, {"w": torch.ones(2)}, step=7, metadata={"run": "x"})
    assert named.calls == [("pre", path, {"step": 7}), ("post", path, {"step": 7, "metadata": {"run": "x"}})]
    with pytest.raises(TypeError) as info:
        _sync("safetensors", named).save(path, {"w": torch.ones(2)}, stpe=1)  # a misspelling of the hook's
    assert "unexpected keyword argument 'stpe'" in str(info.value)
    assert "did you mean 'step'?" in str(info.value)
    assert "RecordingHook" in str(info.value)
    named.calls.clear()
    with pytest.warns(UserWarning, match="unexpected keyword argument .epoch.*RecordingHook takes metadata, step.*ignored"):
        _sync("safetensors", named).save(path, {"w": torch.ones(2)}, epoch=1)  # no near miss: saved
    assert named.calls == [("pre", path, {"step": -1}), ("post", path, {"step": -1, "metadata": None})]
    anything = AnyKeywordHook()
    _sync("torch_save", anything).save(path, {"w": torch.ones(2)}, epoch=1, allow_pickle=False)
    given = {"epoch": 1, "allow_pickle": False}
    assert anything.calls == [("pre", given), ("post", given)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_refuses_an_unknown_keyword(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    ckpt = _sync(fmt)
    ckpt.save(path, {"w": torch.ones(2)})
    with pytest.raises(TypeError) as info:
        ckpt.load(path, alow_pickle=True)
    assert "unexpected keyword argument 'alow_pickle'" in str(info.value)
    assert "did you mean 'allow_pickle'?" in str(info.value)
    assert path in str(info.value)
    loaded = ckpt.load(path, verify=False, rank=0, allow_pickle=False)
    assert torch.equal(loaded["w"], torch.ones(2))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_save_warns_of_a_keyword_of_its_own_and_saves(kind: str, tmp_path) -> None:
    # The reference's save hands any keyword on to its writer; PyTorch's own tests pass such
    # keywords (custom_arg=..., another_arg=42) and expect a checkpoint.
    path = str(tmp_path / "ckpt")
    ckpt = _sync("torch_save") if kind == "sync" else _async("torch_save")
    try:
        with pytest.warns(UserWarning) as record:
            futures = ckpt.save(path, {"w": torch.ones(2)}, custom_arg="x", another_arg=42)
        if futures is not None:
            futures[1].result(timeout=120)
        messages = [str(w.message) for w in record if "unexpected keyword" in str(w.message)]
        assert any("'custom_arg'" in m and m.endswith("(ignored)") for m in messages), messages
        assert any("'another_arg'" in m for m in messages), messages
        assert all(w.filename == __file__ for w in record if "unexpected keyword" in str(w.message))
        assert torch.equal(ckpt.load(path)["w"], torch.ones(2))
    finally:
        ckpt.close()


def test_the_writer_itself_warns_of_an_unknown_keyword_and_saves(tmp_path) -> None:
    # PyTorch's own tests hand CheckpointWriter.write keywords that no hook takes: they must work.
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(global_rank=0, global_world_size=1))
    path = str(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="unexpected keyword argument 'custom_arg'.*ignored"):
        writer.write(path, {"w": torch.ones(2)}, custom_arg="x")
    assert os.path.exists(os.path.join(path, "manifest.json"))
