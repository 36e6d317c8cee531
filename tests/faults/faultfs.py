"""A fault-injecting file-system layer for the tests: fail, shorten, and cut the power.

:class:`FaultFS` wraps the real local file system (``torchckpt.storage.fs.LocalFS``,
the one layer every mutating call of a save goes through) and numbers each
call a *step*. It can

- fail step ``fail_at`` with a chosen errno (the call does not happen);
- shorten every write: ``write``/``pwrite``/``pwritev`` write about half of
  what they were given and return the real count, as a kernel may;
- record what a power cut would leave. After every ``fsync`` it notes the
  file's bytes (a file) or the entries (a directory), keyed by inode so that
  renames keep their history, and keeps the *durable image* of the tree under
  ``root``: only what some fsync made durable — a file's bytes as of its last
  fsync (nothing if never), a directory's entries as of its last fsync (its
  entries when the layer was installed, if never since). That is the least a
  POSIX file system promises after a crash (the method of LevelDB's
  ``fault_injection_test``); a real one may keep more, which the *process*
  images cover: the tree exactly as it stood before each step, what a
  SIGKILL at that instant leaves, and the *metadata* images: every entry as
  it stood before each step, but each file's bytes only as of its last fsync
  (a file system that journals metadata in order but lost unsynced data).

A *tree* is a nested dict: file name → bytes, directory name → tree.

Everything under ``root`` is taken as durable when the layer is installed.
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from torchckpt.storage.fs import LocalFS

Tree = dict[str, Union[bytes, "Tree"]]

#: The mutating calls, by kind.
WRITE_OPS = ("write", "pwrite", "pwritev")
ALL_OPS = ("open", "mkdir", *WRITE_OPS, "fsync", "rename", "exchange", "unlink")


def default_errno(op: str) -> int:
    """The errno a failed step raises unless told otherwise: ENOSPC where space is taken, else EIO."""
    return errno_mod.ENOSPC if op in (*WRITE_OPS, "open", "mkdir") else errno_mod.EIO


@dataclass
class Step:
    """One mutating call: its number, kind and the path it concerned."""

    number: int
    op: str
    path: str


@dataclass
class _Entry:
    is_dir: bool
    ino: int


@dataclass
class Journal:
    """What one run of the layer saw (picklable: crosses from a writer subprocess)."""

    steps: list[Step] = field(default_factory=list)
    #: The durable image after the install and after each fsync that changed it.
    durable: list[Tree] = field(default_factory=list)
    #: The tree as it stood before each step (a process killed there leaves this).
    process: list[Tree] = field(default_factory=list)
    #: The entries as they stood before each step, with each file's bytes as of its last
    #: fsync: a cut where the file system kept every metadata change made so far (as a
    #: journal in order would) but no data that was not fsynced.
    metadata: list[Tree] = field(default_factory=list)
    #: The step that was failed, if one was.
    failed: Step | None = None


class FaultFS(LocalFS):
    """The real file system with injected faults and a record of durability.

    Args:
        root: The directory whose durable image is kept (a save's parent directory).
        fail_at: Number of the step to fail (0-based), or None.
        fail_ops: Only steps of these kinds are counted towards ``fail_at``
            (all kinds are still numbered in the journal).
        errno: The errno the failed step raises; by default ENOSPC for a
            write, open or mkdir, EIO for anything else.
        short_writes: Every write writes about half of what it is given.
        process_images: Also record the tree before every step.
        exchange_supported: False: ``exchange`` reports "not supported" (after
            counting its step), as on NFS and several FUSE file systems.
    """

    def __init__(
        self,
        root: str,
        *,
        fail_at: int | None = None,
        fail_ops: Sequence[str] = ALL_OPS,
        errno: int | None = None,
        short_writes: bool = False,
        process_images: bool = False,
        exchange_supported: bool = True,
    ) -> None:
        self.root = os.path.abspath(root)
        self.fail_at = fail_at
        self.fail_ops = tuple(fail_ops)
        self.errno = errno
        self.short_writes = short_writes
        self.process_images = process_images
        self.exchange_supported = exchange_supported
        self.journal = Journal()
        self._counted = 0
        self._lock = threading.RLock()  # the writer's I/O threads take turns here
        self._paths: dict[int, str] = {}  # fd -> path, for the journal
        self._files: dict[int, bytes] = {}  # inode -> bytes as of its last fsync
        self._dirs: dict[int, dict[str, _Entry]] = {}  # inode -> entries as of its last fsync
        self._root_ino = os.stat(self.root).st_ino
        self._take_all_as_durable(self.root)
        self.journal.durable.append(self._durable_image())

    # -- the steps ----------------------------------------------------------

    def _step(self, op: str, path: str) -> None:
        """Number the call; record the process image; fail it if its number has come."""
        step = Step(len(self.journal.steps), op, path)
        self.journal.steps.append(step)
        if self.process_images:
            self.journal.process.append(read_tree(self.root))
            self.journal.metadata.append(self._metadata_image(self.root))
        if op not in self.fail_ops:
            return
        counted, self._counted = self._counted, self._counted + 1
        if counted == self.fail_at:
            self.journal.failed = step
            code = default_errno(op) if self.errno is None else self.errno
            raise OSError(code, os.strerror(code), path)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        with self._lock:
            self._step("open", path)
            fd = super().open(path, flags, mode)
            self._paths[fd] = path
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._paths.pop(fd, None)
        super().close(fd)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        with self._lock:
            self._step("write", self._path(fd))
            return super().write(fd, self._shorten(memoryview(data)))

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        with self._lock:
            self._step("pwrite", self._path(fd))
            return super().pwrite(fd, self._shorten(memoryview(data)), offset)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        with self._lock:
            self._step("pwritev", self._path(fd))
            if self.short_writes:
                total = sum(b.nbytes for b in buffers)
                want = max(1, total // 2)
                kept: list[memoryview] = []
                for b in buffers:
                    if want <= 0:
                        break
                    kept.append(b[:want])
                    want -= min(want, b.nbytes)
                buffers = kept
            return super().pwritev(fd, buffers, offset)

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._step("fsync", self._path(fd))
            super().fsync(fd)
            self._record_fsync(fd)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        with self._lock:
            self._step("mkdir", path)
            super().mkdir(path, mode)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._step("rename", f"{src} -> {dst}")
            super().rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        with self._lock:
            self._step("exchange", f"{a} <-> {b}")
            return self.exchange_supported and super().exchange(a, b)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._step("unlink", path)
            super().unlink(path)

    def _path(self, fd: int) -> str:
        return self._paths.get(fd, f"<fd {fd}>")

    def _shorten(self, view: memoryview) -> memoryview:
        view = view.cast("B")
        if not self.short_writes or view.nbytes <= 1:
            return view
        return view[: view.nbytes // 2]

    # -- durability ---------------------------------------------------------

    def _record_fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            self._dirs[st.st_ino] = _entries(f"/proc/self/fd/{fd}")
        elif stat.S_ISREG(st.st_mode):
            with open(f"/proc/self/fd/{fd}", "rb") as f:  # the fd itself may be write-only
                self._files[st.st_ino] = f.read()
        else:
            return
        image = self._durable_image()
        if image != self.journal.durable[-1]:
            self.journal.durable.append(image)

    def _take_all_as_durable(self, path: str) -> None:
        self._dirs[os.stat(path).st_ino] = entries = _entries(path)
        for name, entry in entries.items():
            child = os.path.join(path, name)
            if entry.is_dir:
                self._take_all_as_durable(child)
            else:
                with open(child, "rb") as f:
                    self._files[entry.ino] = f.read()

    def _durable_image(self, ino: int | None = None) -> Tree:
        tree: Tree = {}
        for name, entry in self._dirs.get(self._root_ino if ino is None else ino, {}).items():
            tree[name] = self._durable_image(entry.ino) if entry.is_dir else self._files.get(entry.ino, b"")
        return tree

    def _metadata_image(self, path: str) -> Tree:
        tree: Tree = {}
        for name, entry in _entries(path).items():
            if entry.is_dir:
                tree[name] = self._metadata_image(os.path.join(path, name))
            else:
                tree[name] = self._files.get(entry.ino, b"")
        return tree


def _entries(path: str) -> dict[str, _Entry]:
    out = {}
    for name in os.listdir(path):
        try:
            st = os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            continue  # removed meanwhile (a background deletion)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            out[name] = _Entry(stat.S_ISDIR(st.st_mode), st.st_ino)
    return out


def read_tree(path: str) -> Tree:
    """The regular files and directories under ``path``, as a tree (vanishing entries skipped)."""
    tree: Tree = {}
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return tree
    for name in names:
        child = os.path.join(path, name)
        try:
            st = os.lstat(child)
            if stat.S_ISDIR(st.st_mode):
                tree[name] = read_tree(child)
            elif stat.S_ISREG(st.st_mode):
                with open(child, "rb") as f:
                    tree[name] = f.read()
        except FileNotFoundError:
            continue
    return tree


def write_tree(path: str, tree: Tree) -> None:
    """Create ``tree`` under the (new) directory ``path``."""
    os.makedirs(path)
    for name, node in tree.items():
        child = os.path.join(path, name)
        if isinstance(node, dict):
            write_tree(child, node)
        else:
            with open(child, "wb") as f:
                f.write(node)


def dirs_with(tree: Tree, name: str, prefix: str = "") -> list[str]:
    """Relative paths of the directories of ``tree`` that hold a file ``name``."""
    found = [prefix] if isinstance(tree.get(name), bytes) else []
    for child, node in sorted(tree.items()):
        if isinstance(node, dict):
            found += dirs_with(node, name, os.path.join(prefix, child))
    return found


def describe(tree: Any, indent: str = "") -> str:
    """A short listing of a tree for assertion messages."""
    lines = []
    for name, node in sorted(tree.items()):
        if isinstance(node, dict):
            lines.append(f"{indent}{name}/")
            lines.append(describe(node, indent + "  "))
        else:
            lines.append(f"{indent}{name} ({len(node)} bytes)")
    return "\n".join(line for line in lines if line)
