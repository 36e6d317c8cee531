"""torchckpt against the physical limits and every peer, measured in one run.

One process measures, on the transformer-like state of ``workload.py``
(1 GiB by default), interleaved and repeated — every repetition runs every
method once, in an order rotated from one repetition to the next:

- limits: ``copy_`` into preallocated tensors; plain buffered write + fsync;
  plain read into preallocated tensors, warm and cold;
- peers: ``torch.save`` + fsync / ``torch.load`` (fresh; ``mmap=True`` +
  ``copy_``); torch DCP ``save`` / ``load`` / ``async_save`` (thread and
  process executors); the reference ``torch.distributed.checkpoint._experimental``
  sync and async checkpointers; ``torch_checkpointing`` sync and async;
  ``safetensors`` ``save_file`` / ``load_file`` (tensors only);
- torchckpt: sync and async, native (``safetensors``) and ``torch_save``
  formats, one rank and two ranks (gloo on loopback, half the state each);
- many small entries: 100,000 tensors of 1 KiB and 100,000 plain values,
  torchckpt (both formats) against ``torch.save`` / ``torch.load``.

Figures per method: time (save-to-durable for saves), throughput (GB/s of
tensor bytes, GB = 1e9 B), stall (until the training thread may go on),
peak resident memory added (``memsample.py`` samples ``/proc/<pid>/status``
of this process and its descendants every ~1 ms from a separate process),
CPU seconds of this process. Reports medians and min–max; ratios and
targets (PASS/MISS) are computed from the same run.

Output: a markdown table (printed, and ``results/<timestamp>.md``), every
raw figure (``.json``) and a chart (``.png``); ``--report`` also writes the
table and chart into ``benchmarks/README.md`` and ``benchmarks/chart.png``.

Usage::

    python benchmarks/run.py                      # 1 GiB, 3 repetitions, many-small case included
    python benchmarks/run.py --size-gib 4
    python benchmarks/run.py --sweep              # 64 MiB, 256 MiB, 1 GiB, 4 GiB; fewer methods
    python benchmarks/run.py --many-small         # only the many-small case
    python benchmarks/run.py --only limits,tc_sync_native --reps 5
    python benchmarks/run.py --report             # and update benchmarks/README.md
    python benchmarks/run.py --sharded            # FSDP2 state on 2 and 4 gloo ranks vs DCP (sharded.py)
    python benchmarks/run.py --object-store       # to and from a loopback S3 server vs the limit and DCP (object_store.py)
    python benchmarks/run.py --metadata-scaling   # metadata work at 8 to 4,096 simulated ranks (metadata_scaling.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import methods
import report
from harness import Bench, CpuMeter, MemProbe
from many_small import describe_many_small, many_small_blocks
from methods import SWEEP_KEYS, Block, Ctx, main_blocks
from workload import describe, make_many_small, make_state, template_like

HERE = Path(__file__).resolve().parent
GIB = 2**30
SWEEP_SIZES_GIB = (0.0625, 0.25, 1.0, 4.0)


def _last_line(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def _select(blocks: list[Block], only: set[str], skip: set[str]) -> list[Block]:
    return [b for b in blocks if (not only or b.key in only) and b.key not in skip]


def run_suite(
    name: str, blocks: list[Block], ctx: Ctx, args: argparse.Namespace, cold: str, probe: MemProbe | None, scratch: str
) -> dict[str, Any]:
    """Every block once per repetition, order rotated; returns the raw figures and summaries."""
    bench = Bench(scratch, cold, prefault_on=not args.no_prefault, probe=probe)
    skipped: dict[str, str] = {}
    ready: list[Block] = []
    for blk in blocks:
        why = blk.available()
        if why:
            skipped[blk.key] = why
            print(f"  skipping {blk.key}: {why}", flush=True)
        else:
            ready.append(blk)
    held = sum(b.held_states for b in ready) * ctx.nbytes + 3 * ctx.nbytes
    keep_alive = {"yes": True, "no": False}.get(args.keep_alive, held < 0.7 * harness.mem_available())
    print(
        f"  {'keeping every method set up across repetitions' if keep_alive else 'setting each method up per repetition'}"
        f" (estimated {held / GIB:.1f} GiB held, {harness.mem_available() / GIB:.1f} GiB available)",
        flush=True,
    )

    def setup(blk: Block) -> bool:
        try:
            t0 = time.perf_counter()
            blk.setup(bench, ctx)
            print(f"  set up {blk.key} ({time.perf_counter() - t0:.1f}s)", flush=True)
            return True
        except Exception as e:  # noqa: BLE001 - one method failing must not end the run
            skipped[blk.key] = f"setup failed: {type(e).__name__}: {_last_line(e)}"
            print(f"  !! {blk.key}: setup failed, skipped:\n{traceback.format_exc()}", flush=True)
            return False

    def teardown(blk: Block) -> None:
        try:
            blk.teardown()
        except Exception as e:  # noqa: BLE001
            print(f"  !! {blk.key}: teardown failed: {e}", flush=True)

    if keep_alive:
        ready = [b for b in ready if setup(b)]
    orders: list[list[str]] = []
    foreign: list[float] = []
    rep_s: list[float] = []
    meter = CpuMeter()
    for rep in range(args.reps):
        bench.rep = rep
        meter.start()
        t_rep = time.perf_counter()
        k = rep % max(1, len(ready))
        order = ready[k:] + ready[:k]
        orders.append([b.key for b in order])
        print(f"  rep {rep + 1}/{args.reps}: {' -> '.join(orders[-1])}", flush=True)
        for blk in order:
            if blk.key in skipped:
                continue
            if not keep_alive and not setup(blk):
                continue
            try:
                blk.run(bench, ctx, rep == 0)
            except Exception as e:  # noqa: BLE001
                skipped[blk.key] = f"failed in repetition {rep + 1}: {type(e).__name__}: {_last_line(e)}"
                print(f"  !! {blk.key} failed, dropped from later repetitions:\n{traceback.format_exc()}", flush=True)
            finally:
                if not keep_alive:
                    teardown(blk)
            os.sync()  # the next method starts on an idle disk
        foreign.append(meter.foreign_cores())
        rep_s.append(time.perf_counter() - t_rep)
        last = ", ".join(
            f"{r.key}={r.samples[-1].get('durable_s', r.samples[-1]['time_s']):.3f}"
            for r in bench.rows.values()
            if r.samples and r.samples[-1]["rep"] == rep
        )
        print(f"    {last}", flush=True)
        print(
            f"    {rep_s[-1]:.0f}s; other processes kept {foreign[-1]:.2f} of {os.cpu_count()} cores busy", flush=True
        )
    if keep_alive:
        for blk in ready:
            teardown(blk)
    summary = report.summarize(bench.rows)
    return {
        "name": name,
        "tensor_bytes": ctx.nbytes,
        "keep_alive": keep_alive,
        "orders": orders,
        "foreign_cores_per_rep": foreign,
        "rep_seconds": rep_s,
        "skipped": skipped,
        "checks": bench.checks,
        "rows": {k: {"label": r.label, "group": r.group, "op": r.op, "nbytes": r.nbytes, "state": r.state,
                     "notes": r.notes, "samples": r.samples, "extra": r.extra} for k, r in bench.rows.items()},
        "summary": summary,
    }  # fmt: skip


def _header(args: argparse.Namespace, cold: str, mach: dict[str, Any], suites: list[dict[str, Any]]) -> list[str]:
    foreign = [x for s in suites for x in s["foreign_cores_per_rep"]]
    noise = f"{min(foreign):.2f}–{max(foreign):.2f}" if foreign else "?"
    method = (
        f"Method: one process, {args.reps} repetitions, every method once per repetition in an order rotated "
        f"from one repetition to the next (async methods: {args.async_saves} saves per repetition; copy_: "
        f"{methods.COPY_SAMPLES}); medians and (min–max). `torch.set_num_threads(1)`. Cold reads: "
        f"{harness.cold_description(cold)}. Fresh memory touched before each timed operation "
        f"({'off' if args.no_prefault else 'on'}); fresh paths per repetition, deleted outside the timed "
        "region; `os.sync()` before every save and between methods. Async methods: the first save (writer "
        "start, staging allocation) is a warm-up; figures are of the 2nd and later saves."
    )
    memory = (
        "Memory: peak minus the value right before the operation, largest over the repetitions, sampled "
        "every ~1 ms from a separate process (`memsample.py`): main = this process's RssAnon + RssShmem, "
        'writer = the RssAnon of its descendants (writer subprocesses, rank processes); "held" = memory an '
        "async method keeps between saves (main after its first save minus before it was made: staging)."
    )
    busy = "" if not foreign or max(foreign) < 0.2 else " — figures from a busy machine: compare ratios, not absolutes"
    noise_line = f"Noise: other processes kept {noise} of {os.cpu_count()} cores busy during the repetitions{busy}."
    return [f"Machine: {harness.machine_line(mach)}.", "", method, "", memory, "", noise_line]


def render(args: argparse.Namespace, cold: str, mach: dict[str, Any], suites: list[dict[str, Any]],
           title: str, chart_name: str | None) -> str:  # fmt: skip
    out = [f"## {title}", ""]
    out += _header(args, cold, mach, suites)
    for suite in suites:
        summary = suite["summary"]
        targets, ratios = report.evaluate(summary)
        suite["targets"], suite["ratios"] = targets, ratios
        out += ["", f"### {suite['name']}", "", suite["describe"], ""]
        for state in ("main", "many_small"):
            if any(s["state"] == state for s in summary.values()):
                out += [report.table(summary, state), ""]
        if targets:
            out += ["Targets (same run):", "", report.targets_table(targets), ""]
        if ratios:
            out += ["Ratios (same run, context):", "", report.ratios_table(ratios), ""]
        n = report.notes(summary)
        if n:
            out += ["Notes:", "", n, ""]
        if suite["skipped"]:
            out += ["Not measured:", ""] + [f"- `{k}`: {v}" for k, v in suite["skipped"].items()] + [""]
        bad = [k for k, ok in suite["checks"].items() if not ok]
        out.append(
            f"Correctness (first repetition): {'every load returned the saved bytes' if not bad else 'MISMATCH in ' + ', '.join(bad)}."
        )
    if chart_name:
        out += ["", f"![throughput and stall per method]({chart_name})"]
    return "\n".join(out).rstrip() + "\n"


def sweep_table(suites: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    labels: dict[str, str] = {}
    for s in suites:
        for k, v in s["summary"].items():
            if k not in keys:
                keys.append(k)
                labels[k] = v["label"]
    head = "| method | " + " | ".join(f"{s['tensor_bytes'] / 2**20:,.0f} MiB" for s in suites) + " |"
    lines = [head, "|---|" + "---:|" * len(suites)]
    for k in keys:
        cells = []
        for s in suites:
            v = s["summary"].get(k)
            if v is None:
                cells.append("–")
            elif v.get("stall") and v["stall"]["median"] < 0.98 * v["time"]["median"]:
                cells.append(f"{v['gb_per_s']:.2f} GB/s, stall {v['stall']['median']:.3f}s")
            else:
                cells.append(f"{v['gb_per_s']:.2f} GB/s")
        lines.append(f"| {labels[k]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="tensor bytes of the state, GiB (default 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument(
        "--async-saves", type=int, default=2, help="measured saves per repetition of each async method (default 2)"
    )
    p.add_argument("--sweep", action="store_true", help=f"sizes {SWEEP_SIZES_GIB} GiB with {', '.join(SWEEP_KEYS)}")
    p.add_argument("--sweep-sizes", default="", help="comma-separated GiB sizes for --sweep instead of the default")
    p.add_argument("--many-small", action="store_true", help="only the many-small case")
    p.add_argument("--no-many-small", action="store_true", help="leave the many-small case out")
    p.add_argument("--many-small-count", type=int, default=100_000, help="tensors (and plain values) of that case")
    p.add_argument("--only", default="", help="comma-separated method keys to run (see --list)")
    p.add_argument("--skip", default="", help="comma-separated method keys to leave out")
    p.add_argument("--list", action="store_true", help="list the method keys and exit")
    p.add_argument("--dir", default="/work/bench-scratch", help="scratch directory on the disk to measure")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where the .md/.json/.png go")
    p.add_argument("--report", action="store_true", help="also write the table and chart into benchmarks/README.md")
    p.add_argument("--keep-alive", choices=("auto", "yes", "no"), default="auto",
                   help="keep checkpointers across repetitions (auto: when memory allows)")  # fmt: skip
    p.add_argument("--no-prefault", action="store_true", help="do not touch fresh memory before timed operations")
    p.add_argument("--no-memory", action="store_true", help="do not sample resident memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharded", action="store_true",
                   help="the sharded case instead: an FSDP2 state of --size-gib on gloo ranks (sharded.py)")
    p.add_argument("--metadata-scaling", action="store_true",
                   help="the metadata scaling case instead (metadata_scaling.py, its defaults; --out-dir, --report)")
    p.add_argument("--object-store", action="store_true",
                   help="a state to and from a loopback S3 server (moto), vs the client's limit and DCP (object_store.py)")
    p.add_argument("--incremental", action="store_true",
                   help="only the incremental-save case (LoRA-like state, --size-gib of frozen weights; incremental.py)")
    p.add_argument("--tier", action="store_true", help="with --object-store: also the tiered manager save's stall")
    p.add_argument("--ranks", default="2,4", help="world sizes of --sharded (default 2,4; both: the 4 -> 2 reshard)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metadata_scaling:
        import metadata_scaling

        return metadata_scaling.main(["--out-dir", args.out_dir] + (["--report"] if args.report else []))
    if args.incremental:
        import incremental

        return incremental.main(["--frozen-gib", f"{args.size_gib:g}", "--dir", args.dir])
    if args.object_store:
        import object_store

        return object_store.main(args)
    if args.sharded:
        import sharded

        torch.set_num_threads(1)
        return sharded.main(args)
    all_keys = [b.key for b in main_blocks()] + [b.key for b in many_small_blocks()]
    if args.list:
        print("\n".join(all_keys))
        return 0
    only = {k for k in args.only.split(",") if k}
    skip = {k for k in args.skip.split(",") if k}
    unknown = (only | skip) - set(all_keys)
    if unknown:
        print(f"unknown method keys: {sorted(unknown)}; known: {all_keys}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # busy cores make torch's intra-op threads slow (shared/BASELINES.md)
    methods.ASYNC_SAVES = max(1, args.async_saves)
    cold = harness.cold_method()
    scratch = os.path.join(os.path.abspath(args.dir), f"run-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, stamp)
    probe = None if args.no_memory else MemProbe()
    started = time.perf_counter()
    suites: list[dict[str, Any]] = []
    try:
        mach = harness.machine(scratch)
        print(f"machine: {harness.machine_line(mach)}", flush=True)
        print(f"cold reads: {harness.cold_description(cold)}; scratch {scratch}", flush=True)
        if args.sweep:
            sizes = [float(x) for x in args.sweep_sizes.split(",") if x] or list(SWEEP_SIZES_GIB)
            plan = [(s, [k for k in SWEEP_KEYS if not only or k in only]) for s in sizes]
        elif args.many_small:
            plan = []
        else:
            plan = [(args.size_gib, None)]
        for size_gib, keys in plan:
            blocks = _select(main_blocks(), set(keys) if keys is not None else only, skip)
            if not blocks:
                continue
            t0 = time.perf_counter()
            sd = make_state(int(size_gib * GIB), seed=args.seed)
            ctx = Ctx(sd, template_like(sd), make_state(16 * 2**20, seed=args.seed + 1))
            name = f"{ctx.nbytes / GIB:.3g} GiB transformer-like state"
            print(f"\n{name}: {describe(sd)} (built in {time.perf_counter() - t0:.1f}s)", flush=True)
            suite = run_suite(name, blocks, ctx, args, cold, probe, scratch)
            suite["describe"] = f"State: {describe(sd)}."
            suites.append(suite)
            del sd, ctx
        want_small = args.many_small or not (args.no_many_small or args.sweep)
        small_blocks = _select(many_small_blocks(), only, skip)
        if want_small and small_blocks:
            n = args.many_small_count
            sd = make_many_small(n_tensors=n, n_values=n, seed=args.seed)
            ctx = Ctx(sd, template_like(sd), sd)
            print(f"\nmany small: {describe_many_small(sd)}", flush=True)
            suite = run_suite("many small entries", small_blocks, ctx, args, cold, probe, scratch)
            suite["describe"] = f"State: {describe_many_small(sd)}; {ctx.nbytes / 2**20:.0f} MiB of tensor bytes."
            suites.append(suite)
        if not suites:
            print("nothing to run", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - started
        sizes = ", ".join(s["name"] for s in suites)
        title = f"Benchmark run {stamp}: {sizes} ({elapsed / 60:.1f} min)"
        chart_path = report.chart(
            next((s["summary"] for s in suites if any(v["state"] == "main" for v in s["summary"].values())),
                 suites[0]["summary"]),
            stem + ".png", f"{suites[0]['name']}, {args.reps} reps, medians (min–max)",
        )  # fmt: skip
        md = render(args, cold, mach, suites, title, os.path.basename(chart_path) if chart_path else None)
        swept = [s for s in suites if s["name"] != "many small entries"]
        sweep_png = report.sweep_chart(swept, stem + "-sweep.png") if args.sweep else None
        if args.sweep:
            md += "\n### Scaling sweep (save-to-durable throughput; stall where it differs)\n\n"
            md += sweep_table(swept) + "\n"
            if sweep_png:
                md += f"\n![throughput against size]({os.path.basename(sweep_png)})\n"
        print("\n" + md)
        with open(stem + ".md", "w") as f:
            f.write(md)
        doc = {
            "when": dt.datetime.now(dt.timezone.utc).isoformat(),
            "argv": sys.argv,
            "args": vars(args),
            "machine": mach,
            "cold_method": cold,
            "elapsed_s": elapsed,
            "suites": suites,
        }
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(
            f"written: {stem}.md, {stem}.json"
            + (f", {chart_path}" if chart_path else " (no chart: matplotlib missing)")
        )
        if args.report:
            # One README section per kind of run: the default run, another size, the sweep.
            kind = "sweep" if args.sweep else ("results" if args.size_gib == 1 else f"results-{args.size_gib:g}gib")
            suffix = "" if kind == "results" else "-" + kind.removeprefix("results-")
            chart_name = None
            if chart_path:
                chart_name = f"chart{suffix}.png"
                shutil.copyfile(chart_path, HERE / chart_name)
            section = render(args, cold, mach, suites, title, chart_name)
            if args.sweep:
                section += "\n### Scaling sweep\n\n" + sweep_table(swept) + "\n"
                if sweep_png:
                    shutil.copyfile(sweep_png, HERE / "chart-sweep-scaling.png")
                    section += "\n![throughput against size](chart-sweep-scaling.png)\n"
            report.update_readme(str(HERE / "README.md"), section, kind)
            chart_said = f" and {HERE / chart_name}" if chart_name else ""
            print(f"updated section {kind} of {HERE / 'README.md'}{chart_said}")
        return 0 if all(ok for s in suites for ok in s["checks"].values()) else 1
    finally:
        if probe is not None:
            probe.close()
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - the results are written: say it and exit
            print(f"could not close the process group: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
