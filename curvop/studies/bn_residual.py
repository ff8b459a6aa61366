"""PyHessian's BatchNorm / residual-connection study on scikit-learn's digits, with error bars.

The PyHessian paper (Yao et al., 2020) reports, from the spectra of trained networks:

1. shallow networks: the one *without* BatchNorm has the flatter Hessian spectrum;
2. deep networks: the one *with* BatchNorm has the flatter spectrum;
3. residual connections flatten the spectrum.

Every network here is trained from several seeds (initial weights and batch order) until its
training loss on the Hessian's images reaches one common target, so that networks are compared
at the same loss. "Flatter" is judged on the top eigenvalue and the trace, each as mean ±
standard error over seeds. For each metric the difference ``sharper − flatter`` is divided by its
combined standard error ``sqrt(se₁² + se₂²)`` (Welch's t statistic): above 1 the metric
*supports* the claim, below −1 it *opposes* it, otherwise it is *within noise*. A claim is
*reproduced* when both metrics support it, *mixed* when one does, *not reproduced* otherwise.
Welch's two-sided p-value is reported alongside.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Config", "Scale", "CLAIMS", "configs", "run", "compare", "verdict", "report", "plot_densities"]


@dataclass(frozen=True)
class Config:
    """One network of the study."""

    name: str
    blocks: int
    batchnorm: bool
    residual: bool


@dataclass(frozen=True)
class Scale:
    """Sizes and budgets of a run (``FULL`` or ``QUICK``)."""

    width: int
    shallow: int
    deep: int
    seeds: int
    target_loss: float
    max_epochs: int
    lr: float
    check_every: int
    max_train: int | None
    hessian_images: int
    trace_matvecs: int
    steps: int
    probes: int


FULL = Scale(width=8, shallow=1, deep=4, seeds=5, target_loss=0.4, max_epochs=40, lr=1e-2, check_every=2,
             max_train=None, hessian_images=512, trace_matvecs=40, steps=40, probes=1)
QUICK = Scale(width=8, shallow=1, deep=2, seeds=2, target_loss=1.5, max_epochs=30, lr=1e-2, check_every=1,
              max_train=256, hessian_images=128, trace_matvecs=10, steps=10, probes=1)

#: (claim, network expected flatter, network expected sharper)
CLAIMS = [
    ("shallow: without BatchNorm is flatter", "shallow, no BN", "shallow, BN"),
    ("deep (residual): with BatchNorm is flatter", "deep, BN", "deep, no BN"),
    ("deep (plain): with BatchNorm is flatter", "deep plain, BN", "deep plain, no BN"),
    ("residual connections flatten (with BN)", "deep, BN", "deep plain, BN"),
    ("residual connections flatten (no BN)", "deep, no BN", "deep plain, no BN"),
]
METRICS = (("top_eigenvalue", "top eigenvalue"), ("trace", "trace"))


def configs(scale: Scale) -> list[Config]:
    """Shallow ±BN (residual), deep ±BN with residual connections, deep ±BN without."""
    return [
        Config("shallow, BN", scale.shallow, True, True),
        Config("shallow, no BN", scale.shallow, False, True),
        Config("deep, BN", scale.deep, True, True),
        Config("deep, no BN", scale.deep, False, True),
        Config("deep plain, BN", scale.deep, True, False),
        Config("deep plain, no BN", scale.deep, False, False),
    ]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation, ddof=1, over ``sqrt(n)``)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


def compare(flat: Sequence[float], sharp: Sequence[float]) -> dict[str, Any]:
    """Welch's comparison of a metric between the network expected flatter and the one expected sharper.

    Returns the means, standard errors, ``t = (mean_sharp − mean_flat) / sqrt(se_flat² + se_sharp²)``,
    the Welch–Satterthwaite degrees of freedom, the two-sided p-value and ``support``: ``"supports"``
    (t > 1: the expected difference exceeds its combined standard error), ``"opposes"`` (t < −1) or
    ``"within noise"``.

    Examples
    --------
    >>> from curvop.studies.bn_residual import compare
    >>> compare([1.0, 1.1, 0.9], [2.0, 2.2, 1.8])["support"]
    'supports'
    >>> compare([1.0, 1.5, 0.5], [1.1, 1.6, 0.6])["support"]
    'within noise'
    """
    from scipy import stats

    (mf, sf), (ms, ss) = mean_se(flat), mean_se(sharp)
    se = math.hypot(sf, ss)
    t = (ms - mf) / se if se > 0 else math.copysign(math.inf, ms - mf) if ms != mf else 0.0
    nf, ns = len(flat), len(sharp)
    dof = se**4 / (sf**4 / (nf - 1) + ss**4 / (ns - 1)) if se > 0 else math.inf
    p = float(2 * stats.t.sf(abs(t), dof)) if math.isfinite(t) else 0.0
    support = "supports" if t > 1 else "opposes" if t < -1 else "within noise"
    return {"flatter_mean": mf, "flatter_se": sf, "sharper_mean": ms, "sharper_se": ss,
            "ratio": ms / mf if mf else math.inf, "t": t, "dof": dof, "p": p, "support": support}


def verdict(tests: Sequence[dict[str, Any]]) -> str:
    """``"reproduced"`` when every metric supports the claim, ``"mixed"`` when some do, else ``"not reproduced"``."""
    n = sum(t["support"] == "supports" for t in tests)
    return "reproduced" if n == len(tests) else "mixed" if n else "not reproduced"


def _one(cfg: Config, scale: Scale, data: Any, seed: int, quiet: bool) -> tuple[dict[str, Any], Any]:
    import torch

    import curvop
    from curvop.studies import digits
    from curvop.studies.measure import measure

    x, y = data.train
    batch = (x[: scale.hessian_images], y[: scale.hessian_images])
    digits.seed_everything(seed)
    model = digits.resnet(cfg.blocks, batchnorm=cfg.batchnorm, residual=cfg.residual, width=scale.width)
    t = time.perf_counter()
    fit = digits.train_to_loss(model, data, scale.target_loss, probe=batch, max_epochs=scale.max_epochs,
                               seed=seed, lr=scale.lr, check_every=scale.check_every, progress=not quiet,
                               desc=f"{cfg.name} (seed {seed})")
    train_s = time.perf_counter() - t
    H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), batch)
    m = measure(H, k=1, trace_matvecs=scale.trace_matvecs, steps=scale.steps, probes=scale.probes,
                tol=1e-4, seed=seed, progress=not quiet)
    row = {"seed": seed, "train_loss": fit.loss, "reached_target": fit.reached, "epochs": round(fit.epochs, 2),
           "train_seconds": round(train_s, 2), "test_accuracy": digits.accuracy(model, data.x_test, data.y_test),
           "top_eigenvalue": float(m.eigenvalues[0]), **m.as_dict()}
    for key in ("density", "eigenvalues"):
        del row[key]
    return row, m.density


def _summary(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": cfg.name, "layers": 2 * cfg.blocks + 2, "batchnorm": cfg.batchnorm,
                           "residual": cfg.residual, "num_parameters": runs[0]["num_parameters"],
                           "all_reached_target": all(r["reached_target"] for r in runs)}
    for key in ("train_loss", "epochs", "test_accuracy", "top_eigenvalue", "trace"):
        out[key], out[key + "_se"] = mean_se([r[key] for r in runs])
    out["runs"] = runs
    return out


def run(out: str, *, quick: bool = False, seed: int = 0, quiet: bool = False, command: str = "",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and measure every network from ``scale.seeds`` seeds; write ``report.md``,
    ``densities.png`` and ``results.json`` to ``out``.

    ``seed`` fixes the train/test split; the networks use seeds ``seed, seed + 1, ...`` for their
    initial weights, batch order and probes.
    """
    from curvop.studies import digits

    scale = QUICK if quick else FULL
    start, cpu = time.perf_counter(), time.process_time()
    data = digits.load(seed, max_train=scale.max_train)
    seeds = [seed + i for i in range(scale.seeds)]
    networks, densities = [], {}
    for cfg in configs(scale):
        runs, densities[cfg.name] = [], []
        for s in seeds:
            row, sd = _one(cfg, scale, data, s, quiet)
            runs.append(row)
            densities[cfg.name].append((row["top_eigenvalue"], sd))
        net = _summary(cfg, runs)
        networks.append(net)
        say(f"{cfg.name:18s} λmax {net['top_eigenvalue']:8.4g} ± {net['top_eigenvalue_se']:<8.2g} "
            f"trace {net['trace']:8.4g} ± {net['trace_se']:<8.2g} train loss {net['train_loss']:.3f}  "
            f"test acc {100 * net['test_accuracy']:.1f} %")
    by_name = {n["name"]: n for n in networks}
    claims = []
    for claim, flat, sharp in CLAIMS:
        tests = {key: compare([r[key] for r in by_name[flat]["runs"]], [r[key] for r in by_name[sharp]["runs"]])
                 for key, _ in METRICS}
        claims.append({"claim": claim, "flatter": flat, "sharper": sharp, "tests": tests,
                       "verdict": verdict(list(tests.values()))})
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    plot_densities(densities, labels=[f"seed {s}" for s in seeds], path=str(path / "densities.png"),
                   title=f"Hessian spectral densities at training loss {scale.target_loss} ({len(seeds)} seeds each)")
    results = {"command": command, "seed": seed, "seeds": seeds, "scale": asdict(scale), "networks": networks,
               "claims": claims, "total_seconds": round(time.perf_counter() - start, 1),
               "cpu_seconds": round(time.process_time() - cpu, 1)}
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (path / "report.md").write_text(report(results))
    say(f"wrote {path / 'report.md'}, {path / 'densities.png'} and {path / 'results.json'}")
    return results


def plot_densities(densities: dict[str, list[tuple[float, Any]]], *, labels: Sequence[str] | None = None,
                   path: str | None = None, title: str | None = None, columns: int = 2) -> Any:
    """One panel per network, the density of every seed overlaid, in PyHessian's style.

    PyHessian's style: each Ritz value a Gaussian of variance ``1e-5 · max(1, spectral width)``,
    a logarithmic density axis floored at 1e-7 of the peak, and the top eigenvalue of each seed
    marked (dashed, in the seed's colour). ``densities`` maps a network's name to
    ``[(top eigenvalue, curvop.SpectralDensity), ...]``, one per seed; ``labels`` names the seeds in
    the legend. Returns the matplotlib Figure.
    """
    from matplotlib.figure import Figure

    names = list(densities)
    rows = (len(names) + columns - 1) // columns
    fig = Figure(figsize=(5.0 * columns, 3.2 * rows))
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for ax, name in zip(axes.flat, names):
        nodes = np.concatenate([np.concatenate(sd.nodes) for _, sd in densities[name]])
        width = float(nodes.max() - nodes.min())
        sigma = math.sqrt(1e-5 * max(1.0, width))
        pad = max(1.0, 0.05 * width)
        grid = np.linspace(float(nodes.min()) - pad, float(nodes.max()) + pad, 4000)
        for i, (top, sd) in enumerate(densities[name]):
            _, values = sd.density(grid=grid, sigma=sigma)
            ax.semilogy(grid, np.maximum(values, 1e-7 * values.max()), color=f"C{i}", lw=0.9, alpha=0.8,
                        label=labels[i] if labels else f"run {i}")
            ax.axvline(top, color=f"C{i}", ls="--", lw=0.7, alpha=0.7)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="x-small", loc="upper right")
    from curvop.plot import finish_grid

    return finish_grid(fig, axes, len(names), title, path)


def _steps(k: int) -> str:
    return "step" if k == 1 else f"{k} steps"


def _p_at_one(n: int) -> float:
    """Two-sided p-value of t = 1 for two groups of ``n`` with equal variances (dof 2n − 2)."""
    from scipy import stats

    return float(2 * stats.t.sf(1.0, max(1, 2 * n - 2)))


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4g} ± {se:.2g}"


def report(res: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    s = res["scale"]
    n = len(res["seeds"])
    lines = [
        "# BatchNorm and residual connections: PyHessian's study on scikit-learn's digits", "",
        f"Made by `{res['command']}` in {res['total_seconds']:.0f} s of wall-clock time, "
        f"{res['cpu_seconds']:.0f} s of CPU time (torch on one thread; the wall-clock time depends on "
        "what else the machine was running).", "",
        f"Six CNNs of width {s['width']} (shallow: {2 * s['shallow'] + 2} layers, deep: {2 * s['deep'] + 2} "
        f"layers; residual blocks of two 3x3 convs unless *plain*), each trained from {n} seeds "
        f"({', '.join(map(str, res['seeds']))}: initial weights, batch order and probes) with Adam "
        f"(learning rate {s['lr']:g}, batches of 64) until the mean cross-entropy of the model in eval mode "
        f"on the first {s['hessian_images']} training images reached **{s['target_loss']:g}** (checked every "
        f"epoch, then every {_steps(s['check_every'])} once it or the mini-batch loss was below twice the target; at "
        f"most {s['max_epochs']} "
        f"epochs). The Hessian is the one of that same loss, so every network is measured at the same "
        f"loss. Top eigenvalue by Lanczos, trace by XTrace ({s['trace_matvecs']} products), density by SLQ "
        f"({s['probes']} probe x {s['steps']} steps). Values are mean ± standard error over the seeds.", "",
        "| network | layers | BN | residual | params | train loss | epochs | test acc | top eigenvalue | trace |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["networks"]:
        loss = _pm(r["train_loss"], r["train_loss_se"]) + ("" if r["all_reached_target"] else " (not all reached)")
        lines.append(f"| {r['name']} | {r['layers']} | {'yes' if r['batchnorm'] else 'no'} | "
                     f"{'yes' if r['residual'] else 'no'} | {r['num_parameters']:,} | {loss} | "
                     f"{r['epochs']:.1f} | {100 * r['test_accuracy']:.1f} ± {100 * r['test_accuracy_se']:.1g} % | "
                     f"{_pm(r['top_eigenvalue'], r['top_eigenvalue_se'])} | {_pm(r['trace'], r['trace_se'])} |")
    losses = [run["train_loss"] for r in res["networks"] for run in r["runs"]]
    missed = sum(not run["reached_target"] for r in res["networks"] for run in r["runs"])
    lines += ["", f"All {len(losses)} runs stopped at a training loss between {min(losses):.3f} and "
              f"{max(losses):.3f}" + (f"; {missed} did not reach the target within the epoch limit." if missed
                                      else "."),
              "", "## The paper's claims at this scale", "",
              "For each metric, *t* is the difference sharper − flatter divided by its combined standard "
              "error sqrt(se₁² + se₂²) (Welch's t statistic; *p* its two-sided Welch p-value). A metric "
              "*supports* the claim when t > 1 (the expected difference is larger than its combined standard "
              "error), *opposes* it when t < −1, and is *within noise* otherwise. A claim is **reproduced** "
              "when both metrics support it, **mixed** when one does, **not reproduced** otherwise. With "
              f"{n} seeds per network, t > 1 is a low bar (p ≈ {_p_at_one(n):.2f} at t = 1); the p column "
              "says how strong each difference is.", "",
              "| claim | expected flatter | expected sharper | top eigenvalue: ratio, t (p) | trace: ratio, t (p) "
              "| verdict |", "|---|---|---|---|---|---|"]
    for c in res["claims"]:
        cells = [f"{c['tests'][k]['ratio']:.2f}x, t = {c['tests'][k]['t']:+.2f} (p = {c['tests'][k]['p']:.2g}): "
                 f"{c['tests'][k]['support']}" for k, _ in METRICS]
        lines.append(f"| {c['claim']} | {c['flatter']} | {c['sharper']} | {cells[0]} | {cells[1]} | "
                     f"**{c['verdict']}** |")
    lines += ["", "Ratios are sharper / flatter: above 1 is the direction the paper reports.", "",
              "![densities](densities.png)", "",
              "Caveats: small CNNs on 8x8 images, trained to a moderate common loss rather than to convergence; "
              "seeds vary the initial weights, batch order and probes but not the data split. BatchNorm makes "
              "the loss invariant to the scale of the conv weights before it, so the Hessian of a BatchNorm "
              "network also depends on the norm those weights drifted to (no weight decay here).", ""]
    return "\n".join(lines)
