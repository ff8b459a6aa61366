"""Targets drawn from a model's predictive distribution (torch): the Monte-Carlo Fisher's draws.

:func:`sample_targets` is the one function the Monte-Carlo Fisher (:mod:`curvop.backends.torch.curvature`)
and a Gauss-Newton-Bartlett estimator (Sophia-G: the squared mini-batch gradient of the loss on
targets sampled from the model, times the batch size) need. It draws from its own
``torch.Generator``, so torch's global RNG state is never touched.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["sample_targets"]

Tensor = torch.Tensor


def sample_targets(outputs: Tensor, likelihood: str, *, seed: int, samples: int = 1, like: Tensor | None = None,
                   variance: Tensor | float | None = None, class_dim: int = 1,
                   ignore_index: int | None = None) -> list[Tensor]:
    """``samples`` draws of targets from the predictive distribution at ``outputs`` (no gradient).

    Parameters
    ----------
    outputs : Tensor
        The model outputs, samples along dimension 0: logits for ``"categorical"`` (classes along
        ``class_dim``, torch's ``CrossEntropyLoss`` convention) and ``"bernoulli"``, the mean for
        ``"gaussian"``.
    likelihood : {"categorical", "bernoulli", "gaussian"}
    seed : int
        Seeds a private ``torch.Generator`` on the outputs' device.
    samples : int
    like : Tensor, optional
        The true targets, for their format: a floating ``like`` of the outputs' shape asks for
        one-hot ``"categorical"`` targets (class probabilities), else class indices (int64).
    variance : Tensor or float, optional
        ``"gaussian"`` only: the variance of each output entry (default 1).
    ignore_index : int, optional
        ``"categorical"`` with class-index ``like`` only: where ``like`` holds it, the draws hold it
        too (those positions stay out of the loss, as they are out of the loss on the true targets).

    Returns
    -------
    list of Tensor
        ``samples`` target tensors, each in the format the loss takes.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    >>> sample_targets(logits, "categorical", seed=0)[0].tolist()
    [0, 1]
    """
    f = outputs.detach()
    gen = torch.Generator(device=f.device).manual_seed(int(seed))
    if likelihood == "categorical":
        moved = f.movedim(class_dim, -1)
        probs = torch.softmax(moved, dim=-1).reshape(-1, moved.shape[-1])
        idx = torch.multinomial(probs, samples, replacement=True, generator=gen)  # (rows, samples)
        idx = idx.T.reshape(samples, *moved.shape[:-1])
        if like is not None and like.is_floating_point() and like.shape == f.shape:
            onehot = torch.nn.functional.one_hot(idx, moved.shape[-1]).to(f.dtype)
            return [t.movedim(-1, class_dim) for t in onehot]
        if ignore_index is not None and like is not None and not like.is_floating_point():
            if 0 <= ignore_index < moved.shape[-1]:
                raise ValueError(
                    f"ignore_index={ignore_index} is one of the {moved.shape[-1]} classes, so the loss would drop the "
                    "draws of that class and the Monte-Carlo Fisher would be biased: use an ignore_index outside "
                    "the classes (torch's default -100), or curvop.ggn")
            idx = torch.where(like == ignore_index, like.to(idx.dtype), idx)
        return list(idx)
    if likelihood == "bernoulli":
        p = torch.sigmoid(f).expand(samples, *f.shape)
        return list(torch.bernoulli(p, generator=gen))
    if likelihood == "gaussian":
        z = torch.randn((samples, *f.shape), generator=gen, device=f.device, dtype=f.dtype)
        scale = 1.0 if variance is None else torch.as_tensor(variance, dtype=f.dtype, device=f.device).sqrt()
        return list(f + scale * z)
    raise ValueError(f"unknown likelihood {likelihood!r}; use 'categorical', 'bernoulli' or 'gaussian'")


def likelihood_of(loss_fn: Any) -> str | None:
    """The predictive distribution whose negative log-likelihood ``loss_fn`` is, or ``None``.

    Refuses the losses that are not such an NLL though they look like one (class weights, label
    smoothing, ``pos_weight``): the Monte-Carlo Fisher's expectation would not be the GGN.
    """
    F = torch.nn.functional
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "label_smoothing", 0.0):
            raise ValueError(
                "the Monte-Carlo Fisher needs the loss to be the negative log-likelihood of the sampled targets; "
                "a class-weighted or label-smoothed CrossEntropyLoss is not: use kind='empirical' or curvop.ggn")
        return "categorical"
    if isinstance(loss_fn, torch.nn.BCEWithLogitsLoss) or loss_fn is F.binary_cross_entropy_with_logits:
        if getattr(loss_fn, "weight", None) is not None or getattr(loss_fn, "pos_weight", None) is not None:
            raise ValueError(
                "the Monte-Carlo Fisher needs the loss to be the negative log-likelihood of the sampled targets; "
                "a BCEWithLogitsLoss with weight or pos_weight is not: use kind='empirical' or curvop.ggn")
        return "bernoulli"
    if isinstance(loss_fn, torch.nn.MSELoss) or loss_fn is F.mse_loss:
        return "gaussian"
    return None
