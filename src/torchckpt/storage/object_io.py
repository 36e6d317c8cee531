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

import contextlib
import errno
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from .base import skip_bytes
from .object_client import os_error

__all__ = ["BytesReader", "ObjectStoreReader", "ObjectStoreWriter"]

#: Bytes per part of a multipart upload (S3 allows 10,000 parts: objects up to 320 GiB).
PART_BYTES = 32 << 20
#: Parts uploaded at once by one object's upload.
UPLOAD_CONCURRENCY = 8
#: Bytes per ranged GET of a read; up to ten are in flight at once.
RANGE_BYTES = 16 << 20
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


class ObjectStoreReader:
    """One object of a committed generation, read by parallel ranged GETs.

    Args:
        store: The client's store of the bucket.
        key: The object's key.
        location: Its URL, for messages.
        size: Its size in bytes (from the listing or a HEAD).
    """

    def __init__(self, store: Any, key: str, location: str, size: int) -> None:
        self._store = store
        self._key = key
        self.location = location
        self.size = size
        self._fd: int | None = None

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` from ``offset`` by parallel ranged GETs; return the bytes read (fewer at the end).

        Raises:
            OSError: A GET failed (errno and message name the URL and why).
        """
        import obstore

        want = min(sum(v.nbytes for v in views), max(0, self.size - offset))
        if want <= 0:
            return 0
        starts = list(range(offset, offset + want, RANGE_BYTES))
        lengths = [min(RANGE_BYTES, offset + want - s) for s in starts]
        try:
            parts = obstore.get_ranges(self._store, self._key, starts=starts, lengths=lengths, coalesce=0)
        except Exception as e:
            raise os_error(e, "read", self.location) from e
        for s, part in zip(starts, parts):
            data = memoryview(part)
            if data.nbytes != min(RANGE_BYTES, offset + want - s):
                raise OSError(errno.EIO, f"read {self.location}: a ranged GET at {s} returned {data.nbytes} bytes")
            _copy_into(views, s - offset, data)
        return want

    def read(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset``."""
        buf = bytearray(max(0, min(nbytes, self.size - offset)))
        if buf:
            self.read_into([memoryview(buf)], offset)
        return bytes(buf)

    def reopen(self) -> ObjectStoreReader:
        """Another handle on the object (the client is shared and thread-safe)."""
        return ObjectStoreReader(self._store, self._key, self.location, self.size)

    def fileno(self) -> int | None:
        """An anonymous in-memory file holding the object, downloaded on the first call (for ``mmap`` and ``torch.load``)."""
        if self._fd is None:
            fd = os.memfd_create("torchckpt-object", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.size)
                if self.size:
                    import mmap

                    mm = mmap.mmap(fd, self.size)
                    try:
                        self.read_into([memoryview(mm)], 0)
                    finally:
                        # After a failed read its traceback still holds views of the map, and close()
                        # would raise BufferError over the read's error: the map then goes with them.
                        with contextlib.suppress(BufferError):
                            mm.close()
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
