"""The ``torchckpt`` command on a full disk, a read-only root, leftovers of crashes and bad paths.

``export`` onto a full disk fails with one line naming the user's OUT path
and the errno, removes its temporary file and frees the space; ``gc`` on a
read-only root reports every directory it could not delete (path and errno)
and exits 1, never "nothing to delete"; ``gc --dry-run`` deletes nothing and
``gc`` never deletes the only copy of a step; every subcommand given a
missing path, a file, a corrupt manifest or a manager's root exits 2 with one
line naming the path (``verify`` of a corrupt checkpoint: 1), as JSON too
under ``--json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fault_util import child_env, free_bytes, remount, tmpfs

import torchckpt as tc
from ckpt_testutil import checkpointer, file_name

pytestmark = pytest.mark.timeout(180)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchckpt", *args], capture_output=True, text=True, timeout=90, env=child_env()
    )


@dataclass
class Result:
    args: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"torchckpt {' '.join(self.args)} -> {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli(*args: str) -> Result:
    p = _cli(*args)
    return Result(list(args), p.returncode, p.stdout, p.stderr)


def cli_many(*commands: Sequence[str]) -> list[Result]:
    """Run independent commands side by side (each one is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda c: cli(*c), commands))


def _root_with_steps(root: Path, steps: Sequence[int]) -> tc.CheckpointManager:
    mgr = tc.CheckpointManager(root, async_save=False)
    for s in steps:
        mgr.save(s, {"w": torch.full((10,), float(s)), "step": s}, metrics={"loss": 1.0 / s})
    return mgr


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("good") / "native")
    checkpointer("safetensors").save(path, {"w": torch.ones(3), "step": 1})
    return path


@pytest.mark.parametrize("layout", ["safetensors", "torch_save"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_onto_a_full_disk_names_out_and_leaves_nothing(tmp_path, layout: str, fmt: str) -> None:
    src = str(tmp_path / "ckpt")
    checkpointer(layout).save(src, {"w": torch.rand(600_000), "meta": {"step": 3}})  # 2.3 MiB
    with tmpfs(str(tmp_path / "disk"), "1m") as disk:
        free = free_bytes(disk)
        for out in (os.path.join(disk, "model.out"), disk):  # a file, and a folder to write into
            r = _cli("export", src, out, "--format", fmt)
            assert r.returncode == 2, r
            inside = "ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt"
            named = out if out != disk else os.path.join(disk, inside)
            assert r.stderr == f"torchckpt: cannot export to {named}: [Errno 28] No space left on device\n", r
            assert r.stdout == "", r
            assert os.listdir(disk) == [], "the temporary file was left behind"
            assert free_bytes(disk) == free


def test_gc_on_a_read_only_root_reports_every_failure(tmp_path) -> None:
    with tmpfs(str(tmp_path / "disk"), "16m") as disk:
        root = os.path.join(disk, "root")
        with tc.CheckpointManager(root, async_save=False) as mgr:
            for step in (1, 2, 3):
                mgr.save(step, {"w": torch.full((10,), float(step))})
        trash = os.path.join(root, ".step_0000000003.torchckpt-trash-0abc")
        os.makedirs(trash)
        before = sorted(os.listdir(root))
        remount(disk, "ro")
        try:
            dry = _cli("gc", root, "--keep-last", "1", "--dry-run")
            real = _cli("gc", root, "--keep-last", "1")
        finally:
            remount(disk, "rw")
        assert sorted(os.listdir(root)) == before

    assert dry.returncode == 0, dry
    assert dry.stdout.splitlines()[0] == "would delete 2 step(s): [1, 2]", dry

    assert real.returncode == 1, real
    assert "nothing to delete" not in real.stdout, real
    assert real.stdout.splitlines() == ["deleted 0 step(s): []; could not delete 2: [1, 2]"], real
    failed = sorted(real.stderr.splitlines())
    assert failed == sorted(
        f"torchckpt: could not delete {p}: [Errno 30] Read-only file system"
        for p in (os.path.join(root, "step_0000000001"), os.path.join(root, "step_0000000002"), trash)
    ), real


# -- gc: dry run, leftovers, failures ------------------------------------------


def _leftover(root: Path, name: str, *, with_manifest: bool = False) -> Path:
    """A hidden directory as an interrupted save or delete leaves it."""
    d = root / name
    d.mkdir()
    (d / file_name("safetensors")).write_bytes(b"x" * 100)
    if with_manifest:
        (d / "manifest.json").write_bytes(b"{}")
    return d


def test_gc_dry_run_deletes_nothing_and_lists_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with _root_with_steps(root, [1, 2, 3]):
        pass
    trash = _leftover(root, ".step_1.torchckpt-trash-0123abcd", with_manifest=True)  # an interrupted retention
    half = _leftover(root, ".step_0000000002.torchckpt-trash-4567")  # an old generation half deleted
    pending = _leftover(root, ".step_0000000004.torchckpt-pending")  # a crashed save of step 4
    before = sorted(os.listdir(root))

    dry = cli("gc", str(root), "--keep-last", "2", "--dry-run")
    assert dry.rc == 0, dry
    assert sorted(os.listdir(root)) == before, "a dry run deleted something"
    lines = dry.out.splitlines()
    assert lines[0] == "would delete 1 step(s): [1]", dry
    assert lines[1] == "would delete 3 leftover(s) of interrupted saves and deletes:", dry
    assert sorted(line.strip() for line in lines[2:]) == sorted(str(p) for p in (trash, half, pending)), dry

    real = cli("gc", str(root), "--keep-last", "2")
    assert real.rc == 0, real
    assert real.out.splitlines()[:2] == [
        "deleted 1 step(s): [1]",
        "deleted 3 leftover(s) of interrupted saves and deletes:",
    ], real
    assert sorted(n for n in os.listdir(root) if not n.endswith("-lock")) == ["step_0000000002", "step_0000000003"]

    again = cli("gc", str(root), "--keep-last", "2", "--dry-run")
    assert (again.rc, again.out.strip()) == (0, "nothing to delete"), again


def test_gc_keeps_an_old_generation_whose_path_is_empty(tmp_path: Path) -> None:
    # An overwrite interrupted between moving the old directory aside and the new one in: the aside
    # directory holds the only copy of the step. gc must not delete it (a save or load restores it).
    root = tmp_path / "root"
    with _root_with_steps(root, [1, 2]) as mgr:
        aside = root / ".step_0000000002.torchckpt-trash-89ab"
        os.rename(mgr.path(2), aside)
    r = cli("gc", str(root), "--keep-last", "1")
    assert r.rc == 0, r
    assert aside.is_dir() and (aside / "manifest.json").is_file(), r
    assert f"kept {aside}: it holds the only copy of {root / 'step_0000000002'}" in r.out, r


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("bad")
    root = base / "root"
    with _root_with_steps(root, [1, 2]):
        pass
    corrupt = base / "corrupt"
    shutil.copytree(root / "step_0000000001", corrupt)
    manifest = corrupt / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-40] + b"garbage")
    (base / "file").write_text("not a checkpoint")
    return {"missing": str(base / "missing"), "file": str(base / "file"), "corrupt": str(corrupt), "root": str(root)}


_SINGLE = ["inspect", "verify", "diff", "export"]
_ROOT_COMMANDS = {("ls", "root"), ("gc", "root")}


def _command(sub: str, path: str, good: str, tmp: Path) -> list[str]:
    return {
        "ls": ["ls", path],
        "gc": ["gc", path, "--keep-last", "1", "--dry-run"],
        "inspect": ["inspect", path],
        "verify": ["verify", path],
        "diff": ["diff", good, path],
        "export": ["export", path, str(tmp / "out.safetensors"), "--format", "safetensors"],
    }[sub]


def test_every_command_fails_bad_paths_with_one_line(
    good: str, bad: dict[str, str], tmp_path: Path
) -> None:
    # A manager's root is what ls and gc take: tested above.
    cases = [(sub, kind) for sub in ["ls", "gc", *_SINGLE] for kind in bad if (sub, kind) not in _ROOT_COMMANDS]
    results = cli_many(*[_command(sub, bad[kind], good, tmp_path) for sub, kind in cases])
    for (sub, kind), r in zip(cases, results):
        expected_rc = 1 if (sub, kind) == ("verify", "corrupt") else 2  # a bad checkpoint is what verify reports
        assert r.rc == expected_rc, r
        assert "Traceback" not in r.err, r
        if expected_rc == 2:
            assert r.out == "", r
            lines = r.err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("torchckpt: ") and bad[kind] in lines[0], r
        if kind == "missing":
            assert f"no such checkpoint: {bad['missing']} does not exist" in r.err or (
                sub in ("ls", "gc") and f"no such directory: {bad['missing']}" in r.err
            ), r
            assert "not a directory" not in r.err, r
        if kind == "file":
            assert "not a directory" in r.err, r
        if kind == "root":
            newest = os.path.join(bad["root"], "step_0000000002")
            assert r.err.strip().endswith(
                f"{bad['root']} holds the steps 1, 2 of a CheckpointManager, not one checkpoint: "
                f"give a step's directory (the newest is {newest}); `torchckpt ls {bad['root']}` lists them"
            ), r
        if kind == "corrupt" and sub in ("ls", "gc"):
            assert "is a checkpoint, not a directory of steps" in r.err, r
    assert not os.path.exists(tmp_path / "out.safetensors")
    assert not os.path.exists(bad["missing"])


@pytest.mark.parametrize("sub", ["ls", "inspect", "verify", "diff"])
def test_json_output_reports_errors_as_json(
    good: str, bad: dict[str, str], tmp_path: Path, sub: str
) -> None:
    kinds = ["missing", "file"] + (["root"] if sub != "ls" else [])
    commands = [[*_command(sub, bad[k], good, tmp_path), "--json"] for k in kinds]
    commands.append([sub, "--json", "--no-such-option"])
    results = cli_many(*commands)
    for r in results:
        assert r.rc == 2, r
        doc = json.loads(r.out)
        assert doc["ok"] is False, r
        assert doc["error"]["message"] == r.err.strip().removeprefix("torchckpt: "), r
        assert "Traceback" not in r.err, r
    for k, r in zip(kinds, results):
        assert doc["error"]["type"], r
        assert bad[k] in json.loads(r.out)["error"]["message"], r
    verify_missing = json.loads(results[0].out) if sub == "verify" else None
    if verify_missing is not None:
        assert verify_missing["path"] == bad["missing"] and verify_missing["problems"] == []
