"""The ``torch_save`` layout: ``checkpoint_<rank>.pt`` files that plain ``torch.load`` reads.

Each rank's state dict is written by ``torch.save`` through a file object that
computes the crc32c of the stream as it goes, so the digest costs no extra
pass over the data. Loading uses ``torch.load(weights_only=True)`` unless
pickle is explicitly allowed; the digest of the whole file is checked first
(``verification.check_file_digest``, by the caller).

The read side takes the rank file as an ``ObjectReader``, but reads it
through its local file descriptor (``ObjectReader.fileno``): ``torch.load``
maps the storages from the file, and the zip records are checked through
it. That part is local-only: a reader without a file descriptor is refused.
"""

from __future__ import annotations

import codecs
import logging
import errno
import io
import os
import pickle
from collections import OrderedDict
from typing import IO, Any, cast

import torch

from ..errors import CheckpointError, CorruptCheckpointError, UnsafeObjectError
from ..storage.base import ObjectReader, ObjectWriter
from . import extents
from .extents import BATCH_BYTES as WRITEBACK_BYTES
from .extents import checksum
from .gcpause import paused_gc
from .bounds import check_loaded, check_zip_records
from .select import check_fits, merge
from .torch_save_read import Unsupported, cpu_only, load_mapped

__all__ = ["load_torch_save", "rank_file_name", "save_torch_save", "unpickle_rank_file"]

logger = logging.getLogger(__name__)


def rank_file_name(rank: int) -> str:
    """The file name the reference implementation gives rank ``rank``."""
    return f"checkpoint_{rank}.pt"


class _ChecksumWriter(io.RawIOBase):
    """A write-only file object over an ``ObjectWriter`` that checksums what goes through it.

    ``torch.save`` writes a stream: each piece goes to the object at the
    position the previous one ended (``write_at`` at ``size``).

    ``torch.save`` writes a few small pieces per tensor (record headers, small
    tensors' bytes, padding): those are gathered in a buffer and written
    ``_GATHER_BYTES`` at a time, which saves a system call each (a state of
    100,000 small tensors otherwise costs 300,000 ``write`` calls). A large
    piece first flushes the buffer and then goes out straight from its memory.
    Call :meth:`drain` once ``torch.save`` returns.
    """

    def __init__(self, out: ObjectWriter) -> None:
        super().__init__()
        self.out = out
        self.crc = 0
        self.size = 0  # bytes written to fd (the buffer's are not counted until drained)
        self.flushed = 0
        self._buffer = bytearray()
        self._gather = min(_GATHER_BYTES, extents.BATCH_BYTES)
        #: The first failed write's error; later writes fail with it too.
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        if n < _SMALL_WRITE_BYTES:
            self._buffer += view
            if len(self._buffer) >= self._gather:
                self.drain()
        else:
            self.drain()
            self._write(view)
        return n

    def drain(self) -> None:
        """Write out what the buffer holds."""
        if self._buffer:
            self._write(memoryview(self._buffer))
            self._buffer = bytearray()

    def _write(self, view: memoryview) -> None:
        if self.error is not None:
            raise self.error
        done = 0
        try:
            while done < view.nbytes:
                written = self.out.write_at([view[done:]], self.size + done)
                if written <= 0:
                    raise OSError(errno.EIO, f"a write to {self.out.location} wrote no bytes")
                done += written
        except OSError as e:
            self.error = e
            raise
        self.crc = checksum(view, self.crc)
        self.size += view.nbytes
        if self.size - self.flushed >= WRITEBACK_BYTES:
            # Start writeback as we go, so the final sync has little left to do.
            self.out.start_writeback(self.flushed, self.size - self.flushed)
            self.flushed = self.size


#: Pieces smaller than this are gathered; the buffer is written when it holds ``_GATHER_BYTES``
#: (or the largest single write, ``extents.BATCH_BYTES``, if that is smaller).
_SMALL_WRITE_BYTES = 64 * 1024
_GATHER_BYTES = 1024 * 1024


class _EmptyBytes(bytes):
    """``b""`` pickled as ``_codecs.encode("", "latin1")``, like every non-empty ``bytes`` at protocol 2.

    Pickle writes an empty ``bytes`` as a call of the global ``builtins.bytes``,
    which ``torch.load(weights_only=True)`` refuses; ``_codecs.encode`` it accepts.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (codecs.encode, ("", "latin1"))


def _has_empty_bytes(obj: Any) -> bool:
    if type(obj) is bytes:
        return not obj
    if type(obj) in (dict, OrderedDict):
        return any(_has_empty_bytes(k) or _has_empty_bytes(v) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return any(_has_empty_bytes(v) for v in obj)
    return False


def _weights_only_loadable(obj: Any) -> Any:
    """``obj`` with every ``b""`` replaced by one that weights-only loading accepts (containers rebuilt)."""
    if type(obj) is bytes and not obj:
        return _EmptyBytes()
    if type(obj) in (dict, OrderedDict):
        return type(obj)((_weights_only_loadable(k), _weights_only_loadable(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_weights_only_loadable(v) for v in obj)
    return obj


def save_torch_save(out: ObjectWriter, state_dict: Any, *, empty_bytes: bool | None = None) -> tuple[int, str]:
    """Write ``state_dict`` with ``torch.save`` through ``out``, from byte 0 (not synced).

    Args:
        out: The object being written (the caller syncs and closes it).
        state_dict: The state.
        empty_bytes: Whether it holds an empty ``bytes`` value, when the caller
            knows (``tree.check_saveable`` tells); None: find out.

    Returns:
        The file size and its digest.
    """
    stream = _ChecksumWriter(out)
    if empty_bytes or (empty_bytes is None and _has_empty_bytes(state_dict)):
        state_dict = _weights_only_loadable(state_dict)
    try:
        torch.save(state_dict, cast(IO[bytes], stream))
        stream.drain()
    except Exception:
        if stream.error is None:
            raise
        # torch's zip writer, closing the archive after the failed write, replaces the
        # OSError with a RuntimeError of its own ("unexpected pos"): the errno is the cause.
        raise stream.error from None
    if stream.error is not None:  # a failed write that torch did not pass on
        raise stream.error
    return stream.size, f"crc32c:{stream.crc:08x}"


_ZIP_MAGIC = b"PK\x03\x04"


def _weights_only_cause(e: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (e.g. the unsupported global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if any(word in line for word in ("GLOBAL", "Unsupported", "blocked", "not an allowed")):
            return line.split(". Please use")[0]
    return lines[0] if lines else type(e).__name__


def _local_fd(src: ObjectReader, where: str, file: str) -> int:
    """The file descriptor of ``src`` (the ``torch_save`` layout is read from local files only)."""
    fd = src.fileno()
    if fd is None:
        raise NotImplementedError(
            f"cannot read {file} of {where}: the torch_save layout is read from local files only"
        )
    return fd


def unpickle_rank_file(
    src: ObjectReader, *, map_location: Any, allow_pickle: bool, mmap: bool, where: str, file: str
) -> Any:
    """Unpickle the ``checkpoint_<rank>.pt`` file open as ``src`` and check it against ``bounds``.

    Every reader of the layout goes through here, so each refuses the same
    files with the same errors, in time and memory bounded by the file's size.
    Local-only: ``torch.load`` and the zip-record check read ``src.fileno()``.

    Args:
        src: The open rank file.
        map_location: As for ``torch.load``.
        allow_pickle: Unpickle any object (trusted checkpoints only); else ``weights_only``.
        mmap: Map the storages from the file instead of reading them (zip files only).
        where: The checkpoint path, for messages.
        file: The rank file's name, for messages.

    Raises:
        UnsafeObjectError: The file needs pickle and pickle is not allowed.
        CorruptCheckpointError: ``torch.load`` cannot read it, or it expands beyond the bounds.
        NotImplementedError: ``src`` has no file descriptor (not a local file).
    """
    fd = _local_fd(src, where, file)
    proc_path = f"/proc/self/fd/{fd}"
    size = src.size
    # mmap works only for the zip format; files of torch.save(_use_new_zipfile_serialization=False) are read whole.
    by_path = os.path.exists(proc_path)
    is_zip = src.read(0, 4) == _ZIP_MAGIC
    if is_zip:
        check_zip_records(fd, size, where=where, file=file)
    # Weights only, to the CPU: the fast reader first (tensors mapped); what it does not admit goes to torch.load.
    fast = by_path and is_zip and not allow_pickle and cpu_only(map_location)
    try:
        loaded = _load_fast(fd, proc_path, size) if fast else _NOT_LOADED
        if loaded is not _NOT_LOADED:
            pass
        elif by_path:
            # By name (the same open file): torch reads the archive in C++, faster than through a file object.
            loaded = torch.load(
                proc_path, map_location=map_location, weights_only=not allow_pickle, mmap=mmap and is_zip
            )
        else:
            with os.fdopen(os.dup(fd), "rb") as f:
                loaded = torch.load(f, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(e, where, file) from e
    except (RuntimeError, EOFError, ValueError, OSError, MemoryError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {where}: cannot read {file}: {e}", path=where, file=file) from e
    check_loaded(loaded, file_size=size, where=where, file=file)
    return loaded


_NOT_LOADED = object()


def _load_fast(fd: int, proc_path: str, size: int) -> Any:
    """The file through the fast reader (``torch_save_read.py``), or ``_NOT_LOADED`` where it needs ``torch.load``."""
    try:
        return load_mapped(fd, proc_path, size)
    except Unsupported as e:
        logger.debug("%s: read by torch.load (%s)", proc_path, e)
        return _NOT_LOADED


def _unpickling_error(e: pickle.UnpicklingError, where: str, file: str) -> CheckpointError:
    """The error of an unpickling that failed: pickle refused (weights-only), or a broken file."""
    if "weights_only" in str(e) or "Weights only load failed" in str(e):
        return UnsafeObjectError(
            f"refusing to load {file} of {where}: it holds objects that need pickle (not executed). "
            f"Pass allow_pickle=True only for checkpoints you trust. Cause: {_weights_only_cause(e)}",
            path=where,
            key=None,
            type_name="pickle",
        )
    return CorruptCheckpointError(f"corrupt checkpoint {where}: cannot read {file}: {e}", path=where, file=file)


@paused_gc()  # the loaded state is many small objects: see gcpause.py
def load_torch_save(
    src: ObjectReader,
    template: Any,
    *,
    map_location: Any,
    allow_pickle: bool,
    where: str,
    file: str,
) -> tuple[Any, list[str]]:
    """Load a ``checkpoint_<rank>.pt`` file from the open ``src`` (local-only: see :func:`unpickle_rank_file`).

    With a template, every key is checked (presence, kind, dtype and shape)
    before a byte is copied into it: a load that fails leaves the template as
    it was.

    Raises:
        UnsafeObjectError: The file needs pickle and pickle is not allowed.
        CorruptCheckpointError: ``torch.load`` cannot read it, or it expands beyond the bounds.
        StateDictMismatchError: The template does not fit the checkpoint (template untouched).
    """
    loaded = unpickle_rank_file(
        src, map_location=map_location, allow_pickle=allow_pickle, mmap=template is not None, where=where, file=file
    )
    if template is None:
        return loaded, []
    clones: dict[int, torch.Tensor] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def tensor(src: torch.Tensor, target: torch.Tensor | None, key: str) -> torch.Tensor:
        if target is None:
            if id(src) not in clones:
                clones[id(src)] = src.clone()
            return clones[id(src)]
        check_fits(target, src.dtype, tuple(src.shape), key, where)
        copies.append((target, src))  # copied once every key has been checked
        return target

    result, missing, commit = merge(
        template, loaded, is_tensor=lambda v: isinstance(v, torch.Tensor), tensor=tensor, where=where
    )
    with torch.no_grad():
        for target, src in copies:
            target.copy_(src)
    commit()
    return result, missing
