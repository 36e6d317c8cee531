"""The configuration of a checkpointer: one config per component, composed in :class:`CheckpointerConfig`.

This is a base module: it imports nothing of torchckpt but :mod:`torchckpt.errors`,
and every component imports its config from here. Each component config is a
frozen dataclass whose ``__post_init__`` validates (naming field, value and
reason in a :class:`~torchckpt.errors.ConfigError`) and never rewrites a value:

- :class:`CheckpointWriterConfig`, :class:`CheckpointFormat`: the writer
  (:mod:`torchckpt.checkpoint_writer`).
- :class:`BarrierConfig`: which barrier the writer waits at (:mod:`torchckpt.barriers`).
- :class:`CheckpointStagerConfig`: the stager of async saves (:mod:`torchckpt.staging`).
- :class:`CheckpointProcessConfig`: the writer subprocess of async saves
  (:mod:`torchckpt.checkpoint_process`).

Each is also importable from the module of the reference API that defines it
there (``torchckpt.checkpoint_writer.CheckpointWriterConfig``,
``torchckpt.barriers.BarrierConfig``, ``torchckpt.staging.CheckpointStagerConfig``,
``torchckpt.checkpoint_process.CheckpointProcessConfig``): the same classes.
:class:`CheckpointerConfig` stays mutable, as the reference's own tests
assign its ``staging_config``. The builders (:mod:`torchckpt.builder`) read
it and hand each component its part.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from .errors import ConfigError

__all__ = [
    "BarrierConfig",
    "CheckpointFormat",
    "CheckpointProcessConfig",
    "CheckpointStagerConfig",
    "CheckpointWriterConfig",
    "CheckpointerConfig",
    "accelerator_available",
]


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS...) in this process; False when it cannot tell."""
    try:
        return bool(torch.accelerator.is_available())
    except (AttributeError, RuntimeError):
        return False


class CheckpointFormat(str, enum.Enum):
    """The on-disk layout of a checkpoint's rank files."""

    #: ``checkpoint_<rank>.pt`` written by ``torch.save`` (what the reference writes).
    TORCH_SAVE = "torch_save"
    #: One safetensors file per rank, checksummed, with typed-JSON structure (native).
    SAFETENSORS = "safetensors"


@dataclass(frozen=True)
class CheckpointWriterConfig:
    """Options of :class:`~torchckpt.checkpoint_writer.CheckpointWriter`.

    Attributes:
        write_barrier_timeout_secs: Longest wait, in seconds, for the other ranks
            (and for another save holding the same path).
        format: Layout of the rank files: ``"torch_save"`` (default, what the
            reference writes) or ``"safetensors"`` (native: parallel, checksummed
            per tensor, partial loads read only what they need).
        allow_pickle: Store values that have no safe form with pickle instead of
            refusing them at save time. Loading them then needs ``allow_pickle`` too.
        io_threads: Threads writing one rank file in parallel (native format).
        dedup_replicated: Write a plain tensor that every rank holds with the same
            bytes once, by one rank, the writes spread over the ranks (native format,
            several ranks agreeing through a store; ``replicas.py``). Off by default:
            the reference writes every rank's state; the manager turns it on.
        storage_options: The object store client's configuration keys (``endpoint``,
            ``region``, ``allow_http``, ...) for saves to ``s3://``, ``gs://``, ``az://``
            URLs, on top of the standard environment (``AWS_ENDPOINT_URL``, ...).
            None: the environment alone.
    """

    write_barrier_timeout_secs: int = 600
    # Positional as in the reference up to here; torchckpt's own options are keyword-only.
    _: KW_ONLY
    format: CheckpointFormat | str = CheckpointFormat.TORCH_SAVE
    allow_pickle: bool = False
    io_threads: int = 2
    dedup_replicated: bool = False
    storage_options: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.storage_options is not None and (
            not isinstance(self.storage_options, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.storage_options.items())
        ):
            raise ConfigError(
                "CheckpointWriterConfig.storage_options must map option names to strings, "
                f"got {self.storage_options!r}",
                field="storage_options",
            )
        if self.write_barrier_timeout_secs <= 0:
            raise ConfigError(
                f"CheckpointWriterConfig.write_barrier_timeout_secs must be > 0, got {self.write_barrier_timeout_secs}",
                field="write_barrier_timeout_secs",
            )
        if self.format not in tuple(CheckpointFormat):
            raise ConfigError(
                f"CheckpointWriterConfig.format must be one of {[f.value for f in CheckpointFormat]}, "
                f"got {self.format!r}",
                field="format",
            )
        if self.io_threads < 1:
            raise ConfigError(
                f"CheckpointWriterConfig.io_threads must be >= 1, got {self.io_threads}", field="io_threads"
            )


@dataclass(frozen=True)
class BarrierConfig:
    """Which barrier a checkpointer uses.

    Attributes:
        barrier_type: A registered name (``"dist_barrier"``, ``"tcp_store"``,
            ``"store"``, or one added with
            :func:`~torchckpt.barriers.register_barrier`), or None for no
            barrier (a single rank). Whether the name is registered is checked
            when the barrier is built
            (:func:`~torchckpt.barriers.create_barrier_from_config`).
        barrier_args: Keyword arguments of the barrier's constructor. Rank
            fields (``global_rank``, ``global_world_size``) left out are filled
            in from the checkpointer's rank information by the builders.
    """

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.barrier_type is not None and (not isinstance(self.barrier_type, str) or not self.barrier_type):
            raise ConfigError(
                f"BarrierConfig.barrier_type must be a barrier's registered name or None, got {self.barrier_type!r}",
                field="barrier_type",
            )
        if not isinstance(self.barrier_args, Mapping):
            raise ConfigError(
                "BarrierConfig.barrier_args must be a dict of the barrier's keyword arguments, "
                f"got {type(self.barrier_args).__name__} {self.barrier_args!r}",
                field="barrier_args",
            )
        bad = [k for k in self.barrier_args if not isinstance(k, str)]
        if bad:
            raise ConfigError(
                f"BarrierConfig.barrier_args must have keyword names (str) as keys, got {bad[0]!r}",
                field="barrier_args",
            )


@dataclass(frozen=True)
class CheckpointProcessConfig:
    """Options of the writer subprocess.

    Attributes:
        subprocess_init_timeout_secs: Longest wait for the subprocess to start and initialise.
        subprocess_shutdown_timeout_secs: Longest wait for it to exit on ``close`` before it is killed.
        write_timeout_secs: Longest wait for one write; past it the writer is killed and the
            write fails (None: no limit beyond the writer's own barrier timeouts).
    """

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
    # Positional as in the reference up to here; torchckpt's own options are keyword-only.
    _: KW_ONLY
    write_timeout_secs: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("subprocess_init_timeout_secs", "subprocess_shutdown_timeout_secs", "write_timeout_secs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"CheckpointProcessConfig.{name} must be > 0, got {value}", field=name)


@dataclass(frozen=True)
class CheckpointStagerConfig:
    """Options of the stager. A field left at None adapts to the machine.

    Attributes:
        use_pinned_memory: Page-locked staging memory, for fast device-to-host
            copies (default: when an accelerator exists).
        use_shared_memory: Stage into shared memory that the writer subprocess
            maps (default True).
        use_async_staging: Copy in a background thread; ``stage`` returns a
            future (default True).
        use_non_blocking_copy: Non-blocking device-to-host copies on a staging
            stream (default: when an accelerator exists; True without one is an error).
        pipelined_writes: The writer subprocess writes a large state's tensors
            (128 MiB or more, host memory) while the rest is still being staged
            (``pipeline.py``): the save is durable sooner, but the writer competes
            with the staging copies for CPU and memory bandwidth, so the stall can
            grow (measured on 2 cores, 512 MiB: durable 1.00x instead of 1.19x the
            sync save's time, stall 153 ms instead of 78 ms). Off by default: the
            stall is paid on every save; turn it on where cores are spare.
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool | None = None
    use_async_staging: bool | None = None
    use_non_blocking_copy: bool | None = None
    # Positional as in the reference up to here; torchckpt's own options are keyword-only.
    _: KW_ONLY
    pipelined_writes: bool = False

    def resolved(self) -> CheckpointStagerConfig:
        """This config with every None replaced by what this machine supports.

        Raises:
            ConfigError: ``use_non_blocking_copy=True`` and no accelerator is available
                (also an ``AssertionError``, as the reference raised).
        """
        accel = accelerator_available()
        if self.use_non_blocking_copy and not accel:
            raise ConfigError(
                "CheckpointStagerConfig.use_non_blocking_copy=True: Non-blocking copy requires that the current "
                "accelerator is available, and none is (leave it at None to adapt)",
                field="use_non_blocking_copy",
            )
        return CheckpointStagerConfig(
            use_pinned_memory=accel if self.use_pinned_memory is None else self.use_pinned_memory,
            use_shared_memory=True if self.use_shared_memory is None else self.use_shared_memory,
            use_async_staging=True if self.use_async_staging is None else self.use_async_staging,
            use_non_blocking_copy=accel if self.use_non_blocking_copy is None else self.use_non_blocking_copy,
            pipelined_writes=self.pipelined_writes,
        )


@dataclass
class CheckpointerConfig:
    """Everything the builders need to make a checkpointer.

    Attributes:
        writer_config: Options of the writer (format, timeout, pickle).
        barrier_config: Which barrier synchronises the ranks (None: chosen by the builder).
        staging_config: Options of the stager (async checkpointers only).
        process_config: Options of the writer subprocess (async checkpointers only).
    """

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
