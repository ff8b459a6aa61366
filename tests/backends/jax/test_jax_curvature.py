"""The curvature family on JAX against dense float64 references built with jax.jacrev and jax.hessian."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvop  # noqa: E402

MODES = [dict(hvp=h, cache=c, batched=b) for h in ("forward", "reverse") for c in (True, False) for b in (True, False)]
IDS = [f"{m['hvp']}-{'cached' if m['cache'] else 'uncached'}-{'batched' if m['batched'] else 'looped'}" for m in MODES]


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _ce(f, t):
    return jnp.mean(jax.nn.logsumexp(f, axis=-1) - jnp.take_along_axis(f, t[:, None], axis=-1)[:, 0])


def _mse(f, t):
    return jnp.mean((f - t) ** 2)


def _bce(f, t):
    return jnp.mean(jnp.logaddexp(0.0, f) - t * f)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.standard_normal((4, 5)) / 2), "b1": jnp.asarray(0.1 * rng.standard_normal(5)),
              "w2": jnp.asarray(rng.standard_normal((5, 3)) / 2), "b2": jnp.asarray(0.1 * rng.standard_normal(3))}
    x = jnp.asarray(rng.standard_normal((23, 4)))
    targets = {"ce": jnp.asarray(rng.integers(0, 3, 23)), "mse": jnp.asarray(rng.standard_normal((23, 3))),
               "bce": jnp.asarray((rng.random((23, 3)) < 0.5).astype(float))}
    return params, x, targets


def _batches(x, y):
    return [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


def _dense(params, x, y, loss):
    flat, unravel = ravel_pytree(params)
    J = jax.jacrev(lambda w: _apply(unravel(w), x))(flat).reshape(-1, flat.size)
    f = _apply(params, x)
    Hf = jax.hessian(lambda g: loss(g, y))(f).reshape(f.size, f.size)
    grads = jnp.stack([jax.grad(lambda w: loss(_apply(unravel(w), x[i:i + 1]), y[i:i + 1]))(flat)
                       for i in range(len(x))])
    return np.asarray(J), np.asarray(J.T @ Hf @ J), np.asarray(grads.T @ grads / len(x))


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_empirical_fisher_and_jacobian_match_dense_references(problem, loss, mode):
    params, x, targets = problem
    fn, y = {"ce": _ce, "mse": _mse}[loss], targets[loss]
    J, G, E = _dense(params, x, y, fn)
    batches = _batches(x, y)
    np.testing.assert_allclose(curvop.ggn((_apply, params), fn, batches, **mode).to_dense(), G,
                               rtol=1e-12, atol=1e-14 * np.abs(G).max())
    np.testing.assert_allclose(curvop.fisher((_apply, params), fn, batches, kind="empirical", **mode).to_dense(), E,
                               rtol=1e-12, atol=1e-14 * np.abs(E).max())
    Jop = curvop.jacobian((_apply, params), batches, **mode)
    V = np.random.default_rng(1).standard_normal((J.shape[1], 2))
    np.testing.assert_allclose(Jop.matmat(V), J @ V, rtol=1e-12, atol=1e-13)
    U = jnp.asarray(np.random.default_rng(2).standard_normal(J.shape[0]))
    out = Jop.T @ U
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), J.T @ np.asarray(U), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss,likelihood", [("ce", "categorical"), ("mse", "gaussian"), ("bce", "bernoulli")])
def test_mc_fisher_expectation_is_the_ggn(problem, loss, likelihood):
    """Quadratic forms of 16 independently seeded MC Fishers (32 draws each) average to the GGN's
    within 4.5 standard errors (t distribution, 15 degrees of freedom)."""
    params, x, targets = problem
    fn = {"ce": _ce, "mse": _mse, "bce": _bce}[loss]
    _, G, _ = _dense(params, x, targets[loss], fn)
    V = np.random.default_rng(3).standard_normal((G.shape[0], 3))
    truth = np.einsum("ij,ij->j", V, G @ V)
    batches = _batches(x, targets[loss])
    reps = np.stack([np.einsum("ij,ij->j", V, curvop.fisher((_apply, params), fn, batches, likelihood=likelihood,
                                                             mc_samples=32, seed=s, check_deterministic=False).matmat(V))
                     for s in range(16)])
    mean, se = reps.mean(0), reps.std(0, ddof=1) / np.sqrt(len(reps))
    assert np.all(np.abs(mean - truth) <= 4.5 * se) and np.all(se < 0.1 * np.abs(truth)), (mean, truth, se)


def test_mc_fisher_needs_a_likelihood_for_a_plain_loss(problem):
    params, x, targets = problem
    with pytest.raises(ValueError, match="Pass likelihood= one of them"):
        curvop.fisher((_apply, params), _ce, _batches(x, targets["ce"]))
    F = curvop.fisher((_apply, params), _ce, _batches(x, targets["ce"]), likelihood="categorical", seed=3)
    v = jnp.ones(F.shape[0])
    assert np.array_equal(np.asarray(F @ v), np.asarray(F @ v)) and F.backend.seed == 3 and F.is_psd


def test_flax_nnx_and_linen_models():
    from flax import linen, nnx

    x, y = jnp.asarray(np.random.default_rng(0).standard_normal((12, 3))), jnp.asarray(np.arange(12) % 2)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    # a model linear in its parameters: the GGN is the Hessian
    G = curvop.ggn(model, _ce, (x, y)).to_dense()
    np.testing.assert_allclose(G, curvop.hessian(model, _ce, (x, y)).to_dense(), rtol=1e-10, atol=1e-14)
    module = linen.Dense(2, param_dtype=jnp.float64)
    variables = module.init(jax.random.key(0), x)
    G = curvop.ggn((module.apply, variables), _ce, (x, y)).to_dense()
    np.testing.assert_allclose(G, curvop.hessian((module.apply, variables), _ce, (x, y)).to_dense(),
                               rtol=1e-10, atol=1e-14)
    assert curvop.jacobian(model, x).shape == (24, 8)
