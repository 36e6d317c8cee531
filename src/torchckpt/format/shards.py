"""Sharded tensors in a checkpoint: the chunks each rank wrote, and the index of all of them.

A rank that saves a ``DTensor`` lists it in its entry as a
:class:`ShardedEntry`: the tensor's name (its key path, the same on every
rank), dtype and global shape, the chunks of it this rank wrote (each a tensor
of the rank's tensor table and its offsets in the global tensor; its sizes are
that tensor's shape), and how the whole tensor is laid out, the same on every
rank that holds it:

- a :class:`Grid` (``Shard``/``Replicate`` placements over a device mesh, and
  which replica writes): where every chunk lies and which rank wrote it are
  arithmetic (``plan/grid.py``), so the checkpoint's global table holds one
  line per tensor whatever the number of ranks;
- a ``writer`` (a replicated plain tensor written once, by that rank);
- neither (``_StridedShard``): every rank's chunks are listed in the global table.

The rank's tree refers to the entry with a ``{"DT": j}`` node.

:class:`GlobalTensor` is a sharded tensor of the checkpoint as a loader sees
it: :meth:`GlobalTensor.overlapping` gives the chunks that overlap a box and
the ranks that hold them. :func:`build_index` joins the entries of a version 1
manifest (chunks listed by every rank) and checks that the chunks tile each
tensor (see ``plan/boxes.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..plan.boxes import Box, intersect, tiling_problem
from ..plan.grid import Placement, grid_overlaps, mesh_index, replica_count, writer_coordinate

__all__ = [
    "ChunkEntry",
    "GlobalTensor",
    "Grid",
    "MeshTable",
    "SavedChunk",
    "ShardedEntry",
    "ShardingError",
    "build_index",
    "placement_names",
]


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk a rank wrote: tensor ``tensor`` of its table, at ``offsets`` in the global tensor."""

    tensor: int
    offsets: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"T": self.tensor, "offsets": list(self.offsets)}


@dataclass(frozen=True)
class Grid:
    """A regular sharding: placements over a device mesh, and the replica position that writes each shard.

    Attributes:
        mesh_shape: The device mesh's shape.
        mesh_ranks: The global rank at each mesh coordinate, row-major.
        placements: Per mesh dimension, ``("S", tensor dim)`` or ``("R", -1)``.
        replica: Which of the ranks holding a shard wrote it (``plan/grid.writer_coordinate``).
    """

    mesh_shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]
    placements: tuple[Placement, ...]
    replica: int

    def to_json(self, meshes: MeshTable) -> dict[str, Any]:
        return {
            "mesh": meshes.add(self.mesh_shape, self.mesh_ranks),
            "placements": placement_names(self.placements),
            "replica": self.replica,
        }

    def chunks(self, shape: Sequence[int], want: Box) -> list[SavedChunk]:
        """The chunks of a tensor of ``shape`` laid out on this grid that overlap ``want``, with their writers."""
        out = []
        for shard, box in grid_overlaps(shape, self.mesh_shape, self.placements, want):
            coordinate = writer_coordinate(self.mesh_shape, self.placements, shard, self.replica)
            out.append(SavedChunk(self.mesh_ranks[mesh_index(self.mesh_shape, coordinate)], box))
        return out

    @property
    def replicas(self) -> int:
        return replica_count(self.mesh_shape, self.placements)


def placement_names(placements: Sequence[Placement]) -> list[str]:
    """``["S0", "R"]``: the placements as the format writes them."""
    return [f"S{d}" if kind == "S" else "R" for kind, d in placements]


class MeshTable:
    """The distinct device meshes of a document (each written once, referred to by position)."""

    def __init__(self) -> None:
        self._index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

    def add(self, shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
        key = (shape, ranks)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = len(self._index)
        return found

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for shape, ranks in self._index:
            n = len(ranks)
            step = ranks[1] - ranks[0] if n > 1 else 1
            regular = n > 0 and step > 0 and all(ranks[i] == ranks[0] + i * step for i in range(n))
            listed: Any = {"start": ranks[0], "step": step} if regular else list(ranks)
            out.append({"shape": list(shape), "ranks": listed})
        return out

    def __bool__(self) -> bool:
        return bool(self._index)


@dataclass(frozen=True)
class ShardedEntry:
    """A sharded tensor as one rank saw it: its global form, its layout and the chunks this rank wrote.

    ``grid`` or ``writer`` (at most one) say where every chunk is; with
    neither, each rank's chunks are listed in the checkpoint's global table.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...] = ()
    grid: Grid | None = None
    writer: int | None = None

    def to_json(self, meshes: MeshTable) -> dict[str, Any]:
        out = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.grid is not None:
            out["grid"] = self.grid.to_json(meshes)
        elif self.writer is not None:
            out["writer"] = self.writer
        return out

    @property
    def listed(self) -> bool:
        """Whether each rank's chunks of it must be listed (no grid, no single writer)."""
        return self.grid is None and self.writer is None


@dataclass(frozen=True)
class SavedChunk:
    """A chunk of a global tensor: which rank's file holds it, and its box.

    ``tensor``: the rank's ``TensorEntry`` of it when already known (a plain
    tensor loaded as a global one); else the loader finds it in the rank's
    entry by the tensor's name and the chunk's offsets.
    """

    rank: int
    box: Box
    tensor: Any = None


@dataclass
class GlobalTensor:
    """A sharded tensor of the checkpoint: dtype, global shape, and its chunks (a grid, or listed; they tile it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[SavedChunk] = field(default_factory=list)
    grid: Grid | None = None

    def overlapping(self, want: Box) -> list[SavedChunk]:
        """The chunks that overlap ``want`` (a box of the global tensor), with the ranks that wrote them."""
        if self.grid is not None:
            return self.grid.chunks(self.shape, want)
        return [c for c in self.chunks if intersect(want, c.box) is not None]

    def all_chunks(self) -> list[SavedChunk]:
        """Every chunk (for a grid: one per shard, found arithmetically)."""
        if self.grid is None:
            return list(self.chunks)
        if math.prod(self.shape) == 0:
            return []
        return self.grid.chunks(self.shape, ((0,) * len(self.shape), self.shape))


class ShardingError(ValueError):
    """The ranks' sharded tensors do not fit together (raised by :func:`build_index`).

    Attributes:
        key: The name (key path) of the sharded tensor at fault.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def build_index(ranks: Sequence[Any]) -> dict[str, GlobalTensor]:
    """The global tensors of a version 1 checkpoint, from its rank entries (``rank``, ``sharded``, ``tensors``).

    Raises:
        ShardingError: Ranks disagree on a tensor's dtype or shape, or its chunks do
            not tile it (a gap, an overlap, a chunk out of bounds): names the tensor.
    """
    index: dict[str, GlobalTensor] = {}
    for entry in ranks:
        for s in entry.sharded:
            g = index.get(s.name)
            if g is None:
                g = index[s.name] = GlobalTensor(s.name, s.dtype, s.shape)
            elif (g.dtype, g.shape) != (s.dtype, s.shape):
                raise ShardingError(
                    f"sharded tensor {s.name!r}: rank {entry.rank} saved it as {s.dtype} {list(s.shape)}, "
                    f"another rank as {g.dtype} {list(g.shape)}",
                    s.name,
                )
            for c in s.chunks:
                g.chunks.append(SavedChunk(entry.rank, (c.offsets, tuple(entry.tensors[c.tensor].shape))))
    for g in index.values():
        problem = tiling_problem(g.shape, [c.box for c in g.chunks])
        if problem is not None:
            raise ShardingError(f"the chunks of sharded tensor {g.name!r} {list(g.shape)} do not tile it: {problem}", g.name)
    return index
