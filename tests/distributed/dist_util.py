"""Launch N gloo ranks on 127.0.0.1 and collect what each rank reports.

Each rank runs ``fn(rank, world_size, *args)`` (a module-level function, so
that spawn can pickle it) in a fresh ``spawn`` process, with a gloo process
group initialised over a TCP store on a free port of 127.0.0.1 (or a file
store, or none). What ``fn`` returns is pickled into a result file; an
exception is recorded with its traceback. The parent waits under a deadline,
kills whatever is left, and raises one ``AssertionError`` that shows every
failed rank's traceback.

Ranks named in ``may_die`` may die (SIGKILL) or stop (SIGSTOP) on purpose:
their death is not a failure, and once every other rank has exited they are
killed (a stopped process dies of SIGKILL too).
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

# Spawned ranks import ckpt_testutil, whose complex32 probe warns; the tests use it on purpose.
warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

#: Longest a whole launch may take (startup of N processes on 2 cores included).
DEFAULT_DEADLINE_S = 120.0


def tree_bytes(path: str) -> dict[str, bytes]:
    """Every file of a checkpoint directory, by name: to assert it is byte-identical later."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class RankOutcome:
    """What one rank did.

    Attributes:
        rank: The rank.
        exitcode: The process's exit code (negative: killed by that signal; None: still ran at the deadline).
        ok: ``fn`` returned (its value is ``value``).
        value: What ``fn`` returned.
        error: The formatted traceback of what ``fn`` raised, when it raised.
    """

    rank: int
    exitcode: int | None
    ok: bool
    value: Any = None
    error: str | None = None


def _result_file(result_dir: str, rank: int) -> str:
    return os.path.join(result_dir, f"rank{rank}.pkl")


def _write_result(result_dir: str, rank: int, record: tuple[Any, ...]) -> None:
    final = _result_file(result_dir, rank)
    tmp = final + ".tmp"
    try:
        data = pickle.dumps(record)
    except Exception:  # noqa: BLE001 - an unpicklable return value is a test bug: report it
        data = pickle.dumps(("err", "result not picklable:\n" + traceback.format_exc()))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)


def _child(
    rank: int,
    world_size: int,
    init: str | None,
    port: int,
    result_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    hard_exit: bool,
) -> None:
    """Body of one rank's process (module level: spawn pickles it by name)."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher asks a hung rank for its stacks
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    record: tuple[Any, ...]
    try:
        if init is not None:
            init_method = "env://" if init == "tcp" else f"file://{os.path.join(result_dir, 'pg_store')}"
            dist.init_process_group(
                "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=60),
            )
        value = fn(rank, world_size, *args)
        record = ("ok", value)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        record = ("err", traceback.format_exc())
    _write_result(result_dir, rank, record)
    if hard_exit:
        # Peers may be dead or stopped: a collective teardown could hang. Writer
        # subprocesses notice that their parent is gone and exit by themselves.
        os._exit(0 if record[0] == "ok" else 1)
    if init is not None and dist.is_initialized():
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init: str | None = "tcp",
    may_die: Iterable[int] = (),
    deadline_s: float = DEFAULT_DEADLINE_S,
    exit_grace_s: float = 30.0,
) -> dict[int, RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Args:
        fn: A module-level function.
        world_size: Number of ranks.
        *args: Picklable arguments after ``rank, world_size``.
        init: ``"tcp"`` (env:// on 127.0.0.1 and a free port), ``"file"`` (a
            file store: no TCPStore in the job) or None (no process group).
        may_die: Ranks that are expected to die or stop; they need not report.
        deadline_s: Longest wait for the ranks to report.
        exit_grace_s: Longest wait for ranks to exit once every rank reported.

    Returns:
        Each rank's outcome (``ok`` ranks and, for ``may_die`` ranks, whatever happened).

    Raises:
        AssertionError: A rank not in ``may_die`` raised, died, or did not
            report or exit in time (the message holds every rank's traceback).
    """
    may_die = set(may_die)
    result_dir = tempfile.mkdtemp(prefix="torchckpt-dist-")
    ctx = mp.get_context("spawn")
    port = free_port()
    hard_exit = bool(may_die)
    procs = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_child,
            args=(rank, world_size, init, port, result_dir, fn, args, hard_exit),
            name=f"rank{rank}",
            daemon=False,  # ranks start writer subprocesses of their own
        )
        p.start()
        procs.append(p)

    def reported(rank: int) -> bool:
        return os.path.exists(_result_file(result_dir, rank))

    start = time.monotonic()
    deadline = start + deadline_s
    exit_deadline: float | None = None
    try:
        while True:
            now = time.monotonic()
            survivors_done = all(not procs[r].is_alive() for r in range(world_size) if r not in may_die)
            if survivors_done:
                break
            all_reported = all(reported(r) for r in range(world_size) if r not in may_die)
            if all_reported and exit_deadline is None:
                exit_deadline = now + exit_grace_s
            if now >= deadline or (exit_deadline is not None and now >= exit_deadline):
                break
            time.sleep(0.05)
    finally:
        late = [p.name for r, p in enumerate(procs) if p.is_alive() and r not in may_die]
        for r, p in enumerate(procs):
            if p.is_alive() and r not in may_die and not reported(r):
                os.kill(p.pid, signal.SIGUSR1)  # its Python stacks go to stderr, then it is killed
        if late:
            time.sleep(1)
        for p in procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.join(timeout=10)

    outcomes: dict[int, RankOutcome] = {}
    problems: list[str] = []
    for rank, p in enumerate(procs):
        file = _result_file(result_dir, rank)
        if os.path.exists(file):
            with open(file, "rb") as f:
                status, payload = pickle.load(f)
            outcome = RankOutcome(
                rank,
                p.exitcode,
                status == "ok",
                payload if status == "ok" else None,
                None if status == "ok" else payload,
            )
        else:
            outcome = RankOutcome(rank, p.exitcode, False)
        outcomes[rank] = outcome
        if rank in may_die:
            continue
        if outcome.error is not None:
            problems.append(f"--- rank {rank} raised (exit code {p.exitcode}):\n{outcome.error}")
        elif not outcome.ok:
            problems.append(
                f"--- rank {rank} reported nothing (exit code {p.exitcode}; "
                f"{'still running at the deadline, killed' if p.name in late else 'died'})"
            )
        elif p.name in late:
            problems.append(f"--- rank {rank} reported but did not exit within {exit_grace_s:g}s (killed)")
    shutil.rmtree(result_dir, ignore_errors=True)
    elapsed = time.monotonic() - start
    if problems:
        raise AssertionError(
            f"{len(problems)} of {world_size} ranks failed ({fn.__module__}.{fn.__name__}, {elapsed:.1f}s):\n"
            + "\n".join(problems)
        )
    return outcomes


def values(outcomes: dict[int, RankOutcome]) -> dict[int, Any]:
    """``{rank: returned value}`` of the ranks that returned."""
    return {r: o.value for r, o in outcomes.items() if o.ok}


def error_summary(e: BaseException, started: float | None = None) -> dict[str, Any]:
    """A picklable description of an error a rank caught, for the parent to check."""
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "failures": dict(getattr(e, "failures", {}) or {}),
        "missing_ranks": list(getattr(e, "missing_ranks", []) or []),
        "elapsed": None if started is None else time.monotonic() - started,
        "traceback": "".join(traceback.format_exception(e)),
    }


def tcp_listeners(port: int) -> list[str]:
    """The local addresses listening on TCP ``port``, from /proc/net/tcp and tcp6, in dotted/colon form."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


# -- barriers of several ranks in one process (threads) ----------------------------------------


def in_threads(fns: list[Callable[[], Any]], timeout_s: float = 30) -> list[Any]:
    """Run each function in its own thread; return results in order; re-raise the first error."""
    import threading

    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a barrier thread hung"
    for e in errors:
        if e is not None:
            raise e
    return results


def tcp_barriers(
    world: int, prefix: str, timeout_s: float, port: int | None = None, host: str = "127.0.0.1", libuv: bool = True
) -> list[Any]:
    """``world`` TCPStoreBarriers (rank 0 hosts the store on ``host``, libuv or not), built concurrently."""
    from torchckpt.barriers import TCPStoreBarrier

    port = port or free_port()

    def make(rank: int) -> Callable[[], Any]:
        return lambda: TCPStoreBarrier(
            global_rank=rank,
            global_world_size=world,
            barrier_prefix=prefix,
            timeout_barrier_init_secs=20,
            use_checkpoint_barrier_tcpstore_libuv=libuv,
            tcpstore_port=port,
            master_address=host,
            timeout_secs=timeout_s,
        )

    return in_threads([make(r) for r in range(world)])


def store_barriers(world: int, timeout_s: float, host: str = "127.0.0.1") -> tuple[Any, list[Any]]:
    """A store started by torchckpt on ``host`` and ``world`` StoreBarriers joined to it."""
    from torchckpt.barriers import StoreBarrier
    from torchckpt.stores import start_store

    server = start_store(host, world)

    def make(rank: int) -> Callable[[], Any]:
        return lambda: StoreBarrier(
            global_rank=rank, global_world_size=world, master_address=host, port=server.port, timeout_secs=timeout_s
        )

    return server, in_threads([make(r) for r in range(world)])


def store_count(store: Any, key: str) -> int:
    """The value of a counter key, without changing it (0 when absent)."""
    return int(store.add(key, 0))


def rank_entries(path: str) -> list[Any]:
    """Every rank's whole entry of the committed checkpoint at ``path`` (index objects read and checked)."""
    from torchckpt.reading import open_checkpoint

    with open_checkpoint(path) as snapshot:
        return [snapshot.rank_entry(r) for r in range(snapshot.manifest().world_size)]
