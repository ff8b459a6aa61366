"""``curvop.hessian``'s factory: which framework a model belongs to (issue 13 item 3)."""

from __future__ import annotations

import numpy as np
import pytest

import curvop


def test_issue13_item3_factory_finds_the_framework_of_a_bare_apply_fn_from_params():
    # the factory no longer knows JAX's (apply_fn, params) tuple: it finds the framework from the
    # arrays a model (or params=) holds, and the JAX backend alone knows what the pair means
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.standard_normal(2))}
    x, y = jnp.asarray(rng.standard_normal((5, 3))), jnp.asarray(rng.standard_normal((5, 2)))

    def apply_fn(p, inputs):
        return jnp.tanh(inputs @ p["w"] + p["b"])

    def mse(out, t):
        return jnp.mean((out - t) ** 2)

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda q: mse(apply_fn(unravel(q), x), y))(flat))
    bare = curvop.hessian(apply_fn, mse, (x, y), params=params)  # was: "cannot tell which framework"
    pair = curvop.hessian((apply_fn, params), mse, (x, y))
    jitted = curvop.hessian((jax.jit(apply_fn), params), mse, (x, y))
    for H in (bare, pair, jitted):
        assert H.backend.name == "jax"
        np.testing.assert_allclose(H.to_dense(), dense, rtol=1e-10, atol=1e-12)


def test_issue13_item3_factory_still_refuses_a_model_of_no_framework():
    with pytest.raises(TypeError, match="cannot tell which framework"):
        curvop.hessian((lambda p, x: x, {"w": np.ones(3)}), None, (np.ones(2), np.ones(2)))
    with pytest.raises(TypeError, match="cannot tell which framework a function"):
        curvop.hessian(lambda p, x: x, None, (np.ones(2), np.ones(2)), params=[1.0, None])
