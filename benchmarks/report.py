"""Figures into a report: per-row summaries, targets (PASS/MISS), ratios, markdown, chart, README section."""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Callable
from typing import Any

from harness import MIB, Row

GB = 1e9


# --------------------------------------------------------------------------- summaries


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: dict[str, Row]) -> dict[str, dict[str, Any]]:
    """Medians and ranges of every row with samples.

    ``time``: save-to-durable for saves (``durable_s`` where a method reports
    it, else the timed call), the call for loads and copies; ``stall``: for
    saves, until the training thread may go on (``stall_s``, else the whole
    call); memory: the largest peak-minus-before over the repetitions.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, row in rows.items():
        if not row.samples:
            continue
        times = [s.get("durable_s", s["time_s"]) for s in row.samples]
        s: dict[str, Any] = {
            "label": row.label,
            "group": row.group,
            "op": row.op,
            "state": row.state,
            "nbytes": row.nbytes,
            "n": len(times),
            "time": _stats(times),
            "gb_per_s": row.nbytes / statistics.median(times) / GB,
            "gb_per_s_range": [row.nbytes / max(times) / GB, row.nbytes / min(times) / GB],
            "cpu_s": statistics.median(x["cpu_s"] for x in row.samples),
            "notes": row.notes,
        }
        if row.op == "save":
            s["stall"] = _stats([x.get("stall_s", x.get("durable_s", x["time_s"])) for x in row.samples])
        mems = [x["mem"] for x in row.samples if "mem" in x]
        if mems:
            s["mem_main_delta"] = max(m["main_delta"] for m in mems)
            s["mem_children_delta"] = max(m["children_delta"] for m in mems)
            s["mem_interval_ms"] = statistics.median(m["interval_ms"] for m in mems)
            if row.extra.get("held") is not None:
                s["mem_held"] = max(0, row.extra["held"])
        warm = row.extra.get("warmup")
        if warm:
            s["first_save"] = {"time": warm[0].get("durable_s", warm[0]["time_s"]), "stall": warm[0].get("stall_s")}
        out[key] = s
    return out


# --------------------------------------------------------------------------- targets and ratios


def _t(s: dict[str, Any], key: str, what: str = "time") -> float | None:
    row = s.get(key)
    if row is None or what not in row:
        return None
    return float(row[what]["median"])


Target = tuple[str, Callable[[dict[str, Any]], float | None], float, str]


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _min(*xs: float | None) -> float | None:
    vals = [x for x in xs if x is not None]
    return min(vals) if vals else None


def _max(*xs: float | None) -> float | None:
    return None if any(x is None for x in xs) else max(x for x in xs if x is not None)


def _sum(*xs: float | None) -> float | None:
    return None if any(x is None for x in xs) else sum(x for x in xs if x is not None)


def _mem_sync(key: str) -> Callable[[dict[str, Any]], float | None]:
    def f(s: dict[str, Any]) -> float | None:
        row = s.get(key)
        if row is None or "mem_main_delta" not in row:
            return None
        allowed = 0.05 * row["nbytes"] + 64 * MIB
        return float(row["mem_main_delta"] + row["mem_children_delta"]) / allowed

    return f


def _mem_async(key: str) -> Callable[[dict[str, Any]], float | None]:
    def f(s: dict[str, Any]) -> float | None:
        row = s.get(key)
        if row is None or "mem_main_delta" not in row:
            return None
        added = row.get("mem_held", 0.0) + row["mem_main_delta"] + row["mem_children_delta"]
        allowed = 1.05 * row["nbytes"] + 64 * MIB
        return float(added) / allowed

    return f


#: (name, value from the summaries, goal, "ge"/"le"). Throughput ratios are time ratios inverted.
TARGETS: list[Target] = [
    ("sync save native: throughput / plain write+fsync", lambda s: _ratio(_t(s, "write"), _t(s, "tc_native_save")), 0.9, "ge"),
    ("sync save native: throughput / torch.save+fsync", lambda s: _ratio(_t(s, "torch_save"), _t(s, "tc_native_save")), 1.5, "ge"),
    ("sync save native: throughput / DCP save", lambda s: _ratio(_t(s, "dcp_save"), _t(s, "tc_native_save")), 2.0, "ge"),
    ("async native, 2nd+ save: stall / copy_", lambda s: _ratio(_t(s, "tc_async_native", "stall"), _t(s, "copy")), 1.1, "le"),
    ("async native, first save after warmup: stall / copy_",
     lambda s: _ratio(_t(s, "tc_async_native_first_warm", "stall"), _t(s, "copy")), 1.5, "le"),
    ("async torch_save, 2nd+ save: stall / copy_", lambda s: _ratio(_t(s, "tc_async_torch_save", "stall"), _t(s, "copy")), 1.1, "le"),
    ("async native: stall / DCP async_save stall (faster executor)", lambda s: _ratio(
        _t(s, "tc_async_native", "stall"), _min(_t(s, "dcp_async_thread", "stall"), _t(s, "dcp_async_process", "stall"))),
     0.5, "le"),
    ("async native: save-to-durable / (copy_ + plain write+fsync)", lambda s: _ratio(
        _t(s, "tc_async_native"), _sum(_t(s, "copy"), _t(s, "write"))), 1.2, "le"),
    ("async native pipelined: save-to-durable / max(copy_, sync save native)", lambda s: _ratio(
        _t(s, "tc_async_native_pipelined"), _max(_t(s, "copy"), _t(s, "tc_native_save"))), 1.1, "le"),
    ("async native pipelined, 2nd+ save: stall / copy_",
     lambda s: _ratio(_t(s, "tc_async_native_pipelined", "stall"), _t(s, "copy")), 1.1, "le"),
    ("load native into preallocated, warm: throughput / plain read warm",
     lambda s: _ratio(_t(s, "read_warm"), _t(s, "tc_native_load_inplace_warm")), 0.95, "ge"),
    ("load native into preallocated, cold: throughput / plain read cold",
     lambda s: _ratio(_t(s, "read_cold"), _t(s, "tc_native_load_inplace_cold")), 0.95, "ge"),
    ("load native fresh, warm: throughput / torch.load(mmap=True) + touch, warm",
     lambda s: _ratio(_t(s, "torch_load_mmap_touch_warm"), _t(s, "tc_native_load_fresh_warm")), 1.0, "ge"),
    ("load native fresh, cold: throughput / torch.load(mmap=True) + touch, cold",
     lambda s: _ratio(_t(s, "torch_load_mmap_touch_cold"), _t(s, "tc_native_load_fresh_cold")), 1.0, "ge"),
    ("many small, native: save time / torch.save+fsync", lambda s: _ratio(_t(s, "ms_tc_native_save"), _t(s, "ms_torch_save")), 0.5, "le"),
    ("many small, native: load time / torch.load", lambda s: _ratio(_t(s, "ms_tc_native_load"), _t(s, "ms_torch_load")), 0.5, "le"),
    ("many small, torch_save: save time / torch.save+fsync",
     lambda s: _ratio(_t(s, "ms_tc_torch_save_save"), _t(s, "ms_torch_save")), 0.5, "le"),
    ("many small, torch_save: load time / torch.load",
     lambda s: _ratio(_t(s, "ms_tc_torch_save_load"), _t(s, "ms_torch_load")), 0.5, "le"),
    ("memory, sync save native: added RSS / (5% of size + 64 MiB)", _mem_sync("tc_native_save"), 1.0, "le"),
    ("memory, sync save torch_save: added RSS / (5% of size + 64 MiB)", _mem_sync("tc_torch_save_save"), 1.0, "le"),
    ("memory, async native: staging held + added RSS / (size + 5% + 64 MiB)", _mem_async("tc_async_native"), 1.0, "le"),
    ("memory, async torch_save: staging held + added RSS / (size + 5% + 64 MiB)", _mem_async("tc_async_torch_save"), 1.0,
     "le"),
]  # fmt: skip


#: Targets of ``incremental.py`` (issue 13): (name, key of its result, goal, sense).
INCREMENTAL_TARGETS: list[tuple[str, str, float, str]] = [
    ("incremental saves 2..10: save time / full save time", "time_ratio", 0.15, "le"),
    ("incremental, 10 saves: bytes on disk / (full state + 10 x changed bytes)", "disk_ratio", 1.1, "le"),
]


def incremental_targets(result: dict[str, Any]) -> list[tuple[str, float, float, str, bool]]:
    """``(name, value, goal, sense, met)`` of each incremental target found in ``result``."""
    rows = []
    for name, key, goal, sense in INCREMENTAL_TARGETS:
        value = result.get(key)
        if value is not None:
            rows.append((name, float(value), goal, sense, value <= goal if sense == "le" else value >= goal))
    return rows


def _tput(num_key: str, den_key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda s: _ratio(_t(s, den_key), _t(s, num_key))


def _time(num_key: str, den_key: str, what: str = "time") -> Callable[[dict[str, Any]], float | None]:
    return lambda s: _ratio(_t(s, num_key, what), _t(s, den_key))


def _mem_of(key: str) -> Callable[[dict[str, Any]], float | None]:
    def f(s: dict[str, Any]) -> float | None:
        row = s.get(key)
        if row is None or "mem_main_delta" not in row:
            return None
        return float(row.get("mem_held", 0.0) + row["mem_main_delta"] + row["mem_children_delta"]) / row["nbytes"]

    return f


#: Context: (name, value) — no goal.
RATIOS: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
    ("sync save native: throughput / pwritev+sync_file_range path", _tput("tc_native_save", "write_sfr")),
    ("sync save torch_save format: throughput / plain write+fsync", _tput("tc_torch_save_save", "write")),
    ("sync save torch_save format: throughput / torch.save+fsync", _tput("tc_torch_save_save", "torch_save")),
    ("sync save torch_save format: throughput / DCP save", _tput("tc_torch_save_save", "dcp_save")),
    ("async torch_save: save-to-durable / (copy_ + plain write+fsync)",
     lambda s: _ratio(_t(s, "tc_async_torch_save"), _sum(_t(s, "copy"), _t(s, "write")))),
    ("async native, first save right after make: stall / copy_", _time("tc_async_native_first", "copy", "stall")),
    ("async native, first save after warmup: save-to-durable / 2nd+ save's",
     lambda s: _ratio(_t(s, "tc_async_native_first_warm"), _t(s, "tc_async_native"))),
    ("async native: stall / reference async stall", lambda s: _ratio(_t(s, "tc_async_native", "stall"),
                                                                     _t(s, "reference_async", "stall"))),
    ("DCP async_save thread: stall / copy_", _time("dcp_async_thread", "copy", "stall")),
    ("DCP async_save process: stall / copy_", _time("dcp_async_process", "copy", "stall")),
    ("reference async: stall / copy_", _time("reference_async", "copy", "stall")),
    ("torch_checkpointing async: stall / copy_", _time("torch_checkpointing_async", "copy", "stall")),
    ("load native fresh, warm: throughput / plain read warm", _tput("tc_native_load_fresh_warm", "read_warm")),
    ("load native fresh, cold: throughput / plain read cold", _tput("tc_native_load_fresh_cold", "read_cold")),
    ("load torch_save into preallocated, warm: throughput / plain read warm",
     _tput("tc_torch_save_load_inplace_warm", "read_warm")),
    ("load torch_save into preallocated, cold: throughput / plain read cold",
     _tput("tc_torch_save_load_inplace_cold", "read_cold")),
    ("load native fresh warm: throughput / torch.load warm", _tput("tc_native_load_fresh_warm", "torch_load_warm")),
    ("load native fresh cold: throughput / torch.load cold", _tput("tc_native_load_fresh_cold", "torch_load_cold")),
    ("load native into preallocated, cold: throughput / DCP load cold",
     _tput("tc_native_load_inplace_cold", "dcp_load_cold")),
    ("2 ranks, sync native: throughput / plain write+fsync (one process)", _tput("tc2_sync_native", "write")),
    ("2 ranks, async native: save-to-durable / (copy_ + plain write+fsync)",
     lambda s: _ratio(_t(s, "tc2_async_native"), _sum(_t(s, "copy"), _t(s, "write")))),
    ("many small, native: load into preallocated / torch.load", _time("ms_tc_native_load_inplace", "ms_torch_load")),
    ("many small, torch_save: load into preallocated / torch.load",
     _time("ms_tc_torch_save_load_inplace", "ms_torch_load")),
    ("memory / checkpoint size: torchckpt async native (held + added)", _mem_of("tc_async_native")),
    ("memory / checkpoint size: DCP async_save process (held + added)", _mem_of("dcp_async_process")),
    ("memory / checkpoint size: DCP async_save thread (added)", _mem_of("dcp_async_thread")),
    ("memory / checkpoint size: reference async (held + added)", _mem_of("reference_async")),
    ("memory / checkpoint size: torch.save + fsync (added)", _mem_of("torch_save")),
    ("memory / checkpoint size: DCP save (added)", _mem_of("dcp_save")),
]  # fmt: skip


def evaluate(summary: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The targets (value, goal, met) and the context ratios that the run's rows allow."""
    targets = []
    for name, fn, goal, sense in TARGETS:
        value = fn(summary)
        if value is None:
            continue
        met = value >= goal if sense == "ge" else value <= goal
        targets.append({"name": name, "value": value, "goal": goal, "sense": sense, "met": met})
    ratios = []
    for name, fn in RATIOS:
        value = fn(summary)
        if value is not None:
            ratios.append({"name": name, "value": value})
    return targets, ratios


# --------------------------------------------------------------------------- markdown


_GROUP_ORDER = {"limit": 0, "peer": 1, "torchckpt": 2}


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MIB:,.0f}"


def table(summary: dict[str, Any], state: str) -> str:
    lines = [
        "| method | op | time s, median (min–max) | GB/s | stall s, median (min–max) | ΔRSS main MiB | ΔRSS writer MiB | CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(k, s) for k, s in summary.items() if s["state"] == state]
    rows.sort(key=lambda kv: _GROUP_ORDER.get(kv[1]["group"], 9))
    for _, s in rows:
        t = s["time"]
        stall = s.get("stall")
        stall_txt = f"{stall['median']:.3f} ({stall['min']:.3f}–{stall['max']:.3f})" if stall else "–"
        held = s.get("mem_held")
        main_mem = _mib(s.get("mem_main_delta"))
        if held is not None:
            main_mem = f"{main_mem} (+{_mib(held)} held)"
        lines.append(
            f"| {s['label']} | {s['op']} | {t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f}) | {s['gb_per_s']:.2f} "
            f"| {stall_txt} | {main_mem} | {_mib(s.get('mem_children_delta'))} | {s['cpu_s']:.2f} |"
        )
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | |", "|---|---:|---:|---|"]
    for t in targets:
        sign = "≥" if t["sense"] == "ge" else "≤"
        lines.append(
            f"| {t['name']} | {t['value']:.2f} | {sign} {t['goal']:.2f} | {'PASS' if t['met'] else '**MISS**'} |"
        )
    return "\n".join(lines)


def ratios_table(ratios: list[dict[str, Any]]) -> str:
    lines = ["| ratio (same run) | value |", "|---|---:|"]
    lines += [f"| {r['name']} | {r['value']:.2f} |" for r in ratios]
    return "\n".join(lines)


def notes(summary: dict[str, Any]) -> str:
    """One line per distinct note, naming the rows it applies to."""
    by_note: dict[str, list[str]] = {}
    for s in summary.values():
        if s["notes"]:
            by_note.setdefault(s["notes"], []).append(s["label"])
    return "\n".join(f"- {'; '.join(labels)}: {note}" for note, labels in by_note.items())


# --------------------------------------------------------------------------- chart


def chart(summary: dict[str, Any], path: str, title: str) -> str | None:
    """A PNG of save throughput, stall and load throughput per method (min–max whiskers); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"limit": "#7f7f7f", "peer": "#1f77b4", "torchckpt": "#d62728"}
    main = {k: s for k, s in summary.items() if s["state"] == "main"}
    saves = [s for s in main.values() if s["op"] == "save"]
    loads = [s for s in main.values() if s["op"] == "load"]
    stalls = [s for s in main.values() if s["op"] == "save" or s["op"] == "copy"]
    panels = [
        ("save-to-durable throughput, GB/s", saves, lambda s: s["gb_per_s"], lambda s: s["gb_per_s_range"]),
        ("stall: training thread blocked, s", stalls, lambda s: (s.get("stall") or s["time"])["median"],
         lambda s: [(s.get("stall") or s["time"])["min"], (s.get("stall") or s["time"])["max"]]),
        ("load throughput, GB/s", loads, lambda s: s["gb_per_s"], lambda s: s["gb_per_s_range"]),
    ]  # fmt: skip
    heights = [max(1, len(p[1])) for p in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, 0.28 * sum(heights) + 3), gridspec_kw={"height_ratios": heights}
    )
    for ax, (name, rows, value, rng) in zip(axes, panels):
        rows = sorted(rows, key=lambda s: (_GROUP_ORDER.get(s["group"], 9), s["label"]), reverse=True)
        ys = range(len(rows))
        vals = [value(s) for s in rows]
        lo = [max(0.0, v - rng(s)[0]) for v, s in zip(vals, rows)]
        hi = [max(0.0, rng(s)[1] - v) for v, s in zip(vals, rows)]
        ax.barh(list(ys), vals, xerr=[lo, hi], color=[colors.get(s["group"], "#333") for s in rows], capsize=2)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([s["label"] for s in rows], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        for y, v, h in zip(ys, vals, hi):
            ax.text(v + h, y, f" {v:.2f}", va="center", fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_chart(suites: list[dict[str, Any]], path: str) -> str | None:
    """Throughput against state size, one line per method (log-scaled size); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys: list[str] = []
    for s in suites:
        keys += [k for k in s["summary"] if k not in keys and s["summary"][k]["op"] in ("save", "copy", "load")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, ops, title in (
        (axes[0], ("save", "copy"), "saves (save-to-durable) and copy_"),
        (axes[1], ("load",), "loads"),
    ):
        for k in keys:
            pts = [(s["tensor_bytes"] / 2**20, s["summary"][k]["gb_per_s"]) for s in suites if k in s["summary"]]
            first = next(s["summary"][k] for s in suites if k in s["summary"])
            if first["op"] not in ops or not pts:
                continue
            style = {"limit": ":", "peer": "--", "torchckpt": "-"}.get(first["group"], "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=first["label"])
        ax.set_xscale("log")
        ax.set_xlabel("state size, MiB")
        ax.set_ylabel("GB/s")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- README section

def markers(name: str) -> tuple[str, str]:
    """The comment lines around the generated section ``name`` of the README."""
    return f"<!-- {name}:begin (written by run.py --report) -->", f"<!-- {name}:end -->"


def update_readme(readme: str, section: str, name: str = "results") -> None:
    """Replace the generated section ``name`` of ``readme`` (between its markers) with ``section``.

    A section not there yet goes at the end.
    """
    begin, end = markers(name)
    with open(readme) as f:
        text = f.read()
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)
