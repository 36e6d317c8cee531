"""Reading checkpoints for tools: describe, compare, export — without loading all of them into memory.

``open_lazy`` opens a rank file through the one read path (``reading.py``),
checks it with the loader's checks (``format/verification.py``) and gives
its state with tensors mapped from the file (native) or by ``torch.load``
with ``mmap`` (``torch_save``): only what is touched is read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import mmap
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, CheckpointIOError, CorruptCheckpointError
from .consolidate import ExportItem, ShardedView, replace_views, sharded_view, write_streamed
from .format.dtypes import dtype_from_name
from .format.manifest import Layout, Manifest, RankEntry, TensorEntry
from .format.native import plan_rank_file, write_rank_file
from .format.torch_save import unpickle_rank_file
from .format.tree import Flattened, flatten, join_key, unflatten
from .format.verification import check_file_digest, check_header, check_size, check_tensor_bytes
from .reading import READ_ATTEMPTS, CheckpointSnapshot, GenerationReplaced, open_checkpoint
from .storage.base import ObjectReader
from .storage.local_read import LocalObjectReader
from .storage.local_save import LocalObjectWriter
from .storage.locate import is_object_url
from .storage.object_client import parse_object_url
from .storage.paths import local_path

__all__ = [
    "Container",
    "compare",
    "describe",
    "export",
    "export_path",
    "iter_leaves",
    "iter_nodes",
    "open_lazy",
    "tied_keys",
]


@contextmanager
def open_lazy(
    path: str, rank: int = 0, *, storage_options: Mapping[str, str] | None = None
) -> Iterator[tuple[Manifest, Any]]:
    """The state saved by ``rank``, its tensors backed by the file (read only when touched).

    The rank file is opened through the one read path (``reading.py``; a
    checkpoint replaced meanwhile is opened again) and checked by the
    loader's checks (``format/verification.py``): native tensors against
    their checksums as they are mapped; ``torch_save`` files against their
    digest, then read with ``weights_only=True``. Mapping needs a file
    descriptor (``ObjectReader.fileno``): for a checkpoint in an object store
    (``path`` a URL, the client configured by ``storage_options``) that is an
    in-memory file the rank object is downloaded into once, whole. A sharded
    tensor is a :class:`~.consolidate.ShardedView` (nothing read until its
    ``full()``; the checkpoint is held open until the block ends).

    Raises:
        CheckpointNotFoundError: No committed checkpoint at ``path``.
        CorruptCheckpointError: The manifest, a size or a checksum is wrong.
        UnsafeObjectError: The rank file needs pickle (never unpickled here).
        OSError: The object store cannot be reached or refuses (names the URL).
    """
    snapshot, manifest, entry, src = _open_consistently(path, rank, storage_options)
    with contextlib.closing(snapshot), contextlib.closing(src), contextlib.ExitStack() as held:
        local = _as_local_file(src)
        if manifest.layout == Layout.SAFETENSORS:
            views = functools.partial(sharded_view, snapshot, manifest, entry)

            def open_ref(k: int) -> tuple[ObjectReader, str]:
                ref_src, where = snapshot.open_ref(entry, k)
                held.callback(ref_src.close)
                return _as_local_file(ref_src), where

            yield manifest, _lazy_native(local, entry, path, views, open_ref)
        else:
            yield manifest, _lazy_torch_save(local, entry, path)


def _as_local_file(src: ObjectReader) -> ObjectReader:
    """``src`` read through its file descriptor (an object store's object: downloaded once, then read locally).

    The checks and the mapping then read the same bytes once, not once per pass over the store.
    """
    fd = src.fileno()
    if fd is None:
        raise NotImplementedError(f"cannot map {src.location}: lazy views need a file descriptor")
    return LocalObjectReader(fd, src.location, owned=False)


def _open_consistently(
    path: str, rank: int, storage_options: Mapping[str, str] | None
) -> tuple[CheckpointSnapshot, Manifest, RankEntry, ObjectReader]:
    """The committed generation held open, its manifest, and ``rank``'s entry and open file (as ``read_consistently``)."""
    for _ in range(READ_ATTEMPTS):
        snapshot = open_checkpoint(path, storage_options)
        try:
            return (snapshot, *_open_rank(snapshot, rank))
        except GenerationReplaced:
            snapshot.close()
        except BaseException:
            snapshot.close()
            raise
    raise CorruptCheckpointError(
        f"corrupt checkpoint {path}: replaced by other saves {READ_ATTEMPTS} times while it was being read", path=path
    )


def _open_rank(snapshot: CheckpointSnapshot, rank: int) -> tuple[Manifest, RankEntry, ObjectReader]:
    """The manifest, and the entry and open rank file of ``rank``."""
    manifest = snapshot.manifest()
    if not 0 <= rank < manifest.world_size:
        raise ValueError(f"rank {rank} out of range: {snapshot.path} was saved by {manifest.world_size} ranks")
    entry = snapshot.rank_entry(rank)
    return manifest, entry, snapshot.open_rank_file(entry)


def _mapped(src: ObjectReader, entry: RankEntry) -> mmap.mmap | None:
    """The rank file mapped read-only (None when it is empty): maps ``src.fileno()`` (see :func:`_as_local_file`)."""
    fd = src.fileno()
    assert fd is not None  # a reader of _as_local_file
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if entry.size_bytes else None


def _lazy_native(
    src: ObjectReader,
    entry: RankEntry,
    path: str,
    sharded: Callable[[int], Any],
    open_ref: Callable[[int], tuple[ObjectReader, str]] | None = None,
) -> Any:
    check_size(src, entry, path)  # the loader's checks: size, and header against the manifest's digest
    check_header(src, entry, path)
    own = _mapped(src, entry)
    # The files of other checkpoints holding some tensors (an incremental save), mapped when first touched.
    referenced: dict[int, tuple[mmap.mmap | None, str, str]] = {}

    def source(t: TensorEntry) -> tuple[mmap.mmap | None, str, str]:
        if t.ref is None:
            return own, path, entry.file
        if t.ref not in referenced:
            if open_ref is None:
                raise CorruptCheckpointError(
                    f"corrupt checkpoint {path}: tensor {t.name!r} refers to another checkpoint", path=path
                )
            ref_src, where = open_ref(t.ref)
            fd = ref_src.fileno()
            assert fd is not None  # a reader of _as_local_file
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if ref_src.size else None
            referenced[t.ref] = (mapped, where, entry.refs[t.ref].file)
        return referenced[t.ref]

    def tensor(i: int) -> torch.Tensor:
        if not 0 <= i < len(entry.tensors):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {path}: tree refers to tensor {i} of {len(entry.tensors)}",
                path=path, file="manifest.json",
            )  # fmt: skip
        t = entry.tensors[i]
        dtype = dtype_from_name(t.dtype)
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        mm, where, file = source(t)
        if mm is None:
            return torch.empty(t.shape, dtype=dtype)
        check_tensor_bytes(memoryview(mm)[t.offset : t.offset + t.nbytes], t, where, file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: these tensors are never written
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        return raw.view(dtype).view(t.shape)

    try:
        return unflatten(entry.tree, tensor, allow_pickle=False, where=path, sharded=sharded)
    except CheckpointError:
        raise
    except ValueError as e:  # as the loader says it
        raise CorruptCheckpointError(f"corrupt checkpoint {path}: {e}", path=path, file="manifest.json") from e


def _lazy_torch_save(src: ObjectReader, entry: RankEntry, path: str) -> Any:
    check_file_digest(src, entry, path)  # streamed: memory stays flat
    # The loader's own reading: the same bounds, the same errors; storages mapped, not read.
    return unpickle_rank_file(src, map_location="cpu", allow_pickle=False, mmap=True, where=path, file=entry.file)


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
def _ties(state: Any) -> Iterator[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """``(key, tensor, earlier key, earlier tensor)`` for every key tied to an earlier one."""
    first: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}
    for key, value in iter_leaves(state):
        if not isinstance(value, torch.Tensor) or value.is_meta or value.numel() == 0:
            continue
        same = (value.device, value.data_ptr(), value.shape, value.stride(), value.dtype)
        if same in first:
            yield (key, value, *first[same])
        else:
            first[same] = (key, value)


def tied_keys(state: Any) -> dict[str, str]:
    """Keys whose tensor is the same tensor as an earlier key's (tied weights): ``{key: earlier key}``.

    The same tensor means the same memory, shape, strides and dtype, which is
    what a checkpoint stores once.
    """
    return {key: earlier for key, _, earlier, _ in _ties(state)}


def describe(value: Any) -> dict[str, Any]:
    """What ``inspect`` shows of a value: type, dtype, shape and bytes of a tensor (or a sharded one), else its repr."""
    if isinstance(value, ShardedView):
        return {
            "type": "sharded tensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
            "bytes": value.nbytes,
            "chunks": value.chunks,
            "ranks": list(value.ranks),
        }
    if isinstance(value, torch.Tensor):
        return {
            "type": "tensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
            "bytes": value.numel() * value.element_size(),
        }
    text = repr(value)
    return {"type": type(value).__name__, "value": text if len(text) <= 80 else text[:77] + "..."}


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, counting positions where both are nan as equal (nan where only one is)."""
    try:
        x, y = (a, b) if a.is_complex() else (a.double(), b.double())
        d = (x - y).abs()
        d = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros((), dtype=d.dtype), d)
        return d.max().item()
    except (RuntimeError, TypeError):
        return math.nan


def compare(a: Any, b: Any) -> dict[str, Any] | None:
    """How two values of the same key differ (``diff``), or None when they are the same.

    Tensors are the same when bit-identical (nan equals nan, -0.0 differs from
    0.0); ``{"change": "values", "max_abs_diff": ...}`` when only their values
    differ, ``{"change": "type", ...}`` when dtype, shape or kind differ; plain
    values must be equal and of the same type (``{"change": "value", ...}``).
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return {"change": "type", "a": describe(a), "b": describe(b)}
        if a.numel() == 0 or torch.equal(_raw_bytes(a), _raw_bytes(b)):
            return None  # bit-identical (nan == nan here; -0.0 != 0.0)
        return {"change": "values", "max_abs_diff": _max_abs_diff(a, b)}
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return {"change": "type", "a": describe(a), "b": describe(b)}
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return None if same and type(a) is type(b) else {"change": "value", "a": repr(a), "b": repr(b)}


def export_path(path: str, out: str, fmt: str) -> str:
    """The file :func:`export` writes: ``out``, or inside it when it is a directory (as ``cp`` does).

    Inside a directory the file is named after the checkpoint directory (or
    the last part of its URL): ``<name>.safetensors`` or ``<name>.pt``.
    """
    if os.path.isdir(out):
        return os.path.join(out, _checkpoint_name(path) + (".safetensors" if fmt == "safetensors" else ".pt"))
    return out


def _checkpoint_name(path: str) -> str:
    """The last part of a checkpoint's path or URL (``s3://bucket/runs/step_3`` -> ``step_3``; the bucket at its root)."""
    if is_object_url(path):
        loc = parse_object_url(path)
        return loc.key.rsplit("/", 1)[-1] if loc.key else loc.bucket
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def export(
    path: str,
    out: str,
    *,
    fmt: str,
    rank: int = 0,
    strip_prefix: str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> int:
    """Write rank ``rank``'s state of the checkpoint at ``path`` as one file.

    ``fmt="safetensors"``: a safetensors file (tensors under their key paths;
    the structure and plain values in ``__metadata__["torchckpt_tree"]``).
    A tied key (the same tensor as an earlier key) is written as its own
    copy, so that every key loads with ``safetensors.torch.load_file``;
    ``__metadata__["torchckpt_tied"]`` maps each such key to the key it is
    tied to. ``fmt="torch"``: a file for ``torch.load`` (ties kept).
    Tensors stream from the checkpoint file (mapped, not copied), so memory
    does not grow with its size.

    A sharded tensor (a saved ``DTensor``) is exported whole, assembled from
    the chunks of every rank. In a safetensors export the tensors are written
    one at a time: memory holds at most one full tensor and the read buffers
    of its chunks. ``strip_prefix`` (safetensors only): keys that start with
    it are written without it (``"model."``: the model's own parameter names).

    ``path`` may be an object store URL (the client configured by
    ``storage_options``); ``out`` is a local file. It may be an existing
    directory: the file goes inside it (see :func:`export_path`). The file
    appears complete or not at all: it is written to a temporary name beside
    it, removed on any failure.

    Returns:
        The number of bytes written.

    Raises:
        CheckpointIOError: Writing failed (names the file and the errno).
        ValueError: An unknown format, ``strip_prefix`` with ``fmt="torch"``, or
            two keys that are one name once the prefix is stripped.
    """
    out = local_path(out)
    if fmt not in ("safetensors", "torch"):
        raise ValueError(f"unknown export format {fmt!r} (safetensors or torch)")
    if strip_prefix and fmt != "safetensors":
        raise ValueError("strip_prefix applies to the safetensors format only (a torch export keeps the state's nesting)")
    with open_lazy(path, rank, storage_options=storage_options) as (_manifest, state):
        target = export_path(path, out, fmt)
        _write_file(target, lambda fd: _write_export(fd, state, fmt=fmt, rank=rank, strip_prefix=strip_prefix or ""))
        return os.path.getsize(target)


def _write_file(target: str, write: Callable[[int], None]) -> None:
    """Write ``target`` through ``write(fd)`` under a temporary name beside it, synced, then renamed into place.

    Raises:
        CheckpointIOError: ``target`` is a directory, or writing failed (names it); the temporary file is removed.
    """
    directory, name = os.path.split(os.path.abspath(target))
    if os.path.isdir(target):
        raise CheckpointIOError(
            f"cannot export to {target}: it is a directory", errno=errno.EISDIR, path=target, operation="export"
        )
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _export_error(target, e) from e
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise _export_error(target, e) from e
        raise
    _fsync_parent(target)


def _write_export(fd: int, state: Any, *, fmt: str, rank: int, strip_prefix: str) -> None:
    if fmt == "torch":
        with os.fdopen(os.dup(fd), "wb") as f:
            torch.save(replace_views(state, ShardedView.full), f)  # every sharded tensor whole
        return
    views: dict[int, ShardedView] = {}

    def placeholder(view: ShardedView) -> torch.Tensor:
        t = torch.empty(0, dtype=view.dtype)  # its own table entry; its bytes come from the view when written
        views[id(t)] = view
        return t

    skeleton = replace_views(state, placeholder)
    flat, meta = _with_ties(skeleton, flatten(skeleton, allow_pickle=False))
    names = [n.removeprefix(strip_prefix) if strip_prefix else n for n in flat.names]
    if strip_prefix and "torchckpt_tied" in meta:
        tied = json.loads(meta["torchckpt_tied"]).items()
        meta["torchckpt_tied"] = json.dumps({k.removeprefix(strip_prefix): v.removeprefix(strip_prefix) for k, v in tied})
    writer = LocalObjectWriter(fd, "the exported file")
    if not views and len(set(names)) == len(names):
        flat = Flattened(tree=flat.tree, tensors=flat.tensors, names=names)
        write_rank_file(writer, plan_rank_file(flat, rank=rank, metadata=meta), threads=2)
        return
    items = [
        ExportItem(n, views[id(t)].dtype, views[id(t)].shape, views[id(t)].full) if id(t) in views
        else ExportItem(n, t.dtype, tuple(t.shape), functools.partial(_same, t))
        for t, n in zip(flat.tensors, names)
    ]  # fmt: skip
    meta = {"torchckpt_format": "1", "rank": str(rank), **meta}
    write_streamed(writer, items, meta)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _with_ties(state: Any, flat: Flattened) -> tuple[Flattened, dict[str, str]]:
    """``flat`` with a copy of every tied key's tensor under that key, and the export's metadata."""
    ties = list(_ties(state))
    # "format": "pt" is what Hugging Face loaders require of a safetensors file's metadata.
    meta = {"format": "pt", "torchckpt_tree": json.dumps(flat.tree, separators=(",", ":"))}
    if not ties:
        return flat, meta
    stored = {id(t): n for t, n in zip(flat.tensors, flat.names)}
    used = set(flat.names)
    flat = Flattened(tree=flat.tree, tensors=list(flat.tensors), names=list(flat.names))
    tied: dict[str, str] = {}
    for key, tensor, earlier, earlier_tensor in ties:
        alias, n = key, 2
        while alias in used:
            alias, n = f"{key}#{n}", n + 1
        used.add(alias)
        flat.tensors.append(tensor)  # its own copy: safetensors readers have no ties
        flat.names.append(alias)
        tied[alias] = stored.get(id(earlier_tensor), earlier)
    meta["torchckpt_tied"] = json.dumps(tied, separators=(",", ":"))
    return flat, meta


def _export_error(target: str, e: BaseException) -> CheckpointIOError:
    """The error of a failed export, naming the user's file (torch.save wraps an OSError in a RuntimeError)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return CheckpointIOError(
            f"cannot export to {target}: [Errno {cause.errno}] {cause.strerror}",
            errno=cause.errno, path=target, operation="export",
        )  # fmt: skip
    return CheckpointIOError(f"cannot export to {target}: {e}", path=target, operation="export")


def _fsync_parent(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
