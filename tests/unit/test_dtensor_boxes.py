"""A walk's cache of mesh facts and boxes (``plan/dtensor.Meshes``): the same boxes, and every check still made.

Run in a child process: it needs a (fake) process group of 4 ranks, which must not outlive the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, Replicate
    from torchckpt.errors import UnsafeObjectError
    from torchckpt.plan.dtensor import Meshes, ReplicaChooser, local_boxes, local_tensor

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2))

    def dt(shape, placements, local_shape):
        return DTensor.from_local(torch.zeros(local_shape), mesh, placements, shape=torch.Size(shape),
                                  stride=torch.empty(shape).stride(), run_check=False)

    out = {}
    meshes = Meshes()
    a = dt((10, 6), [Shard(0), Shard(1)], (5, 3))
    b = dt((10, 6), [Shard(0), Shard(1)], (5, 3))
    boxes = [(x.local_start, x.offsets, x.sizes) for x in local_boxes(a, "a", meshes=meshes)]
    again = [(x.local_start, x.offsets, x.sizes) for x in local_boxes(b, "b", meshes=meshes)]
    fresh = [(x.local_start, x.offsets, x.sizes) for x in local_boxes(b, "b")]
    out["boxes"], out["again"], out["fresh"] = boxes, again, fresh
    out["cached"] = len(meshes.boxes)
    out["shape"], out["coordinate"] = meshes.shape(mesh), meshes.coordinate(mesh)
    out["ranks"] = meshes.ranks(mesh)
    out["same_local"] = local_tensor(a).data_ptr() == a.to_local().data_ptr()
    wrong = dt((10, 6), [Shard(0), Shard(1)], (4, 3))  # same grid, a local tensor of the wrong shape
    try:
        local_boxes(wrong, "w", meshes=meshes)
        out["error"] = None
    except UnsafeObjectError as e:
        out["error"] = str(e)
    uneven = dt((9, 6), [Shard(0), Replicate()], (4, 6))  # rows 5..8 on mesh row 1
    out["uneven"] = [(x.offsets, x.sizes) for x in local_boxes(uneven, "u", meshes=meshes)]
    chooser = ReplicaChooser(meshes)
    out["choices"] = [chooser.choose(uneven) for _ in range(3)]
    # One layout per (mesh, placements), each with its own replica position; a Partial is refused every time.
    from torch.distributed.tensor import Partial
    layouts = [meshes.layout(dt((10, 6), p, s), "k") for p, s in (
        ([Shard(0), Shard(1)], (5, 3)), ([Shard(0), Replicate()], (5, 6)), ([Replicate(), Replicate()], (10, 6)),
        ([Shard(0), Replicate()], (5, 6)))]
    out["layouts"] = [(l.regular, l.position, l.count) for l in layouts]
    out["layout_reused"] = layouts[1] is layouts[3]
    partial = dt((10, 6), [Shard(0), Partial()], (5, 6))
    out["partial"] = []
    for key in ("p1", "p2"):
        try:
            meshes.layout(partial, key)
        except UnsafeObjectError as e:
            out["partial"].append(str(e).split(":")[0])
    print(json.dumps(out))
    dist.destroy_process_group()
    """
)


def test_cached_boxes_equal_fresh_ones_and_a_wrong_local_shape_still_fails() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath("src"), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["boxes"] == out["again"] == out["fresh"] == [[[0, 0], [5, 3], [5, 3]]]
    assert out["cached"] == 1
    assert (out["shape"], out["coordinate"], out["ranks"]) == ([2, 2], [1, 1], [0, 1, 2, 3])
    assert out["same_local"] is True
    assert out["error"] == (
        "cannot save the DTensor at key 'w': its local tensor is [4, 3] but its placements "
        "[Shard(dim=0), Shard(dim=1)] give [5, 3]"
    )
    assert out["uneven"] == [[[5, 0], [4, 6]]]
    # Two replicas (mesh dim 1) of each shard: writes alternate by bytes, the same on every rank.
    assert out["choices"] == [[0, False], [1, True], [0, False]]
    # Rank 3 sits at (1, 1) of the 2 x 2 mesh: its position among replicas counts the Replicate dimensions.
    assert out["layouts"] == [
        [[["S", 0], ["S", 1]], 0, 1],
        [[["S", 0], ["R", -1]], 1, 2],
        [[["R", -1], ["R", -1]], 3, 4],
        [[["S", 0], ["R", -1]], 1, 2],
    ]
    assert out["layout_reused"] is True
    assert out["partial"] == ["cannot save the DTensor at key 'p1'", "cannot save the DTensor at key 'p2'"]
