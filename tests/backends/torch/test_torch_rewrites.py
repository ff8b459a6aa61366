"""The exact op rewrites of curvop.backends.torch.rewrites, against torch's own ops and dense Hessians."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.torch.rewrites import Rewrites, conv2d  # noqa: E402
from torch_reference import dense_hessian  # noqa: E402

CONV_CASES = [
    dict(),
    dict(padding=1),
    dict(stride=2),
    dict(stride=(2, 1), padding=(1, 0)),
    dict(dilation=2, padding=2),
    dict(groups=2, padding=1),
]


@pytest.mark.parametrize("kw", CONV_CASES, ids=str)
def test_conv2d_first_and_second_derivatives(kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 2 // kw.get("groups", 1), 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.no_grad():
        np.testing.assert_allclose(conv2d(x, w, b, **kw), torch.nn.functional.conv2d(x, w, b, **kw), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, **kw), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: conv2d(x, w, b, **kw), (x, w, b))
    # third order: the derivatives of the derivatives are the same three functions again
    assert torch.autograd.gradgradcheck(lambda x, w: torch.autograd.grad((conv2d(x, w, **kw) ** 2).sum(), (x, w),
                                                                        create_graph=True), (x, w), fast_mode=True)


def _bn2d(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Residual(nn.Module):
    """The convolution's output is used twice: once normalised, once as a skip connection."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), _bn2d(2)
        self.head = nn.Linear(2 * 16, 3)

    def forward(self, x):
        c = self.conv(x)
        return self.head(torch.tanh(self.bn(c) + c).flatten(1))


MODELS = {
    "conv_bn": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn2d(3), nn.Tanh(), nn.Flatten(),
                                     nn.Linear(48, 3)),
    "conv_nobias_bn_relu_pool": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), _bn2d(4),
                                                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
    "inplace_relu_between": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), _bn2d(3),
                                                  nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)),
    "grouped_strided": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), _bn2d(4),
                                             nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
    "bn_without_affine": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3, affine=False),
                                               nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)),
    "residual": Residual,
}


def make(name, n=10, seed=0):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    try:
        model = MODELS[name]().eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model, torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_rewritten_products_match_dense_hessian(name, cache):
    model, x, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y), hvp="reverse", cache=cache)
    assert H.backend.rewrite
    D = dense_hessian(model, loss_fn, [(x, y)])
    rng = np.random.default_rng(1)
    v, V = rng.standard_normal(D.shape[0]), rng.standard_normal((D.shape[0], 3))
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H @ V, D @ V, rtol=1e-10, atol=1e-12)
    Hb = curvop.hessian(model, loss_fn, (x, y), hvp="reverse", cache=cache, batched=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback from batched products to a loop warns
        np.testing.assert_allclose(Hb @ V, D @ V, rtol=1e-10, atol=1e-12)


def _nodes(t):
    """Names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(nxt for nxt, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def _gradient_nodes(H, model, x, y):
    """Names of the autograd nodes behind the first gradient of ``H``'s cached graph on ``(x, y)``."""
    g = H.backend._graph({k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}, (x, y))
    return _nodes(g[0])


def _assert_float32_as_accurate_as_torch_ops(model, x, y):
    """Products of the float32 copy of ``model`` with the rewrites are as close to the float64 dense
    Hessian as with torch's own ops (``rewrite=False``)."""
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    model, x = model.float(), x.float()
    on = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    off = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), rewrite=False)
    for seed in range(3):
        v = np.random.default_rng(seed).standard_normal(D.shape[0]).astype(np.float32)
        ref = D @ v.astype(np.float64)
        err_on, err_off = (np.linalg.norm(H @ v - ref) / np.linalg.norm(ref) for H in (on, off))
        assert err_on < 1e-5 and err_on < 2 * err_off + 1e-7


@pytest.mark.parametrize("name, folded", [("conv_bn", True), ("inplace_relu_between", False), ("residual", True)])
def test_batchnorm_is_an_affine_map_folded_into_an_untouched_conv_output(name, folded):
    model, x, _ = make(name)
    x.requires_grad_(True)
    with Rewrites():
        out = model(x)
    nodes = _nodes(out)
    assert not any("BatchNorm" in n for n in nodes)
    assert "_ConvBackward" in nodes and "ConvolutionBackward0" not in nodes
    assert ("AddcmulBackward0" not in nodes) == folded  # the unfolded affine map is one addcmul
    with torch.no_grad():
        np.testing.assert_allclose(out.detach(), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rewrite", [True, False])
def test_the_gradient_graph_differentiates_the_rewritten_ops(rewrite):
    model, x, y = make("conv_bn")
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), rewrite=rewrite)
    assert H.backend.rewrite is rewrite
    nodes = _gradient_nodes(H, model, x, y)  # the first convolution's weight gradient, a function of every parameter
    assert ("NativeBatchNormBackwardBackward0" in nodes) is not rewrite
    assert ("_WeightGradBackward" in nodes) is rewrite


def test_float32_rewrite_is_as_accurate_as_torch_ops():
    model, x, y = make("conv_nobias_bn_relu_pool", n=32)
    _assert_float32_as_accurate_as_torch_ops(model, x, y)


def test_issue11_item6_conv_rewritten_per_layer_only_where_measured_faster():
    """A 3x3 convolution on a large output is curvop's; a 1x1 convolution on a 1x1 map (up to 16x
    slower rewritten, benchmarks/models.py --layers) stays torch's; products still match the dense Hessian."""
    from curvop.backends.torch.rewrites import conv_wins

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(4, 16, 1), nn.Flatten(), nn.Linear(16, 3)).double().eval()
    x, y = torch.randn(8, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    nodes = _gradient_nodes(H, model, x, y)
    assert "_WeightGradBackward" in nodes and "ConvolutionBackwardBackward0" in nodes  # one of each
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    v = np.random.default_rng(0).standard_normal(D.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-10, atol=1e-12)
    big, small = torch.empty(32, 16, 32, 32), torch.empty(4, 96, 1, 1)
    assert conv_wins(big, torch.empty(16, 16, 3, 3), 1, 1, 1, 1)
    assert not conv_wins(small, torch.empty(576, 96, 1, 1), 1, 0, 1, 1)
    assert conv_wins(torch.empty(4, 72, 8, 8), torch.empty(72, 1, 3, 3), 1, 1, 1, 72)  # float32 depthwise
    assert not conv_wins(torch.empty(4, 72, 8, 8, dtype=torch.float64), torch.empty(72, 1, 3, 3, dtype=torch.float64),
                         1, 1, 1, 72)


def test_issue11_item6_float64_depthwise_conv_rewritten_by_batch():
    """A float64 depthwise convolution is curvop's from batch 16 on, whatever its size (torch's double
    backward of it measured 1.1-1.3x slower at batch 16-32, faster at 4-8: benchmarks/models.py
    --layers-of), and the product still matches the dense Hessian with it rewritten."""
    from curvop.backends.torch.rewrites import DEPTHWISE_MIN_BATCH, conv_wins

    w = torch.empty(576, 1, 5, 5, dtype=torch.float64)
    at = DEPTHWISE_MIN_BATCH[torch.float64]
    assert conv_wins(torch.empty(at, 576, 1, 1, dtype=torch.float64), w, 1, 2, 1, 576)  # a 1x1 map: ratio 0.6
    assert not conv_wins(torch.empty(at // 2, 72, 32, 32, dtype=torch.float64), w[:72], 1, 2, 1, 72)  # ratio 327
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), _bn2d(4), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(at, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (at,))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    nodes = _gradient_nodes(H, model, x, y)
    assert "_WeightGradBackward" in nodes and "ConvolutionBackwardBackward0" not in nodes  # both convs rewritten
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    v = np.random.default_rng(0).standard_normal(D.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size, affine", [(4, False), (48, True)])
def test_issue11_item6_unfolded_batchnorm_is_an_affine_map_only_on_large_activations(size, affine):
    """After a convolution that stays torch's (1x1), BatchNorm is rewritten only when its input has
    at least AFFINE_MIN elements: on small ones the affine map measured no faster (resnet18, tinynet_e)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), _bn2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(16, 2, size, size, dtype=torch.float64), torch.randint(0, 3, (16,))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    nodes = _gradient_nodes(H, model, x, y)
    assert ("NativeBatchNormBackwardBackward0" in nodes) is not affine
    assert "_WeightGradBackward" not in nodes
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    v = np.random.default_rng(0).standard_normal(D.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-10, atol=1e-12)


class _Tokens(nn.Module):
    """A 3-D GELU MLP (tokens x features), its output averaged over tokens: GELU's second derivative
    enters through both the first and the second linear layer."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(4, 6), nn.GELU(approximate), nn.Linear(6, 3)

    def forward(self, x):
        return self.down(self.act(self.up(x)) * 0.7 + nn.functional.gelu(self.up(x)) ** 2).mean(1)


def _tokens(approximate="none", n=6, dtype=torch.float64):
    torch.manual_seed(0)
    model = _Tokens(approximate).to(dtype).eval()
    return model, 2 * torch.randn(n, 5, 4, dtype=dtype), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("cache", [True, False])
def test_issue11_item6_gelu_products_match_dense_hessian(approximate, cache):
    """GELU's rewrite (erf form; the tanh form stays torch's) against the float64 dense Hessian, one
    vector and three at once (vmapped backward)."""
    model, x, y = _tokens(approximate)
    loss_fn = nn.CrossEntropyLoss()
    D = dense_hessian(model, loss_fn, [(x, y)])
    V = np.random.default_rng(1).standard_normal((D.shape[0], 3))
    for batched in (False, True):
        H = curvop.hessian(model, loss_fn, (x, y), cache=cache, batched=batched)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback from batched products to a loop warns
            np.testing.assert_allclose(H @ V, D @ V, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(H @ V[:, 0], D @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_issue11_item6_gelu_derivatives_of_every_order():
    """The rewritten GELU and its first four derivatives equal torch's (float64, to rounding), and
    torch's gradcheck/gradgradcheck pass on it: a third derivative is as exact as the second."""
    from curvop.backends.torch.rewrites import gelu

    x = (3 * torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_(True)

    def derivatives(f):
        out, y = [f(x)], f(x).sum()
        for _ in range(4):
            gx = torch.autograd.grad(y, x, create_graph=True)[0]
            out.append(gx)
            y = gx.sum()
        return out

    for mine, ref in zip(derivatives(gelu), derivatives(nn.functional.gelu)):
        np.testing.assert_allclose(mine.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(gelu, (x,))
    assert torch.autograd.gradgradcheck(gelu, (x,))
    assert torch.autograd.gradgradcheck(lambda x: torch.autograd.grad((gelu(x) ** 3).sum(), x, create_graph=True),
                                        (x,))


@pytest.mark.parametrize("rewrite, cache", [(True, True), (False, True), (True, False)])
def test_issue11_item6_gelu_gradient_graph_holds_its_slope_not_torchs_double_backward(rewrite, cache):
    """With the rewrite a cached product passes curvop's GELU nodes (multiplications), never torch's
    GeluBackwardBackward0 (an erf and exps per element); rewrite=False keeps torch's op, and so do
    uncached products (rebuilding the derivatives on every product measured 1.1x slower)."""
    model, x, y = _tokens()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), rewrite=rewrite, cache=cache)
    nodes = _gradient_nodes(H, model, x, y)  # the first layer's weight gradient
    mine = rewrite and cache
    assert ("GeluBackwardBackward0" in nodes) is not mine
    assert ("_GeluBackward" in nodes) is mine


def test_issue11_item6_gelu_float32_as_accurate_as_torch_ops():
    model, x, y = _tokens(n=32)
    _assert_float32_as_accurate_as_torch_ops(model, x, y)
