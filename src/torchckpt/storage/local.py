"""The local filesystem as a :class:`~.base.Storage`: a checkpoint is a directory, committed atomically.

Why one strategy: a checkpoint directory is built complete in a hidden
*pending* sibling (``.<name>.torchckpt-pending``), its marker (the
format's ``manifest.json``) written last (temporary name, fsync, rename, fsync of the directory), and
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

Files in the old directory that the format does not own (the writer says
which: anything but the manifest and rank files) are carried over into the
new one before the swap. Leftovers of crashed saves (pending and trash
directories) are hidden, never mistaken for checkpoints, and cleaned by the
next save to the path. Every directory a save creates is fsynced into its
parent before the commit, and no name torchckpt uses beside a checkpoint is
followed if it is a link.

Where the parts are: :class:`LocalStorage` (here) is the entry point
(``storage/locate.py`` hands it out); a save is a
:class:`~.local_save.LocalSaveSession` writing through
:class:`~.local_save.LocalObjectWriter`; the names beside a checkpoint and
their housekeeping (lock, previous generations, trash) are in
``storage/local_dirs.py``; every mutating system call goes through
``storage/fs.py``. This module knows no file name of the format: the writer
passes the marker's name to :meth:`LocalStorage.begin_save` and the
``owned`` predicate to ``commit``.
"""

from __future__ import annotations

import os

from .local_dirs import previous_generation
from .local_read import LocalGeneration
from .local_save import LocalSaveSession
from .paths import local_path

__all__ = ["LocalStorage"]


class LocalStorage:
    """A checkpoint directory on a local file system, as a :class:`~.base.Storage`.

    Args:
        path: The checkpoint directory (a local path; a URL is refused).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.location = local_path(path)

    def begin_save(
        self, *, rank: int, world_size: int, coordinator: bool, timeout_s: float, marker: str, save_id: str = ""
    ) -> LocalSaveSession:
        """Start this rank's part of a save: the pending directory exists when this returns.

        See ``storage/base.py`` for the call order and ``local_save.py`` for
        what the coordinator does first (lock, leftovers, stale marker).

        Args:
            rank: This process's rank, for messages.
            world_size: How many ranks write into the generation: with one, a
                failed start removes what it created, as ``close(discard=True)`` does.
            coordinator: Whether this rank commits (it takes the lock and cleans).
            timeout_s: Longest wait for another save holding the directory's lock.
            marker: The name of the file written last (the format's manifest).
            save_id: Not needed here: a directory has one pending generation at a time, under the lock.

        Raises:
            CheckpointIOError: The directory cannot be prepared (names rank, operation, path).
            ValueError: The path has no final component.
        """
        session = LocalSaveSession(self.location, rank=rank, marker=marker, lock_timeout_s=timeout_s)
        try:
            session.prepare(coordinator=coordinator)
        except BaseException:
            session.close(discard=world_size == 1)
            raise
        return session

    def open_generation(self, marker: str = "") -> LocalGeneration:
        """The checkpoint directory committed at the path, held open (see ``storage/base.py`` and ``local_read.py``).

        ``marker`` is not needed: the directory is the generation.
        Where the directory is missing because an overwrite without
        ``RENAME_EXCHANGE`` was interrupted, its previous generation is opened.

        Raises:
            CheckpointNotFoundError: Nothing there, not a directory, or a symbolic link.
        """
        return LocalGeneration.open_path(self.location, previous=previous_generation(self.location))
