"""Many ranks saving together: total throughput against the disk's raw write bandwidth.

N gloo ranks (processes on this machine) each save 1/N of the state with the
native format into one checkpoint (sync saves: data, barrier, one commit).
The figure is the total tensor bytes over the wall time of the collective
save (the slowest rank), compared in the same run with one process writing
the same total bytes with plain buffered writes + fsync.

Usage: ``python benchmarks/bench_ranks.py [--size-gib 1] [--ranks 2,4] [--reps 3] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

import torchckpt as tc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, nbytes: int, root: str, reps: int, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sd = workload.make_state(nbytes // world, seed=rank)
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors"))
    ckpt = tc.make_sync_checkpointer(config)
    times = []
    for rep in range(reps + 1):
        path = os.path.join(root, f"ranks{world}-{rep}")
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.save(path, sd)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    if rank == 0:
        results.put((workload.tensor_bytes(sd) * world, times[1:]))
    dist.destroy_process_group()


def raw_write(path: str, sd: Any) -> float:
    views = [memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()) for t in workload.tensors(sd)]
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for v in views:
            f.write(v)
        f.flush()
        os.fsync(f.fileno())
    t = time.perf_counter() - t0
    os.unlink(path)
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/torchckpt-bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    nbytes = int(args.size_gib * 2**30)
    root = os.path.join(args.dir, f"bench_ranks-{os.getpid()}")
    os.makedirs(root, exist_ok=True)
    sd = workload.make_state(nbytes)
    raw = []
    rows = []
    ctx = mp.get_context("spawn")
    for world in [int(x) for x in args.ranks.split(",")]:
        raw.append(raw_write(os.path.join(root, "raw.bin"), sd))
        results = ctx.Queue()
        mp.start_processes(
            _rank_main, args=(world, _free_port(), nbytes, root, args.reps, results), nprocs=world,
            join=True, start_method="spawn",
        )  # fmt: skip
        total, times = results.get(timeout=60)
        raw.append(raw_write(os.path.join(root, "raw.bin"), sd))
        rows.append((world, total, times))
    shutil.rmtree(root, ignore_errors=True)
    raw_s = statistics.median(raw)
    raw_gbs = workload.tensor_bytes(sd) / raw_s / 1e9
    print(f"raw write + fsync of {workload.tensor_bytes(sd) / 2**30:.2f} GiB, one process: median {raw_s:.3f}s "
          f"({raw_gbs:.2f} GB/s) over {len(raw)} runs interleaved with the rank runs; torch threads 1 per process")
    print()
    print("| ranks | total GiB | collective save s, median (min–max) | GB/s total | / raw write |")
    print("|---|---|---|---|---|")
    for world, total, times in rows:
        med = statistics.median(times)
        gbs = total / med / 1e9
        print(f"| {world} | {total / 2**30:.2f} | {med:.3f} ({min(times):.3f}–{max(times):.3f}) | {gbs:.2f} | {gbs / raw_gbs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
