"""Cost of one Hessian-vector product on real architectures, every torch mode, as a multiple of a gradient.

    python benchmarks/models.py             # every model, float64/float32, batch 4/32 (long)
    python benchmarks/models.py --quick     # one small configuration per family; seconds
    python benchmarks/models.py --layers    # one convolution's cached product, curvop's conv vs torch's

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
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import warnings

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
import _torchvision_cpu  # noqa: E402

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
        return model, nn.CrossEntropyLoss(), (ids, torch.randint(0, 64, (batch * 16,), generator=g))
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
    return model, nn.CrossEntropyLoss(), (torch.randn(shape, dtype=dtype, generator=g),
                                          torch.randint(0, 10, (batch,), generator=g))


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
    return time.perf_counter() - t


def build(model, loss_fn, data, options: dict):
    import curvop
    from curvop.backends import _torch_ops

    options = dict(options)
    convs = options.pop("convs", None)
    real = _torch_ops.conv_wins
    _torch_ops.conv_wins = {"all": lambda *a: True, "none": lambda *a: False}.get(convs, real)
    try:
        return curvop.hessian(model, loss_fn, data, check_deterministic=False, **options)
    finally:
        _torch_ops.conv_wins = real


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
        for label, options in MODES.items():
            setup[label] = _timed(lambda: ops.__setitem__(label, build(model, loss_fn, (x, y), options)))
    v = torch.randn(ops["rev"].shape[0], dtype=dtype, generator=torch.Generator().manual_seed(2))
    gradient()
    for H in ops.values():  # warm-up
        H.backend.hvp(v)
    times: dict[str, list[float]] = {"grad": [], **{k: [] for k in ops}}
    for _ in range(repeats):  # interleaved rounds
        times["grad"].append(_timed(gradient))
        for label, H in ops.items():
            times[label].append(_timed(lambda: H.backend.hvp(v)))
    g = statistics.median(times["grad"])
    return {"model": name, "dtype": dtype_name, "batch": batch, "params": sum(p.numel() for p in params),
            "grad_ms": round(1e3 * g, 2), "repeats": repeats,
            "hvp": {k: round(statistics.median(t) / g, 3) for k, t in times.items() if k != "grad"},
            "setup": {k: round(t / g, 1) for k, t in setup.items()}}


def table(rows: list[dict]) -> str:
    labels = list(MODES)
    head = "| model | dtype | batch | grad ms | " + " | ".join(labels) + " | default / best |"
    lines = [head, "|" + "---|" * (len(labels) + 5)]
    for r in rows:
        best = min(r["hvp"].values())
        cells = [f"**{r['hvp'][k]:.2f}**" if r["hvp"][k] == best else f"{r['hvp'][k]:.2f}" for k in labels]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['grad_ms']:.0f} | " + " | ".join(cells)
                     + f" | {r['hvp']['rev cached'] / best:.2f} |")
    return "\n".join(lines)


def layers(repeats: int = 5) -> list[dict]:
    """One convolution's cached reverse product (input and weight both differentiated), torch's
    conv2d vs curvop's, for the layer shapes of the models above."""
    import torch
    import torch.nn.functional as F

    from curvop.backends._torch_ops import conv2d

    shapes = [  # batch, c_in, c_out, kernel, size, groups
        (4, 64, 64, 3, 8, 1), (32, 64, 64, 3, 8, 1), (4, 512, 512, 3, 1, 1), (4, 16, 16, 3, 32, 1),
        (32, 16, 16, 3, 32, 1), (4, 96, 576, 1, 1, 1), (32, 40, 160, 1, 8, 1), (4, 72, 72, 3, 8, 72),
        (32, 72, 72, 3, 8, 72), (4, 40, 40, 7, 8, 40)]
    rows = []
    for dtype in (torch.float64, torch.float32):
        for b, ci, co, k, s, groups in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, ci, s, s, dtype=dtype, generator=g, requires_grad=True)
            w = torch.randn(co, ci // groups, k, k, dtype=dtype, generator=g, requires_grad=True)
            t = {}
            for name, conv in (("torch", F.conv2d), ("curvop", conv2d)):
                gr = torch.autograd.grad(torch.tanh(conv(x, w, None, 1, k // 2, 1, groups)).sum(), (x, w),
                                         create_graph=True)
                vs = [torch.randn_like(gr[0]), torch.randn_like(gr[1])]
                t[name] = statistics.median(_timed(lambda: torch.autograd.grad(gr, (x, w), vs, retain_graph=True))
                                            for _ in range(repeats))
            ratio = b * co * s * s / w.numel()
            rows.append({"dtype": str(dtype)[6:], "shape": [b, ci, co, k, s, groups], "out/weight": round(ratio, 2),
                         "curvop/torch": round(t["curvop"] / t["torch"], 2)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny ViT and MobileNetV3, batch 2, one repeat")
    ap.add_argument("--layers", action="store_true", help="the per-layer convolution table")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--dtypes", nargs="*", default=["float64", "float32"])
    ap.add_argument("--batches", nargs="*", type=int, default=[4, 32])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "models.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.layers:
        return layers()
    if args.quick:
        configs = [("tiny_vit", "float64", 2), ("mobilenet_v3_small", "float32", 2)]
    else:
        names = args.models or CNNS + ["tiny_vit", "encoder"] + (["gpt2"] if _has_transformers() else [])
        configs = [(n, d, b) for d, b in (("float64", 4), ("float32", 32), ("float32", 4), ("float64", 32))
                   for n in names if d in args.dtypes and b in args.batches]
    repeats = args.repeats or (1 if args.quick else 5)
    rows = []
    for name, dtype, batch in configs:
        rows.append(measure(name, dtype, batch, repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.quick:
            pathlib.Path(args.out).write_text(json.dumps({"torch_threads": 1, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return rows


def _has_transformers() -> bool:
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401 - imports torchvision, which may not load
    except Exception:  # noqa: BLE001
        return False
    return True


if __name__ == "__main__":
    main()
