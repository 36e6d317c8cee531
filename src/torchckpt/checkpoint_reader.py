"""Reading a checkpoint: validate the manifest, then read only what is asked for."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
import warnings
from typing import Any

from .errors import CheckpointNotFoundError, CorruptCheckpointError, StateDictMismatchError
from .format.manifest import (
    MAX_MANIFEST_BYTES,
    SEAL_BYTES,
    Layout,
    Manifest,
    ManifestError,
    RankEntry,
    check_seal_prefix,
    parse_manifest,
)
from .format.native_read import check_file_size, read_native
from .format.torch_save import file_digest, load_torch_save, rank_file_name
from .format.extents import checksum
from .format.manifest import MANIFEST_NAME
from .storage.local_dirs import open_dir, previous_generation
from .storage.paths import local_path
from .types import STATE_DICT, RankInfo

__all__ = ["CheckpointReader", "LegacyCheckpointWarning", "read_manifest"]

logger = logging.getLogger(__name__)

#: How many times a read starts again when the checkpoint is replaced under it (concurrent overwrites).
_READ_ATTEMPTS = 10
#: Block size of the manifest's checksum pass (memory stays bounded whatever the file holds).
_MANIFEST_BLOCK = 4 << 20


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint without a manifest (written by the reference implementation) was loaded."""


def _open_in(dir_fd: int, name: str, where: str) -> int:
    try:
        # O_NONBLOCK: opening a FIFO put in place of a file must not wait for a writer (cleared below).
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: {name} is a symbolic link (refused)", path=where, file=name
            ) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"corrupt checkpoint {where}: {name} is not a regular file", path=where, file=name)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _open_checkpoint_dir(path: str) -> int:
    """Open the checkpoint directory ``path`` (a link at its own name is refused, never followed).

    Where ``path`` is missing because a save without RENAME_EXCHANGE was
    interrupted between its two renames, its previous generation is opened
    instead: that is the checkpoint at ``path`` until the next save puts it back.

    Raises:
        UnsupportedURLError: ``path`` is a URL.
        CheckpointNotFoundError: Nothing there, not a directory, or a symbolic link.
    """
    local_path(path)
    try:
        return open_dir(path)
    except FileNotFoundError as e:
        fd = _open_previous_generation(path)
        if fd is not None:
            return fd
        raise CheckpointNotFoundError(f"no checkpoint at {path}: the directory does not exist", path=path) from e
    except OSError as e:
        # O_DIRECTORY | O_NOFOLLOW on a symbolic link fails with ENOTDIR (or ELOOP), even when it points to a directory.
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            target = os.readlink(path)
        except OSError:
            raise CheckpointNotFoundError(f"no checkpoint at {path}: not a directory", path=path) from e
        raise CheckpointNotFoundError(
            f"no checkpoint at {path}: {path} is a symbolic link (to {target}); torchckpt does not follow a link "
            f"at a checkpoint's own name: load {os.path.normpath(os.path.join(os.path.dirname(path), target))}",
            path=path,
        ) from e


def _open_previous_generation(path: str) -> int | None:
    try:
        fd = open_dir(previous_generation(path))
    except OSError:
        return None
    logger.warning(
        "%s is missing: a save without RENAME_EXCHANGE was interrupted between its renames; loading the previous "
        "generation (the next save to this directory puts it back)",
        path,
    )
    return fd


class _Replaced(Exception):
    """The checkpoint directory a reader holds was replaced at its path by another save."""


def _replaced(dir_fd: int, path: str) -> bool:
    """Whether ``path`` no longer names the directory open as ``dir_fd``.

    An overwrite swaps a new generation into place and then deletes the old
    one: a reader holding the old one finds files gone, which is no corruption.
    """
    held = os.fstat(dir_fd)
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


def _read_manifest_fd(dir_fd: int, where: str) -> Manifest:
    fd = _open_in(dir_fd, MANIFEST_NAME, where)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: manifest.json is {size} bytes (limit {MAX_MANIFEST_BYTES})",
                path=where,
                file=MANIFEST_NAME,
            )
        data = _read_sealed(fd, size)
        return parse_manifest(data)
    except ManifestError as e:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {where}: manifest.json: {e}", path=where, file=MANIFEST_NAME
        ) from e
    finally:
        os.close(fd)


def _read_sealed(fd: int, size: int) -> bytes:
    """The manifest's bytes, read whole only once its seal is checked block by block (bounded memory).

    Raises:
        ManifestError: Not sealed, or the seal does not match.
    """
    if size <= _MANIFEST_BLOCK:
        return os.pread(fd, size, 0)  # small: parse_manifest checks the seal, memory is bounded anyway
    expected = check_seal_prefix(os.pread(fd, SEAL_BYTES, 0))
    crc, offset = 0, SEAL_BYTES
    while offset < size:
        block = os.pread(fd, min(_MANIFEST_BLOCK, size - offset), offset)
        if not block:
            break
        crc = checksum(block, crc)
        offset += len(block)
    if crc != expected:
        raise ManifestError("checksum mismatch: the manifest's bytes have changed since it was written")
    return os.pread(fd, size, 0)


def read_manifest(path: str) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``path``.

    Raises:
        CheckpointNotFoundError: No committed checkpoint there.
        CorruptCheckpointError: The manifest is invalid.
    """
    path = os.fspath(path)
    dir_fd = _open_checkpoint_dir(path)
    try:
        return _read_manifest_fd(dir_fd, path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"no committed checkpoint at {path}: manifest.json is missing", path=path) from e
    finally:
        os.close(dir_fd)


class CheckpointReader:
    """Reads this rank's part of a checkpoint.

    Args:
        rank_info: This process's rank; it reads the part of rank
            ``global_rank % world_size`` of the checkpoint unless ``read`` is
            given ``rank=``.
        verify_checksums: Check checksums of what is read (default True).
        allow_pickle: Load values stored with pickle (only for trusted checkpoints).
        io_threads: Threads reading one file in parallel.
    """

    def __init__(
        self,
        rank_info: RankInfo,
        *,
        verify_checksums: bool = True,
        allow_pickle: bool = False,
        io_threads: int = 2,
    ) -> None:
        self._rank_info = rank_info
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
        for _ in range(_READ_ATTEMPTS):
            dir_fd = _open_checkpoint_dir(path)
            try:
                return self._read_dir(dir_fd, path, state_dict, map_location, kwargs.get("rank"), verify, allow_pickle)
            except _Replaced:
                logger.debug("checkpoint %s was replaced while it was being read; reading it again", path)
            finally:
                os.close(dir_fd)
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: replaced by other saves {_READ_ATTEMPTS} times while it was being read",
            path=path,
        )

    def _read_dir(
        self,
        dir_fd: int,
        path: str,
        state_dict: STATE_DICT | None,
        map_location: Any,
        rank: Any,
        verify: bool,
        allow_pickle: bool,
    ) -> tuple[STATE_DICT, list[str]]:
        """Read from the open checkpoint directory ``dir_fd``.

        Raises:
            _Replaced: A file is missing because another save replaced the directory (read it again).
        """
        started = time.monotonic()
        try:
            manifest = _read_manifest_fd(dir_fd, path)
        except FileNotFoundError:
            if _replaced(dir_fd, path):
                raise _Replaced from None
            return self._read_legacy(dir_fd, path, state_dict, map_location, allow_pickle)
        entry = self._entry(manifest, rank, path)
        try:
            fd = _open_in(dir_fd, entry.file, path)
        except FileNotFoundError as e:
            if _replaced(dir_fd, path):
                raise _Replaced from e
            raise CorruptCheckpointError(
                f"corrupt checkpoint {path}: rank file {entry.file} listed in the manifest is missing",
                path=path,
                file=entry.file,
            ) from e
        try:
            if manifest.layout == Layout.SAFETENSORS:
                result, missing, nbytes = read_native(
                    fd, entry, state_dict, map_location=map_location, verify=verify,
                    allow_pickle=allow_pickle, where=path, threads=self._io_threads,
                )  # fmt: skip
            else:
                if verify:
                    self._verify_whole_file(fd, entry, path)
                else:
                    check_file_size(fd, entry, path)  # cheap, so done even without checksums
                result, missing = load_torch_save(
                    fd, state_dict, map_location=map_location, allow_pickle=allow_pickle, where=path, file=entry.file
                )
                nbytes = entry.size_bytes
        finally:
            os.close(fd)
        if missing:
            logger.warning("checkpoint %s lacks %d keys of the template: %s", path, len(missing), missing[:10])
        logger.info("loaded checkpoint %s (rank %d): %d bytes in %.3fs", path, entry.rank, nbytes, time.monotonic() - started)
        return result, missing

    def _entry(self, manifest: Manifest, rank: Any, path: str) -> RankEntry:
        if rank is None:
            if manifest.world_size != self._rank_info.global_world_size:
                _check_replicated(manifest, path, self._rank_info.global_world_size)
            rank = self._rank_info.global_rank % manifest.world_size
        if not isinstance(rank, int) or not 0 <= rank < manifest.world_size:
            raise ValueError(f"rank {rank!r} out of range for the checkpoint {path} of {manifest.world_size} ranks")
        return manifest.ranks[rank]

    @staticmethod
    def _verify_whole_file(fd: int, entry: RankEntry, path: str) -> None:
        size, digest = file_digest(fd)
        if size != entry.size_bytes or digest != entry.digest:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {path}: rank file {entry.file} does not match the manifest "
                f"(size {size} vs {entry.size_bytes}, digest {digest} vs {entry.digest})",
                path=path,
                file=entry.file,
            )

    def _read_legacy(
        self, dir_fd: int, path: str, state_dict: STATE_DICT | None, map_location: Any, allow_pickle: bool
    ) -> tuple[STATE_DICT, list[str]]:
        name = rank_file_name(self._rank_info.global_rank)
        try:
            fd = _open_in(dir_fd, name, path)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {path}: manifest.json is missing", path=path
            ) from e
        warnings.warn(
            f"{path} has no manifest.json: loading {name} as a checkpoint of the reference implementation, "
            "which has no commit marker and no checksums",
            LegacyCheckpointWarning,
            stacklevel=4,
        )
        try:
            return load_torch_save(fd, state_dict, map_location=map_location, allow_pickle=allow_pickle, where=path, file=name)
        finally:
            os.close(fd)


def _rank_signature(entry: RankEntry) -> dict[str, Any]:
    return {t.name: (t.dtype, t.shape, t.crc32c) for t in entry.tensors}


def _check_replicated(manifest: Manifest, path: str, world_size: int) -> None:
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
    base = _rank_signature(first)
    differing: set[str] = set()
    for entry in manifest.ranks[1:]:
        other = _rank_signature(entry)
        differing.update(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if entry.tree != first.tree:
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
