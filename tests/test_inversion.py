"""curvop.solve and curvop.inverse against numpy's dense solves, on every array framework."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import curvop
from _matrices import orthogonal

N = 60


def _operator(A: np.ndarray, kind: str):
    """``A`` as numpy, or as an operator over a float64 dense matrix of the framework (native path)."""
    if kind == "numpy":
        return curvop.aslinearoperator(A)
    if kind == "torch":
        torch = pytest.importorskip("torch")
        return curvop.aslinearoperator(torch.as_tensor(A))
    if kind == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        return curvop.aslinearoperator(jax.numpy.asarray(A))
    tf = pytest.importorskip("tensorflow")
    return curvop.aslinearoperator(tf.constant(A))


def _is_native(x, kind: str) -> bool:
    return type(x).__module__.split(".")[0] in {"numpy": ("numpy",), "torch": ("torch",), "jax": ("jax", "jaxlib"),
                                                "tensorflow": ("tensorflow",)}[kind]


def _spd(seed: int = 0, lo: float = -3, hi: float = 1) -> np.ndarray:
    U = orthogonal(N, seed)
    return (U * np.logspace(lo, hi, N)) @ U.T


def _indefinite(seed: int = 0) -> np.ndarray:
    U = orthogonal(N, seed)
    return (U * np.linspace(-1.0, 2.0, N)) @ U.T


def _true_residual(A, damping, x, b):
    return np.linalg.norm(b - (A + damping * np.eye(N)) @ x, axis=0) / np.linalg.norm(b, axis=0)


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax", "tensorflow"])
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_solve_matches_the_dense_solve_on_every_framework(kind, method):
    A = _spd()
    H = _operator(A, kind)
    b = np.random.default_rng(1).standard_normal((N, 3))
    r = curvop.solve(H, H.native(b), damping=0.05, method=method, tol=1e-10)
    assert _is_native(r.x, kind) and r.converged and r.x.shape == (N, 3)
    x = curvop.arrays.to_numpy(r.x)
    np.testing.assert_allclose(x, np.linalg.solve(A + 0.05 * np.eye(N), b), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(r.residual, _true_residual(A, 0.05, x, b), rtol=1e-3, atol=1e-14)
    assert np.all(r.residual <= 1e-10)
    one = curvop.solve(H, H.native(b[:, 0]), damping=0.05, method=method, tol=1e-10)
    assert _is_native(one.x, kind) and one.x.shape == (N,) and isinstance(one.residual, float)


def test_numpy_in_numpy_out_and_counts():
    A = _spd()
    r = curvop.solve(A, np.ones(N), damping=0.1)
    assert isinstance(r.x, np.ndarray)
    assert r.num_matvecs == r.iterations + 1  # one product per iteration and the final residual check
    assert "SolveResult(method='cg'" in repr(r)


def test_minres_solves_an_indefinite_system_and_cg_refuses_it():
    A = _indefinite()
    b = np.random.default_rng(2).standard_normal(N)
    with pytest.raises(curvop.NegativeCurvatureError, match="method='minres'.*or a damping above") as err:
        curvop.solve(A, b)
    assert err.value.direction_curvature < 0
    assert isinstance(err.value, curvop.IndefiniteOperatorError)
    r = curvop.solve(A, b, method="minres", tol=1e-10)
    assert r.converged
    np.testing.assert_allclose(r.x, np.linalg.solve(A, b), rtol=1e-6, atol=1e-8)
    # enough damping makes it positive definite, and CG then solves it
    r = curvop.solve(A, b, damping=1.5, tol=1e-10)
    np.testing.assert_allclose(r.x, np.linalg.solve(A + 1.5 * np.eye(N), b), rtol=1e-7)


def test_never_a_wrong_x_marked_converged():
    """On a budget too small, ``converged`` is False, a warning says so, and ``residual`` is the true one."""
    A = _spd(lo=-4, hi=2)
    b = np.random.default_rng(3).standard_normal(N)
    for method in ("cg", "minres"):
        with pytest.warns(curvop.ConvergenceWarning, match="raise max_matvecs or damping"):
            r = curvop.solve(A, b, method=method, max_matvecs=5, tol=1e-10)
        assert not r.converged
        assert r.residual == pytest.approx(_true_residual(A, 0.0, r.x, b), rel=1e-8)


def test_warm_start_saves_products():
    A = _spd()
    b = np.random.default_rng(4).standard_normal(N)
    cold = curvop.solve(A, b, damping=0.01, tol=1e-10)
    near = cold.x + 1e-6 * np.random.default_rng(5).standard_normal(N)
    warm = curvop.solve(A, b, damping=0.01, tol=1e-10, x0=near)
    assert warm.converged and warm.num_matvecs < cold.num_matvecs / 2
    exact = curvop.solve(A, b, damping=0.01, tol=1e-8, x0=np.linalg.solve(A + 0.01 * np.eye(N), b))
    assert exact.iterations == 0 and exact.num_matvecs == 1


def test_inverse_operator_and_laplace_variances():
    A = _spd()
    Ainv = curvop.inverse(A, damping=0.5, tol=1e-12)
    dense = np.linalg.inv(A + 0.5 * np.eye(N))
    np.testing.assert_allclose(Ainv.to_dense(), dense, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(curvop.diagonal(Ainv, num_matvecs=N).estimate, np.diag(dense), rtol=1e-9)
    assert Ainv.last.converged and "InverseOperator" in repr(Ainv)
    assert not Ainv.is_psd  # a plain matrix is not known to be PSD
    lam = curvop.eigenvalues(curvop.inverse(A, damping=1e-3, tol=1e-12), k=1, tol=1e-8, seed=0).eigenvalues[0]
    assert lam == pytest.approx(1 / (1e-3 + 1e-3), rel=1e-6)


def test_options_are_checked():
    A = _spd()
    with pytest.raises(ValueError, match="method must be 'cg' or 'minres'"):
        curvop.solve(A, np.ones(N), method="gmres")
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        curvop.inverse(A, damping=-1.0)
    with pytest.raises(ValueError, match="tol must be a relative residual"):
        curvop.solve(A, np.ones(N), tol=0)
    with pytest.raises(ValueError, match=r"b must have shape \(60,\)"):
        curvop.solve(A, np.ones(N + 1))
    with pytest.raises(ValueError, match="x0 must have b's shape"):
        curvop.solve(A, np.ones(N), x0=np.ones((N, 2)))


def test_inverse_of_a_torch_ggn_matches_the_dense_solve():
    torch = pytest.importorskip("torch")
    from curvature_reference import dense_ggn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    G = curvop.ggn(model, torch.nn.CrossEntropyLoss(), [(x[:20], y[:20]), (x[20:], y[20:])], cache=True)
    assert G.is_psd and curvop.inverse(G, damping=0.1).is_psd
    dense = dense_ggn(model, torch.nn.CrossEntropyLoss(), [(x, y)])
    b = torch.randn(43, 2, dtype=torch.float64)
    r = curvop.solve(G, b, damping=0.1, tol=1e-10)
    assert isinstance(r.x, torch.Tensor) and r.converged
    np.testing.assert_allclose(r.x.numpy(), np.linalg.solve(dense + 0.1 * np.eye(43), b.numpy()), rtol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the normal path
        Finv = curvop.inverse(G, damping=0.1, tol=1e-10)
        np.testing.assert_allclose((Finv @ b[:, 0]).numpy(), r.x[:, 0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_float32_drift_is_caught_by_the_true_residual(method):
    """In float32 on a condition number of 1e5 the recursive residuals of CG and MINRES fall below
    ``tol`` long before the true residual does (MINRES's true one stays above 0.1): the reported
    residual is the true one, recomputed from ``x``, and ``converged`` follows it."""
    torch = pytest.importorskip("torch")
    A = _spd(lo=-3, hi=2)
    b = np.random.default_rng(0).standard_normal(N)
    H = curvop.aslinearoperator(torch.as_tensor(A, dtype=torch.float32))
    with pytest.warns(curvop.ConvergenceWarning):
        r = curvop.solve(H, torch.as_tensor(b, dtype=torch.float32), method=method, tol=1e-6, max_matvecs=3000)
    true = _true_residual(A, 0.0, r.x.double().numpy(), b)
    assert not r.converged and true > 1e-4
    assert r.residual == pytest.approx(true, rel=0.05)


def test_minres_on_a_singular_inconsistent_system_reports_it_and_returns_its_best_iterate():
    """``b`` has a component in the null space: no ``x`` has a small residual. MINRES stops at the
    least-squares solution (its iterates would otherwise grow without bound once the range is
    exhausted: the true residual of the iterate after 400 products was back above ‖b‖)."""
    U = orthogonal(N, 4)
    lam = np.linspace(-1.0, 2.0, N)
    lam[:3] = 0.0  # a three-dimensional null space
    A = (U * lam) @ U.T
    b = np.random.default_rng(6).standard_normal(N)
    floor = np.linalg.norm(U[:, :3].T @ b) / np.linalg.norm(b)  # the least-squares residual
    with pytest.warns(curvop.ConvergenceWarning):
        r = curvop.solve(A, b, method="minres", tol=1e-8, max_matvecs=400)
    assert not r.converged and floor - 1e-9 <= r.residual <= 1.01 * floor
    assert r.residual == pytest.approx(_true_residual(A, 0.0, r.x, b), rel=1e-6)
