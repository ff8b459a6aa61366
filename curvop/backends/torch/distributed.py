"""Data-parallel Hessian-vector products: every rank multiplies over its shard, then all-reduce.

The weighting rule of :mod:`curvop.backends.dataset` extends across ranks. Each rank computes the
*unnormalised* local sum ``S_r = sum_b n_b H_b v`` and its sample count ``N_r``
(:meth:`Dataset.partial_sum`); one all-reduce of ``[S_r, N_r]`` gives every rank
``sum_r S_r / sum_r N_r``, the product with the Hessian of the mean loss over the whole data set,
also when shards have different sizes. For a sum-reduced loss only ``S_r`` is all-reduced.

Every rank then holds the same product. Randomness agrees by construction: the algorithms make
their generator from ``Backend.agree_seed(seed)``, which here is one small collective
(:meth:`TorchCollective.agree_seed`): rank 0's draw when ``seed`` is ``None`` or a Generator, the
seed itself when it is fixed and the same on every rank (a :class:`DistributedError` when fixed
seeds differ). So the algorithms run identically everywhere and return identical results; only
the main process shows progress bars (:func:`is_main_process`).

Faults: with ``timeout=`` curvop runs its collectives on its own process group created with that
timeout, so a rank that dies makes the others fail at once (gloo: connection closed) and a rank
that hangs makes them fail after ``timeout`` seconds, with a :class:`DistributedError` instead of
a hang. The group is checked when the operator is built: a monitored barrier on gloo, with the
given timeout or the group's own, which names the ranks that never built the operator; then a
comparison across ranks of the dtype and device type (a mismatch would kill a rank inside gloo),
the parameter count and a checksum of the parameters.

This module imports no framework at import time.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from typing import Any

import numpy as np

__all__ = ["AgreedGenerator", "DistributedError", "TorchCollective", "is_main_process", "torch_collective"]


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
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.dist = dist
        self.timeout = timeout
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._startup_barrier()
        if timeout is not None:
            ranks = None if group is None else dist.get_process_group_ranks(group)
            try:
                self.group = dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=float(timeout)))
            except Exception as err:  # DistStoreError: a rank never came to create the group
                raise DistributedError(_not_built_everywhere(self.rank, self.world, f"{timeout:g} s", err)) from err
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))

    def _startup_barrier(self) -> None:
        """Every rank is here: a monitored barrier (gloo), which names the ranks that are not."""
        if str(self.dist.get_backend(self.group)) != "gloo":
            return  # NCCL has no monitored barrier; the first collective waits for the group's timeout
        seconds = self.timeout if self.timeout is not None else _group_timeout(self.group)
        kwargs: dict[str, Any] = {"wait_all_ranks": True}
        if seconds is not None:  # without it torch waits its 30-minute default, not the group's timeout
            kwargs["timeout"] = datetime.timedelta(seconds=float(seconds))
        try:
            self.dist.monitored_barrier(group=self.group, **kwargs)
        except Exception as err:
            limit = f"{seconds:g} s" if seconds is not None else "the process group's timeout"
            raise DistributedError(_not_built_everywhere(self.rank, self.world, limit, err)) from err

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
                "algorithms in the same order). The operator is not usable after this."
            ) from err

    def all_reduce(self, t: Any) -> Any:
        self._run("all-reduce", self.dist.all_reduce, t)
        return t

    def reduce_product(self, acc: Any, count: int, reduction: str, failure: BaseException | None = None,
                       batch_error: bool = False) -> Any:
        """``sum_r acc_r / sum_r count_r`` (mean) or ``sum_r acc_r`` (sum), on every rank.

        Two numbers travel with the product: how many ranks failed to compute their share
        (``failure``: the exception, ``acc`` then a placeholder of the right shape) and how many of
        those failed for a reason other than a batching rule (``batch_error``). When a rank failed,
        every rank raises, so none is left waiting in a collective the others never call: the
        ranks' own errors when all failed alike (all batching errors: ``hvp_batch`` then falls back
        on every rank alike; all others: a mode fallback runs alike), else a
        :class:`DistributedError` naming the ranks and their errors.
        """
        import torch

        status = [float(failure is not None), float(failure is not None and not batch_error)]
        extra = ([float(count)] if reduction == "mean" else []) + status
        flat = torch.cat([acc.reshape(-1), acc.new_tensor(extra)])
        self.all_reduce(flat)
        failed, other = (int(x) for x in flat[-2:].tolist())
        if failed:
            if failed == self.world and other in (0, self.world):
                raise failure  # every rank failed alike: each takes the same way on (columns, another mode)
            self._raise_failed(failure, "the products of its shard of the data")
        if reduction == "mean":
            return (flat[:-3] / flat[-3]).view(acc.shape)
        return flat[:-2].view(acc.shape)

    def agree(self, failure: BaseException | None, where: str) -> None:
        """Whether the local work before the next collective failed on any rank (a collective).

        A rank whose own check failed would otherwise raise alone while the others wait in the
        next collective, or pair it with a different one, which gloo answers with SIGABRT. Every
        rank raises a :class:`DistributedError` instead (chained to its own error where it has one);
        when every rank failed, each raises its own error, so a mode fallback runs alike on all.
        """
        import torch

        flag = torch.tensor([float(failure is not None)], dtype=torch.float64, device=self._control_device())
        self.all_reduce(flag)
        failed = int(flag.item())
        if failed == self.world:
            raise failure
        if failed:
            self._raise_failed(failure, where)

    def _control_device(self, device: Any = None) -> Any:
        """Where small control tensors go: the CPU on gloo, else ``device`` (or the current GPU)."""
        import torch

        if "gloo" in self.backend or "mpi" in self.backend or not torch.cuda.is_available():
            return torch.device("cpu")
        return device if device is not None and getattr(device, "type", "") != "cpu" else torch.device(
            "cuda", torch.cuda.current_device())

    def _raise_failed(self, failure: BaseException | None, where: str) -> None:
        """Raise, on every rank, a :class:`DistributedError` naming the ranks that failed ``where``
        and their errors (each rank contributes its own; a collective every rank calls)."""
        mine = None if failure is None else f"{type(failure).__name__}: {_first_line(failure)}"
        texts: list[Any] = [None] * self.world
        try:
            self.dist.all_gather_object(texts, mine, group=self.group)
        except Exception:  # the messages are a courtesy: the error below is raised in any case
            texts = [mine if r == self.rank else None for r in range(self.world)]
        bad = [r for r, t in enumerate(texts) if t is not None] or ([self.rank] if failure is not None else [])
        named = "; ".join(f"rank {r}: {texts[r]}" for r in bad) or "another rank failed"
        raise DistributedError(
            f"rank {self.rank} of {self.world}: {where} failed on "
            f"{'rank' if len(bad) == 1 else 'ranks'} {', '.join(map(str, bad)) or '?'} ({named}). Every rank "
            "raises this error, so that none waits in a collective the others never reach; fix the cause "
            "on that rank (every rank must build the operator from the same model, dtype and kind of "
            "data, and multiply the same vectors)"
        ) from failure

    def gather_ints(self, value: int, device: Any) -> list[int]:
        """Every rank's ``value`` (used to report which rank holds a bad batch)."""
        import torch

        t = torch.zeros(self.world, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        t[self.rank] = value
        self.all_reduce(t)
        return [int(x) for x in t.tolist()]

    def check_consistent(self, size: int, params: dict[str, Any] | None, device: Any,
                         failure: BaseException | None = None) -> None:
        """The same dtype, device type, parameter count and checksum on every rank.

        (Every rank is present: the constructor ran a monitored barrier on gloo.) A dtype mismatch
        would otherwise pass and then kill a rank inside gloo (products of different byte sizes).
        ``failure``: this rank's own parameter checks failed (``params`` is then ``None``); every
        rank then raises a :class:`DistributedError` naming it, in this same collective.
        """
        import torch

        local = torch.zeros(5, dtype=torch.float64)
        if failure is None:
            dtype = next(iter(params.values())).dtype
            with torch.no_grad():
                local[1:] = torch.stack([
                    torch.tensor(float(_signature(dtype, device)), dtype=torch.float64, device=device),
                    torch.tensor(float(size), dtype=torch.float64, device=device),
                    sum(p.detach().double().sum() for p in params.values()),
                    sum((p.detach().double() ** 2).sum() for p in params.values()),
                ]).cpu()
        else:
            local[0] = 1.0
        mine = local[1:].tolist()
        table = torch.zeros(self.world, 5, dtype=torch.float64, device=self._control_device(device))
        table[self.rank] = local.to(table.device)
        self.all_reduce(table)
        rows = table.cpu().tolist()
        if any(row[0] for row in rows):
            self._raise_failed(failure, "building the operator (the checks of its parameters)")
        rows = [row[1:] for row in rows]
        for r, row in enumerate(rows):
            if row[0] != mine[0]:
                raise DistributedError(
                    f"rank {r} computes in {_describe_signature(int(row[0]))} but rank {self.rank} in "
                    f"{_describe_signature(int(mine[0]))}: every rank must build the operator with the "
                    "same dtype and device type (e.g. model.double() or model.to(device) on every rank)"
                )
        for r, row in enumerate(rows):
            if int(row[1]) != size:
                raise DistributedError(
                    f"rank {r} has {int(row[1])} parameters but rank {self.rank} has {size}: every rank must "
                    "build the operator from the same model and the same params= selection"
                )
        for r, row in enumerate(rows):
            if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in zip(row[2:], mine[2:])):
                raise DistributedError(
                    f"the parameters on rank {r} differ from those on rank {self.rank} (checksums "
                    f"{row[2]:.6g} vs {mine[2]:.6g}): data-parallel products need the same point on every "
                    "rank; seed the model identically, load the same checkpoint, or broadcast the "
                    "parameters from rank 0 (DistributedDataParallel does this when it wraps the model)"
                )

    def agree_seed(self, seed: Any, device: Any) -> AgreedGenerator:
        """A generator that draws the same numbers on every rank: rank 0's draw, or the fixed seed.

        One collective (all ranks call it, in the same order, as they call the algorithms), except
        for an :class:`AgreedGenerator`, which is returned as it is. ``None`` draws fresh entropy and
        a ``Generator`` (or BitGenerator) gives one draw on every rank; all ranks then use rank 0's
        draw. A fixed seed (int, sequence of ints, SeedSequence), once every rank is seen to pass
        the same one, gives the stream of ``np.random.default_rng(seed)``, so a distributed run
        reproduces a single-process one; differing seeds raise :class:`DistributedError` on every
        rank, before any product.
        """
        import torch

        if isinstance(seed, AgreedGenerator):
            return seed
        fixed = seed is not None and not isinstance(seed, (np.random.Generator, np.random.BitGenerator))
        problem = None
        try:
            if fixed:
                ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
                words = ss.generate_state(2, np.uint32)
                value = (int(words[0]) << 30) ^ int(words[1])  # a 62-bit fingerprint of the seed
            else:
                value = int(np.random.default_rng(seed).integers(2**62))
            kind = _FIXED if fixed else _DRAWN
        except (TypeError, ValueError) as err:  # an invalid seed: raised after the exchange
            kind, value, problem = _INVALID, 0, err
        table = torch.zeros(self.world, 2, dtype=torch.int64, device=device)
        table[self.rank, 0], table[self.rank, 1] = kind, value
        self.all_reduce(table)
        rows = [tuple(row) for row in table.cpu().tolist()]
        if problem is not None and all(k == _INVALID for k, _ in rows):
            raise problem
        if all(k == _DRAWN for k, _ in rows):
            return AgreedGenerator(np.random.PCG64(rows[0][1]))
        if all(k == _FIXED for k, _ in rows) and len({v for _, v in rows}) == 1:
            return AgreedGenerator(np.random.PCG64(seed))  # the stream of np.random.default_rng(seed)
        what = {_FIXED: "a fixed seed", _DRAWN: "seed=None or a Generator", _INVALID: "an invalid seed"}
        odd = next(r for r, row in enumerate(rows) if row != rows[0])
        detail = (f"rank 0 and rank {odd} pass different fixed seeds" if rows[odd][0] == rows[0][0]
                  else f"rank 0 passes {what[rows[0][0]]}, rank {odd} {what[rows[odd][0]]}")
        raise DistributedError(
            f"the seed differs across ranks ({detail}): with a data-parallel operator every rank must "
            "draw the same probes, so every rank must pass the same seed (the same int on every rank, "
            "or None / a Generator on every rank: rank 0's draw is then used everywhere)"
        )


class AgreedGenerator(np.random.Generator):
    """A numpy ``Generator`` that draws the same numbers on every rank of a data-parallel operator.

    Made by :meth:`TorchCollective.agree_seed` (through ``Backend.agree_seed``); passed as a seed
    again, it is used as it is, without another collective.
    """

    __slots__ = ()

_FIXED, _DRAWN, _INVALID = 1, 2, 3

_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128", "float8_e4m3fn",
           "float8_e5m2")
_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "meta", "privateuseone", "xla")


def _signature(dtype: Any, device: Any) -> int:
    """dtype and device type as one small integer (exact in float64), for the start-up check."""
    name, kind = str(dtype).replace("torch.", ""), str(getattr(device, "type", device))
    d = _DTYPES.index(name) if name in _DTYPES else len(_DTYPES)
    t = _DEVICES.index(kind) if kind in _DEVICES else len(_DEVICES)
    return 64 * d + t


def _describe_signature(code: int) -> str:
    d, t = divmod(int(code), 64)
    dtype = _DTYPES[d] if d < len(_DTYPES) else "another dtype"
    device = _DEVICES[t] if t < len(_DEVICES) else "another device type"
    return f"{dtype} on {device}"


def _group_timeout(group: Any) -> float | None:
    """The timeout a process group was created with, in seconds (None where torch hides it)."""
    import torch
    import torch.distributed as dist

    try:
        pg = group if group is not None else dist.group.WORLD
        return float(pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except Exception:  # a private API: fall back to torch's default
        return None


def _not_built_everywhere(rank: int, world: int, limit: str, err: BaseException) -> str:
    text = _first_line(err)
    missing = re.search(r"Ranks? ([\d, ]+) failed", text)
    ranks = [r for r in re.split(r"[, ]+", missing.group(1)) if r] if missing else []
    who = (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} did not arrive" if ranks
           else "not every rank arrived")
    return (
        f"rank {rank} of {world}: curvop.hessian is a collective call and {who} within {limit} "
        f"({type(err).__name__}: {text}). Every rank must build the operator: call curvop.hessian "
        "with the same model and params= on every rank of the group, not only on rank 0 (or pass "
        "process_group=False for an operator over this rank's data alone)"
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
