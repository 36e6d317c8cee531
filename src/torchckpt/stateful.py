"""Objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, schedulers) and their state dicts.

What lets a CheckpointManager take ``{"model": model, "optim": opt, "step": 3}``:

- on save, :func:`to_state_dict` replaces every object with ``state_dict()``
  by its state dict (in nested dicts too);
- on load, :func:`load_template` gives the checkpointer a template in which
  modules are filled in place, and :func:`restore_objects` then calls
  ``load_state_dict`` on the other objects with their saved state.
"""

from __future__ import annotations

from typing import Any

import torch

from .format.tree import MAX_DEPTH

__all__ = ["load_template", "restore_objects", "to_state_dict"]


def _has_state_dict(value: Any) -> bool:
    return hasattr(value, "state_dict") and callable(value.state_dict)


def to_state_dict(state: Any) -> Any:
    """``state`` with every object that has ``state_dict()`` replaced by its state dict, in nested dicts too.

    Iterative; a dict reached twice is copied once, so a cycle stays a cycle
    (and a dict past ``MAX_DEPTH`` stays as it is): saving then refuses it
    naming the key, whatever the caller's stack.
    """
    if _has_state_dict(state):
        return state.state_dict()
    if not isinstance(state, dict):
        return state
    root: dict[Any, Any] = {}
    copies = {id(state): root}
    todo: list[tuple[dict[Any, Any], dict[Any, Any], int]] = [(state, root, 1)]
    while todo:
        source, copy, depth = todo.pop()
        for k, v in source.items():
            if _has_state_dict(v):
                copy[k] = v.state_dict()
            elif isinstance(v, dict) and id(v) in copies:
                copy[k] = copies[id(v)]
            elif isinstance(v, dict) and depth < MAX_DEPTH:
                copy[k] = copies[id(v)] = {}
                todo.append((v, copy[k], depth + 1))
            else:
                copy[k] = v
    return root


def load_template(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The template a load of ``state`` reads into: a module's own state dict (filled in place), else None."""
    if state is None:
        return None
    return {k: v.state_dict() if isinstance(v, torch.nn.Module) else None for k, v in state.items()}


def restore_objects(state: dict[str, Any] | None, loaded: dict[str, Any]) -> None:
    """Call ``load_state_dict`` with its saved state on every object of ``state`` that is not a module."""
    if state is None:
        return
    for k, v in state.items():
        if k in loaded and not isinstance(v, torch.nn.Module) and hasattr(v, "load_state_dict"):
            v.load_state_dict(loaded[k])
