"""The processes that test_races_s3 SIGKILLs mid-upload: each saves one state to an ``s3://`` URL.

``python s3_crash_child.py`` runs a *zygote*: it imports torch and torchckpt
once (no object store client is made in it: the client's runtime threads
would not survive a fork), then forks one saving child per request, so that
a child starts its save a millisecond after it is asked for. Protocol, one
JSON line each way: ``["fork", url, value, mib, log]`` -> ``pid``;
``["reap", pid]`` -> exit code (negative: killed by that signal).

A child appends ``s`` to ``log`` when its save begins and ``c`` when the save
returned (committed), then waits to be killed (at most :data:`WAIT_S`).
"""

from __future__ import annotations

import os
import time

from zygote import serve
from s3_fault_util import const_state, writer

#: Longest a child waits for its kill after its save.
WAIT_S = 120.0


def save_once(url: str, value: int, mib: float, log: str) -> None:
    state = const_state(value, mib)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"s")
    writer().write(url, state)
    os.write(fd, b"c")
    time.sleep(WAIT_S)


if __name__ == "__main__":
    serve(save_once)
