"""Native rank files: valid safetensors files written and read in parallel, checksummed.

Byte layout of a rank file (``docs/format.md``)::

    [8 bytes: little-endian u64 N][N bytes: JSON header, space-padded][tensor bytes]

The header is the safetensors header: for each tensor its safetensors dtype,
shape and ``data_offsets`` relative to the end of the header, plus
``__metadata__``. ``8 + N`` is a multiple of 4096. Tensors are packed with no
gaps, ordered by decreasing element size so each one starts aligned to its
element size. A dtype safetensors has no name for is written as ``U8`` of
shape ``[nbytes]``; the manifest keeps the real dtype and shape.

Where a tensor's bytes are written: :func:`write_rank_file` writes the header
and every tensor of a planned file (:func:`plan_rank_file`) through an
``ObjectWriter`` (``storage/base.py``), whatever storage is behind it. Large
tensors go straight from their memory in batches of contiguous file bytes
(``format/extents.py``), from a small thread pool, each batch checksummed
per chunk in the same pass and handed to ``start_writeback`` once written;
small tensors are copied into a shared buffer first (:func:`write_gathered`).
The caller syncs and closes the writer.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import operator
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c as _crc32c
import torch

from ..storage.base import ObjectWriter, skip_bytes
from . import extents
from .dtypes import dtype_name, safetensors_name
from .extents import CHUNK_BYTES, Extent, Piece, checksum, chunk_count, contiguous_batches, run_parallel
from .manifest import RankEntry, TensorEntry
from .shards import ShardedEntry
from .refs import RankRef
from .tree import Flattened

__all__ = [
    "HEADER_ALIGN",
    "SMALL_TENSOR_BYTES",
    "NativeFile",
    "byte_view",
    "contiguous_bytes",
    "digest_of",
    "host_contiguous",
    "native_file_name",
    "plan_rank_file",
    "rank_entry",
    "write_all",
    "write_extents",
    "write_gathered",
    "write_rank_file",
]

HEADER_ALIGN = 4096


class Ready(Protocol):
    """Staging progress of a pipelined save (``torchckpt.pipeline.StagedProgress``)."""

    def wait_for(self, index: int) -> None:
        """Return once tensor ``index`` (table order) is staged."""

    def wait_all(self) -> None:
        """Return once every tensor is staged."""

    def group_of(self, index: int) -> int:
        """The staging group of tensor ``index`` (a write batch holds tensors of one group)."""


#: Called with a batch's pieces before the batch is written.
BeforeBatch = Callable[[list[Piece]], None]


def native_file_name(rank: int) -> str:
    """The name of rank ``rank``'s file in the native layout."""
    return f"rank_{rank:05d}.safetensors"


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy, flat byte view of a contiguous CPU tensor (writable)."""
    if t.numel() == 0:
        # An empty tensor counts as contiguous whatever its strides; its strides may forbid the uint8 view.
        return memoryview(bytearray())
    flat = t.detach().view(-1) if t.dim() else t.detach().reshape(1)
    if flat.stride(0) != 1:
        # One element: contiguous whatever its stride, but the uint8 view needs stride 1.
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8).numpy().data.cast("B")


def _memory_from_address() -> Any:
    try:
        fn = ctypes.pythonapi.PyMemoryView_FromMemory
    except AttributeError:  # not CPython
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    fn.restype = ctypes.py_object
    return fn


_MEMORY_FROM_ADDRESS = _memory_from_address()
_PYBUF_WRITE = 0x200


def contiguous_bytes(t: torch.Tensor) -> memoryview:
    """A flat, writable byte view of a contiguous CPU tensor, made from its address.

    The same bytes as :func:`byte_view` at a tenth of its cost (no tensor
    views are made), for paths that handle one view per tensor of a state. The
    view does not keep ``t`` alive: the caller holds ``t`` while it uses the view.
    """
    n = t.nbytes
    if n == 0 or _MEMORY_FROM_ADDRESS is None:
        return byte_view(t)
    if not (t.is_cpu and t.is_contiguous()):
        raise ValueError("contiguous_bytes needs a contiguous CPU tensor")
    return _MEMORY_FROM_ADDRESS(t.data_ptr(), n, _PYBUF_WRITE)


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a plain contiguous CPU tensor, else a CPU contiguous copy."""
    if t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t  # the common case, without the cost of detach()
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def digest_of(header_crc: int, entries: list[TensorEntry]) -> str:
    """File digest: crc32c over the header crc then every chunk crc, in file order, each u32 LE.

    Tensors held by another checkpoint's file (``ref``) are not part of this file's digest.
    """
    crcs = array.array("I", [header_crc])
    for e in sorted((e for e in entries if e.ref is None), key=_file_order):
        crcs.extend(e.crc32c)
    if sys.byteorder != "little":
        crcs.byteswap()
    return f"crc32c:{checksum(crcs.tobytes()):08x}"


_file_order = operator.attrgetter("offset", "nbytes")

#: Tensors up to this size are copied into a shared write buffer instead of written from their own memory.
SMALL_TENSOR_BYTES = 256 * 1024


@dataclass
class NativeFile:
    """A rank file laid out and ready to write."""

    header: bytes
    tensors: list[torch.Tensor]  # host, contiguous; kept alive until written
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    devices: list[str]
    offsets: list[int]  # absolute, in tensor-table order
    size_bytes: int
    #: Tensors of the table this file does not hold (an incremental save refers to another file for them).
    skip: frozenset[int] = frozenset()

    @property
    def data_offset(self) -> int:
        return len(self.header)


def plan_rank_file(
    flat: Flattened,
    *,
    rank: int,
    metadata: dict[str, str] | None = None,
    hosts: list[torch.Tensor] | None = None,
    skip: frozenset[int] = frozenset(),
) -> NativeFile:
    """Lay out the rank file of ``flat``: header bytes and every tensor's offset.

    Args:
        hosts: ``flat``'s tensors as :func:`host_contiguous` makes them (made here when None).
        skip: Tensors of the table the file does not hold (their offset is 0 in the plan).
    """
    if hosts is None:
        hosts = [host_contiguous(t) for t in flat.tensors]
    nbytes = [t.nbytes for t in hosts]
    # Stable: tensors of one element size keep their table order.
    held = [i for i in range(len(hosts)) if i not in skip] if skip else range(len(hosts))
    order = sorted(held, key=[-t.element_size() for t in hosts].__getitem__)
    rel = [0] * len(hosts)
    pos = 0
    for i in order:
        rel[i] = pos
        pos += nbytes[i]
    meta = {"format": "torchckpt", "torchckpt_format": "1", "rank": str(rank), **(metadata or {})}
    entries: dict[str, Any] = {"__metadata__": meta}
    st_names: dict[torch.dtype, str | None] = {}
    names = flat.names
    for i in order:
        t = hosts[i]
        dtype = t.dtype
        if dtype not in st_names:
            st_names[dtype] = safetensors_name(dtype)
        st = st_names[dtype]
        n = nbytes[i]
        shape = list(t.shape) if st else [n]
        entries[names[i]] = {"dtype": st or "U8", "shape": shape, "data_offsets": [rel[i], rel[i] + n]}
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    n = len(body)
    padded = -(-(8 + n) // HEADER_ALIGN) * HEADER_ALIGN - 8
    header = struct.pack("<Q", padded) + body + b" " * (padded - n)
    data_offset = len(header)
    dtype_names: dict[torch.dtype, str] = {}
    device_names: dict[torch.device, str] = {}
    dtypes, shapes, devices = [], [], []
    for t in flat.tensors:
        dtype, device = t.dtype, t.device
        if dtype not in dtype_names:
            dtype_names[dtype] = dtype_name(dtype)
        if device not in device_names:
            device_names[device] = str(device)
        dtypes.append(dtype_names[dtype])
        shapes.append(tuple(t.shape))
        devices.append(device_names[device])
    return NativeFile(
        header=header,
        tensors=hosts,
        names=list(names),
        dtypes=dtypes,
        shapes=shapes,
        devices=devices,
        offsets=[0 if i in skip else data_offset + r for i, r in enumerate(rel)],
        size_bytes=data_offset + pos,
        skip=skip,
    )


def write_rank_file(
    out: ObjectWriter, plan: NativeFile, *, threads: int, ready: Ready | None = None
) -> tuple[list[TensorEntry], int]:
    """Write the planned file, header and data, through ``out`` (not synced); return its tensor entries and header crc.

    Large tensors are written straight from their memory by parallel
    positional writes; small ones (up to ``SMALL_TENSOR_BYTES``) are copied
    into a shared buffer first, which costs less than a view and an iovec each.
    With ``ready`` (a pipelined save's staging progress) each batch of large
    tensors is written once they are staged, and the small ones last.

    Raises:
        OSError: A write failed (the first error; every started write is waited for).
    """
    write_all(out, [memoryview(plan.header)], 0)
    count = len(plan.tensors)
    sizes = [t.nbytes for t in plan.tensors]
    crcs: list[tuple[int, ...]] = [()] * count
    limit = min(SMALL_TENSOR_BYTES, CHUNK_BYTES)  # a gathered tensor has one checksum chunk
    skip = plan.skip
    small = [i for i in range(count) if sizes[i] <= limit and i not in skip]
    large = [i for i in range(count) if sizes[i] > limit and i not in skip]

    def write_small() -> None:
        tensors, offsets = plan.tensors, plan.offsets
        if ready is not None:
            ready.wait_all()
        small_crcs = write_gathered(
            out, [offsets[i] for i in small], [tensors[i].data_ptr() for i in small], [sizes[i] for i in small]
        )
        for i, c in zip(small, small_crcs):
            crcs[i] = (c,)

    if small and ready is None:
        write_small()
    if large:
        spans = [Extent(plan.offsets[i], byte_view(plan.tensors[i])) for i in large]
        if ready is None:
            write_extents(out, spans, threads=threads)
        else:
            write_extents(
                out, spans, threads=threads, group=lambda k: ready.group_of(large[k]),
                before=lambda pieces: ready.wait_for(max(large[p.extent] for p in pieces)),
            )  # fmt: skip
        for i, e in zip(large, spans):
            crcs[i] = tuple(e.crcs or ())
    if small and ready is not None:
        write_small()
    if ready is not None:
        ready.wait_all()
    entries = [
        TensorEntry(name, dtype, shape, offset, size, crc, device)
        for name, dtype, shape, offset, size, crc, device in zip(
            plan.names, plan.dtypes, plan.shapes, plan.offsets, sizes, crcs, plan.devices
        )
    ]
    return entries, checksum(plan.header)


def write_all(out: ObjectWriter, views: list[memoryview], offset: int) -> int:
    """Write ``views`` back to back from ``offset``, again after each short write, until all are written.

    Returns:
        The bytes written.

    Raises:
        OSError: A write failed, or wrote nothing (EIO).
    """
    total = sum(v.nbytes for v in views)
    done = 0
    while done < total:
        written = out.write_at(skip_bytes(views, done), offset + done)
        if written <= 0:
            raise OSError(errno.EIO, f"a write to {out.location} wrote no bytes")
        done += written
    return total


def _write_batch(
    out: ObjectWriter, offset: int, pieces: list[Piece], crcs: list[list[int]], before: BeforeBatch | None = None
) -> int:
    if before is not None:
        before(pieces)
    total = write_all(out, [p.view for p in pieces if p.view.nbytes], offset)
    for p in pieces:
        crcs[p.extent][p.chunk] = checksum(p.view)
    if total:
        out.start_writeback(offset, total)
    return total


def write_extents(
    out: ObjectWriter,
    spans: Sequence[Extent],
    *,
    threads: int = 2,
    group: Callable[[int], int] | None = None,
    before: BeforeBatch | None = None,
) -> int:
    """Write every extent through ``out`` at its offset and fill its ``crcs``, from up to ``threads`` threads.

    Each batch of contiguous file bytes (``extents.contiguous_batches``) is one
    positional write, checksummed chunk by chunk once written (the bytes are
    still in cache) and then handed to ``start_writeback``. A pipelined save
    gives ``group`` (a batch holds spans of one staging group) and ``before``
    (called with a batch's pieces before it is written: it waits there).

    Returns:
        The number of bytes written.

    Raises:
        OSError: A write failed (the first error; all started writes are waited for).
    """
    crcs = [[0] * chunk_count(e.buffer.nbytes) for e in spans]
    jobs = [lambda o=o, p=p: _write_batch(out, o, p, crcs, before) for o, p in contiguous_batches(spans, group)]
    total = run_parallel(jobs, threads)
    for e, c in zip(spans, crcs):
        e.crcs = c
    return total


def write_gathered(
    out: ObjectWriter, offsets: Sequence[int], addresses: Sequence[int], sizes: Sequence[int]
) -> list[int]:
    """Write many small memory ranges, copied into one buffer per run of contiguous file bytes.

    For small tensors a zero-copy view and an iovec each cost more than
    copying their bytes: range ``i`` (``sizes[i]`` bytes at memory address
    ``addresses[i]``, at most ``CHUNK_BYTES``) is copied into a buffer of
    ``BATCH_BYTES`` (or of the largest range, if larger), checksummed there,
    and each buffer goes out in one positional write. The memory must stay
    valid for the call (the caller holds the tensors).

    Returns:
        The crc32c of each range (its one checksum chunk), in the order given.

    Raises:
        OSError: A write failed.
    """
    n = len(offsets)
    crcs = [0] * n
    if n == 0:
        return crcs
    # Room for the largest range at least: the copy below must never run past the buffer.
    buf = bytearray(max(1, max(sizes), min(extents.BATCH_BYTES, sum(sizes))))
    view = memoryview(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    memmove = ctypes.memmove
    start = fill = 0

    def flush() -> None:
        if fill:
            write_all(out, [view[:fill]], start)
            out.start_writeback(start, fill)

    for i in sorted(range(n), key=offsets.__getitem__):
        off, size = offsets[i], sizes[i]
        if off != start + fill or fill + size > len(buf):
            flush()
            start, fill = off, 0
        if size:
            if fill + size > len(buf):  # cannot happen (see above); checked because a wrong copy corrupts memory
                raise ValueError(f"range of {size} bytes does not fit the {len(buf)}-byte write buffer")
            memmove(base + fill, addresses[i], size)
            crcs[i] = _crc32c.crc32c(view[fill : fill + size])
            fill += size
    flush()
    return crcs


def rank_entry(
    rank: int,
    file: str,
    plan: NativeFile,
    tree: Any,
    entries: list[TensorEntry],
    header_crc: int,
    sharded: Sequence[ShardedEntry] = (),
    refs: Sequence[RankRef] = (),
) -> RankEntry:
    """The manifest entry of a written rank file (``sharded``: its ``DTensor``s, see ``shards.py``)."""
    return RankEntry(
        rank=rank,
        file=file,
        size_bytes=plan.size_bytes,
        digest=digest_of(header_crc, entries),
        tree=tree,
        tensors=tuple(entries),
        data_offset=plan.data_offset,
        sharded=tuple(sharded),
        refs=tuple(refs),
    )

