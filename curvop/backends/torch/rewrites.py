"""Exact rewrites of torch ops whose built-in second derivatives are slow.

A cached reverse-mode HVP is one backward pass through the graph of the gradient, so its cost is
set by torch's *double-backward* formulas. Two of them dominate a CNN's product on CPU (measured
with ``torch.profiler``, ``benchmarks/peers.py`` CNN, torch 2.13, 2 cores):

* eval-mode BatchNorm goes through the general training-mode ``batch_norm_double_backward``
  (about a third of the product) although in eval mode it is a per-channel affine map;
* ``conv2d``'s double backward computes its weight term as a convolution with batch and channel
  swapped and the whole output as kernel, a slow path.

:class:`Rewrites` is a ``TorchFunctionMode`` active only while the loss (and so the gradient
graph) is built. It computes eval-mode ``F.batch_norm`` as ``x * scale + shift`` (folded into the
weights of a ``conv2d`` whose untouched output it normalises) and, on CPU, ``conv2d`` through
three autograd functions - convolution, its input gradient and its weight gradient - whose
derivatives are each other, so every order of derivative runs the fast convolution kernels. Both
are the same function of the same tensors; products agree with torch's own to rounding
(``tests/backends/torch/test_torch_rewrites.py`` checks them against the dense Hessian). The convolution rewrite
wins only where a layer's output is large next to its kernel (:func:`conv_wins`, measured by
``benchmarks/models.py --layers``; on resnet18 and MobileNetV3 at 32x32 rewriting every layer was
slower than torch), so the backend applies it per layer, and folds BatchNorm only into a rewritten
convolution. For cached products GELU (erf form) is computed by an autograd function whose graph holds
``gelu'(x)`` and ``gelu''(x)`` as tensors (:func:`gelu`), where torch's ``GeluBackwardBackward0``
recomputes an erf and exps per element on every product. The same mode also carries the rewrites
that make attention and ``hardsigmoid`` differentiable twice
(:mod:`curvop.backends.torch.functions`), which apply whatever ``fast`` says. Everything else
passes through untouched.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

from curvop.backends.torch.functions import EXACT, FORWARD

_aten = torch.ops.aten
_BN = inspect.signature(F.batch_norm)
_CONV = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)


def _shape_only(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A tensor of ``shape`` that owns no memory: ``convolution_backward`` reads only its shape."""
    return like.new_empty(()).expand(shape)


def _conv(x, w, shape, cfg):
    return _aten.convolution(x, w, None, *cfg[:3], False, [0, 0], cfg[3])


def _input_grad(g, w, xshape, cfg):
    return _aten.convolution_backward(g, _shape_only(g, xshape), w, None, *cfg[:3], False, [0, 0], cfg[3],
                                      [True, False, False])[0]


def _weight_grad(x, g, wshape, cfg):
    return _aten.convolution_backward(g, x, _shape_only(g, wshape), None, *cfg[:3], False, [0, 0], cfg[3],
                                      [False, True, False])[1]


def _bilinear(name: str, kernel, d_first, d_second) -> type[Function]:
    """An autograd function ``kernel(a, b, shape, cfg)``, bilinear in ``a`` and ``b``, whose
    derivatives ``d_first(a, b, gg, cfg)`` / ``d_second(a, b, gg, cfg)`` are again such functions."""

    def forward(a, b, shape, cfg):
        return kernel(a, b, shape, cfg)

    def setup_context(ctx, inputs, output):
        a, b, _, ctx.cfg = inputs
        ctx.save_for_backward(a, b)

    def backward(ctx, gg):
        a, b = ctx.saved_tensors
        da = d_first(a, b, gg, ctx.cfg) if ctx.needs_input_grad[0] else None
        db = d_second(a, b, gg, ctx.cfg) if ctx.needs_input_grad[1] else None
        return da, db, None, None

    return type(name, (Function,), {
        "__doc__": f"{kernel.__name__.lstrip('_')} with derivatives of every order (see _bilinear)",
        "generate_vmap_rule": True,  # vmap: products of several vectors at once (is_grads_batched)
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })


# The three bilinear maps of a convolution and their derivatives, each one of the three again:
# conv(x, w); input_grad(g, w) = d<g, conv(x, w)>/dx; weight_grad(x, g) = d<g, conv(x, w)>/dw.
_Conv = _bilinear("_Conv", _conv,
                  lambda x, w, gg, cfg: _InputGrad.apply(gg, w, x.shape, cfg),
                  lambda x, w, gg, cfg: _WeightGrad.apply(x, gg, w.shape, cfg))
_InputGrad = _bilinear("_InputGrad", _input_grad,
                       lambda g, w, gg, cfg: _Conv.apply(gg, w, None, cfg),
                       lambda g, w, gg, cfg: _WeightGrad.apply(gg, g, w.shape, cfg))
_WeightGrad = _bilinear("_WeightGrad", _weight_grad,
                        lambda x, g, gg, cfg: _InputGrad.apply(g, gg, x.shape, cfg),
                        lambda x, g, gg, cfg: _Conv.apply(x, gg, None, cfg))


def _pair(a: Any) -> list[int]:
    return [int(i) for i in a] if isinstance(a, (tuple, list)) else [int(a), int(a)]


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` (4-D input, numeric padding) with fast derivatives of every order."""
    y = _Conv.apply(x, w, None, (_pair(stride), _pair(padding), _pair(dilation), int(groups)))
    return y if bias is None else y + bias.view(1, -1, 1, 1)


# Per layer, the rewritten conv2d wins only where the output is large next to the kernel: the
# product's cost is then the weight term, which torch computes slowly. ``benchmarks/models.py
# --layers`` measures one conv's cached product both ways (torch 2.13, one CPU thread); the rewrite
# is used where out.numel() >= RATIO * weight.numel(), by dtype and kind of convolution:
# float64 3x3 at ratio >= 3.5 measured 0.69-0.94x torch's time, below 0.44 0.94-1.3x; 1x1 below 7
# up to 16x (!) and 0.90x at 51 (not worth the risk: never rewritten). float32: depthwise
# 0.30-0.71x at every size, 3x3 0.62-0.93x at ratio >= 227 and 1.07-1.6x below 28, 1x1 1.1-7x.
RATIO = {torch.float64: {"dense": 2.0, "pointwise": float("inf")},  # depthwise: DEPTHWISE_MIN_BATCH
         torch.float32: {"dense": 128.0, "pointwise": float("inf"), "depthwise": 0.0}}
# A float64 depthwise convolution goes by its batch instead: torch's double backward of it is the
# bulk of a depthwise network's product in float64 (MobileNetV3 at batch 32: 575 of 690 ms over its
# convolutions), and the rewrite took 0.57-1.08x its time in every depthwise layer of MobileNetV3
# and tinynet_e at batch 32 (ConvNeXt's: 0.94x in total) and 0.91-0.93x in total at 16, whatever the
# layer's size, but 0.99-1.10x at 8 and 1.05-1.53x per layer at 4 (``benchmarks/models.py
# --layers-of MODEL --batches B``). Whole models on a quiet 16-core host (docs/performance.md):
# rewriting every convolution took 0.86x the old per-size rule's time on MobileNetV3 and tinynet_e
# in float64 at batch 32, and 1.13-1.17x at batch 4.
DEPTHWISE_MIN_BATCH = {torch.float64: 16}


# An eval BatchNorm not folded into a convolution is an affine map only on large activations, where
# torch's training-mode double backward (two dozen full-size passes) costs: on the 70k-parameter CNN
# at batch 128 it was a third of the product; on resnet18 and tinynet_e at batch 4 the affine map
# measured no faster (4.77 vs 4.70 and 2.61 vs 2.30 gradients, benchmarks/models.py "no conv").
AFFINE_MIN = 1 << 17


def conv_wins(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether :func:`conv2d`'s cached product is measured faster than torch's for this layer."""
    ratios = RATIO.get(x.dtype)
    if ratios is None:
        return False
    kind = "pointwise" if w.shape[-2:] == (1, 1) else "dense" if groups == 1 else "depthwise"
    if kind == "depthwise" and x.dtype in DEPTHWISE_MIN_BATCH:
        return x.shape[0] >= DEPTHWISE_MIN_BATCH[x.dtype]
    out = 1
    for size, k, s, p, d in zip(x.shape[-2:], w.shape[-2:], _pair(stride), _pair(padding), _pair(dilation)):
        out *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return x.shape[0] * w.shape[0] * out >= ratios[kind] * w.numel()


def _gelu_poly(k: int) -> list[float]:
    """Coefficients (constant first) of p_k, where the k-th derivative of x Phi(x) is phi(x) p_k(x)
    for k >= 2: p_2 = 2 - x^2, p_(k+1) = p_k' - x p_k."""
    p = [2.0, 0.0, -1.0]
    for _ in range(k - 2):
        p = [a - b for a, b in zip([i * c for i, c in enumerate(p)][1:] + [0.0, 0.0], [0.0] + p)]
    return p


def _gelu_derivative(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th derivative of ``gelu(x) = x Phi(x)`` (erf form), ``k >= 0``."""
    if k == 0:
        return F.gelu(x)
    c = 1 / math.sqrt(2 * math.pi)
    if k == 1:  # Phi(x) + x phi(x)
        return torch.special.ndtr(x).addcmul_(x, x.square().mul_(-0.5).exp_(), value=c)
    if k == 2:  # phi(x) (2 - x^2)
        x2 = x.square()
        return x2.mul(-0.5).exp_().mul_(x2.neg_().add_(2)).mul_(c)
    phi = torch.exp(-0.5 * x * x) * c
    p = _gelu_poly(k)
    out = torch.full_like(x, p[-1])
    for c in reversed(p[:-1]):
        out = out.mul_(x).add_(c)
    return out.mul_(phi)


class _Gelu(Function):
    """``_Gelu.apply(x, k)``: the k-th derivative of ``gelu(x)``; its derivative is ``_Gelu.apply(x, k + 1)``.

    Each node holds the next derivative as a tensor, computed once when the node is made, so a
    backward pass through it is one multiplication; differentiated with ``create_graph`` it makes
    the next node instead, so derivatives of every order are exact."""

    generate_vmap_rule = True  # vmap: products of several vectors at once (is_grads_batched)

    @staticmethod
    def forward(x, k, known=None):
        return _gelu_derivative(x, k) if known is None else known.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.k = inputs[:2]
        ctx.save_for_backward(x)
        ctx.slope = _gelu_derivative(x, ctx.k + 1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the derivative as a node of the new graph
            return g * _Gelu.apply(x, ctx.k + 1, ctx.slope), None, None
        return g * ctx.slope, None, None


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` (erf form; the tanh approximation stays torch's) whose graphs hold ``gelu'(x)``
    and ``gelu''(x)`` as tensors: a cached product through it is four multiplications instead of
    torch's ``GeluBackward0`` and ``GeluBackwardBackward0`` (an erf and exps per element each).

    Examples
    --------
    >>> import torch
    >>> x = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    >>> bool(torch.allclose(gelu(x), torch.nn.functional.gelu(x)))
    True
    """
    if approximate != "none":
        return F.gelu(input, approximate=approximate)
    return _Gelu.apply(input, 0)


class Rewrites(TorchFunctionMode):
    """Within ``with Rewrites(conv=..., fast=...)``: the ops torch cannot differentiate twice, or
    differentiates wrongly (attention, ``hardsigmoid``, ``_weight_norm``, ...;
    :data:`curvop.backends.torch.functions.EXACT`) always as ops it can, with ``forward=True``
    also those of :data:`~curvop.backends.torch.functions.FORWARD`; with ``fast=True`` also GELU on CPU as :func:`gelu` (unless ``gelu=False``: for
    a graph built on every product its extra derivatives cost more than they save), eval BatchNorm as an affine map
    and ``conv2d`` as above, for every convolution (``conv=True``) or where :func:`conv_wins`
    (``conv="auto"``). A BatchNorm
    right after a rewritten convolution is folded into its weights; with ``conv="auto"`` another
    is rewritten only when its input has at least :data:`AFFINE_MIN` elements."""

    def __init__(self, conv: bool | str = True, fast: bool = True, gelu: bool = True, forward: bool = False):
        super().__init__()
        self.exact = {**EXACT, **FORWARD} if forward else EXACT  # forward mode: FORWARD too
        self.conv = conv if fast else False
        self.fast = fast
        self.gelu = gelu  # pays off only where the graph is built once (uncached: 1.1x slower, tiny ViT)
        self._convs: dict[int, tuple[torch.Tensor, int, tuple]] = {}  # id(output) -> (output, version, args)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            exact = self.exact.get(func)
        except TypeError:  # an unhashable callable: none of ours
            exact = None
        if exact is not None:
            return exact(*args, **kwargs)
        if not self.fast:
            return func(*args, **kwargs)
        if func is F.conv2d and self.conv:
            a = _CONV.bind(*args, **kwargs)
            a.apply_defaults()
            call = tuple(a.arguments.values())
            if (isinstance(call[0], torch.Tensor) and call[0].dim() == 4 and not isinstance(call[4], str)
                    and (self.conv is True or conv_wins(call[0], call[1], *call[3:]))):
                out = conv2d(*call)
                self._convs[id(out)] = (out, out._version, call)
                return out
        elif func is F.gelu:
            x = args[0] if args else kwargs["input"]
            if self.gelu and x.requires_grad and x.dtype in RATIO and x.device.type == "cpu":
                return gelu(*args, **kwargs)
        elif func is F.batch_norm:
            a = _BN.bind(*args, **kwargs)
            a.apply_defaults()
            a = a.arguments
            if (not a["training"] and a["running_mean"] is not None and a["running_var"] is not None
                    and (self.conv != "auto" or self._folds(a["input"]) or a["input"].numel() >= AFFINE_MIN)):
                return self._affine_batch_norm(a)
        return func(*args, **kwargs)

    def _affine_batch_norm(self, a: dict) -> torch.Tensor:
        x = a["input"]
        scale = torch.rsqrt(a["running_var"] + a["eps"])
        shift = -a["running_mean"] * scale
        if a["weight"] is not None:
            scale, shift = scale * a["weight"], shift * a["weight"]
        if a["bias"] is not None:
            shift = shift + a["bias"]
        if self._folds(x):
            cx, w, b, stride, padding, dilation, groups = self._convs[id(x)][2]  # fold into its weights
            shift = shift if b is None else shift + b * scale
            return conv2d(cx, w * scale.view(-1, 1, 1, 1), shift, stride, padding, dilation, groups)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(view), x, scale.view(view))

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the untouched output of a rewritten convolution."""
        made = self._convs.get(id(x))
        return made is not None and made[0] is x and made[1] == x._version and x.dim() == 4
