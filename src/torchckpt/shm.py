"""Shared-memory arenas: staging memory that the writer subprocess maps once.

An arena is an anonymous ``memfd`` mapped in the training process; the staged
tensors are views into it. The writer subprocess receives the file
descriptor once (over the pipe, ``SCM_RIGHTS``) and maps the same pages, so a
save sends only a small description of where each tensor lies, never tensor
bytes. A memfd has no name: it cannot leak in ``/dev/shm`` and disappears
with the last process that holds it, even after a SIGKILL.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import torch

__all__ = ["ALIGN", "SharedArena", "find_arena", "tensor_in"]

#: Alignment of every tensor in an arena (a cache line; and bytes for vectorised copies).
ALIGN = 64

_lock = threading.Lock()
_live: dict[int, weakref.ref[SharedArena]] = {}
_next_id = [0]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SharedArena:
    """A block of shared memory holding tensors.

    Args:
        size_bytes: Its size (rounded up to a page; at least one page).
        fd: An existing memfd to map (in the writer subprocess); None creates one.
        arena_id: The creator's id for this arena (None: a new one).
    """

    def __init__(self, size_bytes: int, *, fd: int | None = None, arena_id: int | None = None) -> None:
        self.size_bytes = max(mmap.PAGESIZE, -(-size_bytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        if fd is None:
            fd = os.memfd_create("torchckpt-staging", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size_bytes)
        self.fd = fd
        self._mmap: mmap.mmap | None = mmap.mmap(fd, self.size_bytes, flags=mmap.MAP_SHARED)
        self._base = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.address = self._base.data_ptr()
        with _lock:
            if arena_id is None:
                arena_id = _next_id[0]
                _next_id[0] += 1
            self.arena_id = arena_id
            _live[self.address] = weakref.ref(self)

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor view of ``shape`` and ``dtype`` at byte ``offset``."""
        nbytes = _numel(shape) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.size_bytes:
            raise ValueError(f"tensor of {nbytes} bytes at {offset} outside arena of {self.size_bytes}")
        raw = self._base[offset : offset + nbytes]
        return raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        """Unmap and close (views into it must no longer be used)."""
        with _lock:
            _live.pop(self.address, None)
        if self._mmap is not None:
            del self._base
            try:
                self._mmap.close()
            except BufferError:
                pass  # views still exported: the mapping goes when they do
            self._mmap = None
            os.close(self.fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class ArenaSlot:
    """Where a tensor lies in an arena."""

    arena: SharedArena
    offset: int


def find_arena(t: torch.Tensor) -> ArenaSlot | None:
    """The arena slot holding the contiguous CPU tensor ``t``, if any."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    ptr = t.data_ptr()
    with _lock:
        for address, ref in _live.items():
            arena = ref()
            if arena is not None and address <= ptr and ptr + t.numel() * t.element_size() <= address + arena.size_bytes:
                return ArenaSlot(arena, ptr - address)
    return None


def tensor_in(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes`` bytes packed into an arena, and the arena size."""
    offsets = []
    pos = 0
    for n in sizes:
        offsets.append(pos)
        pos += _align(n)
    return offsets, pos
