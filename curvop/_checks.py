"""Checks the algorithms share (framework-free): on host numbers they already hold, and on their
arguments, which every public algorithm checks before its first product, whatever path it takes.

>>> from curvop._checks import require_finite
>>> require_finite((1.0, 2.0), "example")       # finite: returns None
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["PROBES", "check_choice", "check_flag", "check_float_dtype", "check_int", "check_positive",
           "require_finite"]


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


# --- the arguments of the public algorithms: checked up front, whatever path the call takes ----------
PROBES = ("rademacher", "gaussian", "sphere")


def check_int(name: str, value: Any, minimum: int | None = None, *, optional: bool = False) -> int | None:
    """``value`` as an int (an int, a numpy integer or an integral float such as ``1e3``; not a bool),
    at least ``minimum``; ``None`` passes when ``optional``.

    >>> check_int("num_matvecs", 1e3, 1)
    1000
    """
    if value is None and optional:
        return None
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                         and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral:
        raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive(name: str, value: Any, *, optional: bool = False) -> float | None:
    """``value`` as a positive finite float; ``None`` passes when ``optional``.

    >>> check_positive("tol", 1e-3)
    0.001
    """
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive number{' or None' if optional else ''}, got {value!r}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool (``True``/``False``, numpy bools, or 0/1)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (strings), else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_float_dtype(name: str, value: Any) -> None:
    """``None`` or a real floating dtype (``"float32"``, ``np.float64``, ...)."""
    if value is None:
        return
    try:
        kind = np.dtype(value).kind
    except TypeError:
        kind = None
    if kind != "f":
        raise ValueError(f"{name} must be None or a floating dtype such as 'float32' or 'float64', got {value!r}")
