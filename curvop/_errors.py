"""Errors raised by more than one layer, defined below all of them (framework-free).

:class:`NonFiniteProductError` is raised by the backends (a product is not finite, with the batch
located: :mod:`curvop.backends.faults`) and by the algorithms (a NaN reached their host numbers),
so it lives here, where both may import it; ``curvop.backends.faults.NonFiniteProductError`` is
the same class.
"""

from __future__ import annotations

__all__ = ["NonFiniteProductError"]


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
