"""Operators from user callables, for codes without autodiff: ``from_hvp`` (the user's product) and
``from_grad`` (central differences of the user's gradient), on numpy, CuPy or any Array API array.

Also the registry entry of ``backend="numpy"``, which explains that numpy cannot differentiate.
The backend they build is :class:`curvop.backends.array.ArrayBackend` (CuPy: its subclass
:class:`curvop.backends.cupy.CupyBackend`, chosen by ``x0``'s type through the registry).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from curvop import arrays
from curvop import backends as registry
from curvop._dtypes import numpy_dtype
from curvop.backends.array import ArrayBackend

__all__ = ["from_hvp", "from_grad", "FiniteDifferenceHVP", "hessian", "hessian_of"]

Array = Any


def hessian(model: Any = None, loss_fn: Any = None, data: Any = None, **kwargs: Any):
    """Registry entry for ``backend="numpy"``: numpy has no automatic differentiation."""
    raise TypeError(
        "numpy has no automatic differentiation, so curvop.hessian(model, loss_fn, data) cannot build "
        "its products; use curvop.aslinearoperator(matrix_or_callable) or "
        "HessianOperator.from_hvp(hvp_fn, x0) / HessianOperator.from_grad(grad_fn, x0)"
    )


def hessian_of(f: Any = None, params: Any = None, data: Any = None, **kwargs: Any):
    """Registry entry for ``curvop.hessian_of(..., backend="numpy")``: see :func:`hessian`."""
    raise TypeError(
        "numpy has no automatic differentiation, so curvop.hessian_of(f, params) cannot differentiate f; "
        "pass backend='jax' (JAX traces f, numpy params are converted) or use "
        "HessianOperator.from_hvp(hvp_fn, x0) / HessianOperator.from_grad(grad_fn, x0)"
    )


# --- operators for codes without autodiff ----------------------------------------------------------
def _check_x0(x0: Array) -> Array:
    if isinstance(x0, (list, tuple)):
        x0 = np.asarray(x0, dtype=np.float64)
    shape = tuple(getattr(x0, "shape", ()))
    if not hasattr(x0, "dtype") or len(shape) != 1:
        raise ValueError(
            f"x0 must be a 1-D array (the point, flattened), got "
            f"{'shape ' + str(shape) if hasattr(x0, 'shape') else type(x0).__name__}; flatten it with x0.ravel()"
        )
    if shape[0] == 0:
        raise ValueError("x0 is empty: the Hessian would be empty")
    if numpy_dtype(x0.dtype).kind != "f":
        raise TypeError(f"x0 has dtype {x0.dtype}; it must be a real floating-point array (e.g. x0.astype(float))")
    return x0


def _array_backend(matvec: Callable[[Array], Array], x0: Array, name: str) -> ArrayBackend:
    """An :class:`ArrayBackend` for x0's framework (CuPy gets its device-aware subclass)."""
    if type(x0).__module__.split(".")[0] == "cupy":  # its device-aware subclass, found through the registry
        return registry.get("cupy", "array_backend")(matvec, x0.shape[0], x0, name=name)
    backend = ArrayBackend(matvec, x0.shape[0], x0)
    backend.describe = lambda: f"{backend.name} {name}, n={backend.size}, dtype={backend.dtype}"  # type: ignore[method-assign]
    return backend


def _checked(fn: Callable[[Array], Array], x0: Array, what: str) -> Callable[[Array], Array]:
    """Wrap a user function of a vector so a wrong result is a clear error at the first product."""
    n, kind = x0.shape[0], type(x0)

    def call(v: Array) -> Array:
        out = fn(v)
        if not isinstance(out, kind):
            raise TypeError(
                f"{what} returned a {type(out).__module__}.{type(out).__name__} for a "
                f"{kind.__module__}.{kind.__name__} input; it must return the same array type as x0 "
                "(no silent copies between host and device)"
            )
        if tuple(out.shape) != (n,):
            raise ValueError(f"{what} returned shape {tuple(out.shape)}; it must return a vector of shape ({n},) like x0")
        if out.dtype != x0.dtype:
            out = arrays.namespace(out).astype(out, x0.dtype)  # the array API has xp.astype, no method
        return out

    return call


def from_hvp(hvp_fn: Callable[[Array], Array], x0: Array, *, matmat_fn: Callable[[Array], Array] | None = None):
    """Backend for :meth:`curvop.HessianOperator.from_hvp`: the user computes ``H v`` exactly.

    ``x0`` (a 1-D numpy, CuPy or other Array API array) fixes n, the dtype and the device;
    ``hvp_fn(v)`` gets a vector of the same type and must return one (checked at every product:
    shape and type).
    """
    x0 = _check_x0(x0)
    if not callable(hvp_fn):
        raise TypeError(f"hvp_fn must be callable, got {type(hvp_fn).__name__}")
    backend = _array_backend(_checked(hvp_fn, x0, "hvp_fn"), x0, "from_hvp")
    if matmat_fn is not None:
        backend._matmat = matmat_fn
    return backend


class FiniteDifferenceHVP:
    """``v -> H(x0) v`` by central differences of the gradient (see :func:`from_grad`)."""

    def __init__(self, grad_fn: Callable[[Array], Array], x0: Array, step: float | None, richardson: bool):
        self.grad_fn, self.x0, self.richardson = grad_fn, x0, bool(richardson)
        eps = float(np.finfo(numpy_dtype(x0.dtype)).eps)
        default = eps ** (1 / 5) if richardson else eps ** (1 / 3)
        self.step = default if step is None else float(step)
        if not self.step > 0:
            raise ValueError(f"step must be positive, got {step}")
        self.scale = max(1.0, arrays.norm(x0))

    def _central(self, v: Array, t: float) -> Array:
        return (self.grad_fn(self.x0 + t * v) - self.grad_fn(self.x0 - t * v)) / (2 * t)

    def __call__(self, v: Array) -> Array:
        nv = arrays.norm(v)
        if nv == 0:
            return v * 0
        t = self.step * self.scale / nv  # the displacement t * v has length step * max(1, |x0|)
        d = self._central(v, t)
        if not self.richardson:
            return d
        return (4 * self._central(v, t / 2) - d) / 3


def from_grad(grad_fn: Callable[[Array], Array], x0: Array, *, step: float | None = None,
              richardson: bool = False):
    """Backend for :meth:`curvop.HessianOperator.from_grad` (products by differences of gradients)."""
    x0 = _check_x0(x0)
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    fd = FiniteDifferenceHVP(_checked(grad_fn, x0, "grad_fn"), x0, step, richardson)
    name = f"from_grad (central differences{', Richardson' if richardson else ''}, step={fd.step:.1e})"
    backend = _array_backend(fd, x0, name)
    backend.finite_difference = fd  # type: ignore[attr-defined]
    return backend
