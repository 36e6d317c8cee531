"""Pipelined background saves: the writer starts on the first staged bytes while staging goes on.

A large state is staged in *groups*: runs of tensors in table order of about
``GROUP_BYTES`` each. The training process's side, :class:`Handover`, hands
the writer subprocess the save's plan (the flattened state, its tensors in
the staging arena) as soon as the arena is laid out, then, as each group's
copies finish, the number of groups staged so far. The writer's side,
:class:`StagedProgress`, makes the write of a tensor wait until the group that
holds it is staged. Save-to-durable then approaches the slower of staging and
writing instead of their sum.

Messages (``RequestType.STAGED`` on the writer's pipe, after the write request
of the same save): ``{"save_number", "groups", "error", "stall_s"}``. ``groups``
only grows; ``error`` (a message) means staging failed: the write fails and
commits nothing. The last message (``groups`` equal to the number of groups)
carries ``stall_s``, the save's stall. A message that arrives outside its
write (the write had already failed) is dropped.

Invariant: no byte of a group is read by the writer before the training
process has sent that group's message, and the training process sends it only
after every copy into that group has returned; the pipe's system calls order
the copies before the writer's reads. A save that needs every byte before its
first write (an incremental save's digests, the agreement on replicated
tensors, the ``torch_save`` layout, a user's writer) waits for the last group first.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["GROUP_BYTES", "Handover", "StagedProgress", "StagingFailedError", "stage_groups"]

logger = logging.getLogger(__name__)

#: Bytes per staging group (the writer waits for whole groups).
GROUP_BYTES = 64 * 2**20
#: States with fewer tensor bytes than this are staged whole before the write request is sent.
PIPELINE_MIN_BYTES = 2 * GROUP_BYTES


class StagingFailedError(RuntimeError):
    """Staging failed in the training process after the pipelined write had started (nothing is committed)."""


def stage_groups(sizes: list[int], group_bytes: int | None = None) -> list[int] | None:
    """Cut tensors of ``sizes`` bytes (table order) into groups; the end index of each, or None when one group.

    A group closes once it holds ``group_bytes`` (default ``GROUP_BYTES``) or
    more; a tensor is never split between groups. A state of fewer than
    ``PIPELINE_MIN_BYTES`` is one group.
    """
    if group_bytes is None:
        group_bytes = GROUP_BYTES
    if sum(sizes) < max(PIPELINE_MIN_BYTES, 2 * group_bytes):
        return None
    ends: list[int] = []
    acc = 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= group_bytes:
            ends.append(i + 1)
            acc = 0
    if not ends or ends[-1] != len(sizes):
        ends.append(len(sizes))
    return ends if len(ends) > 1 else None


class Handover:
    """The training process's side of one pipelined save.

    The stager calls :meth:`plan` once the arena is laid out, :meth:`staged`
    after each group and :meth:`fail` when staging fails; the thread that sends
    the write request calls :meth:`attach` (which sends it) and :meth:`detach`
    once the write has ended. Messages are sent only while attached, in order,
    under one lock.

    Args:
        called_at: ``time.perf_counter()`` when the save was called (for ``stall_s``).
    """

    def __init__(self, called_at: float | None = None) -> None:
        self.called_at = called_at
        #: Resolves to ``(flattened, group ends or None)`` once the plan is made, or to staging's error.
        self.planned: Future[tuple[Any, list[int] | None]] = Future()
        self._lock = threading.Lock()
        self._send: Callable[[dict[str, Any]], None] | None = None
        self._save_number = -1
        self._groups = 0
        self._error: str | None = None
        self._stall_s: float | None = None

    def plan(self, flat: Any, ends: list[int] | None) -> None:
        """The state's plan is made: ``ends`` of its groups, or None when it is staged whole already."""
        self.planned.set_result((flat, ends))

    def staged(self, groups: int, *, last: bool = False) -> None:
        """``groups`` groups are staged (``last``: all of them)."""
        with self._lock:
            self._groups = groups
            if last and self.called_at is not None:
                self._stall_s = time.perf_counter() - self.called_at
            self._notify()

    def fail(self, error: BaseException) -> None:
        """Staging failed: before the plan, the plan holds the error; after it, the writer is told."""
        if not self.planned.done():
            self.planned.set_exception(error)
            return
        with self._lock:
            self._error = f"{type(error).__name__}: {error}"
            self._notify()

    def attach(
        self, save_number: int, send_request: Callable[[], None], send: Callable[[dict[str, Any]], None]
    ) -> None:
        """Send the write request (``send_request``), then every message from now on (``send``)."""
        with self._lock:
            send_request()
            self._save_number = save_number
            self._send = send
            if self._groups or self._error is not None:
                self._notify()

    def detach(self) -> None:
        """The write has ended: send nothing more."""
        with self._lock:
            self._send = None

    def _notify(self) -> None:
        if self._send is None:
            return
        try:
            self._send({
                "save_number": self._save_number, "groups": self._groups, "error": self._error,
                "stall_s": self._stall_s,
            })
        except Exception as e:  # noqa: BLE001 - the writer is gone: its write fails with that; staging goes on
            logger.debug("could not tell the writer of staging progress: %s", e)
            self._send = None


class StagedProgress:
    """The writer's side of one pipelined save: waits until the tensors it is about to write are staged.

    Safe to call from several writing threads: one reads the pipe at a time,
    the others wait for what it reads.

    Args:
        recv: Returns the next ``STAGED`` payload of the pipe, waiting at most the seconds given
            (raises ``TimeoutError`` when none came, another error when something else came).
        save_number: The save's number (payloads of other saves are dropped).
        ends: The end index of each group.
        timeout_s: Longest wait for the next group.
        path: The checkpoint written (for messages).
    """

    def __init__(
        self, recv: Callable[[float], dict[str, Any]], save_number: int, ends: list[int], timeout_s: float, path: str
    ) -> None:
        self._recv = recv
        self._save_number = save_number
        self._ends = list(ends)
        self._timeout_s = timeout_s
        self._path = path
        self._cond = threading.Condition()
        self._reading = False
        self._groups = 0
        self._error: str | None = None
        self._last = time.monotonic()  # when the last group (or the request) came
        #: Figures sent with the last group (``stall_s``).
        self.stats: dict[str, float] = {}

    @property
    def complete(self) -> bool:
        """Whether every group is staged."""
        return self._groups >= len(self._ends)

    def wait_for(self, index: int) -> None:
        """Return once tensor ``index`` (table order) is staged.

        Raises:
            StagingFailedError: Staging failed in the training process.
            TimeoutError: No group was staged for ``timeout_s`` seconds.
            Exception: The pipe failed or carried another request (``recv``'s error).
        """
        self._wait_groups(self.group_of(index) + 1)

    def wait_all(self) -> None:
        """Return once every tensor is staged (raises as :meth:`wait_for`)."""
        self._wait_groups(len(self._ends))

    def group_of(self, index: int) -> int:
        """The group that holds tensor ``index``."""
        return bisect.bisect_right(self._ends, index)

    def _wait_groups(self, need: int) -> None:
        while True:
            with self._cond:
                self._check()
                if self._groups >= need:
                    return
                remaining = self._last + self._timeout_s - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"the writer waited {self._timeout_s}s for staging of the save to {self._path}: "
                        f"{self._groups} of {len(self._ends)} groups staged"
                    )
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
            payload: dict[str, Any] | None = None
            try:
                payload = self._recv(remaining)
            except TimeoutError:
                pass  # the deadline is checked above, with what came meanwhile
            finally:
                with self._cond:
                    self._reading = False
                    if payload is not None and payload.get("save_number") == self._save_number:
                        self._last = time.monotonic()
                        self._groups = max(self._groups, int(payload.get("groups", 0)))
                        if payload.get("error") is not None:
                            self._error = str(payload["error"])
                        if payload.get("stall_s") is not None:
                            self.stats["stall_s"] = float(payload["stall_s"])
                    self._cond.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise StagingFailedError(f"staging of the save to {self._path} failed in the training process: {self._error}")
