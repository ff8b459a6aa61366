import numpy as np
import pytest

import curvop
from _matrices import KINDS, is_native, operator, with_spectrum

pytest.importorskip("torch")


@pytest.mark.parametrize("kind", KINDS)
def test_hutchinson_is_exact_on_a_diagonal_matrix(kind):
    d = np.linspace(-1.0, 4.0, 50)
    r = curvop.diagonal(operator(np.diag(d), kind), num_matvecs=3, seed=0)
    assert is_native(r.estimate, kind) and is_native(r.stderr, kind) and r.num_matvecs == 3
    np.testing.assert_allclose(curvop.arrays.to_numpy(r.estimate), d, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_xdiag_beats_hutchinson_on_decaying_spectrum(kind):
    lam = 1.0 / np.arange(1, 501) ** 2
    A = with_spectrum(tuple(lam), seed=8)
    H, d = operator(A, kind), np.diag(A)
    err = {}
    for method in ("hutchinson", "xdiag"):
        r = curvop.diagonal(H, method=method, num_matvecs=60, seed=1)
        assert r.num_matvecs == 60 and is_native(r.estimate, kind)
        err[method] = np.linalg.norm(curvop.arrays.to_numpy(r.estimate) - d) / np.linalg.norm(d)
    assert err["xdiag"] * 10 <= err["hutchinson"], err
    assert err["xdiag"] < 0.05


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_estimators_are_unbiased(method):
    lam = np.linspace(-1.0, 2.0, 30)
    A = with_spectrum(tuple(lam), seed=9)
    est = np.array([curvop.diagonal(A, method=method, num_matvecs=6, seed=s).estimate for s in range(300)])
    z = (est.mean(axis=0) - np.diag(A)) / (est.std(axis=0, ddof=1) / np.sqrt(len(est)))
    assert np.max(np.abs(z)) < 4.5  # 30 entries, each within 4.5 standard errors


def test_hutchinson_stderr_covers_the_diagonal():
    A = with_spectrum(tuple(np.linspace(0.0, 3.0, 200)), seed=10)
    r = curvop.diagonal(A, num_matvecs=40, seed=2)
    assert np.mean(np.abs(r.estimate - np.diag(A)) <= 2 * r.stderr) >= 0.9


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        curvop.diagonal(np.eye(5), method="xdiag", num_matvecs=3)
    with pytest.raises(ValueError, match="method"):
        curvop.diagonal(np.eye(5), method="exact")


# --- XDiag exact when the budget reaches n (issue 12 item 5) -----------------------------------------
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


# --- issue 24 item 1: XDiag's error bars cover the diagonal, two-sided -------------------------------
@pytest.mark.parametrize("spectrum", ["flat", "decaying", "low rank + noise"])
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_issue24_diagonal_stderr_covers_the_truth_two_sided(method, spectrum):
    """``estimate ± 2·stderr`` covers the true entry for 90-99 % of the 120 entries × 200 runs.

    The reasoning of ``test_issue24_trace_stderr_covers_the_truth_two_sided`` (same spectra and
    n = 120, but 60 products): about 95 % for an honest error bar; the entries of one run are
    correlated, so the spread of the fraction is at least the ±1.5 % of 200 runs. Measured: XDiag
    93.0 %, Hutchinson 94.7 %; XDiag's error bar before issue 24 covered 82-85 %, doubled it covers
    99.5-99.7 %. (At 40 products XDiag covers 90.6 % on low rank + noise, whose entry errors are
    heavy-tailed with 20 probes against a rank-10 spike, and doubled 99.0 %: too close to the band.)
    """
    from test_trace import COVERAGE_SPECTRA, coverage_of_two_stderr

    A = with_spectrum(COVERAGE_SPECTRA[spectrum], seed=3)
    rs = [curvop.diagonal(A, method=method, num_matvecs=60, seed=s) for s in range(200)]
    cover = coverage_of_two_stderr([r.estimate for r in rs], [r.stderr for r in rs], np.diag(A))
    assert 0.90 <= cover <= 0.99, (method, spectrum, cover)


@pytest.mark.parametrize("kind", KINDS)
def test_issue24_xdiag_covariance_is_the_leave_two_out_sum(kind):
    # the entry-wise correction XDiag's stderr adds, Σ_{i≠j} ((k−1)tⱼ + tᵢ − Σt) ⊙ (tᵢ − tᵢ⁽⁻ʲ⁾)
    # / (k(k−1)(k−2)), against XDiag run from scratch without probes i and j (dense float64)
    from curvop import diagonal_estimation as de

    n, k = 40, 6
    A = with_spectrum(tuple(np.linspace(-1.0, 2.0, n)), seed=1)
    H = curvop.aslinearoperator(operator(A, kind))
    E, cov = de._xdiag(H, 2 * k, np.random.default_rng(5))
    assert is_native(E, kind) and is_native(cov, kind)
    Om = curvop.arrays.to_numpy(H.random((n, k), "rademacher", seed=np.random.default_rng(5)))
    Y = A @ Om

    def estimate(i, drop):
        Qk = np.linalg.qr(Y[:, [j for j in range(k) if j not in drop]])[0]
        P = Qk @ Qk.T
        return np.diag(P @ A) + Om[:, i] * ((np.eye(n) - P) @ A @ Om[:, i])

    t = np.stack([estimate(i, [i]) for i in range(k)], axis=1)
    np.testing.assert_allclose(curvop.arrays.to_numpy(E), t, atol=1e-12)
    total = sum(((k - 1) * t[:, j] + t[:, i] - t.sum(axis=1)) * (t[:, i] - estimate(i, [i, j]))
                for i in range(k) for j in range(k) if i != j)
    expected = total / (k * (k - 1) * (k - 2))
    np.testing.assert_allclose(curvop.arrays.to_numpy(cov), expected, atol=1e-12 * np.abs(expected).max())
    assert np.abs(expected).max() > 1e-3


# --- issue 26: degenerate operators give finite, right diagonals -------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_issue26_degenerate_operators_give_finite_right_diagonals(kind, method):
    n = 40
    e1 = np.zeros(n)
    e1[0] = 1.0
    u = np.random.default_rng(3).standard_normal(n)
    exact_cases = {"zero": np.zeros((n, n)), "rank one e1": 3.0 * np.outer(e1, e1), "1x1": np.array([[2.5]])}
    if method == "xdiag":  # deflation by a sketch of rank >= the rank is exact
        exact_cases["rank one"] = np.outer(u, u)
    for name, A in exact_cases.items():
        r = curvop.diagonal(operator(A, kind), method=method, num_matvecs=10, seed=0)
        est, err = curvop.arrays.to_numpy(r.estimate), curvop.arrays.to_numpy(r.stderr)
        assert np.all(np.isfinite(est)) and np.all(np.isfinite(err)), name
        assert np.allclose(est, np.diag(A), atol=1e-12), (name, est[:3], np.diag(A)[:3])
    for name, A in {"negative definite": -np.diag(np.arange(1.0, n + 1)), "identity": np.eye(n)}.items():
        r = curvop.diagonal(operator(A, kind), method=method, num_matvecs=10, seed=0)
        assert np.all(np.isfinite(curvop.arrays.to_numpy(r.estimate))), name
        assert np.all(np.isfinite(curvop.arrays.to_numpy(r.stderr))), name


def test_issue26_zero_hessian_of_a_linear_model_with_l1_loss_has_a_zero_diagonal():
    torch = pytest.importorskip("torch")
    from torch_reference import zero_hessian_operator

    H = zero_hessian_operator()
    for method in ("xdiag", "hutchinson"):  # xdiag raised NonFiniteProductError, blaming NaN in the data
        r = curvop.diagonal(H, method=method, num_matvecs=8, seed=0)
        assert torch.equal(r.estimate, torch.zeros(15, dtype=torch.float64)), method
        assert torch.equal(r.stderr, torch.zeros(15, dtype=torch.float64)), method
