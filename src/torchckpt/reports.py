"""What each rank reports to the coordinator at the end of its part of a save, and how the coordinator reads it.

A rank of a job of several writes, once its rank file is durable:

- (native layout) its whole entry — tensor table, tree, sharded tensors — as
  its *index object* ``rank_NNNNN.index.json`` (sealed like the manifest),
  committed with the checkpoint;
- a *report* ``rank_NNNNN.entry.json`` for the coordinator, deleted at commit:
  its manifest line (a stub naming the index: file, size, digest, the
  signature of its plain state), the digest of its global-table lines, and the
  chunks it lists (tensors with no grid).

The coordinator reads every report (small: its size does not grow with the
number of tensors on a grid) and, for each distinct table digest, the index of
the first rank that reported it: the manifest then holds one line per rank and
one per sharded tensor (``format/table.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptCheckpointError
from .format.fields import ManifestError
from .format.gcpause import paused_gc
from .format.manifest import (
    CHUNK_BYTES,
    SEAL_BYTES,
    IndexRef,
    Layout,
    RankEntry,
    build_manifest,
    check_seal_prefix,
    index_file_name,
    parse_rank_entry,
    parse_rank_index,
    seal_manifest,
)
from .format.shards import ShardedEntry
from .format.table import build_table, listed_chunks, parse_table, table_digest
from .storage.base import SaveSession

__all__ = ["RankReport", "commit_manifest", "read_reports", "representative_tables", "write_report"]


def _report_name(rank: int) -> str:
    return f"rank_{rank:05d}.entry.json"


@dataclass
class RankReport:
    """A rank's report: its manifest line, its global table's digest, the chunks it lists."""

    entry: RankEntry
    table: str = ""
    listed: list[Any] = field(default_factory=list)

    @classmethod
    def of(cls, entry: RankEntry) -> RankReport:
        """The report of ``entry`` (a whole entry, or a torch_save line)."""
        if entry.tree is None:
            return cls(entry)
        return cls(entry, table_digest(entry.sharded), listed_chunks(entry.sharded, [t.shape for t in entry.tensors]))


def write_report(session: SaveSession, entry: RankEntry) -> None:
    """Store this rank's index object (native layout) and its report for the coordinator, both durably."""
    report = RankReport.of(entry)
    line = entry
    if entry.tree is not None:
        data = seal_manifest(entry.to_json())
        ref = IndexRef(index_file_name(entry.rank), len(data), check_seal_prefix(data[:SEAL_BYTES]))
        session.put(ref.file, data)
        line = entry.stub(ref)
    doc = {"entry": line.to_json(), "table": report.table, "listed": report.listed}
    session.put(_report_name(entry.rank), json.dumps(doc).encode())


def read_reports(session: SaveSession, world: int, path: str) -> list[RankReport]:
    """Coordinator: every rank's report, in rank order (each deleted once read).

    Raises:
        CorruptCheckpointError: A report is missing or invalid (names the rank).
    """
    reports = []
    for r in range(world):
        name = _report_name(r)
        try:
            doc = json.loads(session.get(name))
            entry = parse_rank_entry(doc["entry"], r, CHUNK_BYTES, world)
            table, listed = doc.get("table", ""), doc.get("listed", [])
            if not isinstance(table, str) or not isinstance(listed, list):
                raise ValueError("malformed table digest or listed chunks")
            reports.append(RankReport(entry, table, listed))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(
                f"rank {r} reported no result for the checkpoint {path}: {e}",
                path=path, file=os.path.join(session.location, name),
            ) from e  # fmt: skip
        session.delete(name)
    return reports


def representative_tables(
    session: SaveSession, reports: list[RankReport], world: int, path: str, own: RankEntry | None
) -> dict[int, tuple[ShardedEntry, ...]]:
    """``{rank: its sharded entries}`` for the first rank of each distinct table digest.

    ``own``: the coordinator's whole entry (a one-rank save has no index object).

    Raises:
        CorruptCheckpointError: An index cannot be read back or is not the one reported.
    """
    out: dict[int, tuple[ShardedEntry, ...]] = {}
    seen: set[str] = set()
    for r in reports:
        if r.table in seen:
            continue
        seen.add(r.table)
        if r.entry.index is None:
            out[r.entry.rank] = own.sharded if own is not None and own.rank == r.entry.rank else r.entry.sharded
            continue
        try:
            full = parse_rank_index(session.get(r.entry.index.file), r.entry, CHUNK_BYTES, world)
        except (OSError, ManifestError) as e:
            raise CorruptCheckpointError(
                f"rank {r.entry.rank}'s index {r.entry.index.file} for the checkpoint {path} cannot be read back: {e}",
                path=path, file=r.entry.index.file,
            ) from e  # fmt: skip
        out[r.entry.rank] = full.sharded
    return out


@paused_gc()  # every rank's line and the table: many small objects, see format/gcpause.py
def commit_manifest(
    session: SaveSession,
    world: int,
    path: str,
    *,
    own: RankEntry | None,
    layout: str,
    metadata: dict[str, Any],
    stats: dict[str, Any],
) -> bytes:
    """Coordinator: the manifest of a save — every rank's report read, the global table built and checked.

    ``own``: the coordinator's whole entry; ``stats`` gains ``file_bytes``.

    Raises:
        ManifestError: The ranks' tables disagree, or a listed tensor's chunks do not tile it (names the key).
        CorruptCheckpointError: A report or index is missing or invalid.
    """
    if world == 1:
        if own is None:
            raise RuntimeError(f"the save of {path} wrote no rank entry to commit")
        reports = [RankReport.of(own)]
    else:
        reports = read_reports(session, world, path)
    table = None
    if layout == Layout.SAFETENSORS:
        table = build_table(
            representative_tables(session, reports, world, path, own), {r.entry.rank: r.listed for r in reports}
        )
        parse_table(table, world)
    entries = [r.entry for r in reports]
    stats["file_bytes"] = sum(e.size_bytes for e in entries)
    return build_manifest(
        layout=layout, ranks=entries, chunk_bytes=CHUNK_BYTES, metadata=metadata, stats=stats, table=table
    )
