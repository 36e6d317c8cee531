"""Loading never executes code from a checkpoint: pickle payloads are refused, never run."""

from __future__ import annotations

import base64
import builtins
import json
import os
import pickle
import shutil
import warnings
from collections import OrderedDict
from contextlib import closing

import pytest
import torch
from ckpt_testutil import checkpointer, reader

from torchckpt.checkpoint_reader import LegacyCheckpointWarning
from torchckpt.errors import UnsafeObjectError
from torchckpt.format.manifest import seal_manifest
from torchckpt.format.verification import file_digest
from torchckpt.storage.locate import storage_for


def _file_digest(path: str, name: str) -> tuple[int, str]:
    """Size and digest of the rank file ``name`` of the checkpoint at ``path``, as the manifest records them."""
    with closing(storage_for(path).open_generation()) as generation, closing(generation.open(name)) as src:
        return file_digest(src)


class SystemPayload:
    """Unpickling runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling runs ``exec`` of code that writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _payload(kind: str, marker: str):
    return SystemPayload(marker) if kind == "system" else ExecPayload(marker)


def _write_legacy(path: str, obj, style: str) -> None:
    os.makedirs(path)
    file = os.path.join(path, "checkpoint_0.pt")
    if style == "zip":
        torch.save(obj, file)
    elif style == "old_format":
        torch.save(obj, file, _use_new_zipfile_serialization=False)
    else:
        with open(file, "wb") as f:
            f.write(pickle.dumps(obj, protocol=2))


@pytest.fixture
def marker(tmp_path) -> str:
    path = str(tmp_path / "MARKER")
    assert not os.path.exists(path)
    return path


def test_the_payloads_work_when_unpickled(tmp_path) -> None:
    # proof that the payloads below are live: plain pickle.loads runs them
    for kind in ("system", "exec"):
        m = str(tmp_path / f"proof_{kind}")
        pickle.loads(pickle.dumps(_payload(kind, m)))
        assert os.path.exists(m)


@pytest.mark.parametrize("with_template", [False, True], ids=["whole", "template"])
@pytest.mark.parametrize("style", ["zip", "old_format", "raw_pickle"])
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_legacy_checkpoint_payload_is_refused(
    tmp_path, marker: str, kind: str, style: str, with_template: bool
) -> None:
    path = str(tmp_path / "legacy")
    _write_legacy(path, {"w": torch.ones(2), "evil": _payload(kind, marker)}, style)
    template = {"w": torch.zeros(2)} if with_template else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyCheckpointWarning)
        with pytest.raises(UnsafeObjectError) as info:
            reader().read(path, template)
        with pytest.raises(UnsafeObjectError):
            checkpointer("torch_save").load(path)
    assert not os.path.exists(marker), "the payload ran"
    err = info.value
    assert isinstance(err, TypeError)
    assert "checkpoint_0.pt" in str(err) and path in str(err) and "allow_pickle" in str(err)
    if kind == "system" and style != "raw_pickle":
        assert "system" in str(err)  # says which global it refused


def test_payload_behind_a_valid_manifest_is_refused(tmp_path, marker: str) -> None:
    # a committed torch_save checkpoint whose rank file is replaced, and whose manifest is made to match
    path = str(tmp_path / "ckpt")
    checkpointer("torch_save").save(path, {"w": torch.ones(2)})
    file = os.path.join(path, "checkpoint_0.pt")
    torch.save({"w": torch.ones(2), "evil": SystemPayload(marker)}, file)
    size, digest = _file_digest(path, "checkpoint_0.pt")
    manifest_file = os.path.join(path, "manifest.json")
    with open(manifest_file) as f:
        doc = json.load(f)
    doc["ranks"][0].update(size_bytes=size, digest=digest)
    with open(manifest_file, "wb") as f:
        f.write(seal_manifest(doc))  # an attacker can seal a manifest too
    for template in (None, {"w": torch.zeros(2)}):
        with pytest.raises(UnsafeObjectError):
            reader().read(path, template)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("place", ["value", "nested", "root_item"])
def test_native_pickle_node_is_refused(tmp_path, marker: str, place: str) -> None:
    path = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(path, {"w": torch.ones(2), "opt": {"lr": 0.1}})
    node = {"pickle": base64.b64encode(pickle.dumps(SystemPayload(marker))).decode()}
    manifest_file = os.path.join(path, "manifest.json")
    with open(manifest_file) as f:
        doc = json.load(f)
    tree = doc["ranks"][0]["tree"]
    items = tree["dict"]
    if place == "value":
        items.append(["evil", node])
        key = "evil"
    elif place == "nested":
        opt = next(v for k, v in items if k == "opt")
        opt["dict"].append(["sched", {"list": [1, node]}])
        key = "opt.sched[1]"
    else:
        items[0][0] = node  # a pickled dict key
        key = None
    with open(manifest_file, "wb") as f:
        f.write(seal_manifest(doc))  # an attacker can seal a manifest too
    with pytest.raises(UnsafeObjectError) as info:
        reader().read(path)
    assert not os.path.exists(marker), "the payload ran"
    assert "allow_pickle" in str(info.value) and path in str(info.value)
    if key is not None:
        assert info.value.key == key and repr(key) in str(info.value)
    with pytest.raises(UnsafeObjectError):
        checkpointer("safetensors").load(path, {"w": torch.zeros(2)})
    assert not os.path.exists(marker)


def test_native_checkpoint_saved_with_pickle_is_refused_without_opt_in(tmp_path, marker: str) -> None:
    # a writer that allowed pickle produced the payload itself; a reader that did not opt in refuses it
    path = str(tmp_path / "ckpt")
    checkpointer("safetensors", allow_pickle=True).save(path, {"evil": ExecPayload(marker)})
    assert not os.path.exists(marker)
    with pytest.raises(UnsafeObjectError):
        reader().read(path)
    assert not os.path.exists(marker)
    shutil.rmtree(path)


# ---------------------------------------------------------------------------- every place, every entry point


def _torch_save_places(payload) -> dict:
    return {
        "value": {"w": torch.ones(2), "evil": payload},
        "nested_list": {"w": torch.ones(2), "opt": {"groups": [1, {"x": payload}]}},
        "tuple": {"w": torch.ones(2), "betas": (0.9, payload)},
        "dict_key": {"w": torch.ones(2), "sub": {payload: 1}},
        "odict_value": {"w": torch.ones(2), "sched": OrderedDict([("a", payload)])},
        "root": payload,
    }


TORCH_SAVE_PLACES = sorted(_torch_save_places(None))


def _pickle_node(marker: str) -> dict:
    return {"pickle": base64.b64encode(pickle.dumps(SystemPayload(marker))).decode()}


def _native_places(tree: dict, node: dict) -> dict:
    """Trees of a checkpoint of ``{"w": tensor, "opt": {"lr": 0.1}}`` with ``node`` hidden in each place."""
    import copy

    def edit(fn) -> dict:
        t = copy.deepcopy(tree)
        fn(t["dict"])
        return t

    def opt(items: list) -> list:
        return next(v for k, v in items if k == "opt")["dict"]

    return {
        "value": edit(lambda items: items.append(["evil", node])),
        "nested_list": edit(lambda items: opt(items).append(["groups", {"list": [1, {"dict": [["x", node]]}]}])),
        "tuple": edit(lambda items: opt(items).append(["betas", {"tuple": [0.9, node]}])),
        "dict_key": edit(lambda items: opt(items).append([{"tuple": [1, node]}, 1])),
        "odict_value": edit(lambda items: items.append(["sched", {"odict": [["a", node]]}])),
        "root": node,
    }


NATIVE_PLACES = sorted(_native_places({"dict": [["opt", {"dict": []}]]}, {}))


def _reseal_rank(path: str, update: dict) -> None:
    manifest_file = os.path.join(path, "manifest.json")
    with open(manifest_file) as f:
        doc = json.load(f)
    doc["ranks"][0].update(update)
    with open(manifest_file, "wb") as f:
        f.write(seal_manifest(doc))  # an attacker can seal a manifest too


def _hide_payload(path: str, fmt: str, place: str, marker: str) -> None:
    """Turn the committed checkpoint at ``path`` into one whose ``place`` holds a payload, manifest matching."""
    if fmt == "torch_save":
        file = os.path.join(path, "checkpoint_0.pt")
        torch.save(_torch_save_places(SystemPayload(marker))[place], file)
        size, digest = _file_digest(path, "checkpoint_0.pt")
        _reseal_rank(path, {"size_bytes": size, "digest": digest})
    else:
        with open(os.path.join(path, "manifest.json")) as f:
            tree = json.load(f)["ranks"][0]["tree"]
        _reseal_rank(path, {"tree": _native_places(tree, _pickle_node(marker))[place]})


def _entry_points(path: str, fmt: str) -> dict:
    """Every way torchckpt reads a checkpoint's state; each must refuse (or not touch) the payload."""
    from torchckpt import cli
    from torchckpt.manager import CheckpointManager
    from torchckpt.tools import open_lazy

    def lazy() -> None:
        with open_lazy(path):
            pass

    root = os.path.dirname(path)
    return {
        "reader": lambda: reader().read(path),
        "reader_template": lambda: reader().read(path, {"w": torch.zeros(2)}),
        "reader_no_verify": lambda: reader().read(path, verify=False),
        "checkpointer": lambda: checkpointer(fmt).load(path),
        "manager": lambda: CheckpointManager(root, async_save=False, format=fmt).load(step=1),
        "open_lazy": lazy,
        "cli_inspect": lambda: cli.main(["inspect", path]),
        "cli_diff": lambda: cli.main(["diff", path, path]),
        "cli_export": lambda: cli.main(["export", path, os.path.join(root, "out.bin"), "--format", "torch"]),
        "cli_verify": lambda: cli.main(["verify", path]),
    }


@pytest.mark.parametrize(
    ("fmt", "place"),
    [("torch_save", p) for p in TORCH_SAVE_PLACES] + [("safetensors", p) for p in NATIVE_PLACES],
)
def test_payload_anywhere_is_never_run_by_any_entry_point(tmp_path, marker: str, fmt: str, place: str) -> None:
    path = str(tmp_path / "step_0000000001")
    checkpointer(fmt).save(path, {"w": torch.ones(2), "opt": {"lr": 0.1}}, metadata={"step": 1})
    _hide_payload(path, fmt, place, marker)
    for name, load in _entry_points(path, fmt).items():
        if name.startswith("cli_"):
            code = load()
            # verify checks bytes, never unpickles: the file matches its digest, so it is "OK"
            assert code == (0 if name == "cli_verify" else 2), (name, code)
        else:
            with pytest.raises(UnsafeObjectError) as info:
                load()
            assert path in str(info.value), (name, str(info.value))
            assert isinstance(info.value, TypeError)
        assert not os.path.exists(marker), f"the payload ran through {name}"


def test_pickle_shaped_metadata_is_plain_data(tmp_path, marker: str) -> None:
    """User metadata is plain JSON: a pickle node or a pickled blob in it stays a string, never unpickled."""
    from torchckpt import cli
    from torchckpt.checkpoint_reader import read_manifest
    from torchckpt.manager import CheckpointManager

    blob = base64.b64encode(pickle.dumps(SystemPayload(marker))).decode()
    meta = {"step": 1, "user": {"note": {"pickle": blob}, "raw": blob, "list": [{"pickle": blob}]}}
    for fmt in ("torch_save", "safetensors"):
        root = tmp_path / fmt
        root.mkdir()
        path = str(root / "step_0000000001")
        checkpointer(fmt).save(path, {"w": torch.ones(2)}, metadata=meta)
        assert read_manifest(path).metadata == meta
        assert torch.equal(reader().read(path)[0]["w"], torch.ones(2))
        manager = CheckpointManager(str(root), async_save=False, format=fmt)
        assert manager.steps() == [1]
        assert manager.load()[0] == 1
        manager.close()
        assert cli.main(["inspect", path]) == 0 and cli.main(["ls", str(root)]) == 0
    assert not os.path.exists(marker)


def test_payload_in_the_native_header_metadata_is_never_read(tmp_path, marker: str) -> None:
    """The safetensors ``__metadata__`` of a rank file is never interpreted: a payload there loads as data."""
    from torchckpt.checkpoint_reader import read_manifest
    from torchckpt.format.native import digest_of
    from torchckpt.format.extents import checksum

    path = str(tmp_path / "ckpt")
    checkpointer("safetensors").save(path, {"w": torch.ones(2)})
    entry = read_manifest(path).ranks[0]
    file = os.path.join(path, "rank_00000.safetensors")
    with open(file, "rb") as f:
        data = bytearray(f.read())
    header = json.loads(bytes(data[8 : entry.data_offset]))
    header["__metadata__"]["pickle"] = base64.b64encode(pickle.dumps(SystemPayload(marker))).decode()
    text = json.dumps(header).encode()
    assert 8 + len(text) <= entry.data_offset
    data[8 : entry.data_offset] = text.ljust(entry.data_offset - 8, b" ")
    data[:8] = len(text.ljust(entry.data_offset - 8, b" ")).to_bytes(8, "little")
    with open(file, "wb") as f:
        f.write(data)
    _reseal_rank(path, {"digest": digest_of(checksum(bytes(data[: entry.data_offset])), list(entry.tensors))})
    assert torch.equal(reader().read(path)[0]["w"], torch.ones(2))
    assert not os.path.exists(marker)
