"""Audit of torch's second derivatives: the ops of ``torch.nn`` layers and losses (issue 26).

Run from the repository root::

    PYTHONPATH=. python benchmarks/op_audit.py                 # the table (3 CPU-minutes, 2 workers)
    PYTHONPATH=. python benchmarks/op_audit.py --ops nn.functional.mse_loss,weight_norm

For every op, float64 samples from torch's OpInfo database (``torch.testing``), plus samples
written here for what OpInfo lacks (``torch._weight_norm``, an embedding with ``padding_idx``,
the recurrent layers), are differentiated as the scalar ``phi = sum(out * c)`` (``c`` fixed
random), twice over: every floating tensor of the sample differentiable, and only the first (a
loss's targets, a layer's data are constants). Per op, the worst sample decides:

* **double backward**: ``torch.autograd.gradgradcheck`` (``fast_mode``);
* **forward-over-reverse**: ``jvp(grad(phi))`` against central differences of ``grad(phi)``;
* **linearize, reused**: ``torch.func.linearize(grad(phi))`` applied three times, the same check
  (the cached forward mode of torch 2.13; an in-place op on a folded constant degrades it);
* **curvop reverse / curvop forward (cached)**: what curvop computes, through its op rewrites
  (``Rewrites``; reverse-over-reverse, and its own ``linearize`` used three times).

The central differences use ``h = 1e-6``; a sample where they disagree with those at ``h = 1e-5``
by more than the tolerance (a kink, or ``eps`` dominating: ``layer_norm`` over one element,
``normalize`` over a dim of size 1, a norm at zero) is ``unstable`` and tells nothing: an op is
shown ``unstable`` only when no sample of it could be checked.

Each result is ``ok``, ``wrong`` (with the largest relative error), ``missing`` (torch raises:
no derivative), ``error`` (another exception) or ``crash`` (the process died: SIGSEGV). The
checks run in worker processes, so a crash ends a worker, not the audit. Random ops (dropout,
``rrelu`` in training) and ops without floating outputs are left out. Prints a markdown table (and
writes it with ``--out``) for ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("double backward", "forward-over-reverse", "linearize, reused", "curvop reverse", "curvop forward (cached)")
KEYS = ("gradgrad", "fwd", "lin", "curvop_rev", "curvop_fwd")
RTOL = 1e-5  # central differences in float64 at h = 1e-6 agree to about 1e-9
SKIP = ("dropout", "rrelu", "fractional_max_pool", "one_hot", "multi_head_attention_forward", "ctc_loss",
        "max_unpool", "linear_cross_entropy")  # random, no float output, or not a single differentiable op
#: besides every ``nn.functional`` op: the ops layers call directly
CORE = ("tanh", "sigmoid", "exp", "log", "softmax", "log_softmax", "nn.functional.softmin", "mean", "sum", "var",
        "rsqrt", "sqrt", "pow", "matmul", "bmm", "baddbmm", "addmm", "erf", "where", "clamp", "abs", "cumsum",
        "norm", "linalg.vector_norm", "native_layer_norm", "native_batch_norm", "native_group_norm", "logsumexp",
        "amax", "max", "sin", "cos", "atan2", "lerp", "einsum")


def _stub_expecttest() -> None:
    """``torch.testing._internal`` imports ``expecttest`` (a test-only package) for its TestCase."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        mod = types.ModuleType("expecttest")
        mod.TestCase, mod.ACCEPT = unittest.TestCase, False
        sys.modules["expecttest"] = mod


# --- samples ------------------------------------------------------------------------------------------
class Sample:
    """``fn(*tensors)``: an op on its sample's tensors, the differentiable ones given as arguments."""

    def __init__(self, name: str, fn, tensors: list, label: str, reference=None):
        self.name, self.fn, self.tensors, self.label = name, fn, tensors, label
        self.reference = fn if reference is None else reference  # the function whose gradient is differenced


def _is_loss(name: str) -> bool:
    return "loss" in name or name in ("nn.functional.cross_entropy", "nn.functional.nll_loss", "nn.functional.kl_div")


def _opinfo_samples(op, limit: int) -> list[Sample]:
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    out = []
    try:
        samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=True))[:limit]
    except Exception:  # noqa: BLE001 - an OpInfo without float64 samples
        return out
    for k, s in enumerate(samples):
        leaves, spec = tree_flatten((s.input, s.args, s.kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()
                 and x.requires_grad]
        if not where:
            continue
        variants = [("all", where), ("first", where[:1])]
        if _is_loss(op.name):  # targets are data (and often labels, no direction to difference along)
            variants = variants[1:]
        elif len(where) == 1:
            variants = variants[:1]
        for variant, chosen in variants:

            def fn(*ts, leaves=leaves, spec=spec, chosen=chosen, s=s):
                full = list(leaves)
                for i, t in zip(chosen, ts):
                    full[i] = t
                full = [x.detach() if isinstance(x, torch.Tensor) and i not in chosen else x
                        for i, x in enumerate(full)]
                inp, args, kwargs = tree_unflatten(full, spec)
                return s.output_process_fn_grad(op.op(inp, *args, **kwargs))

            out.append(Sample(op.name, fn, [leaves[i].detach().clone() for i in chosen], f"{k}/{variant}"))
    return out


def _own_samples() -> dict[str, list[Sample]]:
    """What OpInfo lacks: weight norm (dims 0, last, -1), embeddings with padding_idx, RNN layers."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    out: dict[str, list[Sample]] = {"weight_norm": [], "embedding(padding_idx)": []}
    for dim in (0, 1, -1):
        out["weight_norm"].append(Sample("weight_norm", lambda v, w, x, dim=dim: F.linear(x, torch._weight_norm(v, w, dim)),
                                         [r(4, 3), r(4, 1) if dim == 0 else r(1, 3) if dim == 1 else r(()), r(5, 3)],
                                         f"dim={dim}"))
    idx = torch.tensor([[0, 2, 1], [3, 0, 0]])
    for pad in (0, 2):  # the padding row gets no gradient: the reference is the loss with it a constant
        fixed, w0 = (torch.arange(4) == pad).unsqueeze(1), r(4, 3)
        out["embedding(padding_idx)"].append(Sample(
            "embedding(padding_idx)", lambda w, pad=pad: torch.tanh(F.embedding(idx, w, padding_idx=pad).sum(1)),
            [w0], f"padding_idx={pad}",
            reference=lambda w, fixed=fixed, w0=w0: torch.tanh(F.embedding(idx, torch.where(fixed, w0, w)).sum(1))))
    for cls in ("LSTM", "GRU", "RNN"):
        layer = getattr(torch.nn, cls)(3, 4, batch_first=True).double()
        names = [k for k, _ in layer.named_parameters()]
        x = r(2, 5, 3)

        def fn(*ps, layer=layer, names=names, x=x):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))[0][:, -1]

        out[f"nn.{cls}"] = [Sample(f"nn.{cls}", fn, [p.detach().clone() for p in layer.parameters()], "1 layer")]
    return out


def select(names: list[str] | None, limit: int) -> dict[str, list[Sample]]:
    _stub_expecttest()
    from torch.testing._internal.common_methods_invocations import op_db

    own = _own_samples()
    chosen: dict[str, list[Sample]] = {}
    for op in op_db:
        wanted = op.name.startswith("nn.functional.") or op.name in CORE
        if not wanted or op.variant_test_name or any(s in op.name for s in SKIP):
            continue
        if names is not None and op.name not in names:
            continue
        chosen.setdefault(op.name, []).extend(_opinfo_samples(op, limit))
    for name, samples in own.items():
        if names is None or name in names:
            chosen[name] = samples
    return {k: v for k, v in chosen.items() if v}


# --- the checks (in a worker) -------------------------------------------------------------------------
def _phi(sample: Sample, cot: list):
    import torch
    from torch.utils._pytree import tree_flatten

    def phi(*ts):
        outs = [o for o in tree_flatten(sample.fn(*ts))[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]
        return sum((o * c).sum() for o, c in zip(outs, cot))

    return phi


def _cotangents(sample: Sample) -> list:
    import torch
    from torch.utils._pytree import tree_flatten

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outs = [o for o in tree_flatten(sample.fn(*sample.tensors))[0]
                if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]


def _grad(phi, xs: list) -> list:
    import torch

    xs = [x.detach().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        gs = torch.autograd.grad(phi(*xs), xs, allow_unused=True)
    return [torch.zeros_like(x) if gi is None else gi for gi, x in zip(gs, xs)]


def _reference(phi, xs: list, vs: list, h: float = 1e-6) -> list:
    plus = _grad(phi, [x + h * v for x, v in zip(xs, vs)])
    minus = _grad(phi, [x - h * v for x, v in zip(xs, vs)])
    return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


def _error(got: list, ref: list) -> float:
    import torch

    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, ref)))
    den = torch.sqrt(sum((b ** 2).sum() for b in ref))
    return float(num / (den + 1e-7))


def _classify(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, NotImplementedError) or "not implemented" in text or "does not support" in text \
            or "derivative for" in text:
        return "missing"
    return "error"


def run_check(key: str, sample: Sample) -> tuple[str, float]:
    import torch
    from torch.func import grad, jvp

    from curvop.backends.torch.linearize import linearize as curvop_linearize
    from curvop.backends.torch.rewrites import Rewrites

    xs = [t.detach().clone() for t in sample.tensors]
    g = torch.Generator().manual_seed(2)
    vs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in xs]
    cot = _cotangents(sample)
    phi = _phi(sample, cot)
    if key == "gradgrad":
        ok = torch.autograd.gradgradcheck(phi, [x.requires_grad_(True) for x in xs], fast_mode=True,
                                          raise_exception=False, check_undefined_grad=False)
        return ("ok" if ok else "wrong"), float("nan")
    ref_phi = _phi(Sample(sample.name, sample.reference, xs, ""), cot)
    ref, ref10 = _reference(ref_phi, xs, vs), _reference(ref_phi, xs, vs, h=1e-5)
    flat = lambda *t: phi(*t)  # noqa: E731
    grad_fn = grad(lambda xs_: flat(*xs_))
    if key == "fwd":
        got = list(jvp(grad_fn, (xs,), (vs,))[1])
        errs = [_error(got, ref)]
    elif key == "lin":
        _, lin = torch.func.linearize(grad_fn, xs)
        errs = [_error(list(lin(vs)), ref) for _ in range(3)]
    elif key == "curvop_rev":
        p = [x.detach().requires_grad_(True) for x in xs]
        with torch.enable_grad():
            with Rewrites(conv="auto", fast=True, gelu=True):
                gs = torch.autograd.grad(flat(*p), p, create_graph=True, allow_unused=True)
            live = [(gi, v) for gi, v in zip(gs, vs) if gi is not None and gi.requires_grad]
            if not live:
                return "ok", 0.0
            hv = torch.autograd.grad([gi for gi, _ in live], p, grad_outputs=[v for _, v in live], allow_unused=True)
        errs = [_error([torch.zeros_like(x) if h is None else h for h, x in zip(hv, xs)], ref)]
    else:  # curvop_fwd
        def rewritten(xs_):
            with Rewrites(conv=False, fast=False, gelu=False, forward=True):
                return grad(lambda q: flat(*q))(xs_)

        lin = curvop_linearize(rewritten, xs)
        errs = [_error(list(lin(vs)), ref) for _ in range(3)]
    worst = max(errs)
    if worst <= RTOL:
        return "ok", worst
    if _error(ref10, ref) > RTOL:  # the differences themselves depend on the step: a kink or eps-dominated sample
        return "unstable", worst
    return "wrong", worst


def worker(tasks: list[tuple[str, int, str]], limit: int) -> None:
    """Runs ``(op, sample index, check)`` tasks, one JSON line before and after each."""
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    samples = select(sorted({t[0] for t in tasks}), limit)
    for name, i, key in tasks:
        print(json.dumps({"start": [name, i, key]}), flush=True)
        try:
            status, err = run_check(key, samples[name][i])
        except Exception as e:  # noqa: BLE001 - every failure is a result of the audit
            status, err = _classify(e), float("nan")
        print(json.dumps({"done": [name, i, key], "status": status, "err": err}), flush=True)


# --- the driver ---------------------------------------------------------------------------------------
def audit(names: list[str] | None, limit: int, workers: int, timeout: float) -> dict[str, dict[str, list]]:
    """``{op: {check: [(status, err, sample label), ...]}}`` over every sample."""
    samples = select(names, limit)
    tasks = [(name, i, key) for name, ss in samples.items() for i in range(len(ss)) for key in KEYS]
    results: dict[str, dict[str, list]] = {n: {k: [] for k in KEYS} for n in samples}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    deadline = time.monotonic() + timeout

    def slot(todo: list) -> None:
        """Runs ``todo`` in a worker process; after a crash, the rest in a new one."""
        while todo and time.monotonic() < deadline:
            p = subprocess.Popen([sys.executable, __file__, "--worker", "--samples", str(limit)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            p.stdin.write(json.dumps(todo))
            p.stdin.close()
            finished, current = set(), None
            for line in p.stdout:
                msg = json.loads(line)
                if "start" in msg:
                    current = tuple(msg["start"])
                    continue
                name, i, key = msg["done"]
                results[name][key].append((msg["status"], msg["err"], samples[name][i].label))
                finished.add((name, i, key))
                current = None
            rc = p.wait()
            if current is not None:  # the process died inside this check
                name, i, key = current
                results[name][key].append(("crash" if rc < 0 else "error", float("nan"), samples[name][i].label))
                finished.add(current)
            elif rc != 0:  # died outside any check (at start-up): nothing more to learn from retrying
                raise RuntimeError(f"an audit worker exited with {rc} before its first check; see {log.name}")
            todo = [t for t in todo if tuple(t) not in finished]

    log = tempfile.NamedTemporaryFile("w", prefix="op_audit_", suffix=".log", delete=False)  # the workers' stderr
    threads = [threading.Thread(target=slot, args=(tasks[w::workers],)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


_ORDER = {"crash": 5, "wrong": 4, "error": 3, "missing": 2, "ok": 1, "unstable": 0}


def summarize(entries: list) -> str:
    if not entries:
        return "n/a"
    worst = max(entries, key=lambda e: (_ORDER[e[0]], e[1] if e[1] == e[1] else 0))
    status, err, label = worst
    if status == "wrong" and err == err:
        return f"**wrong** {err:.0e} ({label})"
    if status in ("crash", "wrong"):
        return f"**{status}** ({label})"
    return status if status == "ok" else f"{status} ({label})"


def table(results: dict[str, dict[str, list]]) -> str:
    lines = ["| op | samples | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in sorted(results):
        cols = [summarize(results[name][k]) for k in KEYS]
        n = len({e[2] for k in KEYS for e in results[name][k]})
        lines.append(f"| `{name}` | {n} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", help="comma-separated op names (default: every op of the audit)")
    ap.add_argument("--samples", type=int, default=3, help="OpInfo samples per op (default 3)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds before crashed workers are not restarted")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # tasks as JSON on stdin
    a = ap.parse_args()
    if a.worker:
        worker([tuple(t) for t in json.loads(sys.stdin.read())], a.samples)
        return
    import torch

    t0 = time.time()
    results = audit(a.ops.split(",") if a.ops else None, a.samples, a.workers, a.timeout)
    text = table(results)
    print(text)
    print(f"\n{len(results)} ops, torch {torch.__version__}, {time.time() - t0:.0f} s", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
