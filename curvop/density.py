"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give a tridiagonal ``T = U diag(θ) Uᵀ``, and Gauss
quadrature (Golub & Meurant) gives ``vᵀ f(H) v ≈ Σ_j w_j f(θ_j)`` with nodes ``θ_j`` (Ritz values)
and weights ``w_j = U[0, j]²`` (summing to 1). Averaging these discrete measures over random probes
estimates the spectral measure ``(1/n) Σ_i δ(λ − λ_i)``; ``n`` times its integral of ``f``
estimates ``tr f(H)``. References: Golub & Meurant (2010); Ubaru, Chen & Saad (SIMAX 2017);
Ghorbani, Krishnan & Xiao (ICML 2019); Yao et al., PyHessian (2020).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from curvop._progress import progress_bar
from curvop.eigen import default_basis_budget
from curvop._checks import PROBES, check_choice, check_flag, check_float_dtype, check_int
from curvop.krylov import check_location, lanczos_tridiag
from curvop.operator import aslinearoperator

__all__ = ["SpectralDensity", "spectral_density"]

#: points x nodes evaluated in one dense block by :meth:`SpectralDensity.density` (8 bytes each)
_DENSE_TERMS = 8_000_000
#: where :meth:`SpectralDensity.grid` adds points around a node, in steps of σ/4: every step
#: within 6σ, then wider steps out to 40σ (the normal density underflows to 0 at 38.6σ)
_TAIL = np.array([26, 28, 32, 36, 40, 48, 56, 64, 80, 96, 120, 160])
_OFFSETS = np.concatenate([-_TAIL[::-1], np.arange(-24, 25), _TAIL])


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Quadrature nodes and weights of every SLQ probe (float64, on the host).

    Attributes
    ----------
    nodes : tuple of numpy arrays
        Ritz values of each probe (a probe may have fewer than ``num_steps`` on an invariant
        subspace).
    weights : tuple of numpy arrays
        Their Gauss quadrature weights; each probe's weights sum to 1.
    n : int
        Dimension of the operator.
    num_matvecs : int
    """

    nodes: tuple
    weights: tuple
    n: int
    num_matvecs: int

    def __repr__(self) -> str:
        steps = sorted({int(np.size(x)) for x in self.nodes})
        span = ""
        if self.nodes:
            x, _ = self._flat()
            span = f", nodes in [{x.min():.4g}, {x.max():.4g}]"
        return (
            f"SpectralDensity(n={self.n}, num_probes={len(self.nodes)}, nodes per probe="
            f"{steps[0] if len(steps) == 1 else steps}{span}, num_matvecs={self.num_matvecs})"
        )

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        p = len(self.nodes)
        return np.concatenate(self.nodes), np.concatenate(self.weights) / p

    def default_sigma(self) -> float:
        """``0.01 ×`` the spread of the nodes (1e-3·max(1, |θ|) if all nodes coincide).

        The one default kernel width of curvop: :meth:`density`, :meth:`plot` and
        :mod:`curvop.plot` all use it, so one density draws one curve. With 1 % of the spectral
        width each Gaussian is narrow enough to resolve the bulk and isolated outliers of a
        typical Hessian spectrum on a linear axis, and wide enough that a few probes × ~100 nodes
        give a smooth curve; unlike PyHessian's width (:func:`curvop.plot.pyhessian_sigma`) it
        scales with the spectrum, so the default grids resolve it at any scale.
        """
        x, _ = self._flat()
        width = float(x.max() - x.min())
        return 0.01 * width if width > 0 else 1e-3 * max(1.0, float(np.abs(x).max()))

    def grid(self, sigma: float | None = None, span: tuple[float, float] | None = None,
             num: int = 2000) -> np.ndarray:
        """Evaluation points fine enough for kernels of width ``sigma``: what :meth:`density` uses.

        ``num`` evenly spaced points over ``span`` (default ``min θ − 5σ`` to ``max θ + 5σ``). Where
        their spacing is wider than ``σ/4`` (a ``sigma`` much smaller than the spread of the nodes),
        points around each node are added: every ``σ/4`` within ``6σ``, then further apart out to
        ``40σ``, where the normal density underflows to 0 (the default span then reaches that far
        too). So every Gaussian is resolved, the density still integrates to 1
        (``numpy.trapezoid``) and every peak shows.

        >>> import numpy as np, curvop
        >>> sd = curvop.spectral_density(np.diag([0.0, 60.0]), num_steps=2, seed=0)
        >>> g = sd.grid(sigma=1e-4)
        >>> g.size > 2000, round(float(np.trapezoid(sd.density(grid=g, sigma=1e-4)[1], g)), 6)
        (True, 1.0)
        """
        x, _ = self._flat()
        sigma = self._sigma(sigma, x)
        lo, hi = (x.min() - 5 * sigma, x.max() + 5 * sigma) if span is None else (float(span[0]), float(span[1]))
        grid = np.linspace(lo, hi, int(num))
        if grid.size < 2 or grid[1] - grid[0] <= sigma / 4:
            return grid
        if span is None:
            lo, hi = x.min() - 40 * sigma, x.max() + 40 * sigma
        # offsets on a lattice of step σ/4 from lo: every one within 6σ of a node, sparser out to 40σ
        # (even spacing within 6σ keeps the trapezoidal rule exact to ~1e-9 there: the even points
        # that fall inside those windows are left out)
        ticks = np.unique(np.round((x - lo) / (sigma / 4)).astype(np.int64))
        near = np.unique((ticks[:, None] + _OFFSETS[None, :]).ravel())
        fine = lo + near * (sigma / 4)
        xs = np.sort(x)
        i = np.clip(np.searchsorted(xs, grid), 1, xs.size - 1)
        gap = np.minimum(np.abs(grid - xs[i - 1]), np.abs(grid - xs[i])) if xs.size > 1 else np.abs(grid - xs[0])
        return np.union1d(grid[gap > 6.5 * sigma], fine[(fine >= lo) & (fine <= hi)])

    def _sigma(self, sigma: float | None, x: np.ndarray) -> float:
        """``sigma`` checked (positive, finite, above float64's resolution at the nodes), or the default."""
        if sigma is None:
            return self.default_sigma()
        s = float(sigma)
        floor = 64 * np.finfo(np.float64).eps * float(np.abs(x).max())
        if not (np.isfinite(s) and s > 0):
            raise ValueError(f"sigma must be a positive finite kernel width, got {sigma!r}")
        if s <= floor:
            raise ValueError(
                f"sigma={s:.3g} is below what float64 resolves at nodes of size {np.abs(x).max():.3g} "
                f"(about {floor:.1g}); pass a larger sigma"
            )
        return s

    def density(self, grid: np.ndarray | None = None, sigma: float | None = None):
        """Gaussian-smoothed density ``Σ_j w_j N(x; θ_j, σ²)`` averaged over probes.

        Parameters
        ----------
        grid : array, optional
            Evaluation points (the values there are exact whatever their spacing); default
            :meth:`grid`: 2000 points from ``min θ − 5σ`` to ``max θ + 5σ``, refined around the
            nodes when ``sigma`` is smaller than that spacing allows, so the density integrates to
            1 (``numpy.trapezoid(values, grid)``) for every ``sigma``.
        sigma : float, optional
            Width of each Gaussian; default :meth:`default_sigma`.

        Returns
        -------
        grid, values : numpy arrays
        """
        x, w = self._flat()
        sigma = self._sigma(sigma, x)
        grid = self.grid(sigma) if grid is None else np.asarray(grid, dtype=np.float64)
        # scipy.stats.gaussian_kde takes weights, but its bandwidth is a factor of the nodes' own
        # (weighted) covariance, which is singular when all nodes coincide (a multiple of the
        # identity): the fixed width sigma is a plain mixture of normal densities instead.
        from scipy.stats import norm

        if grid.size * x.size <= _DENSE_TERMS:
            return grid, norm.pdf(grid[:, None], loc=x[None, :], scale=sigma) @ w
        # many points and nodes: each point sums the nodes within 40σ (the normal density of
        # every farther one underflows to 0 in float64), a chunk of sorted points at a time
        order = np.argsort(x, kind="stable")
        x, w = x[order], w[order]
        pos = np.argsort(grid, kind="stable")
        values = np.empty(grid.size)
        step = max(1, _DENSE_TERMS // max(1, x.size))
        for i in range(0, grid.size, step):
            idx = pos[i : i + step]
            g = grid[idx]
            a, b = np.searchsorted(x, [g.min() - 40 * sigma, g.max() + 40 * sigma], side="left")
            values[idx] = norm.pdf(g[:, None], loc=x[None, a:b], scale=sigma) @ w[a:b] if b > a else 0.0
        return grid, values

    def expectation(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """Estimate of ``tr f(H) = n ∫ f dμ`` (e.g. ``numpy.log`` gives the log-determinant)."""
        x, w = self._flat()
        return float(self.n * np.sum(w * f(x)))

    def trace(self) -> float:
        """Estimate of ``tr H`` (``expectation`` of the identity)."""
        return self.expectation(lambda x: x)

    def per_probe(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Each probe's estimate ``n Σ_j w_j f(θ_j)`` of ``tr f(H)``; their mean is :meth:`expectation`.

        The probes are independent, so these are independent samples (for ``f(x) = x`` exactly the
        Hutchinson samples ``zᵀHz``: Gauss quadrature integrates ``x`` exactly).
        """
        return np.array([self.n * float(np.sum(w * f(x))) for x, w in zip(self.nodes, self.weights)])

    def stderr(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """Standard error of :meth:`expectation`: std (ddof=1) of :meth:`per_probe` over √probes.

        It measures the random error of the probes (``inf`` with one probe), not the quadrature
        error of ``num_steps`` Lanczos steps, which is far smaller for smooth ``f`` and enough
        steps (tests: ``log`` on eigenvalues in [1, 10] with 30 steps).

        >>> import numpy as np, curvop
        >>> lam = np.linspace(1.0, 10.0, 200)
        >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((200, 200)))
        >>> sd = curvop.spectral_density((Q * lam) @ Q.T, num_steps=30, num_probes=8, seed=0)
        >>> est, err = sd.expectation(np.log), sd.stderr(np.log)
        >>> bool(abs(est - np.log(lam).sum()) < 4 * err)
        True
        """
        samples = self.per_probe(f)
        return float(samples.std(ddof=1) / np.sqrt(samples.size)) if samples.size > 1 else float("inf")

    def plot(self, ax: Any = None, log_scale: bool = True, **kwargs: Any):
        """Plot the smoothed density (matplotlib is imported here). Returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        grid, values = self.density(**kwargs)
        ax.plot(grid, values)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(values.max() * 1e-8, np.finfo(float).tiny))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def spectral_density(
    H: Any,
    *,
    num_steps: int = 100,
    num_probes: int = 1,
    probes: str = "rademacher",
    block_size: int | None = None,
    seed: Any = None,
    progress: bool = False,
    reorth: str = "auto",
    basis_location: str = "device",
    basis_dtype: Any = None,
    max_basis_bytes: int | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: the spectral density of ``H`` from ``num_probes`` probes.

    Each probe costs ``num_steps`` products (Lanczos); the ``num_steps`` Ritz values per probe
    match the extreme eigenvalues closely and the smoothed density matches the bulk. Probes run
    together, ``block_size`` at a time (default: all), so each Lanczos step is one batched product
    ``H.matmat``. With full reorthogonalisation the basis is ``block_size × num_steps`` vectors
    (preallocated); with ``reorth="local"`` it is 3 ``block_size`` vectors (docs/scale.md).

    Parameters
    ----------
    H : operator-like
    num_steps : int
        Lanczos steps per probe (at least 1, capped at ``n``).
    num_probes : int
    probes : {"rademacher", "gaussian", "sphere"}
        Rademacher probes have ``‖z‖² = n`` exactly, so the trace estimate has Hutchinson's variance.
    block_size : int, optional
        Probes run in lockstep (lower it to save memory on large models).
    seed : int, numpy Generator or None
    progress : bool
    reorth : {"auto", "full", "local"}
        ``"full"``: every new Lanczos vector is reorthogonalised (twice) against the stored basis.
        ``"local"``: only against the previous two vectors, nothing stored; converged Ritz values
        then reappear as "ghosts" that split their weight, which changes the smoothed density
        little (measured against ``"full"`` in docs/scale.md). ``"auto"`` (default): ``"full"``
        when its basis fits ``max_basis_bytes``, else ``"local"``.
    basis_location : {"device", "host"}
        Full reorthogonalisation: where the basis lives (host memory while products run on the
        device moves two blocks per step).
    basis_dtype : dtype name, optional
        Full reorthogonalisation: the basis storage dtype (default the operator's).
    max_basis_bytes : int, optional
        The most memory the ``"auto"`` basis may take; default ``max(256 MiB, 4 vectors)``
        (:func:`curvop.eigen.default_basis_budget`), so the default call fits wherever the
        model's training step does.

    Examples
    --------
    >>> import numpy as np, curvop
    >>> sd = curvop.spectral_density(np.diag(np.arange(1.0, 11.0)), num_steps=10, seed=0)
    >>> round(sd.trace(), 8), bool(np.isclose(sd.expectation(np.log), np.log(np.arange(1, 11)).sum()))
    (55.0, True)
    """
    H = aslinearoperator(H)
    num_steps, num_probes = check_int("num_steps", num_steps, 1), check_int("num_probes", num_probes, 1)
    n = H.shape[0]
    block_size = num_probes if block_size is None else check_int("block_size", block_size, 1)
    check_choice("probes", probes, PROBES)
    check_choice("reorth", reorth, ("auto", "full", "local"))
    check_location(basis_location)
    check_float_dtype("basis_dtype", basis_dtype)
    max_basis_bytes = check_int("max_basis_bytes", max_basis_bytes, 1, optional=True)
    progress = check_flag("progress", progress)
    if reorth == "auto":
        vec = n * np.dtype(basis_dtype if basis_dtype is not None else H.dtype).itemsize
        budget = default_basis_budget(n * np.dtype(H.dtype).itemsize) if max_basis_bytes is None else int(max_basis_bytes)
        need = min(block_size, num_probes) * min(int(num_steps), n) * vec
        reorth = "full" if need <= budget else "local"
    rng = H.rng(seed)  # the same probes on every rank
    start = H.num_matvecs
    nodes, weights = [], []
    bar = progress_bar(progress, num_probes * min(num_steps, n), "spectral density (SLQ)")
    try:
        for first in range(0, num_probes, block_size):
            b = min(block_size, num_probes - first)
            before = H.num_matvecs
            runs, _ = lanczos_tridiag(H, H.random((n, b), probes, seed=rng), int(num_steps), reorth=reorth,
                                      basis_location=basis_location, basis_dtype=basis_dtype)
            bar.update(H.num_matvecs - before)
            for T in runs:
                theta, U = T.eigh()
                nodes.append(theta)
                weights.append(U[0, :] ** 2)
    finally:
        bar.close()
    return SpectralDensity(tuple(nodes), tuple(weights), n, H.num_matvecs - start)
