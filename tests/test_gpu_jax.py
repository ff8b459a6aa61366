"""The JAX backend on a GPU (run by tests/gpu/run.sh; skipped without a JAX GPU device)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib
        return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason="JAX sees no GPU device")]

import jax.numpy as jnp  # noqa: E402

import curvop  # noqa: E402


def test_jax_gpu_products_native_and_numpy():
    gpu = _gpus()[0]
    key = jax.random.PRNGKey(0)
    w = jax.device_put(jax.random.normal(key, (6, 3)), gpu)
    x = jax.device_put(jax.random.normal(key, (10, 6)), gpu)
    f = lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)  # noqa: E731
    H = curvop.hessian_of(f, w)
    flat = w.reshape(-1)
    D = np.asarray(jax.jit(jax.hessian(lambda u: f(u.reshape(6, 3))))(flat))
    v = jax.device_put(jnp.ones(18, dtype=w.dtype), gpu)
    out = H @ v
    assert isinstance(out, jax.Array) and out.devices() == {gpu}
    tol = 1e-4 if w.dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(out), D @ np.ones(18), rtol=tol, atol=tol)
    np.testing.assert_allclose(H @ np.ones(18), D @ np.ones(18), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="device"):
        H @ jax.device_put(jnp.ones(18, dtype=w.dtype), jax.devices("cpu")[0])


def test_issue22_jax_ggn_and_solve_on_the_gpu():
    gpu = _gpus()[0]
    key = jax.random.PRNGKey(1)
    params = {"w": jax.device_put(jax.random.normal(key, (6, 3)), gpu), "b": jax.device_put(jnp.zeros(3), gpu)}
    x = jax.device_put(jax.random.normal(key, (10, 6)), gpu)
    y = jax.device_put(jnp.arange(10) % 3, gpu)
    apply = lambda p, inputs: jnp.tanh(inputs @ p["w"] + p["b"])  # noqa: E731
    ce = lambda f, t: jnp.mean(jax.nn.logsumexp(f, axis=-1) - jnp.take_along_axis(f, t[:, None], axis=-1)[:, 0])  # noqa: E731
    G = curvop.ggn((apply, params), ce, (x, y))
    b = jax.device_put(jnp.ones(21, dtype=params["w"].dtype), gpu)
    r = curvop.solve(G, b, damping=0.1, tol=1e-5)
    assert isinstance(r.x, jax.Array) and r.x.devices() == {gpu} and r.converged
    dense = G.to_dense().astype(np.float64)
    np.testing.assert_allclose(np.asarray(r.x), np.linalg.solve(dense + 0.1 * np.eye(21), np.ones(21)), rtol=1e-3)
