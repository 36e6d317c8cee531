"""Incremental saves on a LoRA-like state: what a save costs when most of the state has not changed.

State: ``--frozen-gib`` of frozen bf16 weights (8 tensors), 16 MiB of
trainable fp32 adapters (8 tensors) and their AdamW moments (``exp_avg``,
``exp_avg_sq``: 2 x 16 MiB). Ten saves, the trainable part and its moments
changed before each. Two managers, sync saves, interleaved save by save
(the machine's noise hits both alike):

- *full*: ``CheckpointManager(root_a)`` (every save writes the whole state;
  ``KeepLast(1)`` bounds the disk);
- *incremental*: ``CheckpointManager(root_b, incremental=True)``, every step kept.

Reported: the median save time of the full saves; of the incremental saves
2..10; the first incremental save (full, plus the digests); the ratio of the
two medians (target <= 0.15); the bytes under ``root_b`` after the ten saves
over (full state + 10 x changed bytes) (target ~1, <= 1.1). Rows of
``report.INCREMENTAL_TARGETS``.

Usage::

    python benchmarks/incremental.py --frozen-gib 1 --dir /work/bench-scratch
    python benchmarks/run.py --incremental --size-gib 0.5 --dir /work/bench-scratch
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from typing import Any

import torch

import report

MIB = 1 << 20
SAVES = 10
TRAINABLE_TENSORS = 8


def make_state(frozen_gib: float, seed: int = 0) -> tuple[dict[str, Any], int]:
    """The LoRA-like state and the bytes that change per save (trainable + its two moments)."""
    g = torch.Generator().manual_seed(seed)
    per = int(frozen_gib * (1 << 30)) // 8 // 2  # bf16 elements per frozen tensor
    frozen = {f"base.{i}.weight": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(8)}
    n = 16 * MIB // 4 // TRAINABLE_TENSORS
    lora = {f"lora.{i}": torch.randn(n, generator=g) for i in range(TRAINABLE_TENSORS)}
    optim = {k: {"exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)} for k in lora}
    changed = sum(t.nbytes for t in lora.values()) * 3
    return {"model": {**frozen, **lora}, "optim": optim, "step": 0}, changed


def train_step(state: dict[str, Any], step: int) -> None:
    """Change the trainable tensors and their moments in place (as an optimizer step does)."""
    for k, m in state["optim"].items():
        p = state["model"][k]
        p.add_(0.001 * (step + 1))
        m["exp_avg"].mul_(0.9).add_(p, alpha=0.1)
        m["exp_avg_sq"].mul_(0.999).addcmul_(p, p, value=0.001)
    state["step"] = step


def disk_bytes(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def run(frozen_gib: float, scratch: str) -> dict[str, Any]:
    import torchckpt as tc

    state, changed = make_state(frozen_gib)
    total = sum(t.nbytes for t in state["model"].values()) + sum(
        t.nbytes for m in state["optim"].values() for t in m.values()
    )
    root_a, root_b = os.path.join(scratch, "full"), os.path.join(scratch, "incremental")
    full_s: list[float] = []
    inc_s: list[float] = []
    with tc.CheckpointManager(root_a, async_save=False, keep=[tc.KeepLast(1)]) as full, tc.CheckpointManager(
        root_b, async_save=False, incremental=True
    ) as inc:
        for step in range(SAVES):
            train_step(state, step)
            order = [(full, full_s), (inc, inc_s)] if step % 2 == 0 else [(inc, inc_s), (full, full_s)]
            for mgr, times in order:
                t0 = time.perf_counter()
                mgr.save(step, state)
                times.append(time.perf_counter() - t0)
            print(f"save {step + 1}: full {full_s[-1]:.3f}s, incremental {inc_s[-1]:.3f}s", flush=True)
    on_disk = disk_bytes(root_b)
    out = {
        "frozen_gib": frozen_gib,
        "state_bytes": total,
        "changed_bytes": changed,
        "full_save_s": statistics.median(full_s),
        "first_incremental_s": inc_s[0],
        "incremental_save_s": statistics.median(inc_s[1:]),
        "incremental_save_max_s": max(inc_s[1:]),
        "disk_bytes": on_disk,
    }
    out["time_ratio"] = out["incremental_save_s"] / out["full_save_s"]
    out["disk_ratio"] = on_disk / (total + SAVES * changed)
    return out


def render(r: dict[str, Any]) -> str:
    gib = 1 << 30
    lines = [
        f"LoRA-like state: {r['frozen_gib']:g} GiB frozen bf16 + 16 MiB trainable fp32 + AdamW moments "
        f"({r['state_bytes'] / gib:.3f} GiB; {r['changed_bytes'] / MIB:.0f} MiB change per save), {SAVES} sync saves",
        "",
        "| figure | value |",
        "|---|---|",
        f"| full save (median of {SAVES}) | {r['full_save_s']:.3f} s |",
        f"| first incremental save (full + digests) | {r['first_incremental_s']:.3f} s |",
        f"| incremental saves 2..{SAVES} (median; max) | {r['incremental_save_s']:.3f} s; {r['incremental_save_max_s']:.3f} s |",
        f"| bytes on disk after {SAVES} incremental saves | {r['disk_bytes'] / MIB:.1f} MiB |",
        "",
        "| target | value | goal | met |",
        "|---|---|---|---|",
    ]
    for name, value, goal, sense, met in report.incremental_targets(r):
        lines.append(f"| {name} | {value:.3f} | {'≤' if sense == 'le' else '≥'} {goal} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frozen-gib", type=float, default=1.0, help="frozen bf16 weights, GiB (default 1)")
    p.add_argument("--dir", default="/work/bench-scratch", help="scratch directory on the disk to measure")
    args = p.parse_args(argv)
    scratch = os.path.join(os.path.abspath(args.dir), f"incremental-{os.getpid()}")
    os.makedirs(scratch)
    torch.set_num_threads(1)
    try:
        result = run(args.frozen_gib, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + render(result))
    return 0 if all(t[4] for t in report.incremental_targets(result)) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
