"""The global table of sharded tensors: each sharded tensor of a checkpoint once, with its layout.

Written in the manifest at commit (``docs/format.md``)::

    "meshes":  [{"shape": [2, 4], "ranks": {"start": 0, "step": 1}}, ...]   # or "ranks": [explicit list]
    "sharded": [{"name", "dtype", "shape", "grid": {"mesh": 0, "placements": ["R", "S0"], "replica": 0}},
                {"name", "dtype", "shape", "chunks": [[rank, [offsets], [sizes]], ...]}, ...]

A tensor on a grid is one line whatever the number of ranks: a loader finds
the chunks it needs and their ranks arithmetically (``plan/grid.py``). Only
tensors with no grid (``_StridedShard`` placements, a replicated plain tensor
and its one writer) list their chunks. :func:`build_table` makes the table
from one rank entry per distinct table (ranks of an SPMD job report the same
one) and the chunks each rank lists; :func:`parse_table` validates it and
checks that every listed tensor's chunks tile it — the check of the commit and
of every load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..plan.boxes import tiling_problem
from ..plan.grid import Placement, replica_count
from .dtypes import ITEMSIZE
from .fields import MAX_FILE_BYTES, ManifestError, get_field, ints, ints_field, nonneg_field
from .shards import GlobalTensor, Grid, MeshTable, SavedChunk, ShardedEntry

__all__ = [
    "Mesh",
    "build_table",
    "layout_of",
    "listed_chunks",
    "parse_layout",
    "parse_meshes",
    "parse_table",
    "table_digest",
]

#: A device mesh as the format stores it: its shape and the global rank at each coordinate (row-major).
Mesh = tuple[tuple[int, ...], tuple[int, ...]]


def parse_meshes(doc: Any, world_size: int, where: str) -> list[Mesh]:
    """The ``meshes`` list of a document; every rank within ``world_size``, none twice in a mesh."""
    if not isinstance(doc, list):
        raise ManifestError(f"{where}: meshes must be a list")
    out = []
    for i, m in enumerate(doc):
        at = f"{where}.meshes[{i}]"
        shape = ints_field(m, "shape", at)
        n = math.prod(shape)
        if not shape or n < 1 or n > world_size:
            raise ManifestError(f"{at}: mesh shape {list(shape)} does not fit {world_size} ranks")
        spec = m.get("ranks")
        if isinstance(spec, dict):
            start, step = nonneg_field(spec, "start", at), nonneg_field(spec, "step", at)
            ranks = tuple(range(start, start + n * step, step)) if step else ()
        else:
            ranks = _rank_list(spec, at)
        if len(ranks) != n or len(set(ranks)) != n or max(ranks) >= world_size:
            raise ManifestError(f"{at}: ranks must be {n} distinct ranks below {world_size}")
        out.append((shape, ranks))
    return out


def _rank_list(spec: Any, at: str) -> tuple[int, ...]:
    if not isinstance(spec, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in spec):
        raise ManifestError(f"{at}: ranks must be a list of ranks or {{start, step}}")
    return tuple(spec)


def _placements(doc: Any, ndim: int, mesh_ndim: int, where: str) -> tuple[Placement, ...]:
    names = get_field(doc, "placements", list, where)
    out: list[Placement] = []
    for p in names:
        if p == "R":
            out.append(("R", -1))
        elif isinstance(p, str) and p[:1] == "S" and p[1:].isdigit() and int(p[1:]) < ndim:
            out.append(("S", int(p[1:])))
        else:
            raise ManifestError(f"{where}: unknown placement {p!r} for a tensor of {ndim} dimensions")
    if len(out) != mesh_ndim:
        raise ManifestError(f"{where}: {len(out)} placements for a mesh of {mesh_ndim} dimensions")
    return tuple(out)


def parse_layout(
    doc: Any,
    meshes: Sequence[Mesh],
    ndim: int,
    world_size: int,
    where: str,
    grids: dict[tuple[Any, ...], Grid] | None = None,
) -> tuple[Grid | None, int | None]:
    """The ``grid`` or ``writer`` of a sharded tensor's document (both None: its chunks are listed).

    ``grids``: grids already parsed from the same document (most tensors share a few), by their JSON.
    """
    if "grid" in doc:
        g = get_field(doc, "grid", dict, where)
        memo = _memo_key(g, ndim) if grids is not None else None
        found = grids.get(memo) if grids is not None and memo is not None else None
        if found is None:
            found = _parse_grid(g, meshes, ndim, where)
            if grids is not None and memo is not None:
                grids[memo] = found
        return found, None
    if "writer" in doc:
        writer = nonneg_field(doc, "writer", where)
        if writer >= world_size:
            raise ManifestError(f"{where}: writer rank {writer} of {world_size}")
        return None, writer
    return None, None


def _memo_key(g: dict[str, Any], ndim: int) -> tuple[Any, ...] | None:
    """What a grid document's validity depends on, when it is plainly made of ints and strings (else None)."""
    placements = g.get("placements")
    if type(placements) is not list:
        return None
    key = (ndim, g.get("mesh"), g.get("replica"), *placements)
    return key if all(type(v) in (int, str) for v in key) else None


def _parse_grid(g: dict[str, Any], meshes: Sequence[Mesh], ndim: int, where: str) -> Grid:
    """A ``grid`` document: its mesh, placements (one per mesh dimension) and replica position."""
    m = nonneg_field(g, "mesh", where)
    if m >= len(meshes):
        raise ManifestError(f"{where}: refers to mesh {m} of {len(meshes)}")
    shape, ranks = meshes[m]
    placements = _placements(g, ndim, len(shape), where)
    replica = nonneg_field(g, "replica", where)
    if replica >= replica_count(shape, placements):
        raise ManifestError(f"{where}: replica {replica} of {replica_count(shape, placements)}")
    return Grid(shape, ranks, placements, replica)


def _parse_head(doc: Any, where: str) -> tuple[str, str, tuple[int, ...]]:
    """Name, dtype and global shape of a sharded tensor's document (errors after the name name it)."""
    name = get_field(doc, "name", str, where)
    at = f"{where} (sharded tensor {name!r})"
    try:
        dtype = get_field(doc, "dtype", str, at)
        if dtype not in ITEMSIZE:
            raise ManifestError(f"{at}: unknown dtype {dtype!r}")
        shape = ints_field(doc, "shape", at)
        if math.prod(max(d, 1) for d in shape) * ITEMSIZE[dtype] > MAX_FILE_BYTES:
            raise ManifestError(f"{at}: absurd shape {list(shape)} (more than {MAX_FILE_BYTES} bytes)")
    except ManifestError as e:
        raise ManifestError(str(e), key=name) from None
    return name, dtype, shape


def parse_table(doc: Any, world_size: int) -> dict[str, GlobalTensor]:
    """The sharded tensors of a manifest's global table (``doc`` holds ``meshes`` and ``sharded``).

    Raises:
        ManifestError: A malformed entry, a rank out of range, a listed tensor whose
            chunks do not tile it (a gap, an overlap, out of bounds); names the tensor.
    """
    meshes = parse_meshes(doc.get("meshes", []), world_size, "manifest")
    grids: dict[tuple[Any, ...], Grid] = {}
    out: dict[str, GlobalTensor] = {}
    for i, item in enumerate(get_field(doc, "sharded", list, "manifest")):
        where = f"sharded[{i}]"
        name, dtype, shape = _parse_head(item, where)
        at = f"{where} (sharded tensor {name!r})"
        try:
            if name in out:
                raise ManifestError(f"{at}: listed twice")
            grid, writer = parse_layout(item, meshes, len(shape), world_size, at, grids)
            g = out[name] = GlobalTensor(name, dtype, shape, grid=grid)
            if writer is not None:
                g.chunks.append(SavedChunk(writer, ((0,) * len(shape), shape)))
            elif grid is None:
                g.chunks.extend(_parse_chunks(get_field(item, "chunks", list, at), len(shape), world_size, at))
        except ManifestError as e:
            raise ManifestError(str(e), key=name) from None
        if grid is None:
            problem = tiling_problem(shape, [c.box for c in g.chunks])
            if problem is not None:
                raise ManifestError(f"the chunks of sharded tensor {name!r} {list(shape)} do not tile it: {problem}", key=name)
    return out


def _parse_chunks(doc: list[Any], ndim: int, world_size: int, where: str) -> Iterable[SavedChunk]:
    for k, c in enumerate(doc):
        at = f"{where}.chunks[{k}]"
        if not isinstance(c, list) or len(c) != 3 or not isinstance(c[0], int) or isinstance(c[0], bool):
            raise ManifestError(f"{at}: a chunk is [rank, offsets, sizes]")
        offsets, sizes = ints(c[1], f"{at}: offsets"), ints(c[2], f"{at}: sizes")
        if not 0 <= c[0] < world_size or len(offsets) != ndim or len(sizes) != ndim:
            raise ManifestError(f"{at}: rank {c[0]} of {world_size}, or not {ndim} offsets and sizes")
        yield SavedChunk(c[0], (offsets, sizes))


def layout_of(s: ShardedEntry, meshes: MeshTable) -> dict[str, Any]:
    """The global-table line of a sharded tensor as a rank describes it (chunks of a listed one left out)."""
    out: dict[str, Any] = {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
    if s.grid is not None:
        out["grid"] = s.grid.to_json(meshes)
    elif s.writer is not None:
        out["writer"] = s.writer
    return out


def table_digest(sharded: Sequence[ShardedEntry]) -> str:
    """A digest of a rank's global-table lines: ranks with equal digests describe the same table."""
    meshes = MeshTable()
    lines = [layout_of(s, meshes) for s in sharded]
    body = json.dumps({"meshes": meshes.to_json(), "sharded": lines}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def listed_chunks(sharded: Sequence[ShardedEntry], shapes: Sequence[Sequence[int]]) -> list[list[Any]]:
    """``[name, offsets, sizes]`` of each chunk this rank wrote of its listed tensors (``shapes``: its table's)."""
    return [[s.name, list(c.offsets), list(shapes[c.tensor])] for s in sharded if s.listed for c in s.chunks]


def build_table(
    tables: Mapping[int, Sequence[ShardedEntry]], listed: Mapping[int, Sequence[Sequence[Any]]]
) -> dict[str, Any]:
    """The global table from one rank's sharded tensors per distinct table, and every rank's listed chunks.

    Args:
        tables: ``{rank: its sharded entries}`` for one rank of each distinct table.
        listed: ``{rank: [[name, offsets, sizes], ...]}`` of every rank that listed chunks.

    Raises:
        ManifestError: Two tables describe a tensor differently, or a rank lists
            chunks of a tensor no table lists as listed (names the tensor).
    """
    meshes = MeshTable()
    lines: dict[str, dict[str, Any]] = {}
    owner: dict[str, int] = {}
    for rank, sharded in sorted(tables.items()):
        for s in sharded:
            line = layout_of(s, meshes)
            known = lines.get(s.name)
            if known is None:
                lines[s.name], owner[s.name] = line, rank
                if s.listed:
                    line["chunks"] = []
            elif {k: v for k, v in known.items() if k != "chunks"} != line:
                raise ManifestError(
                    f"sharded tensor {s.name!r}: rank {rank} saved it as {line}, rank {owner[s.name]} as "
                    f"{ {k: v for k, v in known.items() if k != 'chunks'} }",
                    key=s.name,
                )
    for rank, chunks in sorted(listed.items()):
        for name, offsets, sizes in chunks:
            line = lines.get(name)
            if line is None or "chunks" not in line:
                raise ManifestError(f"sharded tensor {name!r}: rank {rank} lists a chunk of it, its table does not", key=name)
            line["chunks"].append([rank, list(offsets), list(sizes)])
    return {"meshes": meshes.to_json(), "sharded": list(lines.values())}
