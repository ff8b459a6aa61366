"""The backend contract: what a framework must provide for curvop to multiply by its Hessian.

A backend is small on purpose (like scipy's ``_matvec``): the operator and all algorithms are
derived from these few members. :class:`Backend` is the minimal contract (an ``abc.ABC``: three
abstract methods, three attributes); :class:`curvop.backends.template.AutodiffBackend` is the
template the framework backends build on. See ``docs/architecture.md`` and ``docs/backends.md``.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from curvop import arrays
from curvop._dtypes import numpy_dtype

__all__ = ["Backend", "LossPrecisionError", "NondeterministicProductError", "check_deterministic",
           "nondeterminism_message"]

Array = Any


class Backend(abc.ABC):
    """Base class of HVP backends: the minimal contract.

    A subclass sets the attributes ``name``, ``size`` (the dimension n) and ``dtype`` (a numpy
    dtype) and implements the three abstract methods :meth:`hvp`, :meth:`is_native` and
    :meth:`from_numpy`. Every other member has a working default.

    Examples
    --------
    >>> import numpy as np
    >>> class Diagonal(Backend):
    ...     name, size, dtype = "diag", 3, np.dtype(np.float64)
    ...     def hvp(self, v): return np.array([1.0, 2.0, 3.0]) * v
    ...     def is_native(self, x): return isinstance(x, np.ndarray)
    ...     def from_numpy(self, a): return np.asarray(a, dtype=self.dtype)
    >>> Diagonal().hvp(np.ones(3))
    array([1., 2., 3.])
    """

    name: str = "base"
    size: int
    dtype: np.dtype

    # --- required -------------------------------------------------------------------------
    @abc.abstractmethod
    def hvp(self, v: Array) -> Array:
        """Hessian times a native 1-D vector of length ``size``."""

    @abc.abstractmethod
    def is_native(self, x: Any) -> bool:
        """True if ``x`` is an array of this backend's framework."""

    @abc.abstractmethod
    def from_numpy(self, a: np.ndarray) -> Array:
        """numpy array to a native array of this backend's dtype, on its device."""

    # --- optional, with defaults ----------------------------------------------------------
    def hvp_batch(self, v: Array) -> Array:
        """Hessian times a native ``(n, k)`` matrix. Default: one :meth:`hvp` per column."""
        cols = [self.hvp(v[:, j]) for j in range(v.shape[1])]
        return arrays.stack(cols, axis=1)

    def check(self, x: Array) -> None:
        """Raise a clear error if native ``x`` has the wrong dtype or device (shape is checked by the operator)."""
        dt = getattr(x, "dtype", None)
        if dt is not None and numpy_dtype(dt) != self.dtype:
            raise TypeError(
                f"vector has dtype {dt}, but the operator works in {self.dtype}; "
                f"convert it first (e.g. x.astype / x.to(dtype))."
            )

    def to_numpy(self, x: Array) -> np.ndarray:
        """Native array to numpy (shares memory on CPU where the framework allows)."""
        return arrays.to_numpy(x)

    def random(self, shape: Any, kind: str, rng: np.random.Generator) -> Array:
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

    def on(self, data: Any, params: Any = None) -> "Backend":
        """This backend on other data (and, where parameters are values, at ``params``), reusing what
        its build checked and compiled. Default: not supported (a clear error)."""
        raise NotImplementedError(
            f"the {self.name} backend cannot be moved to other data: build a new operator instead")

    def is_main_process(self) -> bool:
        """Whether this process reports (progress bars, printing). Default True; a data-parallel
        backend answers ``rank == 0``."""
        return True

    def describe(self) -> str:
        """One line naming the backend, n and dtype (shown by ``repr(H)``)."""
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
        raise NondeterministicProductError(nondeterminism_message(diff / max(scale, np.finfo(dtype).tiny), rtol))


def nondeterminism_message(rel: float, rtol: float) -> str:
    """What :class:`NondeterministicProductError` says when two products of one vector differ by ``rel``."""
    return (f"two Hessian-vector products with the same vector differ (relative difference {rel:.2e} > "
            f"{rtol:.1e}), so the loss is not a fixed function of the parameters. Likely causes: dropout or "
            "BatchNorm in training mode (call model.eval()), random data augmentation, a loader that shuffles "
            "with drop_last=True, or non-deterministic GPU kernels. Fix the cause, or pass "
            "check_deterministic=False if you accept it.")
