"""The PyTorch backend: torch's autodiff, its op rewrites, its state handling and its distributed code.

Everything here imports torch; nothing outside this folder imports it (``curvop.backends`` finds it
through the registry). One module a concern:

* ``backend``: :class:`TorchBackend`, the template plus torch's products (``hessian``, ``hessian_of``);
* ``graph``: the Hessian from one autograd graph, a closure's or given gradients' (``hessian_of``'s
  torch.optim forms);
* ``curvature``: the curvature family (GGN, Fisher, Jacobian) on the backend; ``sampling``: the
  Monte-Carlo Fisher's target draws (:func:`sample_targets`);
* ``model``: the model adapter (``functional_call``, batches, buffers, losses) and the factories;
* ``checks``: parameters and losses described for the template's checks, torch's advice;
* ``state``: the lock, the per-batch seeds of train-mode products, inference-mode errors;
* ``functions``: attention and activations rebuilt from ops with every derivative;
* ``rewrites``: the ``TorchFunctionMode`` that applies them, and the faster exact convolution and GELU;
* ``distributed``: the ``torch.distributed`` collective of data-parallel products;
* ``fsdp`` and ``sharded_arrays``: FSDP2 (``fully_shard``) models, whose vectors are ``DTensor``s.

>>> import torch, curvop
>>> model = torch.nn.Linear(3, 1).double()
>>> H = curvop.backends.torch.hessian(model, torch.nn.MSELoss(), (torch.ones(4, 3).double(), torch.zeros(4, 1).double()))
>>> H.shape
(4, 4)
"""

from __future__ import annotations

import importlib
from typing import Any

from curvop.backends.torch.distributed import DistributedError, is_main_process

__all__ = ["TorchBackend", "DistributedError", "batch_seed", "hessian", "hessian_of", "is_main_process",
           "TorchCurvature", "ggn", "fisher", "jacobian", "likelihood_of", "sample_targets"]
_FROM_BACKEND = ("TorchBackend", "batch_seed", "hessian")
#: hessian_of (a function of the parameters, or a closure or gradients), the curvature family (GGN,
#: Fisher, Jacobian) and its target sampling
_FROM = {"hessian_of": "graph", **{name: "curvature" for name in ("TorchCurvature", "ggn", "fisher", "jacobian")},
         "sample_targets": "sampling", "likelihood_of": "sampling"}


def __getattr__(name: str) -> Any:
    """The backend's names, imported on first use: ``distributed``, ``fsdp`` and ``sharded_arrays``
    import no torch at import time, so a launcher script can ask ``is_main_process()`` cheaply."""
    if name in _FROM_BACKEND:
        return getattr(importlib.import_module("curvop.backends.torch.backend"), name)
    if name in _FROM:
        return getattr(importlib.import_module(f"curvop.backends.torch.{_FROM[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
