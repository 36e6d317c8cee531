"""Every I/O step of a save, failed and cut: nothing committed is lost, nothing half-done is committed.

A save runs under :class:`faultfs.FaultFS`, the fault-injecting layer over
the one seam (``torchckpt.storage.fs``) every mutating call of a save goes
through. For both formats, sync and async (the layer is installed inside the
writer subprocess), with several writer threads:

- **every step failed**: for each N, the N-th call fails with an errno. The
  save raises :class:`CheckpointIOError` naming rank 0, the operation, the
  path and that errno (or, for a step after the commit point, succeeds);
  the previous checkpoint loads byte-identical; no directory but the
  committed one holds a ``manifest.json``; nothing is left behind; and the
  next save succeeds.
- **power cut at every fsync**: each durable image (only what some fsync
  made durable) holds the old checkpoint or the new one at the path — never
  neither, never a mix — and the new one once ``save`` has returned; every
  directory holding a manifest verifies; and a save into the recovered tree
  succeeds and clears what the crash left.
- **SIGKILL at every step**: the tree as it stood before each step holds
  the old or the new checkpoint, likewise.
- **short writes**: every write writes half of what it is given; the save
  still round-trips exactly.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, hidden_leftovers, reader
from faultfs import WRITE_OPS, FaultFS, Journal, Tree, default_errno, describe, dirs_with, read_tree, write_tree

import torchckpt as tc
from torchckpt.errors import CheckpointIOError, CheckpointNotFoundError
from torchckpt.storage import fs
from torchckpt.format import extents
from torchckpt.verify import verify_checkpoint

#: Small write batches, so that a small state takes several writes on several threads.
BATCH_BYTES = 4096
IO_THREADS = 3
NAME = "ckpt"
WAIT_S = 60.0


def old_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {"w": torch.randn(40, 40, generator=g), "b": torch.zeros(40)},
        "optim": {"state": {0: {"exp_avg": torch.randn(40, 40, generator=g), "step": 3}}, "lr": 0.1},
        "tag": "old",
    }


def new_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    return {
        "model": {
            "w": torch.randn(48, 48, generator=g),
            "b": torch.ones(48),
            "norm": torch.randn(48, generator=g).to(torch.bfloat16),
        },
        "optim": {"state": {0: {"exp_avg": torch.randn(48, 48, generator=g), "step": 4}}, "lr": 0.05},
        "tag": "new",
    }


OLD, NEW = old_state(), new_state()


def loaded_tag(path: str) -> str:
    """``old`` or ``new``, after checking the checkpoint at ``path`` is exactly that state."""
    state, missing = reader().read(path)
    assert missing == []
    tag = state["tag"]
    assert tag in ("old", "new"), f"{path}: unexpected tag {tag!r}"
    assert_state_equal(state, OLD if tag == "old" else NEW)
    return tag


def assert_manifests_verify(root: str, where: str) -> None:
    """Every directory under ``root`` holding a manifest is a complete checkpoint."""
    for rel in dirs_with(read_tree(root), "manifest.json"):
        manifest, problems = verify_checkpoint(os.path.join(root, rel))
        assert manifest is not None and problems == [], f"{where}: {rel or '.'} holds a manifest but {problems}"


# -- how a save runs under the layer: in this process or in the writer subprocess ------


class FaultWriter(tc.CheckpointWriter):
    """A writer that runs one ``write`` under a :class:`FaultFS` when given ``fault=``.

    ``fault`` holds the layer's arguments and the file the journal is written to
    (it goes back to the test process that way: the writer is a subprocess).
    """

    def write(self, path: str, state_dict: Any, fault: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if fault is None:
            super().write(path, state_dict, **kwargs)
            return
        extents.BATCH_BYTES = BATCH_BYTES
        layer = FaultFS(**fault["layer"])
        try:
            with fs.install(layer):
                super().write(path, state_dict, **kwargs)
        finally:
            with open(fault["journal"], "wb") as f:
                pickle.dump(layer.journal, f)


def fault_writer_init(rank_info: tc.RankInfo, fmt: str) -> FaultWriter:
    """``checkpoint_writer_init_fn`` of the async runs."""
    return FaultWriter(tc.CheckpointWriterConfig(format=fmt, io_threads=IO_THREADS), rank_info)


@dataclass
class Outcome:
    error: BaseException | None
    journal: Journal


class Saver:
    """Runs saves under the layer, synchronously or through the async writer."""

    def __init__(self, mode: str, fmt: str, scratch: str) -> None:
        self.mode, self.fmt, self.scratch = mode, fmt, scratch
        self._n = 0
        self.plain: tc.SyncCheckpointer = tc.make_sync_checkpointer(
            tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt, io_threads=IO_THREADS)),
            rank_info=tc.RankInfo(0, 1),
        )
        self.async_ckpt: tc.AsyncCheckpointer | None = None
        if mode == "async":
            self.async_ckpt = tc.make_async_checkpointer(
                rank_info=tc.RankInfo(0, 1),
                checkpoint_writer_init_fn=fault_writer_init,
                checkpoint_writer_init_args={"fmt": fmt},
            )

    def save(self, path: str, state: Any, **layer: Any) -> Outcome:
        """Save ``state`` to ``path`` under a FaultFS over the path's parent."""
        layer.setdefault("root", os.path.dirname(path))
        if self.async_ckpt is None:
            saved_batch = extents.BATCH_BYTES
            extents.BATCH_BYTES = BATCH_BYTES
            fault = FaultFS(**layer)
            try:
                with fs.install(fault):
                    self.plain.save(path, state)
            except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
                return Outcome(e, fault.journal)
            finally:
                extents.BATCH_BYTES = saved_batch
            return Outcome(None, fault.journal)
        self._n += 1
        journal_file = os.path.join(self.scratch, f"journal_{self._n}.pickle")
        stage, write = self.async_ckpt.save(path, state, fault={"layer": layer, "journal": journal_file})
        stage.result(timeout=WAIT_S)
        error = None
        try:
            write.result(timeout=WAIT_S)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            error = e
        with open(journal_file, "rb") as f:
            journal = pickle.load(f)  # noqa: S301 - the test's own record, written just now
        return Outcome(error, journal)

    def close(self) -> None:
        if self.async_ckpt is not None:
            self.async_ckpt.close()


@pytest.fixture(scope="module", params=[(m, f) for m in ("sync", "async") for f in FORMATS], ids=lambda p: "-".join(p))
def saver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saver]:
    mode, fmt = request.param
    s = Saver(mode, fmt, str(tmp_path_factory.mktemp(f"journals-{mode}-{fmt}")))
    yield s
    s.close()


@pytest.fixture
def template(saver: Saver, tmp_path) -> str:
    """A directory holding one committed checkpoint of OLD at ``NAME`` (copied for each run)."""
    root = str(tmp_path / "template")
    os.makedirs(root)
    saver.plain.save(os.path.join(root, NAME), OLD)
    assert hidden_leftovers(root) == []
    return root


def fresh_copy(template: str, dest: str) -> str:
    shutil.copytree(template, dest)
    return os.path.join(dest, NAME)


# -- every step failed -------------------------------------------------------------


def _paths_of(step_path: str) -> list[str]:
    return [p.strip() for p in step_path.replace("<->", "->").split("->")]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "no-exchange"])
def test_every_failed_step_keeps_the_old_checkpoint(saver: Saver, template: str, tmp_path, exchange: bool) -> None:
    clean = saver.save(fresh_copy(template, str(tmp_path / "clean")), NEW, exchange_supported=exchange)
    assert clean.error is None, f"a save without faults failed: {clean.error!r}"
    steps = clean.journal.steps
    ops = {s.op for s in steps}
    assert {"open", "fsync", "rename", "exchange"} <= ops, f"steps seen: {sorted(ops)}"
    assert sum(s.op in WRITE_OPS for s in steps) >= 3, "the data took fewer than 3 writes"

    failed_saves = succeeded_after_commit = 0
    for n in range(len(steps)):
        path = fresh_copy(template, str(tmp_path / f"fail_{n}"))
        root = os.path.dirname(path)
        out = saver.save(path, NEW, fail_at=n, exchange_supported=exchange)
        step = out.journal.failed
        assert step is not None, f"step {n} was never reached (the save took other steps: {out.journal.steps})"
        where = f"step {n} ({step.op} {step.path})"
        if out.error is None:
            # Only a step after the commit point may fail without failing the save.
            assert loaded_tag(path) == "new", where
            succeeded_after_commit += 1
        else:
            failed_saves += 1
            e = out.error
            assert isinstance(e, CheckpointIOError), f"{where}: {type(e).__name__}: {e}"
            expected = default_errno(step.op)
            assert e.errno == expected, f"{where}: errno {e.errno} in {e}"
            assert e.rank == 0 and "rank 0" in str(e), f"{where}: {e}"
            assert e.operation, f"{where}: no operation in {e}"
            assert e.path and any(
                p.startswith(e.path) or e.path.startswith(p.removesuffix(".tmp")) for p in _paths_of(step.path)
            ), f"{where}: the error names {e.path!r}"
            assert e.path in str(e), f"{where}: {e}"
            assert os.strerror(expected) in str(e), f"{where}: {e}"
            assert loaded_tag(path) == "old", where
        assert hidden_leftovers(root) == [], where  # waits for an old generation to be deleted
        assert dirs_with(read_tree(root), "manifest.json") == [NAME], f"{where}:\n{describe(read_tree(root))}"
        saver.plain.save(path, NEW)  # the next save goes through
        assert loaded_tag(path) == "new", where
    assert failed_saves >= len(steps) - 3, f"{failed_saves} of {len(steps)} failed steps failed the save"
    print(f"{saver.mode}/{saver.fmt}: {len(steps)} steps; {failed_saves} failed the save, {succeeded_after_commit} not")


# -- power cut and SIGKILL at every step -------------------------------------------------


def _check_image(image: Tree, dest: str, where: str, *, old_exists: bool, name: str = NAME) -> str:
    """Materialise a crash image; check old-or-new and complete manifests; return what a load of the path gives.

    Without RENAME_EXCHANGE, a crash between an overwrite's two renames leaves the old
    checkpoint at ``.<name>.torchckpt-previous`` only: a load of the path reads it there.
    """
    write_tree(dest, image)
    path = os.path.join(dest, name)
    assert_manifests_verify(dest, where)
    try:
        return loaded_tag(path)
    except CheckpointNotFoundError:
        assert not old_exists, f"{where}: the old checkpoint is gone:\n{describe(image)}"
        return "absent"


def _recover(dest: str, saver: Saver, where: str) -> None:
    """A save into a crashed tree succeeds and leaves nothing of the crash behind."""
    path = os.path.join(dest, NAME)
    saver.plain.save(path, NEW)
    assert loaded_tag(path) == "new", where
    assert hidden_leftovers(dest) == [], f"{where}: {describe(read_tree(dest))}"


@pytest.mark.parametrize("case", ["overwrite", "first", "overwrite-no-exchange"])
def test_power_cut_at_every_fsync_leaves_old_or_new(saver: Saver, template: str, tmp_path, case: str) -> None:
    old_exists = case.startswith("overwrite")
    if old_exists:
        path = fresh_copy(template, str(tmp_path / "run"))
    else:
        os.makedirs(str(tmp_path / "run"))
        path = str(tmp_path / "run" / NAME)
    out = saver.save(path, NEW, process_images=True, exchange_supported=case != "overwrite-no-exchange")
    assert out.error is None, repr(out.error)
    durable = out.journal.durable
    assert len(durable) >= 2, f"only {len(durable)} durable states"

    seen = []
    for i, image in enumerate(durable):
        where = f"power cut after durable state {i} of {len(durable)}"
        dest = str(tmp_path / f"cut_{i}")
        seen.append(_check_image(image, dest, where, old_exists=old_exists))
        _recover(dest, saver, where)
    # Once the new checkpoint is durable it stays; and it is durable when save() returns.
    first_new = seen.index("new")
    assert all(t == "new" for t in seen[first_new:]), seen
    assert seen[-1] == "new", "save() returned before the new checkpoint was durable"
    assert seen[0] == ("old" if old_exists else "absent"), seen

    for kind, images in (("SIGKILL", out.journal.process), ("metadata-only cut", out.journal.metadata)):
        states = []
        for i, image in enumerate(images):
            step = out.journal.steps[i]
            where = f"{kind} before step {i} ({step.op} {step.path})"
            states.append(_check_image(image, str(tmp_path / f"{kind[:4]}_{i}"), where, old_exists=old_exists))
        assert len(states) == len(out.journal.steps)
        assert states[0] == ("old" if old_exists else "absent"), (kind, states)
        first_new = states.index("new")  # the last steps come after the swap
        assert all(t == "new" for t in states[first_new:]), (kind, states)
        if kind == "metadata-only cut" and not old_exists:
            _recover(str(tmp_path / f"{kind[:4]}_{first_new - 1}"), saver, where)
    print(f"{saver.mode}/{saver.fmt}: durable states {seen} over {len(out.journal.steps)} steps")


def test_power_cut_keeps_every_directory_the_save_created(saver: Saver, tmp_path) -> None:
    """``save(run/a/b/ckpt)`` creates ``a`` and ``a/b``: each is fsynced into its parent before the commit."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    rel = os.path.join("a", "b", NAME)
    out = saver.save(os.path.join(run, rel), NEW, root=run, process_images=True)
    assert out.error is None, repr(out.error)
    mkdirs = [s.path for s in out.journal.steps if s.op == "mkdir"]
    assert mkdirs[:2] == [os.path.join(run, "a"), os.path.join(run, "a", "b")], mkdirs
    seen = []
    for i, image in enumerate(out.journal.durable):
        where = f"power cut after durable state {i} of {len(out.journal.durable)}"
        seen.append(_check_image(image, str(tmp_path / f"cut_{i}"), where, old_exists=False, name=rel))
    assert seen[0] == "absent" and seen[-1] == "new", f"{seen}: save() returned before its directories were durable"
    first_new = seen.index("new")
    assert all(t == "new" for t in seen[first_new:]), seen


def test_a_managers_root_is_durable_once_a_step_is_committed(tmp_path) -> None:
    """The directories a manager creates for its root are fsynced into their parents too."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    layer = FaultFS(run)
    with fs.install(layer):
        with tc.CheckpointManager(os.path.join(run, "x", "y"), async_save=False) as mgr:
            mgr.save(1, NEW)
    image = layer.journal.durable[-1]
    assert _check_image(image, str(tmp_path / "cut"), "power cut after the save", old_exists=False,
                        name=os.path.join("x", "y", "step_0000000001")) == "new", describe(image)  # fmt: skip


# -- short writes ------------------------------------------------------------------


def test_short_writes_still_round_trip(saver: Saver, template: str, tmp_path) -> None:
    full = saver.save(fresh_copy(template, str(tmp_path / "full")), NEW)
    path = fresh_copy(template, str(tmp_path / "short"))
    short = saver.save(path, NEW, short_writes=True)
    assert short.error is None, repr(short.error)
    assert loaded_tag(path) == "new"
    manifest, problems = verify_checkpoint(path)
    assert problems == []

    def writes(j: Journal) -> int:
        return sum(s.op in WRITE_OPS for s in j.steps)

    # Each shortened write is followed by one for the rest: at least twice as many calls.
    assert writes(short.journal) >= 2 * writes(full.journal), (writes(short.journal), writes(full.journal))


def test_install_routes_every_mutating_call_and_restores_the_real_layer(tmp_path) -> None:
    before = fs.active()
    layer = FaultFS(str(tmp_path))
    with fs.install(layer):
        assert fs.active() is layer
        fd = fs.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT)
        fs.pwritev(fd, [memoryview(b"ab"), memoryview(b"cd")], 0)
        fs.write(fd, b"e")
        fs.fsync(fd)
        fs.close(fd)
        fs.makedirs(str(tmp_path / "d" / "e"))
        fs.rename(str(tmp_path / "f"), str(tmp_path / "d" / "g"))
        fs.fsync_dir(str(tmp_path / "d"))
        fs.unlink(str(tmp_path / "d" / "g"))
    assert fs.active() is before
    assert [s.op for s in layer.journal.steps] == [
        "open", "pwritev", "write", "fsync", "mkdir", "mkdir", "rename", "open", "fsync", "unlink",
    ]  # fmt: skip
    assert [s.path for s in layer.journal.steps][:2] == [str(tmp_path / "f")] * 2
    # The durable image: f's bytes once fsynced, but no new directory entry (the root was never fsynced).
    assert layer.journal.durable[0] == {}
    assert layer.journal.durable[-1] == {}
    with open(tmp_path / "f2", "wb"):
        pass
    assert read_tree(str(tmp_path)) == {"d": {"e": {}}, "f2": b""}


@pytest.mark.parametrize("op", ["pwritev", "fsync", "rename"])
def test_the_layer_fails_the_nth_call_of_a_kind(tmp_path, op: str) -> None:
    a, b, c = (str(tmp_path / n) for n in "abc")
    calls: dict[str, list[Callable[[int], object]]] = {
        "pwritev": [lambda fd: fs.pwritev(fd, [memoryview(b"x")], 0)] * 2,
        "fsync": [fs.fsync] * 2,
        "rename": [lambda fd: fs.rename(a, b), lambda fd: fs.rename(b, c)],
    }
    layer = FaultFS(str(tmp_path), fail_at=1, fail_ops=[op], errno=errno.EIO)
    with fs.install(layer):
        fd = fs.open(a, os.O_WRONLY | os.O_CREAT)
        fs.write(fd, b"y")  # another kind: not counted
        calls[op][0](fd)
        with pytest.raises(OSError) as info:
            calls[op][1](fd)
        fs.close(fd)
    assert info.value.errno == errno.EIO
    assert layer.journal.failed is not None and layer.journal.failed.op == op
    assert layer.journal.failed.number == 3
    assert os.path.exists(b if op == "rename" else a)  # the failed call did not happen
