"""The ``torchckpt`` command on ``s3://`` checkpoints (moto's S3 server): every command, its output and errors.

Checkpoints are saved by ``CheckpointWriter`` in both layouts (``safetensors``
and the default ``torch_save``). Most commands run in this process through
``cli.main`` (the client is configured by the ``AWS_*`` environment the
``s3_bucket`` fixture sets); the error cases run the real command in a
subprocess and assert one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import obstore
import pytest
import safetensors.torch
import torch
from obstore.store import from_url

import torchckpt as tc
from ckpt_testutil import assert_state_equal
from s3_testutil import MotoServer, s3_env
from sharded_testutil import sharded_checkpoint
from torchckpt.cli import main
from torchckpt.errors import CorruptCheckpointError
from torchckpt.reading import read_manifest
from torchckpt.storage.object_storage import GENERATION_ATTRIBUTE, list_children

pytestmark = pytest.mark.timeout(120)

LAYOUTS = ["safetensors", "torch_save"]


def _state(step: int = 3) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
        "step": step,
        "name": "run",
    }


def _write(url: str, state: Any, fmt: str = "torch_save", **kwargs: Any) -> str:
    config = tc.CheckpointWriterConfig(format=fmt) if fmt != "torch_save" else tc.CheckpointWriterConfig()
    tc.CheckpointWriter(config, tc.RankInfo(0, 1)).write(url, state, **kwargs)
    return url


def _read(url: str) -> Any:
    return tc.CheckpointReader(tc.RankInfo(0, 1)).read(url)[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``torchckpt ARGV`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m torchckpt ARGV`` in a subprocess (the environment of this process, ``env`` on top)."""
    return subprocess.run(
        [sys.executable, "-m", "torchckpt", *argv], capture_output=True, text=True, timeout=90,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _store(bucket_url: str) -> Any:
    return from_url(bucket_url, client_options={"allow_http": "true"})


def _keys(bucket_url: str, prefix: str) -> list[str]:
    return sorted(m["path"] for batch in obstore.list(_store(bucket_url), prefix) for m in batch)


def _exists(bucket_url: str, key: str) -> bool:
    try:
        obstore.head(_store(bucket_url), key)
    except FileNotFoundError:
        return False
    return True


def _bucket_of(url: str) -> str:
    return "/".join(url.split("/")[:3])


def _rank_object_key(url: str) -> str:
    """The key of rank 0's file in the committed generation of the checkpoint at ``url``."""
    file = read_manifest(url).ranks[0].file
    prefix = url.split("/", 3)[3] + "/"
    found = [k for k in _keys(_bucket_of(url), prefix) if k.endswith("/" + file) and "/gen-" in k]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def saved(s3_bucket: str) -> dict[str, str]:
    """Checkpoints in a fresh bucket: each layout, and a safetensors one with one value changed."""
    changed = _state()
    changed["model"]["w"][0, 0] = 5.0
    return {
        "safetensors": _write(f"{s3_bucket}/native", _state(), "safetensors"),
        "torch_save": _write(f"{s3_bucket}/pickled", _state()),
        "changed": _write(f"{s3_bucket}/changed", changed, "safetensors"),
        "bucket": s3_bucket,
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inspect_shows_the_keys_of_an_s3_checkpoint(saved: dict[str, str], layout: str, capsys) -> None:
    url = saved[layout]
    rc, out, err = run(capsys, "inspect", url)
    assert (rc, err) == (0, ""), err
    lines = out.splitlines()
    assert lines[0] == f"{url}: {layout}, 1 rank(s), showing rank 0"
    assert lines[1].split() == ["key", "dtype/type", "shape/value", "bytes"]
    assert lines[2].split() == ["model.w", "float32", "[3,", "4]", "48", "B"]
    assert lines[3].split() == ["model.b", "bfloat16", "[2]", "4", "B"]
    assert lines[4].split() == ["step", "int", "3"] and lines[5].split() == ["name", "str", "'run'"]
    assert lines[6] == "total: 2 tensors, 52 B; 2 plain values"
    rc, out, _ = run(capsys, "inspect", url, "--json")
    doc = json.loads(out)
    assert (rc, doc["path"], doc["format"], doc["totals"]["tensor_bytes"]) == (0, url, layout, 52)
    assert doc["keys"]["model.w"] == {"type": "tensor", "dtype": "float32", "shape": [3, 4], "bytes": 48}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_passes_a_good_s3_checkpoint(saved: dict[str, str], layout: str, capsys) -> None:
    url = saved[layout]
    size = sum(r.size_bytes for r in read_manifest(url).ranks)
    rc, out, err = run(capsys, "verify", url)
    assert (rc, err) == (0, "")
    assert out.startswith(f"{url}: OK (1 rank file(s), ") and out.rstrip().endswith("every checksum verified)"), out
    assert f"{size / 1024:.1f} KiB" in out
    rc, out, _ = run(capsys, "verify", url, "--json")
    assert (rc, json.loads(out)) == (0, {"path": url, "ok": True, "problems": []})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_verify_names_a_corrupted_rank_object(saved: dict[str, str], layout: str, capsys) -> None:
    url = saved[layout]
    manifest = read_manifest(url)
    entry = manifest.ranks[0]
    key = _rank_object_key(url)
    store = _store(saved["bucket"])
    data = bytearray(bytes(obstore.get(store, key).bytes()))
    # A byte of model.w (native: its offset in the file; torch_save: anywhere, the digest covers the file).
    at = entry.tensors[0].offset if layout == "safetensors" else len(data) // 2
    data[at] ^= 0xFF
    obstore.put(store, key, bytes(data))
    rc, out, err = run(capsys, "verify", url)
    assert (rc, err) == (1, ""), (out, err)
    lines = out.splitlines()
    assert lines[0] == f"{url}: BAD (1 problem(s))"
    if layout == "safetensors":
        assert lines[1].startswith(f"  {entry.file} key 'model.w': checksum mismatch in rank file {entry.file}"), out
    else:
        assert lines[1].startswith(f"  {entry.file}: rank file {entry.file} does not match the manifest"), out
    rc, out, _ = run(capsys, "verify", url, "--json")
    doc = json.loads(out)
    assert (rc, doc["ok"], [p["file"] for p in doc["problems"]]) == (1, False, [entry.file])
    with pytest.raises(CorruptCheckpointError, match=entry.file):
        _read(url)


def test_diff_compares_s3_checkpoints_and_local_ones(saved: dict[str, str], tmp_path: Path, capsys) -> None:
    rc, out, _ = run(capsys, "diff", saved["safetensors"], saved["torch_save"])
    assert (rc, out) == (0, "no differences\n")
    rc, out, _ = run(capsys, "diff", saved["safetensors"], saved["changed"])
    assert (rc, out) == (1, "~ model.w: values differ (max abs diff 5)\n")
    local = str(tmp_path / "local")
    _write(local, {**_state(), "extra": 1}, "safetensors")
    rc, out, _ = run(capsys, "diff", saved["torch_save"], local)
    assert (rc, out) == (1, "+ extra\n")
    rc, out, _ = run(capsys, "diff", saved["changed"], local, "--json")
    doc = json.loads(out)
    assert (rc, doc["added"], list(doc["changed"])) == (1, ["extra"], ["model.w"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_writes_a_local_file_from_an_s3_checkpoint(
    saved: dict[str, str], layout: str, tmp_path: Path, capsys
) -> None:
    url = saved[layout]
    out_file = tmp_path / "model.safetensors"
    rc, out, err = run(capsys, "export", url, str(out_file), "--format", "safetensors", "--strip-prefix", "model.")
    assert (rc, err) == (0, "")
    assert out.startswith(f"wrote {out_file} (") and out.rstrip().endswith(", safetensors)")
    loaded = safetensors.torch.load_file(str(out_file))
    assert_state_equal(dict(sorted(loaded.items())), dict(sorted(_state()["model"].items())))
    folder = tmp_path / "exports"
    folder.mkdir()
    rc, out, _ = run(capsys, "export", url, str(folder), "--format", "torch")
    name = url.rsplit("/", 1)[1] + ".pt"  # named after the URL's last part, as after a directory's
    assert (rc, os.listdir(folder)) == (0, [name]) and out.startswith(f"wrote {folder / name} (")
    assert_state_equal(torch.load(folder / name, weights_only=True), _state())


def test_an_export_to_an_object_store_is_refused_by_name(saved: dict[str, str], capsys) -> None:
    target = f"{saved['bucket']}/out.safetensors"
    rc, out, err = run(capsys, "export", saved["safetensors"], target, "--format", "safetensors")
    assert (rc, out) == (2, "")
    assert err.startswith(f"torchckpt: {target}: s3:// URLs are not supported here"), err
    assert not _exists(saved["bucket"], "out.safetensors")


def _upload_checkpoint(local: str, url: str, generation: str = "gen-0123abcd") -> str:
    """Copy a local checkpoint directory to ``url`` in the object store layout: its files, then the manifest."""
    store, prefix = _store(_bucket_of(url)), url.split("/", 3)[3]
    for name in sorted(os.listdir(local)):
        if name != "manifest.json":
            obstore.put(store, f"{prefix}/{generation}/{name}", Path(local, name).read_bytes())
    manifest = Path(local, "manifest.json").read_bytes()
    obstore.put(store, f"{prefix}/manifest.json", manifest, attributes={GENERATION_ATTRIBUTE: generation})
    return url


def test_a_sharded_s3_checkpoint_is_inspected_verified_and_consolidated(
    s3_bucket: str, tmp_path: Path, capsys
) -> None:
    """Three ranks' files in the store: inspect reads no chunk, export assembles every tensor from all of them."""
    full = {"model.w": torch.arange(24.0).reshape(4, 6), "model.b": torch.arange(5, dtype=torch.int64)}
    url = _upload_checkpoint(sharded_checkpoint(str(tmp_path / "sharded"), full, world=3), f"{s3_bucket}/sharded")
    rc, out, _ = run(capsys, "inspect", url)
    lines = out.splitlines()
    assert (rc, lines[0]) == (0, f"{url}: safetensors, 3 rank(s), showing rank 0")
    assert lines[2].split() == ["model.w", "float32", "[4,", "6]", "96", "B", "2", "chunks", "from", "ranks", "0-1"]
    assert lines[3].split() == ["model.b", "int64", "[5]", "40", "B", "3", "chunks", "from", "ranks", "0-2"]
    rc, out, _ = run(capsys, "verify", url)
    assert rc == 0 and out.strip().endswith("every checksum verified, 2 sharded tensor(s) tiled by their chunks)")
    out_file = tmp_path / "full.safetensors"
    assert run(capsys, "export", url, str(out_file), "--format", "safetensors")[0] == 0
    assert_state_equal(dict(sorted(safetensors.torch.load_file(str(out_file)).items())), dict(sorted(full.items())))


def _leftover(ckpt: str) -> str:
    """Upload an object of a generation no manifest names (what a crashed save leaves); its key."""
    key = ckpt.split("/", 3)[3] + "/gen-deadbeef/x"
    obstore.put(_store(_bucket_of(ckpt)), key, b"partial rank file")
    return key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gc_deletes_a_leftover_generation_and_keeps_the_committed_one(
    saved: dict[str, str], layout: str, capsys
) -> None:
    url = saved[layout]
    bucket = saved["bucket"]
    leftover = _leftover(url)
    committed = _rank_object_key(url)
    gen = f"{url}/gen-deadbeef"
    rc, out, _ = run(capsys, "gc", url)  # young: a save may be writing it
    assert rc == 0 and out.startswith(f"kept {gen}: written "), out
    assert out.rstrip().endswith(" s ago, a save may be in progress (--older-than 3600)"), out
    rc, out, _ = run(capsys, "gc", url, "--older-than", "0", "--dry-run")
    assert (rc, out) == (0, f"would delete 1 leftover(s) of interrupted saves and deletes:\n  {gen}\n")
    assert _exists(bucket, leftover)
    rc, out, err = run(capsys, "gc", url, "--older-than", "0")
    assert (rc, out, err) == (0, f"deleted 1 leftover(s) of interrupted saves and deletes:\n  {gen}\n", "")
    assert not _exists(bucket, leftover) and _exists(bucket, committed)
    assert_state_equal(_read(url), _state())
    assert run(capsys, "gc", url, "--older-than", "0")[:2] == (0, "nothing to delete\n")


def test_gc_on_a_root_deletes_old_steps_and_the_leftovers_below_it(s3_bucket: str, capsys) -> None:
    root = f"{s3_bucket}/run"
    for step in (1, 2, 3):
        _write(f"{root}/step_{step:010d}", _state(step), "safetensors", metadata={"step": step})
    _leftover(f"{root}/step_0000000003")
    rc, out, _ = run(capsys, "gc", root, "--keep-last", "1", "--older-than", "0", "--dry-run")
    assert (rc, out.splitlines()[0]) == (0, "would delete 2 step(s): [1, 2]")
    assert list_children(root) == ["step_0000000001", "step_0000000002", "step_0000000003"]
    rc, out, err = run(capsys, "gc", root, "--keep-last", "1", "--older-than", "0")
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "deleted 2 step(s): [1, 2]",
        "deleted 1 leftover(s) of interrupted saves and deletes:",
        f"  {root}/step_0000000003/gen-deadbeef",
    ]
    assert list_children(root) == ["step_0000000003"]
    assert_state_equal(_read(f"{root}/step_0000000003"), _state(3))
    rc, _, err = run(capsys, "gc", f"{root}/step_0000000003", "--keep-last", "1")
    assert rc == 2 and "--keep-last chooses among the steps of a root" in err, err
    rc, _, err = run(capsys, "inspect", root)
    assert rc == 2 and err == (
        f"torchckpt: {root} holds the steps 3 of a CheckpointManager, not one checkpoint: give a step's URL "
        f"(e.g. {root}/step_0000000003)\n"
    )
    rc, _, err = run(capsys, "gc", f"{s3_bucket}/nothing-here")
    assert (rc, err) == (
        2, f"torchckpt: nothing to clean at {s3_bucket}/nothing-here: no checkpoint there, nor below it\n"
    )


def test_import_dcp_writes_an_s3_checkpoint(s3_bucket: str, tmp_path: Path, capsys) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, "step": 7}
    src = str(tmp_path / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... save in a single process"
        dcp.save(state, checkpoint_id=src)
    dst = f"{s3_bucket}/imported"
    rc, out, err = run(capsys, "import-dcp", src, dst)
    assert (rc, err) == (0, ""), err
    assert out.startswith(f"imported {src} -> {dst}: 1 tensors (24 B, from 1 chunks), 1 plain values")
    assert_state_equal(_read(dst), state)
    rc, out, err = run(capsys, "import-dcp", src, dst)
    assert (rc, out, err) == (2, "", f"torchckpt: {dst} already holds a checkpoint: import-dcp writes a new one\n")
    assert run(capsys, "import-dcp", src, dst, "--overwrite")[0] == 0
    rc, out, _ = run(capsys, "verify", dst)
    assert rc == 0 and out.startswith(f"{dst}: OK (1 rank file(s)")


def test_storage_options_configure_the_client(saved: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the option says where the store is
    url = saved["safetensors"]
    rc, out, _ = run(capsys, "--storage-option", f"endpoint={endpoint}", "verify", url)
    assert rc == 0 and out.startswith(f"{url}: OK"), out
    rc, out, err = run(capsys, "--storage-option", "endpoint", "verify", url)
    assert (rc, out) == (2, "") and "--storage-option takes KEY=VALUE" in err and "'endpoint'" in err
    rc, out, err = run(capsys, "--storage-option", "colour=blue", "inspect", url)
    assert (rc, out) == (2, "") and err.startswith(f"torchckpt: {url}: cannot configure the object store client"), err
    assert "colour" in err


def _one_line_error(rc: int, out: str, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("torchckpt: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _in_process_and_one_real(capsys: pytest.CaptureFixture[str], commands: list[list[str]], *words: str) -> None:
    """Each command gives one line naming ``words``: the first as a real process (no traceback), the rest here."""
    p = run_process(*commands[0])
    _one_line_error(p.returncode, p.stdout, p.stderr, *words)
    for argv in commands[1:]:
        _one_line_error(*run(capsys, *argv), *words)


def test_a_missing_bucket_is_one_line_naming_the_url(s3_bucket: str, tmp_path: Path, capsys) -> None:
    url = "s3://no-such-bucket-torchckpt/ckpt"
    commands = [["inspect", url], ["verify", url], ["diff", url, url], ["gc", url],
                ["export", url, str(tmp_path / "x.pt"), "--format", "torch"]]  # fmt: skip
    _in_process_and_one_real(capsys, commands, url, "the bucket does not exist")
    assert not os.path.exists(tmp_path / "x.pt")


@pytest.fixture(scope="module")
def strict_server() -> Any:
    """A second moto server that checks credentials (none is valid): its one bucket made before that starts."""
    with pytest.MonkeyPatch.context() as mp:
        # start()'s probe and the bucket's creation go unchecked; every request after them is checked.
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "2")
        server = MotoServer().start()
    try:
        yield server, server.bucket()
    finally:
        server.stop()


def test_wrong_credentials_are_one_line_naming_the_url(strict_server: Any, monkeypatch, capsys) -> None:
    server, bucket = strict_server
    for k, v in {**s3_env(server.endpoint), "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{bucket}/ckpt"
    commands = [["inspect", url], ["verify", url], ["gc", url, "--older-than", "0"]]
    _in_process_and_one_real(capsys, commands, url, "access denied (check the credentials)")
