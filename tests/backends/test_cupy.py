"""CuPy: from_hvp / from_grad with CuPy arrays on the GPU, and cupyx's eigsh on the operator."""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")


def _has_cuda() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_cuda(), reason="CuPy is installed but no CUDA device is visible"),
]

import curvop  # noqa: E402
from curvop import HessianOperator  # noqa: E402


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    n = 60
    G = rng.standard_normal((n, n))
    A = G @ G.T / n + np.eye(n)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n)
    return A, b, x0


def test_from_hvp_native_cupy(problem):
    A, _, x0 = problem
    Ad = cupy.asarray(A)
    H = HessianOperator.from_hvp(lambda v: Ad @ v, cupy.asarray(x0))
    v = cupy.asarray(np.random.default_rng(1).standard_normal(60))
    out = H @ v
    assert isinstance(out, cupy.ndarray) and out.device.id == v.device.id and out.dtype == cupy.float64
    np.testing.assert_allclose(cupy.asnumpy(out), A @ cupy.asnumpy(v), rtol=1e-12)
    out = H @ cupy.asnumpy(v)  # numpy in, numpy out
    assert isinstance(out, np.ndarray)
    V = cupy.asarray(np.random.default_rng(2).standard_normal((60, 3)))
    np.testing.assert_allclose(cupy.asnumpy(H.matmat(V)), A @ cupy.asnumpy(V), rtol=1e-12)


def test_from_grad_native_cupy(problem):
    A, b, x0 = problem
    Ad, bd = cupy.asarray(A), cupy.asarray(b)
    H = HessianOperator.from_grad(lambda x: Ad @ x - bd, cupy.asarray(x0))
    v = cupy.asarray(np.random.default_rng(1).standard_normal(60))
    out = H @ v
    assert isinstance(out, cupy.ndarray)
    assert np.linalg.norm(cupy.asnumpy(out) - A @ cupy.asnumpy(v)) / np.linalg.norm(A @ cupy.asnumpy(v)) < 1e-9


def test_cupyx_eigsh(problem):
    import cupyx.scipy.sparse.linalg as csla

    A, _, x0 = problem
    Ad = cupy.asarray(A)
    H = HessianOperator.from_hvp(lambda v: Ad @ v, cupy.asarray(x0))
    ref = np.linalg.eigvalsh(A)[-3:]
    for op in (H.to_cupy_linear_operator(), csla.LinearOperator(H.shape, matvec=H.matvec, dtype=H.dtype)):
        w = csla.eigsh(op, k=3, which="LA", return_eigenvectors=False)
        np.testing.assert_allclose(np.sort(cupy.asnumpy(w)), ref, rtol=1e-8)


def test_errors(problem):
    A, _, x0 = problem
    H = HessianOperator.from_hvp(lambda v: cupy.asarray(A) @ v, cupy.asarray(x0))
    with pytest.raises(TypeError, match="float32"):
        H @ cupy.ones(60, dtype=cupy.float32)
    Hbad = HessianOperator.from_hvp(lambda v: cupy.asnumpy(v), cupy.asarray(x0))
    with pytest.raises(TypeError, match="same array type"):
        Hbad @ cupy.ones(60)
    with pytest.raises(TypeError, match="from_hvp"):
        curvop.backends.get("cupy")(None, None, None)
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            v1 = cupy.ones(60)
        with pytest.raises(ValueError, match="CUDA device 1"):
            H @ v1
