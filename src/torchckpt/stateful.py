"""Objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, schedulers) and their state dicts.

What lets a CheckpointManager take ``{"model": model, "optim": opt, "step": 3}``:

- on save, :func:`to_state_dict` replaces every object with ``state_dict()``
  by its state dict (in nested dicts too);
- on load, :func:`load_template` gives the checkpointer a template in which
  modules are filled in place, and :func:`restore_objects` then calls
  ``load_state_dict`` on the other objects with their saved state.

Sharded modules (FSDP2, tensor parallel: parameters that are ``DTensor``s) and
the optimizers over their parameters (given beside them at the top level,
``{"model": model, "optim": opt}``) go through
``torch.distributed.checkpoint.state_dict``: ``get_model_state_dict`` /
``get_optimizer_state_dict`` on save (keys by parameter name, so they load on
another layout), the same as the template of a load (the optimizer's state
initialised, so every tensor is there to fill in place), and
``set_optimizer_state_dict`` after it.
"""

from __future__ import annotations

from typing import Any

import torch

from .format.tree import MAX_DEPTH
from .plan.dtensor import is_dtensor

__all__ = ["load_template", "restore_objects", "to_state_dict"]


def _has_state_dict(value: Any) -> bool:
    return hasattr(value, "state_dict") and callable(value.state_dict)


def _sharded_module(module: Any) -> bool:
    return isinstance(module, torch.nn.Module) and any(is_dtensor(p) for p in module.parameters())


def _owners(state: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The sharded module of each top-level optimizer over its parameters (by the optimizer's key)."""
    modules = [v for v in state.values() if _sharded_module(v)]
    owners: dict[str, torch.nn.Module] = {}
    for k, v in state.items():
        if not isinstance(v, torch.optim.Optimizer):
            continue
        params = {id(p) for group in v.param_groups for p in group["params"]}
        for m in modules:
            if params <= {id(p) for p in m.parameters()}:
                owners[k] = m
                break
    return owners


def _sharded_state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """The state dicts of the sharded modules and of the optimizers over them, by key."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {k: get_model_state_dict(v) for k, v in state.items() if _sharded_module(v)}
    for k, model in _owners(state).items():
        out[k] = get_optimizer_state_dict(model, state[k])
    return out


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
    sharded = _sharded_state_dicts(state)
    copies = {id(state): root}
    todo: list[tuple[dict[Any, Any], dict[Any, Any], int]] = [(state, root, 1)]
    while todo:
        source, copy, depth = todo.pop()
        for k, v in source.items():
            if source is state and k in sharded:
                copy[k] = sharded[k]
            elif _has_state_dict(v):
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
    sharded = _sharded_state_dicts(state)
    return {
        k: sharded[k] if k in sharded else v.state_dict() if isinstance(v, torch.nn.Module) else None
        for k, v in state.items()
    }


def restore_objects(state: dict[str, Any] | None, loaded: dict[str, Any]) -> None:
    """Call ``load_state_dict`` with its saved state on every object of ``state`` that is not a module."""
    if state is None:
        return
    owners = _owners(state)
    for k, v in state.items():
        if k in owners and k in loaded:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(owners[k], v, loaded[k])
        elif k in loaded and not isinstance(v, torch.nn.Module) and hasattr(v, "load_state_dict"):
            v.load_state_dict(loaded[k])
