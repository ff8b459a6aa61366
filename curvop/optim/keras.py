"""AdaHessian, Sophia-H and Sophia-G for Keras 3 ``model.fit``: an optimizer and its curvature callback.

Keras gives an optimizer only the gradients, compiled into the training step, so the curvature is
estimated outside it: :class:`CurvatureCallback`, before each training batch that needs one,
builds (once) and moves (:meth:`curvop.HessianOperator.on`) an operator of the model's loss on a
batch of its own data, estimates the diagonal with :func:`curvop.diagonal` (Sophia-G: the
Gauss-Newton-Bartlett estimate), and hands it to the optimizer, whose ``update_step`` applies the
rule (:mod:`curvop.optim.rules`) inside the compiled step::

    opt = curvop.optim.keras.AdaHessian(learning_rate=0.1)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, callbacks=[curvop.optim.keras.CurvatureCallback((x, y), batch_size=64)])

Keras tells neither the optimizer nor a callback which batch a step trains on, so the curvature
comes from the callback's batch (drawn from ``data``, seeded), not the step's. Weight decay is
decoupled (``p ← p − lr·wd·p`` before the update), in the variable's dtype; the learning rate is a
Keras variable of ``keras.backend.floatx()`` (set it to ``"float64"`` for a float64 model). 4-D variables are
convolution kernels ``(height, width, in, out)``, averaged over axes 0 and 1 by AdaHessian.
"""

from __future__ import annotations

from typing import Any, Iterator

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import curvop
from curvop.optim.rules import check_adahessian, check_sophia, curvature_step, probe_rng
from curvop.backends.tensorflow import likelihood_of, sample_targets

__all__ = ["AdaHessian", "SophiaH", "SophiaG", "CurvatureCallback"]


class _Curvature(keras.optimizers.Optimizer):
    """The curvature variables the callback fills, and the Hutchinson estimate it calls."""

    def __init__(self, learning_rate: Any, weight_decay: float, seed: int, num_probes: int, name: str, **kwargs: Any):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        # decoupled decay applied in update_step, in the variable's dtype (Keras' own casts the rate via float32)
        self.decay, self.seed, self.num_probes, self._operator = float(weight_decay), int(seed), int(num_probes), None

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._curvature = self.add_optimizer_variables(var_list, "curvature")
        self._curvature_step = self.add_variable((), initializer="zeros", dtype="int64", name="curvature_step")

    def needs_curvature(self, step: int) -> bool:
        """Whether step ``step`` (from 1) uses a fresh curvature estimate."""
        return True

    def set_curvature(self, variables: list[Any], values: list[Any], step: int) -> None:
        """Store the estimate for step ``step`` (one tensor per variable, in ``variables``' order)."""
        for v, d in zip(variables, values):
            if d is None:  # a variable the loss does not use
                continue
            self._curvature[self._get_variable_index(v)].assign(ops.cast(ops.reshape(d, v.shape), v.dtype))
        self._curvature_step.assign(step)

    def estimate(self, model: Any, loss_fn: Any, batch: Any, step: int) -> list[Any]:
        """Hutchinson's estimate of diag(H) of ``loss_fn`` on ``batch``, per trainable variable."""
        variables = list(model.trainable_variables)
        if self._operator is None:
            self._operator = curvop.hessian(model, loss_fn, batch, params=variables, check_deterministic=False,
                                            check_finite=False)
            H = self._operator
        else:
            H = self._operator.on(batch)
        d = curvop.diagonal(H, num_matvecs=self.num_probes, seed=probe_rng(self.seed, step)).estimate
        return tf.split(d, [int(np.prod(v.shape)) for v in variables])

    def _fresh(self) -> Any:
        return ops.equal(self._curvature_step, self.iterations + 1)

    def _decay(self, variable: Any, lr: Any) -> None:
        """``p ← p − lr·wd·p``, before the update (decoupled weight decay)."""
        if self.decay:
            self.assign_sub(variable, lr * ops.convert_to_tensor(self.decay, variable.dtype) * variable)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "weight_decay": self.decay, "seed": self.seed, "num_probes": self.num_probes}


class AdaHessian(_Curvature):
    """AdaHessian for ``model.fit`` (with :class:`CurvatureCallback`): the rule of :mod:`curvop.optim.rules`.

    Parameters
    ----------
    learning_rate, beta_1, beta_2, epsilon, weight_decay, hessian_power
        The rule's lr, β₁, β₂, ε, decoupled weight decay and power k (Keras' names).
    seed, num_probes
        Probes of step t drawn from ``(seed, t)``; one Hessian-vector product each.
    """

    def __init__(self, learning_rate: Any = 0.15, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, *, seed: int = 0, num_probes: int = 1,
                 name: str = "adahessian", **kwargs: Any):
        check_adahessian(learning_rate if isinstance(learning_rate, (int, float)) else 0.0, (beta_1, beta_2), epsilon,
                         weight_decay, hessian_power, num_probes)
        super().__init__(learning_rate, weight_decay, seed, num_probes, name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon, self.hessian_power = beta_1, beta_2, epsilon, hessian_power

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._hessian_sq = self.add_optimizer_variables(var_list, ["momentum", "hessian_sq"])

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        i, dt = self._get_variable_index(variable), variable.dtype
        tf.debugging.assert_equal(self._fresh(), True, message=(
            "AdaHessian has no curvature estimate for this step: pass its CurvatureCallback to model.fit "
            "(callbacks=[curvop.optim.keras.CurvatureCallback(data)]), with steps_per_execution=1"))
        lr, g, t = ops.cast(learning_rate, dt), ops.cast(gradient, dt), ops.cast(self.iterations + 1, dt)
        b1, b2 = ops.convert_to_tensor(self.beta_1, dt), ops.convert_to_tensor(self.beta_2, dt)  # not via float32
        d = self._curvature[i]
        if len(variable.shape) == 4:
            d = ops.broadcast_to(ops.mean(d, axis=(0, 1), keepdims=True), variable.shape)
        m, v = self._momentums[i], self._hessian_sq[i]
        self.assign(m, b1 * m + (1 - b1) * g)
        self.assign(v, b2 * v + (1 - b2) * d * d)
        self._decay(variable, lr)
        m_hat, v_hat = m / (1 - ops.power(b1, t)), v / (1 - ops.power(b2, t))
        self.assign_sub(variable, lr * m_hat / (ops.power(ops.sqrt(v_hat), self.hessian_power) + self.epsilon))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                "hessian_power": self.hessian_power}


class _Sophia(_Curvature):
    def __init__(self, learning_rate: Any, beta_1: float, beta_2: float, rho: float, weight_decay: float,
                 epsilon: float, every: int, seed: int, num_probes: int, name: str, **kwargs: Any):
        check_sophia(learning_rate if isinstance(learning_rate, (int, float)) else 0.0, (beta_1, beta_2), rho,
                     weight_decay, epsilon, every, num_probes)
        super().__init__(learning_rate, weight_decay, seed, num_probes, name, **kwargs)
        self.beta_1, self.beta_2, self.rho, self.epsilon, self.every = beta_1, beta_2, rho, epsilon, int(every)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._hessians = self.add_optimizer_variables(var_list, ["momentum", "hessian"])

    def needs_curvature(self, step: int) -> bool:
        return curvature_step(step, self.every)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        i, dt = self._get_variable_index(variable), variable.dtype
        lr, g = ops.cast(learning_rate, dt), ops.cast(gradient, dt)
        b1, b2 = ops.convert_to_tensor(self.beta_1, dt), ops.convert_to_tensor(self.beta_2, dt)  # not via float32
        m, h = self._momentums[i], self._hessians[i]
        self.assign(m, b1 * m + (1 - b1) * g)
        self.assign(h, ops.where(self._fresh(), b2 * h + (1 - b2) * self._curvature[i], h))
        self._decay(variable, lr)
        ratio = ops.minimum(ops.abs(m) / ops.maximum(self.rho * h, self.epsilon), 1.0)
        self.assign_sub(variable, lr * ops.sign(m) * ratio)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "rho": self.rho,
                "epsilon": self.epsilon, "every": self.every}


class SophiaH(_Sophia):
    """Sophia-H for ``model.fit`` (with :class:`CurvatureCallback`): ĥ = Hutchinson's diag(H) every ``every`` steps."""

    def __init__(self, learning_rate: Any = 1e-4, beta_1: float = 0.965, beta_2: float = 0.99, rho: float = 0.04,
                 weight_decay: float = 0.1, epsilon: float = 1e-15, every: int = 10, *, seed: int = 0,
                 num_probes: int = 1, name: str = "sophia_h", **kwargs: Any):
        super().__init__(learning_rate, beta_1, beta_2, rho, weight_decay, epsilon, every, seed, num_probes, name,
                         **kwargs)


class SophiaG(_Sophia):
    """Sophia-G for ``model.fit`` (with :class:`CurvatureCallback`): ĥ = B·ĝ², ĝ the gradient on sampled
    targets (the curvature family's draws, :func:`curvop.backends.tensorflow.sample_targets`), every ``every`` steps. No Hessian products."""

    def __init__(self, learning_rate: Any = 1e-4, beta_1: float = 0.965, beta_2: float = 0.99, rho: float = 0.04,
                 weight_decay: float = 0.1, epsilon: float = 1e-15, every: int = 10, *, seed: int = 0,
                 name: str = "sophia_g", **kwargs: Any):
        super().__init__(learning_rate, beta_1, beta_2, rho, weight_decay, epsilon, every, seed, 1, name, **kwargs)

    def estimate(self, model: Any, loss_fn: Any, batch: Any, step: int) -> list[Any]:
        likelihood = sophia_likelihood(loss_fn)
        x, _ = batch
        variables = list(model.trainable_variables)
        seed = int(probe_rng(self.seed, step).integers(2**31))
        with tf.GradientTape() as tape:
            out = model(x, training=False)
            sampled, scale = gnb_targets(loss_fn, likelihood, out, seed)
            loss = loss_fn(sampled, out)
        return [None if g is None else scale * g * g for g in tape.gradient(loss, variables)]


class CurvatureCallback(keras.callbacks.Callback):
    """Estimate the curvature before each ``model.fit`` step that needs it, for curvop's Keras optimizers.

    Parameters
    ----------
    data : (x, y) arrays, or an iterable of (x, y) batches (a list, a ``tf.data.Dataset``)
        Where the curvature batches come from: arrays are shuffled (seeded) and cut into
        ``batch_size`` batches; an iterable is cycled through.
    loss_fn : keras.losses.Loss, optional
        Default: the model's compiled loss, which must then be a ``keras.losses.Loss`` object (in
        the model's dtype, e.g. ``dtype="float64"`` for a float64 model).
    batch_size : int
        For array data.
    seed : int
        The shuffling of array data.
    """

    def __init__(self, data: Any, *, loss_fn: Any = None, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.data, self.loss_fn, self.batch_size, self.seed = data, loss_fn, int(batch_size), int(seed)
        self._stream: Iterator[Any] | None = None

    def _batches(self) -> Iterator[Any]:
        data = self.data
        if isinstance(data, tuple) and len(data) == 2 and all(hasattr(a, "shape") for a in data):
            x, y = (np.asarray(a) for a in data)
            rng = np.random.default_rng(self.seed)
            while True:
                order = rng.permutation(len(x))
                for i in range(0, len(x), self.batch_size):
                    idx = order[i:i + self.batch_size]
                    yield x[idx], y[idx]
        while True:
            empty = True
            for batch in data:
                empty = False
                yield tuple(batch)
            if empty:
                raise ValueError("CurvatureCallback's data yielded no batches")

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        opt = self.model.optimizer
        if not isinstance(opt, _Curvature):
            raise TypeError("CurvatureCallback feeds curvop's Keras optimizers (curvop.optim.keras.AdaHessian, "
                            f"SophiaH, SophiaG); the model was compiled with {type(opt).__name__}")
        if not opt.built:
            opt.build(self.model.trainable_variables)
        step = int(opt.iterations.numpy()) + 1
        if not opt.needs_curvature(step):
            return
        loss_fn = self.loss_fn if self.loss_fn is not None else self.model.loss
        if not isinstance(loss_fn, keras.losses.Loss):
            raise TypeError("CurvatureCallback needs the loss as a keras.losses.Loss object: compile the model with one "
                            f"(not {loss_fn!r}) or pass loss_fn=")
        if self._stream is None:
            self._stream = self._batches()
        values = opt.estimate(self.model, loss_fn, next(self._stream), step)
        opt.set_curvature(self.model.trainable_variables, values, step)


_SUPPORTED = (keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy,
              keras.losses.MeanSquaredError)


def _probabilities(loss_fn: Any) -> bool:
    """A cross-entropy of probabilities (``from_logits=False``): the logits are their logarithm."""
    return not isinstance(loss_fn, keras.losses.MeanSquaredError) and not loss_fn.get_config().get("from_logits")


def sophia_likelihood(loss_fn: Any) -> str:
    """The predictive distribution of a loss Sophia-G supports (the family's reading), or a clear error."""
    if not isinstance(loss_fn, _SUPPORTED):
        raise TypeError("Sophia-G samples targets from the model for keras.losses.SparseCategoricalCrossentropy, "
                        f"CategoricalCrossentropy or MeanSquaredError objects, got {type(loss_fn).__name__}; use "
                        "SophiaH for other losses")
    if getattr(loss_fn, "reduction", "sum_over_batch_size") not in ("sum_over_batch_size", "sum"):
        raise ValueError(f"the loss must be reduced ('sum_over_batch_size' or 'sum'), got {loss_fn.reduction!r}")
    if _probabilities(loss_fn):  # read as its logits' twin: log-probabilities are logits
        loss_fn = type(loss_fn).from_config({**loss_fn.get_config(), "from_logits": True})
    return likelihood_of(loss_fn)  # refuses label smoothing and ignore_class


def gnb_targets(loss_fn: Any, likelihood: str, outputs: tf.Tensor, seed: int) -> tuple[tf.Tensor, float]:
    """Targets drawn from the model at ``outputs`` (:func:`curvop.backends.tensorflow.sample_targets`)
    and B, the number of terms the loss averages over (1 for ``"sum"``): ``B·ĝ²`` is the
    Gauss-Newton-Bartlett estimate. MSE's terms ``(f − y)²`` are the NLL of ``y ~ N(f, 1/2)``.

    >>> import keras, tensorflow as tf
    >>> y, B = gnb_targets(keras.losses.MeanSquaredError(), "gaussian", tf.zeros((4, 3)), seed=0)
    >>> tuple(y.shape), B
    ((4, 3), 12.0)
    """
    f = tf.stop_gradient(outputs)
    logits = tf.math.log(f) if _probabilities(loss_fn) else f
    one_hot = isinstance(loss_fn, keras.losses.CategoricalCrossentropy)
    sampled = sample_targets(logits, likelihood, seed=seed, like=tf.zeros_like(f) if one_hot else None,
                             variance=0.5 if likelihood == "gaussian" else None)[0]
    terms = int(tf.size(f)) // (1 if likelihood == "gaussian" else int(f.shape[-1]))
    return sampled, float(terms if loss_fn.reduction == "sum_over_batch_size" else 1)
