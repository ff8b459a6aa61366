import json
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


def test_warm_start_short_run_reports_the_oracle_bound(tmp_path):
    # benchmarks/warm_start.py: a 20-step run, two warm solves; the oracle (a rule that knew the
    # tight value) can never need more products than a rule whose answers were all within tol
    out_file = tmp_path / "warm.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "warm_start.py"), "--steps", "20", "--measure-size", "64",
         "--tol-on", "eigenvalue", "--span-starts", "--out", str(out_file)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out_file.read_text())
    assert res["args"]["steps"] == 20 and "A stopping rule that knew the answer" in out.stdout
    for name in ("cold", "warm noise=1"):
        r = res[name]
        assert r["converged"] and r["max_error"] <= 1e-3 and r["oracle_reached"]
        assert 2 <= r["oracle_products"] <= r["mean_products"]
    assert res["warm noise=1"]["oracle_ratio"] == res["warm noise=1"]["oracle_products"] / res["cold"]["oracle_products"]
    free, paid = (res[k]["mean_products"] for k in ("same, the 3 products not counted (a free block start)",
                                                     "Rayleigh-Ritz in previous top-3 span (+3 products)"))
    assert paid == free + 3


def test_warm_start_oracle_products_counts_the_first_product_within_tol():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import warm_start
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    thetas = [0.5, 0.9, 0.9995, 0.99999]  # Ritz values rise towards 1.0
    assert warm_start._oracle_products(thetas, 1.0, 1e-3, 1, 7) == (4, True)  # product 3, + verification
    assert warm_start._oracle_products(thetas, 1.0, 1e-6, 1, 7) == (7, False)  # never within tol


def test_warm_start_random_start_misses_runs_both_rules(tmp_path):
    out_file = tmp_path / "misses.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "warm_start.py"), "--misses-at", "3", "--starts", "3",
         "--measure-size", "64", "--tol-on", "eigenvalue", "residual", "--out", str(out_file)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out_file.read_text())
    assert res["step"] == 3 and res["top3"][0] >= res["top3"][1] >= res["top3"][2]
    for rule in ("eigenvalue", "residual"):
        assert 0 <= res[rule]["missed"] <= 3 and res[rule]["mean_products"] >= 2
    assert "| residual |" in out.stdout
