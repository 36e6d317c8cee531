"""Demo: save and restore a model's and optimizer's training state with torchckpt.

Trains a small model for a few steps, saves model + optimizer state in both
layouts, restores them into fresh objects, checks that training continues
bit-identically, and compares the save time with torch.save of the same state.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

import torchckpt as tc


def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.LayerNorm(2048), torch.nn.Linear(2048, 512)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 512, generator=g)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.set_num_threads(1)
    model, opt = make(0)
    train(model, opt, 5, seed=1)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 5}
    nbytes = sum(t.numel() * t.element_size() for sd in (state["model"],) for t in sd.values())
    nbytes += sum(t.numel() * t.element_size() for s in state["optim"]["state"].values() for t in s.values())
    root = tempfile.mkdtemp(prefix="torchckpt-demo-")
    print(f"state: {nbytes / 2**20:.1f} MiB of tensors; checkpoints under {root}")
    rows = []
    t0 = time.perf_counter()
    with open(os.path.join(root, "torch_save.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    rows.append(("torch.save + fsync", time.perf_counter() - t0))
    for fmt in ("safetensors", "torch_save"):
        config = tc.CheckpointerConfig(writer_config=tc.CheckpointWriterConfig(format=fmt))
        ckpt = tc.make_sync_checkpointer(config)
        path = os.path.join(root, f"step5-{fmt}")
        t0 = time.perf_counter()
        ckpt.save(path, state, metadata={"step": 5})
        rows.append((f"torchckpt save ({fmt})", time.perf_counter() - t0))
        fresh_model, fresh_opt = make(123)
        t0 = time.perf_counter()
        loaded = ckpt.load(path, {"model": fresh_model.state_dict(), "optim": None, "step": None}, strict=True)
        rows.append((f"torchckpt load ({fmt})", time.perf_counter() - t0))
        fresh_opt.load_state_dict(loaded["optim"])
        train(model_copy := fresh_model, fresh_opt, 3, seed=2)
        ref_model, ref_opt = make(0)
        ref_model.load_state_dict(state["model"])
        ref_opt.load_state_dict(state["optim"])
        train(ref_model, ref_opt, 3, seed=2)
        same = all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model_copy.parameters()))
        print(f"{fmt:12s}: files {sorted(os.listdir(path))}; training continues bit-identically: {same}")
        if not same:
            raise SystemExit("restored training diverged")
        ckpt.close()
    print()
    print("| operation | seconds | MB/s |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {nbytes / s / 1e6:.0f} |")


if __name__ == "__main__":
    main()
