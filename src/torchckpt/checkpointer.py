"""Checkpointers: the object a training loop holds to save and load its state."""

from __future__ import annotations

import abc
import logging
from concurrent.futures import Future
from typing import Any

from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter
from .errors import MissingKeysError
from .types import STATE_DICT

__all__ = ["Checkpointer", "SyncCheckpointer"]

logger = logging.getLogger(__name__)


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
            **kwargs: Passed to ``CheckpointReader.read``.

        Returns:
            The loaded state dict.

        Raises:
            MissingKeysError: ``strict`` and keys are missing (a ``RuntimeError``).
        """
        loaded, missing = self._reader.read(path, state_dict, map_location=default_map_location, **kwargs)
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

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self._writer.write(path, state_dict, **kwargs)
        return None

    def close(self) -> None:
        self._writer.close()
