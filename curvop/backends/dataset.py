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

from collections.abc import Mapping
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
    """Number of samples in a batch: the leading dimension of its targets (or of its only array)."""
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

    def weighted_sum(self, product: Callable[[Any], Any], on_batch: Callable[[int, Any], None] | None = None) -> Any:
        """``sum_b w_b product(batch_b)`` with the weights of the weighting rule."""
        if self.single:
            return product(self.data)
        acc, total = self.partial_sum(product, on_batch)
        return acc / total if self.reduction == "mean" else acc

    def partial_sum(self, product: Callable[[Any], Any],
                    on_batch: Callable[[int, Any], None] | None = None) -> tuple[Any, int]:
        """The unnormalised sum and the sample count ``(sum_b n_b product(batch_b), sum_b n_b)``.

        For a sum-reduced loss the sum is ``sum_b product(batch_b)`` and the count is the number
        of batches (unused). ``weighted_sum`` is ``acc / count`` (mean) or ``acc`` (sum); a data-parallel
        caller all-reduces both over its shards before dividing (``curvop.backends.distributed``).
        A single batch counts its samples (1 when there is no data).
        """
        total, acc = 0, None
        for i, batch in enumerate(self.batches()):
            p = product(batch)
            if on_batch is not None:
                on_batch(i, p)
            if self.reduction == "mean":
                nb = 1 if batch is None else self.weight(batch)
                p = p * nb
            else:
                nb = 1
            total += nb
            acc = p if acc is None else acc + p
        if acc is None:
            raise ValueError("data is empty: the data loader yielded no batches")
        return acc, total
