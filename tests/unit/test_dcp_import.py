"""import-dcp: a torch DCP checkpoint converted, and hostile ones refused before anything is run or written."""

from __future__ import annotations

import builtins
import copy
import itertools
import json
import os
import pickle
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch.distributed.checkpoint as dcp
from ckpt_testutil import assert_state_equal
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.dcp_import import import_dcp
from torchckpt.dcp_metadata import DcpChunk, DcpLocation, check_tiling, read_dcp_index
from torchckpt.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, UnsafeObjectError

pytestmark = pytest.mark.timeout(120)


class Opaque:
    """A value DCP pickles as an object: not plain data."""

    def __init__(self, x: int) -> None:
        self.x = x


class SystemPayload:
    """Unpickling runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling runs ``exec`` of code that writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _dcp_save(state: dict[str, Any], path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... save in a single process"
        dcp.save(state, checkpoint_id=path)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w": torch.randn(3, 4, generator=g),
            "b": torch.randn(4, generator=g).to(torch.bfloat16),
            "h": torch.randn(2, 2, 3, generator=g).to(torch.float16),
            "d": torch.randn(5, generator=g, dtype=torch.float64),
            "ids": torch.arange(-3, 9, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "u8": torch.arange(250, 256, dtype=torch.uint8),
            "c": torch.randn(3, generator=g, dtype=torch.complex64),
            "t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # not contiguous
            "empty": torch.empty(0, 3, dtype=torch.int32),
        },
        "scalar": torch.tensor(2.5),
        "optim": {"param_groups": [{"lr": 0.001, "betas": (0.9, 0.95), "params": ["model.w", "model.b"]}]},
        "layers": [torch.ones(2), {"k": torch.zeros(1, dtype=torch.int16)}],
        "step": 17,
        "name": "run-1",
        "lr": 1e-3,
    }


@pytest.fixture
def src(tmp_path: Any) -> str:
    path = str(tmp_path / "dcp")
    _dcp_save(_state(), path)
    return path


def _load(path: str) -> Any:
    return tc.make_sync_checkpointer().load(path)


def test_single_process_save_imports_exactly(src: str, tmp_path: Any) -> None:
    dst = str(tmp_path / "out")
    summary = import_dcp(src, dst)
    expected = _state()
    expected["model"]["t"] = expected["model"]["t"].contiguous()
    assert_state_equal(_load(dst), expected)
    assert (summary.tensors, summary.chunks, summary.values, summary.files, summary.source_ranks) == (13, 13, 6, 1, 1)
    assert summary.tensor_bytes == sum(t.numel() * t.element_size() for t in _tensors(expected))
    man = read_manifest(dst)
    assert (man.layout, man.world_size) == ("safetensors", 1)
    assert man.metadata == {"imported_from": "torch.distributed.checkpoint", "dcp_version": "1.0.0"}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in items for t in _tensors(v)]


def test_dict_keys_come_back_as_dcp_records_them(tmp_path: Any) -> None:
    """DCP flattens a dict key with str(): an optimizer's int parameter ids come back as str."""
    path, dst = str(tmp_path / "dcp"), str(tmp_path / "out")
    _dcp_save({"optim": {"state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}}}}, path)
    import_dcp(path, dst)
    assert_state_equal(_load(dst), {"optim": {"state": {"0": {"step": torch.tensor(3.0)}, "1": {"step": torch.tensor(4.0)}}}})


def test_an_existing_destination_is_refused_unless_overwrite(src: str, tmp_path: Any) -> None:
    dst = str(tmp_path / "out")
    tc.make_sync_checkpointer().save(dst, {"old": torch.zeros(1)})
    with pytest.raises(CheckpointExistsError, match="already exists"):
        import_dcp(src, dst)
    assert list(_load(dst)) == ["old"]
    import_dcp(src, dst, overwrite=True)
    assert "model" in _load(dst)
    with pytest.raises(CheckpointExistsError, match="is the DCP checkpoint being imported"):
        import_dcp(src, src, overwrite=True)


def test_missing_or_foreign_source(tmp_path: Any) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        import_dcp(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="has no .metadata"):
        import_dcp(str(tmp_path / "plain"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- hostile metadata --------------------------------------------------------


def _metadata(path: str) -> Metadata:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return pickle.load(f)  # the test's own file, written just now by dcp.save


def _write_metadata(path: str, md: Any) -> None:
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _refused(src: str, tmp_path: Any, error: type[Exception], match: str) -> pytest.ExceptionInfo[Exception]:
    dst = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        import_dcp(src, str(dst))
    assert not dst.exists()
    assert not [n for n in os.listdir(tmp_path) if n not in ("dcp", "marker")], os.listdir(tmp_path)
    return info


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
@pytest.mark.parametrize("where", ["planner_data", "whole", "storage_meta"])
def test_a_pickle_payload_in_metadata_is_refused_and_never_run(src: str, tmp_path: Any, payload: Any, where: str) -> None:
    marker = str(tmp_path / "marker")
    md = _metadata(src)
    if where == "whole":
        md = payload(marker)
    else:
        setattr(md, where, payload(marker))
    _write_metadata(src, md)
    name = "posix.system" if payload is SystemPayload else "builtins.exec"
    info = _refused(src, tmp_path, UnsafeObjectError, f"refusing to unpickle {name}")
    assert info.value.type_name == name
    assert not os.path.exists(marker)


def test_a_foreign_class_in_metadata_is_refused(src: str, tmp_path: Any) -> None:
    md = _metadata(src)
    md.planner_data = {"step": Opaque(1)}
    _write_metadata(src, md)
    info = _refused(src, tmp_path, UnsafeObjectError, f"refusing to unpickle {__name__}.Opaque")
    assert info.value.type_name == f"{__name__}.Opaque"


def test_a_non_plain_value_is_refused_naming_its_key(tmp_path: Any) -> None:
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "dcp")
    _dcp_save({"model": {"w": torch.ones(2)}, "extra": {"cfg": SystemPayload(marker)}}, path)
    info = _refused(path, tmp_path, UnsafeObjectError, r"key 'extra.cfg': its value is not plain data")
    assert info.value.key == "extra.cfg"
    assert not os.path.exists(marker)


def _edit_storage(src: str, key: str, offsets: tuple[int, ...] | None, **changes: Any) -> None:
    md = _metadata(src)
    idx = MetadataIndex(key, offsets)
    info = copy.copy(md.storage_data[idx])
    for k, v in changes.items():
        setattr(info, k, v)
    md.storage_data[idx] = info
    _write_metadata(src, md)


def _file_size(src: str) -> int:
    return os.path.getsize(os.path.join(src, "__0_0.distcp"))


@pytest.mark.parametrize(
    "key, offsets", [("model.w", (0, 0)), ("step", None)], ids=["tensor", "value"]
)
def test_storage_beyond_the_file_is_refused(src: str, tmp_path: Any, key: str, offsets: Any) -> None:
    _edit_storage(src, key, offsets, offset=_file_size(src) - 10)
    info = _refused(src, tmp_path, CorruptCheckpointError, rf"key '{key}': storage_data .* lies beyond the end")
    assert info.value.key == key


def test_a_length_beyond_the_file_is_refused(src: str, tmp_path: Any) -> None:
    _edit_storage(src, "model.w", (0, 0), length=10**12)
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': storage_data \(file __0_0.distcp, offset \d+, "
             r"length 1000000000000\) lies beyond the end of the file")  # fmt: skip


@pytest.mark.parametrize("name", ["../escape.distcp", "/etc/passwd", "a\0b", ".metadata", ""])
def test_a_file_name_outside_the_checkpoint_is_refused(src: str, tmp_path: Any, name: str) -> None:
    _edit_storage(src, "model.w", (0, 0), relative_path=name)
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': storage_data names the file")


def test_a_symlinked_data_file_is_refused(src: str, tmp_path: Any) -> None:
    os.rename(os.path.join(src, "__0_0.distcp"), str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(src, "__0_0.distcp"))
    dst = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError, match="is not a regular file"):
        import_dcp(src, str(dst))
    assert not dst.exists()


def _add_chunk(src: str, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], like: tuple[int, ...]) -> None:
    """Give ``key`` one more chunk, stored where its chunk at ``like`` is."""
    md = _metadata(src)
    md.state_dict_metadata[key].chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
    md.storage_data[MetadataIndex(key, offsets)] = md.storage_data[MetadataIndex(key, like)]
    _write_metadata(src, md)


def _set_chunk(src: str, key: str, i: int, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    md = _metadata(src)
    old = md.state_dict_metadata[key].chunks[i]
    md.state_dict_metadata[key].chunks[i] = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    md.storage_data[MetadataIndex(key, offsets)] = md.storage_data.pop(MetadataIndex(key, tuple(old.offsets)))
    _write_metadata(src, md)


def test_overlapping_chunks_are_refused(src: str, tmp_path: Any) -> None:
    _add_chunk(src, "model.w", (1, 0), (1, 4), like=(0, 0))
    info = _refused(src, tmp_path, CorruptCheckpointError,
                    r"key 'model.w': the chunks at offsets \[0, 0\] and \[1, 0\] overlap")  # fmt: skip
    assert info.value.key == "model.w"


def test_a_second_chunk_of_a_scalar_overlaps(src: str, tmp_path: Any) -> None:
    _add_chunk(src, "scalar", (), (), like=())
    md = _metadata(src)
    assert len(md.state_dict_metadata["scalar"].chunks) == 2  # the same offsets: both map to one storage entry
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'scalar': two chunks hold the only element \(an overlap\)")


def test_a_gap_is_refused(src: str, tmp_path: Any) -> None:
    _set_chunk(src, "model.w", 0, (0, 0), (2, 4))
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': the chunks hold 8 of its 12 elements \(a gap\)")  # fmt: skip


def test_a_chunk_outside_the_tensor_is_refused(src: str, tmp_path: Any) -> None:
    _set_chunk(src, "model.w", 0, (1, 0), (3, 4))
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': the chunk at offsets \[1, 0\] of sizes \[3, 4\] "
             r"lies outside \[3, 4\]")  # fmt: skip


def test_a_chunk_bigger_than_its_bytes_is_refused_before_allocating(src: str, tmp_path: Any) -> None:
    md = _metadata(src)
    entry = md.state_dict_metadata["model.w"]
    entry.size = torch.Size([2**40, 4])
    entry.chunks[0] = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2**40, 4]))
    _write_metadata(src, md)
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': its chunk at offsets \[0, 0\] of sizes "
             r"\[1099511627776, 4\] needs more than the \d+ bytes stored for it")  # fmt: skip


def test_a_chunk_whose_payload_disagrees_is_refused(src: str, tmp_path: Any) -> None:
    md = _metadata(src)
    md.storage_data[MetadataIndex("model.w", (0, 0))] = md.storage_data[MetadataIndex("model.ids", (0,))]
    _write_metadata(src, md)
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.w': its chunk at offsets \[0, 0\] holds a tensor "
             r"of torch.int64 \[12\], the metadata says a tensor of torch.float32 \[3, 4\]")  # fmt: skip


def test_dcp_safetensors_serialization_is_refused_by_name(tmp_path: Any) -> None:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    path = str(tmp_path / "dcp")
    writer = dcp.FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "n": 1}, storage_writer=writer)
    _refused(path, tmp_path, CorruptCheckpointError, r"key 'w': its chunk at offsets \[0\] is not a torch.save payload "
             r"\(DCP's safetensors serialization and stream transforms are not supported\)")  # fmt: skip


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("size", [3, 4], r"key 'model.w': its size is not a torch.Size"),
        ("size", torch.Size([3, -4]), r"key 'model.w': its size \[3, -4\] holds a value that is not an int"),
        ("chunks", (), r"key 'model.w': its chunks are a tuple, not a list"),
        ("properties", "float32", r"key 'model.w': its properties is a builtins.str, not TensorProperties"),
    ],
)
def test_mistyped_fields_are_refused(src: str, tmp_path: Any, field: str, value: Any, match: str) -> None:
    md = _metadata(src)
    setattr(md.state_dict_metadata["model.w"], field, value)
    _write_metadata(src, md)
    _refused(src, tmp_path, CorruptCheckpointError, match)


def test_missing_storage_is_refused(src: str, tmp_path: Any) -> None:
    md = _metadata(src)
    del md.storage_data[MetadataIndex("model.b", (0,))]
    _write_metadata(src, md)
    _refused(src, tmp_path, CorruptCheckpointError, r"key 'model.b': no storage_data for its chunk at offsets \[0\]")


@pytest.mark.parametrize(
    "paths, match",
    [
        ({"step": ("model", "w")}, r"key 'step': planner_data: its path \('model', 'w'\) is the same path as key 'model.w'"),
        ({"step": ("model", "w", "x")}, r"key 'step': planner_data: its path .* runs through the value of key 'model.w'"),
        ({"step": ("layers", 10**9)}, r"the list at \('layers',\) would have 1000000001 places"),
        ({"step": ("model", 0)}, r"the container at \('model',\) has both dict keys and list indices"),
        ({"step": (0, "x")}, r"key 'step': its planner_data path .* is not a tuple starting with a str"),
        ({"step": ("a", -1)}, r"key 'step': its planner_data path .* holds something not a str or an int >= 0"),
        ({"step": ("a",) * 101}, r"key 'step': planner_data: its path .* nests deeper than 100 containers"),
    ],
)
def test_hostile_planner_data_is_refused(src: str, tmp_path: Any, paths: dict[str, Any], match: str) -> None:
    md = _metadata(src)
    md.planner_data.update(paths)
    _write_metadata(src, md)
    _refused(src, tmp_path, CorruptCheckpointError, match)


def test_without_planner_data_keys_stay_flat(src: str, tmp_path: Any) -> None:
    md = _metadata(src)
    md.planner_data = None
    _write_metadata(src, md)
    dst = str(tmp_path / "out")
    import_dcp(src, dst)
    loaded = _load(dst)
    assert "model.w" in loaded and loaded["step"] == 17 and loaded["layers.1.k"].dtype == torch.int16


def test_garbage_metadata_is_corrupt(src: str, tmp_path: Any) -> None:
    with open(os.path.join(src, ".metadata"), "wb") as f:
        f.write(b"\x80\x04not a pickle")
    _refused(src, tmp_path, CorruptCheckpointError, r"\.metadata: not a DCP metadata pickle")
    _write_metadata(src, {"state_dict_metadata": {}})
    _refused(src, tmp_path, CorruptCheckpointError, r"the metadata is a builtins.dict, not Metadata")


def test_the_index_reads_no_tensor_data(src: str) -> None:
    index = read_dcp_index(src)
    assert [t.key for t in index.tensors][:2] == ["model.w", "model.b"]
    assert index.paths["optim.param_groups.0.lr"] == ("optim", "param_groups", 0, "lr")
    assert index.files == {"__0_0.distcp": os.path.getsize(os.path.join(src, "__0_0.distcp"))}


# -- the command -------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True, timeout=90)


def test_cli_imports_and_prints_a_summary(src: str, tmp_path: Any) -> None:
    dst = str(tmp_path / "out")
    r = _cli("import-dcp", src, dst)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"imported {src} -> {dst}: 13 tensors (")
    assert "from 13 chunks), 6 plain values; source: 1 rank(s), 1 file(s), DCP 1.0.0" in r.stdout
    assert "model" in _load(dst)
    r = _cli("import-dcp", "--json", src, str(tmp_path / "out2"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["tensors"] == 13 and doc["values"] == 6 and doc["source_ranks"] == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "torchckpt: no such DCP checkpoint: {src} does not exist"),
        (lambda p: os.mkdir(p), "torchckpt: {src} is not a torch DCP checkpoint: it has no .metadata"),
    ],
)
def test_cli_bad_source_exits_2_with_one_line(tmp_path: Any, make: Any, message: str) -> None:
    src = str(tmp_path / "src")
    make(src)
    r = _cli("import-dcp", src, str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr == message.format(src=src) + "\n"
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_hostile_metadata_exits_2_naming_the_class(src: str, tmp_path: Any) -> None:
    marker = str(tmp_path / "marker")
    _write_metadata(src, SystemPayload(marker))
    r = _cli("import-dcp", "--json", src, str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "refusing to unpickle posix.system" in r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "UnsafeObjectError"
    assert not os.path.exists(marker) and not (tmp_path / "out").exists()


# -- the tiling check, on generated grids --------------------------------------

_LOC = DcpLocation("__0_0.distcp", 0, 0)


def _cuts(draw: Any, n: int) -> list[tuple[int, int]]:
    """A split of ``range(n)`` into consecutive (offset, size) pieces (empty pieces included)."""
    points = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    bounds = [0, *points, n]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@st.composite
def _grids(draw: Any) -> tuple[tuple[int, ...], list[DcpChunk]]:
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    per_dim = [_cuts(draw, n) for n in shape]
    chunks = [
        DcpChunk(tuple(o for o, _ in box), tuple(s for _, s in box), _LOC) for box in itertools.product(*per_dim)
    ]
    return shape, draw(st.permutations(chunks))


@settings(max_examples=200, deadline=None)
@given(_grids())
def test_any_grid_tiles(grid: tuple[tuple[int, ...], list[DcpChunk]]) -> None:
    shape, chunks = grid
    check_tiling("k", shape, chunks, "/src")


@settings(max_examples=200, deadline=None)
@given(_grids(), st.data())
def test_a_grid_missing_or_repeating_a_chunk_does_not_tile(grid: Any, data: st.DataObject) -> None:
    shape, chunks = grid
    full = [c for c in chunks if all(c.sizes)]
    assume(full)
    victim = data.draw(st.sampled_from(full))
    rest = [c for c in chunks if c is not victim]
    with pytest.raises(CorruptCheckpointError, match=r"key 'k': the chunks hold .* \(a gap\)"):
        check_tiling("k", shape, rest, "/src")
    with pytest.raises(CorruptCheckpointError, match="key 'k': (the chunks at offsets .* overlap|two chunks hold the only element)"):
        check_tiling("k", shape, [*chunks, victim], "/src")
    if not shape:
        return  # a 0-dim chunk cannot grow
    grown = DcpChunk(victim.offsets, tuple(s + 1 for s in victim.sizes), _LOC)
    with pytest.raises(CorruptCheckpointError, match="key 'k': (the chunk at offsets .* lies outside|the chunks at .* overlap)"):
        check_tiling("k", shape, [*rest, grown], "/src")
