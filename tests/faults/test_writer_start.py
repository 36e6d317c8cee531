"""Starting the writer subprocess: training scripts without a main guard, torchrun, writers that cannot start.

Standard outcome: a script written as most training scripts are (no
``if __name__ == "__main__":``) saves in the background, alone and under
``torchrun``, and exits cleanly with nothing on stderr; the writer never runs
the user's script unless the user's own code for the writer is defined in it,
and then a script that would start saving again fails with a message saying
so, not a hang; a writer that dies while starting fails the start at once,
naming its exit code or signal and where its messages went. Every wait here
is bounded.
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

import torchckpt as tc
from torchckpt.errors import WriterProcessError

#: Longest run of one script (two ranks start torch, gloo and two writers on a loaded machine).
SCRIPT_TIMEOUT_S = 240
#: A writer that dies while starting must fail the start well within its (large) init timeout.
FAIL_FAST_S = 20.0

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(tc.__file__)))


def run_script(tmp_path, body: str, *launcher: str) -> subprocess.CompletedProcess[str]:
    """Write ``body`` to ``train.py`` and run it (``python train.py``, or under ``launcher``), bounded."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, *(launcher or ()), str(script)]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False
    )


def test_script_without_main_guard_saves_in_the_background(tmp_path) -> None:
    result = run_script(
        tmp_path,
        f"""
        import torch
        import torchckpt as tc

        ckpt = tc.make_async_checkpointer()
        state = {{"w": torch.arange(1000.0), "step": 3}}
        stage, write = ckpt.save({str(tmp_path / "ckpt")!r}, state)
        write.result(timeout=120)
        loaded = ckpt.load({str(tmp_path / "ckpt")!r})
        assert torch.equal(loaded["w"], torch.arange(1000.0)) and loaded["step"] == 3, loaded
        ckpt.close()
        print("MARKER saved and loaded", flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "MARKER saved and loaded\n"
    assert result.stderr == ""


def test_script_without_main_guard_under_torchrun(tmp_path) -> None:
    root = str(tmp_path / "ckpts")
    result = run_script(
        tmp_path,
        f"""
        import torch
        import torch.distributed as dist
        import torchckpt as tc

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        with tc.CheckpointManager({root!r}, keep=[tc.KeepLast(2)]) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, {{"w": torch.full((100,), float(10 * step + rank)), "step": step}})
            mgr.wait()
            dist.barrier()
            step, state = mgr.load()
            assert step == 3 and torch.equal(state["w"], torch.full((100,), 30.0 + rank)), (step, state)
            assert mgr.steps() == [2, 3], mgr.steps()
        dist.destroy_process_group()
        print(f"MARKER rank {{rank}} ok", flush=True)
        """,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == ["MARKER rank 0 ok", "MARKER rank 1 ok"], result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_writer_code_in_a_guarded_script_is_imported_by_the_writer(tmp_path) -> None:
    """An init function and a writer factory defined in ``__main__``: the writer imports the script, as spawn did."""
    result = run_script(
        tmp_path,
        f"""
        import os
        import torch
        import torchckpt as tc

        def init(marker):
            open(marker, "w").write(str(os.getpid()))

        def make_writer(rank_info):
            return tc.CheckpointWriter(config=tc.CheckpointWriterConfig(), rank_info=rank_info)

        if __name__ == "__main__":
            ckpt = tc.make_async_checkpointer(
                rank_info=tc.RankInfo(0, 1),
                subprocess_init_fn=init,
                subprocess_init_args=({str(tmp_path / "init-ran")!r},),
                checkpoint_writer_init_fn=make_writer,
            )
            ckpt.save({str(tmp_path / "ckpt")!r}, {{"w": torch.ones(4)}})[1].result(timeout=120)
            assert torch.equal(ckpt.load({str(tmp_path / "ckpt")!r})["w"], torch.ones(4))
            ckpt.close()
            print("MARKER ok", flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "MARKER ok\n"
    assert (tmp_path / "init-ran").read_text().isdigit()


def test_a_save_holding_a_class_of_the_script_restarts_the_writer_with_the_script(tmp_path) -> None:
    """A pickled value whose class is defined in ``__main__``: the writer is replaced by one that imports the script."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    result = run_script(
        tmp_path,
        f"""
        import torch
        import torchckpt as tc

        class Note:
            def __init__(self, text):
                self.text = text

        if __name__ == "__main__":
            config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(allow_pickle=True))
            ckpt = tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))
            ckpt.save({first!r}, {{"w": torch.ones(2)}})[1].result(timeout=120)
            before = ckpt._checkpoint_process.process.processes[0].pid
            ckpt.save({second!r}, {{"w": torch.ones(2), "note": Note("kept")}})[1].result(timeout=120)
            after = ckpt._checkpoint_process.process.processes[0].pid
            loaded = ckpt.load({second!r})
            assert type(loaded["note"]).__name__ == "Note" and loaded["note"].text == "kept", loaded
            ckpt.close()
            print("MARKER", before != after, flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "MARKER True\n"


def test_writer_code_in_a_script_without_guard_fails_with_a_clear_message(tmp_path) -> None:
    """The writer would re-run the script (which saves again): refused, and said why, instead of a hang."""
    result = run_script(
        tmp_path,
        f"""
        import torch
        import torchckpt as tc

        def init():
            pass

        ckpt = tc.make_async_checkpointer(rank_info=tc.RankInfo(0, 1), subprocess_init_fn=init)
        ckpt.save({str(tmp_path / "ckpt")!r}, {{"w": torch.ones(4)}})[1].result(timeout=120)
        print("MARKER saved", flush=True)
        """,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MARKER" not in result.stdout, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a checkpoint writer subprocess tried to start another one"), result.stderr
    assert 'if __name__ == "__main__":' in last, last
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


@pytest.mark.parametrize(
    ("init_fn", "arg", "expected"),
    [
        pytest.param(at.exit_now, 3, "exited with code 3 during start", id="exit"),
        pytest.param(at.kill_self, signal.SIGKILL, "was killed by SIGKILL during start", id="sigkill"),
        pytest.param(at.kill_self, signal.SIGSEGV, "was killed by SIGSEGV during start", id="sigsegv"),
    ],
)
def test_writer_that_dies_while_starting_fails_fast_naming_why(init_fn, arg, expected: str) -> None:
    children_before = set(at.writer_children())
    config = tc.CheckpointerConfig(process_config=tc.CheckpointProcessConfig(subprocess_init_timeout_secs=600))
    started = time.monotonic()
    ckpt = tc.make_async_checkpointer(
        config, rank_info=tc.RankInfo(0, 1), subprocess_init_fn=init_fn, subprocess_init_args=(arg,)
    )
    try:
        with pytest.raises(WriterProcessError) as info:
            ckpt._checkpoint_process.process_creation_future.result(timeout=FAIL_FAST_S)
        assert time.monotonic() - started < FAIL_FAST_S
        error = info.value
        assert isinstance(error, RuntimeError)
        message = str(error)
        assert message.startswith("Child process terminated unexpectedly: "), message
        assert f"writer subprocess (pid {error.pid}) {expected}" in message, message
        assert "the writer's own messages, if any, are on this process's standard error" in message, message
        assert error.exitcode == (arg if init_fn is at.exit_now else -arg)
        assert at.process_state(error.pid) is None  # reaped
    finally:
        ckpt.close()
    assert {p: s for p, s in at.writer_children().items() if p not in children_before} == {}
