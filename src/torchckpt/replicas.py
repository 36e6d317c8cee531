"""Plain tensors every rank holds alike (data-parallel replicas), written once.

With ``CheckpointWriterConfig(dedup_replicated=True)`` the ranks agree,
before any of them writes, on which plain tensors are replicas: each rank
publishes the crc32c, dtype and shape of each plain tensor of its state
under its key path; the coordinator (rank 0) keeps the keys that every rank
holds with the same bytes and publishes them. Each such tensor is then
written by one rank — the one given the fewest bytes so far, in the
coordinator's order, the same choice on every rank — as a sharded tensor of
one chunk (``format/shards.py``), and loads as a plain tensor again. A key
whose bytes differ between ranks is not deduplicated: every rank keeps its
own copy, so nothing is ever dropped on an assumption. A rank that failed
before the exchange publishes its failure, and the others write nothing.

Call order, on every rank: :meth:`ReplicaExchange.agree` once per save,
before writing; then :func:`deduplicate` with what it returned.
"""

from __future__ import annotations

import dataclasses
import hashlib

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .agreement import describe_error
from .format.dtypes import dtype_name
from .format.extents import checksum
from .format.native import contiguous_bytes, host_contiguous
from .format.shards import ChunkEntry, ShardedEntry
from .format.tree import Flattened

__all__ = ["OtherRankFailed", "ReplicaExchange", "deduplicate", "replica_digests"]


class OtherRankFailed(Exception):
    """Another rank failed before the exchange: this rank writes nothing (the agreement names that rank)."""


def replica_digests(flat: Flattened) -> list[list[Any]]:
    """``[name, dtype, shape, crc32c]`` of each plain tensor of ``flat`` (not the chunks of a ``DTensor``)."""
    chunks = {c.tensor for s in flat.sharded for c in s.chunks}
    out = []
    for i, t in enumerate(flat.tensors):
        if i in chunks:
            continue
        host = host_contiguous(t)
        out.append([flat.names[i], dtype_name(t.dtype), list(t.shape), checksum(contiguous_bytes(host))])
    return out


class ReplicaExchange:
    """The exchange of one save's replica digests through the job's key-value store.

    Args:
        store: A ``torch.distributed.Store`` every rank reaches.
        prefix: The save's key prefix (``Agreement.prefix``).
        rank: This rank.
        world_size: Number of ranks.
        timeout_s: Longest wait for the other ranks.
    """

    def __init__(self, store: Any, *, prefix: str, rank: int, world_size: int, timeout_s: float) -> None:
        self.store = store
        self.prefix = f"{prefix}/replicas"
        self.rank = rank
        self.world_size = world_size
        self.timeout = timedelta(seconds=timeout_s)

    def agree(self, digests: list[list[Any]] | None, error: BaseException | None) -> list[str]:
        """Publish this rank's digests (or its error); return the replicated keys, in the coordinator's order.

        Two rounds at most. First every rank publishes one SHA-256 of its whole
        list: when they are all equal (every rank holds the same keys alike, the
        DDP case) every key is replicated, and the store carries O(ranks) small
        values. Otherwise every rank publishes its list and the coordinator keeps
        the keys every rank holds alike.

        Raises:
            OtherRankFailed: A rank published an error instead of its digests.
            TimeoutError: A rank (or the coordinator) did not publish in time.
        """
        if error is not None:
            mine: dict[str, Any] = {"error": describe_error(error)}
        else:
            mine = {"summary": hashlib.sha256(json.dumps(digests).encode()).hexdigest()}
        agreed = self._round("summary", mine, lambda docs: self._decide_summaries(docs, digests))
        if agreed.get("full"):
            agreed = self._round("full", {"digests": digests}, lambda docs: self._decide(docs, digests))
        if agreed.get("failed"):
            raise OtherRankFailed(f"ranks {agreed['failed']} failed before writing")
        return list(agreed["keys"])

    def _round(self, name: str, mine: dict[str, Any], decide: Any) -> dict[str, Any]:
        """Publish ``mine``; the coordinator gathers every rank's and publishes ``decide(docs)``; all read that."""
        prefix = f"{self.prefix}/{name}"
        self.store.set(f"{prefix}/{self.rank}", json.dumps(mine))
        if self.rank == 0:
            docs = []
            for r in range(self.world_size):
                key = f"{prefix}/{r}"
                self.store.wait([key], self.timeout)
                docs.append(json.loads(self.store.get(key)))
            self.store.set(f"{prefix}/agreed", json.dumps(decide(docs)))
        key = f"{prefix}/agreed"
        self.store.wait([key], self.timeout)
        agreed = json.loads(self.store.get(key))
        if self.rank == 0:
            for r in range(self.world_size):
                self.store.delete_key(f"{prefix}/{r}")
        return agreed

    @staticmethod
    def _decide_summaries(docs: list[dict[str, Any]], own: list[list[Any]] | None) -> dict[str, Any]:
        """Coordinator, round 1: failures, or every key when every rank's list is the same, or a full round."""
        failed = [r for r, doc in enumerate(docs) if "error" in doc]
        if failed:
            return {"failed": failed}
        if len({doc["summary"] for doc in docs}) == 1:
            return {"keys": [d[0] for d in own or []]}
        return {"full": True}

    @staticmethod
    def _decide(docs: list[dict[str, Any]], own: list[list[Any]] | None) -> dict[str, Any]:
        """Coordinator, round 2: the keys every rank holds with the same dtype, shape and bytes."""
        common = None
        for doc in docs:
            seen = {d[0]: tuple(map(json.dumps, d[1:])) for d in doc["digests"]}
            common = seen if common is None else {k: v for k, v in common.items() if seen.get(k) == v}
        order = [d[0] for d in own or []]
        return {"keys": [k for k in order if common is not None and k in common]}


def deduplicate(flat: Flattened, agreed: Sequence[str], *, rank: int, world_size: int) -> Flattened:
    """``flat`` with each agreed tensor made a sharded tensor of one chunk, written here only if this rank is chosen."""
    if not agreed:
        return flat
    index = {n: i for i, n in enumerate(flat.names)}
    given = [0] * world_size
    writer: dict[int, int] = {}
    for name in agreed:
        i = index[name]
        chosen = min(range(world_size), key=lambda r: (given[r], r))
        given[chosen] += flat.tensors[i].numel() * flat.tensors[i].element_size()
        writer[i] = chosen
    kept = [i for i in range(len(flat.tensors)) if writer.get(i, rank) == rank]
    remap = {old: new for new, old in enumerate(kept)}
    sharded = [
        dataclasses.replace(s, chunks=tuple(ChunkEntry(remap[c.tensor], c.offsets) for c in s.chunks))
        for s in flat.sharded
    ]
    as_sharded: dict[int, int] = {}
    for i in writer:
        t = flat.tensors[i]
        chunks = (ChunkEntry(remap[i], (0,) * t.dim()),) if writer[i] == rank else ()
        as_sharded[i] = len(sharded)
        sharded.append(ShardedEntry(flat.names[i], dtype_name(t.dtype), tuple(t.shape), chunks, writer=writer[i]))
    tree = _rewrite(flat.tree, remap, as_sharded)
    return Flattened(
        tree=tree,
        tensors=[flat.tensors[i] for i in kept],
        names=[flat.names[i] for i in kept],
        pickled=flat.pickled,
        empty_bytes=flat.empty_bytes,
        sharded=sharded,
    )


def _rewrite(node: Any, remap: dict[int, int], as_sharded: dict[int, int]) -> Any:
    """The tree with tensor references renumbered, and those of deduplicated tensors made sharded references."""
    if isinstance(node, list):
        return [_rewrite(n, remap, as_sharded) for n in node]
    if not isinstance(node, dict):
        return node
    ((tag, body),) = node.items()
    if tag == "T":
        return {"DT": as_sharded[body]} if body in as_sharded else {"T": remap[body]}
    if tag in ("dict", "odict", "list", "tuple"):
        return {tag: _rewrite(body, remap, as_sharded)}
    return node
