"""plan/grid.py agrees with torch's own placement rule, and finds exactly the shards overlapping a box."""

from __future__ import annotations

import itertools
import random

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from torchckpt.plan.boxes import intersect
from torchckpt.plan.grid import grid_box, grid_overlaps


@pytest.mark.parametrize("seed", range(3))
def test_grid_boxes_and_overlaps_match_torch(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1000):
        shape = [rng.randint(0, 9) for _ in range(rng.randint(1, 3))]
        mesh = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        placements = [("S", rng.randrange(len(shape))) if rng.random() < 0.7 else ("R", -1) for _ in mesh]
        torch_placements = [Shard(d) if k == "S" else Replicate() for k, d in placements]
        boxes = {}
        for coord in itertools.product(*[range(n) for n in mesh]):
            local, offset = _compute_local_shape_and_global_offset(shape, mesh, list(coord), torch_placements)
            offsets, sizes = grid_box(shape, mesh, placements, coord)
            assert sizes == tuple(local), (shape, mesh, placements, coord)
            if 0 not in local:
                assert offsets == tuple(offset), (shape, mesh, placements, coord)
                boxes[tuple(c for c, (k, _) in zip(coord, placements) if k == "S")] = (offsets, sizes)
        for _ in range(5):
            lo = [rng.randint(0, max(0, s - 1)) for s in shape]
            want = (tuple(lo), tuple(rng.randint(0, s - o) for s, o in zip(shape, lo)))
            found = dict(grid_overlaps(shape, mesh, placements, want))
            assert found == {c: b for c, b in boxes.items() if intersect(want, b) is not None}, (shape, mesh, want)
