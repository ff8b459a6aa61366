"""Let torchvision's pure-Python parts import next to a torch whose build its compiled ops do not fit.

The torchvision wheel that pins torch 2.13 on PyPI (0.28.0) is a CUDA build: its ``_C`` extension
links ``libtorch_cuda.so``, which the CPU build of torch (``.ci/constraints.txt``) lacks.
torchvision then falls back to "no compiled ops" (``torchvision.extension._has_ops()`` is False)
for everything except two fake-kernel registrations (``torchvision::nms`` and ``::qnms``) that it
makes unconditionally, so ``import torchvision`` (and ``import timm``, and any ``transformers``
model class, which import it) raises ``RuntimeError: operator torchvision::nms does not exist``.

:func:`install` hooks the first ``import torchvision``: it tries to load the compiled ops, and only
if they do not load it declares those two operators' schemas (no kernels). torchvision then
imports with ``_has_ops() == False``: models and transforms work (they are Python), and ``nms``,
``roi_align`` and the other compiled ops raise torchvision's own "Couldn't load custom C++ ops".
With a torchvision whose ops load (a matching build), nothing is declared and nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY: Any = None  # the torch.library.Library holding the declared schemas (kept alive)


def _declare_missing_ops() -> None:
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = list(spec.submodule_search_locations)[0]
    compiled = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    try:
        import torch
    except ImportError:
        return  # torchvision cannot work without torch anyway; let it say so
    try:
        if compiled:
            torch.ops.load_library(os.path.join(folder, compiled[0]))
            return  # the compiled ops load: torchvision registers everything itself
    except OSError:
        pass
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _LIBRARY.define(op + _SCHEMA)


class _FirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None  # the regular finders import it


def install() -> None:
    """Hook the first ``import torchvision`` (a no-op when it is imported already)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _FirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImport())
