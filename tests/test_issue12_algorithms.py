"""Issue 12 ("Nothing silently wrong"), the algorithm items 5, 6, 7, 11, 12, 16 (one width), 17.

Each test is named after its item; each failed on the code before the fix.
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

import curvop
from curvop.backends.faults import NonFiniteProductError
from _matrices import KINDS, is_native, operator, with_spectrum

pytest.importorskip("torch")

TRACE_METHODS = ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace")


# --- item 5: XTrace / XDiag (and every method) when the budget reaches n ------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", TRACE_METHODS)
def test_issue12_item5_trace_exact_when_budget_reaches_n(kind, method):
    lam = np.linspace(1.0, 2.0, 10)  # the issue's cases: n = 10 with auto, n = 5 with xtrace
    for n in (5, 10):
        A = with_spectrum(tuple(np.linspace(1.0, 2.0, n)), seed=n)
        for budget in (n, 60):
            r = curvop.trace(operator(A, kind), method=method, num_matvecs=budget, seed=0)
            assert r.method == "exact" and r.stderr == 0.0 and r.converged
            assert r.num_matvecs == n and r.num_probes == n
            assert r.estimate == pytest.approx(np.trace(A), rel=1e-12)
    # one product short of n: the randomized method runs, with a nonzero error bar
    A = with_spectrum(tuple(lam), seed=10)
    r = curvop.trace(A, method=method, num_matvecs=9, seed=0)
    assert r.method != "exact" and r.stderr > 0


def test_issue12_item5_exact_trace_ignores_minimum_budget_below_n():
    # n = 3 < the 4 products XTrace needs: 3 products give the exact trace, so they are enough
    A = np.diag([1.0, 2.0, 4.0])
    r = curvop.trace(A, method="xtrace", num_matvecs=3)
    assert r.method == "exact" and r.estimate == 7.0 and r.num_matvecs == 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_issue12_item5_xdiag_exact_diagonal_when_budget_reaches_n(kind, method):
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 5)), seed=5)  # the issue's n = 5, diagonal in [1, 2]
    r = curvop.diagonal(operator(A, kind), method=method, num_matvecs=60, seed=0)
    assert r.method == "exact" and r.num_matvecs == 5 and r.num_probes == 5
    assert is_native(r.estimate, kind) and is_native(r.stderr, kind)
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), np.diag(A), rtol=1e-12)
    assert np.all(curvop.arrays.to_numpy(r.stderr) == 0.0)
    # 70 > 64 columns: the unit vectors go in two blocks
    B = with_spectrum(tuple(np.linspace(-1.0, 3.0, 70)), seed=1)
    r = curvop.diagonal(operator(B, kind), method=method, num_matvecs=70)
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), np.diag(B), rtol=1e-12, atol=1e-14)


# --- item 6: XNysTrace on exactly low-rank PSD and on indefinite matrices -----------------------
@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item6_xnystrace_exact_on_low_rank_psd(kind):
    # rank 3 < 10 probes: every leave-one-out Nyström approximation is H itself, so the estimate is
    # exact up to rounding (it was 4-47 standard errors off with the eps-shifted inverse)
    lam = np.r_[np.full(3, 5.0), np.zeros(47)]
    A = with_spectrum(tuple(lam), seed=1)
    for seed in range(10):
        r = curvop.trace(operator(A, kind), method="xnystrace", num_matvecs=10, seed=seed)
        assert r.method == "xnystrace" and r.num_matvecs == 10
        assert abs(r.estimate - 15.0) <= 1e-9 * 15.0, (seed, r)
        assert abs(r.estimate - 15.0) <= 4 * r.stderr + 1e-12 * 15.0


def test_issue12_item6_xnystrace_low_rank_float32_is_accurate():
    import torch

    lam = np.r_[np.linspace(1.0, 3.0, 4), np.zeros(196)]
    A = with_spectrum(tuple(lam), seed=2)
    H = curvop.aslinearoperator(torch.as_tensor(A, dtype=torch.float32))
    for seed in range(5):
        r = curvop.trace(H, method="xnystrace", num_matvecs=12, seed=seed)
        assert abs(r.estimate - lam.sum()) <= min(1e-3 * lam.sum(), 4 * r.stderr), (seed, r)


@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item6_xnystrace_refuses_indefinite(kind):
    # trace 125, but H has negative eigenvalues that ΩᵀHΩ shows (it returned a wrong number before)
    A = with_spectrum(tuple(np.linspace(-5.0, 10.0, 50)), seed=2)
    with pytest.raises(curvop.IndefiniteOperatorError, match="positive semi-definite.*method='auto'"):
        curvop.trace(operator(A, kind), method="xnystrace", num_matvecs=10, seed=0)
    assert issubclass(curvop.IndefiniteOperatorError, ValueError)


def test_issue12_item6_xnystrace_still_unbiased_with_honest_errors():
    lam = 1.0 / np.arange(1, 201) ** 1.5
    A = with_spectrum(tuple(lam), seed=3)
    rs = [curvop.trace(A, method="xnystrace", num_matvecs=12, seed=s) for s in range(200)]
    est = np.array([r.estimate for r in rs])
    assert abs(est.mean() - lam.sum()) <= 4 * est.std(ddof=1) / np.sqrt(est.size)
    assert np.mean([abs(r.estimate - lam.sum()) <= 3 * r.stderr for r in rs]) >= 0.8


# --- item 7: NaN products raise, never converged=True -------------------------------------------
def _nan_matrix(n=20, bad=np.nan):
    A = np.eye(n)
    A[3, 3] = bad
    return A


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", TRACE_METHODS)
def test_issue12_item7_trace_of_nan_products_raises(kind, method):
    H = operator(_nan_matrix(), kind)
    for budget in (8, 20):  # randomized, and exact
        with pytest.raises(NonFiniteProductError, match="NaN or Inf"):
            curvop.trace(H, method=method, num_matvecs=budget, seed=0)
    with pytest.raises(NonFiniteProductError):
        curvop.trace(H, method="hutchinson", num_matvecs=8, rtol=1e-3, seed=0)
    # Inf products: the same one error, before any numpy warning from the estimator's arithmetic
    H = operator(_nan_matrix(bad=np.inf), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(NonFiniteProductError):
            curvop.trace(H, method=method, num_matvecs=8, seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item7_every_algorithm_raises_one_curvop_error_on_nan(kind):
    H = operator(_nan_matrix(), kind)
    calls = [
        lambda: curvop.diagonal(H, num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, method="xdiag", num_matvecs=8, seed=0),
        lambda: curvop.diagonal(H, num_matvecs=20),
        lambda: curvop.eigenvalues(H, k=2, seed=0),
        lambda: curvop.eigenvalues(H, k=2, which="LM", method="power", seed=0),
        lambda: curvop.spectral_density(H, num_steps=5, num_probes=2, seed=0),
    ]
    for call in calls:
        with pytest.raises(NonFiniteProductError, match="NaN or Inf"):
            call()
    H = operator(_nan_matrix(bad=np.inf), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for call in calls[:2] + calls[3:]:  # calls[2] multiplies inf by the zeros of unit vectors
            with pytest.raises(NonFiniteProductError):
                call()


# --- item 11: to_dense(chunk=...) is validated ----------------------------------------------------
def test_issue12_item11_to_dense_rejects_bad_chunk():
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 7)), seed=0)
    H = curvop.aslinearoperator(A)
    for chunk in (-1, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk.*positive integer"):
            H.to_dense(chunk=chunk)
    assert H.num_matvecs == 0
    np.testing.assert_allclose(H.to_dense(chunk=3), A, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(H.to_dense(chunk=np.int64(100)), A, rtol=1e-14, atol=1e-15)


# --- item 12: unconverged eigenvalues warn; the budget is honest; power is sorted ----------------
def test_issue12_item12_unconverged_eigenvalues_warn():
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 300)), seed=0)
    with pytest.warns(curvop.ConvergenceWarning, match="max_matvecs=20.*converged=False"):
        r = curvop.eigenvalues(A, k=3, max_matvecs=20, seed=0)
    assert not r.converged
    with pytest.warns(curvop.ConvergenceWarning):
        r = curvop.eigenvalues(A, k=1, which="LM", method="power", max_matvecs=20, seed=0)
    assert not r.converged
    assert issubclass(curvop.ConvergenceWarning, UserWarning)
    with warnings.catch_warnings():  # a converged result stays silent
        warnings.simplefilter("error")
        assert curvop.eigenvalues(np.diag(np.arange(1.0, 101.0)), k=2, seed=0).converged


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_issue12_item12_max_matvecs_includes_verification(kind, k):
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 300)), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvop.ConvergenceWarning)
        r = curvop.eigenvalues(operator(A, kind), k=k, max_matvecs=20, seed=0)
        assert r.num_matvecs == 20  # the issue: 21 (k=1), 23 (k=3)
        r = curvop.eigenvalues(operator(A, kind), k=k, max_matvecs=20, verify=False, seed=0)
        assert r.num_matvecs == 20
    with pytest.raises(ValueError, match="max_matvecs=5 is too small.*verification.*verify=False"):
        curvop.eigenvalues(A, k=3, max_matvecs=5)


@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item12_power_eigenvalues_sorted_like_lanczos(kind):
    # three close dominant eigenvalues and a small budget: deflated power iteration finds them in
    # no particular order (it returned [6.90, 9.82, -6.96] here)
    lam = np.r_[-10.0, 9.9, 9.8, np.linspace(0.0, 1.0, 47)]
    A = with_spectrum(tuple(lam), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvop.ConvergenceWarning)
        r = curvop.eigenvalues(operator(A, kind), k=3, which="LM", method="power", max_matvecs=60, seed=0)
    assert np.all(np.diff(np.abs(r.eigenvalues)) <= 0), r.eigenvalues
    V = curvop.arrays.to_numpy(r.eigenvectors)
    np.testing.assert_allclose(np.linalg.norm(A @ V - V * r.eigenvalues, axis=0), r.residual_norms, rtol=1e-8)


# --- item 16 (part): one default kernel width --------------------------------------------------
def test_issue12_item16_plot_and_density_share_one_default_width():
    from curvop import plot

    A = with_spectrum(tuple(np.r_[np.linspace(0.0, 1.0, 95), [20, 30, 40, 50, 60]]), seed=4)
    sd = curvop.spectral_density(A, num_steps=30, num_probes=2, seed=0)
    grid, drawn = plot.density_curve(sd)
    _, own = sd.density(grid=grid)
    np.testing.assert_allclose(drawn, own, rtol=1e-12)


# --- item 17: short reprs, a progress bar closed at the products used, py.typed -----------------
@pytest.mark.parametrize("kind", KINDS)
def test_issue12_item17_results_have_short_reprs(kind):
    A = with_spectrum(tuple(np.linspace(1.0, 2.0, 500)), seed=0)
    H = operator(A, kind)
    ev = curvop.eigenvalues(np.diag(np.arange(1.0, 501.0)), k=3, seed=0)
    dg = curvop.diagonal(H, num_matvecs=10, seed=0)
    sd = curvop.spectral_density(H, num_steps=97, num_probes=2, seed=0)
    tr = curvop.trace(H, num_matvecs=10, seed=0)
    for obj in (ev, dg, sd, tr):
        text = repr(obj)
        assert "\n" not in text and len(text) < 250, text
        assert str(obj) == text
    assert "eigenvalues=[500, 499, 498]" in repr(ev) and "(500, 3) float64" in repr(ev)
    assert "(500,)" in repr(dg) and "num_matvecs=10" in repr(dg)
    assert "n=500, num_probes=2, nodes per probe=97" in repr(sd)
    big = curvop.eigenvalues(np.diag(np.arange(1.0, 501.0)), k=30, seed=0)
    assert "..." in repr(big) and len(repr(big)) < 250


def test_issue12_item17_progress_bar_ends_at_products_used(capsys):
    pytest.importorskip("tqdm")
    r = curvop.eigenvalues(np.diag(np.arange(1.0, 101.0)), k=1, progress=True, seed=0)
    err = capsys.readouterr().err
    assert r.num_matvecs < 200
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{r.num_matvecs}/{r.num_matvecs}" in last and "100%" in last, last


def test_issue12_item17_progress_bar_keeps_its_count_when_interrupted(capsys):
    pytest.importorskip("tqdm")
    from curvop._progress import progress_bar

    with pytest.raises(KeyboardInterrupt):
        bar = progress_bar(True, 200, "test")
        try:
            bar.update(21)
            raise KeyboardInterrupt
        finally:
            bar.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "21/200" in last, last


def test_issue12_item17_package_ships_py_typed():
    import importlib.resources

    assert importlib.resources.files("curvop").joinpath("py.typed").is_file()
    root = Path(curvop.__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["curvop"]
