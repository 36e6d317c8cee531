"""From a checkpoint path to the storage that holds it."""

from __future__ import annotations

import os

from .base import Storage
from .local import LocalStorage

__all__ = ["storage_for"]


def storage_for(path: str | os.PathLike[str]) -> Storage:
    """The storage of the checkpoint at ``path``.

    Raises:
        UnsupportedURLError: ``path`` is a URL of a storage torchckpt does not have.
    """
    return LocalStorage(path)
