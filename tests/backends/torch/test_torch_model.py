"""The torch model adapter (issue 26, items 1.3-1.5 and section 2): nothing around the model changes
the answer.

* the build-time context is the operator's: train/eval flags, autocast, grad mode, default dtype;
* a batch is a pytree: namedtuples, dataclasses, dicts with strings, ``PackedSequence``;
* a mode that cannot differentiate the model falls back (``hvp="auto"``) or is refused naming the
  one that works; ops without a second derivative are named with a workaround;
* a float64 model computing in float32 inside is named in a warning.

References are dense float64 Hessians from ``torch.autograd.functional.hessian`` (double backward)
of a functional form of the model in eval mode, built here without curvop.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import namedtuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import curvop  # noqa: E402
from curvop._errors import ModeError, NoSecondDerivativeError, PrecisionWarning  # noqa: E402
from curvop.backends.base import LossPrecisionError  # noqa: E402
from torch_reference import MODES  # noqa: E402

F64 = torch.float64
Pair = namedtuple("Pair", "x y")


def dense(model, loss):
    """The Hessian of ``loss(run)`` by double backward (``torch.autograd.functional.hessian``), where
    ``run(*args, **kwargs)`` calls the model functionally at the flattened parameters."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat):
        p = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, sizes), shapes))))
        return loss(lambda *a, **k: functional_call(model, (p, buffers), a, k))

    return torch.autograd.functional.hessian(f, flat0).detach().numpy()


def bn_dropout(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(F64)
    model[1].running_mean.uniform_(-0.5, 0.5), model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(12, 4, dtype=F64), torch.randint(0, 3, (12,))
    return model.eval(), x, y


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


# --- 1.3: the build-time context -------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_issue26_item3_train_after_build_keeps_the_eval_hessian(mode):
    model, x, y = bn_dropout()
    ref = dense(model, lambda m: ce(m(x), y))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]  # over a loader: each batch's statistics, random masks
    H1 = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])
    Hn = curvop.hessian(model, nn.CrossEntropyLoss(), batches, **MODES[mode])
    model.train()
    for H in (H1, Hn):
        np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert all(m.training for m in model.modules())  # the user's flags are the user's
    with torch.no_grad():
        model[4].weight.mul_(1.5)  # a rebuild after a parameter change still uses the build's flags
    np.testing.assert_allclose(H1.to_dense(), dense(model.eval(), lambda m: ce(m(x), y)), rtol=1e-10, atol=1e-12)


def test_issue26_item3_one_module_switched_after_build_and_train_mode_operator_switched_to_eval():
    model, x, y = bn_dropout()
    ref = dense(model, lambda m: ce(m(x), y))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=False)
    model[3].train()  # dropout alone
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12)
    model.train()
    Ht = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=False, train_mode=True, seed=3)
    v = torch.randn(H.shape[0], dtype=F64)
    before = Ht @ v
    model.eval()  # a training-mode operator stays one
    assert torch.equal(Ht @ v, before)


@pytest.mark.parametrize("mode", MODES)
def test_issue26_item3_products_ignore_the_callers_autocast(mode):
    model, x, y = bn_dropout()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])
    v, V = torch.randn(H.shape[0], dtype=F64), torch.randn(H.shape[0], 3, dtype=F64)
    plain, block = H @ v, H @ V
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(H @ v, plain, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(H @ V, block, rtol=1e-12, atol=1e-14)
        Ha = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), **MODES[mode])  # built under autocast
    np.testing.assert_allclose(Ha.to_dense(), dense(model, lambda m: ce(m(x), y)), rtol=1e-10, atol=1e-12)


def test_issue26_item3_products_ignore_grad_mode_and_default_dtype():
    class Scaled(nn.Module):  # a constant made in the default dtype, as models do
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.lin(x)) * torch.tensor(0.1)

    torch.manual_seed(0)
    model = Scaled().to(F64)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    H = curvop.hessian(model, nn.MSELoss(), (x, y), cache=False)
    v = torch.randn(H.shape[0], dtype=F64)
    ref = H @ v
    before = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        assert torch.equal(H @ v, ref)  # the build's float32 constant, not a float64 one
        assert torch.get_default_dtype() == F64
    finally:
        torch.set_default_dtype(before)
    with torch.no_grad():
        assert torch.equal(H @ v, ref)
    with torch.enable_grad(), torch.set_grad_enabled(False):
        assert torch.equal(H @ v, ref)


# --- 1.4: a batch is a pytree ----------------------------------------------------------------------
class Kw(nn.Module):
    """``model(x=..., tag=...)``: a keyword input that is a string."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, tag):
        return self.lin(x) * (2.0 if tag == "double" else 1.0)


class OneArg(nn.Module):
    """``model(inputs)`` with ``inputs`` a dict, a namedtuple or a dataclass."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, inputs):
        x = inputs["x"] if isinstance(inputs, dict) else inputs.x
        scale = inputs.get("scale", 1.0) if isinstance(inputs, dict) else getattr(inputs, "scale", 1.0)
        return torch.tanh(self.lin(x)) * scale


@dataclasses.dataclass
class Features:
    x: torch.Tensor
    scale: float = 3.0
    note: str | None = None


def _xy(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("hvp", ["reverse", "forward"])
def test_issue26_item4_namedtuple_batch_and_loader(hvp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    (x1, y1), (x2, y2) = _xy(6, 0), _xy(2, 1)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), Pair(x1, y1), hvp=hvp)
    np.testing.assert_allclose(H.to_dense(), dense(model, lambda m: ce(m(x1), y1)), rtol=1e-10, atol=1e-12)
    Hn = curvop.hessian(model, nn.CrossEntropyLoss(), [Pair(x1, y1), Pair(x2, y2)], hvp=hvp)  # 6 and 2 samples
    ref = dense(model, lambda m: ce(m(torch.cat([x1, x2])), torch.cat([y1, y2])))
    np.testing.assert_allclose(Hn.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_inputs, scale", [
    (lambda x: ({"x": x},), 1.0),  # a single batch (({"x": X},), y): a one-element tuple holding a dict
    (lambda x: (Pair(x, None),), 1.0),  # a namedtuple input with a None leaf
    (lambda x: (Features(x, 3.0, "kept"),), 3.0),  # a dataclass input with a float and a string
    (lambda x: Features(x, 3.0), 3.0),  # the dataclass itself as the inputs: model(inputs)
])
def test_issue26_item4_nested_inputs_reach_the_model_unchanged(make_inputs, scale):
    torch.manual_seed(0)
    model = OneArg().to(F64)
    x, y = _xy()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    inputs = make_inputs(x)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (inputs, y))
    arg = inputs[0] if isinstance(inputs, tuple) else inputs
    assert type(seen[0]) is type(arg)
    if isinstance(arg, Features):
        assert seen[0].note == arg.note and seen[0].scale == 3.0
    ref = dense(model, lambda m: ce(m({"x": x, "scale": scale}), y))  # written as a plain dict here
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_issue26_item4_dict_inputs_with_a_string_and_dict_targets():
    torch.manual_seed(0)
    model = Kw().to(F64)
    x, y = _xy()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), ({"x": x, "tag": "double"}, y))
    np.testing.assert_allclose(H.to_dense(), dense(model, lambda m: ce(m(x=x, tag="double"), y)), rtol=1e-10,
                               atol=1e-12)
    w = torch.rand(6, dtype=F64)

    def weighted(out, t):  # targets a dict with a tensor and a string
        assert t["kind"] == "weighted"
        return (nn.functional.cross_entropy(out, t["y"], reduction="none") * t["w"]).mean()

    batches = [({"x": x[:4], "tag": "double"}, {"y": y[:4], "w": w[:4], "kind": "weighted"}),
               ({"x": x[4:], "tag": "double"}, {"y": y[4:], "w": w[4:], "kind": "weighted"})]
    Hn = curvop.hessian(model, weighted, batches, reduction="mean")
    ref = dense(model, lambda m: weighted(m(x=x, tag="double"), {"y": y, "w": w, "kind": "weighted"}))
    np.testing.assert_allclose(Hn.to_dense(), ref, rtol=1e-10, atol=1e-12)


class PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True, bidirectional=True), nn.Linear(8, 2)

    def forward(self, packed):
        _, (h, _) = self.rnn(packed)
        return self.head(torch.cat([h[0], h[1]], -1))


def _packed():
    torch.manual_seed(0)
    model = PackedLSTM().to(F64)
    seq = torch.randn(3, 5, 3, dtype=F64)
    packed = pack_padded_sequence(seq, torch.tensor([5, 3, 2]), batch_first=True)
    return model, packed, torch.tensor([0, 1, 1])


def test_issue26_item4_packed_sequence_batch():
    model, packed, y = _packed()
    ref = dense(model, lambda m: ce(m(packed), y))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (packed, y))
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12)
    Hf = curvop.hessian(model, nn.CrossEntropyLoss(), [(packed, y)], cache=False)  # a loader of one
    np.testing.assert_allclose(Hf.to_dense(), ref, rtol=1e-10, atol=1e-12)


# --- 1.5: a failing mode falls back or says which mode works --------------------------------------
def test_issue26_item5_forward_mode_on_packed_sequences_names_reverse():
    model, packed, y = _packed()
    with pytest.raises(ModeError, match=r"hvp='forward'.*hvp='reverse', cache=True works") as info:
        curvop.hessian(model, nn.CrossEntropyLoss(), (packed, y), hvp="forward")
    assert "\n" not in str(info.value)


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))


def _backward_hooked():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    model[0].register_full_backward_hook(lambda *a: None)
    return model


@pytest.mark.parametrize("make, reason", [
    (lambda: Checkpointed().to(F64), "saved-tensor hooks"),
    (_backward_hooked, "autograd.Function without setup_context"),
])
@pytest.mark.parametrize("cache", [False, True])
def test_issue26_item5_forward_mode_refused_under_checkpointing_and_backward_hooks(make, reason, cache):
    torch.manual_seed(0)
    model = make()
    x, y = _xy()
    with pytest.raises(ModeError, match=f"{reason}.*hvp='reverse', cache={cache} works"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), hvp="forward", cache=cache)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))  # auto: reverse, exact
    np.testing.assert_allclose(H.to_dense(), dense(model, lambda m: ce(m(x), y)), rtol=1e-10, atol=1e-12)


def test_issue26_item5_first_product_is_checked_when_the_build_ran_none():
    """``check_deterministic=False`` and no cache (a loader): no product ran at build; the first
    product is where the mode is found out, and refused naming the one that works."""
    model, packed, y = _packed()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), [(packed, y), (packed, y)], hvp="forward",
                       check_deterministic=False)
    with pytest.raises(ModeError, match="hvp='reverse', cache=False works"):
        H @ np.ones(H.shape[0])


def test_issue26_item5_a_real_error_in_forward_mode_is_not_swallowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(F64)  # expects 5 features
    x, y = _xy()  # 4 features
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), hvp="forward")


class Bag(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("mode", MODES)
def test_issue26_item5_sparse_embedding_is_differentiated_with_dense_gradients(mode):
    torch.manual_seed(0)
    model = Bag().to(F64)
    ids, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (ids, y), **MODES[mode])
    ref_model = Bag(sparse=False).to(F64)
    ref_model.load_state_dict(model.state_dict())
    np.testing.assert_allclose(H.to_dense(), dense(ref_model, lambda m: ce(m(ids), y)), rtol=1e-10, atol=1e-12)
    assert model.emb.sparse  # the user's module is unchanged


@pytest.mark.parametrize("hvp", ["auto", "forward"])
def test_issue26_item5_ops_without_second_derivative_name_the_module_and_a_workaround(hvp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _xy()
    with pytest.raises(NoSecondDerivativeError, match=r"the loss_fn: .*multi_margin_loss \(MultiMarginLoss\).*"
                                                      r"plain ops") as info:
        curvop.hessian(model, nn.MultiMarginLoss(), (x, y), hvp=hvp)
    assert info.value.op == "multi_margin_loss"

    class CTC(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.ctc = nn.Linear(4, 5), nn.CTCLoss()

        def forward(self, xs, targets):
            logp = self.lin(xs).log_softmax(-1)
            return self.ctc(logp, targets, torch.tensor([6, 6]), torch.tensor([2, 2]))

    ctc = CTC().to(F64)
    with pytest.raises(NoSecondDerivativeError, match=r"module 'ctc'.*ctc_loss \(CTCLoss\).*torch.logsumexp"):
        curvop.hessian(ctc, None, (torch.randn(6, 2, 4, dtype=F64), torch.tensor([[1, 2], [3, 4]])), hvp=hvp)


def test_issue26_item5_compiled_model_uses_orig_mod_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _xy()
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match="torch.compile.*model._orig_mod"):
        H = curvop.hessian(compiled, nn.CrossEntropyLoss(), (x, y))
    np.testing.assert_allclose(H.to_dense(), dense(model, lambda m: ce(m(x), y)), rtol=1e-10, atol=1e-12)
    outer = nn.Sequential(torch.compile(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with pytest.raises(TypeError, match=r"submodule '0' is compiled with torch.compile.*0\._orig_mod"):
        curvop.hessian(outer, nn.CrossEntropyLoss(), (x, y))


def test_issue26_item5_torchscript_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _xy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match="TorchScript module.*pass the nn.Module it was scripted from"):
        curvop.hessian(scripted, nn.CrossEntropyLoss(), (x, y))


# --- section 2: a float64 model computing in float32 inside -----------------------------------------
class Norm32(nn.Module):
    """An RMSNorm that computes in float32 whatever the model's dtype (as Llama's and T5's do)."""

    def forward(self, h):
        h32 = h.to(torch.float32)
        return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


class WithNorm(nn.Module):
    def __init__(self, cast_output=False):
        super().__init__()
        self.lin, self.norm, self.head, self.cast_output = nn.Linear(4, 5), Norm32(), nn.Linear(5, 3), cast_output

    def forward(self, x, mask=None):
        h = self.norm(self.lin(x))
        if mask is not None:
            h = h * mask.float()  # a mask of ints made float32: no parameter depends on it
        out = self.head(h)
        return out.float() if self.cast_output else out  # as Mamba's logits


def test_issue26_section2_float32_inside_a_float64_model_is_named():
    torch.manual_seed(0)
    model = WithNorm().to(F64)
    x, y = _xy()
    with pytest.warns(PrecisionWarning, match=r"'norm' \(Norm32, Tensor\.to -> float32\)"):
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))


def test_issue26_section2_float32_mask_alone_gives_no_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    x, y = _xy()

    def loss(out, t):
        return nn.functional.cross_entropy(out * (t >= 0).float()[:, None], t)  # float32 mask, exact 0/1

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        curvop.hessian(model, loss, (x, y))


def test_issue26_section2_model_returning_float32_outputs_gets_advice_that_applies():
    torch.manual_seed(0)
    model = WithNorm(cast_output=True).to(F64)
    x, y = _xy()
    with pytest.raises(LossPrecisionError, match=r"model itself \(WithNorm\) returns float32 outputs.*'norm' "
                                                 r"\(Norm32.*copy.deepcopy\(model\)\.float\(\)") as info:
        curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    assert "out.logits" not in str(info.value)  # the advice for a loss upcast: it cannot apply here


# --- section 4: messages ------------------------------------------------------------------------------
def test_issue26_section4_loss_fn_none_with_a_tuple_output_names_return_dict():
    class ReturnsTuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, labels):
            logits = self.lin(x)
            return nn.functional.cross_entropy(logits, labels), logits  # return_dict=False

    model = ReturnsTuple().to(F64)
    x, y = _xy()
    with pytest.raises(ValueError, match=r"plain tuple of 2 .*return_dict=False.*return_dict=True"):
        curvop.hessian(model, None, {"x": x, "labels": y})
