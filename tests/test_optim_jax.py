"""Issue 23 on JAX: ``curvop.optim.optax`` transformations against the numpy rules (float64)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import curvop  # noqa: E402
import optim_reference as R  # noqa: E402

STEPS = 25


@pytest.fixture(autouse=True)
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _problem(negative=True, seed=0):
    """The quadratic with Flax's kernel layout (height, width, in, out) for the 4-D leaf; the batch
    scales the loss (1.0 here), so that the operator is moved to a new batch every step."""
    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)), negative=negative, seed=seed)
    a, c = [jnp.asarray(x) for x in prob.a], [jnp.asarray(x) for x in prob.c]

    def loss(p, batch):
        return batch["scale"] * sum(0.5 * jnp.sum(ai * (x - ci) ** 2) for ai, ci, x in zip(a, c, p))

    return prob, loss


def _run(prob, loss, tx, steps=STEPS):
    import curvop.optim.optax  # noqa: F401

    p = [jnp.asarray(x) for x in prob.p0]
    state = tx.init(p)
    grad = jax.jit(jax.grad(loss))
    out = []
    for _ in range(steps):
        batch = {"scale": jnp.asarray(1.0)}
        updates, state = tx.update(grad(p, batch), state, p, batch=batch)
        p = optax.apply_updates(p, updates)
        out.append([np.asarray(x) for x in p])
    return out


@pytest.mark.parametrize("wd, power", [(0.0, 1.0), (0.1, 0.5)])
def test_adahessian_trajectory_is_the_rule(wd, power):
    import curvop.optim.optax as cox

    prob, loss = _problem()
    want = R.adahessian(prob, STEPS, lr=0.1, weight_decay=wd, hessian_power=power, kernel_axes=(0, 1))
    got = _run(prob, loss, cox.adahessian(loss, 0.1, weight_decay=wd, hessian_power=power))
    assert R.max_error(got, want) < 1e-12


@pytest.mark.parametrize("every, wd", [(1, 0.0), (3, 0.1)])
def test_sophia_h_trajectory_is_the_rule(every, wd):
    import curvop.optim.optax as cox

    prob, loss = _problem()
    want = R.sophia(prob, STEPS, lr=0.05, every=every, weight_decay=wd)
    got = _run(prob, loss, cox.sophia_h(loss, 0.05, every=every, weight_decay=wd))
    assert R.max_error(got, want) < 1e-12


def test_sophia_g_trajectory_is_the_rule(monkeypatch):
    """Outputs are the parameters, loss ``"mse"`` (mean over n entries); fixed sampled targets y*:
    ĥ = n·(2(p − y*)/n)² (B = n terms), every 3 steps."""
    import curvop.optim.optax as cox

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)), seed=3)
    n = sum(a.size for a in prob.a)
    star = jnp.linspace(-1.0, 1.0, n)
    monkeypatch.setattr(cox, "sample_targets", lambda out, likelihood, **kw: [star])
    c = jnp.concatenate([jnp.asarray(x).ravel() for x in prob.c])

    def apply_fn(p, inputs):
        return jnp.concatenate([x.ravel() for x in p])

    def loss(p, batch):
        return jnp.mean((apply_fn(p, batch[0]) - batch[1]) ** 2)

    tx = cox.sophia_g(apply_fn, "mse", 0.05, every=3, weight_decay=0.1)
    p = [jnp.asarray(x) for x in prob.p0]
    state, got = tx.init(p), []
    for _ in range(STEPS):
        batch = (jnp.zeros(1), c)
        updates, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
        p = optax.apply_updates(p, updates)
        got.append([np.asarray(x) for x in p])
    mean = R.Quadratic(tuple(np.full_like(a, 2.0 / n) for a in prob.a), prob.c, prob.p0)  # mean: a = 2/n
    stars = [s.reshape(a.shape) for s, a in zip(np.split(np.asarray(star), np.cumsum([a.size for a in prob.a])[:-1]),
                                                 prob.a)]
    want = R.sophia(mean, STEPS, lr=0.05, every=3, weight_decay=0.1,
                    hhat=lambda q: [n * (2 * (x - s) / n) ** 2 for x, s in zip(q, stars)])
    assert R.max_error(got, want) < 1e-12


def test_adahessian_estimate_on_a_network_is_the_dense_one():
    """One step on a small tanh network: ν = (1 − β₂)·(z ⊙ Hz)², z the probe of (seed, 1) as curvop
    draws it and H from ``jax.hessian`` (dense)."""
    import curvop.optim.optax as cox
    from curvop.arrays import random_probes
    from curvop.optim.rules import probe_rng
    from jax.flatten_util import ravel_pytree

    key = jax.random.PRNGKey(0)
    params = {"w1": jax.random.normal(key, (3, 4)), "w2": jax.random.normal(jax.random.PRNGKey(1), (4, 2))}
    x, y = jax.random.normal(jax.random.PRNGKey(2), (6, 3)), jax.random.normal(jax.random.PRNGKey(3), (6, 2))

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)

    tx = cox.adahessian(loss, 0.01, seed=7)
    _, state = tx.update(jax.grad(loss)(params, (x, y)), tx.init(params), params, batch=(x, y))
    flat, unravel = ravel_pytree(params)
    Hd = np.asarray(jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat))
    z = random_probes(probe_rng(7, 1), (flat.size, 1))[:, 0]
    np.testing.assert_allclose(np.asarray(ravel_pytree(state.nu)[0]), 0.001 * (z * (Hd @ z)) ** 2, rtol=1e-10)


def test_operator_on_new_batch_and_params_is_a_fresh_operator():
    """``HessianOperator.on(data, params=...)``: the same matrix as an operator built there."""
    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p) - batch[1]) ** 2)

    p0, p1 = jnp.ones((3, 2)), 0.5 * jnp.arange(6.0).reshape(3, 2)
    b0 = (jnp.ones((4, 3)), jnp.zeros((4, 2)))
    b1 = (jnp.arange(12.0).reshape(4, 3) / 10, jnp.ones((4, 2)))
    H = curvop.hessian_of(loss, p0, b0, backend="jax")
    np.testing.assert_allclose(H.on(b1, params=p1).to_dense(),
                               curvop.hessian_of(loss, p1, b1, backend="jax").to_dense(), rtol=1e-12)
    with pytest.raises(ValueError, match="structure, shapes and dtype"):
        H.on(b1, params=jnp.ones((2, 3)))


def test_update_under_jit_and_without_batch_are_clear_errors():
    import curvop.optim.optax as cox

    prob, loss = _problem()
    tx = cox.adahessian(loss)
    p = [jnp.asarray(x) for x in prob.p0]
    state = tx.init(p)
    with pytest.raises(ValueError, match="batch="):
        tx.update(p, state, p)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda g, s, q: tx.update(g, s, q, batch={"scale": 1.0}))(p, state, p)
    with pytest.raises(ValueError, match="loss must be one of"):
        cox.sophia_g(lambda p, x: x, "hinge")


def test_extra_args_pass_through_optax_chain():
    import curvop.optim.optax as cox

    prob, loss = _problem(negative=False)
    tx = optax.chain(optax.clip_by_global_norm(1e6), cox.adahessian(loss, 0.1))
    got = _run(prob, loss, tx, steps=5)
    want = R.adahessian(prob, 5, lr=0.1, kernel_axes=(0, 1))
    assert R.max_error(got, want) < 1e-12


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal(kind):
    """ĥ = B·ĝ² over 3000 keys against diag(Jᵀ ∂²L/∂f² J) (``jax.jacrev``, ``jax.hessian``), within
    4.5 standard errors in every entry (the family's sampler, under jax.vmap's traced keys)."""
    from curvop.optim.optax import gnb_targets, loss_value
    from jax.flatten_util import ravel_pytree

    w = {"a": jax.random.normal(jax.random.PRNGKey(0), (3, 4)), "b": jax.random.normal(jax.random.PRNGKey(1), (4, 3))}
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
    flat, unravel = ravel_pytree(w)

    def outputs(f):
        p = unravel(f)
        return jnp.tanh(x @ p["a"]) @ p["b"]

    f0 = outputs(flat)
    J = jax.jacrev(lambda f: outputs(f).ravel())(flat)
    Hf = jax.hessian(lambda o: loss_value(kind, o.reshape(5, 3), jnp.zeros((5,), jnp.int32) if kind == "cross_entropy"
                                          else jnp.zeros((5, 3))))(f0.ravel())
    want = np.asarray(jnp.einsum("ip,ij,jp->p", J, Hf, J))

    def draw(key):
        sampled, scale = gnb_targets(kind, f0, key)
        g = jax.grad(lambda f: loss_value(kind, outputs(f), sampled))(flat)
        return scale * g * g

    draws = np.asarray(jax.vmap(draw)(jax.random.split(jax.random.PRNGKey(3), 3000)))
    z = (draws.mean(0) - want) / (draws.std(0, ddof=1) / np.sqrt(len(draws)))
    assert np.max(np.abs(z)) < 4.5


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: (s,), lambda s: [s, s]], ids=["array", "tuple", "list"])
def test_batch_may_be_any_pytree(wrap):
    """The batch reaches ``loss_fn`` unchanged, whatever its structure (a bare array, a tuple, a list)."""
    import curvop.optim.optax as cox

    prob = R.quadratic(shapes=((5,), (2, 2, 2, 3)))
    a, c = [jnp.asarray(x) for x in prob.a], [jnp.asarray(x) for x in prob.c]
    seen = []

    def loss(p, batch):
        seen.append(jax.tree_util.tree_structure(batch))
        s = jax.tree_util.tree_leaves(batch)[0]
        return s * sum(0.5 * jnp.sum(ai * (x - ci) ** 2) for ai, ci, x in zip(a, c, p))

    tx = cox.adahessian(loss, 0.1)
    p = [jnp.asarray(x) for x in prob.p0]
    state, got = tx.init(p), []
    for _ in range(3):
        batch = wrap(jnp.asarray(1.0))
        updates, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
        p = optax.apply_updates(p, updates)
        got.append([np.asarray(x) for x in p])
    assert set(seen) == {jax.tree_util.tree_structure(wrap(1.0))}
    assert R.max_error(got, R.adahessian(prob, 3, lr=0.1, kernel_axes=(0, 1))) < 1e-12
