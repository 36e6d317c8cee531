"""Checking a committed checkpoint completely: every size, every checksum.

``verify_checkpoint`` opens the checkpoint through the one read path
(``reading.open_checkpoint``) and runs the loader's own checks
(``format/verification.py``) on every rank file, reading every tensor's
bytes (``extent_read.read_extents``, through a bounded scratch buffer). It
turns each check's ``CorruptCheckpointError`` into a :class:`Problem` and goes
on, so that every bad file and key is listed, not only the first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import CheckpointError, CorruptCheckpointError
from .format.extent_read import read_extents
from .format.manifest import MANIFEST_NAME, Layout, Manifest, RankEntry, TensorEntry
from .format.native import byte_view
from .format.verification import check_file_digest, check_header, check_size, read_error
from .reading import CheckpointSnapshot, open_checkpoint
from .storage.base import ObjectReader
from .format.extents import ChecksumError, Extent

__all__ = ["Problem", "verify_checkpoint"]

_SCRATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    """Something wrong in a checkpoint: the file, the key (if any) and what."""

    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" key {self.key!r}" if self.key else "")
        return f"{where}: {self.message}"


def _problem(err: CorruptCheckpointError, path: str, file: str, key: str | None = None) -> Problem:
    """A check's error as a problem of ``file`` (the checkpoint's path, which the report names, left out)."""
    message = str(err)
    prefix = f"corrupt checkpoint {path}: "
    return Problem(file, key, message[len(prefix) :] if message.startswith(prefix) else message)


def verify_checkpoint(
    path: str,
    *,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[Manifest | None, list[Problem]]:
    """Verify the checkpoint at ``path``: manifest, sizes, digests and every tensor checksum.

    Args:
        path: The checkpoint directory, or its object store URL (read by ranged GETs, streamed).
        progress: Called with the number of bytes just checked.
        storage_options: The object store client's configuration keys (ignored for a directory).

    Returns:
        The manifest (None when it cannot be read) and every problem found
        (empty when the checkpoint is good). Verification goes on after a
        problem, so all bad files and keys are listed.

    Raises:
        CheckpointNotFoundError: No checkpoint directory or manifest.
        OSError: The object store cannot be reached or refuses (names the URL).
    """
    with open_checkpoint(path, storage_options) as snapshot:
        try:
            manifest = snapshot.manifest()
        except CorruptCheckpointError as e:  # the chunks of a sharded tensor that do not tile it among them
            return None, [Problem("manifest.json", e.key, str(e))]
        problems: list[Problem] = []
        entries: dict[int, RankEntry] = {}
        for line in manifest.ranks:
            try:
                entry = entries[line.rank] = snapshot.rank_entry(line.rank)
            except CorruptCheckpointError as e:
                problems.append(_problem(e, path, line.index.file if line.index else MANIFEST_NAME))
                continue
            problems.extend(_verify_rank(snapshot, manifest, entry, progress))
        problems.extend(_verify_chunks(manifest, entries))
        return manifest, problems


def _verify_chunks(manifest: Manifest, entries: dict[int, RankEntry]) -> list[Problem]:
    """Every chunk of every sharded tensor is in the entry of the rank that wrote it, of the right dtype and shape."""
    problems = []
    for g in manifest.sharded.values():
        for c in g.all_chunks():
            entry = entries.get(c.rank)
            if entry is None or c.tensor is not None:
                continue  # that rank's entry is already reported as a problem
            t = entry.chunk_tensors.get((g.name, c.box[0]))
            if t is None or tuple(t.shape) != tuple(c.box[1]) or t.dtype != g.dtype:
                found = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
                message = (
                    f"the chunk at {list(c.box[0])} ({g.dtype} {list(c.box[1])}) should be in rank {c.rank}'s "
                    f"file; its entry holds {found}"
                )
                problems.append(Problem(entry.index.file if entry.index else entry.file, g.name, message))
    return problems


def _verify_rank(
    snapshot: CheckpointSnapshot, manifest: Manifest, entry: RankEntry, progress: Callable[[int], None] | None
) -> list[Problem]:
    path = snapshot.path
    try:
        src = snapshot.generation.open(entry.file)
    except FileNotFoundError:
        return [Problem(entry.file, None, "missing")]
    except CheckpointError as e:
        return [Problem(entry.file, None, str(e))]
    try:
        try:
            check_size(src, entry, path)
        except CorruptCheckpointError as e:
            return [_problem(e, path, entry.file)]
        if manifest.layout != Layout.SAFETENSORS:
            try:
                check_file_digest(src, entry, path)
            except CorruptCheckpointError as e:
                return [_problem(e, path, entry.file)]
            finally:
                if progress:
                    progress(src.size)
            return []
        problems = _verify_native(src, entry, path, progress, entry.tensors)
        if entry.refs:
            problems.extend(_verify_referenced(snapshot, entry, progress))
        return problems
    finally:
        src.close()


def _verify_referenced(
    snapshot: CheckpointSnapshot, entry: RankEntry, progress: Callable[[int], None] | None
) -> list[Problem]:
    """The tensors whose bytes other checkpoints hold (an incremental save): each file opened, every checksum read."""
    problems: list[Problem] = []
    for k, ref in enumerate(entry.refs):
        tensors = [t for t in entry.tensors if t.ref == k]
        if not tensors:
            continue
        try:
            src, where = snapshot.open_ref(entry, k)
        except CorruptCheckpointError as e:
            problems.append(_problem(e, snapshot.path, f"{ref.checkpoint}/{ref.file}"))
            continue
        try:
            for p in _verify_native(src, entry, where, progress, tensors, header=False, file=ref.file):
                problems.append(Problem(f"{ref.checkpoint}/{p.file}", p.key, p.message))
        finally:
            src.close()
    return problems


def _verify_native(
    src: ObjectReader,
    entry: RankEntry,
    path: str,
    progress: Callable[[int], None] | None,
    tensors: Sequence[TensorEntry],
    *,
    header: bool = True,
    file: str = "",
) -> list[Problem]:
    """Every checksum of ``tensors`` read from ``src`` (the rank file ``file``, default the entry's own)."""
    problems = []
    file = file or entry.file
    if header:
        try:
            check_header(src, entry, path)
        except CorruptCheckpointError as e:
            problems.append(_problem(e, path, entry.file))
    scratch = torch.empty(_SCRATCH_BYTES, dtype=torch.uint8)
    own = file == entry.file and header
    for t in tensors:
        if own and t.ref is not None:
            continue  # verified from its own file by _verify_referenced
        # One tensor at a time through a bounded scratch buffer: memory stays flat.
        buf = scratch if t.nbytes <= _SCRATCH_BYTES else torch.empty(t.nbytes, dtype=torch.uint8)
        try:
            read_extents(src, [Extent(t.offset, byte_view(buf[: t.nbytes]), list(t.crc32c))], threads=2)
        except (ChecksumError, EOFError) as e:
            problems.append(_problem(read_error(e, path, file, [t.name]), path, file, t.name))
        if progress:
            progress(t.nbytes)
    return problems
