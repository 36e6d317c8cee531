"""A writer killed during an incremental save: every committed step still loads exactly.

The async writer subprocess of a ``CheckpointManager(incremental=True)`` is
killed (SIGKILL) at each point of the save before the new step is in place
(``killpoints.py``): the data write, its fsync, the commit's start, the
manifest written but not renamed, renamed but not swapped in. The step it
was saving is not committed; the earlier steps (the base whose file the
save referred to included) load byte-identical; the next incremental save
commits and refers to the base as before.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import async_testutil as at
import killpoints as kp
import pytest
import torch
from ckpt_testutil import NATIVE_FILE, assert_state_equal

import torchckpt as tc
from torchckpt.errors import WriterProcessError
from torchckpt.reading import read_manifest

WAIT_S = 60
POINTS = ("data", "fsync-data", "manifest-open", "manifest-tmp", "manifest-renamed")
FROZEN_MIB = 8


def _state(step: int, frozen: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"frozen": frozen, "lora": torch.randn(256 << 10, generator=g), "m": torch.randn(256 << 10, generator=g)}


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.timeout(240)
def test_writer_killed_during_an_incremental_save(tmp_path) -> None:
    root = str(tmp_path / "root")
    arm, reached = str(tmp_path / "arm"), str(tmp_path / "reached")
    ck = tc.make_async_checkpointer(
        tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors", io_threads=2)),
        rank_info=tc.RankInfo(0, 1),
        subprocess_init_fn=kp.install_armed,
        subprocess_init_args=(arm, reached),
    )
    frozen = torch.randn(FROZEN_MIB << 18, generator=torch.Generator().manual_seed(99))
    committed: dict[int, dict[str, Any]] = {}
    with tc.CheckpointManager(root, checkpointer=ck, incremental=True) as m:
        m.save(0, _state(0, frozen)).result(timeout=WAIT_S)
        committed[0] = _clone(_state(0, frozen))
        step = 0
        for point in POINTS:
            step += 1
            with open(arm, "w") as f:
                json.dump({"point": point, "threshold": 1 << 16}, f)
            handle = m.save(step, _state(step, frozen))
            proc = at.writer_process(ck, WAIT_S)
            at.wait_for_file(reached, WAIT_S, proc.is_alive)
            with open(reached) as f:
                assert json.load(f)["point"] == point
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(WriterProcessError):
                handle.result(timeout=WAIT_S)
            proc.join(timeout=WAIT_S)
            os.unlink(arm)
            os.unlink(reached)
            assert step not in m.steps(), point
            for s, expected in committed.items():
                assert_state_equal(m.load(step=s, fallback=False)[1], expected)
            # The next incremental save commits (a fresh writer) and refers to the base's file.
            step += 1
            m.save(step, _state(step, frozen)).result(timeout=WAIT_S)
            committed[step] = _clone(_state(step, frozen))
            entry = read_manifest(m.path(step)).ranks[0]
            assert [(r.checkpoint, r.file) for r in entry.refs] == [("../step_0000000000", NATIVE_FILE)], point
        for s, expected in committed.items():
            assert_state_equal(m.load(step=s, fallback=False)[1], expected)
