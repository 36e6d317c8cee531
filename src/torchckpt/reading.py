"""The one way into a committed checkpoint for reading: the loader, ``verify`` and the tools all come here.

:func:`open_checkpoint` takes the storage of the path (``storage_for``),
holds its committed generation open (a snapshot: an overwrite meanwhile
cannot mix two generations) and reads the manifest once, bounded in memory,
seal checked before a byte is parsed, then validated completely
(``parse_manifest``). Rank files are opened from the same generation, so the
bytes read are the ones the manifest describes.

Call order::

    with open_checkpoint(path) as ckpt:        # CheckpointNotFoundError: no checkpoint directory
        manifest = ckpt.manifest()             # CheckpointNotFoundError: no manifest;
                                               # CorruptCheckpointError: an invalid one
        src = ckpt.open_rank_file(entry)       # an ObjectReader; GenerationReplaced: another
        ...                                    # save replaced the checkpoint (read again)
        src.close()

    read_consistently(path, read)              # read(ckpt) on the committed generation, and
                                               # again on the next one while it raises
                                               # GenerationReplaced (concurrent overwrites)

What the bytes are checked against lives in ``format/verification.py``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TypeVar

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .format.manifest import (
    MAX_MANIFEST_BYTES,
    SEAL_BYTES,
    Manifest,
    ManifestError,
    RankEntry,
    check_seal_prefix,
    parse_manifest,
    parse_rank_index,
)
from .storage.base import Generation, ObjectReader
from .format.extents import checksum
from .format.manifest import MANIFEST_NAME
from .format.refs import ref_location
from .storage.locate import storage_for

__all__ = [
    "READ_ATTEMPTS",
    "CheckpointSnapshot",
    "GenerationReplaced",
    "open_checkpoint",
    "read_consistently",
    "read_manifest",
]

logger = logging.getLogger(__name__)

#: How many times a read starts again when the checkpoint is replaced under it (concurrent overwrites).
READ_ATTEMPTS = 10
#: Block size of the manifest's checksum pass (memory stays bounded whatever the file holds).
_MANIFEST_BLOCK = 4 << 20

T = TypeVar("T")


class GenerationReplaced(Exception):
    """The generation a reader holds was replaced at its path by another save: read again.

    Raised by :meth:`CheckpointSnapshot.open_rank_file`; :func:`read_consistently` catches it.
    """


class CheckpointSnapshot:
    """The committed generation of the checkpoint at a path, held open for one read.

    Made by :func:`open_checkpoint`; see the module for the call order.

    Attributes:
        path: The checkpoint path as the caller gave it (messages).
        generation: The storage's generation (objects not in the manifest, e.g.
            a legacy checkpoint's rank file, are opened through it).
    """

    def __init__(self, path: str, generation: Generation, storage_options: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.generation = generation
        self._storage_options = storage_options
        self._manifest: Manifest | None = None
        self._entries: dict[int, RankEntry] = {}
        #: The checkpoints this one's references name, opened once (``open_ref``), closed with this one.
        self._referenced: dict[str, CheckpointSnapshot] = {}

    def manifest(self) -> Manifest:
        """The manifest of this generation, read and validated on the first call.

        Raises:
            CheckpointNotFoundError: The generation has no manifest (not committed,
                a legacy checkpoint, or replaced meanwhile: see :meth:`replaced`).
            CorruptCheckpointError: The manifest is too large, not sealed, or invalid.
        """
        if self._manifest is None:
            try:
                src = self.generation.open(MANIFEST_NAME)
            except FileNotFoundError as e:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at {self.path}: manifest.json is missing", path=self.path
                ) from e
            try:
                self._manifest = _parse(src, self.path)
            finally:
                src.close()
        return self._manifest

    def rank_entry(self, rank: int) -> RankEntry:
        """Rank ``rank``'s whole entry: the manifest's line, or its index object read, checked and parsed once.

        Raises:
            GenerationReplaced: The index is missing because another save replaced the generation.
            CorruptCheckpointError: The index is missing, of another size or checksum than the
                manifest says, or invalid.
        """
        manifest = self.manifest()
        stub = manifest.ranks[rank]
        if stub.index is None:
            return stub
        found = self._entries.get(rank)
        if found is None:
            src = self._open_listed(stub.index.file, "rank index")
            try:
                if src.size != stub.index.size_bytes:
                    raise ManifestError(f"{src.size} bytes, the manifest says {stub.index.size_bytes}")
                data = src.read(0, src.size)
                found = self._entries[rank] = parse_rank_index(data, stub, manifest.chunk_bytes, manifest.world_size)
            except ManifestError as e:
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {self.path}: {stub.index.file}: {e}",
                    path=self.path, file=stub.index.file, key=e.key,
                ) from e  # fmt: skip
            finally:
                src.close()
        return found

    def open_rank_file(self, entry: RankEntry) -> ObjectReader:
        """Open the rank file of a manifest entry.

        Raises:
            GenerationReplaced: It is missing because another save replaced the generation.
            CorruptCheckpointError: It is missing otherwise, a symbolic link, or not a regular file.
        """
        return self._open_listed(entry.file, "rank file")

    def open_ref(self, entry: RankEntry, k: int) -> tuple[ObjectReader, str]:
        """Open the rank file of another checkpoint that holds some of ``entry``'s tensors (``entry.refs[k]``).

        The checkpoint is opened as any (``open_checkpoint``: a directory or an object store's
        generation); its manifest must list the file with the size and digest the reference names.

        Returns:
            The open file and the referenced checkpoint's path (for messages).

        Raises:
            CorruptCheckpointError: The checkpoint or file referred to is missing, or is not
                the one referred to (size or digest differ), or the reference is out of range.
        """
        if not 0 <= k < len(entry.refs):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: a tensor refers to refs[{k}] of {len(entry.refs)}",
                path=self.path, file=MANIFEST_NAME,
            )  # fmt: skip
        ref = entry.refs[k]
        where = ref_location(self.path, ref)
        what = f"{where}/{ref.file}, which {self.path} refers to"
        try:
            snapshot = self._referenced.get(where)
            if snapshot is None:
                snapshot = self._referenced[where] = open_checkpoint(where, self._storage_options)
            lines = [line for line in snapshot.manifest().ranks if line.file == ref.file]
            if not lines or (lines[0].size_bytes, lines[0].digest) != (ref.size_bytes, ref.digest):
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {self.path}: {what}, is not there or not the file referred to "
                    f"(the size or digest differ: deleted or replaced)",
                    path=self.path, file=ref.file,
                )  # fmt: skip
            src = snapshot.open_rank_file(lines[0])
        except CheckpointNotFoundError as e:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: {what}, is missing: {e}", path=self.path, file=ref.file
            ) from e
        except GenerationReplaced as e:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: {what}, was replaced", path=self.path, file=ref.file
            ) from e
        if src.size != ref.size_bytes:
            src.close()
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: {what}, is {src.size} bytes, the reference says {ref.size_bytes}",
                path=self.path, file=ref.file,
            )  # fmt: skip
        return src, where

    def _open_listed(self, name: str, what: str) -> ObjectReader:
        try:
            return self.generation.open(name)
        except FileNotFoundError as e:
            if self.replaced():
                raise GenerationReplaced(self.path) from e
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.path}: {what} {name} listed in the manifest is missing",
                path=self.path,
                file=name,
            ) from e

    def replaced(self) -> bool:
        """Whether the path now holds another generation than this one."""
        return self.generation.replaced()

    def close(self) -> None:
        """Release the generation and those of the checkpoints referred to (idempotent)."""
        referenced, self._referenced = self._referenced, {}
        for snapshot in referenced.values():
            snapshot.close()
        self.generation.close()

    def __enter__(self) -> CheckpointSnapshot:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_checkpoint(
    path: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None
) -> CheckpointSnapshot:
    """Hold the committed generation of the checkpoint at ``path`` open (use it in a ``with`` block).

    ``path`` is a local directory or an object store URL; ``storage_options``
    configure the object store's client (``storage/object_client.py``).

    Raises:
        UnsupportedURLError: ``path`` is a URL of a storage torchckpt does not have.
        CheckpointNotFoundError: No checkpoint directory there (or a symbolic link at its name).
    """
    path = os.fspath(path)
    return CheckpointSnapshot(path, storage_for(path, storage_options).open_generation(MANIFEST_NAME), storage_options)


def read_consistently(
    path: str | os.PathLike[str],
    read: Callable[[CheckpointSnapshot], T],
    storage_options: Mapping[str, str] | None = None,
) -> T:
    """``read(snapshot)`` on the committed generation at ``path``; again on the new one while it is replaced.

    Call order: each attempt opens the generation, calls ``read`` and closes
    the generation; an attempt whose ``read`` raises :class:`GenerationReplaced`
    is followed by another, at most :data:`READ_ATTEMPTS` in all. So is one
    whose ``read`` raises ``ENOENT`` while the generation was replaced: an
    object store deletes the objects of a replaced generation, and an object
    being read vanishes under its reader (a local file stays readable).

    Raises:
        CorruptCheckpointError: Replaced by other saves in every attempt.
        Exception: What ``read`` or :func:`open_checkpoint` raise.
    """
    path = os.fspath(path)
    for _ in range(READ_ATTEMPTS):
        with open_checkpoint(path, storage_options) as snapshot:
            try:
                return read(snapshot)
            except GenerationReplaced:
                logger.debug("checkpoint %s was replaced while it was being read; reading it again", path)
            except OSError as e:
                if e.errno != errno.ENOENT or not snapshot.replaced():
                    raise
                logger.debug("checkpoint %s was replaced while it was being read (%s); reading it again", path, e)
    raise CorruptCheckpointError(
        f"corrupt checkpoint {path}: replaced by other saves {READ_ATTEMPTS} times while it was being read",
        path=path,
    )


def read_manifest(path: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``path`` (a directory or an object store URL).

    Raises:
        CheckpointNotFoundError: No committed checkpoint there.
        CorruptCheckpointError: The manifest is invalid.
    """
    with open_checkpoint(path, storage_options) as snapshot:
        return snapshot.manifest()


def _parse(src: ObjectReader, where: str) -> Manifest:
    """The manifest in ``src``, bounded, its seal checked, validated."""
    try:
        if src.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: manifest.json is {src.size} bytes (limit {MAX_MANIFEST_BYTES})",
                path=where,
                file=MANIFEST_NAME,
            )
        return parse_manifest(_read_sealed(src))
    except ManifestError as e:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {where}: manifest.json: {e}", path=where, file=MANIFEST_NAME, key=e.key
        ) from e


def _read_sealed(src: ObjectReader) -> bytes:
    """The manifest's bytes, read whole only once its seal is checked block by block (bounded memory).

    Raises:
        ManifestError: Not sealed, or the seal does not match.
    """
    size = src.size
    if size <= _MANIFEST_BLOCK:
        return src.read(0, size)  # small: parse_manifest checks the seal, memory is bounded anyway
    expected = check_seal_prefix(src.read(0, SEAL_BYTES))
    crc, offset = 0, SEAL_BYTES
    while offset < size:
        block = src.read(offset, min(_MANIFEST_BLOCK, size - offset))
        if not block:
            break
        crc = checksum(block, crc)
        offset += len(block)
    if crc != expected:
        raise ManifestError("checksum mismatch: the manifest's bytes have changed since it was written")
    return src.read(0, size)
