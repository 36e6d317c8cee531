"""Small hostile rank files that expand when read, and loads that fail part-way through.

Standard outcome: a ``torch_save`` rank file of a few KiB that would unpickle into a
huge or endless structure (shared sub-lists nested into an exponential tree, a list
that contains itself, a tensor viewing 2**31 elements of a one-element storage, a
deflated zip record) is refused with a :class:`CorruptCheckpointError` naming the
file and the key, by every reader (load with and without a template, the tools'
lazy reading, ``inspect``, ``diff``, ``export``), in time and memory bounded by the
file's size. A load that fails leaves the template as the documented contract says:
untouched when the template does not fit, and the error names the keys whose
tensors a corrupt native file may have overwritten.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest
import torch
from ckpt_testutil import checkpointer, file_name, flip_bit, reader, save_each_format

from torchckpt import cli
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CorruptCheckpointError, StateDictMismatchError
from torchckpt.format.manifest import seal_manifest
from torchckpt.format.verification import file_digest
from torchckpt.storage.locate import storage_for
from torchckpt.tools import export, iter_leaves, open_lazy

pytestmark = pytest.mark.timeout(120)

#: Longest a refusal may take (the bombs below take minutes or gigabytes when walked).
REFUSE_S = 10.0


def _file_digest(path: str, name: str) -> tuple[int, str]:
    """Size and digest of the rank file ``name`` of the checkpoint at ``path``, as the manifest records them."""
    with closing(storage_for(path).open_generation()) as generation, closing(generation.open(name)) as src:
        return file_digest(src)


def _bomb_tree(levels: int) -> Any:
    node: Any = [0]
    for _ in range(levels):
        node = [node, node]  # pickled once, referenced twice: 2**levels leaves from ~2 KiB
    return node


def _self_list() -> Any:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    return cycle


def _save_with_view(state: Any, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """``torch.save`` bytes of ``state`` whose tensors claim ``size``/``stride`` over their storage."""
    real = torch.Tensor._reduce_ex_internal

    def forged(self: torch.Tensor, proto: int) -> Any:
        fn, args = real(self, proto)
        return fn, (args[0], args[1], torch.Size(size), stride, *args[4:])

    torch.Tensor._reduce_ex_internal = forged  # type: ignore[method-assign]
    try:
        buf = io.BytesIO()
        torch.save(state, buf)
    finally:
        torch.Tensor._reduce_ex_internal = real  # type: ignore[method-assign]
    return buf.getvalue()


def _deflated(state: Any) -> bytes:
    """``torch.save`` bytes of ``state`` with every zip record deflated (torch writes them stored)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def _torch_save_bytes(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


#: name -> (the rank file's bytes, the key the error must name or what it must say; "" for neither)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "shared_sub_lists": (lambda: _torch_save_bytes({"x": {"y": _bomb_tree(20)}}), "x.y"),
    "list_containing_itself": (lambda: _torch_save_bytes({"x": _self_list()}), "x[1]"),
    "expanded_tensor": (lambda: _torch_save_bytes({"x": torch.zeros(1, dtype=torch.uint8).expand(2**28)}), "x"),
    "stride_zero_view": (lambda: _save_with_view({"x": torch.zeros(1)}, (2**31,), (0,)), "x"),
    "huge_stride_view": (lambda: _save_with_view({"x": torch.zeros(4)}, (2**31,), (1,)), ""),
    "deflated_record": (lambda: _deflated({"x": torch.zeros(2**24)}), "is compressed"),
}


def _plant(path: str, data: bytes) -> None:
    """Make the committed torch_save checkpoint at ``path`` hold ``data`` as its rank file, manifest matching."""
    file = os.path.join(path, "checkpoint_0.pt")
    with open(file, "wb") as f:
        f.write(data)
    size, digest = _file_digest(path, "checkpoint_0.pt")
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        doc = json.load(f)
    doc["ranks"][0].update(size_bytes=size, digest=digest)
    with open(manifest, "wb") as f:
        f.write(seal_manifest(doc))  # an attacker can seal a manifest too


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    out = {"good": str(root / "good")}
    checkpointer("torch_save").save(out["good"], {"x": torch.zeros(1)})
    for name, (make, _key) in HOSTILE.items():
        out[name] = str(root / name)
        checkpointer("torch_save").save(out[name], {"x": 0})
        _plant(out[name], make())
    return out


def _inspect(path: str, _tmp: str) -> Any:
    with open_lazy(path) as (_, state):
        return list(iter_leaves(state))


def _cli(*args: str) -> Callable[[str, str], Any]:
    def run(path: str, tmp: str) -> Any:
        argv = [a.format(path=path, tmp=tmp) for a in args]
        rc = cli.main(argv)
        assert rc == 2, f"torchckpt {' '.join(argv)} exited {rc}"
        raise CorruptCheckpointError("the command refused it", path=path)  # its one line is checked below

    return run


READERS: dict[str, Callable[[str, str], Any]] = {
    "load": lambda path, _tmp: reader().read(path),
    "load_unverified": lambda path, _tmp: reader(verify_checksums=False).read(path),
    "load_template_subtree": lambda path, _tmp: reader().read(path, {"x": None}),
    "load_template_tensor": lambda path, _tmp: reader().read(path, {"x": torch.zeros(1)}),
    "lazy": _inspect,
    "export_torch": lambda path, tmp: export(path, os.path.join(tmp, "out.pt"), fmt="torch"),
    "export_safetensors": lambda path, tmp: export(path, os.path.join(tmp, "out.st"), fmt="safetensors"),
    "cli_inspect": _cli("inspect", "{path}"),
    "cli_diff": _cli("diff", "{path}", "{path}"),
}


@pytest.mark.parametrize("entry", sorted(READERS))
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_expanding_rank_files_are_refused_by_every_reader(
    hostile: dict[str, str], kind: str, entry: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = hostile[kind]
    started = time.monotonic()
    with pytest.raises(CorruptCheckpointError) as info:
        READERS[entry](path, str(tmp_path))
    assert time.monotonic() - started < REFUSE_S
    if entry.startswith("cli_"):
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        message = err
    else:
        message = str(info.value)
        assert info.value.file == "checkpoint_0.pt"
    assert path in message and "checkpoint_0.pt" in message, message
    assert repr(HOSTILE[kind][1]) in message or HOSTILE[kind][1] in message, message
    assert not [n for n in os.listdir(tmp_path) if not n.startswith("pytest")], "an export left a file behind"


def test_shared_and_viewed_values_that_torchckpt_saves_still_load(tmp_path: Any) -> None:
    """Sharing within the file's size is no attack: a list saved twice, a small expanded tensor, a view."""
    shared = [1, 2, 3]
    base = torch.arange(12.0)
    state = {"a": shared, "b": shared, "pos": torch.arange(4).expand(3, 4), "v": base[2:5], "w": base}
    path = str(tmp_path / "ckpt")
    checkpointer("torch_save").save(path, state)
    loaded, _ = reader().read(path)
    assert loaded["a"] == [1, 2, 3] and loaded["b"] == [1, 2, 3]
    assert torch.equal(loaded["pos"], state["pos"]) and torch.equal(loaded["v"], base[2:5])
    filled, _ = reader().read(path, {"a": None, "pos": None, "v": torch.zeros(3)})
    assert filled["a"] == [1, 2, 3] and torch.equal(filled["pos"], state["pos"])
    assert torch.equal(filled["v"], base[2:5])
    with open_lazy(path) as (_, lazy):
        assert len(list(iter_leaves(lazy))) == 3 + 3 + 1 + 1 + 1


# -- a failed load and the template -----------------------------------------------------------------


def _mismatch_state() -> dict[str, Any]:
    return {"a": torch.arange(6.0), "n": 5, "sub": {"b": torch.arange(4, dtype=torch.int32)}, "z": torch.ones(3)}


def test_shape_mismatch_on_a_later_key_leaves_the_template_untouched(tmp_path: Any) -> None:
    paths = save_each_format(tmp_path, _mismatch_state())
    for fmt, path in paths.items():
        template = {"a": torch.full((6,), -1.0), "n": 0, "sub": {"b": torch.zeros(4, dtype=torch.int32)},
                    "z": torch.zeros(2)}  # fmt: skip
        before = {"a": template["a"].clone(), "b": template["sub"]["b"].clone(), "z": template["z"].clone()}
        with pytest.raises(StateDictMismatchError, match=r"key 'z'.*\[2\].*\[3\]") as info:
            reader().read(path, template)
        assert info.value.key == "z", fmt
        assert torch.equal(template["a"], before["a"]), f"{fmt}: an earlier key was overwritten"
        assert torch.equal(template["sub"]["b"], before["b"]), f"{fmt}: an earlier key was overwritten"
        assert torch.equal(template["z"], before["z"]) and template["n"] == 0, fmt


def test_native_bit_flip_says_which_template_tensors_may_be_overwritten(tmp_path: Any) -> None:
    paths = save_each_format(tmp_path, _mismatch_state())
    path = paths["safetensors"]
    entry = read_manifest(path).ranks[0]
    target = next(t for t in entry.tensors if t.name == "sub.b")
    flip_bit(os.path.join(path, file_name("safetensors")), target.offset + 1)
    template = {"a": torch.zeros(6), "sub": {"b": torch.zeros(4, dtype=torch.int32)}, "other": 1}
    with pytest.raises(CorruptCheckpointError) as info:
        reader().read(path, template)
    message = str(info.value)
    assert info.value.key == "sub.b" and "checksum mismatch" in message
    assert "template" in message and "may have been overwritten" in message, message
    assert "'a'" in message and "'sub.b'" in message, message
    assert template["other"] == 1  # plain values are only set once every tensor has loaded
    # torch_save: the whole file is checked before a byte reaches the template.
    flip_bit(os.path.join(paths["torch_save"], file_name("torch_save")), 200)
    template = {"a": torch.zeros(6), "sub": {"b": torch.zeros(4, dtype=torch.int32)}}
    with pytest.raises(CorruptCheckpointError, match="does not match the manifest"):
        reader().read(paths["torch_save"], template)
    assert not template["a"].any() and not template["sub"]["b"].any()


# -- a manifest of 400,000 dimensions ---------------------------------------------------------------


def test_a_manifest_shape_of_400000_dimensions_is_refused_fast(tmp_path: Any) -> None:
    path = save_each_format(tmp_path, {"w": torch.ones(2, 3)})["safetensors"]
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        doc = json.load(f)
    doc["ranks"][0]["tensors"][0]["shape"] = [2] * 400_000
    with open(manifest, "wb") as f:
        f.write(seal_manifest(doc))  # an attacker can seal a manifest too
    started = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json: ranks\[0\]\.tensors\[0\]: 400000 dimensions") as info:
        reader().read(path)
    assert time.monotonic() - started < 2.0
    assert info.value.file == "manifest.json" and len(str(info.value)) < 500
