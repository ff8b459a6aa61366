"""PyTorch backend: Hessian-vector products with ``torch.func`` and ``torch.autograd``.

Two ways to compute a product, chosen with ``hvp=``:

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(loss))`` (``torch.func``);
* ``"reverse"`` -- reverse-over-reverse, a double backward through ``torch.autograd``.

and what may be kept between products, chosen with ``cache=``:

* ``cache=True`` keeps, per batch, what does not change between products: in forward mode the
  linearisation of the gradient (``torch.func.linearize``), in reverse mode the first-order graph
  (PyHessian's way). Products then cost one linear pass instead of a full forward and backward,
  at the memory cost of the saved activations (measured in ``benchmarks/hvp.py``).
* ``cache=False`` recomputes everything per product: no graph or activation outlives a product.

``"auto"`` is ``hvp="reverse"`` with ``cache=True`` for one batch and ``cache=False`` for several.
Reverse mode builds the gradient graph with two exact op rewrites (``rewrite=True``, see
:mod:`curvop.backends._torch_ops`): eval-mode BatchNorm as the affine map it is, folded into the
preceding convolution, and ``conv2d`` with fast higher derivatives on CPU. Measured by
``benchmarks/peers.py`` on a 70k-parameter CNN (BatchNorm in eval mode, batch 128, 2 CPU cores;
one gradient = 1.0, peak memory of a gradient = 1.0; docs/performance.md):

==========================  =============  ==========  =============
mode                        time per HVP   setup       peak memory
==========================  =============  ==========  =============
reverse, cached (auto)      1.4 - 1.75     ~1 HVP      1.5
forward, cached             1.8 - 2.1      20-30 grads 7.6
reverse, uncached           2.5 - 2.9      none        1.3
forward, uncached           3.7 - 4.1      none        4.2
==========================  =============  ==========  =============

With BatchNorm the default is the fastest mode and the leanest that caches. Without BatchNorm
only the convolution rewrite applies (1.28x to 1.11x a gradient in ``benchmarks/hvp.py``) and the
forward cached mode (``torch.func.linearize``) can be as cheap per product (1.03x there), but its
tracing costs 20-30 gradients up front and it keeps every linearised intermediate: ask for it
(``hvp="forward", cache=True``) for long runs on one batch. ``batched="auto"`` loops over columns
on CPU, where ``vmap`` measured slower than a loop for convolutions, and vmaps on CUDA.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, linearize, vmap

from curvop.backends._torch_ops import Rewrites
from curvop.backends.base import Backend
from curvop.backends.base import check_deterministic as assert_deterministic
from curvop.backends.dataset import Dataset, batch_size, resolve_reduction
from curvop.backends.distributed import torch_collective
from curvop.backends.faults import locate_nonfinite, nonfinite_error
from curvop.backends.selection import select

__all__ = ["TorchBackend", "hessian", "hessian_of"]

Tensor = torch.Tensor
LossFn = Callable[[dict[str, Tensor], Any], Tensor]


class TorchBackend(Backend):
    """Products of the Hessian of ``loss(params, batch)`` over a :class:`Dataset`.

    Parameters
    ----------
    loss : callable
        ``loss(params, batch)`` with ``params`` a dict name -> tensor; returns a scalar tensor.
    params : dict of tensors
        The point at which the Hessian is taken (all on one device, one floating dtype).
    dataset : Dataset
    hvp : {"auto", "forward", "reverse"}
    cache : {"auto", True, False}
        ``"auto"`` caches when the data is a single batch.
    batched : {"auto", True, False}
        Whether ``hvp_batch`` vmaps over the columns (``True``) or loops (``False``); ``"auto"``
        vmaps on CUDA and loops on CPU, where ``vmap`` measured slower than a loop.
    check_deterministic : bool
        Compare two products with the same vector when the operator is built.
    process_group : None, False or ProcessGroup
        Data-parallel products (:mod:`curvop.backends.distributed`): each rank multiplies over its
        shard of the data and the results are all-reduced. ``None`` uses the world group when
        ``torch.distributed`` is initialised with several ranks; ``False`` never reduces.
    timeout : float, optional
        Seconds a collective may wait for the other ranks before a ``DistributedError``.
    check_finite : bool
        Check each product for NaN/Inf (one reduction and host sync per product); when it is not
        finite, recompute batch by batch and raise ``NonFiniteProductError`` naming the batch.
    rewrite : bool
        In reverse mode, build the loss with eval-mode BatchNorm as the affine map it is and, on
        CPU, ``conv2d`` with faster second derivatives in the layers where that was measured
        faster (BatchNorm folded into those; :mod:`curvop.backends._torch_ops`): the same
        function, products equal to rounding. ``False`` keeps torch's own ops. Attention and
        ``hardsigmoid``, which torch cannot differentiate twice, are rewritten either way.
    """

    name = "torch"

    def __init__(
        self,
        loss: LossFn,
        params: dict[str, Tensor],
        dataset: Dataset,
        *,
        hvp: str = "auto",
        cache: bool | str = "auto",
        batched: bool | str = "auto",
        check_deterministic: bool = True,
        process_group: Any = None,
        timeout: float | None = None,
        check_finite: bool = True,
        rewrite: bool = True,
    ):
        if not params:
            raise ValueError("no parameters selected: the Hessian would be empty")
        self._loss = loss
        self._params = {k: _check_param(k, p).detach() for k, p in params.items()}
        devices = {p.device for p in self._params.values()}
        if len(devices) > 1:
            raise ValueError(
                f"parameters are on several devices ({', '.join(sorted(map(str, devices)))}); curvop needs "
                "them on one device: move the model with model.to(device)"
            )
        dtypes = {p.dtype for p in self._params.values()}
        if len(dtypes) > 1:
            raise TypeError(
                f"parameters have mixed dtypes ({', '.join(sorted(map(str, dtypes)))}); convert the model "
                "to one dtype first, e.g. model.double() or model.float()"
            )
        self.device = devices.pop()
        self.torch_dtype = dtypes.pop()
        self.dtype = np.dtype(str(self.torch_dtype).replace("torch.", ""))
        self._names = list(self._params)
        self._shapes = [p.shape for p in self._params.values()]
        self._numels = [p.numel() for p in self._params.values()]
        self.size = int(sum(self._numels))
        self.dataset = dataset
        self.check_finite = bool(check_finite)
        self._dist = torch_collective(process_group, timeout)
        if self._dist is not None:
            self._dist.check_consistent(self.size, self._params, self.device)

        _check_scalar_loss(loss, self._params, self._to_device(dataset.first()))
        if hvp == "auto":
            hvp = "reverse"  # measured fastest with and without a cache (module docstring)
        if hvp not in ("forward", "reverse"):
            raise ValueError(f"hvp must be 'forward', 'reverse' or 'auto', got {hvp!r}")
        self.mode = hvp
        self.rewrite = bool(rewrite) and hvp == "reverse"
        if batched == "auto":
            batched = self.device.type == "cuda"
        self.batched = bool(batched)
        if check_deterministic:
            v = self.random(self.size, "gaussian", np.random.default_rng(0))
            assert_deterministic(lambda u: self._finite(self._sum(u, self._fresh), u, False, fresh=True), v,
                                   self.dtype)
        self.cache = dataset.single if cache == "auto" else bool(cache)
        self._cached: list[tuple[Callable[[Tensor, bool], Tensor], int]] | None = None
        if self.cache:
            single_weight = dataset.single and (self._dist is None or dataset.data is None)
            self._cached = [(self._linear_map(self._to_device(b)), 1 if single_weight else batch_size(b))
                            for b in dataset.batches()]
            if not self._cached:
                raise ValueError("data is empty: the data loader yielded no batches")

    # --- the contract ----------------------------------------------------------------------------
    def hvp(self, v: Tensor) -> Tensor:
        y = self._sum(v, self._fresh) if self._cached is None else self._sum_cached(v, False)
        return self._finite(y, v, False)

    def hvp_batch(self, v: Tensor) -> Tensor:
        if not self.batched:
            return super().hvp_batch(v)
        try:
            if self._cached is not None:
                y = self._sum_cached(v, True)
            else:
                y = self._sum(v, lambda u, batch: self._fresh(u, batch, True))
        except (RuntimeError, NotImplementedError) as err:  # an op without a batching rule
            warnings.warn(f"batched products failed ({err}); falling back to one product per column", stacklevel=3)
            self.batched = False
            return super().hvp_batch(v)
        return self._finite(y, v, True)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def check(self, x: Tensor) -> None:
        if x.dtype != self.torch_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype}, but the parameters are {self.torch_dtype}; "
                f"convert it with x.to({self.torch_dtype})"
            )
        if x.device != self.device:
            raise ValueError(
                f"vector is on {x.device}, but the parameters are on {self.device}; move it with x.to('{self.device}')"
            )

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, a: np.ndarray) -> Tensor:
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a).to(device=self.device, dtype=self.torch_dtype)

    def describe(self) -> str:
        cache = "cached" if self._cached is not None else "uncached"
        ranks = f", data-parallel over {self._dist.world} ranks" if self._dist is not None else ""
        return f"torch {self.mode} mode, {cache}, n={self.size}, {self.torch_dtype} on {self.device}{ranks}"

    # --- products ---------------------------------------------------------------------------------
    def _sum(self, v: Tensor, product: Callable[[Tensor, Any], Tensor]) -> Tensor:
        if self._dist is not None:  # unnormalised local sum and count, then one all-reduce
            acc, count = self.dataset.partial_sum(lambda batch: product(v, self._to_device(batch)))
            return self._dist.reduce_product(acc, count, self.dataset.reduction)
        return self.dataset.weighted_sum(lambda batch: product(v, self._to_device(batch)))

    def _sum_cached(self, v: Tensor, batched: bool) -> Tensor:
        assert self._cached is not None
        if len(self._cached) == 1 and self._dist is None:
            return self._cached[0][0](v, batched)
        acc, total = None, 0
        for fn, nb in self._cached:
            p = fn(v, batched)
            if self.dataset.reduction == "mean":
                p, total = p * nb, total + nb
            acc = p if acc is None else acc.add_(p)
        if self._dist is not None:
            return self._dist.reduce_product(acc, total, self.dataset.reduction)
        return acc / total if self.dataset.reduction == "mean" else acc

    def _finite(self, y: Tensor, v: Tensor, batched: bool, fresh: bool = False) -> Tensor:
        """``y`` if it is finite (one sync); else the error naming the first non-finite batch."""
        if not self.check_finite or bool(torch.isfinite(y).all()):
            return y
        finite = lambda p: bool(torch.isfinite(p).all())  # noqa: E731
        if not fresh and self._cached is not None:
            bad = locate_nonfinite((fn(v, batched) for fn, _ in self._cached), finite)
        else:
            batches = (self._fresh(v, self._to_device(b), batched) for b in self.dataset.batches())
            bad = locate_nonfinite(batches, finite)
        culprits: list[int | None] = [bad]
        if self._dist is not None:  # every rank sees the reduced NaN and takes this path together
            culprits = [None if i < 0 else i for i in self._dist.gather_ints(-1 if bad is None else bad, self.device)]
        raise nonfinite_error(culprits, self.dataset.single)

    def _fresh(self, v: Tensor, batch: Any, batched: bool = False) -> Tensor:
        """One uncached product (or ``(n, k)`` block) on one batch."""
        if self.mode == "forward":
            grad_fn = grad(lambda p: self._eval(p, batch))
            one = lambda u: self._flat(jvp(grad_fn, (self._params,), (self._split(u),))[1])  # noqa: E731
            return vmap(one, in_dims=1, out_dims=1)(v) if batched else one(v)
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        g = self._graph(p, batch)
        return self._reverse_product(g, list(p.values()), v, batched, retain=False)

    def _linear_map(self, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        """What stays fixed between products on ``batch``, as a function of the vector."""
        if self.mode == "forward":
            with warnings.catch_warnings():  # torch.fx const-folding chatter, harmless
                warnings.simplefilter("ignore", UserWarning)
                _, lin = linearize(grad(lambda p: self._eval(p, batch)), self._params)
            one = lambda u: self._flat(lin(self._split(u)))  # noqa: E731
            return lambda v, batched: vmap(one, in_dims=1, out_dims=1)(v) if batched else one(v)
        p = [t.detach().requires_grad_(True) for t in self._params.values()]
        g = self._graph(dict(zip(self._names, p)), batch)
        return lambda v, batched: self._reverse_product(g, p, v, batched, retain=True)

    def _graph(self, p: dict[str, Tensor], batch: Any) -> tuple[Tensor | None, ...]:
        """The gradient at ``p`` on ``batch``, with the graph that reverse-mode products differentiate."""
        with torch.enable_grad():
            loss = self._eval(p, batch)
        with torch.enable_grad():
            return torch.autograd.grad(loss, list(p.values()), create_graph=True, allow_unused=True)

    def _eval(self, p: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss, under the op rewrites (:mod:`curvop.backends._torch_ops`): always the ops torch
        cannot differentiate twice (attention, hardsigmoid, ...); with ``rewrite`` the fast ones."""
        with Rewrites(conv="auto" if self.device.type == "cpu" else False, fast=self.rewrite):
            return self._loss(p, batch)

    def _reverse_product(self, g, p, v: Tensor, batched: bool, retain: bool) -> Tensor:
        live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        if batched:
            parts = [t.view(v.shape[1], *s) for t, s in zip(torch.split(v.T, self._numels, dim=1), self._shapes)]
        else:
            parts = self._split(v).values()
        parts = list(parts)
        with torch.enable_grad():
            hv = torch.autograd.grad([g[i] for i in live], p, grad_outputs=[parts[i] for i in live],
                                     retain_graph=retain, allow_unused=True, is_grads_batched=batched)
        if batched:
            k = v.shape[1]
            return torch.cat([_zero_if_none(h, (k, n), v).reshape(k, n) for h, n in zip(hv, self._numels)], 1).T
        return self._flat(dict(zip(self._names, hv)))

    # --- flattening -------------------------------------------------------------------------------
    def _split(self, v: Tensor) -> dict[str, Tensor]:
        return {k: t.view(s) for k, t, s in zip(self._names, torch.split(v, self._numels), self._shapes)}

    def _flat(self, tree: dict[str, Tensor | None]) -> Tensor:
        ref = next(iter(self._params.values()))
        return torch.cat([_zero_if_none(tree[k], (n,), ref).reshape(-1) for k, n in zip(self._names, self._numels)])

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch if batch.device == self.device else batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(b) for k, b in batch.items()}
        return batch



def _zero_if_none(t: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if t is None else t


def _check_param(name: str, p: Any) -> Tensor:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
    if not p.is_floating_point():
        raise TypeError(
            f"parameter {name!r} has dtype {p.dtype}; the Hessian needs floating-point parameters "
            "(convert it with .double() or .float(), or leave it out of params)"
        )
    return p


def _check_scalar_loss(loss: LossFn, params: dict[str, Tensor], batch: Any) -> None:
    with torch.no_grad():
        value = loss(params, batch)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the loss must return a torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar, but it returned shape {tuple(value.shape)}; use a reduced loss "
            "(reduction='mean' or 'sum'), not reduction='none'"
        )
    if not value.is_floating_point():
        raise TypeError(f"the loss has dtype {value.dtype}; it must be floating point")
    if not torch.isfinite(value).all():
        raise FloatingPointError("the loss is NaN or Inf on the first batch; check the data and the model")


def _check_module(model: torch.nn.Module) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    for name, m in model.named_modules():
        if m.training and isinstance(m, (_BatchNorm, _DropoutNd)):
            kind = "BatchNorm" if isinstance(m, _BatchNorm) else "dropout"
            raise ValueError(
                f"{kind} layer {name or type(m).__name__!r} is in training mode, so products would "
                f"{'use batch statistics and update the running statistics' if kind == 'BatchNorm' else 'drop random units'}"
                "; call model.eval() before building the Hessian"
            )


def _select(model: torch.nn.Module, params: Any) -> dict[str, Tensor]:
    return select(dict(model.named_parameters()), params, default=lambda k, p: p.requires_grad,
                  is_leaf=lambda x: isinstance(x, torch.Tensor))


def hessian(
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Any,
    *,
    params: Any = None,
    reduction: str | None = None,
    **options: Any,
) -> TorchBackend:
    """Torch backend for :func:`curvop.hessian`.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode if it has BatchNorm or dropout layers.
    loss_fn : callable
        ``loss_fn(model(inputs), targets)`` -> scalar tensor.
    data : batch ``(inputs, targets)`` or a re-iterable of batches
        ``inputs`` may be a tensor, a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
    params : None, names, parameters, or a predicate on names
        ``None``: every parameter with ``requires_grad``. A name selects that parameter, or every
        parameter of the module with that name (``"fc1"`` -> ``fc1.weight``, ``fc1.bias``). The
        others are held fixed. A selected parameter the loss does not use gives zero rows.
    reduction : {"mean", "sum"}, optional
        How the loss reduces over samples; read from ``loss_fn.reduction`` when not given
        (default ``"mean"``). Decides the weighting of batches (see :func:`curvop.hessian`).
    **options
        ``hvp``, ``cache``, ``batched``, ``check_deterministic``, ``process_group``, ``timeout``,
        ``check_finite``, ``rewrite``: see :class:`TorchBackend`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module  # the wrapped model; curvop does its own all-reduce of products
    _check_module(model)
    selected = _select(model, params)
    consts = {k: p.detach() for k, p in model.named_parameters() if k not in selected}
    consts.update(model.named_buffers())

    def loss(p: dict[str, Tensor], batch: Any) -> Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("each batch must be a pair (inputs, targets)")
        inputs, targets = batch
        if isinstance(inputs, dict):
            out = functional_call(model, (p, consts), (), inputs)
        else:
            out = functional_call(model, (p, consts), tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,))
        return loss_fn(out, targets)

    return TorchBackend(loss, selected, Dataset(data, resolve_reduction(loss_fn, reduction)), **options)


def hessian_of(f: Callable[..., Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> TorchBackend:
    """Torch backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is a tensor, a list/tuple of tensors or a dict of tensors; ``f`` receives the same
    structure (fresh tensors at the same values) and must compute with it.
    """
    if isinstance(params, torch.Tensor):
        flat, rebuild = {"0": params}, lambda d: d["0"]
    elif isinstance(params, dict):
        flat, rebuild = dict(params), lambda d: d
    elif isinstance(params, (list, tuple)):
        kind = type(params)
        flat = {str(i): p for i, p in enumerate(params)}
        rebuild = lambda d: kind(d[str(i)] for i in range(len(flat)))  # noqa: E731
    else:
        raise TypeError(f"params must be a tensor or a list/tuple/dict of tensors, got {type(params).__name__}")

    if data is None:
        loss = lambda p, batch: f(rebuild(p))  # noqa: E731
    else:
        loss = lambda p, batch: f(rebuild(p), batch)  # noqa: E731
    return TorchBackend(loss, flat, Dataset(data, reduction), **options)
