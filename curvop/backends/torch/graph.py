"""The Hessian from one autograd graph: a closure's, or a gradient the caller computed with ``create_graph``.

``curvop.hessian_of(f, params)`` with torch tensors takes two more forms than a function of the
parameters, both on the *live* leaf tensors ``params`` (a model's parameters), the forms a
``torch.optim`` optimizer sees:

* ``f`` a closure of no arguments that computes the loss with ``params`` themselves (the
  ``optimizer.step(closure)`` convention, without ``backward``): it is evaluated once, under
  curvop's op rewrites (:mod:`curvop.backends.torch.rewrites`), and the graph of its gradient is
  kept; every product is one backward pass through it. The loss and the gradient of that one
  evaluation are :attr:`GraphBackend.loss` and :attr:`GraphBackend.gradient`, so a caller that
  needs them too pays for no second forward pass. If ``params`` change in place, the next product
  evaluates the closure again (the operator is the Hessian at the parameters as they are now).
* ``f`` the gradients themselves, one tensor (or ``None``) per parameter, computed with
  ``create_graph=True`` (``[p.grad for p in params]`` after ``loss.backward(create_graph=True)``):
  products differentiate their graph; nothing is evaluated. After an in-place change of ``params``
  the graph is of the old values and a product is refused.

Products are reverse mode on the cached graph (``hvp="auto"`` or ``"reverse"``, ``cache`` ``"auto"``
or ``True``); the template (:class:`~curvop.backends.template.AutodiffBackend`) does the checks.
"""

from __future__ import annotations

import copy
import inspect
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from curvop._dtypes import dtype_name
from curvop.backends.dataset import Dataset
from curvop.backends.template import AutodiffBackend
from curvop.backends.torch.backend import TorchBackend, _Layout, _reverse_product
from curvop.backends.torch.checks import loss_info, param_infos
from curvop.backends.torch.rewrites import Rewrites
from curvop.backends.torch.state import check_autograd_available, inference_mode_error

__all__ = ["GraphBackend", "graph_form"]

_RELEASED = "this operator's graph was released: make a new one with on(the next closure or gradients)"

Tensor = torch.Tensor


class GraphBackend(TorchBackend):
    """Products of the Hessian of a closure's loss, or of the graph of given gradients, w.r.t. live tensors.

    A :class:`~curvop.backends.torch.TorchBackend` whose loss is one evaluation (no data, no model
    adapter): its array glue, checks and advice are the torch backend's; the graph and what
    follows the parameters are this class's.

    Parameters
    ----------
    params : dict of str to torch.Tensor
        Leaf tensors that require grad (a model's parameters), one dtype and device.
    closure : callable, optional
        ``closure()`` -> scalar loss computed with ``params`` (it must not call ``backward``).
    grads : sequence of torch.Tensor or None, optional
        The gradient of a loss w.r.t. ``params``, computed with ``create_graph=True``.
    hvp, cache, batched, check_deterministic, check_symmetric, check_finite, rewrite, check_loss_dtype
        As for :class:`curvop.backends.torch.TorchBackend`; products are reverse mode on the cached
        graph. ``check_deterministic`` evaluates a closure once more (default ``True``); for
        gradients there is nothing to re-evaluate and it must be ``False``. ``check_symmetric``
        (default: as ``check_deterministic``) multiplies the cached graph three times
        (:mod:`curvop.backends.selfcheck`); ``verify`` is not available (no gradient at other
        parameter values).

    Examples
    --------
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> B = GraphBackend({"w": w}, closure=lambda: (w ** 3).sum())
    >>> B.hvp(torch.tensor([1.0, 0.0], dtype=torch.float64)), B.gradient[0]
    (tensor([6., 0.], dtype=torch.float64), tensor([ 3., 12.], dtype=torch.float64))
    """

    _check_state = _rng = _watch_precision = None  # no model adapter, no train-mode draws, no forward to watch
    _g: tuple[Tensor | None, ...] | None = None  # the gradient with its graph (None: released)

    def __init__(self, params: dict[str, Tensor], *, closure: Callable[[], Tensor] | None = None,
                 grads: Sequence[Tensor | None] | None = None, hvp: str = "auto", cache: bool | str = "auto",
                 batched: bool | str = "auto", check_deterministic: bool = True,
                 check_symmetric: bool | None = None, check_finite: bool = True,
                 rewrite: bool = True, check_loss_dtype: bool = True):
        check_autograd_available()
        if (closure is None) == (grads is None):
            raise TypeError("GraphBackend needs exactly one of closure= and grads=")
        if hvp == "forward" or cache is False:
            raise ValueError(
                f"{'a closure' if closure is not None else 'given gradients'}: products are reverse mode on "
                "the graph the evaluation left (hvp='reverse', cache=True); forward mode and uncached "
                "products need a function of the parameters: curvop.hessian_of(lambda params: ..., params)")
        if grads is not None and check_deterministic is True:
            raise ValueError("given gradients are one fixed graph, there is nothing to evaluate twice: "
                             "pass check_deterministic=False")
        self._begin(Dataset(None), param_infos(params), hvp="reverse", cache=True, batched=batched,
                    check_deterministic=check_deterministic, check_symmetric=check_symmetric,
                    check_finite=check_finite, rewrite=rewrite,
                    check_loss_dtype=check_loss_dtype)
        for k, p in params.items():
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(
                    f"parameter {k!r} is {'not a leaf tensor' if not p.is_leaf else 'a tensor without requires_grad'}: "
                    "a closure or a gradient is differentiated w.r.t. the live tensors it was computed with, "
                    "which must be leaves that require grad (a model's parameters)")
        self._params = dict(params)
        self._live = list(self._params.values())
        self._layout = _Layout(self._params)
        self.device, self.torch_dtype = self._layout.device, self._layout.dtype
        self.dtype, self.size = np.dtype(dtype_name(self.torch_dtype)), int(sum(self._layout.numels))
        self._closure, self._rewrite = closure, bool(rewrite)
        self._default_dtype = torch.get_default_dtype()  # the build's, as for TorchBackend
        self._versions = [p._version for p in self._live]
        #: The loss of the closure's latest evaluation (detached), ``None`` for given gradients.
        self.loss: Tensor | None = None
        #: The gradient of that evaluation (or the given one), detached, one tensor or ``None`` per parameter.
        self.gradient: tuple[Tensor | None, ...] = ()
        if closure is not None:
            first = self._evaluate()
        else:
            self._set_grads(grads)
            first = None
        self._complete(first, check_loss_dtype)

    # --- the graph -------------------------------------------------------------------------------
    def _evaluate(self, describe: bool = True) -> Any:
        """Evaluate the closure under the rewrites; keep its gradient's graph; the loss described
        (``describe=False``, on a new closure of a built operator: checked without a host sync, the
        described loss only when something is wrong, to name it).

        The convolution and GELU rewrites stay off: they pay for themselves over many products of
        one graph, and cost more than they save in a graph used for one or two (an optimizer's),
        ``benchmarks/optim.py``; attention and the other ops torch cannot differentiate twice are
        rewritten (their products would fail otherwise), and eval-mode BatchNorm with ``rewrite``."""
        with torch.enable_grad(), Rewrites(conv=False, fast=self._rewrite, gelu=False):
            loss = self._closure()
        if not describe and not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad
                                 and loss.is_floating_point()):
            self._check_loss(loss_info(loss))  # names the problem
            raise TypeError(f"the closure must return the scalar loss, computed with the parameters; got {loss!r}")
        info = loss_info(loss) if describe else None
        if describe and (not info.type_ok or info.shape not in ((), (1,)) or not loss.requires_grad):
            return info  # the template's check names the problem
        try:
            g = torch.autograd.grad(loss, self._live, create_graph=True, allow_unused=True)
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                raise RuntimeError(
                    "the closure called loss.backward(), which freed the graph curvop differentiates: "
                    "return the loss without calling backward (curvop computes the gradient, and "
                    "optimizers write it to p.grad), or call backward(create_graph=True)") from err
            raise
        self.loss = loss.detach()
        self._g = g
        self.gradient = tuple(None if t is None else t.detach() for t in g)
        return info

    def _set_grads(self, grads: Sequence[Tensor | None]) -> None:
        grads = tuple(grads)
        if len(grads) != len(self._live):
            raise ValueError(f"got {len(grads)} gradients for {len(self._live)} parameters: pass one per parameter "
                             "(None for one the loss does not use)")
        for (k, p), g in zip(self._params.items(), grads):
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != p.shape):
                what = type(g).__name__ if not isinstance(g, torch.Tensor) else f"shape {tuple(g.shape)}"
                raise ValueError(f"the gradient of parameter {k!r} is a {what}; expected a tensor of shape "
                                 f"{tuple(p.shape)}")
        if not any(g is not None and g.requires_grad for g in grads):
            raise ValueError(
                "none of the gradients has a graph, so their derivative is not the Hessian: compute them with "
                "create_graph=True (loss.backward(create_graph=True), or torch.autograd.grad(loss, params, "
                "create_graph=True))")
        self._g = grads
        self.gradient = tuple(None if t is None else t.detach() for t in grads)

    # --- a new graph for the built operator -------------------------------------------------------
    def on(self, data: Any, params: Any = None) -> "GraphBackend":
        """This operator on a new graph of the same parameters: ``data`` is a new closure, or new
        gradients, the form the operator was built from (an optimizer's next step).

        What the build checked is kept (options, parameters, loss dtype, the determinism and
        symmetry checks): only the closure is evaluated, or the gradients are checked against the
        parameters' shapes, and the cache of the new graph made. The loss is checked without a host sync.
        """
        self._rebind(params)
        new = copy.copy(self)
        new._g = None
        if self._closure is not None:
            if not callable(data):
                raise TypeError(f"this operator was built from a closure: on() takes the next closure, got "
                                f"{type(data).__name__}")
            new._closure = data
            new._evaluate(describe=False)
        else:
            if not isinstance(data, (list, tuple)):
                raise TypeError("this operator was built from gradients: on() takes the next gradients, one tensor "
                                f"(or None) per parameter, got {type(data).__name__}")
            new._set_grads(data)
        new._versions = [p._version for p in new._live]
        new._cached = new._build_cache()
        return new

    def release(self) -> None:
        """Drop the graph (and the closure), so that what it holds is freed while the backend is kept
        to make copies with :meth:`on`; products are refused until then."""
        self._g = self._cached = None
        self.loss, self.gradient = None, ()
        if self._closure is not None:
            self._closure = _released

    # --- the template's hooks --------------------------------------------------------------------
    def _auto_options(self) -> dict[str, Any]:
        return {"hvp": "reverse", "cache": True, "batched": self.device.type == "cuda"}

    def _follow(self) -> None:
        if torch.is_inference_mode_enabled():
            raise inference_mode_error("a Hessian-vector product")
        if self._g is None:
            raise RuntimeError(_RELEASED)
        versions = [p._version for p in self._live]
        if versions == self._versions:
            return
        if self._closure is None:
            raise RuntimeError(
                "the parameters changed in place since the gradients were computed, so their graph is of the "
                "old values: compute the gradient again and build a new operator (or give curvop.hessian_of "
                "a closure, which it evaluates again)")
        self._evaluate()
        self._cached = self._build_cache()
        self._versions = versions

    def _linearize(self, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        return partial(_reverse_product, self._layout, self._g, self._live, retain=True)

    def _columns(self, columns: list[Tensor], batch: Any, index: int) -> Tensor:
        """Fresh columns: one fresh product each (``_linearize`` here is the cached graph)."""
        return AutodiffBackend._columns(self, columns, batch, index)

    _batch_gradient = AutodiffBackend._batch_gradient  # the closure computes with the live tensors only

    def _product(self, v: Tensor, batch: Any, batched: bool) -> Tensor:
        """A fresh product (the determinism check): the closure evaluated again, its graph used once."""
        with torch.enable_grad(), Rewrites(conv=False, fast=self._rewrite, gelu=False):
            loss = self._closure()
            g = torch.autograd.grad(loss, self._live, create_graph=True, allow_unused=True)
        return _reverse_product(self._layout, g, self._live, v, batched, retain=False)

    def describe(self) -> str:
        source = "a closure's graph" if self._closure is not None else "the graph of given gradients"
        return f"torch reverse mode on {source}, n={self.size}, {self.torch_dtype} on {self.device}"


def _released() -> Any:
    raise RuntimeError(_RELEASED)


def graph_form(f: Any, params: Any, data: Any) -> str | None:
    """``"closure"``, ``"grads"`` or ``None`` (a function of the parameters): which form ``f`` takes."""
    if data is not None:
        return None
    if isinstance(f, (list, tuple)) and len(f) > 0 and all(g is None or isinstance(g, torch.Tensor) for g in f):
        return "grads"
    if callable(f):
        try:
            required = [p for p in inspect.signature(f).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):  # a builtin without a signature: a function of the parameters
            return None
        return "closure" if not required else None
    return None


def graph_hessian_of(f: Any, params: Any, form: str, options: dict[str, Any]) -> GraphBackend:
    """The backend of :func:`curvop.hessian_of` for a closure or gradients (``form`` from :func:`graph_form`)."""
    if isinstance(params, torch.Tensor):
        flat = {"0": params}
    elif isinstance(params, dict):
        flat = dict(params)
    elif isinstance(params, (list, tuple)):
        flat = {str(i): p for i, p in enumerate(params)}
    else:
        raise TypeError(f"params must be a tensor or a list/tuple/dict of tensors, got {type(params).__name__}")
    if not flat:
        raise ValueError("params is empty: pass the tensors to differentiate with respect to")
    if form == "grads":
        options.setdefault("check_deterministic", False)
        return GraphBackend(flat, grads=f, **options)
    return GraphBackend(flat, closure=f, **options)


def hessian_of(f: Any, params: Any, data: Any = None, **options: Any) -> Any:
    """Torch backend for :func:`curvop.hessian_of`: a function of ``params``, a closure, or gradients.

    ``f(params)`` (or ``f(params, batch)`` with ``data``) receives fresh tensors at the values of
    ``params`` (:func:`curvop.backends.torch.backend.hessian_of`). Without ``data``, ``f`` may also
    be a closure ``f()`` computing with the live leaf tensors ``params``, or the gradients w.r.t.
    ``params`` computed with ``create_graph=True`` (this module's docstring; :class:`GraphBackend`).

    Examples
    --------
    >>> import torch, curvop
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> (g,) = torch.autograd.grad((w ** 3).sum(), [w], create_graph=True)
    >>> curvop.hessian_of([g], [w]).to_dense()
    array([[ 6.,  0.],
           [ 0., 12.]])
    """
    form = graph_form(f, params, data)
    if form is None:
        from curvop.backends.torch.backend import hessian_of as function_hessian_of

        return function_hessian_of(f, params, data, **options)
    return graph_hessian_of(f, params, form, options)
