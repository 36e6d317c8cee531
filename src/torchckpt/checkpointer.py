"""Checkpointers: the object a training loop holds to save and load its state.

``SyncCheckpointer.save`` calls ``CheckpointWriter.write`` in the calling
thread. ``AsyncCheckpointer.save`` checks the keywords, the metadata and that
the location is writable, then starts staging and the write, and returns:

* with torchckpt's own ``DefaultStager`` and ``CheckpointProcess``, the state
  is walked once: ``DefaultStager.stage_flattened`` flattens it and copies its
  tensors into staging memory, and ``CheckpointProcess.write_staged`` sends that
  flattened form to the writer subprocess, where
  ``CheckpointWriter.write_staged`` plans the file from it;
* with a user's stager or process, the reference's contract: ``stage`` gives a
  state dict (or a future of one), ``CheckpointProcess.write`` takes it.

``AsyncCheckpointer.abort`` stops the writer subprocess at once
(``CheckpointProcess.kill``) for a process that must exit without waiting.
A checkpointer learns the rank it saves for from a :class:`RankAware` writer
or process (``rank_info``).
"""

from __future__ import annotations

import abc
import logging
import os
import time
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from .checkpoint_process import CheckpointProcess
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, check_metadata
from .errors import MissingKeysError, WriterProcessError
from .format.tree import STACK_FRAMES_NEEDED
from .keywords import READ_KEYWORDS, WRITE_KEYWORDS, check_keywords
from .pipeline import Handover
from .staging import DefaultStager
from .storage.object_client import check_shared
from .storage.writable import check_writable
from .types import STATE_DICT, RankInfo
from .utils import call_with_stack, close_on_exit, wrap_future

__all__ = ["AsyncCheckpointer", "Checkpointer", "RankAware", "SyncCheckpointer"]

logger = logging.getLogger(__name__)


@runtime_checkable
class RankAware(Protocol):
    """A writer or writer process that says which rank it works for.

    ``CheckpointWriter`` and ``CheckpointProcess`` are. A checkpointer reads
    ``rank_info`` before a save, to name the rank in the error of a location it
    cannot write to; a writer that is not rank-aware counts as rank 0.
    """

    @property
    def rank_info(self) -> RankInfo:
        """This process's rank and the world size."""
        ...


class Checkpointer(abc.ABC):
    """Saves and loads state dicts. ``load`` is shared by every checkpointer."""

    _reader: CheckpointReader

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None:
        """Save ``state_dict`` to ``path``.

        Returns:
            None when synchronous; ``(stage_future, write_future)`` when asynchronous.
        """

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Load the checkpoint at ``path``.

        Args:
            path: The checkpoint directory.
            state_dict: A template: only its keys are loaded and its tensors are
                filled in place (None: everything).
            default_map_location: Device for tensors the load creates.
            strict: Raise when template keys are missing from the checkpoint.
            **kwargs: Passed to ``CheckpointReader.read``: ``allow_pickle``,
                ``verify``, ``rank``. Others are refused when the reader is
                torchckpt's own (a reader subclass gets them all).

        Returns:
            The loaded state dict.

        Raises:
            MissingKeysError: ``strict`` and keys are missing (a ``RuntimeError``).
            TypeError: A keyword the reader does not take (named).
            StateDictMismatchError: The template does not fit; it is left untouched.
            CorruptCheckpointError: The checkpoint is damaged; the template is untouched,
                except, in the native layout, the tensors of the keys the error names
                (read into in place before the damage was found).
        """
        if type(self._reader).read is CheckpointReader.read:
            check_keywords(kwargs, call="load", path=str(path), known=READ_KEYWORDS, hook_keywords=frozenset())
        # The reader recurses once per level of the checkpoint's tree: run it where that fits.
        loaded, missing = call_with_stack(
            STACK_FRAMES_NEEDED, self._reader.read, path, state_dict, map_location=default_map_location, **kwargs
        )
        if strict and missing:
            raise MissingKeysError(
                f"Checkpoint at {path} is missing keys: {missing} (missing keys of the template)",
                path=path,
                missing_keys=missing,
            )
        return loaded

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources (subprocesses, threads, shared memory)."""

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        close_on_exit(self.close, exc_type, "checkpointer")


class SyncCheckpointer(Checkpointer):
    """Saves in the calling thread: ``save`` returns once the checkpoint is committed.

    Args:
        writer: Writes this rank's part and commits.
        reader: Reads checkpoints.
    """

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self._writer = writer
        self._reader = reader

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None:
        """Save ``state_dict`` to ``path``; returns once it is committed.

        Raises:
            CheckpointIOError: The location is read-only or not writable (operation
                ``"prepare"``, before anything is written), or a write failed.
            TypeError: A misspelling of a keyword torchckpt or the commit hook
                takes, before anything is written; any other keyword goes to the
                writer, which warns of it (``UserWarning``) and saves.
        """
        if isinstance(self._writer, CheckpointWriter):
            # A misspelling fails here; any other keyword goes on to the writer, which
            # warns of those its hook does not take (the reference hands them all on).
            self._writer.check_keywords(os.fspath(path), kwargs, unknown="ignore", refuse_near_misses=True)
        if isinstance(path, (str, os.PathLike)):
            check_writable(path, rank=_rank_of(self._writer))
        self._writer.write(path, state_dict, **kwargs)
        return None

    def close(self) -> None:
        self._writer.close()


class _WriteFuture(Future):  # type: ignore[type-arg]
    """A write future that remembers whether its outcome was looked at."""

    def __init__(self) -> None:
        super().__init__()
        self.retrieved = False

    def result(self, timeout: float | None = None) -> Any:
        self.retrieved = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.retrieved = True
        return super().exception(timeout)


class AsyncCheckpointer(Checkpointer):
    """Saves in the background: staging, then a writer subprocess.

    ``save`` returns ``(stage_future, write_future)`` at once. Training may
    change its tensors again when ``stage_future`` is done; the checkpoint is
    committed when ``write_future`` is. A save first waits for the previous
    write; the error of a write whose future nobody looked at is raised by the
    next ``save`` or by ``close`` — never lost.

    Args:
        checkpoint_stager: Makes the snapshot (a ``DefaultStager``: in its flattened form).
        checkpoint_process: Writes it in the background (``abort`` needs a ``CheckpointProcess``).
        reader: Reads checkpoints.
        hook_keywords: The keywords the commit hook of the writer in the
            subprocess takes (empty: it has none), so that ``save`` refuses any
            other unknown keyword before staging; None (default): not known
            here, the writer checks them in the subprocess (the write fails).
    """

    def __init__(
        self,
        checkpoint_stager: Any,
        checkpoint_process: Any,
        reader: CheckpointReader,
        *,
        hook_keywords: frozenset[str] | None = None,
    ) -> None:
        self._checkpoint_stager = checkpoint_stager
        self._checkpoint_process = checkpoint_process
        self._reader = reader
        self._hook_keywords = hook_keywords
        self._write_future: _WriteFuture | None = None
        self._closed = False

    def warmup(self, state_dict: STATE_DICT) -> None:
        """Get ready for a fast first save of states structured like ``state_dict``; returns nothing.

        Waits for the writer subprocess to start (it starts when the
        checkpointer is made; at most ``subprocess_init_timeout_secs``),
        allocates the staging memory for ``state_dict``'s structure (keys,
        shapes, dtypes: nothing is copied) and writes each of its pages once,
        and has the writer map it, so that the first ``save`` stalls about as
        long as a ``copy_`` of the state, like every later one. The memory is
        held until ``close``: one staging copy of the state's tensor bytes, in
        shared memory that the writer maps too (counted once), as after any
        first save. Without it, the first save does all this itself. A save of
        another structure still works (it re-lays or reallocates the memory).
        Waits for the previous save's write first.

        Raises:
            WriterProcessError: After ``close``, or the writer died while starting.
            TimeoutError: The writer did not start in time.
            Exception: The writer's start failed: its error (an init function's).
        """
        if self._closed:
            raise WriterProcessError(
                "AsyncCheckpointer.warmup after close: the writer is stopped and the staging memory freed"
            )
        self._raise_unseen_error()
        staging = None
        if isinstance(self._checkpoint_stager, DefaultStager):
            # Flattening walks the state once per level: run it where that fits.
            staging = call_with_stack(STACK_FRAMES_NEEDED, self._checkpoint_stager.warmup, state_dict)
        if isinstance(self._checkpoint_process, CheckpointProcess):
            self._checkpoint_process.warmup(staging)

    def _raise_unseen_error(self) -> None:
        previous, self._write_future = self._write_future, None
        if previous is None:
            return
        error = Future.exception(previous)  # waits; does not mark it seen
        if error is not None and not previous.retrieved:
            raise error

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None:
        """Start saving ``state_dict`` to ``path``.

        Returns:
            ``(stage_future, write_future)``, both resolving to None.

        Raises:
            CheckpointIOError: The location is read-only or not writable: raised
                here, before anything is staged (operation ``"prepare"``).
            TypeError: A misspelling of a keyword torchckpt or the writer's hook
                takes (see ``hook_keywords``), before anything is staged; any other
                unknown keyword is a ``UserWarning`` and is ignored.
        """
        self._raise_unseen_error()
        check_keywords(
            kwargs, call="save", path=str(path), known=WRITE_KEYWORDS, hook_keywords=self._hook_keywords,
            unknown="warn", refuse_near_misses=True,
        )  # fmt: skip
        check_metadata(kwargs.get("metadata"), str(path))  # in the writer it would fail after the copy
        if isinstance(path, (str, os.PathLike)):
            check_shared(os.fspath(path), why="an async save writes it from a subprocess")
            check_writable(path, rank=_rank_of(self._checkpoint_process))
        # Staging walks the state once per level: run it where that fits.
        return call_with_stack(STACK_FRAMES_NEEDED, self._start_save, path, state_dict, kwargs)

    def _start_save(self, path: str, state_dict: STATE_DICT, kwargs: dict[str, Any]) -> tuple[Future, Future]:
        called = time.perf_counter()
        stage_future, inner = self._stage_and_write(path, state_dict, kwargs, called)
        outer = _WriteFuture()

        def done(f: Future) -> None:
            error = f.exception()
            if error is not None:
                outer.set_exception(error)
            else:
                logger.info("checkpoint %s durable %.3fs after save was called", path, time.perf_counter() - called)
                outer.set_result(None)

        inner.add_done_callback(done)
        self._write_future = outer
        return stage_future, outer

    def _stage_and_write(
        self, path: str, state_dict: STATE_DICT, kwargs: dict[str, Any], called: float
    ) -> tuple[Future, Future]:
        """Start staging and the write: the flattened form when stager and process are torchckpt's own."""
        stager, process = self._checkpoint_stager, self._checkpoint_process
        ours = (
            isinstance(stager, DefaultStager)
            and type(stager).stage is DefaultStager.stage
            and isinstance(process, CheckpointProcess)
            and type(process).write is CheckpointProcess.write
        )
        if not ours:  # the reference's contract: a state dict (or its future) from stage() to write()
            staged = stager.stage(state_dict, **kwargs)
            return wrap_future(staged), process.write(staged, path, **kwargs)
        # Pipelined (pipeline.py): the write is queued first and starts on the plan, before the copies end.
        handover = Handover(called)
        inner = process.write_staged(handover.planned, path, save_called_at=called, handover=handover, **kwargs)
        try:
            flat = stager.stage_flattened(state_dict, handover)  # walks the state once; nothing else walks it again
        except BaseException as e:
            handover.fail(e)  # the queued write fails with it (and no message is sent)
            raise
        return wrap_future(flat), inner

    def abort(self) -> None:
        """Stop the background writer at once, without waiting for the save in flight.

        SIGKILLs the writer subprocess and reaps it (``CheckpointProcess.kill``):
        the save in flight fails and nothing commits after this returns; its
        error is not raised again by ``save`` or ``close``. Later saves fail.
        Call ``close`` afterwards to free the staging memory. Meant for a
        process about to exit (a termination signal) that must not wait.

        Raises:
            TypeError: The checkpoint process is not a ``CheckpointProcess``.
        """
        process = self._checkpoint_process
        if not isinstance(process, CheckpointProcess):
            raise TypeError(f"abort() stops a CheckpointProcess, not a {type(process).__name__}")
        process.kill()
        self._write_future = None  # aborted on purpose: its error is no news

    def close(self) -> None:
        """Wait for the last write, stop the writer and free staging memory; raise an unseen write error."""
        self._closed = True
        try:
            self._raise_unseen_error()
        finally:
            self._checkpoint_stager.close()
            self._checkpoint_process.close()


def _rank_of(component: Any) -> int:
    """The rank a writer or writer process works for (0 when it is not :class:`RankAware`)."""
    if not isinstance(component, RankAware):
        return 0
    rank = component.rank_info.global_rank
    return rank if isinstance(rank, int) else 0
