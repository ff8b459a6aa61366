"""Data-parallel Hessian-vector products: every rank multiplies over its shard, then all-reduce.

The weighting rule of :mod:`curvop.backends.dataset` extends across ranks. Each rank computes the
*unnormalised* local sum ``S_r = sum_b n_b H_b v`` and its sample count ``N_r``
(:meth:`Dataset.partial_sum`); one all-reduce of ``[S_r, N_r]`` gives every rank
``sum_r S_r / sum_r N_r``, the product with the Hessian of the mean loss over the whole data set,
also when shards have different sizes. For a sum-reduced loss only ``S_r`` is all-reduced.

Every rank then holds the same product, so the algorithms (same seeds, probes drawn on the host
from the seed) run identically everywhere and return identical results; only the main process
shows progress bars (:func:`is_main_process`).

Faults: with ``timeout=`` curvop runs its collectives on its own process group created with that
timeout, so a rank that dies makes the others fail at once (gloo: connection closed) and a rank
that hangs makes them fail after ``timeout`` seconds, with a :class:`DistributedError` instead of
a hang. The group is checked when the operator is built (a monitored barrier on gloo, which names
missing ranks, and a comparison of the parameters' size and checksum across ranks).

This module imports no framework at import time.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

__all__ = ["DistributedError", "TorchCollective", "is_main_process", "torch_collective",
           "jax_data_parallel"]


class DistributedError(RuntimeError):
    """A collective of a data-parallel product failed: a rank died, hung, or disagrees."""


def is_main_process() -> bool:
    """True on rank 0 of an initialised ``torch.distributed`` group, else when ``$RANK`` is unset or 0.

    Without any distributed setup this is True. Progress bars and printing use it so that only
    one process reports.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


class TorchCollective:
    """All-reduces of products over a ``torch.distributed`` process group.

    Parameters
    ----------
    group : ProcessGroup or None
        ``None``: the default (world) group, which must be initialised.
    timeout : float, optional
        Seconds a collective may wait for the other ranks. Given, curvop creates its own group
        with that timeout (a collective call: every rank must build the operator). Otherwise the
        group's own timeout applies (``init_process_group(timeout=...)``, 30 min by default).
    """

    def __init__(self, group: Any = None, timeout: float | None = None):
        import torch.distributed as dist

        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                f"dist.new_group(...)), got {type(group).__name__}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
            )
        if group is not None and dist.get_rank(group) < 0:
            raise DistributedError(
                f"this process (global rank {dist.get_rank()}) is not a member of the process_group "
                "passed to curvop; build the operator only on the group's ranks, or pass a group that "
                "contains every rank that builds it"
            )
        self.dist = dist
        self.timeout = timeout
        self.group = group
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            ranks = None if group is None else dist.get_process_group_ranks(group)
            self.group = dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=float(timeout)))
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))

    # --- collectives, each turning a failure into a DistributedError ----------------------------------
    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as err:  # gloo raises RuntimeError / DistBackendError with long text
            limit = f"{self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
            raise DistributedError(
                f"rank {self.rank} of {self.world}: the {what} of a data-parallel Hessian-vector product "
                f"failed ({type(err).__name__}: {_first_line(err)}). Another rank probably died, hung "
                f"longer than {limit}, or stopped calling the same products (every rank must run the same "
                "algorithm with the same seed). The operator is not usable after this."
            ) from err

    def all_reduce(self, t: Any) -> Any:
        self._run("all-reduce", self.dist.all_reduce, t)
        return t

    def reduce_product(self, acc: Any, count: int, reduction: str) -> Any:
        """``sum_r acc_r / sum_r count_r`` (mean) or ``sum_r acc_r`` (sum), on every rank."""
        import torch

        if reduction == "mean":
            flat = torch.cat([acc.reshape(-1), acc.new_tensor([float(count)])])
            self.all_reduce(flat)
            return (flat[:-1] / flat[-1]).view(acc.shape)
        return self.all_reduce(acc.contiguous())

    def gather_ints(self, value: int, device: Any) -> list[int]:
        """Every rank's ``value`` (used to report which rank holds a bad batch)."""
        import torch

        t = torch.zeros(self.world, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        t[self.rank] = value
        self.all_reduce(t)
        return [int(x) for x in t.tolist()]

    def check_consistent(self, size: int, params: dict[str, Any], device: Any) -> None:
        """All ranks present, and the same parameters (count and checksum) on every rank."""
        import torch

        if self.backend == "gloo" and device.type == "cpu":
            kwargs = {"wait_all_ranks": True}
            if self.timeout is not None:
                kwargs["timeout"] = datetime.timedelta(seconds=float(self.timeout))
            self._run("start-up barrier (monitored)", self.dist.monitored_barrier, **kwargs)
        with torch.no_grad():
            local = torch.stack([
                torch.tensor(float(size), dtype=torch.float64, device=device),
                sum(p.detach().double().sum() for p in params.values()),
                sum((p.detach().double() ** 2).sum() for p in params.values()),
            ])
        mine = local.clone()
        table = torch.zeros(self.world, 3, dtype=torch.float64, device=device)
        table[self.rank] = local
        self.all_reduce(table)
        for r, row in enumerate(table.cpu().tolist()):
            if int(row[0]) != size:
                raise DistributedError(
                    f"rank {r} has {int(row[0])} parameters but rank {self.rank} has {size}: every rank must "
                    "build the operator from the same model and the same params= selection"
                )
            ref = mine.cpu().tolist()
            if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(row[1:], ref[1:])):
                raise DistributedError(
                    f"the parameters on rank {r} differ from those on rank {self.rank} (checksums "
                    f"{row[1]:.6g} vs {ref[1]:.6g}): data-parallel products need the same point on every "
                    "rank; seed the model identically, load the same checkpoint, or broadcast the "
                    "parameters from rank 0 (DistributedDataParallel does this when it wraps the model)"
                )


def torch_collective(process_group: Any, timeout: float | None) -> TorchCollective | None:
    """The collective a torch backend should use, or ``None`` for a single-process product.

    ``process_group=None`` (the default) uses the world group when ``torch.distributed`` is
    initialised with more than one rank; ``False`` forces a single-process operator; a
    ``ProcessGroup`` is used as given.
    """
    if process_group is False:
        return None
    if process_group is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
    return TorchCollective(None if process_group is None else process_group, timeout)


def jax_data_parallel(params: Any, data: Any, devices: Any = None, axis: str = "data") -> tuple[Any, Any]:
    """Replicate ``params`` and shard every batch of ``data`` along its first axis over ``devices``.

    Returns ``(params, data)`` to pass to :func:`curvop.hessian` / :func:`curvop.hessian_of` with
    the JAX backend: each product then runs on all devices, each on its slice of every batch, and
    XLA inserts the all-reduce (sums over the sample axis become cross-device reductions). A batch's
    size must be divisible by the number of devices.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), (axis,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(axis))

    def put_batch(batch: Any) -> Any:
        def put(x: Any) -> Any:
            if not hasattr(x, "shape") or len(x.shape) == 0:
                return x
            if x.shape[0] % len(devices):
                raise ValueError(
                    f"a batch of {x.shape[0]} samples cannot be split evenly over {len(devices)} devices; "
                    "use batch sizes divisible by the device count (drop or pad the last batch)"
                )
            return jax.device_put(x, sharded)

        return jax.tree_util.tree_map(put, batch)

    params = jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), params)
    if data is None:
        return params, None
    if isinstance(data, (tuple, list)) and len(data) >= 1 and hasattr(data[0], "shape"):
        return params, put_batch(data)
    return params, [put_batch(b) for b in data]
