"""The curvature family on JAX: jitted Jacobian products of ``apply_fn`` and the loss's output derivatives.

:class:`JaxCurvature` is the template of the family
(:class:`curvop.backends.curvature.CurvatureBackend`: ``Jᵀ A J``, the weighting, the Monte-Carlo
seeds) on :class:`curvop.backends.jax.JaxBackend` (parameter pytrees, sharded layouts, array glue).
``J v`` is ``jax.jvp`` (``hvp="forward"``) or the transpose of the VJP (``"reverse"``), ``Jᵀ u`` is
``jax.vjp``; with ``cache=True`` the linearisation and the VJP's residuals are kept per batch
(``jax.linearize``, ``jax.vjp`` inside ``jit``), so a product is two linear maps. Blocks use ``vmap``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvop.backends.curvature import CurvatureBackend, Linearization
from curvop.backends.dataset import Dataset, resolve_reduction
from curvop.backends.jax.backend import JaxBackend
from curvop.backends.jax.model import model_apply
from curvop.backends.jax.sampling import sample_targets

__all__ = ["JaxCurvature", "fisher", "ggn", "jacobian"]

Array = jax.Array


class JaxCurvature(CurvatureBackend, JaxBackend):
    """The GGN, a Fisher or ``JᵀJ`` of ``apply_fn(params, inputs)`` over a :class:`Dataset`.

    ``criterion(outputs, targets)`` is the loss (``None`` for the Jacobian); the other options are
    :class:`~curvop.backends.jax.JaxBackend`'s and the family's (:func:`fisher`).
    """

    sample_targets = staticmethod(sample_targets)

    def __init__(self, apply_fn: Callable[[Any, Any], Array], params: Any, dataset: Dataset, *,
                 criterion: Callable[[Array, Any], Array] | None, curvature: str, likelihood: str | None = None,
                 mc_samples: int = 1, seed: int | None = None, **options: Any):
        self._apply, self._criterion = apply_fn, criterion
        self._curvature_options(curvature, likelihood, mc_samples, seed)
        if curvature == "jacobian":
            loss = lambda q, batch: 0.5 * jnp.sum(jnp.square(apply_fn(q, _inputs(batch, True))))  # noqa: E731
        else:
            loss = lambda q, batch: criterion(apply_fn(q, batch[0]), batch[1])  # noqa: E731
        JaxBackend.__init__(self, loss, params, dataset, **options)

    def _resolved(self) -> None:
        ravel = (lambda tree: ravel_pytree(tree)[0]) if self._layout is None else self._layout.ravel  # noqa: E731
        unravel, apply, crit = self._unravel, self._apply, self._criterion
        reverse = self.mode == "reverse"
        self._sums, self._last_lin = None, None  # JaxBackend's product-side state, unused by the family

        def jvp_from(vjp_fn, out):  # J v as the transpose of u -> Jᵀ u (reverse mode)
            return lambda t: jax.linear_transpose(lambda u: vjp_fn(u)[0], out)(t)[0]

        def fresh_jvp(p, x, v):
            if reverse:
                out, vjp_fn = jax.vjp(lambda q: apply(q, x), p)
                return jvp_from(vjp_fn, out)(unravel(v))
            return jax.jvp(lambda q: apply(q, x), (p,), (unravel(v),))[1]

        def fresh_vjp(p, x, u):
            return ravel(jax.vjp(lambda q: apply(q, x), p)[1](u)[0])

        self._fns = {
            "outputs": jax.jit(apply),
            "jvp": _both(fresh_jvp, (None, None, 1), 0),
            "vjp": _both(fresh_vjp, (None, None, 0), 1),
            "lin_jvp": _both(lambda lin, v: lin(unravel(v)), (None, 1), 0),
            "lin_vjp": _both(lambda vjp_fn, u: ravel(vjp_fn(u)[0]), (None, 0), 1),
            "rev_jvp": _both(lambda vjp_fn, out, v: jvp_from(vjp_fn, out)(unravel(v)), (None, None, 1), 0),
            "linearize": jax.jit(lambda p, x: jax.linearize(lambda q: apply(q, x), p)),
            "vjp_fn": jax.jit(lambda p, x: jax.vjp(lambda q: apply(q, x), p)),
        }
        if crit is not None:
            grad = jax.grad(crit)
            self._fns["grad"] = jax.jit(grad)
            self._fns["grads"] = jax.jit(jax.vmap(grad, in_axes=(None, 0)))
            hvp = lambda f, t, u: jax.jvp(lambda g: grad(g, t), (f,), (u,))[1]  # noqa: E731
            self._fns["hvp"] = _both(hvp, (None, None, 0), 0)

    # --- the Jacobian products -------------------------------------------------------------------
    def _jacobian(self, batch: Any, cached: bool) -> Linearization:
        fns, x, p = self._fns, _inputs(batch, self.curvature == "jacobian"), self._params
        if not cached:
            return Linearization(fns["outputs"](p, x), partial(_call2, fns["jvp"], p, x), partial(_call2, fns["vjp"], p, x))
        out, vjp_fn = fns["vjp_fn"](p, x)
        vjp = partial(_call1, fns["lin_vjp"], vjp_fn)
        if self.mode == "reverse":
            return Linearization(out, partial(_call2, fns["rev_jvp"], vjp_fn, out), vjp)
        _, lin = fns["linearize"](p, x)
        return Linearization(out, partial(_call1, fns["lin_jvp"], lin), vjp)

    # --- the loss's derivatives with respect to the outputs --------------------------------------
    def _output_hvp(self, outputs: Array, batch: Any) -> Callable[[Array, bool], Array]:
        return partial(_call2, self._fns["hvp"], outputs, batch[1])

    def _output_grad(self, outputs: Array, batch: Any, targets: Any = None) -> Array:
        return self._fns["grad"](outputs, batch[1] if targets is None else targets)

    def _output_grads(self, outputs: Array, batch: Any, draws: list[Any]) -> Array:
        try:
            return self._fns["grads"](outputs, jnp.stack(draws))
        except (NotImplementedError, TypeError) as err:  # a loss jax.vmap cannot batch
            return self._looped_grads(err, "jax.vmap", outputs, batch, draws)


def _both(fn: Callable[..., Array], in_axes: tuple, out_axes: int) -> tuple[Callable, Callable]:
    """``fn`` jitted, and jitted over a block of vectors (``vmap`` on the last argument)."""
    return jax.jit(fn), jax.jit(jax.vmap(fn, in_axes=in_axes, out_axes=out_axes))


def _call1(fns: tuple[Callable, Callable], a: Any, v: Array, batched: bool) -> Array:
    return fns[1 if batched else 0](a, v)


def _call2(fns: tuple[Callable, Callable], a: Any, b: Any, v: Array, batched: bool) -> Array:
    return fns[1 if batched else 0](a, b, v)


def _inputs(batch: Any, jacobian: bool) -> Any:
    """The model inputs of a batch: ``batch[0]``, or a bare array (or dict) for the Jacobian."""
    if jacobian and (hasattr(batch, "shape") or isinstance(batch, dict)):
        return batch
    return batch[0]


def _build(model: Any, loss_fn: Any, data: Any, curvature: str, params: Any, reduction: str | None,
           options: dict[str, Any], **family: Any) -> JaxCurvature:
    apply_fn, p = model_apply(model, params)
    if curvature == "jacobian":
        dataset = Dataset(data, "sum", single=True if hasattr(data, "shape") else None)
    else:
        if not callable(loss_fn):
            raise ValueError(f"the {curvature} needs the loss: pass loss_fn(outputs, targets) -> scalar")
        dataset = Dataset(data, resolve_reduction(loss_fn, reduction))
    return JaxCurvature(apply_fn, p, dataset, criterion=loss_fn, curvature=curvature, **family, **options)


def ggn(model: Any, loss_fn: Callable[[Array, Any], Array], data: Any, *, params: Any = None,
        reduction: str | None = None, **options: Any) -> JaxCurvature:
    """JAX backend for :func:`curvop.ggn`; the arguments are :func:`curvop.backends.jax.hessian`'s.

    Examples
    --------
    >>> import jax.numpy as jnp, curvop
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> curvop.ggn(model, lambda out, t: jnp.mean((out - t) ** 2), (x, y)).shape
    (8, 8)
    """
    return _build(model, loss_fn, data, "ggn", params, reduction, options)


def fisher(model: Any, loss_fn: Callable[[Array, Any], Array], data: Any, *, kind: str = "mc",
           mc_samples: int = 1, seed: int | None = None, likelihood: str | None = None, params: Any = None,
           reduction: str | None = None, **options: Any) -> JaxCurvature:
    """JAX backend for :func:`curvop.fisher`. A JAX loss is a plain function, so ``kind="mc"`` needs
    ``likelihood="categorical"`` (softmax cross-entropy over the last axis), ``"bernoulli"`` or
    ``"gaussian"``."""
    if kind not in ("mc", "empirical"):
        raise ValueError(f"kind must be 'mc' (targets sampled from the model) or 'empirical' (true targets), got {kind!r}")
    if kind == "empirical":
        return _build(model, loss_fn, data, "empirical", params, reduction, options)
    return _build(model, loss_fn, data, "mc", params, reduction, options, likelihood=likelihood,
                  mc_samples=mc_samples, seed=seed)


def jacobian(model: Any, data: Any, *, params: Any = None, **options: Any) -> JaxCurvature:
    """JAX backend for :func:`curvop.jacobian`: ``θ ↦ apply_fn(θ, inputs)`` over ``data``."""
    return _build(model, None, data, "jacobian", params, "sum", options)
