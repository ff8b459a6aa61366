"""Issue 11 item 1: attention models work with the defaults, in every mode, on any device.

Torch's fused attention kernels have no second derivative and no forward-mode derivative; curvop
evaluates the loss with attention through torch's math kernel (curvop.backends.torch.functions).
References here are double backward in float64 under ``sdpa_kernel(SDPBackend.MATH)``: torch's
own kernel choice, not curvop's rewrite.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import curvop  # noqa: E402
from curvop.backends.torch.functions import attention  # noqa: E402

MODES = [(hvp, cache) for hvp in ("forward", "reverse") for cache in (True, False)]


class MHAHead(nn.Module):
    """nn.MultiheadAttention as Transformer layers call it (no weights), with a padding mask."""

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)
        # one padded key in the first sequence (a buffer: torch.func.linearize, which the cached
        # forward mode uses, mis-traces a mask built in forward by in-place assignment)
        self.register_buffer("pad", torch.arange(5) == torch.tensor([[4], [5], [5], [5]]))

    def forward(self, x):
        out, _ = self.attn(x, x, x, key_padding_mask=self.pad, need_weights=False)
        return self.head(out.mean(1))


class Block(nn.Module):
    """A timm-style pre-norm block calling F.scaled_dot_product_attention directly."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv), class token, position embedding, two blocks, head: 4x8x8 images."""

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(4, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.blocks = nn.Sequential(Block(d, heads), Block(d, heads))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class Encoder(nn.Module):
    def __init__(self, d=8, classes=3, **kw):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True, **kw)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


MODELS = {
    "encoder_layer": lambda: Encoder(),
    "encoder_layer_norm_first_gelu": lambda: Encoder(norm_first=True, activation="gelu"),
    "multihead_attention": MHAHead,
    "tiny_vit": TinyViT,
}


def make(name, n=4, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]().double().eval()  # eval: the encoder layer's dropout is off
    shape = (n, 4, 8, 8) if name == "tiny_vit" else (n, 5, 8)
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(shape, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def reference_hvp(model, loss_fn, x, y, v):
    """H @ v by double backward with torch's math attention kernel, float64."""
    names = [k for k, p in model.named_parameters()]
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        vs = torch.split(torch.as_tensor(v), [params[k].numel() for k in names])
        dot = sum((gi * vi.view_as(gi)).sum() for gi, vi in zip(g, vs))
        hv = torch.autograd.grad(dot, list(params.values()))
    return torch.cat([h.reshape(-1) for h in hv]).numpy()


@pytest.mark.parametrize("hvp, cache", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_issue11_item1_attention_models_with_defaults_match_math_kernel_reference(name, hvp, cache):
    model, x, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss_fn, (x, y), hvp=hvp, cache=cache)
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    ref = reference_hvp(model, loss_fn, x, y, v)
    np.testing.assert_allclose(H @ v, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("name", list(MODELS))
def test_issue11_item1_attention_models_build_with_no_option(name):
    model, x, y = make(name)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = np.random.default_rng(2).standard_normal(H.shape[0])
    np.testing.assert_allclose(H @ v, reference_hvp(model, nn.CrossEntropyLoss(), x, y, v), rtol=1e-10, atol=1e-12)


SDPA_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask="bool"),
    "bool_mask_one_row_all_masked": dict(attn_mask="bool_row"),
    "float_mask": dict(attn_mask="float"),
    "scale": dict(scale=0.3),
    "gqa": dict(enable_gqa=True),
}


def _sdpa_inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = 1 if case.get("enable_gqa") else 2
    q = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, kv_heads, 5, 3, dtype=torch.float64, generator=g) for _ in range(2))
    kw = dict(case)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(4, 5, generator=g) > 0.3
        kw["attn_mask"][:, 0] = True  # every query sees a key
    elif kw.get("attn_mask") == "bool_row":
        kw["attn_mask"] = torch.ones(4, 5, dtype=torch.bool)
        kw["attn_mask"][1] = False  # this query sees no key: torch's math kernel gives it zeros
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(4, 5, dtype=torch.float64, generator=g)
    return (q, k, v), kw


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_issue11_item1_attention_is_torch_attention_with_all_derivatives(case):
    (q, k, v), kw = _sdpa_inputs(SDPA_CASES[case])
    with torch.no_grad():
        np.testing.assert_allclose(attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
                                   rtol=1e-13, atol=1e-15)
    f = lambda q, k, v: attention(q, k, v, **kw)  # noqa: E731
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradgradcheck(f, inputs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False)
    # forward over reverse, what hvp="forward" runs
    loss = lambda q: f(q, k.detach(), v.detach()).pow(2).sum()  # noqa: E731
    t = torch.randn_like(q)
    hv = torch.func.jvp(torch.func.grad(loss), (q.detach(),), (t,))[1]
    with sdpa_kernel(SDPBackend.MATH):
        qq = q.detach().requires_grad_(True)
        g = torch.autograd.grad(F.scaled_dot_product_attention(qq, k, v, **kw).pow(2).sum(), qq, create_graph=True)[0]
        ref = torch.autograd.grad(g, qq, t)[0]
    np.testing.assert_allclose(hv, ref, rtol=1e-11, atol=1e-13)


def test_issue11_item1_fused_kernels_really_lack_second_derivatives():
    """The failure this fixes: without curvop, torch's default attention kernel on CPU cannot be
    differentiated twice (if a torch release adds the derivative, this test says the rewrite can go)."""
    (q, k, v), _ = _sdpa_inputs({})
    q.requires_grad_(True)
    g = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).pow(2).sum(), q, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product"):
        torch.autograd.grad(g.sum(), q)


def test_issue11_item1_fast_paths_are_skipped_and_global_settings_untouched():
    model, x, y = make("encoder_layer")
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=False)
    seen = []

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    real, torch._transformer_encoder_layer_fwd = torch._transformer_encoder_layer_fwd, spy
    try:
        H @ np.ones(H.shape[0])
    finally:
        torch._transformer_encoder_layer_fwd = real
    assert not seen  # the fused encoder layer is not used inside curvop ...
    with torch.no_grad():
        torch._transformer_encoder_layer_fwd = spy
        try:
            model(x)
        finally:
            torch._transformer_encoder_layer_fwd = real
    assert seen  # ... but still is outside, in the user's own no-grad inference
    assert flags == (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())


def _double_backward_runs(q, k, v) -> bool:
    """Whether the second derivative of attention goes through: curvop's math attention, not torch's
    fused kernel (which has none)."""
    g = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).pow(2).sum(), q, create_graph=True)[0]
    try:
        torch.autograd.grad(g.sum(), q)
    except RuntimeError:
        return False
    return True


def test_issue11_item1_rewrite_is_per_thread():
    """While one thread is inside a product (its forward, where curvop's rewrite is active), attention
    in another thread is torch's own (fused) kernel: the other thread checks at that very moment."""
    model, x, y = make("tiny_vit")
    H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), cache=False)
    (q, k, v), _ = _sdpa_inputs({})
    q.requires_grad_(True)
    assert not _double_backward_runs(q, k, v)  # torch's kernel here, outside any product
    requests, answers, inside, outside = queue.Queue(), queue.Queue(), [], []

    def other():  # one check per request, while the main thread waits inside its forward
        while requests.get() is not None:
            answers.put(_double_backward_runs(q, k, v))

    def pause(module, args):  # a forward pre-hook: in the main thread, inside curvop's product
        inside.append(_double_backward_runs(q, k, v))
        requests.put(True)
        outside.append(answers.get(timeout=120))  # a thread that never ran fails here

    t = threading.Thread(target=other)
    t.start()
    handle = model.blocks[0].register_forward_pre_hook(pause)
    try:
        for _ in range(2):
            H @ np.ones(H.shape[0])
    finally:
        handle.remove()
        requests.put(None)
        t.join(timeout=120)
    assert len(inside) == len(outside) >= 2  # the other thread answered once per forward of a product
    assert all(inside)  # the main thread was inside curvop's rewrite (math attention) ...
    assert not any(outside)  # ... and at that moment the other thread's attention was torch's own


def test_issue11_item1_attention_dropout_in_training_is_a_clear_error():
    """nn.MultiheadAttention's dropout is a float, not a Dropout module: no model.eval() check sees it."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True).double().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attention dropout .*call model.eval\(\)"):
        curvop.hessian(_First(mha), lambda out, y: out.pow(2).mean(), (x, x), cache=False)
    q = x.view(2, 5, 2, 4).transpose(1, 2)
    with pytest.raises(ValueError, match=r"dropout_p=0.2.*call model.eval\(\)"):
        curvop.hessian_of(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.2).pow(2).sum(), q)


class _First(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
@pytest.mark.parametrize("hvp, cache", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_issue11_item1_attention_on_cuda_float32_fused_kernels(name, hvp, cache):
    """float32 on CUDA selects the memory-efficient or flash kernel, which has no second derivative."""
    model, x, y = make(name)
    loss_fn = nn.CrossEntropyLoss()
    v = np.random.default_rng(1).standard_normal(sum(p.numel() for p in model.parameters()))
    ref = reference_hvp(model, loss_fn, x, y, v)
    model32 = model.float().cuda()
    H = curvop.hessian(model32, loss_fn, (x.float().cuda(), y.cuda()), hvp=hvp, cache=cache)
    np.testing.assert_allclose(H @ v.astype(np.float32), ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_issue11_item1_cuda_fused_attention_lacks_second_derivative_without_curvop():
    q, k, v = (torch.randn(2, 2, 64, 32, device="cuda", requires_grad=True) for _ in range(3))
    g = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).pow(2).sum(), q, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="derivative for .*(efficient|flash)"):
        torch.autograd.grad(g.sum(), q)
