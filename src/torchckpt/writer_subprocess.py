"""The writer subprocess's side: its entry point, its request loop and the messages it exchanges.

The training process starts the writer as a fresh interpreter running
:func:`main` (``python -c "...; main()" PIPE_FD SENTINEL_FD``, see :mod:`torchckpt.writer_launch`), not with
``multiprocessing``'s ``spawn``: ``spawn`` re-runs the user's ``__main__``
script in the child, which fails at once in a script without an
``if __name__ == "__main__":`` guard ("An attempt has been made to start a new
process before the current process has finished its bootstrapping phase") and,
under ``torchrun``, blocks in ``init_process_group``. The user's script is
imported here only when something the writer needs (the init functions, their
arguments, a request) is defined in it, as ``spawn`` would (see
:mod:`torchckpt.checkpoint_process`).

Start-up, in order:

1. SIGINT is ignored: the writer runs in its own session, and even a SIGINT
   sent to its group by hand must not cut a commit short; the training
   process decides when it stops (it sends ``TERMINATE_PROCESS`` or kills it).
2. The first message on the pipe is plain data: the parent's pid (watched:
   the writer exits when the training process is gone), the preparation data
   of :func:`multiprocessing.spawn.prepare` (``sys.path``, working directory,
   ``argv``, the authentication key that torch's file-descriptor passing
   checks, and the main script only when needed) and torch's sharing strategy.
3. The second message is the initialisation: the rank, the init
   function and its arguments, the writer factory and its arguments. Any
   failure up to here, and in the init functions, is sent back as the answer
   to the parent's first ``PING``.
4. Requests are served until ``TERMINATE_PROCESS`` or the end of the pipe.
   ``WARMUP`` carries the staging arena: it is mapped, each page read once,
   and kept (as the last write's state is kept), so the first write finds it mapped.
   A pipelined write (:mod:`torchckpt.pipeline`) is followed on the pipe by
   ``STAGED`` messages (no answer), read by the write itself as it waits for
   staged groups; one that arrives when no write waits (its write failed first) is dropped.
   A write goes to torchckpt's own ``CheckpointWriter`` whole
   (``write_staged``: the staged state as it came, flattened or not, with the
   save's number and figures); a user's writer (any other writer object, or a
   class that overrides ``write``) gets ``write(path, state_dict, **kwargs)``
   with the state dict rebuilt from the flattened form.
"""

from __future__ import annotations

import logging
import multiprocessing.spawn
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing

from .checkpoint_writer import CheckpointWriter
from .errors import CheckpointError
from .format.tree import Flattened
from .pipeline import StagedProgress
from .shm import own_storage
from .staging import staged_state_dict
from .types import RankInfo

__all__ = [
    "PARENT_PID",
    "SHARING_STRATEGY",
    "RequestType",
    "WorkerRequest",
    "WorkerResponse",
    "WriterLoop",
    "in_writer_subprocess",
    "main",
    "own_storages",
    "touch_pages",
    "watch_parent",
]

logger = logging.getLogger(__name__)

#: Keys of the start-up message that are not :func:`multiprocessing.spawn.prepare`'s.
PARENT_PID = "torchckpt_parent_pid"
SHARING_STRATEGY = "torchckpt_sharing_strategy"

_IN_WRITER = False
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
#: Wait for staging progress when the writer's config sets no write timeout.
_NO_TIMEOUT_S = 24 * 3600.0


def in_writer_subprocess() -> bool:
    """Whether this process is a torchckpt writer subprocess (which must not start another)."""
    return _IN_WRITER


class RequestType(Enum):
    """Kinds of message to the writer subprocess."""

    PING = "ping"
    WARMUP = "warmup"
    WRITE_CHECKPOINT = "write_checkpoint"
    STAGED = "staged"  # staging progress of the pipelined write in flight (no answer)
    TERMINATE_PROCESS = "exit"


@dataclass
class WorkerRequest:
    """A message to the writer subprocess (sent pickled over the private pipe)."""

    request_type: RequestType
    payload: dict[str, Any]


@dataclass
class WorkerResponse:
    """The writer subprocess's answer."""

    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the writer subprocess.

    Args:
        argv: ``[PIPE_FD, SENTINEL_FD]`` (default: ``sys.argv[1:]``): the inherited
            end of the pipe to the training process, and the write end of the pipe
            whose closing tells the training process that this one has exited
            (held open, never written).
    """
    global _IN_WRITER
    _IN_WRITER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    pipe = Connection(int(args[0]))
    try:
        start = pipe.recv()
    except (EOFError, OSError):
        os._exit(1)  # the training process is already gone
    watch_parent(start.pop(PARENT_PID))
    try:
        strategy = start.pop(SHARING_STRATEGY)
        multiprocessing.spawn.prepare(start)
        torch.multiprocessing.set_sharing_strategy(strategy)
        init = pipe.recv()
    except BaseException as e:  # noqa: BLE001 - reported to the parent (SystemExit of a main script included)
        _report_start_failure(pipe, e)
        sys.exit(1)
    WriterLoop(pipe=pipe, **init).run()


def _report_start_failure(pipe: Connection, e: BaseException) -> None:
    text = traceback.format_exc()
    logger.error("checkpoint writer subprocess: start failed: %s", text)
    error = e if isinstance(e, Exception) else RuntimeError(f"{type(e).__name__}: {e}")
    for payload in ({"error": error}, None):
        try:
            pipe.send(WorkerResponse(RequestType.PING, success=False, error_msg=text, payload=payload))
            return
        except Exception:  # noqa: BLE001 - the error itself may not pickle
            continue


def watch_parent(parent_pid: int) -> None:
    """Exit when the training process is gone (a killed parent must not leave a writer behind)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="torchckpt-parent-watch", daemon=True).start()


class WriterLoop:
    """The subprocess side: initialise, then serve requests until told to exit.

    Args:
        pipe: The connection to the training process.
        rank_info: The rank written for.
        init_fn: Runs first, with ``init_args``.
        init_args: Its arguments.
        writer_init_fn: Builds the writer from ``writer_init_args`` (``rank_info`` added when absent).
        writer_init_args: Its keyword arguments.
    """

    def __init__(
        self,
        pipe: Connection,
        rank_info: RankInfo,
        init_fn: Callable[..., None],
        init_args: tuple[Any, ...],
        writer_init_fn: Callable[..., CheckpointWriter],
        writer_init_args: dict[str, Any],
    ) -> None:
        self.rank_info = rank_info
        self.pipe = pipe
        self.init_fn = init_fn
        self.init_args = init_args
        self.writer_init_fn = writer_init_fn
        self.writer_init_args = writer_init_args
        self.keep_alive: Any = None

    def run(self) -> None:
        """Initialise, answer the first ``PING``, then serve requests."""
        request = WorkerRequest(RequestType.PING, {})
        try:
            self.init_fn(*self.init_args)
            args = dict(self.writer_init_args)
            args.setdefault("rank_info", self.rank_info)
            writer = self.writer_init_fn(**args)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            self._fail(request, e)
            return
        while True:
            try:
                request = self.pipe.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            except Exception as e:  # noqa: BLE001 - a request that cannot be unpickled here
                request = WorkerRequest(RequestType.WRITE_CHECKPOINT, {})
                if not self._fail(request, e):
                    break
                continue
            if not self._serve(writer, request):
                break
        writer.close()

    def _serve(self, writer: CheckpointWriter, request: WorkerRequest) -> bool:
        """Answer one request; False when the loop must end."""
        try:
            if request.request_type == RequestType.PING:
                self.pipe.send(WorkerResponse(RequestType.PING, success=True))
            elif request.request_type == RequestType.WARMUP:
                self.keep_alive = touch_pages(request.payload["staging"])
                self.pipe.send(WorkerResponse(RequestType.WARMUP, success=True))
            elif request.request_type == RequestType.WRITE_CHECKPOINT:
                self._write(writer, request.payload)
                self.pipe.send(WorkerResponse(RequestType.WRITE_CHECKPOINT, success=True))
            elif request.request_type == RequestType.STAGED:
                pass  # progress of a write that has already ended (it failed before staging did)
            elif request.request_type == RequestType.TERMINATE_PROCESS:
                self.pipe.send(WorkerResponse(RequestType.TERMINATE_PROCESS, success=True))
                return False
            else:
                raise ValueError(f"Unknown request type: {request.request_type}")
        except Exception as e:  # noqa: BLE001 - reported to the parent; keep serving
            return self._fail(request, e)
        return True

    def _fail(self, request: WorkerRequest, e: Exception) -> bool:
        text = traceback.format_exc()
        if isinstance(e, CheckpointError):
            # Expected and self-explaining (it names rank, operation, path): the caller raises it.
            logger.warning("checkpoint writer subprocess: %s failed: %s", request.request_type.value, e)
            logger.debug("%s", text)
        else:
            logger.error("checkpoint writer subprocess: %s failed: %s", request.request_type.value, text)
        for payload in ({"error": e}, None):
            try:
                self.pipe.send(WorkerResponse(request.request_type, success=False, error_msg=text, payload=payload))
                return True
            except Exception:  # noqa: BLE001 - the error itself may not pickle
                continue
        return False

    def _write(self, writer: CheckpointWriter, payload: dict[str, Any]) -> None:
        """Hand a write request to the writer: all of it to torchckpt's own, the state dict and keywords to a user's."""
        state = payload["state"]
        # Keep the previous request's shared storages mapped until this one is
        # unpickled (done by now): a reused staging arena is then found in
        # torch's cache of shared storages instead of being mapped again.
        self.keep_alive = state
        path, kwargs = payload["path"], payload["kwargs"]
        progress = None
        if payload.get("pipeline") is not None:  # the tensors are still being staged: wait for them as written
            timeout_s = payload["pipeline"]["timeout_s"]
            progress = StagedProgress(
                self._next_staged, payload["save_number"], payload["pipeline"]["ends"],
                _NO_TIMEOUT_S if timeout_s is None else timeout_s, path,
            )  # fmt: skip
        if isinstance(writer, CheckpointWriter) and type(writer).write is CheckpointWriter.write:
            if not isinstance(state, Flattened):  # a user's stager's state dict
                state = own_storages(state)
            writer.write_staged(
                path, state, save_number=payload["save_number"], stats=payload["stats"], progress=progress, **kwargs
            )  # fmt: skip
            return
        if progress is not None:
            progress.wait_all()
        if isinstance(state, Flattened):
            tensors = [own_storage(t) for t in state.tensors]
            state_dict = staged_state_dict(state, tensors.__getitem__)
        else:
            state_dict = own_storages(state)
        writer.write(path=path, state_dict=state_dict, **kwargs)


    def _next_staged(self, timeout_s: float) -> dict[str, Any]:
        """The next message during a pipelined write: staging progress (``pipeline.StagedProgress``)."""
        if not self.pipe.poll(timeout_s):
            raise TimeoutError(f"no staging progress from the training process in {timeout_s:.0f}s")
        request = self.pipe.recv()
        if not isinstance(request, WorkerRequest) or request.request_type != RequestType.STAGED:
            kind = request.request_type.value if isinstance(request, WorkerRequest) else type(request).__name__
            raise CheckpointError(f"the writer got a {kind} request while waiting for staging progress")
        return request.payload


def touch_pages(staging: torch.Tensor) -> torch.Tensor:
    """Read one byte of every page of ``staging`` (a mapped arena), so that writes from it take no page faults."""
    flat = staging.view(-1).view(torch.uint8) if staging.numel() else staging
    if flat.numel():
        flat[:: _PAGE_BYTES].sum()
    return staging


def own_storages(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor that is a slice of a larger storage (a staging arena) given its own storage.

    Zero-copy (:func:`torchckpt.shm.own_storage`). A tensor reached twice (tied) stays one object.
    """
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = own_storage(obj)
    elif type(obj) in (dict, OrderedDict):
        out = type(obj)((k, own_storages(v, memo)) for k, v in obj.items())
    elif type(obj) in (list, tuple):
        out = type(obj)(own_storages(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out
