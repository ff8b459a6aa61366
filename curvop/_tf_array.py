"""A small array-API-style namespace for TensorFlow tensors (TF has no array-API support).

It implements what :mod:`curvop.arrays` and the algorithms call on ``xp`` -- nothing more -- with
array-API names and semantics (``concat``, ``matrix_transpose``, ``linalg.qr`` returning the thin
factorisation, ``asarray(..., device=...)``). Imported only for ``tf.Tensor``/``tf.Variable``
arguments, so ``import curvop`` never imports TensorFlow.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "asarray", "zeros", "ones", "eye", "zeros_like", "ones_like", "full",
    "sum", "mean", "max", "min", "sqrt", "abs", "exp", "log", "sign",
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "where",
    "matmul", "matrix_transpose", "vecdot", "reshape", "stack", "concat", "astype",
    "linalg", "float32", "float64",
]

float32 = tf.float32
float64 = tf.float64


def _dtype(dtype: Any) -> tf.DType | None:
    if dtype is None:
        return None
    if isinstance(dtype, tf.DType):
        return dtype
    return tf.as_dtype(np.dtype(dtype))


class _on:
    """``with tf.device(device)`` when a device is given, else nothing."""

    def __init__(self, device: Any):
        self._ctx = tf.device(device) if device is not None else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


# --- creation ------------------------------------------------------------------------------------
def asarray(a: Any, dtype: Any = None, device: Any = None, copy: bool | None = None) -> tf.Tensor:
    """``a`` (numpy, list, scalar or tensor) as a tensor of ``dtype`` on ``device``."""
    dtype = _dtype(dtype)
    with _on(device):
        if isinstance(a, (tf.Tensor, tf.Variable)):
            t = a if dtype is None or a.dtype == dtype else tf.cast(a, dtype)
            return tf.identity(t) if copy or device is not None else tf.convert_to_tensor(t)
        if dtype is not None:
            a = np.asarray(a, dtype=dtype.as_numpy_dtype)
        return tf.convert_to_tensor(a, dtype=dtype)


def zeros(shape: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
    with _on(device):
        return tf.zeros(shape, dtype=_dtype(dtype) or tf.float64)


def ones(shape: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
    with _on(device):
        return tf.ones(shape, dtype=_dtype(dtype) or tf.float64)


def full(shape: Any, fill_value: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
    with _on(device):
        return tf.fill(shape, tf.constant(fill_value, dtype=_dtype(dtype) or tf.float64))


def eye(n_rows: int, n_cols: int | None = None, k: int = 0, dtype: Any = None, device: Any = None) -> tf.Tensor:
    if k != 0:
        m = n_rows if n_cols is None else n_cols
        return asarray(np.eye(n_rows, m, k), dtype=_dtype(dtype) or tf.float64, device=device)
    with _on(device):
        return tf.eye(n_rows, n_cols, dtype=_dtype(dtype) or tf.float64)


def zeros_like(x: tf.Tensor, dtype: Any = None) -> tf.Tensor:
    return tf.zeros_like(x, dtype=_dtype(dtype))


def ones_like(x: tf.Tensor, dtype: Any = None) -> tf.Tensor:
    return tf.ones_like(x, dtype=_dtype(dtype))


# --- elementwise and reductions ------------------------------------------------------------------
def sum(x: tf.Tensor, axis: int | None = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def mean(x: tf.Tensor, axis: int | None = None, keepdims: bool = False) -> tf.Tensor:
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def max(x: tf.Tensor, axis: int | None = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def min(x: tf.Tensor, axis: int | None = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_min(x, axis=axis, keepdims=keepdims)


sqrt = tf.sqrt
abs = tf.abs  # noqa: A001
exp = tf.exp
sign = tf.sign
add = tf.add
subtract = tf.subtract
multiply = tf.multiply
divide = tf.divide
maximum = tf.maximum
minimum = tf.minimum


def log(x: tf.Tensor) -> tf.Tensor:
    return tf.math.log(x)


def where(condition: tf.Tensor, x1: Any, x2: Any) -> tf.Tensor:
    return tf.where(condition, x1, x2)


def astype(x: tf.Tensor, dtype: Any, copy: bool = True) -> tf.Tensor:
    return tf.cast(x, _dtype(dtype))


# --- shapes and products -------------------------------------------------------------------------
def reshape(x: tf.Tensor, shape: Any) -> tf.Tensor:
    return tf.reshape(x, shape)


def stack(arrays: Sequence[tf.Tensor], axis: int = 0) -> tf.Tensor:
    return tf.stack(list(arrays), axis=axis)


def concat(arrays: Sequence[tf.Tensor], axis: int = 0) -> tf.Tensor:
    return tf.concat(list(arrays), axis=axis)


def matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Array-API ``matmul``: 1-D operands are promoted and the added dimension removed again."""
    if len(a.shape) == 1 and len(b.shape) == 1:
        return tf.reduce_sum(a * b)
    if len(b.shape) == 1:
        return tf.linalg.matvec(a, b)
    if len(a.shape) == 1:
        return tf.linalg.matvec(b, a, transpose_a=True)
    return tf.linalg.matmul(a, b)


def matrix_transpose(x: tf.Tensor) -> tf.Tensor:
    return tf.linalg.matrix_transpose(x)


def vecdot(x1: tf.Tensor, x2: tf.Tensor, axis: int = -1) -> tf.Tensor:
    return tf.reduce_sum(x1 * x2, axis=axis)


# --- linalg --------------------------------------------------------------------------------------
def _qr(x: tf.Tensor, mode: str = "reduced") -> tuple[tf.Tensor, tf.Tensor]:
    if mode not in ("reduced", "complete"):
        raise ValueError(f"qr mode must be 'reduced' or 'complete', got {mode!r}")
    return tf.linalg.qr(x, full_matrices=mode == "complete")


def _eigh(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.linalg.eigh(x)


def _norm(x: tf.Tensor, axis: Any = None) -> tf.Tensor:
    return tf.norm(x, axis=axis)


linalg = types.SimpleNamespace(
    qr=_qr,
    eigh=_eigh,
    cholesky=tf.linalg.cholesky,
    solve=tf.linalg.solve,
    vector_norm=_norm,
    matrix_transpose=matrix_transpose,
    matmul=matmul,
)
