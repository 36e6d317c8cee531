"""The FSDP2-sharded transformer-like training state of the sharded benchmark, built on one rank.

:func:`build` makes, inside a gloo process group of N ranks, the model of
``workload.py`` (fp32 embeddings, bf16 weight matrices, fp32 biases and
norms, a bf16 head) as a module tree, shards it with ``fully_shard`` (each
transformer block, then the root) on ``init_device_mesh("cpu", (N,))``, gives
every parameter a gradient and takes one AdamW step, and returns
``{"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}``:
``DTensor``s with ``Shard(0)`` placements (FSDP2's uneven shards included),
0-dim ``step`` tensors and plain ``param_groups``.

The model is sized so that the state's tensor bytes (parameters and both AdamW
moments, which take the parameter's dtype) come within a few hundred KiB of
the request. Values are a hash of each element's global index, so that every
layout of the same size holds the same global values (a load resharded from 4
ranks to 2 can be checked bit for bit) and nothing compresses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from workload import _param_shapes

__all__ = ["build", "fit", "local_tensors", "state_bytes", "template_of"]

_LAYERS = 16
_MIN_VOCAB = 1024


def _adamw_bytes(shapes: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """Tensor bytes of parameters + AdamW moments (the parameter's dtype) + one fp32 0-dim step each."""
    return sum(math.prod(shape) * 3 * dtype.itemsize + 4 for _, shape, dtype in shapes)


def fit(total_bytes: int, layers: int = _LAYERS) -> tuple[int, int]:
    """The hidden size (a multiple of 64) and vocabulary whose state comes closest to ``total_bytes`` from below."""
    d = 64
    while _adamw_bytes(_param_shapes(d + 64, 8 * (d + 64), layers)) <= total_bytes:
        d += 64
    base = _adamw_bytes(_param_shapes(d, 0, layers))
    per_token = d * 3 * 4 + d * 3 * 2  # fp32 embedding row and bf16 head row, each with two moments
    return d, max(_MIN_VOCAB, int((total_bytes - base) // per_token))


def _module_tree(shapes: list[tuple[str, tuple[int, ...], torch.dtype]]) -> torch.nn.Module:
    """A module tree whose parameters are ``shapes`` by their dotted names (allocated on the current device)."""
    root = torch.nn.Module()
    for name, shape, dtype in shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = getattr(mod, part, None)
            if child is None:
                child = torch.nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, dtype=dtype)))
    return root


def _fill(local: torch.Tensor, global_shape: tuple[int, ...], offsets: tuple[int, ...], salt: int, scale: float) -> None:
    """Set ``local`` (a row block of a global tensor) to a hash of each element's global flat index."""
    if local.numel() == 0:
        return
    row = math.prod(global_shape[1:]) if len(global_shape) > 1 else 1
    start = (offsets[0] if offsets else 0) * row
    idx = torch.arange(start, start + local.numel(), dtype=torch.int64)
    idx.mul_(2654435761).add_(salt * 40503 + 12345).bitwise_and_((1 << 31) - 1)
    vals = idx.to(torch.float32).mul_(scale / (1 << 31)).sub_(scale / 2)
    with torch.no_grad():
        local.view(-1).copy_(vals)


def _local_offsets(p: Any) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(offsets)


def build(world: int, total_bytes: int, layers: int = _LAYERS) -> dict[str, Any]:
    """The FSDP2 model + AdamW state of about ``total_bytes`` on this rank (see the module docstring).

    Needs the default process group (``world`` ranks) to be initialised.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    d, vocab = fit(total_bytes, layers)
    shapes = _param_shapes(d, vocab, layers)
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = _module_tree(shapes)
    for i in range(layers):
        fully_shard(getattr(model.layers, str(i)), mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    for salt, (name, p) in enumerate(model.named_parameters()):
        offsets = _local_offsets(p)
        _fill(p.to_local(), tuple(p.shape), offsets, salt, 0.04)
        g = torch.empty_like(p.to_local())
        _fill(g, tuple(p.shape), offsets, salt + 7919, 2e-3)
        p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    return {"state": state, "d": d, "vocab": vocab, "params": len(shapes)}


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return []


def local_tensors(state: Any) -> list[torch.Tensor]:
    """This rank's tensors of ``state``: the local shard of every ``DTensor``, and every plain tensor."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in _leaves(state)]


def state_bytes(state: Any) -> int:
    """The state's tensor bytes counted once: global bytes of every ``DTensor``, plain tensors as held here."""
    return sum(t.numel() * t.element_size() for t in _leaves(state))


def template_of(state: Any) -> Any:
    """The same structure with zeroed tensors: ``DTensor``s of the same mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        local = torch.zeros_like(state.to_local())
        return DTensor.from_local(
            local, state.device_mesh, state.placements, shape=state.shape, stride=state.stride(), run_check=False
        )
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return type(state)((k, template_of(v)) for k, v in state.items())
    if isinstance(state, list):
        return [template_of(v) for v in state]
    if isinstance(state, tuple):
        return tuple(template_of(v) for v in state)
    return state
