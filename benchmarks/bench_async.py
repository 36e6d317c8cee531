"""Asynchronous saves: how long training stalls, and how soon the checkpoint is durable.

Measured in one process run, interleaved and repeated, on the realistic state
of ``workload.py`` (second and later saves: staging buffers and writer
processes already exist):

- limits: ``copy_`` of every tensor into preallocated memory (the stall floor)
  and a plain buffered write + fsync of the same bytes;
- torchckpt ``make_async_checkpointer`` (native and torch_save formats);
- torch DCP ``async_save`` (thread and process executors);
- the reference ``torch.distributed.checkpoint._experimental`` async
  checkpointer, CPU configuration (no pinned memory, no non-blocking copies).

Stall: from the call to ``save`` until the training thread may change its
tensors again (stage future done; for DCP: ``async_save`` returned). Durable:
until the checkpoint is committed (write future done). The reference writer
does not fsync; DCP's ``FileSystemWriter`` fsyncs its files.

Usage: ``python benchmarks/bench_async.py [--size-gib 1] [--reps 3] [--dir DIR] [--skip dcp_process,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

import torchckpt as tc  # noqa: E402


def _views(sd: Any) -> list[torch.Tensor]:
    return [t for t in workload.tensors(sd)]


class Method:
    """One way to save: ``save(path) -> (stage_done_s, durable_s)`` measured from the call."""

    name = ""

    def setup(self, sd: Any, scratch: str) -> None: ...

    def save(self, path: str) -> tuple[float, float]:
        raise NotImplementedError

    def close(self) -> None: ...


class CopyLimit(Method):
    name = "copy_ (stall floor)"

    def setup(self, sd: Any, scratch: str) -> None:
        self.src = _views(sd)
        self.dst = [torch.empty_like(t) for t in self.src]
        for d in self.dst:
            d.zero_()

    def save(self, path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        for d, s in zip(self.dst, self.src):
            d.copy_(s)
        t = time.perf_counter() - t0
        return t, t


class WriteLimit(Method):
    name = "write + fsync (disk floor)"

    def setup(self, sd: Any, scratch: str) -> None:
        self.src = [memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()) for t in _views(sd)]

    def save(self, path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for v in self.src:
                f.write(v)
            f.flush()
            os.fsync(f.fileno())
        t = time.perf_counter() - t0
        return t, t


class _Checkpointer(Method):
    """A checkpointer with the reference API: save -> (stage_future, write_future)."""

    ckpt: Any
    sd: Any

    def save(self, path: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        stage, write = self.ckpt.save(path, self.sd)
        stage.result()
        t1 = time.perf_counter() - t0
        write.result()
        return t1, time.perf_counter() - t0

    def close(self) -> None:
        self.ckpt.close()


class Torchckpt(_Checkpointer):
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.name = f"torchckpt async ({fmt})"

    def setup(self, sd: Any, scratch: str) -> None:
        self.sd = sd
        config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=self.fmt))
        self.ckpt = tc.make_async_checkpointer(config)


class Reference(_Checkpointer):
    name = "reference _experimental async (CPU config)"

    def setup(self, sd: Any, scratch: str) -> None:
        from torch.distributed.checkpoint import _experimental as ref

        self.sd = sd
        config = ref.CheckpointerConfig()
        config.staging_config = ref.CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
        self.ckpt = ref.make_async_checkpointer(config)


class DCP(Method):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"torch DCP async_save ({kind})"

    def setup(self, sd: Any, scratch: str) -> None:
        import torch.distributed as dist

        self.sd = sd
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        self.future: Any = None

    def save(self, path: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if self.kind == "process" else AsyncCheckpointerType.THREAD
        t0 = time.perf_counter()
        result = dcp.async_save(self.sd, checkpoint_id=path, async_checkpointer_type=kind)
        t1 = time.perf_counter() - t0
        future = getattr(result, "upload_completion", result)
        future.result()
        return t1, time.perf_counter() - t0


METHODS: dict[str, Callable[[], Method]] = {
    "copy": CopyLimit,
    "write": WriteLimit,
    "torchckpt_native": lambda: Torchckpt("safetensors"),
    "torchckpt_torch_save": lambda: Torchckpt("torch_save"),
    "reference": Reference,
    "dcp_thread": lambda: DCP("thread"),
    "dcp_process": lambda: DCP("process"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3, help="measured saves per method (after one warm-up save)")
    parser.add_argument("--dir", default="/tmp/torchckpt-bench")
    parser.add_argument("--skip", default="", help="comma-separated method keys to leave out")
    parser.add_argument("--out", default=None, help="JSON file for the raw figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # see shared/BASELINES.md: busy cores make torch's intra-op threads slow
    scratch = os.path.join(args.dir, f"bench_async-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    sd = workload.make_state(int(args.size_gib * 2**30))
    nbytes = workload.tensor_bytes(sd)
    print(f"state: {workload.describe(sd)}; torch threads: 1; scratch: {scratch}", flush=True)
    skip = {s for s in args.skip.split(",") if s}
    methods = {k: f() for k, f in METHODS.items() if k not in skip}
    for m in methods.values():
        m.setup(sd, scratch)
    stalls: dict[str, list[float]] = {k: [] for k in methods}
    durable: dict[str, list[float]] = {k: [] for k in methods}
    try:
        for rep in range(args.reps + 1):  # rep 0 warms up: buffers, processes, page cache
            order = list(methods)[rep % len(methods) :] + list(methods)[: rep % len(methods)]
            for key in order:
                path = os.path.join(scratch, f"{key}-{rep}")  # a fresh path: what a step-numbered save does
                s, d = methods[key].save(path)
                # removed outside the timed region (deleting 1 GiB with discard costs the disk ~0.2-0.5 s)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.exists(path):
                    os.unlink(path)
                os.sync()  # the next method starts on an idle disk
                if rep:
                    stalls[key].append(s)
                    durable[key].append(d)
                print(f"rep {rep} {key}: stall {s:.3f}s durable {d:.3f}s", flush=True)
    finally:
        for m in methods.values():
            m.close()
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: (statistics.median(stalls[k]), statistics.median(durable[k])) for k in methods}
    lines = [
        f"state {nbytes / 2**30:.2f} GiB, {len(workload.tensors(sd))} tensors; medians of {args.reps} saves after a warm-up",
        "",
        "| method | stall s (min–max) | durable s (min–max) | stall / copy_ | durable / (copy_ + write) |",
        "|---|---|---|---|---|",
    ]
    copy_s = med.get("copy", (math_nan(), 0))[0]
    write_s = med.get("write", (0, math_nan()))[1]
    for k, m in methods.items():
        s, d = med[k]
        lines.append(
            f"| {m.name} | {s:.3f} ({min(stalls[k]):.3f}–{max(stalls[k]):.3f}) | {d:.3f} "
            f"({min(durable[k]):.3f}–{max(durable[k]):.3f}) | {s / copy_s:.2f} | {d / (copy_s + write_s):.2f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"bench_async-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"bytes": nbytes, "stall_s": stalls, "durable_s": durable, "table": table}, f, indent=1)
    print(f"\nraw figures: {out}")
    return 0


def math_nan() -> float:
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
