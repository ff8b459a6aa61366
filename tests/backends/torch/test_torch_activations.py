"""Issue 11 item 2: every torch.nn activation works in every mode, MobileNetV3's hardsigmoid included.

Surveyed on torch 2.13 (double backward and jvp-of-grad of each ``torch.nn`` activation): only
``hardsigmoid`` lacks a second derivative (both modes) and eval-mode ``rrelu`` in place lacks a
forward-mode one; curvop evaluates both as the same function built from ops that have them
(curvop.backends.torch.functions). The references are central differences of torch's own
first derivative, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.torch.functions import hardsigmoid, rrelu  # noqa: E402

MODES = [(hvp, cache) for hvp in ("forward", "reverse") for cache in (True, False)]


class Fn(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


ACTIVATIONS = {
    "hardsigmoid": nn.Hardsigmoid,
    "hardsigmoid_inplace": lambda: nn.Hardsigmoid(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "hardtanh": nn.Hardtanh,
    "relu6": lambda: nn.ReLU6(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "logsigmoid": nn.LogSigmoid,
    "leaky_relu": nn.LeakyReLU,
    "rrelu_eval": nn.RReLU,
    "rrelu_eval_inplace": lambda: nn.RReLU(inplace=True),
    "prelu": lambda: nn.PReLU(6),
    "glu": lambda: nn.Sequential(nn.GLU(), Fn(lambda x: torch.cat([x, x], 1))),
    "hardshrink": nn.Hardshrink,
    "softshrink": nn.Softshrink,
    "tanhshrink": nn.Tanhshrink,
    "threshold": lambda: nn.Threshold(0.1, 2.0),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softsign": nn.Softsign,
    "functional_hardsigmoid_inplace": lambda: Fn(lambda x: F.hardsigmoid(x * 1.0, inplace=True)),
    "torch_rrelu_inplace": lambda: Fn(lambda x: torch.rrelu_(x * 1.0, 0.1, 0.3)),
}


def make(name, n=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), ACTIVATIONS[name](), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = 3 * torch.randn(n, 4, dtype=torch.float64, generator=g)  # reaches the kinks at -3 and 3
    return model, x, torch.randint(0, 3, (n,), generator=g)


def fd_hvp(model, loss_fn, x, y, v, h=1e-6):
    """H @ v as a central difference of torch's own gradient."""
    names = [k for k, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def grad_at(flat):
        parts = [t.view(s).requires_grad_(True) for t, s in zip(torch.split(flat.clone(), [s.numel() for s in shapes]),
                                                                 shapes)]
        loss = loss_fn(functional_call(model, dict(zip(names, parts)), (x,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parts)])

    v = torch.as_tensor(v)
    return ((grad_at(flat0 + h * v) - grad_at(flat0 - h * v)) / (2 * h)).numpy()


@pytest.mark.parametrize("hvp, cache", MODES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_issue11_item2_every_activation_in_every_mode_matches_finite_differences(name, hvp, cache):
    model, x, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y), hvp=hvp, cache=cache)
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    ref = fd_hvp(model, loss_fn, x, y, v)
    np.testing.assert_allclose(H @ v, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())


def test_issue11_item2_hardsigmoid_really_lacks_a_second_derivative_in_torch():
    """The failure this fixes (if a torch release adds the derivative, the rewrite can go)."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(F.hardsigmoid(x).pow(2).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        torch.autograd.grad(g.sum(), x)


def test_issue11_item2_rewritten_functions_are_torchs_functions():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    x = torch.cat([x, torch.tensor([-3.0, 3.0], dtype=torch.float64)])
    np.testing.assert_allclose(hardsigmoid(x), F.hardsigmoid(x), rtol=0, atol=1e-16)
    np.testing.assert_allclose(rrelu(x, 0.1, 0.4), F.rrelu(x, 0.1, 0.4, training=False), rtol=0, atol=0)
    # first derivatives, kinks included: the same subgradient as torch's (0 at -3 and 3); torch's
    # float64 hardsigmoid_backward multiplies by 1/6 rounded to float32 (3e-8 off), ours is exact
    xr = x.clone().requires_grad_(True)
    ours = torch.autograd.grad(hardsigmoid(xr).sum(), xr)[0]
    np.testing.assert_allclose(ours, torch.autograd.grad(F.hardsigmoid(xr).sum(), xr)[0], rtol=1e-7, atol=0)
    np.testing.assert_array_equal(ours, np.where(x.abs().numpy() < 3, 1 / 6, 0.0))
    np.testing.assert_array_equal(torch.autograd.grad(rrelu(xr, 0.1, 0.4).sum(), xr)[0],
                                  torch.autograd.grad(F.rrelu(xr, 0.1, 0.4).sum(), xr)[0])
    y = x.clone()
    assert hardsigmoid(y, inplace=True) is y and torch.equal(y, hardsigmoid(x))


class MobileNetV3Block(nn.Module):
    """Inverted residual with squeeze-excitation, hardswish and hardsigmoid, as MobileNetV3 has."""

    def __init__(self, c=4, e=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e),
                                nn.Hardswish(inplace=True))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(e, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, e, 1),
                                nn.Hardsigmoid(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

    def forward(self, x):
        h = self.dw(self.expand(x))
        return self.head(x + self.project(h * self.se(h)))


@pytest.mark.parametrize("hvp, cache", MODES)
def test_issue11_item2_mobilenetv3_block_with_defaults(hvp, cache):
    torch.manual_seed(0)
    model = MobileNetV3Block().double()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(16, 4, 6, 6, dtype=torch.float64))
    model.eval()
    x, y = torch.randn(4, 4, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y), hvp=hvp, cache=cache)
    v = np.random.default_rng(3).standard_normal(H.shape[0])
    ref = fd_hvp(model, loss_fn, x, y, v)
    np.testing.assert_allclose(H @ v, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())


def test_issue11_item2_rrelu_in_training_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.RReLU(), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"rrelu in training mode.*call model.eval\(\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=False)
