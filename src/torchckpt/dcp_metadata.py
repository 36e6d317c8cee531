"""Read a torch DCP checkpoint's ``.metadata`` without running code from it, and check it.

torch.distributed.checkpoint (DCP) stores its index as a pickle of
``torch.distributed.checkpoint.metadata.Metadata``. A pickle names the
callables it calls; :class:`RestrictedUnpickler` resolves only the names
DCP's metadata uses (its dataclasses, ``torch.Size``, dtypes, layouts by
name, paths as pure paths) and refuses any other name with an
:class:`~torchckpt.errors.UnsafeObjectError` naming ``module.name``, before
anything is called. The objects it builds are then checked field by field
(types, ranges, file names, the file sizes, that the chunks of each tensor
tile it) and turned into the plain :class:`DcpIndex`: the rest of the import
never sees a DCP object.

What DCP writes (``FileSystemWriter``, ``SerializationFormat.TORCH_SAVE``,
the default): files ``__<rank>_<n>.distcp``; each chunk of a tensor is a
``torch.save`` of that chunk at ``storage_data[MetadataIndex(key, offsets)]``
= ``_StorageInfo(relative_path, offset, length)``; each non-tensor value is a
``torch.save`` of the value at ``storage_data[MetadataIndex(key)]``.
``planner_data`` maps each flattened key (``"model.0.weight"``) to its path
(``("model", "0", "weight")``; an int is a list index).
"""

from __future__ import annotations

import importlib
import io
import os
import pathlib
import pickle
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .plan.boxes import tiling_problem
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeObjectError

__all__ = [
    "MAX_METADATA_BYTES",
    "METADATA_NAME",
    "DcpChunk",
    "DcpIndex",
    "DcpLocation",
    "DcpTensor",
    "DcpValue",
    "RestrictedUnpickler",
    "check_tiling",
    "read_dcp_index",
]

#: DCP's index file inside the checkpoint directory.
METADATA_NAME = ".metadata"
#: Largest ``.metadata`` read (a larger one is refused before it is read).
MAX_METADATA_BYTES = 1 << 30
#: Largest offset, length or tensor size accepted from the metadata (as torchckpt's own manifest).
_MAX_BYTES = 1 << 50
#: Most dimensions of a tensor (torch's own limit is 64).
_MAX_NDIM = 64

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
#: DCP classes the metadata pickle may name: plain dataclasses and one enum, whose construction runs no
#: code beyond setting fields.
_DCP_CLASSES = frozenset(
    {(_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "MetadataIndex", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {(_FS, "_StorageInfo")}
)  # fmt: skip
#: Paths (StorageMeta.checkpoint_id) come back as pure paths: no file system access.
_PATHS: dict[str, type[pathlib.PurePath]] = {
    "PosixPath": pathlib.PurePosixPath,
    "PurePosixPath": pathlib.PurePosixPath,
    "WindowsPath": pathlib.PureWindowsPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
    "Path": pathlib.PurePosixPath,
}


#: torch's dtypes by attribute name (``float32``, ``bfloat16``...), looked up without touching torch's lazy attributes.
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


def _layout_from_name(name: str) -> torch.layout:
    """The ``torch.layout`` called ``name`` (``"torch.strided"``): how torch pickles a layout."""
    for value in vars(torch).values():
        if isinstance(value, torch.layout) and str(value) == name:
            return value
    raise ValueError(f"unknown torch layout {name!r}")


def _dcp_class(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names DCP's metadata uses; any other is refused.

    Admitted: DCP's metadata dataclasses and ``_StorageInfo``, ``torch.Size``,
    torch dtypes (``torch.float32``...), layouts (by name, as torch pickles
    them), ``pathlib`` paths (built as pure paths) and ``OrderedDict``.
    Plain containers and scalars need no name.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` if admitted.

        Raises:
            UnsafeObjectError: The name is not admitted (``type_name`` is ``module.name``).
        """
        if (module, name) in _DCP_CLASSES:
            return _dcp_class(module, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "torch.serialization" and name == "_get_layout":
            return _layout_from_name
        if module == "pathlib" and name in _PATHS:
            return _PATHS[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise UnsafeObjectError(
            f"refusing to unpickle {module}.{name}: a DCP .metadata names only DCP's metadata classes, "
            "torch.Size, dtypes and plain containers (nothing from the file is run)",
            type_name=f"{module}.{name}",
        )

    def persistent_load(self, pid: Any) -> Any:
        """DCP's metadata has no persistent ids: refuse any."""
        raise pickle.UnpicklingError("persistent ids are not used by DCP's metadata")


@dataclass(frozen=True)
class DcpLocation:
    """Where DCP stored one payload (a ``torch.save`` of a tensor chunk or a value).

    Attributes:
        file: A plain file name inside the checkpoint directory.
        offset: Its first byte in the file.
        length: Its size in bytes.
    """

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpChunk:
    """One saved chunk of a tensor: the box ``offsets .. offsets + sizes`` of the full tensor.

    Attributes:
        offsets: Its start in each dimension.
        sizes: Its extent in each dimension.
        location: Where its bytes are.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    location: DcpLocation


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the checkpoint: its full shape and the chunks that tile it.

    Attributes:
        key: The flattened key (``"model.0.weight"``).
        dtype: Its dtype.
        shape: Its full (global) shape.
        chunks: Its chunks, checked to tile the shape exactly.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpValue:
    """A non-tensor value of the checkpoint (``torch.save`` of the value).

    Attributes:
        key: The flattened key.
        location: Where its bytes are.
    """

    key: str
    location: DcpLocation


@dataclass(frozen=True)
class DcpIndex:
    """A DCP checkpoint's checked contents.

    Attributes:
        tensors: Every tensor, in the metadata's order.
        values: Every non-tensor value, in the metadata's order.
        paths: Each flattened key's path (str: a dict key, int: a list index); ``(key,)`` without planner data.
        files: Every data file referenced, with its size in bytes.
        version: DCP's format version string, when recorded.
    """

    tensors: tuple[DcpTensor, ...]
    values: tuple[DcpValue, ...]
    paths: dict[str, tuple[str | int, ...]]
    files: dict[str, int]
    version: str | None


# -- reading -----------------------------------------------------------------


def _open_regular(path: str) -> int:
    """Open ``path`` for reading: a regular file, never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: not a regular file", path=path, file=os.path.basename(path))
    return fd


def _read_metadata_bytes(src: str) -> bytes:
    path = os.path.join(src, METADATA_NAME)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(
            f"{src} is not a torch DCP checkpoint: it has no {METADATA_NAME} "
            "(a DCP save that did not finish, or one saved without collectives: __<rank>.metadata)",
            path=src,
        )
    try:
        fd = _open_regular(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot open: {e.strerror}", path=src, file=METADATA_NAME) from e
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_METADATA_BYTES:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes, more than the {MAX_METADATA_BYTES} a DCP metadata may have",
                path=src, file=METADATA_NAME,
            )  # fmt: skip
        return f.read(MAX_METADATA_BYTES + 1)


def _unpickle(data: bytes, src: str) -> Any:
    path = os.path.join(src, METADATA_NAME)
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeObjectError as e:
        raise UnsafeObjectError(f"{path}: {e}", path=src, type_name=e.type_name) from e
    except Exception as e:  # noqa: BLE001 - whatever a malformed pickle raises is one error for the caller
        raise CorruptCheckpointError(
            f"{path}: not a DCP metadata pickle: {type(e).__name__}: {e}", path=src, file=METADATA_NAME
        ) from e


# -- checks ------------------------------------------------------------------


def _corrupt(src: str, message: str, key: str | None = None) -> CorruptCheckpointError:
    where = f"key {key!r}: " if key is not None else ""
    return CorruptCheckpointError(
        f"{os.path.join(src, METADATA_NAME)}: {where}{message}", path=src, file=METADATA_NAME, key=key
    )


def _expect(obj: Any, module: str, name: str, what: str, src: str, key: str | None = None) -> None:
    if type(obj) is not _dcp_class(module, name):
        raise _corrupt(src, f"{what} is a {type(obj).__module__}.{type(obj).__qualname__}, not {name}", key)


def _int_tuple(value: Any, what: str, src: str, key: str, ndim: int | None = None) -> tuple[int, ...]:
    """A ``torch.Size`` of ints in ``[0, 2^50]`` (of ``ndim`` dimensions when given) as a tuple."""
    if not isinstance(value, torch.Size) or len(value) > _MAX_NDIM:
        raise _corrupt(src, f"{what} is not a torch.Size of at most {_MAX_NDIM} dimensions: {value!r}", key)
    out = tuple(value)
    if any(type(v) is not int or not 0 <= v <= _MAX_BYTES for v in out):
        raise _corrupt(src, f"{what} {list(out)} holds a value that is not an int in [0, 2^50]", key)
    if ndim is not None and len(out) != ndim:
        raise _corrupt(src, f"{what} {list(out)} has {len(out)} dimensions, the tensor {ndim}", key)
    return out


def _location(info: Any, src: str, key: str, files: dict[str, int]) -> DcpLocation:
    """Check one ``_StorageInfo``: a plain file name in ``src``, a range inside that file."""
    _expect(info, _FS, "_StorageInfo", "storage_data entry", src, key)
    name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"{os.path.join(src, METADATA_NAME)}: key {key!r} is stored through stream transforms "
            f"{info.transform_descriptors!r}, which import-dcp does not support",
            path=src,
        )
    if not isinstance(name, str) or not name or name in (".", "..", METADATA_NAME) or "/" in name or "\0" in name:
        raise _corrupt(src, f"storage_data names the file {name!r}: not a plain file name of the checkpoint", key)
    if any(type(v) is not int or not 0 <= v <= _MAX_BYTES for v in (offset, length)):
        raise _corrupt(src, f"storage_data has offset {offset!r}, length {length!r}: not ints in [0, 2^50]", key)
    if name not in files:
        files[name] = _file_size(src, name, key)
    if offset + length > files[name]:
        raise _corrupt(
            src,
            f"storage_data (file {name}, offset {offset}, length {length}) lies beyond the end of "
            f"the file ({files[name]} bytes)",
            key,
        )
    return DcpLocation(name, offset, length)


def _file_size(src: str, name: str, key: str) -> int:
    path = os.path.join(src, name)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise _corrupt(src, f"its data file {name} cannot be found: {e.strerror}", key) from e
    if not stat.S_ISREG(st.st_mode):
        raise _corrupt(src, f"its data file {name} is not a regular file (a symlink or a directory)", key)
    return st.st_size


def _storage_map(md: Any, src: str) -> dict[tuple[str, tuple[int, ...] | None], Any]:
    """``storage_data`` keyed by ``(key, chunk offsets or None)``, its keys checked."""
    storage = getattr(md, "storage_data", None)
    if type(storage) is not dict:
        raise _corrupt(src, f"storage_data is a {type(storage).__name__}, not a dict")
    out: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        _expect(index, _MD, "MetadataIndex", "a storage_data key", src)
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        if type(fqn) is not str:
            raise _corrupt(src, f"a storage_data key names {fqn!r}, not a str")
        offsets = None if offset is None else _int_tuple(offset, "a storage_data offset", src, fqn)
        out[(fqn, offsets)] = info
    return out


def _tensor(key: str, entry: Any, storage: dict[Any, Any], src: str, files: dict[str, int]) -> DcpTensor:
    """Check one ``TensorStorageMetadata`` and its chunks' storage; the chunks tile the tensor."""
    props = getattr(entry, "properties", None)
    _expect(props, _MD, "TensorProperties", "its properties", src, key)
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise _corrupt(src, f"its dtype is {dtype!r}, not a torch.dtype", key)
    shape = _int_tuple(getattr(entry, "size", None), "its size", src, key)
    chunk_list = getattr(entry, "chunks", None)
    if type(chunk_list) is not list:
        raise _corrupt(src, f"its chunks are a {type(chunk_list).__name__}, not a list", key)
    chunks = []
    for c in chunk_list:
        _expect(c, _MD, "ChunkStorageMetadata", "a chunk", src, key)
        offsets = _int_tuple(getattr(c, "offsets", None), "a chunk's offsets", src, key, len(shape))
        sizes = _int_tuple(getattr(c, "sizes", None), "a chunk's sizes", src, key, len(shape))
        if (key, offsets) not in storage:
            raise _corrupt(src, f"no storage_data for its chunk at offsets {list(offsets)}", key)
        loc = _location(storage[(key, offsets)], src, key, files)
        # A torch.save of a chunk holds at least its bytes: what the import allocates is bounded by the files.
        if _volume(sizes) * dtype.itemsize > loc.length:
            raise _corrupt(
                src, f"its chunk at offsets {list(offsets)} of sizes {list(sizes)} needs more than the "
                f"{loc.length} bytes stored for it", key,
            )  # fmt: skip
        chunks.append(DcpChunk(offsets, sizes, loc))
    check_tiling(key, shape, chunks, src)
    return DcpTensor(key, dtype, shape, tuple(chunks))


def _volume(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def check_tiling(key: str, shape: tuple[int, ...], chunks: list[DcpChunk], src: str) -> None:
    """Check that ``chunks`` tile ``shape`` exactly: each inside it, no two overlapping, no gap (``plan.boxes``).

    Raises:
        CorruptCheckpointError: Naming the key and the chunk(s) at fault.
    """
    problem = tiling_problem(shape, [(tuple(c.offsets), tuple(c.sizes)) for c in chunks])
    if problem is not None:
        raise _corrupt(src, problem, key)


def _paths(md: Any, keys: list[str], src: str) -> dict[str, tuple[str | int, ...]]:
    """Each key's path from ``planner_data`` (``(key,)`` where it has none), checked."""
    planner = getattr(md, "planner_data", None)
    if planner is not None and type(planner) is not dict:
        raise _corrupt(src, f"planner_data is a {type(planner).__name__}, not a dict of key paths")
    out: dict[str, tuple[str | int, ...]] = {}
    for key in keys:
        path = (planner or {}).get(key, (key,))
        if type(path) is not tuple or not path or type(path[0]) is not str:
            raise _corrupt(src, f"its planner_data path {path!r} is not a tuple starting with a str", key)
        if any(type(p) is not str and (type(p) is not int or p < 0) for p in path):
            raise _corrupt(src, f"its planner_data path {path!r} holds something not a str or an int >= 0", key)
        out[key] = path
    return out


def read_dcp_index(src: str) -> DcpIndex:
    """Read and check the DCP checkpoint at ``src`` (its ``.metadata`` and the sizes of its files).

    Nothing from the files is run, and no tensor data is read.

    Args:
        src: A directory written by ``torch.distributed.checkpoint.save`` (``FileSystemWriter``).

    Returns:
        The checked index.

    Raises:
        CheckpointNotFoundError: ``src`` has no ``.metadata``.
        UnsafeObjectError: The metadata pickle names something other than DCP's metadata classes.
        CorruptCheckpointError: The metadata is malformed, names a file that is missing or not a plain
            file of ``src``, a range beyond a file's end, or chunks that do not tile their tensor
            (the message names the key).
        CheckpointError: A feature import-dcp does not support (stream transforms).
    """
    md = _unpickle(_read_metadata_bytes(src), src)
    _expect(md, _MD, "Metadata", "the metadata", src)
    entries = getattr(md, "state_dict_metadata", None)
    if type(entries) is not dict or any(type(k) is not str for k in entries):
        raise _corrupt(src, "state_dict_metadata is not a dict keyed by str")
    storage = _storage_map(md, src)
    files: dict[str, int] = {}
    tensors, values = [], []
    for key, entry in entries.items():
        if type(entry) is _dcp_class(_MD, "BytesStorageMetadata"):
            if (key, None) not in storage:
                raise _corrupt(src, "no storage_data for this value", key)
            values.append(DcpValue(key, _location(storage[(key, None)], src, key, files)))
        else:
            _expect(entry, _MD, "TensorStorageMetadata", "its entry", src, key)
            tensors.append(_tensor(key, entry, storage, src, files))
    version = getattr(md, "version", None)
    return DcpIndex(
        tuple(tensors), tuple(values), _paths(md, list(entries), src), files,
        version if isinstance(version, str) else None,
    )  # fmt: skip
