"""Sharded tensors for the tools: a view that reads nothing, and its full tensor assembled on demand.

``tools.open_lazy`` gives each ``{"DT": j}`` node of a rank's tree as a
:class:`ShardedView`: global dtype and shape, and where its chunks are (which
ranks wrote them). ``inspect`` shows it without reading a byte; ``diff`` and
``export`` call :meth:`ShardedView.full`, which assembles the global tensor
from every rank's chunks through the loader's own reads
(``format/sharded_read.ShardedLoads``: only the chunk bytes, checksums
verified). :func:`write_streamed` writes a safetensors file one tensor at a
time, so an export holds at most one full tensor (and the read buffers of
its chunks) in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CorruptCheckpointError
from .format.dtypes import dtype_from_name, safetensors_name
from .format.manifest import Manifest, RankEntry
from .format.native import HEADER_ALIGN, byte_view, host_contiguous, write_all
from .format.native_read import resolve_device
from .format.sharded_read import ShardedLoads
from .format.shards import GlobalTensor
from .reading import CheckpointSnapshot, GenerationReplaced
from .storage.base import ObjectReader, ObjectWriter

#: Most bytes of read buffers an export holds beside the tensor being assembled.
EXPORT_ROUND_BYTES = 64 * 1024 * 1024

__all__ = ["ExportItem", "ShardedView", "materialize", "ranks_text", "replace_views", "sharded_view", "write_streamed"]


def ranks_text(ranks: Sequence[int]) -> str:
    """Ranks as compact text: ``[0, 1, 2, 3, 6]`` -> ``"0-3,6"``."""
    runs: list[list[int]] = []
    for r in sorted(set(ranks)):
        if runs and runs[-1][1] + 1 == r:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True, eq=False)
class ShardedView:
    """A sharded tensor of a checkpoint, not read: its global form and its chunks.

    Attributes:
        name: Its key path in the checkpoint.
        dtype: The torch dtype.
        shape: The global shape.
        chunks: How many chunks hold it.
        ranks: The ranks whose files hold them (sorted).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: int
    ranks: tuple[int, ...]
    _assemble: Callable[[], torch.Tensor] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """The bytes of the full tensor."""
        return math.prod(self.shape) * self.dtype.itemsize

    def full(self) -> torch.Tensor:
        """The full tensor (CPU), assembled from every rank's chunks, checksums verified.

        Raises:
            CorruptCheckpointError: A rank file's size, header or a checksum does
                not match, or the checkpoint was replaced while it was read.
        """
        return self._assemble()


def sharded_view(snapshot: CheckpointSnapshot, manifest: Manifest, entry: RankEntry, index: int) -> ShardedView:
    """The view of sharded tensor ``index`` of ``entry`` (its ``{"DT": index}`` node).

    Raises:
        CorruptCheckpointError: ``index`` is not one of the entry's sharded tensors.
    """
    path = snapshot.path
    if not 0 <= index < len(entry.sharded):
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: tree refers to sharded tensor {index} of {len(entry.sharded)}",
            path=path, file="manifest.json",
        )  # fmt: skip
    g = manifest.sharded[entry.sharded[index].name]
    chunks = g.all_chunks()
    ranks = tuple(sorted({c.rank for c in chunks}))
    return ShardedView(g.name, dtype_from_name(g.dtype), g.shape, len(chunks), ranks, lambda: _assemble(snapshot, manifest, g))


def _assemble(snapshot: CheckpointSnapshot, manifest: Manifest, g: GlobalTensor) -> torch.Tensor:
    """The full tensor of ``g``, read by the loader's sharded reads."""

    def open_rank(entry: RankEntry) -> ObjectReader:
        try:
            return snapshot.open_rank_file(entry)
        except GenerationReplaced:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {snapshot.path}: replaced by another save while it was read; run again",
                path=snapshot.path, file=entry.file, key=g.name,
            ) from None  # fmt: skip

    loads = ShardedLoads(
        manifest, open_rank, entry_of=snapshot.rank_entry, map_location="cpu", resolve_device=resolve_device,
        where=snapshot.path,
        round_bytes=EXPORT_ROUND_BYTES,
    )  # fmt: skip
    out = loads.tensor(g, None, g.name)
    loads.execute(verify=True, threads=2)
    return out


def materialize(value: Any) -> Any:
    """``value``, a :class:`ShardedView` replaced by its full tensor."""
    return value.full() if isinstance(value, ShardedView) else value


def replace_views(state: Any, fn: Callable[[ShardedView], Any]) -> Any:
    """``state`` with every :class:`ShardedView` in its containers replaced by ``fn(view)``."""
    if isinstance(state, ShardedView):
        return fn(state)
    if isinstance(state, dict):
        items = [(k, replace_views(v, fn)) for k, v in state.items()]
        return OrderedDict(items) if isinstance(state, OrderedDict) else dict(items)
    if isinstance(state, (list, tuple)) and not isinstance(state, torch.Size):
        values = [replace_views(v, fn) for v in state]
        return values if isinstance(state, list) else tuple(values)
    return state


@dataclass(frozen=True)
class ExportItem:
    """A tensor of a streamed export: its name, dtype and shape, and how to get its bytes when it is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        """The bytes of the tensor."""
        return math.prod(self.shape) * self.dtype.itemsize


def _header(items: Sequence[ExportItem], order: list[int], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The safetensors header of ``items`` in file ``order`` (padded to ``HEADER_ALIGN``) and each item's offset."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offsets = [0] * len(items)
    pos = 0
    for i in order:
        it = items[i]
        st = safetensors_name(it.dtype)
        shape = list(it.shape) if st else [it.nbytes]
        entries[it.name] = {"dtype": st or "U8", "shape": shape, "data_offsets": [pos, pos + it.nbytes]}
        offsets[i] = pos
        pos += it.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    padded = -(-(8 + len(body)) // HEADER_ALIGN) * HEADER_ALIGN - 8
    header = struct.pack("<Q", padded) + body + b" " * (padded - len(body))
    return header, [len(header) + o for o in offsets]


def write_streamed(out: ObjectWriter, items: Sequence[ExportItem], metadata: dict[str, str]) -> int:
    """Write a safetensors file of ``items``, one tensor in memory at a time; returns the bytes written.

    The header is written first, from dtypes and shapes alone; then each
    item's tensor is fetched, written at its offset and released. Tensors are
    ordered by decreasing element size, so each starts aligned to it.

    Raises:
        ValueError: Two items have the same name, or a tensor is not of its item's dtype and shape.
        OSError: A write failed.
    """
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the exported file would hold the keys {twice[:10]} twice")
    order = sorted(range(len(items)), key=lambda i: -items[i].dtype.itemsize)
    header, offsets = _header(items, order, metadata)
    total = write_all(out, [memoryview(header)], 0)
    for i in order:
        it = items[i]
        t = host_contiguous(it.tensor())
        if t.dtype != it.dtype or tuple(t.shape) != it.shape:
            raise ValueError(f"key {it.name!r}: got {t.dtype} {list(t.shape)}, expected {it.dtype} {list(it.shape)}")
        if it.nbytes:
            total += write_all(out, [byte_view(t)], offsets[i])
        del t
    return total
