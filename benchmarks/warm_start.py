"""Warm-started top eigenvalue during training: products of a warm start against a cold one.

    PYTHONPATH=. python benchmarks/warm_start.py [--steps 300] [--every 10] [--k 1] [--quick]
        [--tol-on residual|eigenvalue ...] [--span-starts] [--out FILE]
    PYTHONPATH=. python benchmarks/warm_start.py --misses-at STEP [--starts 200] --lr LR --tol-on eigenvalue residual
    PYTHONPATH=. python benchmarks/warm_start.py --adversarial --noise 1.49e-8 0.01 0.1 0.3 0.5 1 [--starts 20]

The digits CNN (:func:`curvop.studies.digits.cnn`, float64) is trained with plain SGD on
mini-batches; every ``--every`` steps the top-k eigenvalues of the loss Hessian on a fixed
measurement batch are computed to ``tol=1e-3`` three ways, on the same operator:

* cold: a random start (``seed`` differs per measurement);
* warm: ``v0=`` the previous measurement's :class:`curvop.EigenResult` (combined start);
* for k > 1 also "warm top-1": ``v0=`` the previous top eigenvector only,

and compared with a tight cold solve (``tol=1e-8``, top 3). ``--tol-on`` picks the stopping rule of
cold and warm solves alike (``curvop.eigenvalues(..., tol_on=...)``); given several, each rule gets
its own cold and warm runs (rows ``cold [eigenvalue]`` ...) against the same tight solve, and each
warm row is compared with the cold row of its rule. It prints the mean products per
solve, the ratio warm/cold (the issue's target is <= 1/3) and the largest relative eigenvalue
error of each, and how far the top eigenvector moved between measurements: the sine of its angle
to the previous top eigenvector and to the span of the previous top three (where a block start
of three vectors, at three extra products, could at best begin).
Where the products go: every Lanczos step's relative residual estimate of the top Ritz pair
(``|β y_m| / |θ|``, recorded by wrapping ``curvop.krylov._ritz``) is kept, and the table gives the
warm start's residual after its first product and the products a cold solve needed to get down to
that residual: the share of a cold solve that a start from the previous result can save at most.
``--span-starts`` adds the best case of a block start: the Rayleigh-Ritz vector of the new operator
in the span of the previous tight solve's top three eigenvectors (three products, counted; a
second row does not count them), then Lanczos from it.
The oracle table (k = 1): the products each solve would have needed had its stopping rule known
the tight value (its first Ritz value within ``tol`` of it, + the verification product). No rule
stops earlier from the same start, so "oracle warm / oracle cold" bounds every stopping rule.
``--out FILE`` writes every number as JSON.
``--misses-at STEP`` runs the same training to STEP only and then solves the Hessian there cold from
``--starts`` random seeds under each ``--tol-on`` rule: how often a rule settles on a lower
eigenvalue before the start's share of the top eigenvector shows (docs/training.md).
``--adversarial`` starts from an exact eigenvector of λ₂ of two synthetic spectra, for each ``--noise``
share, and counts the seeds that still find λ₁ (issue 26; docs/training.md, "The random share").
``--noise`` repeats the warm runs with other random shares mixed into the start
(``curvop.eigen.WARM_START_NOISE``: the random unit vector's weight relative to the warm direction;
default 1, the library's), which is how that constant was chosen (docs/training.md, issue 26).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import curvop  # noqa: E402
from curvop import eigen, krylov  # noqa: E402
from curvop.studies import digits  # noqa: E402


_HISTORY: list[float] = []  # relative residual of the top Ritz pair after each product of a solve
_THETA: list[float] = []  # the top Ritz value after each product of a solve
_ritz = krylov._ritz


def _recording_ritz(H, T, beta, P):
    R = _ritz(H, T, beta, P)
    i = R.order[0]
    _HISTORY.append(float(R.res[i] / max(abs(R.theta[i]), 1e-300)))
    _THETA.append(float(R.theta[i]))
    return R


def _oracle_products(thetas: list[float], ref: float, tol: float, verify: int, used: int) -> tuple[int, bool]:
    """Products a solve would need if its stopping rule knew ``ref``: the first product whose top Ritz
    value is within ``tol`` (relative) of it, plus the verification product(s). No stopping rule
    can stop earlier with an eigenvalue that good from the same start, so the warm/cold ratio of
    these counts bounds what any rule could reach. ``(used, False)`` if the solve never got there."""
    hit = next((i + 1 for i, t in enumerate(thetas) if abs(t - ref) <= tol * abs(ref)), None)
    return (used, False) if hit is None else (hit + verify, True)


def _cold_products_to(history: list[float], level: float) -> int:
    """Products a solve needed until its residual first fell to ``level`` (its length if never)."""
    return next((i + 1 for i, r in enumerate(history) if r <= level), len(history))


def _span_start(H, U: np.ndarray, step: int, tol_on: str) -> tuple[int, float]:
    """Rayleigh-Ritz in span(U) (``p`` products), then Lanczos from the best vector: Lanczos products, top value."""
    HU = H.matmat(torch.from_numpy(np.ascontiguousarray(U))).numpy()
    _, Y = np.linalg.eigh(U.T @ HU)
    r = curvop.eigenvalues(H, k=1, tol=1e-3, seed=step, v0=U @ Y[:, -1], tol_on=tol_on)
    return r.num_matvecs, float(r.eigenvalues[0])


LOSS = torch.nn.CrossEntropyLoss()


def sgd_training(steps: int, lr: float, seed: int, measure_size: int):
    """The benchmark's training run: yields ``(step, model, measurement batch)`` before each SGD step
    (batches of 64, reshuffled each epoch) and once after the last."""
    torch.manual_seed(seed)
    data = digits.load(seed=seed)
    x, y = data.x_train.double(), data.y_train
    model = digits.cnn().double()
    batch = (x[:measure_size], y[:measure_size])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    for step in range(steps + 1):
        yield step, model, batch
        if step == steps:
            break
        if (step * 64) % len(y) + 64 > len(y):
            order = torch.randperm(len(y), generator=gen)
        idx = order[(step * 64) % len(y):][:64]
        opt.zero_grad()
        LOSS(model(x[idx]), y[idx]).backward()
        opt.step()


def run(steps: int, every: int, k: int, noises: list[float], lr: float, seed: int, measure_size: int,
        span_starts: bool = False, tol_on: tuple[str, ...] = ("residual",)) -> dict:
    loss_fn = LOSS
    starts = ["cold", *(f"warm noise={s:g}" for s in noises)] + (["warm top-1 only"] if k > 1 else [])
    label = (lambda start, rule: start) if len(tol_on) == 1 else (lambda start, rule: f"{start} [{rule}]")
    spec = {label(start, rule): (start, rule) for rule in tol_on for start in starts}  # row -> start, rule
    rows = {name: [] for name in spec}
    cold_of = {name: label("cold", rule) for name, (_, rule) in spec.items()}
    span_names = ("Rayleigh-Ritz in previous top-3 span (+3 products)",
                  "same, the 3 products not counted (a free block start)")
    span_row = {name: [] for name in span_names} if span_starts and k == 1 else {}
    prev: dict[str, curvop.EigenResult | None] = {name: None for name in rows}
    prev_V, moved, losses = None, [], []
    history: dict[str, list[float]] = {}
    saved: dict[str, list[tuple[float, int]]] = {name: [] for name in rows}
    oracle: dict[str, list[tuple[int, bool]]] = {name: [] for name in rows}
    krylov._ritz = _recording_ritz
    t0 = time.perf_counter()
    for step, model, batch in sgd_training(steps, lr, seed, measure_size):
        if step % every == 0:
            H = curvop.hessian(model, loss_fn, batch, check_deterministic=False)
            tight = curvop.eigenvalues(H, k=max(k, 3), tol=1e-8, max_matvecs=2000, seed=10_000 + step)
            ref, V = tight.eigenvalues[:k], tight.eigenvectors.numpy()
            if prev_V is not None:  # how far the top eigenvector left the previous top-1 / top-3 span
                c = prev_V.T @ V[:, 0]
                moved.append([float(np.sqrt(max(0.0, 1 - np.sum(c[:p] ** 2)))) for p in (1, 3)])
            if span_starts and prev_V is not None and k == 1:
                mv, lam = _span_start(H, prev_V, step, tol_on[0])
                for name, extra in zip(span_names, (prev_V.shape[1], 0)):
                    span_row[name].append((mv + extra, abs(lam - ref[0]) / abs(ref[0]), True))
            prev_V = V
            with torch.no_grad():
                losses.append([step, float(loss_fn(model(batch[0]), batch[1]))])
            for name in spec:
                (start, rule), v0 = spec[name], prev[name]
                if start.startswith("warm noise="):
                    eigen.WARM_START_NOISE = float(start.split("=")[1])
                elif start == "warm top-1 only" and v0 is not None:
                    v0 = v0.eigenvectors[:, 0]
                if start == "cold":
                    v0 = None
                _HISTORY.clear()
                _THETA.clear()
                r = curvop.eigenvalues(H, k=k, tol=1e-3, seed=step, v0=v0, tol_on=rule)
                history[name] = list(_HISTORY)
                err = float(np.max(np.abs(r.eigenvalues - ref) / np.abs(ref)))
                if step > 0:  # the first warm solve is a cold one: step 0 is not counted
                    rows[name].append((r.num_matvecs, err, r.converged))
                    if k == 1:
                        oracle[name].append(_oracle_products(_THETA, ref[0], 1e-3, 1, r.num_matvecs))
                prev[name] = r
            if step > 0 and k == 1:
                for name in spec:
                    if spec[name][0] != "cold":
                        first = history[name][0]
                        saved[name].append((first, _cold_products_to(history[cold_of[name]], first)))
            eigen.WARM_START_NOISE = 1.0
    krylov._ritz = _ritz
    rows.update(span_row)
    seconds = time.perf_counter() - t0
    cold_mvs = {name: np.array([m for m, _, _ in rows[cold_of.get(name, label("cold", tol_on[0]))]], dtype=float)
                for name in rows}
    print(f"digits CNN (n = {sum(p.numel() for p in model.parameters())}), SGD lr={lr}, {steps} steps, "
          f"top-{k} eigenvalue(s) to tol=1e-3 (tol_on={', '.join(tol_on)}) every {every} steps on "
          f"{measure_size} images ({len(rows[label('cold', tol_on[0])])} solves, {seconds:.0f} s)")
    moved = np.array(moved)
    print(f"between measurements the top eigenvector's angle to the previous top-1 span has mean sine "
          f"{moved[:, 0].mean():.3f}, to the previous top-3 span {moved[:, 1].mean():.3f}; loss on the "
          f"measurement batch {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    out = {"moved": moved.mean(axis=0).tolist(), "loss": losses}
    print("| start | mean products | warm / cold | first half | second half | max rel. error vs tol=1e-8 | all converged |")
    print("|---|---|---|---|---|---|---|")
    for name, vals in rows.items():
        cold_mv = cold_mvs[name]
        cold = cold_mv.mean()
        mv = np.array([m for m, _, _ in vals], dtype=float)
        errs = np.array([e for _, e, _ in vals])
        h = len(mv) // 2
        halves = [mv[:h].mean() / cold_mv[:h].mean(), mv[h:].mean() / cold_mv[h:].mean()]
        out[name] = dict(mean_products=float(mv.mean()), ratio=float(mv.mean() / cold), halves=halves,
                         max_error=float(errs.max()), converged=bool(all(c for _, _, c in vals)))
        print(f"| {name} | {mv.mean():.1f} | {mv.mean() / cold:.2f} | {halves[0]:.2f} | {halves[1]:.2f} | "
              f"{errs.max():.1e} | {out[name]['converged']} |")
    if k == 1:
        print("\nA stopping rule that knew the answer (the first product within tol of the tight value, + verification):")
        print("| start | oracle products (mean) | oracle warm / oracle cold | oracle warm / cold with its rule |")
        print("|---|---|---|---|")
        for name, vals in oracle.items():
            if vals:
                mv = np.mean([m for m, _ in vals])
                cold_or = np.mean([m for m, _ in oracle[cold_of[name]]])
                out[name].update(oracle_products=float(mv), oracle_ratio=float(mv / cold_or),
                                 oracle_reached=bool(all(ok for _, ok in vals)))
                print(f"| {name} | {mv:.2f} | {mv / cold_or:.3f} | {mv / cold_mvs[name].mean():.3f} |"
                      + ("" if out[name]["oracle_reached"] else " (some solves never got within tol)"))
        print("\n| start | residual after its 1st product (mean) | cold products to reach it (mean) | "
              "warm products (mean) | cold products (mean) |")
        print("|---|---|---|---|---|")
        for name, vals in saved.items():
            if vals:
                first, reach = np.mean([f for f, _ in vals]), np.mean([c for _, c in vals])
                mv = np.mean([m for m, _, _ in rows[name]])
                out[name].update(first_residual=float(first), cold_products_to_reach_it=float(reach))
                print(f"| {name} | {first:.2e} | {reach:.1f} | {mv:.1f} | {cold_mvs[name].mean():.1f} |")
    return out


def random_start_misses(at_step: int, lr: float, seed: int, measure_size: int, starts: int,
                        tol_on: tuple[str, ...]) -> dict:
    """Cold solves from ``starts`` random seeds on the Hessian at ``at_step``: how often each rule
    returns an eigenvalue more than ``tol`` below λ_max (it settled on a lower eigenvalue)."""
    for _, model, batch in sgd_training(at_step, lr, seed, measure_size):
        pass
    H = curvop.hessian(model, LOSS, batch, check_deterministic=False)
    top = curvop.eigenvalues(H, k=3, tol=1e-9, max_matvecs=2000, seed=1).eigenvalues
    out = {"step": at_step, "top3": top.tolist()}
    print(f"digits CNN, SGD lr={lr}, step {at_step}: top eigenvalues {np.round(top, 4)}; cold solves to "
          f"tol=1e-3 from {starts} random starts")
    print("| stopping rule | missed λ_max (error > tol) | largest error | mean products |")
    print("|---|---|---|---|")
    for rule in tol_on:
        res = [curvop.eigenvalues(H, k=1, tol=1e-3, seed=s, tol_on=rule) for s in range(starts)]
        errs = np.array([abs(r.eigenvalues[0] - top[0]) / top[0] for r in res])
        mv = float(np.mean([r.num_matvecs for r in res]))
        out[rule] = dict(missed=int(np.sum(errs > 1e-3)), max_error=float(errs.max()), mean_products=mv)
        print(f"| {rule} | {out[rule]['missed']} of {starts} | {errs.max():.1e} | {mv:.1f} |")
    return out


def adversarial_starts(shares: list[float], seeds: int) -> dict:
    """``v0`` an exact eigenvector of λ₂ (issue 26): from how many seeds each share and rule still finds λ₁.

    Two synthetic spectra (random eigenvectors): n = 200 evenly from 60 to 0, and n = 1000 with its top
    three eigenvalues 1 % apart above a bulk from 30 to 0; ``tol=1e-6``; "cold" is a random start."""
    out = {}
    spectra = {"n = 200, 60 to 0 evenly": np.linspace(60.0, 0.0, 200),
               "n = 1000, top three 1 % apart": np.r_[[60.0, 59.4, 59.0], np.linspace(30.0, 0.0, 997)]}
    print("| spectrum | rule | " + " | ".join(f"share {s:g}" for s in shares) + " | cold start |")
    print("|---|---|" + "---|" * (len(shares) + 1))
    for name, lam in spectra.items():
        U = np.linalg.qr(np.random.default_rng(0).standard_normal((lam.size, lam.size)))[0]
        A = (U * lam) @ U.T
        for rule in ("residual", "eigenvalue"):
            found = []
            for share in [*shares, None]:
                eigen.WARM_START_NOISE = 1.0 if share is None else share
                v0 = None if share is None else U[:, 1]
                hits = sum(lam[0] - curvop.eigenvalues(A, v0=v0, seed=s, tol_on=rule).eigenvalues[0] <= 2e-6 * lam[0]
                           for s in range(seeds))
                found.append(int(hits))
            eigen.WARM_START_NOISE = 1.0
            out[f"{name} [{rule}]"] = found
            print(f"| {name} | {rule} | " + " | ".join(str(f) for f in found) + " |", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-size", type=int, default=512)
    ap.add_argument("--noise", type=float, nargs="+", default=[1.0])
    ap.add_argument("--quick", action="store_true", help="60 steps on 256 images")
    ap.add_argument("--tol-on", nargs="+", choices=["residual", "eigenvalue"], default=["residual"],
                    help="stopping rule(s) of the cold and warm solves (curvop.eigenvalues' tol_on)")
    ap.add_argument("--span-starts", action="store_true",
                    help="also a block start: Rayleigh-Ritz in the previous tight solve's top-3 span, then Lanczos")
    ap.add_argument("--out", help="also write the numbers as JSON to this file")
    ap.add_argument("--misses-at", type=int, metavar="STEP",
                    help="instead: cold solves from --starts random seeds on the Hessian at STEP, per rule")
    ap.add_argument("--starts", type=int, default=200)
    ap.add_argument("--adversarial", action="store_true",
                    help="instead: v0 an exact eigenvector of lambda_2 on two synthetic spectra, for each --noise share")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.steps, a.measure_size = 60, 256
    if a.adversarial:
        import warnings

        warnings.simplefilter("ignore", curvop.ConvergenceWarning)
        out = adversarial_starts(a.noise, min(a.starts, 20))
    elif a.misses_at is not None:
        out = random_start_misses(a.misses_at, a.lr, a.seed, a.measure_size, a.starts, tuple(a.tol_on))
    else:
            out = run(a.steps, a.every, a.k, a.noise, a.lr, a.seed, a.measure_size, a.span_starts, tuple(a.tol_on))
    if a.out:
        out["args"] = {key: val for key, val in vars(a).items() if key != "out"}
        pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
