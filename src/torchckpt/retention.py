"""Retention policies: which committed steps to keep.

Each policy is a small object with one method, ``should_preserve(checkpoints)
-> list[bool]``, over the committed checkpoints in ascending step order. A
step survives if any policy keeps it (:func:`preserved`). :func:`doomed` adds
the guards that hold whatever the policies say: the newest committed step is
never deleted, nor a step the caller guards (the manager guards a step being
written and a step being loaded), nor a step whose files a step that stays
refers to (incremental saves: ``CheckpointInfo.refs``, followed transitively). The manager's retention and ``torchckpt gc``
both decide through :func:`doomed`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError

__all__ = [
    "CheckpointInfo", "KeepBest", "KeepEvery", "KeepLast", "RetentionPolicy", "doomed", "preserved", "referenced",
]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as the policies see it.

    Attributes:
        step: Its step number.
        path: Its directory.
        metrics: The metrics given to ``save(metrics=...)``.
        created_unix_s: When it was committed.
        refs: The names of the checkpoints of the same root whose files it refers to
            (an incremental save): they are kept as long as it is.
    """

    step: int
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    created_unix_s: float = 0.0
    refs: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """Its name in the root (the last part of its path)."""
        return self.path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


class RetentionPolicy(Protocol):
    """Decides, for each checkpoint (ascending steps), whether to keep it."""

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]: ...


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest steps."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"KeepLast.n must be >= 1, got {self.n}", field="n")

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        cut = len(checkpoints) - self.n
        return [i >= cut for i in range(len(checkpoints))]


@dataclass(frozen=True)
class KeepEvery:
    """Keep every step that is a multiple of ``n_steps``."""

    n_steps: int

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise ConfigError(f"KeepEvery.n_steps must be >= 1, got {self.n_steps}", field="n_steps")

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        return [c.step % self.n_steps == 0 for c in checkpoints]


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` steps with the best value of ``metric`` (steps without it are not kept by this policy)."""

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"KeepBest.n must be >= 1, got {self.n}", field="n")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"KeepBest.mode must be 'min' or 'max', got {self.mode!r}", field="mode")

    def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
        scored = []
        for i, c in enumerate(checkpoints):
            value = c.metrics.get(self.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
                scored.append((value if self.mode == "min" else -value, -c.step, i))
        best = {i for _, _, i in sorted(scored)[: self.n]}
        return [i in best for i in range(len(checkpoints))]


def preserved(policies: Sequence[RetentionPolicy] | None, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
    """Union of the policies' decisions (no policies: keep everything)."""
    if not policies:
        return [True] * len(checkpoints)
    keep = [False] * len(checkpoints)
    for policy in policies:
        decision = policy.should_preserve(checkpoints)
        if len(decision) != len(checkpoints):
            raise ValueError(f"{policy!r} returned {len(decision)} decisions for {len(checkpoints)} checkpoints")
        keep = [a or bool(b) for a, b in zip(keep, decision)]
    return keep


def doomed(
    policies: Sequence[RetentionPolicy] | None,
    checkpoints: Sequence[CheckpointInfo],
    guarded: Collection[int] = (),
) -> list[CheckpointInfo]:
    """The checkpoints to delete: those no policy keeps, except the newest one and the ``guarded`` steps.

    Args:
        policies: The retention policies (none: nothing is deleted).
        checkpoints: The committed checkpoints, ascending steps.
        guarded: Steps never to delete, whatever the policies say.
    """
    if not checkpoints:
        return []
    keep = preserved(policies, checkpoints)
    newest = checkpoints[-1].step
    gone = [c for c, k in zip(checkpoints, keep) if not k and c.step != newest and c.step not in guarded]
    needed = referenced(checkpoints, [c for c in checkpoints if c not in gone])
    return [c for c in gone if c.name not in needed]


def referenced(checkpoints: Sequence[CheckpointInfo], kept: Sequence[CheckpointInfo]) -> set[str]:
    """The names of the checkpoints the ``kept`` ones need, directly or through others (incremental saves)."""
    by_name = {c.name: c for c in checkpoints}
    needed: set[str] = set()
    todo = [name for c in kept for name in c.refs]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            found = by_name.get(name)
            todo.extend(found.refs if found is not None else ())
    return needed
