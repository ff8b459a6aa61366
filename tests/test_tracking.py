"""Issue 14 item 2: SharpnessTracker in real training loops; measuring never changes training."""

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
    for step in range(10):
        if track:
            hook(step)
        idx = torch.randint(0, 96, (32,))  # global torch RNG, like a sampler
        idx = idx[np.random.permutation(32)][: 24 + random.randint(0, 8)]  # numpy and python RNGs
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return state, opt_state, grads, rngs, [m.training for m in model.modules()], tracker


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
    tracker = curvop.SharpnessTracker((apply_fn, params), mse, (x[:32], y[:32]), trace=True, trace_matvecs=8)
    hook = tracker.every(2)

    @jax.jit
    def update(p, s, xb, yb):
        g = jax.grad(lambda q: mse(apply_fn(q, xb), yb))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    np.random.seed(0)
    for step in range(7):
        if track:
            hook(step, params)
        idx = np.random.permutation(64)[:32]
        params, opt_state = update(params, opt_state, x[idx], y[idx])
    return params, opt_state, np.random.get_state()[1].copy(), tracker, (apply_fn, mse, x, y)


def test_issue14_item2_jax_optax_tracker_does_not_change_training():
    jax = pytest.importorskip("jax")
    a, b = _jax_run(False), _jax_run(True)
    for u, v in zip(jax.tree_util.tree_leaves((a[0], a[1])), jax.tree_util.tree_leaves((b[0], b[1]))):
        assert np.array_equal(np.asarray(u), np.asarray(v))
    assert np.array_equal(a[2], b[2])
    tracker = b[3]
    assert [m.step for m in tracker.history] == [0, 2, 4, 6]
    apply_fn, mse, x, y = b[4]
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
    callbacks = [tracker.keras_callback(every=3)] if track else []
    hist = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    weights = [np.array(w) for w in model.get_weights()]
    opt_vars = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    return weights, opt_vars, np.random.get_state()[1].copy(), tracker, hist.history


def test_issue14_item2_keras_callback_does_not_change_training():
    a, b = _keras_run(False), _keras_run(True)
    assert all(np.array_equal(u, v) for u, v in zip(a[0], b[0]))
    assert len(a[1]) == len(b[1]) and all(np.array_equal(u, v) for u, v in zip(a[1], b[1]))
    assert np.array_equal(a[2], b[2])
    tracker = b[3]
    assert [m.step for m in tracker.history] == [0, 3, 6]  # 4 batches per epoch, 2 epochs
    assert b[4]["sharpness"][-1] == tracker.history[-1].value and a[4]["loss"] == b[4]["loss"]


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
    dense = np.linalg.eigvalsh(curvop.hessian(model, torch.nn.MSELoss(), loader).to_dense())[-1]
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
