"""Randomized trace estimation: Hutchinson, Hutch++, XTrace and XNysTrace (:func:`curvop.trace`).

All four methods use block products (``H.matmat``), so batched Hessian-vector products are used,
and keep vectors native; only ``k × k`` matrices and scalars come to the host (float64). The
sketching they share with the diagonal estimators lives in :mod:`curvop.sketch`.

This module is ``curvop.trace_estimation`` (``curvop.trace`` is the function).

References: Hutchinson (1989); Meyer, Musco, Musco & Woodruff, "Hutch++" (SOSA 2021);
Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation" (SIMAX 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from curvop._checks import PROBES, check_choice, check_flag, check_int, check_positive, require_finite
from curvop._progress import progress_bar
from curvop.arrays import column_dots, gram, orthonormalize, project_out
from curvop.operator import aslinearoperator
from curvop.sketch import (
    IndefiniteOperatorError,
    RangeSketch,
    exchangeable_variance,
    pair_coefficients,
    probe_block,
    range_sketch,
    shifted_nystrom,
    unit_blocks,
    variance_ratio,
)

__all__ = ["TraceResult", "trace", "IndefiniteOperatorError"]

_METHODS = ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace")
_MIN_MATVECS = {"auto": 6, "hutchinson": 2, "hutch++": 3, "xtrace": 4, "xnystrace": 2}
# "auto" runs XTrace when the deflated samples vary less than this fraction of the plain ones
# (calibrated on synthetic spectra: XTrace wins below ~0.3, Hutchinson above; module notes below).
_AUTO_VARIANCE_RATIO = 0.3
# ... and only from this many XTrace probes (40 products) on: with fewer, XTrace's exchangeable error
# bar covered the truth only 77 % of the time on a rank-10 spike over noise (10 probes cannot hold
# it), where Hutchinson's covered 92-94 % on every spectrum of benchmarks/coverage.py (1000 seeds)
_AUTO_MIN_SKETCH = 20


@dataclass(frozen=True)
class TraceResult:
    """Result of :func:`trace`.

    Attributes
    ----------
    estimate : float
    stderr : float
        Standard error of ``estimate``. For Hutchinson and Hutch++ (its Hutchinson part) the
        per-probe samples are independent: their standard deviation (ddof=1) over the square root
        of their number. XTrace's and XNysTrace's per-probe (leave-one-out) estimates are
        exchangeable but positively correlated (each probe is also in the others' sketches), and
        that formula alone was 1.3-1.7x too small; their ``stderr`` adds the covariance, estimated
        from leave-two-out estimates at no extra product
        (:func:`curvop.sketch.exchangeable_variance`). ``estimate ± 2·stderr`` covers the truth
        in 90-97 % of seeded runs from 40 products on (``benchmarks/coverage.py``,
        docs/algorithms.md), a little less with fewer probes.
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


class Samples(NamedTuple):
    """What every estimator below returns: per-probe ``samples`` whose mean estimates
    ``tr(H) − base`` (``base`` is a part computed exactly, e.g. Hutch++'s ``tr(QᵀHQ)``), the
    ``method`` that ran (``"auto"`` names the method it chose) and, for the exchangeable
    estimators, ``loo2[i, j] = tᵢ − tᵢ⁽⁻ʲ⁾`` (:func:`~curvop.sketch.exchangeable_variance`)."""

    samples: np.ndarray
    base: float
    method: str
    loo2: np.ndarray | None = None


def _exact(H, bar) -> Samples:
    """``tr(H) = Σ_j e_jᵀHe_j`` from ``n`` products with unit vectors (the samples are the diagonal)."""
    d = []
    for _, E, Y in unit_blocks(H):
        d.append(column_dots(E, Y))
        bar.update(E.shape[1])
    return Samples(np.concatenate(d), 0.0, "exact")


def _mean_stderr(samples: np.ndarray, loo2: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and standard error: independent samples, or exchangeable ones with their ``loo2``."""
    m = samples.size
    if m < 2:
        return float(samples.mean()), float("inf")
    if loo2 is None:
        return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(m))
    return float(samples.mean()), float(np.sqrt(exchangeable_variance(samples, loo2)))


def _hutchinson(H, m, probes, rng, rtol, bar) -> Samples:
    """Hutchinson's estimator ``mean_j z_jᵀ H z_j``; with ``rtol`` in blocks of 10 until precise."""
    block = m if rtol is None else min(m, 10)
    samples = np.zeros(0)
    while samples.size < m:
        b = min(block, m - samples.size)
        Z, HZ = probe_block(H, b, probes, rng)
        samples = np.concatenate([samples, column_dots(Z, HZ)])
        bar.update(b)
        require_finite(samples, "curvop.trace(method='hutchinson')")
        if rtol is not None and samples.size >= 2:
            est, err = _mean_stderr(samples)
            if err <= rtol * abs(est):
                break
    return Samples(samples, 0.0, "hutchinson")


def _hutchpp(H, m, probes, rng, bar) -> Samples:
    """Hutch++: ``tr(QᵀHQ)`` on a sketch of ``m/3`` products plus Hutchinson on ``(I−QQᵀ)H(I−QQᵀ)``."""
    n = H.shape[0]
    s = m // 3
    g = m - 2 * s
    Q = orthonormalize(probe_block(H, s, probes, rng)[1])
    low_rank = float(column_dots(Q, H.matmat(Q)).sum())
    G = project_out(H.random((n, g), probes, seed=rng), Q)
    G = project_out(G, Q)
    samples = column_dots(G, H.matmat(G))
    bar.update(m)
    return Samples(samples, low_rank, "hutch++")


def _range_sketch(H, s, probes, rng, bar) -> tuple[RangeSketch, np.ndarray]:
    """The sketch ``Y = HΩ`` of XTrace and ``"auto"``, with ``W = QᵀΩ``."""
    sk = range_sketch(H, s, probes, rng, "curvop.trace")
    bar.update(s)
    return sk, gram(sk.Q, sk.Om)


def _xtrace(H, m, probes, rng, bar) -> Samples:
    """XTrace: average over i of ``tr(H P₋ᵢ) + ωᵢᵀ(I−P₋ᵢ)H(I−P₋ᵢ)ωᵢ`` with ``P₋ᵢ`` the projector on
    ``span{Hω_j : j ≠ i}``, all from ``Y = HΩ`` and ``Z = HQ`` (``m/2`` products each)."""
    return _xtrace_finish(H, *_range_sketch(H, m // 2, probes, rng, bar), bar)


def _xtrace_finish(H, sk: RangeSketch, W: np.ndarray, bar) -> Samples:
    """XTrace's second half: ``Z = HQ`` and the exchangeable estimates, given the sketch."""
    Om, _, Q, R, S, d = sk
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
    return Samples(low_rank + tt + 2 * c * cross + c**2 * sMs, 0.0, "xtrace", _xtrace_loo2(S, R, W, M, c))


def _xtrace_loo2(S, R, W, M, c) -> np.ndarray:
    """``tᵢ − tᵢ⁽⁻ʲ⁾`` for XTrace: dropping probe ``j`` from ``P₋ᵢ`` removes ``Qv`` with
    ``v = v_ij`` (:func:`~curvop.sketch.pair_coefficients`), which changes the low-rank part by
    ``−vᵀMv`` and the residual probe ``uᵢ = (I−P₋ᵢ)ωᵢ`` by ``+Qv(vᵀWᵢ)``, so
    ``tᵢ − tᵢ⁽⁻ʲ⁾ = vᵀMv (1 − a²) − 2ab`` with ``a = vᵀWᵢ``, ``b = vᵀQᵀHuᵢ`` (``k × k``, host)."""
    p, q = pair_coefficients(S)
    SW, SH, SMS = S.T @ W, S.T @ (R - M @ (W - S * c)), S.T @ M @ S  # QᵀHuᵢ = Rᵢ − M(Wᵢ − sᵢcᵢ)
    a = p * SW.T + q * c[:, None]
    b = p * SH.T + q * np.diag(SH)[:, None]
    dm = np.diag(SMS)
    vMv = p**2 * dm[None, :] + 2 * p * q * SMS + q**2 * dm[:, None]
    return vMv * (1 - a**2) - 2 * a * b


def _auto(H, m, probes, rng, bar) -> Samples:
    """Hutchinson below ``2·_AUTO_MIN_SKETCH`` products. Otherwise sketch ``Y = HΩ`` with half the budget, then finish as XTrace if deflation pays
    (:func:`~curvop.sketch.deflation_gain` below ``_AUTO_VARIANCE_RATIO``), else spend the rest on
    more Hutchinson probes and average them with the ``ωᵢᵀHωᵢ`` already in hand."""
    if m // 2 < _AUTO_MIN_SKETCH:  # too few leave-one-out estimates for an honest XTrace error bar
        return _hutchinson(H, m, probes, rng, None, bar)
    sk, W = _range_sketch(H, m // 2, probes, rng, bar)
    if variance_ratio(sk.S, sk.R, W, sk.d) < _AUTO_VARIANCE_RATIO:
        return _xtrace_finish(H, sk, W, bar)
    Z, HZ = probe_block(H, m - m // 2, probes, rng)
    bar.update(m - m // 2)
    return Samples(np.concatenate([sk.d, column_dots(Z, HZ)]), 0.0, "hutchinson")


def _xnystrace(H, m, probes, rng, bar) -> Samples:
    """XNysTrace for PSD ``H``: leave-one-out Nyström approximations ``Â₋ᵢ`` plus Hutchinson on
    ``H − Â₋ᵢ`` with probe ``ωᵢ``, with the shifted (stable) Nyström approximation
    (:func:`~curvop.sketch.shifted_nystrom`) that Epperly, Tropp & Webber recommend.

    ``FFᵀ`` approximates ``H + νI``; with ``rᵢ`` the ``i``-th row of ``C⁻¹`` the ``i``-th estimate
    of ``tr(H + νI)`` is ``‖F‖² − ‖Frᵢ‖²/‖rᵢ‖² + 1/‖rᵢ‖²``; subtracting ``ν‖ωᵢ‖²`` removes the
    shift exactly. Raises :class:`IndefiniteOperatorError` when ``H`` is not PSD.
    """
    Om, Y = probe_block(H, m, probes, rng)
    bar.update(m)
    F, Cinv, nu = shifted_nystrom(Om, Y, H.dtype, "curvop.trace(method='xnystrace')")
    B = gram(F, F)
    B = (B + B.T) / 2
    r2 = np.einsum("ij,ij->i", Cinv, Cinv)  # ‖rᵢ‖² = (G_ν⁻¹)ᵢᵢ
    samples = np.trace(B) - np.einsum("ij,jk,ik->i", Cinv, B, Cinv) / r2 + 1.0 / r2 - nu * column_dots(Om, Om)
    # leaving probe j out too removes F v_ij from the Nyström factor (v_ij in span{rᵢ, rⱼ}, unit,
    # orthogonal to rᵢ): tᵢ − tᵢ⁽⁻ʲ⁾ = vᵀBv − (vᵀCeᵢ)², and vᵀCeᵢ = q_ij/‖rᵢ‖ (rⱼᵀCeᵢ = 0)
    S = (Cinv / np.sqrt(r2)[:, None]).T
    p, q = pair_coefficients(S)
    SBS = S.T @ B @ S
    dm = np.diag(SBS)
    loo2 = p**2 * dm[None, :] + 2 * p * q * SBS + q**2 * dm[:, None] - q**2 / r2[:, None]
    return Samples(samples, 0.0, "xnystrace", loo2)


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
        ``"auto"`` (default): XNysTrace on an operator that is PSD by construction
        (``H.is_psd``: the GGN, the Fisher); otherwise half the budget sketches ``Y = HΩ``; if deflating by that sketch
        shrinks the per-probe variance below 0.3 of Hutchinson's
        (:func:`curvop.sketch.deflation_gain`, computed from ``Y`` without further products)
        it finishes as XTrace, else it spends the rest on
        Hutchinson probes and averages all of them. Below 40 products it runs Hutchinson: XTrace's
        error bar rests on ``num_matvecs/2`` leave-one-out estimates, too few to be honest when more
        eigenvalues stand out than it has probes. ``TraceResult.method`` names what ran.
        ``"hutchinson"``: the mean of ``zᵀHz`` over ``num_matvecs`` probes; best for flat spectra.
        ``"hutch++"``: a third of the budget sketches the range (``Q = orth(HS)``), a third computes
        ``tr(QᵀHQ)`` exactly, the rest runs Hutchinson on the deflated remainder.
        ``"xtrace"``: half the budget on ``Y = HΩ``, half on ``HQ``; every probe serves both as
        sketch and as Hutchinson probe (exchangeable leave-one-out estimates). Its ``stderr``
        covers the truth 91-95 % of the time from 40 products on (``docs/algorithms.md``); at 20 it
        can be far too small when more eigenvalues stand out than it has probes.
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
    check_choice("method", method, _METHODS)
    check_choice("probes", probes, PROBES)
    num_matvecs = check_int("num_matvecs", num_matvecs)
    rtol = check_positive("rtol", rtol, optional=True)
    progress = check_flag("progress", progress)
    if rtol is not None and method != "hutchinson":
        raise ValueError("rtol (adaptive stopping) is supported for method='hutchinson' only")
    n = H.shape[0]
    need = _MIN_MATVECS[method]
    if num_matvecs < min(need, n):
        raise ValueError(f"method={method!r} needs num_matvecs >= {need}, got {num_matvecs}")
    rng = H.rng(seed)  # the same probes on every rank
    start = H.num_matvecs
    exact = num_matvecs >= n
    total = n if exact else 2 * (num_matvecs // 2) if method == "xtrace" else num_matvecs
    bar = progress_bar(progress, total, f"trace ({'exact' if exact else method})")
    try:
        if exact:
            r = _exact(H, bar)
        elif method == "auto" and H.is_psd:  # PSD by construction (GGN, Fisher): Nyström pays
            r = _xnystrace(H, num_matvecs, probes, rng, bar)
        elif method == "auto":
            r = _auto(H, num_matvecs, probes, rng, bar)
        elif method == "hutchinson":
            r = _hutchinson(H, num_matvecs, probes, rng, rtol, bar)
        elif method == "hutch++":
            r = _hutchpp(H, num_matvecs, probes, rng, bar)
        elif method == "xtrace":
            r = _xtrace(H, num_matvecs, probes, rng, bar)
        else:
            r = _xnystrace(H, num_matvecs, probes, rng, bar)
    finally:
        bar.close()
    samples = np.asarray(r.samples, dtype=np.float64)
    require_finite(np.append(samples, r.base), f"curvop.trace(method={method!r})")
    if r.method == "exact":
        est, err = float(samples.sum()), 0.0
    else:
        mean, err = _mean_stderr(samples, r.loo2)
        est = r.base + mean
    return TraceResult(
        estimate=float(est),
        stderr=err,
        num_matvecs=H.num_matvecs - start,
        method=r.method,
        num_probes=int(np.size(samples)),
        converged=rtol is None or err <= rtol * abs(est),
    )
