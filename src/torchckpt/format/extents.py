"""Checksummed extents: how a native file's tensor bytes are cut into checksum chunks, and read back verified.

An *extent* is a byte range of a file and the memory it comes from or goes to
(a tensor's bytes). Checksums are crc32c per *chunk*: a tensor of ``n`` bytes
has ``max(1, ceil(n / CHUNK_BYTES))`` checksums, chunk ``k`` covering bytes
``[k * CHUNK_BYTES, min(n, (k + 1) * CHUNK_BYTES))`` of the tensor. The
chunk size is a constant of the format (the manifest records it and accepts
only this one), which is why this module lives in ``format/``.

Work is cut into *batches*: runs of contiguous file bytes of at most
``BATCH_BYTES``, each a list of :class:`Piece` (one chunk of one extent).
The writer of native files (``format/native.py``) sends batches through an
``ObjectWriter``; ``extent_read.read_extents`` fills extents from an ``ObjectReader`` with
``preadv`` straight into tensor memory, checking every chunk as it arrives.
``preadv``, ``pwritev`` and crc32c release the GIL, so :func:`run_parallel`
keeps the disk and the checksum busy from a small thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import crc32c as _crc32c

__all__ = [
    "BATCH_BYTES",
    "CHUNK_BYTES",
    "IOV_MAX",
    "ChecksumError",
    "Extent",
    "Piece",
    "checksum",
    "chunk_count",
    "contiguous_batches",
    "run_parallel",
]

#: Bytes covered by one checksum.
CHUNK_BYTES = 16 * 1024 * 1024
#: Largest single positional write or read (one batch).
BATCH_BYTES = 16 * 1024 * 1024
#: Most buffers in one vectored call (the system's IOV_MAX, at most 1024).
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def checksum(data: memoryview | bytes, value: int = 0) -> int:
    """Return the crc32c of ``data``, continuing from ``value``."""
    return int(_crc32c.crc32c(data, value=value))


def chunk_count(nbytes: int) -> int:
    """Number of checksum chunks of a tensor of ``nbytes`` bytes."""
    return (nbytes + CHUNK_BYTES - 1) // CHUNK_BYTES or 1


class ChecksumError(Exception):
    """A chunk read back does not match its checksum (internal; callers wrap it)."""

    def __init__(self, extent_index: int, chunk: int) -> None:
        super().__init__(extent_index, chunk)
        self.extent_index = extent_index
        self.chunk = chunk


@dataclass
class Extent:
    """A byte range of the file and the memory it comes from or goes to.

    Attributes:
        offset: Absolute file offset.
        buffer: Byte view of the tensor memory (writable for reads).
        crcs: For writes, filled with the chunk checksums; for reads, the
            expected checksums (None: do not verify).
    """

    offset: int
    buffer: memoryview
    crcs: list[int] | None = field(default=None)


@dataclass
class Piece:
    """One checksum chunk of one extent: what a batch is made of.

    Attributes:
        extent: Index of the extent in the list given.
        chunk: Index of the chunk within that extent.
        view: The chunk's bytes in the extent's buffer.
    """

    extent: int
    chunk: int
    view: memoryview


def contiguous_batches(
    extents: Sequence[Extent], group: Callable[[int], int] | None = None
) -> list[tuple[int, list[Piece]]]:
    """Group the extents' chunks, in file order, into runs of contiguous file bytes.

    A run is at most ``BATCH_BYTES`` (a chunk larger than that is a run of its
    own) and at most ``IOV_MAX`` pieces: one positional call's worth. With
    ``group`` (extent index -> group), a run never holds extents of two groups.

    Returns:
        ``(file offset, pieces)`` per run, in file order.
    """
    order = sorted(range(len(extents)), key=lambda i: extents[i].offset)
    batches: list[tuple[int, list[Piece]]] = []
    cur: list[Piece] = []
    cur_start = cur_end = -1
    cur_group = None
    for i in order:
        e = extents[i]
        g = group(i) if group is not None else None
        if g != cur_group and cur:
            batches.append((cur_start, cur))
            cur, cur_start, cur_end = [], -1, -1
        cur_group = g
        n = e.buffer.nbytes
        pieces = [Piece(i, k, e.buffer[k * CHUNK_BYTES : min(n, (k + 1) * CHUNK_BYTES)]) for k in range(chunk_count(n))]
        pos = e.offset
        for p in pieces:
            size = p.view.nbytes
            fits = cur and pos == cur_end and cur_end - cur_start + size <= BATCH_BYTES and len(cur) < IOV_MAX
            if not fits:
                if cur:
                    batches.append((cur_start, cur))
                cur, cur_start, cur_end = [], pos, pos
            cur.append(p)
            cur_end += size
            pos += size
    if cur:
        batches.append((cur_start, cur))
    return batches



def run_parallel(jobs: Sequence[Callable[[], int]], threads: int) -> int:
    """Run ``jobs`` on up to ``threads`` threads (in this thread when one suffices); return the sum of their results.

    Raises:
        BaseException: The first job's error, once every started job has ended.
    """
    if threads <= 1 or len(jobs) <= 1:
        return sum(job() for job in jobs)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="torchckpt-io") as pool:
        futures = [pool.submit(job) for job in jobs]
        total = 0
        first_error: BaseException | None = None
        for f in futures:
            try:
                total += f.result()
            except BaseException as e:  # noqa: BLE001 - keep the first, wait for all
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return total
