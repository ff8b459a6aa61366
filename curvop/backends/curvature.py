"""The curvature family ``Jᵀ A J``, written once: GGN, empirical and Monte-Carlo Fisher, Jacobian.

Let ``f`` be the model outputs on a batch, ``L = c Σₙ ℓₙ`` the loss as the user reduces it
(``c = 1/n_b`` for a mean: one over the batch weight of :mod:`curvop.backends.dataset`; 1 for a
sum) and ``J = ∂f/∂θ``. Every member is ``Jᵀ A J`` with an output-space matrix ``A``:

* ``"ggn"``: ``A = ∂²L/∂f²`` (the generalized Gauss-Newton);
* ``"empirical"``: ``A = (1/c) Σₙ gₙ gₙᵀ`` with ``g = ∂L/∂f`` at the true targets, so that
  ``Jᵀ A J = c Σₙ ∇ℓₙ ∇ℓₙᵀ`` (``gₙ = c ∇_f ℓₙ``: the output gradient of the batch loss holds every
  per-sample output gradient at once, the loss being a sum over samples);
* ``"mc"``: the same with targets sampled from the model's predictive distribution
  (``likelihood``: categorical for the softmax cross-entropy, bernoulli for BCE with logits,
  gaussian for the squared error), averaged over ``mc_samples`` draws; its expectation is the GGN;
* ``"jacobian"``: ``A = I`` (the square operator is ``JᵀJ``; :meth:`CurvatureBackend.jvp` and
  :meth:`CurvatureBackend.vjp` are the rectangular Jacobian over the data, batches concatenated).

A framework supplies Jacobian products on one batch and the loss's derivatives with respect to the
outputs (:class:`CurvatureBackend`'s abstract methods); this module owns ``A``, the Monte-Carlo
seeds, the per-sample weights and the Jacobian's concatenation. The dataset loop, the weighting of
batches, the determinism and finiteness checks and the cache are :class:`AutodiffBackend`'s, so a
GGN over a loader of unequal batches is weighted exactly as the Hessian is.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

from curvop.arrays import namespace
from curvop.backends.template import AutodiffBackend

__all__ = ["CURVATURES", "LIKELIHOODS", "CurvatureBackend", "Linearization", "Sandwich", "mc_batch_seed"]

Array = Any

#: The members of the family, by the name the backends take (``curvature=``), and their titles.
CURVATURES = {"ggn": "GGN", "empirical": "empirical Fisher", "mc": "Monte-Carlo Fisher", "jacobian": "Jacobian"}
#: The predictive distributions the Monte-Carlo Fisher samples from, by the loss they are the NLL of.
LIKELIHOODS = {"categorical": "softmax cross-entropy", "gaussian": "squared error (MSE)",
               "bernoulli": "binary cross-entropy with logits"}

_INDEX: ContextVar[int] = ContextVar("curvop_curvature_batch", default=0)


@dataclass(frozen=True)
class Linearization:
    """What a framework supplies for one batch: the outputs and the Jacobian's two products.

    ``jvp(v, batched)``: ``J v`` with the outputs' shape (``batched``: ``v`` is ``(n, k)`` and the
    result ``(k, *outputs.shape)``). ``vjp(u, batched)``: ``Jᵀ u``, ``(n,)`` (``batched``: ``u`` is
    ``(k, *outputs.shape)`` and the result ``(n, k)``).
    """

    outputs: Array
    jvp: Callable[[Array, bool], Array]
    vjp: Callable[[Array, bool], Array]


class Sandwich:
    """``Jᵀ A J`` on one batch as ``f(v, batched)``; holds no reference to the backend (so that
    ``del H`` frees a cached linearisation at once)."""

    __slots__ = ("lin", "A")

    def __init__(self, lin: Linearization, A: Callable[[Array, bool], Array]):
        self.lin, self.A = lin, A

    def __call__(self, v: Array, batched: bool) -> Array:
        return self.lin.vjp(self.A(self.lin.jvp(v, batched), batched), batched)


def mc_batch_seed(seed: int, index: int, rank: int = 0) -> int:
    """The seed of the Monte-Carlo targets of batch ``index`` (in the order the data yields them).

    >>> mc_batch_seed(0, 1) == mc_batch_seed(0, 1) != mc_batch_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(index), int(rank), 0x6D63]).generate_state(1, np.uint32)[0])


def _identity(u: Array, batched: bool) -> Array:
    return u


class _OuterProducts:
    """``A u = scale Σₘ gₘ ⊙ ⟨gₘ, u⟩ₙ``: per-sample outer products ``gₙ gₙᵀ`` (block diagonal over the
    samples, the leading axis of the outputs) of ``M`` output gradients stacked as ``(M, *f.shape)``."""

    __slots__ = ("grads", "scale", "draws")

    def __init__(self, grads: Array, scale: Any, draws: int = 1):
        # ``scale`` may be a 0-d integer array (a batch weight): multiplied, never divided (torch would
        # divide an int64 tensor in float32), and the mean over ``draws`` taken on the result
        self.grads, self.scale, self.draws = grads, scale, draws

    def __call__(self, u: Array, batched: bool) -> Array:
        xp, G = namespace(u), self.grads
        d = len(G.shape) - 1  # dimensions of one draw: samples first
        if batched:  # u is (k, *f.shape): broadcast (M, 1, ...) against (1, k, ...)
            G, u = G[:, None], u[None]
        s = xp.sum(G * u, axis=tuple(range(2 + batched, d + 1 + batched)))  # (M, N) or (M, k, N)
        out = xp.sum(s[(...,) + (None,) * (d - 1)] * G, axis=0) * self.scale
        return out if self.draws == 1 else out / self.draws


class CurvatureBackend(AutodiffBackend):
    """The template of the curvature family: ``Jᵀ A J`` over a :class:`~curvop.backends.dataset.Dataset`.

    A framework subclass (``class TorchCurvature(CurvatureBackend, TorchBackend)``) calls
    :meth:`_curvature_options` before its own construction, and supplies:

    * ``_jacobian(batch, cached) -> Linearization``: the outputs and the Jacobian products on one
      prepared batch (``cached``: kept between products, else used for one product);
    * ``_output_hvp(outputs, batch) -> f(u, batched)``: ``∂²L/∂f² u`` (the loss on that batch);
    * ``_output_grad(outputs, batch, targets=None)``: ``∂L/∂f`` with the batch's targets, or with
      ``targets`` instead;
    * ``sample_targets``: its sampler (``outputs, likelihood, *, seed, samples, like, variance`` ->
      a list of target arrays), as a ``staticmethod``; ``_output_grads`` may vectorise over the draws
      and fall back to ``_looped_grads`` (a warning, then a loop).

    Examples
    --------
    A GGN for ``f = X w`` and ``L = mean((f - y)**2) / 2`` in plain numpy (``J = X``, ``A = I / n_b``):

    >>> from curvop.backends.dataset import Dataset
    >>> from curvop.backends.template import ParamInfo
    >>> class LinearGGN(CurvatureBackend):
    ...     name = "linear"
    ...     def __init__(self, w, data):
    ...         self._curvature_options("ggn")
    ...         self._begin(Dataset(data), [ParamInfo("w", "float64", "cpu")])
    ...         self.w, self.size, self.dtype, self.device = w, w.size, w.dtype, "cpu"
    ...         self._complete()
    ...     def _jacobian(self, batch, cached):
    ...         X = batch[0]
    ...         return Linearization(X @ self.w, lambda v, b: X @ v, lambda u, b: X.T @ u)
    ...     def _output_hvp(self, f, batch): return lambda u, b: u / len(f)
    ...     def _output_grad(self, f, batch, targets=None): return (f - batch[1]) / len(f)
    ...     def is_native(self, x): return isinstance(x, np.ndarray)
    ...     def from_numpy(self, a): return np.asarray(a, dtype=self.dtype)
    >>> X = np.arange(6.0).reshape(3, 2)
    >>> G = LinearGGN(np.zeros(2), [(X[:2], X[:2, 0]), (X[2:], X[2:, 0])])
    >>> np.allclose(G.hvp(np.ones(2)), X.T @ X @ np.ones(2) / 3), G.is_psd
    (True, True)
    """

    #: Every member of the family is positive semi-definite where ``A`` is (``trace`` uses XNysTrace).
    is_psd = True
    curvature = "ggn"
    likelihood: str | None = None
    mc_samples = 1
    _mc_seed = 0
    _rows: list[tuple[int, tuple[int, ...]]] | None = None

    # --- construction ---------------------------------------------------------------------------
    def _curvature_options(self, curvature: str, likelihood: str | None = None, mc_samples: Any = 1,
                           seed: Any = None) -> None:
        """Check and remember the member of the family and its Monte-Carlo options."""
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}, got {curvature!r}")
        self.curvature = curvature
        if curvature != "mc":
            return
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, (int, np.integer)) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int (target draws per sample), got {mc_samples!r}")
        if likelihood not in LIKELIHOODS:
            known = "; ".join(f"{k!r} ({v})" for k, v in LIKELIHOODS.items())
            raise ValueError(
                "the Monte-Carlo Fisher samples targets from the model's predictive distribution, whose negative "
                f"log-likelihood the loss must be; curvop could not tell it from the loss (likelihood={likelihood!r}). "
                f"Supported: {known}. Pass likelihood= one of them, or use kind='empirical' (true targets) "
                "or curvop.ggn (the MC Fisher's expectation for these losses)"
            )
        self.likelihood, self.mc_samples = likelihood, int(mc_samples)
        if seed is None:
            self._mc_seed = int(np.random.default_rng().integers(2**31))
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
            self._mc_seed = int(seed)
        else:
            raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")

    @property
    def seed(self) -> int | None:
        """The base seed of the Monte-Carlo targets (``None`` for the other members)."""
        return self._mc_seed if self.curvature == "mc" else None

    # --- what a framework supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def _jacobian(self, batch: Any, cached: bool) -> Linearization:
        """The outputs and the Jacobian products on one prepared batch."""

    @abc.abstractmethod
    def _output_hvp(self, outputs: Array, batch: Any) -> Callable[[Array, bool], Array]:
        """``u -> ∂²L/∂f² u`` at ``outputs`` (``batched``: ``u`` is ``(k, *outputs.shape)``)."""

    @abc.abstractmethod
    def _output_grad(self, outputs: Array, batch: Any, targets: Any = None) -> Array:
        """``∂L/∂f`` at ``outputs`` with the batch's targets (or ``targets``)."""

    def _output_grads(self, outputs: Array, batch: Any, draws: list[Any]) -> Array:
        """``∂L/∂f`` for each of the ``draws`` of targets, stacked ``(M, *outputs.shape)``. Default: a
        loop; a framework overrides it with its vectorisation (and falls back here with a warning)."""
        grads = [self._output_grad(outputs, batch, t) for t in draws]
        return namespace(grads[0]).stack(grads, axis=0)

    #: The framework's ``sample_targets(outputs, likelihood, *, seed, samples, like, variance)``.
    sample_targets: Callable[..., list[Any]]
    #: More keyword arguments for it, read from the loss (torch: ``ignore_index``).
    _sample_options: dict[str, Any] = {}

    def _sample_targets(self, outputs: Array, batch: Any, seed: int, variance: Array | None) -> list[Any]:
        """``mc_samples`` target arrays drawn from ``self.likelihood`` at ``outputs`` (the framework's sampler)."""
        return self.sample_targets(outputs, self.likelihood, seed=seed, samples=self.mc_samples, like=batch[1],
                                   variance=variance, **self._sample_options)

    def _looped_grads(self, err: BaseException, vectoriser: str, outputs: Array, batch: Any,
                      draws: list[Any]) -> Array:
        """The fallback of a framework's vectorised ``_output_grads``: a warning, then one draw at a time."""
        warnings.warn(f"{vectoriser} could not batch the loss over the sampled targets ({type(err).__name__}: "
                      f"{str(err)[:200]}); computing their gradients one at a time", stacklevel=3)
        return CurvatureBackend._output_grads(self, outputs, batch, draws)

    # --- the template's products -----------------------------------------------------------------
    def _product(self, v: Array, batch: Any, batched: bool) -> Array:
        return self._sandwich(batch, False)(v, batched)

    def _linearize(self, batch: Any) -> Sandwich:
        return self._sandwich(batch, True)

    def _batch_context(self, index: int, cached: bool) -> ContextManager[Any]:
        return _indexed(index, super()._batch_context(index, cached))

    def _sandwich(self, batch: Any, cached: bool) -> Sandwich:
        lin = self._jacobian(batch, cached)
        return Sandwich(lin, self._output_matrix(lin.outputs, batch))

    def _output_matrix(self, f: Array, batch: Any) -> Callable[[Array, bool], Array]:
        """``A`` on one batch: the loss Hessian, or per-sample outer products of output gradients."""
        if self.curvature == "jacobian":
            return _identity
        if self.curvature == "ggn":
            return self._output_hvp(f, batch)
        w = self._inverse_c(batch)  # 1/c: EF = c Σ ∇ℓ∇ℓᵀ = (1/c) Σ gₙgₙᵀ with gₙ = c ∇ℓₙ
        if self.curvature == "empirical":
            return _OuterProducts(self._output_grad(f, batch)[None], w)
        variance = None
        if self.likelihood == "gaussian":  # N(f, σ²): ℓ is its NLL when σ² = c / diag(∂²L/∂f²)
            variance = 1.0 / (w * self._output_hvp(f, batch)(f * 0 + 1, False))
        rank = 0 if self._collective is None else self._collective.rank
        draws = self._sample_targets(f, batch, mc_batch_seed(self._mc_seed, _INDEX.get(), rank), variance)
        G = self._output_grads(f, batch, draws)
        if self.likelihood == "bernoulli":
            return _OuterProducts(G / self._bernoulli_scale(f, batch, draws[0]), 1, self.mc_samples)
        return _OuterProducts(G, w, self.mc_samples)

    def _bernoulli_scale(self, f: Array, batch: Any, like: Any) -> Array:
        """``√(c s)`` per output entry, for a loss ``L = c Σₙ s·NLLₙ`` (a mean over the entries, as torch's
        and Keras' BCE take, has ``s = 1/entries``): ``∂L/∂f = c s (σ(f) − y)``, so ``c s`` is the
        difference of the gradients at the targets 0 and 1. Then ``E[ĝĝᵀ]/(c s) = ∂²L/∂f²``."""
        kappa = self._output_grad(f, batch, like * 0) - self._output_grad(f, batch, like * 0 + 1)
        root = namespace(kappa).sqrt(kappa)
        if not self._all_finite(root):
            raise ValueError("likelihood='bernoulli' needs the loss to be the binary cross-entropy of the logits "
                             "(a mean or sum over its entries); this loss's gradient does not fall from target 0 to 1")
        return root

    def _inverse_c(self, batch: Any) -> Any:
        """``1/c`` of a batch: its weight for a mean-reduced loss, 1 for a sum."""
        return self.dataset.weight(batch) if self.dataset.reduction == "mean" else 1

    # --- the rectangular Jacobian over the data --------------------------------------------------
    def _linearizations(self) -> Iterator[Linearization]:
        """The Jacobian of each batch in turn: from the cache, or built afresh."""
        if self._collective is not None:
            raise NotImplementedError(
                "curvop.jacobian concatenates the Jacobians of the batches, which data-parallel products do not "
                "gather across ranks: build it with process_group=False on each rank's shard")
        if self._cached is not None:
            for i, (fn, _) in enumerate(self._cached):
                with self._batch_context(i, True):
                    yield fn.lin
            return
        for i, batch, _ in self.dataset.weighted_batches():
            with self._batch_context(i, False):
                yield self._jacobian(self._prepare_batch(batch), False)

    def rows(self) -> list[tuple[int, tuple[int, ...]]]:
        """``(rows, output shape)`` of each batch's Jacobian, in order (one pass over the data, once)."""
        if self._rows is None:
            self._follow()
            self._rows = [(int(np.prod(lin.outputs.shape, dtype=np.int64)), tuple(int(s) for s in lin.outputs.shape))
                          for lin in self._linearizations()]
        return self._rows

    def jvp(self, v: Array, batched: bool = False) -> Array:
        """``J v`` over the data: the batches' ``J_b v`` flattened and concatenated (``(m,)`` or ``(m, k)``)."""
        self._follow()
        xp, parts = namespace(v), []
        for lin, (m, _) in self._with_rows():
            y = lin.jvp(v, batched)
            parts.append(xp.reshape(y, (m,)) if not batched else xp.matrix_transpose(xp.reshape(y, (-1, m))))
        return self._finite_rows(xp.concat(parts, axis=0), v)

    def vjp(self, u: Array, batched: bool = False) -> Array:
        """``Jᵀ u`` over the data: ``Σ_b J_bᵀ u_b`` with ``u`` split into the batches' rows."""
        self._follow()
        xp, acc, start = namespace(u), None, 0
        for lin, (m, shape) in self._with_rows():
            part = u[start:start + m]
            start += m
            part = xp.reshape(part, shape) if not batched else xp.reshape(xp.matrix_transpose(part), (-1, *shape))
            y = lin.vjp(part, batched)
            acc = y if acc is None else self._add(acc, y)
        return self._finite_rows(acc, u)

    def _with_rows(self) -> Iterator[tuple[Linearization, tuple[int, tuple[int, ...]]]]:
        """Each batch's Jacobian with its rows as counted when the operator was built (a clear error if
        the data now yields other batches: the operator's shape would be wrong)."""
        rows, count = self.rows(), 0
        for lin in self._linearizations():
            if count >= len(rows):
                raise ValueError(f"the data yielded more than the {len(rows)} batches the Jacobian was built over; a "
                                 "Jacobian over a loader needs the same batches in the same order")
            if tuple(lin.outputs.shape) != rows[count][1]:
                raise ValueError(
                    f"the data yielded other batches than when the Jacobian was built (batch {count}: outputs "
                    f"{tuple(lin.outputs.shape)}, built with {rows[count][1]}); a Jacobian over a loader needs the "
                    "same batches in the same order (no shuffling, no drop_last)")
            yield lin, rows[count]
            count += 1
        if count != len(rows):
            raise ValueError(f"the data yielded {count} batches, but the Jacobian was built over {len(rows)}; a "
                             "Jacobian over a loader needs the same batches in the same order")

    def _finite_rows(self, y: Array, x: Array) -> Array:
        if self.check_finite and not self._all_finite(y):
            from curvop._errors import NonFiniteProductError

            what = "the vector" if not self._all_finite(x) else "the model outputs' Jacobian on the data"
            raise NonFiniteProductError(f"a Jacobian product contains NaN or Inf: check {what}")
        return y

    def describe(self) -> str:
        base = super().describe()
        title = CURVATURES[self.curvature]
        if self.curvature == "mc":
            title += f" ({self.likelihood}, {self.mc_samples} sample{'s' * (self.mc_samples > 1)}, seed {self._mc_seed})"
        return f"{title}, {base}"


@contextlib.contextmanager
def _indexed(index: int, inner: ContextManager[Any]) -> Iterator[None]:
    """Batch ``index``'s context, with the index visible to the Monte-Carlo seeds."""
    token = _INDEX.set(index)
    try:
        with inner:
            yield
    finally:
        _INDEX.reset(token)
