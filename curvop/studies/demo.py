"""``curvop demo``: train a small CNN on scikit-learn's digits, then measure its loss Hessian.

No download and no GPU: the 1797 8x8 images ship inside scikit-learn. The Hessian is the one of
the mean cross-entropy over the whole training set (1438 images, one batch, so the backend caches
the linearisation of the gradient and each product is one linear pass).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable

__all__ = ["run"]

#: What ``--quick`` changes: one epoch and fewer products (for tests and a first look).
QUICK = dict(epochs=1, trace_matvecs=30, steps=30, probes=1)


def run(out: str = "curvop-demo", *, quick: bool = False, epochs: int = 10, k: int = 5,
        trace_matvecs: int = 99, steps: int = 80, probes: int = 2, seed: int = 0, width: int = 8,
        quiet: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, measure, write ``density.png`` and ``results.json`` into ``out``; return the results.

    The keyword arguments are the options of `curvop demo`, with its defaults; ``quick=True`` overrides
    ``epochs``, ``trace_matvecs``, ``steps`` and ``probes`` with :data:`QUICK`. ``width`` is the
    CNN's channel count. ``say`` receives the human-readable lines (the table); pass a no-op to
    print nothing. The options actually used are recorded in ``results.json``.

    Examples
    --------
    >>> from curvop.studies import demo
    >>> res = demo.run("demo-out", quick=True, quiet=True, say=lambda line: None)  # doctest: +SKIP
    >>> res["options"]["epochs"], len(res["eigenvalues"])  # doctest: +SKIP
    (1, 5)
    """
    import torch

    import curvop
    from curvop import plot
    from curvop.studies import digits
    from curvop.studies.measure import measure

    if quick:
        epochs, trace_matvecs, steps, probes = (QUICK[key] for key in ("epochs", "trace_matvecs", "steps",
                                                                        "probes"))
    options = dict(epochs=epochs, k=k, trace_matvecs=trace_matvecs, steps=steps, probes=probes, seed=seed,
                   width=width)
    start = time.perf_counter()
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    digits.seed_everything(seed)
    data = digits.load(seed)
    model = digits.cnn(width)
    t = time.perf_counter()
    losses = digits.train(model, data, epochs=epochs, seed=seed, progress=not quiet)
    train_s = time.perf_counter() - t
    acc_train = digits.accuracy(model, *data.train)
    acc_test = digits.accuracy(model, data.x_test, data.y_test)
    say(f"curvop demo: a CNN on scikit-learn's 8x8 digits ({len(data.y_train)} training, "
        f"{len(data.y_test)} test images), seed {seed}")
    say(f"  trained {epochs} epochs in {train_s:.1f} s: loss {losses[-1]:.4f}, "
        f"train accuracy {100 * acc_train:.1f} %, test accuracy {100 * acc_test:.1f} %")

    H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), data.train, hvp="forward", cache=True)
    say(f"  Hessian of the training loss: {H.shape[0]:,} x {H.shape[0]:,} ({H.backend.describe()})\n")
    m = measure(H, k=k, trace_matvecs=trace_matvecs, steps=steps, probes=probes,
                tol=1e-4, seed=seed, progress=not quiet)
    say(m.table())
    plot.plot_density(m.density, top=list(m.eigenvalues), path=str(path / "density.png"),
                      title=f"Hessian density of a CNN on digits (n = {m.n:,})")
    results = {
        "command": "curvop demo",
        "options": options,
        "model": {"name": "cnn", "width": width, "num_parameters": m.n},
        "training": {"epochs": epochs, "losses": losses, "seconds": round(train_s, 3),
                     "train_accuracy": acc_train, "test_accuracy": acc_test},
        "hessian": H.backend.describe(),
        **m.as_dict(),
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    (path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nwrote {path / 'density.png'} and {path / 'results.json'} ({results['total_seconds']:.0f} s in all)")
    return results
