"""The template of the framework backends: everything around the autodiff, written once.

:class:`AutodiffBackend` owns option resolution and validation, the parameter checks, the
scalar-loss check, the dataset loop and batch weighting (:class:`~curvop.backends.dataset.Dataset`),
the determinism check, ``check_finite`` with the offending batch located, the fallback when a
batched product fails, and the hooks of a data-parallel reduction. A framework subclass supplies
its autodiff and its array glue only:

* ``_product(v, batch, batched)``: the product (``batched``: an ``(n, k)`` block) on one batch,
  already converted by ``_prepare_batch(batch)``;
* optionally ``_linearize(batch) -> f(v, batched)``: what stays fixed between products on a batch;
* ``is_native``, ``from_numpy``, ``_all_finite(y)`` (and ``check``, ``to_numpy``, ``describe``);
* ``_auto_options()``: its defaults for ``"auto"``; ``batch_errors``: what its batching raises.

The checks themselves (``ParamInfo``, ``LossInfo``, ``check_options``, ...) are in
:mod:`curvop.backends.checks` and re-exported here.

Construction is two calls: ``_begin(...)`` (options and parameters checked, nothing computed),
then, once the subclass has set ``size``, ``dtype``, ``device`` and its layout, ``_complete(...)``
(loss checked on the first batch, ``"auto"`` resolved, ``_resolved()`` called, cache built, the
products checked for determinism and symmetry on the path they will take:
:mod:`curvop.backends.selfcheck`, whose messages name the blocks of ``_blocks()``; ``verify``
compares with central differences of ``_batch_gradient``). Per product the template calls ``_follow()``, then per
batch ``_product`` or a cached map inside ``_batch_context(i, cached)``, sums with ``_add`` and
the dataset's weights, reduces through the optional collective, and checks finiteness once. A
block is one pass over the data, batched or not (unbatched: every column on each batch, ``_columns``).

The build and every product run inside ``_context()`` (the framework's build-time context:
torch turns the caller's autocast off). The first work that needs a product (the build's checks
and cache, or else the first product) goes through :func:`curvop.backends.modes.settle`: an error
that ``_mode_failure(err)`` recognises ("this mode cannot differentiate this model") moves an
``"auto"`` option to a mode that works, or refuses a named one naming the mode that works.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import warnings
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Protocol, Sequence

import numpy as np

from curvop import arrays
from curvop.backends.base import Backend
from curvop.backends.checks import LossInfo, ParamInfo, check_loss, check_options, check_params
from curvop.backends.dataset import Dataset
from curvop.backends.faults import locate_nonfinite, nonfinite_error
from curvop.backends.modes import settle
from curvop.backends.selfcheck import Verification, VerificationError, check_products, verify

__all__ = ["AutodiffBackend", "Collective", "LossInfo", "ParamInfo", "check_options", "check_params",
           "check_loss"]

Array = Any
COLUMNS = "columns"  # ``batched`` for a block computed column by column within each batch (one pass)


class Collective(Protocol):
    """What a data-parallel reduction provides (``curvop.backends.torch.distributed.TorchCollective``)."""

    rank: int
    world: int

    def reduce_product(self, acc: Array, count: Any, reduction: str, failure: BaseException | None = None,
                       batch_error: bool = False) -> Array: ...
    def gather_ints(self, value: int, device: Any) -> list[int]: ...
    def agree_seed(self, seed: Any, device: Any) -> Any: ...
    def agree(self, failure: BaseException | None, where: str) -> None: ...


class AutodiffBackend(Backend):
    """The template: a backend whose products come from a framework's autodiff over a :class:`Dataset`.

    Attributes set by the template: ``dataset``, ``mode`` (``"forward"``/``"reverse"``), ``cache``,
    ``batched``, ``check_finite``. The subclass sets ``size``, ``dtype`` and ``device``.

    Examples
    --------
    A backend for ``loss(w, (X, y)) = mean((X w - y)**2) / 2`` written against the template
    (no autodiff needed: the Hessian is ``X^T X / n_b`` on each batch):

    >>> import numpy as np
    >>> from curvop.backends.dataset import Dataset
    >>> class LeastSquares(AutodiffBackend):
    ...     name = "lstsq"
    ...     def __init__(self, w, data, **options):
    ...         self._begin(Dataset(data), [ParamInfo("w", w.dtype.name, "cpu")], **options)
    ...         self.size, self.dtype, self.device = w.size, w.dtype, "cpu"
    ...         self._complete()
    ...     def _product(self, v, batch, batched):
    ...         X = batch[0]
    ...         return X.T @ (X @ v) / len(X)
    ...     def _all_finite(self, y): return bool(np.isfinite(y).all())
    ...     def is_native(self, x): return isinstance(x, np.ndarray)
    ...     def from_numpy(self, a): return np.asarray(a, dtype=self.dtype)
    >>> X = np.arange(6.0).reshape(3, 2)
    >>> B = LeastSquares(np.zeros(2), [(X[:2], X[:2, 0]), (X[2:], X[2:, 0])])
    >>> np.allclose(B.hvp(np.ones(2)), X.T @ X @ np.ones(2) / 3)
    True
    """

    #: Exceptions the framework's batching (vmap, vectorized_map) raises for an op it cannot batch:
    #: ``hvp_batch`` then warns once and loops over the columns.
    batch_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: The framework's words in the messages of the parameter checks.
    param_word: ClassVar[str] = "parameter"
    #: Whether the loss must have shape ``()`` (JAX's grad), not just one element.
    loss_zero_dim: ClassVar[bool] = False
    device: Any = None
    _collective: Collective | None = None
    _cached: list[tuple[Callable[[Array, bool], Array], Any]] | None = None
    #: Why the build left the mode it was given (``"auto"`` only: :mod:`curvop.backends.modes`), or None.
    fallback: str | None = None
    _settled = False  # a product has run in the current mode

    # --- construction ---------------------------------------------------------------------------
    def _begin(self, dataset: Dataset, params: Sequence[ParamInfo], *, hvp: str = "auto",
               cache: bool | str = "auto", batched: bool | str = "auto", check_deterministic: bool = True,
               check_symmetric: bool | None = None, verify: bool = False, check_finite: bool = True,
               collective: Collective | None = None, **flags: bool) -> None:
        """Check the options and the parameters; remember the options (``flags``: the framework's own).
        ``check_symmetric=None``: as ``check_deterministic`` (both are the build's self-check)."""
        if check_symmetric is None:
            check_symmetric = check_deterministic
        check_options(hvp=hvp, cache=cache, batched=batched, check_deterministic=check_deterministic,
                      check_symmetric=check_symmetric, verify=verify, check_finite=check_finite, **flags)
        if cache is True and not self.can_cache():
            raise ValueError(f"the {self.name} backend keeps no linearisation between products: "
                             "cache must be False or 'auto'")
        check_params(params, what=self.param_word, **self._param_advice())
        self.dataset = dataset
        self.check_finite = bool(check_finite)
        self._collective = collective
        self._options = {"hvp": hvp, "cache": cache, "batched": batched}
        self._check_det, self._check_sym, self._verify = bool(check_deterministic), bool(check_symmetric), bool(verify)

    def _complete(self, loss: LossInfo | Callable[[], LossInfo] | None = None, check_loss_dtype: bool = True) -> None:
        """Check the loss (``loss``: its value on the first batch, or a function computing it),
        resolve ``"auto"``, check that the products are deterministic and build the cache.

        With a collective, what each process checks alone (the loss, the options, the cache) is
        agreed on before the next collective: a failure on one rank raises a
        ``DistributedError`` on every rank, never leaving the others waiting in a product."""
        with self._agreed("building the operator (its first loss and checks)"):
            if callable(loss):
                loss = loss()
            if loss is not None:
                self._check_loss(loss, check_loss_dtype)
            auto = self._auto_options()
            opts = {k: auto[k] if v == "auto" else v for k, v in self._options.items()}
            self.mode = opts["hvp"]
            self.batched = bool(opts["batched"])
            self.cache = bool(opts["cache"]) and self.can_cache()
            self._resolved()
        with self._context():
            settle(self, self._build)
            if self._verify:
                result = self.verify()
                if not result.ok:
                    raise VerificationError(f"H v differs from central differences of the gradient: {result!r}; "
                                            "the products cannot be trusted (try another hvp= mode)", result)

    def _check_loss(self, loss: LossInfo, check_loss_dtype: bool = True) -> None:
        """The scalar-loss check (:func:`~curvop.backends.checks.check_loss`) in this framework's words."""
        check_loss(loss, self._param_dtype_name(), framework=self._loss_type(), reduce_fix=self._reduce_advice(),
                   precision_message=self._precision_message if check_loss_dtype else None,
                   zero_dim=self.loss_zero_dim)

    def _rounding_dtype(self) -> Any:
        """The precision the products' rounding is judged by (the symmetry check's tolerance):
        ``self.dtype``, unless the framework saw parts of the model compute in a lower one."""
        return self.dtype

    def _build(self) -> None:
        """The cache, then the determinism and symmetry checks on the products' own path (both in the
        current mode: :func:`curvop.backends.selfcheck.check_products`)."""
        self._cached = None
        if self.cache:
            with self._agreed("building the cache of linearisations"):
                self._cached = self._build_cache()
        if self._check_det or self._check_sym:
            check_products(self, deterministic=self._check_det, symmetric=self._check_sym)
        self._settled = self._check_det or self._check_sym or self.cache

    @contextlib.contextmanager
    def _agreed(self, where: str) -> Iterator[None]:
        """Run local work; with a collective, every rank then learns whether it failed anywhere."""
        if self._collective is None:
            yield
            return
        failure = None
        try:
            yield
        except Exception as err:  # raised below on every rank (as a DistributedError unless all failed)
            failure = err
        self._collective.agree(failure, where)

    def _build_cache(self) -> list[tuple[Callable[[Array, bool], Array], Any]]:
        """One ``(linear map, weight)`` per batch (``_linearize`` under the batch's context)."""
        cached = []
        for i, batch, w in self.dataset.weighted_batches():
            with self._batch_context(i, False):
                cached.append((self._linearize(self._prepare_batch(batch)), w))
        if not cached:
            raise ValueError("data is empty: the data loader yielded no batches")
        return cached

    def on(self, data: Any, params: Any = None) -> "AutodiffBackend":
        """A copy of this backend on ``data`` (one batch or a re-iterable of batches, combined with
        the same reduction and batch weights), at ``params`` where the framework takes parameter
        values (JAX: a pytree of the same structure, shapes and dtype), else at the live ones.

        What the build did once is kept: the options as resolved, the parameter checks, the
        determinism check, compiled product functions. The loss on the new data is not checked
        again; a cache (a linearisation per batch) is built for the new data.
        """
        new = copy.copy(self)
        new.dataset = Dataset(data, self.dataset.reduction, weight=self.dataset.weight)
        new._rebind(params)
        new._cached = new._build_cache() if self._cached is not None else None
        return new

    def _rebind(self, params: Any) -> None:
        """For :meth:`on`: take new parameter values (``None``: keep them). Default: the backend
        follows live parameters, so new values are refused."""
        if params is not None:
            raise TypeError(f"the {self.name} backend follows the live parameters of the model: call on(data) "
                            "without params (update the parameters in place)")

    # --- what a framework supplies ----------------------------------------------------------------
    @abc.abstractmethod
    def _product(self, v: Array, batch: Any, batched: bool) -> Array:
        """``H_batch v`` (``batched``: ``v`` is ``(n, k)``), unweighted, on one prepared batch."""

    _linearize: Callable[[Any], Callable[[Array, bool], Array]] | None = None
    """``_linearize(batch) -> f(v, batched)``: set it to a method where the framework can cache."""

    def can_cache(self) -> bool:
        """Whether this backend keeps a linearisation between products (it defines ``_linearize``)."""
        return self._linearize is not None

    def _all_finite(self, y: Array) -> bool:
        """Whether every entry of native ``y`` is finite (one reduction and host sync)."""
        return bool(np.isfinite(self.to_numpy(y)).all())

    def _prepare_batch(self, batch: Any) -> Any:
        """A batch as the product takes it (tensors on the device). Default: unchanged."""
        return batch

    def _blocks(self) -> Sequence[tuple[str, int]]:
        """The parameter blocks as ``(name, size)`` in the order of the flat vector, for the messages
        of the self-checks (torch: parameter names; JAX: pytree paths; TF: variable names)."""
        return [("parameters", self.size)]

    def _batch_gradient(self, batch: Any, v: Array, t: float) -> Array:
        """The flat gradient of one prepared batch's loss at ``params + t v`` (for :meth:`verify`)."""
        raise NotImplementedError(f"the {self.name} backend has no gradient at shifted parameters, so verify "
                                  "cannot compare with central differences")

    def _auto_options(self) -> dict[str, Any]:
        """The values of ``"auto"`` for ``hvp``, ``cache`` and ``batched`` (may look at ``self.device``)."""
        return {"hvp": "forward", "cache": self.dataset.single, "batched": False}

    def _param_advice(self) -> dict[str, str]:
        """The fixes named by the parameter checks, in the framework's words."""
        return {"dtype_fix": "convert them to one dtype", "device_fix": "move them to one device",
                "float_fix": "leave it out of params", "half_fix": "convert them to float32 or float64"}

    def _loss_type(self) -> str:
        return f"{self.name} array"

    def _reduce_advice(self) -> str:
        return "use a reduced loss (a mean or a sum over samples), not one value per sample"

    def _precision_message(self, loss_dtype: str) -> str:
        return (f"the loss value is {loss_dtype}, but the parameters are {self._param_dtype_name()}: the Hessian "
                "would silently lose digits; compute the loss in the parameters' dtype. Pass "
                "check_loss_dtype=False to accept the lower precision.")

    def _param_dtype_name(self) -> str:
        return np.dtype(self.dtype).name

    # --- hooks (no-ops by default) ----------------------------------------------------------------
    def _resolved(self) -> None:
        """Called once ``mode``, ``batched`` and ``cache`` are resolved, before the first product
        (build what depends on them: compiled functions, op rewrites for a mode)."""

    def _follow(self) -> None:
        """Called before every product: follow in-place changes of the parameters (torch: version
        counters; rebuild ``self._cached = self._build_cache()`` when they moved)."""

    def _batch_context(self, index: int, cached: bool) -> ContextManager[Any]:
        """Context around batch ``index``'s product or linearisation (``cached``: a cached map is
        applied). Torch uses it to evaluate batch ``i`` under a fixed seed; default: none."""
        return contextlib.nullcontext()

    def _add(self, acc: Array, p: Array) -> Array:
        """``acc + p`` when summing batches (an in-place add where the framework allows)."""
        return acc + p

    def _context(self) -> ContextManager[Any]:
        """Context around the build's evaluations and every product: the framework's build-time
        context, whatever the caller's (torch: no autocast, grad mode on). Default: none."""
        return contextlib.nullcontext()

    # --- modes that cannot differentiate the model (:mod:`curvop.backends.modes`) -------------------
    def _mode_failure(self, err: BaseException) -> str | None:
        """A short reason when ``err`` means "this mode cannot differentiate this model" (forward AD
        missing for an op, ...), ``None`` for any other error. Default: ``None`` (no fallback)."""
        return None

    def _modes(self) -> list[tuple[str, bool]]:
        """The ``(hvp, cache)`` pairs this backend can run."""
        caches = (True, False) if self.can_cache() else (False,)
        return [(m, c) for m in ("reverse", "forward") for c in caches]

    def _switch(self, mode: str, cache: bool) -> None:
        """Go over to another mode (before the build's products, or before the first product)."""
        self.mode, self.cache, self._cached = mode, cache, None
        self._resolved()

    def _underivable(self, failures: dict[tuple[str, bool], BaseException]) -> BaseException:
        """The error when no mode can differentiate the model. Default: the first mode's error."""
        return next(iter(failures.values()))

    # --- the contract -----------------------------------------------------------------------------
    def hvp(self, v: Array) -> Array:
        with self._context():
            self._follow()
            if not self._settled:
                return self._settle_first(lambda: self._finite(self._reduce(v, False), v, False))
            return self._finite(self._reduce(v, False), v, False)

    def hvp_batch(self, v: Array) -> Array:
        with self._context():
            self._follow()
            if not self._settled:
                return self._settle_first(lambda: self._block_product(v))
            return self._block_product(v)

    def _settle_first(self, product: Callable[[], Array]) -> Array:
        """The first product of an operator built without one: in a mode that works."""
        y = settle(self, product)
        self._settled = True
        if self.cache and self._cached is None:
            self._cached = self._build_cache()
        return y

    def _block_product(self, v: Array) -> Array:
        if self.batched:
            try:
                y = self._reduce(v, True)
            except self.batch_errors as err:  # an op without a batching rule
                if self._mode_failure(err) is not None and not self._settled:
                    raise  # not the batching: the mode (:func:`curvop.backends.modes.settle`)
                warnings.warn(
                    f"batched products failed ({type(err).__name__}: {str(err)[:200]}); falling back to one "
                    "product per column (pass batched=False to skip the attempt)", stacklevel=4)
                self.batched = False
            else:
                return self._finite(y, v, True)
        return self._looped(v)

    #: ``False``: a block makes one pass over the data per column (a framework that cannot run
    #: the columns of one batch back to back; see JAX's sharded products).
    one_pass_blocks = True

    def _looped(self, v: Array) -> Array:
        """One product per column, in one pass over the data (each batch computes every column, see
        :meth:`_columns`), checked once for the block (one sync, not one per column)."""
        if not self.one_pass_blocks:
            y = arrays.stack([self._reduce(v[:, j], False) for j in range(v.shape[1])], axis=1)
            return self._finite(y, v, COLUMNS)
        return self._finite(self._reduce(v, COLUMNS), v, COLUMNS)

    def _columns(self, columns: list[Array], batch: Any, index: int) -> Array:
        """The ``(n, k)`` products of a block's ``columns`` on one prepared batch, uncached: one
        vector product each, each under the batch's context as a vector product is (so equal to it,
        bit for bit). A framework overrides it where the columns can share work on the batch."""
        out = []
        for u in columns:
            with self._batch_context(index, False):
                out.append(self._product(u, batch, False))
        return arrays.stack(out, axis=1)

    def verify(self, v: Array | None = None, *, step: float | None = None, seed: int = 0) -> Verification:
        """``H v`` against central differences of the gradient, per parameter block
        (:func:`curvop.backends.selfcheck.verify`: one product and four gradients over the data)."""
        with self._context():
            self._follow()
            return verify(self, v, step=step, seed=seed)

    def _gradient(self, v: Array, t: float) -> Array:
        """The gradient of the whole-data loss at ``params + t v``, batches weighted as the products."""
        def terms() -> Iterator[tuple[Array, Any]]:
            for i, batch, w in self.dataset.weighted_batches():
                with self._batch_context(i, False):
                    g = self._batch_gradient(self._prepare_batch(batch), v, t)
                yield g, w

        return self._combine(terms(), v)

    def agree_seed(self, seed: Any) -> Any:
        return seed if self._collective is None else self._collective.agree_seed(seed, self.device)

    def is_main_process(self) -> bool:
        return self._collective is None or self._collective.rank == 0

    def describe(self) -> str:
        cache = "cached" if self._cached is not None else "uncached"
        return f"{self.name} {self.mode} mode, {cache}, n={self.size}, {self.dtype} on {self.device}{self._note()}"

    def _note(self) -> str:
        """What :meth:`describe` adds when the build fell back to another mode."""
        return "" if self.fallback is None else f" ({self.fallback})"

    # --- the dataset loop -------------------------------------------------------------------------
    def _products(self, v: Array, batched: bool, fresh: bool = False) -> Iterator[tuple[Array, Any]]:
        """``(product, weight)`` per batch, lazily: from the cache, or computed afresh.

        ``batched``: ``v`` is one vector (``False``), a block computed batched (``True``), or a block
        computed column by column within each batch (:data:`COLUMNS`): one pass over the data
        for the whole block, never one per column."""
        columns = [v[:, j] for j in range(v.shape[1])] if batched == COLUMNS else []  # sliced once
        if self._cached is not None and not fresh:
            for i, (fn, w) in enumerate(self._cached):
                if batched == COLUMNS:
                    out = []
                    for u in columns:
                        with self._batch_context(i, True):
                            out.append(fn(u, False))
                    yield arrays.stack(out, axis=1), w
                    continue
                with self._batch_context(i, True):
                    p = fn(v, batched)
                yield p, w
            return
        for i, batch, w in self.dataset.weighted_batches():
            if batched == COLUMNS:
                yield self._columns(columns, self._prepare_batch(batch), i), w
                continue
            with self._batch_context(i, False):
                p = self._product(v, self._prepare_batch(batch), batched)
            yield p, w

    def _reduce(self, v: Array, batched: bool, fresh: bool = False) -> Array:
        """The product over the whole dataset (weighting rule of :mod:`curvop.backends.dataset`)."""
        return self._combine(self._products(v, batched, fresh), v, batched)

    def _combine(self, terms: Iterator[tuple[Array, Any]], v: Array, batched: Any = False) -> Array:
        """Per-batch ``(term, weight)`` combined over the dataset and the ranks (``v * 0`` stands in
        on a rank whose own terms failed)."""
        if self._collective is None:
            if self.dataset.single:
                return next(terms)[0]  # one batch: its product, unweighted (exact)
            return self.dataset.normalize(*self.dataset.accumulate(terms, add=self._add))
        failure = None
        try:  # every rank takes part in the reduction, also one whose own products failed
            acc, count = self.dataset.accumulate(terms, add=self._add)
        except Exception as err:
            failure, acc, count = err, v * 0, 0
        return self._collective.reduce_product(acc, count, self.dataset.reduction, failure=failure,
                                               batch_error=batched is True and isinstance(failure, self.batch_errors))

    def _finite(self, y: Array, v: Array, batched: bool, fresh: bool = False) -> Array:
        """``y`` if it is finite (one sync); else the error naming the first non-finite batch."""
        if not self.check_finite or self._all_finite(y):
            return y
        if not self._all_finite(v):  # the vector, not the data
            bad = np.argwhere(~np.isfinite(self.to_numpy(v)))[0]
            where = int(bad[0]) if len(bad) == 1 else tuple(int(i) for i in bad)
            raise ValueError(f"the vector contains NaN or Inf (first at index {where}), so H @ v is not finite "
                             "whatever the data; check how the vector was computed")
        bad_batch = locate_nonfinite((p for p, _ in self._products(v, batched, fresh)), self._all_finite)
        culprits: list[int | None] = [bad_batch]
        if self._collective is not None:  # every rank sees the reduced NaN and takes this path together
            got = self._collective.gather_ints(-1 if bad_batch is None else bad_batch, self.device)
            culprits = [None if i < 0 else i for i in got]
        raise nonfinite_error(culprits, self.dataset.single)
