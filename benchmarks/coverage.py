"""Do the error bars cover the truth? Coverage of ``estimate ± 2·stderr`` for every estimator.

For each estimator (the trace methods of ``curvop.trace`` and the diagonal methods of
``curvop.diagonal``) and each test spectrum, runs many seeds on a dense ``Q diag(λ) Qᵀ`` with a
known trace and diagonal, and prints

* the coverage: the fraction of runs (of runs × entries for the diagonal) where
  ``|estimate − truth| ≤ 2·stderr``; about 95 % for an honest error bar (90-99 % is the band
  the tests hold every estimator to),
* the spread: the standard deviation of ``(estimate − truth)/stderr``; about 1 for an honest one
  (above 1: the error bar is too small, below: too wide).

The spectra: flat (``λ`` evenly in [1, 2]), decaying (``1/i`` and ``1/i²``) and low rank plus
noise (ten eigenvalues in [10, 20] over a floor of 0.1). All are positive, so XNysTrace runs too.

    PYTHONPATH=. python benchmarks/coverage.py                         # n=300, 60 and 20 products, 200 seeds
    PYTHONPATH=. python benchmarks/coverage.py --out benchmarks/results/coverage.json
    PYTHONPATH=. python benchmarks/coverage.py --n 100 --matvecs 20 --seeds 1000
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import curvop

TRACE = ("hutchinson", "hutch++", "xtrace", "xnystrace", "auto")
DIAGONAL = ("hutchinson", "xdiag")


def spectra(n: int) -> dict[str, np.ndarray]:
    i = np.arange(1, n + 1)
    return {"flat": np.linspace(1.0, 2.0, n), "1/i": 1.0 / i, "1/i²": 1.0 / i**2,
            "low rank + noise": np.r_[np.linspace(10.0, 20.0, 10), np.full(n - 10, 0.1)]}


def matrix(lam: np.ndarray, seed: int = 1) -> np.ndarray:
    """``Q diag(lam) Qᵀ`` with a Haar-random orthogonal ``Q``."""
    Q, R = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def _row(z: np.ndarray) -> dict[str, float]:
    return {"coverage": float(np.mean(np.abs(z) <= 2)), "spread": float(np.std(z))}


def coverage(n: int, matvecs: int, seeds: int) -> list[dict]:
    """One row per (estimator, spectrum): coverage of ``± 2·stderr`` and spread of the z-scores."""
    rows = []
    for name, lam in spectra(n).items():
        A = matrix(lam)
        tr, diag = float(lam.sum()), np.diag(A)
        for method in TRACE:
            rs = [curvop.trace(A, method=method, num_matvecs=matvecs, seed=s) for s in range(seeds)]
            z = np.array([(r.estimate - tr) / r.stderr for r in rs])
            ran = sorted({r.method for r in rs})
            rows.append({"quantity": "trace", "method": method, "spectrum": name, "ran": ran, **_row(z)})
        for method in DIAGONAL:
            z = np.concatenate([(r.estimate - diag) / r.stderr for r in
                                (curvop.diagonal(A, method=method, num_matvecs=matvecs, seed=s) for s in range(seeds))])
            rows.append({"quantity": "diagonal", "method": method, "spectrum": name, "ran": [method], **_row(z)})
    return rows


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["spectrum"] for r in rows))
    keys = list(dict.fromkeys((r["quantity"], r["method"]) for r in rows))
    cell = {(r["quantity"], r["method"], r["spectrum"]): r for r in rows}
    lines = ["| estimator | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for q, m in keys:
        label = f"{q} {m}" + (f" (ran {'/'.join(cell[(q, m, names[0])]['ran'])} on flat)" if m == "auto" else "")
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * cell[(q, m, s)]['coverage']:.1f} % ({cell[(q, m, s)]['spread']:.2f})" for s in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="matrix size (default 300)")
    parser.add_argument("--matvecs", type=int, nargs="+", default=[60, 20], help="budgets (default 60 20)")
    parser.add_argument("--seeds", type=int, default=200, help="seeds per cell (default 200)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    result = {"args": {"n": args.n, "matvecs": args.matvecs, "seeds": args.seeds}, "tables": {}}
    for m in args.matvecs:
        t0 = time.perf_counter()
        rows = coverage(args.n, m, args.seeds)
        result["tables"][str(m)] = rows
        print(f"\nn = {args.n}, {m} products, {args.seeds} seeds: coverage of estimate ± 2·stderr "
              f"(spread of (estimate − truth)/stderr)\n")
        print(table(rows))
        print(f"\n({time.perf_counter() - t0:.1f} s)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
