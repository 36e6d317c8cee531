"""Builders of checkpointers with defaults that work on any machine."""

from __future__ import annotations

import torch.distributed as dist

from .barriers import create_barrier_from_config
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, WriterHook
from .checkpointer import SyncCheckpointer
from .config import CheckpointerConfig
from .types import RankInfo

__all__ = ["make_sync_checkpointer"]


def default_rank_info() -> RankInfo:
    """This process's rank from the default process group, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
    return RankInfo(global_rank=0, global_world_size=1)


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """Make a checkpointer that saves in the calling thread.

    Args:
        config: Component configs (None: defaults).
        rank_info: This process's rank (None: from the default process group, else 0 of 1).
        commit_hook: Called before and after each commit.
    """
    config = config if config is not None else CheckpointerConfig()
    rank_info = rank_info if rank_info is not None else default_rank_info()
    barrier = create_barrier_from_config(config.barrier_config)
    writer = CheckpointWriter(config=config.writer_config, rank_info=rank_info, barrier=barrier, commit_hook=commit_hook)
    reader = CheckpointReader(rank_info=rank_info, allow_pickle=config.writer_config.allow_pickle)
    return SyncCheckpointer(writer=writer, reader=reader)
