"""Do AdaHessian's and Sophia's claims reproduce at small scale? AdamW, AdaHessian, Sophia-H and
Sophia-G (``curvop.optim``) on two tasks, steps and wall-clock time to a target loss.

Tasks: the digits CNN of the demo (scikit-learn's 8x8 digits, the training loss over all 1437
training images) and a character-level transformer on the standard library's docstrings
(:mod:`curvop.studies.char_text`, the loss on held-out windows). Each optimizer's learning rate is
picked from a small grid on a tuning seed (the fewest steps to the target, else the lowest final
loss), then run on the evaluation seeds (initial weights, batch order and probes all follow the
seed). Weight decay 0.01 (decoupled) for all; Sophia with β = (0.965, 0.99), ρ = 0.04, every = 10.

``curvop study optimizers [--quick] --out DIR`` writes ``results.json``, ``optimizers.png`` and
``report.md``.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Setting", "QUICK", "FULL", "OPTIMIZERS", "run", "summarize", "verdicts"]

OPTIMIZERS = ("AdamW", "AdaHessian", "Sophia-H", "Sophia-G")


@dataclass(frozen=True)
class Setting:
    """The grids, seeds, budgets and targets of a run."""

    lrs: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    tune_seed: int
    steps: dict[str, int]
    eval_every: int
    targets: dict[str, float]
    cost_rounds: int = 8
    transformer: dict[str, int] = field(default_factory=lambda: {"d": 32, "layers": 2, "heads": 2, "context": 32})
    batch: dict[str, int] = field(default_factory=lambda: {"cnn": 64, "transformer": 16})


FULL = Setting(
    lrs={"AdamW": (1e-3, 3e-3, 1e-2, 3e-2), "AdaHessian": (0.03, 0.1, 0.3), "Sophia-H": (1e-3, 3e-3, 1e-2, 3e-2),
         "Sophia-G": (1e-3, 3e-3, 1e-2, 3e-2)},
    seeds=(0, 1, 2, 3, 4), tune_seed=100, steps={"cnn": 300, "transformer": 500}, eval_every=10,
    targets={"cnn": 0.2, "transformer": 2.55})
QUICK = Setting(
    lrs={"AdamW": (1e-2,), "AdaHessian": (0.1,), "Sophia-H": (1e-2,), "Sophia-G": (1e-2,)},
    seeds=(0, 1), tune_seed=100, steps={"cnn": 30, "transformer": 30}, eval_every=10,
    targets={"cnn": 1.0, "transformer": 3.3}, cost_rounds=2,
    transformer={"d": 16, "layers": 1, "heads": 2, "context": 16}, batch={"cnn": 64, "transformer": 8})


# --- tasks ---------------------------------------------------------------------------------------------
class _Task:
    """A model factory, seeded training batches, the loss, and the evaluation loss."""

    def __init__(self, name: str, setting: Setting):
        import torch

        from curvop.studies import char_text, digits

        self.name, self.setting = name, setting
        ce = torch.nn.CrossEntropyLoss()
        if name == "cnn":
            self.data = digits.load(0)
            self.loss_fn = ce
            self.flat = lambda out, y: (out, y)
        else:
            ids = char_text.encode(char_text.corpus())
            cut = int(0.9 * len(ids))
            self.train_ids, held = ids[:cut], ids[cut:]
            t = setting.transformer
            x, y = next(char_text.batches(held, context=t["context"], batch_size=256, seed=12345))
            self.eval_batch = (x, y)
            self.loss_fn = ce
            self.flat = lambda out, y: (out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def model(self, seed: int) -> Any:
        import torch

        from curvop.studies import char_text, digits

        torch.manual_seed(seed)
        if self.name == "cnn":
            return digits.cnn(8)
        t = self.setting.transformer
        return char_text.transformer(d=t["d"], layers=t["layers"], heads=t["heads"], context=t["context"])

    def batches(self, seed: int) -> Any:
        import torch

        from curvop.studies import char_text

        size = self.setting.batch[self.name]
        if self.name != "cnn":
            yield from char_text.batches(self.train_ids, context=self.setting.transformer["context"],
                                         batch_size=size, seed=seed)
            return
        x, y = self.data.train
        gen = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(y), generator=gen).split(size):
                yield x[idx], y[idx]

    def evaluate(self, model: Any) -> float:
        import torch

        x, y = self.data.train if self.name == "cnn" else self.eval_batch
        with torch.no_grad():
            return float(self.loss_fn(*self.flat(model(x), y)))


def _stepper(name: str, model: Any, lr: float, seed: int, task: _Task) -> Callable[[Any, Any], None]:
    """One training step of optimizer ``name`` on a batch."""
    import torch

    import curvop.optim as co

    params = list(model.parameters())
    if name == "AdamW":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

        def step(x: Any, y: Any) -> None:
            opt.zero_grad()
            task.loss_fn(*task.flat(model(x), y)).backward()
            opt.step()

        return step
    sophia = dict(lr=lr, betas=(0.965, 0.99), rho=0.04, weight_decay=0.01, every=10, seed=seed)
    if name == "Sophia-G":
        opt = co.SophiaG(params, loss_fn=task.loss_fn, **sophia)
        return lambda x, y: opt.step(lambda: task.flat(model(x), y))
    opt = (co.AdaHessian(params, lr=lr, weight_decay=0.01, seed=seed) if name == "AdaHessian"
           else co.SophiaH(params, **sophia))
    return lambda x, y: opt.step(lambda: task.loss_fn(*task.flat(model(x), y)))


def train(task: _Task, name: str, lr: float, seed: int) -> dict[str, Any]:
    """One run: train until the evaluation loss reaches the target or the step budget ends.

    The clock counts training steps only (not the evaluations)."""
    model = task.model(seed)
    step = _stepper(name, model, lr, seed, task)
    batches = task.batches(seed)
    target, budget, every = task.setting.targets[task.name], task.setting.steps[task.name], task.setting.eval_every
    curve, seconds, reached, cpu = [[0, 0.0, task.evaluate(model)]], 0.0, None, time.process_time()
    for t in range(1, budget + 1):
        x, y = next(batches)
        t0 = time.perf_counter()
        step(x, y)
        seconds += time.perf_counter() - t0
        if t % every == 0 or t == budget:
            loss = task.evaluate(model)
            curve.append([t, seconds, loss])
            if not math.isfinite(loss):
                break
            if loss <= target:
                reached = [t, seconds]
                break
    return {"optimizer": name, "lr": lr, "seed": seed, "curve": curve, "reached": reached,
            "ms_per_step": 1e3 * seconds / curve[-1][0], "final_loss": curve[-1][2],
            "cpu_seconds": time.process_time() - cpu}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, steps: int = 10) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round: a round calls each ``steps`` times
    in a row, the order rotated from round to round (so slow phases of a shared machine fall on
    every contender alike). Compare contenders by the median of their per-round ratios."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def step_costs(task: _Task, chosen: dict[str, float], rounds: int) -> dict[str, float]:
    """Each optimizer's time per step over AdamW's, interleaved (rounds of 10 steps: one Sophia
    curvature step each, its amortised cost), median of the per-round ratios."""
    x, y = next(task.batches(0))
    fns = {}
    for name in OPTIMIZERS:
        step = _stepper(name, task.model(0), chosen[name], 0, task)
        for _ in range(3):
            step(x, y)
        fns[name] = (lambda f: lambda: f(x, y))(step)
    times = interleaved(fns, rounds)
    base = np.array(times["AdamW"])
    return {k: float(np.median(np.array(v) / base)) for k, v in times.items()}


def _tune_key(r: dict[str, Any]) -> tuple[float, float]:
    final = r["final_loss"] if math.isfinite(r["final_loss"]) else float("inf")
    return (r["reached"][0] if r["reached"] else float("inf"), final)


# --- summary and verdicts ----------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per optimizer: runs reaching the target, steps and seconds to it (mean, standard error), ms per step."""
    out = {}
    for name in OPTIMIZERS:
        rs = [r for r in runs if r["optimizer"] == name]
        if not rs:
            continue
        hit = [r for r in rs if r["reached"]]
        steps, secs = _mean_se([r["reached"][0] for r in hit]), _mean_se([r["reached"][1] for r in hit])
        out[name] = {"lr": rs[0]["lr"], "reached": len(hit), "runs": len(rs), "steps": steps, "seconds": secs,
                     "ms_per_step": _mean_se([r["ms_per_step"] for r in rs])}
    return out


def _faster(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, bool]:
    """``b``'s mean over ``a``'s (the speed-up of ``a`` over ``b`` in ``key``) and whether ``a`` is faster
    by more than two combined standard errors (both reaching the target in every run)."""
    (ma, sa), (mb, sb) = a[key], b[key]
    if a["reached"] < a["runs"] or b["reached"] < b["runs"]:
        return float("nan"), False
    return mb / ma, bool(mb - ma > 2 * math.hypot(sa, sb))


def verdicts(summary: dict[str, Any], costs: dict[str, float]) -> list[dict[str, str]]:
    """The claims, judged on one task's summary and interleaved step costs (see the report for the rules)."""
    out = []
    base = summary.get("AdamW")
    if base is None:
        return out
    ada = summary.get("AdaHessian")
    if ada is not None:
        ratio, sig = _faster(ada, base, "steps")
        out.append({"claim": "AdaHessian reaches the loss in fewer steps than AdamW (Yao et al.)",
                    "measured": f"AdamW/AdaHessian steps {ratio:.2f}x",
                    "verdict": "reproduces" if sig else ("not measurable (a run missed the target)"
                                                           if math.isnan(ratio) else "does not reproduce")})
        tr, tsig = _faster(ada, base, "seconds")
        out.append({"claim": "... and in less wall-clock time than AdamW",
                    "measured": f"AdamW/AdaHessian seconds {tr:.2f}x",
                    "verdict": "reproduces" if tsig else ("not measurable" if math.isnan(tr) else "does not reproduce")})
    for name in ("Sophia-H", "Sophia-G"):
        s = summary.get(name)
        if s is None:
            continue
        ratio, sig = _faster(s, base, "steps")
        if math.isnan(ratio):
            v = "not measurable (a run missed the target)"
        elif sig and ratio >= 2 * (1 - 0.1):
            v = "reproduces (about 2x fewer steps)"
        elif sig:
            v = f"partly: fewer steps, {ratio:.2f}x not 2x"
        else:
            v = "does not reproduce"
        out.append({"claim": f"{name} needs half AdamW's steps (Liu et al.: 2x on GPT-2)",
                    "measured": f"AdamW/{name} steps {ratio:.2f}x", "verdict": v})
        cost = costs[name]
        out.append({"claim": f"{name}'s step costs at most 5% more than AdamW's (every=10)",
                    "measured": f"{cost:.2f}x AdamW's time per step (interleaved)",
                    "verdict": "reproduces" if cost <= 1.05 else ("close (within 15%)" if cost <= 1.15
                                                                  else "does not reproduce")})
    return out


# --- outputs -------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Evaluation loss against step and against seconds, median over seeds, per task and optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        res = results["tasks"][task]
        for name in OPTIMIZERS:
            rs = [r for r in res["runs"] if r["optimizer"] == name]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            c = np.array([r["curve"][:n] for r in rs])
            med = np.median(c, axis=0)
            row[0].plot(med[:, 0], med[:, 2], label=f"{name} (lr {rs[0]['lr']:g})")
            row[1].plot(med[:, 1], med[:, 2], label=name)
        for ax, xlabel in zip(row, ("step", "training seconds")):
            ax.axhline(res["target"], ls="--", color="gray", lw=1)
            ax.set(xlabel=xlabel, ylabel="evaluation loss", yscale="log",
                   title=f"{task}: median over seeds, until the first stops at the target")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(ms: tuple[float, float], fmt: str = "{:.1f}") -> str:
    m, s = ms
    if math.isnan(m):
        return "—"
    return fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.format(s))


def report(results: dict[str, Any], command: str) -> str:
    """The markdown report: per task a table and the verdicts."""
    setting = results["setting"]
    grids = "; ".join(f"{k} {', '.join(f'{v:g}' for v in lrs)}" for k, lrs in setting["lrs"].items())
    parts = [f"""# Study: second-order optimizers at small scale

AdamW against `curvop.optim`'s AdaHessian, Sophia-H and Sophia-G (torch, CPU, one thread) on two
tasks: the digits CNN (scikit-learn's 8x8 digits, loss over the 1437 training images) and a
character-level transformer on the standard library's docstrings (Python {results['python']},
loss on 256 held-out windows). Learning rates: picked per optimizer from {grids} on
tuning seed {setting['tune_seed']} (fewest steps to the target, else lowest final loss), then
{len(setting['seeds'])} evaluation seeds (weights, batch order and probes follow the seed); the loss is
evaluated every {setting['eval_every']} steps, the resolution of "steps to target".
Weight decay 0.01 for all (decoupled); Sophia with β = (0.965, 0.99), ρ = 0.04, every = 10;
AdaHessian with β = (0.9, 0.999), ε = 1e-4, one probe. Times count the training steps only, on a
2-core machine shared with other jobs, {results['jobs']} run(s) at a time: read them as ratios within a
task (the interleaved cost measurement is in `docs/performance.md`).

**Rules of the verdicts.** A speed claim "reproduces" when every run of both optimizers reached
the target and the difference of the means exceeds two combined standard errors; Sophia's "half
the steps" needs a ratio of at least 1.8; its cost claim compares the time per step measured
interleaved with AdamW's ({setting['cost_rounds']} rounds of 10 steps, median of the per-round ratios).
"""]
    for task, res in results["tasks"].items():
        s = res["summary"]
        rows = "\n".join(
            f"| {name} | {v['lr']:g} | {v['reached']}/{v['runs']} | {_pm(v['steps'])} | {_pm(v['seconds'], '{:.2f}')} | "
            f"{_pm(v['ms_per_step'])} | {res['costs'][name]:.2f} |" for name, v in s.items())
        ver = "\n".join(f"| {v['claim']} | {v['measured']} | **{v['verdict']}** |" for v in res["verdicts"])
        parts.append(f"""## {task}: target loss {res['target']}, at most {res['budget']} steps

| optimizer | lr | reached | steps to target | seconds to target | ms per step | x AdamW per step (interleaved) |
|---|---|---|---|---|---|---|
{rows}

| claim | measured | verdict |
|---|---|---|
{ver}
""")
    parts.append(f"""![loss curves](optimizers.png)

Command: `{command}`: {results['seconds']:.0f} s on the shared machine, {results['cpu_seconds']:.0f} CPU-seconds
in all (about {results['cpu_seconds'] / 120:.0f} minutes on two free cores).
""")
    return "\n".join(parts)


_TASKS: dict[tuple[str, str], _Task] = {}


def _job(args: tuple[str, Setting, str, float, int]) -> dict[str, Any]:
    """One training run in a worker process (one torch thread; the task built once per process)."""
    import torch

    name, setting, opt, lr, seed = args
    torch.set_num_threads(1)
    key = (name, repr(setting))
    if key not in _TASKS:
        _TASKS[key] = _Task(name, setting)
    return train(_TASKS[key], opt, lr, seed)


def _pool(jobs: int) -> Any:
    import concurrent.futures
    import multiprocessing

    if jobs <= 1:
        return None
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def run(out: str, *, quick: bool = False, seed: int = 0, quiet: bool = False, command: str = "",
        jobs: int | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study; write ``results.json``, ``optimizers.png`` and ``report.md`` into ``out``.

    ``seed`` shifts every seed (tuning and evaluation) by that amount; ``jobs`` runs that many
    training runs at once, in worker processes of one torch thread each (default: 2, and 1 with
    ``quick``, whose runs are shorter than starting a worker).
    """
    import platform

    setting = QUICK if quick else FULL
    jobs = (1 if quick else 2) if jobs is None else int(jobs)
    talk = (lambda s: None) if quiet else say
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"quick": quick, "seed": seed, "jobs": jobs, "python": platform.python_version(),
                               "setting": asdict(setting), "tasks": {}}
    pool, cpu, cpu0 = _pool(jobs), 0.0, time.process_time()
    mapped = (lambda f, xs: list(pool.map(f, xs))) if pool is not None else (lambda f, xs: [f(x) for x in xs])
    try:
        for name in ("cnn", "transformer"):
            grid = [(o, lr) for o in OPTIMIZERS if len(setting.lrs[o]) > 1 for lr in setting.lrs[o]]
            tuned = mapped(_job, [(name, setting, o, lr, setting.tune_seed + seed) for o, lr in grid])
            chosen = {o: setting.lrs[o][0] for o in OPTIMIZERS}
            chosen.update({o: min((r for r in tuned if r["optimizer"] == o), key=_tune_key)["lr"]
                           for o in OPTIMIZERS if len(setting.lrs[o]) > 1})
            runs = mapped(_job, [(name, setting, o, chosen[o], s + seed) for o in OPTIMIZERS for s in setting.seeds])
            if pool is not None:  # the workers' CPU time (in-process runs count in the main process's)
                cpu += sum(r["cpu_seconds"] for r in tuned + runs)
            summary = summarize(runs)
            costs = step_costs(_Task(name, setting), chosen, setting.cost_rounds)
            for o, v in summary.items():
                talk(f"{name} {o}: lr {v['lr']:g}, {v['reached']}/{v['runs']} reached {setting.targets[name]}, "
                     f"steps {_pm(v['steps'])}, {time.perf_counter() - t0:.0f} s")
            results["tasks"][name] = {
                "target": setting.targets[name], "budget": setting.steps[name], "chosen": chosen,
                "tuning": [{k: r[k] for k in ("optimizer", "lr", "reached", "final_loss")} for r in tuned],
                "runs": runs, "summary": summary, "costs": costs, "verdicts": verdicts(summary, costs)}
    finally:
        if pool is not None:
            pool.shutdown()
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = cpu + time.process_time() - cpu0
    (path / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, path / "optimizers.png")
    (path / "report.md").write_text(report(results, command or "curvop study optimizers"))
    talk(f"wrote {path / 'results.json'}, {path / 'optimizers.png'}, {path / 'report.md'}")
    return results
