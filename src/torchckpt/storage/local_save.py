"""A save into a local checkpoint directory: the pending directory, durable writes, the atomic swap.

The :class:`~.base.SaveSession` and :class:`~.base.ObjectWriter` of
:class:`~.local.LocalStorage` (see ``storage/local.py`` for why the directory
is built aside and swapped, and ``storage/local_dirs.py`` for the names used
beside it). Every mutating call goes through :mod:`.fs`, so that the fault
tests can fail, shorten or record each step.

Call order (``LocalStorage.begin_save`` runs steps 1 and 2)::

    session = LocalSaveSession(path, rank=r, marker=m, lock_timeout_s=t)
    session.prepare(coordinator=r == 0)
        # every rank: creates the parent directories and the pending directory;
        # the coordinator first takes the parent's lock (other saves to the
        # directory wait their turn), restores or removes what interrupted saves
        # left (previous generations, trash), and then removes a stale marker
        # from the pending directory
    out = session.create(name); out.write_at(...); out.sync(); out.close()
    session.put(name, data); session.get(name); session.delete(name)
    session.commit(data, owned=...)        # coordinator: marker last, then the swap
    session.close(discard=...)             # always: drops the lock; ``discard``
                                           # removes an uncommitted pending directory
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from ..errors import CheckpointIOError
from . import fs
from .local_dirs import (
    LOCK_NAME,
    TMP_SUFFIX,
    list_names,
    make_dirs_durably,
    open_lock,
    path_kind,
    pending_generation,
    previous_generation,
    remove_generation,
    remove_unless_directory,
    settle_previous_generations,
    trash_prefix,
    unlink_marker_at,
    write_file_durably,
)
from .paths import check_not_a_link, local_path, resolve_parent

__all__ = ["LocalObjectWriter", "LocalSaveSession"]

logger = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class LocalObjectWriter:
    """A file open for writing, as an :class:`~.base.ObjectWriter`; it owns ``fd`` (``close`` closes it).

    Call order: ``write_at`` (from any thread, any order, disjoint ranges) and
    ``start_writeback`` as ranges complete, then ``sync``, then ``close``.

    Args:
        fd: The open file (write access).
        location: Its path, for messages.
    """

    def __init__(self, fd: int, location: str) -> None:
        self.fd: int | None = fd
        self.location = location

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError(f"{self.location} is closed")
        return self.fd

    def write_at(self, views: Sequence[memoryview], offset: int) -> int:
        """One positional write of ``views`` at ``offset``; return the bytes written (may be short).

        One system call through :mod:`.fs`: ``pwrite`` for one buffer, ``pwritev`` for several.
        """
        if len(views) == 1:
            return fs.pwrite(self._fd(), views[0], offset)
        return fs.pwritev(self._fd(), views, offset)

    def start_writeback(self, offset: int, nbytes: int) -> None:
        """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the final fsync finds little left to do.

        A failure is not an error here (the fsync reports what matters); where
        the call does not exist this does nothing.
        """
        if _sync_file_range is not None and nbytes > 0:
            _sync_file_range(self._fd(), offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    def sync(self) -> None:
        """``fsync`` (through :mod:`.fs`)."""
        fs.fsync(self._fd())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            fs.close(fd)


class LocalSaveSession:
    """One save to a checkpoint directory, as a :class:`~.base.SaveSession` (call order: the module's).

    Args:
        path: The checkpoint directory.
        rank: This process's rank, for error messages.
        marker: The name of the file written last, whose presence means "complete".
        lock_timeout_s: Longest wait for another save to the same directory.

    Raises:
        ValueError: ``path`` has no final component.
        UnsupportedURLError: ``path`` is a URL.
    """

    def __init__(self, path: str, *, rank: int, marker: str, lock_timeout_s: float) -> None:
        # Resolved once: the whole save happens in the directory the parent named when it started.
        self.path = resolve_parent(local_path(path))
        self.parent, self.name = os.path.split(self.path)
        if not self.name:
            raise ValueError(f"checkpoint path {path!r} has no final component")
        self.pending = pending_generation(self.path)
        self.location = self.pending
        self.rank = rank
        self.marker = marker
        self.lock_timeout_s = lock_timeout_s
        self._lock_fd: int | None = None
        self.committed = False

    def _io_error(self, operation: str, path: str, e: OSError) -> CheckpointIOError:
        return CheckpointIOError(
            f"rank {self.rank}: {operation} failed for {path}: {e.strerror or e}",
            errno=e.errno,
            path=path,
            rank=self.rank,
            operation=operation,
        )

    # -- 1. prepare -------------------------------------------------------

    def prepare(self, *, coordinator: bool) -> None:
        """Create the pending directory (and, on the coordinator, lock and clean first).

        Raises:
            CheckpointIOError: A directory cannot be created; ``path`` is a
                symbolic link (ELOOP) or not a directory (ENOTDIR); the lock
                was held longer than ``lock_timeout_s`` (ETIMEDOUT).
        """
        try:
            make_dirs_durably(self.parent)
        except OSError as e:
            raise self._io_error("mkdir", self.parent, e) from e
        check_not_a_link(self.path, rank=self.rank)
        if path_kind(self.path) not in ("missing", "dir"):
            raise CheckpointIOError(
                f"rank {self.rank}: checkpoint path {self.path} exists and is not a directory",
                errno=errno.ENOTDIR,
                path=self.path,
                rank=self.rank,
                operation="prepare",
            )
        if coordinator:
            self._lock()
            self._clean_leftovers()
        try:
            remove_unless_directory(self.pending)
            fs.makedirs(self.pending)
        except OSError as e:
            raise self._io_error("mkdir", self.pending, e) from e
        if coordinator:
            for name in (self.marker, self.marker + TMP_SUFFIX):
                stale = os.path.join(self.pending, name)
                try:
                    fs.unlink(stale)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise self._io_error("unlink", stale, e) from e

    def _lock(self) -> None:
        try:
            fd = open_lock(self.parent)
        except OSError as e:
            raise self._io_error("lock", os.path.join(self.parent, LOCK_NAME), e) from e
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fs.close(fd)
                    raise CheckpointIOError(
                        f"rank {self.rank}: another save to {self.path} held its lock for more than "
                        f"{self.lock_timeout_s:g}s",
                        errno=errno.ETIMEDOUT,
                        path=self.path,
                        rank=self.rank,
                        operation="lock",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        self._lock_fd = fd

    def _clean_leftovers(self) -> None:
        """Put back previous generations whose checkpoint is missing, then remove this path's trash."""
        try:
            settle_previous_generations(self.parent, marker=self.marker)
        except OSError as e:
            raise self._io_error("restore", previous_generation(self.path), e) from e
        prefix = trash_prefix(self.name)
        for name in list_names(self.parent, quiet=True):
            if name.startswith(prefix):
                remove_generation(os.path.join(self.parent, name), marker=self.marker)

    # -- 2. the objects of the pending generation ---------------------------

    def create(self, name: str) -> LocalObjectWriter:
        """Create (or truncate) the file ``name`` in the pending directory.

        Raises:
            OSError: It cannot be opened (a link planted in a stale pending
                directory is refused, never written through: ELOOP).
        """
        path = os.path.join(self.pending, name)
        fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        return LocalObjectWriter(fd, path)

    def put(self, name: str, data: bytes) -> None:
        """Write the small file ``name`` atomically and durably (temp file, fsync, rename, fsync dir)."""
        write_file_durably(self.pending, name, data)

    def get(self, name: str) -> bytes:
        """The bytes of the file ``name`` of the pending directory (FileNotFoundError: none)."""
        with open(os.path.join(self.pending, name), "rb") as f:
            return f.read()

    def delete(self, name: str) -> None:
        """Unlink the file ``name`` of the pending directory (absent: nothing to do)."""
        with contextlib.suppress(FileNotFoundError):
            fs.unlink(os.path.join(self.pending, name))

    # -- 3. commit ----------------------------------------------------------

    def commit(self, data: bytes, *, owned: Callable[[str], bool]) -> None:
        """Write the marker into the pending directory, then swap it into place.

        Args:
            data: The marker's bytes.
            owned: Whether a file name belongs to the format; the old
                checkpoint's other files are carried into the new one.

        Raises:
            CheckpointIOError: An fsync, the marker's write or the swap failed
                (the old checkpoint is then in place, as it was).
        """
        try:
            fs.fsync_dir(self.pending)
        except OSError as e:
            raise self._io_error("fsync", self.pending, e) from e
        try:
            write_file_durably(self.pending, self.marker, data)
        except OSError as e:
            raise self._io_error("write manifest", os.path.join(self.pending, self.marker), e) from e
        try:
            old = self._swap(owned)
        except OSError as e:
            raise self._io_error("rename", self.path, e) from e
        self.committed = True
        if old is not None:
            self._discard_old(old)

    def _swap(self, owned: Callable[[str], bool]) -> str | None:
        """Put the pending directory at ``path`` durably; return where the old one went.

        On failure every step taken is undone (in reverse), so ``path`` holds
        the old checkpoint, with any foreign files it had, and the error is raised.
        """
        undo: list[Callable[[], object]] = []
        old: str | None = None
        try:
            kind = path_kind(self.path)
            if kind == "missing":
                fs.rename(self.pending, self.path)
                undo.append(lambda: fs.rename(self.path, self.pending))
            elif kind != "dir":  # became a link or a file since prepare(): never replaced
                code = errno.ELOOP if kind == "link" else errno.ENOTDIR
                raise OSError(code, f"{os.strerror(code)} (no longer a directory)", self.path)
            else:
                self._carry_foreign_files(owned, undo)
                old = self._replace(undo)
            fs.fsync_dir(self.parent)
        except OSError:
            for action in reversed(undo):
                try:
                    action()
                except OSError as e:
                    logger.error("could not undo a step of the failed commit of %s: %s", self.path, e)
            raise
        return old

    def _replace(self, undo: list[Callable[[], object]]) -> str:
        """Swap the pending directory with the old one at ``path``; return where the old one went."""
        if fs.exchange(self.pending, self.path):
            undo.append(lambda: fs.exchange(self.pending, self.path))
            return self.pending
        # No RENAME_EXCHANGE here: the old one aside under the name that says "put me back
        # if <name> is missing" (loads read it there; the next save restores it), the new one in.
        previous = previous_generation(self.path)
        fs.rename(self.path, previous)
        undo.append(lambda: fs.rename(previous, self.path))
        fs.rename(self.pending, self.path)
        undo.append(lambda: fs.rename(self.path, self.pending))
        return previous

    def _carry_foreign_files(self, owned: Callable[[str], bool], undo: list[Callable[[], object]]) -> None:
        for name in list_names(self.path):
            if owned(name) or name == self.marker + TMP_SUFFIX:
                continue
            src, dst = os.path.join(self.path, name), os.path.join(self.pending, name)
            if not os.path.exists(dst):
                fs.rename(src, dst)
                undo.append(functools.partial(fs.rename, dst, src))

    def _discard_old(self, old: str) -> None:
        # Move the old generation out of the way first (instant), so the next save can start at once.
        prefix = trash_prefix(self.name)
        # Its marker goes first, here (one unlink): a trash directory never looks like a checkpoint,
        # even when the process exits before the background deletion runs.
        with contextlib.suppress(OSError):
            dir_fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                unlink_marker_at(dir_fd, self.marker)
            finally:
                os.close(dir_fd)
        trash = old
        if not os.path.basename(old).startswith(prefix):  # not already aside (the no-exchange fallback)
            trash = os.path.join(self.parent, prefix + uuid.uuid4().hex)
            try:
                fs.rename(old, trash)
            except OSError as e:
                logger.warning("could not move the old checkpoint %s aside (%s): deleting it in place", old, e)
                remove_generation(old, marker=self.marker)
                return
        # Deleting gigabytes takes a while (and discards blocks): not on the save's time.
        # What a process exit interrupts is removed by the next save to this path.
        threading.Thread(
            target=remove_generation, args=(trash,), kwargs={"marker": self.marker}, name="torchckpt-discard",
            daemon=True,
        ).start()  # fmt: skip

    # -- 4. close -----------------------------------------------------------

    def close(self, *, discard: bool) -> None:
        """Drop the lock (idempotent); ``discard``: remove the pending directory unless committed.

        ``discard`` only where no other process writes into the pending
        directory (a save of one rank): another rank's files would go with it.
        """
        if discard and not self.committed:
            remove_generation(self.pending, marker=self.marker)
        if self._lock_fd is not None:
            fs.close(self._lock_fd)
            self._lock_fd = None
