"""Object storage: a state to and from a loopback S3 server, torchckpt against the client's limit and DCP (``run.py --object-store``).

One run starts moto's S3 server on 127.0.0.1 (``tests/s3_testutil.py``),
builds a transformer-like state of ``--size-gib`` (``workload.make_state``)
and, per repetition, runs every method once in an order rotated from one
repetition to the next; every ratio comes from figures of this run:

- limits (the same bytes, the client's own best parallel transfer): the
  state's tensor bytes as one buffer, ``obstore.put`` (multipart, 32 MiB parts,
  8 at once), the same bytes as 32 MiB objects put 8 at once, and
  ``obstore.get_ranges`` (16 MiB ranges, 10 at once); s3fs's ``pipe`` /
  ``cat`` of the same buffer (its own multipart and ranged reads); the limit
  is the fastest of them;
- torchckpt: sync save (native layout, and torch_save), load of the native
  checkpoint into a preallocated template and fresh;
- torch DCP with its fsspec writer and reader (``FsspecWriter`` /
  ``FsspecReader``, s3fs), ``thread_count`` 1 (its default) and 8;
- the tiered save (``CheckpointManager(local, remote=url)``, when it has one):
  its stall against the plain local save's.

Between repetitions every object a method wrote is deleted (untimed), and
``os.sync()`` runs before each method. The server runs on the same 2 cores as
the client, so the limit here is the server's speed as much as the network's:
what matters are the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import workload  # noqa: E402
from s3_testutil import MotoServer, s3_env  # noqa: E402

GIB = 2**30


def _flat_bytes(state: Any) -> torch.Tensor:
    """Every tensor byte of the state, back to back, as one uint8 tensor (the limit's payload)."""
    parts = [t.detach().contiguous().view(-1).view(torch.uint8) for t in workload.tensors(state)]
    return torch.cat(parts)


class Methods:
    """Each method: a callable timed alone; ``cleanup`` undoes what it wrote (untimed)."""

    def __init__(self, bucket: str, state: Any, scratch: str) -> None:
        import obstore

        from torchckpt.storage.object_client import parse_object_url, store_for

        self.obstore = obstore
        self.bucket = bucket
        self.state = state
        self.scratch = scratch
        self.payload = _flat_bytes(state)
        self.store = store_for(parse_object_url(f"s3://{bucket}"))
        self.template = workload.template_like(state)
        self.native_url = f"s3://{bucket}/tc-native-load"
        import torchckpt as tc

        self.tc = tc
        self.ck_native = tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors", io_threads=4))
        )
        self.ck_torch = tc.make_sync_checkpointer()
        self.ck_native.save(self.native_url, state)  # what the loads read (untimed)
        self.s3fs = _s3fs()

    # -- limits
    def limit_put(self) -> None:
        self.obstore.put(self.store, "limit/obj", memoryview(self.payload.numpy()), chunk_size=32 << 20, max_concurrency=8)

    def limit_put_objects(self) -> None:
        """The same bytes as 32 MiB objects, eight PUTs at once (the fastest put of these bytes here)."""
        buf = memoryview(self.payload.numpy())
        step = 32 << 20
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(
                lambda s: self.obstore.put(self.store, f"limit-objects/{s}", buf[s : s + step], use_multipart=False),
                range(0, buf.nbytes, step),
            ))  # fmt: skip

    def limit_get(self) -> None:
        n = self.payload.numel()
        step = 16 << 20
        starts = list(range(0, n, step))
        got = self.obstore.get_ranges(self.store, "limit/obj", starts=starts, lengths=[min(step, n - s) for s in starts])
        out = self.payload.numpy()
        for s, part in zip(starts, got):
            mv = memoryview(part)
            out[s : s + mv.nbytes] = memoryview(mv)  # into preallocated memory, as a load does

    def s3fs_put(self) -> None:
        self.s3fs.pipe_file(f"{self.bucket}/s3fs/obj", self.payload.numpy().tobytes())

    def s3fs_get(self) -> None:
        self.s3fs.cat_file(f"{self.bucket}/s3fs/obj")

    # -- torchckpt
    def tc_save_native(self) -> None:
        self.ck_native.save(f"s3://{self.bucket}/tc-native", self.state)

    def tc_save_torch_save(self) -> None:
        self.ck_torch.save(f"s3://{self.bucket}/tc-torch", self.state)

    def tc_load_native_into(self) -> None:
        self.ck_native.load(self.native_url, self.template)

    def tc_load_native_fresh(self) -> None:
        self.ck_native.load(self.native_url)

    # -- DCP
    def _dcp_save(self, threads: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dcp.save(self.state, storage_writer=FsspecWriter(f"s3://{self.bucket}/dcp-{threads}", thread_count=threads))

    def dcp_save_t1(self) -> None:
        self._dcp_save(1)

    def dcp_save_t8(self) -> None:
        self._dcp_save(8)

    def dcp_load_t8(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        dcp.load(self.template, storage_reader=FsspecReader(f"s3://{self.bucket}/dcp-8"))

    def cleanup(self, name: str) -> None:
        keep = {"tc_load_native_into", "tc_load_native_fresh", "limit_get", "s3fs_get", "dcp_load_t8"}
        if name in keep:
            return
        prefix = {
            "limit_put": "limit/", "limit_put_objects": "limit-objects/", "s3fs_put": "s3fs/",
            "tc_save_native": "tc-native/", "tc_save_torch_save": "tc-torch/", "dcp_save_t1": "dcp-1/",
            "dcp_save_t8": "dcp-8/",
        }[name]  # fmt: skip
        paths = [m["path"] for b in self.obstore.list(self.store, prefix) for m in b]
        if paths:
            self.obstore.delete(self.store, paths)


def _s3fs() -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
        skip_instance_cache=True,
    )  # fmt: skip


#: (name, depends on) in run order; a "get" reads what its "put" wrote in the same repetition.
ORDER = [
    ("limit_put", None), ("limit_get", "limit_put"), ("limit_put_objects", None), ("s3fs_put", None), ("s3fs_get", "s3fs_put"),
    ("tc_save_native", None), ("tc_save_torch_save", None), ("tc_load_native_into", None),
    ("tc_load_native_fresh", None), ("dcp_save_t1", None), ("dcp_save_t8", None), ("dcp_load_t8", "dcp_save_t8"),
]  # fmt: skip


def _rotated(rep: int) -> list[str]:
    """The methods' order in repetition ``rep``: pairs (put, then its get) kept together, the list rotated."""
    units: list[list[str]] = []
    for name, dep in ORDER:
        if dep is None:
            units.append([name])
        else:
            next(u for u in units if dep in u).append(name)
    k = rep % len(units)
    return [n for u in units[k:] + units[:k] for n in u]


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every method ``args.reps`` times; returns the seconds of each."""
    times: dict[str, list[float]] = {n: [] for n, _ in ORDER}
    with MotoServer() as server:
        os.environ.update(s3_env(server.endpoint))
        bucket = server.bucket("bench-object-store")
        state = workload.make_state(int(args.size_gib * GIB), seed=args.seed)
        scratch = tempfile.mkdtemp(prefix="objbench-")
        try:
            m = Methods(bucket, state, scratch)
            if args.tier:
                times.update(_tier(m, args, scratch))
            for rep in range(args.reps):
                for name in _rotated(rep):
                    if args.only and name not in args.only.split(","):
                        continue
                    os.sync()
                    t0 = time.perf_counter()
                    getattr(m, name)()
                    times[name].append(time.perf_counter() - t0)
                    print(f"rep {rep} {name}: {times[name][-1]:.3f}s", flush=True)
                for name in _rotated(rep):
                    m.cleanup(name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return times


def _tier(m: Methods, args: argparse.Namespace, scratch: str) -> dict[str, list[float]]:
    """The tiered save's stall against the local save's: CheckpointManager(local, remote=url) vs without.

    Both managers save in the background (the default) and are kept for the
    whole run; each first saves once untimed (the writer process starts), then
    once per repetition, timed until ``save`` returns (the stall), and waited
    for untimed (the write, and for the tiered one its upload too).
    """
    tc = m.tc
    out: dict[str, list[float]] = {"tier_local_save": [], "tier_tiered_save": []}
    managers = {
        "tier_local_save": tc.CheckpointManager(os.path.join(scratch, "local-only")),
        "tier_tiered_save": tc.CheckpointManager(os.path.join(scratch, "tiered"), remote=f"s3://{m.bucket}/tier"),
    }
    try:
        for mgr in managers.values():
            mgr.save(0, m.state)
            mgr.wait()
            mgr.wait_for_uploads(timeout_s=900)
        for rep in range(args.reps):
            order = sorted(managers) if rep % 2 == 0 else sorted(managers, reverse=True)
            for kind in order:
                mgr = managers[kind]
                os.sync()
                t0 = time.perf_counter()
                mgr.save(rep + 1, m.state)
                out[kind].append(time.perf_counter() - t0)
                print(f"rep {rep} {kind} (stall): {out[kind][-1]:.3f}s", flush=True)
                mgr.wait()
                mgr.wait_for_uploads(timeout_s=900)
    finally:
        for mgr in managers.values():
            mgr.close()
    return out


def table(times: dict[str, list[float]], nbytes: int) -> str:
    """The results as a Markdown table: median seconds, GiB/s, and the ratios against the limit and DCP."""
    med = {k: statistics.median(v) for k, v in times.items() if v}
    lines = ["| method | median s (min-max) | GiB/s | ÷ limit | × DCP (t8) |", "|---|---:|---:|---:|---:|"]
    put_limit = min(v for k, v in med.items() if k in ("limit_put", "limit_put_objects", "s3fs_put"))
    get_limit = min(v for k, v in med.items() if k in ("limit_get", "s3fs_get"))
    for k, v in med.items():
        is_load = "load" in k or k.endswith("_get")
        limit = get_limit if is_load else put_limit
        dcp = med.get("dcp_load_t8" if is_load else "dcp_save_t8")
        vs_dcp = f"{dcp / v:.2f}" if dcp and k.startswith("tc_") else ""
        vs_limit = f"{limit / v:.2f}" if not k.startswith("tier") else ""
        lo, hi = min(times[k]), max(times[k])
        lines.append(f"| {k} | {v:.3f} ({lo:.3f}-{hi:.3f}) | {nbytes / GIB / v:.2f} | {vs_limit} | {vs_dcp} |")
    if "tier_local_save" in med and "tier_tiered_save" in med:
        lines.append(f"\ntiered save stall ÷ local save: {med['tier_tiered_save'] / med['tier_local_save']:.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``run.py --object-store``: run, print the table, write it under ``--out-dir``."""
    torch.set_num_threads(1)
    times = run(args)
    nbytes = int(args.size_gib * GIB)
    text = table(times, nbytes)
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(args.out_dir, f"{stamp}-object-store.md").write_text(text + "\n")
    return 0
