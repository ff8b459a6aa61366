"""Model adapters of the TensorFlow backend: Keras 3 / ``tf.Module`` variable discovery, selection,
the loss object's dtype, Keras mixed-precision policies (refused), batches as tensors, infinite
``tf.data`` datasets (refused), device keys, the errors of a mode that cannot differentiate the
model (no autodiff here)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import tensorflow as tf

from curvop._dtypes import precision_bits
from curvop.backends.base import LossPrecisionError
from curvop.backends.dataset import map_batch
from curvop.backends.selection import select
from curvop.backends.template import LossInfo

__all__ = ["model_variables", "check_loss_object", "check_data", "hessian_of_variables", "precision_message",
           "var_name", "to_tensors", "batch_spec", "device_key", "loss_info", "mode_failure"]


def var_name(v: Any) -> str:
    name = getattr(v, "path", None) or getattr(v, "name", None) or "variable"
    return name[:-2] if name.endswith(":0") else name


def precision_message(what: str, ref: tf.DType) -> str:
    return (
        f"{what}, but the variables are {ref.name}: the Hessian would silently lose digits (a float32 "
        "loss gives about 1e-8 relative accuracy instead of 1e-16; Keras loss objects compute in floatx, "
        "float32, unless told otherwise). Fix: build the loss with "
        f"dtype=\"{ref.name}\", e.g. keras.losses.MeanSquaredError(dtype=\"{ref.name}\"), or call "
        f"keras.backend.set_floatx(\"{ref.name}\") before creating the model and the loss. Pass "
        "check_loss_dtype=False to accept the lower precision."
    )


def _loss_object_dtype(loss_fn: Any) -> tf.DType | None:
    dt = getattr(loss_fn, "dtype", None)
    if dt is None:
        return None
    dt = getattr(dt, "compute_dtype", dt)  # a Keras DTypePolicy
    try:
        return tf.as_dtype(dt)
    except TypeError:
        return None


def check_loss_object(loss_fn: Any, variables: list[tf.Variable]) -> None:
    """A Keras loss object computing in a lower precision than the variables is refused up front."""
    loss_dtype = _loss_object_dtype(loss_fn)
    if not variables or loss_dtype is None or not variables[0].dtype.is_floating:
        return
    ref = variables[0].dtype
    if loss_dtype.is_floating and loss_dtype.size < ref.size:
        raise LossPrecisionError(precision_message(
            f"the loss object {type(loss_fn).__name__} computes in {loss_dtype.name}", ref))


def _is_keras(model: Any) -> bool:
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras") for c in type(model).__mro__)


def _unique(named: dict[str, Any], name: str) -> str:
    while name in named:
        name += "_"
    return name


def _keras_variables(model: Any) -> tuple[dict[str, Any], list[Any]]:
    """(name -> Keras variable) for every weight and the trainable ones, names relative to the model."""
    import keras

    if keras.config.backend() != "tensorflow":
        raise TypeError(
            f"this Keras model runs on the {keras.config.backend()!r} backend; the tensorflow backend "
            "needs KERAS_BACKEND=tensorflow (for JAX, use backend='jax')"
        )
    if not getattr(model, "built", True) or not model.weights:
        raise ValueError(
            f"the Keras model {model.name!r} has no weights yet (it is not built): call "
            "model.build(input_shape) or call it on a batch first, e.g. model(x[:1])"
        )
    _check_policies(model)
    prefix = f"{model.name}/"
    named: dict[str, Any] = {}
    for w in model.weights:
        name = var_name(w)
        named[_unique(named, name[len(prefix):] if name.startswith(prefix) else name)] = w
    return named, list(model.trainable_weights)


def _check_policies(model: Any) -> None:
    """A layer computing in a lower precision than its variables (a mixed-precision dtype policy) is
    refused: its products would carry float16's or bfloat16's 2-3 digits."""
    for layer in [*model._flatten_layers(include_self=False, recursive=True), model]:  # the model last
        if type(layer).__name__ == "InputLayer":  # computes nothing
            continue
        policy = getattr(layer, "dtype_policy", None)
        compute, variable = (str(getattr(policy, a, "")) for a in ("compute_dtype", "variable_dtype"))
        if (precision_bits(compute) or 64) < (precision_bits(variable) or 0):
            raise TypeError(
                f"layer {layer.name!r} computes in {compute} under the Keras dtype policy {policy.name!r}, while "
                f"its variables are {variable}: the Hessian would carry {compute}'s 2-3 digits. Build the model "
                "without a mixed-precision policy: keras.mixed_precision.set_global_policy('float32') (or "
                "'float64') before creating it, or dtype='float32' on each layer")


def _module_variables(module: tf.Module) -> tuple[dict[str, Any], list[Any]]:
    named: dict[str, Any] = {}
    for v in module.variables:
        named[_unique(named, var_name(v))] = v
    return named, list(module.trainable_variables)


def underlying(v: Any) -> tf.Variable:
    """The tf.Variable behind a Keras 3 variable (itself for a tf.Variable)."""
    if isinstance(v, tf.Variable):
        return v
    inner = getattr(v, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"{type(v).__name__} is neither a tf.Variable nor a Keras variable on the tensorflow backend")


def _aliases(v: Any) -> tuple[Any, ...]:
    """A Keras variable is also reachable as the ``tf.Variable`` behind it (``.value``)."""
    inner = getattr(v, "value", None)  # on a plain tf.Variable, .value is a method
    return (v,) if inner is None or callable(inner) else (v, inner)


def model_variables(model: Any, params: Any) -> tuple[list[str], list[tf.Variable], Callable[[Any], Any]]:
    """``(names, variables, call)``: the selected variables of a Keras model or ``tf.Module`` and
    ``call(inputs)`` running the model in inference mode (``training=False`` where it takes it)."""
    if _is_keras(model):
        named, trainable = _keras_variables(model)
        call = lambda x: model(x, training=False)  # noqa: E731
    elif isinstance(model, tf.Module):
        named, trainable = _module_variables(model)
        try:
            takes_training = "training" in inspect.signature(model.__call__).parameters
        except (TypeError, ValueError):
            takes_training = False
        call = (lambda x: model(x, training=False)) if takes_training else model  # noqa: E731
        if not named:
            raise ValueError(f"the module {type(model).__name__} has no variables (is it built?)")
    else:
        raise TypeError(f"the tensorflow backend needs a Keras model or a tf.Module, got {type(model).__name__}")
    ids = {id(v) for v in trainable}
    selected = select(named, params, default=lambda k, v: id(v) in ids, is_leaf=lambda x: hasattr(x, "dtype"),
                      sep="/", aliases=_aliases, what="variable")
    return list(selected), [underlying(v) for v in selected.values()], call


def hessian_of_variables(params: Any) -> tuple[list[str], list[tf.Variable]]:
    """Names and ``tf.Variable``s of ``hessian_of``'s ``params`` (a variable, or a list/tuple/dict of them)."""
    if isinstance(params, dict):
        leaves, names = list(params.values()), [str(k) for k in params]
    elif isinstance(params, (list, tuple)):
        leaves, names = list(params), [str(i) for i in range(len(params))]
    else:
        leaves, names = [params], ["0"]
    for name, leaf in zip(names, leaves):
        if isinstance(leaf, tf.Tensor) and not isinstance(leaf, tf.Variable):
            raise TypeError(
                f"params[{name!r}] is a tf.Tensor; hessian_of needs tf.Variables (the point is their current "
                "value): wrap it as tf.Variable(t)"
            )
        if not isinstance(leaf, tf.Variable) and not isinstance(getattr(leaf, "value", None), tf.Variable):
            raise TypeError(
                f"params must be a tf.Variable or a list/tuple/dict of tf.Variables, got {type(leaf).__name__}"
            )
    return names, [underlying(v) for v in leaves]


# --- batches, devices, the loss value ----------------------------------------------------------------
def check_data(data: Any) -> None:
    """An infinite ``tf.data`` dataset (``.repeat()`` without a count) is refused: every product
    iterates over the whole data, which would never end."""
    if isinstance(data, tf.data.Dataset) and int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "the tf.data.Dataset is infinite (.repeat() without a count), but every Hessian-vector product "
            "iterates over the whole data: pass a finite dataset, e.g. dataset.take(n) for n batches, or "
            "repeat(count) with a count")


def _to_tensor(a: Any) -> Any:
    """An array leaf as a tensor; strings, ints, bools and ``None`` as they are."""
    if isinstance(a, (tf.Tensor, str, bytes, bool, int)) or a is None:
        return a
    return tf.convert_to_tensor(a)


def to_tensors(batch: Any) -> Any:
    """A batch with its array leaves as tensors (any nesting: ``curvop.backends.dataset.map_batch``);
    lists become tuples so every batch has one structure."""
    if isinstance(batch, list):
        batch = tuple(batch)
    return map_batch(_to_tensor, batch)


def mode_failure(err: BaseException) -> str | None:
    """The reason ``err`` means "this mode cannot differentiate the model", or ``None``."""
    if "Tried to take gradients (or similar) of a variable without handle data" in str(err):
        return "TensorFlow's forward-mode accumulator fails inside a while loop (Keras LSTM, GRU, SimpleRNN)"
    return None


def batch_spec(t: tf.Tensor) -> tf.TensorSpec:
    shape = list(t.shape)
    return tf.TensorSpec([None] + shape[1:] if shape else [], t.dtype)


def device_key(device: str) -> tuple[str, int]:
    spec = tf.DeviceSpec.from_string(device or "")
    return ((spec.device_type or "CPU").upper(), spec.device_index or 0)


def loss_info(value: Any) -> LossInfo:
    """The loss value on the first batch, for the template's check."""
    if not isinstance(value, (tf.Tensor, tf.Variable)):
        return LossInfo(False, type(value).__name__, (), "", False)
    floating = value.dtype.is_floating
    finite = bool(tf.reduce_all(tf.math.is_finite(value))) if floating else None
    return LossInfo(True, "tf.Tensor", tuple(value.shape), value.dtype.name, floating, finite)
