"""Merge a checkpoint's structure into a template state dict.

Semantics (those of the reference ``CheckpointReader``): only the keys of
the template are loaded; a ``None`` value loads the whole subtree; template
tensors are filled in place after their dtype and shape are checked; keys of
the template absent from the checkpoint are reported, at the level where they
are missing (``"a"`` for ``{"a": {"b": None}}`` when the checkpoint has no
``"a"``), in ``missing_keys``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import StateDictMismatchError
from .tree import join_key

__all__ = ["check_fits", "merge"]


def _index_path(prefix: str, i: int) -> str:
    return f"{prefix}[{i}]" if prefix else f"[{i}]"


def check_fits(target: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], key: str, where: str) -> None:
    """Raise unless the template tensor ``target`` has the checkpoint's dtype and shape."""
    if target.dtype != dtype or tuple(target.shape) != tuple(shape):
        raise StateDictMismatchError(
            f"key {key!r}: the template tensor is {target.dtype} {list(target.shape)} but the checkpoint at "
            f"{where} holds {dtype} {list(shape)}",
            path=where,
            key=key,
        )


def _mismatch(template_kind: str, source_kind: str, path: str, where: str) -> StateDictMismatchError:
    return StateDictMismatchError(
        f"key {path or '[root]'!r} of the template is a {template_kind} but the checkpoint at "
        f"{where} holds a {source_kind} there",
        path=where,
        key=path,
    )


def merge(
    template: Any,
    source: Any,
    *,
    is_tensor: Callable[[Any], bool],
    tensor: Callable[[Any, torch.Tensor | None, str], Any],
    where: str,
) -> tuple[Any, list[str], Callable[[], None]]:
    """Merge ``source`` (the checkpoint's objects) into ``template``, changing nothing in it yet.

    Every key is checked before anything is written: the template's dicts get
    their new values only when the returned ``commit`` is called, and its
    tensors only when the caller copies into those ``tensor`` was given, so a
    mismatch found on any key leaves the template as it was.

    Args:
        template: The template (None: take everything).
        source: The checkpoint's structure; its tensors are whatever ``is_tensor`` accepts.
        is_tensor: Tells a source tensor (or a reference to one).
        tensor: ``tensor(source, target, key)`` returns the value to put at ``key``,
            filling ``target`` in place when it is a tensor.
        where: The checkpoint path, for error messages.

    Returns:
        The merged object, the missing keys, and ``commit``, which stores the
        new values into the template's dicts (call it once the tensors are in).

    Raises:
        StateDictMismatchError: The template has a tensor or container where the
            checkpoint has something else.
    """
    merger = _Merger(is_tensor=is_tensor, tensor=tensor, where=where)
    merged = merger.merge(template, source, "")
    return merged, merger.missing, merger.commit


def _is_sequence(value: Any) -> bool:
    """A list or tuple that holds items (a ``torch.Size`` is a value, not a container)."""
    return isinstance(value, (list, tuple)) and not isinstance(value, torch.Size)


class _Merger:
    """The state of one :func:`merge`: the missing keys found and the dict writes it defers."""

    def __init__(
        self,
        *,
        is_tensor: Callable[[Any], bool],
        tensor: Callable[[Any, torch.Tensor | None, str], Any],
        where: str,
    ) -> None:
        self.is_tensor = is_tensor
        self.tensor = tensor
        self.where = where
        self.missing: list[str] = []
        self.writes: list[tuple[dict[Any, Any], Any, Any]] = []

    def commit(self) -> None:
        """Store the merged values into the template's dicts."""
        for container, key, value in self.writes:
            container[key] = value

    def mismatch(self, tgt: Any, src: Any, path: str) -> StateDictMismatchError:
        return _mismatch(type(tgt).__name__, "tensor" if self.is_tensor(src) else type(src).__name__, path, self.where)

    def whole(self, src: Any, path: str) -> Any:
        """All of ``src`` (no template): its tensors through ``tensor``, its containers rebuilt."""
        if self.is_tensor(src):
            return self.tensor(src, None, path)
        if isinstance(src, dict):
            out = type(src)()
            for k, v in src.items():
                out[k] = self.whole(v, join_key(path, k))
            return out
        if _is_sequence(src):
            items = [self.whole(v, _index_path(path, i)) for i, v in enumerate(src)]
            return items if isinstance(src, list) else tuple(items)
        return src

    def merge(self, tgt: Any, src: Any, path: str) -> Any:
        """``src`` merged into the template ``tgt`` at ``path``."""
        if tgt is None:
            return self.whole(src, path)
        if self.is_tensor(src):
            if not isinstance(tgt, torch.Tensor):
                raise self.mismatch(tgt, src, path)
            return self.tensor(src, tgt, path)
        if isinstance(tgt, torch.Tensor):
            raise self.mismatch(tgt, src, path)
        if isinstance(src, dict):
            return self.merge_dict(tgt, src, path)
        if _is_sequence(src):
            return self.merge_sequence(tgt, src, path)
        if isinstance(tgt, (dict, list)):
            raise self.mismatch(tgt, src, path)
        return src

    def merge_dict(self, tgt: Any, src: dict[Any, Any], path: str) -> Any:
        """The template's keys, each merged with the checkpoint's (the write deferred to :meth:`commit`)."""
        if not isinstance(tgt, dict):
            raise self.mismatch(tgt, src, path)
        for k in list(tgt.keys()):
            sub = join_key(path, k)
            if k in src:
                self.writes.append((tgt, k, self.merge(tgt[k], src[k], sub)))
            else:
                self.missing.append(sub)
        return tgt

    def merge_sequence(self, tgt: Any, src: list[Any] | tuple[Any, ...], path: str) -> Any:
        """A new list or tuple (the checkpoint's kind): the items of both, merged; the template's extras missing."""
        if not _is_sequence(tgt):
            raise self.mismatch(tgt, src, path)
        items: list[Any] = []
        for i in range(max(len(tgt), len(src))):
            if i < len(src):
                items.append(self.merge(tgt[i] if i < len(tgt) else None, src[i], _index_path(path, i)))
            else:
                self.missing.append(_index_path(path, i))
                items.append(tgt[i])
        return items if isinstance(src, list) else tuple(items)
