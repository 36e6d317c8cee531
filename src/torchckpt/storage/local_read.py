"""The read side of the local storage: a committed checkpoint directory, held open.

:class:`LocalGeneration` is a :class:`~.base.Generation`: the checkpoint
directory opened once (``O_DIRECTORY | O_NOFOLLOW``), every object then
opened relative to that directory descriptor. An overwrite swaps another
directory into the path and deletes this one, so a reader holding the
descriptor never mixes two generations: it sees its own files, or finds them
gone and asks :meth:`LocalGeneration.replaced` whether that is an overwrite
(read again) or corruption.

:class:`LocalObjectReader` is an :class:`~.base.ObjectReader` over one file
descriptor: positional reads (``preadv``), another open file description for
each parallel reading thread (:meth:`~LocalObjectReader.reopen`, so that each
keeps its own kernel read-ahead), and :meth:`~LocalObjectReader.fileno` for
the readers that map the file.

The local rules of a read (docs/format.md, "Paths"), all applied here:

- a URL is refused (:class:`UnsupportedURLError`);
- a symbolic link at the checkpoint's own name is refused, never followed,
  and the message names the path to load instead (:class:`CheckpointNotFoundError`);
- where the checkpoint is missing because a save without ``RENAME_EXCHANGE``
  was interrupted between its two renames, its previous generation (the name
  :func:`~.local.previous_generation` gives) is read instead, with a warning;
- an object that is a symbolic link or not a regular file is refused
  (:class:`CorruptCheckpointError`); a FIFO planted at an object's name is
  refused without waiting for a writer.

Other refusals of the system come as ``OSError``; a missing object as
``FileNotFoundError``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Sequence
from types import TracebackType

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .base import skip_bytes
from .paths import local_path

__all__ = ["LocalGeneration", "LocalObjectReader"]

logger = logging.getLogger(__name__)



class LocalObjectReader:
    """One file of a checkpoint directory, open for positional reads.

    Call order: :meth:`open_at` (or :meth:`LocalGeneration.open`), then any
    number of :meth:`read_into` / :meth:`read` from any thread,
    :meth:`reopen` once per extra reading thread (each handle closed by its
    user), :meth:`close` last (idempotent; also on leaving a ``with`` block).

    Args:
        fd: The open file (owned: closed by :meth:`close` when ``owned``).
        location: The file's path, for messages.
        owned: Whether :meth:`close` closes ``fd``.
    """

    def __init__(self, fd: int, location: str, *, owned: bool = True) -> None:
        self._fd: int | None = fd
        self._owned = owned
        self.location = location
        self.size = os.fstat(fd).st_size

    @classmethod
    def open_at(cls, dir_fd: int, name: str, where: str) -> LocalObjectReader:
        """Open the regular file ``name`` of the directory open as ``dir_fd`` (a link there is never followed).

        Args:
            dir_fd: The checkpoint directory.
            name: The file's name in it.
            where: The checkpoint's path, for messages.

        Raises:
            FileNotFoundError: No such file.
            CorruptCheckpointError: ``name`` is a symbolic link or not a regular file.
            OSError: Another refusal of the system.
        """
        try:
            # O_NONBLOCK: opening a FIFO put in place of a file must not wait for a writer (cleared below).
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {where}: {name} is a symbolic link (refused)", path=where, file=name
                ) from e
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: {name} is not a regular file", path=where, file=name
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return cls(fd, os.path.join(where, name))

    def _checked_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.location}: read of a closed object reader")
        return self._fd

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` back to back from byte ``offset`` (``preadv``); return the bytes read (fewer at the end)."""
        fd = self._checked_fd()
        total = sum(v.nbytes for v in views)
        done = 0
        pending = list(views)
        while done < total:
            got = os.preadv(fd, pending, offset + done)
            if got <= 0:
                break
            done += got
            pending = skip_bytes(views, done)
        return done

    def read(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset`` (fewer only at the end of the file)."""
        fd = self._checked_fd()
        data = os.pread(fd, nbytes, offset)
        if len(data) == nbytes or not data:
            return data
        parts = [data]
        done = len(data)
        while done < nbytes:
            more = os.pread(fd, nbytes - done, offset + done)
            if not more:
                break
            parts.append(more)
            done += len(more)
        return b"".join(parts)

    def reopen(self) -> LocalObjectReader:
        """Another open file description of the same file (its own read-ahead), for one reading thread.

        Where ``/proc/self/fd`` cannot be opened, the handle shares this one's
        descriptor (and its :meth:`close` leaves it open).
        """
        fd = self._checked_fd()
        try:
            other = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return LocalObjectReader(fd, self.location, owned=False)
        return LocalObjectReader(other, self.location)

    def fileno(self) -> int:
        """The file descriptor (for ``mmap`` and readers that need a local file)."""
        return self._checked_fd()

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None and self._owned:
            os.close(fd)

    def __enter__(self) -> LocalObjectReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _open_dir(path: str) -> int:
    """Open a directory for ``dir_fd``-relative opens (no link followed at the last step)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


class LocalGeneration:
    """The checkpoint directory committed at a path, held open for one read (a snapshot).

    Call order: :meth:`open_path` (what ``LocalStorage.open_generation``
    calls), then :meth:`open` for each object read, :meth:`replaced` when an
    object is missing, :meth:`close` last (idempotent; also on leaving a
    ``with`` block). The readers it opens stay usable after :meth:`close`.

    Args:
        dir_fd: The open directory (owned: closed by :meth:`close`).
        location: The checkpoint's path as the caller gave it (messages, and
            what :meth:`replaced` looks at).
    """

    def __init__(self, dir_fd: int, location: str) -> None:
        self._dir_fd: int | None = dir_fd
        self.location = location
        held = os.fstat(dir_fd)
        self._identity = (held.st_dev, held.st_ino)

    @classmethod
    def open_path(cls, path: str | os.PathLike[str], *, previous: str | None = None) -> LocalGeneration:
        """Open the checkpoint directory ``path`` (a link at its own name is refused, never followed).

        Args:
            path: The checkpoint directory.
            previous: Where an interrupted overwrite without ``RENAME_EXCHANGE``
                keeps the previous generation of ``path``: opened (with a
                warning) when ``path`` is missing; that is the checkpoint at
                ``path`` until the next save puts it back. None: no fallback.

        Raises:
            UnsupportedURLError: ``path`` is a URL.
            CheckpointNotFoundError: Nothing there, not a directory, or a symbolic link.
        """
        path = local_path(path)
        try:
            return cls(_open_dir(path), path)
        except FileNotFoundError as e:
            fd = _open_previous(path, previous)
            if fd is not None:
                return cls(fd, path)
            raise CheckpointNotFoundError(f"no checkpoint at {path}: the directory does not exist", path=path) from e
        except OSError as e:
            # O_DIRECTORY | O_NOFOLLOW on a symbolic link fails with ENOTDIR (or ELOOP),
            # even when it points to a directory.
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise _not_a_directory(path) from e

    def _checked_fd(self) -> int:
        if self._dir_fd is None:
            raise ValueError(f"{self.location}: use of a closed generation")
        return self._dir_fd

    def open(self, name: str) -> LocalObjectReader:
        """Open the file ``name`` of this generation (see :meth:`LocalObjectReader.open_at` for its refusals)."""
        return LocalObjectReader.open_at(self._checked_fd(), name, self.location)

    def replaced(self) -> bool:
        """Whether the path no longer names the directory held open.

        An overwrite swaps a new generation into place and then deletes the old
        one: a reader holding the old one finds files gone, which is no corruption.
        """
        try:
            now = os.stat(self.location, follow_symlinks=False)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != self._identity

    def close(self) -> None:
        """Release the directory (idempotent)."""
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> LocalGeneration:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _open_previous(path: str, previous: str | None) -> int | None:
    if previous is None:
        return None
    try:
        fd = _open_dir(previous)
    except OSError:
        return None
    logger.warning(
        "%s is missing: a save without RENAME_EXCHANGE was interrupted between its renames; loading the previous "
        "generation (the next save to this directory puts it back)",
        path,
    )
    return fd


def _not_a_directory(path: str) -> CheckpointNotFoundError:
    """The error for a ``path`` that is not a directory: a link there is named with the path to load instead."""
    try:
        target = os.readlink(path)
    except OSError:
        return CheckpointNotFoundError(f"no checkpoint at {path}: not a directory", path=path)
    return CheckpointNotFoundError(
        f"no checkpoint at {path}: {path} is a symbolic link (to {target}); torchckpt does not follow a link "
        f"at a checkpoint's own name: load {os.path.normpath(os.path.join(os.path.dirname(path), target))}",
        path=path,
    )
