"""Targets sampled from a torch model's predictive distribution, for Sophia-G's Gauss-Newton-Bartlett
estimate (cross-entropy, MSE, BCE with logits).

Kept apart on purpose: the curvature family's Monte-Carlo Fisher samples targets the same way, and
Sophia-G should move onto its sampler when that lands. For a loss ``L = c Σₑ ℓₑ`` (``c`` is
``1/N`` for a mean over ``N`` terms, 1 for a sum) whose terms are negative log-likelihoods, the
gradient ``ĝ`` of ``L`` on sampled targets gives ``ĥ = ĝ² / c``, unbiased for the diagonal of
the Gauss-Newton matrix. The terms: cross-entropy, one per (non-ignored) target, categorical on
the softmax of the logits (classes on dimension 1, torch's convention); MSE, one per element,
``ℓ = (f − y)²`` being the likelihood of ``y ~ N(f, 1/2)``; BCE with logits, one per element,
Bernoulli on the sigmoid.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["check_loss", "sample_targets"]

_FUNCTIONAL = {F.cross_entropy: "cross_entropy", F.mse_loss: "mse", F.binary_cross_entropy_with_logits: "bce"}


def check_loss(loss_fn: Any) -> tuple[str, str]:
    """``(kind, reduction)`` of a supported loss, or a clear error."""
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise ValueError("Sophia-G samples targets for an unweighted CrossEntropyLoss without label smoothing; "
                             "class weights and label smoothing make the loss no likelihood of the model")
        kind = "cross_entropy"
    elif isinstance(loss_fn, torch.nn.MSELoss):
        kind = "mse"
    elif isinstance(loss_fn, torch.nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("Sophia-G samples targets for an unweighted BCEWithLogitsLoss")
        kind = "bce"
    elif loss_fn in _FUNCTIONAL:
        return _FUNCTIONAL[loss_fn], "mean"
    else:
        raise TypeError(
            f"Sophia-G samples targets from the model for torch.nn.CrossEntropyLoss, MSELoss or BCEWithLogitsLoss "
            f"(or their torch.nn.functional forms), got {type(loss_fn).__name__}; use SophiaH for other losses")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"the loss must be reduced ('mean' or 'sum'), got reduction={loss_fn.reduction!r}")
    return kind, loss_fn.reduction


def sample_targets(loss_fn: Any, outputs: torch.Tensor, targets: Any,
                   generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Targets drawn from the model's predictive distribution at ``outputs``, and ``1/c``.

    Parameters
    ----------
    loss_fn : CrossEntropyLoss, MSELoss or BCEWithLogitsLoss (or the functional forms)
    outputs : torch.Tensor
        The model's outputs (logits for the classification losses); not differentiated here.
    targets : torch.Tensor
        The true targets (their ignored positions stay ignored for cross-entropy).
    generator : torch.Generator
        The source of the draws (on the outputs' device).

    Returns
    -------
    (sampled, scale)
        ``loss_fn(outputs, sampled)`` is the loss on sampled targets; ``scale`` is ``1/c``, the
        number of terms a mean averages over (1 for a sum).

    Examples
    --------
    >>> import torch
    >>> y, scale = sample_targets(torch.nn.MSELoss(), torch.zeros(4, 3), torch.zeros(4, 3),
    ...                           torch.Generator().manual_seed(0))
    >>> y.shape, scale
    (torch.Size([4, 3]), 12.0)
    """
    kind, reduction = check_loss(loss_fn)
    f = outputs.detach()
    if kind == "cross_entropy":
        logits = f.movedim(1, -1) if f.dim() > 1 else f
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
        ignore = getattr(loss_fn, "ignore_index", -100)
        keep = targets != ignore if isinstance(targets, torch.Tensor) and not targets.is_floating_point() else None
        sampled = drawn if keep is None else torch.where(keep, drawn, targets)
        count = drawn.numel() if keep is None else int(keep.sum())
    elif kind == "mse":
        noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        sampled, count = f + noise * 0.5 ** 0.5, f.numel()
    else:
        u = torch.rand(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        sampled, count = (u < torch.sigmoid(f)).to(f.dtype), f.numel()
    return sampled, float(count if reduction == "mean" else 1)
