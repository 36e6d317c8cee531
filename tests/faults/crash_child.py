"""The processes that test_crash_overwrite kills: each saves states A and B to one path in a loop.

``python crash_child.py`` runs a *zygote*: it imports torch and torchckpt and
builds A and B once, then forks one saving child per request, so that a child
starts in a millisecond already inside its save loop (a fresh interpreter
would spend seconds importing torch). Protocol, one JSON line each way:
``["fork", path, fmt, log]`` -> ``pid``; ``["reap", pid]`` -> exit code
(negative: killed by that signal). Each child appends one byte to ``log``
after every committed save. The test imports this module to know A and B.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from zygote import serve

import torchckpt as tc

#: About 24 MiB per state: six float32 tensors of 1M elements.
N_TENSORS = 6
NUMEL = 1 << 20


def make_state(tag: str) -> dict[str, Any]:
    """State "A" or "B": every tensor differs between the two in every element."""
    seed = {"A": 1, "B": 2}[tag]
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {
        f"layer{i}": torch.rand(NUMEL, generator=g) + (10.0 if tag == "B" else 0.0) for i in range(N_TENSORS)
    }
    out["meta"] = {"tag": tag, "ints": torch.full((1000,), seed, dtype=torch.int64)}
    return out


STATES = {"A": make_state("A"), "B": make_state("B")}


def checkpointer(fmt: str) -> tc.SyncCheckpointer:
    return tc.make_sync_checkpointer(
        tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt)), rank_info=tc.RankInfo(0, 1)
    )


def save_loop(path: str, fmt: str, log: str) -> None:
    """Save B, A, B, A... to ``path`` forever; append a byte to ``log`` after each committed save."""
    ck = checkpointer(fmt)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        tag = "B" if i % 2 == 0 else "A"
        ck.save(path, STATES[tag])
        os.write(log_fd, tag.encode())
        i += 1


if __name__ == "__main__":
    serve(save_loop)
