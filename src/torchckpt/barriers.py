"""Barriers that make every rank wait for the others before a checkpoint is committed.

``Barrier.execute_barrier()`` is called exactly once per
``CheckpointWriter.write``, on every rank, after the rank's data is durable
and before the coordinator commits. It returns once every rank has arrived,
or raises :class:`~torchckpt.errors.BarrierTimeoutError` naming the ranks
that did not arrive within the timeout.

Call order of the extension point: a :class:`Barrier` subclass is made
available by name with :func:`register_barrier` (at import time); the
builders turn a :class:`BarrierConfig` into an instance with
:func:`create_barrier_from_config` once per writer (in the writer subprocess
for async checkpointers), calling ``__init__(**barrier_args)``; the writer
then calls ``execute_barrier()`` once per write, as above.

Built in: ``"dist_barrier"`` (:class:`DistBarrier`, the default process
group's store), ``"tcp_store"`` (:class:`TCPStoreBarrier`, a store rank 0
serves through :func:`torchckpt.stores.start_store`) and ``"store"``
(:class:`StoreBarrier`, joins a store the job already runs).
:class:`BarrierConfig` is defined in :mod:`torchckpt.config` and re-exported here.
"""

from __future__ import annotations

import abc
import itertools
import logging
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .config import BarrierConfig
from .errors import BarrierTimeoutError, ConfigError
from .stores import start_store

__all__ = [
    "BARRIER_REGISTRY",
    "Barrier",
    "BarrierConfig",
    "BoundedStore",
    "DistBarrier",
    "StoreBarrier",
    "TCPStoreBarrier",
    "create_barrier_from_config",
    "register_barrier",
]

logger = logging.getLogger(__name__)

#: The real store class (``dist.TCPStore`` may be patched by the time a barrier is built).
_TCPSTORE: type = dist.TCPStore

#: Barrier classes by their ``barrier_type`` name.
BARRIER_REGISTRY: dict[str, type] = {}


def register_barrier(barrier_class: type) -> type:
    """Class decorator: make ``barrier_class`` available under its ``barrier_type``."""
    name = getattr(barrier_class, "barrier_type", None)
    if name is not None:
        BARRIER_REGISTRY[name] = barrier_class
    return barrier_class


def create_barrier_from_config(barrier_config: BarrierConfig) -> Barrier | None:
    """Build the barrier ``barrier_config`` names (None when it names none).

    Raises:
        ConfigError: The type is not registered (also a ``ValueError``).
    """
    if barrier_config.barrier_type is None:
        return None
    cls = BARRIER_REGISTRY.get(barrier_config.barrier_type)
    if cls is None:
        raise ConfigError(
            f"Unknown barrier type: {barrier_config.barrier_type}. Available types: {sorted(BARRIER_REGISTRY)}",
            field="barrier_type",
        )
    barrier: Barrier = cls(**barrier_config.barrier_args)
    return barrier


class Barrier(abc.ABC):
    """A synchronisation point of all ranks."""

    @abc.abstractmethod
    def __init__(self, **kwargs: Any) -> None:
        """Barrier-specific construction."""

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Return once every rank has called it, or raise on timeout."""


@register_barrier
class DistBarrier(Barrier):
    """A barrier over the default ``torch.distributed`` process group.

    It counts the ranks in through the process group's key-value store, under
    a deadline that holds on every rank, and names the ranks that did not
    arrive. (gloo's ``monitored_barrier`` names them on rank 0 only, and the
    other ranks wait for rank 0's answer past any timeout when rank 0 gives up
    early; ``barrier`` has no timeout on the CPU.) Like any collective of the
    default group, its calls must come in the same order on every rank: the
    n-th call on one rank meets the n-th call on the others.

    Args:
        timeout_secs: Longest wait in seconds (None: the process group's default timeout).

    Raises:
        ConfigError: No process group is initialised (also an ``AssertionError``).
    """

    barrier_type = "dist_barrier"
    _calls = itertools.count()  # per process, over every DistBarrier: the same sequence on every rank

    def __init__(self, timeout_secs: float | None = None) -> None:
        if not dist.is_initialized():
            raise ConfigError("DistBarrier requires an initialized process group.")
        self._timeout_secs = timeout_secs
        self._timeout = timeout_secs or dist.default_pg_timeout.total_seconds()
        self._store = _bounded_job_store(self._timeout)

    @property
    def store(self) -> Any:
        """The job's store (every operation gives up after the timeout)."""
        return self._store

    def execute_barrier(self) -> None:
        seq = next(DistBarrier._calls)
        store, timeout = self._store, self._timeout
        rank, world = dist.get_rank(), dist.get_world_size()
        _arrive_and_wait(
            store, f"dist_barrier/{seq}", rank=rank, world_size=world, timeout_s=timeout,
            name=f"dist_barrier #{seq}",
        )  # fmt: skip
        if seq >= 2:
            _forget(store, f"dist_barrier/{seq - 2}", rank=rank)


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier through a ``torch.distributed.TCPStore`` (no process group needed).

    Rank 0 hosts the store. Each barrier has a sequence number per prefix;
    every rank records the sequence it reached under ``rank<N>``, which is how
    a timeout names the ranks that did not arrive.

    Args:
        global_rank: This rank.
        global_world_size: Number of ranks.
        barrier_prefix: Names this barrier's keys in the store.
        timeout_barrier_init_secs: Longest wait to connect to the store.
        use_checkpoint_barrier_tcpstore_libuv: Serve the store that rank 0 hosts
            through torch's libuv backend (True) or its older one (False). The
            other ranks are clients of that store: for them it changes nothing.
        tcpstore_port: Port of the store.
        master_address: Host of the store (rank 0 listens on this address only).
        timeout_secs: Longest wait for the other ranks at each barrier (enforced).
    """

    barrier_type = "tcp_store"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str,
        timeout_barrier_init_secs: int,
        use_checkpoint_barrier_tcpstore_libuv: bool,
        tcpstore_port: int,
        master_address: str,
        timeout_secs: int,
    ) -> None:
        logger.info(
            "connecting barrier store %s:%s (rank %s of %s, prefix %s, timeout %ss)",
            master_address,
            tcpstore_port,
            global_rank,
            global_world_size,
            barrier_prefix,
            timeout_secs,
        )
        self._tcp_store_barrier_seq: Counter[str] = Counter()
        self._barrier_prefix = barrier_prefix
        self._global_rank = global_rank
        self._global_world_size = global_world_size
        self._timeout_secs = timeout_secs
        # Looked up at call time (dist.TCPStore), so tests and users can patch it.
        store_cls = dist.TCPStore
        if global_rank == 0 and isinstance(store_cls, type) and issubclass(store_cls, _TCPSTORE):
            # A plain TCPStore server listens on every interface, whatever its host
            # argument: hand it a socket bound to master_address instead.
            self._tcp_store = start_store(
                master_address, global_world_size, port=int(tcpstore_port), timeout_s=timeout_barrier_init_secs,
                use_libuv=bool(use_checkpoint_barrier_tcpstore_libuv),
            )  # fmt: skip
        else:
            self._tcp_store = store_cls(
                master_address,
                int(tcpstore_port),
                world_size=global_world_size,
                timeout=timedelta(seconds=timeout_barrier_init_secs),
                is_master=(global_rank == 0),
            )

    @property
    def store(self) -> Any:
        """The underlying store."""
        return self._tcp_store

    def execute_barrier(self) -> None:
        import torch.distributed.elastic.utils.store as store_util

        prefix = self._barrier_prefix
        seq = self._tcp_store_barrier_seq[prefix]
        self._tcp_store.set(f"rank{self._global_rank}", str(seq))
        # Arrive and wait under our own deadline (timeout_secs is enforced here);
        # the elastic barrier after it then completes at once on every rank.
        _arrive_and_wait(
            self._tcp_store, f"{prefix}{seq}/torchckpt", rank=self._global_rank,
            world_size=self._global_world_size, timeout_s=self._timeout_secs, name=f"{prefix!r} #{seq}",
        )  # fmt: skip
        store_util.barrier(store=self._tcp_store, world_size=self._global_world_size, key_prefix=prefix + str(seq))
        self._tcp_store_barrier_seq[prefix] += 1


def _arrive_and_wait(store: Any, key: str, *, rank: int, world_size: int, timeout_s: float, name: str) -> None:
    """Count this rank in under ``key`` and wait for all, at most ``timeout_s``; name who is missing."""
    store.add(f"{key}/arrived/{rank}", 1)
    if store.add(f"{key}/count", 1) == world_size:
        store.add(f"{key}/all", 1)
    try:
        store.wait([f"{key}/all"], timedelta(seconds=timeout_s))
    except Exception as e:
        if not _is_timeout(e):
            raise
        missing: list[int] = []
        try:
            for r in range(world_size):
                if not store.check([f"{key}/arrived/{r}"]):
                    missing.append(r)
        except Exception:  # noqa: BLE001 - the store itself is gone or hung: who is missing is unknown
            missing = []
        raise BarrierTimeoutError(
            f"rank {rank}: timed out after {timeout_s:g}s at barrier {name}; ranks that did not arrive: {missing}",
            missing_ranks=missing,
        ) from e


class BoundedStore(dist.Store):
    """A store whose every operation gives up after ``timeout_s`` seconds.

    A ``TCPStore`` client waits without limit for an answer to ``add``,
    ``set`` or ``get`` when the process serving the store hangs (a stopped
    rank 0); so each operation runs in a daemon thread the caller waits for
    at most ``timeout_s`` (a hung one is abandoned, and the operations queued
    behind it time out too). Raises ``TimeoutError`` on expiry.
    """

    def __init__(self, inner: Any, timeout_s: float) -> None:
        super().__init__()
        self._inner = inner
        self._timeout_s = timeout_s

    def _call(self, name: str, *args: Any) -> Any:
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, getattr(self._inner, name)(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))

        thread = threading.Thread(target=run, name=f"torchckpt-store-{name}", daemon=True)
        thread.start()
        limit_s = self._timeout_s + (_wait_seconds(args) if name == "wait" else 0)
        thread.join(limit_s)
        if not box:
            raise TimeoutError(f"the store did not answer {name}() within {limit_s:g}s (its host hung?)")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def set(self, key: str, value: Any) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)  # type: ignore[no-any-return]

    def add(self, key: str, value: int) -> int:
        return self._call("add", key, value)  # type: ignore[no-any-return]

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)  # type: ignore[no-any-return]

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)  # type: ignore[no-any-return]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:  # type: ignore[override]
        self._call("wait", keys, timeout if timeout is not None else timedelta(seconds=self._timeout_s))

    def num_keys(self) -> int:
        return self._call("num_keys")  # type: ignore[no-any-return]


def _wait_seconds(args: tuple[Any, ...]) -> float:
    return args[1].total_seconds() if len(args) > 1 and isinstance(args[1], timedelta) else 0.0


def _bounded_job_store(timeout_s: float) -> BoundedStore:
    """The default process group's store, under ``torchckpt/``, with every operation bounded by ``timeout_s``."""
    return BoundedStore(dist.PrefixStore("torchckpt", dist.distributed_c10d._get_default_store()), timeout_s)


def _forget(store: Any, key: str, *, rank: int) -> None:
    """Delete this rank's keys of a past barrier (every rank is done with it), so the store does not grow."""
    names = [f"{key}/arrived/{rank}"] + ([f"{key}/count", f"{key}/all"] if rank == 0 else [])
    for name in names:
        try:
            store.delete_key(name)
        except Exception:  # noqa: BLE001 - cleanup only; a store without delete_key keeps them
            logger.debug("could not delete barrier key %s", name)


@register_barrier
class StoreBarrier(Barrier):
    """A barrier through an existing ``TCPStore`` that this process joins as a client.

    Used by the builders for writer subprocesses, which have no process group:
    they join the store the job already runs (torchrun's, or the process
    group's), under the key prefix ``torchckpt/``.

    Args:
        global_rank: This rank.
        global_world_size: Number of ranks.
        master_address: Host of the store.
        port: Its port.
        timeout_secs: Longest wait for the other ranks (enforced; the error names them).
        barrier_prefix: Names this barrier's keys.
    """

    barrier_type = "store"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        master_address: str,
        port: int,
        timeout_secs: float = 600,
        barrier_prefix: str = "barrier",
    ) -> None:
        self._rank = global_rank
        self._world_size = global_world_size
        self._timeout_secs = timeout_secs
        self._prefix = barrier_prefix
        self._seq = 0
        client = dist.TCPStore(master_address, int(port), is_master=False, timeout=timedelta(seconds=timeout_secs))
        self._store = BoundedStore(dist.PrefixStore("torchckpt", client), timeout_secs)

    @property
    def store(self) -> Any:
        """The (prefixed) store the ranks agree through."""
        return self._store

    def execute_barrier(self) -> None:
        seq = self._seq
        self._seq += 1
        key = f"{self._prefix}/{seq}"
        _arrive_and_wait(
            self._store, key, rank=self._rank, world_size=self._world_size,
            timeout_s=self._timeout_secs, name=repr(key),
        )  # fmt: skip
        if seq >= 2:
            _forget(self._store, f"{self._prefix}/{seq - 2}", rank=self._rank)


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or "timeout" in str(e).lower() or "timed out" in str(e).lower()
