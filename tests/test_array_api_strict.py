"""The generic array-API path on CPU, with array-api-strict standing in for CuPy.

CuPy (and any array library that is not numpy, torch or TensorFlow) reaches curvop through
``array_api_compat.array_namespace`` and the generic :class:`curvop.backends.array.ArrayBackend`.
No GPU here, so these tests run that path with ``array_api_strict``, the reference implementation
of the Array API standard: no methods beyond the standard, no implicit mixing of devices, and on
its non-default devices (``Device("device1")``) numpy cannot read an array implicitly -- like an
array in GPU memory. Every test runs on the default CPU device and on ``device1``.

Each result is checked against an independent number: numpy's ``eigh`` / ``trace`` / ``diag``, or
the same algorithm run on plain numpy arrays with the same seed (curvop draws probes on the host
from the seed, so every framework sees the same probes).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

xs = pytest.importorskip(
    "array_api_strict", reason="array-api-strict is not installed (pip install array-api-strict)"
)

import curvop  # noqa: E402
from curvop import HessianOperator, arrays  # noqa: E402

from _matrices import with_spectrum  # noqa: E402

N = 60
# four separated dominant eigenvalues (power iteration converges fast), then a decaying PSD tail
LAM = tuple([100.0, 50.0, 25.0, 12.0] + [0.8**i for i in range(N - 4)])
DEVICES = ["CPU_DEVICE", "device1"]
ArrayType = type(xs.asarray(0.0))  # array_api_strict's Array class (not exported by name)


@pytest.fixture(params=DEVICES)
def dev(request):
    return xs.Device(request.param)


@pytest.fixture(scope="module")
def A() -> np.ndarray:
    return with_spectrum(LAM, seed=3)


def native(a, dev, dtype=None):
    return xs.asarray(np.asarray(a), dtype=dtype or xs.float64, device=dev)


def host(x) -> np.ndarray:
    """An independent way back to numpy (not curvop's to_numpy): DLPack."""
    return np.from_dlpack(x)


def is_native(x, dev) -> bool:
    return isinstance(x, ArrayType) and x.device == dev


def operator(A, dev):
    Ad = native(A, dev)
    return HessianOperator.from_hvp(lambda v: Ad @ v, xs.zeros(A.shape[0], dtype=xs.float64, device=dev))


# --- the array layer -------------------------------------------------------------------------
def test_arrays_helpers(dev):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(N), rng.standard_normal(N)
    X, Y = rng.standard_normal((N, 3)), rng.standard_normal((N, 2))
    xd, yd, Xd, Yd = (native(a, dev) for a in (x, y, X, Y))

    assert arrays.namespace(xd) is xs
    assert not arrays.is_numpy(xd)
    np.testing.assert_array_equal(arrays.to_numpy(xd), x)
    assert isinstance(arrays.to_numpy(xd), np.ndarray)
    moved = arrays.asarray_like(x, xd)
    assert is_native(moved, dev) and moved.dtype == xs.float64
    np.testing.assert_array_equal(host(moved), x)
    assert is_native(arrays.asarray_like(np.ones(3, dtype=np.float32), xd), dev)

    assert arrays.dot(xd, yd) == pytest.approx(x @ y, rel=1e-14)
    assert arrays.norm(xd) == pytest.approx(np.linalg.norm(x), rel=1e-14)
    np.testing.assert_allclose(arrays.gram(Xd, Yd), X.T @ Y, rtol=1e-13)
    np.testing.assert_allclose(arrays.column_dots(Xd, Xd), (X * X).sum(0), rtol=1e-13)

    c = rng.standard_normal((3, 2))
    for out, ref in [
        (arrays.matmul(Xd, c), X @ c),
        (arrays.matmul(Xd, c[:, 0]), X @ c[:, 0]),
        (arrays.stack([xd, yd]), np.stack([x, y], axis=1)),
        (arrays.concat([Xd, Yd]), np.concatenate([X, Y], axis=1)),
        (arrays.namespace(Xd).sum(Xd, axis=0), X.sum(0)),
        (arrays.namespace(xd).sqrt(xd * xd), np.abs(x)),
    ]:
        assert is_native(out, dev)
        np.testing.assert_allclose(host(out), ref, rtol=1e-13, atol=1e-13)

    Q = arrays.orthonormalize(Xd)
    assert is_native(Q, dev)
    Qh = host(Q)
    np.testing.assert_allclose(Qh.T @ Qh, np.eye(3), atol=1e-13)
    np.testing.assert_allclose(Qh @ (Qh.T @ X), X, atol=1e-12)  # same column space as X
    Q2 = arrays.orthonormalize(Yd, basis=Q)
    assert is_native(Q2, dev)
    np.testing.assert_allclose(Qh.T @ host(Q2), np.zeros((3, 2)), atol=1e-13)
    P = arrays.project_out(Yd, Q)
    assert is_native(P, dev)
    np.testing.assert_allclose(host(P), Y - Qh @ (Qh.T @ Y), atol=1e-12)
    E = native(np.eye(N)[:, :2], dev)  # run 0 keeps its basis e0, run 1 e1
    W = arrays.project_out_each(Yd, [E])
    assert is_native(W, dev)
    ref = Y.copy()
    ref[0, 0] = ref[1, 1] = 0.0
    np.testing.assert_allclose(host(W), ref, atol=1e-14)

    # probes are host numpy by design (one seed gives the same probes on every framework)
    Z = arrays.random_probes(0, (N, 4), "rademacher")
    assert isinstance(Z, np.ndarray) and set(np.unique(Z)) == {-1.0, 1.0}


def test_import_curvop_does_not_import_array_api_strict():
    code = "import sys, curvop; print('array_api_strict' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the operator ----------------------------------------------------------------------------
def test_native_in_native_out(A, dev):
    H = operator(A, dev)
    rng = np.random.default_rng(1)
    v, V = rng.standard_normal(N), rng.standard_normal((N, 3))
    for x, ref in [(v, A @ v), (V, A @ V), (V[:, :1], A @ V[:, :1])]:
        out = H @ native(x, dev)
        assert is_native(out, dev) and out.dtype == xs.float64 and tuple(out.shape) == ref.shape
        np.testing.assert_allclose(host(out), ref, rtol=1e-12, atol=1e-12)
    out = H.matmat(native(V, dev))
    assert is_native(out, dev)
    out = H @ v  # numpy in, numpy out (what scipy passes)
    assert isinstance(out, np.ndarray) and out.flags.writeable
    np.testing.assert_allclose(out, A @ v, rtol=1e-12)
    assert H.num_matvecs == 1 + 3 + 1 + 3 + 1
    assert is_native(H.random((N, 2), "gaussian", seed=0), dev)
    np.testing.assert_allclose(H.to_dense(), A, atol=1e-13)


def test_issue13_item4_every_entry_point_keeps_native_arrays(A, dev):
    """scipy's own entry points would run np.asanyarray on the input (numpy out, or an error on
    device1, which numpy cannot read); the operator's are native in, native out, on the device."""
    H = operator(A, dev)
    rng = np.random.default_rng(2)
    v, V = rng.standard_normal(N), rng.standard_normal((N, 3))
    vd, Vd = native(v, dev), native(V, dev)
    cases = [
        (H.matvec(vd), A @ v), (H.rmatvec(vd), A @ v), (H.dot(vd), A @ v), (H @ vd, A @ v),
        (H(vd), A @ v), (H * vd, A @ v), (H.H @ vd, A @ v), (H.T.matvec(vd), A @ v),
        (H.matmat(Vd), A @ V), (H.rmatmat(Vd), A @ V), (H.dot(Vd), A @ V), (H @ Vd, A @ V),
        # x @ H: what Python calls when x's framework defers (torch does; array-api-strict raises)
        (H.__rmatmul__(vd), v @ A), (H.__rmatmul__(xs.matrix_transpose(Vd)), V.T @ A),
    ]
    for out, ref in cases:
        assert is_native(out, dev) and tuple(out.shape) == ref.shape
        np.testing.assert_allclose(host(out), ref, rtol=1e-12, atol=1e-12)
    assert H.num_matvecs == 8 + 4 * 3 + 1 + 3


def test_issue13_item4_numpy_goes_through_scipys_contract(A):
    """numpy inputs reach the operator's ``_matvec``/``_matmat``/``_rmatvec``/``_rmatmat`` through
    scipy's entry points (they used to be dead code behind 13 overrides)."""
    import scipy.sparse.linalg as sla

    H = operator(A, xs.Device("CPU_DEVICE"))
    calls = []
    for name in ("_matvec", "_matmat", "_rmatvec", "_rmatmat"):
        setattr(H, name, lambda x, f=getattr(H, name), name=name: calls.append(name) or f(x))
    v, V = np.ones(N), np.ones((N, 2))
    outs = [H @ v, H.matvec(v), H.rmatvec(v), H @ V, H.matmat(V), H.rmatmat(V), v @ H, (2.0 * H) @ v,
            (H + sla.aslinearoperator(np.eye(N))) @ v]
    assert calls == ["_matvec", "_matvec", "_rmatvec", "_matmat", "_matmat", "_rmatmat", "_matvec",
                     "_matvec", "_matvec"]
    for out, ref in zip(outs, [A @ v, A @ v, A @ v, A @ V, A @ V, A @ V, v @ A, 2 * A @ v, A @ v + v]):
        assert isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, ref, rtol=1e-12)
    # scipy's contract plus the entry points that must keep native arrays native: nothing else
    plumbing = {"__init__", "__repr__", "__doc__", "__module__", "__dict__", "__weakref__"}
    own = {k for k in vars(HessianOperator) if hasattr(sla.LinearOperator, k)} - plumbing
    # __matmul__: a native array goes straight to the product, without scipy's per-call isscalar
    # (issue 27); __reduce_ex__: pickling raises a TypeError that names the fix (issue 26)
    assert own == {"_matvec", "_matmat", "_rmatvec", "_rmatmat", "_adjoint", "_transpose",
                   "matvec", "matmat", "rmatvec", "rmatmat", "dot", "__rmatmul__", "__matmul__",
                   "__reduce_ex__"}, sorted(own)


def test_issue13_item4_the_algorithms_adapter(A, dev):
    """``H.native`` and ``H.rng``: what an algorithm needs, without reaching into ``H.backend``."""
    H = operator(A, dev)
    x = native(np.arange(N, dtype=float), dev)
    assert H.native(x) is x  # native: checked, returned as is
    for a in (np.arange(N), list(range(N))):
        out = H.native(a)
        assert is_native(out, dev) and out.dtype == xs.float64
        np.testing.assert_array_equal(host(out), np.arange(N))
    with pytest.raises(TypeError, match="float32"):
        H.native(xs.ones(N, dtype=xs.float32, device=dev))
    with pytest.raises(ValueError, match="device"):
        H.native(xs.ones(N, dtype=xs.float64, device=xs.Device("device2")))
    for bad in (np.ones(N, dtype=complex), [object()] * N):
        with pytest.raises(TypeError, match="H.native: cannot make"):
            H.native(bad)
    assert H.rng(5).standard_normal(3).tolist() == np.random.default_rng(5).standard_normal(3).tolist()


def test_operator_errors(A, dev):
    H = operator(A, dev)
    other = xs.Device("device2")
    with pytest.raises(ValueError, match="device"):
        H @ xs.ones(N, dtype=xs.float64, device=other)
    with pytest.raises(TypeError, match="float32"):
        H @ xs.ones(N, dtype=xs.float32, device=dev)
    bad = HessianOperator.from_hvp(lambda v: np.ones(N), xs.zeros(N, dtype=xs.float64, device=dev))
    with pytest.raises(TypeError, match="same array type"):
        bad @ xs.ones(N, dtype=xs.float64, device=dev)
    # a product computed in another dtype is cast back (with xp.astype: no .astype method here)
    A32 = native(A, dev, xs.float32)
    H32 = HessianOperator.from_hvp(lambda v: A32 @ xs.astype(v, xs.float32), xs.zeros(N, dtype=xs.float64, device=dev))
    out = H32 @ xs.ones(N, dtype=xs.float64, device=dev)
    assert out.dtype == xs.float64
    np.testing.assert_allclose(host(out), A.sum(1), rtol=1e-5, atol=1e-5)


def test_scipy_eigsh_on_the_operator(A, dev):
    import scipy.sparse.linalg as sla

    w = sla.eigsh(operator(A, dev), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(w)[::-1], LAM[:3], rtol=1e-10)


# --- algorithms ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,which", [("lanczos", "LA"), ("power", "LM")])
def test_eigenvalues(A, dev, method, which):
    H = operator(A, dev)
    r = curvop.eigenvalues(H, k=3, which=which, method=method, tol=1e-8, seed=0)
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigh(A)[0][::-1][:3], rtol=1e-8)
    assert is_native(r.eigenvectors, dev) and tuple(r.eigenvectors.shape) == (N, 3)
    V = host(r.eigenvectors)
    np.testing.assert_allclose(np.linalg.norm(A @ V - V * r.eigenvalues, axis=0), r.residual_norms, rtol=1e-6, atol=1e-12)
    assert np.all(r.residual_norms <= 1e-6 * r.eigenvalues)
    ref = curvop.eigenvalues(A, k=3, which=which, method=method, tol=1e-8, seed=0)  # numpy, same seed
    np.testing.assert_allclose(r.eigenvalues, ref.eigenvalues, rtol=1e-12)
    assert r.num_matvecs == ref.num_matvecs


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "xnystrace"])
def test_trace_matches_numpy(A, dev, method):
    H = operator(A, dev)
    r = curvop.trace(H, method=method, num_matvecs=30, seed=7)
    ref = curvop.trace(A, method=method, num_matvecs=30, seed=7)
    assert r.num_matvecs == ref.num_matvecs == 30
    assert r.estimate == pytest.approx(ref.estimate, rel=1e-10)
    assert r.stderr == pytest.approx(ref.stderr, rel=1e-8)
    true = float(np.sum(LAM))
    if method == "hutchinson":  # flat-spectrum estimator: within 5 of its own error bars
        assert abs(r.estimate - true) <= 5 * r.stderr
    else:  # the sketch captures the dominant eigenvalues (worst over seeds 0-199: 0.43% off)
        assert abs(r.estimate - true) <= 0.01 * true


def test_trace_exact_with_full_sketch(A, dev):
    # Hutch++ with a sketch of n columns spans the whole space: the estimate is the exact trace
    r = curvop.trace(operator(A, dev), method="hutch++", num_matvecs=3 * N, seed=0)
    assert r.estimate == pytest.approx(float(np.sum(LAM)), rel=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal(A, dev, method):
    H = operator(A, dev)
    r = curvop.diagonal(H, method=method, num_matvecs=40, seed=3)
    ref = curvop.diagonal(A, method=method, num_matvecs=40, seed=3)
    assert is_native(r.estimate, dev) and is_native(r.stderr, dev)
    np.testing.assert_allclose(host(r.estimate), ref.estimate, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(host(r.stderr), ref.stderr, rtol=1e-8, atol=1e-12)
    assert r.num_matvecs == ref.num_matvecs
    err = np.abs(host(r.estimate) - np.diag(A))
    if method == "hutchinson":  # within 6 of its own error bars (at most 3.9 over seeds 0-99)
        assert np.all(err <= 6 * host(r.stderr))
    else:  # the sketch takes the dominant part; worst entry over seeds 0-99: 0.028 (diag ~ 0.7-5.6)
        assert err.max() <= 0.05


def test_diagonal_exact_on_a_diagonal_matrix(dev):
    d = np.linspace(-2.0, 3.0, N)
    Dd = native(d, dev)
    H = HessianOperator.from_hvp(lambda v: Dd * v, xs.zeros(N, dtype=xs.float64, device=dev))
    r = curvop.diagonal(H, num_matvecs=3, seed=0)  # Rademacher z: z * (D z) = d exactly
    np.testing.assert_allclose(host(r.estimate), d, rtol=1e-15)


def test_spectral_density(A, dev):
    H = operator(A, dev)
    sd = curvop.spectral_density(H, num_steps=N, num_probes=3, seed=5)
    ref = curvop.spectral_density(A, num_steps=N, num_probes=3, seed=5)
    assert sd.num_matvecs == ref.num_matvecs == 3 * N
    # the same up to rounding (the numpy reference multiplies whole blocks, from_hvp column by column)
    for a, b in zip(sd.nodes, ref.nodes):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(sd.weights, ref.weights):  # weights sum to 1
        np.testing.assert_allclose(a, b, atol=1e-10)
    # n steps from a probe with weight on every eigenvector: the dominant Ritz values are exact,
    # and sum(weights * nodes) * n is z^T A z / |z|^2 * n = z^T A z (Rademacher |z|^2 = n)
    Z = arrays.random_probes(np.random.default_rng(5), (N, 3), "rademacher")
    for theta, w, z in zip(sd.nodes, sd.weights, Z.T):
        np.testing.assert_allclose(np.sort(theta)[::-1][:4], LAM[:4], rtol=1e-9)
        assert N * float(w @ theta) == pytest.approx(z @ A @ z, rel=1e-9)
    assert sd.trace() == pytest.approx(np.mean([z @ A @ z for z in Z.T]), rel=1e-9)


# --- from_grad -------------------------------------------------------------------------------
def test_from_grad_on_a_quadratic(A, dev):
    rng = np.random.default_rng(2)
    b, x0, v = rng.standard_normal(N), rng.standard_normal(N), rng.standard_normal(N)
    Ad, bd = native(A, dev), native(b, dev)
    H = HessianOperator.from_grad(lambda x: Ad @ x - bd, native(x0, dev))  # f = x^T A x / 2 - b^T x
    out = H @ native(v, dev)
    assert is_native(out, dev)
    assert np.linalg.norm(host(out) - A @ v) / np.linalg.norm(A @ v) < 1e-9
    out = H.matmat(native(np.stack([v, 2 * v], axis=1), dev))
    assert is_native(out, dev)
    np.testing.assert_allclose(host(out)[:, 1], 2 * (A @ v), rtol=1e-8, atol=1e-8)
    r = curvop.eigenvalues(H, k=2, seed=0)
    np.testing.assert_allclose(r.eigenvalues, LAM[:2], rtol=1e-8)
    assert is_native(r.eigenvectors, dev)
