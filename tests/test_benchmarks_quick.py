import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_accuracy_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick"],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "PyHessian (published)" in text and "| top eigenvalue | lanczos |" in text
    rows = [(tuple(c.strip() for c in line.split("|")[1:3]), float(line.split("|")[3]))
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[3].strip()[:1].isdigit()]
    assert len(rows) == 14  # 9 rows at 20 products, 5 on the decaying spectrum
    first = dict(rows[:9])
    assert first[("top eigenvalue", "lanczos")] < first[("top eigenvalue", "power iteration")]


MODES_PRINTED = {"rev cached torch ops", "rev cached every conv", "rev cached no conv", "rev", "rev torch ops",
                 "fwd cached", "fwd"}  # every mode but the default, which the last columns compare with


def test_models_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--quick"],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| tiny_vit") or
            line.startswith("| mobilenet")]
    assert len(rows) == 4  # each printed as measured, then in the table
    assert all(float(c.strip(" *")) > 0 for r in rows for c in r[5:13])  # every mode ran, attention and hardsigmoid included
    assert all(float(r[13]) > 0 and r[15].strip() in MODES_PRINTED for r in rows)  # default / best, paired, and against which mode
