"""Incremental saves: a tensor unchanged since the base checkpoint is not written again, only referred to.

The writer (``checkpoint_writer.py``) gets the base as the save keyword
``incremental_base`` (the manager passes its newest committed step; ``""``
records digests without a base). Call order, in the writer, on every rank::

    base = load_base(path, incremental_base, rank, world_size, options)  # the base's entry of this rank, or None
    plan = plan_references(flat, hosts, base, path)   # XXH3-128 of every tensor, in memory, one pass;
                                                      # unchanged ones -> TensorEntry with ``ref``
    ... the rank file holds only the others (``plan_rank_file(skip=plan.skip)``)
    check_refs_present(path, entry.refs, options)     # before the commit: the files referred to are still there

"Unchanged" means: same key, dtype, shape and byte count as the base's
tensor, and the same XXH3-128 of its bytes (the base's digest comes from its
manifest or index, already checked; no byte of the base is read). A
referenced tensor's entry names the file that physically holds the bytes
(a chain collapses: a base's own reference is copied, never stacked), with
the offset and checksums of the entry that wrote them. The format is in
``docs/format.md`` (*Incremental saves*); reading is ``reading.CheckpointSnapshot.open_ref``.
Chunks of sharded tensors (``DTensor``) are always written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from .format.dtypes import dtype_name
from .format.manifest import Layout, RankEntry, TensorEntry
from .format.native import contiguous_bytes
from .format.refs import RankRef, content_digest, ref_location, sibling_of
from .format.tree import Flattened
from .reading import open_checkpoint

__all__ = ["INCREMENTAL_KEYWORD", "Base", "References", "check_refs_present", "load_base", "plan_references"]

logger = logging.getLogger(__name__)

#: The save keyword naming the base checkpoint (a sibling of the saved path); "": digests only, no base.
INCREMENTAL_KEYWORD = "incremental_base"


@dataclass(frozen=True)
class Base:
    """The checkpoint a save compares with: its name in the root and this rank's entry in it."""

    name: str
    entry: RankEntry


@dataclass
class References:
    """What :func:`plan_references` decided for each tensor of a rank's table."""

    digests: list[str]
    #: Tensors not written (their bytes are in ``refs``), with their entries.
    referenced: dict[int, TensorEntry] = field(default_factory=dict)
    refs: tuple[RankRef, ...] = ()

    @property
    def skip(self) -> frozenset[int]:
        return frozenset(self.referenced)

    def entries(self, written: Sequence[TensorEntry]) -> list[TensorEntry]:
        """The tensor table: ``written`` (as ``write_rank_file`` returns it) with the references and digests."""
        return [
            self.referenced[i] if i in self.referenced else replace(e, xxh3=self.digests[i])
            for i, e in enumerate(written)
        ]


def _name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def load_base(
    path: str, base: str, rank: int, world_size: int, storage_options: Mapping[str, str] | None
) -> Base | None:
    """This rank's entry in the base checkpoint ``base``, or None when the save is a full one.

    A base that is missing, damaged, of the other layout or of another world
    size gives a full save (logged): never a guess.

    Raises:
        ConfigError: ``base`` is not a sibling of ``path`` (another root) or is ``path`` itself.
    """
    if not base:
        return None
    name = _name_of(base)
    try:
        ref = RankRef(sibling_of(name), "", 0, "")
    except ValueError:
        ref = None
    if ref is None or ref_location(path, ref).rstrip("/") != base.rstrip("/") or name == _name_of(path):
        raise ConfigError(
            f"incremental_base {base!r} of the save to {path} must be another checkpoint beside it (same root)",
            field=INCREMENTAL_KEYWORD,
        )
    try:
        with open_checkpoint(base, storage_options) as snapshot:
            manifest = snapshot.manifest()
            if manifest.layout != Layout.SAFETENSORS or manifest.world_size != world_size:
                logger.info(
                    "full save of %s: its base %s is %s of %d ranks", path, base, manifest.layout, manifest.world_size
                )
                return None
            return Base(name, snapshot.rank_entry(rank))
    except (CheckpointNotFoundError, CorruptCheckpointError) as e:
        logger.warning("full save of %s: its base %s cannot be used: %s", path, base, e)
        return None


def plan_references(flat: Flattened, hosts: Sequence[torch.Tensor], base: Base | None, path: str) -> References:
    """Digest every tensor (``hosts``: contiguous CPU, one pass over memory) and refer to the unchanged ones."""
    digests = [content_digest(contiguous_bytes(h)) for h in hosts]
    plan = References(digests)
    if base is None:
        return plan
    entry = base.entry
    own = RankRef(sibling_of(base.name), entry.file, entry.size_bytes, entry.digest)
    chunks = {c.tensor for s in flat.sharded for c in s.chunks}
    previous = {t.name: t for t in entry.tensors}
    refs: dict[RankRef, int] = {}
    me = _name_of(path)
    for i, (name, t, digest) in enumerate(zip(flat.names, flat.tensors, digests)):
        old = previous.get(name)
        if i in chunks or old is None or not old.xxh3 or old.xxh3 != digest or old.nbytes != hosts[i].nbytes:
            continue
        if old.dtype != dtype_name(t.dtype) or tuple(old.shape) != tuple(t.shape):
            continue
        where = own if old.ref is None else entry.refs[old.ref]
        if where.name == me:  # the base refers to the checkpoint being replaced: write it again
            continue
        k = refs.setdefault(where, len(refs))
        plan.referenced[i] = TensorEntry(
            name, old.dtype, old.shape, old.offset, old.nbytes, old.crc32c, str(t.device), digest, k
        )
    plan.refs = tuple(refs)
    return plan


def check_refs_present(path: str, refs: Sequence[RankRef], storage_options: Mapping[str, str] | None) -> None:
    """Before the commit: every file ``refs`` names is still committed, of the size and digest referred to.

    Raises:
        CheckpointError: One is gone or changed (the save commits nothing; names the file).
    """
    for name in dict.fromkeys(r.checkpoint for r in refs):
        where = ref_location(path, RankRef(name, "", 0, ""))
        try:
            with open_checkpoint(where, storage_options) as snapshot:
                lines = {line.file: line for line in snapshot.manifest().ranks}
        except (CheckpointNotFoundError, CorruptCheckpointError) as e:
            raise CheckpointError(
                f"cannot commit the incremental save {path}: its base {where} is no longer readable: {e}", path=path
            ) from e
        for r in refs:
            line = lines.get(r.file) if r.checkpoint == name else None
            if r.checkpoint == name and (line is None or (line.size_bytes, line.digest) != (r.size_bytes, r.digest)):
                raise CheckpointError(
                    f"cannot commit the incremental save {path}: {where}/{r.file}, which it refers to, "
                    "was deleted or replaced meanwhile",
                    path=path,
                )
