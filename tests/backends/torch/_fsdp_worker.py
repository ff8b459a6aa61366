"""One rank of the FSDP2 tests (started by tests/backends/torch/test_torch_fsdp.py, torchrun-like env).

usage: python _fsdp_worker.py SCENARIO OUT_PREFIX ; writes OUT_PREFIX.<rank>.json
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import curvop
from curvop import arrays
from curvop.backends.torch.distributed import DistributedError
from curvop.backends.torch.fsdp import FSDPBackend, is_fsdp_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests/
from torch_reference import dense_hessian  # noqa: E402


def build(dtype, rank, world, shard=True, mp=None):
    """The model (sharded with fully_shard, or its unsharded twin) and the data: 24 samples in 4
    batches; rank r gets batches 2r, 2r+1 (uneven sizes: 7+5 and 6+6). ``mp``: the mp_policy of
    some fully_shard modules, by name ("0", "2", "" for the root)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    sizes = [7, 5, 6, 6]
    batches = [(torch.randn(s, 5, generator=g).to(dtype), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
    if shard:
        mesh = init_device_mesh("cpu", (world,))
        for key, m in (("0", model[0]), ("2", model[2]), ("", model)):
            fully_shard(m, mesh=mesh, **({"mp_policy": mp[key]} if key in (mp or {}) else {}))
        model.eval()
        return model, batches[2 * rank: 2 * rank + 2]
    return model.eval(), batches


def _dense(twin, loss, batches):
    """The independent reference: torch.func.hessian of the twin's loss over all the data, in float64."""
    return dense_hessian(copy.deepcopy(twin).double(), loss, [(x.double(), y) for x, y in batches])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def agree(rank, world, out):
    res = {}
    loss = nn.CrossEntropyLoss()
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        model, shard = build(dtype, rank, world)
        twin, batches = build(dtype, rank, world, shard=False)
        T = curvop.hessian(twin, loss, batches, process_group=False)
        D = _dense(twin, loss, batches)
        before = [p.to_local().clone() for p in model.parameters()]
        marker = [torch.full_like(p, 7.0) for p in model.parameters()]  # user's .grad, must survive
        for p, m in zip(model.parameters(), marker):
            p.grad = m
        rng = torch.get_rng_state()
        H = curvop.hessian(model, loss, shard, timeout=30)
        n = H.shape[0]
        V = np.random.default_rng(5).standard_normal((n, 3))
        HV, TV = H @ V, T @ V.astype(T.dtype)
        r = {"n": n, "product_rel": _rel(HV, TV), "product_rel_v": _rel(H @ V[:, 0], TV[:, 0]),
             "dense_rel": _rel(HV, D @ V), "dense_rel_v": _rel(H @ V[:, 0], D @ V[:, 0])}
        r["restored"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        r["grad_kept"] = all(p.grad is m and bool((m == 7.0).all()) for p, m in zip(model.parameters(), marker))
        r["rng_kept"] = bool(torch.equal(torch.get_rng_state(), rng))
        e, et = curvop.eigenvalues(H, 3, seed=0, tol=1e-4), curvop.eigenvalues(T, 3, seed=0)
        r["eig"], r["eig_twin"] = e.eigenvalues.tolist(), et.eigenvalues.tolist()
        r["eigvec_rel"] = [_rel(abs(H.to_numpy(e.eigenvectors)[:, i] @ (T.to_numpy(et.eigenvectors)[:, i]))
                                * np.ones(1), np.ones(1)) for i in range(3)]
        lam, U = np.linalg.eigh(D)
        r["eig_dense"] = lam[::-1][:3].tolist()
        ev = H.to_numpy(e.eigenvectors).astype(np.float64)
        r["eigvec_dense_rel"] = [float(1 - abs(ev[:, i] @ U[:, -1 - i]) / np.linalg.norm(ev[:, i])) for i in range(3)]
        tr, trt = (curvop.trace(op, method="hutch++", num_matvecs=12, seed=0) for op in (H, T))
        r["trace"], r["trace_twin"] = tr.estimate, trt.estimate
        r["trace_stderr"], r["trace_dense"] = float(tr.stderr), float(np.trace(D))
        d, dt = (curvop.spectral_density(op, num_steps=10, num_probes=2, seed=0) for op in (H, T))
        r["nodes"] = np.concatenate(d.nodes).tolist()
        r["nodes_twin"] = np.concatenate(dt.nodes).tolist()
        r["weights"] = np.concatenate(d.weights).tolist()
        r["weights_twin"] = np.concatenate(dt.weights).tolist()
        r["restored_after_algorithms"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        res[name] = r
    res["passes"] = passes(rank, world)
    res["no_hook"] = without_hook(rank, world)
    res["mp"] = mixed_precision(rank, world)
    # dispatch: curvop.hessian reaches the FSDP backend
    model, shard = build(torch.float64, rank, world)
    res["is_fsdp"] = [is_fsdp_model(model), is_fsdp_model(build(torch.float64, rank, world, shard=False)[0])]
    H = curvop.hessian(model, loss, shard, timeout=30)
    res["dispatch"] = isinstance(H.backend, FSDPBackend)
    model, shard = build(torch.bfloat16, rank, world)
    try:
        curvop.hessian(model, loss, shard, timeout=30)
        res["bf16"] = None
    except Exception as err:  # noqa: BLE001 - the test checks the type
        res["bf16"] = f"{type(err).__name__}: {err}"
    return res


class _Counting:
    """A re-iterable loader that counts its passes and the batches drawn."""

    def __init__(self, loader):
        self.loader, self.passes, self.drawn = loader, 0, 0

    def __iter__(self):
        self.passes += 1
        for batch in self.loader:
            self.drawn += 1
            yield batch


def passes(rank, world):
    """A block of 4 columns over a DataLoader of this rank's 2 batches: passes over the data, batches
    drawn and the batch each forward of the model saw, and the block against the dense reference."""
    loss = nn.CrossEntropyLoss()
    model, shard = build(torch.float64, rank, world)
    twin, batches = build(torch.float64, rank, world, shard=False)
    loader = _Counting(torch.utils.data.DataLoader(shard, batch_size=None))  # yields the pairs as they are
    first = {float(x[0, 0]): i for i, (x, _) in enumerate(shard)}
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(first[float(args[0][0, 0])]))
    H = curvop.hessian(model, loss, loader, timeout=30)
    out = {"build": {"passes": loader.passes, "drawn": loader.drawn, "forwards": len(seen)}}
    V = np.random.default_rng(7).standard_normal((H.shape[0], 4))
    V[:, 2] = 0.0  # a zero column: no forward for it
    for name, vec in (("block", V), ("vector", V[:, 0])):
        loader.passes = loader.drawn = 0
        seen.clear()
        HV = H @ vec
        out[name] = {"passes": loader.passes, "drawn": loader.drawn, "seen": list(seen)}
    D = _dense(twin, loss, batches)
    out["dense_rel"] = _rel(HV := H @ V, D @ V)
    out["zero_column"] = float(np.abs(HV[:, 2]).max())
    out["column_rel"] = _rel(HV[:, 0], H @ V[:, 0])  # a block's column is the vector's product
    return out


def without_hook(rank, world):
    """Why the arrays hook is needed: DTensor alone sums locally; without the hook the algorithms refuse."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    x = DTensor.from_local(torch.full((3,), float(rank + 1), dtype=torch.float64), mesh, [Shard(0)], run_check=False)
    out = {"dtensor_float_sum": float(torch.sum(x * x)), "global": float(3 * sum((r + 1) ** 2 for r in range(world)))}
    model, shard = build(torch.float64, rank, world)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), shard, timeout=30)
    hooks = getattr(arrays, "_NAMESPACE_HOOKS", [])
    saved = list(hooks)
    hooks.clear()
    try:
        curvop.trace(H, method="hutchinson", num_matvecs=4, seed=0)
        out["error"] = None
    except RuntimeError as err:
        out["error"] = str(err)
    finally:
        hooks.extend(saved)
    return out


def mixed_precision(rank, world):
    """fully_shard(mp_policy=...) on float32 shards: the error (or None) of curvop.hessian per policy,
    whether the model is unchanged after it, and the product error to the twin where it builds."""
    from torch.distributed.fsdp import MixedPrecisionPolicy as MP

    bf16, f32, every = torch.bfloat16, torch.float32, ("0", "2", "")
    cases = {"param_all": {k: MP(param_dtype=bf16) for k in every}, "param_sub2": {"2": MP(param_dtype=bf16)},
             "reduce_all": {k: MP(reduce_dtype=bf16) for k in every}, "output_root": {"": MP(output_dtype=bf16)},
             "f32": {k: MP(param_dtype=f32) for k in every}, "default": {k: MP() for k in every}}
    loss, out = nn.CrossEntropyLoss(), {}
    for case, mp in cases.items():
        model, shard = build(f32, rank, world, mp=mp)
        before = [p.to_local().clone() for p in model.parameters()]
        policies = [m._get_fsdp_state()._mp_policy for k, m in model.named_modules() if k in every]
        r = {"error": None}
        try:
            H = curvop.hessian(model, loss, shard, timeout=30)
        except Exception as err:  # noqa: BLE001 - the test checks the type
            r["error"] = f"{type(err).__name__}: {err}"
        else:
            twin, batches = build(f32, rank, world, shard=False)
            T = curvop.hessian(twin, loss, batches, process_group=False)
            V = np.random.default_rng(5).standard_normal((H.shape[0], 2))
            r["product_rel"] = _rel(H @ V, T @ V.astype(np.float32))
            r["dense_rel"] = _rel(H @ V, _dense(twin, loss, batches) @ V)
        now = [m._get_fsdp_state()._mp_policy for k, m in model.named_modules() if k in every]
        r["unchanged"] = (all(torch.equal(p.to_local(), b) and p.grad is None for p, b in zip(model.parameters(), before))
                          and all(a is b for a, b in zip(policies, now)))
        out[case] = r
    return out


def die(rank, world, out):
    model, shard = build(torch.float64, rank, world)
    H = curvop.hessian(model, nn.CrossEntropyLoss(), shard, timeout=4)
    v = np.ones(H.shape[0])
    H @ v
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        H @ v
        return {"error": None}
    except DistributedError as err:
        return {"error": str(err), "type": type(err).__name__, "elapsed": time.monotonic() - start}


def example():
    """examples/fsdp_torchrun.py as torchrun runs it."""
    import runpy

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples", "fsdp_torchrun.py")
    sys.argv = [path, "--timeout", "60"]
    runpy.run_path(path, run_name="__main__")


def main():
    scenario, prefix = sys.argv[1], sys.argv[2]
    if scenario == "example":
        return example()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    res = agree(rank, world, prefix) if scenario == "agree" else die(rank, world, prefix)
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump(res, f)
    if scenario == "agree":
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group is broken; do not wait in destroy_process_group


if __name__ == "__main__":
    main()
