"""Exiting on a termination signal (preemption) without leaving a half-committed step.

A scheduler that preempts a job sends SIGTERM and, some seconds later,
SIGKILL. :class:`PreemptionHandler` uses that time: an in-flight background
save is finished, or, past a deadline, its writer is killed so that nothing
of it commits after the process said it did not; a synchronous save running
in the interrupted thread is finished first (the signal is deferred to its
end). Then the previous handler runs and the process exits with
``128 + signum`` through ``os._exit``: a graceful shutdown could wait on a
write that might still commit. Abandoning leaves every committed step intact.

Call order (the owner is a ``CheckpointManager``):

1. ``PreemptionHandler(in_flight, abort_writer)`` once.
2. :meth:`PreemptionHandler.install` from the main thread, once per signal.
3. Every synchronous save runs inside ``with handler.deferring():``.
4. On the signal: inside ``deferring()`` it is recorded and acted on when the
   block ends; otherwise at once: ``in_flight()`` is finished or abandoned
   (``abort_writer()``), the previous handler is called, ``abort_writer()``
   runs again, and the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from .save_handle import SaveHandle

__all__ = ["PreemptionHandler"]

logger = logging.getLogger(__name__)

#: How long an abandoned save may take to report after its writer was killed (it may have just committed).
_AFTER_KILL_S = 5.0


class PreemptionHandler:
    """Finishes or abandons the in-flight save on a termination signal, then exits the process.

    Args:
        in_flight: Returns the handle of the latest save (None: none yet).
        abort_writer: Kills the background writer now (so nothing more commits); never raises.
    """

    def __init__(self, in_flight: Callable[[], SaveHandle | None], abort_writer: Callable[[], None]) -> None:
        self._in_flight = in_flight
        self._abort_writer = abort_writer
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._requested: int | None = None

    def install(self, deadline_s: float, signum: int) -> None:
        """Handle ``signum`` from now on (main thread only, as ``signal.signal``).

        Args:
            deadline_s: How long the in-flight save may take before it is abandoned.
            signum: The signal.
        """
        previous = signal.getsignal(signum)
        self._previous[signum] = previous

        def handler(sig: int, frame: Any) -> None:
            if self._deferring:
                logger.warning("signal %d during a save: exiting once it is committed", sig)
                self._requested = sig
                return
            self._finish_or_abandon(deadline_s)
            self._exit(sig)

        signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Run a synchronous save: a signal inside is acted on when it ends (committed or not)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._requested is not None:
                logger.warning("termination signal: the save is committed; exiting")
                self._exit(self._requested)

    def _finish_or_abandon(self, deadline_s: float) -> None:
        handle = self._in_flight()
        if handle is None or handle.done():
            logger.warning("termination signal: no save in flight")
            return
        try:
            handle.result(timeout=deadline_s)
            logger.warning("termination signal: finished the in-flight save of step %d", handle.step)
        except (TimeoutError, FutureTimeoutError):
            # Stop the writer now: nothing of this save may commit after we say it did not.
            self._abort_writer()
            try:
                handle.result(timeout=_AFTER_KILL_S)  # it may have committed just before the kill
            except Exception:  # noqa: BLE001 - killed (or failed): not committed
                logger.warning(
                    "termination signal: abandoned the in-flight save of step %d after %.1fs (not committed)",
                    handle.step, deadline_s,
                )  # fmt: skip
            else:
                logger.warning("termination signal: finished the in-flight save of step %d", handle.step)
        except Exception as e:  # noqa: BLE001 - it failed on its own
            logger.warning("termination signal: the in-flight save of step %d failed: %s", handle.step, e)

    def _exit(self, sig: int) -> None:
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, None)
        # Not a graceful close: that waits for an in-flight write (which could then still commit).
        self._abort_writer()
        os._exit(128 + sig)
