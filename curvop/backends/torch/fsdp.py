"""Hessian-vector products of a PyTorch FSDP2 model (``fully_shard``), with vectors kept sharded.

FSDP2 holds each parameter as a ``DTensor`` sharded along dim 0 and unshards it into its own
buffers around each layer's forward and backward, so a double backward through it fails (torch
2.13: "The differentiated Tensor at index 0 appears to not have been used in the graph"). The
product here uses FSDP's normal path only: a central difference of two sharded gradients,

    H v  ~  (g(θ + t v) - g(θ - t v)) / (2 t),      t = step * max(1, ||θ||) / ||v||,

where each rank moves only its own parameter shards (in place, under ``no_grad``), runs forward
and backward through FSDP (which reduce-scatters the gradient into sharded ``.grad``), reads its
gradient shards, and afterwards copies its saved shards back, bit for bit. ``step`` defaults to
``eps ** (1/3)`` of the parameters' dtype, which balances truncation (``~ (t ||v||)**2``) against
rounding (``~ eps / (t ||v||)``): about ``eps ** (2/3)`` relative error when the model is smooth
(measured accuracy: docs/scale.md, "Sharded models: FSDP2"). Each product costs two forward and
backward passes of the model per batch, the memory of a training step plus three local vectors. The
data (a batch, a list or a loader) is iterated once per product, never held: a block of ``k``
columns is one pass too, each batch running the ``2 k`` gradients of its columns back to back.

Vectors are ``DTensor`` s of global shape ``(n,)`` with placement ``Shard(0)``: rank ``r`` holds its
parameter shards concatenated (``n_local`` entries). numpy vectors in and out use the order of the
unsharded model (``model.named_parameters()``, each flattened), so ``H @ v`` with a numpy ``v``
equals the unsharded twin's product. The algorithms reduce with
:class:`curvop.backends.torch.sharded_arrays.ShardedNamespace` and draw the same probes on every rank
(rank 0's seed), so ``curvop.eigenvalues``, ``trace`` and ``spectral_density`` return the same
numbers on every rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from curvop import arrays
from curvop.backends.base import Backend
from curvop.backends.dataset import Dataset
from curvop.backends.torch.distributed import DistributedError, TorchCollective
from curvop.backends.torch.sharded_arrays import ShardedNamespace, hook_installed, register

__all__ = ["FSDPBackend", "hessian_fsdp", "is_fsdp_model", "default_step", "local_probes"]


def is_fsdp_model(model: Any) -> bool:
    """True if ``model`` is a ``torch.nn.Module`` with ``DTensor`` parameters (FSDP2 ``fully_shard``)."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    DTensor = getattr(mod, "DTensor", None) if mod is not None else None
    if DTensor is None or not hasattr(model, "parameters"):
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def default_step(dtype: Any) -> float:
    """The relative finite-difference step ``eps ** (1/3)`` of a torch dtype (6.1e-6 in float64).

    >>> import torch
    >>> round(default_step(torch.float32), 4)
    0.0049
    """
    import torch

    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _pair(batch: Any) -> tuple:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("data must be one batch (inputs, targets) or a re-iterable of such pairs (a list "
                         f"or a DataLoader: this rank's share of the data); got a batch of {type(batch).__name__}")
    return batch[0], batch[1]


def _check_eval(model: Any) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    for name, m in model.named_modules():
        if m.training and isinstance(m, (_BatchNorm, _DropoutNd)):
            raise ValueError(
                f"layer {name or type(m).__name__!r} is in training mode, so the gradient is not a fixed "
                "function of the parameters and finite differences of it are meaningless; call "
                "model.eval() on every rank before building the Hessian"
            )


def _mp_policies(model: Any) -> list:
    """``(module name, MixedPrecisionPolicy)`` of every ``fully_shard`` module of ``model`` (root first).

    Read from FSDP2's per-module state (torch 2.13: ``FSDPModule._get_fsdp_state()._mp_policy``, the
    policy ``fully_shard(mp_policy=...)`` was given; its param groups hold the same object). Private
    torch layout, so any surprise gives no policy for that module rather than an error.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # noqa: BLE001 - an unexpected torch: nothing to read
        return []
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            state = m._get_fsdp_state()
            policy = getattr(state, "_mp_policy", None)
            if policy is None:
                groups = getattr(state, "_fsdp_param_groups", None) or []
                policy = next((g.mp_policy for g in groups if getattr(g, "mp_policy", None) is not None), None)
        except Exception:  # noqa: BLE001 - unreadable state: do not refuse on a guess
            continue
        if policy is not None:
            out.append((name, policy))
    return out


def _check_mixed_precision(model: Any, tdtype: Any, step: float) -> None:
    """Refuse an FSDP2 ``MixedPrecisionPolicy`` that computes, reduces or outputs in a dtype coarser than
    the sharded parameters' ``tdtype``: the gradient is then a rounded function of the parameters and
    its finite differences are noise."""
    import torch

    eps = float(torch.finfo(tdtype).eps)
    for name, policy in _mp_policies(model):
        for field, what in (("param_dtype", "runs the forward and backward"),
                            ("reduce_dtype", "reduces the gradients"), ("output_dtype", "casts the outputs")):
            low = getattr(policy, field, None)
            if not isinstance(low, torch.dtype) or not low.is_floating_point or torch.finfo(low).eps <= eps:
                continue
            where = f"module {name!r}" if name else f"the root module ({type(model).__name__})"
            raise TypeError(
                f"fully_shard of {where} has MixedPrecisionPolicy({field}={low}) but the sharded parameters "
                f"are {tdtype}: FSDP {what} in {low}, so the gradient is a {low}-rounded function of the "
                f"parameters and curvop's central finite differences of it (relative step "
                f"{step:.2g}) are noise, not a Hessian. Build the Hessian on a copy of the model "
                f"wrapped with fully_shard without mp_policy (or with a MixedPrecisionPolicy whose param_dtype, "
                f"reduce_dtype and output_dtype are None or {tdtype}); the model given was not changed"
            )


class FSDPBackend(Backend):
    """Central-difference products of an FSDP2 model's loss; vectors are ``Shard(0)`` DTensors.

    Build it with :func:`hessian_fsdp` (or :func:`curvop.hessian` on an FSDP2 model). Every rank
    must build it and call the same products in the same order (a collective object).
    """

    name = "torch-fsdp"

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Any], data: Any, *,
                 step: float | None = None, reduction: str = "mean", timeout: float | None = None,
                 process_group: Any = None) -> None:
        import torch
        from torch.distributed.tensor import DTensor, Shard

        if not is_fsdp_model(model):
            raise TypeError("hessian_fsdp needs a model whose parameters are DTensors (wrapped with "
                            "torch.distributed.fsdp.fully_shard); for a plain model use curvop.hessian")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _check_eval(model)
        self.model, self.loss_fn = model, loss_fn
        self.dataset = Dataset(data, reduction)  # iterated once per product or block, never materialised
        _pair(self.dataset.first())
        self.names, self.params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad])
        mesh = self.params[0].device_mesh
        for k, p in zip(self.names, self.params):
            if not isinstance(p, DTensor) or p.device_mesh is not mesh or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"parameter {k!r} is not sharded as FSDP2 does by default (a DTensor with placement "
                    f"Shard(0) on the model's 1-D mesh; got {getattr(p, 'placements', type(p).__name__)}): "
                    "curvop supports fully_shard with the default shard_placement_fn on a 1-D mesh"
                )
            if p.dtype != self.params[0].dtype:
                raise TypeError(f"parameter {k!r} is {p.dtype} but {self.names[0]!r} is {self.params[0].dtype}: "
                                "all parameters must share one dtype")
        tdtype, self.device = self.params[0].dtype, self.params[0].to_local().device
        if tdtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"the parameters are {tdtype}: finite differences of a {tdtype} gradient are too inaccurate "
                "for a Hessian (step eps**(1/3) = {:.2g}); keep the sharded parameters in float32 or float64 "
                "(FSDP2's MixedPrecisionPolicy(param_dtype=torch.bfloat16) keeps float32 shards, but its bf16 "
                "forward makes the differences noisy too: use no mixed precision for the Hessian)".format(
                    float(torch.finfo(tdtype).eps) ** (1 / 3))
            )
        self.tdtype = tdtype
        self.dtype = np.dtype(str(tdtype).replace("torch.", ""))
        self.step = default_step(tdtype) if step is None else float(step)
        if not self.step > 0:
            raise ValueError(f"step must be positive, got {step!r}")
        _check_mixed_precision(model, tdtype, self.step)  # before any collective: every rank refuses alike
        self.reduction = reduction
        self._coll = TorchCollective(process_group, timeout)
        self.rank, self.world = self._coll.rank, self._coll.world
        if mesh.size() != self.world:
            raise ValueError(f"the model is sharded over {mesh.size()} ranks but the process group has "
                             f"{self.world}; pass the group FSDP shards over as process_group=")
        self._layout()
        self.ns = ShardedNamespace(mesh, self.size, self.n_local)
        register(self.ns)
        with torch.no_grad():  # the scale of the step: ||θ|| over all shards
            local = sum((p.to_local().double() ** 2).sum() for p in self.params).reshape(1)
        self.theta_norm = math.sqrt(float(self._coll.all_reduce(local.to(self.device))[0]))

    # --- layout: which global entries this rank holds --------------------------------------------
    def _layout(self) -> None:
        import torch

        rows = torch.zeros(self.world, len(self.params), dtype=torch.float64, device=self.device)
        rows[self.rank] = torch.tensor([float(p.to_local().shape[0]) for p in self.params], dtype=torch.float64)
        rows = self._coll.all_reduce(rows).cpu().numpy().astype(np.int64)
        numel = np.array([p.numel() for p in self.params], dtype=np.int64)
        row_size = np.array([p.numel() // max(1, p.shape[0]) for p in self.params], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(numel)[:-1]])
        starts = np.cumsum(rows, axis=0) - rows  # first row of each rank's shard
        if not np.array_equal(rows.sum(axis=0) * row_size, numel):
            raise DistributedError("the parameter shards of the ranks do not add up to the parameters "
                                   "(is every rank passing the same model?)")
        # rank r holds, in order, the global entries [start, start + length) of each parameter: ranges,
        # not index arrays (an index of a 7B model would take 56 GB on every rank)
        self.ranges = [[(int(offsets[i] + starts[r, i] * row_size[i]), int(rows[r, i] * row_size[i]))
                        for i in range(len(self.params))] for r in range(self.world)]
        self.size = int(numel.sum())
        self.n_local = int(sum(length for _, length in self.ranges[self.rank]))
        self._split = [int(rows[self.rank, i] * row_size[i]) for i in range(len(self.params))]

    # --- the product -----------------------------------------------------------------------------
    def _local_views(self) -> list:
        return [p.to_local().view(-1) for p in self.params]

    def _batch_gradient(self, x: Any, y: Any, scale: float) -> Any:
        """This rank's shards of the gradient of ``scale * loss(batch)``, averaged over the ranks by FSDP."""
        import torch

        for p in self.params:
            p.grad = None
        (self.loss_fn(self.model(x), y) * scale).backward()
        return torch.cat([p.grad.to_local().reshape(-1) if p.grad is not None
                          else torch.zeros(n, dtype=self.tdtype, device=self.device)
                          for p, n in zip(self.params, self._split)])

    def _columns(self, V: Any) -> Any:
        """``H V`` for this rank's rows ``V`` (``(n_local, k)``), as ``(k, n_local)``: one pass over the
        data for the whole block; on each batch, every column's two gradients (the column's central
        difference needs the parameters moved along it, so columns share no forward pass)."""
        import torch

        k = V.shape[1]
        norms = self._coll.all_reduce((V.double() ** 2).sum(dim=0).to(self.device)).sqrt().tolist()
        steps = [self.step * max(1.0, self.theta_norm) / s if s > 0 else 0.0 for s in norms]
        out = torch.zeros((k, self.n_local), dtype=self.tdtype, device=self.device)
        moves = [(j, list(torch.split(V[:, j], self._split))) for j in range(k) if steps[j] > 0]
        if not moves:  # every column zero: no pass over the data
            return out
        views = self._local_views()
        saved = [x.clone() for x in views]
        grads = [p.grad for p in self.params]
        rng = torch.get_rng_state()
        mean, count = self.dataset.reduction == "mean", 0.0
        try:
            for _, batch, w in self.dataset.weighted_batches():
                x, y = _pair(batch)
                # FSDP averages gradients over ranks: world * w_b per batch, divided by the total below
                scale = float(self.world * w)
                count += float(w)
                for j, pieces in moves:
                    t = steps[j]
                    with torch.no_grad():
                        torch._foreach_copy_(views, torch._foreach_add(saved, pieces, alpha=t))
                    g = self._batch_gradient(x, y, scale)
                    with torch.no_grad():
                        torch._foreach_copy_(views, torch._foreach_add(saved, pieces, alpha=-t))
                    out[j].add_(g.sub_(self._batch_gradient(x, y, scale)), alpha=0.5 / t)
            if mean:  # the mean over all ranks' samples (sum: FSDP's average times world is the sum)
                total = float(self._coll.all_reduce(torch.tensor([count], dtype=torch.float64, device=self.device))[0])
                out.div_(total)
        except DistributedError:
            raise
        except Exception as err:
            if _is_collective_failure(err):
                raise DistributedError(
                    f"rank {self.rank} of {self.world}: an FSDP collective of a Hessian-vector product "
                    f"failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}). "
                    "Another rank probably died or stopped calling the same products. The operator is not "
                    "usable after this."
                ) from err
            raise
        finally:
            with torch.no_grad():
                torch._foreach_copy_(views, saved)
            for p, g in zip(self.params, grads):
                p.grad = g
            torch.set_rng_state(rng)
        return out

    def hvp(self, v: Any) -> Any:
        return self.ns.shard(self._columns(self.ns.local(v)[:, None])[0])

    def hvp_batch(self, V: Any) -> Any:
        return self.ns.shard(self._columns(self.ns.local(V)).T.contiguous())

    # --- vectors -----------------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        import torch

        return isinstance(x, torch.Tensor)

    def check(self, x: Any) -> None:
        if not self.ns.is_sharded(x) or x.device_mesh is not self.ns.mesh or self.ns.local(x).shape[0] != self.n_local:
            raise TypeError(
                "a native vector of an FSDP operator is a DTensor sharded like the parameters (make one "
                "with H.from_numpy or H.random); pass a numpy array for a whole vector"
            )
        super().check(x)

    def from_numpy(self, a: np.ndarray) -> Any:
        import torch

        a = np.asarray(a, dtype=self.dtype)
        if a.ndim >= 1 and a.shape[0] == self.size:
            local = torch.from_numpy(_take(a, self.ranges[self.rank])).to(self.device)
            return self.ns.shard(local)
        return self.ns.replicate(torch.from_numpy(np.ascontiguousarray(a)).to(self.device))

    def to_numpy(self, x: Any) -> np.ndarray:
        import torch

        if not self.ns.is_sharded(x):
            return arrays.to_numpy(x)
        if x.placements[0].is_replicate():
            return x.to_local().detach().cpu().numpy()
        local = self.ns.local(x).detach()
        width = max(sum(length for _, length in rr) for rr in self.ranges)
        pad = torch.zeros((width,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        self._coll._run("all-gather", self._coll.dist.all_gather, parts, pad)
        out = np.empty((self.size,) + tuple(local.shape[1:]), dtype=self.dtype)
        for r, part in enumerate(parts):
            pos, host = 0, part.cpu().numpy()
            for start, length in self.ranges[r]:
                out[start:start + length] = host[pos:pos + length]
                pos += length
        return out

    def random(self, shape: Any, kind: str, rng: np.random.Generator) -> Any:
        if not hook_installed():
            raise RuntimeError(
                "curvop.arrays has no register_namespace hook, so the algorithms cannot reduce sharded "
                "vectors across ranks (they would return each rank's local sums); this curvop build "
                "supports products (H @ v) on FSDP models but not the algorithms"
            )
        import torch

        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if shape[0] != self.size:
            return super().random(shape, kind, rng)
        local = local_probes(rng, shape, kind, self.dtype, self.ranges[self.rank])
        return self.ns.shard(torch.from_numpy(local).to(self.device))

    def agree_seed(self, seed: Any) -> Any:
        return self._coll.agree_seed(seed, self.device)

    def describe(self) -> str:
        return (f"{self.name} backend, n={self.size} ({self.n_local} on rank {self.rank} of {self.world}), "
                f"dtype={self.dtype}, central differences with step {self.step:.2g}")


#: whole probe blocks up to this many bytes are drawn at once (exactly the stream of a single-process
#: operator with the same seed); larger ones are drawn in row blocks of this size
PROBE_BLOCK_BYTES = 256 * 2**20


def _take(a: np.ndarray, ranges: list) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([a[s:s + n] for s, n in ranges]) if ranges else a[:0])


def local_probes(rng: np.random.Generator, shape: tuple, kind: str, dtype: Any, ranges: list,
                 block_bytes: int | None = None) -> np.ndarray:
    """This rank's rows of the global probe block ``random_probes(rng, shape, kind)``, in host memory
    of at most about ``block_bytes`` (default :data:`PROBE_BLOCK_BYTES`) plus the rows kept.

    Every rank draws the whole stream (the same ``rng`` everywhere) and keeps its ``ranges``
    (``(start, length)`` of global rows, ascending). A block that fits ``block_bytes`` is drawn at
    once, so the probes equal a single-process operator's with the same seed; a larger one is
    drawn in row blocks (Gaussian draws are the same stream; Rademacher signs and the ``"sphere"``
    normalisation differ from a one-shot draw but are equally distributed).

    >>> import numpy as np
    >>> g = local_probes(np.random.default_rng(0), (6, 2), "gaussian", np.float64, [(1, 2), (4, 1)])
    >>> np.array_equal(g, np.random.default_rng(0).standard_normal((6, 2))[[1, 2, 4]])
    True
    """
    n, rest = int(shape[0]), tuple(shape[1:])
    width = int(np.prod(rest)) if rest else 1
    block = PROBE_BLOCK_BYTES if block_bytes is None else int(block_bytes)
    rows = max(1, block // (8 * width))
    if rows >= n:
        return _take(arrays.random_probes(rng, shape, kind, dtype=dtype), ranges)
    draw = "gaussian" if kind == "sphere" else kind
    out = np.empty((sum(m for _, m in ranges),) + rest, dtype=np.float64 if kind == "sphere" else dtype)
    sumsq = np.zeros(rest) if kind == "sphere" else None
    where = np.concatenate([[0], np.cumsum([m for _, m in ranges])]).astype(np.int64)  # positions in out
    for a in range(0, n, rows):
        chunk = arrays.random_probes(rng, (min(rows, n - a),) + rest, draw,
                                     dtype=np.float64 if kind == "sphere" else dtype)
        if sumsq is not None:
            sumsq += (chunk.reshape(chunk.shape[0], -1) ** 2).sum(axis=0).reshape(rest)
        b = a + chunk.shape[0]
        for (start, length), at in zip(ranges, where):  # the parts of this rank's ranges inside [a, b)
            lo, hi = max(start, a), min(start + length, b)
            if lo < hi:
                out[at + lo - start:at + hi - start] = chunk[lo - a:hi - a]
    if sumsq is not None:
        out = (out * (np.sqrt(n) / np.sqrt(sumsq))).astype(dtype)
    return out


def _is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe"))


def hessian_fsdp(model: Any, loss_fn: Callable[[Any, Any], Any], data: Any, *, step: float | None = None,
                 reduction: str | None = None, timeout: float | None = None, process_group: Any = None,
                 params: Any = None, **options: Any) -> Any:
    """The FSDP2 backend of :func:`curvop.hessian` (a collective call): ``curvop.hessian(model, ...)``
    on a ``fully_shard`` model reaches it.

    Parameters
    ----------
    model : torch.nn.Module
        Wrapped with ``fully_shard`` (default placement, 1-D mesh), in eval mode for dropout and
        BatchNorm, on every rank; no ``MixedPrecisionPolicy`` coarser than the parameters (refused).
    loss_fn : callable
        ``loss_fn(model(inputs), targets)``, a scalar.
    data : (inputs, targets), or a re-iterable of them (a list, a DataLoader)
        This rank's share of the data, iterated once per product or block (every rank must yield
        the same number of batches: each backward is a collective). The operator is the Hessian of the loss over all ranks'
        data: for ``reduction="mean"`` each batch weighted by its size over the total, for
        ``"sum"`` the sum.
    step : float, optional
        The relative finite-difference step; default ``eps ** (1/3)`` of the dtype.
    reduction : {"mean", "sum"}, optional
        How the loss combines samples (default ``"mean"``).
    timeout : float, optional
        Seconds curvop's own collectives wait for the other ranks (:class:`TorchCollective`).
    process_group : ProcessGroup, optional
        The group the model is sharded over (default: the world group).

    Examples
    --------
    Under ``torchrun`` (see ``examples/fsdp_torchrun.py``)::

        fully_shard(model); model.eval()
        H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), (x_local, y_local))
        top = curvop.eigenvalues(H, k=1, tol=1e-3, seed=0)   # the same on every rank
    """
    if params is not None or options:
        given = (["params"] if params is not None else []) + sorted(options)
        raise TypeError(
            f"option(s) {', '.join(given)} are not supported for an FSDP2 model (its products are finite "
            "differences of FSDP's own gradient of all trainable parameters); the options are step=, "
            "reduction=, timeout= and process_group="
        )
    reduction = "mean" if reduction is None else reduction
    return FSDPBackend(model, loss_fn, data, step=step, reduction=reduction, timeout=timeout,
                       process_group=process_group)
