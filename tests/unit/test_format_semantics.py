"""What each layout keeps of tensor identity (README "Formats", docs/format.md "What the native layout keeps").

torch_save keeps ``nn.Parameter`` and views sharing one storage, as ``torch.save`` does. The native layout
stores tensors only: a Parameter comes back as a plain tensor, views of one storage as separate copies
(a tensor reached twice stays one); a template keeps its own Parameters and sharing.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ckpt_testutil import NATIVE_FILE, checkpointer


def _with_views(base: torch.Tensor, param: torch.nn.Parameter) -> dict[str, Any]:
    return {"p": param, "base": base, "head": base[:6], "grid": base.view(3, 4), "tied": base}


def _state() -> dict[str, Any]:
    return _with_views(torch.arange(12.0), torch.nn.Parameter(torch.ones(3)))


def _template() -> dict[str, Any]:
    return _with_views(torch.zeros(12), torch.nn.Parameter(torch.zeros(3)))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_torch_save_keeps_parameters_and_views(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    checkpointer("torch_save").save(path, _state())
    out = checkpointer("torch_save").load(path)
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert _shares(out["head"], out["base"]) and _shares(out["grid"], out["base"])
    assert out["tied"] is out["base"]


def test_native_returns_plain_tensors_and_copies_of_views(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(path, _state())
    out = checkpointer("safetensors").load(path)
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    assert torch.equal(out["p"], torch.ones(3))
    assert not _shares(out["head"], out["base"]) and not _shares(out["grid"], out["base"])
    assert torch.equal(out["head"], torch.arange(6.0)) and torch.equal(out["grid"], torch.arange(12.0).view(3, 4))
    assert out["tied"] is out["base"]  # the same tensor reached twice is stored once
    # base (48 bytes) + head (24) + grid (48) + p (12): each view is its own copy in the file
    data = os.path.getsize(os.path.join(path, NATIVE_FILE)) - 4096
    assert data == 48 + 24 + 48 + 12


def test_a_template_keeps_its_parameters_and_views_in_both_layouts(tmp_path) -> None:
    for fmt in ("torch_save", "safetensors"):
        path = str(tmp_path / fmt)
        checkpointer(fmt).save(path, _state())
        template = _template()
        out = checkpointer(fmt).load(path, template)
        assert out["p"] is template["p"] and type(out["p"]) is torch.nn.Parameter
        assert _shares(out["head"], out["base"]) and torch.equal(out["base"], torch.arange(12.0))
