"""The writer subprocess that writes staged checkpoints in the background."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CheckpointProcessConfig"]


@dataclass(frozen=True, kw_only=True)
class CheckpointProcessConfig:
    """Options of the writer subprocess.

    Attributes:
        subprocess_init_timeout_secs: Longest wait for the subprocess to start.
        subprocess_shutdown_timeout_secs: Longest wait for it to exit on close before it is killed.
    """

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
