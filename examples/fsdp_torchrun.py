"""Top eigenvalues, trace and spectral density of the Hessian of an FSDP2 (``fully_shard``) model.

Run on 2 CPU processes (gloo) or on GPUs (NCCL: one process per GPU):

    torchrun --nproc_per_node=2 examples/fsdp_torchrun.py
    torchrun --nproc_per_node=8 examples/fsdp_torchrun.py --backend nccl --dtype float32

Every rank holds its shards of the parameters and its own share of the data. Each Hessian-vector
product is a central difference of two gradients through FSDP's normal forward and backward
(curvop.backends.torch.fsdp); vectors stay sharded like the parameters, and the algorithms' reductions
are all-reduced, so every rank computes the same results. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import curvop
from curvop.backends.torch.distributed import is_main_process


def build(kind: str, dtype: torch.dtype, rank: int, world: int, shard: bool = True):
    """The model (sharded over ``world`` ranks, or not) and the data (this rank's share, or all)."""
    torch.manual_seed(0)  # the same initial model everywhere; fully_shard keeps each rank's shards
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    model = model.to(device=kind, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 10, generator=g), torch.randint(0, 3, (1000,), generator=g)
    batches = [(x[i:i + 100].to(kind, dtype), y[i:i + 100].to(kind)) for i in range(0, 1000, 100)]
    if not shard:
        return model.eval(), batches
    mesh = init_device_mesh(kind, (world,))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)  # one FSDP unit per layer, as in training
    fully_shard(model, mesh=mesh)
    model.eval()  # required: the gradient must be a fixed function of the parameters
    return model, batches[rank::world]  # this rank's share of the data (a DistributedSampler's)


def measure(args: argparse.Namespace) -> None:
    """Relative error of products and of the top eigenvalue against the unsharded twin's exact ones."""
    import numpy as np

    from curvop.backends.torch.fsdp import default_step

    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for dtype in (torch.float64, torch.float32):
        twin, batches = build("cpu", dtype, rank, world, shard=False)
        T = curvop.hessian(twin, nn.CrossEntropyLoss(), batches, process_group=False)
        V = np.random.default_rng(0).standard_normal((T.shape[0], 4)).astype(T.dtype)
        TV = T @ V
        top = curvop.eigenvalues(T, 1, tol=1e-8 if dtype == torch.float64 else 1e-5, seed=0).eigenvalues[0]
        for factor in (0.1, 1.0, 10.0):
            model, shard = build("cpu", dtype, rank, world)
            step = factor * default_step(dtype)
            H = curvop.hessian(model, nn.CrossEntropyLoss(), shard, step=step, timeout=args.timeout)
            err = np.linalg.norm(H @ V - TV, axis=0) / np.linalg.norm(TV, axis=0)
            lam = curvop.eigenvalues(H, 1, tol=1e-8 if dtype == torch.float64 else 1e-5, seed=0).eigenvalues[0]
            rows.append(f"| {str(dtype)[6:]} | {factor:g} x eps^(1/3) = {step:.1e} | {err.max():.1e} "
                        f"| {abs(lam - top) / abs(top):.1e} |")
    if is_main_process():
        print(f"n = {T.shape[0]}, {world} ranks")
        print("| dtype | step | product rel. error (max of 4) | top eigenvalue rel. error |")
        print("|---|---|---|---|")
        print("\n".join(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a lost rank is an error")
    ap.add_argument("--measure", action="store_true",
                    help="print the finite-difference accuracy table of docs/scale.md instead (vs the unsharded twin)")
    args = ap.parse_args()
    if args.measure:
        return measure(args)

    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    kind = "cuda" if args.backend == "nccl" else "cpu"
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dtype = getattr(torch, args.dtype)

    model, batches = build(kind, dtype, rank, world)  # this rank's shards and share of the data
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, timeout=args.timeout)  # every rank
    eig = curvop.eigenvalues(H, 3, tol=1e-4, seed=0, progress=True)
    tr = curvop.trace(H, num_matvecs=30, seed=0, progress=True)
    dens = curvop.spectral_density(H, num_steps=30, num_probes=2, seed=0, progress=True)
    if is_main_process():
        print(H)
        print("top-3 eigenvalues:", eig.eigenvalues)
        print(f"trace: {tr.estimate:.6g} +- {tr.stderr:.2g}")
        print("density nodes (probe 0):", dens.nodes[0][:5], "...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
