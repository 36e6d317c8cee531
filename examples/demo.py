"""torchckpt demo: train with background saves, survive a SIGKILL in the middle of a save, resume.

1. Trains a small model on the CPU with asynchronous saves through a
   CheckpointManager, and measures how long each save stalls training against
   torch.save (+ fsync) of the same state.
2. Runs the same training in a child process and kills it with SIGKILL right
   after a background save has started. Whether that save was committed
   depends on whether its write finished first: the demo says which. A step
   committed just before the kill can leave one step more than the retention
   policy keeps (the process died before retention ran); the next commit
   removes it.
3. Restarts it: it resumes from the newest committed step and finishes. The
   final weights must be bit-identical to those of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import torchckpt as tc

STEPS = 200
SAVE_EVERY = 20
KILL_AT = 100
KEEP_LAST = 3


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
        torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256),
    )  # fmt: skip
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    g = torch.Generator().manual_seed(step)  # the data depends on the step only: resumable
    x = torch.randn(32, 256, generator=g)
    loss = (model(x) - x.flip(1)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach().item()


def run(root: str, *, announce: bool = False) -> list[float]:
    """Train to STEPS, resuming from the newest committed step under root; return the save stalls."""
    torch.set_num_threads(1)
    model, opt = build()
    stalls = []
    with tc.CheckpointManager(root, keep=[tc.KeepLast(KEEP_LAST)], async_save=True) as mgr:
        start = 0
        if mgr.latest_step() is not None:
            start, _ = mgr.load({"model": model, "optim": opt})
            print(f"resumed from step {start}", flush=True)
        for step in range(start + 1, STEPS + 1):
            loss = train_step(model, opt, step)
            if step % SAVE_EVERY == 0:
                t0 = time.perf_counter()
                mgr.save(step, {"model": model, "optim": opt, "step": step}, metrics={"loss": loss})
                stalls.append(time.perf_counter() - t0)
                if announce:
                    print(f"saving step {step}", flush=True)
    return stalls


def torch_save_stall(root: str) -> float:
    model, opt = build()
    train_step(model, opt, 1)
    path = os.path.join(root, "torch_save.pt")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
    os.unlink(path)
    return statistics.median(times)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc; empty where it cannot tell)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait until none of ``pids`` runs any more (exited, or a zombie), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)


def committed_steps(root: str) -> list[int]:
    with tc.CheckpointManager(root, async_save=False) as mgr:
        return mgr.steps()


def kill_while_saving(cmd: list[str], root: str) -> None:
    """Run the training in a child, SIGKILL it right after it starts saving KILL_AT; say what was committed."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    writers: list[int] = []
    for line in child.stdout:
        if line.strip() == f"saving step {KILL_AT}":
            writers = descendants(child.pid)  # its background writer, which may still be writing
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    wait_gone(writers, 10.0)  # the writer notices its parent is gone; what it committed before that counts
    steps = committed_steps(root)
    if steps and steps[-1] >= KILL_AT:
        print(f"   killed (exit {child.returncode}); the background write of step {KILL_AT} finished first: "
              f"it was committed (the newest committed step is {steps[-1]})")  # fmt: skip
    else:
        print(f"   killed (exit {child.returncode}) before step {KILL_AT} was committed; "
              "its unfinished write is hidden and never listed")  # fmt: skip
    extra = f" (step {steps[0]} too: the process died before retention ran; the next commit removes it)"
    print(f"   committed steps: {steps}{extra if len(steps) > KEEP_LAST else ''}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help="where to put the checkpoints (default: a temporary directory)")
    args = parser.parse_args()
    if args.child:
        run(args.child, announce=True)
        return
    t_start = time.perf_counter()
    base = args.dir or tempfile.mkdtemp(prefix="torchckpt-demo-")
    ref_root, crash_root = os.path.join(base, "uninterrupted"), os.path.join(base, "crashed")

    print(f"1. training {STEPS} steps with a background save every {SAVE_EVERY} steps")
    stalls = run(ref_root)
    model, opt = build()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3  # weights + 2 moments
    ts = torch_save_stall(base)

    print(f"2. the same training in a child process, killed with SIGKILL right after it starts saving step {KILL_AT}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", crash_root]
    kill_while_saving(cmd, crash_root)
    print("3. restarting it")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    print("   " + out.stdout.splitlines()[0])
    kept = {name: committed_steps(root) for name, root in (("uninterrupted", ref_root), ("restarted", crash_root))}
    print(f"   committed steps at the end, KeepLast({KEEP_LAST}): {kept['restarted']} (uninterrupted run: "
          f"{kept['uninterrupted']})")  # fmt: skip

    ref_model, _ = build(1)
    crash_model, _ = build(2)
    with tc.CheckpointManager(ref_root, async_save=False) as a, tc.CheckpointManager(crash_root, async_save=False) as b:
        a.load({"model": ref_model}, step=STEPS)
        b.load({"model": crash_model}, step=STEPS)
    same = all(torch.equal(x, y) for x, y in zip(ref_model.state_dict().values(), crash_model.state_dict().values()))
    print(f"   final weights bit-identical to the uninterrupted run: {same}")

    med = statistics.median(stalls[1:]) if len(stalls) > 1 else stalls[0]
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| state saved (weights + AdamW moments) | {nbytes / 2**20:.1f} MiB |")
    print(f"| torchckpt async save: training stall, median of saves 2..{len(stalls)} | {med * 1e3:.1f} ms |")
    print(f"| torchckpt async save: first save (allocates staging memory) | {stalls[0] * 1e3:.1f} ms |")
    print(f"| torch.save + fsync of the same state (stall) | {ts * 1e3:.1f} ms |")
    print(f"| stall ratio torchckpt / torch.save | {med / ts:.2f} |")
    print(f"| checkpoints | {ref_root}, {crash_root} |")
    print(f"| demo time | {time.perf_counter() - t_start:.1f} s |")
    if not same:
        raise SystemExit("the resumed run diverged")
    last = list(range(STEPS - SAVE_EVERY * (KEEP_LAST - 1), STEPS + 1, SAVE_EVERY))
    if any(steps != last for steps in kept.values()):
        raise SystemExit(f"retention kept {kept}, not the last {KEEP_LAST} steps {last}")


if __name__ == "__main__":
    main()
