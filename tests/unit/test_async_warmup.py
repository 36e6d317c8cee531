"""A fast first async save: the writer start off the training thread, and ``AsyncCheckpointer.warmup``."""

from __future__ import annotations

import time

import async_testutil as at
import ckpt_testutil as cu
import pytest
import torch

import torchckpt as tc
from torchckpt.builder import default_writer_init_fn
from torchckpt.checkpoint_process import CheckpointProcess, CheckpointProcessConfig
from torchckpt.errors import WriterProcessError

WAIT_S = 60
RANK = tc.RankInfo(global_rank=0, global_world_size=1)
#: How long a slow writer start sleeps: far longer than staging a small state.
SLOW_START_S = 5


def state(seed: int = 0, rows: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(rows, 32, generator=g),
        "b": torch.randn(7, generator=g, dtype=torch.float64),
        "ids": torch.randint(0, 100, (5,), generator=g),
        "opt": {"step": torch.tensor(float(seed)), "lr": 0.1},
    }


def make(shared: bool = True, init_timeout_s: int = WAIT_S, **kw) -> tc.AsyncCheckpointer:
    config = tc.CheckpointerConfig(
        process_config=CheckpointProcessConfig(subprocess_init_timeout_secs=init_timeout_s),
        staging_config=tc.CheckpointStagerConfig(use_shared_memory=shared),
    )
    return tc.make_async_checkpointer(config, rank_info=RANK, **kw)


def buffers(ckpt: tc.AsyncCheckpointer):
    return ckpt._checkpoint_stager._state_dict_stager._buffers


def writer(ckpt: tc.AsyncCheckpointer):
    return at.writer_process(ckpt)


def mapping_inode(pid: int | str, address: int) -> int:
    """The inode of the file mapped at ``address`` in process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return int(fields[4])
    raise AssertionError(f"no mapping at {address:#x} in process {pid}")


def mapped_inodes(pid: int) -> set[int]:
    with open(f"/proc/{pid}/maps") as f:
        return {int(line.split()[4]) for line in f}


def save_and_check(ckpt: tc.AsyncCheckpointer, path: str, sd: dict) -> None:
    expected = cu.map_tensors(sd, lambda t: t.clone())
    stage_future, write_future = ckpt.save(path, sd)
    stage_future.result(timeout=WAIT_S)
    write_future.result(timeout=WAIT_S)
    cu.assert_state_equal(ckpt.load(path), expected)


def test_warmup_starts_the_writer_and_hands_it_the_arena_the_first_save_reuses(tmp_path) -> None:
    sd = state()
    with make() as ckpt:
        ckpt.warmup(sd)
        # The writer is up before any save, and has the staging arena mapped.
        proc = writer(ckpt)
        assert ckpt._checkpoint_process.process_creation_future.done() and proc.is_alive()
        warmed = buffers(ckpt)
        arena_ptr = warmed.arena.storage.data_ptr()
        tensor_ptrs = [t.data_ptr() for t in warmed.tensors]
        assert [tuple(t.shape) for t in warmed.tensors] == [(64, 32), (7,), (5,), ()]
        assert mapping_inode("self", arena_ptr) in mapped_inodes(proc.pid)
        save_and_check(ckpt, str(tmp_path / "a"), sd)
        # The first save copied into the warmed memory: no new allocation.
        after = buffers(ckpt)
        assert after.arena is warmed.arena and after.arena.storage.data_ptr() == arena_ptr
        assert [t.data_ptr() for t in after.tensors] == tensor_ptrs
        assert writer(ckpt).pid == proc.pid


def test_warmup_with_private_staging_memory_allocates_it_and_the_save_reuses_it(tmp_path) -> None:
    sd = state(1)
    with make(shared=False) as ckpt:
        ckpt.warmup(sd)
        warmed = buffers(ckpt)
        assert warmed.arena is None
        tensors = list(warmed.tensors)
        save_and_check(ckpt, str(tmp_path / "a"), sd)
        # The same buffers (sending them to the writer moved their bytes into shared memory, in place).
        assert all(a is b for a, b in zip(buffers(ckpt).tensors, tensors, strict=True))


@pytest.mark.parametrize("rows", [16, 256], ids=["smaller", "larger"])
def test_a_save_of_another_structure_than_the_warmup_saves_that_state(tmp_path, rows: int) -> None:
    with make() as ckpt:
        ckpt.warmup(state(0))
        other = state(2, rows=rows)
        other["extra"] = torch.arange(11, dtype=torch.int16)
        save_and_check(ckpt, str(tmp_path / "a"), other)
        assert tuple(buffers(ckpt).tensors[0].shape) == (rows, 32)
        save_and_check(ckpt, str(tmp_path / "b"), state(3))


def test_a_save_right_after_construction_does_not_wait_for_the_writer_to_start(tmp_path) -> None:
    sd = state(4)
    expected = cu.map_tensors(sd, lambda t: t.clone())
    with make(subprocess_init_fn=time.sleep, subprocess_init_args=(SLOW_START_S,)) as ckpt:
        stage_future, write_future = ckpt.save(str(tmp_path / "a"), sd)
        stage_future.result(timeout=WAIT_S)
        # Staged while the writer still starts: the training thread did not wait for it.
        assert not ckpt._checkpoint_process.process_creation_future.done()
        assert not write_future.done()
        sd["w"].add_(1)  # training goes on: the checkpoint holds the state at the save
        write_future.result(timeout=WAIT_S)
        cu.assert_state_equal(ckpt.load(str(tmp_path / "a")), expected)


def test_a_writer_that_cannot_start_fails_the_write_future_naming_its_exit(tmp_path) -> None:
    ckpt = make(subprocess_init_fn=at.exit_now, subprocess_init_args=(7,))
    try:
        stage_future, write_future = ckpt.save(str(tmp_path / "a"), state())
        assert stage_future.result(timeout=WAIT_S) is None
        with pytest.raises(WriterProcessError) as info:
            write_future.result(timeout=WAIT_S)
        message = str(info.value)
        assert message.startswith("Child process terminated unexpectedly: "), message
        assert f"writer subprocess (pid {info.value.pid}) exited with code 7 during start" in message, message
        assert info.value.exitcode == 7
        assert not (tmp_path / "a").exists()
    finally:
        ckpt.close()


def test_an_init_error_fails_the_write_future_and_the_warmup_with_that_error(tmp_path) -> None:
    ckpt = make(subprocess_init_fn=at.fail_start, subprocess_init_args=("no start today",))
    try:
        _, write_future = ckpt.save(str(tmp_path / "a"), state())
        with pytest.raises(RuntimeError, match="^no start today$"):
            write_future.result(timeout=WAIT_S)
        with pytest.raises(RuntimeError, match="^no start today$"):
            ckpt.warmup(state())
    finally:
        ckpt.close()


def test_warmup_of_a_writer_slower_than_the_init_timeout_raises_timed_out() -> None:
    ckpt = make(init_timeout_s=1, subprocess_init_fn=time.sleep, subprocess_init_args=(30,))
    try:
        with pytest.raises(TimeoutError, match="Timed out after 1s"):
            ckpt.warmup(state())
        assert not writer(ckpt).is_alive()
    finally:
        ckpt.close()


def test_warmup_after_close_raises() -> None:
    ckpt = make()
    ckpt.close()
    with pytest.raises(WriterProcessError, match=r"^AsyncCheckpointer.warmup after close: the writer is stopped"):
        ckpt.warmup(state())
    assert buffers(ckpt) is None


def test_process_warmup_after_close_raises() -> None:
    process = CheckpointProcess(RANK, CheckpointProcessConfig(), time.sleep, (0,), default_writer_init_fn, {})
    process.close()
    with pytest.raises(WriterProcessError, match="^warmup of the checkpoint writer of rank 0 after close$"):
        process.warmup()


def test_write_still_waits_for_the_writer_start_as_the_reference_does(tmp_path) -> None:
    process = CheckpointProcess(
        RANK, CheckpointProcessConfig(subprocess_init_timeout_secs=WAIT_S), time.sleep, (2,), default_writer_init_fn, {}
    )
    try:
        future = process.write({"x": torch.ones(3)}, str(tmp_path / "a"))
        assert process.process_creation_future.done()
        future.result(timeout=WAIT_S)
        assert torch.equal(tc.CheckpointReader(RANK).read(str(tmp_path / "a"))[0]["x"], torch.ones(3))
    finally:
        process.close()


def test_warmup_uses_no_more_staging_memory_than_one_copy_of_the_tensors() -> None:
    sd = state(rows=4096)
    tensor_bytes = sum(t.nbytes for t in cu.iter_tensors(sd))
    with make() as ckpt:
        ckpt.warmup(sd)
        arena = buffers(ckpt).arena
        assert tensor_bytes <= arena.size_bytes <= tensor_bytes + 64 * len(cu.iter_tensors(sd))
