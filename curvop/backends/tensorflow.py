"""TensorFlow backend: Hessian-vector products of Keras 3 models, ``tf.Module``s and functions of
``tf.Variable``s.

Two ways to compute a product, chosen with ``hvp=``:

* ``"forward"`` -- forward-over-reverse: a ``tf.autodiff.ForwardAccumulator`` around a
  ``tf.GradientTape`` (the JVP of the gradient);
* ``"reverse"`` -- reverse-over-reverse: a nested ``GradientTape`` (the gradient of ``<g, v>``).

Either runs inside a ``tf.function`` that is traced once per operator: the input signature is
fixed from the first batch with a free leading (batch) dimension, so an unequal last batch does not
retrace. ``hvp_batch`` (``H.matmat``) maps the product over the columns with ``tf.vectorized_map``
(``batched=True``) or loops over them (``batched=False``).

Keras 3 variables are not ``tf.Variable``s; the backend differentiates with respect to the
underlying ``tf.Variable`` (``keras_variable.value``) and calls the model with ``training=False``.

The loss follows the Keras convention ``loss_fn(targets, predictions)`` (``y_true`` first), so
``keras.losses`` objects work unchanged.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from curvop.backends.base import Backend, LossPrecisionError
from curvop.backends.base import check_deterministic as assert_deterministic
from curvop.backends.dataset import Dataset, resolve_reduction
from curvop.backends.selection import select

__all__ = ["TensorFlowBackend", "LossPrecisionError", "hessian", "hessian_of"]



class TensorFlowBackend(Backend):
    """Products of the Hessian of ``loss(batch)`` with respect to ``variables`` over a :class:`Dataset`.

    Parameters
    ----------
    loss : callable
        ``loss(batch)`` (``batch`` is ``None`` without data) -> scalar tensor, computed with the
        current values of ``variables``.
    variables : list of tf.Variable
        The point at which the Hessian is taken (one floating dtype, one device).
    dataset : Dataset
    names : list of str, optional
        Names of the variables (for messages and :meth:`describe`).
    hvp : {"auto", "forward", "reverse"}
        ``"auto"`` picks forward-over-reverse: in ``benchmarks/hvp_tensorflow.py`` (2-core CPU) it
        was about 2x faster than reverse-over-reverse on a small CNN and within 10% on an MLP, and
        it keeps less of the second-order graph alive.
    batched : {"auto", True, False}
        Whether ``hvp_batch`` uses ``tf.vectorized_map`` over the columns (``True``) or a loop of
        single products (``False``). ``"auto"`` vectorizes on a GPU and loops on CPU, where the
        vectorized forward product measured slower on a CNN and takes seconds to trace
        (``benchmarks/hvp_tensorflow.py``).
    check_deterministic : bool
        Compare two products with the same vector when the operator is built (default True).
    check_loss_dtype : bool
        Raise :class:`LossPrecisionError` if the loss value has a lower precision than the
        variables (default True).
    """

    name = "tensorflow"

    def __init__(
        self,
        loss: Callable[[Any], tf.Tensor],
        variables: list[tf.Variable],
        dataset: Dataset,
        *,
        names: list[str] | None = None,
        hvp: str = "auto",
        batched: bool | str = "auto",
        check_deterministic: bool = True,
        check_loss_dtype: bool = True,
    ):
        if not variables:
            raise ValueError("no variables selected: the Hessian would be empty")
        names = list(names) if names is not None else [_var_name(v) for v in variables]
        for name, v in zip(names, variables):
            _check_variable(name, v)
        dtypes = {v.dtype for v in variables}
        if len(dtypes) > 1:
            raise TypeError(
                f"variables have mixed dtypes ({', '.join(sorted(d.name for d in dtypes))}); build the model "
                "in one dtype, e.g. keras.backend.set_floatx('float64') before creating it, or dtype= on "
                "every layer"
            )
        devices = {_device_key(v.device) for v in variables}
        if len(devices) > 1:
            raise ValueError(
                f"variables are on several devices ({', '.join(sorted(map(str, devices)))}); curvop needs "
                "them on one device (create the model under one `with tf.device(...)`)"
            )
        self._loss = loss
        self._vars = list(variables)
        self._names = names
        self.tf_dtype = variables[0].dtype
        self.dtype = np.dtype(self.tf_dtype.as_numpy_dtype)
        self.device = variables[0].device
        self._shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self._shapes]
        self.size = int(sum(self._sizes))
        self.dataset = dataset
        on_gpu = _device_type(self.device) == "GPU"

        first = None if dataset.data is None else _to_tensors(dataset.first())
        _check_loss_value(loss, first, self.tf_dtype, check_loss_dtype)

        if hvp == "auto":
            hvp = "forward"
        if hvp not in ("forward", "reverse"):
            raise ValueError(f"hvp must be 'forward', 'reverse' or 'auto', got {hvp!r}")
        self.mode = hvp
        if batched == "auto":
            batched = on_gpu
        if batched not in (True, False):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        self.batched = bool(batched)

        #: number of times the product functions were traced (one each, however many products)
        self.traces = 0
        self._bspec = None if first is None else tf.nest.map_structure(_batch_spec, first)
        self._single = self._function(self._product, tf.TensorSpec([self.size], self.tf_dtype))
        self._block = self._function(self._product_block, tf.TensorSpec([self.size, None], self.tf_dtype))

        if check_deterministic:
            v = self.random(self.size, "gaussian", np.random.default_rng(0))
            assert_deterministic(self.hvp, v, self.dtype)

    # --- the contract ----------------------------------------------------------------------------
    def hvp(self, v: tf.Tensor) -> tf.Tensor:
        return self._sum(self._single, v)

    def hvp_batch(self, v: tf.Tensor) -> tf.Tensor:
        if not self.batched:
            return super().hvp_batch(v)
        try:
            return self._sum(self._block, v)
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError) as err:
            warnings.warn(
                f"batched products failed ({type(err).__name__}: {str(err)[:200]}); falling back to one "
                "product per column (pass batched=False to skip the attempt)",
                stacklevel=3,
            )
            self.batched = False
            return super().hvp_batch(v)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, (tf.Tensor, tf.Variable))

    def check(self, x: tf.Tensor) -> None:
        if x.dtype != self.tf_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype.name}, but the variables are {self.tf_dtype.name}; "
                f"convert it with tf.cast(x, tf.{self.tf_dtype.name})"
            )
        if not _same_device(x.device, self.device):
            raise ValueError(
                f"vector is on {x.device}, but the variables are on {self.device}; move it with "
                f"`with tf.device('{self.device}'): x = tf.identity(x)`"
            )

    def to_numpy(self, x: tf.Tensor) -> np.ndarray:
        return x.numpy()

    def from_numpy(self, a: np.ndarray) -> tf.Tensor:
        with tf.device(self.device):
            return tf.convert_to_tensor(np.asarray(a, dtype=self.dtype), dtype=self.tf_dtype)

    def describe(self) -> str:
        how = "vectorized" if self.batched else "looped"
        return (f"tensorflow {self.mode} mode, {how} blocks, n={self.size}, {self.tf_dtype.name} on "
                f"{_device_type(self.device)}:{tf.DeviceSpec.from_string(self.device).device_index or 0}")

    # --- products ---------------------------------------------------------------------------------
    def _function(self, body: Callable[[tf.Tensor, Any], tf.Tensor], vspec: tf.TensorSpec):
        """``body`` as a ``tf.function`` with a fixed signature: traced once, whatever the batch size."""
        def counted(v, batch=None):
            self.traces += 1  # runs at trace time only
            return body(v, batch)

        if self._bspec is None:
            return tf.function(lambda v: counted(v), input_signature=[vspec])
        return tf.function(counted, input_signature=[vspec, self._bspec])

    def _sum(self, fn, v: tf.Tensor) -> tf.Tensor:
        with tf.device(self.device):
            if self._bspec is None:
                return fn(v)
            return self.dataset.weighted_sum(lambda batch: fn(v, _to_tensors(batch)))

    def _product(self, v: tf.Tensor, batch: Any) -> tf.Tensor:
        """One product on one batch (traced)."""
        tangents = self._split(v)
        zero = tf.UnconnectedGradients.ZERO
        if self.mode == "forward":
            with tf.autodiff.ForwardAccumulator(self._vars, tangents) as acc:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(self._vars)
                    loss = self._loss(batch)
                g = tape.gradient(loss, self._vars, unconnected_gradients=zero)
            return self._flat(acc.jvp(g, unconnected_gradients=zero))
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self._vars)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(self._vars)
                loss = self._loss(batch)
            g = inner.gradient(loss, self._vars, unconnected_gradients=zero)
            gv = tf.add_n([tf.reduce_sum(gi * ti) for gi, ti in zip(g, tangents)])
        return self._flat(outer.gradient(gv, self._vars, unconnected_gradients=zero))

    def _product_block(self, V: tf.Tensor, batch: Any) -> tf.Tensor:
        """``(n, k)`` products on one batch, vectorized over the columns (traced).

        Reverse mode computes the loss and its gradient once and vectorizes only the second
        backward pass (the Jacobian of ``V^T g``); forward mode vectorizes the whole
        forward-over-reverse product (``pfor`` hoists what does not depend on the column).
        """
        if self.mode == "reverse":
            zero = tf.UnconnectedGradients.ZERO
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                outer.watch(self._vars)
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch(self._vars)
                    loss = self._loss(batch)
                g = self._flat(inner.gradient(loss, self._vars, unconnected_gradients=zero))
                gv = tf.linalg.matvec(V, g, transpose_a=True)
            jac = outer.jacobian(gv, self._vars, unconnected_gradients=zero)
            k = tf.shape(V)[1]
            return tf.transpose(tf.concat([tf.reshape(j, [k, -1]) for j in jac], axis=1))
        out = tf.vectorized_map(lambda col: self._product(col, batch), tf.transpose(V),
                                fallback_to_while_loop=True, warn=False)
        return tf.transpose(out)

    # --- flattening -------------------------------------------------------------------------------
    def _split(self, v: tf.Tensor) -> list[tf.Tensor]:
        return [tf.reshape(t, s) for t, s in zip(tf.split(v, self._sizes), self._shapes)]

    def _flat(self, parts: list[tf.Tensor]) -> tf.Tensor:
        return tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)


# --- helpers -------------------------------------------------------------------------------------
def _to_tensors(batch: Any) -> Any:
    """A batch as (a structure of) tensors; lists become tuples so every batch has one structure."""
    if isinstance(batch, list):
        batch = tuple(batch)
    return tf.nest.map_structure(lambda a: a if isinstance(a, tf.Tensor) else tf.convert_to_tensor(a), batch)


def _batch_spec(t: tf.Tensor) -> tf.TensorSpec:
    shape = list(t.shape)
    return tf.TensorSpec([None] + shape[1:] if shape else [], t.dtype)


def _device_type(device: str) -> str:
    return (tf.DeviceSpec.from_string(device).device_type or "CPU").upper() if device else "CPU"


def _device_key(device: str) -> tuple[str, int]:
    spec = tf.DeviceSpec.from_string(device or "")
    return ((spec.device_type or "CPU").upper(), spec.device_index or 0)


def _same_device(a: str, b: str) -> bool:
    return _device_key(a) == _device_key(b)


def _var_name(v: Any) -> str:
    name = getattr(v, "path", None) or getattr(v, "name", None) or "variable"
    return name[:-2] if name.endswith(":0") else name


def _check_variable(name: str, v: Any) -> None:
    if not isinstance(v, tf.Variable):
        raise TypeError(f"variable {name!r} is a {type(v).__name__}, not a tf.Variable")
    if not v.dtype.is_floating:
        raise TypeError(
            f"variable {name!r} has dtype {v.dtype.name}; the Hessian needs floating-point variables. "
            "Leave it out with params=..., or create it with trainable=False"
        )


def _lower_precision(dt: tf.DType, ref: tf.DType) -> bool:
    return dt.is_floating and dt.size < ref.size


def _check_loss_value(loss: Callable[[Any], tf.Tensor], batch: Any, ref: tf.DType, check_dtype: bool) -> None:
    value = loss(batch)
    if not isinstance(value, (tf.Tensor, tf.Variable)):
        raise TypeError(f"the loss must return a tf.Tensor, got {type(value).__name__}")
    if value.shape.num_elements() != 1:
        raise ValueError(
            f"the loss must be a scalar, but it returned shape {tuple(value.shape)}; use a reduced loss "
            "(reduction='sum_over_batch_size' or 'sum' for Keras losses, tf.reduce_mean / tf.reduce_sum), "
            "not reduction=None / 'none'"
        )
    if not value.dtype.is_floating:
        raise TypeError(f"the loss has dtype {value.dtype.name}; it must be floating point")
    if check_dtype and _lower_precision(value.dtype, ref):
        raise LossPrecisionError(_precision_message(f"the loss value is {value.dtype.name}", ref))
    if not bool(tf.reduce_all(tf.math.is_finite(value))):
        raise FloatingPointError("the loss is NaN or Inf on the first batch; check the data and the model")


def _precision_message(what: str, ref: tf.DType) -> str:
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


def _is_keras(model: Any) -> bool:
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras") for c in type(model).__mro__)


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
    prefix = f"{model.name}/"
    named: dict[str, Any] = {}
    for w in model.weights:
        name = _var_name(w)
        name = name[len(prefix):] if name.startswith(prefix) else name
        while name in named:
            name += "_"
        named[name] = w
    return named, list(model.trainable_weights)


def _module_variables(module: tf.Module) -> tuple[dict[str, Any], list[Any]]:
    named: dict[str, Any] = {}
    for v in module.variables:
        name = _var_name(v)
        while name in named:
            name += "_"
        named[name] = v
    return named, list(module.trainable_variables)


def _underlying(v: Any) -> tf.Variable:
    """The tf.Variable behind a Keras 3 variable (itself for a tf.Variable)."""
    if isinstance(v, tf.Variable):
        return v
    inner = getattr(v, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"{type(v).__name__} is neither a tf.Variable nor a Keras variable on the tensorflow backend")


def _select(named: dict[str, Any], trainable: list[Any], params: Any) -> dict[str, Any]:
    ids = {id(v) for v in trainable}
    return select(named, params, default=lambda k, v: id(v) in ids, is_leaf=lambda x: hasattr(x, "dtype"),
                  sep="/", aliases=_aliases, what="variable")


def _aliases(v: Any) -> tuple[Any, ...]:
    """A Keras variable is also reachable as the ``tf.Variable`` behind it (``.value``)."""
    inner = getattr(v, "value", None)  # on a plain tf.Variable, .value is a method
    return (v,) if inner is None or callable(inner) else (v, inner)


def hessian(
    model: Any,
    loss_fn: Callable[[Any, Any], tf.Tensor],
    data: Any,
    *,
    params: Any = None,
    reduction: str | None = None,
    **options: Any,
) -> TensorFlowBackend:
    """TensorFlow backend for :func:`curvop.hessian`.

    Parameters
    ----------
    model : keras.Model (Keras 3 on the tensorflow backend, built) or tf.Module
        Keras models are called as ``model(inputs, training=False)``; a ``tf.Module`` as
        ``model(inputs)`` (with ``training=False`` if its ``__call__`` takes ``training``).
    loss_fn : callable
        ``loss_fn(targets, predictions)`` -> scalar tensor (Keras order: ``y_true`` first), e.g.
        ``keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")``.
    data : batch ``(inputs, targets)``, or a re-iterable of batches (list, ``tf.data.Dataset``)
        Batches are combined by size (see :func:`curvop.hessian`).
    params : None, names, variables, or a predicate on names
        ``None``: the trainable variables. Names are Keras variable paths without the model's name
        (``"dense/kernel"``); a layer name selects all its variables (``"dense"``).
    reduction : {"mean", "sum"}, optional
        Read from ``loss_fn.reduction`` when not given (Keras' default ``sum_over_batch_size`` is a mean).
    **options
        ``hvp``, ``batched``, ``check_deterministic``, ``check_loss_dtype``: see :class:`TensorFlowBackend`.
    """
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
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    selected = _select(named, trainable, params)
    variables = [_underlying(v) for v in selected.values()]

    loss_dtype = _loss_object_dtype(loss_fn)
    if options.get("check_loss_dtype", True) and variables and loss_dtype is not None:
        if variables[0].dtype.is_floating and _lower_precision(loss_dtype, variables[0].dtype):
            raise LossPrecisionError(_precision_message(
                f"the loss object {type(loss_fn).__name__} computes in {loss_dtype.name}", variables[0].dtype))

    def loss(batch: Any) -> tf.Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("each batch must be a pair (inputs, targets)")
        inputs, targets = batch
        return loss_fn(targets, call(inputs))

    return TensorFlowBackend(loss, variables, Dataset(data, resolve_reduction(loss_fn, reduction)),
                             names=list(selected), **options)


def hessian_of(f: Callable[..., tf.Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> TensorFlowBackend:
    """TensorFlow backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is a ``tf.Variable`` (or Keras variable), or a list/tuple/dict of them; ``f``
    receives that same structure and must compute with it. The Hessian is taken at the variables'
    current values, with respect to all of them flattened in order.
    """
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
    variables = [_underlying(v) for v in leaves]
    if data is None:
        loss = lambda batch: f(params)  # noqa: E731
    else:
        loss = lambda batch: f(params, batch)  # noqa: E731
    return TensorFlowBackend(loss, variables, Dataset(data, reduction), names=names, **options)
