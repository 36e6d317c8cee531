"""Per-entry overhead: 100,000 tensors of 1 KiB and 100,000 plain values.

torchckpt saves and loads (both formats) against ``torch.save`` + fsync and
``torch.load`` of the same dict, all warm (the bytes are small; what is
measured is the work per key: flattening, planning, manifest, pickling).
"""

from __future__ import annotations

from typing import Any

import torch
from harness import Bench, remove
from methods import Block, Ctx, tc_config, torch_save_durable
from workload import state_equal

import torchckpt as tc

__all__ = ["describe_many_small", "many_small_blocks"]


class SmallTorch(Block):
    key = "many_small_torch"
    label = "many small: torch.save / torch.load"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        n = ctx.nbytes
        self.save = b.row("ms_torch_save", "many small: torch.save + fsync", "peer", "save", n, state="many_small")
        self.load = b.row("ms_torch_load", "many small: torch.load, warm", "peer", "load", n, state="many_small")

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        f = b.path("ms.pt")
        b.measure(self.save, lambda: torch_save_durable(ctx.sd, f), before=b.sync, fresh_bytes=ctx.nbytes)
        out = b.measure(self.load, lambda: torch.load(f, weights_only=True), fresh_bytes=ctx.nbytes)
        if verify:
            b.check(self.load.key, state_equal(out, ctx.sd))
        del out
        remove(f)


class SmallTorchckpt(Block):
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.key = f"many_small_tc_{fmt}"
        self.label = f"many small: torchckpt {fmt}"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        n, f = ctx.nbytes, self.fmt
        self.ck = tc.make_sync_checkpointer(tc_config(f))
        self.save = b.row(f"ms_tc_{f}_save", f"many small: torchckpt save, {f}", "torchckpt", "save", n,
                          state="many_small")  # fmt: skip
        self.load = b.row(f"ms_tc_{f}_load", f"many small: torchckpt load {f}, fresh, warm", "torchckpt", "load", n,
                          state="many_small")  # fmt: skip
        self.load_inplace = b.row(f"ms_tc_{f}_load_inplace", f"many small: torchckpt load {f} into preallocated, warm",
                                  "torchckpt", "load", n, state="many_small")  # fmt: skip

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        p = b.path(f"ms-{self.fmt}")
        b.measure(self.save, lambda: self.ck.save(p, ctx.sd), before=b.sync, fresh_bytes=ctx.nbytes)
        out = b.measure(self.load, lambda: self.ck.load(p), fresh_bytes=ctx.nbytes)
        if verify:
            b.check(self.load.key, state_equal(out, ctx.sd))
        del out
        ctx.zero_dst()
        b.measure(self.load_inplace, lambda: self.ck.load(p, ctx.dst))
        if verify:
            b.check(self.load_inplace.key, state_equal(ctx.dst, ctx.sd))
        remove(p)

    def teardown(self) -> None:
        self.ck.close()


def many_small_blocks() -> list[Block]:
    return [SmallTorch(), SmallTorchckpt("native"), SmallTorchckpt("torch_save")]


def describe_many_small(sd: Any) -> str:
    n_t = len(sd["tensors"])
    n_v = len(sd["values"])
    size = next(iter(sd["tensors"].values())).numel() * 4 if n_t else 0
    return f"{n_t:,} fp32 tensors of {size} bytes and {n_v:,} plain values (ints, floats, strings)"
