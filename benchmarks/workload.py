"""Synthetic, transformer-like training state for benchmarks.

``make_state(total_bytes)`` builds what a training loop would hand to a
checkpointer: a model state dict (fp32 token and position embeddings, bf16
weight matrices of ``layers`` blocks — four ``d x d`` attention projections and
two ``4d x d`` MLP matrices each — fp32 biases and layer norms, a bf16 output
head), the matching AdamW optimizer state dict (0-dim fp32 ``step`` and fp32
``exp_avg`` / ``exp_avg_sq`` per parameter, ``param_groups`` with the usual
plain values) and a few plain training counters::

    {"model": {name: tensor},
     "optimizer": {"state": {i: {"step", "exp_avg", "exp_avg_sq"}},
                   "param_groups": [{"lr": ..., "betas": (...), ..., "params": [0, 1, ...]}]},
     "extra": {"step": int, "epoch": int, "tokens_seen": int}}

The hidden size is the largest multiple of 64 whose state fits in
``total_bytes``; the vocabulary then fills the rest, so the tensor bytes come
within a few hundred KiB of the request. With the default 16 layers the state
has 1,044 tensors whatever its size (like the state of ``shared/BASELINES.md``).

Values are random (seeded) so that nothing compresses or dedups.

Helpers: ``tensors(sd)`` lists every tensor leaf, ``tensor_bytes(sd)`` sums
their bytes, ``template_like(sd)`` builds a same-shaped state with fresh,
touched (zeroed) tensors to load into in place, ``describe(sd)`` says what it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["describe", "make_many_small", "make_state", "state_equal", "template_like", "tensor_bytes", "tensors"]

_DEFAULT_LAYERS = 16
_MIN_VOCAB = 1024
_MAX_POSITIONS = 2048


def _param_shapes(d: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    f32, bf16 = torch.float32, torch.bfloat16
    ffn = 4 * d
    shapes: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("embed_tokens.weight", (vocab, d), f32),
        ("embed_positions.weight", (min(_MAX_POSITIONS, max(64, d)), d), f32),
    ]
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{p}attn.{proj}.weight", (d, d), bf16))
            shapes.append((f"{p}attn.{proj}.bias", (d,), f32))
        shapes.append((f"{p}mlp.fc1.weight", (ffn, d), bf16))
        shapes.append((f"{p}mlp.fc1.bias", (ffn,), f32))
        shapes.append((f"{p}mlp.fc2.weight", (d, ffn), bf16))
        shapes.append((f"{p}mlp.fc2.bias", (d,), f32))
        for norm in ("ln1", "ln2"):
            shapes.append((f"{p}{norm}.weight", (d,), f32))
            shapes.append((f"{p}{norm}.bias", (d,), f32))
    shapes.append(("norm.weight", (d,), f32))
    shapes.append(("norm.bias", (d,), f32))
    shapes.append(("lm_head.weight", (vocab, d), bf16))
    return shapes


def _state_bytes(shapes: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    total = 0
    for _, shape, dtype in shapes:
        numel = 1
        for s in shape:
            numel *= s
        # The parameter, two fp32 moments, one 0-dim fp32 step.
        total += numel * (torch.empty((), dtype=dtype).element_size() + 8) + 4
    return total


def _fit(total_bytes: int, layers: int) -> tuple[int, int]:
    """The hidden size and vocabulary whose state is closest to ``total_bytes`` from below."""
    d = 64
    while _state_bytes(_param_shapes(d + 64, 8 * (d + 64), layers)) <= total_bytes:
        d += 64
    # Grow the vocabulary (embedding fp32 + head bf16, each with fp32 moments) to fill the rest.
    base = _state_bytes(_param_shapes(d, 0, layers))
    per_token = d * (4 + 8) + d * (2 + 8)
    vocab = max(_MIN_VOCAB, (total_bytes - base) // per_token)
    return d, int(vocab)


def make_state(total_bytes: int, seed: int = 0, *, layers: int = _DEFAULT_LAYERS) -> dict[str, Any]:
    """A transformer-like model + AdamW state with about ``total_bytes`` of tensor bytes.

    Args:
        total_bytes: Target tensor bytes (model + optimizer); the result is at most
            this (unless it is below the smallest model, d = 64, vocab = 1024).
        seed: Seed of the random values.
        layers: Number of transformer blocks.

    Returns:
        ``{"model": ..., "optimizer": ..., "extra": ...}`` (see the module docstring).
    """
    d, vocab = _fit(int(total_bytes), layers)
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i, (name, shape, dtype) in enumerate(_param_shapes(d, vocab, layers)):
        p = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02)
        model[name] = p.to(dtype) if dtype != torch.float32 else p
        exp_avg = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(1e-3)
        exp_avg_sq = torch.rand(shape, generator=gen, dtype=torch.float32).mul_(1e-6)
        state[i] = {"step": torch.tensor(1000.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    param_groups = [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.95),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "foreach": None,
            "maximize": False,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
            "params": list(range(len(model))),
        }
    ]
    return {
        "model": model,
        "optimizer": {"state": state, "param_groups": param_groups},
        "extra": {"step": 1000, "epoch": 3, "tokens_seen": 1000 * 4 * 2048 * 512},
    }


def make_many_small(
    n_tensors: int = 100_000, n_values: int = 100_000, tensor_bytes: int = 1024, seed: int = 0
) -> dict[str, Any]:
    """Per-entry overhead case: ``n_tensors`` fp32 tensors of ``tensor_bytes`` and ``n_values`` plain values.

    ``{"tensors": {"t<i>": tensor}, "values": {"v<i>": int | float | str}}``: the
    values cycle through ints, floats and short strings.
    """
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(n_tensors, tensor_bytes // 4, generator=gen)
    ts = {f"t{i}": block[i].clone() for i in range(n_tensors)}
    values: dict[str, Any] = {}
    for i in range(n_values):
        values[f"v{i}"] = i if i % 3 == 0 else (i * 0.5 if i % 3 == 1 else f"value-{i}")
    return {"tensors": ts, "values": values}


def tensors(sd: Any) -> list[torch.Tensor]:
    """Every tensor leaf of ``sd``, depth first in insertion order."""
    return list(_iter_tensors(sd))


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v)


def tensor_bytes(sd: Any) -> int:
    """Total bytes of the tensor leaves of ``sd``."""
    return sum(t.numel() * t.element_size() for t in tensors(sd))


def template_like(sd: Any) -> Any:
    """The same structure with fresh zeroed tensors (pages touched) of the same dtypes and shapes."""
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    if isinstance(sd, dict):
        return type(sd)((k, template_like(v)) for k, v in sd.items())
    if isinstance(sd, list):
        return [template_like(v) for v in sd]
    if isinstance(sd, tuple):
        return tuple(template_like(v) for v in sd)
    return sd


def state_equal(a: Any, b: Any) -> bool:
    """Whether two states have the same structure, plain values and tensor bytes."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a.keys()) == list(b.keys()) and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def describe(sd: Any) -> str:
    """One line: tensor count, bytes, bytes by dtype, largest tensor, hidden size and vocabulary."""
    ts = tensors(sd)
    by_dtype: dict[str, int] = {}
    for t in ts:
        key = str(t.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    largest = max(ts, key=lambda t: t.numel() * t.element_size())
    emb = sd["model"]["embed_tokens.weight"]
    parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(by_dtype.items()))
    return (
        f"{len(ts)} tensors, {tensor_bytes(sd) / 2**30:.3f} GiB ({parts}); "
        f"largest {tuple(largest.shape)} {str(largest.dtype).replace('torch.', '')} "
        f"{largest.numel() * largest.element_size() / 2**20:.1f} MiB; "
        f"hidden {emb.shape[1]}, vocab {emb.shape[0]}, {len(sd['model'])} params"
    )
