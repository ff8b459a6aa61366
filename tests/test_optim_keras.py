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
    monkeypatch.setattr(cok, "sample_targets", lambda loss_fn, out, seed: (
        tf.broadcast_to(tf.constant(star), tf.shape(out)), float(4 * n)))
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
    from curvop.optim.sample_keras import check_loss, sample_targets

    with pytest.raises(TypeError, match="SparseCategoricalCrossentropy"):
        check_loss(keras.losses.Huber())
    y, scale = sample_targets(keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              tf.zeros((6, 4), tf.float64), (1, 2))
    assert tuple(y.shape) == (6,) and scale == 6.0 and set(np.asarray(y)) <= {0, 1, 2, 3}
