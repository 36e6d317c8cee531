"""Peak resident memory of a process and its descendants, sampled from /proc every ~1 ms or more.

Runs as its own small process (no torch import), so that sampling takes no
GIL from, and adds no thread to, the process being measured::

    python memsample.py PID

It reads commands on stdin, one a line, and answers each with one JSON line:

- ``start``: take a first sample and sample until ``stop``; answers ``{}``.
- ``stop``: answers the peaks since ``start`` (below).
- ``snap``: answers one sample now.
- ``quit``: exits (so does EOF).

A sample reads ``RssAnon``, ``RssShmem`` and ``RssFile`` (kB) from
``/proc/<pid>/status`` of PID and of every descendant (the list of
descendants is refreshed every 50 ms from ``/proc/<pid>/task/*/children``, so
a writer subprocess started during the operation is seen). The gap between
samples is 1 ms or four times what the last sample took, whichever is longer,
so that the sampler keeps at most a fifth of a core busy (a sample of a dozen
rank and writer processes takes about 0.5 ms: a gap of about 2 ms then). It
reduces them to:

- ``main``: PID's ``RssAnon + RssShmem`` (private memory plus the shared
  memory it has touched; page-cache pages mapped from files are left out:
  they are reclaimable, and a ``mmap`` load would otherwise count the file);
- ``children``: the sum of the descendants' ``RssAnon`` (their private memory:
  shared staging memory they map is already counted in ``main``);
- ``children_shmem``: the sum of the descendants' ``RssShmem`` (reported, not
  added: mostly the same pages as ``main``'s shared memory).

``stop`` answers ``{"first": sample, "peak": {field: max}, "samples": n,
"interval_ms": mean gap}``; every value in bytes.

The helpers (:func:`sample`, :func:`descendants`) are also imported by the
benchmark for one-off readings.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

__all__ = ["descendants", "sample"]

_FIELDS = ("RssAnon:", "RssShmem:", "RssFile:")


def _status(pid: int) -> tuple[int, int, int] | None:
    """(anon, shmem, file) resident bytes of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    out = [0, 0, 0]
    for line in text.split(b"\n"):
        for i, name in enumerate(_FIELDS):
            if line.startswith(name.encode()):
                out[i] = int(line.split()[1]) * 1024
    return out[0], out[1], out[2]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children of all its threads, recursively), but this process."""
    me = os.getpid()
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k != me and k not in found:
                    found.append(k)
                    todo.append(k)
    return found


def sample(pid: int, kids: list[int] | None = None) -> dict[str, int]:
    """One reading of ``pid`` and ``kids`` (default: its descendants now)."""
    main = _status(pid) or (0, 0, 0)
    children = children_shmem = 0
    for k in descendants(pid) if kids is None else kids:
        s = _status(k)
        if s is not None:
            children += s[0]
            children_shmem += s[1]
    return {"main": main[0] + main[1], "main_file": main[2], "children": children, "children_shmem": children_shmem}


class _Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.running = False
        self.thread: threading.Thread | None = None
        self.first: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.count = 0
        self.t0 = 0.0

    def _loop(self) -> None:
        kids = descendants(self.pid)
        refreshed = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now - refreshed > 0.05:
                kids, refreshed = descendants(self.pid), now
            s = sample(self.pid, kids)
            for k, v in s.items():
                if v > self.peak.get(k, -1):
                    self.peak[k] = v
            self.count += 1
            time.sleep(max(0.001, 4 * (time.monotonic() - now)))

    def start(self) -> None:
        self.first = sample(self.pid)
        self.peak = dict(self.first)
        self.count = 1
        self.t0 = time.monotonic()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, object]:
        self.running = False
        if self.thread is not None:
            self.thread.join()
        last = sample(self.pid)
        for k, v in last.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        elapsed = time.monotonic() - self.t0
        return {
            "first": self.first,
            "peak": self.peak,
            "samples": self.count,
            "interval_ms": 1000 * elapsed / max(1, self.count),
        }


def main() -> int:
    pid = int(sys.argv[1])
    sampler = _Sampler(pid)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            sampler.start()
            reply: object = {}
        elif cmd == "stop":
            reply = sampler.stop()
        elif cmd == "snap":
            reply = sample(pid)
        elif cmd == "quit":
            break
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
