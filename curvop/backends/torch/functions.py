"""Attention and activations as ops that torch can differentiate twice, in both modes.

Some of torch's fused kernels have a first derivative and nothing more (torch 2.13):

* ``F.scaled_dot_product_attention`` dispatches to a fused kernel (flash attention for CPU; flash
  or memory-efficient attention on CUDA) whose backward has no derivative
  (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
  implemented``) and which has no forward-mode derivative at all. ``nn.MultiheadAttention``,
  ``nn.TransformerEncoderLayer``, torchvision and timm ViTs and Hugging Face models all call it.
  Their fused fast paths (``torch._native_multi_head_attention``,
  ``torch._transformer_encoder_layer_fwd``) are skipped while a ``TorchFunctionMode`` is active
  (``has_torch_function`` is then true), so they end up here too.
* ``F.hardsigmoid`` (MobileNetV3's squeeze-excitation gate) has a backward, ``hardsigmoid_backward``,
  with no derivative in either mode.
* ``F.rrelu`` in eval mode, in place, has no forward-mode derivative.

:data:`EXACT` maps each of these functions to the same function of the same tensors built from
ops with derivatives of every order: attention through torch's own math kernel
(``aten::_scaled_dot_product_attention_math``, what ``sdpa_kernel(SDPBackend.MATH)`` selects),
``hardsigmoid(x)`` as ``hardtanh(x + 3, 0, 6) / 6`` (torch's formula, with the same zero derivative
at -3 and 3), eval-mode ``rrelu`` as the ``leaky_relu`` with slope ``(lower + upper) / 2`` it is.
:class:`curvop.backends.torch.rewrites.Rewrites` applies the map to every loss evaluation, so no
global setting (``torch.backends.cuda.enable_flash_sdp`` and friends) is touched, and the map is
thread-local like every ``TorchFunctionMode``. Random ops (attention dropout, ``rrelu`` in training
mode) raise a ``ValueError``: their Hessian-vector products would differ on every call.

Some ops have a second derivative that is *wrong*, found by ``benchmarks/op_audit.py`` (a sweep of
the ops of ``torch.nn`` layers and losses against central differences, ``docs/reliability.md``):

* ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and ``nn.utils.weight_norm``,
  ``dim=0`` or the last dim, where torch calls its fused ``_weight_norm_interface``) has a wrong
  double backward (the "Hessian" of a weight-normed MLP is 0.55 off and not symmetric) and no
  forward-mode derivative. :func:`weight_norm` is torch's own unfused formula ``v * (g / ||v||)``.
* ``F.embedding`` with an option whose "gradient" is no derivative (:func:`embedding`):
  ``padding_idx`` (forward mode differentiates through the padding row, which gets no gradient:
  0.48 off, not symmetric), ``scale_grad_by_freq`` (the rows' gradients divided by their frequency:
  not symmetric), and ``max_norm`` (which writes the renormalised rows into the weight, the
  user's, at every forward).

:data:`FORWARD` holds what only forward mode (``hvp="forward"``) needs, each the same function of
the same tensors:

* ``F.mse_loss``: its backward's forward-mode formula writes into a zero tensor, so ``jvp`` of its
  gradient raises "ZeroTensors are immutable" (``reduction="mean"``) and tracing it for a cached
  product kills the process with SIGSEGV (``"sum"``). :func:`mse_loss` is ``(input - target)**2``
  reduced.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["EXACT", "FORWARD", "attention", "embedding", "hardsigmoid", "mse_loss", "multi_head_attention_forward",
           "rrelu", "weight_norm"]

_math = torch.ops.aten._scaled_dot_product_attention_math


def _random(what: str) -> ValueError:
    return ValueError(
        f"{what} inside the loss draws random numbers, so every Hessian-vector product would differ; "
        "call model.eval() before building the Hessian (or pass dropout_p=0.0 / training=False)"
    )


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through torch's math kernel: ``softmax(q kᵀ · scale +
    mask) v``, differentiable to every order in both modes, on every device."""
    if dropout_p > 0.0:
        raise _random(f"attention dropout (scaled_dot_product_attention with dropout_p={dropout_p})")
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as F.scaled_dot_product_attention does
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(~attn_mask, float("-inf"))
    return _math(query, key, value, attn_mask, 0.0, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid``: ``0`` below -3, ``1`` above 3, ``x / 6 + 1/2`` between."""
    out = F.hardtanh(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


def _hardsigmoid_(input: torch.Tensor) -> torch.Tensor:
    return hardsigmoid(input, True)


def rrelu(input: torch.Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> torch.Tensor:
    """``F.rrelu`` in eval mode: the leaky ReLU with the mean slope ``(lower + upper) / 2``."""
    if training:
        raise _random("rrelu in training mode (random slopes)")
    return F.leaky_relu(input, (lower + upper) / 2, inplace)


def _rrelu_op(input, lower=1.0 / 8, upper=1.0 / 3, training=False, generator=None):  # torch.rrelu
    return rrelu(input, lower, upper, training)


def _rrelu_op_(input, lower=1.0 / 8, upper=1.0 / 3, training=False, generator=None):  # torch.rrelu_
    return rrelu(input, lower, upper, training, True)


_MHA = inspect.signature(F.multi_head_attention_forward)


def multi_head_attention_forward(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) through its explicit branch.

    Asked for no weights it calls ``F.scaled_dot_product_attention`` from Python, out of the reach
    of a ``TorchFunctionMode`` that is handling this very call; its ``need_weights=True`` branch is
    the same attention written as ``softmax(q kᵀ / sqrt(d) + mask) v`` with ``baddbmm``/``bmm``.
    The weights it then computes are dropped when they were not asked for."""
    a = _MHA.bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    if a["training"] and a["dropout_p"] > 0.0:
        raise _random(f"attention dropout (nn.MultiheadAttention with dropout={a['dropout_p']} in training mode)")
    wanted = a["need_weights"]
    a["need_weights"] = True
    out, weights = F.multi_head_attention_forward(**a)
    return out, weights if wanted else None


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)``: ``v * (g / ||v||)``, the norm over every dimension but
    ``dim`` (over all of ``v`` for ``dim=-1``), as torch computes it when it does not fuse."""
    if dim == -1:
        norm = torch.linalg.vector_norm(v)
    else:
        dim = dim % v.dim()
        norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != dim], keepdim=True)
    return v * (g / norm)


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # torch._C._nn.mse_loss's enum
_MSE = inspect.signature(F.mse_loss)


def mse_loss(*args, **kwargs) -> torch.Tensor:
    """``F.mse_loss``: ``(input - target)**2`` reduced, with torch's broadcasting and its warning."""
    a = _MSE.bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    if a.get("weight") is not None or a["size_average"] is not None or a["reduce"] is not None:
        return F.mse_loss(*args, **kwargs)  # weighted: already plain ops; legacy flags: torch decides
    return _squared_error(a["input"], a["target"], a["reduction"])


def _mse_loss_op(input: torch.Tensor, target: torch.Tensor, reduction: int = 1) -> torch.Tensor:  # torch._C._nn
    return _squared_error(input, target, _REDUCTIONS[int(reduction)])


def _squared_error(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    if target.shape != input.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. Please ensure they have "
                      "the same size.", stacklevel=4)  # torch's own warning
        input, target = torch.broadcast_tensors(input, target)
    d = input - target
    out = d * d
    if reduction == "none":
        return out
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return out.mean() if reduction == "mean" else out.sum()


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None, max_norm: float | None = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """``F.embedding`` as a function of ``weight`` whose derivatives are derivatives, in every mode:

    * ``padding_idx``: the padding positions are held fixed (``detach``), as the padding row's zero
      gradient says (forward mode differentiated through the row: 0.48 off, not symmetric);
    * ``scale_grad_by_freq``: dropped, torch's scaling of the gradient's rows by their frequency in
      the batch is no derivative (its "Hessian" is not symmetric: 0.09 on a small model);
    * ``max_norm``: the looked-up rows are renormalised as torch does, ``max_norm / (norm + 1e-7)``
      above ``max_norm``, as part of the function; torch writes the renormalised rows into
      ``weight`` under ``no_grad`` at every forward, which would change the user's model.
    """
    if sparse or (padding_idx is None and max_norm is None and not scale_grad_by_freq):
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    out = F.embedding(input, weight)
    if max_norm is not None:
        norm = torch.linalg.vector_norm(out, ord=norm_type, dim=-1, keepdim=True)
        out = out * torch.where(norm > max_norm, max_norm / (norm + 1e-7), torch.ones_like(norm))
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += weight.shape[0]
        out = torch.where((input == padding_idx).unsqueeze(-1), out.detach(), out)
    return out


def _embedding_op(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):  # torch.embedding
    return embedding(indices, weight, None if padding_idx < 0 else padding_idx, None, 2.0, scale_grad_by_freq, sparse)


EXACT: dict[Callable, Callable] = {
    F.scaled_dot_product_attention: attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
    F.hardsigmoid: hardsigmoid,
    torch._C._nn.hardsigmoid: hardsigmoid,
    torch._C._nn.hardsigmoid_: _hardsigmoid_,
    F.rrelu: rrelu,
    torch.rrelu: _rrelu_op,
    torch.rrelu_: _rrelu_op_,  # also F.rrelu_
    torch._weight_norm: weight_norm,  # nn.utils.parametrizations.weight_norm, nn.utils.weight_norm
    F.embedding: embedding,  # padding_idx, scale_grad_by_freq, max_norm
    torch.embedding: _embedding_op,
}

#: What forward mode needs besides :data:`EXACT` (see the module docstring).
FORWARD: dict[Callable, Callable] = {
    F.mse_loss: mse_loss,
    torch._C._nn.mse_loss: _mse_loss_op,
}
