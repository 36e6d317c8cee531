"""Boxes of a tensor: the chunks a sharded tensor is saved in, and the parts a load needs.

A box is ``(offsets, sizes)``, one integer per dimension, in the coordinates
of the global tensor. A saved chunk is a box whose bytes are stored
contiguously in row-major order; the chunks of a tensor *tile* it: every
element lies in exactly one chunk (:func:`tiling_problem`). A load intersects
the box it needs with each chunk (:func:`intersect`) and reads the element
span of that intersection in the chunk (:func:`row_major_span`).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

__all__ = ["Box", "intersect", "row_major_span", "tiling_problem", "volume"]

Box = tuple[tuple[int, ...], tuple[int, ...]]

#: Most grid cells :func:`tiling_problem` marks before it falls back to comparing boxes pairwise.
_MAX_CELLS = 1 << 22


def volume(sizes: Sequence[int]) -> int:
    """The number of elements of a box of ``sizes``."""
    return math.prod(sizes)


def intersect(a: Box, b: Box) -> Box | None:
    """The box common to ``a`` and ``b``, or None when they share no element."""
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)


def row_major_span(shape: Sequence[int], box: Box) -> tuple[int, int]:
    """The elements ``[first, end)`` of a row-major tensor of ``shape`` that hold ``box`` (chunk coordinates).

    Every element of the box lies in the span; the span is exactly the box when
    the box covers whole rows below its first partial dimension.
    """
    if not shape:
        return 0, 1
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    first = sum(o * s for o, s in zip(box[0], strides))
    last = sum((o + n - 1) * s for o, n, s in zip(box[0], box[1], strides))
    return first, last + 1


def tiling_problem(shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """What keeps ``boxes`` from tiling a tensor of ``shape``, or None when they tile it.

    Tiling: every box lies within the tensor, no two share an element, and
    together they cover every element. Boxes without elements are allowed
    anywhere within bounds. Work: linear in the number of boxes for the regular
    grids sharding produces (cells of the grid of their edges, marked once).
    """
    ndim = len(shape)
    solid = []
    for offsets, sizes in boxes:
        if len(offsets) != ndim or len(sizes) != ndim:
            return f"a chunk has {len(offsets)} dimensions, the tensor {ndim}"
        for d, (o, n, full) in enumerate(zip(offsets, sizes, shape)):
            if o < 0 or n < 0 or o + n > full:
                return f"the chunk at offsets {list(offsets)} of sizes {list(sizes)} lies outside {list(shape)} (dimension {d})"
        if volume(sizes) > 0:
            solid.append((tuple(offsets), tuple(sizes)))
    covered = sum(volume(s) for _, s in solid)
    total = volume(shape)
    if covered < total:
        return f"the chunks hold {covered} of its {total} elements (a gap)"
    overlap = _overlap(solid, ndim)
    if overlap is not None:
        return overlap
    if covered != total:
        return f"the chunks hold {covered} elements for its {total} (an overlap)"
    return None


def _overlap(boxes: list[Box], ndim: int) -> str | None:
    """Two boxes that share an element, named; None when there are none."""
    if not boxes or ndim == 0:
        return "two chunks hold the only element (an overlap)" if len(boxes) > 1 else None
    cuts = [sorted({o[d] for o, _ in boxes} | {o[d] + s[d] for o, s in boxes}) for d in range(ndim)]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > _MAX_CELLS:
        return _overlap_pairwise(boxes)
    owner: dict[tuple[int, ...], int] = {}
    for i, (offsets, sizes) in enumerate(boxes):
        spans = [
            range(bisect.bisect_left(cuts[d], offsets[d]), bisect.bisect_left(cuts[d], offsets[d] + sizes[d]))
            for d in range(ndim)
        ]
        for cell in itertools.product(*spans):
            j = owner.setdefault(cell, i)
            if j != i:
                return _named_overlap(boxes[j], boxes[i])
    return None


def _overlap_pairwise(boxes: list[Box]) -> str | None:
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][0])
    for n, i in enumerate(order):
        end = boxes[i][0][0] + boxes[i][1][0]
        for j in order[n + 1 :]:
            if boxes[j][0][0] >= end:
                break
            if intersect(boxes[i], boxes[j]) is not None:
                return _named_overlap(boxes[i], boxes[j])
    return None


def _named_overlap(a: Box, b: Box) -> str:
    return f"the chunks at offsets {list(a[0])} and {list(b[0])} overlap"
