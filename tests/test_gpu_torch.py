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
