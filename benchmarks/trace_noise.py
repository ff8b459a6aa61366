"""How much of a trace comparison at 100 products is noise: the peers benchmark's MLP, many seeds.

    PYTHONPATH=. python benchmarks/trace_noise.py [--seeds 400] [--budget 100]

``benchmarks/peers.py`` compares median errors over 40 seeds. On the flat-spectrum MLP every
method is close to plain Hutchinson, whose error has a known spread: with Rademacher probes its
standard deviation is ``sqrt(2 (||H||_F² - Σ H_ii²) / m) / |tr H|``, so the median absolute error
is 0.674 of that. This script prints that expectation from the dense Hessian, the deflation gain
``method="auto"`` sees, and the medians over many seeds (and over the first 40, as in the peers
table) for curvop's methods and, when installed, curvlinops' ``hutchinson_trace``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import curvop  # noqa: E402
from benchmarks.peers import mlp_problem  # noqa: E402
from curvop.sketch import deflation_gain, exchangeable_basis  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 40, 32, 10])
    args = ap.parse_args(argv)
    model, crit, batch = mlp_problem(tuple(args.sizes), 128)
    D = curvop.hessian(model, crit, batch).to_dense().astype(np.float64)
    D = (D + D.T) / 2
    n, tr, m = D.shape[0], float(np.trace(D)), args.budget
    sd = np.sqrt(2 * (np.sum(D**2) - np.sum(np.diag(D) ** 2)) / m) / abs(tr)
    Om = np.random.default_rng(0).choice([-1.0, 1.0], size=(n, m // 2))
    Y = D @ Om
    print(f"MLP {tuple(args.sizes)}: n = {n}, trace {tr:.4f}, {m} products, {args.seeds} seeds")
    print(f"Rademacher Hutchinson: relative std {sd:.2e}, expected median |error| {0.674 * sd:.2e}")
    print(f"deflation gain seen by method='auto': {deflation_gain(Om, Y, exchangeable_basis(Y)):.2f} "
          "(XTrace below 0.3)")
    runs = {f"curvop {k}": (lambda s, k=k: curvop.trace(D, method=k, num_matvecs=m, seed=s).estimate)
            for k in ("auto", "hutchinson", "xtrace")}
    try:
        from curvlinops import hutchinson_trace

        Dt = torch.from_numpy(D)
        runs["curvlinops hutchinson_trace"] = lambda s: (torch.manual_seed(s), float(hutchinson_trace(Dt, m)))[1]
    except ImportError:
        print("(curvlinops not installed: its row is skipped)")
    out = {}
    for name, f in runs.items():
        errs = np.array([abs(f(s) - tr) / abs(tr) for s in range(args.seeds)])
        out[name] = (float(np.median(errs)), float(np.median(errs[:40])))
        print(f"  {name:30s} median |error| {out[name][0]:.2e} over {args.seeds} seeds, {out[name][1]:.2e} over the first 40")
    return out


if __name__ == "__main__":
    main()
