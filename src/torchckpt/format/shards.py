"""Sharded tensors in a checkpoint: the chunks each rank wrote, and the index of all of them.

A rank that saves a ``DTensor`` lists it in its manifest entry as a
:class:`ShardedEntry`: the tensor's name (its key path, the same on every
rank), dtype and global shape, and the chunks of it this rank wrote — each a
tensor of the rank's tensor table and its offsets in the global tensor (its
sizes are that tensor's shape). A rank holding a replica another rank writes
lists the tensor with no chunks. The rank's tree refers to the entry with a
``{"DT": j}`` node.

:func:`build_index` joins the entries of every rank into one
:class:`GlobalTensor` per name and checks that its chunks tile it (see
``plan/boxes.py``): the check of the commit and of every load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..plan.boxes import Box, tiling_problem

__all__ = ["ChunkEntry", "GlobalTensor", "SavedChunk", "ShardedEntry", "ShardingError", "build_index"]


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk a rank wrote: tensor ``tensor`` of its table, at ``offsets`` in the global tensor."""

    tensor: int
    offsets: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"T": self.tensor, "offsets": list(self.offsets)}


@dataclass(frozen=True)
class ShardedEntry:
    """A sharded tensor as one rank saw it: its global form and the chunks this rank wrote."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "chunks": [c.to_json() for c in self.chunks],
        }


@dataclass(frozen=True)
class SavedChunk:
    """A chunk of a global tensor: which rank's file holds it, which tensor of that rank's table, and its box."""

    rank: int
    tensor: int
    box: Box


@dataclass
class GlobalTensor:
    """A sharded tensor of the checkpoint: dtype, global shape and every chunk (they tile it)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[SavedChunk] = field(default_factory=list)


class ShardingError(ValueError):
    """The ranks' sharded tensors do not fit together (raised by :func:`build_index`).

    Attributes:
        key: The name (key path) of the sharded tensor at fault.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def build_index(ranks: Sequence[Any]) -> dict[str, GlobalTensor]:
    """The global tensors of a checkpoint, from its rank entries (each with ``rank``, ``sharded``, ``tensors``).

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
                g.chunks.append(SavedChunk(entry.rank, c.tensor, (c.offsets, tuple(entry.tensors[c.tensor].shape))))
    for g in index.values():
        problem = tiling_problem(g.shape, [c.box for c in g.chunks])
        if problem is not None:
            raise ShardingError(f"the chunks of sharded tensor {g.name!r} {list(g.shape)} do not tile it: {problem}", g.name)
    return index
