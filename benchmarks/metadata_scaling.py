"""How checkpoint metadata work grows with the number of ranks: torchckpt's commit and load planning, DCP's planner.

For 8, 64, 512 and 4,096 simulated ranks x 1,000 tensors sharded FSDP2-like
(``Shard(0)`` over a 1-D mesh; uneven and empty shards among them), in one
process per point (a child process, killed at ``--time-limit``), measures:

torchckpt, what the coordinator does at commit and what a rank does at load:

- *rank reports read*: every rank's report as the coordinator reads it
  (``reports.read_reports``: its manifest line, its table digest, the chunks
  it lists; writing the reports and index objects is each rank's work, untimed);
- *global table*: the index object of one rank per distinct table read back,
  the table built and checked (``build_table`` + ``parse_table``);
- *manifest build*: ``build_manifest`` (the bytes written at commit);
- commit = the three above;
- *manifest parse*: ``parse_manifest`` of those bytes (what every rank's load does first);
- *per-rank load plan*: ``ShardedLoads.tensor`` for each of the 1,000 tensors
  with a ``DTensor`` template of one rank (the middle one; the same layout),
  the index objects of the ranks it reads from parsed on the way,
  on a fake process group of that many ranks (meta tensors: nothing is
  allocated or read): the reads that rank would issue.

torch DCP, on the same layout (``WriteItem``s as ``_create_write_items_for_dtensor`` makes them):

- *global save plan*: ``DefaultSavePlanner().create_global_plan`` of every
  rank's local plan (dedup, ``create_default_global_save_plan``,
  ``_validate_global_plan``), and the validation alone;
- *per-rank load plan*: ``create_default_local_load_plan`` for the same rank's
  ``DTensor`` template against the metadata.

A point that does not finish within ``--time-limit`` seconds is reported as
such, and the larger points of that system are skipped; so is a point whose
memory, extrapolated linearly from the previous one, would not fit in the
memory available.

Usage::

    python benchmarks/metadata_scaling.py                  # 8, 64, 512, 4096 ranks x 1000 tensors
    python benchmarks/metadata_scaling.py --ranks 8,64 --tensors 100 --time-limit 60
    python benchmarks/run.py --metadata-scaling            # the same, from the benchmark entry point
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: Global shapes cycled over the tensors (bf16): square and MLP-like matrices, a vector, a narrow matrix.
SHAPES = ((4096, 4096), (11008, 4096), (4096,), (1000, 4096))
#: Columns of the table: (key, label).
COLUMNS = (
    ("tc_entries_s", "torchckpt: rank reports read"),
    ("tc_index_s", "torchckpt: global table (build + check)"),
    ("tc_build_s", "torchckpt: manifest build"),
    ("tc_commit_s", "torchckpt: commit total"),
    ("tc_parse_s", "torchckpt: manifest parse"),
    ("tc_plan_s", "torchckpt: per-rank load plan"),
    ("dcp_global_s", "DCP: global save plan (incl. validation)"),
    ("dcp_validate_s", "DCP: _validate_global_plan alone"),
    ("dcp_load_plan_s", "DCP: per-rank load plan"),
)


def shard(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(offset, size)`` of ``rank``'s rows under ``Shard(0)`` (torch's chunking: ceil-sized, trailing empties)."""
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, max(0, min(rows, start + per) - start)


def tensor_shape(i: int) -> tuple[int, ...]:
    return SHAPES[i % len(SHAPES)]


# --------------------------------------------------------------------------- torchckpt


def rank_entry(rank: int, world: int, n_tensors: int, mesh_ranks: tuple[int, ...]) -> Any:
    """The whole entry of rank ``rank`` for its ``Shard(0)`` parts of ``n_tensors`` bf16 tensors (as its save makes it)."""
    from torchckpt.format.extents import CHUNK_BYTES
    from torchckpt.format.manifest import RankEntry, TensorEntry
    from torchckpt.format.shards import ChunkEntry, Grid, ShardedEntry

    grid = Grid((world,), mesh_ranks, (("S", 0),), 0)
    tensors, sharded, tree = [], [], {}
    offset = data_offset = 64
    for i in range(n_tensors):
        shape = tensor_shape(i)
        name = f"model.layers.{i}.weight"
        start, size = shard(shape[0], world, rank)
        chunks: tuple[ChunkEntry, ...] = ()
        if size:
            local = (size, *shape[1:])
            nbytes = 2 * size * (shape[1] if len(shape) > 1 else 1)
            crcs = tuple(range(max(1, -(-nbytes // CHUNK_BYTES))))
            tensors.append(TensorEntry(name, "bfloat16", local, offset, nbytes, crcs))
            chunks = (ChunkEntry(len(tensors) - 1, (start,) + (0,) * (len(shape) - 1)),)
            offset += nbytes
        sharded.append(ShardedEntry(name, "bfloat16", shape, chunks, grid))
        tree[f"layers.{i}.weight"] = {"DT": i}
    return RankEntry(rank, f"rank_{rank:05d}.safetensors", offset, "crc32c:00000000", {"model": tree},
                     tuple(tensors), data_offset, tuple(sharded))  # fmt: skip


class MemorySession:
    """A save session in memory (``put``/``get``/``delete``): where the ranks' reports and indexes go."""

    location = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> None:
        self.objects[name] = data

    def get(self, name: str) -> bytes:
        return self.objects[name]

    def delete(self, name: str) -> None:
        self.objects.pop(name, None)


def fake_group(world: int) -> Any:
    """A fake process group of ``world`` ranks (this process is the middle one) and its 1-D CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=world // 2, world_size=world)
    return init_device_mesh("cpu", (world,))


def templates(mesh: Any, n_tensors: int) -> dict[str, Any]:
    """The middle rank's ``DTensor`` template of every tensor (meta local shards)."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    world, rank = mesh.size(), mesh.get_coordinate()[0]
    for i in range(n_tensors):
        shape = tensor_shape(i)
        _, size = shard(shape[0], world, rank)
        local = torch.empty((size, *shape[1:]), dtype=torch.bfloat16, device="meta")
        stride = (shape[1], 1) if len(shape) > 1 else (1,)
        out[f"model.layers.{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], shape=torch.Size(shape), stride=stride, run_check=False
        )
    return out


def point_tc(world: int, n_tensors: int, emit: Callable[[dict[str, Any]], None] = lambda d: None) -> dict[str, Any]:
    """torchckpt's commit work, manifest parse and one rank's load plan, for ``world`` ranks.

    ``emit`` gets the figures so far after each step (a point cut off by its time limit still says those).
    """
    import torch
    from torchckpt.format.extents import CHUNK_BYTES
    from torchckpt.format.gcpause import paused_gc
    from torchckpt.format.manifest import build_manifest, parse_manifest, parse_rank_index
    from torchckpt.format.sharded_read import ShardedLoads
    from torchckpt.format.table import build_table, parse_table
    from torchckpt.reports import read_reports, representative_tables, write_report

    session = MemorySession()
    mesh_ranks = tuple(range(world))
    for r in range(world):  # each rank's own work (its index and report), untimed
        write_report(session, rank_entry(r, world, n_tensors, mesh_ranks))  # type: ignore[arg-type]
    index_bytes = sum(len(v) for k, v in session.objects.items() if k.endswith(".index.json"))
    t0 = time.perf_counter()
    reports = read_reports(session, world, "bench")  # type: ignore[arg-type]
    t1 = time.perf_counter()
    table = build_table(representative_tables(session, reports, world, "bench", None),  # type: ignore[arg-type]
                        {r.entry.rank: r.listed for r in reports})  # fmt: skip
    parse_table(table, world)
    t2 = time.perf_counter()
    data = build_manifest(layout="safetensors", ranks=[r.entry for r in reports], chunk_bytes=CHUNK_BYTES, table=table)
    t3 = time.perf_counter()
    del reports
    out: dict[str, Any] = {"tc_entries_s": t1 - t0, "tc_index_s": t2 - t1, "tc_build_s": t3 - t2,
                           "tc_commit_s": t3 - t0, "manifest_bytes": len(data), "index_bytes": index_bytes}  # fmt: skip
    emit(out)
    t0 = time.perf_counter()
    manifest = parse_manifest(data)
    out["tc_parse_s"] = time.perf_counter() - t0
    emit(out)
    del data
    targets = templates(fake_group(world), n_tensors)
    entries: dict[int, Any] = {}

    def entry_of(rank: int) -> Any:  # the rank's index object, read once (as CheckpointSnapshot.rank_entry does)
        if rank not in entries:
            stub = manifest.ranks[rank]
            entries[rank] = parse_rank_index(session.get(stub.index.file), stub, CHUNK_BYTES, world)
        return entries[rank]

    loads = ShardedLoads(manifest, lambda e: None, entry_of=entry_of, map_location=None,  # type: ignore[arg-type, return-value]
                         resolve_device=lambda d, m: torch.device("cpu"), where="bench")  # fmt: skip
    t0 = time.perf_counter()
    with paused_gc():  # as in a load: read_native plans with the collector paused
        for key, target in targets.items():
            loads.tensor(manifest.sharded[key], target, key)
    out["tc_plan_s"] = time.perf_counter() - t0
    out["tc_plan_reads"] = len(loads.reads)
    out["tc_plan_indexes"] = len(entries)
    return out


# --------------------------------------------------------------------------- DCP


def dcp_plans(world: int, n_tensors: int) -> list[Any]:
    """Every rank's local save plan: one ``WriteItem`` per tensor, as DCP makes it for a ``DTensor``."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    props = TensorProperties(dtype=torch.bfloat16)
    mapping = {f"model.layers.{i}.weight": ("model", f"layers.{i}.weight") for i in range(n_tensors)}
    plans = []
    for r in range(world):
        items = []
        for i in range(n_tensors):
            shape = tensor_shape(i)
            start, size = shard(shape[0], world, r)
            offsets = torch.Size((start,) + (0,) * (len(shape) - 1))
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size((size, *shape[1:])))
            items.append(WriteItem(index=MetadataIndex(f"model.layers.{i}.weight", offsets), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=props, size=torch.Size(shape))))  # fmt: skip
        plans.append(SavePlan(items, planner_data=mapping))
    return plans


def point_dcp(world: int, n_tensors: int) -> dict[str, float]:
    """DCP's global save planning (and its validation alone) and one rank's load plan, for ``world`` ranks."""
    from torch.distributed.checkpoint.default_planner import (
        DefaultSavePlanner,
        _validate_global_plan,
        create_default_local_load_plan,
    )

    plans = dcp_plans(world, n_tensors)
    t0 = time.perf_counter()
    global_plan, metadata = DefaultSavePlanner().create_global_plan(plans)
    t1 = time.perf_counter()
    errors = _validate_global_plan(global_plan, metadata)
    t2 = time.perf_counter()
    if errors:
        raise RuntimeError(f"DCP found the layout invalid: {errors[:3]}")
    del plans, global_plan
    targets = templates(fake_group(world), n_tensors)
    t3 = time.perf_counter()
    plan = create_default_local_load_plan(targets, metadata)
    t4 = time.perf_counter()
    return {"dcp_global_s": t1 - t0, "dcp_validate_s": t2 - t1, "dcp_load_plan_s": t4 - t3,
            "dcp_load_reads": len(plan.items)}  # fmt: skip


# --------------------------------------------------------------------------- points in child processes, the table


BASE_RSS = 300 * 2**20  # an interpreter with torch imported, roughly: what does not grow with the ranks


def child(system: str, world: int, n_tensors: int) -> int:
    """Run one point in this process and print its figures as one JSON line."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    figs = point_tc(world, n_tensors, lambda d: print(json.dumps(d), flush=True)) if system == "tc" else (
        point_dcp(world, n_tensors))  # fmt: skip
    figs["wall_s"] = time.perf_counter() - t0
    figs["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(figs), flush=True)
    return 0


def run_point(system: str, world: int, n_tensors: int, limit_s: float) -> dict[str, Any]:
    """One point in a child process under ``limit_s``: its figures, or ``{"error": why}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, str(world), str(n_tensors)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired as e:
        partial = _last_json(e.stdout)  # the steps it finished
        return {**partial, "error": f"did not finish within {limit_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed (exit {proc.returncode}): {tail}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _last_json(out: str | bytes | None) -> dict[str, Any]:
    """The last JSON line of a child's output (empty when there is none)."""
    text = out.decode() if isinstance(out, bytes) else (out or "")
    lines = [x for x in text.strip().splitlines() if x.startswith("{")]
    return dict(json.loads(lines[-1])) if lines else {}


def _too_big(prev: tuple[int, dict[str, Any]] | None, world: int) -> str | None:
    """Why ``world`` ranks would not fit in memory, extrapolated linearly from the previous point (None: fits)."""
    from harness import mem_available

    if prev is None or "peak_rss" not in prev[1]:
        return None
    need = BASE_RSS + (prev[1]["peak_rss"] - BASE_RSS) * world / prev[0]
    avail = mem_available() - 3 * 2**30
    if need > avail:
        return f"skipped: would need about {need / 2**30:.1f} GiB (extrapolated), {max(0, avail) / 2**30:.1f} GiB free"
    return None


def measure(worlds: list[int], n_tensors: int, limit_s: float) -> dict[str, dict[int, dict[str, Any]]]:
    """Every point, the systems interleaved per rank count; a system stops at its first point that fails."""
    results: dict[str, dict[int, dict[str, Any]]] = {"tc": {}, "dcp": {}}
    stopped: dict[str, str] = {}
    for world in worlds:
        for system in ("tc", "dcp"):
            done = results[system]
            prev = max(done.items()) if done else None
            why = stopped.get(system) or _too_big(prev, world)
            if why is None:
                print(f"  {system} {world} ranks x {n_tensors} tensors ...", flush=True)
                done[world] = run_point(system, world, n_tensors, limit_s)
                why = done[world].get("error")
                if why:
                    stopped[system] = f"skipped: {world} ranks {why}"
            else:
                done[world] = {"error": why}
            print(f"    {json.dumps(done[world])}", flush=True)
    return results


def table(results: dict[str, dict[int, dict[str, Any]]], worlds: list[int]) -> str:
    """Seconds per rank count, one row per measured step (and the manifest's size)."""
    head = "| seconds | " + " | ".join(f"{w:,} ranks" for w in worlds) + " |"
    lines = [head, "|---|" + "---:|" * len(worlds)]
    rows = [*COLUMNS, ("manifest_bytes", "torchckpt: manifest size, MB"), ("index_bytes", "torchckpt: all index objects, MB"),
            ("peak_rss", "peak RSS, GiB (tc / DCP)")]
    for key, label in rows:
        cells = []
        for w in worlds:
            if key == "peak_rss":
                cells.append(" / ".join(_cell(results[s].get(w, {}), key) for s in ("tc", "dcp")))
                continue
            system = "tc" if key.startswith("tc_") or key in ("manifest_bytes", "index_bytes") else "dcp"
            cells.append(_cell(results[system].get(w, {}), key))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(point: dict[str, Any], key: str) -> str:
    if key in point:
        v = point[key]
        return f"{v / 1e6:,.1f}" if key in ("manifest_bytes", "index_bytes") else (
            f"{v / 2**30:.1f}" if key == "peak_rss" else f"{v:.3f}")  # fmt: skip
    return "–" if "error" not in point else "> limit" if "within" in point["error"] else "n/a"


def render(results: dict[str, dict[int, dict[str, Any]]], worlds: list[int], n_tensors: int, limit_s: float,
           title: str) -> str:  # fmt: skip
    notes = [f"- {s} {w} ranks: {p['error']}" for s in ("tc", "dcp") for w, p in results[s].items() if "error" in p]
    out = [f"## {title}", "",
           f"{n_tensors:,} bf16 tensors (shapes cycling {', '.join(str(list(s)) for s in SHAPES)}), `Shard(0)` over a "
           f"1-D mesh of N simulated ranks; one child process per point, {limit_s:.0f} s limit; "
           "`torch.set_num_threads(1)`. Per-rank load plans: the middle rank, same layout.", "",
           table(results, worlds)]  # fmt: skip
    if notes:
        out += ["", "Not measured:", "", *notes]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8,64,512,4096", help="simulated rank counts (default 8,64,512,4096)")
    p.add_argument("--tensors", type=int, default=1000, help="tensors (default 1000)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds one point may take (default 300)")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where the .md/.json go")
    p.add_argument("--report", action="store_true", help="also write the table into benchmarks/README.md")
    p.add_argument("--child", nargs=3, metavar=("SYSTEM", "RANKS", "TENSORS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    worlds = sorted(int(x) for x in args.ranks.split(",") if x)
    started = time.perf_counter()
    results = measure(worlds, args.tensors, args.time_limit)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    title = f"Metadata scaling run {stamp} ({(time.perf_counter() - started) / 60:.1f} min)"
    md = render(results, worlds, args.tensors, args.time_limit, title)
    print("\n" + md)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{stamp}-metadata")
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"written: {stem}.md, {stem}.json")
    if args.report:
        import report

        report.update_readme(str(HERE / "README.md"), md, "results-metadata")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
