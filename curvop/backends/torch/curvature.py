"""The curvature family on torch: Jacobian products of the model and the loss's output derivatives.

:class:`TorchCurvature` is the template of the family
(:class:`curvop.backends.curvature.CurvatureBackend`: ``Jᵀ A J``, the weighting, the Monte-Carlo
seeds) on :class:`curvop.backends.torch.TorchBackend` (options, parameters, buffers, train mode,
data-parallel reduction, version tracking). Only the products live here:

* ``hvp="reverse"``: one forward pass keeps its graph; ``Jᵀ u`` is a backward pass through it and
  ``J v`` the backward of a backward (the derivative of ``Jᵀ u`` with respect to ``u``);
* ``hvp="forward"``: ``J v`` in forward mode (``torch.func.jvp``; with ``cache=True`` the
  linearisation, ``torch.func.linearize``), ``Jᵀ u`` from the kept graph.

``cache=True`` keeps the graph (and the linearisation) per batch between products, so a product
is one or two linear passes. The loss's derivatives with respect to the outputs are taken with
autograd on the (detached) outputs.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable

import torch
from torch.func import grad, jvp, linearize, vmap

from curvop.backends.curvature import CurvatureBackend, Linearization
from curvop.backends.dataset import Dataset
from curvop.backends.torch.backend import TorchBackend, _Layout
from curvop.backends.torch.model import backend_options, model_problem
from curvop.backends.torch.sampling import likelihood_of, sample_targets
from curvop.backends.torch.state import LOCK

__all__ = ["TorchCurvature", "fisher", "ggn", "jacobian"]

Tensor = torch.Tensor


class TorchCurvature(CurvatureBackend, TorchBackend):
    """The GGN, a Fisher or ``JᵀJ`` of a torch model over a :class:`Dataset` (see the module docstring).

    Parameters
    ----------
    forward : callable
        ``forward(params, inputs)`` -> the model outputs (one tensor, samples along dimension 0).
    criterion : callable or None
        ``criterion(outputs, targets)`` -> the scalar loss (``None`` for the Jacobian).
    curvature : {"ggn", "empirical", "mc", "jacobian"}
    likelihood, mc_samples, seed
        The Monte-Carlo Fisher's: see :func:`fisher`.
    **options
        :class:`~curvop.backends.torch.TorchBackend`'s (``hvp``, ``cache``, ``batched``, ...).
    """

    sample_targets = staticmethod(sample_targets)

    def __init__(self, loss: Callable[..., Tensor], params: dict[str, Tensor], dataset: Dataset, *,
                 forward: Callable[..., Tensor], criterion: Callable[..., Tensor] | None, curvature: str,
                 likelihood: str | None = None, mc_samples: int = 1, seed: int | None = None, **options: Any):
        self._forward, self._criterion = forward, criterion
        self._curvature_options(curvature, likelihood, mc_samples, seed)
        if self.likelihood == "categorical":  # ignored targets stay ignored in the draws (torch's default: -100)
            self._sample_options = {"ignore_index": int(getattr(criterion, "ignore_index", -100))}
        TorchBackend.__init__(self, loss, params, dataset, **options)

    def _resolved(self) -> None:
        super()._resolved()
        self._fwd = self._forward if self._rng is None else self._rng.wrap(self._forward)

    def _inputs(self, batch: Any) -> Any:
        if self.curvature == "jacobian" and (isinstance(batch, torch.Tensor) or isinstance(batch, dict)):
            return batch
        return batch[0]

    # --- the Jacobian products -------------------------------------------------------------------
    def _jacobian(self, batch: Any, cached: bool) -> Linearization:
        inputs, layout = self._inputs(batch), self._layout
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        with torch.enable_grad():
            out = self._fwd(p, inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return one tensor of outputs for the {self.curvature}, got "
                            f"{type(out).__name__}; wrap it so that it returns the tensor the loss takes")
        plist = list(p.values())
        vjp_fn = partial(_vjp, layout, out, plist, cached)
        if self.mode == "forward":
            fwd = partial(_call, self._fwd, inputs)
            if cached:
                with warnings.catch_warnings(), LOCK:  # torch.fx const-folding chatter, harmless
                    warnings.simplefilter("ignore", UserWarning)
                    _, lin = linearize(fwd, self._params)
                return Linearization(out.detach(), partial(_apply_tangent, layout, lin), vjp_fn)
            return Linearization(out.detach(), partial(_fresh_jvp, layout, fwd, self._params), vjp_fn)
        dummy = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            gu = torch.autograd.grad(out, plist, dummy, create_graph=True, allow_unused=True)
        return Linearization(out.detach(), partial(_reverse_jvp, layout, gu, dummy), vjp_fn)

    # --- the loss's derivatives with respect to the outputs --------------------------------------
    def _output_hvp(self, outputs: Tensor, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        f = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(self._criterion(f, batch[1]), f, create_graph=True)
        if not g.requires_grad:  # a loss linear in the outputs: its Hessian is zero
            return _zero_like_input
        return partial(_output_hvp, g, f)

    def _output_grad(self, outputs: Tensor, batch: Any, targets: Any = None) -> Tensor:
        f = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(self._criterion(f, batch[1] if targets is None else targets), f)
        return g

    def _output_grads(self, outputs: Tensor, batch: Any, draws: list[Any]) -> Tensor:
        """The output gradients of every draw in one ``torch.func.vmap`` (a loop, with a warning, for a
        loss that vmap cannot batch)."""
        targets = torch.stack(draws)
        try:
            with LOCK:
                return vmap(grad(self._criterion), in_dims=(None, 0))(outputs.detach(), targets)
        except (RuntimeError, NotImplementedError) as err:
            return self._looped_grads(err, "torch.func.vmap", outputs, batch, draws)


def _call(fwd: Callable[..., Tensor], inputs: Any, p: dict[str, Tensor]) -> Tensor:
    return fwd(p, inputs)


def _zero_like_input(u: Tensor, batched: bool) -> Tensor:
    return torch.zeros_like(u)


def _output_hvp(g: Tensor, f: Tensor, u: Tensor, batched: bool) -> Tensor:
    with torch.enable_grad():
        return torch.autograd.grad(g, f, u, retain_graph=True, is_grads_batched=batched)[0]


def _vjp(layout: _Layout, out: Tensor, p: list[Tensor], retain: bool, u: Tensor, batched: bool) -> Tensor:
    """``Jᵀ u`` (``batched``: ``u`` is ``(k, *out.shape)``, the result ``(n, k)``) through the kept graph."""
    with torch.enable_grad():
        g = torch.autograd.grad(out, p, u, retain_graph=retain, allow_unused=True, is_grads_batched=batched)
    if not batched:
        return layout.flat(dict(zip(layout.names, g)))
    k = u.shape[0]
    return torch.cat([(u.new_zeros((k, n)) if h is None else h.reshape(k, n)) for h, n in zip(g, layout.numels)], 1).T


def _reverse_jvp(layout: _Layout, gu: tuple[Tensor | None, ...], dummy: Tensor, v: Tensor, batched: bool) -> Tensor:
    """``J v`` as the derivative of ``Jᵀ u`` (``gu``, linear in ``u = dummy``) in the direction ``v``."""
    live = [i for i, g in enumerate(gu) if g is not None and g.requires_grad]
    if not live:
        return dummy.new_zeros((v.shape[1], *dummy.shape) if batched else dummy.shape)
    if batched:
        parts = [t.view(v.shape[1], *s) for t, s in zip(torch.split(v.T, layout.numels, dim=1), layout.shapes)]
    else:
        parts = list(layout.split(v).values())
    with torch.enable_grad():
        return torch.autograd.grad([gu[i] for i in live], dummy, [parts[i] for i in live], retain_graph=True,
                                   is_grads_batched=batched)[0]


def _fresh_jvp(layout: _Layout, fwd: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
               v: Tensor, batched: bool) -> Tensor:
    one = lambda u: jvp(fwd, (params,), (layout.split(u),))[1]  # noqa: E731
    with LOCK:  # forward-AD levels are process-wide
        return vmap(one, in_dims=1, out_dims=0)(v) if batched else one(v)


def _apply_tangent(layout: _Layout, lin: Callable[[Any], Tensor], v: Tensor, batched: bool) -> Tensor:
    one = lambda u: lin(layout.split(u))  # noqa: E731
    with LOCK:
        return vmap(one, in_dims=1, out_dims=0)(v) if batched else one(v)


# --- factories ------------------------------------------------------------------------------------
_VALID = backend_options(TorchBackend)


def _build(model: Any, loss_fn: Any, data: Any, curvature: str, params: Any, reduction: str | None,
           batch_weight: Any, options: dict[str, Any], **family: Any) -> TorchCurvature:
    from curvop.backends.torch.fsdp import is_fsdp_model

    if is_fsdp_model(model):
        raise NotImplementedError(
            f"the {curvature} of an FSDP2 (fully_shard) model is not implemented: curvop's FSDP path uses finite "
            "differences of gradients, which give Hessian products only; gather the model (or use curvop.hessian)")
    if curvature != "jacobian" and loss_fn is None:
        raise ValueError(
            f"the {curvature} needs the model outputs and the loss separately: pass loss_fn(outputs, targets) "
            "(a model that computes its own loss, loss_fn=None, is supported by curvop.hessian only)")
    problem = model_problem(model, loss_fn, data, params=params, reduction=reduction, batch_weight=batch_weight,
                            options=options, valid=_VALID, with_forward=True)
    forward = problem.pop("forward")
    if curvature == "jacobian":
        problem["loss"] = partial(_half_square, forward)
    return TorchCurvature(**problem, forward=forward, criterion=loss_fn, curvature=curvature, **family, **options)


def _half_square(forward: Callable[..., Tensor], p: dict[str, Tensor], batch: Any) -> Tensor:
    """``‖f‖² / 2`` summed over the batch: the loss whose GGN is ``JᵀJ`` (what the Jacobian checks)."""
    inputs = batch if isinstance(batch, (torch.Tensor, dict)) else batch[0]
    out = forward(p, inputs)
    return (out * out).sum() / 2 if isinstance(out, torch.Tensor) else out


def ggn(model: torch.nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], data: Any, *, params: Any = None,
        reduction: str | None = None, batch_weight: Callable[[Any], Any] | None = None,
        **options: Any) -> TorchCurvature:
    """Torch backend for :func:`curvop.ggn`: ``G = Jᵀ (∂²L/∂f²) J`` over ``data``.

    The arguments are :func:`curvop.backends.torch.hessian`'s (``train_mode``, ``seed`` and every
    option included), except that ``loss_fn`` is required.

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Linear(3, 2).double()
    >>> batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    >>> G = curvop.backends.get("torch", "ggn")(model, torch.nn.CrossEntropyLoss(), batch)
    >>> G.size, G.is_psd
    (8, True)
    """
    return _build(model, loss_fn, data, "ggn", params, reduction, batch_weight, options)


def fisher(model: torch.nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], data: Any, *, kind: str = "mc",
           mc_samples: int = 1, seed: int | None = None, likelihood: str | None = None, params: Any = None,
           reduction: str | None = None, batch_weight: Callable[[Any], Any] | None = None,
           **options: Any) -> TorchCurvature:
    """Torch backend for :func:`curvop.fisher`: the Monte-Carlo (``kind="mc"``) or empirical Fisher.

    ``likelihood`` is read from ``loss_fn`` (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``
    or their functional forms) when not given. ``seed`` seeds the sampled targets; with
    ``train_mode=True`` it also fixes the dropout masks.
    """
    if kind not in ("mc", "empirical"):
        raise ValueError(f"kind must be 'mc' (targets sampled from the model) or 'empirical' (true targets), got {kind!r}")
    if options.get("train_mode"):
        options["seed"] = seed
    if kind == "empirical":
        return _build(model, loss_fn, data, "empirical", params, reduction, batch_weight, options)
    if likelihood is None:
        likelihood = likelihood_of(loss_fn)
    return _build(model, loss_fn, data, "mc", params, reduction, batch_weight, options, likelihood=likelihood,
                  mc_samples=mc_samples, seed=seed)


def jacobian(model: torch.nn.Module, data: Any, *, params: Any = None, **options: Any) -> TorchCurvature:
    """Torch backend for :func:`curvop.jacobian`: ``θ ↦ f`` over ``data``, batches concatenated.

    ``data``: the inputs, one batch ``(inputs, targets)`` (targets unused) or a re-iterable of batches.
    """
    return _build(model, None, data, "jacobian", params, "sum", None, options)
