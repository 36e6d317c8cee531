"""Starting the writer subprocess from torchckpt's own entry point.

The writer is a fresh interpreter, a direct child of the training process,
started with :class:`subprocess.Popen` (see :mod:`torchckpt.writer_subprocess`
for why not ``multiprocessing``'s ``spawn``). It gets by inheritance the end of
a private pipe and the write end of a *sentinel* pipe (which reads EOF here
once the writer has exited, for :func:`multiprocessing.connection.wait`), and
through the private pipe what ``spawn`` would hand over: ``sys.path``, the
working directory, ``argv``, the authentication key (never on the command
line: torch passes tensors' file descriptors through ``multiprocessing``'s
resource sharer, which checks it) and torch's sharing strategy.

The user's ``__main__`` module is imported in the writer only when something
pickled for it refers to ``__main__`` (an init function, a writer factory or a
hook defined in the training script, or a value of a save whose class is):
:func:`pickle_for_writer` notices it while it pickles the message, and the
writer then imports the script as ``__mp_main__``, exactly as ``spawn`` does. Such a script needs an ``if __name__ == "__main__":`` guard;
without one, the writer refuses to start a writer of its own and its start
fails with that message instead of hanging.

The writer runs in its own session: the terminal's Ctrl-C (SIGINT to the
foreground process group) reaches the training process only.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.process
import os
import subprocess
import sys
import types
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing

from .writer_subprocess import PARENT_PID, SHARING_STRATEGY

__all__ = ["WriterChild", "WriterProcesses", "main_preparation", "pickle_for_writer", "start_message", "start_writer"]

logger = logging.getLogger(__name__)

#: Runs in the writer: ignores SIGINT from the first instant (importing torch takes seconds), makes
#: torchckpt importable where the training process found it, then starts.
_BOOT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.path.insert(0, {root!r}); "
    "from torchckpt.writer_subprocess import main; main()"
)


class _MainNotingPickler(ForkingPickler):
    """Pickles as :meth:`multiprocessing.connection.Connection.send` does, noting what it takes from ``__main__``.

    Tensors go through torch's reductions (shared memory) as in ``send``: only
    their class is looked at, their contents never refer to ``__main__``.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.from_main: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            if getattr(obj, "__module__", None) == "__main__":
                self.from_main.add(obj.__qualname__)
        elif isinstance(obj, torch.Tensor) and type(obj).__module__ == "__main__":
            self.from_main.add(type(obj).__qualname__)
        return NotImplemented  # pickled as ForkingPickler pickles it


def pickle_for_writer(obj: Any) -> tuple[bytes, list[str]]:
    """``obj`` pickled for the writer, and the functions and classes defined in ``__main__`` it refers to.

    One pass: the bytes are what ``Connection.send`` would send (send them with
    ``send_bytes``; the writer reads them with ``recv``), and the names say
    whether the writer must import the training script to unpickle them.

    Raises:
        Exception: ``obj`` does not pickle (the pickling error, as ``send`` raises it).
    """
    buffer = io.BytesIO()
    pickler = _MainNotingPickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), sorted(pickler.from_main)


def main_preparation() -> dict[str, str]:
    """How the writer imports the training script, as :func:`multiprocessing.spawn.prepare` expects it."""
    main_module = sys.modules["__main__"]
    name = getattr(getattr(main_module, "__spec__", None), "name", None)
    if name is not None:
        return {"init_main_from_name": name}
    path = getattr(main_module, "__file__", None)
    if path is None:
        return {}
    if not os.path.isabs(path) and multiprocessing.process.ORIGINAL_DIR is not None:
        path = os.path.join(multiprocessing.process.ORIGINAL_DIR, path)
    return {"init_main_from_path": os.path.normpath(path)}


def start_message(import_main: bool) -> dict[str, Any]:
    """The writer's first message: plain data, read before anything that needs ``sys.path`` or the authkey.

    Args:
        import_main: Whether the writer imports the training script (as ``__mp_main__``).
    """
    sys_path = list(sys.path)
    if "" in sys_path:  # the directory the training process started in, not the writer's
        sys_path[sys_path.index("")] = multiprocessing.process.ORIGINAL_DIR or os.getcwd()
    message: dict[str, Any] = {
        PARENT_PID: os.getpid(),
        SHARING_STRATEGY: torch.multiprocessing.get_sharing_strategy(),
        "name": "torchckpt-writer",
        "authkey": bytes(multiprocessing.current_process().authkey),
        "sys_path": sys_path,
        "sys_argv": list(sys.argv),
        "dir": os.getcwd(),
        "orig_dir": multiprocessing.process.ORIGINAL_DIR,
    }
    if import_main:
        message.update(main_preparation())
    return message


def _interpreter_flags() -> list[str]:
    """The command-line flags of this interpreter that the writer should share."""
    flags = sys.flags
    switches = {"-B": flags.dont_write_bytecode, "-s": flags.no_user_site, "-E": flags.ignore_environment}
    args = ["-" + "O" * flags.optimize] if flags.optimize else []
    args += [switch for switch, on in switches.items() if on]
    args += [f"-W{option}" for option in sys.warnoptions]
    args += ["-Xdev"] if flags.dev_mode else []
    args += ["-Xutf8"] if flags.utf8_mode == 1 else []
    return args


class WriterChild:
    """The writer subprocess, with the part of :class:`multiprocessing.Process`'s interface that callers use.

    Args:
        popen: The started process.
        sentinel: A file descriptor that becomes readable once the process has exited.
    """

    def __init__(self, popen: subprocess.Popen[bytes], sentinel: int) -> None:
        self._popen = popen
        self.sentinel = sentinel
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit code, or minus the signal that killed it."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        """Whether it is still running (an exited process is reaped here)."""
        return self._popen.poll() is None

    def kill(self) -> None:
        """SIGKILL it (nothing when it has exited already)."""
        if self._popen.poll() is None:
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for it to exit, and reap it."""
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Release the sentinel (once it has exited)."""
        if self.sentinel >= 0 and self._popen.poll() is not None:
            os.close(self.sentinel)
            self.sentinel = -1


class WriterProcesses:
    """The writer subprocess as ``CheckpointProcess.process`` exposes it (``processes[0]``, ``join``)."""

    def __init__(self, child: WriterChild) -> None:
        self.processes = [child]

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the writer has exited."""
        self.processes[0].join(timeout)
        return not self.processes[0].is_alive()


def start_writer(child_end: Connection) -> WriterProcesses:
    """Start the writer subprocess on ``child_end``.

    The caller then sends it :func:`start_message`, the pickled initialisation
    (``send_bytes``) and a ``PING``. ``child_end`` is closed here (the writer holds its copy), so that the
    writer's death reads as the end of the pipe in the training process.

    Raises:
        OSError: The interpreter could not be started.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sentinel, sentinel_w = os.pipe()
    fd = child_end.fileno()
    try:
        popen = subprocess.Popen(
            [sys.executable, *_interpreter_flags(), "-c", _BOOT.format(root=root), str(fd), str(sentinel_w)],
            pass_fds=(fd, sentinel_w),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(sentinel)
        raise
    finally:
        os.close(sentinel_w)
        child_end.close()
    return WriterProcesses(WriterChild(popen, sentinel))
