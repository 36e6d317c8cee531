"""examples/demo.py runs end to end: a SIGKILLed, resumed training run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_resumes_bit_identical(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(DEMO), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=540, cwd=tmp_path
    )
    report = f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    assert p.returncode == 0, report
    assert "bit-identical to the uninterrupted run: True" in p.stdout, report
    assert "resumed from step" in p.stdout, report
    assert (tmp_path / "uninterrupted").is_dir() and (tmp_path / "crashed").is_dir(), report
    # What it says about the kill matches what was committed, and retention kept what KeepLast(3) keeps.
    lines = [line.strip() for line in p.stdout.splitlines()]
    killed = next(line for line in lines if line.startswith("killed (exit -9)"))
    listed = next(line for line in lines if line.startswith("committed steps: "))
    steps = ast.literal_eval(re.match(r"committed steps: (\[[\d, ]*\])", listed)[1])
    assert ("it was committed" in killed) == (bool(steps) and steps[-1] >= 100), report
    assert ("before step 100 was committed" in killed) == (not steps or steps[-1] < 100), report
    assert len(steps) <= 3 or (len(steps) == 4 and "the process died before retention ran" in listed), report
    assert f"resumed from step {steps[-1]}" in p.stdout, report
    ends = "committed steps at the end, KeepLast(3): [160, 180, 200] (uninterrupted run: [160, 180, 200])"
    assert ends in lines, report
