"""Flipped bits and truncated files are found, and the error names the file (and the key where known)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from ckpt_testutil import FORMATS, NATIVE_FILE, TORCH_SAVE_FILE, checkpointer, file_name, flip_bit, reader, truncate

from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(256, 256, generator=g),  # 256 KiB
        "layers": {"0": {"w": torch.randn(128, 256, generator=g), "b": torch.arange(256, dtype=torch.int64)}},
        "step": torch.tensor(17),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for fmt in FORMATS:
        out[fmt] = str(root / fmt)
        checkpointer(fmt).save(out[fmt], _state())
    return out


@pytest.fixture
def copy_of(pristine: dict[str, str], tmp_path):
    def make(fmt: str) -> tuple[str, str]:
        path = str(tmp_path / f"c_{fmt}")
        shutil.copytree(pristine[fmt], path)
        return path, os.path.join(path, file_name(fmt))

    return make


def _entry(path: str, name: str):
    return next(t for t in read_manifest(path).ranks[0].tensors if t.name == name)


def _assert_names_file(err: CorruptCheckpointError, path: str, name: str) -> None:
    assert err.file == name, str(err)
    assert name in str(err) and path in str(err)
    assert err.path == path


def test_pristine_copies_load(pristine: dict[str, str]) -> None:
    for fmt in FORMATS:
        loaded = checkpointer(fmt).load(pristine[fmt])
        assert torch.equal(loaded["layers"]["0"]["w"], _state()["layers"]["0"]["w"])


# ---------------------------------------------------------------------------- flipped bits


@pytest.mark.parametrize("key", ["embed", "layers.0.w", "layers.0.b", "step"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_native_data_bit_flip_names_file_and_key(copy_of, key: str, where: str) -> None:
    path, file = copy_of("safetensors")
    e = _entry(path, key)
    offset = {"first": 0, "middle": e.nbytes // 2, "last": e.nbytes - 1}[where]
    flip_bit(file, e.offset + offset, bit=5)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpointer("safetensors").load(path)
    err = info.value
    _assert_names_file(err, path, NATIVE_FILE)
    assert err.key == key
    assert repr(key) in str(err) and "checksum" in str(err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bit_flip_found_with_a_template_too(copy_of, fmt: str) -> None:
    path, file = copy_of(fmt)
    if fmt == "safetensors":
        offset = _entry(path, "embed").offset + 100
    else:
        offset = _find(file, _state()["embed"]) + 100
    flip_bit(file, offset)
    target = torch.zeros(256, 256)
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path, {"embed": target})
    _assert_names_file(info.value, path, file_name(fmt))


@pytest.mark.parametrize("offset", [0, 3, 8, 20, "json_end", "padding"])
def test_native_header_bit_flip_names_file(copy_of, offset) -> None:
    path, file = copy_of("safetensors")
    data_offset = read_manifest(path).ranks[0].data_offset
    with open(file, "rb") as f:
        head = f.read(data_offset)
    json_end = head.rstrip(b" ").rfind(b"}")
    at = {"json_end": json_end, "padding": data_offset - 1}.get(offset, offset)
    flip_bit(file, at, bit=1)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpointer("safetensors").load(path)
    _assert_names_file(info.value, path, NATIVE_FILE)
    assert "header" in str(info.value)


def _find(file: str, t: torch.Tensor) -> int:
    with open(file, "rb") as f:
        data = f.read()
    at = data.find(t.numpy().tobytes())
    assert at > 0
    return at


@pytest.mark.parametrize("region", ["start", "tensor", "pickle", "end"])
def test_torch_save_bit_flip_names_file(copy_of, region: str) -> None:
    path, file = copy_of("torch_save")
    size = os.path.getsize(file)
    if region == "tensor":
        at = _find(file, _state()["layers"]["0"]["w"]) + 1000
    elif region == "pickle":
        with open(file, "rb") as f:
            at = f.read().find(b"data.pkl") + 200
    else:
        at = {"start": 2, "end": size - 3}[region]
    flip_bit(file, at, bit=7)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpointer("torch_save").load(path)
    _assert_names_file(info.value, path, TORCH_SAVE_FILE)


def test_verify_false_skips_checksums(copy_of) -> None:
    path, file = copy_of("safetensors")
    e = _entry(path, "layers.0.w")
    flip_bit(file, e.offset + 4 * 1000 + 3, bit=6)  # a high exponent bit of element 1000
    loaded, missing = reader().read(path, verify=False)
    assert missing == []
    expected = _state()["layers"]["0"]["w"]
    diff = (loaded["layers"]["0"]["w"].view(-1).view(torch.int32) != expected.view(-1).view(torch.int32)).nonzero()
    assert diff.flatten().tolist() == [1000]
    assert torch.equal(loaded["embed"], _state()["embed"])
    # and the reader's own option does the same
    loaded, _ = reader(verify_checksums=False).read(path)
    assert not torch.equal(loaded["layers"]["0"]["w"], expected)
    with pytest.raises(CorruptCheckpointError):
        reader().read(path)


# ---------------------------------------------------------------------------- truncated files


def _cut(path: str, fmt: str, where: str) -> int:
    size = read_manifest(path).ranks[0].size_bytes
    if fmt == "safetensors":
        data_offset = read_manifest(path).ranks[0].data_offset
        inside_header, inside_data = 100, data_offset + (size - data_offset) // 2
    else:
        inside_header, inside_data = 30, _find(os.path.join(path, TORCH_SAVE_FILE), _state()["embed"]) + 5000
    return {"empty": 0, "header": inside_header, "data": inside_data, "one_short": size - 1}[where]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
@pytest.mark.parametrize("where", ["empty", "header", "data", "one_short"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_rank_file_names_the_file(copy_of, fmt: str, where: str, verify: bool) -> None:
    path, file = copy_of(fmt)
    truncate(file, _cut(path, fmt, where))
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path, verify=verify)
    _assert_names_file(info.value, path, file_name(fmt))
    with pytest.raises(CorruptCheckpointError):
        reader().read(path, {"step": torch.tensor(0)}, verify=verify)


@pytest.mark.parametrize("fmt", FORMATS)
def test_appended_bytes_are_found(copy_of, fmt: str) -> None:
    path, file = copy_of(fmt)
    with open(file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    _assert_names_file(info.value, path, file_name(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_manifest(copy_of, fmt: str) -> None:
    path, _ = copy_of(fmt)
    manifest = os.path.join(path, "manifest.json")
    truncate(manifest, os.path.getsize(manifest) // 2)
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    _assert_names_file(info.value, path, "manifest.json")


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_file_from_another_checkpoint_is_found(copy_of, tmp_path, fmt: str) -> None:
    # a stale rank file of the same structure (another generation) in place of the real one
    path, file = copy_of(fmt)
    other = str(tmp_path / "other")
    state = _state()
    state["embed"] = state["embed"] + 1
    checkpointer(fmt).save(other, state)
    shutil.copyfile(os.path.join(other, file_name(fmt)), file)
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    assert info.value.file == file_name(fmt)
    if fmt == "safetensors":
        assert info.value.key == "embed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_size_is_checked_even_without_checksums(copy_of, fmt: str) -> None:
    path, file = copy_of(fmt)
    with open(file, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(CorruptCheckpointError, match="bytes") as info:
        reader().read(path, verify=False)
    _assert_names_file(info.value, path, file_name(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_bit_in_the_manifest_is_found(copy_of, fmt: str) -> None:
    path, _ = copy_of(fmt)
    checkpointer(fmt).save(path, {**_state(), "lr": 0.5}, metadata={"step": 5})
    manifest = os.path.join(path, "manifest.json")
    with open(manifest, "rb") as f:
        data = f.read()
    at = data.index(b'"step":5') + len(b'"step":')  # '5' -> '4': still valid JSON, still a valid manifest
    flip_bit(manifest, at, bit=0)
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    assert info.value.file == "manifest.json"
