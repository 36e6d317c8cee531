"""The tensor table of a native rank file: one :class:`TensorEntry` per tensor, and its parsers.

A rank's entry (in the manifest or its index object) lists every tensor of its
file: name, dtype, shape, where its bytes are, and their checksums. Parsing is
done once per tensor on every load, so a fast path checks a plainly well-formed
entry in one pass and the slow path says what is wrong with any other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import ITEMSIZE as _ITEMSIZE
from .dtypes import dtype_from_name
from .fields import MAX_FILE_BYTES, ManifestError
from .fields import get_field as _get
from .fields import nonneg_field as _nonneg
from .fields import size_field as _size
from .tree import MAX_DIMS

__all__ = ["TensorEntry", "parse_tensor", "parse_tensor_fast"]


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
    #: XXH3-128 of the bytes (32 hex digits; "" when the save did not compute it): incremental saves compare it.
    xxh3: str = ""
    #: Which of the entry's ``refs`` holds the bytes (None: this entry's own rank file), see ``refs.py``.
    ref: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "crc32c": list(self.crc32c),
            "device": self.device,
        }
        if self.xxh3:
            out["xxh3"] = self.xxh3
        if self.ref is not None:
            out["ref"] = self.ref
        return out


_XXH3 = re.compile(r"[0-9a-f]{32}")

#: Device strings ``torch.device`` has accepted in a manifest (checked once, not per tensor).
_DEVICES_SEEN: set[str] = {"cpu"}


def parse_tensor_fast(doc: Any, chunk_bytes: int) -> TensorEntry | None:
    """The entry when ``doc`` is plainly well formed, else None (then :func:`parse_tensor` says what is wrong).

    The same checks as :func:`parse_tensor` in one pass of exact type tests: a
    manifest has an entry per tensor, and this runs on every load.
    """
    if type(doc) is not dict:
        return None
    xxh3, ref = doc.get("xxh3", ""), doc.get("ref")
    if type(xxh3) is not str or (xxh3 and not _XXH3.fullmatch(xxh3)) or (ref is not None and (type(ref) is not int or ref < 0)):
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
    return TensorEntry(name, dtype_str, tuple(shape_doc), offset, nbytes, tuple(crcs), device, xxh3, ref)


def parse_tensor(doc: Any, where: str, chunk_bytes: int) -> TensorEntry:
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
    xxh3 = doc.get("xxh3", "")
    if not isinstance(xxh3, str) or (xxh3 and not _XXH3.fullmatch(xxh3)):
        raise ManifestError(f"{where}: malformed xxh3 digest {xxh3!r} (32 hex digits)")
    ref = _nonneg(doc, "ref", where) if "ref" in doc else None
    return TensorEntry(name, dtype_str, shape, _nonneg(doc, "offset", where), nbytes, tuple(crcs), device, xxh3, ref)
