"""Copy one committed checkpoint to another location (a manager's remote tier), committed there by its manifest last.

The copy goes through the two storage protocols (``storage/base.py``) and
nothing else, so any source and destination work (a local directory to an
object store in practice)::

    with open_checkpoint(src, storage_options) as snapshot:         # the committed generation, held open
        manifest bytes, parsed; the objects it lists (rank files, index objects) and their sizes
        dst already holds this very manifest?      -> done (an earlier attempt committed it)
        dst holds another checkpoint, not replace? -> CheckpointExistsError
        session = storage_for(dst).begin_save(rank=0, world_size=1, coordinator=True, ...)
        for each object: session.create(name), streamed in chunks, out.sync()
        session.commit(the same manifest bytes)    # the marker last: dst is committed whole or not at all
        session.close(discard=True)                # an unfinished copy leaves nothing committed

The copy verifies what a commit does, no more: every object the manifest
lists is copied whole (its size is the manifest's, read to its end), so an
incomplete copy is never committed. Checksums are not recomputed (``torchckpt
verify`` or a load checks them at the destination).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Mapping

from .errors import CheckpointExistsError, CorruptCheckpointError
from .format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, is_format_file
from .format.refs import RankRef, ref_location
from .reading import CheckpointSnapshot, GenerationReplaced, open_checkpoint, read_manifest
from .save_ids import new_save_id
from .storage.base import ObjectReader, ObjectWriter, SaveSession
from .storage.locate import storage_for

__all__ = ["COPY_CHUNK_BYTES", "checkpoint_objects", "copy_checkpoint", "copy_with_references", "referenced_checkpoints"]

logger = logging.getLogger(__name__)

#: Bytes read from the source and handed to the destination at a time.
COPY_CHUNK_BYTES = 8 << 20


def checkpoint_objects(manifest: Manifest, where: str) -> dict[str, int]:
    """The objects a manifest lists (rank files and index objects), each with its size in bytes.

    Raises:
        CorruptCheckpointError: One name is listed with two sizes.
    """
    found: dict[str, int] = {}
    listed = [(r.file, r.size_bytes) for r in manifest.ranks]
    listed += [(r.index.file, r.index.size_bytes) for r in manifest.ranks if r.index is not None]
    for name, size in listed:
        if found.setdefault(name, size) != size:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: {name} is listed with {found[name]} and {size} bytes",
                path=where, file=name,
            )  # fmt: skip
    return found


def copy_checkpoint(
    src: str | os.PathLike[str],
    dst: str,
    *,
    replace: bool,
    timeout_s: float = 600.0,
    chunk_bytes: int = COPY_CHUNK_BYTES,
    storage_options: Mapping[str, str] | None = None,
) -> int:
    """Copy the committed checkpoint at ``src`` to ``dst``, committing it there last; return the bytes copied.

    Args:
        src: The checkpoint to copy (a directory or a URL).
        dst: Where to copy it (a URL or a directory).
        replace: Replace another checkpoint at ``dst``; without it, one is refused.
            ``dst`` holding this very checkpoint (the same manifest) is done already.
        timeout_s: Longest wait for another save to ``dst`` (``begin_save``).
        chunk_bytes: Bytes read and written at a time.
        storage_options: The object store client's configuration keys (for a URL on either side).

    Raises:
        CheckpointNotFoundError: Nothing committed at ``src``.
        CorruptCheckpointError: An object of ``src`` is missing or of another size than its manifest says.
        CheckpointExistsError: Another checkpoint is at ``dst`` and not ``replace``.
        GenerationReplaced: ``src`` was replaced by another save during the copy (copy again).
        OSError: The destination failed (``CheckpointIOError`` naming the URL, operation and errno).
    """
    src = os.fspath(src)
    started = time.monotonic()
    with open_checkpoint(src, storage_options) as snapshot:
        manifest = snapshot.manifest()
        data = _marker_bytes(snapshot)
        objects = checkpoint_objects(manifest, src)
        if _holds(dst, data, replace, storage_options):
            logger.info("%s already holds the checkpoint %s", dst, src)
            return 0
        storage = storage_for(dst, storage_options)
        session = storage.begin_save(
            rank=0, world_size=1, coordinator=True, timeout_s=timeout_s, marker=MANIFEST_NAME, save_id=new_save_id()
        )
        try:
            copied = sum(_copy_object(snapshot, session, name, size, chunk_bytes) for name, size in objects.items())
            if snapshot.replaced():
                raise GenerationReplaced(src)  # the bytes may mix two generations: never commit them
            session.commit(data, owned=is_format_file)
        finally:
            session.close(discard=True)
    logger.info("copied %s to %s: %d bytes in %.3fs", src, dst, copied, time.monotonic() - started)
    return copied


def _marker_bytes(snapshot: CheckpointSnapshot) -> bytes:
    """The manifest's bytes, as committed (``snapshot.manifest()`` has validated them)."""
    src = snapshot.generation.open(MANIFEST_NAME)
    try:
        if src.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {snapshot.path}: manifest.json is {src.size} bytes", path=snapshot.path
            )
        return src.read(0, src.size)
    finally:
        src.close()


def _holds(dst: str, data: bytes, replace: bool, storage_options: Mapping[str, str] | None) -> bool:
    """Whether ``dst`` holds the manifest ``data`` already; refuse another checkpoint there unless ``replace``."""
    try:
        with open_checkpoint(dst, storage_options) as there:
            same = _marker_bytes(there) == data
    except FileNotFoundError:  # CheckpointNotFoundError too: nothing committed there
        return False
    except CorruptCheckpointError:
        same = False
    if same:
        return True
    if not replace:
        raise CheckpointExistsError(
            f"{dst} holds another checkpoint; it is replaced only by a save with overwrite=True", path=dst
        )
    return False


def _copy_object(snapshot: CheckpointSnapshot, session: SaveSession, name: str, size: int, chunk_bytes: int) -> int:
    """Stream the object ``name`` (``size`` bytes, as the manifest says) into the session; return its size."""
    try:
        src = snapshot.generation.open(name)
    except FileNotFoundError as e:
        if snapshot.replaced():
            raise GenerationReplaced(snapshot.path) from e
        raise CorruptCheckpointError(
            f"corrupt checkpoint {snapshot.path}: {name} listed in the manifest is missing",
            path=snapshot.path, file=name,
        ) from e  # fmt: skip
    try:
        if src.size != size:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {snapshot.path}: {name} is {src.size} bytes, the manifest says {size}",
                path=snapshot.path, file=name,
            )  # fmt: skip
        out = session.create(name)
        try:
            _stream(src, out, name, size, chunk_bytes, snapshot.path)
            out.sync()
        finally:
            out.close()
    finally:
        src.close()
    return size


def _stream(src: ObjectReader, out: ObjectWriter, name: str, size: int, chunk_bytes: int, where: str) -> None:
    """Copy ``size`` bytes from the reader ``src`` to the writer ``out``, a chunk at a time (one buffer, reused)."""
    buffer = memoryview(bytearray(max(1, min(chunk_bytes, size))))
    offset = 0
    while offset < size:
        want = min(buffer.nbytes, size - offset)
        got = src.read_into([buffer[:want]], offset)
        if got <= 0:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: {name} ended at byte {offset} of {size}", path=where, file=name
            )
        done = 0
        while done < got:  # a short write is returned as such: write the rest
            n = out.write_at([buffer[done:got]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"write {out.location}: no byte written at offset {offset + done}")
            done += n
        offset += got


def copy_with_references(
    src: str | os.PathLike[str],
    dst: str,
    *,
    replace: bool,
    chunk_bytes: int = COPY_CHUNK_BYTES,
    storage_options: Mapping[str, str] | None = None,
    copy: Callable[..., int] | None = None,
) -> int:
    """:func:`copy_checkpoint` (or ``copy``, called alike), after the checkpoints ``src`` refers to (an incremental save) are copied beside ``dst``.

    A step's references name sibling checkpoints (``../step_...``): each is
    copied to the same name beside ``dst`` first (itself after its own
    references; one already there with the same manifest is skipped), so
    the copy at ``dst`` is loadable on its own. Returns the bytes copied.

    Raises:
        CheckpointExistsError: Another checkpoint is at a referenced name beside ``dst``
            (never replaced: a step there may be referred to itself).
        CorruptCheckpointError: The references form a cycle.
        Exception: What :func:`copy_checkpoint` raises.
    """
    src = os.fspath(src)
    done: set[str] = set()
    copied = 0

    def visit(at: str, to: str, replace_there: bool, path: tuple[str, ...]) -> None:
        nonlocal copied
        for ref in referenced_checkpoints(read_manifest(at, storage_options)):
            there = ref_location(at, ref)
            if there in path:
                raise CorruptCheckpointError(f"corrupt checkpoint {src}: its references form a cycle at {there}", path=src)
            if there not in done:
                visit(there, ref_location(to, ref), False, (*path, there))
        copied += (copy or copy_checkpoint)(
            at, to, replace=replace_there, chunk_bytes=chunk_bytes, storage_options=storage_options
        )
        done.add(at)

    visit(src, dst, replace, (src,))
    return copied


def referenced_checkpoints(manifest: Manifest) -> list[RankRef]:
    """One reference per checkpoint the manifest's rank lines refer to (first seen first)."""
    seen: dict[str, RankRef] = {}
    for line in manifest.ranks:
        for ref in line.refs:
            seen.setdefault(ref.checkpoint, ref)
    return list(seen.values())
