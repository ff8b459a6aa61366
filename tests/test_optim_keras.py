"""Issue 23 on Keras 3: ``curvop.optim.keras`` optimizers in ``model.fit`` against the numpy rules (float64)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import optim_reference as R  # noqa: E402

STEPS = 25


@pytest.fixture(autouse=True)
def float64():
    """The learning rate is a Keras variable of floatx: float64 for the rule to hold to 1e-12."""
    before = keras.backend.floatx()
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx(before)


def _model(prob):
    """A Keras model whose outputs are its weights (a (5,) and a (2, 2, 2, 3) kernel), and the loss
    ``½ Σ a (f − c)²`` per sample: the diagonal quadratic of ``optim_reference``."""
    A = np.concatenate([a.ravel() for a in prob.a])
    C = np.concatenate([c.ravel() for c in prob.c])

    class Weights(keras.layers.Layer):
        def build(self, shape):
            self.ws = [self.add_weight(shape=p.shape, initializer=keras.initializers.Constant(p), name=f"w{i}")
                       for i, p in enumerate(prob.p0)]

        def call(self, x):
            flat = keras.ops.concatenate([keras.ops.reshape(w, (-1,)) for w in self.ws])
            return x[:, :1] * 0 + flat[None, :]

    class Quadratic(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return 0.5 * keras.ops.sum(A * (y_pred - C) ** 2, axis=-1)

    inp = keras.Input((1,), dtype="float64")
    layer = Weights(dtype="float64")
    return keras.Model(inp, layer(inp)), layer, Quadratic(dtype="float64"), A.size


def _fit(prob, opt, steps=STEPS, callback=True, loss=None):
    import curvop.optim.keras as cok

    model, layer, quad, n = _model(prob)
    model.compile(optimizer=opt, loss=quad if loss is None else loss)
    x, y = np.ones((4, 1)), np.zeros((4, n))
    traj = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            traj.append([w.numpy().copy() for w in layer.ws])

    callbacks = ([cok.CurvatureCallback((x, y), batch_size=4)] if callback else []) + [Record()]
    model.fit(x, y, batch_size=4, epochs=steps, verbose=0, shuffle=False, callbacks=callbacks)
    return traj


@pytest.mark.parametrize("wd, power", [(0.0, 1.0), (0.1, 0.5)])
def test_adahessian_trajectory_is_the_rule(wd, power):
    import curvop.optim.keras as cok

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)), negative=True)
    want = R.adahessian(prob, STEPS, lr=0.1, weight_decay=wd, hessian_power=power, kernel_axes=(0, 1))
    assert R.max_error(_fit(prob, cok.AdaHessian(0.1, weight_decay=wd, hessian_power=power)), want) < 1e-12


@pytest.mark.parametrize("every, wd", [(1, 0.0), (3, 0.1)])
def test_sophia_h_trajectory_is_the_rule(every, wd):
    import curvop.optim.keras as cok

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)), negative=True)
    want = R.sophia(prob, STEPS, lr=0.05, every=every, weight_decay=wd)
    assert R.max_error(_fit(prob, cok.SophiaH(0.05, every=every, weight_decay=wd)), want) < 1e-12


def test_sophia_g_trajectory_is_the_rule(monkeypatch):
    """MSE of the outputs (the weights) against c, fixed sampled targets y*: ĥ = B·ĝ² with B the
    4·n entries of the batch's outputs and ĝ = 2(p − y*)/n, every 3 steps."""
    import curvop.optim.keras as cok

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)), seed=3)
    n = sum(a.size for a in prob.a)
    star = np.linspace(-1.0, 1.0, n)
    monkeypatch.setattr(cok, "sample_targets", lambda out, likelihood, **kw: [
        tf.broadcast_to(tf.constant(star), tf.shape(out))])  # B = 4·n, the outputs' size
    model, layer, _, _ = _model(prob)
    mse = keras.losses.MeanSquaredError(dtype="float64")
    model.compile(optimizer=cok.SophiaG(0.05, every=3, weight_decay=0.1), loss=mse)
    C = np.concatenate([c.ravel() for c in prob.c])
    x, y = np.ones((4, 1)), np.tile(C, (4, 1))
    got = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            got.append([w.numpy().copy() for w in layer.ws])

    model.fit(x, y, batch_size=4, epochs=STEPS, verbose=0, shuffle=False,
              callbacks=[cok.CurvatureCallback((x, y), batch_size=4), Record()])
    mean = R.Quadratic(tuple(np.full_like(a, 2.0 / n) for a in prob.a), prob.c, prob.p0)
    stars = [s.reshape(a.shape) for s, a in zip(np.split(star, np.cumsum([a.size for a in prob.a])[:-1]), prob.a)]
    want = R.sophia(mean, STEPS, lr=0.05, every=3, weight_decay=0.1,
                    hhat=lambda q: [4 * n * (2 * (v - s) / n) ** 2 for v, s in zip(q, stars)])
    assert R.max_error(got, want) < 1e-12


def test_adahessian_without_its_callback_is_a_clear_error():
    import curvop.optim.keras as cok

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="CurvatureCallback"):
        _fit(prob, cok.AdaHessian(0.1), steps=1, callback=False)


def test_callback_needs_curvop_optimizer_and_a_loss_object():
    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)))
    with pytest.raises(TypeError, match="curvop's Keras optimizers"):
        _fit(prob, keras.optimizers.Adam(), steps=1)
    import curvop.optim.keras as cok

    with pytest.raises(TypeError, match="keras.losses.Loss object"):
        _fit(prob, cok.SophiaH(0.1), steps=1, loss="mse")


def test_sophia_g_sampler_checks_the_loss():
    from curvop.optim.keras import gnb_targets, sophia_likelihood

    with pytest.raises(TypeError, match="SparseCategoricalCrossentropy"):
        sophia_likelihood(keras.losses.Huber())
    with pytest.raises(ValueError, match="label-smoothed"):
        sophia_likelihood(keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y, scale = gnb_targets(loss_fn, sophia_likelihood(loss_fn), tf.zeros((6, 4), tf.float64), 1)
    assert tuple(y.shape) == (6,) and scale == 6.0 and set(np.asarray(y)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("loss", ["sparse_logits", "categorical_probabilities", "mse"])
def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal(loss):
    """ĥ = B·ĝ² over 2000 seeds (the family's sampler) against diag(Jᵀ ∂²L/∂f² J) from nested tapes
    (dense), within 4.5 standard errors in every entry. A softmax model with a cross-entropy of
    probabilities is sampled from its log-probabilities: the reference is then the GGN through the
    logits (the Fisher), the pre-softmax outputs."""
    from curvop.optim.keras import gnb_targets, sophia_likelihood

    rng = np.random.default_rng(0)
    W = tf.Variable(rng.standard_normal((3, 4)))
    x = tf.constant(rng.standard_normal((5, 3)))
    probs = loss == "categorical_probabilities"
    loss_fn = {"sparse_logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
               "categorical_probabilities": keras.losses.CategoricalCrossentropy(dtype="float64"),
               "mse": keras.losses.MeanSquaredError(dtype="float64")}[loss]
    y = {"sparse_logits": tf.constant([0, 1, 2, 3, 0]), "categorical_probabilities": tf.one_hot([0, 1, 2, 3, 0], 4,
                                                                                                 dtype=tf.float64),
         "mse": tf.constant(rng.standard_normal((5, 4)))}[loss]

    def model():
        f = tf.tanh(x @ W)
        return tf.nn.softmax(f) if probs else f

    with tf.GradientTape() as tape:
        logits = tf.tanh(x @ W)
    J = tf.reshape(tape.jacobian(logits, W), (20, 12)).numpy()
    f0 = tf.reshape(logits, (-1,))
    with tf.GradientTape() as outer:
        outer.watch(f0)
        with tf.GradientTape() as inner:
            inner.watch(f0)
            f = tf.reshape(f0, (5, 4))
            value = loss_fn(y, tf.nn.softmax(f) if probs else f)
        g = inner.gradient(value, f0)
    Hf = outer.jacobian(g, f0).numpy()
    want = np.einsum("ip,ij,jp->p", J, Hf, J)
    likelihood, draws = sophia_likelihood(loss_fn), []
    for seed in range(2000):
        with tf.GradientTape() as tape:
            out = model()
            sampled, scale = gnb_targets(loss_fn, likelihood, out, seed)
            value = loss_fn(sampled, out)
        draws.append(scale * tape.gradient(value, W).numpy().ravel() ** 2)
    draws = np.array(draws)
    z = (draws.mean(0) - want) / (draws.std(0, ddof=1) / np.sqrt(len(draws)))
    assert np.max(np.abs(z)) < 4.5
