"""What a checkpoint needs from the place its bytes live: the ``Storage`` protocol.

A checkpoint is one *generation* of named objects at a location: the rank
files, small per-rank records, and one *marker* (the manifest) whose presence
says the generation is complete. Storage moves bytes and makes a generation
visible atomically; it knows no file names of the format (the writer names
every object, the marker included) and nothing above it knows which storage
it talks to. ``storage/local.py`` is the local-directory implementation.

Call order of a save (``CheckpointWriter.write``)::

    every rank    session = storage.begin_save(rank=r, world_size=w, coordinator=r == 0,
                                               timeout_s=t, marker=name, save_id=s)
                      (coordinator: waits for the location's lock, settles what an
                      interrupted save left, starts a clean pending generation
                      without a stale marker; every rank: the pending generation
                      exists when this returns; on failure it raises having
                      released what it took, and with w == 1 removed what it began)
    every rank    out = session.create(name)          # one per object it writes
                      out.write_at(views, offset)     # positional, from any thread, any order
                      out.sync(); out.close()         # durable once sync returns
    every rank    session.put(name, data)             # a small durable object (a rank's record)
    (barrier: every rank's objects are durable)
    coordinator   session.get(name) / session.delete(name)   # the ranks' records
    coordinator   session.commit(data, owned=is_format_object)
                      # the marker (named at begin_save) written last; the generation
                      # replaces the old one atomically; objects of the old generation
                      # for which ``owned`` is False are kept
    every rank    session.close(discard=w == 1)       # always, in a finally block

Call order of a load (``CheckpointReader.read``, ``verify``, the tools)::

    gen = storage.open_generation(marker)  # the generation committed now (a snapshot)
    src = gen.open(name)                 # FileNotFoundError when it has no such object
    src.size; src.read_into(views, offset); src.read(offset, nbytes)
                                         # (ENOENT: an object store deleted the object of a
                                         # replaced generation under its reader: read again)
    src.close()
    gen.replaced()                       # a missing object: another save replaced the
                                         # generation (read again), or corruption
    gen.close()

Errors: storage raises ``OSError`` (with ``errno``) for what the system
refuses while bytes move; the callers turn it into ``CheckpointIOError`` /
``CorruptCheckpointError`` naming rank, operation and path. What a storage
refuses by its own rules when a generation or object is opened (a link at the
checkpoint's name, an object that is not a regular file, a URL it cannot
serve) it raises as ``CheckpointNotFoundError`` / ``CorruptCheckpointError`` /
``UnsupportedURLError`` itself, with the message a user needs.

Lifetimes: an ``ObjectReader`` stays usable after its ``Generation`` is
closed (the tools keep a rank file mapped after the snapshot is released).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["Generation", "ObjectReader", "ObjectWriter", "SaveSession", "Storage", "skip_bytes"]


def skip_bytes(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes: what is left after a short positional read or write."""
    out = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out


class ObjectWriter(Protocol):
    """One object being written in a pending generation."""

    #: Where the object is, for messages (a path or a URL).
    location: str

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        """Write ``views`` back to back starting at byte ``offset``; return the bytes written.

        May be called from several threads at once for disjoint ranges; a short
        write is returned as such (the caller writes the rest).
        """
        ...

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """Hint that ``[offset, offset + nbytes)`` is complete and may go to the device now (may do nothing)."""
        ...

    def sync(self) -> None:
        """Make everything written so far durable."""
        ...

    def close(self) -> None:
        """Release the object (idempotent); unsynced bytes may be lost."""
        ...


class SaveSession(Protocol):
    """One save of a generation at a location, from ``begin_save`` to ``close``."""

    #: The pending generation, for messages.
    location: str

    def create(self, name: str) -> ObjectWriter:
        """Create (or truncate) the object ``name`` in the pending generation."""
        ...

    def put(self, name: str, data: bytes) -> None:
        """Write the small object ``name`` whole and durably (atomic: all of ``data`` or nothing)."""
        ...

    def get(self, name: str) -> bytes:
        """The bytes of the small object ``name`` of the pending generation (FileNotFoundError: none)."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object ``name`` from the pending generation (absent: nothing to do)."""
        ...

    def commit(self, data: bytes, *, owned: Callable[[str], bool]) -> None:
        """Write the marker last and make the pending generation the committed one, atomically.

        Args:
            data: The marker's bytes (its name was given to ``begin_save``).
            owned: Whether an object name belongs to the format; the old
                generation's objects that are not owned are carried over.
        """
        ...

    def close(self, *, discard: bool) -> None:
        """End the session: drop the lock; ``discard`` removes an uncommitted pending generation.

        ``discard`` only where no other rank writes into the generation (a save of one rank).
        """
        ...


class ObjectReader(Protocol):
    """One object of a committed generation, open for reading."""

    #: Its size in bytes when opened.
    size: int
    #: Where the object is, for messages.
    location: str

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` back to back from byte ``offset``; return the bytes read (fewer at the end)."""
        ...

    def read(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset``."""
        ...

    def reopen(self) -> ObjectReader:
        """Another handle on the same object with its own read-ahead, for a reading thread of its own."""
        ...

    def fileno(self) -> int | None:
        """An OS file descriptor of the object when it is a local file (for ``mmap``), else None."""
        ...

    def close(self) -> None:
        """Release the handle (idempotent)."""
        ...


class Generation(Protocol):
    """The committed generation at a location, held open: a snapshot for one read."""

    #: The location, for messages.
    location: str

    def open(self, name: str) -> ObjectReader:
        """Open the object ``name`` (FileNotFoundError: the generation has none)."""
        ...

    def replaced(self) -> bool:
        """Whether the location now holds another generation than this one."""
        ...

    def close(self) -> None:
        """Release the generation (idempotent)."""
        ...


class Storage(Protocol):
    """A checkpoint location: where one checkpoint's generations are written and read."""

    #: The location, for messages.
    location: str

    def begin_save(
        self, *, rank: int, world_size: int, coordinator: bool, timeout_s: float, marker: str, save_id: str
    ) -> SaveSession:
        """Start this rank's part of a save (see the module's call order).

        Args:
            rank: This process's rank, for messages.
            world_size: How many ranks write into the generation.
            coordinator: Whether this rank commits.
            timeout_s: Longest wait for another save to the location.
            marker: The name of the object written last by ``commit``, whose
                presence means "complete" (a stale one is removed here; an old
                generation loses it first when it is deleted).
            save_id: This save's id, the same on every rank of the save and never used by
                another save (an object store names the generation with it).
        """
        ...

    def open_generation(self, marker: str) -> Generation:
        """The committed generation, held open (FileNotFoundError: nothing committed at the location).

        Args:
            marker: The name of the object whose presence means "complete" (as given to ``begin_save``).
        """
        ...
