"""Where a CheckpointManager's steps live: a local directory or an object store prefix, behind one seam.

The manager (and ``torchckpt ls``) never touch the root with ``os`` calls
directly; they ask a :class:`StepStore`::

    store = open_step_store(root)          # LocalSteps for a path, ObjectSteps for s3://, gs://, az://, memory://
    store.prepare(coordinator=rank == 0)   # once, when the manager opens the root
    store.path(step)                       # where the step's checkpoint is (a directory or a URL)
    store.committed()                      # the committed steps, ascending, with metrics (retention)
    store.occupied(step)                   # whether a save of ``step`` would replace something
    store.present(step)                    # whether ``step`` is still there (a load error: vanished or damaged?)
    store.delete(info)                     # retention: the step is no longer listed once this returns
    store.entries()                        # every step name, committed or not (``torchckpt ls``)

Both layouts name a step ``step_<n:010d>`` below the root (:mod:`.step_dirs`).

- :class:`LocalSteps` is the directory layout of :mod:`.step_dirs`: a step
  is committed when its directory holds a valid manifest; a delete renames
  the step aside first (atomic), then removes it.
- :class:`ObjectSteps` is a prefix of an object store: ``<root>/step_<n>/``
  holds one checkpoint in the object layout of
  :mod:`.storage.object_storage` (its marker ``manifest.json``, put last, and
  the generation it names). A step is committed when its marker is there and
  its manifest valid; a delete removes the marker first (the step is no
  longer listed), then its generations. Nothing local is created: a URL is
  never taken for a directory name. A listing reads every step's manifest (in
  parallel); a step that vanishes between the listing and the read is left
  out (the next listing sees a step committed meanwhile).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .format.manifest import MANIFEST_NAME
from .reading import read_manifest
from .retention import CheckpointInfo
from .step_dirs import committed_steps, discard_step, remove_trash, step_dirs, step_info, step_name, step_of
from .storage.local_dirs import make_dirs_durably, restore_interrupted_swaps
from .storage.locate import is_object_url
from .storage.object_client import parse_object_url
from .storage.object_storage import ObjectStorage, list_children
from .storage.paths import local_path

__all__ = ["LIST_THREADS", "LocalSteps", "ObjectSteps", "StepStore", "delete_steps", "open_step_store"]

#: Manifests of an object store root read at once by a listing.
LIST_THREADS = 16


class StepStore(Protocol):
    """The steps under one manager root (see the module for the call order)."""

    #: The root: an absolute directory, or a normalised URL.
    root: str

    def prepare(self, *, coordinator: bool) -> None:
        """Make the root usable (create it; the coordinator settles what crashes left)."""
        ...

    def path(self, step: int) -> str:
        """The checkpoint location of ``step``."""
        ...

    def committed(self) -> list[CheckpointInfo]:
        """The committed steps, ascending (a missing root: none)."""
        ...

    def occupied(self, step: int) -> bool:
        """Whether something is at the step's name that a save without ``overwrite`` must not replace."""
        ...

    def present(self, step: int) -> bool:
        """Whether the step is (still) there."""
        ...

    def delete(self, info: CheckpointInfo) -> None:
        """Delete a committed step; it is no longer listed once this returns (OSError: it is intact)."""
        ...

    def entries(self) -> list[tuple[int, str]]:
        """``(step, location)`` of every entry with a step's name, committed or not, ascending."""
        ...


def open_step_store(root: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None) -> StepStore:
    """The steps under ``root``: an object store prefix for its URLs (its client configured by
    ``storage_options`` on top of the environment), else a local directory.

    Raises:
        UnsupportedURLError: ``root`` is a URL of a storage torchckpt does not have.
    """
    if is_object_url(root):
        return ObjectSteps(os.fspath(root), storage_options)
    return LocalSteps(root)


class LocalSteps:
    """The steps under a local directory (the layout of :mod:`.step_dirs`).

    Args:
        root: The directory (made absolute; a URL is refused).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(local_path(root))

    def prepare(self, *, coordinator: bool) -> None:
        """Create the root durably; the coordinator restores interrupted swaps and removes trash."""
        make_dirs_durably(self.root)
        if coordinator:
            restore_interrupted_swaps(self.root, marker=MANIFEST_NAME)
            remove_trash(self.root)

    def path(self, step: int) -> str:
        """The directory of ``step``."""
        return os.path.join(self.root, step_name(step))

    def committed(self) -> list[CheckpointInfo]:
        """The committed steps (:func:`.step_dirs.committed_steps`); none when the root is missing."""
        try:
            return committed_steps(self.root)
        except FileNotFoundError:
            return []

    def occupied(self, step: int) -> bool:
        """Whether an entry is at the step's name (a link is none: the writer refuses it as a link)."""
        path = self.path(step)
        return os.path.lexists(path) and not os.path.islink(path)

    def present(self, step: int) -> bool:
        """Whether the step's directory exists."""
        return os.path.isdir(self.path(step))

    def delete(self, info: CheckpointInfo) -> None:
        """Move the step aside (atomic), then remove it (:func:`.step_dirs.discard_step`)."""
        discard_step(info)

    def entries(self) -> list[tuple[int, str]]:
        """The step directories (links and files with a step's name are left out)."""
        return [(step, path) for step, path in step_dirs(self.root) if os.path.isdir(path)]


class ObjectSteps:
    """The steps under an object store prefix (``s3://bucket/run/step_<n>/...``).

    Args:
        root: The prefix's URL.
        storage_options: The client's configuration keys, on top of the environment.

    Raises:
        UnsupportedURLError: ``root`` is not a URL of an object store torchckpt serves.
    """

    def __init__(self, root: str, storage_options: Mapping[str, str] | None = None) -> None:
        self.root = parse_object_url(root).url
        self.options = dict(storage_options or {})

    def prepare(self, *, coordinator: bool) -> None:
        """Nothing to create: a prefix exists once an object is put below it."""

    def path(self, step: int) -> str:
        """The URL of ``step``."""
        return f"{self.root}/{step_name(step)}"

    def committed(self) -> list[CheckpointInfo]:
        """The steps whose marker is there and whose manifest is valid, ascending.

        Raises:
            OSError: The store cannot be listed or read (names the URL); a missing
                bucket is a ``FileNotFoundError``.
        """
        entries = self.entries()
        if not entries:
            return []
        with ThreadPoolExecutor(min(LIST_THREADS, len(entries)), thread_name_prefix="torchckpt-list") as pool:
            found = list(pool.map(lambda e: _info_at(*e, self.options), entries))
        return [info for info in found if info is not None]

    def occupied(self, step: int) -> bool:
        """Whether the step's marker is there (a crashed save's objects without one are replaced)."""
        return self.present(step)

    def present(self, step: int) -> bool:
        """Whether the step's marker is there.

        Raises:
            OSError: The store cannot be reached.
        """
        return ObjectStorage(self.path(step), self.options).marker_etag(MANIFEST_NAME) is not None

    def delete(self, info: CheckpointInfo) -> None:
        """Delete the marker (no longer listed), then every generation of the step.

        Raises:
            OSError: A delete failed (the marker's: the step is intact and still listed).
        """
        ObjectStorage(info.path, self.options).delete_all(MANIFEST_NAME)

    def entries(self) -> list[tuple[int, str]]:
        """``(step, URL)`` of every prefix below the root with a step's name.

        Raises:
            OSError: The listing failed (``FileNotFoundError``: no such bucket).
        """
        names = list_children(self.root, self.options)
        return sorted((step, f"{self.root}/{name}") for name in names if (step := step_of(name)) is not None)


def _info_at(step: int, url: str, options: Mapping[str, str] | None) -> CheckpointInfo | None:
    """The committed step at ``url``, or None (no marker, or an invalid manifest: not a checkpoint)."""
    try:
        manifest = read_manifest(url, options)
    except (CheckpointNotFoundError, CorruptCheckpointError):
        return None
    return step_info(step, url, manifest)


def delete_steps(
    store: StepStore, doomed: Iterable[CheckpointInfo], *, tier: str, log: logging.Logger
) -> list[int]:
    """Delete the steps retention gave up, one by one; return those deleted.

    A failed delete is logged on ``log`` (naming the step, its path and the
    ``tier``) and left for the next time retention runs: it never fails a save.
    """
    deleted = []
    for c in doomed:
        try:
            store.delete(c)
        except OSError as e:
            log.warning("could not delete step %d (%s) of the %s tier: %s; will retry", c.step, c.path, tier, e)
            continue
        deleted.append(c.step)
    return deleted
