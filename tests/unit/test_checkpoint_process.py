"""CheckpointProcess: how the writer subprocess is started, and the interface callers of the reference rely on.

Scripts without a main guard, ``torchrun`` and writers that die while
starting are in ``tests/faults/test_writer_start.py``; Ctrl-C in
``tests/faults/test_interrupt.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future

import async_testutil as at
import pytest
import torch

import torchckpt as tc
from torchckpt.builder import default_writer_init_fn
from torchckpt.checkpoint_process import CheckpointProcess, CheckpointProcessConfig
from torchckpt.errors import WriterProcessError

WAIT_S = 60
RANK = tc.RankInfo(global_rank=0, global_world_size=1)


def make_process(tmp_path, **kw) -> CheckpointProcess:
    args = {
        "rank_info": RANK,
        "config": CheckpointProcessConfig(subprocess_init_timeout_secs=kw.pop("init_timeout_s", WAIT_S)),
        "subprocess_init_fn": at.record_start,
        "subprocess_init_args": (str(tmp_path / "start.json"), os.getpid()),
        "checkpoint_writer_init_fn": default_writer_init_fn,
        "checkpoint_writer_init_args": {},
    }
    args.update(kw)
    return CheckpointProcess(**args)


@pytest.fixture
def started(tmp_path):
    """A started writer and what it recorded about its start."""
    process = make_process(tmp_path)
    process.process_creation_future.result(timeout=WAIT_S)
    yield process, json.loads((tmp_path / "start.json").read_text())
    process.close()


def test_the_writer_is_a_direct_child_that_does_not_run_the_callers_main(started) -> None:
    process, facts = started
    child = process.process.processes[0]
    assert facts["pid"] == child.pid and facts["ppid"] == os.getpid()  # also asserted in the writer itself
    assert child.is_alive() and child.exitcode is None
    # Not the test runner's __main__ (pytest): torchckpt's own entry point, which has no file.
    assert sys.modules["__main__"].__file__ and facts["main_file"] is None and facts["main_name"] is None
    # Started with what torch's file-descriptor passing needs, and in the caller's directory.
    assert facts["authkey"] == multiprocessing.current_process().authkey.hex()
    assert facts["sharing_strategy"] == torch.multiprocessing.get_sharing_strategy()
    assert facts["cwd"] == os.getcwd()


def test_the_authkey_is_never_on_the_command_line_or_in_the_environment(started) -> None:
    _, facts = started
    key = multiprocessing.current_process().authkey
    for where in ("cmdline", "environ"):
        raw = bytes.fromhex(facts[where])
        assert key not in raw and key.hex().encode() not in raw, where


def test_the_writer_ignores_sigint_in_a_session_of_its_own(started) -> None:
    process, facts = started
    assert facts["sigint_ignored"]
    assert facts["sid"] == facts["pid"] != os.getsid(0)
    assert facts["pgid"] != os.getpgid(0)
    child = process.process.processes[0]
    os.kill(child.pid, signal.SIGINT)
    time.sleep(0.5)
    assert child.is_alive()
    process.process_creation_future.result()


def test_close_stops_the_writer_and_reaps_it(started) -> None:
    process, _ = started
    child = process.process.processes[0]
    process.close()
    assert not child.is_alive()
    assert child.exitcode == 0
    assert at.process_state(child.pid) is None


def test_close_kills_a_writer_whose_join_times_out(started) -> None:
    process, _ = started
    child = process.process.processes[0]
    process.process.join = lambda timeout=None: False  # as if it never exited
    process.close()
    assert not child.is_alive()
    assert child.exitcode in (0, -signal.SIGKILL)
    assert at.process_state(child.pid) is None


def test_a_closed_pipe_fails_the_write_as_a_dead_child(started, tmp_path) -> None:
    process, _ = started
    process._parent_end.close()
    with pytest.raises(RuntimeError, match="Child process terminated unexpectedly"):
        process.write({"x": torch.ones(2)}, str(tmp_path / "ckpt")).result(timeout=WAIT_S)


def test_an_init_slower_than_the_timeout_fails_with_timed_out(tmp_path) -> None:
    process = make_process(tmp_path, init_timeout_s=1, subprocess_init_fn=time.sleep, subprocess_init_args=(30,))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="Timed out after 1s"):
        process.process_creation_future.result(timeout=WAIT_S)
    assert time.monotonic() - t0 < 20
    child = process.process.processes[0]
    assert not child.is_alive()
    process.close()


def test_an_init_that_raises_fails_the_creation_with_its_error(tmp_path) -> None:
    process = make_process(tmp_path, subprocess_init_fn=at.fail_start, subprocess_init_args=("no start today",))
    with pytest.raises(RuntimeError, match="^no start today$"):
        process.process_creation_future.result(timeout=WAIT_S)
    process.close()


def test_tensors_arrive_in_shared_memory_and_stay_the_same_memory(tmp_path) -> None:
    out = tmp_path / "write.json"
    process = make_process(
        tmp_path, checkpoint_writer_init_fn=at.marking_writer_init, checkpoint_writer_init_args={"out_file": str(out)}
    )
    try:
        shared = torch.zeros(100).share_memory_()
        regular = torch.zeros(50)
        state: Future = Future()
        threading.Timer(0.1, state.set_result, ({"shared": shared, "regular": regular},)).start()
        process.write(state, str(tmp_path / "ckpt"), custom_arg="value", another_arg=42).result(timeout=WAIT_S)
        facts = json.loads(out.read_text())
        assert facts == {"shared": True, "regular": True, "kwargs": ["another_arg", "custom_arg"]}
        assert shared[0].item() == 42.0 and shared[1:].eq(0).all()
    finally:
        process.close()


def test_a_writer_that_dies_while_idle_is_replaced_at_the_next_write(started, tmp_path) -> None:
    process, _ = started
    first = process.process.processes[0]
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    assert first.exitcode == -signal.SIGKILL
    process.write({"x": torch.ones(3)}, str(tmp_path / "ckpt")).result(timeout=WAIT_S)
    assert process.process.processes[0].pid != first.pid
    assert at.process_state(first.pid) is None
    assert torch.equal(tc.CheckpointReader(RANK).read(str(tmp_path / "ckpt"))[0]["x"], torch.ones(3))


def test_a_writer_that_cannot_start_names_its_exit_and_where_to_look(tmp_path) -> None:
    process = make_process(tmp_path, subprocess_init_fn=at.exit_now, subprocess_init_args=(7,))
    with pytest.raises(WriterProcessError) as info:
        process.process_creation_future.result(timeout=WAIT_S)
    message = str(info.value)
    assert info.value.exitcode == 7 and info.value.pid == process.process.processes[0].pid
    assert f"writer subprocess (pid {info.value.pid}) exited with code 7 during start" in message, message
    assert "standard error" in message, message
    process.close()
