"""The torch backend against dense torch.func.hessian references, in float64, in every format."""

from __future__ import annotations

import warnings
import numpy as np
import pytest
import scipy.sparse.linalg as sla

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import curvop  # noqa: E402
from torch_reference import dense_hessian  # noqa: E402
from curvop.backends.template import AutodiffBackend

MODES = [
    dict(hvp="forward", cache=False, batched=False),
    dict(hvp="forward", cache=False, batched=True),
    dict(hvp="forward", cache=True, batched=False),
    dict(hvp="forward", cache=True, batched=True),
    dict(hvp="reverse", cache=False, batched=False),
    dict(hvp="reverse", cache=False, batched=True),
    dict(hvp="reverse", cache=True, batched=False),
    dict(hvp="reverse", cache=True, batched=True),
]


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def _mlp(act):
    return nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 9, 3))


def _bn():
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.randn(64, 4, dtype=torch.float64) * 3 + 1)
    return m.eval()


MODELS = {
    "mlp_tanh": (lambda: _mlp(nn.Tanh()), (4,)),
    "mlp_relu": (lambda: _mlp(nn.ReLU()), (4,)),
    "cnn_maxpool": (_cnn, (1, 6, 6)),
    "batchnorm_eval": (_bn, (4,)),
    "unused_param": (Unused, (4,)),
}


def make(name, n=12, seed=0):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    try:
        model = MODELS[name][0]().double().eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.randn(n, *MODELS[name][1], dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
@pytest.mark.parametrize("name", list(MODELS))
def test_products_match_dense_hessian(name, mode):
    model, x, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y), **mode)
    D = dense_hessian(model, loss_fn, [(x, y)])
    n = D.shape[0]
    assert H.shape == (n, n) and H.dtype == np.float64
    rng = np.random.default_rng(1)
    v, V = rng.standard_normal(n), rng.standard_normal((n, 4))
    tol = dict(rtol=1e-10, atol=1e-12)
    # numpy path
    np.testing.assert_allclose(H @ v, D @ v, **tol)
    np.testing.assert_allclose(H.matvec(v), D @ v, **tol)
    np.testing.assert_allclose(H.dot(v), D @ v, **tol)
    np.testing.assert_allclose(H.matmat(V), D @ V, **tol)
    np.testing.assert_allclose(H.matvec(v[:, None]), (D @ v)[:, None], **tol)
    # native path: same type, dtype and device back
    tv, tV = torch.from_numpy(v), torch.from_numpy(V)
    out = H @ tv
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.device == tv.device
    np.testing.assert_allclose(out.numpy(), D @ v, **tol)
    outV = H.matmat(tV)
    assert isinstance(outV, torch.Tensor) and outV.shape == (n, 4)
    np.testing.assert_allclose(outV.numpy(), D @ V, **tol)
    assert H.num_matvecs == 1 + 1 + 1 + 4 + 1 + 1 + 4
    if name == "unused_param":
        idx = [i for i, k in enumerate(_flat_names(model)) if k.startswith("unused")]
        np.testing.assert_array_equal((H @ v)[idx], 0.0)


def _flat_names(model):
    return [k for k, p in model.named_parameters() for _ in range(p.numel())]


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_maxpool", "batchnorm_eval"])
def test_symmetric_contract_and_dense(name):
    model, x, y = make(name)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    assert H.H is H and H.T is H and H.adjoint() is H
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(H.rmatvec(v), D @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H.to_dense(), D, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_maxpool", "batchnorm_eval"])
def test_scipy_eigsh_matches_eigvalsh(name):
    model, x, y = make(name)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    top = sla.eigsh(H, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
    ref = np.linalg.eigvalsh(D)[-3:]
    np.testing.assert_allclose(np.sort(top), ref, rtol=1e-8)


def test_scipy_solvers_consume_the_operator():
    model, x, y = make("mlp_tanh")
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    n = D.shape[0]
    b = np.random.default_rng(0).standard_normal(n)
    lam = 1.0  # damped, so the system is positive definite
    A = H + lam * sla.aslinearoperator(np.eye(n))
    lam_min = np.linalg.eigvalsh(D)[0]
    assert lam_min + lam > 0
    x_cg, info = sla.cg(A, b, rtol=1e-12, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(x_cg, np.linalg.solve(D + lam * np.eye(n), b), rtol=1e-7, atol=1e-9)
    x_mr, info = sla.minres(A, b, rtol=1e-12, maxiter=500)
    np.testing.assert_allclose(x_mr, np.linalg.solve(D + lam * np.eye(n), b), rtol=1e-6, atol=1e-8)
    X0 = np.random.default_rng(1).standard_normal((n, 2))
    vals, _ = sla.lobpcg(H, X0, largest=True, tol=1e-10, maxiter=500)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(D)[-2:], rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("cache", [False, True])
def test_loader_with_unequal_batches_is_the_dataset_hessian(reduction, hvp, cache):
    model, x, y = make("mlp_tanh", n=10)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # 4, 4, 2
    assert [len(b[1]) for b in loader] == [4, 4, 2]
    H = curvop.hessian(model, loss_fn, loader, hvp=hvp, cache=cache)
    D = dense_hessian(model, loss_fn, [(x, y)])
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-10, atol=1e-12)
    # a plain list of batches, and reduction given explicitly to a plain function
    f = (lambda out, t: nn.functional.cross_entropy(out, t, reduction=reduction))
    H2 = curvop.hessian(model, f, list(loader), reduction=reduction, hvp=hvp, cache=cache)
    np.testing.assert_allclose(H2 @ v, D @ v, rtol=1e-10, atol=1e-12)


def test_per_layer_subsets_are_blocks_of_the_full_hessian():
    model, x, y = make("mlp_tanh")
    loss_fn = nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    D = dense_hessian(model, loss_fn, [(x, y)])
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    # first layer by module prefix; last weight by exact name; a predicate; parameter objects
    selections = {
        "0": [0, 1],
        "2.weight": [2],
        (lambda k: k.endswith("bias")): [1, 3],
        tuple(model[2].parameters()): [2, 3],
    }
    for sel, which in selections.items():
        idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in which])
        H = curvop.hessian(model, loss_fn, (x, y), params=list(sel) if isinstance(sel, tuple) else sel)
        np.testing.assert_allclose(H.to_dense(), D[np.ix_(idx, idx)], rtol=1e-10, atol=1e-12)
        dense_sub = dense_hessian(model, loss_fn, [(x, y)], names=[names[i] for i in which])
        np.testing.assert_allclose(H.to_dense(), dense_sub, rtol=1e-10, atol=1e-12)


def test_float32_model_gives_float32_operator():
    torch.manual_seed(0)
    model = _mlp(nn.Tanh()).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    assert H.dtype == np.float32
    assert (H @ np.ones(H.shape[0], dtype=np.float64)).dtype == np.float32  # scipy may pass float64
    assert (H @ torch.ones(H.shape[0])).dtype == torch.float32


def test_products_leave_buffers_and_graphs_alone():
    model, x, y = make("batchnorm_eval")
    before = {k: b.clone() for k, b in model.named_buffers()}
    for cache in (False, True):
        H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=cache)
        out = H @ torch.ones(H.shape[0], dtype=torch.float64)
        assert out.grad_fn is None and not out.requires_grad
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_hessian_of_scalar_functions():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    H = curvop.hessian_of(lambda w: (w**4).sum() / 4, w)
    np.testing.assert_allclose(H.to_dense(), np.diag(3 * w.numpy() ** 2), rtol=1e-14)

    # a loss plus a weight-decay term, over a structure of tensors
    model, x, y = make("mlp_tanh")
    params = {k: p.detach() for k, p in model.named_parameters()}
    decay = 0.1

    def loss(p):
        out = torch.func.functional_call(model, p, (x,))
        return nn.functional.cross_entropy(out, y) + decay / 2 * sum((t**2).sum() for t in p.values())

    H = curvop.hessian_of(loss, params)
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)]) + decay * np.eye(H.shape[0])
    np.testing.assert_allclose(H.to_dense(), D, rtol=1e-10, atol=1e-12)

    # a list of tensors and data batches (a physics-style residual loss)
    a, b = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    ts = [torch.linspace(0, 1, 5, dtype=torch.float64), torch.linspace(1, 2, 3, dtype=torch.float64)]
    batches = [(t, torch.sin(t)) for t in ts]
    H = curvop.hessian_of(lambda p, batch: ((p[0] * batch[0] + p[1] - batch[1]) ** 2).mean(), [a, b], batches)
    t_all = torch.cat(ts)
    ref = 2 * np.array([[np.mean(t_all.numpy() ** 2), np.mean(t_all.numpy())], [np.mean(t_all.numpy()), 1.0]])
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-12)


# --- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def H_mlp():
    model, x, y = make("mlp_tanh")
    return curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))


def test_wrong_length(H_mlp):
    n = H_mlp.shape[0]
    with pytest.raises(ValueError, match=f"length {n}"):
        H_mlp @ np.ones(n + 1)
    with pytest.raises(ValueError, match=f"length {n}"):
        H_mlp @ torch.ones(n - 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        H_mlp.matmat(np.ones(n))


def test_wrong_dtype(H_mlp):
    n = H_mlp.shape[0]
    with pytest.raises(TypeError, match=r"float32.*x\.to\(torch\.float64\)"):
        H_mlp @ torch.ones(n, dtype=torch.float32)
    with pytest.raises(TypeError, match="complex"):
        H_mlp @ np.ones(n, dtype=complex)


def test_wrong_device(H_mlp):
    v = torch.empty(H_mlp.shape[0], dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="meta.*parameters are on cpu"):
        H_mlp @ v


def test_wrong_framework(H_mlp):
    class Foreign:
        shape = (H_mlp.shape[0],)

    with pytest.raises(TypeError, match="numpy array or an array of the operator's own framework"):
        H_mlp @ Foreign()


def test_non_scalar_loss():
    model, x, y = make("mlp_tanh")
    with pytest.raises(ValueError, match="reduction='none'"):
        curvop.hessian(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="scalar.*shape \\(12,\\)"):
        curvop.hessian(model, lambda out, t: out.sum(1), (x, y))


def test_empty_loader():
    model, _, _ = make("mlp_tanh")
    with pytest.raises(ValueError, match="data is empty"):
        curvop.hessian(model, nn.CrossEntropyLoss(), [])
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0)))
    with pytest.raises(ValueError, match="data is empty"):
        curvop.hessian(model, nn.CrossEntropyLoss(), empty)


def test_one_shot_iterator_is_refused():
    model, x, y = make("mlp_tanh")
    with pytest.raises(TypeError, match="one-shot iterator"):
        curvop.hessian(model, nn.CrossEntropyLoss(), ((x, y) for _ in range(2)))


def test_train_mode_batchnorm_and_dropout():
    model, x, y = make("batchnorm_eval")
    model.train()
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' is in training mode.*model\.eval\(\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    drop = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double().train()
    with pytest.raises(ValueError, match="dropout layer '1' is in training mode"):
        curvop.hessian(drop, nn.CrossEntropyLoss(), (x, y))


def test_mixed_devices():
    model, x, y = make("mlp_tanh")
    model[2].to("meta")
    with pytest.raises(ValueError, match="several devices.*model.to"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))


def test_mixed_dtypes_and_integer_params():
    model, x, y = make("mlp_tanh")
    model[2].float()
    with pytest.raises(TypeError, match="mixed dtypes"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(TypeError, match="floating-point"):
        curvop.hessian_of(lambda w: (w**2).sum(), torch.tensor([1, 2]))


def test_nondeterministic_loss_is_detected():
    model, x, y = make("mlp_tanh")

    def noisy(out, t):  # like augmentation: the loss changes from call to call
        return nn.functional.cross_entropy(out * (1 + 0.1 * torch.rand(())), t)

    with pytest.raises(curvop.backends.base.NondeterministicProductError, match="model.eval"):
        curvop.hessian(model, noisy, (x, y))
    H = curvop.hessian(model, noisy, (x, y), check_deterministic=False)
    assert H.shape[0] == sum(p.numel() for p in model.parameters())


def test_to_dense_refuses_large_operators(H_mlp):
    with pytest.raises(ValueError, match="max_size"):
        H_mlp.to_dense(max_size=10)


def test_unknown_options():
    model, x, y = make("mlp_tanh")
    with pytest.raises(ValueError, match="hvp must be"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), hvp="sideways")
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), params="nope")


# --- TorchBackend is the template: what it gives every framework, on torch (issue 13) ----------------
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


# --- issue 26: the products check themselves ---------------------------------------------------------
class _TanhGrad(torch.autograd.Function):
    """``g * tanh'(x)``, whose derivative in ``g`` is 1.5 times too large: a wrong double backward, as
    torch's ``_weight_norm`` had."""

    @staticmethod
    def forward(g, x):
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gg):
        g, x = ctx.saved_tensors
        t = torch.tanh(x)
        return 1.5 * gg * (1 - t ** 2), gg * g * (-2 * t * (1 - t ** 2))


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return _TanhGrad.apply(g, ctx.saved_tensors[0])


class _WrongSecondDerivative(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(_Tanh.apply(self.a(x)))


@pytest.mark.parametrize("cache", [True, False])
def test_issue26_wrong_double_backward_is_refused_naming_the_parameters(cache):
    torch.manual_seed(0)
    model = _WrongSecondDerivative().double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(curvop.AsymmetricHessianError, match=r"not symmetric.*'a.weight' with 'b.weight'") as info:
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=cache)
    assert info.value.asymmetry > 0.01 and {info.value.blocks[0][0], info.value.blocks[0][1]} == {"a.weight", "b.weight"}
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=cache, check_symmetric=False)
    res = H.verify()  # the gradient is right, its derivative is not: central differences see it
    assert not res.ok and res.error > 0.01
    with pytest.raises(curvop.VerificationError, match="central differences"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=cache, check_symmetric=False, verify=True)


def test_issue26_verify_on_a_right_model_per_parameter():
    model, x, y = make("mlp_tanh")
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), verify=True)
    res = H.verify(np.ones(H.shape[0]))
    assert res.ok and [b for b, _ in res.blocks] == [k for k, _ in model.named_parameters()]
    assert res.error < 1e-6


def test_finiteness_check_is_one_sum_and_exact_when_the_sum_overflows():
    """The per-product check sums the product (one reduction, not isfinite + all); entries that are
    finite but overflow the sum are confirmed one by one, not reported as NaN (issue 27)."""
    model = torch.nn.Linear(3, 1).float()
    H = curvop.hessian(model, torch.nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 1)))
    big = torch.full((8,), 3e38, dtype=torch.float32)
    assert not torch.isfinite(big.sum()) and H.backend._all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not H.backend._all_finite(torch.cat([big, torch.tensor([bad])]))


@pytest.mark.parametrize("options, fresh, uses", [({}, 1, 2), ({"hvp": "forward", "cache": True}, 1, 2),
                                                  ({"cache": False}, 2, 0), ({"hvp": "forward", "cache": False}, 2, 0)])
def test_issue26_products_at_build_per_mode(monkeypatch, options, fresh, uses):
    # the determinism, symmetry and reuse checks share their products: with a cache, the maps on w then
    # u and u afresh (was 1 fresh + 3 uses); without, u and w. The operator is still exact afterwards.
    from curvop.backends.torch.backend import TorchBackend

    count = {"fresh": 0, "uses": 0}
    product, linearize = TorchBackend._product, TorchBackend._linearize

    def counted_product(self, v, batch, batched):
        count["fresh"] += 1
        return product(self, v, batch, batched)

    def counted_linearize(self, batch):
        fn = linearize(self, batch)
        return lambda v, batched: count.__setitem__("uses", count["uses"] + 1) or fn(v, batched)

    monkeypatch.setattr(TorchBackend, "_product", counted_product)
    monkeypatch.setattr(TorchBackend, "_linearize", counted_linearize)
    model, x, y = make("mlp_tanh")
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **options)
    assert count == {"fresh": fresh, "uses": uses}, count
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)]) @ v.numpy()
    np.testing.assert_allclose((H @ v).numpy(), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
