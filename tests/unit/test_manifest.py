"""``manifest.json`` trusts nothing: every field, name and size is checked before any data file is opened."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from typing import Any

import pytest
import torch
from ckpt_testutil import FORMATS, file_name, json_paths, reader, save_each_format
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchckpt.errors import CheckpointError, CorruptCheckpointError
from torchckpt.format.manifest import (
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    check_file_name,
    parse_manifest,
    seal_manifest,
)
from torchckpt.storage.local_read import LocalGeneration


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """One committed checkpoint per layout (never modified; tests copy them)."""
    state = {"w": torch.arange(12.0).reshape(3, 4), "sub": {"b": torch.ones(5, dtype=torch.int8)}, "n": 1}
    return save_each_format(tmp_path_factory.mktemp("manifests"), state, metadata={"step": 1})


def _doc(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return json.load(f)


def _bytes(doc: Any) -> bytes:
    # Re-sealed: these tests are about the fields, not the manifest's own checksum.
    if isinstance(doc, dict) and doc:
        try:
            return seal_manifest(doc)
        except ValueError:  # NaN/inf: not valid strict JSON, left unsealed (refused all the same)
            pass
    return json.dumps(doc).encode()


def test_valid_manifests_parse(saved: dict[str, str]) -> None:
    for fmt, path in saved.items():
        m = parse_manifest(_bytes(_doc(path)))
        assert isinstance(m, Manifest)
        assert m.layout == fmt and m.world_size == 1 and m.version == FORMAT_VERSION
        assert m.ranks[0].file == file_name(fmt)
        assert m.ranks[0].size_bytes == os.path.getsize(os.path.join(path, file_name(fmt)))
        assert m.metadata == {"step": 1}
    native = parse_manifest(_bytes(_doc(saved["safetensors"]))).ranks[0]
    assert sorted(t.name for t in native.tensors) == ["sub.b", "w"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b"null",
        b"42",
        b'"manifest"',
        b"{}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["empty", "truncated", "text", "binary", "list", "null", "number", "string", "empty_object", "deep"],
)
def test_not_a_manifest(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


@pytest.mark.parametrize("version", [0, 3, 99, "1", 1.0, None, True])
def test_unknown_version(saved: dict[str, str], version: Any) -> None:
    doc = _doc(saved["safetensors"])
    doc["torchckpt_format"] = version
    with pytest.raises(ManifestError, match="torchckpt_format|version"):
        parse_manifest(_bytes(doc))


TOP_FIELDS = ["torchckpt_format", "layout", "world_size", "ranks", "checksum"]
RANK_FIELDS = ["rank", "file", "size_bytes", "digest", "data_offset", "tree", "tensors"]
TENSOR_FIELDS = ["name", "dtype", "shape", "offset", "nbytes", "crc32c"]


@pytest.mark.parametrize("field", TOP_FIELDS)
def test_missing_top_level_field(saved: dict[str, str], field: str) -> None:
    doc = _doc(saved["safetensors"])
    del doc[field]
    with pytest.raises(ManifestError, match=field):
        parse_manifest(_bytes(doc))


@pytest.mark.parametrize("field", RANK_FIELDS)
def test_missing_rank_field(saved: dict[str, str], field: str) -> None:
    doc = _doc(saved["safetensors"])
    del doc["ranks"][0][field]
    with pytest.raises(ManifestError, match=field):
        parse_manifest(_bytes(doc))


@pytest.mark.parametrize("field", TENSOR_FIELDS)
def test_missing_tensor_field(saved: dict[str, str], field: str) -> None:
    doc = _doc(saved["safetensors"])
    del doc["ranks"][0]["tensors"][0][field]
    with pytest.raises(ManifestError, match=field):
        parse_manifest(_bytes(doc))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(layout="pickle"),
        lambda d: d.update(world_size=2),
        lambda d: d.update(world_size=0),
        lambda d: d["checksum"].update(algorithm="md5"),
        lambda d: d["checksum"].update(chunk_bytes=0),
        lambda d: d["ranks"][0].update(rank=1),
        lambda d: d["ranks"][0].update(size_bytes=-1),
        lambda d: d["ranks"][0].update(size_bytes=True),
        lambda d: d["ranks"][0].update(digest="crc32c:xyz"),
        lambda d: d["ranks"][0].update(data_offset=3),
        lambda d: d["ranks"][0]["tensors"][0].update(dtype="float128"),
        lambda d: d["ranks"][0]["tensors"][0].update(dtype="object"),
        lambda d: d["ranks"][0]["tensors"][0].update(shape=[-1, 4]),
        lambda d: d["ranks"][0]["tensors"][0].update(shape=[2.5]),
        lambda d: d["ranks"][0]["tensors"][0].update(offset=d["ranks"][0]["tensors"][0]["offset"] + 1),
        lambda d: d["ranks"][0]["tensors"][0].update(crc32c=[]),
        lambda d: d["ranks"][0]["tensors"][0].update(crc32c=[2**32]),
        lambda d: d["ranks"][0]["tensors"][0].update(device=7),
        lambda d: d.update(metadata=[1]),
    ],
    ids=[
        "layout",
        "world_size_mismatch",
        "world_size_0",
        "algorithm",
        "chunk_0",
        "rank_order",
        "negative_size",
        "bool_size",
        "digest",
        "data_offset",
        "dtype",
        "dtype_object",
        "negative_dim",
        "float_dim",
        "overlap",
        "no_crc",
        "crc_range",
        "device",
        "metadata",
    ],
)
def test_inconsistent_fields(saved: dict[str, str], mutate: Any) -> None:
    doc = _doc(saved["safetensors"])
    mutate(doc)
    with pytest.raises(ManifestError):
        parse_manifest(_bytes(doc))


# ---------------------------------------------------------------------------- absurd sizes


def _absurd_tensor(doc: dict[str, Any]) -> None:
    """A tensor of shape [2**40, 2**40], every other field consistent with it."""
    rank = doc["ranks"][0]
    t = max(rank["tensors"], key=lambda t: t["offset"])  # the last one: nothing after it moves
    t.update(shape=[2**40, 2**40], dtype="uint8", nbytes=2**80)
    t["crc32c"] = [0] * 8  # the 2**56 checksums it would need could not even be written
    rank["size_bytes"] = t["offset"] + 2**80


def _absurd_file(doc: dict[str, Any]) -> None:
    doc["ranks"][0]["size_bytes"] = 2**62


def _absurd_native_file(doc: dict[str, Any]) -> None:
    """size_bytes 2**62 with a tensor whose shape and byte count add up to it."""
    rank = doc["ranks"][0]
    t = max(rank["tensors"], key=lambda t: t["offset"])
    nbytes = 2**62 - t["offset"]
    t.update(shape=[nbytes], dtype="uint8", nbytes=nbytes)
    rank["size_bytes"] = 2**62


ABSURD = {
    "tensor_2^40x2^40": ("safetensors", _absurd_tensor),
    "file_2^62_torch_save": ("torch_save", _absurd_file),
    "file_2^62_native": ("safetensors", _absurd_file),
    "tensor_2^62_native": ("safetensors", _absurd_native_file),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_are_refused_by_the_parser(saved: dict[str, str], case: str) -> None:
    fmt, mutate = ABSURD[case]
    doc = _doc(saved[fmt])
    mutate(doc)
    with pytest.raises(ManifestError):
        parse_manifest(_bytes(doc))


def _install(saved_path: str, tmp_path, doc: Any, *, keep_data: bool = False) -> str:
    """A copy of the checkpoint with ``doc`` as its manifest, and without its data file unless asked."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved_path, path)
    data = doc if isinstance(doc, bytes) else _bytes(doc)
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(data)
    if not keep_data:
        for name in os.listdir(path):
            if name != "manifest.json":
                os.unlink(os.path.join(path, name))
    return path


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The names the reader opens inside checkpoint directories."""
    names: list[str] = []
    real = LocalGeneration.open

    def spy(generation: LocalGeneration, name: str) -> Any:
        names.append(name)
        return real(generation, name)

    monkeypatch.setattr(LocalGeneration, "open", spy)
    return names


def _assert_manifest_error(path: str, opened: list[str]) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    err = info.value
    assert err.file == "manifest.json", str(err)
    assert "manifest.json" in str(err) and path in str(err)
    assert err.path == path
    assert opened == ["manifest.json"], f"opened {opened} before refusing the manifest"
    return err


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_are_refused_before_any_data_file_is_opened(
    saved: dict[str, str], case: str, tmp_path, opened: list[str]
) -> None:
    fmt, mutate = ABSURD[case]
    doc = _doc(saved[fmt])
    mutate(doc)
    _assert_manifest_error(_install(saved[fmt], tmp_path, doc, keep_data=True), opened)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[" * 100_000, _bytes({"torchckpt_format": 2}), _bytes({"torchckpt_format": 1})],
    ids=["empty", "truncated", "deep", "version", "fields"],
)
def test_reader_reports_a_bad_manifest(saved: dict[str, str], data: bytes, tmp_path, opened: list[str]) -> None:
    _assert_manifest_error(_install(saved["safetensors"], tmp_path, data), opened)


# ---------------------------------------------------------------------------- file names

UNSAFE_NAMES = [
    "../rank_00000.safetensors",
    "../../etc/passwd",
    "sub/rank.safetensors",
    "/etc/passwd",
    "/tmp/x.safetensors",
    "rank\x00.safetensors",
    "\x00",
    ".",
    "..",
    "",
    ".hidden",
    "rank_00000.safetensors\n",
    "a\\b",
    "x" * 300,
    "\u202erank",
]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_file_names_are_refused(name: str) -> None:
    with pytest.raises(ManifestError, match="unsafe file name"):
        check_file_name(name)


@pytest.mark.parametrize("name", ["rank_00000.safetensors", "checkpoint_0.pt", "a", "A-b_c.d"])
def test_plain_file_names_are_accepted(name: str) -> None:
    assert check_file_name(name) == name


@pytest.mark.parametrize("name", UNSAFE_NAMES[:10] + [UNSAFE_NAMES[11]])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_refuses_unsafe_names_before_opening_them(
    saved: dict[str, str], fmt: str, name: str, tmp_path, opened: list[str]
) -> None:
    doc = _doc(saved[fmt])
    doc["ranks"][0]["file"] = name
    err = _assert_manifest_error(_install(saved[fmt], tmp_path, doc, keep_data=True), opened)
    assert "unsafe file name" in str(err)


def test_two_ranks_naming_the_same_file(saved: dict[str, str]) -> None:
    doc = _doc(saved["torch_save"])
    second = copy.deepcopy(doc["ranks"][0])
    second["rank"] = 1
    doc["ranks"].append(second)
    doc["world_size"] = 2
    with pytest.raises(ManifestError, match="same file"):
        parse_manifest(_bytes(doc))


# ---------------------------------------------------------------------------- what the names point to


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_file_that_is_a_symlink_is_refused(saved: dict[str, str], fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved[fmt], path)
    name = file_name(fmt)
    real = str(tmp_path / "elsewhere.bin")
    os.rename(os.path.join(path, name), real)  # byte-identical content, only reached through a link
    os.symlink(real, os.path.join(path, name))
    with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
        reader().read(path)
    assert info.value.file == name and name in str(info.value)


def test_manifest_that_is_a_symlink_is_refused(saved: dict[str, str], tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved["safetensors"], path)
    os.rename(os.path.join(path, "manifest.json"), str(tmp_path / "m.json"))
    os.symlink(str(tmp_path / "m.json"), os.path.join(path, "manifest.json"))
    with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
        reader().read(path)
    assert info.value.file == "manifest.json"


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_file_that_is_a_directory_is_refused(saved: dict[str, str], fmt: str, tmp_path) -> None:
    path = _install(saved[fmt], tmp_path, _doc(saved[fmt]))
    os.mkdir(os.path.join(path, file_name(fmt)))
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        reader().read(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_rank_file_is_named(saved: dict[str, str], fmt: str, tmp_path) -> None:
    path = _install(saved[fmt], tmp_path, _doc(saved[fmt]))
    with pytest.raises(CorruptCheckpointError, match="missing") as info:
        reader().read(path)
    assert info.value.file == file_name(fmt) and file_name(fmt) in str(info.value)


# ---------------------------------------------------------------------------- fuzzing

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_fail_only_with_checkpoint_errors(saved: dict[str, str], data: st.DataObject) -> None:
    """Replace any one value of a real manifest: the parser and the reader raise only their own errors."""
    fmt = data.draw(st.sampled_from(FORMATS))
    doc = _doc(saved[fmt])
    paths = [p for p in json_paths(doc) if p]
    where = data.draw(st.sampled_from(paths))
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    parent[where[-1]] = data.draw(_JSON)
    raw = _bytes(doc)
    try:
        parse_manifest(raw)
    except ManifestError:
        return
    # parsed: the reader must then load it or refuse it with a CheckpointError (never another exception)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        shutil.copytree(saved[fmt], path)
        with open(os.path.join(path, "manifest.json"), "wb") as f:
            f.write(raw)
        try:
            reader().read(path)
        except CheckpointError:
            pass


# ---------------------------------------------------------------------------- the structure tree

BAD_TREES = {
    "list_as_key": {"dict": [[{"list": []}, 1]]},
    "dict_as_key": {"dict": [[{"dict": []}, 1]]},
    "tensor_as_key": {"dict": [[{"T": 0}, 1]]},
    "tuple_of_list_as_key": {"dict": [[{"tuple": [{"list": []}]}, 1]]},
    "tensor_index_too_big": {"dict": [["a", {"T": 5}]]},
    "tensor_index_negative": {"dict": [["a", {"T": -1}]]},
    "tensor_index_float": {"dict": [["a", {"T": 0.0}]]},
    "tensor_index_bool": {"dict": [["a", {"T": True}]]},
    "size_of_text": {"size": "ab"},
    "size_of_floats": {"size": [1.5]},
    "size_negative": {"size": [-1]},
    "bytes_not_base64": {"bytes": "%%%"},
    "bytes_of_int": {"bytes": 5},
    "unknown_dtype": {"dtype": "object"},
    "unknown_device": {"device": "nope:0"},
    "float_not_special": {"float": "1e3"},
    "two_tags": {"T": 0, "x": 1},
    "unknown_tag": {"exec": "print(1)"},
    "empty_node": {},
    "dict_body_not_list": {"dict": {"a": 1}},
    "dict_item_of_three": {"odict": [[1, 2, 3]]},
}


@pytest.mark.parametrize("tree", sorted(BAD_TREES))
def test_malformed_tree_is_corruption_of_the_manifest(saved: dict[str, str], tree: str, tmp_path) -> None:
    doc = _doc(saved["safetensors"])
    doc["ranks"][0]["tree"] = BAD_TREES[tree]
    path = _install(saved["safetensors"], tmp_path, doc, keep_data=True)
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    assert path in str(info.value)
    if tree != "tensor_index_too_big" and tree != "tensor_index_negative":
        assert info.value.file == "manifest.json"
    with pytest.raises(CorruptCheckpointError):
        reader().read(path, {"a": None})


_GOOD_TENSOR = {"name": "w", "dtype": "float32", "shape": [3, 4], "offset": 4096, "nbytes": 48, "crc32c": [7],
                "device": "cpu"}  # fmt: skip
_FIELD_VALUES = {
    "name": st.sampled_from(["w", "", 3, None, ["w"]]),
    "dtype": st.sampled_from(["float32", "bfloat16", "int8", "bool", "uint1", "float33", 1, None]),
    "shape": st.sampled_from([[3, 4], [12], [], [0, 5], [3, -4], [0, -5], [3, True], [3.0, 4], "3,4", [2**40, 2**40]]),
    "offset": st.sampled_from([0, 4096, -1, 1.5, True, "0", 2**70]),
    "nbytes": st.sampled_from([0, 1, 12, 48, 96, -48, True, 48.0, 2**51]),
    "crc32c": st.sampled_from([[7], [0, 1], [], [2**32], [-1], [True], [7.0], "7", [2**32 - 1]]),
    "device": st.sampled_from(["cpu", "cuda:0", "meta", "nonsense", "cuda:-5", 0, None]),
}


@given(
    changes=st.dictionaries(st.sampled_from(sorted(_FIELD_VALUES)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: _FIELD_VALUES[k] for k in keys})
    ),
    dropped=st.sets(st.sampled_from(sorted(_GOOD_TENSOR)), max_size=2),
)
@example(changes={"shape": [0, -5], "nbytes": 0}, dropped=set())  # a negative dimension beside a zero
@example(changes={"shape": [0, 2**50, 2**10], "nbytes": 0}, dropped=set())  # absurd strides, no bytes
@example(changes={"crc32c": [2**32]}, dropped=set())
@example(changes={"offset": True}, dropped=set())
@example(changes={"device": "cuda:0"}, dropped=set())
@settings(max_examples=400, deadline=None)
def test_fast_tensor_entry_parse_agrees_with_the_checked_one(changes: dict[str, Any], dropped: set[str]) -> None:
    """The per-load fast path accepts exactly what the field-by-field check accepts, and builds the same entry."""
    from torchckpt.format import tensor_table as m

    doc = {k: v for k, v in {**_GOOD_TENSOR, **changes}.items() if k not in dropped}
    try:
        checked = m.parse_tensor(copy.deepcopy(doc), "t", 16 * 2**20)
    except ManifestError:
        checked = None
    fast = m.parse_tensor_fast(copy.deepcopy(doc), 16 * 2**20)
    # The fast path may decline a good entry (then the checked one builds it), never accept a bad one.
    assert fast is None or fast == checked
    if checked is not None and doc.get("device", "cpu") == "cpu":
        assert fast == checked


# ---------------------------------------------------------------------------- linear parsing


@pytest.mark.parametrize("dim", [1, 2], ids=["ones", "twos"])
def test_a_shape_of_400000_dimensions_is_refused_in_linear_time(saved: dict[str, str], dim: int) -> None:
    doc = _doc(saved["safetensors"])
    entry = doc["ranks"][0]["tensors"][0]
    entry["shape"] = [dim] * 400_000
    data = _bytes(doc)
    started = time.perf_counter()
    with pytest.raises(ManifestError, match=r"ranks\[0\]\.tensors\[\d\]: 400000 dimensions \(at most 64\)"):
        parse_manifest(data)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"{elapsed:.2f}s to refuse a {len(data)}-byte manifest"


def test_sixty_four_dimensions_parse_and_load(tmp_path) -> None:
    state = {"t": torch.arange(4.0).reshape([2, 2] + [1] * 62)}
    for fmt, path in save_each_format(tmp_path, state).items():
        loaded, _ = reader().read(path)
        assert loaded["t"].shape == state["t"].shape and torch.equal(loaded["t"], state["t"]), fmt


def test_a_tensor_of_more_than_64_dimensions_is_refused_at_save(tmp_path) -> None:
    from ckpt_testutil import checkpointer

    from torchckpt.errors import UnsafeObjectError

    with pytest.raises(UnsafeObjectError, match=r"key 'deep'.*65 dimensions.*at most 64"):
        checkpointer("safetensors").save(str(tmp_path / "c"), {"deep": torch.zeros([1] * 65)})
    assert not os.path.exists(tmp_path / "c" / "manifest.json")
