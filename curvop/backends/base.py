"""The backend contract: what a framework must provide for curvop to multiply by its Hessian.

A backend is small on purpose (like scipy's ``_matvec``): the operator and all algorithms are
derived from these few members. See ``docs/backends.md`` for a complete example.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curvop import arrays

Array = Any


class Backend:
    """Base class of HVP backends.

    Subclasses must set ``name``, ``size`` (the dimension n), ``dtype`` (a numpy dtype) and
    implement :meth:`hvp` and :meth:`is_native`. Everything else has a working default.
    """

    name: str = "base"
    size: int
    dtype: np.dtype

    # --- required -------------------------------------------------------------------------
    def hvp(self, v: Array) -> Array:
        """Hessian times a native 1-D vector of length ``size``."""
        raise NotImplementedError

    def is_native(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's framework."""
        raise NotImplementedError

    # --- optional, with defaults ----------------------------------------------------------
    def hvp_batch(self, v: Array) -> Array:
        """Hessian times a native ``(n, k)`` matrix. Default: one :meth:`hvp` per column."""
        cols = [self.hvp(v[:, j]) for j in range(v.shape[1])]
        return arrays.stack(cols, axis=1)

    def check(self, x: Array) -> None:
        """Raise a clear error if native ``x`` has the wrong dtype or device (shape is checked by the operator)."""
        dt = getattr(x, "dtype", None)
        if dt is not None and np.dtype(str(dt).replace("torch.", "")) != self.dtype:
            raise TypeError(
                f"vector has dtype {dt}, but the operator works in {self.dtype}; "
                f"convert it first (e.g. x.astype / x.to(dtype))."
            )

    def to_numpy(self, x: Array) -> np.ndarray:
        """Native array to numpy (shares memory on CPU where the framework allows)."""
        return arrays.to_numpy(x)

    def from_numpy(self, a: np.ndarray) -> Array:
        """numpy array to a native array of this backend's dtype, on its device."""
        raise NotImplementedError

    def random(self, shape, kind: str, rng: np.random.Generator) -> Array:
        """Native random probes. Default: generated on the host by numpy, then moved over."""
        return self.from_numpy(arrays.random_probes(rng, shape, kind, dtype=self.dtype))

    def describe(self) -> str:
        return f"{self.name} backend, n={self.size}, dtype={self.dtype}"
