"""Measuring one operation well on a small, shared VM: timing, memory, page cache, noise.

:class:`Bench` times operations and keeps every raw figure. Before a timed
operation it (optionally) drops the page cache, flushes dirty pages
(``os.sync``), and touches as much fresh memory as the operation will need
(:func:`prefault`); during it, a separate sampler process (``memsample.py``)
records the peak resident memory of this process and of its descendants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from memsample import descendants

HERE = Path(__file__).resolve().parent
DROP_CACHES = "/proc/sys/vm/drop_caches"
MIB = 2**20


# --------------------------------------------------------------------------- page cache and memory


def cold_method() -> str:
    """How caches are dropped here: 'drop_caches' (system-wide, needs root) or 'fadvise' (per file)."""
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        return "fadvise"


def cold_description(method: str) -> str:
    if method == "drop_caches":
        return "os.sync() then echo 3 > /proc/sys/vm/drop_caches (root)"
    return "os.sync() then posix_fadvise(POSIX_FADV_DONTNEED) on every file read (not root)"


def drop_caches(method: str, root: str) -> None:
    """Make the next read of everything under ``root`` come from the disk."""
    os.sync()
    if method == "drop_caches":
        with open(DROP_CACHES, "w") as f:
            f.write("3")
        return
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory and free it again.

    On a VM whose balloon hands free pages back to the host, memory freed a
    few seconds ago is no longer backed and the first touch of each page costs
    a host fault (2-4 s/GiB after an idle spell, 0.1 s right after a free). A
    timed operation that needs fresh pages (page cache for a write or a cold
    read, fresh tensors for a load, a staging copy) would pay that depending on
    what ran before it; touching and freeing as much right before the timer
    starts gives every method the same, backed, free memory. Never more than
    what is available less ``PREFAULT_HEADROOM`` (large states: no OOM).
    """
    nbytes = min(nbytes, mem_available() - PREFAULT_HEADROOM)
    if nbytes <= 0:
        return
    a = np.empty(nbytes, np.uint8)
    a[::4096] = 1
    del a


def _malloc_trim_fn() -> Callable[[], None]:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        fn(0)

    return trim


#: glibc's malloc_trim(0): returns the free memory of every heap to the system (a no-op elsewhere).
malloc_trim = _malloc_trim_fn()

#: Memory prefault() leaves untouched (other processes, the operation's own allocations).
PREFAULT_HEADROOM = 3 * 2**30


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sync_file_range_fn() -> Callable[[int, int, int], int] | None:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` from libc, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, off, n: int(fn(fd, off, n, 2))


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and the directories holding them.

    For checkpointers that do not make their files durable: added to their
    save time so that every method is compared up to the same point.
    """
    targets = [path] if os.path.isfile(path) else []
    for dirpath, _, names in os.walk(path):
        targets.extend(os.path.join(dirpath, n) for n in names)
        targets.append(dirpath)
    for t in targets:
        fd = os.open(t, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


# --------------------------------------------------------------------------- memory sampler client


class MemProbe:
    """Client of the ``memsample.py`` process that samples this process and its descendants."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "memsample.py"), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def start(self) -> None:
        self._ask("start")

    def stop(self) -> dict[str, Any]:
        return self._ask("stop")

    def snap(self) -> dict[str, int]:
        return self._ask("snap")

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the sampler exits
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# --------------------------------------------------------------------------- noise


class CpuMeter:
    """How many cores other processes kept busy: /proc/stat minus this process and all its descendants.

    The benchmark's own processes (rank processes, async writer subprocesses,
    the memory sampler) are its descendants: their CPU time is read from
    ``/proc/<pid>/stat`` while they live (with what they reaped of theirs), and
    from this process's children times once reaped, so none of it counts as
    another process's.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self.start()

    def _busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        return (sum(v[:8]) - v[3] - v[4]) / self._tick  # all but idle and iowait

    def _own(self) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        for pid in descendants(os.getpid()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile: its time is in its parent's children times
            own += sum(int(x) for x in fields[11:15]) / self._tick  # utime, stime, cutime, cstime
        return own

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()

    def foreign_cores(self) -> float:
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


# --------------------------------------------------------------------------- rows and samples


@dataclass
class Row:
    """One measured operation of one method.

    Attributes:
        key: Identifier (JSON, ratios).
        label: Table label.
        group: "limit", "peer" or "torchckpt".
        op: "copy", "save", "load".
        nbytes: Tensor bytes the operation moves (throughput = nbytes / time).
        state: "main" (the transformer-like state) or "many_small".
        notes: What is added or special (shown under the table).
    """

    key: str
    label: str
    group: str
    op: str
    nbytes: int
    state: str = "main"
    notes: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs timed operations and keeps their raw figures, row by row."""

    def __init__(self, scratch: str, cold: str, *, prefault_on: bool = True, probe: MemProbe | None = None) -> None:
        self.scratch = scratch
        self.cold = cold
        self.prefault_on = prefault_on
        self.probe = probe
        self.rows: dict[str, Row] = {}
        self.checks: dict[str, bool] = {}
        self.rep = 0
        self.skipped: dict[str, str] = {}

    def row(self, key: str, label: str, group: str, op: str, nbytes: int, **kw: Any) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, group, op, nbytes, **kw)
        return self.rows[key]

    def path(self, name: str) -> str:
        """A fresh path for this repetition (never reused: what a step-numbered save does)."""
        return os.path.join(self.scratch, f"{name}-r{self.rep}")

    def sync(self) -> None:
        os.sync()

    def drop(self) -> None:
        drop_caches(self.cold, self.scratch)

    def measure(
        self,
        row: Row,
        fn: Callable[[], Any],
        *,
        before: Callable[[], None] | None = None,
        fresh_bytes: int = 0,
        record: bool = True,
    ) -> Any:
        """Time ``fn()``; ``fn`` may return ``(result, {"stall_s": ...})`` to add figures.

        Args:
            row: Where the figures go.
            fn: The operation.
            before: Runs first, untimed (sync, drop caches).
            fresh_bytes: Fresh memory the operation needs (touched and freed first, see :func:`prefault`).
            record: False for a warm-up: timed and returned, not kept.
        """
        gc.collect()
        if before is not None:
            before()
        if self.prefault_on and fresh_bytes:
            prefault(fresh_bytes + 64 * MIB)
        # Free heap memory back to the system first (always, so that timings do not depend on --no-memory):
        # an allocation the operation makes then shows as growth of the resident set instead of reusing
        # memory the allocator kept from an earlier operation, and every method starts from the same heap.
        malloc_trim()
        if self.probe is not None:
            self.probe.start()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        mem = self.probe.stop() if self.probe is not None else None
        figures: dict[str, Any] = {}
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) and "_figures" in out[1]:
            figures = {k: v for k, v in out[1].items() if k != "_figures"}
            out = out[0]
        sample: dict[str, Any] = {"rep": self.rep, "time_s": elapsed, "cpu_s": cpu, **figures}
        if mem is not None:
            first, peak = mem["first"], mem["peak"]
            sample["mem"] = {
                "main_delta": peak["main"] - first["main"],
                "children_delta": peak["children"] - first["children"],
                "main_before": first["main"],
                "children_before": first["children"],
                "children_shmem_peak": peak["children_shmem"],
                "samples": mem["samples"],
                "interval_ms": mem["interval_ms"],
            }
        if record:
            row.samples.append(sample)
        else:
            row.extra.setdefault("warmup", []).append(sample)
        return out

    def check(self, key: str, ok: bool) -> None:
        self.checks[key] = self.checks.get(key, True) and bool(ok)
        if not ok:
            print(f"  !! {key}: loaded state differs from the saved one", flush=True)


def figures(**kw: Any) -> dict[str, Any]:
    """Extra figures returned by a measured function (see :meth:`Bench.measure`)."""
    return {"_figures": True, **kw}


# --------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def machine(scratch: str) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    fs = {}
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-T", scratch, "-o", "SOURCE,FSTYPE,OPTIONS"], capture_output=True, text=True, check=False
        ).stdout.split()
        if len(out) >= 2:
            fs = {"source": out[0], "fstype": out[1], "options": out[2] if len(out) > 2 else ""}
    except OSError:
        pass
    disk = ""
    dev = os.path.basename(fs.get("source", ""))
    if dev:
        model = _read(f"/sys/block/{dev}/device/model")
        vendor = _read(f"/sys/block/{dev}/device/vendor")
        size = _read(f"/sys/block/{dev}/size")
        kind = "virtio" if dev.startswith("vd") else ("nvme" if dev.startswith("nvme") else "")
        parts = [p for p in (vendor, model, kind) if p]
        if size:
            parts.append(f"{int(size) * 512 / 1e9:.0f} GB")
        disk = f"{dev} ({', '.join(parts)})" if parts else dev
    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True, check=False
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    import torchckpt

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "disk": disk,
        "filesystem": fs,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchckpt": getattr(torchckpt, "__version__", "?"),
        "git_commit": commit + ("+dirty src" if dirty else ""),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def machine_line(m: dict[str, Any]) -> str:
    fs = m.get("filesystem", {})
    return (
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; disk {m['disk']}, "
        f"{fs.get('fstype', '?')} ({fs.get('options', '')}); Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']}, torchckpt {m['torchckpt']} ({m['git_commit']}); torch threads {m['torch_threads']}"
    )


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy flat byte view of a contiguous CPU tensor."""
    flat = t.detach().view(-1) if t.dim() else t.detach().reshape(1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
