"""Randomized sketching shared by the trace and diagonal estimators.

The estimators of :mod:`curvop.trace_estimation` (Hutchinson, Hutch++, XTrace, XNysTrace) and
:mod:`curvop.diagonal_estimation` (Hutchinson, XDiag) are built from the same few pieces, written
here once:

* :func:`probe_block`: random probes ``Ω`` and their products ``HΩ`` in one block product;
* :func:`unit_blocks`: unit-vector blocks, for the exact answer when the budget reaches ``n``;
* :func:`range_sketch` and :func:`exchangeable_basis`: ``Y = HΩ``, its orthonormal basis ``Q`` and
  the leave-one-out vectors ``S`` that make every probe serve both as sketch and as test vector
  (XTrace, XDiag);
* :func:`deflation_gain`: how much deflating by a sketch would reduce the per-probe variance;
* :func:`shifted_nystrom`: the stable Nyström approximation of a positive semi-definite ``H``;
* :func:`pair_coefficients` and :func:`exchangeable_variance`: the standard error of an average of
  exchangeable leave-one-out estimates, which are correlated (leave-two-out corrections).

Vectors stay native (the operator's framework, dtype and device); only ``k × k`` matrices and
per-probe numbers come to the host, as float64.

>>> import numpy as np, curvop
>>> from curvop import sketch
>>> H = curvop.aslinearoperator(np.diag(np.arange(1.0, 51.0)))
>>> sk = sketch.range_sketch(H, 10, "rademacher", np.random.default_rng(0), "example")
>>> sk.Q.shape, sk.S.shape, H.num_matvecs
((50, 10), (10, 10), 10)

References: Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation" (SIMAX 2024).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np
import scipy.linalg

from curvop._checks import require_finite
from curvop.arrays import column_dots, gram, matmul, norm, orthonormalize

if TYPE_CHECKING:  # the sketch needs only the operator's methods, not the module
    from curvop.operator import HessianOperator

__all__ = [
    "IndefiniteOperatorError",
    "RangeSketch",
    "Nystrom",
    "probe_block",
    "unit_blocks",
    "exchangeable_basis",
    "range_sketch",
    "deflation_gain",
    "shifted_nystrom",
    "pair_coefficients",
    "exchangeable_variance",
]

Array = Any


class IndefiniteOperatorError(ValueError):
    """``method="xnystrace"`` was asked of an operator that is not positive semi-definite.

    >>> import numpy as np, curvop
    >>> try:
    ...     curvop.trace(np.diag(np.linspace(-1.0, 1.0, 50)), method="xnystrace", seed=0, num_matvecs=10)
    ... except curvop.IndefiniteOperatorError:
    ...     print("use method='auto' or 'xtrace'")
    use method='auto' or 'xtrace'
    """


def probe_block(H: HessianOperator, k: int, kind: str, rng: np.random.Generator) -> tuple[Array, Array]:
    """``(Ω, HΩ)`` for ``k`` native random probes of ``kind`` drawn from ``rng`` (``k`` products)."""
    Om = H.random((H.shape[0], k), kind, seed=rng)
    return Om, H.matmat(Om)


def unit_blocks(H: HessianOperator, chunk: int = 64) -> Iterator[tuple[int, Array, Array]]:
    """``(j, E, HE)`` for the unit-vector blocks ``E = I[:, j:j+k]``: ``n`` products in all.

    Used instead of a randomized estimate when the budget reaches ``n``: the exact answer then
    costs no more products than the estimate would.
    """
    n = H.shape[0]
    for j in range(0, n, chunk):
        k = min(chunk, n - j)
        e = np.zeros((n, k))
        e[np.arange(j, j + k), np.arange(k)] = 1.0
        E = H.from_numpy(e)
        yield j, E, H.matmat(E)


def exchangeable_basis(Y: Array) -> tuple[Array, np.ndarray, np.ndarray]:
    """Orthonormal basis of ``Y`` and the vectors that drop one column from it.

    With ``Y = QR`` (thin QR), let ``s_i`` be the ``i``-th column of ``R⁻ᵀ`` normalised to unit
    length. Then ``Q (I − s_i s_iᵀ) Qᵀ`` is the orthogonal projector onto the span of all
    columns of ``Y`` except the ``i``-th (``s_i`` is orthogonal to ``R e_j`` for ``j ≠ i``), so the
    ``k`` leave-one-out projectors of XTrace/XDiag cost one small ``k × k`` solve.

    Returns ``(Q, R, S)``: ``Q`` native ``(n, k)``, ``R = QᵀY`` and ``S`` float64 host ``(k, k)``.

    >>> import numpy as np
    >>> Q, R, S = exchangeable_basis(np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> np.round(np.abs(S.T @ R), 12)       # s_i is orthogonal to every column of Y but the i-th
    array([[0.70710678, 0.        ],
           [0.        , 1.        ]])
    """
    Q = orthonormalize(Y)
    R = gram(Q, Y)
    try:
        Rinv_t = np.linalg.inv(R).T
    except np.linalg.LinAlgError:
        Rinv_t = None
    with np.errstate(invalid="ignore", divide="ignore"):
        S = None if Rinv_t is None else Rinv_t / np.linalg.norm(Rinv_t, axis=0)
    if S is None or not np.all(np.isfinite(S)):  # Y of lower rank (a zero or low-rank H): no R⁻ᵀ
        S = _leave_one_out_vectors(R)
    return Q, R, S


def _leave_one_out_vectors(R: np.ndarray) -> np.ndarray:
    """Unit ``s_i`` orthogonal to every column of ``R`` but the ``i``-th, for a singular ``R``.

    ``s_i`` spans the left null space of ``R`` without column ``i``; where that space has more
    than one dimension (the other columns are themselves dependent, e.g. ``Y = 0``), the one
    closest to column ``i`` is taken, so ``s_iᵀRe_i`` keeps the part of ``y_i`` that the other
    columns do not explain (zero when there is none).
    """
    k = R.shape[1]
    S = np.zeros((R.shape[0], k))
    for i in range(k):
        others = np.delete(R, i, axis=1)
        U, sv, _ = np.linalg.svd(others, full_matrices=True)
        tol = max(others.shape) * np.finfo(np.float64).eps * (sv[0] if sv.size else 0.0)
        N = U[:, int(np.sum(sv > tol)):]  # orthonormal basis of the left null space of ``others``
        t = N.T @ R[:, i]
        nt = np.linalg.norm(t)
        S[:, i] = N @ (t / nt) if nt > 0 else N[:, 0]
    return S


class RangeSketch(NamedTuple):
    """``Y = HΩ`` with its exchangeable basis (host arrays are float64; see :func:`range_sketch`)."""

    Om: Array  # Ω, native (n, s)
    Y: Array  # HΩ, native (n, s)
    Q: Array  # orthonormal basis of Y, native (n, s)
    R: np.ndarray  # QᵀY
    S: np.ndarray  # leave-one-out vectors (exchangeable_basis)
    d: np.ndarray  # ωᵢᵀHωᵢ, the plain Hutchinson samples

    @property
    def loo_weights(self) -> np.ndarray:
        """``cᵢ = sᵢᵀRe_i``: the part of ``Hωᵢ`` outside ``span{Hω_j : j ≠ i}`` is ``cᵢ Q sᵢ``."""
        return np.einsum("ji,ji->i", self.S, self.R)


def range_sketch(H: HessianOperator, s: int, kind: str, rng: np.random.Generator, where: str) -> RangeSketch:
    """Sketch the range of ``H`` with ``s`` probes (``s`` products) and build the exchangeable basis.

    The per-probe numbers ``ωᵢᵀHωᵢ`` come to the host first and are checked: NaN or Inf in the
    products raises :class:`~curvop.backends.faults.NonFiniteProductError` naming ``where``.
    """
    Om, Y = probe_block(H, s, kind, rng)
    d = column_dots(Om, Y)
    require_finite(d, where)
    Q, R, S = exchangeable_basis(Y)
    return RangeSketch(Om, Y, Q, R, S, d)


def variance_ratio(S: np.ndarray, R: np.ndarray, W: np.ndarray, d: np.ndarray) -> float:
    """Sample variance of the deflated samples over that of the plain ones ``d`` (``W = QᵀΩ``)."""
    # (I−P₋ᵢ)Hωᵢ = Q sᵢ (sᵢᵀRe_i), so ωᵢᵀ(I−P₋ᵢ)Hωᵢ = (sᵢᵀWe_i)(sᵢᵀRe_i)
    e = np.einsum("ji,ji->i", S, W) * np.einsum("ji,ji->i", S, R)
    vd = float(np.var(d, ddof=1))
    return float(np.var(e, ddof=1)) / vd if vd > 0 else float("inf")


def deflation_gain(Om: Array, Y: Array, basis: tuple[Array, np.ndarray, np.ndarray]) -> float:
    """How much deflating by the sketch ``Y = HΩ`` shrinks the per-probe variance, from ``Y`` alone.

    ``ωᵢᵀHωᵢ`` are plain Hutchinson samples; ``ωᵢᵀ(I−P₋ᵢ)Hωᵢ`` are unbiased samples of the
    deflated remainder (``P₋ᵢ`` is independent of ``ωᵢ``), and equal ``(sᵢᵀQᵀωᵢ)(sᵢᵀRe_i)``
    (``basis = (Q, R, S)`` from :func:`exchangeable_basis`), so no product is spent. Returns the
    ratio of their sample variances: near 1 or above on a flat spectrum (deflation removes
    nothing), near 0 when a few directions carry the trace.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> U, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    >>> Om = rng.choice([-1.0, 1.0], size=(100, 10))
    >>> for lam in (0.5 ** np.arange(100.0), np.linspace(1.0, 2.0, 100)):   # decaying, then flat
    ...     Y = ((U * lam) @ U.T) @ Om
    ...     print(f"{deflation_gain(Om, Y, exchangeable_basis(Y)):.1e}")
    2.5e-05
    3.2e+00
    """
    Q, R, S = basis
    return variance_ratio(S, R, gram(Q, Om), column_dots(Om, Y))


class Nystrom(NamedTuple):
    """Shifted Nyström approximation ``FFᵀ`` of ``H + νI`` from ``Y = HΩ`` (:func:`shifted_nystrom`)."""

    F: Array  # Y_ν C⁻¹, native (n, m)
    Cinv: np.ndarray  # C⁻¹, C upper triangular with CᵀC = Ωᵀ(H + νI)Ω
    nu: float  # the shift ν


def shifted_nystrom(Om: Array, Y: Array, dtype: Any, where: str) -> Nystrom:
    """The Nyström approximation of a PSD ``H + νI`` with the tiny shift that makes it stable.

    With ``Y = HΩ``, the shift ``ν = √n·eps·‖Y‖`` makes ``Y_ν = Y + νΩ = (H + νI)Ω`` and
    ``G_ν = ΩᵀY_ν`` positive definite for any PSD ``H`` (also of rank below ``m``); ``G_ν = CᵀC``
    (Cholesky) and ``F = Y_ν C⁻¹`` give ``FFᵀ ≈ H + νI`` (Epperly, Tropp & Webber); ``ν`` is at
    least ``sqrt(tiny)`` of the dtype, so ``Y = 0`` (a zero ``H``) works too. A Cholesky
    failure means ``ΩᵀHΩ`` has a negative eigenvalue below rounding: ``H`` is not PSD, and
    :class:`IndefiniteOperatorError` says so (never a silently wrong result). ``dtype`` is the
    operator's (it sets ``eps``); NaN or Inf in ``ΩᵀY`` raises ``NonFiniteProductError``.
    """
    n, m = Om.shape
    G = gram(Om, Y)
    require_finite(G, where)
    dt = np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.dtype(np.float64)
    # ν > 0 always: Y = 0 (a zero H on the probes) would give ν = 0 and a singular G_ν
    nu = max(float(np.sqrt(n) * np.finfo(dt).eps * norm(Y)), float(np.sqrt(np.finfo(dt).tiny)))
    G = (G + G.T) / 2 + nu * gram(Om, Om)
    try:
        C = np.linalg.cholesky(G).T  # upper triangular, CᵀC = G_ν
    except np.linalg.LinAlgError:
        lam = np.linalg.eigvalsh(G)
        raise IndefiniteOperatorError(
            "method='xnystrace' needs a positive semi-definite operator, but ΩᵀHΩ for the probes is "
            f"not (its eigenvalues range from {lam[0]:.4g} to {lam[-1]:.4g}): H is indefinite, as a "
            "Hessian away from a minimum usually is. Use method='auto' or 'xtrace', which work for "
            "any symmetric H."
        ) from None
    Cinv = scipy.linalg.solve_triangular(C, np.eye(m))
    return Nystrom(matmul(Y + Om * nu, Cinv), Cinv, nu)


def pair_coefficients(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, q)`` with ``v_ij = p_ij s_j + q_ij s_i``: what leaving out probe ``j`` too removes.

    The leave-one-out projector ``P₋ᵢ = Q (I − sᵢsᵢᵀ) Qᵀ`` (:func:`exchangeable_basis`) loses one
    more direction when column ``j`` of the sketch is dropped as well: ``P₋ᵢⱼ = P₋ᵢ − Q v_ij v_ijᵀ Qᵀ``
    with ``v_ij`` the unit vector of ``span{sᵢ, sⱼ}`` orthogonal to ``sᵢ``. The same holds for the
    rows of ``C⁻¹`` of a Nyström sketch. Both matrices are ``k × k`` with zero diagonal.

    >>> import numpy as np
    >>> S = np.array([[1.0, 0.6], [0.0, 0.8]])
    >>> p, q = pair_coefficients(S)
    >>> p[0, 1] * S[:, 1] + q[0, 1] * S[:, 0]       # unit, orthogonal to s_0
    array([0., 1.])
    """
    g = S.T @ S
    np.fill_diagonal(g, 0.0)
    gap = 1.0 - g * g
    # sⱼ parallel to sᵢ (dependent sketch columns, to rounding): dropping j removes nothing more
    p = np.where(gap > 1e-12, 1.0 / np.sqrt(np.maximum(gap, 1e-12)), 0.0)
    np.fill_diagonal(p, 0.0)
    return p, -g * p


def exchangeable_variance(t: np.ndarray, D: np.ndarray) -> float:
    """Variance of ``mean(t)`` for exchangeable leave-one-out estimates ``t`` (never below ``var(t)/k``).

    XTrace and XNysTrace average ``k`` estimates ``tᵢ = tr + eᵢ`` where ``eᵢ`` has mean zero given
    the other probes (probe ``i`` is the test vector, the rest the sketch). Then
    ``Var(mean t) = E[s²]/k + c`` with ``s²`` the sample variance of the ``tᵢ`` and
    ``c = E[eᵢeⱼ]`` (``i ≠ j``) the covariance that ``s²/k`` alone misses: each probe is also in the
    other estimates' sketches. With ``tᵢ⁽⁻ʲ⁾`` the ``i``-th estimate from a sketch without probe
    ``j`` as well (a function of the probes but ``j``), ``E[eⱼ (tᵢ − tᵢ⁽⁻ʲ⁾)] = c``, and centring
    ``tⱼ`` on the mean of the other ``k − 2`` estimates keeps this nearly unbiased, so

    ``ĉ = Σ_{i≠j} ((k−1)tⱼ + tᵢ − Σt) (tᵢ − tᵢ⁽⁻ʲ⁾) / (k(k−1)(k−2))``.

    ``D[i, j] = tᵢ − tᵢ⁽⁻ʲ⁾`` (zero diagonal). Returns ``s²/k + ĉ``, or ``s²/k`` where ``ĉ`` is
    negative or not finite (a sketch of numerically dependent columns).

    >>> import numpy as np
    >>> t = np.array([1.0, 2.0, 3.0, 4.0])
    >>> exchangeable_variance(t, np.zeros((4, 4))), float(t.var(ddof=1) / 4)      # independent
    (0.4166666666666667, 0.4166666666666667)
    """
    k = t.size
    plain = float(np.var(t, ddof=1)) / k if k > 1 else float("inf")
    if k < 3:
        return plain
    w = (k - 1) * t[None, :] + t[:, None] - t.sum()
    with np.errstate(all="ignore"):
        c = float(np.sum(w * D)) / (k * (k - 1) * (k - 2))
    return plain + c if np.isfinite(c) and c > 0 else plain
