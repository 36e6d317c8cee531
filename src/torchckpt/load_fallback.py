"""Which step a CheckpointManager loads: the newest that loads, skipping damaged ones.

The rules, in the order they apply to each committed step, newest first:

- it loads: done;
- it vanished (``CheckpointNotFoundError``, or its directory is gone after
  the error): retention in another process deleted it, which is no damage;
  it is skipped, and once the listing is exhausted the steps are listed
  again (a newer step was committed meanwhile), at most ``LIST_ATTEMPTS``
  times;
- it is damaged (``CorruptCheckpointError``, ``CheckpointIOError``): with
  fallback, a warning names it and the next older step is tried; without,
  the error is raised;
- any other error (a template that does not fit, a refused pickle, a bad
  argument) is the caller's to fix: raised at once.

No committed step at all is a ``CheckpointNotFoundError``; every step
damaged is a ``CorruptCheckpointError`` (starting afresh is not the answer
to damage). A step asked for by number is loaded or its error raised.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

from .errors import CheckpointError, CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError
from .step_dirs import LIST_ATTEMPTS, step_path

__all__ = ["DAMAGE", "load_newest", "load_step"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What makes a load skip a step and try an older one: the step is damaged (or vanished).
DAMAGE = (CorruptCheckpointError, CheckpointIOError, CheckpointNotFoundError)


class _Where:
    """Where a step is and whether it is still there: given, or the local directory layout of ``root``."""

    def __init__(self, root: str, path_of: Callable[[int], str] | None, present: Callable[[int], bool] | None) -> None:
        self.path = path_of or (lambda s: step_path(root, s))
        self.present = present or (lambda s: os.path.isdir(step_path(root, s)))


def load_step(
    root: str,
    step: int,
    load: Callable[[int], T],
    *,
    path_of: Callable[[int], str] | None = None,
    present: Callable[[int], bool] | None = None,
) -> T:
    """``load(step)``, its error raised; a step deleted while it was read is a ``CheckpointNotFoundError``.

    Args:
        root: The manager's root (names it in errors).
        step: The step to load.
        load: Loads one step.
        path_of: Where a step is, for messages (default: its directory under ``root``).
        present: Whether a step is still there (default: its directory under ``root`` exists).

    Raises:
        CheckpointNotFoundError: The step is not (or no longer) there.
        Exception: Whatever ``load`` raised otherwise.
    """
    where = _Where(root, path_of, present)
    path = where.path(step)
    try:
        return load(step)
    except DAMAGE as e:
        if isinstance(e, CheckpointNotFoundError) or where.present(step):
            raise
        raise CheckpointNotFoundError(f"step {step} at {path} was deleted while it was being loaded", path=path) from e


def load_newest(
    root: str,
    steps: Callable[[], list[int]],
    load: Callable[[int], T],
    *,
    fallback: bool,
    path_of: Callable[[int], str] | None = None,
    present: Callable[[int], bool] | None = None,
) -> tuple[int, T]:
    """``(step, load(step))`` of the newest committed step that loads, by the rules of this module.

    Call order: ``steps()`` lists the committed steps (ascending); ``load(step)``
    is called on them newest first until one returns; ``steps()`` is called
    again only when a step vanished under the load.

    Args:
        root: The manager's root (names it in errors and warnings).
        steps: Lists the committed steps, ascending.
        load: Loads one step; raises one of :data:`DAMAGE` when the step is damaged or gone.
        fallback: Skip a damaged step (warning) instead of raising its error.
        path_of: Where a step is, for messages (default: its directory under ``root``).
        present: Whether a step is still there (default: its directory under ``root`` exists).

    Raises:
        CheckpointNotFoundError: No committed step.
        CorruptCheckpointError: Every committed step is damaged (from the last error).
    """
    where = _Where(root, path_of, present)
    failed: list[tuple[int, CheckpointError]] = []
    for _ in range(LIST_ATTEMPTS):
        vanished = False
        for s in reversed(steps()):
            try:
                return s, load(s)
            except DAMAGE as e:
                path = where.path(s)
                if isinstance(e, CheckpointNotFoundError) or not where.present(s):
                    vanished = True  # deleted before or while it was read: not a bad step
                    continue
                if not fallback:
                    raise
                warnings.warn(f"skipping step {s} at {path}: {e}", stacklevel=3)
                logger.warning("skipping step %d at %s: %s", s, path, e)
                failed.append((s, e))
        if not vanished:
            break
        # Listed steps vanished under this load: newer ones were committed meanwhile. List again.
    if not failed:
        raise CheckpointNotFoundError(f"no committed checkpoint under {root}", path=root)
    raise CorruptCheckpointError(
        f"no loadable checkpoint under {root}: steps {[s for s, _ in failed]} are damaged; "
        f"the last error: {failed[-1][1]}",
        path=root,
    ) from failed[-1][1]
