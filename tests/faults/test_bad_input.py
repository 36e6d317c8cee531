"""Bad input at load: truncations at every structural boundary, random bit flips, missing, extra and
stale rank files, absurd manifests, hostile names and special files.

Standard outcome: a :class:`CorruptCheckpointError` (or :class:`CheckpointNotFoundError`) naming the
path and the file (and the size or key where it applies); never a silent wrong load, never a hang,
memory bounded. ``test_corruption.py`` holds the targeted flips and cuts; this module sweeps them.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import struct
import threading
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ckpt_testutil import FORMATS, assert_state_equal, file_name, flip_bit, reader, save_each_format

import torchckpt as tc
from torchckpt.barriers import Barrier
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from torchckpt.manager import CheckpointManager
from torchckpt.format.extents import checksum
from torchckpt.tools import open_lazy
from torchckpt.verify import verify_checkpoint

pytestmark = pytest.mark.timeout(120)

#: Longest a load may take here before it counts as blocked.
BLOCK_S = 10.0
#: Memory a refused manifest may cost.
BOUND_BYTES = 50 << 20


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(64, 96, generator=g),
            "b": torch.randn(96, generator=g, dtype=torch.float64),
            "emb": torch.randn(40, 16, generator=g).to(torch.bfloat16),
        },
        "ids": torch.randint(-(2**40), 2**40, (300,), generator=g, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
        "step": 7 + seed,
        "name": "run",
    }


def _rank_state(rank: int, generation: int) -> dict[str, Any]:
    state = _state(10 * generation + rank)
    state["rank"] = rank
    return state


# ---------------------------------------------------------------------------- two ranks in one process


class _ThreadBarrier(Barrier):
    """Two writer threads meet here; the agreement goes through an in-memory store."""

    def __init__(self, barrier: threading.Barrier, store: Any) -> None:
        self._barrier = barrier
        self.store = store

    def execute_barrier(self) -> None:
        self._barrier.wait(BLOCK_S)


def save_ranks(path: str, fmt: str, states: list[dict[str, Any]]) -> None:
    """Save ``states[r]`` as rank ``r`` of one checkpoint, each rank in its own thread."""
    world = len(states)
    store, meet = dist.HashStore(), threading.Barrier(world)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            writer = tc.CheckpointWriter(
                tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=30),
                tc.RankInfo(rank, world),
                barrier=_ThreadBarrier(meet, store),
            )
            writer.write(path, states[rank])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a writer thread hung"
    if errors:
        raise errors[0]


def rank_file(fmt: str, rank: int) -> str:
    return f"rank_{rank:05d}.safetensors" if fmt == "safetensors" else f"checkpoint_{rank}.pt"


def read_rank(path: str, rank: int, template: Any = None, **kw: Any) -> Any:
    return tc.CheckpointReader(tc.RankInfo(rank, 2)).read(path, template, **kw)[0]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One committed single-rank checkpoint per layout (never modified)."""
    return save_each_format(tmp_path_factory.mktemp("pristine"), _state(), metadata={"step": 7})


@pytest.fixture(scope="module")
def generations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Per layout: two generations (0, 1) of a 2-rank checkpoint with the same structure, other values."""
    root = tmp_path_factory.mktemp("two_ranks")
    out = {}
    for fmt in FORMATS:
        old, new = str(root / f"{fmt}_gen0"), str(root / f"{fmt}_gen1")
        save_ranks(old, fmt, [_rank_state(r, 0) for r in range(2)])
        save_ranks(new, fmt, [_rank_state(r, 1) for r in range(2)])
        out[fmt] = (old, new)
    return out


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _assert_names(err: CheckpointError, path: str, file: str) -> None:
    assert isinstance(err, CorruptCheckpointError), repr(err)
    assert err.path == path and path in str(err), str(err)
    assert err.file == file and file in str(err), str(err)


@contextmanager
def _unblocker(fifos: list[str]) -> Iterator[None]:
    """On exit, open every FIFO for writing (non-blocking) so that a reader blocked in it wakes up."""
    try:
        yield
    finally:
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # nobody has it open for reading: nobody is blocked in it


def finishes(fn: Callable[[], Any], fifos: list[str], timeout_s: float = BLOCK_S) -> BaseException | None:
    """Run ``fn`` in a thread; fail if it is still running after ``timeout_s`` (blocked opening a FIFO).

    Returns:
        What ``fn`` raised (None when it returned).
    """
    outcome: list[BaseException | None] = []

    def body() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    t = threading.Thread(target=body, daemon=True)
    with _unblocker(fifos):
        t.start()
        t.join(timeout_s)
        blocked = t.is_alive()
    t.join(timeout_s)
    assert not blocked, f"{fn} blocked for {timeout_s}s: it opened a FIFO it must not open"
    return outcome[0]


# ---------------------------------------------------------------------------- truncation


def _native_cuts(path: str) -> dict[str, int]:
    entry = read_manifest(path).ranks[0]
    with open(os.path.join(path, file_name("safetensors")), "rb") as f:
        head = f.read(entry.data_offset)
    (header_len,) = struct.unpack("<Q", head[:8])
    assert 8 + header_len == entry.data_offset
    json_end = 8 + len(head[8:].rstrip(b" "))  # the JSON ends here; spaces pad it to data_offset
    cuts = {
        "empty": 0,
        "length_1": 1,
        "length_4": 4,
        "length_7": 7,
        "length_only": 8,
        "json_first_byte": 9,
        "json_middle": (8 + json_end) // 2,
        "json_one_short": json_end - 1,
        "json_end": json_end,
        "padding": (json_end + entry.data_offset) // 2,
        "header_one_short": entry.data_offset - 1,
        "header_data_boundary": entry.data_offset,
        "one_short": entry.size_bytes - 1,
    }
    for t in entry.tensors:
        if t.nbytes:
            cuts[f"start_of_{t.name}"] = t.offset
            cuts[f"inside_{t.name}"] = t.offset + t.nbytes // 2
    return cuts


def _zip_cuts(file: str) -> dict[str, int]:
    with open(file, "rb") as f:
        data = f.read()
    cuts = {"empty": 0, "magic": 2, "one_short": len(data) - 1}
    with zipfile.ZipFile(file) as zf:
        infos = zf.infolist()
    assert len(infos) >= 5, [i.filename for i in infos]
    last_data_end = 0
    for i in infos:
        name = i.filename.split("/", 1)[-1]
        at = i.header_offset
        assert data[at : at + 4] == b"PK\x03\x04"
        name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
        start = at + 30 + name_len + extra_len
        cuts[f"local_header_{name}"] = at
        cuts[f"inside_local_header_{name}"] = at + 15
        cuts[f"data_{name}"] = start
        if i.compress_size > 1:
            cuts[f"inside_data_{name}"] = start + i.compress_size // 2
        last_data_end = max(last_data_end, start + i.compress_size)
    central = data.find(b"PK\x01\x02", last_data_end)
    end = data.rfind(b"PK\x05\x06")
    assert 0 < central < end
    cuts.update(
        central_directory=central, inside_central_directory=central + 20, end_record=end, inside_end_record=end + 10
    )
    return cuts


def _cuts(path: str, fmt: str) -> dict[str, int]:
    if fmt == "safetensors":
        return _native_cuts(path)
    return _zip_cuts(os.path.join(path, file_name(fmt)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncation_at_every_structural_boundary(pristine: dict[str, str], tmp_path, fmt: str) -> None:
    """Each cut, loaded whole, with a template and without checksums: an error naming the file and its size."""
    path = _copy(pristine[fmt], str(tmp_path / "ckpt"))
    name = file_name(fmt)
    file = os.path.join(path, name)
    with open(file, "rb") as f:
        data = f.read()
    cuts = _cuts(path, fmt)
    assert len(set(cuts.values())) >= 15, cuts
    template = {"model": {"w": torch.zeros(64, 96)}, "step": 0}
    for where, cut in sorted(cuts.items(), key=lambda kv: kv[1]):
        assert 0 <= cut < len(data), (where, cut)
        with open(file, "wb") as f:
            f.write(data[:cut])
        for kw in ({}, {"verify": False}):
            for tmpl in (None, template):
                with pytest.raises(CorruptCheckpointError) as info:
                    reader().read(path, tmpl, **kw)
                _assert_names(info.value, path, name)
                message = str(info.value)
                # The size found is named: "is N bytes" (size check) or "size N vs M" (digest check).
                assert f"{cut} bytes" in message or f"size {cut} vs" in message, (where, message)
        assert template["model"]["w"].count_nonzero() == 0, f"{where}: the template was written"
        problems = verify_checkpoint(path)[1]
        assert [p.file for p in problems] == [name], (where, problems)
    with open(file, "wb") as f:
        f.write(data)
    assert_state_equal(reader().read(path)[0], _state())


# ---------------------------------------------------------------------------- bit flips

#: Positions flipped per layout: (region, count).
FLIPS = {
    "safetensors": [("header", 15), ("data", 25), ("manifest", 10)],
    "torch_save": [("file", 40), ("manifest", 10)],
}


def _flip_positions(path: str, fmt: str, seed: int) -> list[tuple[str, str, int, int]]:
    rng = random.Random(seed)
    entry = read_manifest(path).ranks[0]
    manifest_size = os.path.getsize(os.path.join(path, "manifest.json"))
    ranges = {
        "header": (file_name(fmt), 0, entry.data_offset),
        "data": (file_name(fmt), entry.data_offset, entry.size_bytes),
        "file": (file_name(fmt), 0, entry.size_bytes),
        "manifest": ("manifest.json", 0, manifest_size),
    }
    out = []
    for region, count in FLIPS[fmt]:
        name, lo, hi = ranges[region]
        for _ in range(count):
            out.append((region, name, rng.randrange(lo, hi), rng.randrange(8)))
    return out


def _check_flips(path: str, fmt: str, seed: int) -> None:
    positions = _flip_positions(path, fmt, seed)
    assert len(positions) == 50
    for region, name, offset, bit in positions:
        file = os.path.join(path, name)
        flip_bit(file, offset, bit)
        try:
            with pytest.raises(CorruptCheckpointError) as info:
                reader().read(path)
            err = info.value
            assert err.file == name, (region, offset, bit, str(err))
            assert name in str(err) and path in str(err)
            if region == "data":  # the chunk checksums name the key whose bytes changed
                assert err.key is not None and repr(err.key) in str(err), str(err)
            if name != "manifest.json":
                problems = verify_checkpoint(path)[1]
                assert problems and {p.file for p in problems} == {name}, (region, offset, problems)
            if region != "header":  # the tools' lazy reading (inspect, diff, export) finds it too
                with pytest.raises(CorruptCheckpointError), open_lazy(path):
                    pass
        finally:
            flip_bit(file, offset, bit)
    assert_state_equal(reader().read(path)[0], _state())  # every flip was undone


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_bit_flips_are_always_detected(pristine: dict[str, str], tmp_path, fmt: str) -> None:
    """50 seeded flips per layout across header, data and manifest: each one is found, none loads silently."""
    _check_flips(_copy(pristine[fmt], str(tmp_path / "ckpt")), fmt, seed=20240607)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_bit_flips_many_seeds(pristine: dict[str, str], tmp_path, fmt: str, seed: int) -> None:
    _check_flips(_copy(pristine[fmt], str(tmp_path / "ckpt")), fmt, seed)


# ---------------------------------------------------------------------------- missing, extra, stale rank files


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_rank_checkpoints_load_per_rank(generations: dict[str, tuple[str, str]], fmt: str) -> None:
    old, new = generations[fmt]
    for rank in range(2):
        assert_state_equal(read_rank(old, rank), _rank_state(rank, 0))
        assert_state_equal(read_rank(new, rank), _rank_state(rank, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_rank_file_of_a_two_rank_checkpoint(
    generations: dict[str, tuple[str, str]], tmp_path, fmt: str
) -> None:
    """Rank 1's file is gone: rank 1's load names it; rank 0 still loads its own (complete) part."""
    path = _copy(generations[fmt][1], str(tmp_path / "ckpt"))
    os.unlink(os.path.join(path, rank_file(fmt, 1)))
    with pytest.raises(CorruptCheckpointError, match="missing") as info:
        read_rank(path, 1)
    _assert_names(info.value, path, rank_file(fmt, 1))
    assert_state_equal(read_rank(path, 0), _rank_state(0, 1))
    problems = verify_checkpoint(path)[1]
    assert [(p.file, p.message) for p in problems] == [(rank_file(fmt, 1), "missing")]


@pytest.mark.parametrize("what", ["rank_file", "manifest"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_stale_file_from_another_generation(
    generations: dict[str, tuple[str, str]], tmp_path, fmt: str, what: str
) -> None:
    """A file of the previous save under the same name (same structure, same size): found by its checksums."""
    old, new = generations[fmt]
    path = _copy(new, str(tmp_path / "ckpt"))
    name = rank_file(fmt, 1) if what == "rank_file" else "manifest.json"
    stale = os.path.join(old, name)
    if what == "rank_file":
        assert os.path.getsize(stale) == os.path.getsize(os.path.join(path, name))  # only the bytes differ
    shutil.copyfile(stale, os.path.join(path, name))
    # rank 1's file (rank_file), or every rank file (a stale manifest), no longer matches the manifest
    for rank in (1,) if what == "rank_file" else (0, 1):
        with pytest.raises(CorruptCheckpointError) as info:
            read_rank(path, rank)
        if fmt == "safetensors" and what != "rank_file":
            # A stale manifest names index objects of the old save: their checksums differ from the new ones.
            _assert_names(info.value, path, f"rank_{rank:05d}.index.json")
            assert "checksum mismatch" in str(info.value)
            continue
        _assert_names(info.value, path, rank_file(fmt, rank))
        if fmt == "safetensors":  # same structure, so the header matches: the first tensor's checksum fails
            assert info.value.key is not None
    if what == "rank_file":
        assert_state_equal(read_rank(path, 0), _rank_state(0, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_extra_rank_file_is_ignored_and_never_opened(
    generations: dict[str, tuple[str, str]], tmp_path, fmt: str
) -> None:
    """Files the manifest does not list are not part of the checkpoint (docs/format.md): never opened.

    The extras are FIFOs: opening one to read would block, so every load finishing proves they were not opened.
    """
    path = _copy(generations[fmt][1], str(tmp_path / "ckpt"))
    extras = [os.path.join(path, rank_file(fmt, 2)), os.path.join(path, rank_file(fmt, 0) + ".old")]
    for extra in extras:
        os.mkfifo(extra)
    for rank in range(2):
        loaded: list[Any] = []
        assert finishes(lambda rank=rank, loaded=loaded: loaded.append(read_rank(path, rank)), extras) is None
        assert_state_equal(loaded[0], _rank_state(rank, 1))
    out: list[Any] = []
    assert finishes(lambda: out.append(verify_checkpoint(path)), extras) is None
    manifest, problems = out[0]
    assert problems == [] and manifest.world_size == 2
    # a reader asking for a rank the manifest does not have gets a clear error, without opening anything
    error = finishes(lambda: tc.CheckpointReader(tc.RankInfo(0, 3)).read(path, rank=2), extras)
    assert isinstance(error, ValueError) and "rank 2 out of range" in str(error) and path in str(error)


# ---------------------------------------------------------------------------- absurd manifests, bounded memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


@contextmanager
def bounded_memory(limit: int = BOUND_BYTES) -> Iterator[None]:
    """Assert the block grows neither Python allocations nor resident memory (peak) by ``limit`` bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_bytes()
    tracemalloc.start()
    try:
        yield
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth = _peak_rss_bytes() - base
    assert python_peak < limit, f"Python allocations peaked at {python_peak >> 20} MiB"
    assert rss_growth < limit, f"resident memory grew by {rss_growth >> 20} MiB"


def _doc(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return json.load(f)


def _reseal(body: bytes) -> bytes:
    """A manifest whose seal matches ``body`` (the members after the opening brace), as an attacker would make it."""
    return b'{"manifest_crc32c":"%08x",' % checksum(body) + body


def _sealed(doc: dict[str, Any]) -> bytes:
    body = json.dumps({k: v for k, v in doc.items() if k != "manifest_crc32c"}, separators=(",", ":")).encode()
    return _reseal(body[1:])


def _last_tensor(doc: dict[str, Any]) -> dict[str, Any]:
    return max(doc["ranks"][0]["tensors"], key=lambda t: t["offset"])


def _declare_tensor(doc: dict[str, Any], nbytes: int) -> None:
    """The last tensor declared as ``nbytes`` bytes, its shape, checksums (up to 2^16) and file size to match."""
    t = _last_tensor(doc)
    crcs = min(1 << 16, max(1, -(-nbytes // (16 << 20))))
    t.update(dtype="uint8", shape=[nbytes], nbytes=nbytes, crc32c=[0] * crcs)
    doc["ranks"][0]["size_bytes"] = t["offset"] + nbytes


def _empty_tensor(doc: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in doc["ranks"][0]["tensors"] if t["nbytes"] == 0)


def _with_metadata(doc: dict[str, Any], raw: bytes) -> bytes:
    body = _sealed(doc)[len(b'{"manifest_crc32c":"00000000",') :]
    body = body.replace(b'"metadata":{"step":7}', b'"metadata":' + raw, 1)
    assert raw in body
    return _reseal(body)


ABSURD: dict[str, tuple[str, Callable[[dict[str, Any]], Any], str]] = {
    # case: (layout, mutation returning new manifest bytes or None (then resealed), what the error says)
    "tensor_2^60_bytes": ("safetensors", lambda d: _declare_tensor(d, 2**60), "absurd size"),
    "tensor_2^40x2^40x2^40": (
        "safetensors",
        lambda d: _last_tensor(d).update(shape=[2**40] * 3, nbytes=2**120),
        "absurd shape",
    ),
    "tensor_1TiB_not_in_the_file": ("safetensors", lambda d: _declare_tensor(d, 2**40), "the manifest says"),
    "empty_tensor_of_huge_dims": ("safetensors", lambda d: _empty_tensor(d).update(shape=[0, 2**62, 4]), "shape"),
    "empty_tensor_dim_2^64": ("safetensors", lambda d: _empty_tensor(d).update(shape=[0, 2**64]), "shape"),
    "crc_list_for_1TiB": (
        "safetensors",
        lambda d: (_declare_tensor(d, 2**40), _last_tensor(d).update(crc32c=[0])),
        "crc32c",
    ),
    "data_offset_2^63": ("safetensors", lambda d: d["ranks"][0].update(data_offset=2**63), "offset"),
    "file_2^62_bytes": ("torch_save", lambda d: d["ranks"][0].update(size_bytes=2**62), "absurd size"),
    "file_2^49_bytes_not_on_disk": ("torch_save", lambda d: d["ranks"][0].update(size_bytes=2**49), str(2**49)),
    "world_size_10^9": ("torch_save", lambda d: d.update(world_size=10**9), "world_size"),
    "chunk_bytes_2^70": ("torch_save", lambda d: d["checksum"].update(chunk_bytes=2**70), "chunk_bytes"),
    "integer_of_5000_digits": ("torch_save", lambda d: _with_metadata(d, b"1" * 5000), "manifest.json"),
    "nested_200000_deep": ("torch_save", lambda d: _with_metadata(d, b"[" * 200_000 + b"]" * 200_000), "nested"),
    "nan_literal": ("safetensors", lambda d: _with_metadata(d, b'{"loss":NaN}'), "NaN"),
    "unknown_version": ("safetensors", lambda d: d.update(torchckpt_format=3), "version"),
    "bad_device": ("safetensors", lambda d: _last_tensor(d).update(device="nope:0"), "device"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_manifest_fails_fast_with_bounded_memory(pristine: dict[str, str], tmp_path, case: str) -> None:
    fmt, mutate, says = ABSURD[case]
    path = _copy(pristine[fmt], str(tmp_path / "ckpt"))
    doc = _doc(path)
    raw = mutate(doc)
    data = raw if isinstance(raw, bytes) else _sealed(doc)
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(data)
    for verify in (True, False):
        with bounded_memory(), pytest.raises(CorruptCheckpointError) as info:
            reader().read(path, verify=verify)
        err = info.value
        assert says in str(err), str(err)
        assert err.path == path and path in str(err)
        expected_file = file_name(fmt) if "not_in_the_file" in case or "not_on_disk" in case else "manifest.json"
        assert err.file == expected_file, str(err)


@pytest.mark.parametrize(
    ("size", "head"),
    [(2**31, b""), (2**40, b""), (512 << 20, b""), (512 << 20, b'{"manifest_crc32c":"00000000","torchckpt_format":1')],
    ids=["2GiB_sparse", "1TiB_sparse", "512MiB_of_zeros", "512MiB_sealed_wrong"],
)
def test_huge_manifest_file_is_refused_with_bounded_memory(
    pristine: dict[str, str], tmp_path, size: int, head: bytes
) -> None:
    """Larger than the limit: refused before it is read; below it but not a manifest: refused after a few bytes."""
    path = _copy(pristine["safetensors"], str(tmp_path / "ckpt"))
    manifest = os.path.join(path, "manifest.json")
    with open(manifest, "wb") as f:
        f.write(head)
        f.truncate(size)  # sparse: costs no disk
    with bounded_memory(), pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    _assert_names(info.value, path, "manifest.json")


@pytest.mark.parametrize("fmt", FORMATS)
def test_header_length_field_of_2_63(pristine: dict[str, str], tmp_path, fmt: str) -> None:
    """The first 8 bytes of the rank file say 2^63: found by the digest, nothing allocated from it."""
    path = _copy(pristine[fmt], str(tmp_path / "ckpt"))
    with open(os.path.join(path, file_name(fmt)), "r+b") as f:
        f.write(struct.pack("<Q", 2**63))
    for verify in (True, False) if fmt == "safetensors" else (True,):
        with bounded_memory(), pytest.raises(CorruptCheckpointError) as info:
            reader().read(path, verify=verify)
        _assert_names(info.value, path, file_name(fmt))


# ---------------------------------------------------------------------------- hostile names and special files


def _install_names(path: str, fmt: str, name: str) -> None:
    doc = _doc(path)
    doc["ranks"][0]["file"] = name
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(_sealed(doc))


HOSTILE = {
    "dotdot": lambda outside: "../" + os.path.basename(outside),
    "dotdot_deep": lambda outside: "sub/../../" + os.path.basename(outside),
    "absolute": lambda outside: outside,
    "nul": lambda outside: os.path.basename(outside) + "\x00",
    "nul_then_dotdot": lambda outside: "x\x00/../" + os.path.basename(outside),
    "dot": lambda outside: ".",
    "dotdot_alone": lambda outside: "..",
}


@pytest.mark.parametrize("kind", ["fifo", "file"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_names_are_refused_before_any_open(
    pristine: dict[str, str], tmp_path, fmt: str, case: str, kind: str
) -> None:
    """A rank entry naming something outside the checkpoint: refused, and the target is never opened.

    A FIFO target would block a reader that opened it; a regular target must stay byte-identical.
    """
    outside = str(tmp_path / "outside")
    if kind == "fifo":
        os.mkfifo(outside)
    else:
        with open(outside, "wb") as f:
            f.write(b"secret")
    path = _copy(pristine[fmt], str(tmp_path / "ckpt"))
    os.mkdir(os.path.join(path, "sub"))
    _install_names(path, fmt, HOSTILE[case](outside))
    fifos = [outside] if kind == "fifo" else []
    for load in (
        lambda: reader().read(path),
        lambda: reader().read(path, verify=False),
        lambda: verify_checkpoint(path),
    ):
        error = finishes(load, fifos)
        if error is None:  # verify_checkpoint reports the manifest as a problem instead of raising
            manifest, problems = verify_checkpoint(path)
            assert manifest is None and "unsafe file name" in problems[0].message
            continue
        assert isinstance(error, CorruptCheckpointError), repr(error)
        assert "unsafe file name" in str(error) and error.file == "manifest.json"
    if kind == "file":
        with open(outside, "rb") as f:
            assert f.read() == b"secret"


SPECIAL = ["fifo", "symlink_to_fifo", "symlink_to_valid_copy", "directory"]


@pytest.mark.parametrize("which", ["rank_file", "manifest"])
@pytest.mark.parametrize("special", SPECIAL)
@pytest.mark.parametrize("fmt", FORMATS)
def test_special_files_are_refused_without_blocking(
    pristine: dict[str, str], tmp_path, fmt: str, special: str, which: str
) -> None:
    """A rank file or manifest that is a FIFO, a symlink (even to the right bytes) or a directory."""
    path = _copy(pristine[fmt], str(tmp_path / "ckpt"))
    name = file_name(fmt) if which == "rank_file" else "manifest.json"
    target = os.path.join(path, name)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    saved = str(tmp_path / "saved")
    os.rename(target, saved)
    if special == "fifo":
        os.mkfifo(target)
    elif special == "symlink_to_fifo":
        os.symlink(fifo, target)
    elif special == "symlink_to_valid_copy":
        os.symlink(saved, target)
    else:
        os.mkdir(target)
    fifos = [fifo, target] if "fifo" in special else []
    error = finishes(lambda: reader().read(path), fifos)
    assert isinstance(error, CorruptCheckpointError), repr(error)
    _assert_names(error, path, name)
    assert ("symbolic link" if "symlink" in special else "not a regular file") in str(error)
    # the manager's listing does not block on it either, and does not list it
    parent = str(tmp_path / "root")
    os.mkdir(parent)
    os.symlink(path, os.path.join(parent, "step_0000000007"))
    out: list[Any] = []
    assert finishes(lambda: out.append(CheckpointManager(parent, async_save=False).steps()), fifos) is None
    assert out == [[]]


def test_checkpoint_directory_that_is_a_symlink(pristine: dict[str, str], tmp_path) -> None:
    """The checkpoint path itself is a symlink: not followed (a reader opens what it was asked, no further)."""
    link = str(tmp_path / "link")
    os.symlink(pristine["safetensors"], link)
    with pytest.raises(CheckpointNotFoundError, match="symbolic link") as info:
        reader().read(link)
    assert info.value.path == link and link in str(info.value)


def test_hostile_names_in_the_two_rank_listing(generations: dict[str, tuple[str, str]], tmp_path) -> None:
    """Rank 1's entry names rank 0's file (or a path): refused for every rank, before any rank file is opened."""
    fmt = "safetensors"
    for i, name in enumerate([rank_file(fmt, 0), "../" + rank_file(fmt, 1), "/" + rank_file(fmt, 1)]):
        path = _copy(generations[fmt][1], str(tmp_path / f"ckpt{i}"))
        doc = _doc(path)
        doc["ranks"][1]["file"] = name
        with open(os.path.join(path, "manifest.json"), "wb") as f:
            f.write(_sealed(copy.deepcopy(doc)))
        for rank in range(2):
            with pytest.raises(CorruptCheckpointError) as info:
                read_rank(path, rank)
            assert info.value.file == "manifest.json"
            assert ("same file" if i == 0 else "unsafe file name") in str(info.value)
