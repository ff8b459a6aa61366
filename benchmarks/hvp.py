"""Cost of one Hessian-vector product, as a multiple of one gradient, per backend and mode.

    python benchmarks/hvp.py            # full run (a few minutes on 2 cores)
    python benchmarks/hvp.py --quick    # seconds; what the tests run

Prints, for a small CNN with and without BatchNorm (eval mode) on one batch: setup time and the
median time of one product in each torch mode (forward/reverse x cached/uncached, and the cached
reverse mode without curvop's op rewrites, ``rewrite=False``) divided by the median time of one
gradient (forward + backward), measured interleaved; then the products per second of
``matmat`` with k = 8 (vmapped) over 8 single products. TensorFlow and JAX rows come from
``hvp_tensorflow.py`` / ``hvp_jax.py`` when those frameworks are installed.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

MODES = [  # (hvp, cache, rewrite)
    ("forward", True, True), ("forward", False, True), ("reverse", True, True), ("reverse", False, True),
    ("reverse", True, False),
]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _label(mode, cache, rewrite) -> str:
    return f"{mode}{' cached' if cache else ''}{'' if rewrite else ' torch ops'}"


def torch_rows(quick: bool) -> list[dict]:
    rows = []
    for batchnorm in (True, False):
        rows += _torch_model_rows(quick, batchnorm)
    return rows


def _torch_model_rows(quick: bool, batchnorm: bool) -> list[dict]:
    import torch

    import curvop
    from _torch_models import cnn_problem

    torch.manual_seed(0)
    model, loss_fn, (x, y) = cnn_problem(width=8 if quick else 16, batch=32 if quick else 128,
                                         batchnorm=batchnorm)
    params = [p for p in model.parameters() if p.requires_grad]
    repeats, k = (3, 4) if quick else (9, 8)

    def gradient():
        torch.autograd.grad(loss_fn(model(x), y), params)

    ops, setup = {}, {}
    for mode, cache, rewrite in MODES:
        for batched in (False, True):
            key = (mode, cache, rewrite, batched)
            setup[key] = _timed(lambda: ops.__setitem__(key, curvop.hessian(
                model, loss_fn, (x, y), hvp=mode, cache=cache, batched=batched, rewrite=rewrite,
                check_deterministic=False)))
    n = ops[MODES[0] + (False,)].shape[0]
    v, V = torch.randn(n), torch.randn(n, k)
    for H in ops.values():  # warm-up
        H @ v
        H.matmat(V)
    times: dict = {"grad": []}
    for _ in range(repeats):  # interleaved
        times["grad"].append(_timed(gradient))
        for key, H in ops.items():
            if not key[-1]:
                times.setdefault(key, []).append(_timed(lambda: H @ v))
                times.setdefault(key + ("raw",), []).append(_timed(lambda: H.backend.hvp(v)))
            times.setdefault(key + ("matmat",), []).append(_timed(lambda: H.matmat(V)))
    g = statistics.median(times["grad"])
    rows = []
    for m in MODES:
        one = statistics.median(times[m + (False,)])
        raw = statistics.median(times[m + (False, "raw")])
        loop = statistics.median(times[m + (False, "matmat")])
        vm = statistics.median(times[m + (True, "matmat")])
        rows.append({
            "framework": "torch", "model": f"CNN{'+BN' if batchnorm else ''} n={n}", "mode": _label(*m),
            "setup_s": setup[m + (False,)], "ms_per_hvp": one * 1e3, "ratio_to_grad": one / g,
            "operator_overhead": one / raw - 1, "matmat_speedup": loop / vm,
        })
    return rows


def other_rows(quick: bool) -> list[dict]:
    rows = []
    for name in ("hvp_tensorflow", "hvp_jax"):
        try:
            rows += importlib.import_module(name).run(quick)
        except ModuleNotFoundError as err:
            print(f"({name}: skipped, {err})")
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = torch_rows(args.quick)
    rows += other_rows(args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of interleaved repeats")
    mw = max(len(r["model"]) for r in rows) + 2
    print(f"{'framework':<11}{'model':<{mw}}{'mode':<34}{'setup s':>8}{'ms/HVP':>9}{'x grad':>8}"
          f"{'op ovh':>8}{'k=8 speed-up':>13}")
    for r in rows:
        print(f"{r['framework']:<11}{r['model']:<{mw}}{r['mode']:<34}{r.get('setup_s', float('nan')):>8.2f}"
              f"{r['ms_per_hvp']:>9.2f}{r['ratio_to_grad']:>8.2f}{r.get('operator_overhead', float('nan')):>+8.1%}"
              f"{r.get('matmat_speedup', float('nan')):>13.2f}")
    return rows


if __name__ == "__main__":
    main()
