"""Format version 2: rank entries in index objects, sharded tensors in one global table — and hostile ones.

The checkpoints are the row-sharded 2-rank checkpoints of ``sharded_testutil``
rewritten as a save of several ranks commits them (``as_version2``): the
manifest holds a line per rank naming its index object, and a table with one
line per sharded tensor, on a grid or with its chunks listed. Every hostile
edit is sealed again, so what refuses it is validation: of the table
(:func:`parse_table`, at commit and at load), of an index against the
manifest's line for it, and of a grid's chunk against its writer's entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ckpt_testutil import checkpointer
from sharded_testutil import as_version2, manifest_doc, rewrite, rewrite_index, sharded_checkpoint

from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError
from torchckpt.format.fields import ManifestError
from torchckpt.format.table import parse_table
from torchckpt.reading import open_checkpoint
from torchckpt.verify import verify_checkpoint

pytestmark = pytest.mark.timeout(120)

W = torch.arange(40.0).reshape(10, 4)  # rows 4, 4, 2 on 3 ranks (uneven)
B = torch.arange(5, dtype=torch.int64)


@pytest.fixture(scope="module", params=["grid", "listed"])
def good(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("v2") / request.param)
    sharded_checkpoint(path, {"model.w": W, "model.b": B}, world=3)
    return as_version2(path, grid=request.param == "grid")


@pytest.fixture
def copy(good: str, tmp_path: Any) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(good, path)
    return path


def test_a_version_2_checkpoint_loads_whole_and_into_templates(good: str) -> None:
    m = read_manifest(good)
    assert m.version == 2 and all(r.index is not None and r.tensors == () for r in m.ranks)
    g = m.sharded["model.w"]
    assert [(c.rank, c.box) for c in g.all_chunks()] == [
        (0, ((0, 0), (4, 4))), (1, ((4, 0), (4, 4))), (2, ((8, 0), (2, 4)))
    ]  # fmt: skip
    assert (g.grid is not None) == good.endswith("grid")
    ck = checkpointer("safetensors")
    loaded = ck.load(good)
    assert torch.equal(loaded["model"]["w"], W) and torch.equal(loaded["model"]["b"], B) and loaded["step"] == 3
    template = {"model": {"w": torch.zeros(10, 4), "b": torch.zeros(5, dtype=torch.int64)}}
    ck.load(good, template)
    assert torch.equal(template["model"]["w"], W)
    manifest, problems = verify_checkpoint(good)
    assert problems == [] and manifest is not None


def test_a_rank_reads_only_the_indexes_it_needs(good: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows 8..9 live on rank 2 only: a load of them opens rank 2's index and no other (plus its own)."""
    from torchckpt.format import manifest as manifest_module

    parsed: list[int] = []
    real = manifest_module.parse_rank_index

    def counting(data: bytes, stub: Any, *args: Any) -> Any:
        parsed.append(stub.rank)
        return real(data, stub, *args)

    monkeypatch.setattr("torchckpt.reading.parse_rank_index", counting)
    with open_checkpoint(good) as snapshot:
        m = snapshot.manifest()
        assert parsed == []  # the manifest alone names no rank's tensors
        chunks = m.sharded["model.w"].overlapping(((8, 0), (2, 4)))
        assert [c.rank for c in chunks] == [2]
        snapshot.rank_entry(2)
        snapshot.rank_entry(2)
    assert parsed == [2]  # read once, kept


# -- hostile tables -------------------------------------------------------------


def _line(doc: dict[str, Any], name: str = "model.w") -> dict[str, Any]:
    return next(s for s in doc["sharded"] if s["name"] == name)


def _grid(doc: dict[str, Any]) -> dict[str, Any]:
    line = _line(doc)
    line.pop("chunks", None)
    line["grid"] = line.get("grid") or {"mesh": 0, "placements": ["S0"], "replica": 0}
    if not doc["meshes"]:
        doc["meshes"] = [{"shape": [3], "ranks": {"start": 0, "step": 1}}]
    return line["grid"]


def _listed(doc: dict[str, Any]) -> list[Any]:
    line = _line(doc)
    line.pop("grid", None)
    line["chunks"] = line.get("chunks") or [[0, [0, 0], [4, 4]], [1, [4, 0], [4, 4]], [2, [8, 0], [2, 4]]]
    return line["chunks"]


HOSTILE_TABLES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "listed: a gap": (lambda d: _listed(d).pop(1), "do not tile it: the chunks hold 24 of its 40 elements (a gap)"),
    "listed: an overlap": (lambda d: _listed(d)[1].__setitem__(1, [3, 0]), "the chunks at offsets [0, 0] and [3, 0] overlap"),
    "listed: out of bounds": (lambda d: _listed(d)[2].__setitem__(1, [9, 0]), "lies outside [10, 4]"),
    "listed: rank out of range": (lambda d: _listed(d)[0].__setitem__(0, 7), "rank 7 of 3"),
    "listed: not [rank, offsets, sizes]": (lambda d: _listed(d).__setitem__(0, {"rank": 0}), "a chunk is [rank, offsets, sizes]"),
    "grid: unknown placement": (lambda d: _grid(d).__setitem__("placements", ["P"]), "unknown placement 'P'"),
    "grid: placement of a dimension it lacks": (lambda d: _grid(d).__setitem__("placements", ["S2"]), "unknown placement 'S2' for a tensor of 2 dimensions"),
    "grid: placements of another mesh": (lambda d: _grid(d).__setitem__("placements", ["S0", "R"]), "2 placements for a mesh of 1 dimensions"),
    "grid: mesh out of range": (lambda d: _grid(d).__setitem__("mesh", 4), "refers to mesh 4 of 1"),
    "grid: replica out of range": (lambda d: _grid(d).__setitem__("replica", 1), "replica 1 of 1"),
    "writer out of range": (lambda d: (_line(d).pop("grid", None), _line(d).pop("chunks", None), _line(d).__setitem__("writer", 3)), "writer rank 3 of 3"),
    "listed twice": (lambda d: d["sharded"].append(dict(_line(d))), "listed twice"),
    "unknown dtype": (lambda d: _line(d).__setitem__("dtype", "float128"), "unknown dtype 'float128'"),
    "absurd shape": (lambda d: _line(d).__setitem__("shape", [1 << 40, 1 << 40]), "absurd shape"),
}  # fmt: skip

HOSTILE_MESHES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "mesh larger than the job": (lambda d: (_grid(d), d["meshes"][0].__setitem__("shape", [1 << 40])), "does not fit 3 ranks"),
    "mesh ranks repeated": (lambda d: (_grid(d), d["meshes"][0].__setitem__("ranks", [0, 0, 1])), "3 distinct ranks below 3"),
    "mesh rank beyond the job": (lambda d: (_grid(d), d["meshes"][0].__setitem__("ranks", {"start": 1, "step": 1})), "3 distinct ranks below 3"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE_TABLES))
def test_a_hostile_table_is_refused_naming_the_key_before_anything_is_allocated(
    copy: str, case: str, allocations: list[int]
) -> None:
    edit, expected = HOSTILE_TABLES[case]
    rewrite(copy, edit)
    template = {"model": {"w": torch.full((10, 4), 7.0), "b": torch.zeros(5, dtype=torch.int64)}}
    for target in (None, template):
        allocations.clear()
        with pytest.raises(CorruptCheckpointError) as info:
            checkpointer("safetensors").load(copy, target)
        assert expected in str(info.value), (case, str(info.value))
        assert info.value.key == "model.w" and "'model.w'" in str(info.value), (case, str(info.value))
        assert max(allocations, default=0) < 1 << 20, (case, allocations)
    assert torch.equal(template["model"]["w"], torch.full((10, 4), 7.0))
    manifest, problems = verify_checkpoint(copy)
    assert manifest is None and len(problems) == 1 and problems[0].key == "model.w", problems


@pytest.mark.parametrize("case", list(HOSTILE_MESHES))
def test_a_hostile_mesh_is_refused(copy: str, case: str, allocations: list[int]) -> None:
    edit, expected = HOSTILE_MESHES[case]
    rewrite(copy, edit)
    with pytest.raises(CorruptCheckpointError, match="manifest.json") as info:
        checkpointer("safetensors").load(copy)
    assert expected in str(info.value), (case, str(info.value))
    assert max(allocations, default=0) < 1 << 20, (case, allocations)


def test_parse_table_is_the_check_of_the_commit_too() -> None:
    """The coordinator runs the same check before it commits: a table whose listed chunks leave a gap is refused."""
    doc = {"meshes": [], "sharded": [{"name": "x", "dtype": "float32", "shape": [4], "chunks": [[0, [0], [3]]]}]}
    with pytest.raises(ManifestError, match="do not tile it") as info:
        parse_table(doc, 1)
    assert info.value.key == "x"


# -- index objects -----------------------------------------------------------------


def test_a_missing_index_is_corruption_naming_it(copy: str) -> None:
    os.unlink(os.path.join(copy, "rank_00001.index.json"))
    with pytest.raises(CorruptCheckpointError, match="rank index rank_00001.index.json listed in the manifest is missing"):
        checkpointer("safetensors").load(copy)
    _, problems = verify_checkpoint(copy)
    assert [p.file for p in problems] == ["rank_00001.index.json"]


def test_a_changed_index_is_refused(copy: str) -> None:
    name = os.path.join(copy, "rank_00002.index.json")
    with open(name, "r+b") as f:
        data = bytearray(f.read())
        at = data.index(b'"offset":') + 9
        data[at : at + 1] = b"9" if data[at : at + 1] != b"9" else b"8"
        f.seek(0)
        f.write(data)
    with pytest.raises(CorruptCheckpointError, match="rank_00002.index.json: checksum mismatch"):
        checkpointer("safetensors").load(copy)


def test_an_index_of_another_size_is_refused(copy: str) -> None:
    with open(os.path.join(copy, "rank_00000.index.json"), "ab") as f:
        f.write(b" ")
    with pytest.raises(CorruptCheckpointError, match="rank_00000.index.json: .* bytes, the manifest says"):
        checkpointer("safetensors").load(copy)


def test_an_index_swapped_for_another_ranks_is_refused(copy: str) -> None:
    """Rank 1's index, resealed and named by rank 0's line: it describes another rank file."""
    shutil.copy(os.path.join(copy, "rank_00001.index.json"), os.path.join(copy, "rank_00000.index.json"))
    rewrite_index(copy, 0, lambda d: None)
    with pytest.raises(CorruptCheckpointError, match=r"rank_00000.index.json: ranks\[0\]: rank 1 out of order"):
        checkpointer("safetensors").load(copy)


def test_an_index_describing_another_file_is_refused(copy: str) -> None:
    rewrite_index(copy, 0, lambda d: d.__setitem__("file", "rank_00002.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="describes rank_00002.safetensors .*not the manifest's rank_00000"):
        checkpointer("safetensors").load(copy)


def test_a_grid_chunk_its_writer_does_not_hold_is_corruption_naming_the_key(copy: str) -> None:
    """The table says rank 1 wrote rows 4..7; rank 1's index (validly sealed) lists no such chunk."""
    if read_manifest(copy).sharded["model.w"].grid is None:
        pytest.skip("a grid checkpoint only")

    def drop(doc: dict[str, Any]) -> None:
        next(s for s in doc["sharded"] if s["name"] == "model.w")["chunks"] = []

    rewrite_index(copy, 1, drop)
    template = {"model": {"w": torch.full((10, 4), 7.0), "b": torch.zeros(5, dtype=torch.int64)}}
    for target in (None, template):
        with pytest.raises(CorruptCheckpointError, match=r"rank 1 should hold the chunk of 'model.w' at \[4, 0\]") as info:
            checkpointer("safetensors").load(copy, target)
        assert info.value.key == "model.w"
    assert torch.equal(template["model"]["w"], torch.full((10, 4), 7.0))
    _, problems = verify_checkpoint(copy)
    assert [(p.key, "rank 1" in p.message) for p in problems] == [("model.w", True)]


def test_the_index_is_named_by_the_manifest_only(good: str) -> None:
    doc = manifest_doc(good)
    line = doc["ranks"][1]
    assert set(line) == {"rank", "file", "size_bytes", "digest", "index", "signature"}
    assert line["index"]["file"] == "rank_00001.index.json"
    with open(os.path.join(good, "rank_00001.index.json"), "rb") as f:
        index = json.loads(f.read())
    assert index["file"] == "rank_00001.safetensors" and {t["name"] for t in index["tensors"]} >= {"model.w"}


# -- the fast path of an index's sharded entries -------------------------------------

_GOOD_SHARDED = {"name": "w", "dtype": "float32", "shape": [4, 6], "chunks": [{"T": 0, "offsets": [2, 0]}],
                 "grid": {"mesh": 0, "placements": ["S0"], "replica": 0}}  # fmt: skip
_SHARDED_VALUES = {
    "name": st.sampled_from(["w", "", 3, None]),
    "dtype": st.sampled_from(["float32", "float16", "float33", 1, None]),
    "shape": st.sampled_from([[4, 6], [4], [], [0, 6], [4, -6], [4, True], [4.0, 6], "4,6", [2**40, 2**40]]),
    "chunks": st.sampled_from([[], [{"T": 0, "offsets": [2, 0]}], [{"T": 1, "offsets": [2, 0]}],
                               [{"T": -1, "offsets": [2, 0]}], [{"T": 0, "offsets": [2]}], [{"T": 0, "offsets": [-2, 0]}],
                               [{"T": True, "offsets": [2, 0]}], [{"T": 0}], [[0, [2, 0]]], "none"]),  # fmt: skip
    "grid": st.sampled_from([{"mesh": 0, "placements": ["S0"], "replica": 0}, {"mesh": 1, "placements": ["S0"], "replica": 0},
                             {"mesh": 0, "placements": ["S1"], "replica": 0}, {"mesh": 0, "placements": ["S2"], "replica": 0},
                             {"mesh": 0, "placements": ["R"], "replica": 1}, {"mesh": 0, "placements": ["R"], "replica": 2},
                             {"mesh": 0, "placements": ["S0", "R"], "replica": 0}, {"mesh": True, "placements": ["S0"], "replica": 0},
                             {"mesh": 0, "placements": "S0", "replica": 0}, None, 0]),  # fmt: skip
    "writer": st.sampled_from([0, 1, 2, -1, True, None]),
}


@given(
    changes=st.dictionaries(st.sampled_from(sorted(_SHARDED_VALUES)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: _SHARDED_VALUES[k] for k in keys})
    ),
    dropped=st.sets(st.sampled_from(sorted(_GOOD_SHARDED)), max_size=2),
)
@example(changes={}, dropped=set())
@example(changes={"writer": 1}, dropped={"grid"})
@settings(max_examples=400, deadline=None)
def test_fast_sharded_entry_parse_agrees_with_the_checked_one(changes: dict[str, Any], dropped: set[str]) -> None:
    """The per-load fast path accepts exactly what the field-by-field check accepts, and builds the same entry."""
    import copy

    from torchckpt.format import manifest as m
    from torchckpt.format.tensor_table import TensorEntry

    doc = {k: v for k, v in {**_GOOD_SHARDED, **changes}.items() if k not in dropped}
    tensors = (TensorEntry("w", "float32", (2, 6), 64, 48, (0,)),)
    meshes = [((2,), (0, 1))]
    try:
        checked = m._parse_sharded(copy.deepcopy(doc), "s", tensors, meshes, 2, {})
    except ManifestError:
        checked = None
    fast = m._parse_sharded_fast(copy.deepcopy(doc), tensors, meshes, 2, {})
    assert fast is None or fast == checked, (doc, fast, checked)
    writer_doc = {**{k: v for k, v in _GOOD_SHARDED.items() if k != "grid"}, "writer": 1}
    if json.dumps(doc, sort_keys=True) in (json.dumps(_GOOD_SHARDED, sort_keys=True), json.dumps(writer_doc, sort_keys=True)):
        assert fast is not None and fast == checked  # a good entry takes the fast path
