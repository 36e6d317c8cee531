"""The tools' reading: what the public API can write always displays, and ``diff`` sees every difference."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Any

import pytest
import torch
from ckpt_testutil import FORMATS, checkpointer

import torchckpt as tc
from torchckpt import cli
from torchckpt.format import manifest as manifest_module

pytestmark = pytest.mark.timeout(120)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


#: name -> (state a, state b, the key the difference is reported at)
STRUCTURE: dict[str, tuple[Any, Any, str]] = {
    "dict_vs_ordereddict": ({"m": {"w": 1}}, {"m": OrderedDict(w=1)}, "m"),
    "int_key_vs_str_key": ({"m": {1: 2}}, {"m": {"1": 2}}, "m"),
    "list_vs_tuple": ({"m": [1, 2]}, {"m": (1, 2)}, "m"),
    "empty_dict_vs_missing": ({"m": {}, "n": 1}, {"n": 1}, "m"),
    "none_vs_missing": ({"m": None, "n": 1}, {"n": 1}, "m"),
    "empty_list_vs_empty_dict": ({"m": []}, {"m": {}}, "m"),
    "bool_vs_int": ({"m": True}, {"m": 1}, "m"),
    "int_vs_float": ({"m": 1}, {"m": 1.0}, "m"),
    "root_type": ({"m": 1}, OrderedDict(m=1), "[root]"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_diff_reports_differences_of_structure_and_key_types(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], case: str, fmt: str
) -> None:
    a, b, key = STRUCTURE[case]
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    checkpointer(fmt).save(pa, a)
    checkpointer(fmt).save(pb, b)
    rc, out, err = _run(capsys, "diff", pa, pb)
    assert rc == 1 and "no differences" not in out, out + err
    assert key in out, out
    rc, out, _ = _run(capsys, "diff", pa, pb, "--json")
    report = json.loads(out)
    assert rc == 1 and not report["same"]
    assert any(k.startswith(key) for k in [*report["added"], *report["removed"], *report["changed"]]), report
    rc, out, _ = _run(capsys, "diff", pa, pa)
    assert rc == 0 and out.strip() == "no differences"


ODD_TIMES = [0.0, -86400.0 * 365 * 100, 1e13, 1e300, 1_700_000_000]
ODD_METRICS = {"huge": 10**30, "nested": {"a": [1, {"b": None}]}, "text": "x", "neg": -1e308, "flag": True}


def test_manifests_the_public_api_wrote_always_display(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "run")
    # The manager takes only numbers as metrics; the checkpointers' metadata stores any JSON under "metrics".
    ck = checkpointer("safetensors")
    for step, when in enumerate(ODD_TIMES):
        monkeypatch.setattr(manifest_module.time, "time", lambda when=when: when)  # a clock set wrong
        path = os.path.join(root, f"step_{step:010d}")
        ck.save(path, {"w": torch.ones(2)}, metadata={"step": step, "metrics": ODD_METRICS})
    monkeypatch.undo()
    odd = str(tmp_path / "odd")  # metrics that are no dict, through the reference API's metadata
    checkpointer("torch_save").save(os.path.join(odd, "step_0000000001"), {"w": 1}, metadata={"metrics": [1, "two"]})
    for where in (root, odd):
        rc, out, err = _run(capsys, "ls", where)
        assert rc == 0 and not err, err
        assert "committed" in out, out
        assert where == odd or out.count("huge=1000000000000000000000000000000") == len(ODD_TIMES), out
        rc, out, err = _run(capsys, "ls", where, "--json")
        assert rc == 0 and not err, err
        rows = json.loads(out)
        assert all(r["committed"] for r in rows) and len(rows) == (len(ODD_TIMES) if where == root else 1)
    for name in sorted(n for n in os.listdir(root) if n.startswith("step_")):
        rc, out, err = _run(capsys, "inspect", os.path.join(root, name))
        assert rc == 0 and not err and re.search(r"^w +float32 +\[2\] +8 B$", out, re.M), out + err
