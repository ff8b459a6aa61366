"""``curvop demo``: train a small CNN on scikit-learn's digits, then measure its loss Hessian.

No download and no GPU: the 1797 8x8 images ship inside scikit-learn. The Hessian is the one of
the mean cross-entropy over the whole training set (1438 images, one batch, so the backend caches
the linearisation of the gradient and each product is one linear pass).
"""

from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["DemoOptions", "run"]


@dataclass(frozen=True)
class DemoOptions:
    """What ``curvop demo`` can be asked (the defaults are the command's)."""

    out: str = "curvop-demo"
    epochs: int = 10
    k: int = 5
    trace_matvecs: int = 99
    steps: int = 80
    probes: int = 2
    seed: int = 0
    width: int = 8
    quiet: bool = False


def run(opts: DemoOptions, say: Any = print) -> dict[str, Any]:
    """Train, measure, write ``density.png`` and ``results.json`` into ``opts.out``; return the results.

    ``say`` receives the human-readable lines (the table); pass a no-op to print nothing.
    """
    import torch

    import curvop
    from curvop import plot
    from curvop.studies import digits
    from curvop.studies.measure import measure

    start = time.perf_counter()
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    digits.seed_everything(opts.seed)
    data = digits.load(opts.seed)
    model = digits.cnn(opts.width)
    t = time.perf_counter()
    losses = digits.train(model, data, epochs=opts.epochs, seed=opts.seed, progress=not opts.quiet)
    train_s = time.perf_counter() - t
    acc_train = digits.accuracy(model, *data.train)
    acc_test = digits.accuracy(model, data.x_test, data.y_test)
    say(f"curvop demo: a CNN on scikit-learn's 8x8 digits ({len(data.y_train)} training, "
        f"{len(data.y_test)} test images), seed {opts.seed}")
    say(f"  trained {opts.epochs} epochs in {train_s:.1f} s: loss {losses[-1]:.4f}, "
        f"train accuracy {100 * acc_train:.1f} %, test accuracy {100 * acc_test:.1f} %")

    H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), data.train, hvp="forward", cache=True)
    say(f"  Hessian of the training loss: {H.shape[0]:,} x {H.shape[0]:,} ({H.backend.describe()})\n")
    m = measure(H, k=opts.k, trace_matvecs=opts.trace_matvecs, steps=opts.steps, probes=opts.probes,
                tol=1e-4, seed=opts.seed, progress=not opts.quiet)
    say(m.table())
    plot.plot_density(m.density, top=list(m.eigenvalues), path=str(out / "density.png"),
                      title=f"Hessian density of a CNN on digits (n = {m.n:,})")
    results = {
        "command": "curvop demo",
        "options": {k: v for k, v in vars(opts).items() if k not in ("out", "quiet")},
        "model": {"name": "cnn", "width": opts.width, "num_parameters": m.n},
        "training": {"epochs": opts.epochs, "losses": losses, "seconds": round(train_s, 3),
                     "train_accuracy": acc_train, "test_accuracy": acc_test},
        "hessian": H.backend.describe(),
        **m.as_dict(),
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nwrote {out / 'density.png'} and {out / 'results.json'} ({results['total_seconds']:.0f} s in all)")
    return results
