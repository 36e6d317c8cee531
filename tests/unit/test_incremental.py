"""Incremental saves (CheckpointManager(incremental=True)): unchanged tensors refer to an earlier step's file."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from ckpt_testutil import NATIVE_FILE, assert_state_equal, flip_bit, reader

import torchckpt as tc
from torchckpt.errors import CheckpointExistsError, ConfigError, CorruptCheckpointError
from torchckpt.format.manifest import MANIFEST_NAME, parse_manifest, seal_manifest
from torchckpt.prune import plan_prune, prune
from torchckpt.reading import read_manifest
from torchckpt.retention import KeepLast
from torchckpt.tools import export
from torchckpt.verify import verify_checkpoint

pytestmark = pytest.mark.timeout(120)

FROZEN = 1 << 20  # elements (4 MiB of float32)
TRAIN = 4096


def _frozen() -> torch.Tensor:
    return torch.randn(FROZEN, generator=torch.Generator().manual_seed(7))


def _state(step: int, frozen: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 + step)
    train = torch.randn(TRAIN, generator=g)
    return {"model": {"frozen": frozen, "lora": train}, "optim": {"m": train * 0.5, "v": train * train}, "step": step}


def _clone(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj.clone() if isinstance(obj, torch.Tensor) else obj


def _size(root: str, step: int) -> int:
    return os.path.getsize(os.path.join(root, f"step_{step:010d}", NATIVE_FILE))


def _manager(root: str, **kw: Any) -> tc.CheckpointManager:
    kw.setdefault("async_save", False)
    return tc.CheckpointManager(root, incremental=True, **kw)


def _load(root: str, step: int) -> dict[str, Any]:
    with tc.CheckpointManager(root, async_save=False) as m:
        return m.load(step=step)[1]


def test_steps_round_trip_and_hold_only_the_changed_bytes(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    saved = {}
    with _manager(root) as m:
        for step in range(4):
            saved[step] = _clone(_state(step, frozen))
            m.save(step, _state(step, frozen))
    changed = 3 * TRAIN * 4
    assert _size(root, 0) == 4096 + FROZEN * 4 + changed
    for step in (1, 2, 3):
        assert _size(root, step) == 4096 + changed  # the header's block and the changed tensors, nothing else
        assert_state_equal(_load(root, step), saved[step])
    assert_state_equal(_load(root, 0), saved[0])
    entry = read_manifest(os.path.join(root, "step_0000000003")).ranks[0]
    assert [r.checkpoint for r in entry.refs] == ["../step_0000000000"]  # the chain collapses onto the holder
    frozen_entry = next(t for t in entry.tensors if t.name == "model.frozen")
    assert frozen_entry.ref == 0 and len(frozen_entry.xxh3) == 32
    assert all(t.ref is None for t in entry.tensors if t.name != "model.frozen")


def test_a_flipped_bit_in_a_frozen_tensor_is_saved(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        flipped = frozen.clone()
        flipped.view(torch.int32)[12345] ^= 1 << 3  # one bit
        m.save(1, _state(1, flipped))
    assert _size(root, 1) == _size(root, 0)  # written again, whole
    assert read_manifest(os.path.join(root, "step_0000000001")).ranks[0].refs == ()
    loaded = _load(root, 1)
    assert torch.equal(loaded["model"]["frozen"].view(torch.int32), flipped.view(torch.int32))
    assert not torch.equal(loaded["model"]["frozen"], frozen)


def test_a_changed_dtype_or_shape_is_written_again(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, {"a": frozen})
        m.save(1, {"a": frozen.view(2, -1)})  # same bytes, another shape
        m.save(2, {"a": frozen.view(torch.int32)})  # same bytes, another dtype
    assert _size(root, 1) == _size(root, 2) == _size(root, 0)
    assert torch.equal(_load(root, 2)["a"], frozen.view(torch.int32))


def test_retention_keeps_a_referenced_step_until_nothing_refers_to_it(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root, keep=[KeepLast(1)]) as m:
        for step in range(3):
            m.save(step, _state(step, frozen))
        assert m.steps() == [0, 2]  # 1 deleted; 0 holds the frozen bytes step 2 refers to
        other = frozen + 1
        m.save(3, _state(3, other))  # everything changed: step 3 is whole
        assert m.steps() == [3]
        m.save(4, _state(4, other))
        assert m.steps() == [3, 4]  # nothing refers to 0 or 2 any more
        expected = _clone(_state(4, other))
    assert_state_equal(_load(root, 4), expected)


def test_gc_never_deletes_a_referenced_step(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        for step in range(3):
            m.save(step, _state(step, frozen))
    plan = plan_prune(root, [KeepLast(1)])
    assert [c.step for c in plan.steps] == [1]
    result = prune(plan)
    assert result.steps == [1] and not result.failures
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_0000000000", "step_0000000002"]
    assert_state_equal(_load(root, 2), _clone(_state(2, frozen)))


def test_a_corrupt_base_fails_the_load_naming_the_referenced_file(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
    base = os.path.join(root, "step_0000000000", NATIVE_FILE)
    frozen_offset = read_manifest(os.path.dirname(base)).ranks[0].tensors[0].offset
    flip_bit(base, frozen_offset + 1000)
    with pytest.raises(CorruptCheckpointError) as info:
        tc.CheckpointManager(root, async_save=False).load(step=1, fallback=False)
    assert info.value.file == NATIVE_FILE
    assert "step_0000000000" in str(info.value) and "checksum mismatch" in str(info.value)
    # verify names the referenced file too
    _, problems = verify_checkpoint(os.path.join(root, "step_0000000001"))
    assert [(p.file, p.key) for p in problems] == [(f"../step_0000000000/{NATIVE_FILE}", "model.frozen")]


def test_a_deleted_base_fails_the_load_clearly(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
    os.unlink(os.path.join(root, "step_0000000000", MANIFEST_NAME))
    with pytest.raises(CorruptCheckpointError, match=r"step_0000000000/rank_00000\.safetensors, which .* is missing"):
        reader().read(os.path.join(root, "step_0000000001"))


def test_verify_and_export_follow_references(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
    step1 = os.path.join(root, "step_0000000001")
    manifest, problems = verify_checkpoint(step1)
    assert manifest is not None and problems == []
    out = str(tmp_path / "out.safetensors")
    export(step1, out, fmt="safetensors")
    from safetensors.torch import load_file

    loaded = load_file(out)
    assert torch.equal(loaded["model.frozen"], frozen)
    assert torch.equal(loaded["model.lora"], _state(1, frozen)["model"]["lora"])


def _tamper(path: str, edit: Any) -> None:
    mf = os.path.join(path, MANIFEST_NAME)
    with open(mf, "rb") as f:
        doc = json.loads(f.read())
    edit(doc)
    doc.pop("manifest_crc32c")
    with open(mf, "wb") as f:
        f.write(seal_manifest(doc))


@pytest.mark.parametrize("target", ["../../elsewhere", "/abs/step", "step_0000000000", "../a/b", "../.."])
def test_a_reference_out_of_the_root_is_refused(tmp_path, target: str) -> None:
    root = str(tmp_path / "root")
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
    step1 = os.path.join(root, "step_0000000001")

    def edit(doc: dict[str, Any]) -> None:
        doc["ranks"][0]["refs"][0]["checkpoint"] = target

    _tamper(step1, edit)
    with pytest.raises(CorruptCheckpointError) as info:
        read_manifest(step1)
    assert info.value.file == MANIFEST_NAME and "refs[0]" in str(info.value)


def test_a_reference_outside_the_referenced_file_is_refused() -> None:
    doc = {
        "torchckpt_format": 2, "layout": "safetensors", "world_size": 1, "created_unix_s": 0.0,
        "checksum": {"algorithm": "crc32c", "chunk_bytes": 16 << 20}, "metadata": {}, "stats": {},
        "meshes": [], "sharded": [],
        "ranks": [{
            "rank": 0, "file": NATIVE_FILE, "size_bytes": 4096, "digest": "crc32c:00000000", "data_offset": 4096,
            "tree": {"T": 0},
            "refs": [{"checkpoint": "../step_0000000000", "file": NATIVE_FILE, "size_bytes": 5000,
                      "digest": "crc32c:00000000"}],
            "tensors": [{"name": "a", "dtype": "float32", "shape": [1024], "offset": 4096, "nbytes": 4096,
                         "crc32c": [0], "device": "cpu", "ref": 0}],
        }],
    }  # fmt: skip
    with pytest.raises(ValueError, match="lies outside the referenced file"):
        parse_manifest(seal_manifest(doc))
    doc["ranks"][0]["tensors"][0]["ref"] = 1
    with pytest.raises(ValueError, match=r"refers to refs\[1\] of 1"):
        parse_manifest(seal_manifest(doc))


def test_a_referenced_step_cannot_be_overwritten(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
        with pytest.raises(CheckpointExistsError, match=r"steps \[1\] refer to its files"):
            m.save(0, _state(0, frozen), overwrite=True)
        m.save(1, _state(5, frozen), overwrite=True)  # nothing refers to 1: replaced, still referring to 0
    assert_state_equal(_load(root, 1), _clone(_state(5, frozen)))


def test_torch_save_layout_is_refused() -> None:
    with pytest.raises(ConfigError, match="incremental=True needs the safetensors layout") as info:
        tc.CheckpointManager("/nonexistent-never-created", format="torch_save", incremental=True, async_save=False)
    assert info.value.field == "incremental"


def test_async_manager_saves(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    saved = {}
    with _manager(root, async_save=True) as m:
        for step in range(3):
            saved[step] = _clone(_state(step, frozen))
            m.save(step, _state(step, frozen))
        m.wait()
    assert _size(root, 2) == 4096 + 3 * TRAIN * 4
    for step in range(3):
        assert_state_equal(_load(root, step), saved[step])


def test_without_incremental_nothing_is_referenced(tmp_path) -> None:
    root = str(tmp_path)
    frozen = _frozen()
    with tc.CheckpointManager(root, async_save=False) as m:
        m.save(0, _state(0, frozen))
        m.save(1, _state(1, frozen))
    assert _size(root, 1) == _size(root, 0)
    entry = read_manifest(os.path.join(root, "step_0000000001")).ranks[0]
    assert entry.refs == () and all(t.xxh3 == "" for t in entry.tensors)
    with _manager(root) as m:  # a step without digests is no base: a full save, with digests
        m.save(2, _state(2, frozen))
        m.save(3, _state(3, frozen))
    assert _size(root, 2) == _size(root, 0) and _size(root, 3) == 4096 + 3 * TRAIN * 4


def test_a_fresh_load_reads_a_referenced_tensor_from_its_own_file_where_offsets_overlap(tmp_path) -> None:
    # "small" is unchanged and lies at the same offset in step 0's file as the changed "big" in step 1's:
    # a fresh load must read it from step 0's file, never view step 1's bytes at that offset.
    root = str(tmp_path)
    small = torch.arange(256, dtype=torch.float64)
    states = [{"small": small, "big": torch.full((8192,), float(step), dtype=torch.float32)} for step in range(2)]
    with _manager(root) as m:
        for step in range(2):
            m.save(step, states[step])
    entry = read_manifest(os.path.join(root, "step_0000000001")).ranks[0]
    by_name = {t.name: t for t in entry.tensors}
    assert by_name["small"].ref == 0 and by_name["big"].ref is None
    assert by_name["small"].offset == by_name["big"].offset == 4096  # the same place in two files
    loaded = _load(root, 1)
    assert torch.equal(loaded["small"], small) and torch.equal(loaded["big"], states[1]["big"])


def test_ls_names_the_steps_an_incremental_step_refers_to(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchckpt.cli import main

    root = str(tmp_path)
    frozen = _frozen()
    with _manager(root) as m:
        for step in (0, 1, 2):
            m.save(step, _state(step, frozen))
    assert main(["ls", root, "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    assert [rows[s]["refs"] for s in (0, 1, 2)] == [[], ["step_0000000000"], ["step_0000000000"]]
    assert rows[1]["size_bytes"] == _size(root, 1) < _size(root, 0)  # its own file only
    assert main(["ls", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["refers_to", "status"]
    assert [line.split()[-2] for line in lines[1:]] == ["-", "0", "0"]
