"""Issue 14 item 2: SharpnessTracker in real training loops; measuring never changes training."""

import copy
import random

import numpy as np
import pytest

import curvop


# --- torch -------------------------------------------------------------------------------------
def _torch_run(track: bool):
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (96,), generator=g)
    tracker = curvop.SharpnessTracker(model, loss_fn, (x[:48], y[:48]), k=2, trace=True, trace_matvecs=10)
    hook = tracker.every(3)
    model.train()
    measured = []  # the model as each measurement saw it, for the dense references
    for step in range(10):
        if track and hook(step) is not None:
            measured.append(copy.deepcopy(model).eval())
        idx = torch.randint(0, 96, (32,))  # global torch RNG, like a sampler
        idx = idx[np.random.permutation(32)][: 24 + random.randint(0, 8)]  # numpy and python RNGs
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return state, opt_state, grads, rngs, [m.training for m in model.modules()], tracker, measured


def test_issue14_item2_torch_tracker_does_not_change_training():
    torch = pytest.importorskip("torch")
    a, b = _torch_run(False), _torch_run(True)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k  # parameters and BatchNorm buffers
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(a[1][k][n], b[1][k][n])  # momentum buffers
    assert all(torch.equal(u, v) for u, v in zip(a[2], b[2]))  # gradients
    assert torch.equal(a[3][0], b[3][0]) and np.array_equal(a[3][1], b[3][1]) and a[3][2] == b[3][2]
    assert a[4] == b[4] and all(a[4])  # still in training mode
    tracker = b[5]
    assert [m.step for m in tracker.history] == [0, 3, 6, 9]
    assert all(m.products > 10 and m.seconds > 0 and len(m.eigenvalues) == 2 and m.trace is not None
               for m in tracker.history)
    from torch_reference import dense_hessian

    for m, model in zip(tracker.history, b[6], strict=True):  # the values, against dense float64 Hessians
        D = dense_hessian(model, torch.nn.CrossEntropyLoss(), [tracker.data])
        _check_measurement(m, D, tracker)


def _check_measurement(m, D, tracker, rtol=1e-10):
    """λ_max and λ_2 within the tracker's tol (measured: 1.2e-4 at most for λ_2, against gaps to λ_3
    of 0.03-0.1); the trace exact when the budget covers n, else within 3 standard deviations of
    Hutchinson's with as many probes (Rademacher: Var zᵀDz = 2(‖D‖²_F − Σ D_ii²); measured within
    2.0 of them). That band is wide for 10 products (the trace is 4-5, the deviation 0.9): the
    exact case (to ``rtol``) is the sharp check of what the tracker reports."""
    ev = np.linalg.eigvalsh(D)[::-1]
    np.testing.assert_allclose(m.eigenvalues, ev[:tracker.k], rtol=tracker.tol)
    assert m.value == m.eigenvalues[0]
    if not tracker.trace:
        assert m.trace is None
    elif tracker.trace_matvecs >= D.shape[0]:
        assert m.trace == pytest.approx(np.trace(D), rel=rtol)
    else:
        sigma = np.sqrt(2 * (np.sum(D**2) - np.sum(np.diag(D) ** 2)) / tracker.trace_matvecs)
        assert abs(m.trace - np.trace(D)) < 3 * sigma, (m.trace, np.trace(D), sigma)


def test_issue14_item2_torch_tracker_trace_and_second_eigenvalue_match_dense():
    torch = pytest.importorskip("torch")
    from torch_reference import dense_hessian, tanh_mlp

    model, (x, y) = tanh_mlp(3, 4, 2, 16)  # n = 26: a budget of 26 products gives the exact trace
    tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), (x, y), k=2, trace=True, trace_matvecs=26)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        m = tracker(step)
        _check_measurement(m, dense_hessian(model, torch.nn.MSELoss(), [(x, y)]), tracker)
        opt.zero_grad()
        torch.nn.MSELoss()(model(x), y).backward()
        opt.step()


def test_issue14_item2_torch_measurement_matches_dense_and_warm_start_is_used():
    torch = pytest.importorskip("torch")
    from torch_reference import tanh_mlp

    model, (x, y) = tanh_mlp(4, 8, 2, 40)
    loss_fn = torch.nn.MSELoss()
    tracker = curvop.SharpnessTracker(model, loss_fn, (x, y), tol=1e-8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(3):
        m = tracker(step)
        params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
        names = [n for n, _ in model.named_parameters()]

        def f(*ps):
            out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
            return loss_fn(out, y)

        blocks = torch.autograd.functional.hessian(f, params)
        sizes = [p.numel() for p in params]
        D = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
                       for i in range(len(sizes))], 0)
        assert abs(m.value - float(torch.linalg.eigvalsh(D)[-1])) < 1e-8 * abs(m.value)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    cold = curvop.eigenvalues(curvop.hessian(model, loss_fn, (x, y)), tol=1e-8, seed=0)
    warm = tracker(3)
    assert warm.products < cold.num_matvecs  # the tracker starts from the previous eigenvector


def test_issue14_item2_history_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), (x, y))
    for s in (0, 5):
        tracker(s)
    assert list(tracker.steps) == [0, 5] and tracker.values.shape == (2,)
    assert "Measurement(step=5" in repr(tracker.history[-1])
    tracker.plot(threshold=2.0, path=str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("warm_start", [True, False])
def test_issue14_item1_first_warm_tracker_measurement_uses_the_residual_rule(monkeypatch, warm_start):
    # the first solve of a warm-started tracker seeds every later start, so it takes the safer rule
    torch = pytest.importorskip("torch")
    rules = []
    real = curvop.tracking.eigenvalues

    def spy(*args, **kwargs):
        rules.append((kwargs["tol_on"], kwargs["v0"] is None))
        return real(*args, **kwargs)

    monkeypatch.setattr(curvop.tracking, "eigenvalues", spy)
    from torch_reference import tanh_mlp

    model, (x, y) = tanh_mlp(3, 4, 1, 16)
    tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), (x, y), warm_start=warm_start)
    for s in range(3):
        tracker(s)
    if warm_start:
        assert rules == [("residual", True), ("eigenvalue", False), ("eigenvalue", False)]
    else:  # every solve is cold and takes the rule asked for
        assert rules == [("eigenvalue", True)] * 3


def test_issue14_item2_bad_every_is_a_clear_error():
    with pytest.raises(ValueError, match="every"):
        curvop.SharpnessTracker(None, None, None).every(0)


# --- JAX / optax ---------------------------------------------------------------------------------
def _jax_run(track: bool):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": 0.5 * jax.random.normal(k1, (5, 8)), "w2": 0.5 * jax.random.normal(k2, (8, 1))}
    x = jax.random.normal(k3, (64, 5))
    y = jnp.sin(x[:, :1])

    def apply_fn(p, inputs):
        return jnp.tanh(inputs @ p["w1"]) @ p["w2"]

    def mse(out, targets):
        return jnp.mean((out - targets) ** 2)

    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    # n = 48 products for the trace: the exact trace, checked sharply against jax.hessian
    tracker = curvop.SharpnessTracker((apply_fn, params), mse, (x[:32], y[:32]), trace=True, trace_matvecs=48)
    hook = tracker.every(2)

    @jax.jit
    def update(p, s, xb, yb):
        g = jax.grad(lambda q: mse(apply_fn(q, xb), yb))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    np.random.seed(0)
    measured = []  # the parameters each measurement saw, for the dense references
    for step in range(7):
        if track and hook(step, params) is not None:
            measured.append(params)
        idx = np.random.permutation(64)[:32]
        params, opt_state = update(params, opt_state, x[idx], y[idx])
    return params, opt_state, np.random.get_state()[1].copy(), tracker, (apply_fn, mse, measured)


def _jax_dense(apply_fn, loss, params, data):
    """float64 Hessian by jax.hessian of the loss of the flat parameters (x64 for this call only)."""
    import jax
    from jax.flatten_util import ravel_pytree

    with jax.enable_x64(True):
        as64 = lambda t: jax.tree_util.tree_map(lambda a: jax.numpy.asarray(np.asarray(a, np.float64)), t)  # noqa: E731
        flat, unravel = ravel_pytree(as64(params))
        x, y = as64(data)
        return np.asarray(jax.hessian(lambda f: loss(apply_fn(unravel(f), x), y))(flat))


def test_issue14_item2_jax_optax_tracker_does_not_change_training():
    jax = pytest.importorskip("jax")
    a, b = _jax_run(False), _jax_run(True)
    for u, v in zip(jax.tree_util.tree_leaves((a[0], a[1])), jax.tree_util.tree_leaves((b[0], b[1]))):
        assert np.array_equal(np.asarray(u), np.asarray(v))
    assert np.array_equal(a[2], b[2])
    tracker = b[3]
    assert [m.step for m in tracker.history] == [0, 2, 4, 6]
    apply_fn, mse, measured = b[4]
    for m, params in zip(tracker.history, measured, strict=True):  # the values, against jax.hessian
        rtol = 1e-10 if tracker.data[0].dtype == np.float64 else 1e-5  # float32 without jax_enable_x64
        _check_measurement(m, _jax_dense(apply_fn, mse, params, tracker.data), tracker, rtol)
    with pytest.raises(ValueError, match="params=params"):
        tracker(8)  # a JAX tracker must be given the current parameters


# --- Keras ---------------------------------------------------------------------------------------
def _keras_run(track: bool):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    tracker = curvop.SharpnessTracker(model, loss, (x[:32], y[:32]))
    measured = []  # the weights each measurement saw, for the dense references

    class Snapshot(keras.callbacks.Callback):  # runs after the tracker's callback, before the step
        def on_train_batch_begin(self, batch, logs=None):
            if len(tracker.history) > len(measured):
                measured.append([np.array(w) for w in model.get_weights()])

    callbacks = [tracker.keras_callback(every=3), Snapshot()] if track else []
    hist = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    weights = [np.array(w) for w in model.get_weights()]
    opt_vars = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    return weights, opt_vars, np.random.get_state()[1].copy(), tracker, hist.history, measured


def _keras_dense(weights, x, y):
    """float64 Hessian of the mean cross-entropy of ``Dense(tanh) -> Dense`` (dropout off at
    measurement) at ``weights``, by nested ``tf.GradientTape``: no Keras, no curvop."""
    import tensorflow as tf

    ws = [tf.Variable(np.asarray(w, np.float64)) for w in weights]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            logits = tf.tanh(x.astype(np.float64) @ ws[0] + ws[1]) @ ws[2] + ws[3]
            value = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(value, ws)], 0)
    n = int(g.shape[0])
    return tf.concat([tf.reshape(j, [n, -1]) for j in outer.jacobian(g, ws)], 1).numpy()


def test_issue14_item2_keras_callback_does_not_change_training():
    a, b = _keras_run(False), _keras_run(True)
    assert all(np.array_equal(u, v) for u, v in zip(a[0], b[0]))
    assert len(a[1]) == len(b[1]) and all(np.array_equal(u, v) for u, v in zip(a[1], b[1]))
    assert np.array_equal(a[2], b[2])
    tracker = b[3]
    assert [m.step for m in tracker.history] == [0, 3, 6]  # 4 batches per epoch, 2 epochs
    assert b[4]["sharpness"][-1] == tracker.history[-1].value and a[4]["loss"] == b[4]["loss"]
    x, y = tracker.data
    for m, weights in zip(tracker.history, b[5], strict=True):  # float32 model: within tol, not 1e-10
        _check_measurement(m, _keras_dense(weights, x, y), tracker)


def test_issue14_item2_loader_that_draws_from_torch_rng_leaves_it_untouched():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    ds = TensorDataset(torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64))
    loader = DataLoader(ds, batch_size=10, shuffle=True)  # every pass draws from the global torch RNG
    tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), loader)
    state = torch.get_rng_state()
    m = tracker(0)
    assert torch.equal(torch.get_rng_state(), state)
    from torch_reference import dense_hessian

    dense = np.linalg.eigvalsh(dense_hessian(model, torch.nn.MSELoss(), [ds.tensors]))[-1]  # all 40 samples
    assert m.value == pytest.approx(dense, rel=tracker.tol)  # tol bounds the eigenvalue's error (tol_on)


# --- issue 26 section 4: a tracker after the parameter set or dtype changed ------------------------
@pytest.mark.parametrize("change", ["freeze", "dtype"])
def test_issue26_section4_tracker_restarts_cold_when_the_parameters_change(change):
    torch = pytest.importorskip("torch")
    from torch_reference import dense_hessian, tanh_mlp

    model, (x, y) = tanh_mlp(4, 6, 1, 32)
    data = [(x, y)]
    tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), data, tol=1e-8)
    tracker(0)
    if change == "freeze":
        model[0].weight.requires_grad_(False)  # 24 fewer parameters
        names = [k for k, p in model.named_parameters() if p.requires_grad]
    else:
        model.float()
        data[0] = (x.float(), y.float())
        names = None
    with pytest.warns(UserWarning, match=r"the Hessian changed since the last measurement \(37 float64 parameters, "
                                         r"now \d+ float(32|64).*starts cold"):
        m = tracker(1)
    ref = dense_hessian(model.double(), torch.nn.MSELoss(), [(x, y)], names)
    rtol = 1e-6 if change == "dtype" else 1e-8
    np.testing.assert_allclose(m.value, np.linalg.eigvalsh(ref)[-1], rtol=rtol)
    if change == "dtype":
        model.float()
    m2 = tracker(2)  # warm-started again from the cold measurement
    np.testing.assert_allclose(m2.value, m.value, rtol=rtol)


def test_issue22_gauss_newton_sharpness_tracker_matches_the_dense_ggn():
    """``curvature="ggn"`` tracks λ_max of the GGN (checked against a dense float64 GGN)."""
    torch = pytest.importorskip("torch")
    from curvature_reference import dense_ggn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    tracker = curvop.SharpnessTracker(model, torch.nn.CrossEntropyLoss(), (x, y), curvature="ggn", tol=1e-8)
    lam = np.linalg.eigvalsh(dense_ggn(model, torch.nn.CrossEntropyLoss(), [(x, y)]))[-1]
    assert tracker(0).value == pytest.approx(lam, rel=1e-7)
    hess = curvop.SharpnessTracker(model, torch.nn.CrossEntropyLoss(), (x, y), tol=1e-8)(0).value
    assert abs(hess - lam) > 1e-6 * lam  # the Hessian's λ_max differs: the option is not ignored
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        curvop.SharpnessTracker(model, torch.nn.CrossEntropyLoss(), (x, y), curvature="fisher")
