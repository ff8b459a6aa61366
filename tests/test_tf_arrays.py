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
    # what curvop calls on the namespace beyond the arrays.* functions above (issue 13: only those
    # are kept; eye, abs, multiply, reshape, ... went with the other unused names)
    xp = _tf_array
    dev = tf.constant(0.0).device
    z = xp.zeros((2, 3), dtype=tf.float64, device=dev)
    assert z.shape == (2, 3) and z.dtype == tf.float64
    assert xp.zeros(2, dtype=xp.float32).dtype == tf.float32
    t = tf.constant([[-1.0, 2.0], [3.0, -4.0]], dtype=tf.float64)
    np.testing.assert_allclose(xp.matmul(t, tf.constant([1.0, 1.0], tf.float64)).numpy(), [1.0, -1.0])
    np.testing.assert_allclose(xp.matmul(tf.constant([1.0, 1.0], tf.float64), t).numpy(), [2.0, -2.0])
    np.testing.assert_array_equal(xp.matrix_transpose(t).numpy(), t.numpy().T)
    assert xp.astype(t, np.float32).dtype == tf.float32
    assert float(xp.sqrt(xp.sum(t * t))) == pytest.approx(np.sqrt(30.0), rel=1e-15)
    r_q, r_r = xp.linalg.qr(t)
    np.testing.assert_allclose((r_q @ r_r).numpy(), t.numpy(), atol=1e-14)
    assert xp.asarray([1, 2], dtype=np.float32).dtype == tf.float32

def _names_used_on_namespaces() -> tuple[set[str], set[str]]:
    """``xp.NAME`` and ``xp.linalg.NAME`` read anywhere in curvop/ on an array namespace.

    A namespace is ``xp`` / ``self._xp`` or the result of a ``namespace(...)`` call.
    """
    import ast
    import pathlib

    def is_ns(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in ("xp", "_xp")
        if isinstance(node, ast.Attribute):
            return node.attr == "_xp"
        if isinstance(node, ast.Call):
            f = node.func
            return (f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) == "namespace"
        return False

    top, linalg = set(), set()
    root = pathlib.Path(_tf_array.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "_tf_array.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and is_ns(node.value):
                top.add(node.attr)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "linalg" and is_ns(node.value.value):
                linalg.add(node.attr)
    return top, linalg


def test_issue13_item6_tf_array_exports_exactly_what_curvop_uses():
    top, linalg = _names_used_on_namespaces()
    assert {"matmul", "asarray", "linalg"} <= top and "qr" in linalg  # the scan sees curvop's calls
    exported = set(_tf_array.__all__)
    # arrays.Basis preallocates with xp.empty only for mutable arrays (TF tensors are not: it keeps a
    # list of rows), and reads dtypes by name: getattr(xp, "float32" / "float64")
    assert sorted(top - exported - {"empty"}) == [], "used on an array namespace but missing from _tf_array"
    assert sorted(exported - top - {"float32", "float64"}) == [], "exported by _tf_array but used nowhere"
    assert all(hasattr(_tf_array, name) for name in exported)
    assert set(vars(_tf_array.linalg)) == linalg
