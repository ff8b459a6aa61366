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

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from curvop.backends import _jax_sharding
from curvop.backends.base import Backend
from curvop.backends.base import check_deterministic as assert_deterministic
from curvop.backends.dataset import Dataset, batch_size, resolve_reduction

__all__ = ["JaxBackend", "hessian", "hessian_of", "prepare_params"]

Array = jax.Array


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def prepare_params(params: Any) -> Any:
    """Check a parameter pytree and return it with every leaf a ``jax.Array``.

    numpy leaves are converted with ``jnp.asarray`` (one copy); float64 numpy leaves are refused
    while ``jax_enable_x64`` is off, because JAX would silently round them to float32.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("params has no array leaves: the Hessian would be empty")
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path) or "params"
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, float)):
            raise TypeError(f"parameter {name} is a {type(leaf).__module__}.{type(leaf).__name__}, not a JAX or numpy array")
        dt = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.dtype(np.float64)
        if dt.kind != "f":
            raise TypeError(
                f"parameter {name} has dtype {dt}; the Hessian needs real floating-point parameters "
                "(leave integer leaves such as step counters out of params, or close over them in the loss)"
            )
        if dt == np.float64 and not _x64():
            raise TypeError(
                f"parameter {name} is float64 but JAX's 64-bit mode is off, so JAX would compute in float32; "
                'call jax.config.update("jax_enable_x64", True) at start-up, or convert params to float32'
            )
        out.append(leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
    dtypes = {np.dtype(x.dtype) for x in out}
    if len(dtypes) > 1:
        raise TypeError(
            f"parameters have mixed dtypes ({', '.join(sorted(map(str, dtypes)))}); the flattened operator needs "
            "one dtype: convert them, e.g. jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)"
        )
    # one device, or every leaf sharded/replicated over the same devices (curvop.backends._jax_sharding)
    out = _jax_sharding.place([jax.tree_util.keystr(p) or "params" for p, _ in
                               jax.tree_util.tree_flatten_with_path(params)[0]], out)
    return jax.tree_util.tree_unflatten(treedef, out)


class JaxBackend(Backend):
    """Products of the Hessian of ``loss(params, batch)`` over a :class:`Dataset`.

    Parameters
    ----------
    loss : callable
        ``loss(params, batch)`` -> scalar; jit-compatible (pure, no Python side effects).
    params : pytree of arrays
        The point at which the Hessian is taken: one floating dtype, one device.
    dataset : Dataset
    hvp : {"auto", "forward", "reverse"}
        ``"auto"`` is ``"forward"`` (measured 1.6-1.8x faster than reverse on CPU).
    cache : {"auto", True, False}
        Linearize once per batch (``True``) or recompute per product. ``"auto"``: cache when the
        data is a single batch. With ``cache=True`` the mode is forward (a linearization).
    batched : {"auto", True, False}
        ``hvp_batch`` with ``jax.vmap`` over the columns (``True``) or a loop (``False``).
        ``"auto"`` is ``vmap``: on CPU it measured 1.6x faster per product than a loop on an MLP
        and within noise on a CNN (``benchmarks/hvp_jax.py``); on GPUs it batches the kernels.
    check_deterministic : bool
        Compare two products with the same vector when the operator is built (default on).
    """

    name = "jax"

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
    ):
        params = prepare_params(params)
        self._loss = loss
        self._params = params
        first = dataset.first()
        self._layout = _jax_sharding.layout(params, first)  # None unless leaves are sharded
        flat, self._unravel = ravel_pytree(params) if self._layout is None else self._layout.spec()
        self.size = int(flat.shape[0])
        if self.size == 0:
            raise ValueError("params has no entries: the Hessian would be empty")
        self.jax_dtype = flat.dtype
        self.dtype = np.dtype(flat.dtype)
        self.device = next(iter(flat.devices()))
        self.sharding = flat.sharding  # one device, replicated over a mesh, or the sharded layout's
        self.dataset = dataset
        _check_scalar_loss(loss, params, first)

        if hvp == "auto":
            hvp = "forward"
        if hvp not in ("forward", "reverse"):
            raise ValueError(f"hvp must be 'forward', 'reverse' or 'auto', got {hvp!r}")
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.cache = dataset.single if cache == "auto" else bool(cache)
        self.mode = "forward" if self.cache else hvp
        if batched == "auto":
            batched = True
        self.batched = bool(batched)

        ravel = (lambda tree: ravel_pytree(tree)[0]) if self._layout is None else self._layout.ravel
        unravel = self._unravel
        grad_fn = jax.grad(loss)

        def forward(p, batch, v):
            return ravel(jax.jvp(lambda q: grad_fn(q, batch), (p,), (unravel(v),))[1])

        def reverse(p, batch, v):
            return ravel(jax.grad(lambda q: jnp.vdot(ravel(grad_fn(q, batch)), v))(p))

        one = forward if hvp == "forward" else reverse
        self._fresh1 = jax.jit(one)
        self._freshk = jax.jit(jax.vmap(one, in_axes=(None, None, 1), out_axes=1))
        self._cached: list[tuple[Any, int]] | None = None
        if self.cache:
            def apply(lin, v):
                return ravel(lin(unravel(v)))

            self._lin1 = jax.jit(apply)
            self._link = jax.jit(jax.vmap(apply, in_axes=(None, 1), out_axes=1))
            # linearize inside jit: one compiled forward+backward per batch shape, returning the
            # linear map (a jax.tree_util.Partial holding the residuals) to apply per product
            linearize = jax.jit(lambda p, b: jax.linearize(lambda q: grad_fn(q, b), p)[1])
            self._cached = [(linearize(params, b), 1 if dataset.single else batch_size(b))
                            for b in dataset.batches()]
            if not self._cached:
                raise ValueError("data is empty: the data loader yielded no batches")
        if check_deterministic:
            # A jitted pure function is deterministic unless the loss reads state outside JAX or a
            # GPU kernel is (scatter-add); the check also reports NaN/Inf. In cached mode it runs on
            # the linearized maps, so it costs no extra compilation.
            v = self.random(self.size, "gaussian", np.random.default_rng(0))
            assert_deterministic(self.hvp, v, self.dtype)

    # --- the contract ----------------------------------------------------------------------------
    def hvp(self, v: Array) -> Array:
        if self._cached is not None:
            return self._sum_cached(lambda lin: self._lin1(lin, v))
        return self._sum(lambda b: self._fresh1(self._params, b, v))

    def hvp_batch(self, v: Array) -> Array:
        if not self.batched:
            return super().hvp_batch(v)
        if self._cached is not None:
            return self._sum_cached(lambda lin: self._link(lin, v))
        return self._sum(lambda b: self._freshk(self._params, b, v))

    def is_native(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def check(self, x: Array) -> None:
        if x.dtype != self.jax_dtype:
            raise TypeError(
                f"vector has dtype {x.dtype}, but the parameters are {self.jax_dtype}; convert it with "
                f"x.astype(jnp.{self.jax_dtype})"
            )
        devices = x.devices()
        if devices != set(self.sharding.device_set):
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
        where = self.sharding if self._layout is None else self._layout.sharding_for(np.shape(a))
        return jax.device_put(np.asarray(a, dtype=self.dtype), where)

    def describe(self) -> str:
        how = "linearized (cached)" if self._cached is not None else f"{self.mode} mode, uncached"
        where = self.device if self._layout is None else self._layout.describe()
        return f"jax {how}, n={self.size}, {self.dtype} on {where}"

    # --- sums over batches ------------------------------------------------------------------------
    def _sum(self, product: Callable[[Any], Array]) -> Array:
        return self.dataset.weighted_sum(product)

    def _sum_cached(self, product: Callable[[Any], Array]) -> Array:
        assert self._cached is not None
        if len(self._cached) == 1:
            return product(self._cached[0][0])
        acc, total = None, 0
        for lin, nb in self._cached:
            p = product(lin)
            if self.dataset.reduction == "mean":
                p, total = p * nb, total + nb
            acc = p if acc is None else acc + p
        return acc / total if self.dataset.reduction == "mean" else acc



def _check_scalar_loss(loss: Callable[[Any, Any], Array], params: Any, batch: Any) -> None:
    try:
        out = jax.eval_shape(loss, params, batch)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"could not trace the loss with JAX ({type(err).__name__}: {err}); the loss must be a pure function "
            "of JAX arrays (no numpy, torch or Python control flow on parameter values)"
        ) from err
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"the loss must return a JAX scalar, got {type(out).__name__}")
    if out.shape != ():
        raise ValueError(
            f"the loss must be a scalar, but it returned shape {tuple(out.shape)}; reduce it over samples "
            "(e.g. jnp.mean), not per sample"
        )
    if np.dtype(out.dtype).kind != "f":
        raise TypeError(f"the loss has dtype {out.dtype}; it must be floating point")


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
        ``hvp``, ``cache``, ``batched``, ``check_deterministic``: see :class:`JaxBackend`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, curvop
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> curvop.hessian(model, lambda out, t: jnp.mean((out - t) ** 2), (x, y)).shape
    (8, 8)
    """
    if _is_module(model, "flax.linen"):
        raise TypeError(
            f"a Flax linen module ({type(model).__name__}) holds no parameters: pass "
            "model=(module.apply, variables), with variables = module.init(key, inputs)"
        )
    if _is_module(model, "flax.nnx"):
        apply_fn, model_params = _split_nnx(model, params)
        params = None  # for NNX, params= is the filter that chose model_params
    elif isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
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

    def loss(q: Any, batch: Any) -> Array:
        inputs, targets = batch
        return loss_fn(apply_fn(q, inputs), targets)

    return JaxBackend(loss, p, Dataset(data, resolve_reduction(loss_fn, reduction)), **options)


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


def hessian_of(f: Callable[..., Array], params: Any, data: Any = None, *, reduction: str = "mean",
               **options: Any) -> JaxBackend:
    """JAX backend for :func:`curvop.hessian_of`: the Hessian of ``f(params)`` or ``f(params, batch)``.

    ``params`` is any pytree of arrays (JAX arrays; numpy arrays are converted); ``f`` receives the
    same structure and must be a pure, jit-compatible function of it.
    """
    if data is None:
        loss = lambda p, batch: f(p)  # noqa: E731
    else:
        loss = f
    return JaxBackend(loss, params, Dataset(data, reduction), **options)
