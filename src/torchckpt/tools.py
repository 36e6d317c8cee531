"""Reading checkpoints for tools: describe, compare, export — without loading all of them into memory."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint_reader import _open_checkpoint_dir, _open_in, _read_manifest_fd
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format.dtypes import dtype_from_name
from .format.manifest import Layout, Manifest, RankEntry
from .format.native import plan_rank_file, write_rank_file
from .format.native_read import check_header
from .format.torch_save import file_digest, unpickle_rank_file
from .format.tree import flatten, join_key, unflatten
from .storage.io import CHUNK_BYTES, checksum
from .storage.paths import local_path

__all__ = ["Container", "export", "iter_leaves", "iter_nodes", "open_lazy"]


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
    check_header(fd, entry, path)  # the loader's checks: size, and header against the manifest's digest
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if entry.size_bytes else None

    def tensor(i: int) -> torch.Tensor:
        if not 0 <= i < len(entry.tensors):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {path}: tree refers to tensor {i} of {len(entry.tensors)}",
                path=path, file="manifest.json",
            )  # fmt: skip
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

    try:
        return unflatten(entry.tree, tensor, allow_pickle=False, where=path)
    except CheckpointError:
        raise
    except ValueError as e:  # as the loader says it
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {e}", path=path, file="manifest.json") from e


def _lazy_torch_save(fd: int, entry: RankEntry, path: str) -> Any:
    size, digest = file_digest(fd)  # streamed: memory stays flat
    if size != entry.size_bytes or digest != entry.digest:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {path}: rank file {entry.file} does not match the manifest "
            f"(size {size} vs {entry.size_bytes}, digest {digest} vs {entry.digest})",
            path=path, file=entry.file,
        )  # fmt: skip
    # The loader's own reading: the same bounds, the same errors; storages mapped, not read.
    return unpickle_rank_file(fd, map_location="cpu", allow_pickle=False, mmap=True, where=path, file=entry.file)


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


@dataclass(frozen=True)
class Container:
    """A container of a state as :func:`iter_nodes` yields it: its type only (its items come as nodes of their own)."""

    kind: str

    def __repr__(self) -> str:
        return self.kind


def _key_path(prefix: str, key: Any) -> str:
    """A key path that tells key types apart: ``a.1`` for the key ``"1"``, ``a.<int 1>`` for ``1``."""
    if type(key) is str:
        return join_key(prefix, key)
    return join_key(prefix, f"<{type(key).__name__} {key!r}>")


def iter_nodes(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every container (as a :class:`Container`) and leaf of a state.

    Unlike :func:`iter_leaves`, two states with the same nodes have the same
    structure: a dict and an OrderedDict, a list and a tuple, an empty container
    and a missing key, the key ``1`` and the key ``"1"`` all differ.
    """
    if isinstance(obj, dict) or (isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size)):
        yield prefix or "[root]", Container(type(obj).__name__)
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from iter_nodes(v, _key_path(prefix, k))
        else:
            for i, v in enumerate(obj):
                yield from iter_nodes(v, f"{prefix}[{i}]" if prefix else f"[{i}]")
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
