"""The curvature family on a GPU (issue 22): GGN, Fisher and solve rows against curvlinops, on CUDA.

The rows of ``benchmarks/peers_family.py`` (one product per contender, agreement of the two
libraries, ``solve`` against curvlinops' CG at equal residual) on the peers CNN, with the model and
batch on ``--device``; every timed call ends with ``torch.cuda.synchronize()``, and the memory
column is the peak of ``torch.cuda.max_memory_allocated`` over setup + two products above what the
problem holds. Prints a Markdown table for ``docs/performance.md`` (name the card with it) and
writes JSON.

    PYTHONPATH=. python benchmarks/gpu_family.py                       # CUDA, the peers CNN
    PYTHONPATH=. python benchmarks/gpu_family.py --device cpu --quick  # a rehearsal without a GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import peers, peers_family  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal)")
    ap.add_argument("--quick", action="store_true", help="the tiny configuration of benchmarks/peers.py")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_family.json")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: pass --device cpu to rehearse", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = dict(peers.CONFIGS["quick" if a.quick else "full"])

    def problem(kind, cfg):
        model, crit, (x, y) = peers.problem(kind, cfg)
        return model.to(device), crit, (x.to(device), y.to(device))

    def interleaved(fns, repeats, seed=0):
        synced = {k: (lambda f=f: (f(), sync())) for k, f in fns.items()}
        return peers.interleaved(synced, repeats, seed=seed)

    log = lambda s: print(s, flush=True)  # noqa: E731
    card = torch.cuda.get_device_name(device) if cuda else "CPU (rehearsal)"
    log(f"device: {card}; torch {torch.__version__}")
    t0 = time.perf_counter()
    fam = peers_family.bench_family(cfg, log, problem, interleaved, peers.med)
    memory = _cuda_memory(cfg, problem, log) if cuda else None
    res = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=card, config=cfg, family=fam,
               memory=memory, seconds=time.perf_counter() - t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    print("\n".join([f"On {card} (`benchmarks/gpu_family.py{' --quick' if a.quick else ''}`, {res['date']}):",
                     *peers_family.markdown(fam, memory, memory_note=(
                         "Memory: peak `torch.cuda.max_memory_allocated` of setup + two products above what the "
                         "problem holds." if cuda else "Memory: not measured off the GPU."))]))
    log(f"wrote {a.out} ({res['seconds']:.0f} s)")
    return 0


def _cuda_memory(cfg, problem, log) -> dict:
    """Peak CUDA memory of setup + two products per contender, above what the problem holds."""
    out = {}
    for name in ("gradient", *peers_family.CONTENDERS):
        model, crit, batch = problem("cnn", cfg)
        v = torch.randn(sum(p.numel() for p in model.parameters()), device=batch[0].device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn = peers.build(name, model, crit, batch, v)
        fn()
        fn()
        torch.cuda.synchronize()
        out[name] = dict(delta_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)
        log(f"  cuda memory {name:32s} {out[name]['delta_mb']:.1f} MB")
        del fn, model, batch, v
    return out


if __name__ == "__main__":
    sys.exit(main())
