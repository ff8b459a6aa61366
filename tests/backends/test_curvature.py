"""The template of the curvature family (curvop/backends/curvature.py), on a numpy backend written by
hand: a linear model ``f = X W`` (``J`` known exactly) with the squared error, over unequal batches."""

from __future__ import annotations

import numpy as np
import pytest

from curvop.backends.curvature import CurvatureBackend, Linearization, mc_batch_seed
from curvop.backends.dataset import Dataset
from curvop.backends.template import ParamInfo
from curvop.operator import HessianOperator


class Linear(CurvatureBackend):
    """``f = X W`` (``W`` is ``(d, c)``, flattened row-major), ``L = mean_n ‖f_n − y_n‖² / 2``."""

    name = "numpy-linear"

    def __init__(self, W, data, curvature, reduction="mean", **family):
        self._curvature_options(curvature, **family)
        self._begin(Dataset(data, reduction), [ParamInfo("W", "float64", "cpu")])
        self.W, self.size, self.dtype, self.device = W, W.size, W.dtype, "cpu"
        self._complete()

    def _jacobian(self, batch, cached):
        X, d, c = batch[0], *self.W.shape

        def jvp(v, batched):
            V = v.reshape(d, c) if not batched else v.T.reshape(-1, d, c)
            return X @ V

        def vjp(u, batched):
            return (X.T @ u).reshape(-1) if not batched else np.stack([(X.T @ ui).reshape(-1) for ui in u], 1)

        return Linearization(X @ self.W, jvp, vjp)

    def _scale(self, f):
        return 1 / len(f) if self.dataset.reduction == "mean" else 1

    def _output_hvp(self, f, batch):
        return lambda u, batched: u * self._scale(f)

    def _output_grad(self, f, batch, targets=None):
        return (f - (batch[1] if targets is None else targets)) * self._scale(f)

    def _sample_targets(self, f, batch, seed, variance):
        rng = np.random.default_rng(seed)
        return [f + np.sqrt(variance) * rng.standard_normal(f.shape) for _ in range(self.mc_samples)]

    def is_native(self, x):
        return isinstance(x, np.ndarray)

    def from_numpy(self, a):
        return np.asarray(a, dtype=self.dtype)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    X, Y, W = rng.standard_normal((13, 3)), rng.standard_normal((13, 2)), rng.standard_normal((3, 2))
    batches = [(X[:6], Y[:6]), (X[6:11], Y[6:11]), (X[11:], Y[11:])]
    J = np.kron(X, np.eye(2))  # rows (sample, output), columns W flattened row-major
    return W, X, Y, batches, J


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_and_empirical_fisher_over_unequal_batches(problem, reduction):
    W, X, Y, batches, J = problem
    c = 1 / len(X) if reduction == "mean" else 1
    G = HessianOperator(Linear(W, batches, "ggn", reduction)).to_dense()
    np.testing.assert_allclose(G, c * J.T @ J, rtol=1e-13)
    grads = np.stack([np.kron(x, r) for x, r in zip(X, X @ W - Y)])  # ∇ℓₙ = xₙ ⊗ (fₙ − yₙ)
    E = HessianOperator(Linear(W, batches, "empirical", reduction)).to_dense()
    np.testing.assert_allclose(E, c * grads.T @ grads, rtol=1e-12)


def test_monte_carlo_fisher_expectation_and_seeds(problem):
    W, X, Y, batches, J = problem
    G = J.T @ J / len(X)
    F = HessianOperator(Linear(W, batches, "mc", likelihood="gaussian", mc_samples=4000, seed=0)).to_dense()
    assert np.abs(F - G).max() < 0.1 * np.abs(G).max()  # 4000 draws: a few per cent
    F2 = HessianOperator(Linear(W, batches, "mc", likelihood="gaussian", mc_samples=4000, seed=0)).to_dense()
    assert np.array_equal(F, F2)
    assert mc_batch_seed(0, 1) != mc_batch_seed(0, 2) != mc_batch_seed(1, 2)


def test_the_jacobian_over_the_data(problem):
    W, X, Y, batches, J = problem
    B = Linear(W, batches, "jacobian", "sum")
    assert sum(m for m, _ in B.rows()) == J.shape[0]
    v, u = np.arange(6.0), np.arange(26.0)
    np.testing.assert_allclose(B.jvp(v), J @ v, rtol=1e-13)
    np.testing.assert_allclose(B.vjp(u), J.T @ u, rtol=1e-13)
    V = np.stack([v, v + 1], 1)
    np.testing.assert_allclose(B.jvp(V, True), J @ V, rtol=1e-13)
    np.testing.assert_allclose(B.vjp(np.stack([u, -u], 1), True), J.T @ np.stack([u, -u], 1), rtol=1e-13)
    np.testing.assert_allclose(HessianOperator(B).to_dense(), J.T @ J, rtol=1e-13)  # the square one: JᵀJ


def test_options_are_checked(problem):
    W, X, Y, batches, J = problem
    with pytest.raises(ValueError, match="curvature must be one of"):
        Linear(W, batches, "hessian")
    with pytest.raises(ValueError, match="likelihood= one of them"):
        Linear(W, batches, "mc", likelihood="poisson")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        Linear(W, batches, "mc", likelihood="gaussian", mc_samples=1.5)
    with pytest.raises(TypeError, match="seed must be a non-negative int"):
        Linear(W, batches, "mc", likelihood="gaussian", seed=-1)


def test_the_jacobian_refuses_data_that_changed_since_it_was_built(problem):
    W, X, Y, batches, J = problem
    data = list(batches)
    B = Linear(W, data, "jacobian", "sum")
    B.rows()
    data.append(batches[0])  # one batch more: the operator's row count would be wrong
    with pytest.raises(ValueError, match="yielded more than the 3 batches the Jacobian was built over"):
        B.jvp(np.ones(6))
    data[:] = [batches[1], batches[0], batches[2]]  # another order: batch 0 now has 5 samples, not 6
    with pytest.raises(ValueError, match="other batches than when the Jacobian was built"):
        B.vjp(np.ones(26))
    data[:] = batches[:2]  # one batch fewer
    with pytest.raises(ValueError, match="yielded 2 batches, but the Jacobian was built over 3"):
        B.jvp(np.ones(6))
