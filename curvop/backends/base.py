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
        from curvop.backends.numpy import numpy_dtype

        dt = getattr(x, "dtype", None)
        if dt is not None and numpy_dtype(dt) != self.dtype:
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

    def agree_seed(self, seed: Any) -> Any:
        """The seed to draw probes from; the algorithms call it once, where they make their generator.

        Default: ``seed`` itself. A backend whose products are reduced across processes overrides
        it so that every process draws the same probes (torch: rank 0's draw for ``None``, a fixed
        seed checked to be the same on every rank). An own algorithm should draw its probes with
        :meth:`HessianOperator.random` or ``np.random.default_rng(H.backend.agree_seed(seed))``.
        """
        return seed

    def describe(self) -> str:
        return f"{self.name} backend, n={self.size}, dtype={self.dtype}"


class LossPrecisionError(TypeError):
    """The loss is computed in a lower precision than the parameters (e.g. a float32 loss of a float64
    model: Keras loss objects computing in floatx, Hugging Face losses upcasting logits with ``.float()``)."""


class NondeterministicProductError(RuntimeError):
    """Two products with the same vector disagreed: the operator is not a fixed matrix."""


def check_deterministic(hvp: Any, v: Array, dtype: np.dtype) -> None:
    """Compute ``hvp(v)`` twice and raise :class:`NondeterministicProductError` if they differ.

    The tolerance is ``1000 * eps`` of ``dtype`` relative to ``||Hv||`` (reordering the sum over
    batches stays far below it; dropout or train-mode BatchNorm are far above it). A NaN or Inf in
    the product is reported as such.
    """
    y1, y2 = hvp(v), hvp(v)
    scale, diff = arrays.norm(y1), arrays.norm(y1 - y2)
    if not np.isfinite(scale):
        raise FloatingPointError(
            "the Hessian-vector product contains NaN or Inf: check the loss on your data "
            "(log of zero, overflow in float32, NaN inputs)"
        )
    rtol = 1000 * np.finfo(dtype).eps
    if diff > rtol * scale:
        raise NondeterministicProductError(
            f"two Hessian-vector products with the same vector differ (relative difference "
            f"{diff / max(scale, np.finfo(dtype).tiny):.2e} > {rtol:.1e}), so the loss is not a fixed "
            "function of the parameters. Likely causes: dropout or BatchNorm in training mode "
            "(call model.eval()), random data augmentation, a loader that shuffles with "
            "drop_last=True, or non-deterministic GPU kernels. Fix the cause, or pass "
            "check_deterministic=False if you accept it."
        )
