"""Runs the code of docs/own-algorithm.md, then its estimator on numpy and torch inputs."""

import pathlib
import re

import numpy as np
import pytest

import curvop

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "own-algorithm.md"


def _run_doc():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)
    return ns


def test_doc_code_runs():
    pytest.importorskip("torch")
    ns = _run_doc()
    assert ns["estimate"] > 0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_doc_estimator_is_accurate_and_honest(kind):
    torch = pytest.importorskip("torch")
    f = _run_doc()["frobenius_norm_squared"]
    lam = np.linspace(-1.0, 3.0, 150)
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((150, 150)))
    A = (Q * lam) @ Q.T
    H = curvop.aslinearoperator(torch.as_tensor(A)) if kind == "torch" else A
    exact = np.sum(lam**2)
    runs = [f(H, num_matvecs=20, seed=s) for s in range(100)]
    assert np.mean([abs(e - exact) <= 2 * s for e, s in runs]) >= 0.85
    assert abs(np.median([e for e, _ in runs]) - exact) <= 0.05 * exact


def test_algorithms_page_code_runs():
    pytest.importorskip("matplotlib").use("Agg")
    page = DOC.parent / "algorithms.md"
    ns: dict = {}
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M):
        exec(compile(block, str(page), "exec"), ns)
    assert ns["r"].num_matvecs > 0 and ns["sd"].num_matvecs == 100


# --- the estimator of the page on native arrays (issue 12 item 16) -----------------------------------
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_issue12_item16_own_algorithm_estimator_runs_on_jax_and_tensorflow_arrays():
    page = (DOCS / "own-algorithm.md").read_text()
    ns: dict = {}
    exec(compile(re.findall(r"```python\n(.*?)```", page, flags=re.S)[0], "own-algorithm.md", "exec"), ns)
    f, A = ns["frobenius_norm_squared"], ns["A"]
    A32 = A.astype(np.float32)  # each framework's default precision; no global setting is touched
    expected, _ = f(A32, num_matvecs=100, seed=1)
    ran = 0
    for name in ("jax.numpy", "tensorflow"):
        try:
            mod = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        native = mod.asarray(A32) if name == "jax.numpy" else mod.constant(A32)
        got, _ = f(native, num_matvecs=100, seed=1)
        assert np.isclose(got, expected, rtol=1e-4), name
        ran += 1
    if not ran:
        pytest.skip("neither JAX nor TensorFlow is installed")
