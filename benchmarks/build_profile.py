"""Where curvop's build time goes, next to the hand-written contender's first call.

    python benchmarks/build_profile.py --framework jax --model mlp --repeats 3
    python benchmarks/build_profile.py --framework tensorflow --model gru
    python benchmarks/build_profile.py --framework torch --quick --repeats 1   # the smoke run

Builds curvop's default operator on a model of ``_baseline_models.py`` (one thread, float32) with
its phases timed: the first loss (``_complete``'s loss check), the cache (``_build_cache``: the
linearisation), the self-check (``check_products``: the determinism and symmetry check, which also
traces and compiles the product), and how many products each ran; then one warm product, so that
the self-check's compile or trace (its time less its products at the warm cost) can be read. Next to it,
the hand-written contenders of ``baselines.py``: their first call (trace, compile, one product) and
one warm product. Each build is repeated (``--repeats``) and the fastest kept, as ``baselines.py``
does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for k, val in {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}.items():
    os.environ.setdefault(k, val)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Phases:
    """Wraps methods so that each call's time is added to a phase."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self._undo = []

    def wrap(self, owner, attr: str, phase: str, count_only: bool = False) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.n[phase] = self.n.get(phase, 0) + 1
                if not count_only:
                    self.t[phase] = self.t.get(phase, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def undo(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=["jax", "tensorflow", "torch"], required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the tiny models of baselines.py --quick")
    ap.add_argument("--options", default="", help="curvop options, e.g. cache=False,hvp=forward")
    args = ap.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    import _baseline_models as zoo
    import baselines

    from curvop.backends import template

    if args.framework == "torch":
        import torch

        torch.set_num_threads(1)
    if args.framework == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    problems = {"jax": zoo.jax_problems, "tensorflow": zoo.keras_problems, "torch": zoo.torch_problems}[args.framework]
    problem = problems(args.quick, (args.model,))[args.model]
    gradient, contenders, v, sync = baselines.SETUPS[args.framework](problem)
    contenders.pop("_resolved")
    options = dict(kv.split("=") for kv in args.options.split(",") if kv)
    options = {k: {"True": True, "False": False}.get(x, x) for k, x in options.items()}
    if options:
        import curvop

        model, loss, batch = problem

        def with_options():
            H = curvop.hessian(model, loss, batch, **options)
            return lambda u: H @ u

        contenders[baselines.DEFAULT] = baselines.Contender("curvop", with_options)
    sync(gradient())
    t = time.perf_counter()
    for _ in range(5):
        sync(gradient())
    print(f"gradient {1e3 * (time.perf_counter() - t) / 5:.2f} ms")

    best = None
    for r in range(args.repeats):
        ph = Phases()
        ph.wrap(template, "check_products", "self-check")
        ph.wrap(template.AutodiffBackend, "_build_cache", "cache")
        ph.wrap(template.AutodiffBackend, "_complete", "complete")
        ph.wrap(template.AutodiffBackend, "_finite", "products", count_only=True)
        t = time.perf_counter()
        fn = contenders[baselines.DEFAULT].make()
        built = time.perf_counter() - t
        ph.undo()  # the products counted are the build's (its self-check's)
        t = time.perf_counter()
        sync(fn(v))
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(5):
            sync(fn(v))
        warm = (time.perf_counter() - t) / 5
        row = (built + first, built, first, warm, dict(ph.t), dict(ph.n))
        if best is None or row[0] < best[0]:
            best = row
    total, built, first, warm, t, n = best
    comp = t.get("complete", 0.0)
    check, cache = t.get("self-check", 0.0), t.get("cache", 0.0)
    print(f"curvop default: build + first product {total:.3f} s = curvop.hessian {built:.3f} s "
          f"(self-check {check:.3f} s with its {n.get('products', 0)} products, cache {cache:.3f} s, "
          f"before _complete's build / outside: {built - comp:.3f} s, loss check and resolve "
          f"{comp - check - cache:.3f} s) + first product {first:.3f} s; warm product {1e3 * warm:.2f} ms; "
          f"self-check less its products at the warm cost: {check - n.get('products', 0) * warm:.3f} s")
    for label, c in contenders.items():
        if c.kind != "args" and c.kind != "folded":
            continue
        firsts = []
        try:
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn = c.make()
                sync(fn(v))
                firsts.append(time.perf_counter() - t)
        except Exception as err:  # noqa: BLE001
            print(f"{label}: fails ({type(err).__name__})")
            continue
        t = time.perf_counter()
        for _ in range(5):
            sync(fn(v))
        print(f"{label}: first call {min(firsts):.3f} s, warm product {1e3 * (time.perf_counter() - t) / 5:.2f} ms")


if __name__ == "__main__":
    main()
