"""CheckpointManager.install_signal_handler: SIGTERM during an async save finishes it or abandons it cleanly.

A child process (``tests/manager_testutil.py``) commits step 1, starts an
async save of step 2 and prints ``SAVING 2``; the test sends SIGTERM right
then. The child must exit with 128 + 15, say in its log what became of the
save, and leave either a committed step 2 that loads byte-identical or no
manifest for step 2 -- never half a checkpoint -- with step 1 intact.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchckpt as tc
from ckpt_testutil import assert_state_equal
from manager_testutil import big_state, small_state

CHILD = str(Path(__file__).resolve().parents[1] / "manager_testutil.py")

pytestmark = pytest.mark.timeout(120)


def _start(root: str, stderr_file: str, *args: str) -> subprocess.Popen[str]:
    with open(stderr_file, "w") as err:
        return subprocess.Popen(
            [sys.executable, CHILD, root, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # a stray child can be killed as a group
        )


def _read_marker(proc: subprocess.Popen[str], marker: str, timeout: float, stderr_file: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if line.strip() == marker:
                return
            if line == "":
                break  # the child ended
    proc.kill()
    raise AssertionError(f"no {marker!r} from the child; its stderr:\n{Path(stderr_file).read_text()}")


def _wait(proc: subprocess.Popen[str], timeout: float, stderr_file: str) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(
            f"the child did not exit within {timeout}s of SIGTERM; its stderr:\n{Path(stderr_file).read_text()}"
        ) from None


def _assert_step1_intact(root: str) -> None:
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert 1 in mgr.steps()
        _, loaded = mgr.load(step=1)
    assert_state_equal(loaded, small_state())


def test_sigterm_during_an_async_save_finishes_it(tmp_path: Path) -> None:
    root, err = str(tmp_path / "root"), str(tmp_path / "stderr.txt")
    proc = _start(root, err, "--deadline", "60", "--mb", "128")
    try:
        _read_marker(proc, "SAVING 2", 60, err)
        proc.send_signal(signal.SIGTERM)
        rc = _wait(proc, 60, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
    log = Path(err).read_text()
    assert rc == 128 + signal.SIGTERM, log
    assert "Traceback" not in log, log
    # The save either was still in flight (and was finished) or had just committed.
    assert "finished the in-flight save of step 2" in log or "no save in flight" in log, log
    assert "abandoned" not in log, log
    manifest = os.path.join(root, "step_0000000002", "manifest.json")
    assert os.path.exists(manifest), log
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.steps() == [1, 2]
        step, loaded = mgr.load()
    assert step == 2
    assert_state_equal(loaded, big_state(128))
    _assert_step1_intact(root)


def test_sigterm_past_the_deadline_abandons_the_save(tmp_path: Path) -> None:
    root, err = str(tmp_path / "root"), str(tmp_path / "stderr.txt")
    gate = root + ".gate"
    proc = _start(root, err, "--deadline", "0.5", "--mb", "4", "--hang")
    try:
        _read_marker(proc, "SAVING 2", 60, err)  # the writer is held at the gate now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = _wait(proc, 30, err)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        # Open the gate: a writer that outlived its training process would now write step 2.
        Path(gate).unlink(missing_ok=True)
    log = Path(err).read_text()
    assert rc == 128 + signal.SIGTERM, log
    assert "abandoned the in-flight save of step 2" in log, log
    assert elapsed < 20, f"the child took {elapsed:.1f}s to exit after SIGTERM\n{log}"
    time.sleep(1.0)  # time for a surviving writer to commit (it must not exist)
    assert not os.path.exists(os.path.join(root, "step_0000000002", "manifest.json")), log
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.steps() == [1]
    _assert_step1_intact(root)
