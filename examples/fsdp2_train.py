"""FSDP2 training on the CPU (gloo) with checkpoints that resume on any number of ranks.

Run it with torchrun, then again with another number of ranks::

    torchrun --nproc_per_node 2 examples/fsdp2_train.py --root /tmp/fsdp2-run --steps 20
    torchrun --nproc_per_node 3 examples/fsdp2_train.py --root /tmp/fsdp2-run --steps 40

The second run resumes from step 20, its model and AdamW state resharded from
2 ranks to 3, and trains on with the same global batch. Every rank writes only
its own shards; the checkpoint holds each element once.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchckpt as tc

GLOBAL_BATCH = 24


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 8, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory of the run's checkpoints")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--every", type=int, default=5, help="save every this many steps")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the global batch {GLOBAL_BATCH} must divide among {world} ranks")
    model, opt = build(world)
    state = {"model": model, "optim": opt}
    with tc.CheckpointManager(args.root, keep=tc.KeepLast(2)) as mgr:
        start = 0
        if mgr.latest_step() is not None:
            start, _ = mgr.load(state)
            if rank == 0:
                print(f"resumed from step {start} on {world} ranks")
        for step in range(start, args.steps):
            x, y = batch(step, rank, world)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if (step + 1) % args.every == 0:
                mgr.save(step + 1, state, metrics={"loss": loss.item()})
                if rank == 0:
                    print(f"step {step + 1}: loss {loss.item():.4f}, saved")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
