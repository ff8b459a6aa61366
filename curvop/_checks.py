"""Checks the algorithms share, on host numbers they already hold (framework-free).

>>> from curvop._checks import require_finite
>>> require_finite((1.0, 2.0), "example")       # finite: returns None
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["require_finite"]


def require_finite(values: Any, where: str) -> None:
    """Raise :class:`~curvop.backends.faults.NonFiniteProductError` (defined in :mod:`curvop._errors`) unless every value is finite.

    ``values`` are host numbers already computed (no extra synchronisation); a tuple of floats
    takes a fast path, as this runs once per Lanczos step. ``where`` names the caller in the message.
    """
    if isinstance(values, tuple) and all(map(math.isfinite, values)):
        return
    if not np.all(np.isfinite(values)):
        # Imported here, on the error path only: faults.py is framework-free, and no algorithm
        # module imports a module under curvop.backends at import time.
        from curvop._errors import NonFiniteProductError

        raise NonFiniteProductError(
            f"{where}: the Hessian-vector products contain NaN or Inf, so no result can be computed; "
            "check the loss on your data (NaN or Inf inputs, log of zero, overflow in float32) or "
            "the operator's product function"
        )
