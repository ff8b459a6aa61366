"""Targets sampled from a JAX model's predictive distribution, for Sophia-G (cross-entropy, MSE).

Kept apart, as :mod:`curvop.optim.sample_torch`, for the curvature family's sampler to replace.
The losses are named, since a JAX loss is a plain function: ``"cross_entropy"`` (integer labels,
classes on the last axis, mean over every position) and ``"mse"`` (``mean((f − y)²)`` over every
element, the likelihood of ``y ~ N(f, 1/2)``). ``scale`` is the number of terms the mean averages
over, so that ``scale · ĝ²`` is the Gauss-Newton-Bartlett estimate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["KINDS", "loss_value", "sample_targets"]

KINDS = ("cross_entropy", "mse")


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"loss must be one of {KINDS} (Sophia-G samples targets for them), got {kind!r}")
    return kind


def loss_value(kind: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """The mean loss of ``kind`` (see the module docstring)."""
    if kind == "cross_entropy":
        logp = jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1))
    return jnp.mean((outputs - targets) ** 2)


def sample_targets(kind: str, outputs: jax.Array, key: jax.Array) -> tuple[jax.Array, int]:
    """Targets drawn from the model at ``outputs`` (not differentiated) and the scale ``1/c``.

    >>> import jax, jax.numpy as jnp
    >>> y, scale = sample_targets("cross_entropy", jnp.zeros((4, 3)), jax.random.PRNGKey(0))
    >>> y.shape, scale
    ((4,), 4)
    """
    f = jax.lax.stop_gradient(outputs)
    if kind == "cross_entropy":
        return jax.random.categorical(key, f, axis=-1), int(f.size // f.shape[-1])
    return f + jnp.sqrt(0.5) * jax.random.normal(key, f.shape, f.dtype), int(f.size)
