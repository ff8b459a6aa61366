"""PyHessian's ``hessian`` class, with every number computed by curvop.

What is kept from PyHessian (version 0.1): the constructor ``hessian(model, criterion, data=...
or dataloader=..., cuda=True)``, the methods ``eigenvalues``, ``trace``, ``density`` and
``dataloader_hv_product`` with their keywords, the attributes ``model``, ``criterion``, ``params``,
``device``, ``data``, ``full_dataset``, and the return structures (Python lists of floats,
eigenvectors as lists of per-parameter tensors). The Hessian is the one PyHessian differentiates:
the parameters with ``requires_grad``, the model in eval mode, batches of a loader weighted by
their size.

What differs, on purpose:

* eigenvalues by thick-restart Lanczos (``which="LM"``: largest magnitude first, PyHessian's
  order), stopped when ``‖Hv − λv‖ ≤ tol·|λ|`` (which bounds the relative error of ``λ`` by ``tol``)
  rather than when two power iterates differ by less than ``tol``;
* ``trace()`` stops when the standard error of the mean is below ``tol·|mean|`` (else after
  ``maxIter`` samples), not when one sample happens to land near the running mean;
* the model's train/eval mode is restored after each call (PyHessian leaves it in eval mode), and
  no ``.grad`` is written to the parameters;
* probes come from a seed derived from ``torch.initial_seed()`` (so ``torch.manual_seed`` makes a
  script repeatable) without drawing from torch's global generator;
* a result that did not converge, or an impossible request (``cuda=True`` without CUDA, the model
  on another device), is reported, never returned silently.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

import curvop
from curvop.arrays import column_dots

__all__ = ["hessian", "CompatWarning"]


class CompatWarning(UserWarning):
    """A PyHessian call gave a result curvop could not certify (e.g. eigenvalues not converged)."""


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (as PyHessian does) and give every module back its own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _device(cuda: bool) -> torch.device:
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "hessian(..., cuda=True) but torch finds no CUDA device on this machine "
            "(torch.cuda.is_available() is False); pass cuda=False to compute on the CPU"
        )
    return torch.device("cuda" if cuda else "cpu")


class hessian:  # noqa: N801 -- PyHessian's name, so that scripts run unchanged
    """PyHessian's ``hessian`` object: top eigenvalues, trace and spectral density of a loss Hessian.

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters with ``requires_grad`` are differentiated; it is evaluated in eval mode
        (BatchNorm uses its running statistics, dropout is off) and its mode restored afterwards.
    criterion : callable
        ``criterion(model(inputs), targets)`` -> scalar tensor.
    data : (inputs, targets), optional
        One batch. Exactly one of ``data`` and ``dataloader``.
    dataloader : re-iterable of (inputs, targets), optional
        Several batches (a ``DataLoader`` or a list); the Hessian averages the batch Hessians
        weighted by batch size, as PyHessian does.
    cuda : bool
        ``True`` (PyHessian's default): compute on the GPU, where the model must already be; an
        error if torch finds no CUDA device. ``False``: on the CPU.
    seed : int, optional
        curvop extension: seed of the probes. Default ``torch.initial_seed()``.
    curvature : {"hessian", "ggn"}
        curvop extension: ``"ggn"`` analyses the generalized Gauss-Newton ``Jᵀ (∂²L/∂f²) J``
        (:func:`curvop.ggn`, positive semi-definite) instead of the Hessian, with the same methods.
    **options
        curvop extension: options of :func:`curvop.hessian` (``hvp=``, ``cache=``, ...).

    Attributes
    ----------
    operator : curvop.HessianOperator
        The Hessian as curvop's operator, for the native API (``curvop.eigenvalues(hc.operator)``).
    params : list of tensors
        The parameters differentiated, in ``model.parameters()`` order.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from curvop.compat.pyhessian import hessian
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    >>> trace = hc.trace()
    >>> bool(np.mean(trace) > 0), len(trace) <= 100
    (True, True)
    """

    def __init__(self, model: torch.nn.Module, criterion: Any, data: Any = None, dataloader: Any = None,
                 cuda: bool = True, *, seed: int | None = None, curvature: str = "hessian", **options: Any) -> None:
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) (one batch) or dataloader=loader")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = _device(bool(cuda))
        self.model, self.criterion = model, criterion
        self.full_dataset = dataloader is not None
        self.data = dataloader if self.full_dataset else data
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameters with requires_grad=True: the Hessian would be empty")
        where = {p.device.type for p in self.params}
        if where != {self.device.type}:
            fix = "call model.cuda() first" if cuda else "call model.cpu() first, or pass cuda=True"
            raise ValueError(
                f"cuda={bool(cuda)} but the model's parameters are on {', '.join(sorted(where))}; {fix}"
            )
        if not self.full_dataset:
            if not isinstance(data, (tuple, list)) or len(data) != 2:
                raise ValueError("data must be one batch (inputs, targets)")
            data = tuple(data)
            self.inputs, self.targets = data
        self._seeds = np.random.SeedSequence(torch.initial_seed() if seed is None else int(seed))
        # PyHessian weights the batches of a loader by their size whatever the criterion's reduction
        options.setdefault("reduction", "mean")
        with _eval_mode(model):
            build = curvop.ggn if curvature == "ggn" else curvop.hessian
            self.operator = build(model, criterion, self.data if self.full_dataset else data, **options)
        self._numels = [p.numel() for p in self.params]

    @property
    def gradsH(self) -> Any:  # noqa: N802 -- PyHessian's attribute name
        raise AttributeError(
            "curvop.compat.pyhessian keeps no gradient graph on the parameters (PyHessian's gradsH); "
            "use hc.operator (a curvop.HessianOperator) for products: hc.operator @ v"
        )

    def _rng(self) -> np.random.Generator:
        """A fresh probe stream per call: repeatable under torch.manual_seed, different across calls."""
        return np.random.default_rng(self._seeds.spawn(1)[0])

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(torch.split(v.contiguous(), self._numels), self.params)]

    def _flat(self, v: Any) -> torch.Tensor:
        if len(v) != len(self.params):
            raise ValueError(f"v must be a list of {len(self.params)} tensors shaped like hc.params, got {len(v)}")
        H = self.operator
        return torch.cat([torch.as_tensor(t).reshape(-1) for t in v]).to(
            device=H.backend.device, dtype=H.backend.torch_dtype)

    # --- PyHessian's methods ----------------------------------------------------------------------
    def dataloader_hv_product(self, v: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """``(vᵀHv, Hv)`` for ``v`` a list of per-parameter tensors (one product)."""
        u = self._flat(v)
        with _eval_mode(self.model):
            hu = self.operator.matvec(u)
        return float(torch.dot(u, hu)), self._split(hu)

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3,  # noqa: N803 -- PyHessian's keywords
                    top_n: int = 1) -> tuple[list[float], list[list[torch.Tensor]]]:
        """The ``top_n`` eigenvalues of largest magnitude, largest first, and their eigenvectors.

        Parameters
        ----------
        maxIter : int
            Products allowed per eigenvalue (the Lanczos budget is ``maxIter · top_n``).
        tol : float
            Relative residual ``‖Hv − λv‖ ≤ tol·|λ|``, which bounds the relative error of each
            eigenvalue by ``tol``. A ``CompatWarning`` says when the budget ran out first.
        top_n : int

        Returns
        -------
        eigenvalues : list of float
        eigenvectors : list (one per eigenvalue) of lists of per-parameter tensors, unit norm
        """
        n = self.operator.shape[0]
        if not isinstance(top_n, (int, np.integer)) or not 1 <= top_n < n:
            raise ValueError(f"top_n must be an integer with 1 <= top_n < {n} (the number of parameters), "
                             f"got {top_n!r}")
        with _eval_mode(self.model):
            r = curvop.eigenvalues(self.operator, k=int(top_n), which="LM", tol=float(tol),
                                   max_matvecs=max(int(maxIter) * int(top_n), int(top_n)), seed=self._rng())
        if not r.converged:
            warnings.warn(
                f"eigenvalues did not reach tol={tol} in {r.num_matvecs} products (relative residuals "
                f"{np.array2string(r.residual_norms / np.abs(r.eigenvalues), precision=2)}); raise maxIter",
                CompatWarning, stacklevel=2)
        vecs = [self._split(r.eigenvectors[:, i]) for i in range(int(top_n))]
        return [float(v) for v in r.eigenvalues], vecs

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:  # noqa: N803
        """Hutchinson samples ``zᵀHz`` (Rademacher ``z``); ``np.mean`` of them estimates ``tr H``.

        Probes run in blocks of 10 (batched products) until the standard error of the mean is at
        most ``tol·|mean|`` or ``maxIter`` samples are drawn.
        """
        maxIter = int(maxIter)
        if maxIter < 1:
            raise ValueError(f"maxIter must be >= 1, got {maxIter}")
        H, rng, n = self.operator, self._rng(), self.operator.shape[0]
        samples = np.zeros(0)
        with _eval_mode(self.model):
            while samples.size < maxIter:
                Z = H.random((n, min(10, maxIter - samples.size)), "rademacher", seed=rng)
                samples = np.concatenate([samples, column_dots(Z, H.matmat(Z))])
                if samples.size > 1 and samples.std(ddof=1) / np.sqrt(samples.size) <= tol * abs(samples.mean()):
                    break
        return [float(s) for s in samples]

    def density(self, iter: int = 100, n_v: int = 1) -> tuple[list[list[float]], list[list[float]]]:  # noqa: A002
        """Stochastic Lanczos quadrature: per probe, the Ritz values and their Gauss weights.

        Parameters
        ----------
        iter : int
            Lanczos steps per probe (one product each; fewer on an invariant subspace).
        n_v : int
            Number of probes (Rademacher start vectors), run together with batched products.

        Returns
        -------
        eigenvalues, weights : lists (one per probe) of lists of float; each probe's weights sum to 1
        """
        with _eval_mode(self.model):
            sd = curvop.spectral_density(self.operator, num_steps=int(iter), num_probes=int(n_v), seed=self._rng())
        return [[float(x) for x in a] for a in sd.nodes], [[float(w) for w in a] for a in sd.weights]
