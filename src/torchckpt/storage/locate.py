"""From a checkpoint path or URL to the storage that holds it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import Storage
from .local import LocalStorage
from .object_client import is_object_url

__all__ = ["is_object_url", "storage_for"]


def storage_for(path: str | os.PathLike[str], options: Mapping[str, str] | None = None) -> Storage:
    """The storage of the checkpoint at ``path``: an object store for its URLs, else the local directory.

    Args:
        path: A local path, or ``s3://``, ``gs://``, ``az://``, ``memory://`` URL.
        options: The object store client's configuration keys, on top of the
            environment (``storage/object_client.py``); ignored for a local path.

    Raises:
        UnsupportedURLError: ``path`` is a URL of a storage torchckpt does not have.
    """
    if is_object_url(path):
        from .object_storage import ObjectStorage

        return ObjectStorage(os.fspath(path), options)
    return LocalStorage(path)
