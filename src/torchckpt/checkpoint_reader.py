"""Reading a checkpoint: validate the manifest, then read only what is asked for.

``CheckpointReader.read`` goes through the one read path (``reading.py``):
it holds the committed generation open, reads the manifest there, picks the
rank's entry and hands the rank file (an ``ObjectReader``) to its layout's
reader, ``format/native_read.py`` or ``format/torch_save.py``, which check it
with ``format/verification.py``. A read that finds the checkpoint replaced
under it by another save starts again on the new generation
(``read_consistently``). A directory without a manifest is read as a
checkpoint of the reference implementation (``LegacyCheckpointWarning``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
import time
import warnings
from typing import Any

from .errors import CheckpointNotFoundError, StateDictMismatchError
from .format.manifest import Layout, Manifest, RankEntry
from .format.native_read import read_native
from .format.torch_save import load_torch_save, rank_file_name
from .format.verification import check_file_digest, check_size
from .reading import CheckpointSnapshot, GenerationReplaced, read_consistently, read_manifest
from .types import STATE_DICT, RankInfo
from .utils import caller_stacklevel

__all__ = ["CheckpointReader", "LegacyCheckpointWarning", "read_manifest"]

logger = logging.getLogger(__name__)



class LegacyCheckpointWarning(UserWarning):
    """A checkpoint without a manifest (written by the reference implementation) was loaded."""


class CheckpointReader:
    """Reads this rank's part of a checkpoint.

    Args:
        rank_info: This process's rank; it reads the part of rank
            ``global_rank % world_size`` of the checkpoint unless ``read`` is
            given ``rank=``.
        verify_checksums: Check checksums of what is read (default True).
        allow_pickle: Load values stored with pickle (only for trusted checkpoints).
        io_threads: Threads reading one file in parallel.
        storage_options: The object store client's configuration keys for ``s3://``, ``gs://``,
            ``az://`` checkpoints, on top of the environment (None: the environment alone).
    """

    def __init__(
        self,
        rank_info: RankInfo,
        *,
        verify_checksums: bool = True,
        allow_pickle: bool = False,
        io_threads: int = 2,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self._rank_info = rank_info
        self._storage_options = dict(storage_options) if storage_options else None
        self._verify = verify_checksums
        self._allow_pickle = allow_pickle
        self._io_threads = io_threads

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        **kwargs: Any,
    ) -> tuple[STATE_DICT, list[str]]:
        """Read the checkpoint at ``path``.

        Args:
            path: The checkpoint directory.
            state_dict: A template: only its keys are loaded and its tensors are
                filled in place (None: load everything).
            map_location: Device for tensors created by the load (a device, its
                name, or a dict from saved device names to new ones).
            **kwargs: ``verify`` and ``allow_pickle`` override the reader's
                options for this call; ``rank`` picks whose part to read. Other
                keywords are ignored.

        A failed load and the template: every key is checked (presence, kind,
        dtype, shape) before a byte is copied into the template, so a
        ``StateDictMismatchError`` leaves it untouched; so does a bad
        ``torch_save`` file (verified whole first). A native file found corrupt
        while its tensors are read may have overwritten the template's
        contiguous CPU tensors: the error names those keys; the template's
        other tensors and plain values are untouched.

        Returns:
            The state dict and the keys of the template missing from the checkpoint.

        Raises:
            CheckpointNotFoundError: Nothing committed at ``path``.
            CorruptCheckpointError: The manifest, a size or a checksum is wrong, or a
                rank file expands beyond the bounds of its size (docs/format.md).
            StateDictMismatchError: The template does not fit the checkpoint (template untouched).
            UnsafeObjectError: The checkpoint needs pickle and it is not allowed.
        """
        path = os.fspath(path)
        verify = bool(kwargs.get("verify", self._verify))
        allow_pickle = bool(kwargs.get("allow_pickle", self._allow_pickle))
        rank = kwargs.get("rank")
        return read_consistently(
            path,
            lambda snapshot: self._read_snapshot(snapshot, state_dict, map_location, rank, verify, allow_pickle),
            self._storage_options,
        )

    def _read_snapshot(
        self,
        snapshot: CheckpointSnapshot,
        state_dict: STATE_DICT | None,
        map_location: Any,
        rank: Any,
        verify: bool,
        allow_pickle: bool,
    ) -> tuple[STATE_DICT, list[str]]:
        """Read from the generation held open by ``snapshot``.

        Raises:
            GenerationReplaced: A file is missing because another save replaced the generation (read it again).
        """
        started = time.monotonic()
        path = snapshot.path
        try:
            manifest = snapshot.manifest()
        except CheckpointNotFoundError:
            if snapshot.replaced():
                raise GenerationReplaced(path) from None
            return self._read_legacy(snapshot, state_dict, map_location, allow_pickle)
        entry = self._entry(snapshot, manifest, rank, path)
        src = snapshot.open_rank_file(entry)
        try:
            if manifest.layout == Layout.SAFETENSORS:
                result, missing, nbytes = read_native(
                    src, entry, state_dict, map_location=map_location, verify=verify,
                    allow_pickle=allow_pickle, where=path, threads=self._io_threads,
                    manifest=manifest, open_rank=snapshot.open_rank_file, entry_of=snapshot.rank_entry,
                    open_ref=lambda k: snapshot.open_ref(entry, k),
                )  # fmt: skip
            else:
                if verify:
                    check_file_digest(src, entry, path)
                else:
                    check_size(src, entry, path)  # cheap, so done even without checksums
                result, missing = load_torch_save(
                    src, state_dict, map_location=map_location, allow_pickle=allow_pickle, where=path, file=entry.file
                )
                nbytes = entry.size_bytes
        finally:
            src.close()
        if missing:
            logger.warning("checkpoint %s lacks %d keys of the template: %s", path, len(missing), missing[:10])
        logger.info("loaded checkpoint %s (rank %d): %d bytes in %.3fs", path, entry.rank, nbytes, time.monotonic() - started)
        return result, missing

    def _entry(self, snapshot: CheckpointSnapshot, manifest: Manifest, rank: Any, path: str) -> RankEntry:
        if rank is None:
            if manifest.world_size != self._rank_info.global_world_size:
                _check_replicated(snapshot, manifest, path, self._rank_info.global_world_size)
            rank = self._rank_info.global_rank % manifest.world_size
        if not isinstance(rank, int) or not 0 <= rank < manifest.world_size:
            raise ValueError(f"rank {rank!r} out of range for the checkpoint {path} of {manifest.world_size} ranks")
        return snapshot.rank_entry(rank)

    def _read_legacy(
        self, snapshot: CheckpointSnapshot, state_dict: STATE_DICT | None, map_location: Any, allow_pickle: bool
    ) -> tuple[STATE_DICT, list[str]]:
        path = snapshot.path
        name = rank_file_name(self._rank_info.global_rank)
        try:
            src = snapshot.generation.open(name)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {path}: manifest.json is missing", path=path
            ) from e
        warnings.warn(
            f"{path} has no manifest.json: loading {name} as a checkpoint of the reference implementation, "
            "which has no commit marker and no checksums",
            LegacyCheckpointWarning,
            stacklevel=caller_stacklevel(),
        )
        try:
            return load_torch_save(src, state_dict, map_location=map_location, allow_pickle=allow_pickle, where=path, file=name)
        finally:
            src.close()


def _check_replicated(snapshot: CheckpointSnapshot, manifest: Manifest, path: str, world_size: int) -> None:
    """A checkpoint loads on another world size only when every rank saved the same state.

    Raises:
        StateDictMismatchError: Ranks saved different states (names the keys that differ).
    """
    first = manifest.ranks[0]
    if manifest.layout != Layout.SAFETENSORS:
        differ = [r.rank for r in manifest.ranks[1:] if r.digest != first.digest]
        if differ:
            raise StateDictMismatchError(
                f"cannot load {path} (saved by {manifest.world_size} ranks) on {world_size} ranks: the rank files "
                f"of ranks {differ} differ from rank 0's; pass rank= to choose whose state to load",
                path=path,
            )
        return
    signature = first.signature()
    odd = [r.rank for r in manifest.ranks[1:] if r.signature() != signature]
    if not odd:
        return
    # Only now are the entries read, to name the keys that differ.
    first = snapshot.rank_entry(0)
    base = first.plain_signature()
    differing: set[str] = set()
    for rank in odd:
        entry = snapshot.rank_entry(rank)
        other = entry.plain_signature()
        differing.update(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if entry.named_tree() != first.named_tree():
            differing.add("(structure or plain values)")
    if differing:
        keys = sorted(differing)
        raise StateDictMismatchError(
            f"cannot load {path} (saved by {manifest.world_size} ranks) on {world_size} ranks: the ranks saved "
            f"different states; keys that differ: {keys[:20]}{' ...' if len(keys) > 20 else ''}; "
            "pass rank= to choose whose state to load",
            path=path,
            key=keys[0],
        )
