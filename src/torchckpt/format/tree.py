"""Flatten a state dict into a typed-JSON tree and a list of tensors, and back.

The tree keeps structure and plain values without pickle. Every JSON object in
it is a typed node with exactly one key naming its type; JSON scalars stand
for themselves (``null``, ``true``/``false``, integers, finite floats, strings):

==================  ==========================================================
node                 meaning
==================  ==========================================================
``{"T": i}``         tensor ``i`` of the rank's tensor table
``{"DT": j}``        sharded tensor ``j`` of the rank's entry (a ``DTensor``; ``shards.py``)
``{"dict": [[k, v], ...]}``   dict; keys are nodes too (str, int, ...)
``{"odict": [[k, v], ...]}``  collections.OrderedDict
``{"list": [...]}``  list
``{"tuple": [...]}`` tuple
``{"float": "nan"|"inf"|"-inf"}``  a non-finite float
``{"bytes": "<base64>"}``         bytes
``{"dtype": "bfloat16"}``          torch.dtype
``{"size": [2, 3]}``               torch.Size
``{"device": "cuda:0"}``           torch.device
``{"pickle": "<base64>"}``         any other object, only when pickle is allowed
==================  ==========================================================

Tensors reached twice through the same storage, offset, shape, strides and
dtype (tied weights) get one table entry and come back as one tensor.

A state nests at most :data:`MAX_DEPTH` containers (dict, OrderedDict, list,
tuple; the state itself and containers used as keys counted): what commits
must load, and every reader handles that depth whatever the caller's stack.
:func:`flatten` refuses a deeper state, or one that contains itself, naming
the key; :func:`unflatten` refuses a deeper tree.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsafeObjectError
from ..plan.dtensor import Meshes, ReplicaChooser, is_dtensor, local_boxes, local_tensor
from .dtypes import dtype_from_name, dtype_name
from .shards import ChunkEntry, Grid, ShardedEntry

__all__ = [
    "MAX_DEPTH",
    "STACK_FRAMES_NEEDED",
    "Flattened",
    "TensorRef",
    "PickledValue",
    "check_saveable",
    "deepest_key",
    "dtensor_needs_native",
    "flatten",
    "join_key",
    "unflatten",
]

#: Most containers a state may nest (the state itself counted): ``{"a": {"b": 1}}`` nests 2.
MAX_DEPTH = 100
#: Frames of recursion a save or a load of a state nested :data:`MAX_DEPTH` deep may need
#: (JSON codec, pickle and tree walks: a few per level, plus the library's own calls).
STACK_FRAMES_NEEDED = 5 * MAX_DEPTH + 200


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the checkpoint not yet read: its index in the tensor table."""

    index: int


@dataclass(frozen=True)
class PickledValue:
    """A value that :func:`flatten` stored with pickle (a ``{"pickle": ...}`` node).

    Attributes:
        key: Its key path.
        type_name: Its type, ``module.qualname``.
        from_main: The functions and classes defined in ``__main__`` that its
            pickle refers to (unpickling it elsewhere needs the training script).
    """

    key: str
    type_name: str
    from_main: frozenset[str] = frozenset()


@dataclass
class Flattened:
    """The result of :func:`flatten`.

    Attributes:
        tree: The typed-JSON tree (JSON-serialisable).
        tensors: The unique tensors in table order.
        names: Their key paths (unique), one per tensor.
        pickled: The values stored with pickle, in the order of the walk.
        empty_bytes: Whether the tree holds an empty ``bytes`` node.
        sharded: The ``DTensor``s met, in the order of the walk: their global
            form and the chunks of them this rank writes (tensors of ``tensors``).
    """

    tree: Any
    tensors: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pickled: list[PickledValue] = field(default_factory=list)
    empty_bytes: bool = False
    sharded: list[ShardedEntry] = field(default_factory=list)

    def refuse_pickled(self) -> None:
        """Raise what :func:`flatten` without pickle raises for the first pickled value, if any.

        Raises:
            UnsafeObjectError: A value is stored with pickle (names its key and type).
        """
        if self.pickled:
            first = self.pickled[0]
            raise _refusal(first.key, first.type_name)


def join_key(prefix: str, key: Any) -> str:
    """Return the key path of ``key`` below ``prefix`` ("a.b", "a[0]")."""
    return f"{prefix}.{key}" if prefix else str(key)


def _index_path(prefix: str, i: int) -> str:
    return f"{prefix}[{i}]" if prefix else f"[{i}]"


def _tie_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.is_meta or t.numel() == 0:
        return None
    # data_ptr() is the storage's address plus the offset: one call instead of a storage object per tensor.
    return (t.device, t.data_ptr(), t.shape, t.stride(), t.dtype)


class _Flattener:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.out = Flattened(tree=None)
        self._seen: dict[tuple[Any, ...], int] = {}
        self._used_names: set[str] = {"__metadata__"}  # reserved by safetensors
        self._open: dict[int, str] = {}  # the containers being walked (id -> key path): a cycle's ends
        self._meshes = Meshes()
        self._replicas = ReplicaChooser(self._meshes)
        self._sharded_names: set[str] = set()

    def enter(self, value: Any, path: str) -> None:
        """Note that the walk goes into container ``value`` at ``path``; refuse a cycle or too deep a state."""
        if id(value) in self._open:
            where = self._open[id(value)] or "[root]"
            raise UnsafeObjectError(
                f"cannot save the value at key {path or '[root]'!r}: it contains itself (a cycle back to the "
                f"{type(value).__name__} at key {where!r}); a checkpoint stores trees only",
                key=path,
                type_name=f"builtins.{type(value).__name__}",
            )
        if len(self._open) >= MAX_DEPTH:
            raise UnsafeObjectError(
                f"cannot save the value at key {path or '[root]'!r}: the state nests containers more than "
                f"{MAX_DEPTH} deep there (the most a checkpoint holds)",
                key=path,
                type_name=f"builtins.{type(value).__name__}",
            )
        self._open[id(value)] = path

    def leave(self, value: Any) -> None:
        """Note that the walk of container ``value`` is done."""
        del self._open[id(value)]

    def tensor(self, t: torch.Tensor, path: str) -> dict[str, int]:
        if not _plainly_saveable(t):
            if is_dtensor(t):
                return self.dtensor(t, path)
            _check_tensor(t, path)  # raises, naming what is wrong
        key = _tie_key(t)
        if key is not None and key in self._seen:
            return {"T": self._seen[key]}
        index = len(self.out.tensors)
        if key is not None:
            self._seen[key] = index
        name = path or "[root]"
        if name in self._used_names:
            n = 2
            while f"{name}#{n}" in self._used_names:
                n += 1
            name = f"{name}#{n}"
        self._used_names.add(name)
        self.out.tensors.append(t)
        self.out.names.append(name)
        return {"T": index}

    def dtensor(self, t: Any, path: str) -> dict[str, int]:
        """A ``DTensor``: the boxes of its local shard that this rank writes, and a ``{"DT": j}`` node."""
        local = local_tensor(t)
        layout = self._meshes.layout(t, path)
        boxes = local_boxes(t, path, local=local, meshes=self._meshes, layout=layout)
        name, n = path or "[root]", 2
        while name in self._sharded_names:
            name, n = f"{path or '[root]'}#{n}", n + 1
        self._sharded_names.add(name)
        replica, writes = self._replicas.choose(t, layout)
        chunks = [ChunkEntry(self.tensor(b.view(local), path)["T"], b.offsets) for b in boxes] if writes else []
        mesh, regular = t.device_mesh, layout.regular  # no grid: a _StridedShard lists its chunks
        grid = None if regular is None else Grid(self._meshes.shape(mesh), self._meshes.ranks(mesh), regular, replica)
        self.out.sharded.append(ShardedEntry(name, dtype_name(t.dtype), tuple(t.shape), tuple(chunks), grid))
        return {"DT": len(self.out.sharded) - 1}

    def node(self, value: Any, path: str) -> Any:
        # Exact types first: most leaves of a state dict are str, int, float or a plain tensor.
        tp = type(value)
        if tp is str or tp is int:
            return value
        if tp is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        if tp is torch.Tensor:
            return self.tensor(value, path)
        if tp is dict or tp is OrderedDict:
            return self.mapping(value, path)
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"float": repr(float(value))}
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (bytes, bytearray)):
            return self.bytes_node(value)
        if isinstance(value, torch.dtype):
            return {"dtype": dtype_name(value)}
        if isinstance(value, torch.Size):
            return {"size": [int(d) for d in value]}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if type(value) is OrderedDict or type(value) is dict:
            return self.mapping(value, path)
        if type(value) is list or type(value) is tuple:
            return self.sequence(value, path)
        return self.opaque(value, path)

    def sequence(self, value: list[Any] | tuple[Any, ...], path: str) -> Any:
        self.enter(value, path)
        items = [self.node(v, _index_path(path, i)) for i, v in enumerate(value)]
        self.leave(value)
        return {"list" if type(value) is list else "tuple": items}

    def mapping(self, value: dict[Any, Any], path: str) -> dict[str, list[list[Any]]]:
        self.enter(value, path)
        items = []
        for k, v in value.items():
            if type(k) is str:  # the common key: its node is itself, its path is joined once
                sub = f"{path}.{k}" if path else k
                items.append([k, self.node(v, sub)])
            else:
                key_node = self.key(k, path)
                items.append([key_node, self.node(v, join_key(path, k))])
        self.leave(value)
        return {"dict" if type(value) is dict else "odict": items}

    def bytes_node(self, value: bytes | bytearray) -> Any:
        if not value:
            self.out.empty_bytes = True
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}

    def key(self, k: Any, path: str) -> Any:
        if isinstance(k, torch.Tensor):  # hashed by identity: cannot be rebuilt as a key
            return self.opaque(k, join_key(path, "<tensor key>"))
        return self.node(k, join_key(path, k))

    def opaque(self, value: Any, path: str) -> Any:
        type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        if not self.allow_pickle:
            raise _refusal(path, type_name)
        pickler = _MainNotingPickler()
        try:
            pickler.dump(value)
        except Exception as e:
            raise UnsafeObjectError(
                f"cannot pickle the value at key {path or '[root]'!r} of type {type_name}: {e}",
                key=path,
                type_name=type_name,
            ) from e
        self.out.pickled.append(PickledValue(path, type_name, frozenset(pickler.from_main)))
        return {"pickle": base64.b64encode(pickler.file.getvalue()).decode("ascii")}


def dtensor_needs_native(path: str) -> UnsafeObjectError:
    """The error of a ``DTensor`` at ``path`` given to the ``torch_save`` layout."""
    return UnsafeObjectError(
        f"cannot save the DTensor at key {path or '[root]'!r} in the torch_save layout: sharded state is saved in "
        "the native layout (CheckpointWriterConfig(format=CheckpointFormat.SAFETENSORS); the manager's default)",
        key=path,
        type_name="torch.distributed.tensor.DTensor",
    )


def _refusal(path: str, type_name: str) -> UnsafeObjectError:
    """The error of a value at ``path`` that only pickle could store, pickle not being allowed."""
    return UnsafeObjectError(
        f"cannot save the value at key {path or '[root]'!r} of type {type_name} without pickle; "
        "store tensors, containers (dict, OrderedDict, list, tuple) and plain values "
        "(None, bool, int, float, str, bytes, torch.dtype, torch.Size, torch.device), "
        "or opt in with allow_pickle=True on both save and load",
        key=path,
        type_name=type_name,
    )


class _MainNotingPickler(pickle.Pickler):
    """``pickle.dumps`` at the highest protocol, noting the functions and classes of ``__main__`` it refers to."""

    def __init__(self) -> None:
        self.file = io.BytesIO()
        super().__init__(self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.from_main: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
            self.from_main.add(obj.__qualname__)
        return NotImplemented


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)
#: Most dimensions a saved tensor may have (the manifest's limit, ``manifest.MAX_DIMS``; numpy's too).
MAX_DIMS = 64


def _plainly_saveable(t: torch.Tensor) -> bool:
    """The fast path: a plain, strided, dense tensor that ``_check_tensor`` would accept without a word."""
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.layout is torch.strided
        and not t.is_quantized
        and not t.is_meta
        and t.dim() <= MAX_DIMS
    )


def _check_tensor(t: torch.Tensor, path: str) -> None:
    where = path or "[root]"
    if t.layout != torch.strided:
        raise UnsafeObjectError(
            f"cannot save the tensor at key {where!r}: layout {t.layout} is not supported (only dense tensors)",
            key=path,
            type_name="torch.Tensor",
        )
    if t.is_quantized or t.device.type == "meta":
        kind = "quantized" if t.is_quantized else "meta"
        raise UnsafeObjectError(
            f"cannot save the tensor at key {where!r}: {kind} tensors are not supported",
            key=path,
            type_name="torch.Tensor",
        )
    if t.dim() > MAX_DIMS:
        raise UnsafeObjectError(
            f"cannot save the tensor at key {where!r}: it has {t.dim()} dimensions (at most {MAX_DIMS})",
            key=path,
            type_name="torch.Tensor",
        )
    if is_dtensor(t):
        raise dtensor_needs_native(path)
    if type(t) not in _PLAIN_TENSOR_TYPES:
        raise UnsafeObjectError(
            f"cannot save the tensor at key {where!r}: tensor subclass {type(t).__qualname__} is not supported",
            key=path,
            type_name=f"{type(t).__module__}.{type(t).__qualname__}",
        )


class _Checker(_Flattener):
    """Walks a state as :class:`_Flattener` does, raising the same errors, building nothing."""

    def __init__(self, allow_pickle: bool) -> None:
        super().__init__(allow_pickle)
        self.tensor_bytes = 0
        self.empty_bytes = False
        self._ties: set[tuple[Any, ...]] = set()

    def tensor(self, t: torch.Tensor, path: str) -> None:  # type: ignore[override]
        if not _plainly_saveable(t):
            _check_tensor(t, path)
        key = _tie_key(t)
        if key is None or key not in self._ties:
            if key is not None:
                self._ties.add(key)
            self.tensor_bytes += t.numel() * t.element_size()

    def mapping(self, value: dict[Any, Any], path: str) -> None:  # type: ignore[override]
        self.enter(value, path)
        for k, v in value.items():
            if type(k) is str:
                self.node(v, f"{path}.{k}" if path else k)
            else:
                self.key(k, path)
                self.node(v, join_key(path, k))
        self.leave(value)

    def sequence(self, value: list[Any] | tuple[Any, ...], path: str) -> None:  # type: ignore[override]
        self.enter(value, path)
        for i, v in enumerate(value):
            self.node(v, _index_path(path, i))
        self.leave(value)

    def bytes_node(self, value: bytes | bytearray) -> None:
        if type(value) is bytes and not value:
            self.empty_bytes = True

    def opaque(self, value: Any, path: str) -> None:
        super().opaque(value, path)  # raises unless pickle is allowed and the value pickles


def check_saveable(state_dict: Any, *, allow_pickle: bool = False) -> tuple[int, bool]:
    """Check that :func:`flatten` would accept ``state_dict``, without building its tree.

    Returns:
        The bytes of its distinct tensors, and whether it holds an empty ``bytes``
        value (in a dict, OrderedDict, list or tuple).

    Raises:
        UnsafeObjectError: As :func:`flatten` does.
    """
    checker = _Checker(allow_pickle)
    checker.node(state_dict, "")
    return checker.tensor_bytes, checker.empty_bytes


def flatten(state_dict: Any, *, allow_pickle: bool = False) -> Flattened:
    """Split ``state_dict`` into a typed-JSON tree and its unique tensors.

    Args:
        state_dict: The state to save.
        allow_pickle: Pickle values that have no typed-JSON form instead of refusing them.

    Returns:
        The tree, the tensors and their key paths.

    Raises:
        UnsafeObjectError: A value cannot be stored safely (names its key path and type).
    """
    f = _Flattener(allow_pickle)
    f.out.tree = f.node(state_dict, "")
    return f.out


def unflatten(
    tree: Any,
    tensor: Callable[[int], Any],
    *,
    allow_pickle: bool = False,
    where: str = "",
    sharded: Callable[[int], Any] | None = None,
) -> Any:
    """Rebuild the object a typed-JSON ``tree`` describes.

    Args:
        tree: A node as produced by :func:`flatten`.
        tensor: Called with a tensor-table index; its result stands for the tensor.
        allow_pickle: Unpickle ``{"pickle": ...}`` nodes instead of refusing them.
        where: Names the checkpoint in error messages.
        sharded: Called with the index of a sharded tensor (``{"DT": j}``) of the
            rank's entry; its result stands for the tensor (None: such a node is refused).

    Raises:
        UnsafeObjectError: A pickle node was met and pickle is not allowed.
        ValueError: The tree is malformed (callers turn this into CorruptCheckpointError).
    """
    return _Unflattener(tensor, allow_pickle, where, sharded).node(tree, "")


class _Unflattener:
    def __init__(
        self, tensor: Callable[[int], Any], allow_pickle: bool, where: str, sharded: Callable[[int], Any] | None
    ) -> None:
        self.tensor = tensor
        self.sharded = sharded
        self.allow_pickle = allow_pickle
        self.where = where
        self.depth = 0  # containers open on the way to the current node

    def node(self, n: Any, path: str) -> Any:
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if not isinstance(n, dict) or len(n) != 1:
            raise ValueError(f"malformed tree node at key {path or '[root]'!r}: {str(n)[:80]!r}")
        ((tag, body),) = n.items()
        if tag == "T":
            if not isinstance(body, int) or isinstance(body, bool):
                raise ValueError(f"malformed tensor reference at key {path!r}")
            return self.tensor(body)
        if tag == "DT":
            if self.sharded is None or not isinstance(body, int) or isinstance(body, bool):
                raise ValueError(f"malformed sharded tensor reference at key {path!r}")
            return self.sharded(body)
        if tag in ("dict", "odict", "list", "tuple"):
            if self.depth >= MAX_DEPTH:
                raise ValueError(
                    f"the tree nests containers more than {MAX_DEPTH} deep at key {path or '[root]'!r} "
                    "(deeper than any checkpoint torchckpt writes)"
                )
            self.depth += 1
            out = self.container(tag, body, path)
            self.depth -= 1
            return out
        return self.leaf(tag, body, path)

    def container(self, tag: str, body: Any, path: str) -> Any:
        if tag in ("list", "tuple"):
            items = [self.node(v, _index_path(path, i)) for i, v in enumerate(_expect_list(body, path))]
            return items if tag == "list" else tuple(items)
        out: dict[Any, Any] = {} if tag == "dict" else OrderedDict()
        for item in _expect_list(body, path):
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError(f"malformed dict item at key {path!r}")
            k = self.key(item[0], path)
            out[k] = self.node(item[1], join_key(path, k))
        return out

    def key(self, n: Any, path: str) -> Any:
        # flatten never writes a tensor or a container of lists as a key; a manifest that does is corrupt
        if isinstance(n, dict) and ("T" in n or "DT" in n):
            raise ValueError(f"malformed dict key at key {path or '[root]'!r}: a tensor cannot be a key")
        k = self.node(n, path)
        try:
            hash(k)
        except TypeError as e:
            raise ValueError(f"malformed dict key at key {path or '[root]'!r}: {e}") from e
        return k

    def leaf(self, tag: str, body: Any, path: str) -> Any:
        try:
            if tag == "float":
                if body not in ("nan", "inf", "-inf"):
                    raise ValueError(body)
                return float(body)
            if tag == "bytes":
                return base64.b64decode(body, validate=True)
            if tag == "dtype":
                return dtype_from_name(body)
            if tag == "size":
                dims = _expect_list(body, path)
                if not all(type(d) is int and d >= 0 for d in dims):
                    raise ValueError(f"dimensions must be non-negative integers: {dims}")
                return torch.Size(dims)
            if tag == "device":
                return torch.device(body)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"malformed {tag} value at key {path or '[root]'!r}: {e}") from e
        if tag == "pickle":
            if not self.allow_pickle:
                raise UnsafeObjectError(
                    f"the value at key {path or '[root]'!r} of {self.where} is pickled; refusing to unpickle it "
                    "(pass allow_pickle=True to load it, only for checkpoints you trust)",
                    key=path,
                    type_name="pickle",
                )
            return pickle.loads(base64.b64decode(body))  # noqa: S301 - explicit opt-in
        raise ValueError(f"unknown node type {tag!r} at key {path or '[root]'!r}")


def deepest_key(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The key path of a container nested more than ``limit`` deep in plain JSON data ``value``.

    ``value`` itself counts as the first level when it is a dict or list. The
    walk is iterative, so any depth is measured without recursion.

    Returns:
        The key path (``"a.b[0]"``; ``"[root]"`` for ``value`` itself) of the
        first container past ``limit``, or None when ``value`` is within it.
    """
    todo: list[tuple[Any, str, int]] = [(value, "", 1)]
    while todo:
        v, path, depth = todo.pop()
        if isinstance(v, dict):
            items: Any = ((join_key(path, k), x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            items = ((_index_path(path, i), x) for i, x in enumerate(v))
        else:
            continue
        if depth > limit:
            return path or "[root]"
        todo.extend((x, sub, depth + 1) for sub, x in items)
    return None


def _expect_list(body: Any, path: str) -> list[Any]:
    if not isinstance(body, list):
        raise ValueError(f"malformed tree node at key {path or '[root]'!r}: expected a list")
    return body
