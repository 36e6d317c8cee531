"""Helpers of the I/O-fault and kill-point tests: small file systems, states, what a failure must leave.

Importable by name from the tests of this directory and from the child
scripts they start (``tests/faults`` is put on their ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

FAULTS_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.dirname(FAULTS_DIR)
REPO_DIR = os.path.dirname(TESTS_DIR)


def state(step: int, mib: float, *, tensors: int = 4) -> dict[str, Any]:
    """A state of about ``mib`` MiB in ``tensors`` float32 tensors; every value tells the step."""
    n = max(1, int(mib * (1 << 20)) // 4 // tensors)
    g = torch.Generator().manual_seed(step)
    return {
        "model": {f"l{i}": torch.rand(n, generator=g) + step for i in range(tensors)},
        "ids": torch.full((10,), step, dtype=torch.int64),
        "step": step,
    }


def manifests_under(parent: str) -> list[str]:
    """Every ``manifest.json`` (and temporary manifest) below ``parent``, relative to it."""
    return sorted(
        os.path.relpath(os.path.join(d, f), parent)
        for d, _, files in os.walk(parent)
        for f in files
        if f.startswith("manifest.json")
    )


def child_env() -> dict[str, str]:
    """Environment of a child Python that imports torchckpt and the test helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [FAULTS_DIR, TESTS_DIR, os.path.join(REPO_DIR, "src"), env.get("PYTHONPATH", "")]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no .pyc renames among the syscalls a test counts or fails
    return env


def free_bytes(path: str) -> int:
    """Bytes free for an unprivileged user on the file system of ``path`` (what ``df`` shows)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); running as uid {os.geteuid()}")


@contextlib.contextmanager
def tmpfs(mountpoint: str, size: str, *, options: str = "") -> Iterator[str]:
    """Mount a tmpfs of ``size`` (e.g. ``"24m"``) at ``mountpoint`` for the block; skip when that is impossible."""
    require_root("a small file system")
    os.makedirs(mountpoint, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", mountpoint], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {mountpoint} ({opts}): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: str) -> None:
    """Unmount, lazily when something still holds it (a writer being torn down)."""
    if subprocess.run(["umount", mountpoint], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)


def remount(mountpoint: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", mountpoint], check=True, capture_output=True)


def run_python(
    script: str, *args: str, timeout_s: float = 120, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python script args...`` (optionally under ``prefix``, e.g. strace) and capture its output."""
    cmd = [*(prefix or []), sys.executable, script, *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, env=child_env())


def describe(e: BaseException) -> dict[str, Any]:
    """What a child reports of an error: JSON-able fields the tests check."""
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "errno": getattr(e, "errno", None),
        "operation": getattr(e, "operation", None),
        "path": getattr(e, "path", None),
        "rank": getattr(e, "rank", None),
        "failures": {str(k): v for k, v in (getattr(e, "failures", None) or {}).items()},
    }
