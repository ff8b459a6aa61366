"""AdaHessian, Sophia-H and Sophia-G as optax transformations (the rules: :mod:`curvop.optim.rules`).

The curvature needs the loss, so each transformation is built around it and takes the batch
through optax's extra-arguments convention::

    tx = curvop.optim.optax.adahessian(loss_fn, learning_rate=0.1)   # loss_fn(params, batch)
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)

``update`` calls curvop (:func:`curvop.hessian_of` on the mini-batch loss, then
:func:`curvop.diagonal`), which compiles its own products, so **call it outside** ``jax.jit``
(jit the gradient). The operator is built at the first update and moved to each new batch and
parameters with :meth:`curvop.HessianOperator.on`, so nothing is compiled again. The rule itself
runs as one jitted function. Probes (and Sophia-G's sampled targets) come from ``(seed, step)``.

4-D leaves are convolution kernels to AdaHessian, averaged over ``kernel_axes`` (Flax's
``(height, width, in, out)`` layout: ``(0, 1)``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

import curvop
from curvop.optim.rules import check_adahessian, check_sophia, curvature_step, probe_rng
from curvop.backends.jax import sample_targets

__all__ = ["AdaHessianState", "SophiaState", "adahessian", "sophia_h", "sophia_g"]

Schedule = Callable[[Any], Any]


class AdaHessianState(NamedTuple):
    """``count``: steps taken; ``mu``, ``nu``: the first moment and that of the squared diagonal."""

    count: jax.Array
    mu: Any
    nu: Any


class SophiaState(NamedTuple):
    """``count``: steps taken; ``mu``: the first moment; ``hessian``: the curvature average h."""

    count: jax.Array
    mu: Any
    hessian: Any


def _lr(learning_rate: float | Schedule, count: int) -> float:
    return float(learning_rate(count - 1)) if callable(learning_rate) else float(learning_rate)


def _eager(params: Any) -> None:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(params)):
        raise TypeError("curvop's optax transformations call curvop, which runs its own compiled products: call "
                        "tx.update outside jax.jit (jit the gradient computation instead)")


class _Diagonal:
    """Hutchinson's estimate of diag(H) of ``loss_fn(params, batch)``, one operator moved from batch to batch."""

    def __init__(self, loss_fn: Callable[[Any, Any], Any], num_probes: int, seed: int):
        self.loss_fn, self.num_probes, self.seed, self.H = loss_fn, num_probes, seed, None

    def __call__(self, params: Any, batch: Any, step: int) -> Any:
        data = _OneBatch(batch)  # one batch of any pytree, summed over (exact, no batch size needed)
        if self.H is None:
            self.H = curvop.hessian_of(self.loss_fn, params, data, backend="jax", reduction="sum", cache=False,
                                       check_deterministic=False, check_finite=False)
            H = self.H
        else:
            H = self.H.on(data, params=params)
        d = curvop.diagonal(H, num_matvecs=self.num_probes, seed=probe_rng(self.seed, step)).estimate
        return ravel_pytree(params)[1](d)  # the operator's order is ravel_pytree's


class _OneBatch:
    """Data of exactly one batch, whatever its structure (an array, a tuple, a dict): a re-iterable
    that yields it, so that curvop's data handling never takes the batch's own structure apart."""

    def __init__(self, batch: Any):
        self.batch = batch

    def __iter__(self) -> Any:
        yield self.batch


def _kernel_mean(d: jax.Array, axes: tuple[int, int]) -> jax.Array:
    return jnp.broadcast_to(jnp.mean(d, axis=axes, keepdims=True), d.shape) if d.ndim == 4 else d


@partial(jax.jit, static_argnames=("kernel_axes",))
def _adahessian_rule(grads, diag, params, mu, nu, count, lr, b1, b2, eps, wd, power, kernel_axes):
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = jax.tree_util.tree_map(lambda v, d: b2 * v + (1 - b2) * _kernel_mean(d, kernel_axes) ** 2, nu, diag)
    bc1, bc2 = 1 - b1**count, 1 - b2**count
    updates = jax.tree_util.tree_map(
        lambda p, m, v: -lr * wd * p - lr * (m / bc1) / (jnp.sqrt(v / bc2) ** power + eps), params, mu, nu)
    return updates, mu, nu


@jax.jit
def _sophia_rule(grads, hhat, fresh, params, mu, h, lr, b1, b2, rho, wd, eps):
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    h = jax.tree_util.tree_map(lambda a, e: jnp.where(fresh, b2 * a + (1 - b2) * e, a), h, hhat)

    def step(p, m, a):
        decayed = p - lr * wd * p
        return decayed - lr * jnp.sign(m) * jnp.minimum(jnp.abs(m) / jnp.maximum(rho * a, eps), 1.0) - p

    return jax.tree_util.tree_map(step, params, mu, h), mu, h


def adahessian(loss_fn: Callable[[Any, Any], Any], learning_rate: float | Schedule = 0.15, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0, *,
               seed: int = 0, num_probes: int = 1,
               kernel_axes: tuple[int, int] = (0, 1)) -> optax.GradientTransformationExtraArgs:
    """AdaHessian (Yao et al., AAAI 2021) as an optax transformation; ``update(..., batch=batch)``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch)`` -> scalar, pure and jit-compatible.
    learning_rate : float or optax schedule
    b1, b2, eps, weight_decay, hessian_power
        The rule's β₁, β₂, ε, decoupled weight decay and power k.
    seed, num_probes : int
        Probes of step t are drawn from ``(seed, t)``; one Hessian-vector product per probe.
    kernel_axes : (int, int)
        The spatial axes of 4-D leaves (convolution kernels), averaged over.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax, curvop.optim.optax as cox
    >>> loss = lambda p, b: jnp.sum(b * (p["w"] - 1.0) ** 2)
    >>> params, batch = {"w": jnp.zeros(3)}, jnp.array([1.0, 2.0, 3.0])
    >>> tx = cox.adahessian(loss, learning_rate=0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params, batch), state, params, batch=batch)
    >>> int(state.count)
    1
    """
    hp = check_adahessian(0.0 if callable(learning_rate) else learning_rate, (b1, b2), eps, weight_decay,
                          hessian_power, num_probes)
    diagonal = _Diagonal(loss_fn, hp["num_probes"], int(seed))

    def init(params: Any) -> AdaHessianState:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdaHessianState(jnp.zeros([], jnp.int32), zeros, jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(updates: Any, state: AdaHessianState, params: Any = None, *, batch: Any = None,
               **extra: Any) -> tuple[Any, AdaHessianState]:
        if params is None or batch is None:
            raise ValueError("adahessian's update needs params and batch=: tx.update(grads, state, params, batch=batch)")
        _eager(params)
        count = int(state.count) + 1
        diag = diagonal(params, batch, count)
        out, mu, nu = _adahessian_rule(updates, diag, params, state.mu, state.nu, count,
                                       _lr(learning_rate, count), b1, b2, eps, weight_decay, hessian_power,
                                       kernel_axes=tuple(kernel_axes))
        return out, AdaHessianState(jnp.asarray(count, jnp.int32), mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


def _sophia(curvature: Callable[[Any, Any, int], Any], learning_rate: float | Schedule, b1: float, b2: float,
            rho: float, weight_decay: float, eps: float, every: int) -> optax.GradientTransformationExtraArgs:
    def init(params: Any) -> SophiaState:
        return SophiaState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params),
                           jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(updates: Any, state: SophiaState, params: Any = None, *, batch: Any = None,
               **extra: Any) -> tuple[Any, SophiaState]:
        if params is None or batch is None:
            raise ValueError("Sophia's update needs params and batch=: tx.update(grads, state, params, batch=batch)")
        _eager(params)
        count = int(state.count) + 1
        fresh = curvature_step(count, every)
        hhat = curvature(params, batch, count) if fresh else state.hessian
        out, mu, h = _sophia_rule(updates, hhat, fresh, params, state.mu, state.hessian, _lr(learning_rate, count),
                                  b1, b2, rho, weight_decay, eps)
        return out, SophiaState(jnp.asarray(count, jnp.int32), mu, h)

    return optax.GradientTransformationExtraArgs(init, update)


def sophia_h(loss_fn: Callable[[Any, Any], Any], learning_rate: float | Schedule = 1e-4, b1: float = 0.965,
             b2: float = 0.99, rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15, every: int = 10, *,
             seed: int = 0, num_probes: int = 1) -> optax.GradientTransformationExtraArgs:
    """Sophia-H (Liu et al., ICLR 2024): ĥ = Hutchinson's diag(H) of ``loss_fn(params, batch)``,
    refreshed on steps 1, 1 + every, ...; ``update(..., batch=batch)`` (see :func:`adahessian`)."""
    check_sophia(0.0 if callable(learning_rate) else learning_rate, (b1, b2), rho, weight_decay, eps, every,
                 num_probes)
    return _sophia(_Diagonal(loss_fn, int(num_probes), int(seed)), learning_rate, b1, b2, rho, weight_decay,
                   eps, int(every))


def sophia_g(apply_fn: Callable[[Any, Any], Any], loss: str = "cross_entropy", learning_rate: float | Schedule = 1e-4,
             b1: float = 0.965, b2: float = 0.99, rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15,
             every: int = 10, *, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Sophia-G: ĥ = B·ĝ², ĝ the gradient of ``loss`` on targets sampled from ``apply_fn(params, inputs)``.

    ``loss`` is ``"cross_entropy"`` (integer labels, classes last, the mean over every position) or
    ``"mse"`` (``mean((f − y)²)``, the NLL of ``y ~ N(f, 1/2)``); the targets are the curvature
    family's draws (:func:`curvop.backends.jax.sample_targets`, as the Monte-Carlo Fisher's); the batch is ``(inputs, targets)``, passed as
    ``update(grads, state, params, batch=(inputs, targets))``; B is the number of terms the mean
    loss averages over. The estimate is one compiled gradient (no Hessian products).
    """
    kind = check_kind(loss)
    check_sophia(0.0 if callable(learning_rate) else learning_rate, (b1, b2), rho, weight_decay, eps, every)

    @jax.jit
    def gnb(params: Any, inputs: Any, key: jax.Array) -> Any:
        sampled, scale = gnb_targets(kind, apply_fn(params, inputs), key)
        g = jax.grad(lambda p: loss_value(kind, apply_fn(p, inputs), sampled))(params)
        return jax.tree_util.tree_map(lambda t: scale * t * t, g)

    def curvature(params: Any, batch: Any, step: int) -> Any:
        key = jax.random.PRNGKey(int(probe_rng(int(seed), step).integers(2**31)))
        return gnb(params, batch[0], key)

    return _sophia(curvature, learning_rate, b1, b2, rho, weight_decay, eps, int(every))


KINDS = ("cross_entropy", "mse")


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"loss must be one of {KINDS} (Sophia-G samples targets for them), got {kind!r}")
    return kind


def loss_value(kind: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Sophia-G's named loss: the mean cross-entropy of integer labels (classes last) or the mean squared error."""
    if kind == "cross_entropy":
        logp = jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1))
    return jnp.mean((outputs - targets) ** 2)


def gnb_targets(kind: str, outputs: jax.Array, key: jax.Array) -> tuple[jax.Array, int]:
    """Targets drawn from the model at ``outputs`` (:func:`curvop.backends.jax.sample_targets`, under
    ``key``) and B, the number of terms the mean loss averages over: ``B·ĝ²`` is the
    Gauss-Newton-Bartlett estimate.

    >>> import jax, jax.numpy as jnp
    >>> y, B = gnb_targets("cross_entropy", jnp.zeros((4, 3)), jax.random.PRNGKey(0))
    >>> y.shape, B
    ((4,), 4)
    """
    if kind == "cross_entropy":
        return sample_targets(outputs, "categorical", seed=key)[0], int(outputs.size // outputs.shape[-1])
    return sample_targets(outputs, "gaussian", seed=key, variance=0.5)[0], int(outputs.size)
