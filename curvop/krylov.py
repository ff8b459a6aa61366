"""The Krylov core: one Lanczos recurrence, used by :func:`curvop.eigenvalues` and SLQ.

:func:`lanczos_step` is the only place where a Lanczos vector is multiplied by ``H`` and
orthogonalised. It works on a block of ``p`` *independent* runs in lockstep (one ``H.matmat`` per
step, column ``i`` orthogonalised against run ``i``'s basis only); a single vector is the block
case with one column, and takes ``H.matvec``. Two drivers use it:

* :func:`lanczos_tridiag` runs ``steps`` plain steps and returns one tridiagonal ``T`` per column
  (stochastic Lanczos quadrature, :func:`curvop.spectral_density`), with full or local
  reorthogonalisation;
* :func:`thick_restart` is the restarted eigensolver behind :func:`curvop.eigenvalues`.

Everything is written against :mod:`curvop.arrays`, so it runs on numpy and on every backend's
native arrays; the small projected problems are solved in float64 on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg

from curvop.arrays import Basis, asarray_like, column_dots, dot, norm
from curvop.operator import aslinearoperator
from curvop._checks import require_finite as _require_finite

__all__ = ["LanczosStep", "Tridiagonal", "lanczos_step", "lanczos_tridiag", "thick_restart", "KrylovProblem",
           "RitzPairs", "TOL_ON", "MAX_RELATIVE_GAP", "ritz_gaps", "eigenvalue_errors"]

Array = Any


def check_location(location: str) -> None:
    if location not in ("device", "host"):
        raise ValueError(
            f"basis_location must be 'device' (the operator's device) or 'host' (host memory, "
            f"products still on the device), got {location!r}"
        )


def breakdown_tol(H: Any, scale: float) -> float:
    """``β`` below ``eps^(2/3)·scale`` means an invariant subspace (eps of the operator's dtype).

    After full reorthogonalisation a vector in an invariant subspace leaves a residual of a few
    hundred ``eps·‖H‖``; ``eps^(2/3)`` (ARPACK's choice for similar thresholds) is safely above that
    and far below any ``β`` that still carries information.
    """
    dt = np.dtype(H.dtype) if np.dtype(H.dtype).kind == "f" else np.dtype(np.float64)
    return np.finfo(dt).eps ** (2.0 / 3.0) * max(scale, np.finfo(np.float64).tiny)


# --------------------------------------------------------------------------------------------
# the recurrence
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LanczosStep:
    """One Lanczos step of ``p`` runs: ``alpha = vᵀHv`` and the new residual ``W``, ``beta = ‖W‖``.

    ``W`` (same shape as the step's ``V``) is orthogonal to the basis but not normalised; ``alpha``
    and ``beta`` are float64 host arrays ``(p,)`` (``(1,)`` for a single vector). ``W`` and
    ``beta`` are None after a ``last`` step.
    """

    W: Array
    alpha: np.ndarray
    beta: np.ndarray | None

    def __repr__(self) -> str:
        return f"LanczosStep(alpha={self.alpha}, beta={self.beta})"


def _dots(X: Array, Y: Array) -> np.ndarray:
    return np.array([dot(X, Y)]) if len(X.shape) == 1 else column_dots(X, Y)


def _norms(X: Array) -> np.ndarray:
    return np.array([norm(X)]) if len(X.shape) == 1 else np.sqrt(np.maximum(column_dots(X, X), 0.0))


def lanczos_step(H: Any, V: Array, basis: Basis | None = None, prev: tuple[Array, np.ndarray] | None = None,
                 *, last: bool = False) -> LanczosStep:
    """Multiply the unit Lanczos vector(s) ``V`` by ``H`` and orthogonalise the result.

    ``V`` is a vector ``(n,)`` or a block ``(n, p)`` of independent runs. With a ``basis`` (a
    :class:`curvop.arrays.Basis` holding ``V`` and every earlier vector, ``runs=p`` for a block) the
    product is reorthogonalised against all of it, twice ("twice is enough"). Without one, the
    three-term recurrence ``W = HV − Vα − V_prev β_prev`` (``prev = (V_prev, β_prev)``) is followed by
    one more projection against ``V`` and ``V_prev`` (local reorthogonalisation: nothing stored).
    ``last=True`` computes ``alpha`` only. ``H`` is a :class:`curvop.HessianOperator`. Host syncs:
    ``alpha`` and ``beta``, one each per step.

    >>> import numpy as np, curvop
    >>> s = lanczos_step(curvop.aslinearoperator(np.diag([1.0, 2.0])), np.array([0.6, 0.8]))
    >>> round(float(s.alpha[0]), 6), round(float(s.beta[0]), 6)
    (1.64, 0.48)
    """
    W = H.matvec(V) if len(V.shape) == 1 else H.matmat(V)
    alpha = _dots(V, W)
    _require_finite(alpha, "curvop Lanczos")
    if last:
        return LanczosStep(None, alpha, None)
    if basis is not None:  # two statements, so the unprojected product is freed before the second
        W = basis.project_out(W)
        W = basis.project_out(W)
    else:  # three-term recurrence, then once more against the two vectors it used
        W = W - V * asarray_like(alpha, W)
        if prev is not None:
            W = W - prev[0] * asarray_like(prev[1], W)
        for U in (V,) if prev is None else (V, prev[0]):
            W = W - U * asarray_like(_dots(U, W), W)
    beta = _norms(W)
    _require_finite(beta, "curvop Lanczos")
    return LanczosStep(W, alpha, beta)


# --------------------------------------------------------------------------------------------
# driver 1: plain steps, one tridiagonal per run (stochastic Lanczos quadrature)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Tridiagonal:
    """The Lanczos matrix ``T`` of one run: diagonal ``alpha`` (m,), off-diagonal ``beta`` (m-1,)."""

    alpha: np.ndarray
    beta: np.ndarray

    def __repr__(self) -> str:
        return f"Tridiagonal(m={self.alpha.size})"

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values ``θ`` (ascending) and the eigenvectors ``U`` of ``T`` (float64)."""
        if self.alpha.size == 1:
            return self.alpha.copy(), np.ones((1, 1))
        return scipy.linalg.eigh_tridiagonal(self.alpha, self.beta)


def lanczos_tridiag(
    H: Any, V0: Array, steps: int, *, reorth: str = "full", basis_location: str = "device",
    basis_dtype: Any = None, return_basis: bool = False,
) -> tuple[tuple[Tridiagonal, ...], Array | None]:
    """``steps`` Lanczos steps from each column of ``V0`` (independent runs, in lockstep).

    Parameters
    ----------
    H : operator-like
        Anything :func:`curvop.aslinearoperator` accepts.
    V0 : array, shape (n,) or (n, p)
        Start vector(s), native or numpy; each is normalised here.
    steps : int
        Products per run (capped at ``n``). A run that reaches an invariant subspace
        (``β_j ≤ eps^(2/3)·max|T|``) stops there with fewer coefficients (its column is zeroed)
        while the others go on.
    reorth : {"full", "local"}
        ``"full"``: each run is reorthogonalised (twice) against its own basis, kept in a
        :class:`curvop.arrays.Basis` preallocated for ``steps`` vectors per run (``basis_location``,
        ``basis_dtype``). ``"local"``: against the previous two vectors only; nothing is stored,
        at the price of "ghost" copies of converged Ritz values (docs/scale.md measures the effect).
    return_basis : bool
        Also return the orthonormal basis ``Q`` (n, m) of a single start vector (native).

    Returns
    -------
    runs : tuple of :class:`Tridiagonal`, one per column
    Q : (n, m) native array, or None

    Examples
    --------
    >>> import numpy as np
    >>> (T,), _ = lanczos_tridiag(np.diag([1.0, 2.0, 3.0]), np.ones(3), 3)
    >>> np.round(T.eigh()[0], 8)
    array([1., 2., 3.])
    """
    H = aslinearoperator(H)
    V0 = H.native(V0)
    single = len(V0.shape) == 1
    n, p = V0.shape[0], 1 if single else V0.shape[1]
    steps = min(int(steps), n)
    if reorth not in ("full", "local"):
        raise ValueError(f"reorth must be 'full' or 'local', got {reorth!r}")
    if return_basis and (not single or reorth != "full"):
        raise ValueError("return_basis needs a single start vector and reorth='full'")
    check_location(basis_location)
    norms = _norms(V0)
    if not np.all(norms > 0):
        raise ValueError("the Lanczos start vectors must be nonzero")
    V = V0 * asarray_like(1.0 / norms, V0)
    V0 = None  # the caller's start block is not kept alive for the whole run
    basis = None
    if reorth == "full":
        basis = Basis(V, steps, location=basis_location, dtype=basis_dtype, runs=None if single else p)
        basis.append(V)
    prev = None
    alphas, betas = np.zeros((steps, p)), np.zeros((steps, p))
    length = np.full(p, steps)
    active = np.ones(p, dtype=bool)
    for j in range(steps):
        s = lanczos_step(H, V, basis, prev, last=j == steps - 1)
        alphas[j] = s.alpha
        if s.W is None:
            break
        stop = active & (s.beta <= breakdown_tol(H, max(np.abs(alphas[: j + 1]).max(), betas.max())))
        length[stop] = j + 1
        active &= ~stop
        if not active.any():
            break
        betas[j] = np.where(active, s.beta, 0.0)
        prev = (V, betas[j])
        V = s.W * asarray_like(np.where(active, 1.0 / np.where(active, s.beta, 1.0), 0.0), s.W)
        s = None  # free W before the next product
        if basis is not None:
            basis.append(V)
    runs = tuple(Tridiagonal(alphas[: length[i], i], betas[: length[i] - 1, i]) for i in range(p))
    return runs, (basis.native() if return_basis else None)


# --------------------------------------------------------------------------------------------
# driver 2: thick-restart Lanczos for a few extreme eigenpairs
# --------------------------------------------------------------------------------------------
def order_by(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices sorting ``theta`` by ``which``: "LA" largest first, "SA" smallest, "LM" magnitude."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


#: what ``tol`` bounds: the relative residual (default) or the relative eigenvalue error estimate
TOL_ON = ("residual", "eigenvalue")


@dataclass(frozen=True)
class KrylovProblem:
    """What :func:`thick_restart` solves: ``k`` pairs by ``which`` to ``tol`` on a basis of ``ncv``.

    ``tol_on`` picks the test (:data:`TOL_ON`): ``"residual"``, ``res_i <= tol·scale_i``, or
    ``"eigenvalue"``, ``eigenvalue_errors(res, gaps)_i <= tol·scale_i``.
    """

    k: int
    which: str
    tol: float
    ncv: int
    max_matvecs: int
    basis_location: str = "device"
    basis_dtype: Any = None
    tol_on: str = "residual"


@dataclass(frozen=True, eq=False)
class RitzPairs:
    """The wanted Ritz pairs: values (k,), vectors (n, k) native, residual estimates and their scales.

    ``residuals[i] <= tol * scales[i]`` is the residual test; ``gaps`` (k,) the safeguarded gaps of
    :func:`ritz_gaps`, with which :func:`eigenvalue_errors` turns residuals into eigenvalue error
    estimates (the eigenvalue test); ``num_matvecs`` the products used.
    """

    values: np.ndarray
    vectors: Array
    residuals: np.ndarray
    scales: np.ndarray
    num_matvecs: int
    gaps: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"RitzPairs(values={self.values}, num_matvecs={self.num_matvecs})"


@dataclass(frozen=True, eq=False)
class _Ritz:
    """Ritz pairs of the projected matrix ``T`` and the convergence test on the wanted ones."""

    theta: np.ndarray
    Y: np.ndarray
    order: np.ndarray
    res: np.ndarray
    scale: np.ndarray
    gap: np.ndarray  # ritz_gaps: the safeguarded gap of every Ritz value
    broke: bool  # β at an invariant subspace
    done: bool  # the wanted k pairs meet tol


def _eig(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the projected matrix: tridiagonal, or an arrowhead after a thick restart."""
    if T.shape[0] > 2 and np.any(np.triu(T, 2)):
        return scipy.linalg.eigh(T)
    if T.shape[0] == 1:
        return T.diagonal().copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(T.diagonal(), T.diagonal(1))


#: the largest gap, relative to ``|θ|``, that the eigenvalue test trusts (see :func:`ritz_gaps`)
MAX_RELATIVE_GAP = 0.05


def ritz_gaps(theta: np.ndarray, res: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Safeguarded gap of each Ritz value: ``δ_i = min(min_{j≠i} (|θ_i − θ_j| − r_j), 0.05·scale_i)``.

    The eigenvalue error bound ``|λ − θ_i| <= ‖r_i‖² / δ`` (Templates for the Solution of Algebraic
    Eigenvalue Problems, Bai et al. 2000, §4.8; Kato-Temple for an extreme pair) needs ``δ``, the
    distance from ``θ_i`` to every *other* eigenvalue. Ritz values only estimate it, and from the
    wrong side (interlacing: ``θ_2 <= λ_2``, so the Ritz gap of the top pair over-estimates the true
    one; an eigenvalue the Krylov space has not resolved yet is not seen at all). Two safeguards:
    each neighbour ``θ_j`` is moved towards ``θ_i`` by its own residual (an eigenvalue lies within
    ``r_j`` of ``θ_j``; early on, large residuals shrink the gap to nothing), and the gap is capped
    at :data:`MAX_RELATIVE_GAP` ``· scale_i`` (``scale_i`` about ``|θ_i|``): an unseen eigenvalue may
    lie that close. So no residual above ``sqrt(0.05·tol)·scale_i`` is ever accepted, and where
    ``θ_i`` is nearer ``λ_i`` than any other eigenvalue, ``|λ_i − θ_i| <= ‖r_i‖`` bounds the error
    even when the gap estimate is wrong. Why 0.05: docs/training.md ("Warm starts"). Zero (no
    estimate) where the gap closes or there is no other Ritz value.

    >>> ritz_gaps(np.array([1.0, 5.0]), np.array([0.5, 1.0]), np.array([20.0, 100.0]))
    array([1. , 3.5])
    """
    d = np.abs(theta[:, None] - theta[None, :]) - res[None, :]
    np.fill_diagonal(d, np.inf)
    gap = np.minimum(d.min(axis=1) if theta.size > 1 else np.zeros(theta.size), MAX_RELATIVE_GAP * scale)
    return np.maximum(gap, 0.0)


def eigenvalue_errors(res: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Eigenvalue error estimates ``min(‖r‖, ‖r‖² / δ)`` from residuals and :func:`ritz_gaps`.

    ``‖r‖`` alone always bounds the distance to the nearest eigenvalue; ``‖r‖²/δ`` is the
    second-order estimate, used where the gap is known (``δ > 0``).

    >>> eigenvalue_errors(np.array([1e-2, 1e-2]), np.array([0.5, 0.0]))
    array([0.0002, 0.01  ])
    """
    res = np.asarray(res, dtype=np.float64)
    safe = np.where(gaps > 0, gaps, 1.0)
    return np.where(gaps > 0, np.minimum(res, res * res / safe), res)


def _ritz(H: Any, T: np.ndarray, beta: float, P: KrylovProblem) -> _Ritz:
    """Ritz pairs of ``T`` and whether the wanted ones meet ``tol``.

    The residual test is ``|β yₘ| <= tol·max(|θ|, √eps‖T‖)``; the eigenvalue test puts
    :func:`eigenvalue_errors` of those residuals in place of ``|β yₘ|``.
    """
    eps = np.finfo(np.float64).eps
    m = T.shape[0]
    theta, Y = _eig(T)
    order = order_by(theta, P.which)
    tnorm = np.abs(theta).max()
    broke = bool(beta <= breakdown_tol(H, tnorm))
    res = np.abs((0.0 if broke else beta) * Y[m - 1, :])
    scale = np.maximum(np.abs(theta), np.sqrt(eps) * tnorm)
    gap = ritz_gaps(theta, res, scale)
    err = eigenvalue_errors(res, gap) if P.tol_on == "eigenvalue" else res
    done = m >= P.k and bool(np.all(err[order[: P.k]] <= P.tol * scale[order[: P.k]]))
    return _Ritz(theta, Y, order, res, scale, gap, broke, done)


def _grow(T: np.ndarray, coupling: np.ndarray, alpha: float) -> np.ndarray:
    m = T.shape[0] + 1
    out = np.zeros((m, m))
    out[: m - 1, : m - 1] = T
    out[m - 1, : m - 1] = out[: m - 1, m - 1] = coupling
    out[m - 1, m - 1] = alpha
    return out


def _fresh_direction(H: Any, B: Basis, rng: np.random.Generator) -> Array:
    """A random unit vector orthogonal to the basis ``B`` (to continue after an invariant subspace)."""
    r = B.project_out(B.project_out(H.random(H.shape[0], "gaussian", seed=rng)))
    return r / norm(r)


def _stored(Q: Basis, q: Array) -> Array:
    """``q``, just appended to ``Q``, as a view of the basis storage where possible: one vector less."""
    view = Q.newest()
    return q if view is None else view


def thick_restart(H: Any, q: Array, P: KrylovProblem, rng: np.random.Generator,
                  on_product: Callable[[int], Any] = lambda _: None) -> RitzPairs:
    """Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation, from the unit vector ``q``.

    Each cycle grows the basis to ``ncv`` vectors, judging convergence after every product; then
    the ``l = k + (ncv − k) // 2`` wanted Ritz vectors are kept together with the current residual
    direction and the iteration continues. Keeping Ritz vectors (rather than restarting from one
    combined vector) keeps nearly all of the spectral information of the cycle at the memory cost
    of ``ncv`` vectors, and converges almost like an unrestarted run of the same total length.
    The basis is preallocated (:class:`curvop.arrays.Basis`) and restarted in place. After an
    invariant subspace the run continues from a fresh random direction (``rng``), so repeated
    eigenvalues are found; ``on_product(1)`` is called after every product (a progress bar).
    """
    n = H.shape[0]
    Q = Basis(q, P.ncv, location=P.basis_location, dtype=P.basis_dtype)
    Q.append(q)
    q = _stored(Q, q)
    T, coupling = np.zeros((0, 0)), np.zeros(0)
    used, invariant = 0, False
    while True:
        while True:  # expand the basis
            s = lanczos_step(H, q, Q)
            used += 1
            on_product(1)
            T = _grow(T, coupling, float(s.alpha[0]))
            m, beta = T.shape[0], float(s.beta[0])
            R = _ritz(H, T, beta, P)
            # after a breakdown the Krylov space may miss copies of repeated eigenvalues (and Ritz
            # vectors of the closed block look converged): from then on, judge only at cycle ends
            invariant = invariant or R.broke
            if (R.done and not invariant) or m == P.ncv or used >= P.max_matvecs or m == n:
                break
            coupling = np.zeros(m)
            if R.broke:
                q = _fresh_direction(H, Q, rng)  # invariant subspace: decoupled new block
            else:
                q = s.W / beta
                coupling[m - 1] = beta
            Q.append(q)
            q, s = _stored(Q, q), None  # W is stored in Q: free it before the next product
        if R.done or used >= P.max_matvecs or m == n:
            break
        keep = R.order[: P.k + (m - P.k) // 2]  # thick restart
        Q.restart(R.Y[:, keep])
        T = np.diag(R.theta[keep])
        if R.broke:
            q, coupling = _fresh_direction(H, Q, rng), np.zeros(len(keep))
        else:
            q, coupling = s.W / beta, beta * R.Y[m - 1, keep]
        s = None  # free W before the next product
        Q.append(q)
        q = _stored(Q, q)
    sel = R.order[: P.k]
    return RitzPairs(R.theta[sel], Q.lincomb(R.Y[:, sel]), R.res[sel], R.scale[sel], used, R.gap[sel])
