"""The processes that ``test_concurrency.py`` races against each other.

``python concurrent_child.py save GO TAG ROUNDS PATH:FMT...`` saves state ``TAG``
to every ``PATH`` (in layout ``FMT``) ``ROUNDS`` times, starting when the file
``GO`` appears; it prints one JSON line per committed save.

``python concurrent_child.py manage GO ROOT STEPS FMT ASYNC`` saves steps
``1..STEPS`` through a ``CheckpointManager`` keeping only the last step, and
prints ``{"steps": STEPS}`` once the last one is committed.

Both print ``"ready"`` once torch is imported and the states are built, and exit
0 after their last save (1 with a traceback on stderr when a save fails). The
test imports this module for the states, to compare what it loads with them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

import torchckpt as tc

#: Longest a child waits for its start signal.
GO_TIMEOUT_S = 120.0


def make_state(tag: str) -> dict[str, Any]:
    """State ``tag`` (about 3 MiB): every tensor differs between tags in every element, and says its tag."""
    seed = sum(tag.encode())
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"layer{i}": torch.rand(1 << 18, generator=g) + seed for i in range(3)},
        "ids": torch.full((1000,), seed, dtype=torch.int64),
        "tag": tag,
    }


def step_state(step: int) -> dict[str, Any]:
    """The state a managed save of ``step`` holds (about 2 MiB)."""
    return {"w": torch.full((1 << 19,), float(step)), "ids": torch.full((10,), step, dtype=torch.int64), "step": step}


def _say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def _wait_for(go: str) -> None:
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no start signal {go} within {GO_TIMEOUT_S}s")
        time.sleep(0.002)


def save(go: str, tag: str, rounds: str, *targets: str) -> None:
    state = make_state(tag)
    checkpointers = {}
    for target in targets:
        path, fmt = target.rsplit(":", 1)
        checkpointers[path] = tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
        )
    _say("ready")
    _wait_for(go)
    for i in range(int(rounds)):
        for path, ck in checkpointers.items():
            ck.save(path, state)
            _say({"round": i, "path": path})


def manage(go: str, root: str, steps: str, fmt: str, async_save: str) -> None:
    manager = tc.CheckpointManager(root, keep=tc.KeepLast(1), async_save=async_save == "1", format=fmt)
    states = {s: step_state(s) for s in range(1, int(steps) + 1)}
    _say("ready")
    _wait_for(go)
    try:
        for step, state in states.items():
            # async: returns once staged, the write stays in flight while the next step is prepared
            manager.save(step, state)
        manager.wait()
    finally:
        manager.close()
    _say({"steps": int(steps)})


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:]
    {"save": save, "manage": manage}[command](*args)
