"""Helpers of the CheckpointManager tests: writers that wait at a gate or fail, two ranks in one process,
and the child of the signal tests.

The writer subprocess is started with ``spawn``: what it runs must be importable
by name. ``tests/`` is on ``sys.path`` (``conftest.py`` puts it there, and the
child script below runs from here), so this module is ``manager_testutil`` in
every process.

Run as a script, it is the training process of ``tests/unit/test_signal.py``::

    python tests/manager_testutil.py ROOT --deadline S [--mb N] [--hang]

It commits step 1 (small), installs the manager's signal handler, starts an
async save of step 2 (``--mb`` MiB, or held at the gate with ``--hang``),
prints ``SAVING 2`` and "trains" until it is killed (exit 3 if no signal comes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import torchckpt as tc
from torchckpt.barriers import Barrier

#: Longest a gated write waits for its gate to open (far beyond any test's wait).
GATE_MAX_S = 120.0


class GatedWriter(tc.CheckpointWriter):
    """A writer that, while ``gate`` exists, waits before writing anything (after touching ``reached``)."""

    def __init__(self, *args: Any, gate: str, reached: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.reached = reached

    def write(self, path: str, state_dict: Any, **kwargs: Any) -> None:
        if os.path.exists(self.gate):
            Path(self.reached).write_text(os.path.basename(path))
            deadline = time.monotonic() + GATE_MAX_S
            while os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        super().write(path, state_dict, **kwargs)


def gated_writer_init(
    rank_info: tc.RankInfo, gate: str, reached: str, config: tc.CheckpointWriterConfig | None = None
) -> GatedWriter:
    """``checkpoint_writer_init_fn`` building a :class:`GatedWriter`."""
    return GatedWriter(config=config or tc.CheckpointWriterConfig(), rank_info=rank_info, gate=gate, reached=reached)


def gated_checkpointer(gate: str, reached: str, fmt: str = "safetensors") -> tc.AsyncCheckpointer:
    """An async checkpointer whose writes wait while ``gate`` exists."""
    writer_config = tc.CheckpointWriterConfig(format=fmt)
    return tc.make_async_checkpointer(
        tc.CheckpointerConfig(writer_config=writer_config),
        rank_info=tc.RankInfo(0, 1),
        checkpoint_writer_init_fn=gated_writer_init,
        checkpoint_writer_init_args={"gate": gate, "reached": reached, "config": writer_config},
    )


class InjectedWriteError(RuntimeError):
    """What a :class:`FailingWriter` raises (module-level: it crosses from the writer subprocess by pickle)."""


class FailingWriter(tc.CheckpointWriter):
    """A writer that, while ``fail_file`` exists, fails each write before writing anything."""

    def __init__(self, *args: Any, fail_file: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_file = fail_file

    def write(self, path: str, state_dict: Any, **kwargs: Any) -> None:
        if os.path.exists(self.fail_file):
            raise InjectedWriteError(f"injected failure writing {path}")
        super().write(path, state_dict, **kwargs)


def failing_writer_init(
    rank_info: tc.RankInfo, fail_file: str, config: tc.CheckpointWriterConfig | None = None
) -> FailingWriter:
    """``checkpoint_writer_init_fn`` building a :class:`FailingWriter`."""
    return FailingWriter(config=config or tc.CheckpointWriterConfig(), rank_info=rank_info, fail_file=fail_file)


def failing_checkpointer(fail_file: str, fmt: str = "safetensors") -> tc.AsyncCheckpointer:
    """An async checkpointer whose writes fail while ``fail_file`` exists."""
    writer_config = tc.CheckpointWriterConfig(format=fmt)
    return tc.make_async_checkpointer(
        tc.CheckpointerConfig(writer_config=writer_config),
        rank_info=tc.RankInfo(0, 1),
        checkpoint_writer_init_fn=failing_writer_init,
        checkpoint_writer_init_args={"fail_file": fail_file, "config": writer_config},
    )


class _ThreadBarrier(Barrier):
    """Writer threads of one process meet here; their agreement goes through an in-memory store."""

    def __init__(self, meet: threading.Barrier, store: Any) -> None:
        self._meet = meet
        self.store = store

    def execute_barrier(self) -> None:
        self._meet.wait(60)


def save_ranks(path: str, fmt: str, states: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    """Save ``states[r]`` as rank ``r`` of one checkpoint at ``path``, each rank in a thread of this process."""
    world = len(states)
    store, meet = dist.HashStore(), threading.Barrier(world)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            writer = tc.CheckpointWriter(
                tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=30),
                tc.RankInfo(rank, world),
                barrier=_ThreadBarrier(meet, store),
            )
            writer.write(path, states[rank], metadata=metadata)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a writer thread hung"
    if errors:
        raise errors[0]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def small_state() -> dict[str, Any]:
    return {"w": torch.arange(1000, dtype=torch.float32), "step": 1}


def big_state(mb: int) -> dict[str, Any]:
    """A deterministic state of about ``mb`` MiB (cheap to build twice)."""
    n = mb * (1 << 20) // 4
    half = n // 2
    return {
        "a": torch.arange(half, dtype=torch.int32),
        "b": torch.arange(n - half, dtype=torch.float32).mul_(0.5),
        "c": torch.randn(64, 64, generator=torch.Generator().manual_seed(7)),
        "step": 2,
    }


def _child_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--hang", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(1)
    gate, reached = args.root + ".gate", args.root + ".reached"
    ckpt = None
    if args.hang:
        import manager_testutil as me  # by name, so that the spawned writer can import it

        ckpt = me.gated_checkpointer(gate, reached)
    mgr = tc.CheckpointManager(args.root, async_save=True, checkpointer=ckpt)
    mgr.save(1, small_state()).result(timeout=60)
    mgr.install_signal_handler(deadline_s=args.deadline)
    if args.hang:
        Path(gate).touch()
    mgr.save(2, big_state(args.mb))
    if args.hang:
        wait_for(lambda: os.path.exists(reached), 60, "the writer to reach the gate")
    print("SAVING 2", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)  # "training"
    print("NO SIGNAL", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    _child_main()
