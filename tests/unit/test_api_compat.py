"""The reference API's call forms work: config classes' positional arguments, keywords of save and load."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed.checkpoint._experimental.barriers as ref_barriers
import torch.distributed.checkpoint._experimental.checkpoint_process as ref_process
import torch.distributed.checkpoint._experimental.checkpoint_writer as ref_writer
import torch.distributed.checkpoint._experimental.config as ref_config
import torch.distributed.checkpoint._experimental.staging as ref_staging

import torchckpt as tc
from torchckpt.errors import ConfigError


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
