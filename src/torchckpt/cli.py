"""The ``torchckpt`` command: list, inspect, verify, compare, export, prune and import checkpoints.

Every command but ``ls`` also takes an ``s3://``, ``gs://`` or ``az://`` URL for the
checkpoint it reads (``import-dcp``: writes; ``gc``: cleans), the client
configured by the environment and ``--storage-option KEY=VALUE``; a file it
writes (``export``) stays local.

Exit codes: 0 success; 1 a checkpoint is bad (``verify``), two differ
(``diff``) or something could not be deleted (``gc``); 2 a bad path, a bad
checkpoint or bad arguments: one line on stderr, no traceback (with
``--json``, also a JSON object on stdout naming the error); 141 (128 +
SIGPIPE) when the reader of the output went away (``torchckpt ls | head``),
quietly, as other Unix tools.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from .checkpoint_reader import read_manifest
from .errors import CheckpointError, CheckpointIOError, CheckpointNotFoundError
from .format.manifest import Manifest
from .listing import check_object_root, root_rows, tier_rows
from .object_prune import DEFAULT_GRACE_S, parse_storage_options
from .step_dirs import committed_steps, step_of
from .step_store import ObjectSteps, open_step_store
from .storage.locate import is_object_url
from .storage.object_client import parse_object_url
from .storage.paths import local_path

__all__ = ["build_parser", "main"]

#: Exit code of a command whose output pipe was closed (128 + SIGPIPE, what the shell shows for ``cat``).
_EXIT_BROKEN_PIPE = 141


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


# -- paths -----------------------------------------------------------------


def _steps_text(steps: list[int]) -> str:
    shown = [str(s) for s in steps] if len(steps) <= 8 else [*map(str, steps[:3]), "...", *map(str, steps[-3:])]
    return ", ".join(shown) + ("" if len(steps) <= 8 else f" ({len(steps)} steps)")


def _check_root(root: str) -> None:
    """Refuse, in words, a path that is not a directory of steps (``ls``, ``gc``)."""
    if not os.path.lexists(root):
        raise CheckpointNotFoundError(f"no such directory: {root}", path=root)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{root}: not a directory", path=root)
    if os.path.lexists(os.path.join(root, "manifest.json")):
        raise CheckpointNotFoundError(
            f"{root} is a checkpoint, not a directory of steps: `torchckpt inspect {root}` shows it", path=root
        )


def _check_checkpoint(path: str, options: dict[str, str]) -> None:
    """Refuse, in words, a path that does not exist or is a manager's root (one checkpoint expected)."""
    if is_object_url(path):
        from .object_prune import check_checkpoint_url

        return check_checkpoint_url(path, options)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(f"no such checkpoint: {path} does not exist", path=path)
    if not os.path.isdir(path) or os.path.lexists(os.path.join(path, "manifest.json")):
        return  # the reader says what is wrong with it
    try:
        infos = committed_steps(path)
    except OSError:
        return
    if infos:
        steps, newest = [c.step for c in infos], infos[-1].path
        raise CheckpointNotFoundError(
            f"{path} holds the steps {_steps_text(steps)} of a CheckpointManager, not one checkpoint: "
            f"give a step's directory (the newest is {newest}); `torchckpt ls {path}` lists them",
            path=path,
        )


# -- ls ------------------------------------------------------------------


def _metrics_text(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return repr(metrics)  # written by hand through the checkpointer's metadata: show it as it is
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _seconds_text(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-" if v is None else str(v)


def _ls_rows(root: str, verify: bool) -> dict[int, dict[str, Any]]:
    """The rows of the steps under ``root`` (a directory or an object store URL), by step."""
    store = open_step_store(root)
    if isinstance(store, ObjectSteps):
        check_object_root(store)
    else:
        _check_root(root)
    return root_rows(store, verify)


def _ref_text(name: str) -> str:
    """A referenced checkpoint as ``ls`` shows it: its step (``step_0000000010`` -> ``10``), else its name."""
    step = step_of(name)
    return name if step is None else str(step)


def cmd_ls(args: argparse.Namespace) -> int:
    rows_by_step = _ls_rows(args.root, args.verify)
    if args.remote is None:
        rows = list(rows_by_step.values())
    else:
        rows = tier_rows(rows_by_step, _ls_rows(args.remote, args.verify))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    where = args.remote is not None
    table = []
    for r in rows:
        place = [r["location"]] if where else []
        if not r["committed"]:
            table.append([str(r["step"]), *place, "-", "-", "-", "-", "-", "-", "-", "-", "not committed"])
            continue
        status = "verified" if r.get("verified") else ("BAD" if "verified" in r else "committed")
        table.append(
            [str(r["step"]), *place, r["time"], _human(r["size_bytes"]), str(r["ranks"]), r["format"],
             _seconds_text(r["stall_s"]), _seconds_text(r["write_s"]), _metrics_text(r["metrics"]) or "-",
             ",".join(_ref_text(name) for name in r["refs"]) or "-", status]
        )  # fmt: skip
    header = ["step", *(["location"] if where else []), "time", "size", "ranks", "format", "stall_s", "write_s"]
    print(_table(table, [*header, "metrics", "refers_to", "status"]))
    return 0


# -- inspect -------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from .consolidate import ranks_text
    from .tools import describe, iter_leaves, open_lazy, tied_keys

    _check_checkpoint(args.path, args.storage_options)
    with open_lazy(args.path, args.rank, storage_options=args.storage_options) as (man, state):
        leaves = [(k, describe(v)) for k, v in iter_leaves(state)]
        tied = tied_keys(state)
    for k, d in leaves:
        if k in tied:
            d["tied_to"] = tied[k]
    tensors = [d for _, d in leaves if d["type"] in ("tensor", "sharded tensor")]
    stored = [d for d in tensors if "tied_to" not in d]  # a tied tensor is stored (and counted) once
    total = {"tensors": len(stored), "tensor_bytes": sum(d["bytes"] for d in stored), "tied_keys": len(tied),
             "values": len(leaves) - len(tensors)}  # fmt: skip
    if args.json:
        print(json.dumps({"path": args.path, "format": man.layout, "ranks": man.world_size, "rank": args.rank,
                          "keys": dict(leaves), "totals": total}, indent=1))  # fmt: skip
        return 0
    print(f"{args.path}: {man.layout}, {man.world_size} rank(s), showing rank {args.rank}")
    rows = []
    for k, d in leaves:
        if d["type"] == "sharded tensor":
            rank_word = "ranks" if len(d["ranks"]) > 1 else "rank"
            where = f"{d['chunks']} chunk{'s' if d['chunks'] != 1 else ''} from {rank_word} {ranks_text(d['ranks'])}"
            rows.append([k, d["dtype"], str(d["shape"]), _human(d["bytes"]), where])
        elif d["type"] == "tensor":
            size = f"(tied to {d['tied_to']})" if "tied_to" in d else _human(d["bytes"])
            rows.append([k, d["dtype"], str(d["shape"]), size, ""])
        else:
            rows.append([k, d["type"], d["value"], "", ""])
    sharded = any(d["type"] == "sharded tensor" for d in tensors)
    header = ["key", "dtype/type", "shape/value", "bytes"] + (["sharded"] if sharded else [])
    print(_table([r[: len(header)] for r in rows], header))
    ties = f"; {len(tied)} tied key{'s' if len(tied) > 1 else ''} (same tensor as another key)" if tied else ""
    print(f"total: {total['tensors']} tensors, {_human(total['tensor_bytes'])}{ties}; {total['values']} plain values")
    return 0


# -- verify --------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_checkpoint

    _check_checkpoint(args.path, args.storage_options)
    bar = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm  # type: ignore[import-untyped]

        try:
            total = _size(read_manifest(args.path, args.storage_options))
        except CheckpointError:
            total = None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr)
    try:
        man, problems = verify_checkpoint(
            args.path, progress=bar.update if bar else None, storage_options=args.storage_options
        )
    finally:
        if bar is not None:
            bar.close()
    good = not problems
    if args.json:
        print(json.dumps({"path": args.path, "ok": good, "problems": [
            {"file": p.file, "key": p.key, "message": p.message} for p in problems]}, indent=1))  # fmt: skip
    elif good:
        assert man is not None
        tiled = f", {len(man.sharded)} sharded tensor(s) tiled by their chunks" if man.sharded else ""
        print(f"{args.path}: OK ({man.world_size} rank file(s), {_human(_size(man))}, every checksum verified{tiled})")
    else:
        print(f"{args.path}: BAD ({len(problems)} problem(s))")
        for p in problems:
            print(f"  {p}")
    return 0 if good else 1


# -- diff ----------------------------------------------------------------


def cmd_diff(args: argparse.Namespace) -> int:
    from .consolidate import materialize
    from .tools import compare, iter_nodes, open_lazy

    opts = args.storage_options
    _check_checkpoint(args.a, opts)
    _check_checkpoint(args.b, opts)
    with open_lazy(args.a, args.rank, storage_options=opts) as (_, sa), open_lazy(
        args.b, args.rank, storage_options=opts
    ) as (_, sb):
        la, lb = dict(iter_nodes(sa)), dict(iter_nodes(sb))  # containers too: structure and key types count
        added = sorted(lb.keys() - la.keys())
        removed = sorted(la.keys() - lb.keys())
        changed = {}
        for k in sorted(la.keys() & lb.keys()):
            c = compare(materialize(la[k]), materialize(lb[k]))  # a sharded tensor whole, one at a time
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
    from .tools import export, export_path

    _check_checkpoint(args.path, args.storage_options)
    n = export(
        args.path, args.out, fmt=args.format, rank=args.rank, strip_prefix=args.strip_prefix,
        storage_options=args.storage_options,
    )  # fmt: skip
    print(f"wrote {export_path(args.path, args.out, args.format)} ({_human(n)}, {args.format})")
    return 0


def cmd_import_dcp(args: argparse.Namespace) -> int:
    from .dcp_import import import_dcp

    s = import_dcp(args.src, args.dst, overwrite=args.overwrite, storage_options=args.storage_options)
    if args.json:
        print(json.dumps({"ok": True, **dataclasses.asdict(s)}, indent=1))
        return 0
    print(
        f"imported {s.src} -> {s.dst}: {s.tensors} tensors ({_human(s.tensor_bytes)}, from {s.chunks} chunks), "
        f"{s.values} plain values; source: {s.source_ranks} rank(s), {s.files} file(s), DCP {s.dcp_version or '?'}"
    )
    return 0


def _keep_last(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise _UsageError(
            f"gc: --keep-last must be a whole number of at least 1 (the newest step is always kept), got {value!r}"
        )
    return n


def _older_than(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise _UsageError(f"gc: --older-than must be a number of seconds >= 0 (0: every leftover), got {value!r}")
    return seconds


def cmd_gc(args: argparse.Namespace) -> int:
    from .prune import plan_prune, prune
    from .retention import KeepLast

    keep_last = _keep_last(args.keep_last)
    policies = [KeepLast(keep_last)] if keep_last else []
    older_than_s = _older_than(args.older_than)
    if is_object_url(args.root):
        from .object_prune import plan_object_prune, prune_objects

        plan: Any = plan_object_prune(args.root, policies, older_than_s=older_than_s, options=args.storage_options)
        run: Any = prune_objects
    else:
        _check_root(args.root)
        plan, run = plan_prune(args.root, policies), prune
    if plan.empty():
        print("nothing to delete")
        return 0
    if args.dry_run:
        steps, leftovers, kept = [c.step for c in plan.steps], plan.leftovers, plan.kept
        if steps:
            print(f"would delete {len(steps)} step(s): {steps}")
        _print_leftovers("would delete", leftovers, kept)
        return 0
    result = run(plan)
    if plan.steps:
        failed = f"; could not delete {len(result.failed_steps)}: {result.failed_steps}" if result.failed_steps else ""
        print(f"deleted {len(result.steps)} step(s): {result.steps}{failed}")
    _print_leftovers("deleted", result.leftovers, result.kept)
    sys.stdout.flush()
    for path, e in result.failures:
        print(f"torchckpt: could not delete {path}: [Errno {e.errno}] {e.strerror}", file=sys.stderr)
    return 1 if result.failures else 0


def _print_leftovers(verb: str, leftovers: list[str], kept: list[tuple[str, str]]) -> None:
    if leftovers:
        print(f"{verb} {len(leftovers)} leftover(s) of interrupted saves and deletes:")
        for path in leftovers:
            print(f"  {path}")
    for path, why in kept:
        print(f"kept {path}: {why}")


_JSON_HELP = "print JSON (errors too: {\"ok\": false, \"error\": {...}}, same exit codes)"


def _add_export(sub: Any) -> None:
    """The ``export`` subcommand and its arguments."""
    s = sub.add_parser(
        "export",
        help="write one rank's state as one file",
        description="Write one rank's state as one file (sharded tensors whole), streamed; it appears complete or "
        "not at all.",
    )
    s.add_argument("path", metavar="PATH", help="the checkpoint directory or URL to export")
    s.add_argument(
        "out",
        metavar="OUT",
        help="the local file to write (replaced if it exists); an existing directory: the file goes inside it, "
        "named after PATH (PATH.safetensors or PATH.pt), as cp does",
    )
    s.add_argument(
        "--format",
        choices=["safetensors", "torch"],
        required=True,
        help="safetensors: every key loads with safetensors (a tied key as its own copy); torch: for torch.load",
    )
    s.add_argument(
        "--rank",
        type=int,
        default=0,
        help="whose part to export, for a checkpoint of several ranks (0); sharded tensors are exported whole",
    )
    s.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="safetensors: write the keys that start with PREFIX without it (e.g. 'model.')",
    )
    s.set_defaults(fn=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (every subcommand and argument with its help)."""
    p = _Parser(
        prog="torchckpt",
        description="Inspect and manage torchckpt checkpoints: local directories, or s3://, gs://, az:// URLs "
        "(the client configured by the standard environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="a configuration key of the object store client (e.g. endpoint=http://127.0.0.1:9000, region=...), "
        "on top of the environment; repeatable; before COMMAND",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    s = sub.add_parser("ls", help="list the steps under a root", description="List the steps of a CheckpointManager.")
    s.add_argument(
        "root", metavar="ROOT", help="a CheckpointManager's root: a directory holding step_* directories, or an "
        "s3://, gs://, az:// URL"
    )  # fmt: skip
    s.add_argument(
        "--remote", metavar="URL", help="the manager's remote tier: list the steps of both, with where each is "
        "committed (local, remote or both)"
    )  # fmt: skip
    s.add_argument("--verify", action="store_true", help="also verify every checksum of every step (reads all data)")
    s.add_argument("--json", action="store_true", help=_JSON_HELP)
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("inspect", help="the keys of a checkpoint", description="Show the keys of one checkpoint.")
    s.add_argument("path", metavar="PATH", help="one checkpoint directory or URL (a step's, not a manager's root)")
    s.add_argument("--rank", type=int, default=0, help="whose part to show, for a checkpoint of several ranks (0)")
    s.add_argument("--json", action="store_true", help=_JSON_HELP)
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("verify", help="check every size and checksum", description="Verify one checkpoint.")
    s.add_argument("path", metavar="PATH", help="one checkpoint directory or URL; exit 1 naming each bad file and key")
    s.add_argument("--json", action="store_true", help=_JSON_HELP)
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("diff", help="compare two checkpoints", description="Compare two checkpoints (exit 1: differ).")
    s.add_argument("a", metavar="A", help="the first checkpoint directory or URL")
    s.add_argument("b", metavar="B", help="the second checkpoint directory or URL")
    s.add_argument("--rank", type=int, default=0, help="whose parts to compare, for checkpoints of several ranks (0)")
    s.add_argument("--json", action="store_true", help=_JSON_HELP)
    s.set_defaults(fn=cmd_diff)
    _add_export(sub)
    _add_gc(sub)
    _add_import_dcp(sub)
    return p


def _add_gc(sub: Any) -> None:
    s = sub.add_parser(
        "gc",
        help="delete old steps and leftovers",
        description="Delete old steps of a CheckpointManager and the leftovers of interrupted saves "
        "(exit 1: a delete failed). On an object store URL (a checkpoint, or a root of checkpoints), the "
        "leftovers are the generations (<ckpt>/gen-<id>/) its manifest does not name, deleted once their newest "
        f"object is older than --older-than (default {DEFAULT_GRACE_S:.0f} s: one hour, as a save may still be "
        "writing a younger one).",
    )
    s.add_argument("root", metavar="ROOT", help="a CheckpointManager's root directory, or an s3://, gs://, az:// URL")
    s.add_argument("--keep-last", metavar="N", help="also delete old steps: keep the N newest (N >= 1)")
    s.add_argument(
        "--older-than",
        metavar="SECONDS",
        default=str(DEFAULT_GRACE_S),
        help=f"object stores: delete leftover generations older than this (default {DEFAULT_GRACE_S:.0f}; 0: all)",
    )
    s.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    s.set_defaults(fn=cmd_gc)


def _add_import_dcp(sub: Any) -> None:
    s = sub.add_parser(
        "import-dcp",
        help="convert a torch DCP checkpoint",
        description="Convert a checkpoint saved by torch.distributed.checkpoint (any number of ranks) into a "
        "one-rank torchckpt checkpoint of full tensors (native layout), committed atomically. Its .metadata "
        "pickle is read without running code from it; every value must be plain data.",
    )
    s.add_argument("src", metavar="SRC", help="the DCP checkpoint directory (holding .metadata and *.distcp)")
    s.add_argument("dst", metavar="DST", help="the torchckpt checkpoint to write (must not exist): a directory or URL")
    s.add_argument("--overwrite", action="store_true", help="replace a checkpoint at DST (atomically)")
    s.add_argument("--json", action="store_true", help=_JSON_HELP)
    s.set_defaults(fn=cmd_import_dcp)


#: The arguments of each command that may be an object store URL; every other path argument is local.
_URL_ARGUMENTS = {"ls": ("root",), "inspect": ("path",), "verify": ("path",), "diff": ("a", "b"),
                  "export": ("path",), "gc": ("root",), "import-dcp": ("dst",)}  # fmt: skip


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse, by name, before anything is opened or created: a URL where a local path is needed, a bad object URL."""
    for name in ("root", "path", "a", "b", "out", "src", "dst"):
        value = getattr(args, name, None)
        if not isinstance(value, str):
            continue
        if name in _URL_ARGUMENTS.get(args.command, ()) and is_object_url(value):
            parse_object_url(value)
        else:
            local_path(value)


def _error_text(e: BaseException) -> str:
    if isinstance(e, CheckpointIOError) and e.strerror:
        text = e.strerror  # its str() starts with "[Errno N]", which the message already says in words
    elif isinstance(e, OSError) and e.filename is None and e.strerror and "://" in e.strerror:
        text = e.strerror  # the object store client's: it names the operation and the URL in words
    else:
        text = str(e)
    return (text.splitlines() or [type(e).__name__])[0]


def _fail(e: BaseException, argv: Sequence[str], args: argparse.Namespace | None) -> int:
    """Report an error in one line (and as JSON on stdout under --json); return 2."""
    message = _error_text(e)
    if "--json" in argv:
        kind = "UsageError" if isinstance(e, _UsageError) else type(e).__name__
        doc: dict[str, Any] = {"ok": False, "error": {"type": kind, "message": message}}
        if args is not None and args.command == "verify":
            doc = {"path": args.path, "ok": False, "problems": [], "error": doc["error"]}
        _print_quietly(json.dumps(doc, indent=1))
    print(f"torchckpt: {message}", file=sys.stderr)
    return 2


def _print_quietly(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Point stdout at /dev/null: the reader went away, and the exit must not complain about it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.storage_options = parse_storage_options(args.storage_option)
        _check_paths(args)
        code = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return _EXIT_BROKEN_PIPE
    except (_UsageError, CheckpointError, OSError, ValueError) as e:
        return _fail(e, argv, args)
    except KeyboardInterrupt:
        return 130
