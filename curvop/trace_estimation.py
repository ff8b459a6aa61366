"""Randomized trace estimation: Hutchinson, Hutch++, XTrace and XNysTrace.

All four methods use block products (``H.matmat``), so batched Hessian-vector products are used,
and keep vectors native; only ``k × k`` matrices and scalars come to the host (float64).

References: Hutchinson (1989); Meyer, Musco, Musco & Woodruff, "Hutch++" (SOSA 2021);
Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation" (SIMAX 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from curvop._progress import progress_bar
from curvop.arrays import column_dots, gram, lincomb, norm, orthonormalize, project_out
from curvop.operator import HessianOperator, aslinearoperator

__all__ = ["TraceResult", "trace", "exchangeable_basis", "deflation_gain", "IndefiniteOperatorError"]

_METHODS = ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace")
_MIN_MATVECS = {"auto": 6, "hutchinson": 2, "hutch++": 3, "xtrace": 4, "xnystrace": 2}
# "auto" runs XTrace when the deflated samples vary less than this fraction of the plain ones
# (calibrated on synthetic spectra: XTrace wins below ~0.3, Hutchinson above; module notes below).
_AUTO_VARIANCE_RATIO = 0.3


@dataclass(frozen=True)
class TraceResult:
    """Result of :func:`trace`.

    Attributes
    ----------
    estimate : float
    stderr : float
        Standard error of ``estimate``: the sample standard deviation (ddof=1) of the per-probe
        estimates divided by the square root of their number. For Hutchinson and the Hutchinson
        part of Hutch++ the samples are independent, so it is an honest error bar. For XTrace and
        XNysTrace the per-probe (leave-one-out) estimates are exchangeable but correlated; the
        same formula is the error estimate the XTrace paper recommends.
    num_matvecs : int
        Products this call used.
    method : str
        The method that ran: ``"exact"`` when the budget reached ``n`` (then ``stderr`` is 0).
    num_probes : int
        Number of per-probe estimates averaged (Hutchinson probes, Hutch++ residual probes,
        XTrace/XNysTrace test vectors; ``n`` unit vectors for ``"exact"``).
    converged : bool
        ``stderr <= rtol·|estimate|`` when ``rtol`` was given (always True otherwise).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    num_probes: int
    converged: bool = True


class IndefiniteOperatorError(ValueError):
    """``method="xnystrace"`` was asked of an operator that is not positive semi-definite.

    >>> import numpy as np, curvop
    >>> try:
    ...     curvop.trace(np.diag(np.linspace(-1.0, 1.0, 50)), method="xnystrace", seed=0, num_matvecs=10)
    ... except curvop.IndefiniteOperatorError:
    ...     print("use method='auto' or 'xtrace'")
    use method='auto' or 'xtrace'
    """


def _require_finite(values: Any, where: str) -> None:
    """Raise :class:`~curvop.backends.faults.NonFiniteProductError` unless every value is finite.

    ``values`` are host numbers already computed (no extra synchronisation); a tuple of floats
    takes a fast path, as this runs once per Lanczos step.
    """
    if isinstance(values, tuple) and all(map(math.isfinite, values)):
        return
    if not np.all(np.isfinite(values)):
        from curvop.backends.faults import NonFiniteProductError

        raise NonFiniteProductError(
            f"{where}: the Hessian-vector products contain NaN or Inf, so no result can be computed; "
            "check the loss on your data (NaN or Inf inputs, log of zero, overflow in float32) or "
            "the operator's product function"
        )


def _unit_blocks(H: HessianOperator, chunk: int = 64):
    """``(j, E, HE)`` for the unit-vector blocks ``E = I[:, j:j+k]`` of ``n`` products in all.

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


def _exact(H, bar):
    """``tr(H) = Σ_j e_jᵀHe_j`` from ``n`` products with unit vectors."""
    d = []
    for _, E, Y in _unit_blocks(H):
        d.append(column_dots(E, Y))
        bar.update(E.shape[1])
    return np.concatenate(d)


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    m = samples.size
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(m)) if m > 1 else float("inf")


def _hutchinson(H, m, probes, rng, rtol, bar):
    """Hutchinson's estimator ``mean_j z_jᵀ H z_j``; with ``rtol`` in blocks of 10 until precise."""
    n = H.shape[0]
    block = m if rtol is None else min(m, 10)
    samples = np.zeros(0)
    while samples.size < m:
        b = min(block, m - samples.size)
        Z = H.random((n, b), probes, seed=rng)
        samples = np.concatenate([samples, column_dots(Z, H.matmat(Z))])
        bar.update(b)
        _require_finite(samples, "curvop.trace(method='hutchinson')")
        if rtol is not None and samples.size >= 2:
            est, err = _mean_stderr(samples)
            if err <= rtol * abs(est):
                break
    return samples, 0.0


def _hutchpp(H, m, probes, rng, bar):
    """Hutch++: ``tr(QᵀHQ)`` on a sketch of ``m/3`` products plus Hutchinson on ``(I−QQᵀ)H(I−QQᵀ)``."""
    n = H.shape[0]
    s = m // 3
    g = m - 2 * s
    Q = orthonormalize(H.matmat(H.random((n, s), probes, seed=rng)))
    low_rank = float(column_dots(Q, H.matmat(Q)).sum())
    G = project_out(H.random((n, g), probes, seed=rng), Q)
    G = project_out(G, Q)
    samples = column_dots(G, H.matmat(G))
    bar.update(m)
    return samples, low_rank


def exchangeable_basis(Y: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """Orthonormal basis of ``Y`` and the vectors that drop one column from it.

    With ``Y = QR`` (thin QR), let ``s_i`` be the ``i``-th column of ``R⁻ᵀ`` normalised to unit
    length. Then ``Q (I − s_i s_iᵀ) Qᵀ`` is the orthogonal projector onto the span of all
    columns of ``Y`` except the ``i``-th (``s_i`` is orthogonal to ``R e_j`` for ``j ≠ i``), so the
    ``k`` leave-one-out projectors of XTrace/XDiag cost one small ``k × k`` solve.

    Returns ``(Q, R, S)``: ``Q`` native ``(n, k)``, ``R = QᵀY`` and ``S`` float64 host ``(k, k)``.
    """
    Q = orthonormalize(Y)
    R = gram(Q, Y)
    try:
        Rinv_t = np.linalg.inv(R).T
    except np.linalg.LinAlgError:
        Rinv_t = np.linalg.pinv(R).T
    S = Rinv_t / np.linalg.norm(Rinv_t, axis=0)
    return Q, R, S


class _Sketch(NamedTuple):
    """``Y = HΩ`` and what XTrace and :func:`deflation_gain` read off it (host arrays are float64)."""

    Om: Any  # Ω, native (n, s)
    Y: Any  # HΩ, native (n, s)
    Q: Any  # orthonormal basis of Y, native (n, s)
    R: np.ndarray  # QᵀY
    S: np.ndarray  # leave-one-out vectors (exchangeable_basis)
    W: np.ndarray  # QᵀΩ
    d: np.ndarray  # ωᵢᵀHωᵢ, the plain Hutchinson samples


def _sketch(H, s, probes, rng, bar) -> _Sketch:
    Om = H.random((H.shape[0], s), probes, seed=rng)
    Y = H.matmat(Om)
    bar.update(s)
    d = column_dots(Om, Y)
    _require_finite(d, "curvop.trace")
    Q, R, S = exchangeable_basis(Y)
    return _Sketch(Om, Y, Q, R, S, gram(Q, Om), d)


def _xtrace(H, m, probes, rng, bar):
    """XTrace: average over i of ``tr(H P₋ᵢ) + ωᵢᵀ(I−P₋ᵢ)H(I−P₋ᵢ)ωᵢ`` with ``P₋ᵢ`` the projector on
    ``span{Hω_j : j ≠ i}``, all from ``Y = HΩ`` and ``Z = HQ`` (``m/2`` products each)."""
    return _xtrace_finish(H, _sketch(H, m // 2, probes, rng, bar), bar)


def _xtrace_finish(H, sk: _Sketch, bar):
    """XTrace's second half: ``Z = HQ`` and the exchangeable estimates, given the sketch."""
    Om, _, Q, R, S, W, d = sk
    Z = H.matmat(Q)
    bar.update(Om.shape[1])
    M = gram(Q, Z)
    M = (M + M.T) / 2  # QᵀHQ
    T = gram(Z, Om)  # ZᵀΩ = QᵀHΩ
    sMs = np.einsum("ji,jk,ki->i", S, M, S)
    low_rank = np.trace(M) - sMs  # tr(H P₋ᵢ)
    c = np.einsum("ji,ji->i", S, W)  # s_iᵀ Qᵀ ω_i
    # ω̃ᵢ = ωᵢ − Q Wᵢ ; residual probe uᵢ = ω̃ᵢ + cᵢ Q sᵢ
    tt = d - np.einsum("ji,ji->i", T, W) - np.einsum("ji,ji->i", W, R) + np.einsum("ji,jk,ki->i", W, M, W)
    cross = np.einsum("ji,ji->i", S, R - M @ W)  # sᵢᵀQᵀHω̃ᵢ
    samples = low_rank + tt + 2 * c * cross + c**2 * sMs
    return samples, 0.0


def _variance_ratio(sk: _Sketch) -> float:
    # (I−P₋ᵢ)Hωᵢ = Q sᵢ (sᵢᵀRe_i), so ωᵢᵀ(I−P₋ᵢ)Hωᵢ = (sᵢᵀWe_i)(sᵢᵀRe_i)
    e = np.einsum("ji,ji->i", sk.S, sk.W) * np.einsum("ji,ji->i", sk.S, sk.R)
    vd = float(np.var(sk.d, ddof=1))
    return float(np.var(e, ddof=1)) / vd if vd > 0 else float("inf")


def deflation_gain(Om: Any, Y: Any, basis: tuple[Any, np.ndarray, np.ndarray]) -> float:
    """How much deflating by the sketch ``Y = HΩ`` shrinks the per-probe variance, from ``Y`` alone.

    ``ωᵢᵀHωᵢ`` are plain Hutchinson samples; ``ωᵢᵀ(I−P₋ᵢ)Hωᵢ`` are unbiased samples of the
    deflated remainder (``P₋ᵢ`` is independent of ``ωᵢ``), and equal ``(sᵢᵀQᵀωᵢ)(sᵢᵀRe_i)``
    (``basis = (Q, R, S)`` from :func:`exchangeable_basis`), so no product is spent. Returns the
    ratio of their sample variances: near 1 or above on a flat spectrum (deflation removes
    nothing), near 0 when a few directions carry the trace.
    """
    Q, R, S = basis
    return _variance_ratio(_Sketch(Om, Y, Q, R, S, gram(Q, Om), column_dots(Om, Y)))


def _auto(H, m, probes, rng, bar):
    """Sketch ``Y = HΩ`` with half the budget, then finish as XTrace if deflation pays
    (:func:`deflation_gain` below ``_AUTO_VARIANCE_RATIO``), else spend the rest on more
    Hutchinson probes and average them with the ``ωᵢᵀHωᵢ`` already in hand."""
    sk = _sketch(H, m // 2, probes, rng, bar)
    if _variance_ratio(sk) < _AUTO_VARIANCE_RATIO:
        return (*_xtrace_finish(H, sk, bar), "xtrace")
    Z = H.random((H.shape[0], m - m // 2), probes, seed=rng)
    samples = np.concatenate([sk.d, column_dots(Z, H.matmat(Z))])
    bar.update(m - m // 2)
    return samples, 0.0, "hutchinson"


def _xnystrace(H, m, probes, rng, bar):
    """XNysTrace for PSD ``H``: leave-one-out Nyström approximations ``Â₋ᵢ`` plus Hutchinson on
    ``H − Â₋ᵢ`` with probe ``ωᵢ``, with the shifted (stable) Nyström approximation that
    Epperly, Tropp & Webber recommend for XNysTrace.

    With ``Y = HΩ``, a tiny shift ``ν = √n·eps·‖Y‖`` makes ``Y_ν = Y + νΩ = (H + νI)Ω`` and
    ``G_ν = ΩᵀY_ν`` positive definite for any PSD ``H`` (also of rank below ``m``); ``G_ν = CᵀC``
    (Cholesky) and ``F = Y_ν C⁻¹`` give the Nyström approximation ``FFᵀ`` of ``H + νI``. With
    ``rᵢ`` the ``i``-th row of ``C⁻¹`` the ``i``-th estimate of ``tr(H + νI)`` is
    ``‖F‖² − ‖Frᵢ‖²/‖rᵢ‖² + 1/‖rᵢ‖²``; subtracting ``ν‖ωᵢ‖²`` removes the shift exactly. A
    Cholesky failure means ``ΩᵀHΩ`` has a negative eigenvalue below rounding: ``H`` is not PSD,
    and :class:`IndefiniteOperatorError` says so (never a silently wrong estimate).
    """
    import scipy.linalg

    n = H.shape[0]
    Om = H.random((n, m), probes, seed=rng)
    Y = H.matmat(Om)
    bar.update(m)
    G = gram(Om, Y)
    _require_finite(G, "curvop.trace(method='xnystrace')")
    dt = np.dtype(H.dtype) if np.dtype(H.dtype).kind == "f" else np.dtype(np.float64)
    nu = np.sqrt(n) * np.finfo(dt).eps * norm(Y)
    om2 = column_dots(Om, Om)
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
    F = lincomb(Y + Om * float(nu), Cinv)  # Y_ν C⁻¹
    B = gram(F, F)
    B = (B + B.T) / 2
    r2 = np.einsum("ij,ij->i", Cinv, Cinv)  # ‖rᵢ‖² = (G_ν⁻¹)ᵢᵢ
    samples = np.trace(B) - np.einsum("ij,jk,ik->i", Cinv, B, Cinv) / r2 + 1.0 / r2 - nu * om2
    return samples, 0.0


def trace(
    H: Any,
    *,
    method: str = "auto",
    num_matvecs: int = 60,
    rtol: float | None = None,
    probes: str = "rademacher",
    seed: Any = None,
    progress: bool = False,
) -> TraceResult:
    """Estimate ``tr(H)`` from Hessian-vector products.

    Parameters
    ----------
    H : operator-like
        Anything :func:`curvop.aslinearoperator` accepts.
    method : {"auto", "hutchinson", "hutch++", "xtrace", "xnystrace"}
        ``"auto"`` (default): half the budget sketches ``Y = HΩ``; if deflating by that sketch
        shrinks the per-probe variance below 0.3 of Hutchinson's (:func:`deflation_gain`, computed
        from ``Y`` without further products) it finishes as XTrace, else it spends the rest on
        Hutchinson probes and averages all of them. ``TraceResult.method`` names what ran.
        ``"hutchinson"``: the mean of ``zᵀHz`` over ``num_matvecs`` probes; best for flat spectra.
        ``"hutch++"``: a third of the budget sketches the range (``Q = orth(HS)``), a third computes
        ``tr(QᵀHQ)`` exactly, the rest runs Hutchinson on the deflated remainder.
        ``"xtrace"``: half the budget on ``Y = HΩ``, half on ``HQ``; every probe serves both as
        sketch and as Hutchinson probe (exchangeable leave-one-out estimates).
        ``"xnystrace"``: for positive semi-definite ``H`` only; Nyström approximation with every
        probe left out in turn; uses all of the budget on one block ``HΩ``. Raises
        :class:`IndefiniteOperatorError` when ``ΩᵀHΩ`` shows that ``H`` is not PSD.
        Hutch++, XTrace and XNysTrace beat Hutchinson by orders of magnitude on decaying spectra.
        XTrace is more accurate than Hutch++ at the same budget on flat and decaying spectra
        (``benchmarks/accuracy.py``), but on a flat spectrum it is 2-3x less accurate than
        Hutchinson (its deflation removes nothing and it has half the probes); ``"auto"`` picks
        between the two.
    num_matvecs : int
        Products to use (an upper bound with ``rtol``; XTrace uses the largest even number below).
        When it is at least ``n``, every method computes the exact trace instead, from ``n``
        products with unit vectors: ``method="exact"``, ``stderr=0``. That costs no more than the
        estimate would and is better than any estimate (XTrace's sketch would span the whole
        space; Hutchinson would still have a random error). With ``rtol`` the exact trace can cost
        more than adaptive stopping would have; pass ``num_matvecs < n`` to keep that.
    rtol : float, optional
        Hutchinson only: stop as soon as ``stderr <= rtol·|estimate|`` (checked every 10 probes).
    probes : {"rademacher", "gaussian", "sphere"}
    seed : int, numpy Generator or None
    progress : bool
        Show a tqdm bar of the products.

    Returns
    -------
    TraceResult

    Raises
    ------
    curvop.backends.faults.NonFiniteProductError
        If the products contain NaN or Inf.
    IndefiniteOperatorError
        ``method="xnystrace"`` on an operator that is not positive semi-definite.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> U, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((200, 200)))
    >>> A = (U / np.arange(1, 201) ** 2) @ U.T          # a decaying spectrum, trace 1.64
    >>> r = curvop.trace(A, num_matvecs=40, seed=0)
    >>> bool(abs(r.estimate - np.trace(A)) < 1e-2), r.num_matvecs, r.method
    (True, 40, 'xtrace')
    >>> B = (U * np.linspace(1.0, 2.0, 200)) @ U.T      # a flat one: deflation would not pay
    >>> curvop.trace(B, num_matvecs=40, seed=0).method
    'hutchinson'
    >>> curvop.trace(np.diag([1.0, 2.0, 4.0]))          # budget >= n: the exact trace
    TraceResult(estimate=7.0, stderr=0.0, num_matvecs=3, method='exact', num_probes=3, converged=True)
    """
    H = aslinearoperator(H)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if rtol is not None and method != "hutchinson":
        raise ValueError("rtol (adaptive stopping) is supported for method='hutchinson' only")
    num_matvecs = int(num_matvecs)
    n = H.shape[0]
    need = _MIN_MATVECS[method]
    if num_matvecs < min(need, n):
        raise ValueError(f"method={method!r} needs num_matvecs >= {need}, got {num_matvecs}")
    rng = np.random.default_rng(H.backend.agree_seed(seed))  # the same probes on every rank
    start = H.num_matvecs
    exact = num_matvecs >= n
    total = n if exact else 2 * (num_matvecs // 2) if method == "xtrace" else num_matvecs
    bar = progress_bar(progress, total, f"trace ({'exact' if exact else method})")
    try:
        ran = method
        if exact:
            samples, base, ran = _exact(H, bar), 0.0, "exact"
        elif method == "auto":
            samples, base, ran = _auto(H, num_matvecs, probes, rng, bar)
        elif method == "hutchinson":
            samples, base = _hutchinson(H, num_matvecs, probes, rng, rtol, bar)
        elif method == "hutch++":
            samples, base = _hutchpp(H, num_matvecs, probes, rng, bar)
        elif method == "xtrace":
            samples, base = _xtrace(H, num_matvecs, probes, rng, bar)
        else:
            samples, base = _xnystrace(H, num_matvecs, probes, rng, bar)
    finally:
        bar.close()
    samples = np.asarray(samples, dtype=np.float64)
    _require_finite(np.append(samples, base), f"curvop.trace(method={method!r})")
    if ran == "exact":
        est, err = float(samples.sum()), 0.0
    else:
        mean, err = _mean_stderr(samples)
        est = base + mean
    return TraceResult(
        estimate=float(est),
        stderr=err,
        num_matvecs=H.num_matvecs - start,
        method=ran,
        num_probes=int(np.size(samples)),
        converged=rtol is None or err <= rtol * abs(est),
    )
