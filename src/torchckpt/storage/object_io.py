"""Bytes to and from one object of an object store: :class:`ObjectStoreWriter`, :class:`ObjectStoreReader`.

An object of the format (a rank file) is stored as **segments** of
``SEGMENT_BYTES``: segment 0 under the object's own name, segment ``i`` under
``<name>.seg<i:05d>``. Why segments rather than one multipart upload: each
segment is one plain PUT, atomic, retried whole by the client, uploaded in
parallel with the others, and visible as an ordinary object — a crashed save
leaves objects that the next save or ``gc`` deletes with their generation,
never invisible incomplete multipart uploads that cost storage until a
lifecycle rule finds them; and the store's per-request limits (5 MiB minimum
part, 10,000 parts) do not apply. Segment 0 carries the layout as metadata
(``torchckpt-segments``, ``torchckpt-segment-bytes``, ``torchckpt-size``), so
it is put at ``sync``, beside the last segments (what says that an object is
complete is the manifest, committed only after every object's ``sync``). An
object that fits one segment is one plain object without that metadata.

The writer takes positional writes (``write_at``, from several threads, the
format's order: header first, then the tensors), copies each once (the caller
may reuse its buffer when ``write_at`` returns) into the segment being filled
— pieces that arrive ahead of the next byte wait until the gap before them is
written — and hands each full segment to a pool of ``UPLOAD_CONCURRENCY``
uploading threads while the format goes on writing. ``sync`` uploads the rest
and segment 0 and waits for all (bounded): when it returns the object exists,
whole; ``close`` without ``sync`` abandons it (segment 0 never appears).

The reader serves positional reads from aligned blocks of ``RANGE_BYTES``,
fetched by parallel ranged GETs with read-ahead (:class:`_Blocks`), and copies
them into the caller's views (the target tensors).
:meth:`ObjectStoreReader.fileno` gives the readers that need a file
descriptor (``torch.load`` of the ``torch_save`` layout, lazy views) an
anonymous in-memory file holding the object.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from ..errors import CorruptCheckpointError
from .base import skip_bytes
from .object_client import is_connection_error, os_error

__all__ = ["BytesReader", "ObjectLayout", "ObjectStoreReader", "ObjectStoreWriter", "layout_of", "segment_key"]

#: Bytes per segment of an object (each one PUT).
SEGMENT_BYTES = 32 << 20
#: Segments of one object uploaded at once.
UPLOAD_CONCURRENCY = 8
#: Bytes per ranged GET of a read (and per block of the read cache).
RANGE_BYTES = 16 << 20
#: Ranged GETs in flight at once (all objects of a process).
FETCH_THREADS = 16
#: Blocks a sequential reader fetches at once.
READ_AHEAD_BLOCKS = 8
#: Blocks kept per object (least recently used dropped).
CACHE_BLOCKS = 16
#: Reads at least this large bypass the blocks.
DIRECT_READ_BYTES = 4 * RANGE_BYTES
#: Sends of one segment whose connection failed before an answer came.
PUT_ATTEMPTS = 3
#: Longest wait, when an object is abandoned, for its segments being uploaded.
ABANDON_WAIT_S = 30.0
#: Longest wait for an upload slot, for the uploads at ``sync``, or for a block another thread fetches.
UPLOAD_WAIT_S = 900.0

#: The metadata of segment 0 of an object stored in several segments.
SEGMENTS_ATTRIBUTE = "torchckpt-segments"
SEGMENT_BYTES_ATTRIBUTE = "torchckpt-segment-bytes"
SIZE_ATTRIBUTE = "torchckpt-size"

_fetch_lock = threading.Lock()
_fetch_pool: ThreadPoolExecutor | None = None


def segment_key(key: str, index: int) -> str:
    """The key of segment ``index`` of the object ``key`` (segment 0 is the object's own key)."""
    return key if index == 0 else f"{key}.seg{index:05d}"


def _copy_into(views: Sequence[memoryview], offset_in: int, data: memoryview) -> None:
    """Copy ``data`` into ``views`` (back to back) starting ``offset_in`` bytes into them."""
    pos = 0
    for v in skip_bytes(views, offset_in):
        if pos >= data.nbytes:
            break
        n = min(v.nbytes, data.nbytes - pos)
        v.cast("B")[:n] = data[pos : pos + n]
        pos += n


def _obstore() -> Any:
    import obstore

    return obstore


def _put(store: Any, key: str, data: memoryview | bytes, attributes: dict[str, str] | None = None) -> None:
    """One plain PUT, sent again (``PUT_ATTEMPTS`` in all) when no answer came back.

    The client retries a PUT that the server refused (5xx, throttling) but not
    one whose connection failed, since it cannot know whether the PUT took
    effect; a plain PUT of the same bytes is idempotent, so sending it again is
    right here (a conditional commit is not, and decides for itself).
    """
    for attempt in range(PUT_ATTEMPTS):
        try:
            _obstore().put(store, key, data, attributes=attributes, use_multipart=False)
            return
        except Exception as e:
            if attempt == PUT_ATTEMPTS - 1 or not is_connection_error(e):
                raise
            time.sleep(0.1 * 2**attempt)


class ObjectStoreWriter:
    """One object of a pending generation, written as segments uploaded in parallel.

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
        self._next = 0  # the next byte of the object to be appended
        self._ahead: dict[int, bytes] = {}  # pieces past a gap, by offset
        self._segment = bytearray()  # the segment being filled
        self._fill = 0
        self._index = 0  # its number
        self._first: memoryview | None = None  # segment 0, put at sync
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[Future[None]] = []
        self._slots = threading.BoundedSemaphore(UPLOAD_CONCURRENCY)
        self._spares: list[bytearray] = []  # segment buffers uploaded, to be filled again
        self._spares_lock = threading.Lock()
        self._error: BaseException | None = None
        self._synced = False
        self._closed = False

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        """Copy ``views`` into the object at ``offset``; return their size (the whole write is always taken).

        Raises:
            OSError: An upload failed before, or the range overlaps bytes written before (EINVAL).
        """
        with self._lock:
            self._check_open()
            if offset < self._next or offset in self._ahead:
                raise OSError(errno.EINVAL, f"write to {self.location}: bytes at {offset} are written already")
            if offset != self._next:  # ahead of a gap: keep a copy until the gap is written
                data = b"".join(views)
                self._ahead[offset] = data
                return len(data)
            total = 0
            for v in views:
                total += self._append(v.cast("B") if v.format != "B" or v.ndim != 1 else v)
            while self._next in self._ahead:
                self._append(memoryview(self._ahead.pop(self._next)))
            return total

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Nothing to do: a segment is uploaded as soon as it is full."""

    def _check_open(self) -> None:
        if self._closed or self._synced:
            raise OSError(errno.EBADF, f"write to {self.location}: the object is closed")
        if self._error is not None:
            raise os_error(self._error, "upload", self.location) from self._error

    def _append(self, data: memoryview) -> int:
        pos = 0
        while pos < data.nbytes:
            if not self._segment:
                self._segment = self._spare() or bytearray(SEGMENT_BYTES)
            n = min(SEGMENT_BYTES - self._fill, data.nbytes - pos)
            # through a memoryview: a bytearray's own slice assignment copies the source once more first
            memoryview(self._segment)[self._fill : self._fill + n] = data[pos : pos + n]
            self._fill += n
            pos += n
            if self._fill == SEGMENT_BYTES:
                self._seal()
        self._next += data.nbytes
        return data.nbytes

    def _seal(self) -> None:
        """The segment being filled is complete: keep it (segment 0) or start its upload."""
        buffer, fill = self._segment, self._fill
        data = memoryview(buffer)[:fill]
        index = self._index
        self._segment, self._fill, self._index = bytearray(), 0, index + 1
        if index == 0:
            self._first = data
            return
        waited = 0.0
        while not self._slots.acquire(timeout=1.0):
            if self._error is not None:
                raise os_error(self._error, "upload", self.location) from self._error
            waited += 1.0
            if waited >= UPLOAD_WAIT_S:
                raise OSError(errno.ETIMEDOUT, f"upload {self.location}: no progress in {UPLOAD_WAIT_S:.0f}s")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(UPLOAD_CONCURRENCY, thread_name_prefix="torchckpt-upload")
        del data
        self._uploads.append(self._pool.submit(self._put_segment, index, buffer, fill))

    def _put_segment(self, index: int, buffer: bytearray, fill: int) -> None:
        data = memoryview(buffer)[:fill]
        try:
            _put(self._store, segment_key(self._key, index), data)
        except BaseException as e:  # seen by the writing threads and by sync
            if self._error is None:
                self._error = e
            raise
        finally:
            self._slots.release()
        try:
            data.release()
        except BufferError:  # the client still holds the bytes: the buffer is not reused
            return
        with self._spares_lock:
            if len(self._spares) < UPLOAD_CONCURRENCY:
                self._spares.append(buffer)

    def _spare(self) -> bytearray | None:
        """A segment buffer whose upload is done and that nothing else holds, for the next segment.

        Fresh memory costs a page fault per page (about 0.5 s per GiB here);
        a buffer is reused only when no export of it is left (a store that
        keeps the bytes it was given, as the in-memory one does, keeps them
        exported, and such a buffer is never written again).
        """
        with self._spares_lock:
            while self._spares:
                buffer = self._spares.pop()
                try:
                    buffer.append(0)  # a resize fails (BufferError) while any export of it lives
                    del buffer[-1]
                except BufferError:
                    continue
                return buffer
        return None

    def sync(self) -> None:
        """Upload what is left, wait for every segment, then put segment 0: the object exists, whole.

        Raises:
            OSError: An upload failed (errno says why; the message names the URL), or
                bytes are missing before the end (EIO).
        """
        with self._lock:
            self._check_open()
            if self._ahead:
                gap = min(self._ahead)
                raise OSError(errno.EIO, f"upload {self.location}: bytes {self._next}..{gap} were never written")
            if self._fill or self._index == 0:
                self._seal()
            count = self._index
            if count == 1:  # one plain object
                try:
                    _put(self._store, self._key, self._first)
                except Exception as e:
                    raise os_error(e, "put", self.location) from e
            else:  # segment 0 carries the layout; it goes up beside the last segments
                attributes = {
                    SEGMENTS_ATTRIBUTE: str(count), SEGMENT_BYTES_ATTRIBUTE: str(SEGMENT_BYTES),
                    SIZE_ATTRIBUTE: str(self._next),
                }  # fmt: skip
                assert self._pool is not None
                self._uploads.append(self._pool.submit(_put, self._store, self._key, self._first, attributes))
            for f in self._uploads:
                try:
                    f.result(timeout=UPLOAD_WAIT_S)
                except TimeoutError:
                    raise OSError(errno.ETIMEDOUT, f"upload {self.location}: not finished in {UPLOAD_WAIT_S:.0f}s") from None
                except Exception as e:
                    raise os_error(e, "upload", self.location) from e
            self._synced = True
            self._release()

    def _release(self) -> None:
        self._first, self._segment, self._ahead = None, bytearray(), {}
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Release the object; one not finished by ``sync`` is abandoned (its segment 0 never appears).

        Segments not started are dropped and those being uploaded are waited for
        (at most ``ABANDON_WAIT_S``), so that a save that discards its generation
        next deletes them too.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            uploads, self._uploads = self._uploads, []
            self._release()
        deadline = time.monotonic() + ABANDON_WAIT_S
        for f in uploads:
            with contextlib.suppress(BaseException):
                f.result(timeout=max(0.0, deadline - time.monotonic()))


class ObjectLayout:
    """Where the bytes of one object are: its segments.

    Args:
        key: The object's key (segment 0).
        size: Its size in bytes.
        segment_bytes: Bytes per segment (all but the last are this long).
        count: How many segments.
    """

    def __init__(self, key: str, size: int, segment_bytes: int, count: int) -> None:
        self.key, self.size, self.segment_bytes, self.count = key, size, segment_bytes, count

    def pieces(self, start: int, nbytes: int) -> list[tuple[str, int, int]]:
        """The byte range ``[start, start + nbytes)`` as ``(segment key, start in it, length)`` pieces."""
        out = []
        end = start + nbytes
        while start < end:
            i = start // self.segment_bytes
            local = start - i * self.segment_bytes
            n = min(end - start, self.segment_bytes - local)
            out.append((segment_key(self.key, i), local, n))
            start += n
        return out


def layout_of(key: str, location: str, size: int, attributes: Any) -> ObjectLayout:
    """The layout of the object whose segment 0 has ``size`` bytes and metadata ``attributes``.

    Raises:
        CorruptCheckpointError: The metadata is not a consistent segment layout (names the object).
    """
    if SEGMENTS_ATTRIBUTE not in attributes:
        return ObjectLayout(key, size, max(1, size), 1)
    try:
        count = int(attributes[SEGMENTS_ATTRIBUTE])
        segment = int(attributes[SEGMENT_BYTES_ATTRIBUTE])
        total = int(attributes[SIZE_ATTRIBUTE])
    except (KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"corrupt object {location}: bad segment metadata ({e})", path=location) from e
    if segment <= 0 or total <= 0 or count != -(-total // segment) or size != segment:
        raise CorruptCheckpointError(
            f"corrupt object {location}: segment metadata does not fit: {count} segments of {segment} bytes "
            f"for {total} bytes, segment 0 holds {size}",
            path=location,
        )
    return ObjectLayout(key, total, segment, count)


def _pool() -> ThreadPoolExecutor:
    global _fetch_pool
    with _fetch_lock:
        if _fetch_pool is None:
            _fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="torchckpt-get")
        return _fetch_pool


class _Blocks:
    """The blocks of one object fetched so far, shared by its handles: ranged GETs of ``RANGE_BYTES``, read ahead.

    A load reads a rank file as many small positional reads (a checksum chunk
    each) from a few threads; one GET each would pay a request's latency per
    MiB. Reads are served from aligned blocks instead, fetched in parallel
    (ranged GETs): a miss right after the previous block (a sequential
    reader) asks for the next ``READ_AHEAD_BLOCKS`` in the background, so
    that they arrive while it copies and checks the ones it has; any other
    miss asks for its block and the next. At most ``CACHE_BLOCKS`` are kept (least recently used go).
    The GETs of all objects share one pool of ``FETCH_THREADS`` threads.
    """

    def __init__(self, store: Any, layout: ObjectLayout, location: str) -> None:
        self.store, self.layout, self.location, self.size = store, layout, location, layout.size
        # Reentrant: a GET already done when it is requested lands at once, under the lock that requested it.
        self._lock = threading.RLock()
        self._blocks: OrderedDict[int, memoryview] = OrderedDict()
        self._fetching: dict[int, threading.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._last = -2

    def _get(self, key: str, start: int, nbytes: int) -> memoryview:
        try:
            data = memoryview(_obstore().get_range(self.store, key, start=start, length=nbytes))
        except Exception as e:
            raise os_error(e, "read", self.location) from e
        if data.nbytes != nbytes:
            raise OSError(errno.EIO, f"read {self.location}: a ranged GET at {start} returned {data.nbytes} of {nbytes} bytes")
        return data

    def fetch(self, start: int, nbytes: int, sink: Callable[[int, memoryview], None]) -> None:
        """Bytes ``[start, start + nbytes)`` by ranged GETs in parallel, each handed to ``sink(offset, data)`` as it lands.

        Each GET reads at most ``RANGE_BYTES`` of one segment, so no range is
        joined from pieces, and a landed range is released once ``sink`` took it.

        Raises:
            OSError: A GET failed (the first failure; every started GET is waited for).
        """
        pending = {}
        for key, local, n in self.layout.pieces(start, nbytes):
            for k in range(0, n, RANGE_BYTES):
                m = min(RANGE_BYTES, n - k)
                pending[_pool().submit(self._get, key, local + k, m)] = start
                start += m
        error: BaseException | None = None
        try:
            for f in as_completed(pending, timeout=UPLOAD_WAIT_S):
                try:
                    data = f.result()
                except BaseException as e:  # noqa: BLE001 - the first is raised once all are done
                    error = error or e
                    continue
                if error is None:
                    sink(pending[f], data)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"read {self.location}: no answer in {UPLOAD_WAIT_S:.0f}s") from None
        if error is not None:
            raise error

    def block(self, i: int) -> memoryview:
        """Block ``i``, waited for when missing; the blocks after it are requested ahead of a sequential reader.

        Raises:
            OSError: Its GET failed (names the URL), or no answer within ``UPLOAD_WAIT_S``.
        """
        count = -(-self.size // RANGE_BYTES)
        with self._lock:
            got = self._blocks.get(i)
            if got is not None:
                self._blocks.move_to_end(i)
            ahead = READ_AHEAD_BLOCKS if i in (self._last, self._last + 1) else 2
            self._last = i
            for j in range(i, min(i + ahead, count)):
                self._start(j)
            waiting = self._fetching.get(i)
        if got is not None:
            return got
        if waiting is not None and not waiting.wait(UPLOAD_WAIT_S):
            raise OSError(errno.ETIMEDOUT, f"read {self.location}: block {i} not fetched in {UPLOAD_WAIT_S:.0f}s")
        with self._lock:
            if i in self._errors:
                raise self._errors.pop(i)
            got = self._blocks.get(i)
        return got if got is not None else self.block(i)  # dropped meanwhile: fetch it again

    def _start(self, j: int) -> None:
        """Request block ``j`` in the background unless it is here or on its way (the lock is held)."""
        if j in self._blocks or j in self._fetching:
            return
        done = threading.Event()
        self._fetching[j] = done
        start = j * RANGE_BYTES
        nbytes = min(RANGE_BYTES, self.size - start)
        job = _pool().submit(self._get_block, start, nbytes)
        job.add_done_callback(lambda f: self._landed(j, f, done))

    def _get_block(self, start: int, nbytes: int) -> memoryview:
        parts = [self._get(key, s, n) for key, s, n in self.layout.pieces(start, nbytes)]
        return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))

    def _landed(self, j: int, job: Future[memoryview], done: threading.Event) -> None:
        with self._lock:
            self._fetching.pop(j, None)
            error = job.exception()
            if error is not None:
                self._errors[j] = error
            else:
                self._blocks[j] = job.result()
                while len(self._blocks) > CACHE_BLOCKS:
                    self._blocks.popitem(last=False)
        done.set()


class ObjectStoreReader:
    """One object of a committed generation, read by parallel ranged GETs.

    Args:
        store: The client's store of the bucket.
        layout: Where its bytes are (``layout_of`` the object's segment 0).
        location: Its URL, for messages.
    """

    def __init__(self, store: Any, layout: ObjectLayout, location: str, blocks: _Blocks | None = None) -> None:
        self._blocks = blocks or _Blocks(store, layout, location)
        self.location = location
        self.size = layout.size
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
            self._blocks.fetch(offset, want, lambda at, data: _copy_into(views, at - offset, data))
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
        return ObjectStoreReader(None, self._blocks.layout, self.location, self._blocks)

    def fileno(self) -> int | None:
        """An anonymous in-memory file holding the object, downloaded on the first call (for ``mmap`` and ``torch.load``)."""
        if self._fd is None:
            fd = os.memfd_create("torchckpt-object", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.size)
                if self.size:
                    mm = mmap.mmap(fd, self.size)

                    def land(at: int, data: memoryview) -> None:
                        mm[at : at + data.nbytes] = data

                    try:
                        self._blocks.fetch(0, self.size, land)
                    finally:
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
