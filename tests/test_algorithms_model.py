"""The algorithms on a torch model's HessianOperator, against the dense Hessian from torch.func.

Needs the torch backend (``curvop.hessian`` for a ``torch.nn.Module``); skipped where it is absent.
"""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

import curvop

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    try:
        H = curvop.hessian(model, loss_fn, (x, y))
    except (NotImplementedError, ImportError, ModuleNotFoundError) as err:
        pytest.skip(f"torch backend not available here: {err}")
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def loss_of_flat(flat):
        chunks = torch.split(flat, sizes)
        p = {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}
        return loss_fn(torch.func.functional_call(model, p, (x,)), y)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    dense = torch.func.hessian(loss_of_flat)(flat).numpy()
    assert H.shape == dense.shape == (flat.numel(), flat.numel())  # 123 parameters
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
