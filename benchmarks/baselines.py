"""curvop against the Hessian-vector products a user would write by hand, on JAX, TensorFlow and torch.

    python benchmarks/baselines.py                        # the table of docs/performance.md (~30 min)
    python benchmarks/baselines.py --quick                # a tiny MLP, 3 rounds: seconds per framework
    python benchmarks/baselines.py --frameworks tensorflow --models transformer lstm --rounds 21
    python benchmarks/baselines.py --table benchmarks/results/baselines.json   # reprint a saved run

The same models in each framework (``_baseline_models.py``: an MLP, a CNN and a transformer block;
Keras LSTM and GRU on TensorFlow), float32, one thread. The hand-written contenders are written
the way each framework's guide shows, on the flattened parameters:

* JAX: ``jit(jvp(grad))``, ``jit(linearize(grad))`` (the linear map's residuals passed to a
  jitted apply) and reverse-over-reverse ``jit(grad(vdot(grad, v)))``;
* TensorFlow: a ``tf.function`` with a ``ForwardAccumulator`` around a ``GradientTape``
  (forward-over-reverse) and one with nested ``GradientTape``s (reverse-over-reverse);
* torch: ``autograd.grad`` on a retained first-order graph (PyHessian's way) and ``torch.func``
  ``jvp(grad)``.

Each JAX and TensorFlow contender comes twice: with the batch passed as arguments, and "folded",
a closure that captures the batch (JAX: and the parameters) as constants, so that XLA or grappler
can fold the forward pass at compile time. Every product is checked against curvop's default.

Method: 15 rounds; in each, every contender runs in an order rotated by one from the last round,
each sample long enough (several calls) to time, every call synchronised. A contender's cost is the
median over rounds of its time divided by the gradient's time in the same round. "default / best
args" is paired: per round the default's time over each hand-written contender's with the batch
as arguments; the column gives the largest median (the contender the default loses most to) with
a 90 % order-statistic interval. "job" is the user's whole wait for 40 products: building and
compiling (curvop: ``curvop.hessian`` with its determinism check; by hand: the first call), plus
39 more products at the paired cost, the default's over the best hand-written contender's,
folded ones included. Each framework runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _stats import median_ci  # noqa: E402

FRAMEWORKS = ("jax", "tensorflow", "torch")
JOB = 40  # products in a job (about a top-5 eigenvalue solve)
MIN_SAMPLE_S = 0.02  # a sample of a fast product is several calls
BUILDS = 3  # each contender is built (and timed) up to this many times: the first pays one-time costs
REBUILD_BELOW_S = 10.0  # ... while a build takes less than this
DEFAULT = "curvop default"


class Contender:
    """``make()`` builds it and returns ``product(v)``; ``kind`` is ``curvop``, ``args`` or ``folded``."""

    def __init__(self, kind: str, make: Callable[[], Callable[[Any], Any]]):
        self.kind, self.make = kind, make


# --- the contenders, per framework ------------------------------------------------------------------
def jax_setup(problem) -> tuple[Callable, dict[str, Contender], Any, Callable]:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import curvop

    (apply_fn, params), loss_fn, batch = problem
    w, unravel = ravel_pytree(params)

    def hand_written():  # new functions at every build: JAX caches compilations per function
        def loss(u, b):
            return loss_fn(apply_fn(unravel(u), b[0]), b[1])

        g = jax.grad(loss)

        def fwd(u, b, v):  # the autodiff cookbook's hvp: forward-over-reverse
            return jax.jvp(lambda q: g(q, b), (u,), (v,))[1]

        def rev(u, b, v):  # reverse-over-reverse
            return jax.grad(lambda q: jnp.vdot(g(q, b), v))(u)

        return g, fwd, rev

    def with_args(which):
        f = jax.jit(hand_written()[which])
        return lambda v: f(w, batch, v)

    def linearized_args():  # the residuals are arguments of the jitted apply
        g = hand_written()[0]
        lin = jax.jit(lambda u, b: jax.linearize(lambda q: g(q, b), u)[1])(w, batch)
        apply = jax.jit(lambda f, v: f(v))
        return lambda v: apply(lin, v)

    def folded(which):  # the parameters and the batch are constants of the compiled function
        g, fwd, rev = hand_written()
        if which == "linearize":
            return jax.jit(jax.linearize(lambda q: g(q, batch), w)[1])
        f = fwd if which == 1 else rev
        return jax.jit(lambda v: f(w, batch, v))

    gradient = jax.jit(jax.grad(lambda p, b: loss_fn(apply_fn(p, b[0]), b[1])))
    contenders = _curvop_contenders(lambda **o: curvop.hessian((apply_fn, params), loss_fn, batch, **o),
                                    {"forward": dict(hvp="forward", cache=False),
                                     "reverse": dict(hvp="reverse", cache=False),
                                     "linearized": dict(hvp="forward", cache=True)})
    contenders.update({
        "jit(jvp(grad))": Contender("args", lambda: with_args(1)),
        "jit(linearize(grad))": Contender("args", linearized_args),
        "reverse-over-reverse": Contender("args", lambda: with_args(2)),
        "jit(jvp(grad)), folded": Contender("folded", lambda: folded(1)),
        "jit(linearize(grad)), folded": Contender("folded", lambda: folded("linearize")),
        "reverse-over-reverse, folded": Contender("folded", lambda: folded(2)),
    })
    v = jax.random.normal(jax.random.PRNGKey(1), w.shape, w.dtype)
    return (lambda: gradient(params, batch)), contenders, v, jax.block_until_ready


def tensorflow_setup(problem) -> tuple[Callable, dict[str, Contender], Any, Callable]:
    import numpy as np
    import tensorflow as tf

    import curvop

    model, loss_fn, (x, y) = problem
    xt, yt = tf.constant(x), tf.constant(y)
    variables = [w.value for w in model.trainable_weights]  # Keras 3 variables wrap tf.Variables
    shapes = [w.shape for w in variables]
    sizes = [int(np.prod(s)) for s in shapes]

    def split(v):
        return [tf.reshape(t, s) for t, s in zip(tf.split(v, sizes), shapes)]

    def flat(parts):
        return tf.concat([tf.reshape(p, [-1]) for p in parts], 0)

    def fwd(v, x, y):  # the advanced-autodiff guide's Hessian-vector product: forward-over-backward
        with tf.autodiff.ForwardAccumulator(variables, split(v)) as acc:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=False))
            g = tape.gradient(loss, variables)
        return flat(acc.jvp(g))

    def rev(v, x, y):  # nested tapes: the gradient of <g, v>
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(y, model(x, training=False))
            g = inner.gradient(loss, variables)
            gv = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, split(v))])
        return flat(outer.gradient(gv, variables))

    @tf.function
    def gradient(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        return tape.gradient(loss, variables)

    def traced(f, *batch):
        fn = tf.function(f)
        return lambda v: fn(v, *batch)

    contenders = _curvop_contenders(lambda **o: curvop.hessian(model, loss_fn, (xt, yt), **o),
                                    {"forward": dict(hvp="forward"), "reverse": dict(hvp="reverse")})
    contenders.update({
        "tf.function forward-over-reverse": Contender("args", lambda: traced(fwd, xt, yt)),
        "tf.function nested tapes": Contender("args", lambda: traced(rev, xt, yt)),
        # numpy batches inside the traced function become graph constants
        "tf.function forward-over-reverse, folded": Contender("folded", lambda: tf.function(lambda v: fwd(v, x, y))),
        "tf.function nested tapes, folded": Contender("folded", lambda: tf.function(lambda v: rev(v, x, y))),
    })
    v = tf.constant(np.random.default_rng(1).standard_normal(sum(sizes)).astype("float32"))
    return (lambda: gradient(xt, yt)), contenders, v, lambda out: [t.numpy() for t in tf.nest.flatten(out)]


def torch_setup(problem) -> tuple[Callable, dict[str, Contender], Any, Callable]:
    import torch
    from torch.func import functional_call, grad, jvp

    import curvop

    model, loss_fn, (x, y) = problem
    named = dict(model.named_parameters())
    params = list(named.values())
    sizes = [p.numel() for p in params]

    def split(v):
        return [c.view_as(p) for c, p in zip(v.split(sizes), params)]

    def retained():  # PyHessian's way: the first-order graph kept, one backward per product
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        return lambda v: torch.cat([t.reshape(-1) for t in torch.autograd.grad(g, params, split(v), retain_graph=True)])

    def func_jvp():
        p0 = {k: p.detach() for k, p in named.items()}
        g = grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))
        return lambda v: torch.cat([t.reshape(-1) for t in jvp(g, (p0,), (dict(zip(named, split(v))),))[1].values()])

    contenders = _curvop_contenders(lambda **o: curvop.hessian(model, loss_fn, (x, y), **o),
                                    {"reverse, cached": dict(hvp="reverse", cache=True),
                                     "forward, cached": dict(hvp="forward", cache=True)})
    contenders.update({"autograd.grad, retained graph": Contender("args", retained),
                       "torch.func jvp(grad)": Contender("args", func_jvp)})
    v = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(1))
    return (lambda: torch.autograd.grad(loss_fn(model(x), y), params)), contenders, v, lambda out: out


def _curvop_contenders(build: Callable[..., Any], modes: dict[str, dict]) -> dict[str, Contender]:
    """The default and every named mode of curvop; ``_resolved`` gets each one's ``(mode, cached)``
    and the default's ``describe()``, so that a mode the default resolves to is left out."""
    resolved: dict[str, Any] = {}

    def make(label, options):
        def product_fn():
            H = build(**options)
            resolved[label] = (H.backend.mode, getattr(H.backend, "_cached", None) is not None)
            if label == DEFAULT:
                resolved["describe"] = H.backend.describe()
            return lambda v: H @ v
        return product_fn

    out = {DEFAULT: Contender("curvop", make(DEFAULT, {}))}
    for label, options in modes.items():
        out[f"curvop {label}"] = Contender("curvop", make(f"curvop {label}", options))
    out["_resolved"] = resolved  # type: ignore[assignment]
    return out


SETUPS = {"jax": jax_setup, "tensorflow": tensorflow_setup, "torch": torch_setup}


# --- measuring one model ------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(fn: Callable[[], Any]) -> float:
    t = _clock()
    fn()
    return _clock() - t


def _to_numpy(out):
    import numpy as np

    return np.asarray(out.detach() if hasattr(out, "detach") else out, dtype="float64")


def measure(framework: str, name: str, problem, rounds: int, skip: set[str], tries: int = BUILDS) -> dict:
    """Build every contender (timed), check its product, and time the products in rotated rounds."""
    import numpy as np

    gradient, contenders, v, sync = SETUPS[framework](problem)
    resolved = contenders.pop("_resolved")
    builds, fns, failed = {}, {}, {}
    for label, c in contenders.items():
        if any(s in label for s in skip):
            continue
        for attempt in range(tries):
            try:
                t = _timed(lambda: fns.__setitem__(label, c.make()) or sync(fns[label](v)))
            except Exception as err:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
                failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                fns.pop(label, None)
                break
            builds[label] = min(t, builds.get(label, t))
            if t > REBUILD_BELOW_S:
                break
    ref = _to_numpy(fns[DEFAULT](v))
    errors = {k: float(np.linalg.norm(_to_numpy(f(v)) - ref) / np.linalg.norm(ref)) for k, f in fns.items()}
    bad = {k: e for k, e in errors.items() if e > 1e-3}
    if bad:
        raise AssertionError(f"{framework} {name}: products differ from curvop's default: {bad}")
    describe = resolved.get("describe", "")
    for label in [k for k in fns if k.startswith("curvop ") and k != DEFAULT]:
        if resolved.get(label) == resolved.get(DEFAULT):
            del fns[label]  # the default itself
    runs: dict[str, Callable[[], Any]] = {"gradient": lambda: sync(gradient()),
                                          **{k: (lambda f=f: sync(f(v))) for k, f in fns.items()}}
    runs["gradient"]()
    labels = list(runs)
    reps = max(1, round(MIN_SAMPLE_S / _timed(runs["gradient"])))
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            fn = runs[label]
            times[label].append(_timed(lambda: [fn() for _ in range(reps)]) / reps)
    g = times["gradient"]
    return {"framework": framework, "model": name, "n": int(np.size(ref)), "describe": describe, "rounds": rounds,
            "grad_ms": round(1e3 * statistics.median(g), 3),
            "kinds": {k: c.kind for k, c in contenders.items() if k in fns},
            "x_grad": {k: round(statistics.median([a / b for a, b in zip(t, g)]), 3) for k, t in times.items()
                       if k != "gradient"},
            "build_s": {k: round(builds[k], 3) for k in fns},
            "max_rel_error": max(errors.values()), "failed": failed,
            "rounds_ms": {k: [round(1e3 * x, 4) for x in t] for k, t in times.items()}}


# --- reading a run ---------------------------------------------------------------------------------
def paired(row: dict, other: str) -> tuple[float, float, float]:
    """Median and 90 % interval of the default's time over ``other``'s, round by round."""
    d, o = row["rounds_ms"][DEFAULT], row["rounds_ms"][other]
    return median_ci([a / b for a, b in zip(d, o)])


def summary(row: dict) -> dict:
    hand = [k for k, kind in row["kinds"].items() if kind in ("args", "folded")]
    args = [k for k in hand if row["kinds"][k] == "args"]
    out = {"framework": row["framework"], "model": row["model"], "n": row["n"], "grad_ms": row["grad_ms"],
           "default": row["x_grad"][DEFAULT], "describe": row["describe"]}
    mine = [k for k, kind in row["kinds"].items() if kind == "curvop"]
    out["best_curvop"] = min(mine, key=lambda k: row["x_grad"][k])
    if args:
        worst = max(args, key=lambda k: paired(row, k)[0])
        out["best_args"], out["vs_args"] = worst, paired(row, worst)
    if hand:
        t_default = statistics.median(row["rounds_ms"][DEFAULT]) / 1e3
        job = {k: row["build_s"][k] + (JOB - 1) * t_default / paired(row, k)[0] for k in hand + [DEFAULT]}
        best = min(hand, key=job.get)
        out["best_job"], out["job"] = best, job[DEFAULT] / job[best]
        out["job_s"] = {k: round(v, 2) for k, v in job.items()}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| framework | model | n | gradient ms | curvop default (x gradient) | curvop's best mode | "
             "best hand-written, batch as arguments | default / it (90 % CI) | job of 40: default / best hand-written |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = summary(r)
        best = "(default)" if s["best_curvop"] == DEFAULT else f"{r['x_grad'][s['best_curvop']]:.2f} ({s['best_curvop'][7:]})"
        if "best_args" in s:
            m, lo, hi = s["vs_args"]
            hand = f"{r['x_grad'][s['best_args']]:.2f} ({s['best_args']})"
            ratio = f"**{m:.2f}** ({lo:.2f}-{hi:.2f})"
        else:
            hand, ratio = "-", "-"
        job = f"{s['job']:.2f} ({s['best_job']})" if "job" in s else "-"
        lines.append(f"| {r['framework']} | {r['model']} | {r['n']} | {r['grad_ms']:.2f} | {s['default']:.2f} "
                     f"({_short(s['describe'])}) | {best} | {hand} | {ratio} | {job} |")
    return "\n".join(lines)


def detail(rows: list[dict]) -> str:
    lines = ["| framework | model | contender | x gradient | build s | default / it (paired) |", "|---|---|---|---|---|---|"]
    for r in rows:
        for k, x in r["x_grad"].items():
            pr = "" if k == DEFAULT else f"{paired(r, k)[0]:.2f}"
            lines.append(f"| {r['framework']} | {r['model']} | {k} | {x:.2f} | {r['build_s'][k]:.2f} | {pr} |")
        for k, err in r["failed"].items():
            lines.append(f"| {r['framework']} | {r['model']} | {k} | fails: {err} | | |")
    return "\n".join(lines)


def _short(describe: str) -> str:
    return describe.split(", n=")[0].replace("jax ", "").replace("tensorflow ", "").replace("torch ", "")


# --- running -------------------------------------------------------------------------------------------
def _threads_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
            "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def worker(framework: str, quick: bool, models: list[str] | None, rounds: int, skip: set[str], out: str) -> None:
    import warnings

    import _baseline_models as zoo

    warnings.simplefilter("ignore")
    if framework == "torch":
        import torch

        torch.set_num_threads(1)
    if framework == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    problems = {"jax": zoo.jax_problems, "tensorflow": zoo.keras_problems, "torch": zoo.torch_problems}[framework]
    every = ("mlp",) if quick else zoo.SHARED + zoo.RECURRENT  # quick: the smoke test's one tiny model
    names = [m for m in (models or every) if framework == "tensorflow" or m in zoo.SHARED]
    rows = []
    for name, problem in problems(quick, tuple(names)).items():
        rows.append(measure(framework, name, problem, rounds, skip, tries=1 if quick else BUILDS))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        pathlib.Path(out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny MLP (other --models on request), 3 rounds, one build")
    ap.add_argument("--frameworks", nargs="*", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--models", nargs="*", default=None, help="mlp cnn transformer (and lstm gru on tensorflow)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="cpu: the process's CPU time (all its threads), steadier than wall time on a shared machine")
    ap.add_argument("--skip", nargs="*", default=[], help="leave out contenders whose label contains one of these")
    ap.add_argument("--out", default=None, help="JSON of every round (default benchmarks/results/baselines.json)")
    ap.add_argument("--table", metavar="JSON", help="print the tables of a saved run and exit")
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    if args.worker:
        global _clock
        _clock = CLOCKS[args.clock]
        worker(args.worker, args.quick, args.models, rounds, set(args.skip), args.out)
        return []
    if args.table:
        rows = json.loads(pathlib.Path(args.table).read_text())["rows"]
    else:
        rows = []
        out = args.out or (None if args.quick else str(HERE / "results" / "baselines.json"))
        with tempfile.TemporaryDirectory() as tmp:
            for fw in args.frameworks:
                part = os.path.join(tmp, f"{fw}.json")
                cmd = [sys.executable, __file__, "--worker", fw, "--rounds", str(rounds), "--out", part,
                       "--clock", args.clock]
                cmd += (["--quick"] if args.quick else []) + (["--models", *args.models] if args.models else [])
                cmd += ["--skip", *args.skip] if args.skip else []
                proc = subprocess.run(cmd, env=_threads_env())
                if proc.returncode != 0:
                    raise SystemExit(f"the {fw} worker failed (exit {proc.returncode})")
                rows += json.loads(pathlib.Path(part).read_text())["rows"]
                if out:
                    pathlib.Path(out).write_text(json.dumps({"job_products": JOB, "clock": args.clock, "rows": rows}, indent=1) + "\n")
    print()
    print(table(rows))
    print()
    print(detail(rows))
    return rows


if __name__ == "__main__":
    main()
