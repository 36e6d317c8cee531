"""Copying committed steps to a manager's remote tier in the background: :class:`StepUploader`, :class:`UploadConfig`.

One thread (started with the first upload) copies one step at a time, in
the order they were queued, with :func:`.step_copy.copy_checkpoint`. Call
order::

    uploader.submit(step, replace=...)    # after the step's local commit; returns at once
    uploader.wait_for_room(timeout_s)     # before a save: at most ``max_pending`` uploads queued or running
    ...                                   # the thread: copy, retry with backoff, then on_finished(step, ok)
    uploader.wait_idle(timeout_s)         # nothing queued or running (on_finished included)
    uploader.take_unseen()                # an UploadError for the failures not yet raised to the caller
    uploader.close(timeout_s)             # wait (bounded), then stop: what is left is abandoned

An attempt that fails is retried after ``backoff_s`` (doubling, at most
``max_backoff_s``), at most ``attempts`` times in all; a failure no retry can
mend (the local step is gone or damaged, the remote holds another checkpoint
at that step) ends the upload at once. A failed upload is logged, kept in
:attr:`StepUploader.errors` until the step is uploaded after all, and raised
once to the caller (``take_unseen``). It never touches the local copy. A
remote step is committed by its manifest, put last: an upload that fails or
is abandoned midway leaves no committed step there (its objects are removed,
or cleaned by the next save to the step or ``torchckpt gc``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UploadError
from .step_copy import COPY_CHUNK_BYTES, copy_checkpoint, copy_with_references

__all__ = ["UploadConfig", "StepUploader"]

logger = logging.getLogger(__name__)

#: Failures another attempt cannot mend: the local step is gone or damaged, or the remote holds another one.
FINAL_ERRORS = (CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError)
#: How often an idle upload thread looks whether it is to stop.
_IDLE_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class UploadConfig:
    """How a CheckpointManager copies its committed steps to its remote tier.

    Attributes:
        attempts: Tries per step before its upload has failed (>= 1).
        backoff_s: Wait before the second try; it doubles for each next one.
        max_backoff_s: The longest wait between two tries.
        max_pending: Uploads queued or running when a save starts; a save waits
            for room (so that local steps kept for their upload stay bounded).
        room_timeout_s: The longest a save waits for room; then it fails, naming the remote.
        close_timeout_s: The longest ``close()`` waits for the uploads still pending.
        chunk_bytes: Bytes read and written at a time by a copy.
    """

    attempts: int = 3
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    max_pending: int = 2
    room_timeout_s: float = 1800.0
    close_timeout_s: float = 1800.0
    chunk_bytes: int = COPY_CHUNK_BYTES

    def __post_init__(self) -> None:
        for name, low in (("attempts", 1), ("max_pending", 1), ("chunk_bytes", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"UploadConfig.{name} must be an int >= {low}, got {value!r}", field=name)
        for name in ("backoff_s", "max_backoff_s", "room_timeout_s", "close_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"UploadConfig.{name} must be a number >= 0, got {value!r}", field=name)


class StepUploader:
    """Copies committed steps, one at a time, from where ``source_of`` says to where ``dest_of`` says.

    Args:
        source_of: The local checkpoint of a step.
        dest_of: The remote location of a step.
        config: Retries, bounds and timeouts.
        on_finished: Called by the upload thread after each step's upload ended:
            ``(step, uploaded)`` (its errors are logged, never raised).
        storage_options: The object store client's configuration keys, on top of the environment.
    """

    def __init__(
        self,
        source_of: Callable[[int], str],
        dest_of: Callable[[int], str],
        config: UploadConfig,
        on_finished: Callable[[int, bool], None],
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self._storage_options = dict(storage_options) if storage_options else None
        self._source_of = source_of
        self._dest_of = dest_of
        self._config = config
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int, bool]] = collections.deque()
        self._running: int | None = None  # the step being copied
        self._busy = False  # a step taken from the queue, until its on_finished returned
        self._errors: dict[int, UploadError] = {}
        self._replace: dict[int, bool] = {}  # of the failed steps, for a retry
        self._unseen: list[int] = []  # failed steps whose error the caller has not received
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the caller's side ------------------------------------------------

    def submit(self, step: int, *, replace: bool) -> None:
        """Queue the upload of ``step`` (queued already: nothing to do); start the thread if needed.

        Args:
            step: The committed local step.
            replace: Whether the remote step may be replaced (the save had ``overwrite=True``).
        """
        with self._cond:
            if self._stop.is_set():
                logger.warning("not uploading step %d to %s: the uploader is closed", step, self._dest_of(step))
                return
            self._enqueue(step, replace)

    def _enqueue(self, step: int, replace: bool) -> None:
        """Queue ``step`` unless it is queued; start the thread. Called holding ``_cond``."""
        if all(s != step for s, _ in self._queue):
            self._queue.append((step, replace))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torchckpt-upload", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def pending(self) -> set[int]:
        """The steps queued or being uploaded."""
        with self._cond:
            return self._pending()

    def _pending(self) -> set[int]:
        found = {s for s, _ in self._queue}
        if self._running is not None:
            found.add(self._running)
        return found

    @property
    def errors(self) -> dict[int, UploadError]:
        """The uploads that failed and have not succeeded since, by step."""
        with self._cond:
            return dict(self._errors)

    def wait_for_room(self, timeout_s: float) -> bool:
        """Wait until fewer than ``max_pending`` uploads are queued or running; return whether they are."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._pending()) >= self._config.max_pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no upload is queued or running (its ``on_finished`` included); return whether none is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def take_unseen(self) -> UploadError | None:
        """One error for the failed uploads the caller has not received yet (then they count as received)."""
        with self._cond:
            steps = [s for s in self._unseen if s in self._errors]
            self._unseen.clear()
            if not steps:
                return None
            first = self._errors[steps[0]]
            failures = {s: str(self._errors[s].strerror or self._errors[s]) for s in steps}
        if len(steps) == 1:
            return first
        others = ", ".join(str(s) for s in steps[1:])
        error = UploadError(
            f"{first.strerror}; the uploads of steps {others} failed too (manager.upload_errors names each)",
            step=first.step, url=first.url, errno=first.errno, failures=failures,
        )  # fmt: skip
        error.__cause__ = first.__cause__
        return error

    def retry(self, still_there: Callable[[int], bool]) -> list[int]:
        """Queue again every failed upload whose local step is still there; return those steps."""
        with self._cond:
            if self._stop.is_set():
                return []
            again = sorted(s for s in self._errors if still_there(s))
            for s in again:
                del self._errors[s]
                if s in self._unseen:
                    self._unseen.remove(s)
                self._enqueue(s, self._replace.pop(s, False))
        return again

    def close(self, timeout_s: float) -> set[int]:
        """Wait up to ``timeout_s`` for the pending uploads, then stop the thread; return the steps left undone."""
        self.wait_idle(timeout_s)
        with self._cond:
            left = self._pending()
            self._queue.clear()
            self._stop.set()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and not left:
            thread.join(_IDLE_POLL_S * 5)
        return left

    # -- the upload thread --------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(_IDLE_POLL_S)
                if self._stop.is_set():
                    return
                step, replace = self._queue.popleft()
                self._running, self._busy = step, True
            try:
                ok = self._upload(step, replace)
                with self._cond:
                    self._running = None  # no longer pending: retention may now delete its local copy
                    self._cond.notify_all()
                if self._stop.is_set():
                    return  # closed meanwhile: no retention after close
                try:
                    self._on_finished(step, ok)
                except Exception:  # noqa: BLE001 - retention after an upload never stops the uploads
                    logger.warning("after the upload of step %d", step, exc_info=True)
            finally:
                with self._cond:
                    self._running, self._busy = None, False
                    self._cond.notify_all()

    def _upload(self, step: int, replace: bool) -> bool:
        """Copy ``step`` with retries; record its failure. Return whether it is uploaded."""
        src, dst = self._source_of(step), self._dest_of(step)
        cfg = self._config
        delay = cfg.backoff_s
        error: BaseException | None = None
        attempt = 0
        for attempt in range(1, cfg.attempts + 1):
            try:
                copy_with_references(  # the steps it refers to first (incremental saves)
                    src, dst, replace=replace, chunk_bytes=cfg.chunk_bytes, storage_options=self._storage_options,
                    copy=copy_checkpoint,
                )
            except FINAL_ERRORS as e:
                error = e
                break
            except Exception as e:  # noqa: BLE001 - a network or store failure: try again
                error = e
                if attempt == cfg.attempts:
                    break
                logger.warning(
                    "upload of step %d to %s failed (attempt %d of %d): %s; trying again in %.1fs",
                    step, dst, attempt, cfg.attempts, e, delay,
                )  # fmt: skip
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, cfg.max_backoff_s)
            else:
                with self._cond:
                    self._errors.pop(step, None)
                    self._replace.pop(step, None)
                logger.info("uploaded step %d to %s", step, dst)
                return True
        self._record(step, dst, replace, attempt, error)
        return False

    def _record(self, step: int, dst: str, replace: bool, attempts: int, cause: BaseException | None) -> None:
        why = (getattr(cause, "strerror", None) or str(cause)) if cause is not None else "stopped"
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        error = UploadError(
            f"upload of step {step} to {dst} failed after {tries}: {why} (the local copy is intact)",
            step=step, url=dst, errno=getattr(cause, "errno", None),
        )  # fmt: skip
        error.__cause__ = cause
        logger.error("%s", error.strerror)
        with self._cond:
            self._errors[step] = error
            self._replace[step] = replace
            if step not in self._unseen:
                self._unseen.append(step)
