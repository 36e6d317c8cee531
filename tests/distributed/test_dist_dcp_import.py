"""import-dcp of a checkpoint that ``dcp.save`` wrote from 2 FSDP2 gloo ranks: the full tensors come back."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from ckpt_testutil import assert_state_equal
from dist_util import launch, values

import torchckpt as tc
from torchckpt.dcp_import import import_dcp

pytestmark = pytest.mark.timeout(240)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 7 and 3 rows over 2 ranks: uneven shards (4 + 3, 2 + 1).
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _fsdp_save(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Shard a seeded model with FSDP2, take one AdamW step, ``dcp.save`` it; return the full state gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (world_size,))
    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.manual_seed(1 + rank)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

    def full(v: Any) -> Any:
        if hasattr(v, "full_tensor"):
            return v.full_tensor().clone()
        if isinstance(v, dict):
            return {k: full(x) for k, x in v.items()}
        if isinstance(v, list):
            return [full(x) for x in v]
        return v.clone() if isinstance(v, torch.Tensor) else v

    return {"model": full(msd), "optim": full(osd), "shard_rows": msd["0.weight"].to_local().shape[0]}


def test_fsdp2_dcp_checkpoint_imports_as_full_tensors(tmp_path: Any) -> None:
    src, dst = str(tmp_path / "dcp"), str(tmp_path / "out")
    got = values(launch(_fsdp_save, 2, src))
    assert [got[r]["shard_rows"] for r in (0, 1)] == [4, 3]
    expected = got[0]
    assert_state_equal(got[1]["model"], expected["model"])  # what every rank gathered is one state
    assert sorted(os.listdir(src)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    summary = import_dcp(src, dst)
    loaded = tc.make_sync_checkpointer().load(dst)

    assert_state_equal(loaded["model"], expected["model"])
    # DCP writes a replicated value (each "step") once, so its keys come in another order: compare sorted.
    assert_state_equal(_sorted(loaded["optim"]["state"]), _sorted(expected["optim"]["state"]))
    groups = expected["optim"]["param_groups"]
    assert [g["params"] for g in loaded["optim"]["param_groups"]] == [g["params"] for g in groups]
    assert [g["lr"] for g in loaded["optim"]["param_groups"]] == [g["lr"] for g in groups]
    assert loaded["model"]["0.weight"].shape == _model()[0].weight.shape  # the unsharded shape
    assert (summary.source_ranks, summary.files) == (2, 2)
    n_tensors = 4 + 4 * 3  # 4 parameters; exp_avg, exp_avg_sq, step of each
    assert summary.tensors == n_tensors
    assert summary.chunks == 4 * 2 + 8 * 2 + 4  # sharded: one chunk per rank; steps: one (replicated)



def _sorted(d: Any) -> Any:
    return {k: _sorted(d[k]) for k in sorted(d)} if isinstance(d, dict) else d


def _dcp_save_2d(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """``dcp.save`` from a 2 x 2 (dp, tp) mesh: FSDP2 over tensor parallel (``_StridedShard``) and plain 2-D shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 7))
    expected = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    msd = model.state_dict()
    g = torch.Generator().manual_seed(5)
    grid, rep = torch.randn(9, 6, generator=g), torch.randn(5, 3, generator=g)  # uneven over 2 x 2
    state = {
        "model": msd,
        "grid": distribute_tensor(grid, mesh, [Shard(0), Shard(1)]),
        "rep": distribute_tensor(rep, mesh, [Replicate(), Shard(0)]),
    }
    expected.update(grid=grid, rep=rep)
    dcp.save(state, checkpoint_id=path)
    placements = sorted({type(p).__name__ for v in msd.values() for p in v.placements})
    return {"expected": expected, "placements": placements}


@pytest.mark.timeout(300)
def test_a_2d_dcp_checkpoint_with_strided_shards_imports_as_full_tensors(tmp_path: Any) -> None:
    src, dst = str(tmp_path / "dcp"), str(tmp_path / "out")
    got = values(launch(_dcp_save_2d, 4, src))
    assert "_StridedShard" in got[0]["placements"], got[0]["placements"]
    expected = got[0]["expected"]

    summary = import_dcp(src, dst)
    ck = tc.make_sync_checkpointer()
    loaded = ck.load(dst)
    ck.close()

    flat = {f"model.{k}": v for k, v in loaded["model"].items()} | {k: loaded[k] for k in ("grid", "rep")}
    assert sorted(flat) == sorted(expected)
    for k, v in expected.items():
        assert flat[k].shape == v.shape and torch.equal(flat[k], v), k
    assert (summary.source_ranks, summary.files) == (4, 4)
    assert summary.tensors == len(expected)
