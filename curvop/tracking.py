"""Curvature during training: :class:`SharpnessTracker` measures λ_max (and optionally top-k, trace).

The tracker sits above the algorithms: it rebuilds a :func:`curvop.hessian` operator at the
current parameters each time it is called, warm-starts Lanczos from the previous eigenvectors
(``curvop.eigenvalues(..., v0=previous)``) and records one :class:`Measurement` per call.
Measuring never changes training: the torch/numpy/python RNG states and the modules' train/eval
flags are restored, and the Hessian never writes parameters, buffers or gradients.

Adapters: call the tracker (or :meth:`SharpnessTracker.every`) in a PyTorch or JAX/optax loop,
pass :meth:`SharpnessTracker.keras_callback` to ``model.fit``, or
:meth:`SharpnessTracker.lightning_callback` to a Lightning ``Trainer``.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from curvop._checks import check_choice, check_flag, check_int, check_positive
from curvop._dtypes import numpy_dtype
from curvop.eigen import eigenvalues
from curvop.krylov import TOL_ON
from curvop.factory import hessian
from curvop.family import ggn
from curvop.trace_estimation import trace

__all__ = ["Measurement", "SharpnessTracker"]


@dataclass(frozen=True)
class Measurement:
    """One call of a :class:`SharpnessTracker`.

    Attributes
    ----------
    step : int
    value : float
        λ_max, the largest eigenvalue of the loss Hessian (or GGN, ``curvature="ggn"``) on the
        measurement data.
    products : int
        Hessian-vector products used (eigenvalues and trace).
    seconds : float
        Wall time of the measurement (building the operator included).
    eigenvalues : tuple of float
        The top ``k`` eigenvalues, largest first.
    trace : float or None
        Hutchinson/XTrace estimate of the trace when the tracker was asked for it.
    converged : bool
    """

    step: int
    value: float
    products: int
    seconds: float
    eigenvalues: tuple[float, ...] = ()
    trace: float | None = None
    converged: bool = True

    def __repr__(self) -> str:
        tr = "" if self.trace is None else f", trace={self.trace:.4g}"
        return (f"Measurement(step={self.step}, value={self.value:.6g}{tr}, products={self.products}, "
                f"seconds={self.seconds:.3f})")


@dataclass
class SharpnessTracker:
    """Measure the sharpness λ_max of a model's loss during training, warm-started.

    Parameters
    ----------
    model : torch.nn.Module, keras.Model, or JAX ``(apply_fn, params)`` / ``apply_fn``
        What :func:`curvop.hessian` accepts. torch and Keras models are read live at each call; for
        JAX pass the current parameters to each call (``tracker(step, params=params)``).
    loss_fn : callable
        As for :func:`curvop.hessian` (torch/JAX ``loss_fn(outputs, targets)``, Keras
        ``loss_fn(targets, outputs)``).
    data : batch or re-iterable of batches
        The fixed measurement data (one batch or a loader).
    k : int
        Eigenvalues to measure (``value`` is the largest).
    trace : bool
        Also estimate the trace with ``trace_matvecs`` products.
    tol : float
        Relative accuracy of the eigenvalues (default 1e-3), judged as ``tol_on`` says.
    tol_on : {"eigenvalue", "residual"}
        ``"eigenvalue"`` (default): stop when the estimated eigenvalue error is below
        ``tol·|λ|`` (:func:`curvop.eigenvalues`' ``tol_on``); a sharpness tracker wants the value,
        and this needs about half the products of ``"residual"`` (docs/training.md).
        ``"residual"``: the residual test, which also makes the eigenvectors accurate. The first
        measurement of a warm-started tracker is always solved with ``"residual"``: it starts
        from a random vector and every later measurement starts from its eigenvectors, and the
        eigenvalue rule, stopping earlier, misses λ_max more often from a random start (2 seeds in
        200 against 0 on a hard Hessian, docs/training.md).
    warm_start : bool
        Start Lanczos from the previous eigenvectors (default ``True``).
    seed : int
        Seeds the random start/probe vectors (mixed with the step), so a run repeats.
    hessian_options : dict
        Passed to :func:`curvop.hessian` (e.g. ``{"backend": "jax"}``, ``{"hvp": "forward"}``).
    curvature : {"hessian", "ggn"}
        The matrix whose top eigenvalue is tracked: the loss Hessian (default), or the
        Gauss-Newton matrix :func:`curvop.ggn` (the "Gauss-Newton sharpness"; ``hessian_options``
        then go to :func:`curvop.ggn`).

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    >>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    >>> tracker = curvop.SharpnessTracker(model, torch.nn.MSELoss(), (x, y))
    >>> m = tracker(step=0)
    >>> m.value > 0, len(tracker.history)
    (True, 1)
    """

    model: Any
    loss_fn: Any
    data: Any
    k: int = 1
    trace: bool = False
    trace_matvecs: int = 40
    tol: float = 1e-3
    max_matvecs: int | None = None
    warm_start: bool = True
    seed: int = 0
    hessian_options: dict = field(default_factory=dict)
    tol_on: str = "eigenvalue"
    curvature: str = "hessian"
    history: list[Measurement] = field(default_factory=list, init=False)
    _previous: Any = field(default=None, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        """Every option checked now, not at the measurement that first uses it."""
        self.k = check_int("k", self.k, 1)
        self.trace, self.warm_start = check_flag("trace", self.trace), check_flag("warm_start", self.warm_start)
        self.trace_matvecs = check_int("trace_matvecs", self.trace_matvecs, 2)
        self.tol = check_positive("tol", self.tol)
        self.max_matvecs = check_int("max_matvecs", self.max_matvecs, 1, optional=True)
        self.seed = check_int("seed", self.seed, 0)
        check_choice("tol_on", self.tol_on, TOL_ON)
        if not isinstance(self.hessian_options, dict):
            raise TypeError(f"hessian_options must be a dict of curvop.hessian options, got {self.hessian_options!r}")
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn' (the Gauss-Newton sharpness), got {self.curvature!r}")

    def __call__(self, step: int | None = None, *, params: Any = None) -> Measurement:
        """Measure now, at the model's current parameters (or ``params`` for JAX); returns it.

        ``step`` defaults to the number of measurements so far.
        """
        step = len(self.history) if step is None else int(step)
        t0 = time.perf_counter()
        with _training_untouched(self.model):
            H = self._operator(params)
            self._check_previous(H)
            ss = np.random.SeedSequence([self.seed, step & 0xFFFFFFFF])
            first = self.warm_start and self._previous is None  # seeds every later start: the safer rule
            r = eigenvalues(H, k=self.k, tol=self.tol, tol_on="residual" if first else self.tol_on,
                            max_matvecs=self.max_matvecs, seed=np.random.default_rng(ss.spawn(1)[0]),
                            v0=self._previous if self.warm_start else None)
            products = r.num_matvecs
            tr = None
            if self.trace:
                t = trace(H, num_matvecs=self.trace_matvecs, seed=np.random.default_rng(ss.spawn(2)[1]))
                tr, products = float(t.estimate), products + t.num_matvecs
        self._previous = r
        m = Measurement(step, float(r.eigenvalues[0]), int(products), time.perf_counter() - t0,
                        tuple(float(v) for v in r.eigenvalues), tr, bool(r.converged))
        self.history.append(m)
        return m

    def _check_previous(self, H: Any) -> None:
        """Drop the warm start when the operator changed size or dtype since the last measurement
        (parameters added or frozen, the model converted): this measurement starts cold."""
        prev = None if self._previous is None else self._previous.eigenvectors
        if prev is None or (prev.shape[0] == H.shape[0] and numpy_dtype(prev.dtype) == H.dtype):
            return
        warnings.warn(
            f"the Hessian changed since the last measurement ({prev.shape[0]:,} {numpy_dtype(prev.dtype)} "
            f"parameters, now {H.shape[0]:,} {H.dtype}: parameters added, frozen or converted), so the previous "
            "eigenvectors cannot start this solve: it starts cold, from a random vector, and warm-starts again "
            "from the next measurement", stacklevel=3)
        self._previous = None

    def _operator(self, params: Any) -> Any:
        model = self.model
        if params is not None:
            model = (model[0] if isinstance(model, tuple) else model, params)
        elif isinstance(model, tuple) and self._previous is not None and callable(model[0]):
            raise ValueError("a JAX tracker needs the current parameters: call tracker(step, params=params)")
        opts = dict(self.hessian_options)
        if self._built:  # the determinism check costs two products; once per tracker is enough
            opts.setdefault("check_deterministic", False)
        H = (ggn if self.curvature == "ggn" else hessian)(model, self.loss_fn, self.data, **opts)
        self._built = True
        return H

    # --- adapters --------------------------------------------------------------------------------
    def every(self, n: int) -> Callable[..., Measurement | None]:
        """A hook ``hook(step, params=None)`` that measures when ``step % n == 0`` (plain loops)."""
        if int(n) < 1:
            raise ValueError(f"every(n) needs n >= 1, got {n!r}")

        def hook(step: int, params: Any = None) -> Measurement | None:
            return self(step, params=params) if int(step) % int(n) == 0 else None

        return hook

    def keras_callback(self, every: int = 1) -> Any:
        """A ``keras.callbacks.Callback`` measuring every ``every`` training batches (Keras 3)."""
        from curvop.tracking_keras import SharpnessCallback

        return SharpnessCallback(self, every=every)

    def lightning_callback(self, every: int = 1, *, log: bool = True, name: str = "sharpness") -> Any:
        """A PyTorch Lightning ``Callback`` measuring before every ``every``-th optimizer step.

        Needs ``lightning`` (``pip install curvop[lightning]``) or ``pytorch_lightning``; the value is
        logged as ``name`` (``log=False`` to keep it in :attr:`history` only).
        """
        try:
            from curvop.tracking_lightning import SharpnessCallback
        except ImportError as err:
            raise ImportError(
                f"tracker.lightning_callback needs PyTorch Lightning ({err}); install it with "
                "`pip install curvop[lightning]`, or call the tracker from your LightningModule's "
                "on_train_batch_start"
            ) from err
        return SharpnessCallback(self, every=every, log=log, name=name)

    # --- results ---------------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        return np.array([m.step for m in self.history], dtype=np.int64)

    @property
    def values(self) -> np.ndarray:
        return np.array([m.value for m in self.history], dtype=np.float64)

    def plot(self, ax: Any = None, *, threshold: float | None = None, label: str | None = None,
             path: str | None = None) -> Any:
        """λ_max against step (optionally a dashed line at ``threshold``, e.g. 2/η); returns the axes."""
        import matplotlib

        if ax is None:
            if "matplotlib.pyplot" not in sys.modules:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 3.5))
        line, = ax.plot(self.steps, self.values, label=label or "λ_max")
        if threshold is not None:
            ax.axhline(threshold, ls="--", color=line.get_color(), lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("λ_max")
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


@contextmanager
def _training_untouched(model: Any) -> Iterator[None]:
    """Restore python/numpy RNG states, torch's RNG (CPU and CUDA) and torch modules' train flags."""
    py, npst = random.getstate(), np.random.get_state()
    with ExitStack() as stack:
        torch = sys.modules.get("torch")
        flags = None
        if torch is not None:
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            if isinstance(model, torch.nn.Module):
                flags = [(m, m.training) for m in model.modules()]
                model.eval()  # the Hessian of the eval-mode loss (BatchNorm running stats, no dropout)
        try:
            yield
        finally:
            for m, training in flags or ():
                m.training = training
            random.setstate(py)
            np.random.set_state(npst)
