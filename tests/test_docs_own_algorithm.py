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
