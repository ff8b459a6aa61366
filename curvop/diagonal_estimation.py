"""Randomized estimation of the diagonal of a Hessian: Hutchinson (Bekas et al.) and XDiag.

This module is ``curvop.diagonal_estimation`` (``curvop.diagonal`` is the function); the
sketching it shares with the trace estimators lives in :mod:`curvop.sketch`.

References: Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix" (2007);
Epperly, Tropp & Webber, "XTrace: making the most of every sample..." (SIMAX 2024), XDiag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from curvop._checks import check_choice, check_flag, check_int, require_finite
from curvop._progress import progress_bar
from curvop.arrays import asarray_like, concat, matmul, namespace, stack
from curvop.eigen import array_summary
from curvop.operator import aslinearoperator
from curvop.sketch import pair_coefficients, probe_block, range_sketch, unit_blocks

__all__ = ["DiagonalResult", "diagonal"]

Array = Any
_MIN_MATVECS = {"hutchinson": 1, "xdiag": 4}


@dataclass(frozen=True, eq=False)
class DiagonalResult:
    """Result of :func:`diagonal`.

    Attributes
    ----------
    estimate : array, shape (n,)
        The estimated diagonal, of the operator's native array type.
    stderr : array, shape (n,)
        Entry-wise standard error (native). Hutchinson: the sample standard deviation (ddof=1) of
        the independent per-probe estimates over the square root of their number (NaN from a
        single probe). XDiag: the same plus the covariance of its exchangeable, correlated
        leave-one-out estimates (leave-two-out, as for XTrace's ``stderr``); ``estimate ±
        2·stderr`` covers 90-96 % of the entries (``benchmarks/coverage.py``).
    num_matvecs : int
    method : str
        ``"exact"`` when the budget reached ``n`` (``stderr`` is then zero).
    num_probes : int
    """

    estimate: Array
    stderr: Array
    num_matvecs: int
    method: str
    num_probes: int

    def __repr__(self) -> str:
        return (
            f"DiagonalResult(estimate={array_summary(self.estimate)}, stderr={array_summary(self.stderr)}, "
            f"num_matvecs={self.num_matvecs}, method={self.method!r}, num_probes={self.num_probes})"
        )


def _row_mean_stderr(E: Array, cov: Array | None = None) -> tuple[Array, Array]:
    """Mean and standard error over the columns of a native ``(n, m)`` array of samples.

    ``cov`` (XDiag): the entry-wise covariance ``ĉ`` of the exchangeable samples, added where it
    is positive (:func:`curvop.sketch.exchangeable_variance` is the scalar version).
    """
    m = E.shape[1]
    if m == 1:  # one sample: no spread to measure, the error is unknown (NaN), not zero
        return E[:, 0], E[:, 0] * float("nan")
    xp = namespace(E)
    mean = xp.sum(E, axis=1) / m
    dev = E - stack([mean] * m, axis=1)
    var = xp.sum(dev * dev, axis=1) / ((m - 1) * m)
    if cov is not None:
        var = var + (cov + abs(cov)) / 2
    return mean, xp.sqrt(var)


def _pair_sum(X: Array | None, Y: Array | None, C) -> Array:
    """``Σ_ij C[i, j] X[:, i] ⊙ Y[:, j]`` for native ``(n, k)`` arrays (``None``: all ones)."""
    if Y is None:
        return matmul(X, C.sum(axis=1)[:, None])[:, 0]
    YC = matmul(Y, C.T)
    return namespace(YC).sum(YC if X is None else X * YC, axis=1)


def _xdiag_covariance(E: Array, A: Array, B: Array, Om: Array, S, R, rows: int = 16) -> Array | None:
    """Entry-wise ``ĉ`` of :func:`curvop.sketch.exchangeable_variance` for XDiag, in ``O(nk²)``.

    Dropping probe ``j`` from ``P₋ᵢ`` too removes ``Qv`` (``v = p sⱼ + q sᵢ``,
    :func:`~curvop.sketch.pair_coefficients`), so with ``A = QS``, ``B = ZS = HQS`` and
    ``γ = vᵀRᵢ`` the change of sample ``i`` is
    ``tᵢ − tᵢ⁽⁻ʲ⁾ = (pAⱼ + qAᵢ) ⊙ (pBⱼ + qBᵢ) − γ ωᵢ ⊙ (pAⱼ + qAᵢ)``: six sums over pairs, each
    weighted by ``(k−1)tⱼ + tᵢ − Σt``. Every entry is independent of the others, so the sums run
    over ``rows`` slices of the entries: the temporaries stay a small fraction of the probe blocks
    (the memory model of :func:`diagonal` holds). ``None`` when not finite (dependent sketch columns).
    """
    n, k = E.shape
    if k < 3:
        return None
    p, q = pair_coefficients(S)
    SR = S.T @ R
    gam = p * SR.T + q * np.diag(SR)[:, None]  # γ_ij = v_ijᵀ Rᵢ
    step = -(-n // rows)
    rows_of = lambda X, a: X[a:a + step, :]  # noqa: E731 (two indices: the Array API wants one per axis)
    cov = concat([_xdiag_covariance_rows(rows_of(E, a), rows_of(A, a), rows_of(B, a), rows_of(Om, a),
                                         p, q, gam) for a in range(0, n, step)], axis=0)
    return cov if np.isfinite(float(namespace(cov).sum(abs(cov)))) else None


def _xdiag_covariance_rows(E: Array, A: Array, B: Array, Om: Array, p, q, gam) -> Array:
    """:func:`_xdiag_covariance` on a slice of the entries."""
    k = E.shape[1]
    AB = A * B
    terms = [(None, AB, p * p), (B, A, p * q), (A, B, p * q), (AB, None, q * q), (Om, A, -gam * p),
             (Om * A, None, -gam * q)]  # (i-side, j-side, coefficient) of tᵢ − tᵢ⁽⁻ʲ⁾
    centred = E - stack([namespace(E).sum(E, axis=1)] * k, axis=1)  # tᵢ − Σt
    total = 0.0
    for X, Y, C in terms:
        total = total + _pair_sum(X, E * (k - 1) if Y is None else E * Y * (k - 1), C)
        total = total + _pair_sum(centred if X is None else centred * X, Y, C)
    return total / (k * (k - 1) * (k - 2))


def _hutchinson(H, m, rng):
    Z, HZ = probe_block(H, m, "rademacher", rng)
    return Z * HZ, None  # column j: z_j ⊙ H z_j, unbiased for diag(H) (Rademacher); independent


def _xdiag(H, m, rng):
    """XDiag: average over i of ``diag(P₋ᵢH) + ωᵢ ⊙ (I−P₋ᵢ)Hωᵢ``, ``P₋ᵢ`` the projector on
    ``span{Hω_j : j ≠ i}``. Since ``Y = QR``, ``(I−P₋ᵢ)Hωᵢ = cᵢ Q sᵢ`` with ``cᵢ = sᵢᵀRᵢ``, so
    per-probe estimates need only ``Y = HΩ`` and ``Z = HQ`` (``m/2`` products each)."""
    s = m // 2
    sk = range_sketch(H, s, "rademacher", rng, "curvop.diagonal(method='xdiag')")
    Om, Q, S = sk.Om, sk.Q, sk.S
    Z = H.matmat(Q)
    QS, ZS = matmul(Q, S), matmul(Z, S)
    base = namespace(Q).sum(Q * Z, axis=1)  # diag(Q Qᵀ H) for symmetric H
    R, w = sk.R, asarray_like(sk.loo_weights, QS)
    del sk, Q, Z  # the covariance needs only the sketch's small factors: free the big blocks
    E = stack([base] * s, axis=1) - QS * ZS + Om * QS * w
    return E, _xdiag_covariance(E, QS, ZS, Om, S, R)


def _exact(H):
    """``diag(H)`` from ``n`` products with unit vectors (block ``E``: ``Σ_columns E ⊙ HE``)."""
    d = None
    for _, E, Y in unit_blocks(H):
        part = namespace(E).sum(E * Y, axis=1)
        d = part if d is None else d + part
    return d


def diagonal(
    H: Any,
    *,
    method: str = "hutchinson",
    num_matvecs: int = 60,
    seed: Any = None,
    progress: bool = False,
) -> DiagonalResult:
    """Estimate the diagonal of ``H`` from Hessian-vector products (one block product).

    Parameters
    ----------
    H : operator-like
        Anything :func:`curvop.aslinearoperator` accepts.
    method : {"hutchinson", "xdiag"}
        ``"hutchinson"``: ``mean_j z_j ⊙ Hz_j`` with Rademacher probes (exact for diagonal ``H``);
        one probe is allowed (AdaHessian's and Sophia-H's estimate), its ``stderr`` is NaN.
        ``"xdiag"``: low-rank part ``diag(QQᵀH)`` plus a Hutchinson correction, every probe left
        out of the sketch in turn; much better when the spectrum decays.
    num_matvecs : int
        Products to use (XDiag uses the largest even number below). When it is at least ``n``,
        the exact diagonal is computed instead from ``n`` products with unit vectors
        (``method="exact"``, ``stderr`` zero): no more products, and no random error.
    seed : int, numpy Generator or None
    progress : bool

    Returns
    -------
    DiagonalResult
        ``estimate`` and ``stderr`` are native vectors.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> r = curvop.diagonal(np.diag([1.0, 2.0, 3.0]), num_matvecs=4, seed=0)
    >>> r.estimate
    array([1., 2., 3.])
    """
    H = aslinearoperator(H)
    check_choice("method", method, tuple(_MIN_MATVECS))
    num_matvecs, n = check_int("num_matvecs", num_matvecs), H.shape[0]
    progress = check_flag("progress", progress)
    if num_matvecs < min(_MIN_MATVECS[method], n):
        raise ValueError(f"method={method!r} needs num_matvecs >= {_MIN_MATVECS[method]}, got {num_matvecs}")
    rng = H.rng(seed)  # the same probes on every rank
    start = H.num_matvecs
    exact = num_matvecs >= n
    bar = progress_bar(progress, n if exact else num_matvecs, f"diagonal ({'exact' if exact else method})")
    try:
        if exact:
            E = _exact(H)
        else:
            E, cov = _hutchinson(H, num_matvecs, rng) if method == "hutchinson" else _xdiag(H, num_matvecs, rng)
        bar.update(H.num_matvecs - start)
    finally:
        bar.close()
    # one sum per column (or of the exact diagonal) comes to the host: NaN/Inf anywhere shows there
    require_finite(H.to_numpy(namespace(E).sum(E, axis=0)), f"curvop.diagonal(method={method!r})")
    if exact:
        return DiagonalResult(E, E * 0, H.num_matvecs - start, "exact", n)
    mean, err = _row_mean_stderr(E, cov)
    return DiagonalResult(mean, err, H.num_matvecs - start, method, int(E.shape[1]))
