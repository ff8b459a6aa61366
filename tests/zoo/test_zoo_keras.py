"""Model zoo (issue 11, item 7): a Keras 3 CNN with BatchNorm and dropout, with the defaults, float64.

The reference product is a nested ``tf.GradientTape`` written here, without curvop.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import curvop  # noqa: E402
from _zoo import check_operator  # noqa: E402

pytestmark = pytest.mark.zoo


def gradient_tape_reference(model, loss_fn, x, y):
    variables = model.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]

    def hvp(v):
        chunks = tf.split(tf.constant(v), sizes)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(y, model(x, training=False))
            grads = inner.gradient(loss, variables)
            gv = tf.add_n([tf.reduce_sum(g * tf.reshape(c, g.shape)) for g, c in zip(grads, chunks)])
        return tf.concat([tf.reshape(h, [-1]) for h in outer.gradient(gv, variables)], 0).numpy()

    return hvp


def test_issue11_item7_keras_cnn_batchnorm_dropout():
    keras.utils.set_random_seed(0)
    f64 = dict(dtype="float64")
    model = keras.Sequential([
        keras.Input((8, 8, 2), dtype="float64"),
        keras.layers.Conv2D(4, 3, padding="same", **f64),
        keras.layers.BatchNormalization(**f64),
        keras.layers.Activation("tanh", **f64),
        keras.layers.MaxPooling2D(2, **f64),
        keras.layers.Dropout(0.3, **f64),
        keras.layers.Flatten(**f64),
        keras.layers.Dense(3, **f64),
    ])
    bn = model.layers[1]
    bn.moving_mean.assign(np.full(4, 0.2)), bn.moving_variance.assign(np.full(4, 1.5))  # not 0 and 1
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 8, 8, 2)), np.array([0, 2, 1])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    H = curvop.hessian(model, loss_fn, (x, y))  # Keras order inside: loss_fn(targets, outputs)
    check_operator(H, gradient_tape_reference(model, loss_fn, tf.constant(x), tf.constant(y)))
