"""One rank of the data-parallel tests (started by tests/backends/torch/test_torch_distributed.py, torchrun-like env).

usage: python _dist_worker.py SCENARIO OUT_PREFIX ; writes OUT_PREFIX.<rank>.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import curvop
from curvop.backends.torch.distributed import DistributedError
from curvop.backends.faults import NonFiniteProductError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests/
from torch_reference import dense_hessian  # noqa: E402


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    sizes = [8, 8, 8, 8, 8, 5]  # uneven: the shards hold 24 and 21 samples
    batches = [(torch.randn(s, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (s,), generator=g))
               for s in sizes]
    return model, batches


def agree(rank, world, out):
    model, batches = model_and_data()
    shard = batches[rank * 3:(rank + 1) * 3]
    loss = nn.CrossEntropyLoss()
    full = curvop.hessian(model, loss, batches, process_group=False)
    D = dense_hessian(model, loss, batches)  # the independent reference: all the data in one loss
    n = full.shape[0]
    rng = np.random.default_rng(5)
    v, V = rng.standard_normal(n), rng.standard_normal((n, 3))
    ref_v, ref_V = D @ v, D @ V
    diffs = {}
    for name, kw in {"uncached": {}, "cached": {"cache": True}, "reverse": {"hvp": "reverse"}}.items():
        H = curvop.hessian(model, loss, shard, timeout=30, **kw)
        diffs[name] = max(float(np.abs(H @ v - ref_v).max()), float(np.abs(H @ V - ref_V).max()))
    ddp = nn.parallel.DistributedDataParallel(model)
    H = curvop.hessian(ddp, loss, shard, timeout=30)
    diffs["ddp"] = float(np.abs(H @ v - ref_v).max())
    D_sum = dense_hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    H_sum = curvop.hessian(model, nn.CrossEntropyLoss(reduction="sum"), shard, timeout=30)
    diffs["sum"] = float(np.abs(H_sum @ v - D_sum @ v).max())

    H = curvop.hessian(model, loss, shard, timeout=30)
    res = {"diffs": diffs, "n": n, "exact_eig": np.linalg.eigvalsh(D)[::-1][:3].tolist()}
    for tag, op in (("dist", H), ("single", full)):
        e = curvop.eigenvalues(op, 3, seed=0, progress=(tag == "dist"))
        t = curvop.trace(op, method="hutch++", num_matvecs=24, seed=0)
        d = curvop.spectral_density(op, num_steps=12, num_probes=2, seed=0)
        res[tag] = {"eig": e.eigenvalues.tolist(), "trace": t.estimate,
                    "nodes": np.concatenate(d.nodes).tolist(), "weights": np.concatenate(d.weights).tolist()}

    # a NaN in rank 1's second local batch: every rank raises, naming rank 1 / batch 1
    bad = [(x.clone(), y) for x, y in shard]
    if rank == 1:
        bad[1][0][2, 0] = float("nan")
    try:
        curvop.hessian(model, loss, bad, timeout=30)
        res["nan"] = None
    except NonFiniteProductError as err:
        res["nan"] = {"rank": err.rank, "batch": err.batch, "msg": str(err)}
    return res


def family(rank, world, out):
    """Issue 22: the GGN and the empirical Fisher over the ranks' shards equal the whole data's."""
    model, batches = model_and_data()
    shard = batches[rank * 3:(rank + 1) * 3]
    loss = nn.CrossEntropyLoss()
    v = np.random.default_rng(5).standard_normal((sum(p.numel() for p in model.parameters()), 2))
    diffs = {}
    for name, build in {"ggn": curvop.ggn,
                        "empirical": lambda *a, **k: curvop.fisher(*a, kind="empirical", **k)}.items():
        full = build(model, loss, batches, process_group=False) @ v
        for mode, kw in {"uncached": {}, "cached": {"cache": True}}.items():
            diffs[f"{name} {mode}"] = float(np.abs(build(model, loss, shard, timeout=30, **kw) @ v - full).max())
    try:
        curvop.jacobian(model, shard, timeout=30)
        jac = None
    except NotImplementedError as err:
        jac = str(err)
    return {"diffs": diffs, "jacobian": jac}


def fault(rank, world, out, how):
    model, batches = model_and_data()
    H = curvop.hessian(model, nn.CrossEntropyLoss(), batches[rank * 3:(rank + 1) * 3], timeout=4)
    v = np.ones(H.shape[0])
    H @ v
    if rank == 1:
        if how == "die":
            os._exit(3)
        time.sleep(120)  # hang: the test kills this process
    start = time.monotonic()
    try:
        H @ v
        return {"error": None}
    except DistributedError as err:
        return {"error": str(err), "type": type(err).__name__, "elapsed": time.monotonic() - start}


def _error(err):
    return {"type": type(err).__name__, "error": str(err)}


def seeds(rank, world, out):
    """Issue 12 item 8: randomness agrees across ranks by construction, whatever the seed argument."""
    model, batches = model_and_data()
    shard = batches[rank * 3:(rank + 1) * 3]
    loss = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss, shard, timeout=30)
    full = curvop.hessian(model, loss, batches, process_group=False)
    dense = dense_hessian(model, loss, batches)
    n = H.shape[0]
    res = {"n": n, "trace_true": float(np.trace(dense)), "eig_true": np.linalg.eigvalsh(dense)[::-1][:2].tolist()}
    for tag, seed in (("none", None), ("none_again", None), ("generator", np.random.default_rng(100 + rank))):
        # 40 < n = 51 probes: at num_matvecs >= n the trace is computed exactly (no randomness left)
        t = curvop.trace(H, method="hutchinson", num_matvecs=40, seed=seed)
        res[tag] = {
            "trace": [t.estimate, t.stderr],
            "trace_auto": curvop.trace(H, num_matvecs=20, seed=seed).estimate,
            "eig": curvop.eigenvalues(H, 2, seed=seed).eigenvalues.tolist(),
            "diag": curvop.diagonal(H, num_matvecs=6, seed=seed).estimate.tolist(),
            "density": np.concatenate(curvop.spectral_density(H, num_steps=8, num_probes=2, seed=seed).nodes).tolist(),
            "random": H.to_numpy(H.random(5, "gaussian", seed=seed)).tolist(),
        }
    # the same int seed: the result of a single-process operator with that seed, probes included
    res["int"] = {"dist": curvop.trace(H, method="hutchinson", num_matvecs=10, seed=7).estimate,
                  "single": curvop.trace(full, method="hutchinson", num_matvecs=10, seed=7).estimate}
    for tag, seed in (("int_differs", rank), ("int_vs_none", 3 if rank else None)):
        try:
            curvop.trace(H, method="hutchinson", num_matvecs=4, seed=seed)
            res[tag] = None
        except DistributedError as err:
            res[tag] = _error(err)
    res["after"] = curvop.trace(H, method="hutchinson", num_matvecs=4, seed=1).estimate  # still usable
    res["after_single"] = curvop.trace(full, method="hutchinson", num_matvecs=4, seed=1).estimate
    return res


def rank0_only(rank, world, out, timeout):
    """Issue 12 item 14: an operator built on rank 0 only."""
    model, batches = model_and_data()
    if rank != 0:
        time.sleep(40)  # never calls curvop; the test kills this process
        return {}
    start = time.monotonic()
    try:
        curvop.hessian(model, nn.CrossEntropyLoss(), batches[:3], timeout=timeout)
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - the test checks the type
        return dict(_error(err), elapsed=time.monotonic() - start)


def dtype_mismatch(rank, world, out):
    """Issue 12 item 14: float64 on rank 0, float32 on rank 1, with the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    if rank == 0:
        model, x = model.double(), x.double()  # float32 -> float64 is exact: the checksums agree
    try:
        H = curvop.hessian(model, nn.CrossEntropyLoss(), (x, y), timeout=20)
        H @ np.ones(H.shape[0])
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - the test checks the type
        return _error(err)


def rank_fails_alone(rank, world, out, case):
    """Issue 26: one rank's own check or product fails; every rank must raise DistributedError, and the
    ranks must still be in step afterwards (gloo answered a stray collective with SIGABRT)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    data = [(x, y), (x, y)]
    if rank == 1 and case == "data_dtype":  # float32 data for a float64 model on rank 1 only
        data = [(x.float(), y), (x.float(), y)]
    if rank == 1 and case == "half":  # a bfloat16 model on rank 1 only: refused before any collective
        model = model.bfloat16()
    start = time.monotonic()
    res = {"error": None}
    try:
        H = curvop.hessian(model, nn.CrossEntropyLoss(), data)  # the world group: no timeout of curvop's own
        if rank == 1 and case == "product":  # the second batch breaks after the build, on rank 1 only
            data[1] = (x[:, :3], y)
        H @ np.ones(H.shape[0])
    except Exception as err:  # noqa: BLE001 - the test checks the type
        res = _error(err)
    res["elapsed"] = time.monotonic() - start
    t = torch.full((1000,), float(rank + 1), dtype=torch.float64)  # a collective of another size afterwards
    dist.all_reduce(t)
    res["after"] = float(t[0])
    return res


def cuda_gloo(rank, world, out):
    """Both ranks on the one GPU, gloo with CUDA tensors: start-up check, seeds and products on the device."""
    model, batches = model_and_data()
    dev = torch.device("cuda")
    model = model.to(dev)
    batches = [(x.to(dev), y.to(dev)) for x, y in batches]
    loss = nn.CrossEntropyLoss()
    H = curvop.hessian(model, loss, batches[rank * 3:(rank + 1) * 3], timeout=60)
    full = curvop.hessian(model, loss, batches, process_group=False)
    v = np.random.default_rng(5).standard_normal(H.shape[0])
    t = curvop.trace(H, method="hutchinson", num_matvecs=40, seed=None)  # < n: a random estimate
    return {"diff": float(np.abs(H @ v - full @ v).max()), "trace": [t.estimate, t.stderr],
            "trace_true": float(np.trace(full.to_dense())),
            "eig": [float(x) for x in curvop.eigenvalues(H, 2, seed=None).eigenvalues.tolist()],
            "random": H.to_numpy(H.random(5, "gaussian", seed=np.random.default_rng(rank))).tolist()}


def device_mismatch(rank, world, out):
    """Rank 0 on CUDA, rank 1 on the CPU (gloo carries both): the start-up check names the device types."""
    model, batches = model_and_data()
    dev = torch.device("cuda" if rank == 0 else "cpu")
    try:
        curvop.hessian(model.to(dev), nn.CrossEntropyLoss(), [(x.to(dev), y.to(dev)) for x, y in batches[:3]],
                       timeout=30)
        return {"error": None}
    except Exception as err:  # noqa: BLE001 - the test checks the type
        return _error(err)


def main():
    scenario, prefix = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    group_timeout = 5 if scenario == "rank0only_group_timeout" else 60
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    if scenario == "agree":
        res = agree(rank, world, prefix)
    elif scenario == "family":
        res = family(rank, world, prefix)
    elif scenario == "seeds":
        res = seeds(rank, world, prefix)
    elif scenario == "rank0only":
        res = rank0_only(rank, world, prefix, timeout=4)
    elif scenario == "rank0only_group_timeout":
        res = rank0_only(rank, world, prefix, timeout=None)
    elif scenario == "dtype":
        res = dtype_mismatch(rank, world, prefix)
    elif scenario.startswith("alone_"):
        res = rank_fails_alone(rank, world, prefix, scenario[len("alone_"):])
    elif scenario == "cuda_gloo":
        res = cuda_gloo(rank, world, prefix)
    elif scenario == "device":
        res = device_mismatch(rank, world, prefix)
    else:
        res = fault(rank, world, prefix, scenario)
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump(res, f)
    if scenario in ("agree", "family", "seeds", "dtype", "cuda_gloo", "device") or scenario.startswith("alone_"):
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group is broken; do not wait in destroy_process_group


if __name__ == "__main__":
    main()
