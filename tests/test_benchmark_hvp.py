"""The HVP benchmark runs (tiny configuration); its numbers are read from its output, not asserted."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_hvp_benchmark_quick_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hvp.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "reverse cached" in out.stdout and "x grad" in out.stdout
