"""Named points of a save where a test kills or stops a process, found through the file-system layer.

:class:`KillPointFS` wraps ``torchckpt.storage.fs.LocalFS`` (the layer every
mutating call of a save goes through) and runs an *action* once, the first
time the save reaches its point:

===================  ===========================================================
``data``             a write leaves the rank file at ``threshold`` bytes or more
``fsync-data``       just before the rank file's fsync
``manifest-open``    the commit begins: every rank file and the pending directory
                     are fsynced, nothing of the manifest is written yet
``manifest-tmp``     just before ``manifest.json.tmp`` (written, fsynced) is renamed
``manifest-renamed`` just after that rename, before the pending directory is swapped in
``exchanged``        just after the swap, before the parent directory's fsync
``cleanup``          inside the removal of the old generation (part of it removed)
===================  ===========================================================

In the async writer subprocess, :func:`install_armed` (a
``subprocess_init_fn``) installs a layer that reads its point from an *arm
file* at the start of each save and, at the point, writes a *reached file*
and hangs until the test kills it. Module level, no pytest: the writer
subprocess imports it by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from torchckpt.storage import fs
from torchckpt.storage.fs import LocalFS

POINTS = ("data", "fsync-data", "manifest-open", "manifest-tmp", "manifest-renamed", "exchanged", "cleanup")

#: What a kill at each point leaves at the checkpoint's path: the old or the new generation.
COMMITTED_AT = {
    "data": False,
    "fsync-data": False,
    "manifest-open": False,
    "manifest-tmp": False,
    "manifest-renamed": False,
    "exchanged": True,
    "cleanup": True,
}

#: Longest an armed hang lasts: far longer than a test waits, so only a kill ends it.
HANG_S = 60.0

_RANK_FILE = re.compile(r"/(checkpoint_\d+\.pt|rank_\d+\.safetensors)$")
_TRASH = ".torchckpt-trash-"

Action = Callable[[str, int], None]


def _is_rank_file(path: str | None) -> bool:
    return bool(path) and _RANK_FILE.search(path or "") is not None


class KillPointFS(LocalFS):
    """The local file system, running ``action(point, detail)`` once when a save reaches ``point``.

    Args:
        point: One of :data:`POINTS` (None: never).
        action: Called with the point and a detail (the rank file's size for ``data``).
        threshold: Bytes of the rank file that trigger ``data``.
    """

    def __init__(self, point: str | None, action: Action, threshold: int = 0) -> None:
        if point is not None and point not in POINTS:
            raise ValueError(f"unknown kill point {point!r}")
        self.point = point
        self.action = action
        self.threshold = threshold
        self.paths: dict[int, str] = {}
        self._fired = False
        self._lock = threading.Lock()

    def arm(self, point: str | None, threshold: int = 0) -> None:
        with self._lock:
            self.point, self.threshold, self._fired = point, threshold, False

    def fire(self, point: str, detail: int = 0) -> None:
        with self._lock:
            if self._fired or self.point != point:
                return
            self._fired = True
        self.action(point, detail)

    # -- the calls ------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if path.endswith("/manifest.json.tmp"):
            self.fire("manifest-open")
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        super().close(fd)

    def _written(self, fd: int) -> None:
        if self.point == "data" and _is_rank_file(self.paths.get(fd)):
            size = os.fstat(fd).st_size
            if size >= self.threshold:
                self.fire("data", size)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        n = super().write(fd, data)
        self._written(fd)
        return n

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        self._written(fd)
        return n

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        n = super().pwritev(fd, buffers, offset)
        self._written(fd)
        return n

    def fsync(self, fd: int) -> None:
        if _is_rank_file(self.paths.get(fd)):
            self.fire("fsync-data")
        super().fsync(fd)

    def rename(self, src: str, dst: str) -> None:
        manifest = dst.endswith("/manifest.json")
        if manifest:
            self.fire("manifest-tmp")
        super().rename(src, dst)
        if manifest:
            self.fire("manifest-renamed")

    def exchange(self, a: str, b: str) -> bool:
        swapped = super().exchange(a, b)
        self.fire("exchanged")
        return swapped

    def rmtree(self, real: Callable[..., Any], path: str, *args: Any, **kwargs: Any) -> Any:
        """``shutil.rmtree``, firing ``cleanup`` after removing one file of an old generation."""
        if self.point == "cleanup" and _TRASH in os.path.basename(str(path)) and not self._fired:
            names = sorted(os.listdir(path))
            if names:
                os.unlink(os.path.join(path, names[0]))
            self.fire("cleanup", len(names))
        return real(path, *args, **kwargs)


def hang_action(arm_file: str, reached_file: str) -> Action:
    """At the point: write ``reached_file`` (``{"point", "pid", "detail"}``), then hang while armed."""

    def action(point: str, detail: int) -> None:
        tmp = reached_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"point": point, "pid": os.getpid(), "detail": detail}, f)
        os.rename(tmp, reached_file)
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and os.path.exists(arm_file):
            time.sleep(0.02)

    return action


def signal_action(pid: int, sig: int) -> Action:
    """At the point: send ``sig`` to ``pid`` (this process or another)."""

    def action(point: str, detail: int) -> None:
        os.kill(pid, sig)

    return action


_installed = contextlib.ExitStack()


def install(layer: KillPointFS) -> None:
    """Route this process's file-system calls (and ``shutil.rmtree``) through ``layer`` for good."""
    _installed.enter_context(fs.install(layer))
    real = shutil.rmtree

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> Any:
        return layer.rmtree(real, path, *args, **kwargs)

    shutil.rmtree = rmtree  # type: ignore[assignment]


class _ArmedFS(KillPointFS):
    """Re-reads the arm file when a save opens its rank file."""

    def __init__(self, arm_file: str, reached_file: str) -> None:
        super().__init__(None, hang_action(arm_file, reached_file))
        self.arm_file = arm_file

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if _is_rank_file(path):
            try:
                with open(self.arm_file) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                config = {"point": None}
            self.arm(config.get("point"), int(config.get("threshold", 0)))
        return super().open(path, flags, mode)

    def rmtree(self, real: Callable[..., Any], path: str, *args: Any, **kwargs: Any) -> Any:
        if not os.path.exists(self.arm_file):
            self.arm(None)
        return super().rmtree(real, path, *args, **kwargs)


def install_armed(arm_file: str, reached_file: str) -> None:
    """``subprocess_init_fn`` of the async kill-point tests: hang where the arm file says."""
    install(_ArmedFS(arm_file, reached_file))


def kill_self(sig: int = signal.SIGKILL) -> Action:
    return signal_action(os.getpid(), sig)
