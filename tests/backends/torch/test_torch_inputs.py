"""Issue 12, torch items: the user's model is never changed, bad inputs fail clearly (float64 references)."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.base import LossPrecisionError  # noqa: E402
from torch_reference import MODES, dense_hessian, params_hessian  # noqa: E402

F64 = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


# --- item 1: threads ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_issue12_item1_products_from_four_threads_are_correct_and_keep_parameters(mode):
    model, (x, y) = _mlp(), _data()
    params = dict(model.named_parameters())
    D = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])
    rng = np.random.default_rng(0)
    vs = [torch.from_numpy(rng.standard_normal(H.shape[0])) for _ in range(4)]
    errors, results = [], {}
    start = threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            for _ in range(15):
                results[i] = (H @ vs[i]).numpy()
                np.testing.assert_allclose(results[i], D @ vs[i].numpy(), rtol=1e-10, atol=1e-12)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(results) == [0, 1, 2, 3]  # every thread ran its products
    for k, p in model.named_parameters():
        assert p is params[k] and isinstance(p, nn.Parameter), k


# --- item 2: buffers ----------------------------------------------------------------------------
def _instance_norm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten(),
                      nn.Linear(2 * 4, 3)).double()
    return m.train()


def test_issue12_item2_instance_norm_in_train_mode_is_refused_and_buffers_untouched():
    model = _instance_norm()
    before = {k: b.clone() for k, b in model.named_buffers()}
    x, y = torch.randn(6, 1, 6, dtype=F64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"'1' \(InstanceNorm1d\).*running_mean.*model\.eval\(\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k


@pytest.mark.parametrize("norm, buffer", [(nn.utils.spectral_norm, "weight_u"),
                                          (nn.utils.parametrizations.spectral_norm, "_u")])
def test_issue12_item2_spectral_norm_in_train_mode_is_refused_before_touching_buffers(norm, buffer):
    torch.manual_seed(0)
    model = nn.Sequential(norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).double().train()
    before = {k: b.clone() for k, b in model.named_buffers()}
    with pytest.raises(ValueError, match=rf"\({buffer}, .*model\.eval\(\)") as info:
        curvop.hessian(model, nn.CrossEntropyLoss(), _data())
    assert "dropout or BatchNorm" not in str(info.value)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k


@pytest.mark.parametrize("mode", ["reverse-cached", "reverse-uncached"])  # torch.func refuses such writes itself
def test_issue12_item2_products_never_write_live_buffers(mode):
    class Counting(nn.Module):  # writes a buffer on every forward in eval mode too: never on the user's
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("scratch", torch.zeros(4, dtype=F64))

        def forward(self, x):
            self.scratch.copy_(x.detach().mean(0))
            return self.lin(x)

    torch.manual_seed(0)
    model = Counting().double().eval()
    live = model.scratch
    x, y = _data()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), check_deterministic=False, **MODES[mode])
    H @ torch.ones(H.shape[0], dtype=F64)
    assert model.scratch is live and torch.equal(live, torch.zeros(4, dtype=F64))


# --- item 3: in-place updates after building H --------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_issue12_item3_operator_follows_in_place_parameter_updates(mode):
    model, (x, y) = _mlp(), _data()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(H.shape[0]))
    H @ v
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()  # in place, as every optimizer does
    D_new = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    np.testing.assert_allclose((H @ v).numpy(), D_new @ v.numpy(), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model[0].bias.add_(1.0)  # a parameter no saved tensor holds: still followed
    D_new = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    np.testing.assert_allclose((H @ v).numpy(), D_new @ v.numpy(), rtol=1e-10, atol=1e-12)


# --- item 4: del H frees the graph at once ------------------------------------------------------
@pytest.mark.parametrize("mode", ["reverse-cached"])  # forward cached: torch.func.linearize's own cycle, see docs
def test_issue12_item4_del_H_frees_the_cached_graph_without_gc(mode):
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.refs = []

        def forward(self, x):
            h = torch.tanh(x.repeat(1, 2000))  # a big activation the graph saves
            self.refs.append(weakref.ref(h))
            return self.lin(h[:, :4] + h[:, 4:8])

    torch.manual_seed(0)
    model = Big().double().eval()
    gc.collect()
    gc.disable()
    try:
        H = curvop.hessian(model, nn.CrossEntropyLoss(), _data(), check_deterministic=False, **MODES[mode])
        H @ torch.ones(H.shape[0], dtype=F64)
        backend = weakref.ref(H.backend)
        del H
        assert backend() is None, "the backend outlived `del H` (a reference cycle)"
        assert all(r() is None for r in model.refs), "an activation outlived `del H`"
    finally:
        gc.enable()


# --- item 9: dataset weighting ------------------------------------------------------------------
def _batches(k=4, n=6, classes=3, seed=0):
    return [_data(n, seed + i) for i in range(k)]


@pytest.mark.parametrize("loss_kw", [dict(ignore_index=1), dict(weight=torch.tensor([1.0, 3.0, 0.5], dtype=F64)),
                                     dict(weight=torch.tensor([1.0, 3.0, 0.5], dtype=F64), ignore_index=2)])
@pytest.mark.parametrize("cache", [True, False])
def test_issue12_item9_cross_entropy_with_weight_or_ignore_index_over_batches(loss_kw, cache):
    model, batches = _mlp(), _batches()
    for loss_fn in (nn.CrossEntropyLoss(**loss_kw), ):
        D = dense_hessian(model, loss_fn, batches)
        H = curvop.hessian(model, loss_fn, batches, cache=cache)
        np.testing.assert_allclose(H.to_dense(), D, rtol=1e-10, atol=1e-12)
    nll = nn.NLLLoss(**loss_kw)
    logsm = nn.Sequential(model, nn.LogSoftmax(-1))
    D = dense_hessian(logsm, nll, batches)
    np.testing.assert_allclose(curvop.hessian(logsm, nll, batches, cache=cache).to_dense(), D, rtol=1e-10,
                               atol=1e-12)


def test_issue12_item9_lambda_loss_over_several_batches_needs_reduction():
    model, batches = _mlp(), _batches()
    summed = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match=r"reduction=.*batch_weight="):
        curvop.hessian(model, summed, batches)
    D = dense_hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    np.testing.assert_allclose(curvop.hessian(model, summed, batches, reduction="sum").to_dense(), D,
                               rtol=1e-10, atol=1e-12)
    curvop.hessian(model, summed, batches[0])  # one batch: no weighting needed


def test_issue12_item9_batch_weight_callable():
    model, batches = _mlp(), _batches()
    ignore = lambda out, t: nn.functional.cross_entropy(out, t, ignore_index=0)  # noqa: E731
    D = dense_hessian(model, nn.CrossEntropyLoss(ignore_index=0), batches)
    H = curvop.hessian(model, ignore, batches, batch_weight=lambda b: (b[1] != 0).sum())
    np.testing.assert_allclose(H.to_dense(), D, rtol=1e-10, atol=1e-12)


# --- item 10: a loss that does not require grad -------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_issue12_item10_detached_loss_is_refused_at_build(mode):
    model = _mlp()
    detached = lambda out, t: nn.functional.cross_entropy(out.detach(), t)  # noqa: E731
    with pytest.raises(ValueError, match=r"does not depend on the parameters.*detach"):
        curvop.hessian(model, detached, _data(), **MODES[mode])


# --- item 13: one batch with tuple or dict inputs -----------------------------------------------
class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, xa, xb):
        return self.a(xa) + self.b(xb)


class _DictInputs(_TwoInputs):
    def forward(self, input_ids, extra):
        return super().forward(input_ids, extra)


@pytest.mark.parametrize("cls, wrap", [(_TwoInputs, lambda xa, xb: (xa, xb)),
                                       (_DictInputs, lambda xa, xb: {"input_ids": xa, "extra": xb})])
def test_issue12_item13_one_batch_with_tuple_or_dict_inputs(cls, wrap):
    torch.manual_seed(0)
    model = cls().double().eval()
    (xa, y), xb = _data(), torch.randn(8, 2, dtype=F64)
    one = curvop.hessian(model, nn.CrossEntropyLoss(), (wrap(xa, xb), y))
    listed = curvop.hessian(model, nn.CrossEntropyLoss(), [(wrap(xa, xb), y)])
    # model(xa, xb) called directly: the reference never unpacks the batch as curvop does
    D = params_hessian(model, lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (xa, xb)), y))
    np.testing.assert_allclose(one.to_dense(), D, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(listed.to_dense(), D, rtol=1e-10, atol=1e-12)
    assert one.backend.dataset.single


# --- item 14: raw or misleading errors ----------------------------------------------------------
def test_issue12_item14_inference_mode_is_refused_clearly():
    model = _mlp()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*outside"):
        curvop.hessian(model, nn.CrossEntropyLoss(), _data())
    H = curvop.hessian(model, nn.CrossEntropyLoss(), _data(), cache=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*outside"):
        H @ torch.ones(H.shape[0], dtype=F64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_issue12_item14_half_precision_model_is_refused_with_a_fix(dtype):
    model = _mlp().to(dtype)
    x, y = _data()
    with pytest.raises(TypeError, match=r"model\.float\(\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x.to(dtype), y))


def test_issue12_item14_nan_in_vector_blames_the_vector():
    model = _mlp()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), _data())
    v = torch.ones(H.shape[0], dtype=F64)
    v[5] = float("nan")
    with pytest.raises(ValueError, match=r"vector.*NaN or Inf.*index 5") as info:
        H @ v
    assert "batch" not in str(info.value)


@pytest.mark.parametrize("option, value", [("cache", "False"), ("batched", "yes"), ("check_deterministic", "no"),
                                           ("check_finite", 0), ("rewrite", "False"), ("hvp", 1),
                                           ("check_loss_dtype", "False")])
def test_issue12_item14_option_types_are_validated(option, value):
    with pytest.raises((TypeError, ValueError), match=option):
        curvop.hessian(_mlp(), nn.CrossEntropyLoss(), _data(), **{option: value})


def test_issue12_item14_unknown_options_list_the_valid_ones():
    with pytest.raises(TypeError, match=r"cuda.*model's device.*model\.to") as info:
        curvop.hessian(_mlp(), nn.CrossEntropyLoss(), _data(), cuda=False)
    assert "__init__" not in str(info.value)
    with pytest.raises(TypeError, match=r"unknown option 'hvp_mode'.*valid options.*cache"):
        curvop.hessian(_mlp(), nn.CrossEntropyLoss(), _data(), hvp_mode="forward")
    with pytest.raises(TypeError, match=r"unknown option 'cuda'"):
        curvop.hessian_of(lambda w: (w ** 4).sum(), torch.ones(3, dtype=F64), cuda=False)


# --- issue 11 item 4: a loss in lower precision than the parameters -----------------------------
def test_issue11_item4_float32_loss_of_float64_model_is_refused():
    model = _mlp()
    upcast = lambda out, t: nn.functional.cross_entropy(out.float(), t)  # noqa: E731
    with pytest.raises(LossPrecisionError, match=r"float32.*float64.*check_loss_dtype=False"):
        curvop.hessian(model, upcast, _data())
    H = curvop.hessian(model, upcast, _data(), check_loss_dtype=False, check_deterministic=False)
    assert H.dtype == np.float64


def test_issue11_item4_loss_precision_error_is_shared_with_tensorflow():
    pytest.importorskip("tensorflow")
    from curvop.backends import tensorflow as tfb

    assert tfb.LossPrecisionError is LossPrecisionError
    assert issubclass(LossPrecisionError, TypeError)


@pytest.mark.parametrize("mode", list(MODES))
def test_issue12_item3_operator_follows_in_place_buffer_updates(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = _data()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])
    v = torch.from_numpy(np.random.default_rng(2).standard_normal(H.shape[0]))
    H @ v
    with torch.no_grad():  # as a training step in train mode would: new running statistics
        model[1].running_var.mul_(3.0)
        model[1].running_mean.add_(0.5)
    D_new = dense_hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    np.testing.assert_allclose((H @ v).numpy(), D_new @ v.numpy(), rtol=1e-10, atol=1e-12)
