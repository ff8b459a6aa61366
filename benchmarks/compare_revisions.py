"""Before/after a change: the default torch product of two git revisions of curvop, interleaved.

    python benchmarks/compare_revisions.py REV_BEFORE [REV_AFTER] [--repeats 9]
    python benchmarks/compare_revisions.py REV_BEFORE [REV_AFTER] --values
    python benchmarks/compare_revisions.py REV_BEFORE [REV_AFTER] --peers [--rounds 11]

``--values`` checks instead that the two revisions compute the same numbers, bit for bit: the
products ``H @ v`` and ``H.matmat(V)`` (fixed seeded vectors) of every torch mode (default,
forward, reverse, cached or not) on the same three models, and the default products of a JAX and a
TensorFlow MLP in float64, each hashed with SHA-256. It prints one line per product and exits 1
when any differs. A pure refactoring (renames, moved modules) must pass it.

Each revision is exported (``git archive``) to a temporary folder; each round times, in one fresh
subprocess per revision, the default product (``curvop.hessian(model, loss, batch)``, then
``H @ v``) and one gradient on the same models as ``benchmarks/peers.py`` and ``hvp.py``: the
70k-parameter BatchNorm CNN (batch 128), the same CNN without BatchNorm, and the 55k-parameter
MLP. The rounds alternate between the revisions, so drift of a shared machine hits both alike.
Prints, per model, the median product time as a multiple of the median gradient of the same
process, for each revision, and their ratio (after / before). Measures speed only; a timed
assertion never goes in the tests.

``--peers`` times instead curvop's default (``curvop.hessian(model, loss, batch)``, no options) on
the CNN of ``benchmarks/peers.py`` (width 54, batch 128, 70k parameters): per process, the build
(median of 3 builds, each with the build's self-checks) and the product (median of ``--repeats``),
both as multiples of the median gradient of the same process. Each round runs the revisions in
turn, the first one alternating between rounds; the ratios after / before are paired per round
and summarised by their median with a 90 % distribution-free interval (``benchmarks/_stats.py``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).parent

_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
import curvop, _torch_models as M
problems = {"cnn_bn": lambda: M.cnn_problem(28), "cnn": lambda: M.cnn_problem(28, batchnorm=False),
            "mlp": M.mlp_problem}
out = {}
for name, make in problems.items():
    model, loss, (x, y) = make()
    H = curvop.hessian(model, loss, (x, y))
    v = torch.randn(H.shape[0])
    def grad():
        model.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
    def hvp():
        H @ v
    for f in (grad, hvp):
        f()  # warm-up
    times = {"grad": [], "hvp": []}
    for _ in range(int(sys.argv[3])):
        for key, f in (("grad", grad), ("hvp", hvp)):
            t = time.perf_counter(); f(); times[key].append(time.perf_counter() - t)
    out[name] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(json.dumps(out))
"""


_PEERS_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
import curvop, _torch_models as M
model, loss, (x, y) = M.cnn_problem(54, 128)  # benchmarks/peers.py's CNN ("full": cnn_width=54, batch=128)
params = [p for p in model.parameters()]
grad = lambda: torch.autograd.grad(loss(model(x), y), params)
grad()
def built():
    t = time.perf_counter(); H = curvop.hessian(model, loss, (x, y)); return H, time.perf_counter() - t
H, _ = built()  # warm-up
v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
H @ v
times = {"grad": [], "hvp": [], "build": []}
for i in range(int(sys.argv[3])):
    for key, f in (("grad", grad), ("hvp", lambda: H @ v)):
        t = time.perf_counter(); f(); times[key].append(time.perf_counter() - t)
    if i < 3:
        times["build"].append(built()[1])
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(json.dumps({"file": curvop.__file__, "describe": H.backend.describe(), **med}))
"""


_VALUES_CHILD = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import numpy as np, torch
torch.set_num_threads(1)
import curvop, _torch_models as M

def digest(y):
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]

out = {}
problems = {"cnn_bn": lambda: M.cnn_problem(28), "cnn": lambda: M.cnn_problem(28, batchnorm=False),
            "mlp": M.mlp_problem}
modes = {"default": {}, "reverse": {"hvp": "reverse", "cache": False}, "reverse-cached": {"hvp": "reverse", "cache": True},
         "forward": {"hvp": "forward", "cache": False}, "forward-cached": {"hvp": "forward", "cache": True}}
for name, make in problems.items():
    model, loss, (x, y) = make()
    for mode, opts in modes.items():
        H = curvop.hessian(model, loss, (x, y), **opts)
        g = torch.Generator().manual_seed(1)
        v, V = torch.randn(H.shape[0], generator=g), torch.randn(H.shape[0], 3, generator=g)
        out[f"torch {name} {mode} H@v"] = digest(H @ v)
        out[f"torch {name} {mode} H@V"] = digest(H.matmat(V))
try:
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, 8)), rng.standard_normal(64)
    params = {"w1": jnp.asarray(rng.standard_normal((8, 16)) / 3), "w2": jnp.asarray(rng.standard_normal(16) / 4)}
    f = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2)
    H = curvop.hessian_of(f, params, (jnp.asarray(X), jnp.asarray(Y)))
    out["jax mlp default H@v"] = digest(H @ np.linspace(-1, 1, H.shape[0]))
except ImportError:
    pass
try:
    import tensorflow as tf
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, 8)), rng.standard_normal(64)
    w1 = tf.Variable(rng.standard_normal((8, 16)) / 3)
    w2 = tf.Variable(rng.standard_normal(16) / 4)
    f = lambda w, b: tf.reduce_mean((tf.linalg.matvec(tf.tanh(b[0] @ w[0]), w[1]) - b[1]) ** 2)
    H = curvop.hessian_of(f, [w1, w2], (tf.constant(X), tf.constant(Y)))
    out["tensorflow mlp default H@v"] = digest(H @ np.linspace(-1, 1, H.shape[0]))
except ImportError:
    pass
print(json.dumps(out))
"""


def values(trees: dict[str, pathlib.Path]) -> bool:
    """Hash every product of each revision (one process each); print them side by side; True if equal."""
    got = {}
    for rev, tree in trees.items():
        res = subprocess.run([sys.executable, "-c", _VALUES_CHILD, str(tree), str(tree / "benchmarks")],
                             check=True, capture_output=True, text=True)
        got[rev] = json.loads(res.stdout.strip().splitlines()[-1])
    (a, da), (b, db) = got.items()
    same = da == db
    print(f"{'product':<36} {a[:12]:>16} {b[:12]:>16}")
    for key in sorted(set(da) | set(db)):
        mark = "" if da.get(key) == db.get(key) else "  DIFFERS"
        print(f"{key:<36} {da.get(key, '-'):>16} {db.get(key, '-'):>16}{mark}")
    print("bit-identical" if same else "NOT bit-identical")
    return same


def export(rev: str, dest: pathlib.Path) -> pathlib.Path:
    """The tree of ``rev`` under ``dest`` (``git archive``, no checkout touched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (one process per revision each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed products per process")
    ap.add_argument("--values", action="store_true", help="compare the products' values bit for bit instead of timing")
    ap.add_argument("--peers", action="store_true", help="build and product of the default on peers.py's CNN")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: export(rev, pathlib.Path(tmp) / str(i)) for i, rev in enumerate((args.before, args.after))}
        if args.values:
            if not values(trees):
                sys.exit(1)
            return {}
        if args.peers:
            return peers(trees, args.rounds, args.repeats)
        ratios: dict[str, dict[str, list[float]]] = {rev: {} for rev in trees}
        for _ in range(args.rounds):
            for rev, tree in trees.items():
                res = subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(tree / "benchmarks"),
                                      str(args.repeats)], check=True, capture_output=True, text=True)
                for name, t in json.loads(res.stdout.strip().splitlines()[-1]).items():
                    ratios[rev].setdefault(name, []).append(t["hvp"] / t["grad"])
    before, after = (ratios[r] for r in trees)
    summary = {name: {"before": statistics.median(before[name]), "after": statistics.median(after[name])}
               for name in before}
    print(f"one default HVP / one gradient (median of {args.rounds} alternating rounds, 1 thread)")
    print(f"{'model':<8} {args.before[:12]:>12} {args.after[:12]:>12}  after/before")
    for name, s in summary.items():
        print(f"{name:<8} {s['before']:>12.2f} {s['after']:>12.2f}  {s['after'] / s['before']:.2f}")
    return summary


def peers(trees: dict[str, pathlib.Path], rounds: int, repeats: int) -> dict:
    """``--peers``: build and product of each revision's default, alternating which runs first."""
    from _stats import median_ci

    revs = list(trees)
    got: dict[str, list[dict]] = {rev: [] for rev in revs}
    for r in range(rounds):
        for rev in (revs if r % 2 == 0 else revs[::-1]):
            res = subprocess.run([sys.executable, "-c", _PEERS_CHILD, str(trees[rev]), str(trees[rev] / "benchmarks"),
                                  str(repeats)], check=True, capture_output=True, text=True)
            got[rev].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rev[:12], json.dumps(got[rev][-1]), flush=True)
    (a, before), (b, after) = got.items()
    out = {}
    print(f"curvop default on peers.py's CNN, {rounds} rounds (order alternating), 1 thread; times / one gradient")
    print(f"{'':<8} {a[:12]:>12} {b[:12]:>12}   after/before (median, 90% interval of the paired ratios)")
    for key in ("build", "hvp"):
        x = [d[key] / d["grad"] for d in before]
        z = [d[key] / d["grad"] for d in after]
        m, lo, hi = median_ci([q / p for p, q in zip(x, z)])
        out[key] = {"before": statistics.median(x), "after": statistics.median(z), "ratio": (m, lo, hi)}
        print(f"{key:<8} {out[key]['before']:>12.2f} {out[key]['after']:>12.2f}   {m:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"gradient seconds (median): {statistics.median(d['grad'] for d in before):.3f} / "
          f"{statistics.median(d['grad'] for d in after):.3f}")
    return out


if __name__ == "__main__":
    main()
