"""Loading sharded tensors: each rank reads only the chunk bytes that overlap what it needs.

A target is a box of a global tensor and the memory it goes to: the local
shard of a ``DTensor`` template (one box per run of its placements, see
``plan/dtensor.py``), a plain template tensor or a fresh tensor (the whole
tensor). :class:`ShardedLoads` plans, with no collective, for every target
box and every saved chunk that overlaps it, the read of the smallest span of
checksum blocks of that chunk that holds the overlap (``plan/boxes.py``);
:meth:`ShardedLoads.execute` reads them rank file by rank file
(``extent_read.read_extents``, checksums verified) and copies each overlap
into its target. A span that is exactly the overlap, block-aligned, and a
contiguous CPU target is read straight into the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateDictMismatchError
from ..plan.boxes import Box, intersect, row_major_span, volume
from ..plan.dtensor import Meshes, is_dtensor, local_boxes, local_tensor
from ..storage.base import ObjectReader
from .dtypes import dtype_from_name
from .extent_read import read_extents
from .extents import CHUNK_BYTES, ChecksumError, Extent
from .manifest import Manifest, RankEntry, TensorEntry
from .native import contiguous_bytes
from .shards import GlobalTensor, SavedChunk
from .verification import check_header, check_size, read_error

__all__ = ["ShardedLoads", "one_chunk"]

#: Most bytes of intermediate buffers one round of reads holds.
ROUND_BYTES = 256 * 1024 * 1024


def one_chunk(entry: RankEntry, index: int) -> GlobalTensor:
    """A plain tensor of a rank's table as a global tensor of one chunk (to load it into a ``DTensor``)."""
    t = entry.tensors[index]
    return GlobalTensor(t.name, t.dtype, t.shape, [SavedChunk(entry.rank, ((0,) * len(t.shape), t.shape), t)])


@dataclass
class _Read:
    """One overlap: a span of a chunk's bytes, and where its elements go."""

    rank: int
    tensor: TensorEntry
    key: str
    first_byte: int  # of the span read, in the chunk's bytes (a multiple of CHUNK_BYTES)
    end_byte: int
    sub: Box  # the overlap in the chunk's coordinates
    element0: int  # the overlap's first element, in the chunk
    dest: torch.Tensor  # the target's elements of the overlap (a view)


def _contiguous_view(shape: tuple[int, ...], view_shape: list[int]) -> bool:
    """Whether a view of ``view_shape`` of a contiguous tensor of ``shape`` (narrowed where they differ) is contiguous.

    torch's rule: dimensions of size 1 are ignored, every other stride is the
    product of the sizes after it.
    """
    if 0 in view_shape:
        return True
    expected, stride = 1, 1
    for n, v in zip(reversed(shape), reversed(view_shape)):
        if v != 1 and stride != expected:
            return False
        expected *= v
        stride *= n
    return True


#: A part of an overlap: its box in the chunk, its slab ``(start, length)`` of the
#: target's view (None: the whole view), its first element, the first and end byte
#: of the span read.
_Part = tuple[Box, tuple[int, int] | None, int, int, int]

#: A chunk overlapping a target: the chunk, the ``(dim, start, length)`` narrowings
#: of the target that hold the overlap, and its parts.
_Span = tuple[SavedChunk, tuple[tuple[int, int, int], ...], tuple[_Part, ...]]


class ShardedLoads:
    """Plans and runs the reads of sharded tensors (and of plain tensors loaded into ``DTensor``s).

    Call order: :meth:`tensor` for every tensor met while the template is
    matched (nothing is read yet), then :meth:`execute` once.
    """

    def __init__(
        self,
        manifest: Manifest,
        open_rank: Callable[[RankEntry], ObjectReader],
        *,
        entry_of: Callable[[int], RankEntry],
        map_location: Any,
        resolve_device: Callable[[str, Any], torch.device],
        where: str,
        round_bytes: int | None = None,
    ) -> None:
        self.round_bytes = ROUND_BYTES if round_bytes is None else round_bytes
        self.manifest = manifest
        self.open_rank = open_rank
        self.entry_of = entry_of
        self.map_location = map_location
        self.resolve_device = resolve_device
        self.where = where
        self.reads: list[_Read] = []
        self.fresh: list[torch.Tensor] = []
        self._meshes = Meshes()
        self._spans: dict[Any, list[_Span]] = {}  # _geometry's results, per grid, shape and box

    def tensor(self, g: GlobalTensor, target: torch.Tensor | None, key: str) -> torch.Tensor:
        """The tensor at ``key``: ``target`` (checked, filled by :meth:`execute`) or a fresh full tensor."""
        dtype = dtype_from_name(g.dtype)
        if target is None:
            device = self._device_of(g, key)
            target = torch.empty(g.shape, dtype=dtype, device=device)
            self.fresh.append(target)
        if target.dtype != dtype or tuple(target.shape) != tuple(g.shape):
            kind = "DTensor" if is_dtensor(target) else "tensor"
            raise StateDictMismatchError(
                f"key {key!r}: the template {kind} is {target.dtype} {list(target.shape)} (global) but the checkpoint "
                f"at {self.where} holds {dtype} {list(g.shape)}",
                path=self.where,
                key=key,
            )
        if is_dtensor(target):
            local = local_tensor(target)
            for box in local_boxes(target, key, action="load into", local=local, meshes=self._meshes):
                self._plan(g, (box.offsets, box.sizes), box.view(local), key)
        elif volume(g.shape) > 0:
            self._plan(g, ((0,) * len(g.shape), tuple(g.shape)), target, key)
        return target

    def _device_of(self, g: GlobalTensor, key: str) -> torch.device:
        chunks = g.overlapping(((0,) * len(g.shape), g.shape)) if volume(g.shape) else []
        if not chunks:
            return torch.device("cpu")
        return self.resolve_device(self._chunk_tensor(g, chunks[0], key).device, self.map_location)

    def _chunk_tensor(self, g: GlobalTensor, c: SavedChunk, key: str) -> TensorEntry:
        """The tensor of rank ``c.rank``'s table that holds chunk ``c`` of ``g`` (checked against the chunk).

        Raises:
            CorruptCheckpointError: The rank's entry has no such chunk, or one of another shape or dtype.
        """
        if c.tensor is not None:
            return c.tensor
        entry = self.entry_of(c.rank)
        t = entry.chunk_tensors.get((g.name, c.box[0]))
        if t is None or tuple(t.shape) != tuple(c.box[1]) or t.dtype != g.dtype:
            found = "none" if t is None else f"{t.dtype} {list(t.shape)}"
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.where}: key {key!r}: rank {c.rank} should hold the chunk of {g.name!r} at "
                f"{list(c.box[0])} of {g.dtype} {list(c.box[1])}; its entry holds {found}",
                path=self.where, file=entry.file, key=key,
            )  # fmt: skip
        return t

    def _plan(self, g: GlobalTensor, want: Box, dest: torch.Tensor, key: str) -> None:
        """The reads of every chunk of ``g`` that overlaps ``want`` (global box), into ``dest`` (its memory)."""
        itemsize = dtype_from_name(g.dtype).itemsize
        straight = dest.is_cpu and dest.is_contiguous()
        memo = (id(g.grid), g.shape, want, itemsize, straight) if g.grid is not None else None
        spans = self._spans.get(memo) if memo is not None else None
        if spans is None:
            spans = self._geometry(g, want, itemsize, straight)
            if memo is not None:  # a grid lives as long as the manifest: its id stays its own
                self._spans[memo] = spans
        for c, narrows, parts in spans:
            view = dest
            for d, start, n in narrows:
                view = view.narrow(d, start, n)
            t = self._chunk_tensor(g, c, key)
            for part, slab, first, lo, hi in parts:
                part_view = view if slab is None else view.narrow(0, *slab)
                self.reads.append(_Read(c.rank, t, key, lo, hi, part, first, part_view))

    def _geometry(self, g: GlobalTensor, want: Box, itemsize: int, straight: bool) -> list[_Span]:
        """Where each chunk overlapping ``want`` goes in the target, and the spans of its bytes to read.

        Depends only on the chunks' boxes, ``want``, the item size and whether
        the target is a contiguous CPU tensor (``straight``): the same for every
        tensor of one shape on one grid, so :meth:`_plan` computes it once for them.
        """
        spans = []
        for c in g.overlapping(want):
            common = intersect(want, c.box)
            if common is None:
                continue
            chunk_offsets, chunk_shape = c.box
            sub = (tuple(o - co for o, co in zip(common[0], chunk_offsets)), common[1])
            narrows, view_shape = [], list(want[1])
            for d, (o, n, wo) in enumerate(zip(common[0], common[1], want[0])):
                if o != wo or n != view_shape[d]:
                    narrows.append((d, o - wo, n))
                    view_shape[d] = n
            parts = []
            contiguous = straight and _contiguous_view(want[1], view_shape)
            for part, slab in self._slabs(chunk_shape, sub, contiguous, itemsize):
                first, end = row_major_span(chunk_shape, part)
                lo = first * itemsize // CHUNK_BYTES * CHUNK_BYTES
                hi = min(volume(chunk_shape) * itemsize, -(-end * itemsize // CHUNK_BYTES) * CHUNK_BYTES)
                parts.append((part, slab, first, lo, hi))
            spans.append((c, tuple(narrows), tuple(parts)))
        return spans

    def _slabs(
        self, chunk_shape: tuple[int, ...], sub: Box, straight: bool, itemsize: int
    ) -> list[tuple[Box, tuple[int, int] | None]]:
        """``sub`` cut along its first dimension so that a span read through a buffer stays near ``round_bytes``.

        Each part with the ``(start, length)`` of its slab of the target's view
        (None: the whole view). An overlap read straight into its target (a
        contiguous span; ``straight``: the view is a contiguous CPU tensor) is not cut.
        """
        first, end = row_major_span(chunk_shape, sub)
        if not sub[1] or (end - first) * itemsize <= self.round_bytes or (end - first == volume(sub[1]) and straight):
            return [(sub, None)]
        row = volume(chunk_shape[1:]) * itemsize  # one index of the first dimension, in the chunk
        rows = max(1, self.round_bytes // max(1, row))
        out: list[tuple[Box, tuple[int, int] | None]] = []
        for k in range(0, sub[1][0], rows):
            n = min(rows, sub[1][0] - k)
            out.append((((sub[0][0] + k, *sub[0][1:]), (n, *sub[1][1:])), (k, n)))
        return out

    def execute(self, *, verify: bool, threads: int) -> int:
        """Read every planned overlap into its target; returns the bytes read.

        Raises:
            CorruptCheckpointError: A rank file's size, header or a checksum does not match (names file and key).
        """
        by_rank: dict[int, list[_Read]] = {}
        for r in self.reads:
            by_rank.setdefault(r.rank, []).append(r)
        total = 0
        for rank, reads in sorted(by_rank.items()):
            entry = self.entry_of(rank)
            src = self.open_rank(entry)
            try:
                check_size(src, entry, self.where)
                check_header(src, entry, self.where)
                for batch in _rounds(reads, self.round_bytes):
                    total += self._read_round(src, entry, batch, verify=verify, threads=threads)
            finally:
                src.close()
        return total

    def _read_round(
        self, src: ObjectReader, entry: RankEntry, reads: list[_Read], *, verify: bool, threads: int
    ) -> int:
        extents: list[Extent] = []
        copies: list[tuple[_Read, torch.Tensor]] = []
        for r in reads:
            itemsize = r.dest.element_size()
            crcs = (
                list(r.tensor.crc32c[r.first_byte // CHUNK_BYTES : -(-r.end_byte // CHUNK_BYTES)]) if verify else None
            )
            if _direct(r, itemsize):
                buffer = contiguous_bytes(r.dest)
            else:
                staging = torch.empty(r.end_byte - r.first_byte, dtype=torch.uint8)
                buffer = contiguous_bytes(staging)
                copies.append((r, staging))
            extents.append(Extent(r.tensor.offset + r.first_byte, buffer, crcs))
        try:
            nbytes = read_extents(src, extents, threads=threads)
        except (ChecksumError, EOFError) as err:
            raise read_error(err, self.where, entry.file, [r.key for r in reads], _after(reads)) from err
        for r, staging in copies:
            _copy_overlap(r, staging)
        return nbytes


def _direct(r: _Read, itemsize: int) -> bool:
    """Whether the span read is exactly the overlap and its target is plain contiguous CPU memory."""
    return (
        r.first_byte == r.element0 * itemsize
        and r.end_byte - r.first_byte == volume(r.sub[1]) * itemsize
        and r.dest.is_cpu
        and r.dest.is_contiguous()
        and not r.dest.is_conj()
        and not r.dest.is_neg()
    )


def _copy_overlap(r: _Read, staging: torch.Tensor) -> None:
    """Copy the overlap's elements from the span read (``staging``, raw bytes) into its target."""
    shape = r.tensor.shape
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    elements = staging.view(r.dest.dtype)
    start = r.element0 - r.first_byte // r.dest.element_size()
    source = elements.as_strided(r.sub[1], strides, start)
    with torch.no_grad():
        r.dest.copy_(source)


def _rounds(reads: list[_Read], round_bytes: int) -> list[list[_Read]]:
    """The reads in rounds whose intermediate buffers hold at most ``round_bytes`` (one read at least)."""
    rounds: list[list[_Read]] = [[]]
    held = 0
    for r in reads:
        size = r.end_byte - r.first_byte
        if rounds[-1] and held + size > round_bytes:
            rounds.append([])
            held = 0
        rounds[-1].append(r)
        held += size
    return rounds


def _after(reads: list[_Read]) -> str:
    keys = sorted({r.key for r in reads})
    return (
        f"the template's tensors of keys {keys[:10]} may have been overwritten with partly read data "
        "(its other values are untouched); load them again from a good checkpoint"
    )
