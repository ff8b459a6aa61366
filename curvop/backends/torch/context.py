"""The build-time context of a torch operator: nothing around the model changes its Hessian.

An operator is the Hessian of the model as it was built. What torch keeps outside the parameters,
and what curvop does with it:

* :class:`ModuleModes`: the train/eval flag of every module, recorded at build. Every evaluation
  of the loss runs under the recorded flags (set under :data:`~curvop.backends.torch.state.LOCK`,
  where ``functional_call`` swaps the parameters, and put back afterwards), so ``model.train()``
  after the build changes nothing. ``Embedding(sparse=True)`` runs with dense gradients (the same
  function: torch cannot differentiate a sparse gradient again).
* :func:`build_time`: around the build and every product, ``torch.autocast`` off, grad mode on and
  the default dtype of the build, whatever the caller's context.
* :class:`PrecisionWatch`: the build's first forward is watched for results of a lower precision
  than the parameters that depend on them (a float64 model casting to float32 inside: T5's
  LayerNorm, Llama's RMSNorm); a :class:`~curvop._errors.PrecisionWarning` names the module.
* :func:`unwrap`: a ``torch.compile``d model is differentiated through ``model._orig_mod`` (with a
  warning saying so); TorchScript modules are refused with the fix.
* :func:`mode_failure` / :func:`no_second_derivative`: the errors that mean "this mode cannot
  differentiate this model" (:mod:`curvop.backends.modes`), and the error naming an op no mode can
  differentiate twice, its module and a workaround.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ContextManager

import torch
from torch.overrides import TorchFunctionMode

from curvop._dtypes import dtype_name, precision_bits
from curvop._errors import NoSecondDerivativeError, PrecisionWarning
from curvop.backends.dataset import batch_leaves
from curvop.backends.torch.state import LOCK

__all__ = ["ModuleModes", "PrecisionWatch", "build_time", "mode_failure", "name_users", "no_second_derivative",
           "unwrap"]

_NULL = nullcontext()


class ModuleModes:
    """The train/eval flags of a model's modules at build, applied around every loss evaluation."""

    def __init__(self, model: torch.nn.Module):
        self.modules = list(model.modules())
        self.flags = [m.training for m in self.modules]
        embeddings = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        self.sparse = [m for m in self.modules if isinstance(m, embeddings) and m.sparse]

    def applied(self) -> ContextManager[None]:
        """The recorded flags inside (call it holding ``LOCK``); the model's own flags afterwards."""
        if not self.sparse and [m.training for m in self.modules] == self.flags:
            return _NULL  # the usual case: one list comparison
        return self._applied()

    @contextmanager
    def _applied(self) -> Iterator[None]:
        changed = [m for m, t in zip(self.modules, self.flags) if m.training != t]
        sparse = [m for m in self.sparse if m.sparse]
        try:
            for m in changed:
                m.training = not m.training
            for m in sparse:
                m.sparse = False
            yield
        finally:
            for m in changed:
                m.training = not m.training
            for m in sparse:
                m.sparse = True


def build_time(device_type: str, default_dtype: torch.dtype) -> ContextManager[None]:
    """Autocast off, grad mode on and ``default_dtype`` as torch's default dtype, inside only."""
    if (torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and torch.get_default_dtype() == default_dtype
            and (device_type == "cpu" or not torch.is_autocast_enabled(device_type))):
        return _NULL  # the usual case
    return _build_time(device_type, default_dtype)


@contextmanager
def _build_time(device_type: str, default_dtype: torch.dtype) -> Iterator[None]:
    autocast = [t for t in dict.fromkeys(("cpu", device_type)) if torch.is_autocast_enabled(t)]
    other_dtype = torch.get_default_dtype() != default_dtype
    with ExitStack() as stack:
        for t in autocast:
            stack.enter_context(torch.autocast(t, enabled=False))
        stack.enter_context(torch.enable_grad())
        if other_dtype:  # a process-wide setting: changed under the lock, and put back
            stack.enter_context(LOCK)
            before = torch.get_default_dtype()
            torch.set_default_dtype(default_dtype)
            stack.callback(torch.set_default_dtype, before)
        yield


class PrecisionWatch(TorchFunctionMode):
    """Records the ops whose floating result has a lower precision than ``dtype`` and depends on the
    parameters (``requires_grad``), with the module running them, during one forward."""

    def __init__(self, model: torch.nn.Module | None, dtype: torch.dtype):
        super().__init__()
        self.bits = precision_bits(dtype_name(dtype)) or 64
        self.found: dict[str, tuple[str, str, str]] = {}  # module name -> (class, op, dtype)
        self.output: str | None = None  # the lowest precision among the model's own outputs
        self.model_class = type(model).__name__ if model is not None else "the loss function"
        self._stack: list[tuple[str, str]] = [("", "the loss function")]
        self._model, self._handles = model, []

    def __enter__(self) -> PrecisionWatch:
        if self._model is not None:
            for name, m in self._model.named_modules():
                self._handles.append(m.register_forward_pre_hook(lambda m, a, n=name: self._push(n, m)))
                self._handles.append(m.register_forward_hook(lambda m, a, out, n=name: self._pop(n, out),
                                                             always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _push(self, name: str, m: torch.nn.Module) -> None:
        self._stack.append((name, type(m).__name__))

    def _pop(self, name: str, out: Any) -> None:
        self._stack.pop()
        if name == "":  # the model's outputs, its loss left out
            if isinstance(out, Mapping) or hasattr(out, "logits"):
                out = {k: v for k, v in dict(out).items() if k != "loss"} if isinstance(out, Mapping) else out.logits
            low = [t.dtype for t in batch_leaves(out) if self._lower(t)]
            if low:
                self.output = dtype_name(low[0])

    def _lower(self, t: Any) -> bool:
        return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
                and (precision_bits(dtype_name(t.dtype)) or 64) < self.bits)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name, cls = self._stack[-1]
        if name not in self.found:
            low = next((t for t in (out if isinstance(out, (tuple, list)) else (out,)) if self._lower(t)), None)
            if low is not None:
                op = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
                self.found[name] = (cls, op.replace("TensorBase.", "Tensor."), dtype_name(low.dtype))
        return out

    def where(self) -> str:
        """The modules that lowered the precision, for a message."""
        parts = [f"{name!r} ({cls}, {op} -> {dt})" if name else f"{cls} ({op} -> {dt})"
                 for name, (cls, op, dt) in self.found.items()]
        more = f" and {len(parts) - 3} more" if len(parts) > 3 else ""
        return ", ".join(parts[:3]) + more

    def warn(self, dtype: torch.dtype) -> None:
        if self.found:
            warnings.warn(
                f"part of the model computes in a lower precision than its {dtype} parameters: {self.where()}; "
                "the Hessian keeps that precision's digits there (float32: about 1e-7 relative), not "
                f"{dtype}'s. For {dtype} throughout, make those modules compute in the model's dtype; "
                "to accept it, filter curvop.PrecisionWarning", PrecisionWarning, stacklevel=6)

    def loss_advice(self, loss_dtype: str, dtype: torch.dtype) -> str | None:
        """The precision error's advice when the model itself returns lower-precision outputs."""
        if self.output is None:
            return None
        return (f"the loss value is torch.{loss_dtype}, but the parameters are {dtype}: the model itself "
                f"({self.model_class}) returns {self.output} outputs, so no loss_fn can recover the digits (lower "
                f"precision at {self.where()}). Use the {self.output} Hessian of a {self.output} copy of the model "
                "(copy.deepcopy(model).float()), make those modules compute in the model's dtype, or pass "
                "check_loss_dtype=False to accept the lower precision.")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module to differentiate: ``_orig_mod`` of a ``torch.compile``d model (with a warning);
    a TorchScript model or a compiled or scripted submodule is refused with the fix."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        warnings.warn(
            "the model is compiled with torch.compile, whose graphs torch cannot differentiate twice; curvop "
            "differentiates the uncompiled model, model._orig_mod (the same function and parameters)", stacklevel=4)
        model = model._orig_mod
    for name, m in model.named_modules():
        what = ("a TorchScript module (torch.jit.script / torch.jit.trace)" if isinstance(m, torch.jit.ScriptModule)
                else "compiled with torch.compile" if type(m).__name__ == "OptimizedModule" else None)
        if what is None:
            continue
        which = f"submodule {name!r}" if name else "the model"
        fix = (f"use {name + '.' if name else 'model.'}_orig_mod, the uncompiled module, in its place"
               if "compile" in what else "pass the nn.Module it was scripted from (the same parameters)")
        raise TypeError(
            f"{which} is {what}, which torch cannot call with other parameter values or differentiate twice, so "
            f"curvop cannot take its Hessian: {fix}")
    return model


_MODE_FAILURES = [  # (pattern in torch's message, the reason curvop gives)
    (r"Trying to use forward AD with (\w+)", "forward-mode AD is not implemented for {0}"),
    (r"derivative for (?:aten::)?(\w+) is not implemented", "torch has no derivative of {0}"),
    (r"don't yet support saved tensor hooks", "torch.func cannot run under saved-tensor hooks "
                                              "(non-reentrant checkpointing)"),
    (r"must override the setup_context staticmethod", "torch.func cannot run an autograd.Function without "
                                                      "setup_context (full backward hooks, custom functions)"),
    (r"data-dependent control flow|tracing tensor with aten\._local_scalar_dense",
     "torch.func.linearize cannot trace a data-dependent branch (e.g. padding_mask.all())"),
    (r"Cannot access data pointer of Tensor that doesn't have storage",
     "torch.func cannot run an op that reads a tensor's memory directly (packed sequences in RNNs)"),
    (r"symbolically trace a dynamo-optimized function", "torch.func.linearize cannot trace torch.compile"),
    (r"does not currently support double backward", "torch.compile cannot be differentiated twice"),
]


def mode_failure(err: BaseException) -> str | None:
    """The reason ``err`` means "this mode cannot differentiate the model", or ``None``."""
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return None
    text = str(err)
    for pattern, reason in _MODE_FAILURES:
        m = re.search(pattern, text)
        if m:
            return reason.format(*m.groups())
    return None


#: ops without a second derivative in either mode: the module that calls them and what to do
_WORKAROUNDS = {
    "multi_margin_loss": ("MultiMarginLoss", "write the loss in plain ops, e.g. torch.clamp(margin - "
                          "out.gather(1, y[:, None]) + out, min=0) (to the power p), with the target's own "
                          "term left out, summed over classes and divided by their number"),
    "multilabel_margin_loss": ("MultiLabelMarginLoss", "write the loss in plain ops (torch.clamp of the margins)"),
    "ctc_loss": ("CTCLoss", "torch's CTC loss has a first derivative only; write the CTC forward recursion "
                 "with torch.logsumexp (differentiable twice) as the loss_fn"),
}


def no_second_derivative(failures: dict[tuple[str, bool], BaseException]) -> BaseException:
    """The error when every mode failed: the op, and a workaround where one is known."""
    ops = [re.search(r"(?:aten::|forward AD with )_?(\w+?)(?:_backward)?\b", str(e)) for e in failures.values()]
    op = next((m.group(1) for m in ops if m is not None), None)
    if op is None:
        return next(iter(failures.values()))
    cls, fix = _WORKAROUNDS.get(op, (None, "replace the part of the model or loss that calls it by plain torch "
                                           "ops, which torch differentiates twice"))
    used = f" ({cls})" if cls else ""
    (mode, _), first = next(iter(failures.items()))
    return NoSecondDerivativeError(
        f"torch cannot differentiate {op}{used} twice in either mode ({mode} mode: "
        f"{' '.join(str(first).split())[:100]}), so its Hessian cannot be computed: {fix}", op=op)


def name_users(err: NoSecondDerivativeError, model: torch.nn.Module, loss_fn: Any) -> NoSecondDerivativeError:
    """``err`` with the modules of ``model`` (and ``loss_fn``) that call its op named."""
    cls = _WORKAROUNDS.get(err.op or "", (None,))[0]
    if cls is None:
        return err
    users = [f"module {n!r}" for n, m in model.named_modules() if type(m).__name__ == cls]
    if isinstance(loss_fn, torch.nn.Module) and type(loss_fn).__name__ == cls:
        users.insert(0, "the loss_fn")
    if not users:
        return err
    return NoSecondDerivativeError(f"{', '.join(users)}: {err}", op=err.op)
