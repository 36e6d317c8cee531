"""CheckpointManager: numbered steps under one directory, retention, resume from the latest.

::

    mgr = CheckpointManager("/ckpt", keep=[KeepLast(3)])
    handle = mgr.save(step, {"model": model, "optim": opt, "step": step}, metrics={"loss": loss})
    ...
    step, state = mgr.load({"model": model, "optim": opt})   # newest good step, restored in place

The manager is a facade; each concern has its own module:

- :mod:`.step_dirs`: the root's layout (``<root>/step_<step:010d>``), which
  steps are committed, leftovers, deleting a step;
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
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_writer import CheckpointWriterConfig
from .checkpointer import AsyncCheckpointer, Checkpointer
from .config import CheckpointerConfig
from .errors import CheckpointError, CheckpointExistsError
from .load_fallback import load_newest, load_step
from .preemption import PreemptionHandler
from .retention import CheckpointInfo, RetentionPolicy, doomed
from .save_handle import SaveHandle
from .stateful import load_template, restore_objects, to_state_dict
from .step_dirs import committed_steps, discard_step, remove_trash, step_path
from .step_metadata import step_metadata
from .format.manifest import MANIFEST_NAME
from .storage.local_dirs import make_dirs_durably, restore_interrupted_swaps
from .storage.paths import local_path
from .types import RankInfo
from .utils import close_on_exit

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Saves numbered steps under ``root``, keeps what the retention policies say, restores the latest.

    Args:
        root: Directory holding one checkpoint directory per step.
        keep: Retention policies (a step survives if any keeps it); None keeps everything.
        async_save: Save in the background (``save`` returns at once).
        format: ``"safetensors"`` (native, default) or ``"torch_save"``.
        checkpointer: Use this checkpointer instead of building one.
        rank_info: This process's rank (default: from the process group, else 0 of 1).
        dedup_replicated: Write a plain tensor that every rank holds with the same
            bytes once (``CheckpointWriterConfig.dedup_replicated``); None (default):
            on when there are several ranks. Ignored with ``checkpointer``.
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
    ) -> None:
        self.root = os.path.abspath(local_path(root))
        self._policies: list[RetentionPolicy] = (
            [] if keep is None else [keep] if hasattr(keep, "should_preserve") else list(keep)  # type: ignore[arg-type]
        )
        self._async = async_save
        if checkpointer is None:
            if dedup_replicated is None:
                dedup_replicated = (rank_info.global_world_size if rank_info is not None else _world_size()) > 1
            writer_config = CheckpointWriterConfig(format=format, dedup_replicated=dedup_replicated)
            config = CheckpointerConfig(writer_config=writer_config)
            checkpointer = (
                make_async_checkpointer(config, rank_info) if async_save else make_sync_checkpointer(config, rank_info)
            )
        self._ckpt = checkpointer
        self._rank = rank_info.global_rank if rank_info is not None else _current_rank()
        self._inflight: SaveHandle | None = None
        self._loading: set[int] = set()
        self._lock = threading.RLock()
        self._closed = False
        self._preemption = PreemptionHandler(lambda: self._inflight, self._kill_writer)
        make_dirs_durably(self.root)
        if self._rank == 0:
            restore_interrupted_swaps(self.root, marker=MANIFEST_NAME)
            remove_trash(self.root)

    @property
    def checkpointer(self) -> Checkpointer:
        """The checkpointer every save and load of this manager goes through."""
        return self._ckpt

    # -- naming and listing ---------------------------------------------

    def path(self, step: int) -> str:
        """The directory of ``step``."""
        return step_path(self.root, step)

    def _infos(self) -> list[CheckpointInfo]:
        try:
            return committed_steps(self.root)
        except FileNotFoundError:
            return []

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return [c.step for c in self._infos()]

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
            A handle; for an async save it completes when the checkpoint is durable.

        Raises:
            CheckpointExistsError: ``step`` exists or is being saved, and not ``overwrite``
                (a ``FileExistsError``).
            ConfigError: A metric or the metadata cannot be stored (names it).
        """
        if self._closed:
            raise CheckpointError("CheckpointManager is closed", path=self.root)
        path = self.path(step)
        md = step_metadata(step, metrics, metadata, f"cannot save step {step} under {self.root}")
        with self._lock:
            self._refuse_existing(step, path, overwrite)
            state_dict = to_state_dict(state)
            if not self._async:
                return self._save_sync(step, path, state_dict, md)
            return self._save_async(step, path, state_dict, md)

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
        if not overwrite and os.path.lexists(path) and not os.path.islink(path):
            raise CheckpointExistsError(
                f"step {step} already exists under {self.root} ({path}); pass overwrite=True to replace it",
                path=path,
            )

    def _save_sync(self, step: int, path: str, state_dict: Any, md: dict[str, Any]) -> SaveHandle:
        with self._preemption.deferring():  # a signal during the save: exit at its end, committed or not
            self._ckpt.save(path, state_dict, metadata=md)
            handle = SaveHandle(step, path, None)
            self._inflight = handle
            self._after_commit(step)
        return handle

    def _save_async(self, step: int, path: str, state_dict: Any, md: dict[str, Any]) -> SaveHandle:
        result = self._ckpt.save(path, state_dict, metadata=md)
        assert result is not None
        stage_future, write_future = result
        stage_future.result()  # the state may change once staged
        done: Future[None] = Future()

        def on_written(f: Future[Any]) -> None:
            error = f.exception()
            if error is None:
                try:
                    self._after_commit(step)
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

    def _after_commit(self, step: int) -> None:
        if self._rank == 0:
            self.apply_retention(protect={step})

    def apply_retention(self, *, protect: set[int] | None = None, dry_run: bool = False) -> list[int]:
        """Delete the committed steps no policy keeps; return them.

        Never deletes the newest committed step, a step being written or loaded,
        or a step in ``protect``. A failed delete is logged and retried next time.
        """
        guarded = set(protect or ()) | set(self._loading)
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            guarded.add(inflight.step)
        to_delete = doomed(self._policies, self._infos(), guarded)
        if dry_run:
            return [c.step for c in to_delete]
        deleted = []
        for c in to_delete:
            try:
                discard_step(c)
            except OSError as e:
                logger.warning("could not delete step %d (%s): %s; will retry", c.step, c.path, e)
                continue
            deleted.append(c.step)
        if deleted:
            logger.info("retention deleted steps %s under %s", deleted, self.root)
        return deleted

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

        def load_one(s: int) -> dict[str, Any]:
            return self._load_guarded(s, state, strict=strict, map_location=map_location, rank=rank)

        if step is not None:
            return step, load_step(self.root, step, load_one)
        return load_newest(self.root, self.steps, load_one, fallback=fallback)

    def _load_guarded(
        self, step: int, state: dict[str, Any] | None, *, strict: bool, map_location: Any, rank: int | None
    ) -> dict[str, Any]:
        """Load ``step`` into ``state`` while retention in this process leaves it alone."""
        with self._lock:
            self._loading.add(step)
        try:
            extra = {} if rank is None else {"rank": rank}
            loaded = self._ckpt.load(
                self.path(step), load_template(state), default_map_location=map_location, strict=strict, **extra
            )
            restore_objects(state, loaded)
            return loaded
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
        """Wait for the in-flight save, then release the checkpointer.

        Raises:
            Exception: The in-flight save's error, unless the caller already received it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._ckpt.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        close_on_exit(self.close, exc_type, "checkpoint manager")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
