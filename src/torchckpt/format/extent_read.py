"""Reading byte ranges of a rank file into memory through an ``ObjectReader``, checksums checked on the way.

Bytes go straight from the object into tensor memory (``read_into``, which
is ``preadv`` for local files): no intermediate buffer holds a whole tensor.
The extents are cut into runs of contiguous bytes, split into about equal
parts in file order, ``RUNS_PER_THREAD`` per thread; each thread reads
through a handle of its own (:meth:`ObjectReader.reopen`: interleaved reads
of one file description defeat the kernel's read-ahead on cold reads) and
takes the next part in file order when it is done with one, so that a
thread slowed by another process on its core (a shared machine) leaves
more of the work to the others instead of holding the whole load back. Reads are at
most ``READ_BYTES``, so each chunk's crc32c (see ``verification.py`` for the
chunk rule) runs while its bytes are still in cache; ``preadv`` and crc32c
release the GIL, so two threads keep both the disk and the checksum busy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic, TypeVar

from ..storage.base import ObjectReader
from .extents import IOV_MAX, ChecksumError, Extent, Piece, checksum, contiguous_batches, run_parallel

__all__ = ["PARALLEL_READ_BYTES", "READ_BYTES", "RUNS_PER_THREAD", "InTurn", "read_extents"]

T = TypeVar("T")

#: Reads of fewer bytes in all run in the calling thread.
PARALLEL_READ_BYTES = 8 * 1024 * 1024
#: Largest single read: small enough that its checksum runs while the bytes are still in cache.
READ_BYTES = 1024 * 1024
#: Parts of the file per reading thread, taken in turn by whichever thread is free.
RUNS_PER_THREAD = 4


_Batch = tuple[int, list[Piece]]


def _read_exact(src: ObjectReader, views: list[memoryview], offset: int) -> None:
    total = sum(v.nbytes for v in views)
    got = src.read_into(views, offset)
    if got < total:
        raise EOFError(f"file ends at byte {offset + got}, expected {offset + total}")


class _BatchReader:
    """Reads one batch in reads of at most ``READ_BYTES``, checking each chunk once its last byte is in.

    Small pieces share a read (one ``read_into`` of many buffers); a large
    one is read in parts, its checksum carried from part to part.
    """

    def __init__(
        self, src: ObjectReader, offset: int, pieces: list[Piece], expected: Sequence[list[int] | None]
    ) -> None:
        self.src = src
        self.pieces = pieces
        self.expected = expected
        self.crcs = [0] * len(pieces)
        self.views: list[memoryview] = []
        self.parts: list[tuple[memoryview, int, bool]] = []  # (bytes, index of the piece, last part of it)
        self.pos = offset
        self.size = 0

    def flush(self) -> None:
        if self.size:
            _read_exact(self.src, self.views, self.pos)
        self.pos += self.size
        for view, k, last in self.parts:
            piece = self.pieces[k]
            want = self.expected[piece.extent]
            if want is not None:
                self.crcs[k] = checksum(view, self.crcs[k])
                if last and self.crcs[k] != want[piece.chunk]:
                    raise ChecksumError(piece.extent, piece.chunk)
        self.views.clear()
        self.parts.clear()
        self.size = 0

    def run(self) -> int:
        start = self.pos
        for k, p in enumerate(self.pieces):
            n = p.view.nbytes
            if n == 0:
                self.parts.append((p.view, k, True))
            lo = 0
            while lo < n:
                take = min(n - lo, READ_BYTES - self.size)
                view = p.view[lo : lo + take] if take != n else p.view
                self.views.append(view)
                self.parts.append((view, k, lo + take == n))
                self.size += take
                lo += take
                if self.size >= READ_BYTES or len(self.views) >= IOV_MAX:
                    self.flush()
        self.flush()
        return self.pos - start


def _split_in_order(batches: list[_Batch], parts: int) -> list[list[_Batch]]:
    """Cut the batches (in file order) into ``parts`` contiguous runs of about equal bytes."""
    sizes = [sum(p.view.nbytes for p in pieces) for _, pieces in batches]
    total = sum(sizes)
    runs: list[list[_Batch]] = [[] for _ in range(parts)]
    acc = 0
    for batch, size in zip(batches, sizes):
        runs[min(parts - 1, acc * parts // total) if total else 0].append(batch)
        acc += size
    return [r for r in runs if r]



class InTurn(Generic[T]):
    """Parts of one job, handed out in order to whichever thread asks next; none once a thread has failed."""

    def __init__(self, parts: Sequence[T]) -> None:
        self._parts = iter(parts)
        self._lock = threading.Lock()
        self.failed = False

    def next(self) -> T | None:
        """The next part, or None when none is left or a thread failed."""
        with self._lock:
            return None if self.failed else next(self._parts, None)


def _read_runs(src: ObjectReader, runs: InTurn[list[_Batch]], expected: Sequence[list[int] | None], *, own: bool) -> int:
    """Read parts taken from ``runs`` until none is left (through a handle of its own when ``own``)."""
    handle = src.reopen() if own else src
    total = 0
    try:
        while (run := runs.next()) is not None:
            total += sum(_BatchReader(handle, offset, pieces, expected).run() for offset, pieces in run)
    except BaseException:
        runs.failed = True  # the others stop after their current part
        raise
    finally:
        if handle is not src:
            handle.close()
    return total


def read_extents(src: ObjectReader, extents: Sequence[Extent], *, threads: int = 2) -> int:
    """Fill every extent's buffer from ``src``, verifying its ``crcs`` (one per chunk) where given.

    Call order: the caller opens ``src`` and keeps it open for the call; with
    several threads each one reads through ``src.reopen()`` (closed here),
    otherwise ``src`` itself is read in the calling thread.

    Args:
        src: The object (a rank file).
        extents: Where each range goes; ``crcs`` None: not verified.
        threads: Threads reading parts of the object in parallel.

    Returns:
        The number of bytes read.

    Raises:
        ChecksumError: A chunk does not match (names the extent and the chunk).
        EOFError: The object is shorter than an extent needs.
        OSError: A read failed.
    """
    expected = [e.crcs for e in extents]
    if sum(e.buffer.nbytes for e in extents) < PARALLEL_READ_BYTES:
        threads = 1  # starting threads and opening handles would cost more than they save
    threads = max(1, threads)
    runs = _split_in_order(contiguous_batches(extents), threads * RUNS_PER_THREAD if threads > 1 else 1)
    workers = min(threads, len(runs))
    shared = InTurn(runs)
    jobs = [lambda: _read_runs(src, shared, expected, own=workers > 1) for _ in range(workers)]
    return run_parallel(jobs, workers)
