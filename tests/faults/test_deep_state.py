"""What commits must load: states nested to the limit round-trip, deeper or cyclic ones are refused at save.

A state nests at most ``MAX_DEPTH`` containers. One nested deeper, or one that contains itself, is
refused by ``save()`` before a byte is written, naming the key; one nested to the limit saves and loads
in both layouts, sync and async, also when the caller's own stack is already deep. A manifest whose
tree nests deeper than any save writes is a :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, checkpointer, hidden_leftovers, reader

import torchckpt as tc
from torchckpt.errors import ConfigError, CorruptCheckpointError, UnsafeObjectError
from torchckpt.format.manifest import seal_manifest
from torchckpt.format.tree import MAX_DEPTH
from torchckpt.manager import CheckpointManager

pytestmark = pytest.mark.timeout(240)

T = TypeVar("T")


def nested(depth: int) -> tuple[dict[str, Any], str]:
    """A state nesting ``depth`` containers (dict, list, tuple, OrderedDict in turn) and the key of its tensor."""
    value: Any = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    keys: list[str] = []
    for level in range(depth - 1, 0, -1):
        kind = level % 4
        if kind == 0:
            value, key = {"d": value, "n": level}, ".d"
        elif kind == 1:
            value, key = [level, value], "[1]"
        elif kind == 2:
            value, key = (value,), "[0]"
        else:
            value, key = OrderedDict(o=value), ".o"
        keys.append(key)
    state = {"root": value, "step": 3}
    return state, "root" + "".join(reversed(keys))


def depth_of(value: Any) -> int:
    """Containers nested in ``value``, itself counted (iterative: the state may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in v)
    return deepest


def on_deep_stack(fn: Callable[[], T], spare_frames: int = 60) -> T:
    """Run ``fn`` with only ``spare_frames`` frames left below the recursion limit."""
    target = sys.getrecursionlimit() - spare_frames

    def descend(level: int) -> T:
        if _depth() < target:
            return descend(level + 1)
        return fn()

    return descend(0)


def _depth() -> int:
    n, f = 0, sys._getframe()
    while f is not None:
        n, f = n + 1, f.f_back
    return n


def test_the_nested_helper_nests_as_asked() -> None:
    for depth in (2, 5, MAX_DEPTH, MAX_DEPTH + 1):
        state, key = nested(depth)
        assert depth_of(state) == depth
        assert key.count(".") + key.count("[") == depth - 1


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH])
@pytest.mark.parametrize("fmt", FORMATS)
def test_state_nested_to_the_limit_round_trips(fmt: str, depth: int, tmp_path) -> None:
    state, _ = nested(depth)
    path = str(tmp_path / "ckpt")
    checkpointer(fmt).save(path, state)
    assert_state_equal(reader().read(path)[0], state)
    template, _ = nested(depth)
    template_tensors = [t for t in _tensors(template)]
    for t in template_tensors:
        t.zero_()
    loaded = checkpointer(fmt).load(path, template)
    assert_state_equal(loaded, state)
    assert all(torch.equal(t, torch.arange(6, dtype=torch.float32).reshape(2, 3)) for t in template_tensors)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_nested_to_the_limit_round_trips_async(fmt: str, tmp_path) -> None:
    state, _ = nested(MAX_DEPTH)
    path = str(tmp_path / "ckpt")
    config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
    ckpt = tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))
    try:
        futures = ckpt.save(path, state)
        assert futures is not None
        futures[1].result(timeout=120)
        assert_state_equal(ckpt.load(path), state)
    finally:
        ckpt.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_nested_past_the_limit_is_refused_at_save_naming_the_key(fmt: str, tmp_path) -> None:
    for depth in (MAX_DEPTH + 1, 3 * MAX_DEPTH):
        state, key = nested(depth)
        # the container that would be the (MAX_DEPTH+1)-th: its key path has MAX_DEPTH - 1 steps below "root"
        steps = _key_steps(key)
        where = "root" + "".join(steps[: MAX_DEPTH - 1])
        path = str(tmp_path / f"ckpt{depth}")
        with pytest.raises(UnsafeObjectError) as info:
            checkpointer(fmt).save(path, state)
        assert info.value.key == where
        assert f"key {where!r}" in str(info.value)
        assert f"more than {MAX_DEPTH} deep" in str(info.value)
        assert not os.path.exists(path)
        assert hidden_leftovers(str(tmp_path)) == []


def _key_steps(key: str) -> list[str]:
    steps, rest = [], key[len("root") :]
    while rest:
        end = min(i for i in (rest.find(".", 1), rest.find("[", 1), len(rest)) if i > 0)
        steps.append(rest[:end])
        rest = rest[end:]
    return steps


def _cyclic_dict() -> tuple[Any, str, str]:
    inner: dict[str, Any] = {"w": torch.ones(2)}
    state = {"model": {"layers": [inner]}, "step": 1}
    inner["again"] = state["model"]
    return state, "model.layers[0].again", "model"


def _cyclic_list() -> tuple[Any, str, str]:
    items: list[Any] = [torch.ones(2), 5]
    items.append({"back": items})
    return {"opt": {"items": items}}, "opt.items[2].back", "opt.items"


@pytest.mark.parametrize("make", [_cyclic_dict, _cyclic_list], ids=["dict", "list"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cyclic_state_is_refused_at_save_naming_the_key(fmt: str, make: Callable[[], Any], tmp_path) -> None:
    state, key, target = make()
    path = str(tmp_path / "ckpt")
    with pytest.raises(UnsafeObjectError) as info:
        checkpointer(fmt).save(path, state)
    assert info.value.key == key
    assert f"key {key!r}" in str(info.value)
    assert f"a cycle back to the {type(_lookup(state, target)).__name__} at key {target!r}" in str(info.value)
    assert not os.path.exists(path)
    with pytest.raises(UnsafeObjectError, match="contains itself"):
        checkpointer(fmt, allow_pickle=True).save(path, state)  # pickle does not make a cycle saveable


def _lookup(state: Any, key: str) -> Any:
    for part in key.replace("[", ".[").split("."):
        state = state[int(part[1:-1])] if part.startswith("[") else state[part]
    return state


def test_a_shared_subtree_is_not_a_cycle(tmp_path) -> None:
    shared = {"w": torch.ones(2), "lr": 0.1}
    state = {"a": shared, "b": [shared, shared], "c": (shared,)}
    path = str(tmp_path / "ckpt")
    for fmt in FORMATS:
        checkpointer(fmt).save(path, state)
        assert_state_equal(reader().read(path)[0], state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_and_load_from_a_deep_stack(fmt: str, tmp_path) -> None:
    state, _ = nested(MAX_DEPTH)
    path = str(tmp_path / "ckpt")
    ckpt = checkpointer(fmt)
    on_deep_stack(lambda: ckpt.save(path, state))
    loaded = on_deep_stack(lambda: ckpt.load(path))
    assert_state_equal(loaded, state)
    template, _ = nested(MAX_DEPTH)
    on_deep_stack(lambda: ckpt.load(path, template))
    assert_state_equal(template, state)
    with CheckpointManager(str(tmp_path / "root"), checkpointer=ckpt, async_save=False) as mgr:
        on_deep_stack(lambda: mgr.save(1, state))
        step, loaded = on_deep_stack(lambda: mgr.load())
    assert step == 1
    assert_state_equal(loaded, state)


def test_manifest_nested_deeper_than_the_limit_is_corrupt(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(path, {"w": torch.ones(2), "meta": {"a": 1}})
    manifest = os.path.join(path, "manifest.json")
    with open(manifest, "rb") as f:
        doc = json.loads(f.read())
    tree = doc["ranks"][0]["tree"]
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = {"list": [deep]}
    tree["dict"][1][1] = deep  # "meta" now nests MAX_DEPTH + 1 containers, with the state itself
    with open(manifest, "wb") as f:
        f.write(seal_manifest(doc))
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path)
    assert f"more than {MAX_DEPTH} deep" in str(info.value)
    assert "'meta" in str(info.value)
    assert info.value.file == "manifest.json"
    # far deeper than the JSON parser can go: refused the same way, whatever the stack
    for depth in (5_000, 200_000):
        body = b'{"torchckpt_format":1,"x":' + b"[" * depth + b"]" * depth + b"}"
        with open(manifest, "wb") as f:
            f.write(_seal_raw(body))
        with pytest.raises(CorruptCheckpointError, match="nested too deeply"):
            reader().read(path)
    # the metadata is held to the same limit as the tree
    checkpointer("safetensors").save(path, {"w": torch.ones(2)})
    with open(manifest, "rb") as f:
        doc = json.loads(f.read())
    meta: Any = 1
    for _ in range(MAX_DEPTH + 1):
        meta = {"m": meta}
    doc["metadata"] = {"user": meta}
    with open(manifest, "wb") as f:
        f.write(seal_manifest(doc))
    with pytest.raises(CorruptCheckpointError, match=f"more than {MAX_DEPTH} deep"):
        reader().read(path)


def _seal_raw(body: bytes) -> bytes:
    """``body`` (a JSON object's bytes) sealed as a manifest, without parsing it."""
    from torchckpt.format.extents import checksum

    rest = body[1:]
    return b'{"manifest_crc32c":"%08x",' % checksum(rest) + rest


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_nested_past_the_limit_is_refused_at_save(fmt: str, tmp_path) -> None:
    meta: Any = 1
    for _ in range(MAX_DEPTH):
        meta = {"m": meta}
    path = str(tmp_path / "ckpt")
    with pytest.raises(ConfigError) as info:
        checkpointer(fmt).save(path, {"w": torch.ones(2)}, metadata={"run": meta})
    assert info.value.field == "metadata"
    message = str(info.value)
    assert "metadata" in message and "'run" in message and f"more than {MAX_DEPTH} deep" in message
    assert not os.path.exists(path)
    ok: Any = 1
    for _ in range(MAX_DEPTH - 2):
        ok = {"m": ok}
    checkpointer(fmt).save(path, {"w": torch.ones(2)}, metadata={"run": ok})
    assert depth_of(reader().read(path)[0]) == 1


def _tensors(obj: Any) -> list[torch.Tensor]:
    out, todo = [], [obj]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return out


def _all_dicts(depth: int) -> dict[str, Any]:
    state: dict[str, Any] = {"w": torch.ones(2)}
    for _ in range(depth - 1):
        state = {"k": state}
    return state


def test_the_manager_refuses_a_cyclic_state_and_saves_a_deep_one_from_a_deep_stack(tmp_path) -> None:
    model = torch.nn.Linear(2, 2)
    state: dict[str, Any] = {"model": model, "extra": {"n": 1}}
    state["extra"]["back"] = state
    with CheckpointManager(str(tmp_path / "root"), async_save=False) as mgr:
        with pytest.raises(UnsafeObjectError, match="contains itself") as info:
            mgr.save(1, state)
        assert info.value.key is not None and info.value.key.startswith("extra.back")
        deep = _all_dicts(MAX_DEPTH)
        on_deep_stack(lambda: mgr.save(2, deep))
        step, loaded = on_deep_stack(lambda: mgr.load())
    assert step == 2
    assert_state_equal(loaded, deep)
