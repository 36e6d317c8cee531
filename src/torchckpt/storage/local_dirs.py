"""The directories of a local checkpoint: its hidden siblings, the lock of its parent, and their housekeeping.

A save of the checkpoint directory ``<parent>/<name>`` uses these names
beside it, all hidden and never mistaken for a checkpoint:

- ``.<name>.torchckpt-pending``: the new generation being written
  (:func:`pending_generation`);
- ``.<name>.torchckpt-previous``: the old generation between the two renames
  of an overwrite without ``RENAME_EXCHANGE`` — "put me back if <name> is
  missing" (:func:`previous_generation`, :func:`settle_previous_generations`);
- ``.<name>.torchckpt-trash-<hex>``: an old generation being deleted
  (:func:`trash_prefix`, :func:`remove_generation`);
- ``<parent>/.torchckpt-lock``: one per parent directory, so that saves into
  it take turns (:func:`open_lock`, :func:`save_lock_if_free`).

Storage knows no file names of the format: the functions that must remove a
generation's *marker* first (so that a half-deleted generation never looks
complete) take its name as ``marker``. Mutating calls go through :mod:`.fs`
(the fault tests' seam), except the deletion of whole generations, which runs
beside the commit protocol, often in a background thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator

from . import fs

__all__ = [
    "LOCK_NAME",
    "TMP_SUFFIX",
    "list_names",
    "make_dirs_durably",
    "open_dir",
    "open_lock",
    "path_kind",
    "pending_generation",
    "previous_generation",
    "remove_generation",
    "remove_unless_directory",
    "restore_interrupted_swaps",
    "save_lock_if_free",
    "settle_previous_generations",
    "trash_prefix",
    "unlink_marker_at",
    "write_file_durably",
]

logger = logging.getLogger(__name__)

_PENDING = ".{name}.torchckpt-pending"
_TRASH_PREFIX = ".{name}.torchckpt-trash-"
_PREVIOUS = ".{name}.torchckpt-previous"
_PREVIOUS_RE = re.compile(r"^\.(.+)\.torchckpt-previous$")
#: The lock file of a parent directory: saves into one directory take turns.
LOCK_NAME = ".torchckpt-lock"
#: What :func:`write_file_durably` appends to a name for its temporary file.
TMP_SUFFIX = ".tmp"


def open_dir(path: str) -> int:
    """Open a directory for ``dir_fd``-relative opens (no symlink followed at the last step)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def pending_generation(path: str) -> str:
    """Where a save builds the new generation of the checkpoint ``path`` (an absolute path)."""
    parent, name = os.path.split(path)
    return os.path.join(parent, _PENDING.format(name=name))


def previous_generation(path: str) -> str:
    """Where an overwrite without RENAME_EXCHANGE keeps the old checkpoint of ``path`` between its renames."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, _PREVIOUS.format(name=name))


def trash_prefix(name: str) -> str:
    """The prefix of the names under which old generations of the checkpoint ``name`` are deleted."""
    return _TRASH_PREFIX.format(name=name)


def make_dirs_durably(path: str) -> None:
    """Create ``path`` and its missing parents, each fsynced into its parent (a power cut keeps them)."""
    for created in fs.makedirs(path):
        fs.fsync_dir(os.path.dirname(created))


def write_file_durably(directory: str, name: str, data: bytes) -> None:
    """Write ``directory/name`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = os.path.join(directory, name + TMP_SUFFIX)
    # O_NOFOLLOW: a link planted at the temporary name is refused, never written through.
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[fs.write(fd, view) :]
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, os.path.join(directory, name))
    fs.fsync_dir(directory)


def unlink_marker_at(dir_fd: int, marker: str) -> None:
    """Remove the marker (and its temporary file) of the directory open as ``dir_fd``; errors are ignored."""
    for name in (marker, marker + TMP_SUFFIX):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def remove_generation(directory: str, *, marker: str) -> None:
    """Delete a checkpoint directory that is not (or no longer) the one at its path; errors are ignored.

    The marker goes first: a process killed in the middle of the deletion
    leaves rank files without a manifest, never a manifest whose files are gone.
    Like the deletion itself, this runs beside the commit protocol (often in a
    background thread), so not through :mod:`.fs`. A link (or a file) at
    ``directory`` is removed itself: what it points to is never touched.

    Args:
        directory: The generation to delete.
        marker: The name of the file whose presence means "complete".
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        if path_kind(directory) != "dir":
            with contextlib.suppress(OSError):
                os.unlink(directory)
            return
        dir_fd = None  # a directory this process may not read: rmtree tries what it can
    if dir_fd is not None:
        try:
            unlink_marker_at(dir_fd, marker)
        finally:
            os.close(dir_fd)
    shutil.rmtree(directory, ignore_errors=True)


def open_lock(parent: str) -> int:
    """Open (creating it) the lock file of the directory ``parent``; the caller ``flock``s and closes it.

    Raises:
        OSError: It cannot be opened or created (a link planted there is refused).
    """
    return fs.open(os.path.join(parent, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


def restore_interrupted_swaps(directory: str, *, marker: str) -> list[str]:
    """Put back every checkpoint in ``directory`` that a crash left only as its previous generation.

    For a manager opening its root, so that it lists and loads such a step at
    once (a save into the directory does the same first). Skipped while
    another save into the directory holds its lock (that save does it), and
    when nothing is to be restored (no lock file is created then).

    Args:
        directory: The directory holding checkpoints.
        marker: The name of a checkpoint's marker (removed first from a
            previous generation that is deleted).

    Returns:
        The checkpoint paths restored.
    """
    if not any(_PREVIOUS_RE.match(name) for name in list_names(directory, quiet=True)):
        return []
    try:
        fd = open_lock(directory)
    except OSError as e:
        logger.warning("cannot restore interrupted saves in %s: %s", directory, e)
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return settle_previous_generations(directory, marker=marker)
    except BlockingIOError:
        return []
    except OSError as e:
        logger.warning("cannot restore interrupted saves in %s: %s", directory, e)
        return []
    finally:
        fs.close(fd)


def settle_previous_generations(parent: str, *, marker: str) -> list[str]:
    """Rename back each previous generation whose checkpoint is missing; remove the others.

    The caller holds the lock of ``parent``, so no save there is between its
    two renames. A previous generation is removed only when its checkpoint is
    in place (the swap finished); a link or file planted at such a name is
    unlinked, never followed.

    Returns:
        The checkpoint paths restored.

    Raises:
        OSError: A rename back, or the fsync of ``parent``, failed.
    """
    restored = []
    for entry in list_names(parent, quiet=True):
        match = _PREVIOUS_RE.match(entry)
        if match is None:
            continue
        previous, path = os.path.join(parent, entry), os.path.join(parent, match.group(1))
        if path_kind(previous) != "dir":
            with contextlib.suppress(OSError):
                fs.unlink(previous)
        elif path_kind(path) == "missing":
            fs.rename(previous, path)
            restored.append(path)
        else:
            remove_generation(previous, marker=marker)
    if restored:
        fs.fsync_dir(parent)
        logger.warning("restored %s: a save without RENAME_EXCHANGE was interrupted between its renames", restored)
    return restored


def path_kind(path: str) -> str:
    """``"missing"``, ``"dir"``, ``"link"`` or ``"other"``: what is at ``path`` itself (links not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "other"


def remove_unless_directory(path: str) -> None:
    """Unlink what is at ``path`` unless it is a real directory (a link planted at a name torchckpt uses)."""
    if path_kind(path) not in ("missing", "dir"):
        try:
            fs.unlink(path)
        except FileNotFoundError:
            pass  # another rank removed it first


def list_names(path: str, *, quiet: bool = False) -> list[str]:
    """The names in ``path``; none when it is missing (or, ``quiet``, cannot be listed at all)."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
    except OSError:
        if quiet:
            return []
        raise


@contextlib.contextmanager
def save_lock_if_free(parent: str) -> Iterator[bool]:
    """Hold the lock that saves into ``parent`` take, for the block, if no save holds it now.

    Yields whether it is held: while it is, no save into ``parent`` is running
    in any process (their pending directories are leftovers), and none starts.

    Raises:
        OSError: The lock file cannot be opened (``parent`` missing, read-only and without one...).
    """
    fd = os.open(os.path.join(parent, LOCK_NAME), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
