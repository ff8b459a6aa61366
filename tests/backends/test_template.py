"""Issue 13, backend side: the template (curvop.backends.template.AutodiffBackend) gives every framework
backend the same options, checks, weighting and NaN location. Template behaviour is tested on a small
numpy backend against explicit matrices; the drift bugs it fixes are tested on TensorFlow and JAX."""

from __future__ import annotations

import numpy as np
import pytest

import curvop
from curvop.backends.base import Backend, NondeterministicProductError
from curvop.backends.dataset import Dataset
from curvop.backends.faults import NonFiniteProductError
from curvop.backends.template import AutodiffBackend, ParamInfo
from _matrices import NumpyArrays


# --- a numpy backend on the template: loss(w, (X, y)) = mean((X w - y)**2) / 2, H_b = X^T X / n_b ---------
class LeastSquares(NumpyArrays, AutodiffBackend):
    name = "lstsq"
    batch_errors = (NotImplementedError,)

    def __init__(self, n: int, data, reduction: str = "mean", block_fails: bool = False, collective=None, **options):
        self._begin(Dataset(data, reduction), [ParamInfo("w", "float64", "cpu")], collective=collective, **options)
        self.size, self.dtype, self.device = n, np.dtype(np.float64), "cpu"
        self.block_fails, self.products = block_fails, 0
        self._complete()

    def _product(self, v, batch, batched):
        if batched and self.block_fails:
            raise NotImplementedError("no batching rule for this op")
        self.products += 1
        X = batch[0]
        return X.T @ (X @ v) / (len(X) if self.dataset.reduction == "mean" else 1)


def _batches(sizes=(5, 3, 4), n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((m, n)), rng.standard_normal(m)) for m in sizes]


def test_issue13_backend_is_an_abc_with_three_abstract_methods():
    assert Backend.__abstractmethods__ == {"hvp", "is_native", "from_numpy"}
    with pytest.raises(TypeError, match="abstract"):
        type("Half", (Backend,), {"hvp": lambda self, v: v})()
    assert LeastSquares(3, _batches()).is_main_process()
    assert AutodiffBackend.__abstractmethods__ == {"_product", "is_native", "from_numpy"}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_issue13_template_weighting_is_the_hessian_of_the_whole_dataset(reduction):
    data = _batches()
    X = np.concatenate([b[0] for b in data])
    dense = X.T @ X / (len(X) if reduction == "mean" else 1)
    B = LeastSquares(3, data, reduction)
    v = np.arange(1.0, 4.0)
    np.testing.assert_allclose(B.hvp(v), dense @ v, rtol=1e-13)
    V = np.eye(3)
    np.testing.assert_allclose(B.hvp_batch(V), dense, rtol=1e-13)


def test_issue13_template_single_batch_is_unweighted():
    (X, y), = _batches(sizes=(7,))
    B = LeastSquares(3, (X, y))
    v = np.ones(3)
    assert np.array_equal(B.hvp(v), X.T @ (X @ v) / 7)  # bit-exact: no n_b * ... / n_b


def test_issue13_template_batched_fallback_warns_once_and_loops():
    B = LeastSquares(3, _batches(), block_fails=True, batched=True)
    with pytest.warns(UserWarning, match="batched products failed.*NotImplementedError"):
        Y = B.hvp_batch(np.eye(3))
    assert B.batched is False
    np.testing.assert_allclose(Y, LeastSquares(3, _batches()).hvp_batch(np.eye(3)), rtol=1e-13)


def test_issue13_template_nan_batch_is_named():
    data = _batches(sizes=(4, 4, 4, 4))
    B = LeastSquares(3, data, check_deterministic=False)
    data[2][0][1, 1] = np.nan
    with pytest.raises(NonFiniteProductError, match=r"batch 2 \(0-based") as info:
        B.hvp(np.ones(3))
    assert info.value.batch == 2
    with pytest.raises(ValueError, match=r"vector contains NaN or Inf \(first at index 1\)"):
        B.hvp(np.array([0.0, np.nan, 0.0]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_issue13_template_looped_block_syncs_once_and_still_names_the_batch():
    data = _batches(sizes=(4, 4, 4))
    B = LeastSquares(3, data, batched=False, check_deterministic=False)
    calls = []
    B._all_finite = lambda y: calls.append(y.shape) or bool(np.isfinite(y).all())
    B.hvp_batch(np.eye(3))
    assert calls == [(3, 3)]  # one check for the block, not one per column
    data[1][0][0, 0] = np.inf
    with pytest.raises(NonFiniteProductError, match=r"batch 1 \(0-based"):
        B.hvp_batch(np.eye(3))


@pytest.mark.parametrize("option, value, error", [
    ("hvp", "sideways", ValueError), ("hvp", 1, ValueError), ("cache", "False", TypeError),
    ("batched", "yes", TypeError), ("check_deterministic", "no", TypeError), ("check_finite", 0, TypeError)])
def test_issue13_template_validates_options_alike(option, value, error):
    with pytest.raises(error, match=option):
        LeastSquares(3, _batches(), **{option: value})


@pytest.mark.parametrize("params, match", [
    ([], "no parameters selected"),
    ([ParamInfo("a", "float32", "cpu"), ParamInfo("b", "float64", "cpu")], "mixed dtypes.*one dtype"),
    ([ParamInfo("a", "float64", "cpu"), ParamInfo("b", "float64", "gpu:0")], "several devices.*one device"),
    ([ParamInfo("a", "bfloat16", "cpu")], "bfloat16.*float32 or float64"),
    ([ParamInfo("a", "int64", "cpu", floating=False)], "'a' has dtype int64.*floating-point"),
])
def test_issue13_template_checks_parameters(params, match):
    class Checked(LeastSquares):
        def __init__(self):
            self._begin(Dataset(None), params)

    with pytest.raises((TypeError, ValueError), match=match):
        Checked()


def test_issue13_template_determinism_check_on_fresh_products():
    class Noisy(LeastSquares):
        def _product(self, v, batch, batched):
            return super()._product(v, batch, batched) * (1 + 1e-6 * np.random.default_rng().standard_normal())

    with pytest.raises(NondeterministicProductError, match="differ"):
        Noisy(3, _batches())


class _FakeCollective:
    """Two ranks holding the same shard: the reduction sums both."""

    rank, world = 1, 2

    def __init__(self):
        self.calls = []

    def reduce_product(self, acc, count, reduction, failure=None, batch_error=False):
        self.calls.append(("reduce", count, reduction))
        if failure is not None:
            raise failure
        return 2 * acc / (2 * count) if reduction == "mean" else 2 * acc

    def agree(self, failure, where):
        self.calls.append(("agree", where))
        if failure is not None:
            raise failure

    def gather_ints(self, value, device):
        return [-1, value]

    def agree_seed(self, seed, device):
        return 1234


def test_issue13_template_calls_the_collective():
    coll = _FakeCollective()
    data = _batches()
    B = LeastSquares(3, data, collective=coll, check_deterministic=False)
    X = np.concatenate([b[0] for b in data])
    np.testing.assert_allclose(B.hvp(np.ones(3)), X.T @ X @ np.ones(3) / len(X), rtol=1e-13)
    assert coll.calls == [("agree", "building the operator (its first loss and checks)"), ("reduce", 12, "mean")]
    assert B.agree_seed(None) == 1234 and not B.is_main_process()
    data[1][0][0, 0] = np.inf
    with pytest.raises(NonFiniteProductError, match="batch 1 .*rank 1") as info:
        B.hvp(np.ones(3))
    assert info.value.rank == 1


def test_issue13_template_cache_is_refused_without_linearize():
    with pytest.raises(ValueError, match="keeps no linearisation.*cache must be False"):
        LeastSquares(3, _batches(), cache=True)


# --- TensorFlow: the drift bugs the template fixes --------------------------------------------------
def _tf_problem(sizes=(4, 4, 4, 4)):
    tf = pytest.importorskip("tensorflow")
    w = tf.Variable(np.array([0.5, -1.0, 2.0]), dtype=tf.float64)
    data = [(X, y) for X, y in _batches(sizes)]

    def f(w, batch):
        X, y = batch
        return tf.reduce_mean(tf.math.log(1 + tf.exp(tf.linalg.matvec(X, w) - y)))

    return tf, w, data, f


def test_issue13_tensorflow_nan_batch_is_named():
    tf, w, data, f = _tf_problem()
    data[2][0][0, 0] = np.nan
    with pytest.raises(NonFiniteProductError, match=r"batch 2 \(0-based"):
        curvop.hessian_of(f, w, data)  # the determinism check's product finds it
    H = curvop.hessian_of(f, w, data, check_deterministic=False)
    with pytest.raises(NonFiniteProductError, match=r"batch 2") as info:
        H @ tf.ones(3, tf.float64)
    assert info.value.batch == 2


@pytest.mark.parametrize("option, value", [("cache", "False"), ("batched", "yes"), ("check_deterministic", "no"),
                                           ("check_finite", 0), ("hvp", 1), ("check_loss_dtype", "False")])
def test_issue13_tensorflow_option_types_are_validated(option, value):
    tf, w, data, f = _tf_problem()
    with pytest.raises((TypeError, ValueError), match=option):
        curvop.hessian_of(f, w, data, **{option: value})


def test_issue13_tensorflow_half_precision_is_refused():
    tf = pytest.importorskip("tensorflow")
    w = tf.Variable(np.ones(3, np.float16))
    with pytest.raises(TypeError, match="float16.*float32 or float64"):
        curvop.hessian_of(lambda w: tf.reduce_sum(w ** 4), w)


# --- JAX: the drift bugs the template fixes ---------------------------------------------------------
def _jax_problem(sizes=(4, 4, 4, 4)):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def f(w, batch):
        X, y = batch
        return jnp.mean(jnp.log1p(jnp.exp(X @ w - y)))

    return jax, jnp, jnp.array([0.5, -1.0, 2.0]), _batches(sizes), f


@pytest.mark.parametrize("cache", [False, True])
def test_issue13_jax_nan_batch_is_named(cache):
    jax, jnp, w, data, f = _jax_problem()
    data[2][0][0, 0] = np.nan
    with pytest.raises(NonFiniteProductError, match=r"batch 2 \(0-based"):
        curvop.hessian_of(f, w, data, cache=cache)
    H = curvop.hessian_of(f, w, data, check_deterministic=False, cache=cache)
    with pytest.raises(NonFiniteProductError, match=r"batch 2") as info:
        H @ jnp.ones(3)
    assert info.value.batch == 2
    with pytest.raises(NonFiniteProductError, match=r"batch 2"):
        H.matmat(jnp.ones((3, 2)))


@pytest.mark.parametrize("option, value", [("cache", "False"), ("batched", "yes"), ("check_deterministic", "no"),
                                           ("check_finite", 0), ("hvp", 1), ("check_loss_dtype", "False")])
def test_issue13_jax_option_types_are_validated(option, value):
    jax, jnp, w, data, f = _jax_problem()
    with pytest.raises((TypeError, ValueError), match=option):
        curvop.hessian_of(f, w, data, **{option: value})


def test_issue13_jax_half_precision_and_low_precision_loss_are_refused():
    jax, jnp, w, data, f = _jax_problem()
    with pytest.raises(TypeError, match="float16.*float32 or float64"):
        curvop.hessian_of(lambda w: jnp.sum(w ** 4), jnp.ones(3, jnp.float16))
    from curvop.backends.base import LossPrecisionError

    with pytest.raises(LossPrecisionError, match="float32.*float64"):
        curvop.hessian_of(lambda w: jnp.sum(w ** 4).astype(jnp.float32), jnp.ones(3))
    H = curvop.hessian_of(lambda w: jnp.sum(w ** 4).astype(jnp.float32), jnp.ones(3), check_loss_dtype=False)
    assert H.shape == (3, 3)


# --- issue 26: every rank takes part in every collective, also one whose own work failed ----------------
def test_issue26_a_rank_whose_products_fail_still_takes_part_in_the_reduction():
    coll = _FakeCollective()
    data = _batches(sizes=(4, 4))
    B = LeastSquares(3, data, collective=coll, check_deterministic=False)
    coll.calls.clear()
    data[1] = (np.ones((4, 5)), np.ones(4))  # this rank's second batch has 5 features
    with pytest.raises(ValueError, match="matmul"):
        B.hvp(np.ones(3))
    assert coll.calls == [("reduce", 0, "mean")]  # the failure went through the collective, not around it


def test_issue26_a_rank_whose_checks_fail_at_build_tells_the_others():
    coll = _FakeCollective()

    class BadLoss(LeastSquares):
        def _resolved(self):
            raise ValueError("a check that failed on this rank only")

    with pytest.raises(ValueError, match="this rank only"):
        BadLoss(3, _batches(), collective=coll)
    assert coll.calls == [("agree", "building the operator (its first loss and checks)")]  # before any product


# --- issue 26 section 3: a block over a loader is one pass over the data, not one per column -------------
class _Counted(list):
    """A re-iterable loader that counts the passes made over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def test_issue26_a_block_over_a_loader_is_one_pass_and_equals_its_columns():
    data = _Counted(_batches(sizes=(5, 3, 4, 6)))
    B = LeastSquares(3, data, batched=False, check_deterministic=False)
    X = np.concatenate([b[0] for b in data])
    V = np.random.default_rng(1).standard_normal((3, 8))
    data.passes, B.products = 0, 0
    Y = B.hvp_batch(V)
    assert data.passes == 1 and B.products == 4 * 8  # was 8 passes: one per column
    assert np.array_equal(Y, np.stack([B.hvp(V[:, j]) for j in range(8)], axis=1))  # bit for bit
    np.testing.assert_allclose(Y, X.T @ X @ V / len(X), rtol=1e-13)
    V[1, 5] = np.nan  # the vector's fault, named as such
    with pytest.raises(ValueError, match=r"vector contains NaN .*\(1, 5\)"):
        B.hvp_batch(V)
    data[2][0][0, 0] = np.inf  # a batch's: named once, for the whole block
    with pytest.raises(NonFiniteProductError, match="batch 2"):
        B.hvp_batch(np.ones((3, 8)))


def test_issue26_torch_block_and_density_make_one_pass_per_product():
    torch = pytest.importorskip("torch")
    from torch_reference import dense_hessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 2, (24,))
    loss_fn = torch.nn.CrossEntropyLoss()  # (MSELoss: forward mode fails on main alone, "ZeroTensors are immutable")
    V = torch.randn(44, 8, dtype=torch.float64)
    for opts in ({"hvp": "reverse"}, {"hvp": "forward"}, {"hvp": "reverse", "cache": True},
                 {"hvp": "reverse", "train_mode": True, "seed": 3}, {"hvp": "forward", "train_mode": True, "seed": 3}):
        data = _Counted([(x[:8], y[:8]), (x[8:14], y[8:14]), (x[14:], y[14:])])
        H = curvop.hessian(model.eval() if "train_mode" not in opts else model, loss_fn, data, batched=False,
                           check_deterministic=False, **opts)
        data.passes = 0
        Y = H @ V
        assert data.passes == (0 if opts.get("cache") else 1), (opts, data.passes)  # was 8
        cols = torch.stack([H @ V[:, j] for j in range(8)], dim=1)
        assert torch.equal(Y, cols), (opts, (Y - cols).abs().max())  # bit for bit, dropout masks included
        if "train_mode" not in opts:
            torch.testing.assert_close(Y, torch.as_tensor(dense_hessian(model, loss_fn, list(data))) @ V,
                                       rtol=1e-10, atol=1e-12)
    data.passes, start = 0, H.num_matvecs
    curvop.spectral_density(H, num_steps=5, num_probes=4, seed=0)  # Lanczos on 4 probes in lockstep
    assert (data.passes, H.num_matvecs - start) == (5, 20)  # was 20 passes
    data.passes = 0
    curvop.trace(H, method="hutch++", num_matvecs=12, seed=0)  # three blocks: sketch, projection, probes
    assert data.passes == 3  # was 12


@pytest.mark.parametrize("framework", ["jax", "tensorflow"])
def test_issue26_tensorflow_and_jax_blocks_make_one_pass(framework):
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((12, 4)), rng.standard_normal((12, 3))
    data = _Counted([(xs[:5], ys[:5]), (xs[5:9], ys[5:9]), (xs[9:], ys[9:])])
    W = rng.standard_normal((4, 3))
    if framework == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        jnp = jax.numpy
        H = curvop.hessian((lambda p, x: jnp.tanh(x @ p["w"]), {"w": jnp.asarray(W)}),
                           lambda out, y: jnp.mean((out - y) ** 2), data, batched=False, cache=False)
        loss = lambda w: jnp.mean((jnp.tanh(xs @ w.reshape(4, 3)) - ys) ** 2)  # noqa: E731
        dense = np.asarray(jax.hessian(loss)(jnp.asarray(W.reshape(-1))))
        to_np = np.asarray
    else:
        tf = pytest.importorskip("tensorflow")
        keras = pytest.importorskip("keras")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,), dtype="float64"),
                                  keras.layers.Dense(3, activation="tanh", use_bias=False, dtype="float64")])
        model.layers[0].kernel.assign(W)
        H = curvop.hessian(model, keras.losses.MeanSquaredError(dtype="float64"), data, batched=False, cache=False)
        w = tf.Variable(W.reshape(-1))
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean((tf.tanh(xs @ tf.reshape(w, (4, 3))) - ys) ** 2)
            g = inner.gradient(loss, w)
        dense = outer.jacobian(g, w).numpy()
        to_np = lambda t: t.numpy()  # noqa: E731
    V = H.backend.from_numpy(rng.standard_normal((12, 8)))
    data.passes = 0
    Y = to_np(H @ V)
    assert data.passes == 1, data.passes  # was 8
    assert np.array_equal(Y, np.stack([to_np(H @ V[:, j]) for j in range(8)], axis=1))
    np.testing.assert_allclose(Y, dense @ to_np(V), rtol=1e-10, atol=1e-12)
