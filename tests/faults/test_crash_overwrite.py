"""SIGKILL while overwriting a checkpoint: the path always holds exactly the old or the new one.

A child process saves states A and B in turn to one path; the parent kills it
with SIGKILL after a random delay, then loads the path: it must be exactly A
or exactly B, never a mix and never an error. The children are forked by a
zygote process (``crash_child.py``) that has torch imported and A and B built,
so each one is inside its save loop a millisecond after it is asked for.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator

import crash_child
import pytest
from ckpt_testutil import FORMATS, assert_state_equal, reader

from torchckpt.manager import CheckpointManager
from zygote import Zygote

SEEDS = range(20)
MAX_DELAY_S = 0.5


def _zygote(cwd: str) -> Zygote:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    return Zygote(os.path.join(here, "crash_child.py"), env=env, cwd=cwd)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory) -> Iterator[Zygote]:
    z = _zygote(str(tmp_path_factory.mktemp("zygote")))
    yield z
    z.close()


def _commits(log: str) -> int:
    return os.path.getsize(log) if os.path.exists(log) else 0


def _kill_during_saves(zygote: Zygote, path: str, fmt: str, log: str, delay_s: float, *, after_commits: int = 0) -> int:
    """Fork a saving child, SIGKILL it ``delay_s`` after its ``after_commits``-th commit (0: after it starts).

    Returns:
        How many saves it committed.
    """
    if os.path.exists(log):
        os.unlink(log)
    pid = zygote.call("fork", path, fmt, log)
    try:
        deadline = time.monotonic() + 60
        while _commits(log) < after_commits:
            assert time.monotonic() < deadline, "the child committed nothing in 60 s"
            time.sleep(0.005)
        time.sleep(delay_s)
    finally:
        os.kill(pid, signal.SIGKILL)
        code = zygote.call("reap", pid)
    assert code == -signal.SIGKILL, f"the child ended on its own (exit code {code})"
    return _commits(log)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_while_overwriting_leaves_old_or_new(zygote: Zygote, fmt: str, tmp_path) -> None:
    parent = str(tmp_path / "ckpts")
    os.makedirs(parent)
    name = "step_0000000001"  # where a CheckpointManager over ``parent`` looks for step 1
    path = os.path.join(parent, name)
    log = str(tmp_path / "commits.log")
    ck = crash_child.checkpointer(fmt)
    ck.save(path, crash_child.STATES["A"])  # complete before any kill: the path always has a checkpoint
    manager = CheckpointManager(parent, async_save=False, format=fmt)  # lists; never saves here
    seen = {"A": 0, "B": 0}
    commits = 0
    kills_mid_save = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        delay = rng.uniform(0, MAX_DELAY_S)
        # the last rounds start their clock after the child's first commit (so some kills always
        # land in a save that replaces a checkpoint the child itself wrote, even on a slow disk)
        after = 1 if seed >= len(SEEDS) - 3 else 0
        commits += _kill_during_saves(zygote, path, fmt, log, delay, after_commits=after)

        loaded, missing = reader().read(path)  # never an error; checksums verified
        assert missing == []
        tag = loaded["meta"]["tag"]
        assert tag in ("A", "B"), f"seed {seed}: unexpected tag {tag!r}"
        assert_state_equal(loaded, crash_child.STATES[tag])  # exactly A or exactly B, no mix
        seen[tag] += 1

        leftovers = sorted(n for n in os.listdir(parent) if n != name)
        for n in leftovers:  # whatever a crash leaves is hidden and named as torchckpt's own
            assert n == ".torchckpt-lock" or n.startswith(f".{name}.torchckpt-"), f"seed {seed}: unexpected entry {n!r}"
        kills_mid_save += any("pending" in n or "trash" in n for n in leftovers)
        assert manager.steps() == [1], f"seed {seed}: leftovers {leftovers} listed as checkpoints"

    # the kills really landed inside saves, and some after a commit
    assert commits >= 3
    assert kills_mid_save > 0, "no kill interrupted a save"

    # a new save to the path succeeds and cleans up what the crashes left
    final = crash_child.make_state("B")
    final["meta"]["tag"] = "final"
    ck.save(path, final)
    assert_state_equal(ck.load(path), final)
    from ckpt_testutil import hidden_leftovers

    assert hidden_leftovers(parent) == []
    assert [n for n in os.listdir(parent) if not n.startswith(".")] == [name]
    assert manager.steps() == [1]
    manager.close()
    print(f"{fmt}: loaded A {seen['A']}x, B {seen['B']}x; {commits} commits; {kills_mid_save} kills mid-save")
