"""JAX backend: Hessian-vector products of a loss of a parameter pytree.

The operator acts on the parameters flattened in pytree order (:func:`jax.flatten_util.ravel_pytree`),
so any model whose parameters are a pytree works: plain dicts/lists of arrays, Flax linen
``variables`` with ``module.apply``, Flax NNX modules directly (their ``nnx.Param`` variables),
Equinox modules (pass the filtered array part, e.g. ``eqx.partition(model, eqx.is_array)[0]``).

How a product is computed, chosen with ``hvp=``:

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(loss))``, jitted;
* ``"reverse"`` -- reverse-over-reverse, ``grad(v . grad(loss))``, jitted;

and what is kept between products, chosen with ``cache=``:

* ``cache=True``: per batch, ``jax.linearize(grad(loss))`` once (one forward and backward pass),
  then every product is the jitted linear map (the saved residuals stay in memory);
* ``cache=False``: every product recomputes the forward and backward pass.

``"auto"`` picks what ``benchmarks/hvp_jax.py`` measured as fastest: the linearized map when the
data is one batch (``cache="auto"``), forward-over-reverse otherwise.

float64 needs ``jax.config.update("jax_enable_x64", True)`` *before* the parameters are created:
it is a global JAX flag, and without it JAX silently computes in float32.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from curvop.backends.jax import sharding
from curvop.backends.jax.model import check_batch, model_apply, prepare_params
from curvop.backends.dataset import Dataset, resolve_reduction
from curvop.backends.faults import SumNote
from curvop.backends.template import AutodiffBackend, LossInfo

__all__ = ["JaxBackend", "hessian", "hessian_of", "prepare_params"]

Array = jax.Array


class JaxBackend(AutodiffBackend):
    """Products of the Hessian of ``loss(params, batch)`` over a :class:`Dataset`.

    Parameters
    ----------
    loss : callable
        ``loss(params, batch)`` -> scalar; jit-compatible (pure, no Python side effects).
    params : pytree of arrays
        The point at which the Hessian is taken: one floating dtype (float32 or float64), one device.
    dataset : Dataset
    hvp : {"auto", "forward", "reverse"}
        ``"auto"`` is ``"forward"`` (faster than reverse on CPU in ``benchmarks/hvp_jax.py``).
    cache : {"auto", True, False}
        Linearize once per batch (``True``) or recompute per product. ``"auto"``: cache when the
        data is a single batch. With ``cache=True`` the mode is forward (a linearization).
    batched : {"auto", True, False}
        ``hvp_batch`` with ``jax.vmap`` over the columns (``True``) or a loop (``False``).
        ``"auto"`` is ``vmap`` (faster than a loop on CPU in ``benchmarks/hvp_jax.py``; on GPUs it
        batches the kernels).
    check_deterministic : bool
        Compare two products with the same vector when the operator is built (default on).
    check_symmetric, verify : bool
        Compare ``u·(Hw)`` with ``w·(Hu)`` at build (default: as ``check_deterministic``; no product
        more) / ``H v`` with
        central differences of the gradient (default off): :mod:`curvop.backends.selfcheck`.
    check_finite : bool
        Check each product for NaN/Inf (one reduction and host sync per product); when it is not
        finite, recompute batch by batch and raise ``NonFiniteProductError`` naming the batch.
    check_loss_dtype : bool
        Raise ``LossPrecisionError`` if the loss has a lower precision than the parameters.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> B = JaxBackend(lambda w, batch: jnp.sum(w ** 4), jnp.array([1.0, 2.0]), Dataset(None))
    >>> B.hvp(jnp.array([1.0, 0.0]))
    Array([12.,  0.], dtype=float32)
    """

    name = "jax"
    loss_zero_dim = True
    batch_errors = (NotImplementedError,)  # a primitive without a batching rule

    def __init__(
        self,
        loss: Callable[[Any, Any], Array],
        params: Any,
        dataset: Dataset,
        *,
        hvp: str = "auto",
        cache: bool | str = "auto",
        batched: bool | str = "auto",
        check_deterministic: bool = True,
        check_symmetric: bool | None = None,
        verify: bool = False,
        check_finite: bool = True,
        check_loss_dtype: bool = True,
    ):
        params, infos = prepare_params(params)
        self._begin(dataset, infos, hvp=hvp, cache=cache, batched=batched, check_deterministic=check_deterministic,
                    check_symmetric=check_symmetric, verify=verify, check_finite=check_finite,
                    check_loss_dtype=check_loss_dtype)
        self._block_list = [(i.name, int(np.size(leaf))) for i, leaf in zip(infos, jax.tree_util.tree_leaves(params))]
        self._loss, self._params = loss, params
        first = dataset.first()
        check_batch(first)
        self._layout = sharding.layout(params, first)  # None unless leaves are sharded
        # the columns of a block back to back on one batch of a sharded model deadlock XLA's CPU
        # collectives (4 host devices, to_dense): one pass per column there, as before
        self.one_pass_blocks = self._layout is None
        flat, self._unravel = ravel_pytree(params) if self._layout is None else self._layout.spec()
        self.size = int(flat.shape[0])
        if self.size == 0:
            raise ValueError("params has no entries: the Hessian would be empty")
        self.jax_dtype = flat.dtype
        self.dtype = np.dtype(flat.dtype)
        self.device = next(iter(flat.devices()))
        self.sharding = flat.sharding  # one device, replicated over a mesh, or the sharded layout's
        self._devices = set(self.sharding.device_set)
        # parameters on the default device, not placed there by the user: vectors made here are
        # placed the same way, since jit compiles again for an argument committed to a device
        self._uncommitted = self._layout is None and not flat.committed
        self._host_readable = len(self.sharding.device_set) == 1 and self.device.platform == "cpu"
        # several host (CPU) devices: XLA's in-process collectives can deadlock when programs with
        # collectives are in flight at once on a loaded machine, so each batch's product is waited for
        self._serial = len(self.sharding.device_set) > 1 and self.device.platform == "cpu"
        self._complete(_loss_info(loss, params, first), check_loss_dtype)

    # --- the template's hooks ---------------------------------------------------------------------
    def _auto_options(self) -> dict[str, Any]:
        return {"hvp": "forward", "cache": self.dataset.single, "batched": True}

    def _resolved(self) -> None:
        ravel = (lambda tree: ravel_pytree(tree)[0]) if self._layout is None else self._layout.ravel  # noqa: E731
        unravel, grad_fn = self._unravel, jax.grad(self._loss)

        def forward(p, batch, v):
            return ravel(jax.jvp(lambda q: grad_fn(q, batch), (p,), (unravel(v),))[1])

        def reverse(p, batch, v):
            return ravel(jax.grad(lambda q: jnp.vdot(ravel(grad_fn(q, batch)), v))(p))

        self._sums = SumNote() if self.check_finite else None
        self._last_lin: tuple[Any, Any, Any] | None = None  # (params, batch, linear map) of the latest fresh product

        def summed(f):  # with check_finite, a compiled product also returns the sum of its entries
            if self._sums is None:
                return f
            return lambda *args: (lambda y: (y, jnp.sum(y)))(f(*args))

        def gradient_at(p, batch, v, t):
            return ravel(grad_fn(jax.tree_util.tree_map(lambda a, d: a + t * d, p, unravel(v)), batch))

        self._grad_at = jax.jit(gradient_at)
        one = forward if self.mode == "forward" else reverse
        self._fresh1 = jax.jit(summed(one))
        self._freshk = jax.jit(summed(jax.vmap(one, in_axes=(None, None, 1), out_axes=1)))
        if self.cache:
            self.mode = "forward"  # a linearization
            cpu = self.device.platform == "cpu"
            # the linear map applied per product is compiled at LLVM level 1 on CPU: its compile
            # took 0.8x (MLP) and 0.8-0.9x (transformer) of level 2's, products the same to within
            # the noise (median ratios 1.005, 0.98, 0.994 on the MLP, CNN and transformer of
            # benchmarks/baselines.py; benchmarks/build_profile.py shows the build's compiles)
            o1 = {"xla_backend_optimization_level": 1} if cpu else None
            apply = lambda lin, v: ravel(lin(unravel(v)))  # noqa: E731
            self._lin = (jax.jit(summed(apply), compiler_options=o1),
                         jax.jit(summed(jax.vmap(apply, in_axes=(None, 1), out_axes=1)), compiler_options=o1))
            # linearize inside jit: one compiled forward+backward per batch shape, returning the
            # linear map (a jax.tree_util.Partial holding the residuals) to apply per product. It
            # runs a few times per batch (the build's check and the cache), so on CPU it is compiled
            # without LLVM's optimisations: half the compile time, which dominates the build
            # (benchmarks/baselines.py), for tens of milliseconds more per run.
            fast = {"xla_backend_optimization_level": 0} if cpu else None
            self._linearize_jit = jax.jit(lambda p, b: jax.linearize(lambda q: grad_fn(q, b), p)[1],
                                          compiler_options=fast)

    def _rebind(self, params: Any) -> None:
        """:meth:`on` at new parameter values: the same pytree structure, shapes and dtype (the
        compiled products take the parameters as an argument, so nothing is compiled again)."""
        if params is None:
            return
        new, _ = prepare_params(params)
        old_tree, new_tree = jax.tree_util.tree_structure(self._params), jax.tree_util.tree_structure(new)
        same = old_tree == new_tree and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree_util.tree_leaves(self._params), jax.tree_util.tree_leaves(new)))
        if not same:
            raise ValueError("on(data, params=...) needs parameters of the operator's structure, shapes and dtype; "
                             "build a new operator with curvop.hessian_of for other parameters")
        self._params = new

    def _products(self, v: Array, batched: Any, fresh: bool = False) -> Iterator[tuple[Array, Any]]:
        for p, w in super()._products(v, batched, fresh):
            yield (jax.block_until_ready(p) if self._serial else p), w

    def _product(self, v: Array, batch: Any, batched: bool) -> Array:
        if self.cache:  # linearized afresh and applied: the cache's two compiled functions, no third to compile
            lin = self._linearize_jit(self._params, batch)
            if self._cached is None:  # the build's check before the cache: its last linearisation becomes it
                self._last_lin = (self._params, batch, lin)
            return _apply_linear(self._lin, lin, self._sums, v, batched)
        out = (self._freshk if batched else self._fresh1)(self._params, batch, v)
        return out if self._sums is None else self._sums.put(out)

    def _linearize(self, batch: Any) -> Callable[[Array, bool], Array]:
        last, self._last_lin = self._last_lin, None
        if last is not None and last[0] is self._params and last[1] is batch:  # the same (immutable) arrays
            lin = last[2]
        else:
            lin = self._linearize_jit(self._params, batch)
        return partial(_apply_linear, self._lin, lin, self._sums)  # no reference to self

    def _blocks(self) -> list[tuple[str, int]]:
        return self._block_list  # pytree paths, in ravel_pytree's order

    def _batch_gradient(self, batch: Any, v: Array, t: float) -> Array:
        return self._grad_at(self._params, batch, v, jnp.asarray(t, dtype=self.jax_dtype))

    def _all_finite(self, y: Array) -> bool:
        if self._sums is not None and self._sums.finite(y):  # the sum computed with the product
            return True
        if self._host_readable:  # numpy reads a one-CPU-device buffer in place (~13 us for 26k entries)
            return bool(np.isfinite(np.asarray(y)).all())
        return bool(_all_finite(y))  # one compiled reduction: eager isfinite + all dispatch twice

    def _param_advice(self) -> dict[str, str]:
        return {
            "dtype_fix": "the flattened operator needs one dtype: convert them, e.g. "
                         "jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)",
            "device_fix": "jax.device_put(params, device)",
            "float_fix": "leave integer leaves such as step counters out of params, or close over them in the loss",
            "half_fix": "convert them, e.g. jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)",
        }

    def _loss_type(self) -> str:
        return "JAX scalar"

    def _reduce_advice(self) -> str:
        return "reduce it over samples (e.g. jnp.mean), not per sample"

    # --- array glue -------------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def check(self, x: Array) -> None:
        if x.dtype != self.jax_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype}, but the parameters are {self.jax_dtype}; convert it with "
                f"x.astype(jnp.{self.jax_dtype})"
            )
        devices = x.devices()
        if devices != self._devices:
            raise ValueError(
                f"vector is on {', '.join(map(str, devices))}, but the parameters are on "
                f"{', '.join(map(str, sorted(self.sharding.device_set, key=str)))}; "
                "move it with jax.device_put(x, device)"
            )

    def to_numpy(self, x: Array) -> np.ndarray:
        # np.asarray shares a CPU buffer, but read-only (JAX arrays are immutable); scipy and users
        # expect a writable result, so copy once in that case (device arrays are copied once anyway).
        a = np.asarray(x)
        return a if a.flags.writeable else a.copy()

    def from_numpy(self, a: np.ndarray) -> Array:
        a = np.asarray(a, dtype=self.dtype)
        if self._uncommitted:  # like the parameters (and jnp's arrays): one compilation serves both
            x = jnp.asarray(a)  # on the default device
            if x.devices() == {self.device}:
                return x
        where = self.sharding if self._layout is None else self._layout.sharding_for(np.shape(a))
        return jax.device_put(a, where)

    def describe(self) -> str:
        if self._cached is not None:
            how = "linearized (cached; auto: one batch)" if self._options.get("cache") == "auto" else "linearized (cached)"
        else:
            how = f"{self.mode} mode{' (auto)' if self._options.get('hvp') == 'auto' else ''}, uncached"
        where = self.device if self._layout is None else self._layout.describe()
        return f"jax {how}, n={self.size}, {self.dtype} on {where}{self._note()}"


_all_finite = jax.jit(lambda y: jnp.isfinite(y).all())


def _apply_linear(lin_fns: tuple[Callable, Callable], lin: Any, note: SumNote | None, v: Array, batched: bool) -> Array:
    out = lin_fns[1 if batched else 0](lin, v)
    return out if note is None else note.put(out)


def _loss_info(loss: Callable[[Any, Any], Array], params: Any, batch: Any) -> LossInfo:
    """The loss's shape and dtype on the first batch (traced, not computed), for the template's check."""
    try:
        out = jax.eval_shape(loss, params, batch)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"could not trace the loss with JAX ({type(err).__name__}: {err}); the loss must be a pure function "
            "of JAX arrays (no numpy, torch or Python control flow on parameter values)"
        ) from err
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        return LossInfo(False, type(out).__name__, (), "", False)
    dt = np.dtype(out.dtype)
    return LossInfo(True, "JAX scalar", tuple(out.shape), dt.name, dt.kind == "f")


def hessian(
    model: Any,
    loss_fn: Callable[[Array, Any], Array],
    data: Any,
    *,
    params: Any = None,
    reduction: str | None = None,
    **options: Any,
) -> JaxBackend:
    """JAX backend for :func:`curvop.hessian`.

    Parameters
    ----------
    model : ``(apply_fn, params)``, ``apply_fn``, or a Flax NNX module
        ``apply_fn(params, inputs)`` returns the model outputs (Flax linen: ``module.apply`` with
        ``params = variables`` or ``{"params": ...}``). With a bare ``apply_fn`` pass ``params=``.
        An ``nnx.Module`` is called as ``model(inputs)`` (``model(*inputs)`` for a tuple,
        ``model(**inputs)`` for a dict) on its ``nnx.Param`` variables; its other state (batch
        statistics, RNG keys) is held fixed, and the module itself is never modified. Call
        ``model.eval()`` first if it has dropout or BatchNorm.
    loss_fn : callable
        ``loss_fn(outputs, targets)`` -> scalar, for every kind of ``model``.
    data : batch ``(inputs, targets)`` or a re-iterable of batches
    params : pytree, optional
        The parameters (when ``model`` is a bare ``apply_fn``), or overriding those in ``model``.
        For an NNX module, an NNX filter choosing the variables (default ``nnx.Param``), e.g.
        ``nnx.All(nnx.Param, nnx.PathContains("head"))``; the others are held fixed.
    reduction : {"mean", "sum"}, optional
        How ``loss_fn`` reduces over samples (read from ``loss_fn.reduction``, default mean).
    **options
        ``hvp``, ``cache``, ``batched``, ``check_deterministic``, ``check_symmetric``, ``verify``,
        ``check_finite``, ``check_loss_dtype``: see :class:`JaxBackend`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, curvop
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> curvop.hessian(model, lambda out, t: jnp.mean((out - t) ** 2), (x, y)).shape
    (8, 8)
    """
    apply_fn, p = model_apply(model, params)

    def loss(q: Any, batch: Any) -> Array:
        inputs, targets = batch
        return loss_fn(apply_fn(q, inputs), targets)

    return JaxBackend(loss, p, Dataset(data, resolve_reduction(loss_fn, reduction)), **options)


def hessian_of(f: Callable[..., Array], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> JaxBackend:
    """JAX backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is any pytree of arrays (JAX arrays; numpy arrays are converted); ``f`` receives the
    same structure and must be a pure, jit-compatible function of it.
    """
    loss = (lambda p, batch: f(p)) if data is None else f  # noqa: E731
    return JaxBackend(loss, params, Dataset(data, reduction), **options)
