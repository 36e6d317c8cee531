"""Ctrl-C (SIGINT to the terminal's process group) during a background save, and clean exits.

Standard outcome: a user's interrupt stays the user's interrupt: the
``KeyboardInterrupt`` propagates (the process ends killed by SIGINT, its
traceback the only thing on stderr: no ``WriterProcessError``, no
"Exception ignored"), the writer subprocess, which ignores SIGINT, finishes the
save in flight and is shut down and reaped, and the step loads. A run that is
not interrupted exits 0 with nothing on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import async_testutil as at
import pytest
import torch

import torchckpt as tc
from torchckpt.errors import WriterProcessError

SCRIPT_TIMEOUT_S = 240
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tc.__file__)))

#: Saves a ~128 MiB state (long enough to be in flight when SIGINT comes), then waits to be interrupted.
MANAGER_SCRIPT = """
import os, sys, time
import torch
import torchckpt as tc
from torchckpt.errors import WriterProcessError

if __name__ == "__main__":  # (not needed any more; kept so that this tests only the interrupt)
    with tc.CheckpointManager(sys.argv[1], format="torch_save") as mgr:
        mgr.save(1, {"w": torch.ones(32 << 20), "step": 1})
        mgr.checkpointer._checkpoint_process.process_creation_future.result(timeout=120)  # a save does not wait for it
        print("WRITER", mgr.checkpointer._checkpoint_process.process.processes[0].pid, flush=True)
        if sys.argv[2] == "interrupt":
            time.sleep(120)
"""

PLAIN_SCRIPT = """
import os, sys, time
import torch
import torchckpt as tc
from torchckpt.errors import WriterProcessError

if __name__ == "__main__":
    ckpt = tc.make_async_checkpointer()
    ckpt.save(os.path.join(sys.argv[1], "step_0000000001"), {"w": torch.ones(32 << 20), "step": 1})
    ckpt._checkpoint_process.process_creation_future.result(timeout=120)  # a save does not wait for it
    print("WRITER", ckpt._checkpoint_process.process.processes[0].pid, flush=True)
    if sys.argv[2] == "interrupt":
        time.sleep(120)
    ckpt.close()
"""

SCRIPTS = {"manager": MANAGER_SCRIPT, "plain": PLAIN_SCRIPT}


def start(tmp_path, kind: str, mode: str) -> subprocess.Popen[str]:
    """Run a script in a new process group of its own, as a shell runs a foreground job."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPTS[kind]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "root"), mode],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )


def writer_pid_of(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the script prints it right after its save starts, or dies
    assert line.startswith("WRITER "), (line, proc.poll())
    return int(line.split()[1])


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
@pytest.mark.parametrize("delay_s", [0.0, 0.3])
def test_ctrl_c_during_a_save_stays_a_keyboard_interrupt(tmp_path, kind: str, delay_s: float) -> None:
    proc = start(tmp_path, kind, "interrupt")
    try:
        writer = writer_pid_of(proc)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, stderr = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGINT, stderr
    assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr
    assert stderr.count("Traceback") == 1, stderr
    for noise in ("WriterProcessError", "Exception ignored", "Child process terminated", "Process "):
        assert noise not in stderr, stderr
    deadline = time.monotonic() + 10
    while at.process_state(writer) not in (None, "Z"):  # orphaned zombies are reaped by init
        assert time.monotonic() < deadline, f"writer {writer} outlived the interrupted script"
        time.sleep(0.05)
    if kind == "manager":
        # The writer was not interrupted: the save in flight was committed and loads.
        with tc.CheckpointManager(tmp_path / "root", async_save=False) as mgr:
            step, state = mgr.load()
        assert step == 1 and state["step"] == 1 and state["w"].eq(1).all()


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_a_clean_run_prints_nothing_on_stderr(tmp_path, kind: str) -> None:
    proc = start(tmp_path, kind, "finish")
    try:
        writer = writer_pid_of(proc)
        stdout, stderr = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert stdout == ""
    assert at.process_state(writer) in (None, "Z")


def _hanging_checkpointer(tmp_path) -> tuple[tc.AsyncCheckpointer, str]:
    """An async checkpointer whose writes hang (until killed) once they have started; and the file that says so."""
    arm, reached = tmp_path / "arm", tmp_path / "reached"
    arm.touch()
    ckpt = tc.make_async_checkpointer(
        rank_info=tc.RankInfo(0, 1),
        checkpoint_writer_init_fn=at.slow_writer_init,
        checkpoint_writer_init_args={"arm_file": str(arm), "reached_file": str(reached)},
    )
    return ckpt, str(reached)


def _kill_the_writer_mid_write(ckpt: tc.AsyncCheckpointer, reached: str) -> None:
    child = at.writer_process(ckpt, SCRIPT_TIMEOUT_S)
    at.wait_for_file(reached, SCRIPT_TIMEOUT_S, child.is_alive)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)


@pytest.mark.parametrize("owner", ["manager", "checkpointer"])
def test_a_failed_save_does_not_replace_the_exception_leaving_the_block(tmp_path, caplog, owner: str) -> None:
    """Leaving a ``with`` block on an exception: the save's own failure is logged, the exception propagates."""
    ckpt, reached = _hanging_checkpointer(tmp_path)
    manager = tc.CheckpointManager(tmp_path / "root", checkpointer=ckpt)
    block = manager if owner == "manager" else ckpt
    with pytest.raises(KeyError, match="the user's own error"), block:
        if owner == "manager":
            manager.save(1, {"w": torch.ones(4)})
        else:
            ckpt.save(str(tmp_path / "root" / "x"), {"w": torch.ones(4)})
        _kill_the_writer_mid_write(ckpt, reached)  # the save fails with WriterProcessError
        raise KeyError("the user's own error")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "KeyError" in r.getMessage()]
    assert len(warnings) == 1 and "Child process terminated unexpectedly" in warnings[0], warnings
    assert not at.writer_process(ckpt).is_alive()
    # Without an exception in flight, close() still raises the failure.
    (tmp_path / "other").mkdir()
    other, reached = _hanging_checkpointer(tmp_path / "other")
    with pytest.raises(WriterProcessError, match="Child process terminated unexpectedly"), other:
        other.save(str(tmp_path / "y"), {"w": torch.ones(4)})
        _kill_the_writer_mid_write(other, reached)
