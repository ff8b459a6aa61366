"""The torch model adapter: an ``nn.Module`` and a loss (or a function of tensors) as ``loss(params, batch)``.

:func:`factories` builds :func:`curvop.backends.torch.hessian` and ``hessian_of`` around the
backend class. What they need before any autodiff is here too: the
module checks (layers in training mode), the parameter selection, copies of the buffers
(:class:`Buffers`, never the user's), the ``train_mode`` seed, Hugging Face style models that
compute their own loss, and the batch weights of class-weighted / ``ignore_index`` losses. The
result is the keyword arguments of :class:`curvop.backends.torch.TorchBackend`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call

from curvop._errors import NoSecondDerivativeError
from curvop.backends.torch.context import ModuleModes, name_users, unwrap
from curvop.backends.torch.state import LOCK, check_autograd_available
from curvop.backends.base import Backend
from curvop.backends.dataset import Dataset, resolve_reduction
from curvop.backends.selection import select

__all__ = ["Buffers", "backend_options", "check_unknown", "factories", "function_problem", "model_problem", "train_seed"]

Tensor = torch.Tensor


def factories(backend: type[Backend]) -> tuple[Callable[..., Backend], Callable[..., Backend]]:
    """``hessian`` and ``hessian_of`` for the torch backend class ``backend`` (``TorchBackend``).

    Built here, around the class, so that this adapter never imports the backend module.
    """
    valid = backend_options(backend)

    def hessian(
        model: torch.nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor] | None,
        data: Any,
        *,
        params: Any = None,
        reduction: str | None = None,
        batch_weight: Callable[[Any], Any] | None = None,
        **options: Any,
    ) -> Backend:
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
            ``hvp``, ``cache``, ``batched``, ``check_deterministic``, ``check_symmetric``, ``verify``,
            ``process_group``, ``timeout``,
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
        from curvop.backends.torch.fsdp import hessian_fsdp, is_fsdp_model

        if is_fsdp_model(model):  # FSDP2: finite differences through FSDP, sharded vectors
            extra = {} if batch_weight is None else {"batch_weight": batch_weight}
            return hessian_fsdp(model, loss_fn, data, params=params, reduction=reduction, **extra, **options)
        problem = model_problem(model, loss_fn, data, params=params, reduction=reduction,
                                batch_weight=batch_weight, options=options, valid=valid)
        try:
            return backend(**problem, **options)
        except NoSecondDerivativeError as err:
            raise name_users(err, problem["module"], loss_fn) from err


    def hessian_of(f: Callable[..., Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
                   **options: Any) -> Backend:
        """Torch backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

        ``params`` is a tensor, a list/tuple of tensors or a dict of tensors; ``f`` receives the same
        structure (fresh tensors at the same values) and must compute with it.
        """
        problem = function_problem(f, params, data, reduction=reduction, options=options, valid=valid)
        return backend(**problem, **options)

    return hessian, hessian_of


def backend_options(backend: type[Backend]) -> list[str]:
    """The user-facing options of a torch backend class: its keyword arguments less the adapter's."""
    internal = {"self", "loss", "params", "dataset", "watch", "on_change", "check_state", "rng_seed", "module"}
    return [k for k in inspect.signature(backend.__init__).parameters if k not in internal]


def model_problem(model: Any, loss_fn: Any, data: Any, *, params: Any, reduction: str | None,
                  batch_weight: Any, options: dict[str, Any], valid: list[str],
                  with_forward: bool = False) -> dict[str, Any]:
    """The backend's ``loss``, ``params``, ``dataset`` and model hooks for ``hessian(model, loss_fn, data)``.

    ``options`` are the other keyword arguments: ``train_mode`` and ``seed`` are taken out of it,
    the rest must be in ``valid`` (the backend's options). ``with_forward``: also ``forward(p,
    inputs)``, the model's outputs (the curvature family, :mod:`curvop.backends.torch.curvature`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
    train_mode, seed = options.pop("train_mode", False), options.pop("seed", None)
    check_unknown(options, ["params", "reduction", "batch_weight", "train_mode", "seed", *valid])
    rng_seed = train_seed(train_mode, seed)
    check_autograd_available()
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module  # the wrapped model; curvop does its own all-reduce of products
    model = unwrap(model)  # torch.compile: its _orig_mod; TorchScript: refused
    if not train_mode:
        _check_module(model)
    modes = ModuleModes(model)  # the build's train/eval flags, applied around every evaluation
    selected = select(dict(model.named_parameters()), params, default=lambda k, p: p.requires_grad,
                      is_leaf=lambda x: isinstance(x, torch.Tensor))
    consts = {k: p.detach() for k, p in model.named_parameters() if k not in selected}
    buffers = Buffers(model, batch_statistics=bool(train_mode))
    reduction_ = resolve_reduction(loss_fn, reduction)
    weight = batch_weight if batch_weight is not None else _loss_weight(loss_fn, reduction_)
    dataset = Dataset(data, reduction_, weight=weight,
                      single=True if loss_fn is None and isinstance(data, torch.Tensor) else None)
    if (loss_fn is not None and reduction is None and batch_weight is None and not dataset.single
            and getattr(loss_fn, "reduction", None) is None):
        raise ValueError(
            f"the loss {getattr(loss_fn, '__name__', type(loss_fn).__name__)!r} has no .reduction attribute "
            "(a lambda or function?), so curvop cannot tell how to combine several batches: pass "
            "reduction='mean' (batches weighted by their size) or reduction='sum', or "
            "batch_weight=lambda batch: ... giving what the loss averages over in a batch (e.g. "
            "lambda b: (b[1] != -100).sum() for ignored targets)"
        )

    def forward(p: dict[str, Tensor], inputs: Any) -> Any:
        return _call(model, (p, consts, buffers.copies), inputs, modes)

    def loss(p: dict[str, Tensor], batch: Any) -> Tensor:
        if loss_fn is None:  # the model computes its own loss
            return _model_loss(model, (p, consts, buffers.copies), batch, modes)
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("each batch must be a pair (inputs, targets)")
        inputs, targets = batch
        return loss_fn(forward(p, inputs), targets)

    extra = {"forward": forward} if with_forward else {}
    return dict(loss=loss, params=selected, dataset=dataset, watch=list(buffers.live.values()),
                on_change=buffers.refresh, check_state=buffers.check, rng_seed=rng_seed, module=model, **extra)


def _call(model: torch.nn.Module, tensors: tuple[dict[str, Tensor], ...], inputs: Any, modes: ModuleModes) -> Any:
    """``model(**inputs)`` (a mapping), ``model(*inputs)`` (a plain tuple or list) or ``model(inputs)``
    (anything else: a tensor, a namedtuple, a ``PackedSequence``, a dataclass), with ``tensors`` as
    its parameters and buffers and the build's train/eval flags."""
    with LOCK, modes.applied():
        if isinstance(inputs, Mapping):
            return functional_call(model, tensors, (), dict(inputs))
        if type(inputs) in (tuple, list):
            return functional_call(model, tensors, tuple(inputs))
        return functional_call(model, tensors, (inputs,))


def function_problem(f: Callable[..., Tensor], params: Any, data: Any, *, reduction: str,
                     options: dict[str, Any], valid: list[str]) -> dict[str, Any]:
    """The backend's ``loss``, ``params`` and ``dataset`` for ``hessian_of(f, params, data)``.

    ``batch_weight`` is taken out of ``options``; the rest must be in ``valid``.
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
    batch_weight = options.pop("batch_weight", None)
    check_unknown(options, ["reduction", "batch_weight", *valid])
    check_autograd_available()
    if data is None:
        loss = lambda p, batch: f(rebuild(p))  # noqa: E731
    else:
        loss = lambda p, batch: f(rebuild(p), batch)  # noqa: E731
    return dict(loss=loss, params=flat, dataset=Dataset(data, reduction, weight=batch_weight))


def check_unknown(options: dict[str, Any], valid: list[str]) -> None:
    """A clear error for an option the torch backend does not have."""
    for name in options:
        if name not in valid:
            hint = ""
            if name in ("cuda", "device", "gpu"):
                hint = (" (the operator uses the model's device; move the model with model.to(...) and the data "
                        "follows it)")
            raise TypeError(
                f"unknown option {name!r} for the torch backend{hint}; valid options: {', '.join(valid)}"
            )


def train_seed(train_mode: Any, seed: Any) -> int | np.random.Generator | None:
    """The checked ``train_mode``/``seed`` options as the backend's ``rng_seed`` (``None``: eval only)."""
    if not isinstance(train_mode, (bool, np.bool_)):
        raise TypeError(f"train_mode must be True or False, got {train_mode!r} ({type(train_mode).__name__})")
    if not train_mode:
        if seed is not None:
            raise ValueError(
                "seed= fixes the random draws (dropout masks) of a training-mode Hessian; it needs "
                "train_mode=True (an eval-mode Hessian draws nothing)"
            )
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise ValueError(
                f"seed must be a non-negative int, a torch.Generator, a numpy Generator or None, got {seed}")
        return int(seed)
    if seed is None:  # a draw from the user's generator, which is left where it was
        with torch.random.fork_rng(devices=[]):
            return np.random.default_rng(int(torch.randint(2**62, ())))
    if isinstance(seed, torch.Generator):  # advances that generator, as drawing from it does
        return np.random.default_rng(int(torch.randint(2**62, (), generator=seed, device=seed.device)))
    if isinstance(seed, np.random.Generator):
        return np.random.default_rng(int(seed.integers(2**62)))
    raise TypeError(
        f"seed must be a non-negative int, a torch.Generator, a numpy Generator or None, got {seed!r} "
        f"({type(seed).__name__})"
    )


class Buffers:
    """Copies of the model's buffers for products to use (and write, if a layer does): never the user's.

    Refreshed when a live buffer changes in place (its ``_version``), so the operator follows the
    model's buffers as it follows its parameters. With ``batch_statistics`` the running statistics
    of normalisation layers in training mode are ``None``: they normalise with the batch's
    statistics, as in training, and write nothing (every product is then the same function).
    """

    def __init__(self, model: torch.nn.Module, batch_statistics: bool = False):
        from torch.nn.modules.batchnorm import _NormBase

        self.model = model
        self.live = dict(model.named_buffers())
        self.unused = set()
        if batch_statistics:
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.SyncBatchNorm) and m.training:
                    raise ValueError(
                        f"SyncBatchNorm layer {name!r} is in training mode: it synchronises batch statistics "
                        "across processes, which train_mode=True does not differentiate (nor needs: curvop reduces "
                        "products across ranks itself); use torch.nn.BatchNorm layers for the Hessian, or call "
                        f"model.get_submodule({name!r}).eval() to use its running statistics"
                    )
                if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                    prefix = f"{name}." if name else ""
                    self.unused |= {prefix + k for k in ("running_mean", "running_var", "num_batches_tracked")}
        self.refresh()

    def refresh(self) -> None:
        self.copies = {k: None if k in self.unused else b.detach().clone() for k, b in self.live.items()}

    def check(self) -> None:
        """After the first forward: refuse training-mode layers that changed their buffers, by effect."""
        changed: dict[str, list[str]] = {}
        for k, b in self.live.items():
            if self.copies[k] is not None and not torch.equal(self.copies[k], b):
                owner, _, leaf = k.rpartition(".")
                if self.model.get_submodule(owner).training:
                    changed.setdefault(owner, []).append(leaf)
        self.refresh()
        if changed:
            owner, names = next(iter(changed.items()))
            kind = type(self.model.get_submodule(owner)).__name__
            raise ValueError(
                f"layer {owner or kind!r} ({kind}) is in training mode and its forward updates its buffers "
                f"({', '.join(names)}), so every product would change them and the Hessian would drift; "
                "call model.eval() before building the Hessian (curvop never writes the model's buffers: "
                "products run on copies)"
            )


def _model_loss(model: torch.nn.Module, tensors: tuple[dict[str, Tensor], ...], batch: Any,
                modes: ModuleModes) -> Tensor:
    """``loss_fn=None``: the loss the model computes itself (``.loss``, ``["loss"]`` or a scalar output)."""
    out = _call(model, tensors, batch, modes)
    if isinstance(out, torch.Tensor):
        if out.numel() == 1:
            return out
        value = None
    else:
        value = getattr(out, "loss", None)
        if value is None and isinstance(out, Mapping):
            value = out.get("loss")
    if value is None and type(out) is tuple and out and isinstance(out[0], torch.Tensor) and out[0].numel() == 1:
        raise ValueError(
            f"loss_fn=None takes the loss from the output's .loss or ['loss'], but the model returned a plain tuple "
            f"of {len(out)} (a Hugging Face model called with return_dict=False returns (loss, logits, ...)); call it "
            "with return_dict=True (add 'return_dict': True to the batch, or set model.config.return_dict = True), "
            "or return an object with .loss"
        )
    if value is None:
        raise ValueError(
            f"loss_fn=None means the model computes its own loss, but its output ({type(out).__name__}"
            f"{f' of shape {tuple(out.shape)}' if isinstance(out, torch.Tensor) else ''}) has no loss: pass the "
            "labels in the batch (e.g. batch['labels'] for a Hugging Face model) so that the output has .loss, "
            "or give a loss_fn(output, targets) with batches (inputs, targets)"
        )
    return value


def _loss_weight(loss_fn: Any, reduction: str) -> Callable[[Any], Any] | None:
    """What a mean-reduced ``CrossEntropyLoss`` / ``NLLLoss`` averages over in a batch, else ``None``."""
    if reduction != "mean" or not isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return None
    return partial(_target_weight, loss_fn.weight, loss_fn.ignore_index)


def _target_weight(class_weight: Tensor | None, ignore_index: int, batch: Any) -> Any:
    """The divisor of torch's mean: the targets' class weights summed, ignored targets left out."""
    targets = batch[1]
    if targets.is_floating_point():  # class probabilities: a mean over samples (and positions)
        return targets.numel() // targets.shape[1] if targets.dim() > 1 else 1
    keep = targets != ignore_index
    if class_weight is None:
        return keep.sum()
    w = class_weight.to(targets.device)[torch.where(keep, targets, 0)]
    return (w * keep).sum()


def _check_module(model: torch.nn.Module) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    for name, m in model.named_modules():
        if m.training and isinstance(m, (_BatchNorm, _DropoutNd)):
            kind = "BatchNorm" if isinstance(m, _BatchNorm) else "dropout"
            raise ValueError(
                f"{kind} layer {name or type(m).__name__!r} is in training mode, so products would "
                f"{'use batch statistics and update the running statistics' if kind == 'BatchNorm' else 'drop random units'}"
                "; call model.eval() before building the Hessian, or pass train_mode=True for the Hessian of the "
                "training-mode loss (batch statistics, running statistics untouched, one fixed dropout mask)"
            )
