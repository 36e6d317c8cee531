"""One rank of the sharded benchmark: a process of an N-rank gloo group that runs operations on command.

The parent (``sharded.py``) sends a command over a pipe; every rank of the
world receives the same command, meets the others at a ``dist.barrier()``,
runs the operation on its part of the FSDP2 state (``sharded_state.py``) and
answers with its own figures: ``("done", {"time_s": ..., "stall_s": ...,
"ok": ...})``. The figure of a collective operation is the slowest rank's
(the parent takes the maximum). Anything raised is sent back as
``("error", traceback)``.

Operations (``op, path, verify``):

- ``copy``: ``copy_`` of every local tensor into preallocated tensors (the stall's floor);
- ``write``: each rank writes its local tensors' bytes to its own file, then fsync (the disk's limit);
- ``tc_save`` / ``tc_async``: torchckpt sync / async save (native format); async: stall = stage future done;
- ``dcp_save`` / ``dcp_async``: torch DCP ``save`` / ``async_save`` (thread executor); stall = until it returned;
- ``tc_load`` / ``dcp_load``: load into the zeroed template (zeroing untimed); ``verify`` compares it with the state.

``prepare`` makes a method's checkpointer and warms it up with one untimed
save (imports, thread pools; the async checkpointer's writer process and
staging memory).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from typing import Any

import torch
from harness import malloc_trim, remove

#: Longest any collective of the group may wait (a rank that died ends the others).
GROUP_TIMEOUT_S = 900


class _Rank:
    """What one rank holds: its state, a template of it, preallocated copies, checkpointers."""

    def __init__(self, rank: int, world: int, nbytes: int, scratch: str) -> None:
        import sharded_state

        self.rank, self.world, self.scratch = rank, world, scratch
        built = sharded_state.build(world, nbytes)
        self.state = built["state"]
        self.info = {k: v for k, v in built.items() if k != "state"}
        self.template = sharded_state.template_of(self.state)
        self.src = sharded_state.local_tensors(self.state)
        self.dst = sharded_state.local_tensors(self.template)
        self.info["state_bytes"] = sharded_state.state_bytes(self.state)
        self.info["local_bytes"] = sum(t.numel() * t.element_size() for t in self.src)
        self.ckpts: dict[str, Any] = {}

    def prepare(self, method: str) -> None:
        """Make ``method``'s checkpointer (if it has one) and warm it up with one untimed save."""
        import torch.distributed as dist

        if method in ("tc_save", "tc_async") and method not in self.ckpts:
            import methods

            import torchckpt as tc

            make = tc.make_async_checkpointer if method == "tc_async" else tc.make_sync_checkpointer
            self.ckpts[method] = make(methods.tc_config("native"))
        path = os.path.join(self.scratch, f"warmup-{self.world}-{method}")
        self.run(method, path, False)
        dist.barrier()
        if self.rank == 0:
            remove(path)

    def run(self, op: str, path: str, verify: bool) -> dict[str, Any]:
        """Run ``op`` after a barrier of every rank; returns this rank's figures."""
        import torch.distributed as dist

        if op.endswith("_load"):
            for t in self.dst:
                t.zero_()
        malloc_trim()
        dist.barrier()
        t0 = time.perf_counter()
        stall = self._op(op, path, t0)
        elapsed = time.perf_counter() - t0
        out: dict[str, Any] = {"time_s": elapsed, "stall_s": elapsed if stall is None else stall}
        if verify and op.endswith("_load"):
            out["ok"] = all(torch.equal(a, b) for a, b in zip(self.dst, self.src))
        return out

    def _op(self, op: str, path: str, t0: float) -> float | None:
        """The operation itself; returns the stall of an async save (None: the whole call)."""
        import torch.distributed.checkpoint as dcp

        if op == "copy":
            with torch.no_grad():
                for d, s in zip(self.dst, self.src):
                    d.copy_(s)
        elif op == "write":
            _raw_write(os.path.join(path, f"rank{self.rank}.bin"), self.src)
        elif op == "tc_save":
            self.ckpts["tc_save"].save(path, self.state)
        elif op == "tc_async":
            stage, write = self.ckpts["tc_async"].save(path, self.state)
            stage.result()
            stall = time.perf_counter() - t0
            write.result()
            return stall
        elif op == "dcp_save":
            dcp.save(self.state, checkpoint_id=path)
        elif op == "dcp_async":
            return _dcp_async(self.state, path, t0)
        elif op == "tc_load":
            if "tc_save" not in self.ckpts:
                self.ckpts["tc_save"] = _sync_checkpointer()
            self.ckpts["tc_save"].load(path, self.template)
        elif op == "dcp_load":
            dcp.load(self.template, checkpoint_id=path)
        else:
            raise ValueError(f"unknown operation {op!r}")
        return None

    def close(self) -> None:
        for ck in self.ckpts.values():
            ck.close()


def _sync_checkpointer() -> Any:
    import methods

    import torchckpt as tc

    return tc.make_sync_checkpointer(methods.tc_config("native"))


def _raw_write(path: str, tensors: list[torch.Tensor]) -> None:
    """Plain buffered writes of every tensor's bytes into one file, then fsync (``methods.raw_write``)."""
    from harness import byte_view
    from methods import raw_write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw_write(path, [byte_view(t.contiguous()) for t in tensors if t.numel()])


def _dcp_async(state: Any, path: str, t0: float) -> float:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    result = dcp.async_save(state, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.THREAD)
    staging = getattr(result, "staging_completion", None)
    if staging is not None:
        staging.result()
    stall = time.perf_counter() - t0
    getattr(result, "upload_completion", result).result(timeout=GROUP_TIMEOUT_S)
    return stall


def worker(rank: int, world: int, port: int, nbytes: int, scratch: str, conn: Any) -> None:
    """The rank process: join the group, build the state, answer commands until ``quit``."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S)
        )
        t0 = time.perf_counter()
        me = _Rank(rank, world, nbytes, scratch)
        conn.send(("ready", {**me.info, "build_s": time.perf_counter() - t0}))
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "prepare":
                me.prepare(cmd[1])
                conn.send(("prepared", {}))
            else:
                conn.send(("done", me.run(cmd[1], cmd[2], cmd[3])))
        me.close()
        dist.destroy_process_group()
        conn.send(("closed", {}))
    except BaseException:  # noqa: BLE001 - report anything to the parent, then exit
        conn.send(("error", traceback.format_exc()))
