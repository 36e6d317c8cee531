"""Crashes and races on an ``s3://`` checkpoint: a writer killed mid-upload, a reader racing an overwrite, two writers.

Against moto's S3 server (``conftest.py``). Standard outcome
(shared/RELIABILITY.md), for an object store:

- a writer killed at a random point of its upload leaves the previous
  checkpoint loadable and exact (or, killed after its commit, its own); what
  it left is at most one uncommitted generation, which the next save deletes;
- a reader loading while another thread overwrites the checkpoint gets one
  of the saved states exactly, never a mix and never an error (it reads
  again when the generation it holds is replaced: ``read_consistently``);
- of two writers racing for one URL, exactly one commits, or both in turn;
  the loser's error says another save committed (EEXIST), and the URL holds
  the winner's state exactly.

States: every tensor of a save holds one constant (``const_state``), so a
load that mixed two saves has two values.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ckpt_testutil import assert_state_equal
from s3_proxy import FaultProxy
from s3_testutil import MotoServer
from zygote import Zygote
from s3_fault_util import OBJSTORE_DIR, child_env, committed, const_state, load, multipart_uploads, writer

import torchckpt.checkpoint_reader
from torchckpt.errors import CheckpointIOError
from torchckpt.reading import open_checkpoint, read_consistently
from torchckpt.storage import object_client
from torchckpt.format.manifest import MANIFEST_NAME
from torchckpt.storage import object_io
from torchckpt.storage.object_storage import ObjectStorage

#: The state a killed writer saves (two 32 MiB parts).
KILL_MIB = 64
#: A kill lands this long (seeded, uniform from 0) after the child's save began.
MAX_KILL_DELAY_S = 1.6
DEFAULT_SEEDS = 3
SLOW_SEEDS = 20
WAIT_S = 60.0


# -- c. a writer SIGKILLed mid-upload ---------------------------------------------------------------


def _zygote() -> Zygote:
    """``s3_crash_child.py`` running, with the test's ``AWS_*`` environment: forks saving children on request."""
    return Zygote(os.path.join(OBJSTORE_DIR, "s3_crash_child.py"), env=child_env())


@pytest.fixture
def watch(moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A proxy (no faults) between the clients and the server, to know when the server has answered everything."""
    with FaultProxy(moto_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setattr(object_client, "_stores", {})
        yield p


@pytest.fixture
def zygote(watch: FaultProxy) -> Iterator[Zygote]:
    z = _zygote()  # started once the environment names the proxy: the children reach the server through it
    yield z
    z.close()


def _kill_mid_save(zygote: Zygote, url: str, value: int, log: str, delay_s: float) -> str:
    """Fork a child saving ``const_state(value)``, SIGKILL it ``delay_s`` after its save began; return its log."""
    if os.path.exists(log):
        os.unlink(log)
    pid = zygote.call("fork", url, value, KILL_MIB, log)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (os.path.exists(log) and os.path.getsize(log) > 0):
            assert time.monotonic() < deadline, f"the child did not begin its save in {WAIT_S}s"
            time.sleep(0.002)
        time.sleep(delay_s)
    finally:
        os.kill(pid, signal.SIGKILL)
        code = zygote.call("reap", pid)
    assert code == -signal.SIGKILL, f"the child ended on its own (exit code {code})"
    with open(log) as f:
        return f.read()


def _sigkill_rounds(zygote: Zygote, watch: FaultProxy, url: str, tmp_path: Any, seeds: range) -> None:
    storage = ObjectStorage(url)
    log = str(tmp_path / "child.log")
    prev = const_state(1, 2)
    writer().write(url, prev)  # committed before any kill: the URL always has a checkpoint
    mid_save = 0
    for seed in seeds:
        rng = random.Random(seed)
        delay = rng.uniform(0, MAX_KILL_DELAY_S)
        mark = committed(url)
        value = 1000 + seed
        done = _kill_mid_save(zygote, url, value, log, delay)
        # a request the child sent before it died (a segment, the commit) may still be
        # served after its death: the checks start once the server answered all it got
        watch.wait_idle()

        loaded = load(url)  # never an error: exactly the previous state or the killed child's
        landed = committed(url) != mark
        assert_state_equal(loaded, const_state(value, KILL_MIB) if landed else prev)
        assert landed or "c" not in done, f"seed {seed}: the child's save returned but its marker is not there"
        mid_save += not landed
        left = storage.leftovers(MANIFEST_NAME)
        assert len(left) <= 1, f"seed {seed}: leftovers {left}"  # the killed save's generation, or none
        gens = storage.generations()
        assert committed(url)[0] in gens
        assert len(gens) <= 2 + (1 if landed else 0)  # committed + killed (+ the old one its cleanup did not reach)
        # no multipart upload is ever begun: what the kill left is ordinary objects of its generation
        stale = multipart_uploads(watch.upstream_endpoint, url.split("/")[2])
        assert stale == [], stale

        prev = const_state(2000 + seed, 2)
        writer().write(url, prev)  # the next save commits and deletes what the kill left
        assert storage.generations() == [committed(url)[0]], f"seed {seed}"
        assert storage.leftovers(MANIFEST_NAME) == {}
        print(f"seed {seed}: killed {delay:.3f}s into the save; committed {landed}; left {sorted(left)}; "
              f"{len(stale)} incomplete multipart uploads")  # fmt: skip
    assert_state_equal(load(url), prev)
    assert mid_save > 0, "no kill landed before the commit"


def test_sigkill_mid_upload_leaves_the_previous_checkpoint(
    zygote: Zygote, watch: FaultProxy, s3_bucket: str, tmp_path: Any
) -> None:
    _sigkill_rounds(zygote, watch, f"{s3_bucket}/ckpt", tmp_path, range(DEFAULT_SEEDS))


@pytest.mark.slow
def test_sigkill_mid_upload_leaves_the_previous_checkpoint_20_seeds(
    zygote: Zygote, watch: FaultProxy, s3_bucket: str, tmp_path: Any
) -> None:
    _sigkill_rounds(zygote, watch, f"{s3_bucket}/ckpt", tmp_path, range(SLOW_SEEDS))


# -- d. a reader racing an overwrite ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
def test_loads_racing_overwrites_see_one_whole_state(
    s3_bucket: str, fmt: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{s3_bucket}/ckpt"
    mib, saves = 24, 8
    states = {v: const_state(v, mib) for v in range(1, saves + 2)}
    writer(fmt).write(url, states[1])
    consistent_reads = _spy_read_consistently(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="torchckpt.reading")
    # Every ranged GET waits a moment after the manifest was read: a save's commit and its delete of the old
    # generation then fall between a load's start and its GETs often enough to race, however fast both are.
    real_get = object_io._Blocks._get

    def late_get(self, key, start, nbytes):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return real_get(self, key, start, nbytes)

    monkeypatch.setattr(object_io._Blocks, "_get", late_get)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def read_loop() -> None:
        while not stop.is_set():
            try:
                got = load(url)
            except BaseException as e:  # noqa: BLE001 - the test reports it
                failures.append(e)
                return
            value = got["step"]
            assert_state_equal(got, states[value])  # exactly one save's state: every tensor the same constant
            seen.append(value)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for v in range(2, saves + 2):
            loads = len(seen)
            writer(fmt).write(url, states[v])
            # the next save once a load ended (saves faster than loads would starve the reader)
            deadline = time.monotonic() + WAIT_S
            while len(seen) <= loads and not failures and time.monotonic() < deadline:
                time.sleep(0.002)
    finally:
        stop.set()
        reader.join(WAIT_S)
    assert not reader.is_alive()
    assert failures == [], f"a load failed: {failures[0]!r}" if failures else ""
    assert len(seen) >= 3 and len(set(seen)) >= 2, f"the reader saw {seen}"
    assert consistent_reads[0] >= len(seen)  # every load went through read_consistently
    again = [r.getMessage() for r in caplog.records if "replaced while it was being read" in r.getMessage()]
    vanished = sum("no such object" in m for m in again)
    print(f"{len(seen)} loads saw {sorted(set(seen))}; {len(again)} read again after a replacement, "
          f"{vanished} of them when an object vanished mid-read")  # fmt: skip
    assert again, "no load was overtaken by a save: the race was not exercised"
    assert_state_equal(load(url), states[saves + 1])


def test_an_object_deleted_under_its_reader_is_enoent_naming_its_url(s3_bucket: str) -> None:
    """Both ways of reading an object (ranged reads, the in-memory file of ``fileno``) say ENOENT and the URL."""
    url = f"{s3_bucket}/ckpt"
    writer("torch_save").write(url, const_state(1, 1))
    with open_checkpoint(url) as snapshot:
        entry = snapshot.manifest().ranks[0]
        src = snapshot.open_rank_file(entry)
        rank_url = f"{url}/{committed(url)[0]}/{entry.file}"
        ObjectStorage(url).delete_generation(committed(url)[0])
        for read in (lambda: src.read(0, src.size), src.fileno):
            with pytest.raises(FileNotFoundError) as info:
                read()
            assert info.value.errno == errno.ENOENT
            assert str(info.value) == f"[Errno 2] read {rank_url}: no such object"
        src.close()


def test_a_read_whose_generation_vanishes_mid_read_reads_the_new_one(s3_bucket: str) -> None:
    """A save replaces the checkpoint (and deletes the objects) between a reader's open and its read: read again."""
    url = f"{s3_bucket}/ckpt"
    writer().write(url, const_state(1, 1))
    attempts: list[str] = []

    def read(snapshot: Any) -> bytes:
        entry = snapshot.manifest().ranks[0]
        src = snapshot.open_rank_file(entry)  # found: the generation is there
        attempts.append(committed(url)[0])
        if len(attempts) == 1:
            writer().write(url, const_state(2, 1))  # commits, then deletes the generation read here
        try:
            return src.read(0, src.size)
        finally:
            src.close()

    data = read_consistently(url, read)
    assert len(attempts) == 2 and attempts[0] != attempts[1]
    with open_checkpoint(url) as snapshot:
        src = snapshot.open_rank_file(snapshot.manifest().ranks[0])
        assert data == src.read(0, src.size)
    assert_state_equal(load(url), const_state(2, 1))


def _spy_read_consistently(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = torchckpt.checkpoint_reader.read_consistently

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torchckpt.checkpoint_reader, "read_consistently", spy)
    return calls


# -- e. two writers racing for one URL ------------------------------------------------------------------


def _race(url: str, values: tuple[int, int], mib: float) -> dict[int, BaseException | None]:
    start = threading.Barrier(2, timeout=WAIT_S)
    outcome: dict[int, BaseException | None] = {}

    def save(value: int) -> None:
        w = writer()
        state = const_state(value, mib)
        start.wait()
        try:
            w.write(url, state)
            outcome[value] = None
        except BaseException as e:  # noqa: BLE001 - the test checks it
            outcome[value] = e

    threads = [threading.Thread(target=save, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a racing save did not end"
    return outcome


def test_two_writers_racing_for_one_url_commit_one_at_a_time(s3_bucket: str) -> None:
    url = f"{s3_bucket}/ckpt"
    storage = ObjectStorage(url)
    mib = 24
    losses = 0
    for round_ in range(3):  # round 0 on an empty URL (If-None-Match), then over a checkpoint (If-Match)
        values = (100 + 2 * round_, 101 + 2 * round_)
        outcome = _race(url, values, mib)
        lost = {v: e for v, e in outcome.items() if e is not None}
        assert len(lost) <= 1, f"round {round_}: both saves failed: {lost}"
        for e in lost.values():
            assert isinstance(e, CheckpointIOError), repr(e)
            assert e.errno == errno.EEXIST and e.operation == "commit"
            assert f"another save committed to {url} while this one was writing" in str(e), str(e)
        loaded = load(url)
        assert loaded["step"] in values
        if lost:
            assert loaded["step"] not in lost, f"round {round_}: the URL holds the loser's state"
        assert_state_equal(loaded, const_state(loaded["step"], mib))
        losses += len(lost)
        assert storage.generations() == [committed(url)[0]]  # the loser deleted its own generation
        print(f"round {round_}: {'one lost' if lost else 'both committed in turn'}; holds {loaded['step']}")
    assert losses > 0, "the writers never raced (each committed after the other)"
    writer().write(url, const_state(7, 1))
    assert storage.generations() == [committed(url)[0]]
    assert storage.leftovers(MANIFEST_NAME) == {}
