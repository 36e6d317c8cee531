"""Native rank files: valid safetensors files written and read in parallel, checksummed.

Byte layout of a rank file (``docs/format.md``)::

    [8 bytes: little-endian u64 N][N bytes: JSON header, space-padded][tensor bytes]

The header is the safetensors header: for each tensor its safetensors dtype,
shape and ``data_offsets`` relative to the end of the header, plus
``__metadata__``. ``8 + N`` is a multiple of 4096. Tensors are packed with no
gaps, ordered by decreasing element size so each one starts aligned to its
element size. A dtype safetensors has no name for is written as ``U8`` of
shape ``[nbytes]``; the manifest keeps the real dtype and shape.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..storage import fs
from ..storage.io import Extent, checksum, write_extents
from .dtypes import dtype_name, safetensors_name
from .manifest import RankEntry, TensorEntry
from .tree import Flattened

__all__ = [
    "HEADER_ALIGN",
    "NativeFile",
    "byte_view",
    "digest_of",
    "host_contiguous",
    "plan_rank_file",
    "rank_entry",
    "write_rank_file",
]

HEADER_ALIGN = 4096


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


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a plain contiguous CPU tensor, else a CPU contiguous copy."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def digest_of(header_crc: int, entries: list[TensorEntry]) -> str:
    """File digest: crc32c over the header crc then every chunk crc, in file order, each u32 LE."""
    parts = [struct.pack("<I", header_crc)]
    for e in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        parts.extend(struct.pack("<I", c) for c in e.crc32c)
    return f"crc32c:{checksum(b''.join(parts)):08x}"


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

    @property
    def data_offset(self) -> int:
        return len(self.header)


def plan_rank_file(flat: Flattened, *, rank: int, metadata: dict[str, str] | None = None) -> NativeFile:
    """Lay out the rank file of ``flat``: header bytes and every tensor's offset."""
    hosts = [host_contiguous(t) for t in flat.tensors]
    nbytes = [t.numel() * t.element_size() for t in hosts]
    order = sorted(range(len(hosts)), key=lambda i: -hosts[i].element_size())
    rel = [0] * len(hosts)
    pos = 0
    for i in order:
        rel[i] = pos
        pos += nbytes[i]
    meta = {"format": "torchckpt", "torchckpt_format": "1", "rank": str(rank), **(metadata or {})}
    entries: dict[str, Any] = {"__metadata__": meta}
    for i in order:
        t = hosts[i]
        st = safetensors_name(t.dtype)
        shape = list(t.shape) if st else [nbytes[i]]
        entries[flat.names[i]] = {"dtype": st or "U8", "shape": shape, "data_offsets": [rel[i], rel[i] + nbytes[i]]}
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    n = len(body)
    padded = -(-(8 + n) // HEADER_ALIGN) * HEADER_ALIGN - 8
    header = struct.pack("<Q", padded) + body + b" " * (padded - n)
    data_offset = len(header)
    return NativeFile(
        header=header,
        tensors=hosts,
        names=list(flat.names),
        dtypes=[dtype_name(t.dtype) for t in flat.tensors],
        shapes=[tuple(t.shape) for t in flat.tensors],
        devices=[str(t.device) for t in flat.tensors],
        offsets=[data_offset + r for r in rel],
        size_bytes=data_offset + pos,
    )


def write_rank_file(fd: int, plan: NativeFile, *, threads: int) -> tuple[list[TensorEntry], int]:
    """Write the planned file to ``fd`` (not fsynced) and return its tensor entries and header crc."""
    written = 0
    while written < len(plan.header):
        written += fs.pwrite(fd, memoryview(plan.header)[written:], written)
    extents = [Extent(off, byte_view(t)) for off, t in zip(plan.offsets, plan.tensors)]
    write_extents(fd, extents, threads=threads)
    entries = [
        TensorEntry(
            name=plan.names[i],
            dtype=plan.dtypes[i],
            shape=plan.shapes[i],
            offset=plan.offsets[i],
            nbytes=extents[i].buffer.nbytes,
            crc32c=tuple(extents[i].crcs or ()),
            device=plan.devices[i],
        )
        for i in range(len(extents))
    ]
    return entries, checksum(plan.header)


def rank_entry(rank: int, file: str, plan: NativeFile, tree: Any, entries: list[TensorEntry], header_crc: int) -> RankEntry:
    """The manifest entry of a written rank file."""
    return RankEntry(
        rank=rank,
        file=file,
        size_bytes=plan.size_bytes,
        digest=digest_of(header_crc, entries),
        tree=tree,
        tensors=tuple(entries),
        data_offset=plan.data_offset,
    )

