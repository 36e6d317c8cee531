"""Parallel positional file I/O with checksums computed in the same pass.

Tensor bytes go straight from tensor memory to the file (``pwritev``) and
straight from the file into tensor memory (``preadv``): no intermediate
buffer holds a whole tensor. Work is split into batches of at most
``BATCH_BYTES`` that run on a small thread pool; ``pwritev``, ``preadv``,
crc32c and ``sync_file_range`` all release the GIL, so two threads keep both
the disk and the checksum busy.

Checksums are crc32c per *chunk*: a tensor of ``n`` bytes has
``max(1, ceil(n / CHUNK_BYTES))`` checksums, chunk ``k`` covering bytes
``[k * CHUNK_BYTES, min(n, (k + 1) * CHUNK_BYTES))`` of the tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import crc32c as _crc32c

from . import fs

__all__ = [
    "BATCH_BYTES",
    "CHUNK_BYTES",
    "ChecksumError",
    "Extent",
    "checksum",
    "chunk_count",
    "read_extents",
    "start_writeback",
    "write_extents",
    "write_gathered",
]

#: Bytes covered by one checksum.
CHUNK_BYTES = 16 * 1024 * 1024
#: Largest single positional write or read.
BATCH_BYTES = 16 * 1024 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        # Starts writeback of the range so the final fsync has little left to do.
        # A failure here is not an error: fsync reports what matters.
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


_start_writeback = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range back now (no-op where unsupported)."""
    if _start_writeback is not None and nbytes > 0:
        _start_writeback(fd, offset, nbytes)


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
class _Piece:
    extent: int
    chunk: int
    view: memoryview


def _batches(extents: Sequence[Extent]) -> list[tuple[int, list[_Piece]]]:
    """Group extents' chunks into runs of contiguous file bytes, each at most BATCH_BYTES."""
    order = sorted(range(len(extents)), key=lambda i: extents[i].offset)
    batches: list[tuple[int, list[_Piece]]] = []
    cur: list[_Piece] = []
    cur_start = cur_end = -1
    for i in order:
        e = extents[i]
        n = e.buffer.nbytes
        pieces = [
            _Piece(i, k, e.buffer[k * CHUNK_BYTES : min(n, (k + 1) * CHUNK_BYTES)]) for k in range(chunk_count(n))
        ]
        pos = e.offset
        for p in pieces:
            size = p.view.nbytes
            fits = cur and pos == cur_end and cur_end - cur_start + size <= BATCH_BYTES and len(cur) < _IOV_MAX
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


def _write_batch(fd: int, offset: int, pieces: list[_Piece], crcs: list[list[int]]) -> int:
    views = [p.view for p in pieces if p.view.nbytes]
    total = sum(v.nbytes for v in views)
    done = 0
    while done < total:
        written = fs.pwritev(fd, _advance(views, done), offset + done)
        if written <= 0:
            raise OSError(errno_mod.EIO, "pwritev wrote no bytes")
        done += written
    for p in pieces:
        crcs[p.extent][p.chunk] = checksum(p.view)
    if _start_writeback is not None and total:
        _start_writeback(fd, offset, total)
    return total


def write_gathered(fd: int, offsets: Sequence[int], addresses: Sequence[int], sizes: Sequence[int]) -> list[int]:
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
    buf = bytearray(max(1, max(sizes), min(BATCH_BYTES, sum(sizes))))
    view = memoryview(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    memmove = ctypes.memmove
    start = fill = 0

    def flush() -> None:
        done = 0
        while done < fill:
            written = fs.pwrite(fd, view[done:fill], start + done)
            if written <= 0:
                raise OSError(errno_mod.EIO, "pwrite wrote no bytes")
            done += written
        if _start_writeback is not None and fill:
            _start_writeback(fd, start, fill)

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


#: Reads of fewer bytes in all run in the calling thread.
PARALLEL_READ_BYTES = 8 * 1024 * 1024
#: Largest single read: small enough that its checksum runs while the bytes are still in cache.
READ_BYTES = 1024 * 1024


def _read_exact(fd: int, views: list[memoryview], offset: int) -> None:
    total = sum(v.nbytes for v in views)
    done = 0
    while done < total:
        got = os.preadv(fd, _advance(views, done), offset + done)
        if got <= 0:
            raise EOFError(f"file ends at byte {offset + done}, expected {offset + total}")
        done += got


def _read_batch(fd: int, offset: int, pieces: list[_Piece], expected: Sequence[list[int] | None]) -> int:
    """Read one batch of contiguous file bytes in reads of at most READ_BYTES, checking each chunk once read.

    Small pieces share a read (one ``preadv`` of many buffers); a large one
    is read in parts, its checksum carried from part to part.
    """
    crcs = [0] * len(pieces)
    views: list[memoryview] = []
    parts: list[tuple[memoryview, int, bool]] = []  # (bytes, index of the piece, last part of that piece)
    pos, size = offset, 0

    def flush() -> None:
        nonlocal pos, size
        if size:
            _read_exact(fd, views, pos)
        pos += size
        for view, k, last in parts:
            want = expected[pieces[k].extent]
            if want is not None:
                crcs[k] = checksum(view, crcs[k])
                if last and crcs[k] != want[pieces[k].chunk]:
                    raise ChecksumError(pieces[k].extent, pieces[k].chunk)
        views.clear()
        parts.clear()
        size = 0

    for k, p in enumerate(pieces):
        n = p.view.nbytes
        if n == 0:
            parts.append((p.view, k, True))
        lo = 0
        while lo < n:
            take = min(n - lo, READ_BYTES - size)
            view = p.view[lo : lo + take] if take != n else p.view
            views.append(view)
            parts.append((view, k, lo + take == n))
            size += take
            lo += take
            if size >= READ_BYTES or len(views) >= _IOV_MAX:
                flush()
    flush()
    return pos - offset


def _split_in_order(batches: list[tuple[int, list[_Piece]]], parts: int) -> list[list[tuple[int, list[_Piece]]]]:
    """Cut the batches (in file order) into ``parts`` contiguous runs of about equal bytes."""
    sizes = [sum(p.view.nbytes for p in pieces) for _, pieces in batches]
    total = sum(sizes)
    runs: list[list[tuple[int, list[_Piece]]]] = [[] for _ in range(parts)]
    acc = 0
    for batch, size in zip(batches, sizes):
        index = min(parts - 1, acc * parts // total) if total else 0
        runs[index].append(batch)
        acc += size
    return [r for r in runs if r]


def _advance(views: list[memoryview], skip: int) -> list[memoryview]:
    if skip == 0:
        return views
    out = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out


def _run(jobs: Sequence[Callable[[], int]], threads: int) -> int:
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


def write_extents(fd: int, extents: Sequence[Extent], *, threads: int = 2) -> int:
    """Write every extent to ``fd`` at its offset and fill its ``crcs``.

    Returns:
        The number of bytes written.

    Raises:
        OSError: A write failed (the first error; all started writes are waited for).
    """
    crcs = [[0] * chunk_count(e.buffer.nbytes) for e in extents]
    jobs = [lambda o=o, p=p: _write_batch(fd, o, p, crcs) for o, p in _batches(extents)]
    total = _run(jobs, threads)
    for e, c in zip(extents, crcs):
        e.crcs = c
    return total


def read_extents(fd: int, extents: Sequence[Extent], *, threads: int = 2) -> int:
    """Fill every extent's buffer from ``fd``, verifying ``crcs`` where given.

    Returns:
        The number of bytes read.

    Raises:
        ChecksumError: A chunk does not match (names the extent and chunk).
        EOFError: The file is shorter than an extent needs.
        OSError: A read failed.
    """
    expected = [e.crcs for e in extents]
    if sum(e.buffer.nbytes for e in extents) < PARALLEL_READ_BYTES:
        threads = 1  # starting threads and opening files would cost more than they save
    runs = _split_in_order(_batches(extents), max(1, threads))
    # Each thread reads one contiguous part of the file in order, through its
    # own open file (its own readahead state): interleaved reads of one file
    # description defeat the kernel's readahead on cold reads.
    jobs = [lambda run=run: _read_run(fd, run, expected, own_fd=len(runs) > 1) for run in runs]
    return _run(jobs, threads)


def _read_run(fd: int, run: list[tuple[int, list[_Piece]]], expected: Sequence[list[int] | None], *, own_fd: bool) -> int:
    rfd = _reopen(fd) if own_fd else fd
    try:
        return sum(_read_batch(rfd, offset, pieces, expected) for offset, pieces in run)
    finally:
        if rfd != fd:
            os.close(rfd)


def _reopen(fd: int) -> int:
    """A new open file description of the file behind ``fd`` (falls back to ``fd``)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return fd
