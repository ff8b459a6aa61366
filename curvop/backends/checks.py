"""The checks every autodiff backend runs, written once over framework-free descriptions.

Options (``hvp``, ``cache``, ``batched``, the boolean flags), parameters (described as
:class:`ParamInfo`: name, dtype name, device string) and the loss value on the first batch
(:class:`LossInfo`). Errors name the problem and the fix, in the framework's words that the
backend passes in. Used by :class:`curvop.backends.template.AutodiffBackend`.

>>> check_params([ParamInfo("w", "float64", "cpu")], dtype_fix="", device_fix="", float_fix="", half_fix="")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from curvop._dtypes import precision_bits
from curvop.backends.base import LossPrecisionError

__all__ = ["LossInfo", "ParamInfo", "check_loss", "check_options", "check_params"]

_FLAGS = ("check_deterministic", "check_symmetric", "verify", "check_finite", "rewrite", "check_loss_dtype")


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as the checks see it: its name, dtype name (``"float32"``) and device (a string)."""

    name: str
    dtype: str
    device: str
    floating: bool = True


@dataclass(frozen=True)
class LossInfo:
    """The loss value on the first batch, described framework-free (``finite=None``: not computed)."""

    type_ok: bool
    type_name: str
    shape: tuple[int, ...]
    dtype: str
    floating: bool
    finite: bool | None = None


def check_options(**options: Any) -> None:
    """Types and values of the options, the same for every framework (a string ``"False"`` is not ``False``).

    ``hvp`` is ``"auto"``, ``"forward"`` or ``"reverse"``; ``cache`` and ``batched`` are booleans or
    ``"auto"``; the flags (``check_deterministic``, ``check_finite``, ...) are booleans.
    """
    hvp = options.pop("hvp", "auto")
    if not isinstance(hvp, str) or hvp not in ("auto", "forward", "reverse"):
        raise ValueError(f"hvp must be 'forward', 'reverse' or 'auto', got {hvp!r}")
    for name, value in options.items():
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, str) and value == "auto" and name not in _FLAGS):
            continue
        allowed = "True or False" + ("" if name in _FLAGS else " or 'auto'")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def check_params(params: Sequence[ParamInfo], *, what: str = "parameter", dtype_fix: str, device_fix: str,
                 float_fix: str, half_fix: str) -> None:
    """Non-empty, floating, one dtype (float32 or float64), one device; errors name the fix.

    The ``*_fix`` strings are the framework's words (``"model.to(device)"``, ``tf.device``, ...).
    """
    if not params:
        raise ValueError(f"no {what}s selected: the Hessian would be empty")
    for p in params:
        if not p.floating:
            raise TypeError(f"{what} {p.name!r} has dtype {p.dtype}; the Hessian needs floating-point "
                            f"{what}s ({float_fix})")
    dtypes = sorted({p.dtype for p in params})
    if len(dtypes) > 1:
        raise TypeError(f"{what}s have mixed dtypes ({', '.join(dtypes)}); {dtype_fix}")
    devices = sorted({p.device for p in params})
    if len(devices) > 1:
        raise ValueError(f"{what}s are on several devices ({', '.join(devices)}); curvop needs them on one "
                         f"device: {device_fix}")
    if dtypes[0] not in ("float32", "float64"):
        raise TypeError(
            f"the {what}s are {dtypes[0]}; curvop computes Hessians in float32 or float64 (16-bit products "
            f"keep 2-3 digits, too few for Lanczos or a trace estimate, and numpy has no bfloat16): {half_fix}"
        )


def check_loss(info: LossInfo, param_dtype: str, *, framework: str, reduce_fix: str,
               precision_message: Callable[[str], str] | None, zero_dim: bool = False) -> None:
    """The loss on the first batch is a finite floating scalar of the parameters' precision.

    ``precision_message(loss_dtype)`` gives the framework's advice when the loss is less precise
    than the parameters (``None``: not checked, ``check_loss_dtype=False``). ``zero_dim``: the
    framework's gradient needs shape ``()``, not only one element (JAX).
    """
    if not info.type_ok:
        raise TypeError(f"the loss must return a {framework}, got {info.type_name}")
    if int(np.prod(info.shape, dtype=np.int64)) != 1 or (zero_dim and tuple(info.shape) != ()):
        raise ValueError(f"the loss must be a scalar, but it returned shape {tuple(info.shape)}; {reduce_fix}")
    if not info.floating:
        raise TypeError(f"the loss has dtype {info.dtype}; it must be floating point")
    if info.finite is False:
        raise FloatingPointError("the loss is NaN or Inf on the first batch; check the data and the model")
    bits, ref = precision_bits(info.dtype), precision_bits(param_dtype)
    if precision_message is not None and bits is not None and ref is not None and bits < ref:
        raise LossPrecisionError(precision_message(info.dtype))
