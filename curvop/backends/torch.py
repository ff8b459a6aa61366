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

import inspect
import itertools
import threading
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch.func import grad, jvp, linearize, vmap

from curvop.backends._torch_model import function_problem, model_problem
from curvop.backends._torch_ops import Rewrites
from curvop.backends._torch_state import LOCK as _LOCK
from curvop.backends._torch_state import FixedRandomness as _FixedRandomness
from curvop.backends._torch_state import at as _at
from curvop.backends._torch_state import batch_seed, check_autograd_available, inference_mode_error
from curvop.backends.base import Backend, LossPrecisionError
from curvop.backends.base import check_deterministic as assert_deterministic
from curvop.backends.dataset import Dataset
from curvop.backends.distributed import torch_collective
from curvop.backends.faults import locate_nonfinite, nonfinite_error

__all__ = ["TorchBackend", "batch_seed", "hessian", "hessian_of"]

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
    check_loss_dtype : bool
        Raise :class:`~curvop.backends.base.LossPrecisionError` when the loss has a lower
        precision than the parameters (a float32 loss of a float64 model).
    watch : list of tensors, optional
        Tensors besides ``params`` (the model's buffers) whose in-place change (``_version``) makes
        the operator follow them: ``on_change()`` is called and cached graphs are rebuilt.
    on_change : callable, optional
    check_state : callable, optional
        Called right after the first evaluation of the loss (the model's buffer check).
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
        if not params:
            raise ValueError("no parameters selected: the Hessian would be empty")
        _check_options(hvp=hvp, cache=cache, batched=batched, check_deterministic=check_deterministic,
                       check_finite=check_finite, rewrite=rewrite, check_loss_dtype=check_loss_dtype)
        check_autograd_available()
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
        if self.torch_dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"the parameters are {self.torch_dtype}; curvop computes Hessians in float32 or float64 "
                "(16-bit products keep 2-3 digits, too few for Lanczos or a trace estimate, and numpy has "
                "no bfloat16): convert the model with model.float() (or model.double()), on a copy "
                "(copy.deepcopy(model).float()) to keep the 16-bit one"
            )
        self.dtype = np.dtype(str(self.torch_dtype).replace("torch.", ""))
        self._layout = _Layout(self._params)
        self._names, self._shapes, self._numels = self._layout.names, self._layout.shapes, self._layout.numels
        self.size = int(sum(self._numels))
        self.dataset = dataset
        self.check_finite = bool(check_finite)
        self._dist = torch_collective(process_group, timeout)
        if self._dist is not None:
            self._dist.check_consistent(self.size, self._params, self.device)
        self._rng = None if rng_seed is None else _FixedRandomness(self._agree_rng_seed(rng_seed), self.device,
                                                                    0 if self._dist is None else self._dist.rank)
        if self._rng is not None:
            self._loss = self._rng.wrap(loss)
        self._randomness = "error" if self._rng is None else "same"  # vmap: one mask for every column
        #: The base seed of the training-mode draws (``None`` in eval mode): batch ``i`` ran under
        #: ``torch.manual_seed(batch_seed(train_seed, i))``; log it to reproduce the masks.
        self.train_seed = None if self._rng is None else self._rng.seed

        _check_scalar_loss(self._loss, self._params, self._to_device(dataset.first()), check_loss_dtype)
        if check_state is not None:
            check_state()
        if hvp == "auto":
            hvp = "reverse"  # measured fastest with and without a cache (module docstring)
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
        self._watch = [*self._params.values(), *watch]
        self._on_change, self._state_lock = on_change, threading.Lock()
        self._versions = [t._version for t in self._watch]
        self._cached: list[tuple[Callable[[Tensor, bool], Tensor], Any]] | None = None
        if self.cache:
            self._cached = self._build_cache()

    def _build_cache(self) -> list[tuple[Callable[[Tensor, bool], Tensor], Any]]:
        single_weight = self.dataset.single and (self._dist is None or self.dataset.data is None)
        cached = [(self._replay(i, _at(i, self._linear_map, self._to_device(b))),
                   1 if single_weight else _number(self.dataset.weight(b)))
                  for i, b in enumerate(self.dataset.batches())]
        if not cached:
            raise ValueError("data is empty: the data loader yielded no batches")
        return cached

    def _agree_rng_seed(self, seed: int | np.random.Generator) -> int:
        """The base seed of ``train_mode``: the same on every rank (rank 0's draw, or the checked int)."""
        if self._dist is None:
            return seed if isinstance(seed, int) else int(seed.integers(2**62))
        agreed = self._dist.agree_seed(seed, self.device)  # raises when fixed seeds differ across ranks
        return seed if isinstance(seed, int) else int(agreed.integers(2**62))

    def _replay(self, i: int, fn: Callable[[Tensor, bool], Tensor]) -> Callable[[Tensor, bool], Tensor]:
        """A forward-mode linearisation re-runs its random ops per product: under batch ``i``'s seed."""
        if self._rng is None or self.mode != "forward":
            return fn  # a reverse graph holds its mask
        return partial(self._rng.call, i, fn)

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

    # --- the contract ----------------------------------------------------------------------------
    def hvp(self, v: Tensor) -> Tensor:
        self._follow()
        y = self._sum(v, self._fresh) if self._cached is None else self._sum_cached(v, False)
        return self._finite(y, v, False)

    def hvp_batch(self, v: Tensor) -> Tensor:
        if not self.batched:
            return super().hvp_batch(v)
        self._follow()
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

    def agree_seed(self, seed: Any) -> Any:
        return seed if self._dist is None else self._dist.agree_seed(seed, self.device)

    def describe(self) -> str:
        cache = "cached" if self._cached is not None else "uncached"
        if self._rng is not None:
            cache += f", training mode (seed {self._rng.seed})"
        ranks = f", data-parallel over {self._dist.world} ranks" if self._dist is not None else ""
        return f"torch {self.mode} mode, {cache}, n={self.size}, {self.torch_dtype} on {self.device}{ranks}"

    # --- products ---------------------------------------------------------------------------------
    def _sum(self, v: Tensor, product: Callable[[Tensor, Any], Tensor]) -> Tensor:
        index = itertools.count()
        one = lambda batch: _at(next(index), product, v, self._to_device(batch))  # noqa: E731
        if self._dist is not None:  # unnormalised local sum and count, then one all-reduce
            acc, count = self.dataset.partial_sum(one)
            return self._dist.reduce_product(acc, count, self.dataset.reduction)
        return self.dataset.weighted_sum(one)

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
        bad_v = ~torch.isfinite(v)
        if bool(bad_v.any()):  # the vector, not the data
            where = tuple(int(i) for i in torch.nonzero(bad_v)[0])
            raise ValueError(
                f"the vector contains NaN or Inf (first at index {where[0] if len(where) == 1 else where}), so "
                "H @ v is not finite whatever the data; check how the vector was computed"
            )
        finite = lambda p: bool(torch.isfinite(p).all())  # noqa: E731
        if not fresh and self._cached is not None:
            bad = locate_nonfinite((fn(v, batched) for fn, _ in self._cached), finite)
        else:
            batches = (_at(i, self._fresh, v, self._to_device(b), batched)
                       for i, b in enumerate(self.dataset.batches()))
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
            with _LOCK:  # forward-AD levels are process-wide
                return vmap(one, in_dims=1, out_dims=1, randomness=self._randomness)(v) if batched else one(v)
        p = {k: t.detach().requires_grad_(True) for k, t in self._params.items()}
        g = self._graph(p, batch)
        return self._reverse_product(g, list(p.values()), v, batched, retain=False)

    def _linear_map(self, batch: Any) -> Callable[[Tensor, bool], Tensor]:
        """What stays fixed between products on ``batch``, as a function of the vector."""
        if self.mode == "forward":
            with warnings.catch_warnings(), _LOCK:  # torch.fx const-folding chatter, harmless
                warnings.simplefilter("ignore", UserWarning)
                _, lin = linearize(grad(lambda p: self._eval(p, batch)), self._params)
            return partial(_linearized_product, self._layout, lin, randomness=self._randomness)  # no ref. to self
        p = [t.detach().requires_grad_(True) for t in self._params.values()]
        g = self._graph(dict(zip(self._names, p)), batch)
        return partial(_reverse_product, self._layout, g, p, retain=True)

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
        return _reverse_product(self._layout, g, p, v, batched, retain=retain)

    # --- flattening -------------------------------------------------------------------------------
    def _split(self, v: Tensor) -> dict[str, Tensor]:
        return self._layout.split(v)

    def _flat(self, tree: dict[str, Tensor | None]) -> Tensor:
        return self._layout.flat(tree)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch if batch.device == self.device else batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self._to_device(b) for k, b in batch.items()}
        return batch



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
        parts = layout.split(v).values()
    parts = list(parts)
    with torch.enable_grad():
        hv = torch.autograd.grad([g[i] for i in live], p, grad_outputs=[parts[i] for i in live],
                                 retain_graph=retain, allow_unused=True, is_grads_batched=batched)
    if batched:
        k = v.shape[1]
        return torch.cat([_zero_if_none(h, (k, n), v).reshape(k, n) for h, n in zip(hv, layout.numels)], 1).T
    return layout.flat(dict(zip(layout.names, hv)))


def _linearized_product(layout: _Layout, lin: Callable[[Any], Any], v: Tensor, batched: bool,
                        randomness: str = "error") -> Tensor:
    one = lambda u: layout.flat(lin(layout.split(u)))  # noqa: E731
    with _LOCK:  # a linearisation replays torch.func transforms, whose levels are process-wide
        return vmap(one, in_dims=1, out_dims=1, randomness=randomness)(v) if batched else one(v)


def _number(w: Any) -> Any:
    return w.item() if isinstance(w, torch.Tensor) else w


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
    if p.is_inference():
        raise RuntimeError(
            f"parameter {name!r} is an inference tensor (created under torch.inference_mode()), which autograd "
            "cannot differentiate; create or load the model outside torch.inference_mode()"
        )
    return p


_FLAGS = ("check_deterministic", "check_finite", "rewrite", "check_loss_dtype")


def _check_options(**options: Any) -> None:
    """Types and values of the options: a string ``"False"`` is not ``False``."""
    hvp = options.pop("hvp")
    if not isinstance(hvp, str) or hvp not in ("auto", "forward", "reverse"):
        raise ValueError(f"hvp must be 'forward', 'reverse' or 'auto', got {hvp!r}")
    for name, value in options.items():
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, str) and value == "auto" and name not in _FLAGS):
            continue
        allowed = "True or False" + ("" if name in _FLAGS else " or 'auto'")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def _check_scalar_loss(loss: LossFn, params: dict[str, Tensor], batch: Any, check_dtype: bool = True) -> None:
    p = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        value = loss(p, batch)
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
    if not value.requires_grad:
        raise ValueError(
            "the loss does not depend on the parameters through autograd, so its Hessian would be 0: "
            "does the loss or the model call .detach(), .item(), .numpy() or run under torch.no_grad()? "
            "(If the selected parameters are truly unused, their Hessian is 0; select others with params=.)"
        )
    ref = next(iter(params.values())).dtype
    if check_dtype and torch.finfo(value.dtype).eps > torch.finfo(ref).eps:
        raise LossPrecisionError(
            f"the loss value is {value.dtype}, but the parameters are {ref}: the Hessian would silently lose "
            "digits (a float32 loss gives about 1e-8 relative accuracy instead of 1e-16). Compute the loss in "
            f"the model's dtype: no .float() on the logits (Hugging Face causal-LM losses upcast with .float(): "
            "compute the loss yourself from out.logits with a loss_fn), no float32 constants. Pass "
            "check_loss_dtype=False to accept the lower precision."
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


def _valid_options() -> list[str]:
    internal = {"self", "loss", "params", "dataset", "watch", "on_change", "check_state", "rng_seed"}
    return [k for k in inspect.signature(TorchBackend.__init__).parameters if k not in internal]


def hessian_of(f: Callable[..., Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> TorchBackend:
    """Torch backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is a tensor, a list/tuple of tensors or a dict of tensors; ``f`` receives the same
    structure (fresh tensors at the same values) and must compute with it.
    """
    problem = function_problem(f, params, data, reduction=reduction, options=options, valid=_valid_options())
    return TorchBackend(**problem, **options)
