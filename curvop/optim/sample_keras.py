"""Targets sampled from a Keras model's predictive distribution, for Sophia-G (cross-entropy, MSE).

Kept apart, as :mod:`curvop.optim.sample_torch`, for the curvature family's sampler to replace.
Supported Keras losses: ``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy``
(logits or probabilities, classes last) and ``MeanSquaredError`` (``y ~ N(f, 1/2)`` per element);
``scale`` is the number of terms their mean (``sum_over_batch_size``) averages over (1 for ``"sum"``).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["check_loss", "sample_targets"]

_KINDS = {keras.losses.SparseCategoricalCrossentropy: "sparse", keras.losses.CategoricalCrossentropy: "categorical",
          keras.losses.MeanSquaredError: "mse"}


def check_loss(loss_fn: Any) -> str:
    """The kind of a supported Keras loss object, or a clear error."""
    for cls, kind in _KINDS.items():
        if isinstance(loss_fn, cls):
            if getattr(loss_fn, "reduction", "sum_over_batch_size") not in ("sum_over_batch_size", "sum"):
                raise ValueError(f"the loss must be reduced ('sum_over_batch_size' or 'sum'), got {loss_fn.reduction!r}")
            if kind != "mse" and loss_fn.get_config().get("label_smoothing", 0) != 0:
                raise ValueError("Sophia-G samples targets for a cross-entropy without label smoothing")
            return kind
    raise TypeError("Sophia-G samples targets from the model for keras.losses.SparseCategoricalCrossentropy, "
                    f"CategoricalCrossentropy or MeanSquaredError objects, got {type(loss_fn).__name__}; use SophiaH "
                    "for other losses")


def sample_targets(loss_fn: Any, outputs: tf.Tensor, seed: tuple[int, int]) -> tuple[tf.Tensor, float]:
    """Targets drawn from the model at ``outputs`` (stateless, from ``seed``) and ``1/c``.

    >>> import keras, tensorflow as tf
    >>> y, scale = sample_targets(keras.losses.MeanSquaredError(), tf.zeros((4, 3)), (0, 1))
    >>> tuple(y.shape), scale
    ((4, 3), 12.0)
    """
    kind = check_loss(loss_fn)
    f = tf.stop_gradient(outputs)
    if kind == "mse":
        sampled = f + tf.sqrt(tf.constant(0.5, f.dtype)) * tf.random.stateless_normal(tf.shape(f), seed, dtype=f.dtype)
        terms = int(tf.size(f))
    else:
        logits = f if loss_fn.get_config().get("from_logits") else tf.math.log(f)
        flat = tf.reshape(logits, [-1, logits.shape[-1]])
        drawn = tf.reshape(tf.random.stateless_categorical(flat, 1, seed), tf.shape(logits)[:-1])
        sampled = drawn if kind == "sparse" else tf.one_hot(drawn, logits.shape[-1], dtype=f.dtype)
        terms = int(tf.size(drawn))
    return sampled, float(terms if loss_fn.reduction == "sum_over_batch_size" else 1)
