"""The data a Hessian is taken over: one batch, or a re-iterable of batches (framework-free).

**Weighting rule.** With several batches the operator is the Hessian of the loss over the whole
data set. For a mean-reduced loss that is ``sum_b (n_b / N) H_b`` with ``n_b`` the size of batch
``b`` and ``N = sum_b n_b`` (exactly the Hessian of the mean over all samples, also when the last
batch is smaller); for a sum-reduced loss it is ``sum_b H_b``. The sizes are counted during each
pass, so a loader is iterated once per product and never materialised.

**A batch is a pytree.** :func:`map_batch` walks any nesting of tuples, lists, mappings,
namedtuples and dataclasses and rebuilds only what changed, so containers and the leaves that are
not arrays (strings, ints, ``None``) reach the model as they were given. Every framework moves or
converts a batch's arrays with it (torch: to the device; TensorFlow: to tensors).

A loss whose mean is not over samples (a class-weighted cross-entropy divides by the sum of the
targets' weights, one with ignored targets by the number of targets kept) passes ``weight=``: a
function giving what the loss averages over in a batch; ``n_b`` is then that weight.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Callable, Iterator

__all__ = ["Dataset", "batch_leaves", "batch_size", "map_batch", "resolve_reduction"]

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


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_dataclass(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def map_batch(fn: Callable[[Any], Any], batch: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """``batch`` with ``fn`` applied to every leaf, containers rebuilt only where a leaf changed.

    Containers: tuples (namedtuples by their fields), lists, mappings (a mutable one is copied and
    refilled, so ``OrderedDict``, ``defaultdict`` or Hugging Face's ``BatchEncoding`` keep their
    type) and dataclass instances (copied, their fields set). Everything else is a leaf, and so is
    anything ``is_leaf`` accepts (torch's ``PackedSequence``, which moves as one object). A
    container whose leaves ``fn`` all returned unchanged is returned itself.

    >>> from collections import namedtuple
    >>> P = namedtuple("P", "x tag")
    >>> map_batch(lambda a: a * 2 if isinstance(a, float) else a, ([P(1.0, "s")], {"n": None}))
    ([P(x=2.0, tag='s')], {'n': None})
    """
    if is_leaf is not None and is_leaf(batch):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        items = [map_batch(fn, b, is_leaf) for b in batch]
        if all(a is b for a, b in zip(items, batch)):
            return batch
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*items)
        try:
            return type(batch)(items)
        except TypeError:  # a subclass with another constructor
            return tuple(items) if isinstance(batch, tuple) else items
    if isinstance(batch, Mapping):
        items = {k: map_batch(fn, v, is_leaf) for k, v in batch.items()}
        if all(items[k] is v for k, v in batch.items()):
            return batch
        if isinstance(batch, MutableMapping):
            out = copy.copy(batch)
            for k, v in items.items():
                out[k] = v
            return out
        return items
    if _is_dataclass(batch):
        items = {f.name: map_batch(fn, getattr(batch, f.name), is_leaf) for f in dataclasses.fields(batch)
                 if hasattr(batch, f.name)}
        if all(v is getattr(batch, k) for k, v in items.items()):
            return batch
        out = copy.copy(batch)
        for k, v in items.items():
            object.__setattr__(out, k, v)  # frozen dataclasses too
        return out
    return fn(batch)


def batch_leaves(batch: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    """The leaves of ``batch`` in the order :func:`map_batch` visits them."""
    out: list[Any] = []

    def visit(x: Any) -> Any:
        out.append(x)
        return x

    map_batch(visit, batch, is_leaf)
    return out


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its targets, else of its first array.

    The targets are the last element of a tuple batch ``(inputs, targets)``; when they are not an
    array (or the batch is a mapping), the first array leaf of the batch is used.
    """
    item = batch[-1] if isinstance(batch, (list, tuple)) and len(batch) > 0 else batch
    if not _is_array(item):
        item = next((x for x in batch_leaves(batch) if _is_array(x)), None)
    shape = getattr(item, "shape", None)
    if shape is None or len(shape) == 0:
        raise ValueError(
            f"cannot tell the size of a batch whose targets are {type(item).__name__}; "
            "batches must be (inputs, targets) with a leading sample dimension"
        )
    return int(shape[0])


def _is_batch(data: Any) -> bool:
    """One batch, not a collection of batches: a mapping, a dataclass, or a tuple/list holding an
    array at its top level (``(x, y)``, ``(inputs, y)`` with ``inputs`` any structure, a
    namedtuple of arrays). A list of batches holds batches, never a bare array."""
    if isinstance(data, Mapping) or _is_dataclass(data):
        return True
    if not isinstance(data, (tuple, list)) or len(data) == 0:
        return False
    return any(_is_array(x) for x in data)


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
