"""Sharded state: an FSDP2 transformer-like state on N gloo ranks, torchckpt against torch DCP (``run.py --sharded``).

For each world size N (default 2 and 4) a group of N rank processes
(``sharded_rank.py``, gloo on loopback, every wait under a timeout) builds
the FSDP2 model + AdamW state of ``sharded_state.py`` (SIZE GiB of tensor
bytes in all, ``Shard(0)`` DTensors) and keeps it for the whole run. Both
worlds live side by side, so that every method of every world runs once per
repetition, in an order rotated from one repetition to the next (``run.py``'s
``run_suite``), and every ratio comes from figures of the same run:

- limits, per N: ``copy_`` of each rank's local shards into preallocated
  tensors (the floor of an async stall); each rank writing its local shards'
  bytes to its own file + fsync (the disk's limit for these bytes);
- saves, per N: torchckpt sync and async (native format; async: stall until
  the stage future is done, time until the write future is done), torch DCP
  ``save`` and ``async_save`` (thread executor; stall until it returned);
- loads at the same layout, per N: torchckpt and DCP ``load`` into the
  zeroed state-dict template (warm: right after the save);
- resharded load 4 -> 2: a checkpoint saved (untimed) by the 4 ranks, loaded
  by the 2 ranks into their template, torchckpt and DCP;
- bytes written by every save (the sum of its files' sizes) against the
  state's bytes.

A collective operation's figure is its slowest rank's, each rank timing
from a barrier of all of them. ``os.sync()`` and as much fresh memory as the
operation needs (touched and freed) come first, untimed; every save goes to a
fresh path, deleted outside the timed region.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import harness
import methods
import report
import torch.multiprocessing as mp
from harness import Bench, MemProbe, figures, remove
from methods import Block

HERE = Path(__file__).resolve().parent
GIB = 2**30
#: Longest one command of a world may take before the run is ended.
COMMAND_TIMEOUT_S = 900


# --------------------------------------------------------------------------- worlds of rank processes


class World:
    """N rank processes of one gloo group, commanded together over pipes."""

    def __init__(self, n: int, nbytes: int, scratch: str) -> None:
        from sharded_rank import worker

        self.n = n
        spawn = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for rank in range(n):
            parent, child = spawn.Pipe()
            p = spawn.Process(target=worker, args=(rank, n, port, nbytes, scratch, child), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.info: list[dict[str, Any]] = []

    def wait_ready(self) -> None:
        self.info = [self._recv(c, COMMAND_TIMEOUT_S) for c in self.conns]

    def _recv(self, conn: Any, timeout_s: float) -> dict[str, Any]:
        if not conn.poll(timeout_s):
            raise TimeoutError(f"a rank of the {self.n}-rank world did not answer within {timeout_s}s")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"a rank of the {self.n}-rank world failed:\n{msg[1]}")
        return dict(msg[1])

    def call(self, *cmd: Any) -> list[dict[str, Any]]:
        """Send ``cmd`` to every rank; every rank's reply (figures)."""
        for c in self.conns:
            c.send(cmd)
        return [self._recv(c, COMMAND_TIMEOUT_S) for c in self.conns]

    def op(self, op: str, path: str, verify: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run ``op`` on every rank: the replies, and the figures of the slowest rank (``Bench.measure`` takes both)."""
        replies = self.call("run", op, path, verify)
        return replies, figures(
            durable_s=max(r["time_s"] for r in replies),
            stall_s=max(r["stall_s"] for r in replies),
            per_rank=[[r["stall_s"], r["time_s"]] for r in replies],
        )

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for c in self.conns:
            try:
                if c.poll(60):
                    c.recv()
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


class ShardCtx:
    """What the blocks share: the worlds by size and the state's bytes (counted once)."""

    def __init__(self, worlds: dict[int, World]) -> None:
        self.worlds = worlds
        first = next(iter(worlds.values()))
        self.nbytes = int(first.info[0]["state_bytes"])


def dir_bytes(path: str) -> int:
    """The sum of the sizes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


# --------------------------------------------------------------------------- blocks


class _WorldBlock(Block):
    """A method on the world of ``n`` ranks."""

    group = "torchckpt"

    def __init__(self, n: int) -> None:
        self.n = n
        self.state = f"{n} ranks"

    def world(self, ctx: ShardCtx) -> World:
        return ctx.worlds[self.n]

    def save(self, b: Bench, ctx: ShardCtx, row: Any, op: str, name: str, fresh: float = 1.0) -> str:
        """One measured save of ``op`` to a fresh path; records the bytes it wrote. Returns the path."""
        path = b.path(f"sh{self.n}-{name}")
        b.measure(row, lambda: self.world(ctx).op(op, path), before=b.sync, fresh_bytes=int(fresh * ctx.nbytes))
        row.extra.setdefault("bytes_written", []).append(dir_bytes(path))
        return path

    def load(self, b: Bench, ctx: ShardCtx, row: Any, op: str, path: str, verify: bool, world: World) -> None:
        """One measured load of ``path`` into the template of ``world``; checks the bytes when ``verify``."""
        replies = b.measure(row, lambda: world.op(op, path, verify))
        if verify:
            b.check(row.key, all(r.get("ok", False) for r in replies))


class Limits(_WorldBlock):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.key = f"sharded_limits_{n}"
        self.label = f"limits, {n} ranks"

    def setup(self, b: Bench, ctx: Any) -> None:
        n, nb = self.n, ctx.nbytes
        self.copy = b.row(f"sh{n}_copy", f"copy_ of the local shards, {n} ranks (stall floor)", "limit", "copy", nb,
                          state=self.state)  # fmt: skip
        self.write = b.row(f"sh{n}_write", f"raw write of the local shards + fsync, {n} ranks (disk limit)", "limit",
                           "save", nb, state=self.state, notes="each rank its own file")  # fmt: skip

    def run(self, b: Bench, ctx: Any, verify: bool) -> None:
        for _ in range(methods.COPY_SAMPLES):
            b.measure(self.copy, lambda: self.world(ctx).op("copy", ""), before=b.sync, fresh_bytes=ctx.nbytes)
        remove(self.save(b, ctx, self.write, "write", "plain"))


class Save(_WorldBlock):
    """A save method (and, for the sync ones, the load at the same layout of what it saved)."""

    LABELS = {
        "tc_save": ("torchckpt sync save", "tc_load", "torchckpt load into the template"),
        "tc_async": ("torchckpt async save", None, ""),
        "dcp_save": ("torch DCP save", "dcp_load", "torch DCP load into the template"),
        "dcp_async": ("torch DCP async_save, thread executor", None, ""),
    }

    def __init__(self, n: int, op: str) -> None:
        super().__init__(n)
        self.op = op
        self.key = f"sharded_{op}_{n}"
        self.label = f"{self.LABELS[op][0]}, {n} ranks"
        self.group = "torchckpt" if op.startswith("tc") else "peer"
        self.async_ = op.endswith("async")

    def setup(self, b: Bench, ctx: Any) -> None:
        label, load_op, load_label = self.LABELS[self.op]
        note = "stall: until the stage future is done" if self.op == "tc_async" else (
            "stall: until async_save returned" if self.op == "dcp_async" else "")  # fmt: skip
        self.row = b.row(f"sh{self.n}_{self.op}", f"{label}, {self.n} ranks", self.group, "save", ctx.nbytes,
                         state=self.state, notes=note)  # fmt: skip
        self.load_row = None
        if load_op is not None:
            self.load_row = b.row(f"sh{self.n}_{load_op}", f"{load_label}, {self.n} ranks, warm", self.group, "load",
                                  ctx.nbytes, state=self.state)  # fmt: skip
        self.world(ctx).call("prepare", self.op)

    def run(self, b: Bench, ctx: Any, verify: bool) -> None:
        for i in range(methods.ASYNC_SAVES if self.async_ else 1):
            path = self.save(b, ctx, self.row, self.op, f"{self.op}-{i}", 2.0 if self.op == "dcp_async" else 1.0)
            if self.load_row is not None:
                load_op = self.LABELS[self.op][1]
                assert load_op is not None
                self.load(b, ctx, self.load_row, load_op, path, verify, self.world(ctx))
            remove(path)


class Reshard(_WorldBlock):
    """Saved (untimed) by the ``src``-rank world, loaded by the ``dst``-rank world into its template."""

    def __init__(self, src: int, dst: int) -> None:
        super().__init__(src)
        self.dst = dst
        self.key = f"sharded_reshard_{src}_{dst}"
        self.label = f"resharded load {src} -> {dst} ranks"
        self.state = f"resharded {src} -> {dst}"

    def setup(self, b: Bench, ctx: Any) -> None:
        self.rows = {
            op: b.row(f"sh{self.n}to{self.dst}_{op}", f"{label}, saved by {self.n} ranks, loaded by {self.dst}, warm",
                      group, "load", ctx.nbytes, state=self.state)
            for op, label, group in (("tc_load", "torchckpt load", "torchckpt"), ("dcp_load", "torch DCP load", "peer"))
        }  # fmt: skip
        for w in (self.n, self.dst):
            ctx.worlds[w].call("prepare", "tc_save")

    def run(self, b: Bench, ctx: Any, verify: bool) -> None:
        for save_op, load_op in (("tc_save", "tc_load"), ("dcp_save", "dcp_load")):
            path = b.path(f"sh{self.n}to{self.dst}-{save_op}")
            b.sync()
            self.world(ctx).op(save_op, path)
            self.load(b, ctx, self.rows[load_op], load_op, path, verify, ctx.worlds[self.dst])
            remove(path)


def blocks(ranks: list[int]) -> list[Block]:
    """Every block, in table order: per world size the limits and the four saves, then the 4 -> 2 reshard."""
    out: list[Block] = []
    for n in ranks:
        out.append(Limits(n))
        out += [Save(n, op) for op in ("tc_save", "tc_async", "dcp_save", "dcp_async")]
    if 4 in ranks and 2 in ranks:
        out.append(Reshard(4, 2))
    return out


# --------------------------------------------------------------------------- targets, ratios, report


def _t(s: dict[str, Any], key: str, what: str = "time") -> float | None:
    row = s.get(key)
    return None if row is None or what not in row else float(row[what]["median"])


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _save_goal(s: dict[str, Any], n: int) -> float | None:
    """Sync save throughput over the lower of 2x DCP save's and 0.95x the raw write's (throughput = 1 / time)."""
    tc, dcp, raw = _t(s, f"sh{n}_tc_save"), _t(s, f"sh{n}_dcp_save"), _t(s, f"sh{n}_write")
    if tc is None or dcp is None or raw is None:
        return None
    return (1 / tc) / min(2 / dcp, 0.95 / raw)


def targets(s: dict[str, Any], ranks: list[int]) -> list[dict[str, Any]]:
    """The issue's targets (PASS/MISS) that the run's rows allow."""
    items: list[tuple[str, float | None, float, str]] = []
    for n in ranks:
        items.append((f"{n} ranks, sync save: throughput / min(2x DCP save, 0.95x raw write)", _save_goal(s, n), 1.0, "ge"))
        items.append((f"{n} ranks, async save, 2nd+ save: stall / copy_ of the local shards",
                      _div(_t(s, f"sh{n}_tc_async", "stall"), _t(s, f"sh{n}_copy")), 1.1, "le"))  # fmt: skip
    items.append(("resharded load 4 -> 2: throughput / DCP load",
                  _div(_t(s, "sh4to2_dcp_load"), _t(s, "sh4to2_tc_load")), 2.0, "ge"))  # fmt: skip
    out = []
    for name, value, goal, sense in items:
        if value is not None:
            met = value >= goal if sense == "ge" else value <= goal
            out.append({"name": name, "value": value, "goal": goal, "sense": sense, "met": met})
    return out


def ratios(s: dict[str, Any], ranks: list[int]) -> list[dict[str, Any]]:
    """Context ratios (no goal) from the same run."""
    items: list[tuple[str, float | None]] = []
    for n in ranks:
        k = f"sh{n}_"
        copy_write = None if _t(s, k + "copy") is None or _t(s, k + "write") is None else (
            _t(s, k + "copy") + _t(s, k + "write"))  # type: ignore[operator]  # fmt: skip
        items += [
            (f"{n} ranks, sync save: throughput / DCP save", _div(_t(s, k + "dcp_save"), _t(s, k + "tc_save"))),
            (f"{n} ranks, sync save: throughput / raw write", _div(_t(s, k + "write"), _t(s, k + "tc_save"))),
            (f"{n} ranks, async save: save-to-durable / (copy_ + raw write)", _div(_t(s, k + "tc_async"), copy_write)),
            (f"{n} ranks, async save: save-to-durable throughput / DCP async_save",
             _div(_t(s, k + "dcp_async"), _t(s, k + "tc_async"))),
            (f"{n} ranks, async save: stall / DCP async_save stall",
             _div(_t(s, k + "tc_async", "stall"), _t(s, k + "dcp_async", "stall"))),
            (f"{n} ranks, DCP async_save: stall / copy_", _div(_t(s, k + "dcp_async", "stall"), _t(s, k + "copy"))),
            (f"{n} ranks, load at the same layout: throughput / DCP load",
             _div(_t(s, k + "dcp_load"), _t(s, k + "tc_load"))),
        ]  # fmt: skip
    return [{"name": name, "value": v} for name, v in items if v is not None]


def bytes_table(rows: dict[str, Any], nbytes: int) -> str:
    """Bytes written by every save (median over the saves) against the state's bytes."""
    lines = ["| save | bytes written | / state bytes |", "|---|---:|---:|"]
    for r in rows.values():
        sizes = r["extra"].get("bytes_written")
        if sizes:
            mid = sorted(sizes)[len(sizes) // 2]
            lines.append(f"| {r['label']} | {mid:,} | {mid / nbytes:.4f} |")
    return "\n".join(lines)


def render(args: argparse.Namespace, mach: dict[str, Any], suite: dict[str, Any], ranks: list[int],
           describe: str) -> str:  # fmt: skip
    """The markdown of one run: conditions, a table per world, targets, ratios, bytes written."""
    summary = suite["summary"]
    suite["targets"], suite["ratios"] = targets(summary, ranks), ratios(summary, ranks)
    foreign = suite["foreign_cores_per_rep"]
    out = [f"## {suite['title']}", "", f"Machine: {harness.machine_line(mach)}.", "",
           f"State: {describe}.", "",
           f"Method: {args.reps} repetitions, every method of every world once per repetition in an order rotated "
           f"from one repetition to the next (async saves: {args.async_saves} per repetition after an untimed "
           f"warm-up save; copy_: {methods.COPY_SAMPLES}); medians and (min–max); a collective operation's time "
           "is its slowest rank's, from a barrier of all ranks. `os.sync()` and fresh memory touched before every "
           "save; fresh paths, deleted outside the timed region. Loads are warm (right after the save); "
           "`torch.set_num_threads(1)` in every rank.", "",
           f"Noise: other processes kept {min(foreign):.2f}–{max(foreign):.2f} of {os.cpu_count()} cores busy."]  # fmt: skip
    states = []
    for s in summary.values():
        if s["state"] not in states:
            states.append(s["state"])
    for state in states:
        out += ["", f"### {state}", "", report.table(summary, state)]
    out += ["", "Targets (same run):", "", report.targets_table(suite["targets"]), ""]
    out += ["Ratios (same run, context):", "", report.ratios_table(suite["ratios"]), ""]
    out += ["Bytes written:", "", bytes_table(suite["rows"], suite["tensor_bytes"]), ""]
    if suite["skipped"]:
        out += ["Not measured:", ""] + [f"- `{k}`: {v}" for k, v in suite["skipped"].items()] + [""]
    bad = [k for k, ok in suite["checks"].items() if not ok]
    out.append(f"Correctness (first repetition): "
               f"{'every load returned the saved bytes' if not bad else 'MISMATCH in ' + ', '.join(bad)}.")  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


def _describe(ctx: ShardCtx) -> str:
    info = ctx.worlds[min(ctx.worlds)].info[0]
    return (
        f"FSDP2 (`fully_shard` per block and the root, `Shard(0)` DTensors) transformer-like model, hidden "
        f"{info['d']}, vocab {info['vocab']}, {info['params']} parameters (fp32 embeddings, norms and biases, bf16 "
        f"matrices), + AdamW after one step (moments in the parameter's dtype): {ctx.nbytes / GIB:.3f} GiB of "
        f"tensor bytes; built in {max(i['build_s'] for w in ctx.worlds.values() for i in w.info):.0f} s"
    )


def main(args: argparse.Namespace) -> int:
    """``run.py --sharded``: start the worlds, run the blocks interleaved, write .md/.json (and the README)."""
    import run  # its run_suite: rotation, setup, noise

    ranks = sorted({int(x) for x in args.ranks.split(",") if x})
    methods.ASYNC_SAVES = max(1, args.async_saves)
    args.keep_alive = "yes"  # the worlds and their checkpointers live for the whole run
    scratch = os.path.join(os.path.abspath(args.dir), f"sharded-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    probe = None if args.no_memory else MemProbe()
    worlds: dict[int, World] = {}
    started = time.perf_counter()
    try:
        mach = harness.machine(scratch)
        print(f"machine: {harness.machine_line(mach)}", flush=True)
        for n in ranks:
            worlds[n] = World(n, int(args.size_gib * GIB), scratch)
        for w in worlds.values():
            w.wait_ready()
        ctx = ShardCtx(worlds)
        describe = _describe(ctx)
        print(f"\n{describe}", flush=True)
        suite = run.run_suite("sharded", blocks(ranks), ctx, args, "fadvise", probe, scratch)
        suite["title"] = (f"Sharded benchmark run {stamp}: {ctx.nbytes / GIB:.3g} GiB FSDP2 state on "
                          f"{' and '.join(map(str, ranks))} ranks ({(time.perf_counter() - started) / 60:.1f} min)")  # fmt: skip
        md = render(args, mach, suite, ranks, describe)
        print("\n" + md)
        _write(args, stamp, md, mach, suite)
        return 0 if all(suite["checks"].values()) else 1
    finally:
        for w in worlds.values():
            w.close()
        if probe is not None:
            probe.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _write(args: argparse.Namespace, stamp: str, md: str, mach: dict[str, Any], suite: dict[str, Any]) -> None:
    stem = os.path.join(args.out_dir, f"{stamp}-sharded")
    with open(stem + ".md", "w") as f:
        f.write(md)
    doc = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "argv": sys.argv, "args": vars(args),
           "machine": mach, "suites": [suite]}  # fmt: skip
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"written: {stem}.md, {stem}.json")
    if args.report:
        report.update_readme(str(HERE / "README.md"), md, "results-sharded")
        print(f"updated section results-sharded of {HERE / 'README.md'}")
