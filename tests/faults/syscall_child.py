"""The process that test_syscall_faults runs under strace: one save over an existing checkpoint.

``python syscall_child.py PATH FORMAT MODE IO_THREADS MIB`` saves
``fault_util.state(2, MIB)`` to PATH, synchronously or through an async
checkpointer (whose writer subprocess strace follows), and prints one JSON
line: ``{"error": <describe(e)> or null, "pids": [this pid, writer pid]}``.
It exits 0 whether or not the save failed; anything else is a crash.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    path, fmt, mode, threads, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    from fault_util import describe, state

    import torchckpt as tc

    config = tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=fmt, io_threads=threads, write_barrier_timeout_secs=60),
        process_config=tc.CheckpointProcessConfig(write_timeout_secs=120),
    )
    sd = state(2, mib, tensors=6)
    pids = [os.getpid()]
    error = None
    if mode == "sync":
        ck: tc.Checkpointer = tc.make_sync_checkpointer(config, rank_info=tc.RankInfo(0, 1))
    else:
        ck = tc.make_async_checkpointer(config, rank_info=tc.RankInfo(0, 1))
    try:
        futures = ck.save(path, sd)
        if futures is not None:
            ck._checkpoint_process.process_creation_future.result(timeout=120)  # type: ignore[attr-defined]
            pids.append(ck._checkpoint_process.process.processes[0].pid)  # type: ignore[attr-defined]
            futures[0].result(timeout=120)
            futures[1].result(timeout=120)
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = describe(e)
    ck.close()
    print(json.dumps({"error": error, "pids": pids}), flush=True)


if __name__ == "__main__":
    main()
