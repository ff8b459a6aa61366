"""PyHessian's ``density_plot`` module: ``get_esd_plot`` and ``density_generate``.

``from density_plot import get_esd_plot`` becomes
``from curvop.compat.pyhessian.density_plot import get_esd_plot``. The curve is PyHessian's:
Gaussians of *variance* ``sigma_squared · max(1, λmax − λmin)`` around each Ritz value, averaged
over probes, normalised to unit area on a grid of ``num_bins`` points between the probes' mean
smallest and mean largest Ritz value (± ``overhead``), drawn with ``semilogy`` after adding 1e-7,
and saved to ``example.pdf``. Unlike PyHessian's, the figure is drawn on its own matplotlib
``Figure`` (pyplot's current figure and backend are left alone), probes may have different numbers
of nodes, and the kernel sum runs vectorised (:meth:`curvop.SpectralDensity.density`).

Examples
--------
>>> from curvop.compat.pyhessian.density_plot import density_generate
>>> density, grid = density_generate([[1.0, 2.0]], [[0.5, 0.5]], num_bins=500)
>>> round(float(density.sum() * (grid[1] - grid[0])), 6)
1.0
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from curvop.density import SpectralDensity

__all__ = ["get_esd_plot", "density_generate"]


def density_generate(eigenvalues: Sequence[Sequence[float]], weights: Sequence[Sequence[float]],
                     num_bins: int = 10000, sigma_squared: float = 1e-5,
                     overhead: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """PyHessian's smoothed density: ``(density, grid)``, the density integrating to 1 on the grid.

    Parameters
    ----------
    eigenvalues, weights : lists (one per probe) of Ritz values and their weights
        What :meth:`curvop.compat.pyhessian.hessian.density` returns.
    num_bins : int
        Grid points.
    sigma_squared : float
        Kernel variance per unit of spectral width (PyHessian's 1e-5).
    overhead : float
        Margin added on each side of the grid.
    """
    nodes = tuple(np.asarray(e, dtype=np.float64).ravel() for e in eigenvalues)
    wts = tuple(np.asarray(w, dtype=np.float64).ravel() for w in weights)
    if not nodes or len(nodes) != len(wts) or any(a.size == 0 or a.size != b.size for a, b in zip(nodes, wts)):
        raise ValueError("eigenvalues and weights must be non-empty lists (one per probe) of equal-length lists")
    hi = float(np.mean([a.max() for a in nodes])) + overhead
    lo = float(np.mean([a.min() for a in nodes])) - overhead
    grid = np.linspace(lo, hi, int(num_bins))
    sigma = np.sqrt(sigma_squared * max(1.0, hi - lo))
    _, density = SpectralDensity(nodes, wts, n=0, num_matvecs=0).density(grid=grid, sigma=sigma)
    area = density.sum() * (grid[1] - grid[0]) if grid.size > 1 else density.sum()
    return (density / area if area > 0 else density), grid


def get_esd_plot(eigenvalues: Sequence[Sequence[float]], weights: Sequence[Sequence[float]],
                 path: str = "example.pdf") -> Any:
    """PyHessian's log-scale spectral density plot, saved to ``path`` (PyHessian: ``example.pdf``).

    Returns the matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    density, grid = density_generate(eigenvalues, weights)
    every = np.concatenate([np.ravel(e) for e in eigenvalues])
    fig = Figure()
    ax = fig.subplots()
    ax.semilogy(grid, density + 1.0e-7)
    ax.set_ylabel("Density (Log Scale)", fontsize=14, labelpad=10)
    ax.set_xlabel("Eigenvalue", fontsize=14, labelpad=10)
    ax.tick_params(labelsize=12)
    ax.set_xlim(float(every.min()) - 1, float(every.max()) + 1)
    fig.tight_layout()
    fig.savefig(path)
    return fig
