"""Bounds on what a ``torch_save`` rank file unpickles into, checked before anything walks or copies it.

``torch.load(weights_only=True)`` refuses code, not size: a rank file of a few
KiB can unpickle into a list referenced from itself, sub-lists shared so that
the tree they spell has 2**40 leaves, a tensor viewing 2**31 elements of a
one-element storage, or a zip record that inflates a thousandfold. Every reader
of torchckpt walks the loaded state (to fill a template, list keys, compare,
export), so each of those would hang or allocate gigabytes. The checks here
make time and memory proportional to the file's size:

- zip records are stored, never compressed (``torch.save`` writes them so), and
  none is larger than the file: checked on the zip's directory before loading;
- the object graph, expanded as a tree (a shared container counts each time it
  is reached), has at most one node per byte of the file plus a small slack,
  no container inside itself and at most :data:`MAX_DEPTH` levels;
- every tensor's elements lie inside its storage, the storages fit in the file,
  and the elements all tensors view (a storage viewed twice counts twice) are at
  most :data:`VIEW_FACTOR` times the file's size plus a small slack.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from .tree import MAX_DEPTH, join_key

__all__ = ["VIEW_FACTOR", "check_loaded", "check_zip_records"]

#: Views may read a storage more than once (a weight and its transpose, a small expanded
#: tensor): the bytes all tensors view may be this many times the file's size.
VIEW_FACTOR = 4
#: Allowance on top of the proportional bounds, so tiny files with a little sharing load.
_NODE_SLACK = 4096
_VIEW_SLACK_BYTES = 1 << 20
#: Longest key path quoted in a message.
_KEY_CHARS = 160


def _corrupt(where: str, file: str, key: str | None, why: str) -> CorruptCheckpointError:
    shown = key if key is None or len(key) <= _KEY_CHARS else key[:_KEY_CHARS] + "..."
    at = f", key {shown!r}" if key is not None else ""
    return CorruptCheckpointError(
        f"corrupt checkpoint {where}: rank file {file}{at}: {why}", path=where, file=file, key=key
    )


def check_zip_records(fd: int, file_size: int, *, where: str, file: str) -> None:
    """Refuse a zip rank file with a compressed record or one larger than the file.

    Args:
        fd: The open rank file (its offset is left at 0).
        file_size: Its size in bytes.
        where: The checkpoint path, for messages.
        file: The rank file's name, for messages.

    Raises:
        CorruptCheckpointError: Not a readable zip, or a record that would inflate.
    """
    try:
        with open(fd, "rb", closefd=False) as f, zipfile.ZipFile(f) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise _corrupt(where, file, None, f"not a readable zip archive: {e}") from e
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise _corrupt(
                where, file, None, f"zip record {r.filename!r} is compressed (method {r.compress_type}); "
                "torch.save stores its records, so a compressed one can only inflate memory",
            )  # fmt: skip
        if r.file_size > file_size:
            raise _corrupt(where, file, None, f"zip record {r.filename!r} declares {r.file_size} bytes, more than the file")


class _Walk:
    """The running totals of :func:`check_loaded`."""

    def __init__(self, file_size: int, where: str, file: str) -> None:
        self.where = where
        self.file = file
        self.file_size = file_size
        self.node_limit = file_size + _NODE_SLACK
        self.view_limit = VIEW_FACTOR * file_size + _VIEW_SLACK_BYTES
        self.nodes = 0
        self.viewed = 0
        self.storage_bytes = 0
        self.tensors: set[int] = set()
        self.storages: set[tuple[Any, int]] = set()

    def count(self, key: str) -> None:
        self.nodes += 1
        if self.nodes > self.node_limit:
            raise _corrupt(
                self.where, self.file, key, f"the state expands to more than {self.node_limit} values from a file of "
                f"{self.file_size} bytes (shared sub-containers spelling a huge tree)",
            )  # fmt: skip

    def tensor(self, t: torch.Tensor, key: str) -> None:
        if id(t) in self.tensors or t.layout is not torch.strided or t.is_meta:
            return
        self.tensors.add(id(t))
        storage = t.untyped_storage()
        size = storage.nbytes()
        numel = t.numel()
        itemsize = t.element_size()
        if numel:
            last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            if min(t.stride(), default=0) < 0 or (last + 1) * itemsize > size:
                raise _corrupt(self.where, self.file, key, f"a tensor of shape {list(t.shape)} reaches past its storage of {size} bytes")
        mark = (storage.device, storage.data_ptr())
        if mark not in self.storages:
            self.storages.add(mark)
            self.storage_bytes += size
            if self.storage_bytes > self.file_size:
                raise _corrupt(self.where, self.file, key, f"its storages hold more than the file's {self.file_size} bytes")
        self.viewed += numel * itemsize
        if self.viewed > self.view_limit:
            raise _corrupt(
                self.where, self.file, key, f"a tensor of {numel * itemsize} bytes viewing a storage of {size} bytes: "
                f"the tensors view more than {self.view_limit} bytes ({VIEW_FACTOR} times the file's size)",
            )  # fmt: skip


_LEAVE = object()


def _children(value: Any, key: str) -> list[tuple[Any, str]] | None:
    """The children of a container with their key paths (keys of a dict too), or None for a leaf."""
    tp = type(value)
    if tp is dict or tp is OrderedDict or isinstance(value, dict):
        out: list[tuple[Any, str]] = []
        for k, v in value.items():
            if type(k) is not str:
                out.append((k, key))
            out.append((v, join_key(key, k)))
        return out
    if isinstance(value, (list, tuple, set, frozenset)) and not isinstance(value, torch.Size):
        return [(v, f"{key}[{i}]" if key else f"[{i}]") for i, v in enumerate(value)]
    return None


def check_loaded(state: Any, *, file_size: int, where: str, file: str) -> None:
    """Check the unpickled ``state`` of a rank file of ``file_size`` bytes against the bounds above.

    The walk is iterative and stops at the first bound passed, so it costs at
    most one step per byte of the file.

    Raises:
        CorruptCheckpointError: A container inside itself, nesting deeper than
            :data:`MAX_DEPTH`, more values than the file can hold, or tensors
            viewing more than their storages or the file (names the file and key).
    """
    walk = _Walk(file_size, where, file)
    on_path: set[int] = set()
    stack: list[tuple[Any, Any, int]] = [(state, "", 0)]
    while stack:
        value, key, depth = stack.pop()
        if value is _LEAVE:
            on_path.discard(key)
            continue
        walk.count(key)
        if isinstance(value, torch.Tensor):
            walk.tensor(value, key or "[root]")
            continue
        children = _children(value, key)
        if not children:
            continue
        if id(value) in on_path:
            raise _corrupt(where, file, key or "[root]", f"the {type(value).__name__} contains itself (a cycle)")
        if depth >= MAX_DEPTH:
            raise _corrupt(where, file, key or "[root]", f"containers nested deeper than {MAX_DEPTH} levels")
        on_path.add(id(value))
        stack.append((_LEAVE, id(value), depth))
        stack.extend((v, k, depth + 1) for v, k in reversed(children))
