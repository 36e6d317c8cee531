"""Reading checkpoints for tools: describe, compare, export — without loading all of them into memory."""

from __future__ import annotations

import mmap
import os
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .checkpoint_reader import _open_checkpoint_dir, _open_in, _read_manifest_fd
from .errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeObjectError
from .format.dtypes import dtype_from_name
from .format.manifest import Layout, Manifest, RankEntry
from .format.native import plan_rank_file, write_rank_file
from .format.torch_save import file_digest
from .format.tree import flatten, join_key, unflatten
from .storage.io import CHUNK_BYTES, checksum
from .storage.paths import local_path

__all__ = ["export", "iter_leaves", "open_lazy"]


@contextmanager
def open_lazy(path: str, rank: int = 0) -> Iterator[tuple[Manifest, Any]]:
    """The state saved by ``rank``, its tensors backed by the file (read only when touched).

    Native tensors are verified against their checksums as they are mapped;
    ``torch_save`` files are checked against their digest, then read with
    ``weights_only=True``.

    Raises:
        CheckpointNotFoundError: No committed checkpoint at ``path``.
        CorruptCheckpointError: The manifest, a size or a checksum is wrong.
        UnsafeObjectError: The rank file needs pickle (never unpickled here).
    """
    dir_fd = _open_checkpoint_dir(path)
    try:
        try:
            manifest = _read_manifest_fd(dir_fd, path)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"no committed checkpoint at {path}: manifest.json is missing", path=path) from e
        if not 0 <= rank < manifest.world_size:
            raise ValueError(f"rank {rank} out of range: {path} was saved by {manifest.world_size} ranks")
        entry = manifest.ranks[rank]
        fd = _open_in(dir_fd, entry.file, path)
    finally:
        os.close(dir_fd)
    try:
        if manifest.layout == Layout.SAFETENSORS:
            yield manifest, _lazy_native(fd, entry, path)
        else:
            yield manifest, _lazy_torch_save(fd, entry, path)
    finally:
        os.close(fd)


def _lazy_native(fd: int, entry: RankEntry, path: str) -> Any:
    if os.fstat(fd).st_size != entry.size_bytes:
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {entry.file} has the wrong size", path=path, file=entry.file)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if entry.size_bytes else None

    def tensor(i: int) -> torch.Tensor:
        t = entry.tensors[i]
        dtype = dtype_from_name(t.dtype)
        if t.nbytes == 0 or mm is None:
            return torch.empty(t.shape, dtype=dtype)
        for k, crc in enumerate(t.crc32c):
            lo = t.offset + k * CHUNK_BYTES
            if checksum(memoryview(mm)[lo : min(t.offset + t.nbytes, lo + CHUNK_BYTES)]) != crc:
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {path}: checksum mismatch in {entry.file}, key {t.name!r}",
                    path=path, file=entry.file, key=t.name,
                )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: these tensors are never written
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        return raw.view(dtype).view(t.shape)

    return unflatten(entry.tree, tensor, allow_pickle=False, where=path)


def _lazy_torch_save(fd: int, entry: RankEntry, path: str) -> Any:
    size, digest = file_digest(fd)  # streamed: memory stays flat
    if size != entry.size_bytes or digest != entry.digest:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: rank file {entry.file} does not match the manifest "
            f"(size {size} vs {entry.size_bytes}, digest {digest} vs {entry.digest})",
            path=path, file=entry.file,
        )  # fmt: skip
    try:
        return torch.load(f"/proc/self/fd/{fd}", map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UnsafeObjectError(
            f"refusing to load {entry.file} of {path}: it holds objects that need pickle (not executed)",
            path=path, type_name="pickle",
        ) from e  # fmt: skip
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: cannot read {entry.file}: {e}", path=path, file=entry.file
        ) from e


def iter_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every tensor and plain value in a state."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_leaves(v, join_key(prefix, k))
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, v in enumerate(obj):
            yield from iter_leaves(v, f"{prefix}[{i}]" if prefix else f"[{i}]")
    else:
        yield prefix or "[root]", obj


def export(path: str, out: str, *, fmt: str, rank: int = 0) -> int:
    """Write rank ``rank``'s state of the checkpoint at ``path`` as one file.

    ``fmt="safetensors"``: a safetensors file (tensors under their key paths;
    the structure and plain values in ``__metadata__["torchckpt_tree"]``).
    ``fmt="torch"``: a file for ``torch.load``. Tensors stream from the
    checkpoint file (mapped, not copied), so memory does not grow with its size.

    Returns:
        The number of bytes written.
    """
    import json

    out = local_path(out)
    with open_lazy(path, rank) as (_manifest, state):
        directory, name = os.path.split(os.path.abspath(out))
        tmp = os.path.join(directory, f".{name}.tmp")
        if fmt == "torch":
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        elif fmt == "safetensors":
            flat = flatten(state, allow_pickle=False)
            tree = json.dumps(flat.tree, separators=(",", ":"))
            plan = plan_rank_file(flat, rank=rank, metadata={"torchckpt_tree": tree})
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_rank_file(fd, plan, threads=2)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            raise ValueError(f"unknown export format {fmt!r} (safetensors or torch)")
        os.rename(tmp, out)
        _fsync_parent(out)
        return os.path.getsize(out)


def _fsync_parent(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
