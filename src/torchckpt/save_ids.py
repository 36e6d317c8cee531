"""The id the ranks of one save share: an object store names the save's generation with it.

Rank 0 draws it at random when the save starts and publishes it through the
key-value store the ranks agree through; the other ranks wait for it (bounded)
just before they begin writing. Without such a store every rank derives the
same id from the path and the save's number (unique while save numbers are).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from .errors import BarrierTimeoutError

__all__ = ["await_save_id", "derived_save_id", "new_save_id", "publish_save_id"]


def new_save_id() -> str:
    """A fresh id: 16 random hex digits."""
    return secrets.token_hex(8)


def derived_save_id(path: str, save_number: int) -> str:
    """The id every rank computes alike from the path and the save's number."""
    return "n" + hashlib.sha256(f"{path}\0{save_number}".encode()).hexdigest()[:16]


def publish_save_id(store: Any, prefix: str) -> str:
    """Rank 0: draw this save's id and publish it under ``prefix`` in ``store``; return it."""
    save_id = new_save_id()
    store.set(f"{prefix}/save_id", save_id)
    return save_id


def await_save_id(store: Any, prefix: str, *, timeout_s: float, path: str) -> str:
    """The id rank 0 published under ``prefix``, waited for at most ``timeout_s``.

    Raises:
        BarrierTimeoutError: Rank 0 did not publish it in time (names rank 0 and the path).
    """
    key = f"{prefix}/save_id"
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as e:  # the store's timeout, or its connection lost
        raise BarrierTimeoutError(
            f"save of {path}: rank 0 did not start the save within {timeout_s:g}s ({e})", path=path, missing_ranks=[0]
        ) from e
    return bytes(store.get(key)).decode()
