"""PyTorch backend: Hessian-vector products with ``torch.func`` and ``torch.autograd``.

Only the autodiff lives here; the options, checks, dataset loop, NaN location and data-parallel
reduction are the template's (:class:`curvop.backends.template.AutodiffBackend`), the model
adapter is :mod:`curvop.backends._torch_model`. Two ways to compute a product (``hvp=``):

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(loss))`` (``torch.func``; ``vmap`` for blocks);
* ``"reverse"`` -- reverse-over-reverse, a double backward through ``torch.autograd``.

``cache=True`` keeps, per batch, what does not change between products: in forward mode the
linearisation of the gradient (``torch.func.linearize``), in reverse mode the first-order graph.
Products then cost one linear pass instead of a full forward and backward, at the memory cost of
the saved activations. ``"auto"`` is ``hvp="reverse"``, cached for one batch, ``batched`` on CUDA
only. Reverse mode builds the gradient graph with exact op rewrites (``rewrite=True``,
:mod:`curvop.backends._torch_ops`). Measured costs of every mode: ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch.func import grad, jvp, linearize, vmap

from curvop._dtypes import dtype_name
from curvop.backends._torch_model import function_problem, model_problem
from curvop.backends._torch_ops import Rewrites
from curvop.backends._torch_state import LOCK, FixedRandomness, as_batch, batch_seed
from curvop.backends._torch_state import check_autograd_available, inference_mode_error
from curvop.backends.dataset import Dataset
from curvop.backends.distributed import torch_collective
from curvop.backends.template import AutodiffBackend, LossInfo, ParamInfo

__all__ = ["TorchBackend", "batch_seed", "hessian", "hessian_of"]

Tensor = torch.Tensor
LossFn = Callable[[dict[str, Tensor], Any], Tensor]
_NULL = contextlib.nullcontext()


class TorchBackend(AutodiffBackend):
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
        CPU, ``conv2d`` with faster second derivatives where that was measured faster: the same
        function, products equal to rounding. ``False`` keeps torch's own ops. Attention and
        ``hardsigmoid``, which torch cannot differentiate twice, are rewritten either way.
    check_loss_dtype : bool
        Raise :class:`~curvop.backends.base.LossPrecisionError` when the loss has a lower
        precision than the parameters (a float32 loss of a float64 model).
    watch, on_change, check_state
        The model adapter's hooks: tensors besides ``params`` (buffers) whose in-place change
        (``_version``) calls ``on_change()`` and rebuilds cached graphs; ``check_state()`` runs
        right after the first evaluation of the loss.
    rng_seed : int, numpy Generator or None
        Evaluate the loss on batch ``i`` under ``torch.random.fork_rng`` with torch's generator
        seeded by :func:`batch_seed`: random ops (dropout) draw the same numbers in every product
        and the user's RNG state is untouched. A numpy ``Generator`` is a drawn seed (data-parallel:
        rank 0's draw is used everywhere); an int must be the same on every rank.

    Notes
    -----
    The operator is the Hessian at the parameters *as they are now*: in-place updates (an
    ``optimizer.step()``, ``load_state_dict``) are followed in every mode, cached graphs and
    linearisations being rebuilt at the next product when a parameter's version counter moved.
    """

    name = "torch"
    batch_errors = (RuntimeError, NotImplementedError)  # an op without a batching rule

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
        check_loss_dtype: bool = True,
        watch: list[Tensor] = (),
        on_change: Callable[[], None] | None = None,
        check_state: Callable[[], None] | None = None,
        rng_seed: int | np.random.Generator | None = None,
    ):
        check_autograd_available()
        for k, p in params.items():
            _check_param(k, p)
        self._begin(dataset, [ParamInfo(k, dtype_name(p.dtype) if p.is_floating_point() else str(p.dtype),
                                        str(p.device), p.is_floating_point()) for k, p in params.items()],
                    hvp=hvp, cache=cache, batched=batched, check_deterministic=check_deterministic,
                    check_finite=check_finite, rewrite=rewrite, check_loss_dtype=check_loss_dtype)
        self._params = {k: p.detach() for k, p in params.items()}
        ref = next(iter(self._params.values()))
        self.device, self.torch_dtype = ref.device, ref.dtype
        self.dtype = np.dtype(dtype_name(ref.dtype))
        self._layout = _Layout(self._params)
        self.size = int(sum(self._layout.numels))
        self._collective = torch_collective(process_group, timeout)
        if self._collective is not None:
            self._collective.check_consistent(self.size, self._params, self.device)
        self._loss, self._rng, self._check_state, self._rewrite = loss, None, check_state, bool(rewrite)
        if rng_seed is not None:
            self._rng = FixedRandomness(self._agree_rng_seed(rng_seed), self.device,
                                        0 if self._collective is None else self._collective.rank)
            self._loss = self._rng.wrap(loss)
        self._randomness = "error" if self._rng is None else "same"  # vmap: one mask for every column
        #: The base seed of the training-mode draws (``None`` in eval mode): batch ``i`` ran under
        #: ``torch.manual_seed(batch_seed(train_seed, i))``; log it to reproduce the masks.
        self.train_seed = None if self._rng is None else self._rng.seed
        self._watch = [*self._params.values(), *watch]
        self._on_change, self._state_lock = on_change, threading.Lock()
        self._versions = [t._version for t in self._watch]
        self._complete(self._first_loss(), check_loss_dtype)

    # --- the template's hooks --------------------------------------------------------------------
    def _first_loss(self) -> LossInfo:
        """The loss on the first batch, for the template's checks (and autograd's own one here)."""
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        with torch.enable_grad():
            value = self._loss(p, self._prepare_batch(self.dataset.first()))
        if not isinstance(value, torch.Tensor):
            return LossInfo(False, type(value).__name__, (), "", False)
        floating = value.is_floating_point()
        finite = bool(torch.isfinite(value).all()) if floating and value.numel() == 1 else None
        if finite and not value.requires_grad:
            raise ValueError(
                "the loss does not depend on the parameters through autograd, so its Hessian would be 0: "
                "does the loss or the model call .detach(), .item(), .numpy() or run under torch.no_grad()? "
                "(If the selected parameters are truly unused, their Hessian is 0; select others with params=.)"
            )
        return LossInfo(True, "Tensor", tuple(value.shape), dtype_name(value.dtype) if floating else str(value.dtype),
                        floating, finite)

    def _resolved(self) -> None:
        if self._check_state is not None:
            self._check_state()
        self.rewrite = self._rewrite and self.mode == "reverse"

    def _auto_options(self) -> dict[str, Any]:
        # reverse measured fastest with and without a cache; vmap measured slower than a loop on CPU
        return {"hvp": "reverse", "cache": self.dataset.single, "batched": self.device.type == "cuda"}

    def _param_advice(self) -> dict[str, str]:
        return {"dtype_fix": "convert the model to one dtype first, e.g. model.double() or model.float()",
                "device_fix": "move the model with model.to(device)",
                "float_fix": "convert it with .double() or .float(), or leave it out of params",
                "half_fix": "convert the model with model.float() (or model.double()), on a copy "
                            "(copy.deepcopy(model).float()) to keep the 16-bit one"}

    def _loss_type(self) -> str:
        return "torch.Tensor"

    def _reduce_advice(self) -> str:
        return "use a reduced loss (reduction='mean' or 'sum'), not reduction='none'"

    def _precision_message(self, loss_dtype: str) -> str:
        return (f"the loss value is torch.{loss_dtype}, but the parameters are {self.torch_dtype}: the Hessian would "
                "silently lose digits (a float32 loss gives about 1e-8 relative accuracy instead of 1e-16). Compute "
                "the loss in the model's dtype: no .float() on the logits (Hugging Face causal-LM losses upcast with "
                ".float(): compute the loss yourself from out.logits with a loss_fn), no float32 constants. Pass "
                "check_loss_dtype=False to accept the lower precision.")

    def _agree_rng_seed(self, seed: int | np.random.Generator) -> int:
        """The base seed of ``train_mode``: the same on every rank (rank 0's draw, or the checked int)."""
        if self._collective is None:
            return seed if isinstance(seed, int) else int(seed.integers(2**62))
        agreed = self._collective.agree_seed(seed, self.device)  # raises when fixed seeds differ across ranks
        return seed if isinstance(seed, int) else int(agreed.integers(2**62))

    def _batch_context(self, index: int, cached: bool) -> Any:
        """Batch ``index`` under its ``train_mode`` seed; a cached reverse graph holds its mask already."""
        if self._rng is None:
            return _NULL
        if cached:  # a forward linearisation re-runs its random ops per product
            return self._rng.fixed(index) if self.mode == "forward" else _NULL
        return as_batch(index)

    def _follow(self) -> None:
        """Follow in-place changes of the parameters and buffers since the last product (no sync)."""
        if torch.is_inference_mode_enabled():
            raise inference_mode_error("a Hessian-vector product")
        if [t._version for t in self._watch] == self._versions:
            return
        with self._state_lock:
            versions = [t._version for t in self._watch]
            if versions == self._versions:
                return
            if self._on_change is not None:
                self._on_change()
            if self._cached is not None:
                self._cached = self._build_cache()
            self._versions = versions

    def _add(self, acc: Tensor, p: Tensor) -> Tensor:
        return acc.add_(p)

    def _all_finite(self, y: Tensor) -> bool:
        return bool(torch.isfinite(y).all())

    def _prepare_batch(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch if batch.device == self.device else batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._prepare_batch(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self._prepare_batch(b) for k, b in batch.items()}
        return batch

    # --- the contract ----------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def check(self, x: Tensor) -> None:
        if x.dtype != self.torch_dtype:
            raise TypeError(f"vector has dtype {x.dtype}, but the parameters are {self.torch_dtype}; "
                            f"convert it with x.to({self.torch_dtype})")
        if x.device != self.device:
            raise ValueError(f"vector is on {x.device}, but the parameters are on {self.device}; "
                             f"move it with x.to('{self.device}')")

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, a: np.ndarray) -> Tensor:
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a).to(device=self.device, dtype=self.torch_dtype)

    def describe(self) -> str:
        cache = "cached" if self._cached is not None else "uncached"
        if self._rng is not None:
            cache += f", training mode (seed {self._rng.seed})"
        c = self._collective
        ranks = f", data-parallel over {c.world} ranks" if c is not None else ""
        return f"torch {self.mode} mode, {cache}, n={self.size}, {self.torch_dtype} on {self.device}{ranks}"

    # --- products --------------------------------------------------------------------------------
    def _product(self, v: Tensor, batch: Any, batched: bool) -> Tensor:
        """One uncached product (or ``(n, k)`` block) on one batch."""
        if self.mode == "forward":
            grad_fn = grad(lambda p: self._eval(p, batch))
            split, flat = self._layout.split, self._layout.flat
            one = lambda u: flat(jvp(grad_fn, (self._params,), (split(u),))[1])  # noqa: E731
            with LOCK:  # forward-AD levels are process-wide
                return vmap(one, in_dims=1, out_dims=1, randomness=self._randomness)(v) if batched else one(v)
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        return _reverse_product(self._layout, self._graph(p, batch), list(p.values()), v, batched, retain=False)

    def _linearize(self, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        """What stays fixed between products on ``batch``, as a function of the vector (no ref. to self)."""
        if self.mode == "forward":
            with warnings.catch_warnings(), LOCK:  # torch.fx const-folding chatter, harmless
                warnings.simplefilter("ignore", UserWarning)
                _, lin = linearize(grad(lambda p: self._eval(p, batch)), self._params)
            return partial(_linearized_product, self._layout, lin, randomness=self._randomness)
        p = [t.detach().requires_grad_(True) for t in self._params.values()]
        return partial(_reverse_product, self._layout, self._graph(dict(zip(self._layout.names, p)), batch), p,
                       retain=True)

    def _graph(self, p: dict[str, Tensor], batch: Any) -> tuple[Tensor | None, ...]:
        """The gradient at ``p`` on ``batch``, with the graph that reverse-mode products differentiate."""
        with torch.enable_grad():
            loss = self._eval(p, batch)
            return torch.autograd.grad(loss, list(p.values()), create_graph=True, allow_unused=True)

    def _eval(self, p: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss, under the op rewrites (:mod:`curvop.backends._torch_ops`): always the ops torch
        cannot differentiate twice (attention, hardsigmoid, ...); with ``rewrite`` the fast ones."""
        with Rewrites(conv="auto" if self.device.type == "cpu" else False, fast=self.rewrite):
            return self._loss(p, batch)


class _Layout:
    """Names, shapes and sizes of the parameters: flat vector <-> dict of tensors.

    Cached products hold this, never the backend, so ``del H`` frees graphs at once (no cycle).
    """

    def __init__(self, params: dict[str, Tensor]):
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        ref = next(iter(params.values()))
        self.dtype, self.device = ref.dtype, ref.device

    def split(self, v: Tensor) -> dict[str, Tensor]:
        return {k: t.view(s) for k, t, s in zip(self.names, torch.split(v, self.numels), self.shapes)}

    def flat(self, tree: dict[str, Tensor | None]) -> Tensor:
        return torch.cat([
            (torch.zeros(n, dtype=self.dtype, device=self.device) if tree[k] is None else tree[k]).reshape(-1)
            for k, n in zip(self.names, self.numels)
        ])


def _reverse_product(layout: _Layout, g, p, v: Tensor, batched: bool, retain: bool) -> Tensor:
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    if batched:
        parts = [t.view(v.shape[1], *s) for t, s in zip(torch.split(v.T, layout.numels, dim=1), layout.shapes)]
    else:
        parts = list(layout.split(v).values())
    with torch.enable_grad():
        hv = torch.autograd.grad([g[i] for i in live], p, grad_outputs=[parts[i] for i in live],
                                 retain_graph=retain, allow_unused=True, is_grads_batched=batched)
    if not batched:
        return layout.flat(dict(zip(layout.names, hv)))
    k = v.shape[1]
    return torch.cat([(v.new_zeros((k, n)) if h is None else h).reshape(k, n) for h, n in zip(hv, layout.numels)], 1).T


def _linearized_product(layout: _Layout, lin: Callable[[Any], Any], v: Tensor, batched: bool,
                        randomness: str = "error") -> Tensor:
    one = lambda u: layout.flat(lin(layout.split(u)))  # noqa: E731
    with LOCK:  # a linearisation replays torch.func transforms, whose levels are process-wide
        return vmap(one, in_dims=1, out_dims=1, randomness=randomness)(v) if batched else one(v)


def _check_param(name: str, p: Any) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
    if p.is_inference():
        raise RuntimeError(
            f"parameter {name!r} is an inference tensor (created under torch.inference_mode()), which autograd "
            "cannot differentiate; create or load the model outside torch.inference_mode()"
        )


def hessian(
    model: torch.nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor] | None,
    data: Any,
    *,
    params: Any = None,
    reduction: str | None = None,
    batch_weight: Callable[[Any], Any] | None = None,
    **options: Any,
) -> TorchBackend:
    """Torch backend for :func:`curvop.hessian`.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode if it has BatchNorm or dropout layers, or any layer whose forward updates its
        buffers in training mode (InstanceNorm with running stats, spectral_norm), unless
        ``train_mode=True``. Products run on copies of its buffers: the model is never changed.
    loss_fn : callable or None
        ``loss_fn(model(inputs), targets)`` -> scalar tensor. ``None``: the model computes its own
        loss (Hugging Face style): each batch is passed as ``model(**batch)`` (a dict),
        ``model(*batch)`` (a tuple) or ``model(batch)`` (a tensor), and the loss is the output's
        ``.loss``, its ``["loss"]``, or the output itself if it is a scalar tensor.
    data : batch ``(inputs, targets)`` or a re-iterable of batches
        ``inputs`` may be a tensor, a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
        With ``loss_fn=None`` a batch is a dict, a tuple or a tensor.
    params : None, names, parameters, or a predicate on names
        ``None``: every parameter with ``requires_grad``. A name selects that parameter, or every
        parameter of the module with that name (``"fc1"`` -> ``fc1.weight``, ``fc1.bias``). The
        others are held fixed. A selected parameter the loss does not use gives zero rows.
    reduction : {"mean", "sum"}, optional
        How the loss reduces over samples; read from ``loss_fn.reduction`` when not given
        (default ``"mean"``). Decides the weighting of batches (see :func:`curvop.hessian`). Over
        several batches a loss without ``.reduction`` (a lambda) needs it.
    batch_weight : callable, optional
        ``batch_weight(batch)``: what a mean-reduced loss averages over in ``batch``, for the
        weighting of several batches (default: the batch size; for ``CrossEntropyLoss`` and
        ``NLLLoss`` the sum of the targets' class weights, ignored targets left out).
    train_mode : bool
        ``False`` (default): a layer in training mode is refused. ``True``: the Hessian of the
        training-mode loss of each batch, layers in the mode they are in (curvop never calls
        ``model.train()`` or ``.eval()``): normalisation layers in training mode use the batch's
        statistics and their running statistics are neither read nor written; random ops
        (dropout) draw one fixed mask per batch, the same in every product, so the operator is
        deterministic and symmetric. Other layers that write buffers in training mode
        (``spectral_norm``) and ``SyncBatchNorm`` are still refused.
    seed : int, torch.Generator, numpy Generator or None
        With ``train_mode=True``: batch ``i`` (in the order the data yields it) runs under
        ``torch.manual_seed(batch_seed(seed, i))`` inside ``torch.random.fork_rng``, so the user's
        RNG state is untouched. A generator is drawn from once. ``None``: drawn from torch's
        global generator without advancing it (reproducible under ``torch.manual_seed``). The
        seed used is ``H.backend.train_seed``.
    **options
        ``hvp``, ``cache``, ``batched``, ``check_deterministic``, ``process_group``, ``timeout``,
        ``check_finite``, ``rewrite``, ``check_loss_dtype``: see :class:`TorchBackend`.

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Linear(3, 2).double()
    >>> batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    >>> curvop.hessian(model, torch.nn.CrossEntropyLoss(), batch).shape
    (8, 8)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
    ...                           torch.nn.Linear(4, 2)).double().train()
    >>> H = curvop.hessian(net, torch.nn.CrossEntropyLoss(), batch, train_mode=True, seed=0)
    >>> v = torch.ones(H.shape[0], dtype=torch.float64)
    >>> bool(torch.equal(H @ v, H @ v)), net.training
    (True, True)
    """
    problem = model_problem(model, loss_fn, data, params=params, reduction=reduction, batch_weight=batch_weight,
                            options=options, valid=_valid_options())
    return TorchBackend(**problem, **options)


def hessian_of(f: Callable[..., Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> TorchBackend:
    """Torch backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is a tensor, a list/tuple of tensors or a dict of tensors; ``f`` receives the same
    structure (fresh tensors at the same values) and must compute with it.
    """
    problem = function_problem(f, params, data, reduction=reduction, options=options, valid=_valid_options())
    return TorchBackend(**problem, **options)


def _valid_options() -> list[str]:
    internal = {"self", "loss", "params", "dataset", "watch", "on_change", "check_state", "rng_seed"}
    return [k for k in inspect.signature(TorchBackend.__init__).parameters if k not in internal]
