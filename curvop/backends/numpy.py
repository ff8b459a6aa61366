"""Backends for arrays without autodiff: a dense matrix, or a user-supplied product function.

Generic over the framework of the arrays involved: numpy here, and any framework the array layer
knows (a dense ``torch.Tensor`` or ``jax.Array`` works too). CuPy builds on this in ``cupy.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from curvop import arrays
from curvop.backends.base import Backend

Array = Any


def numpy_dtype(dt: Any) -> np.dtype:
    """The numpy dtype matching a framework dtype (``torch.float32``, ``tf.float64``, ...)."""
    if hasattr(dt, "as_numpy_dtype"):  # tensorflow
        return np.dtype(dt.as_numpy_dtype)
    return np.dtype(str(dt).replace("torch.", ""))


class ArrayBackend(Backend):
    """Products from a function ``matvec(v)`` on arrays of one framework (the framework of ``like``).

    Parameters
    ----------
    matvec : callable
        ``matvec(v)`` for a native ``(n,)`` vector.
    size : int
    like : array
        Any array of the framework, dtype and device the products use.
    matmat : callable, optional
        ``matmat(V)`` for a native ``(n, k)`` matrix; default is a loop over columns.
    """

    def __init__(
        self,
        matvec: Callable[[Array], Array],
        size: int,
        like: Array,
        matmat: Callable[[Array], Array] | None = None,
        name: str | None = None,
    ):
        self._matvec = matvec
        self._matmat = matmat
        self.size = int(size)
        self._xp = arrays.namespace(like)
        self._like = like
        self.dtype = numpy_dtype(like.dtype)
        self._native_dtype = like.dtype
        self.name = name or type(like).__module__.split(".")[0]

    def hvp(self, v: Array) -> Array:
        return self._matvec(v)

    def hvp_batch(self, v: Array) -> Array:
        if self._matmat is not None:
            return self._matmat(v)
        return super().hvp_batch(v)

    def is_native(self, x: Any) -> bool:
        if isinstance(x, np.ndarray):
            return self.name == "numpy"
        try:
            return arrays.namespace(x) is self._xp
        except TypeError:
            return False

    def check(self, x: Array) -> None:
        if x.dtype != self._native_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype}, but the operator works in {self._native_dtype}; convert it first"
            )
        dev, want = arrays._device(x), arrays._device(self._like)
        if dev != want:
            raise ValueError(f"vector is on device {dev}, but the operator computes on {want}; move it there first")

    def from_numpy(self, a: np.ndarray) -> Array:
        return arrays.asarray_like(a, self._like)


def dense(matrix: Array) -> ArrayBackend:
    """A backend multiplying by an explicit square matrix of any supported framework."""
    shape = tuple(matrix.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"a Hessian operator must be square; got a matrix of shape {shape}")
    xp = arrays.namespace(matrix)
    return ArrayBackend(lambda v: xp.matmul(matrix, v), shape[0], matrix, matmat=lambda V: xp.matmul(matrix, V))


def hessian(model: Any = None, loss_fn: Any = None, data: Any = None, **kwargs: Any):
    """Registry entry for ``backend="numpy"``: numpy has no automatic differentiation."""
    raise TypeError(
        "numpy has no automatic differentiation, so curvop.hessian(model, loss_fn, data) cannot build "
        "its products; use curvop.aslinearoperator(matrix_or_callable) or "
        "HessianOperator.from_hvp(hvp_fn, x0) / HessianOperator.from_grad(grad_fn, x0)"
    )
