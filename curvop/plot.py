"""Plots of Hessian spectral densities (matplotlib is imported inside the functions).

The default kernel width is the density's own (:meth:`curvop.SpectralDensity.default_sigma`, 1 %
of the spread of the Ritz values), so a plot draws the same curve as ``density.density()``; the
density axis is logarithmic, as in the figures of the PyHessian paper. Pass ``sigma`` (a standard
deviation) to choose another width, e.g. ``sigma=pyhessian_sigma(density)`` for PyHessian's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["pyhessian_sigma", "density_curve", "plot_density", "compare_densities"]

#: Densities are drawn down to this fraction of their peak (PyHessian adds 1e-7 before plotting).
FLOOR = 1e-7


def pyhessian_sigma(density: Any) -> float:
    """PyHessian's kernel width (as a standard deviation): ``sqrt(1e-5 · max(1, spread of nodes))``.

    Not the default (that is :meth:`curvop.SpectralDensity.default_sigma`); pass it as ``sigma=``
    to draw a figure with PyHessian's smoothing.
    """
    x = np.concatenate(density.nodes)
    return float(np.sqrt(1e-5 * max(1.0, float(x.max() - x.min()))))


def density_curve(density: Any, sigma: float | None = None, num: int = 4000,
                  span: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The smoothed density on a grid of ``num`` points: ``(grid, values)``.

    ``span`` is the ``(left, right)`` range of the grid; default the nodes' range widened by a
    tenth of its width on each side (at least 1), the margin PyHessian's plots have. A ``sigma``
    narrower than the spacing adds points around the nodes (:meth:`SpectralDensity.grid`), so
    no peak falls between two points.
    """
    sigma = density.default_sigma() if sigma is None else float(sigma)
    if span is None:
        x = np.concatenate(density.nodes)
        pad = max(1.0, 0.1 * float(x.max() - x.min()))
        span = (float(x.min()) - pad, float(x.max()) + pad)
    return density.density(grid=density.grid(sigma, span=span, num=num), sigma=sigma)


def _draw(ax: Any, density: Any, sigma: float | None, span: Any, **style: Any) -> Any:
    grid, values = density_curve(density, sigma, span=span)
    return ax.semilogy(grid, np.maximum(values, FLOOR * values.max()), **style)[0]


def plot_density(density: Any, *, top: Sequence[float] | None = None, sigma: float | None = None,
                 ax: Any = None, title: str | None = None, path: str | None = None) -> Any:
    """The density on a log scale, with the top eigenvalues marked.

    Parameters
    ----------
    density : curvop.SpectralDensity
    top : sequence of float, optional
        Eigenvalues to mark (dashed red lines, labelled in the legend).
    sigma : float, optional
        Kernel width (standard deviation); default ``density.default_sigma()``.
    ax : matplotlib Axes, optional
    title : str, optional
    path : str, optional
        Save the figure there (PNG by extension).

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2)) if ax is None else (ax.figure, ax)
    _draw(ax, density, sigma, None, color="C0", lw=1.2, label="density (SLQ)")
    top = [] if top is None else [float(v) for v in np.ravel(top)]
    for i, lam in enumerate(top):
        ax.axvline(lam, color="C3", ls="--", lw=0.9, alpha=0.8,
                   label=f"top-{len(top)} eigenvalues" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title or f"Hessian spectral density, n = {density.n:,}")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return ax


def compare_densities(densities: Mapping[str, Any], *, top: Mapping[str, float] | None = None,
                      sigma: float | None = None, path: str | None = None,
                      columns: int = 2, title: str | None = None) -> Any:
    """Several densities side by side, one panel each, with a shared log-scale y axis.

    Parameters
    ----------
    densities : mapping name -> curvop.SpectralDensity
    top : mapping name -> float, optional
        The top eigenvalue of each, marked with a dashed line and written in the panel title.
    sigma : float, optional
        One kernel width for all panels; default each panel's ``default_sigma()``.
    path : str, optional
        Save the figure there.
    columns : int

    Returns
    -------
    matplotlib Figure
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(densities)
    rows = (len(names) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.2 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        _draw(ax, densities[name], sigma, None, color="C0", lw=1.1)
        label = name
        if top and name in top:
            ax.axvline(top[name], color="C3", ls="--", lw=0.9)
            label += f"\nλmax = {top[name]:.4g}"
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("eigenvalue")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("density (log scale)")
    return finish_grid(fig, axes, len(names), title, path, close=True)


def finish_grid(fig: Any, axes: Any, used: int, title: str | None, path: Any, *, close: bool = False) -> Any:
    """Hide the unused panels of a grid, add the title, lay out and save (closing the figure if asked)."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return fig
