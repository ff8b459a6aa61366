"""Cost of one Hessian-vector product on real architectures, every torch mode, as a multiple of a gradient.

    python benchmarks/models.py             # every model, float64/float32, batch 4/32 (long)
    python benchmarks/models.py --quick     # one small configuration per family; seconds
    python benchmarks/models.py --layers    # one convolution's cached product, curvop's conv vs torch's
    python benchmarks/models.py --layers-of mobilenet_v3_small --dtypes float64 --batches 32   # per layer

Models (32x32 inputs, 10 classes, random weights, eval mode; ``_real_models.py``): torchvision
resnet18 and mobilenet_v3_small, timm convnext_atto and tinynet_e, a tiny ViT (SDPA), an
``nn.TransformerEncoder`` and, when ``transformers`` imports, a tiny GPT-2. Modes: ``hvp`` forward
or reverse x ``cache`` True or False x ``rewrite`` True or False (the rewrites apply to reverse
mode only, so forward is measured once), plus two variants of the cached reverse mode:
``every conv`` rewrites every convolution and folds BatchNorm into it, as curvop did before (the
old default), ``no conv`` keeps torch's convolutions and only writes BatchNorm as an affine map. Each time is
the median over interleaved repeats of one product divided by the median of one gradient
(forward + backward) measured in the same rounds, on one thread. Writes
``benchmarks/results/models.json``.

"default / best" is paired: in every round the default's product time is divided by each other
mode's, and the table gives the largest median of those ratios (the mode the default loses most
to) with a 90 % confidence interval for that median from the order statistics of the rounds. A
ratio of medians taken separately, and the minimum over eight noisy medians, are both biased
towards the default losing; the paired ratio is not. "job" adds each mode's build cost: the
default's time for its build plus 40 products (about a top-5 eigenvalue solve) over the fastest
mode's.

    python benchmarks/models.py --workers 12 --first-cpu 4   # one configuration per core, in parallel
    python benchmarks/models.py --device cuda --models resnet18 gpt2 --dtypes float32 --batches 32

``--device cuda`` puts models and batches on the GPU and synchronises after every timed call; it
adds a ``matmat`` column: ``H @ V`` with 8 columns, vmapped (``batched=True``, the CUDA default),
over 8 single products, both in the default mode.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
import _torchvision_cpu  # noqa: E402
from _stats import median_ci  # noqa: E402

_torchvision_cpu.install()  # the real torchvision/timm models even with torchvision's CUDA wheel (see there)

MODES = {  # label -> curvop.hessian options
    "rev cached": dict(hvp="reverse", cache=True),  # the default
    "rev cached torch ops": dict(hvp="reverse", cache=True, rewrite=False),  # PyHessian's way
    "rev cached every conv": dict(hvp="reverse", cache=True, convs="all"),  # the old default
    "rev cached no conv": dict(hvp="reverse", cache=True, convs="none"),  # BatchNorm as affine map only
    "rev": dict(hvp="reverse", cache=False),
    "rev torch ops": dict(hvp="reverse", cache=False, rewrite=False),
    "fwd cached": dict(hvp="forward", cache=True),
    "fwd": dict(hvp="forward", cache=False),
}
CNNS = ["resnet18", "mobilenet_v3_small", "convnext_atto", "tinynet_e"]
DEFAULT = "rev cached"
JOB_PRODUCTS = 40  # about what a top-5 eigenvalue solve takes
MIN_SAMPLE_S = 0.02  # shorter calls are timed several times per sample
DEVICE = "cpu"  # --device: where models, batches and vectors live
MATMAT_COLUMNS = 8


def problem(name: str, dtype, batch: int):
    """(model in eval mode, loss, (inputs, targets))."""
    import torch
    from torch import nn

    import _real_models as zoo

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, attn_implementation="sdpa")
        lm = GPT2LMHeadModel(cfg)
        model = _Logits(lm).to(dtype).eval()
        ids = torch.randint(0, 64, (batch, 16), generator=g)
        return model.to(DEVICE), nn.CrossEntropyLoss(), (ids.to(DEVICE),
                                                         torch.randint(0, 64, (batch * 16,), generator=g).to(DEVICE))
    if name == "tiny_vit":
        model = zoo.TinyViT()
    elif name == "encoder":
        model = zoo.EncoderClassifier()
    else:
        model = zoo.vision(name)
    model = model.to(dtype)
    shape = (batch, 16, 64) if name == "encoder" else (batch, 3, 32, 32)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of data, then frozen
        model(torch.randn((16,) + shape[1:], dtype=dtype, generator=g))
    model.eval()
    return model.to(DEVICE), nn.CrossEntropyLoss(), (torch.randn(shape, dtype=dtype, generator=g).to(DEVICE),
                                                     torch.randint(0, 10, (batch,), generator=g).to(DEVICE))


class _Logits:  # a module wrapper made lazily so that torch imports only when needed
    def __new__(cls, lm):
        from torch import nn

        class Logits(nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm = lm

            def forward(self, ids):
                return self.lm(input_ids=ids).logits.flatten(0, 1)

        return Logits(lm)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if DEVICE != "cpu":  # the GPU's queue drained: the call's whole cost
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t


def build(model, loss_fn, data, options: dict):
    import torch

    import curvop
    from curvop.backends.torch import rewrites

    options = dict(options)
    convs = options.pop("convs", None)
    ratios = options.pop("ratios", {})  # {(dtype name, kind): threshold}: a candidate rule
    real, real_ratio = rewrites.conv_wins, {k: dict(v) for k, v in rewrites.RATIO.items()}
    rewrites.conv_wins = {"all": lambda *a: True, "none": lambda *a: False}.get(convs, real)
    for (dtype, kind), threshold in ratios.items():
        rewrites.RATIO[getattr(torch, dtype)][kind] = threshold
    try:
        return curvop.hessian(model, loss_fn, data, check_deterministic=False, **options)
    finally:
        rewrites.conv_wins = real
        rewrites.RATIO.update(real_ratio)


def measure(name: str, dtype_name: str, batch: int, repeats: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    model, loss_fn, (x, y) = problem(name, dtype, batch)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        torch.autograd.grad(loss_fn(model(x), y), params)

    ops, setup = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the first pass pays the one-time costs (lazy imports, first traces)
            for label, options in MODES.items():
                t = _timed(lambda: ops.__setitem__(label, build(model, loss_fn, (x, y), options)))
                setup[label] = min(t, setup.get(label, t))
    v = torch.randn(ops["rev"].shape[0], dtype=dtype, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gradient()
    for H in ops.values():  # warm-up
        H.backend.hvp(v)
    runs = {"grad": gradient, **{k: (lambda H=H: H.backend.hvp(v)) for k, H in ops.items()}}
    if DEVICE != "cpu":  # one block of columns: vmapped against a loop of single products
        V = torch.randn(v.shape[0], MATMAT_COLUMNS, dtype=dtype, generator=torch.Generator().manual_seed(3))
        V = V.to(DEVICE)
        Hv, Hl = (build(model, loss_fn, (x, y), dict(MODES[DEFAULT], batched=b)) for b in (True, False))
        runs["matmat vmap"] = lambda: Hv.backend.hvp_batch(V)
        runs["matmat loop"] = lambda: Hl.backend.hvp_batch(V)
        runs["matmat vmap"](), runs["matmat loop"]()  # warm-up (the vmapped graph is traced once)
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = random.Random(0)
    reps = max(1, round(MIN_SAMPLE_S / _timed(gradient)))  # a sample of a tiny model is several calls
    for _ in range(repeats):  # interleaved rounds, each in a new order (no mode always runs first)
        for label in order.sample(list(runs), len(runs)):
            times[label].append(_timed(lambda: [runs[label]() for _ in range(reps)]) / reps)
    g = statistics.median(times["grad"])
    hvp = {k: statistics.median(times[k]) / g for k in ops}
    paired = {k: median_ci([d / o for d, o in zip(times[DEFAULT], times[k])]) for k in ops if k != DEFAULT}
    matmat = (median_ci([lo / vm for lo, vm in zip(times["matmat loop"], times["matmat vmap"])])
              if "matmat vmap" in times else None)
    setup_g = {k: t / g for k, t in setup.items()}
    return {"model": name, "dtype": dtype_name, "batch": batch, "params": sum(p.numel() for p in params),
            "grad_ms": round(1e3 * g, 2), "repeats": repeats,
            "hvp": {k: round(v, 3) for k, v in hvp.items()},
            "paired": {k: [round(x, 3) for x in v] for k, v in paired.items()},
            "setup": {k: round(v, 1) for k, v in setup_g.items()},
            "device": DEVICE, "matmat_loop_over_vmap": matmat and [round(x, 3) for x in matmat],
            "rounds_ms": {k: [round(1e3 * x, 3) for x in t] for k, t in times.items()}}


def jobs(row: dict) -> dict[str, float]:
    """Each mode's build plus :data:`JOB_PRODUCTS` products over the default's, the products' costs
    taken from the paired ratios (robust to the machine's drift) and the default's median."""
    h = row["hvp"][DEFAULT]
    job = {k: row["setup"][k] + JOB_PRODUCTS * h / (row["paired"][k][0] if k in row["paired"] else 1.0)
           for k in row["hvp"]}
    return {k: v / job[DEFAULT] for k, v in job.items()}


def worst(row: dict) -> tuple[str, list[float]]:
    """The mode the default loses most to, and [median, low, high] of default / that mode."""
    label = max(row["paired"], key=lambda k: row["paired"][k][0])
    return label, row["paired"][label]


def table(rows: list[dict]) -> str:
    labels = list(MODES)
    head = ("| model | dtype | batch | grad ms | " + " | ".join(labels)
            + " | default / best | 90 % CI | best (paired) | default / torch ops | job: default / best |")
    lines = [head, "|" + "---|" * (len(labels) + 9)]
    if any(r.get("matmat_loop_over_vmap") for r in rows):  # a GPU run: the block product's column
        lines[0] += f" {MATMAT_COLUMNS} loops / vmap |"
        lines[1] += "---|"
    for r in rows:
        best = min(r["hvp"].values())
        cells = [f"**{r['hvp'][k]:.2f}**" if r["hvp"][k] == best else f"{r['hvp'][k]:.2f}" for k in labels]
        label, (m, lo, hi) = worst(r)
        job = 1 / min(jobs(r).values())
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['grad_ms']:.0f} | " + " | ".join(cells)
                     + f" | {m:.2f} | {lo:.2f}-{hi:.2f} | {label} | {r['paired']['rev cached torch ops'][0]:.2f}"
                     + f" | {job:.2f} |")
        if "loops / vmap" in lines[0]:
            mm = r.get("matmat_loop_over_vmap")
            lines[-1] += f" {mm[0]:.2f} ({mm[1]:.2f}-{mm[2]:.2f}) |" if mm else " - |"
    return "\n".join(lines)


def _conv_product_times(x, w, stride, padding, dilation, groups, repeats: int) -> dict[str, float]:
    """One convolution's cached reverse product (input and weight both differentiated), torch's
    conv2d vs curvop's: the median seconds of each."""
    import torch
    import torch.nn.functional as F

    from curvop.backends.torch.rewrites import conv2d

    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    t = {}
    for name, conv in (("torch", F.conv2d), ("curvop", conv2d)):
        gr = torch.autograd.grad(torch.tanh(conv(x, w, None, stride, padding, dilation, groups)).sum(), (x, w),
                                 create_graph=True)
        vs = [torch.randn_like(gr[0]), torch.randn_like(gr[1])]
        t[name] = statistics.median(_timed(lambda: torch.autograd.grad(gr, (x, w), vs, retain_graph=True))
                                    for _ in range(repeats))
    return t


def layers(repeats: int = 5) -> list[dict]:
    """The per-layer convolution table for the layer shapes of the models above."""
    import torch

    shapes = [  # batch, c_in, c_out, kernel, size, groups
        (4, 64, 64, 3, 8, 1), (32, 64, 64, 3, 8, 1), (4, 512, 512, 3, 1, 1), (4, 16, 16, 3, 32, 1),
        (32, 16, 16, 3, 32, 1), (4, 96, 576, 1, 1, 1), (32, 40, 160, 1, 8, 1), (4, 72, 72, 3, 8, 72),
        (32, 72, 72, 3, 8, 72), (4, 40, 40, 7, 8, 40)]
    rows = []
    for dtype in (torch.float64, torch.float32):
        for b, ci, co, k, s, groups in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, ci, s, s, dtype=dtype, generator=g)
            w = torch.randn(co, ci // groups, k, k, dtype=dtype, generator=g)
            t = _conv_product_times(x, w, 1, k // 2, 1, groups, repeats)
            rows.append({"dtype": str(dtype)[6:], "shape": [b, ci, co, k, s, groups],
                         "out/weight": round(b * co * s * s / w.numel(), 2),
                         "curvop/torch": round(t["curvop"] / t["torch"], 2)})
            print(rows[-1], flush=True)
    return rows


def layers_of(name: str, dtype_name: str, batch: int, repeats: int = 7) -> list[dict]:
    """The same comparison for every convolution of one model, with the inputs it sees."""
    import torch

    model, _, (x, _) = problem(name, getattr(torch, dtype_name), batch)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0], m))) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows, total = [], {}
    for xi, m in seen:
        kind = "pointwise" if m.kernel_size == (1, 1) else "dense" if m.groups == 1 else "depthwise"
        t = _conv_product_times(xi, m.weight, m.stride, m.padding, m.dilation, m.groups, repeats)
        total[kind] = [a + b for a, b in zip(total.get(kind, [0.0, 0.0]), (t["torch"], t["curvop"]))]
        rows.append({"kind": kind, "input": list(xi.shape), "weight": list(m.weight.shape),
                     "torch_ms": round(1e3 * t["torch"], 2), "curvop/torch": round(t["curvop"] / t["torch"], 2)})
        print(rows[-1], flush=True)
    print({"model": name, "dtype": dtype_name, "batch": batch,  # per kind: torch's ms, curvop's ms
           **{kind: [round(1e3 * v, 1) for v in ms] for kind, ms in total.items()}})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny ViT and MobileNetV3, batch 2, one repeat")
    ap.add_argument("--layers", action="store_true", help="the per-layer convolution table")
    ap.add_argument("--layers-of", metavar="MODEL", help="the same for every convolution of MODEL (--dtypes, --batches)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--dtypes", nargs="*", default=["float64", "float32"])
    ap.add_argument("--batches", nargs="*", type=int, default=[4, 32])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "models.json"))
    ap.add_argument("--workers", type=int, default=1, help="configurations measured at once, one process per core")
    ap.add_argument("--first-cpu", type=int, default=0, help="with --workers: the first core to pin to")
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)  # a worker's core
    ap.add_argument("--table", metavar="JSON", help="print the table of a saved run and exit")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: models and vectors on the GPU, one process")
    ap.add_argument("--candidate", action="append", default=[], metavar="DTYPE:KIND=T[,...]",
                    help="one more cached reverse mode with conv_wins thresholds changed, e.g. float64:pointwise=64")
    args = ap.parse_args(argv)
    if args.table:
        rows = json.loads(pathlib.Path(args.table).read_text())["rows"]
        MODES.update({k: {} for r in rows for k in r["hvp"] if k not in MODES})
        print(table(rows))
        return rows
    for spec in args.candidate:
        ratios = {tuple(k.split(":")): float(t) for k, t in (item.split("=") for item in spec.split(","))}
        MODES[f"candidate {spec}"] = dict(hvp="reverse", cache=True, ratios=ratios)
    global DEVICE
    DEVICE = args.device
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    import torch

    torch.set_num_threads(1)
    if args.layers:
        return layers()
    if args.layers_of:
        return [r for d in args.dtypes for b in args.batches for r in layers_of(args.layers_of, d, b)]
    if args.quick:
        configs = [("tiny_vit", "float64", 2), ("mobilenet_v3_small", "float32", 2)]
    else:
        names = args.models or CNNS + ["tiny_vit", "encoder"] + (["gpt2"] if _has_transformers() else [])
        configs = [(n, d, b) for d, b in (("float64", 4), ("float32", 32), ("float32", 4), ("float64", 32))
                   for n in names if d in args.dtypes and b in args.batches]
    repeats = args.repeats or (1 if args.quick else 5)
    if args.workers > 1 and not args.quick:
        rows = parallel(configs, repeats, args.workers, args.first_cpu, args.out, args.candidate)
        print(table(rows))
        return rows
    rows = []
    for name, dtype, batch in configs:
        rows.append(measure(name, dtype, batch, repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.quick:
            pathlib.Path(args.out).write_text(json.dumps({"torch_threads": 1, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return rows


def parallel(configs: list, repeats: int, workers: int, first_cpu: int, out_path: str,
             candidates: list[str] = ()) -> list[dict]:
    """Each configuration in its own process pinned to its own core, ``workers`` at a time; the rows
    measured so far are written to ``out_path`` as each process ends."""
    order = {c: i for i, c in enumerate(configs)}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cost = {"float64": 2, "float32": 1}  # the largest configurations first, so none starts last
        pending = sorted(enumerate(configs), key=lambda c: -c[1][2] * cost.get(c[1][1], 1))
        running = {}
        free = list(range(first_cpu, first_cpu + workers))
        while pending or running:
            while pending and free:
                i, (name, dtype, batch) = pending.pop(0)
                cpu = free.pop(0)
                out = os.path.join(tmp, f"{i}.json")
                cmd = [sys.executable, __file__, "--models", name, "--dtypes", dtype, "--batches", str(batch),
                       "--repeats", str(repeats), "--out", out, "--cpu", str(cpu)]
                cmd += [a for spec in candidates for a in ("--candidate", spec)]
                running[subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})] = (cpu, out)
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                cpu, out = running.pop(proc)
                free.append(cpu)
                if proc.returncode == 0 and os.path.exists(out):
                    new = json.loads(pathlib.Path(out).read_text())["rows"]
                    print("\n".join(table(new).splitlines()[2:]), flush=True)
                    rows = sorted(rows + new, key=lambda r: order[(r["model"], r["dtype"], r["batch"])])
                    pathlib.Path(out_path).write_text(json.dumps({"torch_threads": 1, "rows": rows}, indent=1) + "\n")
    return rows


def _has_transformers() -> bool:
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401 - imports torchvision, which may not load
    except Exception:  # noqa: BLE001
        return False
    return True


if __name__ == "__main__":
    main()
