"""The read path: the local generation and object reader, open_checkpoint, read_consistently, the checks."""

from __future__ import annotations

import logging
import os
import random
from contextlib import closing
from dataclasses import replace

import pytest
import torch
from ckpt_testutil import checkpointer, file_name, flip_bit

from torchckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedURLError
from torchckpt.format import extent_read
from torchckpt.format.extent_read import read_extents
from torchckpt.format.manifest import Manifest
from torchckpt.format.verification import (
    check_file_digest,
    check_header,
    check_size,
    check_tensor_bytes,
    file_digest,
    read_error,
)
from torchckpt.reading import (
    READ_ATTEMPTS,
    CheckpointSnapshot,
    GenerationReplaced,
    open_checkpoint,
    read_consistently,
    read_manifest,
)
from torchckpt.format import extents as io
from torchckpt.format.extents import ChecksumError, Extent, chunk_count
from torchckpt.storage.local import LocalStorage
from torchckpt.storage.local_read import LocalGeneration, LocalObjectReader

# -- LocalObjectReader ------------------------------------------------------


def _file(tmp_path: os.PathLike[str], data: bytes, name: str = "f.bin") -> str:
    with open(os.path.join(tmp_path, name), "wb") as f:
        f.write(data)
    return str(tmp_path)


def test_object_reader_reads_positionally_and_reopens(tmp_path) -> None:
    data = bytes(range(256)) * 40
    directory = _file(tmp_path, data)
    with LocalGeneration.open_path(directory) as gen, gen.open("f.bin") as src:
        assert isinstance(src, LocalObjectReader) and src.size == len(data)
        assert src.location == os.path.join(directory, "f.bin")
        a, b = bytearray(100), bytearray(50)
        assert src.read_into([memoryview(a), memoryview(b)], 7) == 150
        assert bytes(a + b) == data[7:157]
        tail = bytearray(100)
        assert src.read_into([memoryview(tail)], len(data) - 30) == 30  # fewer at the end
        assert src.read(10, 20) == data[10:30] and src.read(len(data) - 5, 100) == data[-5:]
        assert src.read(len(data), 10) == b""
        other = src.reopen()
        try:
            assert other.fileno() != src.fileno()
            assert other.read(0, 16) == data[:16]
        finally:
            other.close()
        assert src.read(0, 4) == data[:4]  # the reopened handle's close leaves this one open
    src.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        src.read(0, 1)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_object_reader_refuses_links_and_special_files(tmp_path, kind: str) -> None:
    directory = _file(tmp_path, b"x", "real.bin")
    planted = os.path.join(directory, "planted")
    if kind == "symlink":
        os.symlink("real.bin", planted)
    elif kind == "fifo":
        os.mkfifo(planted)  # opening it must not wait for a writer
    else:
        os.mkdir(planted)
    with LocalGeneration.open_path(directory) as gen, pytest.raises(CorruptCheckpointError) as info:
        gen.open("planted")
    why = "is a symbolic link (refused)" if kind == "symlink" else "is not a regular file"
    assert str(info.value) == f"corrupt checkpoint {directory}: planted {why}"
    assert (info.value.path, info.value.file) == (directory, "planted")


def test_missing_object_is_file_not_found(tmp_path) -> None:
    with LocalGeneration.open_path(str(tmp_path)) as gen, pytest.raises(FileNotFoundError):
        gen.open("nothing")


# -- LocalGeneration ---------------------------------------------------------


def test_generation_refusals(tmp_path) -> None:
    with pytest.raises(UnsupportedURLError):
        LocalStorage("s3://bucket/ckpt")
    missing = str(tmp_path / "missing")
    with pytest.raises(CheckpointNotFoundError, match="the directory does not exist"):
        LocalStorage(missing).open_generation()
    file = str(tmp_path / "file")
    open(file, "wb").close()
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        LocalGeneration.open_path(file)
    real = tmp_path / "real"
    real.mkdir()
    link = str(tmp_path / "link")
    os.symlink("real", link)
    with pytest.raises(CheckpointNotFoundError) as info:
        LocalStorage(link).open_generation()
    assert f"{link} is a symbolic link (to real)" in str(info.value)
    assert f"load {real}" in str(info.value)


def test_generation_opens_the_previous_generation_of_a_missing_checkpoint(tmp_path, caplog) -> None:
    previous = tmp_path / ".ckpt.torchckpt-previous"
    previous.mkdir()
    (previous / "f.bin").write_bytes(b"old")
    path = str(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING), closing(LocalStorage(path).open_generation()) as gen:
        with closing(gen.open("f.bin")) as src:
            assert src.read(0, 3) == b"old"
        assert gen.location == path
    assert "loading the previous generation" in caplog.text
    with pytest.raises(CheckpointNotFoundError):
        LocalGeneration.open_path(path)  # no fallback unless asked


def test_generation_replaced_when_the_path_names_another_directory(tmp_path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    with LocalGeneration.open_path(str(path)) as gen:
        assert not gen.replaced()
        os.rename(path, tmp_path / "old")
        assert gen.replaced()  # nothing at the path
        path.mkdir()
        assert gen.replaced()  # another directory at the path


# -- open_checkpoint and read_consistently -----------------------------------


@pytest.fixture
def native(tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(path, {"w": torch.arange(10.0), "b": torch.ones(3)})
    return path


def test_open_checkpoint_reads_the_manifest_once(native: str) -> None:
    with open_checkpoint(native) as snapshot:
        manifest = snapshot.manifest()
        assert isinstance(manifest, Manifest) and snapshot.manifest() is manifest
        with closing(snapshot.open_rank_file(manifest.ranks[0])) as src:
            assert src.size == manifest.ranks[0].size_bytes
    assert read_manifest(native) == manifest


def test_missing_manifest_and_missing_rank_file(native: str) -> None:
    with open_checkpoint(native) as snapshot:
        entry = snapshot.manifest().ranks[0]
    os.unlink(os.path.join(native, entry.file))
    with open_checkpoint(native) as snapshot, pytest.raises(CorruptCheckpointError) as info:
        snapshot.open_rank_file(entry)
    assert str(info.value) == f"corrupt checkpoint {native}: rank file {entry.file} listed in the manifest is missing"
    os.unlink(os.path.join(native, "manifest.json"))
    with open_checkpoint(native) as snapshot, pytest.raises(CheckpointNotFoundError) as missing:
        snapshot.manifest()
    assert str(missing.value) == f"no committed checkpoint at {native}: manifest.json is missing"


def test_a_rank_file_gone_with_its_generation_is_a_replacement(native: str, tmp_path) -> None:
    with open_checkpoint(native) as snapshot:
        entry = snapshot.manifest().ranks[0]
        os.rename(native, str(tmp_path / "aside"))
        os.mkdir(native)  # another generation at the path
        os.unlink(os.path.join(tmp_path, "aside", entry.file))
        with pytest.raises(GenerationReplaced):
            snapshot.open_rank_file(entry)


def test_read_consistently_reads_again_then_gives_up(native: str) -> None:
    calls: list[CheckpointSnapshot] = []

    def once_replaced(snapshot: CheckpointSnapshot) -> int:
        calls.append(snapshot)
        if len(calls) == 1:
            raise GenerationReplaced(snapshot.path)
        return len(calls)

    assert read_consistently(native, once_replaced) == 2
    assert calls[0] is not calls[1]

    def always_replaced(snapshot: CheckpointSnapshot) -> None:
        raise GenerationReplaced(snapshot.path)

    with pytest.raises(CorruptCheckpointError) as info:
        read_consistently(native, always_replaced)
    assert str(info.value) == (
        f"corrupt checkpoint {native}: replaced by other saves {READ_ATTEMPTS} times while it was being read"
    )


# -- the checks --------------------------------------------------------------


def test_checks_of_a_native_rank_file(native: str) -> None:
    entry = read_manifest(native).ranks[0]
    with open_checkpoint(native) as snapshot, closing(snapshot.open_rank_file(entry)) as src:
        check_size(src, entry, native)
        check_header(src, entry, native)
        bigger = replace(entry, size_bytes=entry.size_bytes + 1)
        with pytest.raises(CorruptCheckpointError) as info:
            check_size(src, bigger, native)
        assert str(info.value) == (
            f"corrupt checkpoint {native}: rank file {entry.file} is {entry.size_bytes} bytes, the manifest says "
            f"{entry.size_bytes + 1} (truncated or replaced)"
        )
        other = replace(entry, digest="crc32c:00000000")
        with pytest.raises(CorruptCheckpointError, match="the header of rank file .* does not match the manifest"):
            check_header(src, other, native)
        t = entry.tensors[0]
        data = memoryview(src.read(t.offset, t.nbytes))
        check_tensor_bytes(data, t, native, entry.file)
        flipped = bytearray(data)
        flipped[-1] ^= 1
        with pytest.raises(CorruptCheckpointError) as bad:
            check_tensor_bytes(memoryview(flipped), t, native, entry.file)
        assert str(bad.value) == (
            f"corrupt checkpoint {native}: checksum mismatch in rank file {entry.file}, key {t.name!r} (chunk 0)"
        )
        assert (bad.value.file, bad.value.key) == (entry.file, t.name)


def test_whole_file_digest_of_a_torch_save_rank_file(tmp_path) -> None:
    path = str(tmp_path / "ts")
    checkpointer("torch_save").save(path, {"w": torch.arange(100)})
    entry = read_manifest(path).ranks[0]
    with open_checkpoint(path) as snapshot, closing(snapshot.open_rank_file(entry)) as src:
        assert file_digest(src) == (entry.size_bytes, entry.digest)
        check_file_digest(src, entry, path)
    flip_bit(os.path.join(path, file_name("torch_save")), entry.size_bytes // 2)
    with open_checkpoint(path) as snapshot, closing(snapshot.open_rank_file(entry)) as src:
        with pytest.raises(CorruptCheckpointError) as info:
            check_file_digest(src, entry, path)
    assert str(info.value).startswith(f"corrupt checkpoint {path}: rank file {entry.file} does not match the manifest")


def test_read_error_messages() -> None:
    err = read_error(ChecksumError(1, 2), "/p", "f", ["a", "b"], "the template is untouched")
    assert str(err) == (
        "corrupt checkpoint /p: checksum mismatch in rank file f, key 'b' (chunk 2); the template is untouched"
    )
    assert err.key == "b"
    short = read_error(EOFError("file ends at byte 3, expected 9"), "/p", "f", ["a"])
    assert str(short) == "corrupt checkpoint /p: rank file f is truncated: file ends at byte 3, expected 9"


# -- read_extents through an ObjectReader ------------------------------------

SIZES = [0, 1, 7, 63, 64, 65, 100, 127, 128, 129, 300, 5, 0, 2]


@pytest.fixture
def small_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the sizes of the extent reader so a few hundred bytes cross all its boundaries."""
    monkeypatch.setattr(io, "CHUNK_BYTES", 128)  # chunk_count
    monkeypatch.setattr(io, "BATCH_BYTES", 256)
    monkeypatch.setattr(extent_read, "READ_BYTES", 64)
    monkeypatch.setattr(extent_read, "PARALLEL_READ_BYTES", 0)


class _CountingReader(LocalObjectReader):
    reopened = 0

    def reopen(self) -> LocalObjectReader:
        type(self).reopened += 1
        return super().reopen()


def _extents(tmp_path: os.PathLike[str]) -> tuple[str, list[bytes], list[Extent]]:
    rnd = random.Random(7)
    data = [bytes(rnd.randrange(256) for _ in range(n)) for n in SIZES]
    blob, extents = bytearray(16), []  # a gap before the first extent: offsets are honoured
    for d in data:
        crcs = [io.checksum(d[k * 128 : (k + 1) * 128]) for k in range(chunk_count(len(d)))]
        extents.append(Extent(len(blob), memoryview(bytearray(len(d))), crcs))
        blob += d
    path = os.path.join(tmp_path, "f.bin")
    with open(path, "wb") as f:
        f.write(blob)
    return path, data, extents


def _open(path: str) -> _CountingReader:
    return _CountingReader(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_extents_round_trip_with_a_handle_per_thread(tmp_path, small_io: None, threads: int) -> None:
    path, data, extents = _extents(tmp_path)
    _CountingReader.reopened = 0
    with _open(path) as src:
        assert read_extents(src, extents, threads=threads) == sum(SIZES)
    assert [bytes(e.buffer) for e in extents] == data
    assert _CountingReader.reopened == (threads if threads > 1 else 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_extents_names_the_corrupt_extent_and_chunk(tmp_path, small_io: None, threads: int) -> None:
    path, data, extents = _extents(tmp_path)
    i, at = 10, 200  # the 300-byte extent, its second chunk
    flip_bit(path, extents[i].offset + at)
    with _open(path) as src, pytest.raises(ChecksumError) as err:
        read_extents(src, extents, threads=threads)
    assert (err.value.extent_index, err.value.chunk) == (i, at // 128)
    unverified = [Extent(e.offset, memoryview(bytearray(len(d)))) for e, d in zip(extents, data)]
    with _open(path) as src:
        read_extents(src, unverified, threads=threads)  # crcs None: not checked
    os.truncate(path, extents[i].offset + 50)
    with _open(path) as src, pytest.raises(EOFError, match=f"file ends at byte {extents[i].offset + 50}"):
        read_extents(src, unverified, threads=threads)
