"""A child process that forks saving children on request (a zygote), spoken to in JSON lines over its stdin/stdout.

The crash tests start one (it imports torch once) and have it fork a child
per save, so that killing a child at a random instant costs milliseconds, not
a fresh interpreter. The child script prints ``"ready"`` first, then answers
each command line with one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["Zygote", "serve"]


class Zygote:
    """``script`` running in a subprocess with ``env`` in ``cwd``; :meth:`call` sends a command and returns its answer."""

    def __init__(self, script: str, *, env: dict[str, str], cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd, env=env, text=True
        )
        assert self._recv() == "ready"

    def _recv(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the zygote died (exit code {self.proc.poll()})"
        return json.loads(line)

    def call(self, *cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(list(cmd)) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def serve(work: Callable[..., None]) -> None:
    """The zygote's side: say ``"ready"``, then fork a child running ``work(*args)`` per ``["fork", *args]`` line.

    Answers a fork with the child's pid, and ``["reap", pid]`` with its exit
    code (negative: killed by that signal). A child whose ``work`` returns or
    raises exits 1 (its traceback on stderr): the tests expect it to die by SIGKILL.
    """
    import torch

    torch.set_num_threads(1)  # no intra-op thread pool to inherit across fork
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd[0] == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    work(*cmd[1:])
                except BaseException:  # noqa: BLE001 - report whatever stopped the work
                    traceback.print_exc()
                finally:
                    os._exit(1)
            print(json.dumps(pid), flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(cmd[1], 0)
            print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
