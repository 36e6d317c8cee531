"""The directories of a CheckpointManager's root: step names, the committed steps, leftovers, deletion.

This module is the one home of the root's layout; the manager, ``torchckpt
gc`` (:mod:`.prune`) and ``torchckpt ls`` (:mod:`.cli`) all go through it::

    <root>/
      step_0000000012/                       step 12: ``step_<n:010d>``, nothing else counts
      .step_0000000013.torchckpt-pending     a save of step 13 in progress (or crashed)
      .step_12.torchckpt-trash-<hex>         step 12 moved aside by retention, being deleted
      .step_0000000012.torchckpt-trash-<hex> an old generation of step 12 moved aside by an overwrite

A step is *committed* when its directory has the canonical name and a valid
manifest whose recorded step (if any) is the one the name says. Listing reads
manifests only; it never reads data.

A step is deleted by renaming it aside first (atomic: never listed half
deleted), then removing the trash with :func:`.storage.local.remove_generation`
(manifest first). Retention names its trash after the step *number*
(``.step_12.``); the commit protocol names an overwrite's after the
*directory* (``.step_0000000012.``), so the two can be told apart later.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

from .checkpoint_reader import read_manifest
from .errors import CheckpointError, ConfigError
from .retention import CheckpointInfo
from .step_metadata import decode_metrics
from .storage import fs
from .format.manifest import MANIFEST_NAME, Manifest
from .storage.local_dirs import remove_generation

__all__ = [
    "LIST_ATTEMPTS",
    "Leftover",
    "committed_steps",
    "discard_step",
    "leftover_of",
    "move_step_aside",
    "remove_trash",
    "step_dirs",
    "step_info",
    "step_name",
    "step_of",
    "step_path",
]

#: How many times a listing starts again when a step it listed was deleted while its manifest was read.
LIST_ATTEMPTS = 10

_STEP_NAME = re.compile(r"^step_(\d{1,19})$")
_LEFTOVER = re.compile(r"^\.(step_\d+)\.torchckpt-(pending|trash-[0-9a-f]+)$")


def step_name(step: int) -> str:
    """The directory name of ``step`` (``12`` -> ``step_0000000012``).

    Raises:
        ConfigError: ``step`` is not a non-negative int (``field`` is ``"step"``).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"step must be a non-negative int, got {step!r}", field="step")
    return f"step_{step:010d}"


def step_path(root: str, step: int) -> str:
    """The directory of ``step`` under ``root``.

    Raises:
        ConfigError: ``step`` is not a non-negative int.
    """
    return os.path.join(root, step_name(step))


def step_of(name: str) -> int | None:
    """The step a directory name stands for (``step_0000000012`` -> 12), or None.

    Only the name :func:`step_name` gives counts: ``step_12`` is not step 12's directory.
    """
    m = _STEP_NAME.match(name)
    if m is None or name != f"step_{int(m.group(1)):010d}":
        return None
    return int(m.group(1))


def step_dirs(root: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every entry of ``root`` with a step's name, committed or not, ascending.

    Raises:
        OSError: ``root`` cannot be listed (``FileNotFoundError``: it is missing).
    """
    found = [(step, os.path.join(root, name)) for name in os.listdir(root) if (step := step_of(name)) is not None]
    return sorted(found)


def committed_steps(root: str) -> list[CheckpointInfo]:
    """The committed steps under ``root``, ascending, with their metrics and commit time.

    A step deleted while it is listed (retention in another process) is left
    out; the listing then starts again, at most :data:`LIST_ATTEMPTS` times, so
    that a step committed meanwhile is not missed.

    Raises:
        OSError: ``root`` cannot be listed (``FileNotFoundError``: it is missing).
    """
    infos: list[CheckpointInfo] = []
    for _ in range(LIST_ATTEMPTS):
        infos, vanished = _list_once(root)
        if not vanished:
            break
    return infos


def _list_once(root: str) -> tuple[list[CheckpointInfo], bool]:
    """The committed steps, and whether a listed step directory vanished while they were read."""
    infos = []
    vanished = False
    for step, path in step_dirs(root):
        try:
            manifest = read_manifest(path)
        except (CheckpointError, OSError):
            vanished = vanished or not os.path.lexists(path)
            continue  # not committed (or unreadable): not a checkpoint
        info = step_info(step, path, manifest)
        if info is not None:
            infos.append(info)
    return infos, vanished


def step_info(step: int, path: str, manifest: Manifest) -> CheckpointInfo | None:
    """The committed step ``step`` at ``path`` as retention sees it, or None when its manifest records another step."""
    if manifest.metadata.get("step", step) != step:
        return None
    refs = frozenset(ref.name for line in manifest.ranks for ref in line.refs)
    return CheckpointInfo(step, path, decode_metrics(manifest.metadata.get("metrics")), manifest.created_unix_s, refs)


@dataclass(frozen=True)
class Leftover:
    """A hidden directory beside the steps, left by a save or a delete.

    Attributes:
        kind: ``"pending"`` (a save's directory) or ``"trash"`` (moved aside to be deleted).
        origin: The name of the directory it belongs to, as its name spells it
            (``step_0000000012`` for a save's or an overwrite's, ``step_12`` for retention's).
    """

    kind: str
    origin: str


def leftover_of(name: str) -> Leftover | None:
    """What the entry ``name`` of a root is as a leftover, or None when it is not one."""
    m = _LEFTOVER.match(name)
    if m is None:
        return None
    return Leftover("pending" if m.group(2) == "pending" else "trash", m.group(1))


def move_step_aside(info: CheckpointInfo) -> str:
    """Rename a committed step to a fresh trash name beside it (atomic); return the trash path.

    The step is no longer listed once this returns; delete the trash with
    :func:`.storage.local.remove_generation` (or, reporting errors, as :mod:`.prune` does).

    Raises:
        OSError: The rename failed (``FileNotFoundError``: the step is gone already).
    """
    trash = os.path.join(os.path.dirname(info.path), f".step_{info.step}.torchckpt-trash-{uuid.uuid4().hex}")
    fs.rename(info.path, trash)
    return trash


def discard_step(info: CheckpointInfo) -> None:
    """Delete a committed step: move it aside, then remove it (errors of the removal are ignored).

    Raises:
        OSError: Moving it aside failed: the step is intact and still listed.
    """
    remove_generation(move_step_aside(info), marker=MANIFEST_NAME)


def remove_trash(root: str) -> None:
    """Delete every trash leftover under ``root`` (never a pending directory: a save may be running)."""
    for name in os.listdir(root):
        leftover = leftover_of(name)
        if leftover is not None and leftover.kind == "trash":
            remove_generation(os.path.join(root, name), marker=MANIFEST_NAME)
