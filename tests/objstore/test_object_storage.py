"""Checkpoints in an object store: round trips on a real S3 API server (moto, loopback) and in memory://,
the commit protocol's layout, and the object writer and reader on their own."""

from __future__ import annotations

import errno
import os
import sys
import time

import obstore
import pytest
import torch

import torchckpt as tc
from ckpt_testutil import assert_state_equal, checkpointer, file_name
from torchckpt.errors import CheckpointIOError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsupportedURLError
from torchckpt.format.manifest import MANIFEST_NAME
from torchckpt.format.native import native_file_name
from torchckpt.format.torch_save import rank_file_name
from torchckpt.storage import object_io
from torchckpt.storage.locate import storage_for
from torchckpt.storage.object_client import parse_object_url, store_for
from torchckpt.storage.object_storage import GENERATION_ATTRIBUTE, ObjectStorage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
from dist_util import launch, values  # noqa: E402


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(700, 300, generator=g), "b": torch.arange(17, dtype=torch.int64) + seed},
        "opt": {"lr": 0.1 * seed, "betas": [0.9, 0.99]},
        "step": seed,
    }


def _objects(url: str) -> dict[str, bytes]:
    loc = parse_object_url(url)
    store = store_for(loc)
    prefix = loc.key + "/" if loc.key else None
    return {
        m["path"][len(prefix or "") :]: bytes(obstore.get(store, m["path"]).bytes())
        for batch in obstore.list(store, prefix)
        for m in batch
    }


def test_sync_round_trip_and_overwrite_leave_one_generation(s3_bucket, fmt) -> None:
    url = f"{s3_bucket}/runs/a/ckpt"
    ck = checkpointer(fmt)
    ck.save(url, _state(1))
    first = ObjectStorage(url).generations()
    ck.save(url, _state(2))
    assert_state_equal(ck.load(url), _state(2))
    ck.close()
    objects = _objects(url)
    gens = ObjectStorage(url).generations()
    assert len(first) == 1 and len(gens) == 1 and gens != first  # the old generation was deleted after the commit
    assert sorted(objects) == sorted([MANIFEST_NAME, f"{gens[0]}/{file_name(fmt)}"])
    got = obstore.get(store_for(parse_object_url(url)), f"runs/a/ckpt/{MANIFEST_NAME}")
    assert got.attributes[GENERATION_ATTRIBUTE] == gens[0]


def test_objects_beside_the_checkpoint_are_kept_and_a_bucket_root_works(s3_bucket) -> None:
    loc = parse_object_url(f"{s3_bucket}/ckpt")
    obstore.put(store_for(loc), "ckpt/config.yaml", b"lr: 0.1\n")
    ck = checkpointer("safetensors")
    for seed in (1, 2):
        ck.save(f"{s3_bucket}/ckpt", _state(seed))
        ck.save(s3_bucket, _state(seed + 10))
    assert _objects(f"{s3_bucket}/ckpt")["config.yaml"] == b"lr: 0.1\n"
    assert_state_equal(ck.load(s3_bucket), _state(12))
    assert_state_equal(ck.load(f"{s3_bucket}/ckpt"), _state(2))
    ck.close()


def test_async_round_trip(s3_bucket, fmt) -> None:
    url = f"{s3_bucket}/async/ckpt"
    cfg = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    ck = tc.make_async_checkpointer(cfg)
    try:
        for seed in (3, 4):
            _, written = ck.save(url, _state(seed))
            written.result(timeout=120)
        assert_state_equal(ck.load(url), _state(4))
    finally:
        ck.close()
    assert len(ObjectStorage(url).generations()) == 1


def test_memory_url_round_trip_and_async_refused() -> None:
    url = "memory://unit-round-trip/ckpt"
    ck = checkpointer("safetensors")
    ck.save(url, _state(5))
    assert_state_equal(ck.load(url), _state(5))
    ck.close()
    ack = tc.make_async_checkpointer()
    try:
        with pytest.raises(UnsupportedURLError, match=r"memory://unit-round-trip/x: a memory:// checkpoint lives in"):
            ack.save("memory://unit-round-trip/x", _state(5))
    finally:
        ack.close()


def test_load_of_nothing_names_the_url(s3_bucket) -> None:
    with pytest.raises(CheckpointNotFoundError, match=rf"no checkpoint at {s3_bucket}/missing \(no manifest.json"):
        tc.make_sync_checkpointer().load(f"{s3_bucket}/missing")


def test_a_missing_bucket_is_named_on_save_and_load(s3_bucket) -> None:
    url = "s3://no-such-bucket-here/ckpt"
    with pytest.raises(CheckpointIOError, match=r"cannot save to s3://no-such-bucket-here/ckpt: .*the bucket does not exist") as e:
        checkpointer("safetensors").save(url, _state(1))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at s3://no-such-bucket-here/ckpt: .*bucket does not exist"):
        tc.make_sync_checkpointer().load(url)


def test_a_commit_that_lost_a_race_commits_nothing(s3_bucket) -> None:
    url = f"{s3_bucket}/race"
    checkpointer("safetensors").save(url, _state(1))
    storage = ObjectStorage(url)
    a = storage.begin_save(rank=0, world_size=1, coordinator=True, timeout_s=10, marker=MANIFEST_NAME, save_id="a")
    b = storage.begin_save(rank=0, world_size=1, coordinator=True, timeout_s=10, marker=MANIFEST_NAME, save_id="b")
    a.put("x", b"from a")
    b.put("x", b"from b")
    a.commit(b"{}", owned=lambda n: True)
    with pytest.raises(CheckpointIOError, match=rf"commit failed for {url}: another save committed to {url} while") as e:
        b.commit(b"{}", owned=lambda n: True)
    assert e.value.errno == errno.EEXIST
    b.close(discard=True)
    a.close(discard=True)
    assert ObjectStorage(url).generations() == ["gen-a"]  # the first save's generation went with a's commit
    assert _objects(url)[MANIFEST_NAME] == b"{}"


# -- two ranks ----------------------------------------------------------------


def _two_rank_save_and_load(rank: int, world: int, url: str, fmt: str) -> dict:
    cfg = tc.CheckpointWriterConfig(format=fmt, write_barrier_timeout_secs=60)
    ck = tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=cfg))
    state = _state(10 + rank)
    ck.save(url, state)
    ck.save(url, _state(20 + rank))
    out = ck.load(url)
    ck.close()
    return out


@pytest.mark.timeout(300)
def test_two_ranks_save_into_one_generation(s3_bucket, fmt) -> None:
    url = f"{s3_bucket}/two"
    out = values(launch(_two_rank_save_and_load, 2, url, fmt))
    for rank in (0, 1):
        assert_state_equal(out[rank], _state(20 + rank))
    gens = ObjectStorage(url).generations()
    assert len(gens) == 1
    names = sorted(n for n in _objects(url) if n.startswith(gens[0]))
    name_of = native_file_name if fmt == "safetensors" else rank_file_name
    files = [name_of(r) for r in (0, 1)]
    assert [n.split("/", 1)[1] for n in names if n.split("/", 1)[1] in files] == sorted(files)


def _sharded(rank: int, world: int, url: str, kind: str) -> dict:
    from test_dist_sharded import _mesh, distributed_state

    mesh = _mesh((world,))
    cfg = tc.CheckpointWriterConfig(format=tc.CheckpointFormat.SAFETENSORS, write_barrier_timeout_secs=60)
    ck = tc.make_sync_checkpointer(tc.CheckpointerConfig(writer_config=cfg))
    try:
        if kind == "rows":
            ck.save(url, {"model": distributed_state(mesh, "rows")})
        template = {"model": distributed_state(mesh, "cols")}
        for v in template["model"].values():
            if isinstance(v, torch.Tensor):
                v.to_local().zero_()
        ck.load(url, template)
        return {k: v.full_tensor() for k, v in template["model"].items() if isinstance(v, torch.Tensor)}
    finally:
        ck.close()


@pytest.mark.timeout(300)
def test_dtensors_saved_by_rows_load_by_columns(s3_bucket) -> None:
    from test_dist_sharded import SHAPES, full

    url = f"{s3_bucket}/sharded"
    out = values(launch(_sharded, 2, url, "rows"))
    for r in (0, 1):
        for name in SHAPES:
            assert torch.equal(out[r][name], full(name)), (r, name)


# -- the object writer and reader on their own --------------------------------


def _reader(store, key: str, size: int) -> object_io.ObjectStoreReader:  # type: ignore[no-untyped-def]
    got = obstore.get(store, key, options={"head": True})
    layout = object_io.layout_of(key, f"memory://{key}", int(got.meta["size"]), got.attributes)
    assert layout.size == size
    return object_io.ObjectStoreReader(store, layout, f"memory://{key}")


def test_writer_uploads_out_of_order_writes_as_segments_the_first_last(monkeypatch) -> None:
    monkeypatch.setattr(object_io, "SEGMENT_BYTES", 3000)
    monkeypatch.setattr(object_io, "RANGE_BYTES", 1000)
    store = store_for(parse_object_url("memory://unit-writer"))
    data = os.urandom(10_000)
    out = object_io.ObjectStoreWriter(store, "k", "memory://unit-writer/k")
    order = [0, 3000, 1000, 9000, 2000, 5000, 4000, 8000, 6000, 7000]
    for off in order:
        assert out.write_at([memoryview(data)[off : off + 500], memoryview(data)[off + 500 : off + 1000]], off) == 1000
    with pytest.raises(OSError, match=r"bytes at 3000 are written already") as e:
        out.write_at([memoryview(b"x")], 3000)
    assert e.value.errno == errno.EINVAL
    out._uploads[-1].result(timeout=10)  # segments 1..2 are up; segment 0 is held for the end
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "k")
    out.sync()
    out.close()
    paths = sorted(m["path"] for b in obstore.list(store) for m in b)
    assert paths == ["k", "k.seg00001", "k.seg00002", "k.seg00003"]
    got = obstore.get(store, "k")
    assert got.attributes == {"torchckpt-segments": "4", "torchckpt-segment-bytes": "3000", "torchckpt-size": "10000"}
    assert bytes(obstore.get(store, "k.seg00003").bytes()) == data[9000:]
    src = _reader(store, "k", 10_000)
    assert src.read(0, 10_000) == data and src.read(2500, 1000) == data[2500:3500]  # across segments
    whole = bytearray(10_000)
    assert src.read_into([memoryview(whole)], 0) == 10_000 and bytes(whole) == data


def test_a_small_object_is_one_plain_object(monkeypatch) -> None:
    store = store_for(parse_object_url("memory://unit-small"))
    out = object_io.ObjectStoreWriter(store, "s", "memory://unit-small/s")
    out.write_at([memoryview(b"abc")], 0)
    out.sync()
    out.close()
    got = obstore.get(store, "s")
    assert bytes(got.bytes()) == b"abc" and "torchckpt-segments" not in got.attributes
    empty = object_io.ObjectStoreWriter(store, "e", "memory://unit-small/e")
    empty.sync()
    assert bytes(obstore.get(store, "e").bytes()) == b""


def test_bad_segment_metadata_is_corruption_naming_the_object() -> None:
    with pytest.raises(CorruptCheckpointError, match=r"corrupt object memory://x/k: segment metadata does not fit"):
        object_io.layout_of("k", "memory://x/k", 100, {"torchckpt-segments": "2", "torchckpt-segment-bytes": "100",
                                                       "torchckpt-size": "300"})  # fmt: skip
    with pytest.raises(CorruptCheckpointError, match=r"corrupt object memory://x/k: bad segment metadata"):
        object_io.layout_of("k", "memory://x/k", 100, {"torchckpt-segments": "two"})


def test_writer_reports_a_gap_and_an_abandoned_upload_leaves_no_object(monkeypatch) -> None:
    monkeypatch.setattr(object_io, "SEGMENT_BYTES", 100)
    store = store_for(parse_object_url("memory://unit-gap"))
    out = object_io.ObjectStoreWriter(store, "g", "memory://unit-gap/g")
    out.write_at([memoryview(b"a" * 300)], 0)
    out.write_at([memoryview(b"b" * 10)], 400)
    with pytest.raises(OSError, match=r"upload memory://unit-gap/g: bytes 300..400 were never written"):
        out.sync()
    out.close()
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "g")  # segment 0 never appears: the object does not exist


def test_reader_splits_reads_into_ranges_and_gives_a_file(monkeypatch) -> None:
    monkeypatch.setattr(object_io, "RANGE_BYTES", 333)
    store = store_for(parse_object_url("memory://unit-reader"))
    data = os.urandom(5000)
    obstore.put(store, "r", data)
    src = _reader(store, "r", 5000)
    a, b = bytearray(1234), bytearray(4000)
    assert src.read_into([memoryview(a), memoryview(b)], 100) == 4900  # short at the end
    assert bytes(a) == data[100:1334] and bytes(b[:3666]) == data[1334:] and b[3666:] == bytes(334)
    assert src.read(4990, 100) == data[4990:]
    fd = src.fileno()
    assert os.pread(fd, 5000, 0) == data and src.fileno() == fd
    src.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", r"names no bucket"),
        ("s3://b/a//c", r"empty, '.' or '..' parts"),
        ("s3://b/a/../c", r"empty, '.' or '..' parts"),
        ("s3://b/k?versionId=1", r"takes no query"),
    ],
)
def test_bad_urls_are_refused(url, message) -> None:
    with pytest.raises(UnsupportedURLError, match=message):
        storage_for(url)


def test_small_sequential_reads_share_blocks_read_ahead(monkeypatch) -> None:
    monkeypatch.setattr(object_io, "RANGE_BYTES", 1000)
    monkeypatch.setattr(object_io, "DIRECT_READ_BYTES", 4000)
    monkeypatch.setattr(object_io, "READ_AHEAD_BLOCKS", 4)
    store = store_for(parse_object_url("memory://unit-blocks"))
    data = os.urandom(10_000)
    obstore.put(store, "b", data)
    calls: list[int] = []
    real = obstore.get_range

    def spy(store, path, *, start, length):  # type: ignore[no-untyped-def]
        calls.append(start)
        return real(store, path, start=start, length=length)

    monkeypatch.setattr(obstore, "get_range", spy)
    src = _reader(store, "b", 10_000)
    other = src.reopen()
    got = bytearray()
    for off in range(0, 10_000, 250):  # 40 reads of 250 bytes, alternating between two handles
        handle = src if off % 500 else other
        buf = bytearray(250)
        assert handle.read_into([memoryview(buf)], off) == 250
        got += buf
    assert bytes(got) == data
    # block 0 (+1 ahead), then each sequential miss reads 4 blocks at once: 10 GETs for 40 reads, none twice
    assert sorted(calls) == list(range(0, 10_000, 1000))
    calls.clear()
    big = bytearray(5000)
    assert src.read_into([memoryview(big)], 3000) == 5000 and bytes(big) == data[3000:8000]
    assert sorted(calls) == [3000, 4000, 5000, 6000, 7000]  # a large read goes straight to the store


def test_a_failed_ranged_get_names_the_url(monkeypatch) -> None:
    store = store_for(parse_object_url("memory://unit-fail"))
    obstore.put(store, "f", b"x" * 100)
    src = _reader(store, "f", 100)

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(obstore, "get_range", broken)
    with pytest.raises(OSError, match=r"read memory://f failed: connection reset by peer") as e:
        src.read(0, 10)
    assert e.value.errno == errno.EIO


def test_storage_options_reach_the_client_on_save_and_load(s3_bucket, moto_server, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    options = {"endpoint": moto_server.endpoint, "allow_http": "true"}
    cfg = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format="safetensors", storage_options=options))
    ck = tc.make_sync_checkpointer(cfg)
    ck.save(f"{s3_bucket}/opts", _state(7))
    assert_state_equal(ck.load(f"{s3_bucket}/opts"), _state(7))
    ck.close()
    with pytest.raises(ConfigError, match=r"storage_options must map option names to strings"):
        tc.CheckpointWriterConfig(storage_options={"endpoint": 1})


def test_a_rank_file_of_many_segments_round_trips(s3_bucket, fmt, monkeypatch) -> None:
    monkeypatch.setattr(object_io, "SEGMENT_BYTES", 1 << 20)
    monkeypatch.setattr(object_io, "RANGE_BYTES", 256 << 10)
    url = f"{s3_bucket}/segments"
    state = {"big": torch.randn(1_500_000, generator=torch.Generator().manual_seed(3)), "step": 9}
    ck = checkpointer(fmt)
    ck.save(url, state)
    gen = ObjectStorage(url).generations()[0]
    names = sorted(n for n in _objects(url) if n.startswith(gen))
    segments = [n for n in names if ".seg" in n]
    assert len(segments) == 5 and names[0] == f"{gen}/{file_name(fmt)}"  # 6 MB: segment 0 and five more
    assert_state_equal(ck.load(url), state)
    template = {"big": torch.zeros(1_500_000), "step": 0}
    ck.load(url, template)
    assert torch.equal(template["big"], state["big"])
    ck.close()


def test_closing_an_abandoned_object_waits_for_its_running_uploads(monkeypatch) -> None:
    monkeypatch.setattr(object_io, "SEGMENT_BYTES", 100)
    store = store_for(parse_object_url("memory://unit-abandon"))
    real_put = object_io._put

    def slow_put(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return real_put(*args, **kwargs)

    monkeypatch.setattr(object_io, "_put", slow_put)
    out = object_io.ObjectStoreWriter(store, "a", "memory://unit-abandon/a")
    out.write_at([memoryview(b"z" * 450)], 0)  # segments 1..3 start uploading; segment 0 is held
    out.close()
    after_close = sorted(m["path"] for b in obstore.list(store) for m in b)
    time.sleep(0.5)
    assert sorted(m["path"] for b in obstore.list(store) for m in b) == after_close  # nothing lands later
    assert "a" not in after_close  # the object itself never appears


def test_segment_buffers_are_reused_once_uploaded_and_the_bytes_stay_right(s3_bucket, monkeypatch) -> None:
    monkeypatch.setattr(object_io, "SEGMENT_BYTES", 1 << 20)
    reused: list[int] = []
    real_spare = object_io.ObjectStoreWriter._spare

    def spy(self):  # type: ignore[no-untyped-def]
        got = real_spare(self)
        if got is not None:
            reused.append(len(got))
        return got

    monkeypatch.setattr(object_io.ObjectStoreWriter, "_spare", spy)
    loc = parse_object_url(f"{s3_bucket}/reuse")
    store = store_for(loc)
    data = os.urandom(40 << 20)
    out = object_io.ObjectStoreWriter(store, "reuse/obj", f"{s3_bucket}/reuse/obj")
    for off in range(0, len(data), 3 << 20):  # writes that straddle segments
        out.write_at([memoryview(data)[off : off + (3 << 20)]], off)
    out.sync()
    out.close()
    assert reused and all(n == 1 << 20 for n in reused)  # an S3 put lets go of its buffer
    got = obstore.get(store, "reuse/obj", options={"head": True})
    src = object_io.ObjectStoreReader(store, object_io.layout_of("reuse/obj", "x", int(got.meta["size"]), got.attributes), "x")
    assert src.read(0, len(data)) == data
