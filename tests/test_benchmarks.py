"""The benchmark scripts' quick configurations run end to end: the smoke runs, all in this module.

Their numbers are for people to read, never asserted; what is asserted is that every part ran and
the output is well formed. Each script runs once, in its own process with one thread; the runs
start together, two at a time (one per core of a small CI machine), when the first test here
needs them, and each test waits for its own. Marked ``slow``; CI runs them (plain ``pytest``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch")  # every script measures torch models
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PEERS = ("torch", "pyhessian", "curvlinops", "hessian_eigenthings", "psutil")
HAVE_PEERS = all(importlib.util.find_spec(m) is not None for m in PEERS)
CLEAN = {"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"}  # nothing else from the environment
INHERIT = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _runs(out: Path) -> dict[str, tuple[list[str], dict, int]]:
    """name -> (arguments of a benchmarks/ script, environment, timeout in seconds), slowest first."""
    runs = {
        "hvp": (["hvp.py", "--quick"], INHERIT, 600),
        "models": (["models.py", "--quick"], CLEAN, 600),
        "warm_start": (["warm_start.py", "--steps", "20", "--measure-size", "64", "--tol-on", "eigenvalue",
                        "--span-starts", "--out", str(out / "warm.json")], CLEAN, 300),
        "warm_start_misses": (["warm_start.py", "--misses-at", "3", "--starts", "3", "--measure-size", "64",
                               "--tol-on", "eigenvalue", "residual", "--out", str(out / "misses.json")], CLEAN, 300),
        "accuracy": (["accuracy.py", "--quick"], CLEAN, 120),
        "baselines": (["baselines.py", "--quick", "--rounds", "2", "--out", str(out / "baselines.json")], CLEAN, 600),
        "build_profile": (["build_profile.py", "--framework", "torch", "--quick", "--repeats", "1"], CLEAN, 300),
    }
    if HAVE_PEERS:
        runs = {"peers": (["peers.py", "--quick", "--out", str(out / "peers")], INHERIT, 880), **runs}
    return runs


def _run(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def smoke(name: str):
    """Mark a test as reading the smoke run ``name`` (and as slow)."""
    def mark(test):
        test.bench_run = name
        return pytest.mark.slow(test)
    return mark


@pytest.fixture(scope="module")
def bench(request, tmp_path_factory):
    """Start the smoke runs the selected tests read (two at a time); ``bench(name)`` waits for one
    and returns ``(process, output folder)``."""
    out = tmp_path_factory.mktemp("bench")
    wanted = {getattr(getattr(item, "function", None), "bench_run", None) for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run, *spec) for name, spec in _runs(out).items() if name in wanted}
    yield lambda name: (futures[name].result(), out)
    for f in futures.values():
        f.cancel()
    pool.shutdown(wait=True)


def _ok(bench, name: str) -> tuple[str, Path]:
    proc, out = bench(name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


@smoke("hvp")
def test_hvp_benchmark_quick_runs(bench):
    stdout, _ = _ok(bench, "hvp")
    assert "reverse cached" in stdout and "x grad" in stdout


@smoke("peers")
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HAVE_PEERS, reason="needs the bench extra: " + ", ".join(PEERS))
def test_peers_quick_writes_json_and_markdown(bench):
    stdout, out = _ok(bench, "peers")
    res = json.loads((out / "peers" / "peers.json").read_text())
    assert res["quick"] is True
    rows = res["hvp"]["rows"]
    assert "gradient" in rows and "curvop reverse cached" in rows
    for name, r in rows.items():  # every product agrees with double backward
        if r["rel_diff"] is not None:
            assert r["rel_diff"] < 1e-3, name
    assert {"mlp", "spectral-cnn"} <= set(res["spectral"])
    assert res["targets"] and all("passed" in t for t in res["targets"])
    md = (out / "peers" / "benchmarks.md").read_text()
    assert "| contender |" in md and "## Targets" in md and res["versions"]["torch"] in md
    # the committed outputs are not touched by --out
    assert "PASS" in md or "MISS" in md


@smoke("accuracy")
def test_accuracy_quick(bench):
    text, _ = _ok(bench, "accuracy")
    assert "PyHessian (published)" in text and "| top eigenvalue | lanczos |" in text
    rows = [(tuple(c.strip() for c in line.split("|")[1:3]), float(line.split("|")[3]))
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[3].strip()[:1].isdigit()]
    assert len(rows) == 14  # 9 rows at 20 products, 5 on the decaying spectrum
    first = dict(rows[:9])
    assert first[("top eigenvalue", "lanczos")] < first[("top eigenvalue", "power iteration")]


MODES_PRINTED = {"rev cached torch ops", "rev cached every conv", "rev cached no conv", "rev", "rev torch ops",
                 "fwd cached", "fwd"}  # every mode but the default, which the last columns compare with


@smoke("models")
def test_models_quick(bench):
    stdout, _ = _ok(bench, "models")
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| tiny_vit") or
            line.startswith("| mobilenet")]
    assert len(rows) == 4  # each printed as measured, then in the table
    assert all(float(c.strip(" *")) > 0 for r in rows for c in r[5:13])  # every mode ran, attention and hardsigmoid included
    assert all(float(r[13]) > 0 and r[15].strip() in MODES_PRINTED for r in rows)  # default / best, paired, and against which mode


@smoke("warm_start")
def test_warm_start_short_run_reports_the_oracle_bound(bench):
    # benchmarks/warm_start.py: a 20-step run, two warm solves; the oracle (a rule that knew the
    # tight value) can never need more products than a rule whose answers were all within tol
    stdout, out = _ok(bench, "warm_start")
    res = json.loads((out / "warm.json").read_text())
    assert res["args"]["steps"] == 20 and "A stopping rule that knew the answer" in stdout
    for name in ("cold", "warm noise=1"):
        r = res[name]
        assert r["converged"] and r["max_error"] <= 1e-3 and r["oracle_reached"]
        assert 2 <= r["oracle_products"] <= r["mean_products"]
    assert res["warm noise=1"]["oracle_ratio"] == res["warm noise=1"]["oracle_products"] / res["cold"]["oracle_products"]
    free, paid = (res[k]["mean_products"] for k in ("same, the 3 products not counted (a free block start)",
                                                     "Rayleigh-Ritz in previous top-3 span (+3 products)"))
    assert paid == free + 3


@smoke("warm_start_misses")
def test_warm_start_random_start_misses_runs_both_rules(bench):
    stdout, out = _ok(bench, "warm_start_misses")
    res = json.loads((out / "misses.json").read_text())
    assert res["step"] == 3 and res["top3"][0] >= res["top3"][1] >= res["top3"][2]
    for rule in ("eigenvalue", "residual"):
        assert 0 <= res[rule]["missed"] <= 3 and res[rule]["mean_products"] >= 2
    assert "| residual |" in stdout


@smoke("baselines")
def test_baselines_quick_runs_every_contender_and_checks_its_products(bench):
    # benchmarks/baselines.py --quick: a tiny MLP per framework, every hand-written contender and
    # curvop's modes built, each product checked against curvop's default (the script raises if one
    # differs by more than 1e-3), the paired table printed
    pytest.importorskip("jax")
    pytest.importorskip("tensorflow")
    stdout, out = _ok(bench, "baselines")
    rows = json.loads((out / "baselines.json").read_text())["rows"]
    assert [(r["framework"], r["model"]) for r in rows] == [("jax", "mlp"), ("tensorflow", "mlp"), ("torch", "mlp")]
    hand = {"jax": {"jit(jvp(grad))", "jit(linearize(grad))", "reverse-over-reverse", "jit(jvp(grad)), folded",
                    "jit(linearize(grad)), folded", "reverse-over-reverse, folded"},
            "tensorflow": {"tf.function forward-over-reverse", "tf.function nested tapes",
                           "tf.function forward-over-reverse, folded", "tf.function nested tapes, folded"},
            "torch": {"autograd.grad, retained graph", "torch.func jvp(grad)"}}
    for r in rows:
        assert hand[r["framework"]] | {"curvop default"} <= set(r["x_grad"]) and not r["failed"]
        assert r["max_rel_error"] < 1e-3 and all(x > 0 for x in r["x_grad"].values())
        assert all(len(t) == 2 for t in r["rounds_ms"].values())
    assert "| tensorflow | mlp |" in stdout and "reverse mode (auto" in stdout


@smoke("build_profile")
def test_build_profile_quick_splits_the_build_and_times_every_hand_written_first_call(bench):
    # benchmarks/build_profile.py: curvop's build in phases (the self-check with its product count)
    # next to the first call of every hand-written contender with the batch as arguments
    stdout, _ = _ok(bench, "build_profile")
    assert "curvop default: build + first product" in stdout and "self-check" in stdout
    assert "products" in stdout and "autograd.grad, retained graph: first call" in stdout
    assert "torch.func jvp(grad): first call" in stdout


def test_warm_start_oracle_products_counts_the_first_product_within_tol():
    sys.path.insert(0, str(BENCH))
    try:
        import warm_start
    finally:
        sys.path.remove(str(BENCH))
    thetas = [0.5, 0.9, 0.9995, 0.99999]  # Ritz values rise towards 1.0
    assert warm_start._oracle_products(thetas, 1.0, 1e-3, 1, 7) == (4, True)  # product 3, + verification
    assert warm_start._oracle_products(thetas, 1.0, 1e-6, 1, 7) == (7, False)  # never within tol
