"""Staging: a snapshot of the state in CPU memory, so training can go on while it is written."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CheckpointStagerConfig"]


@dataclass(frozen=True, kw_only=True)
class CheckpointStagerConfig:
    """Options of the stager. None means: decide from the machine.

    Attributes:
        use_pinned_memory: Page-locked staging memory (default: when an accelerator exists).
        use_shared_memory: Stage into shared memory the writer subprocess maps (default True).
        use_async_staging: Copy in a background thread; ``stage`` returns a future (default True).
        use_non_blocking_copy: Non-blocking device-to-host copies on a staging stream
            (default: when an accelerator exists; True without one is an error).
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool | None = None
    use_async_staging: bool | None = None
    use_non_blocking_copy: bool | None = None
