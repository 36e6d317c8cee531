"""Fresh loads of a local native checkpoint: tensors viewing a private mapping of the rank file, every chunk checked."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from ckpt_testutil import NATIVE_FILE, checkpointer, flip_bit

from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError
from torchckpt.format import mapped_read
from torchckpt.format.extents import ChecksumError, checksum
from torchckpt.format.mapped_read import FileMapping
from torchckpt.format.tensor_table import TensorEntry
from torchckpt.storage.local_read import LocalObjectReader


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(64, 32, generator=g),
        "h": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "ids": torch.arange(50, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "step": torch.tensor(9),
        "empty": torch.empty(0, 4),
        "nested": {"m": torch.randn(3, 5, 7, generator=g), "lr": 0.5},
    }


@pytest.fixture
def saved(tmp_path) -> str:
    path = str(tmp_path / "ck")
    with checkpointer("safetensors") as ck:
        ck.save(path, _state())
    return path


def _mapped(t: torch.Tensor) -> bool:
    return not t.untyped_storage().resizable()  # a view of the mapping; torch.empty's storage is resizable


def test_fresh_load_maps_the_file_and_returns_the_saved_values(saved: str) -> None:
    with checkpointer("safetensors") as ck:
        out = ck.load(saved)
    expected = _state()
    for key in ("w", "h", "ids", "flags", "step"):
        assert torch.equal(out[key], expected[key]), key
        assert out[key].dtype == expected[key].dtype and out[key].shape == expected[key].shape
        assert out[key].is_contiguous() and _mapped(out[key]), key
        assert out[key].untyped_storage().nbytes() == out[key].nbytes, key  # its own bytes, not the whole file
    assert torch.equal(out["nested"]["m"], expected["nested"]["m"]) and _mapped(out["nested"]["m"])
    assert out["nested"]["lr"] == 0.5
    assert out["empty"].shape == (0, 4) and not _mapped(out["empty"])  # no bytes: allocated


def test_writes_to_a_mapped_tensor_stay_in_the_process(saved: str) -> None:
    file = os.path.join(saved, NATIVE_FILE)
    with open(file, "rb") as f:
        before = f.read()
    with checkpointer("safetensors") as ck:
        first = ck.load(saved)
        second = ck.load(saved)
        first["w"].fill_(3.0)
        first["ids"][7] = -1
        assert torch.equal(second["w"], _state()["w"]) and int(second["ids"][7]) == 7
        third = ck.load(saved)  # verified again: the file is unchanged
    assert torch.equal(third["w"], _state()["w"])
    with open(file, "rb") as f:
        assert f.read() == before


@pytest.mark.parametrize("key", ["w", "h", "ids", "step", "nested.m"])
def test_a_flipped_bit_in_a_mapped_tensor_names_the_key(saved: str, key: str) -> None:
    e = next(t for t in read_manifest(saved).ranks[0].tensors if t.name == key)
    flip_bit(os.path.join(saved, NATIVE_FILE), e.offset + e.nbytes - 1, bit=2)
    with checkpointer("safetensors") as ck, pytest.raises(CorruptCheckpointError) as info:
        ck.load(saved)
    err = info.value
    assert err.key == key and err.file == NATIVE_FILE and err.path == saved
    assert str(err) == (
        f"corrupt checkpoint {saved}: checksum mismatch in rank file {NATIVE_FILE}, key {key!r} (chunk 0); "
        "the template is untouched"
    )


def test_a_corrupt_mapped_tensor_leaves_the_template_untouched(saved: str) -> None:
    e = next(t for t in read_manifest(saved).ranks[0].tensors if t.name == "nested.m")
    flip_bit(os.path.join(saved, NATIVE_FILE), e.offset, bit=0)
    template = {"w": torch.zeros(64, 32), "nested": None}  # "w" is filled in place, "nested" loads fresh
    with checkpointer("safetensors") as ck, pytest.raises(CorruptCheckpointError, match="key 'nested.m'"):
        ck.load(saved, template)
    assert torch.equal(template["w"], torch.zeros(64, 32)) and template["nested"] is None


def test_template_tensors_are_filled_and_fresh_ones_mapped_in_one_load(saved: str) -> None:
    template = {"w": torch.zeros(64, 32), "nested": None, "ids": None}
    with checkpointer("safetensors") as ck:
        ck.load(saved, template)
    assert torch.equal(template["w"], _state()["w"]) and not _mapped(template["w"])
    assert torch.equal(template["nested"]["m"], _state()["nested"]["m"]) and _mapped(template["nested"]["m"])
    assert torch.equal(template["ids"], _state()["ids"]) and _mapped(template["ids"])


def test_verify_checks_every_chunk_on_several_threads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapped_read, "CHUNK_BYTES", 64)
    monkeypatch.setattr(mapped_read, "PARALLEL_READ_BYTES", 0)
    data = bytearray(range(256)) * 8  # 2048 bytes
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(data)

    def entry(name: str, offset: int, nbytes: int) -> TensorEntry:
        crcs = tuple(checksum(bytes(data[offset + k : offset + min(nbytes, k + 64)])) for k in range(0, nbytes, 64))
        return TensorEntry(name, "float32", (nbytes // 4,), offset, nbytes, crcs)

    entries = [entry("a", 0, 1024), entry("b", 1024, 200), entry("c", 1224, 824)]
    with LocalObjectReader(os.open(path, os.O_RDONLY), path) as src:
        mapping = FileMapping.open(src)
        assert mapping is not None
        made = [mapping.tensor(e, torch.float32) for e in entries]
        mapping.verify(threads=2)
        assert all(t is not None for t in made)
        assert bytes(made[1].numpy().tobytes()) == bytes(data[1024:1224])
        good = list(entries[2].crc32c)
        mapping.made[2] = (replace(entries[2], crc32c=tuple(good[:5] + [good[5] ^ 1] + good[6:])), made[2])
        with pytest.raises(ChecksumError) as info:
            mapping.verify(threads=2)
        assert (info.value.extent_index, info.value.chunk) == (2, 5)


def test_entries_that_cannot_be_views_are_left_to_the_reads(tmp_path) -> None:
    path = str(tmp_path / "f.bin")
    with open(path, "wb") as f:
        f.write(bytes(100))
    with LocalObjectReader(os.open(path, os.O_RDONLY), path) as src:
        mapping = FileMapping.open(src)
        assert mapping is not None
        assert mapping.tensor(TensorEntry("odd", "float32", (2,), 2, 8, (0,)), torch.float32) is None  # misaligned
        assert mapping.tensor(TensorEntry("past", "float32", (8,), 96, 32, (0,)), torch.float32) is None  # past the end
        assert mapping.tensor(TensorEntry("none", "float32", (0,), 0, 0, (0,)), torch.float32) is None  # no bytes
        assert mapping.made == []


def test_only_non_empty_local_files_are_mapped(tmp_path) -> None:
    path = str(tmp_path / "empty.bin")
    open(path, "wb").close()
    with LocalObjectReader(os.open(path, os.O_RDONLY), path) as src:
        assert FileMapping.open(src) is None

    class Other:
        size = 10

    assert FileMapping.open(Other()) is None  # type: ignore[arg-type]


def test_a_checkpoint_in_an_object_store_is_read_into_allocated_tensors() -> None:
    url = "memory://mapped-read/ck"
    with checkpointer("safetensors") as ck:
        ck.save(url, _state())
        out = ck.load(url)
    assert torch.equal(out["w"], _state()["w"]) and not _mapped(out["w"])
    assert torch.equal(out["nested"]["m"], _state()["nested"]["m"]) and not _mapped(out["nested"]["m"])
