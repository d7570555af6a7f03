"""Dense ``y = x W^T + b`` in float64: the oracle of the fast dense-linear paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]``, ``weight [out, in]``, ``bias [out]`` -> ``[..., out]`` in ``x.dtype``, computed in float64."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return y.to(x.dtype)
