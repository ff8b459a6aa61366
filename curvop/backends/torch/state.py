"""Process-wide state the torch backend coordinates: one lock, the batch being evaluated, its seed.

* :data:`LOCK`: ``functional_call`` swaps module attributes and forward-mode AD levels are
  process-wide, so the parts of a product that run the model (and every ``jvp``) take this lock:
  products from several threads are then correct and never leave the model holding another
  thread's tensors.
* :func:`as_batch`: evaluate the loss as batch ``i`` (in the order the data yields them), for the
  per-batch seeds of ``train_mode=True`` (:class:`FixedRandomness`, :func:`batch_seed`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any, Callable, ContextManager

import numpy as np
import torch

__all__ = ["LOCK", "FixedRandomness", "as_batch", "batch_seed", "check_autograd_available",
           "inference_mode_error", "train_randomness"]

Tensor = torch.Tensor
LossFn = Callable[[dict[str, Tensor], Any], Tensor]

LOCK = threading.RLock()
_NULL = nullcontext()

#: The index of the batch being evaluated, set around each batch by the backend (0 when unset).
_BATCH = ContextVar("curvop_torch_batch", default=0)


@contextmanager
def as_batch(index: int) -> Iterator[None]:
    """Loss evaluations inside are batch ``index``'s (for the per-batch seeds of ``train_mode``)."""
    token = _BATCH.set(index)
    try:
        yield
    finally:
        _BATCH.reset(token)


def batch_seed(seed: int, index: int, rank: int = 0) -> int:
    """The torch seed under which ``train_mode=True`` evaluates batch ``index`` (on ``rank``).

    Batches are counted in the order the data yields them, from 0 (per rank, over its shard, in
    data-parallel products). Reproduce a mask with ``torch.manual_seed(batch_seed(seed, i))``
    before the model's forward on batch ``i``.

    Examples
    --------
    >>> from curvop.backends.torch import batch_seed
    >>> batch_seed(7, 0) == batch_seed(7, 0) != batch_seed(7, 1)
    True
    """
    return int(np.random.SeedSequence([seed, index, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class FixedRandomness:
    """Every loss evaluation on batch ``i`` draws from torch's generator seeded with ``batch_seed``.

    Inside ``torch.random.fork_rng`` (the CPU generator, and the CUDA one of the model's device), so
    the user's RNG state is what it was, and dropout draws one mask per batch, the same in every
    product. Holds no reference to the backend.
    """

    def __init__(self, seed: int, device: torch.device, rank: int):
        self.seed, self.rank = seed, rank
        self.cuda = None if device.type != "cuda" else (
            device.index if device.index is not None else torch.cuda.current_device())

    @contextmanager
    def fixed(self, index: int) -> Iterator[None]:
        seed = batch_seed(self.seed, index, self.rank)
        with LOCK, torch.random.fork_rng(devices=[] if self.cuda is None else [self.cuda], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            if self.cuda is not None:  # this device only: the others' generators are not forked
                torch.cuda.default_generators[self.cuda].manual_seed(seed)
            yield

    def wrap(self, loss: LossFn) -> LossFn:
        return partial(self._seeded_loss, loss)

    def _seeded_loss(self, loss: LossFn, p: dict[str, Tensor], batch: Any) -> Tensor:
        with self.fixed(_BATCH.get()):
            return loss(p, batch)

    def context(self, index: int, cached: bool, forward: bool) -> ContextManager[Any]:
        """Around batch ``index``'s product: its seed for the loss evaluations inside; around a
        cached map, the seed itself for a forward linearisation (it re-runs its random ops) and
        nothing for a reverse graph (it holds its mask)."""
        if cached:
            return self.fixed(index) if forward else _NULL
        return as_batch(index)


def train_randomness(rng_seed: int | np.random.Generator | None, collective: Any,
                     device: torch.device) -> FixedRandomness | None:
    """The ``train_mode`` draws for ``rng_seed`` (``None``: eval mode), with one base seed on every
    rank: a fixed int is checked to be the same everywhere, a drawn one is rank 0's draw."""
    if rng_seed is None:
        return None
    seed = rng_seed
    if collective is not None:
        agreed = collective.agree_seed(rng_seed, device)  # raises when fixed seeds differ across ranks
        seed = rng_seed if isinstance(rng_seed, int) else agreed
    if not isinstance(seed, int):
        seed = int(seed.integers(2**62))
    return FixedRandomness(seed, device, 0 if collective is None else collective.rank)


def inference_mode_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} needs autograd, which torch.inference_mode() disables; build the Hessian and multiply "
        "by it outside inference_mode (torch.no_grad() around curvop calls is fine)"
    )


def check_autograd_available() -> None:
    if torch.is_inference_mode_enabled():
        raise inference_mode_error("curvop.hessian")
