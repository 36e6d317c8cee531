"""The local filesystem: durable writes and the atomic commit of a checkpoint directory.

Why one strategy: a checkpoint directory is built complete in a hidden
*pending* sibling (``.<name>.torchckpt-pending``), its ``manifest.json``
written last (temporary name, fsync, rename, fsync of the directory), and
then swapped into place with ``renameat2(RENAME_EXCHANGE)`` (or a plain
``rename`` when nothing is there yet), followed by an fsync of the parent.
A reader therefore sees the old directory or the new one, never a mix, and a
crash at any instant leaves the old one untouched at ``path``. The fixed file
names of the ``torch_save`` layout (``checkpoint_<rank>.pt``) need exactly
this; the native layout uses the same path so that there is one protocol to
prove. Readers open files relative to a directory file descriptor, so a swap
during a load cannot mix generations either.

Where the file system cannot exchange (NFS, several FUSE and network file
systems, older kernels: ``exchange`` reports it), the old directory is first
renamed to ``.<name>.torchckpt-previous`` — "the previous generation of
<name>: put me back if <name> is missing" — and the new one then renamed to
``path``. A crash between the two renames leaves nothing at ``path``; a load
then reads the previous generation, and the next save into the directory (or
a manager opening it) renames it back before doing anything else. Nothing
deletes a previous generation while its checkpoint is missing.

Files in the old directory that torchckpt does not own (anything but the
manifest and rank files) are carried over into the new one before the swap.
Leftovers of crashed saves (pending and trash directories) are hidden,
never mistaken for checkpoints, and cleaned by the next save to the path.
Every directory a save creates is fsynced into its parent before the commit,
and no name torchckpt uses beside a checkpoint is followed if it is a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import CheckpointIOError
from . import fs
from .fs import fsync_dir
from .local_read import LocalGeneration
from .paths import check_not_a_link, local_path, resolve_parent

__all__ = [
    "MANIFEST_NAME",
    "DirectoryCommit",
    "fsync_dir",
    "is_owned_name",
    "make_dirs_durably",
    "open_dir",
    "previous_generation",
    "restore_interrupted_swaps",
    "save_lock_if_free",
    "write_file_durably",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_PENDING = ".{name}.torchckpt-pending"
_TRASH_PREFIX = ".{name}.torchckpt-trash-"
_PREVIOUS = ".{name}.torchckpt-previous"
_PREVIOUS_RE = re.compile(r"^\.(.+)\.torchckpt-previous$")
_LOCK = ".torchckpt-lock"  # one per parent directory: saves into one directory take turns
_OWNED = re.compile(r"^(manifest\.json(\.tmp)?|checkpoint_\d+\.pt|rank_\d+\.safetensors)$")


def is_owned_name(name: str) -> bool:
    """Whether a file name in a checkpoint directory belongs to torchckpt."""
    return bool(_OWNED.match(name))


def open_dir(path: str) -> int:
    """Open a directory for ``dir_fd``-relative opens (no symlink followed at the last step)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def previous_generation(path: str) -> str:
    """Where an overwrite without RENAME_EXCHANGE keeps the old checkpoint of ``path`` between its renames."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, _PREVIOUS.format(name=name))


def make_dirs_durably(path: str) -> None:
    """Create ``path`` and its missing parents, each fsynced into its parent (a power cut keeps them)."""
    for created in fs.makedirs(path):
        fsync_dir(os.path.dirname(created))


def write_file_durably(directory: str, name: str, data: bytes) -> None:
    """Write ``directory/name`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = os.path.join(directory, name + ".tmp")
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
    fsync_dir(directory)


class DirectoryCommit:
    """One save to a checkpoint directory: the pending directory, then the atomic swap.

    Call order (on the coordinator unless said otherwise):

    1. ``prepare(rank)`` on every rank before writing: creates the pending
       directory; the coordinator also removes a stale manifest from it and
       takes the path's lock (other saves to the same path wait their turn).
    2. Every rank writes its files into ``pending`` and fsyncs them.
    3. ``commit(manifest_bytes)``: writes the manifest last, swaps the
       directory into place, fsyncs the parent, discards the old one.
    4. ``release()`` always, at the end (drops the lock; on failure removes
       the pending directory when this process alone wrote into it).

    Args:
        path: The checkpoint directory.
        rank: This process's rank, for error messages.
        lock_timeout_s: Longest wait for another save to the same path.
    """

    def __init__(self, path: str, *, rank: int = 0, lock_timeout_s: float = 600.0) -> None:
        # Resolved once: the whole save happens in the directory the parent named when it started.
        self.path = resolve_parent(local_path(path))
        self.parent, self.name = os.path.split(self.path)
        if not self.name:
            raise ValueError(f"checkpoint path {path!r} has no final component")
        self.pending = os.path.join(self.parent, _PENDING.format(name=self.name))
        self.rank = rank
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

    def prepare(self, *, coordinator: bool) -> None:
        """Create the pending directory (and, on the coordinator, lock and clean it).

        Raises:
            CheckpointIOError: A directory cannot be created; ``path`` is a
                symbolic link (ELOOP) or not a directory (ENOTDIR).
        """
        try:
            make_dirs_durably(self.parent)
        except OSError as e:
            raise self._io_error("mkdir", self.parent, e) from e
        check_not_a_link(self.path, rank=self.rank)
        if _kind(self.path) not in ("missing", "dir"):
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
            _remove_unless_directory(self.pending)
            fs.makedirs(self.pending)
        except OSError as e:
            raise self._io_error("mkdir", self.pending, e) from e
        if coordinator:
            for name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
                stale = os.path.join(self.pending, name)
                try:
                    fs.unlink(stale)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise self._io_error("unlink", stale, e) from e

    def _lock(self) -> None:
        lock_path = os.path.join(self.parent, _LOCK)
        try:
            fd = fs.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise self._io_error("lock", lock_path, e) from e
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
            _settle_previous_generations(self.parent)
        except OSError as e:
            raise self._io_error("restore", previous_generation(self.path), e) from e
        prefix = _TRASH_PREFIX.format(name=self.name)
        for name in _listdir(self.parent, quiet=True):
            if name.startswith(prefix):
                remove_generation(os.path.join(self.parent, name))

    def commit(self, manifest: bytes) -> None:
        """Write the manifest into the pending directory and swap it into place."""
        try:
            fsync_dir(self.pending)
        except OSError as e:
            raise self._io_error("fsync", self.pending, e) from e
        try:
            write_file_durably(self.pending, MANIFEST_NAME, manifest)
        except OSError as e:
            raise self._io_error("write manifest", os.path.join(self.pending, MANIFEST_NAME), e) from e
        try:
            old = self._swap()
        except OSError as e:
            raise self._io_error("rename", self.path, e) from e
        self.committed = True
        if old is not None:
            self._discard_old(old)

    def _swap(self) -> str | None:
        """Put the pending directory at ``path`` durably; return where the old one went.

        On failure every step taken is undone (in reverse), so ``path`` holds
        the old checkpoint, with any foreign files it had, and the error is raised.
        """
        undo: list[Callable[[], object]] = []
        old: str | None = None
        try:
            kind = _kind(self.path)
            if kind == "missing":
                fs.rename(self.pending, self.path)
                undo.append(lambda: fs.rename(self.path, self.pending))
            elif kind != "dir":  # became a link or a file since prepare(): never replaced
                code = errno.ELOOP if kind == "link" else errno.ENOTDIR
                raise OSError(code, f"{os.strerror(code)} (no longer a directory)", self.path)
            else:
                self._carry_foreign_files(undo)
                if fs.exchange(self.pending, self.path):
                    undo.append(lambda: fs.exchange(self.pending, self.path))
                    old = self.pending
                else:
                    # No RENAME_EXCHANGE here: the old one aside under the name that says "put me back
                    # if <name> is missing" (loads read it there; the next save restores it), the new one in.
                    previous = previous_generation(self.path)
                    fs.rename(self.path, previous)
                    undo.append(lambda: fs.rename(previous, self.path))
                    fs.rename(self.pending, self.path)
                    undo.append(lambda: fs.rename(self.path, self.pending))
                    old = previous
            fsync_dir(self.parent)
        except OSError:
            for action in reversed(undo):
                try:
                    action()
                except OSError as e:
                    logger.error("could not undo a step of the failed commit of %s: %s", self.path, e)
            raise
        return old

    def _carry_foreign_files(self, undo: list[Callable[[], object]]) -> None:
        for name in _listdir(self.path):
            src, dst = os.path.join(self.path, name), os.path.join(self.pending, name)
            if not is_owned_name(name) and not os.path.exists(dst):
                fs.rename(src, dst)
                undo.append(functools.partial(fs.rename, dst, src))

    def _discard_old(self, old: str) -> None:
        # Move the old generation out of the way first (instant), so the next save can start at once.
        prefix = _TRASH_PREFIX.format(name=self.name)
        # Its manifest goes first, here (one unlink): a trash directory never looks like a checkpoint,
        # even when the process exits before the background deletion runs.
        with contextlib.suppress(OSError):
            dir_fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _unlink_manifest_at(dir_fd)
            finally:
                os.close(dir_fd)
        trash = old
        if not os.path.basename(old).startswith(prefix):  # not already aside (the no-exchange fallback)
            trash = os.path.join(self.parent, prefix + uuid.uuid4().hex)
            try:
                fs.rename(old, trash)
            except OSError as e:
                logger.warning("could not move the old checkpoint %s aside (%s): deleting it in place", old, e)
                remove_generation(old)
                return
        # Deleting gigabytes takes a while (and discards blocks): not on the save's time.
        # What a process exit interrupts is removed by the next save to this path.
        threading.Thread(target=remove_generation, args=(trash,), name="torchckpt-discard", daemon=True).start()

    def release(self, *, remove_pending: bool) -> None:
        """Drop the lock; on failure, optionally remove the pending directory."""
        if remove_pending and not self.committed:
            remove_generation(self.pending)
        if self._lock_fd is not None:
            fs.close(self._lock_fd)
            self._lock_fd = None


def _unlink_manifest_at(dir_fd: int) -> None:
    """Remove the manifest (and its temporary file) of the directory open as ``dir_fd``; errors are ignored."""
    for name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def remove_generation(directory: str) -> None:
    """Delete a checkpoint directory that is not (or no longer) the one at its path; errors are ignored.

    The manifest goes first: a process killed in the middle of the deletion
    leaves rank files without a manifest, never a manifest whose files are gone.
    Like the deletion itself, this runs beside the commit protocol (often in a
    background thread), so not through :mod:`.fs`. A link (or a file) at
    ``directory`` is removed itself: what it points to is never touched.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        if _kind(directory) != "dir":
            with contextlib.suppress(OSError):
                os.unlink(directory)
            return
        dir_fd = None  # a directory this process may not read: rmtree tries what it can
    if dir_fd is not None:
        try:
            _unlink_manifest_at(dir_fd)
        finally:
            os.close(dir_fd)
    shutil.rmtree(directory, ignore_errors=True)


def restore_interrupted_swaps(directory: str) -> list[str]:
    """Put back every checkpoint in ``directory`` that a crash left only as its previous generation.

    For a manager opening its root, so that it lists and loads such a step at
    once (a save into the directory does the same first). Skipped while
    another save into the directory holds its lock (that save does it), and
    when nothing is to be restored (no lock file is created then).

    Returns:
        The checkpoint paths restored.
    """
    if not any(_PREVIOUS_RE.match(name) for name in _listdir(directory, quiet=True)):
        return []
    try:
        fd = fs.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        logger.warning("cannot restore interrupted saves in %s: %s", directory, e)
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _settle_previous_generations(directory)
    except BlockingIOError:
        return []
    except OSError as e:
        logger.warning("cannot restore interrupted saves in %s: %s", directory, e)
        return []
    finally:
        fs.close(fd)


def _settle_previous_generations(parent: str) -> list[str]:
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
    for entry in _listdir(parent, quiet=True):
        match = _PREVIOUS_RE.match(entry)
        if match is None:
            continue
        previous, path = os.path.join(parent, entry), os.path.join(parent, match.group(1))
        if _kind(previous) != "dir":
            with contextlib.suppress(OSError):
                fs.unlink(previous)
        elif _kind(path) == "missing":
            fs.rename(previous, path)
            restored.append(path)
        else:
            remove_generation(previous)
    if restored:
        fsync_dir(parent)
        logger.warning("restored %s: a save without RENAME_EXCHANGE was interrupted between its renames", restored)
    return restored


def _kind(path: str) -> str:
    """``"missing"``, ``"dir"``, ``"link"`` or ``"other"``: what is at ``path`` itself (links not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "link"
    return "dir" if stat.S_ISDIR(mode) else "other"


def _remove_unless_directory(path: str) -> None:
    """Unlink what is at ``path`` unless it is a real directory (a link planted at a name torchckpt uses)."""
    if _kind(path) not in ("missing", "dir"):
        try:
            fs.unlink(path)
        except FileNotFoundError:
            pass  # another rank removed it first



def _listdir(path: str, *, quiet: bool = False) -> Iterable[str]:
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
    fd = os.open(os.path.join(parent, _LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class LocalStorage:
    """A checkpoint directory on a local file system, as a :class:`~.base.Storage`.

    Args:
        path: The checkpoint directory (a local path; a URL is refused).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.location = local_path(path)

    def begin_save(self, *, rank: int, coordinator: bool, timeout_s: float) -> Any:
        """Start this rank's part of a save (see ``storage/base.py``)."""
        raise NotImplementedError("LocalStorage.begin_save")

    def open_generation(self) -> LocalGeneration:
        """The checkpoint directory committed at the path, held open (see ``storage/base.py`` and ``local_read.py``).

        Where the directory is missing because an overwrite without
        ``RENAME_EXCHANGE`` was interrupted, its previous generation is opened.

        Raises:
            CheckpointNotFoundError: Nothing there, not a directory, or a symbolic link.
        """
        return LocalGeneration.open_path(self.location, previous=previous_generation(self.location))
