"""Staging: a snapshot of the state in CPU memory, so training goes on while it is written.

``DefaultStager`` copies every tensor of a state dict into staging memory and
returns a state dict of the same structure whose tensors live there. The
state is walked once, by :func:`torchckpt.format.tree.flatten`:
:meth:`DefaultStager.stage_flattened` returns that flattened form (the
typed-JSON tree, and the staged tensors in table order), which is what the
async path sends to the writer subprocess and what the writer plans its file
from; :meth:`DefaultStager.stage` (the reference's contract) rebuilds a state
dict from it. The
staging memory is allocated once per structure and reused: the second and
later saves of a state dict with the same keys, shapes and dtypes copy into
the buffers of the first. By default it is a shared-memory arena
(:mod:`torchckpt.shm`) that the writer subprocess maps once.

With an accelerator, device-to-host copies are issued on a dedicated stream
that first waits for the current (compute) stream, and the stage result is
ready only after that stream has finished them. Host-to-host copies of a
large state are split over two threads (``copy_`` releases the GIL): on a
machine with two or more cores that takes a quarter or more off the stall.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .config import CheckpointStagerConfig
from .format.gcpause import paused_gc
from .format.tree import Flattened, flatten, unflatten
from .pipeline import Handover, stage_groups
from .shm import SharedArena, pack
from .types import STATE_DICT

__all__ = ["CheckpointStager", "CheckpointStagerConfig", "DefaultStager", "staged_state_dict"]

logger = logging.getLogger(__name__)

#: Host-to-host staging copies of at least this many bytes in all are split over two threads.
PARALLEL_COPY_BYTES = 64 * 2**20

_Copy = tuple[torch.Tensor, torch.Tensor]  # (destination, source)


def split_copies(copies: list[_Copy], parts: int) -> list[list[_Copy]]:
    """Cut ``copies`` into ``parts`` lists of about equal bytes.

    A contiguous CPU source that straddles a boundary is cut there (flat
    slices of destination and source); any other copy goes whole into one part.
    Together the parts copy exactly the bytes of ``copies``.
    """
    total = sum(src.nbytes for _, src in copies)
    out: list[list[_Copy]] = [[] for _ in range(parts)]
    if total == 0:
        out[0] = list(copies)
        return out
    acc = 0  # bytes assigned so far
    for dst, src in copies:
        n = src.nbytes
        part = min(parts - 1, acc * parts // total)
        end = (part + 1) * total // parts  # where this part's share ends
        splittable = src.is_cpu and dst.is_cpu and src.is_contiguous() and dst.is_contiguous() and src.dim() > 0
        if not splittable or acc + n <= end or part == parts - 1:
            out[part].append((dst, src))
            acc += n
            continue
        flat_dst, flat_src = dst.view(-1), src.view(-1)
        size, numel, lo = src.element_size(), src.numel(), 0
        while lo < numel:
            part = min(parts - 1, acc * parts // total)
            end = (part + 1) * total // parts
            take = numel - lo if part == parts - 1 else max(1, min(numel - lo, -(-(end - acc) // size)))
            out[part].append((flat_dst[lo : lo + take], flat_src[lo : lo + take]))
            lo += take
            acc += take * size
    return out


def _copy_all(copies: list[_Copy], non_blocking: bool = False) -> None:
    with torch.no_grad():  # grad mode is per thread
        for dst, src in copies:
            dst.copy_(src, non_blocking=non_blocking)


def _accelerator_available() -> bool:
    try:
        return bool(torch.accelerator.is_available())
    except (AttributeError, RuntimeError):
        return False


class CheckpointStager(abc.ABC):
    """Makes a snapshot of a state dict that stays valid while training goes on."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Return the staged copy, or a future of it (asynchronous staging)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release staging memory and threads."""


@dataclass
class _Buffers:
    """Staging memory for one structure of state dict."""

    signature: tuple[Any, ...]
    tensors: list[torch.Tensor]
    arena: SharedArena | None


class _StateDictStager:
    """Copies a state dict's tensors into reused staging buffers."""

    def __init__(self, *, pin_memory: bool, share_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.share_memory = share_memory
        self._buffers: _Buffers | None = None
        self._copy_helper: ThreadPoolExecutor | None = None

    @staticmethod
    def _signature(flat: Flattened) -> tuple[Any, ...]:
        return tuple((tuple(t.shape), t.dtype) for t in flat.tensors)

    def _allocate(self, flat: Flattened) -> _Buffers:
        old = self._buffers
        if self.share_memory:
            offsets, total = pack([t.numel() * t.element_size() for t in flat.tensors])
            if old is not None and old.arena is not None and old.arena.size_bytes >= total:
                arena = old.arena  # the same or a smaller state: re-lay the tensors in place
            else:
                if old is not None and old.arena is not None:
                    old.arena.close()
                arena = SharedArena(total, pin=self.pin_memory)
            tensors = [arena.tensor(o, t.dtype, tuple(t.shape)) for o, t in zip(offsets, flat.tensors)]
            return _Buffers(self._signature(flat), tensors, arena)
        # Private memory: keep every buffer whose shape and dtype still occur.
        reuse: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for t in old.tensors if old is not None else []:
            reuse.setdefault((tuple(t.shape), t.dtype), []).append(t)
        pin = self.pin_memory and _accelerator_available()
        tensors = []
        for t in flat.tensors:
            pool = reuse.get((tuple(t.shape), t.dtype))
            tensors.append(pool.pop() if pool else torch.empty(t.shape, dtype=t.dtype, pin_memory=pin))
        return _Buffers(self._signature(flat), tensors, None)

    @paused_gc()  # flatten builds objects per entry: see format/gcpause.py
    def stage(self, state_dict: STATE_DICT, *, non_blocking: bool, handover: Handover | None = None) -> Flattened:
        """Copy ``state_dict``'s tensors into the staging buffers; the flattened state over them.

        With ``handover`` (a pipelined save), a large state in a shared arena is
        copied group by group (``pipeline.stage_groups``): the plan is handed
        over before the first copy, and each group once its copies have returned.
        """
        flat = flatten(state_dict, allow_pickle=True)
        if self._buffers is None or self._buffers.signature != self._signature(flat):
            self._buffers = self._allocate(flat)
        staged = self._buffers.tensors
        result = dataclasses.replace(flat, tensors=list(staged))
        copies = list(zip(staged, flat.tensors))
        ends = None
        if handover is not None and not non_blocking and self._buffers.arena is not None:
            ends = stage_groups([src.nbytes for src in flat.tensors])
        if ends is None:
            self._copy(copies, non_blocking)
            return result
        handover.plan(result, ends)
        start = 0
        for g, end in enumerate(ends):
            self._copy(copies[start:end], non_blocking)
            handover.staged(g + 1, last=g + 1 == len(ends))
            start = end
        return result

    def _copy(self, copies: list[_Copy], non_blocking: bool) -> None:
        """Run ``copies``: a large host state split over two threads."""
        helper = None if non_blocking else self._helper(sum(src.nbytes for _, src in copies))
        if helper is None:
            _copy_all(copies, non_blocking)
            return
        mine, theirs = split_copies(copies, 2)
        other = helper.submit(_copy_all, theirs)
        try:
            _copy_all(mine)
        finally:
            other.result()  # never return (or raise) while the other half is still copying

    @paused_gc()
    def warmup(self, state_dict: STATE_DICT) -> torch.Tensor | None:
        """Allocate and touch the staging memory of ``state_dict``'s structure; the arena as bytes, or None."""
        flat = flatten(state_dict, allow_pickle=True)
        if self._buffers is None or self._buffers.signature != self._signature(flat):
            old = self._buffers
            self._buffers = self._allocate(flat)
            arena = self._buffers.arena
            if arena is not None and (old is None or old.arena is not arena):
                arena.touch()
            elif arena is None:
                kept = {id(t) for t in old.tensors} if old is not None else set()
                for t in self._buffers.tensors:
                    if id(t) not in kept:
                        t.zero_()
        self._helper(sum(t.nbytes for t in flat.tensors))  # the copy thread, started now
        arena = self._buffers.arena
        return arena.as_bytes() if arena is not None else None

    def _helper(self, nbytes: int) -> ThreadPoolExecutor | None:
        """The thread that copies half of a large host state (None: copy in one thread)."""
        if nbytes < PARALLEL_COPY_BYTES or (os.cpu_count() or 1) < 2:
            return None
        if self._copy_helper is None:
            self._copy_helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-copy")
        return self._copy_helper

    def close(self) -> None:
        if self._copy_helper is not None:
            self._copy_helper.shutdown(wait=True)
            self._copy_helper = None
        if self._buffers is not None and self._buffers.arena is not None:
            self._buffers.arena.close()
        self._buffers = None


class DefaultStager(CheckpointStager):
    """Stages state dicts into reused (shared, pinned where useful) CPU memory.

    Args:
        config: Staging options (None: adapt to the machine).

    Not thread-safe: one stager per training thread. A staged state dict stays
    valid until the next ``stage`` call (which reuses its memory).
    """

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        self._config = (config if config is not None else CheckpointStagerConfig()).resolved()
        self._state_dict_stager = _StateDictStager(
            pin_memory=bool(self._config.use_pinned_memory), share_memory=bool(self._config.use_shared_memory)
        )
        self._staging_executor: ThreadPoolExecutor | None = None
        self._staging_stream: Any = None
        if self._config.use_async_staging:
            self._staging_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-stage")
        if self._config.use_non_blocking_copy:
            # Created on the calling thread, after the compute stream exists.
            self._staging_stream = torch.Stream()

    @property
    def config(self) -> CheckpointStagerConfig:
        """The resolved configuration."""
        return self._config

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Stage ``state_dict``: its copy, or a future of it when staging is asynchronous.

        The copy is :meth:`stage_flattened`'s result rebuilt as a state dict of
        the same structure (values stored with pickle are copies made by it).
        """
        return self._submit(staged_state_dict, state_dict)

    def stage_flattened(
        self, state_dict: STATE_DICT, handover: Handover | None = None
    ) -> Flattened | Future[Flattened]:
        """Stage ``state_dict`` in its flattened form, or a future of it when staging is asynchronous.

        The result's ``tree`` is :func:`~torchckpt.format.tree.flatten`'s (with
        pickle allowed: whether the save may store values with pickle is the
        writer's decision, see ``Flattened.refuse_pickled``) and its ``tensors``
        are the staged copies, in table order. They stay valid until the next
        ``stage`` or ``stage_flattened`` call, which reuses their memory.
        ``AsyncCheckpointer.save`` calls it, not ``stage``, when the stager is a
        ``DefaultStager`` whose ``stage`` is not overridden.

        With ``handover`` (``AsyncCheckpointer.save``'s pipelined save), the
        plan is handed over as soon as it is made and a large state's groups as
        they are staged (see :mod:`torchckpt.pipeline`); a state staged whole (small,
        or copied on an accelerator stream) is handed over once staged; a
        failure is handed over too.

        Raises:
            UnsafeObjectError: As ``flatten`` does (a bad tensor, a cycle, too deep a
                state, a value that does not pickle), here or from the future.
        """
        return self._submit(lambda flat: flat, state_dict, handover)

    def warmup(self, state_dict: STATE_DICT) -> torch.Tensor | None:
        """Make the staging memory of ``state_dict``'s structure ready before the first ``stage``.

        Allocates what the first ``stage`` of a state of that structure (keys,
        shapes, dtypes) would allocate, writes every page of it once (so the
        first copy takes no page faults) and starts the staging and copy
        threads. Nothing is copied. A later ``stage`` of the same structure
        copies into this memory; of another structure, it re-lays or
        reallocates as ``stage`` always does. Holds one staging copy of the
        state (its tensor bytes, 64-byte aligned), as the first ``stage`` would.

        Returns:
            With shared memory, the arena as one ``uint8`` tensor (to hand to
            the writer subprocess, ``CheckpointProcess.warmup``); else None.
        """
        if self._staging_executor is not None:
            return self._staging_executor.submit(self._state_dict_stager.warmup, state_dict).result()
        return self._state_dict_stager.warmup(state_dict)

    def _submit(
        self, result: Callable[[Flattened], Any], state_dict: STATE_DICT, handover: Handover | None = None
    ) -> Any:
        compute_event = None
        if self._staging_stream is not None:
            # Everything the compute stream has queued so far must be in the copy.
            compute_event = torch.Event()
            compute_event.record()
        if self._staging_executor is None:
            staged = self._stage(state_dict, compute_event, handover)
            _hand_over_whole(handover, staged)
            return result(staged)
        if handover is None:
            return self._staging_executor.submit(lambda: result(self._stage(state_dict, compute_event)))
        # A handover comes with stage_flattened only: its result is the flattened state itself.
        done: Future[Any] = Future()
        self._staging_executor.submit(self._stage_then_hand_over, done, state_dict, compute_event, handover)
        return done

    def _stage_then_hand_over(
        self, done: Future[Any], state_dict: STATE_DICT, compute_event: Any, handover: Handover
    ) -> None:
        """Stage, resolve ``done`` with the flattened state, then hand a state staged whole over to the writer.

        In that order: the writer's thread pickles the state's tree as soon as it
        has it, and told after the caller's waiters it does not hold the
        interpreter while the training thread resumes from its stall.
        """
        if not done.set_running_or_notify_cancel():
            handover.fail(CancelledError())
            return
        try:
            staged = self._stage(state_dict, compute_event, handover)  # hands a failure over itself
        except BaseException as e:  # noqa: BLE001 - the caller's future holds it
            done.set_exception(e)
            return
        done.set_result(staged)
        _hand_over_whole(handover, staged)

    def _stage(self, state_dict: STATE_DICT, compute_event: Any, handover: Handover | None = None) -> Flattened:
        try:
            if self._staging_stream is not None:
                self._staging_stream.wait_event(compute_event)
                with torch.accelerator.stream(self._staging_stream) if hasattr(
                    torch.accelerator, "stream"
                ) else _StreamCtx(self._staging_stream):
                    staged = self._state_dict_stager.stage(
                        state_dict, non_blocking=bool(self._config.use_non_blocking_copy)
                    )
                # The copies are done only when the staging stream has run them.
                self._staging_stream.synchronize()
            else:
                pipelined = handover if self._config.pipelined_writes else None
                staged = self._state_dict_stager.stage(state_dict, non_blocking=False, handover=pipelined)
        except BaseException as e:
            if handover is not None:
                handover.fail(e)
            raise
        return staged

    def close(self) -> None:
        """Stop the staging thread and free the staging memory."""
        if self._staging_executor is not None:
            self._staging_executor.shutdown(wait=True)
            self._staging_executor = None
        self._state_dict_stager.close()

    def __enter__(self) -> DefaultStager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@paused_gc()  # unflatten builds objects per entry: see format/gcpause.py
def staged_state_dict(flat: Flattened, tensor: Callable[[int], torch.Tensor] | None = None) -> STATE_DICT:
    """The state dict a staged ``flat`` stands for (values stored with pickle are unpickled).

    Args:
        flat: What :meth:`DefaultStager.stage_flattened` returned.
        tensor: The tensor of a table index (default: ``flat.tensors[i]``).
    """
    tensors = flat.tensors
    return unflatten(flat.tree, tensor if tensor is not None else tensors.__getitem__, allow_pickle=True)


def _hand_over_whole(handover: Handover | None, staged: Flattened) -> None:
    """A state staged whole (not group by group): the write request carries it complete."""
    if handover is not None and not handover.planned.done():
        handover.plan(staged, None)


class _StreamCtx:
    """``with stream:`` for torch versions without ``torch.accelerator.stream``."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        self.prev = torch.accelerator.current_stream()
        torch.accelerator.set_stream(self.stream)

    def __exit__(self, *exc: object) -> None:
        torch.accelerator.set_stream(self.prev)
