"""FSDP2 (fully_shard) training saved with the manager and resumed: same layout bit-identical, another world size close."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_util import launch, values

import torchckpt as tc

GLOBAL_BATCH = 8
STEPS_BEFORE, STEPS_AFTER = 3, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def _sharded(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, world: int) -> None:
    rank = dist.get_rank() if world > 1 else 0
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = _batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = torch.nn.functional.mse_loss(model(x), y) * per / GLOBAL_BATCH * world
        loss.backward()
        opt.step()
        opt.zero_grad()


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def train_and_save(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    model, opt = _sharded(world)
    _train(model, opt, range(STEPS_BEFORE), world)
    with tc.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(STEPS_BEFORE, {"model": model, "optim": opt})
    _train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), world)
    return _full_params(model)


def resume(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    model, opt = _sharded(world)
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).zero_()
    with tc.CheckpointManager(root, async_save=False) as mgr:
        step, _ = mgr.load({"model": model, "optim": opt})
    assert step == STEPS_BEFORE
    _train(model, opt, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), world)
    return _full_params(model)


@pytest.mark.timeout(300)
def test_fsdp2_resumes_bit_identically_at_the_same_layout(tmp_path) -> None:
    root = str(tmp_path / "run")
    expected = values(launch(train_and_save, 2, root))[0]
    got = values(launch(resume, 2, root))
    for r in (0, 1):
        for k in expected:
            assert torch.equal(got[r][k], expected[k]), (r, k)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("resume_world", [1, 4])
def test_fsdp2_resumes_on_another_world_size(tmp_path, resume_world: int) -> None:
    root = str(tmp_path / "run")
    expected = values(launch(train_and_save, 2, root))[0]
    got = values(launch(resume, resume_world, root))
    for r in range(resume_world):
        for k in expected:
            torch.testing.assert_close(got[r][k], expected[k], rtol=1e-5, atol=1e-6)
    # and the optimizer's state came back: training from a zeroed optimizer would differ
    assert any(not torch.equal(expected[k], _model().state_dict()[k]) for k in expected)
