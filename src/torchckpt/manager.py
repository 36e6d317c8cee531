"""CheckpointManager: numbered steps under one directory, retention, resume from the latest.

::

    mgr = CheckpointManager("/ckpt", keep=[KeepLast(3)])
    handle = mgr.save(step, {"model": model, "optim": opt, "step": step}, metrics={"loss": loss})
    ...
    step, state = mgr.load({"model": model, "optim": opt})   # newest good step, restored in place

Each step is a checkpoint directory ``<root>/step_<step:010d>``. Only
committed checkpoints (with a valid manifest whose step matches the name)
count; hidden leftovers of crashed saves are ignored and cleaned.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import torch

from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_reader import read_manifest
from .checkpoint_writer import CheckpointWriterConfig
from .checkpointer import Checkpointer
from .config import CheckpointerConfig
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
)
from .format.tree import MAX_DEPTH
from .retention import CheckpointInfo, RetentionPolicy, preserved
from .step_metadata import decode_metrics, step_metadata
from .storage import fs
from .format.manifest import MANIFEST_NAME
from .storage.local_dirs import make_dirs_durably, restore_interrupted_swaps
from .storage.paths import local_path
from .types import RankInfo
from .utils import close_on_exit

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{1,19})$")
#: How many times a load lists the steps again when those it listed were deleted under it.
_LIST_ATTEMPTS = 10
_LEFTOVER = re.compile(r"^\.step_\d+\.torchckpt-(pending|trash-[0-9a-f]+)$")
#: What makes a load skip a step and try an older one: the step is damaged (or vanished). A template
#: that does not fit, a refused pickle or a bad argument is the caller's to fix: raised at once.
_DAMAGE = (CorruptCheckpointError, CheckpointIOError, CheckpointNotFoundError)


class SaveHandle:
    """The outcome of one ``CheckpointManager.save``.

    An error of the save reaches the caller once: through ``result()`` or
    ``exception()`` here, or else from the manager's next ``save``, ``wait``
    or ``close``, whichever comes first.

    Args:
        step: The step saved.
        path: Its directory.
        future: Completes when the checkpoint is durable (None: already is).
    """

    def __init__(self, step: int, path: str, future: Future[Any] | None) -> None:
        self.step = step
        self.path = path
        self._future = future
        self._delivered = False  # its error has reached the caller

    def done(self) -> bool:
        """Whether the save has finished (successfully or not)."""
        return self._future is None or self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait until the checkpoint is durable; raise the save's error.

        Raises:
            TimeoutError: Not finished within ``timeout`` seconds.
        """
        error = self.exception(timeout)
        if error is not None:
            raise error

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait until the save has finished; return its error (None: committed).

        Raises:
            TimeoutError: Not finished within ``timeout`` seconds.
        """
        if self._future is None:
            return None
        error = self._future.exception(timeout)
        self._delivered = True
        return error

    def _deliver(self) -> None:
        """Wait; raise the save's error unless the caller has already received it."""
        if self._future is None:
            return
        error = self._future.exception()
        if error is not None and not self._delivered:
            self._delivered = True
            raise error


def _to_state_dict(state: Any) -> Any:
    """``state`` with every object that has ``state_dict()`` replaced by its state dict, in nested dicts too.

    Iterative; a dict reached twice is copied once, so a cycle stays a cycle
    (and a dict past ``MAX_DEPTH`` stays as it is): saving then refuses it
    naming the key, whatever the caller's stack.
    """
    if hasattr(state, "state_dict") and callable(state.state_dict):
        return state.state_dict()
    if not isinstance(state, dict):
        return state
    root: dict[Any, Any] = {}
    copies = {id(state): root}
    todo: list[tuple[dict[Any, Any], dict[Any, Any], int]] = [(state, root, 1)]
    while todo:
        source, copy, depth = todo.pop()
        for k, v in source.items():
            if hasattr(v, "state_dict") and callable(v.state_dict):
                copy[k] = v.state_dict()
            elif isinstance(v, dict) and id(v) in copies:
                copy[k] = copies[id(v)]
            elif isinstance(v, dict) and depth < MAX_DEPTH:
                copy[k] = copies[id(v)] = {}
                todo.append((v, copy[k], depth + 1))
            else:
                copy[k] = v
    return root


class CheckpointManager:
    """Saves numbered steps under ``root``, keeps what the retention policies say, restores the latest.

    Args:
        root: Directory holding one checkpoint directory per step.
        keep: Retention policies (a step survives if any keeps it); None keeps everything.
        async_save: Save in the background (``save`` returns at once).
        format: ``"safetensors"`` (native, default) or ``"torch_save"``.
        checkpointer: Use this checkpointer instead of building one.
        rank_info: This process's rank (default: from the process group, else 0 of 1).
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
    ) -> None:
        self.root = os.path.abspath(local_path(root))
        self._policies: list[RetentionPolicy] = (
            [] if keep is None else [keep] if hasattr(keep, "should_preserve") else list(keep)  # type: ignore[arg-type]
        )
        self._async = async_save
        if checkpointer is None:
            config = CheckpointerConfig(writer_config=CheckpointWriterConfig(format=format))
            checkpointer = (
                make_async_checkpointer(config, rank_info) if async_save else make_sync_checkpointer(config, rank_info)
            )
        self._ckpt = checkpointer
        self._rank = rank_info.global_rank if rank_info is not None else _current_rank()
        self._inflight: SaveHandle | None = None
        self._saving_sync = False
        self._exit_requested: int | None = None
        self._loading: set[int] = set()
        self._lock = threading.RLock()
        self._closed = False
        make_dirs_durably(self.root)
        if self._rank == 0:
            restore_interrupted_swaps(self.root, marker=MANIFEST_NAME)
            self._clean_leftovers()

    # -- naming and listing ---------------------------------------------

    def path(self, step: int) -> str:
        """The directory of ``step``."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}", field="step")
        return os.path.join(self.root, f"step_{step:010d}")

    def _infos(self) -> list[CheckpointInfo]:
        for _ in range(_LIST_ATTEMPTS):
            infos, vanished = self._list_once()
            if not vanished:
                break
            # A listed step was deleted before its manifest was read (retention in another process),
            # maybe after a newer one was committed that this listing missed. List again.
        return infos

    def _list_once(self) -> tuple[list[CheckpointInfo], bool]:
        """The committed steps, and whether a listed step directory vanished while they were read."""
        infos = []
        vanished = False
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return [], False
        for name in names:
            m = _STEP_DIR.match(name)
            if not m or name != f"step_{int(m.group(1)):010d}":
                continue  # not a step directory, or not where path(step) points (step_12, step_00000000012)
            path = os.path.join(self.root, name)
            try:
                manifest = read_manifest(path)
            except (CheckpointError, OSError):
                vanished = vanished or not os.path.lexists(path)
                continue  # not committed (or unreadable): not a checkpoint
            step = int(m.group(1))
            if manifest.metadata.get("step", step) != step:
                continue
            metrics = decode_metrics(manifest.metadata.get("metrics"))
            infos.append(CheckpointInfo(step, path, metrics, manifest.created_unix_s))
        return sorted(infos, key=lambda c: c.step), vanished

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
            inflight = self._inflight
            if not overwrite and inflight is not None and inflight.step == step and not inflight.done():
                raise CheckpointExistsError(
                    f"step {step} is already being saved under {self.root} ({path}); "
                    "pass overwrite=True to replace it once that save is done",
                    path=path,
                )
            if inflight is not None:
                inflight._deliver()  # one save at a time, in order; an error nobody has seen is raised here
            # A link at a step's name is no step: the writer refuses it as a link (never followed).
            if not overwrite and os.path.lexists(path) and not os.path.islink(path):
                raise CheckpointExistsError(
                    f"step {step} already exists under {self.root} ({path}); pass overwrite=True to replace it",
                    path=path,
                )
            state_dict = _to_state_dict(state)
            if not self._async:
                return self._save_sync(step, path, state_dict, md)
            return self._save_async(step, path, state_dict, md)

    def _save_sync(self, step: int, path: str, state_dict: Any, md: dict[str, Any]) -> SaveHandle:
        self._saving_sync = True
        try:
            self._ckpt.save(path, state_dict, metadata=md)
            handle = SaveHandle(step, path, None)
            self._inflight = handle
            self._after_commit(step)
        finally:
            self._saving_sync = False
            self._exit_if_requested()  # a signal during the save: exit now, committed or not
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
            handle._deliver()

    def _after_commit(self, step: int) -> None:
        if self._rank == 0:
            self.apply_retention(protect={step})

    def apply_retention(self, *, protect: set[int] | None = None, dry_run: bool = False) -> list[int]:
        """Delete the committed steps no policy keeps; return them.

        Never deletes the newest committed step, a step being written or loaded,
        or a step in ``protect``. A failed delete is logged and retried next time.
        """
        infos = self._infos()
        if not infos:
            return []
        keep = preserved(self._policies, infos)
        guarded = set(protect or ()) | set(self._loading) | {infos[-1].step}
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            guarded.add(inflight.step)
        doomed = [c for c, k in zip(infos, keep) if not k and c.step not in guarded]
        if dry_run:
            return [c.step for c in doomed]
        deleted = []
        for c in doomed:
            trash = os.path.join(self.root, f".step_{c.step}.torchckpt-trash-{uuid.uuid4().hex}")
            try:
                fs.rename(c.path, trash)  # atomic: never a half-deleted checkpoint in view
            except OSError as e:
                logger.warning("could not delete step %d (%s): %s; will retry", c.step, c.path, e)
                continue
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(c.step)
        if deleted:
            logger.info("retention deleted steps %s under %s", deleted, self.root)
        return deleted

    def _clean_leftovers(self) -> None:
        for name in os.listdir(self.root):
            if _LEFTOVER.match(name) and not name.endswith("-pending"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

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
        failed: list[tuple[int, CheckpointError]] = []
        for _ in range(_LIST_ATTEMPTS):
            candidates = [step] if step is not None else list(reversed(self.steps()))
            vanished = False
            for s in candidates:
                try:
                    return s, self._load_guarded(s, state, strict=strict, map_location=map_location, rank=rank)
                except _DAMAGE as e:
                    if isinstance(e, CheckpointNotFoundError) or not os.path.isdir(self.path(s)):
                        # Deleted before or while it was read (retention in another process): not a bad step.
                        if step is not None:
                            if isinstance(e, CheckpointNotFoundError):
                                raise
                            raise CheckpointNotFoundError(
                                f"step {s} at {self.path(s)} was deleted while it was being loaded", path=self.path(s)
                            ) from e
                        vanished = True
                        continue
                    if step is not None or not fallback:
                        raise
                    warnings.warn(f"skipping step {s} at {self.path(s)}: {e}", stacklevel=2)
                    logger.warning("skipping step %d at %s: %s", s, self.path(s), e)
                    failed.append((s, e))
            if not vanished:
                break
            # Listed steps vanished under this load: newer ones were committed meanwhile. List again.
        if not failed:
            raise CheckpointNotFoundError(f"no committed checkpoint under {self.root}", path=self.root)
        # Not a CheckpointNotFoundError: steps exist, and starting afresh is not the answer to damage.
        raise CorruptCheckpointError(
            f"no loadable checkpoint under {self.root}: steps {[s for s, _ in failed]} are damaged; "
            f"the last error: {failed[-1][1]}",
            path=self.root,
        ) from failed[-1][1]

    def _load_guarded(self, step: int, state: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
        """Load ``step`` while retention in this process leaves it alone."""
        with self._lock:
            self._loading.add(step)
        try:
            return self._load_step(step, state, **kw)
        finally:
            with self._lock:
                self._loading.discard(step)

    def _load_step(
        self, step: int, state: dict[str, Any] | None, *, strict: bool, map_location: Any, rank: int | None
    ) -> dict[str, Any]:
        path = self.path(step)
        template: dict[str, Any] | None = None
        if state is not None:
            template = {}
            for k, v in state.items():
                template[k] = v.state_dict() if isinstance(v, torch.nn.Module) else None
        extra = {} if rank is None else {"rank": rank}
        loaded = self._ckpt.load(path, template, default_map_location=map_location, strict=strict, **extra)
        if state is not None:
            for k, v in state.items():
                if k in loaded and not isinstance(v, torch.nn.Module) and hasattr(v, "load_state_dict"):
                    v.load_state_dict(loaded[k])
        return loaded

    # -- preemption -----------------------------------------------------

    def install_signal_handler(self, deadline_s: float = 60.0, signum: int = signal.SIGTERM) -> None:
        """On ``signum``: finish the in-flight save (or, past ``deadline_s``, abandon it cleanly), then exit.

        The process exits with ``128 + signum`` after the previous handler, if
        any, has run. Abandoning leaves the previous checkpoints intact.
        """
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any) -> None:
            if self._saving_sync:
                logger.warning("signal %d during a save: exiting once it is committed", sig)
                self._exit_requested = sig
                return
            self._finish_or_abandon(deadline_s)
            self._exit(sig, previous)

        signal.signal(signum, handler)
        self._previous_handler = previous

    def _finish_or_abandon(self, deadline_s: float) -> None:
        handle = self._inflight
        if handle is None or handle.done():
            logger.warning("termination signal: no save in flight")
            return
        try:
            handle.result(timeout=deadline_s)
            logger.warning("termination signal: finished the in-flight save of step %d", handle.step)
        except (TimeoutError, FutureTimeoutError):
            # Stop the writer now: nothing of this save may commit after we say it did not.
            self._kill_writer()
            try:
                handle.result(timeout=5.0)  # it may have committed just before the kill
            except Exception:  # noqa: BLE001 - killed (or failed): not committed
                logger.warning(
                    "termination signal: abandoned the in-flight save of step %d after %.1fs (not committed)",
                    handle.step, deadline_s,
                )  # fmt: skip
            else:
                logger.warning("termination signal: finished the in-flight save of step %d", handle.step)
        except Exception as e:  # noqa: BLE001 - it failed on its own
            logger.warning("termination signal: the in-flight save of step %d failed: %s", handle.step, e)

    def _exit_if_requested(self) -> None:
        if self._exit_requested is not None:
            logger.warning("termination signal: the save is committed; exiting")
            self._exit(self._exit_requested, getattr(self, "_previous_handler", None))

    def _exit(self, sig: int, previous: Any) -> None:
        if callable(previous):
            previous(sig, None)
        self._abandon()
        os._exit(128 + sig)

    def _abandon(self) -> None:
        # Not a graceful close: that waits for an in-flight write (which could then still commit).
        self._kill_writer()

    def _kill_writer(self) -> None:
        try:
            process = getattr(self._ckpt, "_checkpoint_process", None)
            if process is not None:
                process._kill()  # SIGKILL the writer subprocess and reap it
        except Exception:  # noqa: BLE001 - exiting anyway
            pass

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


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

