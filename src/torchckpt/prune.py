"""Pruning a manager's root from outside the training job: old steps and the leftovers of interrupted saves.

This is what ``torchckpt gc`` runs. The manager's own retention runs inside
the training job, where a failed delete is logged and retried at the next
save; here the work is planned first without touching anything (a dry run
stops there), and every failure is reported with its path and errno. The
steps, the leftovers and their names come from :mod:`.step_dirs`, which
decides for the manager too; which steps go, from :func:`.retention.doomed`.
A step is moved aside with :func:`.step_dirs.move_step_aside` and then
removed here, manifest first, reporting each error (the manager's own
deletion ignores them).

Leftovers are the hidden directories beside the steps:

- ``.step_<n>.torchckpt-trash-<hex>``: a step or an old generation moved
  aside to be deleted. Deleted, except one that still holds a manifest
  while the step directory it was moved from is absent: an overwrite
  interrupted between its two renames (file systems without
  ``RENAME_EXCHANGE``) leaves the only copy of that step there. It is kept
  and reported.
- ``.step_<n>.torchckpt-pending``: the directory a save writes into. Deleted
  only while holding the root's save lock, that is while no save into the
  root runs in any process.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .retention import CheckpointInfo, RetentionPolicy, doomed
from .step_dirs import committed_steps, leftover_of, move_step_aside, step_of
from .format.manifest import MANIFEST_NAME
from .storage.local_dirs import save_lock_if_free

__all__ = ["PrunePlan", "PruneResult", "plan_prune", "prune"]


@dataclass
class PrunePlan:
    """What :func:`prune` would delete under ``root``.

    Attributes:
        root: The manager's root directory.
        steps: The committed steps no policy keeps (never the newest).
        leftovers: Hidden directories of interrupted saves and deletes.
        kept: ``(path, why)`` of leftovers left alone on purpose.
    """

    root: str
    steps: list[CheckpointInfo] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def empty(self) -> bool:
        """Whether there is nothing to delete or report."""
        return not (self.steps or self.leftovers or self.kept)


@dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        steps: Steps deleted (no longer listed).
        failed_steps: Steps still there because moving them aside failed.
        leftovers: Leftover directories deleted.
        kept: ``(path, why)`` of leftovers left alone on purpose.
        failures: ``(path, error)`` of every directory not (completely) deleted.
    """

    steps: list[int] = field(default_factory=list)
    failed_steps: list[int] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, OSError]] = field(default_factory=list)


def plan_prune(root: str, policies: Sequence[RetentionPolicy]) -> PrunePlan:
    """Plan the deletion of the steps no policy keeps and of the leftovers; change nothing.

    Raises:
        OSError: ``root`` cannot be listed.
    """
    plan = PrunePlan(root, steps=doomed(policies, committed_steps(root)))  # the newest always stays
    pending = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        leftover = leftover_of(name)
        if leftover is None:
            continue
        if leftover.kind == "trash":
            origin = os.path.join(root, leftover.origin)
            # Retention names its trash after the step number (.step_12.): only an overwrite's, named after
            # the directory (.step_0000000012.), can hold a generation that is nowhere else.
            if (
                step_of(leftover.origin) is not None
                and os.path.lexists(os.path.join(path, MANIFEST_NAME))
                and not os.path.lexists(origin)
            ):
                plan.kept.append((path, f"it holds the only copy of {origin}; rename it to that name to restore it"))
            else:
                plan.leftovers.append(path)
        elif os.path.isdir(path):
            pending.append(path)
    if pending:
        _plan_pending(plan, pending)
    return plan


def _plan_pending(plan: PrunePlan, pending: list[str]) -> None:
    """Plan the deletion of the pending directories, unless a save into the root is running."""
    try:
        with save_lock_if_free(plan.root) as free:
            pass
    except OSError:
        free = True  # cannot tell here: the deletion will try and report
    if free:
        plan.leftovers += pending
    else:
        plan.kept += [(p, f"a save into {plan.root} is running") for p in pending]


def prune(plan: PrunePlan) -> PruneResult:
    """Delete what ``plan`` lists; report what could not be deleted.

    A step is first renamed aside (so it is never listed half deleted), then
    removed manifest first. Pending directories are removed only under the
    root's save lock.
    """
    result = PruneResult(kept=list(plan.kept))
    for info in plan.steps:
        try:
            trash = move_step_aside(info)
        except FileNotFoundError:
            continue  # deleted meanwhile (the training job's own retention)
        except OSError as e:
            result.failed_steps.append(info.step)
            result.failures.append((info.path, e))
            continue
        result.steps.append(info.step)
        _remove(trash, result)
    trash_dirs = [p for p in plan.leftovers if _is_trash(p)]
    for path in trash_dirs:
        if _remove(path, result):
            result.leftovers.append(path)
    pending = [p for p in plan.leftovers if p not in trash_dirs]
    if pending:
        _remove_pending(plan.root, pending, result)
    return result


def _is_trash(path: str) -> bool:
    leftover = leftover_of(os.path.basename(path))
    return leftover is not None and leftover.kind == "trash"


def _remove_pending(root: str, pending: list[str], result: PruneResult) -> None:
    try:
        with save_lock_if_free(root) as free:
            for path in pending:
                if not free:
                    result.kept.append((path, f"a save into {root} is running"))
                elif _remove(path, result):
                    result.leftovers.append(path)
    except OSError as e:
        result.failures += [(path, e) for path in pending]


def _remove(path: str, result: PruneResult) -> bool:
    """Delete a directory, manifest first; record its first error. Whether it is gone."""
    errors: list[tuple[str, OSError]] = []

    def on_error(_function: Any, failed: str, exc: Any) -> None:
        error = exc if isinstance(exc, BaseException) else exc[1]
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            errors.append((failed, error))

    for name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
        file = os.path.join(path, name)
        try:
            if os.path.lexists(file):  # (a read-only file system refuses even to unlink what is not there)
                os.unlink(file)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append((file, e))
    if not errors:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=on_error)
        else:
            shutil.rmtree(path, onerror=on_error)
    if not os.path.lexists(path):
        return True
    failed, error = errors[0] if errors else (path, OSError(f"{path} is still there"))
    if failed != path:
        error = OSError(error.errno, f"{error.strerror} ({failed})")
    result.failures.append((path, error))
    return False
