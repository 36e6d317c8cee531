"""Helpers of the async tests that run inside the writer subprocess.

The writer subprocess does not import the test runner's ``__main__``:
everything handed to it (subprocess init functions, writer init functions,
hooks, exceptions) must be importable by name there. ``tests/`` is on
``sys.path`` in the test process (``conftest.py`` puts it there) and the
writer gets the parent's ``sys.path``, so this module is importable as
``async_testutil`` in both.

Delays are *armed* by a file: they apply only while ``arm_file`` exists, so
that the same writer serves a normal save, then a save that hangs where the
test wants to kill it, then a normal save again (also after a respawn, which
runs the init functions again).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

import torchckpt as tc
from torchckpt.barriers import BarrierConfig, create_barrier_from_config

#: How long an armed delay sleeps: far longer than any test waits, so only a kill ends it.
HANG_S = 30.0

#: A path containing this fails in ``FailingHook.pre_commit``.
FAIL_MARKER = "FAILME"


class InjectedFailure(RuntimeError):
    """The failure the tests inject into a write (picklable: module-level, message-only)."""


def _armed(arm_file: str) -> bool:
    return os.path.exists(arm_file)


def _reached(reached_file: str) -> None:
    Path(reached_file).write_text(str(os.getpid()))


def _hang(arm_file: str, reached_file: str) -> None:
    if _armed(arm_file):
        _reached(reached_file)
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and _armed(arm_file):
            time.sleep(0.02)


class SlowWriter(tc.CheckpointWriter):
    """A writer that, while armed, hangs before it writes anything."""

    def __init__(self, *args: Any, arm_file: str, reached_file: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arm_file = arm_file
        self.reached_file = reached_file

    def write(self, path: str, state_dict: Any, **kwargs: Any) -> None:
        _hang(self.arm_file, self.reached_file)
        super().write(path, state_dict, **kwargs)


def slow_writer_init(
    rank_info: tc.RankInfo,
    arm_file: str,
    reached_file: str,
    config: tc.CheckpointWriterConfig | None = None,
) -> SlowWriter:
    """``checkpoint_writer_init_fn`` building a :class:`SlowWriter`."""
    return SlowWriter(
        config=config or tc.CheckpointWriterConfig(), rank_info=rank_info, arm_file=arm_file, reached_file=reached_file
    )


class FailingHook(tc.WriterHook):
    """Fails ``pre_commit`` (after the data is written, before the commit) of paths holding ``FAIL_MARKER``."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if FAIL_MARKER in os.path.basename(path):
            raise InjectedFailure(f"injected pre_commit failure for {path}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def failing_writer_init(
    rank_info: tc.RankInfo,
    config: tc.CheckpointWriterConfig | None = None,
    barrier_config: BarrierConfig | None = None,
) -> tc.CheckpointWriter:
    """``checkpoint_writer_init_fn`` building a writer with a :class:`FailingHook`."""
    barrier = create_barrier_from_config(barrier_config) if barrier_config is not None else None
    return tc.CheckpointWriter(
        config=config or tc.CheckpointWriterConfig(), rank_info=rank_info, barrier=barrier, commit_hook=FailingHook()
    )


def hang_in_data_write(arm_file: str, reached_file: str) -> None:
    """``subprocess_init_fn``: while armed, the torch_save stream hangs after its first chunk of data.

    The data file in the pending directory then holds a part of the checkpoint
    when the writer is killed.
    """
    from torchckpt.format import torch_save

    original = torch_save._ChecksumWriter.write

    def write(self: Any, data: Any) -> int:
        n = original(self, data)
        if self.size >= 1 << 20:
            _hang(arm_file, reached_file)
        return n

    torch_save._ChecksumWriter.write = write  # type: ignore[method-assign]


def hang_before_commit(arm_file: str, reached_file: str) -> None:
    """``subprocess_init_fn``: while armed, the commit (manifest write and directory swap) hangs before it starts.

    All data is written and fsynced when the writer is killed there.
    """
    from torchckpt.storage.local_save import LocalSaveSession

    original = LocalSaveSession.commit

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        _hang(arm_file, reached_file)
        return original(self, *args, **kwargs)

    LocalSaveSession.commit = commit  # type: ignore[method-assign]


# -- the test process's side: what it holds --------------------------------


def children(pid: int | None = None) -> dict[int, str]:
    """``{child pid: state letter}`` of every process whose parent is ``pid`` (default: this one), zombies included."""
    pid = os.getpid() if pid is None else pid
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out[int(entry)] = fields[0]
    return out


def is_resource_tracker(pid: int) -> bool:
    """Whether ``pid`` is multiprocessing's resource tracker (one per process, started by any spawn; not a leak)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "multiprocessing.resource_tracker" in cmdline


def writer_children() -> dict[int, str]:
    """Children of this process other than the resource tracker (and zombies of any kind)."""
    return {p: s for p, s in children().items() if s == "Z" or not is_resource_tracker(p)}


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` ("R", "S", "Z", ...), None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def shm_count() -> int:
    return len(os.listdir("/dev/shm"))


def wait_for_file(path: str, timeout: float, proc_alive: Any = None) -> None:
    """Wait until ``path`` exists; fail after ``timeout`` seconds or when ``proc_alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc_alive is not None and not proc_alive():
            raise AssertionError(f"the writer subprocess died before it reached {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def dir_bytes(path: str) -> dict[str, bytes]:
    """``{file name: bytes}`` of every file directly in ``path``."""
    return {name: Path(path, name).read_bytes() for name in sorted(os.listdir(path))}


class StepHook(tc.WriterHook):
    """A hook that takes one keyword, ``step``, by name (no ``**kwargs``)."""

    def pre_commit(self, path: str, step: int = -1) -> None:  # type: ignore[override]
        pass

    def post_commit(self, path: str, step: int = -1) -> None:  # type: ignore[override]
        pass


def step_hook_writer_init(
    rank_info: tc.RankInfo, config: tc.CheckpointWriterConfig | None = None
) -> tc.CheckpointWriter:
    """``checkpoint_writer_init_fn`` building a writer with a :class:`StepHook`."""
    config = config or tc.CheckpointWriterConfig()
    return tc.CheckpointWriter(config=config, rank_info=rank_info, commit_hook=StepHook())
# -- subprocess_init_fn helpers of the writer start tests ---------------------


def exit_now(code: int) -> None:
    """``subprocess_init_fn``: the writer exits with ``code`` while starting."""
    os._exit(code)


def kill_self(signum: int) -> None:
    """``subprocess_init_fn``: the writer kills itself with ``signum`` while starting."""
    os.kill(os.getpid(), signum)
    time.sleep(HANG_S)


def record_start(out_file: str, parent_pid: int) -> None:
    """``subprocess_init_fn``: write down how the writer was started (as JSON in ``out_file``).

    Also checks, as the reference's own tests do, that it is a direct child of ``parent_pid``.
    """
    import json
    import multiprocessing
    import signal
    import sys

    assert os.getpid() != parent_pid and os.getppid() == parent_pid, (os.getpid(), os.getppid(), parent_pid)
    main = sys.modules["__main__"]
    facts = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "main_file": getattr(main, "__file__", None),
        "main_name": getattr(getattr(main, "__spec__", None), "name", None),
        "authkey": multiprocessing.current_process().authkey.hex(),
        "cwd": os.getcwd(),
        "cmdline": Path(f"/proc/{os.getpid()}/cmdline").read_bytes().hex(),
        "environ": Path(f"/proc/{os.getpid()}/environ").read_bytes().hex(),
    }
    import torch.multiprocessing

    facts["sharing_strategy"] = torch.multiprocessing.get_sharing_strategy()
    Path(out_file).write_text(json.dumps(facts))


class MarkingWriter(tc.CheckpointWriter):
    """A writer that checks how tensors arrive and marks the shared one (the reference's shared-memory test)."""

    def __init__(self, *args: Any, out_file: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_file = out_file

    def write(self, path: str, state_dict: Any, **kwargs: Any) -> None:
        import json

        state_dict["shared"][0] = 42.0  # the parent sees it: the same memory
        facts = {k: bool(v.is_shared()) for k, v in state_dict.items() if hasattr(v, "is_shared")}
        facts["kwargs"] = sorted(kwargs)
        Path(self.out_file).write_text(json.dumps(facts))


def marking_writer_init(rank_info: tc.RankInfo, out_file: str) -> MarkingWriter:
    """``checkpoint_writer_init_fn`` building a :class:`MarkingWriter`."""
    return MarkingWriter(config=tc.CheckpointWriterConfig(), rank_info=rank_info, out_file=out_file)


def fail_start(message: str) -> None:
    """``subprocess_init_fn``: the writer's initialisation raises ``RuntimeError(message)``."""
    raise RuntimeError(message)


def writer_process(ckpt: tc.AsyncCheckpointer, timeout: float = 120.0) -> Any:
    """The writer subprocess of ``ckpt`` (a ``multiprocessing`` process).

    A save does not wait for the writer to start: this waits (up to ``timeout``
    seconds) for the start that the first save or ``warmup`` began. A start
    that failed still has its process: the caller checks it is no longer alive.
    """
    process = ckpt._checkpoint_process
    concurrent.futures.wait([process.process_creation_future], timeout=timeout)
    return process.process.processes[0]
