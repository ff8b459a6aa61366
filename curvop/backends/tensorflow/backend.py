"""TensorFlow backend: Hessian-vector products of Keras 3 models, ``tf.Module``s and functions of
``tf.Variable``s.

Two ways to compute a product, chosen with ``hvp=``:

* ``"forward"`` -- forward-over-reverse: a ``tf.autodiff.ForwardAccumulator`` around a
  ``tf.GradientTape`` (the JVP of the gradient);
* ``"reverse"`` -- reverse-over-reverse: a nested ``GradientTape`` (the gradient of ``<g, v>``).

``"auto"`` is reverse-over-reverse: ``benchmarks/baselines.py`` measured it faster than
forward-over-reverse on every Keras model it runs (an MLP, a CNN, a ``MultiHeadAttention`` block,
an LSTM and a GRU), and quicker to trace; forward mode also fails inside the ``while`` loop of a
Keras recurrent layer.

Either runs inside a ``tf.function`` that is traced once per operator: a single batch's input
signature is its exact shapes (grappler specialises the graph to them); a loader's is fixed from
the first batch with a free leading (batch) dimension, so an unequal last batch does not retrace. Each product calls the traced function directly with the batch's tensors, checked against
the signature when the batch is prepared (a single batch: once, at the build), which skips the
argument binding a ``tf.function`` call repeats every time. ``hvp_batch`` (``H.matmat``) maps the
product over the columns with ``tf.vectorized_map`` (``batched=True``) or loops over them
(``batched=False``).

Keras 3 variables are not ``tf.Variable``s; the backend differentiates with respect to the
underlying ``tf.Variable`` (``keras_variable.value``) and calls the model with ``training=False``.

The loss follows the Keras convention ``loss_fn(targets, predictions)`` (``y_true`` first), so
``keras.losses`` objects work unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from curvop.backends.tensorflow.model import (batch_spec, check_data, check_loss_object, device_key,
                                              hessian_of_variables, loss_info, mode_failure, model_variables,
                                              precision_message, to_tensors, var_name)
from curvop.backends.base import LossPrecisionError
from curvop.backends.dataset import Dataset, batch_leaves, map_batch, resolve_reduction
from curvop.backends.faults import SumNote
from curvop.backends.template import AutodiffBackend, ParamInfo

__all__ = ["TensorFlowBackend", "LossPrecisionError", "hessian", "hessian_of"]


class TensorFlowBackend(AutodiffBackend):
    """Products of the Hessian of ``loss(batch)`` with respect to ``variables`` over a :class:`Dataset`.

    Parameters
    ----------
    loss : callable
        ``loss(batch)`` (``batch`` is ``None`` without data) -> scalar tensor, computed with the
        current values of ``variables``.
    variables : list of tf.Variable
        The point at which the Hessian is taken (one floating dtype, float32 or float64, one device).
    dataset : Dataset
    names : list of str, optional
        Names of the variables (for messages and :meth:`describe`).
    hvp : {"auto", "forward", "reverse"}
        ``"auto"`` picks reverse-over-reverse (the faster mode on every model of
        ``benchmarks/baselines.py``, and the quicker one to trace).
    cache : {"auto", False}
        TensorFlow keeps no linearisation between products; ``cache=True`` is refused.
    batched : {"auto", True, False}
        Whether ``hvp_batch`` uses ``tf.vectorized_map`` over the columns (``True``) or a loop of
        single products (``False``). ``"auto"`` vectorizes on a GPU and loops on CPU, where the
        vectorized forward product measured slower on a CNN and takes seconds to trace
        (``benchmarks/hvp_tensorflow.py``).
    check_deterministic : bool
        Compare two products with the same vector when the operator is built (default True).
    check_symmetric, verify : bool
        Compare ``u·(Hw)`` with ``w·(Hu)`` at build (default: as ``check_deterministic``; no product
        more) / ``H v`` with
        central differences of the gradient (default off; the variables are moved to ``θ ± h v``
        for each gradient and restored exactly): :mod:`curvop.backends.selfcheck`.
    check_finite : bool
        Check each product for NaN/Inf (one reduction and host sync per product); when it is not
        finite, recompute batch by batch and raise ``NonFiniteProductError`` naming the batch.
    check_loss_dtype : bool
        Raise :class:`LossPrecisionError` if the loss value has a lower precision than the
        variables (default True).

    Examples
    --------
    >>> import tensorflow as tf
    >>> w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    >>> B = TensorFlowBackend(lambda batch: tf.reduce_sum(w ** 4), [w], Dataset(None))
    >>> B.hvp(tf.constant([1.0, 0.0], tf.float64)).numpy()
    array([12.,  0.])
    """

    name = "tensorflow"
    param_word = "variable"
    batch_errors = (ValueError, TypeError, NotImplementedError, tf.errors.OpError)

    def __init__(
        self,
        loss: Callable[[Any], tf.Tensor],
        variables: list[tf.Variable],
        dataset: Dataset,
        *,
        names: list[str] | None = None,
        hvp: str = "auto",
        cache: bool | str = "auto",
        batched: bool | str = "auto",
        check_deterministic: bool = True,
        check_symmetric: bool | None = None,
        verify: bool = False,
        check_finite: bool = True,
        check_loss_dtype: bool = True,
    ):
        names = list(names) if names is not None else [var_name(v) for v in variables]
        for name, v in zip(names, variables):
            if not isinstance(v, tf.Variable):
                raise TypeError(f"variable {name!r} is a {type(v).__name__}, not a tf.Variable")
        infos = [ParamInfo(n, v.dtype.name, "%s:%d" % device_key(v.device), v.dtype.is_floating)
                 for n, v in zip(names, variables)]
        self._begin(dataset, infos, hvp=hvp, cache=cache, batched=batched, check_deterministic=check_deterministic,
                    check_symmetric=check_symmetric, verify=verify, check_finite=check_finite,
                    check_loss_dtype=check_loss_dtype)
        check_data(dataset.data)
        self._loss, self._vars, self._names = loss, list(variables), names
        self.tf_dtype = variables[0].dtype
        self.dtype = np.dtype(self.tf_dtype.as_numpy_dtype)
        self.device = variables[0].device
        self._on_cpu = device_key(self.device)[0] == "CPU"
        self._shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self._shapes]
        self.size = int(sum(self._sizes))

        first = None if dataset.data is None else to_tensors(dataset.first())
        #: number of times the product functions were traced (one each, however many products)
        self.traces = 0
        self._first_batch = first
        self._calls: dict[Any, Callable[[list], Any]] = {}  # (leaves key, batched) -> traced function, called flat
        #: with check_finite, each traced product also returns the sum of its entries
        self._sums = SumNote() if self.check_finite else None
        self._ready: tuple[Any, Any] | None = None  # (the single batch, as prepared)
        self._complete(loss_info(loss(first)), check_loss_dtype)

    # --- the template's hooks ---------------------------------------------------------------------
    def _resolved(self) -> None:
        self._functions: dict[Any, tuple[Any, ...]] = {}  # traced anew for a new mode (with spec and structure)
        self._templates: dict[Any, Any] = {}  # the first batch of each key
        self._calls = {}
        self._single, self._block = self._functions_for(self._first_batch)[1]

    def _mode_failure(self, err: BaseException) -> str | None:
        return mode_failure(err)

    def _auto_options(self) -> dict[str, Any]:
        return {"hvp": "reverse", "cache": False, "batched": device_key(self.device)[0] == "GPU"}

    def _param_advice(self) -> dict[str, str]:
        return {
            "dtype_fix": "build the model in one dtype, e.g. keras.backend.set_floatx('float64') before "
                         "creating it, or dtype= on every layer",
            "device_fix": "create the model under one `with tf.device(...)`",
            "float_fix": "leave it out with params=..., or create it with trainable=False",
            "half_fix": "build the model in float32 or float64 (keras.backend.set_floatx('float32'), no "
                        "mixed_float16 policy)",
        }

    def _loss_type(self) -> str:
        return "tf.Tensor"

    def _reduce_advice(self) -> str:
        return ("use a reduced loss (reduction='sum_over_batch_size' or 'sum' for Keras losses, tf.reduce_mean "
                "/ tf.reduce_sum), not reduction=None / 'none'")

    def _precision_message(self, loss_dtype: str) -> str:
        return precision_message(f"the loss value is {loss_dtype}", self.tf_dtype)

    def _prepare_batch(self, batch: Any) -> tuple[Any, list[tf.Tensor]]:
        """The key of the batch's other leaves and its tensors in the order of the traced signature,
        checked against it. A single batch is converted and checked once (at the build), then
        reused by every product."""
        ready = self._ready
        if ready is not None and batch is ready[0]:
            return ready[1]
        tensors = None if batch is None else to_tensors(batch)
        key, flat = self._split_batch(tensors)
        self._functions_for(tensors)  # traced for batches with these other leaves (once)
        self._check_batch(key, tensors, flat)
        if self.dataset.single:
            self._ready = (batch, (key, flat))
        return key, flat

    def _product(self, v: tf.Tensor, batch: tuple[Any, list[tf.Tensor]], batched: bool) -> tf.Tensor:
        key, tensors = batch
        call = self._calls.get((key, batched)) or self._flat_call(key, batched)
        out = call([v, *tensors])
        return out if self._sums is None else self._sums.put(out)

    def _functions_for(self, batch: Any) -> tuple[list[tf.Tensor], tuple[Any, Any]]:
        """The batch's tensors, and the single and block product functions for batches whose other
        leaves (strings, ints) are this batch's: traced once for each such set of leaves."""
        key, tensors = self._split_batch(batch)
        if key not in self._functions:
            spec = None if batch is None else [tf.TensorSpec(t.shape, t.dtype) if key[1] else batch_spec(t)
                                               for t in tensors]
            self._functions[key] = (self._function(self._one, tf.TensorSpec([self.size], self.tf_dtype), batch, spec),
                                    self._function(self._many, tf.TensorSpec([self.size, None], self.tf_dtype),
                                                   batch, spec), spec, _skeleton(batch))
            self._templates[key] = batch  # for verify's gradients (the loss takes the whole batch)
        return tensors, self._functions[key][:2]

    def _split_batch(self, batch: Any) -> tuple[Any, list[tf.Tensor]]:
        """The key of a batch's functions, and its tensors in order. The key is the batch's other
        leaves (strings, ints), and for a single batch its tensors' shapes: a single batch is traced
        with its exact shapes, which lets grappler specialise the graph (a Keras LSTM's product took
        1.59x as long with a free batch dimension); the batches of a loader share one trace with a
        free batch dimension, so that an unequal last batch does not retrace."""
        leaves = [] if batch is None else batch_leaves(batch)
        tensors = [t for t in leaves if isinstance(t, tf.Tensor)]
        shapes = tuple(tuple(t.shape) for t in tensors) if self.dataset.single else None
        return (tuple(t for t in leaves if not isinstance(t, tf.Tensor)), shapes), tensors

    def _check_batch(self, key: Any, batch: Any, tensors: list[tf.Tensor]) -> None:
        """Check ``batch`` against the signature traced for batches with its other leaves: the
        traced function is then called with its tensors directly, unchecked."""
        _, _, spec, skeleton = self._functions[key]
        if spec is None:
            return
        if len(spec) != len(tensors) or not _same(skeleton, _skeleton(batch)):
            raise ValueError("a batch has another structure than the first batch; every batch must be the same "
                             "(inputs, targets) structure")
        for i, (s, t) in enumerate(zip(spec, tensors)):
            if not s.is_compatible_with(t):
                raise ValueError(
                    f"a batch's tensor {i} is {t.dtype.name} of shape {tuple(t.shape)}, but the first batch's is "
                    f"{s.dtype.name} of shape {tuple(s.shape)} (None: any batch size); every batch must "
                    "have the first batch's dtypes and shapes but for the batch dimension")

    def _flat_call(self, key: Any, batched: bool) -> Callable[[list], Any]:
        """The product function traced once (its signature is fixed), called with flat tensors.

        ``tf.function.__call__`` binds and checks its arguments on every call (about 0.2 ms on CPU,
        a tenth of a small model's product), and so does a public ``ConcreteFunction`` call (0.1 ms).
        The batch is checked in :meth:`_prepare_batch` (once, for a single batch), so the traced
        function is run through ``ConcreteFunction._call_flat`` (0.05 ms), the call TensorFlow's own
        paths end in; where a TensorFlow version lacks it, through the public call.
        """
        fn = self._functions[key][1 if batched else 0]
        concrete = fn.get_concrete_function()
        run = getattr(concrete, "_call_flat", None)
        if run is not None:
            captured = concrete.captured_inputs  # the variables' handles: fixed for the variables' lifetime

            def call(args: list) -> Any:
                return run(args, captured)
        elif self._functions[key][2] is None:
            call = lambda args: concrete(args[0])  # noqa: E731
        else:
            call = lambda args: concrete(args[0], args[1:])  # noqa: E731
        self._calls[(key, batched)] = call
        return call

    def _reduce(self, v: tf.Tensor, batched: bool, fresh: bool = False) -> tf.Tensor:
        with tf.device(self.device):
            return super()._reduce(v, batched, fresh)

    def _blocks(self) -> list[tuple[str, int]]:
        return list(zip(self._names, self._sizes))

    def _batch_gradient(self, batch: tuple[Any, list[tf.Tensor]], v: tf.Tensor, t: float) -> tf.Tensor:
        """The gradient at ``variables + t v``: the loss reads the variables, so they are moved there
        for the gradient and given back their values exactly. ``batch``: as ``_prepare_batch`` gives it."""
        key, tensors = batch
        it = iter(tensors)
        batch = map_batch(lambda a: next(it) if isinstance(a, tf.Tensor) else a, self._templates.get(key))
        saved = [tf.identity(x) for x in self._vars]
        try:
            for x, d in zip(self._vars, self._split(v)):
                x.assign_add(tf.cast(t, self.tf_dtype) * d)
            with tf.device(self.device), tf.GradientTape() as tape:
                loss = self._loss(batch)
            grads = tape.gradient(loss, self._vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return self._flat(grads)
        finally:
            for x, value in zip(self._vars, saved):
                x.assign(value)

    def _all_finite(self, y: tf.Tensor) -> bool:
        if self._sums is not None and self._sums.finite(y):  # the sum computed with the product
            return True
        if self._on_cpu:  # numpy reads the CPU buffer in place: ~13 us, where two eager TF ops take ~300 us
            return bool(np.isfinite(y.numpy()).all())
        return bool(tf.reduce_all(tf.math.is_finite(y)))

    # --- array glue -------------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, (tf.Tensor, tf.Variable))

    def check(self, x: tf.Tensor) -> None:
        if x.dtype != self.tf_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype.name}, but the variables are {self.tf_dtype.name}; "
                f"convert it with tf.cast(x, tf.{self.tf_dtype.name})"
            )
        if x.device != self.device and device_key(x.device) != device_key(self.device):
            raise ValueError(
                f"vector is on {x.device}, but the variables are on {self.device}; move it with "
                f"`with tf.device('{self.device}'): x = tf.identity(x)`"
            )

    def from_numpy(self, a: np.ndarray) -> tf.Tensor:
        with tf.device(self.device):
            return tf.convert_to_tensor(np.asarray(a, dtype=self.dtype), dtype=self.tf_dtype)

    def describe(self) -> str:
        how = "vectorized" if self.batched else "looped"
        where = f"{device_key(self.device)[0]}:{tf.DeviceSpec.from_string(self.device).device_index or 0}"
        dtype = self.tf_dtype.name
        auto = " (auto)" if self._options.get("hvp") == "auto" else ""  # the default: see _auto_options
        return f"tensorflow {self.mode} mode{auto}, {how} blocks, n={self.size}, {dtype} on {where}{self._note()}"

    # --- products (traced) ------------------------------------------------------------------------
    def _function(self, body: Callable[[tf.Tensor, Any], tf.Tensor], vspec: tf.TensorSpec, template: Any,
                  spec: list[tf.TensorSpec] | None):
        """``body`` as a ``tf.function`` of the vector and the batch's tensors, with a fixed signature:
        traced once, whatever the batch size. The batch is ``template`` with its tensors replaced
        (its other leaves, strings or ints, are the template's)."""
        def counted(v, tensors=None):
            self.traces += 1  # runs at trace time only
            if tensors is None:
                y = body(v, None)
            else:
                it = iter(tensors)
                y = body(v, map_batch(lambda a: next(it) if isinstance(a, tf.Tensor) else a, template))
            return y if self._sums is None else (y, tf.reduce_sum(y))  # the sum: SumNote

        if spec is None:
            return tf.function(lambda v: counted(v), input_signature=[vspec])
        return tf.function(counted, input_signature=[vspec, spec])

    def _one(self, v: tf.Tensor, batch: Any) -> tf.Tensor:
        """One product on one batch."""
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

    def _many(self, V: tf.Tensor, batch: Any) -> tf.Tensor:
        """``(n, k)`` products on one batch, vectorized over the columns.

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
        out = tf.vectorized_map(lambda col: self._one(col, batch), tf.transpose(V),
                                fallback_to_while_loop=True, warn=False)
        return tf.transpose(out)

    def _split(self, v: tf.Tensor) -> list[tf.Tensor]:
        return [tf.reshape(t, s) for t, s in zip(tf.split(v, self._sizes), self._shapes)]

    def _flat(self, parts: list[tf.Tensor]) -> tf.Tensor:
        return tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)


def _skeleton(batch: Any) -> Any:
    """``batch`` with its tensors replaced by one marker: equal for batches of one structure."""
    return map_batch(lambda a: _TENSOR if isinstance(a, tf.Tensor) else a, batch)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # leaves whose == is not a bool (arrays): their tensors' count was compared
        return True


_TENSOR = object()


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
        ``hvp``, ``cache``, ``batched``, ``check_deterministic``, ``check_symmetric``, ``verify``, ``check_finite``,
        ``check_loss_dtype``: see :class:`TensorFlowBackend`.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    names, variables, call = model_variables(model, params)
    if options.get("check_loss_dtype", True) is True:
        check_loss_object(loss_fn, variables)

    def loss(batch: Any) -> tf.Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("each batch must be a pair (inputs, targets)")
        inputs, targets = batch
        return loss_fn(targets, call(inputs))

    return TensorFlowBackend(loss, variables, Dataset(data, resolve_reduction(loss_fn, reduction)),
                             names=names, **options)


def hessian_of(f: Callable[..., tf.Tensor], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> TensorFlowBackend:
    """TensorFlow backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is a ``tf.Variable`` (or Keras variable), or a list/tuple/dict of them; ``f``
    receives that same structure and must compute with it. The Hessian is taken at the variables'
    current values, with respect to all of them flattened in order.
    """
    names, variables = hessian_of_variables(params)
    if data is None:
        loss = lambda batch: f(params)  # noqa: E731
    else:
        loss = lambda batch: f(params, batch)  # noqa: E731
    return TensorFlowBackend(loss, variables, Dataset(data, reduction), names=names, **options)
