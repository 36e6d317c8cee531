"""Builders of checkpointers with defaults that work on any machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .barriers import BarrierConfig, create_barrier_from_config
from .checkpoint_process import CheckpointProcess
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .staging import DefaultStager
from .config import CheckpointerConfig
from .types import RankInfo

__all__ = ["make_async_checkpointer", "make_sync_checkpointer"]


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


def default_subprocess_init_fn(*_: Any) -> None:
    """Default initialisation of the writer subprocess: nothing."""


def default_writer_init_fn(
    rank_info: RankInfo,
    config: CheckpointWriterConfig | None = None,
    barrier_config: BarrierConfig | None = None,
) -> CheckpointWriter:
    """Build the writer inside the subprocess (picklable: a module-level function)."""
    barrier = create_barrier_from_config(barrier_config) if barrier_config is not None else None
    return CheckpointWriter(
        config=config if config is not None else CheckpointWriterConfig(), rank_info=rank_info, barrier=barrier
    )


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
) -> AsyncCheckpointer:
    """Make a checkpointer that stages the state and writes it in a background subprocess.

    Works with no arguments on a CPU-only machine.

    Args:
        config: Component configs (None: defaults).
        rank_info: This process's rank (None: from the default process group, else 0 of 1).
        subprocess_init_fn: Runs first in the writer subprocess.
        subprocess_init_args: Its arguments.
        checkpoint_writer_init_fn: Builds the writer in the subprocess.
        checkpoint_writer_init_args: Its keyword arguments (``rank_info`` is added;
            with the default builder, the writer and barrier configs of ``config`` too).
    """
    config = config if config is not None else CheckpointerConfig()
    rank_info = rank_info if rank_info is not None else default_rank_info()
    writer_args = dict(checkpoint_writer_init_args or {})
    if checkpoint_writer_init_fn is default_writer_init_fn:
        writer_args.setdefault("config", config.writer_config)
        writer_args.setdefault("barrier_config", config.barrier_config)
    process = CheckpointProcess(
        rank_info=rank_info,
        config=config.process_config,
        subprocess_init_fn=subprocess_init_fn,
        subprocess_init_args=subprocess_init_args,
        checkpoint_writer_init_fn=checkpoint_writer_init_fn,
        checkpoint_writer_init_args=writer_args,
    )
    stager = DefaultStager(config.staging_config)
    reader = CheckpointReader(rank_info=rank_info, allow_pickle=config.writer_config.allow_pickle)
    return AsyncCheckpointer(checkpoint_stager=stager, checkpoint_process=process, reader=reader)
