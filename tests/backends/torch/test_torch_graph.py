"""``curvop.hessian_of`` of a closure or of given gradients (``curvop/backends/torch/graph.py``, issue 23).

Every product is compared with ``torch.func.hessian`` of the same loss (``tests/torch_reference.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvop
from torch_reference import dense_hessian

torch.set_num_threads(1)


def _cnn(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3)).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    return model, (x, y), torch.nn.CrossEntropyLoss()


def test_closure_hessian_is_the_dense_hessian_and_gives_loss_and_gradient():
    model, (x, y), loss_fn = _cnn()
    params = list(model.parameters())
    H = curvop.hessian_of(lambda: loss_fn(model(x), y), params)
    np.testing.assert_allclose(H.to_dense(), dense_hessian(model, loss_fn, [(x, y)]), rtol=1e-10, atol=1e-12)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    assert float(H.backend.loss) == pytest.approx(float(loss.detach()), rel=1e-14)
    for g, want in zip(H.backend.gradient, grads):
        torch.testing.assert_close(g, want, rtol=1e-13, atol=1e-15)
        assert not g.requires_grad
    assert all(p.grad is None for p in params)  # the Hessian writes no gradients


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_gradient_graph_hessian_is_the_dense_hessian_official_pattern():
    model, (x, y), loss_fn = _cnn(1)
    params = list(model.parameters())
    loss_fn(model(x), y).backward(create_graph=True)
    H = curvop.hessian_of([p.grad for p in params], params)
    np.testing.assert_allclose(H.to_dense(), dense_hessian(model, loss_fn, [(x, y)]), rtol=1e-10, atol=1e-12)
    assert "given gradients" in repr(H)
    for p in params:
        p.grad = None


def test_closure_follows_in_place_changes_and_gradients_refuse_them():
    model, (x, y), loss_fn = _cnn(2)
    params = list(model.parameters())
    H = curvop.hessian_of(lambda: loss_fn(model(x), y), params)
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    G = curvop.hessian_of(list(grads), params)
    with torch.no_grad():
        params[0].mul_(1.5)
    np.testing.assert_allclose(H.to_dense(), dense_hessian(model, loss_fn, [(x, y)]), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="changed in place since the gradients were computed"):
        G @ np.ones(G.shape[0])


def test_closure_differentiates_attention_that_a_double_backward_cannot():
    """``nn.MultiheadAttention`` runs torch's fused kernel, whose backward has no derivative; the
    closure is evaluated under curvop's rewrites, so its products exist and are the dense Hessian."""
    torch.manual_seed(0)
    att = torch.nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)

    def loss():
        return att(x, x, x, need_weights=False)[0].square().mean()

    params = list(att.parameters())
    g = torch.autograd.grad(loss(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g, params, grad_outputs=[torch.ones_like(p) for p in params], allow_unused=True)
    H = curvop.hessian_of(loss, params)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    names = [n for n, _ in att.named_parameters()]

    def f(flat):
        parts, i = {}, 0
        for n, p in zip(names, params):
            parts[n] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = torch.func.functional_call(att, parts, (x, x, x), {"need_weights": False})[0]
        return out.square().mean()

    np.testing.assert_allclose(H.to_dense(), torch.func.hessian(f)(flat0).numpy(), rtol=1e-9, atol=1e-12)


def test_one_evaluation_per_closure_operator():
    model, (x, y), loss_fn = _cnn(3)
    calls = []

    def closure():
        calls.append(1)
        return loss_fn(model(x), y)

    H = curvop.hessian_of(closure, list(model.parameters()), check_deterministic=False)
    curvop.diagonal(H, num_matvecs=3, seed=0)
    assert len(calls) == 1


@pytest.mark.parametrize("make, options, match", [
    (lambda ps, x, y, f: (lambda: f(x, y)), {"hvp": "forward"}, "reverse mode on the graph"),
    (lambda ps, x, y, f: list(torch.autograd.grad(f(x, y), ps, create_graph=True)), {"check_deterministic": True},
     "nothing to evaluate twice"),
    (lambda ps, x, y, f: list(torch.autograd.grad(f(x, y), ps)), {}, "create_graph=True"),
    (lambda ps, x, y, f: list(torch.autograd.grad(f(x, y), ps, create_graph=True))[:1], {}, "got 1 gradients for 4"),
])
def test_bad_forms_are_clear_errors(make, options, match):
    model, (x, y), loss_fn = _cnn()
    params = list(model.parameters())
    f = make(params, x, y, lambda a, b: loss_fn(model(a), b))
    with pytest.raises(ValueError, match=match):
        curvop.hessian_of(f, params, **options)


def test_closure_that_called_backward_is_a_clear_error():
    model, (x, y), loss_fn = _cnn()

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="called loss.backward()"):
        curvop.hessian_of(closure, list(model.parameters()))


def test_non_leaf_params_are_refused():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    v = w * 2
    with pytest.raises(ValueError, match="not a leaf tensor"):
        curvop.hessian_of(lambda: (v ** 3).sum(), [v])


def test_function_of_params_is_unchanged():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(curvop.hessian_of(lambda t: (t ** 3).sum(), w).to_dense(), np.diag([6.0, 12.0]))


class _WrongProduct(torch.autograd.Function):
    """``a * b`` whose backward says ``1.5 a`` for ``d/db``: the cross derivatives disagree."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, 1.5 * g * a


def test_issue26_closure_with_a_wrong_double_backward_is_refused():
    """The symmetry self-check on the cached graph of a closure (curvop.backends.selfcheck)."""
    a = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(curvop.AsymmetricHessianError, match="not symmetric"):
        curvop.hessian_of(lambda: (_WrongProduct.apply(a, b) ** 2).sum(), [a, b])
    H = curvop.hessian_of(lambda: (_WrongProduct.apply(a, b) ** 2).sum(), [a, b], check_symmetric=False)
    assert H.shape == (4, 4)
    with pytest.raises(NotImplementedError, match="central differences"):
        H.verify()
    right = curvop.hessian_of(lambda: ((a * b) ** 2).sum(), [a, b])  # the plain op passes
    assert np.allclose(right.to_dense(), right.to_dense().T)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_on_moves_the_built_operator_to_a_new_graph_and_release_frees_it():
    """``H.on(next closure or gradients)`` (an optimizer's next step): the products are the dense
    Hessian on the new batch at the moved parameters; the build's checks do not run again; a
    released backend refuses products; a graph of the other form or a bad loss is a clear error."""
    model, (x, y), loss_fn = _cnn(1)
    params = list(model.parameters())
    H = curvop.hessian_of(lambda: loss_fn(model(x), y), params)
    base = H.backend
    with torch.no_grad():
        params[0].mul_(0.5)
    x2, y2 = 2 * x[:3], y[:3]
    H2 = H.on(lambda: loss_fn(model(x2), y2))
    np.testing.assert_allclose(H2.to_dense(), dense_hessian(model, loss_fn, [(x2, y2)]), rtol=1e-10, atol=1e-12)
    assert float(H2.backend.loss) == pytest.approx(float(loss_fn(model(x2), y2).detach()), rel=1e-14)
    base.release()
    with pytest.raises(RuntimeError, match="released"):
        H.matvec(torch.ones(H.shape[0], dtype=torch.float64))
    np.testing.assert_allclose(H2.to_dense(), dense_hessian(model, loss_fn, [(x2, y2)]), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="built from a closure"):
        base.on([p.grad for p in params])
    with pytest.raises(ValueError, match="scalar"):
        base.on(lambda: model(x2).sum(1))

    loss_fn(model(x), y).backward(create_graph=True)
    G = curvop.hessian_of([p.grad for p in params], params)
    for p in params:
        p.grad = None
    loss_fn(model(x2), y2).backward(create_graph=True)
    G2 = G.on([p.grad for p in params])
    np.testing.assert_allclose(G2.to_dense(), dense_hessian(model, loss_fn, [(x2, y2)]), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="built from gradients"):
        G.on(lambda: loss_fn(model(x), y))
