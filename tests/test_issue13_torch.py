"""Issue 13, torch side: TorchBackend is the template (curvop.backends.template.AutodiffBackend) plus
torch's autodiff; what the template gives every framework works on torch too (float64 references)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import curvop  # noqa: E402
from curvop.backends.template import AutodiffBackend  # noqa: E402

F64 = torch.float64


class _Cube(torch.autograd.Function):
    """``x**3`` whose second derivative calls ``.item()``: fine per vector, no batching rule under vmap."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Square3.apply(x) * g


class _Square3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 3 * x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 6 * x * g * (1.0 if g.abs().max().item() >= 0 else 0.0)  # .item(): vmap cannot batch it


def test_issue13_torch_backend_is_the_template():
    w = torch.linspace(-1, 1, 4, dtype=F64)
    H = curvop.hessian_of(lambda w: (w ** 4).sum(), w)
    assert isinstance(H.backend, AutodiffBackend)
    assert H.backend.is_main_process()  # the template's answer without a collective
    np.testing.assert_allclose(H @ torch.ones(4, dtype=F64), 12 * w ** 2, rtol=1e-14)


@pytest.mark.parametrize("cache", [True, False])
def test_issue13_torch_batched_fallback_warns_once_and_loops(cache):
    w = torch.linspace(-1, 1, 5, dtype=F64)
    H = curvop.hessian_of(lambda w: _Cube.apply(w).sum(), w, cache=cache, batched=True)
    V = torch.eye(5, dtype=F64)[:, :3]
    with pytest.warns(UserWarning, match=r"batched products failed \(RuntimeError.*falling back"):
        Y = H @ V
    np.testing.assert_allclose(Y, torch.diag(6 * w)[:, :3], rtol=1e-14)
    assert H.backend.batched is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next block loops without trying again
        np.testing.assert_allclose(H @ V, Y, rtol=0, atol=0)
