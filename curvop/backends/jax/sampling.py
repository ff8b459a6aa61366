"""Targets drawn from a model's predictive distribution (JAX): the Monte-Carlo Fisher's draws.

:func:`sample_targets` serves the Monte-Carlo Fisher (:mod:`curvop.backends.jax.curvature`) and
any Gauss-Newton-Bartlett estimator (Sophia-G: the squared mini-batch gradient of the loss on
targets sampled from the model, times the batch size). Pure: it draws from ``jax.random.key(seed)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["sample_targets"]


def sample_targets(outputs: jax.Array, likelihood: str, *, seed: int, samples: int = 1, like: Any = None,
                   variance: Any = None, class_axis: int = -1) -> list[jax.Array]:
    """``samples`` draws of targets from the predictive distribution at ``outputs``.

    Parameters
    ----------
    outputs : jax.Array
        Logits (classes along ``class_axis``, the last one as in optax) for ``"categorical"`` and
        ``"bernoulli"``; the mean for ``"gaussian"``. Samples along axis 0.
    likelihood : {"categorical", "bernoulli", "gaussian"}
    seed : int or jax.Array
        An int, or a PRNG key (inside ``jax.jit``, where a traced key cannot become an int).
    samples : int
    like : array, optional
        The true targets: floating ones of the outputs' shape ask for one-hot ``"categorical"``
        draws, else class indices (int32).
    variance : array or float, optional
        ``"gaussian"``: the variance of each output entry (default 1).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> [t.tolist() for t in sample_targets(jnp.array([[9.0, -9.0], [-9.0, 9.0]]), "categorical", seed=0)]
    [[0, 1]]
    """
    f = jax.lax.stop_gradient(outputs)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    if likelihood == "categorical":
        idx = jax.random.categorical(key, f, axis=class_axis, shape=(samples, *_without(f.shape, class_axis)))
        if like is not None and jnp.issubdtype(jnp.asarray(like).dtype, jnp.floating) and jnp.shape(like) == f.shape:
            onehot = jax.nn.one_hot(idx, f.shape[class_axis], dtype=f.dtype, axis=class_axis)
            return list(onehot)
        return list(idx)
    if likelihood == "bernoulli":
        return list(jax.random.bernoulli(key, jax.nn.sigmoid(f), (samples, *f.shape)).astype(f.dtype))
    if likelihood == "gaussian":
        z = jax.random.normal(key, (samples, *f.shape), dtype=f.dtype)
        return list(f + (1.0 if variance is None else jnp.sqrt(variance)) * z)
    raise ValueError(f"unknown likelihood {likelihood!r}; use 'categorical', 'bernoulli' or 'gaussian'")


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis = axis % len(shape)
    return shape[:axis] + shape[axis + 1:]
