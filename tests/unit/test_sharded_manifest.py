"""Hostile sharded manifests are refused, naming the tensor, before anything large is allocated.

Each checkpoint here is a real committed native checkpoint whose manifest
was rewritten and sealed again (``sharded_testutil``): the seal passes, so
what refuses it is the validation of the sharded entries — the chunks of a
tensor must tile it exactly (no gap, no overlap, nothing out of bounds),
every rank must agree on its dtype and global shape, a chunk must be a
tensor of its rank's table of the same dtype and rank, and a ``{"DT": j}``
node must name an entry. Global shapes of 2**40 elements make sure no load
allocates the tensor before it has checked it (a 4 TiB allocation would
fail, and :func:`allocations` records every ``torch.empty``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from ckpt_testutil import checkpointer
from sharded_testutil import manifest_doc, rewrite, sharded_checkpoint

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError, StateDictMismatchError
from torchckpt.format.manifest import ManifestError, parse_manifest
from torchckpt.format.shards import MeshTable

pytestmark = pytest.mark.timeout(120)

W = torch.arange(24.0).reshape(4, 6)
B = torch.arange(5, dtype=torch.int64)
HUGE = [1 << 20, 1 << 20]  # 2**40 elements: 4 TiB of float32


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-rank checkpoint of ``model.w`` (4 x 6) and ``model.b`` (5), sharded by rows (never modified)."""
    return sharded_checkpoint(str(tmp_path_factory.mktemp("sharded") / "good"), {"model.w": W, "model.b": B})


@pytest.fixture
def copy(good: str, tmp_path: Any) -> str:
    """A copy of the good checkpoint to tamper with."""
    import shutil

    path = str(tmp_path / "ckpt")
    shutil.copytree(good, path)
    return path


def _files_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _sharded(doc: dict[str, Any], rank: int, name: str = "model.w") -> dict[str, Any]:
    return next(s for s in doc["ranks"][rank]["sharded"] if s["name"] == name)


def _table_index(doc: dict[str, Any], name: str, rank: int = 0) -> int:
    return [t["name"] for t in doc["ranks"][rank]["tensors"]].index(name)


# -- the good checkpoint -------------------------------------------------------


def test_the_crafted_checkpoint_loads_whole_and_into_a_template(good: str) -> None:
    m = read_manifest(good)
    g = m.sharded["model.w"]
    assert (g.dtype, g.shape) == ("float32", (4, 6))
    assert sorted((c.rank, c.box) for c in g.chunks) == [(0, ((0, 0), (2, 6))), (1, ((2, 0), (2, 6)))]
    ck = checkpointer("safetensors")
    loaded = ck.load(good)
    assert torch.equal(loaded["model"]["w"], W) and torch.equal(loaded["model"]["b"], B)
    assert loaded["step"] == 3
    template = {"model": {"w": torch.zeros(4, 6), "b": torch.zeros(5, dtype=torch.int64)}}
    ck.load(good, template)
    assert torch.equal(template["model"]["w"], W) and torch.equal(template["model"]["b"], B)


# -- hostile manifests ---------------------------------------------------------


def _gap(doc: dict[str, Any]) -> None:
    _sharded(doc, 0)["shape"] = HUGE
    _sharded(doc, 1)["shape"] = HUGE


def _overlap(doc: dict[str, Any]) -> None:
    _sharded(doc, 1)["chunks"][0]["offsets"] = [1, 0]


def _out_of_bounds(doc: dict[str, Any]) -> None:
    _gap(doc)
    _sharded(doc, 1)["chunks"][0]["offsets"] = [HUGE[0] - 1, 0]


def _disagree_shape(doc: dict[str, Any]) -> None:
    _sharded(doc, 1)["shape"] = HUGE


def _disagree_dtype(doc: dict[str, Any]) -> None:
    _sharded(doc, 1)["dtype"] = "float16"
    _sharded(doc, 1)["chunks"] = []


def _t_out_of_range(doc: dict[str, Any]) -> None:
    _gap(doc)
    _sharded(doc, 0)["chunks"][0]["T"] = len(doc["ranks"][0]["tensors"])


def _t_negative(doc: dict[str, Any]) -> None:
    _sharded(doc, 0)["chunks"][0]["T"] = -1


def _offsets_too_short(doc: dict[str, Any]) -> None:
    _gap(doc)
    _sharded(doc, 0)["chunks"][0]["offsets"] = [0]


def _offsets_negative(doc: dict[str, Any]) -> None:
    _sharded(doc, 0)["chunks"][0]["offsets"] = [-2, 0]


def _chunk_of_another_dtype(doc: dict[str, Any]) -> None:
    _gap(doc)
    _sharded(doc, 0)["chunks"][0]["T"] = _table_index(doc, "model.b")


def _absurd_shape(doc: dict[str, Any]) -> None:
    _sharded(doc, 0)["shape"] = [1 << 40, 1 << 40]


def _unknown_dtype(doc: dict[str, Any]) -> None:
    _sharded(doc, 0)["dtype"] = "float128"


def _dt_out_of_range(doc: dict[str, Any]) -> None:
    for entry in doc["ranks"]:
        model = entry["tree"]["dict"][0][1]
        model["dict"] = [[k, {"DT": 9} if k == "w" else v] for k, v in model["dict"]]


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "gap": (_gap, "do not tile it: the chunks hold 24 of its 1099511627776 elements (a gap)"),
    "overlap": (_overlap, "do not tile it: the chunks at offsets [0, 0] and [1, 0] overlap"),
    "out of bounds": (_out_of_bounds, "the chunk at offsets [1048575, 0] of sizes [2, 6] lies outside [1048576, 1048576]"),
    "ranks disagree on the shape": (_disagree_shape, "rank 1 saved it as float32 [1048576, 1048576], another rank as float32 [4, 6]"),
    "ranks disagree on the dtype": (_disagree_dtype, "rank 1 saved it as float16 [4, 6], another rank as float32 [4, 6]"),
    "T out of range": (_t_out_of_range, "refers to tensor 2 of the rank's 2"),
    "T negative": (_t_negative, "refers to tensor -1 of the rank's 2"),
    "offsets too short": (_offsets_too_short, "is float32 [2, 6] at [0], not a part of 'model.w' float32 [1048576, 1048576]"),
    "offsets negative": (_offsets_negative, "offsets must be a list of at most 64 non-negative integers"),
    "chunk of another dtype": (_chunk_of_another_dtype, "chunk 'model.b' is int64 [3] at [0, 0], not a part of 'model.w'"),
    "absurd global shape": (_absurd_shape, "absurd shape [1099511627776, 1099511627776]"),
    "unknown dtype": (_unknown_dtype, "unknown dtype 'float128'"),
    "DT out of range": (_dt_out_of_range, "tree refers to sharded tensor 9 of 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_sharded_manifest_is_refused_naming_the_key(copy: str, case: str, allocations: list[int]) -> None:
    edit, expected = HOSTILE[case]
    rewrite(copy, edit)
    limit = _files_bytes(copy)
    ck = checkpointer("safetensors")
    templates = [None, {"model": {"w": torch.full((4, 6), 7.0), "b": torch.zeros(5, dtype=torch.int64)}}]
    for template in templates:
        allocations.clear()
        with pytest.raises(CorruptCheckpointError) as info:
            ck.load(copy, template)
        assert expected in str(info.value), (case, str(info.value))
        assert info.value.key == "model.w", (case, str(info.value))
        assert "'model.w'" in str(info.value)
        assert max(allocations, default=0) <= limit, (case, allocations)
    assert torch.equal(templates[1]["model"]["w"], torch.full((4, 6), 7.0))  # type: ignore[index]


@pytest.mark.parametrize("case", [c for c in HOSTILE if c != "DT out of range"])
def test_parse_manifest_names_the_key_of_a_hostile_entry(copy: str, case: str) -> None:
    rewrite(copy, HOSTILE[case][0])
    with open(os.path.join(copy, "manifest.json"), "rb") as f:
        data = f.read()
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert info.value.key == "model.w"
    assert HOSTILE[case][1] in str(info.value)


def test_a_malformed_dt_node_is_corruption(copy: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        for entry in doc["ranks"]:
            model = entry["tree"]["dict"][0][1]
            model["dict"] = [[k, {"DT": "0"} if k == "w" else v] for k, v in model["dict"]]

    rewrite(copy, edit)
    with pytest.raises(CorruptCheckpointError, match=r"malformed sharded tensor reference at key 'model\.w'"):
        checkpointer("safetensors").load(copy)


def test_a_tensor_sharded_twice_on_one_rank_is_an_overlap(copy: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["ranks"][0]["sharded"].append(dict(_sharded(doc, 0)))

    rewrite(copy, edit)
    with pytest.raises(CorruptCheckpointError, match="chunks at offsets \\[0, 0\\] and \\[0, 0\\] overlap") as info:
        read_manifest(copy)
    assert info.value.key == "model.w"


# -- a template that does not fit --------------------------------------------


@pytest.mark.parametrize(
    "template_w,message",
    [
        (torch.full((4, 7), 7.0), "the template tensor is torch.float32 [4, 7] (global) but the checkpoint"),
        (torch.full((4, 6), 7.0, dtype=torch.float64), "the template tensor is torch.float64 [4, 6] (global)"),
        (torch.full((2, 6), 7.0), "holds torch.float32 [4, 6]"),
    ],
)
def test_a_template_of_another_global_shape_is_a_mismatch_and_stays_untouched(
    good: str, template_w: torch.Tensor, message: str
) -> None:
    before = template_w.clone()
    b = torch.full((5,), -1, dtype=torch.int64)
    template = {"model": {"b": b, "w": template_w}, "step": 0}
    with pytest.raises(StateDictMismatchError) as info:
        checkpointer("safetensors").load(good, template)
    assert message in str(info.value)
    assert info.value.key == "model.w"
    assert torch.equal(template_w, before) and torch.equal(b, torch.full((5,), -1, dtype=torch.int64))
    assert template["step"] == 0


def test_the_sharded_entries_round_trip_the_manifest(good: str) -> None:
    doc = manifest_doc(good)
    assert _sharded(doc, 0) == {"name": "model.w", "dtype": "float32", "shape": [4, 6],
                                "chunks": [{"T": _table_index(doc, "model.w"), "offsets": [0, 0]}]}  # fmt: skip
    m = read_manifest(good)
    assert [s.to_json(MeshTable()) for s in m.ranks[1].sharded] == doc["ranks"][1]["sharded"]


def _count_reads(monkeypatch: pytest.MonkeyPatch, round_bytes: int) -> list[int]:
    """The number of extents of each ``read_extents`` call of sharded loads, with rounds of ``round_bytes``."""
    from torchckpt.format import sharded_read

    reads: list[int] = []
    original = sharded_read.read_extents

    def counting(src, extents, **kw):  # type: ignore[no-untyped-def]
        reads.append(len(extents))
        return original(src, extents, **kw)

    monkeypatch.setattr(sharded_read, "read_extents", counting)
    monkeypatch.setattr(sharded_read, "ROUND_BYTES", round_bytes)
    return reads


def test_a_staged_overlap_larger_than_a_round_is_read_in_slabs(tmp_path, monkeypatch) -> None:
    w = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    path = sharded_checkpoint(str(tmp_path / "ckpt"), {"model.w": w}, world=2)
    reads = _count_reads(monkeypatch, 5 * 6 * 4)  # five rows per slab
    template = {"model": {"w": torch.zeros(6, 40).t()}}  # not contiguous: read through buffers
    tc.make_sync_checkpointer().load(path, template)
    assert torch.equal(template["model"]["w"], w)
    assert sum(reads) == 8 and len(reads) == 8  # 2 chunks of 20 rows, 4 slabs each, one slab per round


def test_an_overlap_that_is_a_row_block_of_a_contiguous_target_is_read_straight_into_it(tmp_path, monkeypatch) -> None:
    w = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    path = sharded_checkpoint(str(tmp_path / "ckpt"), {"model.w": w, "model.v": w + 1}, world=2)
    reads = _count_reads(monkeypatch, 5 * 6 * 4)  # a buffered read would be cut in 4 slabs
    template = {"model": {"w": torch.zeros(40, 6), "v": torch.zeros(40, 6)}}  # rows 0-19 / 20-39: contiguous views
    tc.make_sync_checkpointer().load(path, template)
    assert torch.equal(template["model"]["w"], w) and torch.equal(template["model"]["v"], w + 1)
    assert sum(reads) == 4  # one whole chunk per rank and tensor, no slabs
