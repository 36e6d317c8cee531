"""The benchmark entry point runs end to end at a tiny size (methods that need no optional package)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_run_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"),
        "--size-gib", "0.004", "--reps", "1", "--many-small-count", "300",
        "--only", "limits,torch_save,tc_sync_native,many_small_torch,many_small_tc_native",
        "--dir", str(tmp_path / "scratch"), "--out-dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| target | measured | goal |" in proc.stdout
    (json_path,) = out.glob("*.json")
    doc = json.loads(json_path.read_text())
    suites = {s["name"]: s for s in doc["suites"]}
    assert len(suites) == 2
    for suite in suites.values():
        assert suite["checks"] and all(suite["checks"].values())
        for row in suite["rows"].values():
            assert row["samples"], row["label"]
            assert all(s["time_s"] > 0 for s in row["samples"])
    main = next(s for s in doc["suites"] if "transformer" in s["name"])
    assert {"copy", "write", "read_warm", "read_cold", "torch_save", "tc_native_save"} <= set(main["summary"])
    assert any(t["name"].startswith("sync save native") for t in main["targets"])
    assert (out / (json_path.stem + ".md")).exists()
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())


def test_report_sections_are_replaced_one_by_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nhand-written text\n")
    report.update_readme(str(readme), "first 1 GiB run")
    report.update_readme(str(readme), "a 4 GiB run", "results-4gib")
    report.update_readme(str(readme), "second 1 GiB run\n")
    text = readme.read_text()
    assert text == (
        "# Benchmarks\n\nhand-written text\n\n"
        "<!-- results:begin (written by run.py --report) -->\nsecond 1 GiB run\n<!-- results:end -->\n\n"
        "<!-- results-4gib:begin (written by run.py --report) -->\na 4 GiB run\n<!-- results-4gib:end -->\n"
    )


def test_probes_run_and_print_their_figures(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import probes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    expected = {
        "read": r"time read_extents \(crc32c, 2 threads\) / plain readinto: median \d+\.\d\d \(",
        "bookkeeping": r"load of 1044 tensors \(\d+\.\d MiB\) into preallocated: median \d+\.\d ms over 20 loads",
        "stage": r"time DefaultStager.stage / copy_ loop \(1 thread\): median \d+\.\d\d",
        "hygiene": r"copy_ right away: median \d+ ms .*after os.sync\(\) \+ fresh memory: median \d+ ms",
        "write": r"time torchckpt sync save native / pwritev \+ sync_file_range \+ fsync: median \d+\.\d\d",
    }
    for probe, pattern in expected.items():
        assert probes.main([probe, "--size-gib", "0.004", "--pairs", "1", "--dir", str(tmp_path)]) == 0
        assert re.search(pattern, capsys.readouterr().out), probe
    assert list(tmp_path.iterdir()) == []  # scratch removed


def test_metadata_scaling_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "metadata_scaling.py"), "--ranks", "4,8", "--tensors", "8",
           "--time-limit", "60", "--out-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| torchckpt: commit total |" in proc.stdout and "| DCP: global save plan (incl. validation) |" in proc.stdout
    (json_path,) = out.glob("*-metadata.json")
    results = json.loads(json_path.read_text())["results"]
    for world in ("4", "8"):
        assert results["tc"][world]["tc_plan_reads"] == 8  # one read per tensor: the rank's own chunk
        assert results["dcp"][world]["dcp_load_reads"] == 8
        assert results["tc"][world]["tc_commit_s"] > 0 and results["dcp"][world]["dcp_global_s"] > 0
