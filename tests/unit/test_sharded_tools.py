"""``torchckpt inspect``, ``verify``, ``diff`` and ``export`` of sharded checkpoints (``sharded_testutil``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sharded_testutil import manifest_doc, rewrite, sharded_checkpoint

from torchckpt.cli import main
from torchckpt.consolidate import ranks_text

pytestmark = pytest.mark.timeout(180)

FULL = {
    "model.w": torch.arange(24.0).reshape(4, 6),  # rows 2 + 2 + 0 on 3 ranks: rank 2's shard is empty
    "model.b": torch.arange(5, dtype=torch.int64),  # 2 + 2 + 1
    "model.h": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),  # 1 + 1 + 1
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-rank sharded checkpoint of :data:`FULL` and ``step`` 3 (never modified)."""
    return sharded_checkpoint(str(tmp_path_factory.mktemp("tools") / "ckpt"), FULL, world=3)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_ranks_text() -> None:
    assert ranks_text([3, 0, 1, 2, 6, 8, 9]) == "0-3,6,8-9"
    assert ranks_text([5]) == "5" and ranks_text([]) == ""


def test_inspect_shows_global_shape_dtype_chunks_and_ranks(sharded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", sharded)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{sharded}: safetensors, 3 rank(s), showing rank 0"
    assert lines[1].split() == ["key", "dtype/type", "shape/value", "bytes", "sharded"]
    assert lines[2].split() == ["model.w", "float32", "[4,", "6]", "96", "B", "2", "chunks", "from", "ranks", "0-1"]
    assert lines[3].split() == ["model.b", "int64", "[5]", "40", "B", "3", "chunks", "from", "ranks", "0-2"]
    assert lines[4].split() == ["model.h", "bfloat16", "[3,", "2]", "12", "B", "3", "chunks", "from", "ranks", "0-2"]
    assert lines[5].split() == ["step", "int", "3"]
    assert lines[6] == "total: 3 tensors, 148 B; 1 plain values"

    code, out, _ = run(capsys, "inspect", sharded, "--json")
    doc = json.loads(out)
    assert doc["keys"]["model.w"] == {"type": "sharded tensor", "dtype": "float32", "shape": [4, 6], "bytes": 96,
                                      "chunks": 2, "ranks": [0, 1]}  # fmt: skip
    assert doc["totals"] == {"tensors": 3, "tensor_bytes": 148, "tied_keys": 0, "values": 1}


def test_inspect_of_a_plain_checkpoint_has_no_sharded_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckpt_testutil import checkpointer

    checkpointer("safetensors").save(str(tmp_path / "plain"), {"w": torch.ones(2)})
    code, out, _ = run(capsys, "inspect", str(tmp_path / "plain"))
    assert code == 0 and out.splitlines()[1].split() == ["key", "dtype/type", "shape/value", "bytes"]


def test_verify_a_good_sharded_checkpoint(sharded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", sharded)
    assert code == 0
    assert out.strip().endswith("every checksum verified, 3 sharded tensor(s) tiled by their chunks)")


def test_verify_reports_chunks_that_do_not_tile_naming_the_key(
    sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = str(tmp_path / "bad")
    shutil.copytree(sharded, bad)
    rewrite(bad, lambda doc: doc["ranks"][1]["sharded"][0]["chunks"][0].__setitem__("offsets", [1, 0]))
    code, out, _ = run(capsys, "verify", bad, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and len(doc["problems"]) == 1
    problem = doc["problems"][0]
    assert (problem["file"], problem["key"]) == ("manifest.json", "model.w")
    assert "the chunks of sharded tensor 'model.w' [4, 6] do not tile it: the chunks at offsets [0, 0] and [1, 0] overlap" in (
        problem["message"]
    )
    code, out, _ = run(capsys, "verify", bad)
    assert code == 1 and "BAD (1 problem(s))" in out and "manifest.json key 'model.w'" in out


def test_verify_checks_every_rank_file(sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = str(tmp_path / "bad")
    shutil.copytree(sharded, bad)
    entry = manifest_doc(bad)["ranks"][2]
    h = next(t for t in entry["tensors"] if t["name"] == "model.h")
    with open(os.path.join(bad, "rank_00002.safetensors"), "r+b") as f:
        f.seek(h["offset"])
        byte = f.read(1)
        f.seek(h["offset"])
        f.write(bytes([byte[0] ^ 1]))
    code, out, _ = run(capsys, "verify", bad, "--json")
    assert code == 1
    assert [(p["file"], p["key"]) for p in json.loads(out)["problems"]] == [("rank_00002.safetensors", "model.h")]
    code, _, err = run(capsys, "export", bad, str(tmp_path / "out.safetensors"), "--format", "safetensors")
    assert code == 2 and "model.h" in err and "checksum" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")] and not (tmp_path / "out.safetensors").exists()


def test_export_safetensors_writes_every_tensor_whole(
    sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out.safetensors")
    code, text, _ = run(capsys, "export", sharded, out, "--format", "safetensors")
    assert code == 0 and text.startswith(f"wrote {out} (")
    loaded = load_file(out)
    assert sorted(loaded) == sorted(FULL)
    for k, v in FULL.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["torchckpt_tree"]) == {
        "dict": [["model", {"dict": [["w", {"T": 0}], ["b", {"T": 1}], ["h", {"T": 2}]]}], ["step", 3]]
    }


def test_export_strips_a_key_prefix(sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "model.safetensors")
    code, _, _ = run(capsys, "export", sharded, out, "--format", "safetensors", "--strip-prefix", "model.")
    assert code == 0
    loaded = load_file(out)
    assert sorted(loaded) == ["b", "h", "w"]
    assert torch.equal(loaded["w"], FULL["model.w"])
    module = torch.nn.Linear(6, 4)
    module.load_state_dict({"weight": loaded["w"], "bias": torch.zeros(4)})
    code, _, err = run(capsys, "export", sharded, str(tmp_path / "x.pt"), "--format", "torch", "--strip-prefix", "model.")
    assert code == 2 and "strip_prefix applies to the safetensors format only" in err


def test_export_torch_assembles_sharded_tensors(sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.pt")
    assert run(capsys, "export", sharded, out, "--format", "torch")[0] == 0
    state = torch.load(out, weights_only=True)
    assert state["step"] == 3
    for k, v in FULL.items():
        a, b = k.split(".")
        assert torch.equal(state[a][b], v), k


def test_diff_compares_sharded_tensors_whole(sharded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changed = dict(FULL)
    changed["model.w"] = FULL["model.w"].clone()
    changed["model.w"][3, 5] += 0.5
    other = sharded_checkpoint(str(tmp_path / "other"), changed, world=2)
    code, out, _ = run(capsys, "diff", sharded, sharded)
    assert code == 0 and out.strip() == "no differences"
    code, out, _ = run(capsys, "diff", sharded, other)
    assert code == 1 and out.strip() == "~ model.w: values differ (max abs diff 0.5)"


def _peak_rss_anon_kib(args: list[str], cwd: Any) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run the command, sampling its anonymous resident memory (copies, not mapped files)."""
    p = subprocess.Popen([sys.executable, "-m", "torchckpt", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    peak = 0
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    out, err = p.communicate(timeout=30)
    return peak, subprocess.CompletedProcess(args, p.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_export_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    n = 24 << 20  # 96 MiB of float32 per tensor, 3 tensors sharded by rows on 2 ranks
    tensors = {f"t{i}": torch.full((n // 1024, 1024), float(i)) for i in range(3)}
    src = sharded_checkpoint(str(tmp_path / "big"), tensors, world=2)
    del tensors
    baseline, r0 = _peak_rss_anon_kib(["ls", str(tmp_path)], tmp_path)
    out = str(tmp_path / "out.safetensors")
    peak, r = _peak_rss_anon_kib(["export", src, out, "--format", "safetensors"], tmp_path)
    assert r0.returncode == 0 and r.returncode == 0, r.stderr
    largest_kib = (n * 4) >> 10
    # All three whole would add 288 MiB; one tensor at a time stays within it and 64 MiB.
    assert peak - baseline < largest_kib + 64 * 1024, f"export peak anon RSS {peak} KiB vs {baseline} KiB for ls"
    with safe_open(out, "pt") as f:
        for i in range(3):
            t = f.get_tensor(f"t{i}")
            assert t.shape == (n // 1024, 1024) and bool((t == float(i)).all())
