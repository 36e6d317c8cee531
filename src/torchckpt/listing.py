"""The rows of ``torchckpt ls``: one per step of a manager's root, and where each step is committed.

A row is a plain dict (what ``--json`` prints)::

    {"step", "path", "committed": True, "time", "size_bytes", "ranks", "format",
     "stall_s", "write_s", "metrics", "refs"[, "verified"]}       a committed step
    {"step", "path", "committed": False, "error"}          anything else with a step's name

``size_bytes`` counts the step's own files; ``refs`` names the checkpoints of
the same root whose files hold the rest of its tensors (an incremental save's
unchanged tensors), sorted.

With a remote tier (:func:`tier_rows`), each row also says where the step is
committed: ``"location"`` is ``"local"``, ``"remote"``, ``"both"`` or ``"-"``,
and ``"locations"`` lists the tiers.
"""

from __future__ import annotations

import datetime
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError
from .format.manifest import MANIFEST_NAME
from .reading import read_manifest
from .step_metadata import decode_metrics
from .step_store import ObjectSteps, StepStore
from .storage.object_storage import ObjectStorage

__all__ = ["check_object_root", "root_rows", "step_row", "tier_rows"]


def _time_text(unix_s: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(unix_s).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(unix_s)


def _metrics_of(raw: Any) -> Any:
    """A step's metrics (non-finite numbers decoded); anything but a dict, as the manifest holds it."""
    if isinstance(raw, dict):
        return decode_metrics(raw)
    return {} if raw is None else raw


def step_row(step: int, path: str, verify: bool) -> dict[str, Any]:
    """The row of the step at ``path`` (a directory or URL); ``verify`` reads and checks all its data."""
    try:
        man = read_manifest(path)
    except (CheckpointError, OSError) as e:  # one unreadable step is that step's row, not the listing's end
        return {"step": step, "path": path, "committed": False, "error": str(e)}
    row: dict[str, Any] = {
        "step": step,
        "path": path,
        "committed": True,
        "time": _time_text(man.created_unix_s),
        "size_bytes": sum(r.size_bytes for r in man.ranks),
        "ranks": man.world_size,
        "format": man.layout,
        "stall_s": man.stats.get("stall_s"),
        "write_s": man.stats.get("write_s"),
        "metrics": _metrics_of(man.metadata.get("metrics")),
        "refs": sorted({ref.name for r in man.ranks for ref in r.refs}),
    }
    if verify:
        from .verify import verify_checkpoint

        row["verified"] = not verify_checkpoint(path)[1]
    return row


def root_rows(store: StepStore, verify: bool) -> dict[int, dict[str, Any]]:
    """The rows of every entry with a step's name under ``store``, by step (ascending).

    Raises:
        OSError: The root cannot be listed.
    """
    return {step: step_row(step, path, verify) for step, path in store.entries()}


def check_object_root(store: ObjectSteps) -> None:
    """Refuse, in words, an object store URL that is one checkpoint rather than a root of steps.

    Raises:
        CheckpointNotFoundError: A checkpoint is committed at the root itself.
        OSError: The store cannot be reached (names the URL).
    """
    if ObjectStorage(store.root).marker_etag(MANIFEST_NAME) is not None:
        raise CheckpointNotFoundError(
            f"{store.root} is a checkpoint, not a root of steps: `torchckpt inspect {store.root}` shows it",
            path=store.root,
        )


def tier_rows(local: dict[int, dict[str, Any]], remote: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step of either tier, ascending: the local row where the step is committed locally, else
    the remote one, with where the step is committed (``location``, ``locations``)."""
    rows = []
    for step in sorted(set(local) | set(remote)):
        there = [t for t, rs in (("local", local), ("remote", remote)) if step in rs and rs[step]["committed"]]
        use_local = step in local and (local[step]["committed"] or step not in remote)
        row = dict(local[step] if use_local else remote[step])
        row["location"] = "both" if len(there) == 2 else there[0] if there else "-"
        row["locations"] = there
        rows.append(row)
    return rows
