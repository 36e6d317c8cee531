"""Writing a checkpoint: this rank's data, then one atomic commit.

A write goes (DESIGN.md §2):

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
import enum
import json
import logging
import os
import time
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch.distributed as dist

from .agreement import Agreement, run_collective
from .barriers import Barrier
from .errors import CheckpointIOError, ConfigError, CorruptCheckpointError
from .format.gcpause import paused_gc
from .format.manifest import CHUNK_BYTES, MANIFEST_NAME, RankEntry, build_manifest, is_format_file, parse_rank_entry
from .format.native import native_file_name, plan_rank_file, rank_entry, write_rank_file
from .format.torch_save import rank_file_name, save_torch_save
from .format.tree import MAX_DEPTH, STACK_FRAMES_NEEDED, check_saveable, deepest_key, flatten
from .keywords import WRITE_KEYWORDS, accepted_keywords, check_keywords, keywords_for
from .storage.base import SaveSession
from .storage.locate import storage_for
from .types import STATE_DICT, RankInfo
from .utils import call_with_stack

__all__ = ["CheckpointFormat", "CheckpointWriter", "CheckpointWriterConfig", "WriterHook", "check_metadata"]

logger = logging.getLogger(__name__)

#: Keyword argument by which the async path hands its figures (stall, staging) to the writer.
STATS_KWARG = "_torchckpt_stats"
#: Keyword argument by which the async path numbers its saves (a replaced writer keeps counting).
SAVE_NUMBER_KWARG = "_torchckpt_save_number"


class CheckpointFormat(str, enum.Enum):
    """The on-disk layout of a checkpoint's rank files."""

    #: ``checkpoint_<rank>.pt`` written by ``torch.save`` (what the reference writes).
    TORCH_SAVE = "torch_save"
    #: One safetensors file per rank, checksummed, with typed-JSON structure (native).
    SAFETENSORS = "safetensors"


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


@dataclass(frozen=True)
class CheckpointWriterConfig:
    """Options of :class:`CheckpointWriter`.

    Attributes:
        write_barrier_timeout_secs: Longest wait, in seconds, for the other ranks
            (and for another save holding the same path).
        format: Layout of the rank files: ``"torch_save"`` (default, what the
            reference writes) or ``"safetensors"`` (native: parallel, checksummed
            per tensor, partial loads read only what they need).
        allow_pickle: Store values that have no safe form with pickle instead of
            refusing them at save time. Loading them then needs ``allow_pickle`` too.
        io_threads: Threads writing one rank file in parallel (native format).
    """

    write_barrier_timeout_secs: int = 600
    # Positional as in the reference up to here; torchckpt's own options are keyword-only.
    _: KW_ONLY
    format: CheckpointFormat | str = CheckpointFormat.TORCH_SAVE
    allow_pickle: bool = False
    io_threads: int = 2

    def __post_init__(self) -> None:
        if self.write_barrier_timeout_secs <= 0:
            raise ConfigError(
                f"CheckpointWriterConfig.write_barrier_timeout_secs must be > 0, got {self.write_barrier_timeout_secs}",
                field="write_barrier_timeout_secs",
            )
        if self.format not in tuple(CheckpointFormat):
            raise ConfigError(
                f"CheckpointWriterConfig.format must be one of {[f.value for f in CheckpointFormat]}, "
                f"got {self.format!r}",
                field="format",
            )
        if self.io_threads < 1:
            raise ConfigError(f"CheckpointWriterConfig.io_threads must be >= 1, got {self.io_threads}", field="io_threads")


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

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        """Write ``state_dict`` as this rank's part of the checkpoint at ``path``.

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
        # Parts of a save recurse once per level of the state: run it where that fits.
        call_with_stack(STACK_FRAMES_NEEDED, self._write, path, state_dict, kwargs)

    def _write(self, path: str, state_dict: STATE_DICT, kwargs: dict[str, Any]) -> None:
        extra_stats = kwargs.pop(STATS_KWARG, None) or {}
        save_number = kwargs.pop(SAVE_NUMBER_KWARG, None)
        if save_number is None:
            save_number = self._saves
        self._saves = save_number + 1
        rank = self._rank_info.global_rank
        world = self._rank_info.global_world_size
        started = time.monotonic()
        path = os.fspath(path)
        logger.info("saving checkpoint %s (rank %d of %d)", path, rank, world)
        storage = storage_for(path)
        session: SaveSession | None = None
        store = self._store() if world > 1 else None
        stats: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        try:
            local_error: BaseException | None = None
            try:
                self.check_keywords(path, kwargs, warn_only=True)
                metadata = check_metadata(kwargs.get("metadata"), path)  # before a byte is written
                session = storage.begin_save(
                    rank=rank, world_size=world, coordinator=rank == 0,
                    timeout_s=self._config.write_barrier_timeout_secs, marker=MANIFEST_NAME,
                )  # fmt: skip
                entry, stats = self._write_rank(session, state_dict, kwargs.get("allow_pickle"))
                stats.update(extra_stats)
                if world > 1:
                    _write_entry_sidecar(session, entry)
                if self._commit_hook is not None:
                    self._commit_hook.pre_commit(path, **keywords_for(self._commit_hook.pre_commit, kwargs))
            except Exception as e:
                if store is None:
                    raise
                local_error = e  # the others must hear of it: go on to the agreement

            def do_commit() -> None:
                assert session is not None  # the coordinator commits only when every rank started
                entries = [entry] if world == 1 else _read_entry_sidecars(session, world, path)
                commit_started = time.monotonic()
                stats["file_bytes"] = sum(e.size_bytes for e in entries)
                with paused_gc():
                    manifest = build_manifest(
                        layout=str(CheckpointFormat(self._config.format).value),
                        ranks=entries,
                        chunk_bytes=CHUNK_BYTES,
                        metadata=metadata,
                        stats=stats,
                    )
                session.commit(manifest, owned=is_format_file)
                stats["commit_s"] = time.monotonic() - commit_started

            barrier = self._barrier.execute_barrier if self._barrier is not None else None
            if store is not None:
                agreement = Agreement(
                    store, rank=rank, world_size=world, path=path, save_number=save_number,
                    timeout_s=self._config.write_barrier_timeout_secs,
                )  # fmt: skip
                run_collective(agreement, local_error=local_error, barrier=barrier, commit=do_commit)
            else:
                if barrier is not None:
                    barrier()
                if rank == 0:
                    do_commit()
            if self._commit_hook is not None:
                self._commit_hook.post_commit(path, **keywords_for(self._commit_hook.post_commit, kwargs))
        finally:
            if session is not None:
                session.close(discard=world == 1)
        logger.info(
            "saved checkpoint %s (rank %d): %d bytes in %.3fs (stall %s, write %.3fs, fsync %.3fs, commit %s)",
            path, rank, stats.get("bytes", 0), time.monotonic() - started, _secs(stats.get("stall_s")),
            stats.get("write_s", 0.0), stats.get("fsync_s", 0.0), _secs(stats.get("commit_s")),
        )  # fmt: skip

    def check_keywords(self, path: str, kwargs: dict[str, Any], *, warn_only: bool = False) -> None:
        """Refuse (or, ``warn_only``, warn about) a keyword that neither torchckpt nor the commit hook takes.

        ``write`` itself only warns, as the reference's writer takes any keyword;
        ``SyncCheckpointer.save`` calls this first and raises (see ``keywords.py``).

        Raises:
            TypeError: An unknown keyword (named), unless ``warn_only``.
        """
        hook = type(self._commit_hook).__name__ if self._commit_hook is not None else None
        check_keywords(
            kwargs, call="save", path=path, known=WRITE_KEYWORDS, hook_keywords=self._hook_keywords, hook_name=hook,
            warn_only=warn_only,
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
        self, session: SaveSession, state_dict: STATE_DICT, allow_pickle: bool | None
    ) -> tuple[RankEntry, dict[str, Any]]:
        rank = self._rank_info.global_rank
        t0 = time.monotonic()
        native = CheckpointFormat(self._config.format) is CheckpointFormat.SAFETENSORS
        if allow_pickle is None:  # not given to this save: the config's
            allow_pickle = self._config.allow_pickle
        if native:
            flat = flatten(state_dict, allow_pickle=allow_pickle)
            plan = plan_rank_file(flat, rank=rank)
        else:  # torch.save writes it: only check that it is safe to (the same errors as flatten)
            nbytes, empty_bytes = check_saveable(state_dict, allow_pickle=allow_pickle)
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
                    tensors, header_crc = write_rank_file(out, plan, threads=self._config.io_threads)
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
            entry = rank_entry(rank, name, plan, flat.tree, tensors, header_crc)
            nbytes = entry.tensor_bytes
        else:
            entry = RankEntry(rank=rank, file=name, size_bytes=size, digest=digest)
        stats = {"bytes": nbytes, "plan_s": t1 - t0, "write_s": t2 - t1, "fsync_s": t3 - t2}
        return entry, stats

    def close(self) -> None:
        """Release resources (none are held between writes)."""
        logger.debug("closing checkpoint writer")


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


def _sidecar(rank: int) -> str:
    return f"rank_{rank:05d}.entry.json"


def _write_entry_sidecar(session: SaveSession, entry: RankEntry) -> None:
    session.put(_sidecar(entry.rank), json.dumps(entry.to_json()).encode())


def _read_entry_sidecars(session: SaveSession, world: int, path: str) -> list[RankEntry]:
    entries = []
    for r in range(world):
        name = _sidecar(r)
        file = os.path.join(session.location, name)
        try:
            doc = json.loads(session.get(name))
            entries.append(parse_rank_entry(doc, r, CHUNK_BYTES))
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(
                f"rank {r} reported no result for the checkpoint {path}: {e}", path=path, file=file
            ) from e
        session.delete(name)
    return entries
