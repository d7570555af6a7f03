"""Group-wise asymmetric integer quantization (round-to-nearest with an integer zero point).

Shapes follow ``nn.Linear``: weights are ``[out_features, in_features]`` and groups run along ``in_features``.
``group_size=-1`` means one group per output channel (per-channel quantization).
"""

from __future__ import annotations

import torch


def _grouped(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(
            f"group_size={group_size} must divide in_features={in_features}; pick a divisor or -1 (per-channel)."
        )
    return weight.reshape(out_features, in_features // group, group), group


def compute_scales_zeros(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales ``[out, in // g]`` (rounded to ``scale_dtype``) and integer zeros ``[out, in // g]``."""
    grouped, _ = _grouped(weight.float(), group_size)
    w_max = grouped.amax(-1).clamp_min(0.0)
    w_min = grouped.amin(-1).clamp_max(0.0)
    q_max = 2**bits - 1
    scales = ((w_max - w_min).clamp_min(1e-5) / q_max).to(scale_dtype).float()
    zeros = torch.clamp(-torch.round(w_min / scales), 0, q_max).to(torch.int32)
    return scales, zeros


def quantize_groupwise(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight [out, in]``.

    Returns ``codes`` int32 ``[out, in]`` in ``[0, 2^bits - 1]``, ``scales`` float32 ``[out, in // g]`` (values
    exactly representable in ``scale_dtype``) and ``zeros`` int32 ``[out, in // g]``.
    """
    scales, zeros = compute_scales_zeros(weight, bits, group_size, scale_dtype)
    grouped, _ = _grouped(weight.float(), group_size)
    codes = torch.clamp(torch.round(grouped / scales[..., None]) + zeros[..., None], 0, 2**bits - 1)
    return codes.to(torch.int32).reshape(weight.shape), scales, zeros


def dequantize_groupwise(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` up to rounding: float32 ``[out, in]``."""
    grouped, _ = _grouped(codes.float(), group_size)
    return ((grouped - zeros[..., None].float()) * scales[..., None]).reshape(codes.shape)


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Quantize then dequantize ``weight [out, in]``; returns the same dtype as ``weight``."""
    codes, scales, zeros = quantize_groupwise(weight, bits, group_size, scale_dtype)
    return dequantize_groupwise(codes, scales, zeros, group_size).to(weight.dtype)
