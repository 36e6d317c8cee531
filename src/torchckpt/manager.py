"""CheckpointManager: numbered steps under one directory, retention, resume from the latest.

::

    mgr = CheckpointManager("/ckpt", keep=[KeepLast(3)])
    handle = mgr.save(step, {"model": model, "optim": opt, "step": step}, metrics={"loss": loss})
    ...
    step, state = mgr.load({"model": model, "optim": opt})   # newest good step, restored in place

The root may be a local directory or an object store URL (``s3://``,
``gs://``, ``az://``; ``memory://`` for sync saves)::

    mgr = CheckpointManager("s3://bucket/run", keep=[KeepLast(3)])

and a local root may have a remote tier that every committed step is
copied to in the background (:mod:`.tier`)::

    mgr = CheckpointManager("/local/ckpt", remote="s3://bucket/run", keep=[KeepLast(3)])

The manager is a facade; each concern has its own module:

- :mod:`.step_store`: where the steps live (a directory or an object store
  prefix): which are committed, deleting one; :mod:`.step_dirs` is the
  directory layout (``<root>/step_<step:010d>``), leftovers;
- :mod:`.tier`: the remote tier (:mod:`.step_upload` uploads, :mod:`.step_copy` copies a step);
- :mod:`.step_metadata`: the step, metrics and user metadata in the manifest;
- :mod:`.retention`: which steps to keep; the manager adds its guards (the
  newest step, a step being saved or loaded);
- :mod:`.load_fallback`: which step a load takes (the newest that loads);
- :mod:`.stateful`: modules, optimizers... to and from state dicts;
- :mod:`.save_handle`: the outcome of a save;
- :mod:`.preemption`: exiting on a termination signal;
- a :class:`.Checkpointer` (sync or async) does every read and write.

Only committed checkpoints (with a valid manifest whose step matches the
name) count; hidden leftovers of crashed saves are ignored and cleaned.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_writer import CheckpointWriterConfig
from .checkpointer import AsyncCheckpointer, Checkpointer
from .config import CheckpointerConfig
from .errors import CheckpointError, CheckpointExistsError, ConfigError, UploadError
from .incremental import INCREMENTAL_KEYWORD
from .load_fallback import load_newest, load_step
from .preemption import PreemptionHandler
from .retention import CheckpointInfo, RetentionPolicy, doomed
from .save_handle import SaveHandle
from .stateful import load_template, restore_objects, to_state_dict
from .step_metadata import step_metadata
from .step_store import delete_steps, open_step_store
from .step_upload import UploadConfig
from .storage.object_client import OBJECT_SCHEMES, is_object_url, parse_object_url
from .tier import LOCAL, RemoteTier
from .types import RankInfo
from .utils import close_on_exit

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointManager:
    """Saves numbered steps under ``root``, keeps what the retention policies say, restores the latest.

    Args:
        root: Directory holding one checkpoint directory per step, or an object store
            URL (``s3://bucket/run``; ``memory://`` with ``async_save=False`` only).
        keep: Retention policies (a step survives if any keeps it); None keeps everything.
            With ``remote``, applied to each tier on its own.
        async_save: Save in the background (``save`` returns at once).
        format: ``"safetensors"`` (native, default) or ``"torch_save"``.
        checkpointer: Use this checkpointer instead of building one.
        rank_info: This process's rank (default: from the process group, else 0 of 1).
        dedup_replicated: Write a plain tensor that every rank holds with the same
            bytes once (``CheckpointWriterConfig.dedup_replicated``); None (default):
            on when there are several ranks. Ignored with ``checkpointer``.
        remote: A remote tier (an object store URL, or another directory): every step
            committed under ``root`` is copied there in the background (:mod:`.tier`).
        upload: How the uploads to ``remote`` go (retries, bounds, timeouts).
        storage_options: The object store client's configuration keys (``endpoint``, ``region``, ...)
            for an object store ``root`` or ``remote``, on top of the environment; with
            ``checkpointer=``, that checkpointer's own config says what its saves and loads use.
        incremental: A tensor whose bytes are the same as in the newest committed step is not
            written again: the new step refers to the file that holds them (:mod:`.incremental`;
            decided by a 128-bit digest of the bytes in memory). Off by default: retention then
            keeps an older step as long as a kept step refers to it, so the disk holds more steps
            than ``keep`` says. Native layout only.

    Raises:
        ConfigError: ``memory://`` root with async saves; ``remote`` is ``root``; ``upload`` without ``remote``;
            ``incremental`` with ``format="torch_save"``.
        UnsupportedURLError: ``root`` or ``remote`` is a URL of a storage torchckpt does not have.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: RetentionPolicy | Sequence[RetentionPolicy] | None = None,
        async_save: bool = True,
        format: str = "safetensors",
        checkpointer: Checkpointer | None = None,
        rank_info: RankInfo | None = None,
        dedup_replicated: bool | None = None,
        remote: str | os.PathLike[str] | None = None,
        upload: UploadConfig | None = None,
        storage_options: Mapping[str, str] | None = None,
        incremental: bool = False,
    ) -> None:
        if incremental and format != "safetensors" and checkpointer is None:
            raise ConfigError(
                f"incremental=True needs the safetensors layout (format={format!r} writes whole files)",
                field="incremental",
            )
        self._incremental = incremental
        self._steps = open_step_store(root, storage_options)
        self.root = self._steps.root
        self._policies: list[RetentionPolicy] = (
            [] if keep is None else [keep] if hasattr(keep, "should_preserve") else list(keep)  # type: ignore[arg-type]
        )
        self._async = async_save
        # Everything refused is refused before a writer subprocess is started.
        in_subprocess = async_save if checkpointer is None else isinstance(checkpointer, AsyncCheckpointer)
        _refuse_memory_root(self.root, in_subprocess)
        if upload is not None and remote is None:
            raise ConfigError("upload= configures the uploads to a remote tier: pass remote= too", field="upload")
        self._tier = (
            None if remote is None else RemoteTier(self._steps, remote, upload, self._after_upload, storage_options)
        )
        if checkpointer is None:
            if dedup_replicated is None:
                dedup_replicated = (rank_info.global_world_size if rank_info is not None else _world_size()) > 1
            writer_config = CheckpointWriterConfig(
                format=format, dedup_replicated=dedup_replicated, storage_options=storage_options
            )
            config = CheckpointerConfig(writer_config=writer_config)
            checkpointer = (
                make_async_checkpointer(config, rank_info) if async_save else make_sync_checkpointer(config, rank_info)
            )
        self._ckpt = checkpointer
        self._rank = rank_info.global_rank if rank_info is not None else _current_rank()
        self._inflight: SaveHandle | None = None
        self._saving: int | None = None  # the step save() is busy with
        self._loading: set[int] = set()
        self._lock = threading.RLock()
        self._retention_lock = threading.Lock()  # the save path and the upload thread both apply retention
        self._closed = False
        self._preemption = PreemptionHandler(lambda: self._inflight, self._kill_writer)
        self._steps.prepare(coordinator=self._rank == 0)
        if self._tier is not None:
            self._tier.store.prepare(coordinator=self._rank == 0)
            if self._rank == 0:
                self._tier.catch_up([c.step for c in self._infos()])

    @property
    def checkpointer(self) -> Checkpointer:
        """The checkpointer every save and load of this manager goes through."""
        return self._ckpt

    # -- naming and listing ---------------------------------------------

    def path(self, step: int) -> str:
        """The directory (or URL) of ``step`` under ``root``."""
        return self._steps.path(step)

    @property
    def remote(self) -> str | None:
        """The remote tier's root, or None."""
        return None if self._tier is None else self._tier.root

    def _infos(self) -> list[CheckpointInfo]:
        return self._steps.committed()

    def steps(self) -> list[int]:
        """Committed steps, ascending (with a remote tier: those either tier holds)."""
        local = [c.step for c in self._infos()]
        return local if self._tier is None else list(self._tier.locations(local))

    def step_locations(self) -> dict[int, tuple[str, ...]]:
        """``{step: ("local",), ("remote",) or ("local", "remote")}`` of every committed step, ascending."""
        local = [c.step for c in self._infos()]
        return {s: (LOCAL,) for s in local} if self._tier is None else self._tier.locations(local)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ---------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        metrics: dict[str, Any] | None = None,
        metadata: Any = None,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Save ``state`` as ``step``.

        Values with ``state_dict()`` (modules, optimizers, schedulers...) are
        saved through it; other values as they are. Everything that can be
        refused (the step, the metrics, the metadata) is checked before the
        state is asked for, staged or written.

        Args:
            step: The step number (names the directory).
            state: What to save.
            metrics: ``{name: int or float}`` for ``KeepBest`` and ``torchckpt ls``,
                stored in the manifest; ``nan`` and ``inf`` are stored too
                (retention policies skip ``nan``).
            metadata: Plain JSON user metadata (stored in the manifest).
            overwrite: Replace ``step`` if it already exists (or, once that save
                is done, if it is being saved).

        Returns:
            A handle; for an async save it completes when the checkpoint is durable
            (locally; with a remote tier, the upload is queued then: see ``wait_for_uploads``).

        Raises:
            CheckpointExistsError: ``step`` exists or is being saved, and not ``overwrite``
                (a ``FileExistsError``).
            ConfigError: A metric or the metadata cannot be stored (names it).
            CheckpointIOError: With a remote tier, ``UploadConfig.max_pending`` uploads were
                still pending after ``UploadConfig.room_timeout_s`` (errno ETIMEDOUT).
        """
        if self._closed:
            raise CheckpointError("CheckpointManager is closed", path=self.root)
        path = self.path(step)
        md = step_metadata(step, metrics, metadata, f"cannot save step {step} under {self.root}")
        with self._lock:
            self._refuse_existing(step, path, overwrite)
            save_kwargs: dict[str, Any] = {"metadata": md}
            if self._incremental:
                save_kwargs[INCREMENTAL_KEYWORD] = self._base_for(step)
            if self._tier is not None:
                self._tier.wait_for_room(step)
            self._saving = step  # the upload thread's retention leaves it alone until its handle does
            try:
                state_dict = to_state_dict(state)
                if not self._async:
                    return self._save_sync(step, path, state_dict, save_kwargs, overwrite)
                return self._save_async(step, path, state_dict, save_kwargs, overwrite)
            finally:
                self._saving = None

    def _refuse_existing(self, step: int, path: str, overwrite: bool) -> None:
        """Refuse a step being saved or saved already (unless ``overwrite``); wait for the in-flight save."""
        inflight = self._inflight
        if not overwrite and inflight is not None and inflight.step == step and not inflight.done():
            raise CheckpointExistsError(
                f"step {step} is already being saved under {self.root} ({path}); "
                "pass overwrite=True to replace it once that save is done",
                path=path,
            )
        if inflight is not None:
            inflight.raise_if_unseen()  # one save at a time, in order; an error nobody has seen is raised here
        # A link at a step's name is no step: the writer refuses it as a link (never followed).
        if not overwrite and self._steps.occupied(step):
            raise CheckpointExistsError(
                f"step {step} already exists under {self.root} ({path}); pass overwrite=True to replace it",
                path=path,
            )
        if overwrite and self._steps.occupied(step):
            self._refuse_referenced(step, path)

    def _base_for(self, step: int) -> str:
        """The base of an incremental save of ``step``: the newest committed step but ``step`` ("" when none)."""
        others = [c for c in self._infos() if c.step != step]
        return others[-1].path if others else ""

    def _refuse_referenced(self, step: int, path: str) -> None:
        """An overwrite must not replace a step whose files other committed steps refer to.

        Raises:
            CheckpointExistsError: Steps refer to ``step`` (named).
        """
        infos = self._infos()
        name = next((c.name for c in infos if c.step == step), None)
        users = [c.step for c in infos if name is not None and name in c.refs]
        if users:
            raise CheckpointExistsError(
                f"step {step} under {self.root} ({path}) cannot be replaced: steps {users} refer to its files "
                "(incremental saves); save another step instead",
                path=path,
            )

    def _save_sync(
        self, step: int, path: str, state_dict: Any, save_kwargs: dict[str, Any], overwrite: bool
    ) -> SaveHandle:
        with self._preemption.deferring():  # a signal during the save: exit at its end, committed or not
            self._ckpt.save(path, state_dict, **save_kwargs)
            handle = SaveHandle(step, path, None)
            self._inflight = handle
            self._after_commit(step, overwrite)
        return handle

    def _save_async(
        self, step: int, path: str, state_dict: Any, save_kwargs: dict[str, Any], overwrite: bool
    ) -> SaveHandle:
        result = self._ckpt.save(path, state_dict, **save_kwargs)
        assert result is not None
        stage_future, write_future = result
        stage_future.result()  # the state may change once staged
        done: Future[None] = Future()

        def on_written(f: Future[Any]) -> None:
            error = f.exception()
            if error is None:
                try:
                    self._after_commit(step, overwrite)
                except Exception as e:  # noqa: BLE001 - retention never fails a save
                    logger.warning("retention after step %d failed: %s", step, e)
                done.set_result(None)
            else:
                done.set_exception(error)

        write_future.add_done_callback(on_written)
        handle = SaveHandle(step, path, done)
        self._inflight = handle
        return handle

    def wait(self) -> None:
        """Wait for the in-flight save; raise its error unless its handle already gave it to the caller."""
        handle = self._inflight
        if handle is not None:
            handle.raise_if_unseen()

    def _after_commit(self, step: int, overwrite: bool) -> None:
        if self._rank == 0:
            if self._tier is not None:
                self._tier.upload(step, replace=overwrite)  # first: retention keeps what waits for its upload
            self.apply_retention(protect={step})

    def _after_upload(self, step: int, uploaded: bool) -> None:
        """The upload thread, after ``step``'s upload ended: retention of the remote, then of the local steps."""
        if self._tier is None:
            return
        if uploaded:
            with self._retention_lock:
                self._tier.apply_retention(self._policies, self._guarded(set()))
        self.apply_retention()  # the step no longer waits for its upload

    def _guarded(self, protect: set[int]) -> set[int]:
        """Steps retention leaves alone now: ``protect``, those being loaded, the save in flight."""
        guarded = set(protect) | set(self._loading)
        saving, inflight = self._saving, self._inflight
        if saving is not None:
            guarded.add(saving)
        if inflight is not None and not inflight.done():
            guarded.add(inflight.step)
        return guarded

    def apply_retention(self, *, protect: set[int] | None = None, dry_run: bool = False) -> list[int]:
        """Delete the (local) committed steps no policy keeps; return them.

        Never deletes the newest committed step, a step being written or loaded,
        a step whose upload to the remote tier is queued or running, or a step in
        ``protect``. A failed delete is logged and retried next time.
        """
        with self._retention_lock:
            guarded = self._guarded(set(protect or ()))
            if self._tier is not None:
                guarded |= self._tier.uploader.pending()
            to_delete = doomed(self._policies, self._infos(), guarded)
            if dry_run:
                return [c.step for c in to_delete]
            deleted = delete_steps(self._steps, to_delete, tier="local", log=logger)
        if deleted:
            logger.info("retention deleted steps %s under %s", deleted, self.root)
        return deleted

    # -- the remote tier --------------------------------------------------

    @property
    def upload_errors(self) -> dict[int, UploadError]:
        """The uploads to the remote tier that failed and have not succeeded since, by step."""
        return {} if self._tier is None else self._tier.uploader.errors

    def pending_uploads(self) -> list[int]:
        """The steps whose upload to the remote tier is queued or running."""
        return [] if self._tier is None else sorted(self._tier.uploader.pending())

    def wait_for_uploads(self, timeout_s: float | None = None) -> None:
        """Wait until no upload to the remote tier is queued or running; raise the failures not raised before.

        Args:
            timeout_s: The longest wait (None: ``UploadConfig.close_timeout_s``).

        Raises:
            UploadError: An upload failed after its retries (names the step and its URL; each
                failure is raised once, here or by ``close``), or errno ETIMEDOUT: uploads are
                still pending after ``timeout_s``.
        """
        if self._tier is not None:
            self._tier.wait(timeout_s)

    def retry_uploads(self) -> list[int]:
        """Queue again the failed uploads whose local step is still there; return those steps."""
        return [] if self._tier is None else self._tier.retry()

    # -- loading --------------------------------------------------------

    def load(
        self,
        state: dict[str, Any] | None = None,
        *,
        step: int | None = None,
        strict: bool = False,
        fallback: bool = True,
        map_location: Any = None,
        rank: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Load a step (default: the newest committed one) and restore ``state`` from it.

        Modules are filled in place; other values with ``load_state_dict``
        (optimizers, schedulers...) get it called with their saved state.

        With a remote tier, the steps of both tiers count: a step is read from
        local disk where it is committed there (its remote copy when the local
        one is damaged), else from the remote.

        Args:
            state: Objects to restore, by key (None: just return what was saved).
            step: The step to load (None: the newest).
            strict: Raise when keys of ``state`` are missing from the checkpoint.
            fallback: When the newest step is damaged (a checksum, size or file
                does not match its manifest, or a file cannot be read), warn and
                try the next older one. Never for a ``state`` that does not fit.
            map_location: Device of tensors the load creates.
            rank: Whose part of the checkpoint to read (None: this process's
                rank, modulo the saved world size where every rank saved the
                same state). Needed to load on another world size a checkpoint
                whose ranks saved different states.

        Returns:
            The step loaded and the loaded state dict.

        Raises:
            CheckpointNotFoundError: No committed step (or not the one asked for).
            CorruptCheckpointError: The step asked for, or every committed step, is damaged.
            StateDictMismatchError: ``state`` does not fit the newest step (names the key,
                both shapes or types); ``MissingKeysError`` when ``strict``.
            ValueError: ``rank`` is not a rank of the checkpoint.
        """

        extra = {} if rank is None else {"rank": rank}

        def load_at(path: str) -> dict[str, Any]:
            template = load_template(state)
            loaded = self._ckpt.load(path, template, default_map_location=map_location, strict=strict, **extra)
            restore_objects(state, loaded)
            return loaded

        tier = self._tier

        def load_one(s: int) -> dict[str, Any]:
            if tier is None:
                return self._guarding(s, lambda: load_at(self.path(s)))
            return self._guarding(s, lambda: tier.load(s, load_at))

        where: dict[str, Any] = {"present": self._steps.present, "path_of": self._steps.path}
        if tier is not None:
            where = {"present": tier.present, "path_of": tier.path_of}
        if step is not None:
            return step, load_step(self.root, step, load_one, **where)
        return load_newest(self.root, self.steps, load_one, fallback=fallback, **where)

    def _guarding(self, step: int, load: Callable[[], T]) -> T:
        """``load()`` of ``step`` while retention in this process (of either tier) leaves the step alone."""
        with self._lock:
            self._loading.add(step)
        try:
            return load()
        finally:
            with self._lock:
                self._loading.discard(step)

    # -- preemption -----------------------------------------------------

    def install_signal_handler(self, deadline_s: float = 60.0, signum: int = signal.SIGTERM) -> None:
        """On ``signum``: finish the in-flight save (or, past ``deadline_s``, abandon it cleanly), then exit.

        The process exits with ``128 + signum`` after the previous handler, if
        any, has run. Abandoning leaves the previous checkpoints intact. Call
        it from the main thread; see :mod:`.preemption` for the order of events.
        """
        self._preemption.install(deadline_s, signum)

    def _kill_writer(self) -> None:
        if isinstance(self._ckpt, AsyncCheckpointer):
            try:
                self._ckpt.abort()  # SIGKILL the writer subprocess and reap it: nothing commits after this
            except Exception:  # noqa: BLE001 - exiting anyway
                logger.warning("could not stop the checkpoint writer subprocess", exc_info=True)

    # -- lifetime -------------------------------------------------------

    def close(self) -> None:
        """Wait for the in-flight save, release the checkpointer, then wait (bounded) for the uploads.

        Raises:
            Exception: The in-flight save's error, unless the caller already received it.
            UploadError: With a remote tier: an upload failed and its error was not raised
                before, or uploads were still pending after ``UploadConfig.close_timeout_s``
                (the in-flight save's error, if any, is raised instead; this one is logged).
        """
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self.wait()
            finally:
                self._ckpt.close()
        except BaseException:
            if self._tier is not None:
                try:
                    self._tier.close()
                except UploadError as e:
                    logger.error("%s", e)
            raise
        if self._tier is not None:
            self._tier.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        close_on_exit(self.close, exc_type, "checkpoint manager")


def _refuse_memory_root(root: str, in_subprocess: bool) -> None:
    """A ``memory://`` store lives in this process: a writer subprocess would save into another one.

    Raises:
        ConfigError: ``root`` is a ``memory://`` URL and the saves run in a subprocess (async).
    """
    if in_subprocess and is_object_url(root) and OBJECT_SCHEMES[parse_object_url(root).scheme.lower()] == "memory":
        raise ConfigError(
            f"{root}: a memory:// store is held by this process and async saves write from a subprocess; "
            "pass async_save=False (or a local or s3://, gs://, az:// root)",
            field="root",
        )


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
