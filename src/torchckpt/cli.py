"""The ``torchckpt`` command: list, inspect, verify, compare, export and prune checkpoints.

Exit codes: 0 success; 1 a checkpoint is bad (``verify``) or two differ
(``diff``); 2 a bad path or bad arguments (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint_reader import read_manifest
from .errors import CheckpointError
from .format.manifest import Manifest
from .storage.paths import local_path

__all__ = ["main"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _size(m: Manifest) -> int:
    return sum(r.size_bytes for r in m.ranks)


# -- ls ------------------------------------------------------------------


def _when(created_unix_s: float) -> str:
    """The commit time in ISO form, or the number itself when no calendar date has it (a clock set wrong)."""
    try:
        return datetime.datetime.fromtimestamp(created_unix_s).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return repr(created_unix_s)


def _metrics(value: Any) -> dict[str, Any]:
    """The metrics of a manifest as a dict (a value saved as something else shows as one metric)."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return {} if value is None else {"metrics": value}


def cmd_ls(args: argparse.Namespace) -> int:
    from .manager import _STEP_DIR

    if not os.path.isdir(args.root):
        raise _UsageError(f"{args.root}: not a directory")
    rows = []
    for name in sorted(os.listdir(args.root)):
        m = _STEP_DIR.match(name)
        path = os.path.join(args.root, name)
        if not m or not os.path.isdir(path):
            continue
        try:
            man = read_manifest(path)
        except CheckpointError as e:
            rows.append({"step": int(m.group(1)), "path": path, "committed": False, "error": str(e)})
            continue
        row: dict[str, Any] = {
            "step": int(m.group(1)),
            "path": path,
            "committed": True,
            "time": _when(man.created_unix_s),
            "size_bytes": _size(man),
            "ranks": man.world_size,
            "format": man.layout,
            "stall_s": man.stats.get("stall_s"),
            "write_s": man.stats.get("write_s"),
            "metrics": _metrics(man.metadata.get("metrics")),
        }
        if args.verify:
            from .verify import verify_checkpoint

            row["verified"] = not verify_checkpoint(path)[1]
        rows.append(row)
    rows.sort(key=lambda r: r["step"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = []
    for r in rows:
        if not r["committed"]:
            table.append([str(r["step"]), "-", "-", "-", "-", "-", "-", "-", "not committed"])
            continue
        status = "verified" if r.get("verified") else ("BAD" if "verified" in r else "committed")
        fmt_s = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"  # noqa: E731
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        table.append(
            [str(r["step"]), r["time"], _human(r["size_bytes"]), str(r["ranks"]), r["format"],
             fmt_s(r["stall_s"]), fmt_s(r["write_s"]), metrics or "-", status]
        )  # fmt: skip
    print(_table(table, ["step", "time", "size", "ranks", "format", "stall_s", "write_s", "metrics", "status"]))
    return 0


# -- inspect -------------------------------------------------------------


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {
            "type": "tensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
            "bytes": value.numel() * value.element_size(),
        }
    text = repr(value)
    return {"type": type(value).__name__, "value": text if len(text) <= 80 else text[:77] + "..."}


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools import iter_leaves, open_lazy

    with open_lazy(args.path, args.rank) as (man, state):
        leaves = [(k, _describe(v)) for k, v in iter_leaves(state)]
    tensors = [d for _, d in leaves if d["type"] == "tensor"]
    total = {"tensors": len(tensors), "tensor_bytes": sum(d["bytes"] for d in tensors), "values": len(leaves) - len(tensors)}
    if args.json:
        print(json.dumps({"path": args.path, "format": man.layout, "ranks": man.world_size, "rank": args.rank,
                          "keys": dict(leaves), "totals": total}, indent=1))  # fmt: skip
        return 0
    print(f"{args.path}: {man.layout}, {man.world_size} rank(s), showing rank {args.rank}")
    rows = []
    for k, d in leaves:
        if d["type"] == "tensor":
            rows.append([k, d["dtype"], str(d["shape"]), _human(d["bytes"])])
        else:
            rows.append([k, d["type"], d["value"], ""])
    print(_table(rows, ["key", "dtype/type", "shape/value", "bytes"]))
    print(f"total: {total['tensors']} tensors, {_human(total['tensor_bytes'])}; {total['values']} plain values")
    return 0


# -- verify --------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_checkpoint

    bar = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        try:
            total = _size(read_manifest(args.path))
        except CheckpointError:
            total = None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr)
    try:
        man, problems = verify_checkpoint(args.path, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    good = not problems
    if args.json:
        print(json.dumps({"path": args.path, "ok": good, "problems": [
            {"file": p.file, "key": p.key, "message": p.message} for p in problems]}, indent=1))  # fmt: skip
    elif good:
        assert man is not None
        print(f"{args.path}: OK ({man.world_size} rank file(s), {_human(_size(man))}, every checksum verified)")
    else:
        print(f"{args.path}: BAD ({len(problems)} problem(s))")
        for p in problems:
            print(f"  {p}")
    return 0 if good else 1


# -- diff ----------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, counting positions where both are nan as equal (nan where only one is)."""
    try:
        x, y = (a, b) if a.is_complex() else (a.double(), b.double())
        d = (x - y).abs()
        d = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros((), dtype=d.dtype), d)
        return d.max().item()
    except (RuntimeError, TypeError):
        return math.nan


def _compare(a: Any, b: Any) -> dict[str, Any] | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return {"change": "type", "a": _describe(a), "b": _describe(b)}
        if a.numel() == 0 or torch.equal(_raw_bytes(a), _raw_bytes(b)):
            return None  # bit-identical (nan == nan here; -0.0 != 0.0)
        return {"change": "values", "max_abs_diff": _max_abs_diff(a, b)}
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return {"change": "type", "a": _describe(a), "b": _describe(b)}
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return None if same and type(a) is type(b) else {"change": "value", "a": repr(a), "b": repr(b)}


def cmd_diff(args: argparse.Namespace) -> int:
    from .tools import iter_nodes, open_lazy

    with open_lazy(args.a, args.rank) as (_, sa), open_lazy(args.b, args.rank) as (_, sb):
        la, lb = dict(iter_nodes(sa)), dict(iter_nodes(sb))  # containers too: structure and key types count
        added = sorted(lb.keys() - la.keys())
        removed = sorted(la.keys() - lb.keys())
        changed = {}
        for k in sorted(la.keys() & lb.keys()):
            c = _compare(la[k], lb[k])
            if c is not None:
                changed[k] = c
    same = not (added or removed or changed)
    if args.json:
        print(json.dumps({"same": same, "added": added, "removed": removed, "changed": changed}, indent=1, default=str))
    elif same:
        print("no differences")
    else:
        for k in added:
            print(f"+ {k}")
        for k in removed:
            print(f"- {k}")
        for k, c in changed.items():
            if c["change"] == "values":
                print(f"~ {k}: values differ (max abs diff {c['max_abs_diff']:.6g})")
            elif c["change"] == "value":
                print(f"~ {k}: {c['a']} -> {c['b']}")
            else:
                print(f"~ {k}: {c['a']} -> {c['b']}")
    return 0 if same else 1


# -- export, gc ----------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .tools import export

    n = export(args.path, args.out, fmt=args.format, rank=args.rank)
    print(f"wrote {args.out} ({_human(n)}, {args.format})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .manager import CheckpointManager
    from .retention import KeepLast

    if not os.path.isdir(args.root):
        raise _UsageError(f"{args.root}: not a directory")  # and not one to create
    mgr = CheckpointManager(args.root, keep=[KeepLast(args.keep_last)], async_save=False)
    try:
        steps = mgr.apply_retention(dry_run=args.dry_run)
    finally:
        mgr.close()
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(steps)} step(s): {steps}" if steps else "nothing to delete")
    return 0


def _parser() -> _Parser:
    p = _Parser(prog="torchckpt", description="Inspect and manage torchckpt checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("ls", help="list the steps under a root")
    s.add_argument("root")
    s.add_argument("--verify", action="store_true", help="also verify every checksum")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("inspect", help="the keys of a checkpoint")
    s.add_argument("path")
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("verify", help="check every size and checksum")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("diff", help="compare two checkpoints")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser("export", help="write one rank's state as one file")
    s.add_argument("path")
    s.add_argument("out")
    s.add_argument("--format", choices=["safetensors", "torch"], required=True)
    s.add_argument("--rank", type=int, default=0)
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("gc", help="delete old steps")
    s.add_argument("root")
    s.add_argument("--keep-last", type=int, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=cmd_gc)
    return p


def _refuse_urls(args: argparse.Namespace) -> None:
    """Every path argument is a local path: a URL is refused by name before anything is opened or created."""
    for name in ("root", "path", "a", "b", "out"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            local_path(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    try:
        args = _parser().parse_args(argv)
        _refuse_urls(args)
        return int(args.fn(args))
    except _UsageError as e:
        print(f"torchckpt: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError) as e:
        print(f"torchckpt: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

