"""Randomized estimation of the diagonal of a Hessian: Hutchinson (Bekas et al.) and XDiag.

This module is ``curvop.diagonal_estimation`` (``curvop.diagonal`` is the function); the
sketching it shares with the trace estimators lives in :mod:`curvop.sketch`.

References: Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix" (2007);
Epperly, Tropp & Webber, "XTrace: making the most of every sample..." (SIMAX 2024), XDiag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curvop._checks import require_finite
from curvop._progress import progress_bar
from curvop.arrays import asarray_like, matmul, namespace, stack
from curvop.eigen import array_summary
from curvop.operator import aslinearoperator
from curvop.sketch import probe_block, range_sketch, unit_blocks

__all__ = ["DiagonalResult", "diagonal"]

Array = Any
_MIN_MATVECS = {"hutchinson": 2, "xdiag": 4}


@dataclass(frozen=True, eq=False)
class DiagonalResult:
    """Result of :func:`diagonal`.

    Attributes
    ----------
    estimate : array, shape (n,)
        The estimated diagonal, of the operator's native array type.
    stderr : array, shape (n,)
        Entry-wise standard error: sample standard deviation (ddof=1) of the per-probe estimates
        divided by the square root of their number (native). Honest for Hutchinson (independent
        probes); for XDiag the leave-one-out estimates are exchangeable but correlated.
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


def _row_mean_stderr(E: Array) -> tuple[Array, Array]:
    """Mean and standard error over the columns of a native ``(n, m)`` array of samples."""
    xp, m = namespace(E), E.shape[1]
    mean = xp.sum(E, axis=1) / m
    dev = E - stack([mean] * m, axis=1)
    return mean, xp.sqrt(xp.sum(dev * dev, axis=1) / ((m - 1) * m))


def _hutchinson(H, m, rng):
    Z, HZ = probe_block(H, m, "rademacher", rng)
    return Z * HZ  # column j: z_j ⊙ H z_j, unbiased for diag(H) (Rademacher)


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
    return stack([base] * s, axis=1) - QS * ZS + Om * QS * asarray_like(sk.loo_weights, QS)


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
        ``"hutchinson"``: ``mean_j z_j ⊙ Hz_j`` with Rademacher probes (exact for diagonal ``H``).
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
    if method not in _MIN_MATVECS:
        raise ValueError(f"method must be 'hutchinson' or 'xdiag', got {method!r}")
    num_matvecs, n = int(num_matvecs), H.shape[0]
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
            E = _hutchinson(H, num_matvecs, rng) if method == "hutchinson" else _xdiag(H, num_matvecs, rng)
        bar.update(H.num_matvecs - start)
    finally:
        bar.close()
    # one sum per column (or of the exact diagonal) comes to the host: NaN/Inf anywhere shows there
    require_finite(H.to_numpy(namespace(E).sum(E, axis=0)), f"curvop.diagonal(method={method!r})")
    if exact:
        return DiagonalResult(E, E * 0, H.num_matvecs - start, "exact", n)
    mean, err = _row_mean_stderr(E)
    return DiagonalResult(mean, err, H.num_matvecs - start, method, int(E.shape[1]))
