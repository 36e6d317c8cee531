"""Sharded checkpoints made in one process: a native checkpoint of plain tensors, its manifest rewritten.

:func:`sharded_checkpoint` saves the parts of some global tensors as plain
tensors of one rank file, copies that file once per rank, and rewrites the
manifest so that rank ``r`` lists the ``r``-th row block of every tensor as
its chunk and its tree refers to the tensors with ``{"DT": j}`` nodes: what
a save of ``DTensor``s sharded by rows on ``world`` ranks committed in format
version 1 (each rank file also holds the other ranks' parts, unlisted). :func:`rewrite` edits a
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
        # Version 1: every rank lists its chunks in its entry, inline (what torchckpt wrote before the global table).
        doc["ranks"], doc["world_size"], doc["torchckpt_format"] = entries, world, 1
        doc.pop("meshes", None)
        doc.pop("sharded", None)

    rewrite(path, edit)
    return path


def as_version2(path: str, *, grid: bool = True) -> str:
    """Rewrite the version 1 checkpoint at ``path`` (from :func:`sharded_checkpoint`) as a save of several ranks commits.

    Each rank's entry goes to its index object (``rank_NNNNN.index.json``) and
    the manifest keeps a line per rank naming it; the global table lists every
    sharded tensor once: on a grid (rows over a 1-D mesh of every rank,
    ``grid=True``) or with its chunks listed.
    """
    from torchckpt.format.manifest import RankEntry, parse_rank_entry
    from torchckpt.format.manifest import IndexRef, check_seal_prefix, SEAL_BYTES

    doc = manifest_doc(path)
    world = doc["world_size"]
    lines, table = [], {}
    for r, entry_doc in enumerate(doc["ranks"]):
        for s in entry_doc["sharded"]:
            if grid:
                s["grid"] = {"mesh": 0, "placements": ["S0"], "replica": 0}
            line = table.setdefault(s["name"], {k: s[k] for k in ("name", "dtype", "shape")})
            if grid:
                line["grid"] = s["grid"]
            else:
                sizes = {t["name"]: t["shape"] for t in entry_doc["tensors"]}
                names = [t["name"] for t in entry_doc["tensors"]]
                line.setdefault("chunks", []).extend(
                    [r, c["offsets"], sizes[names[c["T"]]]] for c in s["chunks"]
                )
        if grid:
            entry_doc["meshes"] = [{"shape": [world], "ranks": {"start": 0, "step": 1}}]
        entry: RankEntry = parse_rank_entry(entry_doc, r, 16 << 20, world)
        data = seal_manifest(entry.to_json())
        ref = IndexRef(f"rank_{r:05d}.index.json", len(data), check_seal_prefix(data[:SEAL_BYTES]))
        with open(os.path.join(path, ref.file), "wb") as f:
            f.write(data)
        lines.append(entry.stub(ref).to_json())

    def edit(d: dict[str, Any]) -> None:
        d["torchckpt_format"], d["ranks"] = 2, lines
        d["meshes"] = [{"shape": [world], "ranks": {"start": 0, "step": 1}}] if grid else []
        d["sharded"] = list(table.values())

    rewrite(path, edit)
    return path


def rewrite_index(path: str, rank: int, edit: Callable[[dict[str, Any]], None], *, reseal: bool = True) -> None:
    """Apply ``edit`` to rank ``rank``'s index object; with ``reseal``, also make the manifest name its new bytes."""
    from torchckpt.format.manifest import SEAL_BYTES, check_seal_prefix

    name = os.path.join(path, f"rank_{rank:05d}.index.json")
    with open(name, "rb") as f:
        doc = json.load(f)
    doc.pop("manifest_crc32c")
    edit(doc)
    data = seal_manifest(doc)
    with open(name, "wb") as f:
        f.write(data)
    if reseal:

        def point(d: dict[str, Any]) -> None:
            d["ranks"][rank]["index"]["size_bytes"] = len(data)
            d["ranks"][rank]["index"]["crc32c"] = f"{check_seal_prefix(data[:SEAL_BYTES]):08x}"

        rewrite(path, point)
