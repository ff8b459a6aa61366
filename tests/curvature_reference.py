"""Dense float64 references of the curvature family, built independently of curvop with torch.func.

Over a list of batches, the data set is the concatenation of the batches and the loss is ``loss_fn``
applied to all samples at once: the definition curvop's weighting of unequal batches must reproduce.
"""

from __future__ import annotations

import torch
from torch.func import hessian, jacrev

from torch_reference import flat_model as _flat


def concat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def dense_jacobian(model, x, names=None):
    """``∂f/∂θ`` on inputs ``x`` as an ``(outputs, n)`` matrix (rows: the outputs flattened)."""
    flat0, out = _flat(model, names)
    J = jacrev(lambda w: out(w, x))(flat0)
    return J.reshape(-1, flat0.numel()).detach()


def dense_ggn(model, loss_fn, batches, names=None):
    """``Jᵀ (∂²L/∂f²) J`` with ``L = loss_fn`` on all samples at once."""
    x, y = concat(batches)
    flat0, out = _flat(model, names)
    f0 = out(flat0, x).detach()
    J = dense_jacobian(model, x, names)
    Hf = hessian(lambda f: loss_fn(f, y))(f0).reshape(f0.numel(), f0.numel())
    return (J.T @ Hf @ J).numpy()


def per_sample_gradients(model, loss_fn, x, y, names=None):
    """``∇ℓₙ`` of each sample, ``ℓₙ = loss_fn`` on that sample alone (a batch of one), as rows."""
    flat0, out = _flat(model, names)
    rows = [torch.func.grad(lambda w: loss_fn(out(w, x[i:i + 1]), y[i:i + 1]))(flat0) for i in range(len(x))]
    return torch.stack(rows).detach()


def dense_empirical_fisher(model, loss_fn, batches, names=None, reduction="mean"):
    """``c Σₙ ∇ℓₙ ∇ℓₙᵀ`` with ``c = 1/N`` (mean) or 1 (sum)."""
    x, y = concat(batches)
    G = per_sample_gradients(model, loss_fn, x, y, names)
    c = 1.0 / len(x) if reduction == "mean" else 1.0
    return (c * G.T @ G).numpy()
