"""Accuracy at a fixed budget of Hessian-vector products, beside PyHessian's published numbers.

PyHessian's slide: on a 1000 × 1000 matrix with 20 iterations, the top eigenvalue has 0.3 %
relative error, the Hutchinson trace 0.1 % and the trace of the SLQ spectral density 0.4 %.
This script runs the same experiment (``A = GᵀG``, ``G`` 1000 × 1000 standard normal, 20 products)
for each of curvop's methods and for plain power iteration, and prints the median relative error
over seeds. A second table uses a decaying spectrum (eigenvalues ``1/i²``), where the low-rank
trace estimators shine.

    PYTHONPATH=. python benchmarks/accuracy.py            # 20 seeds, about a minute
    PYTHONPATH=. python benchmarks/accuracy.py --quick    # small and fast (used by the tests)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import curvop

PYHESSIAN = {"top eigenvalue": "0.3%", "trace": "0.1%", "SLQ trace": "0.4%"}


def _median_error(fn, truth: float, seeds: range) -> float:
    return float(np.median([abs(fn(s) - truth) / abs(truth) for s in seeds]))


def flat_table(n: int, budget: int, seeds: range) -> list[tuple[str, str, float]]:
    """Rows (quantity, method, median relative error) on ``A = GᵀG``."""
    G = np.random.default_rng(12345).standard_normal((n, n))
    A = G.T @ G
    top, tr = float(np.linalg.eigvalsh(A)[-1]), float(np.trace(A))
    rows = [
        ("top eigenvalue", "lanczos",
         _median_error(lambda s: curvop.eigenvalues(A, max_matvecs=budget, verify=False, seed=s).eigenvalues[0], top,
                       seeds)),
        ("top eigenvalue", "power iteration",
         _median_error(lambda s: curvop.eigenvalues(A, which="LM", method="power", max_matvecs=budget,
                                                    seed=s).eigenvalues[0], top, seeds)),
    ]
    for method in ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace"):
        rows.append(("trace", method, _median_error(
            lambda s: curvop.trace(A, method=method, num_matvecs=budget, seed=s).estimate, tr, seeds)))
    for probes in (1, 2):
        steps = budget // probes
        rows.append(("SLQ trace", f"slq {probes} probe{'s' * (probes > 1)} x {steps} steps", _median_error(
            lambda s: curvop.spectral_density(A, num_steps=steps, num_probes=probes, seed=s).trace(), tr, seeds)))
    return rows


def decaying_table(n: int, budget: int, seeds: range) -> list[tuple[str, str, float]]:
    """Trace rows on ``Q diag(1/i²) Qᵀ``."""
    lam = 1.0 / np.arange(1, n + 1) ** 2
    Q, _ = np.linalg.qr(np.random.default_rng(54321).standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    return [("trace", method, _median_error(
        lambda s: curvop.trace(A, method=method, num_matvecs=budget, seed=s).estimate, lam.sum(), seeds))
        for method in ("auto", "hutchinson", "hutch++", "xtrace", "xnystrace")]


def _print(title: str, rows, reference: bool) -> None:
    print(f"\n{title}\n")
    head = "| quantity | method | median rel. error |" + (" PyHessian (published) |" if reference else "")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for quantity, method, err in rows:
        ref = f" {PYHESSIAN[quantity]} |" if reference else ""
        print(f"| {quantity} | {method} | {err:.2e} |{ref}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small matrices and 3 seeds (a few seconds)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 20, quick 3)")
    args = parser.parse_args(argv)
    n_flat, n_decay = (150, 200) if args.quick else (1000, 1000)
    seeds = range(args.seeds or (3 if args.quick else 20))
    t0 = time.perf_counter()
    _print(f"A = GᵀG, G {n_flat}×{n_flat} standard normal, 20 Hessian-vector products, "
           f"median over {len(seeds)} seeds", flat_table(n_flat, 20, seeds), reference=True)
    _print(f"Decaying spectrum 1/i², n = {n_decay}, 60 products, median over {len(seeds)} seeds",
           decaying_table(n_decay, 60, seeds), reference=False)
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
