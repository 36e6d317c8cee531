"""DTensor state (Shard, Replicate, _StridedShard; 1-D and 2-D meshes) saved once and loaded on any layout."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_util import launch, rank_entries, values

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
        # Shard/Replicate placements: one line of the global table (a grid), no chunk listed.
        assert g.grid is not None and g.chunks == [] and g.grid.mesh_shape == mesh_shape
    # The manifest holds one line per rank; each rank's tensor table is in its index object.
    assert all(r.index is not None and r.tensors == () for r in manifest.ranks)
    # Each element is written once: the rank files hold exactly the global bytes (and the step, none).
    written = sum(t.nbytes for r in rank_entries(str(tmp_path / "ckpt")) for t in r.tensors)
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
    mesh = _mesh((2, 2)) if world == 4 else _mesh((world,))
    template = {"model": distributed_state(mesh, "dp_tp" if world == 4 else "cols")}
    ck = _native(world)
    ck.load(os.path.join(root, "ckpt"), template)
    ck.close()
    return {k: v.full_tensor() for k, v in template["model"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("load_world", [1, 2, 3, 4])
def test_four_ranks_reshard_to_another_world_size(tmp_path, load_world) -> None:
    # 1-D rows on 4 ranks -> columns on 1, 2 and 3 (uneven) ranks, and -> a 2-D (2 x 2) mesh
    launch(_save_rows, 4, str(tmp_path))
    out = values(launch(_load_rows, load_world, str(tmp_path)))
    for r in range(load_world):
        for name in SHAPES:
            assert torch.equal(out[r][name], full(name)), (r, name)


def async_save_and_reload(rank: int, world: int, root: str) -> dict[str, torch.Tensor]:
    mesh = _mesh((world,))
    cfg = tc.CheckpointWriterConfig(format=tc.CheckpointFormat.SAFETENSORS, write_barrier_timeout_secs=60)
    ck = tc.make_async_checkpointer(tc.CheckpointerConfig(writer_config=cfg))
    try:
        path = os.path.join(root, "ckpt")
        state = {"model": distributed_state(mesh, "rows")}
        futures = ck.save(path, state)
        futures[1].result(timeout=120)
        template = {"model": distributed_state(mesh, "cols")}
        for v in template["model"].values():
            if isinstance(v, torch.Tensor):
                v.to_local().zero_()
        ck.load(path, template)
        return {k: v.full_tensor() for k, v in template["model"].items() if isinstance(v, torch.Tensor)}
    finally:
        ck.close()


@pytest.mark.timeout(300)
def test_async_save_of_dtensors(tmp_path) -> None:
    out = values(launch(async_save_and_reload, 2, str(tmp_path)))
    for r in (0, 1):
        for name in SHAPES:
            assert torch.equal(out[r][name], full(name)), (r, name)


def fsdp_over_tp(rank: int, world: int, root: str) -> dict[str, Any]:
    """FSDP2 over tensor parallel on a 2x2 mesh: parameters with _StridedShard placements."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh((2, 2))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8))
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    sd = model.state_dict()
    placements = {k: [type(p).__name__ for p in v.placements] for k, v in sd.items()}
    ck = _native(world)
    path = os.path.join(root, "ckpt")
    ck.save(path, {"model": sd})
    ck.close()
    return {"placements": placements, "expected": expected}


@pytest.mark.timeout(300)
def test_fsdp_over_tp_strided_shards_load_anywhere(tmp_path) -> None:
    out = values(launch(fsdp_over_tp, 4, str(tmp_path)))
    assert any("_StridedShard" in p for p in out[0]["placements"].values()), out[0]["placements"]
    ck = tc.make_sync_checkpointer()
    loaded = ck.load(str(tmp_path / "ckpt"))
    ck.close()
    for k, v in out[0]["expected"].items():
        assert torch.equal(loaded["model"][k], v), k
    resharded = values(launch(_load_into_rows, 2, str(tmp_path), out[0]["expected"]))
    assert all(resharded.values())


def _load_into_rows(rank: int, world: int, root: str, expected: dict[str, torch.Tensor]) -> bool:
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh((world,))
    template = {"model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in expected.items()}}
    ck = _native(world)
    ck.load(os.path.join(root, "ckpt"), template)
    ck.close()
    return all(torch.equal(template["model"][k].full_tensor(), v) for k, v in expected.items())


def failing_rank(rank: int, world: int, root: str) -> str:
    mesh = _mesh((world,))
    state = {"model": distributed_state(mesh, "rows")}
    if rank == 1:
        state["bad"] = object()  # refused on rank 1 only (no pickle)
    ck = _native(world)
    try:
        ck.save(os.path.join(root, "ckpt"), state)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return f"{type(e).__name__}: {e}"
    finally:
        ck.close()
    return "saved"


@pytest.mark.timeout(240)
def test_one_rank_failing_fails_the_save_on_every_rank(tmp_path) -> None:
    out = values(launch(failing_rank, 2, str(tmp_path)))
    for r in (0, 1):
        assert out[r].startswith("DistributedCheckpointError"), out[r]
        assert "failed on 1 of 2 ranks, nothing was committed: rank 1: UnsafeObjectError" in out[r], out[r]
        assert "key 'bad'" in out[r], out[r]
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def partial_template(rank: int, world: int, root: str) -> str:
    from torch.distributed.tensor import DTensor, Partial

    mesh = _mesh((world,))
    ck = _native(world)
    path = os.path.join(root, "ckpt")
    ck.save(path, {"model": distributed_state(mesh, "rows")})
    template = {"model": {"a": DTensor.from_local(torch.zeros(SHAPES["a"]), mesh, [Partial()])}}
    try:
        ck.load(path, template)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return f"{type(e).__name__}: {e}"
    finally:
        ck.close()
    return "loaded"


@pytest.mark.timeout(240)
def test_a_template_placement_the_loader_does_not_know_is_refused_naming_the_key(tmp_path) -> None:
    out = values(launch(partial_template, 2, str(tmp_path)))
    for r in (0, 1):
        assert out[r].startswith("UnsafeObjectError: cannot load into the DTensor at key 'model.a': its placement"), out[r]
        assert "Partial" in out[r]
