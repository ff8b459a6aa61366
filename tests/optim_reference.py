"""The optimizers' rules as plain numpy float64, and the diagonal quadratic every framework is tested on.

Written from the rules of issue 23 (``docs/optimizer.md``), not from curvop's code: one function per
rule, a loop over steps, the parameters a list of numpy arrays. On the quadratic
``f(p) = ½ Σ a ⊙ (p − c)²`` the Hessian is ``diag(a)``, so Hutchinson's estimate ``z ⊙ Hz = a``
is exact for every Rademacher probe and the trajectories are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quadratic:
    """``f(p) = ½ Σ_i a_i ⊙ (p_i − c_i)²`` over parameters of the given shapes."""

    a: tuple[np.ndarray, ...]
    c: tuple[np.ndarray, ...]
    p0: tuple[np.ndarray, ...]

    def grad(self, p: list[np.ndarray]) -> list[np.ndarray]:
        return [a * (x - c) for a, c, x in zip(self.a, self.c, p)]

    def diag(self, p: list[np.ndarray]) -> list[np.ndarray]:
        return [a.copy() for a in self.a]

    def value(self, p: list[np.ndarray]) -> float:
        return float(sum(0.5 * np.sum(a * (x - c) ** 2) for a, c, x in zip(self.a, self.c, p)))


def quadratic(shapes: tuple[tuple[int, ...], ...] = ((5,), (2, 3, 2, 2)), seed: int = 0,
              negative: bool = False) -> Quadratic:
    """A diagonal quadratic; curvatures in [0.5, 4] (some negated with ``negative``), varying
    over the kernel of 4-D shapes so that spatial averaging matters."""
    rng = np.random.default_rng(seed)
    a = [rng.uniform(0.5, 4.0, s) for s in shapes]
    if negative:
        a = [x * np.where(rng.random(x.shape) < 0.3, -1.0, 1.0) for x in a]
    c = [rng.normal(size=s) for s in shapes]
    p0 = [rng.normal(size=s) for s in shapes]
    return Quadratic(tuple(a), tuple(c), tuple(p0))


def kernel_mean(d: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """AdaHessian's spatial averaging of a 4-D convolution weight's diagonal over its kernel axes."""
    if d.ndim != 4:
        return d
    return np.broadcast_to(d.mean(axis=axes, keepdims=True), d.shape)


def adahessian(problem, steps: int, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-4,
               weight_decay: float = 0.0, hessian_power: float = 1.0,
               kernel_axes: tuple[int, int] = (2, 3)) -> list[list[np.ndarray]]:
    """The AdaHessian trajectory: the parameters after each step (``steps`` entries)."""
    b1, b2 = betas
    p = [x.copy() for x in problem.p0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    out = []
    for t in range(1, steps + 1):
        g, D = problem.grad(p), [kernel_mean(d, kernel_axes) for d in problem.diag(p)]
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * D[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p[i] = p[i] - lr * weight_decay * p[i] - lr * m_hat / (np.sqrt(v_hat) ** hessian_power + eps)
        out.append([x.copy() for x in p])
    return out


def sophia(problem, steps: int, *, lr: float, betas=(0.965, 0.99), rho: float = 0.04,
           weight_decay: float = 0.1, eps: float = 1e-15, every: int = 10, hhat=None) -> list[list[np.ndarray]]:
    """The Sophia trajectory. ``hhat(p)`` is the curvature estimate (default: the exact diagonal,
    Sophia-H on the quadratic); it is taken on steps 1, 1 + every, 1 + 2 every, ..."""
    b1, b2 = betas
    hhat = problem.diag if hhat is None else hhat
    p = [x.copy() for x in problem.p0]
    m = [np.zeros_like(x) for x in p]
    h = [np.zeros_like(x) for x in p]
    out = []
    for t in range(1, steps + 1):
        g = problem.grad(p)
        fresh = hhat(p) if (t - 1) % every == 0 else None
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            if fresh is not None:
                h[i] = b2 * h[i] + (1 - b2) * fresh[i]
            p[i] = p[i] - lr * weight_decay * p[i]
            p[i] = p[i] - lr * np.sign(m[i]) * np.minimum(np.abs(m[i]) / np.maximum(rho * h[i], eps), 1.0)
        out.append([x.copy() for x in p])
    return out


def max_error(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    """The largest difference over every step and entry, relative to ``max(1, |want|)`` (AdaHessian
    runs away along negative curvature, to entries in the thousands); the lengths must match."""
    assert len(got) == len(want), (len(got), len(want))
    return max(float(np.max(np.abs(np.asarray(g) - w) / np.maximum(1.0, np.abs(w))))
               for gs, ws in zip(got, want) for g, w in zip(gs, ws))
