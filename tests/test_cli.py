"""The ``torchckpt`` command, run as a subprocess: outputs and exit codes of every subcommand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import torchckpt as tc
from ckpt_testutil import assert_state_equal, checkpointer, file_name
from torchckpt.checkpoint_reader import read_manifest

pytestmark = pytest.mark.timeout(120)

CONSOLE_SCRIPT = Path(sys.executable).parent / "torchckpt"


@dataclass
class Result:
    args: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"torchckpt {' '.join(self.args)} -> {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli(*args: str, cwd: Any = None, exe: Sequence[str] | None = None) -> Result:
    cmd = [*(exe or [sys.executable, "-m", "torchckpt"]), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=cwd)
    return Result(list(args), p.returncode, p.stdout, p.stderr)


def cli_many(*commands: Sequence[str], cwd: Any = None) -> list[Result]:
    """Run independent commands side by side (each one is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda c: cli(*c, cwd=cwd), commands))


def _state(step: int = 1) -> dict[str, Any]:
    return {
        "model": {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) + step,
            "b": torch.linspace(-1, 1, 5).to(torch.bfloat16),
            "mask": torch.tensor([True, False, True]),
        },
        "nan": torch.tensor([float("nan"), 1.0, float("inf")]),
        "ids": torch.arange(100, dtype=torch.int64),
        "step": step,
        "name": "run",
    }


def _save(path: str, state: Any, fmt: str = "safetensors") -> str:
    checkpointer(fmt).save(path, state)
    return path


def _flip(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _tensor_offset(path: str, key: str) -> int:
    entry = read_manifest(path).ranks[0]
    return next(t.offset for t in entry.tensors if t.name == key)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("cli")
    return {
        "base": str(base),
        "native": _save(str(base / "native"), _state()),
        "torch_save": _save(str(base / "torch_save"), _state(), "torch_save"),
    }


def _root_with_steps(root: Path, steps: Sequence[int]) -> tc.CheckpointManager:
    mgr = tc.CheckpointManager(root, async_save=False)
    for s in steps:
        mgr.save(s, _state(s), metrics={"loss": 1.0 / s, "epoch": s})
    return mgr


# -- ls ----------------------------------------------------------------------


def test_ls(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with _root_with_steps(root, [1, 2, 10]) as mgr:
        _flip(os.path.join(mgr.path(10), file_name("safetensors")), _tensor_offset(mgr.path(10), "ids") + 8)
    os.makedirs(root / "step_0000000011")  # a crashed save: no manifest
    text, js = cli_many(["ls", str(root)], ["ls", str(root), "--json", "--verify"])

    assert text.rc == 0, text
    lines = text.out.splitlines()
    header = lines[0].split()
    for column in ("step", "format", "metrics", "status"):
        assert column in header, text
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["1", "2", "10", "11"], text
    assert "safetensors" in rows["1"] and "loss=1" in rows["1"] and "epoch=1" in rows["1"], text
    assert "loss=0.5" in rows["2"] and "committed" in rows["2"], text
    assert "loss=0.1" in rows["10"] and "epoch=10" in rows["10"], text
    assert "not committed" in rows["11"], text

    assert js.rc == 0, js
    doc = json.loads(js.out)
    assert [r["step"] for r in doc] == [1, 2, 10, 11]
    by_step = {r["step"]: r for r in doc}
    for s in (1, 2, 10):
        r = by_step[s]
        assert r["committed"] is True
        assert r["format"] == "safetensors"
        assert r["ranks"] == 1
        assert r["metrics"] == {"loss": 1.0 / s, "epoch": s}
        assert r["size_bytes"] == os.path.getsize(os.path.join(r["path"], file_name("safetensors")))
        assert os.path.samefile(r["path"], root / f"step_{s:010d}")
    assert by_step[1]["verified"] is True and by_step[2]["verified"] is True
    assert by_step[10]["verified"] is False  # the flipped byte
    assert by_step[11]["committed"] is False


def test_console_script_runs(tmp_path: Path) -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT}")
    with _root_with_steps(tmp_path, [3]):
        pass
    r = cli("ls", str(tmp_path), "--json", exe=[str(CONSOLE_SCRIPT)])
    assert r.rc == 0, r
    assert [row["step"] for row in json.loads(r.out)] == [3]


# -- inspect -----------------------------------------------------------------


def test_inspect(ckpts: dict[str, str]) -> None:
    text, js_native, js_ts = cli_many(
        ["inspect", ckpts["native"]], ["inspect", ckpts["native"], "--json"], ["inspect", ckpts["torch_save"], "--json"]
    )
    assert text.rc == 0, text
    rows = {line.split()[0]: line.split() for line in text.out.splitlines()[2:] if line.strip()}
    assert rows["model.w"][1:3] == ["float32", "[3,"], text
    assert "48 B" in " ".join(rows["model.w"]), text
    assert rows["model.b"][1] == "bfloat16", text
    assert rows["model.mask"][1] == "bool", text
    assert rows["ids"][1] == "int64" and "800 B" in " ".join(rows["ids"]), text
    assert rows["step"][1:3] == ["int", "1"], text
    assert rows["name"][1:3] == ["str", "'run'"], text
    total = 48 + 10 + 3 + 12 + 800
    assert f"total: 5 tensors, {total} B; 2 plain values" in text.out, text

    for js, layout in ((js_native, "safetensors"), (js_ts, "torch_save")):
        assert js.rc == 0, js
        doc = json.loads(js.out)
        assert doc["format"] == layout and doc["ranks"] == 1
        keys = doc["keys"]
        assert set(keys) == {"model.w", "model.b", "model.mask", "nan", "ids", "step", "name"}
        assert keys["model.w"] == {"type": "tensor", "dtype": "float32", "shape": [3, 4], "bytes": 48}
        assert keys["model.b"] == {"type": "tensor", "dtype": "bfloat16", "shape": [5], "bytes": 10}
        assert keys["ids"]["bytes"] == 800
        assert keys["step"] == {"type": "int", "value": "1"}
        assert doc["totals"] == {"tensors": 5, "tensor_bytes": total, "tied_keys": 0, "values": 2}


# -- verify ------------------------------------------------------------------


def test_verify_good_checkpoints(ckpts: dict[str, str]) -> None:
    native, ts = cli_many(["verify", ckpts["native"]], ["verify", ckpts["torch_save"], "--json"])
    assert native.rc == 0, native
    assert "OK" in native.out, native
    assert ts.rc == 0, ts
    assert json.loads(ts.out) == {"path": ckpts["torch_save"], "ok": True, "problems": []}


def test_verify_names_every_bad_file_and_key(ckpts: dict[str, str], tmp_path: Path) -> None:
    native = str(tmp_path / "native")
    shutil.copytree(ckpts["native"], native)
    rank_file = os.path.join(native, file_name("safetensors"))
    _flip(rank_file, _tensor_offset(native, "model.w") + 5)
    _flip(rank_file, _tensor_offset(native, "ids") + 17)
    ts = str(tmp_path / "ts")
    shutil.copytree(ckpts["torch_save"], ts)
    ts_file = os.path.join(ts, file_name("torch_save"))
    _flip(ts_file, Path(ts_file).read_bytes().find(torch.arange(100, dtype=torch.int64).numpy().tobytes()) + 9)

    text, js, ts_text = cli_many(["verify", native], ["verify", native, "--json"], ["verify", ts])
    assert text.rc == 1, text
    assert "BAD (2 problem(s))" in text.out, text
    problem_lines = [line for line in text.out.splitlines() if "checksum" in line]
    assert len(problem_lines) == 2, text
    assert any(file_name("safetensors") in line and "'model.w'" in line for line in problem_lines), text
    assert any(file_name("safetensors") in line and "'ids'" in line for line in problem_lines), text

    assert js.rc == 1, js
    doc = json.loads(js.out)
    assert doc["ok"] is False
    assert sorted((p["file"], p["key"]) for p in doc["problems"]) == [
        (file_name("safetensors"), "ids"),
        (file_name("safetensors"), "model.w"),
    ]

    assert ts_text.rc == 1, ts_text
    assert file_name("torch_save") in ts_text.out and "digest" in ts_text.out, ts_text


# -- diff --------------------------------------------------------------------


def test_diff(ckpts: dict[str, str], tmp_path: Path) -> None:
    other = _state()
    other["model"]["w"] = other["model"]["w"].clone()
    other["model"]["w"][1, 2] += 0.5
    other["model"]["w"][2, 3] -= 0.25
    other["step"] = 2
    del other["name"]
    other["extra"] = torch.zeros(2)
    b = _save(str(tmp_path / "b"), other)
    a = ckpts["native"]

    same, same_across_layouts, text, js = cli_many(
        ["diff", a, a], ["diff", a, ckpts["torch_save"]], ["diff", a, b], ["diff", a, b, "--json"]
    )
    for r in (same, same_across_layouts):
        assert r.rc == 0, r  # nan == nan: bit-identical
        assert "no differences" in r.out, r

    assert text.rc == 1, text
    lines = text.out.splitlines()
    assert "+ extra" in lines, text
    assert "- name" in lines, text
    assert "~ model.w: values differ (max abs diff 0.5)" in lines, text
    assert "~ step: 1 -> 2" in lines, text
    assert len(lines) == 4, text  # nothing else: model.b, mask, nan and ids are equal

    assert js.rc == 1, js
    doc = json.loads(js.out)
    assert doc["same"] is False
    assert doc["added"] == ["extra"] and doc["removed"] == ["name"]
    assert set(doc["changed"]) == {"model.w", "step"}
    assert doc["changed"]["model.w"] == {"change": "values", "max_abs_diff": 0.5}
    assert doc["changed"]["step"]["change"] == "value"


# -- export ------------------------------------------------------------------


@pytest.mark.parametrize("source", ["native", "torch_save"])
def test_export(ckpts: dict[str, str], tmp_path: Path, source: str) -> None:
    from safetensors import safe_open

    st_out, pt_out = str(tmp_path / "out.safetensors"), str(tmp_path / "out.pt")
    st, pt = cli_many(
        ["export", ckpts[source], st_out, "--format", "safetensors"],
        ["export", ckpts[source], pt_out, "--format", "torch"],
    )
    assert st.rc == 0, st
    assert pt.rc == 0, pt
    assert st.out.startswith(f"wrote {st_out}"), st

    expected = _state()
    flat = {
        "model.w": expected["model"]["w"],
        "model.b": expected["model"]["b"],
        "model.mask": expected["model"]["mask"],
        "nan": expected["nan"],
        "ids": expected["ids"],
    }
    with safe_open(st_out, framework="pt") as f:
        assert set(f.keys()) == set(flat)
        for k, v in flat.items():
            assert_state_equal(f.get_tensor(k), v, k)
        assert "torchckpt_tree" in (f.metadata() or {})

    assert_state_equal(torch.load(pt_out, weights_only=True), expected)
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "out.safetensors"]  # no temporary files left


def _peak_rss_anon_kib(args: Sequence[str], cwd: Any) -> tuple[int, Result]:
    """Run the command, sampling its anonymous resident memory (copies, not the mapped checkpoint)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "torchckpt", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    deadline = time.monotonic() + 90
    while p.poll() is None and time.monotonic() < deadline:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    out, err = p.communicate(timeout=30)
    return peak, Result(list(args), p.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_export_memory_stays_bounded(tmp_path: Path) -> None:
    n = 48 << 20  # 192 MiB of float32
    src = _save(str(tmp_path / "big"), {"a": torch.arange(n // 2, dtype=torch.float32), "b": torch.ones(n // 2)})
    del n
    baseline, r0 = _peak_rss_anon_kib(["ls", str(tmp_path)], tmp_path)
    peak, r = _peak_rss_anon_kib(["export", src, str(tmp_path / "out.safetensors"), "--format", "safetensors"], tmp_path)
    assert r0.rc == 0 and r.rc == 0, r
    assert baseline > 0 and peak > 0
    # A copy of the tensors would add 192 MiB; allow 48 MiB above what the bare command takes.
    assert peak - baseline < 48 * 1024, f"export peak anon RSS {peak} KiB vs {baseline} KiB for ls"
    assert os.path.getsize(tmp_path / "out.safetensors") > 192 << 20


# -- gc ----------------------------------------------------------------------


def test_gc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with _root_with_steps(root, [1, 2, 3, 4, 5]):
        pass
    dry = cli("gc", str(root), "--keep-last", "2", "--dry-run")
    assert dry.rc == 0, dry
    assert dry.out.strip() == "would delete 3 step(s): [1, 2, 3]", dry
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.steps() == [1, 2, 3, 4, 5]

    real = cli("gc", str(root), "--keep-last", "2")
    assert real.rc == 0, real
    assert real.out.strip() == "deleted 3 step(s): [1, 2, 3]", real
    with tc.CheckpointManager(root, async_save=False) as mgr:
        assert mgr.steps() == [4, 5]
    assert sorted(n for n in os.listdir(root) if not n.endswith("-lock")) == ["step_0000000004", "step_0000000005"]


# -- bad paths and arguments --------------------------------------------------


def test_bad_paths_and_arguments_exit_2_with_one_line(ckpts: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    not_a_checkpoint = str(tmp_path)  # a directory without manifest.json
    commands = [
        ["ls", missing],
        ["inspect", missing],
        ["verify", not_a_checkpoint],
        ["diff", ckpts["native"], missing],
        ["export", ckpts["native"], str(tmp_path / "x.bin"), "--format", "zip"],
        ["gc", missing, "--keep-last", "1"],
        ["gc", ckpts["base"], "--keep-last", "0"],
        ["frobnicate"],
    ]
    results = cli_many(*commands, cwd=tmp_path)
    for r in results:
        assert r.rc == 2, r
        assert "Traceback" not in r.err, r
        lines = r.err.strip().splitlines()
        assert len(lines) == 1, r
        assert lines[0].startswith("torchckpt: "), r
        assert r.out == "", r
    assert missing in results[0].err and missing in results[1].err
    assert not os.path.exists(missing), "a command created the missing directory"


def test_a_url_is_refused_by_every_command_with_one_line(ckpts: dict[str, str], tmp_path: Path) -> None:
    url = "s3://bucket/ckpts"
    commands = [
        ["inspect", url],
        ["verify", url],
        ["diff", ckpts["native"], url],
        ["export", url, str(tmp_path / "x.safetensors"), "--format", "safetensors"],
        ["export", ckpts["native"], "gs://bucket/x.safetensors", "--format", "safetensors"],
        ["gc", url, "--keep-last", "1"],
    ]
    for r in cli_many(*commands, cwd=tmp_path):
        assert r.rc == 2, r
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.err, r
        assert "URLs are not supported here" in lines[0], r
        assert ("gs://bucket/x.safetensors" if "gs://" in " ".join(r.args) else url) in lines[0], r
    assert not os.path.exists(tmp_path / "s3:") and not os.path.exists(tmp_path / "gs:")
def test_gc_keep_last_must_be_at_least_one_in_user_terms(tmp_path: Path) -> None:
    with _root_with_steps(tmp_path / "root", [1]):
        pass
    for value in ("0", "-3", "two"):
        r = cli("gc", str(tmp_path / "root"), "--keep-last", value)
        assert r.rc == 2, r
        assert r.err.strip() == (
            f"torchckpt: gc: --keep-last must be a whole number of at least 1 (the newest step is always kept), "
            f"got {value!r}"
        ), r
        assert "KeepLast" not in r.err and "Traceback" not in r.err, r


# -- export: an existing folder as OUT, failures --------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_into_an_existing_folder_writes_inside_it_like_cp(
    ckpts: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    r = cli("export", ckpts["native"], str(out_dir), "--format", fmt)
    assert r.rc == 0, r
    name = "native.safetensors" if fmt == "safetensors" else "native.pt"
    assert r.out.startswith(f"wrote {out_dir / name} "), r
    assert sorted(os.listdir(out_dir)) == [name]
    if fmt == "torch":
        assert_state_equal(torch.load(out_dir / name, weights_only=True), _state())
    # OUT/<name> itself a folder: refused, naming it; nothing written, nothing left behind.
    (out_dir / name).unlink()
    (out_dir / name).mkdir()
    r = cli("export", ckpts["native"], str(out_dir), "--format", fmt)
    assert r.rc == 2, r
    assert r.err.strip() == f"torchckpt: cannot export to {out_dir / name}: it is a directory", r
    assert sorted(os.listdir(out_dir)) == [name] and os.listdir(out_dir / name) == []


def test_export_into_a_missing_folder_names_out(ckpts: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "x.safetensors"
    r = cli("export", ckpts["native"], str(out), "--format", "safetensors")
    assert r.rc == 2, r
    assert r.err.strip() == f"torchckpt: cannot export to {out}: [Errno 2] No such file or directory", r
    assert os.listdir(tmp_path) == []


# -- tied tensors: inspect counts them once, export keeps every key ------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("tied")
    emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"emb": emb, "head": {"weight": emb}, "bias": torch.zeros(3), "step": 7}
    return {fmt: _save(str(base / fmt), state, fmt) for fmt in ("safetensors", "torch_save")}


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
def test_inspect_counts_a_tied_tensor_once_and_names_its_alias(tied: dict[str, str], fmt: str) -> None:
    text, js = cli_many(["inspect", tied[fmt]], ["inspect", tied[fmt], "--json"])
    assert text.rc == 0, text
    rows = {line.split()[0]: line for line in text.out.splitlines()[2:] if line.strip()}
    assert rows["head.weight"].split()[-3:] == ["(tied", "to", "emb)"], text
    assert "total: 2 tensors, 60 B; 1 tied key (same tensor as another key); 1 plain values" in text.out, text
    assert js.rc == 0, js
    doc = json.loads(js.out)
    assert doc["keys"]["head.weight"] == {
        "type": "tensor", "dtype": "float32", "shape": [3, 4], "bytes": 48, "tied_to": "emb"
    }  # fmt: skip
    assert "tied_to" not in doc["keys"]["emb"]
    assert doc["totals"] == {"tensors": 2, "tensor_bytes": 48 + 12, "tied_keys": 1, "values": 1}


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
def test_safetensors_export_keeps_every_tied_key(tied: dict[str, str], tmp_path: Path, fmt: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = str(tmp_path / "tied.safetensors")
    r = cli("export", tied[fmt], out, "--format", "safetensors")
    assert r.rc == 0, r
    loaded = load_file(out)  # what Hugging Face tools call
    emb = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert sorted(loaded) == ["bias", "emb", "head.weight"]
    assert_state_equal(loaded["emb"], emb)
    assert_state_equal(loaded["head.weight"], emb)
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()["torchckpt_tied"]) == {"head.weight": "emb"}


# -- error paths: JSON, manager roots, one line, exit codes ---------------------


def test_every_argument_has_help() -> None:
    import argparse

    from torchckpt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == ["diff", "export", "gc", "import-dcp", "inspect", "ls", "verify"]
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"torchckpt {name}: {action.dest} has no help"
    r = cli("export", "--help")
    assert r.rc == 0 and "goes inside it" in " ".join(r.out.split()), r  # what an existing folder as OUT means


def test_odd_metrics_and_times_written_through_the_public_api_list(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ck = checkpointer("safetensors")
    ck.save(str(root / "step_0000000001"), {"x": torch.ones(2)}, metadata={"metrics": [1, 2], "step": 1})
    with _root_with_steps(root, [2]):
        pass
    # The manager takes only numbers as metrics; the checkpointers' metadata stores any JSON under "metrics".
    odd = {"nested": {"a": 1}, "text": "ok", "none": None}
    ck.save(str(root / "step_0000000003"), {"x": torch.ones(2)}, metadata={"metrics": odd, "step": 3})
    r = cli("ls", str(root))
    assert r.rc == 0, r
    rows = {line.split()[0]: line for line in r.out.splitlines()[1:]}
    assert sorted(rows) == ["1", "2", "3"], r
    assert "[1, 2]" in rows["1"], r
    assert "nested={'a': 1}" in rows["3"] and "text=ok" in rows["3"] and "none=None" in rows["3"], r


def test_broken_pipe_exits_quietly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with _root_with_steps(root, [1, 2, 3]):
        pass
    for args in (["ls", str(root)], ["ls", str(root), "--json"], ["inspect", os.path.join(root, "step_0000000001")]):
        p = subprocess.Popen([sys.executable, "-m", "torchckpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        p.stdout.close()  # like `| head` that has read enough
        _, err = p.communicate(timeout=90)
        assert err == b"", (args, err)
        assert p.returncode == 141, (args, p.returncode)  # 128 + SIGPIPE, as the shell reports for cat
