"""Sharded checkpoints made in one process: a native checkpoint of plain tensors, its manifest rewritten.

:func:`sharded_checkpoint` saves the parts of some global tensors as plain
tensors of one rank file, copies that file once per rank, and rewrites the
manifest so that rank ``r`` lists the ``r``-th row block of every tensor as
its chunk and its tree refers to the tensors with ``{"DT": j}`` nodes: what
a save of ``DTensor``s sharded by rows on ``world`` ranks commits (each rank
file also holds the other ranks' parts, unlisted). :func:`rewrite` edits a
committed manifest and seals it again, to make hostile ones.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from ckpt_testutil import checkpointer

from torchckpt.format.manifest import seal_manifest


def manifest_doc(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` as JSON."""
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return json.load(f)


def rewrite(path: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the manifest's JSON and write it back sealed (a valid seal over hostile content)."""
    doc = manifest_doc(path)
    edit(doc)
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(seal_manifest(doc))


def row_blocks(n: int, world: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each rank's rows, as ``Shard(0)`` cuts ``n`` rows (uneven, maybe empty)."""
    step = -(-n // world)
    return [(min(r * step, n), max(0, min(n, (r + 1) * step) - r * step)) for r in range(world)]


def _tree(keys: list[str], node: Callable[[str], Any]) -> dict[str, Any]:
    """The typed-JSON tree of nested dicts whose leaves are ``node(key)`` at the dotted ``keys``."""

    def encode(value: Any) -> Any:
        if isinstance(value, dict):
            return {"dict": [[k, encode(v)] for k, v in value.items()]}
        return node(value)

    return encode(_nested({k: k for k in keys}))


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def sharded_checkpoint(path: str, tensors: dict[str, torch.Tensor], world: int = 2, step: int = 3) -> str:
    """A committed ``world``-rank checkpoint of ``tensors`` (dotted key -> full tensor) sharded by rows.

    Its state is ``tensors`` nested by the dots of their keys, plus ``step``.
    Rank ``r``'s file holds its row block of each tensor under the tensor's
    key (none when the block is empty), as a save of ``Shard(0)`` ``DTensor``s writes.
    """
    keys = list(tensors)
    blocks = {k: row_blocks(t.shape[0], world) for k, t in tensors.items()}
    entries = []
    for r in range(world):
        parts = {k: t.narrow(0, blocks[k][r][0], blocks[k][r][1]).clone() for k, t in tensors.items() if blocks[k][r][1]}
        where = path if r == 0 else f"{path}.rank{r}"
        checkpointer("safetensors").save(where, {**_nested(parts), "step": step})
        entry = manifest_doc(where)["ranks"][0]
        names = [t["name"] for t in entry["tensors"]]
        entry["rank"], entry["file"] = r, f"rank_{r:05d}.safetensors"
        entry["sharded"] = []
        for k, full in tensors.items():
            start, n = blocks[k][r]
            chunks = [{"T": names.index(k), "offsets": [start] + [0] * (full.dim() - 1)}] if n else []
            dtype = str(full.dtype).removeprefix("torch.")
            entry["sharded"].append({"name": k, "dtype": dtype, "shape": list(full.shape), "chunks": chunks})
        entry["tree"] = {"dict": [*_tree(keys, lambda k: {"DT": keys.index(k)})["dict"], ["step", step]]}
        entries.append(entry)
        if r:
            os.replace(os.path.join(where, "rank_00000.safetensors"), os.path.join(path, entry["file"]))
            shutil.rmtree(where)

    def edit(doc: dict[str, Any]) -> None:
        doc["ranks"], doc["world_size"] = entries, world

    rewrite(path, edit)
    return path
