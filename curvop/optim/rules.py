"""What the optimizers of every framework share, framework-free: hyperparameter checks, when
Sophia refreshes its curvature, the probes' seeds, and the Sophia-G scale.

The rules themselves (``docs/optimizer.md``), with g the gradient, D the Hutchinson estimate of
diag(H) and t the step (from 1):

* AdaHessian: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)D²``,
  ``p ← p − lr·wd·p − lr·(m/(1−β₁ᵗ)) / ((√(v/(1−β₂ᵗ)))^k + ε)``, D averaged over the kernel of
  4-D convolution weights;
* Sophia: ``m ← β₁m + (1−β₁)g``; on curvature steps ``h ← β₂h + (1−β₂)ĥ``;
  ``p ← p − lr·wd·p``, ``p ← p − lr·sign(m)·min(|m| / max(ρh, ε), 1)`` (ĥ = D for Sophia-H, the
  Gauss-Newton-Bartlett estimate for Sophia-G).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_adahessian", "check_sophia", "curvature_step", "probe_rng"]


def _number(name: str, value: Any, low: float, *, open_low: bool = False, high: float | None = None,
            open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = (not math.isfinite(v) or v < low or (open_low and v == low)
           or (high is not None and (v > high or (open_high and v == high))))
    if bad:
        lo = f"{'>' if open_low else '>='} {low:g}"
        hi = "" if high is None else f" and {'<' if open_high else '<='} {high:g}"
        raise ValueError(f"{name} must be {lo}{hi}, got {value!r}")
    return v


def _betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (_number("betas[0]", betas[0], 0.0, high=1.0, open_high=True),
            _number("betas[1]", betas[1], 0.0, high=1.0, open_high=True))


def _probes(num_probes: Any) -> int:
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer (Hutchinson probes per estimate), got {num_probes!r}")
    return int(num_probes)


def check_adahessian(lr: Any, betas: Any, eps: Any, weight_decay: Any, hessian_power: Any,
                     num_probes: Any = 1) -> dict[str, Any]:
    """The AdaHessian hyperparameters checked (a clear ``ValueError``/``TypeError``), as floats."""
    return {"lr": _number("lr", lr, 0.0), "betas": _betas(betas), "eps": _number("eps", eps, 0.0),
            "weight_decay": _number("weight_decay", weight_decay, 0.0),
            "hessian_power": _number("hessian_power", hessian_power, 0.0, high=1.0),
            "num_probes": _probes(num_probes)}


def check_sophia(lr: Any, betas: Any, rho: Any, weight_decay: Any, eps: Any, every: Any,
                 num_probes: Any = 1) -> dict[str, Any]:
    """The Sophia hyperparameters checked, as floats (``every`` and ``num_probes`` as ints)."""
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a positive integer (steps between curvature estimates), got {every!r}")
    return {"lr": _number("lr", lr, 0.0), "betas": _betas(betas), "rho": _number("rho", rho, 0.0, open_low=True),
            "weight_decay": _number("weight_decay", weight_decay, 0.0),
            "eps": _number("eps", eps, 0.0, open_low=True), "every": int(every), "num_probes": _probes(num_probes)}


def curvature_step(step: int, every: int) -> bool:
    """Whether step ``step`` (counted from 1) refreshes Sophia's curvature: steps 1, 1 + every, ...

    Examples
    --------
    >>> [t for t in range(1, 25) if curvature_step(t, 10)]
    [1, 11, 21]
    """
    return (int(step) - 1) % int(every) == 0


def probe_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of step ``step``'s probes (or sampled targets): a function of ``(seed, step)`` only,
    so a run repeats, and a restored optimizer draws what the original would have.

    Examples
    --------
    >>> float(probe_rng(0, 3).random()) == float(probe_rng(0, 3).random())
    True
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]))
