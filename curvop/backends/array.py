"""The generic array backend: products from a function on arrays of one framework (no autodiff).

Generic over the framework of the arrays involved: numpy, and any framework the array layer knows
(a dense ``torch.Tensor`` or ``jax.Array`` works too, and any Array API array that
``array_api_compat`` recognises: the tests run this path with array-api-strict). CuPy builds on
this in ``cupy.py``; the operators from user callables (``from_hvp``, ``from_grad``) are in
``callables.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from curvop import arrays
from curvop._dtypes import numpy_dtype
from curvop.backends.base import Backend

__all__ = ["ArrayBackend", "dense"]

Array = Any


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
