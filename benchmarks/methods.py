"""The methods measured by ``run.py``: physical limits, peers, torchckpt.

Each :class:`Block` is one method (or one family: a save and the loads of
what it saved). ``run.py`` runs every block once per repetition, in an order
rotated from one repetition to the next. A block's ``setup`` makes what lasts
across repetitions (a checkpointer, its writer process, its staging memory)
and does one untimed warm-up (imports, thread pools; for an async method its
first save, which spawns the writer and allocates staging): what is reported
is the second and later saves. ``run`` measures one repetition.

Every save goes to a fresh path, removed after the block outside the timed
region. Before a timed save the page cache is flushed (``os.sync``) and as
much fresh memory as it needs is touched (see ``harness.prefault``).
"""

from __future__ import annotations

import gc
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import Bench, byte_view, figures, fsync_tree, malloc_trim, remove, sync_file_range_fn
from workload import state_equal, tensor_bytes, tensors

import torchckpt as tc

GIB = 2**30
_SFR = sync_file_range_fn()
#: copy_ samples per repetition.
COPY_SAMPLES = 3
#: Measured saves per repetition of an async method (after its warm-up); run.py's --async-saves sets it.
ASYNC_SAVES = 2


class Ctx:
    """What every block works on: the state, a preallocated same-shaped state, their byte views."""

    def __init__(self, sd: Any, dst: Any, small: Any) -> None:
        self.sd = sd
        self.dst = dst
        self.small = small  # a small state of the same shape for untimed warm-ups
        self.nbytes = tensor_bytes(sd)
        self.src_ts = tensors(sd)
        self.dst_ts = tensors(dst)
        self.src_views = [byte_view(t) for t in self.src_ts]
        self.dst_views = [byte_view(t) for t in self.dst_ts]

    def zero_dst(self) -> None:
        for t in self.dst_ts:
            t.zero_()

    def copy_into_dst(self, loaded: Any) -> None:
        with torch.no_grad():
            for d, s in zip(self.dst_ts, tensors(loaded)):
                d.copy_(s)


def resident_main(b: Bench) -> int | None:
    """This process's RssAnon + RssShmem now, after free heap memory went back to the system."""
    if b.probe is None:
        return None
    gc.collect()
    malloc_trim()
    return int(b.probe.snap()["main"])


def note_held(b: Bench, row: Any, before: int | None) -> None:
    """Record the memory an async method keeps after its first save (staging): main RSS now minus before setup."""
    after = resident_main(b)
    if after is not None and before is not None:
        row.extra["held"] = after - before


class Block:
    """One method: ``setup`` once (or per repetition when memory is short), ``run`` per repetition."""

    key = ""
    label = ""
    group = "peer"
    #: Module that must import for the block to run (a peer that is not installed is skipped).
    needs: str | None = None
    #: Memory the block holds between repetitions, in state sizes (decides keep-alive vs per-rep setup).
    held_states = 0.0

    def available(self) -> str | None:
        """None, or why the block cannot run here."""
        if self.needs is None:
            return None
        try:
            __import__(self.needs)
        except Exception as e:  # noqa: BLE001 - any import failure means: skip, and say why
            return f"{self.needs} is not importable ({type(e).__name__}: {e})"
        return None

    def setup(self, b: Bench, ctx: Ctx) -> None: ...

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        raise NotImplementedError

    def teardown(self) -> None: ...


# --------------------------------------------------------------------------- limits


def raw_write(path: str, views: list[memoryview]) -> None:
    """Plain buffered writes of every tensor's bytes into one file, then fsync."""
    with open(path, "wb") as f:
        f.writelines(views)
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: str, views: list[memoryview]) -> None:
    """``readinto`` every tensor's bytes from one file (unbuffered)."""
    with open(path, "rb", buffering=0) as f:
        for v in views:
            got = 0
            while got < v.nbytes:
                n = f.readinto(v[got:])
                if not n:
                    raise EOFError(path)
                got += n


def raw_pwrite_sfr(path: str, views: list[memoryview], chunk: int = 16 * 2**20) -> None:
    """16 MiB ``pwritev`` batches, ``sync_file_range(WRITE)`` after each, then fsync (one thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        batch: list[memoryview] = []
        size = 0

        def flush() -> None:
            nonlocal pos, batch, size
            done = 0
            while done < size:
                bufs, skip = [], done
                for v in batch:
                    if skip >= v.nbytes:
                        skip -= v.nbytes
                    else:
                        bufs.append(v[skip:])
                        skip = 0
                done += os.pwritev(fd, bufs, pos + done)
            if _SFR is not None:
                _SFR(fd, pos, size)
            pos += size
            batch, size = [], 0

        for v in views:
            off = 0
            while off < v.nbytes:
                take = min(v.nbytes - off, chunk - size)
                batch.append(v[off : off + take])
                size += take
                off += take
                if size >= chunk or len(batch) >= 1024:
                    flush()
        if batch:
            flush()
        os.fsync(fd)
    finally:
        os.close(fd)


class Limits(Block):
    key = "limits"
    label = "physical limits"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        n = ctx.nbytes
        self.copy = b.row("copy", "copy_ into preallocated tensors (memory limit)", "limit", "copy", n)
        self.write = b.row("write", "plain write + fsync (disk limit)", "limit", "save", n)
        self.read_warm = b.row("read_warm", "plain readinto preallocated, warm", "limit", "load", n)
        self.read_cold = b.row("read_cold", "plain readinto preallocated, cold", "limit", "load", n)
        self.sfr = b.row(
            "write_sfr", "pwritev 16 MiB + sync_file_range + fsync (faster disk path)", "limit", "save", n,
            notes="context only: one thread, writeback started after every 16 MiB",
        )  # fmt: skip

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        def copy() -> None:
            with torch.no_grad():
                for d, s in zip(ctx.dst_ts, ctx.src_ts):
                    d.copy_(s)

        for _ in range(COPY_SAMPLES):  # cheap, and the floor every stall is compared with: steadier with more
            # Under the same hygiene as the async saves it is the floor of (page cache flushed, fresh memory
            # touched and freed first): what those steps leave the kernel doing then weighs on both alike.
            b.measure(self.copy, copy, before=b.sync, fresh_bytes=ctx.nbytes)
        f = b.path("plain.bin")
        b.measure(self.write, lambda: raw_write(f, ctx.src_views), before=b.sync, fresh_bytes=ctx.nbytes)
        for row, before, fresh in ((self.read_warm, None, 0), (self.read_cold, b.drop, ctx.nbytes)):
            ctx.zero_dst()
            b.measure(row, lambda: raw_read(f, ctx.dst_views), before=before, fresh_bytes=fresh)
            if verify:
                b.check(row.key, state_equal(ctx.dst, ctx.sd))
        remove(f)
        f2 = b.path("plain_sfr.bin")
        b.measure(self.sfr, lambda: raw_pwrite_sfr(f2, ctx.src_views), before=b.sync, fresh_bytes=ctx.nbytes)
        remove(f2)


# --------------------------------------------------------------------------- torch.save / torch.load


def torch_save_durable(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class TorchSave(Block):
    key = "torch_save"
    label = "torch.save / torch.load"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        n = ctx.nbytes
        self.save = b.row("torch_save", "torch.save + fsync", "peer", "save", n)
        self.load_warm = b.row("torch_load_warm", "torch.load, fresh, warm", "peer", "load", n)
        self.load_cold = b.row("torch_load_cold", "torch.load, fresh, cold", "peer", "load", n)
        self.mmap_warm = b.row("torch_load_mmap_warm", "torch.load(mmap=True) + copy_ into preallocated, warm",
                               "peer", "load", n)  # fmt: skip
        self.mmap_cold = b.row("torch_load_mmap_cold", "torch.load(mmap=True) + copy_ into preallocated, cold",
                               "peer", "load", n)  # fmt: skip
        self.touch_warm = b.row("torch_load_mmap_touch_warm", "torch.load(mmap=True) + touch every page, warm",
                                "peer", "load", n)  # fmt: skip
        self.touch_cold = b.row("torch_load_mmap_touch_cold", "torch.load(mmap=True) + touch every page, cold",
                                "peer", "load", n)  # fmt: skip
        f = os.path.join(b.scratch, "warmup.pt")
        torch_save_durable(ctx.small, f)
        torch.load(f, weights_only=True)
        remove(f)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        n = ctx.nbytes
        f = b.path("torch_save.pt")
        b.measure(self.save, lambda: torch_save_durable(ctx.sd, f), before=b.sync, fresh_bytes=n)
        for row, before, fresh in ((self.load_warm, None, n), (self.load_cold, b.drop, 2 * n)):
            out = b.measure(row, lambda: torch.load(f, weights_only=True), before=before, fresh_bytes=fresh)
            if verify:
                b.check(row.key, state_equal(out, ctx.sd))
            del out
        for row, before, fresh in ((self.mmap_warm, None, 0), (self.mmap_cold, b.drop, n)):
            ctx.zero_dst()
            b.measure(row, lambda: ctx.copy_into_dst(torch.load(f, weights_only=True, mmap=True)), before=before,
                      fresh_bytes=fresh)  # fmt: skip
            if verify:
                b.check(row.key, state_equal(ctx.dst, ctx.sd))
        for row, before in ((self.touch_warm, None), (self.touch_cold, b.drop)):
            out = b.measure(row, lambda: touch_pages(torch.load(f, weights_only=True, mmap=True)), before=before)
            if verify:
                b.check(row.key, state_equal(out, ctx.sd))
            del out
        remove(f)


def touch_pages(sd: Any) -> Any:
    """Read one byte of every page of every tensor of ``sd`` (a mapped load's bytes all read once); return ``sd``."""
    for t in tensors(sd):
        if t.numel():
            t.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()
    return sd


# --------------------------------------------------------------------------- safetensors (tensors only)


def flat_tensors(sd: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensor leaves of ``sd`` by dotted key path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(sd, torch.Tensor):
        out[prefix] = sd
    elif isinstance(sd, dict):
        for k, v in sd.items():
            out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            out.update(flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


class Safetensors(Block):
    key = "safetensors"
    label = "safetensors save_file / load_file (tensors only)"
    needs = "safetensors"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        from safetensors.torch import load_file, save_file

        self.save_file, self.load_file = save_file, load_file
        n = ctx.nbytes
        self.src = flat_tensors(ctx.sd)
        self.dst = flat_tensors(ctx.dst)
        self.save = b.row("st_save", "safetensors save_file + fsync (tensors only)", "peer", "save", n)
        self.load_warm = b.row("st_load_warm", "safetensors load_file + copy_ into preallocated, warm", "peer",
                               "load", n)  # fmt: skip
        self.load_cold = b.row("st_load_cold", "safetensors load_file + copy_ into preallocated, cold", "peer",
                               "load", n)  # fmt: skip
        f = os.path.join(b.scratch, "warmup.safetensors")
        save_file(flat_tensors(ctx.small), f)
        load_file(f)
        remove(f)

    def _save(self, f: str) -> None:
        self.save_file(self.src, f)
        fsync_tree(f)

    def _load(self, f: str) -> None:
        loaded = self.load_file(f)
        with torch.no_grad():
            for k, d in self.dst.items():
                d.copy_(loaded[k])

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        f = b.path("st.safetensors")
        b.measure(self.save, lambda: self._save(f), before=b.sync, fresh_bytes=ctx.nbytes)
        for row, before, fresh in ((self.load_warm, None, 0), (self.load_cold, b.drop, ctx.nbytes)):
            ctx.zero_dst()
            b.measure(row, lambda: self._load(f), before=before, fresh_bytes=fresh)
            if verify:
                b.check(row.key, all(torch.equal(self.dst[k], v) for k, v in self.src.items()))
        remove(f)


# --------------------------------------------------------------------------- torch DCP


def ensure_process_group() -> None:
    """A one-rank gloo group on loopback (DCP's async_save needs one)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


class DcpSync(Block):
    key = "dcp"
    label = "torch DCP save / load"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        import torch.distributed.checkpoint as dcp

        ensure_process_group()
        self.dcp = dcp
        n = ctx.nbytes
        self.save = b.row("dcp_save", "torch DCP save (fsyncs)", "peer", "save", n)
        self.load_warm = b.row("dcp_load_warm", "torch DCP load into preallocated, warm", "peer", "load", n)
        self.load_cold = b.row("dcp_load_cold", "torch DCP load into preallocated, cold", "peer", "load", n)
        p = os.path.join(b.scratch, "warmup-dcp")
        dcp.save(ctx.small, checkpoint_id=p)
        remove(p)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        p = b.path("dcp")
        b.measure(self.save, lambda: self.dcp.save(ctx.sd, checkpoint_id=p), before=b.sync, fresh_bytes=ctx.nbytes)
        for row, before, fresh in ((self.load_warm, None, 0), (self.load_cold, b.drop, ctx.nbytes)):
            ctx.zero_dst()
            b.measure(row, lambda: self.dcp.load(ctx.dst, checkpoint_id=p), before=before, fresh_bytes=fresh)
            if verify:
                b.check(row.key, state_equal(ctx.dst, ctx.sd))
        remove(p)


class DcpAsync(Block):
    held_states = 0.0

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.key = f"dcp_async_{kind}"
        self.label = f"torch DCP async_save ({kind})"
        # The process executor's writer keeps a staging copy; the thread executor frees its copy after a save.
        self.held_states = 1.5 if kind == "process" else 0.0

    def setup(self, b: Bench, ctx: Ctx) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        ensure_process_group()
        self.dcp = dcp
        self.type = AsyncCheckpointerType.PROCESS if self.kind == "process" else AsyncCheckpointerType.THREAD
        self.row = b.row(self.key, f"torch DCP async_save, {self.kind} executor", "peer", "save", ctx.nbytes,
                         notes="stall: until async_save returns (and its staging future, if any, is done)")  # fmt: skip
        before = resident_main(b)
        p = os.path.join(b.scratch, f"warmup-{self.key}")
        b.measure(self.row, lambda: self._save(ctx.sd, p), before=b.sync, fresh_bytes=2 * ctx.nbytes, record=False)
        remove(p)
        note_held(b, self.row, before)

    def _save(self, sd: Any, path: str) -> tuple[None, dict[str, Any]]:
        t0 = time.perf_counter()
        result = self.dcp.async_save(sd, checkpoint_id=path, async_checkpointer_type=self.type)
        staging = getattr(result, "staging_completion", None)
        if staging is not None:
            staging.result()
        stall = time.perf_counter() - t0
        getattr(result, "upload_completion", result).result()
        return None, figures(stall_s=stall)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        for i in range(ASYNC_SAVES):
            p = b.path(f"{self.key}-{i}")
            b.measure(self.row, lambda p=p: self._save(ctx.sd, p), before=b.sync, fresh_bytes=2 * ctx.nbytes)
            remove(p)

    def teardown(self) -> None:
        if self.kind == "process":
            # DCP keeps one writer process per program (a module global); end it so that its memory goes too.
            from torch.distributed.checkpoint import _async_process_executor as ape

            process, ape._CHECKPOINT_PROCESS = ape._CHECKPOINT_PROCESS, None
            del process  # its __del__ asks the process to exit, then terminates it


# --------------------------------------------------------------------------- the reference _experimental module


def _reference_config(asynchronous: bool) -> Any:
    from torch.distributed.checkpoint import _experimental as ref

    config = ref.CheckpointerConfig()
    if asynchronous:
        # CPU configuration: no pinned memory, no non-blocking copies (no accelerator); shared memory on.
        config.staging_config = ref.CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
    return config


class ReferenceSync(Block):
    key = "reference"
    label = "reference _experimental sync save / load"
    needs = "torch.distributed.checkpoint._experimental"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        from torch.distributed.checkpoint import _experimental as ref

        ensure_process_group()
        self.ck = ref.make_sync_checkpointer(_reference_config(False))
        n = ctx.nbytes
        note = "its writer does not fsync: an fsync of its files is added and timed"
        self.save = b.row("ref_save", "reference _experimental sync save + added fsync", "peer", "save", n, notes=note)
        self.load_warm = b.row("ref_load_warm", "reference _experimental load into preallocated, warm", "peer",
                               "load", n)  # fmt: skip
        self.load_cold = b.row("ref_load_cold", "reference _experimental load into preallocated, cold", "peer",
                               "load", n)  # fmt: skip
        p = os.path.join(b.scratch, "warmup-ref")
        self.ck.save(p, ctx.small)
        self.ck.load(p)
        remove(p)

    def _save(self, sd: Any, p: str) -> None:
        self.ck.save(p, sd)
        fsync_tree(p)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        p = b.path("ref")
        b.measure(self.save, lambda: self._save(ctx.sd, p), before=b.sync, fresh_bytes=ctx.nbytes)
        for row, before, fresh in ((self.load_warm, None, 0), (self.load_cold, b.drop, ctx.nbytes)):
            ctx.zero_dst()
            b.measure(row, lambda: self.ck.load(p, ctx.dst), before=before, fresh_bytes=fresh)
            if verify:
                b.check(row.key, state_equal(ctx.dst, ctx.sd))
        remove(p)

    def teardown(self) -> None:
        self.ck.close()


class _AsyncCheckpointerBlock(Block):
    """A checkpointer whose ``save(path, x)`` returns ``(stage_future, write_future)``."""

    held_states = 1.0
    fsync_added = False
    note = ""

    def make(self) -> Any:
        raise NotImplementedError

    def wrap(self, sd: Any) -> Any:
        return sd

    def setup(self, b: Bench, ctx: Ctx) -> None:
        self.row = b.row(self.key, self.label, self.group, "save", ctx.nbytes, notes=self.note)
        before = resident_main(b)
        self.ck = self.make()
        self.payload = self.wrap(ctx.sd)
        p = os.path.join(b.scratch, f"warmup-{self.key}")
        # The first save spawns the writer and allocates staging: timed as a warm-up, not reported.
        b.measure(self.row, lambda: self._save(p), before=b.sync, fresh_bytes=2 * ctx.nbytes, record=False)
        remove(p)
        note_held(b, self.row, before)

    def _save(self, p: str) -> tuple[None, dict[str, Any]]:
        t0 = time.perf_counter()
        stage, write = self.ck.save(p, self.payload)
        stage.result()
        stall = time.perf_counter() - t0
        write.result()
        if self.fsync_added:
            fsync_tree(p)
        return None, figures(stall_s=stall)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        for i in range(ASYNC_SAVES):
            p = b.path(f"{self.key}-{i}")
            b.measure(self.row, lambda p=p: self._save(p), before=b.sync, fresh_bytes=ctx.nbytes)
            remove(p)

    def teardown(self) -> None:
        self.ck.close()


class ReferenceAsync(_AsyncCheckpointerBlock):
    key = "reference_async"
    label = "reference _experimental async (CPU config) + added fsync"
    group = "peer"
    needs = "torch.distributed.checkpoint._experimental"
    fsync_added = True
    note = "stager: no pinned memory, no non-blocking copy; its writer does not fsync: an fsync is added"

    def make(self) -> Any:
        from torch.distributed.checkpoint import _experimental as ref

        ensure_process_group()
        return ref.make_async_checkpointer(_reference_config(True))


# --------------------------------------------------------------------------- torch_checkpointing


def _tcp_checkpoint(sd: Any) -> Any:
    from torch_checkpointing.checkpoint_base import CheckpointBase, CheckpointItem

    class _State(CheckpointBase):
        def get_items(self) -> dict[str, Any]:
            return {k: CheckpointItem(value=v) for k, v in sd.items()}

        def load_state_dict(self, state_dict: Any) -> None:
            raise NotImplementedError

    return _State()


def _tcp_storage() -> Any:
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    # O_DIRECT writes of unaligned buffers fail with EINVAL on this ext4: buffered I/O.
    return LocalFileSystemStorageConfig(use_direct_io=False)


_TCP_NOTE = "CPU config, LocalFileSystemStorageConfig(use_direct_io=False); it never fsyncs: an fsync is added"


class TcpSync(Block):
    key = "torch_checkpointing"
    label = "torch_checkpointing sync save"
    needs = "torch_checkpointing"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        from torch_checkpointing import make_sync_checkpoint_saver

        ensure_process_group()
        self.saver = make_sync_checkpoint_saver(storage_config=_tcp_storage())
        self.row = b.row("tcp_save", "torch_checkpointing sync save + added fsync", "peer", "save", ctx.nbytes,
                         notes=_TCP_NOTE)  # fmt: skip
        self.payload = _tcp_checkpoint(ctx.sd)
        p = os.path.join(b.scratch, "warmup-tcp")
        self.saver.save(p, _tcp_checkpoint(ctx.small))
        remove(p)

    def _save(self, p: str) -> None:
        self.saver.save(p, self.payload)
        fsync_tree(p)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        p = b.path("tcp")
        b.measure(self.row, lambda: self._save(p), before=b.sync, fresh_bytes=ctx.nbytes)
        remove(p)

    def teardown(self) -> None:
        self.saver.close()


class TcpAsync(_AsyncCheckpointerBlock):
    key = "torch_checkpointing_async"
    label = "torch_checkpointing async + added fsync"
    group = "peer"
    needs = "torch_checkpointing"
    fsync_added = True
    note = _TCP_NOTE + "; stager: no pinned memory, no non-blocking copy"

    def make(self) -> Any:
        from torch_checkpointing import AsyncCheckpointSaverConfig, CheckpointStagerConfig, make_async_checkpoint_saver

        ensure_process_group()
        config = AsyncCheckpointSaverConfig(
            staging_config=CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
        )
        return make_async_checkpoint_saver(config=config, storage_config=_tcp_storage())

    def wrap(self, sd: Any) -> Any:
        return _tcp_checkpoint(sd)


# --------------------------------------------------------------------------- torchckpt


FORMATS = {"native": "safetensors", "torch_save": "torch_save"}


def tc_config(fmt: str) -> tc.CheckpointerConfig:
    return tc.CheckpointerConfig(
        writer_config=tc.CheckpointWriterConfig(format=FORMATS[fmt]),
        # A writer subprocess importing torch on a loaded machine can take longer than the default 30 s to start.
        process_config=tc.CheckpointProcessConfig(subprocess_init_timeout_secs=600),
    )


class TorchckptSync(Block):
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.key = f"tc_sync_{fmt}"
        self.label = f"torchckpt sync, {fmt} format"

    def setup(self, b: Bench, ctx: Ctx) -> None:
        self.ck = tc.make_sync_checkpointer(tc_config(self.fmt))
        n, f = ctx.nbytes, self.fmt
        self.save = b.row(f"tc_{f}_save", f"torchckpt sync save, {f}", "torchckpt", "save", n)
        self.loads = [
            (b.row(f"tc_{f}_load_inplace_warm", f"torchckpt load {f} into preallocated, warm", "torchckpt", "load", n),
             True, None, 0),
            (b.row(f"tc_{f}_load_inplace_cold", f"torchckpt load {f} into preallocated, cold", "torchckpt", "load", n),
             True, b.drop, n),
            (b.row(f"tc_{f}_load_fresh_warm", f"torchckpt load {f}, fresh, warm", "torchckpt", "load", n),
             False, None, n),
            (b.row(f"tc_{f}_load_fresh_cold", f"torchckpt load {f}, fresh, cold", "torchckpt", "load", n),
             False, b.drop, 2 * n),
        ]  # fmt: skip
        p = os.path.join(b.scratch, f"warmup-{self.key}")
        self.ck.save(p, ctx.small)
        self.ck.load(p)
        remove(p)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        p = b.path(self.key)
        b.measure(self.save, lambda: self.ck.save(p, ctx.sd), before=b.sync, fresh_bytes=ctx.nbytes)
        for row, inplace, before, fresh in self.loads:
            if inplace:
                ctx.zero_dst()
                b.measure(row, lambda: self.ck.load(p, ctx.dst), before=before, fresh_bytes=fresh)
                if verify:
                    b.check(row.key, state_equal(ctx.dst, ctx.sd))
            else:
                out = b.measure(row, lambda: self.ck.load(p), before=before, fresh_bytes=fresh)
                if verify:
                    b.check(row.key, state_equal(out, ctx.sd))
                del out
        remove(p)

    def teardown(self) -> None:
        self.ck.close()


class TorchckptAsync(_AsyncCheckpointerBlock):
    group = "torchckpt"

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.key = f"tc_async_{fmt}"
        self.label = f"torchckpt async, {fmt} format"

    def make(self) -> Any:
        return tc.make_async_checkpointer(tc_config(self.fmt))

    def setup(self, b: Bench, ctx: Ctx) -> None:
        super().setup(b, ctx)
        if self.fmt == "native":
            n = ctx.nbytes
            self.first = b.row(f"{self.key}_first", f"torchckpt async {self.fmt}, first save right after make",
                               "torchckpt", "save", n, notes="a fresh checkpointer each time: writer start, staging "
                               "allocation; stall and durable from the save call")  # fmt: skip
            self.first_warm = b.row(f"{self.key}_first_warm", f"torchckpt async {self.fmt}, first save after warmup(sd)",
                                    "torchckpt", "save", n, notes="a fresh checkpointer each time, warmup(sd) untimed; "
                                    "stall and durable from the save call")  # fmt: skip

    def _first_save(self, p: str, sd: Any, warmup: bool) -> tuple[None, dict[str, Any]]:
        """A fresh checkpointer's first save (after ``warmup(sd)`` or right after it is made): from the save call."""
        ck = self.make()
        try:
            if warmup:
                ck.warmup(sd)
            t0 = time.perf_counter()
            stage, write = ck.save(p, sd)
            stage.result()
            stall = time.perf_counter() - t0
            write.result()
            durable = time.perf_counter() - t0
        finally:
            ck.close()
        return None, figures(stall_s=stall, durable_s=durable)

    def run(self, b: Bench, ctx: Ctx, verify: bool) -> None:
        super().run(b, ctx, False)
        if self.fmt == "native":
            for row, warm in ((self.first, False), (self.first_warm, True)):
                p = b.path(row.key)
                # Fresh memory for the staging arena, and as much again for the writer's start.
                b.measure(row, lambda p=p, w=warm: self._first_save(p, ctx.sd, w), before=b.sync,
                          fresh_bytes=2 * ctx.nbytes)  # fmt: skip
                remove(p)
        if verify:
            # The checkpoint the async path wrote loads back bit-identically.
            p = b.path(self.key + "-check")
            self._save(p)
            with tc.make_sync_checkpointer() as ck:
                b.check(self.key, state_equal(ck.load(p), ctx.sd))
            remove(p)


class TorchckptAsyncPipelined(_AsyncCheckpointerBlock):
    """The native async save with ``pipelined_writes`` forced on (its default needs 4 CPUs; see pipeline.py)."""

    group = "torchckpt"
    key = "tc_async_native_pipelined"
    label = "torchckpt async, native format, pipelined writes"
    note = "CheckpointStagerConfig(pipelined_writes=True): the writer writes staged groups while staging goes on"

    def make(self) -> Any:
        config = tc_config("native")
        config.staging_config = tc.CheckpointStagerConfig(pipelined_writes=True)
        return tc.make_async_checkpointer(config)


def main_blocks() -> list[Block]:
    """Every block on the transformer-like state, in table order."""
    from ranks import TwoRanks

    return [
        Limits(),
        TorchSave(),
        Safetensors(),
        DcpSync(),
        DcpAsync("thread"),
        DcpAsync("process"),
        ReferenceSync(),
        ReferenceAsync(),
        TcpSync(),
        TcpAsync(),
        TorchckptSync("native"),
        TorchckptSync("torch_save"),
        TorchckptAsync("native"),
        TorchckptAsyncPipelined(),
        TorchckptAsync("torch_save"),
        TwoRanks(),
    ]


#: Blocks of the scaling sweep.
SWEEP_KEYS = ("limits", "torch_save", "dcp", "tc_sync_native", "tc_async_native")

Factory = Callable[[], Block]
