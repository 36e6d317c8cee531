"""torchckpt's synchronous save and load against the disk and memory limits and torch.save.

Everything is measured in one process, interleaved and repeated: each
repetition runs four blocks — raw file I/O, torch.save/torch.load, torchckpt
native ("safetensors") and torchckpt "torch_save" format — in an order rotated
from one repetition to the next, so that drift and the noise of a busy machine
spread over all methods alike. Ratios are computed within the run (from the
medians, and as the median of the per-repetition ratios).

What is timed (seconds; throughput is tensor bytes / time, GB = 1e9 bytes):

* raw write + fsync: every tensor's bytes, ``f.write(memoryview)`` per tensor
  into one fresh file (Python buffered file), ``flush`` + ``os.fsync``.
* raw pwrite + sync_file_range + fsync (reference only): 16 MiB ``pwritev``
  batches, ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after each, then fsync —
  the faster write path of ``shared/BASELINES.md``, one thread.
* raw read warm / cold: ``readinto`` of that file into preallocated, touched
  tensors (unbuffered ``FileIO``), with the file in the page cache, or after
  dropping caches (``echo 3 > /proc/sys/vm/drop_caches`` as root, else
  ``posix_fadvise(DONTNEED)`` on the files read; the report says which).
* torch.save + fsync of the state dict; torch.load(weights_only=True) warm.
* torchckpt sync save to a fresh path, native and torch_save formats; one
  more native save onto the existing checkpoint ("overwrite").
* torchckpt load native: fresh tensors (warm, cold) and in place into a
  preallocated template (warm, cold); torch_save format fresh (warm).

Checkpoint directories and files are removed between repetitions outside the
timed regions; before every timed save the page cache is flushed
(``os.sync``) so that no earlier write is paid for inside it. Before every
timed operation that needs fresh pages, as much memory as it needs is touched
and freed (``prefault``; ``--no-prefault`` turns it off): on this kind of VM
free memory is handed back to the host, and re-faulting it costs 2-4 s/GiB,
which would otherwise be charged to whichever method comes after an idle
spell or a cache drop. The first repetition checks that every load returned
the saved bytes.

Each row also gives the CPU seconds (user + system, all threads) the process
spent in the operation: steadier than wall time when other work shares the
cores, and it shows where overhead is. The run records how many cores other
processes kept busy during each repetition (from /proc/stat), as a measure of
the noise.

Usage::

    python benchmarks/bench_sync.py [--size-gib 1] [--reps 3] [--dir /work/bench-scratch]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import describe, make_state, state_equal, template_like, tensor_bytes, tensors

import torchckpt as tc

_DROP_CACHES = "/proc/sys/vm/drop_caches"
_CHUNK = 16 * 1024 * 1024

# (key, label) in table order.
ROWS: list[tuple[str, str]] = [
    ("raw_write", "raw write + fsync (f.write per tensor)"),
    ("raw_pwrite_sfr", "raw pwritev 16 MiB + sync_file_range + fsync (reference)"),
    ("raw_read_warm", "raw readinto, warm"),
    ("raw_read_cold", "raw readinto, cold"),
    ("torch_save", "torch.save + fsync"),
    ("torch_load_warm", "torch.load(weights_only=True), warm"),
    ("tc_native_save", "torchckpt save, native (fresh path)"),
    ("tc_native_save_overwrite", "torchckpt save, native, overwrite"),
    ("tc_native_load_fresh_warm", "torchckpt load native, fresh, warm"),
    ("tc_native_load_inplace_warm", "torchckpt load native, in place, warm"),
    ("tc_native_load_inplace_cold", "torchckpt load native, in place, cold"),
    ("tc_native_load_fresh_cold", "torchckpt load native, fresh, cold"),
    ("tc_tsave_save", "torchckpt save, torch_save format"),
    ("tc_tsave_load_fresh_warm", "torchckpt load torch_save format, fresh, warm"),
]

# (name, numerator key, denominator key, "time" ratio or "throughput" ratio, target, "ge"/"le")
RATIOS: list[tuple[str, str, str, str, float, str]] = [
    ("native save / raw write+fsync (throughput)", "tc_native_save", "raw_write", "throughput", 0.85, "ge"),
    (
        "native load in place / raw read, warm (throughput)",
        "tc_native_load_inplace_warm",
        "raw_read_warm",
        "throughput",
        0.85,
        "ge",
    ),
    (
        "native load in place / raw read, cold (throughput)",
        "tc_native_load_inplace_cold",
        "raw_read_cold",
        "throughput",
        0.85,
        "ge",
    ),
    ("torch_save-format save / torch.save+fsync (time)", "tc_tsave_save", "torch_save", "time", 1.10, "le"),
    # Context, no target.
    (
        "native save / raw pwritev+sync_file_range (throughput)",
        "tc_native_save",
        "raw_pwrite_sfr",
        "throughput",
        0.0,
        "",
    ),
    ("native overwrite save / native fresh save (time)", "tc_native_save_overwrite", "tc_native_save", "time", 0.0, ""),
    (
        "native load fresh / raw read, warm (throughput)",
        "tc_native_load_fresh_warm",
        "raw_read_warm",
        "throughput",
        0.0,
        "",
    ),
    (
        "native load fresh / raw read, cold (throughput)",
        "tc_native_load_fresh_cold",
        "raw_read_cold",
        "throughput",
        0.0,
        "",
    ),
    (
        "native load fresh warm / torch.load warm (throughput)",
        "tc_native_load_fresh_warm",
        "torch_load_warm",
        "throughput",
        0.0,
        "",
    ),
    (
        "torch_save-format load / torch.load, warm (time)",
        "tc_tsave_load_fresh_warm",
        "torch_load_warm",
        "time",
        0.0,
        "",
    ),
]


# --------------------------------------------------------------------------- page cache


def _sync_file_range_fn() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, off, n: fn(fd, off, n, 2)  # SYNC_FILE_RANGE_WRITE


_SYNC_FILE_RANGE = _sync_file_range_fn()


def cold_method() -> str:
    """How caches are dropped here: 'drop_caches' (system-wide, root) or 'fadvise' (per file)."""
    try:
        with open(_DROP_CACHES, "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        return "fadvise"


def drop_caches(method: str, root: str) -> None:
    """Make the next read of everything under ``root`` come from the disk."""
    os.sync()
    if method == "drop_caches":
        with open(_DROP_CACHES, "w") as f:
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

    On a VM whose balloon reports free pages to the host (virtio-balloon free
    page reporting, DAMON reclaim), memory freed a few seconds ago is no longer
    backed, and the first touch of each page costs a host fault: measured here,
    2-4 s per GiB after an idle spell against 0.1 s right after a free. A
    timed operation that needs fresh pages (page cache for a write or a cold
    read, tensors for a fresh load) would pay that, depending on what ran just
    before it. Touching and freeing that much memory right before the timer
    starts gives every method the same, backed, free memory.
    """
    a = np.empty(nbytes, np.uint8)
    a[::4096] = 1
    del a


# --------------------------------------------------------------------------- raw I/O


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy flat byte view of a contiguous CPU tensor."""
    flat = t.detach().view(-1) if t.dim() else t.detach().reshape(1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def raw_write(path: str, views: list[memoryview]) -> None:
    with open(path, "wb") as f:
        f.writelines(views)
        f.flush()
        os.fsync(f.fileno())


def raw_pwrite_sfr(path: str, views: list[memoryview]) -> None:
    """16 MiB pwritev batches, writeback started after each, then fsync (one thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        batch: list[memoryview] = []
        batch_bytes = 0

        def flush() -> None:
            nonlocal pos, batch, batch_bytes
            done = 0
            while done < batch_bytes:
                bufs = batch
                if done:  # short write: skip what went out
                    skip, bufs = done, []
                    for b in batch:
                        if skip >= b.nbytes:
                            skip -= b.nbytes
                        else:
                            bufs.append(b[skip:])
                            skip = 0
                done += os.pwritev(fd, bufs, pos + done)
            if _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(fd, pos, batch_bytes)
            pos += batch_bytes
            batch, batch_bytes = [], 0

        for v in views:
            off = 0
            while off < v.nbytes:
                take = min(v.nbytes - off, _CHUNK - batch_bytes)
                batch.append(v[off : off + take])
                batch_bytes += take
                off += take
                if batch_bytes >= _CHUNK or len(batch) >= 1024:
                    flush()
        if batch:
            flush()
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: str, views: list[memoryview]) -> None:
    with open(path, "rb", buffering=0) as f:
        for v in views:
            got = 0
            while got < v.nbytes:
                n = f.readinto(v[got:])
                if not n:
                    raise EOFError(path)
                got += n


# --------------------------------------------------------------------------- harness


class Bench:
    """Runs timed operations and collects their times and checks."""

    def __init__(self, scratch: str, cold: str, nbytes: int, prefault: bool = True) -> None:
        self.prefault = prefault
        self.scratch = scratch
        self.cold = cold
        self.nbytes = nbytes
        self.times: dict[str, list[float]] = {k: [] for k, _ in ROWS}
        # CPU seconds (user + system, all threads) this process spent in each operation:
        # steadier than wall time on a busy machine, and where the overhead is.
        self.cpu: dict[str, list[float]] = {k: [] for k, _ in ROWS}
        self.native_stats: list[dict[str, float]] = []
        self.checks: dict[str, bool] = {}

    def time(
        self, key: str, fn: Callable[[], Any], *, before: Callable[[], None] | None = None, fresh_pages: float = 0.0
    ) -> Any:
        """Time ``fn()`` after ``before()`` and after backing ``fresh_pages`` x the state size of free memory."""
        gc.collect()
        if before is not None:
            before()
        if self.prefault and fresh_pages:
            prefault(int(fresh_pages * self.nbytes) + 64 * 2**20)
        # The garbage collector stays on while timing: it is part of what a user pays (measured: ~5 ms a save).
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        c1 = time.process_time()
        self.times[key].append(elapsed)
        self.cpu[key].append(c1 - c0)
        return out

    def check(self, key: str, ok: bool) -> None:
        self.checks[key] = self.checks.get(key, True) and bool(ok)
        if not ok:
            print(f"  !! {key}: loaded state differs from the saved one", flush=True)

    def sync(self) -> None:
        os.sync()

    def drop(self) -> None:
        drop_caches(self.cold, self.scratch)


class CpuMeter:
    """CPU seconds the rest of the machine used while we ran (the noise): from /proc/stat minus ours."""

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
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()

    def foreign_cores(self) -> float:
        """Average number of cores other processes kept busy since ``start``."""
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


def _zero(ts: list[torch.Tensor]) -> None:
    for t in ts:
        t.zero_()


def block_raw(b: Bench, sd: Any, dst: Any, verify: bool) -> None:
    src_views = [byte_view(t) for t in tensors(sd)]
    dst_ts = tensors(dst)
    dst_views = [byte_view(t) for t in dst_ts]
    f1 = os.path.join(b.scratch, "raw.bin")
    f2 = os.path.join(b.scratch, "raw_sfr.bin")
    b.time("raw_write", lambda: raw_write(f1, src_views), before=b.sync, fresh_pages=1)
    for key, before, pages in (("raw_read_warm", None, 0), ("raw_read_cold", b.drop, 1)):
        _zero(dst_ts)
        b.time(key, lambda: raw_read(f1, dst_views), before=before, fresh_pages=pages)
        if verify:
            b.check(key, state_equal(dst, sd))
    os.unlink(f1)
    b.time("raw_pwrite_sfr", lambda: raw_pwrite_sfr(f2, src_views), before=b.sync, fresh_pages=1)
    os.unlink(f2)


def block_torch(b: Bench, sd: Any, dst: Any, verify: bool) -> None:
    f = os.path.join(b.scratch, "torch_save.pt")

    def save() -> None:
        with open(f, "wb") as fh:
            torch.save(sd, fh)
            fh.flush()
            os.fsync(fh.fileno())

    b.time("torch_save", save, before=b.sync, fresh_pages=1)
    out = b.time("torch_load_warm", lambda: torch.load(f, weights_only=True), fresh_pages=1)
    if verify:
        b.check("torch_load_warm", state_equal(out, sd))
    del out
    os.unlink(f)


def block_native(b: Bench, sd: Any, dst: Any, verify: bool) -> None:
    ck = tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors")))
    path = os.path.join(b.scratch, "ckpt_native")
    shutil.rmtree(path, ignore_errors=True)
    b.time("tc_native_save", lambda: ck.save(path, sd), before=b.sync, fresh_pages=1)
    with open(os.path.join(path, "manifest.json")) as fh:
        stats = dict(json.load(fh).get("stats", {}))
    stats["total_s"] = b.times["tc_native_save"][-1]
    b.native_stats.append(stats)
    dst_ts = tensors(dst)

    out = b.time("tc_native_load_fresh_warm", lambda: ck.load(path), fresh_pages=1)
    if verify:
        b.check("tc_native_load_fresh_warm", state_equal(out, sd))
    del out
    _zero(dst_ts)
    out = b.time("tc_native_load_inplace_warm", lambda: ck.load(path, dst))
    if verify:
        b.check("tc_native_load_inplace_warm", out is dst and state_equal(dst, sd))
    del out
    _zero(dst_ts)
    out = b.time("tc_native_load_inplace_cold", lambda: ck.load(path, dst), before=b.drop, fresh_pages=1)
    if verify:
        b.check("tc_native_load_inplace_cold", out is dst and state_equal(dst, sd))
    del out
    out = b.time("tc_native_load_fresh_cold", lambda: ck.load(path), before=b.drop, fresh_pages=2)
    if verify:
        b.check("tc_native_load_fresh_cold", state_equal(out, sd))
    del out
    b.time("tc_native_save_overwrite", lambda: ck.save(path, sd), before=b.sync, fresh_pages=1)
    if verify:
        b.check("tc_native_save_overwrite", state_equal(ck.load(path), sd))
    ck.close()
    shutil.rmtree(path)


def block_tsave(b: Bench, sd: Any, dst: Any, verify: bool) -> None:
    ck = tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="torch_save")))
    path = os.path.join(b.scratch, "ckpt_tsave")
    shutil.rmtree(path, ignore_errors=True)
    b.time("tc_tsave_save", lambda: ck.save(path, sd), before=b.sync, fresh_pages=1)
    out = b.time("tc_tsave_load_fresh_warm", lambda: ck.load(path), fresh_pages=1)
    if verify:
        b.check("tc_tsave_load_fresh_warm", state_equal(out, sd))
    del out
    ck.close()
    shutil.rmtree(path)


BLOCKS: list[tuple[str, Callable[[Bench, Any, Any, bool], None]]] = [
    ("raw", block_raw),
    ("torch", block_torch),
    ("native", block_native),
    ("torch_save_format", block_tsave),
]


def warm_up(scratch: str, cold: str) -> None:
    """One untimed pass over every method on a small state (imports, thread pools, first calls)."""
    small = make_state(32 * 2**20, seed=1)
    b = Bench(scratch, cold, tensor_bytes(small))
    for _, block in BLOCKS:
        block(b, small, template_like(small), True)
    if not all(b.checks.values()):
        raise SystemExit("warm-up: a load returned different bytes than were saved")


# --------------------------------------------------------------------------- report


def summarize(times: dict[str, list[float]], cpu: dict[str, list[float]], nbytes: int) -> dict[str, dict[str, float]]:
    out = {}
    for key, ts in times.items():
        if ts:
            med = statistics.median(ts)
            out[key] = {
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "gb_per_s": nbytes / med / 1e9,
                "cpu_median_s": statistics.median(cpu[key]),
            }
    return out


def ratios(times: dict[str, list[float]], summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    out = []
    for name, num, den, kind, target, sense in RATIOS:
        if num not in summary or den not in summary:
            continue
        tn, td = summary[num]["median_s"], summary[den]["median_s"]
        of_medians = td / tn if kind == "throughput" else tn / td
        paired = [(d / n if kind == "throughput" else n / d) for n, d in zip(times[num], times[den])]
        row: dict[str, Any] = {
            "name": name,
            "numerator": num,
            "denominator": den,
            "kind": kind,
            "ratio_of_medians": of_medians,
            "median_of_paired": statistics.median(paired),
            "paired": paired,
        }
        if sense:
            row["target"] = target
            row["sense"] = sense
            row["met"] = of_medians >= target if sense == "ge" else of_medians <= target
        out.append(row)
    return out


def render(summary: dict[str, dict[str, float]], rats: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | median s | min–max s | GB/s (median) | CPU s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        s = summary.get(key)
        if s:
            lines.append(
                f"| {label} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} | {s['gb_per_s']:.2f} "
                f"| {s['cpu_median_s']:.2f} |"
            )
    lines += ["", "| ratio | of medians | median of per-rep | target | met |", "|---|---:|---:|---:|---|"]
    for r in rats:
        tgt = f"{'≥' if r.get('sense') == 'ge' else '≤'} {r['target']:.2f}" if "target" in r else "–"
        met = ("yes" if r["met"] else "**NO**") if "met" in r else ""
        lines.append(f"| {r['name']} | {r['ratio_of_medians']:.3f} | {r['median_of_paired']:.3f} | {tgt} | {met} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True, check=False
            ).stdout
        )
    except OSError:
        commit, dirty = "", False
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchckpt": tc.__version__,
        "git_commit": commit,
        "src_dirty": dirty,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="tensor bytes of the state, GiB (default 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, interleaved (default 3)")
    p.add_argument("--dir", default="/work/bench-scratch", help="scratch directory (same disk as the checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not touch and free fresh memory before each timed operation (see prefault())",
    )
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/bench_sync-<time>.json)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    cold = cold_method()
    scratch = os.path.join(os.path.abspath(args.dir), f"bench_sync-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    try:
        print(
            f"torch.set_num_threads(1); cold reads via {cold}"
            f"{' (echo 3 > /proc/sys/vm/drop_caches, as root)' if cold == 'drop_caches' else ' (posix_fadvise DONTNEED)'}; "
            f"scratch {scratch}; prefault {'off' if args.no_prefault else 'on'}",
            flush=True,
        )
        env = environment()
        env_load = env["loadavg_start"]
        t0 = time.perf_counter()
        sd = make_state(int(args.size_gib * 2**30), seed=args.seed)
        dst = template_like(sd)
        nbytes = tensor_bytes(sd)
        print(f"state: {describe(sd)} (built in {time.perf_counter() - t0:.1f}s)", flush=True)
        warm_up(scratch, cold)

        bench = Bench(scratch, cold, nbytes, prefault=not args.no_prefault)
        orders = []
        foreign: list[float] = []
        meter = CpuMeter()
        for rep in range(args.reps):
            meter.start()
            k = rep % len(BLOCKS)
            order = BLOCKS[k:] + BLOCKS[:k]
            orders.append([name for name, _ in order])
            print(f"rep {rep + 1}/{args.reps}: {' -> '.join(orders[-1])}", flush=True)
            for _, block in order:
                block(bench, sd, dst, rep == 0)
                os.sync()
            foreign.append(meter.foreign_cores())
            line = ", ".join(f"{k}={v[-1]:.3f}" for k, v in bench.times.items() if v)
            print(f"  {line}", flush=True)
            print(
                f"  other processes kept {foreign[-1]:.2f} of {os.cpu_count()} cores busy during this rep", flush=True
            )

        summary = summarize(bench.times, bench.cpu, nbytes)
        rats = ratios(bench.times, summary)
        table = render(summary, rats)
        st = bench.native_stats
        for s in st:
            s["commit_and_rest_s"] = s["total_s"] - sum(s.get(k, 0.0) for k in ("plan_s", "write_s", "fsync_s"))
        breakdown = {
            k: statistics.median(s.get(k, 0.0) for s in st)
            for k in ("plan_s", "write_s", "fsync_s", "commit_and_rest_s", "total_s")
        }
        print()
        print(
            f"### torchckpt sync save/load, {nbytes / 2**30:.3f} GiB ({nbytes:,} tensor bytes), "
            f"{args.reps} reps interleaved, torch.set_num_threads(1), cold = {cold}, "
            f"prefault {'off' if args.no_prefault else 'on'}"
        )
        print()
        print(table)
        print()
        print(
            "native save breakdown (medians over reps, seconds, from the manifest's stats): "
            + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items())
        )
        print(
            "noise: other processes kept "
            + ", ".join(f"{x:.2f}" for x in foreign)
            + f" of {os.cpu_count()} cores busy during reps 1..{args.reps}; loadavg at start {env_load[0]:.2f}"
        )
        print(
            f"correctness (rep 1): {'all loads returned the saved bytes' if all(bench.checks.values()) else bench.checks}"
        )

        env["loadavg_end"] = os.getloadavg()
        env["scratch"] = scratch
        env["scratch_on_repo_device"] = os.stat(scratch).st_dev == os.stat(Path(__file__).resolve().parent).st_dev
        doc = {
            "benchmark": "bench_sync",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(),
            "argv": sys.argv,
            "args": vars(args),
            "environment": env,
            "cold_method": cold,
            "state": describe(sd),
            "tensor_bytes": nbytes,
            "tensor_count": len(tensors(sd)),
            "orders": orders,
            "foreign_cores_per_rep": foreign,
            "times_s": bench.times,
            "cpu_s": bench.cpu,
            "summary": summary,
            "ratios": rats,
            "native_save_stats": st,
            "native_save_breakdown_s": breakdown,
            "checks": bench.checks,
        }
        out = args.out or str(
            Path(__file__).resolve().parent / "results" / f"bench_sync-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        )
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"raw figures: {out}")
        return 0 if all(bench.checks.values()) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
