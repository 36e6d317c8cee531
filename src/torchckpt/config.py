"""The configuration of a checkpointer: one config per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from .barriers import BarrierConfig
from .checkpoint_process import CheckpointProcessConfig
from .checkpoint_writer import CheckpointWriterConfig
from .staging import CheckpointStagerConfig

__all__ = ["CheckpointerConfig"]


@dataclass
class CheckpointerConfig:
    """Everything the builders need to make a checkpointer.

    Attributes:
        writer_config: Options of the writer (format, timeout, pickle).
        barrier_config: Which barrier synchronises the ranks (None: chosen by the builder).
        staging_config: Options of the stager (async checkpointers only).
        process_config: Options of the writer subprocess (async checkpointers only).
    """

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
