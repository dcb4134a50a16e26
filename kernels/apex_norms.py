"""NVIDIA apex's fused norms in the registry's call shape (``norm(x, weight, [bias,] eps)``).

apex is imported on the first call, never at import: ``backends.apex_available`` decides
whether this backend can be chosen at all.
"""

from __future__ import annotations

import importlib

import torch


def _fused_functions():
    return importlib.import_module("apex.normalization.fused_layer_norm")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               tuning_group=None) -> torch.Tensor:
    # apex's affine layer norm has no bias-free form: a zero bias is the same function.
    bias = torch.zeros_like(weight) if bias is None else bias
    return _fused_functions().fused_layer_norm_affine(x, weight, bias, weight.shape, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, tuning_group=None) -> torch.Tensor:
    return _fused_functions().fused_rms_norm_affine(x, weight, weight.shape, eps)
