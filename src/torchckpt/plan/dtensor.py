"""A ``DTensor`` as the boxes of its local shard, and which of its replicas writes them.

Torch computes where a rank's shard lies in the global tensor
(``torch.distributed.tensor`` placements ``Shard``, ``_StridedShard``,
``Replicate``); here that becomes boxes: a shard along ``Shard`` placements is
one box, one along ``_StridedShard`` placements may be several (a run of
consecutive global indices per box). ``Partial`` placements are refused: their
local tensors are addends, not parts.

Replicas: ranks whose mesh coordinates differ only along ``Replicate``
dimensions hold the same boxes. :class:`ReplicaChooser` picks one of them per
tensor, the same on every rank without a collective, spreading the bytes:
each tensor goes to the replica position that has been given the fewest
bytes so far, the bytes counted as the tensor's global bytes divided by its
number of distinct shards (the same figure on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsafeObjectError
from .grid import Placement, grid_box

__all__ = [
    "Layout",
    "LocalBox",
    "Meshes",
    "ReplicaChooser",
    "grid_placements",
    "is_dtensor",
    "local_boxes",
    "local_tensor",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build of torch without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTENSOR is not None and isinstance(value, _DTENSOR)


@dataclass(frozen=True)
class LocalBox:
    """A box of the global tensor held by this rank's local tensor.

    Attributes:
        local_start: Where the box starts in the local tensor, per dimension.
        offsets: Where it starts in the global tensor.
        sizes: Its size per dimension.
    """

    local_start: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def view(self, local: torch.Tensor) -> torch.Tensor:
        """The part of ``local`` (this rank's local tensor) that is this box."""
        out = local
        for d, (start, size) in enumerate(zip(self.local_start, self.sizes)):
            if start != 0 or size != out.shape[d]:
                out = out.narrow(d, start, size)
        return out


@dataclass(frozen=True)
class Layout:
    """A ``DTensor``'s placements over its mesh, as a walk needs them (the same for every tensor laid out alike).

    Attributes:
        placements: Its placements (checked: no ``Partial``).
        regular: The placements as ``plan/grid.py`` takes them, None when one is a ``_StridedShard``.
        position: This rank's position among the ranks holding the same shard (negative: not in the mesh).
        count: How many ranks hold each shard.
    """

    placements: tuple[Any, ...]
    regular: tuple[Placement, ...] | None
    position: int
    count: int


def _placements(dt: Any, key: str, action: str) -> tuple[Any, ...]:
    from torch.distributed.tensor.placement_types import Replicate, Shard

    placements = tuple(dt.placements)
    for p in placements:
        if not isinstance(p, (Replicate, Shard)) and type(p).__name__ != "_StridedShard":
            raise UnsafeObjectError(
                f"cannot {action} the DTensor at key {key or '[root]'!r}: its placement {p} is not supported "
                "(a Partial placement holds addends, not parts: redistribute it to Replicate or Shard first)",
                key=key,
                type_name="torch.distributed.tensor.DTensor",
            )
    return placements


def _global_indices(dt: Any, placements: Sequence[Any]) -> dict[int, list[int]] | None:
    """Per sharded dimension, the global indices of this rank's local tensor (None: no _StridedShard, use offsets)."""
    if not any(type(p).__name__ == "_StridedShard" for p in placements):
        return None
    from torch.distributed.tensor import _utils  # torch's own rule for strided shards

    mesh = dt.device_mesh
    coordinate = mesh.get_coordinate()
    shape = list(dt.shape)
    indices: dict[int, Any] = {}
    for mesh_dim, p in enumerate(placements):
        dim = getattr(p, "dim", None)
        if dim is None:
            continue
        size, index = _utils._get_shard_size_and_offsets(
            shape[dim], mesh.size(mesh_dim), coordinate[mesh_dim], p, indices.get(dim), dt.shape[dim], False
        )
        shape[dim] = size
        indices[dim] = index if size else torch.arange(0)
    return {d: [int(i) for i in idx.tolist()] for d, idx in indices.items()}


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """``(local start, global start, length)`` of each run of consecutive ``indices``."""
    runs: list[tuple[int, int, int]] = []
    for pos, g in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == g:
            local, start, n = runs[-1]
            runs[-1] = (local, start, n + 1)
        else:
            runs.append((pos, g, 1))
    return runs


def grid_placements(placements: Sequence[Any]) -> tuple[Placement, ...] | None:
    """The placements as ``plan/grid.py`` takes them, or None when one is a ``_StridedShard`` (no grid)."""
    out: list[Placement] = []
    for p in placements:
        dim = getattr(p, "dim", None)
        if dim is None:
            out.append(("R", -1))
        elif type(p).__name__ == "_StridedShard":
            return None
        else:
            out.append(("S", int(dim)))
    return tuple(out)


class Meshes:
    """Facts of device meshes, asked of torch once per mesh for one walk of a state.

    A ``DeviceMesh`` recomputes its shape on every access; a walk over a
    thousand ``DTensor``s of one mesh asks for it thousands of times.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]] = {}
        #: Boxes of regular shardings already computed: (mesh id, placements, global shape) -> (local shape, boxes).
        self.boxes: dict[tuple[Any, ...], tuple[tuple[int, ...], list[LocalBox]]] = {}
        self._layouts: dict[tuple[int, tuple[Any, ...]], Layout] = {}

    def layout(self, dt: Any, key: str, action: str = "save") -> Layout:
        """``dt``'s :class:`Layout`, computed once per (mesh, placements).

        Raises:
            UnsafeObjectError: A ``Partial`` placement (names ``key``; never remembered).
        """
        mesh, placements = dt.device_mesh, tuple(dt.placements)
        sizes = self.shape(mesh)  # from here on the cache holds the mesh: its id stays its own
        memo = (id(mesh), placements)
        found = self._layouts.get(memo)
        if found is None:
            from torch.distributed.tensor.placement_types import Replicate

            checked = _placements(dt, key, action)
            coordinate = self.coordinate(mesh) or (-1,) * len(sizes)  # not in the mesh: no replica's position
            position, count = 0, 1
            for mesh_dim, p in enumerate(checked):
                if isinstance(p, Replicate):
                    position = position * sizes[mesh_dim] + coordinate[mesh_dim]
                    count *= sizes[mesh_dim]
            found = self._layouts[memo] = Layout(checked, grid_placements(checked), position, count)
        return found

    def _facts(self, mesh: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]:
        found = self._seen.get(id(mesh))
        if found is None or found[0] is not mesh:  # the mesh is held: its id is not reused meanwhile
            coordinate = mesh.get_coordinate()
            found = self._seen[id(mesh)] = (
                mesh,
                tuple(int(n) for n in mesh.shape),
                tuple(coordinate) if coordinate is not None else (),
                [],
            )
        return found

    def shape(self, mesh: Any) -> tuple[int, ...]:
        """The mesh's shape."""
        return self._facts(mesh)[1]

    def coordinate(self, mesh: Any) -> tuple[int, ...]:
        """This rank's coordinate in the mesh (empty when it is not in it)."""
        return self._facts(mesh)[2]

    def ranks(self, mesh: Any) -> tuple[int, ...]:
        """The mesh's global ranks, row-major."""
        cached = self._facts(mesh)[3]
        if not cached:
            cached.append(tuple(int(r) for r in mesh.mesh.flatten().tolist()))
        return cached[0]


def local_tensor(dt: Any) -> torch.Tensor:
    """``dt``'s local tensor (the one ``to_local()`` returns a view of), without an autograd node per call."""
    local = getattr(dt, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else dt.to_local()


def local_boxes(
    dt: Any,
    key: str,
    *,
    action: str = "save",
    local: torch.Tensor | None = None,
    meshes: Meshes | None = None,
    layout: Layout | None = None,
) -> list[LocalBox]:
    """The boxes of the global tensor that this rank's local tensor of ``dt`` holds (none when it is empty).

    ``action`` names what is done with it in the errors (``"save"``, ``"load into"``);
    ``local``: its local tensor when the caller has it already; ``meshes``: the
    walk's cache of mesh facts; ``layout``: ``meshes.layout(dt, key, action)``
    when the caller has it already. ``Shard``/``Replicate`` placements are arithmetic
    (``plan/grid.py``, torch's rule); a ``_StridedShard`` asks torch.

    Raises:
        UnsafeObjectError: A ``Partial`` placement, or a local tensor whose shape
            is not the one its placements give (names the key).
    """
    meshes = meshes if meshes is not None else Meshes()
    layout = layout if layout is not None else meshes.layout(dt, key, action)
    placements, regular = layout.placements, layout.regular
    if local is None:
        local = local_tensor(dt)
    memo = None
    if regular is not None:
        mesh = dt.device_mesh
        mesh_shape = meshes.shape(mesh)
        memo = (id(mesh), regular, tuple(dt.shape))
        known = meshes.boxes.get(memo)
        if known is not None and known[0] == tuple(local.shape):
            return known[1]  # shared between tensors of one walk: never changed
        offsets, shape = grid_box(dt.shape, mesh_shape, regular, meshes.coordinate(mesh))
    else:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, placements)
    if tuple(local.shape) != tuple(shape):
        raise UnsafeObjectError(
            f"cannot {action} the DTensor at key {key or '[root]'!r}: its local tensor is {list(local.shape)} but its "
            f"placements {list(placements)} give {list(shape)}",
            key=key,
            type_name="torch.distributed.tensor.DTensor",
        )
    if math.prod(shape) == 0:
        return []
    indices = _global_indices(dt, placements)
    per_dim: list[list[tuple[int, int, int]]] = []
    for d, n in enumerate(shape):
        if indices is not None and d in indices:
            per_dim.append(_runs(indices[d]))
        else:
            per_dim.append([(0, offsets[d] if offsets else 0, n)])
    runs_of_boxes = [()]  # type: list[tuple[tuple[int, int, int], ...]]
    for runs in per_dim:
        runs_of_boxes = [b + (r,) for b in runs_of_boxes for r in runs]
    boxes = [LocalBox(tuple(r[0] for r in b), tuple(r[1] for r in b), tuple(r[2] for r in b)) for b in runs_of_boxes]
    if memo is not None:
        meshes.boxes[memo] = (tuple(shape), boxes)
    return boxes


class ReplicaChooser:
    """Decides, tensor by tensor in the order of the walk, whether this rank writes its shard.

    Every rank walks the same keys in the same order (the state dicts of an SPMD
    job), so every rank makes the same choices.
    """

    def __init__(self, meshes: Meshes | None = None) -> None:
        self._given: dict[int, int] = {}
        self._meshes = meshes if meshes is not None else Meshes()

    def choose(self, dt: Any, layout: Layout | None = None) -> tuple[int, bool]:
        """The replica position that writes ``dt``'s shards, and whether it is this rank's.

        ``layout``: ``dt``'s, when the caller has it already (checked for ``Partial``).
        """
        layout = layout if layout is not None else self._meshes.layout(dt, "")
        position, count = layout.position, layout.count
        if count == 1:
            return 0, True
        shards = math.prod(self._meshes.shape(dt.device_mesh)) // count
        share = math.prod(dt.shape) * dt.dtype.itemsize // max(1, shards)
        chosen = min(range(count), key=lambda p: (self._given.get(p, 0), p))
        self._given[chosen] = self._given.get(chosen, 0) + share
        return chosen, chosen == position
