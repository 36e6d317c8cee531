"""Small helpers of the public API."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

__all__ = ["wrap_future"]


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
