"""Types shared across torchckpt: rank information and the state-dict alias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = ["RankInfo", "STATE_DICT"]

#: A training state: a (possibly nested) mapping from keys to tensors and plain values.
STATE_DICT: TypeAlias = dict[str, Any]


@dataclass
class RankInfo:
    """Where this process stands in a distributed job.

    Attributes:
        global_rank: This process's rank, from 0 to ``global_world_size - 1``.
        global_world_size: The number of ranks in the job.
    """

    global_rank: int
    global_world_size: int

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if self.global_world_size < 1:
            raise ConfigError(
                f"RankInfo.global_world_size must be >= 1, got {self.global_world_size}",
                field="global_world_size",
            )
        if not 0 <= self.global_rank < self.global_world_size:
            raise ConfigError(
                f"RankInfo.global_rank must be in [0, {self.global_world_size}), got {self.global_rank}",
                field="global_rank",
            )
