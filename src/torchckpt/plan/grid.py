"""Regular shardings as arithmetic: where each rank's shard of a tensor lies, found without a list of chunks.

A *grid* is how a ``DTensor`` with ``Shard``/``Replicate`` placements is
laid over its device mesh: the mesh's shape and, per mesh dimension, a
placement (``("S", d)``: split tensor dimension ``d`` across this mesh
dimension; ``("R", -1)``: replicate). Mesh dimensions split the tensor from
left to right, each in torch's way (``torch.chunk``: pieces of
``ceil(n / parts)``, the last ones smaller or empty), so the shard of a mesh
coordinate is one box, and the boxes of all coordinates that differ along a
sharded dimension tile the tensor.

This module answers, with no list of chunks and no process group:

- :func:`grid_box`: the box of one mesh coordinate (what a rank holds);
- :func:`grid_overlaps`: the shard coordinates (mesh dimensions that split,
  in order) whose boxes overlap a wanted box, and those boxes — work
  proportional to the number of overlaps, not to the mesh's size;
- :func:`writer_coordinate`: the mesh coordinate of the replica that writes a
  shard, given the replica position chosen at save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .boxes import Box

__all__ = ["Placement", "grid_box", "grid_overlaps", "mesh_index", "replica_count", "writer_coordinate"]

#: ``("S", tensor dim)`` or ``("R", -1)``.
Placement = tuple[str, int]


def _piece(length: int, parts: int, k: int) -> tuple[int, int]:
    """``(start, size)`` of piece ``k`` of ``length`` cut into ``parts`` as ``torch.chunk`` does (size may be 0)."""
    step = -(-length // parts) if parts else 0
    start = min(length, k * step)
    return start, max(0, min(length, start + step) - start)


def grid_box(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement], coordinate: Sequence[int]
) -> Box:
    """The box of the tensor held at mesh ``coordinate`` (a size of 0 when that shard is empty)."""
    offsets = [0] * len(shape)
    sizes = list(shape)
    for mesh_dim, (kind, dim) in enumerate(placements):
        if kind != "S":
            continue
        start, size = _piece(sizes[dim], mesh_shape[mesh_dim], coordinate[mesh_dim])
        offsets[dim] += start
        sizes[dim] = size
    return tuple(offsets), tuple(sizes)


def grid_overlaps(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement], want: Box
) -> list[tuple[tuple[int, ...], Box]]:
    """Each non-empty shard whose box overlaps ``want``: its coordinates along the splitting mesh dimensions, its box.

    The pieces of each splitting mesh dimension that ``want`` reaches are
    found by division, so the work grows with the overlaps found.
    """
    want_lo, want_sizes = want
    if math.prod(want_sizes) == 0:
        return []
    regions: list[tuple[tuple[int, ...], list[int], list[int]]] = [((), [0] * len(shape), list(shape))]
    for mesh_dim, (kind, dim) in enumerate(placements):
        if kind != "S":
            continue
        parts = mesh_shape[mesh_dim]
        lo, hi = want_lo[dim], want_lo[dim] + want_sizes[dim]
        found = []
        for coord, offsets, sizes in regions:
            length, base = sizes[dim], offsets[dim]
            step = -(-length // parts)
            if step == 0 or max(lo, base) >= min(hi, base + length):
                continue
            first = max(0, (max(lo, base) - base) // step)
            last = min(parts - 1, (min(hi, base + length) - 1 - base) // step)
            for k in range(first, last + 1):
                start, size = _piece(length, parts, k)
                if size == 0:
                    continue
                o, s = list(offsets), list(sizes)
                o[dim], s[dim] = base + start, size
                found.append((coord + (k,), o, s))
        regions = found
    out = []
    for coord, offsets, sizes in regions:
        if math.prod(sizes) and all(
            o < wl + ws and wl < o + s for o, s, wl, ws in zip(offsets, sizes, want_lo, want_sizes)
        ):
            out.append((coord, (tuple(offsets), tuple(sizes))))
    return out


def replica_count(mesh_shape: Sequence[int], placements: Sequence[Placement]) -> int:
    """How many ranks hold each shard: the product of the replicating mesh dimensions' sizes."""
    return math.prod(n for n, (kind, _) in zip(mesh_shape, placements) if kind != "S")


def writer_coordinate(
    mesh_shape: Sequence[int], placements: Sequence[Placement], shard: Sequence[int], replica: int
) -> tuple[int, ...]:
    """The mesh coordinate of replica ``replica`` of the shard at ``shard`` (coordinates along splitting dims).

    Replica positions count the replicating mesh dimensions in mixed radix,
    the last one fastest (as ``plan/dtensor.py`` numbers them at save).
    """
    coordinate = [0] * len(mesh_shape)
    it = iter(shard)
    for mesh_dim, (kind, _) in enumerate(placements):
        if kind == "S":
            coordinate[mesh_dim] = next(it)
    for mesh_dim in range(len(mesh_shape) - 1, -1, -1):
        if placements[mesh_dim][0] != "S":
            replica, coordinate[mesh_dim] = divmod(replica, mesh_shape[mesh_dim])
    return tuple(coordinate)


def mesh_index(mesh_shape: Sequence[int], coordinate: Sequence[int]) -> int:
    """The row-major position of ``coordinate`` in a mesh of ``mesh_shape``."""
    index = 0
    for n, c in zip(mesh_shape, coordinate):
        index = index * n + c
    return index
