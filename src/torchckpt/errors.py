"""Errors raised by torchckpt.

Every error derives from :class:`CheckpointError` and from the builtin
exception a caller would naturally catch, so existing ``except`` clauses
keep working::

    Exception
    └── CheckpointError                          .path
        ├── CheckpointNotFoundError              (FileNotFoundError)
        ├── CheckpointExistsError                (FileExistsError)
        ├── CorruptCheckpointError               (ValueError)   .file .key
        ├── UnsafeObjectError                    (TypeError)    .key .type_name
        ├── ConfigError                          (ValueError, AssertionError) .field
        ├── UnsupportedURLError                  (ValueError)   .scheme
        ├── StateDictMismatchError               (RuntimeError) .key
        │   └── MissingKeysError                 .missing_keys
        ├── CheckpointIOError                    (OSError)      .rank .operation
        │   └── UploadError                      .step .url .failures {step: message}
        ├── BarrierTimeoutError                  (TimeoutError) .missing_ranks
        ├── WriterProcessError                   (RuntimeError) .pid .exitcode
        └── DistributedCheckpointError                          .failures {rank: cause}

Errors are raised ``from`` their cause. Messages name the path, and the key
and rank where they apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BarrierTimeoutError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "MissingKeysError",
    "StateDictMismatchError",
    "UnsafeObjectError",
    "UnsupportedURLError",
    "UploadError",
    "WriterProcessError",
]


class CheckpointError(Exception):
    """Base of every torchckpt error.

    Attributes:
        path: The checkpoint directory or file concerned, when known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the path."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        CheckpointError.__init__(self, message, path=path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists (or is being saved) where a save would put a new one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        CheckpointError.__init__(self, message, path=path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's bytes or manifest fail validation.

    Attributes:
        file: The file that failed (manifest or rank file), when known.
        key: The state-dict key whose bytes failed, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        file: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.file = file
        self.key = key


class UnsafeObjectError(CheckpointError, TypeError):
    """A value cannot be stored without pickle, or loading it would need pickle.

    Attributes:
        key: The key path of the value.
        type_name: The qualified name of its type.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        type_name: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.key = key
        self.type_name = type_name


class ConfigError(CheckpointError, ValueError, AssertionError):
    """A configuration value is invalid.

    Also an ``AssertionError``, which is what the reference API raised for
    the same mistakes.

    Attributes:
        field: The name of the offending field.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedURLError(CheckpointError, ValueError):
    """A path given as a URL (``s3://``, ``gs://``, ``file://``...): only local paths are supported.

    Attributes:
        scheme: The URL's scheme, in lower case.
    """

    def __init__(self, message: str, *, path: str | None = None, scheme: str | None = None) -> None:
        super().__init__(message, path=path)
        self.scheme = scheme


class StateDictMismatchError(CheckpointError, RuntimeError):
    """The template state dict does not match the checkpoint (type, dtype, shape).

    Attributes:
        key: The key path where the mismatch is.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message, path=path)
        self.key = key


class MissingKeysError(StateDictMismatchError):
    """A strict load found keys of the template absent from the checkpoint.

    Attributes:
        missing_keys: The key paths that are missing.
    """

    def __init__(self, message: str, *, path: str | None = None, missing_keys: Sequence[str] = ()) -> None:
        super().__init__(message, path=path)
        self.missing_keys = list(missing_keys)


class CheckpointIOError(CheckpointError, OSError):
    """An operating-system call failed while saving or loading.

    ``errno`` and ``strerror`` are those of the cause; ``str()`` starts with
    ``[Errno N]``.

    Attributes:
        rank: The rank that failed.
        operation: What it was doing ("write", "fsync", "rename", ...).
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        path: str | None = None,
        rank: int | None = None,
        operation: str | None = None,
    ) -> None:
        if errno is None:
            OSError.__init__(self, message)
        else:
            OSError.__init__(self, errno, message)
        self.path = path
        self.rank = rank
        self.operation = operation

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_io_error,
            (self.strerror or str(self), self.errno, self.path, self.rank, self.operation),
        )


def _rebuild_io_error(
    message: str, errno: int | None, path: str | None, rank: int | None, operation: str | None
) -> CheckpointIOError:
    return CheckpointIOError(message, errno=errno, path=path, rank=rank, operation=operation)


class UploadError(CheckpointIOError):
    """A CheckpointManager could not copy a committed step to its remote tier (the local copy is intact).

    ``errno`` is that of the (last) cause when it had one.

    Attributes:
        step: The (first) step whose upload failed.
        url: Where it was to be copied.
        failures: ``{step: why}`` of every failed upload the error reports.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        url: str,
        errno: int | None = None,
        failures: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(message, errno=errno, path=url, operation="upload")
        self.step = step
        self.url = url
        self.failures = dict(failures or {step: message})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_upload_error, (self.strerror or str(self), self.step, self.url, self.errno, self.failures))


def _rebuild_upload_error(
    message: str, step: int, url: str, errno: int | None, failures: dict[int, str]
) -> UploadError:
    return UploadError(message, step=step, url=url, errno=errno, failures=failures)


class BarrierTimeoutError(CheckpointError, TimeoutError):
    """Some ranks did not arrive at a barrier in time.

    Attributes:
        missing_ranks: The ranks that did not arrive.
    """

    def __init__(self, message: str, *, path: str | None = None, missing_ranks: Sequence[int] = ()) -> None:
        super().__init__(message, path=path)
        self.missing_ranks = list(missing_ranks)


class WriterProcessError(CheckpointError, RuntimeError):
    """The background writer subprocess died or failed to start.

    Attributes:
        pid: The writer's process id.
        exitcode: Its exit code (negative: killed by that signal).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.pid = pid
        self.exitcode = exitcode


class DistributedCheckpointError(CheckpointError):
    """One or more ranks failed a collective save; raised identically on every rank.

    Attributes:
        failures: ``{rank: description of its error}``.
    """

    def __init__(self, message: str, *, path: str | None = None, failures: Mapping[int, str] | None = None) -> None:
        super().__init__(message, path=path)
        self.failures = dict(failures or {})
