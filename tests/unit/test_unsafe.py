"""Values without a safe form are refused at save time; pickle is an explicit opt-in on both sides."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from ckpt_testutil import FORMATS, assert_state_equal, checkpointer, reader

from torchckpt.errors import CheckpointError, UnsafeObjectError


class Thing:
    """A picklable class instance (module level)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thing) and other.x == self.x


UNSAFE: dict[str, tuple[Any, str]] = {
    "instance": (Thing(3), "Thing"),
    "lambda": (lambda x: x, "function"),
    "set": ({1, 2}, "builtins.set"),
    "ndarray": (np.arange(3), "numpy.ndarray"),
    "frozenset": (frozenset({1}), "builtins.frozenset"),
    "class": (Thing, "builtins.type"),
    "complex": (1 + 2j, "builtins.complex"),
}


def _leftovers(parent: str) -> list[str]:
    from ckpt_testutil import hidden_leftovers

    return hidden_leftovers(parent)


@pytest.mark.parametrize("kind", sorted(UNSAFE))
@pytest.mark.parametrize("fmt", FORMATS)
def test_unsafe_value_is_refused_at_save_time(fmt: str, kind: str, tmp_path) -> None:
    value, type_name = UNSAFE[kind]
    path = str(tmp_path / "ckpt")
    with pytest.raises(UnsafeObjectError) as info:
        checkpointer(fmt).save(path, {"model": {"w": torch.ones(2)}, "extra": {"items": [1, value]}})
    err = info.value
    assert isinstance(err, TypeError) and isinstance(err, CheckpointError)
    assert err.key == "extra.items[1]"
    assert type_name in err.type_name
    assert "'extra.items[1]'" in str(err) and type_name in str(err)
    assert "allow_pickle" in str(err)
    assert not os.path.exists(os.path.join(path, "manifest.json"))
    assert not os.path.exists(path)
    assert _leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_refused_save_leaves_the_previous_checkpoint(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    ck = checkpointer(fmt)
    good = {"w": torch.arange(5.0)}
    ck.save(path, good)
    with pytest.raises(UnsafeObjectError):
        ck.save(path, {"w": torch.zeros(5), "bad": {3}})
    assert_state_equal(ck.load(path), good)
    assert _leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_unsafe_dict_key_and_tensor_subclass_are_refused(fmt: str, tmp_path) -> None:
    class MyTensor(torch.Tensor):
        pass

    ck = checkpointer(fmt)
    with pytest.raises(UnsafeObjectError, match="frozenset"):
        ck.save(str(tmp_path / "a"), {"d": {frozenset({1}): 1}})
    with pytest.raises(UnsafeObjectError, match="'sub'") as info:
        ck.save(str(tmp_path / "b"), {"sub": torch.ones(2).as_subclass(MyTensor)})
    assert info.value.key == "sub"
    with pytest.raises(UnsafeObjectError, match="'sp'") as info:
        ck.save(str(tmp_path / "c"), {"sp": torch.eye(2).to_sparse()})
    assert sorted(os.listdir(tmp_path)) == [n for n in sorted(os.listdir(tmp_path)) if n.startswith(".")]


PICKLABLE = {
    "instance": Thing(7),
    "set": {1, 2, 3},
    "ndarray": np.arange(6, dtype=np.int32).reshape(2, 3),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_allow_pickle_saves_and_load_needs_allow_pickle(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    state = {"w": torch.arange(4), "extra": dict(PICKLABLE)}
    checkpointer(fmt, allow_pickle=True).save(path, state)
    assert os.path.exists(os.path.join(path, "manifest.json"))

    with pytest.raises(UnsafeObjectError) as info:
        reader().read(path)
    assert "allow_pickle" in str(info.value) and path in str(info.value)
    if fmt == "safetensors":
        assert info.value.key.startswith("extra.")  # the native layout names the key

    with pytest.raises(UnsafeObjectError):
        checkpointer(fmt).load(path)  # a checkpointer without allow_pickle refuses too

    loaded, missing = reader().read(path, allow_pickle=True)
    assert missing == []
    assert torch.equal(loaded["w"], torch.arange(4))
    assert loaded["extra"]["instance"] == Thing(7)
    assert loaded["extra"]["set"] == {1, 2, 3}
    assert np.array_equal(loaded["extra"]["ndarray"], PICKLABLE["ndarray"])
    assert loaded["extra"]["ndarray"].dtype == np.int32
    # the reader's own option works too, and a checkpointer built with allow_pickle loads it
    assert reader(allow_pickle=True).read(path)[0]["extra"]["instance"] == Thing(7)
    assert checkpointer(fmt, allow_pickle=True).load(path)["extra"]["set"] == {1, 2, 3}


@pytest.mark.parametrize("fmt", FORMATS)
def test_allow_pickle_still_refuses_what_pickle_cannot_store(fmt: str, tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    with pytest.raises(UnsafeObjectError, match=r"'fn'") as info:
        checkpointer(fmt, allow_pickle=True).save(path, {"fn": lambda: 1})
    assert "function" in info.value.type_name
    assert not os.path.exists(os.path.join(path, "manifest.json"))
