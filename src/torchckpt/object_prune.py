"""``torchckpt gc`` on an object store URL: old steps, and the generations crashed saves left.

A checkpoint in an object store is a marker (the manifest) naming one
generation, ``<ckpt>/gen-<id>/`` (``storage/object_storage.py``). A save
deletes the generations it saw when it began once it has committed; what a
crashed multi-rank save left, or a delete that failed, stays until the next
save to that checkpoint, or until ``gc``:

- **Leftover generations** of a checkpoint are the ones its marker does not
  name (``ObjectStorage.leftovers``). A young one may be a save in progress,
  so only those whose newest object is older than a grace period are deleted
  (``older_than_s``; 0: all); younger ones are kept and reported. Just
  before each delete the marker is read again, so a generation committed
  meanwhile is kept.
- **Old steps** (a root of ``step_<n>`` checkpoints, as the manager names
  them): the committed steps no retention policy keeps (never the newest),
  each deleted marker first (``ObjectStorage.delete_all``), so it is no
  longer listed as committed before its objects go.

The URL is a checkpoint when it has a marker or generations; otherwise it
is a root, and every checkpoint directly below it is cleaned. Planning reads
and lists only; a dry run stops there. The plan and result are the local
``gc``'s (:class:`.prune.PrunePlan`, :class:`.prune.PruneResult`), so the
command reports both alike.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import CheckpointError, CheckpointNotFoundError
from .format.manifest import MANIFEST_NAME
from .prune import PrunePlan, PruneResult
from .reading import read_manifest
from .retention import CheckpointInfo, RetentionPolicy, doomed
from .step_dirs import step_of
from .step_metadata import decode_metrics
from .storage.object_storage import ObjectStorage, list_children

__all__ = [
    "DEFAULT_GRACE_S",
    "ObjectPrunePlan",
    "check_checkpoint_url",
    "parse_storage_options",
    "plan_object_prune",
    "prune_objects",
]

logger = logging.getLogger(__name__)

#: Default age (seconds of its newest object) below which a leftover generation is kept: a save may be writing it.
DEFAULT_GRACE_S = 3600.0


def parse_storage_options(items: Sequence[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (``--storage-option``) as a dict; a later key wins.

    Raises:
        ValueError: An item without ``=`` or with an empty key (names it).
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option takes KEY=VALUE (e.g. endpoint=http://127.0.0.1:9000), got {item!r}")
        out[key.strip()] = value
    return out


def _steps_below(url: str, options: Mapping[str, str] | None) -> list[tuple[int, str]]:
    """``(step, url)`` of every child of ``url`` named as a manager's step (``step_<n:010d>``), ascending."""
    return sorted((s, f"{url}/{name}") for name in list_children(url, options) if (s := step_of(name)) is not None)


def check_checkpoint_url(url: str, options: Mapping[str, str] | None) -> None:
    """Refuse, in words, a URL that is a manager's root rather than one checkpoint (one listing).

    Raises:
        CheckpointNotFoundError: ``url`` holds step checkpoints and no generation of its own.
        OSError: The listing failed (a missing bucket, refused credentials: names the URL).
    """
    children = list_children(url, options)
    if any(name.startswith("gen-") for name in children):
        return  # a checkpoint's generations: the reader says what is wrong with it, if anything
    steps = sorted(s for name in children if (s := step_of(name)) is not None)
    if steps:
        shown = ", ".join(map(str, steps[:8])) + (f", ... ({len(steps)} steps)" if len(steps) > 8 else "")
        raise CheckpointNotFoundError(
            f"{url} holds the steps {shown} of a CheckpointManager, not one checkpoint: give a step's URL "
            f"(e.g. {url}/step_{steps[-1]:010d})",
            path=url,
        )


@dataclass
class ObjectPrunePlan(PrunePlan):
    """What :func:`prune_objects` would delete at an object store URL (``root``).

    Attributes:
        options: The object store client's configuration keys.
    """

    options: dict[str, str] = field(default_factory=dict)


def plan_object_prune(
    url: str,
    policies: Sequence[RetentionPolicy],
    *,
    older_than_s: float = DEFAULT_GRACE_S,
    options: Mapping[str, str] | None = None,
) -> ObjectPrunePlan:
    """Plan the deletion of old steps and leftover generations at ``url``; change nothing.

    Args:
        url: A checkpoint's URL, or a root of checkpoints (a manager's steps).
        policies: Which committed steps of a root to keep (none: no step is deleted).
        older_than_s: Leftover generations younger than this (newest object) are kept.
        options: The object store client's configuration keys.

    Raises:
        CheckpointNotFoundError: Nothing at ``url``: no checkpoint, none below it.
        ValueError: ``policies`` given for one checkpoint (they choose among steps).
        OSError: A listing or a read failed (names the URL).
    """
    plan = ObjectPrunePlan(url, options=dict(options or {}))
    storage = ObjectStorage(url, plan.options)
    if storage.generations() or storage.read_marker(MANIFEST_NAME) is not None:
        if policies:
            raise ValueError(f"gc: --keep-last chooses among the steps of a root; {url} is one checkpoint")
        checkpoints = [storage.location]
    else:
        children = list_children(url, plan.options)
        if not children:
            raise CheckpointNotFoundError(f"nothing to clean at {url}: no checkpoint there, nor below it", path=url)
        plan.steps = doomed(policies, _committed(_steps_below(url, plan.options), plan.options))
        checkpoints = [f"{storage.location}/{name}" for name in children]
    for ckpt in checkpoints:
        for name, age_s in sorted(ObjectStorage(ckpt, plan.options).leftovers(MANIFEST_NAME).items()):
            where = f"{ckpt}/{name}"
            if age_s >= older_than_s:
                plan.leftovers.append(where)
            else:
                why = f"written {age_s:.0f} s ago, a save may be in progress (--older-than {older_than_s:g})"
                plan.kept.append((where, why))
    return plan


def _committed(steps: list[tuple[int, str]], options: Mapping[str, str]) -> list[CheckpointInfo]:
    """The committed steps among ``steps`` (a valid manifest recording that step, if any), ascending."""
    infos = []
    for step, url in steps:
        try:
            manifest = read_manifest(url, options)
        except CheckpointError:
            continue  # not committed, or not readable as a checkpoint: not a step retention chooses among
        if manifest.metadata.get("step", step) != step:
            continue
        metrics = decode_metrics(manifest.metadata.get("metrics"))
        infos.append(CheckpointInfo(step, url, metrics, manifest.created_unix_s))
    return infos


def prune_objects(plan: ObjectPrunePlan) -> PruneResult:
    """Delete what ``plan`` lists; report what could not be deleted (URL and error).

    A step is deleted marker first; a leftover generation is deleted unless
    its checkpoint's marker names it now (committed since the plan was made).
    """
    result = PruneResult(kept=list(plan.kept))
    for info in plan.steps:
        try:
            ObjectStorage(info.path, plan.options).delete_all(MANIFEST_NAME)
        except OSError as e:
            result.failed_steps.append(info.step)
            result.failures.append((info.path, e))
            continue
        result.steps.append(info.step)
    for where in plan.leftovers:
        ckpt, name = where.rsplit("/", 1)
        storage = ObjectStorage(ckpt, plan.options)
        try:
            marker = storage.read_marker(MANIFEST_NAME)
            if marker is not None and marker[1] == name:
                result.kept.append((where, "committed while gc ran"))
                continue
            storage.delete_generation(name)
        except (OSError, CheckpointError) as e:
            result.failures.append((where, e if isinstance(e, OSError) else OSError(errno.EIO, str(e))))
            continue
        logger.info("deleted the leftover generation %s", where)
        result.leftovers.append(where)
    return result
