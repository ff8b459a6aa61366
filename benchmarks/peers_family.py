"""The curvature family side by side with curvlinops (issue 22): the rows ``benchmarks/peers.py`` gains.

On the peers CNN (float32), in one process, contenders interleaved, medians over repeats:

* one product with the GGN: curvop (its default, and each J-product mode) against curvlinops'
  ``GGNLinearOperator``, and against curvop's own Hessian product;
* one product with the empirical Fisher and with the Monte-Carlo Fisher (one draw) against
  curvlinops' ``EFLinearOperator`` and ``FisherMCLinearOperator``;
* agreement: GGN and EF products of the two libraries on the same vector (relative difference);
  for the MC Fisher, whose draws differ, ``vᵀFv / vᵀGv`` of each at 64 draws (both near 1);
* ``solve``: ``(G + λI) x = b`` by curvop's CG against curvlinops' ``CGInverseLinearOperator``
  (GPyTorch's ``linear_cg``) at equal true relative residual: curvlinops runs to its tolerance,
  its true residual is measured, and curvop is asked for that residual.

Memory (peak RSS of setup + two products, each contender in a fresh subprocess) is measured by
``benchmarks/peers.py``'s memory child, which builds these contenders through :func:`build`.

Run alone (rewrites the family section of ``docs/benchmarks.md`` and ``peers.json``)::

    PYTHONPATH=. python benchmarks/peers.py --family-only            # the peers CNN
    PYTHONPATH=. python benchmarks/peers.py --family-only --quick    # seconds
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

import curvop

#: contender name -> (matrix, library); curvop's modes are curvop.ggn options
GGN_MODES = {
    "GGN: curvop (default)": {},
    "GGN: curvop forward cached": dict(hvp="forward", cache=True),
    "GGN: curvop reverse cached": dict(hvp="reverse", cache=True),
    "GGN: curvop forward uncached": dict(hvp="forward", cache=False),
}
CONTENDERS = (*GGN_MODES, "GGN: curvlinops", "Hessian: curvop (default)",
              "EF: curvop", "EF: curvlinops", "MC Fisher: curvop", "MC Fisher: curvlinops")
DAMPING = 1e-2


def _curvlinops_op(name: str, model, crit, batch, **kw):
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator

    cls = {"GGN": GGNLinearOperator, "EF": EFLinearOperator, "MC Fisher": FisherMCLinearOperator}[name]
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(model, crit, params, [batch], progressbar=False, check_deterministic=True, **kw)


def operator(name: str, model, crit, batch, **kw) -> Any:
    """The operator of a contender (curvop's or curvlinops')."""
    matrix, lib = name.split(": ")
    if lib == "curvlinops":
        return _curvlinops_op(matrix, model, crit, batch, **kw)
    if matrix == "GGN":
        return curvop.ggn(model, crit, batch, **GGN_MODES[name])
    if matrix == "Hessian":
        return curvop.hessian(model, crit, batch)
    if matrix == "EF":
        return curvop.fisher(model, crit, batch, kind="empirical")
    return curvop.fisher(model, crit, batch, kind="mc", seed=kw.get("seed", 0), mc_samples=kw.get("mc_samples", 1))


def build(name: str, model, crit, batch, v: torch.Tensor) -> Callable[[], Any]:
    """Set up one contender; returns a zero-argument function doing one product with ``v``."""
    op = operator(name, model, crit, batch)
    return lambda: op @ v


def _flat(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.cat([t.reshape(-1) for t in out])


def agreement(model, crit, batch, v: torch.Tensor, log) -> dict:
    """The two libraries' numbers on the same vector."""
    out = {}
    for matrix in ("GGN", "EF"):
        a = _flat(operator(f"{matrix}: curvop (default)" if matrix == "GGN" else f"{matrix}: curvop",
                           model, crit, batch) @ v)
        b = _flat(operator(f"{matrix}: curvlinops", model, crit, batch) @ v)
        out[matrix] = float((a - b).norm() / b.norm())
        log(f"  agreement {matrix}: curvop vs curvlinops rel diff {out[matrix]:.1e}")
    G = operator("GGN: curvop (default)", model, crit, batch)
    vGv = float(v @ (G @ v))
    for lib in ("curvop", "curvlinops"):
        F = operator(f"MC Fisher: {lib}", model, crit, batch, mc_samples=64,
                     **({"seed": 1} if lib == "curvop" else {"seed": 1}))
        out[f"MC Fisher {lib}: vFv/vGv (64 draws)"] = float(v @ _flat(F @ v)) / vGv
        log(f"  MC Fisher {lib} at 64 draws: vFv / vGv = {out[f'MC Fisher {lib}: vFv/vGv (64 draws)']:.3f}")
    return out


class _Counted:
    """A curvlinops operator ``A + λI`` that counts the columns it multiplies."""

    def __init__(self, A, damping: float):
        from curvlinops._torch_base import PyTorchLinearOperator

        class DampedIdentity(PyTorchLinearOperator):
            SELF_ADJOINT = True

            def __init__(self, shape, lam, device, dtype):
                super().__init__(shape, shape)
                self.lam, self._device, self._dtype = lam, device, dtype

            @property
            def device(self):
                return self._device

            @property
            def dtype(self):
                return self._dtype

            def _matmat(self, X):
                return [self.lam * x for x in X]

        counter = self

        class Counting(PyTorchLinearOperator):
            SELF_ADJOINT = True

            def __init__(self, inner):
                super().__init__(inner._in_shape, inner._out_shape)
                self.inner = inner

            @property
            def device(self):
                return self.inner.device

            @property
            def dtype(self):
                return self.inner.dtype

            def _matmat(self, X):
                counter.count += X[0].shape[-1]
                return self.inner._matmat(X)

        self.count = 0
        self.op = Counting(A + DampedIdentity(A._in_shape, damping, A.device, A.dtype))


def bench_solve(model, crit, batch, cfg, log) -> dict:
    """curvop.solve against curvlinops' CGInverseLinearOperator at equal true relative residual."""
    from curvlinops import CGInverseLinearOperator

    n = sum(p.numel() for p in model.parameters())
    b = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(next(model.parameters()).device)
    G = operator("GGN: curvop (default)", model, crit, batch)
    Gc = _Counted(_curvlinops_op("GGN", model, crit, batch), DAMPING)
    tol, iters = cfg.get("solve_tol", 1e-3), cfg.get("solve_iters", 100)
    inv = CGInverseLinearOperator(Gc.op, tolerance=tol, max_iter=iters)

    def true_residual(x):
        return float((b - (G @ x + DAMPING * x)).norm() / b.norm())

    runs = {"curvlinops": [], "curvop": []}
    for r in range(cfg.get("solve_repeats", 2)):
        for lib in (("curvlinops", "curvop") if r % 2 == 0 else ("curvop", "curvlinops")):
            if lib == "curvlinops":
                Gc.count = 0
                t = time.perf_counter()
                x = inv @ b
                secs = time.perf_counter() - t
                runs[lib].append(dict(seconds=secs, products=Gc.count, residual=true_residual(x)))
            else:
                target = runs["curvlinops"][-1]["residual"] if runs["curvlinops"] else tol
                t = time.perf_counter()
                res = curvop.solve(G, b, damping=DAMPING, tol=max(target, 1e-7), max_matvecs=10 * iters)
                secs = time.perf_counter() - t
                runs[lib].append(dict(seconds=secs, products=res.num_matvecs, residual=true_residual(res.x),
                                      converged=res.converged))
    out = {lib: dict(seconds=float(np.median([r["seconds"] for r in rs])), products=rs[-1]["products"],
                     residual=rs[-1]["residual"]) for lib, rs in runs.items()}
    for lib, r in out.items():
        log(f"  solve {lib:10s} {r['seconds']:7.3f} s  {r['products']:4d} products  true rel residual {r['residual']:.2e}")
    return dict(damping=DAMPING, rows=out)


def bench_family(cfg: dict, log, problem: Callable, interleaved: Callable, med: Callable) -> dict:
    """The family rows: per-product times (interleaved), agreement, and the solve comparison."""
    model, crit, batch = problem("cnn", cfg)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(next(model.parameters()).device)
    fns, setup, errors = {}, {}, {}
    for name in ("gradient", *CONTENDERS):
        try:
            t = time.perf_counter()
            if name == "gradient":
                params = list(model.parameters())
                x, y = batch
                fns[name] = lambda: torch.autograd.grad(crit(model(x), y), params)
            else:
                fns[name] = build(name, model, crit, batch, v)
            setup[name] = time.perf_counter() - t
        except Exception as err:  # a contender that does not run is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"
            log(f"  {name}: setup failed: {errors[name]}")
    times = interleaved(fns, cfg["hvp_repeats"], seed=5)
    g = med(times["gradient"])
    rows = {name: dict(seconds=med(ts), x_gradient=med(ts) / g, setup_s=setup[name]) for name, ts in times.items()}
    for name, r in rows.items():
        log(f"  {name:32s} {r['seconds'] * 1e3:9.1f} ms  {r['x_gradient']:5.2f}x grad  setup {r['setup_s']:6.2f} s")
    return dict(n=n, rows=rows, errors=errors, agreement=agreement(model, crit, batch, v, log),
                solve=bench_solve(model, crit, batch, cfg, log), threads=torch.get_num_threads())


RSS_NOTE = ("Memory: peak RSS of setup + two products in a fresh subprocess, minus the RSS once the problem is "
            "built (`—`: not measured).")


def markdown(fam: dict, memory: dict | None, run: dict | None = None, memory_note: str = RSS_NOTE) -> list[str]:
    """The family section of ``docs/benchmarks.md`` (``run``: the date and machine of a ``--family-only`` run)."""
    rows = fam["rows"]
    L = ["", f"## The curvature family: GGN, Fisher and solves against curvlinops ({fam['n']} parameters)", ""]
    if run is not None:
        m = run["machine"]
        L += [f"Measured by `benchmarks/peers.py --family-only` on {run['date']} ({m['cpu']}, torch threads "
              f"{m['torch_threads']}, load average at start {tuple(round(x, 2) for x in m['load_average_at_start'])}).", ""]
    L += [
         f"One product per contender, interleaved, median of the repeats; `x grad`: the time of one plain gradient "
         f"on the same batch. {memory_note}", "",
         "| contender | ms / product | x grad | setup s | memory MB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        mem = (memory or {}).get(name, {}).get("delta_mb")
        L.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['x_gradient']:.2f} | {r['setup_s']:.2f} | "
                 f"{'—' if mem is None else f'{mem:.1f}'} |")
    for name, e in fam["errors"].items():
        L.append(f"| {name} | failed: {e} | | | |")
    a = fam["agreement"]
    L += ["", f"Agreement on the same vector: GGN products differ by {a['GGN']:.1e} (relative), EF products by "
          f"{a['EF']:.1e}; the MC Fishers' draws differ, so each is compared with the GGN at 64 draws: "
          f"vᵀFv / vᵀGv = {a['MC Fisher curvop: vFv/vGv (64 draws)']:.3f} (curvop), "
          f"{a['MC Fisher curvlinops: vFv/vGv (64 draws)']:.3f} (curvlinops).", ""]
    s = fam["solve"]
    L += [f"`(G + {s['damping']:g} I) x = b` by CG at equal true relative residual (curvlinops runs to its tolerance; "
          "curvop is asked for the residual curvlinops reached):", "",
          "| library | s | products | true rel residual |", "| --- | ---: | ---: | ---: |"]
    for lib, r in s["rows"].items():
        L.append(f"| {lib} | {r['seconds']:.3f} | {r['products']} | {r['residual']:.2e} |")
    return L
