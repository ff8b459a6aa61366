"""The curvature family on TensorFlow: Jacobian products of a Keras model or ``tf.Module``, and the
loss's derivatives with respect to the outputs, each in a ``tf.function``.

:class:`TensorFlowCurvature` is the template of the family
(:class:`curvop.backends.curvature.CurvatureBackend`: ``Jᵀ A J``, the weighting, the Monte-Carlo
seeds) on :class:`curvop.backends.tensorflow.TensorFlowBackend` (variables, batches, array glue).
``J v``: a ``tf.autodiff.ForwardAccumulator`` (``hvp="forward"``) or the backward of a backward
(``"reverse"``); ``Jᵀ u``: a ``GradientTape``. TensorFlow keeps no linearisation, so
``cache=True`` keeps the outputs and the output-space matrix only. Blocks use ``tf.vectorized_map``
(``batched=True``) or a loop. The loss follows the Keras order ``loss_fn(targets, outputs)``.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from curvop.backends.curvature import CurvatureBackend, Linearization
from curvop.backends.dataset import Dataset, resolve_reduction
from curvop.backends.tensorflow.backend import TensorFlowBackend
from curvop.backends.tensorflow.model import check_loss_object, model_variables, to_tensors
from curvop.backends.tensorflow.sampling import likelihood_of, sample_targets

__all__ = ["TensorFlowCurvature", "fisher", "ggn", "jacobian"]

_ZERO = tf.UnconnectedGradients.ZERO


class TensorFlowCurvature(CurvatureBackend, TensorFlowBackend):
    """The GGN, a Fisher or ``JᵀJ`` of ``call(inputs)`` with respect to ``variables`` over a :class:`Dataset`.

    ``criterion(targets, outputs)`` is the loss (``None`` for the Jacobian); the options are
    :class:`~curvop.backends.tensorflow.TensorFlowBackend`'s and the family's (:func:`fisher`).
    """

    sample_targets = staticmethod(sample_targets)

    def __init__(self, call: Callable[[Any], tf.Tensor], criterion: Callable[..., tf.Tensor] | None,
                 variables: list[tf.Variable], dataset: Dataset, *, curvature: str, likelihood: str | None = None,
                 mc_samples: int = 1, seed: int | None = None, **options: Any):
        self._call, self._criterion = call, criterion
        self._curvature_options(curvature, likelihood, mc_samples, seed)
        if curvature == "jacobian":
            loss = lambda batch: 0.5 * tf.reduce_sum(tf.square(call(_inputs(batch, True))))  # noqa: E731
        else:
            loss = lambda batch: criterion(batch[1], call(batch[0]))  # noqa: E731
        self._build_functions()
        TensorFlowBackend.__init__(self, loss, variables, dataset, **options)

    def _auto_options(self) -> dict[str, Any]:
        return {**super()._auto_options(), "cache": self.dataset.single}

    def _build_functions(self) -> None:
        fn = lambda f: tf.function(f, reduce_retracing=True)  # noqa: E731
        self._f_outputs = fn(self._call)
        self._f_jvp, self._f_vjp = fn(self._jvp_one), fn(self._vjp_one)
        self._f_jvp_block = fn(lambda V, x: tf.vectorized_map(lambda c: self._jvp_one(c, x), tf.transpose(V),
                                                              fallback_to_while_loop=True, warn=False))
        self._f_vjp_block = fn(lambda U, x: tf.transpose(tf.vectorized_map(lambda u: self._vjp_one(u, x), U,
                                                                           fallback_to_while_loop=True, warn=False)))
        self._f_hvp, self._f_grad = fn(self._output_hvp_one), fn(self._output_grad_one)
        self._f_hvp_block = fn(lambda f, t, U: tf.vectorized_map(lambda u: self._output_hvp_one(f, t, u), U,
                                                                 fallback_to_while_loop=True, warn=False))
        self._f_grads = fn(lambda f, T: tf.vectorized_map(lambda t: self._output_grad_one(f, t), T,
                                                          fallback_to_while_loop=False, warn=False))

    # --- traced bodies ----------------------------------------------------------------------------
    def _jvp_one(self, v: tf.Tensor, x: Any) -> tf.Tensor:
        if self.mode == "forward":
            with tf.autodiff.ForwardAccumulator(self._vars, self._split(v)) as acc:
                out = self._call(x)
            return acc.jvp(out, unconnected_gradients=_ZERO)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(self._vars)
            out = self._call(x)
        dummy = tf.zeros_like(out)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(dummy)
            g = inner.gradient(out, self._vars, output_gradients=dummy, unconnected_gradients=_ZERO)
        return outer.gradient(g, dummy, output_gradients=self._split(v), unconnected_gradients=_ZERO)

    def _vjp_one(self, u: tf.Tensor, x: Any) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._vars)
            out = self._call(x)
        return self._flat(tape.gradient(out, self._vars, output_gradients=u, unconnected_gradients=_ZERO))

    def _output_grad_one(self, f: tf.Tensor, t: Any) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(f)
            loss = self._criterion(t, f)
        return tape.gradient(loss, f, unconnected_gradients=_ZERO)

    def _output_hvp_one(self, f: tf.Tensor, t: Any, u: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(f)
            g = self._output_grad_one(f, t)
        return outer.gradient(g, f, output_gradients=u, unconnected_gradients=_ZERO)

    # --- the template's members -------------------------------------------------------------------
    def _prepare_batch(self, batch: Any) -> Any:
        """The batch as tensors (the family's products take the batch itself, not the Hessian's
        flattened, signature-keyed form)."""
        return None if batch is None else to_tensors(batch)

    def _jacobian(self, batch: Any, cached: bool) -> Linearization:
        x = _inputs(batch, self.curvature == "jacobian")
        with tf.device(self.device):
            out = self._f_outputs(x)
        return Linearization(out, _Bound(self._f_jvp, self._f_jvp_block, x), _Bound(self._f_vjp, self._f_vjp_block, x))

    def _output_hvp(self, outputs: tf.Tensor, batch: Any) -> Callable[[tf.Tensor, bool], tf.Tensor]:
        return _Bound(lambda u, t: self._f_hvp(outputs, t, u), lambda U, t: self._f_hvp_block(outputs, t, U), batch[1])

    def _output_grad(self, outputs: tf.Tensor, batch: Any, targets: Any = None) -> tf.Tensor:
        return self._f_grad(outputs, batch[1] if targets is None else targets)

    def _output_grads(self, outputs: tf.Tensor, batch: Any, draws: list[Any]) -> tf.Tensor:
        try:
            return self._f_grads(outputs, tf.stack(draws))
        except (ValueError, TypeError, NotImplementedError, tf.errors.OpError) as err:
            return self._looped_grads(err, "tf.vectorized_map", outputs, batch, draws)


class _Bound:
    """``f(v, batched)`` from a single and a block function of ``(v, x)`` with ``x`` bound (no reference
    to the backend)."""

    __slots__ = ("one", "block", "x")

    def __init__(self, one: Callable, block: Callable, x: Any):
        self.one, self.block, self.x = one, block, x

    def __call__(self, v: tf.Tensor, batched: bool) -> tf.Tensor:
        return (self.block if batched else self.one)(v, self.x)


def _inputs(batch: Any, jacobian: bool) -> Any:
    if jacobian and (isinstance(batch, (tf.Tensor, dict)) or hasattr(batch, "shape")):
        return batch
    return batch[0]


def _build(model: Any, loss_fn: Any, data: Any, curvature: str, params: Any, reduction: str | None,
           options: dict[str, Any], **family: Any) -> TensorFlowCurvature:
    names, variables, call = model_variables(model, params)
    if curvature == "jacobian":
        dataset = Dataset(data, "sum", single=True if hasattr(data, "shape") else None)
    else:
        if not callable(loss_fn):
            raise ValueError(f"the {curvature} needs the loss: pass loss_fn(targets, outputs) (Keras order)")
        if options.get("check_loss_dtype", True) is True:
            check_loss_object(loss_fn, variables)
        dataset = Dataset(data, resolve_reduction(loss_fn, reduction))
    return TensorFlowCurvature(call, loss_fn, variables, dataset, names=names, curvature=curvature, **family,
                               **options)


def ggn(model: Any, loss_fn: Callable[..., tf.Tensor], data: Any, *, params: Any = None,
        reduction: str | None = None, **options: Any) -> TensorFlowCurvature:
    """TensorFlow backend for :func:`curvop.ggn`; the arguments are :func:`curvop.backends.tensorflow.hessian`'s."""
    return _build(model, loss_fn, data, "ggn", params, reduction, options)


def fisher(model: Any, loss_fn: Callable[..., tf.Tensor], data: Any, *, kind: str = "mc", mc_samples: int = 1,
           seed: int | None = None, likelihood: str | None = None, params: Any = None,
           reduction: str | None = None, **options: Any) -> TensorFlowCurvature:
    """TensorFlow backend for :func:`curvop.fisher`; ``likelihood`` is read from a Keras loss object
    (``SparseCategoricalCrossentropy``/``CategoricalCrossentropy``/``BinaryCrossentropy`` with
    ``from_logits=True``, ``MeanSquaredError``) when not given."""
    if kind not in ("mc", "empirical"):
        raise ValueError(f"kind must be 'mc' (targets sampled from the model) or 'empirical' (true targets), got {kind!r}")
    if kind == "empirical":
        return _build(model, loss_fn, data, "empirical", params, reduction, options)
    return _build(model, loss_fn, data, "mc", params, reduction, options, mc_samples=mc_samples, seed=seed,
                  likelihood=likelihood if likelihood is not None else likelihood_of(loss_fn))


def jacobian(model: Any, data: Any, *, params: Any = None, **options: Any) -> TensorFlowCurvature:
    """TensorFlow backend for :func:`curvop.jacobian`: ``θ ↦ model(inputs)`` over ``data``."""
    return _build(model, None, data, "jacobian", params, "sum", options)
