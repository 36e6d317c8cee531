"""SaveHandle: the outcome of one ``CheckpointManager.save``, delivered to the caller exactly once.

An error of a save reaches the caller once: through the handle's
``result()`` or ``exception()``, or else from the manager's next ``save``,
``wait`` or ``close`` (which call :meth:`SaveHandle.raise_if_unseen`),
whichever comes first.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

__all__ = ["SaveHandle"]


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

    def raise_if_unseen(self) -> None:
        """Wait until the save has finished; raise its error unless the caller has already received it.

        What the manager calls before its next save, in ``wait`` and in
        ``close``, so that an error is raised once and never lost.
        """
        if self._future is None:
            return
        error = self._future.exception()
        if error is not None and not self._delivered:
            self._delivered = True
            raise error
