"""Model adapters of the JAX backend: parameter pytrees checked and converted, ``(apply_fn, params)``,
bare ``apply_fn`` and Flax NNX modules turned into ``apply_fn(params, inputs)``, batches checked
(no autodiff here).

Modes: JAX has no train/eval state to change behind the operator's back. A Flax linen module's
``deterministic=`` / ``use_running_average=`` are arguments fixed in the ``apply_fn`` the user
passes; an NNX module is split once at build, and its flags (``Dropout.deterministic``,
``BatchNorm.use_running_average``) are static parts of that split, so ``model.train()`` after the
build changes nothing (tests/backends/jax/test_jax_model.py)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from curvop.backends.dataset import batch_leaves
from curvop.backends.jax import sharding
from curvop.backends.template import ParamInfo

__all__ = ["check_batch", "prepare_params", "model_apply"]


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def prepare_params(params: Any) -> tuple[Any, list[ParamInfo]]:
    """A parameter pytree with every leaf a ``jax.Array``, and its leaves described for the template.

    numpy leaves are converted with ``jnp.asarray`` (one copy); float64 numpy leaves are refused
    while ``jax_enable_x64`` is off, because JAX would silently round them to float32. A leaf may
    live on one device or on several devices, sharded or replicated, when every leaf is on the same
    ones (:mod:`curvop.backends.jax.sharding`; data parallelism:
    :func:`curvop.backends.jax.jax_data_parallel`).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("params has no array leaves: the Hessian would be empty")
    out, names, dtypes = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path) or "params"
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, float)):
            raise TypeError(f"parameter {name} is a {type(leaf).__module__}.{type(leaf).__name__}, not a JAX or numpy array")
        dt = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.dtype(np.float64)
        if dt == np.float64 and not _x64():
            raise TypeError(
                f"parameter {name} is float64 but JAX's 64-bit mode is off, so JAX would compute in float32; "
                'call jax.config.update("jax_enable_x64", True) at start-up, or convert params to float32'
            )
        out.append(leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
        names.append(name)
        dtypes.append(dt)
    out = sharding.place(names, out)  # one device set for every leaf, or a clear error
    infos = [ParamInfo(name, dt.name, "+".join(sorted(map(str, x.devices()))), dt.kind == "f")
             for name, dt, x in zip(names, dtypes, out)]
    return jax.tree_util.tree_unflatten(treedef, out), infos


def model_apply(model: Any, params: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(apply_fn, params)`` for ``model=(apply_fn, params)``, a bare ``apply_fn`` with ``params=``,
    or a Flax NNX module (``params=`` then an NNX filter)."""
    if _is_module(model, "flax.linen"):
        raise TypeError(
            f"a Flax linen module ({type(model).__name__}) holds no parameters: pass "
            "model=(module.apply, variables), with variables = module.init(key, inputs)"
        )
    if _is_module(model, "flax.nnx"):
        return _split_nnx(model, params)  # for NNX, params= is the filter that chose the parameters
    if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        apply_fn, model_params = model
    elif callable(model):
        apply_fn, model_params = model, None
    else:
        raise TypeError(
            "the jax backend takes model=(apply_fn, params) with apply_fn(params, inputs) -> outputs, "
            f"or model=apply_fn with params=...; got {type(model).__name__}"
        )
    p = params if params is not None else model_params
    if p is None:
        raise ValueError("no parameters: pass model=(apply_fn, params) or params=")
    return apply_fn, p


def _is_module(model: Any, package: str) -> bool:
    # by the class names, so that no Flax import happens for other models
    return any(c.__module__.startswith(package) and c.__name__ == "Module" for c in type(model).__mro__)


def _split_nnx(model: Any, what: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(apply_fn, params)`` for an NNX module: ``nnx.split`` once, ``nnx.merge`` inside the loss."""
    from flax import nnx

    _check_nnx_eval(model, nnx)
    try:
        graphdef, params, rest = nnx.split(model, nnx.Param if what is None else what, ...)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"for a Flax NNX module, params= must be an NNX filter choosing the variables to differentiate "
            f"(a Variable type such as nnx.Param, nnx.PathContains('name'), nnx.All(...)), got {what!r}"
        ) from err

    def apply_fn(p: Any, inputs: Any) -> Any:
        m = nnx.merge(graphdef, p, rest)  # a fresh copy per trace: the user's module is untouched
        if isinstance(inputs, dict):
            return m(**inputs)
        return m(*inputs) if isinstance(inputs, (tuple, list)) else m(inputs)

    return apply_fn, params


def _check_nnx_eval(model: Any, nnx: Any) -> None:
    # like the torch backend: a module in training mode would differentiate a random dropout mask
    # (the same key every product) or the batch statistics, which is rarely what was meant
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout) and m.deterministic is False and m.rate > 0:
            kind = "dropout"
        elif isinstance(m, nnx.BatchNorm) and m.use_running_average is False:
            kind = "BatchNorm"
        else:
            continue
        name = ".".join(map(str, path)) or type(m).__name__
        raise ValueError(
            f"{kind} layer {name!r} of the NNX module is in training mode, so products would "
            f"{'use batch statistics' if kind == 'BatchNorm' else 'use one random dropout mask'}; "
            "call model.eval() before building the Hessian"
        )


def check_batch(batch: Any) -> None:
    """The first batch's leaves are arrays JAX can take: a torch or TensorFlow tensor, or a string,
    is refused with the fix (``jax.jit`` takes arrays and numbers only)."""
    for leaf in batch_leaves(batch):
        root = type(leaf).__module__.split(".")[0]
        if root in ("torch", "tensorflow") and hasattr(leaf, "shape"):
            raise TypeError(
                f"the batch holds {root} tensors ({type(leaf).__name__}), which JAX cannot take (a torch DataLoader "
                "yields torch tensors): convert each batch to numpy, e.g. DataLoader(..., collate_fn=lambda b: "
                "jax.tree_util.tree_map(np.asarray, torch.utils.data.default_collate(b))), or for tf.data "
                "list(dataset.as_numpy_iterator())")
        if isinstance(leaf, (str, bytes)):
            raise TypeError(
                f"the batch holds a string ({leaf!r:.40}); jax.jit takes arrays and numbers only: close over it "
                "in apply_fn or loss_fn instead of passing it in the batch")
