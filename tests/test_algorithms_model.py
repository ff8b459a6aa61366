"""The algorithms on a torch model's HessianOperator, against the dense Hessian from torch.func.

Needs torch (skipped where it is not installed).
"""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

import curvop

torch = pytest.importorskip("torch")
from torch_reference import dense_hessian  # noqa: E402


@pytest.fixture(scope="module")
def model_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y))  # torch is installed: any error here is a failure
    dense = dense_hessian(model, loss_fn, [(x, y)])
    n = sum(p.numel() for p in model.parameters())
    assert H.shape == dense.shape == (n, n) == (123, 123)
    return H, (dense + dense.T) / 2


def test_operator_matches_dense_hessian(model_hessian):
    H, D = model_hessian
    v = np.random.default_rng(0).standard_normal(D.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-8, atol=1e-10)


def test_eigenvalues_on_the_model(model_hessian):
    H, D = model_hessian
    ev = np.linalg.eigvalsh(D)
    top = curvop.eigenvalues(H, k=3, seed=0)
    assert top.converged and isinstance(top.eigenvectors, torch.Tensor)
    np.testing.assert_allclose(top.eigenvalues, ev[::-1][:3], rtol=1e-6)
    low = curvop.eigenvalues(H, k=1, which="SA", seed=0)
    np.testing.assert_allclose(low.eigenvalues, ev[:1], rtol=1e-5, atol=1e-8 * ev[-1])


def test_trace_on_the_model(model_hessian):
    H, D = model_hessian
    tr = np.trace(D)
    for method in ("hutchinson", "hutch++", "xtrace"):
        r = curvop.trace(H, method=method, num_matvecs=60, seed=0)
        assert abs(r.estimate - tr) <= 3 * r.stderr + 1e-8 * abs(tr), (method, r, tr)


def test_density_on_the_model(model_hessian):
    H, D = model_hessian
    ev = np.linalg.eigvalsh(D)
    sd = curvop.spectral_density(H, num_steps=60, seed=0)
    w1 = wasserstein_distance(sd.nodes[0], ev, u_weights=sd.weights[0])
    assert w1 <= 0.02 * (ev.max() - ev.min())
    grid, values = sd.density()
    assert abs(np.trapezoid(values, grid) - 1.0) < 1e-3
