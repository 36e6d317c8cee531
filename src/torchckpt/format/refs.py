"""References of an incremental save: tensors whose bytes another committed checkpoint's rank file holds.

A rank entry may list ``refs``, the rank files of other checkpoints of the
same manager root that hold some of its tensors' bytes (``docs/format.md``,
*Incremental saves*)::

    "refs": [{"checkpoint": "../step_0000000010", "file": "rank_00000.safetensors",
              "size_bytes": 1073745920, "digest": "crc32c:0a1b2c3d"}]

and a tensor of its table with ``"ref": k`` has its bytes at ``offset`` of
``refs[k]``'s file, checked by its own ``crc32c`` list (copied from the
entry that wrote them). A checkpoint named by a reference is a sibling of
the referring one (``../<plain name>``): never an absolute path, never a
path that leaves the manager's root. :func:`parse_refs` checks that;
``reading.CheckpointSnapshot.open_ref`` opens the file.

The per-tensor ``xxh3`` digest (XXH3-128 of the tensor's bytes, 32 hex
digits) decides at save whether a tensor is unchanged since the base:
:func:`content_digest` computes it over the bytes in memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from .fields import ManifestError, check_file_name
from .fields import get_field as _get
from .fields import size_field as _size
from .tensor_table import TensorEntry

__all__ = ["RankRef", "check_referenced", "content_digest", "parse_refs", "ref_location", "sibling_of"]

_DIGEST = re.compile(r"crc32c:[0-9a-f]{8}")
#: What a reference names: a sibling checkpoint of the same root.
_SIBLING_PREFIX = "../"


@dataclass(frozen=True)
class RankRef:
    """A rank file of another checkpoint that holds tensors of this entry."""

    checkpoint: str  # "../<name>": relative to the referring checkpoint's own path
    file: str
    size_bytes: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "file": self.file, "size_bytes": self.size_bytes, "digest": self.digest}

    @property
    def name(self) -> str:
        """The referenced checkpoint's name in the root (``step_0000000010``)."""
        return self.checkpoint[len(_SIBLING_PREFIX) :]


def sibling_of(name: str) -> str:
    """The reference to the checkpoint ``name`` of the same root (``../name``).

    Raises:
        ManifestError: ``name`` is not a plain name.
    """
    return _SIBLING_PREFIX + check_file_name(name)


def parse_refs(doc: Any, where: str) -> tuple[RankRef, ...]:
    """The ``refs`` of a rank entry (none when absent), each checked.

    Raises:
        ManifestError: Not a list of well-formed references, a checkpoint that is not
            a sibling (absolute, ``..`` beyond one level, a path), or a duplicate.
    """
    if not isinstance(doc, dict) or "refs" not in doc:
        return ()
    items = _get(doc, "refs", list, where)
    refs = []
    for k, item in enumerate(items):
        at = f"{where}.refs[{k}]"
        checkpoint = _get(item, "checkpoint", str, at)
        if not checkpoint.startswith(_SIBLING_PREFIX):
            raise ManifestError(f"{at}: checkpoint {checkpoint!r} is not a sibling checkpoint of the same root (../name)")
        try:
            check_file_name(checkpoint[len(_SIBLING_PREFIX) :])
        except ManifestError:
            raise ManifestError(
                f"{at}: checkpoint {checkpoint!r} leaves the root or is not a plain name (only ../<name> is allowed)"
            ) from None
        file = check_file_name(_get(item, "file", str, at))
        digest = _get(item, "digest", str, at)
        if not _DIGEST.fullmatch(digest):
            raise ManifestError(f"{at}: malformed digest {digest!r}")
        refs.append(RankRef(checkpoint, file, _size(item, "size_bytes", at), digest))
    if len({(r.checkpoint, r.file) for r in refs}) != len(refs):
        raise ManifestError(f"{where}: refs names one rank file twice")
    return tuple(refs)


def check_referenced(tensors: Sequence[TensorEntry], refs: Sequence[RankRef], where: str) -> None:
    """Each referenced tensor names one of ``refs`` and lies inside that file (after its 8-byte length).

    Raises:
        ManifestError: A ``ref`` out of range, or bytes outside the referenced file (names the tensor).
    """
    for t in tensors:
        if t.ref is None:
            continue
        if t.ref >= len(refs):
            raise ManifestError(f"{where}: tensor {t.name!r} refers to refs[{t.ref}] of {len(refs)}", key=t.name)
        size = refs[t.ref].size_bytes
        if t.offset < 8 or t.offset + t.nbytes > size:
            raise ManifestError(
                f"{where}: tensor {t.name!r} at bytes [{t.offset}, {t.offset + t.nbytes}) lies outside the "
                f"referenced file {refs[t.ref].checkpoint}/{refs[t.ref].file} of {size} bytes",
                key=t.name,
            )


def ref_location(path: str, ref: RankRef) -> str:
    """The referenced checkpoint's path: ``ref.name`` beside ``path`` (a directory or an object store URL)."""
    trimmed = path.rstrip("/")
    cut = trimmed.rfind("/")
    if cut < 0:
        return ref.name
    return f"{trimmed[:cut]}/{ref.name}"


def content_digest(view: memoryview) -> str:
    """XXH3-128 of ``view``'s bytes, 32 hex digits: what decides that a tensor is unchanged since the base."""
    return xxhash.xxh3_128_hexdigest(view)
