"""TensorFlow backend: every product mode against a dense Hessian from nested GradientTapes."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import curvop  # noqa: E402
from curvop.backends import tensorflow as tfb  # noqa: E402
from curvop.backends.base import NondeterministicProductError  # noqa: E402

F64 = "float64"
_BUILT = {}  # operators built by test_modes_match_dense, reused to spare tracing time
MODES = [(m, b) for m in ("forward", "reverse") for b in (True, False)]


# --- models, data and the dense reference ------------------------------------------------------------
def make_mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,), dtype=F64),
        keras.layers.Dense(5, activation="tanh", dtype=F64, name="hidden"),
        keras.layers.Dropout(0.5, dtype=F64),  # inactive with training=False
        keras.layers.Dense(3, dtype=F64, name="out"),
    ], name="mlp")


def make_cnn():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((6, 6, 1), dtype=F64),
        keras.layers.Conv2D(2, 3, activation="tanh", dtype=F64),
        keras.layers.MaxPooling2D(2, dtype=F64),
        keras.layers.Flatten(dtype=F64),
        keras.layers.Dense(3, dtype=F64),
    ], name="cnn")


def mlp_data(n=19):
    rng = np.random.default_rng(2)
    return rng.standard_normal((n, 4)), rng.standard_normal((n, 3))


def cnn_data(n=10):
    rng = np.random.default_rng(3)
    return rng.standard_normal((n, 6, 6, 1)), rng.integers(0, 3, n)


def flat(ts):
    return tf.concat([tf.reshape(t, [-1]) for t in ts], 0)


def dense_hessian(loss, variables):
    """Reference: the Jacobian of the gradient, from nested GradientTapes."""
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = flat(inner.gradient(value, variables))
    jac = outer.jacobian(g, variables, experimental_use_pfor=False)
    return tf.concat([tf.reshape(j, [g.shape[0], -1]) for j in jac], 1).numpy()


def model_hessian(model, loss_fn, x, y):
    vs = [w.value for w in model.trainable_weights]
    return dense_hessian(lambda: loss_fn(tf.constant(y), model(tf.constant(x), training=False)), vs)


@pytest.fixture(scope="module")
def mlp():
    model, loss = make_mlp(), keras.losses.MeanSquaredError(dtype=F64)
    x, y = mlp_data()
    return model, loss, x, y, model_hessian(model, loss, x, y)


@pytest.fixture(scope="module")
def cnn():
    model, loss = make_cnn(), keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    x, y = cnn_data()
    return model, loss, x, y, model_hessian(model, loss, x, y)


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0)


# --- products ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,batched", MODES)
def test_modes_match_dense(case, mode, batched, request):
    model, loss, x, y, ref = request.getfixturevalue(case)
    H = curvop.hessian(model, loss, (x, y), hvp=mode, batched=batched)
    _BUILT[case, mode, batched] = H
    assert H.shape == ref.shape and H.dtype == np.float64
    assert H.backend.mode == mode and H.backend.batched is batched
    close(H.to_dense(), ref)  # (n, n) blocks through hvp_batch
    rng = np.random.default_rng(0)
    v = rng.standard_normal(ref.shape[0])
    close(H @ v, ref @ v)  # numpy in, numpy out
    tv = tf.constant(v)
    out = H.matvec(tv)  # tf.Tensor in, tf.Tensor out
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float64 and out.device == tv.device
    close(out.numpy(), ref @ v)
    V = rng.standard_normal((ref.shape[0], 3))
    out = H.matmat(tf.constant(V))
    assert isinstance(out, tf.Tensor) and out.shape == (ref.shape[0], 3)
    close(out.numpy(), ref @ V)
    assert H.backend.traces <= 2  # one trace per product function, whatever the number of products


def test_auto_options_and_detection(mlp):
    model, loss, x, y, ref = mlp
    H = curvop.hessian(model, loss, (tf.constant(x), tf.constant(y)))  # backend detected from the model
    assert H.backend.name == "tensorflow" and H.backend.mode in ("forward", "reverse")
    assert "tensorflow" in repr(H)
    close(H.to_dense(), ref)


def test_eigsh_matches_dense(cnn):
    model, loss, x, y, ref = cnn
    H = curvop.hessian(model, loss, (x, y))
    vals = np.sort(sla.eigsh(H, k=3, which="LA", tol=1e-12)[0])
    want = np.linalg.eigvalsh(ref)[-3:]
    np.testing.assert_allclose(vals, want, rtol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batches_with_unequal_last_batch(mlp, reduction):
    model, _, x, y, _ = mlp
    loss = keras.losses.MeanSquaredError(dtype=F64, reduction="sum" if reduction == "sum" else "sum_over_batch_size")
    ref = model_hessian(model, loss, x, y)  # the loss over all 19 samples
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]  # 8, 8, 3
    H = curvop.hessian(model, loss, batches, hvp="reverse", batched=False)
    close(H.to_dense(), ref)
    for _ in range(3):
        H @ np.ones(H.shape[0])
    assert H.backend.traces == 1  # the batch of 3 did not retrace
    assert H.backend._single.experimental_get_tracing_count() == 1


def test_tf_data_dataset(mlp):
    model, loss, x, y, ref = mlp
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    H = curvop.hessian(model, loss, ds, hvp="forward", batched=False)
    close(H.to_dense(), ref)
    assert H.backend.traces == 1


def test_traced_once_forward_batched(mlp):
    model, loss, x, y, _ = mlp
    H = _BUILT.get(("mlp", "forward", True))
    if H is None:
        H = curvop.hessian(model, loss, (x, y), hvp="forward", batched=True)
    for k in (2, 2, 5):
        H.matmat(np.ones((H.shape[0], k)))
    for _ in range(4):
        H.matvec(tf.ones(H.shape[0], tf.float64))
    assert H.backend._single.experimental_get_tracing_count() == 1
    assert H.backend._block.experimental_get_tracing_count() == 1


def test_params_selection(mlp):
    model, loss, x, y, ref = mlp
    H = curvop.hessian(model, loss, (x, y), params="out")  # a layer name: its kernel and bias
    n_hidden = 4 * 5 + 5
    close(H.to_dense(), ref[n_hidden:, n_hidden:])
    H2 = curvop.hessian(model, loss, (x, y), params=[model.layers[0].kernel])
    close(H2.to_dense(), ref[:20, :20])
    H3 = curvop.hessian(model, loss, (x, y), params=lambda name: name.endswith("bias"))
    idx = np.r_[20:25, 40:43]
    close(H3.to_dense(), ref[np.ix_(idx, idx)])
    with pytest.raises(KeyError, match="no variable named 'nope'"):
        curvop.hessian(model, loss, (x, y), params="nope")


def test_tf_module():
    class Net(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(4)
            self.w = tf.Variable(rng.standard_normal((3, 4)), name="w")
            self.b = tf.Variable(np.zeros(4), name="b")
            self.v = tf.Variable(rng.standard_normal((4, 1)), name="v")

        def __call__(self, x):
            return tf.tanh(x @ self.w + self.b) @ self.v

    net = Net()
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 1))
    mse = lambda t, p: tf.reduce_mean((t - p) ** 2)  # noqa: E731
    ref = dense_hessian(lambda: mse(tf.constant(y), net(tf.constant(x))), list(net.trainable_variables))
    H = curvop.hessian(net, mse, (x, y))
    assert H.backend.name == "tensorflow"
    close(H.to_dense(), ref)


def test_hessian_of_variables():
    w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    H = curvop.hessian_of(lambda w: tf.reduce_sum(w ** 3), w)
    np.testing.assert_allclose(H.to_dense(), np.diag([6.0, 12.0]), rtol=1e-14)
    a, b = tf.Variable([[1.0, -1.0]], dtype=tf.float64), tf.Variable(3.0, dtype=tf.float64)
    H = curvop.hessian_of(lambda p: tf.reduce_sum(p["a"] ** 2) * p["b"] ** 2, {"a": a, "b": b}, hvp="forward")
    want = np.array([[18.0, 0, 12], [0, 18, -12], [12, -12, 4]])
    np.testing.assert_allclose(H.to_dense(), want, rtol=1e-14)
    # with data: f(params, batch), batches weighted by size
    xs = np.arange(5.0)
    batches = [(xs[:3], xs[:3]), (xs[3:], xs[3:])]
    H = curvop.hessian_of(lambda p, batch: tf.reduce_mean(p[0] ** 2 * batch[0] ** 2), [b], batches)
    np.testing.assert_allclose(H.to_dense(), [[2 * np.mean(xs ** 2)]], rtol=1e-14)


# --- errors -----------------------------------------------------------------------------------------
def test_unbuilt_keras_model():
    model = keras.Sequential([keras.layers.Dense(2, dtype=F64)])
    with pytest.raises(ValueError, match=r"model.build\(input_shape\) or call it on a batch first"):
        curvop.hessian(model, keras.losses.MeanSquaredError(dtype=F64), mlp_data())


def test_non_scalar_loss(mlp):
    model, _, x, y, _ = mlp
    with pytest.raises(ValueError, match="must be a scalar"):
        curvop.hessian(model, keras.losses.MeanSquaredError(dtype=F64, reduction=None), (x, y))


def test_integer_variable():
    v = tf.Variable([1, 2])
    with pytest.raises(TypeError, match="int32.*floating-point"):
        curvop.hessian_of(lambda v: tf.reduce_sum(v), v)


def test_wrong_vectors(mlp):
    model, loss, x, y, _ = mlp
    H = curvop.hessian(model, loss, (x, y), check_deterministic=False)
    n = H.shape[0]
    with pytest.raises(TypeError, match=r"dtype float32.*tf.cast"):
        H @ tf.ones(n, tf.float32)
    class ForeignArray:  # another framework's array (torch/JAX imports are slow; the path is the same)
        shape, dtype = (n,), "float64"

    with pytest.raises(TypeError, match="tensorflow backend"):
        H @ ForeignArray()
    with pytest.raises(ValueError, match="length"):
        H @ tf.ones(n + 1, tf.float64)

    class FakeGpuTensor:
        dtype = tf.float64
        device = "/job:localhost/replica:0/task:0/device:GPU:0"

    with pytest.raises(ValueError, match="GPU:0.*tf.device"):
        H.backend.check(FakeGpuTensor())


def test_keras_loss_dtype_trap(mlp):
    model, _, x, y, _ = mlp
    with pytest.raises(tfb.LossPrecisionError, match=r'computes in float32.*dtype="float64"'):
        curvop.hessian(model, keras.losses.MeanSquaredError(dtype="float32"), (x, y))
    # a plain function computing in float32 is caught from the loss value
    f32 = lambda t, p: tf.reduce_mean((tf.cast(t, tf.float32) - tf.cast(p, tf.float32)) ** 2)  # noqa: E731
    with pytest.raises(tfb.LossPrecisionError, match="loss value is float32.*set_floatx"):
        curvop.hessian(model, f32, (x, y))
    H = curvop.hessian(model, f32, (x, y), check_loss_dtype=False)  # accepted when asked for
    assert H.shape[0] == 43


def test_nondeterministic_products():
    w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    noisy = lambda w: tf.reduce_sum(w ** 2 * tf.random.uniform([2], 1.0, 2.0, dtype=tf.float64))  # noqa: E731
    with pytest.raises(NondeterministicProductError, match="differ"):
        curvop.hessian_of(noisy, w)
    curvop.hessian_of(noisy, w, check_deterministic=False)


def test_bad_options_and_inputs(mlp):
    model, loss, x, y, _ = mlp
    with pytest.raises(ValueError, match="hvp must be"):
        curvop.hessian(model, loss, (x, y), hvp="sideways")
    with pytest.raises(TypeError, match="tf.Variable"):
        curvop.hessian_of(lambda t: tf.reduce_sum(t), tf.constant([1.0]), backend="tensorflow")
    with pytest.raises(TypeError, match="Keras model or a tf.Module"):
        tfb.hessian(object(), loss, (x, y))


# --- issue 27: the default mode and the product path -------------------------------------------------
def test_issue27_auto_is_reverse_over_reverse_and_describe_says_so(mlp):
    model, loss, x, y, ref = mlp
    H = curvop.hessian(model, loss, (x, y))
    assert H.backend.mode == "reverse" and "reverse mode (auto" in H.backend.describe()
    close(H @ np.ones(ref.shape[0]), ref @ np.ones(ref.shape[0]))
    asked = _BUILT.get(("mlp", "forward", False)) or curvop.hessian(model, loss, (x, y), hvp="forward", batched=False)
    assert "forward mode," in asked.backend.describe() and "auto" not in asked.backend.describe()


def test_issue27_single_batch_is_converted_once(mlp, monkeypatch):
    # the batch is prepared (converted, checked against the traced signature) at the build and
    # reused: a product calls the traced function with its tensors and nothing else
    from curvop.backends.tensorflow import backend as tf_backend

    model, loss, x, y, ref = mlp
    calls = []
    real = tf_backend.to_tensors
    monkeypatch.setattr(tf_backend, "to_tensors", lambda b: calls.append(1) or real(b))
    H = curvop.hessian(model, loss, (x, y), hvp="reverse", batched=False)
    built = len(calls)
    v = np.random.default_rng(3).standard_normal(ref.shape[0])
    for _ in range(3):
        close(H @ v, ref @ v)
    assert len(calls) == built


def test_issue27_batch_unlike_the_first_is_refused_by_name(mlp):
    model, loss, x, y, _ = mlp
    with pytest.raises(ValueError, match=r"tensor 0 is float64 of shape \(11, 3\).*first batch's dtypes and shapes"):
        curvop.hessian(model, loss, [(x[:8], y[:8]), (x[8:, :3], y[8:])], hvp="reverse", batched=False)
    with pytest.raises(ValueError, match="another structure than the first batch"):
        curvop.hessian(model, loss, [(x[:8], y[:8]), (x[8:], (y[8:], y[8:]))], hvp="reverse", batched=False)
    w = tf.Variable(np.ones(x.shape[1]))  # as many tensors, other keys: the first batch's keys must not be used silently
    with pytest.raises(ValueError, match="another structure than the first batch"):
        curvop.hessian_of(lambda p, b: tf.reduce_sum(tf.tanh(next(iter(b.values())) @ p[:, None]) ** 2), w,
                          [{"a": x[:8]}, {"b": x[8:]}], hvp="reverse", batched=False)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_issue27_nan_product_names_its_batch(mlp, mode):
    model, loss, x, y, _ = mlp
    bad = np.array(x)
    bad[10, 2] = np.nan  # sample 2 of batch 1
    H = curvop.hessian(model, loss, [(x[:8], y[:8]), (bad[8:16], y[8:16]), (x[16:], y[16:])], hvp=mode,
                       batched=False, check_deterministic=False)
    with pytest.raises(curvop.backends.faults.NonFiniteProductError, match="batch 1") as err:
        H @ np.ones(H.shape[0])
    assert err.value.batch == 1


def test_issue27_finite_product_whose_sum_overflows_is_returned(monkeypatch):
    # H = 3e38 I in float32: every entry of H @ ones is finite, their sum overflows; the entries settle it
    from curvop.backends import faults

    seen = []
    finite = faults.SumNote.finite
    monkeypatch.setattr(faults.SumNote, "finite", lambda s, y: seen.append(finite(s, y)) or seen[-1])
    w = tf.Variable(tf.zeros(4, tf.float32))
    H = curvop.hessian_of(lambda w: 1.5e38 * tf.reduce_sum(w ** 2), w, hvp="reverse", check_deterministic=False)
    out = H @ tf.ones(4, tf.float32)
    np.testing.assert_allclose(out.numpy(), np.full(4, 3e38, np.float32), rtol=1e-6)
    assert seen == [False]  # the sum overflowed; the product was still returned


def test_issue27_single_batch_is_traced_with_its_exact_shapes_a_loader_with_a_free_batch_dim(mlp):
    # a single batch: exact shapes (grappler specialises; an LSTM's product was 1.59x slower with a
    # free batch dimension); on(another single batch) traces for its shapes and is exact there; a
    # loader keeps one trace for an unequal last batch
    model, loss, x, y, ref = mlp
    H = curvop.hessian(model, loss, (x, y), hvp="reverse", batched=False)
    shapes = [list(s.shape) for s in H.backend._single.input_signature[1]]
    assert shapes == [list(x.shape), list(y.shape)]
    v = np.random.default_rng(5).standard_normal(ref.shape[0])
    close(H @ v, ref @ v)
    moved = H.on((x[:7], y[:7]))
    close(moved @ v, model_hessian(model, loss, x[:7], y[:7]) @ v)
    L = curvop.hessian(model, loss, [(x[:8], y[:8]), (x[8:], y[8:])], hvp="reverse", batched=False)
    assert [s.shape.as_list() for s in L.backend._single.input_signature[1]] == [[None, 4], [None, 3]]
    close(L @ v, ref @ v)
    assert L.backend.traces == 1


# --- issue 26: the products check themselves ---------------------------------------------------------
@tf.custom_gradient
def _product_with_wrong_gradient(x, y):
    def grad(up):  # d(xy) = y dx + x dy; here 1.5 x: the cross derivatives disagree
        return up * y, 1.5 * up * x

    return x * y, grad


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
def test_issue26_asymmetric_custom_gradient_is_refused_naming_the_variables(hvp):
    a = tf.Variable([0.5, -1.0, 2.0], dtype=tf.float64, name="a")
    b = tf.Variable([1.0, 0.3, -0.7], dtype=tf.float64, name="b")

    def f(ps):
        return tf.reduce_sum(tf.tanh(_product_with_wrong_gradient(ps[0], ps[1]))) + tf.reduce_sum(ps[0] ** 2)

    with pytest.raises(curvop.AsymmetricHessianError, match=r"not symmetric.*'0' with '1'") as info:
        curvop.hessian_of(f, [a, b], hvp=hvp)
    assert info.value.asymmetry > 0.01
    curvop.hessian_of(f, [a, b], hvp=hvp, check_symmetric=False)


def test_issue26_tensorflow_verify_restores_the_variables(mlp):
    model, loss, x, y, _ = mlp
    before = [v.numpy().copy() for v in model.trainable_variables]
    H = curvop.hessian(model, loss, (x, y), verify=True)
    res = H.verify()
    assert res.ok and len(res.blocks) == len(model.trainable_variables)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(model.trainable_variables, before))
