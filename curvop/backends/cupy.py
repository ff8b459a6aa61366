"""CuPy: Hessian operators on the GPU for codes without autodiff.

CuPy has no automatic differentiation, so there is no ``curvop.hessian(model, ...)`` for it. Build
operators from products or gradients you compute yourself, with CuPy arrays that stay on the GPU:

* :meth:`curvop.HessianOperator.from_hvp` -- ``hvp_fn(v)`` gives ``H v`` exactly;
* :meth:`curvop.HessianOperator.from_grad` -- ``grad_fn(x)`` and central differences.

Given a ``cupy.ndarray`` ``x0`` these use :class:`CupyBackend`: a CuPy vector in gives a CuPy
vector out on the same device (no host round trip); numpy vectors (what scipy passes) are copied to
the device and back. ``cupyx.scipy.sparse.linalg.eigsh`` works on the operator directly (it only
calls ``A @ v``) or through :meth:`curvop.HessianOperator.to_cupy_linear_operator`.
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from curvop.backends.array import ArrayBackend

__all__ = ["CupyBackend", "array_backend", "hessian", "hessian_of", "from_dlpack"]


class CupyBackend(ArrayBackend):
    """An :class:`ArrayBackend` for CuPy arrays on one CUDA device (the device of ``like``)."""

    def __init__(self, matvec: Any, size: int, like: Any, matmat: Any = None, name: str | None = None):
        super().__init__(matvec, size, like, matmat=matmat, name="cupy")
        self.label = name or "cupy"
        self.device_id = int(like.device.id)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray)

    def check(self, x: Any) -> None:
        if x.dtype != self.dtype:
            raise TypeError(f"vector has dtype {x.dtype}, but the operator works in {self.dtype}; use x.astype(...)")
        if int(x.device.id) != self.device_id:
            raise ValueError(
                f"vector is on CUDA device {x.device.id}, but the operator computes on device {self.device_id}; "
                f"move it with `with cupy.cuda.Device({self.device_id}): x = cupy.asarray(x)`"
            )

    def hvp(self, v: Any) -> Any:
        with cupy.cuda.Device(self.device_id):
            return self._matvec(v)

    def from_numpy(self, a: np.ndarray) -> Any:
        with cupy.cuda.Device(self.device_id):
            return cupy.asarray(np.asarray(a, dtype=self.dtype))  # one host -> device copy

    def describe(self) -> str:
        return f"{self.label}, n={self.size}, {self.dtype} on cuda:{self.device_id}"


def array_backend(matvec: Any, size: int, like: Any, name: str | None = None) -> CupyBackend:
    """Registry entry ``array_backend``: the backend of ``from_hvp`` / ``from_grad`` for a CuPy ``x0``."""
    return CupyBackend(matvec, size, like, name=name)


def from_dlpack(x: Any) -> Any:
    """A CuPy view of a GPU array of another framework (torch, JAX, TensorFlow), without a copy."""
    return cupy.from_dlpack(x)


def hessian(model: Any = None, loss_fn: Any = None, data: Any = None, **kwargs: Any):
    """Registry entry for ``backend="cupy"``: CuPy has no automatic differentiation."""
    raise TypeError(
        "CuPy has no automatic differentiation, so curvop.hessian(model, loss_fn, data) cannot build its "
        "products; use HessianOperator.from_hvp(hvp_fn, x0) with your own product, or "
        "HessianOperator.from_grad(grad_fn, x0) with your gradient (x0 a cupy array keeps them on the GPU)"
    )


def hessian_of(f: Any = None, params: Any = None, data: Any = None, **kwargs: Any):
    """Registry entry for ``curvop.hessian_of(..., backend="cupy")``: see :func:`hessian`."""
    hessian()
