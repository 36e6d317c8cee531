"""``manifest.json``: the commit marker and index of a checkpoint.

The manifest is written last; its presence means the checkpoint is complete.
It is plain JSON (see ``docs/format.md``) and a reader trusts nothing in it:
:func:`parse_manifest` validates every field, every file name and every size
before any data file is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


from ..utils import call_with_stack
from .dtypes import ITEMSIZE as _ITEMSIZE
from .dtypes import dtype_from_name
from .extents import CHUNK_BYTES
from .extents import checksum as crc32c_of
from .gcpause import paused_gc
from .fields import MAX_FILE_BYTES, ManifestError, check_file_name
from .fields import get_field as _get
from .fields import ints_field as _ints
from .fields import nonneg_field as _nonneg
from .fields import size_field as _size
from .shards import ChunkEntry, GlobalTensor, MeshTable, ShardedEntry, ShardingError, build_index
from .refs import RankRef, check_referenced, parse_refs
from .table import parse_layout, parse_meshes, parse_table
from .tensor_table import TensorEntry, parse_tensor, parse_tensor_fast
from .tree import MAX_DEPTH, MAX_DIMS, STACK_FRAMES_NEEDED, deepest_key

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "INDEX_SUFFIX",
    "MANIFEST_NAME",
    "MAX_DIMS",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "SEAL_BYTES",
    "IndexRef",
    "Layout",
    "Manifest",
    "ManifestError",
    "RankEntry",
    "TensorEntry",
    "build_manifest",
    "check_file_name",
    "check_seal_prefix",
    "index_file_name",
    "is_format_file",
    "parse_manifest",
    "parse_rank_entry",
    "parse_rank_index",
    "seal_manifest",
]

FORMAT_VERSION = 2
#: Versions this torchckpt reads (1: every rank's entry inline in the manifest, every chunk listed).
READABLE_VERSIONS = (1, 2)
#: The manifest's name in a checkpoint: the marker whose presence means the checkpoint is complete.
MANIFEST_NAME = "manifest.json"
# CHUNK_BYTES (from extents.py, where chunks are cut): the bytes one checksum covers, the one size of versions 1 and 2.
#: The names of the format's own files in a checkpoint: the manifest and the rank files of both layouts.
_FORMAT_FILE = re.compile(r"^(manifest\.json|checkpoint_\d+\.pt|rank_\d+\.safetensors|rank_\d+\.index\.json)$")
#: How a rank's index object is named: ``rank_00003.index.json``.
INDEX_SUFFIX = ".index.json"
#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 1 << 30
# MAX_DIMS (64, numpy's limit too): the most dimensions a tensor may have; ``save`` refuses more, and the
# parser checks it before any per-dimension work, so parsing stays linear in the manifest's size.


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
class IndexRef:
    """Where a rank's entry is kept when the manifest does not hold it: its index object, size and checksum."""

    file: str
    size_bytes: int
    crc32c: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size_bytes": self.size_bytes, "crc32c": f"{self.crc32c:08x}"}


def index_file_name(rank: int) -> str:
    """The name of rank ``rank``'s index object."""
    return f"rank_{rank:05d}{INDEX_SUFFIX}"


@dataclass(frozen=True)
class RankEntry:
    """What one rank wrote.

    A *stub* (``index`` set) is the manifest's line for a rank whose entry is
    in its index object: file, size, digest and the signature of its plain
    state only; ``CheckpointSnapshot.rank_entry`` reads the whole entry.
    """

    rank: int
    file: str
    size_bytes: int
    digest: str
    tree: Any = None
    tensors: tuple[TensorEntry, ...] = ()
    data_offset: int = 0
    sharded: tuple[ShardedEntry, ...] = ()
    index: IndexRef | None = None
    signature_digest: str = ""
    #: Other checkpoints' rank files holding tensors of this entry (an incremental save, ``refs.py``).
    refs: tuple[RankRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "digest": self.digest,
        }
        if self.refs:
            out["refs"] = [r.to_json() for r in self.refs]
        if self.index is not None:
            out["index"] = self.index.to_json()
            out["signature"] = self.signature_digest
        elif self.tree is not None:
            out["data_offset"] = self.data_offset
            out["tree"] = self.tree
            out["tensors"] = [t.to_json() for t in self.tensors]
            if self.sharded:
                meshes = MeshTable()
                out["sharded"] = [s.to_json(meshes) for s in self.sharded]
                if meshes:
                    out["meshes"] = meshes.to_json()
        return out

    def stub(self, index: IndexRef) -> RankEntry:
        """This entry's line in a manifest whose entries are kept in index objects."""
        return RankEntry(
            self.rank, self.file, self.size_bytes, self.digest, index=index, signature_digest=self.signature(),
            refs=self.refs,
        )  # fmt: skip

    @property
    def tensor_bytes(self) -> int:
        """The bytes of the tensors this entry's own file holds (referenced ones are another file's)."""
        return sum(t.nbytes for t in self.tensors if t.ref is None)

    @cached_property
    def chunk_tensors(self) -> dict[tuple[str, tuple[int, ...]], TensorEntry]:
        """``{(sharded tensor name, chunk offsets): the tensor of this rank's table}`` of every chunk it wrote."""
        return {(s.name, c.offsets): self.tensors[c.tensor] for s in self.sharded for c in s.chunks}

    def plain_signature(self) -> dict[str, Any]:
        """The rank's plain tensors (its chunks of sharded tensors are its own by design): name -> dtype, shape, crcs."""
        chunks = {c.tensor for s in self.sharded for c in s.chunks}
        return {t.name: [t.dtype, list(t.shape), list(t.crc32c)] for i, t in enumerate(self.tensors) if i not in chunks}

    def named_tree(self) -> Any:
        """The rank's tree with each tensor reference by name: equal for ranks whose tables are numbered apart."""

        def walk(node: Any) -> Any:
            if isinstance(node, list):
                return [walk(n) for n in node]
            if isinstance(node, dict) and len(node) == 1:
                ((tag, body),) = node.items()
                if tag == "T" and isinstance(body, int) and 0 <= body < len(self.tensors):
                    return {"T": self.tensors[body].name}
                if tag == "DT" and isinstance(body, int) and 0 <= body < len(self.sharded):
                    return {"DT": self.sharded[body].name}
                return {tag: walk(body)}
            return node

        return walk(self.tree)

    def signature(self) -> str:
        """A digest of the rank's state but its chunks of sharded tensors: ranks that saved the same state agree."""
        if self.index is not None or self.tree is None:
            return self.signature_digest or self.digest
        body = json.dumps([self.named_tree(), self.plain_signature()], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


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
    table: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a manifest to UTF-8 JSON bytes (``table``: the global table of sharded tensors, ``table.py``)."""
    doc: dict[str, Any] = {
        "torchckpt_format": FORMAT_VERSION,
        "layout": layout,
        "world_size": len(ranks),
        "created_unix_s": time.time(),
        "checksum": {"algorithm": "crc32c", "chunk_bytes": chunk_bytes},
        "ranks": [r.to_json() for r in sorted(ranks, key=lambda r: r.rank)],
        "metadata": metadata or {},
        "stats": stats or {},
    }
    if table is not None:
        doc["meshes"], doc["sharded"] = table["meshes"], table["sharded"]
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
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"unknown format version {version} (this torchckpt reads versions {list(READABLE_VERSIONS)})")
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
        raise ManifestError(f"checksum chunk_bytes {chunk_bytes} is not {CHUNK_BYTES} (the one size of versions 1 and 2)")
    ranks = tuple(_parse_rank(r, i, layout, chunk_bytes, world_size, version) for i, r in enumerate(ranks_doc))
    files = [r.file for r in ranks] + [r.index.file for r in ranks if r.index is not None]
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
    if version == 1:
        try:
            sharded = build_index(ranks)
        except ShardingError as e:
            raise ManifestError(str(e), key=e.key) from None
    else:
        sharded = parse_table(doc, world_size) if layout == Layout.SAFETENSORS else {}
    return Manifest(layout, world_size, ranks, chunk_bytes, metadata, stats, float(created), version, sharded)


def parse_rank_entry(doc: Any, index: int, chunk_bytes: int, world_size: int) -> RankEntry:
    """Parse one rank's entry (as reported by that rank before the commit)."""
    layout = Layout.SAFETENSORS if isinstance(doc, dict) and ("tree" in doc or "index" in doc) else Layout.TORCH_SAVE
    return _parse_rank(doc, index, layout, chunk_bytes, world_size, FORMAT_VERSION)


@paused_gc()  # an entry per tensor: see gcpause.py
def parse_rank_index(data: bytes, stub: RankEntry, chunk_bytes: int, world_size: int) -> RankEntry:
    """The whole entry of a rank from the bytes of its index object, checked against the manifest's ``stub``.

    Raises:
        ManifestError: The bytes are not the index the manifest names (size,
            checksum), not valid, or describe another rank file.
    """
    ref = stub.index
    if ref is None:
        return stub
    if len(data) != ref.size_bytes:
        raise ManifestError(f"{len(data)} bytes, the manifest says {ref.size_bytes}")
    if check_seal_prefix(data[:SEAL_BYTES]) != ref.crc32c or crc32c_of(memoryview(data)[SEAL_BYTES:]) != ref.crc32c:
        raise ManifestError("checksum mismatch: not the index the manifest names, or changed since")
    try:
        doc = call_with_stack(STACK_FRAMES_NEEDED, json.loads, data.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as e:
        raise ManifestError(f"not valid JSON: {e}") from e
    except RecursionError as e:
        raise ManifestError(f"JSON nested too deeply (states nest at most {MAX_DEPTH} deep)") from e
    if isinstance(doc, dict):
        doc.pop("manifest_crc32c", None)
    entry = _parse_rank(doc, stub.rank, Layout.SAFETENSORS, chunk_bytes, world_size, FORMAT_VERSION, inline=True)
    if (entry.file, entry.size_bytes, entry.digest) != (stub.file, stub.size_bytes, stub.digest):
        raise ManifestError(f"describes {entry.file} ({entry.size_bytes} bytes), not the manifest's {stub.file}")
    if entry.refs != stub.refs:
        raise ManifestError(f"its refs differ from the manifest's line for {stub.file}")
    return RankEntry(
        entry.rank, entry.file, entry.size_bytes, entry.digest, entry.tree, entry.tensors, entry.data_offset,
        entry.sharded, None, stub.signature_digest, entry.refs,
    )  # fmt: skip


def _parse_stub(doc: Any, rank: int, file: str, size: int, digest: str, where: str) -> RankEntry:
    """A manifest line pointing at a rank's index object."""
    ref = _get(doc, "index", dict, where)
    crc = _get(ref, "crc32c", str, f"{where}.index")
    signature = _get(doc, "signature", str, where)
    if not re.fullmatch(r"[0-9a-f]{8}", crc) or not re.fullmatch(r"[0-9a-f]{64}", signature):
        raise ManifestError(f"{where}: malformed index checksum or signature")
    name = check_file_name(_get(ref, "file", str, f"{where}.index"))
    index = IndexRef(name, _size(ref, "size_bytes", f"{where}.index"), int(crc, 16))
    refs = parse_refs(doc, where)
    return RankEntry(rank, file, size, digest, index=index, signature_digest=signature, refs=refs)


def _parse_rank(
    doc: Any, index: int, layout: str, chunk_bytes: int, world_size: int, version: int, *, inline: bool = False
) -> RankEntry:
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
    if version > 1 and not inline and "index" in doc:
        return _parse_stub(doc, rank, file, size, digest, where)
    data_offset = _nonneg(doc, "data_offset", where)
    tensors_doc = _get(doc, "tensors", list, where)
    tensors = tuple(
        parse_tensor_fast(t, chunk_bytes) or parse_tensor(t, f"{where}.tensors[{j}]", chunk_bytes)
        for j, t in enumerate(tensors_doc)
    )
    if "tree" not in doc:
        raise ManifestError(f"{where}: missing field 'tree'")
    refs = parse_refs(doc, where)
    if refs or any(t.ref is not None for t in tensors):
        check_referenced(tensors, refs, where)
    end = data_offset
    for t in sorted((t for t in tensors if t.ref is None), key=lambda t: (t.offset, t.nbytes)):
        if t.offset != end:
            raise ManifestError(f"{where}: tensor {t.name!r} at offset {t.offset}, expected {end} (gap or overlap)")
        end += t.nbytes
    if end != size:
        raise ManifestError(f"{where}: tensors end at byte {end} but the file is declared as {size} bytes")
    if data_offset < 8 or data_offset > size:
        raise ManifestError(f"{where}: data_offset {data_offset} outside the file")
    meshes = parse_meshes(doc.get("meshes", []), world_size, where) if version > 1 else []
    grids: dict[Any, Any] = {}
    sharded = tuple(
        _parse_sharded_fast(x, tensors, meshes, world_size, grids)
        or _parse_sharded(x, f"{where}.sharded[{j}]", tensors, meshes, world_size, grids)
        for j, x in enumerate(_get(doc, "sharded", list, where))
    ) if "sharded" in doc else ()  # fmt: skip
    if refs and any(tensors[c.tensor].ref is not None for s in sharded for c in s.chunks):
        raise ManifestError(f"{where}: a chunk of a sharded tensor refers to another checkpoint (chunks are never referenced)")
    return RankEntry(rank, file, size, digest, doc["tree"], tensors, data_offset, sharded, refs=refs)


def _parse_sharded_fast(
    doc: Any, tensors: tuple[TensorEntry, ...], meshes: list[Any], world_size: int, grids: dict[Any, Any]
) -> ShardedEntry | None:
    """The entry when ``doc`` is plainly well formed, else None (then :func:`_parse_sharded` says what is wrong).

    The same checks in one pass of exact type tests: an index has an entry per sharded tensor.
    """
    if type(doc) is not dict:
        return None
    name, dtype, shape, chunks_doc = doc.get("name"), doc.get("dtype"), doc.get("shape"), doc.get("chunks")
    if type(name) is not str or type(dtype) is not str or type(shape) is not list or type(chunks_doc) is not list:
        return None
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None or len(shape) > MAX_DIMS:
        return None
    span = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        span *= d or 1
    if span * itemsize > MAX_FILE_BYTES:
        return None
    ndim, chunks = len(shape), []
    for c in chunks_doc:
        index, offsets = (c.get("T"), c.get("offsets")) if type(c) is dict else (None, None)
        if type(index) is not int or not 0 <= index < len(tensors) or type(offsets) is not list or len(offsets) != ndim:
            return None
        if any(type(o) is not int or o < 0 for o in offsets):
            return None
        t = tensors[index]
        if t.dtype != dtype or len(t.shape) != ndim:
            return None
        chunks.append(ChunkEntry(index, tuple(offsets)))
    try:
        grid, writer = parse_layout(doc, meshes, ndim, world_size, "", grids)
    except ManifestError:
        return None
    return ShardedEntry(name, dtype, tuple(shape), tuple(chunks), grid, writer)


def _parse_sharded(
    doc: Any, where: str, tensors: tuple[TensorEntry, ...], meshes: list[Any], world_size: int, grids: dict[Any, Any]
) -> ShardedEntry:
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
    try:
        grid, writer = parse_layout(doc, meshes, len(shape), world_size, where, grids)
    except ManifestError as e:
        raise ManifestError(str(e), key=name) from None
    return ShardedEntry(name, dtype, shape, tuple(chunks), grid, writer)


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
