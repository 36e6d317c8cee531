"""EIO from the kernel on a data write (any writer thread), on fsync and on rename, injected with strace.

A child process (``syscall_child.py``) saves over a committed checkpoint under
``strace -f -e inject=<syscall>:error=EIO:when=N -P <file>``: the N-th call
of that system call on that file, in each thread (strace counts per thread),
fails. ``-f`` follows the async writer subprocess and the writer threads.
Standard outcome (shared/RELIABILITY.md): the save fails with a
``CheckpointIOError`` naming rank, operation, path and errno 5; a failed
fsync is never retried and nothing is committed after it; the old checkpoint
loads byte-identical in the test process; nothing is left behind (strace
returns only when every traced process has exited).

Short writes are not injected here: strace's ``retval=`` injection skips the
write instead of performing part of it, which no kernel does.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass

import async_testutil as at
import ckpt_testutil as cu
import pytest
from fault_util import FAULTS_DIR, manifests_under, run_python, state

WRITES = "pwritev,pwritev2,pwrite64,write"
TRACED = f"{WRITES},fsync,fdatasync,rename,renameat,renameat2"


@dataclass(frozen=True)
class Case:
    """One injected fault: ``syscalls`` fail with EIO on their ``when``-th call on ``target`` in each thread."""

    name: str
    fmt: str
    mode: str
    threads: int
    syscalls: str
    when: int
    target: str  # "data" (the new rank file), "manifest" (manifest.json.tmp) or "path" (the checkpoint directory)
    operation: str  # what the error must say failed
    in_worker_thread: bool = False  # the failing call runs in a writer thread of the thread pool


CASES = [
    # The native format writes from a pool of threads: fail each one's second write (a later batch), or every first.
    Case("pwritev-2nd-call-per-thread", "safetensors", "sync", 2, "pwritev,pwritev2", 2, "data", "write", True),
    Case("pwritev-1st-call-per-thread", "safetensors", "async", 4, "pwritev,pwritev2", 1, "data", "write", True),
    # torch.save's stream goes to the rank file as positional writes, each at the end of the last.
    Case("write-torch_save", "torch_save", "sync", 1, "pwrite64", 3, "data", "write"),
    Case("fsync-data", "safetensors", "sync", 2, "fsync", 1, "data", "fsync"),
    Case("fsync-data", "torch_save", "async", 1, "fsync", 1, "data", "fsync"),
    Case("fsync-manifest", "torch_save", "sync", 1, "fsync", 1, "manifest", "write manifest"),
    Case("rename-manifest", "safetensors", "sync", 1, "rename,renameat", 1, "manifest", "write manifest"),
    Case("rename-exchange", "torch_save", "sync", 1, "renameat2,rename,renameat", 1, "path", "rename"),
]

#: More of the same, run with --runslow.
SLOW_CASES = [
    Case("write-torch_save", "torch_save", "async", 1, "pwrite64", 6, "data", "write"),
    Case("rename-exchange", "safetensors", "async", 2, "renameat2,rename,renameat", 1, "path", "rename"),
    Case("fsync-data", "safetensors", "async", 4, "fsync", 1, "data", "fsync"),
    Case("fsync-manifest", "safetensors", "async", 1, "fsync", 1, "manifest", "write manifest"),
    Case("pwrite-header", "safetensors", "sync", 2, "pwrite64", 1, "data", "write"),
]

#: The new state: 48 MiB in six 8 MiB tensors, three 16 MiB write batches for the writer threads to share.
NEW_MIB = 48


def _strace() -> str:
    exe = shutil.which("strace")
    if exe is None:
        pytest.skip("strace is not installed (apt-get install strace): its syscall-fault tests cannot run")
    return exe


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=f"{c.name}-{c.fmt}-{c.mode}") for c in CASES]
    + [pytest.param(c, id=f"{c.name}-{c.fmt}-{c.mode}", marks=pytest.mark.slow) for c in SLOW_CASES],
)
def test_eio_fails_the_save_and_keeps_the_old_checkpoint(tmp_path, case: Case) -> None:
    strace = _strace()
    parent = tmp_path / "ckpts"
    path = str(parent / "ckpt")
    pending = parent / ".ckpt.torchckpt-pending"
    old = state(1, 1)
    cu.checkpointer(case.fmt).save(path, old)
    before = at.dir_bytes(path)
    data_file = str(pending / cu.file_name(case.fmt))
    target = {"data": data_file, "manifest": str(pending / "manifest.json.tmp"), "path": path}[case.target]
    log = str(tmp_path / "strace.log")
    prefix = [
        strace, "-f", "--seccomp-bpf", "-qq", "-y", "-o", log,
        "-e", f"trace={TRACED}",
        "-e", f"inject={case.syscalls}:error=EIO:when={case.when}",
        "-P", target,
    ]  # fmt: skip
    child = os.path.join(FAULTS_DIR, "syscall_child.py")
    done = run_python(child, path, case.fmt, case.mode, str(case.threads), str(NEW_MIB), prefix=prefix, timeout_s=150)
    assert done.returncode == 0, f"the child crashed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with open(log) as f:
        trace = f.read().splitlines()
    injected = [line for line in trace if "(INJECTED)" in line]
    assert injected, f"nothing was injected; the trace of {target}:\n" + "\n".join(trace[-20:])

    # The error names the rank, the operation, the path and the cause.
    error = report["error"]
    assert error is not None, "the save reported success although a system call failed"
    expected_path = {"write": data_file, "fsync": data_file, "write manifest": str(pending / "manifest.json")}.get(
        case.operation, path
    )
    assert error["type"] == "CheckpointIOError", error
    assert "OSError" in error["mro"]
    assert error["errno"] == errno.EIO, error
    assert (error["rank"], error["operation"], error["path"]) == (0, case.operation, expected_path), error
    assert error["message"] == f"[Errno 5] rank 0: {case.operation} failed for {expected_path}: Input/output error"

    if case.in_worker_thread:
        # The failing writes ran in the pool's threads, not in a process's main thread.
        tids = {int(line.split()[0]) for line in injected}
        assert tids.isdisjoint(report["pids"]), (tids, report["pids"])
    if case.syscalls == "fsync":
        # A failed fsync is never retried: the dirty pages it lost cannot be trusted to a second one.
        fsyncs = [line for line in trace if re.match(r"^\d+\s+fsync\(", line) and target in line]
        assert len(fsyncs) == 1, fsyncs
    if case.target == "manifest":
        renamed = [line for line in trace if re.match(r"^\d+\s+rename", line) and "INJECTED" not in line]
        assert renamed == [], renamed  # the manifest never reached its name

    # The old checkpoint is untouched and loads; nothing incomplete is left, let alone with a manifest.
    assert at.dir_bytes(path) == before
    cu.assert_state_equal(cu.reader().read(path)[0], old)
    assert cu.hidden_leftovers(str(parent)) == []  # waits for the old generation to be deleted
    assert manifests_under(str(parent)) == ["ckpt/manifest.json"]

    # The next save (no fault) commits.
    new = state(3, 2)
    cu.checkpointer(case.fmt).save(path, new)
    cu.assert_state_equal(cu.reader().read(path)[0], new)
