"""Shared-memory arenas: staging memory that the writer subprocess maps without a copy.

An arena is one shared ``torch.UntypedStorage`` (file-descriptor sharing:
an unlinked shared-memory file, so nothing is left in ``/dev/shm`` even after
a SIGKILL); staged tensors are views into it. When a staged state dict is
sent to the writer subprocess, torch's multiprocessing reductions pass the
storage's file descriptor once per message, not its bytes, and the
subprocess keeps the mapping cached between saves. There, :func:`own_storage`
gives a staged tensor a storage of its own (aliasing its bytes in the arena)
before ``torch.save`` writes it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALIGN", "SharedArena", "own_storage", "pack"]

#: Alignment of every tensor in an arena (a cache line; enough for any dtype and vectorised copies).
ALIGN = 64


def pack(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes`` bytes packed into an arena, and the arena's size."""
    offsets = []
    pos = 0
    for n in sizes:
        offsets.append(pos)
        pos += -(-n // ALIGN) * ALIGN
    return offsets, pos


class SharedArena:
    """A block of shared memory that holds tensors.

    Args:
        size_bytes: Its size.
        pin: Page-lock it for fast device-to-host copies (needs CUDA; best effort).
    """

    def __init__(self, size_bytes: int, *, pin: bool = False) -> None:
        self.size_bytes = size_bytes
        self.storage = torch.UntypedStorage._new_shared(max(size_bytes, 1))
        self.pinned = pin and _pin(self.storage)

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` in the arena at byte ``offset``."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if offset < 0 or offset % ALIGN or offset + nbytes > self.size_bytes:
            raise ValueError(f"tensor of {nbytes} bytes at offset {offset} does not fit the arena of {self.size_bytes}")
        raw = torch.empty(0, dtype=torch.uint8).set_(self.storage, offset, (nbytes,), (1,))
        return raw.view(dtype).view(shape)

    def as_bytes(self) -> torch.Tensor:
        """The whole arena as one ``uint8`` tensor (what the writer subprocess is handed to map it)."""
        return torch.empty(0, dtype=torch.uint8).set_(self.storage, 0, (self.storage.nbytes(),), (1,))

    def touch(self) -> None:
        """Write every page of the arena once, so that the first copy into it takes no page faults."""
        self.storage.fill_(0)

    def close(self) -> None:
        """Drop the arena's own reference (the memory goes when the last view does)."""
        if self.pinned:
            _unpin(self.storage)
            self.pinned = False
        self.storage = torch.UntypedStorage(0)


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or, when it is a contiguous CPU slice of a larger storage (an arena), a view with a storage of its own.

    Zero-copy: the new storage aliases ``t``'s bytes. Without it, ``torch.save``
    would write the whole arena once per checkpoint (padding and stale bytes
    included) and refuse an arena viewed as several dtypes ("Cannot save
    multiple tensors or storages that view the same data as different types").
    """
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage()
    if t.device.type != "cpu" or not nbytes or not t.is_contiguous() or storage.nbytes() == nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(storage[start : start + nbytes], 0, (nbytes,), (1,))
    return raw.view(t.dtype).view(t.shape)


def _pin(storage: torch.UntypedStorage) -> bool:
    try:
        rc = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
        return int(rc) == 0
    except Exception:  # noqa: BLE001 - pinning is an optimisation
        return False


def _unpin(storage: torch.UntypedStorage) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(storage.data_ptr())
    except Exception:  # noqa: BLE001
        pass
