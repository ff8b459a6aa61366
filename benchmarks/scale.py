"""GPT-2 small (124M parameters) on one CPU machine: curvop, PyHessian and curvlinops (issue 15).

    PYTHONPATH=. python benchmarks/scale.py              # the full table (GPT-2 small, ~1 hour on 2 cores)
    PYTHONPATH=. python benchmarks/scale.py --tiny       # the same on a 2-layer, 64-wide GPT-2 (minutes)
    PYTHONPATH=. python benchmarks/scale.py --reorth     # SLQ density error of each memory option

The model is ``GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))`` with random weights (no
download), float32, on a batch of 2 x 32 random token ids; the loss is next-token cross-entropy on
the logits, written here. Every task runs in a fresh subprocess (so ``ru_maxrss`` is that task's
own peak resident memory) under an address-space limit (``--limit-gb``, default 12), so a method
that needs more memory fails with an error that is recorded instead of waking the kernel's OOM
killer. Times and peaks are also given as multiples of one gradient's time and of the peak of a
training step (forward, backward, Adam step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TASKS = ("gradient", "train_step", "hvp_cached", "hvp_uncached", "eigenvalue", "trace", "density",
         "pyhessian_eigenvalue", "pyhessian_trace", "pyhessian_density",
         "curvlinops_eigenvalue", "curvlinops_trace", "curvlinops_density")
TRACE_PRODUCTS, DENSITY_STEPS, TOL = 50, 100, 1e-3


# --------------------------------------------------------------------------------------------
# the model (in the subprocess)
# --------------------------------------------------------------------------------------------
def build(tiny: bool):
    sys.modules.setdefault("torchvision", None)  # this machine's torchvision does not match torch
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    extra = {"n_layer": 2, "n_embd": 64, "n_head": 2} if tiny else {}
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager", **extra)).float().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))

    class Logits(torch.nn.Module):  # PyHessian and curvlinops want model(x) -> tensor
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).logits

    class NextToken(torch.nn.Module):  # next-token cross-entropy on the logits, float32
        reduction = "mean"  # curvlinops reads it

        def forward(self, logits, labels):
            logits = logits.logits if hasattr(logits, "logits") else logits
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))

    return torch, model, Logits(model), ids, NextToken()


def run_task(task: str, tiny: bool) -> dict:
    torch, model, wrapped, ids, loss_fn = build(tiny)
    n = sum(p.numel() for p in model.parameters())
    out: dict = {"task": task, "n": n, "base_gb": _rss_gb()}
    t0 = time.perf_counter()
    try:
        out.update(_TASKS[task](torch, model, wrapped, ids, loss_fn))
    except (MemoryError, RuntimeError) as err:  # the address-space limit: recorded, not fatal
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    out["seconds"] = out.get("seconds", time.perf_counter() - t0)
    out["peak_gb"] = _rss_gb()
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _gradient(torch, model, wrapped, ids, loss_fn):
    times = []
    for _ in range(4):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss_fn(model(ids), ids).backward()
        times.append(time.perf_counter() - t)
    return {"seconds": sorted(times[1:])[1], "products": 0}


def _train_step(torch, model, wrapped, ids, loss_fn):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(ids), ids).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"seconds": min(times[1:]), "products": 0}


def _hvp(cache):
    def task(torch, model, wrapped, ids, loss_fn):
        import curvop

        H = curvop.hessian(model, loss_fn, (ids, ids), cache=cache)
        v = H.random(H.shape[0], "rademacher", seed=0)
        H.matvec(v)  # the first product builds the cached graph
        t = time.perf_counter()
        H.matvec(v)
        return {"seconds": time.perf_counter() - t, "products": 1, "mode": repr(H).split("(")[1].split(",")[0:2]}
    return task


def _eigenvalue(torch, model, wrapped, ids, loss_fn):
    import curvop

    H = curvop.hessian(model, loss_fn, (ids, ids))
    r = curvop.eigenvalues(H, k=1, tol=TOL, seed=0)
    return {"products": r.num_matvecs, "value": float(r.eigenvalues[0]), "converged": r.converged}


def _trace(torch, model, wrapped, ids, loss_fn):
    import numpy as np

    import curvop

    H = curvop.hessian(model, loss_fn, (ids, ids))
    # curvop.trace holds its probes as one block (3 m vectors): 50 probes of GPT-2 would be 75 GB,
    # so the 50 products run as 25 calls of 2 probes, averaged (the same Hutchinson estimate)
    parts = [curvop.trace(H, method="hutchinson", num_matvecs=2, seed=s).estimate for s in range(TRACE_PRODUCTS // 2)]
    return {"products": H.num_matvecs, "value": float(np.mean(parts)),
            "stderr": float(np.std(parts, ddof=1) / np.sqrt(len(parts)))}


def _density(torch, model, wrapped, ids, loss_fn):
    import curvop

    H = curvop.hessian(model, loss_fn, (ids, ids))
    steps = int(os.environ.get("CURVOP_SCALE_DENSITY_STEPS", DENSITY_STEPS))
    sd = curvop.spectral_density(H, num_steps=steps, num_probes=1, seed=0)
    return {"products": sd.num_matvecs, "value": float(sd.nodes[0].max())}


def _pyhessian(what):
    def task(torch, model, wrapped, ids, loss_fn):
        from pyhessian import hessian

        h = hessian(wrapped, lambda o, y: loss_fn(o, y), data=(ids, ids), cuda=False)
        if what == "eigenvalue":
            lam, _ = h.eigenvalues(maxIter=200, tol=TOL, top_n=1)
            return {"value": float(lam[0])}
        if what == "trace":
            tr = h.trace(maxIter=TRACE_PRODUCTS, tol=-1.0)  # never "converged": all 50 products
            return {"products": len(tr), "value": float(sum(tr) / len(tr))}
        eig, _ = h.density(iter=DENSITY_STEPS, n_v=1)
        return {"products": DENSITY_STEPS, "value": float(max(eig[0]))}
    return task


def _curvlinops(what):
    def task(torch, model, wrapped, ids, loss_fn):
        import curvlinops
        import scipy.sparse.linalg

        params = [p for p in model.parameters() if p.requires_grad]
        H = curvlinops.HessianLinearOperator(wrapped, loss_fn, params, [(ids, ids)])
        if what == "eigenvalue":
            lam = scipy.sparse.linalg.eigsh(H.to_scipy(), k=1, which="LA", tol=TOL)[0]
            return {"value": float(lam[0])}
        if what == "trace":
            return {"products": TRACE_PRODUCTS, "value": float(curvlinops.hutchinson_trace(H, TRACE_PRODUCTS))}
        grid, dens = curvlinops.lanczos_approximate_spectrum(H, ncv=DENSITY_STEPS)
        return {"products": DENSITY_STEPS, "value": float(grid[-1])}
    return task


_TASKS = {"gradient": _gradient, "train_step": _train_step, "hvp_cached": _hvp(True), "hvp_uncached": _hvp(False),
          "eigenvalue": _eigenvalue, "trace": _trace, "density": _density,
          **{f"pyhessian_{w}": _pyhessian(w) for w in ("eigenvalue", "trace", "density")},
          **{f"curvlinops_{w}": _curvlinops(w) for w in ("eigenvalue", "trace", "density")}}


# --------------------------------------------------------------------------------------------
# the SLQ density error of each memory option, against full reorthogonalisation
# --------------------------------------------------------------------------------------------
def reorth_study(tiny_gpt2: bool = True) -> list[dict]:
    """Density of each option vs ``reorth="full"`` on models where both run (same probe)."""
    import copy

    import numpy as np
    import torch
    from scipy.stats import wasserstein_distance

    import curvop

    cases = []
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 5)).double()
    x, y = torch.randn(256, 20, dtype=torch.float64), torch.randint(0, 5, (256,))
    cases.append(("MLP 5.8k, float64", curvop.hessian(mlp, torch.nn.CrossEntropyLoss(), (x, y))))
    cases.append(("MLP 5.8k, float32", curvop.hessian(copy.deepcopy(mlp).float(), torch.nn.CrossEntropyLoss(), (x.float(), y))))
    if tiny_gpt2:
        _, model, _, ids, loss_fn = build(tiny=True)
        cases.append(("GPT-2 2x64 3.4M, float32", curvop.hessian(model, loss_fn, (ids, ids))))
    options = {"local": {"reorth": "local"}, "full, float32 basis": {"reorth": "full", "basis_dtype": "float32"},
               "full, host basis": {"reorth": "full", "basis_location": "host"}}
    rows = []
    for name, H in cases:
        full = curvop.spectral_density(H, num_steps=DENSITY_STEPS, reorth="full", max_basis_bytes=2**40, seed=0)
        sigma = full.default_sigma()
        lo, hi = float(full.nodes[0].min()), float(full.nodes[0].max())
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 4000)
        _, pf = full.density(grid, sigma)
        for opt, kw in options.items():
            if "float32" in opt and H.dtype == np.float32:
                continue
            sd = curvop.spectral_density(H, num_steps=DENSITY_STEPS, seed=0, **kw)
            _, p = sd.density(grid, sigma)
            rows.append({"model": name, "option": opt, "L1": float(np.trapezoid(np.abs(p - pf), grid)),
                         "W1_rel": wasserstein_distance(sd.nodes[0], full.nodes[0], sd.weights[0], full.weights[0]) / (hi - lo),
                         "top_rel": abs(sd.nodes[0].max() - hi) / abs(hi),
                         "nodes_at_top": int(np.sum(np.isclose(sd.nodes[0], hi, rtol=1e-4)))})
    return rows


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
def _subprocess(task: str, tiny: bool, limit_gb: float, timeout: float) -> dict:
    code = ("import json, resource, sys; sys.path.insert(0, 'benchmarks'); "
            f"lim = int({limit_gb} * 2**30); resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
            f"import scale; print('RESULT ' + json.dumps(scale.run_task({task!r}, {tiny})))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"task": task, "error": f"did not finish within {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:160]
    return {"task": task, "error": f"exit {p.returncode}: {tail}"}


def table(rows: list[dict]) -> str:
    by = {r["task"]: r for r in rows}
    g = by.get("gradient", {}).get("seconds")
    peak = by.get("train_step", {}).get("peak_gb")
    lines = ["| task | time (s) | products | time / gradient | peak RSS (GB) | peak / training step | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r and "peak_gb" not in r:
            lines.append(f"| {r['task']} | - | - | - | - | - | {r['error']} |")
            continue
        res = r.get("error") or (f"{r['value']:.6g}" if "value" in r else "")
        if "stderr" in r:
            res += f" ± {r['stderr']:.2g}"
        lines.append(
            f"| {r['task']} | {r['seconds']:.2f} | {r.get('products', '-')} | "
            f"{r['seconds'] / g:.1f} | {r['peak_gb']:.2f} | {r['peak_gb'] / peak:.2f} | {res} |"
            if g and peak else f"| {r['task']} | {r['seconds']:.2f} | {r.get('products', '-')} | - | "
            f"{r['peak_gb']:.2f} | - | {res} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide GPT-2 (for development)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    ap.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit of each task")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per task")
    ap.add_argument("--reorth", action="store_true", help="the SLQ density-error study instead")
    ap.add_argument("--density-steps", type=int, default=DENSITY_STEPS,
                    help="SLQ steps of curvop's density task (memory does not depend on it: reorth='local')")
    ap.add_argument("--no-gpt2", action="store_true", help="--reorth on the MLPs only")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ["CURVOP_SCALE_DENSITY_STEPS"] = str(args.density_steps)  # read by the subprocess
    if args.reorth:
        rows = reorth_study(tiny_gpt2=not args.no_gpt2)
        print("| model | option | L1(density − full) | W1(measure, full) / width | top node rel. diff | nodes at top |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['option']} | {r['L1']:.2e} | {r['W1_rel']:.1e} | {r['top_rel']:.1e} | "
                  f"{r['nodes_at_top']} |")
    else:
        rows = []
        for task in args.tasks:  # one at a time: never two models in memory
            rows.append(_subprocess(task, args.tiny, args.limit_gb, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
        print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
