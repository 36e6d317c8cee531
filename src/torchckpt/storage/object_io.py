"""Bytes to and from one object of an object store: :class:`ObjectStoreWriter`, :class:`ObjectStoreReader`.

The writer takes positional writes (``write_at``, from several threads, the
format's order: header first, then the tensors) and streams them, in file
order, to one parallel multipart upload straight from memory: no temporary
file, no second pass. Each write is copied once (the caller may reuse its
buffer when ``write_at`` returns); pieces that arrive ahead of the next byte
to upload wait in memory until the gap before them is written. An object
smaller than one part is put whole at ``sync``. The upload runs on a thread of
its own while the format goes on writing; ``sync`` waits for it (bounded) and
is the moment the object exists; ``close`` without ``sync`` aborts it, and
nothing of it becomes visible.

The reader serves ranged reads: a read is split into ranges of
``RANGE_BYTES`` fetched in parallel (``get_ranges``) and copied into the
caller's views (the target tensors). :meth:`ObjectStoreReader.fileno` gives
the readers that need a file descriptor (``torch.load`` of the ``torch_save``
layout, lazy views) an anonymous in-memory file holding the object.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from .base import skip_bytes
from .object_client import os_error

__all__ = ["BytesReader", "ObjectStoreReader", "ObjectStoreWriter"]

#: Bytes per part of a multipart upload (S3 allows 10,000 parts: objects up to 320 GiB).
PART_BYTES = 32 << 20
#: Parts uploaded at once by one object's upload.
UPLOAD_CONCURRENCY = 8
#: Bytes per ranged GET of a read (and per block of the read cache); up to ten are in flight at once.
RANGE_BYTES = 16 << 20
#: Blocks a sequential reader fetches at once.
READ_AHEAD_BLOCKS = 8
#: Blocks kept per object (least recently used dropped).
CACHE_BLOCKS = 16
#: Reads at least this large bypass the blocks.
DIRECT_READ_BYTES = 4 * RANGE_BYTES
#: Pieces queued for the upload before ``write_at`` waits for it.
QUEUE_DEPTH = 16
#: Longest wait for the upload to take a piece or to finish after the last one.
UPLOAD_WAIT_S = 900.0

_END = object()


def _copy_into(views: Sequence[memoryview], offset_in: int, data: memoryview) -> None:
    """Copy ``data`` into ``views`` (back to back) starting ``offset_in`` bytes into them."""
    pos = 0
    for v in skip_bytes(views, offset_in):
        if pos >= data.nbytes:
            break
        n = min(v.nbytes, data.nbytes - pos)
        v.cast("B")[:n] = data[pos : pos + n]
        pos += n


class ObjectStoreWriter:
    """One object of a pending generation, written through a streamed multipart upload.

    Args:
        store: The client's store of the bucket.
        key: The object's key.
        location: Its URL, for messages.
    """

    def __init__(self, store: Any, key: str, location: str) -> None:
        self._store = store
        self._key = key
        self.location = location
        self._lock = threading.Lock()
        self._next = 0  # the next byte the upload takes
        self._ahead: dict[int, bytes] = {}  # pieces past a gap, by offset
        self._head: list[bytes] = []  # the first bytes, before the upload starts
        self._head_bytes = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._synced = False
        self._closed = False

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        """Copy ``views`` for upload at ``offset``; return their size (the whole write is always taken).

        Raises:
            OSError: The upload failed before, or the range overlaps bytes written before (EINVAL).
        """
        data = b"".join(views)
        with self._lock:
            self._check_open()
            if offset < self._next or offset in self._ahead:
                raise OSError(errno.EINVAL, f"write to {self.location}: bytes at {offset} are written already")
            self._ahead[offset] = data
            while self._next in self._ahead:
                piece = self._ahead.pop(self._next)
                self._next += len(piece)
                self._emit(piece)
        return len(data)

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Nothing to do: the upload takes bytes as soon as they are contiguous."""

    def _check_open(self) -> None:
        if self._closed or self._synced:
            raise OSError(errno.EBADF, f"write to {self.location}: the object is closed")
        if self._error is not None:
            raise os_error(self._error, "upload", self.location) from self._error

    def _emit(self, piece: bytes) -> None:
        if self._thread is None:
            self._head.append(piece)
            self._head_bytes += len(piece)
            if self._head_bytes < PART_BYTES:
                return
            self._thread = threading.Thread(target=self._upload, name=f"torchckpt-upload {self._key}", daemon=True)
            self._thread.start()
            pieces, self._head = self._head, []
        else:
            pieces = [piece]
        for p in pieces:
            self._offer(p)

    def _offer(self, item: Any) -> None:
        waited = 0.0
        while True:
            if self._error is not None:
                raise os_error(self._error, "upload", self.location) from self._error
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                waited += 1.0
                if waited >= UPLOAD_WAIT_S:
                    raise OSError(errno.ETIMEDOUT, f"upload {self.location}: no progress in {UPLOAD_WAIT_S:.0f}s")

    def _pieces(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get(timeout=UPLOAD_WAIT_S)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _upload(self) -> None:
        import obstore

        try:
            obstore.put(
                self._store, self._key, self._pieces(), chunk_size=PART_BYTES, max_concurrency=UPLOAD_CONCURRENCY
            )
        except BaseException as e:  # reported to the writing threads and to sync
            self._error = e
            _drain(self._queue)
        finally:
            self._done.set()

    def sync(self) -> None:
        """Finish the upload: the object exists, whole, when this returns.

        Raises:
            OSError: The upload failed (errno says why; the message names the URL), or
                bytes are missing before the end (EIO).
        """
        import obstore

        with self._lock:
            self._check_open()
            if self._ahead:
                gap = min(self._ahead)
                raise OSError(errno.EIO, f"upload {self.location}: bytes {self._next}..{gap} were never written")
            if self._thread is None:
                try:
                    obstore.put(self._store, self._key, b"".join(self._head), use_multipart=False)
                except Exception as e:
                    raise os_error(e, "put", self.location) from e
                self._head = []
            else:
                self._offer(_END)
                if not self._done.wait(UPLOAD_WAIT_S):
                    raise OSError(errno.ETIMEDOUT, f"upload {self.location}: not finished in {UPLOAD_WAIT_S:.0f}s")
                if self._error is not None:
                    raise os_error(self._error, "upload", self.location) from self._error
            self._synced = True

    def close(self) -> None:
        """Release the object; an upload not finished by ``sync`` is aborted (nothing becomes visible)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._head, self._ahead = [], {}
            if self._thread is not None and not self._done.is_set():
                _drain(self._queue)
                try:
                    self._queue.put(OSError(errno.ECANCELED, "the save was abandoned"), timeout=1.0)
                except queue.Full:
                    pass
                self._done.wait(30.0)


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


class _Blocks:
    """The blocks of one object fetched so far, shared by its handles: ranged GETs of ``RANGE_BYTES``, read ahead.

    A load reads a rank file as many small positional reads (a checksum chunk
    each) from a few threads; one GET each would pay a request's latency per
    MiB. Reads are served from aligned blocks instead, fetched in parallel
    (``get_ranges``): a miss right after the previous block (a sequential
    reader) fetches ``READ_AHEAD_BLOCKS`` at once, any other miss its block
    and the next. At most ``CACHE_BLOCKS`` are kept (least recently used go).
    """

    def __init__(self, store: Any, key: str, location: str, size: int) -> None:
        self.store, self.key, self.location, self.size = store, key, location, size
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, memoryview] = OrderedDict()
        self._fetching: dict[int, threading.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._last = -2

    def fetch(self, starts: list[int], lengths: list[int]) -> list[memoryview]:
        """The byte ranges ``starts[i] .. + lengths[i]`` by parallel ranged GETs (each checked for its length)."""
        import obstore

        try:
            parts = obstore.get_ranges(self.store, self.key, starts=starts, lengths=lengths, coalesce=0)
        except Exception as e:
            raise os_error(e, "read", self.location) from e
        out = []
        for s, n, part in zip(starts, lengths, parts):
            data = memoryview(part)
            if data.nbytes != n:
                raise OSError(errno.EIO, f"read {self.location}: a ranged GET at {s} returned {data.nbytes} of {n} bytes")
            out.append(data)
        return out

    def block(self, i: int) -> memoryview:
        """Block ``i``, fetched (with its read-ahead) when missing; raises the fetch's OSError."""
        with self._lock:
            got = self._blocks.get(i)
            if got is not None:
                self._blocks.move_to_end(i)
                self._last = i
                return got
            waiting = self._fetching.get(i)
            todo: list[int] = []
            if waiting is None:
                ahead = READ_AHEAD_BLOCKS if i == self._last + 1 else 2
                count = -(-self.size // RANGE_BYTES)
                todo = [j for j in range(i, min(i + ahead, count)) if j not in self._blocks and j not in self._fetching]
                waiting = threading.Event()
                for j in todo:
                    self._fetching[j] = waiting
            self._last = i
        if todo:
            self._fetch_blocks(todo, waiting)
        elif not waiting.wait(UPLOAD_WAIT_S):
            raise OSError(errno.ETIMEDOUT, f"read {self.location}: block {i} not fetched in {UPLOAD_WAIT_S:.0f}s")
        with self._lock:
            if i in self._errors:
                raise self._errors.pop(i)
            got = self._blocks.get(i)
        return got if got is not None else self.block(i)  # evicted meanwhile: fetch it again

    def _fetch_blocks(self, todo: list[int], done: threading.Event) -> None:
        starts = [j * RANGE_BYTES for j in todo]
        lengths = [min(RANGE_BYTES, self.size - s) for s in starts]
        try:
            parts: list[memoryview] | None = self.fetch(starts, lengths)
            error: BaseException | None = None
        except OSError as e:
            parts, error = None, e
        with self._lock:
            for k, j in enumerate(todo):
                self._fetching.pop(j, None)
                if parts is not None:
                    self._blocks[j] = parts[k]
                else:
                    self._errors[j] = error  # type: ignore[assignment]
            while len(self._blocks) > CACHE_BLOCKS:
                self._blocks.popitem(last=False)
        done.set()


class ObjectStoreReader:
    """One object of a committed generation, read by parallel ranged GETs.

    Args:
        store: The client's store of the bucket.
        key: The object's key.
        location: Its URL, for messages.
        size: Its size in bytes (from the listing or a HEAD).
    """

    def __init__(self, store: Any, key: str, location: str, size: int, blocks: _Blocks | None = None) -> None:
        self._blocks = blocks or _Blocks(store, key, location, size)
        self.location = location
        self.size = size
        self._fd: int | None = None

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` from ``offset``; return the bytes read (fewer at the end).

        Reads of ``DIRECT_READ_BYTES`` or more go straight to parallel ranged GETs;
        smaller ones are served from the shared blocks (read ahead).

        Raises:
            OSError: A GET failed (errno and message name the URL and why).
        """
        want = min(sum(v.nbytes for v in views), max(0, self.size - offset))
        if want <= 0:
            return 0
        if want >= DIRECT_READ_BYTES:
            starts = list(range(offset, offset + want, RANGE_BYTES))
            parts = self._blocks.fetch(starts, [min(RANGE_BYTES, offset + want - s) for s in starts])
            for s, data in zip(starts, parts):
                _copy_into(views, s - offset, data)
            return want
        pos = offset
        while pos < offset + want:
            i = pos // RANGE_BYTES
            block = self._blocks.block(i)
            start = pos - i * RANGE_BYTES
            n = min(block.nbytes - start, offset + want - pos)
            _copy_into(views, pos - offset, block[start : start + n])
            pos += n
        return want

    def read(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset``."""
        buf = bytearray(max(0, min(nbytes, self.size - offset)))
        if buf:
            self.read_into([memoryview(buf)], offset)
        return bytes(buf)

    def reopen(self) -> ObjectStoreReader:
        """Another handle on the object, sharing its fetched blocks (the client is thread-safe)."""
        return ObjectStoreReader(None, "", self.location, self.size, self._blocks)

    def fileno(self) -> int | None:
        """An anonymous in-memory file holding the object, downloaded on the first call (for ``mmap`` and ``torch.load``)."""
        if self._fd is None:
            fd = os.memfd_create("torchckpt-object", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.size)
                if self.size:
                    with mmap.mmap(fd, self.size) as mm:
                        starts = list(range(0, self.size, RANGE_BYTES))
                        parts = self._blocks.fetch(starts, [min(RANGE_BYTES, self.size - s) for s in starts])
                        for s, data in zip(starts, parts):
                            mm[s : s + data.nbytes] = data
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def close(self) -> None:
        """Release the in-memory file, if one was made (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BytesReader:
    """An object already in memory (the marker, read whole when a generation is opened), as an ``ObjectReader``."""

    def __init__(self, data: bytes, location: str) -> None:
        self._data = data
        self.location = location
        self.size = len(data)

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` from ``offset``; return the bytes copied."""
        want = min(sum(v.nbytes for v in views), max(0, self.size - offset))
        _copy_into(views, 0, memoryview(self._data)[offset : offset + want])
        return want

    def read(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset``."""
        return self._data[offset : offset + nbytes]

    def reopen(self) -> BytesReader:
        """The same bytes."""
        return self

    def fileno(self) -> int | None:
        """None: not a file."""
        return None

    def close(self) -> None:
        """Nothing to release."""
