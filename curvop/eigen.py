"""Extreme eigenvalues of a Hessian operator: restarted Lanczos and deflated power iteration.

The Lanczos recurrence and its thick restart live in :mod:`curvop.krylov`; this module holds the
public entry point, the warm start, the basis memory bound and PyHessian's power iteration. Both
methods are written against :mod:`curvop.arrays` only, so they run unchanged on numpy arrays and
on every backend's native tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from curvop._progress import progress_bar
from curvop.arrays import column_dots, dot, matmul, norm, project_out, stack
from curvop.krylov import TOL_ON, KrylovProblem, check_location, eigenvalue_errors, order_by, thick_restart
from curvop.operator import HessianOperator, aslinearoperator
from curvop._checks import check_flag, check_float_dtype, check_int, check_positive
from curvop._checks import require_finite as _require_finite

__all__ = ["EigenResult", "ConvergenceWarning", "eigenvalues", "array_summary", "default_basis_budget"]

Array = Any
_WHICH = ("LA", "SA", "LM")


class ConvergenceWarning(UserWarning):
    """An iterative method stopped on its budget before meeting its tolerance.

    The result is still returned (with ``converged=False``); turn the warning into an error with
    ``warnings.simplefilter("error", curvop.ConvergenceWarning)``.

    >>> import warnings, numpy as np, curvop
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     r = curvop.eigenvalues(np.diag(np.linspace(1.0, 2.0, 300)), max_matvecs=10, seed=0)
    >>> r.converged, caught[0].category.__name__
    (False, 'ConvergenceWarning')
    """


def array_summary(x: Any) -> str:
    """``<torch.Tensor (100, 3) float32>``: an array's type, shape and dtype, not its contents.

    Used by the results' reprs, so printing a result never prints a model-sized vector.

    >>> import numpy as np
    >>> array_summary(np.zeros((100, 3)))
    '<numpy.ndarray (100, 3) float64>'
    """
    t = type(x)
    dtype = str(getattr(x.dtype, "name", None) or x.dtype).split(".")[-1]
    return f"<{t.__module__.split('.')[0]}.{t.__name__} {tuple(int(d) for d in x.shape)} {dtype}>"


def _values(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a, dtype=np.float64), threshold=8, edgeitems=3, separator=", ",
                           formatter={"float_kind": lambda v: f"{v:.6g}"})


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Result of :func:`eigenvalues`.

    Attributes
    ----------
    eigenvalues : numpy.ndarray, float64, shape (k,)
        Ordered by ``which``: largest first ("LA"), most negative first ("SA"), largest
        magnitude first ("LM").
    eigenvectors : array, shape (n, k)
        Unit-norm eigenvectors, of the operator's native array type (numpy, torch, ...).
    residual_norms : numpy.ndarray, shape (k,)
        ``‖H v_i − λ_i v_i‖``. Computed explicitly with ``k`` extra products when the result
        was verified (``verify=True``, the default), else the Lanczos estimate ``|β_m y_{m,i}|``
        (for power iteration they are always explicit).
    num_matvecs : int
        Hessian-vector products this call used (verification included).
    converged : bool
        Lanczos: all ``k`` residuals (``tol_on="residual"``) or eigenvalue errors
        (``tol_on="eigenvalue"``) are at most ``tol · max(|λ_i|, sqrt(eps)·‖T‖)``. Power
        iteration: every vector met ``‖(I − EEᵀ)Hv − λv‖ ≤ tol·|λ|`` on its deflated operator.
    method, which : str
    eigenvalue_errors : numpy.ndarray, shape (k,)
        Estimated ``|λ_i − θ_i|``: ``min(‖r_i‖, ‖r_i‖²/δ_i)`` from ``residual_norms`` and the
        safeguarded Ritz gap ``δ_i`` (:func:`curvop.krylov.ritz_gaps`); an estimate, not a bound
        (it trusts the Ritz values for the rest of the spectrum). Power iteration: the residual norms.
    tol_on : {"residual", "eigenvalue"}
        The convergence test used.
    """

    eigenvalues: np.ndarray
    eigenvectors: Array
    residual_norms: np.ndarray
    num_matvecs: int
    converged: bool
    method: str = "lanczos"
    which: str = "LA"
    eigenvalue_errors: np.ndarray | None = None
    tol_on: str = "residual"

    def __repr__(self) -> str:
        res = float(np.max(self.residual_norms)) if np.size(self.residual_norms) else 0.0
        errs = self.residual_norms if self.eigenvalue_errors is None else self.eigenvalue_errors
        err = float(np.max(errs)) if np.size(errs) else 0.0
        return (
            f"EigenResult(eigenvalues={_values(self.eigenvalues)}, "
            f"eigenvectors={array_summary(self.eigenvectors)}, max_residual={res:.3g}, "
            f"max_eigenvalue_error={err:.3g}, num_matvecs={self.num_matvecs}, converged={self.converged}, "
            f"method={self.method!r}, which={self.which!r}, tol_on={self.tol_on!r})"
        )


# --------------------------------------------------------------------------------------------
# the memory bound: how many basis vectors a default call may keep
# --------------------------------------------------------------------------------------------
_SMALL_BASIS_BYTES = 256 * 2**20  # below this a basis is never the memory problem
_DEFAULT_BASIS_VECTORS = 4  # a training step holds >= 4 model-sized vectors: weights, gradient, 2 Adam moments


def _basis_bytes_per_vector(H: HessianOperator, basis_dtype: Any) -> int:
    return H.shape[0] * np.dtype(basis_dtype if basis_dtype is not None else H.dtype).itemsize


def default_basis_budget(vector_bytes: int) -> int:
    """Bytes a Krylov basis may take by default: ``max(256 MiB, 4 vectors)``.

    A model's training step holds at least four model-sized vectors besides its activations
    (weights, gradient and Adam's two moments); a Hessian product holds the weights, the gradient's
    graph and two vectors. So a basis of four vectors fits wherever the training step does, and
    small models (where 256 MiB holds the full default basis) are not restricted at all.

    >>> default_basis_budget(8 * 10**6) == 256 * 2**20, default_basis_budget(500 * 10**6)
    (True, 2000000000)
    """
    return max(_SMALL_BASIS_BYTES, _DEFAULT_BASIS_VECTORS * int(vector_bytes))


def _choose_ncv(H: HessianOperator, k: int, ncv: int | None, basis_dtype: Any,
                max_basis_bytes: int | None) -> int:
    """``ncv`` within the basis memory bound (see ``max_basis_bytes`` of :func:`eigenvalues`)."""
    n = H.shape[0]
    vec = _basis_bytes_per_vector(H, basis_dtype)
    model_vec = _basis_bytes_per_vector(H, None)  # the default bound counts model-sized vectors
    budget = default_basis_budget(model_vec) if max_basis_bytes is None else int(max_basis_bytes)
    fits = budget // vec
    if ncv is not None:
        if max_basis_bytes is not None and int(ncv) > fits:
            raise ValueError(
                f"ncv={ncv} basis vectors take {int(ncv) * vec / 2**20:.1f} MiB, above "
                f"max_basis_bytes={budget} ({fits} vectors of {vec / 2**20:.1f} MiB); lower ncv, raise "
                "max_basis_bytes, or store the basis in a smaller dtype (basis_dtype='float32')"
            )
        return int(ncv)
    if max_basis_bytes is not None and fits < k + 1:
        raise ValueError(
            f"max_basis_bytes={budget} holds {fits} basis vectors of {vec / 2**20:.1f} MiB, but k={k} "
            f"eigenpairs need at least k + 1 = {k + 1}; raise max_basis_bytes or use a smaller basis_dtype"
        )
    low = k + 1 if max_basis_bytes is not None else k + 2
    return min(n, max(low, min(max(2 * k + 1, 20), fits)))


#: weight of the random unit vector mixed into a warm start, relative to the (unit) warm direction
WARM_START_NOISE = 1.0


def _warm_start(H: HessianOperator, v0: Any, rng: np.random.Generator) -> Array:
    """One start vector from ``v0`` (vector, ``(n, p)`` block or EigenResult), native, unit norm.

    The columns are normalised and summed (a "combined" start: its Krylov space holds every column's
    direction after a few steps, and the single-vector Lanczos relation stays exact), then a random
    unit vector of weight :data:`WARM_START_NOISE` (1: as much as the warm direction) is added.
    A start must never confine the solve to the invariant subspace it lies in: from an exact
    eigenvector of λ₂ plus a share of ``sqrt(eps)``, the residual test passed at λ₂ (converged)
    long before λ₁ had grown out of the noise (issue 26). With equal weights every eigenvector
    keeps about ``1/√2`` of the share a random start gives it, whatever ``v0`` is, and a warm
    direction close to the wanted one still saves most of what it can: ``benchmarks/warm_start.py
    --noise`` measures the cost of each weight (docs/training.md).
    """
    n = H.shape[0]
    V = v0.eigenvectors if isinstance(v0, EigenResult) else v0
    try:
        V = H.native(V)  # native: dtype and device checked; numpy or a list: converted
    except TypeError as err:
        if str(err).startswith("H.native"):  # neither numpy-convertible nor native
            raise TypeError(_V0_HELP.format(f"a {type(V).__name__}")) from err
        raise TypeError(f"v0: {err}") from None
    except ValueError as err:
        raise ValueError(f"v0: {err}") from None
    if len(V.shape) not in (1, 2) or V.shape[0] != n or (len(V.shape) == 2 and V.shape[1] < 1):
        raise ValueError(f"v0 must have shape ({n},) or ({n}, p) for this operator, got {tuple(V.shape)}")
    if len(V.shape) == 1:
        V = stack([V], axis=1)
    norms = np.sqrt(column_dots(V, V))
    if not np.all(np.isfinite(norms)):
        raise ValueError("v0 contains NaN or Inf; pass finite start vectors")
    if not np.any(norms > 0):
        raise ValueError("v0 is zero; pass a nonzero start vector (or v0=None for a random start)")
    q = matmul(V, np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0))
    if not norm(q) > 0:
        raise ValueError("the normalised columns of v0 cancel (their sum is zero); pass independent vectors")
    r = H.random(n, "gaussian", seed=rng)
    return q / norm(q) + r * (WARM_START_NOISE / norm(r))


def _start(H: HessianOperator, v0: Any, rng: np.random.Generator) -> Array:
    """The unit start vector: random (gaussian, from ``rng``), or the warm start from ``v0``."""
    q = H.random(H.shape[0], "gaussian", seed=rng) if v0 is None else _warm_start(H, v0, rng)
    return q / norm(q)


_V0_HELP = ("v0 must be a vector, an (n, p) block or an EigenResult, as numpy or the operator's own "
            "array type; got {}")


def _power(H, k, which, tol, max_matvecs, rng, bar):
    """Deflated power iteration as in PyHessian, stopped on the residual.

    Vector ``i`` iterates on the deflated operator ``(I − EEᵀ)H`` (``E`` the vectors found so far)
    and stops when ``‖(I − EEᵀ)Hv − λv‖ ≤ tol·|λ|``. Returned residuals are the true ``‖Hv − λv‖``;
    for later vectors they cannot be smaller than the error left in the earlier ones.
    """
    n = H.shape[0]
    lams, vecs, res, conv, used = [], [], [], [], 0
    for i in range(k):
        E = stack(vecs, axis=1) if vecs else None
        v = H.random(n, "gaussian", seed=rng)
        v = project_out(project_out(v, E), E) if E is not None else v
        v = v / norm(v)
        lam, r, ok = 0.0, np.inf, False
        for _ in range((max_matvecs - used) // (k - i)):
            Hv = H.matvec(v)
            used += 1
            bar.update(1)
            lam = dot(v, Hv)
            _require_finite((lam,), "curvop.eigenvalues(method='power')")
            r = norm(Hv - v * lam)
            _require_finite((r,), "curvop.eigenvalues(method='power')")
            u = v  # the vector lam and r belong to (v moves on below)
            PHv = project_out(project_out(Hv, E), E) if E is not None else Hv
            ok = (r if E is None else norm(PHv - v * lam)) <= tol * abs(lam)
            if ok:
                break
            v = PHv / norm(PHv)
        lams.append(lam)
        vecs.append(u)
        res.append(r)
        conv.append(ok)
    return np.asarray(lams), stack(vecs, axis=1), np.asarray(res), bool(all(conv))


def eigenvalues(
    H: Any,
    k: int = 1,
    which: str = "LA",
    *,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    verify: bool = True,
    seed: Any = None,
    progress: bool = False,
    v0: Any = None,
    basis_location: str = "device",
    basis_dtype: Any = None,
    max_basis_bytes: int | None = None,
    tol_on: str = "residual",
) -> EigenResult:
    """The ``k`` extreme eigenvalues and eigenvectors of a symmetric operator.

    Parameters
    ----------
    H : operator-like
        A :class:`curvop.HessianOperator`, a scipy ``LinearOperator``, a dense square matrix of any
        supported framework, or anything else :func:`curvop.aslinearoperator` accepts.
    k : int
        Number of eigenpairs, ``1 <= k <= n`` (``k = n``: the whole spectrum, e.g. of a 1×1 operator).
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest algebraic (most negative: saddle detection), largest magnitude.
    method : {"lanczos", "power"}
        ``"lanczos"``: thick-restart Lanczos with full reorthogonalisation (twice) on a basis of
        ``ncv`` vectors (default ``min(n, max(2k + 1, 20))``, fewer where that basis would exceed
        ``max_basis_bytes``); Ritz values from a float64 host
        eigensolve; convergence judged on the residual estimate ``|β_m y_{m,i}|`` from the Lanczos
        relation. ``"power"``: PyHessian's deflated power iteration (dominant eigenvalues, so only
        ``which="LM"``), each vector stopped on its residual; the budget is shared equally among
        the k vectors still to find.
    tol : float
        Relative accuracy, of the residual or of the eigenvalue (``tol_on``): converged when
        ``‖Hv − λv‖`` (or the eigenvalue error estimate) is at most ``tol · max(|λ|, sqrt(eps)·‖T‖)``
        (``‖T‖`` the largest Ritz value magnitude; power iteration uses ``tol·|λ|``). Default 1e-6.
    tol_on : {"residual", "eigenvalue"}
        What ``tol`` bounds. ``"residual"`` (default): the residual ``‖Hv − λv‖``, which makes the
        eigenvectors accurate too. ``"eigenvalue"`` (Lanczos only): the estimated eigenvalue error
        ``min(‖r‖, ‖r‖²/δ)`` (``eigenvalue_errors``), ``δ`` the distance to the nearest other Ritz
        value less that value's residual, but at most ``0.05·|λ|``
        (:func:`curvop.krylov.ritz_gaps`). Second order in the residual, so it stops at residuals
        near ``sqrt(tol·δ)``: fewer products where only the eigenvalue matters (a sharpness
        tracker; docs/training.md measures it). When it can be wrong: ``δ`` trusts the Ritz
        values for the rest of the spectrum, so an eigenvalue the Krylov space has not resolved
        yet, closer to ``λ`` than ``δ``, makes the error exceed ``tol`` by up to the factor
        ``δ / (its distance)``; as long as ``λ`` is still the eigenvalue nearest the result, the
        error stays below the accepted residual, at most ``sqrt(0.05·tol)·|λ|`` (7e-3 at
        ``tol=1e-3``) and below the distance to that eigenvalue plus ``tol``. Like the residual test, it cannot
        see an eigenvalue whose eigenvector is (almost) missing from the start vector, and since
        it stops earlier it gives a random start's small share less time to grow: on one Hessian
        it settled on λ₂ from 2 of 200 random starts, the residual rule from none (docs/training.md).
    max_matvecs : int, optional
        Products this call may use in all (default ``max(200, 40 k)``), the ``k`` verification
        products included; at least ``k`` (``2k`` for Lanczos with ``verify=True``).
    verify : bool
        Lanczos only: recompute the residuals explicitly with one block product of ``k`` columns
        (``k`` products of the budget, counted in ``num_matvecs``) and judge ``converged`` on them
        (with ``tol_on="eigenvalue"``: on the error estimates from the explicit residuals and
        the last Ritz gaps).
    seed : int, numpy Generator or None
        Start vectors are generated on the host from it, so every backend gets the same ones.
    progress : bool
        Show a tqdm bar of the products.
    v0 : array (n,) or (n, p), or EigenResult, optional
        Warm start (scipy's name), numpy or the operator's native array type: a vector, a block
        of vectors, or a previous result (its eigenvectors), e.g. the Hessian's at the previous
        training step. Lanczos starts from one combined vector, the sum of the normalised columns
        plus a random unit vector of the same weight, so that no ``v0`` confines the solve to the
        subspace it lies in (an exact eigenvector of λ₂ would otherwise return λ₂, converged,
        under either ``tol_on``). One combined vector rather than a block: a block start
        costs one product per column and did not pay in ``benchmarks/warm_start.py`` (what warm
        starts save, and why: docs/training.md). Lanczos only.
    basis_location : {"device", "host"}
        Lanczos only: where the preallocated basis lives, the operator's device or host memory
        (products still run on the device; each reorthogonalisation moves two vectors).
    basis_dtype : dtype name, optional
        Lanczos only: the basis storage dtype (default the operator's); ``"float32"`` halves a
        float64 basis at the price of orthogonality at float32 precision.
    max_basis_bytes : int, optional
        Lanczos only: the most memory the basis may take. Default ``max(256 MiB, 4 vectors)``
        (:func:`default_basis_budget`): the default ``ncv`` is lowered to fit (but kept >= ``k+2``),
        so the default call fits wherever the model's training step does. An explicit ``ncv``
        larger than an explicit bound is an error. docs/scale.md gives the peak memory of a call.

    Returns
    -------
    EigenResult
        Eigenvalues ordered by ``which`` (for both methods). When the budget ran out before every
        pair met ``tol``, a :class:`ConvergenceWarning` is issued and ``converged`` is False.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> r = curvop.eigenvalues(A, k=2, seed=0)
    >>> np.round(r.eigenvalues, 6), r.converged
    (array([100.,  99.]), True)

    Only the eigenvalue, to a relative 1e-3 (fewer products than the residual test):

    >>> r = curvop.eigenvalues(A, tol=1e-3, tol_on="eigenvalue", seed=0)
    >>> bool(abs(r.eigenvalues[0] - 100.0) <= 0.1), bool(r.eigenvalue_errors[0] <= 0.1)
    (True, True)
    """
    H = aslinearoperator(H)
    n = H.shape[0]
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)) or k < 1 or k > n:
        raise ValueError(f"k must be an integer with 1 <= k <= n = {n}, got k={k!r}")
    # every argument is checked here, also those the chosen method does not use
    tol = check_positive("tol", tol)
    max_matvecs = check_int("max_matvecs", max_matvecs, 1, optional=True)
    ncv = check_int("ncv", ncv, 2, optional=True)
    verify, progress = check_flag("verify", verify), check_flag("progress", progress)
    check_float_dtype("basis_dtype", basis_dtype)
    max_basis_bytes = check_int("max_basis_bytes", max_basis_bytes, 1, optional=True)
    if method == "power" and which != "LM":
        raise ValueError(
            "method='power' finds the dominant (largest magnitude) eigenvalues, as PyHessian does; "
            "pass which='LM', or use method='lanczos' for 'LA'/'SA'"
        )
    if tol_on not in TOL_ON:
        raise ValueError(f"tol_on must be one of {TOL_ON}, got {tol_on!r}")
    if tol_on == "eigenvalue" and method != "lanczos":
        raise ValueError(
            "tol_on='eigenvalue' estimates the eigenvalue error from Ritz gaps, which only "
            "method='lanczos' has; use method='lanczos' (any which) or tol_on='residual'"
        )
    if v0 is not None and method != "lanczos":
        raise ValueError("v0 (a warm start) is used by method='lanczos' only; drop v0 or use lanczos")
    max_matvecs = max(200, 40 * k) if max_matvecs is None else int(max_matvecs)
    checks = k if method == "lanczos" and verify else 0  # verification products, in the budget
    if max_matvecs < k + checks:
        raise ValueError(
            f"max_matvecs={max_matvecs} is too small for k={k} eigenpairs (need >= {k + checks}"
            + (f": {k} Lanczos steps and {k} verification products; or pass verify=False)" if checks else ")")
        )
    check_location(basis_location)
    if method == "lanczos":
        ncv = _choose_ncv(H, k, ncv, basis_dtype, max_basis_bytes)
    ncv = min(n, max(2 * k + 1, 20)) if ncv is None else int(ncv)
    if not (k < ncv <= n or k == ncv == n):
        raise ValueError(f"ncv must satisfy k < ncv <= n (or ncv = n when k = n), got ncv={ncv} (k={k}, n={n})")
    rng = H.rng(seed)  # the same probes on every rank
    start = H.num_matvecs
    bar = progress_bar(progress, max_matvecs, f"eigenvalues ({method})")
    try:
        if method == "lanczos":
            problem = KrylovProblem(k, which, tol, ncv, max_matvecs - checks, basis_location, basis_dtype,
                                    tol_on=tol_on)
            pairs = thick_restart(H, _start(H, v0, rng), problem, rng, bar.update)  # no reference kept here
            lam, V, res, scale = pairs.values, pairs.vectors, pairs.residuals, pairs.scales
            if verify:
                R = H.matmat(V) - V * H.from_numpy(lam)
                bar.update(k)
                res = np.sqrt(np.maximum(column_dots(R, R), 0.0))
            errs = eigenvalue_errors(res, pairs.gaps)
            converged = bool(np.all((errs if tol_on == "eigenvalue" else res) <= tol * scale))
        else:
            lam, V, res, converged = _power(H, k, which, tol, max_matvecs, rng, bar)
            order = order_by(lam, which)  # sorted as Lanczos's are
            lam, res, V = lam[order], res[order], stack([V[:, int(i)] for i in order], axis=1)
            errs = res
    finally:
        bar.close()
    if not converged:
        import warnings

        warnings.warn(
            f"curvop.eigenvalues(method={method!r}): "
            f"{'the eigenpair has not' if k == 1 else f'not all {k} eigenpairs'} met tol={tol:g} within "
            f"max_matvecs={max_matvecs} products (largest residual ‖Hv − λv‖ = {float(np.max(res)):.3g}"
            + (f", largest eigenvalue error estimate {float(np.max(errs)):.3g}" if tol_on == "eigenvalue" else "")
            + "); "
            "the result has converged=False. Raise max_matvecs (or ncv), or loosen tol.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=np.asarray(lam, dtype=np.float64),
        eigenvectors=V,
        residual_norms=np.asarray(res, dtype=np.float64),
        num_matvecs=H.num_matvecs - start,
        converged=converged,
        method=method,
        which=which,
        eigenvalue_errors=np.asarray(errs, dtype=np.float64),
        tol_on=tol_on,
    )
