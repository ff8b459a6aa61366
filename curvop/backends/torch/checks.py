"""The template's checks in torch's words, and the checks only torch needs.

:class:`~curvop.backends.template.AutodiffBackend` checks the parameters and the loss over a
framework-free description (:class:`~curvop.backends.template.ParamInfo`,
:class:`~curvop.backends.template.LossInfo`); this module describes torch tensors that way, adds
what only autograd needs (no inference tensors, a loss that depends on the parameters through
autograd) and gives the fixes in torch's words (:class:`TorchAdvice`).
"""

from __future__ import annotations

from typing import Any

import torch

from curvop._dtypes import dtype_name
from curvop.backends.checks import LossInfo, ParamInfo

__all__ = ["TorchAdvice", "loss_info", "param_infos"]


def param_infos(params: dict[str, Any]) -> list[ParamInfo]:
    """The parameters described for the template's checks; torch tensors, none an inference tensor."""
    for name, p in params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
        if p.is_inference():
            raise RuntimeError(
                f"parameter {name!r} is an inference tensor (created under torch.inference_mode()), which "
                "autograd cannot differentiate; create or load the model outside torch.inference_mode()"
            )
    return [ParamInfo(k, _name(p.dtype, p.is_floating_point()), str(p.device), p.is_floating_point())
            for k, p in params.items()]


def loss_info(value: Any) -> LossInfo:
    """The loss on the first batch described for the template's checks; refuses a loss that is a
    finite scalar but not a function of the parameters through autograd (its Hessian would be 0)."""
    if not isinstance(value, torch.Tensor):
        return LossInfo(False, type(value).__name__, (), "", False)
    floating = value.is_floating_point()
    finite = bool(torch.isfinite(value).all()) if floating and value.numel() == 1 else None
    if finite and not value.requires_grad:
        raise ValueError(
            "the loss does not depend on the parameters through autograd, so its Hessian would be 0: "
            "does the loss or the model call .detach(), .item(), .numpy() or run under torch.no_grad()? "
            "(If the selected parameters are truly unused, their Hessian is 0; select others with params=.)"
        )
    return LossInfo(True, "Tensor", tuple(value.shape), _name(value.dtype, floating), floating, finite)


def _name(dtype: torch.dtype, floating: bool) -> str:
    """``"float32"`` for the checks of floats, ``"torch.int64"`` in the message refusing the others."""
    return dtype_name(dtype) if floating else str(dtype)


class TorchAdvice:
    """The fixes the template's error messages name, in torch's words (a mixin of ``TorchBackend``)."""

    torch_dtype: torch.dtype

    def _param_advice(self) -> dict[str, str]:
        return {"dtype_fix": "convert the model to one dtype first, e.g. model.double() or model.float()",
                "device_fix": "move the model with model.to(device)",
                "float_fix": "convert it with .double() or .float(), or leave it out of params",
                "half_fix": "convert the model with model.float() (or model.double()), on a copy "
                            "(copy.deepcopy(model).float()) to keep the 16-bit one"}

    def _loss_type(self) -> str:
        return "torch.Tensor"

    def _reduce_advice(self) -> str:
        return "use a reduced loss (reduction='mean' or 'sum'), not reduction='none'"

    def _precision_message(self, loss_dtype: str) -> str:
        return (f"the loss value is torch.{loss_dtype}, but the parameters are {self.torch_dtype}: the Hessian "
                "would silently lose digits (a float32 loss gives about 1e-8 relative accuracy instead of 1e-16). "
                "Compute the loss in the model's dtype: no .float() on the logits (Hugging Face causal-LM losses "
                "upcast with .float(): compute the loss yourself from out.logits with a loss_fn), no float32 "
                "constants. Pass check_loss_dtype=False to accept the lower precision.")
