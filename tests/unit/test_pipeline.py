"""Pipelined background saves: the writer writes each group of tensors once staged, while staging goes on."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
from pipeline_testutil import (
    TENSOR_BYTES,
    TENSORS,
    WAIT_S,
    CopyHook,
    assert_same,
    big_state,
    load,
    make,
    rank_file_size,
    use_small_groups,
)

import torchckpt as tc
from torchckpt import pipeline
from torchckpt.errors import UnsafeObjectError, WriterProcessError
from torchckpt.pipeline import Handover, StagedProgress, StagingFailedError, stage_groups

# --------------------------------------------------------------------------- groups


def test_groups_close_at_the_group_size_and_never_split_a_tensor(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "PIPELINE_MIN_BYTES", 0)
    assert stage_groups([4, 4, 4, 4, 4], group_bytes=8) == [2, 4, 5]
    assert stage_groups([3, 6, 1, 9, 2], group_bytes=8) == [2, 4, 5]
    assert stage_groups([20, 1], group_bytes=8) == [1, 2]


def test_a_state_below_two_groups_or_the_minimum_is_staged_whole(monkeypatch) -> None:
    assert stage_groups([2**25] * 3) is None  # 96 MiB: below the default minimum
    assert stage_groups([2**26] * 2) == [1, 2]
    monkeypatch.setattr(pipeline, "PIPELINE_MIN_BYTES", 0)
    assert stage_groups([4, 4, 4], group_bytes=8) is None  # 12 < 2 x 8
    monkeypatch.setattr(pipeline, "PIPELINE_MIN_BYTES", 100)
    assert stage_groups([40, 40], group_bytes=8) is None  # 80 < 100
    assert stage_groups([40, 40, 40], group_bytes=8) == [1, 2, 3]
    assert stage_groups([]) is None


# --------------------------------------------------------------------------- the writer's side


def progress_over(messages: queue.Queue, ends: list[int], timeout_s: float = 5.0) -> StagedProgress:
    def recv(wait: float) -> dict:
        try:
            return messages.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError("nothing came") from None

    return StagedProgress(recv, 3, ends, timeout_s, "/ck/step_3")


def msg(groups: int, save_number: int = 3, error: str | None = None, stall_s: float | None = None) -> dict:
    return {"save_number": save_number, "groups": groups, "error": error, "stall_s": stall_s}


def test_a_tensor_is_ready_once_its_group_is_staged() -> None:
    messages: queue.Queue = queue.Queue()
    progress = progress_over(messages, [2, 5, 6])
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (progress.wait_for(4), done.set()))
    waiter.start()
    messages.put(msg(1))
    assert not done.wait(0.3)  # tensor 4 is in the second group
    messages.put(msg(2))
    assert done.wait(5)
    waiter.join(5)
    assert not progress.complete
    messages.put(msg(3, stall_s=0.25))
    progress.wait_all()
    assert progress.complete and progress.stats == {"stall_s": 0.25}


def test_progress_of_another_save_is_dropped() -> None:
    messages: queue.Queue = queue.Queue()
    progress = progress_over(messages, [1, 2], timeout_s=0.5)
    messages.put(msg(2, save_number=2))  # a stale message of the save before
    with pytest.raises(TimeoutError, match=r"waited 0.5s for staging of the save to /ck/step_3: 0 of 2 groups staged"):
        progress.wait_for(0)


def test_staging_that_failed_fails_every_wait_with_its_error() -> None:
    messages: queue.Queue = queue.Queue()
    progress = progress_over(messages, [1, 2, 3])
    messages.put(msg(1))
    messages.put(msg(1, error="RuntimeError: copy failed"))
    progress.wait_for(0)  # staged before the failure
    expected = r"^staging of the save to /ck/step_3 failed in the training process: RuntimeError: copy failed$"
    with pytest.raises(StagingFailedError, match=expected):
        progress.wait_for(1)
    with pytest.raises(StagingFailedError, match=expected):
        progress.wait_all()


def test_two_writing_threads_are_released_by_one_reader() -> None:
    messages: queue.Queue = queue.Queue()
    progress = progress_over(messages, [1, 2, 3, 4])
    released: list[int] = []
    threads = [threading.Thread(target=lambda i=i: (progress.wait_for(i), released.append(i))) for i in (0, 3)]
    for t in threads:
        t.start()
    messages.put(msg(1))
    deadline = time.monotonic() + 5
    while released != [0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert released == [0]  # the first is released while the other still waits
    messages.put(msg(4))
    for t in threads:
        t.join(5)
    assert released == [0, 3]


# --------------------------------------------------------------------------- the training process's side


def test_the_handover_sends_the_request_first_and_nothing_once_detached() -> None:
    sent: list = []
    handover = Handover(called_at=time.perf_counter())
    handover.plan("flat", [1, 2])
    handover.staged(1)  # before the request: kept, not sent
    assert sent == []
    handover.attach(7, lambda: sent.append("request"), sent.append)
    handover.staged(2, last=True)
    handover.detach()
    handover.staged(2, last=True)
    assert sent[0] == "request"
    assert [(m["save_number"], m["groups"], m["error"]) for m in sent[1:]] == [(7, 1, None), (7, 2, None)]
    assert sent[1]["stall_s"] is None and sent[2]["stall_s"] > 0
    assert handover.planned.result() == ("flat", [1, 2])


def test_a_failure_before_the_plan_is_the_plans_and_after_it_is_sent() -> None:
    early = Handover()
    early.fail(ValueError("bad state"))
    with pytest.raises(ValueError, match="^bad state$"):
        early.planned.result()
    sent: list = []
    late = Handover()
    late.plan("flat", [1, 2])
    late.attach(0, lambda: None, sent.append)
    late.fail(RuntimeError("copy failed"))
    assert sent[-1]["error"] == "RuntimeError: copy failed"


def test_a_send_that_fails_stops_the_messages_but_not_staging() -> None:
    calls: list = []

    def broken(message: dict) -> None:
        calls.append(message)
        raise WriterProcessError("the writer is gone")

    handover = Handover()
    handover.plan("flat", [1, 2])
    handover.attach(0, lambda: None, broken)
    handover.staged(1)
    handover.staged(2, last=True)  # not raised, not sent again
    assert len(calls) == 1


def test_a_state_staged_whole_resolves_the_callers_future_before_the_writer_gets_it() -> None:
    import torch

    # The writer's thread pickles the state once it has it: the training thread must be woken first.
    order: list[str] = []
    with tc.DefaultStager(tc.CheckpointStagerConfig(use_async_staging=True)) as stager:
        handover = Handover()
        future = stager.stage_flattened({"w": torch.arange(4.0)}, handover)
        handover.planned.add_done_callback(lambda f: order.append(f"plan (caller's future done: {future.done()})"))
        flat = future.result(timeout=WAIT_S)
        assert handover.planned.result(timeout=WAIT_S) == (flat, None)
        assert order == ["plan (caller's future done: True)"]
        failing = Handover()
        bad = stager.stage_flattened({"x": lambda: 0}, failing)  # does not pickle: both sides get the error
        with pytest.raises(UnsafeObjectError, match="cannot pickle the value at key 'x'"):
            bad.result(timeout=WAIT_S)
        with pytest.raises(UnsafeObjectError, match="cannot pickle the value at key 'x'"):
            failing.planned.result(timeout=WAIT_S)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
def test_pipelined_saves_round_trip_and_record_their_stall(tmp_path, monkeypatch, fmt) -> None:
    use_small_groups(monkeypatch)
    ckpt = make(fmt)
    try:
        states = [big_state(seed) for seed in range(3)]
        for i, sd in enumerate(states):
            stage, write = ckpt.save(str(tmp_path / f"s{i}"), sd)
            stage.result(timeout=WAIT_S)
            write.result(timeout=WAIT_S)
    finally:
        ckpt.close()
    for i, sd in enumerate(states):
        assert_same(load(tmp_path / f"s{i}", sd), sd)
    stats = json.loads((tmp_path / "s2" / "manifest.json").read_text())["stats"]
    assert 0 < stats["stall_s"] < WAIT_S


def test_the_writer_writes_the_first_groups_before_staging_ends(tmp_path, monkeypatch) -> None:
    use_small_groups(monkeypatch)
    seen: dict[str, int] = {}

    def before(n: int) -> None:
        if n == TENSORS:  # the last group: the first ones must reach the file meanwhile
            deadline = time.monotonic() + WAIT_S
            while rank_file_size(tmp_path) < 4096 + TENSOR_BYTES and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["size"] = rank_file_size(tmp_path)

    CopyHook(monkeypatch, before)
    ckpt = make()
    try:
        sd = big_state(1)
        stage, write = ckpt.save(str(tmp_path / "s"), sd)
        stage.result(timeout=2 * WAIT_S)
        write.result(timeout=WAIT_S)
    finally:
        ckpt.close()
    assert seen["size"] >= 4096 + TENSOR_BYTES  # written while the last group was not yet staged
    assert_same(load(tmp_path / "s", sd), sd)


def test_without_pipelined_writes_nothing_is_written_before_staging_ends(tmp_path, monkeypatch) -> None:
    use_small_groups(monkeypatch)
    sizes: list[int] = []

    def before(n: int) -> None:
        time.sleep(0.05)
        sizes.append(rank_file_size(tmp_path))

    CopyHook(monkeypatch, before)
    ckpt = make(pipelined=False)
    try:
        sd = big_state(1)
        stage, write = ckpt.save(str(tmp_path / "s"), sd)
        stage.result(timeout=WAIT_S)
        write.result(timeout=WAIT_S)
    finally:
        ckpt.close()
    assert sizes == [0]  # one copy of the whole state, before any byte of the file
    assert_same(load(tmp_path / "s", sd), sd)


def test_pipelined_writes_are_off_by_default_and_a_keyword_only_option() -> None:
    assert tc.CheckpointStagerConfig().resolved().pipelined_writes is False
    assert tc.CheckpointStagerConfig(pipelined_writes=True).resolved().pipelined_writes is True
    with pytest.raises(TypeError):
        tc.CheckpointStagerConfig(None, None, None, None, True)  # torchckpt's own option: keyword only


def test_an_incremental_pipelined_save_refers_to_its_unchanged_tensors(tmp_path, monkeypatch) -> None:
    use_small_groups(monkeypatch)
    ckpt = make()
    try:
        first = big_state(1)
        ckpt.save(str(tmp_path / "s0"), first, incremental_base="")[1].result(timeout=WAIT_S)  # digests recorded
        second = {**first, "layer2.w": first["layer2.w"] + 1, "step": 2}
        ckpt.save(str(tmp_path / "s1"), second, incremental_base=str(tmp_path / "s0"))[1].result(timeout=WAIT_S)
    finally:
        ckpt.close()
    assert_same(load(tmp_path / "s1", second), second)
    rank = json.loads((tmp_path / "s1" / "manifest.json").read_text())["ranks"][0]
    assert rank["refs"], "the unchanged tensors are referred to"
    # Only the changed tensor (and the small one) are in the new file.
    assert (tmp_path / "s1" / "rank_00000.safetensors").stat().st_size < 4096 + 2 * TENSOR_BYTES
