"""Top eigenvalues, trace and spectral density of a model's Hessian, data-parallel over ranks.

Run on 2 CPU processes (gloo) or on GPUs (NCCL: one process per GPU):

    torchrun --nproc_per_node=2 examples/distributed_torchrun.py
    torchrun --nproc_per_node=4 examples/distributed_torchrun.py --backend nccl

Every rank holds the same model and its own shard of the data; curvop all-reduces each
Hessian-vector product (weighted by sample counts), so every rank computes the same results.
Only rank 0 prints and shows progress bars.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import curvop
from curvop.backends.torch.distributed import is_main_process


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a lost rank is an error")
    args = ap.parse_args()

    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")

    torch.manual_seed(0)  # the same model (the same point) on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).double().to(device).eval()
    model = nn.parallel.DistributedDataParallel(model)  # optional: curvop unwraps .module

    g = torch.Generator().manual_seed(1)  # the full data set, identical everywhere ...
    x, y = torch.randn(1000, 10, dtype=torch.float64, generator=g), torch.randint(0, 3, (1000,), generator=g)
    shard = range(rank, len(x), world)  # ... and this rank's shard (DistributedSampler does the same)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100,
                                         sampler=torch.utils.data.Subset(range(len(x)), list(shard)))
    batches = [(xb.to(device), yb.to(device)) for xb, yb in loader]

    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches, timeout=args.timeout)
    eig = curvop.eigenvalues(H, 3, seed=0, progress=True)
    tr = curvop.trace(H, num_matvecs=60, seed=0, progress=True)
    dens = curvop.spectral_density(H, num_steps=40, num_probes=2, seed=0, progress=True)
    if is_main_process():
        print(H)
        print("top-3 eigenvalues:", eig.eigenvalues)
        print(f"trace: {tr.estimate:.6g} +- {tr.stderr:.2g}")
        print("density nodes (probe 0):", dens.nodes[0][:5], "...")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
