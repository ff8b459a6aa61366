"""The torch backend on CUDA (run by tests/gpu/run.sh on a GPU machine; skipped elsewhere)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

import curvop  # noqa: E402


def _mlp(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    return model.to(device), (x.to(device), y.to(device))


def test_cuda_products_match_cpu():
    cpu = curvop.hessian(*_with_loss(*_mlp("cpu")))
    gpu = curvop.hessian(*_with_loss(*_mlp("cuda")))
    v = np.random.default_rng(0).standard_normal(cpu.shape[0])
    np.testing.assert_allclose(gpu @ v, cpu @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gpu.to_dense(), cpu.to_dense(), rtol=1e-10, atol=1e-12)


def test_native_cuda_tensor_in_and_out():
    H = curvop.hessian(*_with_loss(*_mlp("cuda")))
    v = torch.randn(H.shape[0], dtype=torch.float64, device="cuda")
    out = H @ v
    assert isinstance(out, torch.Tensor) and out.device == v.device and out.dtype == torch.float64
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, device="cuda")
    out = H.matmat(V)
    assert out.device == V.device and out.shape == V.shape


def test_wrong_device_is_an_error():
    H = curvop.hessian(*_with_loss(*_mlp("cuda")))
    with pytest.raises(ValueError, match="cuda"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)  # a CPU tensor


def _with_loss(model, batch):
    return model, torch.nn.MSELoss(), batch


# --- issue 22: the curvature family and solves on CUDA ---------------------------------------------
def _classifier(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    batches = [(x[:20].to(device), y[:20].to(device)), (x[20:].to(device), y[20:].to(device))]
    return model.to(device), torch.nn.CrossEntropyLoss(), batches


@pytest.mark.parametrize("mode", [dict(hvp="reverse", cache=True), dict(hvp="forward", cache=True),
                                  dict(hvp="reverse", cache=False, batched=True)])
def test_issue22_ggn_fisher_and_jacobian_on_cuda_match_cpu(mode):
    for build in (curvop.ggn, lambda *a, **k: curvop.fisher(*a, kind="empirical", **k),
                  lambda *a, **k: curvop.fisher(*a, seed=0, **k)):
        cpu, gpu = build(*_classifier("cpu"), **mode), build(*_classifier("cuda"), **mode)
        V = torch.randn(cpu.shape[0], 3, dtype=torch.float64)
        out = gpu.matmat(V.cuda())
        assert out.device.type == "cuda"
        ref = cpu.matmat(V)
        if "Monte-Carlo" in repr(cpu):  # CUDA and CPU generators draw different targets: same expectation only
            continue
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    Jc, Jg = curvop.jacobian(_classifier("cpu")[0], torch.ones(4, 5, dtype=torch.float64), **mode), \
        curvop.jacobian(_classifier("cuda")[0], torch.ones(4, 5, dtype=torch.float64, device="cuda"), **mode)
    u = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close((Jg.T @ u.cuda()).cpu(), Jc.T @ u, rtol=1e-10, atol=1e-12)


def test_issue22_solve_and_inverse_keep_cuda_tensors_on_the_gpu():
    model, crit, batches = _classifier("cuda")
    G = curvop.ggn(model, crit, batches)
    b = torch.randn(G.shape[0], 2, dtype=torch.float64, device="cuda")
    r = curvop.solve(G, b, damping=0.1, tol=1e-10)
    assert r.converged and r.x.device.type == "cuda" and r.x.dtype == torch.float64
    dense = torch.from_numpy(G.to_dense()).cuda()
    torch.testing.assert_close(r.x, torch.linalg.solve(dense + 0.1 * torch.eye(G.shape[0], device="cuda",
                                                                               dtype=torch.float64), b),
                               rtol=1e-7, atol=1e-10)
    m = curvop.solve(G, b[:, 0], damping=0.1, method="minres", tol=1e-10)
    assert m.x.device.type == "cuda" and m.converged
    d = curvop.diagonal(curvop.inverse(G, damping=0.1, tol=1e-10), num_matvecs=G.shape[0])
    assert d.estimate.device.type == "cuda"
