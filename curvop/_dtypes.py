"""Framework dtypes as numpy dtypes and names (framework-free: nothing here imports a framework)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["numpy_dtype", "dtype_name", "precision_bits"]

#: significand-relevant width of the floating dtypes curvop meets; bfloat16 is not a numpy dtype
_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def numpy_dtype(dt: Any) -> np.dtype:
    """The numpy dtype matching a framework dtype (``torch.float32``, ``tf.float64``, ...).

    Dtypes that are not numpy's are matched by name without the module prefix
    (``torch.float32``, ``array_api_strict.float64``).

    >>> numpy_dtype("float32")
    dtype('float32')
    """
    if hasattr(dt, "as_numpy_dtype"):  # tensorflow
        return np.dtype(dt.as_numpy_dtype)
    try:
        return np.dtype(dt)
    except TypeError:
        return np.dtype(str(dt).rpartition(".")[2])


def dtype_name(dt: Any) -> str:
    """A framework dtype's short name: ``torch.bfloat16`` -> ``"bfloat16"``, ``tf.float32`` -> ``"float32"``.

    >>> dtype_name(np.float64)
    'float64'
    """
    name = getattr(dt, "name", None)
    if isinstance(name, str):  # numpy, tensorflow
        return name
    if isinstance(dt, type):
        return np.dtype(dt).name
    return str(dt).rpartition(".")[2]


def precision_bits(name: str) -> int | None:
    """Width of a floating dtype by name (``None`` when not a known float)."""
    return _BITS.get(name)
