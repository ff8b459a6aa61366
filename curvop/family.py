"""``curvop.ggn``, ``curvop.fisher`` and ``curvop.jacobian``: the curvature family as operators.

Each mirrors :func:`curvop.hessian` (the same model, loss and data forms, ``params=``, loaders,
options and errors) and picks the backend the same way; the products are the template's ``Jᵀ A J``
(:mod:`curvop.backends.curvature`) over the framework's Jacobian products. See ``docs/curvature.md``.
"""

from __future__ import annotations

from typing import Any

from curvop import backends
from curvop.factory import _framework, _wrap
from curvop.operator import HessianOperator
from curvop.rectangular import JacobianOperator

__all__ = ["ggn", "fisher", "jacobian"]


def ggn(model: Any, loss_fn: Any, data: Any, *, params: Any = None, backend: str | None = None,
        **options: Any) -> HessianOperator:
    """The generalized Gauss-Newton ``G = Jᵀ (∂²L/∂f²) J`` of the loss over ``data``.

    ``f`` are the model outputs, ``L`` the loss as ``loss_fn`` reduces it and ``J = ∂f/∂θ``; batches
    are weighted as for :func:`curvop.hessian`. ``G`` is positive semi-definite for a convex loss
    (cross-entropy, squared error), and equals the Hessian for a model linear in its parameters.
    The arguments are :func:`curvop.hessian`'s (``loss_fn`` required).

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    >>> G = curvop.ggn(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> G.shape, G.is_psd
    ((26, 26), True)
    >>> bool(curvop.eigenvalues(G, k=1, seed=0).eigenvalues[0] > 0)
    True
    """
    name = backend or _framework(model, params)
    return _wrap(backends.get(name, "ggn")(model, loss_fn, data, params=params, **options))


def fisher(model: Any, loss_fn: Any, data: Any, *, kind: str = "mc", mc_samples: int = 1, seed: int | None = None,
           params: Any = None, backend: str | None = None, **options: Any) -> HessianOperator:
    """The Fisher ``c Σₙ ∇ℓₙ ∇ℓₙᵀ`` of a loss ``L = c Σₙ ℓₙ`` over ``data``, as an operator.

    Parameters
    ----------
    kind : {"mc", "empirical"}
        ``"empirical"``: the per-sample gradients of the true targets (the "empirical Fisher").
        ``"mc"``: targets sampled from the model's predictive distribution, ``mc_samples`` per sample,
        so that the expectation is the GGN; the loss must be the negative log-likelihood of a
        categorical (softmax cross-entropy), bernoulli (binary cross-entropy with logits) or
        gaussian (squared error) model: read from ``loss_fn`` (torch and Keras loss objects), else
        pass ``likelihood="categorical" | "bernoulli" | "gaussian"``. Other losses are refused.
    mc_samples : int
        Target draws per sample (``"mc"``); the estimate's variance falls as ``1/mc_samples``.
    seed : int, optional
        Seeds the draws: batch ``i`` draws from ``curvop.backends.curvature.mc_batch_seed(seed, i)``,
        the same in every product (the operator is one fixed matrix). ``None``: a fresh seed, kept
        as ``F.backend.seed``.
    **options
        As for :func:`curvop.hessian`.

    Examples
    --------
    >>> import torch, curvop
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    >>> F = curvop.fisher(model, torch.nn.CrossEntropyLoss(), (x, y), kind="mc", mc_samples=4, seed=0)
    >>> E = curvop.fisher(model, torch.nn.CrossEntropyLoss(), (x, y), kind="empirical")
    >>> F.shape == E.shape == (8, 8), F.is_psd
    (True, True)
    """
    name = backend or _framework(model, params)
    return _wrap(backends.get(name, "fisher")(model, loss_fn, data, kind=kind, mc_samples=mc_samples, seed=seed,
                                              params=params, **options))


def jacobian(model: Any, data: Any, *, params: Any = None, backend: str | None = None,
             **options: Any) -> JacobianOperator:
    """The Jacobian ``J = ∂f/∂θ`` of the model outputs over ``data``: a rectangular ``(m, n)`` operator.

    ``m`` counts every output entry of every batch (batches concatenated in order), ``n`` the
    parameters. ``data`` is the inputs, one batch ``(inputs, targets)`` (targets unused) or a
    re-iterable of batches. ``J @ v``, ``J.T @ u`` and ``J.rmatvec(u)`` take numpy or native arrays;
    ``scipy.sparse.linalg.svds(J, k)`` gives the top of the NTK spectrum (squared singular values).
    Options as for :func:`curvop.hessian`.

    Examples
    --------
    >>> import numpy as np, torch, curvop
    >>> from scipy.sparse.linalg import svds
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    >>> J = curvop.jacobian(model, torch.randn(10, 3, dtype=torch.float64))
    >>> J.shape
    (10, 21)
    >>> s = svds(J, k=2, return_singular_vectors=False)
    >>> bool(np.all(s > 0))
    True
    """
    name = backend or _framework(model, params)
    return JacobianOperator(backends.get(name, "jacobian")(model, data, params=params, **options))
