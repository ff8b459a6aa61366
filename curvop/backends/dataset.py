"""The data a Hessian is taken over: one batch, or a re-iterable of batches (framework-free).

**Weighting rule.** With several batches the operator is the Hessian of the loss over the whole
data set. For a mean-reduced loss that is ``sum_b (n_b / N) H_b`` with ``n_b`` the size of batch
``b`` and ``N = sum_b n_b`` (exactly the Hessian of the mean over all samples, also when the last
batch is smaller); for a sum-reduced loss it is ``sum_b H_b``. The sizes are counted during each
pass, so a loader is iterated once per product and never materialised.

A loss whose mean is not over samples (a class-weighted cross-entropy divides by the sum of the
targets' weights, one with ignored targets by the number of targets kept) passes ``weight=``: a
function giving what the loss averages over in a batch; ``n_b`` is then that weight.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Iterator

__all__ = ["Dataset", "batch_size", "resolve_reduction"]

_MEAN = {"mean", "sum_over_batch_size", "auto", "batchmean"}


def resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
    """``"mean"`` or ``"sum"``: given explicitly, or read from ``loss_fn.reduction`` (default mean)."""
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", None) or "mean"
        reduction = str(getattr(reduction, "value", reduction)).lower()  # enums (old Keras)
    if reduction in _MEAN:
        return "mean"
    if reduction == "sum":
        return "sum"
    if reduction == "none":
        raise ValueError(
            "the loss has reduction='none' and returns one value per sample; curvop needs a scalar "
            "loss: use reduction='mean' (or 'sum')"
        )
    raise ValueError(f"unknown reduction {reduction!r}; pass reduction='mean' or reduction='sum'")


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its targets (or of its only array).

    Only the top level of the batch is looked at, so no tree library is needed: this module is
    framework-free and ``optree`` is not a dependency; the backends walk nested batches with their
    framework's own tree utilities (``tf.nest``, ``jax.tree_util``).
    """
    item = batch
    if isinstance(batch, Mapping):  # e.g. {"input_ids": ..., "labels": ...}: the first array's leading dimension
        item = next((v for v in batch.values() if hasattr(v, "shape")), None)
    elif isinstance(batch, (list, tuple)):
        item = batch[-1] if hasattr(batch[-1], "shape") else batch[0]
    shape = getattr(item, "shape", None)
    if shape is None or len(shape) == 0:
        raise ValueError(
            f"cannot tell the size of a batch whose targets are {type(item).__name__}; "
            "batches must be (inputs, targets) with a leading sample dimension"
        )
    return int(shape[0])


def _is_batch(data: Any) -> bool:
    """One batch: a dict of arrays, ``(x, y, ...)`` of arrays, or ``(inputs, y)`` with tuple/dict inputs."""
    if isinstance(data, Mapping):
        return True
    if not isinstance(data, (tuple, list)) or len(data) == 0:
        return False
    if hasattr(data[0], "shape"):
        return True
    return (len(data) == 2 and hasattr(data[1], "shape") and isinstance(data[0], (tuple, list, Mapping))
            and len(data[0]) > 0 and all(hasattr(x, "shape") for x in _values(data[0])))


def _values(inputs: Any) -> list[Any]:
    return list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)


class Dataset:
    """One batch or a re-iterable of batches, combined by the weighting rule of the module docstring.

    Parameters
    ----------
    data : batch ``(inputs, targets)`` or re-iterable of batches, or ``None`` (no data)
    reduction : ``"mean"`` or ``"sum"``
    weight : callable, optional
        ``weight(batch)``: what a mean-reduced loss averages over in ``batch`` (default
        :func:`batch_size`). It may return a number or a 0-d array of the framework.
    single : bool, optional
        Whether ``data`` is one batch; guessed from its structure when not given.
    """

    def __init__(self, data: Any, reduction: str = "mean", *, weight: Callable[[Any], Any] | None = None,
                 single: bool | None = None):
        if weight is not None and not callable(weight):
            raise TypeError(f"batch_weight must be a callable batch -> weight, got {type(weight).__name__}")
        self.reduction = reduction
        self.weight = batch_size if weight is None else weight
        self.single = (data is None or _is_batch(data)) if single is None else bool(single)
        if not self.single:
            if not hasattr(data, "__iter__"):
                raise TypeError(
                    f"data must be one batch (inputs, targets) or an iterable of batches, got {type(data).__name__}"
                )
            if iter(data) is data:
                raise TypeError(
                    "data is a one-shot iterator (a generator?); every product iterates over the data "
                    "again, so pass a re-iterable: a list of batches, a DataLoader or a tf.data.Dataset"
                )
        self.data = data

    def batches(self) -> Iterator[Any]:
        """Iterate over the batches (a single batch is yielded once)."""
        if self.single:
            yield self.data
            return
        yield from self.data

    def first(self) -> Any:
        """The first batch; a clear error if there is none."""
        for batch in self.batches():
            return batch
        raise ValueError("data is empty: the data loader yielded no batches")

    def weighted_batches(self) -> Iterator[tuple[int, Any, Any]]:
        """``(index, batch, weight)`` per batch: the weight ``n_b`` of the weighting rule (1 for a
        sum-reduced loss or no data). The one place a batch's weight is computed."""
        mean = self.reduction == "mean"
        for i, batch in enumerate(self.batches()):
            yield i, batch, (self.weight(batch) if mean and batch is not None else 1)

    def accumulate(self, terms: Iterable[tuple[Any, Any]],
                   add: Callable[[Any, Any], Any] = operator.add) -> tuple[Any, Any]:
        """``(sum_b w_b p_b, sum_b w_b)`` over ``(p_b, w_b)`` pairs (mean), ``(sum_b p_b, count)`` (sum).

        ``add(acc, p)`` adds a term (an in-place add where the framework allows). A data-parallel
        caller all-reduces both over its shards before :meth:`normalize` (``curvop.backends.torch.distributed``).
        """
        mean = self.reduction == "mean"
        acc, total = None, 0
        for p, w in terms:
            if mean:
                p = p * w
            total = total + w
            acc = p if acc is None else add(acc, p)
        if acc is None:
            raise ValueError("data is empty: the data loader yielded no batches")
        return acc, total

    def normalize(self, acc: Any, count: Any) -> Any:
        """``acc / count`` for a mean-reduced loss, ``acc`` for a sum."""
        return acc / count if self.reduction == "mean" else acc

    def weighted_sum(self, product: Callable[[Any], Any]) -> Any:
        """``sum_b w_b product(batch_b)`` with the weights of the weighting rule (one batch: unweighted)."""
        if self.single:
            return product(self.data)
        return self.normalize(*self.partial_sum(product))

    def partial_sum(self, product: Callable[[Any], Any]) -> tuple[Any, Any]:
        """The unnormalised sum and the weight :meth:`accumulate` gives for ``product`` on every batch."""
        return self.accumulate((product(b), w) for _, b, w in self.weighted_batches())
