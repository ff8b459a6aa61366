"""A small array-API-style namespace for TensorFlow tensors (TF has no array-API support).

It implements what curvop calls on an array namespace ``xp`` (:mod:`curvop.arrays`, the
algorithms, the callables backend) -- nothing more; ``tests/test_tf_arrays.py`` checks the list
against the source -- with array-API names and semantics (``concat``, ``matrix_transpose``,
``linalg.qr`` returning the thin factorisation, ``asarray(..., device=...)``). Imported only for
``tf.Tensor``/``tf.Variable`` arguments, so ``import curvop`` never imports TensorFlow.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

__all__ = ["asarray", "zeros", "sum", "sqrt", "astype", "stack", "concat", "reshape", "matmul", "matrix_transpose",
           "linalg", "float32", "float64"]

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


# --- elementwise and reductions (``sum`` is the array-API name; it shadows the builtin here only) --
def sum(x: tf.Tensor, axis: int | None = None, keepdims: bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


sqrt = tf.sqrt


def astype(x: tf.Tensor, dtype: Any, copy: bool = True) -> tf.Tensor:
    return tf.cast(x, _dtype(dtype))


# --- shapes and products -------------------------------------------------------------------------
def stack(arrays: Sequence[tf.Tensor], axis: int = 0) -> tf.Tensor:
    return tf.stack(list(arrays), axis=axis)


def concat(arrays: Sequence[tf.Tensor], axis: int = 0) -> tf.Tensor:
    return tf.concat(list(arrays), axis=axis)


def reshape(x: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    return tf.reshape(x, shape)


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


# --- linalg --------------------------------------------------------------------------------------
def _qr(x: tf.Tensor, mode: str = "reduced") -> tuple[tf.Tensor, tf.Tensor]:
    if mode not in ("reduced", "complete"):
        raise ValueError(f"qr mode must be 'reduced' or 'complete', got {mode!r}")
    return tf.linalg.qr(x, full_matrices=mode == "complete")


linalg = types.SimpleNamespace(qr=_qr)
