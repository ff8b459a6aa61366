"""The edge of stability (Cohen et al., ICLR 2021), reproduced on scikit-learn's digits.

Full-batch gradient descent on a subset of the digits with a small tanh MLP and the squared loss
``0.5 · ‖f(x) − onehot(y)‖²`` averaged over samples, at three step sizes η. A
:class:`curvop.SharpnessTracker` measures λ_max every few steps (warm-started Lanczos). The
paper's claim: λ_max rises (progressive sharpening) until it reaches about 2/η, then hovers there
while the loss keeps decreasing, non-monotonically. The claim "held" for an η when the median
λ_max over the last third of the steps is within ±15 % of 2/η.

``curvop study edge-of-stability [--quick] --out DIR`` writes ``DIR/results.json``,
``DIR/sharpness.png`` and ``DIR/report.md``.
"""

from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Setting", "QUICK", "FULL", "run", "held"]

TOLERANCE = 0.15


@dataclass(frozen=True)
class Setting:
    """Step sizes, steps per run, measurement interval, training images and hidden width."""

    etas: tuple[float, ...]
    steps: int
    every: int
    images: int = 500
    width: int = 32


QUICK = Setting(etas=(0.6, 0.5, 0.4), steps=900, every=15)
FULL = Setting(etas=(0.4, 0.3, 0.25), steps=5000, every=20)


def _data(images: int) -> tuple[Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data[:images] / 16.0
    x = x - x.mean(axis=0)
    y = np.eye(10)[d.target[:images]]
    return torch.from_numpy(x), torch.from_numpy(y)


def _model(width: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10)).double()


def squared_loss(out: Any, target: Any) -> Any:
    """``0.5 · ‖out − target‖²`` per sample, averaged over samples (Cohen et al.'s MSE)."""
    return 0.5 * ((out - target) ** 2).sum(dim=1).mean()


squared_loss.reduction = "mean"  # type: ignore[attr-defined]


def held(sharpness: list[list[float]], steps: int, eta: float) -> tuple[bool, float]:
    """Whether the median λ_max over the last third of the steps is within ±15 % of 2/η."""
    tail = [v for s, v in sharpness if s >= steps - steps / 3]
    med = float(np.median(tail))
    return bool(abs(med - 2 / eta) <= TOLERANCE * 2 / eta), med


def gradient_descent(eta: float, setting: Setting, seed: int, say: Callable[[str], None]) -> dict:
    """One full-batch GD run at step size ``eta``, tracked; the results.json entry for it."""
    import torch

    import curvop

    x, y = _data(setting.images)
    model = _model(setting.width, seed)
    tracker = curvop.SharpnessTracker(model, squared_loss, (x, y), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    losses = []
    t0 = time.perf_counter()
    for step in range(setting.steps + 1):
        opt.zero_grad()
        loss = squared_loss(model(x), y)
        if step % setting.every == 0 or step == setting.steps:
            losses.append([step, float(loss.detach())])
            tracker(step)
        if step == setting.steps:
            break
        loss.backward()
        opt.step()
        if not np.isfinite(losses[-1][1]):
            break
    sharp = [[m.step, m.value] for m in tracker.history]
    ok, med = held(sharp, setting.steps, eta)
    products = sum(m.products for m in tracker.history)
    say(f"eta={eta}: 2/eta={2 / eta:.3f}, median lambda_max over the last third {med:.3f} "
        f"({'held' if ok else 'did not hold'}); {len(sharp)} measurements, {products} products, "
        f"{time.perf_counter() - t0:.0f} s")
    return {"eta": eta, "threshold": 2 / eta, "sharpness": sharp, "loss": losses, "median_last_third": med,
            "held": ok, "products": products, "measurements": len(sharp)}


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """λ_max against step, one line per η, with dashed 2/η lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        s = np.array(r["sharpness"])
        line, = ax.plot(s[:, 0], s[:, 1], label=f"η = {r['eta']}")
        ax.axhline(r["threshold"], ls="--", lw=1, color=line.get_color())
        loss = np.array(r["loss"])
        bx.plot(loss[:, 0], loss[:, 1], color=line.get_color(), label=f"η = {r['eta']}")
    ax.set(xlabel="step", ylabel="λ_max (sharpness)", title="sharpness; dashed: 2/η")
    bx.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], setting: Setting, command: str, seconds: float) -> str:
    """The markdown report: one row per η, whether the claim held."""
    rows = "\n".join(
        f"| {r['eta']} | {r['threshold']:.3f} | {max(v for _, v in r['sharpness']):.3f} | "
        f"{r['median_last_third']:.3f} | {100 * (r['median_last_third'] * r['eta'] / 2 - 1):+.1f} % | "
        f"{'yes' if r['held'] else 'no'} | {r['loss'][0][1]:.4f} → {r['loss'][-1][1]:.4f} |"
        for r in runs)
    return f"""# Study: the edge of stability

Cohen et al. (ICLR 2021) observed that full-batch gradient descent at step size η first sharpens
(λ_max, the top eigenvalue of the loss Hessian, rises) until λ_max reaches about 2/η, the
stability limit of GD on a quadratic, and then hovers there while the loss keeps decreasing,
non-monotonically. Reproduced here on {setting.images} digits images with a tanh MLP
(64-{setting.width}-{setting.width}-10, float64), squared loss, {setting.steps} GD steps per η, λ_max
measured every {setting.every} steps by `curvop.SharpnessTracker` (warm-started Lanczos, tol 1e-3).
**The claim held** for an η when the median λ_max over the last third of the steps is within
±{TOLERANCE:.0%} of 2/η.

| η | 2/η | max λ_max | median λ_max, last third | vs 2/η | held | loss (first → last) |
|---|---|---|---|---|---|---|
{rows}

![sharpness](sharpness.png)

Command: `{command}` ({seconds:.0f} s on a 2-core machine shared with other jobs).
"""


def run(out: str, *, quick: bool = False, seed: int = 0, quiet: bool = False, command: str = "",
        say: Callable[[str], None] = print) -> dict:
    """Run the study; write ``results.json``, ``sharpness.png`` and ``report.md`` into ``out``."""
    setting = QUICK if quick else FULL
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = [gradient_descent(eta, setting, seed, say if not quiet else (lambda s: None)) for eta in setting.etas]
    seconds = time.perf_counter() - t0
    results = {"quick": quick, "seed": seed, "setting": setting.__dict__ | {"etas": list(setting.etas)},
               "runs": runs, "seconds": seconds}
    (path / "results.json").write_text(json.dumps(results, indent=1))
    plot(runs, path / "sharpness.png")
    (path / "report.md").write_text(report(runs, setting, command or "curvop study edge-of-stability", seconds))
    say(f"wrote {path / 'results.json'}, {path / 'sharpness.png'}, {path / 'report.md'}")
    return results
