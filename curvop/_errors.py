"""Errors raised by more than one layer, defined below all of them (framework-free).

:class:`NonFiniteProductError` is raised by the backends (a product is not finite, with the batch
located: :mod:`curvop.backends.faults`) and by the algorithms (a NaN reached their host numbers),
so it lives here, where both may import it; ``curvop.backends.faults.NonFiniteProductError`` is
the same class. :class:`ModeError`, :class:`NoSecondDerivativeError` and :class:`PrecisionWarning`
are raised by the backends and exported as ``curvop.ModeError`` and so on.
"""

from __future__ import annotations

__all__ = ["ModeError", "NoSecondDerivativeError", "NonFiniteProductError", "PrecisionWarning"]


class NonFiniteProductError(FloatingPointError):
    """A Hessian-vector product contains NaN or Inf.

    Attributes
    ----------
    batch : int or None
        0-based index of the first batch (in the order the data yields them, on ``rank``) whose
        product is not finite; ``None`` if every batch's product was finite (the sum overflowed).
    rank : int or None
        The rank whose shard holds that batch, in a data-parallel run.
    """

    def __init__(self, message: str, batch: int | None = None, rank: int | None = None):
        super().__init__(message)
        self.batch = batch
        self.rank = rank


class ModeError(ValueError):
    """A product mode the user named (``hvp=``, ``cache=``) cannot differentiate the model; the
    message names the mode that works (``.mode``, ``.cache``)."""

    def __init__(self, message: str, mode: str | None = None, cache: bool | None = None):
        super().__init__(message)
        self.mode = mode
        self.cache = cache


class NoSecondDerivativeError(RuntimeError):
    """An op of the model or loss has no second derivative in any mode of the framework; the
    message names the op, the module using it where known, and a workaround (``.op``)."""

    def __init__(self, message: str, op: str | None = None):
        super().__init__(message)
        self.op = op


class PrecisionWarning(UserWarning):
    """Part of the model computes in a lower precision than its parameters (a float64 model that
    casts to float32 inside): the Hessian carries that precision's digits there."""
