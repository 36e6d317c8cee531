"""Writing a checkpoint: this rank's data, then one atomic commit.

A write goes (DESIGN.md §2), in ``CheckpointWriter.write_staged`` (which
``write`` calls, and the writer subprocess calls with the flattened state that
staging made):

1. prepare  the hidden pending directory beside ``path`` (coordinator: lock, clean)
2. write    this rank's file (native: parallel positional writes with checksums), fsync
3. ``WriterHook.pre_commit(path, **kwargs)``
4. barrier  ``Barrier.execute_barrier()``, exactly once
5. commit   the coordinator (rank 0) writes ``manifest.json`` last and swaps the
            directory into place atomically
6. ``WriterHook.post_commit(path, **kwargs)``
"""

from __future__ import annotations

import abc
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from .agreement import Agreement, run_collective
from .barriers import Barrier
from .config import CheckpointFormat, CheckpointWriterConfig
from .errors import CheckpointIOError, ConfigError, StateDictMismatchError
from .format.gcpause import paused_gc
from .format.manifest import MANIFEST_NAME, RankEntry, is_format_file
from .format.fields import ManifestError
from .reports import commit_manifest, write_report
from .format.native import host_contiguous, native_file_name, plan_rank_file, rank_entry, write_rank_file
from .incremental import INCREMENTAL_KEYWORD, check_refs_present, load_base, plan_references
from .format.torch_save import rank_file_name, save_torch_save
from .format.tree import (
    MAX_DEPTH, STACK_FRAMES_NEEDED, Flattened, check_saveable, deepest_key, dtensor_needs_native, flatten, unflatten,
)  # fmt: skip
from .pipeline import StagedProgress
from .replicas import OtherRankFailed, ReplicaExchange, deduplicate, replica_digests
from .keywords import WRITE_KEYWORDS, accepted_keywords, check_keywords, keywords_for
from .shm import own_storage
from .storage.base import SaveSession
from .storage.locate import is_object_url, storage_for
from .save_ids import await_save_id, derived_save_id, new_save_id, publish_save_id
from .types import STATE_DICT, RankInfo
from .utils import call_with_stack

__all__ = ["CheckpointFormat", "CheckpointWriter", "CheckpointWriterConfig", "WriterHook", "check_metadata"]

logger = logging.getLogger(__name__)



class WriterHook(abc.ABC):
    """Callbacks around the commit of a checkpoint.

    Call order, on every rank, inside ``CheckpointWriter.write``: this rank's
    data is written and fsynced, then ``pre_commit``; then the barrier; then
    (rank 0) the manifest commit; then ``post_commit``. Both receive the
    ``path`` and the keyword arguments given to ``write``: a method with
    ``**kwargs`` gets all of them, one without gets those it names. ``write``
    refuses, before anything is written, a keyword that neither torchckpt
    (``metadata``, ``allow_pickle``) nor a hook method takes. An exception in
    ``pre_commit`` fails the save before anything is committed.
    Subclasses need not call ``super().__init__()``.
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after this rank's data is durable, before the commit."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the checkpoint is committed."""


@dataclass
class _Save:
    """One ``write`` as it goes through its steps."""

    path: str
    save_number: int
    #: Figures of the save, stored in the manifest (those measured before the write first).
    stats: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    entry: RankEntry | None = None
    #: This rank's part of the save in the storage, once it has begun.
    session: SaveSession | None = None
    #: The id every rank of this save gives the storage (object stores name the generation with it).
    save_id: str = ""
    #: A pipelined save's staging progress: tensors are written once staged (``pipeline.py``).
    progress: StagedProgress | None = None


class CheckpointWriter:
    """Writes this rank's part of a checkpoint and takes part in its commit.

    Args:
        config: Writer options.
        rank_info: This process's rank and the world size.
        barrier: Synchronises the ranks before the commit; its
            ``execute_barrier()`` is called exactly once per ``write``.
        commit_hook: Called before and after the commit.
    """

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        self._saves = 0
        #: The keywords the commit hook takes (None: any), checked before a save starts.
        self._hook_keywords = (
            frozenset() if commit_hook is None else accepted_keywords(commit_hook.pre_commit, commit_hook.post_commit)
        )

    @property
    def config(self) -> CheckpointWriterConfig:
        return self._config

    @property
    def rank_info(self) -> RankInfo:
        """The rank this writer writes for, and the world size."""
        return self._rank_info

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        """Write ``state_dict`` as this rank's part of the checkpoint at ``path``.

        The same as ``write_staged(path, state_dict, **kwargs)``: the writer numbers the save itself.

        Args:
            path: The checkpoint directory (created; an existing checkpoint there
                is replaced atomically).
            state_dict: The state to save.
            **kwargs: Passed to the commit hook's methods, each getting those it takes
                (all with ``**kwargs``). torchckpt acts on ``metadata`` (a JSON-serialisable
                dict stored in the manifest) and ``allow_pickle`` (this save's choice,
                overriding the config's). Any other keyword must be taken by the hook.

        Raises:
            UnsafeObjectError: A value cannot be saved without pickle, or the state nests
                containers more than ``MAX_DEPTH`` deep or contains itself (names the key).
            CheckpointIOError: A system call failed (names rank, operation, path, errno).
            TypeError: A keyword neither torchckpt nor the commit hook takes (named),
                before anything is written.
        """
        self.write_staged(path, state_dict, **kwargs)

    def write_staged(
        self,
        path: str,
        state: STATE_DICT | Flattened,
        *,
        save_number: int | None = None,
        stats: Mapping[str, float] | None = None,
        progress: StagedProgress | None = None,
        **kwargs: Any,
    ) -> None:
        """Write a state, or the flattened form staging made of it, as this rank's part of the checkpoint at ``path``.

        ``write`` calls it; the writer subprocess calls it directly with what
        ``DefaultStager.stage_flattened`` produced, so that the state is not
        walked again. Call order, on every rank (module docstring): prepare the
        pending directory, write and fsync this rank's file, ``pre_commit``, the
        barrier (exactly once), the commit (rank 0), ``post_commit``.

        Args:
            path: The checkpoint directory.
            state: A state dict, or a :class:`~torchckpt.format.tree.Flattened` whose tensors
                hold the state (its values stored with pickle are refused as ``flatten``
                refuses them unless this save allows pickle).
            save_number: This save's number, the same on every rank (the ranks agree on a
                save by it); None: the writer counts its own saves. A writer that replaces
                one that died is given the number by the process that numbers the saves.
            stats: Figures measured before the write (``stall_s``), stored with the
                checkpoint's figures in the manifest.
            progress: A pipelined save (the writer subprocess's): ``state``'s tensors are
                still being staged; each is written once its group is (a save that needs
                every byte first, such as an incremental one, waits for all of them).
            **kwargs: As for ``write``.

        Raises:
            UnsafeObjectError, CheckpointIOError, TypeError: As ``write``.
        """
        if save_number is None:
            save_number = self._saves
        self._saves = save_number + 1
        # Parts of a save recurse once per level of the state: run it where that fits.
        call_with_stack(
            STACK_FRAMES_NEEDED, self._write, _Save(os.fspath(path), save_number, dict(stats or {}), progress=progress),
            state, kwargs,
        )  # fmt: skip

    def _write(self, save: _Save, state: STATE_DICT | Flattened, kwargs: dict[str, Any]) -> None:
        rank = self._rank_info.global_rank
        world = self._rank_info.global_world_size
        started = time.monotonic()
        logger.info("saving checkpoint %s (rank %d of %d)", save.path, rank, world)
        store = self._store() if world > 1 else None
        if is_object_url(save.path) and rank == 0:  # first, so that no rank waits for it in vain
            if world == 1:
                save.save_id = new_save_id()
            elif store is not None:
                save.save_id = publish_save_id(store, self._agreement(save, store).prefix)
            else:
                save.save_id = derived_save_id(save.path, save.save_number)
        try:
            local_error = self._write_local(save, state, kwargs, collective=store is not None)
            self._agree_and_commit(save, store, local_error)
            if self._commit_hook is not None:
                self._commit_hook.post_commit(save.path, **keywords_for(self._commit_hook.post_commit, kwargs))
        finally:
            if save.session is not None:
                save.session.close(discard=world == 1)
        stats = save.stats
        logger.info(
            "saved checkpoint %s (rank %d): %d bytes in %.3fs (stall %s, write %.3fs, fsync %.3fs, commit %s)",
            save.path, rank, stats.get("bytes", 0), time.monotonic() - started, _secs(stats.get("stall_s")),
            stats.get("write_s", 0.0), stats.get("fsync_s", 0.0), _secs(stats.get("commit_s")),
        )  # fmt: skip

    def _write_local(
        self,
        save: _Save,
        state: STATE_DICT | Flattened,
        kwargs: dict[str, Any],
        *,
        collective: bool,
    ) -> Exception | None:
        """Steps 1-3 on this rank: check, prepare, write this rank's file, ``pre_commit``.

        Returns:
            This rank's error when the ranks agree through a store (the others must
            hear of it), else None (the error is raised).
        """
        rank = self._rank_info.global_rank
        dedup = self._deduplicates(collective)
        error: Exception | None = None
        try:
            self.check_keywords(save.path, kwargs, unknown="warn")
            save.metadata = check_metadata(kwargs.get("metadata"), save.path)  # before a byte is written
            self._check_incremental(save.path, kwargs.get(INCREMENTAL_KEYWORD))
            if save.progress is not None and (dedup or kwargs.get(INCREMENTAL_KEYWORD) is not None or not self._native):
                save.progress.wait_all()  # these read every byte before the first write
            if dedup:
                state = _flattened(state, allow_pickle=self._pickle(kwargs))
        except Exception as e:
            error = e
        if dedup:
            try:
                state = self._agree_on_replicas(save, state if error is None else None, error)
            except OtherRankFailed:
                if error is None:
                    return None  # this rank writes nothing; the agreement names the rank that failed
            except Exception as e:
                error = error or e
        if error is not None:
            if not collective:
                raise error
            return error
        try:
            timeout_s = self._config.write_barrier_timeout_secs
            if is_object_url(save.path) and rank != 0:
                save.save_id = self._shared_save_id(save)
            save.session = storage_for(save.path, self._config.storage_options).begin_save(
                rank=rank, world_size=self._rank_info.global_world_size, coordinator=rank == 0,
                timeout_s=timeout_s, marker=MANIFEST_NAME, save_id=save.save_id,
            )  # fmt: skip
            base = kwargs.get(INCREMENTAL_KEYWORD)
            save.entry, stats = self._write_rank(
                save.session, state, kwargs.get("allow_pickle"), save.path, base, save.progress
            )  # fmt: skip
            save.stats = {**stats, **save.stats}
            if save.entry.refs:  # before the barrier: what this rank refers to is still committed
                check_refs_present(save.path, save.entry.refs, self._config.storage_options)
            if self._rank_info.global_world_size > 1:
                write_report(save.session, save.entry)
            if self._commit_hook is not None:
                self._commit_hook.pre_commit(save.path, **keywords_for(self._commit_hook.pre_commit, kwargs))
        except Exception as e:
            if not collective:
                raise
            return e
        return None

    def _check_incremental(self, path: str, base: Any) -> None:
        """Refuse an ``incremental_base`` that is not a path, or given to the ``torch_save`` layout.

        Raises:
            ConfigError: Either (names the field).
        """
        if base is None:
            return
        if not isinstance(base, str):
            raise ConfigError(
                f"incremental_base of the save to {path} must be a checkpoint path, got {base!r}", field=INCREMENTAL_KEYWORD
            )
        if CheckpointFormat(self._config.format) is not CheckpointFormat.SAFETENSORS:
            raise ConfigError(
                f"incremental saves need the safetensors layout: the save to {path} is torch_save", field=INCREMENTAL_KEYWORD
            )

    def _shared_save_id(self, save: _Save) -> str:
        """The id rank 0 published for this save (through the store), or one all ranks derive alike without one."""
        store = self._store()
        if store is None:
            return derived_save_id(save.path, save.save_number)
        prefix = self._agreement(save, store).prefix
        return await_save_id(store, prefix, timeout_s=self._config.write_barrier_timeout_secs, path=save.path)

    def _pickle(self, kwargs: Mapping[str, Any]) -> bool:
        flag = kwargs.get("allow_pickle")
        return self._config.allow_pickle if flag is None else bool(flag)

    @property
    def _native(self) -> bool:
        """Whether rank files are native (safetensors) files, not ``torch_save`` ones."""
        return CheckpointFormat(self._config.format) is CheckpointFormat.SAFETENSORS

    def _deduplicates(self, collective: bool) -> bool:
        """Whether this save writes replicated plain tensors once (``replicas.py``)."""
        return self._config.dedup_replicated and collective and self._native

    def _agreement(self, save: _Save, store: Any) -> Agreement:
        return Agreement(
            store, rank=self._rank_info.global_rank, world_size=self._rank_info.global_world_size, path=save.path,
            save_number=save.save_number, timeout_s=self._config.write_barrier_timeout_secs,
        )  # fmt: skip

    def _agree_on_replicas(self, save: _Save, flat: Any, error: BaseException | None) -> Flattened:
        """Step 1b (``dedup_replicated``): agree on the replicated tensors, then keep only those this rank writes.

        Args:
            save: This save.
            flat: This rank's flattened state (None when ``error``).
            error: This rank's error so far, published so that no rank waits for it.

        Raises:
            OtherRankFailed: A rank (this one included, when ``error``) failed first.
            TimeoutError: A rank did not publish in time.
        """
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        store = self._store()
        exchange = ReplicaExchange(
            store, prefix=self._agreement(save, store).prefix, rank=rank, world_size=world,
            timeout_s=self._config.write_barrier_timeout_secs,
        )  # fmt: skip
        agreed = exchange.agree(replica_digests(flat) if flat is not None else None, error)
        return deduplicate(flat, agreed, rank=rank, world_size=world)

    def _agree_and_commit(
        self, save: _Save, store: Any, local_error: Exception | None
    ) -> None:
        """Steps 4-5: the barrier and every rank's agreement, then the coordinator's commit."""
        rank = self._rank_info.global_rank
        barrier = self._barrier.execute_barrier if self._barrier is not None else None

        def do_commit() -> None:
            self._commit(save)

        if store is not None:
            agreement = self._agreement(save, store)
            run_collective(agreement, local_error=local_error, barrier=barrier, commit=do_commit)
        else:
            if barrier is not None:
                barrier()
            if rank == 0:
                do_commit()

    def _commit(self, save: _Save) -> None:
        """Step 5, on the coordinator: the manifest of every rank's entry, committed."""
        commit_started = time.monotonic()
        try:
            manifest = commit_manifest(
                self._session_of(save), self._rank_info.global_world_size, save.path, own=save.entry,
                layout=str(CheckpointFormat(self._config.format).value), metadata=save.metadata, stats=save.stats,
            )  # fmt: skip
        except ManifestError as e:
            raise StateDictMismatchError(
                f"cannot commit the checkpoint {save.path}: the ranks' states do not fit together: {e}",
                path=save.path, key=e.key,
            ) from None  # fmt: skip
        self._session_of(save).commit(manifest, owned=is_format_file)
        save.stats["commit_s"] = time.monotonic() - commit_started

    @staticmethod
    def _session_of(save: _Save) -> SaveSession:
        if save.session is None:  # the coordinator commits only once every rank has begun
            raise RuntimeError(f"the save of {save.path} has no storage session to commit")
        return save.session

    def check_keywords(
        self, path: str, kwargs: dict[str, Any], *, unknown: str = "raise", refuse_near_misses: bool = False
    ) -> None:
        """Refuse, warn about or ignore a keyword that neither torchckpt nor the commit hook takes.

        ``write`` itself only warns, as the reference's writer takes any keyword;
        ``SyncCheckpointer.save`` calls this first and refuses near misses (see ``keywords.py``).

        Raises:
            TypeError: An unknown keyword (named), as ``unknown`` and
                ``refuse_near_misses`` say (see ``keywords.check_keywords``).
        """
        hook = type(self._commit_hook).__name__ if self._commit_hook is not None else None
        check_keywords(
            kwargs, call="save", path=path, known=WRITE_KEYWORDS, hook_keywords=self._hook_keywords, hook_name=hook,
            unknown=unknown, refuse_near_misses=refuse_near_misses,
        )  # fmt: skip

    def _store(self) -> Any:
        """The key-value store the ranks agree through: the barrier's, else the process group's."""
        store = getattr(self._barrier, "store", None)
        if isinstance(store, dist.Store):
            return store
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
        return None

    @paused_gc()  # many small objects per entry: see format/gcpause.py
    def _write_rank(
        self,
        session: SaveSession,
        state_dict: STATE_DICT | Flattened,
        allow_pickle: bool | None,
        path: str = "",
        incremental_base: str | None = None,
        progress: StagedProgress | None = None,
    ) -> tuple[RankEntry, dict[str, Any]]:
        rank = self._rank_info.global_rank
        t0 = time.monotonic()
        native = self._native
        if allow_pickle is None:  # not given to this save: the config's
            allow_pickle = self._config.allow_pickle
        references = None
        if native:
            flat = _flattened(state_dict, allow_pickle=allow_pickle)
            hosts = [host_contiguous(t) for t in flat.tensors]
            if incremental_base is not None:  # digests of every tensor, and references to the unchanged ones
                world = self._rank_info.global_world_size
                base = load_base(path, incremental_base, rank, world, self._config.storage_options)
                references = plan_references(flat, hosts, base, path)
            skip = references.skip if references is not None else frozenset()
            plan = plan_rank_file(flat, rank=rank, hosts=hosts, skip=skip)
        else:  # torch.save writes it: only check that it is safe to (the same errors as flatten)
            state_dict, nbytes, empty_bytes = _for_torch_save(state_dict, allow_pickle=allow_pickle)
            plan = None
        name = native_file_name(rank) if native else rank_file_name(rank)
        file_path = os.path.join(session.location, name)
        t1 = time.monotonic()
        op = "open"
        try:
            out = session.create(name)
            try:
                op = "write"
                if plan is not None:
                    tensors, header_crc = write_rank_file(out, plan, threads=self._config.io_threads, ready=progress)
                else:
                    size, digest = save_torch_save(out, state_dict, empty_bytes=empty_bytes)
                t2 = time.monotonic()
                op = "fsync"
                out.sync()
            finally:
                out.close()
        except OSError as e:
            raise CheckpointIOError(
                f"rank {rank}: {op} failed for {file_path}: {e.strerror or e}",
                errno=e.errno,
                path=file_path,
                rank=rank,
                operation=op,
            ) from e
        t3 = time.monotonic()
        if plan is not None:
            refs = ()
            if references is not None:
                tensors, refs = references.entries(tensors), references.refs
            entry = rank_entry(rank, name, plan, flat.tree, tensors, header_crc, flat.sharded, refs)
            nbytes = entry.tensor_bytes
        else:
            entry = RankEntry(rank=rank, file=name, size_bytes=size, digest=digest)
        stats = {"bytes": nbytes, "plan_s": t1 - t0, "write_s": t2 - t1, "fsync_s": t3 - t2}
        if references is not None:
            stats["referenced_bytes"] = sum(t.nbytes for t in references.referenced.values())
        if progress is not None:
            stats.update(progress.stats)  # the stall, known once staging has ended
        return entry, stats

    def close(self) -> None:
        """Release resources (none are held between writes)."""
        logger.debug("closing checkpoint writer")


def _flattened(state: STATE_DICT | Flattened, *, allow_pickle: bool) -> Flattened:
    """``state`` flattened (a state dict) or checked (a :class:`Flattened` already).

    Raises:
        UnsafeObjectError: As :func:`~torchckpt.format.tree.flatten` does.
    """
    if not isinstance(state, Flattened):
        return flatten(state, allow_pickle=allow_pickle)
    if not allow_pickle:
        state.refuse_pickled()
    return state


def _for_torch_save(state: STATE_DICT | Flattened, *, allow_pickle: bool) -> tuple[STATE_DICT, int, bool]:
    """What ``torch.save`` writes for ``state``, checked as :func:`~torchckpt.format.tree.check_saveable` checks it.

    A :class:`Flattened` (staged) state is rebuilt as a state dict whose
    tensors have storages of their own (:func:`torchckpt.shm.own_storage`).

    Returns:
        The state dict, the bytes of its distinct tensors, and whether it holds an empty ``bytes``.

    Raises:
        UnsafeObjectError: As :func:`~torchckpt.format.tree.flatten` does.
    """
    if not isinstance(state, Flattened):
        nbytes, empty_bytes = check_saveable(state, allow_pickle=allow_pickle)
        return state, nbytes, empty_bytes
    if not allow_pickle:
        state.refuse_pickled()
    if state.sharded:
        raise dtensor_needs_native(state.sharded[0].name)
    tensors = [own_storage(t) for t in state.tensors]
    state_dict = unflatten(state.tree, tensors.__getitem__, allow_pickle=True)
    return state_dict, sum(t.numel() * t.element_size() for t in tensors), state.empty_bytes


def _secs(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}s"


def check_metadata(metadata: Any, path: str) -> dict[str, Any]:
    """The ``metadata`` keyword of a save, checked to be storable in the manifest (plain, finite JSON).

    Raises:
        ConfigError: It nests too deep, is not JSON (NaN and infinities included) or not a dict.
    """
    if metadata is None:
        return {}
    too_deep = deepest_key(metadata)  # first: bounded even for a cycle, where JSON would recurse
    if too_deep is not None:
        raise ConfigError(
            f"metadata of the checkpoint {path} nests containers more than {MAX_DEPTH} deep at key {too_deep!r}",
            field="metadata",
        )
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metadata of the checkpoint {path} must be JSON-serialisable: {e}", field="metadata") from e
    if not isinstance(metadata, dict):
        raise ConfigError(f"metadata of the checkpoint {path} must be a dict, got {type(metadata).__name__}")
    return metadata
