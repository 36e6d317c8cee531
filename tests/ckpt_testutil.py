"""Helpers shared by the torchckpt tests: tensors of any dtype, exact comparison, bit flips."""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from typing import Any

import torch

import torchckpt as tc

FORMATS = ("torch_save", "safetensors")
NATIVE_FILE = "rank_00000.safetensors"
TORCH_SAVE_FILE = "checkpoint_0.pt"

_DTYPE_NAMES = [
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
]  # fmt: skip


def _constructible(dtype: torch.dtype) -> bool:
    try:
        torch.zeros(16, dtype=torch.uint8).view(dtype)
        torch.empty((2, 2), dtype=dtype)
    except (RuntimeError, TypeError):
        return False
    return True


#: Every dtype this torch build can hold in CPU memory.
ALL_DTYPES: list[torch.dtype] = [
    getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
]
ALL_DTYPES = [d for d in ALL_DTYPES if _constructible(d)]


def file_name(fmt: str) -> str:
    """The rank-0 file name of a layout."""
    return NATIVE_FILE if fmt == "safetensors" else TORCH_SAVE_FILE


def checkpointer(fmt: str, **writer_kw: Any) -> tc.SyncCheckpointer:
    """A sync checkpointer writing ``fmt``."""
    return tc.make_sync_checkpointer(
        tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, **writer_kw)),
        rank_info=tc.RankInfo(0, 1),
    )


def save_each_format(root: Any, state: Any, **save_kw: Any) -> dict[str, str]:
    """Save ``state`` once per layout under ``root`` (at ``root/<format>``); return the paths by format."""
    out = {}
    for fmt in FORMATS:
        out[fmt] = os.path.join(str(root), fmt)
        checkpointer(fmt).save(out[fmt], state, **save_kw)
    return out


def reader(**kw: Any) -> tc.CheckpointReader:
    return tc.CheckpointReader(tc.RankInfo(0, 1), **kw)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator | int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` with random bytes (any bit pattern, nan included; bools 0/1)."""
    if isinstance(gen, int):
        gen = torch.Generator().manual_seed(gen)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), dtype=torch.uint8, generator=gen).view(torch.bool).reshape(shape)
    raw = torch.randint(0, 256, (n * element_size(dtype),), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` in logical (row-major) order: a nan-safe, -0.0-safe identity."""
    if t.numel() == 0:
        return b""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # one element: "contiguous" whatever its stride
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8).numpy().tobytes()


def _float_key(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_state_equal(actual: Any, expected: Any, path: str = "") -> None:
    """Assert two state dicts are exactly equal: same container types, key order, dtypes, shapes and bytes."""
    where = path or "[root]"
    assert type(actual) is type(expected), f"{where}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device == expected.device, f"{where}: device {actual.device} != {expected.device}"
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{where}: tensor bytes differ"
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert type(k) is type(next(a for a in actual if a == k)), f"{where}: key {k!r} changed type"
            assert_state_equal(actual[k], expected[k], f"{path}.{k}" if path else str(k))
    elif isinstance(expected, (list, tuple)) and not isinstance(expected, torch.Size):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert _float_key(actual) == _float_key(expected) or (math.isnan(actual) and math.isnan(expected)), (
            f"{where}: {actual!r} != {expected!r}"
        )
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def map_tensors(obj: Any, fn: Any) -> Any:
    """Rebuild ``obj`` with every tensor replaced by ``fn(tensor)``; containers keep their types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        items = [map_tensors(v, fn) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def iter_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor of ``obj``, depth first."""
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


def scrambled_like(t: torch.Tensor, seed: int = 12345) -> torch.Tensor:
    """A fresh tensor of ``t``'s dtype and shape holding other random bytes (a template target)."""
    return random_tensor(t.dtype, tuple(t.shape), seed)


def flip_bit(file: str, offset: int, bit: int = 0) -> None:
    """Flip one bit of ``file`` in place."""
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"offset {offset} beyond the end of {file}"
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def truncate(file: str, size: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(size)


def hidden_leftovers(parent: str, timeout_s: float = 10.0) -> list[str]:
    """torchckpt's hidden entries under ``parent`` (pending, previous, trash) once background deletions settle."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(n for n in os.listdir(parent) if any(k in n for k in ("pending", "trash", "torchckpt-previous")))
        if not any("trash" in n for n in found) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def json_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (a tuple of keys and indices) into a JSON document, the root's ``()`` first."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += json_paths(v, (*prefix, i))
    return out
