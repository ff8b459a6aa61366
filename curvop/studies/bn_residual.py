"""PyHessian's BatchNorm / residual-connection study, at the scale of scikit-learn's digits.

The PyHessian paper (Yao et al., 2020) reports, from the spectral densities of trained networks:

1. shallow networks: the one *without* BatchNorm has the flatter Hessian spectrum;
2. deep networks: the one *with* BatchNorm has the flatter spectrum;
3. residual connections flatten the spectrum.

Here "flatter" is judged on the top eigenvalue and the trace: a claim is *reproduced* when the
network the paper calls flatter has both the smaller top eigenvalue and the smaller trace, *not
reproduced* when it has both larger, and *mixed* otherwise.
"""

from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Config", "CLAIMS", "configs", "run", "verdict"]


@dataclass(frozen=True)
class Config:
    """One network of the study."""

    name: str
    blocks: int
    batchnorm: bool
    residual: bool


@dataclass(frozen=True)
class Scale:
    width: int
    shallow: int
    deep: int
    epochs: int
    max_train: int | None
    hessian_images: int
    trace_matvecs: int
    steps: int
    probes: int


FULL = Scale(width=8, shallow=1, deep=4, epochs=8, max_train=None, hessian_images=512,
             trace_matvecs=60, steps=60, probes=1)
QUICK = Scale(width=4, shallow=1, deep=2, epochs=1, max_train=256, hessian_images=128,
              trace_matvecs=15, steps=12, probes=1)

#: (claim, network expected flatter, network expected sharper)
CLAIMS = [
    ("shallow: without BatchNorm is flatter", "shallow, no BN", "shallow, BN"),
    ("deep (residual): with BatchNorm is flatter", "deep, BN", "deep, no BN"),
    ("deep (plain): with BatchNorm is flatter", "deep plain, BN", "deep plain, no BN"),
    ("residual connections flatten (with BN)", "deep, BN", "deep plain, BN"),
    ("residual connections flatten (no BN)", "deep, no BN", "deep plain, no BN"),
]


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


def verdict(flat: dict[str, Any], sharp: dict[str, Any]) -> str:
    """``"reproduced"``, ``"not reproduced"`` or ``"mixed"`` (see the module docstring)."""
    smaller = [flat["eigenvalues"][0] < sharp["eigenvalues"][0], flat["trace"] < sharp["trace"]]
    return "reproduced" if all(smaller) else "not reproduced" if not any(smaller) else "mixed"


def _one(cfg: Config, scale: Scale, data: Any, seed: int, quiet: bool) -> tuple[dict[str, Any], Any]:
    import torch

    import curvop
    from curvop.studies import digits
    from curvop.studies.measure import measure

    digits.seed_everything(seed)
    model = digits.resnet(cfg.blocks, batchnorm=cfg.batchnorm, residual=cfg.residual, width=scale.width)
    t = time.perf_counter()
    losses = digits.train(model, data, epochs=scale.epochs, seed=seed, progress=not quiet, desc=cfg.name)
    train_s = time.perf_counter() - t
    x, y = data.train
    batch = (x[: scale.hessian_images], y[: scale.hessian_images])
    H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), batch, hvp="forward", cache=True)
    m = measure(H, k=1, trace_matvecs=scale.trace_matvecs, steps=scale.steps, probes=scale.probes,
                tol=1e-4, seed=seed, progress=not quiet)
    row = {"name": cfg.name, "layers": 2 * cfg.blocks + 2, "batchnorm": cfg.batchnorm,
           "residual": cfg.residual, "train_loss": losses[-1], "train_seconds": round(train_s, 2),
           "test_accuracy": digits.accuracy(model, data.x_test, data.y_test), **m.as_dict()}
    del row["density"]
    return row, m.density


def run(out: str, *, quick: bool = False, seed: int = 0, quiet: bool = False, command: str = "",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and measure every network; write ``report.md``, ``densities.png``, ``results.json``."""
    from curvop import plot
    from curvop.studies import digits

    scale = QUICK if quick else FULL
    start = time.perf_counter()
    data = digits.load(seed, max_train=scale.max_train)
    rows, densities = {}, {}
    for cfg in configs(scale):
        rows[cfg.name], densities[cfg.name] = _one(cfg, scale, data, seed, quiet)
        r = rows[cfg.name]
        say(f"{cfg.name:18s} λmax {r['eigenvalues'][0]:9.4g}  trace {r['trace']:9.4g}  "
            f"train loss {r['train_loss']:.3f}  test acc {100 * r['test_accuracy']:.1f} %")
    claims = [{"claim": c, "flatter": f, "sharper": s, "verdict": verdict(rows[f], rows[s])} for c, f, s in CLAIMS]
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    plot.compare_densities(densities, top={k: r["eigenvalues"][0] for k, r in rows.items()}, columns=2,
                           path=str(path / "densities.png"), title="Hessian densities on digits")
    results = {"command": command, "seed": seed, "scale": vars(scale), "networks": list(rows.values()),
               "claims": claims, "total_seconds": round(time.perf_counter() - start, 1)}
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (path / "report.md").write_text(report(results))
    say(f"wrote {path / 'report.md'}, {path / 'densities.png'} and {path / 'results.json'}")
    return results


def report(res: dict[str, Any]) -> str:
    """The Markdown report of a run."""
    s = res["scale"]
    lines = [
        "# BatchNorm and residual connections: PyHessian's study on scikit-learn's digits", "",
        f"Made by `{res['command']}` in {res['total_seconds']:.0f} s (CPU).", "",
        f"Six CNNs of width {s['width']} (shallow: {2 * s['shallow'] + 2} layers, deep: {2 * s['deep'] + 2} "
        f"layers; residual blocks of two 3x3 convs unless *plain*), each trained {s['epochs']} epochs with "
        f"Adam on the digits training set (seed {res['seed']}). Each Hessian is the one of the mean "
        f"cross-entropy over the first {s['hessian_images']} training images (the models in eval mode, as "
        f"PyHessian does); top eigenvalue by Lanczos, trace by XTrace ({s['trace_matvecs']} products), "
        f"density by SLQ ({s['probes']} probe x {s['steps']} steps).", "",
        "| network | layers | BN | residual | params | train loss | test acc | top eigenvalue | trace |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["networks"]:
        lines.append(f"| {r['name']} | {r['layers']} | {'yes' if r['batchnorm'] else 'no'} | "
                     f"{'yes' if r['residual'] else 'no'} | {r['num_parameters']:,} | {r['train_loss']:.3f} | "
                     f"{100 * r['test_accuracy']:.1f} % | {r['eigenvalues'][0]:.4g} | "
                     f"{r['trace']:.4g} ± {r['trace_stderr']:.2g} |")
    lines += ["", "## The paper's claims at this scale", "",
              "A claim is *reproduced* when the network the paper calls flatter has both the smaller top "
              "eigenvalue and the smaller trace, *not reproduced* when both are larger, *mixed* otherwise.", "",
              "| claim | expected flatter | expected sharper | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['flatter']} | {c['sharper']} | **{c['verdict']}** |" for c in res["claims"]]
    lines += ["", "![densities](densities.png)", "",
              "Caveats: one seed, small networks trained for a few epochs to different losses (a less "
              "trained network usually sits in a different region of the landscape), and BatchNorm makes "
              "the loss invariant to the scale of the conv weights before it, so its Hessian depends on "
              "their norm. Treat the verdicts as what this run measured, not as a test of the paper.", ""]
    return "\n".join(lines)
