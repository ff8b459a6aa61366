"""The array layer: a handful of framework-free helpers the algorithms are written against.

Every function here takes arrays of any supported framework (numpy, torch, CuPy, JAX, and
TensorFlow through a small adapter) and returns arrays of the same framework, on the same device.
Functions that return host scalars (:func:`dot`, :func:`norm`, :func:`gram`, :func:`column_dots`)
synchronise once, which is what an algorithm that needs a scalar has to do anyway.

Write your own algorithm with these and it runs on every backend:

>>> import numpy as np
>>> from curvop import arrays
>>> x = np.array([3.0, 4.0])
>>> arrays.norm(x)
5.0
>>> q = arrays.orthonormalize(np.array([[1.0, 1.0], [0.0, 1.0]]))
>>> np.allclose(q.T @ q, np.eye(2))
True
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

__all__ = [
    "namespace",
    "is_numpy",
    "to_numpy",
    "asarray_like",
    "dot",
    "norm",
    "gram",
    "column_dots",
    "matmul",
    "lincomb",
    "stack",
    "concat",
    "sum",
    "orthonormalize",
    "project_out",
    "project_out_each",
    "stack_blocks",
    "sqrt",
    "random_probes",
]

Array = Any


def _is_tensorflow(x: Array) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))


def namespace(x: Array):
    """Return the array namespace of ``x`` (array-API style: ``xp.matmul``, ``xp.linalg.qr``...).

    numpy, torch, CuPy and JAX use `array_api_compat`; TensorFlow tensors get curvop's adapter.
    """
    if isinstance(x, np.ndarray) or np.isscalar(x):
        import array_api_compat.numpy as xp

        return xp
    if _is_tensorflow(x):
        from curvop import _tf_array

        return _tf_array
    import array_api_compat

    try:
        return array_api_compat.array_namespace(x)
    except TypeError as err:
        raise TypeError(
            f"curvop does not know how to compute with arrays of type {type(x).__name__}; "
            "supported are numpy, torch, CuPy, JAX and TensorFlow arrays."
        ) from err


def is_numpy(x: Array) -> bool:
    """True for numpy arrays (and numpy scalars)."""
    return isinstance(x, (np.ndarray, np.generic))


def to_numpy(x: Array) -> np.ndarray:
    """Copy (or share, on CPU) ``x`` into a numpy array on the host.

    CPU torch tensors and CPU JAX arrays share memory with the result where the framework allows
    (DLPack / ``__array__``); device arrays are copied once.
    """
    if isinstance(x, np.ndarray):
        return x
    if _is_tensorflow(x):
        return x.numpy()
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return x.detach().cpu().numpy()
    if mod == "cupy":
        return x.get()
    # Any other array-API array: DLPack, the standard's interchange protocol. It also reads arrays
    # that refuse implicit conversion (array-api-strict off its CPU device has no __array__ path).
    # numpy reads host memory only, so a device array (a JAX GPU array) fails here: np.asarray.
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass
    return np.asarray(x)


def asarray_like(a: Array, like: Array) -> Array:
    """Return ``a`` (numpy or native) as an array of ``like``'s framework, dtype and device."""
    if is_numpy(like):
        return np.asarray(to_numpy(a) if not is_numpy(a) else a, dtype=like.dtype)
    xp = namespace(like)
    if not is_numpy(a) and namespace(a) is xp:
        return a
    a = np.ascontiguousarray(to_numpy(a) if not is_numpy(a) else a)
    return xp.asarray(a, dtype=like.dtype, device=_device(like))


def _device(x: Array):
    import array_api_compat

    if _is_tensorflow(x):
        return x.device
    return array_api_compat.device(x)


def dot(x: Array, y: Array) -> float:
    """Inner product of two vectors of the same framework, as a Python float (one sync)."""
    xp = namespace(x)
    return float(xp.sum(x * y))


def norm(x: Array) -> float:
    """Euclidean norm of a vector (or Frobenius norm of a matrix), as a Python float."""
    xp = namespace(x)
    return float(xp.sqrt(xp.sum(x * x)))


def gram(x: Array, y: Array) -> np.ndarray:
    """``x.T @ y`` for ``(n, k)`` and ``(n, m)`` arrays, returned as a float64 numpy ``(k, m)``."""
    xp = namespace(x)
    return np.asarray(to_numpy(xp.matmul(_t(xp, x), y)), dtype=np.float64)


def column_dots(x: Array, y: Array) -> np.ndarray:
    """Per-column inner products ``sum(x * y, axis=0)`` of two ``(n, k)`` arrays, as numpy."""
    xp = namespace(x)
    return np.asarray(to_numpy(xp.sum(x * y, axis=0)), dtype=np.float64)


def matmul(a: Array, b: Array) -> Array:
    """Matrix product in ``a``'s framework; ``b`` may be a small numpy array (it is moved over)."""
    xp = namespace(a)
    return xp.matmul(a, asarray_like(b, a))


def lincomb(basis: Array, coeffs: np.ndarray) -> Array:
    """``basis @ coeffs`` for a native ``(n, k)`` basis and host coefficients ``(k,)`` or ``(k, m)``."""
    return matmul(basis, np.asarray(coeffs))


def stack(vectors: Sequence[Array], axis: int = 1) -> Array:
    """Stack 1-D vectors into the columns (``axis=1``) or rows of a matrix."""
    xp = namespace(vectors[0])
    return xp.stack(list(vectors), axis=axis)


def concat(arrays: Sequence[Array], axis: int = 1) -> Array:
    """Concatenate arrays along ``axis`` (columns by default)."""
    xp = namespace(arrays[0])
    return xp.concat(list(arrays), axis=axis)


def sum(x: Array, axis: int | None = None) -> Array:  # noqa: A001 - mirrors the array API
    """Sum along an axis, staying native."""
    xp = namespace(x)
    return xp.sum(x, axis=axis)


def orthonormalize(v: Array, basis: Array | None = None) -> Array:
    """Orthonormal basis of the columns of ``v`` (thin QR), optionally made orthogonal to ``basis``.

    With ``basis`` (an ``(n, m)`` array with orthonormal columns), the projection is applied twice
    ("twice is enough") before the QR, so the result is orthogonal to ``basis`` to working precision.
    """
    xp = namespace(v)
    if basis is not None:
        v = project_out(project_out(v, basis), basis)
    q, _ = xp.linalg.qr(v)
    return q


def project_out(v: Array, basis: Array) -> Array:
    """``v - basis @ (basis.T @ v)``: remove the components of ``v`` along orthonormal ``basis``."""
    xp = namespace(v)
    return v - xp.matmul(basis, xp.matmul(_t(xp, basis), v))


def project_out_each(w: Array, blocks: Sequence[Array] | Array) -> Array:
    """Column-wise :func:`project_out` for ``p`` independent runs sharing one ``(n, p)`` array.

    Column ``i`` of ``w`` loses its components along column ``i`` of every block in ``blocks``
    (for each ``i`` those columns must be orthonormal). Two batched matrix products, whatever ``p``:
    this is the reorthogonalisation of ``p`` Lanczos runs advanced in lockstep. ``blocks`` may also
    be the stacked ``(p, n, j)`` array :func:`stack_blocks` returns (build it once, use it twice).

    >>> import numpy as np
    >>> from curvop import arrays
    >>> e = np.eye(3)[:, :2]                     # run 0 has basis e0, run 1 has basis e1
    >>> arrays.project_out_each(np.ones((3, 2)), [e])
    array([[0., 1.],
           [1., 0.],
           [1., 1.]])
    """
    xp = namespace(w)
    B = stack_blocks(blocks) if isinstance(blocks, (list, tuple)) else blocks  # (p, n, j)
    wt = _t(xp, w)[:, :, None]  # (p, n, 1)
    return _t(xp, (wt - xp.matmul(B, xp.matmul(_t(xp, B), wt)))[:, :, 0])


def stack_blocks(blocks: Sequence[Array], onto: Array | None = None) -> Array:
    """The ``(n, p)`` blocks as one ``(p, n, j)`` array (run ``i``'s basis is ``[i]``), optionally
    appended to an earlier result ``onto``: one copy per Lanczos step instead of a restack."""
    xp = namespace(blocks[0])
    new = xp.stack([_t(xp, b) for b in blocks], axis=2)
    return new if onto is None else xp.concat([onto, new], axis=2)


def sqrt(x: Array) -> Array:
    """Element-wise square root, staying native.

    >>> import numpy as np
    >>> from curvop import arrays
    >>> arrays.sqrt(np.array([4.0, 9.0]))
    array([2., 3.])
    """
    return namespace(x).sqrt(x)


def random_probes(
    rng: np.random.Generator | int | None,
    shape: int | tuple[int, ...],
    kind: str = "rademacher",
    dtype: Any = np.float64,
) -> np.ndarray:
    """Random probe vectors on the host, for :func:`asarray_like` to move to a device.

    Generating probes with numpy from one seed makes every backend see the same probes, so the
    same seed gives the same estimate on numpy, torch, TensorFlow, JAX and CuPy.

    Parameters
    ----------
    rng : numpy Generator, int seed or None
    shape : int or tuple
    kind : {"rademacher", "gaussian", "sphere"}
        Rademacher (±1), standard normal, or normal columns rescaled to norm ``sqrt(n)``.
    """
    rng = np.random.default_rng(rng)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if kind == "rademacher":
        out = rng.integers(0, 2, size=shape, dtype=np.int8).astype(dtype) * 2 - 1
    elif kind == "gaussian":
        out = rng.standard_normal(shape)
    elif kind == "sphere":
        out = rng.standard_normal(shape)
        out *= np.sqrt(shape[0]) / np.linalg.norm(out, axis=0)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; use 'rademacher', 'gaussian' or 'sphere'")
    return np.asarray(out, dtype=dtype)


def _t(xp, x: Array) -> Array:
    return xp.matrix_transpose(x) if hasattr(xp, "matrix_transpose") else x.T
