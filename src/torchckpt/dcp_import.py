"""Convert a torch DCP checkpoint into a torchckpt checkpoint (``torchckpt import-dcp``).

The DCP checkpoint's index is read without running code from it
(:mod:`torchckpt.dcp_metadata`); every payload is a ``torch.save`` that is
loaded with ``torch.load(weights_only=True)`` from an in-memory copy of its
byte range, after that range was checked against the file's size. Each
tensor is assembled whole from its chunks (whatever ranks saved them), the
nesting DCP flattened is restored from its ``planner_data``, and the state is
written as a one-rank checkpoint of the native layout, committed atomically:
full tensors, which load on any number of ranks.

Limits: the whole state is held in memory once (plus one chunk being copied);
only DCP's ``FileSystemWriter`` with its default ``torch.save`` serialization
and without stream transforms is read; a value that is not plain data
(``weights_only`` refuses it) is refused, naming its key.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint_writer import CheckpointWriter
from .config import CheckpointFormat, CheckpointWriterConfig
from .dcp_metadata import METADATA_NAME, DcpIndex, DcpLocation, DcpTensor, read_dcp_index
from .errors import (
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeObjectError,
)
from .format.tree import MAX_DEPTH
from .reading import open_checkpoint
from .storage.locate import is_object_url
from .types import RankInfo

__all__ = ["DcpImportSummary", "import_dcp"]

logger = logging.getLogger(__name__)

#: Longest list the restored nesting may hold (a list index in planner_data beyond it is refused:
#: DCP fills the places of a list it did not record with None, and a hostile index must not allocate).
MAX_LIST_LENGTH = 1 << 20
#: DCP's data file names: ``__<rank>_<n>.distcp``.
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")
#: How a torch.save payload (a zip archive) starts.
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class DcpImportSummary:
    """What :func:`import_dcp` converted.

    Attributes:
        src: The DCP checkpoint directory.
        dst: The torchckpt checkpoint written.
        tensors: Number of tensors.
        tensor_bytes: Their bytes, in full.
        chunks: Number of saved chunks they were assembled from.
        values: Number of non-tensor values.
        files: Number of DCP data files read.
        source_ranks: Number of ranks that wrote the data files (from their names ``__<rank>_<n>.distcp``).
        dcp_version: DCP's format version, when recorded.
        seconds: Wall time of the conversion.
    """

    src: str
    dst: str
    tensors: int
    tensor_bytes: int
    chunks: int
    values: int
    files: int
    source_ranks: int
    dcp_version: str | None
    seconds: float


def import_dcp(
    src: str, dst: str, *, overwrite: bool = False, storage_options: Mapping[str, str] | None = None
) -> DcpImportSummary:
    """Convert the torch DCP checkpoint at ``src`` into a torchckpt checkpoint at ``dst``.

    ``dst`` is a one-rank checkpoint of the native (safetensors) layout holding
    the full tensors and the state's nesting; it appears complete or not at all.

    Args:
        src: A directory written by ``torch.distributed.checkpoint.save``.
        dst: Where to write the torchckpt checkpoint: a directory or an object store URL.
        overwrite: Replace a checkpoint at ``dst`` (atomically); False: refuse an existing ``dst``.
        storage_options: The object store client's configuration keys, for a URL ``dst``.

    Returns:
        What was converted.

    Raises:
        CheckpointNotFoundError: ``src`` does not exist or is not a DCP checkpoint.
        CheckpointExistsError: ``dst`` exists (without ``overwrite``), or is ``src``.
        UnsafeObjectError: The metadata pickle names a class that is not DCP's metadata's, or a
            value is not plain data (names the class, or the key).
        CorruptCheckpointError: The metadata or a payload is malformed or out of its file, or a
            tensor's chunks do not tile it (names the key).
        CheckpointIOError: Reading or writing failed.
    """
    started = time.monotonic()
    src, dst = os.fspath(src), os.fspath(dst)
    _check_paths(src, dst, overwrite, storage_options)
    logger.info("importing DCP checkpoint %s into %s", src, dst)
    index = read_dcp_index(src)
    flat: dict[str, Any] = {}
    with _SourceFiles(src) as files:
        for t in index.tensors:
            flat[t.key] = _assemble(t, files)
        for v in index.values:
            flat[v.key] = _load_value(v.key, files.read(v.location, v.key))
    state = _nest({k: flat[k] for k in index.paths}, index.paths, src)  # in the metadata's order
    config = CheckpointWriterConfig(format=CheckpointFormat.SAFETENSORS, storage_options=storage_options)
    writer = CheckpointWriter(config, RankInfo(0, 1))
    writer.write(dst, state, metadata={"imported_from": "torch.distributed.checkpoint", "dcp_version": index.version})
    summary = _summary(src, dst, index, time.monotonic() - started)
    logger.info(
        "imported %s into %s: %d tensors, %d bytes, %d values in %.3fs",
        src, dst, summary.tensors, summary.tensor_bytes, summary.values, summary.seconds,
    )  # fmt: skip
    return summary


def _check_paths(src: str, dst: str, overwrite: bool, storage_options: Mapping[str, str] | None) -> None:
    if not os.path.lexists(src):
        raise CheckpointNotFoundError(f"no such DCP checkpoint: {src} does not exist", path=src)
    if not os.path.isdir(src):
        raise CheckpointNotFoundError(f"{src} is not a DCP checkpoint: not a directory", path=src)
    if not os.path.lexists(os.path.join(src, METADATA_NAME)):
        raise CheckpointNotFoundError(f"{src} is not a torch DCP checkpoint: it has no {METADATA_NAME}", path=src)
    if is_object_url(dst):
        if not overwrite and _committed_at(dst, storage_options):
            raise CheckpointExistsError(f"{dst} already holds a checkpoint: import-dcp writes a new one", path=dst)
        return
    if os.path.lexists(dst) and os.path.realpath(dst) == os.path.realpath(src):
        raise CheckpointExistsError(f"{dst} is the DCP checkpoint being imported: choose another destination", path=dst)
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists: import-dcp writes a new checkpoint", path=dst)


def _committed_at(url: str, storage_options: Mapping[str, str] | None) -> bool:
    """Whether a checkpoint is committed at the object store URL ``url`` (a missing bucket: no)."""
    try:
        open_checkpoint(url, storage_options).close()
    except CheckpointNotFoundError:
        return False
    return True


def _summary(src: str, dst: str, index: DcpIndex, seconds: float) -> DcpImportSummary:
    ranks = {m.group(1) for m in map(_RANK_FILE.fullmatch, index.files) if m}
    return DcpImportSummary(
        src=src,
        dst=dst,
        tensors=len(index.tensors),
        tensor_bytes=sum(_numel(t.shape) * t.dtype.itemsize for t in index.tensors),
        chunks=sum(len(t.chunks) for t in index.tensors),
        values=len(index.values),
        files=len(index.files),
        source_ranks=len(ranks) if ranks else min(1, len(index.files)),
        dcp_version=index.version,
        seconds=seconds,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _SourceFiles:
    """The DCP checkpoint's data files, each opened once (never through a symlink), read by range."""

    def __init__(self, src: str) -> None:
        self._src = src
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, loc: DcpLocation, key: str) -> bytes:
        """The bytes of ``loc`` (checked against the file's size when the index was read, and again here)."""
        path = os.path.join(self._src, loc.file)
        try:
            if loc.file not in self._fds:
                self._fds[loc.file] = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            fd = self._fds[loc.file]
            size = os.fstat(fd).st_size
            if loc.offset + loc.length > size:
                raise CorruptCheckpointError(
                    f"{path}: key {key!r}: its bytes [{loc.offset}, {loc.offset + loc.length}) lie beyond the end "
                    f"of the file ({size} bytes)", path=self._src, file=loc.file, key=key,
                )  # fmt: skip
            data = os.pread(fd, loc.length, loc.offset)
        except OSError as e:
            raise CheckpointIOError(
                f"reading {path} for key {key!r} failed: {e.strerror}", path=path, operation="read", errno=e.errno
            ) from e
        if len(data) != loc.length:
            raise CorruptCheckpointError(
                f"{path}: key {key!r}: {len(data)} of {loc.length} bytes read (the file shrank)",
                path=self._src, file=loc.file, key=key,
            )  # fmt: skip
        return data


def _torch_load(data: bytes, key: str, what: str) -> Any:
    """``torch.load(weights_only=True)`` of an in-memory payload; a refusal names the key."""
    if not data.startswith(_ZIP_MAGIC):
        raise CorruptCheckpointError(
            f"key {key!r}: its {what} is not a torch.save payload (DCP's safetensors serialization and "
            "stream transforms are not supported)",
            key=key,
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsafeObjectError(
            f"key {key!r}: its {what} is not plain data (torch.load with weights_only=True refused it: {first}); "
            "import-dcp never unpickles arbitrary objects",
            key=key,
        ) from e
    except Exception as e:  # noqa: BLE001 - any failure to parse a payload is a corrupt payload
        raise CorruptCheckpointError(f"key {key!r}: its {what} cannot be read: {type(e).__name__}: {e}", key=key) from e


def _load_value(key: str, data: bytes) -> Any:
    return _torch_load(data, key, "value")


def _assemble(t: DcpTensor, files: _SourceFiles) -> torch.Tensor:
    """The full tensor ``t``, each chunk loaded and copied to its place (the chunks were checked to tile it)."""
    full = torch.empty(t.shape, dtype=t.dtype)
    for c in t.chunks:
        chunk = _torch_load(files.read(c.location, t.key), t.key, f"chunk at offsets {list(c.offsets)}")
        if type(chunk) is not torch.Tensor or chunk.dtype != t.dtype or tuple(chunk.shape) != c.sizes:
            got = (
                f"a tensor of {chunk.dtype} {list(chunk.shape)}" if isinstance(chunk, torch.Tensor)
                else f"a {type(chunk).__name__}"
            )  # fmt: skip
            raise CorruptCheckpointError(
                f"key {t.key!r}: its chunk at offsets {list(c.offsets)} holds {got}, "
                f"the metadata says a tensor of {t.dtype} {list(c.sizes)}",
                key=t.key,
            )
        full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))].copy_(chunk)
    return full


class _Branch:
    """A container of the state being rebuilt: its children by dict key (str) or list index (int)."""

    __slots__ = ("children",)

    def __init__(self) -> None:
        self.children: dict[str | int, _Branch | _Leaf] = {}


@dataclass(frozen=True)
class _Leaf:
    key: str
    value: Any


def _nest(flat: dict[str, Any], paths: dict[str, tuple[str | int, ...]], src: str) -> dict[str, Any]:
    """Rebuild the nested state from DCP's flattened keys and their paths (str: dict key, int: list index).

    Raises:
        CorruptCheckpointError: Two keys share a path, a path runs through another key's value, a
            container holds both dict keys and list indices, a path is deeper than ``MAX_DEPTH`` or
            a list index beyond ``MAX_LIST_LENGTH`` (names the key).
    """
    root = _Branch()
    for key, value in flat.items():
        path = paths[key]
        if len(path) > MAX_DEPTH:
            raise _bad_path(src, key, f"its path {path!r} nests deeper than {MAX_DEPTH} containers")
        node = root
        for part in path[:-1]:
            child = node.children.setdefault(part, _Branch())
            if isinstance(child, _Leaf):
                raise _bad_path(src, key, f"its path {path!r} runs through the value of key {child.key!r}")
            node = child
        other = node.children.get(path[-1])
        if other is not None:
            with_what = f"the same path as key {other.key!r}" if isinstance(other, _Leaf) else "the path of a container"
            raise _bad_path(src, key, f"its path {path!r} is {with_what}")
        node.children[path[-1]] = _Leaf(key, value)
    built = _build(root, (), src)
    assert isinstance(built, dict)  # every path starts with a str
    return built


def _bad_path(src: str, key: str, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{os.path.join(src, METADATA_NAME)}: key {key!r}: planner_data: {message}", path=src, file=METADATA_NAME, key=key
    )


def _build(node: _Branch, where: tuple[str | int, ...], src: str) -> dict[str, Any] | list[Any]:
    """The dict or list of ``node`` (recursion bounded: paths are at most ``MAX_DEPTH`` long)."""
    values = {k: (v.value if isinstance(v, _Leaf) else _build(v, (*where, k), src)) for k, v in node.children.items()}
    ints = [k for k in values if type(k) is int]
    if not ints:
        return values  # type: ignore[return-value]  # every key is a str
    first = next(iter(node.children.values()))
    some_key = first.key if isinstance(first, _Leaf) else ".".join(map(str, where))
    if len(ints) != len(values):
        raise _bad_path(src, some_key, f"the container at {where!r} has both dict keys and list indices")
    length = max(ints) + 1
    if length > MAX_LIST_LENGTH:
        raise _bad_path(src, some_key, f"the list at {where!r} would have {length} places, more than {MAX_LIST_LENGTH}")
    out: list[Any] = [None] * length  # places DCP did not record (an empty dict in a list) stay None, as in DCP
    for k, v in values.items():
        out[int(k)] = v
    return out
