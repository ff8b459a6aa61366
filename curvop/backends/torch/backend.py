"""PyTorch backend: Hessian-vector products with ``torch.func`` and ``torch.autograd``.

Only the autodiff lives here. The options, checks, dataset loop, NaN location and data-parallel
reduction are the template's (:class:`curvop.backends.template.AutodiffBackend`); the model
adapter and the factories are :mod:`curvop.backends.torch.model`. A product is (``hvp=``)
``"forward"``, ``jvp(grad(loss))`` with ``torch.func`` (``vmap`` for blocks), or ``"reverse"``, a
double backward through ``torch.autograd``. ``cache=True`` keeps per batch what does not change
between products: the linearisation of the gradient (``torch.func.linearize``) or the first-order
graph, so a product is one linear pass. ``"auto"``: reverse, cached for one batch, ``batched`` on
CUDA only. Reverse mode uses exact op rewrites (:mod:`curvop.backends.torch.rewrites`). What each mode
costs: ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from curvop._dtypes import dtype_name, precision_bits
from curvop.backends.dataset import map_batch
from curvop.backends.torch.checks import TorchAdvice, loss_info, param_infos
from curvop.backends.torch.context import PrecisionWatch, build_time, mode_failure, no_second_derivative
from curvop.backends.torch.linearize import UnsafeLinearization, linearize
from curvop.backends.torch.model import factories
from curvop.backends.torch.rewrites import Rewrites
from curvop.backends.torch.state import LOCK, batch_seed, check_autograd_available, inference_mode_error
from curvop.backends.torch.state import train_randomness
from curvop.backends.dataset import Dataset
from curvop.backends.torch.distributed import torch_collective
from curvop.backends.template import AutodiffBackend

__all__ = ["TorchBackend", "batch_seed", "hessian", "hessian_of"]

Tensor = torch.Tensor
_NULL = contextlib.nullcontext()


class TorchBackend(TorchAdvice, AutodiffBackend):
    """Products of the Hessian of ``loss(params, batch)`` (``params``: a dict name -> tensor, all on
    one device, float32 or float64) over a :class:`Dataset`.

    Parameters
    ----------
    hvp : {"auto", "forward", "reverse"}
    cache : {"auto", True, False}
        ``"auto"`` caches when the data is a single batch.
    batched : {"auto", True, False}
        Whether ``hvp_batch`` vmaps over the columns; ``"auto"``: on CUDA (a loop measured faster on CPU).
    check_deterministic : bool
        Compare two products with the same vector when the operator is built.
    check_symmetric : bool or None
        Compare ``u·(Hw)`` with ``w·(Hu)`` when the operator is built and raise
        :class:`~curvop.AsymmetricHessianError`, naming the parameters, when an op's second
        derivative is wrong (:mod:`curvop.backends.selfcheck`; no product more than
        ``check_deterministic``). ``None`` (default): as ``check_deterministic``.
    verify : bool
        Also compare ``H v`` with central differences of the gradient (one product and four
        gradients) and raise :class:`~curvop.VerificationError` when they disagree; ``H.verify()``
        gives the comparison per parameter at any time.
    process_group : None, False or ProcessGroup
        Data-parallel products (:mod:`curvop.backends.torch.distributed`): each rank multiplies over its
        shard of the data and the results are all-reduced. ``None`` uses the world group when
        ``torch.distributed`` is initialised with several ranks; ``False`` never reduces.
    timeout : float, optional
        Seconds a collective may wait for the other ranks before a ``DistributedError``.
    check_finite : bool
        Check each product for NaN/Inf (one reduction and host sync per product); when it is not
        finite, recompute batch by batch and raise ``NonFiniteProductError`` naming the batch.
    rewrite : bool
        In reverse mode, eval-mode BatchNorm as the affine map it is and, on CPU, ``conv2d`` with
        faster second derivatives where measured faster: the same function, products equal to
        rounding. Attention and ``hardsigmoid`` (not twice differentiable in torch) are rewritten
        either way.
    check_loss_dtype : bool
        Raise :class:`~curvop.backends.base.LossPrecisionError` when the loss has a lower
        precision than the parameters (a float32 loss of a float64 model).
    watch, on_change, check_state, rng_seed
        The model adapter's hooks: tensors besides ``params`` (buffers) whose in-place change
        (``_version``) calls ``on_change()`` and rebuilds cached graphs; ``check_state()`` after
        the first loss; ``train_mode``'s seed (:func:`batch_seed`, ``curvop.backends.torch.state.train_randomness``).
    module
        The model, watched during the first forward for parts computing in a lower precision than the
        parameters (:class:`~curvop.backends.torch.context.PrecisionWatch`); not kept.

    Notes
    -----
    The operator is the Hessian at the parameters *as they are now*: in-place updates (an
    ``optimizer.step()``, ``load_state_dict``) are followed in every mode, cached graphs and
    linearisations being rebuilt at the next product when a parameter's version counter moved.
    """

    name = "torch"
    batch_errors = (RuntimeError, NotImplementedError)  # an op without a batching rule

    def __init__(self, loss: Callable[[dict[str, Tensor], Any], Tensor], params: dict[str, Tensor],
                 dataset: Dataset, *, hvp: str = "auto", cache: bool | str = "auto", batched: bool | str = "auto",
                 check_deterministic: bool = True, check_symmetric: bool | None = None, verify: bool = False,
                 process_group: Any = None, timeout: float | None = None,
                 check_finite: bool = True, rewrite: bool = True, check_loss_dtype: bool = True,
                 watch: list[Tensor] = (), on_change: Callable[[], None] | None = None,
                 check_state: Callable[[], None] | None = None, rng_seed: int | np.random.Generator | None = None,
                 module: torch.nn.Module | None = None):
        check_autograd_available()
        collective = torch_collective(process_group, timeout)  # first, so every rank's checks are agreed on
        try:
            self._begin(dataset, param_infos(params), hvp=hvp, cache=cache, batched=batched,
                        check_deterministic=check_deterministic, check_symmetric=check_symmetric, verify=verify,
                        check_finite=check_finite, rewrite=rewrite,
                        check_loss_dtype=check_loss_dtype)
            self._params = {k: p.detach() for k, p in params.items()}
            self._layout = _Layout(self._params)
            self.device, self.torch_dtype = self._layout.device, self._layout.dtype
            self.dtype, self.size = np.dtype(dtype_name(self.torch_dtype)), int(sum(self._layout.numels))
        except Exception as err:
            if collective is None:
                raise
            collective.check_consistent(0, None, None, failure=err)  # raises on every rank
        self._collective = collective
        if collective is not None:
            collective.check_consistent(self.size, self._params, self.device)
        self._rng = train_randomness(rng_seed, self._collective, self.device)
        self._loss = loss if self._rng is None else self._rng.wrap(loss)
        self._randomness = "error" if self._rng is None else "same"  # vmap: one mask for every column
        #: The base seed of the training-mode draws (``None`` in eval mode): batch ``i`` ran under
        #: ``torch.manual_seed(batch_seed(train_seed, i))``; log it to reproduce the masks.
        self.train_seed = None if self._rng is None else self._rng.seed
        self._check_state, self._rewrite = check_state, bool(rewrite)
        self._watch = [*self._params.values(), *watch]
        self._on_change, self._state_lock = on_change, threading.Lock()
        self._versions = [t._version for t in self._watch]
        self._default_dtype = torch.get_default_dtype()  # the build's: every product uses it
        self._watch_precision = PrecisionWatch(module, self.torch_dtype)
        self._complete(self._first_loss, check_loss_dtype)
        self._watch_precision.warn(self.torch_dtype)
        self._watch_precision = None

    def _rounding_dtype(self) -> Any:
        """The lowest precision the first forward computed in with the parameters (Llama's float32
        RMSNorm in a float64 model rounds the products to float32), else the operator's dtype."""
        if self._watch_precision is not None:  # during the build: what the first forward computed in
            found = {dt for _, _, dt in self._watch_precision.found.values()}
            low = min(found, key=lambda d: precision_bits(d) or 64, default=None)
            self._low_dtype = low if low in (None, "bfloat16") else np.dtype(low)
        return self._low_dtype or self.dtype

    _low_dtype = None

    def _first_loss(self) -> Any:
        """The loss on the first batch, described for the template's checks."""
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        # the exact rewrites (embedding's max_norm writes no more into the model)
        with self._context(), LOCK, self._watch_precision, Rewrites(conv=False, fast=False):
            return loss_info(self._loss(p, self._prepare_batch(self.dataset.first())))

    # --- the template's hooks --------------------------------------------------------------------
    def _resolved(self) -> None:
        if self._check_state is not None:
            self._check_state()  # the model's buffer check, right after the first loss
        self.rewrite = self._rewrite and self.mode == "reverse"

    def _auto_options(self) -> dict[str, Any]:
        # reverse measured fastest with and without a cache; vmap measured slower than a loop on CPU
        return {"hvp": "reverse", "cache": self.dataset.single, "batched": self.device.type == "cuda"}

    def _batch_context(self, index: int, cached: bool) -> Any:
        return _NULL if self._rng is None else self._rng.context(index, cached, self.mode == "forward")

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

    def _context(self) -> Any:
        return build_time(self.device.type, self._default_dtype)

    def _mode_failure(self, err: BaseException) -> str | None:
        return mode_failure(err)

    def _underivable(self, failures: dict[tuple[str, bool], BaseException]) -> BaseException:
        return no_second_derivative(failures)

    def _precision_message(self, loss_dtype: str) -> str:
        advice = self._watch_precision.loss_advice(loss_dtype, self.torch_dtype) if self._watch_precision else None
        return advice or super()._precision_message(loss_dtype)

    def _all_finite(self, y: Tensor) -> bool:
        # A NaN or Inf anywhere makes the sum NaN or Inf: one reduction (~40 us for 270k float32
        # entries on one CPU thread, where isfinite + all take ~1.8 ms), read as a Python float
        # (13 us with the sum; torch.isfinite on the 0-d sum and bool() took 80 us, 2-3 % of the
        # MLP's product). A sum that overflows from finite entries is rare and confirmed entry by entry.
        return math.isfinite(y.sum().item()) or bool(torch.isfinite(y).all())

    def _prepare_batch(self, batch: Any) -> Any:
        """The tensors of a batch (any nesting: :func:`~curvop.backends.dataset.map_batch`) on the
        device; a ``PackedSequence`` moves as one (its ``batch_sizes`` stay on the CPU)."""
        if type(batch) is tuple and all(type(t) is Tensor and t.device == self.device for t in batch):
            return batch  # the usual (x, y) already on the device
        return map_batch(self._to_device, batch, is_leaf=_is_packed)

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x if x.device == self.device else x.to(self.device, non_blocking=True)
        if _is_packed(x) and x.data.device != self.device:
            return x.to(self.device)
        return x

    def _blocks(self) -> list[tuple[str, int]]:
        return list(zip(self._layout.names, self._layout.numels))

    def _batch_gradient(self, batch: Any, v: Tensor, t: float) -> Tensor:
        """The gradient at ``params + t v``, through torch's own first derivatives (only the exact
        rewrites, which change no first derivative: an independent check of the products)."""
        p = {k: (q + t * d).detach().requires_grad_(True) for (k, q), d in zip(self._params.items(),
                                                                               self._layout.split(v).values())}
        with torch.enable_grad(), Rewrites(conv=False, fast=False):
            g = torch.autograd.grad(self._loss(p, batch), list(p.values()), allow_unused=True)
        return self._layout.flat(dict(zip(self._layout.names, g)))

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
        ranks = f", data-parallel over {self._collective.world} ranks" if self._collective is not None else ""
        where = f"{self.torch_dtype} on {self.device}{ranks}"
        return f"torch {self.mode} mode, {cache}, n={self.size}, {where}{self._note()}"

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

    def _columns(self, columns: list[Tensor], batch: Any, index: int) -> Tensor:
        """Reverse mode: the batch's gradient graph built once (under the batch's seed, so the same
        dropout masks as each column's own product) and differentiated once per column."""
        if self.mode == "forward":
            return super()._columns(columns, batch, index)
        with self._batch_context(index, False):
            fn = self._linearize(batch)
        return torch.stack([fn(u, False) for u in columns], dim=1)

    def _linearize(self, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        """What stays fixed between products on ``batch``, as a function of the vector (no ref. to self)."""
        if self.mode == "forward":
            with LOCK:
                try:
                    lin = linearize(grad(lambda p: self._eval(p, batch)), self._params)
                except UnsafeLinearization as err:
                    raise ValueError(f"hvp='forward' with cache=True cannot be used on this model: {err}, so "
                                     "its cached products would change from one use to the next; pass "
                                     "cache=False or hvp='reverse'") from None
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
        """The loss, under the op rewrites (:mod:`curvop.backends.torch.rewrites`): always the ops torch
        cannot differentiate twice (attention, hardsigmoid, ...); with ``rewrite`` the fast ones."""
        with Rewrites(conv="auto" if self.device.type == "cpu" else False, fast=self.rewrite,
                      gelu=getattr(self, "cache", False),  # unset while the first loss is checked
                      forward=getattr(self, "mode", None) == "forward"):
            return self._loss(p, batch)


def _is_packed(x: Any) -> bool:
    return isinstance(x, torch.nn.utils.rnn.PackedSequence)


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


# the model adapter builds the two factories around the backend (so it never imports this module)
hessian, hessian_of = factories(TorchBackend)
