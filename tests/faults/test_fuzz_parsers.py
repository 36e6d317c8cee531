"""Bounded fuzzing of what parses untrusted checkpoint bytes: the manifest, its rank entries, the typed-JSON
tree, and native rank files read against their manifest.

The only allowed outcomes are a successful parse or the library's own errors (``ManifestError`` from the
parsers, a ``CheckpointError`` from a load) -- never another exception, a hang (pytest-timeout) or a
memory blow-up (peak resident memory measured over each run).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from ckpt_testutil import assert_state_equal, file_name, json_paths, reader, save_each_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchckpt.errors import CheckpointError, UnsafeObjectError
from torchckpt.format.manifest import SEAL_BYTES, Manifest, ManifestError, parse_manifest, parse_rank_entry
from torchckpt.format.tree import unflatten
from torchckpt.format.extents import CHUNK_BYTES, checksum
from torchckpt.verify import verify_checkpoint

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Layouts to fuzz; the native manifest has more fields (tensor table, tree), so it is drawn twice as often.
LAYOUTS = st.sampled_from(["safetensors", "safetensors", "torch_save"])
#: Peak resident memory a whole fuzz run may add.
MEMORY_BOUND = 100 << 20


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(33, 7, generator=g),
        "ids": torch.arange(50, dtype=torch.int64),
        "opt": {"lr": 0.1, "betas": (0.9, 0.99), "groups": [{"params": [0, 1]}]},
        "half": torch.randn(9, generator=g).to(torch.float16),
        "empty": torch.empty(0, 2),
        "name": "x",
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_each_format(tmp_path_factory.mktemp("fuzz"), _state(), metadata={"step": 3})


def _manifest_bytes(path: str) -> bytes:
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        return f.read()


def _seal(body: bytes) -> bytes:
    """``body`` (the bytes after the opening brace) behind a matching seal."""
    return b'{"manifest_crc32c":"%08x",' % checksum(body) + body


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


@pytest.fixture
def bounded_memory() -> Iterator[None]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident size
    base = _peak_rss()
    yield
    grew = _peak_rss() - base
    assert grew < MEMORY_BOUND, f"peak resident memory grew by {grew >> 20} MiB"


def _assert_usable(manifest: Manifest) -> None:
    """What the parser accepts is safe to act on: devices parse, tensors of those shapes can be described."""
    from torchckpt.format.dtypes import dtype_from_name

    for entry in manifest.ranks:
        assert 0 <= entry.size_bytes <= 2**50
        for t in entry.tensors:
            torch.device(t.device)
            torch.empty(t.shape, dtype=dtype_from_name(t.dtype), device="meta")  # no memory, only strides


def _parse_or_refuse(data: bytes) -> Manifest | None:
    try:
        manifest = parse_manifest(data)
    except ManifestError:
        return None
    _assert_usable(manifest)
    return manifest


# ---------------------------------------------------------------------------- strategies

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 7, 8, 4096, CHUNK_BYTES, 2**31, 2**32, 2**50, 2**50 + 1, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["", ".", "..", "../x", "/etc/passwd", "a\x00b", "crc32c:00000000", "float32", "cpu", "nope:0"]),
)
JSON = st.recursive(
    _SCALARS,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=12,
)
#: Typed-JSON nodes and things that look like them.
TAGS = ["T", "dict", "odict", "list", "tuple", "float", "bytes", "dtype", "size", "device", "pickle", "x", ""]
TREE = st.recursive(
    _SCALARS,
    lambda c: st.one_of(
        st.lists(c, max_size=3),
        st.builds(lambda tag, v: {tag: v}, st.sampled_from(TAGS), c),
        st.builds(
            lambda tag, items: {tag: items},
            st.sampled_from(["dict", "odict"]),
            st.lists(st.lists(c, max_size=3), max_size=3),
        ),
        st.dictionaries(st.sampled_from(TAGS), c, max_size=3),
    ),
    max_leaves=10,
)


#: Values a careless parser trips on, by the type of the value they replace (tried before random JSON).
NASTY_INTS = st.sampled_from([0, -1, 1, 7, 8, 2**31, 2**32, 2**50, 2**50 + 1, 2**62, 2**63, 2**64, 2**100])
NASTY_STRS = st.one_of(
    st.sampled_from(
        ["", "nope", "nope:0", "cuda:99999999999999999999", "cpu:-5", "meta", "../x", "/etc/passwd", "a\x00b"]
        + ["crc32c:zz", "crc32c:0000000g", "float128", "object", "bool", "safetensors", "torch_save", "T", "pickle"]
    ),
    st.text(max_size=6),
)
NASTY_LISTS = st.one_of(
    st.sampled_from([[], [0, 2**62, 4], [0, 2**64], [2**40] * 3, [-1], [1.5], ["1"], [None], [0] * 64, [[]]]),
    st.lists(NASTY_INTS, max_size=4),
)
NASTY = st.one_of(NASTY_INTS, NASTY_STRS, NASTY_LISTS, st.sampled_from([None, True, 1.5, 1e308, {}]))


def _nasty_like(value: Any) -> st.SearchStrategy[Any]:
    if isinstance(value, bool) or value is None:
        return NASTY
    if isinstance(value, int):
        return st.one_of(NASTY_INTS, NASTY)
    if isinstance(value, str):
        return st.one_of(NASTY_STRS, NASTY)
    if isinstance(value, list):
        return st.one_of(NASTY_LISTS, NASTY)
    return NASTY


def _mutate_doc(doc: Any, data: st.DataObject) -> Any:
    """Apply 1-3 structural mutations: replace (mostly leaves, mostly nasty values), delete, insert, duplicate, wrap."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in json_paths(doc) if p]
        if not paths:
            break
        # Pick a kind of object first (by its set of keys: manifest, rank entry, tensor entry...),
        # then one of them, then one of its fields: every field gets its turn, not only the long
        # lists of checksums and tree nodes.
        kinds: dict[Any, list[tuple]] = {}
        for p in paths:
            parent = _at(doc, p[:-1])
            if isinstance(parent, list):
                kind: Any = "list"
            elif len(parent) == 1:
                kind = "typed node"  # one key: a node of the tree ({"dict": ...}, {"T": 0}...)
            else:
                kind = tuple(sorted(parent))
            kinds.setdefault(kind, []).append(p)
        kind = data.draw(st.sampled_from(sorted(kinds, key=str)))
        where = data.draw(st.sampled_from(kinds[kind]))
        parent = _at(doc, where[:-1])
        key = where[-1]
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "insert", "duplicate", "wrap"]))
        if op == "replace":
            # a copy: sampled lists are shared by every draw, and a later mutation must not change them
            parent[key] = copy.deepcopy(data.draw(st.one_of(_nasty_like(parent[key]), _nasty_like(parent[key]), JSON)))
        elif op == "delete":
            del parent[key]
        elif op == "insert" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
        elif op == "insert":
            parent.insert(key, data.draw(JSON))
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key]] if data.draw(st.booleans()) else {"v": parent[key]}
    return doc


def _at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _mutate_bytes(raw: bytes, data: st.DataObject) -> bytes:
    """Apply 1-4 byte-level mutations: set, flip, delete, insert, truncate, extend."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "flip", "delete", "insert", "truncate", "extend"]))
        at = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "set" and buf:
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 16))]
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del buf[at:]
        else:
            buf += data.draw(st.binary(min_size=1, max_size=64))
    return bytes(buf)


# ---------------------------------------------------------------------------- the manifest parser


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused_by_the_manifest_parser(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data)


@FUZZ
@given(body=st.one_of(st.binary(max_size=512), st.text(max_size=256).map(str.encode)))
def test_sealed_random_bodies_are_refused(body: bytes) -> None:
    """Random bytes behind a valid seal: the seal passes, the JSON and field checks refuse them."""
    with pytest.raises(ManifestError):
        parse_manifest(_seal(body))


@FUZZ
@given(data=st.data())
def test_byte_mutations_of_a_valid_manifest(saved: dict[str, str], bounded_memory: None, data: st.DataObject) -> None:
    """Mutated bytes, with the old seal (always refused) and resealed (refused, or parsed if still valid)."""
    fmt = data.draw(LAYOUTS)
    raw = _manifest_bytes(saved[fmt])
    mutated = _mutate_bytes(raw, data)
    if mutated != raw:
        with pytest.raises(ManifestError):
            parse_manifest(mutated)
    body = mutated[SEAL_BYTES:] if mutated[:SEAL_BYTES] == raw[:SEAL_BYTES] else mutated
    _parse_or_refuse(_seal(body))


@FUZZ
@given(data=st.data())
def test_structural_mutations_of_a_valid_manifest(
    saved: dict[str, str], bounded_memory: None, data: st.DataObject
) -> None:
    """Fields replaced, deleted, inserted, duplicated or wrapped, then resealed."""
    fmt = data.draw(LAYOUTS)
    doc = json.loads(_manifest_bytes(saved[fmt]))
    del doc["manifest_crc32c"]
    mutated = _mutate_doc(doc, data)
    if not isinstance(mutated, dict):
        return
    try:
        body = json.dumps(mutated, separators=(",", ":")).encode()[1:]
    except ValueError:  # NaN and friends cannot be sealed in strict JSON
        return
    _parse_or_refuse(_seal(body))


@FUZZ
@given(doc=JSON, index=st.integers(0, 3))
def test_rank_entry_parser_on_random_json(doc: Any, index: int) -> None:
    """What a rank reports before the commit is parsed with the same care."""
    try:
        entry = parse_rank_entry(doc, index, CHUNK_BYTES, 4)
    except ManifestError:
        return
    assert entry.rank == index


@FUZZ
@given(data=st.data())
def test_rank_entry_parser_on_mutated_entries(saved: dict[str, str], data: st.DataObject) -> None:
    fmt = data.draw(LAYOUTS)
    entry = json.loads(_manifest_bytes(saved[fmt]))["ranks"][0]
    try:
        parsed = parse_rank_entry(_mutate_doc(entry, data), 0, CHUNK_BYTES, 1)
    except ManifestError:
        return
    _assert_usable(Manifest(fmt, 1, (parsed,), CHUNK_BYTES))


# ---------------------------------------------------------------------------- the typed-JSON tree


@FUZZ
@given(tree=TREE)
def test_tree_parser_on_random_nodes(tree: Any) -> None:
    """The tree decoder returns a value or raises ValueError (malformed) / UnsafeObjectError (pickle)."""
    try:
        unflatten(tree, lambda i: torch.zeros(1), allow_pickle=False, where="fuzz")
    except UnsafeObjectError:
        pass
    except ValueError as e:
        assert "fuzz" in str(e) or "key" in str(e) or str(e), repr(e)


# ---------------------------------------------------------------------------- whole loads


def _load_outcome(path: str) -> Any:
    """The state, or the CheckpointError the load raised (anything else fails the test)."""
    try:
        return reader().read(path)[0]
    except CheckpointError as e:
        return e


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("scratch"))


@FUZZ
@given(data=st.data())
def test_mutated_rank_files_never_load_wrong(
    saved: dict[str, str], scratch: str, bounded_memory: None, data: st.DataObject
) -> None:
    """The rank file's bytes mutated (header, length field, data, size): refused by name, or the exact state."""
    fmt = data.draw(LAYOUTS)
    path = os.path.join(scratch, f"rank_{fmt}")
    if not os.path.exists(path):
        shutil.copytree(saved[fmt], path)
    name = file_name(fmt)
    with open(os.path.join(saved[fmt], name), "rb") as f:
        raw = f.read()
    if fmt == "safetensors" and data.draw(st.booleans()):
        # aim at the 8-byte length field and the JSON header, where a parser would look first
        head_len = data.draw(st.integers(1, 64))
        mutated = _mutate_bytes(raw[:head_len], data) + raw[head_len:]
    else:
        mutated = _mutate_bytes(raw, data)
    with open(os.path.join(path, name), "wb") as f:
        f.write(mutated)
    outcome = _load_outcome(path)
    if mutated == raw:
        assert_state_equal(outcome, _state())
        return
    assert isinstance(outcome, CheckpointError), "a mutated rank file loaded"
    assert getattr(outcome, "file", None) == name, str(outcome)
    problems = verify_checkpoint(path)[1]
    assert problems and {p.file for p in problems} == {name}, problems


@FUZZ
@given(data=st.data())
def test_mutated_manifests_fail_only_with_checkpoint_errors(
    saved: dict[str, str], scratch: str, bounded_memory: None, data: st.DataObject
) -> None:
    """Resealed structural mutations of the manifest over real data: loaded or refused with a CheckpointError."""
    fmt = data.draw(LAYOUTS)
    doc = json.loads(_manifest_bytes(saved[fmt]))
    del doc["manifest_crc32c"]
    if fmt == "safetensors" and data.draw(st.integers(0, 3)) == 0:
        mutated = copy.deepcopy(doc)
        mutated["ranks"][0]["tree"] = data.draw(TREE)
    else:
        mutated = _mutate_doc(doc, data)
    if not isinstance(mutated, dict):
        return
    try:
        body = json.dumps(mutated, separators=(",", ":")).encode()[1:]
    except ValueError:
        return
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        path = os.path.join(d, "ckpt")
        shutil.copytree(saved[fmt], path)
        with open(os.path.join(path, "manifest.json"), "wb") as f:
            f.write(_seal(body))
        _load_outcome(path)
        manifest, _problems = verify_checkpoint(path)  # reports, never raises past its contract
        assert manifest is None or isinstance(manifest, Manifest)
