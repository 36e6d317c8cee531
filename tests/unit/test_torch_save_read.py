"""The fast weights-only reader of torch.save files: what it admits loads as torch.load loads it; the rest goes to torch.load."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from ckpt_testutil import TORCH_SAVE_FILE, checkpointer

from torchckpt.format import torch_save as torch_save_mod
from torchckpt.format.torch_save_read import Unsupported, cpu_only, load_mapped


def _state() -> dict:
    g = torch.Generator().manual_seed(5)
    base = torch.arange(12.0)
    return {
        "w": torch.randn(16, 8, generator=g),
        "h": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(20, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "step": torch.tensor(3),
        "empty": torch.empty(0, 2),
        "p": torch.nn.Parameter(torch.ones(3)),
        "base": base,
        "head": base[:6],
        "grid": base.view(3, 4),
        "od": OrderedDict(a=1, b=[2.5, "x", None, True]),
        "blob": b"\x00\xffab",
        "no_bytes": b"",
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "tuple": (1, (2, 3)),
    }


def _load(path: str):
    with open(path, "rb") as f:
        return load_mapped(f.fileno(), f"/proc/self/fd/{f.fileno()}", os.fstat(f.fileno()).st_size)


def _mapped(t: torch.Tensor) -> bool:
    return not t.untyped_storage().resizable()


def _assert_same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
        assert a.requires_grad == b.requires_grad
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_a_checkpoint_loads_as_torch_load_loads_it_without_torch_load(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "ck")
    with checkpointer("torch_save") as ck:
        ck.save(path, _state())
    expected = torch.load(os.path.join(path, TORCH_SAVE_FILE), weights_only=True)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch_save_mod.torch, "load", refuse)
    with checkpointer("torch_save") as ck:
        out = ck.load(path)
    _assert_same(out, expected)
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert out["head"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()  # views stay views
    assert all(_mapped(out[k]) for k in ("w", "h", "ids", "base", "grid"))
    out["w"].fill_(1.0)  # copy on write: the file keeps its bytes
    with checkpointer("torch_save") as ck:
        _assert_same(ck.load(path)["w"], expected["w"])


def test_a_template_is_filled_from_the_mapped_tensors(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "ck")
    with checkpointer("torch_save") as ck:
        ck.save(path, _state())
    monkeypatch.setattr(torch_save_mod.torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    template = {"w": torch.zeros(16, 8), "ids": None}
    with checkpointer("torch_save") as ck:
        ck.load(path, template)
    assert torch.equal(template["w"], _state()["w"]) and not _mapped(template["w"])
    assert torch.equal(template["ids"], _state()["ids"]) and not _mapped(template["ids"])  # a clone


def _saved(tmp_path, obj, name: str = "x.pt") -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))

    def __init__(self, target: str) -> None:
        self.target = target


def test_names_outside_the_list_are_not_resolved(tmp_path) -> None:
    target = str(tmp_path / "made_by_the_payload")
    path = _saved(tmp_path, {"x": _Payload(target)})
    with pytest.raises(Unsupported, match=r"(posix|os)\.mkdir"):
        _load(path)
    assert not os.path.exists(target)
    with pytest.raises(Unsupported, match=r"(__builtin__|builtins)\.set"):
        _load(_saved(tmp_path, {"s": {1, 2}}, "set.pt"))


def test_what_the_reader_does_not_admit_goes_to_torch_load(tmp_path, monkeypatch) -> None:
    t = torch.ones(2)
    t.__dict__["note"] = "extra"  # saved as tensor metadata: not this reader's case
    with pytest.raises(Unsupported):
        _load(_saved(tmp_path, {"t": t}, "meta.pt"))
    path = str(tmp_path / "ck")
    with checkpointer("torch_save") as ck:
        ck.save(path, _state())
    calls = []
    real_load = torch.load

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    def unsupported(*args, **kwargs):
        raise Unsupported("a test")

    monkeypatch.setattr(torch_save_mod, "load_mapped", unsupported)
    monkeypatch.setattr(torch_save_mod.torch, "load", counted)
    with checkpointer("torch_save") as ck:
        _assert_same(ck.load(path), real_load(os.path.join(path, TORCH_SAVE_FILE), weights_only=True))
    assert len(calls) == 1 and calls[0]["weights_only"] is True


def test_a_storage_id_must_name_a_cpu_record_of_its_size(tmp_path) -> None:
    path = _saved(tmp_path, {"t": torch.arange(4, dtype=torch.int32)})
    assert torch.equal(_load(path)["t"], torch.arange(4, dtype=torch.int32))
    data = bytearray(open(path, "rb").read())
    at = data.find(b"cpu")
    data[at : at + 3] = b"cuq"  # the storage's location, inside data.pkl (stored, so a byte of the file)
    bad = str(tmp_path / "bad.pt")
    with open(bad, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(Unsupported):
        _load(bad)


def test_an_empty_or_foreign_file_is_not_admitted(tmp_path) -> None:
    empty = str(tmp_path / "empty.pt")
    open(empty, "wb").close()
    with pytest.raises(Unsupported):
        _load(empty)
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"t": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(Unsupported):
        _load(legacy)
    plain = _saved(tmp_path, pickle.dumps(1), "plain.pt")
    assert _load(plain) == pickle.dumps(1)


@pytest.mark.parametrize(
    ("where", "cpu"),
    [(None, True), ("cpu", True), (torch.device("cpu"), True), ("meta", False), ({"cpu": "meta"}, False), ("nope", False)],
)
def test_cpu_only(where, cpu: bool) -> None:
    assert cpu_only(where) is cpu
