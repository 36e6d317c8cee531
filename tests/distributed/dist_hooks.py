"""Commit hooks and writer builders that misbehave on purpose (module level: they cross into subprocesses)."""

from __future__ import annotations

import os
import signal
from typing import Any

from torchckpt.barriers import BarrierConfig, create_barrier_from_config
from torchckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from torchckpt.types import RankInfo


class FaultHook(WriterHook):
    """A hook that fails, kills or stops its own process in ``pre_commit`` when a save's keywords say so.

    ``save(path, sd, fail_ranks=[1])`` makes ``pre_commit`` raise on rank 1;
    ``kill_ranks`` / ``stop_ranks`` send SIGKILL / SIGSTOP to the process
    running the hook (the training process for a sync save, the writer
    subprocess for an async one). ``post_commit`` records the paths it saw
    in ``post_commits`` (sync saves only can look at it).
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.post_commits: list[str] = []

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if self.rank in kwargs.get("kill_ranks", ()):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank in kwargs.get("stop_ranks", ()):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.rank in kwargs.get("fail_ranks", ()):
            raise RuntimeError(f"pre_commit hook refused the commit of {path} on rank {self.rank}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self.post_commits.append(path)


def writer_with_fault_hook(
    rank_info: RankInfo, config: CheckpointWriterConfig, barrier_config: BarrierConfig
) -> CheckpointWriter:
    """A ``checkpoint_writer_init_fn`` for async checkpointers: the default writer plus a :class:`FaultHook`."""
    return CheckpointWriter(
        config=config,
        rank_info=rank_info,
        barrier=create_barrier_from_config(barrier_config),
        commit_hook=FaultHook(rank_info.global_rank),
    )


def make_checkpointer(mode: str, config: Any) -> Any:
    """A sync or async checkpointer (default barrier choice) whose writer runs a :class:`FaultHook`."""
    import torchckpt as tc
    from torchckpt.builder import default_rank_info, resolve_barrier_config

    rank_info = default_rank_info()
    if mode == "sync":
        return tc.make_sync_checkpointer(config, commit_hook=FaultHook(rank_info.global_rank))
    return tc.make_async_checkpointer(
        config,
        checkpoint_writer_init_fn=writer_with_fault_hook,
        checkpoint_writer_init_args={
            "config": config.writer_config,
            "barrier_config": resolve_barrier_config(config, rank_info, in_subprocess=True),
        },
    )


def save(ck: Any, path: str, state_dict: Any, timeout_s: float = 60, **kwargs: Any) -> None:
    """Save and, for an async checkpointer, wait for the write to finish (its error raised)."""
    futures = ck.save(path, state_dict, **kwargs)
    if futures is not None:
        futures[0].result(timeout=timeout_s)
        futures[1].result(timeout=timeout_s)
