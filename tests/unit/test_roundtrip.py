"""Round trips through both layouts: every dtype bit for bit, structure and plain values exactly,
templates filled in place, and files that other readers (safetensors, torch.load) understand."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import OrderedDict
from typing import Any

import pytest
import torch
from ckpt_testutil import (
    ALL_DTYPES,
    FORMATS,
    NATIVE_FILE,
    TORCH_SAVE_FILE,
    assert_state_equal,
    checkpointer,
    iter_tensors,
    map_tensors,
    random_tensor,
    reader,
    scrambled_like,
    tensor_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchckpt as tc
from torchckpt.errors import CheckpointError, MissingKeysError, StateDictMismatchError

EXPECTED_DTYPES = {
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "bfloat16",
    "float32", "float64", "complex32", "complex64", "complex128", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
}  # fmt: skip


def _dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def test_every_cpu_dtype_is_covered() -> None:
    # torch 2.13 can build all of them on the CPU; a silently shorter list would weaken every test below.
    assert {_dtype_id(d) for d in ALL_DTYPES} == EXPECTED_DTYPES


def _dtype_state(dtype: torch.dtype, seed: int) -> dict[str, Any]:
    base = random_tensor(dtype, (6, 10), seed)
    return {
        "plain": random_tensor(dtype, (3, 5), seed + 1),
        "scalar": random_tensor(dtype, (), seed + 2),
        "empty": random_tensor(dtype, (0, 4), seed + 3),
        "empty1d": random_tensor(dtype, (0,), seed + 4),
        "transposed": base.t(),
        "stepped": base[::2, 1::3],
        "big": random_tensor(dtype, (1000,), seed + 5),
    }


def _template_for(state: Any) -> Any:
    """Targets full of other bytes; non-contiguous targets where the source was non-contiguous."""

    def target(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and not t.is_contiguous():
            return scrambled_like(t.t()).t()  # a transposed view: filled through a copy
        return scrambled_like(t)

    return map_tensors(state, target)


@pytest.mark.parametrize("use_template", [False, True], ids=["no_template", "template"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_all_dtypes_round_trip_bitwise(fmt: str, use_template: bool, tmp_path) -> None:
    state = {_dtype_id(d): _dtype_state(d, 10 * i) for i, d in enumerate(ALL_DTYPES)}
    ck = checkpointer(fmt)
    path = str(tmp_path / "c")
    ck.save(path, state)
    assert os.path.exists(os.path.join(path, "manifest.json"))
    if use_template:
        template = _template_for(state)
        targets = iter_tensors(template)
        ptrs = [t.data_ptr() for t in targets]
        loaded = ck.load(path, template, strict=True)
        assert loaded is template
        got = iter_tensors(loaded)
        assert all(a is b for a, b in zip(got, targets)), "template tensors must be filled in place"
        assert [t.data_ptr() for t in got] == ptrs
        assert not loaded["float32"]["transposed"].is_contiguous()
    else:
        loaded = ck.load(path)
    assert_state_equal(loaded, state)
    # the nan / -0.0 bit patterns really are in there (the comparison is by bytes, not by value)
    assert tensor_bytes(loaded["float8_e8m0fnu"]["big"]) == tensor_bytes(state["float8_e8m0fnu"]["big"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_float_values_survive(fmt: str, ckpt_path: str) -> None:
    t = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-45, -3.0e38])
    nan_payload = torch.tensor([0x7FC00001, 0xFFC12345 - 2**32], dtype=torch.int32).view(torch.float32)
    state = {"t": t, "payload": nan_payload, "bf": t.to(torch.bfloat16), "h": t.to(torch.float16)}
    ck = checkpointer(fmt)
    ck.save(ckpt_path, state)
    loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, state)
    assert loaded["payload"].view(torch.int32).tolist() == [0x7FC00001, 0xFFC12345 - 2**32]
    assert math.copysign(1.0, loaded["t"][1].item()) == -1.0


@pytest.mark.parametrize("fmt", FORMATS)
def _odd_strides() -> dict[str, torch.Tensor]:
    # One element or none: "contiguous" whatever the strides, which a byte view must not trust.
    return {
        "one": torch.arange(8, dtype=torch.int16)[::3][1:2],
        "one_2d": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()[1:2, :1],
        "empty_step": torch.empty(0, dtype=torch.int16)[::2],
        "empty_2d": torch.zeros(0, 3, dtype=torch.float64).t(),
        "scalar_of_view": torch.arange(6, dtype=torch.int32)[4],
    }


@pytest.mark.parametrize("use_template", [False, True], ids=["no_template", "template"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_one_element_and_empty_views_with_odd_strides(fmt: str, use_template: bool, ckpt_path: str) -> None:
    state = _odd_strides()
    assert state["one"].stride() == (3,) and state["one_2d"].stride() == (1, 3)
    ck = checkpointer(fmt)
    ck.save(ckpt_path, state)
    if use_template:
        template = _odd_strides()
        template = {k: v.clone().fill_(0) if v.numel() else v.clone() for k, v in template.items()}
        template["one"] = torch.zeros(8, dtype=torch.int16)[::3][1:2]  # an odd-strided target too
        target = template["one"]
        loaded = ck.load(ckpt_path, template)
        assert loaded["one"] is target
    else:
        loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, state)
    assert loaded["one"].item() == 3 and loaded["one_2d"].item() == 1.0 and loaded["scalar_of_view"].item() == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_tensor_loads_as_one_object(fmt: str, ckpt_path: str) -> None:
    w = torch.randn(4, 8)
    state = {"enc": {"weight": w}, "dec": {"weight": w}, "heads": [w, w.t()], "bias": torch.zeros(8)}
    ck = checkpointer(fmt)
    ck.save(ckpt_path, state)
    loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, state)
    assert loaded["enc"]["weight"] is loaded["dec"]["weight"]
    assert loaded["heads"][0] is loaded["enc"]["weight"]
    assert loaded["bias"] is not loaded["enc"]["weight"]
    # a None template loads the subtree with the ties intact
    sub = ck.load(ckpt_path, {"enc": None, "dec": None})
    assert sub["enc"]["weight"] is sub["dec"]["weight"]
    assert_state_equal(sub["enc"], state["enc"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_style_aliases_share_memory(fmt: str, ckpt_path: str) -> None:
    # nn.Module.state_dict() returns distinct tensor objects over the same storage for tied weights
    base = torch.randn(5, 3)
    a, b = base[1:], base[1:]
    assert a is not b and a.data_ptr() == b.data_ptr()
    ck = checkpointer(fmt)
    ck.save(ckpt_path, {"a": a, "b": b})
    loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, {"a": a, "b": b})
    assert loaded["a"].data_ptr() == loaded["b"].data_ptr()
    loaded["a"][0, 0] = 1234.5
    assert loaded["b"][0, 0].item() == 1234.5


def test_native_stores_tied_tensor_once(ckpt_path: str) -> None:
    w = torch.randn(64, 64)
    ck = checkpointer("safetensors")
    ck.save(ckpt_path, {"x": w, "y": w, "z": w.clone()})
    with open(os.path.join(ckpt_path, "manifest.json"), "rb") as f:
        manifest = json.load(f)
    names = [t["name"] for t in manifest["ranks"][0]["tensors"]]
    assert sorted(names) == ["x", "z"]
    assert manifest["ranks"][0]["size_bytes"] == manifest["ranks"][0]["data_offset"] + 2 * w.numel() * 4


def _nested_state() -> Any:
    return {
        "model": OrderedDict([("layer.0.weight", torch.randn(3, 2)), ("layer.0.bias", torch.randn(3))]),
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)}, 1: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
        },
        "tuple": (torch.arange(4), ("x", (1, 2.5)), []),
        "mixed_keys": {1: "int", "1": "str", -7: torch.ones(2), "": "empty"},
        "empty": {"dict": {}, "list": [], "tuple": (), "odict": OrderedDict()},
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_containers_keep_types_and_order(fmt: str, ckpt_path: str) -> None:
    state = _nested_state()
    ck = checkpointer(fmt)
    ck.save(ckpt_path, state)
    loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, state)
    assert type(loaded["model"]) is OrderedDict
    assert type(loaded["optim"]["param_groups"][0]["betas"]) is tuple
    assert type(loaded["tuple"][1][1]) is tuple
    assert type(loaded["empty"]["odict"]) is OrderedDict
    assert list(loaded["mixed_keys"].keys()) == [1, "1", -7, ""]
    assert list(loaded["optim"]["state"].keys()) == [0, 1] and all(type(k) is int for k in loaded["optim"]["state"])


PLAIN = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "big": 2**100,
    "negbig": -(2**70) - 1,
    "float": 1.5,
    "negzero": -0.0,
    "tiny": 5e-324,
    "nan": float("nan"),
    "inf": float("inf"),
    "ninf": float("-inf"),
    "str": "plain",
    "unicode": "héllo ☃ 𝄞 \u0000 \n\"'",
    "emptystr": "",
    "bytes": b"\x00\xff\x80binary",
    "emptybytes": b"",
    "dtype": torch.bfloat16,
    "dtype8": torch.float8_e5m2,
    "size": torch.Size([2, 3]),
    "size0": torch.Size([]),
    "cpu": torch.device("cpu"),
    "cuda": torch.device("cuda", 1),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_values_round_trip_exactly(fmt: str, ckpt_path: str) -> None:
    ck = checkpointer(fmt)
    ck.save(ckpt_path, {"values": PLAIN, "in_list": list(PLAIN.values())})
    loaded = ck.load(ckpt_path)
    assert_state_equal(loaded, {"values": PLAIN, "in_list": list(PLAIN.values())})
    v = loaded["values"]
    assert v["big"] == 2**100 and type(v["big"]) is int
    assert v["true"] is True and v["none"] is None
    assert type(v["size"]) is torch.Size and v["size"] == torch.Size([2, 3])
    assert v["cuda"] == torch.device("cuda:1")
    assert math.isnan(v["nan"]) and v["inf"] == math.inf and v["ninf"] == -math.inf
    assert math.copysign(1.0, v["negzero"]) == -1.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_root_may_be_any_container(fmt: str, tmp_path) -> None:
    ck = checkpointer(fmt)
    for i, state in enumerate([OrderedDict(a=torch.ones(1)), {}, {"only": None}]):
        path = str(tmp_path / f"c{i}")
        ck.save(path, state)
        assert_state_equal(ck.load(path), state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_is_stored_in_the_manifest(fmt: str, ckpt_path: str) -> None:
    ck = checkpointer(fmt)
    ck.save(ckpt_path, {"a": torch.ones(2)}, metadata={"step": 7, "tag": "x"})
    manifest = tc.checkpoint_reader.read_manifest(ckpt_path)
    assert manifest.metadata == {"step": 7, "tag": "x"}
    assert manifest.layout == fmt and manifest.world_size == 1


# ---------------------------------------------------------------------------- templates


def _saved(fmt: str, path: str) -> dict[str, Any]:
    state = {
        "x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "sub": {"w": torch.randn(4), "n": 3, "deep": {"t": torch.ones(2, dtype=torch.int16)}},
        "lst": [torch.zeros(2), "s"],
        "tup": (torch.full((2,), 7.0), 1),
    }
    checkpointer(fmt).save(path, state)
    return state


@pytest.mark.parametrize("fmt", FORMATS)
def test_template_is_filled_in_place(fmt: str, ckpt_path: str) -> None:
    state = _saved(fmt, ckpt_path)
    x = torch.empty(2, 3)
    w = torch.empty(4)
    t = torch.empty(2, dtype=torch.int16)
    template = {"x": x, "sub": {"w": w, "n": 0, "deep": {"t": t}}}
    ptrs = (x.data_ptr(), w.data_ptr(), t.data_ptr())
    loaded, missing = reader().read(ckpt_path, template, verify=True)
    assert missing == []
    assert loaded is template
    assert loaded["x"] is x and loaded["sub"]["w"] is w and loaded["sub"]["deep"]["t"] is t
    assert (x.data_ptr(), w.data_ptr(), t.data_ptr()) == ptrs
    assert (
        torch.equal(x, state["x"]) and torch.equal(w, state["sub"]["w"]) and torch.equal(t, state["sub"]["deep"]["t"])
    )
    assert loaded["sub"]["n"] == 3
    assert "lst" not in loaded and "tup" not in loaded  # only the template's keys are loaded


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_keys_are_reported_where_missing(fmt: str, ckpt_path: str) -> None:
    _saved(fmt, ckpt_path)
    template = {
        "a": {"b": None},
        "x": torch.empty(2, 3),
        "sub": {"w": torch.empty(4), "gone": torch.empty(1), "deep": {"t": torch.empty(2, dtype=torch.int16), "u": 1}},
        "lst": [None, None, None],
    }
    gone = template["sub"]["gone"]
    loaded, missing = reader().read(ckpt_path, template)
    assert sorted(missing) == sorted(["a", "sub.gone", "sub.deep.u", "lst[2]"])
    assert loaded["a"] == {"b": None}  # left as the template had it
    assert loaded["sub"]["gone"] is gone
    assert loaded["lst"][1] == "s"


@pytest.mark.parametrize("fmt", FORMATS)
def test_none_in_template_loads_the_whole_subtree(fmt: str, ckpt_path: str) -> None:
    state = _saved(fmt, ckpt_path)
    loaded, missing = reader().read(ckpt_path, {"sub": None, "tup": None, "x": None})
    assert missing == []
    assert_state_equal(loaded, {"sub": state["sub"], "tup": state["tup"], "x": state["x"]})


@pytest.mark.parametrize(
    "key, bad",
    [
        ("x", torch.empty(2, 3, dtype=torch.float64)),  # dtype
        ("x", torch.empty(3, 2)),  # shape
        ("x", torch.empty(6)),  # same numel, other shape
    ],
    ids=["dtype", "shape", "reshaped"],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_template_mismatch_names_the_key(fmt: str, key: str, bad: torch.Tensor, ckpt_path: str) -> None:
    _saved(fmt, ckpt_path)
    with pytest.raises(StateDictMismatchError) as info:
        checkpointer(fmt).load(ckpt_path, {"sub": {"w": torch.empty(4)}, key: bad})
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, CheckpointError)
    assert err.key == key
    assert repr(key) in str(err) and ckpt_path in str(err)


@pytest.mark.parametrize("fmt", FORMATS)
def test_template_structure_mismatch_names_the_key(fmt: str, ckpt_path: str) -> None:
    _saved(fmt, ckpt_path)
    with pytest.raises(StateDictMismatchError, match=r"'sub\.deep'") as info:
        checkpointer(fmt).load(ckpt_path, {"sub": {"deep": torch.empty(2)}})
    assert info.value.key == "sub.deep"
    with pytest.raises(StateDictMismatchError, match=r"'x'"):
        checkpointer(fmt).load(ckpt_path, {"x": {"inner": None}})


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_load_with_missing_keys_raises(fmt: str, ckpt_path: str) -> None:
    _saved(fmt, ckpt_path)
    ck = checkpointer(fmt)
    with pytest.raises(RuntimeError, match="missing keys") as info:
        ck.load(ckpt_path, {"x": torch.empty(2, 3), "nope": torch.empty(1), "sub": {"zz": None}}, strict=True)
    assert isinstance(info.value, MissingKeysError)
    assert sorted(info.value.missing_keys) == ["nope", "sub.zz"]
    assert "nope" in str(info.value) and ckpt_path in str(info.value)
    # not strict: no error, the template is returned with what could be loaded
    out = ck.load(ckpt_path, {"x": torch.empty(2, 3), "nope": 5})
    assert out["nope"] == 5 and torch.equal(out["x"], torch.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------------------- a real training state


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()


def _batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def _optimizer(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def _assert_same_training_state(
    a: torch.nn.Module, oa: torch.optim.Optimizer, b: torch.nn.Module, ob: torch.optim.Optimizer
) -> None:
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert torch.equal(pa, pb), f"parameter {na} differs"
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), f"optimizer state {k}.{name} differs"


@pytest.mark.parametrize("restore", ["load_state_dict", "in_place"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_training_resumes_bit_identically(fmt: str, restore: str, ckpt_path: str) -> None:
    model = _mlp(0)
    opt = _optimizer(model)
    _train(model, opt, _batches(1))
    ck = checkpointer(fmt)
    ck.save(ckpt_path, {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3})

    model2 = _mlp(99)  # different initial weights
    assert not torch.equal(model2[0].weight, model[0].weight)
    if restore == "load_state_dict":
        opt2 = _optimizer(model2)
        loaded = ck.load(ckpt_path)
        model2.load_state_dict(loaded["model"])
        opt2.load_state_dict(loaded["optim"])
    else:
        # initialise the optimizer's state (lr 0 changes nothing) so that it can be a template too
        opt2 = _optimizer(model2, lr=0.0)
        for p in model2.parameters():
            p.grad = torch.zeros_like(p)
        opt2.step()
        template = {"model": model2.state_dict(), "optim": opt2.state_dict(), "epoch": None}
        weight_ptr = model2[0].weight.data_ptr()
        exp_avg = opt2.state[model2[0].weight]["exp_avg"]
        loaded = ck.load(ckpt_path, template, strict=True)
        # the parameters and optimizer buffers were written in place
        assert model2[0].weight.data_ptr() == weight_ptr
        assert torch.equal(model2[0].weight, model[0].weight)
        assert torch.equal(exp_avg, opt.state[model[0].weight]["exp_avg"])
        opt2.load_state_dict(loaded["optim"])  # restores lr and the other hyper-parameters
        assert loaded["epoch"] == 3
    _assert_same_training_state(model, opt, model2, opt2)

    more = _batches(2)
    _train(model, opt, more)
    _train(model2, opt2, more)
    _assert_same_training_state(model, opt, model2, opt2)
    assert not torch.equal(model[0].weight, _mlp(0)[0].weight)  # it really trained


# ---------------------------------------------------------------------------- other readers


def test_native_rank_file_is_a_valid_safetensors_file(ckpt_path: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from torchckpt.format.dtypes import SAFETENSORS_NAMES

    state: dict[str, Any] = {
        "st": {_dtype_id(d): random_tensor(d, (3, 4), i) for i, d in enumerate(SAFETENSORS_NAMES)},
        "other": {
            _dtype_id(d): random_tensor(d, (2, 3), 100 + i)
            for i, d in enumerate(ALL_DTYPES)
            if d not in SAFETENSORS_NAMES
        },
        "lst": [torch.arange(3), {"deep": torch.ones(2, 2).t()}],
        "scalar": torch.tensor(2.5),
        "__metadata__": torch.ones(1),  # the name safetensors reserves
    }
    checkpointer("safetensors").save(ckpt_path, state)
    file = os.path.join(ckpt_path, NATIVE_FILE)
    with safe_open(file, "pt") as f:
        keys = set(f.keys())
        for name, t in state["st"].items():
            got = f.get_tensor(f"st.{name}")
            assert got.dtype == t.dtype and got.shape == t.shape
            assert tensor_bytes(got) == tensor_bytes(t), name
        for name, t in state["other"].items():
            got = f.get_tensor(f"other.{name}")  # stored as raw bytes; the manifest keeps the dtype
            assert got.dtype == torch.uint8
            assert got.numpy().tobytes() == tensor_bytes(t), name
        assert torch.equal(f.get_tensor("lst[0]"), torch.arange(3))
        assert torch.equal(f.get_tensor("lst[1].deep"), torch.ones(2, 2))
        assert f.get_tensor("scalar").shape == torch.Size([]) and f.get_tensor("scalar").item() == 2.5
        assert f.metadata()["format"] == "torchckpt"
    assert len(keys) == len(state["st"]) + len(state["other"]) + 4
    assert torch.equal(load_file(file)["lst[0]"], torch.arange(3))
    assert_state_equal(checkpointer("safetensors").load(ckpt_path), state)


def test_torch_save_file_is_read_by_plain_torch_load(ckpt_path: str) -> None:
    state = _nested_state()
    state["plain"] = {k: v for k, v in PLAIN.items() if k not in ("cuda",)}
    checkpointer("torch_save").save(ckpt_path, state)
    loaded = torch.load(os.path.join(ckpt_path, TORCH_SAVE_FILE), weights_only=True)
    assert_state_equal(loaded, state)


# ---------------------------------------------------------------------------- property test

_DTYPES_ST = st.sampled_from(ALL_DTYPES)
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def _tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(_DTYPES_ST)
    shape = draw(_SHAPES)
    t = random_tensor(dtype, shape, draw(st.integers(0, 2**31)))
    view = draw(st.sampled_from(["as_is", "transpose", "step"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "step" and t.dim() >= 1:
        t = t[::2]
    return t


_PLAIN_ST = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
    st.sampled_from([torch.device("cpu"), torch.device("cuda", 0)]),
)
_KEYS = st.one_of(st.text(max_size=6), st.integers(-3, 1000))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(_KEYS, children, max_size=4),
        st.dictionaries(_KEYS, children, max_size=4).map(OrderedDict),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
    )


_STATE_DICTS = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.recursive(st.one_of(_tensors(), _PLAIN_ST), _containers, max_leaves=12),
    max_size=5,
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(state=_STATE_DICTS)
def test_property_round_trip(state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for fmt in FORMATS:
            ck = checkpointer(fmt)
            path = os.path.join(d, fmt)
            ck.save(path, state)
            assert_state_equal(ck.load(path), state)
            template = map_tensors(state, lambda t: scrambled_like(t))
            targets = iter_tensors(template)
            loaded, missing = reader().read(path, template)
            assert missing == []
            assert loaded is template
            assert all(a is b for a, b in zip(iter_tensors(loaded), targets))
            assert_state_equal(loaded, state)
