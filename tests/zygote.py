"""A child process that forks saving children on request (a zygote), spoken to in JSON lines over its stdin/stdout.

The crash tests start one (it imports torch once) and have it fork a child
per save, so that killing a child at a random instant costs milliseconds, not
a fresh interpreter. The child script prints ``"ready"`` first, then answers
each command line with one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

__all__ = ["Zygote"]


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
