"""One answer across frameworks: the same MLP and batch in torch, TensorFlow and JAX (float64)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import curvop  # noqa: E402
from torch_reference import dense_hessian  # noqa: E402

jax.config.update("jax_enable_x64", True)
SIZES = [(6, 4), (3, 6)]  # torch layout: (out, in)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    weights = []
    for out, inp in SIZES:
        weights += [rng.standard_normal((out, inp)) / np.sqrt(inp), 0.1 * rng.standard_normal(out)]
    x = rng.standard_normal((40, 4))
    y = rng.integers(0, 3, 40)
    return weights, x, y


def torch_model(weights):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.from_numpy(w))
    return model


def torch_operator(weights, x, y):
    return curvop.hessian(torch_model(weights), torch.nn.CrossEntropyLoss(), (torch.from_numpy(x), torch.from_numpy(y)))


def keras_operator(weights, x, y):
    model = keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(6, activation="tanh", dtype="float64"),
        keras.layers.Dense(3, dtype="float64"),
    ])
    model.set_weights([w.T if w.ndim == 2 else w for w in weights])  # Keras kernels are (in, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    return curvop.hessian(model, loss, (x, y))


def jax_operator(weights, x, y):
    def loss(p, batch):
        inputs, targets = batch
        h = jnp.tanh(inputs @ p[0].T + p[1])
        logits = h @ p[2].T + p[3]
        picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    return curvop.hessian_of(loss, [jnp.asarray(w) for w in weights], (jnp.asarray(x), jnp.asarray(y)))


def keras_order(v: np.ndarray) -> np.ndarray:
    """Permute a vector from torch's parameter layout to Keras' (transposed kernels)."""
    parts, i = [], 0
    for out, inp in SIZES:
        parts.append(v[i : i + out * inp].reshape(out, inp).T.ravel())
        parts.append(v[i + out * inp : i + out * inp + out])
        i += out * inp + out
    return np.concatenate(parts)


def test_same_products_eigenvalues_and_trace(problem):
    weights, x, y = problem
    Ht, Hk, Hj = torch_operator(weights, x, y), keras_operator(weights, x, y), jax_operator(weights, x, y)
    n = Ht.shape[0]
    assert Hk.shape == Hj.shape == (n, n) == (51, 51)
    V = np.random.default_rng(1).standard_normal((n, 3))
    # the independent reference: torch.func.hessian of the same loss, in torch's parameter layout
    D = dense_hessian(torch_model(weights), torch.nn.CrossEntropyLoss(), [(torch.from_numpy(x), torch.from_numpy(y))])
    ref = D @ V
    np.testing.assert_allclose(Ht.matmat(V), ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(Hj.matmat(V), ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(Hk.matmat(np.stack([keras_order(c) for c in V.T], 1)),
                               np.stack([keras_order(c) for c in ref.T], 1), rtol=1e-8, atol=1e-12)
    # native vectors of each framework
    v = V[:, 0]
    np.testing.assert_allclose(np.asarray(Hj @ jnp.asarray(v)), ref[:, 0], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose((Hk @ tf.constant(keras_order(v))).numpy(), keras_order(ref[:, 0]),
                               rtol=1e-8, atol=1e-12)

    traces = [np.trace(H.to_dense()) for H in (Ht, Hk, Hj)]
    np.testing.assert_allclose(traces, np.trace(D), rtol=1e-8)
    top = [curvop.eigenvalues(H, k=3, seed=0).eigenvalues for H in (Ht, Hk, Hj)]
    exact = np.sort(np.linalg.eigvalsh(D))[::-1][:3]
    for t in top:
        np.testing.assert_allclose(np.sort(np.asarray(t))[::-1], exact, rtol=1e-8)


def test_algorithms_on_native_tensors_agree_for_the_same_seed(problem):
    """Probes come from numpy and the seed, so every framework sees the same ones: same estimates."""
    weights, x, y = problem
    Ht, Hj = torch_operator(weights, x, y), jax_operator(weights, x, y)
    for method in ("hutchinson", "hutch++", "xtrace"):
        a = curvop.trace(Ht, method=method, num_matvecs=30, seed=3).estimate
        b = curvop.trace(Hj, method=method, num_matvecs=30, seed=3).estimate
        assert abs(a - b) <= 1e-9 * abs(a), method
    da = curvop.spectral_density(Ht, num_steps=20, seed=4)
    db = curvop.spectral_density(Hj, num_steps=20, seed=4)
    np.testing.assert_allclose(da.trace(), db.trace(), rtol=1e-9)
    # TensorFlow sees the same matrix in another parameter order, so compare the exact quantities
    Hk = keras_operator(weights, x, y)
    np.testing.assert_allclose(curvop.eigenvalues(Hk, k=2, seed=0).eigenvalues,
                               curvop.eigenvalues(Ht, k=2, seed=0).eigenvalues, rtol=1e-8)


# --- issue 22: the curvature family ---------------------------------------------------------------
def _keras_model(weights):
    model = keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(6, activation="tanh", dtype="float64"),
        keras.layers.Dense(3, dtype="float64"),
    ])
    model.set_weights([w.T if w.ndim == 2 else w for w in weights])
    return model


def _jax_apply(p, inputs):
    return jnp.tanh(inputs @ p[0].T + p[1]) @ p[2].T + p[3]


def _jax_ce(logits, targets):
    picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def _permuted(D: np.ndarray) -> np.ndarray:
    """A matrix in torch's parameter layout, rows and columns permuted to Keras' layout."""
    P = np.stack([keras_order(c) for c in np.eye(D.shape[0])], 1)  # P @ v = keras_order(v)
    return P @ D @ P.T


@pytest.mark.parametrize("member", ["ggn", "empirical"])
def test_issue22_the_same_weights_give_the_same_ggn_and_fisher_on_torch_tf_and_jax(problem, member):
    weights, x, y = problem
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # unequal batches
    build = {"ggn": curvop.ggn, "empirical": lambda *a, **k: curvop.fisher(*a, kind="empirical", **k)}[member]
    Gt = build(torch_model(weights), torch.nn.CrossEntropyLoss(),
               [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in batches]).to_dense()
    Gk = build(_keras_model(weights), keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
               batches).to_dense()
    Gj = build((_jax_apply, [jnp.asarray(w) for w in weights]), _jax_ce,
               [(jnp.asarray(a), jnp.asarray(b)) for a, b in batches]).to_dense()
    scale = np.abs(Gt).max()
    assert np.abs(Gj - Gt).max() <= 1e-10 * scale
    assert np.abs(Gk - _permuted(Gt)).max() <= 1e-10 * scale
    assert np.abs(Gt - Gt.T).max() <= 1e-14 * scale and np.linalg.eigvalsh(Gt).min() > -1e-12 * scale


def test_issue22_the_same_weights_give_the_same_jacobian_on_torch_tf_and_jax(problem):
    weights, x, _ = problem
    Jt = curvop.jacobian(torch_model(weights), torch.from_numpy(x))
    Jk = curvop.jacobian(_keras_model(weights), x)
    Jj = curvop.jacobian((_jax_apply, [jnp.asarray(w) for w in weights]), jnp.asarray(x))
    assert Jt.shape == Jk.shape == Jj.shape == (120, 51)
    V = np.random.default_rng(2).standard_normal((51, 2))
    ref = Jt.matmat(V)
    np.testing.assert_allclose(Jj.matmat(V), ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(Jk.matmat(np.stack([keras_order(c) for c in V.T], 1)), ref, rtol=1e-10, atol=1e-13)
    U = np.random.default_rng(3).standard_normal(120)
    np.testing.assert_allclose(np.asarray(Jj.T @ jnp.asarray(U)), Jt.T @ U, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose((Jk.T @ tf.constant(U)).numpy(), keras_order(Jt.T @ U), rtol=1e-10, atol=1e-13)
