"""Small helpers of the public API."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import FrameType
from typing import Any, TypeVar

__all__ = ["call_with_stack", "caller_stacklevel", "close_on_exit", "stack_depth", "wrap_future"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def wrap_future(original_result: Any) -> Future[None]:
    """Return a future that resolves to ``None`` once ``original_result`` does.

    Args:
        original_result: A ``Future`` (its exception, if any, is propagated) or
            any other value (the returned future is already done).

    Returns:
        A future whose result is ``None``.
    """
    masked: Future[None] = Future()
    if not isinstance(original_result, Future):
        masked.set_result(None)
        return masked

    def _on_done(done: Future[Any]) -> None:
        if done.cancelled():
            masked.cancel()
            return
        exc = done.exception()
        if exc is not None:
            masked.set_exception(exc)
        else:
            masked.set_result(None)

    original_result.add_done_callback(_on_done)
    return masked


def stack_depth() -> int:
    """The number of Python frames on the calling thread's stack (the caller's included)."""
    depth = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes the caller's ``warnings.warn`` name the first frame outside torchckpt.

    A warning about an argument belongs at the user's line that passed it, however
    many of torchckpt's frames lie between (save, write, the writer's steps).
    Where the stack holds no frame outside the package (a helper thread), the
    outermost frame is named.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def call_with_stack(frames_needed: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` where at least ``frames_needed`` frames of recursion are left.

    Checkpoint trees are nested up to a fixed depth, and parts of a save or a
    load (the JSON codec, pickle, tree walks) recurse once per level. Whether
    that fits must not depend on how deep the caller already is: when fewer
    than ``frames_needed`` frames are left below the interpreter's recursion
    limit, ``fn`` runs on a new thread, whose stack starts empty, and this call
    waits for it. An interrupt (``KeyboardInterrupt``) that arrives meanwhile is
    raised once ``fn`` has finished, so ``fn`` never runs on unobserved.

    Returns:
        What ``fn`` returns.

    Raises:
        Whatever ``fn`` raises.
    """
    if sys.getrecursionlimit() - stack_depth() >= frames_needed:
        return fn(*args, **kwargs)
    outcome: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            failure.append(e)

    worker = threading.Thread(target=run, name="torchckpt-deep-stack", daemon=True)
    worker.start()
    interrupt: BaseException | None = None
    while worker.is_alive():
        try:
            worker.join()
        except BaseException as e:  # noqa: BLE001 - raised once fn has finished
            interrupt = interrupt or e
    if interrupt is not None:
        raise interrupt
    if failure:
        raise failure[0]
    return outcome[0]  # type: ignore[no-any-return]


def close_on_exit(close: Callable[[], None], exc_type: type[BaseException] | None, what: str) -> None:
    """``close()`` at the end of a ``with`` block, never replacing the exception that leaves it.

    With no exception in flight, an error of ``close`` is raised; with one (a
    Ctrl-C too), it is logged and the caller's own exception propagates.
    """
    if exc_type is None:
        close()
        return
    try:
        close()
    except Exception as e:  # noqa: BLE001 - logged: the caller's own exception propagates
        logger.warning("closing the %s after %s failed: %s", what, exc_type.__name__, e)
