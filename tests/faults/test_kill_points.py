"""SIGKILL and SIGSTOP at seeded points of a save: the path holds the old or the new checkpoint, never a mix.

The async writer subprocess is killed when its rank file passes a random
size, at its fsync, when the commit begins, with the manifest written but
not renamed, renamed but not swapped in, swapped in but the parent not
fsynced, and in the middle of removing the old generation
(:mod:`killpoints` finds these points through the file-system layer). In a
2-rank gloo job, the coordinator is killed or stopped between the last data
fsync and the manifest rename, and the other rank is killed during the
commit.

Standard outcome (shared/RELIABILITY.md): the write fails at once with an
error naming the writer's pid, the signal and the path (in a job: every
survivor raises one ``DistributedCheckpointError`` naming the lost rank
within the configured timeout); the path loads exactly the old checkpoint
(byte-identical) or, once the swap happened, exactly the new one; every
directory that carries a ``manifest.json`` is complete; the next save
commits and removes every leftover; no child process, zombie or ``/dev/shm``
entry is left.

Seeds: the default run takes each point once; ``TORCHCKPT_FAULT_SEEDS=N``
runs N seeds (random points, formats and sizes), and ``--runslow`` 40.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any

import async_testutil as at
import ckpt_testutil as cu
import killpoints as kp
import pytest
import torch
import torch.distributed as dist
from fault_util import manifests_under, state

import torchckpt as tc
from torchckpt.agreement import OUTCOME_WAIT_FACTOR
from torchckpt.errors import WriterProcessError
from torchckpt.storage import fs

# dist_util launches the gloo ranks; the ranks, spawned, inherit this sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))

WAIT_S = 60
#: How soon a dead writer must fail its pending write.
FAIL_FAST_S = 5.0
#: The states the writer is killed saving: several write batches of the native format.
MIB = 24
SLOW_SEEDS = 40


def _seeds(default: int) -> list[int]:
    return list(range(int(os.environ.get("TORCHCKPT_FAULT_SEEDS", default))))


def _point_of(seed: int, rng: random.Random) -> str:
    return kp.POINTS[seed] if seed < len(kp.POINTS) else rng.choice(kp.POINTS)


def _assert_every_manifest_complete(parent: str) -> None:
    """Every directory under ``parent`` that carries a ``manifest.json`` is a complete, verified checkpoint."""
    for rel in manifests_under(parent):
        if os.path.basename(rel) != "manifest.json":
            continue  # manifest.json.tmp: not a commit marker
        directory = os.path.join(parent, os.path.dirname(rel))
        manifest = tc.checkpoint_reader.read_manifest(directory)
        for rank in range(manifest.world_size):
            cu.reader().read(directory, rank=rank)  # every file there, every checksum verified


# -- the async writer subprocess -------------------------------------------


class _Writer:
    """An async checkpointer whose writer hangs at the point its arm file names, and its committed state."""

    def __init__(self, root: str, fmt: str) -> None:
        self.fmt = fmt
        self.parent = os.path.join(root, fmt)
        os.makedirs(self.parent)
        self.path = os.path.join(self.parent, "ckpt")
        self.arm = os.path.join(root, f"arm-{fmt}")
        self.reached = os.path.join(root, f"reached-{fmt}")
        self.ck = tc.make_async_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, io_threads=2)),
            rank_info=tc.RankInfo(0, 1),
            subprocess_init_fn=kp.install_armed,
            subprocess_init_args=(self.arm, self.reached),
        )
        self.step = 1
        self.committed = state(self.step, 1)
        self.save_ok(self.committed)

    def save_ok(self, sd: dict) -> None:
        assert self.ck.save(self.path, sd)[1].result(timeout=WAIT_S) is None
        self.committed = sd
        self.before = at.dir_bytes(self.path)

    def pid(self) -> int:
        return at.writer_process(self.ck, WAIT_S).pid

    def close(self) -> None:
        for f in (self.arm, self.reached):
            if os.path.exists(f):
                os.unlink(f)
        self.ck.close()


def _kill_writer_at(w: _Writer, seed: int) -> str:
    rng = random.Random(seed)
    point = _point_of(seed, rng)
    w.step += 1
    new = state(w.step, rng.choice([MIB // 2, MIB]))
    threshold = rng.randrange(1 << 16, MIB // 2 << 20)
    with open(w.arm, "w") as f:
        json.dump({"point": point, "threshold": threshold}, f)
    stage_future, write_future = w.ck.save(w.path, new)
    assert stage_future.result(timeout=WAIT_S) is None
    proc = at.writer_process(w.ck, WAIT_S)
    at.wait_for_file(w.reached, WAIT_S, proc.is_alive)
    with open(w.reached) as f:
        reached = json.load(f)
    pid = reached["pid"]
    assert (reached["point"], pid) == (point, w.pid()), reached
    if point == "data":
        assert reached["detail"] >= threshold, reached
    if point == "cleanup":  # the old generation is removed after the write reported success
        assert write_future.result(timeout=WAIT_S) is None
    else:
        assert not write_future.done()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    if point != "cleanup":
        with pytest.raises(WriterProcessError) as info:
            write_future.result(timeout=WAIT_S)
        assert time.monotonic() - killed < FAIL_FAST_S
        assert (info.value.pid, info.value.exitcode, info.value.path) == (pid, -signal.SIGKILL, w.path)
        assert f"pid {pid}" in str(info.value) and "SIGKILL" in str(info.value) and w.path in str(info.value)
    # Gone for good (its last threads may outlive its main thread a moment): reaped by its parent.
    proc.join(timeout=WAIT_S)
    assert proc.exitcode == -signal.SIGKILL
    os.unlink(w.arm)
    os.unlink(w.reached)

    # Exactly the old checkpoint, byte for byte, or (once swapped in) exactly the new one.
    if kp.COMMITTED_AT[point]:
        w.committed = new
    else:
        assert at.dir_bytes(w.path) == w.before, f"seed {seed} ({point}): the committed checkpoint changed"
    cu.assert_state_equal(w.ck.load(w.path), w.committed)
    _assert_every_manifest_complete(w.parent)
    for name in os.listdir(w.parent):
        assert name in ("ckpt", ".torchckpt-lock") or name.startswith(".ckpt.torchckpt-"), name

    # The next save gets a fresh writer, commits and removes what the kill left.
    w.step += 1
    w.save_ok(state(w.step, 1))
    assert w.pid() != pid
    assert at.process_state(pid) is None  # reaped: no zombie
    cu.assert_state_equal(w.ck.load(w.path), w.committed)
    assert cu.hidden_leftovers(w.parent) == [], f"seed {seed} ({point})"
    assert manifests_under(w.parent) == ["ckpt/manifest.json"]
    return point


def _writer_kills(tmp_path: Any, seeds: list[int]) -> None:
    children_before = set(at.writer_children())
    shm = at.shm_count()
    writers: dict[str, _Writer] = {}
    points = []
    try:
        for seed in seeds:
            fmt = cu.FORMATS[seed % 2] if seed < len(kp.POINTS) else random.Random(-seed).choice(cu.FORMATS)
            if fmt not in writers:
                writers[fmt] = _Writer(str(tmp_path), fmt)
            points.append(_kill_writer_at(writers[fmt], seed))
    finally:
        for w in writers.values():
            w.close()
    assert {p: s for p, s in at.writer_children().items() if p not in children_before} == {}
    assert at.shm_count() <= shm
    if len(seeds) >= len(kp.POINTS):
        assert set(points) == set(kp.POINTS)


@pytest.mark.timeout(240)
def test_writer_killed_at_seeded_points(tmp_path) -> None:
    _writer_kills(tmp_path, _seeds(len(kp.POINTS)))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_writer_killed_at_many_seeded_points(tmp_path) -> None:
    _writer_kills(tmp_path, list(range(SLOW_SEEDS)))


# -- a 2-rank job ------------------------------------------------------------

#: The configured barrier timeout.
TIMEOUT_S = 3
#: Longest a survivor may take: it waits OUTCOME_WAIT_FACTOR timeouts for the coordinator's outcome, and a
#: stopped coordinator's store (which ignores the wait's own limit) is abandoned one timeout after that.
BOUND_S = (OUTCOME_WAIT_FACTOR + 1) * TIMEOUT_S + 2


def _rank_state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"w": torch.randn(4096, generator=g), "step": step, "rank": rank}


def rank_with_fault(rank: int, world: int, root: str, fmt: str, victim: int, point: str, how: str) -> dict[str, Any]:
    """Commit a checkpoint, then save over it while ``victim`` is killed or stopped at ``point``.

    ``how``: ``"kill"`` / ``"stop"`` (the victim signals itself at the point) or
    ``"kill_peer"`` (the coordinator, at the point, kills the victim).
    """
    from dist_util import error_summary, tree_bytes

    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=TIMEOUT_S)
    )
    ck = tc.make_sync_checkpointer(config)
    path = os.path.join(root, "ckpt")
    ck.save(path, _rank_state(rank, 0))
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    report: dict[str, Any] = {"before": tree_bytes(path) if rank != victim else None}
    dist.barrier()

    layer = None
    if how == "kill_peer" and rank == 0:
        layer = kp.KillPointFS(point, kp.signal_action(pids[victim], signal.SIGKILL))
    elif how in ("kill", "stop") and rank == victim:
        layer = kp.KillPointFS(point, kp.kill_self(signal.SIGKILL if how == "kill" else signal.SIGSTOP))
    started = time.monotonic()
    try:
        if layer is not None:
            with fs.install(layer):
                ck.save(path, _rank_state(rank, 1))
        else:
            ck.save(path, _rank_state(rank, 1))
    except Exception as e:  # noqa: BLE001 - checked by the test
        report.update(error_summary(e, started))
    else:
        report.update({"type": None, "elapsed": time.monotonic() - started})
    return report


DIST_CASES = [
    # (format, victim, point, how, committed): the coordinator lost between the last data fsync and the rename
    ("torch_save", 0, "manifest-open", "kill", False),
    ("safetensors", 0, "manifest-tmp", "stop", False),
    # the other rank lost during the commit: every rank reported, the coordinator commits
    ("safetensors", 1, "manifest-tmp", "kill_peer", True),
]
SLOW_DIST_CASES = [
    ("safetensors", 0, "manifest-open", "stop", False),
    ("torch_save", 0, "manifest-tmp", "kill", False),
    ("safetensors", 0, "manifest-renamed", "kill", False),
    ("torch_save", 0, "exchanged", "kill", True),
    ("torch_save", 1, "manifest-renamed", "kill_peer", True),
]


def _dist_case(tmp_path: Any, fmt: str, victim: int, point: str, how: str, committed: bool) -> None:
    from dist_util import launch

    world = 2
    root = str(tmp_path)
    path = os.path.join(root, "ckpt")
    outcomes = launch(rank_with_fault, world, root, fmt, victim, point, how, may_die={victim}, deadline_s=90)
    assert outcomes[victim].exitcode in (-signal.SIGKILL, None), outcomes[victim]
    (survivor,) = [r for r in range(world) if r != victim]
    report = outcomes[survivor].value
    if victim != 0:
        # The lost rank had reported; the coordinator committed and says so.
        assert report["type"] is None, report
    else:
        # Only the coordinator knows whether it committed: the others say they cannot know.
        assert report["type"] == "DistributedCheckpointError", report
        assert set(report["failures"]) == {victim}, report["failures"]
        assert f"rank {victim}" in report["message"], report["message"]
        assert "whether it was committed is unknown" in report["message"], report["message"]
        assert report["elapsed"] < BOUND_S, report
    # Every rank's part is of one generation: the old one byte for byte, or the new one.
    step = 1 if committed else 0
    for rank in range(world):
        cu.assert_state_equal(cu.reader().read(path, rank=rank)[0], _rank_state(rank, step))
    if not committed:
        assert at.dir_bytes(path) == report["before"]
    _assert_every_manifest_complete(root)
    # The next save commits and removes what the fault left.
    cu.checkpointer(fmt).save(path, state(9, 1))
    cu.assert_state_equal(cu.reader().read(path)[0], state(9, 1))
    assert cu.hidden_leftovers(root) == []
    assert manifests_under(root) == ["ckpt/manifest.json"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("fmt", "victim", "point", "how", "committed"), DIST_CASES, ids=["-".join(map(str, c[:4])) for c in DIST_CASES]
)
def test_rank_lost_during_the_commit(tmp_path, fmt: str, victim: int, point: str, how: str, committed: bool) -> None:
    _dist_case(tmp_path, fmt, victim, point, how, committed)


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("fmt", "victim", "point", "how", "committed"),
    SLOW_DIST_CASES,
    ids=["-".join(map(str, c[:4])) for c in SLOW_DIST_CASES],
)
def test_rank_lost_during_the_commit_more_points(
    tmp_path, fmt: str, victim: int, point: str, how: str, committed: bool
) -> None:
    _dist_case(tmp_path, fmt, victim, point, how, committed)
