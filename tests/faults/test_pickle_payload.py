"""Loading never executes code from a checkpoint: pickle payloads are refused, never run."""

from __future__ import annotations

import base64
import builtins
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch
from ckpt_testutil import checkpointer, reader

from torchckpt.format.manifest import seal_manifest
from torchckpt.checkpoint_reader import LegacyCheckpointWarning
from torchckpt.errors import UnsafeObjectError
from torchckpt.format.torch_save import file_digest


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
    fd = os.open(file, os.O_RDONLY)
    try:
        size, digest = file_digest(fd)
    finally:
        os.close(fd)
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
