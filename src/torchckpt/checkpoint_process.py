"""The writer subprocess: writes staged checkpoints in the background.

One persistent subprocess per rank (``spawn`` start method) runs the
``CheckpointWriter``. Tensors cross to it through shared memory, never as
bytes through the pipe: the request is pickled with torch's multiprocessing
reductions, which pass a shared storage's file descriptor (a staged state dict
lives in one shared arena, :mod:`torchckpt.shm`) and move any other tensor into
shared memory first. The subprocess keeps the last mapping, so a reused arena
is not mapped again. Every wait has a limit: the subprocess start
(``subprocess_init_timeout_secs``), each write (``write_timeout_secs``), and
the shutdown (``subprocess_shutdown_timeout_secs``, then it is killed). A
writer that dies fails its pending write at once, naming its pid and exit
status, and the next write starts a fresh one. The subprocess watches its
parent and exits when the training process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from enum import Enum
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from .checkpoint_writer import SAVE_NUMBER_KWARG, STATS_KWARG, CheckpointWriter
from .errors import CheckpointError, ConfigError, WriterProcessError
from .types import STATE_DICT, RankInfo

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse"]

logger = logging.getLogger(__name__)

_DIED = "Child process terminated unexpectedly"


@dataclass(frozen=True)
class CheckpointProcessConfig:
    """Options of the writer subprocess.

    Attributes:
        subprocess_init_timeout_secs: Longest wait for the subprocess to start and initialise.
        subprocess_shutdown_timeout_secs: Longest wait for it to exit on ``close`` before it is killed.
        write_timeout_secs: Longest wait for one write; past it the writer is killed and the
            write fails (None: no limit beyond the writer's own barrier timeouts).
    """

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
    # Positional as in the reference up to here; torchckpt's own options are keyword-only.
    _: KW_ONLY
    write_timeout_secs: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("subprocess_init_timeout_secs", "subprocess_shutdown_timeout_secs", "write_timeout_secs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"CheckpointProcessConfig.{name} must be > 0, got {value}", field=name)


class RequestType(Enum):
    """Kinds of message to the writer subprocess."""

    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
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


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _describe_exit(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return f"writer subprocess (pid {proc.pid}) is unresponsive"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"writer subprocess (pid {proc.pid}) was killed by {name}"
    return f"writer subprocess (pid {proc.pid}) exited with code {code}"


class CheckpointProcess:
    """Writes checkpoints in a persistent background subprocess.

    Args:
        rank_info: This process's rank.
        config: Timeouts.
        subprocess_init_fn: Runs first in the subprocess, with ``subprocess_init_args``.
        subprocess_init_args: Its arguments.
        checkpoint_writer_init_fn: Builds the writer in the subprocess from
            ``checkpoint_writer_init_args`` (``rank_info`` added when absent).
        checkpoint_writer_init_args: Its keyword arguments.
    """

    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        subprocess_init_fn: Callable[..., None],
        subprocess_init_args: tuple[Any, ...],
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter],
        checkpoint_writer_init_args: dict[str, Any],
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-writer")
        self._rank_info = rank_info
        self._config = config
        self._subprocess_init_fn = subprocess_init_fn
        self._subprocess_init_args = subprocess_init_args
        self._checkpoint_writer_init_fn = checkpoint_writer_init_fn
        self._checkpoint_writer_init_args = dict(checkpoint_writer_init_args or {})
        self.process: Any = None
        self._parent_end: Connection | None = None
        self._broken = False
        self._closed = False
        self._writes = 0
        self.process_creation_future: Future[None] = self._executor.submit(self._create_subprocess, config)

    # -- lifecycle -------------------------------------------------------

    def _create_subprocess(self, config: CheckpointProcessConfig) -> None:
        ctx = mp.get_context("spawn")
        self._parent_end, child_end = ctx.Pipe()
        self._broken = False
        # Known workaround for https://github.com/pytorch/pytorch/issues/37377
        os.environ.setdefault("MKL_SERVICE_FORCE_INTEL", "GNU")
        self.process = mp.start_processes(
            CheckpointProcess._subprocess,
            args=(
                self._rank_info,
                child_end,
                self._subprocess_init_fn,
                self._subprocess_init_args,
                self._checkpoint_writer_init_fn,
                self._checkpoint_writer_init_args,
                os.getpid(),
            ),
            nprocs=1,
            join=False,
            daemon=True,
            start_method="spawn",
        )
        child_end.close()  # so a dead child shows as EOF here
        proc = self.process.processes[0]
        logger.info("started checkpoint writer subprocess pid %d for rank %d", proc.pid, self._rank_info.global_rank)
        self._send(RequestType.PING, {})
        timeout = config.subprocess_init_timeout_secs
        if not self._await_response(timeout, during="start"):
            self._kill()
            msg = f"Timed out after {timeout}s waiting for checkpoint subprocess (pid {proc.pid}) to initialize"
            logger.error(msg)
            raise TimeoutError(msg)
        self._recv(during="start")

    def _alive(self) -> bool:
        return (
            self.process is not None
            and not self._broken
            and self._parent_end is not None
            and not self._parent_end.closed
            and self.process.processes[0].is_alive()
        )

    def _kill(self) -> None:
        if self.process is None:
            return
        proc = self.process.processes[0]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)

    def _respawn(self) -> None:
        old = self.process.processes[0] if self.process is not None else None
        logger.warning(
            "replacing the checkpoint writer subprocess (%s)", _describe_exit(old) if old is not None else "none"
        )
        self._kill()
        if self._parent_end is not None:
            self._parent_end.close()
        self._create_subprocess(self._config)

    # -- messages --------------------------------------------------------

    def _send(self, request_type: RequestType, payload: dict[str, Any]) -> None:
        try:
            if self._parent_end is None:
                raise OSError("pipe to the writer subprocess is not open")
            self._parent_end.send(WorkerRequest(request_type=request_type, payload=payload))
        except (OSError, ValueError) as e:
            self._broken = True
            raise WriterProcessError(
                f"{_DIED}: could not send the {request_type.value} request: {e}",
                pid=self._pid(),
            ) from e

    def _pid(self) -> int | None:
        return self.process.processes[0].pid if self.process is not None else None

    def _await_response(self, timeout: float | None, *, during: str, path: str | None = None) -> bool:
        """Wait for a response or the death of the subprocess; False on timeout."""
        assert self._parent_end is not None and self.process is not None
        proc = self.process.processes[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([self._parent_end, proc.sentinel], timeout=remaining)
            if self._parent_end in ready:
                return True
            if proc.sentinel in ready:
                proc.join(timeout=1)
                self._broken = True
                raise WriterProcessError(
                    f"{_DIED}: {_describe_exit(proc)} during {during}", path=path, pid=proc.pid, exitcode=proc.exitcode
                )
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _recv(self, *, during: str, path: str | None = None) -> dict[str, Any] | None:
        assert self._parent_end is not None
        try:
            response: WorkerResponse = self._parent_end.recv()
        except (EOFError, OSError) as e:
            # The pipe closed: the subprocess died (the same death as in _await_response, seen first from the pipe).
            self._broken = True
            proc = self.process.processes[0]
            proc.join(timeout=1)
            cause = f" ({type(e).__name__}: {e})" if str(e) else ""
            raise WriterProcessError(
                f"{_DIED}: {_describe_exit(proc)} during {during}{cause}",
                path=path,
                pid=proc.pid,
                exitcode=proc.exitcode,
            ) from e
        if not response.success:
            error = (response.payload or {}).get("error")
            remote = _RemoteTraceback(response.error_msg or "")
            if isinstance(error, Exception):
                raise error from remote
            raise RuntimeError(f"Unexpected response from worker process: {response.error_msg}") from remote
        return response.payload

    # -- writing ---------------------------------------------------------

    def write(self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any) -> Future[None]:
        """Write a (staged) state dict in the subprocess.

        Args:
            state_dict: The staged state dict, or a future of it.
            path: The checkpoint directory.
            **kwargs: Passed to the writer (and its hooks).

        Returns:
            A future that completes when the checkpoint is committed, or holds the error.
        """
        self.process_creation_future.result()
        # Numbered here, in the training process, so a replaced writer keeps counting with the other ranks.
        kwargs[SAVE_NUMBER_KWARG] = self._writes
        self._writes += 1
        return self._executor.submit(self._write, state_dict, path, **kwargs)

    def _write(self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any) -> None:
        sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
        stats = kwargs.get(STATS_KWARG)
        if isinstance(stats, dict) and "called_at" in stats:
            stats["stall_s"] = time.perf_counter() - stats.pop("called_at")
        if not self._alive() and not (self._parent_end is not None and self._parent_end.closed):
            self._respawn()
        self._send(RequestType.WRITE_CHECKPOINT, {"state_dict": sd, "path": os.fspath(path), "kwargs": kwargs})
        timeout = self._config.write_timeout_secs
        during = f"the write of {path}"
        if not self._await_response(timeout, during=during, path=os.fspath(path)):
            pid = self._pid()
            self._kill()
            self._broken = True
            raise TimeoutError(f"checkpoint writer subprocess (pid {pid}) did not finish writing {path} in {timeout}s")
        self._recv(during=during, path=os.fspath(path))

    def close(self) -> None:
        """Stop the subprocess: ask it to exit, wait up to the shutdown timeout, then kill it."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.process is not None and self.process.processes[0].is_alive():
            pid = self.process.processes[0].pid
            try:
                assert self._parent_end is not None
                self._parent_end.send(WorkerRequest(request_type=RequestType.TERMINATE_PROCESS, payload={}))
            except (OSError, ValueError, AssertionError):
                logger.warning("could not ask writer subprocess %d to exit; it will be killed", pid)
            timeout = self._config.subprocess_shutdown_timeout_secs
            try:
                if not self.process.join(timeout=timeout):
                    logger.warning("writer subprocess %d did not exit within %ss: killing it", pid, timeout)
                    self.process.processes[0].kill()
            except Exception as e:  # noqa: BLE001 - it exited with an error: nothing left to stop
                logger.warning("writer subprocess %d ended with an error: %s", pid, e)
        if self.process is not None:
            self.process.processes[0].join(timeout=10)
        if self._parent_end is not None:
            self._parent_end.close()
        logger.debug("checkpoint process closed")

    # -- the subprocess --------------------------------------------------

    @staticmethod
    def _subprocess(
        sub_rank: int,
        rank_info: RankInfo,
        parent_pipe: Connection,
        subprocess_init_fn: Callable[..., None],
        subprocess_init_args: tuple[Any, ...],
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter],
        checkpoint_writer_init_args: dict[str, Any],
        parent_pid: int | None = None,
    ) -> None:
        if parent_pid is not None:
            _watch_parent(parent_pid)
        _WriterLoop(
            rank_info, parent_pipe, subprocess_init_fn, subprocess_init_args,
            checkpoint_writer_init_fn, checkpoint_writer_init_args,
        ).run()  # fmt: skip


def _watch_parent(parent_pid: int) -> None:
    """Exit when the training process is gone (a killed parent must not leave a writer behind)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="torchckpt-parent-watch", daemon=True).start()


class _WriterLoop:
    """The subprocess side: initialise, then serve requests until told to exit."""

    def __init__(
        self,
        rank_info: RankInfo,
        pipe: Connection,
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
            try:
                if request.request_type == RequestType.PING:
                    self.pipe.send(WorkerResponse(RequestType.PING, success=True))
                elif request.request_type == RequestType.WRITE_CHECKPOINT:
                    self._write(writer, request.payload)
                    self.pipe.send(WorkerResponse(RequestType.WRITE_CHECKPOINT, success=True))
                elif request.request_type == RequestType.TERMINATE_PROCESS:
                    self.pipe.send(WorkerResponse(RequestType.TERMINATE_PROCESS, success=True))
                    break
                else:
                    raise ValueError(f"Unknown request type: {request.request_type}")
            except Exception as e:  # noqa: BLE001 - reported to the parent; keep serving
                if not self._fail(request, e):
                    break
        writer.close()

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
        state_dict = payload["state_dict"]
        # Keep the previous request's shared storages mapped until this one is
        # unpickled (done by now): a reused staging arena is then found in
        # torch's cache of shared storages instead of being mapped again.
        self.keep_alive = state_dict
        kwargs = payload["kwargs"]
        if type(writer).write is not CheckpointWriter.write:
            # A user's writer gets only the user's keyword arguments.
            kwargs = {k: v for k, v in kwargs.items() if k not in (STATS_KWARG, SAVE_NUMBER_KWARG)}
        writer.write(path=payload["path"], state_dict=_own_storages(state_dict), **kwargs)


def _own_storages(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor that is a slice of a larger storage (a staging arena) given its own storage.

    Zero-copy: each new storage aliases the tensor's bytes in the arena. Without
    it, ``torch.save`` would write the whole arena once per checkpoint (padding
    and stale bytes included) and refuse an arena viewed as several dtypes
    ("Cannot save multiple tensors or storages that view the same data as
    different types"). A tensor reached twice (tied) stays one object.
    """
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj
        nbytes = obj.numel() * obj.element_size()
        storage = obj.untyped_storage()
        if obj.device.type == "cpu" and nbytes and obj.is_contiguous() and storage.nbytes() != nbytes:
            start = obj.storage_offset() * obj.element_size()
            raw = torch.empty(0, dtype=torch.uint8).set_(storage[start : start + nbytes], 0, (nbytes,), (1,))
            out = raw.view(obj.dtype).view(obj.shape)
    elif type(obj) in (dict, OrderedDict):
        out = type(obj)((k, _own_storages(v, memo)) for k, v in obj.items())
    elif type(obj) in (list, tuple):
        out = type(obj)(_own_storages(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out
