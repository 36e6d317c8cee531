"""Where a load is verified: every check of a rank file against its manifest entry, in one place.

The loader (``checkpoint_reader`` through ``native_read`` and ``torch_save``),
``verify_checkpoint`` and the tools' lazy views call these functions; each
raises :class:`CorruptCheckpointError` naming the checkpoint, the file and
the key. ``verify_checkpoint`` turns the errors into ``Problem`` entries and
goes on, so that it lists every problem.

The checks, in the order a reader makes them:

- :func:`check_size`: the rank file has the size the manifest says.
- :func:`check_header` (native layout): the header and tensor table, with
  the chunk checksums of the manifest, give the manifest's file digest
  (:func:`~.native.digest_of`), so nothing but the tensor bytes is left to check.
- :func:`check_file_digest` (``torch_save`` layout): the crc32c of the whole
  file (:func:`file_digest`) is the manifest's digest.
- Chunk checksums (native layout): a tensor of ``n`` bytes has
  ``max(1, ceil(n / CHUNK_BYTES))`` crc32c values, chunk ``k`` covering its
  bytes ``[k * CHUNK_BYTES, min(n, (k + 1) * CHUNK_BYTES))``. They are checked
  while the bytes are read (``extent_read.read_extents`` raises
  ``ChecksumError``, turned into the error by :func:`read_error`), or over
  bytes already in memory by :func:`check_tensor_bytes` (mapped files).
"""

from __future__ import annotations

from ..errors import CorruptCheckpointError
from ..storage.base import ObjectReader
from .extents import CHUNK_BYTES, ChecksumError, checksum
from .manifest import RankEntry, TensorEntry
from .native import digest_of

__all__ = [
    "check_file_digest",
    "check_header",
    "check_size",
    "check_tensor_bytes",
    "chunk_error",
    "file_digest",
    "read_error",
]

#: Block size of the streamed whole-file digest (memory stays flat whatever the file's size).
_READ_BLOCK = 16 * 1024 * 1024


def check_size(src: ObjectReader, entry: RankEntry, where: str) -> None:
    """Raise unless the open rank file has the size the manifest says.

    Raises:
        CorruptCheckpointError: Another size (truncated or replaced).
    """
    if src.size != entry.size_bytes:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {where}: rank file {entry.file} is {src.size} bytes, the manifest says "
            f"{entry.size_bytes} (truncated or replaced)",
            path=where,
            file=entry.file,
        )


def check_header(src: ObjectReader, entry: RankEntry, where: str) -> None:
    """Raise unless the native rank file's header and tensor table match the manifest's digest.

    Raises:
        CorruptCheckpointError: The header is short or differs from the one the digest was made of.
    """
    header = src.read(0, entry.data_offset)
    if len(header) != entry.data_offset or digest_of(checksum(header), list(entry.tensors)) != entry.digest:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {where}: the header of rank file {entry.file} does not match the manifest digest "
            f"{entry.digest}",
            path=where,
            file=entry.file,
        )


def file_digest(src: ObjectReader) -> tuple[int, str]:
    """Size and digest (``crc32c:<8 hex digits>``) of the whole object, read from the start in bounded blocks."""
    crc = 0
    size = 0
    while True:
        block = src.read(size, _READ_BLOCK)
        if not block:
            break
        crc = checksum(block, crc)
        size += len(block)
    return size, f"crc32c:{crc:08x}"


def check_file_digest(src: ObjectReader, entry: RankEntry, where: str) -> None:
    """Raise unless the whole ``torch_save`` rank file has the manifest's size and digest (streamed).

    Raises:
        CorruptCheckpointError: Size or digest differ.
    """
    size, digest = file_digest(src)
    if size != entry.size_bytes or digest != entry.digest:
        raise CorruptCheckpointError(
            f"corrupt checkpoint {where}: rank file {entry.file} does not match the manifest "
            f"(size {size} vs {entry.size_bytes}, digest {digest} vs {entry.digest})",
            path=where,
            file=entry.file,
        )


def chunk_error(where: str, file: str, key: str, chunk: int, after: str | None = None) -> CorruptCheckpointError:
    """The error of a chunk of tensor ``key`` whose bytes do not match their checksum.

    Args:
        where: The checkpoint path.
        file: The rank file.
        key: The tensor's key.
        chunk: The chunk's number in the tensor.
        after: What the failed read left behind (the loader says which template tensors it may have changed).
    """
    return CorruptCheckpointError(
        f"corrupt checkpoint {where}: checksum mismatch in rank file {file}, key {key!r} (chunk {chunk})"
        + (f"; {after}" if after else ""),
        path=where,
        file=file,
        key=key,
    )


def read_error(
    err: ChecksumError | EOFError, where: str, file: str, keys: list[str], after: str | None = None
) -> CorruptCheckpointError:
    """The error of a failed ``read_extents`` of tensors ``keys`` (in the order of its extents).

    Args:
        err: What ``read_extents`` raised: a chunk that does not match, or a file that ends too early.
        where: The checkpoint path.
        file: The rank file.
        keys: The key of each extent read.
        after: What the failed read left behind, for the message.
    """
    if isinstance(err, ChecksumError):
        return chunk_error(where, file, keys[err.extent_index], err.chunk, after)
    return CorruptCheckpointError(
        f"corrupt checkpoint {where}: rank file {file} is truncated: {err}" + (f"; {after}" if after else ""),
        path=where,
        file=file,
    )


def check_tensor_bytes(data: memoryview, tensor: TensorEntry, where: str, file: str) -> None:
    """Raise unless every chunk of a tensor's bytes, already in memory (e.g. mapped), matches its checksum.

    Args:
        data: The tensor's ``tensor.nbytes`` bytes.
        tensor: Its manifest entry (the expected checksums).
        where: The checkpoint path.
        file: The rank file.

    Raises:
        CorruptCheckpointError: A chunk does not match (names the key and the chunk).
    """
    for k, crc in enumerate(tensor.crc32c):
        if checksum(data[k * CHUNK_BYTES : min(tensor.nbytes, (k + 1) * CHUNK_BYTES)]) != crc:
            raise chunk_error(where, file, tensor.name, k)
