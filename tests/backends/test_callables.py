"""HessianOperator.from_hvp / from_grad on numpy arrays (codes without autodiff)."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import curvop
from curvop import HessianOperator

EPS = np.finfo(np.float64).eps


@pytest.fixture
def quad():
    rng = np.random.default_rng(0)
    n = 40
    G = rng.standard_normal((n, n))
    A = G @ G.T / n + np.eye(n)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n)
    return A, b, x0, rng


def test_from_hvp_exact(quad):
    A, _, x0, rng = quad
    H = HessianOperator.from_hvp(lambda v: A @ v, x0)
    assert H.shape == (40, 40) and H.dtype == np.float64
    v = rng.standard_normal(40)
    np.testing.assert_allclose(H @ v, A @ v, rtol=0, atol=0)
    V = rng.standard_normal((40, 3))
    np.testing.assert_allclose(H.matmat(V), A @ V, rtol=1e-14)
    np.testing.assert_allclose(H.to_dense(), A, rtol=1e-14)


def test_from_hvp_matmat_fn(quad):
    A, _, x0, rng = quad
    calls = []
    H = HessianOperator.from_hvp(lambda v: A @ v, x0, matmat_fn=lambda V: calls.append(1) or A @ V)
    V = rng.standard_normal((40, 4))
    np.testing.assert_allclose(H.matmat(V), A @ V, rtol=1e-14)
    assert calls == [1]


def _rounding_bound(A, b, x0, v, step, factor=1.0):
    """Documented rounding term eps * G / s * |v| (plus a safety constant sqrt(n))."""
    s = step * max(1.0, np.linalg.norm(x0))
    G = np.linalg.norm(A, 2) * np.linalg.norm(x0) + np.linalg.norm(A @ x0 - b)
    return factor * np.sqrt(len(x0)) * EPS * G / s * np.linalg.norm(v)


def test_from_grad_quadratic_within_rounding_bound(quad):
    A, b, x0, rng = quad
    H = HessianOperator.from_grad(lambda x: A @ x - b, x0)
    step = H.backend.finite_difference.step
    assert step == pytest.approx(EPS ** (1 / 3))
    for _ in range(3):
        v = rng.standard_normal(40) * 10.0 ** rng.uniform(-3, 3)
        err = np.linalg.norm(H @ v - A @ v)
        assert err <= _rounding_bound(A, b, x0, v, step)
        assert err / np.linalg.norm(A @ v) < 1e-9  # near rounding level
    Hr = HessianOperator.from_grad(lambda x: A @ x - b, x0, richardson=True)
    v = rng.standard_normal(40)
    assert np.linalg.norm(Hr @ v - A @ v) <= _rounding_bound(A, b, x0, v, Hr.backend.finite_difference.step, 3)


def test_from_grad_quartic_error_is_order_h2_and_richardson_better():
    # f = sum(x**4) / 4: g = x**3, H = diag(3 x**2); the central difference is exactly
    # 3 x**2 v + t**2 v**3, so the error is t**2 |v**3| with t the step per unit of v.
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(30)
    v = rng.standard_normal(30)
    exact = 3 * x0**2 * v
    scale = max(1.0, np.linalg.norm(x0))
    errs = []
    for step in (1e-2, 5e-3):
        H = HessianOperator.from_grad(lambda x: x**3, x0, step=step)
        t = step * scale / np.linalg.norm(v)
        err = np.linalg.norm(H @ v - exact)
        assert err == pytest.approx(t**2 * np.linalg.norm(v**3), rel=1e-6)
        errs.append(err)
    assert errs[0] / errs[1] == pytest.approx(4.0, rel=1e-4)  # O(h^2)
    Hc = HessianOperator.from_grad(lambda x: x**3, x0)
    Hr = HessianOperator.from_grad(lambda x: x**3, x0, richardson=True)
    err_c, err_r = np.linalg.norm(Hc @ v - exact), np.linalg.norm(Hr @ v - exact)
    assert err_r < err_c / 10
    assert err_c / np.linalg.norm(exact) < 1e-8


def test_from_grad_logistic_orders():
    # logistic regression loss: its gradient is not polynomial, so Richardson's error is O(h^4).
    rng = np.random.default_rng(2)
    X = rng.standard_normal((60, 8))
    y = (rng.random(60) < 0.5).astype(float)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    grad = lambda w: X.T @ (sig(X @ w) - y) / len(y)  # noqa: E731
    w0 = rng.standard_normal(8)
    p = sig(X @ w0)
    Hexact = X.T @ (X * (p * (1 - p))[:, None]) / len(y)
    v = rng.standard_normal(8)
    err = lambda H: np.linalg.norm(H @ v - Hexact @ v)  # noqa: E731
    e1 = err(HessianOperator.from_grad(grad, w0, step=4e-2))
    e2 = err(HessianOperator.from_grad(grad, w0, step=2e-2))
    assert 3.5 < e1 / e2 < 4.5  # truncation O(h^2)
    r1 = err(HessianOperator.from_grad(grad, w0, step=4e-2, richardson=True))
    r2 = err(HessianOperator.from_grad(grad, w0, step=2e-2, richardson=True))
    assert 12 < r1 / r2 < 20  # O(h^4)
    assert r1 < e1 / 100
    # defaults: near eps**(2/3) and better with Richardson
    ec, er = err(HessianOperator.from_grad(grad, w0)), err(HessianOperator.from_grad(grad, w0, richardson=True))
    assert ec / np.linalg.norm(Hexact @ v) < 1e-9
    assert er < ec


def test_scipy_solvers_on_from_grad_and_from_hvp(quad):
    A, b, x0, _ = quad
    ref = np.linalg.eigvalsh(A)[-3:]
    for H in (HessianOperator.from_hvp(lambda v: A @ v, x0), HessianOperator.from_grad(lambda x: A @ x - b, x0)):
        w = np.sort(sla.eigsh(H, k=3, which="LA", return_eigenvectors=False))
        np.testing.assert_allclose(w, ref, rtol=1e-8)
        x, info = sla.cg(H, b, rtol=1e-10)
        assert info == 0
        np.testing.assert_allclose(A @ x, b, atol=1e-6)


def test_float32_x0():
    A = np.diag(np.arange(1.0, 6.0)).astype(np.float32)
    H = HessianOperator.from_grad(lambda x: A @ x, np.ones(5, np.float32))
    assert H.dtype == np.float32
    assert H.backend.finite_difference.step == pytest.approx(np.finfo(np.float32).eps ** (1 / 3))
    np.testing.assert_allclose(H @ np.ones(5, np.float32), np.arange(1.0, 6.0), rtol=1e-3)


def test_zero_vector():
    H = HessianOperator.from_grad(lambda x: x**3, np.ones(3))
    np.testing.assert_array_equal(H @ np.zeros(3), np.zeros(3))


def test_errors():
    with pytest.raises(ValueError, match="1-D"):
        HessianOperator.from_hvp(lambda v: v, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="1-D"):
        HessianOperator.from_grad(lambda v: v, np.float64(1.0))
    with pytest.raises(TypeError, match="floating"):
        HessianOperator.from_hvp(lambda v: v, np.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="callable"):
        HessianOperator.from_hvp(None, np.zeros(3))
    with pytest.raises(ValueError, match="step"):
        HessianOperator.from_grad(lambda v: v, np.zeros(3), step=0.0)
    H = HessianOperator.from_hvp(lambda v: np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match=r"hvp_fn returned shape \(4,\).*\(3,\)"):
        H @ np.ones(3)
    H = HessianOperator.from_grad(lambda x: x.tolist(), np.zeros(3))
    with pytest.raises(TypeError, match="grad_fn returned a builtins.list"):
        H @ np.ones(3)
    H = HessianOperator.from_hvp(lambda v: v, np.zeros(3))
    with pytest.raises(ValueError, match="length 3"):
        H @ np.ones(4)


def test_no_autodiff_registry_entries():
    with pytest.raises(TypeError, match="from_hvp"):
        curvop.backends.get("numpy")(None, None, None)
    with pytest.raises(TypeError, match="backend='jax'"):
        curvop.hessian_of(lambda w: (w**2).sum(), np.ones(3))


def test_import_curvop_does_not_import_jax_or_cupy():
    import subprocess
    import sys

    code = "import sys, curvop; print(sorted(m for m in ('jax', 'cupy', 'torch', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
