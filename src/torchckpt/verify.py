"""Checking a committed checkpoint completely: every size, every checksum."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint_reader import _open_checkpoint_dir, _open_in, _read_manifest_fd
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format.manifest import Layout, Manifest, RankEntry
from .format.native import byte_view, digest_of
from .format.torch_save import file_digest
from .format.extents import ChecksumError, Extent, checksum, read_extents

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


def verify_checkpoint(
    path: str, *, progress: Callable[[int], None] | None = None
) -> tuple[Manifest | None, list[Problem]]:
    """Verify the checkpoint at ``path``: manifest, sizes, digests and every tensor checksum.

    Args:
        path: The checkpoint directory.
        progress: Called with the number of bytes just checked.

    Returns:
        The manifest (None when it cannot be read) and every problem found
        (empty when the checkpoint is good). Verification goes on after a
        problem, so all bad files and keys are listed.

    Raises:
        CheckpointNotFoundError: No checkpoint directory or manifest.
    """
    dir_fd = _open_checkpoint_dir(path)
    try:
        try:
            manifest = _read_manifest_fd(dir_fd, path)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {path}: manifest.json is missing", path=path
            ) from e
        except CorruptCheckpointError as e:
            return None, [Problem("manifest.json", None, str(e))]
        problems: list[Problem] = []
        for entry in manifest.ranks:
            problems.extend(_verify_rank(dir_fd, path, manifest, entry, progress))
        return manifest, problems
    finally:
        os.close(dir_fd)


def _verify_rank(
    dir_fd: int, path: str, manifest: Manifest, entry: RankEntry, progress: Callable[[int], None] | None
) -> list[Problem]:
    try:
        fd = _open_in(dir_fd, entry.file, path)
    except FileNotFoundError:
        return [Problem(entry.file, None, "missing")]
    except CheckpointError as e:
        return [Problem(entry.file, None, str(e))]
    try:
        size = os.fstat(fd).st_size
        if size != entry.size_bytes:
            return [Problem(entry.file, None, f"{size} bytes, the manifest says {entry.size_bytes}")]
        if manifest.layout != Layout.SAFETENSORS:
            _, digest = file_digest(fd)
            if progress:
                progress(size)
            return [] if digest == entry.digest else [Problem(entry.file, None, f"digest {digest}, expected {entry.digest}")]
        return _verify_native(fd, entry, progress)
    finally:
        os.close(fd)


def _verify_native(fd: int, entry: RankEntry, progress: Callable[[int], None] | None) -> list[Problem]:
    problems = []
    header = os.pread(fd, entry.data_offset, 0)
    if digest_of(checksum(header), list(entry.tensors)) != entry.digest:
        problems.append(Problem(entry.file, None, "header or tensor table does not match the digest"))
    scratch = torch.empty(_SCRATCH_BYTES, dtype=torch.uint8)
    for t in entry.tensors:
        # One tensor at a time through a bounded scratch buffer: memory stays flat.
        buf = scratch if t.nbytes <= _SCRATCH_BYTES else torch.empty(t.nbytes, dtype=torch.uint8)
        try:
            read_extents(fd, [Extent(t.offset, byte_view(buf[: t.nbytes]), list(t.crc32c))], threads=2)
        except ChecksumError as e:
            problems.append(Problem(entry.file, t.name, f"checksum mismatch (chunk {e.chunk})"))
        except EOFError as e:
            problems.append(Problem(entry.file, t.name, f"truncated: {e}"))
        if progress:
            progress(t.nbytes)
    return problems
