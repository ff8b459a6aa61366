"""AdaHessian, Sophia-H and Sophia-G as ``torch.optim.Optimizer``\\ s (the rules: :mod:`curvop.optim.rules`).

Every Hessian product goes through a curvop operator: :func:`curvop.hessian_of` of the closure
(evaluated once, under curvop's op rewrites, its loss and gradient reused) or of the gradients
``p.grad`` that ``loss.backward(create_graph=True)`` left (AdaHessian's official call pattern),
built with its self-checks at the first curvature step and moved to each later step's graph
(``GraphBackend.on``). The diagonal is Hutchinson's, ``z ⊙ Hz`` for Rademacher probes drawn from
``(seed, step)`` (as :func:`curvop.diagonal` draws them), one block product per step.

A closure given to ``step`` re-evaluates the model and returns the loss *without* calling
``backward``: the optimizer differentiates it and writes the gradient to ``p.grad``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

import curvop
from curvop.optim.rules import check_adahessian, check_sophia, curvature_step, probe_rng
from curvop.backends.torch import likelihood_of, sample_targets

__all__ = ["AdaHessian", "SophiaH", "SophiaG"]

Tensor = torch.Tensor
_BACKWARD_CALLED = ("the closure called loss.backward(), which freed the graph: return the loss without calling "
                    "backward (the optimizer computes the gradient and writes it to p.grad)")


class _Curvature(torch.optim.Optimizer):
    """What the three share: the trainable parameters in order, the global step, the probes, and the
    operator of each curvature step's graph.

    The operator is built once, at the first curvature step, by :func:`curvop.hessian_of` with its
    symmetry self-check (``check=True``); each later step moves that operator to its own graph
    (:meth:`~curvop.backends.torch.graph.GraphBackend.on`), which runs no check again, so a step
    costs its autodiff and a few tensor ops around it.
    """

    _built: tuple[Any, Any] | None = None  # (graph form, parameters), the released backend (not in state_dict)
    check = True

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _next_step(self) -> int:
        """The step about to be taken (from 1): one more than the most any parameter has taken."""
        return 1 + max((int(s.get("step", 0)) for s in self.state.values()), default=0)

    def _shared(self, key: str) -> Any:
        values = {g[key] for g in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"{key} is one value for the whole optimizer (one probe vector spans every group), "
                             f"got {sorted(values)} in different param groups")
        return values.pop()

    def _hessian(self, graph: Any, params: list[Tensor]) -> Any:
        """The operator of this step's ``graph`` (a closure, or the gradients with their graph) over ``params``."""
        key = (callable(graph), tuple(map(id, params)))
        if self._built is not None and self._built[0] == key:
            return curvop.HessianOperator(self._built[1].on(graph))
        # every product of a step is taken on that step's one graph, so a loss with dropout is fine
        # (the Hessian of the step's own sampled loss, as the official AdaHessian computes): no
        # determinism check, which would evaluate the user's closure a second time
        H = curvop.hessian_of(graph, params, check_deterministic=False, check_symmetric=bool(self.check),
                              check_finite=False)
        base = copy.copy(H.backend)
        base.release()  # kept to move to the next steps' graphs, without holding this one
        self._built = (key, base)
        return H

    def _diagonal(self, H: Any, step: int, params: list[Tensor]) -> list[Tensor]:
        """Hutchinson's estimate of diag(H) (``H`` over ``params``, in order), split per parameter: the
        mean of ``z ⊙ Hz`` over ``num_probes`` Rademacher probes from ``(seed, step)``, one block product."""
        k = self._shared("num_probes")
        Z = H.random((H.shape[0], k), "rademacher", seed=probe_rng(self._shared("seed"), step))
        with torch.enable_grad():
            d = Z[:, 0] * H.matvec(Z[:, 0]) if k == 1 else (Z * H.matmat(Z)).mean(dim=1)
        return list(d.split([p.numel() for p in params]))

def _gradient(closure: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """The closure's loss and its gradient (no graph kept)."""
    with torch.enable_grad():
        loss = closure()
        try:
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                raise RuntimeError(_BACKWARD_CALLED) from err
            raise


def _kernel_mean(d: Tensor, p: Tensor) -> Tensor:
    """AdaHessian's spatial averaging: a 4-D convolution weight's estimate averaged over its kernel."""
    d = d.view_as(p)
    return d.mean(dim=(2, 3), keepdim=True).expand_as(p) if p.dim() == 4 else d


class AdaHessian(_Curvature):
    """AdaHessian (Yao et al., AAAI 2021): Adam with the second moment of a Hutchinson estimate of diag(H).

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)D²``,
    ``p ← p − lr·wd·p − lr·(m/(1−β₁ᵗ)) / ((√(v/(1−β₂ᵗ)))^k + ε)``, with D averaged over the
    kernel of 4-D convolution weights and k the ``hessian_power``.

    Parameters
    ----------
    params : iterable of tensors or of dicts (param groups)
    lr, betas, eps, weight_decay, hessian_power
        As in the official implementation (weight decay decoupled, as there).
    seed : int
        Seed of the probes: step t draws from ``(seed, t)``, so runs and restored runs repeat.
    num_probes : int
        Rademacher probes per estimate (1, as the paper; each costs one Hessian-vector product).
    check : bool
        The operator's symmetry self-check at the first step, where it is built (two products on
        that step's graph; an op with a wrong second derivative is refused, naming the module).
        Later steps reuse that operator on their own graph and run no check (``False``: none at all).
        The closure is evaluated once per step: a loss with dropout is accepted (each step's
        products are of that step's sampled loss).

    Notes
    -----
    Two ways to step. ``loss.backward(create_graph=True); optimizer.step()`` is the official call
    pattern: the products differentiate the graph of ``p.grad``, which is detached after the step.
    ``optimizer.step(closure)`` takes a closure returning the loss (no ``backward``): the optimizer
    evaluates it under curvop's op rewrites and writes the gradient to ``p.grad``.

    Examples
    --------
    >>> import torch, curvop.optim
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> opt = curvop.optim.AdaHessian(model.parameters(), lr=0.1)
    >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> opt.state[model.weight]["step"]
    1
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0, *, seed: int = 0,
                 num_probes: int = 1, check: bool = True):
        defaults = check_adahessian(lr, betas, eps, weight_decay, hessian_power, num_probes)
        super().__init__(params, dict(defaults, seed=int(seed)))
        self.check = bool(check)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; returns the closure's loss (``None`` without a closure)."""
        t = self._next_step()
        params = self._trainable()
        if closure is None:
            pairs = [(p, p.grad) for p in params if p.grad is not None]
            if not pairs:
                return None
            params, grads = [p for p, _ in pairs], [g for _, g in pairs]
            with torch.enable_grad():
                H = self._hessian(grads, params)
            loss = None
        else:
            with torch.enable_grad():
                H = self._hessian(closure, params)
            loss, grads = H.backend.loss, H.backend.gradient
        diag = self._diagonal(H, t, params)
        del H
        found = {}
        for p, g, d in zip(params, grads, diag):
            if g is None:
                continue
            g = g.detach()
            if closure is None:
                p.grad.detach_()  # as the official step: the graph's reference cycle through p.grad ends
            else:
                p.grad = g
            found[id(p)] = (g, _kernel_mean(d, p))
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in found]
            if ps:
                self._update(group, ps, [found[id(p)][0] for p in ps], [found[id(p)][1] for p in ps])
        return loss

    def _update(self, group: dict[str, Any], ps: list[Tensor], gs: list[Tensor], ds: list[Tensor]) -> None:
        """The rule on one group's parameters, with ``torch._foreach`` ops (one call per op, not per tensor)."""
        (b1, b2), lr = group["betas"], group["lr"]
        ms, vs, ks = _states(self.state, ps, ("exp_avg", "exp_hessian_diag_sq"))
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, ds, ds, value=1 - b2)
        denom = torch._foreach_div(vs, [1 - b2**k for k in ks])
        torch._foreach_sqrt_(denom)
        if group["hessian_power"] != 1:
            torch._foreach_pow_(denom, group["hessian_power"])
        torch._foreach_add_(denom, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1**k) for k in ks])


def _states(state: dict[Tensor, dict[str, Any]], ps: list[Tensor], names: tuple[str, str]) -> tuple[list, list, list]:
    """The two buffers ``names`` of each parameter (zeros at first) and its step, counted up by one."""
    first, second, steps = [], [], []
    for p in ps:
        st = state[p]
        if not st:
            st["step"] = 0
            for name in names:
                st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        first.append(st[names[0]])
        second.append(st[names[1]])
        steps.append(st["step"])
    return first, second, steps


class _Sophia(_Curvature):
    """Sophia's update (Liu et al., ICLR 2024); subclasses supply ĥ on curvature steps."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float], rho: float,
                 weight_decay: float, eps: float, every: int, seed: int, num_probes: int = 1):
        defaults = check_sophia(lr, betas, rho, weight_decay, eps, every, num_probes)
        super().__init__(params, dict(defaults, seed=int(seed)))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:
        """One update; the curvature is estimated on steps 1, 1 + every, ...; returns the loss."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step needs a closure: its curvature steps re-evaluate the "
                            "loss (optimizer.step(lambda: loss_fn(model(x), y)), without backward)")
        t = self._next_step()
        params = self._trainable()
        due = curvature_step(t, self._shared("every"))
        with torch.enable_grad():
            loss, grads, hhat = self._evaluate(closure, params, t, due)
        found = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            p.grad = g
            found[id(p)] = (g, None if hhat is None else hhat[i].view_as(p))
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in found]
            if ps:
                self._update(group, ps, [found[id(p)][0] for p in ps],
                             None if hhat is None else [found[id(p)][1] for p in ps])
        return loss

    def _evaluate(self, closure: Callable[[], Any], params: list[Tensor], t: int,
                  due: bool) -> tuple[Tensor, tuple[Tensor | None, ...], list[Tensor] | None]:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], ps: list[Tensor], gs: list[Tensor], hhats: list[Tensor] | None) -> None:
        """The rule on one group's parameters (``hhats``: this step's curvature, on curvature steps)."""
        (b1, b2), lr = group["betas"], group["lr"]
        ms, hs, _ = _states(self.state, ps, ("exp_avg", "hessian"))
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1)
        if hhats is not None:
            torch._foreach_mul_(hs, b2)
            torch._foreach_add_(hs, hhats, alpha=1 - b2)
        if group["weight_decay"]:
            torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        denom = torch._foreach_mul(hs, group["rho"])
        torch._foreach_clamp_min_(denom, group["eps"])
        ratio = torch._foreach_div(ms, denom)  # sign(m)·min(|m|/d, 1) = clamp(m/d, −1, 1), as d ≥ ε > 0
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(ps, ratio, alpha=-lr)


class SophiaH(_Sophia):
    """Sophia-H: Sophia with ĥ = D, Hutchinson's estimate of diag(H) (``num_probes`` products).

    ``m ← β₁m + (1−β₁)g``; every ``every`` steps ``h ← β₂h + (1−β₂)D``;
    ``p ← p − lr·wd·p``; ``p ← p − lr·sign(m)·min(|m| / max(ρh, ε), 1)``.

    ``step(closure)``: the closure returns the loss (no ``backward``). On curvature steps (1,
    1 + every, ...) the optimizer evaluates it once under curvop's op rewrites and takes the
    gradient and the products from that one graph; on the others it is one gradient, as AdamW.
    ``seed``, ``num_probes`` and ``check`` are as for :class:`AdaHessian` (the checks run at step 1).

    Examples
    --------
    >>> import torch, curvop.optim
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> opt = curvop.optim.SophiaH(model.parameters(), lr=1e-2, every=2)
    >>> for _ in range(3):
    ...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> opt.state[model.bias]["step"]
    3
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15, every: int = 10, *,
                 seed: int = 0, num_probes: int = 1, check: bool = True):
        super().__init__(params, lr, betas, rho, weight_decay, eps, every, seed, num_probes)
        self.check = bool(check)

    def _evaluate(self, closure, params, t, due):
        if not due:
            loss, grads = _gradient(closure, params)
            return loss, grads, None
        H = self._hessian(closure, params)
        return H.backend.loss, H.backend.gradient, self._diagonal(H, t, params)


class SophiaG(_Sophia):
    """Sophia-G: Sophia with ĥ the Gauss-Newton-Bartlett estimate ``ĥ = B·ĝ²``.

    ĝ is the mini-batch gradient of the loss on targets sampled from the model's predictive
    distribution and B the number of terms the loss averages over (1 for a summed loss):
    unbiased for the diagonal of the Gauss-Newton matrix. The targets are the curvature family's
    draws (:func:`curvop.backends.torch.sample_targets`, as the Monte-Carlo Fisher's).

    Parameters
    ----------
    params, lr, betas, rho, weight_decay, eps, every, seed
        As :class:`SophiaH` (``seed`` draws the sampled targets). The defaults are the official
        implementation's (``rho`` multiplies B·h there too).
    loss_fn : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss
        The loss, which must be the model's negative log-likelihood for the sampling to hold.

    Notes
    -----
    ``step(closure)``: the closure returns ``(outputs, targets)``; the loss is
    ``loss_fn(outputs, targets)``. A curvature step costs one forward and two backward passes
    (true and sampled targets, the same forward); the others one forward and one backward.

    Examples
    --------
    >>> import torch, curvop.optim
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> opt = curvop.optim.SophiaG(model.parameters(), loss_fn=torch.nn.CrossEntropyLoss(), lr=1e-2)
    >>> loss = opt.step(lambda: (model(x), y))
    >>> float(loss) > 0
    True
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15, every: int = 10, *,
                 loss_fn: Any, seed: int = 0):
        super().__init__(params, lr, betas, rho, weight_decay, eps, every, seed)
        self.loss_fn, self._likelihood = loss_fn, _likelihood(loss_fn)

    def _evaluate(self, closure, params, t, due):
        out = closure()
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("SophiaG's closure returns (outputs, targets), the loss being loss_fn(outputs, targets); "
                            f"got {type(out).__name__}")
        outputs, targets = out
        loss = self.loss_fn(outputs, targets)
        try:
            grads = torch.autograd.grad(loss, params, retain_graph=due, allow_unused=True)
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                raise RuntimeError(_BACKWARD_CALLED) from err
            raise
        if not due:
            return loss.detach(), grads, None
        seed = int(probe_rng(self._shared("seed"), t).integers(2**62))
        sampled, scale = gnb_targets(self.loss_fn, self._likelihood, outputs, targets, seed)
        gs = torch.autograd.grad(self.loss_fn(outputs, sampled), params, allow_unused=True)
        hhat = [None if s is None else s.square().mul_(scale) for s in gs]
        return loss.detach(), grads, hhat


def _likelihood(loss_fn: Any) -> str:
    """The predictive distribution whose NLL ``loss_fn`` is (the family's reading), or a clear error."""
    likelihood = likelihood_of(loss_fn)  # refuses class weights, label smoothing, pos_weight
    if likelihood is None:
        raise TypeError(
            f"Sophia-G samples targets from the model for torch.nn.CrossEntropyLoss, MSELoss or BCEWithLogitsLoss "
            f"(or their torch.nn.functional forms), got {type(loss_fn).__name__}; use SophiaH for other losses")
    if getattr(loss_fn, "reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"the loss must be reduced ('mean' or 'sum'), got reduction={loss_fn.reduction!r}")
    return likelihood


def gnb_targets(loss_fn: Any, likelihood: str, outputs: Tensor, targets: Any, seed: int) -> tuple[Tensor, float]:
    """Targets drawn from the model at ``outputs`` (:func:`curvop.backends.torch.sample_targets`) and
    B, the number of terms the loss averages over (1 for a sum): ``B·ĝ²`` is the Gauss-Newton-Bartlett
    estimate. MSE's terms ``(f − y)²`` are the NLL of ``y ~ N(f, 1/2)``; a cross-entropy's ignored
    targets stay ignored and are not counted.

    >>> import torch
    >>> y, B = gnb_targets(torch.nn.MSELoss(), "gaussian", torch.zeros(4, 3), torch.zeros(4, 3), seed=0)
    >>> y.shape, B
    (torch.Size([4, 3]), 12.0)
    """
    f = outputs.detach()
    ignore = int(getattr(loss_fn, "ignore_index", -100)) if likelihood == "categorical" else None
    sampled = sample_targets(f, likelihood, seed=seed, like=targets, ignore_index=ignore,
                             variance=0.5 if likelihood == "gaussian" else None)[0]
    if getattr(loss_fn, "reduction", "mean") == "sum":
        return sampled, 1.0
    if likelihood != "categorical":
        return sampled, float(f.numel())
    if isinstance(targets, Tensor) and not targets.is_floating_point():
        return sampled, float((targets != ignore).sum())
    return sampled, float(f.numel() // f.shape[1] if f.dim() > 1 else 1)
