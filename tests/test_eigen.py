import warnings

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator

import curvop
from curvop.krylov import lanczos_tridiag
from _matrices import KINDS, is_native, operator, wishart, with_spectrum

pytest.importorskip("torch")


@pytest.mark.parametrize("kind", KINDS)
def test_lanczos_top_eigenvalue_with_20_matvecs(kind):
    A, ev = wishart()
    H = operator(A, kind)
    errs = []
    for seed in range(20):
        r = curvop.eigenvalues(H, k=1, max_matvecs=20, verify=False, seed=seed)
        assert r.num_matvecs == 20
        errs.append(abs(r.eigenvalues[0] - ev[0]) / ev[0])
    assert np.median(errs) <= 1e-3


def test_power_iteration_baseline_is_much_worse_at_20_matvecs():
    A, ev = wishart()
    errs = [abs(curvop.eigenvalues(A, 1, "LM", method="power", max_matvecs=20, seed=s).eigenvalues[0] - ev[0]) / ev[0]
            for s in range(20)]
    assert 5e-3 < np.median(errs) < 1e-1  # about 3e-2, PyHessian's regime


@pytest.mark.parametrize("kind", KINDS)
def test_top5_within_100_matvecs(kind):
    A, ev = wishart()
    r = curvop.eigenvalues(operator(A, kind), k=5, max_matvecs=95, seed=3)
    assert r.num_matvecs <= 100
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, ev[:5], rtol=1e-6)
    assert is_native(r.eigenvectors, kind) and tuple(r.eigenvectors.shape) == (1000, 5)
    V = curvop.arrays.to_numpy(r.eigenvectors)
    np.testing.assert_allclose(V.T @ V, np.eye(5), atol=1e-8)
    true_res = np.linalg.norm(A @ V - V * r.eigenvalues, axis=0)
    np.testing.assert_allclose(r.residual_norms, true_res, rtol=1e-6, atol=1e-9 * ev[0])
    assert np.all(true_res <= 1e-6 * np.abs(r.eigenvalues))


def _saddle(n=400):
    lam = np.concatenate([[-3.0, -1.5, -0.7], np.linspace(0.0, 10.0, n - 3)])
    return with_spectrum(tuple(lam), seed=1), np.sort(lam)


@pytest.mark.parametrize("kind", KINDS)
def test_smallest_algebraic_finds_negative_curvature(kind):
    A, lam = _saddle()
    r = curvop.eigenvalues(operator(A, kind), k=3, which="SA", seed=0)
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, lam[:3], rtol=1e-6)
    v = curvop.arrays.to_numpy(r.eigenvectors[:, 0])
    assert v @ A @ v < 0


@pytest.mark.parametrize("kind", KINDS)
def test_largest_magnitude_and_algebraic(kind):
    lam = np.concatenate([[-12.0], np.linspace(-1.0, 5.0, 199)])
    A = with_spectrum(tuple(lam), seed=2)
    H = operator(A, kind)
    np.testing.assert_allclose(curvop.eigenvalues(H, 2, "LM", seed=0).eigenvalues, [-12.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(curvop.eigenvalues(H, 1, "LA", seed=0).eigenvalues, [5.0], rtol=1e-6)


def test_thick_restart_with_small_basis_converges():
    A, ev = wishart(300, seed=4)
    r = curvop.eigenvalues(A, k=4, ncv=9, max_matvecs=2000, seed=0)
    assert r.converged and r.num_matvecs > 9  # several restarts happened
    np.testing.assert_allclose(r.eigenvalues, ev[:4], rtol=1e-6)


def test_multiple_eigenvalues_found_after_invariant_subspace():
    # Lanczos from one vector sees each distinct eigenvalue once; the double top eigenvalue
    # needs the fresh-direction continuation after breakdown.
    A = np.diag(np.r_[5.0, 5.0, 3.0, 3.0, 1.0, np.full(45, 0.5)])
    r = curvop.eigenvalues(A, k=3, seed=0)
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, [5.0, 5.0, 3.0], rtol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_power_iteration_deflation_finds_top_three(kind):
    lam = np.concatenate([[10.0, 6.0, 3.0], np.linspace(0.0, 1.0, 97)])
    A = with_spectrum(tuple(lam), seed=3)
    r = curvop.eigenvalues(operator(A, kind), k=3, which="LM", method="power", tol=1e-8, max_matvecs=600, seed=0)
    assert r.converged and r.method == "power"
    np.testing.assert_allclose(r.eigenvalues, lam[:3], rtol=1e-7)
    assert np.all(r.residual_norms <= 1e-7 * lam[:3])
    assert is_native(r.eigenvectors, kind)


def test_accepts_scipy_operator_and_callable():
    A = np.diag(np.arange(1.0, 51.0))
    lo = LinearOperator((50, 50), matvec=lambda v: A @ v, dtype=np.float64)
    assert np.isclose(curvop.eigenvalues(lo, seed=0).eigenvalues[0], 50.0)
    r = curvop.eigenvalues(curvop.aslinearoperator(lambda v: A @ v, shape=(50, 50)), k=2, seed=0)
    np.testing.assert_allclose(r.eigenvalues, [50.0, 49.0])


def test_seed_reproducible_and_same_across_frameworks():
    A, _ = wishart()
    a = curvop.eigenvalues(A, max_matvecs=15, verify=False, seed=7).eigenvalues
    b = curvop.eigenvalues(operator(A, "torch"), max_matvecs=15, verify=False, seed=7).eigenvalues
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_lanczos_tridiag_is_exact_on_full_space():
    lam = np.linspace(-2.0, 3.0, 30)
    A = with_spectrum(tuple(lam), seed=5)
    (run,), Q = lanczos_tridiag(A, np.random.default_rng(0).standard_normal(30), 30, return_basis=True)
    a, b = run.alpha, run.beta
    T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), lam, atol=1e-10)
    np.testing.assert_allclose(Q.T @ Q, np.eye(30), atol=1e-12)


def test_bad_input_is_a_clear_error():
    A = np.eye(10)
    with pytest.raises(ValueError, match="k must"):
        curvop.eigenvalues(A, k=11)
    with pytest.raises(ValueError, match="square"):
        curvop.eigenvalues(np.ones((4, 5)))
    with pytest.raises(ValueError, match="too small"):
        curvop.eigenvalues(A, k=3, max_matvecs=2)
    with pytest.raises(ValueError, match="which"):
        curvop.eigenvalues(A, which="XX")
    with pytest.raises(ValueError, match="which='LM'"):
        curvop.eigenvalues(A, method="power")
    with pytest.raises(ValueError, match="method"):
        curvop.eigenvalues(A, method="qr")


def test_issue13_item5_restart_frees_the_old_product_before_the_next_one():
    # The one recurrence (curvop.krylov) drops the previous product W as soon as the next Lanczos
    # vector is formed; the old _lanczos kept it alive through the next product after every thick
    # restart, one model-sized vector above the ncv + k + 3 docs/scale.md stated then (9 for ncv=4, k=1).
    from test_scale_memory import N, _flat, _peak_vectors

    H = curvop.HessianOperator.from_hvp(lambda v: _flat * v, np.zeros(N))  # slow: restarts every step
    peak, r = _peak_vectors(lambda: curvop.eigenvalues(H, k=1, ncv=4, tol=1e-12, max_matvecs=40, seed=0))
    assert r.num_matvecs == 40
    assert peak <= 4 + 1 + 3 + 0.25, peak


def test_issue15_eigenvalues_k1_large_model_default_peaks_at_6_vectors():
    """GPT-2 small's default call: ncv = 4 (``max_basis_bytes`` default = 4 vectors), k = 1.

    The Lanczos vector is a view of its basis row (``Basis.newest``) instead of a second copy, and
    the old product is freed at restarts, and a reorthogonalisation forms ``w - correction`` in the
    correction's storage: the algorithm holds ncv + k + 1 = 6 vectors, 9 before. On GPT-2 small
    (0.5 GB vectors) see docs/performance.md for the measured peak (GPT-2 is too large for the tests).
    """
    from test_scale_memory import N, VEC, _flat, _peak_vectors

    H = curvop.HessianOperator.from_hvp(lambda v: _flat * v, np.zeros(N))
    peak, r = _peak_vectors(lambda: curvop.eigenvalues(H, k=1, tol=1e-12, max_matvecs=40, max_basis_bytes=4 * VEC,
                                                       seed=0))
    assert r.num_matvecs == 40
    assert peak <= 4 + 1 + 1 + 0.25, peak


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


# --- issue 26: a start vector never confines the solve; degenerate operators -----------------------------
def _spread_spectrum(n=200, seed=0):
    U = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    lam = np.linspace(60.0, 0.0, n)  # gaps of 0.3 at the top
    return (U * lam) @ U.T, U, lam


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tol_on", ["residual", "eigenvalue"])
@pytest.mark.parametrize("k", [1, 2])
def test_issue26_an_exact_eigenvector_of_lambda2_as_v0_still_finds_lambda1(kind, tol_on, k):
    # v0 = v(λ₂) (k=1) or [v(λ₂), v(λ₃)] (k=2) returned λ₂ (and λ₂, λ₃) with converged=True: the start's random
    # share (sqrt(eps)) was too small to show λ₁ before the residual test passed
    A, U, lam = _spread_spectrum()
    H = operator(A, kind)
    for seed in range(5):
        r = curvop.eigenvalues(H, k=k, v0=U[:, 1:1 + k], seed=seed, tol_on=tol_on)
        assert r.converged
        assert np.allclose(r.eigenvalues, lam[:k], rtol=1e-6, atol=0), (seed, r.eigenvalues, lam[:k])


@pytest.mark.parametrize("tol_on", ["residual", "eigenvalue"])
def test_issue26_a_good_warm_start_still_saves_products(tol_on):
    A, U, lam = _spread_spectrum()
    cold = curvop.eigenvalues(A, seed=0, tol_on=tol_on)
    warm = curvop.eigenvalues(A, v0=U[:, 0] + 0.05 * U[:, 1], seed=0, tol_on=tol_on)
    assert warm.converged and warm.eigenvalues[0] == pytest.approx(60.0, rel=1e-6)
    assert warm.num_matvecs < cold.num_matvecs


def _degenerate_eigen(n=30):
    e1 = np.zeros(n)
    e1[0] = 1.0
    u = np.random.default_rng(3).standard_normal(n)
    return {"zero": np.zeros((n, n)), "rank one": np.outer(u, u), "negative rank one": -3.0 * np.outer(e1, e1),
            "negative definite": -np.diag(np.arange(1.0, n + 1)), "1x1": np.array([[2.5]]),
            "1x1 negative": np.array([[-2.0]]), "1x1 zero": np.array([[0.0]])}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(_degenerate_eigen()))
def test_issue26_degenerate_operators_give_finite_right_eigenvalues(kind, name):
    A = _degenerate_eigen()[name]
    exact = np.linalg.eigvalsh(A)
    n = A.shape[0]
    H = operator(A, kind)
    calls = [(which, "lanczos", k) for which in ("LA", "SA", "LM") for k in sorted({1, min(2, n)})] + [("LM", "power", 1)]
    for which, method, k in calls:
        budget = 3000 if method == "power" else None  # power iteration on -diag(1..30): ratio 29/30 per step
        r = curvop.eigenvalues(H, k=k, which=which, method=method, seed=0, max_matvecs=budget)
        want = {"LA": exact[::-1], "SA": exact, "LM": exact[np.argsort(-np.abs(exact), kind="stable")]}[which][:k]
        assert r.converged and np.all(np.isfinite(r.eigenvalues)), (which, method, k, r)
        assert np.allclose(np.abs(r.eigenvalues) if which == "LM" else r.eigenvalues,
                           np.abs(want) if which == "LM" else want, atol=1e-8 * max(1.0, np.abs(exact).max())), \
            (which, method, k, r.eigenvalues, want)
    sd = curvop.spectral_density(H, num_steps=10, num_probes=2, seed=0)
    if not np.any(A - np.diag(np.diag(A))):  # diagonal: the Rademacher probes' quadrature is exact
        assert sd.trace() == pytest.approx(np.trace(A), abs=1e-8 * max(1.0, np.abs(A).max() * n))
    grid, values = sd.density()
    assert np.all(np.isfinite(values)) and abs(np.trapezoid(values, grid) - 1.0) < 1e-3


def test_issue26_k_equal_to_n_gives_the_whole_spectrum():
    A = np.diag([3.0, -1.0, 2.0])
    r = curvop.eigenvalues(A, k=3, seed=0)
    assert r.converged and np.allclose(r.eigenvalues, [3.0, 2.0, -1.0])
    with pytest.raises(ValueError, match=r"1 <= k <= n = 3"):
        curvop.eigenvalues(A, k=4)
