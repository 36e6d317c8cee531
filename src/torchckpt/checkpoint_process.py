"""The writer subprocess: writes staged checkpoints in the background.

One persistent subprocess per rank runs the ``CheckpointWriter``. It is a
fresh interpreter started from torchckpt's own entry point
(:mod:`torchckpt.writer_launch`, :mod:`torchckpt.writer_subprocess`), a direct
child of the training process, not a ``multiprocessing`` ``spawn`` child: it
does not re-run the training script, so a script without an
``if __name__ == "__main__":`` guard works, also under ``torchrun``. The
script is imported in the writer (as ``spawn`` would) only when the init
functions, their arguments or a request refer to something defined in it;
that is logged, and such a script needs the guard.

A write request carries the staged state (the flattened form that
``DefaultStager.stage_flattened`` made, or a user's stager's state dict), the
path, the user's keyword arguments, and, as fields of their own, the save's
number (counted here, so that a replaced writer keeps counting with the other
ranks) and the figures measured before the write (``stall_s``). The writer
hands torchckpt's own ``CheckpointWriter`` all of it
(``CheckpointWriter.write_staged``); a user's writer gets
``write(path, state_dict, **kwargs)`` only.

Tensors cross to the writer through shared memory, never as bytes through the
pipe: the request is pickled once (:func:`torchckpt.writer_launch.pickle_for_writer`,
which also notes whether it refers to the training script) with torch's
multiprocessing reductions, which
pass a shared storage's file descriptor (a staged state dict lives in one
shared arena, :mod:`torchckpt.shm`) and move any other tensor into shared
memory first. The subprocess keeps the last mapping, so a reused arena is not
mapped again; :meth:`CheckpointProcess.warmup` hands it the arena before the
first save (a ``WARMUP`` request), so that even the first is not. The
subprocess starts when this object is made; ``write_staged`` never waits for
it in the caller's thread (the write's background thread does), ``write``
does, as the reference's does. Every wait has a limit: the subprocess start
(``subprocess_init_timeout_secs``; a writer that dies while starting fails it
at once, naming its exit code or signal), each write (``write_timeout_secs``),
and the shutdown (``subprocess_shutdown_timeout_secs``, then it is killed). A
writer that dies fails its pending write at once, naming its pid and exit
status, and the next write starts a fresh one. The subprocess watches its
parent and exits when the training process is gone. It runs in its own
session and ignores SIGINT: a Ctrl-C interrupts the training process only,
which then stops the writer (``close``) or leaves it to finish a commit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from multiprocessing.connection import Connection, wait
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint_writer import CheckpointWriter
from .config import CheckpointProcessConfig
from .errors import WriterProcessError
from .format.tree import Flattened
from .pipeline import Handover
from .types import STATE_DICT, RankInfo
from .writer_launch import WriterProcesses, pickle_for_writer, start_message, start_writer
from .writer_subprocess import (
    RequestType,
    WorkerRequest,
    WorkerResponse,
    WriterLoop,
    in_writer_subprocess,
    watch_parent,
)

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse"]

logger = logging.getLogger(__name__)

_DIED = "Child process terminated unexpectedly"
_WHERE = "the writer's own messages, if any, are on this process's standard error"
#: Added to the init timeout where a wait covers a start that is itself bounded by it.
_GRACE_S = 30.0


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


@dataclass(frozen=True)
class _WriteRequest:
    """A write as numbered in the training process, before its state is staged."""

    path: str
    kwargs: dict[str, Any]
    save_number: int
    called_at: float | None
    handover: Handover | None = None


def _killed_message(rank_info: RankInfo) -> str:
    return f"the checkpoint writer of rank {rank_info.global_rank} was killed (CheckpointProcess.kill)"


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


def _died(proc: Any, during: str, cause: str = "") -> str:
    """The message of a writer that died ``during`` a start or a write."""
    where = f"; {_WHERE}" if during == "start" else ""
    return f"{_DIED}: {_describe_exit(proc)} during {during}{cause}{where}"


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
        # Whether the writer imports the training script: only once something it needs is defined there.
        self._import_main = False
        self.process: WriterProcesses | None = None
        self._parent_end: Connection | None = None
        self._broken = False
        self._closed = False
        self._killed = False
        self._writes = 0
        self._send_lock = threading.Lock()  # one message at a time on the pipe (a pipelined save's come from staging)
        self.process_creation_future: Future[None] = self._executor.submit(self._create_subprocess, config)

    @property
    def rank_info(self) -> RankInfo:
        """The rank the writer subprocess writes for, and the world size."""
        return self._rank_info

    # -- lifecycle -------------------------------------------------------

    def _create_subprocess(self, config: CheckpointProcessConfig) -> None:
        if in_writer_subprocess():
            raise RuntimeError(
                "a checkpoint writer subprocess tried to start another one: it imported the training script "
                "(the writer's init functions or arguments are defined in it), and the script starts saving when "
                'imported. Put the script\'s code under `if __name__ == "__main__":`, or define those functions '
                "in an importable module"
            )
        init = {
            "rank_info": self._rank_info,
            "init_fn": self._subprocess_init_fn,
            "init_args": self._subprocess_init_args,
            "writer_init_fn": self._checkpoint_writer_init_fn,
            "writer_init_args": self._checkpoint_writer_init_args,
        }
        init_bytes, from_main = pickle_for_writer(init)  # a pickling error is raised here, before any process starts
        if from_main and not self._import_main:
            self._import_main = True
            logger.info(
                "the checkpoint writer subprocess imports the training script (__main__) for %s defined there",
                ", ".join(from_main),
            )
        self._parent_end, child_end = multiprocessing.Pipe()
        self._broken = False
        # Known workaround for https://github.com/pytorch/pytorch/issues/37377
        os.environ.setdefault("MKL_SERVICE_FORCE_INTEL", "GNU")
        self.process = start_writer(child_end)
        proc = self.process.processes[0]
        if self._killed:  # kill() ran while this one started: it must not write
            self._stop_subprocess()
            raise WriterProcessError(_killed_message(self._rank_info), pid=proc.pid, exitcode=proc.exitcode)
        logger.info("started checkpoint writer subprocess pid %d for rank %d", proc.pid, self._rank_info.global_rank)
        try:
            self._parent_end.send(start_message(self._import_main))
            self._parent_end.send_bytes(init_bytes)
            self._parent_end.send(WorkerRequest(RequestType.PING, {}))
        except OSError as e:  # it died before reading them
            proc.join(timeout=5)
            self._broken = True
            raise WriterProcessError(_died(proc, "start", f" ({e})"), pid=proc.pid, exitcode=proc.exitcode) from e
        timeout = config.subprocess_init_timeout_secs
        if not self._await_response(timeout, during="start"):
            self._stop_subprocess()
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

    def kill(self) -> None:
        """Stop writing at once: SIGKILL the writer subprocess and reap it.

        The write in flight fails (``WriterProcessError``), and so does every
        later write: no writer is started again, so nothing commits after this
        returns. ``close`` still releases the rest. Call it from the thread
        that saves (``AsyncCheckpointer.abort`` does), e.g. before an exit
        that must not wait for a commit.
        """
        self._killed = True  # first: a writer started from now on is stopped by its starter
        self._stop_subprocess()

    def _stop_subprocess(self) -> None:
        """SIGKILL the current writer subprocess and reap it (the next write starts another)."""
        if self.process is None:
            return
        proc = self.process.processes[0]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)

    def _respawn(self, reason: str | None = None) -> None:
        old = self.process.processes[0] if self.process is not None else None
        if reason is None:
            reason = _describe_exit(old) if old is not None else "none"
        logger.warning("replacing the checkpoint writer subprocess (%s)", reason)
        self._stop_subprocess()
        if self.process is not None:
            self.process.processes[0].close()
        if self._parent_end is not None:
            self._parent_end.close()
        self._create_subprocess(self._config)

    # -- messages --------------------------------------------------------

    def _encode(self, request: WorkerRequest) -> tuple[bytes, list[str]]:
        """The request pickled for the writer, and the names of ``__main__`` it refers to."""
        try:
            return pickle_for_writer(request)
        except ValueError as e:
            self._broken = True
            raise WriterProcessError(
                f"{_DIED}: could not send the {request.request_type.value} request: {e}", pid=self._pid()
            ) from e

    def _send_bytes(self, request_type: RequestType, data: bytes) -> None:
        try:
            with self._send_lock:
                if self._parent_end is None:
                    raise OSError("pipe to the writer subprocess is not open")
                self._parent_end.send_bytes(data)
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
                raise WriterProcessError(_died(proc, during), path=path, pid=proc.pid, exitcode=proc.exitcode)
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
                _died(proc, during, cause),
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

    def warmup(self, staging: torch.Tensor | None = None) -> None:
        """Wait until the writer subprocess has started; with ``staging``, have it map that memory now.

        ``AsyncCheckpointer.warmup`` calls it with the staging arena (one
        ``uint8`` tensor over its whole shared storage): the writer maps it,
        touches every page of the mapping and keeps it, so that the first
        save's request finds it mapped (as every later save does). Waits at
        most ``subprocess_init_timeout_secs`` for the start and as long again
        for the answer; call it when no write is in flight.

        Raises:
            WriterProcessError: Closed, or the writer died (its pid and exit status named).
            TimeoutError: The writer did not start, or did not answer, in time.
            Exception: The writer's start failed: that error (an init function's, a pickling error).
        """
        rank = self._rank_info.global_rank
        if self._closed:
            raise WriterProcessError(f"warmup of the checkpoint writer of rank {rank} after close")
        timeout = self._config.subprocess_init_timeout_secs
        # A TimeoutError raised by the start itself is the start's error: only a wait that ran out is ours.
        if not futures_wait([self.process_creation_future], timeout=timeout + _GRACE_S).done:
            raise TimeoutError(f"Timed out after {timeout}s waiting for the checkpoint writer of rank {rank} to start")
        self.process_creation_future.result()
        if staging is None:
            return
        warmed = self._executor.submit(self._warm, staging, timeout)
        if not futures_wait([warmed], timeout=2 * timeout + _GRACE_S).done:
            raise TimeoutError(
                f"Timed out after {timeout}s waiting for the checkpoint writer of rank {rank} to map staging memory"
            )
        warmed.result()

    def _warm(self, staging: torch.Tensor, timeout: float) -> None:
        if self._killed:
            raise WriterProcessError(f"{_killed_message(self._rank_info)}: warmup abandoned")
        if not self._alive() and not (self._parent_end is not None and self._parent_end.closed):
            self._respawn()
        data, _ = self._encode(WorkerRequest(RequestType.WARMUP, {"staging": staging}))
        self._send_bytes(RequestType.WARMUP, data)
        if not self._await_response(timeout, during="warmup"):
            pid = self._pid()
            self._stop_subprocess()
            self._broken = True
            raise TimeoutError(f"checkpoint writer subprocess (pid {pid}) did not map the staging memory in {timeout}s")
        self._recv(during="warmup")

    def write(self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any) -> Future[None]:
        """Write a (staged) state dict in the subprocess.

        Args:
            state_dict: The staged state dict, or a future of it.
            path: The checkpoint directory.
            **kwargs: Passed to the writer (and its hooks).

        Returns:
            A future that completes when the checkpoint is committed, or holds the error.
        """
        # The reference's contract: the writer has started (or its start failed) when this returns.
        self.process_creation_future.result()
        return self.write_staged(state_dict, path, **kwargs)

    def write_staged(
        self,
        staged: STATE_DICT | Flattened | Future[STATE_DICT] | Future[Flattened],
        path: str,
        *,
        save_called_at: float | None = None,
        handover: Handover | None = None,
        **kwargs: Any,
    ) -> Future[None]:
        """Write what staging made in the subprocess: ``write``, also for the flattened form.

        ``AsyncCheckpointer.save`` calls it with ``DefaultStager.stage_flattened``'s
        result as soon as staging has started. Call order: the save is numbered
        here, in the calling thread, which never waits for the writer to start;
        a background thread then waits for the start (bounded by
        ``subprocess_init_timeout_secs``; a failed start fails the returned
        future with its error), for the staged state, sends it to the writer
        and waits for the commit. Writes run one at a time, in the order of the calls.

        Args:
            staged: A state dict or a :class:`~torchckpt.format.tree.Flattened`, or a future of either.
            path: The checkpoint directory.
            save_called_at: ``time.perf_counter()`` when the save was called: the time from
                it until the staged state is ready is stored as the save's ``stall_s``.
            handover: A pipelined save (``staged`` is its ``planned``): the request is sent
                once the plan is made, the staged groups after it (:mod:`torchckpt.pipeline`).
            **kwargs: Passed to the writer (and its hooks).

        Returns:
            A future that completes when the checkpoint is committed, or holds the error.
        """
        # Numbered here, in the training process, so a replaced writer keeps counting with the other ranks.
        request = _WriteRequest(os.fspath(path), kwargs, self._writes, save_called_at, handover)
        self._writes += 1
        return self._executor.submit(self._write, staged, request)

    def _write(self, staged: Any, request: _WriteRequest) -> None:
        # Ran before this on the same one-thread executor: done, and bounded by the init timeout.
        self.process_creation_future.result()
        state = staged.result() if isinstance(staged, Future) else staged
        ends = None
        if request.handover is not None:
            state, ends = state  # the plan: the flattened state, its groups (None: staged whole)
        path = request.path
        stats = {}  # a pipelined save's stall comes with its last staged group
        if request.called_at is not None and ends is None:
            stats["stall_s"] = time.perf_counter() - request.called_at
        payload = {
            "state": state, "path": path, "kwargs": request.kwargs, "save_number": request.save_number, "stats": stats,
        }  # fmt: skip
        if ends is not None:
            payload["pipeline"] = {"ends": ends, "timeout_s": self._config.write_timeout_secs}
        if self._killed:
            raise WriterProcessError(f"{_killed_message(self._rank_info)}: the save of {path} is abandoned", path=path)
        data, from_main = self._encode(WorkerRequest(RequestType.WRITE_CHECKPOINT, payload))
        if isinstance(state, Flattened):  # values stored with pickle were pickled by staging
            from_main = sorted({*from_main, *(name for value in state.pickled for name in value.from_main)})
        if from_main and not self._import_main:
            # The writer cannot unpickle them without the training script: restart it with the script imported.
            self._import_main = True
            self._respawn(f"the save of {path} holds {', '.join(from_main)} from the training script (__main__): "
                          "the new writer imports the script")  # fmt: skip
        elif not self._alive() and not (self._parent_end is not None and self._parent_end.closed):
            self._respawn()
        handover = request.handover if ends is not None else None
        if handover is None:
            self._send_bytes(RequestType.WRITE_CHECKPOINT, data)
        else:
            handover.attach(
                request.save_number, lambda: self._send_bytes(RequestType.WRITE_CHECKPOINT, data), self._send_staged
            )
        try:
            timeout = self._config.write_timeout_secs
            during = f"the write of {path}"
            if not self._await_response(timeout, during=during, path=path):
                pid = self._pid()
                self._stop_subprocess()
                self._broken = True
                raise TimeoutError(
                    f"checkpoint writer subprocess (pid {pid}) did not finish writing {path} in {timeout}s"
                )
            self._recv(during=during, path=path)
        finally:
            if handover is not None:
                handover.detach()

    def _send_staged(self, progress: dict[str, Any]) -> None:
        """Tell the writer how far staging of the pipelined save in flight has come (``pipeline.Handover``)."""
        data, _ = self._encode(WorkerRequest(RequestType.STAGED, progress))
        self._send_bytes(RequestType.STAGED, data)

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
            self.process.processes[0].close()
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
        """The writer's request loop (run by :func:`torchckpt.writer_subprocess.main` in the writer subprocess)."""
        if parent_pid is not None:
            watch_parent(parent_pid)
        WriterLoop(
            parent_pipe, rank_info, subprocess_init_fn, subprocess_init_args,
            checkpoint_writer_init_fn, checkpoint_writer_init_args,
        ).run()  # fmt: skip
