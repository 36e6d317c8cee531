"""Async saves: DefaultStager, AsyncCheckpointer, make_async_checkpointer.

Kills of the writer subprocess and the leak soak are in ``tests/faults/test_writer_process.py``;
mutating the state while a save is in flight, in ``tests/faults/test_concurrency.py``.
"""

from __future__ import annotations

import fractions
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future

import async_testutil as at
import ckpt_testutil as cu
import pytest
import torch

import torchckpt as tc
from torchckpt.config import accelerator_available
from torchckpt.errors import CheckpointError, ConfigError, UnsafeObjectError, WriterProcessError
from torchckpt.format.tree import Flattened, flatten
from torchckpt.staging import staged_state_dict

#: Longest wait for one small async save in these tests.
WAIT_S = 60

needs_no_accelerator = pytest.mark.skipif(accelerator_available(), reason="checks the CPU-only defaults")


def mixed_state(seed: int = 0, scale: int = 1) -> dict:
    """A state dict of several dtypes, nested containers and plain values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": OrderedDict(
            [
                ("w", torch.randn(64 * scale, 32, generator=g)),
                ("b", torch.randn(32, generator=g, dtype=torch.float64)),
                ("emb", torch.randn(16, 8, generator=g).to(torch.bfloat16)),
            ]
        ),
        "opt": {
            "state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(64 * scale, 32, generator=g)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "mask": torch.rand(33, generator=g) > 0.5,
        "ids": torch.randint(-1000, 1000, (7, 3), generator=g, dtype=torch.int64),
        "half": torch.randn(5, generator=g).to(torch.float16),
        "scalar": torch.tensor(3, dtype=torch.int32),
        "empty": torch.empty(0, 4),
        "step": seed,
        "name": "run-a",
    }


def mutate_all(state: dict) -> None:
    """Change every tensor of ``state`` in place."""
    with torch.no_grad():
        for t in cu.iter_tensors(state):
            if t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(1)


def clone_state(state: dict) -> dict:
    return cu.map_tensors(state, lambda t: t.clone())


def manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def async_ckpt(fmt: str | None = None, **kw) -> tc.AsyncCheckpointer:
    if fmt is None:
        return tc.make_async_checkpointer(**kw)
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    return tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1), **kw)


def writer_pid(ckpt: tc.AsyncCheckpointer) -> int:
    return at.writer_process(ckpt, WAIT_S).pid


@pytest.fixture(scope="module", params=cu.FORMATS)
def shared_async(request: pytest.FixtureRequest):
    """One async checkpointer per format, shared by the tests that only save successfully."""
    ckpt = async_ckpt(request.param)
    yield request.param, ckpt
    ckpt.close()


# -- DefaultStager -------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "private"])
def test_sync_and_async_staging_give_equal_state(shared: bool) -> None:
    state = mixed_state(1)
    state["model"]["t"] = torch.randn(6, 4).t()  # non-contiguous source
    expected = clone_state(state)
    with tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=False, use_shared_memory=shared)) as sync:
        staged_sync = sync.stage(state)
        assert isinstance(staged_sync, dict)
        cu.assert_state_equal(staged_sync, expected)
        with tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=True, use_shared_memory=shared)) as asy:
            future = asy.stage(state)
            assert isinstance(future, Future)
            staged_async = future.result(timeout=WAIT_S)
            cu.assert_state_equal(staged_async, expected)
            cu.assert_state_equal(staged_async, staged_sync)
            # Copies, not the source tensors.
            assert staged_async["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()
            assert staged_sync["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()
            assert staged_async["model"]["w"].data_ptr() != staged_sync["model"]["w"].data_ptr()
            assert staged_async["model"]["w"].is_shared() is shared


@needs_no_accelerator
def test_default_stager_config_adapts_to_cpu_only_machine() -> None:
    stager = tc.DefaultStager()
    try:
        assert stager.config == tc.CheckpointStagerConfig(
            use_pinned_memory=False, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=False
        )
        state = {"x": torch.arange(10.0)}
        staged = stager.stage(state).result(timeout=WAIT_S)
        assert torch.equal(staged["x"], torch.arange(10.0))
    finally:
        stager.close()


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "private"])
def test_stage_flattened_is_flatten_with_staged_tensors(shared: bool) -> None:
    state = mixed_state(3)
    state["model"]["tied"] = state["model"]["w"]
    expected = flatten(state, allow_pickle=True)
    config = tc.CheckpointStagerConfig(use_shared_memory=shared, use_async_staging=True)
    with tc.DefaultStager(config) as stager:
        flat = stager.stage_flattened(state).result(timeout=WAIT_S)
        assert isinstance(flat, Flattened)
        assert flat.tree == expected.tree and flat.names == expected.names
        assert len(flat.tensors) == len(expected.tensors)
        for staged, source in zip(flat.tensors, expected.tensors):
            assert torch.equal(staged, source) and staged.dtype == source.dtype
            assert source.numel() == 0 or staged.data_ptr() != source.data_ptr()  # copies
        cu.assert_state_equal(staged_state_dict(flat), state)


def test_stage_flattened_notes_pickled_values_and_their_names_from_main() -> None:
    state = {"w": torch.ones(2), "frac": fractions.Fraction(1, 3), "raw": b"", "more": {"f": fractions.Fraction(2)}}
    with tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=False)) as stager:
        flat = stager.stage_flattened(state)
    assert isinstance(flat, Flattened)
    assert [(p.key, p.type_name, p.from_main) for p in flat.pickled] == [
        ("frac", "fractions.Fraction", frozenset()),
        ("more.f", "fractions.Fraction", frozenset()),
    ]
    assert flat.empty_bytes
    with pytest.raises(UnsafeObjectError) as refused:
        flat.refuse_pickled()
    with pytest.raises(UnsafeObjectError) as by_flatten:
        flatten(state, allow_pickle=False)
    assert str(refused.value) == str(by_flatten.value)
    assert refused.value.key == "frac" and refused.value.type_name == "fractions.Fraction"


@needs_no_accelerator
def test_non_blocking_copy_without_accelerator_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        tc.DefaultStager(tc.CheckpointStagerConfig(use_non_blocking_copy=True))
    assert isinstance(info.value, AssertionError)
    assert isinstance(info.value, CheckpointError)
    assert info.value.field == "use_non_blocking_copy"
    assert "use_non_blocking_copy=True" in str(info.value)
    assert "accelerator" in str(info.value)


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "private"])
def test_stager_reuses_buffers_for_the_same_structure(shared: bool) -> None:
    cfg = tc.CheckpointStagerConfig(use_async_staging=False, use_shared_memory=shared)
    with tc.DefaultStager(cfg) as stager:
        first_state = mixed_state(1)
        first = stager.stage(first_state)
        ptrs = [t.data_ptr() for t in cu.iter_tensors(first) if t.numel()]
        second_state = mixed_state(2)  # same keys, shapes and dtypes; other values
        second = stager.stage(second_state)
        assert [t.data_ptr() for t in cu.iter_tensors(second) if t.numel()] == ptrs
        cu.assert_state_equal(second, second_state)
        # Values refreshed: not the first save's bytes.
        assert not torch.equal(second["model"]["w"], first_state["model"]["w"])


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "private"])
def test_stager_restages_a_changed_structure(shared: bool) -> None:
    cfg = tc.CheckpointStagerConfig(use_async_staging=False, use_shared_memory=shared)
    with tc.DefaultStager(cfg) as stager:
        base = {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
        cu.assert_state_equal(stager.stage(base), base)
        variants = [
            {**base, "c": torch.full((1000,), 7, dtype=torch.int16)},  # a new, bigger tensor
            {"a": torch.arange(10, dtype=torch.float32), "b": base["b"]},  # a smaller shape
            {"a": torch.arange(100, dtype=torch.float64), "b": base["b"]},  # another dtype
            {"b": base["b"], "a": base["a"]},  # another order
            {"only": torch.tensor([True, False, True])},
            base,
        ]
        for v in variants:
            staged = stager.stage(v)
            cu.assert_state_equal(staged, v)


def test_staged_tensors_are_snapshots() -> None:
    with tc.DefaultStager() as stager:
        state = mixed_state(3)
        expected = clone_state(state)
        staged = stager.stage(state).result(timeout=WAIT_S)
        mutate_all(state)
        assert not torch.equal(state["model"]["w"], expected["model"]["w"])
        cu.assert_state_equal(staged, expected)


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "private"])
def test_staging_keeps_tied_tensors_tied(shared: bool) -> None:
    w = torch.randn(8, 4)
    state = {"enc": {"w": w}, "dec": {"w": w.detach()}, "same": w, "other": torch.randn(8, 4)}
    cfg = tc.CheckpointStagerConfig(use_async_staging=False, use_shared_memory=shared)
    with tc.DefaultStager(cfg) as stager:
        staged = stager.stage(state)
        cu.assert_state_equal(staged, state)
        ptr = staged["enc"]["w"].data_ptr()
        assert staged["dec"]["w"].data_ptr() == ptr
        assert staged["same"].data_ptr() == ptr
        assert staged["other"].data_ptr() != ptr
        assert ptr != w.data_ptr()
        staged["enc"]["w"].zero_()
        assert torch.count_nonzero(staged["dec"]["w"]) == 0
        assert torch.count_nonzero(w) > 0


def _copy_case(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 5000, (12,), generator=g).tolist()
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64, torch.bool]
    copies = []
    for i, n in enumerate(sizes):
        src = torch.randint(0, 100, (n,), generator=g).to(dtypes[i % len(dtypes)])
        if i % 4 == 1 and n >= 6:
            src = src[: n - n % 6].reshape(-1, 3).t()  # non-contiguous: copied whole
        if i % 5 == 2:
            src = src.sum().reshape(())  # 0-dim
        copies.append((torch.zeros_like(src), src))
    return copies


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_split_copies_copy_every_byte_once_in_balanced_parts(parts: int, seed: int) -> None:
    from torchckpt.staging import split_copies

    copies = _copy_case(seed)
    split = split_copies(copies, parts)
    assert len(split) == parts
    total = sum(src.nbytes for _, src in copies)
    sizes = [sum(src.nbytes for _, src in part) for part in split]
    assert sum(sizes) == total  # no byte twice, none left out
    whole = max(src.nbytes for _, src in copies if not src.is_contiguous() or src.dim() == 0)
    assert max(sizes) <= total / parts + whole + 8  # only an unsplittable copy (or an element) unbalances
    for part in split:
        for dst, src in part:
            dst.copy_(src)
    for dst, src in copies:
        assert torch.equal(dst, src)


def test_large_host_state_is_staged_by_two_threads_bit_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchckpt import staging

    monkeypatch.setattr(staging, "PARALLEL_COPY_BYTES", 1024)
    threads: set[str] = set()
    real = staging._copy_all

    def spy(copies, non_blocking=False):
        threads.add(threading.current_thread().name)
        return real(copies, non_blocking)

    monkeypatch.setattr(staging, "_copy_all", spy)
    state = mixed_state(4)
    state["big"] = torch.randn(3000, requires_grad=True)
    state["odd"] = torch.randn(40, 30).t()
    expected = clone_state(state)
    for shared in (True, False):
        cfg = tc.CheckpointStagerConfig(use_async_staging=False, use_shared_memory=shared)
        with tc.DefaultStager(cfg) as stager:
            for _ in range(2):  # the second stage reuses buffers and the helper thread
                staged = stager.stage(state)
                cu.assert_state_equal(staged, expected)
                assert not staged["big"].requires_grad and staged["big"].grad_fn is None
    assert len(threads) == 2 and any(name.startswith("torchckpt-copy") for name in threads)


def test_a_failing_half_of_the_copy_raises_after_both_halves_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchckpt import staging

    monkeypatch.setattr(staging, "PARALLEL_COPY_BYTES", 1024)
    other_done = threading.Event()
    real = staging._copy_all

    def flaky(copies, non_blocking=False):
        if threading.current_thread().name.startswith("torchckpt-copy"):
            time.sleep(0.2)
            real(copies, non_blocking)
            other_done.set()
            return
        raise RuntimeError("copy failed")

    monkeypatch.setattr(staging, "_copy_all", flaky)
    with tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=False)) as stager:
        with pytest.raises(RuntimeError, match="copy failed"):
            stager.stage({"a": torch.randn(4000), "b": torch.randn(4000)})
        assert other_done.is_set()


# -- AsyncCheckpointer ---------------------------------------------------------


def test_make_async_checkpointer_without_arguments(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    state = mixed_state(4)
    expected = clone_state(state)
    ckpt = tc.make_async_checkpointer()
    try:
        assert isinstance(ckpt, tc.AsyncCheckpointer)
        stage_future, write_future = ckpt.save(path, state)
        assert isinstance(stage_future, Future) and isinstance(write_future, Future)
        assert stage_future.result(timeout=WAIT_S) is None
        mutate_all(state)  # right after staging, most likely while the write is in flight
        assert write_future.result(timeout=WAIT_S) is None
        assert manifest(path)["layout"] == "torch_save"
        cu.assert_state_equal(ckpt.load(path), expected)
        # The default layout is what plain torch.load reads, without pickle.
        plain = torch.load(os.path.join(path, cu.TORCH_SAVE_FILE), weights_only=True)
        cu.assert_state_equal(plain, expected)
        for t in cu.iter_tensors(plain):  # each tensor its own storage, not a view of the staging arena
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    finally:
        ckpt.close()


def test_async_save_with_safetensors_format(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    state = mixed_state(5)
    expected = clone_state(state)
    with async_ckpt("safetensors") as ckpt:
        stage_future, write_future = ckpt.save(path, state)
        assert stage_future.result(timeout=WAIT_S) is None
        assert write_future.result(timeout=WAIT_S) is None
        assert manifest(path)["layout"] == "safetensors"
        assert cu.NATIVE_FILE in os.listdir(path)
        cu.assert_state_equal(ckpt.load(path), expected)


def step_state(step: int) -> dict:
    return {
        "w": torch.full((256, 64), float(step)),
        "i": torch.full((100,), step, dtype=torch.int64),
        "step": step,
    }


def test_quick_saves_to_three_paths_land_in_order(tmp_path, shared_async) -> None:
    fmt, ckpt = shared_async
    paths = [str(tmp_path / f"ckpt{i}") for i in range(3)]
    order: list[int] = []
    lock = threading.Lock()
    futures = []
    state = step_state(0)
    for i, p in enumerate(paths):
        with torch.no_grad():  # the training loop moves on: the same tensors, new values
            state["w"].fill_(float(i + 1))
            state["i"].fill_(i + 1)
        state["step"] = i + 1
        stage_future, write_future = ckpt.save(p, state)
        stage_future.result(timeout=WAIT_S)

        def record(_f, i=i):
            with lock:
                order.append(i)

        write_future.add_done_callback(record)
        futures.append(write_future)
    for f in futures:
        assert f.result(timeout=WAIT_S) is None
    assert order == [0, 1, 2]
    for i, p in enumerate(paths):
        cu.assert_state_equal(ckpt.load(p), step_state(i + 1))
        assert manifest(p)["layout"] == fmt


def test_quick_saves_to_the_same_path_end_with_the_last(tmp_path, shared_async) -> None:
    _, ckpt = shared_async
    path = str(tmp_path / "ckpt")
    futures = []
    for step in (1, 2, 3):
        futures.append(ckpt.save(path, step_state(step))[1])
    for f in futures:
        assert f.result(timeout=WAIT_S) is None
    cu.assert_state_equal(ckpt.load(path), step_state(3))
    assert [n for n in os.listdir(tmp_path) if "pending" in n] == []
    # old generations are deleted in the background, soon after the commit
    deadline = time.monotonic() + 10
    while [n for n in os.listdir(tmp_path) if "trash" in n] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [n for n in os.listdir(tmp_path) if "trash" in n] == []


# -- errors of writes whose futures were dropped ------------------------------------


@pytest.fixture
def failing_ckpt():
    ckpt = tc.make_async_checkpointer(rank_info=tc.RankInfo(0, 1), checkpoint_writer_init_fn=at.failing_writer_init)
    yield ckpt
    try:
        ckpt.close()
    except at.InjectedFailure:
        pass


def test_dropped_failed_write_raises_at_next_save(tmp_path, failing_ckpt) -> None:
    bad = str(tmp_path / f"ckpt_{at.FAIL_MARKER}")
    good = str(tmp_path / "good")
    failing_ckpt.save(bad, step_state(1))  # futures dropped, never looked at
    with pytest.raises(at.InjectedFailure, match=f"injected pre_commit failure for {bad}$"):
        failing_ckpt.save(good, step_state(2))
    assert not os.path.exists(os.path.join(bad, "manifest.json"))
    # The save that raised did not start: nothing at its path.
    assert not os.path.exists(good)
    # Raised once: the next save goes ahead and commits.
    _, write_future = failing_ckpt.save(good, step_state(3))
    assert write_future.result(timeout=WAIT_S) is None
    cu.assert_state_equal(failing_ckpt.load(good), step_state(3))


@pytest.mark.parametrize("look", ["result", "exception"])
def test_failed_write_that_was_looked_at_is_not_raised_again(tmp_path, failing_ckpt, look: str) -> None:
    bad = str(tmp_path / f"ckpt_{at.FAIL_MARKER}")
    good = str(tmp_path / "good")
    _, write_future = failing_ckpt.save(bad, step_state(1))
    if look == "result":
        with pytest.raises(at.InjectedFailure, match="injected pre_commit failure"):
            write_future.result(timeout=WAIT_S)
    else:
        error = write_future.exception(timeout=WAIT_S)
        assert isinstance(error, at.InjectedFailure)
        assert str(error) == f"injected pre_commit failure for {bad}"
    _, write_future = failing_ckpt.save(good, step_state(2))
    assert write_future.result(timeout=WAIT_S) is None
    cu.assert_state_equal(failing_ckpt.load(good), step_state(2))
    failing_ckpt.close()  # nothing unseen left: no error


def test_dropped_failed_write_raises_at_close_and_still_stops_the_writer(tmp_path) -> None:
    bad = str(tmp_path / f"ckpt_{at.FAIL_MARKER}")
    ckpt = tc.make_async_checkpointer(rank_info=tc.RankInfo(0, 1), checkpoint_writer_init_fn=at.failing_writer_init)
    ckpt.save(bad, step_state(1))
    pid = writer_pid(ckpt)
    with pytest.raises(at.InjectedFailure, match=f"injected pre_commit failure for {bad}$"):
        ckpt.close()
    assert at.process_state(pid) is None
    ckpt.close()  # raised once; a second close is quiet


# -- abort -----------------------------------------------------------------------


def test_abort_kills_the_writer_mid_save_and_nothing_commits(tmp_path) -> None:
    children_before = set(at.writer_children())
    arm, reached = str(tmp_path / "arm"), str(tmp_path / "reached")
    ckpt = tc.make_async_checkpointer(
        rank_info=tc.RankInfo(0, 1), subprocess_init_fn=at.hang_before_commit, subprocess_init_args=(arm, reached)
    )
    path, later = str(tmp_path / "ckpt"), str(tmp_path / "later")
    open(arm, "w").close()
    _, write_future = ckpt.save(path, step_state(1))
    at.wait_for_file(reached, WAIT_S)  # all data written, the commit about to start
    pid = writer_pid(ckpt)
    ckpt.abort()
    assert at.process_state(pid) is None  # killed and reaped
    os.remove(arm)  # a writer that survived would commit now
    with pytest.raises(WriterProcessError, match=rf"pid {pid}\) was killed by SIGKILL during the write of {path}"):
        write_future.result(timeout=WAIT_S)
    assert not os.path.exists(os.path.join(path, "manifest.json"))
    _, after = ckpt.save(later, step_state(2))  # no writer is started again
    with pytest.raises(WriterProcessError, match=r"of rank 0 was killed \(CheckpointProcess.kill\)"):
        after.result(timeout=WAIT_S)
    assert not os.path.exists(later)
    ckpt.abort()  # again: nothing left to stop
    ckpt.close()  # every error was looked at: none is raised
    assert set(at.writer_children()) - children_before == set()


def test_abort_needs_a_checkpoint_process() -> None:
    ckpt = tc.AsyncCheckpointer(
        tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=False)), object(), tc.CheckpointReader(tc.RankInfo(0, 1))
    )
    with pytest.raises(TypeError, match="abort\\(\\) stops a CheckpointProcess, not a object"):
        ckpt.abort()


def test_writer_and_process_say_their_rank() -> None:
    info = tc.RankInfo(3, 4)
    assert tc.CheckpointWriter(tc.CheckpointWriterConfig(), info).rank_info == info
    process = tc.CheckpointProcess(
        info, tc.CheckpointProcessConfig(), at.fail_start, ("no writer needed",), tc.CheckpointWriter, {}
    )
    try:
        assert process.rank_info == info
    finally:
        with pytest.raises(Exception, match="no writer needed"):
            process.process_creation_future.result(timeout=WAIT_S)
        process.close()


# -- close ---------------------------------------------------------------------


def test_close_stops_the_writer_and_is_idempotent(tmp_path) -> None:
    ckpt = tc.make_async_checkpointer()
    path = str(tmp_path / "ckpt")
    assert ckpt.save(path, step_state(1))[1].result(timeout=WAIT_S) is None
    pid = writer_pid(ckpt)
    assert at.process_state(pid) not in (None, "Z")
    assert pid in at.children()
    ckpt.close()
    assert at.process_state(pid) is None  # exited and reaped: no zombie
    assert not at.writer_process(ckpt, WAIT_S).is_alive()
    ckpt.close()
    ckpt.close()
    # The checkpoint it wrote is still there and loads after close.
    cu.assert_state_equal(ckpt.load(path), step_state(1))


def test_close_without_any_save() -> None:
    ckpt = tc.make_async_checkpointer()
    ckpt._checkpoint_process.process_creation_future.result(timeout=WAIT_S)
    pid = writer_pid(ckpt)
    assert at.process_state(pid) not in (None, "Z")
    t0 = time.monotonic()
    ckpt.close()
    assert time.monotonic() - t0 < 10
    assert at.process_state(pid) is None


def test_with_block_closes_the_writer(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    with tc.make_async_checkpointer() as ckpt:
        _, write_future = ckpt.save(path, step_state(5))
        pid = writer_pid(ckpt)
        # Leaving the block waits for the write, then stops the writer.
    assert write_future.done() and write_future.exception() is None
    assert at.process_state(pid) is None
    cu.assert_state_equal(tc.CheckpointReader(tc.RankInfo(0, 1)).read(path)[0], step_state(5))


def test_with_block_closes_the_writer_when_the_body_raises(tmp_path) -> None:
    with pytest.raises(KeyError, match="boom"), tc.make_async_checkpointer() as ckpt:
        ckpt._checkpoint_process.process_creation_future.result(timeout=WAIT_S)
        pid = writer_pid(ckpt)
        raise KeyError("boom")
    assert at.process_state(pid) is None


# -- stats -----------------------------------------------------------------------


def test_async_save_records_stats_in_the_manifest(tmp_path, shared_async) -> None:
    fmt, ckpt = shared_async
    path = str(tmp_path / "ckpt")
    state = mixed_state(7)
    expected_bytes = sum(t.numel() * t.element_size() for t in cu.iter_tensors(state))
    assert ckpt.save(path, state)[1].result(timeout=WAIT_S) is None
    stats = manifest(path)["stats"]
    for key in ("stall_s", "write_s", "fsync_s"):
        assert isinstance(stats[key], (int, float)) and not isinstance(stats[key], bool), (key, stats)
        assert 0 <= stats[key] < WAIT_S, (key, stats)
    assert isinstance(stats["bytes"], int)
    assert stats["bytes"] == expected_bytes, f"{fmt}: stats.bytes {stats['bytes']} != tensor bytes {expected_bytes}"


@pytest.mark.parametrize("fmt", cu.FORMATS)
def test_write_staged_writes_a_flattened_state_as_write_writes_the_state(tmp_path, fmt: str) -> None:
    state = mixed_state(4)
    state["model"]["tied"] = state["model"]["w"]
    state["raw"] = b""
    writer = tc.CheckpointWriter(tc.CheckpointWriterConfig(format=fmt), tc.RankInfo(0, 1))
    staged, written = str(tmp_path / "staged"), str(tmp_path / "written")
    writer.write_staged(staged, flatten(state), save_number=7, stats={"stall_s": 0.25})
    writer.write(written, state)
    reader = tc.CheckpointReader(tc.RankInfo(0, 1))
    loaded = reader.read(staged)[0]
    cu.assert_state_equal(loaded, state)
    assert loaded["model"]["tied"].data_ptr() == loaded["model"]["w"].data_ptr()
    assert manifest(staged)["stats"]["stall_s"] == 0.25
    assert "stall_s" not in manifest(written)["stats"]
    assert manifest(staged)["stats"]["bytes"] == manifest(written)["stats"]["bytes"]
    if fmt == "torch_save":  # the same torch.save stream
        assert at.dir_bytes(staged)["checkpoint_0.pt"] == at.dir_bytes(written)["checkpoint_0.pt"]


@pytest.mark.parametrize("fmt", cu.FORMATS)
def test_write_staged_refuses_a_pickled_value_as_write_does(tmp_path, fmt: str) -> None:
    state = {"w": torch.ones(2), "frac": fractions.Fraction(1, 3)}
    writer = tc.CheckpointWriter(tc.CheckpointWriterConfig(format=fmt), tc.RankInfo(0, 1))
    with pytest.raises(UnsafeObjectError) as by_write:
        writer.write(str(tmp_path / "a"), state)
    with pytest.raises(UnsafeObjectError) as by_write_staged:
        writer.write_staged(str(tmp_path / "b"), flatten(state, allow_pickle=True))
    assert str(by_write_staged.value) == str(by_write.value)
    assert not os.path.exists(tmp_path / "b" / "manifest.json")
    writer.write_staged(str(tmp_path / "c"), flatten(state, allow_pickle=True), allow_pickle=True)
    loaded = tc.CheckpointReader(tc.RankInfo(0, 1), allow_pickle=True).read(str(tmp_path / "c"))[0]
    assert loaded["frac"] == fractions.Fraction(1, 3)
