"""One measurement of a Hessian: top eigenvalues, trace and spectral density, each timed.

Shared by ``curvop demo``, ``curvop spectrum`` and the studies, so that they all report the same
quantities in the same format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Measurement", "measure", "fmt", "slq_trace"]


def fmt(x: float) -> str:
    """The one number format of the printed tables (and so of what tests compare with JSON)."""
    return f"{x:.6g}"


def slq_trace(sd: Any) -> tuple[float, float | None]:
    """The SLQ trace of a :class:`curvop.SpectralDensity` and its standard error across probes.

    Each probe's quadrature gives ``n Σ_j w_j θ_j``, which is exactly ``zᵀHz`` for its Rademacher
    probe ``z`` (Gauss quadrature is exact for ``f(x) = x``): a Hutchinson sample. The mean is
    ``sd.trace()``; the standard error is the samples' ``std / sqrt(probes)``, ``None`` with one probe.

    >>> import numpy as np, curvop
    >>> sd = curvop.spectral_density(np.diag([1.0, 2.0, 3.0]), num_steps=3, num_probes=2, seed=0)
    >>> tuple(round(x, 8) for x in slq_trace(sd))
    (6.0, 0.0)
    """
    samples = np.array([sd.n * float(np.dot(w, x)) for x, w in zip(sd.nodes, sd.weights)])
    stderr = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else None
    return float(samples.mean()), stderr


@dataclass(frozen=True)
class Step:
    """What one algorithm reported: its products and its wall time."""

    num_matvecs: int
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """Top eigenvalues, trace and density of one Hessian, with the cost of each.

    Attributes
    ----------
    n : int
        Number of parameters (the Hessian is ``n x n``).
    eigenvalues : numpy array
        The ``k`` largest eigenvalues, in decreasing order.
    eigen_converged : bool
    trace, trace_stderr : float
        XTrace estimate of ``tr H`` and its standard error (the exact trace, error 0, when the
        budget reaches n: ``trace_method`` is then ``"exact"``).
    density : curvop.SpectralDensity
        The SLQ nodes and weights (its trace, with a standard error: :func:`slq_trace`).
    steps : dict
        ``"eigenvalues"``, ``"trace"``, ``"density"`` -> :class:`Step`.
    """

    n: int
    eigenvalues: np.ndarray
    eigen_converged: bool
    trace: float
    trace_stderr: float
    density: Any
    steps: dict[str, Step] = field(default_factory=dict)
    trace_method: str = "xtrace"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (the density as its SLQ trace ± stderr and per-probe nodes and weights)."""
        sd = self.density
        density_trace, density_stderr = slq_trace(sd)
        return {
            "num_parameters": self.n,
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "eigenvalues_converged": self.eigen_converged,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "density_trace": density_trace,
            "density_trace_stderr": density_stderr,
            "density": {"nodes": [a.tolist() for a in sd.nodes], "weights": [a.tolist() for a in sd.weights]},
            "num_matvecs": {k: s.num_matvecs for k, s in self.steps.items()},
            "seconds": {k: round(s.seconds, 3) for k, s in self.steps.items()},
        }

    def table(self) -> str:
        """A fixed-width table: one row per quantity, with products used and seconds.

        Both traces carry their standard errors; with one SLQ probe there is none, so the density
        row shows no trace (its job is the shape, drawn in ``density.png``).
        """
        s = self.steps
        rows = [(f"eigenvalue {i + 1}", fmt(v), "", "") for i, v in enumerate(self.eigenvalues)]
        rows[0] = (*rows[0][:2], str(s["eigenvalues"].num_matvecs), f"{s['eigenvalues'].seconds:.1f}")
        label = "trace (exact)" if self.trace_method == "exact" else "trace (XTrace)"
        rows.append((label, f"{fmt(self.trace)} ± {fmt(self.trace_stderr)}",
                     str(s["trace"].num_matvecs), f"{s['trace'].seconds:.1f}"))
        slq, slq_err = slq_trace(self.density)
        probes = len(self.density.nodes)
        rows.append((f"trace (SLQ, {probes} probes)" if slq_err is not None else "density (SLQ, 1 probe)",
                     f"{fmt(slq)} ± {fmt(slq_err)}" if slq_err is not None else "(no error bar: not shown)",
                     str(s["density"].num_matvecs), f"{s['density'].seconds:.1f}"))
        # Formatted here, not with a table library: curvop depends on numpy, scipy and array-api-compat
        # only, and a dependency (tabulate, rich) for four padded columns is not worth its weight.
        head = ("quantity", "value", "matvecs", "seconds")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

        def line(r: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def measure(H: Any, *, k: int = 5, trace_matvecs: int = 99, steps: int = 80, probes: int = 2,
            tol: float = 1e-5, seed: int = 0, progress: bool = False) -> Measurement:
    """Run the three algorithms on ``H`` with seeded probes and time each.

    Parameters
    ----------
    H : curvop.HessianOperator or operator-like
    k : int
        Number of top eigenvalues (Lanczos, largest algebraic).
    trace_matvecs : int
        Budget of the XTrace trace estimate.
    steps, probes : int
        Lanczos steps per probe and number of probes of the SLQ density.
    tol : float
        Relative residual of the eigenvalues.
    seed : int
    progress : bool
        tqdm bars for each step.
    """
    import curvop

    k = min(k, H.shape[0] - 1)
    timed: dict[str, Step] = {}

    def run(name: str, fn: Any) -> Any:
        t = time.perf_counter()
        out = fn()
        timed[name] = Step(int(out.num_matvecs), time.perf_counter() - t)
        return out

    eig = run("eigenvalues", lambda: curvop.eigenvalues(H, k=k, tol=tol, seed=seed, progress=progress))
    # XTrace explicitly (not the "auto" default): the committed demo and study outputs were made with it
    tr = run("trace", lambda: curvop.trace(H, method="xtrace", num_matvecs=trace_matvecs, seed=seed,
                                           progress=progress))
    sd = run("density", lambda: curvop.spectral_density(H, num_steps=steps, num_probes=probes, seed=seed,
                                                        progress=progress))
    order = np.argsort(eig.eigenvalues)[::-1]
    return Measurement(n=int(H.shape[0]), eigenvalues=np.asarray(eig.eigenvalues)[order],
                       eigen_converged=bool(eig.converged), trace=float(tr.estimate),
                       trace_stderr=float(tr.stderr), density=sd, steps=timed, trace_method=str(tr.method))
