"""``manifest.json``: the commit marker and index of a checkpoint.

The manifest is written last; its presence means the checkpoint is complete.
It is plain JSON (see ``docs/format.md``) and a reader trusts nothing in it:
:func:`parse_manifest` validates every field, every file name and every size
before any data file is opened.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..utils import call_with_stack
from .dtypes import ITEMSIZE as _ITEMSIZE
from .dtypes import dtype_from_name
from .extents import CHUNK_BYTES
from .extents import checksum as crc32c_of
from .gcpause import paused_gc
from .shards import ChunkEntry, GlobalTensor, ShardedEntry, ShardingError, build_index
from .tree import MAX_DEPTH, MAX_DIMS, STACK_FRAMES_NEEDED, deepest_key

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_DIMS",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "SEAL_BYTES",
    "Layout",
    "Manifest",
    "ManifestError",
    "RankEntry",
    "TensorEntry",
    "build_manifest",
    "check_file_name",
    "check_seal_prefix",
    "is_format_file",
    "parse_manifest",
    "parse_rank_entry",
    "seal_manifest",
]

FORMAT_VERSION = 1
#: The manifest's name in a checkpoint: the marker whose presence means the checkpoint is complete.
MANIFEST_NAME = "manifest.json"
# CHUNK_BYTES (from extents.py, where chunks are cut): the bytes one checksum covers, the one size of version 1.
#: The names of the format's own files in a checkpoint: the manifest and the rank files of both layouts.
_FORMAT_FILE = re.compile(r"^(manifest\.json|checkpoint_\d+\.pt|rank_\d+\.safetensors)$")
#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 1 << 30
#: Largest rank file (and so tensor) a manifest may declare: 1 PiB. Anything larger is corruption
#: or an attack, refused before a data file is opened or a byte is allocated.
MAX_FILE_BYTES = 1 << 50
# MAX_DIMS (64, numpy's limit too): the most dimensions a tensor may have; ``save`` refuses more, and the
# parser checks it before any per-dimension work, so parsing stays linear in the manifest's size.
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


def is_format_file(name: str) -> bool:
    """Whether ``name``, a file of a checkpoint, is one of the format's own (the manifest or a rank file).

    A save replaces these; any other file in a checkpoint is the user's and is
    carried over into the new generation.
    """
    return _FORMAT_FILE.match(name) is not None


class Layout:
    """The two on-disk layouts (plain strings in the manifest)."""

    TORCH_SAVE = "torch_save"
    SAFETENSORS = "safetensors"
    ALL = (TORCH_SAVE, SAFETENSORS)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a native rank file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32c: tuple[int, ...]
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": list(self.crc32c),
            "device": self.device,
        }


@dataclass(frozen=True)
class RankEntry:
    """What one rank wrote."""

    rank: int
    file: str
    size_bytes: int
    digest: str
    tree: Any = None
    tensors: tuple[TensorEntry, ...] = ()
    data_offset: int = 0
    sharded: tuple[ShardedEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "digest": self.digest,
        }
        if self.tree is not None:
            out["data_offset"] = self.data_offset
            out["tree"] = self.tree
            out["tensors"] = [t.to_json() for t in self.tensors]
            if self.sharded:
                out["sharded"] = [s.to_json() for s in self.sharded]
        return out

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    layout: str
    world_size: int
    ranks: tuple[RankEntry, ...]
    chunk_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created_unix_s: float = 0.0
    version: int = FORMAT_VERSION
    sharded: dict[str, GlobalTensor] = field(default_factory=dict)


def build_manifest(
    *,
    layout: str,
    ranks: list[RankEntry],
    chunk_bytes: int,
    metadata: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a manifest to UTF-8 JSON bytes."""
    doc = {
        "torchckpt_format": FORMAT_VERSION,
        "layout": layout,
        "world_size": len(ranks),
        "created_unix_s": time.time(),
        "checksum": {"algorithm": "crc32c", "chunk_bytes": chunk_bytes},
        "ranks": [r.to_json() for r in sorted(ranks, key=lambda r: r.rank)],
        "metadata": metadata or {},
        "stats": stats or {},
    }
    return seal_manifest(doc)


_SEAL = re.compile(rb'\{"manifest_crc32c":"([0-9a-f]{8})",')
#: Length of the seal prefix ``{"manifest_crc32c":"<8 hex digits>",``.
SEAL_BYTES = 30


def seal_manifest(doc: dict[str, Any]) -> bytes:
    """Serialise ``doc`` with its own checksum as the first member.

    The bytes are ``{"manifest_crc32c":"<crc>",`` followed by the compact JSON
    of ``doc`` without its opening brace; ``<crc>`` is the crc32c (8 hex
    digits) of exactly those following bytes, so any changed byte is found.
    """
    body = json.dumps(
        {k: v for k, v in doc.items() if k != "manifest_crc32c"}, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")
    rest = body[1:]
    return b'{"manifest_crc32c":"%08x",' % crc32c_of(rest) + rest


class ManifestError(ValueError):
    """Raised by :func:`parse_manifest`; the caller adds the path.

    Attributes:
        key: The key path of the (sharded) tensor at fault, when one is.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_seal_prefix(head: bytes) -> int:
    """Return the checksum a manifest starting with ``head`` (its first :data:`SEAL_BYTES` bytes) declares.

    Lets a reader refuse a large file that is not a manifest after reading a few bytes of it.

    Raises:
        ManifestError: ``head`` is not the seal prefix.
    """
    seal = _SEAL.match(head)
    if seal is None:
        raise ManifestError("not a sealed manifest: it does not start with its own checksum (truncated or not a manifest)")
    return int(seal.group(1), 16)


def _no_constant(name: str) -> Any:
    raise ManifestError(f"not valid JSON: {name} is not a JSON number")


def check_file_name(name: Any) -> str:
    """Return ``name`` if it is a plain file name inside the checkpoint directory.

    Raises:
        ManifestError: Empty, ``.``/``..``, a path (``/``), absolute, NUL bytes, or odd characters.
    """
    if not isinstance(name, str) or not _NAME_OK.fullmatch(name) or name in (".", ".."):
        raise ManifestError(f"unsafe file name {name!r}: only plain names inside the checkpoint directory are allowed")
    return name


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _nonneg(d: Any, key: str, where: str) -> int:
    value = _get(d, key, int, where)
    if value < 0:
        raise ManifestError(f"{where}: field {key!r} is negative ({value})")
    return int(value)


def _size(d: Any, key: str, where: str) -> int:
    value = _nonneg(d, key, where)
    if value > MAX_FILE_BYTES:
        raise ManifestError(f"{where}: field {key!r} declares an absurd size ({value} bytes, limit {MAX_FILE_BYTES})")
    return value


@paused_gc()  # JSON of every entry: see gcpause.py
def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        ManifestError: Not JSON, unknown version, missing or ill-typed fields,
            unsafe names, or sizes that do not add up.
    """
    if crc32c_of(memoryview(data)[SEAL_BYTES:]) != check_seal_prefix(data[:SEAL_BYTES]):
        raise ManifestError("checksum mismatch: the manifest's bytes have changed since it was written")
    try:
        # The parser recurses per level: with the room a manifest of any state torchckpt saves needs.
        doc = call_with_stack(STACK_FRAMES_NEEDED, json.loads, data.decode("utf-8"), parse_constant=_no_constant)
    except ManifestError:
        raise
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert
        raise ManifestError(f"not valid JSON: {e}") from e
    except RecursionError as e:  # deeper than any manifest torchckpt writes
        raise ManifestError(f"not a manifest: JSON nested too deeply (states nest at most {MAX_DEPTH} deep)") from e
    if not isinstance(doc, dict):
        raise ManifestError("not a JSON object")
    version = _get(doc, "torchckpt_format", int, "manifest")
    if version != FORMAT_VERSION:
        raise ManifestError(f"unknown format version {version} (this torchckpt reads version {FORMAT_VERSION})")
    layout = _get(doc, "layout", str, "manifest")
    if layout not in Layout.ALL:
        raise ManifestError(f"unknown layout {layout!r}")
    world_size = _get(doc, "world_size", int, "manifest")
    ranks_doc = _get(doc, "ranks", list, "manifest")
    if world_size < 1 or len(ranks_doc) != world_size:
        raise ManifestError(f"world_size {world_size} does not match the {len(ranks_doc)} rank entries")
    checksum = _get(doc, "checksum", dict, "manifest")
    if _get(checksum, "algorithm", str, "checksum") != "crc32c":
        raise ManifestError(f"unknown checksum algorithm {checksum.get('algorithm')!r}")
    chunk_bytes = _nonneg(checksum, "chunk_bytes", "checksum")
    if chunk_bytes != CHUNK_BYTES:
        raise ManifestError(f"checksum chunk_bytes {chunk_bytes} is not {CHUNK_BYTES} (the one size of version 1)")
    ranks = tuple(_parse_rank(r, i, layout, chunk_bytes) for i, r in enumerate(ranks_doc))
    files = [r.file for r in ranks]
    if len(set(files)) != len(files):
        raise ManifestError("two ranks name the same file")
    metadata = doc.get("metadata", {})
    stats = doc.get("stats", {})
    if not isinstance(metadata, dict) or not isinstance(stats, dict):
        raise ManifestError("metadata and stats must be JSON objects")
    too_deep = deepest_key(metadata)
    if too_deep is not None:
        raise ManifestError(f"metadata nests containers more than {MAX_DEPTH} deep at key {too_deep!r}")
    created = doc.get("created_unix_s", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise ManifestError("created_unix_s must be a number")
    try:
        sharded = build_index(ranks)
    except ShardingError as e:
        raise ManifestError(str(e), key=e.key) from None
    return Manifest(layout, world_size, ranks, chunk_bytes, metadata, stats, float(created), version, sharded)


def parse_rank_entry(doc: Any, index: int, chunk_bytes: int) -> RankEntry:
    """Parse one rank's entry (as reported by that rank before the commit)."""
    layout = Layout.SAFETENSORS if isinstance(doc, dict) and "tree" in doc else Layout.TORCH_SAVE
    return _parse_rank(doc, index, layout, chunk_bytes)


def _parse_rank(doc: Any, index: int, layout: str, chunk_bytes: int) -> RankEntry:
    where = f"ranks[{index}]"
    rank = _nonneg(doc, "rank", where)
    if rank != index:
        raise ManifestError(f"{where}: rank {rank} out of order")
    file = check_file_name(_get(doc, "file", str, where))
    size = _size(doc, "size_bytes", where)
    digest = _get(doc, "digest", str, where)
    if not re.fullmatch(r"crc32c:[0-9a-f]{8}", digest):
        raise ManifestError(f"{where}: malformed digest {digest!r}")
    if layout == Layout.TORCH_SAVE:
        return RankEntry(rank, file, size, digest)
    data_offset = _nonneg(doc, "data_offset", where)
    tensors_doc = _get(doc, "tensors", list, where)
    tensors = tuple(
        _parse_tensor_fast(t, chunk_bytes) or _parse_tensor(t, f"{where}.tensors[{j}]", chunk_bytes)
        for j, t in enumerate(tensors_doc)
    )
    if "tree" not in doc:
        raise ManifestError(f"{where}: missing field 'tree'")
    end = data_offset
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.offset != end:
            raise ManifestError(f"{where}: tensor {t.name!r} at offset {t.offset}, expected {end} (gap or overlap)")
        end += t.nbytes
    if end != size:
        raise ManifestError(f"{where}: tensors end at byte {end} but the file is declared as {size} bytes")
    if data_offset < 8 or data_offset > size:
        raise ManifestError(f"{where}: data_offset {data_offset} outside the file")
    sharded = tuple(
        _parse_sharded(x, f"{where}.sharded[{j}]", tensors) for j, x in enumerate(_get(doc, "sharded", list, where))
    ) if "sharded" in doc else ()  # fmt: skip
    return RankEntry(rank, file, size, digest, doc["tree"], tensors, data_offset, sharded)


def _ints(doc: Any, key: str, where: str) -> tuple[int, ...]:
    values = _get(doc, key, list, where)
    if len(values) > MAX_DIMS or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ManifestError(f"{where}: {key} must be a list of at most {MAX_DIMS} non-negative integers")
    return tuple(values)


def _parse_sharded(doc: Any, where: str, tensors: tuple[TensorEntry, ...]) -> ShardedEntry:
    """One sharded tensor of a rank entry; its chunks refer to the rank's tensors and lie in its shape.

    Every error after the name is parsed names the tensor (``ManifestError.key``).
    """
    name = _get(doc, "name", str, where)
    where = f"{where} (sharded tensor {name!r})"
    dtype = _get(doc, "dtype", str, where)
    try:
        itemsize = dtype_from_name(dtype).itemsize
    except KeyError:
        raise ManifestError(f"{where}: unknown dtype {dtype!r}", key=name) from None
    try:
        shape = _ints(doc, "shape", where)
        chunks_doc = _get(doc, "chunks", list, where)
    except ManifestError as e:
        raise ManifestError(str(e), key=name) from None
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_FILE_BYTES:
        raise ManifestError(f"{where}: absurd shape {list(shape)} (more than {MAX_FILE_BYTES} bytes)", key=name)
    chunks = (_parse_chunk(c, f"{where}.chunks[{k}]", name, dtype, shape, tensors) for k, c in enumerate(chunks_doc))
    return ShardedEntry(name, dtype, shape, tuple(chunks))


def _parse_chunk(
    doc: Any, at: str, name: str, dtype: str, shape: tuple[int, ...], tensors: tuple[TensorEntry, ...]
) -> ChunkEntry:
    """One chunk of sharded tensor ``name``: a tensor of the rank's table of its dtype and rank, and its offsets."""
    try:
        index = _get(doc, "T", int, at)
        offsets = _ints(doc, "offsets", at)
    except ManifestError as e:
        raise ManifestError(str(e), key=name) from None
    if not 0 <= index < len(tensors):
        raise ManifestError(f"{at}: refers to tensor {index} of the rank's {len(tensors)}", key=name)
    t = tensors[index]
    if t.dtype != dtype or len(t.shape) != len(shape) or len(offsets) != len(shape):
        raise ManifestError(
            f"{at}: chunk {t.name!r} is {t.dtype} {list(t.shape)} at {list(offsets)}, "
            f"not a part of {name!r} {dtype} {list(shape)}",
            key=name,
        )
    return ChunkEntry(index, offsets)


#: Device strings ``torch.device`` has accepted in a manifest (checked once, not per tensor).
_DEVICES_SEEN: set[str] = {"cpu"}


def _parse_tensor_fast(doc: Any, chunk_bytes: int) -> TensorEntry | None:
    """The entry when ``doc`` is plainly well formed, else None (then :func:`_parse_tensor` says what is wrong).

    The same checks as :func:`_parse_tensor` in one pass of exact type tests: a
    manifest has an entry per tensor, and this runs on every load.
    """
    if type(doc) is not dict:
        return None
    name, dtype_str, shape_doc = doc.get("name"), doc.get("dtype"), doc.get("shape")
    nbytes, offset, crcs, device = doc.get("nbytes"), doc.get("offset"), doc.get("crc32c"), doc.get("device", "cpu")
    if (
        type(name) is not str
        or type(dtype_str) is not str
        or type(shape_doc) is not list
        or len(shape_doc) > MAX_DIMS
        or type(nbytes) is not int
        or type(offset) is not int
        or type(crcs) is not list
        or type(device) is not str
        or device not in _DEVICES_SEEN
        or not 0 <= nbytes <= MAX_FILE_BYTES
        or offset < 0
        or len(crcs) != max(1, -(-nbytes // chunk_bytes))
    ):
        return None
    itemsize = _ITEMSIZE.get(dtype_str)
    if itemsize is None:
        return None
    numel = span = 1
    for d in shape_doc:
        if type(d) is not int or d < 0:
            return None
        numel *= d
        span *= d or 1
    if span * itemsize > MAX_FILE_BYTES or numel * itemsize != nbytes:
        return None
    for c in crcs:
        if type(c) is not int or not 0 <= c < 0x1_0000_0000:
            return None
    return TensorEntry(name, dtype_str, tuple(shape_doc), offset, nbytes, tuple(crcs), device)


def _parse_tensor(doc: Any, where: str, chunk_bytes: int) -> TensorEntry:
    name = _get(doc, "name", str, where)
    dtype_str = _get(doc, "dtype", str, where)
    try:
        dtype = dtype_from_name(dtype_str)
    except KeyError:
        raise ManifestError(f"{where}: unknown dtype {dtype_str!r}") from None
    shape_doc = _get(doc, "shape", list, where)
    if len(shape_doc) > MAX_DIMS:
        raise ManifestError(f"{where}: {len(shape_doc)} dimensions (at most {MAX_DIMS})")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape_doc):
        raise ManifestError(f"{where}: shape must be a list of non-negative integers")
    shape = tuple(int(d) for d in shape_doc)
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_FILE_BYTES:
        # Even an empty tensor (a 0 in its shape) gets strides from the other dimensions: bound them too.
        raise ManifestError(f"{where}: absurd shape {list(shape)} (more than {MAX_FILE_BYTES} bytes without its zeros)")
    nbytes = _size(doc, "nbytes", where)
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise ManifestError(f"{where}: {nbytes} bytes do not match shape {list(shape)} of {dtype_str}")
    crcs = _get(doc, "crc32c", list, where)
    if len(crcs) != max(1, -(-nbytes // chunk_bytes)) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**32 for c in crcs
    ):
        raise ManifestError(f"{where}: malformed crc32c list")
    device = doc.get("device", "cpu")
    if not isinstance(device, str):
        raise ManifestError(f"{where}: device must be a string")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ManifestError(f"{where}: malformed device {device!r}: {e}") from e
    _DEVICES_SEEN.add(device)
    return TensorEntry(name, dtype_str, shape, _nonneg(doc, "offset", where), nbytes, tuple(crcs), device)
