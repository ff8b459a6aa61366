"""Finding where a NaN or Inf entered a Hessian-vector product (framework-free).

Checking every batch's product for NaN would cost one host synchronisation per batch. Instead a
backend checks the *final* product once (one sync per product) and, only when it is not finite,
calls :func:`locate_nonfinite` to recompute the product batch by batch and name the first batch
whose product is not finite. The error path is slow; the normal path pays one reduction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from curvop._errors import NonFiniteProductError

__all__ = ["NonFiniteProductError", "SumNote", "locate_nonfinite", "nonfinite_error"]


class SumNote:
    """The sum of a product's entries, computed inside the product's compiled function, kept until
    the product is checked for NaN and Inf.

    The sum is finite exactly when every entry is, but for overflow: NaN and Inf propagate through
    it, and a sum of finite entries is not finite only when it overflows, which the full check then
    settles. Fused into the function that writes the product, the sum costs less than a separate
    pass over it on the host (``np.isfinite(y).all()`` reads it back and writes a mask).

    Examples
    --------
    >>> import numpy as np
    >>> note = SumNote()
    >>> y = note.put((np.ones(3), np.float32(3.0)))  # what a compiled product returns: (y, y.sum())
    >>> note.finite(y), note.finite(y)  # the note is used once
    (True, False)
    >>> note.finite(note.put((np.array([1.0, np.nan]), np.float64("nan"))))  # check the entries
    False
    """

    __slots__ = ("_y", "_total")

    def __init__(self) -> None:
        self._y: Any = None
        self._total: Any = None

    def put(self, out: tuple[Any, Any]) -> Any:
        """Note ``(y, total)`` from a compiled product; return ``y``."""
        self._y, self._total = out
        return self._y

    def finite(self, y: Any) -> bool:
        """True when ``y`` is the noted product and its sum is finite (so every entry is); False when
        ``y`` has no note or its sum is not finite: then check the entries."""
        if self._y is not y:
            return False
        total, self._y, self._total = self._total, None, None
        return math.isfinite(np.asarray(total))  # np.asarray: a JAX or TF scalar read in place, quicker than float()


def locate_nonfinite(products: Iterable[Any], all_finite: Callable[[Any], bool]) -> int | None:
    """Index of the first product (one per batch, computed lazily) that is not finite, or ``None``."""
    for i, p in enumerate(products):
        if not all_finite(p):
            return i
    return None


def nonfinite_error(culprits: Sequence[int | None], single: bool) -> NonFiniteProductError:
    """The error for a non-finite product; ``culprits[r]`` is rank r's first bad batch (or None)."""
    advice = (
        "check the data and the loss there (NaN or Inf inputs, log of zero, overflow in float32), "
        "or drop that batch"
    )
    bad = [(r, b) for r, b in enumerate(culprits) if b is not None]
    if not bad:
        return NonFiniteProductError(
            "the Hessian-vector product contains NaN or Inf although every batch's product is finite: "
            "the sum over batches overflowed; use float64 or scale the loss down"
        )
    rank, batch = bad[0]
    where = f"batch {batch} " + ("(the only batch)" if single else "(0-based, in the order the data yields them)")
    if len(culprits) > 1:
        where += f" of rank {rank}'s shard"
        if len(bad) > 1:
            where += " (also on ranks " + ", ".join(str(r) for r, _ in bad[1:]) + ")"
    return NonFiniteProductError(
        f"the Hessian-vector product contains NaN or Inf; it first appears in {where}: {advice}",
        batch=batch, rank=rank if len(culprits) > 1 else None,
    )
