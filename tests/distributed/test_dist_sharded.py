"""DTensor state (Shard, Replicate, _StridedShard; 1-D and 2-D meshes) saved once and loaded on any layout."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_util import launch, values

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest

SHAPES = {"a": (10, 6), "b": (7,), "c": (3, 5, 4), "e": (1, 8)}  # uneven and empty shards among them


def full(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The global value of tensor ``name`` (the same on every rank)."""
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g).to(dtype)


def _native(world: int) -> Any:
    cfg = tc.CheckpointWriterConfig(format=tc.CheckpointFormat.SAFETENSORS, write_barrier_timeout_secs=60)
    return tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=cfg))


def _mesh(shape: tuple[int, ...]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp", "tp")[: len(shape)]
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _placements(kind: str, ndim: int) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    if kind == "rows":
        return [Shard(0)]
    if kind == "cols":
        return [Shard(ndim - 1)]
    if kind == "replicate":
        return [Replicate()]
    if kind == "dp_tp":  # 2-D: rows over dp, columns over tp
        return [Shard(0), Shard(ndim - 1)]
    if kind == "rep_tp":  # 2-D: replicated over dp, rows over tp
        return [Replicate(), Shard(0)]
    raise ValueError(kind)


def distributed_state(mesh: Any, kind: str) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, Any] = {"step": 3}
    for name, shape in SHAPES.items():
        out[name] = distribute_tensor(full(name), mesh, _placements(kind, len(shape)))
    return out


def save_and_reload(rank: int, world: int, root: str, mesh_shape: tuple[int, ...], kind: str, load_kind: str) -> dict[str, Any]:
    mesh = _mesh(mesh_shape)
    ck = _native(world)
    path = os.path.join(root, "ckpt")
    ck.save(path, {"model": distributed_state(mesh, kind)})
    template = {"model": distributed_state(mesh, load_kind)}
    for v in template["model"].values():
        if isinstance(v, torch.Tensor):
            v.to_local().zero_()
    loaded = ck.load(path, template)
    got = {k: v.full_tensor() for k, v in loaded["model"].items() if isinstance(v, torch.Tensor)}
    ck.close()
    return {"got": got, "step": loaded["model"]["step"]}


CASES = [
    ((2,), "rows", "rows"),
    ((2,), "rows", "cols"),
    ((2,), "replicate", "rows"),
    ((4,), "rows", "cols"),
    ((2, 2), "dp_tp", "rep_tp"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mesh_shape,kind,load_kind", CASES)
def test_dtensor_round_trip_and_reshard_on_the_same_ranks(tmp_path, mesh_shape, kind, load_kind) -> None:
    world = 1
    for d in mesh_shape:
        world *= d
    out = values(launch(save_and_reload, world, str(tmp_path), mesh_shape, kind, load_kind))
    for r in range(world):
        assert out[r]["step"] == 3
        for name in SHAPES:
            assert torch.equal(out[r]["got"][name], full(name)), (r, name)
    manifest = read_manifest(str(tmp_path / "ckpt"))
    for name, shape in SHAPES.items():
        g = manifest.sharded[f"model.{name}"]
        assert g.shape == shape
    # Each element is written once: the rank files hold exactly the global bytes (and the step, none).
    written = sum(t.nbytes for r in manifest.ranks for t in r.tensors)
    assert written == sum(full(n).nbytes for n in SHAPES)


def test_full_tensors_assemble_in_one_process(tmp_path) -> None:
    launch(_save_rows, 2, str(tmp_path))
    ck = tc.make_sync_checkpointer()
    loaded = ck.load(str(tmp_path / "ckpt"))
    for name in SHAPES:
        assert torch.equal(loaded["model"][name], full(name))
    template = {"model": {name: torch.zeros(SHAPES[name]) for name in SHAPES}}
    ck.load(str(tmp_path / "ckpt"), template)
    for name in SHAPES:
        assert torch.equal(template["model"][name], full(name))
    ck.close()


def _save_rows(rank: int, world: int, root: str) -> None:
    mesh = _mesh((world,))
    ck = _native(world)
    ck.save(os.path.join(root, "ckpt"), {"model": distributed_state(mesh, "rows")})
    ck.close()


def _load_rows(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    mesh = _mesh((world,))
    template = {"model": distributed_state(mesh, "cols")}
    ck = _native(world)
    ck.load(os.path.join(root, "ckpt"), template)
    ck.close()
    return {k: v.full_tensor() for k, v in template["model"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("load_world", [1, 3])
def test_four_ranks_reshard_to_another_world_size(tmp_path, load_world) -> None:
    launch(_save_rows, 4, str(tmp_path))
    out = values(launch(_load_rows, load_world, str(tmp_path)))
    for r in range(load_world):
        for name in SHAPES:
            assert torch.equal(out[r][name], full(name)), (r, name)
