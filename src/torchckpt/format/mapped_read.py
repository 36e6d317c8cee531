"""Fresh CPU tensors of a local native rank file: views of one private mapping of the file, verified in place.

A load with no template tensor to fill (a fresh load) needs new memory for
every tensor anyway. Instead of allocating it (page faults that zero it) and
copying the file's bytes in (``extent_read.py``), the rank file is mapped
once, ``MAP_PRIVATE`` and writable, and each tensor is a view of its bytes:
reading the bytes maps the page cache's pages, a write copies the page it
touches (the file never changes). This is what ``torch.load(mmap=True)``
does; here every chunk's crc32c is still checked before the load returns,
over the mapped bytes, on ``threads`` threads in file order (crc32c releases
the GIL; the page faults of the first read happen inside it, and the kernel
reads ahead of them).

The mapping lives as long as any tensor made from it (each holds a
slice of the mapping's storage); it is unmapped with the last. Rank files are never
changed in place once committed (a new save writes a new generation, and
retention unlinks files): a file truncated under a live mapping would raise
``SIGBUS`` on access, as it does for ``torch.load(mmap=True)``.

Only local files (``LocalObjectReader``) are mapped; a file of an object
store is read as before, by ranged reads into allocated tensors.
"""

from __future__ import annotations

import mmap
import torch

from ..storage.base import ObjectReader
from ..storage.local_read import LocalObjectReader
from .extent_read import PARALLEL_READ_BYTES, RUNS_PER_THREAD, InTurn
from .extents import CHUNK_BYTES, ChecksumError, checksum, run_parallel
from .manifest import TensorEntry

__all__ = ["FileMapping"]


class FileMapping:
    """One private, writable mapping of a rank file, and the tensors made from it."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self._storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()
        self.size = len(mapping)
        #: (manifest entry, tensor) of every tensor made, in the order made.
        self.made: list[tuple[TensorEntry, torch.Tensor]] = []

    @classmethod
    def open(cls, src: ObjectReader) -> FileMapping | None:
        """The mapping of ``src`` when it is a non-empty local file that can be mapped, else None (read it instead)."""
        if not isinstance(src, LocalObjectReader) or src.size <= 0:
            return None
        try:
            mapping = mmap.mmap(src.fileno(), src.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None  # a file system that cannot map, or no room for the mapping: read it
        return cls(mapping)

    def tensor(self, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor viewing ``entry``'s bytes (not read yet), or None where it cannot be a view (read it instead)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if entry.nbytes == 0 or entry.offset % itemsize or entry.offset + entry.nbytes > self.size:
            return None
        numel = entry.nbytes // itemsize
        shape = tuple(entry.shape)
        if _numel(shape) != numel:
            return None
        # A storage of its own bytes (a slice of the mapping's, sharing its memory): like a storage read into,
        # it holds only this tensor (``torch.save`` of it writes its bytes, not the whole file).
        storage = self._storage[entry.offset : entry.offset + entry.nbytes]
        out = torch.empty(0, dtype=dtype).set_(storage, 0, shape, _strides(shape))
        self.made.append((entry, out))
        return out

    def verify(self, threads: int) -> None:
        """Check every chunk of every tensor made against its crc32c, in file order, on up to ``threads`` threads.

        Raises:
            ChecksumError: A chunk does not match; ``extent_index`` is the tensor's index in :attr:`made`.
        """
        if not self.made:
            return
        order = sorted(range(len(self.made)), key=lambda i: self.made[i][0].offset)
        view = memoryview(self._map)
        sizes = [self.made[i][0].nbytes for i in order]
        if sum(sizes) < PARALLEL_READ_BYTES:
            threads = 1  # starting threads would cost more than they save
        threads = max(1, threads)
        parts = _split(order, sizes, threads * RUNS_PER_THREAD if threads > 1 else 1)
        shared = InTurn(parts)  # taken in turn: a thread slowed by another process leaves more to the others
        workers = min(threads, len(parts))
        run_parallel([lambda: self._check(view, shared) for _ in range(workers)], workers)

    def _check(self, view: memoryview, parts: InTurn[list[int]]) -> int:
        done = 0
        try:
            while (indices := parts.next()) is not None:
                for i in indices:
                    entry = self.made[i][0]
                    for k, want in enumerate(entry.crc32c):
                        lo = entry.offset + k * CHUNK_BYTES
                        hi = entry.offset + min(entry.nbytes, (k + 1) * CHUNK_BYTES)
                        if checksum(view[lo:hi]) != want:
                            raise ChecksumError(i, k)
                    done += entry.nbytes
        except BaseException:
            parts.failed = True  # the others stop after their current part
            raise
        return done


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (in elements)."""
    strides = []
    step = 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _split(order: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """Cut ``order`` (file order) into ``parts`` contiguous runs of about equal bytes."""
    total = sum(sizes)
    runs: list[list[int]] = [[] for _ in range(parts)]
    acc = 0
    for i, size in zip(order, sizes):
        runs[min(parts - 1, acc * parts // total) if total else 0].append(i)
        acc += size
    return [r for r in runs if r]
