"""The tools on a sharded checkpoint saved by 4 gloo ranks: inspect, verify, export to one safetensors file."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from dist_util import launch, values
from safetensors.torch import load_file

import torchckpt as tc
from torchckpt.cli import main

#: Global tensors: rows over dp and columns over tp on a 2 x 2 mesh; "rep" replicated over dp.
SHAPES = {"w": (10, 6), "v": (3, 5), "rep": (7, 4)}


def full(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(SHAPES[name], generator=g)


def _save(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    state: dict[str, Any] = {"step": 7}
    for name in ("w", "v"):
        state[name] = distribute_tensor(full(name), mesh, [Shard(0), Shard(1)])
    state["rep"] = distribute_tensor(full("rep"), mesh, [Replicate(), Shard(0)])
    cfg = tc.CheckpointWriterConfig(format=tc.CheckpointFormat.SAFETENSORS, write_barrier_timeout_secs=60)
    ck = tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=cfg))
    ck.save(os.path.join(root, "ckpt"), {"model": state})
    ck.close()


@pytest.mark.timeout(240)
def test_tools_on_a_checkpoint_of_four_ranks(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    values(launch(_save, 4, str(tmp_path)))
    path = str(tmp_path / "ckpt")

    assert main(["inspect", path, "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert keys["model.w"] == {"type": "sharded tensor", "dtype": "float32", "shape": [10, 6], "bytes": 240,
                               "chunks": 4, "ranks": [0, 1, 2, 3]}  # fmt: skip
    rep = keys["model.rep"]
    assert (rep["shape"], rep["chunks"]) == ([7, 4], 2)  # two row blocks, each written by one of its replicas
    assert keys["model.step"] == {"type": "int", "value": "7"}

    assert main(["verify", path]) == 0
    assert "3 sharded tensor(s) tiled by their chunks" in capsys.readouterr().out

    out = str(tmp_path / "model.safetensors")
    assert main(["export", path, out, "--format", "safetensors", "--strip-prefix", "model."]) == 0
    loaded = load_file(out)
    assert sorted(loaded) == ["rep", "v", "w"]
    for name in SHAPES:
        assert torch.equal(loaded[name], full(name)), name
