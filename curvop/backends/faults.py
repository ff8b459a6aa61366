"""Finding where a NaN or Inf entered a Hessian-vector product (framework-free).

Checking every batch's product for NaN would cost one host synchronisation per batch. Instead a
backend checks the *final* product once (one sync per product) and, only when it is not finite,
calls :func:`locate_nonfinite` to recompute the product batch by batch and name the first batch
whose product is not finite. The error path is slow; the normal path pays one reduction.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from curvop._errors import NonFiniteProductError

__all__ = ["NonFiniteProductError", "locate_nonfinite", "nonfinite_error"]


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
