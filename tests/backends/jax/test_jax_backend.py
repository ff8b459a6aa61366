"""JAX backend: products against jax.hessian dense matrices, in float64."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # global flag: float64 needs it (see docs/jax.md)

import jax.numpy as jnp  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvop  # noqa: E402
from curvop.backends import faults  # noqa: E402

MODES = [dict(hvp="forward", cache=False), dict(hvp="reverse", cache=False), dict(cache=True), {}]


# --- models ------------------------------------------------------------------------------------------
def mlp_params(key, sizes=(4, 6, 3)):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params.append({"w": jax.random.normal(k1, (a, b)) / np.sqrt(a), "b": 0.1 * jax.random.normal(k2, (b,))})
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cnn_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": jax.random.normal(k1, (3, 2, 3, 3)) / 3.0,  # OIHW
        "cb": 0.1 * jax.random.normal(k2, (3,)),
        "fc": jax.random.normal(k3, (3 * 3 * 3, 2)) / 5.0,
    }


def cnn_apply(params, x):  # x: NCHW (N, 2, 6, 6)
    y = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME")
    y = jnp.tanh(y + params["cb"][None, :, None, None])
    y = jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0  # avg pool
    return y.reshape(y.shape[0], -1) @ params["fc"]


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def sum_se(out, y):
    return jnp.sum((out - y) ** 2)


def dense_hessian(loss_of_params, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda x: loss_of_params(unravel(x))))(flat))


@pytest.fixture(scope="module")
def mlp():
    key = jax.random.PRNGKey(0)
    p = mlp_params(key)
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 9), (11, 4)))
    y = np.asarray(jax.random.normal(jax.random.fold_in(key, 10), (11, 3)))
    D = dense_hessian(lambda q: mse(mlp_apply(q, x), y), p)
    return p, (x, y), D


@pytest.fixture(scope="module")
def cnn():
    key = jax.random.PRNGKey(1)
    p = cnn_params(key)
    x = jax.random.normal(jax.random.fold_in(key, 9), (5, 2, 6, 6))
    y = jax.random.normal(jax.random.fold_in(key, 10), (5, 2))
    D = dense_hessian(lambda q: mse(cnn_apply(q, x), y), p)
    return p, (x, y), D


@pytest.fixture(scope="module")
def mlp_op(mlp):
    p, batch, _ = mlp
    return curvop.hessian((mlp_apply, p), mse, batch)  # backend detected from the params; shared


# --- products ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=["forward", "reverse", "cached", "auto"])
def test_mlp_products_match_dense(mlp, mode):
    p, batch, D = mlp
    H = curvop.hessian_of(lambda q, b: mse(mlp_apply(q, b[0]), b[1]), p, batch, **mode)
    assert H.shape == D.shape and H.dtype == np.float64
    v = np.random.default_rng(0).standard_normal(D.shape[0])
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(H.to_dense(), D, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", MODES[:3], ids=["forward", "reverse", "cached"])
def test_cnn_products_match_dense(cnn, mode):
    p, batch, D = cnn
    H = curvop.hessian(cnn_apply, mse, batch, params=p, backend="jax", **mode)
    V = np.random.default_rng(1).standard_normal((D.shape[0], 3))
    np.testing.assert_allclose(H.matmat(V), D @ V, rtol=1e-11, atol=1e-12)


def test_native_jax_array_in_and_out(mlp, mlp_op):
    _, _, D = mlp
    H = mlp_op
    assert H.backend.name == "jax"
    v = jnp.asarray(np.random.default_rng(2).standard_normal(D.shape[0]))
    out = H @ v
    assert isinstance(out, jax.Array) and out.dtype == jnp.float64 and out.devices() == v.devices()
    np.testing.assert_allclose(np.asarray(out), D @ np.asarray(v), rtol=1e-12, atol=1e-13)
    V = jnp.asarray(np.random.default_rng(3).standard_normal((D.shape[0], 4)))
    for batched in (True, False):
        H.backend.batched = batched
        out = H.matmat(V)
        assert isinstance(out, jax.Array) and out.shape == V.shape
        np.testing.assert_allclose(np.asarray(out), D @ np.asarray(V), rtol=1e-12, atol=1e-13)
    H.backend.batched = True
    assert (H @ np.ones(D.shape[0])).flags.writeable  # numpy out is an ordinary array


def test_hessian_of_plain_function_and_numpy_params():
    w = jnp.array([1.0, 2.0, -1.0])
    H = curvop.hessian_of(lambda w: jnp.sum(w**4) / 4, w)
    np.testing.assert_allclose(H.to_dense(), np.diag(3 * np.asarray(w) ** 2))
    H = curvop.hessian_of(lambda w: jnp.sum(w**4) / 4, np.array([1.0, 2.0]), backend="jax")
    np.testing.assert_allclose(H.to_dense(), np.diag([3.0, 12.0]))
    with pytest.raises(TypeError, match="backend='jax'"):
        curvop.hessian_of(lambda w: jnp.sum(w**4), np.array([1.0, 2.0]))


@pytest.mark.parametrize("loss,cache", [(mse, False), (mse, True), (sum_se, False)], ids=["mean", "mean-cached", "sum"])
def test_list_of_batches_unequal_last(mlp, loss, cache):
    p, (x, y), D = mlp  # 11 samples in batches of 4, 4, 3
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 11, 4)]
    reduction = "mean" if loss is mse else "sum"
    H = curvop.hessian((mlp_apply, p), loss, batches, reduction=reduction, cache=cache)
    ref = D if loss is mse else D * y.size  # sum of squares = size * mean
    np.testing.assert_allclose(H.to_dense(), ref, rtol=1e-12, atol=1e-12)


def test_eigsh_matches_eigvalsh(mlp, mlp_op):
    H, D = mlp_op, mlp[2]
    w = np.sort(sla.eigsh(H, k=3, which="LA", return_eigenvectors=False))
    ref = np.linalg.eigvalsh(D)[-3:]
    np.testing.assert_allclose(w, ref, rtol=1e-8)


# --- errors -----------------------------------------------------------------------------------------
def test_errors(mlp, mlp_op):
    H, n = mlp_op, mlp[2].shape[0]
    with pytest.raises(ValueError, match=f"length {n}"):
        H @ np.ones(n + 1)
    with pytest.raises(ValueError, match=f"length {n}"):
        H @ jnp.ones(n - 1)
    with pytest.raises(TypeError, match="float32"):
        H @ jnp.ones(n, dtype=jnp.float32)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="jax backend and got a torch"):
        H @ torch.ones(n, dtype=torch.float64)


def test_construction_errors():
    w = jnp.ones(3)
    with pytest.raises(ValueError, match="scalar"):
        curvop.hessian_of(lambda w: w**2, w)
    with pytest.raises(TypeError, match="floating-point"):
        curvop.hessian_of(lambda p: jnp.sum(p["w"] ** 2), {"w": w, "step": jnp.array(3)})
    with pytest.raises(TypeError, match="mixed dtypes"):
        curvop.hessian_of(lambda p: jnp.sum(p[0] ** 2) + jnp.sum(p[1] ** 2), [w, jnp.ones(2, jnp.float32)])
    with pytest.raises(ValueError, match="hvp must be"):
        curvop.hessian_of(lambda w: jnp.sum(w**2), w, hvp="sideways")
    with pytest.raises(TypeError, match="model=\\(apply_fn, params\\)"):
        curvop.hessian(42, mse, (np.ones((2, 3)), np.ones((2, 1))), backend="jax")


def test_float64_numpy_params_without_x64_is_refused():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(TypeError, match="jax_enable_x64"):
            curvop.hessian_of(lambda w: jnp.sum(w**2), np.ones(3), backend="jax")
    finally:
        jax.config.update("jax_enable_x64", True)


# --- Flax NNX modules, accepted directly (issue 11, item 5) ----------------------------------------
def _nnx_mlp(nnx, bn: bool = True):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
            self.l1 = nnx.Linear(4, 5, rngs=rngs, **f64)
            self.bn = nnx.BatchNorm(5, rngs=rngs, **f64) if bn else None
            self.drop = nnx.Dropout(0.3, rngs=rngs)
            self.l2 = nnx.Linear(5, 3, rngs=rngs, **f64)

        def __call__(self, x):
            h = jnp.tanh(self.l1(x))
            return self.l2(self.drop(self.bn(h) if self.bn is not None else h))

    return MLP(nnx.Rngs(0))


def _by_name(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nnx_mlp_dense(nnx, model, x, y):
    """jax.hessian of the same MLP written out by hand (eval mode: BatchNorm on running statistics)."""
    flat, unravel = ravel_pytree(nnx.state(model, nnx.Param))  # only for the order of the entries
    eps = model.bn.epsilon
    mean, var = model.bn.mean[...], model.bn.var[...]

    def loss(theta):
        p = {k.replace(".value", ""): v for k, v in _by_name(unravel(theta)).items()}
        h = jnp.tanh(x @ p["['l1']['kernel']"] + p["['l1']['bias']"])
        h = (h - mean) / jnp.sqrt(var + eps) * p["['bn']['scale']"] + p["['bn']['bias']"]
        return mse(h @ p["['l2']['kernel']"] + p["['l2']['bias']"], y)

    return np.asarray(jax.hessian(loss)(flat))


@pytest.fixture(scope="module")
def nnx_mlp():
    nnx = pytest.importorskip("flax.nnx")
    model = _nnx_mlp(nnx)
    # running statistics away from 0 and 1, so that using them (not the batch's) shows in the
    # Hessian; float64 (NNX makes them float32 whatever param_dtype says, which costs 8 digits)
    model.bn.mean = nnx.BatchStat(jnp.linspace(-0.2, 0.3, 5))
    model.bn.var = nnx.BatchStat(jnp.linspace(0.5, 2.0, 5))
    model.eval()
    key = jax.random.PRNGKey(5)
    x, y = jax.random.normal(key, (9, 4)), jax.random.normal(jax.random.fold_in(key, 1), (9, 3))
    return nnx, model, (x, y), _nnx_mlp_dense(nnx, model, x, y)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "auto")
def test_issue11_item5_nnx_module_accepted_directly(nnx_mlp, mode):
    nnx, model, batch, D = nnx_mlp
    H = curvop.hessian(model, mse, batch, **mode)  # no split/merge, no backend=
    assert H.backend.name == "jax" and H.shape == D.shape
    V = np.random.default_rng(4).standard_normal((D.shape[0], 3))
    np.testing.assert_allclose(H.matmat(V), D @ V, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(H @ V[:, 0], D @ V[:, 0], rtol=1e-12, atol=1e-13)


def test_issue11_item5_nnx_same_loss_convention_as_apply_fn(nnx_mlp):
    # loss_fn(outputs, targets), as for (apply_fn, params) and Flax linen's module.apply
    nnx, model, batch, D = nnx_mlp
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    by_hand = curvop.hessian((lambda q, x: nnx.merge(graphdef, q, rest)(x), p), mse, batch)
    direct = curvop.hessian(model, mse, batch)
    v = np.random.default_rng(5).standard_normal(D.shape[0])
    np.testing.assert_allclose(direct @ v, by_hand @ v, rtol=1e-13, atol=1e-14)


def test_issue11_item5_nnx_module_left_unchanged(nnx_mlp):
    nnx, model, batch, D = nnx_mlp
    before = jax.tree_util.tree_leaves(nnx.state(model))  # immutable arrays: same objects = same state
    H = curvop.hessian(model, mse, batch)
    sla.eigsh(H, k=1, which="LA")
    after = jax.tree_util.tree_leaves(nnx.state(model))
    assert len(before) == len(after) and all(a is b for a, b in zip(before, after))
    assert model.drop.deterministic is True and model.bn.use_running_average is True


def test_issue11_item5_nnx_params_filter_holds_the_rest_fixed(nnx_mlp):
    nnx, model, batch, D = nnx_mlp
    H = curvop.hessian(model, mse, batch, params=nnx.All(nnx.Param, nnx.PathContains("l2")))
    # the l2 block of the full Hessian: l2.bias, l2.kernel come last in the flattened order
    assert H.shape == (5 * 3 + 3,) * 2
    np.testing.assert_allclose(H.to_dense(), D[-18:, -18:], rtol=1e-12, atol=1e-13)


def test_issue11_item5_nnx_training_mode_and_bad_filter_are_clear_errors():
    nnx = pytest.importorskip("flax.nnx")
    model = _nnx_mlp(nnx)  # training mode: dropout active, BatchNorm on batch statistics
    batch = (jnp.ones((4, 4)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"'bn'.*training mode.*model.eval\(\)"):
        curvop.hessian(model, mse, batch)
    model = _nnx_mlp(nnx, bn=False)
    with pytest.raises(ValueError, match=r"dropout layer 'drop'.*model.eval\(\)"):
        curvop.hessian(model, mse, batch)
    model.eval()
    with pytest.raises(TypeError, match="params= must be an NNX filter"):
        curvop.hessian(model, mse, batch, params=42)


def test_issue11_item5_linen_module_without_variables_is_a_clear_error():
    linen = pytest.importorskip("flax.linen")
    model = linen.Dense(3)
    with pytest.raises(TypeError, match=r"linen module \(Dense\).*\(module.apply, variables\)"):
        curvop.hessian(model, mse, (jnp.ones((4, 2)), jnp.zeros((4, 3))))


# --- issue 27: the product path (no work that is not autodiff) -----------------------------------------
def test_issue27_cached_build_compiles_each_function_once(mlp):
    # the determinism check runs through the cache's two compiled functions (no third, fresh one),
    # and vectors made by the backend are placed like the parameters, so a jnp vector, a numpy
    # vector and the check's vector share one compilation of the linear map
    p, batch, D = mlp
    runs = []
    real = jax.jit

    def counting_jit(f, **kw):  # count the runs of the compiled linearisation
        g = real(f, **kw)
        if (kw.get("compiler_options") or {}).get("xla_backend_optimization_level") != 0:
            return g  # the linearisation is the one compiled without LLVM's optimisations
        wrapper = lambda *a: runs.append(1) or g(*a)  # noqa: E731
        wrapper._cache_size = g._cache_size
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "jit", counting_jit)
        H = curvop.hessian((mlp_apply, p), mse, batch)
    assert len(runs) == 2  # the check's two products; the cache is the second one's linear map, not a third
    B = H.backend
    v = np.random.default_rng(4).standard_normal(D.shape[0])
    np.testing.assert_allclose(np.asarray(H @ jnp.asarray(v)), D @ v, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(H @ v, D @ v, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(H @ B.random(D.shape[0], "gaussian", np.random.default_rng(0))),
                               D @ np.random.default_rng(0).standard_normal(D.shape[0]), rtol=1e-12, atol=1e-12)
    assert B._cached is not None and "linearized" in B.describe()
    assert B._fresh1._cache_size() == 0  # never compiled
    assert B._lin[0]._cache_size() == 1 and B._linearize_jit._cache_size() == 1


@pytest.mark.parametrize("mode", MODES[:3], ids=["forward", "reverse", "cached"])
def test_issue27_nan_product_names_its_batch(mlp, mode):
    p, (x, y), _ = mlp
    bad = np.array(x)
    bad[7, 1] = np.nan  # sample 3 of batch 1
    batches = [(x[:4], y[:4]), (bad[4:8], y[4:8]), (x[8:], y[8:])]
    H = curvop.hessian((mlp_apply, p), mse, batches, check_deterministic=False, **mode)
    with pytest.raises(faults.NonFiniteProductError, match="batch 1") as err:
        H @ np.ones(H.shape[0])
    assert err.value.batch == 1


@pytest.mark.parametrize("mode", MODES[:3], ids=["forward", "reverse", "cached"])
def test_issue27_finite_product_whose_sum_overflows_is_returned(mode, monkeypatch):
    # H = 3e38 I in float32: every entry of H @ ones is finite, their sum overflows. The sum computed
    # with the product says "not finite", and the entries then settle it
    seen = []
    finite = faults.SumNote.finite
    monkeypatch.setattr(faults.SumNote, "finite", lambda s, y: seen.append(finite(s, y)) or seen[-1])
    w = jnp.zeros(4, jnp.float32)
    H = curvop.hessian_of(lambda w, b: 1.5e38 * jnp.sum(w**2), w, (np.zeros((2, 1), "float32"), np.zeros(2, "float32")),
                          check_deterministic=False, **mode)
    out = H @ jnp.ones(4, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.full(4, 3e38, np.float32), rtol=1e-6)
    assert seen == [False]  # the sum overflowed; the product was still returned


# --- issue 26: the products check themselves ---------------------------------------------------------
@jax.custom_jvp
def _product_with_wrong_rule(a, b):
    return a * b


@_product_with_wrong_rule.defjvp
def _wrong_rule(primals, tangents):  # d(ab) = b da + a db; here 1.5 a db: the cross derivatives disagree
    a, b = primals
    ta, tb = tangents
    return a * b, b * ta + 1.5 * a * tb


@pytest.mark.parametrize("mode", MODES)
def test_issue26_asymmetric_custom_jvp_is_refused_naming_the_pytree_paths(mode):
    params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([1.0, 0.3, -0.7])}

    def f(p):
        return jnp.sum(jnp.tanh(_product_with_wrong_rule(p["a"], p["b"]))) + jnp.sum(p["a"] ** 2)

    with pytest.raises(curvop.AsymmetricHessianError, match=r"not symmetric.*\"\['a'\]\" with \"\['b'\]\"") as info:
        curvop.hessian_of(f, params, **mode)
    assert info.value.asymmetry > 0.01
    curvop.hessian_of(f, params, check_symmetric=False, **mode)


def test_issue26_jax_verify_per_leaf():
    params = mlp_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
    y = jax.random.normal(jax.random.PRNGKey(2), (8, 3))
    H = curvop.hessian((mlp_apply, params), lambda out, t: jnp.mean((out - t) ** 2), (x, y), verify=True)
    res = H.verify()
    assert res.ok and res.error < 1e-6
    assert [b for b, _ in res.blocks] == [jax.tree_util.keystr(p) for p, _ in
                                          jax.tree_util.tree_flatten_with_path(params)[0]]
