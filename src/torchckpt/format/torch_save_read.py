"""A fast weights-only reader of the files ``torch.save`` writes, for the common case; ``torch.load`` for the rest.

``torch.load(weights_only=True)`` unpickles with a pure-Python unpickler and
builds every tensor through several Python layers: about 70 µs per tensor, which
dominates a state of many small entries. This reader does the same job for the
files of the ``torch_save`` layout with Python's C unpickler restricted to a
short list of names, and makes each tensor a view of a private mapping of the
file (as ``torch.load(mmap=True)`` does; writes stay in the process):

- names admitted: ``torch._utils._rebuild_tensor_v2`` (rebuilt here: a tensor
  set on its storage, ``set_`` checking that it lies inside),
  ``torch._utils._rebuild_parameter``, ``collections.OrderedDict``, the typed
  storage names (``torch.FloatStorage``...), ``torch.Size``, torch dtypes,
  ``torch.device``, and ``_codecs.encode`` with ``latin1`` (how protocol 2
  pickles ``bytes``);
- persistent ids: only ``("storage", <storage name>, key, "cpu", numel)``, whose
  bytes are the stored (never compressed: ``bounds.check_zip_records``) record
  ``data/<key>`` lying inside the file.

Anything else (another name, a storage of another device, a ``map_location``
other than the CPU, tensor metadata or hooks, a big-endian file, a private
torch API that changed) raises :class:`Unsupported`, and the caller loads the
file with ``torch.load(weights_only=True)`` instead, which admits or refuses it
with its own messages: this reader never admits what ``torch.load`` would refuse.
"""

from __future__ import annotations

import codecs
import io
import mmap
import pickle
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["Unsupported", "cpu_only", "load_mapped"]


class Unsupported(Exception):
    """The file needs more than this reader admits: load it with ``torch.load`` (internal)."""


def cpu_only(map_location: Any) -> bool:
    """Whether ``map_location`` leaves every tensor on the CPU (None: where saved, which this reader checks is the CPU)."""
    if map_location is None:
        return True
    if isinstance(map_location, (str, torch.device)):
        try:
            return torch.device(map_location).type == "cpu"
        except (RuntimeError, TypeError):
            return False
    return False


def _storage_names() -> dict[str, torch.dtype]:
    try:
        return {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    except AttributeError:  # a torch without it: every file goes to torch.load
        return {}


_STORAGE_DTYPES = _storage_names()
_DTYPES = {str(d).split(".", 1)[1]: d for d in _STORAGE_DTYPES.values()}


class _Storage:
    """A storage of the file: the bytes of its record (a slice of the mapping) and their dtype."""

    __slots__ = ("dtype", "untyped")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype


class _StorageType:
    """What a typed storage name (``torch.FloatStorage``) resolves to here: its dtype, never a callable."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> torch.Tensor:
    if type(storage) is not _Storage or type(hooks) is not OrderedDict or hooks or metadata:
        raise Unsupported("a tensor with hooks, metadata or a storage that is not the file's")
    try:
        t = torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, size, stride)
    except (RuntimeError, TypeError, ValueError) as e:  # outside its storage, or arguments of the wrong kind
        raise Unsupported(str(e)) from e
    if requires_grad:
        t.requires_grad_(True)
    return t


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if type(text) is not str or encoding != "latin1":
        raise Unsupported("_codecs.encode other than of a str to latin1")
    return codecs.encode(text, "latin1")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, reader: Any, base: torch.UntypedStorage, size: int) -> None:
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.base = base
        self.size = size
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return _rebuild_tensor
            if name == "_rebuild_parameter":
                return torch._utils._rebuild_parameter
        elif module == "torch":
            if name in _STORAGE_DTYPES:
                return _StorageType(_STORAGE_DTYPES[name])
            if name in _DTYPES:
                return _DTYPES[name]
            if name == "Size":
                return torch.Size
            if name == "device":
                return torch.device
        elif (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        elif (module, name) == ("_codecs", "encode"):
            return _encode
        raise Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or pid[3] != "cpu":
            raise Unsupported("a persistent id other than a CPU storage")
        _, kind, key, _, numel = pid
        if type(kind) is not _StorageType or type(key) is not str or type(numel) is not int or numel < 0:
            raise Unsupported("a malformed storage id")
        found = self.storages.get(key)
        if found is None:
            nbytes = numel * kind.dtype.itemsize
            name = f"data/{key}"
            try:
                start = self.reader.get_record_offset(name)
                stored = self.reader.get_record_size(name)
            except RuntimeError as e:
                raise Unsupported(f"record {name}: {e}") from e
            if stored != nbytes or start < 0 or start + nbytes > self.size:
                raise Unsupported(f"record {name} does not hold the storage's {nbytes} bytes")
            found = self.storages[key] = _Storage(self.base[start : start + nbytes], kind.dtype)
        elif found.dtype != kind.dtype or found.untyped.nbytes() != numel * kind.dtype.itemsize:
            raise Unsupported(f"storage {key} read as two dtypes")
        return found


def load_mapped(fd: int, path: str, size: int) -> Any:
    """Unpickle the zip file ``torch.save`` wrote, open as ``fd`` (also reachable as ``path``), tensors mapped.

    Raises:
        Unsupported: The file needs more than this reader admits (load it with ``torch.load``).
    """
    if not _STORAGE_DTYPES or size <= 0:
        raise Unsupported("no storage names in this torch, or an empty file")
    try:
        reader = torch._C.PyTorchFileReader(path)
        if reader.has_record("byteorder") and reader.get_record("byteorder") != b"little":
            raise Unsupported("a big-endian file")
        data = reader.get_record("data.pkl")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (RuntimeError, OSError, ValueError, AttributeError) as e:
        raise Unsupported(str(e)) from e
    base = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()
    try:
        return _Unpickler(data, reader, base, size).load()
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - a broken pickle: torch.load gives the error its callers expect
        raise Unsupported(f"{type(e).__name__}: {e}") from e
