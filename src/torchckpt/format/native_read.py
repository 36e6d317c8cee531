"""Reading native rank files: only the bytes the requested keys need, straight into tensors.

``read_native`` takes the rank file as an ``ObjectReader`` (any storage):
it checks size and header (``verification.py``), matches the template
against the manifest's tree (``select.merge``), then reads every tensor's
bytes in parallel straight into its target (``extent_read.read_extents``),
chunk checksums checked as the bytes arrive. A tensor the load creates (no
template tensor) on the CPU from a local file is instead a view of one
private mapping of the file (``mapped_read.FileMapping``), its chunks
checked over the mapped bytes before any template tensor is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..plan.dtensor import is_dtensor
from ..storage.base import ObjectReader
from .extents import ChecksumError, Extent
from .dtypes import dtype_from_name
from .extent_read import read_extents
from .gcpause import paused_gc
from .mapped_read import FileMapping
from .manifest import Manifest, RankEntry, TensorEntry
from .native import contiguous_bytes
from .select import check_fits, merge
from .sharded_read import ShardedLoads, one_chunk
from .tree import TensorRef, unflatten
from .verification import check_header, check_size, read_error

__all__ = ["read_native", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(saved: str, map_location: Any) -> torch.device:
    """The device a freshly loaded tensor goes to.

    ``map_location`` may be None (the saved device when this machine has it,
    else the CPU), a device or its name, or a dict mapping saved device names
    to new ones.
    """
    if isinstance(map_location, dict):
        map_location = map_location.get(saved, saved)
    if map_location is not None:
        return torch.device(map_location)
    device = torch.device(saved)
    if device.type == "cpu":
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        logger.warning("tensor saved on %s loads on the CPU: that device is not available here", saved)
        return torch.device("cpu")
    return device


@dataclass(frozen=True)
class ShardedRef:
    """A sharded tensor of the checkpoint not yet read: its index in the rank entry's ``sharded``."""

    index: int


class _Loads:
    """Collects which tensors to read and where to put them."""

    def __init__(
        self, entry: RankEntry, map_location: Any, where: str, sharded: ShardedLoads | None,
        map_source: ObjectReader | None = None,
    ) -> None:  # fmt: skip
        self.entry = entry
        self.sharded = sharded
        self.map_source = map_source  # the rank file, mapped on the first fresh CPU tensor (None: never)
        self.mapping: FileMapping | None = None
        self.map_location = map_location
        self.where = where
        self.fresh: dict[int, torch.Tensor] = {}
        self.targets: list[tuple[int, torch.Tensor]] = []
        self._seen: set[tuple[int, int]] = set()

    def info(self, index: int) -> tuple[TensorEntry, torch.dtype]:
        if not 0 <= index < len(self.entry.tensors):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.where}: tree refers to tensor {index} of {len(self.entry.tensors)}",
                path=self.where,
                file=self.entry.file,
            )
        e = self.entry.tensors[index]
        return e, dtype_from_name(e.dtype)

    def tensor(self, ref: TensorRef | ShardedRef, target: torch.Tensor | None, key: str) -> torch.Tensor:
        if isinstance(ref, ShardedRef) or is_dtensor(target):
            return self.global_tensor(ref, target, key)
        e, dtype = self.info(ref.index)
        if target is None:
            if ref.index not in self.fresh:
                device = resolve_device(e.device, self.map_location)
                # A tensor another checkpoint's file holds (``ref``) is read from there, never mapped from this one.
                mapped = self.mapped(e, dtype) if device.type == "cpu" and e.ref is None else None
                if mapped is not None:
                    self.fresh[ref.index] = mapped  # checked by FileMapping.verify, not read
                else:
                    self.fresh[ref.index] = torch.empty(e.shape, dtype=dtype, device=device)
                    self.targets.append((ref.index, self.fresh[ref.index]))
            return self.fresh[ref.index]
        check_fits(target, dtype, e.shape, key, self.where)
        mark = (ref.index, target.data_ptr() if target.numel() else id(target))
        if mark not in self._seen:
            self._seen.add(mark)
            self.targets.append((ref.index, target))
        return target


    def mapped(self, e: TensorEntry, dtype: torch.dtype) -> torch.Tensor | None:
        """A fresh CPU tensor viewing the mapped rank file (see ``mapped_read.py``), or None: allocate and read it."""
        if self.mapping is None and self.map_source is not None:
            self.mapping = FileMapping.open(self.map_source)
            self.map_source = None
        return self.mapping.tensor(e, dtype) if self.mapping is not None else None

    def global_tensor(self, ref: TensorRef | ShardedRef, target: torch.Tensor | None, key: str) -> torch.Tensor:
        """A sharded tensor, or a plain one loaded into a ``DTensor``: planned by :class:`ShardedLoads`."""
        if self.sharded is None:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.where}: key {key!r} refers to a sharded tensor but the load has no manifest",
                path=self.where, file=self.entry.file,
            )  # fmt: skip
        if isinstance(ref, TensorRef):
            e, _ = self.info(ref.index)
            if e.ref is not None:
                raise NotImplementedError(
                    f"cannot load key {key!r} of {self.where} into a DTensor: its bytes are another checkpoint's "
                    "(an incremental save); load it into a plain tensor"
                )
            return self.sharded.tensor(one_chunk(self.entry, ref.index), target, key)
        if not 0 <= ref.index < len(self.entry.sharded):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.where}: key {key!r}: tree refers to sharded tensor {ref.index} of "
                f"{len(self.entry.sharded)}",
                path=self.where, file="manifest.json", key=key,
            )  # fmt: skip
        name = self.entry.sharded[ref.index].name
        return self.sharded.tensor(self.sharded.manifest.sharded[name], target, key)


@paused_gc()  # the tree and the loaded state are many small objects: see gcpause.py
def read_native(
    src: ObjectReader,
    entry: RankEntry,
    template: Any,
    *,
    map_location: Any,
    verify: bool,
    allow_pickle: bool,
    where: str,
    threads: int,
    manifest: Manifest | None = None,
    open_rank: Callable[[RankEntry], ObjectReader] | None = None,
    entry_of: Callable[[int], RankEntry] | None = None,
    open_ref: Callable[[int], tuple[ObjectReader, str]] | None = None,
) -> tuple[Any, list[str], int]:
    """Load a rank's state from its open rank file ``src``.

    Sharded tensors (and plain ones loaded into ``DTensor`` templates) are read
    from whichever rank files hold the parts needed (``sharded_read.py``): that
    needs the ``manifest``, ``open_rank`` (opens a rank's file) and ``entry_of``
    (a rank's whole entry; default: the manifest's line). A tensor whose bytes
    another checkpoint holds (``ref``, an incremental save) is read from the
    file ``open_ref(k)`` opens (``CheckpointSnapshot.open_ref``).

    Every key of the template is checked against the manifest before any byte
    is read: a mismatch leaves the template untouched. The bytes of plain CPU
    contiguous template tensors are then read straight into them (no second
    copy), so corruption found while reading (a checksum) leaves those tensors
    partly overwritten: the error names them. Other template tensors and the
    template's plain values change only once every checksum has matched.

    Returns:
        The state dict, the missing keys, and the number of tensor bytes read.

    Raises:
        CorruptCheckpointError: Size, header or a checksum do not match (names the
            file, the key, and the template's keys that may have been overwritten).
        StateDictMismatchError: The template does not fit the checkpoint (template untouched).
    """
    check_size(src, entry, where)
    check_header(src, entry, where)
    try:
        source = unflatten(entry.tree, TensorRef, allow_pickle=allow_pickle, where=where, sharded=ShardedRef)
    except ValueError as e:
        raise CorruptCheckpointError(f"corrupt checkpoint {where}: {e}", path=where, file="manifest.json") from e
    sharded = None
    if manifest is not None and open_rank is not None:
        sharded = ShardedLoads(
            manifest, open_rank, entry_of=entry_of or (lambda r: manifest.ranks[r]), map_location=map_location,
            resolve_device=resolve_device, where=where,
        )  # fmt: skip
    loads = _Loads(entry, map_location, where, sharded, map_source=src)
    result, missing, commit = merge(
        template,
        source,
        is_tensor=lambda v: isinstance(v, (TensorRef, ShardedRef)),
        tensor=loads.tensor,
        where=where,
    )
    nbytes = _execute(src, loads, verify=verify, where=where, threads=threads, open_ref=open_ref)
    if sharded is not None:
        nbytes += sharded.execute(verify=verify, threads=threads)
    commit()
    return result, missing, nbytes


def _overwritten(keys: list[str], direct: list[bool], fresh: set[int], targets: list[tuple[int, torch.Tensor]]) -> str:
    """The sentence of a read error that says which template tensors the failed read may have changed."""
    names = [k for k, d, (_, t) in zip(keys, direct, targets) if d and id(t) not in fresh]
    if not names:
        return "the template is untouched"
    shown = ", ".join(repr(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (
        f"the template's tensors of keys {shown} may have been overwritten with partly read data "
        "(its other values are untouched); load them again from a good checkpoint"
    )


def _execute(
    src: ObjectReader,
    loads: _Loads,
    *,
    verify: bool,
    where: str,
    threads: int,
    open_ref: Callable[[int], tuple[ObjectReader, str]] | None = None,
) -> int:
    nbytes = 0
    if loads.mapping is not None:
        # First, so that a corrupt chunk there leaves the template's tensors untouched.
        made = loads.mapping.made
        if verify:
            try:
                loads.mapping.verify(threads)
            except ChecksumError as err:
                raise read_error(err, where, loads.entry.file, [e.name for e, _ in made], "the template is untouched") from err
        nbytes += sum(e.nbytes for e, _ in made)
    by_source: dict[int | None, list[tuple[int, torch.Tensor]]] = {}
    for index, target in loads.targets:
        by_source.setdefault(loads.entry.tensors[index].ref, []).append((index, target))
    if list(by_source) == [None]:
        return nbytes + _read_targets(
            src, loads, loads.targets, verify=verify, where=where, file=loads.entry.file, threads=threads
        )
    for k, targets in by_source.items():
        if k is None:
            nbytes += _read_targets(src, loads, targets, verify=verify, where=where, file=loads.entry.file, threads=threads)
            continue
        if open_ref is None:
            raise CorruptCheckpointError(
                f"corrupt checkpoint {where}: tensor {loads.entry.tensors[targets[0][0]].name!r} refers to another "
                "checkpoint, which this read cannot open",
                path=where, file=loads.entry.file,
            )  # fmt: skip
        ref_src, ref_where = open_ref(k)
        try:
            file = loads.entry.refs[k].file
            nbytes += _read_targets(ref_src, loads, targets, verify=verify, where=ref_where, file=file, threads=threads)
        finally:
            ref_src.close()
    return nbytes


def _read_targets(
    src: ObjectReader,
    loads: _Loads,
    targets: list[tuple[int, torch.Tensor]],
    *,
    verify: bool,
    where: str,
    file: str,
    threads: int,
) -> int:
    """Read ``targets`` (tensor index, target) from ``src``, the file ``file`` of the checkpoint ``where``."""
    extents: list[Extent] = []
    keys: list[str] = []
    direct_flags: list[bool] = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, target in targets:
        e = loads.entry.tensors[index]
        direct = target.is_cpu and target.is_contiguous() and not target.is_conj() and not target.is_neg()
        host = target if direct else torch.empty(e.shape, dtype=target.dtype)
        if not direct:
            copies.append((target, host))
        extents.append(Extent(e.offset, contiguous_bytes(host), list(e.crc32c) if verify else None))
        keys.append(e.name)
        direct_flags.append(direct)
    try:
        nbytes = read_extents(src, extents, threads=threads)
    except (ChecksumError, EOFError) as err:
        fresh = {id(t) for t in loads.fresh.values()}
        after = _overwritten(keys, direct_flags, fresh, targets)
        raise read_error(err, where, file, keys, after) from err
    for target, host in copies:
        with torch.no_grad():
            target.copy_(host)
    return nbytes
