"""The file-system calls a save makes, in one replaceable place.

Every call that changes a checkpoint on disk — creating a file or directory,
writing, ``fsync``, renaming, exchanging, unlinking — goes through the
functions of this module, which forward to the active :class:`LocalFS`.
Nothing else in torchckpt calls ``os`` for these. That gives one seam where a
wrapper can observe or fail each step of a save (the fault tests replace the
active layer with one that fails the N-th call with a chosen errno, shortens
writes, and records what was made durable to simulate a power cut).

Reads do not go through this module: they change nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "LocalFS",
    "active",
    "close",
    "exchange",
    "fsync",
    "fsync_dir",
    "install",
    "makedirs",
    "mkdir",
    "open",
    "pwrite",
    "pwritev",
    "rename",
    "unlink",
    "write",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_fn() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _renameat2_fn()


class LocalFS:
    """The real local file system: each method is one system call (or a short loop of them)."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(path, mode)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap the entries ``a`` and ``b``; False where the system cannot."""
        if _renameat2 is None:
            return False
        rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), a, None, b)

    def unlink(self, path: str) -> None:
        os.unlink(path)


_active: LocalFS = LocalFS()


def active() -> LocalFS:
    """The layer the calls of this module go to."""
    return _active


@contextlib.contextmanager
def install(layer: LocalFS) -> Iterator[LocalFS]:
    """Route this process's file-system calls through ``layer`` inside the block."""
    global _active
    previous, _active = _active, layer
    try:
        yield layer
    finally:
        _active = previous


def open(path: str, flags: int, mode: int = 0o644) -> int:
    return _active.open(path, flags, mode)


def close(fd: int) -> None:
    _active.close(fd)


def write(fd: int, data: memoryview | bytes) -> int:
    return _active.write(fd, data)


def pwrite(fd: int, data: memoryview | bytes, offset: int) -> int:
    return _active.pwrite(fd, data, offset)


def pwritev(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    return _active.pwritev(fd, buffers, offset)


def fsync(fd: int) -> None:
    _active.fsync(fd)


def mkdir(path: str, mode: int = 0o755) -> None:
    _active.mkdir(path, mode)


def makedirs(path: str) -> list[str]:
    """Create ``path`` and its missing parents (an existing directory is fine).

    Returns:
        The directories this call created, outermost first (their entries are
        not yet durable: see ``storage.local_dirs.make_dirs_durably``).
    """
    if os.path.isdir(path):
        return []
    created = []
    parent = os.path.dirname(path)
    if parent and parent != path:
        created = makedirs(parent)
    try:
        _active.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return created  # made meanwhile by another process (another rank): it makes it durable
    return [*created, path]


def rename(src: str, dst: str) -> None:
    _active.rename(src, dst)


def exchange(a: str, b: str) -> bool:
    return _active.exchange(a, b)


def unlink(path: str) -> None:
    _active.unlink(path)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = _active.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _active.fsync(fd)
    finally:
        _active.close(fd)
