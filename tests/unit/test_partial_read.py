"""A partial load of the native format reads only the bytes of the requested keys.

Measured in bytes, not seconds: ``rchar`` of ``/proc/self/io`` counts the bytes
every read system call of this process returned, whatever the thread; a
second measurement counts what ``os.pread``/``os.preadv`` return.
"""

from __future__ import annotations

import os

import pytest
import torch
from ckpt_testutil import NATIVE_FILE, checkpointer, flip_bit, reader

from torchckpt.errors import CorruptCheckpointError

N_TENSORS = 100
MIB = 1 << 20
SHAPE = (256, 1024)  # float32: 1 MiB


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("partial") / "ckpt")
    state = {f"layers.{i}.weight": torch.full(SHAPE, float(i)) for i in range(N_TENSORS)}
    checkpointer("safetensors").save(path, state)
    return path


def _file_size(path: str) -> int:
    return os.path.getsize(os.path.join(path, NATIVE_FILE))


def test_checkpoint_is_as_big_as_planned(big_checkpoint: str) -> None:
    assert N_TENSORS * MIB <= _file_size(big_checkpoint) < N_TENSORS * MIB + MIB


def test_one_key_of_a_hundred_reads_about_one_percent(big_checkpoint: str) -> None:
    r = reader()
    r.read(big_checkpoint, {"layers.0.weight": torch.empty(SHAPE)})  # warm up lazy imports and caches
    target = torch.empty(SHAPE)
    before = _rchar()
    loaded, missing = r.read(big_checkpoint, {"layers.37.weight": target})
    read = _rchar() - before
    assert missing == []
    assert loaded["layers.37.weight"] is target
    assert torch.equal(target, torch.full(SHAPE, 37.0))
    assert MIB <= read < 0.03 * _file_size(big_checkpoint), f"read {read} bytes of {_file_size(big_checkpoint)}"


def test_the_measurement_sees_a_full_load(big_checkpoint: str) -> None:
    # Into preallocated tensors: a fresh load maps the file instead of reading it (format/mapped_read.py).
    template = {f"layers.{i}.weight": torch.empty(SHAPE) for i in range(N_TENSORS)}
    before = _rchar()
    loaded, _ = reader().read(big_checkpoint, template)
    read = _rchar() - before
    assert len(loaded) == N_TENSORS
    assert torch.equal(loaded["layers.99.weight"], torch.full(SHAPE, 99.0))
    assert read >= N_TENSORS * MIB


def test_positional_reads_cover_only_the_requested_tensor(big_checkpoint: str, monkeypatch) -> None:
    counted = {"bytes": 0, "calls": 0}
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        counted["bytes"] += len(data)
        counted["calls"] += 1
        return data

    def preadv(fd: int, buffers, offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        counted["bytes"] += got
        counted["calls"] += 1
        return got

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    template = {"layers.5.weight": torch.empty(SHAPE), "layers.6.weight": torch.empty(SHAPE)}
    reader().read(big_checkpoint, template)
    assert counted["calls"] >= 1
    assert (
        2 * MIB
        <= counted["bytes"]
        < 2 * MIB + 64 * 1024 + os.path.getsize(os.path.join(big_checkpoint, "manifest.json"))
    )
    assert torch.equal(template["layers.6.weight"], torch.full(SHAPE, 6.0))


def test_partial_read_checks_only_what_it_reads(big_checkpoint: str, tmp_path) -> None:
    # corrupt tensor 50: a load of tensor 10 does not touch it; a load of tensor 50 detects it
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(big_checkpoint, path)
    from torchckpt.checkpoint_reader import read_manifest

    entry = next(t for t in read_manifest(path).ranks[0].tensors if t.name == "layers.50.weight")
    flip_bit(os.path.join(path, NATIVE_FILE), entry.offset + 12345, bit=3)
    ok = torch.empty(SHAPE)
    reader().read(path, {"layers.10.weight": ok})
    assert torch.equal(ok, torch.full(SHAPE, 10.0))
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path, {"layers.50.weight": torch.empty(SHAPE)})
    assert info.value.key == "layers.50.weight" and info.value.file == NATIVE_FILE
