"""The TensorFlow model adapter (issue 26): Keras mixed-precision policies refused, recurrent layers
fall back to the mode that can differentiate them, batches are pytrees, infinite ``tf.data`` refused.

References are dense float64 Hessians from nested ``tf.GradientTape``s written here, without curvop.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import curvop  # noqa: E402
from curvop._errors import ModeError  # noqa: E402

F64 = "float64"
Pair = namedtuple("Pair", "x y")


def tape_hessian(variables, loss):
    """``d^2 loss() / dw^2`` over ``variables`` flattened in order, by nested tapes."""
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(value, variables)], 0)
    rows = outer.jacobian(g, variables)
    return tf.concat([tf.reshape(r, [g.shape[0], -1]) for r in rows], 1).numpy()


@pytest.fixture
def policy():
    before = keras.mixed_precision.global_policy().name
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(before)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_issue26_item3_keras_mixed_precision_policy_is_refused(policy, name):
    policy(name)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2, dtype="float32")])
    policy("float32")
    data = (np.ones((4, 3), "float32"), np.array([0, 1, 0, 1]))
    with pytest.raises(TypeError, match=rf"layer 'dense\w*' computes in \w*float16 under the Keras dtype policy "
                                        rf"'{name}'.*set_global_policy\('float32'\)"):
        curvop.hessian(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), data)


def test_issue26_item3_one_mixed_layer_in_a_float32_model_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="inner", dtype="mixed_bfloat16"),
                              keras.layers.Dense(2)])
    with pytest.raises(TypeError, match="layer 'inner' computes in bfloat16"):
        curvop.hessian(model, keras.losses.MeanSquaredError(), (np.ones((4, 3), "float32"), np.ones((4, 2), "float32")))


def _recurrent(layer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3, 2), dtype=F64), layer(2, dtype=F64), keras.layers.Dense(2, dtype=F64)])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 2)), np.array([0, 1, 1, 0])
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64), x, y


@pytest.mark.parametrize("layer", ["SimpleRNN", "GRU", "LSTM"])
def test_issue26_item5_keras_recurrent_layers_run_in_reverse(layer):
    model, loss, x, y = _recurrent(getattr(keras.layers, layer))
    H = curvop.hessian(model, loss, (x, y))  # the default (issue 27): reverse-over-reverse, no fallback needed
    assert H.backend.mode == "reverse" and H.backend.fallback is None and "reverse mode (auto)" in H.backend.describe()
    ref = tape_hessian(model.trainable_variables, lambda: loss(y, model(x, training=False)))
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    np.testing.assert_allclose(H @ v, ref @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ModeError, match=r"hvp='forward'.*while loop.*hvp='reverse', cache=False works"):
        curvop.hessian(model, loss, (x, y), hvp="forward")


def test_issue26_section4_infinite_tf_data_is_refused():
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(2, dtype=F64)])
    ds = tf.data.Dataset.from_tensor_slices((np.ones((4, 3)), np.ones((4, 2)))).batch(2)
    loss = keras.losses.MeanSquaredError(dtype=F64)
    with pytest.raises(ValueError, match=r"infinite \(\.repeat\(\) without a count\).*take\(n\)"):
        curvop.hessian(model, loss, ds.repeat())
    assert curvop.hessian(model, loss, ds.repeat().take(2)).shape == (8, 8)


class Tagged(tf.Module):
    """``model(inputs)`` with ``inputs = {"x": tensor, "tag": str}``: the string reaches the model."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.random.default_rng(0).standard_normal((3, 2)))

    def __call__(self, inputs):
        assert isinstance(inputs["tag"], str)
        return tf.tanh(inputs["x"] @ self.w) * (2.0 if inputs["tag"] == "double" else 1.0)


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
def test_issue26_item4_pytree_batches_with_a_string_leaf(hvp):
    model = Tagged()
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    loss = keras.losses.MeanSquaredError(dtype=F64)
    batches = [Pair({"x": x[:4], "tag": "double"}, y[:4]), Pair({"x": x[4:], "tag": "double"}, y[4:])]
    H = curvop.hessian(model, loss, batches, hvp=hvp)
    ref = tape_hessian([model.w], lambda: loss(y, model({"x": tf.constant(x), "tag": "double"})))
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert H.backend.traces <= 2  # one trace for the single product, one for a block: not one per batch
