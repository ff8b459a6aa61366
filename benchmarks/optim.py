"""The cost of a step of curvop's second-order optimizers (issue 23 item 4), interleaved.

Per model (the digits CNN of the demo at batch 64, a CIFAR-shaped CNN with BatchNorm in training
mode at batch 32 from ``benchmarks/_torch_models.py``, and the small character transformer of
``curvop study optimizers`` at batch 16; float32, one thread), the time per step of:

* ``official``: the official AdaHessian step written out (``loss.backward(create_graph=True)``,
  ``torch.autograd.grad`` of the gradients against Rademacher probes, the update; the probes and
  the spatial averaging as in the official repository's code);
* ``curvop.optim.AdaHessian`` with the official call pattern, and with ``step(closure)``;
* ``torch.optim.AdamW``, and ``curvop.optim.SophiaH`` / ``SophiaG`` with ``every=10``.

Each round runs every contender for 10 steps (so a Sophia round holds exactly one curvature step:
its amortised cost), the order rotated from round to round; the table gives the median over rounds
of each contender's time divided by its reference's in the same round, with the quartiles of
those per-round ratios, and the load average of the machine.

    PYTHONPATH=. python benchmarks/optim.py            # ~4 minutes on 2 cores
    PYTHONPATH=. python benchmarks/optim.py --rounds 5 # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import curvop.optim as co
from curvop.studies import char_text, digits
from curvop.studies.optimizers import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _torch_models, when run from the repository root


def official_adahessian(model, params, loss_fn, lr=1e-3, betas=(0.9, 0.999), eps=1e-4):
    """The official AdaHessian step (amirgholami/adahessian), written out: the baseline."""
    state = {"t": 0, "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}

    def step(x, y):
        for p in params:
            p.grad = None
        loss_fn(model(x), y).backward(create_graph=True)
        grads = [p.grad for p in params]
        zs = [2 * torch.randint_like(p, high=2) - 1 for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=zs, only_inputs=True, retain_graph=True)
        state["t"] += 1
        t = state["t"]
        with torch.no_grad():
            for p, g, hv, z, m, v in zip(params, grads, hvs, zs, state["m"], state["v"]):
                d = hv * z
                if p.dim() == 4:
                    d = d.mean(dim=[2, 3], keepdim=True)
                m.mul_(betas[0]).add_(g.detach(), alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(d, d, value=1 - betas[1])
                denom = (v.sqrt() / math.sqrt(1 - betas[1] ** t)).add_(eps)
                p.sub_(lr * m / (1 - betas[0] ** t) / denom)
        for p in params:
            p.grad = None

    return step


def contenders(model, loss_fn, flat):
    params = list(model.parameters())

    def loss(x, y):
        return loss_fn(*flat(model(x), y))

    ada_closure = co.AdaHessian(params, lr=1e-3)
    ada_graph = co.AdaHessian(params, lr=1e-3)
    adamw = torch.optim.AdamW(params, lr=1e-4)
    sophia_h = co.SophiaH(params, lr=1e-4, every=10)
    sophia_g = co.SophiaG(params, lr=1e-4, every=10, loss_fn=loss_fn)

    def graph_step(x, y):
        ada_graph.zero_grad()
        loss(x, y).backward(create_graph=True)
        ada_graph.step()

    def adamw_step(x, y):
        adamw.zero_grad()
        loss(x, y).backward()
        adamw.step()

    return {
        "official": official_adahessian(model, params, lambda out, y: loss_fn(*flat(out, y))),
        "AdaHessian, official pattern": graph_step,
        "AdaHessian, step(closure)": lambda x, y: ada_closure.step(lambda: loss(x, y)),
        "AdamW": adamw_step,
        "Sophia-H, every=10": lambda x, y: sophia_h.step(lambda: loss(x, y)),
        "Sophia-G, every=10": lambda x, y: sophia_g.step(lambda: flat(model(x), y)),
    }


REFERENCE = {"AdaHessian, official pattern": "official", "AdaHessian, step(closure)": "official",
             "Sophia-H, every=10": "AdamW", "Sophia-G, every=10": "AdamW"}


def measure(name, model, batch, loss_fn, flat, rounds, steps=10):
    fns = contenders(model, loss_fn, flat)
    x, y = batch
    for f in fns.values():  # warm-up
        for _ in range(3):
            f(x, y)
    times = interleaved({k: (lambda f: lambda: f(x, y))(f) for k, f in fns.items()}, rounds, steps)
    rows = []
    for k, t in times.items():
        ref = REFERENCE.get(k)
        r = np.array(t) / np.array(times[ref]) if ref else None
        ratio = None if r is None else tuple(float(q) for q in np.quantile(r, (0.5, 0.25, 0.75)))
        rows.append((name, k, 1e3 * float(np.median(t)), ref, ratio))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ce = torch.nn.CrossEntropyLoss()
    data = digits.load(0)
    torch.manual_seed(0)
    cnn = digits.cnn(8)
    rows = measure("digits CNN (1.9k parameters, batch 64)", cnn, (data.x_train[:64], data.y_train[:64]), ce,
                   lambda out, y: (out, y), args.rounds)
    from _torch_models import small_cnn

    torch.manual_seed(0)
    bn = small_cnn(16).train()
    g = torch.Generator().manual_seed(0)
    rows += measure("CIFAR-shaped CNN with BatchNorm (28k parameters, batch 32)", bn,
                    (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)), ce,
                    lambda out, y: (out, y), args.rounds)
    ids = char_text.encode(char_text.corpus())
    torch.manual_seed(0)
    tr = char_text.transformer()
    batch = next(char_text.batches(ids, context=32, batch_size=16, seed=0))
    rows += measure(f"char transformer ({sum(p.numel() for p in tr.parameters()) / 1e3:.1f}k parameters, "
                    "batch 16 x 32)", tr, batch, ce,
                    lambda out, y: (out.reshape(-1, out.shape[-1]), y.reshape(-1)), args.rounds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds of 10 steps, "
          f"load average {load} (1, 5, 15 min)\n")
    print("| model | step | ms per step (median) | x reference (median of per-round ratios, quartiles) |")
    print("| --- | --- | ---: | ---: |")
    for model, k, ms, ref, ratio in rows:
        cell = "" if ratio is None else f"{ratio[0]:.2f} x {ref} ({ratio[1]:.2f}-{ratio[2]:.2f})"
        print(f"| {model} | {k} | {ms:.1f} | {cell} |")


if __name__ == "__main__":
    main()
