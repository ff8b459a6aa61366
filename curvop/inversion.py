"""Damped inverses: :func:`solve` for ``(A + λI) x = b`` and :func:`inverse`, the operator ``(A + λI)⁻¹``.

Written once on the array layer: conjugate gradients (CG, for positive definite ``A + λI``) and
MINRES (for symmetric indefinite ones) run on the operator's native arrays, so a CUDA tensor never
leaves the GPU; only per-column scalars come to the host (float64). A block ``b`` of shape
``(n, k)`` is ``k`` solves advanced in lockstep, one batched product (``A.matmat``) per iteration.

Honesty rules: ``residual`` is the true relative residual ``‖b − (A + λI)x‖ / ‖b‖``, recomputed
from ``x`` at the end (one more product per column), never CG's recursive estimate alone; and CG
that meets a direction of non-positive curvature raises :class:`NegativeCurvatureError` instead of
returning a wrong ``x``.

References: Hestenes & Stiefel (1952); Paige & Saunders, "Solution of sparse indefinite systems of
linear equations" (SINUM 1975).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvop._checks import require_finite
from curvop._progress import progress_bar
from curvop.arrays import asarray_like, column_dots, is_numpy, to_numpy
from curvop.eigen import ConvergenceWarning
from curvop.operator import HessianOperator, aslinearoperator
from curvop.sketch import IndefiniteOperatorError

__all__ = ["InverseOperator", "NegativeCurvatureError", "SolveResult", "inverse", "solve"]

Array = Any
_METHODS = ("cg", "minres")
_MAX_ITERATIONS = 10_000  # the default cap: min(10 n, this) iterations
_RESTARTS = 3  # CG restarts from the true residual when the recursive one drifted below tol


class NegativeCurvatureError(IndefiniteOperatorError):
    """CG met a direction ``p`` with ``pᵀ(A + λI)p ≤ 0``: the damped operator is not positive definite.

    ``direction_curvature`` is ``pᵀAp / pᵀp`` along that direction (so a damping above
    ``-direction_curvature`` makes it positive there).
    """

    def __init__(self, message: str, direction_curvature: float):
        super().__init__(message)
        self.direction_curvature = direction_curvature


@dataclass(frozen=True)
class SolveResult:
    """Result of :func:`solve`.

    Attributes
    ----------
    x : array
        The solution, of ``b``'s type (numpy in, numpy out; a native array stays on its device).
    residual : float or numpy array
        The true relative residual ``‖b − (A + λI)x‖ / ‖b‖`` (per column for a block ``b``).
    num_matvecs : int
        Products with ``A`` this call used (a block of ``k`` columns counts ``k`` per iteration).
    converged : bool
        Every column's ``residual <= tol``.
    method : str
    iterations : int
    """

    x: Array
    residual: Any
    num_matvecs: int
    converged: bool
    method: str
    iterations: int

    def __repr__(self) -> str:
        res = float(np.max(self.residual))
        return (f"SolveResult(method={self.method!r}, residual={res:.3g}, converged={self.converged}, "
                f"num_matvecs={self.num_matvecs}, iterations={self.iterations})")


def _scale(X: Array, c: np.ndarray) -> Array:
    """Columns of the native ``(n, k)`` ``X`` times the host ``c`` (``(k,)``)."""
    return X * asarray_like(np.asarray(c, dtype=np.float64)[None, :], X)


def _pick(old: Array, new: Array, take: np.ndarray) -> Array:
    """Columns of ``new`` where ``take``, of ``old`` elsewhere (native, no host copy of the vectors)."""
    if take.all():
        return new
    return _scale(new, take.astype(np.float64)) + _scale(old, (~take).astype(np.float64))


def _norms(X: Array) -> np.ndarray:
    return np.sqrt(np.maximum(column_dots(X, X), 0.0))


class _Damped:
    """``(A + λI) X`` on native blocks, counting iterations."""

    def __init__(self, A: HessianOperator, damping: float, bar: Any):
        self.A, self.damping, self.bar = A, float(damping), bar

    def __call__(self, X: Array) -> Array:
        Y = self.A.matmat(X)
        self.bar.update(X.shape[1])
        return Y if self.damping == 0.0 else Y + self.damping * X


def _cg(Ad: _Damped, B: Array, X: Array, R: Array, target: np.ndarray, max_iter: int) -> tuple[Array, int]:
    """Block CG from ``X`` with residual ``R`` until every ``‖r_j‖ <= target_j`` (recursive residuals)."""
    rr = column_dots(R, R)
    active = np.sqrt(rr) > target
    P, it = R, 0
    while active.any() and it < max_iter:
        AP = Ad(P)
        pAp = column_dots(P, AP)
        require_finite(pAp, "curvop.solve(method='cg')")
        bad = np.flatnonzero(active & (pAp <= 0))
        if bad.size:
            j = int(bad[0])
            pp = float(column_dots(P[:, j:j + 1], P[:, j:j + 1])[0])
            q = pAp[j] / pp - Ad.damping  # pᵀAp / pᵀp, the curvature of A itself along p
            raise NegativeCurvatureError(
                f"CG met negative curvature: pᵀ(A + {Ad.damping:g}·I)p = {pAp[j]:.3g} <= 0 along a search direction "
                f"(column {j}, iteration {it + 1}), so A + damping·I is not positive definite and CG cannot solve it. "
                f"Use method='minres' (symmetric indefinite systems), or a damping above {-q:.3g} (A's curvature along "
                "that direction; the smallest eigenvalue of A may be lower still)", float(q))
        alpha = np.where(active, rr / np.where(active, pAp, 1.0), 0.0)
        X = X + _scale(P, alpha)
        R = R - _scale(AP, alpha)
        rr_new = column_dots(R, R)
        beta = np.where(active, rr_new / np.where(rr > 0, rr, 1.0), 0.0)
        active = active & (np.sqrt(rr_new) > target)
        P = R + _scale(P, beta)
        rr, it = rr_new, it + 1
    return X, it


def _minres(Ad: _Damped, B: Array, X: Array, R: Array, target: np.ndarray, max_iter: int) -> tuple[Array, int]:
    """Block MINRES (Paige & Saunders) from ``X`` with residual ``R``; ``phibar`` is ``‖r‖``."""
    k = R.shape[1]
    beta1 = _norms(R)
    active = beta1 > target
    r1, r2, y = R, R, R
    oldb, beta, dbar, epsln, phibar = np.zeros(k), beta1.copy(), np.zeros(k), np.zeros(k), beta1.copy()
    cs, sn = -np.ones(k), np.zeros(k)
    w = w2 = R * 0
    it = 0
    tiny = np.finfo(np.float64).tiny
    # condition estimate max γ / min γ: at 0.1/eps the system is singular to working precision and a
    # column stops (Paige & Saunders' test): further steps would only blow up x along null directions
    eps = np.finfo(np.dtype(Ad.A.dtype)).eps
    gmax, gmin, limit = np.zeros(k), np.full(k, np.inf), 0.1 / eps
    tnorm2 = np.zeros(k)  # ‖T_k‖_F², the estimate of ‖A‖ of Paige & Saunders
    # the least-squares test's threshold: below the relative tolerance and below √eps, so that a
    # consistent but ill-conditioned system (‖Ar‖/‖A‖‖r‖ >= 1/cond) is not mistaken for an inconsistent one
    tol = np.minimum(np.divide(target, beta1, out=np.zeros(k), where=beta1 > 0), np.sqrt(eps))
    while active.any() and it < max_iter:
        it += 1
        s = np.where(active & (beta > tiny), 1.0 / np.where(beta > tiny, beta, 1.0), 0.0)
        v = _scale(y, s)
        y = Ad(v)
        if it >= 2:
            y = y - _scale(r1, np.where(oldb > tiny, beta / np.where(oldb > tiny, oldb, 1.0), 0.0))
        alfa = column_dots(v, y)
        require_finite(alfa, "curvop.solve(method='minres')")
        y = y - _scale(r2, np.where(beta > tiny, alfa / np.where(beta > tiny, beta, 1.0), 0.0))
        r1, r2 = r2, y
        oldb, beta = beta, _norms(r2)
        tnorm2 = tnorm2 + alfa ** 2 + oldb ** 2 + beta ** 2
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        # ‖A r‖ / (‖A‖ ‖r‖) of the current iterate: small means x already solves the least-squares
        # problem (b is not in A's range: a singular, inconsistent system); more steps only grow x
        least_squares = np.hypot(gbar, dbar) <= tol * np.sqrt(tnorm2)
        gamma = np.maximum(np.hypot(gbar, beta), tiny)
        gmax, gmin = np.where(active, np.maximum(gmax, gamma), gmax), np.where(active, np.minimum(gmin, gamma), gmin)
        active = active & (gmax < limit * gmin) & ~least_squares  # checked before the update
        cs, sn = gbar / gamma, beta / gamma
        phi = np.where(active, cs * phibar, 0.0)
        phibar = np.where(active, sn * phibar, phibar)
        w1, w2 = w2, w
        w = _scale(v - _scale(w1, oldeps) - _scale(w2, delta), 1.0 / gamma)
        X = X + _scale(w, phi)
        active = active & (phibar > target) & (beta > tiny)
    return X, it


def solve(A: Any, b: Any, *, damping: float = 0.0, method: str = "cg", tol: float = 1e-6,
          max_matvecs: int | None = None, x0: Any = None, progress: bool = False) -> SolveResult:
    """Solve ``(A + damping·I) x = b`` for a symmetric operator ``A``, matrix-free.

    Parameters
    ----------
    A : operator-like
        Anything :func:`curvop.aslinearoperator` accepts: a Hessian, GGN or Fisher operator, a
        matrix, your own operator.
    b : array, shape (n,) or (n, k)
        Right-hand side(s), numpy or the operator's native arrays; a block is ``k`` solves in
        lockstep (one batched product per iteration).
    damping : float
        ``λ >= 0`` added to the diagonal (Tikhonov/Levenberg-Marquardt damping, a prior precision).
    method : {"cg", "minres"}
        ``"cg"``: conjugate gradients, for positive definite ``A + λI``; raises
        :class:`NegativeCurvatureError` when it meets a direction with ``pᵀ(A + λI)p <= 0``.
        ``"minres"``: for symmetric indefinite systems (a Hessian away from a minimum); its
        residual never increases.
    tol : float
        Stop when the relative residual ``‖b − (A + λI)x‖ / ‖b‖`` of every column is at most ``tol``.
    max_matvecs : int, optional
        Budget of products with ``A`` (a block of ``k`` columns uses ``k`` per iteration). Default:
        ``k · min(10 n, 10000)``. The final residual check costs ``k`` more.
    x0 : array, optional
        Warm start (same shape as ``b``); e.g. the previous solution when ``A`` changed a little.
    progress : bool
        Show a tqdm bar of the products.

    Returns
    -------
    SolveResult
        ``x`` has ``b``'s type; ``residual`` is recomputed from ``x``, and ``converged`` is True only
        when it meets ``tol`` (a warning, :class:`~curvop.ConvergenceWarning`, says when not).

    Examples
    --------
    >>> import numpy as np, curvop
    >>> A = np.diag([1.0, 2.0, 4.0])
    >>> r = curvop.solve(A, np.ones(3), damping=1.0)
    >>> np.allclose(r.x, [1 / 2, 1 / 3, 1 / 5]), r.converged, r.residual < 1e-6
    (True, True, True)
    >>> curvop.solve(np.diag([1.0, -1.0]), np.ones(2), method="minres").x
    array([ 1., -1.])
    """
    A, damping = _checked(A, damping, method)
    if not (isinstance(tol, (int, float, np.floating)) and 0 < tol < 1):
        raise ValueError(f"tol must be a relative residual in (0, 1), got {tol!r}")
    n = A.shape[0]
    numpy_in = isinstance(b, (np.ndarray, list, tuple)) or np.isscalar(b)
    B = A.native(b)
    if len(B.shape) not in (1, 2) or B.shape[0] != n:
        raise ValueError(f"b must have shape ({n},) or ({n}, k), got {tuple(B.shape)}")
    vector = len(B.shape) == 1
    B = B[:, None] if vector else B
    k = int(B.shape[1])
    budget = k * min(10 * n, _MAX_ITERATIONS) if max_matvecs is None else int(max_matvecs)
    if budget < k:
        raise ValueError(f"max_matvecs must allow one product per column ({k}), got {max_matvecs!r}")
    start = A.num_matvecs
    bar = progress_bar(progress, budget + k, f"solve ({method})")
    Ad = _Damped(A, damping, bar)
    bnorm = _norms(B)
    target = tol * bnorm
    try:
        if x0 is None:
            X, R = B * 0, B
        else:
            X = A.native(x0)
            if tuple(X.shape) != tuple(B.shape[:1]) + (() if vector else (k,)):
                raise ValueError(f"x0 must have b's shape {tuple(B.shape[:1]) if vector else tuple(B.shape)}, "
                                 f"got {tuple(X.shape)}")
            X = X[:, None] if vector else X
            R = B - Ad(X)
        run = _cg if method == "cg" else _minres
        iterations = 0
        best = (X, R, _norms(R))  # per column, the iterate with the smallest true residual so far
        for _ in range(_RESTARTS + 1):
            left = (budget - (A.num_matvecs - start)) // k
            if left <= 0:
                break
            X, it = run(Ad, B, X, R, target, left)
            iterations += it
            if it == 0:  # R is already the true residual of X
                break
            R = B - Ad(X)  # the true residual, never the recursive estimate alone
            res = _norms(R)
            better = res < best[2]
            if better.any():
                best = (_pick(best[0], X, better), _pick(best[1], R, better), np.where(better, res, best[2]))
            if np.all(res <= target):
                break
            X, R = best[0], best[1]  # restart from the best iterate (drift, or a singular direction)
        X, R = best[0], best[1]
    finally:
        bar.close()
    res = _norms(R) / np.where(bnorm > 0, bnorm, 1.0)
    require_finite(res, f"curvop.solve(method={method!r})")
    converged = bool(np.all(res <= tol))
    if not converged:
        warnings.warn(f"curvop.solve({method!r}) stopped on its budget of {budget} products with relative residual "
                      f"{res.max():.3g} > tol={tol:g}; raise max_matvecs or damping", ConvergenceWarning, stacklevel=2)
    x = X[:, 0] if vector else X
    if numpy_in and not is_numpy(x):
        x = to_numpy(x)
    return SolveResult(x, float(res[0]) if vector else res, A.num_matvecs - start, converged, method, iterations)


class InverseOperator(HessianOperator):
    """``(A + damping·I)⁻¹`` as an operator: each product is a :func:`solve` (see :func:`inverse`).

    Products come back in the operator's native arrays like any operator's; the last solve's
    :class:`SolveResult` is :attr:`last`. An unconverged solve warns (:class:`~curvop.ConvergenceWarning`).
    """

    def __init__(self, A: HessianOperator, damping: float, method: str, tol: float, max_matvecs: int | None):
        super().__init__(A.backend)
        self.A, self.damping, self.method, self.tol, self.max_matvecs = A, float(damping), method, tol, max_matvecs
        self.last: SolveResult | None = None

    @property
    def is_psd(self) -> bool:
        """PSD when ``A`` is and the damping makes it invertible (``damping > 0``)."""
        return self.A.is_psd and self.damping > 0

    def _apply_native(self, x: Any) -> Any:
        shape = tuple(x.shape)
        n = self.shape[1]
        if len(shape) not in (1, 2) or shape[0] != n:
            raise ValueError(f"expected a vector of length {n} or an ({n}, k) matrix, got shape {shape}")
        self.num_matvecs += 1 if len(shape) == 1 else shape[1]
        self.last = solve(self.A, x, damping=self.damping, method=self.method, tol=self.tol,
                          max_matvecs=self.max_matvecs)
        return self.last.x

    def __repr__(self) -> str:
        n = self.shape[0]
        return (f"<{n}x{n} InverseOperator ((A + {self.damping:g}·I)⁻¹ by {self.method}, tol={self.tol:g}, of "
                f"{self.A.backend.describe()}), {self.num_matvecs} products so far>")


def inverse(A: Any, damping: float = 0.0, *, method: str = "cg", tol: float = 1e-6,
            max_matvecs: int | None = None) -> InverseOperator:
    """The operator ``(A + damping·I)⁻¹``, each product a :func:`solve` to relative residual ``tol``.

    Every algorithm runs on it: ``curvop.diagonal(curvop.inverse(G, damping=prior))`` estimates a
    Laplace posterior's variances, ``curvop.trace`` its total variance, ``curvop.eigenvalues`` the
    directions the posterior is widest in. ``max_matvecs`` bounds each solve.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> Ainv = curvop.inverse(np.diag([1.0, 3.0]), damping=1.0)
    >>> Ainv @ np.array([2.0, 4.0])
    array([1., 1.])
    >>> Ainv.to_dense()
    array([[0.5 , 0.  ],
           [0.  , 0.25]])
    """
    A, damping = _checked(A, damping, method)
    return InverseOperator(A, damping, method, tol, max_matvecs)


def _checked(A: Any, damping: Any, method: str) -> tuple[HessianOperator, float]:
    """``A`` as an operator and ``damping`` as a float, both checked, and ``method`` known."""
    if method not in _METHODS:
        raise ValueError(f"method must be 'cg' or 'minres', got {method!r}")
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return aslinearoperator(A), damping
