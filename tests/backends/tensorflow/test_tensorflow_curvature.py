"""The curvature family on TensorFlow/Keras against dense float64 references built with nested tapes."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import curvop  # noqa: E402

MODES = [dict(hvp=h, batched=b) for h in ("forward", "reverse") for b in (True, False)]
IDS = [f"{m['hvp']}-{'batched' if m['batched'] else 'looped'}" for m in MODES]


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(5, activation="tanh", dtype="float64"),
                             keras.layers.Dense(3, dtype="float64")])


LOSSES = {
    "sparse_ce": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"), "classes"),
    "mse": (lambda: keras.losses.MeanSquaredError(dtype="float64"), "values"),
    "bce": (lambda: keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64"), "binary"),
}


def _data(kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 4))
    y = {"classes": rng.integers(0, 3, 23), "values": rng.standard_normal((23, 3)),
         "binary": (rng.random((23, 3)) < 0.5).astype(float)}[kind]
    return x, y, [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


def _dense(model, loss, x, y):
    """``J``, ``Jᵀ (∂²L/∂f²) J`` and the empirical Fisher, with tapes (the loss on all samples at once)."""
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        out = model(x)
    m = int(np.prod(out.shape))
    J = tf.concat([tf.reshape(j, [m, -1]) for j in tape.jacobian(out, variables)], 1).numpy()
    f = tf.constant(out.numpy())
    with tf.GradientTape() as outer:
        outer.watch(f)
        with tf.GradientTape() as inner:
            inner.watch(f)
            value = loss(y, f)
        g = inner.gradient(value, f)
    Hf = outer.jacobian(g, f).numpy().reshape(m, m)
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as t:
            value = loss(y[i:i + 1], model(x[i:i + 1]))
        rows.append(tf.concat([tf.reshape(gi, [-1]) for gi in t.gradient(value, variables)], 0).numpy())
    G = np.stack(rows)
    return J, J.T @ Hf @ J, G.T @ G / len(x)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("loss", ["sparse_ce", "mse"])
def test_ggn_empirical_fisher_and_jacobian_match_dense_references(loss, mode):
    make, kind = LOSSES[loss]
    model, (x, y, batches) = _model(), _data(kind)
    J, G, E = _dense(model, make(), x, y)
    np.testing.assert_allclose(curvop.ggn(model, make(), batches, **mode).to_dense(), G, rtol=1e-12,
                               atol=1e-14 * np.abs(G).max())
    np.testing.assert_allclose(curvop.fisher(model, make(), batches, kind="empirical", **mode).to_dense(), E,
                               rtol=1e-12, atol=1e-14 * np.abs(E).max())
    Jop = curvop.jacobian(model, batches, **mode)
    V = np.random.default_rng(2).standard_normal((J.shape[1], 2))
    np.testing.assert_allclose(Jop.matmat(V), J @ V, rtol=1e-12, atol=1e-13)
    u = tf.constant(np.random.default_rng(3).standard_normal(J.shape[0]))
    out = Jop.T @ u
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), J.T @ u.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss", ["sparse_ce", "mse", "bce"])
def test_mc_fisher_expectation_is_the_ggn(loss):
    """Quadratic forms of 16 independently seeded MC Fishers (32 draws each) average to the GGN's
    within 4.5 standard errors (t distribution, 15 degrees of freedom); the likelihood is read from
    the Keras loss."""
    make, kind = LOSSES[loss]
    model, (x, y, batches) = _model(), _data(kind)
    _, G, _ = _dense(model, make(), x, y)
    V = np.random.default_rng(4).standard_normal((G.shape[0], 3))
    truth = np.einsum("ij,ij->j", V, G @ V)
    reps = np.stack([np.einsum("ij,ij->j", V, curvop.fisher(model, make(), batches, mc_samples=32, seed=s, cache=True,
                                                             check_deterministic=False).matmat(V))
                     for s in range(16)])
    mean, se = reps.mean(0), reps.std(0, ddof=1) / np.sqrt(len(reps))
    assert np.all(np.abs(mean - truth) <= 4.5 * se) and np.all(se < 0.1 * np.abs(truth)), (mean, truth, se)


def test_losses_that_are_not_a_likelihood_of_the_logits_are_refused():
    model, (x, y, batches) = _model(), _data("classes")
    with pytest.raises(ValueError, match="from_logits=True"):
        curvop.fisher(model, keras.losses.SparseCategoricalCrossentropy(dtype="float64"), batches)
    with pytest.raises(ValueError, match="ignore_class"):  # the MC draws of that class would be dropped
        curvop.fisher(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1,
                                                                        dtype="float64"), batches)
    with pytest.raises(ValueError, match="likelihood= one of them"):
        curvop.fisher(model, keras.losses.MeanAbsoluteError(dtype="float64"), _data("values")[2])
    with pytest.raises(ValueError, match="needs the loss"):
        curvop.ggn(model, None, batches)
