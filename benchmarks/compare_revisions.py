"""Before/after a change: the default torch product of two git revisions of curvop, interleaved.

    python benchmarks/compare_revisions.py REV_BEFORE [REV_AFTER] [--repeats 9]

Each revision is exported (``git archive``) to a temporary folder; each round times, in one fresh
subprocess per revision, the default product (``curvop.hessian(model, loss, batch)``, then
``H @ v``) and one gradient on the same models as ``benchmarks/peers.py`` and ``hvp.py``: the
70k-parameter BatchNorm CNN (batch 128), the same CNN without BatchNorm, and the 55k-parameter
MLP. The rounds alternate between the revisions, so drift of a shared machine hits both alike.
Prints, per model, the median product time as a multiple of the median gradient of the same
process, for each revision, and their ratio (after / before). Measures speed only; a timed
assertion never goes in the tests.
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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: export(rev, pathlib.Path(tmp) / str(i)) for i, rev in enumerate((args.before, args.after))}
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


if __name__ == "__main__":
    main()
