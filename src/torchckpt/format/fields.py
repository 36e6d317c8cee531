"""Checked access to the fields of the format's JSON documents (the manifest, rank indexes, the global table).

Every reader of a document trusts nothing in it: a field is missing, of
the wrong type, negative or absurdly large is a :class:`ManifestError`
saying where, raised before anything is allocated from it.
"""

from __future__ import annotations

import re
from typing import Any

from .tree import MAX_DIMS

__all__ = [
    "MAX_FILE_BYTES",
    "ManifestError",
    "check_file_name",
    "get_field",
    "ints",
    "ints_field",
    "nonneg_field",
    "size_field",
]

#: Largest rank file (and so tensor) a manifest may declare: 1 PiB. Anything larger is corruption
#: or an attack, refused before a data file is opened or a byte is allocated.
MAX_FILE_BYTES = 1 << 50
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


class ManifestError(ValueError):
    """A document of the format is invalid; the caller adds the path.

    Attributes:
        key: The key path of the (sharded) tensor at fault, when one is.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_file_name(name: Any) -> str:
    """Return ``name`` if it is a plain file name inside the checkpoint directory.

    Raises:
        ManifestError: Empty, ``.``/``..``, a path (``/``), absolute, NUL bytes, or odd characters.
    """
    if not isinstance(name, str) or not _NAME_OK.fullmatch(name) or name in (".", ".."):
        raise ManifestError(f"unsafe file name {name!r}: only plain names inside the checkpoint directory are allowed")
    return name


def get_field(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``d[key]``, which must be of ``kind`` (a bool is not an int)."""
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def nonneg_field(d: Any, key: str, where: str) -> int:
    """``d[key]``, a non-negative integer."""
    value = get_field(d, key, int, where)
    if value < 0:
        raise ManifestError(f"{where}: field {key!r} is negative ({value})")
    return int(value)


def size_field(d: Any, key: str, where: str) -> int:
    """``d[key]``, a size in bytes of at most :data:`MAX_FILE_BYTES`."""
    value = nonneg_field(d, key, where)
    if value > MAX_FILE_BYTES:
        raise ManifestError(f"{where}: field {key!r} declares an absurd size ({value} bytes, limit {MAX_FILE_BYTES})")
    return value


def ints_field(doc: Any, key: str, where: str) -> tuple[int, ...]:
    """``doc[key]``, a list of at most ``MAX_DIMS`` non-negative integers."""
    return ints(get_field(doc, key, list, where), f"{where}: {key}")


def ints(values: Any, what: str) -> tuple[int, ...]:
    """``values``, a list of at most ``MAX_DIMS`` non-negative integers (``what`` names it in the error)."""
    if (
        not isinstance(values, list)
        or len(values) > MAX_DIMS
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    ):
        raise ManifestError(f"{what} must be a list of at most {MAX_DIMS} non-negative integers")
    return tuple(values)
