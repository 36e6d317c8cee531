"""Focused measurements behind the explanations of ``benchmarks/README.md`` (figures, not targets).

Each probe times two things interleaved, ``--pairs`` times, on the
transformer-like state of ``workload.py``, and prints both medians and the
median (min–max) of the per-round ratios::

    python benchmarks/probes.py read          # a load's verified reads vs one plain readinto (warm)
    python benchmarks/probes.py bookkeeping   # the fixed cost of a load: an 8 MiB state with the same 1,044 entries
    python benchmarks/probes.py stage         # DefaultStager.stage (two copy threads) vs a one-thread copy_ loop
    python benchmarks/probes.py hygiene       # copy_ right away vs after os.sync() + fresh memory (as saves are timed)
    python benchmarks/probes.py write --size-gib 4 --pairs 3   # sync native save vs pwritev + sync_file_range
    python benchmarks/probes.py pickle --pairs 3   # torch.save of many small tensors vs its pickle's least cost
    python benchmarks/probes.py pipeline --size-gib 0.5   # async save-to-durable, pipelined or not, vs the sync save
    python benchmarks/probes.py sharded-stall --ranks 2   # an FSDP2 async save's stall vs copy_ and the state's walk
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import malloc_trim, prefault, remove
from methods import raw_pwrite_sfr
from workload import make_state, template_like, tensors

import torchckpt as tc
from torchckpt.format.extent_read import read_extents
from torchckpt.format.extents import Extent
from torchckpt.format.manifest import parse_manifest
from torchckpt.format.native import byte_view, contiguous_bytes
from torchckpt.storage.local_read import LocalObjectReader

GIB = 2**30


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _compare(pairs: int, base: tuple[str, Callable[[], object]], *others: tuple[str, Callable[[], object]],
             before: Callable[[], None] = malloc_trim) -> None:  # fmt: skip
    """Time ``base`` and each of ``others`` in turn, ``pairs`` times; print medians and, for each other,
    the median (min–max) of its time over the base's time in the same round."""
    runs = [base, *others]
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(pairs):
        for (_, fn), ts in zip(runs, times):
            before()
            ts.append(_timed(fn))
    print("   ".join(f"{name}: median {statistics.median(ts):.4f} s" for (name, _), ts in zip(runs, times)))
    for (name, _), ts in zip(others, times[1:]):
        ratios = [y / x for x, y in zip(times[0], ts)]
        print(f"time {name} / {base[0]}: median {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
              f" over {pairs} interleaved rounds")  # fmt: skip


def _sync_checkpointer() -> tc.Checkpointer:
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors"))
    return tc.make_sync_checkpointer(config)


def probe_read(size: int, pairs: int, scratch: str) -> None:
    """The tensor bytes of a load (one verified extent per tensor, two threads) against one plain ``readinto``."""
    path = os.path.join(scratch, "read")
    state = make_state(size)
    with _sync_checkpointer() as ck:
        ck.save(path, state)
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        (entry,) = parse_manifest(f.read()).ranks
    file = os.path.join(path, entry.file)
    buffers = [torch.zeros(e.nbytes, dtype=torch.uint8) for e in entry.tensors]
    in_file_order = sorted(zip(entry.tensors, buffers), key=lambda eb: eb[0].offset)

    def plain() -> None:  # run.py's plain read: readinto every tensor's bytes in turn, no checks
        with open(file, "rb", buffering=0) as f:
            f.seek(entry.data_offset)
            for _, b in in_file_order:
                view, got = byte_view(b), 0
                while got < view.nbytes:
                    got += f.readinto(view[got:])

    def reads(threads: int, verify: bool) -> Callable[[], None]:
        def read() -> None:  # the loader's read of the bytes: through an ObjectReader, a handle per thread
            with LocalObjectReader(os.open(file, os.O_RDONLY | os.O_CLOEXEC), file) as src:
                extents = [Extent(e.offset, contiguous_bytes(b), list(e.crc32c) if verify else None)
                           for e, b in zip(entry.tensors, buffers)]  # fmt: skip
                read_extents(src, extents, threads=threads)

        return read

    ours = reads(2, True)

    plain()  # warm: the file is in the page cache
    print(f"{len(entry.tensors)} tensors, {entry.tensor_bytes / GIB:.2f} GiB, warm page cache")
    template = template_like(state)
    with _sync_checkpointer() as ck:
        # What the verified load is made of on one core (another process on the other one): the copy alone,
        # then the copy and the crc32c; and what the fresh load does instead (the file mapped, crc32c only).
        _compare(pairs, ("plain readinto", plain), ("read_extents (crc32c, 2 threads)", ours),
                 ("read_extents (1 thread, no crc32c)", reads(1, False)),
                 ("read_extents (crc32c, 1 thread)", reads(1, True)),
                 ("torchckpt load into preallocated", lambda: ck.load(path, template)),
                 ("torchckpt load, fresh (mapped)", lambda: ck.load(path)))  # fmt: skip


def probe_bookkeeping(pairs: int, scratch: str) -> None:
    """Load into preallocated tensors of a state whose bytes are negligible: what every load pays per entry."""
    path = os.path.join(scratch, "small")
    sd = make_state(8 * 2**20)
    dst = template_like(sd)
    with _sync_checkpointer() as ck:
        ck.save(path, sd)
        ck.load(path, dst)
        times = [_timed(lambda: ck.load(path, dst)) for _ in range(max(pairs, 20))]
    n = len(tensors(sd))
    t = statistics.median(times)
    print(f"load of {n} tensors ({sum(x.nbytes for x in tensors(sd)) / 2**20:.1f} MiB) into preallocated: "
          f"median {t * 1e3:.1f} ms over {len(times)} loads = {t / n * 1e6:.1f} µs per tensor")  # fmt: skip


def _copy_loop(sd: object) -> Callable[[], None]:
    """One-thread ``copy_`` of every tensor of ``sd`` into preallocated tensors of the same shapes."""
    src, dst = tensors(sd), tensors(template_like(sd))

    def copy() -> None:
        with torch.no_grad():
            for d, s in zip(dst, src):
                d.copy_(s)

    return copy


def probe_stage(size: int, pairs: int) -> None:
    """What an async save's stall is made of (flatten, copy on two threads, rebuild) against one-thread copies."""
    sd = make_state(size)
    copy = _copy_loop(sd)
    config = tc.CheckpointStagerConfig(use_async_staging=False)
    with tc.DefaultStager(config) as stager:
        stager.stage(sd)  # allocates the staging memory, as an async checkpointer's first save does
        _compare(pairs, ("copy_ loop (1 thread)", copy), ("DefaultStager.stage", lambda: stager.stage(sd)))


def probe_hygiene(size: int, pairs: int) -> None:
    """``copy_`` as ``run.py`` timed it before (right away) and as it times every save (after sync + fresh memory)."""
    sd = make_state(size)
    copy = _copy_loop(sd)
    def sync_and_fresh() -> None:
        os.sync()
        prefault(size + 64 * 2**20)
        malloc_trim()

    ta, tb = [], []
    for _ in range(pairs):
        malloc_trim()
        ta.append(_timed(copy))
        sync_and_fresh()
        tb.append(_timed(copy))
    print(f"copy_ right away: median {statistics.median(ta) * 1e3:.0f} ms ({min(ta) * 1e3:.0f}–{max(ta) * 1e3:.0f});"
          f" after os.sync() + fresh memory: median {statistics.median(tb) * 1e3:.0f} ms"
          f" ({min(tb) * 1e3:.0f}–{max(tb) * 1e3:.0f}); {pairs} interleaved pairs")  # fmt: skip


def probe_write(size: int, pairs: int, scratch: str) -> None:
    """A sync native save against the single-thread pwritev + sync_file_range + fsync path, same bytes."""
    sd = make_state(size)
    views = [byte_view(t) for t in tensors(sd)]
    raw = os.path.join(scratch, "raw.bin")
    ckpt = os.path.join(scratch, "ckpt")

    def before() -> None:
        remove(raw)
        remove(ckpt)
        os.sync()
        prefault(size + 64 * 2**20)
        malloc_trim()

    with _sync_checkpointer() as ck:
        _compare(pairs, ("pwritev + sync_file_range + fsync", lambda: raw_pwrite_sfr(raw, views)),
                 ("torchckpt sync save native", lambda: ck.save(ckpt, sd)), before=before)  # fmt: skip


def probe_pickle(pairs: int) -> None:
    """What bounds a writer of torch.save's format: ``torch.save`` of the many-small state (to memory) against
    the least a Python writer of the same pickle must do (a ``pickle.Pickler`` whose ``reducer_override`` turns
    each tensor into torch's ``_rebuild_tensor_v2`` call and whose ``persistent_id`` names its storage), no zip."""
    import io
    import pickle
    from collections import OrderedDict

    from torch._utils import _rebuild_tensor_v2
    from workload import make_many_small

    sd = make_many_small()
    names = torch.storage._dtype_to_storage_type_map()

    class Ref:
        __slots__ = ("pid",)

        def __init__(self, pid: tuple[object, ...]) -> None:
            self.pid = pid

    class Least(pickle.Pickler):
        def __init__(self, f: io.BytesIO) -> None:
            super().__init__(f, protocol=2)
            self.refs: dict[int, Ref] = {}

        def reducer_override(self, obj: object) -> object:
            if type(obj) is not torch.Tensor:
                return NotImplemented
            st = obj.untyped_storage()
            ref = self.refs.get(st.data_ptr())
            if ref is None:
                numel = st.nbytes() // obj.element_size()
                pid = ("storage", getattr(torch, names[obj.dtype]), str(len(self.refs)), "cpu", numel)
                ref = self.refs[st.data_ptr()] = Ref(pid)
            args = (ref, obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.requires_grad, OrderedDict())
            return (_rebuild_tensor_v2, args)

        def persistent_id(self, obj: object) -> object:  # called for every object pickled
            return obj.pid if type(obj) is Ref else None

    _compare(pairs, ("torch.save to memory", lambda: torch.save(sd, io.BytesIO())),
             ("pickle with the two hooks only", lambda: Least(io.BytesIO()).dump(sd)))  # fmt: skip


def probe_pipeline(size: int, pairs: int, scratch: str) -> None:
    """An async save to durable, pipelined (``pipeline.py``) and staged whole first, against the sync save.

    One warmed async checkpointer serves both; ``PIPELINE_MIN_BYTES`` switches
    pipelining off for the whole-first saves. Same hygiene before each: the
    previous checkpoint deleted, ``os.sync()``, fresh memory touched and freed.
    """
    from torchckpt import pipeline

    sd = make_state(size)
    ckpt = os.path.join(scratch, "ckpt")
    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format="safetensors"),
        staging_config=tc.CheckpointStagerConfig(pipelined_writes=True),
    )
    stalls: dict[str, list[float]] = {"pipelined": [], "whole first": []}

    def before() -> None:
        remove(ckpt)
        os.sync()
        prefault(size + 64 * 2**20)
        malloc_trim()

    def async_save(kind: str, minimum: int) -> Callable[[], None]:
        def run() -> None:
            pipeline.PIPELINE_MIN_BYTES = minimum
            t0 = time.perf_counter()
            stage, write = ack.save(ckpt, sd)
            stage.result()
            stalls[kind].append(time.perf_counter() - t0)
            write.result()

        return run

    default = pipeline.PIPELINE_MIN_BYTES
    with _sync_checkpointer() as sync, tc.make_async_checkpointer(config) as ack:
        ack.warmup(sd)
        for kind, minimum in (("pipelined", default), ("whole first", 2**62)):  # one save each before timing
            before()
            async_save(kind, minimum)()
        for ts in stalls.values():
            ts.clear()
        _compare(pairs, ("torchckpt sync save native", lambda: sync.save(ckpt, sd)),
                 ("async save to durable, pipelined", async_save("pipelined", default)),
                 ("async save to durable, staged whole first", async_save("whole first", 2**62)),
                 before=before)  # fmt: skip
    pipeline.PIPELINE_MIN_BYTES = default
    print("stall: " + "   ".join(f"{k}: median {statistics.median(v) * 1e3:.0f} ms" for k, v in stalls.items()))


def _sharded_stall_rank(rank: int, world: int, port: int, size: int, pairs: int, scratch: str, out: object) -> None:
    """One rank of ``probe_sharded_stall``: per round, every rank at once, a copy_, a walk and an async save."""
    from datetime import timedelta

    import methods
    import sharded_state
    import torch.distributed as dist

    from torchckpt.format.gcpause import paused_gc
    from torchckpt.format.tree import flatten

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    torch.set_num_threads(1)
    state = sharded_state.build(world, size)["state"]
    src = sharded_state.local_tensors(state)
    dst = [torch.empty_like(t) for t in src]
    ckpt = os.path.join(scratch, "ckpt")
    rows = []
    with tc.make_async_checkpointer(methods.tc_config("native")) as ack:
        for r in range(pairs + 1):  # the first save allocates the staging memory and starts the writer: untimed
            dist.barrier()
            copy = _timed(lambda: [d.copy_(x) for d, x in zip(dst, src)])
            dist.barrier()
            with paused_gc():  # as staging walks it
                walk = _timed(lambda: flatten(state, allow_pickle=True))
                dist.barrier()
                alone = _timed(lambda: flatten(state, allow_pickle=True)) if rank == 0 else 0.0  # the others wait
            dist.barrier()
            if rank == 0:
                remove(ckpt)
            os.sync()
            malloc_trim()
            dist.barrier()
            t0 = time.perf_counter()
            stage, write = ack.save(ckpt, state)
            stage.result()
            stall = time.perf_counter() - t0
            write.result()
            if r:
                rows.append((copy, walk, stall, alone))
    out.put((rank, rows))  # type: ignore[attr-defined]
    dist.destroy_process_group()


def probe_sharded_stall(size: int, pairs: int, scratch: str, world: int) -> None:
    """An FSDP2 state's async save on ``world`` gloo ranks: its stall against a ``copy_`` of the local shards
    and the walk of the state (``flatten``), each rank doing each at once with the others (as ``run.py --sharded``);
    also rank 0's walk while the others wait.

    Per round, the slowest rank's figure of each; ``size`` is the whole state's bytes (each rank holds 1/world).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_sharded_stall_rank, args=(r, world, port, size, pairs, scratch, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    rounds = [tuple(max(got[r][i][k] for r in got) for k in range(4)) for i in range(pairs)]
    copy, walk, stall, alone = (sorted(x[k] for x in rounds) for k in range(4))
    ratio = sorted(x[2] / x[0] for x in rounds)
    excess = sorted((x[2] - x[0] - x[1]) for x in rounds)
    print(f"{world} ranks, {size / GIB:.2f} GiB: copy_ median {statistics.median(copy) * 1e3:.0f} ms, walk (flatten) "
          f"{statistics.median(walk) * 1e3:.0f} ms (rank 0 alone: {statistics.median(alone) * 1e3:.0f} ms), stall {statistics.median(stall) * 1e3:.0f} ms; stall / copy_ median "
          f"{statistics.median(ratio):.2f} ({ratio[0]:.2f}–{ratio[-1]:.2f}); stall - copy_ - walk median "
          f"{statistics.median(excess) * 1e3:.0f} ms, over {pairs} rounds")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "probe", choices=["read", "bookkeeping", "stage", "hygiene", "write", "pickle", "pipeline", "sharded-stall"]
    )
    p.add_argument("--ranks", type=int, default=2, help="sharded-stall: gloo ranks (default 2)")
    p.add_argument("--size-gib", type=float, default=1.0, help="tensor bytes of the state, GiB (default 1)")
    p.add_argument("--pairs", type=int, default=9, help="interleaved rounds (default 9)")
    p.add_argument("--dir", default="/work/bench-scratch", help="scratch directory on the disk to measure")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    size = int(args.size_gib * GIB)
    scratch = os.path.join(os.path.abspath(args.dir), f"probe-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    try:
        if args.probe == "read":
            probe_read(size, args.pairs, scratch)
        elif args.probe == "bookkeeping":
            probe_bookkeeping(args.pairs, scratch)
        elif args.probe == "stage":
            probe_stage(size, args.pairs)
        elif args.probe == "hygiene":
            probe_hygiene(size, args.pairs)
        elif args.probe == "pickle":
            probe_pickle(args.pairs)
        elif args.probe == "pipeline":
            probe_pipeline(size, args.pairs, scratch)
        elif args.probe == "sharded-stall":
            probe_sharded_stall(size, args.pairs, scratch, args.ranks)
        else:
            probe_write(size, args.pairs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
