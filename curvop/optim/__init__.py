"""Second-order optimizers built on curvop's operators: AdaHessian and Sophia (Sophia-H, Sophia-G).

They sit beside the sharpness tracker, above the algorithms: each step builds an operator of the
mini-batch loss (:func:`curvop.hessian_of`) and estimates its diagonal with
:func:`curvop.diagonal` (Hutchinson, Rademacher probes); Sophia-G uses the Gauss-Newton-Bartlett
estimator instead (a gradient on targets sampled from the model). They know nothing about backends.

* torch: :class:`AdaHessian`, :class:`SophiaH`, :class:`SophiaG` (``torch.optim.Optimizer``\\ s),
  in :mod:`curvop.optim.torch`;
* JAX: optax transformations in :mod:`curvop.optim.optax`;
* Keras 3: optimizers with their curvature callback in :mod:`curvop.optim.keras`.

``import curvop.optim`` imports no framework; the torch classes load torch when first named.
The update rules and what each costs: ``docs/optimizer.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AdaHessian", "SophiaH", "SophiaG"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("curvop.optim.torch"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
