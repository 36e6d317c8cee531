"""Checksummed extents: written through an ObjectWriter and read back, coalesced and split, corruption found."""

from __future__ import annotations

import os
import random

import pytest
import torch

from torchckpt.format import extents
from torchckpt.format import extent_read
from torchckpt.format.extents import ChecksumError, Extent, checksum, chunk_count
from torchckpt.storage.local_read import LocalObjectReader
from torchckpt.format.native import byte_view, contiguous_bytes, write_extents
from torchckpt.storage.local_save import LocalObjectWriter

# Sizes around the (shrunk) read and chunk sizes: empty, tiny, one short of, equal to and past each.
SIZES = [0, 1, 7, 63, 64, 65, 100, 127, 128, 129, 300, 5, 0, 2]


@pytest.fixture
def small_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink every size of the I/O layer so a few hundred bytes cross all its boundaries."""
    monkeypatch.setattr(extents, "CHUNK_BYTES", 128)
    monkeypatch.setattr(extents, "BATCH_BYTES", 256)
    monkeypatch.setattr(extent_read, "READ_BYTES", 64)
    monkeypatch.setattr(extent_read, "PARALLEL_READ_BYTES", 0)


def read_extents(fd: int, targets: list[Extent], *, threads: int = 2) -> int:
    """The reader's extent read over the open file ``fd`` (left open)."""
    return extent_read.read_extents(LocalObjectReader(fd, "the test file", owned=False), targets, threads=threads)


def _layout(tmp_path: os.PathLike[str], threads: int) -> tuple[str, list[bytes], list[Extent]]:
    rnd = random.Random(7)
    data = [bytes(rnd.randrange(256) for _ in range(n)) for n in SIZES]
    offsets, pos = [], 16  # a gap before the first extent: offsets are honoured
    for d in data:
        offsets.append(pos)
        pos += len(d)
    path = os.path.join(tmp_path, "f.bin")
    out = LocalObjectWriter(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path)
    try:
        spans = [Extent(o, memoryview(bytearray(d))) for o, d in zip(offsets, data)]
        assert write_extents(out, spans, threads=threads) == sum(SIZES)
    finally:
        out.close()
    return path, data, spans


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_round_trip_across_read_and_chunk_boundaries(tmp_path: os.PathLike[str], small_io: None, threads: int) -> None:
    path, data, written = _layout(tmp_path, threads)
    for e, d in zip(written, data):
        assert e.crcs is not None and len(e.crcs) == chunk_count(len(d))
        assert e.crcs == [checksum(d[k * 128 : (k + 1) * 128]) for k in range(chunk_count(len(d)))]
    targets = [Extent(e.offset, memoryview(bytearray(len(d))), list(e.crcs or [])) for e, d in zip(written, data)]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_extents(fd, targets, threads=threads) == sum(SIZES)
    finally:
        os.close(fd)
    assert [bytes(t.buffer) for t in targets] == data


@pytest.mark.parametrize("threads", [1, 2])
def test_every_corrupt_byte_names_its_extent_and_chunk(
    tmp_path: os.PathLike[str], small_io: None, threads: int
) -> None:
    path, data, written = _layout(tmp_path, threads)
    checked = 0
    for i, (e, d) in enumerate(zip(written, data)):
        for at in sorted({0, len(d) // 2, len(d) - 1}) if d else []:
            with open(path, "r+b") as f:
                f.seek(e.offset + at)
                f.write(bytes([d[at] ^ 0x01]))
            targets = [
                Extent(x.offset, memoryview(bytearray(len(y))), list(x.crcs or [])) for x, y in zip(written, data)
            ]
            fd = os.open(path, os.O_RDONLY)
            try:
                with pytest.raises(ChecksumError) as err:
                    read_extents(fd, targets, threads=threads)
            finally:
                os.close(fd)
            assert (err.value.extent_index, err.value.chunk) == (i, at // 128)
            with open(path, "r+b") as f:
                f.seek(e.offset + at)
                f.write(bytes([d[at]]))
            checked += 1
    assert checked == 33


def test_unverified_read_and_truncated_file(tmp_path: os.PathLike[str], small_io: None) -> None:
    path, data, written = _layout(tmp_path, 1)
    targets = [Extent(e.offset, memoryview(bytearray(len(d)))) for e, d in zip(written, data)]
    fd = os.open(path, os.O_RDONLY)
    try:
        read_extents(fd, targets, threads=2)
    finally:
        os.close(fd)
    assert [bytes(t.buffer) for t in targets] == data
    os.truncate(path, written[10].offset + 50)  # inside the 300-byte extent
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match=f"file ends at byte {written[10].offset + 50}"):
            read_extents(fd, [Extent(e.offset, memoryview(bytearray(len(d)))) for e, d in zip(written, data)])
    finally:
        os.close(fd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
def test_contiguous_bytes_is_the_tensors_memory(dtype: torch.dtype) -> None:
    t = torch.arange(24).reshape(2, 3, 4).to(dtype)[1]  # a view with a storage offset
    view = contiguous_bytes(t)
    assert (view.format, view.nbytes, view.readonly) == ("B", t.nbytes, False)
    assert bytes(view) == bytes(byte_view(t))
    view[: t.element_size()] = bytes(t.element_size())  # writes land in the tensor
    assert t.flatten()[0].item() == torch.zeros((), dtype=dtype).item()
    assert contiguous_bytes(torch.empty(0, 5, dtype=dtype)).nbytes == 0
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        contiguous_bytes(torch.zeros(4, 4, dtype=dtype).t())
