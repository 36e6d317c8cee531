"""torchckpt with two ranks: two processes, a gloo group on loopback, each saving half the state.

The two rank processes live as long as the block (set up once, or once per
repetition when memory is short). Each builds its half of the workload
(``make_state(size / 2, seed=rank + 1)``) and its checkpointers, warms up its
async checkpointers (first save), and then saves on command. A save starts on
both ranks after a ``dist.barrier()``; each rank reports its stall (stage
future done; the whole save for sync) and its save-to-durable time (save
returned / write future done), and the figure of the collective save is the
slowest rank's. Total throughput is both halves' tensor bytes over that time.

Each async checkpointer keeps a staging copy of its rank's half. When two
such copies per rank would not fit comfortably in memory (large states), a
rank keeps one async checkpointer at a time: switching format closes the
other and warms up the new one, untimed.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

import methods
import torch
import torch.multiprocessing as mp
from harness import Bench, figures, mem_available, remove
from methods import Block, Ctx, tc_config

MODES = (("sync", "native"), ("async", "native"), ("sync", "torch_save"), ("async", "torch_save"))
WORLD = 2
_RANKS_NOTE = (
    "2 processes with a gloo group, each saving half the state (its own rank file); time of the slowest rank; "
    "memory: main = this process, writer = the rank processes and their writers"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, nbytes: int, scratch: str, conn: Any, one_async: bool) -> None:
    try:
        import torch.distributed as dist
        import workload

        import torchckpt as tc

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        sd = workload.make_state(nbytes // WORLD, seed=rank + 1)
        ckpts: dict[tuple[str, str], Any] = {}

        def prepare(mode: str, fmt: str) -> None:
            """Make (and warm up: writer process, staging memory, first calls) the checkpointer of a mode."""
            if (mode, fmt) in ckpts:
                return
            if mode == "async" and one_async:  # memory is short: one staging copy at a time
                for key in [k for k in ckpts if k[0] == "async"]:
                    ckpts.pop(key).close()
            make = tc.make_async_checkpointer if mode == "async" else tc.make_sync_checkpointer
            ckpts[mode, fmt] = make(tc_config(fmt))
            p = os.path.join(scratch, f"warmup-ranks-{mode}-{fmt}")
            dist.barrier()
            out = ckpts[mode, fmt].save(p, sd)
            if out is not None:
                out[1].result()
            dist.barrier()
            if rank == 0:
                remove(p)

        for mode, fmt in MODES:
            if mode == "sync" or not one_async:
                prepare(mode, fmt)
        conn.send(("ready", workload.tensor_bytes(sd)))
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "prepare":
                prepare(cmd[1], cmd[2])
                conn.send(("prepared",))
                continue
            _, mode, fmt, path = cmd
            dist.barrier()
            t0 = time.perf_counter()
            out = ckpts[mode, fmt].save(path, sd)
            if out is None:
                stall = durable = time.perf_counter() - t0
            else:
                out[0].result()
                stall = time.perf_counter() - t0
                out[1].result()
                durable = time.perf_counter() - t0
            conn.send(("done", stall, durable))
        for ck in ckpts.values():
            ck.close()
        dist.destroy_process_group()
        conn.send(("closed",))
    except BaseException:  # noqa: BLE001 - report anything to the parent, then exit
        conn.send(("error", traceback.format_exc()))


class TwoRanks(Block):
    key = "tc_2ranks"
    label = "torchckpt, 2 ranks (gloo on loopback), half the state each"
    held_states = 3.0  # both halves, plus the async checkpointers' staging copies of them

    def setup(self, b: Bench, ctx: Ctx) -> None:
        spawn = mp.get_context("spawn")
        port = _free_port()
        # Both async checkpointers keep a staging copy of both halves (the state's size each): one at a time
        # when two do not fit comfortably.
        self.one_async = 2 * ctx.nbytes > 0.4 * mem_available()
        self.conns = []
        self.procs = []
        for rank in range(WORLD):
            parent, child = spawn.Pipe()
            p = spawn.Process(
                target=_worker, args=(rank, port, ctx.nbytes, b.scratch, child, self.one_async), daemon=False
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        total = 0
        for c in self.conns:
            msg = self._recv(c, timeout_s=900)
            total += int(msg[1])
        self.rows = {
            (mode, fmt): b.row(
                f"tc2_{mode}_{fmt}",
                f"torchckpt {mode}, {fmt}, 2 ranks",
                "torchckpt",
                "save",
                total,
                notes=_RANKS_NOTE,
            )
            for mode, fmt in MODES
        }

    def _recv(self, conn: Any, timeout_s: float) -> Any:
        if not conn.poll(timeout_s):
            raise TimeoutError(f"a rank process did not answer within {timeout_s}s")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"a rank process failed:\n{msg[1]}")
        return msg

    def _save(self, mode: str, fmt: str, path: str) -> tuple[None, dict[str, Any]]:
        for c in self.conns:
            c.send(("save", mode, fmt, path))
        replies = [self._recv(c, timeout_s=900) for c in self.conns]
        return None, figures(
            stall_s=max(r[1] for r in replies), durable_s=max(r[2] for r in replies), per_rank=[r[1:] for r in replies]
        )

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        for (mode, fmt), row in self.rows.items():
            for c in self.conns:  # untimed: makes and warms up this mode's checkpointer where it is not yet
                c.send(("prepare", mode, fmt))
            for c in self.conns:
                self._recv(c, timeout_s=900)
            for i in range(methods.ASYNC_SAVES if mode == "async" else 1):
                p = b.path(f"tc2-{mode}-{fmt}-{i}")
                b.measure(row, lambda m=mode, f=fmt, q=p: self._save(m, f, q), before=b.sync, fresh_bytes=ctx.nbytes)
                remove(p)

    def teardown(self) -> None:
        for c in self.conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for c in self.conns:
            try:
                if c.poll(60):
                    c.recv()
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
