"""The TensorFlow array adapter (curvop._tf_array) through curvop.arrays, against numpy."""

import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from curvop import _tf_array, arrays  # noqa: E402


def test_import_curvop_does_not_import_tensorflow():
    code = "import sys, curvop; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((7, 3)), rng.standard_normal((7, 2)), rng.standard_normal(7), rng.standard_normal(7)


def test_namespace_and_conversions(data):
    a, _, x, _ = data
    t = tf.constant(a)
    assert arrays.namespace(t) is _tf_array
    assert arrays.namespace(tf.Variable(a)) is _tf_array
    np.testing.assert_array_equal(arrays.to_numpy(t), a)
    back = arrays.asarray_like(x, t)
    assert isinstance(back, tf.Tensor) and back.dtype == tf.float64 and back.device == t.device
    np.testing.assert_array_equal(back.numpy(), x)
    t32 = tf.constant(a, dtype=tf.float32)
    assert arrays.asarray_like(x, t32).dtype == tf.float32
    assert arrays.asarray_like(t, t) is t
    assert arrays._device(t) == t.device


def test_arrays_functions_match_numpy(data):
    a, b, x, y = data
    ta, tb, tx, ty = map(tf.constant, (a, b, x, y))
    assert arrays.dot(tx, ty) == pytest.approx(x @ y, rel=1e-14)
    assert arrays.norm(tx) == pytest.approx(np.linalg.norm(x), rel=1e-14)
    np.testing.assert_allclose(arrays.gram(ta, tb), a.T @ b, rtol=1e-13)
    np.testing.assert_allclose(arrays.column_dots(ta, ta), (a * a).sum(0), rtol=1e-13)
    c = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    out = arrays.matmul(ta, c)
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), a @ c, rtol=1e-13)
    np.testing.assert_allclose(arrays.matmul(ta, np.array([1.0, -2.0, 0.5])).numpy(), a @ [1, -2, 0.5], rtol=1e-13)
    np.testing.assert_array_equal(arrays.stack([tx, ty], axis=1).numpy(), np.stack([x, y], 1))
    np.testing.assert_array_equal(arrays.concat([ta, tb], axis=1).numpy(), np.concatenate([a, b], 1))
    np.testing.assert_allclose(arrays.namespace(ta).sum(ta, axis=0).numpy(), a.sum(0), rtol=1e-14)
    assert float(arrays.namespace(ta).sum(ta)) == pytest.approx(a.sum(), rel=1e-14)


def test_orthonormalize_and_project_out(data):
    a, b, _, _ = data
    q = arrays.orthonormalize(tf.constant(a))
    assert isinstance(q, tf.Tensor) and q.shape == (7, 3)
    qn = q.numpy()
    np.testing.assert_allclose(qn.T @ qn, np.eye(3), atol=1e-13)
    # same column space as a
    np.testing.assert_allclose(qn @ (qn.T @ a), a, atol=1e-12)
    w = arrays.orthonormalize(tf.constant(b), basis=q).numpy()
    np.testing.assert_allclose(qn.T @ w, 0, atol=1e-13)
    p = arrays.project_out(tf.constant(b), q).numpy()
    np.testing.assert_allclose(p, b - qn @ (qn.T @ b), atol=1e-13)


def test_extra_namespace_functions():
    xp = _tf_array
    dev = tf.constant(0.0).device
    assert xp.zeros((2, 3), dtype=tf.float64, device=dev).shape == (2, 3)
    np.testing.assert_array_equal(xp.eye(3, dtype=np.float64).numpy(), np.eye(3))
    np.testing.assert_array_equal(xp.eye(2, 3, k=1, dtype=tf.float64).numpy(), np.eye(2, 3, 1))
    t = tf.constant([[-1.0, 2.0], [3.0, -4.0]], dtype=tf.float64)
    np.testing.assert_array_equal(xp.abs(t).numpy(), np.abs(t.numpy()))
    np.testing.assert_array_equal(xp.multiply(t, t).numpy(), t.numpy() ** 2)
    assert xp.reshape(t, (4,)).shape == (4,)
    np.testing.assert_allclose(xp.matmul(t, tf.constant([1.0, 1.0], tf.float64)).numpy(), [1.0, -1.0])
    r_q, r_r = xp.linalg.qr(t)
    np.testing.assert_allclose((r_q @ r_r).numpy(), t.numpy(), atol=1e-14)
    assert xp.asarray([1, 2], dtype=np.float32).dtype == tf.float32
