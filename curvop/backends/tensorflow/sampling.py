"""Targets drawn from a model's predictive distribution (TensorFlow): the Monte-Carlo Fisher's draws.

:func:`sample_targets` serves the Monte-Carlo Fisher (:mod:`curvop.backends.tensorflow.curvature`)
and any Gauss-Newton-Bartlett estimator (Sophia-G: the squared mini-batch gradient of the loss on
targets sampled from the model, times the batch size). Stateless draws: TensorFlow's global seed
and generators are never touched. :func:`likelihood_of` reads the distribution from a Keras loss.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["likelihood_of", "sample_targets"]


def sample_targets(outputs: tf.Tensor, likelihood: str, *, seed: int, samples: int = 1, like: Any = None,
                   variance: Any = None) -> list[tf.Tensor]:
    """``samples`` draws of targets at ``outputs`` (logits with classes on the last axis, Keras'
    convention, for ``"categorical"`` and ``"bernoulli"``; the mean for ``"gaussian"``).

    ``like``: the true targets; floating ones of the outputs' shape ask for one-hot categorical
    draws (``CategoricalCrossentropy``), else class indices (``SparseCategoricalCrossentropy``).
    ``variance``: the gaussian's, per output entry (default 1).

    Examples
    --------
    >>> import tensorflow as tf
    >>> [t.numpy().tolist() for t in sample_targets(tf.constant([[9.0, -9.0], [-9.0, 9.0]]), "categorical", seed=0)]
    [[0, 1]]
    """
    f = tf.stop_gradient(tf.convert_to_tensor(outputs))
    s = tf.constant([int(seed), 0x6375], tf.int64)
    if likelihood == "categorical":
        classes = f.shape[-1]
        idx = tf.random.stateless_categorical(tf.reshape(f, [-1, classes]), samples, seed=s)  # (rows, samples)
        idx = tf.reshape(tf.transpose(idx), [samples, *f.shape[:-1]])
        if like is not None and tf.as_dtype(like.dtype).is_floating and tuple(like.shape) == tuple(f.shape):
            return list(tf.one_hot(idx, classes, dtype=f.dtype))
        return list(idx)
    if likelihood == "bernoulli":
        u = tf.random.stateless_uniform([samples, *f.shape], seed=s, dtype=f.dtype)
        return list(tf.cast(u < tf.sigmoid(f), f.dtype))
    if likelihood == "gaussian":
        z = tf.random.stateless_normal([samples, *f.shape], seed=s, dtype=f.dtype)
        return list(f + (1.0 if variance is None else tf.sqrt(tf.cast(variance, f.dtype))) * z)
    raise ValueError(f"unknown likelihood {likelihood!r}; use 'categorical', 'bernoulli' or 'gaussian'")


def likelihood_of(loss_fn: Any) -> str | None:
    """The distribution whose negative log-likelihood a Keras loss object is (``None``: not one)."""
    kind = type(loss_fn).__name__
    config = loss_fn.get_config() if hasattr(loss_fn, "get_config") else {}
    names = {"SparseCategoricalCrossentropy": "categorical", "CategoricalCrossentropy": "categorical",
             "BinaryCrossentropy": "bernoulli", "MeanSquaredError": "gaussian"}
    if kind not in names:
        return None
    if names[kind] != "gaussian":
        if not config.get("from_logits", False):
            raise ValueError(f"the Monte-Carlo Fisher samples from the logits: build the loss with "
                             f"{kind}(from_logits=True) and a model that returns logits")
        if config.get("ignore_class") is not None:
            raise ValueError("the Monte-Carlo Fisher cannot sample targets for a loss with ignore_class (the draws of "
                             "that class would be dropped and the ignored positions counted): use curvop.ggn, its "
                             "expectation, or kind='empirical'")
        if config.get("label_smoothing", 0.0):
            raise ValueError("the Monte-Carlo Fisher needs the loss to be the negative log-likelihood of the sampled "
                             "targets; a label-smoothed one is not: use kind='empirical' or curvop.ggn")
    return names[kind]
