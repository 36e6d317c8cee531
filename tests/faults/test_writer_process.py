"""The writer subprocess of async saves: SIGKILL at several points, a dead training process, leaks over 50 saves.

Standard outcome (shared/RELIABILITY.md): the error names the pid, the signal
and the path, and comes at once; the previous checkpoint at the path loads
byte-identical; nothing incomplete carries a manifest; the next save gets a
fresh writer; no child process, zombie, /dev/shm entry, file descriptor or
resident memory is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import async_testutil as at
import ckpt_testutil as cu
import pytest
import torch

import torchckpt as tc
from torchckpt.errors import WriterProcessError

WAIT_S = 60
#: How soon a dead writer must fail its pending write.
FAIL_FAST_S = 5.0

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def writer_pid(ckpt: tc.AsyncCheckpointer) -> int:
    return at.writer_process(ckpt, WAIT_S).pid


def state(step: int, mib: int = 8) -> dict:
    """A state of about ``mib`` MiB whose every value tells the step."""
    n = mib * (1 << 20) // 4 // 4
    return {
        "model": {f"l{i}": torch.full((n,), float(step)) for i in range(4)},
        "ids": torch.full((10,), step, dtype=torch.int64),
        "step": step,
    }


def assert_no_new_children(before: set[int]) -> None:
    """No child process (zombies included) that was not there before the test."""
    new = {p: st for p, st in at.writer_children().items() if p not in before}
    assert new == {}, f"child processes left behind (pid: state): {new}"


def hidden_leftovers(parent: str) -> list[str]:
    return cu.hidden_leftovers(parent)


def manifests_under(parent: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), parent) for d, _, fs in os.walk(parent) for f in fs if f == "manifest.json"
    )


KILL_POINTS = [
    # (where the writer hangs, how it is made to hang, layout)
    pytest.param("before_write", "writer", "torch_save", id="before_write-torch_save"),
    # The death seen from the pipe (EOF) only, not from the process sentinel: the other branch of the parent.
    pytest.param("before_write", "writer", "safetensors", id="before_write-pipe_eof-safetensors"),
    pytest.param("data", "hang_in_data_write", "torch_save", id="mid_data-torch_save"),
    pytest.param("commit", "hang_before_commit", "safetensors", id="before_commit-safetensors"),
]


@pytest.mark.parametrize(("point", "how", "fmt"), KILL_POINTS)
def test_sigkill_of_the_writer_mid_save(tmp_path, monkeypatch, request, point: str, how: str, fmt: str) -> None:
    if "pipe_eof" in request.node.name:
        from torchckpt import checkpoint_process

        real_wait = checkpoint_process.wait
        monkeypatch.setattr(checkpoint_process, "wait", lambda objs, timeout=None: real_wait(objs[:1], timeout))
    children_before = set(at.writer_children())
    parent = tmp_path / "ckpts"
    parent.mkdir()
    path = str(parent / "ckpt")
    arm, reached = str(tmp_path / "arm"), str(tmp_path / "reached")
    writer_config = tc.CheckpointWriterConfig(format=fmt)
    kw: dict = {"rank_info": tc.RankInfo(0, 1)}
    if how == "writer":
        kw["checkpoint_writer_init_fn"] = at.slow_writer_init
        kw["checkpoint_writer_init_args"] = {"arm_file": arm, "reached_file": reached, "config": writer_config}
    else:
        kw["config"] = tc.CheckpointerConfig(writer_config=writer_config)
        kw["subprocess_init_fn"] = getattr(at, how)
        kw["subprocess_init_args"] = (arm, reached)
    ckpt = tc.make_async_checkpointer(**kw)
    try:
        # A committed checkpoint at the path.
        assert ckpt.save(path, state(1))[1].result(timeout=WAIT_S) is None
        before = at.dir_bytes(path)
        cu.assert_state_equal(ckpt.load(path), state(1))

        # The next save to the same path hangs at `point`; the writer is killed there.
        open(arm, "w").close()
        stage_future, write_future = ckpt.save(path, state(2))
        assert stage_future.result(timeout=WAIT_S) is None
        proc = at.writer_process(ckpt, WAIT_S)
        at.wait_for_file(reached, WAIT_S, proc.is_alive)
        pid = writer_pid(ckpt)
        pending = parent / ".ckpt.torchckpt-pending"
        if point == "data":
            # Mid-write for real: a part of the data file is on disk, not all of it.
            size = (pending / cu.TORCH_SAVE_FILE).stat().st_size
            assert 1 << 20 <= size < 8 << 20, size
        if point == "commit":
            assert (pending / cu.NATIVE_FILE).stat().st_size >= 8 << 20
        assert not write_future.done()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WriterProcessError) as info:
            write_future.result(timeout=WAIT_S)
        assert time.monotonic() - killed < FAIL_FAST_S
        os.unlink(arm)

        error = info.value
        message = str(error)
        assert isinstance(error, RuntimeError)
        assert "Child process terminated unexpectedly" in message
        assert f"pid {pid}" in message
        assert "SIGKILL" in message
        assert path in message
        assert error.pid == pid
        assert error.path == path
        assert error.exitcode == -signal.SIGKILL
        assert at.process_state(pid) is None  # reaped, no zombie

        # The previous checkpoint is untouched; nothing incomplete carries a manifest.
        assert at.dir_bytes(path) == before
        cu.assert_state_equal(ckpt.load(path), state(1))
        assert manifests_under(str(parent)) == ["ckpt/manifest.json"]

        # The next save gets a fresh writer and commits; it also cleans the leftovers of the killed one.
        assert ckpt.save(path, state(3))[1].result(timeout=WAIT_S) is None
        new_pid = writer_pid(ckpt)
        assert new_pid != pid
        assert at.process_state(new_pid) not in (None, "Z")
        cu.assert_state_equal(ckpt.load(path), state(3))
        assert hidden_leftovers(str(parent)) == []
    finally:
        if os.path.exists(arm):
            os.unlink(arm)
        ckpt.close()
    assert_no_new_children(children_before)


def test_writer_killed_while_idle_is_replaced_by_the_next_save(tmp_path) -> None:
    children_before = set(at.writer_children())
    path = str(tmp_path / "ckpt")
    with tc.make_async_checkpointer() as ckpt:
        assert ckpt.save(path, state(1, mib=1))[1].result(timeout=WAIT_S) is None
        pid = writer_pid(ckpt)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while at.writer_process(ckpt, WAIT_S).is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ckpt.save(path, state(2, mib=1))[1].result(timeout=WAIT_S) is None
        assert writer_pid(ckpt) != pid
        assert at.process_state(pid) is None
        cu.assert_state_equal(ckpt.load(path), state(2, mib=1))
    assert_no_new_children(children_before)


_TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch, torchckpt as tc, async_testutil as at

    if __name__ == "__main__":
        ckpt = tc.make_async_checkpointer(
            rank_info=tc.RankInfo(0, 1),
            checkpoint_writer_init_fn=at.slow_writer_init,
            checkpoint_writer_init_args={{"arm_file": {arm!r}, "reached_file": {reached!r}}},
        )
        ckpt.save({path!r}, {{"w": torch.ones(1000)}})
        time.sleep(120)
    """
)


def test_writer_exits_when_the_training_process_is_killed(tmp_path) -> None:
    arm, reached, path = str(tmp_path / "arm"), str(tmp_path / "reached"), str(tmp_path / "ckpt")
    script = _TRAINING_SCRIPT.format(tests=TESTS_DIR, arm=arm, reached=reached, path=path)
    open(arm, "w").close()
    trainer = subprocess.Popen([sys.executable, "-c", script])
    try:
        at.wait_for_file(reached, WAIT_S, lambda: trainer.poll() is None)
        with open(reached) as f:
            writer = int(f.read())
        assert at.process_state(writer) not in (None, "Z")
        assert writer in at.children(trainer.pid)
        trainer.kill()  # SIGKILL, in the middle of a write
        trainer.wait(timeout=10)
        deadline = time.monotonic() + FAIL_FAST_S
        while at.process_state(writer) not in (None, "Z"):  # an orphan is reaped by init, maybe later
            assert time.monotonic() < deadline, f"writer {writer} outlived its training process"
            time.sleep(0.05)
        assert not os.path.exists(os.path.join(path, "manifest.json"))
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(timeout=10)
        os.unlink(arm)


@pytest.mark.parametrize("fmt", cu.FORMATS)
def test_fifty_async_saves_do_not_leak(tmp_path, fmt: str) -> None:
    """50 saves of a ~50 MB state alternating between two paths: memory, /dev/shm, fds and processes stay flat."""
    children_before = set(at.writer_children())
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    sd = {f"layer{i}": torch.randn(1280, 1024) for i in range(10)}  # 10 x 5 MiB
    sd["step"] = 0
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    ckpt = tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))
    started = time.monotonic()
    try:
        assert ckpt.save(paths[0], sd)[1].result(timeout=WAIT_S) is None
        pid = writer_pid(ckpt)
        base = {
            "rss": at.rss_bytes(),
            "writer_rss": _rss_of(pid),
            "fds": at.fd_count(),
            "shm": at.shm_count(),
            "children": at.writer_children(),
        }
        assert set(base["children"]) == children_before | {pid}  # a direct child, and the only new one
        for step in range(1, 50):
            with torch.no_grad():
                sd["layer0"].fill_(float(step))
            sd["step"] = step
            stage_future, write_future = ckpt.save(paths[step % 2], sd)
            assert stage_future.result(timeout=WAIT_S) is None
        assert write_future.result(timeout=WAIT_S) is None
        assert writer_pid(ckpt) == pid  # one writer served every save
        grew = {
            "rss": at.rss_bytes() - base["rss"],
            "writer_rss": _rss_of(pid) - base["writer_rss"],
            "fds": at.fd_count() - base["fds"],
            "shm": at.shm_count() - base["shm"],
        }
        assert grew["rss"] < 64 << 20, grew
        assert grew["writer_rss"] < 64 << 20, grew
        assert grew["fds"] <= 5, grew
        assert grew["shm"] <= 0, grew
        now = at.writer_children()
        assert set(now) == set(base["children"]), now  # the same processes
        assert "Z" not in now.values(), now  # and no zombie
        last = ckpt.load(paths[1])
        assert last["step"] == 49
        assert torch.equal(last["layer0"], torch.full((1280, 1024), 49.0))
        assert torch.equal(last["layer9"], sd["layer9"])
        assert ckpt.load(paths[0])["step"] == 48
    finally:
        ckpt.close()
    assert at.process_state(pid) is None
    assert_no_new_children(children_before)  # no zombie either
    assert at.shm_count() <= base["shm"]
    assert time.monotonic() - started < 40


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_write_past_its_timeout_kills_the_writer_and_fails(tmp_path) -> None:
    children_before = set(at.writer_children())
    path = str(tmp_path / "ckpt")
    arm, reached = str(tmp_path / "arm"), str(tmp_path / "reached")
    ckpt = tc.make_async_checkpointer(
        tc.CheckpointerConfig(process_config=tc.CheckpointProcessConfig(write_timeout_secs=1.0)),
        rank_info=tc.RankInfo(0, 1),
        checkpoint_writer_init_fn=at.slow_writer_init,
        checkpoint_writer_init_args={"arm_file": arm, "reached_file": reached},
    )
    try:
        open(arm, "w").close()
        _, write_future = ckpt.save(path, state(1, mib=1))
        pid = writer_pid(ckpt)
        with pytest.raises(TimeoutError) as info:
            write_future.result(timeout=WAIT_S)
        assert os.path.exists(reached)  # it was hanging in the write, not starting
        message = str(info.value)
        assert f"pid {pid}" in message and path in message and "1.0s" in message, message
        assert at.process_state(pid) is None  # killed and reaped
        assert not os.path.exists(os.path.join(path, "manifest.json"))
        os.unlink(arm)
        assert ckpt.save(path, state(2, mib=1))[1].result(timeout=WAIT_S) is None
        assert writer_pid(ckpt) != pid
        cu.assert_state_equal(ckpt.load(path), state(2, mib=1))
    finally:
        if os.path.exists(arm):
            os.unlink(arm)
        ckpt.close()
    assert_no_new_children(children_before)
