"""Builders of checkpointers with defaults that work on any machine."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .barriers import BarrierConfig, create_barrier_from_config
from .checkpoint_process import CheckpointProcess
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .staging import DefaultStager
from .stores import start_store
from .config import CheckpointerConfig
from .types import RankInfo

__all__ = ["make_async_checkpointer", "make_sync_checkpointer"]


def default_rank_info() -> RankInfo:
    """This process's rank from the default process group, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
    return RankInfo(global_rank=0, global_world_size=1)


_OWN_STORES: list[Any] = []  # stores this process serves for its writer subprocesses; live as long as it


def _job_store_address() -> tuple[str, int]:
    """Host and port of a TCPStore every rank's writer subprocess can join.

    The store the job already runs (torchrun's agent store, or the process
    group's) when it is a TCPStore; otherwise rank 0 starts one, listening on
    ``MASTER_ADDR`` (default 127.0.0.1) only, and tells the others its port.
    """
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return store.host, store.port
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        _OWN_STORES.append(start_store(host, dist.get_world_size()))
        box[0] = _OWN_STORES[-1].port
    dist.broadcast_object_list(box, src=0)
    return host, int(box[0])


def resolve_barrier_config(config: CheckpointerConfig, rank_info: RankInfo, *, in_subprocess: bool) -> BarrierConfig:
    """The barrier a checkpointer uses: the configured one (rank fields filled in), or one chosen for the job.

    With no barrier configured and ``torch.distributed`` initialised with more
    than one rank: a ``DistBarrier`` for saves in the training process, a
    ``StoreBarrier`` on the job's store for writer subprocesses.
    """
    bc = config.barrier_config
    timeout = config.writer_config.write_barrier_timeout_secs
    if bc.barrier_type is not None:
        args = dict(bc.barrier_args)
        if bc.barrier_type in ("tcp_store", "store"):
            args.setdefault("global_rank", rank_info.global_rank)
            args.setdefault("global_world_size", rank_info.global_world_size)
        return BarrierConfig(barrier_type=bc.barrier_type, barrier_args=args)
    if rank_info.global_world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return bc
    if not in_subprocess:
        return BarrierConfig(barrier_type="dist_barrier", barrier_args={"timeout_secs": timeout})
    host, port = _job_store_address()
    return BarrierConfig(
        barrier_type="store",
        barrier_args={
            "global_rank": rank_info.global_rank,
            "global_world_size": rank_info.global_world_size,
            "master_address": host,
            "port": port,
            "timeout_secs": timeout,
        },
    )


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
    barrier = create_barrier_from_config(resolve_barrier_config(config, rank_info, in_subprocess=False))
    writer = CheckpointWriter(config=config.writer_config, rank_info=rank_info, barrier=barrier, commit_hook=commit_hook)
    reader = CheckpointReader(
        rank_info=rank_info, allow_pickle=config.writer_config.allow_pickle,
        storage_options=config.writer_config.storage_options,
    )  # fmt: skip
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
        writer_args.setdefault("barrier_config", resolve_barrier_config(config, rank_info, in_subprocess=True))
    process = CheckpointProcess(
        rank_info=rank_info,
        config=config.process_config,
        subprocess_init_fn=subprocess_init_fn,
        subprocess_init_args=subprocess_init_args,
        checkpoint_writer_init_fn=checkpoint_writer_init_fn,
        checkpoint_writer_init_args=writer_args,
    )
    stager = DefaultStager(config.staging_config)
    reader = CheckpointReader(
        rank_info=rank_info, allow_pickle=config.writer_config.allow_pickle,
        storage_options=config.writer_config.storage_options,
    )  # fmt: skip
    # The default writer has no commit hook: keywords torchckpt does not know are refused before staging.
    hook_keywords = frozenset() if checkpoint_writer_init_fn is default_writer_init_fn else None
    return AsyncCheckpointer(
        checkpoint_stager=stager, checkpoint_process=process, reader=reader, hook_keywords=hook_keywords
    )
