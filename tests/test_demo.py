"""examples/demo.py runs end to end: a SIGKILLed, resumed training run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

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
