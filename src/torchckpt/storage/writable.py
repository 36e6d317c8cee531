"""A cheap check, before a save stages or writes anything, that its directory can be written.

A save into a read-only file system (EROFS) or a directory the process may not
write (EACCES) would otherwise be found only when the writer first creates a
file: for an async save, after the state was copied into staging memory and
handed to the writer subprocess, and reported through the write future long
after ``save()`` returned. The check costs a ``statvfs`` and an ``access``
call. It cannot promise that the save will succeed (the disk may fill, the
file system may be remounted meanwhile); the writer still reports whatever
fails later.

The same early moment refuses a path no save can take: a URL of no object
store torchckpt serves (:func:`.paths.local_path`) and a symbolic link at the checkpoint's own name
(:func:`.paths.check_not_a_link`).
"""

from __future__ import annotations

import errno
import os

from ..errors import CheckpointIOError
from .object_client import is_object_url
from .paths import check_not_a_link, local_path, resolve_parent

__all__ = ["check_writable"]


def _nearest_directory(path: str) -> str:
    """``path`` or its nearest ancestor that is a directory (what a save creates its directories in)."""
    while not os.path.isdir(path):
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return path


def check_writable(path: str | os.PathLike[str], *, rank: int = 0) -> None:
    """Raise at once when the checkpoint directory ``path`` cannot be created or replaced.

    The save writes into a sibling of ``path`` and renames it into place, so
    what must be writable is the parent of ``path`` (or, when it does not exist
    yet, its nearest existing ancestor).

    Args:
        path: The checkpoint directory.
        rank: This process's rank, for the error.

    Raises:
        CheckpointIOError: errno EROFS (read-only file system) or EACCES (no
            write or search permission), operation ``"prepare"``, naming the
            rank and the directory; errno ELOOP when ``path`` is a symbolic link.
        UnsupportedURLError: ``path`` is a URL of a storage torchckpt does not have.
    """
    if is_object_url(os.fspath(path)):  # an object store says what it refuses when the save begins
        return
    resolved = resolve_parent(local_path(path))
    check_not_a_link(resolved, rank=rank)
    directory = _nearest_directory(os.path.dirname(resolved))
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return  # nothing to say in advance: the save reports what fails
    if read_only:
        code = errno.EROFS
    elif not os.access(directory, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        code = errno.EACCES
    else:
        return
    raise CheckpointIOError(
        f"rank {rank}: prepare failed for {directory}: {os.strerror(code)} "
        f"(the checkpoint {os.fspath(path)} cannot be written there)",
        errno=code,
        path=directory,
        rank=rank,
        operation="prepare",
    )
